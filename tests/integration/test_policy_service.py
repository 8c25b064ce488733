"""The policy service over real gRPC: sampling limits, EOS handling, behaviour log-probs, seeds,
refusals of bad requests, and hot-swapping weights through UpdateWeights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from belay.v1 import belay_pb2
from services.common.checkpoints import write_checkpoint
from services.common.models import load_tokenizer, weights_fingerprint
from services.common.packing import pack_int32, unpack_float32, unpack_int32
from services.policy.paged_sampling import paged_unavailable
from tests.tiny_models import llama_config

from .conftest import RPC_TIMEOUT, direct_logprobs, load_lm, make_config, rpc_error, running_policy

PROMPTS = ["How are you feeling today?", "Describe a walk in the park.", "Hi"]


def generate(stub, prompts=PROMPTS, samples=1, **sampling) -> belay_pb2.GenerateResponse:
    request = belay_pb2.GenerateRequest(
        prompts=prompts, samples_per_prompt=samples, sampling=belay_pb2.SamplingParams(**sampling)
    )
    return stub.Generate(request, timeout=RPC_TIMEOUT)


def rows_of(reply):
    """(prompt rows, response rows) as lists of ids, and the behaviour log-prob rows."""
    return (
        [r.tolist() for r in unpack_int32(reply.prompt_ids)],
        [r.tolist() for r in unpack_int32(reply.response_ids)],
        unpack_float32(reply.logprobs),
    )


def policy_logprobs(stub, prompts, responses, temperature=1.0):
    request = belay_pb2.LogProbsRequest(
        prompt_ids=pack_int32(prompts), response_ids=pack_int32(responses), temperature=temperature
    )
    return unpack_float32(stub.LogProbs(request, timeout=RPC_TIMEOUT).logprobs)


def policy_config(model_dir, checkpoint_dir, kv_cache="dynamic", **grpc_limits):
    return make_config(
        {"max_batch_size": 9, **grpc_limits},
        policy={"model_dir": str(model_dir), "run_actor": False, "kv_cache": kv_cache},
        run={"checkpoint_dir": str(checkpoint_dir)},
    )


@pytest.fixture(scope="module")
def policy(tiny_lm_dir, tmp_path_factory):
    with running_policy(policy_config(tiny_lm_dir, tmp_path_factory.mktemp("ckpt"))) as running:
        yield running


@pytest.fixture(scope="module")
def static_policy(tiny_lm_dir, tmp_path_factory):
    """The same policy sampling with policy.kv_cache: static."""
    with running_policy(policy_config(tiny_lm_dir, tmp_path_factory.mktemp("ckpt_static"), "static")) as running:
        yield running


@pytest.fixture(scope="module")
def paged_policy(tiny_lm_dir, tmp_path_factory):
    """The same policy sampling with policy.kv_cache: paged (transformers 5 only: make test-transformers5)."""
    if paged_unavailable():
        pytest.skip("continuous batching needs transformers 5")
    with running_policy(policy_config(tiny_lm_dir, tmp_path_factory.mktemp("ckpt_paged"), "paged")) as running:
        yield running


@pytest.fixture(scope="module")
def eos_policy(eager_eos_lm_dir, tmp_path_factory):
    with running_policy(policy_config(eager_eos_lm_dir, tmp_path_factory.mktemp("ckpt_eos"))) as running:
        yield running


@pytest.fixture(scope="module")
def direct_model(tiny_lm_dir):
    return load_lm(tiny_lm_dir)


# --- Generate ---


def test_responses_never_exceed_max_new_tokens_and_unfinished_ones_say_length(policy):
    eos = policy.servicer.engine.tokenizer.eos_token_id
    reply = generate(policy.stub, samples=2, temperature=1.0, max_new_tokens=6, seed=11)
    _, responses, logprobs = rows_of(reply)
    assert len(responses) == len(PROMPTS) * 2
    assert len(reply.finish_reasons) == len(responses) == len(reply.response_texts)
    assert any(len(r) == 6 for r in responses)
    for response, reason, row_logprobs in zip(responses, reply.finish_reasons, logprobs):
        assert 1 <= len(response) <= 6
        assert len(row_logprobs) == len(response)
        if eos in response:
            assert response.index(eos) == len(response) - 1
            assert reason == belay_pb2.FINISH_REASON_EOS
        else:
            assert len(response) == 6
            assert reason == belay_pb2.FINISH_REASON_LENGTH


def test_greedy_generation_stops_at_the_first_eos(eos_policy):
    eos = eos_policy.servicer.engine.tokenizer.eos_token_id
    reply = generate(eos_policy.stub, samples=2, temperature=0.0, max_new_tokens=8)
    _, responses, _ = rows_of(reply)
    assert len(responses) == len(PROMPTS) * 2
    for response, reason in zip(responses, reply.finish_reasons):
        assert response, "a response holds at least the EOS token"
        assert response[-1] == eos
        assert eos not in response[:-1]
        assert reason == belay_pb2.FINISH_REASON_EOS
    assert all(text == "" for text in reply.response_texts)  # only EOS, a special token, was said


def test_samples_per_prompt_gives_that_many_rows_per_prompt_in_order(policy):
    tokenizer = policy.servicer.engine.tokenizer
    reply = generate(policy.stub, samples=3, temperature=1.0, max_new_tokens=4, seed=3)
    prompts, responses, _ = rows_of(reply)
    assert list(reply.prompt_index) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(prompts) == len(responses) == 9
    for row, index in enumerate(reply.prompt_index):
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[index]}], add_generation_prompt=True, return_dict=True
        )
        assert prompts[row] == list(expected["input_ids"])
        assert reply.response_texts[row] == tokenizer.decode(responses[row], skip_special_tokens=True)
    assert reply.policy_version == 0


@pytest.mark.parametrize(
    "served_by, kv_cache", [("policy", "dynamic"), ("static_policy", "static"), ("paged_policy", "paged")]
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_the_logprobs_rpc_and_a_direct_forward_pass(
    request, served_by, kv_cache, direct_model, temperature
):
    policy = request.getfixturevalue(served_by)
    assert policy.servicer.engine.sampling_cache.kind == kv_cache
    reply = generate(policy.stub, samples=2, temperature=temperature, top_p=0.9, max_new_tokens=6, seed=5)
    prompts, responses, behaviour = rows_of(reply)
    served = policy_logprobs(policy.stub, prompts, responses, temperature)
    assert len(served) == len(behaviour) == len(responses)
    for b, s, prompt, response in zip(behaviour, served, prompts, responses):
        assert len(b) == len(response)
        np.testing.assert_allclose(b, s, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b, direct_logprobs(direct_model, prompt, response, temperature), atol=1e-5, rtol=0)


def test_greedy_behaviour_logprobs_are_at_temperature_one(eos_policy, eager_eos_lm_dir):
    reply = generate(eos_policy.stub, prompts=["Hi"], temperature=0.0, max_new_tokens=4)
    prompts, responses, behaviour = rows_of(reply)
    expected = direct_logprobs(load_lm(eager_eos_lm_dir), prompts[0], responses[0], 1.0)
    np.testing.assert_allclose(behaviour[0], expected, atol=1e-5, rtol=0)


def test_a_fixed_seed_reproduces_the_samples_and_another_seed_does_not(policy):
    first = generate(policy.stub, samples=2, temperature=1.0, max_new_tokens=8, seed=1234)
    again = generate(policy.stub, samples=2, temperature=1.0, max_new_tokens=8, seed=1234)
    other = generate(policy.stub, samples=2, temperature=1.0, max_new_tokens=8, seed=4321)
    assert rows_of(first)[1] == rows_of(again)[1]
    assert list(first.response_texts) == list(again.response_texts)
    for a, b in zip(rows_of(first)[2], rows_of(again)[2]):
        np.testing.assert_array_equal(a, b)
    assert rows_of(first)[1] != rows_of(other)[1]


def still_generates(stub) -> None:
    reply = generate(stub, prompts=["Hi"], temperature=1.0, max_new_tokens=2, seed=0)
    assert len(rows_of(reply)[1]) == 1


@pytest.mark.parametrize(
    "prompts, samples, sampling, code, words",
    [
        ([], 1, {}, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
        (["Hi"], 1, {"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (["Hi"], 1, {"temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (["Hi"], 1, {"temperature": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (
            ["Hi", "Hello"],
            5,
            {},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "10 rows (prompts x samples_per_prompt) exceed max_batch_size=9",
        ),
        (["Hi"], 1, {"max_new_tokens": 250}, grpc.StatusCode.INVALID_ARGUMENT, "limit of 256"),
    ],
    ids=[
        "no-prompts",
        "top-p-over-one",
        "negative-temperature",
        "nan-temperature",
        "rows-over-batch-limit",
        "past-context",
    ],
)
def test_bad_generate_requests_are_refused_and_the_server_keeps_serving(
    policy, prompts, samples, sampling, code, words
):
    request = belay_pb2.GenerateRequest(
        prompts=prompts, samples_per_prompt=samples, sampling=belay_pb2.SamplingParams(**sampling)
    )
    error = rpc_error(policy.stub.Generate, request)
    assert error.code() == code
    assert words in error.details()
    still_generates(policy.stub)


def test_generation_right_at_the_context_limit_is_allowed(policy):
    tokenizer = policy.servicer.engine.tokenizer
    chat = [{"role": "user", "content": "Hi"}]
    prompt_length = len(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])
    reply = generate(policy.stub, prompts=["Hi"], temperature=1.0, max_new_tokens=256 - prompt_length, seed=0)
    assert len(rows_of(reply)[1][0]) <= 256 - prompt_length


# --- UpdateWeights ---


def tiny_model(tokenizer, seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tokenizer, **overrides)).eval()


def commit(checkpoint_dir, version: int, model):
    return write_checkpoint(checkpoint_dir, version, lambda d: model.save_pretrained(d, safe_serialization=True))


PROBE_PROMPTS = [[5, 17, 42, 9], [3, 4]]
PROBE_RESPONSES = [[8, 11, 12], [60]]


@pytest.fixture
def fresh_policy(tiny_lm_dir, tmp_path):
    """A policy of its own (its weights change), checkpoints under tmp_path/ckpt."""
    with running_policy(policy_config(tiny_lm_dir, tmp_path / "ckpt")) as running:
        yield running


def test_update_weights_swaps_to_the_committed_checkpoint(fresh_policy, tiny_lm_dir):
    before = policy_logprobs(fresh_policy.stub, PROBE_PROMPTS, PROBE_RESPONSES)
    new_model = tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=99)
    path = commit(fresh_policy.config.run.checkpoint_dir, 1, new_model)

    reply = fresh_policy.stub.UpdateWeights(
        belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path=str(path)), timeout=RPC_TIMEOUT
    )
    assert reply.current_version == 1
    info = fresh_policy.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.policy_version == 1
    assert info.model_revision == weights_fingerprint(new_model)

    after = policy_logprobs(fresh_policy.stub, PROBE_PROMPTS, PROBE_RESPONSES)
    for row, prompt, response in zip(after, PROBE_PROMPTS, PROBE_RESPONSES):
        np.testing.assert_allclose(row, direct_logprobs(new_model, prompt, response), atol=1e-5, rtol=0)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(after, before))
    reply = generate(fresh_policy.stub, prompts=["Hi"], temperature=1.0, max_new_tokens=2, seed=0)
    assert reply.policy_version == 1

    # asking again for the version already serving changes nothing
    again = fresh_policy.stub.UpdateWeights(
        belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path=str(path)), timeout=RPC_TIMEOUT
    )
    assert again.current_version == 1


def test_update_weights_refuses_a_path_outside_the_checkpoint_dir(fresh_policy, tiny_lm_dir, tmp_path):
    before = policy_logprobs(fresh_policy.stub, PROBE_PROMPTS, PROBE_RESPONSES)
    outside = commit(tmp_path / "elsewhere", 1, tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=99))
    error = rpc_error(
        fresh_policy.stub.UpdateWeights, belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path=str(outside))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not inside the policy's checkpoint directory" in error.details()
    sneaky = f"{fresh_policy.config.run.checkpoint_dir}/../elsewhere/v000001"
    error = rpc_error(
        fresh_policy.stub.UpdateWeights, belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path=sneaky)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fresh_policy.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT).policy_version == 0
    after = policy_logprobs(fresh_policy.stub, PROBE_PROMPTS, PROBE_RESPONSES)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def test_update_weights_refuses_a_directory_of_another_version(fresh_policy, tiny_lm_dir):
    path = commit(fresh_policy.config.run.checkpoint_dir, 1, tiny_model(load_tokenizer(str(tiny_lm_dir)), seed=99))
    error = rpc_error(
        fresh_policy.stub.UpdateWeights, belay_pb2.UpdateWeightsRequest(version=2, checkpoint_path=str(path))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version 2" in error.details()
    assert fresh_policy.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT).policy_version == 0


def test_a_checkpoint_of_the_wrong_shape_is_refused_and_the_old_weights_keep_serving(fresh_policy, tiny_lm_dir):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    good = tiny_model(tokenizer, seed=99)
    root = fresh_policy.config.run.checkpoint_dir
    v1 = commit(root, 1, good)
    fresh_policy.stub.UpdateWeights(
        belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path=str(v1)), timeout=RPC_TIMEOUT
    )
    serving = policy_logprobs(fresh_policy.stub, PROBE_PROMPTS, PROBE_RESPONSES)
    revision = fresh_policy.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT).model_revision

    v2 = commit(root, 2, tiny_model(tokenizer, seed=7, hidden_size=64, intermediate_size=128))
    error = rpc_error(
        fresh_policy.stub.UpdateWeights, belay_pb2.UpdateWeightsRequest(version=2, checkpoint_path=str(v2))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "v000002" in error.details()
    assert "embed_tokens.weight has shape" in error.details() and "the model expects" in error.details()

    info = fresh_policy.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.policy_version == 1
    assert info.model_revision == revision
    after = policy_logprobs(fresh_policy.stub, PROBE_PROMPTS, PROBE_RESPONSES)
    for row, kept, prompt, response in zip(after, serving, PROBE_PROMPTS, PROBE_RESPONSES):
        np.testing.assert_array_equal(row, kept)
        np.testing.assert_allclose(row, direct_logprobs(good, prompt, response), atol=1e-5, rtol=0)


def test_a_swap_during_generation_never_mixes_weights_within_a_batch(tiny_lm_dir, tmp_path):
    """Generate calls racing an UpdateWeights: each batch's behaviour log-probs are exactly those of
    the one version it reports, old or new."""
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    new_model = tiny_model(tokenizer, seed=99)
    models = {0: load_lm(tiny_lm_dir), 1: new_model}
    with running_policy(policy_config(tiny_lm_dir, tmp_path / "ckpt", workers=4)) as running:
        path = commit(running.config.run.checkpoint_dir, 1, new_model)

        def one_batch(seed):
            return generate(
                running.stub,
                prompts=["Hi", "Describe a walk in the park."],
                temperature=1.0,
                max_new_tokens=12,
                seed=seed,
            )

        with ThreadPoolExecutor(4) as pool:
            batches = [pool.submit(one_batch, seed) for seed in range(3)]
            swap = pool.submit(
                running.stub.UpdateWeights,
                belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path=str(path)),
                timeout=RPC_TIMEOUT,
            )
            batches.append(pool.submit(one_batch, 3))
            replies = [b.result() for b in batches]
            assert swap.result().current_version == 1
        for reply in replies:
            prompts, responses, behaviour = rows_of(reply)
            model = models[reply.policy_version]
            for b, prompt, response in zip(behaviour, prompts, responses):
                np.testing.assert_allclose(b, direct_logprobs(model, prompt, response), atol=1e-5, rtol=0)
        assert one_batch(9).policy_version == 1
