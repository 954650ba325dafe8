"""Peak memory of `headscope run` as the corpus grows, and of full attention against its budget.

Every job is a `headscope run` command in a fresh process; its peak RSS is the ru_maxrss that
the kernel reports when it ends (os.wait4). This process imports neither torch nor headscope,
so it stays small: a child's peak cannot read below the RSS of the process that started it.

(a) stats + topk:8 on the demo paragraphs (``pipelines.jobs.demo``), local engine, CPU, on a
    corpus and on one 4× and 16× larger (the documents repeated under new ids). Peak memory
    grows over a job's first shards (the batches met so far, the allocator's heap) and is
    flat after some six shards, so the budget makes shards small enough for the 1× corpus to
    fill seven (64MiB: 16 MiB of rows, ~1,000 tokens) and batches of 512 tokens hold the
    longest window alone, the same batch in every corpus. Target: 4× and 16× within ±10% of
    1×.
(b) --attention full on 512-token windows (long documents, --truncate: one window each):
    peak RSS minus the model-only baseline (a child that imports what the job imports and
    loads the model, nothing more) against --memory-budget, with the job's own estimate.

It reports and never asserts. ``--help`` lists the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from smoke import parse_args_with_smoke, work_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "headscope"
CLI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "pipelines"]
SCALES = (1, 4, 16)
TARGET_SPREAD = 0.10
#: Characters a long document gathers (consecutive paragraphs): well over 512 tokens.
LONG_CHARS = 4000
#: --smoke: a tiny input, the same code path (six child processes, about 40 s on 2 cores)
SMOKE = {"docs": 6, "long_docs": 1}
MODEL_ONLY = ("from pipelines.cli import main; from pipelines.jobs.local import run_job; "
              "from pipelines.backends import create_backend; "
              "create_backend('auto', {model!r}, 'cpu')")


@dataclass
class Child:
    """One finished child process: its exit status, peak RSS, time and output."""

    returncode: int
    peak_kb: int
    seconds: float
    stdout: str
    stderr: str

    def line(self, prefix: str) -> str:
        """The message of the job's first log line that starts with ``prefix`` ('' if none).
        Log lines read ``HH:MM:SS LEVEL logger: message``."""
        messages = (line.split(": ", 1)[-1] for line in self.stderr.splitlines())
        return next((message for message in messages if message.startswith(prefix)), "")

    @property
    def error(self) -> str:
        return (self.stderr.strip().splitlines() or ["no output"])[-1]


def run_child(command: list[str]) -> Child:
    """Run ``command`` to its end; its peak RSS from the kernel's accounting (ru_maxrss, kB)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Child(process.returncode, usage.ru_maxrss, seconds, out.read(), err.read())


