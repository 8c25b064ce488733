"""A policy replica in a process of its own that SIGKILLs itself mid-receive, after joining the
broadcast group and receiving `--die-after` buckets: a replica killed while the trainer sends.

python -m tests.integration.broadcast_replica MODEL_DIR ADDRESS DIE_AFTER
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import services.policy.receiving as receiving
from tests.integration.conftest import build_policy, make_config


def main(model_dir: str, address: str, die_after: int) -> None:
    config = make_config(
        policy={"model_dir": model_dir, "address": address},
        trainer={"weight_transport": "broadcast", "broadcast_timeout_seconds": 60},
    )
    received = []
    real = receiving.broadcast_bucket

    def then_die(group, buffer):
        if len(received) == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        real(group, buffer)
        received.append(buffer.numel())

    receiving.broadcast_bucket = then_die
    server, _ = build_policy(config)
    server.start()
    server.mark_serving()
    print("serving", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
