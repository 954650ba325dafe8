"""Corpus throughput benchmark: the job against a bare forward pass, a naive loop, memory, size.

One run, text of the Python help topics (``pipelines.jobs.demo``), one preloaded model on the
CPU or a GPU (``--device``, ``--dtype``). It reports, and never asserts:

(a) job tokens/s (``run_job``: statistics, kept weights, Parquet) over the eager forward pass
    with attentions (``backend.layers`` handing every layer's probabilities to a sink that
    drops them) on exactly the batches the job ran, side by side in interleaved rounds, for
    paragraphs (windows of 60-512 tokens) and short sentences (~24 tokens): targets >= 0.9
    statistics only (``none``), >= 0.7 with ``topk:8``.
(b) job tokens/s over a naive loop (one window at a time, ``reference.all_heads``, pandas);
    target >= 4x.
(c) peak RSS of a job in a fresh process, for the corpus and for a 4x larger one; target: flat
    within 15%.
(d) on-disk bytes per token for each attention mode, per table.
(e) where a job's time goes (cProfile of one job).

Run ``python benchmarks/corpus_throughput.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from random_model import SHAPES
from random_model import build as build_random_model
from smoke import work_folder

from pipelines.analysis.batch import batch_attention_cells
from pipelines.backends import Backend, create_backend
from pipelines.backends.base import DTYPES, LayerSink
from pipelines.backends.batching import Batch, collate, plan_batches
from pipelines.compute.reference import all_heads
from pipelines.compute.stats import row_order
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.local import run_job
from pipelines.jobs.sizing import shard_rule
from pipelines.text.plan import fill_shards
from pipelines.text.tokenize import Document, Window, Windower

REPO = Path(__file__).resolve().parent.parent
MODES = ("none", "topk:8", "threshold:0.1", "full")
#: (a): job / eager forward, by attention mode (other modes are measured without a target)
TARGET_FORWARD_RATIO = {"none": 0.9, "topk:8": 0.7}
TARGET_NAIVE_RATIO = 4.0
TARGET_RSS_SPREAD = 0.15
#: Paragraphs of (a)-(e): only those whose every window has at least this many tokens.
MIN_TOKENS = 60
#: Short sentences of (a): sentences of the same paragraphs with this many tokens (mean ~24).
SENTENCE_TOKENS = (18, 30)
FULL = {"docs": 200, "sentences": 600, "repeats": 3, "naive_docs": 16, "mode_docs": 40}
QUICK = {"docs": 60, "sentences": 200, "repeats": 2, "naive_docs": 4, "mode_docs": 10}
#: --smoke: every section (a)–(e) on a tiny corpus, one round: a check that it runs
SMOKE = {"docs": 8, "sentences": 24, "repeats": 1, "naive_docs": 2, "mode_docs": 3,
         "max_length": 128}


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Documents written to a JSONL file, with their windows for this model."""

    name: str
    path: Path
    rows: list[dict]
    windows: list[list[Window]]  # per document

    @property
    def tokens(self) -> int:
        return sum(w.n_tokens for ws in self.windows for w in ws)

    @property
    def flat_windows(self) -> list[Window]:
        return [w for ws in self.windows for w in ws]

    def doc_tokens(self) -> np.ndarray:
        return np.array([sum(w.n_tokens for w in ws) for ws in self.windows])


