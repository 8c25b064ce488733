"""The trainer's policy at start under fsdp (services/trainer/meta_start.py, issue #15): built with its
parameters on the meta device, sharded, then filled with this rank's rows of the SFT model, it equals
the model load_causal_lm loads whole: every parameter and buffer, bit for bit, the critic too. One
process, a one-rank gloo group (the multi-rank runs of tests/integration/test_parallel_update.py and
test_sharded_checkpoint.py start through the same meta_start.start_policy)."""

from __future__ import annotations

import datetime
import pathlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import LlamaForCausalLM

from services.common.models import load_causal_lm
from services.trainer import meta_start
from services.trainer.distributed import Distributed
from tests.conftest import free_port
from tests.tiny_models import build_tokenizer, llama_config

from .conftest import make_config
from .parallel_worker import build_trainer

SMOLLM2 = pathlib.Path.home() / ".cache/belay/SmolLM2-135M-Instruct"


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone (FSDP2 over a one-rank mesh), gone after the test."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield Distributed(rank=0, world_size=1)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rope_scaled_lm_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama with llama3 rope scaling and an untied head: its inv_freq is computed in __init__
    from the config, not the default 1 / 10000^(2i/d)."""
    directory = tmp_path_factory.mktemp("rope_scaled_lm")
    tokenizer = build_tokenizer()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = llama_config(
        tokenizer,
        rope_theta=500000.0,
        rope_scaling={**scaling, "original_max_position_embeddings": 64},
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_sharded_policy_filled_with_its_rows_equals_the_whole_load(tiny_lm_dir, tmp_path, one_rank_group):
    torch.manual_seed(0)
    whole = build_trainer(str(tiny_lm_dir), str(tmp_path / "whole"), {"advantage": "gae"}, None)
    torch.manual_seed(0)
    options = {"advantage": "gae", "parallelism": "fsdp"}
    config = make_config(trainer={"model_dir": str(tiny_lm_dir), **options})
    assert meta_start.is_empty(meta_start.start_policy(config, torch.device("cpu"), one_rank_group))
    sharded = build_trainer(str(tiny_lm_dir), str(tmp_path / "sharded"), options, one_rank_group)
    assert sharded.sharded and not meta_start.is_empty(sharded.model)
    filled = get_model_state_dict(sharded.learner, options=StateDictOptions(full_state_dict=True))
    expected = whole.learner.state_dict()
    assert filled.keys() == expected.keys() and any(k.startswith("value_head.") for k in filled)
    for name, tensor in expected.items():
        assert filled[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(filled[name], tensor), name
    buffers = dict(whole.learner.named_buffers())  # non-persistent (inv_freq): not in the state dicts
    assert buffers and dict(sharded.learner.named_buffers()).keys() == buffers.keys()
    for name, buffer in sharded.learner.named_buffers():
        assert buffer.device == buffers[name].device and torch.equal(buffer, buffers[name]), name
    model = sharded.model
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sharded.device == whole.device
    assert model.generation_config.to_dict() == whole.model.generation_config.to_dict()
    parameters = {id(p) for p in sharded.learner.parameters()}
    assert all(id(p) in parameters for group in sharded.optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("which", ["rope_scaled", "smollm2"])
def test_the_empty_model_has_the_whole_loads_buffers_config_and_ties(which, rope_scaled_lm_dir):
    if which == "smollm2" and not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"no SmolLM2 at {SMOLLM2}")
    directory = str(rope_scaled_lm_dir if which == "rope_scaled" else SMOLLM2)
    whole = load_causal_lm(directory, torch.device("cpu"), "trainer.model_dir")
    empty = meta_start.empty_causal_lm(directory, torch.device("cpu"), "trainer.model_dir", "sdpa")
    assert all(p.is_meta and p.dtype == torch.float32 for p in empty.parameters())
    shapes = {name: p.shape for name, p in whole.named_parameters()}
    assert {name: p.shape for name, p in empty.named_parameters()} == shapes
    buffers = dict(whole.named_buffers())
    assert "model.rotary_emb.inv_freq" in buffers and dict(empty.named_buffers()).keys() == buffers.keys()
    for name, buffer in empty.named_buffers():
        assert not buffer.is_meta and buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    tied = whole.lm_head.weight is whole.model.embed_tokens.weight
    assert tied == whole.config.tie_word_embeddings == (which == "smollm2")
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == tied
    assert empty.config.to_dict() == whole.config.to_dict()
    assert empty.generation_config.to_dict() == whole.generation_config.to_dict()
    assert meta_start.weights_device(empty) == torch.device("cpu")


@pytest.mark.parametrize(
    "parallelism, lora, world, empty",
    [("fsdp", False, 2, True), ("fsdp", True, 2, False), ("ddp", False, 2, False), ("fsdp", False, None, False)],
)
def test_only_fsdp_at_several_ranks_without_lora_starts_empty(parallelism, lora, world, empty, tiny_lm_dir):
    config = make_config(trainer={"model_dir": str(tiny_lm_dir), "parallelism": parallelism}, lora={"enabled": lora})
    distributed = Distributed(rank=0, world_size=world) if world else None
    model = meta_start.start_policy(config, torch.device("cpu"), distributed)
    assert meta_start.is_empty(model) == empty
