"""Waiting out a Redis restart: the trainer's Redis writes that must not be lost are retried with
back-off (a version already published must still be announced, a committed checkpoint's rollouts
acknowledged: they stay pending meanwhile)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..common.rollout_queue import REDIS_DOWN

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 15.0


def until_redis_answers(action: Callable[[], T], what: str, stop: threading.Event | None = None) -> T:
    """Run a Redis action until Redis answers, doubling the wait between tries up to 15 s. With
    `stop`, give up (re-raising Redis's error) once it is set."""
    delay = FIRST_DELAY_SECONDS
    while True:
        try:
            return action()
        except REDIS_DOWN as error:
            log.warning("Redis unavailable while %s (%s); retrying in %.1f s", what, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_SECONDS)
            if stop is not None and stop.is_set():
                raise
