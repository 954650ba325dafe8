"""The ``patterns`` analysis: one Kovaleva et al. (2019) class per (window, layer, head).

The scores and rules are tensor maths in :mod:`pipelines.compute.patterns`; this module turns
them into the ``head_patterns`` table, adds the class shares to ``head_summary`` when a job
finishes, and declares the analysis to the registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.analysis.registry import Analysis, BatchContext, BatchTables
from pipelines.compute.patterns import (
    DEFAULT_THRESHOLDS,
    PATTERN_CLASSES,
    PatternThresholds,
    classify,
    pattern_scores,
)
from pipelines.config import RunConfig
from pipelines.dataset.schema import KEY_FIELDS, TableSpec
from pipelines.dataset.summaries import pattern_shares, with_shares
from pipelines.dataset.tables import per_head_columns, per_head_values

__all__ = ["ANALYSIS", "HEAD_PATTERNS", "patterns_table"]

HEAD_PATTERNS = pa.schema(KEY_FIELDS + [("pattern", pa.string()), ("vertical", pa.float32()),
                                        ("diagonal", pa.float32()), ("block", pa.float32())])


def patterns_table(context: BatchContext,
                   thresholds: PatternThresholds = DEFAULT_THRESHOLDS) -> pa.Table:
    """One pattern class per (window, layer, head) and the scores that decided it."""
    batch = context.batch
    scores = pattern_scores(context.attn, batch.valid, batch.segment,
                            context.info.causal)  # each [L, B, H]
    codes = classify(scores, thresholds)  # [L, B, H]
    layers, size, heads = codes.shape
    columns = per_head_columns(batch.windows, (layers, size, heads))
    names = pa.array(PATTERN_CLASSES)
    columns["pattern"] = names.take(pa.array(codes.permute(1, 0, 2).cpu().numpy().ravel()
                                             .astype(np.int64)))
    for name in ("vertical", "diagonal", "block"):
        columns[name] = per_head_values(scores[name])
    return pa.table(columns, schema=HEAD_PATTERNS)


def _per_batch(context: BatchContext) -> BatchTables:
    return {"head_patterns": (patterns_table(context, PatternThresholds()),
                              context.per_head_owner)}


def _finalise(root: Path, finals: dict[str, pa.Table]) -> None:
    """``share_<class>`` columns in ``head_summary``."""
    shares = pattern_shares(root / "head_patterns", PATTERN_CLASSES)
    finals["head_summary"] = with_shares(finals["head_summary"], shares)


def _describe(config: RunConfig) -> dict:
    return {"classes": list(PATTERN_CLASSES), "thresholds": PatternThresholds().to_dict(),
            "classifier": "rules on map features; see docs/analysis.md"}


ANALYSIS = Analysis(
    name="patterns",
    tables=(TableSpec("head_patterns", HEAD_PATTERNS, ("doc_id", "window", "layer", "head"),
                      per_head=True),),
    per_batch=_per_batch,
    finalise=_finalise,
    describe=_describe,
    service=True,
    layerwise=True,
)
