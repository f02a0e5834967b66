"""The wheel installs `bnfold` and `bnfold_cli` (the cli/ folder), never a bare top-level `cli`."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_contents(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("bnfold-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "bnfold_cli" in tops and "bnfold" in tops
    assert "cli" not in tops and not any(n.startswith("cli/") or n == "cli.py" for n in names)
    assert "bnfold_cli/app.py" in names and "bnfold/__main__.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bnfold = bnfold_cli.app:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_editable_install_exposes_the_same_names():
    import bnfold_cli.app
    import bnfold

    assert bnfold_cli.app.app.info.name == "bnfold"
    assert set(bnfold.__all__) >= {"calibrate", "fold", "inspect", "export", "verify", "fold_onnx", "convert"}
    assert callable(bnfold.fold) and callable(bnfold.export) and callable(bnfold.verify)
    import bnfold.torch_pass.fold  # importing a stage module must not shadow the public function
    import bnfold.onnx_pass.export  # noqa: F401

    assert callable(bnfold.fold) and callable(bnfold.export)
