"""Arrow schemas of the dataset tables. The service returns the same names and types."""

from __future__ import annotations

import pyarrow as pa

from pipelines.compute.stats import STAT_NAMES

TABLES = ("documents", "tokens", "head_stats", "attention")
#: Tables a job writes per shard when an analysis asks for them (``--analyses``).
ANALYSIS_TABLES = ("head_patterns", "words", "word_attention")
#: Per-shard partial head similarities; underscore folders are not part of the dataset
#: that pandas/pyarrow read, and are merged into ``head_similarity`` when the job finishes.
SIMILARITY_PARTS = "_similarity"
#: Tables of captured model internals (``--capture-qk``).
CAPTURE_TABLES = ("qk",)
SHARD_TABLES = (*TABLES, *ANALYSIS_TABLES, *CAPTURE_TABLES, SIMILARITY_PARTS)
#: Sort keys of each table; row groups follow this order so filters prune them.
SORT_KEYS: dict[str, list[str]] = {
    "documents": ["doc_id", "window"],
    "tokens": ["doc_id", "window", "position"],
    "head_stats": ["doc_id", "window", "layer", "head"],
    "attention": ["doc_id", "window", "layer", "head", "query", "key"],
    "head_patterns": ["doc_id", "window", "layer", "head"],
    "words": ["doc_id", "window", "word"],
    "word_attention": ["doc_id", "window", "layer", "head", "query_word", "key_word"],
    "qk": ["doc_id", "window", "layer", "head", "position"],
    SIMILARITY_PARTS: ["layer_a", "head_a", "layer_b", "head_b"],
}
ROW_GROUP_ROWS: dict[str, int] = {
    "documents": 65536, "tokens": 131072, "head_stats": 65536, "attention": 262144,
    "head_patterns": 65536, "words": 131072, "word_attention": 262144,
    "qk": 16384,
    SIMILARITY_PARTS: 65536,
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


HEAD_PATTERNS = pa.schema(_KEYS + [("pattern", pa.string()), ("vertical", pa.float32()),
                                   ("diagonal", pa.float32()), ("block", pa.float32())])

WORDS = pa.schema([
    ("doc_id", pa.string()),
    ("window", pa.uint16()),
    ("word", pa.uint16()),
    ("token_start", pa.uint16()),  # first position of the word in the window
    ("token_end", pa.uint16()),  # one past its last position
    ("text", pa.string()),
    ("segment", pa.uint8()),
    ("is_special", pa.bool_()),
])


def word_attention_schema(full: bool) -> pa.Schema:
    return pa.schema(_KEYS + [("query_word", pa.uint16()), ("key_word", pa.uint16()),
                              ("weight", pa.float16() if full else pa.float32())])


_PAIR = [("layer_a", pa.uint8()), ("head_a", pa.uint8()), ("layer_b", pa.uint8()),
         ("head_b", pa.uint8())]
HEAD_SIMILARITY = pa.schema(_PAIR + [("js_distance", pa.float32()), ("n_rows", pa.int64())])
HEAD_COORDS = pa.schema([("layer", pa.uint8()), ("head", pa.uint8()), ("x", pa.float32()),
                         ("y", pa.float32())])


def qk_schema(head_dim: int) -> pa.Schema:
    """One row per (window, layer, head, position): the projected query and key vectors and
    the factor the model scales their dot product by before the softmax."""
    vector = pa.list_(pa.float32(), head_dim)
    return pa.schema(_KEYS + [("position", pa.uint16()), ("query", vector), ("key", vector),
                              ("scale", pa.float32())])
