"""The stages every front end shares: windows → tables, batch → statistics and weights.

The local job, the Ray Data job and the HTTP service all call these functions, so a document
gives the same rows whichever way it came in. The optional analyses come from the registry
(``pipelines.analysis.registry``); the table layout from ``pipelines.dataset.tables``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import torch

from pipelines.analysis import registry
from pipelines.analysis.registry import BatchContext, ShardState
from pipelines.backends.base import Backend, Capability, QueryKey, require
from pipelines.backends.batching import Batch, collate, plan_batches
from pipelines.compute.kept import kept_weights
from pipelines.compute.stats import KeyFlags, head_statistics, row_order
from pipelines.config import RunConfig
from pipelines.dataset import schema
from pipelines.dataset.tables import (
    attention_table,
    documents_table,
    key_columns,
    stats_table,
    tokens_table,
)
from pipelines.dataset.tables import sort_tables as _sort_tables
from pipelines.text.tokenize import Window

# ------------------------------------------------------------- query/key capture (qk table)

def _qk_table(batch: Batch, captured: list[QueryKey]) -> tuple[pa.Table, np.ndarray]:
    """Every valid position's query and key vectors, per layer and head, and each row's batch
    row. Rows in (batch row, layer, head, position) order."""
    query = torch.stack([q for q, _, _ in captured]).float()  # [L, B, H, S, d]
    key = torch.stack([k for _, k, _ in captured]).float()  # [L, B, H, S, d]
    scale = np.array([s for _, _, s in captured], dtype=np.float32)  # [L]
    layers, _, heads, _, dim = query.shape
    lengths = batch.valid.sum(dim=1).tolist()  # [B]
    # per window: [L, H, n, d] flattened to (layer, head, position) rows
    queries = torch.cat([query[:, b, :, :n].reshape(-1, dim) for b, n in enumerate(lengths)])
    keys = torch.cat([key[:, b, :, :n].reshape(-1, dim) for b, n in enumerate(lengths)])
    layer = np.concatenate([np.repeat(np.arange(layers), heads * n) for n in lengths])
    head = np.concatenate([np.tile(np.repeat(np.arange(heads), n), layers) for n in lengths])
    position = np.concatenate([np.tile(np.arange(n), layers * heads) for n in lengths])
    owner = np.repeat(np.arange(len(lengths)), [layers * heads * n for n in lengths])

    def vectors(rows: torch.Tensor) -> pa.Array:  # [rows, d] → fixed-size lists
        flat = pa.array(rows.cpu().numpy().ravel(), pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, dim)

    columns = {**key_columns(batch.windows, owner), "layer": layer.astype(np.int32),
               "head": head.astype(np.int32), "position": position.astype(np.int32),
               "query": vectors(queries), "key": vectors(keys), "scale": scale[layer]}
    return pa.table(columns, schema=schema.qk_schema(dim)), owner


def check_capture(backend: Backend, config: RunConfig) -> None:
    """Query/key capture reads PyTorch's attention inputs: refuse it on other backends."""
    if config.capture_qk:
        require(backend, Capability.QUERY_KEY_CAPTURE, "--capture-qk")


def _qk_tables(batch: Batch, captured: list[QueryKey],
               config: RunConfig) -> dict[str, tuple[pa.Table, np.ndarray]]:
    """The ``qk`` table with its row owners when the job asks for it (``capture_qk``)."""
    if not config.capture_qk:
        return {}
    return {"qk": _qk_table(batch, captured)}


# ---------------------------------------------------------------------------- per batch