def evenly_spaced(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (keeps the corpus's length mix)."""
    if count >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def long_paragraphs(windower: Windower, min_tokens: int) -> list[dict]:
    """The help-topic paragraphs whose every window has at least ``min_tokens`` tokens."""
    rows = paragraphs()
    if min_tokens <= 0:
        return rows
    return [row for row in rows
            if min(w.n_tokens for w in windower.windows(Document(row["id"], row["text"])))
            >= min_tokens]


#: A sentence ends at . ! or ? followed by space and a capital, a quote or a bracket.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def short_sentences(windower: Windower, tokens: tuple[int, int]) -> list[dict]:
    """Sentences of the help-topic paragraphs whose window has ``tokens`` (low, high) tokens,
    special tokens included: short texts like a service's requests, from the same prose."""
    low, high = tokens
    out = []
    for row in paragraphs():
        for index, text in enumerate(SENTENCE_END.split(row["text"])):
            doc = Document(f"{row['id']}.{index}", text)
            windows = windower.windows(doc)
            if len(windows) == 1 and low <= windows[0].n_tokens <= high:
                out.append({"id": doc.doc_id, "text": text})
    return out


def stratified(corpus: Corpus, count: int) -> list[dict]:
    """``count`` documents at the midpoints of ``count`` equal length quantiles."""
    order = np.argsort(corpus.doc_tokens(), kind="stable")
    count = min(count, len(order))
    picks = ((np.arange(count) + 0.5) * len(order) / count).astype(int)
    return [corpus.rows[order[i]] for i in sorted(picks)]


def repeated(rows: list[dict], times: int) -> list[dict]:
    """The rows ``times`` over; copies after the first get new ids."""
    out = list(rows)
    for copy in range(1, times):
        out += [{"id": f"{row['id']}~{copy}", "text": row["text"]} for row in rows]
    return out


def make_corpus(name: str, rows: list[dict], folder: Path, windower: Windower) -> Corpus:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    windows = [windower.windows(Document(r["id"], r["text"])) for r in rows]
    return Corpus(name, path, rows, windows)


def describe_corpus(corpus: Corpus) -> str:
    lengths = np.array([w.n_tokens for w in corpus.flat_windows])
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return (f"{len(corpus.rows)} documents, {len(lengths)} windows, {lengths.sum():,} tokens; "
            f"window length p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}")


# --------------------------------------------------------------------------- timing helpers


class RecordingBackend:
    """Delegates to a backend and keeps every batch the job runs (``layers``, or
    ``attentions`` for code that still takes every layer at once)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.batches: list[Batch] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def layers(self, batch: Batch, sink: LayerSink, block_rows: int | None = None) -> None:
        self.batches.append(batch)
        self.inner.layers(batch, sink, block_rows)

    def attentions(self, batch: Batch) -> torch.Tensor:
        self.batches.append(batch)
        return self.inner.attentions(batch)


def synchronize(backend: Backend) -> None:
    """Wait for the GPU's queued work, so a timer reads finished work (no-op on the CPU)."""
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)


def timed_job(backend: Backend, corpus: Corpus, config: RunConfig, out: Path) -> tuple[float, dict]:
    """Seconds for ``run_job`` (validation to manifest) and its result."""
    gc.collect()
    synchronize(backend)
    start = time.perf_counter()
    result = run_job([corpus.path], out, config, backend=backend, progress=False)
    synchronize(backend)
    seconds = time.perf_counter() - start
    return seconds, {"tokens": result.tokens, "windows": result.windows, "counts": result.counts}


def discard(layer: int, start: int, probs: torch.Tensor) -> None:
    """A layer sink that keeps nothing: the forward pass alone."""


def order_rows(layer: int, start: int, probs: torch.Tensor) -> None:
    """A layer sink that does the least work an exact k90 needs and nothing more: sort every
    query row and read off its order (``stats.row_order``: the sort, the cumulative sums and
    the k90 search, as the job runs them)."""
    row_order(probs)


def timed_forward(backend: Backend, batches: list[Batch], sink: LayerSink = discard) -> float:
    """Seconds for the eager forward pass with attentions over ``batches`` and nothing else:
    ``backend.layers`` forms every layer's probabilities and hands them to ``sink`` (by
    default one that drops them)."""
    gc.collect()
    synchronize(backend)
    start = time.perf_counter()
    for batch in batches:
        backend.layers(batch, sink)
    synchronize(backend)
    return time.perf_counter() - start


def padded_tokens(batches: list[Batch]) -> int:
    return sum(int(b.input_ids.numel()) for b in batches)


def batch_shapes(batches: list[Batch]) -> Counter:
    return Counter(tuple(b.input_ids.shape) for b in batches)


def shard_groups(corpus: Corpus, windower: Windower, config: RunConfig) -> list[list[Window]]:
    """The windows of each shard, grouped as the job groups documents."""
    docs = (Document(r["id"], r["text"]) for r in corpus.rows)
    rule = shard_rule(config, windower.info)
    return [shard.windows for shard in fill_shards(docs, windower, rule)]


def planned_shapes(backend: Backend, corpus: Corpus, windower: Windower,
                   config: RunConfig) -> Counter:
    """Batch shapes (windows, length) from ``plan_batches``, shard by shard like the job."""
    shapes: Counter = Counter()
    cells = batch_attention_cells(backend, config)
    for windows in shard_groups(corpus, windower, config):
        lengths = [w.n_tokens for w in windows]
        for indices in plan_batches(lengths, config.batch_tokens, backend.info.num_heads, cells):
            shapes[(len(indices), max(lengths[i] for i in indices))] += 1
    return shapes


def largest(shapes: Counter) -> tuple[int, int]:
    """The batch shape with the most attention cells (windows × length²)."""
    return max(shapes, key=lambda s: s[0] * s[1] ** 2)


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:8,.0f} tok/s ({seconds:6.2f} s)"


