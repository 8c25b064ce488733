"""Sharded trainer state, written by every rank and read back at any rank count, in safetensors and
JSON only (issue #15).

torch.distributed.checkpoint's default writer uses torch.save and its reader unpickles `.metadata`,
which Belay refuses; this is the small part of it Belay needs. Each rank writes the pieces it holds:

    trainer_state.rank{r:05d}-of-{w:05d}.safetensors   rank r's local shard of every DTensor (and, from
                                                        rank 0 alone, every plain or replicated tensor)
    trainer_state.shards.json                           per tensor: global shape, dtype, and each piece's
                                                        file, global offset and local shape (rank 0)

A reader at any world size takes, for each target (a DTensor of any placement over any mesh, or a plain
tensor), exactly the rows it holds from whichever files hold them (safe_open(...).get_slice, never a
full load). What the ranks tell each other travels as all_gather of int64 tensors: the *_object
collectives pickle. The optimizer half keeps checkpoints.optimizer_state_to_flat's naming,
`state/<parameter index>/<name>`, so a sharded and a single-rank trainer's optimizer tensors mean the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import zlib

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..common.checkpoints import optimizer_state_from_flat, optimizer_state_to_flat
from ..common.safetensors_file import write_safetensors

SHARD_INDEX = "trainer_state.shards.json"
SHARD_FORMAT = 1


def shard_file_name(rank: int, world_size: int) -> str:
    return f"trainer_state.rank{rank:05d}-of-{world_size:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def piece_box(tensor: torch.Tensor, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(local shape, global offset, whether this rank writes its piece) of `tensor` on this rank.

    A DTensor's piece comes from its placements (FSDP2: Shard(0), chunked as torch.chunk does); along
    a mesh dimension where it is replicated, only the rank at coordinate 0 writes, so no row is written
    twice. A plain tensor is whole on every rank: rank 0 writes it."""
    if not isinstance(tensor, DTensor):
        return tuple(tensor.shape), (0,) * tensor.dim(), rank == 0
    if any(isinstance(p, Partial) for p in tensor.placements):
        raise ValueError("a Partial DTensor holds no value until it is reduced: redistribute it before writing")
    local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    coordinate = tensor.device_mesh.get_coordinate() or []
    writes = all(isinstance(p, Shard) or c == 0 for p, c in zip(tensor.placements, coordinate))
    return tuple(local_shape), tuple(offset), writes


def _gathered_rows(row: list[int], world_size: int) -> list[list[int]]:
    """Every rank's `row` of int64s (all ranks' rows have one length), by all_gather: no pickle."""
    if world_size == 1:
        return [row]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(rows, mine)
    return [r.cpu().tolist() for r in rows]


def write_shards(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], rank: int, world_size: int
) -> pathlib.Path:
    """Write this rank's pieces of `tensors` (DTensors or plain tensors, the same names on every rank)
    into `directory`, which every rank sees; rank 0 also writes the index. Collective: every rank calls
    it. Each rank's file is fsynced before the ranks exchange their boxes, so when rank 0 returns every
    rank's file is complete: rank 0 may then commit the directory (checkpoints.write_checkpoint)."""
    directory = pathlib.Path(directory)
    names = sorted(tensors)
    boxes = {name: piece_box(tensors[name], rank) for name in names}
    local = {}
    for name in names:
        tensor, (shape, _, writes) = tensors[name], boxes[name]
        if writes and tensor.numel() > 0 and all(shape):
            piece = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            local[name] = piece.detach()
    path = directory / shard_file_name(rank, world_size)
    write_safetensors(path, local, {"format": "pt"})  # straight from the shards: no second copy in memory
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    # One row per rank: a checksum of the names (every rank must write the same tensors), then per
    # tensor whether this rank wrote it, its offset and its local shape.
    row = [zlib.crc32("\0".join(names).encode())]
    for name in names:
        shape, offset, _ = boxes[name]
        row += [int(name in local), *offset, *shape]
    rows = _gathered_rows(row, world_size)
    if any(r[0] != row[0] or len(r) != len(row) for r in rows):
        raise ValueError(f"the ranks write different tensors into {directory}: every rank must pass the same names")
    if rank == 0:
        index = {"format": SHARD_FORMAT, "world_size": world_size, "tensors": _index_entries(tensors, names, rows)}
        (directory / SHARD_INDEX).write_text(json.dumps(index, indent=1))
    return path


