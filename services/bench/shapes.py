"""Model shapes the GPU benches build, randomly initialised (no weights can be fetched on the GPU
machine), with a word-level tokenizer: "w4" .. "wN" are one token a word, so a prompt of k words is
exactly k tokens. `1b` is TinyLlama-1.1B's shape; the qwen2.5-* shapes are Qwen2.5's published
configs (config.json of Qwen/Qwen2.5-0.5B, -1.5B, -7B): the sizes Belay's users train."""

from __future__ import annotations

import pathlib
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..common.config import GrpcConfig
from ..common.models import load_causal_lm
from ..policy.engine import PolicyEngine

QWEN = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
SHAPES = {  # name: (config class, model class, fields)
    "tiny": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
    ),
    "1b": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=2048,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            intermediate_size=5632,
            vocab_size=32000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2.5-0.5b": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
            tie_word_embeddings=True,
            **QWEN,
        ),
    ),
    "qwen2.5-1.5b": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            vocab_size=151936,
            tie_word_embeddings=True,
            **QWEN,
        ),
    ),
    "qwen2.5-7b": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
            tie_word_embeddings=False,
            **QWEN,
        ),
    ),
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3; words "w4".. take the remaining ids


def shape_fields(shape: str) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r} (known: {', '.join(SHAPES)})")
    return SHAPES[shape][2]


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word: "w{i}" is id i, for 4 <= i < vocab_size."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_random_model(
    shape: str, directory: pathlib.Path, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> pathlib.Path:
    """A randomly initialised model of `shape`, saved in `dtype` as safetensors with its tokenizer.
    Initialised on `device` (a GPU initialises 7B parameters in seconds, a CPU in minutes)."""
    config_class, model_class, fields = SHAPES[shape][0], SHAPES[shape][1], shape_fields(shape)
    tokenizer = word_tokenizer(fields["vocab_size"])
    config = config_class(
        **fields,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def random_policy_engine(
    shape: str, directory: pathlib.Path, seed: int, dtype: torch.dtype, device: torch.device, rows: int, **engine
) -> tuple[pathlib.Path, PolicyEngine]:
    """(the model's directory, a PolicyEngine on it): a random model of `shape` built in `directory`, loaded
    back as the policy service loads it, for batches of up to `rows` rows; `engine`: PolicyEngine's options."""
    base = build_random_model(shape, directory, seed, dtype, str(device))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base, local_files_only=True)
    model = load_causal_lm(str(base), device, "bench policy", dtype)
    return base, PolicyEngine(model, tokenizer, GrpcConfig(max_batch_size=max(256, rows)), **engine)


def random_prompts(count: int, tokens: int, vocab_size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIAL_TOKENS), vocab_size)}" for _ in range(tokens)) for _ in range(count)]