def analyse_batch(backend: Backend, batch: Batch, config: RunConfig,
                  rank: np.ndarray | None = None,
                  states: Mapping[str, ShardState] | None = None) -> dict[str, pa.Table]:
    """Forward pass, statistics, kept weights and the asked-for analyses of one batch.

    Rows come grouped by batch row (window), each window's rows in (layer, head, query, key)
    order. With ``rank`` (one integer per batch row), every table gets a ``_rank`` column
    holding its window's rank, for ordering rows across batches. ``states`` (by analysis
    name) accumulate over the batches of a shard.
    """
    capture = backend.capture_queries_keys() if config.capture_qk else nullcontext([])
    with capture as captured:
        attn = backend.attentions(batch)  # [L, B, H, S, S] float32, zeros on pad keys
    batch = batch.to(attn.device)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    mode, info = config.attention, backend.info
    order = row_order(attn, mode.k if mode.kind == "topk" else None)  # one sort per batch
    stats = head_statistics(attn, flags, info.causal, config.local_window,
                            has_sep=info.sep_token_id is not None, order=order,
                            entropy_epsilon=config.entropy_epsilon)
    kept = kept_weights(attn, batch.valid, info.causal, mode, order.kth_largest)
    context = BatchContext(batch, attn, info, config)
    per_head = context.per_head_owner
    owned = {  # every table with the batch row of each of its rows
        "head_stats": (stats_table(batch.windows, stats), per_head),
        "attention": (attention_table(batch.windows, kept, mode.kind == "full"),
                      kept["batch_index"] if kept is not None else per_head[:0]),
    }
    for analysis in registry.selected(config.analyses):
        if analysis.per_batch is not None:
            owned.update(analysis.per_batch(context))
    owned.update(_qk_tables(batch, captured, config))
    for state in (states or {}).values():
        state.add(context)
    if rank is None:
        return {name: table for name, (table, _) in owned.items()}
    return {name: table.append_column("_rank", pa.array(rank[owner]))
            for name, (table, owner) in owned.items()}


def model_tables(backend: Backend, windows: list[Window], config: RunConfig,
                 on_batch: Callable[[list[Window]], object] | None = None,
                 states: Mapping[str, ShardState] | None = None) -> dict[str, pa.Table]:
    """The model's tables for ``windows`` (statistics, weights, analyses), batched by length.

    Rows come out sorted by (doc_id, window, layer, head[, query, key]) without sorting the
    rows themselves: windows are ranked by (doc_id, window), each batch emits its rows in
    window order, and one stable integer sort on the rank interleaves the batches.
    ``states`` (by analysis name) accumulate over every batch.
    """
    by_key = sorted(range(len(windows)), key=lambda i: (windows[i].doc.doc_id, windows[i].window))
    rank = np.empty(len(windows), dtype=np.int64)
    rank[by_key] = np.arange(len(windows))
    parts: dict[str, list[pa.Table]] = {}
    heads = backend.info.num_layers * backend.info.num_heads
    for indices in plan_batches([w.n_tokens for w in windows], config.batch_tokens, heads):
        batch = collate([windows[i] for i in indices], backend.info.pad_token_id)
        for name, table in analyse_batch(backend, batch, config, rank[indices],
                                         states).items():
            parts.setdefault(name, []).append(table)
        if on_batch is not None:
            on_batch(batch.windows)
    return {name: _by_rank(pa.concat_tables(tables)) for name, tables in parts.items()}


def _by_rank(table: pa.Table) -> pa.Table:
    """Rows ordered by their window's rank (stable), without the ``_rank`` column."""
    order = np.argsort(table["_rank"].to_numpy(), kind="stable")
    return table.drop_columns("_rank").take(order)


def text_tables(windows: list[Window], analyses: tuple[str, ...]) -> dict[str, pa.Table]:
    """The tables made from text alone: documents, tokens, and those of ``analyses``."""
    tables = {"documents": documents_table(windows), "tokens": tokens_table(windows)}
    for analysis in registry.selected(analyses):
        if analysis.text_tables is not None:
            tables.update(analysis.text_tables(windows))
    return tables


def analyse_windows(backend: Backend, windows: list[Window], config: RunConfig,
                    on_batch: Callable[[list[Window]], object] | None = None,
                    states: Mapping[str, ShardState] | None = None) -> dict[str, pa.Table]:
    """Every table for ``windows``, each sorted by its schema's keys."""
    return {**sort_tables(text_tables(windows, config.analyses)),
            **model_tables(backend, windows, config, on_batch, states)}


def sort_tables(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Each table in its sort order (doc_id, window, layer, head, ...), core or registered."""
    return _sort_tables(tables, registry.sort_keys())