def write_corpora(folder: str, docs: int, long_docs: int) -> None:
    """In a child (it imports headscope): the corpora of (a) and the long documents of (b)."""
    from pipelines.jobs.demo import paragraphs

    rows = paragraphs()
    picked = [rows[i * len(rows) // docs] for i in range(docs)]  # evenly spaced: the length mix
    for scale in SCALES:
        copies = [{"id": f"{row['id']}~{copy}" if copy else row["id"], "text": row["text"]}
                  for copy in range(scale) for row in picked]
        _write(Path(folder) / f"corpus-{scale}x.jsonl", copies)
    long, text, start = [], "", 0
    for index, row in enumerate(rows):
        text = f"{text} {row['text']}".strip()
        if len(text) >= LONG_CHARS:
            long.append({"id": f"long-{start}", "text": text})
            text, start = "", index + 1
        if len(long) == long_docs:
            break
    _write(Path(folder) / "long.jsonl", long)


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def headscope_run(corpus: Path, out: Path, args: argparse.Namespace, *options: str) -> Child:
    command = [*CLI, "run", str(corpus), "--out", str(out), "--model", args.model, "--device",
               "cpu", "--no-progress", *options]
    done = run_child(command)
    shards = len(list((out / "_shards").glob("*.json"))) if (out / "_shards").is_dir() else 0
    done.stdout += f"\nshards {shards}"
    shutil.rmtree(out, ignore_errors=True)
    return done


def mb(kb: float) -> str:
    return f"{kb / 1024:,.0f} MB"


def shards_of(child: Child) -> int:
    return int(child.stdout.rsplit("shards ", 1)[-1])


def growth(args: argparse.Namespace, work: Path, baseline_kb: int) -> list[float]:
    """(a): the same job on the 1×, 4× and 16× corpora; the peaks' ratios to 1×."""
    options = ["--memory-budget", args.budget, "--batch-tokens", str(args.batch_tokens)]
    print(f"\n== (a) stats + topk:8, demo paragraphs, {' '.join(options)} ==")
    print(f"  {'corpus':7s} {'docs':>6s} {'tokens':>8s} {'shards':>6s} {'seconds':>7s} "
          f"{'peak RSS':>9s} {'- model':>9s} {'÷ 1×':>6s}")
    peaks: list[int] = []
    for scale in SCALES:
        job = headscope_run(work / f"corpus-{scale}x.jsonl", work / f"out-{scale}x", args,
                            *options)
        if job.returncode != 0:
            print(f"  {scale}×: the job failed: {job.error}")
            return []
        peaks.append(job.peak_kb)
        counts = re.search(r"(\d+) documents, \d+ windows, (\d+) tokens", job.stdout)
        docs, tokens = (int(counts.group(1)), int(counts.group(2))) if counts else (0, 0)
        print(f"  {f'{scale}×':7s} {docs:6,} {tokens:8,} {shards_of(job):6} {job.seconds:7.1f} "
              f"{mb(job.peak_kb):>9s} {mb(job.peak_kb - baseline_kb):>9s} "
              f"{job.peak_kb / peaks[0]:6.3f}")
        if scale == 1:
            print(f"  {'':7s} the job's estimate: {job.line('memory:')}")
    return [peak / peaks[0] for peak in peaks[1:]]


def full_attention(args: argparse.Namespace, work: Path, baseline_kb: int) -> float | None:
    """(b): full attention on 512-token windows; the working memory over the budget."""
    options = ["--attention", "full", "--truncate", "--memory-budget", args.full_budget]
    print(f"\n== (b) {' '.join(options)}: {args.long_docs} documents of one 512-token window ==")
    job = headscope_run(work / "long.jsonl", work / "out-full", args, *options)
    if job.returncode != 0:
        print(f"  the job failed: {job.error}")
        return None
    budget_mb = _size_mb(job.line("memory:"))
    working = job.peak_kb - baseline_kb
    print(f"  {job.line('input:')}")
    print(f"  the job's estimate: {job.line('memory:')}")
    print(f"  {shards_of(job)} shards in {job.seconds:.1f} s; peak RSS {mb(job.peak_kb)}, minus "
          f"the model-only baseline: {mb(working)} of working memory")
    if budget_mb is None:
        return None
    ratio = working / 1024 / budget_mb
    print(f"  working memory / budget = {mb(working)} / {budget_mb:,.0f} MB = {ratio:.2f}")
    return ratio


def _size_mb(line: str) -> float | None:
    """The budget named in the job's memory line, in MB (MiB)."""
    found = re.search(r"\(budget ([\d.]+) (GiB|MiB)\)", line)
    if not found:
        return None
    return float(found.group(1)) * (1024 if found.group(2) == "GiB" else 1)


def code_state() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "pipelines"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip()
    return f"{head or 'unknown'}{' (pipelines/ modified)' if dirty else ''}"


def run(args: argparse.Namespace, work: Path) -> None:
    started = time.perf_counter()
    print(f"headscope memory — code {code_state()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; every job a fresh `headscope run` on the CPU")
    wrote = run_child([sys.executable, __file__, "--write-corpora", str(work), "--docs",
                       str(args.docs), "--long-docs", str(args.long_docs)])
    if wrote.returncode != 0:
        print(f"writing the corpora failed: {wrote.error}")
        return
    baseline = run_child([sys.executable, "-c", MODEL_ONLY.format(model=args.model)])
    own = _own_rss_kb()
    print(f"model-only baseline ({args.model}, imports and weights, no job): peak RSS "
          f"{mb(baseline.peak_kb)}; this process {mb(own)} (a child reads no lower)")
    ratios = growth(args, work, baseline.peak_kb)
    budget_ratio = full_attention(args, work, baseline.peak_kb)
    print("\n== summary ==")
    for scale, ratio in zip(SCALES[1:], ratios, strict=False):
        verdict = "PASS" if abs(ratio - 1) <= TARGET_SPREAD else "MISS"
        print(f"  (a) {scale}× / 1× peak RSS = {ratio:.3f}   target within "
              f"±{TARGET_SPREAD:.0%}: {verdict}")
    if budget_ratio is not None:
        verdict = "within" if budget_ratio <= 1 else "over"
        print(f"  (b) full attention, 512-token windows: working memory {budget_ratio:.2f} × "
              f"the budget ({verdict})")
    print(f"total {time.perf_counter() - started:.0f} s; load average now "
          f"{os.getloadavg()[0]:.1f} (other processes on the machine add noise)")


def _own_rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="registry name or local folder")
    parser.add_argument("--docs", type=int, default=100,
                        help="demo paragraphs in the 1× corpus, evenly spaced (default 100: "
                             "~6,900 tokens, windows up to 212)")
    parser.add_argument("--budget", default="64MiB",
                        help="(a)'s --memory-budget: shards hold a quarter of it, so that the "
                             "1× corpus fills several (default 64MiB, the minimum)")
    parser.add_argument("--batch-tokens", type=int, default=512,
                        help="(a)'s --batch-tokens: the same largest batch in every corpus "
                             "(512)")
    parser.add_argument("--long-docs", type=int, default=6,
                        help="(b)'s documents, one 512-token window each (default 6)")
    parser.add_argument("--full-budget", default="2GiB",
                        help="(b)'s --memory-budget (default 2GiB, the job's default)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--write-corpora", metavar="DIR", help=argparse.SUPPRESS)
    return parse_args_with_smoke(parser, argv, SMOKE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_corpora:
        write_corpora(args.write_corpora, args.docs, args.long_docs)
        return 0
    with work_folder("headscope-memory-", args.keep) as work:
        run(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
