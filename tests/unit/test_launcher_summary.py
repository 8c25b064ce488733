"""What `belay up` prints and writes about a run: the trend through batch noise, and the timings."""

from services.common.config import load_config
from services.common.review_store import ReviewStore
from services.common.step_records import RollbackRecord
from services.launcher import degenerate_canaries, format_step, summarise, where_to_watch
from tests.step_records import make_step_record

TIMINGS = ("generate", "reference", "reward", "update", "publish", "persist", "swap")


def step(version: int, reward: float, kl: float, update_seconds: float, detectors_firing=()):
    return make_step_record(
        version,
        time=100.0 + 3 * version,
        seconds={k: (update_seconds if k == "update" else 1.0) for k in TIMINGS},
        detectors_firing=list(detectors_firing),
        reward_mean=reward,
        reward_std=0.5,
        kl_per_sequence=kl,
        kl_per_token=kl / 10,
        response_length_mean=20.0,
        clip_fraction=0.1,
    )


def test_summary_gives_first_last_quarter_means_and_mean_timings():
    rewards = [0.1, 0.3, 0.2, 0.4, 0.5, 0.6, 0.9, 0.7]
    steps = [step(i + 1, r, kl=i * 0.5, update_seconds=i) for i, r in enumerate(rewards)]
    summary = summarise(steps)
    assert summary["iterations"] == 8
    assert summary["first"]["reward_mean"] == 0.1 and summary["last"]["reward_mean"] == 0.7
    assert abs(summary["first_quarter_mean"]["reward_mean"] - (0.1 + 0.3) / 2) < 1e-12
    assert abs(summary["last_quarter_mean"]["reward_mean"] - (0.9 + 0.7) / 2) < 1e-12
    assert abs(summary["last_quarter_mean"]["kl_per_sequence"] - (3.0 + 3.5) / 2) < 1e-12
    assert abs(summary["mean_seconds"]["update"] - sum(range(8)) / 8) < 1e-12
    assert summary["mean_wall_seconds_between_iterations"] == 3.0


def test_progress_line_shows_the_mean_of_the_last_five_rewards():
    rewards = [0.0, 1.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    line = format_step(step(7, 1.0, 2.0, 4.0), 10, rewards)
    assert line.startswith("iteration 7/10")
    assert "(last 5: +0.600)" in line  # (0.2 + 0.4 + 0.6 + 0.8 + 1.0) / 5
    assert "KL/seq 2.000" in line and "update 4.0s" in line


def test_empty_run_summarises_to_nothing():
    assert summarise([]) == {}


def test_a_rollback_is_shown_as_such_and_counted_not_averaged():
    rollback = RollbackRecord(version=3, rolled_back_to=1, batch_kl=21.5, kl_coef=0.4, lr=1e-5, time=109.0)
    line = format_step(rollback, 5, [0.1, 0.2])
    assert "ROLLBACK" in line and "version 1" in line and "21.50" in line
    steps = [step(1, 0.1, 0.0, 1.0), step(2, 0.3, 1.0, 1.0), rollback, step(4, 0.5, 0.5, 1.0)]
    summary = summarise(steps)
    assert summary["rollbacks"] == 1 and summary["iterations"] == 3
    assert summary["last"]["reward_mean"] == 0.5


def test_a_firing_detector_is_named_on_the_progress_line():
    quiet = format_step(step(7, 1.0, 2.0, 4.0), 10, [1.0])
    assert "DETECTOR" not in quiet
    loud = format_step(step(7, 1.0, 2.0, 4.0, ["reward_hacking", "template_collapse"]), 10, [1.0])
    assert loud.endswith("DETECTOR: reward_hacking, template_collapse (docs/runbooks.md)")


def test_belay_up_prints_the_tensorboard_command_only_when_event_files_are_on(tmp_path):
    off = where_to_watch(load_config(None, environ={}))
    assert len(off) == 1 and "review page" in off[0] and not any("tensorboard" in line for line in off)
    logdir = tmp_path / "tb dir"
    config = load_config(None, environ={"BELAY_RUN__TENSORBOARD_DIR": str(logdir), "BELAY_RUN__NAME": "r1"})
    (line,) = [line for line in where_to_watch(config) if "TensorBoard" in line]
    assert line.endswith(f"tensorboard --logdir '{logdir}'")  # quoted: a path with a space
    assert f"in {logdir}/r1:" in line


def test_degenerate_canaries_are_named_on_the_progress_line_once_each(redis_url):
    """The policy's verdicts come from its canary records in Redis; each version is named once, on
    the first progress line after its record lands."""
    store = ReviewStore.from_url(redis_url, "run")
    store.record_canaries(0, {"degenerate": []})
    store.record_canaries(1, {"degenerate": [0, 2]})
    seen: set[int] = set()
    news = degenerate_canaries(store, seen)
    assert news == ["v1: canaries 0, 2"] and seen == {0, 1}
    line = format_step(step(7, 1.0, 2.0, 4.0, ["template_collapse"]), 10, [1.0], news)
    assert line.endswith(
        "DETECTOR: template_collapse (docs/runbooks.md)  DETECTOR: canary_degenerate (v1: canaries 0, 2) "
        "(docs/runbooks.md)"
    )
    assert degenerate_canaries(store, seen) == []  # said once
    store.record_canaries(2, {"degenerate": [1]})
    assert degenerate_canaries(store, seen) == ["v2: canaries 1"]
