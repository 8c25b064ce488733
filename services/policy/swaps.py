"""What the policy may swap to, and the newest version asked for.

Weights reach the policy from the trainer's publish directory (the `file` transport), from a
persisted checkpoint (at start, or a catching-up replica), or staged in memory by a receiving
transport (`broadcast`, `cuda_ipc`); the actor applies the newest between generation batches.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Mapping

import grpc
import torch

from ..common.checkpoints import STATE_PREFIX, VERSION_DIR
from ..common.config import RunConfig
from ..common.published import published_dir
from ..common.rpc import RequestError, invalid

# A path to a committed version directory, or tensors a transport staged in memory (name -> tensor)
WeightSource = pathlib.Path | Mapping[str, torch.Tensor]


def checked_weights_path(run: RunConfig, version: int, path: str) -> pathlib.Path:
    """checked_checkpoint_path against the publish directory, else the checkpoint directory."""
    publish_root = published_dir(run).resolve()
    try:
        inside_publish = pathlib.Path(path).resolve().parent == publish_root
    except (OSError, RuntimeError, ValueError):
        inside_publish = False
    return checked_checkpoint_path(publish_root if inside_publish else run.checkpoint_dir, version, path)


def checked_checkpoint_path(root: str | pathlib.Path, version: int, path: str) -> pathlib.Path:
    """A checkpoint path the policy may load: a committed vNNNNNN directory for `version` inside root.

    The path is resolved (every symlink followed, `..` applied) and must then be a direct child of
    the resolved root: `root/../x`, absolute paths elsewhere and symlinks out of root are refused
    with INVALID_ARGUMENT naming the path, as are files in the checkpoint that link out of it. A
    directory without safetensors weights (e.g. only a pickled pytorch_model.bin, which is never
    loaded) is FAILED_PRECONDITION.
    """
    shown = repr(path) if len(path) <= 300 else repr(path[:300]) + "..."  # messages name the path, briefly
    if not path or "\x00" in path:
        raise invalid(f"checkpoint_path {shown} is not a path")
    given = pathlib.Path(path)
    try:
        root_path = pathlib.Path(root).resolve()
        candidate = given.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a name too long, a symlink loop, ...
        raise invalid(f"checkpoint_path {shown} cannot be resolved: {error}") from None
    if candidate.parent != root_path:
        try:
            link = ", through a symlink that leads out of it" if given.is_symlink() else ""
        except OSError:  # e.g. a name too long to look at: refused all the same
            link = ""
        raise invalid(
            f"checkpoint_path {shown} resolves to {str(candidate)[:300]}, which is not inside the "
            f"policy's checkpoint directory {root_path}{link}"
        )
    match = VERSION_DIR.match(candidate.name)
    if not match or int(match.group(1)) != version:
        raise invalid(f"checkpoint_path {shown} is not the committed directory of version {version}")
    if not candidate.is_dir():
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"checkpoint {candidate} does not exist (yet)")
    entries = list(candidate.iterdir())
    for entry in entries:
        try:
            target = entry.resolve()
        except (OSError, RuntimeError) as error:
            raise invalid(f"checkpoint_path {shown}: {entry.name} cannot be resolved: {error}") from None
        if candidate not in target.parents:
            raise invalid(f"checkpoint_path {shown}: {entry.name} is a symlink to {target}, outside the checkpoint")
    if not any(e.name.endswith(".safetensors") and not e.name.startswith(STATE_PREFIX) for e in entries):
        pickles = sorted(e.name for e in entries if e.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        found = f" (only {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION, f"checkpoint {candidate} holds no *.safetensors weights{found}"
        )
    return candidate


class SwapRequests:
    """The newest version someone asked for; the actor applies it between batches."""

    def __init__(self):
        self._lock = threading.Lock()
        self.version, self.path = 0, None

    def offer(self, version: int, source: WeightSource) -> None:
        with self._lock:
            if version > self.version:
                self.version, self.path = version, source

    def newest(self) -> tuple[int, WeightSource | None]:
        with self._lock:
            return self.version, self.path
