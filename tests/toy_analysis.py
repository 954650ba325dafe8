"""A toy analysis, defined entirely in this module as one registry entry (a plugin).

``diagonal``: for every (window, layer, head), the mean over the window's query rows of the
weight a query puts on itself. Importing the module registers it; the tests load it the way
users load plugins (``--plugin toy_analysis``, ``plugins: [toy_analysis]``).
"""

from __future__ import annotations

import pyarrow as pa

from pipelines.analysis.registry import Analysis, BatchContext, BatchTables, register
from pipelines.config import RunConfig
from pipelines.dataset.schema import KEY_FIELDS, TableSpec
from pipelines.dataset.tables import per_head_columns, per_head_values

NAME = "diagonal"
TABLE = "head_diagonal"
SCHEMA = pa.schema(KEY_FIELDS + [("diagonal_mass", pa.float32())])
DESCRIPTION = {"diagonal_mass": "mean over the window's query rows of the weight on itself"}


def diagonal_table(context: BatchContext) -> BatchTables:
    valid = context.batch.valid[None, :, None, :].float()  # [1, B, 1, S]
    on_self = context.attn.diagonal(dim1=-2, dim2=-1)  # [L, B, H, S]
    mass = (on_self * valid).sum(-1) / valid.sum(-1)  # [L, B, H]
    columns = per_head_columns(context.batch.windows, tuple(mass.shape))
    columns["diagonal_mass"] = per_head_values(mass)
    return {TABLE: (pa.table(columns, schema=SCHEMA), context.per_head_owner)}


def describe(config: RunConfig) -> dict:
    return DESCRIPTION


ANALYSIS = register(Analysis(
    name=NAME,
    tables=(TableSpec(TABLE, SCHEMA, ("doc_id", "window", "layer", "head"), per_head=True),),
    per_batch=diagonal_table,
    describe=describe,
    service=True,
))
