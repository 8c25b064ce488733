"""The monitoring configuration in deploy/ is valid and speaks of metrics that exist.

Prometheus's own tools check the scrape config, the alert rules and their unit tests, amtool checks
Alertmanager's config; the Grafana provisioning files parse and name the fixed data-source uid; and
every metric name in the rules, the dashboard and the Grafana alerts is one the services export,
collected from the real metric objects the services build (a renamed metric fails here, not on a
silent dashboard)."""

from __future__ import annotations

import glob
import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from services.common.config import BelayConfig
from services.common.metrics import run_info
from services.policy.canaries import Canaries
from services.policy.policy_metrics import PolicyMetrics
from services.reference.server import ReferenceServicer
from services.reward.server import RewardServicer
from services.trainer.review import ReviewMetrics
from services.trainer.trainer_metrics import TrainerMetrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/belay.yml"
RULE_TESTS = ROOT / "deploy/prometheus/rules/belay_test.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy/alertmanager/alertmanager.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/belay.json"
GRAFANA_ALERTS = GRAFANA / "provisioning/alerting/belay-alerts.yaml"
DATASOURCE_UID = "belay-prometheus"
EXPRESSION_UID = "__expr__"  # Grafana's server-side expressions (reduce, threshold) in alert rules

SERVICES = {"policy": 9101, "reference": 9102, "reward": 9103, "trainer": 9104}
ALERTS = {
    "BelayKLDivergenceHigh",
    "BelayServiceDown",
    "BelayRolloutQueueBacklog",
    "BelayStaleRollouts",
    "BelayNonFiniteSkips",
    "BelayTrainerStalled",
    "BelayPersistOverdue",
    # the failure detectors (services/trainer/detectors.py)
    "BelayRewardHacking",
    "BelayResponsesShrinking",
    "BelayTemplateCollapse",
    "BelayPolicyNotMoving",
    "BelayCanaryDegenerate",  # the fifth, on the policy's greedy canary answers (services/policy/canaries.py)
}
PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself for every target


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed; `make test` installs it (Debian: apt-get install prometheus "
            "prometheus-alertmanager, which ship promtool and amtool)"
        )
    return path


