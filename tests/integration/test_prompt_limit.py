"""policy.max_prompt_tokens (issue #14): the bound the memory plan sizes the KV cache by is enforced."""

from __future__ import annotations

import pytest
import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.common.rpc import RequestError
from services.policy.engine import PolicyEngine, Sampling, apply_chat_template

from .conftest import make_config


def test_a_prompt_over_max_prompt_tokens_is_refused_naming_the_setting(tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy")
    short, long = "Hi", "Tell me about your weekend, the walk in the park and the weather there."
    limit = len(apply_chat_template(tokenizer, short))
    assert len(apply_chat_template(tokenizer, long)) > limit
    engine = PolicyEngine(model, tokenizer, make_config().grpc, max_prompt_tokens=limit)
    sampling = Sampling(temperature=1.0, max_new_tokens=4, seed=0)
    assert len(engine.generate([short], 1, sampling).response_ids) == 1
    with pytest.raises(RequestError, match=f"over policy.max_prompt_tokens={limit}"):
        engine.generate([short, long], 1, sampling)
    assert make_config().policy.max_prompt_tokens == 1024
