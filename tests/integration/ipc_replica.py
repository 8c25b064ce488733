"""A policy replica on cuda:0 in a process of its own (CUDA IPC handles open only in another process).

python -m tests.integration.ipc_replica MODEL_DIR ADDRESS
"""

from __future__ import annotations

import sys
import threading

import torch
from prometheus_client import CollectorRegistry

from services.common.models import load_causal_lm, load_tokenizer
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.server import PolicyServicer, build_server
from services.policy.swaps import SwapRequests
from tests.integration.conftest import make_config


def main(model_dir: str, address: str) -> None:
    config = make_config(
        policy={"model_dir": model_dir, "address": address, "device": "cuda"}, trainer={"weight_transport": "cuda_ipc"}
    )
    engine = PolicyEngine(
        load_causal_lm(model_dir, torch.device("cuda:0"), "policy.model_dir"),
        load_tokenizer(model_dir),
        config.grpc,
    )
    server = build_server(config, PolicyServicer(config, engine, SwapRequests(), PolicyMetrics(CollectorRegistry())))
    server.start()
    server.mark_serving()
    print("serving", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
