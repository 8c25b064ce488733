"""A booby-trapped pickle: unpickling it creates a marker file. Tests leave it where a careless
loader would unpickle it (a .bin or .pt beside the safetensors) and check the marker never appears."""

from __future__ import annotations

import contextlib
import pathlib
import pickle

import torch


class _Trap:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def trap_bytes(marker: pathlib.Path) -> bytes:
    """Pickled bytes that touch `marker` when unpickled."""
    return pickle.dumps(_Trap(marker))


@contextlib.contextmanager
def refusing_unpickling():
    """Inside this block any unpickling (pickle.load/loads/Unpickler, torch.load) raises: a reader that
    unpickles anything, a trap or not, fails the test that runs it here."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled where nothing may be")

    names = [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]
    saved = [getattr(module, name) for module, name in names]
    for module, name in names:
        setattr(module, name, refuse)
    try:
        yield
    finally:
        for (module, name), value in zip(names, saved):
            setattr(module, name, value)
