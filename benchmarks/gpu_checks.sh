#!/usr/bin/env bash
# The CUDA checks, run on a machine with a GPU (and an image that already holds torch, pytest,
# pytest-benchmark, hypothesis, xdist and matplotlib): the CUDA test suite (tests/gpu), the
# memory estimate against the caching allocator's peak for every example model and for four
# more nets at batch 16 (benchmarks/cuda_op_trace.py --summary-only), the main job
# on the GPU, a profiler sweep and the whole test suite. Each part writes its log to $OUT
# (default ./gpu-out).
#
#   bash benchmarks/gpu_checks.sh            # wheels for missing packages may lie in .whl/
#   PROBE=1 bash benchmarks/gpu_checks.sh    # also rerun the cuDNN workspace probe
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || echo "editable install failed: the pytester tests need the entry point"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
}
if [ "${PROBE:-0}" = 1 ]; then  # the cuDNN workspace probe (results/cuda_workspaces_h200.csv)
  part cuda_workspaces 120 python3 benchmarks/cuda_workspace_probe.py
fi
part gpu_tests 150 python3 -m pytest -p no:cacheprovider -q -s -rfEs tests/gpu
part gpu_memory 150 python3 benchmarks/memory_estimate_vs_measured.py 1 4 8 --device cuda
part gpu_memory_more 120 python3 benchmarks/cuda_op_trace.py "$OUT/trace" --summary-only
part main_job_cuda 90 python3 -m pytest -p no:cacheprovider --modelcheck --modelcheck-device=cuda example_models/
part profile_cuda 60 python3 -m pytest_modelcheck.cli profile --model example_models.vit3d:build_model \
  --batch example_models.vit3d:make_batch --batch-sizes 1,16,64,256 --device cuda --json "$OUT/profile_vit3d.json"
part full_suite 240 python3 -m pytest -p no:cacheprovider -q -n 8 -rfE tests/
