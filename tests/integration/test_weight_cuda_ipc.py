"""The cuda_ipc transport. Its CUDA part needs a GPU (the last test, skipped without one); all
around it runs here: the handle fields' round trip through the request without pickle, the
refusals when there is no CUDA device or the devices differ, and the bucket checks."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
import redis
import torch

from belay.v1 import belay_pb2
from services.common import cuda_ipc
from services.common.models import load_tokenizer, weights_fingerprint
from services.common.rollout_queue import RolloutQueue
from services.common.weight_buckets import bucket_layout, manifest_of, specs_to_messages
from services.policy import receiving
from services.policy.receiving import receive_ipc
from services.trainer.publishing import Publisher, make_transport

from ..conftest import free_port
from .conftest import RPC_TIMEOUT, make_config, running_policy
from .test_actor_swaps import REPO
from .test_policy_service import tiny_model

ARGS = (
    torch.Tensor,
    torch.Size([12]),
    (1,),
    0,
    torch.storage.TypedStorage,
    torch.bfloat16,
    0,
    b"\x01handle\x00",
    48,
    16,
    False,
    b"ref-counter",
    8,
    b"event",
    True,
)  # as reduce_tensor gives them for a flat buffer


def test_handle_fields_round_trip_through_the_request_and_the_classes_never_come_from_the_wire():
    message = belay_pb2.CudaIpcBuffer(**cuda_ipc.ipc_fields(ARGS, "GPU-1234"))
    request = belay_pb2.UpdateWeightsRequest(version=1, transport="cuda_ipc", ipc_buffers=[message])
    parsed = belay_pb2.UpdateWeightsRequest.FromString(request.SerializeToString()).ipc_buffers[0]
    assert parsed.device_uuid == "GPU-1234" and parsed.numel == 12 and parsed.dtype == "bfloat16"
    rebuilt = cuda_ipc.rebuild_args(parsed, device_index=3)
    assert rebuilt == (
        torch.Tensor,
        torch.Size([12]),
        (1,),
        0,
        torch.storage.TypedStorage,
        torch.bfloat16,
        3,
        b"\x01handle\x00",
        48,
        16,
        False,
        b"ref-counter",
        8,
        b"event",
        True,
    )
    with pytest.raises(ValueError, match="flat contiguous"):
        cuda_ipc.ipc_fields((ARGS[0], torch.Size([3, 4]), (4, 1), *ARGS[3:]), "GPU-1234")
    with pytest.raises(ValueError, match="not one a weight manifest may carry"):
        cuda_ipc.rebuild_args(belay_pb2.CudaIpcBuffer(numel=1, dtype="object"), 0)


def own_tensors(tiny_lm_dir):
    model = tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=4)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def ipc_request(tensors, buffers: int | None = None, bucket_bytes: int = 4096) -> belay_pb2.UpdateWeightsRequest:
    specs = manifest_of(tensors)
    layout = bucket_layout(specs, bucket_bytes)
    messages = [belay_pb2.CudaIpcBuffer(device_uuid="GPU-1234", numel=b.numel, dtype=b.dtype) for b in layout]
    return belay_pb2.UpdateWeightsRequest(
        version=1,
        transport="cuda_ipc",
        bucket_bytes=bucket_bytes,
        manifest=specs_to_messages(specs, belay_pb2.TensorSpec),
        ipc_buffers=messages[:buffers],
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_policy_without_cuda_refuses_ipc_handles_with_a_clear_error(tiny_lm_dir, tmp_path):
    config = make_config(policy={"model_dir": str(tiny_lm_dir)}, run={"checkpoint_dir": str(tmp_path)})
    with running_policy(config) as running:
        with pytest.raises(grpc.RpcError) as caught:
            running.stub.UpdateWeights(ipc_request(own_tensors(tiny_lm_dir)), timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cuda_ipc needs a CUDA device" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            running.stub.UpdateWeights(ipc_request(own_tensors(tiny_lm_dir), buffers=0), timeout=RPC_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ipc_buffers" in caught.value.details()
        assert running.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT).policy_version == 0


def test_buffers_on_another_gpu_and_misfitting_buckets_are_refused(tiny_lm_dir, monkeypatch):
    own = own_tensors(tiny_lm_dir)
    monkeypatch.setattr(receiving, "local_device_index", lambda uuid: 1)  # the trainer's GPU is this process's cuda:1
    with pytest.raises(receiving.RequestError, match="serves on cuda:0, the trainer's buffers are on cuda:1"):
        receive_ipc(ipc_request(own), own, torch.device("cuda:0"))
    with pytest.raises(receiving.RequestError, match="serves on cpu"):
        receive_ipc(ipc_request(own), own, torch.device("cpu"))
    monkeypatch.setattr(receiving, "local_device_index", lambda uuid: 0)
    with pytest.raises(receiving.RequestError, match="ipc_buffers for a layout of"):
        receive_ipc(ipc_request(own, buffers=1), own, torch.device("cuda:0"))
    wrong = dict(own, **{"model.norm.weight": torch.ones(7)})
    with pytest.raises(receiving.RequestError, match="model.norm.weight has shape"):
        receive_ipc(ipc_request(wrong), own, torch.device("cuda:0"))
    request = ipc_request(own)
    request.ipc_buffers[0].numel += 1
    with pytest.raises(receiving.RequestError, match="does not match its bucket"):
        receive_ipc(request, own, torch.device("cuda:0"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_trainer_without_cuda_refuses_the_cuda_ipc_transport_at_start(tiny_lm_dir, redis_url, tmp_path):
    config = make_config(redis={"url": redis_url}, trainer={"weight_transport": "cuda_ipc"})
    with pytest.raises(ValueError, match="needs the trainer on a CUDA device"):
        make_transport(config, tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (a trainer and a policy on it)")
def test_a_policy_on_the_trainers_gpu_serves_the_trainers_weights(tiny_lm_dir, redis_url, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.ipc_replica", str(tiny_lm_dir), address],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    config = make_config(
        redis={"url": redis_url},
        run={"checkpoint_dir": str(tmp_path)},
        trainer={"weight_transport": "cuda_ipc", "broadcast_bucket_mb": 0.02},
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    model = tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=4).cuda()
    publisher = Publisher(config, queue, None, make_transport(config, model))
    try:
        assert process.stdout.readline().strip() == "serving"
        queue.report_serving("gpu-replica", 0, address, "cuda_ipc")
        publisher.publish(1, model, 0, lambda action, what: action())
        from belay.v1.belay_pb2_grpc import PolicyStub
        from services.common.rpc import channel

        info = PolicyStub(channel(address, config.grpc)).Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
        assert (info.policy_version, info.model_revision) == (1, weights_fingerprint(model))
    finally:
        publisher.close(remove=True)
        process.kill()
        process.wait()
