"""Rollouts -> the padded tensors the PPO update works on."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.models import build_teacher_forced_batch
from ..common.rollout_queue import Rollout


@dataclass
class PPOBatch:
    input_ids: torch.Tensor       # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T)
    response_mask: torch.Tensor   # (B, T-1) 1 where position t predicts a response token
    old_logprobs: torch.Tensor    # (B, T-1) behaviour logprobs at response positions, 0 elsewhere
    ref_logprobs: torch.Tensor    # (B, T-1) reference logprobs at response positions, 0 elsewhere
    rewards: torch.Tensor         # (B,) raw reward-model scores
    response_lengths: torch.Tensor  # (B,)

    def select(self, rows: torch.Tensor) -> "PPOBatch":
        return PPOBatch(**{name: getattr(self, name)[rows] for name in self.__dataclass_fields__})


def collate(rollouts: list[Rollout], pad_id: int, device: torch.device) -> PPOBatch:
    prompts = [r.prompt_ids.tolist() for r in rollouts]
    responses = [r.response_ids.tolist() for r in rollouts]
    input_ids, attention_mask, response_mask = build_teacher_forced_batch(prompts, responses, pad_id, device)
    old = torch.zeros_like(response_mask)
    ref = torch.zeros_like(response_mask)
    for row, rollout in enumerate(rollouts):
        start = len(rollout.prompt_ids) - 1
        stop = start + len(rollout.response_ids)
        old[row, start:stop] = torch.as_tensor(rollout.logprobs.copy(), dtype=torch.float32)
        ref[row, start:stop] = torch.as_tensor(rollout.ref_logprobs.copy(), dtype=torch.float32)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32, device=device)
    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32, device=device)
    return PPOBatch(input_ids, attention_mask, response_mask, old, ref, rewards, lengths)
