"""The documentation site in docs/ is real: `mkdocs build --strict` builds it (broken links and anchors
fail), and every page's commands and code blocks run, as written, in page order, from a fresh folder
holding a copy of samples/ — with the extraction of tests/test_readme.py (docs/architecture.md,
"Writing documentation", has the conventions)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from test_readme import README, blocks, run_command, run_python, steps

DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
TEXT = {name: (DOCS / name).read_text() for name in PAGES}
# the trust rules' names are their anchors: code and tests cite them by name (docs/trust.md)
TRUST_RULES = ["Exit codes are bnfold's", "No output on an input", "PASSED means compared",
               "Environment errors are bad input", "Outputs commit together", "stdout carries only what was asked for",
               "A death is not a verdict", "Every walk includes subgraphs"]


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (GitHub's is the same for these headings)."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra: pip install -e '.[dev]'")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _ids(site, page: str) -> set[str]:
    html = (site / ("" if page == "index.md" else page[:-3]) / "index.html").read_text()
    return set(re.findall(r'\bid="([^"]+)"', html))


def test_mkdocs_build_strict(site):
    for page in PAGES:
        assert _ids(site, page), page


def test_nav_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    assert sorted(v for entry in nav for v in entry.values()) == PAGES


def test_readme_links_into_the_docs_resolve(site):
    links = re.findall(r"\]\(docs/([\w-]+\.md)(?:#([\w-]+))?\)", README)
    assert {page for page, _ in links} == set(PAGES)  # the README links every page
    for page, anchor in links:
        assert page in PAGES, page
        assert not anchor or anchor in _ids(site, page), f"docs/{page}#{anchor}"


def test_trust_rules_are_headings_with_stable_anchors(site):
    headings = re.findall(r"^## (.+)$", TEXT["trust.md"], flags=re.M)
    assert [h for h in headings if h in TRUST_RULES] == TRUST_RULES
    ids = _ids(site, "trust.md")
    assert all(_slug(name) in ids for name in TRUST_RULES), sorted(ids)


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_run_or_marked_for_reading(page):
    steps(TEXT[page])  # raises on an untagged block, an unknown language, a malformed JSON/TOML/YAML block or
    # a command line that would not run


def test_ci_page_shows_the_bundled_files_as_they_are():
    shown = {lang: body for lang, body in blocks(TEXT["ci.md"]) if lang in ("toml", "yaml")}
    assert shown["toml"] == (ROOT / "samples" / "ci" / "conversions.toml").read_text()
    assert shown["yaml"] == (ROOT / "samples" / "ci" / "convert-models.yml").read_text()


def _same_keys(doc, real, where: str) -> None:
    """The documented excerpt has exactly the keys of the real file, at every level (lists: first entries)."""
    if isinstance(doc, dict) and isinstance(real, dict):
        assert sorted(doc) == sorted(real), (where, sorted(set(doc) ^ set(real)))
        for k in doc:
            _same_keys(doc[k], real[k], f"{where}.{k}")
    elif isinstance(doc, list) and isinstance(real, list) and doc and real:
        _same_keys(doc[0], real[0], f"{where}[0]")


def _runs_something(page: str) -> bool:
    try:
        return bool(steps(TEXT[page]))
    except ValueError:  # reported by test_every_block_is_run_or_marked_for_reading, and by the run below
        return True


RUNNABLE = [p for p in PAGES if _runs_something(p)]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE)
def test_every_page_runs_from_a_fresh_folder(page, tmp_path):
    text = TEXT[page]
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    tables = {ln.strip() for ln in text.splitlines() if ln.startswith("|")}
    for kind, step in steps(text):
        if kind == "cmd":
            r = run_command(step, tmp_path)
            printed = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("|")]
            assert set(printed) <= tables, (step, sorted(set(printed) - tables))  # a printed table is the one shown
        else:
            run_python(step, tmp_path)
    for name, body in re.findall(r"<!-- same keys as ([\w./-]+) -->\n```json\n(.*?)^```", text, flags=re.M | re.S):
        _same_keys(json.loads(body.replace("…", "")), json.loads((tmp_path / name).read_text()), name)
