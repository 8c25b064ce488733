"""The seed's four quiet failure modes, each turned into one number per update that a Prometheus
rule compares with a bound from the config (deploy/prometheus/rules/belay.yml; docs/runbooks.md):

- reward_hacking: reward climbs while the model talks nonsense. KL per response past
  `detector_kl_bound` while the reward's least-squares slope over the window is positive.
- shorter_responses: responses get shorter and shorter. The window's mean response length over the
  first window's falls below `detector_length_ratio`.
- template_collapse: responses collapse onto template sentences. Responses to *different* prompts
  look alike: their mean word 1-2-gram Jaccard similarity, over the window, passes
  `detector_similarity_bound`.
- not_moving: the model barely moves. The window's largest KL per response stays below
  `detector_still_kl` and the reward's fitted rise across the window is under `detector_flat_reward`
  batch standard deviations.

Every value is NaN until the first window is full (NaN compares false, in Python as in PromQL, so
nothing fires on it). The functions are pure; `Detectors` only keeps the window and the baseline.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from ..common.sample_statistics import ngrams
from ..common.step_records import DetectorValues, UpdateStats

DETECTORS = ("reward_hacking", "shorter_responses", "template_collapse", "not_moving")

# One line per detector, from the seed's list of failure modes and their usual causes; the alert
# rules carry the same lines as annotations.runbook (tests/unit/test_detectors.py checks it).
RUNBOOK = {
    "reward_hacking": "Reward climbs fast while the model starts talking nonsense (seed: KL coefficient too small, "
    "reward too narrow): raise trainer.kl_coef, read the samples, widen the reward",
    "shorter_responses": "Responses get shorter and shorter (seed: the reward penalises length without anyone "
    "meaning it to): check belay_trainer_reward_length_correlation and the reward's length bias",
    "template_collapse": "The model repeats template sentences (seed: the reward model favours a pattern): read the "
    "samples, find the phrase the reward overpays, raise trainer.kl_coef",
    "not_moving": "The model barely moves (seed: KL coefficient too large, or learning rate pressed too low): "
    "lower trainer.kl_coef or raise trainer.lr",
}
# Config fields (TrainerConfig) holding the bounds; each is also exported as a gauge so the rules follow the config.
BOUND_FIELDS = (
    "detector_kl_bound",
    "detector_length_ratio",
    "detector_similarity_bound",
    "detector_still_kl",
    "detector_flat_reward",
)
NAN = float("nan")


def least_squares_slope(values: list[float]) -> float:
    """Slope of the least-squares line through (i, values[i]), i = 0..n−1, per step:
    Σ(i − ī)(y_i − ȳ) / Σ(i − ī)². NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return NAN
    mean_i, mean_y = (n - 1) / 2, sum(values) / n
    return sum((i - mean_i) * (y - mean_y) for i, y in enumerate(values)) / sum((i - mean_i) ** 2 for i in range(n))


def word_grams(text: str) -> set[tuple[str, ...]]:
    """The set of a text's whitespace-word unigrams and bigrams: unigrams so a one-word template
    counts, bigrams so word order does."""
    words = text.split()
    return set(ngrams(words, 1)) | set(ngrams(words, 2))


def cross_prompt_similarity(prompts: list[str], responses: list[str]) -> float:
    """Mean Jaccard similarity |A ∩ B| / |A ∪ B| of word_grams over every pair of responses to
    different prompts. Pairs of responses to one prompt are left out: samples of one prompt may
    rightly agree, answers to different questions should not. Pairs where both are empty are left
    out too (nothing to compare); NaN when no pair remains."""
    grams = [word_grams(text) for text in responses]
    similarities = [
        len(grams[i] & grams[j]) / len(grams[i] | grams[j])
        for i in range(len(responses))
        for j in range(i + 1, len(responses))
        if prompts[i] != prompts[j] and (grams[i] or grams[j])
    ]
    return sum(similarities) / len(similarities) if similarities else NAN


