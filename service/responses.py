"""Response bodies of /v1/attention: JSON (orjson) in the row or dense layout, Arrow IPC.

The row layout sends every table as a list of row objects (the dataset's columns). The dense
layout sends ``attention`` as one object per window whose ``weights`` are nested arrays
[layer][head][query][key] over the window's tokens, zeros where a weight was not kept: the
shape transformers' ``output_attentions`` and BertViz use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fastapi.responses import Response

from pipelines.text.tokenize import Window
from service.schemas import ARROW_STREAM

LAYOUTS = ("rows", "dense")


def json_response(payload: dict) -> Response:
    """``payload`` as JSON (orjson; NumPy arrays become nested arrays)."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def arrow_response(table: pa.Table, name: str) -> Response:
    """One table as an Arrow IPC stream, its name in ``X-Headscope-Table``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM,
                    headers={"X-Headscope-Table": name})


def records(table: pa.Table) -> list[dict]:
    """The rows of ``table`` as dicts (float16 weights as float32, which JSON can hold)."""
    if "weight" in table.column_names and table.schema.field("weight").type == pa.float16():
        table = table.set_column(table.schema.get_field_index("weight"), "weight",
                                 table["weight"].cast(pa.float32()))
    return table.to_pylist()


def dense_cells(windows: Sequence[Window], layers: int, heads: int) -> int:
    """How many numbers the dense layout sends for ``windows`` (layers × heads × n²)."""
    return layers * heads * sum(w.n_tokens ** 2 for w in windows)


def _positions(selected: Sequence[int], size: int) -> np.ndarray:
    """Index of each layer (or head) in ``selected``; -1 for the others."""
    out = np.full(size, -1, dtype=np.int64)
    out[np.asarray(selected, dtype=np.int64)] = np.arange(len(selected))
    return out


def dense_attention(table: pa.Table, windows: Sequence[Window], layers: Sequence[int],
                    heads: Sequence[int]) -> list[dict]:
    """The kept weights of ``table`` as one [layer][head][query][key] float32 array per
    window, over the ``layers`` and ``heads`` given; windows in the tables' order (doc_id,
    window)."""
    doc_ids = list(dict.fromkeys(w.doc.doc_id for w in windows))
    doc = pc.index_in(table["doc_id"], pa.array(doc_ids, pa.string())).to_numpy(
        zero_copy_only=False)
    columns = {name: table[name].to_numpy() for name in ("window", "layer", "head", "query",
                                                         "key")}
    weight = table["weight"].to_numpy().astype(np.float32)
    layer_at = _positions(layers, max(layers, default=-1) + 1)
    head_at = _positions(heads, max(heads, default=-1) + 1)
    number = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    out = []
    for window in sorted(windows, key=lambda w: (w.doc.doc_id, w.window)):
        n = window.n_tokens
        dense = np.zeros((len(layers), len(heads), n, n), dtype=np.float32)
        mine = (doc == number[window.doc.doc_id]) & (columns["window"] == window.window)
        dense[layer_at[columns["layer"][mine]], head_at[columns["head"][mine]],
              columns["query"][mine], columns["key"][mine]] = weight[mine]
        out.append({"doc_id": window.doc.doc_id, "window": window.window,
                    "layers": list(layers), "heads": list(heads), "weights": dense})
    return out
