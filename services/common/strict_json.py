"""JSON that strict readers accept. Python's json.dumps writes NaN and Infinity, which are not JSON:
jq, JavaScript's JSON.parse and most other languages' parsers refuse the whole document. Every step
record, rollout, evaluation, canary record and figures file Belay writes to Redis or to a file goes
through strict_json: a non-finite float (a detector before its window is full, an empty answer's
compression ratio) is written as null, and anything json.dumps cannot encode strictly raises."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf), however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(data: Any, indent: int | None = None) -> str:
    """`data` as JSON with non-finite floats as null (json.dumps would write NaN)."""
    return json.dumps(finite_or_none(data), allow_nan=False, indent=indent)
