"""The trap the no-unpickling tests rely on does fire when something unpickles it."""

import pickle

from tests.pickle_trap import trap_bytes


def test_the_trap_fires_when_unpickled(tmp_path):
    marker = tmp_path / "fired"
    pickle.loads(trap_bytes(marker))  # the one place a pickle is loaded on purpose: to prove the trap works
    assert marker.exists()
