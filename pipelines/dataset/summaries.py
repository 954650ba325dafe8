"""Corpus-level tables, computed from a dataset's per-shard tables when a job finishes.

Nothing here knows which analysis made a table: pattern classes, for example, come in as an
argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.compute.similarity import coordinates
from pipelines.compute.stats import STAT_NAMES
from pipelines.dataset import schema


def merge_similarity(parts_dir: Path) -> dict[str, pa.Table]:
    """``head_similarity`` and ``head_coords`` (2-D MDS) from the shards' partial tables.

    A ``js_distance`` column (a mean over rows) merges as the row-weighted mean over the
    shards; a ``js_divergence`` column (Clark et al.'s sum over rows) as the sum.
    """
    arrow = pq.read_table(parts_dir)
    parts = arrow.to_pandas()
    keys = ["layer_a", "head_a", "layer_b", "head_b"]
    summed = "js_divergence" in parts  # Clark et al.'s measure, else the mean distance
    value = "js_divergence" if summed else "js_distance"
    parts = parts[parts["n_rows"] > 0]
    parts["weighted"] = parts[value].astype(np.float64) * (1 if summed else parts["n_rows"])
    merged = parts.groupby(keys, sort=True)[["weighted", "n_rows"]].sum().reset_index()
    merged[value] = (merged["weighted"] if summed
                     else (merged["weighted"] / merged["n_rows"]).astype(np.float32))
    table = pa.Table.from_pandas(merged[[*keys, value, "n_rows"]],
                                 schema=arrow.schema.remove_metadata(),
                                 preserve_index=False)
    if table.num_rows == 0:
        return {"head_similarity": table, "head_coords": schema.HEAD_COORDS.empty_table()}
    layers, heads = int(merged["layer_a"].max()) + 1, int(merged["head_a"].max()) + 1
    distance = merged[value].to_numpy(np.float64).reshape(layers * heads, -1)
    xy = coordinates(distance)
    layer, head = np.divmod(np.arange(layers * heads), heads)
    coords = pa.table({"layer": layer.astype(np.int32), "head": head.astype(np.int32),
                       "x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32)},
                      schema=schema.HEAD_COORDS)
    return {"head_similarity": table, "head_coords": coords}


def pattern_shares(patterns_dir: Path, classes: Sequence[str]) -> pd.DataFrame | None:
    """Per (layer, head): the share of windows in each of ``classes``, or None."""
    if not patterns_dir.is_dir():
        return None
    frame = pq.read_table(patterns_dir, columns=["layer", "head", "pattern"]).to_pandas()
    if frame.empty:
        return None
    shares = pd.crosstab([frame["layer"], frame["head"]], frame["pattern"].astype(str),
                         normalize="index")
    shares = shares.reindex(columns=list(classes), fill_value=0.0)
    shares.columns = [f"share_{name.replace('+', '_')}" for name in shares.columns]
    return shares.reset_index()


def with_shares(table: pa.Table, shares: pd.DataFrame | None) -> pa.Table:
    """A per-(layer, head) summary with share columns joined on (layer, head), if any."""
    if shares is None or table.num_rows == 0:
        return table
    frame = table.to_pandas().merge(shares, on=["layer", "head"], how="left")
    return pa.Table.from_pandas(frame, preserve_index=False)


def stats_summary(head_stats_dir: Path) -> pa.Table:
    """Per (layer, head): mean and std of every statistic over all windows.

    Reads one part at a time and keeps running sums, so memory stays flat. Nulls (e.g.
    ``mass_sep`` of a GPT-2 model) are left out of a statistic's mean; all-null gives null.
    """
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    shape: tuple[int, int] | None = None
    windows = tokens = None
    for path in sorted(head_stats_dir.glob("part-*.parquet")):
        table = pq.read_table(path)
        if table.num_rows == 0:
            continue
        layer = table["layer"].to_numpy().astype(np.int64)
        head = table["head"].to_numpy().astype(np.int64)
        if shape is None:
            shape = (int(layer.max()) + 1, int(head.max()) + 1)
            windows, tokens = np.zeros(shape), np.zeros(shape)
        assert windows is not None and tokens is not None  # allocated with shape
        np.add.at(windows, (layer, head), 1)
        np.add.at(tokens, (layer, head), table["n_tokens"].to_numpy().astype(np.float64))
        for name in STAT_NAMES:
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
            present = ~np.isnan(values)
            for store, data in ((sums, values), (squares, values**2), (counts, present)):
                store.setdefault(name, np.zeros(shape))
                np.add.at(store[name], (layer[present], head[present]), data[present])
    if shape is None:
        return schema.HEAD_SUMMARY.empty_table()
    assert windows is not None and tokens is not None  # allocated with shape
    layer, head = (a.ravel() for a in np.meshgrid(np.arange(shape[0]), np.arange(shape[1]),
                                                  indexing="ij"))
    columns: dict[str, object] = {"layer": layer.astype(np.int32), "head": head.astype(np.int32),
                                  "n_windows": windows.ravel().astype(np.int64)}
    for name in STAT_NAMES:
        count = counts[name].ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums[name].ravel() / count
            var = np.maximum(squares[name].ravel() / count - mean**2, 0.0)
            std = np.sqrt(var * count / np.maximum(count - 1, 1))
        columns[f"{name}_mean"] = pa.array(mean, from_pandas=True)
        columns[f"{name}_std"] = pa.array(np.where(count > 1, std, np.nan), from_pandas=True)
    columns["n_tokens_mean"] = tokens.ravel() / windows.ravel()
    return pa.table(columns, schema=schema.HEAD_SUMMARY)


def head_summary(head_stats_dir: Path, patterns_dir: Path | None = None,
                 classes: Sequence[str] = ()) -> pa.Table:
    """Per (layer, head) statistics summary, plus the shares of ``classes`` where a
    ``head_patterns`` folder exists."""
    shares = pattern_shares(patterns_dir, classes) if patterns_dir is not None else None
    return with_shares(stats_summary(head_stats_dir), shares)
