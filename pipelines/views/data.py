"""The payload of an attention view: one document of a dataset as compact, JSON-able data.

Weights are not written as JSON numbers: every window carries parallel little-endian arrays in
base64 (``query``/``key`` uint16, ``weight`` float32) sorted by layer, head, query, key, and an
``offsets`` array (uint32, ``num_layers * num_heads + 1`` entries) so that the rows of
(layer, head) are ``offsets[l * H + h]`` to ``offsets[l * H + h + 1]``. Ten bytes per weight
before base64: a 512-token window kept with top-8 in 6 layers × 12 heads is about 3 MB.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.dataset.labels import display_label
from pipelines.dataset.reader import Dataset

FORMAT = "headscope-view/1"
#: Optional table of query/key vectors (``--capture-qk``; schema ``schema.qk_schema``).
QK_TABLE = "qk"
_ATTENTION_COLUMNS = ["window", "layer", "head", "query", "key", "weight"]
TOKEN_COLUMNS = ["window", "position", "token", "surface", "segment", "is_special"]


def b64(values: np.ndarray, dtype: str) -> str:
    """``values`` as ``dtype`` (e.g. ``"<u2"``), little-endian bytes, base64 text."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def unb64(text: str, dtype: str) -> np.ndarray:
    """Inverse of :func:`b64`."""
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def token_labels(tokens: pa.Table) -> list[str]:
    """What a view shows for each row of a ``tokens`` table (``display_label``); datasets
    written before the ``surface`` column show the tokenizer's strings."""
    raw = tokens.column("token").to_pylist()
    if "surface" not in tokens.column_names:
        return raw
    surfaces = tokens.column("surface").to_pylist()
    return [display_label(surface, token) for surface, token in zip(surfaces, raw, strict=True)]


