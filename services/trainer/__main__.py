"""python -m services.trainer --config belay.yaml : config -> policy copy with gradients ->
resume from the latest checkpoint -> PPO loop."""

import logging
import signal
import threading

import torch
from prometheus_client import CollectorRegistry

from belay.v1 import belay_pb2_grpc

from ..common.memory_check import cap_process_memory, log_memory_plan
from ..common.metrics import run_info, serve_metrics
from ..common.models import load_tokenizer, resolve_device
from ..common.review_store import ReviewStore
from ..common.rollout_queue import RolloutQueue
from ..common.rpc import channel
from ..common.service_main import start
from . import review
from .distributed import Distributed, rank_device
from .meta_start import start_policy
from .trainer import Trainer
from .trainer_metrics import TrainerMetrics

log = logging.getLogger("services.trainer")
config = start("Belay trainer service (PPO)", torch_threads="trainer")
section = config.trainer
cap_process_memory(*log_memory_plan(config, "trainer"))  # logs the plan; caps this process to its share
torch.manual_seed(section.seed)
device = rank_device(resolve_device(section.device))  # under torchrun on CUDA: cuda:LOCAL_RANK
distributed = Distributed.from_environment(device)  # under torchrun
main_rank = distributed is None or distributed.is_main
registry = CollectorRegistry()
metrics = TrainerMetrics(registry)
run_info(registry, "trainer", config.run.name, section.model_dir)
if main_rank:  # one /metrics for the run
    serve_metrics(registry, section.metrics_port, config.run.metrics_address)
review_page = None
if main_rank and section.review_port:  # samples, canaries and ratings, from Redis; ratings exported on /metrics
    review_page = review.serve_page(
        review.create_app(
            ReviewStore.from_url(config.redis.url, config.run.name), review.ReviewMetrics(registry), config.run.name
        ),
        config.run.metrics_address,
        section.review_port,
    )
    log.info("review page at %s", review_page.url)

stop = threading.Event()
for signum in (signal.SIGTERM, signal.SIGINT):  # finish the step in hand (its checkpoint), then exit
    signal.signal(signum, lambda *_: stop.set())

# float32 master weights on `device` (under fsdp built empty, each rank reading its rows once sharded:
# meta_start.py); trainer.dtype is the autocast dtype
model = start_policy(config, device, distributed)
policy = belay_pb2_grpc.PolicyStub(channel(section.policy_address, config.grpc)) if main_rank else None
trainer = Trainer(
    config,
    model,
    load_tokenizer(section.model_dir, "trainer.model_dir"),
    RolloutQueue.from_url(config.redis.url, config.run.name),
    metrics,
    policy,
    distributed,
)
trainer.resume()
if main_rank:
    log.info("run manifest: %s", trainer.write_run_manifest())
metrics.ready.set(1)
metrics.gauges["version"].set(trainer.version)
log.info("trainer ready at version %d", trainer.version)
trainer.run(stop)
if distributed is not None:
    distributed.close()
if review_page is not None:
    review_page.stop()
log.info("trainer stopped at version %d", trainer.version)
