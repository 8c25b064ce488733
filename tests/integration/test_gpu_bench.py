"""The GPU bench path, run on the CPU with its tiny size (this machine has no GPU): the figures it
writes must agree with each other and with formulas recomputed here from the model's shape."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from services.bench.gpu import PROFILE_STEPS, peak_bf16_flops
from services.bench.gpu import run_gpu_bench as run_gpu_bench_in_process
from services.bench.workload import Workload
from services.common.config import PolicyConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
ROWS, NEW_TOKENS, PROMPT_TOKENS = 8, 8, 8


def run_gpu_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.bench.gpu", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


# (dtype, engine options): the static KV cache rides on the bfloat16 run, so it costs no run of its own
RUNS = {"float32": [], "bfloat16": ["--kv-cache", "static", "--max-prompt-tokens", "32"]}


@pytest.fixture(scope="module", params=sorted(RUNS))
def figures(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    done = run_gpu_bench(
        "--json",
        str(out),
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        request.param,
        "--iterations",
        "2",
        "--warmup",
        "1",
        "--batch",
        str(ROWS),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--prompt-tokens",
        str(PROMPT_TOKENS),
        *RUNS[request.param],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    return json.loads(out.read_text()) | {"_asked_dtype": request.param}


def matmul_weights(model: dict) -> int:
    """Llama's linear layers: q and o (H x H), k and v (H x kv_heads * head_dim), gate, up and down
    (H x I each) per layer, and the untied output head (V x H)."""
    hidden, layers, vocab = model["hidden_size"], model["num_hidden_layers"], model["vocab_size"]
    kv_width = model["num_key_value_heads"] * hidden // model["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * model["intermediate_size"]
    return layers * per_layer + vocab * hidden


def test_the_run_used_the_asked_dtype_and_device(figures):
    assert figures["dtype"] == f"torch.{figures['_asked_dtype']}"
    assert figures["device"] == "cpu" and figures["size"] == "tiny"


def test_the_engine_sampled_with_the_asked_kv_cache_sized_from_the_prompt_limit(figures):
    generation = figures["generation"]
    if figures["_asked_dtype"] == "bfloat16":
        assert (generation["kv_cache"], generation["max_prompt_tokens"]) == ("static", 32)
        assert generation["cache_positions"] == 32 + NEW_TOKENS
    else:  # the config's defaults: auto (dynamic on the CPU), 1024 prompt tokens; positions capped at the model's 256
        assert (generation["kv_cache"], generation["max_prompt_tokens"]) == ("dynamic", 1024)
        assert generation["cache_positions"] == figures["model"]["max_position_embeddings"] == 256
    assert generation["top_p_window"] == PolicyConfig.model_fields["top_p_window"].default  # the policy's


def test_generation_rate_is_tokens_over_seconds(figures):
    generation = figures["generation"]
    assert len(generation["warmup_seconds"]) == 1 and generation["warmup_seconds"][0] > 0
    assert len(generation["seconds"]) == len(generation["response_tokens"]) == len(generation["logprob_seconds"]) == 2
    for seconds, logprob_seconds in zip(generation["seconds"], generation["logprob_seconds"]):
        assert 0 <= logprob_seconds < seconds  # gathering the log-probs is part of the call, not all of it
    for tokens in generation["response_tokens"]:
        assert ROWS <= tokens <= ROWS * NEW_TOKENS
    assert generation["tokens_per_second"] == pytest.approx(
        sum(generation["response_tokens"]) / sum(generation["seconds"])
    )


def test_update_flops_follow_six_n_d(figures):
    update = figures["update"]
    assert update["n_params"] == matmul_weights(figures["model"])
    assert PROMPT_TOKENS + 1 <= update["width"] <= PROMPT_TOKENS + NEW_TOKENS
    assert update["tokens_processed"] == update["ppo_epochs"] * ROWS * update["width"]
    assert update["flops"] == 6 * update["n_params"] * update["tokens_processed"]
    assert update["seconds_mean"] == pytest.approx(sum(update["seconds"]) / 2)
    assert update["achieved_flops_per_second"] == pytest.approx(update["flops"] / update["seconds_mean"])
    assert update["peak_flops_per_second"] is None and update["mfu"] is None  # no peak figure for a CPU
    assert update["optimizer_steps"] == update["ppo_epochs"] * ROWS // update["minibatch_size"]
    assert update["skipped_minibatches"] == 0


def test_hot_swap_moves_the_engine_to_the_trained_weights(figures):
    swap = figures["hot_swap"]
    assert (swap["version_before"], swap["version_after"]) == (0, 1)
    assert swap["engine_fingerprint_before"] != swap["engine_fingerprint_after"]
    assert swap["engine_fingerprint_after"] == swap["trainer_fingerprint"]
    assert 0 < swap["engine_seconds"] <= swap["seconds"]
    assert swap["checkpoint_bytes"] > 0 and figures["checkpoint_write_seconds"] > 0


def test_generation_only_measures_generation_and_nothing_else():
    workload = Workload(prompts_per_batch=2, max_new_tokens=4, torch_threads=torch.get_num_threads())
    figures = run_gpu_bench_in_process("tiny", "cpu", "float32", 1, 0, 4, workload, generation_only=True, profile=True)
    assert figures["update"] is None and figures["hot_swap"] is None and figures["checkpoint_write_seconds"] is None
    assert figures["generation"]["warmup_seconds"] == [] and len(figures["generation"]["seconds"]) == 1
    assert figures["model"]["matmul_parameters"] == matmul_weights(figures["model"])
    gap = figures["generation"]["behaviour_vs_teacher_forced"]  # float32 on the CPU: the same numbers
    assert gap["tokens"] == sum(figures["generation"]["response_tokens"]) and gap["max_abs"] < 1e-5
    profiled = figures["generation"]["profile"]  # one more call, op by op: every decode step runs the matmuls
    assert max(op["calls"] for op in profiled["ops"] if op["name"] in ("aten::mm", "aten::addmm")) >= 4
    assert profiled["wall_seconds"] > 0 and profiled["steps"] == 4  # min(PROFILE_STEPS, max_new_tokens)


def test_a_static_cache_is_profiled_over_its_whole_length_since_a_shorter_call_would_compile_anew():
    workload = Workload(prompts_per_batch=2, max_new_tokens=PROFILE_STEPS + 4, torch_threads=torch.get_num_threads())
    figures = run_gpu_bench_in_process(
        "tiny", "cpu", "float32", 1, 0, 4, workload, kv_cache="static", max_prompt_tokens=4, generation_only=True,
        profile=True,
    )  # fmt: skip
    assert figures["generation"]["kv_cache"] == "static"
    assert figures["generation"]["cache_positions"] == 4 + PROFILE_STEPS + 4  # sized by the prompt limit
    profiled = figures["generation"]["profile"]
    assert profiled["steps"] == PROFILE_STEPS + 4  # not cut at PROFILE_STEPS
    assert max(op["calls"] for op in profiled["ops"] if op["name"] in ("aten::mm", "aten::addmm")) >= PROFILE_STEPS + 4


def test_cuda_asked_for_on_a_machine_without_it_is_refused(tmp_path):
    done = run_gpu_bench("--json", str(tmp_path / "x.json"), "--size", "tiny", "--device", "cuda")
    assert done.returncode != 0
    assert "torch sees no CUDA device" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_peak_table_tells_pcie_from_sxm_and_knows_no_other_cards():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None