def view_data(dataset: Dataset | str | Path, doc_id: str, window: int | None = None,
              qk: bool = True) -> dict:
    """The view payload of ``doc_id``: every window, or only ``window``.

    ``qk=False`` leaves out query/key vectors even when the dataset has a ``qk`` table.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
    manifest = ds.manifest
    model = manifest["model"]
    mode = str(manifest.get("attention_mode", ""))
    if mode == "none":
        raise ValueError(f"{ds.root} stores no attention weights (attention mode 'none'); "
                         "re-run the job with --attention topk:K (or threshold:T, full)")
    docs = document_rows(ds, doc_id, window)
    present = pq.ParquetDataset(ds.root / "tokens").schema.names
    tokens = read_rows(ds.root, "tokens", doc_id, window,
                   [name for name in TOKEN_COLUMNS if name in present])
    weights = read_rows(ds.root, "attention", doc_id, window, _ATTENTION_COLUMNS)
    vectors = (read_rows(ds.root, QK_TABLE, doc_id, window, None)
               if qk and (ds.root / QK_TABLE).is_dir() else None)
    return build_payload(model, mode, doc_id, docs, tokens, weights, vectors)


def build_payload(model: dict, mode: str, doc_id: str, docs: list[dict], tokens: pa.Table,
                  weights: pa.Table, vectors: pa.Table | None) -> dict:
    """The payload from one document's table rows (a dataset's, or a service response's).

    ``model`` holds num_layers, num_heads, causal (and name, family); ``docs`` the document's
    ``documents`` rows to show, in window order.
    """
    layers, heads = int(model["num_layers"]), int(model["num_heads"])
    windows = [_window_payload(row, tokens, weights, vectors, layers, heads) for row in docs]
    return {
        "format": FORMAT,
        "doc_id": doc_id,
        "model": {"name": model.get("name"), "family": model.get("family"),
                  "num_layers": layers, "num_heads": heads, "causal": bool(model["causal"])},
        "attention_mode": mode,
        "n_windows": int(docs[0]["n_windows"]),
        "windows": windows,
    }


def document_rows(ds: Dataset, doc_id: str, window: int | None) -> list[dict]:
    """The ``documents`` rows of ``doc_id`` (one per window), checked against ``window``."""
    columns = ["window", "n_windows", "token_start", "token_end", "n_tokens"]
    rows = ds.table("documents", filters=[("doc_id", "==", doc_id)], columns=columns)
    if rows.empty:
        ids = ds.table("documents", columns=["doc_id"])["doc_id"].drop_duplicates()
        some = ", ".join(repr(i) for i in ids.head(5))
        more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
        raise KeyError(f"no document {doc_id!r} in {ds.root}; documents: {some}{more}")
    rows = rows.sort_values("window").to_dict("records")
    if window is None:
        return rows
    count = len(rows)
    if not 0 <= window < count:
        raise IndexError(f"document {doc_id!r} has {count} window(s), 0 to {count - 1}; "
                         f"no window {window}")
    return [rows[window]]


def read_rows(root: Path, table: str, doc_id: str, window: int | None,
          columns: list[str] | None) -> pa.Table:
    """Rows of one document (optionally one window), filtered inside the Parquet scan."""
    filters: list[tuple[str, str, str | int]] = [("doc_id", "==", doc_id)]
    if window is not None:
        filters.append(("window", "==", window))
    return pq.read_table(root / table, filters=filters, columns=columns)


def _window_payload(doc: dict, tokens: pa.Table, weights: pa.Table, vectors: pa.Table | None,
                    layers: int, heads: int) -> dict:
    index = int(doc["window"])
    toks = _rows_of(tokens, index).sort_by("position")
    n = int(doc["n_tokens"])
    if toks.num_rows != n:
        raise ValueError(f"window {index}: {toks.num_rows} token rows for {n} tokens")
    segment = toks.column("segment").to_pylist()
    return {
        "window": index,
        "token_start": int(doc["token_start"]),
        "token_end": int(doc["token_end"]),
        "n_tokens": n,
        "tokens": token_labels(toks),
        "segment": segment,
        "is_special": [int(v) for v in toks.column("is_special").to_pylist()],
        "pair": any(segment),
        "attention": _attention_payload(_rows_of(weights, index), layers, heads),
        "qk": None if vectors is None else _qk_payload(_rows_of(vectors, index), n, layers,
                                                         heads, index),
    }


def _rows_of(table: pa.Table, window: int) -> pa.Table:
    return table.filter(pc.equal(table.column("window"), window))


def _attention_payload(rows: pa.Table, layers: int, heads: int) -> dict:
    """Weights sorted by layer, head, query, key, with per-(layer, head) offsets."""
    cols = {name: rows.column(name).to_numpy() for name in _ATTENTION_COLUMNS[1:]}
    order = np.lexsort((cols["key"], cols["query"], cols["head"], cols["layer"]))
    slot = cols["layer"].astype(np.int64) * heads + cols["head"]
    counts = np.bincount(slot, minlength=layers * heads)
    if len(counts) > layers * heads:
        raise ValueError(f"attention rows name layers/heads beyond {layers} × {heads}")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return {
        "count": int(rows.num_rows),
        "offsets": b64(offsets, "<u4"),
        "query": b64(cols["query"][order], "<u2"),
        "key": b64(cols["key"][order], "<u2"),
        "weight": b64(cols["weight"][order], "<f4"),
    }


def _qk_payload(rows: pa.Table, n: int, layers: int, heads: int, window: int) -> dict | None:
    """Query and key vectors as float32 [layer, head, position, dim] arrays and each layer's
    score scale, or None."""
    if rows.num_rows == 0:
        return None
    expected = layers * heads * n
    if rows.num_rows != expected:
        raise ValueError(f"qk table, window {window}: {rows.num_rows} rows, expected "
                         f"{expected} ({layers} layers × {heads} heads × {n} positions)")
    layer = rows.column("layer").to_numpy().astype(np.int64)
    slot = (layer * heads + rows.column("head").to_numpy()) * n + rows.column("position").to_numpy()
    if np.unique(slot).size != expected or slot.max() >= expected:
        raise ValueError(f"qk table, window {window}: positions or heads missing or repeated")
    query, key = _vectors(rows.column("query")), _vectors(rows.column("key"))
    dim = query.shape[1]
    q = np.empty((expected, dim), np.float32)
    k = np.empty((expected, dim), np.float32)
    q[slot], k[slot] = query, key
    scale = np.zeros(layers, np.float64)
    scale[layer] = rows.column("scale").to_numpy()
    return {"dim": dim, "scale": scale.tolist(), "query": b64(q, "<f4"), "key": b64(k, "<f4")}


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list<float32> column as a [rows, dim] array."""
    dim = column.type.list_size
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(-1, dim)
