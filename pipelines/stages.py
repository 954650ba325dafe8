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
from pipelines.stats import STAT_NAMES, KeyFlags, head_statistics, sort_rows
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
    layers, size, heads = stats["entropy"].shape
    layer, batch_index, head = (a.ravel() for a in np.meshgrid(
        np.arange(layers), np.arange(size), np.arange(heads), indexing="ij"))
    columns = {**_keys(windows, batch_index), "layer": layer.astype(np.uint8),
               "head": head.astype(np.uint8)}
    for name in STAT_NAMES:
        values = stats[name].cpu().numpy().ravel()
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


def analyse_batch(backend: Backend, batch: Batch, config: RunConfig) -> dict[str, pa.Table]:
    """Forward pass, statistics and kept weights of one padded batch."""
    attn = backend.attentions(batch)  # [L, B, H, S, S] float32, zeros on pad keys
    batch = batch.to(attn.device)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    sorted_desc = sort_rows(attn)  # shared by max_weight, k90 and top-k
    info = backend.info
    stats = head_statistics(attn, flags, info.causal, config.local_window,
                            has_sep=info.sep_token_id is not None, sorted_desc=sorted_desc)
    kept = kept_weights(attn, batch.valid, info.causal, config.attention, sorted_desc)
    return {
        "head_stats": _stats_table(batch.windows, stats),
        "attention": _attention_table(batch.windows, kept, config.attention.kind == "full"),
    }


def model_tables(backend: Backend, windows: list[Window], config: RunConfig,
                 on_batch: Callable[[list[Window]], object] | None = None
                 ) -> dict[str, pa.Table]:
    """``head_stats`` and ``attention`` for ``windows``, batched by length under the budget."""
    parts: dict[str, list[pa.Table]] = {"head_stats": [], "attention": []}
    for indices in plan_batches([w.n_tokens for w in windows], config.batch_tokens):
        chosen = [windows[i] for i in indices]
        for name, table in analyse_batch(backend, collate(chosen, backend.info.pad_token_id),
                                         config).items():
            parts[name].append(table)
        if on_batch is not None:
            on_batch(chosen)
    return {name: pa.concat_tables(tables) for name, tables in parts.items()}


def analyse_windows(backend: Backend, windows: list[Window], config: RunConfig,
                    on_batch: Callable[[list[Window]], object] | None = None
                    ) -> dict[str, pa.Table]:
    """All four tables for ``windows``."""
    return {"documents": documents_table(windows), "tokens": tokens_table(windows),
            **model_tables(backend, windows, config, on_batch)}


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