def run_tool(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed (exit {result.returncode}):\n{output}"
    return output


# --- Prometheus's and Alertmanager's own checks ---------------------------------------------------


def test_promtool_checks_the_scrape_config_and_resolves_its_rule_files():
    output = run_tool(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS" in output
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # rule files resolve relative to the config file, as Prometheus resolves them, and are all found
    resolved = [hit for pattern in config["rule_files"] for hit in glob.glob(str(PROMETHEUS_CONFIG.parent / pattern))]
    assert [pathlib.Path(p).resolve() for p in resolved] == [RULES.resolve()]
    assert f"SUCCESS: {len(resolved)} rule files found" in output
    # one job per service, by Compose service name and default metrics port
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in config["scrape_configs"]
    }
    assert jobs == {name: [f"{name}:{port}"] for name, port in SERVICES.items()}
    assert config["global"]["scrape_interval"] == "15s"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_promtool_checks_the_alert_rules():
    output = run_tool(tool("promtool"), "check", "rules", str(RULES))
    assert f"SUCCESS: {len(ALERTS)} rules found" in output


def test_promtool_unit_tests_of_the_alert_rules_pass():
    output = run_tool(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in output
    # every alert has at least one unit test that expects it to fire
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert fired == ALERTS


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests are sensitive: the same tests against rules whose KL bound was raised tenfold fail."""
    (tmp_path / "belay.yml").write_text(
        RULES.read_text().replace("belay_trainer_kl_per_sequence > 10", "belay_trainer_kl_per_sequence > 100")
    )
    shutil.copy(RULE_TESTS, tmp_path / "belay_test.yml")
    result = subprocess.run(
        [tool("promtool"), "test", "rules", str(tmp_path / "belay_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "BelayKLDivergenceHigh" in result.stdout + result.stderr


def test_amtool_checks_the_alertmanager_config():
    output = run_tool(tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))
    assert "SUCCESS" in output
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config["route"]["group_by"] == ["alertname"]
    assert [r["name"] for r in config["receivers"]] == [config["route"]["receiver"]]


# --- the rules' contents ---------------------------------------------------------------------------


def prometheus_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_has_a_severity_a_summary_and_a_one_line_runbook():
    rules = prometheus_rules()
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook.strip() and "\n" not in runbook.strip(), rule["alert"]
    kl = next(rule for rule in rules if rule["alert"] == "BelayKLDivergenceHigh")
    assert kl["annotations"]["runbook"] == (
        "KL coefficient too small or learning rate too high: raise "
        "trainer.kl_coef or lower trainer.lr; check samples for nonsense"
    )
    assert kl["labels"]["severity"] == "critical" and kl["for"] == "2m"


def kl_bound_in_prometheus() -> float:
    kl = next(rule for rule in prometheus_rules() if rule["alert"] == "BelayKLDivergenceHigh")
    match = re.fullmatch(r"belay_trainer_kl_per_sequence\s*>\s*([0-9.]+)", kl["expr"].strip())
    assert match, kl["expr"]
    return float(match[1])


# --- Grafana ---------------------------------------------------------------------------------------


def dashboard_panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def grafana_alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(GRAFANA_ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_grafana_provisioning_parses_and_names_the_fixed_datasource_uid():
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (DATASOURCE_UID, "prometheus", "http://prometheus:9090")

    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/belay.yml").read_text())
    assert providers["apiVersion"] == 1
    assert [p["options"]["path"] for p in providers["providers"]] == ["/var/lib/grafana/dashboards"]
    assert all(p["type"] == "file" for p in providers["providers"])

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels()
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_grafana_alert_rules_are_provisioned_with_kl_divergence_first():
    alerting = yaml.safe_load(GRAFANA_ALERTS.read_text())
    assert alerting["apiVersion"] == 1
    for group in alerting["groups"]:
        assert group["name"] and group["folder"] and group["interval"], group
    rules = grafana_alert_rules()
    assert rules[0]["title"] == "BelayKLDivergenceHigh"
    assert len({rule["uid"] for rule in rules}) == len(rules)
    for rule in rules:
        refs = {item["refId"]: item for item in rule["data"]}
        assert rule["condition"] in refs, rule["title"]
        queries = [item for item in rule["data"] if item["datasourceUid"] != EXPRESSION_UID]
        assert queries, rule["title"]
        for item in rule["data"]:
            assert item["datasourceUid"] in {DATASOURCE_UID, EXPRESSION_UID}, rule["title"]
            assert item["model"]["refId"] == item["refId"], rule["title"]
            if item["datasourceUid"] == EXPRESSION_UID:
                assert item["model"]["expression"] in refs, rule["title"]
        for query in queries:
            assert query["model"]["datasource"]["uid"] == DATASOURCE_UID and query["model"]["expr"].strip()
        assert rule["labels"]["severity"] and rule["annotations"]["summary"] and rule["annotations"]["runbook"]
    # the same KL bound, duration and runbook as the Prometheus rule
    kl = rules[0]
    [threshold] = [item["model"] for item in kl["data"] if item["model"].get("type") == "threshold"]
    assert threshold["conditions"][0]["evaluator"] == {"type": "gt", "params": [kl_bound_in_prometheus()]}
    prometheus_kl = next(rule for rule in prometheus_rules() if rule["alert"] == "BelayKLDivergenceHigh")
    assert kl["for"] == prometheus_kl["for"]
    assert kl["annotations"]["runbook"] == prometheus_kl["annotations"]["runbook"]


def test_the_dashboard_shows_the_training_signals_kl_first():
    panels = dashboard_panels()
    used = set().union(*(promql_metric_names(t["expr"]) for p in panels for t in p["targets"]))
    signals = {
        "belay_trainer_kl_per_sequence",
        "belay_trainer_kl_per_token",
        "belay_trainer_kl_coef",
        "belay_trainer_reward_mean",
        "belay_trainer_reward_std",
        "belay_trainer_response_length_tokens",
        "belay_trainer_entropy_nats",
        "belay_trainer_clip_fraction",
        "belay_trainer_approx_kl",
        "belay_trainer_policy_version",
        "belay_policy_version",
        "belay_policy_generated_tokens_total",
        "belay_trainer_rollouts_consumed_total",
        "belay_trainer_rollouts_dropped_total",
        "belay_trainer_step_seconds_bucket",
        "belay_trainer_policy_logprob_bucket",
    }
    assert signals <= used, f"signals missing from the dashboard: {sorted(signals - used)}"
    first = min(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    assert promql_metric_names(first["targets"][0]["expr"]) == {"belay_trainer_kl_per_sequence"}
    # its red line is the alert's bound
    assert first["fieldConfig"]["defaults"]["thresholds"]["steps"][-1] == {
        "color": "red",
        "value": kl_bound_in_prometheus(),
    }
    [heatmap] = [p for p in panels if p["type"] == "heatmap"]
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert promql_metric_names(heatmap["targets"][0]["expr"]) == {"belay_trainer_policy_logprob_bucket"}
    steps = [t["expr"] for p in panels for t in p["targets"] if "belay_trainer_step_seconds_bucket" in t["expr"]]
    assert steps and all(e.startswith("histogram_quantile(") for e in steps)
    dropped = [t for p in panels for t in p["targets"] if "belay_trainer_rollouts_dropped_total" in t["expr"]]
    assert any("by (reason)" in t["expr"] for t in dropped)


# --- every metric name used is exported -----------------------------------------------------------

KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions or
    aggregations (followed by "("), keywords, label names (inside {...} or by/on/... (...)),
    durations (inside [...]) or Grafana variables ($...)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        if match[2] is None and match[1] not in KEYWORDS:
            names.add(match[1])
    return names


def test_metric_name_parser_sees_through_promql():
    assert promql_metric_names(
        "(time() - belay_trainer_last_step_timestamp_seconds > 900) and on (job, instance) (belay_trainer_ready == 1)"
        " and on (job, instance) (max_over_time(belay_trainer_last_step_timestamp_seconds[15m]) == 0"
        " and on (job, instance) (belay_trainer_ready offset 15m == 1))"
    ) == {"belay_trainer_last_step_timestamp_seconds", "belay_trainer_ready"}
    assert promql_metric_names(
        "histogram_quantile(0.9, sum by (le, dependency) "
        '(rate(belay_policy_dependency_seconds_bucket{dependency="reward"}[$__rate_interval])))'
    ) == {"belay_policy_dependency_seconds_bucket"}
    assert promql_metric_names(
        'sum(rate(x_total[5m])) by (job) / ignoring(reason) 1e-6 > bool 0 or up{job=~"a|b"}'
    ) == {"x_total", "up"}


def exported_series_names() -> set[str]:
    """Every series name the services can export, from the real metric objects each one builds."""
    config = BelayConfig()
    registries = []
    for build in (
        TrainerMetrics,
        PolicyMetrics,
        lambda r: RewardServicer(config, r),
        lambda r: ReferenceServicer(config, r),
        lambda r: run_info(r, "trainer", "run", "model"),
        lambda r: Canaries(["a canary"], 8, store=None, registry=r),
        ReviewMetrics,
    ):
        registry = CollectorRegistry()
        build(registry)
        registries.append(registry)
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def used_expressions() -> dict[str, str]:
    """Where -> PromQL expression, for the rules, the dashboard and the Grafana alerts."""
    used = {f"rule {rule['alert']}": rule["expr"] for rule in prometheus_rules()}
    for panel in dashboard_panels():
        for target in panel["targets"]:
            used[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for rule in grafana_alert_rules():
        for item in rule["data"]:
            if "expr" in item["model"]:
                used[f"grafana alert {rule['title']} {item['refId']}"] = item["model"]["expr"]
    return used


def test_every_metric_name_in_rules_dashboard_and_grafana_alerts_is_exported_by_the_services():
    exported = exported_series_names()
    # the collection itself is real: each service's signature metric is in it
    assert {
        "belay_trainer_kl_per_sequence",
        "belay_policy_generated_tokens_total",
        "belay_reward_score_bucket",
        "belay_reference_logprobs_seconds_count",
        "belay_run_info",
    } <= exported
    unknown, used_names = {}, set()
    for where, expr in used_expressions().items():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric name found in {expr!r}"
        used_names |= names
        for name in names - exported - PROMETHEUS_OWN:
            unknown.setdefault(name, []).append(where)
    assert not unknown, f"metric names not exported by any service: {unknown}"
    assert len(used_names) >= 20  # rules + dashboard + alerts cover the signals, not a handful


def test_the_exported_name_check_catches_a_renamed_metric():
    exported = exported_series_names()
    assert "belay_trainer_kl_per_seq" not in exported
    assert "belay_trainer_kl_coef_bucket" not in exported  # a gauge has no buckets
    assert promql_metric_names("belay_trainer_kl_per_seq > 10") - exported == {"belay_trainer_kl_per_seq"}
