"""A dataset as the prompt source, end to end over real gRPC and a real redis-server: each row's
metadata travels from the file through the actor, ScoreRequest and the reward service's python backend
(back as the score), into the Rollout on the stream and onto the review page, and through Generate for
an outside caller; a messages row is templated with its system prompt while the reward sees its last
user turn; the data position survives an actor's restart, and after the last epoch the actor stops
producing and the trainer trains what is queued and returns."""

from __future__ import annotations

import json
import pathlib
import re
import threading

import grpc
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from belay.v1 import belay_pb2
from services.common.checkpoints import committed_versions
from services.common.models import load_causal_lm, load_tokenizer
from services.common.packing import unpack_int32
from services.common.review_store import ReviewStore
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.engine import PolicyEngine, apply_chat_template
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests
from services.reward.your_backends import HttpBackend, PythonFunctionBackend
from services.trainer.monitoring import review_samples
from services.trainer.review import render_page

from .conftest import RPC_TIMEOUT, make_config, running_policy, running_reference, running_reward
from .test_reward_backends import RewardHTTPServer
from .test_trainer_queue import make_trainer

SEEN: list[tuple[list[str], list[dict]]] = []  # what answer_reward was called with, in this process


def answer_reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """Scores each pair with its row's answer: the score proves which metadata reached which row."""
    SEEN.append((list(prompts), list(metadata)))
    return [float(row.get("answer", -1)) for row in metadata]


ROWS = [
    {"question": f"What is {i} + {i}?", "answer": 2 * i, "tests": {"cases": [[i, i]], "note": f"<b>row {i}</b>"}}
    for i in range(6)
]


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def actor_config(tiny_lm_dir, redis_url, data: dict, **policy):
    return make_config(
        redis={"url": redis_url},
        reference={"model_dir": str(tiny_lm_dir)},
        reward={"backend": "python", "function": "tests.integration.test_data_source:answer_reward"},
        policy={
            "model_dir": str(tiny_lm_dir),
            "max_new_tokens": 4,
            "prompts_per_batch": 2,
            "samples_per_prompt": 2,
            "canary_prompts_file": "",
            **policy,
        },
        data=data,
    )


@pytest.fixture(scope="module")
def engine(tiny_lm_dir):
    config = make_config()
    return PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"), load_tokenizer(str(tiny_lm_dir)), config.grpc
    )


def make_actor(config, engine, queue, reference, reward) -> Actor:
    return Actor(config, engine, queue, reference.stub, reward.stub, SwapRequests(), PolicyMetrics(CollectorRegistry()))


def stream_rollouts(queue: RolloutQueue) -> list:
    return [rollout for _, rollout in queue.read("test", 1000, 10)]


def test_row_metadata_travels_through_the_actor_the_reward_and_the_stream_to_the_review_page(
    tiny_lm_dir, redis_url, tmp_path, engine
):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS)
    data = {"path": str(path), "prompt_column": "question", "metadata_columns": ["answer", "tests"], "epochs": 1}
    config = actor_config(tiny_lm_dir, redis_url, data)
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    queue.ensure_group()
    SEEN.clear()
    with running_reference(config) as reference, running_reward(config) as reward:
        actor = make_actor(config, engine, queue, reference, reward)
        assert actor.run_batch() == 4
    rows = {row["question"]: {"answer": row["answer"], "tests": row["tests"]} for row in ROWS}
    rollouts = stream_rollouts(queue)
    assert len(rollouts) == 4
    for rollout in rollouts:
        assert rollout.metadata == rows[rollout.prompt_text]  # the Rollout record carries the row's metadata
        assert rollout.reward == rows[rollout.prompt_text]["answer"]  # the reward scored with it
    (prompts, metadata), *_ = SEEN
    assert [rows[p] for p in prompts] == metadata  # one dict per pair, each its own row's

    store = ReviewStore(queue.redis, config.run.name)
    store.record_samples(review_samples(rollouts, version=1))
    page = render_page(config.run.name, store.recent_samples(), {}, {})
    shown = rollouts[0].metadata["tests"]["note"]
    assert f"answer: {rollouts[0].metadata['answer']}" in page
    assert "&lt;b&gt;" + shown[3:-4] in page and shown not in page  # shown, and escaped


def test_an_outside_caller_passes_metadata_through_generate_to_score(tiny_lm_dir, engine):
    config = make_config(
        policy={"model_dir": str(tiny_lm_dir)},
        reward={"backend": "python", "function": "tests.integration.test_data_source:answer_reward"},
    )
    chat = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2 + 5?"}]
    request = belay_pb2.GenerateRequest(
        prompts=["What is 1 + 1?", "What is 2 + 5?"],
        samples_per_prompt=2,
        sampling=belay_pb2.SamplingParams(temperature=1.0, max_new_tokens=3, seed=1),
        metadata_json=['{"answer": 2}', '{"answer": 7}'],
        messages_json=["", json.dumps(chat)],
    )
    with running_policy(config) as policy, running_reward(config) as reward:
        reply = policy.stub.Generate(request, timeout=RPC_TIMEOUT)
        assert [json.loads(m)["answer"] for m in reply.metadata_json] == [2, 2, 7, 7]  # one per row
        templated = unpack_int32(reply.prompt_ids, "prompt_ids")
        assert [list(row) for row in templated[2:]] == [apply_chat_template(engine.tokenizer, chat)] * 2
        assert engine.tokenizer.decode(templated[2]).count("Answer with a number.") == 1  # the system prompt
        scored = reward.stub.Score(
            belay_pb2.ScoreRequest(
                prompts=[request.prompts[i] for i in reply.prompt_index],
                responses=reply.response_texts,
                metadata_json=reply.metadata_json,
            ),
            timeout=RPC_TIMEOUT,
        )
        assert list(scored.scores) == [2.0, 2.0, 7.0, 7.0]
        old_client = reward.stub.Score(belay_pb2.ScoreRequest(prompts=["q"], responses=["r"]), timeout=RPC_TIMEOUT)
        assert list(old_client.scores) == [-1.0]  # no metadata sent: the function gets {} for the row


