"""Comparing result tables: keys exactly, statistics within 1e-5, kept weights up to ties.

The tables compared come from different batch shapes or backends (padding, batch size,
Ray vs local, HTTP vs CLI, ONNX vs PyTorch), never the same kernels on the same shapes, so
floats are compared within the bounds derived in ``tolerances``, never bitwise.

Shared by the worker and HTTP tests (imported as a plain module, like ``conftest``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tolerances import FLOAT16_ATOL, STAT_ATOL  # derived there

from pipelines.analysis import registry
from pipelines.compute.stats import STAT_NAMES
from pipelines.config import AttentionMode
from pipelines.dataset import schema

#: Statistics measured in tokens. Their rounding error grows with the distance (up to the
#: window length n times that of the weights), so they are compared divided by n.
IN_TOKENS = ("mean_distance",)
#: Statistics that average an integer count per row (see ``_allow_one_flip``).
COUNTS = ("k90",)


def frame(table: pa.Table, name: str) -> pd.DataFrame:
    keys = registry.sort_keys()[name]
    df = table.to_pandas()
    df["doc_id"] = df["doc_id"].astype(object)
    if "weight" in df:
        df["weight"] = df["weight"].astype(np.float64)
    return df.sort_values(keys).reset_index(drop=True)


def assert_head_stats_equal(got: pa.Table, want: pa.Table, atol: float = STAT_ATOL) -> None:
    assert got.schema == want.schema == schema.HEAD_STATS
    left, right = frame(got, "head_stats"), frame(want, "head_stats")
    keys = ["doc_id", "window", "layer", "head", "n_tokens"]
    pd.testing.assert_frame_equal(left[keys], right[keys])  # keys: strings and integers
    n_tokens = left["n_tokens"].to_numpy(float)
    for name in STAT_NAMES:
        got_values, want_values = left[name].to_numpy(float), right[name].to_numpy(float)
        if name in IN_TOKENS:  # a distance in tokens: compare it as a share of the window
            got_values, want_values = got_values / n_tokens, want_values / n_tokens
        if name in COUNTS:
            got_values, want_values = _allow_one_flip(got_values, want_values, n_tokens, atol)
        np.testing.assert_allclose(got_values, want_values, rtol=0, atol=atol, equal_nan=True,
                                   err_msg=name)


def _allow_one_flip(got: np.ndarray, want: np.ndarray, n_tokens: np.ndarray,
                    atol: float) -> tuple[np.ndarray, np.ndarray]:
    """A mean of per-row counts may move by 1/n where one row's count flips by one key.

    That happens when a row's cumulative mass sits within rounding of the 0.9 boundary. Such
    heads (at most 1% of them, and at least one allowed) are taken out of the comparison.
    """
    # a flip moves the mean by exactly 1/n; the rest of it is the statistics' own rounding
    one_flip = np.isclose(np.abs(got - want), 1 / n_tokens, rtol=0, atol=atol)
    assert one_flip.sum() <= max(1, len(got) // 100), f"{one_flip.sum()} k90 flips"
    return got[~one_flip], want[~one_flip]


def assert_attention_equal(got: pa.Table, want: pa.Table, atol: float = STAT_ATOL,
                           threshold: float | None = None) -> None:
    """Same kept rows with the same weights.

    Batching changes padding, so weights can move by ~1e-7 (``ATTENTION_ATOL`` bounds it at
    1e-5; float16 storage in full mode: ``FLOAT16_ATOL``); a (query, key) pair may then only
    be kept on one side if its weight sits at the edge of what the mode keeps (a top-k tie or
    the threshold). Rows on one side only are accepted if such a near-tie explains them.
    """
    assert got.schema == want.schema
    keys = registry.sort_keys()["attention"]
    row = keys[:-1]  # one query row of one head
    left, right = frame(got, "attention"), frame(want, "attention")
    both = left.merge(right, on=keys, how="outer", suffixes=("_got", "_want"), indicator=True)
    matched = both[both["_merge"] == "both"]
    np.testing.assert_allclose(matched["weight_got"], matched["weight_want"], rtol=0, atol=atol)
    weakest = {"got": left.groupby(row)["weight"].min(),
               "want": right.groupby(row)["weight"].min()}
    for only, column, other in (("left_only", "weight_got", "want"),
                                ("right_only", "weight_want", "got")):
        # A row kept on one side only must be a near-tie with the other side's weakest kept
        # weight of the same query row (or, in threshold mode, with the threshold).
        for _, item in both[both["_merge"] == only].iterrows():
            edge = weakest[other].get(tuple(item[k] for k in row), np.nan)
            near_edge = abs(item[column] - edge) <= atol
            near_threshold = threshold is not None and abs(item[column] - threshold) <= atol
            assert near_edge or near_threshold, (only, item.to_dict())
    assert len(both) - len(matched) <= max(2, len(matched) // 1000), "too many differing rows"


def assert_same_tables(got: dict[str, pa.Table], want: dict[str, pa.Table],
                       mode: str = "topk:8") -> None:
    """Every table of ``want`` equals the one in ``got``.

    documents and tokens exactly (no float columns); head_stats within ``STAT_ATOL``; attention
    per ``assert_attention_equal`` (within ``FLOAT16_ATOL`` in full mode, whose weights are
    float16; else ``STAT_ATOL``, which equals ``ATTENTION_ATOL``).
    """
    parsed = AttentionMode.parse(mode)
    for name in ("documents", "tokens"):
        if name in want:
            assert got[name].schema == want[name].schema, name
            # exact: these tables hold only strings, integers and booleans
            assert frame(got[name], name).equals(frame(want[name], name)), name
    assert_head_stats_equal(got["head_stats"], want["head_stats"])
    assert_attention_equal(got["attention"], want["attention"],
                           atol=FLOAT16_ATOL if parsed.kind == "full" else STAT_ATOL,
                           threshold=parsed.threshold if parsed.kind == "threshold" else None)


def assert_datasets_equal(got: Path, want: Path, atol: float) -> None:
    """Every table of two dataset folders: the same rows after sorting, floats within ``atol``.

    Strings, integers and booleans must be identical; float columns may differ by ``atol``,
    which the caller derives from how the two datasets were computed (see ``tolerances``).
    """
    tables = sorted(p.name for p in want.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert tables == sorted(p.name for p in got.iterdir()
                            if p.is_dir() and not p.name.startswith("."))
    for name in tables:
        if name.startswith("_"):  # bookkeeping: shard markers, similarity partials
            continue
        left, right = pq.read_table(got / name), pq.read_table(want / name)
        assert left.schema == right.schema, name
        keys = [c for c in left.column_names if not pa.types.is_floating(left.schema.field(c).type)]
        left = left.sort_by([(k, "ascending") for k in keys]).to_pandas()
        right = right.sort_by([(k, "ascending") for k in keys]).to_pandas()
        pd.testing.assert_frame_equal(left[keys], right[keys], obj=name)
        for column in left.columns.difference(keys):
            np.testing.assert_allclose(left[column].to_numpy(float), right[column].to_numpy(float),
                                       rtol=0, atol=atol, equal_nan=True,
                                       err_msg=f"{name}.{column}")