# --------------------------------------------------------------------------- (a) job vs forward


def batch_keys(batches: list[Batch]) -> list[tuple]:
    """What makes two batch lists the same work: each batch's windows and padded shape."""
    return [(tuple((w.doc.doc_id, w.window) for w in b.windows), tuple(b.input_ids.shape))
            for b in batches]


@dataclass
class SideBySide:
    """Jobs in each attention mode and the eager forward pass over the batches they ran, in
    interleaved rounds on one corpus (seconds per round)."""

    corpus: Corpus
    modes: tuple[str, ...]
    batches: list[Batch] = field(default_factory=list)  # as the first mode's job ran them
    forward: list[float] = field(default_factory=list)
    ordered: list[float] = field(default_factory=list)  # forward + row_order, in each round
    jobs: dict[str, list[float]] = field(default_factory=dict)
    other_batches: list[str] = field(default_factory=list)  # modes whose job ran others
    planned: bool = True  # plan_batches per shard gives the recorded shapes
    counted: dict[str, int] = field(default_factory=dict)  # tokens each mode's job counted

    def ratio(self, mode: str) -> float:
        """Best job rate over best forward rate (same tokens, so a time ratio)."""
        return min(self.forward) / min(self.jobs[mode])

    def round_ratios(self, mode: str) -> list[float]:
        return [f / j for j, f in zip(self.jobs[mode], self.forward, strict=True)]

    def order_ratio(self) -> float:
        """Best forward over best forward + row_order: the most any job that computes an
        exact k90 could reach on these batches here."""
        return min(self.forward) / min(self.ordered)


def warm_up(backend: Backend, corpus: Corpus, config: RunConfig, modes: tuple[str, ...],
            work: Path) -> float:
    """A small job per mode and its forward passes, before anything is timed."""
    start = time.perf_counter()
    for mode in modes:
        recorder = RecordingBackend(backend)
        out = work / "warmup"
        timed_job(recorder, corpus, replace(config, attention=AttentionMode.parse(mode)), out)
        timed_forward(backend, recorder.batches)
        shutil.rmtree(out)
    return time.perf_counter() - start


def side_by_side(backend: Backend, corpus: Corpus, windower: Windower, config: RunConfig,
                 modes: tuple[str, ...], work: Path, repeats: int) -> SideBySide:
    """``repeats`` rounds, alternating jobs→forward and forward→jobs (modes reversed), so
    drift in the machine's speed hits both sides. The first round's jobs record their
    batches; the forward pass replays the first mode's."""
    configs = {mode: replace(config, attention=AttentionMode.parse(mode)) for mode in modes}
    result = SideBySide(corpus, modes, jobs={mode: [] for mode in modes})

    def job(mode: str, index: int) -> None:
        out = work / f"{corpus.name}-{mode.replace(':', '_')}-{index}"
        recorder = RecordingBackend(backend)
        seconds, counts = timed_job(recorder if index == 0 else backend, corpus,
                                    configs[mode], out)
        shutil.rmtree(out, ignore_errors=True)
        result.jobs[mode].append(seconds)
        if index == 0:
            result.counted[mode] = counts["tokens"]
            if not result.batches:
                result.batches = recorder.batches
            elif batch_keys(recorder.batches) != batch_keys(result.batches):
                result.other_batches.append(mode)

    def forward() -> None:
        result.forward.append(timed_forward(backend, result.batches))
        result.ordered.append(timed_forward(backend, result.batches, order_rows))

    for index in range(repeats):
        if index % 2 == 0:
            for mode in modes:
                job(mode, index)
            forward()
        else:
            forward()
            for mode in reversed(modes):
                job(mode, index)
    result.planned = batch_shapes(result.batches) == planned_shapes(backend, corpus, windower,
                                                                   config)
    return result


def target_text(mode: str) -> str:
    target = TARGET_FORWARD_RATIO.get(mode)
    return f"target >= {target}" if target is not None else "no target"


