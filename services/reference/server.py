"""The reference service: the frozen SFT model, serving LogProbs. Never trained, never reloaded
from a trainer checkpoint: it is the floor PPO's KL is measured against (the seed)."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry, Histogram

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.logprob_service import LoadedModel, LogProbsHandler
from ..common.metrics import LLM_SECONDS_BUCKETS, run_info
from ..common.models import (
    freeze,
    load_section_model,
    load_tokenizer,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from ..common.rpc import ServiceServer, handle, info_response

log = logging.getLogger(__name__)
SERVICE_NAME = belay_pb2.DESCRIPTOR.services_by_name["Reference"].full_name


class ReferenceServicer(belay_pb2_grpc.ReferenceServicer):
    def __init__(self, config: BelayConfig, registry: CollectorRegistry):
        self.config = config
        self.model_id = config.reference.model_dir
        self.loaded: LoadedModel | None = None  # until load(): requests get FAILED_PRECONDITION
        self.seconds = Histogram(
            "belay_reference_logprobs_seconds",
            "Reference LogProbs call time",
            buckets=LLM_SECONDS_BUCKETS,
            registry=registry,
        )
        run_info(registry, "reference", config.run.name, self.model_id)

    def load(self) -> None:
        section = self.config.reference
        self.tokenizer = load_tokenizer(section.model_dir, "reference.model_dir")
        model = freeze(load_section_model(section, "reference.model_dir"))
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.logprobs = LogProbsHandler(
            lambda: self.loaded, self.tokenizer, self.config.grpc, section.max_tokens_per_forward
        )
        self.loaded = LoadedModel(model=model, version=0)
        log.info("reference loaded from %s (weights %s)", section.model_dir, self.loaded.revision[:12])

    def weights_changed(self) -> str | None:
        """The reference is the floor of PPO and must never move: hash its weights again and say
        what changed (None while they equal the fingerprint taken at load)."""
        now = weights_fingerprint(self.loaded.model)
        if now != self.loaded.revision:
            return f"reference weights changed since load: {self.loaded.revision[:16]} -> {now[:16]}"
        return None

    def LogProbs(self, request, context):
        if self.loaded is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "reference model is still loading")
        with self.seconds.time():
            return handle(context, self.logprobs, request)

    def Info(self, request, context):
        if self.loaded is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "reference model is still loading")
        return info_response("reference", self.model_id, self.fingerprint, 0, self.loaded.revision)


def build_server(config: BelayConfig, registry: CollectorRegistry) -> tuple[ServiceServer, ReferenceServicer]:
    """The server, not yet started; the servicer, not yet loaded (health says NOT_SERVING till then)."""
    servicer = ReferenceServicer(config, registry)
    server = ServiceServer(config.reference.address, config.grpc, [SERVICE_NAME])
    belay_pb2_grpc.add_ReferenceServicer_to_server(servicer, server.server)
    return server, servicer
