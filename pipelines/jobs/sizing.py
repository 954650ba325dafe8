"""How much memory a corpus job's rows and batches take, estimated before it starts.

The survey knows every window, so it can estimate the uncompressed bytes of the rows each
document adds to its shard (:func:`row_bytes`); the shard plan closes a shard when they reach
the shard's share of ``--memory-budget`` (:func:`shard_rule`). Before the first shard, a job
logs the working memory it expects (:func:`expected_memory`) and refuses to start when even
the longest window's attention cannot fit the batch's share (:func:`check_fits`). Every
engine (local, Ray, ``run_windowed``) calls these, so they plan and refuse alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipelines.analysis.batch import attention_block_rows
from pipelines.analysis.registry import layers_held
from pipelines.compute.budget import MemoryBudget, attention_bytes, format_bytes
from pipelines.compute.stats import DEFINITIONS
from pipelines.config import RunConfig
from pipelines.models import ModelInfo
from pipelines.text.plan import RowBytes, ShardRule

log = logging.getLogger(__name__)
#: Uncompressed bytes of one attention row: window, layer, head, query and key (int32 each),
#: weight (float32) and the doc_id dictionary index.
ATTENTION_ROW_BYTES = 28
#: Uncompressed bytes of one head_stats row: float32 statistics and int32 n_tokens (4 bytes
#: per definition), window, layer, head (int32) and the doc_id dictionary index.
HEAD_STATS_ROW_BYTES = 4 * len(DEFINITIONS) + 16
#: About the bytes of one tokens row: its integer columns, flags and two short strings.
TOKEN_ROW_BYTES = 64


def qk_vector_bytes(info: ModelInfo) -> int:
    """Uncompressed bytes of one token's query and key vectors over every layer and head
    (``--capture-qk``)."""
    return info.num_layers * info.num_heads * (2 * info.head_dim + 1) * 4


def row_bytes(config: RunConfig, info: ModelInfo) -> RowBytes:
    """What a window's rows add to its shard under ``config``: kept attention pairs (in
    threshold mode as many as ``full`` keeps, an upper bound: the rows depend on the weights),
    the ``words`` analysis' word pairs (no more than token pairs, so bounded the same way),
    ``head_stats`` rows, tokens rows and query/key vectors when captured."""
    mode, heads = config.attention, info.num_layers * info.num_heads
    tables_with_pairs = 0 if mode.kind == "none" else 1 + ("words" in config.analyses)
    token = TOKEN_ROW_BYTES + (qk_vector_bytes(info) if config.capture_qk else 0)
    return RowBytes(pair=tables_with_pairs * heads * ATTENTION_ROW_BYTES, token=token,
                    window=heads * HEAD_STATS_ROW_BYTES, causal=info.causal,
                    top_k=mode.k if mode.kind == "topk" else None)


def shard_rule(config: RunConfig, info: ModelInfo) -> ShardRule:
    """Shards close at ``config.shard_tokens`` tokens or at the budget's share for the rows
    of one shard (``MemoryBudget.shard_bytes``), whichever comes first."""
    budget = MemoryBudget(config.memory_budget)
    return ShardRule(config.shard_tokens, budget.shard_bytes, row_bytes(config, info))


def window_attention_bytes(n: int, config: RunConfig, info: ModelInfo) -> int:
    """Working bytes of one window of ``n`` tokens' attention in a batch: every head's n × n
    cells (``compute.budget.attention_bytes``), for each layer held at once."""
    return attention_bytes(info.num_heads * n * n, layers_held(config.analyses,
                                                               info.num_layers))


def check_fits(longest: int, config: RunConfig, info: ModelInfo, streams: bool = True,
               runtime: str = "torch") -> None:
    """A ConfigError when the longest window (``longest`` tokens) cannot run under the
    memory budget: the engine's own rule (``analysis.batch.attention_block_rows``). A window
    too long for whole layers runs in query blocks, unless an analysis reads whole layers or
    the backend (``streams`` False: ONNX Runtime) forms them itself."""
    attention_block_rows(info, config, 1, longest, streams, runtime)


@dataclass(frozen=True)
class MemoryEstimate:
    """The working memory a job expects beyond the model, by part, in bytes."""

    budget: int
    batch: int  # the largest batch in flight
    shard: int  # the largest shard's rows
    shards_alive: int = 2  # one is built while the one before is written

    @property
    def total(self) -> int:
        return self.batch + self.shards_alive * self.shard


def expected_memory(longest: int, windows: int, shards: int, largest_shard_bytes: int,
                    config: RunConfig, info: ModelInfo) -> MemoryEstimate:
    """The expected peak: the largest batch (``batch_tokens`` of windows as long as the
    longest, no more than the corpus's ``windows``, capped by the batch's share) and the
    largest shard's rows twice (once when the job has a single shard)."""
    budget = MemoryBudget(config.memory_budget)
    per_batch = min(windows, max(1, config.batch_tokens // max(1, longest)))
    batch = min(budget.batch_bytes, per_batch * window_attention_bytes(longest, config, info))
    return MemoryEstimate(budget.total, batch, largest_shard_bytes, min(2, shards))


def log_memory(estimate: MemoryEstimate) -> None:
    """Log the expected working memory; a warning when it exceeds the budget (a document
    whose rows alone are more than a shard's share)."""
    parts = (f"~{format_bytes(estimate.total)} working memory expected (budget "
             f"{format_bytes(estimate.budget)}) beyond the model: batch "
             f"~{format_bytes(estimate.batch)}, shard rows {estimate.shards_alive} × "
             f"~{format_bytes(estimate.shard)}")
    if estimate.total <= estimate.budget:
        log.info("memory: %s", parts)
        return
    share = MemoryBudget(estimate.budget).shard_bytes
    log.warning("memory: %s; more than the budget: one document's rows are more than a "
                "shard's share (%s). Split long documents, or keep fewer weights (--attention)",
                parts, format_bytes(share))
