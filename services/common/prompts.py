"""Prompt files: one prompt (or held-out passage) per line, '#' comments skipped. Read by the actor,
the evaluation, the bench and `belay up`."""

from __future__ import annotations

import pathlib


def read_prompts(path: str, what: str = "policy.prompts_file") -> list[str]:
    """The non-empty lines of a file, stripped, but those starting with '#'; `what` names the file
    in the errors (a missing file, or one with no prompts)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{what} {path} holds no prompts")
    return prompts
