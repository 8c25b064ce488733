"""gRPC plumbing every service shares: a server with health and reflection, SIGTERM handling,
client channels with message limits and retries, and request validation errors.

Security (config section `grpc`; every field empty by default, which is safe on loopback only):
- TLS: with tls_cert_file + tls_key_file servers listen with TLS only; clients then verify the
  server's certificate against tls_ca_file (the system roots when empty). Certificates must name
  the host clients dial (an IP SAN for 127.0.0.1).
- Bearer token: with auth_token_file every server refuses calls to Belay's services that do not
  carry `authorization: Bearer <token>` metadata (none: UNAUTHENTICATED, another: PERMISSION_DENIED),
  and every client from `channel()` attaches it. grpc.health.v1 and server reflection stay open so
  orchestrators and load balancers can probe without the secret; they reveal liveness and the
  public schema only. The file is read once, at start-up; a missing or empty file stops the
  process with an error naming grpc.auth_token_file.
- Weight updates (Policy.UpdateWeights) from beyond loopback always need the token: a policy that
  listens on a non-loopback address without auth_token_file refuses them (see is_loopback_address).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import pathlib
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from belay.v1 import belay_pb2

from .config import ConfigError, GrpcConfig

log = logging.getLogger(__name__)

# Retries on UNAVAILABLE only, for our methods, which are all idempotent (no state changes
# on a repeated Generate, LogProbs, Score, Info; UpdateWeights to the same version is a no-op).
# round_robin: with a headless Service (every pod's address in DNS) calls spread over replicas.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [
                    {"service": "belay.v1.Policy"},
                    {"service": "belay.v1.Reference"},
                    {"service": "belay.v1.Reward"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "3s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def message_options(config: GrpcConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


class RequestError(Exception):
    """A request the servicer refuses; carries the gRPC status code and a message a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def too_big(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


# Status details travel in trailing metadata, each non-ASCII byte percent-encoded to three; clients
# drop replies whose metadata passes 8 KiB (and say RESOURCE_EXHAUSTED, hiding the real status).
# Messages may echo requests, so they are capped (2000 UTF-8 bytes: at most 6000 on the wire).
MAX_DETAILS_BYTES = 2000


def short_details(message: str) -> str:
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_DETAILS_BYTES:
        return message
    return encoded[: MAX_DETAILS_BYTES - 20].decode("utf-8", errors="ignore") + " ... (cut short)"


def handle(context: grpc.ServicerContext, method, request):
    """Run a servicer body; map RequestError to its status and anything else to INTERNAL with its text."""
    try:
        return method(request)
    except RequestError as error:
        context.abort(error.code, short_details(str(error)))
    except Exception as error:  # keep serving; say what went wrong
        log.exception("request failed")
        context.abort(grpc.StatusCode.INTERNAL, short_details(f"{type(error).__name__}: {error}"))


# --- security: loopback, token and TLS ---

AUTH_METADATA_KEY = "authorization"
BEARER = "Bearer "
# Services every caller may reach without the token: probes need them, and they hold no model or weights.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def address_host(address: str) -> str:
    """The host part of a gRPC host:port address: "[::1]:5" -> "::1", "127.0.0.1:5" -> "127.0.0.1"."""
    address = address.strip()
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") > 1:  # a bare IPv6 address, no port
        return address
    return address.rpartition(":")[0] if ":" in address else address


def is_loopback_address(address: str) -> bool:
    """True when host:port listens on loopback only: 127.0.0.0/8, ::1 (also IPv4-mapped) or localhost.
    Anything else, "0.0.0.0", "[::]", an empty host and any other name included, is beyond loopback."""
    if address.startswith(("unix:", "unix-abstract:")):  # a local socket: not reachable over the network
        return True
    host = address_host(address).lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _read_file(config: GrpcConfig, field: str) -> bytes:
    name = getattr(config, field)
    path = pathlib.Path(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"grpc.{field}: {name} does not exist") from None
    except OSError as error:
        raise ConfigError(f"grpc.{field}: cannot read {name}: {error}") from None
    if not data.strip():
        raise ConfigError(f"grpc.{field}: {name} is empty")
    return data


def read_auth_token(config: GrpcConfig) -> str | None:
    """The shared bearer token from grpc.auth_token_file (surrounding whitespace dropped), or None
    when no file is configured. ConfigError, naming the field, for a missing, empty or unusable file."""
    if not config.auth_token_file:
        return None
    try:
        token = _read_file(config, "auth_token_file").decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"grpc.auth_token_file: {config.auth_token_file} must hold printable ASCII") from None
    if not token.isprintable() or any(char.isspace() for char in token):
        raise ConfigError(
            f"grpc.auth_token_file: {config.auth_token_file} must hold one token: printable "
            "ASCII without spaces or line breaks"
        )
    return token


def tls_enabled(config: GrpcConfig) -> bool:
    return bool(config.tls_cert_file)


def server_credentials(config: GrpcConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read_file(config, "tls_key_file"), _read_file(config, "tls_cert_file"))])


