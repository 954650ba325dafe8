"""``headscope compare``: how two models that share a tokenizer differ, head by head.

Kovaleva et al. (2019, "Revealing the dark secrets of BERT", §5) ask how fine-tuning changes
each head's attention: they compare the maps of the pre-trained and the fine-tuned model on
the same inputs by cosine similarity. This job runs models A and B on the identical padded
batches of the same windows and writes, per window × layer × head (``head_compare``): the
maps' cosine similarity and mean Jensen–Shannon distance (``pipelines.compute.compare``), and
every statistic of ``headscope run`` for both models with its difference B − A; per head
(``head_compare_summary``): their means over the windows.

The statistics come from the engine's own reduction (``pipelines.analysis.batch``:
``reduction_spec`` and ``LayerReduction``), so they are what ``headscope run`` writes up to
the rounding of another batch shape. Model A's layers are held stacked while model B streams
its layers against them: a batch holds every layer, under the same memory rule as an analysis
that needs every layer (``MemoryBudget.attention_cells(num_layers)``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipelines.analysis.batch import reduction_spec, whole_layers_too_long
from pipelines.backends.base import Backend
from pipelines.backends.batching import Batch, collate, plan_batches
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.budget import (
    DEFAULT_MEMORY_BUDGET,
    MemoryBudget,
)
from pipelines.compute.compare import CELL_TEMPORARY_BYTES, MapAgreement
from pipelines.compute.stats import STAT_NAMES, KeyFlags
from pipelines.compute.streaming import LayerReduction
from pipelines.config import (
    AttentionMode,
    ConfigError,
    RunConfig,
    WindowConfig,
    parse_entropy_epsilon,
)
from pipelines.dataset import schema
from pipelines.dataset.manifest import (
    COMPARE_FORMAT,
    header,
    job_key,
    model_entry,
    statistics_entry,
)
from pipelines.dataset.tables import per_head_columns, per_head_values
from pipelines.dataset.writer import DatasetWriter, atomic_write_parquet, part_name
from pipelines.jobs.local import files_input
from pipelines.jobs.memory import keep_freed_memory
from pipelines.models import ModelError, ModelInfo
from pipelines.text.inputs import Columns, expand, read_documents, validate
from pipelines.text.plan import document_windows
from pipelines.text.tokenize import Window, Windower

log = logging.getLogger(__name__)

TABLE = "head_compare"
SUMMARY = "head_compare_summary"
SORT_KEYS = ("doc_id", "window", "layer", "head")
REFERENCE = ("Kovaleva, Romanov, Rogers and Rumshisky (2019), Revealing the Dark Secrets of "
             "BERT, EMNLP-IJCNLP 2019, section 5 (how fine-tuning changes attention)")
#: Column → definition, written into the manifest.
COLUMN_DEFINITIONS = {
    "cosine": "cosine similarity of the two maps over the cells a query may see (valid "
              "query rows × valid keys, keys <= query if causal), flattened: "
              "dot / sqrt(|a|² |b|²) in float64",
    "js_distance": "mean over valid query rows of sqrt(JS(P, Q)), the Jensen–Shannon "
                   "divergence in nats (0 .. ln 2) of the two rows, each divided by its sum; "
                   "M = (P + Q) / 2, 0 ln 0 = 0",
    "<stat>_a, <stat>_b": "the head_stats statistic of model A and of model B",
    "<stat>_diff": "<stat>_b - <stat>_a in float64 (null where a statistic is null)",
}
#: Uncompressed bytes of one head_compare row: keys and n_tokens (4 bytes each, doc_id as a
#: dictionary index), cosine and js_distance (8), and per statistic 4 + 4 + 8.
ROW_BYTES = 5 * 4 + 2 * 8 + 16 * len(STAT_NAMES)


@dataclass(frozen=True)
class CompareConfig:
    """Everything that decides the rows ``headscope compare`` writes (saved in the manifest).

    ``models``: (A, B), e.g. a pre-trained model and its fine-tune. ``windows.max_length``
    None: the smaller of the two models' limits. ``local_window``, ``entropy_epsilon`` and
    ``windows.punctuation`` mean what they mean for ``headscope run``.
    """

    models: tuple[str, str] = ("minilm", "minilm-sre")
    windows: WindowConfig = field(default_factory=WindowConfig)
    device: str = "auto"
    batch_tokens: int = 8192
    local_window: int = 2
    entropy_epsilon: float = 0.0
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    allow_download: bool = False

    def __post_init__(self) -> None:
        if len(self.models) != 2:
            raise ConfigError(f"compare needs exactly two models, A and B; got "
                              f"{len(self.models)}")
        if self.batch_tokens < 1:
            raise ConfigError("batch_tokens must be a positive integer")
        MemoryBudget(self.memory_budget)  # ConfigError below the minimum
        object.__setattr__(self, "entropy_epsilon", parse_entropy_epsilon(self.entropy_epsilon))

    def run_config(self, model: str) -> RunConfig:
        """The corpus-job settings the statistics of ``model`` are reduced with."""
        return RunConfig(model=model, backend="torch", device=self.device,
                         attention=AttentionMode("none"), windows=self.windows,
                         batch_tokens=self.batch_tokens, local_window=self.local_window,
                         entropy_epsilon=self.entropy_epsilon, memory_budget=self.memory_budget)


def check_compatible(a: Backend, b: Backend) -> None:
    """A ModelError naming every difference that makes two models incomparable: their
    vocabularies, layer or head counts, or attention layout (causal or bidirectional, and
    each layer's sliding window)."""
    first, second = a.info, b.info
    problems = []
    vocab_a, vocab_b = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if vocab_a != vocab_b:
        sizes = (f"both of {len(vocab_a):,} tokens, with other ids"
                 if len(vocab_a) == len(vocab_b) else f"of {len(vocab_a):,} and {len(vocab_b):,} "
                                                      "tokens")
        problems.append(f"they do not share a tokenizer (vocabularies {sizes})")
    if first.num_layers != second.num_layers:
        problems.append(f"{first.num_layers} vs {second.num_layers} layers")
    if first.num_heads != second.num_heads:
        problems.append(f"{first.num_heads} vs {second.num_heads} heads per layer")
    if first.causal != second.causal:
        problems.append(f"{_layout(first)} vs {_layout(second)} attention")
    if first.layer_windows != second.layer_windows:
        problems.append(f"sliding windows per layer {list(first.layer_windows) or 'none'} vs "
                        f"{list(second.layer_windows) or 'none'}")
    if problems:
        raise ModelError(f"cannot compare {first.name!r} with {second.name!r}: "
                         f"{'; '.join(problems)}")


def _layout(info: ModelInfo) -> str:
    return "causal" if info.causal else "bidirectional"


_WINDOW_ARRAYS = ("input_ids", "type_ids", "is_special", "is_sep", "is_punct")


def same_windows(first: list[Window], second: list[Window]) -> bool:
    """Whether two tokenizers cut a document into the same windows of the same token ids
    (with the same token types and special, separator and punctuation flags)."""
    return len(first) == len(second) and all(
        np.array_equal(getattr(x, name), getattr(y, name))
        for x, y in zip(first, second, strict=True) for name in _WINDOW_ARRAYS)


def batch_cells(info: ModelInfo, memory_budget: int) -> int:
    """Attention cells (B × H × S² of one layer) a batch may have: the budget's batch share
    over every layer held at once (model A's stacked maps)."""
    return MemoryBudget(memory_budget).attention_cells(info.num_layers)


def check_fits(longest: int, info: ModelInfo, memory_budget: int) -> None:
    """A ConfigError when a window of ``longest`` tokens cannot run under the budget."""
    if info.num_heads * longest * longest > batch_cells(info, memory_budget):
        raise whole_layers_too_long(info, longest, info.num_layers, "compare holds model A's "
                                    "layers while model B runs", memory_budget)


def compare_batch(a: Backend, b: Backend, batch: Batch, config: CompareConfig) -> pa.Table:
    """``head_compare`` rows of one padded batch, in (batch row, layer, head) order.

    Both models see the identical batch. Model A's layers are reduced to statistics and held
    ([L, B, H, S, S] float32); model B's are reduced and compared with them as they come.
    """
    info = a.info
    batch = batch.to(a.device)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    size, length = batch.input_ids.shape
    reductions = [LayerReduction(reduction_spec(backend.info, config.run_config(model), size,
                                                length), flags)
                  for backend, model in ((a, config.models[0]), (b, config.models[1]))]
    held = torch.empty((info.num_layers, size, info.num_heads, length, length),
                       device=a.device)
    # its chunks take the reduction's share of the budget (the two never run at once)
    chunk = MemoryBudget(config.memory_budget).reduction_bytes // CELL_TEMPORARY_BYTES
    agreement = MapAgreement(info.num_layers, batch.valid, info.causal, max(1, chunk),
                             info.layer_windows)

    def take_a(layer: int, start: int, probs: torch.Tensor) -> None:  # [B, H, Q, S]
        held[layer, :, :, start:start + probs.shape[-2]] = probs
        reductions[0].add_rows(layer, start, probs)

    def take_b(layer: int, start: int, probs: torch.Tensor) -> None:  # [B, H, Q, S]
        reductions[1].add_rows(layer, start, probs)
        agreement.add_rows(layer, start, held[layer, :, :, start:start + probs.shape[-2]],
                           probs)

    a.layers(batch, take_a)
    b.layers(batch, take_b)
    stats_a, stats_b = (reduction.statistics() for reduction in reductions)
    cosine, distance = agreement.result()  # [L, B, H] float64
    columns = per_head_columns(batch.windows, (info.num_layers, size, info.num_heads))
    columns["n_tokens"] = np.repeat(stats_a["n_tokens"].cpu().numpy().astype(np.int32),
                                    info.num_layers * info.num_heads)
    columns["cosine"], columns["js_distance"] = _float64(cosine), _float64(distance)
    for name in STAT_NAMES:
        columns[f"{name}_diff"] = _float64(stats_b[name].double() - stats_a[name].double())
    for model, stats in (("a", stats_a), ("b", stats_b)):
        for name in STAT_NAMES:
            columns[f"{name}_{model}"] = per_head_values(stats[name])
    return pa.table(columns, schema=schema.HEAD_COMPARE)


def _float64(values: torch.Tensor) -> pa.Array:
    """[L, B, H] → float64 values in (batch row, layer, head) order; NaN → null."""
    flat = values.permute(1, 0, 2).cpu().numpy().astype(np.float64).ravel()
    return pa.array(flat, type=pa.float64(), from_pandas=True)


class CompareSummary:
    """Per (layer, head): the number of windows and the mean of every measure
    (``schema.COMPARE_MEASURES``) over them, nulls left out; kept as running float64 sums."""

    def __init__(self, layers: int, heads: int) -> None:
        self.shape = (layers, heads)
        self.windows = np.zeros(self.shape)
        self.sums = {name: np.zeros(self.shape) for name in schema.COMPARE_MEASURES}
        self.counts = {name: np.zeros(self.shape) for name in schema.COMPARE_MEASURES}

    def add(self, table: pa.Table) -> None:
        layer = table["layer"].to_numpy().astype(np.int64)
        head = table["head"].to_numpy().astype(np.int64)
        np.add.at(self.windows, (layer, head), 1)
        for name in schema.COMPARE_MEASURES:
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
            present = ~np.isnan(values)
            np.add.at(self.sums[name], (layer[present], head[present]), values[present])
            np.add.at(self.counts[name], (layer[present], head[present]), 1)

    def table(self) -> pa.Table:
        layer, head = (x.ravel() for x in np.meshgrid(np.arange(self.shape[0]),
                                                      np.arange(self.shape[1]), indexing="ij"))
        columns: dict[str, object] = {"layer": layer.astype(np.int32),
                                      "head": head.astype(np.int32),
                                      "n_windows": self.windows.ravel().astype(np.int64)}
        for name in schema.COMPARE_MEASURES:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = self.sums[name].ravel() / self.counts[name].ravel()  # 0 / 0: null
            columns[f"{name}_mean"] = pa.array(mean, from_pandas=True)
        return pa.table(columns, schema=schema.HEAD_COMPARE_SUMMARY)


def compare(inputs: list[str | Path], out: str | Path, config: CompareConfig | None = None,
            columns: Columns | None = None, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Compare models ``config.models`` (A, B) on ``inputs``; write the folder ``out``
    (``manifest.json``, ``head_compare``, ``head_compare_summary``) and return it.

    Refuses, before writing: an ``out`` that is not new or empty without ``overwrite``
    (OutputError); models with other vocabularies, layer or head counts or attention layouts,
    or inputs their tokenizers cut differently (ModelError); a window too long for the
    memory budget (ConfigError).
    """
    started = time.perf_counter()
    config, columns = config or CompareConfig(), columns or Columns()
    keep_freed_memory()
    writer = DatasetWriter(out, resumable=False)
    writer.check(overwrite=overwrite)
    files = expand(inputs)
    summary = validate(files, columns)
    a, b = (TorchBackend(model, config.device, allow_download=config.allow_download)
            for model in config.models)
    check_compatible(a, b)
    windows = config.windows
    if windows.max_length is None:
        windows = dataclasses.replace(windows, max_length=min(a.info.max_length,
                                                              b.info.max_length))
    config = dataclasses.replace(config, windows=windows)
    windower_a, windower_b = (Windower(backend.tokenizer, backend.info, windows)
                              for backend in (a, b))
    found: list[Window] = []
    for doc in read_documents(files, columns):
        cut = document_windows(windower_a, doc)
        if not same_windows(cut, document_windows(windower_b, doc)):
            raise ModelError(f"cannot compare {a.info.name!r} with {b.info.name!r}: their "
                             f"tokenizers cut document {doc.doc_id!r} ({doc.source}:"
                             f"{doc.source_line}) into other tokens")
        found.extend(cut)
    tokens = sum(w.n_tokens for w in found)
    check_fits(max((w.n_tokens for w in found), default=0), a.info, config.memory_budget)
    log.info("compare: %d documents, %d windows, %d tokens, each through %s and %s",
             summary.documents, len(found), tokens, a.info.name, b.info.name)
    manifest = {
        **header(COMPARE_FORMAT, stats_version=True),
        "models": {"a": model_entry(a.info), "b": model_entry(b.info)},
        "runtime": {"a": a.describe(), "b": b.describe()},
        "config": {**dataclasses.asdict(config), "models": list(config.models)},
        "reference": REFERENCE,
        "columns": COLUMN_DEFINITIONS,
        "statistics": statistics_entry(windows.punctuation, config.entropy_epsilon,
                                       config.local_window),
        "input": files_input(summary, columns),
    }
    keyed = {k: v for k, v in manifest["config"].items() if k not in ("device", "batch_tokens")}
    manifest["job_key"] = job_key([manifest["models"], keyed, manifest["input"]])
    writer.open(manifest, overwrite=overwrite)
    totals = CompareSummary(a.info.num_layers, a.info.num_heads)
    _write_parts(a, b, found, config, writer.root, totals, progress)
    per_head = totals.table()
    atomic_write_parquet(writer.root / SUMMARY / part_name(0), per_head, 65536)
    manifest.update(status="complete", counts={
        TABLE: int(totals.windows.sum()), SUMMARY: per_head.num_rows, "windows": len(found),
        "tokens": tokens})
    writer.finish_manifest(manifest)
    log.info("wrote %s: %d windows × %d layers × %d heads in %.1f s", writer.root, len(found),
             a.info.num_layers, a.info.num_heads, time.perf_counter() - started)
    return writer.root


def _write_parts(a: Backend, b: Backend, windows: list[Window], config: CompareConfig,
                 root: Path, totals: CompareSummary, progress: bool) -> None:
    """Write ``head_compare`` in parts of at most the budget's shard share of rows, each part
    sorted by (doc_id, window, layer, head), and add every part to ``totals``."""
    info = a.info
    per_window = info.num_layers * info.num_heads * ROW_BYTES
    part_windows = max(1, MemoryBudget(config.memory_budget).shard_bytes // per_window)
    cells = batch_cells(info, config.memory_budget)
    bar = tqdm(total=sum(w.n_tokens for w in windows), unit="tok", unit_scale=True,
               disable=not progress, dynamic_ncols=True, desc="tokens")
    for index, first in enumerate(range(0, max(1, len(windows)), part_windows)):
        part = windows[first:first + part_windows]
        tables = []
        for indices in plan_batches([w.n_tokens for w in part], config.batch_tokens,
                                    info.num_heads, cells):
            batch = collate([part[i] for i in indices], info.pad_token_id)
            tables.append(compare_batch(a, b, batch, config))
            bar.update(sum(part[i].n_tokens for i in indices))
        table = (pa.concat_tables(tables) if tables else schema.HEAD_COMPARE.empty_table())
        table = table.sort_by([(key, "ascending") for key in SORT_KEYS])
        atomic_write_parquet(root / TABLE / part_name(index), table, 65536)
        totals.add(table)
    bar.close()