def report_side_by_side(result: SideBySide) -> None:
    corpus, batches = result.corpus, result.batches
    shapes, padded = batch_shapes(batches), padded_tokens(batches)
    print(f"  {corpus.name}: {describe_corpus(corpus)}")
    print(f"  padded tokens {padded:,} ({padded / corpus.tokens - 1:+.1%} padding) in "
          f"{len(batches)} batches; largest batch {largest(shapes)} (windows, length); "
          f"plan_batches per shard gives the same shapes: {'yes' if result.planned else 'NO'}")
    if result.other_batches:
        print(f"  NOTE: the {', '.join(result.other_batches)} job ran other batches than the "
              f"{result.modes[0]} job; the forward pass replays the latter's")
    for mode, counted in result.counted.items():
        if counted != corpus.tokens:
            print(f"  note: the {mode} job counted {counted:,} tokens")
    width = max(len(m) for m in result.modes)
    for index, fwd in enumerate(result.forward):
        order = "forward→jobs" if index % 2 else "jobs→forward"
        jobs = "  ".join(f"{mode} {rate(corpus.tokens, result.jobs[mode][index])} "
                         f"x{fwd / result.jobs[mode][index]:.3f}" for mode in result.modes)
        print(f"  round {index + 1} ({order}): forward {rate(corpus.tokens, fwd)}  {jobs}")
    spreads = ", ".join(f"{name} {max(times) / min(times) - 1:.0%}" for name, times in
                        [("forward", result.forward), *result.jobs.items()])
    print(f"  best forward {corpus.tokens / min(result.forward):,.0f} tok/s "
          f"({padded / min(result.forward):,.0f} padded tok/s); round-to-round spread "
          f"{spreads}")
    for mode in result.modes:
        ratios = result.round_ratios(mode)
        target = TARGET_FORWARD_RATIO.get(mode)
        verdict = "" if target is None else f"  {status(result.ratio(mode) >= target)}"
        print(f"  job ({mode}){'':{width - len(mode)}} / forward = {result.ratio(mode):.3f} "
              f"(best / best; per round {min(ratios):.3f}–{max(ratios):.3f})   "
              f"{target_text(mode)}{verdict}")
    print(f"  floor: forward / (forward + each row's order, stats.row_order: sort, cumulative "
          f"sums, k90) = {result.order_ratio():.3f} (best / best): the most a job with an exact "
          f"k90 can reach on these batches")


# --------------------------------------------------------------------------- (b) naive loop


def naive_loop(backend: Backend, windower: Windower, rows: list[dict], config: RunConfig,
               out: Path) -> tuple[float, int]:
    """One window at a time: forward, per-head Python statistics, pandas Parquet at the end."""
    info = backend.info
    gc.collect()
    start = time.perf_counter()
    records, tokens = [], 0
    for row in rows:
        for window in windower.windows(Document(row["id"], row["text"])):
            attn = backend.attentions(collate([window], info.pad_token_id))[:, 0].cpu().numpy()
            heads = all_heads(attn, window.is_sep, window.is_special, window.is_punct,
                              info.causal, config.local_window, info.sep_token_id is not None)
            records += [{"doc_id": row["id"], "window": window.window, **h} for h in heads]
            tokens += window.n_tokens
    pd.DataFrame(records).to_parquet(out)
    return time.perf_counter() - start, tokens


def job_vs_naive(backend: Backend, windower: Windower, subset: Corpus, config: RunConfig,
                 work: Path, job_rate: float) -> float:
    seconds, tokens = naive_loop(backend, windower, subset.rows, config, work / "naive.parquet")
    naive_rate = tokens / seconds
    job_seconds = timed_job(backend, subset, config, work / "job-subset")[0]
    print(f"  naive loop on a length-stratified subset ({describe_corpus(subset)})")
    print(f"  naive            {rate(tokens, seconds)}  (statistics only, no tokens/attention "
          "tables)")
    print(f"  job, same subset {rate(subset.tokens, job_seconds)}  → "
          f"{subset.tokens / job_seconds / naive_rate:.1f}× (includes per-job fixed costs)")
    print(f"  job, whole corpus (best of (a)) {job_rate:,.0f} tok/s → "
          f"{job_rate / naive_rate:.1f}×   target >= {TARGET_NAIVE_RATIO:g}×")
    print("  (rates on different token sets; the subset keeps the corpus's length mix)")
    return job_rate / naive_rate


# --------------------------------------------------------------------------- (c) peak RSS


def _memory_kb() -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of this process in kB, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as status_file:
        for line in status_file:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_child(corpus: str, out: str, config: RunConfig) -> None:
    """Runs in a fresh process: load the model, run one job, print its peak RSS as JSON.

    The peak is VmHWM, this process's own high-water mark. ru_maxrss is not used: after
    fork/exec it starts at the parent's RSS (several GB here). The model load has its own
    transient peak; it is read first, then the mark is reset, so ``job_peak_kb`` is the peak
    while the job runs (model weights included).
    """
    backend = create_backend(config.backend, config.model, config.device, config.dtype)
    loaded = _memory_kb()
    was_reset = _reset_peak()
    start = time.perf_counter()
    result = run_job([corpus], out, config, backend=backend, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens": result.tokens, "windows": result.windows, "seconds": seconds,
                      "load_peak_kb": loaded["VmHWM"], "before_kb": loaded["VmRSS"],
                      "job_peak_kb": _memory_kb()["VmHWM"], "reset": was_reset}))


