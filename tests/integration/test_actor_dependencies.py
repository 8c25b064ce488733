"""The actor against real reference and reward servers, healthy and broken: a reward server that
answers NaN or the wrong number of scores is an error the actor reports and retries, never a rollout."""

from __future__ import annotations

import pathlib

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.models import load_causal_lm, load_tokenizer
from services.common.rollout_queue import RolloutQueue
from services.common.rpc import ServiceServer
from services.policy.actor import Actor, DependencyError
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests

from .conftest import Running, make_config, running_reference, serving

REPO = pathlib.Path(__file__).resolve().parents[2]


class ScriptedReward(belay_pb2_grpc.RewardServicer):
    """A reward server someone else wrote, answering whatever `scores(n)` returns."""

    def __init__(self, scores):
        self.scores = scores

    def Score(self, request, context):
        return belay_pb2.ScoreResponse(scores=self.scores(len(request.responses)), reward_model_id="scripted")

    def Info(self, request, context):
        return belay_pb2.InfoResponse(service="reward", model_id="scripted")


def running_scripted_reward(config, scores) -> Running:
    server = ServiceServer("127.0.0.1:0", config.grpc, ["belay.v1.Reward"])
    servicer = ScriptedReward(scores)
    belay_pb2_grpc.add_RewardServicer_to_server(servicer, server.server)
    return serving(config, server, servicer, belay_pb2_grpc.RewardStub)


@pytest.mark.parametrize(
    "scores, message",
    [
        (lambda n: [float("nan")] * n, "non-finite"),
        (lambda n: [1.0] * (n - 1), "scores for"),
        (lambda n: [float("inf")] + [0.0] * (n - 1), "non-finite"),
    ],
)
def test_a_bad_reward_reply_writes_no_rollout_and_a_good_one_does(scores, message, tiny_lm_dir, redis_url):
    config = make_config(
        redis={"url": redis_url},
        reference={"model_dir": str(tiny_lm_dir)},
        policy={"model_dir": str(tiny_lm_dir), "prompts_file": str(REPO / "prompts/default.txt"), "max_new_tokens": 6},
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    metrics = PolicyMetrics(CollectorRegistry())
    with running_reference(config) as reference:
        with running_scripted_reward(config, scores) as broken:
            actor = Actor(config, engine, queue, reference.stub, broken.stub, SwapRequests(), metrics)
            with pytest.raises(DependencyError, match=message):
                actor.run_batch()
            assert queue.redis.xlen(queue.stream) == 0  # nothing written
        with running_scripted_reward(config, lambda n: [0.5] * n) as good:
            actor.reward = good.stub
            assert actor.run_batch() == 8
            assert queue.redis.xlen(queue.stream) == 8


class CombinedReward(ScriptedReward):
    """A combined reward's reply: the total and each part."""

    def Score(self, request, context):
        n = len(request.responses)
        polite, short = [1.0] * n, [float(len(r)) for r in request.responses]
        return belay_pb2.ScoreResponse(
            scores=[p + 0.5 * s for p, s in zip(polite, short)],
            reward_model_id="combined(polite*1.0+short*0.5)",
            components=[
                belay_pb2.ComponentScores(name="polite", weight=1.0, scores=polite),
                belay_pb2.ComponentScores(name="short", weight=0.5, scores=short),
            ],
        )


def test_each_part_of_a_combined_reward_is_kept_in_every_rollout(tiny_lm_dir, redis_url):
    config = make_config(
        redis={"url": redis_url},
        reference={"model_dir": str(tiny_lm_dir)},
        policy={"model_dir": str(tiny_lm_dir), "prompts_file": str(REPO / "prompts/default.txt"), "max_new_tokens": 6},
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    queue = RolloutQueue(redis.Redis.from_url(redis_url), config.run.name)
    queue.ensure_group()
    with running_reference(config) as reference:
        server = ServiceServer("127.0.0.1:0", config.grpc, ["belay.v1.Reward"])
        belay_pb2_grpc.add_RewardServicer_to_server(CombinedReward(None), server.server)
        with serving(config, server, None, belay_pb2_grpc.RewardStub) as reward:
            actor = Actor(
                config, engine, queue, reference.stub, reward.stub, SwapRequests(), PolicyMetrics(CollectorRegistry())
            )
            assert actor.run_batch() == 8
    rollouts = [r for _, r in queue.read("t", 100, 10)]
    for rollout in rollouts:
        assert rollout.reward_components == {"polite": 1.0, "short": float(len(rollout.response_text))}
        assert rollout.reward == 1.0 + 0.5 * len(rollout.response_text)
