"""CUDA IPC handles of flat bucket buffers as plain request fields, never pickles.

torch.multiprocessing.reductions.reduce_tensor gives the arguments of rebuild_cuda_tensor for a
CUDA tensor; torch.multiprocessing would pickle them (classes included). Here the data fields go
into a CudaIpcBuffer message and the classes are fixed on the receiving side (a plain
torch.Tensor over a TypedStorage), so nothing from the wire ever picks code to run. The buffer's
GPU is named by its UUID: device indices differ between processes (CUDA_VISIBLE_DEVICES), the
UUID does not, and the policy refuses buffers on a GPU other than its own.
"""

from __future__ import annotations

import torch

from .weight_buckets import dtype_name, dtype_named


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_index(uuid: str) -> int:
    """This process's index of the GPU with that UUID; ValueError saying why when there is none."""
    if not torch.cuda.is_available():
        raise ValueError(
            "cuda_ipc needs a CUDA device, and this process has none (torch.cuda.is_available() "
            "is False): use trainer.weight_transport 'broadcast' or 'file'"
        )
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    raise ValueError(
        f"the trainer's buffers are on GPU {uuid[:64]}, which this process cannot see: cuda_ipc "
        "is for a trainer and a policy on the same GPU; use 'broadcast' across GPUs"
    )


def ipc_fields(rebuild_args: tuple, uuid: str) -> dict:
    """The message fields of a flat buffer's rebuild_cuda_tensor arguments (as reduce_tensor gives them)."""
    (
        _tensor_cls,
        size,
        stride,
        tensor_offset,
        _storage_cls,
        dtype,
        _device,
        handle,
        storage_size_bytes,
        storage_offset_bytes,
        _requires_grad,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = rebuild_args
    if len(size) != 1 or tuple(stride) != (1,) or tensor_offset != 0:
        raise ValueError(
            f"only a flat contiguous buffer is exported, got size {tuple(size)}, stride "
            f"{tuple(stride)}, offset {tensor_offset}"
        )
    return dict(
        device_uuid=uuid,
        numel=int(size[0]),
        dtype=dtype_name(dtype),
        storage_handle=bytes(handle),
        storage_size_bytes=int(storage_size_bytes),
        storage_offset_bytes=int(storage_offset_bytes),
        ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset),
        event_handle=bytes(event_handle or b""),
        event_sync_required=bool(event_sync_required),
    )


def rebuild_args(message, device_index: int) -> tuple:
    """rebuild_cuda_tensor's arguments from a CudaIpcBuffer: the classes fixed, never read from the wire."""
    return (
        torch.Tensor,
        torch.Size([message.numel]),
        (1,),
        0,
        torch.storage.TypedStorage,
        dtype_named(message.dtype),
        device_index,
        message.storage_handle,
        message.storage_size_bytes,
        message.storage_offset_bytes,
        False,
        message.ref_counter_handle,
        message.ref_counter_offset,
        message.event_handle,
        message.event_sync_required,
    )


def export_buffer(buffer: torch.Tensor, message_class):
    """A CudaIpcBuffer for a flat CUDA buffer. The caller keeps `buffer` alive until the policy acknowledges."""
    from torch.multiprocessing.reductions import reduce_tensor

    _rebuild, args = reduce_tensor(buffer)
    index = torch.cuda.current_device() if buffer.device.index is None else buffer.device.index
    return message_class(**ipc_fields(args, device_uuid(index)))


def open_buffer(message, device_index: int) -> torch.Tensor:
    """The trainer's buffer, mapped into this process (valid while the trainer keeps it)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*rebuild_args(message, device_index))
