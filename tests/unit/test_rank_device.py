"""Under torchrun each trainer rank takes its own GPU and a process group that carries both its CUDA
tensors (NCCL) and the CPU tensors its decisions travel in (gloo) — services/trainer/distributed.py.
No GPU here: torch.device objects are built without one."""

from __future__ import annotations

import torch

from services.trainer.distributed import backend_for, rank_device


def test_cuda_without_an_index_becomes_the_ranks_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 3)


def test_an_indexed_gpu_the_cpu_and_a_single_process_are_left_alone(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # the user chose it
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert rank_device(torch.device("cuda")) == torch.device("cuda")  # not under torchrun


def test_cuda_ranks_get_nccl_for_cuda_tensors_and_gloo_for_cpu_ones():
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"
