#!/usr/bin/env bash
# The GPU measurement of issue #14, in one command on a GPU machine with Python 3.12, torch and CUDA
# and no network: installs the kit that services/bench/gpu_kit/make_kit.sh built (carried in .gpukit/), then
# runs, stage by stage, in this order:
#   sampler the top-p filter by a window of candidates (policy.top_p_window) against transformers' full sort,
#           on real logits SmolLM2 sampled from, saved by make_kit.sh (services/bench/top_p_window.py; seconds);
#   fsdp    the trainer's fsdp update on one GPU under torchrun (NCCL, MixedPrecisionPolicy) against one
#           plain process (services/bench/fsdp_check.py, Qwen2.5-0.5B's shape; issue #15);
#   engine  Belay's PolicyEngine.generate with its behaviour log-probs, once per KV cache in
#           $ENGINE_CACHES (default "dynamic static"; paged ran 0.24x dynamic in the third session), the static
#           cache sized for the 64-token prompts (--max-prompt-tokens 64)
#           (services/bench/gpu.py --generation-only --profile), and one more call profiled op by op (where a
#           decode step's time goes; static's over its whole length, as a call of another length would compile
#           anew). The bench's random model has flat distributions: every row takes the full sort after the
#           top-p window, so these figures carry the window's cost and none of its gain (the sampler stage's);
#   stack   the whole services stack on one GPU (services/bench/gpu_stack.py), the policy sampling with
#           policy.kv_cache = $KV_CACHE: default "fastest", the cache of the engine stage's highest
#           tokens/s in this run (dynamic when that stage did not run or measured nothing);
#   modes   the generation modes without log-probs (services/bench/generation_modes.py);
# sampler, engine and stack (the default STAGES): at most 10 minutes on an H200, kit included (SAMPLER_SECONDS 60,
# ENGINE_SECONDS 100 a cache, STACK_SECONDS 270); about 5 expected (the third session's engine and stack on
# three caches took 345 s, paged's 95 among them). Figures go to $OUT (default ./gpu-out).
#
#   [STAGES="sampler fsdp engine stack modes"] [KV_CACHE=fastest|auto|dynamic|static|paged] [TRANSPORT=cuda_ipc]
#   [MINIBATCH=64] [ENGINE_CACHES="dynamic static paged"]
#     services/bench/gpu_kit/stack_bench.sh [SHAPE]
#   (SHAPE default qwen2.5-1.5b; e.g. STAGES="sampler engine" ENGINE_CACHES=static, about 2 minutes)
set -uo pipefail
cd "$(dirname "$0")/../../.."
SHAPE=${1:-qwen2.5-1.5b}
OUT=${OUT:-gpu-out}
STAGES=${STAGES:-sampler engine stack}
KV_CACHE=${KV_CACHE:-fastest}
ENGINE_CACHES=${ENGINE_CACHES:-dynamic static}
TRANSPORT=${TRANSPORT:-cuda_ipc}
MINIBATCH=${MINIBATCH:-64}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
install_kit() {  # $1: the target directory; the rest: the wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"
}
install_kit /tmp/belay-site .gpukit/wheels/*.whl || exit 1
# The same kit less transformers and its two companions, so that the machine's own transformers 5.17 serves:
# policy.kv_cache = paged (continuous batching) needs transformers 5; everything else runs the pinned 4.57.
install_kit /tmp/belay-site-tf5 $(ls .gpukit/wheels/*.whl | grep -v -e /transformers- -e /tokenizers- -e /huggingface_hub-) \
  || exit 1
site_for() { [[ $1 == paged || $1 == continuous ]] && echo /tmp/belay-site-tf5 || echo /tmp/belay-site; }  # $1: a policy.kv_cache or a mode
export PYTHONPATH="/tmp/belay-site:$PWD:$PWD/gen" PATH="$PWD/.gpukit/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm | tail -1
if [[ " $STAGES " == *" sampler "* ]]; then
  echo "== top-p: a window of candidates against the full sort, on SmolLM2's real logits and on flat ones"
  timeout "${SAMPLER_SECONDS:-60}" python3 -m services.bench.top_p_window --logits .gpukit/smollm2-logits.safetensors \
    --device cuda --repeats 20 --json "$OUT/top-p-window.json" 2>&1 | grep top_p_window
fi
if [[ " $STAGES " == *" fsdp "* ]]; then
  echo "== the trainer's fsdp update on one GPU (torchrun, NCCL)"
  timeout "${FSDP_SECONDS:-100}" python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m services.bench.fsdp_check --shape qwen2.5-0.5b --device cuda --json "$OUT/fsdp-check.json" 2>&1 \
    | grep -v Warning | tail -6
fi
if [[ " $STAGES " == *" engine "* ]]; then
  for kv_cache in $ENGINE_CACHES; do  # the rows, prompt and response lengths of generation_modes' defaults
    echo "== PolicyEngine.generate with behaviour log-probs: $kv_cache KV cache"
    rm -f "$OUT/engine-$kv_cache.json"  # an earlier run's figures must not stand for this one's
    PYTHONPATH="$(site_for "$kv_cache"):$PWD:$PWD/gen" timeout "${ENGINE_SECONDS:-100}" python3 -m services.bench.gpu --json "$OUT/engine-$kv_cache.json" \
      --size "$SHAPE" --device cuda --dtype bf16 --generation-only --kv-cache "$kv_cache" --batch 256 \
      --prompt-tokens 64 --max-prompt-tokens 64 --max-new-tokens 128 --warmup 1 --iterations 2 --profile 2>&1 \
      | grep -v -e Warning -e USDT | tail -20
  done
fi
if [[ $KV_CACHE == fastest ]]; then  # the engine stage's winner in this run (services/bench/fastest_cache.py)
  KV_CACHE=$(python3 -m services.bench.fastest_cache "$OUT" $ENGINE_CACHES)
  echo "== KV cache for the stack: $KV_CACHE (the engine stage's fastest; dynamic when it measured nothing)"
fi
if [[ " $STAGES " == *" stack "* ]]; then
  echo "== the services stack, $SHAPE, $KV_CACHE KV cache, $TRANSPORT transport, minibatch $MINIBATCH"
  PYTHONPATH="$(site_for "$KV_CACHE"):$PWD:$PWD/gen" timeout "${STACK_SECONDS:-270}" python3 -m services.bench.gpu_stack --json "$OUT/stack-$SHAPE-$KV_CACHE.json" \
    --shape "$SHAPE" --kv-cache "$KV_CACHE" --transport "$TRANSPORT" --minibatch "$MINIBATCH" \
    2> >(tee "$OUT/stack-$SHAPE-$KV_CACHE.log" >&2)
fi
if [[ " $STAGES " == *" modes "* ]]; then
  for mode in generate static continuous; do
    echo "== generation: $mode"
    PYTHONPATH="$(site_for "$mode"):$PWD:$PWD/gen" timeout "${MODE_SECONDS:-100}" python3 -m services.bench.generation_modes --json "$OUT/gen-$mode.json" \
      --shape "$SHAPE" --mode "$mode" --repeats 1 2>&1 | grep -v Warning | tail -4
  done
fi
