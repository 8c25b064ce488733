"""Each failure detector provoked as the issue asks, on a real loop: the real Actor samples with a
real tiny policy engine, scores over real gRPC (in-process reference and reward servers on loopback)
and writes to a real redis-server; the real Trainer reads, updates, checkpoints and announces, and
the actor swaps to each new version. The trainer's /metrics is served over HTTP and scraped after
every update. The scraped values must cross the detector's bound, the trainer must conclude it
(belay_trainer_detector_firing), and promtool, given the scraped series, must fire the repository's
real alert rule (deploy/prometheus/rules/belay.yml); a healthy run must raise none of them.

The four provocations: β = 0 with a high learning rate (reward hacking), a reward that pays for
brevity, a reward that pays for one phrase (tests/rewards.py), and a learning rate of 1e-12 (not
moving: trainer.lr must be > 0, so the smallest useful positive value stands in for 0).

Scraped series become promtool input at one sample per update, 1 minute apart; the last scrape is
then held for 10 more minutes, as a live trainer's gauges hold their last values between updates
(longer than any rule's `for`), and the alert is expected at the end."""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import subprocess
import threading
import urllib.request

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from services.common.models import load_causal_lm, load_tokenizer
from services.common.rollout_queue import RolloutQueue
from services.policy.actor import Actor
from services.policy.engine import PolicyEngine
from services.policy.policy_metrics import PolicyMetrics
from services.policy.swaps import SwapRequests
from services.trainer.detectors import DETECTORS, RUNBOOK
from services.trainer.trainer import Trainer
from services.trainer.trainer_metrics import TrainerMetrics
from tests.conftest import free_port

from .conftest import make_config, running_reference, running_reward

REPO = pathlib.Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/rules/belay.yml"
ALERTS = {
    "reward_hacking": "BelayRewardHacking",
    "shorter_responses": "BelayResponsesShrinking",
    "template_collapse": "BelayTemplateCollapse",
    "not_moving": "BelayPolicyNotMoving",
}
INSTANCE = "trainer:9104"
HOLD_MINUTES = 10


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every gauge sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.type == "gauge"
        for sample in family.samples
    }


