"""`belay eval`: score checkpoints (and the reference) on held-out prompts and held-out text.

For each model: reward mean and spread on held-out prompts, KL to the reference (k1 per response
and the exact per-token KL from full rows), response length, distinct-n and repetition of the
responses, and perplexity on a held-out text set: "better by the reward, still a normal model".
Held-out prompts in JSONL carry each row's metadata to the reward; rows with an answer under
reward.answer_key also give `accuracy`, the share of sampled responses math_answer scores correct.
Generation is fixed and seeded, and the settings are written with the results.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from ..common.config import BelayConfig, GrpcConfig
from ..common.lora import is_adapter_checkpoint, load_adapter_into, lora_settings, wrap_with_lora
from ..common.models import (
    build_teacher_forced_batch,
    freeze,
    load_causal_lm,
    load_tokenizer,
    next_token_log_probs,
    resolve_device,
    response_logprobs,
)
from ..common.prompt_data import load_prompt_data
from ..common.prompts import read_prompts
from ..common.sample_statistics import distinct_n, mean_and_std, repetition
from ..policy.engine import PolicyEngine, Sampling
from ..reward.backends import RewardBackend, build_backend
from ..reward.verifiable import MathAnswerBackend
from . import metrics, report
from .heldout import read_heldout

DEFAULT_HELDOUT_PROMPTS = str(pathlib.Path(__file__).resolve().parents[2] / "prompts/heldout.txt")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Fixed, seeded generation for evaluation: two evals of one checkpoint agree."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 32
    samples_per_prompt: int = 2
    seed: int = 1234


def load_candidate(config: BelayConfig, checkpoint: pathlib.Path | None, device: torch.device):
    """The reference (checkpoint None), a full-weight checkpoint, or the base model + a LoRA adapter."""
    base_dir = config.reference.model_dir
    if checkpoint is None:
        return freeze(load_causal_lm(base_dir, device, "reference.model_dir"))
    if is_adapter_checkpoint(checkpoint):
        model = wrap_with_lora(load_causal_lm(base_dir, device, "reference.model_dir"), lora_settings(config.lora))
        load_adapter_into(model, checkpoint)
        return freeze(model)
    return freeze(load_causal_lm(str(checkpoint), device, str(checkpoint)))


def exact_kl_tokens(
    model, reference, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float
) -> list[float]:
    """Exact KL(π‖π_ref) at every response token, from both models' full distributions, row by row."""
    device = next(model.parameters()).device
    values: list[float] = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            ids, attention, mask = build_teacher_forced_batch([prompt], [response], pad_id, device)
            policy_rows = next_token_log_probs(model, ids, attention, temperature)[0][mask[0].bool()]
            ref_rows = next_token_log_probs(reference, ids, attention, temperature)[0][mask[0].bool()]
            values.extend(metrics.exact_kl_per_token(policy_rows, ref_rows).tolist())
    return values


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """What every candidate is evaluated on: prompts (with their metadata when the file had some),
    the perplexity texts, and the math_answer backend that gives `accuracy` (None: no answers)."""

    prompts: list[str]
    metadata: list[dict] | None
    texts: list[str]
    accuracy_backend: MathAnswerBackend | None = None


def score_samples(backend: RewardBackend, heldout: HeldOut, prompt_index: list[int], responses: list[str]):
    """backend's score of each sampled response, with its prompt's metadata when there is some."""
    prompts = [heldout.prompts[i] for i in prompt_index]
    metadata = None if heldout.metadata is None else [heldout.metadata[i] for i in prompt_index]
    return backend.score(prompts, responses, metadata)


