"""The bases of the sections of Belay's config (config.py): every section refuses unknown keys, expands
`~` in its paths, and validates a value set after loading like one read from the file; a section with a
model also says how the model runs (ModelRuntime)."""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


def resolve_attention(name: str, device) -> str:
    """A section's `attn_implementation` on `device` (a torch.device or a name such as 'cuda:0'):
    'auto' is flash_attention_2 on CUDA when the flash-attn package is installed, else torch's sdpa
    (which picks its own flash or memory-efficient kernel)."""
    if name != "auto":
        return name
    if str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def is_path_field(name: str) -> bool:
    """Fields naming a file or directory: their `~` is expanded (e.g. model_dir, prompts_file, data.path)."""
    return name.endswith(("_dir", "_file")) or name == "path"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _expand_home(cls, value, info: ValidationInfo):
        """`~/models/x` means the home directory's, in the file, an override or an assignment alike."""
        if isinstance(value, str) and value.startswith("~") and is_path_field(info.field_name):
            return os.path.expanduser(value)
        return value


class ModelRuntime(Section):
    """How a section's model runs: the dtype of its weights and compute, and its attention kernel."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights and compute: 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or "
        "'float16'. The trainer keeps float32 master weights and AdamW state whatever this says and runs its "
        "forward passes under autocast in this dtype; under trainer.parallelism 'fsdp' FSDP2 also gathers the "
        "parameters in it and reduces the gradients in float32",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="'auto': flash_attention_2 on CUDA where the flash-attn package is installed, else sdpa"
    )
