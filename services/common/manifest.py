"""The run manifest: what it takes to reproduce a run (resolved config, package versions, model
fingerprints, seeds, git revision), written by the trainer when it starts."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "tokenizers",
    "grpcio",
    "protobuf",
    "redis",
    "numpy",
    "vaderSentiment",
)
REPO = pathlib.Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """HEAD of the checkout the code runs from, '+dirty' when it has uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_manifest(config: dict, fingerprints: dict[str, str], seeds: dict[str, int]) -> dict:
    return {
        "config": config,
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fingerprints": fingerprints,
        "seeds": seeds,
        "git_revision": git_revision(),
    }


def write_manifest(path: pathlib.Path, manifest: dict) -> None:
    """Atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temp, path)
