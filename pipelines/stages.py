"""The stages every front end shares: windows → tables, batch → statistics and weights.

The local job, the Ray Data job and the HTTP service all call these functions, so a document
gives the same rows whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import torch

from pipelines import schema
from pipelines.backends.base import Backend
from pipelines.batching import Batch, collate, plan_batches
from pipelines.config import RunConfig
from pipelines.reduce import kept_weights
from pipelines.stats import STAT_NAMES, KeyFlags, head_statistics, row_order
from pipelines.tokenize import Window


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
        "window": np.repeat([w.window for w in windows], lengths).astype(np.uint16),
        "position": np.concatenate([np.arange(n) for n in lengths]).astype(np.uint16),
        "token_id": cat("input_ids").astype(np.uint32),
        "token": [t for w in windows for t in w.tokens],
        "char_start": cat("char_start"),
        "char_end": cat("char_end"),
        "doc_position": cat("doc_position"),
        "segment": cat("segment"),
        "is_special": cat("is_special"),
        "is_punct": cat("is_punct"),
    }, schema=schema.TOKENS)


def _keys(windows: list[Window], batch_index: np.ndarray) -> dict[str, pa.Array | np.ndarray]:
    doc_ids = pa.array([w.doc.doc_id for w in windows]).take(pa.array(batch_index))
    window = np.array([w.window for w in windows], dtype=np.uint16)[batch_index]
    return {"doc_id": doc_ids, "window": window}


def _stats_table(windows: list[Window], stats: dict[str, torch.Tensor]) -> pa.Table:
    """Rows in (batch row, layer, head) order."""
    layers, size, heads = stats["entropy"].shape
    batch_index, layer, head = (a.ravel() for a in np.meshgrid(
        np.arange(size), np.arange(layers), np.arange(heads), indexing="ij"))
    columns = {**_keys(windows, batch_index), "layer": layer.astype(np.uint8),
               "head": head.astype(np.uint8)}
    for name in STAT_NAMES:
        values = stats[name].permute(1, 0, 2).cpu().numpy().ravel()
        columns[name] = pa.array(values, type=pa.float32(), from_pandas=True)  # NaN → null
    columns["n_tokens"] = stats["n_tokens"].cpu().numpy().astype(np.uint16)[batch_index]
    return pa.table(columns, schema=schema.HEAD_STATS)


def _attention_table(windows: list[Window], kept: dict[str, np.ndarray] | None,
                     full: bool) -> pa.Table:
    attention_schema = schema.attention_schema(full)
    if kept is None:
        return attention_schema.empty_table()
    columns = {**_keys(windows, kept["batch_index"]),
               **{k: kept[k] for k in ("layer", "head", "query", "key", "weight")}}
    return pa.table(columns, schema=attention_schema)


def analyse_batch(backend: Backend, batch: Batch, config: RunConfig,
                  rank: np.ndarray | None = None) -> dict[str, pa.Table]:
    """Forward pass, statistics and kept weights of one padded batch.

    Rows come grouped by batch row (window), each window's rows in (layer, head, query, key)
    order. With ``rank`` (one integer per batch row), every table gets a ``_rank`` column
    holding its window's rank, for ordering rows across batches.
    """
    attn = backend.attentions(batch)  # [L, B, H, S, S] float32, zeros on pad keys
    batch = batch.to(attn.device)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    mode, info = config.attention, backend.info
    order = row_order(attn, mode.k if mode.kind == "topk" else None)  # one sort per batch
    stats = head_statistics(attn, flags, info.causal, config.local_window,
                            has_sep=info.sep_token_id is not None, order=order)
    kept = kept_weights(attn, batch.valid, info.causal, mode, order.kth_largest)
    tables = {
        "head_stats": _stats_table(batch.windows, stats),
        "attention": _attention_table(batch.windows, kept, config.attention.kind == "full"),
    }
    if rank is None:
        return tables
    per_row = {"head_stats": np.repeat(rank, info.num_layers * info.num_heads),
               "attention": rank[kept["batch_index"]] if kept is not None else rank[:0]}
    return {name: t.append_column("_rank", pa.array(per_row[name].astype(np.uint32)))
            for name, t in tables.items()}


def model_tables(backend: Backend, windows: list[Window], config: RunConfig,
                 on_batch: Callable[[list[Window]], object] | None = None
                 ) -> dict[str, pa.Table]:
    """``head_stats`` and ``attention`` for ``windows``, batched by length under the budget.

    Rows come out sorted by (doc_id, window, layer, head[, query, key]) without sorting the
    rows themselves: windows are ranked by (doc_id, window), each batch emits its rows in
    window order, and one stable integer sort on the rank interleaves the batches.
    """
    by_key = sorted(range(len(windows)), key=lambda i: (windows[i].doc.doc_id, windows[i].window))
    rank = np.empty(len(windows), dtype=np.int64)
    rank[by_key] = np.arange(len(windows))
    parts: dict[str, list[pa.Table]] = {"head_stats": [], "attention": []}
    heads = backend.info.num_layers * backend.info.num_heads
    for indices in plan_batches([w.n_tokens for w in windows], config.batch_tokens, heads):
        batch = collate([windows[i] for i in indices], backend.info.pad_token_id)
        for name, table in analyse_batch(backend, batch, config, rank[indices]).items():
            parts[name].append(table)
        if on_batch is not None:
            on_batch(batch.windows)
    return {name: _by_rank(pa.concat_tables(tables)) for name, tables in parts.items()}


def _by_rank(table: pa.Table) -> pa.Table:
    """Rows ordered by their window's rank (stable), without the ``_rank`` column."""
    order = np.argsort(table["_rank"].to_numpy(), kind="stable")
    return table.drop_columns("_rank").take(order)


def analyse_windows(backend: Backend, windows: list[Window], config: RunConfig,
                    on_batch: Callable[[list[Window]], object] | None = None
                    ) -> dict[str, pa.Table]:
    """All four tables for ``windows``, each sorted by its schema's keys."""
    tables = sort_tables({"documents": documents_table(windows),
                          "tokens": tokens_table(windows)})
    return {**tables, **model_tables(backend, windows, config, on_batch)}


def sort_tables(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Each table in its schema's sort order (doc_id, window, layer, head, ...)."""
    return {name: table.sort_by([(k, "ascending") for k in schema.SORT_KEYS[name]])
            for name, table in tables.items()}


def concat(parts: Iterable[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    merged: dict[str, list[pa.Table]] = {}
    for part in parts:
        for name, table in part.items():
            merged.setdefault(name, []).append(table)
    return {name: pa.concat_tables(tables) for name, tables in merged.items()}
