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
import pyarrow.compute as pc
import torch

from pipelines.analysis import registry
from pipelines.analysis.registry import (
    Analysis,
    BatchContext,
    BatchTables,
    ShardState,
    layers_held,
    per_head_owner,
)
from pipelines.backends.base import Backend, Capability, QueryKey, require
from pipelines.backends.batching import Batch, collate, plan_batches
from pipelines.compute.budget import (
    CELL_BYTES,
    LIVE_ATTENTION_COPIES,
    MemoryBudget,
    attention_bytes,
    format_bytes,
)
from pipelines.compute.stats import KeyFlags
from pipelines.compute.streaming import LayerReduction, ReductionSpec, query_block_rows
from pipelines.config import ConfigError, RunConfig
from pipelines.dataset import schema
from pipelines.dataset.tables import (
    attention_table,
    documents_table,
    key_columns,
    stats_table,
    tokens_table,
)
from pipelines.dataset.tables import sort_tables as _sort_tables
from pipelines.models import ModelInfo
from pipelines.text.tokenize import Window

# ------------------------------------------------------------- query/key capture (qk table)

def _qk_table(batch: Batch, captured: list[QueryKey]) -> tuple[pa.Table, np.ndarray]:
    """Every valid position's query and key vectors, per layer and head, and each row's batch
    row. Rows in (batch row, layer, head, position) order; under grouped-query attention a
    head's key is that of the key/value head it reads (``ModelInfo.kv_head``)."""
    query = torch.stack([q for q, _, _ in captured]).float()  # [L, B, H, S, d]
    key = torch.stack([k for _, k, _ in captured]).float()  # [L, B, H_kv, S, d]
    scale = np.array([s for _, _, s in captured], dtype=np.float32)  # [L]
    layers, _, heads, _, dim = query.shape
    if key.shape[2] != heads:  # grouped-query attention: each query head's key/value head
        key = key.repeat_interleave(heads // key.shape[2], dim=2)  # [L, B, H, S, d]
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

def reduction_spec(info: ModelInfo, config: RunConfig, batch_size: int,
                   length: int) -> ReductionSpec:
    """How a batch of ``batch_size`` windows of ``length`` tokens is reduced: query blocks
    sized so their temporaries take at most a quarter of the budget's batch share."""
    budget = MemoryBudget(config.memory_budget)
    block = query_block_rows(batch_size, info.num_heads, length, budget.reduction_bytes,
                             config.attention)
    return ReductionSpec(info.num_layers, info.causal, config.local_window,
                         info.sep_token_id is not None, config.attention,
                         config.entropy_epsilon, block, info.layer_windows)


class _LayerwiseTables:
    """The tables of the layerwise analyses, collected layer by layer and then put in
    (batch row, layer, ...) order."""

    def __init__(self, analyses: list[Analysis]) -> None:
        self.analyses = analyses
        self.parts: dict[str, list[tuple[pa.Table, np.ndarray]]] = {}

    def add(self, context: BatchContext) -> None:
        for analysis in self.analyses:
            assert analysis.per_batch is not None
            for name, (table, owner) in analysis.per_batch(context).items():
                self.parts.setdefault(name, []).append((_shift_layer(table, context.layer),
                                                        owner))

    def tables(self) -> BatchTables:
        merged: BatchTables = {}
        for name, parts in self.parts.items():
            owner = np.concatenate([o for _, o in parts])
            order = np.argsort(owner, kind="stable")  # layers stay in order within a window
            merged[name] = (pa.concat_tables([t for t, _ in parts]).take(order), owner[order])
        return merged


def _shift_layer(table: pa.Table, layer: int) -> pa.Table:
    """``table`` with ``layer`` added to its ``layer`` column (if it has one)."""
    if not layer or "layer" not in table.column_names:
        return table
    index = table.column_names.index("layer")
    column = table.column(index)
    return table.set_column(index, table.field(index),
                            pc.add(column, pa.scalar(layer, column.type)))


def analyse_batch(backend: Backend, batch: Batch, config: RunConfig,
                  states: Mapping[str, ShardState] | None = None) -> dict[str, pa.Table]:
    """Forward pass, statistics, kept weights and the asked-for analyses of one batch.

    Rows come grouped by batch row (window), each window's rows in (layer, head, query, key)
    order. ``states`` (by analysis name) accumulate over the batches of a shard.
    """
    return {name: table for name, (table, _) in
            batch_tables(backend, batch, config, states).items()}


def batch_tables(backend: Backend, batch: Batch, config: RunConfig,
                 states: Mapping[str, ShardState] | None = None) -> BatchTables:
    """``analyse_batch``'s tables, each with the batch row (window) of every row.

    The attention is reduced layer by layer as the backend forms it
    (``pipelines.compute.streaming``); layerwise analyses see one layer at a time, and
    only an analysis that needs every layer at once makes the batch hold them all.
    """
    info = backend.info
    batch = batch.to(backend.device)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    size, length = batch.input_ids.shape
    reduction = LayerReduction(reduction_spec(info, config, size, length), flags)
    chosen = registry.selected(config.analyses)
    layerwise = _LayerwiseTables([a for a in chosen if a.layerwise and a.per_batch])
    stacked = [a for a in chosen if a.needs_all_layers]
    held = torch.empty((info.num_layers, size, info.num_heads, length, length),
                       device=backend.device) if stacked or states else None

    def take(layer: int, start: int, probs: torch.Tensor) -> None:  # [B, H, Q, S]
        reduction.add_rows(layer, start, probs)
        if layerwise.analyses:  # whole layers here (attention_block_rows)
            layerwise.add(BatchContext(batch, probs[None], info, config, layer))
        if held is not None:
            held[layer] = probs

    capture = backend.capture_queries_keys() if config.capture_qk else nullcontext([])
    with capture as captured:
        backend.layers(batch, take, attention_block_rows(info, config, size, length,
                                                         streams_layers(backend),
                                                         backend.name))
    stats, kept = reduction.statistics(), reduction.kept()
    per_head = per_head_owner(info.num_layers, size, info.num_heads)
    owned = {  # every table with the batch row of each of its rows
        "head_stats": (stats_table(batch.windows, stats), per_head),
        "attention": (attention_table(batch.windows, kept, config.attention.kind == "full"),
                      kept["batch_index"] if kept is not None else per_head[:0]),
        **layerwise.tables(),
    }
    if held is not None:
        context = BatchContext(batch, held, info, config)
        for analysis in stacked:
            if analysis.per_batch is not None:
                owned.update(analysis.per_batch(context))
        for state in (states or {}).values():
            state.add(context)
    owned.update(_qk_tables(batch, captured, config))
    return owned


def attention_block_rows(info: ModelInfo, config: RunConfig, size: int, length: int,
                         streams: bool = True, runtime: str = "torch") -> int | None:
    """Query rows per attention block for a batch of ``size`` windows of ``length`` tokens:
    None (whole layers, the model's own eager attention) when a layer's attention fits the
    memory budget's batch share, else as many rows as fit.

    ``streams``: the backend hands layers over as it forms them and can compute them in
    blocks (``Capability.LAYER_STREAMING``; ``runtime`` names it otherwise). ConfigError when
    whole layers are needed (an analysis reads whole layers, or the backend forms them all
    itself) and do not fit: the one rule every engine checks before a job starts.
    """
    held = held_layers(info, config, streams)
    allowed = MemoryBudget(config.memory_budget).attention_cells(held)
    cells = size * info.num_heads * length * length
    if cells <= allowed:
        return None
    whole_layers = [a.name for a in registry.selected(config.analyses)
                    if a.layerwise or a.needs_all_layers]
    if len(whole_layers) == 1:
        reason = f"the analysis {whole_layers[0]} reads whole layers"
    elif whole_layers:
        reason = f"the analyses {', '.join(whole_layers)} read whole layers"
    elif not streams:
        reason = f"the {runtime} backend forms whole layers itself"
    else:
        return max(1, allowed // (size * info.num_heads * length))
    raise whole_layers_too_long(info, length, held, reason, config.memory_budget)


def whole_layers_too_long(info: ModelInfo, length: int, held: int, reason: str,
                          memory_budget: int) -> ConfigError:
    """The refusal of a window of ``length`` tokens whose ``held`` whole layers of attention
    do not fit the budget's batch share, saying why whole layers are needed (``reason``)."""
    cells = info.num_heads * length * length
    return ConfigError(
        f"a window of {length} tokens needs {format_bytes(attention_bytes(cells, held))} for "
        f"its attention ({info.num_heads} heads × {length}² cells × {CELL_BYTES} bytes × "
        f"{LIVE_ATTENTION_COPIES} copies × {held} layer{'s' if held > 1 else ''} at once), "
        f"and {reason}; the memory budget of {format_bytes(memory_budget)} allows "
        f"{format_bytes(MemoryBudget(memory_budget).attention_bytes)} of attention in "
        "a batch. Raise --memory-budget or lower --max-length")


def held_layers(info: ModelInfo, config: RunConfig, streams: bool = True) -> int:
    """Layers of attention a batch holds at once: one when the backend streams layers and no
    chosen analysis needs them all, else every layer."""
    return layers_held(config.analyses, info.num_layers) if streams else info.num_layers


def streams_layers(backend: Backend) -> bool:
    """Whether ``backend`` hands layers over as it forms them (and in query blocks)."""
    return Capability.LAYER_STREAMING in backend.capabilities


def batch_attention_cells(backend: Backend, config: RunConfig) -> int:
    """Attention cells (B x H x S^2 of one layer) a batch may have under the job's memory
    budget: the budget's batch share over the layers held at once."""
    held = held_layers(backend.info, config, streams_layers(backend))
    return MemoryBudget(config.memory_budget).attention_cells(held)


def model_tables(backend: Backend, windows: list[Window], config: RunConfig,
                 on_batch: Callable[[list[Window]], object] | None = None,
                 states: Mapping[str, ShardState] | None = None) -> dict[str, pa.Table]:
    """The model's tables for ``windows`` (statistics, weights, analyses), batched by length.

    Rows come out sorted by (doc_id, window, layer, head[, query, key]) without sorting or
    copying the rows themselves: windows are ranked by (doc_id, window), each batch emits
    its rows grouped by window, and the windows' runs of rows are put in rank order.
    ``states`` (by analysis name) accumulate over every batch.
    """
    by_key = sorted(range(len(windows)), key=lambda i: (windows[i].doc.doc_id, windows[i].window))
    rank = np.empty(len(windows), dtype=np.int64)
    rank[by_key] = np.arange(len(windows))
    runs: dict[str, list[tuple[int, pa.Table]]] = {}
    lengths = [w.n_tokens for w in windows]
    for indices in plan_batches(lengths, config.batch_tokens, backend.info.num_heads,
                                batch_attention_cells(backend, config)):
        batch = collate([windows[i] for i in indices], backend.info.pad_token_id)
        for name, (table, owner) in batch_tables(backend, batch, config, states).items():
            runs.setdefault(name, []).extend(window_runs(table, rank[indices][owner]))
        if on_batch is not None:
            on_batch(batch.windows)
    # One chunk per window run: Parquet writes chunked tables as fast as combined ones, and
    # combining would copy every row once more.
    return {name: pa.concat_tables([table for _, table in sorted(parts, key=lambda r: r[0])])
            for name, parts in runs.items()}


def window_runs(table: pa.Table, ranks: np.ndarray) -> list[tuple[int, pa.Table]]:
    """``table`` cut into runs of rows of one window each: (the window's rank, the rows, a
    zero-copy slice); ``ranks`` holds each row's window rank."""
    if not len(ranks):
        return [(-1, table)]  # no rows: keeps the table's schema in the result
    edges = np.flatnonzero(np.diff(ranks)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(ranks)]])
    return [(int(ranks[a]), table.slice(a, b - a)) for a, b in zip(starts, stops, strict=True)]


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
