"""KL estimators and KL-coefficient controllers. Pure functions over tensors: no I/O, no config.

Shapes: B rollouts, T token positions, K candidate token ids per position.
logprobs are log pi(a_t) of the sampled tokens under the policy being trained, ref_logprobs
log pi_ref(a_t) under the frozen reference. Every per-token result is zero outside the response
mask, and what sits at masked positions (prompt, padding, even inf or huge values) never changes
any result: masked inputs are replaced before any arithmetic, so they cannot leak through as
nan (0 * inf) into values or gradients.

Estimators of KL(pi || pi_ref) from one token a ~ pi, with log r = log pi_ref(a) - log pi(a)
(Schulman, "Approximating KL Divergence", 2020):

    k1 = -log r                unbiased, high variance, single tokens may be negative
    k2 = 1/2 (log r)^2         biased (its mean is an f-divergence close to KL when pi ~ pi_ref), >= 0
    k3 = (r - 1) - log r       unbiased, >= 0, lower variance than k1

"full" is the exact KL over a row of log-probabilities (exact_kl_from_rows), not a sampled estimator.
"""

from __future__ import annotations

import torch

from .masking import where_mask

KL_ESTIMATORS = ("k1", "k2", "k3", "full")
_SAMPLED_ESTIMATORS = ("k1", "k2", "k3")


def _check_same_shape(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> None:
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must all have the same (B, T) shape"
        )


def _masked_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref on response tokens, exactly 0 elsewhere (whatever the masked inputs hold)."""
    _check_same_shape(logprobs, ref_logprobs, response_mask)
    return where_mask(logprobs, response_mask) - where_mask(ref_logprobs, response_mask)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """k1 = (log pi(a_t) - log pi_ref(a_t)) * mask.

    logprobs, ref_logprobs, response_mask: (B, T) -> (B, T), zero outside the response.
    Unbiased for KL(pi || pi_ref) when a_t ~ pi; single tokens may be negative.
    """
    return where_mask(_masked_log_ratio(logprobs, ref_logprobs, response_mask), response_mask)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """k2 = 1/2 (log pi(a_t) - log pi_ref(a_t))^2 * mask.

    logprobs, ref_logprobs, response_mask: (B, T) -> (B, T), zero outside the response.
    Never negative; biased (exact only to second order as pi -> pi_ref).
    """
    log_ratio = _masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return where_mask(0.5 * log_ratio * log_ratio, response_mask)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """k3 = ((r - 1) - log r) * mask, with log r = log pi_ref(a_t) - log pi(a_t).

    logprobs, ref_logprobs, response_mask: (B, T) -> (B, T), zero outside the response.
    Computed as expm1(log r) - log r, which keeps its accuracy near r = 1 also in float32 (where
    exp(log r) - 1 would be all rounding error); since e^x - 1 >= x it is never negative, and a final
    clamp at 0 guards against a last-ulp rounding of expm1.
    Unbiased for KL(pi || pi_ref) when a_t ~ pi.
    """
    log_r = -_masked_log_ratio(logprobs, ref_logprobs, response_mask)
    return where_mask((torch.expm1(log_r) - log_r).clamp_min(0.0), response_mask)


def per_token_kl(
    estimator: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """The named sampled estimator ("k1" | "k2" | "k3") per response token. (B, T) -> (B, T)

    "full" needs the whole rows of log-probabilities, not the sampled tokens': use exact_kl_from_rows.
    """
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs, response_mask)
    if estimator == "k2":
        return kl_k2(logprobs, ref_logprobs, response_mask)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs, response_mask)
    if estimator == "full":
        raise ValueError(
            "KL estimator 'full' needs the rows of log-probabilities: call exact_kl_from_rows; "
            f"per_token_kl knows {', '.join(_SAMPLED_ESTIMATORS)}"
        )
    raise ValueError(
        f"unknown KL estimator {estimator!r}: per_token_kl knows {', '.join(_SAMPLED_ESTIMATORS)} "
        f"(and 'full' through exact_kl_from_rows)"
    )


def exact_kl_from_rows(
    policy_rows: torch.Tensor, ref_rows: torch.Tensor, response_mask: torch.Tensor, renormalise: bool
) -> torch.Tensor:
    """KL(pi || pi_ref) at each position, summed over K token ids rather than sampled:

        kl[b, t] = sum_k pi_k (log pi_k - log pi_ref_k) * mask[b, t],   pi_k = exp(policy_rows[b, t, k])

    policy_rows, ref_rows: (B, T, K) log-probabilities over the same K token ids at each position;
    response_mask: (B, T) -> (B, T), zero outside the response. Terms with pi_k = 0 count 0.

    With renormalise=True both rows are first re-normalised over the K ids (log_softmax over the
    last dim): the result is then the exact KL between the two distributions truncated to those K
    ids. With K the whole vocabulary the rows already sum to 1 and renormalise changes nothing.

    Cost of top-k truncation (K = the reference's top-k ids): the probability mass outside the
    top-k is ignored, so the value is a biased estimate of the full KL, exact only when K is the
    whole vocabulary. The bias is small when the top-k ids hold most of pi's mass (a peaked
    policy) and can be large when pi is flat and its mass is spread beyond the top-k.
    """
    if policy_rows.shape != ref_rows.shape:
        raise ValueError(
            f"policy_rows {tuple(policy_rows.shape)} and ref_rows {tuple(ref_rows.shape)} "
            f"must have the same (B, T, K) shape"
        )
    if policy_rows.dim() != 3 or policy_rows.shape[:2] != response_mask.shape:
        raise ValueError(
            f"rows {tuple(policy_rows.shape)} must be (B, T, K) over response_mask {tuple(response_mask.shape)} (B, T)"
        )
    keep = response_mask.unsqueeze(-1)  # (B, T, 1)
    policy = where_mask(policy_rows, keep)  # masked rows become identical -> KL term 0, never nan
    ref = where_mask(ref_rows, keep)
    zero = torch.zeros((), dtype=policy_rows.dtype, device=policy_rows.device)
    if renormalise:
        policy = torch.log_softmax(policy, dim=-1)
        ref = torch.log_softmax(ref, dim=-1)
    probs = policy.exp()
    terms = torch.where(probs > 0, probs * (policy - ref), zero)  # 0 * log 0 counts 0
    return where_mask(terms.sum(-1), response_mask)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns beta."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences":

        proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
        mult               = 1 + proportional_error * n_steps / horizon
        beta              <- beta * mult

    beta rises while the measured KL is above target and falls while it is below; each update
    moves it by at most a factor 1 +- 0.2 * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        _check_target_horizon(target, horizon)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update after n_steps more samples (or steps) with measured KL current_kl; returns beta."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        _check_target_horizon(d["target"], d["horizon"])
        self.value = float(d["value"])
        self.target = float(d["target"])
        self.horizon = float(d["horizon"])


def _check_target_horizon(target: float, horizon: float) -> None:
    if not target > 0:
        raise ValueError(f"AdaptiveKLController target must be > 0 (the KL to steer towards), got {target}")
    if not horizon > 0:
        raise ValueError(f"AdaptiveKLController horizon must be > 0 (steps over which beta adapts), got {horizon}")
