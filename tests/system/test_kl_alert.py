"""BelayKLDivergenceHigh end to end: a real Prometheus scrapes a real local run (LocalStack: redis and
the four services as processes, on the tiny models of stack_config), evaluates the repository's alert
rules, and notifies a real Alertmanager, which delivers to a webhook recorded here.

A run pushed past the KL bound (β = 0, lr 0.05: KL climbs within a few updates) fires the alert,
which reaches Alertmanager and its receiver; a healthy run (β = 1, lr 1e-6) watched over the same
window (as long from starting the services, and at least as many updates) never even makes it pending.

The only changes to the deployed configuration, all made here from the files in deploy/:
- prometheus.yml: scrape and evaluation intervals 1 s, targets 127.0.0.1:<the run's metrics ports>
  (same job names), the alertmanager target, and rule_files -> the rewritten copy below;
- rules/belay.yml: in BelayKLDivergenceHigh only, `for` becomes 3 s and the bound, which is per
  response, is scaled to the test's response length: bound x policy.max_new_tokens / 128 (the
  default), i.e. the same bound per token (10 nats x 12 / 128 = 0.94 nats here). The expression
  is otherwise the real one; every other rule is copied as it is;
- alertmanager.yml: the webhook URL -> the recorder here, group_wait -> 1 s.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import pathlib
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from services.common.config import BelayConfig, PolicyConfig
from services.common.rollout_queue import RolloutQueue
from services.local_stack import LocalStack, tail
from tests.conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "deploy/prometheus/prometheus.yml"
RULES = REPO / "deploy/prometheus/rules/belay.yml"
ALERTMANAGER_CONFIG = REPO / "deploy/alertmanager/alertmanager.yml"
ALERT = "BelayKLDivergenceHigh"
DEFAULT_MAX_NEW_TOKENS = PolicyConfig.model_fields["max_new_tokens"].default
TEST_FOR = "3s"
FIRE_DEADLINE = 75.0  # seconds from the trainer's readiness to the alert firing (about 10 s on 2 cores)


def binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    pytest.fail(
        f"{' or '.join(names)} is not installed; `make test` installs it "
        "(Debian: apt-get install prometheus prometheus-alertmanager)"
    )


def get_json(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_ready(url: str, process: subprocess.Popen, log: pathlib.Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url} exited with {process.returncode}:\n{tail(log)}"
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout:.0f} s:\n{tail(log)}")


def write_test_rules(out: pathlib.Path, max_new_tokens: int) -> float:
    """Writes the rule copy described in the module docstring; returns the test's KL bound."""
    rules = yaml.safe_load(RULES.read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    match = re.fullmatch(r"(.*\S)\s*>\s*([0-9.]+)", rule["expr"].strip(), re.DOTALL)
    assert match, f"{ALERT}'s expression is expected as `<expression> > <bound>`: {rule['expr']!r}"
    bound = float(match[2]) * max_new_tokens / DEFAULT_MAX_NEW_TOKENS
    rule["expr"] = f"{match[1]} > {bound:g}"
    rule["for"] = TEST_FOR
    out.write_text(yaml.safe_dump(rules, sort_keys=False))
    return float(f"{bound:g}")


def prometheus_config(config: BelayConfig, rules: pathlib.Path, alertmanager_port: int) -> dict:
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    ports = {
        "policy": config.policy.metrics_port,
        "reference": config.reference.metrics_port,
        "reward": config.reward.metrics_port,
        "trainer": config.trainer.metrics_port,
    }
    assert {job["job_name"] for job in prometheus["scrape_configs"]} == set(ports)
    prometheus["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    prometheus["rule_files"] = [str(rules)]
    prometheus["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    for job in prometheus["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return prometheus


def alertmanager_config(webhook_url: str) -> dict:
    alertmanager = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    alertmanager["route"]["group_wait"] = "1s"
    for receiver in alertmanager["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    return alertmanager


class Recorder(http.server.BaseHTTPRequestHandler):
    """Alertmanager's webhook receiver: keeps every notification's JSON body."""

    received: list[dict]

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_config(base: BelayConfig, run_dir: pathlib.Path, kl_coef: float, lr: float) -> BelayConfig:
    """stack_config's run (tiny models, small batches) on fresh ports, with this β and learning rate,
    training until stopped."""
    data = copy.deepcopy(base.model_dump(mode="json"))
    ports = [free_port() for _ in range(8)]
    data["run"]["checkpoint_dir"] = str(run_dir / "checkpoints")
    data["redis"]["url"] = f"redis://127.0.0.1:{ports[0]}/0"
    data["policy"].update(address=f"127.0.0.1:{ports[1]}", metrics_port=ports[2])
    data["reference"].update(address=f"127.0.0.1:{ports[3]}", metrics_port=ports[4])
    data["reward"].update(address=f"127.0.0.1:{ports[5]}", metrics_port=ports[6])
    data["trainer"].update(
        metrics_port=ports[7], policy_address=data["policy"]["address"], kl_coef=kl_coef, lr=lr, max_steps=0
    )
    return BelayConfig.model_validate(data)


class MonitoredRun:
    def __init__(
        self,
        config: BelayConfig,
        stack: LocalStack,
        prometheus: str,
        alertmanager: str,
        received: list[dict],
        bound: float,
        logs: dict[str, pathlib.Path],
        started_at: float,
    ):
        self.config, self.stack, self.prometheus, self.alertmanager = config, stack, prometheus, alertmanager
        self.received, self.bound, self.logs = received, bound, logs
        self.started_at = started_at  # the services were started (the trainer may step before it is seen ready)
        self.ready_at = time.monotonic()

    def alerts(self) -> list[dict]:
        """Prometheus's active alerts (pending or firing) named ALERT."""
        return [
            a
            for a in get_json(f"{self.prometheus}/api/v1/alerts")["data"]["alerts"]
            if a["labels"]["alertname"] == ALERT
        ]

    def query(self, promql: str) -> list[dict]:
        reply = get_json(f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def alertmanager_alerts(self) -> list[dict]:
        query = urllib.parse.urlencode({"filter": f'alertname="{ALERT}"'})
        return get_json(f"{self.alertmanager}/api/v2/alerts?{query}")

    def steps(self) -> int:
        return len(RolloutQueue.from_url(self.config.redis.url, self.config.run.name).read_steps("0-0"))

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name}:\n{tail(path, 15)}" for name, path in self.logs.items())


@contextlib.contextmanager
def monitored_run(base: BelayConfig, directory: pathlib.Path, kl_coef: float, lr: float):
    """Alertmanager (+ webhook recorder), Prometheus, then the stack; all stopped on the way out."""
    directory.mkdir(parents=True)
    config = run_config(base, directory / "run", kl_coef, lr)
    prometheus_bin, alertmanager_bin = binary("prometheus"), binary("prometheus-alertmanager", "alertmanager")
    bound = write_test_rules(directory / "belay.yml", config.policy.max_new_tokens)
    received: list[dict] = []
    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("R", (Recorder,), {"received": received}))
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    am_port, prom_port = free_port(), free_port()
    (directory / "alertmanager.yml").write_text(
        yaml.safe_dump(alertmanager_config(f"http://127.0.0.1:{recorder.server_port}/belay-alerts"))
    )
    (directory / "prometheus.yml").write_text(
        yaml.safe_dump(prometheus_config(config, directory / "belay.yml", am_port))
    )
    logs = {"alertmanager": directory / "alertmanager.log", "prometheus": directory / "prometheus.log"}
    processes: list[subprocess.Popen] = []
    stack = LocalStack(config, directory / "run", say=lambda *_: None)
    try:
        with open(logs["alertmanager"], "wb") as log:
            processes.append(
                subprocess.Popen(
                    [
                        alertmanager_bin,
                        f"--config.file={directory / 'alertmanager.yml'}",
                        f"--storage.path={directory / 'alertmanager-data'}",
                        f"--web.listen-address=127.0.0.1:{am_port}",
                        "--cluster.listen-address=",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        with open(logs["prometheus"], "wb") as log:
            processes.append(
                subprocess.Popen(
                    [
                        prometheus_bin,
                        f"--config.file={directory / 'prometheus.yml'}",
                        f"--storage.tsdb.path={directory / 'prometheus-data'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        wait_ready(f"http://127.0.0.1:{am_port}", processes[0], logs["alertmanager"])
        wait_ready(f"http://127.0.0.1:{prom_port}", processes[1], logs["prometheus"])
        started_at = time.monotonic()
        stack.start()
        stack.wait_healthy(180)
        logs.update({name: process.log_path for name, process in stack.processes.items() if name != "redis"})
        yield MonitoredRun(
            config,
            stack,
            f"http://127.0.0.1:{prom_port}",
            f"http://127.0.0.1:{am_port}",
            received,
            bound,
            logs,
            started_at,
        )
    finally:
        stack.stop(grace=30)
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        recorder.shutdown()
        recorder.server_close()


def test_kl_alert_fires_on_a_runaway_run_and_stays_silent_on_a_healthy_one(stack_config, tmp_path):
    # --- runaway: no KL penalty, a learning rate 2,500x the demo's -------------------------------
    with monitored_run(stack_config, tmp_path / "runaway", kl_coef=0.0, lr=0.05) as run:
        assert run.bound == pytest.approx(10 * stack_config.policy.max_new_tokens / DEFAULT_MAX_NEW_TOKENS)
        seen_pending, firing = False, None
        while firing is None:
            run.stack.check_alive()
            assert time.monotonic() - run.ready_at < FIRE_DEADLINE, (
                f"{ALERT} did not fire within {FIRE_DEADLINE:.0f} s; KL per response: "
                f"{run.query('belay_trainer_kl_per_sequence')}\n{run.diagnostics()}"
            )
            for alert in run.alerts():
                seen_pending |= alert["state"] == "pending"
                if alert["state"] == "firing":
                    firing = alert
            time.sleep(0.25)
        window = time.monotonic() - run.started_at
        steps_to_fire = run.steps()
        assert firing["labels"] == {
            "alertname": ALERT,
            "severity": "critical",
            "job": "trainer",
            "instance": f"127.0.0.1:{run.config.trainer.metrics_port}",
        }
        assert float(firing["value"]) > run.bound
        assert firing["annotations"]["runbook"].startswith("KL coefficient too small or learning rate too high")
        # it was pending first (for: 3 s), as Prometheus's own ALERTS series records
        assert seen_pending or run.query(f'max_over_time(ALERTS{{alertname="{ALERT}",alertstate="pending"}}[5m])')

        # Prometheus notifies Alertmanager, which routes it (grouped by alertname) to the receiver.
        deadline = time.monotonic() + 30
        while not [a for a in run.alertmanager_alerts() if a["status"]["state"] == "active"]:
            assert time.monotonic() < deadline, f"{ALERT} never reached Alertmanager\n{run.diagnostics()}"
            time.sleep(0.25)
        [received] = [a for a in run.alertmanager_alerts() if a["status"]["state"] == "active"]
        assert received["labels"]["job"] == "trainer" and received["labels"]["severity"] == "critical"
        while not [n for n in run.received if n["groupLabels"] == {"alertname": ALERT}]:
            assert time.monotonic() < deadline, f"Alertmanager never notified the receiver\n{run.diagnostics()}"
            time.sleep(0.25)
        notification = next(n for n in run.received if n["groupLabels"] == {"alertname": ALERT})
        assert notification["status"] == "firing" and notification["receiver"] == "belay-webhook"
        assert notification["alerts"][0]["annotations"]["runbook"] == firing["annotations"]["runbook"]

    # --- healthy: a large β and a tiny learning rate, watched over the same window ---------------
    with monitored_run(stack_config, tmp_path / "healthy", kl_coef=1.0, lr=1e-6) as run:
        watch = window + 3  # the runaway's time from start to firing, plus a margin of 3 evaluations
        deadline = time.monotonic() + watch + FIRE_DEADLINE
        while time.monotonic() - run.started_at < watch or run.steps() < steps_to_fire:
            run.stack.check_alive()
            assert time.monotonic() < deadline, f"the healthy run made {run.steps()} of {steps_to_fire} steps"
            assert not run.alerts(), f"{ALERT} on a healthy run: {run.alerts()}"
            time.sleep(0.25)
        elapsed = int(time.monotonic() - run.started_at) + 1
        # The rule was evaluated against real samples of the KL gauge, all below the bound...
        [kl] = run.query(f"max_over_time(belay_trainer_kl_per_sequence[{elapsed}s])")
        assert kl["metric"]["job"] == "trainer" and float(kl["value"][1]) < run.bound
        [samples] = run.query(f"count_over_time(belay_trainer_kl_per_sequence[{elapsed}s])")
        assert float(samples["value"][1]) >= max(5.0, (time.monotonic() - run.ready_at) / 2)  # scraped each ~1 s
        [group] = [
            g
            for g in get_json(f"{run.prometheus}/api/v1/rules")["data"]["groups"]
            if any(r["name"] == ALERT for r in g["rules"])
        ]
        [rule] = [r for r in group["rules"] if r["name"] == ALERT]
        assert rule["health"] == "ok" and rule["state"] == "inactive"
        # ...and it never went pending or firing over the window (ALERTS records both), nor reached
        # Alertmanager or its receiver.
        assert run.query(f'count_over_time(ALERTS{{alertname="{ALERT}"}}[{elapsed}s])') == []
        assert run.alertmanager_alerts() == []
        assert not [n for n in run.received if n["groupLabels"] == {"alertname": ALERT}]
        assert run.steps() >= steps_to_fire
