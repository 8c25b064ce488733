"""Shared fixtures: real redis-server processes, tiny real models, free loopback ports."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import time

import pytest
import redis

from services.common.ports import free_port
from tests.tiny_models import build_causal_lm, build_reward_model, build_tokenizer


@pytest.fixture
def redis_url(tmp_path: pathlib.Path):
    """A real redis-server on a free loopback port, its data in tmp_path; stopped afterwards."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "", "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> pathlib.Path:
    """A random 2-layer Llama with a chat-template tokenizer, saved as safetensors."""
    return build_causal_lm(tmp_path_factory.mktemp("tiny_lm"), seed=0)


@pytest.fixture(scope="session")
def eager_eos_lm_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama whose likeliest next token is always EOS."""
    return build_causal_lm(tmp_path_factory.mktemp("eos_lm"), seed=0, eager_eos=True)


@pytest.fixture(scope="session")
def other_tokenizer_lm_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama whose tokenizer differs from tiny_lm_dir's (a different vocabulary)."""
    return build_causal_lm(
        tmp_path_factory.mktemp("other_lm"),
        seed=0,
        tokenizer=build_tokenizer(vocab_size=300, extra_words=("zebra quokka " * 50,)),
    )


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> pathlib.Path:
    return build_reward_model(tmp_path_factory.mktemp("tiny_rm"))


@pytest.fixture(scope="session", autouse=True)
def publish_dirs_left_in_shared_memory():
    """Remove, after the session, the /dev/shm/belay-* publish directories its trainers made (a
    trainer killed on purpose never removes its own; tmp_path cleans the rest). Only directories that
    were not there before the session go."""
    shared = pathlib.Path("/dev/shm")
    before = set(shared.glob("belay-*")) if shared.is_dir() else set()
    yield
    for path in set(shared.glob("belay-*")) - before if shared.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)
