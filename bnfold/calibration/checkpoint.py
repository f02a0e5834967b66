"""``bnfold calibrate``: a model spec calibrated into a state_dict file, in one process or under torchrun."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from bnfold.calibration.population import CalibrationSummary, run_calibration
from bnfold.edges import jsonio as json
from bnfold.edges.data import as_source
from bnfold.edges.files import OutputSet, write_bytes_atomic, write_text_atomic
from bnfold.edges.load import load_model, parse_model_spec
from bnfold.edges.paths import check_run_paths, spec_files
from bnfold.errors import BadInputError, BnfoldError
from bnfold.options import CALIBRATE, ConvertOptions, reword
from bnfold.report import write_drift_plot


def calibrate_checkpoint(model: str, output: str | Path, *, options: ConvertOptions | None = None, **kw) -> CalibrationSummary | None:
    """Build ``model`` (a spec: ``file.py:fn`` or ``pkg.mod:fn``, loaded with ``weights=``), calibrate
    it on ``calib`` and write its state_dict to ``output`` and, with ``report=``, a JSON report (and with ``plot=`` the drift plot): all
    land or none. Keywords are the ``calibrate`` options of ``bnfold.options.OPTIONS`` (or pass one
    ``ConvertOptions``). Returns the summary.

    Under torchrun (WORLD_SIZE > 1) each process takes every N-th batch and the statistics are
    all-reduced; only rank 0 writes, and the other ranks return None.
    """
    opts = ConvertOptions.resolve(options, kw, CALIBRATE)
    try:
        return _calibrate_checkpoint(model, output, opts)
    except BnfoldError as err:  # options named as the caller spells them (--batch-size, batch_size=)
        raise reword(err, opts.via)


def _calibrate_checkpoint(model: str, output: str | Path, opts: ConvertOptions) -> CalibrationSummary | None:
    if opts.calib is None:
        raise BadInputError("no calibration data", "pass --calib DATA (.npz/.npy/.pt or module:fn)")
    if parse_model_spec(model).kind == "onnx":
        raise BadInputError("calibration needs the PyTorch model", "pass path/file.py:factory, not a .onnx file")
    check_run_paths({"model": spec_files(model), "--weights": opts.weights, "--calib": spec_files(opts.calib)},
                    {"-o": output, "--report": opts.report, "--plot": opts.plot}, no_overwrite=not opts.overwrite)
    m = load_model(model, opts.weights, trust_pickle=opts.trust_pickle)
    batches = list(as_source(opts.calib, opts.batch_size))  # every form calibrate takes, read the same way
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(batches) < world:  # every rank says so, before joining: no rank waits in a collective for the others
        raise BadInputError(f"fewer batches ({len(batches)}) than ranks ({world}) under torchrun: a rank would get no data",
                            "use a smaller --batch-size, more calibration data, or fewer processes (--nproc-per-node)")
    rank, world = _join_torchrun(world)
    try:
        calibrated, summary = run_calibration(m, batches[rank::world], estimator=opts.estimator.value, inplace=True,
                                              progress=opts.progress and rank == 0, allow_tf32=opts.allow_tf32, effect=True)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return None
    buf = io.BytesIO()
    torch.save(calibrated.state_dict(), buf)
    with OutputSet():  # the state_dict and the report land together or not at all
        write_bytes_atomic(output, buf.getvalue())
        if opts.plot is not None:
            write_drift_plot(summary.to_dict(), opts.plot)
        if opts.report is not None:
            write_text_atomic(opts.report, json.dumps({"calibration": summary.to_dict(), "output": str(output)}, indent=2) + "\n")
    return summary


def _join_torchrun(world: int) -> tuple[int, int]:
    """Under torchrun (``world``: WORLD_SIZE > 1) join the process group; (rank, world size)."""
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and os.environ.get("BNFOLD_DIST_BACKEND") == "nccl" else "gloo")
    return dist.get_rank(), dist.get_world_size()
