"""The trap the no-unpickling tests rely on does fire when something unpickles it."""

import io
import pickle

import pytest
import torch

from tests.pickle_trap import refusing_unpickling, trap_bytes


def test_the_trap_fires_when_unpickled(tmp_path):
    marker = tmp_path / "fired"
    pickle.loads(trap_bytes(marker))  # the one place a pickle is loaded on purpose: to prove the trap works
    assert marker.exists()


def test_refusing_unpickling_fails_any_unpickling():
    originals = (pickle.load, pickle.loads, pickle.Unpickler, torch.load)
    with refusing_unpickling():
        readers = (pickle.load, pickle.loads, pickle.Unpickler, torch.load)  # what a reader would call now
        for reader in readers:
            with pytest.raises(AssertionError, match="unpickled"):
                reader(io.BytesIO(b""))  # refused before anything is read
    assert (pickle.load, pickle.loads, pickle.Unpickler, torch.load) == originals  # restored after the block