@dataclass(frozen=True)
class WindowedUpdate:
    """What the detectors keep of one update: four of its figures and its batch's similarity."""

    reward_mean: float
    reward_std: float
    kl_per_sequence: float
    response_length_mean: float
    similarity: float  # cross_prompt_similarity of the batch's responses (NaN: no pair to compare)


def detector_values(window: list[WindowedUpdate], baseline_length: float | None, size: int) -> DetectorValues:
    """The exported numbers from a window of updates (oldest first), all NaN until it holds `size`:
    - reward_slope: least-squares slope of reward_mean, reward units per update;
    - reward_rise_ratio: the fitted rise across the window, slope·(n − 1), over the mean batch
      reward_std: how far the reward trended, in the spread of one batch (±inf for a trend with no spread);
    - response_length_ratio: mean response length over the window / baseline_length (the first
      window's mean); NaN when the baseline is 0;
    - cross_prompt_similarity: mean of the finite batch similarities;
    - kl_per_sequence_window_max: largest batch KL per response in the window, nats."""
    if len(window) < size:
        return DetectorValues()  # every field NaN
    slope = least_squares_slope([update.reward_mean for update in window])
    rise = slope * (len(window) - 1)
    spread = sum(update.reward_std for update in window) / len(window)
    rise_ratio = rise / spread if spread > 0 else (0.0 if rise == 0 else math.copysign(math.inf, rise))
    length = sum(update.response_length_mean for update in window) / len(window)
    similarities = [update.similarity for update in window if math.isfinite(update.similarity)]
    return DetectorValues(
        reward_slope=slope,
        reward_rise_ratio=rise_ratio,
        response_length_ratio=length / baseline_length if baseline_length else NAN,
        cross_prompt_similarity=sum(similarities) / len(similarities) if similarities else NAN,
        kl_per_sequence_window_max=max(update.kl_per_sequence for update in window),
    )


def detectors_firing(values: DetectorValues, kl_per_sequence: float, bounds: dict[str, float]) -> dict[str, bool]:
    """Each detector's verdict: the same comparisons as the Prometheus rules (NaN never fires)."""
    return {
        "reward_hacking": kl_per_sequence > bounds["detector_kl_bound"] and values.reward_slope > 0,
        "shorter_responses": values.response_length_ratio < bounds["detector_length_ratio"],
        "template_collapse": values.cross_prompt_similarity > bounds["detector_similarity_bound"],
        "not_moving": (
            values.kl_per_sequence_window_max < bounds["detector_still_kl"]
            and abs(values.reward_rise_ratio) < bounds["detector_flat_reward"]
        ),
    }


class Detectors:
    """Keeps the last `window` updates and the first window's mean response length (the baseline
    of shorter_responses; a restarted trainer takes a new one)."""

    def __init__(self, window: int, bounds: dict[str, float]):
        self.size, self.bounds = window, dict(bounds)
        self.window: collections.deque[WindowedUpdate] = collections.deque(maxlen=window)
        self.baseline_length: float | None = None
        self.firing = dict.fromkeys(DETECTORS, False)

    @classmethod
    def from_config(cls, section) -> Detectors:
        return cls(section.detector_window, {field: getattr(section, field) for field in BOUND_FIELDS})

    def observe(
        self, stats: UpdateStats, prompts: list[str], responses: list[str]
    ) -> tuple[DetectorValues, dict[str, bool], list[str]]:
        """Add one update (its figures and its batch's prompt and response texts). Returns the
        values, every detector's verdict, and the detectors that start firing with this update."""
        self.window.append(
            WindowedUpdate(
                reward_mean=stats.reward_mean,
                reward_std=stats.reward_std,
                kl_per_sequence=stats.kl_per_sequence,
                response_length_mean=stats.response_length_mean,
                similarity=cross_prompt_similarity(prompts, responses),
            )
        )
        if self.baseline_length is None and len(self.window) == self.size:
            self.baseline_length = sum(update.response_length_mean for update in self.window) / self.size
        values = detector_values(list(self.window), self.baseline_length, self.size)
        firing = detectors_firing(values, stats.kl_per_sequence, self.bounds)
        started = [name for name in DETECTORS if firing[name] and not self.firing[name]]
        self.firing = firing
        return values, firing, started
