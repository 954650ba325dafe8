"""The ``similarity`` analysis: Jensen–Shannon distances between heads over a corpus.

Each shard of a job accumulates a :class:`~pipelines.compute.similarity.HeadSimilarity` over
its sampled windows and writes it as one partial table (the hidden ``_similarity`` folder, so
``--resume`` keeps finished shards); when the job finishes the partials are merged into
``head_similarity`` and ``head_coords``. Corpus-level only: the service does not offer it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.analysis.registry import Analysis, BatchContext
from pipelines.compute.similarity import HeadSimilarity
from pipelines.config import RunConfig
from pipelines.dataset import schema
from pipelines.dataset.schema import TableSpec
from pipelines.dataset.summaries import merge_similarity
from pipelines.models import ModelInfo
from pipelines.text.plan import Shard

#: Per-shard partial head similarities; underscore folders are not part of the dataset that
#: pandas/pyarrow read, and are merged into ``head_similarity`` when the job finishes.
PARTS = "_similarity"
PAIR_KEYS = ("layer_a", "head_a", "layer_b", "head_b")


#: ``head_similarity`` of the ``clark`` measure: the summed divergence, in float64 as a sum
#: over a whole corpus, where the default measure has ``js_distance`` (schema.HEAD_SIMILARITY).
HEAD_DIVERGENCE = pa.schema([*(schema.HEAD_SIMILARITY.field(k) for k in PAIR_KEYS),
                             ("js_divergence", pa.float64()), ("n_rows", pa.int64())])


def similarity_table(similarity: HeadSimilarity) -> pa.Table:
    """Every ordered pair (a == b included), a-major: layer/head of both, the measure's
    column (``js_distance`` or ``js_divergence``), rows."""
    heads = similarity.num_heads
    size = similarity.num_layers * heads
    first, second = np.divmod(np.arange(size * size), size)
    clark = similarity.measure == "clark"
    values = similarity.distance().reshape(-1)
    return pa.table({
        "layer_a": pa.array(first // heads, schema.INDEX),
        "head_a": pa.array(first % heads, schema.INDEX),
        "layer_b": pa.array(second // heads, schema.INDEX),
        "head_b": pa.array(second % heads, schema.INDEX),
        similarity.column: pa.array(values if clark else values.astype(np.float32)),
        "n_rows": pa.array(np.full(size * size, similarity.rows, np.int64)),
    }, schema=HEAD_DIVERGENCE if clark else schema.HEAD_SIMILARITY)


class ShardSimilarity:
    """The head distances of one shard's windows among the first ``similarity_docs``
    documents of the corpus (all documents when 0)."""

    def __init__(self, info: ModelInfo, config: RunConfig, shard: Shard) -> None:
        self.similarity = HeadSimilarity(info.num_layers, info.num_heads,
                                         measure=config.similarity_measure)
        limit = config.similarity_docs or float("inf")  # the first N documents of the corpus
        self.sampled = {doc.doc_id for index, doc in enumerate(shard.docs, shard.first_doc)
                        if index < limit}

    def add(self, context: BatchContext) -> None:
        batch = context.batch
        rows = torch.from_numpy(np.array([w.doc.doc_id in self.sampled for w in batch.windows],
                                         dtype=bool))
        if rows.any():
            rows = rows.to(context.attn.device)
            self.similarity.add(context.attn[:, rows], batch.valid[rows])

    def tables(self) -> dict[str, pa.Table]:
        return {PARTS: similarity_table(self.similarity)}


def _finalise(root: Path, finals: dict[str, pa.Table]) -> None:
    if (root / PARTS).is_dir():
        finals.update(merge_similarity(root / PARTS))


#: Measure → its manifest entry (``analyses.similarity``).
_MEASURES = {
    "distance": {
        "column": "js_distance",
        "distance": "sqrt(JS divergence, log base 2) per query row, unsmoothed",
        "mean": "over every sampled valid query row of every window",
        "clark_et_al_2019": "differs: they sum over rows the JS divergence in nats of maps "
                            "smoothed as 0.999 A + 0.001/n (similarity_measure=clark)",
    },
    "clark": {
        "column": "js_divergence",
        "divergence": "JS divergence in nats per query row of maps smoothed as "
                      "0.999 A + 0.001/n (n: the window's tokens)",
        "sum": "over every sampled valid query row of every window",
        "clark_et_al_2019": "same: their head_distances.py",
    },
}


def _describe(config: RunConfig) -> dict:
    return {"measure": config.similarity_measure, **_MEASURES[config.similarity_measure],
            "documents": config.similarity_docs or "all"}


ANALYSIS = Analysis(
    name="similarity",
    tables=(TableSpec(PARTS, schema.HEAD_SIMILARITY, PAIR_KEYS, hidden=True),),
    shard_state=ShardSimilarity,
    final_tables=(TableSpec("head_similarity", schema.HEAD_SIMILARITY, PAIR_KEYS,
                            per_shard=False),
                  TableSpec("head_coords", schema.HEAD_COORDS, ("layer", "head"),
                            per_head=True, per_shard=False)),
    finalise=_finalise,
    describe=_describe,
)
