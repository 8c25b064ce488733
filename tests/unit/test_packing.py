"""Packed ragged arrays of belay.v1 (services/common/packing.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from belay.v1 import belay_pb2
from services.common.packing import PackingError, pack_float32, pack_int32, unpack_float32, unpack_int32


def test_int32_round_trip_with_empty_rows():
    rows = [[1, 2, 3], [], [-7], [], [2**31 - 1, -(2**31)], []]
    message = pack_int32(rows)
    assert list(message.lengths) == [3, 0, 1, 0, 2, 0]
    assert len(message.data) == 4 * 6
    back = unpack_int32(belay_pb2.PackedInt32.FromString(message.SerializeToString()))
    assert [row.tolist() for row in back] == rows
    assert all(row.dtype == np.dtype("<i4") for row in back)


def test_float32_round_trip_with_empty_rows():
    rows = [[], [0.5, -1.25, 3.0e-7], [float("inf")], []]
    back = unpack_float32(belay_pb2.PackedFloat32.FromString(pack_float32(rows).SerializeToString()))
    assert [row.tolist() for row in back] == [
        [],
        [np.float32(0.5), np.float32(-1.25), np.float32(3.0e-7)],
        [float("inf")],
        [],
    ]
    assert all(row.dtype == np.dtype("<f4") for row in back)


def test_data_is_little_endian_bytes_in_row_order():
    message = pack_int32([[1], [2, 258]])
    assert message.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 0, 0])


def test_no_rows_round_trip():
    assert unpack_int32(pack_int32([])) == []
    assert unpack_float32(pack_float32([])) == []


def test_numpy_rows_of_other_dtypes_are_packed_as_int32():
    rows = [np.array([1, 2], dtype=np.int64), np.array([], dtype=np.int64)]
    back = unpack_int32(pack_int32(rows))
    assert [row.tolist() for row in back] == [[1, 2], []]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6), max_size=8))
def test_int32_round_trip_property(rows):
    assert [row.tolist() for row in unpack_int32(pack_int32(rows))] == rows


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(width=32, allow_nan=False), max_size=6), max_size=8))
def test_float32_round_trip_property(rows):
    assert [row.tolist() for row in unpack_float32(pack_float32(rows))] == rows


def test_lengths_adding_to_more_than_data_are_refused():
    message = belay_pb2.PackedInt32(data=np.arange(3, dtype="<i4").tobytes(), lengths=[2, 2])
    with pytest.raises(PackingError, match="prompt_ids: lengths add up to 4 values but data holds 3"):
        unpack_int32(message, "prompt_ids")


def test_lengths_adding_to_less_than_data_are_refused():
    message = belay_pb2.PackedFloat32(data=np.zeros(5, dtype="<f4").tobytes(), lengths=[1, 3])
    with pytest.raises(PackingError, match="lengths add up to 4 values but data holds 5"):
        unpack_float32(message)


def test_data_not_a_whole_number_of_values_is_refused():
    message = belay_pb2.PackedInt32(data=b"\x01\x00\x00\x00\x02", lengths=[1])
    with pytest.raises(PackingError, match="5 bytes is not a whole number"):
        unpack_int32(message, "ids")


def test_negative_length_is_refused():
    message = belay_pb2.PackedInt32(data=np.arange(2, dtype="<i4").tobytes(), lengths=[3, -1])
    with pytest.raises(PackingError, match="negative row length"):
        unpack_int32(message)


def test_packing_error_is_a_value_error():
    assert issubclass(PackingError, ValueError)