def _index_entries(tensors: dict[str, torch.Tensor], names: list[str], rows: list[list[int]]) -> dict[str, dict]:
    entries, column = {}, 1
    for name in names:
        tensor = tensors[name]
        pieces = []
        for rank, row in enumerate(rows):
            written, offset = row[column], row[column + 1 : column + 1 + tensor.dim()]
            shape = row[column + 1 + tensor.dim() : column + 1 + 2 * tensor.dim()]
            if written:
                pieces.append({"file": shard_file_name(rank, len(rows)), "offset": offset, "shape": shape})
        column += 1 + 2 * tensor.dim()
        entries[name] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "pieces": pieces}
    return entries


def read_shard_index(directory: str | os.PathLike) -> dict:
    """The index of a sharded state, after checking that every file it names is there."""
    directory = pathlib.Path(directory)
    path = directory / SHARD_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable shard index ({type(error).__name__}: {error})") from error
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT or "tensors" not in index:
        raise ValueError(f"{path} is not a shard index of format {SHARD_FORMAT}")
    files = {piece["file"] for entry in index["tensors"].values() for piece in entry["pieces"]}
    files.update(shard_file_name(rank, index["world_size"]) for rank in range(index["world_size"]))
    for name in sorted(files):
        if not (directory / name).is_file():
            raise ValueError(f"{directory / name} is missing: {path} lists it (written at {index['world_size']} ranks)")
    return index


def read_shards(directory: str | os.PathLike, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each name in `like`, a tensor of the target's placement (a DTensor's local rows, or a whole
    plain tensor) read from the shard files that hold those rows, whatever the world size they were
    written at. Only the rows this rank holds are read. A missing tensor or file, a wrong global shape
    or dtype, or rows no file holds: ValueError naming the file and the tensor."""
    directory = pathlib.Path(directory)
    index = read_shard_index(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    loaded = {}
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}

        def handle(file: str):
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(directory / file, framework="pt"))
            return handles[file]

        for name, target in like.items():
            entry = index["tensors"].get(name)
            if entry is None:
                raise ValueError(f"{directory / SHARD_INDEX} holds no tensor {name!r}")
            if entry["shape"] != list(target.shape) or entry["dtype"] != dtype_name(target.dtype):
                raise ValueError(
                    f"{directory / SHARD_INDEX}: {name} is {entry['dtype']} of shape {tuple(entry['shape'])}, "
                    f"the target is {dtype_name(target.dtype)} of shape {tuple(target.shape)}"
                )
            local_shape, offset, _ = piece_box(target, rank)
            local = torch.empty(local_shape, dtype=target.dtype)
            _fill_from_pieces(local, offset, name, entry["pieces"], handle, directory)
            loaded[name] = _placed_like(target, local)
    return loaded


def _fill_from_pieces(local: torch.Tensor, offset: tuple[int, ...], name: str, pieces: list[dict], handle, directory):
    """Copy into `local` (the box at global `offset`) the overlap of every piece that meets it."""
    covered = 0
    for piece in pieces:
        low = [max(o, p) for o, p in zip(offset, piece["offset"])]
        high = [min(o + s, p + q) for o, s, p, q in zip(offset, local.shape, piece["offset"], piece["shape"])]
        if any(h <= lo for lo, h in zip(low, high)):
            continue
        source = handle(piece["file"])
        if name not in source.keys():
            raise ValueError(f"{directory / piece['file']} holds no tensor {name!r}, which {SHARD_INDEX} places there")
        view = source.get_slice(name)
        if list(view.get_shape()) != piece["shape"]:
            raise ValueError(
                f"{directory / piece['file']}: {name} has shape {tuple(view.get_shape())}, "
                f"{SHARD_INDEX} says {tuple(piece['shape'])}"
            )
        rows = (
            source.get_tensor(name)
            if local.dim() == 0
            else view[tuple(map(slice, _minus(low, piece["offset"]), _minus(high, piece["offset"])))]
        )
        if rows.dtype != local.dtype:
            raise ValueError(
                f"{directory / piece['file']}: {name} is {dtype_name(rows.dtype)}, expected {dtype_name(local.dtype)}"
            )
        local[tuple(map(slice, _minus(low, offset), _minus(high, offset)))] = rows
        covered += rows.numel()
    if covered != local.numel():
        raise ValueError(
            f"{directory}: the shard files hold {covered} of the {local.numel()} values of {name} this rank needs"
        )


def _minus(a, b) -> list[int]:
    return [x - y for x, y in zip(a, b)]


def _placed_like(target: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    local = local.to(target.device)
    if not isinstance(target, DTensor):
        return local
    return DTensor.from_local(
        local, target.device_mesh, target.placements, run_check=False, shape=target.shape, stride=target.stride()
    )


def load_shards_into(directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Read `tensors`' rows from the shards and copy them in place (a model's parameters, a value head)."""
    loaded = read_shards(directory, tensors)
    with torch.no_grad():
        for name, tensor in tensors.items():
            own = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            own.copy_(loaded[name].to_local() if isinstance(loaded[name], DTensor) else loaded[name])


