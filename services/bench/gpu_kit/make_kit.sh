#!/usr/bin/env bash
# Build .gpukit/ here, on the CPU machine, for a GPU machine that has Python 3.12, torch and CUDA but no
# network (issue #14): the pinned pure-Python wheels and the cp312 builds Belay needs beyond what such
# a machine already holds, and redis-server unpacked from Debian's package with the libraries it links.
# About 36 MB. Then run services/bench/gpu_kit/stack_bench.sh there with .gpukit carried along.
#
#   services/bench/gpu_kit/make_kit.sh [KIT_DIR]        (default .gpukit; needs pip, apt-get and dpkg-deb)
set -euo pipefail
cd "$(dirname "$0")/../../.."
KIT=${1:-.gpukit}
PIP=${PIP:-$( [ -x .venv/bin/pip ] && echo .venv/bin/pip || echo "python3 -m pip")}
rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/debs"

# Versions as requirements.txt pins them; the dependencies those pins pull, pinned to what the CPU
# environment resolved. torch, numpy, safetensors, accelerate, xxhash, PyYAML, prometheus-client,
# tensorboard, click, h11, anyio and regex are taken from the GPU machine's own image.
pin() { grep -E "^$1==" requirements.txt | head -1; }
WHEELS=(
  "$(pin pydantic)" pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  "$(pin redis)" "$(pin fastapi)" starlette==1.10.0 "$(pin uvicorn)"
  opentelemetry-api==1.45.2 "$(pin grpcio)" "$(pin grpcio-health-checking)" "$(pin grpcio-reflection)" "$(pin protobuf)"
  "$(pin transformers)" "$(pin tokenizers)" huggingface-hub==0.36.2 "$(pin peft)"
)
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$KIT/wheels" "${WHEELS[@]}"

# redis-server 7.0 from Debian 12 and what it links beyond glibc; unpacked there into a private
# prefix, found through LD_LIBRARY_PATH set for redis-server alone (services/bench/gpu_kit/redis-server).
(cd "$KIT/debs" && apt-get download redis-server redis-tools libjemalloc2 liblzf1 libatomic1 libsystemd0 libssl3 \
  2>/dev/null || { apt-get update -qq && apt-get download redis-server redis-tools libjemalloc2 liblzf1 libatomic1 \
  libsystemd0 libssl3; })
mkdir -p "$KIT/bin" && cp services/bench/gpu_kit/redis-server "$KIT/bin/redis-server"

# A real model's logits for the sampler stage (the GPU machine has no real model): 64 rows the embedded
# SmolLM2-135M-Instruct sampled from, float16, about 6 MB (services/bench/top_p_window.py).
PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
$PY -m services.bench.top_p_window --json "$KIT/top-p-window-cpu.json" --save-logits "$KIT/smollm2-logits.safetensors"
du -sh "$KIT" && ls "$KIT/wheels" "$KIT/debs"
