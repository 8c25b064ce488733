"""A hot-swap copies the new weights into the parameters the policy already holds: same storage,
no second copy of the model left behind, and the new weights are the ones served."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaForCausalLM

from services.common.checkpoints import write_checkpoint
from services.common.config import GrpcConfig
from services.common.models import load_causal_lm, load_tokenizer, own_weights
from services.policy.engine import PolicyEngine
from tests.tiny_models import llama_config


def tensors_alive_of_size(sizes: set[int], exclude: set[int]) -> list[torch.Tensor]:
    """Every live tensor (gc-tracked) with one of `sizes` elements whose storage is not in `exclude`."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.numel() in sizes and obj.untyped_storage().data_ptr() not in exclude:
            found.append(obj)
    return found


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc walks past deprecated torch objects
def test_swap_copies_into_the_same_parameters_and_keeps_no_second_copy(tiny_lm_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    engine = PolicyEngine(load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy"), tokenizer, GrpcConfig())
    model = engine.loaded.model
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}

    torch.manual_seed(7)
    new = LlamaForCausalLM(llama_config(tokenizer))
    path = write_checkpoint(tmp_path / "ckpt", 1, lambda d: new.save_pretrained(d, safe_serialization=True))
    expected = {name: p.detach() for name, p in new.named_parameters()}  # the saved model's own tensors

    gc.collect()
    alive_before = {
        t.untyped_storage().data_ptr() for t in tensors_alive_of_size({p.numel() for p in model.parameters()}, set())
    }  # other tests' models live on in this process

    engine.swap_to(1, path)

    assert engine.version == 1 and engine.loaded.model is model
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers  # copied in place
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=0, atol=0)
    # No tensor of a parameter's size appeared with the swap and stayed alive after it (the
    # loader held the checkpoint one tensor at a time).
    gc.collect()
    own = alive_before | {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {t.untyped_storage().data_ptr() for t in expected.values()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    assert tensors_alive_of_size({p.numel() for p in model.parameters()}, own) == []


def test_own_weights_copies_parameters_once_and_keeps_ties(tiny_lm_dir):
    model = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), "policy")
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    own_weights(model)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # still tied
    for name, parameter in model.named_parameters():
        pointer, value = before[name]
        assert parameter.data_ptr() != pointer  # new memory ...
        torch.testing.assert_close(parameter.detach(), value, rtol=0, atol=0)  # ... same weights
