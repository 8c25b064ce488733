"""The broadcast transport end to end: a real trainer-side Publisher, real policy gRPC servers on
loopback, a real redis-server for the announcement and the replica registry, real gloo groups.
Replicas swap at once (run_actor False), so what they serve can be checked right after a publish."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry
from torch.distributed import PrefixStore, TCPStore

from belay.v1 import belay_pb2
from belay.v1.belay_pb2_grpc import PolicyStub
from services.common.lora import adapter_tensors, lora_settings, wrap_with_lora
from services.common.models import load_causal_lm, load_tokenizer, weights_fingerprint
from services.common.rollout_queue import RolloutQueue
from services.common.weight_buckets import bucket_layout, manifest_of, specs_to_messages
from services.common.weight_groups import make_group, ready_key
from services.policy.actor import Actor
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.receiving import BroadcastReceiver, split_rendezvous
from services.policy.server import PolicyServicer
from services.policy.server import build_server as build_policy_server
from services.policy.swaps import SwapRequests
from services.trainer.publishing import Publisher, make_transport, serving_tensors
from services.trainer.trainer_metrics import TrainerMetrics

from ..conftest import free_port
from .conftest import RPC_TIMEOUT, make_config, running_policy, serving
from .test_actor_swaps import REPO
from .test_policy_service import tiny_model
from .test_trainer_queue import make_trainer

TIMEOUT = 3.0  # seconds: broadcast_timeout_seconds in these tests


def settings(tiny_lm_dir, redis_url, tmp_path, **trainer):
    return dict(
        run={"checkpoint_dir": str(tmp_path / "ckpt")},
        redis={"url": redis_url},
        trainer={
            "weight_transport": "broadcast",
            "broadcast_address": "127.0.0.1:0",
            "broadcast_bucket_mb": 0.02,
            "broadcast_timeout_seconds": TIMEOUT,
            **trainer,
        },
        policy={"model_dir": str(tiny_lm_dir)},
    )


@contextlib.contextmanager
def replica(tiny_lm_dir, redis_url, tmp_path, queue: RolloutQueue, name: str, version: int = 0):
    """A policy server on its own port, registered as its actor would register it."""
    config = make_config(**settings(tiny_lm_dir, redis_url, tmp_path))
    config.policy.address = f"127.0.0.1:{free_port()}"
    with running_policy(config) as running:
        queue.report_serving(name, version, running.address, "broadcast")
        yield running


def served(running) -> tuple[int, str]:
    info = running.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    return info.policy_version, info.model_revision


def immediately(action, what):
    return action()


@pytest.fixture
def trainer_side(tiny_lm_dir, redis_url, tmp_path):
    """(publisher, queue, model): the trainer's model is another tiny Llama of the same shape."""
    config = make_config(**settings(tiny_lm_dir, redis_url, tmp_path))
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    model = tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=4)
    publisher = Publisher(config, queue, None, make_transport(config, model))
    yield publisher, queue, model
    publisher.close(remove=True)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """What an update does, as far as publishing cares: every weight changes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)


def test_two_replicas_receive_the_same_broadcast_and_serve_the_trainers_weights(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, queue, model = trainer_side
    with (
        replica(tiny_lm_dir, redis_url, tmp_path, queue, "a") as first,
        replica(tiny_lm_dir, redis_url, tmp_path, queue, "b") as second,
    ):
        for version in (1, 2):  # the second reuses both groups
            if version == 2:
                perturb(model, seed=7)
            publication = publisher.publish(version, model, 0, immediately)
            assert publication.transport == "broadcast" and publication.location == ""
            assert (
                publication.bytes
                == sum(t.numel() * 4 for t in model.state_dict().values()) - model.lm_head.weight.numel() * 4
            )  # tied to the embeddings: sent once
            assert served(first) == served(second) == (version, weights_fingerprint(model))
            assert queue.latest_publication() == {"version": version, "path": "", "transport": "broadcast"}
        assert len(publisher.transport.groups) == 2


def test_a_replica_that_registers_late_catches_up_without_waiting_for_an_update(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, queue, model = trainer_side
    with replica(tiny_lm_dir, redis_url, tmp_path, queue, "early") as early:
        publisher.publish(1, model, 0, immediately)
        assert publisher.catch_up(1, model) == []  # nobody lags
        with replica(tiny_lm_dir, redis_url, tmp_path, queue, "late") as late:
            assert served(late)[0] == 0
            publisher.transport.last_catch_up = 0.0  # catch_up reads the registry at most once a second
            assert publisher.catch_up(1, model) == ["late"]
            assert served(late) == served(early) == (1, weights_fingerprint(model))
            publisher.transport.last_catch_up = 0.0
            assert publisher.catch_up(1, model) == []  # sent once, even before its actor reports it


class StuckReceiver(BroadcastReceiver):
    """Joins the group, then never receives: a replica that dies mid-receive without closing its socket."""

    def receive(self, request, own):
        host, port = split_rendezvous(request.rendezvous)
        self.store = PrefixStore(request.group_key, TCPStore(host, port, is_master=False))
        self.store.set(ready_key(request.version), b"1")
        self.group = make_group(self.store, 1, 2, "gloo", 60)
        threading.Event().wait(4 * TIMEOUT)
        raise RuntimeError("never")


def test_a_replica_stuck_mid_receive_costs_the_others_no_more_than_the_timeout(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, queue, model = trainer_side
    with (
        replica(tiny_lm_dir, redis_url, tmp_path, queue, "healthy") as healthy,
        replica(tiny_lm_dir, redis_url, tmp_path, queue, "stuck") as stuck,
    ):
        stuck.servicer.receiver = StuckReceiver(torch.device("cpu"), TIMEOUT)
        started = time.monotonic()
        publisher.publish(1, model, 0, immediately)
        seconds = time.monotonic() - started
        assert TIMEOUT * 0.8 < seconds < TIMEOUT * 3  # one op's timeout, not the stuck replica's whole budget
        assert served(healthy) == (1, weights_fingerprint(model))
        assert served(stuck)[0] == 0
        assert publisher.transport.groups["stuck"].group is None  # rebuilt under a fresh key next time
        perturb(model, seed=8)
        stuck.servicer.receiver = BroadcastReceiver(torch.device("cpu"), TIMEOUT)  # it recovers
        publisher.publish(2, model, 0, immediately)  # the trainer keeps publishing
        assert served(healthy) == served(stuck) == (2, weights_fingerprint(model))


def test_a_dead_replica_is_dropped_at_once_and_the_trainer_keeps_publishing(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, queue, model = trainer_side
    registry = CollectorRegistry()
    TrainerMetrics(registry).watch_transport(publisher.transport)
    drops = lambda: registry.get_sample_value("belay_trainer_replica_drops_total", {"transport": "broadcast"})  # noqa: E731
    with replica(tiny_lm_dir, redis_url, tmp_path, queue, "alive") as alive:
        queue.report_serving("gone", 0, f"127.0.0.1:{free_port()}", "broadcast")  # registered, then died
        assert drops() == 0
        for version in (1, 2):
            started = time.monotonic()
            publisher.publish(version, model, 0, immediately)
            assert time.monotonic() - started < TIMEOUT
            assert served(alive)[0] == version
            assert drops() == version  # the dead replica, once per version; never the live one
        publisher.transport.last_catch_up = 0.0
        assert publisher.catch_up(2, model) == []  # just failed: not tried again at once


def test_a_manifest_that_misfits_is_refused_and_the_old_weights_keep_serving(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, queue, _ = trainer_side
    with replica(tiny_lm_dir, redis_url, tmp_path, queue, "a") as running:
        before = served(running)
        wrong = tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=3, hidden_size=64, intermediate_size=128)
        request = belay_pb2.UpdateWeightsRequest(
            version=1,
            transport="broadcast",
            rendezvous=publisher.transport.rendezvous,
            group_key="k" * 32,
            new_group=True,
            rank=1,
            world_size=2,
            bucket_bytes=1 << 20,
            manifest=specs_to_messages(manifest_of(dict(wrong.state_dict())), belay_pb2.TensorSpec),
        )
        with pytest.raises(grpc.RpcError) as caught:
            running.stub.UpdateWeights(request, timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model.embed_tokens.weight has shape" in caught.value.details()
        assert "old weights keep serving" in caught.value.details()
        started = time.monotonic()  # through the trainer: refused before joining, so no wait for the timeout
        publisher.publish(1, wrong, 0, immediately)
        assert time.monotonic() - started < TIMEOUT
        assert served(running) == before


def test_malformed_broadcast_requests_are_invalid(tiny_lm_dir, redis_url, tmp_path):
    config = make_config(**settings(tiny_lm_dir, redis_url, tmp_path))
    with running_policy(config) as running:
        own = running.servicer.engine.swappable_tensors()
        good = specs_to_messages(
            manifest_of({k: v for k, v in own.items() if k != "lm_head.weight"}), belay_pb2.TensorSpec
        )
        base = dict(
            version=1,
            transport="broadcast",
            rendezvous="127.0.0.1:1",
            group_key="k",
            new_group=True,
            rank=1,
            world_size=2,
            bucket_bytes=1024,
            manifest=good,
        )
        for change, says in [
            ({"rank": 0}, "rank 0 of 2"),
            ({"group_key": ""}, "group_key"),
            ({"rendezvous": "nowhere"}, "host:port"),
            ({"bucket_bytes": 0}, "bucket_bytes"),
            ({"transport": "pigeon"}, "none of file"),
            ({"backend": "mpi"}, "neither gloo"),
            ({"manifest": good + good[:1]}, "twice"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                running.stub.UpdateWeights(belay_pb2.UpdateWeightsRequest(**{**base, **change}), timeout=RPC_TIMEOUT)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, change
            assert says in caught.value.details(), (change, caught.value.details())
        assert served(running)[0] == 0


def test_under_lora_only_adapter_tensors_travel_and_the_replica_serves_the_trainers_adapters(
    tiny_lm_dir, redis_url, tmp_path
):
    lora = {"enabled": True, "r": 4, "alpha": 8}
    config = make_config(**settings(tiny_lm_dir, redis_url, tmp_path), lora=lora)
    config.policy.address = f"127.0.0.1:{free_port()}"
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)

    def lora_lm():
        base = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy")
        return wrap_with_lora(base, lora_settings(config.lora))

    engine = PolicyEngine(lora_lm(), load_tokenizer(str(tiny_lm_dir)), config.grpc)
    servicer = PolicyServicer(config, engine, SwapRequests(), PolicyMetrics(CollectorRegistry()))
    model = lora_lm()
    perturb(model, seed=9)  # the base is frozen in training; here every weight moves, and only adapters may travel
    publisher = Publisher(config, queue, None, make_transport(config, model))
    try:
        with serving(config, build_policy_server(config, servicer), servicer, PolicyStub) as running:
            queue.report_serving("a", 0, running.address, "broadcast")
            publication = publisher.publish(1, model, 0, immediately)
            adapters = adapter_tensors(model)
            assert publication.bytes == sum(t.numel() * 4 for t in adapters.values())
            assert served(running)[0] == 1
            for name, tensor in engine.swappable_tensors().items():
                assert torch.equal(tensor, adapters[name]), name
            fresh = lora_lm().state_dict()  # the base weights did not move
            for name, tensor in engine.loaded.model.state_dict().items():
                assert "lora_" in name or torch.equal(tensor, fresh[name]), name
    finally:
        publisher.close(remove=True)


def test_the_actor_swaps_to_staged_weights_and_never_loads_a_path_for_a_broadcast(tiny_lm_dir, redis_url, tmp_path):
    config = make_config(**settings(tiny_lm_dir, redis_url, tmp_path))
    config.policy.prompts_file = str(REPO / "prompts/default.txt")
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    swaps, metrics = SwapRequests(), PolicyMetrics(CollectorRegistry())
    actor = Actor(config, engine, queue, None, None, swaps, metrics)
    queue.publish_version(1, "", "broadcast")  # announced; the weights arrive through the group
    actor.take_new_weights()
    assert engine.version == 0 and metrics.batch_failures.labels(reason="swap")._value.get() == 0
    model = tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=4)
    swaps.offer(1, {k: v.clone() for k, v in serving_tensors(model, lora=False).items()})  # what receive() stages
    actor.take_new_weights()
    assert engine.version == 1 and engine.loaded.revision == weights_fingerprint(model)
    record = queue.replicas()[actor.replica]
    assert record["version"] == 1 and record["transport"] == "broadcast"


def test_a_replica_killed_mid_receive_does_not_stall_the_other_and_publishing_goes_on(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, queue, model = trainer_side
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.broadcast_replica", str(tiny_lm_dir), address, "1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "serving"
        with replica(tiny_lm_dir, redis_url, tmp_path, queue, "healthy") as healthy:
            queue.report_serving("doomed", 0, address, "broadcast")
            started = time.monotonic()
            publisher.publish(1, model, 0, immediately)
            assert time.monotonic() - started < 2 * TIMEOUT
            assert process.wait(RPC_TIMEOUT) == -signal.SIGKILL  # it died after its first bucket
            assert len(bucket_layout(manifest_of(serving_tensors(model, False)), publisher.transport.bucket_bytes)) > 2
            assert served(healthy) == (1, weights_fingerprint(model))
            perturb(model, seed=10)
            publisher.publish(2, model, 0, immediately)
            assert served(healthy) == (2, weights_fingerprint(model))
    finally:
        process.kill()
        process.wait()


def test_the_trainer_catches_a_late_replica_up_while_it_waits_for_rollouts(tiny_lm_dir, redis_url, tmp_path):
    trainer = make_trainer(
        tiny_lm_dir,
        redis_url,
        tmp_path,
        weight_transport="broadcast",
        broadcast_address="127.0.0.1:0",
        broadcast_timeout_seconds=TIMEOUT,
    )
    queue = trainer.queue
    queue.ensure_group()
    perturb(trainer.model, seed=11)
    trainer.version = 1  # as published: between updates the model is the latest published version
    try:
        with replica(tiny_lm_dir, redis_url, tmp_path, queue, "late") as late:
            stop = threading.Event()
            threading.Timer(1.5, stop.set).start()
            assert trainer.collect(stop) == []  # no rollouts: it only waited, and caught the replica up meanwhile
            assert served(late) == (1, weights_fingerprint(trainer.model))
    finally:
        trainer.publisher.close(remove=True)


def test_beyond_loopback_only_a_token_holder_can_make_a_replica_join(trainer_side, tiny_lm_dir, redis_url, tmp_path):
    publisher, queue, model = trainer_side
    token = tmp_path / "token"
    token.write_text("weights-token\n")
    token.chmod(0o600)
    manifest = specs_to_messages(manifest_of(serving_tensors(model, False)), belay_pb2.TensorSpec)
    request = belay_pb2.UpdateWeightsRequest(
        version=1,
        transport="broadcast",
        rendezvous=publisher.transport.rendezvous,
        group_key="intruder-key",
        new_group=True,
        rank=1,
        world_size=2,
        bucket_bytes=1 << 20,
        manifest=manifest,
    )
    for auth_token_file, refused in [
        ("", grpc.StatusCode.PERMISSION_DENIED),
        (str(token), grpc.StatusCode.UNAUTHENTICATED),
    ]:
        config = make_config(
            grpc_limits={"auth_token_file": auth_token_file}, **settings(tiny_lm_dir, redis_url, tmp_path)
        )
        config.policy.address = "0.0.0.0:0"
        with running_policy(config) as running:
            with grpc.insecure_channel(f"127.0.0.1:{running.server.port}") as bare:  # no token
                with pytest.raises(grpc.RpcError) as caught:
                    PolicyStub(bare).UpdateWeights(request, timeout=RPC_TIMEOUT)
                assert caught.value.code() == refused
            assert not publisher.transport.store.check([f"intruder-key/{ready_key(1)}"])  # never joined
            if auth_token_file:  # the trainer holds the token: its broadcast goes through
                publisher.transport.config = config  # the trainer's grpc section: the same token file
                queue.report_serving("remote", 0, f"127.0.0.1:{running.server.port}", "broadcast")
                publisher.publish(1, model, 0, immediately)
                assert served(running) == (1, weights_fingerprint(model))


def test_a_taken_store_port_stops_the_trainer_at_start_naming_the_setting(
    trainer_side, tiny_lm_dir, redis_url, tmp_path
):
    publisher, _, model = trainer_side
    taken = publisher.transport.rendezvous
    config = make_config(**settings(tiny_lm_dir, redis_url, tmp_path, broadcast_address=taken))
    with pytest.raises(RuntimeError, match="trainer.broadcast_address"):
        make_transport(config, model)
