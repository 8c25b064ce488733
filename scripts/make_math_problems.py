"""Write the math demo's arithmetic problems: data/math/train.jsonl and data/math/heldout.jsonl,
one {"prompt": ..., "answer": ...} per line, from a fixed seed (running it again writes the same files).

Three kinds, equally often: one-digit sums (3 + 4), two-digit sums (37 + 45) and products of a
digit and a number up to 12 (7 * 11). Measured on SmolLM2-135M-Instruct (greedy, 24 new tokens,
24 problems each), they start at about 46 %, 17 % and 33 % correct: the mix sits in the 10-60 %
band with easy problems to learn from and hard ones to learn (docs/rewards.md has the figures;
two-digit differences, at 0 %, were left out). The held-out problems are distinct and never appear
in training; training problems may repeat (there are only 81 one-digit sums).

    python scripts/make_math_problems.py            # the shipped files
    python scripts/make_math_problems.py --check    # fail if the shipped files differ from the script's
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

OUT_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "math"
SEED = 16
TRAIN_ROWS, HELDOUT_ROWS = 400, 100
INSTRUCTION = "Answer with the number only."


def problem(rng: random.Random) -> tuple[str, int]:
    """One question and its integer answer, of a kind drawn uniformly."""
    kind = rng.choice(("one-digit sum", "two-digit sum", "product"))
    if kind == "one-digit sum":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"What is {a} + {b}?", a + b
    if kind == "two-digit sum":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", a + b
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return f"What is {a} * {b}?", a * b


def row(question: str, answer: int) -> dict:
    return {"prompt": f"{question} {INSTRUCTION}", "answer": str(answer)}


def make_splits(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): HELDOUT_ROWS distinct problems first, then TRAIN_ROWS draws of the others."""
    rng = random.Random(seed)
    heldout: dict[str, dict] = {}
    while len(heldout) < HELDOUT_ROWS:
        item = row(*problem(rng))
        heldout.setdefault(item["prompt"], item)
    train = []
    while len(train) < TRAIN_ROWS:
        item = row(*problem(rng))
        if item["prompt"] not in heldout:
            train.append(item)
    return train, list(heldout.values())


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(OUT_DIR))
    parser.add_argument("--check", action="store_true", help="compare with the files in --out-dir, write nothing")
    args = parser.parse_args(argv)
    train, heldout = make_splits(SEED)
    files = {"train.jsonl": train, "heldout.jsonl": heldout}
    out_dir = pathlib.Path(args.out_dir)
    for name, part in files.items():
        path = out_dir / name
        if args.check:
            expected = "".join(json.dumps(row) + "\n" for row in part)
            if not path.is_file() or path.read_text() != expected:
                print(f"{path} differs from what scripts/make_math_problems.py writes: run it again", file=sys.stderr)
                return 1
        else:
            write_jsonl(path, part)
            print(f"wrote {len(part)} problems to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
