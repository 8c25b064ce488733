"""The memory plan: bytes each service will hold on its device, from the model's config.json
shape and the run's settings, summed per device and compared with the device's memory.

Pure arithmetic: numbers in, typed plans out; no torch, no config objects (services/common/
memory_check.py reads the config and the devices, and logs and caps each process).

Notation: P parameters, h hidden_size, L num_hidden_layers, a num_attention_heads, g
num_key_value_heads, d head_dim (h / a unless config.json says), I intermediate_size, V vocab_size,
e bytes per element of the service's dtype (4 float32, 2 bfloat16/float16).

Factors chosen, and why:
- ACTIVATION_BYTES_16BIT = 34: bytes of activations one transformer layer keeps for backward per
  token per hidden unit at 16-bit precision, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 1: s*b*h*(34 + 5*a*s/h)) without the 5*a*s/h
  attention-score term, which sdpa and flash attention never store. It assumes a 4h GeLU MLP; a
  SwiGLU MLP with I > 4h keeps somewhat more, dropout masks (absent in Llama/Qwen) somewhat less.
  Scaled by e / 2 for other dtypes. In a no-grad forward a layer's tensors are freed before the
  next layer runs, so one layer's 34 bytes bound its working set (reference, reward, prefill).
- LOGPROB_COPIES = 4: the log-probs run the output head on chunks of response positions
  (services/common/token_logprobs.py): one chunk's float32 logits, their log-softmax, the softmax
  for the entropy and, in backward, the recomputed logits' gradient are alive at once (~4 copies of
  positions x V x 4 bytes). A chunk is trainer.logprob_chunk_positions positions in the trainer and
  LOGPROB_CHUNK_POSITIONS in the reference and policy.
- CUDA_CONTEXT_BYTES = 512 MiB per process: the CUDA context and kernels, outside torch's allocator
  (an assumption: 300-600 MiB is what torch processes usually show on recent GPUs).
- HEADROOM = 0.10: a device's memory is counted as 90 % usable, leaving room for the caching
  allocator's fragmentation and the short-lived tensors the items leave out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACTIVATION_BYTES_16BIT = 34
LOGPROB_COPIES = 4
CUDA_CONTEXT_BYTES = 512 * 1024**2
HEADROOM = 0.10
QKV_BIAS_MODELS = ("qwen2",)  # Qwen2Attention: bias on q, k, v; none on o
QK_NORM_MODELS = ("qwen3",)  # Qwen3Attention: an RMSNorm of width d on q and on k


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer (Llama, Qwen2/3, Mistral family)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_labels: int = 0  # > 0: a sequence classifier, whose head is h x num_labels instead of V x h


def model_shape(config: Mapping, classifier: bool = False) -> ModelShape:
    """A ModelShape from a parsed config.json (a multimodal one's text_config when it has one)."""
    if "hidden_size" not in config and "text_config" in config:
        config = config["text_config"]
    heads, model_type = config["num_attention_heads"], config.get("model_type", "")
    attention_bias = bool(config.get("attention_bias", False))
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 1)
    return ModelShape(
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),  # PretrainedConfig's default
        qkv_bias=attention_bias or model_type in QKV_BIAS_MODELS,
        output_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type in QK_NORM_MODELS,
        num_labels=labels if classifier else 0,
    )


def parameter_count(shape: ModelShape) -> int:
    """P = V*h (embeddings) + L * (attention + mlp + 2h norms) + h (final norm) + head, where
    attention = h*a*d (q) + 2*h*g*d (k, v) + a*d*h (o) [+ a*d + 2*g*d q/k/v biases] [+ h o bias]
                [+ 2d q/k norms], mlp = 3*h*I (gate, up, down) [+ 2I + h biases],
    head = 0 when tied, V*h when not, h*num_labels for a classifier (its score layer has no bias)."""
    return root_parameter_count(shape) + shape.num_hidden_layers * block_parameter_count(shape)


def block_parameter_count(shape: ModelShape) -> int:
    """One transformer block's parameters: attention + mlp + 2h norms (see parameter_count)."""
    h, a, g, d = shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    attention = h * a * d + 2 * h * g * d + a * d * h
    attention += (a * d + 2 * g * d) * shape.qkv_bias + h * shape.output_bias + 2 * d * shape.qk_norm
    mlp = 3 * h * shape.intermediate_size + (2 * shape.intermediate_size + h) * shape.mlp_bias
    return attention + mlp + 2 * h


