#!/usr/bin/env bash
# The GPU measurement of issue #14, in one command on a GPU machine with Python 3.12, torch and CUDA
# and no network: installs the kit that services/bench/gpu_kit/make_kit.sh built (carried in .gpukit/), then
# runs the whole services stack on one GPU (services/bench/gpu_stack.py) and the generation modes
# (services/bench/generation_modes.py). About 5 minutes on an H200. Figures go to $OUT (default ./gpu-out).
#
#   services/bench/gpu_kit/stack_bench.sh [SHAPE]        (default qwen2.5-1.5b)
set -uo pipefail
cd "$(dirname "$0")/../../.."
SHAPE=${1:-qwen2.5-1.5b}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/belay-site \
  .gpukit/wheels/*.whl || exit 1
export PYTHONPATH="/tmp/belay-site:$PWD:$PWD/gen" PATH="$PWD/.gpukit/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm | tail -1
echo "== the services stack, $SHAPE"
timeout "${STACK_SECONDS:-330}" python3 -m services.bench.gpu_stack --json "$OUT/stack-$SHAPE.json" --shape "$SHAPE" \
  2> >(tee "$OUT/stack-$SHAPE.log" >&2)
for mode in generate static continuous; do
  echo "== generation: $mode"
  timeout "${MODE_SECONDS:-100}" python3 -m services.bench.generation_modes --json "$OUT/gen-$mode.json" \
    --shape "$SHAPE" --mode "$mode" --repeats 1 2>&1 | grep -v Warning | tail -4
done
