#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine (its image: torch with CUDA 13, onnx, a CPU-only
# onnxruntime, typer, rich, pytest, torchvision; no package index). bnfold runs from this checkout.
# Writes ONE log, $OUT/gpu_check.log (plus gpu_check.json and the conversion reports beside it).
#
# onnxruntime-gpu comes in with ../shared/tools/ort-gpu-pack.sh (read its header):
#   here, once:   bash ../shared/tools/ort-gpu-pack.sh          (.ortgpu/c0..c3, git-ignored, ~49 MiB each)
#   there, 4 device calls in a row on the same warm machine, each carrying ONE chunk folder:
#     carry [".ortgpu/c0"]  command  bash .ortgpu/c0/stash.sh
#     carry [".ortgpu/c1"]  command  bash .ortgpu/c1/stash.sh
#     carry [".ortgpu/c2"]  command  bash .ortgpu/c2/stash.sh
#     carry [".ortgpu/c3"]  command  bash benchmarks/gpu_check.sh      (sources .ortgpu/c3/unpack.sh itself)
# Without the chunks the check still runs on the image's CPU-only onnxruntime: CUDA is then reported
# unavailable and the --require-providers conversions must exit 2 (the log says which case it was).
#
# Dry run of the non-GPU parts on any machine:  OUT=/tmp/gc bash benchmarks/gpu_check.sh --dry-run
set -u
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/bnfold-gpu}; mkdir -p "$OUT"; LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d)   # ONNX files stay out of $OUT (they would be copied back)

main() {
  echo "== bnfold GPU check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  # 1. onnxruntime-gpu from the stashed chunks (calls 0-2 put part-00..02 in /tmp/ortc)
  if [ -f .ortgpu/c3/unpack.sh ]; then
    if [ -f /tmp/ortc/part-00 ] && [ -f /tmp/ortc/part-01 ] && [ -f /tmp/ortc/part-02 ]; then
      # shellcheck disable=SC1091
      source .ortgpu/c3/unpack.sh
    else
      echo "!! .ortgpu/c3 is here but /tmp/ortc lacks part-00..02: run the three stash.sh calls first (same warm machine)"
    fi
  else
    echo "!! no .ortgpu/c3: onnxruntime-gpu not brought in; the image's onnxruntime is used"
  fi
  local shim; shim=$(mktemp -d); ln -s "$PWD/cli" "$shim/bnfold_cli"   # the CLI package without pip
  printf '#!/bin/sh\nexec python3 -m bnfold "$@"\n' > "$shim/bnfold"; chmod +x "$shim/bnfold"
  export PATH="$shim:$PATH" PYTHONPATH="$PWD:$shim:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
  nvidia-smi -L 2>&1 || echo "no nvidia-smi"
  python3 - <<'PY'
import sys, torch, onnxruntime as ort
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
PY
  local cuda_ep; cuda_ep=$(python3 -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))")
  local rc_tests rc_cpu rc_conv=0 rc_py

  # 2. the CUDA-only tests (pytest -m gpu), then the verification/calibration tests with this onnxruntime
  echo "== pytest -m gpu"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/ 2>&1 | tail -15; rc_tests=${PIPESTATUS[0]}
  [ "$rc_tests" = 5 ] && { echo "!! pytest -m gpu selected no test"; }
  echo "== pytest (CPU tests of the runners, verification, calibration with this onnxruntime)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_runners.py tests/test_verification.py \
    tests/test_calibration.py 2>&1 | tail -6; rc_cpu=${PIPESTATUS[0]}

  # 3. CUDA-provider conversions of real architectures through the CLI
  echo "== bnfold convert --providers cpu,cuda --require-providers cuda (cuda EP available: $cuda_ep)"
  local spec name rc
  for spec in benchmarks/models.py:resnet50 benchmarks/models.py:mobilenet_v2 torchvision.models:efficientnet_b0 \
              benchmarks/models.py:resnet18; do
    name=${spec##*:}
    [ "$DRY" = 1 ] && [ "$name" != resnet18 ] && continue
    timeout 300 bnfold --quiet convert "$spec" -o "$WORK/$name.onnx" --input-shape 1,3,224,224 \
      --providers cpu,cuda --require-providers cuda --report "$OUT/convert_$name.json" 2>"$WORK/err.txt" | tail -1
    rc=${PIPESTATUS[0]}
    # onnxruntime's own log lines look like "[W:onnxruntime:Default, file.cc:123 fn] ..."
    if grep -qE '\[[VIWEF]:onnxruntime' "$WORK/err.txt"; then echo "!! onnxruntime log lines reached stderr:"; grep -E '\[[VIWEF]:onnxruntime' "$WORK/err.txt" | head -3; rc_conv=1; fi
    grep -vE '\[[VIWEF]:onnxruntime' "$WORK/err.txt" | tail -2
    if [ "$cuda_ep" = 1 ]; then
      python3 - "$OUT/convert_$name.json" "$name" "$rc" <<'PY' || rc_conv=1
import json, sys
path, name, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = json.load(open(path)); v = r["verification"] or {}
runs = [x for x in v.get("runs", []) if x["target"] == "onnx"]
cuda = [x for x in runs if x["provider"] == "cuda"]
errs = ", ".join(f"{x['provider']}/{x['graph_optimization']} {x['max_abs_error']:.2e}" for x in runs)
ok = rc == 0 and r["passed"] and len(cuda) == 2 and "cuda" in v["providers_run"]
print(f"{'OK  ' if ok else 'FAIL'} convert {name}: rc {rc}, providers_run {v['providers_run']}, max abs {errs}, "
      f"float64 reference {v.get('float64_reference')}, {r['timings']}")
sys.exit(0 if ok else 1)
PY
    else
      if [ "$rc" = 2 ]; then echo "OK   convert $name: exit 2 as it must without a CUDA provider"; else echo "FAIL convert $name: rc $rc (expected 2)"; rc_conv=1; fi
    fi
  done

  # 4. everything else on the GPU: calibration == CPU, folding on CUDA, models living on the GPU,
  #    host syncs in calibration, the calibration benchmark (TF32 on vs on, off vs off) and TF32 evidence
  echo "== benchmarks/gpu_check.py"
  if [ "$DRY" = 1 ]; then
    python3 benchmarks/gpu_check.py --device cpu --small; rc_py=$?
  elif python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    python3 benchmarks/gpu_check.py; rc_py=$?
  else
    echo "FAIL no CUDA device: gpu_check.py not run"; rc_py=1
  fi
  echo "== summary: pytest -m gpu rc=$rc_tests · CPU tests rc=$rc_cpu · conversions rc=$rc_conv · gpu_check.py rc=$rc_py · cuda EP=$cuda_ep"
  [ "$rc_tests" = 0 ] && [ "$rc_cpu" = 0 ] && [ "$rc_conv" = 0 ] && [ "$rc_py" = 0 ]
}

main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
