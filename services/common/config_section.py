"""The bases of the sections of Belay's config (config.py): every section refuses unknown keys and
validates a value set after loading like one read from the file; a section with a model also says how
the model runs (ModelRuntime)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelRuntime(Section):
    """How a section's model runs: the dtype of its weights and compute, and its attention kernel."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights and compute: 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or "
        "'float16'. The trainer keeps float32 master weights and AdamW state whatever this says and runs its "
        "forward passes under autocast in this dtype",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="'auto': flash_attention_2 on CUDA where the flash-attn package is installed, else sdpa"
    )
