"""Hypothesis fuzzing of every request message against Belay's real servers over real gRPC on
loopback (the tiny models of tests/tiny_models.py): packed arrays with random bytes and lengths
(negative, huge, mismatched), random token ids, temperatures (nan, inf, negative, subnormal), top_k,
top_p, max_new_tokens, seeds, empty and huge string lists, UpdateWeights versions and paths, and
authorization headers.

Every reply must be OK or one of the documented refusals, never INTERNAL or UNKNOWN, never a hang
(each call has a deadline), and each server must still answer a good request afterwards.
Examples are derandomized so the suite is reproducible; BELAY_FUZZ_EXAMPLES=500 explores further,
with fresh random examples. The @example cases are what earlier fuzzing found (see each).
"""

from __future__ import annotations

import math
import os
import struct
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.checkpoints import write_checkpoint
from services.common.packing import pack_int32, unpack_float32, unpack_int32

from .conftest import make_config, running_policy, running_reference, running_reward

DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
CALL_DEADLINE = 30.0  # seconds; a call past it is a hang, and fails the example as DEADLINE_EXCEEDED
MAX_MESSAGE = 256 * 1024  # the servers' message limit here, so huge payloads are cheap to send
VOCAB = 320  # tests/tiny_models.py's tokenizer
MAX_TEXT = 4096  # the servers' max_text_chars here (VADER is quadratic: its time stays small under it)
LIMITS = {"max_batch_size": 4, "max_message_bytes": MAX_MESSAGE, "max_text_chars": MAX_TEXT}
FUZZ = settings(
    max_examples=int(os.environ.get("BELAY_FUZZ_EXAMPLES", "50")),
    deadline=None,
    derandomize="BELAY_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
FLOAT32 = st.floats(width=32)  # nan, ±inf, ±0, subnormals, huge: all of them
TEMPERATURE = st.one_of(FLOAT32, st.sampled_from([0.0, -0.0, 1.0, 0.7, 1e-45, 1e-38, 1e-8, 1e-3, 3.4e38]))


def call(method, request, **kwargs):
    """(code, reply); fails the example on an undocumented code, DEADLINE_EXCEEDED (a hang) included."""
    try:
        return grpc.StatusCode.OK, method(request, timeout=CALL_DEADLINE, **kwargs)
    except grpc.RpcError as error:
        assert error.code() in DOCUMENTED, f"{error.code().name}: {error.details()}\nrequest: {str(request)[:2000]}"
        assert error.details(), "a refusal says why"
        # a reply whose status message is too long for the client's metadata limit arrives as this,
        # hiding the real status: messages must stay short
        assert "metadata size exceeds" not in error.details(), error.details()
        return error.code(), None


# --- strategies ---


def mutated(draw, packed: belay_pb2.PackedInt32) -> belay_pb2.PackedInt32:
    """The packed rows, or (less often) with one thing wrong: lengths added, dropped, negative or
    moved between rows, or bytes cut off."""
    lengths, data = list(packed.lengths), packed.data
    mutation = draw(st.sampled_from(["none"] * 6 + ["extra", "drop", "negate", "shift", "trim-bytes", "huge"]))
    if mutation == "extra":
        lengths.append(draw(st.one_of(st.integers(0, 3), INT32)))
    elif mutation == "drop" and lengths:
        lengths.pop()
    elif mutation == "negate" and lengths:
        lengths[0] = -lengths[0] - 1
    elif mutation == "shift" and len(lengths) > 1:  # the same total, a token moved from one row to the next
        lengths[0], lengths[1] = lengths[0] - 1, lengths[1] + 1
    elif mutation == "trim-bytes" and data:
        data = data[: -draw(st.integers(1, min(4, len(data))))]
    elif mutation == "huge" and lengths:  # int32 lengths whose sum overflows 32 bits
        lengths[0] = 2**31 - 1
        lengths.append(2**31 - 1)
    return belay_pb2.PackedInt32(data=data, lengths=lengths)


@st.composite
def packed_int32(draw) -> belay_pb2.PackedInt32:
    """Any packed array at all: random bytes and lengths, huge data, or ids from anywhere in int32."""
    kind = draw(st.sampled_from(["raw", "huge", "ids"]))
    if kind == "raw":
        return belay_pb2.PackedInt32(
            data=draw(st.binary(max_size=48)), lengths=draw(st.lists(st.one_of(st.integers(-3, 12), INT32), max_size=6))
        )
    if kind == "huge":  # past the message limit, or lengths that promise more than data holds
        size = draw(st.sampled_from([4, 4096, MAX_MESSAGE + 4]))
        lengths = draw(st.lists(st.sampled_from([size // 4, 2**31 - 1, -(2**31), 0]), min_size=1, max_size=3))
        return belay_pb2.PackedInt32(data=b"\x01\x00\x00\x00" * (size // 4), lengths=lengths)
    rows = draw(st.lists(st.lists(st.one_of(st.integers(0, VOCAB - 1), INT32), max_size=12), max_size=5))
    return mutated(draw, pack_int32(rows))


@st.composite
def logprobs_requests(draw) -> belay_pb2.LogProbsRequest:
    """Well-formed but for (usually) one fault, so most requests reach the model and each part of
    the validation gets its turn; now and then everything random at once."""
    fault = draw(st.sampled_from(["none", "none", "none", "ids", "lengths", "temperature", "top_k", "chaos"]))
    rows = draw(st.integers(1, 5) if fault != "lengths" else st.integers(0, 5))
    token = st.integers(0, VOCAB - 1)
    if fault == "ids":
        token = st.one_of(token, st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)]), INT32)
    row = st.lists(token, min_size=1 if fault != "lengths" else 0, max_size=12)
    prompt_ids = pack_int32(draw(st.lists(row, min_size=rows, max_size=rows)))
    response_ids = pack_int32(draw(st.lists(row, min_size=rows, max_size=rows)))
    if fault == "lengths":
        prompt_ids, response_ids = mutated(draw, prompt_ids), mutated(draw, response_ids)
    temperature = draw(st.one_of(st.sampled_from([0.0, -0.0, 1.0, 0.7, 2.0]), st.floats(0.0625, 16.0, width=32)))
    if fault in ("temperature", "chaos"):
        temperature = draw(TEMPERATURE)
    top_k = draw(st.one_of(st.just(0), st.integers(0, 8), st.integers(VOCAB - 2, VOCAB)))
    if fault in ("top_k", "chaos"):
        top_k = draw(st.one_of(st.integers(VOCAB - 2, VOCAB + 2), UINT32))
    if fault == "chaos":
        prompt_ids, response_ids = draw(packed_int32()), draw(packed_int32())
    return belay_pb2.LogProbsRequest(
        prompt_ids=prompt_ids, response_ids=response_ids, temperature=temperature, top_k=top_k
    )


TEXT = st.text(max_size=40)
STRING_LISTS = st.one_of(
    st.lists(TEXT, max_size=5),
    st.integers(0, 20_000).map(lambda n: [""] * n),  # huge counts
    st.integers(1, 4).map(lambda n: ["héllo wörld 🎉 " * 2000] * n),  # huge strings, under the message limit
    st.integers(1, 4).map(lambda n: ["good " * (MAX_TEXT // 5)] * n),  # just under max_text_chars
    st.lists(st.sampled_from(["", "\x00", "\n" * 50, "<|im_end|>", "<|im_start|>assistant", "<pad>" * 30]), max_size=4),
)


@st.composite
def generate_requests(draw) -> belay_pb2.GenerateRequest:
    """Like logprobs_requests: well-formed but for (usually) one fault."""
    fault = draw(
        st.sampled_from(
            ["none", "none", "none", "prompts", "temperature", "top_p", "max_new_tokens", "samples", "chaos"]
        )
    )
    prompts = draw(st.lists(TEXT, min_size=1, max_size=2))
    temperature = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.7]), st.floats(0.0625, 16.0, width=32)))
    top_p = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0.015625, 1.0, width=32)))
    # valid lengths stay short for the tiny model; every longer one passes its 256-token context
    max_new_tokens = draw(st.integers(0, 8))
    samples = draw(st.integers(0, 2))
    if fault in ("prompts", "chaos"):
        prompts = draw(STRING_LISTS)
    if fault in ("temperature", "chaos"):
        temperature = draw(TEMPERATURE)
    if fault in ("top_p", "chaos"):
        top_p = draw(st.one_of(FLOAT32, st.sampled_from([1e-45, -0.0, 1.0000001, float("nan"), float("inf")])))
    if fault in ("max_new_tokens", "chaos"):
        max_new_tokens = draw(st.integers(257, 2**32 - 1))
    if fault in ("samples", "chaos"):
        samples = draw(st.one_of(st.integers(3, 10), UINT32))
    sampling = belay_pb2.SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    if seed is not None:
        sampling.seed = seed
    return belay_pb2.GenerateRequest(prompts=prompts, sampling=sampling, samples_per_prompt=samples)


