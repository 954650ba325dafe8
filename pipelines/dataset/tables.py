"""Arrow tables from windows and tensors: the core tables and the key columns every
per-head table starts with. No model and no analysis here, only layout."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipelines.compute.stats import STAT_NAMES
from pipelines.dataset import schema
from pipelines.text.tokenize import Window


def documents_table(windows: list[Window]) -> pa.Table:
    """One row per window: where it came from and which document tokens it covers."""
    return pa.table({
        "doc_id": [w.doc.doc_id for w in windows],
        "source": [w.doc.source for w in windows],
        "source_line": [w.doc.source_line for w in windows],
        "window": [w.window for w in windows],
        "n_windows": [w.n_windows for w in windows],
        "token_start": [w.token_start for w in windows],
        "token_end": [w.token_end for w in windows],
        "n_tokens": [w.n_tokens for w in windows],
        "n_doc_tokens": [w.n_doc_tokens for w in windows],
        "truncated": [w.truncated for w in windows],
        "windowed": [w.n_windows > 1 for w in windows],
        "text": [w.doc.text for w in windows],
        "text_pair": [w.doc.text_pair for w in windows],
    }, schema=schema.DOCUMENTS)


def tokens_table(windows: list[Window]) -> pa.Table:
    """One row per position of every window."""
    lengths = np.array([w.n_tokens for w in windows])
    owner = np.repeat(np.arange(len(windows)), lengths)  # window index of every position
    doc_ids = pa.array([w.doc.doc_id for w in windows]).take(owner)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(w, name) for w in windows])

    return pa.table({
        "doc_id": doc_ids,
        "window": np.repeat([w.window for w in windows], lengths).astype(np.int32),
        "position": np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        "token_id": cat("input_ids").astype(np.int32),
        "token": [t for w in windows for t in w.tokens],
        "surface": [t for w in windows for t in w.surfaces],
        "char_start": cat("char_start"),
        "char_end": cat("char_end"),
        "doc_position": cat("doc_position"),
        "segment": cat("segment").astype(np.int8),
        "is_special": cat("is_special"),
        "is_punct": cat("is_punct"),
    }, schema=schema.TOKENS)


def key_columns(windows: list[Window], batch_index: np.ndarray) -> dict[str, pa.Array | np.ndarray]:
    """``doc_id`` and ``window`` of the batch row of every table row."""
    doc_ids = pa.array([w.doc.doc_id for w in windows]).take(pa.array(batch_index))
    window = np.array([w.window for w in windows], dtype=np.int32)[batch_index]
    return {"doc_id": doc_ids, "window": window}


def per_head_columns(windows: list[Window], shape: tuple[int, int, int]) -> dict:
    """Key columns of a per-(window, layer, head) table, rows in (batch row, layer, head);
    ``shape`` is (L, B, H)."""
    layers, size, heads = shape
    batch_index, layer, head = (a.ravel() for a in np.meshgrid(
        np.arange(size), np.arange(layers), np.arange(heads), indexing="ij"))
    return {**key_columns(windows, batch_index), "layer": layer.astype(np.int32),
            "head": head.astype(np.int32)}


def per_head_values(values: torch.Tensor) -> pa.Array:
    """[L, B, H] → float32 values in (batch row, layer, head) order; NaN → null."""
    flat = values.permute(1, 0, 2).cpu().numpy().ravel()
    return pa.array(flat, type=pa.float32(), from_pandas=True)


def stats_table(windows: list[Window], stats: dict[str, torch.Tensor]) -> pa.Table:
    """Rows in (batch row, layer, head) order."""
    layers, _, heads = stats["entropy"].shape
    columns = per_head_columns(windows, (layers, len(windows), heads))
    for name in STAT_NAMES:
        columns[name] = per_head_values(stats[name])
    n_tokens = stats["n_tokens"].cpu().numpy().astype(np.int32)  # [B]
    columns["n_tokens"] = np.repeat(n_tokens, layers * heads)
    return pa.table(columns, schema=schema.HEAD_STATS)


def attention_table(windows: list[Window], kept: dict[str, np.ndarray] | None,
                    full: bool) -> pa.Table:
    """The kept weights (``kept_weights``' columns), or an empty table when none are kept."""
    attention_schema = schema.attention_schema(full)
    if kept is None:
        return attention_schema.empty_table()
    columns = {**key_columns(windows, kept["batch_index"]),
               **{k: kept[k] for k in ("layer", "head", "query", "key", "weight")}}
    return pa.table(columns, schema=attention_schema)


def sort_tables(tables: dict[str, pa.Table],
                sort_keys: Mapping[str, Sequence[str]]) -> dict[str, pa.Table]:
    """Each table in its sort order (doc_id, window, layer, head, ...); ``sort_keys`` by
    table name (``pipelines.analysis.registry.sort_keys()`` has every table's)."""
    return {name: table.sort_by([(k, "ascending") for k in sort_keys[name]])
            for name, table in tables.items()}


def concat(parts: Iterable[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    """Tables of the same name from several parts, one after the other."""
    merged: dict[str, list[pa.Table]] = {}
    for part in parts:
        for name, table in part.items():
            merged.setdefault(name, []).append(table)
    return {name: pa.concat_tables(tables) for name, tables in merged.items()}
