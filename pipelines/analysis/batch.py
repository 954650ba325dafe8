"""The stages every front end shares: windows → tables, batch → statistics and weights.

The local job, the Ray Data job and the HTTP service all call these functions, so a document
gives the same rows whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import torch

from pipelines.analysis import words
from pipelines.analysis.patterns import PATTERN_CLASSES, PatternThresholds, classify, pattern_scores
from pipelines.backends.base import Backend, Capability, QueryKey, require
from pipelines.backends.batching import Batch, collate, plan_batches
from pipelines.compute.kept import kept_weights
from pipelines.compute.similarity import HeadSimilarity
from pipelines.compute.stats import STAT_NAMES, KeyFlags, head_statistics, row_order
from pipelines.config import RunConfig
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


def _per_head_columns(windows: list[Window], shape: tuple[int, int, int]) -> dict:
    """Key columns of a per-(window, layer, head) table, rows in (batch row, layer, head)."""
    layers, size, heads = shape
    batch_index, layer, head = (a.ravel() for a in np.meshgrid(
        np.arange(size), np.arange(layers), np.arange(heads), indexing="ij"))
    return {**_keys(windows, batch_index), "layer": layer.astype(np.uint8),
            "head": head.astype(np.uint8)}


def _stats_table(windows: list[Window], stats: dict[str, torch.Tensor]) -> pa.Table:
    """Rows in (batch row, layer, head) order."""
    layers, _, heads = stats["entropy"].shape
    columns = _per_head_columns(windows, (layers, len(windows), heads))
    for name in STAT_NAMES:
        values = stats[name].permute(1, 0, 2).cpu().numpy().ravel()
        columns[name] = pa.array(values, type=pa.float32(), from_pandas=True)  # NaN → null
    n_tokens = stats["n_tokens"].cpu().numpy().astype(np.uint16)  # [B]
    columns["n_tokens"] = np.repeat(n_tokens, layers * heads)
    return pa.table(columns, schema=schema.HEAD_STATS)


def _attention_table(windows: list[Window], kept: dict[str, np.ndarray] | None,
                     full: bool) -> pa.Table:
    attention_schema = schema.attention_schema(full)
    if kept is None:
        return attention_schema.empty_table()
    columns = {**_keys(windows, kept["batch_index"]),
               **{k: kept[k] for k in ("layer", "head", "query", "key", "weight")}}
    return pa.table(columns, schema=attention_schema)


def _patterns_table(batch: Batch, attn: torch.Tensor, causal: bool,
                    thresholds: PatternThresholds) -> pa.Table:
    """One pattern class per (window, layer, head) and the scores that decided it."""
    scores = pattern_scores(attn, batch.valid, batch.segment, causal)  # each [L, B, H]
    codes = classify(scores, thresholds)  # [L, B, H]
    columns = _per_head_columns(batch.windows, tuple(codes.shape))
    names = pa.array(PATTERN_CLASSES)
    columns["pattern"] = names.take(pa.array(codes.permute(1, 0, 2).cpu().numpy().ravel()
                                             .astype(np.int64)))
    for name in ("vertical", "diagonal", "block"):
        values = scores[name].permute(1, 0, 2).cpu().numpy().ravel()
        columns[name] = pa.array(values, type=pa.float32(), from_pandas=True)  # NaN → null
    return pa.table(columns, schema=schema.HEAD_PATTERNS)


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

    columns = {**_keys(batch.windows, owner), "layer": layer.astype(np.uint8),
               "head": head.astype(np.uint8), "position": position.astype(np.uint16),
               "query": vectors(queries), "key": vectors(keys), "scale": scale[layer]}
    return pa.table(columns, schema=schema.qk_schema(dim)), owner


def check_capture(backend: Backend, config: RunConfig) -> None:
    """Query/key capture reads PyTorch's attention inputs: refuse it on other backends."""
    if config.capture_qk:
        require(backend, Capability.QUERY_KEY_CAPTURE, "--capture-qk")


def _word_attention_table(batch: Batch, attn: torch.Tensor, config: RunConfig,
                          causal: bool) -> tuple[pa.Table, np.ndarray]:
    """The kept word-to-word weights in the job's attention mode, and each row's batch row."""
    mode, full = config.attention, config.attention.kind == "full"
    if mode.kind == "none":
        return schema.word_attention_schema(full).empty_table(), np.zeros(0, np.int64)
    index = words.word_index(batch.windows, attn.shape[-1], attn.device)  # [B, S]
    word_attn, word_valid = words.word_attention(attn, index)  # [L, B, H, W, W], [B, W]
    order = row_order(word_attn, mode.k if mode.kind == "topk" else None)
    kept = kept_weights(word_attn, word_valid, causal, mode, order.kth_largest)
    columns = {**_keys(batch.windows, kept["batch_index"]), "layer": kept["layer"],
               "head": kept["head"], "query_word": kept["query"], "key_word": kept["key"],
               "weight": kept["weight"]}
    return pa.table(columns, schema=schema.word_attention_schema(full)), kept["batch_index"]