# --- the optimizer -------------------------------------------------------------------------------------


def _indexed_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order state_dict() numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, parameter_names: list[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors keyed 'state/<index>/<name>' as DTensors where the parameters are, the JSON-able rest).
    `parameter_names`: the name of each parameter in optimizer order, kept in the rest and checked on load."""
    if len(parameter_names) != len(_indexed_parameters(optimizer)):
        raise ValueError(f"{len(parameter_names)} names for {len(_indexed_parameters(optimizer))} parameters")
    tensors, rest = optimizer_state_to_flat(optimizer.state_dict())
    return tensors, {**rest, "parameter_names": list(parameter_names)}


def optimizer_state_like(optimizer: torch.optim.Optimizer, index: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Targets for read_shards: for each 'state/<i>/<name>' under `prefix` in the shard index, a tensor of
    parameter i's placement (AdamW's exp_avg, exp_avg_sq), or a plain tensor for the step counter."""
    parameters = _indexed_parameters(optimizer)
    like = {}
    for key, entry in index["tensors"].items():
        if not key.startswith(f"{prefix}state/"):
            continue
        _, position, name = key[len(prefix) :].split("/", 2)
        if int(position) >= len(parameters):
            raise ValueError(f"{key} belongs to parameter {position}; the optimizer has {len(parameters)}")
        dtype = getattr(torch, entry["dtype"])
        if name == "step":
            like[key] = torch.empty(entry["shape"], dtype=dtype)
        else:
            like[key] = torch.empty_like(parameters[int(position)], dtype=dtype)
    return like


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict, parameter_names: list[str]
) -> None:
    """Load what optimizer_state_tensors gave (read back by read_shards, prefix taken off), after
    checking the parameters are the ones it was written for."""
    written = rest.get("parameter_names", parameter_names)
    if list(written) != list(parameter_names):
        wrong = next(
            (i for i, (a, b) in enumerate(zip(written, parameter_names)) if a != b),
            min(len(written), len(parameter_names)),
        )
        raise ValueError(
            f"the optimizer state was written for {len(written)} parameters, this optimizer has "
            f"{len(parameter_names)}; the first that differs is #{wrong}"
        )
    optimizer.load_state_dict(optimizer_state_from_flat(tensors, rest))
