"""The trap the no-unpickling tests rely on does fire when something unpickles it."""

import pickle

import pytest

from tests.pickle_trap import refusing_unpickling, trap_bytes


def test_the_trap_fires_when_unpickled(tmp_path):
    marker = tmp_path / "fired"
    pickle.loads(trap_bytes(marker))  # the one place a pickle is loaded on purpose: to prove the trap works
    assert marker.exists()


def test_refusing_unpickling_fails_any_unpickling(tmp_path):
    marker = tmp_path / "fired"
    with refusing_unpickling(), pytest.raises(AssertionError, match="unpickled"):
        pickle.loads(trap_bytes(marker))
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(3)) == 3  # restored after the block
