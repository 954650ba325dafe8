"""A corpus job on one machine: inputs → shards of windows → Parquet dataset."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from pipelines.analysis import registry
from pipelines.analysis.batch import analyse_windows, check_capture, streams_layers
from pipelines.backends import Backend, create_backend
from pipelines.config import AttentionMode, RunConfig
from pipelines.dataset.manifest import (
    DATASET_FORMAT,
    header,
    job_key,
    model_entry,
    statistics_entry,
)
from pipelines.dataset.writer import DatasetWriter
from pipelines.jobs.memory import keep_freed_memory
from pipelines.jobs.shard_writer import ShardWriterThread
from pipelines.jobs.sizing import (
    ATTENTION_ROW_BYTES,
    HEAD_STATS_ROW_BYTES,
    check_fits,
    expected_memory,
    log_memory,
    qk_vector_bytes,
    shard_rule,
)
from pipelines.models import ModelInfo
from pipelines.text.inputs import Columns, InputSummary, expand, read_documents, validate
from pipelines.text.plan import (
    PlanBuilder,
    ReadUnit,
    Shard,
    ShardRule,
    document_window_lengths,
    kept_pairs,
    pack_shards,
    unit_shards,
)
from pipelines.text.tokenize import Document, Window, Windower

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    out: Path
    documents: int
    windows: int
    tokens: int
    seconds: float
    counts: dict[str, int]


def run_job_key(manifest: dict) -> str:
    """What must match for --resume: model, inputs and every setting that changes rows."""
    unkeyed = ("device", "batch_tokens", "onnx")  # how fast, not what is computed
    config = {k: v for k, v in manifest["config"].items() if k not in unkeyed}
    return job_key({"model": manifest["model"]["config_hash"], "path": manifest["model"]["path"],
                    "config": config, "input": manifest["input"]["fingerprint"],
                    "stats_version": manifest["stats_version"]})


def describe_analyses(config: RunConfig) -> dict:
    """What each analysis of the job computes, with its constants (for the manifest)."""
    return registry.describe(config)


def job_writer(out: str | Path, config: RunConfig) -> DatasetWriter:
    """The dataset writer of a corpus job, knowing the tables its analyses write."""
    return DatasetWriter(out, registry.table_specs(config.analyses))


def files_input(summary: InputSummary, columns: Columns) -> dict:
    """The manifest's ``input`` of a job reading files: each file with its checksum."""
    return {"files": summary.files, "documents": summary.documents,
            "characters": summary.characters,
            "skipped_blank_lines": summary.skipped_blank_lines,
            "columns": vars(columns), "fingerprint": summary.fingerprint}


def memory_input(docs: Sequence[Document], source: str) -> dict:
    """The manifest's ``input`` of documents held in memory (``source``, e.g. "python"): their
    count, characters and a fingerprint of their ids and texts."""
    blob = json.dumps([[d.doc_id, d.text, d.text_pair] for d in docs]).encode()
    return {"source": source, "documents": len(docs),
            "characters": sum(len(d.text) + len(d.text_pair or "") for d in docs),
            "fingerprint": hashlib.sha256(blob).hexdigest()[:16]}


def build_manifest(backend: Backend, config: RunConfig, input_entry: dict) -> dict:
    """The manifest of a corpus job (status running) over the input ``input_entry`` describes
    (:func:`files_input` or :func:`memory_input`)."""
    manifest = {
        **header(DATASET_FORMAT, stats_version=True),
        "model": model_entry(backend.info),
        "runtime": backend.describe(),
        "config": config.to_dict(),
        "attention_mode": str(config.attention),
        "analyses": describe_analyses(config),
        "statistics": statistics_entry(config.windows.punctuation, config.entropy_epsilon,
                                       config.local_window),
        "input": input_entry,
    }
    manifest["job_key"] = run_job_key(manifest)
    return manifest