def root_parameter_count(shape: ModelShape) -> int:
    """The parameters outside the blocks: embeddings V*h, final norm h, and the head (see parameter_count)."""
    h, head = shape.hidden_size, 0
    if shape.num_labels:
        head = h * shape.num_labels
    elif not shape.tie_word_embeddings:
        head = shape.vocab_size * h
    return shape.vocab_size * h + h + head


def kv_cache_bytes(shape: ModelShape, rows: int, tokens: int, dtype_bytes: int) -> int:
    """2 (keys and values) * L * g * d * rows * tokens * e."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * rows * tokens * dtype_bytes


def activation_bytes_per_layer(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """One layer's activations: tokens * h * 34 * e / 2 (Korthikanti et al. 2022, the module's docstring)."""
    return tokens * shape.hidden_size * ACTIVATION_BYTES_16BIT * dtype_bytes // 2


def training_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Activations kept for backward over `tokens` (= rows * width) tokens:
    L * one layer's (see activation_bytes_per_layer) without checkpointing; with it, one layer's
    (recomputed in backward) plus each layer's saved input, L * tokens * h * e."""
    layer = activation_bytes_per_layer(shape, tokens, dtype_bytes)
    if not checkpointing:
        return shape.num_hidden_layers * layer
    return layer + shape.num_hidden_layers * tokens * shape.hidden_size * dtype_bytes


def logprob_chunk_bytes(shape: ModelShape, positions: int) -> int:
    """positions * V * 4 (float32) * LOGPROB_COPIES (the log-softmax and its exp)."""
    return positions * shape.vocab_size * 4 * LOGPROB_COPIES


@dataclass(frozen=True)
class MemoryItem:
    """One named use of device memory, and the setting that shrinks it."""

    name: str
    bytes: int
    shrink: str


@dataclass(frozen=True)
class ServicePlan:
    """What one service process holds on one device."""

    service: str
    device: str
    items: tuple[MemoryItem, ...]

    @property
    def total_bytes(self) -> int:
        return sum(item.bytes for item in self.items)


def service_plan(service: str, device: str, items: Iterable[MemoryItem]) -> ServicePlan:
    """The plan, with the CUDA context added on a CUDA device and empty items left out."""
    kept = [item for item in items if item.bytes > 0]
    if device.startswith("cuda"):
        kept.append(MemoryItem("CUDA context (assumed)", CUDA_CONTEXT_BYTES, "fewer processes on this device"))
    return ServicePlan(service, device, tuple(kept))


def policy_plan(
    shape: ModelShape,
    dtype_bytes: int,
    rows: int,
    prompt_tokens: int,
    new_tokens: int,
    device: str,
    kv_cache: int | None = None,
    prefill_tokens: int | None = None,
    extra: Iterable[MemoryItem] = (),
) -> ServicePlan:
    """The policy generating `rows` (= prompts_per_batch * samples_per_prompt) sequences at once:
    weights P * e; KV cache 2 * L * g * d * rows * (prompt_tokens + new_tokens) * e; prefill
    activations, one layer's over rows * prompt_tokens tokens; logits of one step rows * V * 4
    (generate keeps them in float32; top-p's short-lived copies are not counted). A KV cache sized
    otherwise (kv_cache bytes), a prefill in pieces (prefill_tokens a forward) and the `extra` items
    are policy.kv_cache = paged's (paged_plan.py)."""
    rows_hint = "lower policy.prompts_per_batch or policy.samples_per_prompt"
    if kv_cache is None:
        kv_cache = kv_cache_bytes(shape, rows, prompt_tokens + new_tokens, dtype_bytes)
    return service_plan(
        "policy",
        device,
        [
            MemoryItem("policy weights", parameter_count(shape) * dtype_bytes, "set policy.dtype: bfloat16"),
            MemoryItem(
                "policy KV cache", kv_cache, f"{rows_hint}, or policy.max_new_tokens / policy.max_prompt_tokens"
            ),
            MemoryItem(
                "policy prefill activations",
                activation_bytes_per_layer(
                    shape, rows * prompt_tokens if prefill_tokens is None else prefill_tokens, dtype_bytes
                ),
                f"{rows_hint}, or policy.max_prompt_tokens",
            ),
            MemoryItem("policy logits per step", rows * shape.vocab_size * 4, rows_hint),
            *extra,
        ],
    )


