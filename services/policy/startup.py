"""Checks the policy makes before it writes a single rollout."""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from belay.v1 import belay_pb2, belay_pb2_grpc

from ..common.config import BelayConfig
from ..common.models import tokenizer_fingerprint
from ..common.rpc import channel, wait_until_serving

log = logging.getLogger(__name__)


class TokenizerMismatch(RuntimeError):
    """Policy and reference disagree on what token ids mean: every KL would be meaningless."""


def wait_for_dependencies(config: BelayConfig) -> None:
    timeout = config.policy.startup_timeout_seconds
    for name, address in (("belay.v1.Reference", config.reference.address), ("belay.v1.Reward", config.reward.address)):
        log.info("waiting for %s at %s", name, address)
        wait_until_serving(channel(address, config.grpc), name, timeout)


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, reference: belay_pb2_grpc.ReferenceStub) -> None:
    ours = tokenizer_fingerprint(tokenizer)
    theirs = reference.Info(belay_pb2.InfoRequest(), timeout=30).tokenizer_fingerprint
    if ours != theirs:
        raise TokenizerMismatch(
            f"the reference's tokenizer (fingerprint {theirs[:12]}) differs from the policy's "
            f"({ours[:12]}): KL between them would compare different tokens. Serve the same "
            "tokenizer in both, e.g. the same SFT model directory."
        )
    log.info("reference tokenizer matches (%s)", ours[:12])