def spawn_rss_child(corpus: Corpus, out: Path, config: RunConfig) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--model", config.model,
               "--rss-child", str(corpus.path), str(out)]
    command += ["--attention", str(config.attention), "--device", config.device,
                "--dtype", config.dtype]
    if config.windows.max_length:
        command += ["--max-length", str(config.windows.max_length)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss(backend: Backend, corpus: Corpus, large: Corpus, windower: Windower,
             config: RunConfig, work: Path) -> tuple[float | None, bool]:
    """4× / 1× peak RSS, and whether the 1× corpus leaves batches or its shard unfilled."""
    reports, fills = {}, {}
    parent = _memory_kb()
    print(f"  (this process, after the jobs above: RSS {parent['VmRSS'] / 1024:,.0f} MB, peak "
          f"{parent['VmHWM'] / 1024:,.0f} MB)")
    for item in (corpus, large):
        report = spawn_rss_child(item, work / f"rss-{item.name}", config)
        if "error" in report:
            print(f"  {item.name}: child failed: {report['error']}")
            return None, False
        reports[item.name] = report
        groups = shard_groups(item, windower, config)
        fills[item.name] = (largest(planned_shapes(backend, item, windower, config)),
                            len(groups))
        peak_note = "" if report["reset"] else " (peak could not be reset: includes model load)"
        print(f"  {item.name:9s} {report['tokens']:7,} tokens, {len(groups)} shard(s), largest "
              f"batch {fills[item.name][0]}: peak RSS during job "
              f"{report['job_peak_kb'] / 1024:6,.0f} MB{peak_note}")
        print(f"  {'':9s} RSS before job {report['before_kb'] / 1024:,.0f} MB, peak while loading "
              f"the model {report['load_peak_kb'] / 1024:,.0f} MB; "
              f"{rate(report['tokens'], report['seconds'])}")
    ratio = reports[large.name]["job_peak_kb"] / reports[corpus.name]["job_peak_kb"]
    print(f"  4× / 1× peak RSS during the job = {ratio:.3f}   target within "
          f"±{TARGET_RSS_SPREAD:.0%}")
    unfilled_batch = fills[corpus.name][0] != fills[large.name][0]
    unfilled_shard = corpus.tokens < config.shard_tokens
    if unfilled_batch:
        print(f"  caution: the 1× corpus does not fill the largest batch ({fills[corpus.name][0]} "
              f"vs {fills[large.name][0]} windows × length) — that part of any growth is batch "
              "fill, bounded by --batch-tokens, not corpus size; use more --docs for a clean test")
    if unfilled_shard:
        print(f"  caution: the 1× corpus is {corpus.tokens / config.shard_tokens:.0%} of one shard "
              f"({config.shard_tokens:,} tokens); per-shard tables grow until a shard is full")
    return ratio, unfilled_batch or unfilled_shard


# --------------------------------------------------------------------------- (d) bytes per token


def folder_bytes(root: Path) -> dict[str, int]:
    """On-disk bytes per top-level entry (table folders; manifest and markers as 'other')."""
    sizes: Counter = Counter()
    for path in root.rglob("*"):
        if path.is_file():
            top = path.relative_to(root).parts[0]
            sizes[top if path.parent != root and not top.startswith("_") else "other"] += (
                path.stat().st_size)
    return dict(sizes)


def bytes_per_token(backend: Backend, subset: Corpus, corpus: Corpus, config: RunConfig,
                    work: Path) -> None:
    tables = ("documents", "tokens", "head_stats", "attention", "head_summary", "other")
    print(f"  on a length-stratified subset: {describe_corpus(subset)}")
    print(f"  {'mode':14s}{'total B/tok':>12s}" + "".join(f"{t:>13s}" for t in tables)
          + f"{'attn rows':>12s}{'B/row':>7s}{'tok/s':>8s}")
    per_row = {}
    for mode in MODES:
        out = work / f"mode-{mode.replace(':', '_')}"
        mode_config = replace(config, attention=AttentionMode.parse(mode))
        seconds, result = timed_job(backend, subset, mode_config, out)
        sizes = folder_bytes(out)
        rows = result["counts"].get("attention", 0)
        per_row[mode] = sizes.get("attention", 0) / rows if rows else 0.0
        print(f"  {mode:14s}{sum(sizes.values()) / subset.tokens:12.1f}"
              + "".join(f"{sizes.get(t, 0) / subset.tokens:13.1f}" for t in tables)
              + f"{rows:12,}{per_row[mode]:7.2f}{subset.tokens / seconds:8,.0f}")
        shutil.rmtree(out, ignore_errors=True)
    info = backend.info
    lengths = np.array([w.n_tokens for w in corpus.flat_windows], dtype=np.int64)
    pairs = lengths * (lengths + 1) // 2 if info.causal else lengths**2
    full_rows = int(pairs.sum()) * info.num_layers * info.num_heads
    print(f"  full mode grows with window length: on the whole benchmark corpus it would keep "
          f"{full_rows / 1e6:,.1f} M rows ≈ {full_rows * per_row['full'] / 1e6:,.0f} MB "
          f"({full_rows * per_row['full'] / corpus.tokens / 1e3:,.1f} kB/token)")


# --------------------------------------------------------------------------- (e) profile


BUCKETS = {  # label → function names (module stem.function) whose cumulative time is shown
    "input validation (read, hash, check ids)": ["inputs.validate"],
    "size survey (tokenises every document first)": ["local.survey"],
    "tokenisation (Windower.windows, all calls)": ["tokenize.windows"],
    "forward with attentions + the reduction inside it": ["backend.layers"],
    "streaming reduction (LayerReduction.add_rows)": ["streaming.add_rows"],
    "  row_order (one sort: max, k90, top-k)": ["stats.row_order"],
    "  row_terms (every statistic's per-row terms)": ["stats.row_terms"],
    "  kept_weights (attention reduction)": ["kept.kept_weights"],
    "statistics and kept rows put together": ["streaming.statistics", "streaming.kept"],
    "Arrow tables (stats/attention/documents/tokens)": [
        "tables.stats_table", "tables.attention_table", "tables.documents_table",
        "tables.tokens_table"],
    "collate (padding)": ["batching.collate"],
    "output row order (sort_tables, window_runs)": ["tables.sort_tables", "batch.window_runs"],
    "Parquet shards (write_shard)": ["writer.write_shard"],
    "finish (head_summary, manifest)": ["writer.finish"],
}


def _profile_entries(profile: cProfile.Profile) -> list[tuple[str, int, float, float]]:
    """(module.function, calls, own seconds, cumulative seconds) for every profiled function."""
    entries = []
    for (filename, _, name), (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items():
        module = Path(filename).stem if filename != "~" else ""
        label = f"{module}.{name}" if module else name
        in_project = f"{os.sep}pipelines{os.sep}" in filename
        entries.append((label if in_project or not module else f"[{module}] {name}",
                        calls, own, cumulative))
    return entries


def profile_job(backend: Backend, corpus: Corpus, config: RunConfig, work: Path) -> None:
    profile = cProfile.Profile()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    profile.enable()
    run_job([corpus.path], work / "profiled", config, backend=backend, progress=False)
    synchronize(backend)
    profile.disable()
    total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(work / "profiled", ignore_errors=True)
    entries = _profile_entries(profile)
    cumulative = {label: cum for label, _, _, cum in entries}
    print(f"  one job under cProfile: {total:.2f} s ({corpus.tokens / total:,.0f} tok/s); "
          "cumulative seconds, nested stages overlap")
    print(f"  CPU time user {after.ru_utime - before.ru_utime:.1f} s, system "
          f"{after.ru_stime - before.ru_stime:.1f} s; {after.ru_minflt - before.ru_minflt:,} minor "
          "page faults (fresh memory for large tensors: system time)")
    for label, names in BUCKETS.items():
        seconds = sum(cumulative.get(n, 0.0) for n in names)
        shown = f"{seconds:7.2f} s {seconds / total:6.1%}" if seconds else "      — (not found)"
        print(f"    {label:50s} {shown}")
    print("  hottest functions by own time (torch/numpy/pyarrow calls are leaves):")
    for label, calls, own, _ in sorted(entries, key=lambda e: -e[2])[:14]:
        print(f"    {own:7.2f} s {own / total:6.1%} {calls:7d}×  {label[:90]}")


# --------------------------------------------------------------------------- main


def code_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pipelines"], capture_output=True,
                               text=True, cwd=REPO).stdout.splitlines()
    except OSError:
        return "unknown"
    return f"{head}" + (f" + uncommitted changes in {len(dirty)} pipelines/ files" if dirty else "")


def status(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def summary(results: dict[str, float | None], forward: dict[str, dict[str, float]],
            floors: dict[str, float], modes_done: bool, notes: list[str]) -> None:
    """The ratios and their targets; ``forward`` holds (a): corpus → mode → job / forward,
    ``floors`` (a)'s corpus → forward / (forward + row_order)."""
    print("\n== summary " + "=" * 69)
    print(f"  {'check':46s}{'measured':>10s}{'target':>10s}  result")
    for name, ratios in forward.items():
        for mode, value in ratios.items():
            target = TARGET_FORWARD_RATIO.get(mode)
            print(f"  {f'(a) {name}: job ({mode}) / eager forward':46s}{value:10.3f}"
                  f"{'—' if target is None else f'>= {target}':>10s}  "
                  f"{'—' if target is None else status(value >= target)}")
        print(f"  {f'(a) {name}: floor, fwd / (fwd + row order)':46s}{floors[name]:10.3f}"
              f"{'report':>10s}  —")
    rows = [
        ("(b) job / naive loop tok/s", "naive", lambda v: f"{v:.1f}×",
         f">= {TARGET_NAIVE_RATIO:g}×", lambda v: v >= TARGET_NAIVE_RATIO),
        ("(c) peak RSS, 4× corpus / 1× corpus", "rss", lambda v: f"{v:.3f}",
         f"1 ± {TARGET_RSS_SPREAD:g}", lambda v: abs(v - 1) <= TARGET_RSS_SPREAD),
    ]
    for label, key, fmt, target, check in rows:
        value = results.get(key)
        shown = ("skipped", "—") if value is None else (fmt(value), status(check(value)))
        print(f"  {label:46s}{shown[0]:>10s}{target:>10s}  {shown[1]}")
    print(f"  {'(d) bytes per token per mode':46s}{'see (d)' if modes_done else 'skipped':>10s}"
          f"{'report':>10s}  —")
    for note in notes:
        print(f"  note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="registry name or local folder")
    parser.add_argument("--random-model", choices=sorted(SHAPES),
                        help="instead of --model: a BERT of that shape with random weights, "
                        "built offline in the work folder (benchmarks/random_model.py); for "
                        "machines without MiniLM's package")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="where the model runs (default cpu; auto: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="model weights and activations (half precision: CUDA only)")
    parser.add_argument("--docs", type=int, help=f"paragraphs in the corpus (default "
                        f"{FULL['docs']}, --quick {QUICK['docs']}; ~400 have windows of "
                        f">= {MIN_TOKENS} tokens)")
    parser.add_argument("--min-tokens", type=int, default=MIN_TOKENS,
                        help="only paragraphs whose every window has at least this many tokens "
                        f"(default {MIN_TOKENS}; 0: all ~940 paragraphs)")
    parser.add_argument("--sentences", type=int, help=f"short sentences of (a) (default "
                        f"{FULL['sentences']}, --quick {QUICK['sentences']}); "
                        f"{SENTENCE_TOKENS[0]}–{SENTENCE_TOKENS[1]} tokens each")
    parser.add_argument("--quick", action="store_true", help="small run (~1 minute)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"quick check of every section on a tiny corpus: {SMOKE}")
    parser.add_argument("--repeats", type=int, help=f"timed rounds of (a)'s jobs and forward "
                        f"(default {FULL['repeats']}, --quick {QUICK['repeats']})")
    parser.add_argument("--naive-docs", type=int, help="documents for the naive loop")
    parser.add_argument("--mode-docs", type=int, help="documents for the attention-mode sizes")
    parser.add_argument("--attention", default="topk:8",
                        help="attention mode of the timed job: (a) beside none, (b) (c) (e) "
                        "(default topk:8)")
    parser.add_argument("--max-length", type=int, help="tokens per window (default: the "
                        "model's limit); shorter windows make statistics relatively cheaper")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["sentences", "naive", "rss", "modes", "profile"])
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--rss-child", nargs=2, metavar=("CORPUS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def make_config(args: argparse.Namespace) -> RunConfig:
    """The job settings every measurement uses: job defaults, --device and --dtype,
    --attention (topk:8)."""
    return RunConfig(model=args.model, device=args.device, dtype=args.dtype,
                     attention=AttentionMode.parse(args.attention),
                     windows=WindowConfig(max_length=args.max_length))


def describe_device(backend: Backend) -> str:
    """The device the model runs on, in words."""
    if backend.device.type == "cuda":
        return (f"CUDA ({torch.cuda.get_device_name(backend.device)}, CUDA "
                f"{torch.version.cuda}), {torch.get_num_threads()} CPU threads")
    return f"CPU, {torch.get_num_threads()} threads"


def print_allocator_settings() -> None:
    """Name any glibc ``MALLOC_*`` tunable in effect: it changes peak memory and speed."""
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc:
        print(f"allocator settings: {malloc}")


def header(args: argparse.Namespace, backend: Backend, load_s: float) -> None:
    info = backend.info
    print(f"headscope corpus throughput — code {code_state()}")
    name = f"{args.random_model} (random weights)" if args.random_model else info.name
    print(f"model {name} ({info.model_type}, {info.num_layers} layers × "
          f"{info.num_heads} heads), {str(backend.describe().get('dtype', args.dtype))}, on "
          f"{describe_device(backend)}; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; model loaded in {load_s:.1f} s (not timed)")
    print_allocator_settings()


def run(args: argparse.Namespace, work: Path) -> None:
    started = time.perf_counter()
    if args.random_model:
        args.model = str(build_random_model(work / args.random_model, args.random_model))
    config = make_config(args)
    start = time.perf_counter()
    backend = create_backend(config.backend, config.model, config.device, config.dtype)
    load_s = time.perf_counter() - start
    windower = Windower(backend.tokenizer, backend.info, config.windows)
    header(args, backend, load_s)
    rows = evenly_spaced(long_paragraphs(windower, args.min_tokens), args.docs)
    corpus = make_corpus("paragraphs", rows, work, windower)
    corpora = [corpus]
    if "sentences" not in args.skip:
        short = evenly_spaced(short_sentences(windower, SENTENCE_TOKENS), args.sentences)
        corpora.append(make_corpus("sentences", short, work, windower))
    print("corpora (Python help topics, evenly spaced so each keeps its set's length mix):")
    for item in corpora:
        print(f"  {item.name}: {describe_corpus(item)}")
    modes = tuple(dict.fromkeys(["none", str(config.attention)]))
    picks, longest = stratified(corpus, 4), rows[int(corpus.doc_tokens().argmax())]
    # the longest document too, once (a small corpus's quantiles may already hold it)
    picks += [longest] * (longest not in picks)
    sentences = stratified(corpora[1], 4) if len(corpora) > 1 else []
    warm = make_corpus("warmup", picks + sentences, work, windower)
    print(f"warm-up: a job per mode and its forward passes on {len(picks)} paragraphs and "
          f"{len(sentences)} sentences ({warm_up(backend, warm, config, modes, work):.1f} s, "
          "not timed)")

    results: dict[str, float | None] = {}
    forward: dict[str, dict[str, float]] = {}
    floors: dict[str, float] = {}
    notes: list[str] = [f"(a) best of {args.repeats} rounds each; per-round ratios and spread "
                        "in (a)"]
    print(f"\n== (a) jobs ({', '.join(modes)}) / eager forward with attentions, side by side "
          f"on the same batches, {args.repeats} interleaved round"
          f"{'s' if args.repeats != 1 else ''} ==")
    for item in corpora:
        measured = side_by_side(backend, item, windower, config, modes, work, args.repeats)
        report_side_by_side(measured)
        forward[item.name] = {mode: measured.ratio(mode) for mode in modes}
        floors[item.name] = measured.order_ratio()
        if item is corpus:
            job_rate = corpus.tokens / min(measured.jobs[str(config.attention)])
    if "naive" not in args.skip:
        print("\n== (b) job vs naive loop (one window at a time, reference.all_heads) ==")
        subset = make_corpus("naive", stratified(corpus, args.naive_docs), work, windower)
        results["naive"] = job_vs_naive(backend, windower, subset, config, work, job_rate)
    if "rss" not in args.skip:
        print("\n== (c) peak RSS of a job in a fresh process (the child's VmHWM) ==")
        large = make_corpus("paragraphs×4", repeated(rows, 4), work, windower)
        results["rss"], unfilled = peak_rss(backend, corpus, large, windower, config, work)
        if unfilled:
            notes.append("(c) the 1× corpus does not fill the largest batch and/or one shard, so "
                         "part of the growth is fill, not corpus size (see (c))")
    if "modes" not in args.skip:
        print("\n== (d) on-disk bytes per token by attention mode (and per table) ==")
        subset = make_corpus("modes", stratified(corpus, args.mode_docs), work, windower)
        bytes_per_token(backend, subset, corpus, config, work)
    if "profile" not in args.skip:
        print(f"\n== (e) where a job's time goes ({config.attention}, the paragraphs of (a)) ==")
        profile_job(backend, corpus, config, work)
    summary(results, forward, floors, "modes" not in args.skip, notes)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average now "
          f"{os.getloadavg()[0]:.1f} (other processes on the machine add noise)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child, make_config(args))
        return 0
    with work_folder("headscope-bench-", args.keep) as work:
        run(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
