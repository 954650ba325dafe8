"""A corpus job on one machine: inputs → shards of windows → Parquet dataset."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pipelines import STATS_VERSION, __version__, stages
from pipelines.analysis.similarity import HeadSimilarity
from pipelines.backends import Backend, create_backend
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import Columns, InputError, InputSummary, expand, read_documents, validate
from pipelines.models import ModelInfo
from pipelines.runtime import keep_freed_memory, release_freed_memory
from pipelines.schema import SIMILARITY_PARTS
from pipelines.stats import DEFINITIONS, K90_MASS
from pipelines.tokenize import Document, Window, Windower
from pipelines.writer import DatasetWriter

log = logging.getLogger(__name__)
#: Uncompressed bytes of one attention row (keys, positions, weight, doc_id dictionary index).
ATTENTION_ROW_BYTES = 16


@dataclass
class JobResult:
    out: Path
    documents: int
    windows: int
    tokens: int
    seconds: float
    counts: dict[str, int]


def shards(docs: Iterator[Document], windower: Windower,
           shard_tokens: int) -> Iterator[tuple[int, list[Document], list[Window]]]:
    """Group documents into shards of about ``shard_tokens`` tokens (whole documents)."""
    index, batch_docs, batch_windows, tokens = 0, [], [], 0
    for doc in docs:
        windows = windower.windows(doc)
        batch_docs.append(doc)
        batch_windows.extend(windows)
        tokens += sum(w.n_tokens for w in windows)
        if tokens >= shard_tokens:
            yield index, batch_docs, batch_windows
            index, batch_docs, batch_windows, tokens = index + 1, [], [], 0
    if batch_docs:
        yield index, batch_docs, batch_windows


def job_key(manifest: dict) -> str:
    """What must match for --resume: model, inputs and every setting that changes rows."""
    unkeyed = ("device", "batch_tokens", "onnx")  # how fast, not what is computed
    config = {k: v for k, v in manifest["config"].items() if k not in unkeyed}
    keyed = {"model": manifest["model"]["config_hash"], "path": manifest["model"]["path"],
             "config": config, "input": manifest["input"]["fingerprint"],
             "stats_version": manifest["stats_version"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def describe_analyses(config: RunConfig) -> dict:
    """What each analysis of the job computes, with its constants (for the manifest)."""
    from pipelines.analysis.patterns import PATTERN_CLASSES, PatternThresholds

    described = {
        "patterns": {"classes": list(PATTERN_CLASSES), "thresholds": PatternThresholds().to_dict(),
                     "classifier": "rules on map features; see docs/analysis.md"},
        "words": {"to_word": "sum of the weights to its tokens",
                  "from_word": "mean of its tokens' rows", "unit": "pre-tokenizer words"},
        "similarity": {"distance": "sqrt(JS divergence, log base 2) per query row",
                       "mean": "over every sampled valid query row of every window",
                       "documents": config.similarity_docs or "all"},
    }
    return {name: described[name] for name in config.analyses}


def build_manifest(backend: Backend, config: RunConfig, summary: InputSummary,
                   columns: Columns) -> dict:
    info = backend.info
    manifest = {
        "format": "headscope-dataset/1",
        "tool_version": __version__,
        "stats_version": STATS_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "model": {"name": info.name, "path": info.path, "family": info.family,
                  "model_type": info.model_type, "config_hash": info.config_hash,
                  "num_layers": info.num_layers, "num_heads": info.num_heads,
                  "max_length": info.max_length, "causal": info.causal},
        "runtime": backend.describe(),
        "config": config.to_dict(),
        "attention_mode": str(config.attention),
        "analyses": describe_analyses(config),
        "statistics": {"definitions": DEFINITIONS, "k90_mass": K90_MASS,
                       "local_window": config.local_window, "entropy_unit": "nats"},
        "input": {"files": summary.files, "documents": summary.documents,
                  "characters": summary.characters,
                  "skipped_blank_lines": summary.skipped_blank_lines,
                  "columns": vars(columns), "fingerprint": summary.fingerprint},
    }
    manifest["job_key"] = job_key(manifest)
    return manifest


@dataclass
class Survey:
    """Exact windows and tokens of a corpus, and the output size they imply."""

    windows: int
    tokens: int
    attention_rows: float  # NaN for threshold mode (depends on the weights)

    @property
    def attention_bytes(self) -> float:
        return self.attention_rows * ATTENTION_ROW_BYTES


def document_windows(windower: Windower, doc: Document) -> list[Window]:
    """The windows of ``doc``, or an InputError naming its file and line."""
    try:
        return windower.windows(doc)
    except ConfigError as exc:
        raise InputError(f"{doc.source}:{doc.source_line}: {exc}") from None


def survey(files: list[Path], columns: Columns, windower: Windower, config: RunConfig,
           info: ModelInfo) -> Survey:
    """Tokenise every document once before anything is written.

    A document that cannot be windowed stops the job here, naming its file and line, and the
    counts give an exact size estimate and a progress total.
    """
    windows = tokens = 0
    rows = 0.0
    mode, causal = config.attention, info.causal
    for doc in read_documents(files, columns):
        for window in document_windows(windower, doc):
            n = window.n_tokens
            windows, tokens = windows + 1, tokens + n
            visible = n * (n + 1) / 2 if causal else n * n  # (query, key) pairs
            rows += {"none": 0.0, "topk": min(visible, n * mode.k), "full": visible,
                     "threshold": float("nan")}[mode.kind]
    return Survey(windows, tokens, rows * info.num_layers * info.num_heads)


def _log_survey(found: Survey, summary: InputSummary, config: RunConfig) -> None:
    rows = found.attention_rows
    size = ("size depends on the weights (threshold mode)" if rows != rows
            else f"{rows:,.0f} rows, ~{found.attention_bytes / 1e6:,.1f} MB before compression")
    log.info("input: %d documents → %d windows, %d tokens; attention %s: %s",
             summary.documents, found.windows, found.tokens, config.attention, size)
    if summary.skipped_blank_lines:
        log.info("skipped %d blank lines (recorded in the manifest)", summary.skipped_blank_lines)


def _similarity(backend: Backend, config: RunConfig) -> HeadSimilarity | None:
    if "similarity" not in config.analyses:
        return None
    return HeadSimilarity(backend.info.num_layers, backend.info.num_heads)


def _sampled(docs: list[Document], first_index: int, config: RunConfig) -> set[str]:
    """doc_ids of this shard that the head similarity uses (the first N of the corpus)."""
    limit = config.similarity_docs or float("inf")
    return {doc.doc_id for index, doc in enumerate(docs, first_index) if index < limit}


def run_job(inputs: list[str | Path], out: str | Path, config: RunConfig | None = None,
            columns: Columns | None = None, resume: bool = False, overwrite: bool = False,
            backend: Backend | None = None, progress: bool = True) -> JobResult:
    """Run a corpus job and return what it wrote. Validates every input before writing."""
    started = time.perf_counter()
    config, columns = config or RunConfig(), columns or Columns()
    keep_freed_memory()
    writer = DatasetWriter(out)
    writer.check(resume=resume, overwrite=overwrite)
    files = expand(inputs)
    summary = validate(files, columns)
    backend = backend or create_backend(config.backend, config.model, config.device,
                                        config.dtype, config.allow_download, config.onnx)
    windower = Windower(backend.tokenizer, backend.info, config.windows)
    found = survey(files, columns, windower, config, backend.info)
    _log_survey(found, summary, config)
    manifest = build_manifest(backend, config, summary, columns)
    finished = writer.open(manifest, resume=resume, overwrite=overwrite)
    if finished:
        log.info("resuming: %d shards already written", len(finished))
    n_docs = n_windows = n_tokens = 0
    bar = tqdm(total=found.tokens, unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True, desc="tokens")
    for shard, docs, windows in shards(read_documents(files, columns), windower,
                                       config.shard_tokens):
        shard_tokens = sum(w.n_tokens for w in windows)
        if shard in finished:
            bar.update(shard_tokens)
        else:
            similarity = _similarity(backend, config)
            sampled = _sampled(docs, n_docs, config)
            tables = stages.analyse_windows(
                backend, windows, config,
                on_batch=lambda done: bar.update(sum(w.n_tokens for w in done)),
                similarity=similarity, in_sample=lambda w, ids=sampled: w.doc.doc_id in ids)
            if similarity is not None:
                tables[SIMILARITY_PARTS] = similarity.to_table()
            writer.write_shard(shard, tables)  # already in sort order
            del tables
            release_freed_memory()
        n_docs, n_windows, n_tokens = n_docs + len(docs), n_windows + len(windows), \
            n_tokens + shard_tokens
        bar.set_postfix(docs=f"{n_docs}/{summary.documents}", shard=shard)
    bar.close()
    manifest["counts_input"] = {"documents": summary.documents, "windows": n_windows,
                                "tokens": n_tokens}
    writer.finish(manifest)
    seconds = time.perf_counter() - started
    log.info("wrote %s: %d documents, %d windows, %d tokens in %.1f s", out,
             summary.documents, n_windows, n_tokens, seconds)
    return JobResult(Path(out), summary.documents, n_windows, n_tokens, seconds,
                     manifest["counts"])
