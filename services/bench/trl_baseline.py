"""TRL's PPOTrainer (trl==0.29.1, `trl.experimental.ppo`) on the bench workload: the baseline that
Belay must beat by 1.5x in samples per second (issue #7). `belay bench` runs this module in a
subprocess; the figures go to --json, logs to stderr, nothing to stdout.

How each workload setting maps onto PPOConfig (read off TRL's ppo_trainer.py):
- batch: per_device_train_batch_size = prompts_per_batch with gradient_accumulation_steps 1, so one
  rollout batch is `batch` prompts; num_mini_batches = batch / minibatch_size, so each optimizer
  step sees minibatch_size rows (TRL's micro-batch loop then runs once per minibatch).
- num_ppo_epochs, response_length = max_new_tokens, temperature, learning_rate, seed: as given;
  a constant learning rate, Belay's default (TRL's is a linear decay; the speed is the same).
- advantage: TRL's own GAE (gamma 1.0, lam 0.95, whitened advantages) with a separate value model,
  a sequence classifier loaded from the reward directory (TRL's example recipe): a second full trunk,
  not a value head on the policy's trunk.
- reward: the same sequence-classifier reward model as Belay's bench; KL paid in the reward with
  kl_coef and TRL's default k1 estimator; whiten_rewards off; missing_eos_penalty None.
- stop_token "eos": like Belay, a response ends at its first EOS (TRL pads the rest; generation
  stops once every row has emitted EOS, else runs response_length tokens).
- sampling: TRL fixes top_k 0 and top_p 1.0.

Workarounds needed on this CPU:
- use_cpu=True, bf16=False, fp16=False: TRL's config turns bf16 on by default; we run float32, as
  Belay's CPU services do.
- gradient_checkpointing=False: TRL turns it on by default (memory for ~20% speed); off is TRL at
  its fastest, and Belay does not checkpoint activations either.
- pad token: TRL treats every position equal to pad_token_id as padding (attention mask, sequence
  ends). SmolLM2 pads with its EOS <|im_end|>, which would mask the chat template's turn ends and
  the EOS itself; we pad with <|endoftext|>, a vocabulary token that never appears in the prompts.
- num_sample_generations=0, no eval set, save_strategy "no", report_to "none".

Timing: a TrainerCallback stamps time.perf_counter() at the start of train() and after every PPO
step (on_step_end); a step's seconds are the gap between two stamps (the first gap includes the
first batch's data loading). The first `warmup` steps are run and left out of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import pathlib
import resource
import sys
import tempfile
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
    set_seed,
)

from ..common.models import check_model_dir, weights_fingerprint
from ..common.strict_json import strict_json
from ..policy.engine import apply_chat_template
from .workload import Workload

log = logging.getLogger(__name__)
SPARE_PAD_TOKEN = "<|endoftext|>"  # SmolLM2's document separator: in the vocabulary, never in a chat prompt


class StepClock(TrainerCallback):
    """Seconds of every PPO step, and TRL's own per-step metrics (the dict it logs)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.metrics: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = [time.perf_counter()]

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.metrics.append(dict(logs or {}))

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [after - before for before, after in zip(self.stamps, self.stamps[1:])]


class ResponseTokenCounter:
    """Wraps the policy's generate() to count response tokens of each call (up to and including the
    first EOS, as Belay counts them): TRL's loop keeps its responses to itself."""

    def __init__(self, model: torch.nn.Module, eos_id: int) -> None:
        self.generate, self.eos_id = model.generate, eos_id
        self.per_call: list[int] = []
        model.generate = self  # an instance attribute shadows the method for TRL's call

    def __call__(self, *args, **kwargs):
        output = self.generate(*args, **kwargs)
        prompt_width = kwargs["input_ids"].shape[1]
        responses = output.sequences[:, prompt_width:]  # (B, R)
        is_eos = responses == self.eos_id
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1])  # (B,)
        self.per_call.append(int(first_eos.sum()))
        return output


