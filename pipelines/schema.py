"""Arrow schemas of the dataset tables. The service returns the same names and types."""

from __future__ import annotations

import pyarrow as pa

from pipelines.stats import STAT_NAMES

TABLES = ("documents", "tokens", "head_stats", "attention")
#: Sort keys of each table; row groups follow this order so filters prune them.
SORT_KEYS: dict[str, list[str]] = {
    "documents": ["doc_id", "window"],
    "tokens": ["doc_id", "window", "position"],
    "head_stats": ["doc_id", "window", "layer", "head"],
    "attention": ["doc_id", "window", "layer", "head", "query", "key"],
}
ROW_GROUP_ROWS: dict[str, int] = {
    "documents": 65536, "tokens": 131072, "head_stats": 65536, "attention": 262144,
}

DOCUMENTS = pa.schema([
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("source_line", pa.int64()),
    ("window", pa.uint16()),
    ("n_windows", pa.uint16()),
    ("token_start", pa.int32()),
    ("token_end", pa.int32()),
    ("n_tokens", pa.uint16()),
    ("n_doc_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("windowed", pa.bool_()),
    ("text", pa.string()),
    ("text_pair", pa.string()),
])

TOKENS = pa.schema([
    ("doc_id", pa.string()),
    ("window", pa.uint16()),
    ("position", pa.uint16()),
    ("token_id", pa.uint32()),
    ("token", pa.string()),
    ("char_start", pa.int32()),
    ("char_end", pa.int32()),
    ("doc_position", pa.int32()),
    ("segment", pa.uint8()),
    ("is_special", pa.bool_()),
    ("is_punct", pa.bool_()),
])

_KEYS = [("doc_id", pa.string()), ("window", pa.uint16()), ("layer", pa.uint8()),
         ("head", pa.uint8())]

HEAD_STATS = pa.schema(_KEYS + [(name, pa.float32()) for name in STAT_NAMES]
                       + [("n_tokens", pa.uint16())])


def attention_schema(full: bool) -> pa.Schema:
    """``full`` mode stores weights as float16; top-k and threshold keep float32."""
    return pa.schema(_KEYS + [("query", pa.uint16()), ("key", pa.uint16()),
                              ("weight", pa.float16() if full else pa.float32())])


SUMMARY_FIELDS = [("layer", pa.uint8()), ("head", pa.uint8()), ("n_windows", pa.int64())]
HEAD_SUMMARY = pa.schema(
    SUMMARY_FIELDS
    + [(f"{name}_{agg}", pa.float64()) for name in STAT_NAMES for agg in ("mean", "std")]
    + [("n_tokens_mean", pa.float64())]
)
