"""Which policy.kv_cache generated fastest in a GPU bench run (stack_bench.sh's KV_CACHE=fastest, issue #14):
the engine stage writes OUT/engine-<cache>.json per cache it measured, and the stack stage samples with
the one of highest tokens/s. A cache whose run failed or timed out wrote no file and is not a candidate;
with none measured the answer is dynamic, the default.

    python -m services.bench.fastest_cache OUT CACHE [CACHE ...]   (prints the cache's name)
"""

from __future__ import annotations

import json
import pathlib
import sys

FALLBACK = "dynamic"


def fastest_cache(out: pathlib.Path, caches: list[str]) -> str:
    """The cache among `caches` whose engine-<cache>.json in `out` has the highest generation tokens/s."""
    measured = {}
    for cache in caches:
        path = out / f"engine-{cache}.json"
        if path.exists():
            measured[cache] = json.loads(path.read_text())["generation"]["tokens_per_second"]
    return max(measured, key=measured.__getitem__) if measured else FALLBACK


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    print(fastest_cache(pathlib.Path(sys.argv[1]), sys.argv[2:]))
