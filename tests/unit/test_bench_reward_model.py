"""The bench's reward model: the causal LM's trunk with a one-output score head, saved once."""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from services.bench.reward_model import ensure_reward_model


def test_the_reward_model_is_the_policys_trunk_with_a_score_head(tiny_lm_dir, tmp_path):
    out = ensure_reward_model(tiny_lm_dir, tmp_path / "reward", seed=3)
    reward = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, local_files_only=True)
    assert reward.config.num_labels == 1 and reward.score.weight.shape == (1, policy.config.hidden_size)
    for name, tensor in policy.model.state_dict().items():  # the same trunk
        torch.testing.assert_close(reward.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert reward.config.pad_token_id is not None  # scoring a padded batch needs it
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_reward_model(tiny_lm_dir, out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not (tmp_path / "reward.tmp").exists()
