"""The policy's gRPC face: Generate, LogProbs, UpdateWeights, Info. Thin: it translates messages
to PolicyEngine calls and back."""

from __future__ import annotations

import json
import logging

import grpc

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.logprob_service import LogProbsHandler
from ..common.models import tokenizer_fingerprint
from ..common.packing import pack_float32, pack_int32
from ..common.prompt_data import check_messages
from ..common.row_metadata import metadata_from_json
from ..common.rpc import RequestError, ServiceServer, handle, info_response, invalid
from .engine import PolicyEngine, Prompt, Sampling
from .policy_metrics import PolicyMetrics
from .receiving import BroadcastReceiver, receive_ipc
from .swaps import SwapRequests, checked_weights_path

log = logging.getLogger(__name__)
SERVICE_NAME = belay_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
FINISH = {"eos": belay_pb2.FINISH_REASON_EOS, "length": belay_pb2.FINISH_REASON_LENGTH}


def request_prompts(request: belay_pb2.GenerateRequest) -> tuple[list[Prompt], list[dict] | None]:
    """The prompts to template (a chat list where messages_json gives one) and the metadata rows
    (None without any), each checked; INVALID_ARGUMENT naming the field and the row otherwise."""
    prompts: list[Prompt] = list(request.prompts)
    try:
        metadata = metadata_from_json(request.metadata_json, len(prompts), "metadata_json")
        if request.messages_json and len(request.messages_json) != len(prompts):
            raise ValueError(f"messages_json has {len(request.messages_json)} rows for {len(prompts)} prompts")
        for index, text in enumerate(request.messages_json):
            if text:
                prompts[index] = check_messages(json.loads(text), f"messages_json[{index}]")
    except ValueError as error:  # DataError and json.JSONDecodeError are ValueErrors
        raise invalid(str(error)) from None
    return prompts, (metadata if request.metadata_json else None)


class PolicyServicer(belay_pb2_grpc.PolicyServicer):
    def __init__(self, config: BelayConfig, engine: PolicyEngine, swaps: SwapRequests, metrics: PolicyMetrics):
        self.config = config
        self.engine = engine
        self.swaps = swaps
        self.metrics = metrics
        self.fingerprint = tokenizer_fingerprint(engine.tokenizer)
        self.logprobs = LogProbsHandler(
            lambda: engine.loaded, engine.tokenizer, config.grpc, config.policy.max_tokens_per_forward
        )
        self.logprobs.lock = engine.lock  # never compute during a swap
        self.receiver = BroadcastReceiver(engine.device, config.trainer.broadcast_timeout_seconds)

    def _generate(self, request: belay_pb2.GenerateRequest) -> belay_pb2.GenerateResponse:
        defaults = self.config.policy
        sampling = Sampling(
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p or 1.0,
            max_new_tokens=request.sampling.max_new_tokens or defaults.max_new_tokens,
            seed=request.sampling.seed if request.sampling.HasField("seed") else None,
        )
        prompts, metadata = request_prompts(request)
        batch = self.engine.generate(prompts, request.samples_per_prompt or 1, sampling)
        self.metrics.observe_generation(batch)
        return belay_pb2.GenerateResponse(
            prompt_ids=pack_int32(batch.prompt_ids),
            response_ids=pack_int32(batch.response_ids),
            logprobs=pack_float32(batch.logprobs),
            response_texts=batch.texts,
            finish_reasons=[FINISH[r] for r in batch.finish_reasons],
            prompt_index=batch.prompt_index,
            policy_version=batch.version,
            metadata_json=[request.metadata_json[i] for i in batch.prompt_index] if metadata else [],
        )

    def _update_weights(self, request: belay_pb2.UpdateWeightsRequest) -> belay_pb2.UpdateWeightsResponse:
        from safetensors import SafetensorError

        from ..common.rpc import is_loopback_address

        # Weights decide everything the policy says: from beyond loopback only a token holder may send them
        # (with auth_token_file set, the server's interceptor has already checked this caller's token).
        if not self.config.grpc.auth_token_file and not is_loopback_address(self.config.policy.address):
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"UpdateWeights is refused: the policy listens on {self.config.policy.address}, beyond "
                "loopback, without a token; configure grpc.auth_token_file",
            )
        if request.version <= 0:
            raise invalid(f"version must be positive, got {request.version}")
        transport = request.transport or "file"
        if transport == "file":
            source = checked_weights_path(self.config.run, request.version, request.checkpoint_path)
        elif transport == "broadcast":  # joins the trainer's group and receives into staging buffers
            source = self.receiver.receive(request, self.engine.swappable_tensors())
        elif transport == "cuda_ipc":  # copies out of the trainer's exported buffers, then acknowledges
            source = receive_ipc(request, self.engine.swappable_tensors(), self.engine.device)
        else:
            raise invalid(f"transport {transport[:40]!r} is none of file, broadcast, cuda_ipc")
        self.swaps.offer(request.version, source)
        if not self.config.policy.run_actor:  # no batches to wait for: swap now
            try:
                self.metrics.record_swap(self.engine.swap_to(request.version, source), request.version)
            except (ValueError, OSError, SafetensorError) as error:  # the old weights keep serving
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"version {request.version} refused: {error}"
                ) from None
        pending, _ = self.swaps.newest()
        return belay_pb2.UpdateWeightsResponse(current_version=self.engine.version, pending_version=pending)

    def Generate(self, request, context):
        return handle(context, self._generate, request)

    def LogProbs(self, request, context):
        return handle(context, self.logprobs, request)

    def UpdateWeights(self, request, context):
        return handle(context, self._update_weights, request)

    def Info(self, request, context):
        with self.engine.lock:  # the revision hashes the weights: never in the middle of a swap
            loaded = self.engine.loaded
            revision = loaded.revision
        return info_response("policy", self.config.policy.model_dir, self.fingerprint, loaded.version, revision)


def build_server(config: BelayConfig, servicer: PolicyServicer) -> ServiceServer:
    server = ServiceServer(config.policy.address, config.grpc, [SERVICE_NAME])
    belay_pb2_grpc.add_PolicyServicer_to_server(servicer, server.server)
    return server