def evaluate_model(
    model, reference, tokenizer, backend: RewardBackend, heldout: HeldOut, settings: EvalSettings
) -> dict:
    engine = PolicyEngine(model, tokenizer, GrpcConfig())
    prompts = heldout.prompts
    batch = engine.generate(
        prompts,
        settings.samples_per_prompt,
        Sampling(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_new_tokens,
            seed=settings.seed,
        ),
    )
    rewards = score_samples(backend, heldout, batch.prompt_index, batch.texts)
    ref = response_logprobs(
        reference, batch.prompt_ids, batch.response_ids, tokenizer.pad_token_id, settings.temperature
    )
    kl_k1 = [sum(lp) - float(r.sum()) for lp, r in zip(batch.logprobs, ref)]
    kl_tokens = exact_kl_tokens(
        model, reference, batch.prompt_ids, batch.response_ids, tokenizer.pad_token_id, settings.temperature
    )
    nll, count = metrics.text_nll(model, tokenizer, heldout.texts)
    reward_mean, reward_std = mean_and_std(rewards)
    accuracy = {}
    if heldout.accuracy_backend is backend:  # the reward is math_answer: its mean is the accuracy
        accuracy = {"accuracy": reward_mean}
    elif heldout.accuracy_backend is not None:
        correct = score_samples(heldout.accuracy_backend, heldout, batch.prompt_index, batch.texts)
        accuracy = {"accuracy": mean_and_std(correct)[0]}
    return {
        **accuracy,
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "kl_per_sequence": mean_and_std(kl_k1)[0],
        "kl_exact_per_token": mean_and_std(kl_tokens)[0],
        "response_length": mean_and_std([float(len(r)) for r in batch.response_ids])[0],
        "eos_fraction": sum(r == "eos" for r in batch.finish_reasons) / len(batch.finish_reasons),
        "distinct_1": distinct_n(batch.texts, 1),
        "distinct_2": distinct_n(batch.texts, 2),
        "repetition_3": mean_and_std([repetition(t, 3) for t in batch.texts])[0],
        "perplexity": metrics.perplexity(nll, count),
        "samples": [
            {"prompt": prompts[i], "response": t, "reward": r}
            for i, t, r in zip(batch.prompt_index, batch.texts, rewards)
        ][:4],
    }


def evaluate(
    config: BelayConfig,
    checkpoints: list[pathlib.Path | None],
    backend: RewardBackend,
    prompts_file: str | None,
    text_file: str,
    settings: EvalSettings,
) -> dict:
    """Evaluate each candidate (None = the reference); results keyed by a name a person can read."""
    device = resolve_device(config.reference.device)
    tokenizer = load_tokenizer(config.reference.model_dir, "reference.model_dir")
    reference = freeze(load_causal_lm(config.reference.model_dir, device, "reference.model_dir"))
    heldout = load_heldout(config, backend, prompts_file, text_file)
    results = {}
    for checkpoint in checkpoints:
        name = "reference" if checkpoint is None else checkpoint.name
        model = reference if checkpoint is None else load_candidate(config, checkpoint, device)
        results[name] = evaluate_model(model, reference, tokenizer, backend, heldout, settings)
    return {
        "settings": dataclasses.asdict(settings),
        "prompts_file": prompts_file or config.data.heldout_path or config.data.path or DEFAULT_HELDOUT_PROMPTS,
        "text_file": text_file,
        "models": results,
    }


def config_heldout(config: BelayConfig) -> tuple[list[str], list[dict] | None]:
    """The config's own held-out rows (data.heldout_path, or data.heldout_rows of data.path): their
    texts (a messages row's last user turn) and metadata; else prompts/heldout.txt's lines."""
    rows = load_prompt_data(config).heldout if config.data.path else []
    if not rows:
        return read_heldout(DEFAULT_HELDOUT_PROMPTS)
    return [row.text for row in rows], [row.metadata for row in rows]


def load_heldout(config: BelayConfig, backend: RewardBackend, prompts_file: str, text_file: str) -> HeldOut:
    """The held-out set; accuracy is measured when every row has an answer under reward.answer_key,
    by the configured backend if it is math_answer, else by one built from the reward section."""
    prompts, metadata = read_heldout(prompts_file) if prompts_file else config_heldout(config)
    texts = read_prompts(text_file, "held-out text file")
    key = config.reward.answer_key
    if metadata is None or not all(key in row for row in metadata):
        return HeldOut(prompts, metadata, texts)
    if not isinstance(backend, MathAnswerBackend):
        reward = config.reward
        backend = MathAnswerBackend(key, reward.check_timeout_seconds, reward.check_workers)
    return HeldOut(prompts, metadata, texts, backend)


def evaluate_and_write(
    config: BelayConfig,
    checkpoints: list[pathlib.Path | None],
    prompts_file: str | None,
    text_file: str,
    settings: EvalSettings,
    out_dir: pathlib.Path,
    say=print,
) -> tuple[dict, list[pathlib.Path]]:
    """What `belay eval` and the end of `belay up` both do: evaluate the candidates with the configured
    reward backend, say the table, write results.json and the plots into out_dir. Returns
    (results, the files written)."""
    backend = build_backend(config.reward, resolve_device(config.reward.device))
    results = evaluate(config, checkpoints, backend, prompts_file, text_file, settings)
    say(report.table(results))
    return results, report.write(results, out_dir)
