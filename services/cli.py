"""The `belay` command: `belay up` runs the whole stack locally; `belay prepare-model` converts
the embedded SmolLM2 once."""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys

from .bench.workload import Workload
from .common.config import ConfigError, load_config_or_exit
from .common.prompt_data import DataError, load_prompt_data
from .common.strict_json import strict_json


def cmd_prepare_model(args) -> int:
    from .common.smollm2 import prepare_smollm2

    print(prepare_smollm2(pathlib.Path(args.out)))
    return 0


def cmd_up(args) -> int:
    from .launcher import up
    from .local_stack import StackError

    config = resolve_default_model(load_config_or_exit(args.config))
    run_dir = pathlib.Path(args.run_dir or f"runs/{config.run.name}")
    if args.fresh and run_dir.exists():
        print(f"--fresh: removing the previous run in {run_dir}")
        shutil.rmtree(run_dir)
    config.run.checkpoint_dir = str(run_dir / "checkpoints")
    if args.iterations:
        config.trainer.max_steps = args.iterations
    try:  # the data is checked here too, before any service starts
        load_prompt_data(config)
    except DataError as error:
        print(f"belay up: {error}", file=sys.stderr)
        return 2
    try:
        up(
            config,
            run_dir,
            args.iterations,
            args.startup_timeout,
            evaluate_after=not args.no_eval,
        )
    except StackError as error:
        print(f"belay up failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # during start-up; the stack has been stopped by then
        print("interrupted: every service stopped", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args) -> int:
    from .common.checkpoints import committed_versions
    from .evaluation.runner import EvalSettings, evaluate_and_write

    config = resolve_default_model(load_config_or_exit(args.config))
    checkpoints: list[pathlib.Path | None] = [None]  # the reference first: the floor to compare with
    if args.run_dir:
        checkpoints += [path for _, path in committed_versions(pathlib.Path(args.run_dir) / "checkpoints")]
    checkpoints += [pathlib.Path(c) for c in args.checkpoint]
    for checkpoint in checkpoints[1:]:
        if not checkpoint.is_dir():
            print(f"checkpoint {checkpoint} is not a directory", file=sys.stderr)
            return 2
    settings = EvalSettings(max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples, seed=args.seed)
    out = pathlib.Path(args.out or (pathlib.Path(args.run_dir) / "eval" if args.run_dir else "runs/eval"))
    _, written = evaluate_and_write(config, checkpoints, args.prompts, args.texts, settings, out)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_check_reward(args) -> int:
    from .common.config import GrpcConfig
    from .reward.conformance import check_reward_server, verdict

    grpc_config = load_config_or_exit(args.config).grpc if args.config else GrpcConfig()
    print(f"checking the reward server at {args.address} (deadline {args.timeout:g} s per call)")
    try:
        results = check_reward_server(args.address, timeout=args.timeout, grpc_config=grpc_config)
    except ConfigError as error:  # a TLS or token file the grpc section names but cannot be read
        print(error, file=sys.stderr)
        return 2
    for result in results:
        print(result.line())
    print(verdict(results))
    return 0 if all(result.passed for result in results) else 1


def cmd_bench(args) -> int:
    import dataclasses

    from .bench.bench import run_bench
    from .bench.report import format_report
    from .bench.reward_model import ensure_reward_model
    from .bench.workload import Workload
    from .common.smollm2 import DEFAULT_DIR, prepare_smollm2

    if args.iterations < 1 or args.warmup < 0 or args.repeat < 1 or args.checkpoint_every_steps < 1:
        print(
            f"--iterations, --repeat and --checkpoint-every-steps must be >= 1 and --warmup >= 0 (got "
            f"{args.iterations}, {args.repeat}, {args.checkpoint_every_steps}, {args.warmup})",
            file=sys.stderr,
        )
        return 2
    defaults = Workload()
    model_dir = pathlib.Path(args.model_dir or defaults.model_dir).expanduser()
    if model_dir == DEFAULT_DIR:
        prepare_smollm2(DEFAULT_DIR)  # converts the embedded model once
    elif not (model_dir / "config.json").is_file():
        print(f"--model-dir {model_dir} is not a Hugging Face model directory (no config.json)", file=sys.stderr)
        return 2
    if args.reward_dir is None and model_dir != DEFAULT_DIR:
        print(
            "--reward-dir is needed with --model-dir (the default reward model is built from SmolLM2)", file=sys.stderr
        )
        return 2
    reward_dir = ensure_reward_model(model_dir, args.reward_dir or defaults.reward_dir)
    workload = dataclasses.replace(
        defaults,
        model_dir=str(model_dir),
        reward_dir=str(reward_dir),
        iterations=args.iterations,
        warmup=args.warmup,
        checkpoint_every_steps=args.checkpoint_every_steps,
    )
    results = run_bench(
        workload, pathlib.Path(args.run_dir), trl=args.trl, trl_python=args.trl_python, repeat=args.repeat
    )
    print()
    print(format_report(results))
    if args.json:
        pathlib.Path(args.json).write_text(strict_json(results, indent=1))
        print(f"\nfigures written to {args.json}")
    return 0


def resolve_default_model(config):
    """Point every model_dir naming the embedded default at its converted copy (converting it once)."""
    from .common.smollm2 import DEFAULT_DIR, prepare_smollm2

    default_dirs = {str(DEFAULT_DIR), "~/.cache/belay/SmolLM2-135M-Instruct"}
    for section in (config.policy, config.reference, config.trainer):
        if section.model_dir in default_dirs:
            section.model_dir = str(prepare_smollm2(DEFAULT_DIR))
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="belay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_up, add_eval, add_check_reward, add_bench, add_prepare_model):
        add(commands)
    return parser


def add_up(commands) -> None:
    """`belay up` and its options."""
    run = commands.add_parser("up", help="run redis and the four services locally, follow training")
    run.add_argument("--config", default="configs/demo.yaml")
    run.add_argument("--iterations", type=int, default=None, help="stop after this many PPO updates")
    run.add_argument("--run-dir", default=None, help="where logs, redis data and checkpoints go (runs/<name>)")
    run.add_argument("--fresh", action="store_true", help="delete this run's previous state first (else resume)")
    run.add_argument("--startup-timeout", type=float, default=900.0)
    run.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    run.set_defaults(handler=cmd_up)


def add_eval(commands) -> None:
    """`belay eval` and its options."""
    evaluation = commands.add_parser(
        "eval", help="held-out reward, KL, length, diversity and perplexity of checkpoints"
    )
    evaluation.add_argument("--config", default="configs/demo.yaml")
    evaluation.add_argument("--run-dir", default=None, help="evaluate every committed checkpoint of this run")
    evaluation.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory (repeatable)")
    evaluation.add_argument(
        "--prompts",
        default=None,
        help="held-out prompts, one per line; or a .jsonl of {prompt, answer, ...} rows (accuracy column); "
        "default: the config's held-out rows (data.heldout_path or data.heldout_rows), else prompts/heldout.txt",
    )
    evaluation.add_argument("--texts", default="data/heldout_text.txt", help="held-out text for perplexity")
    evaluation.add_argument("--samples", type=int, default=2, help="samples per prompt")
    evaluation.add_argument("--max-new-tokens", type=int, default=32)
    evaluation.add_argument("--seed", type=int, default=1234)
    evaluation.add_argument("--out", default=None, help="where results.json and the PNG plots go")
    evaluation.set_defaults(handler=cmd_eval)


def add_check_reward(commands) -> None:
    """`belay check-reward` and its options."""
    check = commands.add_parser("check-reward", help="check any belay.v1.Reward server against the protocol")
    check.add_argument("address", help="host:port of the reward server")
    check.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    check.add_argument("--config", default=None, help="Belay config whose grpc section (TLS, token) to use")
    check.set_defaults(handler=cmd_check_reward)


def add_bench(commands) -> None:
    """`belay bench` and its options."""
    bench = commands.add_parser("bench", help="per-stage figures of a fixed PPO workload: services, in-process, TRL")
    bench.add_argument("--json", default=None, help="also write every figure to this JSON file")
    bench.add_argument("--iterations", type=int, default=Workload.iterations, help="measured PPO steps per mode")
    bench.add_argument("--warmup", type=int, default=Workload.warmup, help="steps run first, not measured")
    bench.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the overlap-off services mode and the in-process "
        "mode this many times each and judge their median seconds per step",
    )
    bench.add_argument(
        "--checkpoint-every-steps",
        type=int,
        default=Workload.checkpoint_every_steps,
        help="persist cadence of every mode (trainer.checkpoint_every_steps)",
    )
    bench.add_argument(
        "--trl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run TRL's PPOTrainer on the same workload (--no-trl skips it)",
    )
    bench.add_argument("--trl-python", default=sys.executable, help="the interpreter (environment) that runs TRL")
    bench.add_argument("--model-dir", default=None, help="policy/reference model (default: SmolLM2-135M-Instruct)")
    bench.add_argument(
        "--reward-dir", default=None, help="sequence-classifier reward model (built from the model's trunk if missing)"
    )
    bench.add_argument("--run-dir", default="runs/bench", help="where each mode's logs and checkpoints go")
    bench.set_defaults(handler=cmd_bench)


def add_prepare_model(commands) -> None:
    """`belay prepare-model` and its options."""
    prepare = commands.add_parser("prepare-model", help="convert the embedded SmolLM2 GGUF to safetensors once")
    prepare.add_argument("--out", default="~/.cache/belay/SmolLM2-135M-Instruct")
    prepare.set_defaults(handler=cmd_prepare_model)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
