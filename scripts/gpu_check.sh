#!/usr/bin/env bash
# GPU check for hf_extras: the CUDA test subset and the GPU kernel benchmark, in a few minutes on one GPU.
#
# The GPU machine has Python 3.12, its own torch, an older transformers and no network, so the packages hf_extras
# needs at other versions travel as wheels in .whl/ (ignored by git). Two steps:
#
#   1. here, with network to PyPI:      scripts/gpu_check.sh download
#   2. on the GPU machine (repo root):  scripts/gpu_check.sh            (carry .whl with the working tree)
#
# Step 2 installs the wheels into /tmp/site (--no-index: nothing is fetched), runs tests/test_cuda.py (fla vs our
# chunkwise forms; every family forward/backward/generate in float32 and bf16), the CUDA-capable compile/precision
# tests, and benchmarks/gpu_kernels.py (ours vs SDPA vs fla, bf16, 2k-16k tokens). Results go to
# benchmarks/results/gpu/ (and to $OUT when that is set, so a device run brings them back).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
# versions this checkout is developed and tested with (pyproject.toml pins the lower bounds)
PACKAGES=(transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 peft==0.21.2 accelerate==1.15.0
          datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 safetensors==0.8.0
          flash-linear-attention==0.6.0 fla-core==0.6.0)

if [[ "${1:-}" == "download" ]]; then
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PACKAGES[@]}"
    du -sh "$WHEELS"
    exit 0
fi

RESULTS=benchmarks/results/gpu
mkdir -p "$RESULTS"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site
else
    echo "no wheels in $WHEELS: using the machine's own packages (run 'scripts/gpu_check.sh download' first)" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import fla; print('fla', fla.__version__)" || echo "fla: not importable (dispatch falls back)"
} 2>&1 | tee "$RESULTS/environment.txt"

status=0
timeout 360 python3 -m pytest -q -p no:cacheprovider -o addopts="" --junitxml="$RESULTS/test_cuda.xml" \
    tests/test_cuda.py tests/test_fla_dispatch.py tests/test_mixed_precision.py 2>&1 | tee "$RESULTS/tests.txt" || status=1
timeout 240 python3 benchmarks/gpu_kernels.py --out "$RESULTS" 2>&1 | tee "$RESULTS/benchmark.txt" || status=1

if [[ -n "${OUT:-}" ]]; then cp "$RESULTS"/* "$OUT"/ 2>/dev/null || true; fi
exit $status
