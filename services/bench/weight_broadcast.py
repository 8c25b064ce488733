"""Broadcast transport throughput over loopback gloo: the transport's data path (flatten into
buckets, one gloo group of two ranks over a TCP store, receive into staging buffers, unflatten)
without the UpdateWeights round trip, which adds about a millisecond.

    python -m services.bench.weight_broadcast [--mib 64 512] [--bucket-mb 256] [--repeats 3]

Prints, for each size, GB/s (1e9 bytes a second) and seconds per publish to one replica.
"""

from __future__ import annotations

import argparse
import datetime
import secrets
import statistics
import threading
import time

import torch
import torch.distributed as dist

from services.common.weight_buckets import bucket_layout, dtype_named, flatten_bucket, manifest_of, unflatten_bucket
from services.common.weight_groups import broadcast_bucket, make_group


def fake_weights(nbytes: int, tensor_mib: int = 16) -> dict[str, torch.Tensor]:
    """float32 tensors of tensor_mib each (the last smaller), nbytes in all."""
    count, tensors = nbytes // 4, {}
    per = tensor_mib * 2**20 // 4
    for index, start in enumerate(range(0, count, per)):
        tensors[f"layer.{index}.weight"] = torch.randn(min(per, count - start))
    return tensors


def measure_publish_seconds(
    nbytes: int, bucket_bytes: int = 256 * 2**20, repeats: int = 3, timeout_seconds: float = 120.0
) -> float:
    """Median seconds to move nbytes of float32 weights from a sender rank to a receiver rank
    (threads of this process, loopback TCP), flatten and unflatten included; the group is built
    once, as the transport keeps it between versions."""
    tensors = fake_weights(nbytes)
    layout = bucket_layout(manifest_of(tensors), bucket_bytes)
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_seconds)
    )
    prefix = secrets.token_hex(8)
    groups: dict[int, object] = {}

    def join(rank: int) -> None:
        member = store if rank == 0 else dist.TCPStore("127.0.0.1", store.port, is_master=False)
        groups[rank] = make_group(dist.PrefixStore(prefix, member), rank, 2, "gloo", timeout_seconds)

    joiner = threading.Thread(target=join, args=(1,))
    joiner.start()
    join(0)
    joiner.join()

    def receive() -> None:
        for bucket in layout:
            buffer = torch.empty(bucket.numel, dtype=dtype_named(bucket.dtype))
            broadcast_bucket(groups[1], buffer)
            unflatten_bucket(bucket, buffer)

    seconds = []
    for _ in range(repeats):
        receiver = threading.Thread(target=receive)
        started = time.perf_counter()
        receiver.start()
        for bucket in layout:
            broadcast_bucket(groups[0], flatten_bucket(bucket, tensors))
        receiver.join()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure_broadcast_gbps(nbytes: int, bucket_bytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Broadcast throughput over loopback gloo in GB/s (1e9 bytes a second) for nbytes of float32."""
    return nbytes / measure_publish_seconds(nbytes, bucket_bytes, repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for mib in args.mib:
        nbytes = mib * 2**20
        seconds = measure_publish_seconds(nbytes, int(args.bucket_mb * 2**20), args.repeats)
        print(
            f"{mib} MiB float32, buckets of {args.bucket_mb:g} MiB: {nbytes / seconds / 1e9:.2f} GB/s, "
            f"{seconds:.3f} s per publish to one replica (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
