"""Where the `file` weight transport publishes each version's serving weights.

Published weights are not checkpoints: they hold only what the policy serves (no optimizer, no
RNG), they are written without fsync, and they are removed once no replica serves them. Each
version is a directory vNNNNNN like a checkpoint's (weights as safetensors, MANIFEST.json with
sizes and checksums), committed by an atomic rename, so the policy's checks apply unchanged.

Trainer and policy find the directory from the same config: run.publish_dir when set (under
compose and Kubernetes a volume both mount: containers do not share /dev/shm), otherwise a
memory-backed directory in /dev/shm named after the run and its checkpoint directory, so that
two runs on one machine never share it. Where /dev/shm is missing, beside checkpoint_dir.
"""

from __future__ import annotations

import os
import pathlib

import xxhash

from .config import RunConfig

SHARED_MEMORY = pathlib.Path("/dev/shm")


def published_dir(run: RunConfig) -> pathlib.Path:
    if run.publish_dir:
        return pathlib.Path(run.publish_dir).expanduser()
    checkpoints = pathlib.Path(run.checkpoint_dir).expanduser().resolve()
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        key = xxhash.xxh3_64_hexdigest(str(checkpoints).encode())[:12]
        return SHARED_MEMORY / f"belay-{run.name}-{key}"
    return checkpoints.parent / "published"
