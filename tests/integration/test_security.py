"""Nothing let in that does not belong, over real gRPC on loopback: UpdateWeights refuses paths out
of the checkpoint directory (traversal, absolute, symlinks) and pickle-only checkpoints; a policy
listening beyond loopback without a token refuses weight updates; the bearer token is enforced
(health and reflection stay open); TLS servers talk to clients that trust their CA only; metrics
listen on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from transformers import LlamaForCausalLM

from belay.v1 import belay_pb2, belay_pb2_grpc
from services.common.checkpoints import write_checkpoint
from services.common.config import BelayConfig, ConfigError, GrpcConfig, load_config
from services.common.metrics import serve_metrics
from services.common.models import load_tokenizer
from services.common.packing import pack_int32, unpack_float32
from services.common.rpc import ServiceServer, channel, is_loopback_address, read_auth_token
from tests.conftest import free_port
from tests.tiny_models import llama_config

from .conftest import RPC_TIMEOUT, make_config, rpc_error, running_policy, running_reward

PROMPTS, RESPONSES = [[5, 17, 42, 9], [3, 4]], [[8, 11, 12], [60]]
SHORT = 10.0  # seconds: the deadline of calls expected to fail fast


# --- helpers ---


def policy_config(model_dir, checkpoint_dir, address="127.0.0.1:0", **grpc_fields):
    return make_config(
        {"max_batch_size": 8, **grpc_fields},
        policy={"model_dir": str(model_dir), "run_actor": False, "address": address},
        run={"checkpoint_dir": str(checkpoint_dir)},
    )


def new_model(model_dir, seed: int = 99) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(load_tokenizer(str(model_dir)))).eval()


def commit(root, version: int, model) -> pathlib.Path:
    return write_checkpoint(root, version, lambda d: model.save_pretrained(d, safe_serialization=True))


def logprobs(stub, **call):
    request = belay_pb2.LogProbsRequest(prompt_ids=pack_int32(PROMPTS), response_ids=pack_int32(RESPONSES))
    return unpack_float32(stub.LogProbs(request, timeout=RPC_TIMEOUT, **call).logprobs)


def generates(stub, **call) -> None:
    request = belay_pb2.GenerateRequest(
        prompts=["Hi"], sampling=belay_pb2.SamplingParams(temperature=1.0, max_new_tokens=2, seed=0)
    )
    assert len(stub.Generate(request, timeout=RPC_TIMEOUT, **call).response_texts) == 1


def update(stub, version: int, path, **call):
    return stub.UpdateWeights(
        belay_pb2.UpdateWeightsRequest(version=version, checkpoint_path=str(path)), timeout=RPC_TIMEOUT, **call
    )


def update_error(stub, version: int, path) -> grpc.RpcError:
    return rpc_error(stub.UpdateWeights, belay_pb2.UpdateWeightsRequest(version=version, checkpoint_path=str(path)))


def version_of(stub, **call) -> int:
    return stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT, **call).policy_version


# --- UpdateWeights: only committed safetensors directories inside the checkpoint directory ---


@pytest.fixture(scope="module")
def policy(tiny_lm_dir, tmp_path_factory):
    """One loopback policy for every refusal below; each test leaves it at version 0."""
    base = tmp_path_factory.mktemp("paths")
    with running_policy(policy_config(tiny_lm_dir, base / "ckpt")) as running:
        running.base = base
        running.root = pathlib.Path(running.config.run.checkpoint_dir)
        running.root.mkdir(parents=True)
        running.outside = commit(base / "elsewhere", 1, new_model(tiny_lm_dir))  # a valid checkpoint, outside
        running.before = logprobs(running.stub)
        yield running


def assert_unchanged(policy) -> None:
    assert version_of(policy.stub) == 0
    for a, b in zip(logprobs(policy.stub), policy.before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "path",
    [
        "{root}/../elsewhere/v000001",
        "{root}/v000001/../../elsewhere/v000001",
        "{root}/../../../../../../../..{outside}",
        "{outside}",
        "/etc",
        "/",
        "{root}",
        "{root}/..",
        "v000001",
        "",
    ],
    ids=[
        "dotdot",
        "dotdot-deeper",
        "dotdot-to-root",
        "absolute-outside",
        "etc",
        "slash",
        "the-root-itself",
        "root-parent",
        "relative",
        "empty",
    ],
)
def test_paths_out_of_the_checkpoint_directory_are_refused(policy, path):
    path = path.format(root=policy.root, outside=policy.outside)
    error = update_error(policy.stub, 1, path)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(path) in error.details()
    assert_unchanged(policy)


def test_a_symlink_inside_the_directory_pointing_out_is_refused(policy):
    link = policy.root / "v000002"
    link.symlink_to(
        commit(policy.base / "elsewhere", 2, new_model(policy.config.policy.model_dir)), target_is_directory=True
    )
    error = update_error(policy.stub, 2, link)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(link) in error.details() and "symlink" in error.details()
    assert_unchanged(policy)


def test_a_checkpoint_whose_weights_file_links_out_is_refused(policy):
    real = commit(policy.root, 3, new_model(policy.config.policy.model_dir))
    weights = real / "model.safetensors"
    outside = policy.base / "stolen.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    error = update_error(policy.stub, 3, real)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.safetensors is a symlink" in error.details() and str(real) in error.details()
    assert_unchanged(policy)


def test_a_pickle_only_checkpoint_is_refused_and_the_old_weights_keep_serving(policy):
    model = new_model(policy.config.policy.model_dir)

    def pickle_only(directory):
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")

    path = write_checkpoint(policy.root, 4, pickle_only)
    error = update_error(policy.stub, 4, path)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no *.safetensors weights" in error.details() and "pytorch_model.bin" in error.details()
    assert "pickled weights are never loaded" in error.details()
    assert_unchanged(policy)


def test_a_corrupt_safetensors_file_is_refused_and_the_old_weights_keep_serving(policy):
    path = commit(policy.root, 5, new_model(policy.config.policy.model_dir))
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    error = update_error(policy.stub, 5, path)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 5 refused" in error.details()
    assert_unchanged(policy)


def test_after_the_refusals_a_committed_checkpoint_still_swaps(tiny_lm_dir, tmp_path):
    with running_policy(policy_config(tiny_lm_dir, tmp_path / "ckpt")) as running:
        path = commit(running.config.run.checkpoint_dir, 1, new_model(tiny_lm_dir))
        assert (
            update_error(running.stub, 1, f"{path}/../../ckpt/../../{tmp_path.name}/x").code()
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        # `..` that stays inside the directory is harmless: the resolved path is what counts
        assert update(running.stub, 1, f"{path}/../{path.name}").current_version == 1


# --- a policy beyond loopback ---


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LocalHost:1", True),
        ("[::1]:50051", True),
        ("[::ffff:127.0.0.1]:5", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.1.2.3:50051", False),
        ("192.168.0.7:1", False),
        ("example.com:50051", False),
        ("localhost.example.com:1", False),
        ("128.0.0.1:1", False),
    ],
)
def test_is_loopback_address(address, loopback):
    assert is_loopback_address(address) is loopback


def test_beyond_loopback_without_a_token_update_weights_is_denied_and_the_rest_works(tiny_lm_dir, tmp_path):
    config = policy_config(tiny_lm_dir, tmp_path / "ckpt", address="0.0.0.0:0")
    with running_policy(config) as running:
        path = commit(config.run.checkpoint_dir, 1, new_model(tiny_lm_dir))
        with channel(f"127.0.0.1:{running.server.port}", config.grpc) as chan:
            stub = belay_pb2_grpc.PolicyStub(chan)
            error = update_error(stub, 1, path)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "grpc.auth_token_file" in error.details()
            generates(stub)
            assert len(logprobs(stub)) == 2
            assert version_of(stub) == 0


def test_beyond_loopback_with_a_token_update_weights_works_for_its_holder(tiny_lm_dir, tmp_path):
    token = write_token(tmp_path / "token", "s3cret-weights")
    config = policy_config(tiny_lm_dir, tmp_path / "ckpt", address="0.0.0.0:0", auth_token_file=str(token))
    with running_policy(config) as running:
        path = commit(config.run.checkpoint_dir, 1, new_model(tiny_lm_dir))
        address = f"127.0.0.1:{running.server.port}"
        with grpc.insecure_channel(address) as bare:
            error = update_error(belay_pb2_grpc.PolicyStub(bare), 1, path)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        with channel(address, config.grpc) as chan:
            assert update(belay_pb2_grpc.PolicyStub(chan), 1, path).current_version == 1


# --- the bearer token ---


def write_token(path: pathlib.Path, token: str) -> pathlib.Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def token_policy(tiny_lm_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("token")
    config = policy_config(tiny_lm_dir, base / "ckpt", auth_token_file=str(write_token(base / "token", "right-token")))
    with running_policy(config) as running:  # running.stub is a channel() of the same config: it has the token
        yield running


def bare_stub(running, stub_class=belay_pb2_grpc.PolicyStub):
    chan = grpc.insecure_channel(running.address)
    return chan, stub_class(chan)


def test_a_call_without_the_token_is_unauthenticated(token_policy):
    chan, stub = bare_stub(token_policy)
    with chan:
        for method, request in [
            (stub.Info, belay_pb2.InfoRequest()),
            (stub.UpdateWeights, belay_pb2.UpdateWeightsRequest(version=1, checkpoint_path="/etc")),
            (stub.Generate, belay_pb2.GenerateRequest(prompts=["Hi"])),
            (stub.LogProbs, belay_pb2.LogProbsRequest()),
        ]:
            error = rpc_error(method, request)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in error.details()
        # an unknown method is refused the same way: which methods exist is for token holders only
        unknown = chan.unary_unary("/belay.v1.Policy/Nope")
        with pytest.raises(grpc.RpcError) as caught:
            unknown(b"", timeout=SHORT)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "value",
    [
        "Bearer wrong-token",
        "Bearer right-toke",
        "Bearer right-token2",
        "right-token",
        "bearer right-token",
        "Bearer ",
        "Basic cmlnaHQtdG9rZW4=",
    ],
)
def test_a_wrong_token_is_permission_denied(token_policy, value):
    chan, stub = bare_stub(token_policy)
    with chan:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Info(belay_pb2.InfoRequest(), timeout=SHORT, metadata=[("authorization", value)])
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # the other methods too
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateWeights(
                belay_pb2.UpdateWeightsRequest(version=1), timeout=SHORT, metadata=[("authorization", value)]
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_two_authorization_headers_are_refused(token_policy):
    chan, stub = bare_stub(token_policy)
    with chan:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Info(
                belay_pb2.InfoRequest(),
                timeout=SHORT,
                metadata=[("authorization", "Bearer right-token"), ("authorization", "Bearer other")],
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_right_token_through_channel_works(token_policy):
    assert version_of(token_policy.stub) == 0
    generates(token_policy.stub)
    assert len(logprobs(token_policy.stub)) == 2
    # and by hand, as any other client would send it
    chan, stub = bare_stub(token_policy)
    with chan:
        assert version_of(stub, metadata=[("authorization", "Bearer right-token")]) == 0


def test_a_client_with_another_token_file_is_denied(token_policy, tmp_path):
    other = GrpcConfig(auth_token_file=str(write_token(tmp_path / "other", "not-the-right-one")))
    with channel(token_policy.address, other) as chan:
        with pytest.raises(grpc.RpcError) as caught:
            belay_pb2_grpc.PolicyStub(chan).Info(belay_pb2.InfoRequest(), timeout=SHORT)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_stay_open_without_the_token(token_policy):
    chan, _ = bare_stub(token_policy)
    with chan:
        health = health_pb2_grpc.HealthStub(chan)
        for service in ["", "belay.v1.Policy"]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=SHORT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(chan).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=SHORT
        )
        names = {s.name for s in next(stream).list_services_response.service}
        assert "belay.v1.Policy" in names


def test_token_files_that_cannot_serve_stop_start_up_naming_the_field(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    for name, words in [(tmp_path / "absent", "does not exist"), (empty, "is empty")]:
        with pytest.raises(ConfigError, match=rf"grpc\.auth_token_file: .*{name} {words}"):
            load_config(environ={"BELAY_GRPC__AUTH_TOKEN_FILE": str(name)})
    # a file that goes away (or empties) after the config was loaded: the server or client says so
    token = write_token(tmp_path / "token", "abc")
    config = GrpcConfig(auth_token_file=str(token))
    assert read_auth_token(config) == "abc"
    token.write_text("\n")
    with pytest.raises(ConfigError, match=r"grpc\.auth_token_file: .*token is empty"):
        ServiceServer("127.0.0.1:0", config, ["belay.v1.Reward"])
    token.unlink()
    with pytest.raises(ConfigError, match=r"grpc\.auth_token_file: .*token does not exist"):
        channel("127.0.0.1:1", config)
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    with pytest.raises(ConfigError, match=r"grpc\.auth_token_file: .*without spaces"):
        read_auth_token(GrpcConfig(auth_token_file=str(spaced)))
    assert read_auth_token(GrpcConfig()) is None


def test_the_token_file_is_read_once_at_start(tiny_lm_dir, tmp_path):
    token = write_token(tmp_path / "token", "first")
    config = make_config({"auth_token_file": str(token)}, reward={"backend": "vader"})
    with running_reward(config) as running:
        token.write_text("second\n")  # a later change does not reach a running server or client
        assert running.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT).service == "reward"
        chan = grpc.insecure_channel(running.address)
        with chan:
            with pytest.raises(grpc.RpcError) as caught:
                belay_pb2_grpc.RewardStub(chan).Info(
                    belay_pb2.InfoRequest(), timeout=SHORT, metadata=[("authorization", "Bearer second")]
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- TLS ---


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(directory: pathlib.Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_server_cert(directory: pathlib.Path, ca_key, ca_cert) -> tuple[pathlib.Path, pathlib.Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = make_ca(directory, "belay-test-ca")
    cert, key = make_server_cert(directory, ca_key, ca_cert)
    _, _, other_ca = make_ca(directory, "another-ca")
    return {
        "tls_cert_file": str(cert),
        "tls_key_file": str(key),
        "tls_ca_file": str(ca_path),
        "other_ca": str(other_ca),
        "dir": directory,
    }


def tls_fields(pki) -> dict:
    return {k: pki[k] for k in ("tls_cert_file", "tls_key_file", "tls_ca_file")}


def score(stub, **call):
    reply = stub.Score(
        belay_pb2.ScoreRequest(prompts=["Hi"], responses=["I love it, wonderful!"]), timeout=SHORT, **call
    )
    assert len(reply.scores) == 1 and reply.scores[0] > 0


def test_tls_server_talks_to_clients_that_trust_its_ca_only(pki):
    config = make_config(tls_fields(pki), reward={"backend": "vader"})
    with running_reward(config) as running:
        score(running.stub)  # running.stub: channel() with the same config, over TLS to 127.0.0.1
        port = running.server.port
        with channel(f"localhost:{port}", config.grpc) as chan:
            score(belay_pb2_grpc.RewardStub(chan))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.RpcError) as caught:
                score(belay_pb2_grpc.RewardStub(plain))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = config.grpc.model_copy(update={"tls_ca_file": pki["other_ca"]})
        with channel(f"127.0.0.1:{port}", stranger) as chan:
            with pytest.raises(grpc.RpcError) as caught:
                score(belay_pb2_grpc.RewardStub(chan))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_and_token_together(pki, tmp_path):
    token = write_token(tmp_path / "token", "tls-and-token")
    config = make_config({**tls_fields(pki), "auth_token_file": str(token)}, reward={"backend": "vader"})
    with running_reward(config) as running:
        score(running.stub)  # the token travels as call credentials over TLS
        no_token = config.grpc.model_copy(update={"auth_token_file": ""})
        with channel(running.address, no_token) as chan:
            with pytest.raises(grpc.RpcError) as caught:
                score(belay_pb2_grpc.RewardStub(chan))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(chan)  # open over TLS without the token
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="belay.v1.Reward"), timeout=SHORT).status
                == health_pb2.HealthCheckResponse.SERVING
            )


def test_tls_config_mistakes_are_named(pki, tmp_path):
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        GrpcConfig(tls_cert_file=pki["tls_cert_file"])
    with pytest.raises(ValueError, match="tls_ca_file is set but"):
        GrpcConfig(tls_ca_file=pki["tls_ca_file"])
    with pytest.raises(ConfigError, match=r"grpc\.tls_key_file: .*nokey does not exist"):
        load_config(
            environ={
                "BELAY_GRPC__TLS_CERT_FILE": pki["tls_cert_file"],
                "BELAY_GRPC__TLS_KEY_FILE": str(tmp_path / "nokey"),
            }
        )


# --- metrics ---


def _listening_hosts(port: int) -> set[str]:
    """Local addresses listening on `port`, from /proc/net/tcp (IPv4, hex little-endian)."""
    hosts = set()
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        host, _, hex_port = fields[1].partition(":")
        if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
            hosts.add(str(ipaddress.IPv4Address(bytes(reversed(bytes.fromhex(host))))))
    return hosts


@pytest.mark.skipif(not pathlib.Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_metrics_listen_on_loopback_by_default():
    port = free_port()
    assert serve_metrics(CollectorRegistry(), port, BelayConfig().run.metrics_address) == port
    assert _listening_hosts(port) == {"127.0.0.1"}
