"""The payload of an attention view: one document of a dataset as compact, JSON-able data.

Weights are not written as JSON numbers: every window carries parallel little-endian arrays in
base64 (``query``/``key`` uint16, ``weight`` float32) sorted by layer, head, query, key, and an
``offsets`` array (uint32, ``num_layers * num_heads + 1`` entries) so that the rows of
(layer, head) are ``offsets[l * H + h]`` to ``offsets[l * H + h + 1]``. Eight bytes per weight
before base64: a 512-token window kept with top-8 in 6 layers × 12 heads is about 3 MB.

A view may be thinned (:class:`Thinning`): only some layers and heads (the payload's
``layers`` and ``heads``; the others have no rows, and Parquet filters keep them from being
read at all) and at most ``top_k`` of the stored weights per query row. Query/key vectors
(``qk``) are [shown layer, shown head, position, dim] arrays, in the order of ``layers`` and
``heads``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.dataset.labels import token_labels
from pipelines.dataset.reader import Dataset

FORMAT = "headscope-view/2"
#: Optional table of query/key vectors (``--capture-qk``; schema ``schema.qk_schema``).
QK_TABLE = "qk"
_ATTENTION_COLUMNS = ["window", "layer", "head", "query", "key", "weight"]
TOKEN_COLUMNS = ["window", "position", "token", "surface", "segment", "is_special"]
#: The last position a page can address (``query``/``key`` travel as uint16).
MAX_VIEW_POSITION = 65535
#: Bytes of the embedded data (base64 text) per stored weight: uint16 query and key, float32
#: weight (8 bytes, 4/3 as base64).
WEIGHT_BYTES = 32 / 3
#: Per token: its JSON text (the token's characters are counted apart), segment, is_special.
TOKEN_BYTES = 9
#: Per layer and window of a page with query/key vectors: the layer's score scale as JSON.
SCALE_BYTES = 20

#: Indices given as text: ``"0,3-5"``; or as integers.
Indices = str | Iterable[int] | None


def b64(values: np.ndarray, dtype: str) -> str:
    """``values`` as ``dtype`` (e.g. ``"<u2"``), little-endian bytes, base64 text."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def unb64(text: str, dtype: str) -> np.ndarray:
    """Inverse of :func:`b64`."""
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


# --- thinning --------------------------------------------------------------------------------


def parse_indices(spec: Indices, count: int, what: str) -> tuple[int, ...]:
    """``"0,3-5"`` (or integers) → sorted indices in 0..count-1; None → all of them.

    ``what`` ("layer" or "head") names them in the error, which gives the valid range.
    """
    if spec is None:
        return tuple(range(count))
    found = _parse_text(spec, what) if isinstance(spec, str) else _as_ints(spec, what)
    bad = sorted(i for i in found if not 0 <= i < count)
    valid = f"the model has {count} {what}s, {_span_text(0, count - 1)}"
    if bad:
        which = f"{what}s {', '.join(map(str, bad))} are" if len(bad) > 1 else f"{what} {bad[0]} is"
        raise ValueError(f"{what}s {_spec_text(spec)}: {which} out of range; {valid}")
    if not found:
        raise ValueError(f"{what}s {_spec_text(spec)}: no {what} given; {valid}")
    return tuple(sorted(found))


def _parse_text(text: str, what: str) -> set[int]:
    found: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise ValueError(f"{what}s {text!r}: use indices and ranges such as '0,3-5'") from None
        if high < low:
            raise ValueError(f"{what}s {text!r}: the range {part.strip()} runs backwards")
        found.update(range(low, high + 1))
    return found


def _as_ints(values: Iterable[int], what: str) -> set[int]:
    found = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{what}s: {value!r} is not an integer index")
        found.add(int(value))
    return found


def _spec_text(spec: Indices) -> str:
    return repr(spec) if isinstance(spec, str) else repr(list(spec or ()))


def _span_text(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}–{high}"