def reference_plan(
    shape: ModelShape, dtype_bytes: int, tokens_per_forward: int, device: str, logprob_positions: int | None = None
) -> ServicePlan:
    """The reference's teacher-forced forward over tokens_per_forward (= min(max_tokens_per_forward,
    rows * (prompt_tokens + new_tokens))) tokens: weights P * e; activations, one layer's
    (tokens * h * 34 * e / 2); the log-prob chunk tokens * V * 4 * LOGPROB_COPIES."""
    hint = "lower reference.max_tokens_per_forward"
    return service_plan(
        "reference",
        device,
        [
            MemoryItem("reference weights", parameter_count(shape) * dtype_bytes, "set reference.dtype: bfloat16"),
            MemoryItem(
                "reference activations", activation_bytes_per_layer(shape, tokens_per_forward, dtype_bytes), hint
            ),
            MemoryItem(
                "reference log-prob chunk",
                logprob_chunk_bytes(shape, tokens_per_forward if logprob_positions is None else logprob_positions),
                hint,
            ),
        ],
    )


def reward_items(shape: ModelShape, dtype_bytes: int, tokens_per_forward: int, label: str = "reward") -> list:
    """An hf_classifier reward model over tokens_per_forward (= min(batch_size, rows) * max_length)
    tokens: weights P * e (the classifier's head, h * num_labels); activations, one layer's."""
    return [
        MemoryItem(f"{label} weights", parameter_count(shape) * dtype_bytes, "set reward.dtype: bfloat16"),
        MemoryItem(
            f"{label} activations",
            activation_bytes_per_layer(shape, tokens_per_forward, dtype_bytes),
            "lower reward.batch_size or reward.max_length",
        ),
    ]