def channel_credentials(config: GrpcConfig) -> grpc.ChannelCredentials:
    roots = _read_file(config, "tls_ca_file") if config.tls_ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _same_kind_of_handler(handler: grpc.RpcMethodHandler, behaviour) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` whose body is `behaviour(context)`."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(lambda _requests, context: behaviour(context), **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(lambda _requests, context: behaviour(context), **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(lambda _request, context: behaviour(context), **serializers)
    return grpc.unary_unary_rpc_method_handler(lambda _request, context: behaviour(context), **serializers)


def _service_of(method: str) -> str:
    return method.lstrip("/").partition("/")[0]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED) or with another token
    (PERMISSION_DENIED), compared in constant time. OPEN_SERVICES pass without one."""

    def __init__(self, token: str):
        self._expected = (BEARER + token).encode("ascii")

    def intercept_service(self, continuation, handler_call_details):
        if _service_of(handler_call_details.method) in OPEN_SERVICES:
            return continuation(handler_call_details)
        values = [
            value for key, value in (handler_call_details.invocation_metadata or ()) if key.lower() == AUTH_METADATA_KEY
        ]
        if len(values) == 1:
            given = values[0].encode("utf-8") if isinstance(values[0], str) else bytes(values[0])
            if hmac.compare_digest(given, self._expected):
                return continuation(handler_call_details)
        # Unknown methods are refused the same way: which methods exist is for token holders only.
        handler = continuation(handler_call_details) or grpc.unary_unary_rpc_method_handler(None)
        if not values:
            code, message = (
                grpc.StatusCode.UNAUTHENTICATED,
                ("this server requires a bearer token: send `authorization: Bearer <token>` (grpc.auth_token_file)"),
            )
        else:
            code, message = grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not this server's"

        def refuse(context):
            context.abort(code, message)

        return _same_kind_of_handler(handler, refuse)


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Attaches fixed metadata (the bearer token) to every call of a plaintext channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, details):
        metadata = [*(details.metadata or ()), *self._metadata]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class ServiceServer:
    """A grpc.Server with health (NOT_SERVING until mark_serving), optional reflection, and the
    transport security of `config` (TLS, bearer token; see the module docstring)."""

    def __init__(self, address: str, config: GrpcConfig, service_names: list[str]):
        self.config = config
        token = read_auth_token(config)  # read once, at start-up; a bad file stops here
        credentials = server_credentials(config) if tls_enabled(config) else None
        if credentials is None and not is_loopback_address(address):
            log.warning(
                "listening on %s beyond loopback in plaintext%s: set grpc.tls_cert_file/tls_key_file",
                address,
                " (the bearer token travels in the clear)" if token else "",
            )
        interceptors = [BearerTokenInterceptor(token)] if token else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers),
            options=message_options(config),
            interceptors=interceptors,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = ["", *service_names]
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.reflection:
            reflection.enable_server_reflection(
                [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )
        if credentials is not None:
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = address.rsplit(":", 1)[0] + f":{self.port}"
        self._stopped = threading.Event()

    def start(self) -> None:
        self.server.start()

    def mark_serving(self) -> None:
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        """NOT_SERVING first, then let in-flight calls finish within the grace."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for name in self.service_names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(self.config.shutdown_grace_seconds).wait()

    def stop_on_signals(self, on_stop=None) -> None:
        def _handler(signum, _frame):
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            if on_stop is not None:
                on_stop()
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def wait(self) -> None:
        self.server.wait_for_termination()


def channel(address: str, config: GrpcConfig) -> grpc.Channel:
    """A client channel with message limits and retries; TLS and the bearer token as `config` says."""
    options = [*message_options(config), ("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    token = read_auth_token(config)
    if tls_enabled(config):
        credentials = channel_credentials(config)
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(address, credentials, options=options)
    plain = grpc.insecure_channel(address, options=options)
    if token:  # call credentials need a secure channel; plaintext (loopback) carries the header itself
        if not is_loopback_address(address):
            log.warning("sending the bearer token to %s in plaintext: set grpc.tls_* to encrypt it", address)
        return grpc.intercept_channel(plain, _AddMetadata(((AUTH_METADATA_KEY, BEARER + token),)))
    return plain


def wait_until_serving(chan: grpc.Channel, service: str, timeout_seconds: float) -> None:
    """Poll grpc.health.v1 until SERVING; TimeoutError names the service and address otherwise."""
    stub = health_pb2_grpc.HealthStub(chan)
    deadline = time.monotonic() + timeout_seconds
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as error:
            last = error.code().name
        time.sleep(0.2)
    raise TimeoutError(f"{service} not SERVING after {timeout_seconds:.0f} s (last: {last})")


def info_response(
    service: str, model_id: str, tokenizer_fp: str = "", version: int = 0, revision: str = ""
) -> belay_pb2.InfoResponse:
    return belay_pb2.InfoResponse(
        service=service,
        model_id=model_id,
        tokenizer_fingerprint=tokenizer_fp,
        policy_version=version,
        model_revision=revision,
    )