@dataclass
class Survey:
    """Exact windows and tokens of a corpus, the output size they imply, and the shard plan
    (``units``, made by ``rule``)."""

    windows: int
    tokens: int
    attention_rows: float  # NaN for threshold mode (depends on the weights)
    units: list[ReadUnit]
    rule: ShardRule
    longest: int = 0  # tokens of the longest window
    largest_shard_bytes: int = 0  # estimated bytes of the largest shard's rows

    @property
    def attention_bytes(self) -> float:
        return self.attention_rows * ATTENTION_ROW_BYTES

    @property
    def shards(self) -> int:
        return self.units[-1].shard_indices.stop if self.units else 0


@dataclass
class _Tally:
    """Windows, tokens and expected attention rows (per head) of the documents seen so far."""

    mode: AttentionMode
    causal: bool
    windows: int = 0
    tokens: int = 0
    rows: float = 0.0
    longest: int = 0

    def add(self, lengths: list[int]) -> int:
        """Count one document's windows of ``lengths`` tokens; return its tokens."""
        doc_tokens = 0
        for n in lengths:
            self.rows += {"none": 0.0, "topk": kept_pairs(n, self.causal, self.mode.k),
                          "full": kept_pairs(n, self.causal),
                          "threshold": float("nan")}[self.mode.kind]
            doc_tokens += n
            self.longest = max(self.longest, n)
        self.windows += len(lengths)
        self.tokens += doc_tokens
        return doc_tokens

    def survey(self, units: list[ReadUnit], info: ModelInfo, rule: ShardRule,
               largest_shard_bytes: int) -> Survey:
        return Survey(self.windows, self.tokens, self.rows * info.num_layers * info.num_heads,
                      units, rule, self.longest, largest_shard_bytes)


def survey(files: list[Path], columns: Columns, windower: Windower, config: RunConfig,
           info: ModelInfo, rule: ShardRule | None = None) -> Survey:
    """Tokenise every document once before anything is written.

    A document that cannot be windowed stops the job here, naming its file and line; the
    counts give an exact size estimate and a progress total, and fix the shard plan by
    ``rule`` (default: the job's, :func:`pipelines.jobs.sizing.shard_rule`).
    """
    rule = rule or shard_rule(config, info)
    tally = _Tally(config.attention, info.causal)
    plan = PlanBuilder(rule)
    for path in files:
        for doc in read_documents([path], columns):
            lengths = document_window_lengths(windower, doc)
            plan.add_document(tally.add(lengths), rule.document_bytes(lengths))
        plan.end_file(path)
    return tally.survey(plan.finish(), info, rule, plan.largest_shard_bytes)


def qk_bytes(found: Survey, info: ModelInfo) -> int:
    """Uncompressed bytes of the query/key vectors (``--capture-qk``)."""
    return found.tokens * qk_vector_bytes(info)


def output_bytes(found: Survey, config: RunConfig, info: ModelInfo) -> float:
    """The dataset's size before compression: attention weights (not counted in threshold
    mode, where they depend on the weights), query/key vectors and head statistics."""
    attention = 0.0 if math.isnan(found.attention_bytes) else found.attention_bytes
    stats = found.windows * info.num_layers * info.num_heads * HEAD_STATS_ROW_BYTES
    return attention + stats + (qk_bytes(found, info) if config.capture_qk else 0)


def _log_survey(found: Survey, summary: InputSummary, config: RunConfig,
                info: ModelInfo) -> None:
    rows = found.attention_rows
    size = ("size depends on the weights (threshold mode)" if rows != rows
            else f"{rows:,.0f} rows, ~{found.attention_bytes / 1e6:,.1f} MB before compression")
    log.info("input: %d documents → %d windows, %d tokens; attention %s: %s",
             summary.documents, found.windows, found.tokens, config.attention, size)
    if config.capture_qk:
        vectors = found.tokens * info.num_layers * info.num_heads
        log.info("query/key capture: %s rows, ~%.1f MB before compression", f"{vectors:,}",
                 qk_bytes(found, info) / 1e6)
    if summary.skipped_blank_lines:
        log.info("skipped %d blank lines (recorded in the manifest)", summary.skipped_blank_lines)


