"""Per-row metadata on the wire: one JSON object per row (ScoreRequest.metadata_json,
GenerateRequest.metadata_json), "" meaning {}, or no rows at all (an older client's request)."""

from __future__ import annotations

import json


def metadata_to_json(metadata: list[dict]) -> list[str]:
    """One JSON text per row; "" for a row without metadata (all "" sends nothing at all)."""
    texts = [json.dumps(row, allow_nan=False) if row else "" for row in metadata]
    return texts if any(texts) else []


def metadata_from_json(texts, rows: int, field: str) -> list[dict]:
    """`rows` dicts from a request's JSON texts (none: every row {}); ValueError naming `field` and the
    row when the count is wrong or a text is not a JSON object."""
    texts = list(texts)
    if not texts:
        return [{} for _ in range(rows)]
    if len(texts) != rows:
        raise ValueError(f"{field} has {len(texts)} rows for {rows}: send one per row, or none")
    parsed = []
    for index, text in enumerate(texts):
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{field}[{index}] is not JSON: {error}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{field}[{index}] must be a JSON object, got {type(value).__name__}")
        parsed.append(value)
    return parsed
