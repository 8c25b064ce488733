"""`make test-compose`: docker-compose.yml brought up by a real engine (podman + podman-compose, with
docker-compose.cpu.yml and deploy/compose/podman-test.override.yml), checked from outside the
containers the way a user would look: healthchecks, the version key in Redis and the steps stream
(`compose exec redis redis-cli`), Prometheus's API on its published loopback port.

Runs only under `make test-compose` (BELAY_COMPOSE_TEST=1), after tests/compose/build_images.sh;
`make test` skips it. The tests share one stack and run in file order: a broken healthcheck first
(cheap: Redis alone), then the stack, the reward swap while it trains, and down/up. The project
name is unique to the run, and everything it made is removed at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.compose import stack as compose_stack
from tests.compose.stack import BASE_FILES, REWARD_EXAMPLE, StackError, log, new_stack

pytestmark = pytest.mark.skipif(
    os.environ.get("BELAY_COMPOSE_TEST") != "1", reason="the compose stack runs under `make test-compose` only"
)

PROJECT = f"belaytest{os.getpid()}"
EXAMPLE_REWARD_ID = "example-ends-with-full-stop"  # examples/reward_server/server.py's reward_model_id
VERSIONS_WANTED = 3
TRAINING_TIMEOUT = 900  # seconds for a few PPO updates on 2 cores with four model services


def wait_for(what: str, probe, timeout: float, every: float = 5.0):
    """probe() until it returns something truthy; StackError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = probe()
        except (StackError, OSError, ValueError) as error:
            value, last = None, error
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not seen within {timeout:.0f}s (last: {last!r})")
        time.sleep(every)


@pytest.fixture(scope="module", autouse=True)
def engine():
    missing = compose_stack.engine_ready()
    if missing:
        pytest.fail(f"make test-compose: {missing}")


@pytest.fixture(scope="module")
def stack(engine):
    stack = new_stack(PROJECT)
    stack.purge()
    started = time.monotonic()
    try:
        stack.bring_up()
        stack.timings["bring_up"] = time.monotonic() - started
        log(f"stack up in {stack.timings['bring_up']:.0f}s")
        yield stack
    finally:
        for service in ("trainer", "policy"):
            try:
                log(f"{service} log tail:\n{stack.logs(service, 15)}")
            except StackError:
                pass
        stack.purge()
        leftovers = compose_stack.podman(
            "ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}", check=False
        ).stdout.split()
        assert not leftovers, f"containers of {PROJECT} left behind: {leftovers}"


def version_key(stack) -> int:
    """The newest version the trainer announced: Redis key belay:<run>:policy_version, JSON
    {"version": N, "path": ...} (services/common/rollout_queue.py); -1 before the first."""
    value = stack.redis("GET", f"belay:{stack.env['RUN_NAME']}:policy_version")
    return int(json.loads(value)["version"]) if value else -1


def steps(stack) -> list[dict]:
    """The trainer's step summaries from the Redis steps stream, oldest first (rollback events,
    which publish an earlier version's weights again as a new version, included)."""
    raw = stack.redis("XRANGE", f"belay:{stack.env['RUN_NAME']}:steps", "-", "+")
    return [json.loads(line) for line in raw.splitlines() if line.startswith("{")]


def prometheus_value(stack, query: str) -> float | None:
    result = stack.prometheus("/api/v1/query", query=query)["result"]
    return max(float(series["value"][1]) for series in result) if result else None


# ------------------------------------------------------------------------------------------- tests


def test_a_broken_healthcheck_fails_naming_the_service(engine, tmp_path):
    """The health wait must bite: docker-compose.yml copied with Redis's healthcheck pointed at a
    port nothing listens on, Redis alone brought up: the wait fails and says `redis`."""
    original = (compose_stack.REPO / "docker-compose.yml").read_text()
    broken_text = original.replace(
        'test: ["CMD-SHELL", "redis-cli ping | grep -q PONG"]',
        'test: ["CMD-SHELL", "redis-cli -p 1 ping | grep -q PONG"]',
    )
    assert broken_text != original, "Redis's healthcheck in docker-compose.yml changed: update this test"
    broken = compose_stack.REPO / "build/compose" / f"broken-{PROJECT}.yml"  # beside nothing: no paths used
    broken.write_text(broken_text)
    files = [broken, *BASE_FILES[1:]]
    stack = new_stack(f"{PROJECT}broken", files)
    try:
        with pytest.raises(StackError) as failure:
            stack.bring_up(["redis"], health_timeout=90)
        assert str(failure.value).startswith("redis:"), failure.value
        assert "redis-cli -p 1 ping" in str(failure.value)
        log(f"broken healthcheck reported as: {str(failure.value).splitlines()[0]}")
    finally:
        stack.purge()
        broken.unlink()


def test_every_healthcheck_passes(stack):
    config = stack.config()
    checked = []
    for name, service in stack.active_services(config).items():
        if service.get("healthcheck"):
            stack.wait_healthy(name, service["healthcheck"], timeout=60)
            checked.append(name)
    assert set(checked) == {"redis", "reference", "reward", "policy", "trainer", "prometheus", "alertmanager"}
    assert "grafana" not in stack.active_services(config), "Grafana cannot run here: the override keeps it out"


