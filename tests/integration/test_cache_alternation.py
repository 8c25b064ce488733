"""services.bench.cache_alternation on the CPU (tiny shape, float32): the calls run in the service's
order (rollouts, then canary-rollout pairs), each batch with its own rows and length, and each
rollout is filed by the call before it. The figures it exists for come from a GPU (docs/gpu.md)."""

from __future__ import annotations

import json

from services.bench.cache_alternation import CANARY_MAX_NEW_TOKENS, main


def test_rollouts_and_canaries_alternate_and_each_rollout_is_filed_by_the_call_before_it(tmp_path):
    out = tmp_path / "alternation.json"
    main([
        "--json", str(out), "--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--rows", "3",
        "--canaries", "2", "--prompt-tokens", "6", "--max-new-tokens", "5", "--rounds", "2",
    ])  # fmt: skip
    figures = json.loads(out.read_text())
    kinds = [call["kind"] for call in figures["calls"]]
    assert kinds == ["rollout", "rollout", "canary", "rollout", "canary", "rollout"]
    assert {(call["kind"], call["rows"]) for call in figures["calls"]} == {("rollout", 3), ("canary", 2)}
    assert figures["max_new_tokens"] == {"rollout": 5, "canary": CANARY_MAX_NEW_TOKENS}
    seconds = [call["seconds"] for call in figures["calls"]]
    assert figures["rollout_after_rollout_seconds"] == [seconds[1]]
    assert figures["rollout_after_canary_seconds"] == [seconds[3], seconds[5]]
    assert figures["kv_cache"] == "static" and min(seconds) > 0
