"""Integration fixtures: Belay's real servers started in-process over real gRPC on loopback,
serving the tiny real models of tests/tiny_models.py; plus an independent log-prob computation
the tests compare the services against."""

from __future__ import annotations

import contextlib
import pathlib

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from belay.v1 import belay_pb2_grpc
from services.common.config import BelayConfig
from services.common.models import load_causal_lm, load_tokenizer
from services.common.rpc import ServiceServer, channel
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.server import PolicyServicer
from services.policy.server import build_server as build_policy_server
from services.policy.swaps import SwapRequests
from services.reference.server import build_server as build_reference_server
from services.reward.server import build_server as build_reward_server

RPC_TIMEOUT = 60.0  # seconds; a deadline on every call so a hung server fails the test instead of the suite


def make_config(grpc_limits: dict | None = None, **sections: dict) -> BelayConfig:
    """A validated BelayConfig: every service on an ephemeral loopback port, CPU, no metrics port."""
    data: dict = {
        "grpc": {"workers": 2, "shutdown_grace_seconds": 0.5, **(grpc_limits or {})},
        "reference": {"address": "127.0.0.1:0", "device": "cpu", "metrics_port": 0},
        "reward": {"address": "127.0.0.1:0", "device": "cpu", "metrics_port": 0},
        "policy": {"address": "127.0.0.1:0", "device": "cpu", "metrics_port": 0, "run_actor": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return BelayConfig.model_validate(data)


class Running:
    """A started server and what the tests reach it through."""

    def __init__(self, config: BelayConfig, server: ServiceServer, servicer, stub_class):
        self.config = config
        self.server = server
        self.servicer = servicer
        self.address = server.address
        self.channel = channel(server.address, config.grpc)
        self.stub = stub_class(self.channel)


@contextlib.contextmanager
def serving(config: BelayConfig, server: ServiceServer, servicer, stub_class, load=None):
    """Start, load (reference/reward), mark SERVING, yield; stop the server and close the channel after."""
    server.start()
    running = None
    try:
        if load is not None:
            load()
        server.mark_serving()
        running = Running(config, server, servicer, stub_class)
        yield running
    finally:
        if running is not None:
            running.channel.close()
        server.stop()


@contextlib.contextmanager
def running_reference(config: BelayConfig):
    server, servicer = build_reference_server(config, CollectorRegistry())
    with serving(config, server, servicer, belay_pb2_grpc.ReferenceStub, servicer.load) as running:
        yield running


@contextlib.contextmanager
def running_reward(config: BelayConfig):
    server, servicer = build_reward_server(config, CollectorRegistry())
    with serving(config, server, servicer, belay_pb2_grpc.RewardStub, servicer.load) as running:
        yield running


def build_policy(config: BelayConfig) -> tuple[ServiceServer, PolicyServicer]:
    model_dir = config.policy.model_dir
    engine = PolicyEngine(
        load_causal_lm(model_dir, torch.device("cpu"), "policy.model_dir"),
        load_tokenizer(model_dir),
        config.grpc,
        kv_cache=config.policy.kv_cache,
    )
    servicer = PolicyServicer(config, engine, SwapRequests(), PolicyMetrics(CollectorRegistry()))
    return build_policy_server(config, servicer), servicer


@contextlib.contextmanager
def running_policy(config: BelayConfig):
    server, servicer = build_policy(config)
    with serving(config, server, servicer, belay_pb2_grpc.PolicyStub) as running:
        yield running


def load_lm(model_dir) -> torch.nn.Module:
    """The test's own copy of a causal LM, loaded straight through transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return model.eval()


def direct_logprobs(
    model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float = 1.0
) -> list[float]:
    """log p(response[i] | prompt + response[:i]) by one unpadded forward pass of a single row."""
    ids = torch.tensor([list(prompt) + list(response)], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature  # (T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    out = []
    for offset, token in enumerate(response):
        position = len(prompt) + offset - 1  # the position whose logits predict this token
        out.append(float(log_probs[position, token]))
    return out


def rpc_error(method, request) -> grpc.RpcError:
    """Call a unary method expecting it to fail; returns the error for the test to inspect."""
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=RPC_TIMEOUT)
    return caught.value


@pytest.fixture(scope="session")
def reference(tiny_lm_dir: pathlib.Path):
    """A reference server over tiny_lm_dir with max_batch_size 4."""
    config = make_config({"max_batch_size": 4}, reference={"model_dir": str(tiny_lm_dir)})
    with running_reference(config) as running:
        yield running
