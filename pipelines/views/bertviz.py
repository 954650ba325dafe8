"""What BertViz's ``head_view`` and ``model_view`` take, from one window of a dataset.

    from bertviz import head_view
    head_view(**bertviz_input(dataset, "q1"))

BertViz draws every weight of every query row, so the dataset must have kept them all
(``--attention full``); ``allow_sparse=True`` accepts top-k or threshold datasets and shows
the weights they did not keep as 0 (rows then no longer sum to 1). Indices are cast to int64
before anything indexes with them: torch would read a uint8 ``layer`` column as a boolean
mask and refuses uint16 indices. BertViz itself is not imported here.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.dataset.reader import Dataset
from pipelines.views.data import TOKEN_COLUMNS, document_rows, read_rows, token_labels

_WEIGHT_COLUMNS = ["layer", "head", "query", "key", "weight"]


class BertVizInput(TypedDict):
    """Keyword arguments of ``bertviz.head_view`` and ``bertviz.model_view``."""

    attention: tuple[torch.Tensor, ...]  # one float32 [1, H, n, n] tensor per layer
    tokens: list[str]  # n labels: the source characters of each token (``surface``)
    sentence_b_start: int | None  # position of the pair's first token; None for one text


def bertviz_input(dataset: Dataset, doc_id: str, window: int = 0,
                  allow_sparse: bool = False) -> BertVizInput:
    """The attention, tokens and ``sentence_b_start`` of one window of ``doc_id``.

    Raises ValueError when the dataset kept no weights, or kept only some (top-k, threshold)
    without ``allow_sparse``; KeyError for an unknown document; IndexError for a window it
    does not have.
    """
    check_mode(dataset, allow_sparse)
    model = dataset.manifest["model"]
    row = document_rows(dataset, doc_id, window)[0]
    tokens = _tokens(dataset, doc_id, window)
    n = int(row["n_tokens"])
    if tokens.num_rows != n:
        raise ValueError(f"{dataset.root}: document {doc_id!r} window {window} has "
                         f"{tokens.num_rows} token rows for {n} tokens")
    weights = read_rows(dataset.root, "attention", doc_id, window, _WEIGHT_COLUMNS)
    dense = dense_attention(weights, int(model["num_layers"]), int(model["num_heads"]), n)
    segment = tokens.column("segment").to_numpy().astype(np.int64)
    pair = np.flatnonzero(segment == 1)
    return {"attention": tuple(layer.unsqueeze(0) for layer in torch.from_numpy(dense)),
            "tokens": token_labels(tokens),
            "sentence_b_start": int(pair[0]) if pair.size else None}


def check_mode(dataset: Dataset, allow_sparse: bool) -> None:
    """A ValueError, naming the fix, unless the dataset kept every weight (or some of them,
    with ``allow_sparse``)."""
    mode = str(dataset.manifest.get("attention_mode", ""))
    rerun = ("re-run the job with --attention full (pipelines.analyze(..., "
             "attention='full') in a notebook)")
    if mode == "none":
        raise ValueError(f"{dataset.root} stores no attention weights (attention mode 'none'); "
                         f"{rerun}")
    if mode != "full" and not allow_sparse:
        raise ValueError(f"{dataset.root} kept only some weights (attention mode {mode!r}); "
                         f"BertViz draws whole rows: {rerun}, or pass allow_sparse=True to "
                         "show the weights not kept as 0")


def dense_attention(weights: pa.Table, layers: int, heads: int, n: int) -> np.ndarray:
    """[layers, heads, n, n] float32 from ``attention`` rows of one window; 0 where no row.

    Indices are cast to int64 whatever their stored integer type."""
    dense = np.zeros((layers, heads, n, n), dtype=np.float32)
    index = tuple(weights.column(name).to_numpy().astype(np.int64)
                  for name in _WEIGHT_COLUMNS[:4])
    dense[index] = weights.column("weight").to_numpy().astype(np.float32)
    return dense


def _tokens(dataset: Dataset, doc_id: str, window: int) -> pa.Table:
    """The window's token rows in position order (``surface`` where the dataset has it)."""
    present = pq.ParquetDataset(dataset.root / "tokens").schema.names
    columns = [name for name in TOKEN_COLUMNS if name in present]
    return read_rows(dataset.root, "tokens", doc_id, window, columns).sort_by("position")