def padded_tokenizer(model_dir: str):
    """The policy's tokenizer, left-padded (TRL generates from the right edge) with a pad distinct from EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, padding_side="left")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if SPARE_PAD_TOKEN not in tokenizer.get_vocab():
            raise ValueError(
                f"{model_dir}: TRL's PPOTrainer needs a pad token other than EOS "
                f"({tokenizer.eos_token!r}) and the vocabulary has no {SPARE_PAD_TOKEN!r} to use; "
                "give the tokenizer a distinct pad_token"
            )
        tokenizer.pad_token = SPARE_PAD_TOKEN
    return tokenizer


def check_workload(workload: Workload, iterations: int, warmup: int) -> None:
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got iterations={iterations} warmup={warmup}")
    if workload.batch_size % workload.minibatch_size:
        raise ValueError(
            f"batch size {workload.batch_size} is not a multiple of minibatch size "
            f"{workload.minibatch_size}: TRL splits a batch into whole minibatches"
        )
    prompts = workload.prompts()
    if len(prompts) < workload.batch_size:  # TRL's loader drops the last partial batch and would never yield one
        raise ValueError(
            f"{workload.prompts_file} holds {len(prompts)} prompts, fewer than the batch size {workload.batch_size}"
        )
    for what, directory in (("model", workload.model_dir), ("reward model", workload.reward_dir)):
        check_model_dir(directory, f"TRL baseline {what}")


def run_trl_baseline(workload: Workload, iterations: int, warmup: int) -> dict:
    """Run TRL's PPO for warmup + iterations steps; return the figures of the last `iterations`."""
    check_workload(workload, iterations, warmup)
    import trl
    from datasets import Dataset  # TRL and its stack take seconds to import: only when the baseline runs
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    workload = dataclasses.replace(workload, iterations=iterations, warmup=warmup)  # the JSON echoes what ran
    torch.set_num_threads(workload.torch_threads)
    set_seed(workload.seed)
    tokenizer = padded_tokenizer(workload.model_dir)
    load = dict(local_files_only=True, use_safetensors=True, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(workload.model_dir, **load)
    reference = AutoModelForCausalLM.from_pretrained(workload.model_dir, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(workload.reward_dir, num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(workload.reward_dir, num_labels=1, **load)
    prompts = Dataset.from_dict({"input_ids": [apply_chat_template(tokenizer, p) for p in workload.prompts()]})
    steps = warmup + iterations
    settings = dict(
        per_device_train_batch_size=workload.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=workload.batch_size // workload.minibatch_size,
        num_ppo_epochs=workload.ppo_epochs,
        total_episodes=steps * workload.batch_size,
        response_length=workload.max_new_tokens,
        temperature=workload.temperature,
        learning_rate=workload.lr,
        lr_scheduler_type="constant",
        kl_coef=workload.kl_coef,
        kl_estimator="k1",
        stop_token="eos",
        missing_eos_penalty=None,
        whiten_rewards=False,
        seed=workload.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    clock = StepClock()
    counter = ResponseTokenCounter(policy, tokenizer.eos_token_id)
    before = weights_fingerprint(policy)
    with tempfile.TemporaryDirectory(prefix="belay-trl-") as output_dir:
        config = PPOConfig(output_dir=output_dir, **settings)
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=reward,
            value_model=value,
            train_dataset=prompts,
            callbacks=[clock],
        )
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; stdout stays empty
            trainer.train()
    after = weights_fingerprint(policy)
    seconds = clock.step_seconds()
    if len(seconds) != steps or len(counter.per_call) != steps:
        raise RuntimeError(f"TRL ran {len(seconds)} steps and {len(counter.per_call)} generations, expected {steps}")
    measured, tokens = seconds[warmup:], counter.per_call[warmup:]
    seconds_per_step = sum(measured) / len(measured)
    return {
        "samples_per_second": workload.batch_size / seconds_per_step,
        "tokens_per_second": sum(tokens) / sum(measured),
        "seconds_per_step": seconds_per_step,
        "step_seconds": measured,
        "warmup_step_seconds": seconds[:warmup],
        "response_tokens_per_step": tokens,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "policy_fingerprint_before": before,
        "policy_fingerprint_after": after,
        "trl_metrics": [m for m in clock.metrics if "objective/kl" in m][warmup:],
        "iterations": iterations,
        "warmup": warmup,
        "workload": dataclasses.asdict(workload),
        "settings": {
            **settings,
            "pad_token": tokenizer.pad_token,
            "stop_token_id": tokenizer.eos_token_id,
            "top_k": 0,
            "top_p": 1.0,
            "advantage": "gae (TRL: gamma 1.0, lam 0.95, separate value model)",
            "value_model": workload.reward_dir,
            "torch_threads": workload.torch_threads,
            "dtype": "float32",
            "device": "cpu",
        },
        "versions": {"trl": trl.__version__, "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> None:
    defaults = Workload()
    parser = argparse.ArgumentParser(prog="python -m services.bench.trl_baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where the figures are written")
    parser.add_argument("--model-dir", default=defaults.model_dir)
    parser.add_argument("--reward-dir", default=defaults.reward_dir)
    parser.add_argument("--prompts-file", default=defaults.prompts_file)
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--batch", type=int, default=defaults.prompts_per_batch)
    parser.add_argument(
        "--minibatch-size",
        type=int,
        default=None,
        help=f"rows per optimizer step (default: {defaults.minibatch_size}, or the batch if smaller)",
    )
    parser.add_argument("--torch-threads", type=int, default=defaults.torch_threads)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s trl_baseline %(message)s")
    workload = dataclasses.replace(
        defaults,
        model_dir=args.model_dir,
        reward_dir=args.reward_dir,
        prompts_file=args.prompts_file,
        prompts_per_batch=args.batch,
        max_new_tokens=args.max_new_tokens,
        torch_threads=args.torch_threads,
        minibatch_size=args.minibatch_size or min(defaults.minibatch_size, args.batch),
    )
    figures = run_trl_baseline(workload, args.iterations, args.warmup)
    pathlib.Path(args.json).write_text(strict_json(figures, indent=2))
    log.info(
        "TRL PPOTrainer: %.3f samples/s, %.1f response tokens/s, %.2f s/step over %d steps -> %s",
        figures["samples_per_second"],
        figures["tokens_per_second"],
        figures["seconds_per_step"],
        args.iterations,
        args.json,
    )


if __name__ == "__main__":
    main()
