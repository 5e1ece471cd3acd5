#!/usr/bin/env bash
# The figures a GPU gives, in one run of a few minutes on one H100/H200-class GPU:
#   1. hooked scoring over a plain forward pass of a Pythia-1B-shaped model, 256 x 2048 tokens, bfloat16:
#      overhead ratio, tokens/s, peak GPU memory (N and 4N sequences);
#   2. a model split by a device map between cuda:0 and the CPU scores as on one device (the `gpu` tests);
#   3. a streamed scan over the loopback Hub scoring on the GPU, with the scan's default (the next revision loaded
#      while one is scored) and without it, and the GPU memory each holds.
# Each check runs even when one before it fails; the exit status is 1 if any failed.
#
#     benchmarks/gpu_checks.sh [PYTHON]        # PYTHON: the interpreter of the environment (default: python)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, installed or not
python=${1:-python}
failed=0

check() {
    echo "== $*"
    "$@" || { echo "== FAILED (exit $?): $*"; failed=1; }
}

check "$python" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
check "$python" benchmarks/scorer_overhead.py --shape pythia-1b --sequences 256 --seq-len 2048 --batch-size 8 \
    --device cuda --dtype bfloat16 --repeats 3
check "$python" -m pytest -q -m gpu -p no:cacheprovider tests
check "$python" benchmarks/stream_overlap.py --device cuda --samples 512 --seq-len 256
check "$python" benchmarks/stream_overlap.py --device cuda --samples 512 --seq-len 256 --no-load-ahead
exit $failed