def shard_tables(backend: Backend, shard: Shard, config: RunConfig,
                 on_batch: Callable[[list[Window]], object] | None = None) -> dict[str, pa.Table]:
    """Every table of one shard (the analyses' per-shard partials included)."""
    states = {analysis.name: analysis.shard_state(backend.info, config, shard)
              for analysis in registry.selected(config.analyses)
              if analysis.shard_state is not None}
    tables = analyse_windows(backend, shard.windows, config, on_batch=on_batch,
                                    states=states)
    for state in states.values():
        tables.update(state.tables())
    return tables


@dataclass
class Prepared:
    """A job checked, surveyed and opened: what every engine needs before the first shard."""

    files: list[Path]
    summary: InputSummary
    found: Survey
    manifest: dict
    finished: set[int]
    writer: DatasetWriter
    windower: Windower | None = None  # the survey's (prepare), reused to cut the shards


def prepare(inputs: list[str | Path], writer: DatasetWriter, backend: Backend,
            config: RunConfig, columns: Columns, resume: bool, overwrite: bool) -> Prepared:
    """Validate the inputs, survey them, and open the output folder with its manifest."""
    check_capture(backend, config)
    files = expand(inputs)
    summary = validate(files, columns)
    windower = Windower(backend.tokenizer, backend.info, config.windows)
    found = survey(files, columns, windower, config, backend.info)
    _log_survey(found, summary, config, backend.info)
    check_memory(found, config, backend)
    manifest = build_manifest(backend, config, files_input(summary, columns))
    finished = writer.open(manifest, resume=resume, overwrite=overwrite)
    if finished:
        log.info("resuming: %d of %d shards already written", len(finished), found.shards)
    # After open: --overwrite has freed the old dataset's space, --resume needs only the rest.
    left = 1 - len(finished) / found.shards if found.shards else 0.0
    warn_if_short_of_space(writer.root, left * output_bytes(found, config, backend.info))
    return Prepared(files, summary, found, manifest, finished, writer, windower)


def check_memory(found: Survey, config: RunConfig, backend: Backend) -> None:
    """Refuse a job whose longest window cannot fit the memory budget (ConfigError), else
    log the working memory it expects; before anything is written."""
    check_fits(found.longest, config, backend.info, streams_layers(backend), backend.name)
    log_memory(expected_memory(found.longest, found.windows, found.shards,
                               found.largest_shard_bytes, config, backend.info))


def warn_if_short_of_space(root: Path, needed: float) -> None:
    """Warn when ``needed`` bytes exceed the free space of ``root``'s file system.

    Only a warning: the estimate is before compression, which often halves it or better. If
    the disk does fill, the job stops with a message and ``--resume`` finishes it.
    """
    free = shutil.disk_usage(root).free
    if needed > free:
        log.warning("the output may not fit: ~%s MB estimated (before compression), %s MB "
                    "free on the file system of %s; if the disk fills, the job stops, and "
                    "--resume finishes it once there is space", f"{needed / 1e6:,.1f}",
                    f"{free / 1e6:,.1f}", root)


def finish(job: Prepared, started: float) -> JobResult:
    """Write the corpus-level tables and the complete manifest; log and return the result."""
    summary, found = job.summary, job.found
    job.manifest["counts_input"] = {"documents": summary.documents, "windows": found.windows,
                                    "tokens": found.tokens}
    job.writer.finish(job.manifest,
                      registry.finalisers(job.manifest["config"]["analyses"]))
    seconds = time.perf_counter() - started
    log.info("wrote %s: %d documents, %d windows, %d tokens in %.1f s", job.writer.root,
             summary.documents, found.windows, found.tokens, seconds)
    return JobResult(job.writer.root, summary.documents, found.windows, found.tokens, seconds,
                     job.manifest["counts"])


def progress_bar(found: Survey, progress: bool) -> tqdm:
    return tqdm(total=found.tokens, unit="tok", unit_scale=True, disable=not progress,
                dynamic_ncols=True, desc="tokens")


