"""A booby-trapped pickle: unpickling it creates a marker file. Tests leave it where a careless
loader would unpickle it (a .bin or .pt beside the safetensors) and check the marker never appears."""

from __future__ import annotations

import pathlib
import pickle


class _Trap:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def trap_bytes(marker: pathlib.Path) -> bytes:
    """Pickled bytes that touch `marker` when unpickled."""
    return pickle.dumps(_Trap(marker))
