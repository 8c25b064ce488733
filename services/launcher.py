"""`belay up`: the whole stack as local processes (a local redis-server included), the same
commands the containers run. Starts, waits for health, follows training, stops in order (the
processes themselves: local_stack.py)."""

from __future__ import annotations

import pathlib
import shlex
import signal
import time

import grpc

from belay.v1 import belay_pb2, belay_pb2_grpc

from .common.checkpoints import latest_checkpoint
from .common.config import BelayConfig
from .common.memory_check import memory_check
from .common.prompts import read_prompts
from .common.review_store import ReviewStore
from .common.rollout_queue import RolloutQueue
from .common.rpc import channel
from .common.step_records import RollbackRecord, StepRecord, TrainerRecord
from .common.strict_json import strict_json
from .evaluation.run_report import number, write_run_report
from .local_stack import SERVICES, LocalStack, StackError
from .trainer.best_version import read_best

REPO = pathlib.Path(__file__).resolve().parent.parent
HELDOUT_TEXT = str(REPO / "data/heldout_text.txt")


def sample_outputs(config: BelayConfig, prompts: list[str], max_new_tokens: int) -> tuple[int, list[str]]:
    """Greedy answers of the policy service to fixed prompts: (version, texts)."""
    stub = belay_pb2_grpc.PolicyStub(channel(config.policy.address, config.grpc))
    reply = stub.Generate(
        belay_pb2.GenerateRequest(
            prompts=prompts, sampling=belay_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        ),
        timeout=600,
    )
    return reply.policy_version, list(reply.response_texts)


def wait_for_policy_version(config: BelayConfig, version: int, timeout: float) -> int:
    stub = belay_pb2_grpc.PolicyStub(channel(config.policy.address, config.grpc))
    deadline = time.monotonic() + timeout
    current = -1
    while time.monotonic() < deadline:
        try:
            current = stub.Info(belay_pb2.InfoRequest(), timeout=5).policy_version
        except grpc.RpcError:
            pass
        if current >= version:
            break
        time.sleep(0.5)
    return current


