"""python -m services.policy --config belay.yaml : config -> model (latest version) -> checks ->
gRPC server -> rollout loop."""

import logging
import threading

from prometheus_client import CollectorRegistry

from belay.v1 import belay_pb2_grpc

from ..common.checkpoints import latest_valid_checkpoint
from ..common.lora import lora_settings, wrap_with_lora
from ..common.memory_check import cap_process_memory, log_memory_plan
from ..common.metrics import run_info, serve_metrics
from ..common.models import load_section_model, load_tokenizer
from ..common.prompt_data import DataError, load_prompt_data
from ..common.rollout_queue import RolloutQueue
from ..common.rpc import channel
from ..common.service_main import start
from .actor import Actor
from .engine import PolicyEngine, templated_length
from .policy_metrics import PolicyMetrics
from .server import PolicyServicer, build_server
from .startup import check_same_tokenizer, wait_for_dependencies
from .swaps import SwapRequests

log = logging.getLogger("services.policy")
config = start("Belay policy service (the actor)", torch_threads="policy")
section = config.policy
cap_process_memory(*log_memory_plan(config, "policy"))  # logs the plan; caps this process to its share
registry = CollectorRegistry()
metrics = PolicyMetrics(registry)
run_info(registry, "policy", config.run.name, section.model_dir)
serve_metrics(registry, section.metrics_port, config.run.metrics_address)

tokenizer = load_tokenizer(section.model_dir, "policy.model_dir")
try:  # the data is checked before the model loads: a bad file, column or row stops the service now
    data = load_prompt_data(config, templated_length(tokenizer)) if section.run_actor else None
except DataError as error:
    log.error("%s", error)
    raise SystemExit(2) from None
model = load_section_model(section, "policy.model_dir")
if config.lora.enabled:  # the same adapters as the trainer's, zero at start: the SFT model's behaviour
    model = wrap_with_lora(model, lora_settings(config.lora))
engine = PolicyEngine(
    model,
    tokenizer,
    config.grpc,
    max_prompt_tokens=section.max_prompt_tokens,
    kv_cache=section.kv_cache,
    max_tokens_per_forward=section.max_tokens_per_forward,
    top_p_window=section.top_p_window,
)
log.info("sampling with the %s KV cache (policy.kv_cache %s)", engine.sampling_cache.kind, section.kv_cache)
latest = latest_valid_checkpoint(config.run.checkpoint_dir, log)
if latest is not None:  # a restarted policy serves the newest committed version, not the SFT weights
    metrics.record_swap(engine.swap_to(*latest), latest[0])
swaps = SwapRequests()
server = build_server(config, PolicyServicer(config, engine, swaps, metrics))
stop = threading.Event()
server.stop_on_signals(on_stop=stop.set)
server.start()

if section.run_actor:
    reference = belay_pb2_grpc.ReferenceStub(channel(config.reference.address, config.grpc))
    reward = belay_pb2_grpc.RewardStub(channel(config.reward.address, config.grpc))
    wait_for_dependencies(config)
    check_same_tokenizer(tokenizer, reference)  # refuses to run on a mismatch
    queue = RolloutQueue.from_url(config.redis.url, config.run.name)
    queue.ensure_group()
    try:
        actor = Actor(config, engine, queue, reference, reward, swaps, metrics, data)
    except DataError as error:  # the data position saved in Redis belongs to other data
        log.error("%s", error)
        raise SystemExit(2) from None
    server.mark_serving()
    actor.run(stop)
    server.stop()
else:
    server.mark_serving()
    server.wait()