def trainer_plan(
    shape: ModelShape,
    dtype_bytes: int,
    minibatch_tokens: int,
    checkpointing: bool,
    logprob_positions: int,
    full_batch_positions: int,
    device: str,
    shards: int = 1,
) -> ServicePlan:
    """The trainer: float32 master weights 4P, gradients 4P, AdamW's two moments 8P, the serving
    copy it publishes P * e (none when it trains in float32: the master weights are served);
    activations over minibatch_tokens (= minibatch_size * (prompt_tokens + new_tokens)) tokens, see
    training_activation_bytes; the log-prob chunk logprob_positions * V * 4 * LOGPROB_COPIES
    (positions = minibatch_tokens until log-probs are chunked); and, with GAE or the full KL, the
    no-grad pass over the whole batch, full_batch_positions * V * 4 * LOGPROB_COPIES.

    shards > 1 (trainer.parallelism fsdp over that many ranks): one rank's plan. Weights, gradients
    and moments are 1/shards each (rounded up), plus what FSDP2 gathers whole in the compute dtype
    (MixedPrecisionPolicy: dtype_bytes each) while it computes: the root's parameters (embeddings,
    head, final norm) for the whole forward and backward, and two blocks at a time (the one computing
    and the one prefetched)."""
    parameters = parameter_count(shape)
    model_hint = "a smaller model, or the trainer on a device of its own"
    if shards > 1:
        model_hint = "more ranks (trainer.parallelism: fsdp shards the model across them)"
    minibatch_hint = "lower trainer.minibatch_size"
    share = f" (1/{shards} per rank)" if shards > 1 else ""
    return service_plan(
        "trainer",
        device,
        [
            MemoryItem(f"trainer float32 master weights{share}", -(-4 * parameters // shards), model_hint),
            MemoryItem(f"trainer gradients{share}", -(-4 * parameters // shards), model_hint),
            MemoryItem(f"trainer AdamW moments{share}", -(-8 * parameters // shards), model_hint),
            MemoryItem(
                "trainer FSDP2 gathered root and two blocks",
                dtype_bytes * (root_parameter_count(shape) + 2 * block_parameter_count(shape)) * (shards > 1),
                model_hint,
            ),
            MemoryItem(
                "trainer serving copy", parameters * dtype_bytes * (dtype_bytes != 4), "set trainer.dtype: float32"
            ),
            MemoryItem(
                "trainer activations",
                training_activation_bytes(shape, minibatch_tokens, dtype_bytes, checkpointing),
                minibatch_hint + ("" if checkpointing else " or set trainer.gradient_checkpointing: true"),
            ),
            MemoryItem("trainer log-prob chunk", logprob_chunk_bytes(shape, logprob_positions), minibatch_hint),
            MemoryItem(
                "trainer full-batch log-probs (GAE or full KL)",
                logprob_chunk_bytes(shape, full_batch_positions),
                "lower trainer.batch_size",
            ),
        ],
    )


@dataclass(frozen=True)
class DeviceVerdict:
    """The plans of the services that share one device, against its memory."""

    device: str
    capacity_bytes: int | None  # None: not checked (a CPU device, or one whose memory is unknown)
    plans: tuple[ServicePlan, ...]

    @property
    def total_bytes(self) -> int:
        return sum(plan.total_bytes for plan in self.plans)

    @property
    def usable_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else int(self.capacity_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.usable_bytes is None or self.total_bytes <= self.usable_bytes

    def biggest(self) -> MemoryItem:
        return max((item for plan in self.plans for item in plan.items), key=lambda item: item.bytes)

    def summary(self) -> str:
        """One line: the total, per service, against the device."""
        services = ", ".join(f"{plan.service} {gib(plan.total_bytes)}" for plan in self.plans)
        if self.capacity_bytes is None:
            return f"{self.device}: plan {gib(self.total_bytes)} GiB ({services}); not checked on this device"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"{self.device}: plan {gib(self.total_bytes)} GiB ({services}) of {gib(self.capacity_bytes)} GiB "
            f"({gib(self.usable_bytes)} usable, {HEADROOM:.0%} kept free): {verdict}"
        )

    def message(self) -> str:
        """The summary, and for a plan that does not fit, its biggest item and what shrinks it."""
        if self.fits:
            return self.summary()
        item = self.biggest()
        return f"{self.summary()}; {item.name} {gib(item.bytes)} GiB is the biggest item: {item.shrink}"


def gib(size: int | None) -> str:
    return "?" if size is None else f"{size / GIB:.1f}"


def device_verdicts(plans: Iterable[ServicePlan], capacities: Mapping[str, int]) -> list[DeviceVerdict]:
    """Plans grouped by device (in order of first appearance); a device absent from capacities
    (every CPU) is not checked."""
    by_device: dict[str, list[ServicePlan]] = {}
    for plan in plans:
        by_device.setdefault(plan.device, []).append(plan)
    return [DeviceVerdict(device, capacities.get(device), tuple(group)) for device, group in by_device.items()]


def refusal(verdicts: Iterable[DeviceVerdict]) -> str | None:
    """The message of every device whose plan does not fit, or None when all fit."""
    problems = [verdict.message() for verdict in verdicts if not verdict.fits]
    return "memory plan refused: " + "\n".join(problems) if problems else None


def memory_fraction(verdict: DeviceVerdict, service: str) -> float:
    """The share of the device a service's process may allocate: its plan over the plans of all the
    services on the device, so that each gets its planned bytes and a proportional part of the slack."""
    own = sum(plan.total_bytes for plan in verdict.plans if plan.service == service)
    return min(1.0, own / verdict.total_bytes) if verdict.total_bytes else 1.0


def render_plan(plan: ServicePlan) -> str:
    """A small table in GiB, for the service's start-up log."""
    width = max(len(item.name) for item in plan.items) if plan.items else 10
    lines = [f"memory plan of {plan.service} on {plan.device}:", f"  {'item':<{width}}  {'GiB':>8}"]
    lines += [f"  {item.name:<{width}}  {item.bytes / GIB:8.3f}" for item in plan.items]
    lines.append(f"  {'total':<{width}}  {plan.total_bytes / GIB:8.3f}")
    return "\n".join(lines)
