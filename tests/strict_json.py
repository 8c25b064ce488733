"""A JSON reader as strict as the ones Belay's output must satisfy (browsers, jq, Go)."""

from __future__ import annotations

import json
from typing import Any


def strict_loads(text: str | bytes) -> Any:
    """json.loads that refuses NaN and ±Infinity, as strict readers do."""

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)