def test_a_messages_row_is_templated_with_its_system_prompt_and_the_reward_sees_the_last_user_turn(
    tiny_lm_dir, redis_url, tmp_path, engine
):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation, "answer": 3}] * 2)
    data = {"path": str(path), "messages_column": "messages", "metadata_columns": ["answer"]}
    config = actor_config(tiny_lm_dir, redis_url, data)
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    queue.ensure_group()
    SEEN.clear()
    with running_reference(config) as reference, running_reward(config) as reward:
        make_actor(config, engine, queue, reference, reward).run_batch()
    expected = engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    expected = list(expected["input_ids"])
    for rollout in stream_rollouts(queue):
        assert rollout.prompt_text == "Another one?" and rollout.reward == 3.0
        assert rollout.prompt_ids.tolist() == expected  # the whole chat, system prompt and earlier turns
    assert SEEN[0][0] == ["Another one?"] * 4


def test_the_data_position_survives_a_restart_and_the_run_ends_after_the_last_epoch(
    tiny_lm_dir, redis_url, tmp_path, engine
):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS)
    data = {"path": str(path), "prompt_column": "question", "metadata_columns": ["answer"], "epochs": 1}
    config = actor_config(tiny_lm_dir, redis_url, data)
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    queue.ensure_group()
    with running_reference(config) as reference, running_reward(config) as reward:
        first = make_actor(config, engine, queue, reference, reward)
        assert first.run_batch() == 4  # rows 1-2 of 6
        assert queue.data_position()["index"] == 2
        restarted = make_actor(config, engine, queue, reference, reward)  # a new process reads the position back
        assert restarted.prompts.position == first.prompts.position
        assert [restarted.run_batch() for _ in range(3)] == [4, 4, 0]  # rows 3-6, then nothing
        assert queue.data_finished() and restarted.prompts.finished
        stop = threading.Event()
        loop = threading.Thread(target=restarted.run, args=(stop,))
        loop.start()  # finished: the loop serves and swaps, and writes nothing more
        stop.wait(0.5)
        stop.set()
        loop.join(30)
    rollouts = [r for _, r in queue.redis.xrange(queue.stream)]
    assert len(rollouts) == 12  # every row once, two samples each: none repeated, none skipped
    prompts = sorted(json.loads(fields[b"metadata"])["answer"] for fields in rollouts)
    assert prompts == sorted(row["answer"] for row in ROWS for _ in range(2))

    trainer = make_trainer(tiny_lm_dir, redis_url, tmp_path, batch_size=8, minibatch_size=4)
    run = threading.Thread(target=trainer.run, args=(threading.Event(),))
    run.start()
    run.join(240)
    assert not run.is_alive(), "the trainer did not end with the data"
    assert trainer.version == 1  # 12 rollouts: one batch of 8 trained; the last 4 fall short of a batch
    assert [version for version, _ in committed_versions(tmp_path / "checkpoints")] == [1]  # persisted at the end


def kwargs_reward(prompts, responses, **extra) -> list[float]:
    """Takes **kwargs: it receives metadata too."""
    return [float(len(row)) for row in extra["metadata"]]


def test_metadata_reaches_functions_that_take_it_and_http_servers_only_when_a_row_has_some():
    metadata = [{"answer": 1, "tests": []}, {}]
    assert PythonFunctionBackend("tests.integration.test_data_source:kwargs_reward").score(
        ["a", "b"], ["x", "y"], metadata
    ) == [2.0, 0.0]
    old = PythonFunctionBackend("tests.integration.test_reward_backends:length_reward")  # f(prompts, responses)
    assert old.score(["a"], ["xyz"], [{"answer": 1}]) == old.score(["a"], ["xyz"])
    with RewardHTTPServer() as server:
        backend = HttpBackend(server.url + "/ok")
        backend.score(["a", "b"], ["x", "y"], metadata)
        backend.score(["a", "b"], ["x", "y"], [{}, {}])
        assert server.bodies[0]["metadata"] == metadata
        assert server.bodies[1] == {"prompts": ["a", "b"], "responses": ["x", "y"]}  # as before metadata existed


@pytest.mark.parametrize(
    "metadata_json, words",
    [
        (['{"answer": 1}'], "metadata_json has 1 rows for 2"),
        (['{"answer": 1}', "[1, 2]"], r"metadata_json\[1\] must be a JSON object"),
        (['{"answer": 1}', "{not json"], r"metadata_json\[1\] is not JSON"),
    ],
)
def test_bad_metadata_or_messages_are_refused_with_invalid_argument(metadata_json, words, tiny_lm_dir):
    config = make_config(policy={"model_dir": str(tiny_lm_dir)}, reward={"backend": "vader"})
    score = belay_pb2.ScoreRequest(prompts=["a", "b"], responses=["x", "y"], metadata_json=metadata_json)
    generate = belay_pb2.GenerateRequest(prompts=["a", "b"], metadata_json=metadata_json)
    chat = belay_pb2.GenerateRequest(prompts=["a"], messages_json=['[{"role": "assistant", "content": "hi"}]'])
    with running_reward(config) as reward, running_policy(config) as policy:
        for call, request, expected in [
            (reward.stub.Score, score, words),
            (policy.stub.Generate, generate, words),
            (policy.stub.Generate, chat, r"messages_json\[0\]: the last message must be the user's"),
        ]:
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=RPC_TIMEOUT)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.search(expected, error.value.details()), error.value.details()
