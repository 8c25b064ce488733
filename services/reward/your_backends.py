"""The reward backends that call your code: a Python function (`python`) or an HTTP reward server
(`http`). Whatever they return is checked (scores.check_scores) and every error names the function or URL."""

from __future__ import annotations

import hashlib
import http.client
import importlib
import inspect
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from .scores import RewardBackendError, check_scores, short_repr

log = logging.getLogger(__name__)


def load_function(spec: str) -> Callable:
    """The callable named 'module:function' (the function may be dotted: 'module:Class.method')."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"reward.function: {spec!r} must read 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"reward.function {spec}: cannot import module {module_name!r}: {error} "
            "(is it on PYTHONPATH, or in the directory the service starts in?)"
        ) from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(
                f"reward.function {spec}: {module_name} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"reward.function {spec}: {attribute} is a {type(target).__name__}, not a function")
    return target


def takes_metadata(function: Callable) -> bool:
    """Whether f accepts a `metadata` keyword (a parameter of that name, or **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it the old way
        return False
    return any(p.kind == p.VAR_KEYWORD or (p.name == "metadata" and p.kind != p.POSITIONAL_ONLY) for p in parameters)


class PythonFunctionBackend:
    """Your function: `reward.function: module:function`, called as f(prompts, responses) with two
    lists of str, or as f(prompts, responses, metadata=[...]) (one dict per pair) when it takes a
    `metadata` parameter or **kwargs; it must return one finite float per pair (a list, tuple or array)."""

    def __init__(self, spec: str):
        self.function = load_function(spec)
        self.spec = spec
        self.takes_metadata = takes_metadata(self.function)
        self.model_id = f"python:{spec}"
        try:
            source = inspect.getsource(self.function)
        except (OSError, TypeError):
            source = spec
        self.revision = hashlib.sha256(source.encode()).hexdigest()[:16]

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        extra = {}
        if self.takes_metadata:
            extra["metadata"] = list(metadata) if metadata is not None else [{} for _ in responses]
        try:
            values = self.function(list(prompts), list(responses), **extra)
        except Exception as error:
            raise RewardBackendError(f"reward.function {self.spec} raised {type(error).__name__}: {error}") from error
        return check_scores(values, len(responses), f"reward.function {self.spec}")


class HttpBackend:
    """A proxy to an HTTP reward server: POST {"prompts": [...], "responses": [...], "metadata": [...]}
    (JSON) to `url`; the reply must be {"scores": [...]} with one finite number per pair, in order.
    "metadata" (one object per pair, {} for a row without) is sent only when some pair carries
    metadata (data.metadata_columns): without any, the body is exactly what it always was, so an
    existing server keeps working; a server that reads it takes a missing key as all {}.

    Connection errors and 5xx replies are retried `retries` times, waiting backoff_seconds, then
    twice that, and so on; a request that takes longer than timeout_seconds is not retried (it
    would only wait again). Every error names the URL."""

    def __init__(self, url: str, timeout_seconds: float = 30.0, retries: int = 2, backoff_seconds: float = 0.5):
        self.url = url
        self.timeout = timeout_seconds
        self.retries = retries
        self.backoff = backoff_seconds
        self.model_id = f"http:{url}"
        self.revision = hashlib.sha256(url.encode()).hexdigest()[:16]  # the endpoint; its model is unknown here

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict] | None = None) -> list[float]:
        request = {"prompts": list(prompts), "responses": list(responses)}
        if metadata is not None and any(metadata):
            request["metadata"] = list(metadata)
        body = json.dumps(request).encode("utf-8")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
                log.warning(
                    "http reward %s: attempt %d of %d after %s", self.url, attempt + 1, self.retries + 1, problem
                )
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    raw = reply.read()
                return self._parse(raw, len(responses))
            except urllib.error.HTTPError as error:
                detail = error.read(300).decode("utf-8", "replace").strip()
                problem = f"HTTP {error.code} {error.reason}" + (f": {detail}" if detail else "")
                if error.code < 500:
                    raise RewardBackendError(f"http reward {self.url} refused the request: {problem}") from None
            except TimeoutError:
                raise self._timed_out() from None
            except urllib.error.URLError as error:
                if isinstance(error.reason, TimeoutError):  # socket.timeout is TimeoutError since 3.10
                    raise self._timed_out() from None
                problem = f"cannot connect: {error.reason}"
            except (ConnectionError, http.client.HTTPException) as error:
                problem = f"connection broken: {type(error).__name__}: {error}"
        raise RewardBackendError(f"http reward {self.url} failed after {self.retries + 1} attempts: {problem}")

    def _timed_out(self) -> RewardBackendError:
        return RewardBackendError(f"http reward {self.url} did not answer within timeout_seconds={self.timeout:g}")

    def _parse(self, raw: bytes, count: int) -> list[float]:
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = f"the reply is not JSON: {short_repr(raw[:200])}"
            raise RewardBackendError(f"http reward {self.url}: {problem}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("scores"), list):
            raise RewardBackendError(
                f'http reward {self.url}: the reply must be an object with a list "scores"; got {short_repr(reply)}'
            )
        return check_scores(reply["scores"], count, f"http reward {self.url}")
