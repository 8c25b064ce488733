"""The reward service: Score through a pluggable backend (reward.backend; services/reward/backends.py).
It sees text, not token ids, so any reward model with any tokenizer can be swapped in.

Metrics: belay_reward_score (every raw score returned), belay_reward_score_seconds, and for the
`combined` backend each component's own scores, labelled by component name:
belay_reward_component_score (histogram) and belay_reward_component_score_mean (last batch's mean).
The reply's reward_model_id is the backend's model_id, which every rollout records."""

from __future__ import annotations

import logging
import math

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig, GrpcConfig
from ..common.metrics import LLM_SECONDS_BUCKETS, run_info
from ..common.models import resolve_device
from ..common.row_metadata import metadata_from_json
from ..common.rpc import ServiceServer, handle, info_response, invalid, too_big
from .backends import RewardBackend, build_backend, check_scores

log = logging.getLogger(__name__)
SCORE_BUCKETS = (-10, -3, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 3, 10)
SERVICE_NAME = belay_pb2.DESCRIPTOR.services_by_name["Reward"].full_name


def parse_score_request(request: belay_pb2.ScoreRequest, limits: GrpcConfig) -> tuple[list[str], list[str], list[dict]]:
    """(prompts, responses, metadata: one dict per row, {} where the request carried none), checked."""
    prompts, responses = list(request.prompts), list(request.responses)
    if not responses:
        raise invalid("empty batch: responses has no rows")
    if len(prompts) != len(responses):
        raise invalid(f"prompts has {len(prompts)} rows but responses has {len(responses)}")
    if len(responses) > limits.max_batch_size:
        raise too_big(f"batch of {len(responses)} rows exceeds max_batch_size={limits.max_batch_size}; split it")
    for name, texts in (("prompts", prompts), ("responses", responses)):
        for index, text in enumerate(texts):
            if len(text) > limits.max_text_chars:
                raise too_big(
                    f"{name}[{index}] has {len(text)} characters, over max_text_chars={limits.max_text_chars}"
                )
    try:
        metadata = metadata_from_json(request.metadata_json, len(responses), "metadata_json")
    except ValueError as error:
        raise invalid(str(error)) from None
    return prompts, responses, metadata


class RewardServicer(belay_pb2_grpc.RewardServicer):
    def __init__(self, config: BelayConfig, registry: CollectorRegistry):
        self.config = config
        self.backend: RewardBackend | None = None
        self.seconds = Histogram(
            "belay_reward_score_seconds", "Reward Score call time", buckets=LLM_SECONDS_BUCKETS, registry=registry
        )
        self.scores = Histogram(
            "belay_reward_score", "Raw reward scores returned", buckets=SCORE_BUCKETS, registry=registry
        )
        self.component_scores = Histogram(
            "belay_reward_component_score",
            "Raw scores of each combined component",
            ["component"],
            buckets=SCORE_BUCKETS,
            registry=registry,
        )
        self.component_means = Gauge(
            "belay_reward_component_score_mean",
            "Mean raw score of each combined component over the last Score batch",
            ["component"],
            registry=registry,
        )
        self.registry = registry

    def load(self) -> None:
        section = self.config.reward
        self.backend = build_backend(section, resolve_device(section.device))
        run_info(self.registry, "reward", self.config.run.name, self.backend.model_id)
        log.info("reward backend %s ready (%s)", section.backend, self.backend.model_id)

    def _score(self, request: belay_pb2.ScoreRequest) -> belay_pb2.ScoreResponse:
        prompts, responses, metadata = parse_score_request(request, self.config.grpc)
        score_components = getattr(self.backend, "score_components", None)
        components = []
        if score_components is not None:
            scores, parts = score_components(prompts, responses, metadata)
            weights = {name: weight for name, weight, _ in self.backend.components}
            components = [
                belay_pb2.ComponentScores(name=name, weight=weights[name], scores=values)
                for name, values in parts.items()
            ]
            for name, values in parts.items():
                for value in values:
                    self.component_scores.labels(component=name).observe(value)
                self.component_means.labels(component=name).set(math.fsum(values) / len(values))
        else:
            scores = self.backend.score(prompts, responses, metadata=metadata)
        scores = check_scores(scores, len(responses), f"reward backend {self.backend.model_id}")
        for value in scores:
            self.scores.observe(value)
        return belay_pb2.ScoreResponse(
            scores=scores,
            reward_model_id=self.backend.model_id,
            reward_model_revision=self.backend.revision,
            components=components,
        )

    def Score(self, request, context):
        if self.backend is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "reward backend is still loading")
        with self.seconds.time():
            return handle(context, self._score, request)

    def Info(self, request, context):
        if self.backend is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "reward backend is still loading")
        return info_response("reward", self.backend.model_id, "", 0, self.backend.revision)


def build_server(config: BelayConfig, registry: CollectorRegistry) -> tuple[ServiceServer, RewardServicer]:
    """The server, not yet started; the servicer, not yet loaded (health says NOT_SERVING till then)."""
    servicer = RewardServicer(config, registry)
    server = ServiceServer(config.reward.address, config.grpc, [SERVICE_NAME])
    belay_pb2_grpc.add_RewardServicer_to_server(servicer, server.server)
    return server, servicer