def score_requests():
    return st.one_of(
        st.builds(belay_pb2.ScoreRequest, prompts=STRING_LISTS, responses=STRING_LISTS),
        st.lists(st.tuples(TEXT, TEXT), max_size=6).map(  # matched rows, the common case
            lambda pairs: belay_pb2.ScoreRequest(prompts=[p for p, _ in pairs], responses=[r for _, r in pairs])
        ),
    )


# --- what a good request looks like, and checks on OK replies ---

GOOD_PROMPTS, GOOD_RESPONSES = [[5, 17, 42, 9], [3, 4]], [[8, 11, 12], [60]]


def good_logprobs(stub) -> None:
    request = belay_pb2.LogProbsRequest(prompt_ids=pack_int32(GOOD_PROMPTS), response_ids=pack_int32(GOOD_RESPONSES))
    rows = unpack_float32(stub.LogProbs(request, timeout=CALL_DEADLINE).logprobs)
    assert [len(r) for r in rows] == [3, 1] and all(np.all(r <= 0) for r in rows)


def check_logprobs_reply(request: belay_pb2.LogProbsRequest, reply: belay_pb2.LogProbsResponse) -> None:
    responses = unpack_int32(request.response_ids)
    rows = unpack_float32(reply.logprobs)
    assert [len(r) for r in rows] == [len(r) for r in responses]
    for row in rows:  # log-probabilities: never NaN, never above 0 (beyond float rounding)
        assert not np.isnan(row).any() and np.all(row <= 1e-4), row
    if request.top_k:
        top = unpack_float32(reply.top_logprobs)
        k = min(request.top_k, VOCAB)
        assert [len(r) for r in top] == [len(r) * k for r in responses]
        assert all(not np.isnan(r).any() for r in top)


