"""Rollouts -> the padded tensors the PPO update works on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.models import build_teacher_forced_batch
from ..common.rollout_queue import Rollout


@dataclass
class PPOBatch:
    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T-1) 1 where position t predicts a response token
    old_logprobs: torch.Tensor  # (B, T-1) behaviour logprobs at response positions, 0 elsewhere
    ref_logprobs: torch.Tensor  # (B, T-1) reference logprobs at response positions, 0 elsewhere
    rewards: torch.Tensor  # (B,) raw reward-model scores
    response_lengths: torch.Tensor  # (B,)
    truncated: torch.Tensor  # (B,) bool: cut at max_new_tokens without EOS
    group_index: torch.Tensor  # (B,) long: which prompt group each rollout belongs to
    ref_top_ids: torch.Tensor  # (B, T-1, K) reference's top-k token ids (K = 0 without the exact KL)
    ref_top_logprobs: torch.Tensor  # (B, T-1, K)

    def select(self, rows: torch.Tensor) -> PPOBatch:
        return PPOBatch(**{name: getattr(self, name)[rows] for name in self.__dataclass_fields__})


def collate(rollouts: list[Rollout], pad_id: int, device: torch.device) -> PPOBatch:
    prompts = [r.prompt_ids.tolist() for r in rollouts]
    responses = [r.response_ids.tolist() for r in rollouts]
    input_ids, attention_mask, response_mask = build_teacher_forced_batch(prompts, responses, pad_id, device)
    top_k = {r.top_k for r in rollouts}
    if len(top_k) > 1:
        raise ValueError(f"rollouts in one batch carry different top-k rows: {sorted(top_k)}")
    k = top_k.pop()
    old = torch.zeros_like(response_mask)
    ref = torch.zeros_like(response_mask)
    top_ids = torch.zeros((*response_mask.shape, k), dtype=torch.long, device=device)
    top_logprobs = torch.zeros((*response_mask.shape, k), dtype=torch.float32, device=device)
    groups: dict[str, int] = {}
    for row, rollout in enumerate(rollouts):
        start = len(rollout.prompt_ids) - 1
        stop = start + len(rollout.response_ids)
        old[row, start:stop] = torch.as_tensor(rollout.logprobs.copy(), dtype=torch.float32)
        ref[row, start:stop] = torch.as_tensor(rollout.ref_logprobs.copy(), dtype=torch.float32)
        if k:
            top_ids[row, start:stop] = torch.as_tensor(rollout.ref_top_ids.reshape(-1, k).astype("int64"))
            top_logprobs[row, start:stop] = torch.as_tensor(rollout.ref_top_logprobs.reshape(-1, k).copy())
        groups.setdefault(rollout.group_id, len(groups))
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    return PPOBatch(
        input_ids,
        attention_mask,
        response_mask,
        old,
        ref,
        rewards=as_tensor([r.reward for r in rollouts], torch.float32),
        response_lengths=as_tensor([len(r.response_ids) for r in rollouts], torch.float32),
        truncated=as_tensor([r.finish_reason == "length" for r in rollouts], torch.bool),
        group_index=as_tensor([groups[r.group_id] for r in rollouts], torch.long),
        ref_top_ids=top_ids,
        ref_top_logprobs=top_logprobs,
    )