def run_job(inputs: list[str | Path], out: str | Path, config: RunConfig | None = None,
            columns: Columns | None = None, resume: bool = False, overwrite: bool = False,
            backend: Backend | None = None, progress: bool = True) -> JobResult:
    """Run a corpus job in this process and return what it wrote.

    Validates every input before writing; shards follow the plan of the survey.
    """
    started = time.perf_counter()
    config, columns = config or RunConfig(), columns or Columns()
    keep_freed_memory()
    writer = job_writer(out, config)
    writer.check(resume=resume, overwrite=overwrite)
    backend = backend or create_backend(config.backend, config.model, config.device,
                                        config.dtype, config.allow_download, config.onnx)
    job = prepare(inputs, writer, backend, config, columns, resume, overwrite)
    job.manifest["runtime"]["engine"] = "local"
    assert job.windower is not None  # prepare() surveys with it
    bar = progress_bar(job.found, progress)
    write_shards(backend, _unfinished(job, columns, job.windower, bar), config, job, bar)
    bar.close()
    return finish(job, started)


def _unfinished(job: Prepared, columns: Columns, windower: Windower,
                bar: tqdm) -> Iterator[Shard]:
    """The shards of the plan left to write, read unit by unit; the bar moves past the
    finished ones (``--resume``)."""
    for unit in job.found.units:
        if job.finished.issuperset(unit.shard_indices):
            bar.update(unit.tokens)
            continue
        for shard in unit_shards(unit, columns, windower, job.found.rule):
            if shard.index in job.finished:
                bar.update(shard.tokens)
                continue
            yield shard


def write_shards(backend: Backend, shards: Iterable[Shard], config: RunConfig, job: Prepared,
                 bar: tqdm) -> None:
    """Analyse each shard and hand its tables to a writer thread, which writes them while
    the next shard computes; returns once every shard is written. An error of the writer
    (a full disk) is raised here, at the next hand-over or at the end."""
    def written(shard: Shard, tables: dict[str, pa.Table]) -> None:
        job.writer.write_shard(shard.index, tables)  # already in sort order
        bar.set_postfix(shard=f"{shard.index + 1}/{job.found.shards}")

    with ShardWriterThread(written) as writes:
        for shard in shards:
            writes.put(shard, shard_tables(backend, shard, config, on_batch=lambda done:
                                           bar.update(sum(w.n_tokens for w in done))))


def run_windowed(windowed: Sequence[tuple[Document, list[Window]]], out: str | Path,
                 config: RunConfig, backend: Backend, input_entry: dict,
                 progress: bool = True) -> JobResult:
    """A corpus job over documents held in memory and already windowed (``pipelines.analyze``).

    The stages of :func:`run_job` over one input file holding the documents in this order:
    the same shards, batches, tables, writer and finishing step. Only the manifest's ``input``
    (``input_entry``, e.g. :func:`memory_input`) and its ``created`` and ``job_key`` differ.
    ``out`` must be new or empty (OutputError).
    """
    started = time.perf_counter()
    keep_freed_memory()
    check_capture(backend, config)
    writer = job_writer(out, config)
    writer.check()
    tally = _Tally(config.attention, backend.info.causal)
    for _, windows in windowed:
        tally.add([w.n_tokens for w in windows])
    rule = shard_rule(config, backend.info)
    shards = list(pack_shards(windowed, rule))
    largest = max((rule.document_bytes(w.n_tokens for w in shard.windows)
                   for shard in shards), default=0)
    found = tally.survey([ReadUnit((), 0, len(shards), 0, tally.tokens)], backend.info, rule,
                         largest)
    check_memory(found, config, backend)
    manifest = build_manifest(backend, config, input_entry)
    manifest["runtime"]["engine"] = "local"
    job = Prepared([], InputSummary(documents=len(windowed)), found, manifest,
                   writer.open(manifest), writer)
    bar = progress_bar(found, progress)
    write_shards(backend, shards, config, job, bar)
    bar.close()
    return finish(job, started)
