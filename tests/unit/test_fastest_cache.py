"""services/bench/fastest_cache.py: the KV cache stack_bench.sh's stack stage samples with under
KV_CACHE=fastest (issue #14), read from the engine stage's figures."""

from __future__ import annotations

import json
import subprocess
import sys

from services.bench.fastest_cache import fastest_cache


def write_engine_figures(out, cache: str, tokens_per_second: float) -> None:
    (out / f"engine-{cache}.json").write_text(json.dumps({"generation": {"tokens_per_second": tokens_per_second}}))


def test_the_highest_tokens_per_second_wins(tmp_path):
    write_engine_figures(tmp_path, "dynamic", 6363.0)
    write_engine_figures(tmp_path, "paged", 9100.5)
    write_engine_figures(tmp_path, "static", 5744.0)
    assert fastest_cache(tmp_path, ["dynamic", "paged", "static"]) == "paged"
    assert fastest_cache(tmp_path, ["dynamic", "static"]) == "dynamic"  # only the caches asked about compete


def test_a_cache_whose_run_wrote_nothing_is_no_candidate(tmp_path):
    write_engine_figures(tmp_path, "dynamic", 6363.0)  # paged timed out: no engine-paged.json
    assert fastest_cache(tmp_path, ["dynamic", "paged"]) == "dynamic"
    write_engine_figures(tmp_path, "paged", 7000.0)
    assert fastest_cache(tmp_path, ["paged"]) == "paged"


def test_nothing_measured_falls_back_to_dynamic(tmp_path):
    assert fastest_cache(tmp_path, ["paged", "static"]) == "dynamic"


def test_command_prints_the_name_and_refuses_missing_arguments(tmp_path):
    write_engine_figures(tmp_path, "static", 1.0)
    command = [sys.executable, "-m", "services.bench.fastest_cache"]
    done = subprocess.run([*command, str(tmp_path), "static", "dynamic"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "static\n")
    refused = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode != 0 and "OUT CACHE" in refused.stderr
