"""Tiny real Hugging Face models built inside the tests: a byte-level BPE tokenizer with a chat
template, a 2-layer Llama causal LM, and a sequence-classification reward model."""

from __future__ import annotations

import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

CORPUS = [
    "I love this, it is good and happy and great.",
    "This is terrible, bad and sad.",
    "What a wonderful day, thank you so much!",
    "I hate waiting, it is awful.",
    "The weather is nice and the food is excellent.",
    "Tell me about your weekend.",
    "Describe a walk in the park.",
    "How are you feeling today?",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 320, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS + list(extra_words), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )


def llama_config(tokenizer, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_causal_lm(directory: pathlib.Path, seed: int = 0, tokenizer=None, eager_eos: bool = False) -> pathlib.Path:
    """A random tiny Llama saved as safetensors with its tokenizer.

    eager_eos: untie the head and make EOS the likeliest next token everywhere (embeddings carry
    a large constant in dimension 0 that survives the residual stream; only EOS's head row reads it).
    """
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, tie_word_embeddings=not eager_eos))
    if eager_eos:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 10.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[tokenizer.eos_token_id, 0] = 5.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def build_reward_model(directory: pathlib.Path, seed: int = 1) -> pathlib.Path:
    """A random tiny sequence-classification model with one logit: varied scores for varied text."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1))
    with torch.no_grad():  # spread the scores so advantages are not all near zero
        model.score.weight.mul_(50.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