def analyse_batch(backend: Backend, batch: Batch, config: RunConfig,
                  rank: np.ndarray | None = None,
                  similarity: HeadSimilarity | None = None,
                  sampled: np.ndarray | None = None) -> dict[str, pa.Table]:
    """Forward pass, statistics, kept weights and the asked-for analyses of one batch.

    Rows come grouped by batch row (window), each window's rows in (layer, head, query, key)
    order. With ``rank`` (one integer per batch row), every table gets a ``_rank`` column
    holding its window's rank, for ordering rows across batches. ``similarity`` accumulates
    the head distances of the batch rows that ``sampled`` ([B] bool, default all) selects.
    """
    capture = backend.capture_queries_keys() if config.capture_qk else nullcontext([])
    with capture as captured:
        attn = backend.attentions(batch)  # [L, B, H, S, S] float32, zeros on pad keys
    batch = batch.to(attn.device)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    mode, info = config.attention, backend.info
    order = row_order(attn, mode.k if mode.kind == "topk" else None)  # one sort per batch
    stats = head_statistics(attn, flags, info.causal, config.local_window,
                            has_sep=info.sep_token_id is not None, order=order)
    kept = kept_weights(attn, batch.valid, info.causal, mode, order.kth_largest)
    per_head = np.repeat(np.arange(len(batch.windows)), info.num_layers * info.num_heads)
    tables = {
        "head_stats": _stats_table(batch.windows, stats),
        "attention": _attention_table(batch.windows, kept, config.attention.kind == "full"),
    }
    owners = {"head_stats": per_head,  # the batch row of every table row
              "attention": kept["batch_index"] if kept is not None else per_head[:0]}
    if "patterns" in config.analyses:
        tables["head_patterns"] = _patterns_table(batch, attn, info.causal, PatternThresholds())
        owners["head_patterns"] = per_head
    if "words" in config.analyses:
        tables["word_attention"], owners["word_attention"] = _word_attention_table(
            batch, attn, config, info.causal)
    if config.capture_qk:
        tables["qk"], owners["qk"] = _qk_table(batch, captured)
    if similarity is not None:
        rows = torch.ones(len(batch.windows), dtype=torch.bool) if sampled is None \
            else torch.from_numpy(sampled)
        if rows.any():
            rows = rows.to(attn.device)
            similarity.add(attn[:, rows], batch.valid[rows])
    if rank is None:
        return tables
    return {name: t.append_column("_rank", pa.array(rank[owners[name]].astype(np.uint32)))
            for name, t in tables.items()}


def model_tables(backend: Backend, windows: list[Window], config: RunConfig,
                 on_batch: Callable[[list[Window]], object] | None = None,
                 similarity: HeadSimilarity | None = None,
                 in_sample: Callable[[Window], bool] | None = None) -> dict[str, pa.Table]:
    """The model's tables for ``windows`` (statistics, weights, analyses), batched by length.

    Rows come out sorted by (doc_id, window, layer, head[, query, key]) without sorting the
    rows themselves: windows are ranked by (doc_id, window), each batch emits its rows in
    window order, and one stable integer sort on the rank interleaves the batches.
    ``similarity`` accumulates the head distances of the windows ``in_sample`` accepts.
    """
    by_key = sorted(range(len(windows)), key=lambda i: (windows[i].doc.doc_id, windows[i].window))
    rank = np.empty(len(windows), dtype=np.int64)
    rank[by_key] = np.arange(len(windows))
    parts: dict[str, list[pa.Table]] = {}
    heads = backend.info.num_layers * backend.info.num_heads
    for indices in plan_batches([w.n_tokens for w in windows], config.batch_tokens, heads):
        batch = collate([windows[i] for i in indices], backend.info.pad_token_id)
        sampled = None if in_sample is None else np.array([in_sample(w) for w in batch.windows])
        for name, table in analyse_batch(backend, batch, config, rank[indices], similarity,
                                         sampled).items():
            parts.setdefault(name, []).append(table)
        if on_batch is not None:
            on_batch(batch.windows)
    return {name: _by_rank(pa.concat_tables(tables)) for name, tables in parts.items()}


def _by_rank(table: pa.Table) -> pa.Table:
    """Rows ordered by their window's rank (stable), without the ``_rank`` column."""
    order = np.argsort(table["_rank"].to_numpy(), kind="stable")
    return table.drop_columns("_rank").take(order)


def analyse_windows(backend: Backend, windows: list[Window], config: RunConfig,
                    on_batch: Callable[[list[Window]], object] | None = None,
                    similarity: HeadSimilarity | None = None,
                    in_sample: Callable[[Window], bool] | None = None) -> dict[str, pa.Table]:
    """Every table for ``windows``, each sorted by its schema's keys."""
    text_tables = {"documents": documents_table(windows), "tokens": tokens_table(windows)}
    if "words" in config.analyses:
        text_tables["words"] = words.words_table(windows)
    return {**sort_tables(text_tables),
            **model_tables(backend, windows, config, on_batch, similarity, in_sample)}


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
