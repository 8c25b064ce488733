"""Dynamic loss scaling for a float16 trainer (Micikevicius et al. 2018, "Mixed Precision Training").

float16 has 5 exponent bits: gradients below 2^-24 ≈ 6e-8 flush to zero in the backward through its
activations, and PPO's per-token gradients (advantage / tokens in the minibatch) can sit there. The
loss is multiplied by S before backward, so every gradient in the backward is S times larger; the float32
master gradients are divided by S again before clipping and the step. The textbook rule for S, with
torch.amp.GradScaler's defaults: start at 2^16; a non-finite gradient norm halves S and skips the step;
after 2000 good steps in a row S doubles. S stays at or above 1 (DeepSpeed's and Megatron-LM's
min_loss_scale): a gradient that overflows unscaled is not the scaler's to cure, it is a real non-finite.

Why not GradScaler itself: it finds an overflow by scanning each rank's own gradients, and under FSDP2
those are DTensor shards, so the ranks would need a reduction of its own to agree. Here the decision
reads the gradient norm update.minibatch_step already computes (clip_grad_norm_, the full norm under
FSDP2): every rank sees the same norm, so every rank halves, grows and skips together by construction.

bfloat16 and float32 need none of this (bfloat16 has float32's exponent range): the scaler is then off,
S = 1, and the loss and gradients are left untouched, bit for bit."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

log = logging.getLogger(__name__)

INITIAL_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000  # good steps in a row before S doubles
MIN_SCALE = 1.0


class LossScale:
    """The loss scale S and the count of good optimizer steps since it last changed; off (S = 1,
    every method a no-op) unless the compute dtype is float16."""

    def __init__(self, enabled: bool, initial: float = INITIAL_SCALE, growth_interval: int = GROWTH_INTERVAL):
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.good_steps = 0
        self.growth_interval = growth_interval
        self.overflows = 0  # halvings since this trainer started (for the log and the dropped batch's detail)

    @classmethod
    def for_dtype(cls, compute_dtype: torch.dtype) -> LossScale:
        return cls(enabled=compute_dtype == torch.float16)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """S · loss, what backward runs on. () -> ()"""
        return loss * self.scale if self.enabled else loss

    def unscale_(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """The gradients divided by S in place (exact: S is a power of two), DTensor shards included."""
        if not self.enabled:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def can_back_off(self) -> bool:
        """Whether a non-finite gradient norm now is the scaler's: the gradients were scaled up (S > 1).
        At S = 1 the overflow happened unscaled, a real non-finite for the NaN rail."""
        return self.enabled and self.scale > MIN_SCALE

    def overflowed(self) -> None:
        """A non-finite gradient norm at S > 1: S halves (not below 1), the good-step count restarts."""
        self.scale = max(self.scale * BACKOFF_FACTOR, MIN_SCALE)
        self.good_steps = 0
        self.overflows += 1
        log.info("float16 gradients overflowed: optimizer step skipped, loss scale now %g", self.scale)

    def stepped(self) -> None:
        """A finite gradient norm and an optimizer step: after growth_interval of them in a row, S doubles."""
        if not self.enabled:
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= GROWTH_FACTOR
            self.good_steps = 0

    def state_dict(self) -> dict:
        """What the checkpoint's trainer_state.json keeps (the same on every rank: rank 0's is enough)."""
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict | None) -> None:
        """Resume S and the good-step count. A checkpoint without them (written before loss scaling, or
        by a trainer that was not float16) leaves a float16 trainer at its initial S; a trainer that is
        not float16 stays off whatever the checkpoint says."""
        if not self.enabled or not state or not state.get("enabled"):
            return
        scale, good_steps = state.get("scale"), state.get("good_steps")
        if not isinstance(scale, int | float) or not scale >= MIN_SCALE or not isinstance(good_steps, int):
            raise ValueError(
                f"trainer_state.json's loss_scale {state!r} is not a scale >= {MIN_SCALE} and an integer "
                "good_steps: the checkpoint is damaged; remove the loss_scale entry to restart the scale"
            )
        self.scale, self.good_steps = float(scale), good_steps
