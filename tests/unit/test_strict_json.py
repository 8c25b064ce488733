"""strict_json: what Belay writes to Redis and files is JSON a strict reader accepts, non-finite
floats as null, however deeply nested."""

import json
import math

import pytest

from services.common.strict_json import finite_or_none, strict_json
from tests.strict_json import strict_loads


def test_strict_json_refuses_nothing_it_cleaned_and_cleans_nested_values():
    assert finite_or_none({"a": [1.0, math.nan, {"b": -math.inf}], "c": "text", "d": 3}) == {
        "a": [1.0, None, {"b": None}],
        "c": "text",
        "d": 3,
    }
    assert strict_loads(strict_json({"x": math.nan})) == {"x": None}
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)  # what strict_json guards against


def test_strict_json_keeps_tuples_as_lists_and_indents_when_asked():
    data = {"pair": (1.5, math.inf), "flag": True, "none": None}
    assert strict_loads(strict_json(data)) == {"pair": [1.5, None], "flag": True, "none": None}
    assert strict_json(data, indent=1) == json.dumps({"pair": [1.5, None], "flag": True, "none": None}, indent=1)
    assert strict_json([math.nan, 2.0]) == "[null, 2.0]"


def test_strict_json_still_refuses_what_json_cannot_encode():
    with pytest.raises(TypeError):
        strict_json({"path": object()})
