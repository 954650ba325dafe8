"""BertViz's input from attention rows: dense [L, H, n, n] whatever the integer types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.views.bertviz import dense_attention

ROWS = {"layer": [0, 1, 1], "head": [1, 0, 1], "query": [2, 0, 2], "key": [0, 1, 2],
        "weight": [0.25, 0.5, 1.0]}


@pytest.mark.parametrize("types", [
    (pa.uint8(), pa.uint16(), pa.float16()),  # the layout of headscope 1.x (full mode)
    (pa.int16(), pa.int32(), pa.float32()),  # signed integers, float32 weights
], ids=["unsigned", "signed"])
def test_dense_attention_places_every_row(types: tuple[pa.DataType, ...]) -> None:
    small, position, weight = types
    table = pa.table({"layer": pa.array(ROWS["layer"], small),
                      "head": pa.array(ROWS["head"], small),
                      "query": pa.array(ROWS["query"], position),
                      "key": pa.array(ROWS["key"], position),
                      "weight": pa.array(np.array(ROWS["weight"], np.float16), weight)})
    dense = dense_attention(table, layers=2, heads=2, n=3)
    want = np.zeros((2, 2, 3, 3), np.float32)
    want[0, 1, 2, 0], want[1, 0, 0, 1], want[1, 1, 2, 2] = 0.25, 0.5, 1.0
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, want)  # exact: 0.25, 0.5, 1 are float16 values


def test_no_rows_is_all_zeros() -> None:
    empty = pa.table({name: pa.array([], pa.int64()) for name in ROWS})
    assert not dense_attention(empty, 1, 2, 4).any()
