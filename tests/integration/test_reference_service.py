"""The reference service over real gRPC: teacher-forced log-probs, Info, health, reflection, and
refusals of bad requests with the right status code while it keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.models import load_tokenizer, tokenizer_fingerprint
from services.common.packing import pack_int32, unpack_float32
from services.common.rpc import channel

from .conftest import RPC_TIMEOUT, direct_logprobs, load_lm, make_config, rpc_error, running_reference

PROMPTS = [[5, 17, 42, 9], [3], [100, 101, 102, 103, 104, 105, 106, 7]]
RESPONSES = [[8, 11], [60, 61, 62, 63, 64], [1]]


def logprobs_request(prompts, responses, temperature: float = 0.0) -> belay_pb2.LogProbsRequest:
    return belay_pb2.LogProbsRequest(
        prompt_ids=pack_int32(prompts), response_ids=pack_int32(responses), temperature=temperature
    )


def good_call_succeeds(stub) -> None:
    """The server still answers a valid request correctly-shaped."""
    reply = stub.LogProbs(logprobs_request([[5, 6]], [[7, 8, 9]]), timeout=RPC_TIMEOUT)
    rows = unpack_float32(reply.logprobs)
    assert [len(r) for r in rows] == [3]
    assert all(np.isfinite(r).all() and (r <= 0).all() for r in rows)


@pytest.fixture(scope="module")
def direct_model(tiny_lm_dir):
    return load_lm(tiny_lm_dir)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_logprobs_of_ragged_rows_equal_an_independent_forward_pass(reference, direct_model, temperature):
    reply = reference.stub.LogProbs(logprobs_request(PROMPTS, RESPONSES, temperature), timeout=RPC_TIMEOUT)
    rows = unpack_float32(reply.logprobs, "logprobs")
    assert len(rows) == len(PROMPTS)
    assert [len(row) for row in rows] == [len(r) for r in RESPONSES]
    assert reply.policy_version == 0
    effective = temperature or 1.0  # 0 means 1.0 on the wire
    for row, prompt, response in zip(rows, PROMPTS, RESPONSES):
        expected = direct_logprobs(direct_model, prompt, response, effective)
        np.testing.assert_allclose(row, expected, atol=1e-5, rtol=0)


def test_temperature_changes_the_logprobs(reference):
    cold = unpack_float32(
        reference.stub.LogProbs(logprobs_request(PROMPTS, RESPONSES, 0.7), timeout=RPC_TIMEOUT).logprobs
    )
    warm = unpack_float32(
        reference.stub.LogProbs(logprobs_request(PROMPTS, RESPONSES, 1.0), timeout=RPC_TIMEOUT).logprobs
    )
    assert any(np.abs(c - w).max() > 1e-3 for c, w in zip(cold, warm))


def test_info_reports_the_tokenizer_fingerprint_and_version_zero(reference, tiny_lm_dir):
    info = reference.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.service == "reference"
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(load_tokenizer(str(tiny_lm_dir)))
    assert len(info.tokenizer_fingerprint) == 64
    assert info.policy_version == 0
    assert info.model_id == str(tiny_lm_dir)
    assert info.model_revision


@pytest.mark.parametrize("service", ["", "belay.v1.Reference"])
def test_health_reports_serving(reference, service):
    health = health_pb2_grpc.HealthStub(reference.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(reference):
    health = health_pb2_grpc.HealthStub(reference.channel)
    error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="belay.v1.Nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_reference_service(reference):
    database = ProtoReflectionDescriptorDatabase(reference.channel)
    services = database.get_services()
    assert "belay.v1.Reference" in services
    assert "grpc.health.v1.Health" in services
    assert "belay.v1.Policy" not in services
    proto = database.FindFileContainingSymbol("belay.v1.Reference")
    reference_service = next(s for s in proto.service if s.name == "Reference")
    assert {m.name for m in reference_service.method} == {"LogProbs", "Info"}


def test_reference_model_is_frozen_and_in_eval_mode(reference):
    model = reference.servicer.loaded.model
    assert model.training is False
    assert all(not module.training for module in model.modules())
    assert all(not p.requires_grad for p in model.parameters())


# --- bad requests: the right code, a message naming the problem, and the server keeps serving ---


def test_empty_batch_is_invalid_argument(reference):
    error = rpc_error(reference.stub.LogProbs, logprobs_request([], []))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty batch" in error.details()
    good_call_succeeds(reference.stub)


def test_prompt_and_response_row_count_mismatch_is_invalid_argument(reference):
    error = rpc_error(reference.stub.LogProbs, logprobs_request([[1, 2], [3]], [[4]]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 rows" in error.details() and "1" in error.details()
    good_call_succeeds(reference.stub)


@pytest.mark.parametrize("where", ["prompt", "response"])
def test_token_id_at_or_past_the_vocabulary_is_invalid_argument(reference, where):
    vocab = reference.servicer.loaded.model.get_input_embeddings().num_embeddings
    prompts, responses = [[1, 2, 3]], [[4, 5]]
    (prompts if where == "prompt" else responses)[0][1] = vocab
    error = rpc_error(reference.stub.LogProbs, logprobs_request(prompts, responses))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"token id {vocab}" in error.details()
    assert f"{where}_ids" in error.details()
    good_call_succeeds(reference.stub)


def test_negative_token_id_is_invalid_argument(reference):
    error = rpc_error(reference.stub.LogProbs, logprobs_request([[1, -3, 2]], [[4]]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "-3" in error.details()
    good_call_succeeds(reference.stub)


@pytest.mark.parametrize("empty", ["prompt", "response"])
def test_empty_row_is_invalid_argument(reference, empty):
    prompts = [[1, 2], [] if empty == "prompt" else [3]]
    responses = [[4], [] if empty == "response" else [5]]
    error = rpc_error(reference.stub.LogProbs, logprobs_request(prompts, responses))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{empty}_ids row 1 is empty" in error.details()
    good_call_succeeds(reference.stub)


def test_row_longer_than_the_model_context_is_invalid_argument(reference):
    assert reference.servicer.loaded.model.config.max_position_embeddings == 256
    at_limit = reference.stub.LogProbs(logprobs_request([[7] * 200], [[8] * 56]), timeout=RPC_TIMEOUT)
    assert [len(r) for r in unpack_float32(at_limit.logprobs)] == [56]
    error = rpc_error(reference.stub.LogProbs, logprobs_request([[1, 2], [7] * 200], [[3], [8] * 57]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 1 has 257 tokens" in error.details() and "256" in error.details()
    good_call_succeeds(reference.stub)


def test_batch_over_max_batch_size_is_resource_exhausted(reference):
    assert reference.config.grpc.max_batch_size == 4
    error = rpc_error(reference.stub.LogProbs, logprobs_request([[1]] * 5, [[2]] * 5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_batch_size=4" in error.details()
    reply = reference.stub.LogProbs(logprobs_request([[1]] * 4, [[2]] * 4), timeout=RPC_TIMEOUT)
    assert len(unpack_float32(reply.logprobs)) == 4


def test_corrupt_packed_bytes_are_invalid_argument(reference):
    three_values = np.array([1, 2, 3], dtype="<i4").tobytes()
    bad_lengths = belay_pb2.LogProbsRequest(
        prompt_ids=belay_pb2.PackedInt32(data=three_values, lengths=[2]), response_ids=pack_int32([[4]])
    )
    error = rpc_error(reference.stub.LogProbs, bad_lengths)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_ids" in error.details() and "lengths add up to 2" in error.details()

    ragged_bytes = belay_pb2.LogProbsRequest(
        prompt_ids=pack_int32([[1]]), response_ids=belay_pb2.PackedInt32(data=b"\x01\x00\x00", lengths=[1])
    )
    error = rpc_error(reference.stub.LogProbs, ragged_bytes)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_ids" in error.details() and "3 bytes" in error.details()
    good_call_succeeds(reference.stub)


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), float("inf")])
def test_non_positive_or_non_finite_temperature_is_invalid_argument(reference, temperature):
    error = rpc_error(reference.stub.LogProbs, logprobs_request([[1, 2]], [[3]], temperature))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in error.details()
    good_call_succeeds(reference.stub)


def test_message_over_the_server_limit_is_resource_exhausted(tiny_lm_dir):
    config = make_config({"max_message_bytes": 1024 + 512}, reference={"model_dir": str(tiny_lm_dir)})
    with running_reference(config) as small:
        big_client = make_config({"max_message_bytes": 64 * 1024 * 1024}).grpc
        with channel(small.address, big_client) as chan:
            stub = belay_pb2_grpc.ReferenceStub(chan)
            oversized = logprobs_request([[5] * 400], [[6] * 100])  # 2000 bytes of ids
            assert oversized.ByteSize() > 1024 + 512
            error = rpc_error(stub.LogProbs, oversized)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            good_call_succeeds(stub)


def test_rows_split_across_several_forward_passes_give_the_same_logprobs(tiny_lm_dir, direct_model):
    """max_tokens_per_forward=16 forces these ragged rows into several chunks; the values must not move."""
    config = make_config({"max_batch_size": 8}, reference={"model_dir": str(tiny_lm_dir), "max_tokens_per_forward": 16})
    prompts = PROMPTS + [[9] * 20, [4, 4]]
    responses = RESPONSES + [[10, 11, 12], [13]]
    assert sum(len(p) + len(r) for p, r in zip(prompts, responses)) > 16
    with running_reference(config) as chunked:
        reply = chunked.stub.LogProbs(logprobs_request(prompts, responses, 0.7), timeout=RPC_TIMEOUT)
    rows = unpack_float32(reply.logprobs)
    assert [len(r) for r in rows] == [len(r) for r in responses]
    for row, prompt, response in zip(rows, prompts, responses):
        np.testing.assert_allclose(row, direct_logprobs(direct_model, prompt, response, 0.7), atol=1e-5, rtol=0)


def test_concurrent_logprobs_calls_each_get_their_own_answer(reference):
    requests = [([[5, 6 + i]], [[7, 8, 9 + i]]) for i in range(6)]
    alone = [
        unpack_float32(reference.stub.LogProbs(logprobs_request(p, r), timeout=RPC_TIMEOUT).logprobs)[0]
        for p, r in requests
    ]
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(
                lambda pr: unpack_float32(reference.stub.LogProbs(logprobs_request(*pr), timeout=RPC_TIMEOUT).logprobs)[
                    0
                ],
                requests,
            )
        )
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_an_out_of_memory_forward_is_resource_exhausted_naming_the_setting_and_the_next_call_runs(
    reference, monkeypatch
):
    """As on the H200, where a reference capped at 3.5 GiB failed every forward with an INTERNAL error."""
    decoder = reference.servicer.loaded.model.get_decoder()  # the forward the log-probs run
    real = decoder.forward

    def full_card(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 280.00 MiB.")

    monkeypatch.setattr(decoder, "forward", full_card)
    with pytest.raises(grpc.RpcError) as caught:
        reference.stub.LogProbs(logprobs_request(PROMPTS, RESPONSES), timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_tokens_per_forward" in caught.value.details() and "280.00 MiB" in caught.value.details()
    monkeypatch.setattr(decoder, "forward", real)
    good_call_succeeds(reference.stub)
