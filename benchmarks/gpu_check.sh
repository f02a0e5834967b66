#!/usr/bin/env bash
# One prepared run on a lent GPU machine (its image has torch+CUDA, onnx, onnxruntime, typer, rich,
# pytest): no install, bnfold from this checkout. Writes logs to $OUT.
set -u
OUT=${OUT:-/tmp/bnfold-gpu}; mkdir -p "$OUT"
shim=$(mktemp -d); ln -s "$PWD/cli" "$shim/bnfold_cli"          # the CLI package without pip
printf '#!/bin/sh\nexec python3 -m bnfold "$@"\n' > "$shim/bnfold"; chmod +x "$shim/bnfold"
export PATH="$shim:$PATH" PYTHONPATH="$PWD:$shim:$PWD/tests" PYTHONUNBUFFERED=1 OUT
nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 benchmarks/gpu_check.py 2>&1 | grep -v -i warning | tee "$OUT/gpu_check.log"; rc1=${PIPESTATUS[0]}
python3 -m pytest -q -p no:cacheprovider tests/test_verification.py tests/test_folding.py tests/test_calibration.py \
  tests/test_onnx_fold.py tests/test_export.py tests/test_sample_e2e.py 2>&1 | tail -25 | tee "$OUT/pytest.log"; rc2=${PIPESTATUS[0]}
echo "gpu_check rc=$rc1 pytest rc=$rc2"
