"""The `belay` command: `belay up` runs the whole stack locally; `belay prepare-model` converts
the embedded SmolLM2 once."""
from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import sys

from .common.config import ConfigError, load_config


def _prompts(path: str, count: int) -> list[str]:
    lines = [l.strip() for l in pathlib.Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]
    return lines[:count]


def cmd_prepare_model(args) -> int:
    from .common.smollm2 import prepare_smollm2
    print(prepare_smollm2(pathlib.Path(args.out)))
    return 0


def cmd_up(args) -> int:
    from .common.smollm2 import DEFAULT_DIR, prepare_smollm2
    from .launcher import StackError, up

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    default_dirs = {str(DEFAULT_DIR), "~/.cache/belay/SmolLM2-135M-Instruct"}
    for section in (config.policy, config.reference, config.trainer):
        if section.model_dir in default_dirs:
            section.model_dir = str(prepare_smollm2(DEFAULT_DIR))  # the embedded default, converted once
    run_dir = pathlib.Path(args.run_dir or f"runs/{config.run.name}")
    if args.fresh and run_dir.exists():
        print(f"--fresh: removing the previous run in {run_dir}")
        shutil.rmtree(run_dir)
    config.run.checkpoint_dir = str(run_dir / "checkpoints")
    if args.iterations:
        config.trainer.max_steps = args.iterations
    try:
        up(config, run_dir, args.iterations, _prompts(config.policy.prompts_file, args.samples),
           args.sample_tokens, args.startup_timeout)
    except StackError as error:
        print(f"belay up failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # during start-up; the stack has been stopped by then
        print("interrupted: every service stopped", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="belay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("up", help="run redis and the four services locally, follow training")
    run.add_argument("--config", default="configs/demo.yaml")
    run.add_argument("--iterations", type=int, default=None, help="stop after this many PPO updates")
    run.add_argument("--run-dir", default=None, help="where logs, redis data and checkpoints go (runs/<name>)")
    run.add_argument("--fresh", action="store_true", help="delete this run's previous state first (else resume)")
    run.add_argument("--samples", type=int, default=2, help="fixed prompts shown before and after")
    run.add_argument("--sample-tokens", type=int, default=48)
    run.add_argument("--startup-timeout", type=float, default=900.0)
    run.set_defaults(handler=cmd_up)
    prepare = commands.add_parser("prepare-model", help="convert the embedded SmolLM2 GGUF to safetensors once")
    prepare.add_argument("--out", default="~/.cache/belay/SmolLM2-135M-Instruct")
    prepare.set_defaults(handler=cmd_prepare_model)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
