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
from pipelines.backends import Backend, create_backend
from pipelines.config import RunConfig
from pipelines.inputs import Columns, InputSummary, expand, read_documents, validate
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
    config = {k: v for k, v in manifest["config"].items() if k not in ("device", "batch_tokens")}
    keyed = {"model": manifest["model"]["config_hash"], "path": manifest["model"]["path"],
             "config": config, "input": manifest["input"]["fingerprint"],
             "stats_version": manifest["stats_version"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


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
        "statistics": {"definitions": DEFINITIONS, "k90_mass": K90_MASS,
                       "local_window": config.local_window, "entropy_unit": "nats"},
        "input": {"files": summary.files, "documents": summary.documents,
                  "characters": summary.characters,
                  "skipped_blank_lines": summary.skipped_blank_lines,
                  "columns": vars(columns), "fingerprint": summary.fingerprint},
    }
    manifest["job_key"] = job_key(manifest)
    return manifest


def estimate(files: list[Path], columns: Columns, windower: Windower, summary: InputSummary,
             config: RunConfig, backend: Backend, sample: int = 256) -> dict:
    """Tokens and output size from a sample of the first documents."""
    chars = tokens = 0
    for count, doc in enumerate(read_documents(files, columns)):
        if count >= sample:
            break
        chars += len(doc.text) + len(doc.text_pair or "")
        tokens += sum(w.n_tokens for w in windower.windows(doc))
    total_tokens = int(summary.characters * tokens / max(chars, 1))
    info, mode = backend.info, config.attention
    mean_len = tokens / max(1, min(sample, summary.documents))
    rows_per_token = {"none": 0, "topk": min(mode.k, mean_len), "full": mean_len,
                      "threshold": float("nan")}[mode.kind] * info.num_layers * info.num_heads
    if info.causal and mode.kind == "full":
        rows_per_token /= 2
    return {"tokens": total_tokens,
            "attention_rows": total_tokens * rows_per_token,
            "attention_bytes": total_tokens * rows_per_token * ATTENTION_ROW_BYTES}


def _log_estimate(est: dict, summary: InputSummary, config: RunConfig) -> None:
    rows = est["attention_rows"]
    size = ("unknown until the data is seen (threshold mode)" if rows != rows
            else f"≈ {est['attention_bytes'] / 1e6:,.1f} MB uncompressed, {rows:,.0f} rows")
    log.info("input: %d documents, %d characters, ≈ %d tokens; attention %s: %s",
             summary.documents, summary.characters, est["tokens"], config.attention, size)
    if summary.skipped_blank_lines:
        log.info("skipped %d blank lines (recorded in the manifest)", summary.skipped_blank_lines)


def run_job(inputs: list[str | Path], out: str | Path, config: RunConfig = RunConfig(),
            columns: Columns = Columns(), resume: bool = False, overwrite: bool = False,
            backend: Backend | None = None, progress: bool = True) -> JobResult:
    """Run a corpus job and return what it wrote. Validates every input before writing."""
    started = time.perf_counter()
    files = expand(inputs)
    summary = validate(files, columns)
    backend = backend or create_backend(config.backend, config.model, config.device,
                                        config.dtype, config.allow_download)
    windower = Windower(backend.tokenizer, backend.info, config.windows)
    manifest = build_manifest(backend, config, summary, columns)
    writer = DatasetWriter(out)
    finished = writer.open(manifest, resume=resume, overwrite=overwrite)
    _log_estimate(estimate(files, columns, windower, summary, config, backend), summary, config)
    if finished:
        log.info("resuming: %d shards already written", len(finished))
    n_windows = n_tokens = 0
    bar = tqdm(total=summary.documents, unit="doc", disable=not progress, dynamic_ncols=True)
    for shard, docs, windows in shards(read_documents(files, columns), windower,
                                       config.shard_tokens):
        if shard not in finished:
            tables = stages.analyse_windows(backend, windows, config)
            writer.write_shard(shard, stages.sort_tables(tables))
        n_windows += len(windows)
        n_tokens += sum(w.n_tokens for w in windows)
        bar.update(len(docs))
        bar.set_postfix(tokens=n_tokens, refresh=False)
    bar.close()
    manifest["counts_input"] = {"documents": summary.documents, "windows": n_windows,
                                "tokens": n_tokens}
    writer.finish(manifest)
    seconds = time.perf_counter() - started
    log.info("wrote %s: %d documents, %d windows, %d tokens in %.1f s", out,
             summary.documents, n_windows, n_tokens, seconds)
    return JobResult(Path(out), summary.documents, n_windows, n_tokens, seconds,
                     manifest["counts"])