def test_the_trainer_publishes_versions_the_policy_serves(stack):
    started = time.monotonic()
    # The trainer publishes a version (the Redis key) before it writes that step's summary to the
    # steps stream, so the stream is the one to wait on; the key is then at least as new.
    wait_for(
        f"trainer: step summary of policy version {VERSIONS_WANTED} in the steps stream",
        lambda: any(step["version"] >= VERSIONS_WANTED for step in steps(stack)),
        TRAINING_TIMEOUT,
    )
    stack.timings["three_versions"] = time.monotonic() - started
    recorded = [step["version"] for step in steps(stack)]
    log(f"versions {recorded} after {stack.timings['three_versions']:.0f}s of training")
    assert recorded == sorted(set(recorded)), recorded
    assert version_key(stack) >= recorded[-1], (version_key(stack), recorded)
    wait_for(
        "prometheus: belay_trainer_policy_version scraped",
        lambda: (prometheus_value(stack, "belay_trainer_policy_version") or 0) >= VERSIONS_WANTED,
        120,
    )
    wait_for(
        "policy: belay_policy_version serving a trained version",
        lambda: (prometheus_value(stack, "belay_policy_version") or 0) >= 1,
        120,
    )


def test_kl_series_and_alert_rule_on_prometheus(stack):
    series = wait_for(
        "prometheus: belay_trainer_kl_per_sequence samples",
        lambda: stack.prometheus("/api/v1/query", query="count_over_time(belay_trainer_kl_per_sequence[30m])")[
            "result"
        ],
        120,
    )
    assert series[0]["metric"].get("job") == "trainer", series
    assert float(series[0]["value"][1]) >= 1
    kl = prometheus_value(stack, "belay_trainer_kl_per_sequence")
    assert kl is not None and kl == kl, f"KL per sequence is {kl}"
    rules = [rule for group in stack.prometheus("/api/v1/rules")["groups"] for rule in group["rules"]]
    kl_rule = [rule for rule in rules if rule.get("name") == "BelayKLDivergenceHigh"]
    assert kl_rule, f"prometheus: the KL alert rule is not loaded (rules: {[r.get('name') for r in rules]})"
    assert kl_rule[0]["health"] == "ok", kl_rule[0]
    managers = stack.prometheus("/api/v1/alertmanagers")["activeAlertmanagers"]
    assert any("alertmanager:9093" in manager["url"] for manager in managers), managers
    targets = stack.prometheus("/api/v1/targets")["activeTargets"]
    down = [(t["labels"]["job"], t.get("lastError")) for t in targets if t["health"] != "up"]
    assert not down, f"prometheus: scrape targets down: {down}"


def test_reward_swapped_while_training_goes_on(stack):
    before = version_key(stack)
    started = time.monotonic()
    stack.replace("reward", [*BASE_FILES, REWARD_EXAMPLE])
    log(f"reward swapped for the example server in {time.monotonic() - started:.0f}s at version {before}")
    assert "belay-reward-example" in stack.inspect("reward")["ImageName"]
    swapped = wait_for(
        f"trainer: a step trained on rollouts scored by {EXAMPLE_REWARD_ID}",
        lambda: [s for s in steps(stack) if EXAMPLE_REWARD_ID in s.get("reward_model_ids", [])],
        TRAINING_TIMEOUT,
    )
    assert swapped[0]["version"] > before, (swapped[0]["version"], before)
    assert version_key(stack) > before
    for name in ("policy", "trainer"):  # trained on throughout: never restarted by the swap
        assert stack.inspect(name)["RestartCount"] == 0, f"{name} restarted during the reward swap"
    wait_for(
        "prometheus: belay_trainer_reward_model_info of the example reward",
        lambda: (
            prometheus_value(stack, f'belay_trainer_reward_model_info{{reward_model_id="{EXAMPLE_REWARD_ID}"}}') == 1
        ),
        120,
    )


def test_down_then_up_resumes_from_the_last_version_with_nothing_lost(stack):
    rollouts = f"belay:{stack.env['RUN_NAME']}:rollouts"
    rollouts_before = int(stack.redis("XLEN", rollouts))
    recorded_before = steps(stack)
    started = time.monotonic()
    stack.down()  # containers and network gone, volumes kept
    stack.timings["down"] = time.monotonic() - started
    assert not compose_stack.podman(
        "ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={stack.project}"
    ).stdout.split()
    started = time.monotonic()
    stack.bring_up(["redis"])
    published = version_key(stack)  # what the trainer announced last, kept by Redis's AOF
    kept = steps(stack)
    # the trainer, stopped first, finished its step: persisted, announced, logged and acknowledged
    assert kept[: len(recorded_before)] == recorded_before, "Redis lost steps across down/up"
    assert kept[-1]["version"] == published, (kept[-1], published)
    assert int(stack.redis("XLEN", rollouts)) >= rollouts_before, "Redis lost rollouts across down/up"
    stack.bring_up()
    stack.timings["up_again"] = time.monotonic() - started
    log(f"down {stack.timings['down']:.0f}s, up again {stack.timings['up_again']:.0f}s, at version {published}")
    resumed = wait_for("trainer: a new version after up", lambda: steps(stack)[len(kept) :], TRAINING_TIMEOUT)
    # every version was persisted (checkpoint_every_steps 1): the trainer resumed from the last one
    # published and numbers the next above it, never reusing one
    assert resumed[0]["version"] == published + 1, (resumed[0]["version"], published)
    versions = [step["version"] for step in steps(stack)]
    assert versions == sorted(set(versions)), f"a version was published twice: {versions}"
    wait_for(
        "policy: serving a version published after up",
        lambda: (prometheus_value(stack, "belay_policy_version") or 0) > published,
        300,
    )
    pending = stack.redis("XPENDING", f"belay:{stack.env['RUN_NAME']}:rollouts", "trainers")
    timings = json.dumps({k: round(v) for k, v in stack.timings.items()})
    log(f"timings: {timings}; pending after up: {pending.splitlines()[:1]}")