def final_canaries(config: BelayConfig, version: int | None, timeout: float = 120) -> dict[int, dict]:
    """Every version's canary answers, once the policy has answered them for `version` (it does so
    right after its swap, so they may trail the last step by a few seconds)."""
    store = ReviewStore.from_url(config.redis.url, config.run.name)
    deadline = time.monotonic() + timeout
    while (
        config.policy.canary_prompts_file
        and version is not None
        and not store.has_canaries(version)
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    return store.canaries()


def degenerate_canaries(store: ReviewStore, seen: set[int]) -> list[str]:
    """The canary verdicts (the policy's, in Redis) that arrived since the last call, as
    'v<version>: canaries <indexes>' for each version with degenerate answers; `seen` is updated."""
    news = []
    for version, degenerate in store.canary_verdicts().items():
        if version not in seen:
            seen.add(version)
            if degenerate:
                news.append(f"v{version}: canaries {', '.join(map(str, degenerate))}")
    return news


def new_evaluations(store: ReviewStore, seen: set[int]) -> list[str]:
    """The held-out evaluations (the policy's, in Redis) that arrived since the last call, one line
    each; `seen` is updated."""
    lines = []
    for version, record in store.evals().items():
        if version not in seen:
            seen.add(version)
            accuracy = "" if record.get("accuracy") is None else f"  accuracy {record['accuracy']:.3f}"
            lines.append(
                f"  held-out evaluation of version {version} ({record['rows']} rows): reward "
                f"{record['reward_mean']:+.3f}{accuracy}  KL/seq {record['kl_per_sequence']:.3f}  "
                f"len {record['response_length']:.1f}"
            )
    return lines


def format_step(
    step: TrainerRecord, iterations: int | None, recent_rewards: list[float], degenerate: list[str] = ()
) -> str:
    """One progress line; recent_rewards (this step's last) gives the trend through batch noise;
    degenerate: canary verdicts to name (degenerate_canaries)."""
    of = f"/{iterations}" if iterations else ""
    canaries = f"  DETECTOR: canary_degenerate ({'; '.join(degenerate)}) (docs/runbooks.md)" if degenerate else ""
    if isinstance(step, RollbackRecord):
        cause = (
            f"batch KL {step.batch_kl:.2f} nats passed kl_hard_limit"
            if step.cause == "kl_hard_limit"
            else f"version {step.degenerate_version}'s canary answers are degenerate"
        )
        return (
            f"iteration {step.version}{of}  ROLLBACK: {cause}; weights of version {step.rolled_back_to} "
            f"published again (β {step.kl_coef:.3g}, lr {step.lr:.3g})" + canaries
        )
    stats, s = step.stats, step.seconds
    trend = sum(recent_rewards[-5:]) / len(recent_rewards[-5:])
    return (
        f"iteration {step.version}{of}  reward {stats.reward_mean:+.3f} ± {stats.reward_std:.3f} "
        f"(last 5: {trend:+.3f})  "
        f"KL/seq {stats.kl_per_sequence:.3f} (per token {stats.kl_per_token:.4f})  "
        f"len {stats.response_length_mean:.1f}  clip {stats.clip_fraction:.2f}  "
        f"| gen {s.generate:.1f}s ref {s.reference:.1f}s reward {s.reward:.2f}s "
        f"update {s.update:.1f}s publish {s.publish:.2f}s persist {s.persist:.2f}s swap {s.swap:.2f}s"
        + (f"  DETECTOR: {', '.join(step.detectors_firing)} (docs/runbooks.md)" if step.detectors_firing else "")
        + canaries
    )


SUMMARY_KEYS = ("reward_mean", "reward_std", "kl_per_sequence", "kl_per_token", "response_length_mean")


def summarise(steps: list[TrainerRecord]) -> dict:
    """Figures over the training steps (rollbacks are counted, not averaged in)."""
    rollbacks = sum(1 for s in steps if isinstance(s, RollbackRecord))
    steps = [s for s in steps if isinstance(s, StepRecord)]
    if not steps:
        return {"rollbacks": rollbacks} if rollbacks else {}
    keys = ("generate", "reference", "reward", "update", "publish", "persist", "swap")
    quarter = max(1, len(steps) // 4)
    wall = [b.time - a.time for a, b in zip(steps, steps[1:])]
    figure = lambda step, key: getattr(step.stats, key)  # noqa: E731
    return {
        "iterations": len(steps),
        "rollbacks": rollbacks,
        "first": {k: figure(steps[0], k) for k in SUMMARY_KEYS},
        "last": {k: figure(steps[-1], k) for k in SUMMARY_KEYS},
        "first_quarter_mean": {k: sum(figure(x, k) for x in steps[:quarter]) / quarter for k in SUMMARY_KEYS},
        "last_quarter_mean": {k: sum(figure(x, k) for x in steps[-quarter:]) / quarter for k in SUMMARY_KEYS},
        "mean_seconds": {k: sum(getattr(x.seconds, k) for x in steps) / len(steps) for k in keys},
        "mean_wall_seconds_between_iterations": sum(wall) / len(wall) if wall else None,
    }


def follow(config: BelayConfig, stack: LocalStack, iterations: int | None, say=print) -> list[TrainerRecord]:
    """Print each trainer step as it lands; return them all once `iterations` are done, or once the
    trainer has exited 0 (max_steps, or the actor's data used up: data.epochs) and its steps are read."""
    queue = RolloutQueue.from_url(config.redis.url, config.run.name)
    store, seen, evaluated = ReviewStore(queue.redis, config.run.name), set(), set()
    steps, cursor = [], "0-0"
    while iterations is None or len(steps) < iterations:
        stack.check_alive()
        finished = stack.trainer_finished()  # before the read, so the read holds its last step
        if finished and queue.data_finished():
            say("the data is used up (data.epochs): the trainer finished what was queued")
        for entry_id, step in queue.read_steps(cursor, block_ms=1000):
            cursor = entry_id
            steps.append(step)
            rewards = [x.stats.reward_mean for x in steps if isinstance(x, StepRecord)]
            say(format_step(step, iterations, rewards, degenerate_canaries(store, seen)))
            for line in new_evaluations(store, evaluated) if config.trainer.eval_every else []:
                say(line)
            if iterations is not None and len(steps) >= iterations:
                break
        if finished:
            break
    return steps


def up(
    config: BelayConfig,
    run_dir: pathlib.Path,
    iterations: int | None,
    startup_timeout: float,
    evaluate_after: bool = True,
    say=print,
) -> dict:
    """Run the stack, follow training, stop it; then summarise, evaluate and report the run."""
    # Ctrl-C stops cleanly even where SIGINT came in ignored: a shell starts background jobs with it
    # ignored, and then KeyboardInterrupt never came and `belay up` followed the run for ever.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report, refused = memory_check(config)  # before anything starts: a plan that cannot fit is refused
    say(report)
    if refused:
        raise StackError(refused)
    steps, canaries, before, after = train(config, LocalStack(config, run_dir, say), iterations, startup_timeout, say)
    summary = summarise(steps)
    summary.update(samples_before=before, samples_after=after)
    if summary.get("iterations"):
        say_progress(summary, say)
        best = read_best(config.run.checkpoint_dir)  # marked by the trainer from the held-out evaluations
        if best is not None:
            summary["best_version"] = best
            say(f"best version by held-out {best['metric']}: {best['version']} ({best['value']:.4f}), {best['path']}")
        latest = latest_checkpoint(config.run.checkpoint_dir)
        if evaluate_after and latest is not None:
            summary["eval"] = evaluate_first_and_last(config, latest[1], run_dir / "eval", say)
    if steps:
        summary["report"] = str(report_run(steps, canaries, run_dir, say))
    (run_dir / "summary.json").write_text(strict_json(summary, indent=1))
    say(f"summary written to {run_dir / 'summary.json'}")
    return summary


def train(
    config: BelayConfig,
    stack: LocalStack,
    iterations: int | None,
    startup_timeout: float,
    say=print,
) -> tuple[list[TrainerRecord], dict[int, dict], list[str], list[str]]:
    """Start the stack, answer the canary prompts, train until `iterations` (or Ctrl-C), answer them
    again, stop the stack. Returns (steps, canaries, answers before, answers after)."""
    # One list of fixed prompts, answered at one length: the canaries the policy answers after each
    # swap, which the review page and the report show too.
    sample_prompts = (
        read_prompts(config.policy.canary_prompts_file, "policy.canary_prompts_file")
        if config.policy.canary_prompts_file
        else []
    )
    sample_tokens = config.policy.canary_max_new_tokens
    steps: list[TrainerRecord] = []
    canaries: dict[int, dict] = {}
    before: list[str] = []
    after: list[str] = []
    try:
        say(f"Belay: starting redis-server and {', '.join(SERVICES)} (logs in {stack.run_dir / 'logs'})")
        stack.start(("reference", "reward", "policy"))
        stack.wait_healthy(startup_timeout, trainer=False)
        # The "before" answers come from the policy before the trainer exists, so they are version 0
        # on a fresh run (or the resumed version).
        version, before = sample_outputs(config, sample_prompts, sample_tokens) if sample_prompts else (0, [])
        say(f"Canary prompts, greedy, policy version {version}:")
        for prompt, text in zip(sample_prompts, before):
            say(f"  > {prompt}\n    {text!r}")
        stack.start(("trainer",))
        stack.wait_healthy(startup_timeout)
        for line in where_to_watch(config):
            say(line)
        say("training (Ctrl-C stops cleanly) ...")
        try:
            steps = follow(config, stack, iterations, say)
        except KeyboardInterrupt:
            say("\nCtrl-C: stopping after the step in hand")
            queue = RolloutQueue.from_url(config.redis.url, config.run.name)
            steps = [s for _, s in queue.read_steps("0-0")]
        if steps and sample_prompts:
            final = wait_for_policy_version(config, steps[-1].version, 300)
            version, after = sample_outputs(config, sample_prompts, sample_tokens)
            say(f"after training, policy version {version} (expected {steps[-1].version}, serving {final}):")
            for prompt, old, new in zip(sample_prompts, before, after):
                say(f"  > {prompt}\n    before: {old!r}\n    after:  {new!r}")
        canaries = final_canaries(config, steps[-1].version if steps else None)  # before Redis stops
    finally:
        say("stopping services ...")
        stack.stop()
    return steps, canaries, before, after


def where_to_watch(config: BelayConfig) -> list[str]:
    """What `belay up` prints once the trainer is up: the review page and the TensorBoard command, when on."""
    lines = []
    if config.trainer.review_port:
        lines.append(f"review page (samples, canaries, ratings): http://127.0.0.1:{config.trainer.review_port}/")
    if config.run.tensorboard_dir is not None:
        lines.append(
            f"TensorBoard event files (steps, canaries) in {config.run.tensorboard_dir}/{config.run.name}: "
            f"tensorboard --logdir {shlex.quote(config.run.tensorboard_dir)}"
        )
    return lines


def say_progress(summary: dict, say=print) -> None:
    """The run in two lines: reward and KL from the first step to the last, and seconds per iteration."""
    first, last, t = summary["first"], summary["last"], summary["mean_seconds"]
    q1, q4 = summary["first_quarter_mean"], summary["last_quarter_mean"]
    say(
        f"\nreward mean {first['reward_mean']:+.3f} -> {last['reward_mean']:+.3f} (first quarter of the run "
        f"{q1['reward_mean']:+.3f}, last quarter {q4['reward_mean']:+.3f}); KL/seq {first['kl_per_sequence']:.3f}"
        f" -> {last['kl_per_sequence']:.3f} (per token {last['kl_per_token']:.4f}) over {summary['iterations']} "
        "iterations"
    )
    say("mean seconds per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))


def report_run(steps: list[TrainerRecord], canaries: dict[int, dict], run_dir: pathlib.Path, say=print) -> pathlib.Path:
    """Write the run report (with its plots) and say how the canary prompts' answers moved."""
    report = write_run_report(steps, canaries, run_dir / "report")
    if canaries:
        first, last = canaries[min(canaries)], canaries[max(canaries)]
        degenerate = sorted(v for v, r in canaries.items() if r.get("degenerate"))
        say(
            f"canary prompts, version {first['version']} -> {last['version']} (drift {last['drift']:.3f}; "
            f"versions with degenerate answers: {', '.join(map(str, degenerate)) or 'none'}):"
        )
        for index, (prompt, signals) in enumerate(zip(last["prompts"], last.get("signals", []))):
            say(f"  {index} {prompt}  {signal_line(signals)}")
    say(f"report: {report} (plots: {report.parent / 'training.png'})")
    return report


def signal_line(signals: dict) -> str:
    """One canary answer's degeneration signals, as the report and the progress output show them."""
    return (
        f"repeated 3-grams {number(signals['repeated_ngram_share'])}, longest repeat "
        f"{signals['longest_repeated_span']} words, compression {number(signals['compression_ratio'])}, "
        f"length x{number(signals['length_ratio'])} of v0, relevance {number(signals['relevance'])} "
        f"({number(signals['relevance_change'], '+.2f')})" + ("  DEGENERATE" if signals["degenerate"] else "")
    )


def evaluate_first_and_last(config: BelayConfig, last: pathlib.Path, out_dir: pathlib.Path, say=print) -> dict:
    """`belay eval` of the starting model (the reference) and the last version, on held-out data."""
    from .evaluation.runner import EvalSettings, evaluate_and_write

    say(f"evaluating the reference and {last.name} on held-out prompts and text ...")
    settings = EvalSettings(max_new_tokens=config.policy.max_new_tokens)
    results, _ = evaluate_and_write(config, [None, last], None, HELDOUT_TEXT, settings, out_dir, say)
    reference, trained = results["models"]["reference"], results["models"][last.name]
    say(
        f"held-out reward {reference['reward_mean']:+.3f} -> {trained['reward_mean']:+.3f}; held-out perplexity "
        f"{reference['perplexity']:.2f} -> {trained['perplexity']:.2f} "
        f"({100 * (trained['perplexity'] / reference['perplexity'] - 1):+.1f}%); plots in {out_dir}"
    )
    return results
