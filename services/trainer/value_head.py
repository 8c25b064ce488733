"""The critic for GAE: a scalar value per token position, read off the policy's hidden states.

No I/O here: state_dict() holds two plain float32 tensors ("linear.weight" (1, H),
"linear.bias" (1,)), which safetensors.torch.save_file / load_file store and restore as is.
"""

from __future__ import annotations

from typing import Any

import torch


class ValueHead(torch.nn.Module):
    """V_t = w . h_t + b: hidden states (B, T, H) -> values (B, T), always float32.

    Zero-initialised (w = 0, b = 0) so every initial value is 0: the critic starts neutral, and
    its first GAE advantages are plain discounted reward-to-go rather than noise from a random
    projection of large hidden states. Learning still starts at once: dV/dw = h_t is non-zero.
    (While w = 0 no gradient flows from the value loss back into the hidden states.)
    The head computes in float32 whatever the dtype of the hidden states (e.g. bf16).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.hidden_size = hidden_size
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_model_config(cls, config: Any) -> ValueHead:
        """A head sized for a model: config.hidden_size (a Hugging Face config or any object with it)."""
        return cls(int(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T) float32 (any leading dims: (..., H) -> (...))."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states end in {hidden_states.shape[-1]}, head expects {self.hidden_size}")
        weight = self.linear.weight.float()
        bias = self.linear.bias.float()
        return torch.nn.functional.linear(hidden_states.float(), weight, bias).squeeze(-1)
