"""Arrow schemas of the dataset tables and their specs. The service returns the same names
and types.

A :class:`TableSpec` says how one table is stored: its schema (or a factory, where the schema
depends on the job), its sort keys (row groups follow them, so filters prune), its row-group
size, and whether it has ``layer``/``head`` columns. The core tables are specified here; each
analysis declares its own tables next to its code (``pipelines/analysis/``).

Integer columns are signed, in every table headscope writes (``tests/unit/dataset/
test_integer_columns.py`` walks every schema): users subtract them (``key - query``,
``layer - 1``), which wraps around in an unsigned type, and torch takes a uint8 column for a
boolean mask. :data:`INDEX` (int32) for positions, windows, layers, heads, token ids and other
indices; :data:`SEGMENT` (int8) for the 0/1 segment; int64 for counts that may grow with a
corpus. Format 1 datasets stored them unsigned; :func:`signed_schema` is how they read now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from pipelines.compute.stats import STAT_NAMES

#: Positions, query/key, windows, token counts and ids, layers and heads, words, factors.
#: int32, not int16, for layers and heads too: torch indexes with int32 and int64 only, and
#: NumPy keeps int16 arithmetic such as ``layer * heads * n`` in int16, where it wraps.
INDEX = pa.int32()
#: 0 for the text, 1 for the text pair.
SEGMENT = pa.int8()

DOCUMENTS = pa.schema([
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("source_line", pa.int64()),
    ("window", INDEX),
    ("n_windows", INDEX),
    ("token_start", pa.int32()),
    ("token_end", pa.int32()),
    ("n_tokens", INDEX),
    ("n_doc_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("windowed", pa.bool_()),
    ("text", pa.string()),
    ("text_pair", pa.string()),
])

TOKENS = pa.schema([
    ("doc_id", pa.string()),
    ("window", INDEX),
    ("position", INDEX),
    ("token_id", INDEX),
    ("token", pa.string()),
    ("surface", pa.string()),
    ("char_start", pa.int32()),
    ("char_end", pa.int32()),
    ("doc_position", pa.int32()),
    ("segment", SEGMENT),
    ("is_special", pa.bool_()),
    ("is_punct", pa.bool_()),
])

KEY_FIELDS = [("doc_id", pa.string()), ("window", INDEX), ("layer", INDEX), ("head", INDEX)]

HEAD_STATS = pa.schema(KEY_FIELDS + [(name, pa.float32()) for name in STAT_NAMES]
                       + [("n_tokens", INDEX)])


def weight_type(full: bool) -> pa.DataType:
    """``full`` mode stores weights as float16; top-k and threshold keep float32."""
    return pa.float16() if full else pa.float32()


def attention_schema(full: bool) -> pa.Schema:
    """``full`` mode stores weights as float16; top-k and threshold keep float32."""
    return pa.schema(KEY_FIELDS + [("query", INDEX), ("key", INDEX),
                                   ("weight", weight_type(full))])


SUMMARY_FIELDS = [("layer", INDEX), ("head", INDEX), ("n_windows", pa.int64())]
HEAD_SUMMARY = pa.schema(
    SUMMARY_FIELDS
    + [(f"{name}_{agg}", pa.float64()) for name in STAT_NAMES for agg in ("mean", "std")]
    + [("n_tokens_mean", pa.float64())]
)


#: ``headscope compare`` (``pipelines.jobs.compare``): per window × layer × head, how far
#: models A and B are apart: the maps' cosine and mean JS distance (float64, as computed),
#: each statistic's difference B − A (float64: exact for two float32 values) and both values.
HEAD_COMPARE = pa.schema(
    KEY_FIELDS + [("n_tokens", INDEX), ("cosine", pa.float64()), ("js_distance", pa.float64())]
    + [(f"{name}_diff", pa.float64()) for name in STAT_NAMES]
    + [(f"{name}_{model}", pa.float32()) for model in ("a", "b") for name in STAT_NAMES]
)
#: Per (layer, head): the mean over windows of each of ``HEAD_COMPARE``'s measures.
COMPARE_MEASURES = ("cosine", "js_distance", *(f"{name}_diff" for name in STAT_NAMES))
HEAD_COMPARE_SUMMARY = pa.schema(
    SUMMARY_FIELDS + [(f"{name}_mean", pa.float64()) for name in COMPARE_MEASURES])


_PAIR = [("layer_a", INDEX), ("head_a", INDEX), ("layer_b", INDEX), ("head_b", INDEX)]
HEAD_SIMILARITY = pa.schema(_PAIR + [("js_distance", pa.float32()), ("n_rows", pa.int64())])
HEAD_COORDS = pa.schema([("layer", INDEX), ("head", INDEX), ("x", pa.float32()),
                         ("y", pa.float32())])


def qk_schema(head_dim: int) -> pa.Schema:
    """One row per (window, layer, head, position): the projected query and key vectors and
    the factor the model scales their dot product by before the softmax."""
    vector = pa.list_(pa.float32(), head_dim)
    return pa.schema(KEY_FIELDS + [("position", INDEX), ("query", vector), ("key", vector),
                              ("scale", pa.float32())])


@dataclass(frozen=True)
class TableSpec:
    """How one table of a dataset is stored.

    ``schema`` is a schema, or a factory called with the job's options (``full``: weights as
    float16, ``head_dim``: the query/key vector size) where the schema depends on them.
    ``per_shard``: one part per shard (False: written once, when a job finishes).
    ``hidden``: an underscore folder of partial results, merged when the job finishes and
    left out of the row counts.
    """

    name: str
    schema: pa.Schema | Callable[..., pa.Schema]
    sort_keys: tuple[str, ...]
    row_group_rows: int = 65536
    per_head: bool = False
    per_shard: bool = True
    hidden: bool = False

    def arrow_schema(self, **options) -> pa.Schema:
        return self.schema(**options) if callable(self.schema) else self.schema


CORE_SPECS: tuple[TableSpec, ...] = (
    TableSpec("documents", DOCUMENTS, ("doc_id", "window")),
    TableSpec("tokens", TOKENS, ("doc_id", "window", "position"), 131072),
    TableSpec("head_stats", HEAD_STATS, ("doc_id", "window", "layer", "head"), per_head=True),
    TableSpec("attention", lambda full=False, **_: attention_schema(full),
              ("doc_id", "window", "layer", "head", "query", "key"), 262144, per_head=True),
)
#: Tables of captured model internals (``--capture-qk``).
QK_SPEC = TableSpec("qk", lambda head_dim=64, **_: qk_schema(head_dim),
                    ("doc_id", "window", "layer", "head", "position"), 16384, per_head=True)
HEAD_SUMMARY_SPEC = TableSpec("head_summary", HEAD_SUMMARY, ("layer", "head"), per_head=True,
                              per_shard=False)
#: Every job writes these per shard.
TABLES = tuple(spec.name for spec in CORE_SPECS)
#: The tables that belong to no analysis, by name. The analyses' own tables are declared with
#: them (``pipelines.analysis.registry.table_specs`` has every table).
CORE_TABLE_SPECS: dict[str, TableSpec] = {spec.name: spec for spec in (*CORE_SPECS, QK_SPEC,
                                                                        HEAD_SUMMARY_SPEC)}


def _is_unsigned(type: pa.DataType) -> bool:
    """An unsigned integer type, or a list (or dictionary) of one."""
    if pa.types.is_list(type) or pa.types.is_fixed_size_list(type):
        return _is_unsigned(type.value_type)
    if pa.types.is_dictionary(type):
        return _is_unsigned(type.index_type) or _is_unsigned(type.value_type)
    return pa.types.is_unsigned_integer(type)


def unsigned_fields(schema: pa.Schema) -> list[str]:
    """Names of ``schema``'s fields of an unsigned integer type (in a list too)."""
    return [field.name for field in schema if _is_unsigned(field.type)]


def signed_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with each unsigned integer column given its signed type: how a table of a
    format 1 dataset (unsigned ``layer``, ``query``, ...) reads now. ``segment`` becomes
    :data:`SEGMENT`; every other unsigned column (8 to 32 bits) :data:`INDEX`."""
    fields = []
    for field in schema:
        if pa.types.is_unsigned_integer(field.type):
            if field.type.bit_width > 32:
                raise ValueError(f"column {field.name!r}: {field.type} has no signed type here")
            field = field.with_type(SEGMENT if field.name == "segment" else INDEX)
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)
