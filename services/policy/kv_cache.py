"""The KV cache the policy samples with (`policy.kv_cache`, issue #14).

dynamic: what `generate()` makes by itself, a DynamicCache that grows with the batch.
static:  one StaticCache of rows x (max_prompt_tokens + max_new_tokens) positions, allocated once and
         zeroed before each batch. Its shapes never change from batch to batch, which is what lets
         transformers compile the model's forward for the decode steps: `generate()` does so by
         itself when the cache is static and the model is on CUDA (GenerationMixin.
         _valid_auto_compile_criteria in transformers 4.57, with CompileConfig's defaults: inductor,
         mode "reduce-overhead", i.e. CUDA graphs), never on the CPU; the prefill runs uncompiled.

paged:   transformers' continuous batching with paged attention (paged_sampling.py), which holds its own
         cache; this class only names it. Needs transformers 5, refused at start under 4.57.

Why not `GenerationConfig(cache_implementation="static")`: transformers then sizes its cache by this
batch's widest prompt + max_new_tokens, so a wider batch than any before allocates a new cache and the
compiled decode step recompiles for its shape. Sized from the prompt limit, it has one shape per
batch size (the memory plan already counts exactly these rows x positions).
"""

from __future__ import annotations

from transformers import CompileConfig, PreTrainedModel, StaticCache

from .paged_sampling import paged_unavailable

KV_CACHES = ("dynamic", "static", "paged")
KV_CACHE_SETTINGS = ("auto", *KV_CACHES)  # what policy.kv_cache accepts


def resolve_kv_cache(name: str, device) -> str:
    """policy.kv_cache on `device` (a torch.device or a name such as 'cuda:0'): 'auto' is static on CUDA,
    where its compiled decode step ran 1.45x the dynamic cache on an H200 (docs/gpu.md), and dynamic
    elsewhere, where nothing is compiled and a static cache only attends over more positions."""
    if name != "auto":
        return name
    return "static" if str(device).startswith("cuda") else "dynamic"


class SamplingCache:
    """What `generate()` gets as its cache, batch after batch. Not thread-safe: the engine's lock
    holds it, as it holds the weights."""

    def __init__(self, kind: str = "dynamic", compile_config: CompileConfig | None = None):
        if kind not in KV_CACHES:
            raise ValueError(f"policy.kv_cache must be one of {', '.join(KV_CACHE_SETTINGS)}, got {kind!r}")
        unavailable = paged_unavailable() if kind == "paged" else None
        if unavailable:
            raise ValueError(unavailable)
        self.kind = kind
        # None: transformers' own choice (compile on CUDA only). Tests pass one that compiles on the CPU.
        self.compile_config = compile_config
        self.cache: StaticCache | None = None
        self.shape: tuple[int, int] | None = None  # (rows, positions) of self.cache

    def generate_kwargs(self, model: PreTrainedModel, rows: int, positions: int) -> dict:
        """Keyword arguments for `model.generate` on a batch of `rows` rows that needs at most
        `positions` cached positions (prompt width + max_new_tokens - 1)."""
        if self.kind != "static":
            return {}
        if self.shape == (rows, positions):
            self.cache.reset()  # zeroes keys and values in place: same tensors, so the same compiled graphs
        else:
            self.cache = None  # the old cache is freed before the new one is allocated
            self.cache = StaticCache(config=model.config, max_cache_len=positions)
            self.shape = (rows, positions)
        return {"past_key_values": self.cache}