@contextlib.contextmanager
def serving_metrics(registry: CollectorRegistry):
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_loop(
    tiny_lm_dir,
    tiny_reward_dir,
    redis_url,
    directory: pathlib.Path,
    updates: int,
    reward: dict | None = None,
    trainer: dict | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """`updates` synchronous iterations (sample, score, write; read, update, checkpoint, announce).
    Returns the scrapes after each update, the summaries, and the trainer's bounds."""
    reward = reward or {"backend": "hf_classifier", "model_dir": str(tiny_reward_dir)}
    config = make_config(
        run={"name": "detectors", "checkpoint_dir": str(directory / "checkpoints")},
        redis={"url": redis_url, "block_ms": 200},
        policy={
            "model_dir": str(tiny_lm_dir),
            "prompts_file": str(REPO / "prompts/default.txt"),
            "max_new_tokens": 12,
            "prompts_per_batch": 4,
            "samples_per_prompt": 2,
        },
        reference={"model_dir": str(tiny_lm_dir)},
        reward=reward,
        trainer={
            "model_dir": str(tiny_lm_dir),
            "batch_size": 8,
            "minibatch_size": 4,
            "ppo_epochs": 2,
            "metrics_port": 0,
            "detector_window": 4,
            "detector_kl_bound": 2.0,
            **(trainer or {}),
        },
    )
    device = torch.device("cpu")
    queue = RolloutQueue.from_url(redis_url, config.run.name)
    registry = CollectorRegistry()
    learner = Trainer(
        config,
        load_causal_lm(str(tiny_lm_dir), device, "trainer"),
        load_tokenizer(str(tiny_lm_dir)),
        queue,
        TrainerMetrics(registry),
    )
    engine = PolicyEngine(
        load_causal_lm(str(tiny_lm_dir), device, "policy"),
        load_tokenizer(str(tiny_lm_dir)),
        config.grpc,
    )
    scrapes, summaries = [], []
    with (
        running_reference(config) as reference,
        running_reward(config) as scorer,
        serving_metrics(registry) as metrics_url,
    ):
        actor = Actor(
            config, engine, queue, reference.stub, scorer.stub, SwapRequests(), PolicyMetrics(CollectorRegistry())
        )
        queue.ensure_group()
        stop = threading.Event()
        for _ in range(updates):
            actor.take_new_weights()
            actor.run_batch()
            summary = learner.step(learner.collect(stop))
            assert summary is not None and summary.stats.skipped_minibatches == 0
            summaries.append(summary)
            scrapes.append(scrape(metrics_url))
    return scrapes, summaries, learner.detectors.bounds


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def promtool_alerts(
    scrapes: list[dict],
    expected: dict[str, str | None],
    directory: pathlib.Path,
    job: str = "trainer",
    instance: str = INSTANCE,
) -> None:
    """Run the repository's rules over the scraped series (of a `job` service at `instance`) with
    promtool. expected: alert name -> the summary it must fire with at the end, or None: it must
    never fire (checked every minute)."""
    last = len(scrapes) - 1 + HOLD_MINUTES
    input_series = []
    for name, labels in sorted(scrapes[-1]):
        values = [s.get((name, labels), math.nan) for s in scrapes] + [scrapes[-1][(name, labels)]] * HOLD_MINUTES
        selector = ", ".join(f'{k}="{v}"' for k, v in (*labels, ("instance", instance), ("job", job)))
        input_series.append(
            {
                "series": f"{name}{{{selector}}}",
                "values": " ".join("NaN" if math.isnan(v) else repr(float(v)) for v in values),
            }
        )
    rules = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = []
    for alert, summary in expected.items():
        if summary is None:
            cases += [{"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": []} for minute in range(last + 1)]
        else:
            cases.append(
                {
                    "eval_time": f"{last}m",
                    "alertname": alert,
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": rules[alert]["labels"]["severity"],
                                "job": job,
                                "instance": instance,
                            },
                            "exp_annotations": {"summary": summary, "runbook": rules[alert]["annotations"]["runbook"]},
                        }
                    ],
                }
            )
    test_file = directory / "scraped_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "name": "the scraped run",
                        "interval": "1m",
                        "input_series": input_series,
                        "alert_rule_test": cases,
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        ["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool disagrees:\n{result.stdout}{result.stderr}"


def detector_verdicts(scraped: dict) -> dict[str, float]:
    return {name: value(scraped, "belay_trainer_detector_firing", detector=name) for name in DETECTORS}


# detector -> (updates, reward section or None for the tiny reward model, trainer overrides, why)
PROVOCATIONS = {
    # β = 0 and a learning rate 2,500x the demo's: KL passes the bound within 3 updates while the
    # reward keeps rising.
    "reward_hacking": (10, None, {"kl_coef": 0.0, "lr": 0.05}),
    # A reward paying for brevity: the tiny model learns to end early (12 -> ~1 token in 12 updates).
    "shorter_responses": (12, {"backend": "python", "function": "tests.rewards:brevity"}, {"lr": 0.03}),
    # A reward paying for one phrase: β = 0 and lr 0.05, so that a random 2-layer model settles on
    # the phrase's words (" is it is is ...") for every prompt within ~15 updates.
    "template_collapse": (
        18,
        {"backend": "python", "function": "tests.rewards:one_phrase"},
        {"kl_coef": 0.0, "lr": 0.05},
    ),
    # A learning rate of 1e-12 (the config refuses 0): KL stays ~0 and the reward only wanders.
    "not_moving": (8, None, {"lr": 1e-12}),
}
SUMMARY_VALUE = {
    "reward_hacking": ("belay_trainer_kl_per_sequence", "%.2f"),
    "shorter_responses": ("belay_trainer_response_length_ratio", "%.2f"),
    "template_collapse": ("belay_trainer_cross_prompt_similarity", "%.2f"),
    "not_moving": ("belay_trainer_kl_per_sequence_window_max", "%.3f"),
}


def expected_summary(detector: str, scraped: dict) -> str:
    """The rule's summary annotation, filled in here from the rule's template and the scraped value."""
    rules = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    name, form = SUMMARY_VALUE[detector]
    template = rules[ALERTS[detector]]["annotations"]["summary"]
    return template.replace(f'{{{{ $value | printf "{form}" }}}}', form % value(scraped, name)).replace(
        "{{ $labels.instance }}", INSTANCE
    )


@pytest.mark.parametrize("detector", list(PROVOCATIONS))
def test_each_provocation_crosses_its_bound_and_fires_its_alert(
    detector, tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path, caplog
):
    updates, reward, trainer = PROVOCATIONS[detector]
    with caplog.at_level(logging.WARNING, logger="services.trainer.monitoring"):
        scrapes, summaries, bounds = run_loop(
            tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path, updates, reward, trainer
        )
    last = scrapes[-1]
    # the metric crossed its bound (the bound as the trainer exports it, from its config)
    bound = lambda field: value(last, "belay_trainer_detector_bound", bound=field)  # noqa: E731
    assert {field: bound(field) for field in bounds} == bounds
    if detector == "reward_hacking":
        assert value(last, "belay_trainer_kl_per_sequence") > bound("detector_kl_bound")
        assert value(last, "belay_trainer_reward_slope_per_step") > 0
    elif detector == "shorter_responses":
        assert value(last, "belay_trainer_response_length_ratio") < bound("detector_length_ratio")
        assert summaries[-1].stats.response_length_mean < summaries[0].stats.response_length_mean / 2
    elif detector == "template_collapse":
        assert value(last, "belay_trainer_cross_prompt_similarity") > bound("detector_similarity_bound")
    else:
        assert value(last, "belay_trainer_kl_per_sequence_window_max") < bound("detector_still_kl")
        assert abs(value(last, "belay_trainer_reward_rise_ratio")) < bound("detector_flat_reward")
    # the trainer concluded it, said so in the summary, and logged the runbook line when it started
    assert detector_verdicts(last)[detector] == 1
    assert detector in summaries[-1].detectors_firing
    assert any(
        detector in record.getMessage() and RUNBOOK[detector] in record.getMessage() for record in caplog.records
    )
    # and the repository's alert rule fires on the scraped series
    promtool_alerts(scrapes, {ALERTS[detector]: expected_summary(detector, last)}, tmp_path)


def test_a_healthy_run_raises_no_detector(tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path):
    """stack_config's recipe (tiny reward model, β 0.05) at a learning rate of 1e-3: it learns (KL
    grows past detector_still_kl), and no detector fires at any update, nor any alert at any minute."""
    scrapes, summaries, bounds = run_loop(tiny_lm_dir, tiny_reward_dir, redis_url, tmp_path, 14, None, {"lr": 1e-3})
    assert all(s.detectors_firing == [] for s in summaries)
    assert all(detector_verdicts(scraped) == dict.fromkeys(DETECTORS, 0) for scraped in scrapes)
    # every value was computed (not NaN) once the window filled, and the policy did move
    assert all(math.isfinite(value(scrapes[-1], name)) for name, _ in SUMMARY_VALUE.values())
    assert value(scrapes[-1], "belay_trainer_kl_per_sequence_window_max") > bounds["detector_still_kl"]
    promtool_alerts(scrapes, dict.fromkeys(ALERTS.values()), tmp_path)