def runs_text(indices: Iterable[int]) -> str:
    """``(0, 3, 4, 5)`` → ``"0,3–5"``."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(_span_text(low, high) for low, high in runs)


@dataclass(frozen=True)
class Thinning:
    """Which part of a document's stored weights a view shows: ``layers`` and ``heads``
    (sorted; every one of the model's when not thinned) and at most ``top_k`` weights per
    query row (per layer and head; None: all stored)."""

    num_layers: int
    num_heads: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    top_k: int | None = None

    @classmethod
    def of(cls, model: dict, layers: Indices = None, heads: Indices = None,
           top_k: int | None = None) -> Thinning:
        """Checked against ``model`` (num_layers, num_heads); ValueError says what is valid."""
        num_layers, num_heads = int(model["num_layers"]), int(model["num_heads"])
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise ValueError(f"top_k {top_k!r}: use a positive number of keys per query")
        return cls(num_layers, num_heads, parse_indices(layers, num_layers, "layer"),
                   parse_indices(heads, num_heads, "head"), top_k)

    @property
    def some_layers(self) -> bool:
        return len(self.layers) < self.num_layers

    @property
    def some_heads(self) -> bool:
        return len(self.heads) < self.num_heads

    def describe(self) -> str | None:
        """E.g. ``"layers 0,3–5 of 6; heads 0–3 of 12; top 8 keys per query"``; None when
        the view shows every stored weight."""
        parts = []
        if self.some_layers:
            parts.append(f"layers {runs_text(self.layers)} of {self.num_layers}")
        if self.some_heads:
            parts.append(f"heads {runs_text(self.heads)} of {self.num_heads}")
        if self.top_k is not None:
            parts.append(f"top {self.top_k} key{'s' if self.top_k > 1 else ''} per query")
        return "; ".join(parts) or None

    def filters(self) -> list[tuple[str, str, list[int]]]:
        """Parquet filters that leave out the layers and heads not shown."""
        return ([("layer", "in", list(self.layers))] if self.some_layers else []) + (
            [("head", "in", list(self.heads))] if self.some_heads else [])

    def rows(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` (a ``layer`` and ``head`` column) of shown layers and heads."""
        for name, keep, some in (("layer", self.layers, self.some_layers),
                                 ("head", self.heads, self.some_heads)):
            if some:
                column = table.column(name)
                table = table.filter(pc.is_in(column, pa.array(keep, column.type)))
        return table

    def weights(self, table: pa.Table) -> pa.Table:
        """The shown rows of an ``attention`` table, cut to ``top_k`` per query row."""
        table = self.rows(table)
        if self.top_k is None or table.num_rows == 0:
            return table
        windows = pc.unique(table.column("window")).to_pylist()
        return pa.concat_tables([_top_k(_rows_of(table, w), self.top_k, self.num_heads)
                                 for w in sorted(windows)])


def _top_k(rows: pa.Table, k: int, heads: int) -> pa.Table:
    """The ``k`` largest weights of every (layer, head, query) of one window; equal weights
    go to the smaller key. One stable sort by (group, -weight) of rows in key order."""
    col = {name: rows.column(name).to_numpy() for name in ("layer", "head", "query", "key")}
    width = int(col["query"].max()) + 1
    group = (col["layer"].astype(np.int64) * heads + col["head"]) * width + col["query"]
    if group.max() >= 2 ** 31:
        raise ValueError(f"top_k: too many (layer, head, query) rows ({group.max():,})")
    weight = rows.column("weight").to_numpy().astype(np.float32) + np.float32(0)  # no -0.0
    # floats ≥ 0 order as their bits: (group, -weight) is one int64
    composite = (group << 32) | (np.uint32(0xFFFFFFFF) - weight.view(np.uint32))
    by_key = None if _in_key_order(group, col["key"]) else np.argsort(col["key"], kind="stable")
    order = np.argsort(composite if by_key is None else composite[by_key], kind="stable")
    if by_key is not None:
        order = by_key[order]
    counts = np.bincount(group)
    starts = np.cumsum(counts) - counts
    picks = [starts[counts > j] + j for j in range(min(k, int(counts.max())))]
    return rows.take(np.sort(order[np.concatenate(picks)]))


def _in_key_order(group: np.ndarray, key: np.ndarray) -> bool:
    """Whether rows are sorted by (group, key), as a dataset stores them."""
    return bool(np.all(np.diff(group * 65536 + key) > 0))


# --- selection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The table rows a view of one document shows, thinned, before they are encoded."""

    model: dict
    mode: str
    doc_id: str
    docs: list[dict]  # the document's ``documents`` rows to show, in window order
    tokens: pa.Table
    weights: pa.Table
    vectors: pa.Table | None
    thinning: Thinning

    def data_bytes(self) -> int:
        """Size of the embedded data (JSON with base64 arrays), from the rows selected."""
        offsets = len(self.docs) * _b64_size(4 * (self.thinning.num_layers
                                                  * self.thinning.num_heads + 1))
        chars = sum(len(label) for label in token_labels(self.tokens))
        size = self.weights.num_rows * WEIGHT_BYTES + offsets
        size += self.tokens.num_rows * TOKEN_BYTES + chars
        if self.vectors is not None and self.vectors.num_rows:
            dim = self.vectors.column("query").type.list_size
            size += 2 * _b64_size(4 * dim * self.vectors.num_rows)
            size += len(self.docs) * self.thinning.num_layers * SCALE_BYTES
        return int(size)

    def payload(self) -> dict:
        """The payload (see the module docstring)."""
        thin = self.thinning
        windows = [_window_payload(row, self.tokens, self.weights, self.vectors, thin)
                   for row in self.docs]
        model = self.model
        return {
            "format": FORMAT,
            "doc_id": self.doc_id,
            "model": {"name": model.get("name"), "family": model.get("family"),
                      "num_layers": thin.num_layers, "num_heads": thin.num_heads,
                      "causal": bool(model["causal"]),
                      "layer_windows": model.get("layer_windows")
                      or [None] * int(model["num_layers"])},
            "attention_mode": self.mode,
            "layers": list(thin.layers),
            "heads": list(thin.heads),
            "top_k": thin.top_k,
            "thinned": thin.describe(),
            "n_windows": int(self.docs[0]["n_windows"]),
            "windows": windows,
        }


def _b64_size(raw: int) -> int:
    return 4 * -(-raw // 3)


def select(dataset: Dataset | str | Path, doc_id: str, window: int | None = None,
           qk: bool = True, layers: Indices = None, heads: Indices = None,
           top_k: int | None = None) -> Selection:
    """The rows of ``doc_id`` (every window, or only ``window``) a view shows.

    ``layers``/``heads`` (``"0,3-5"`` or integers) and ``top_k`` thin it; ``qk=False`` leaves
    out query/key vectors even when the dataset has a ``qk`` table.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
    manifest = ds.manifest
    model = manifest["model"]
    mode = str(manifest.get("attention_mode", ""))
    if mode == "none":
        raise ValueError(f"{ds.root} stores no attention weights (attention mode 'none'); "
                         "re-run the job with --attention topk:K (or threshold:T, full)")
    thin = Thinning.of(model, layers, heads, top_k)
    docs = document_rows(ds, doc_id, window)
    present = pq.ParquetDataset(ds.root / "tokens").schema.names
    tokens = read_rows(ds.root, "tokens", doc_id, window,
                   [name for name in TOKEN_COLUMNS if name in present])
    weights = thin.weights(read_rows(ds.root, "attention", doc_id, window, _ATTENTION_COLUMNS,
                                     thin.filters()))
    vectors = (read_rows(ds.root, QK_TABLE, doc_id, window, None, thin.filters())
               if qk and (ds.root / QK_TABLE).is_dir() else None)
    return Selection(model, mode, doc_id, docs, tokens, weights, vectors, thin)


def view_data(dataset: Dataset | str | Path, doc_id: str, window: int | None = None,
              qk: bool = True, layers: Indices = None, heads: Indices = None,
              top_k: int | None = None) -> dict:
    """The view payload of ``doc_id``: every window, or only ``window`` (see :func:`select`)."""
    return select(dataset, doc_id, window, qk, layers, heads, top_k).payload()


def build_payload(model: dict, mode: str, doc_id: str, docs: list[dict], tokens: pa.Table,
                  weights: pa.Table, vectors: pa.Table | None,
                  thinning: Thinning | None = None) -> dict:
    """The payload from one document's table rows (a dataset's, or a service response's).

    ``model`` holds num_layers, num_heads, causal (and name, family); ``docs`` the document's
    ``documents`` rows to show, in window order; ``thinning`` None shows everything.
    """
    thin = thinning or Thinning.of(model)
    shown = None if vectors is None else thin.rows(vectors)
    return Selection(model, mode, doc_id, docs, tokens, thin.weights(weights), shown,
                     thin).payload()


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
              columns: list[str] | None, more: list | None = None) -> pa.Table:
    """Rows of one document (optionally one window, and ``more`` filters), filtered inside
    the Parquet scan."""
    filters: list[tuple] = [("doc_id", "==", doc_id)]
    if window is not None:
        filters.append(("window", "==", window))
    return pq.read_table(root / table, filters=filters + (more or []), columns=columns)


def _window_payload(doc: dict, tokens: pa.Table, weights: pa.Table, vectors: pa.Table | None,
                    thin: Thinning) -> dict:
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
        "attention": _attention_payload(_rows_of(weights, index), thin.num_layers,
                                        thin.num_heads),
        "qk": None if vectors is None else _qk_payload(_rows_of(vectors, index), n, thin,
                                                         index),
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
    if rows.num_rows and max(cols["query"].max(), cols["key"].max()) > MAX_VIEW_POSITION:
        raise ValueError(f"a view draws windows of at most {MAX_VIEW_POSITION + 1} tokens "
                         "(positions are sent as 16-bit numbers); this window is longer")
    return {
        "count": int(rows.num_rows),
        "offsets": b64(offsets, "<u4"),
        "query": b64(cols["query"][order], "<u2"),
        "key": b64(cols["key"][order], "<u2"),
        "weight": b64(cols["weight"][order], "<f4"),
    }


def _qk_payload(rows: pa.Table, n: int, thin: Thinning, window: int) -> dict | None:
    """Query and key vectors as float32 [shown layer, shown head, position, dim] arrays and
    each layer's score scale, or None."""
    if rows.num_rows == 0:
        return None
    layers, heads = len(thin.layers), len(thin.heads)
    expected = layers * heads * n
    if rows.num_rows != expected:
        raise ValueError(f"qk table, window {window}: {rows.num_rows} rows, expected "
                         f"{expected} ({layers} layers × {heads} heads × {n} positions)")
    layer = rows.column("layer").to_numpy().astype(np.int64)
    layer_at = _positions(thin.layers, thin.num_layers)[layer]
    head_at = _positions(thin.heads, thin.num_heads)[rows.column("head").to_numpy()]
    slot = (layer_at * heads + head_at) * n + rows.column("position").to_numpy()
    if np.unique(slot).size != expected or slot.max() >= expected:
        raise ValueError(f"qk table, window {window}: positions or heads missing or repeated")
    query, key = _vectors(rows.column("query")), _vectors(rows.column("key"))
    dim = query.shape[1]
    q = np.empty((expected, dim), np.float32)
    k = np.empty((expected, dim), np.float32)
    q[slot], k[slot] = query, key
    scale = np.zeros(thin.num_layers, np.float64)
    scale[layer] = rows.column("scale").to_numpy()
    return {"dim": dim, "scale": scale.tolist(), "query": b64(q, "<f4"), "key": b64(k, "<f4")}


def _positions(shown: tuple[int, ...], count: int) -> np.ndarray:
    """Index of each of ``count`` layers (or heads) among ``shown``; a large number if not."""
    at = np.full(count, count * 65536, np.int64)
    at[list(shown)] = np.arange(len(shown))
    return at


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list<float32> column as a [rows, dim] array."""
    dim = column.type.list_size
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(-1, dim)
