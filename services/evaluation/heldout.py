"""`belay eval`'s held-out prompts: a text file (one prompt per line) or a JSONL file of rows, each
{"prompt": ..., and any other fields}, the other fields being the row's metadata (a math problem's
"answer", which the math_answer reward and the accuracy column read)."""

from __future__ import annotations

import json
import pathlib

from ..common.prompts import read_prompts


def read_heldout(path: str, what: str = "held-out prompts file") -> tuple[list[str], list[dict] | None]:
    """(prompts, one metadata dict per prompt) from a .jsonl file; (prompts, None) from a text file."""
    if not path.endswith(".jsonl"):
        return read_prompts(path, what), None
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    prompts, metadata = [], []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{what} {path} line {number} is not JSON: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{what} {path} line {number}: expected an object with a non-empty 'prompt' string")
        prompts.append(row.pop("prompt"))
        metadata.append(row)
    if not prompts:
        raise ValueError(f"{what} {path} holds no prompts")
    return prompts, metadata
