"""The float16 loss scale (services/trainer/loss_scale.py) against its rule, written out here: an
overflow at S > 1 halves S (not below 1) and restarts the good-step count; N good steps in a row
double S; off (S = 1, nothing touched) for any other dtype; its state survives JSON."""

from __future__ import annotations

import json

import pytest
import torch

from services.trainer.loss_scale import LossScale


def expected_scale(events: str, initial: float, interval: int) -> tuple[float, int]:
    """The textbook rule, event by event: 'o' an overflow, 'g' a good step. Returns (S, good steps)."""
    scale, good = initial, 0
    for event in events:
        if event == "o":
            scale, good = max(scale / 2, 1.0), 0
        else:
            good += 1
            if good == interval:
                scale, good = scale * 2, 0
    return scale, good


def test_defaults_are_grad_scalers():
    scale = LossScale(enabled=True)
    assert scale.scale == 65536.0 and scale.growth_interval == 2000 and scale.good_steps == 0


@pytest.mark.parametrize("events", ["o", "oooo", "ggg", "gggggggg", "gogggg", "ggoggoggg", "o" * 20 + "gggggg"])
def test_the_scale_follows_the_rule(events):
    """At S = 1 an overflow is the NaN rail's (update.minibatch_step asks can_back_off first): S stays."""
    scale, halvings = LossScale(enabled=True, initial=2.0**10, growth_interval=3), 0
    for event in events:
        if event == "g":
            scale.stepped()
        elif scale.can_back_off():
            scale.overflowed()
            halvings += 1
    assert (scale.scale, scale.good_steps) == expected_scale(events, 2.0**10, 3)
    assert scale.overflows == halvings == min(events.count("o"), 10) and scale.scale >= 1


def test_an_overflow_at_scale_one_is_not_the_scalers():
    scale = LossScale(enabled=True, initial=2.0)
    assert scale.can_back_off()
    scale.overflowed()
    assert scale.scale == 1.0 and scale.overflows == 1
    assert not scale.can_back_off()  # the gradients overflowed unscaled: the NaN rail's


def test_backward_on_the_scaled_loss_and_unscaling_keep_a_gradient_float16_flushes_to_zero():
    """d loss / d w = 1e-4 · 1e-4 = 1e-8, below float16's smallest subnormal (2^-24 ≈ 6e-8): the
    float16 backward flushes it to 0. Scaled by 2^16 it is 6.6e-4, kept; / 2^16 again in float32."""

    def gradient(loss_scale: LossScale) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(4))
        loss = ((weight.half() * 1e-4).float() * 1e-4).sum()  # the backward of .half() runs in float16
        loss_scale.scaled(loss).backward()
        loss_scale.unscale_([weight])
        return weight.grad

    assert torch.equal(gradient(LossScale(enabled=False)), torch.zeros(4))
    kept = gradient(LossScale(enabled=True))
    torch.testing.assert_close(kept, torch.full((4,), 1e-8), rtol=1e-3, atol=0)  # float16's 11-bit mantissa


def test_unscaling_divides_the_gradients_exactly_and_skips_parameters_without_one():
    scale = LossScale(enabled=True, initial=2.0**16)
    grads = [torch.randn(3, 5), torch.randn(7)]
    parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads] + [torch.nn.Parameter(torch.zeros(2))]
    for parameter, grad in zip(parameters, grads):
        parameter.grad = grad * 2.0**16
    scale.unscale_(parameters)
    for parameter, grad in zip(parameters, grads):
        assert torch.equal(parameter.grad, grad)  # a power of two: exact
    assert parameters[2].grad is None


def test_off_touches_nothing():
    scale = LossScale.for_dtype(torch.bfloat16)
    assert not scale.enabled and scale.scale == 1.0 and not scale.can_back_off()
    loss = torch.tensor(0.3, requires_grad=True)
    assert scale.scaled(loss) is loss
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.tensor([0.1, 0.2, 0.3])
    before = parameter.grad.clone()
    scale.unscale_([parameter])
    for _ in range(5):
        scale.stepped()
    assert torch.equal(parameter.grad, before) and scale.scale == 1.0 and scale.good_steps == 0
    assert LossScale.for_dtype(torch.float32).enabled is False and LossScale.for_dtype(torch.float16).enabled


def test_the_state_round_trips_through_json():
    scale = LossScale(enabled=True, initial=2.0**16, growth_interval=5)
    for event in "ooggg":
        scale.overflowed() if event == "o" else scale.stepped()
    state = json.loads(json.dumps(scale.state_dict()))
    resumed = LossScale(enabled=True, growth_interval=5)
    resumed.load_state_dict(state)
    assert (resumed.scale, resumed.good_steps) == (2.0**14, 3)
    resumed.stepped(), resumed.stepped()
    assert resumed.scale == 2.0**15  # the count went on where it stopped


def test_a_checkpoint_without_a_float16_scale_leaves_the_initial_one():
    scale = LossScale(enabled=True)
    scale.load_state_dict(None)  # written before loss scaling
    scale.load_state_dict(LossScale(enabled=False).state_dict())  # written by a bfloat16 trainer
    assert scale.scale == 65536.0
    off = LossScale(enabled=False)
    off.load_state_dict({"enabled": True, "scale": 8.0, "good_steps": 1})  # float16 checkpoint, bfloat16 trainer
    assert off.scale == 1.0 and not off.enabled


@pytest.mark.parametrize("state", [{"enabled": True, "scale": 0.5, "good_steps": 0}, {"enabled": True, "scale": 8.0}])
def test_a_damaged_state_is_refused_with_its_field(state):
    with pytest.raises(ValueError, match="trainer_state.json's loss_scale"):
        LossScale(enabled=True).load_state_dict(state)