# --- servers ---


def with_plain_stub(running, stub_class):
    """running.fuzz: a stub on a channel without the client-side message limit, so oversized
    requests reach the server (channel() would refuse to send them)."""
    running.fuzz_channel = grpc.insecure_channel(running.address)
    running.fuzz = stub_class(running.fuzz_channel)
    return running


@pytest.fixture(scope="module")
def reference(tiny_lm_dir):
    config = make_config(LIMITS, reference={"model_dir": str(tiny_lm_dir)})
    with running_reference(config) as running:
        yield with_plain_stub(running, belay_pb2_grpc.ReferenceStub)
        running.fuzz_channel.close()


@pytest.fixture(scope="module")
def policy(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt"
    config = make_config(
        LIMITS, policy={"model_dir": str(tiny_lm_dir), "max_new_tokens": 4}, run={"checkpoint_dir": str(root)}
    )
    with running_policy(config) as running:
        engine_model = running.servicer.engine.loaded.model
        running.committed = write_checkpoint(
            root, 3, lambda d: engine_model.save_pretrained(d, safe_serialization=True)
        )
        yield with_plain_stub(running, belay_pb2_grpc.PolicyStub)
        running.fuzz_channel.close()


@pytest.fixture(scope="module", params=["vader", "hf_classifier"])
def reward(request, tiny_reward_dir):
    section = {"backend": request.param}
    if request.param == "hf_classifier":
        section.update(model_dir=str(tiny_reward_dir), max_length=32)
    config = make_config(LIMITS, reward=section)
    with running_reward(config) as running:
        yield with_plain_stub(running, belay_pb2_grpc.RewardStub)
        running.fuzz_channel.close()


# --- the fuzz ---

# Found by this fuzzing: a subnormal temperature made every log-prob NaN (now INVALID_ARGUMENT).
TINY_TEMPERATURE_LOGPROBS = belay_pb2.LogProbsRequest(
    prompt_ids=pack_int32([[1, 2, 3]]), response_ids=pack_int32([[4, 5]]), temperature=1e-45, top_k=3
)


@FUZZ
@given(request=logprobs_requests())
@example(request=TINY_TEMPERATURE_LOGPROBS)
def test_reference_logprobs(reference, request):
    code, reply = call(reference.fuzz.LogProbs, request)
    if code == grpc.StatusCode.OK:
        check_logprobs_reply(request, reply)


def test_reference_still_serves_after_the_fuzz(reference):
    good_logprobs(reference.stub)
    assert reference.stub.Info(belay_pb2.InfoRequest(), timeout=CALL_DEADLINE).service == "reference"


@FUZZ
@given(request=logprobs_requests())
@example(request=TINY_TEMPERATURE_LOGPROBS)
def test_policy_logprobs(policy, request):
    code, reply = call(policy.fuzz.LogProbs, request)
    if code == grpc.StatusCode.OK:
        check_logprobs_reply(request, reply)


@FUZZ
@given(request=generate_requests())
# Found by this fuzzing: a subnormal temperature made sampling fail with INTERNAL (NaN probabilities).
@example(
    request=belay_pb2.GenerateRequest(
        prompts=["Hi"], sampling=belay_pb2.SamplingParams(temperature=1e-45, max_new_tokens=2)
    )
)
def test_policy_generate(policy, request):
    code, reply = call(policy.fuzz.Generate, request)
    if code == grpc.StatusCode.OK:
        rows = len(request.prompts) * (request.samples_per_prompt or 1)
        responses = unpack_int32(reply.response_ids)
        assert len(responses) == len(reply.response_texts) == len(reply.finish_reasons) == rows
        limit = request.sampling.max_new_tokens or policy.config.policy.max_new_tokens
        assert all(1 <= len(r) <= limit for r in responses)
        for row in unpack_float32(reply.logprobs):
            assert not np.isnan(row).any() and np.all(row <= 1e-4), row


PATHS = st.one_of(
    st.sampled_from(
        [
            "{committed}",
            "{root}/v000003",
            "{root}/v000003/",
            "{root}//v000003",
            "{root}/v000002",
            "{root}/v000003/../v000003",
            "{root}/.tmp-v000004-1",
        ]
    ),
    st.text(max_size=60),
    st.sampled_from(
        [
            "",
            "/",
            ".",
            "..",
            "/etc/passwd",
            "/dev/zero",
            "/proc/self/root",
            "\x00",
            "v000001",
            "a" * 5000,
            "/" + "a" * 300,
            "~",
            "$HOME",
            "../" * 40,
        ]
    ),
    st.tuples(st.sampled_from(["{root}/", "{root}/../", "{root}/v000003/", "{root}/./"]), st.text(max_size=30)).map(
        lambda parts: parts[0] + parts[1]
    ),
)


@FUZZ
@given(version=st.one_of(st.just(3), st.integers(-2, 5), st.integers(-(2**63), 2**63 - 1)), path=PATHS)
# Found by this fuzzing: names too long for the filesystem answered INTERNAL (ENAMETOOLONG); a NUL too;
# and long paths, echoed in the refusal, overflowed the client's metadata limit (RESOURCE_EXHAUSTED).
@example(version=1, path="a" * 5000)
@example(version=1, path="/" + "a" * 300 + "/v000001")
@example(version=1, path="/x/" * 3000)
@example(version=1, path="é" * 4000)
@example(version=3, path="{root}/v000003\x00")
def test_policy_update_weights(policy, version, path):
    root = policy.config.run.checkpoint_dir
    path = path.replace("{root}", root).replace("{committed}", str(policy.committed))
    request = belay_pb2.UpdateWeightsRequest(version=version, checkpoint_path=path)
    code, reply = call(policy.fuzz.UpdateWeights, request)
    if code == grpc.StatusCode.OK:  # only the one committed checkpoint can be taken
        assert version == 3 and reply.current_version == 3


@FUZZ
@given(request=st.builds(belay_pb2.InfoRequest))
def test_policy_info(policy, request):
    code, reply = call(policy.fuzz.Info, request)
    assert code == grpc.StatusCode.OK and reply.service == "policy"


def test_a_huge_prompt_list_is_refused_before_any_work(policy):
    """Found by this fuzzing: every prompt was chat-templated before the batch limit was checked, so
    a message of empty prompts held a worker ~60 us per prompt (a 64 MiB one: half an hour)."""
    start = time.perf_counter()
    code, _ = call(policy.fuzz.Generate, belay_pb2.GenerateRequest(prompts=[""] * 100_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.perf_counter() - start < 3.0
    with pytest.raises(grpc.RpcError) as caught:  # and a prompt past max_text_chars, before tokenizing it
        policy.fuzz.Generate(belay_pb2.GenerateRequest(prompts=["x" * (MAX_TEXT + 1)]), timeout=CALL_DEADLINE)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"prompt 0 has {MAX_TEXT + 1} characters, over max_text_chars={MAX_TEXT}" in caught.value.details()


def test_policy_still_serves_after_the_fuzz(policy):
    good_logprobs(policy.stub)
    reply = policy.stub.Generate(
        belay_pb2.GenerateRequest(
            prompts=["Hi"], sampling=belay_pb2.SamplingParams(temperature=1.0, max_new_tokens=3, seed=1)
        ),
        timeout=CALL_DEADLINE,
    )
    assert len(reply.response_texts) == 1
    assert policy.stub.Info(belay_pb2.InfoRequest(), timeout=CALL_DEADLINE).policy_version in (0, 3)


@FUZZ
@given(request=score_requests())
# Found by this fuzzing: VADER's time grows with the square of the text (28k characters: ~5 s, 56k:
# ~28 s), so one request could hold a worker for hours; texts past max_text_chars are now refused.
@example(request=belay_pb2.ScoreRequest(prompts=["Hi"] * 4, responses=["héllo wörld 🎉 " * 2000] * 4))
def test_reward_score(reward, request):
    code, reply = call(reward.fuzz.Score, request)
    if code == grpc.StatusCode.OK:
        assert len(reply.scores) == len(request.responses) and all(math.isfinite(s) for s in reply.scores)
    good = reward.stub.Score(belay_pb2.ScoreRequest(prompts=["Hi"], responses=["I love it"]), timeout=CALL_DEADLINE)
    assert len(good.scores) == 1


def test_reward_texts_past_max_text_chars_are_refused_and_those_at_it_scored(reward):
    at_limit = ("good " * MAX_TEXT)[:MAX_TEXT]
    reply = reward.fuzz.Score(belay_pb2.ScoreRequest(prompts=["Hi"], responses=[at_limit]), timeout=CALL_DEADLINE)
    assert len(reply.scores) == 1
    with pytest.raises(grpc.RpcError) as caught:
        reward.fuzz.Score(
            belay_pb2.ScoreRequest(prompts=["Hi", at_limit + "!"], responses=["a", "b"]), timeout=CALL_DEADLINE
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"prompts[1] has {MAX_TEXT + 1} characters, over max_text_chars={MAX_TEXT}" in caught.value.details()


# --- raw bytes: messages that are not even valid protobuf ---


@FUZZ
@given(
    payload=st.one_of(st.binary(max_size=64), st.builds(lambda n: struct.pack("<i", n) * 4, INT32)),
    method=st.sampled_from(["/belay.v1.Reference/LogProbs", "/belay.v1.Reference/Info"]),
)
def test_reference_raw_bytes(reference, payload, method):
    raw = reference.fuzz_channel.unary_unary(method)  # no (de)serializers: the bytes go as they are
    try:
        raw(payload, timeout=CALL_DEADLINE)
    except grpc.RpcError as error:
        # INTERNAL is what grpc itself answers to bytes that do not parse as the request message
        assert error.code() in DOCUMENTED | {grpc.StatusCode.INTERNAL}, error
        if error.code() == grpc.StatusCode.INTERNAL:
            assert "deserializ" in (error.details() or "").lower(), error.details()
    good_logprobs(reference.stub)


# --- authorization headers on a server with a token ---


@pytest.fixture(scope="module")
def token_reward(tmp_path_factory):
    token = tmp_path_factory.mktemp("fuzz_token") / "token"
    token.write_text("fuzz-token-0123456789\n")
    with running_reward(make_config({"auth_token_file": str(token)}, reward={"backend": "vader"})) as running:
        yield running


HEADER = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@FUZZ
@given(
    values=st.one_of(
        st.just([]),
        st.just(["Bearer fuzz-token-0123456789"]),
        st.lists(
            st.one_of(
                HEADER,
                HEADER.map(lambda t: "Bearer " + t),
                st.sampled_from(
                    [
                        "Bearer fuzz-token-0123456789",
                        "Bearer fuzz-token-012345678",
                        "Bearer fuzz-token-0123456789 ",
                        "fuzz-token-0123456789",
                    ]
                ),
            ),
            max_size=2,
        ),
    )
)
def test_authorization_headers(token_reward, values):
    chan = grpc.insecure_channel(token_reward.address)
    with chan:
        stub = belay_pb2_grpc.RewardStub(chan)
        code, _ = call(
            stub.Score,
            belay_pb2.ScoreRequest(prompts=["Hi"], responses=["ok"]),
            metadata=[("authorization", value) for value in values],
        )
    if values == ["Bearer fuzz-token-0123456789"]:
        assert code == grpc.StatusCode.OK
    elif not values:
        assert code == grpc.StatusCode.UNAUTHENTICATED
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert token_reward.stub.Info(belay_pb2.InfoRequest(), timeout=CALL_DEADLINE).service == "reward"
