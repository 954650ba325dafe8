"""HTTP load benchmark: the headscope Serve app with batching on, then off, same traffic.

Starts a local Ray and Serve in this process, deploys the app built by ``service.app.build``
with ``max_batch_size`` 32 and drives it for a fixed time with N concurrent clients (asyncio +
httpx, keep-alive connections), each POSTing one short English text per request (one or two
sentences of the Python help topics, ``pipelines.jobs.demo.paragraphs()``). Then it replaces the
app by one with ``max_batch_size`` 1 and sends the same traffic for the same time.

It prints requests/s and documents/s of each mode, the throughput ratio (target >= 2x at 32
clients), p50/p99 latency, responses by status (only deliberate 503s are expected), client
errors, and the batch sizes the model worker saw (``ModelWorker.batch_size_log``). First, before
Ray starts, an in-process corpus job (``run_windowed``) on the same texts and CPUs gives the
docs/s the service is compared with (targets: >= 0.7 with ``--attention none``, >= 0.5 with
``topk:8`` JSON). It never asserts. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGET_RATIO = 2.0
#: service docs/s (batching on, 32 clients) over an in-process job's on the same texts
TARGET_JOB_RATIO = {"none": 0.7, "topk": 0.5}
FULL = {"seconds": 20.0, "warmup": 3.0}
#: texts of the in-process run of the worker's own work at the service's batch size
WORKER_TEXTS = 256
QUICK = {"seconds": 6.0, "warmup": 2.0}
#: --smoke: a few seconds of light load per mode, a check that the whole path works; it
#: fails (exit 1) when no request got a 200 or any error other than 503 happened
SMOKE = {"seconds": 2.0, "warmup": 1.0, "clients": 4, "job_texts": 64}
MAX_TEXT_CHARS = 200
NO_TOKEN_ENV = "HEADSCOPE_BENCH_TOKEN_THAT_IS_NEVER_SET"
LOG_CAP = 1000  # ModelWorker.batch_size_log keeps the last 1000 batches


# ------------------------------------------------------------------------------ traffic


def short_texts() -> list[str]:
    """One or two sentences of every prose paragraph of the Python help topics."""
    from pipelines.jobs.demo import paragraphs

    out = []
    for paragraph in paragraphs():
        sentences = re.split(r"(?<=[.!?])\s+", paragraph["text"])
        text = " ".join(sentences[:2])
        if len(text) > MAX_TEXT_CHARS:
            text = sentences[0]
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS].rsplit(" ", 1)[0]
        out.append(text)
    return out


@dataclass
class Load:
    """What the clients saw during one timed phase."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of 200 responses
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # exceptions, by type
    retry_after: Counter = field(default_factory=Counter)  # Retry-After values of 503s
    documents: int = 0

    @property
    def ok(self) -> int:
        return self.statuses[200]


async def drive(url: str, texts: list[str], clients: int, seconds: float,
                payload: dict | None) -> Load:
    """``clients`` loops, each POSTing one text at a time until ``seconds`` have passed
    (``payload`` None: each GETs ``url`` instead, and every 200 counts as a document).

    Client i sends texts i, i + clients, i + 2 * clients, ... so every run (and both modes)
    sends the same texts in the same order. A request in flight at the deadline is waited
    for and counted; the elapsed time includes it.
    """
    import httpx

    load = Load()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def one_client(index: int) -> None:
            sent = 0
            while time.perf_counter() < deadline:
                text = texts[(index + sent * clients) % len(texts)]
                sent += 1
                begun = time.perf_counter()
                try:
                    response = await (client.get(url) if payload is None else
                                      client.post(url, json={"texts": [text], **payload}))
                except httpx.HTTPError as exc:
                    load.errors[type(exc).__name__] += 1
                    continue
                load.statuses[response.status_code] += 1
                if response.status_code == 200:
                    load.latencies.append(time.perf_counter() - begun)
                    load.documents += 1
                elif response.status_code == 503:
                    load.retry_after[response.headers.get("retry-after", "-")] += 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
        load.seconds = time.perf_counter() - started
    return load


# ------------------------------------------------------------------------------ job


def load_backend(args: argparse.Namespace):
    """The model, loaded once in this process for the in-process measurements."""
    from pipelines.backends import create_backend

    return create_backend("auto", args.model, "cpu", "float32")


def windowed_texts(backend, texts: list[str]) -> list:
    """(Document, windows) of each text, cut as a job and the service cut them."""
    from pipelines.config import RunConfig
    from pipelines.text.tokenize import Document, Windower

    windower = Windower(backend.tokenizer, backend.info, RunConfig().windows)
    docs = [Document(f"d{i}", text) for i, text in enumerate(texts)]
    return [(doc, windower.windows(doc)) for doc in docs]


def job_rate(args: argparse.Namespace, backend, texts: list[str], work: Path) -> float:
    """Documents/s of an in-process corpus job (``run_windowed``: windows, batches, tables,
    Parquet) on ``texts``, with as many torch threads as the local Ray has CPUs."""
    import torch

    from pipelines.config import AttentionMode, RunConfig
    from pipelines.jobs.local import memory_input, run_windowed

    torch.set_num_threads(args.cpus)
    config = RunConfig(attention=AttentionMode.parse(args.attention or "topk:8"))
    windowed = windowed_texts(backend, texts)
    docs = [doc for doc, _ in windowed]
    run_windowed(windowed[:32], work / "job-warmup", config, backend,
                 memory_input(docs[:32], "bench"), progress=False)
    started = time.perf_counter()
    run_windowed(windowed, work / "job", config, backend, memory_input(docs, "bench"),
                 progress=False)
    return len(docs) / (time.perf_counter() - started)


def worker_rate(backend, texts: list[str], attention: str | None, batch: int,
                threads: int) -> float:
    """Documents/s of the model replica's own work (``service.worker.analyse_documents``) on
    ``texts`` in batches of ``batch`` documents, in this process with ``threads`` torch
    threads: what a worker could do at the batch sizes the service formed, with no HTTP,
    ingress or Ray around it."""
    import torch

    from service.config import ModelConfig
    from service.worker import DocumentJob, analyse_documents

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        jobs = [DocumentJob(windows, attention or "topk:8", 2)
                for _, windows in windowed_texts(backend, texts)]
        tokens = ModelConfig.model_fields["batch_tokens"].default  # the replica's default
        analyse_documents(backend, jobs[:batch], tokens)  # warm-up
        started = time.perf_counter()
        for first in range(0, len(jobs), batch):
            analyse_documents(backend, jobs[first:first + batch], tokens)
        return len(jobs) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config(args: argparse.Namespace, max_batch_size: int, dataset_root: Path) -> dict:
    ongoing = max(64, 2 * args.clients)  # room for every client: 503s only if you ask
    return {
        "dataset_root": str(dataset_root),
        "auth_token_env": NO_TOKEN_ENV,
        "models": [{"name": "minilm", "model": args.model, "device": "cpu",
                    "max_batch_size": max_batch_size,
                    "batch_wait_timeout_s": args.batch_wait_timeout_s,
                    "num_cpus": args.worker_cpus, "max_ongoing_requests": ongoing,
                    "max_queued_requests": args.max_queued_requests}],
        "ingress": {"num_cpus": args.ingress_cpus, "max_ongoing_requests": ongoing,
                    "max_queued_requests": args.max_queued_requests},
    }


def wait_ready(url: str, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


@dataclass
class ModeResult:
    name: str
    max_batch_size: int
    load: Load
    batch_sizes: list[int]
    batches_capped: bool  # more batches than the worker's log keeps
    cpu: dict[str, float]  # % of one core per process during the measured phase
    floor: Floor | None = None  # Serve's own per-request cost, measured after the load


@dataclass
class Floor:
    """``GET /healthz`` at the same concurrency: Serve's proxy and the ingress with no body,
    no model and no worker hop; the least machine time any request costs."""

    requests_per_s: float
    machine_busy: float  # % of all CPUs busy during the phase (every process on the machine)

    @classmethod
    def measure(cls, url: str, texts: list[str], clients: int, seconds: float) -> Floor:
        import psutil

        psutil.cpu_percent(None)
        load = asyncio.run(drive(url, texts, clients, seconds, None))
        return cls(load.ok / load.seconds, psutil.cpu_percent(None))


def measured_batches(log: list[int], documents: int) -> tuple[list[int], bool]:
    """The batches of the measured phase: the newest ones holding its ``documents``.

    Each phase waits for its last response, so nothing of the warm-up is in flight. The
    worker keeps only the last 1000 batches; the flag says whether that cut the phase short.
    """
    taken: list[int] = []
    for size in reversed(log):
        if sum(taken) >= documents:
            break
        taken.append(size)
    return taken[::-1], sum(taken) < documents


class CpuMeter:
    """CPU use of this app's Serve processes (and this one, the clients) over a phase."""

    def __init__(self, app: str) -> None:
        import psutil

        labels = {f"ray::ServeReplica:{app}:Ingress": "ingress",
                  f"ray::ServeReplica:{app}:model-minilm": "model worker",
                  "ray::ProxyActor": "Serve proxy"}
        self.processes = {"clients (this process)": psutil.Process()}
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            for prefix, label in labels.items():
                if command.startswith(prefix):
                    self.processes[label] = process
        for process in self.processes.values():
            process.cpu_percent(None)

    def read(self) -> dict[str, float]:
        out = {}
        for label, process in self.processes.items():
            try:
                out[label] = process.cpu_percent(None)
            except Exception:  # noqa: BLE001 - a process that went away reads as nothing
                out[label] = float("nan")
        return out


def run_mode(args: argparse.Namespace, base_url: str, max_batch_size: int, texts: list[str],
             dataset_root: Path) -> ModeResult:
    from ray import serve

    from service.app import build

    name = f"bench-batch{max_batch_size}"
    prefix = f"/{name}"
    started = time.perf_counter()
    serve.run(build(app_config(args, max_batch_size, dataset_root)), name=name,
              route_prefix=prefix)
    wait_ready(f"{base_url}{prefix}")
    print(f"  [{name}] deployed in {time.perf_counter() - started:.1f} s; warming up "
          f"{args.warmup:.0f} s, measuring {args.seconds:.0f} s ...", flush=True)
    url = f"{base_url}{prefix}/v1/attention"
    payload = {} if args.attention is None else {"attention": args.attention}
    if args.layout is not None:
        payload["layout"] = args.layout
    asyncio.run(drive(url, texts, args.clients, args.warmup, payload))
    worker = serve.get_deployment_handle("model-minilm", app_name=name)
    meter = CpuMeter(name)
    load = asyncio.run(drive(url, texts, args.clients, args.seconds, payload))
    cpu = meter.read()
    sizes, capped = measured_batches(worker.batch_size_log.remote().result(), load.documents)
    floor = Floor.measure(f"{base_url}{prefix}/healthz", texts, args.clients,
                          args.seconds / 2) if max_batch_size == args.batch_size else None
    serve.delete(name)
    return ModeResult(name, max_batch_size, load, sizes, capped, cpu, floor)


# ------------------------------------------------------------------------------ report


def percentile_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:,.0f} ms" if values else "-"


def describe_sizes(sizes: list[int]) -> str:
    if not sizes:
        return "none recorded"
    counts = Counter(sizes)
    common = ", ".join(f"{size}×{count}" for size, count in sorted(counts.items())[-8:])
    return (f"{len(sizes)} batches, mean {np.mean(sizes):.1f}, median {np.median(sizes):.0f}, "
            f"max {max(sizes)}; size×count (largest 8): {common}")


def job_ratio(results: list[ModeResult], job: float, attention: str | None,
              workers: dict[int, float], batch: int) -> None:
    """Service docs/s (batching on) over the in-process job's, against its target; and the
    worker's own work in process at the service's mean batch size (``workers``: torch
    threads → docs/s), which bounds what the service can reach at this load."""
    target = TARGET_JOB_RATIO["none" if attention == "none" else "topk"]
    service = results[0].load.documents / results[0].load.seconds
    ratio = service / job
    print(f"service / in-process job (docs/s): {service:.1f} / {job:.1f} = {ratio:.2f} "
          f"(target >= {target}) -> {'PASS' if ratio >= target else 'MISS'}")
    for threads, rate in workers.items():
        print(f"  bound: the worker's own work (analyse_documents) in process on batches of "
              f"{batch}, {threads} torch thread{'s' if threads > 1 else ''}, no HTTP or Ray: "
              f"{rate:.1f} docs/s = {rate / job:.2f} of the job; the service reached "
              f"{service / rate:.2f} of it")
    floor = results[0].floor
    if floor is not None:
        report_floor(floor, job, workers[max(workers)])


def report_floor(floor: Floor, job: float, worker: float) -> None:
    """Serve's per-request floor and the cap it sets with the CPUs shared: a document needs
    the floor's machine time (busy fraction / its rate) plus the worker's (1 / its all-CPU
    rate), so docs/s <= 1 / (busy/floor + 1/worker); with a worker as fast per document as
    the in-process job, <= 1 / (busy/floor + 1/job)."""
    def cap(rate: float) -> float:
        return 1 / (floor.machine_busy / 100 / floor.requests_per_s + 1 / rate)

    print(f"  floor: GET /healthz through Serve's proxy and the ingress (no body, no model), "
          f"same clients: {floor.requests_per_s:.0f} requests/s with the machine's CPUs "
          f"{floor.machine_busy:.0f}% busy")
    print(f"  cap with the CPUs shared: floor + worker at all CPUs {cap(worker):.1f} docs/s = "
          f"{cap(worker) / job:.2f} of the job; floor + a worker as fast as the job "
          f"{cap(job):.1f} docs/s = {cap(job) / job:.2f} of the job")


def report(results: list[ModeResult], clients: int) -> None:
    print()
    header = (f"{'mode':<16}{'req/s':>9}{'docs/s':>9}{'p50':>10}{'p99':>10}{'200':>8}"
              f"{'503':>7}{'other':>7}{'client err':>12}")
    print(header)
    print("-" * len(header))
    for result in results:
        load = result.load
        other = sum(n for status, n in load.statuses.items() if status not in (200, 503))
        requests_per_s = sum(load.statuses.values()) / load.seconds
        print(f"{f'max_batch_size={result.max_batch_size}':<16}{requests_per_s:>9.1f}"
              f"{load.documents / load.seconds:>9.1f}{percentile_ms(load.latencies, 50):>10}"
              f"{percentile_ms(load.latencies, 99):>10}{load.ok:>8}{load.statuses[503]:>7}"
              f"{other:>7}{sum(load.errors.values()):>12}")
    print()
    for result in results:
        load = result.load
        note = f" (the last {LOG_CAP} batches only)" if result.batches_capped else ""
        print(f"max_batch_size={result.max_batch_size}: statuses {dict(load.statuses)}; "
              f"client errors {dict(load.errors) or 'none'}; 503 Retry-After "
              f"{dict(load.retry_after) or '-'}")
        print(f"  batch sizes{note}: {describe_sizes(result.batch_sizes)}")
        print("  CPU (% of one core): " + ", ".join(f"{label} {value:.0f}%"
                                                   for label, value in result.cpu.items()))
    if len(results) < 2:
        return
    batched, single = results
    ratio = (batched.load.documents / batched.load.seconds) / max(
        single.load.documents / single.load.seconds, 1e-9)
    unexpected = sum(n for r in results for s, n in r.load.statuses.items()
                     if s not in (200, 503)) + sum(sum(r.load.errors.values()) for r in results)
    print()
    print(f"throughput ratio (docs/s, batching on / off) at {clients} clients: {ratio:.2f}x "
          f"(target >= {TARGET_RATIO:.0f}x) -> {'PASS' if ratio >= TARGET_RATIO else 'MISS'}")
    print(f"errors other than 503: {unexpected} -> {'PASS' if unexpected == 0 else 'MISS'}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", type=int, default=None,
                        help=f"concurrent clients (default 32, --smoke {SMOKE['clients']})")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"measured seconds per mode (default {FULL['seconds']:.0f}, "
                             f"--quick {QUICK['seconds']:.0f})")
    parser.add_argument("--warmup", type=float, default=None,
                        help="unmeasured seconds of the same load before each mode")
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--smoke", action="store_true",
                        help=f"quick check with a few seconds of load: {SMOKE}")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="max_batch_size of the batched mode")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.02,
                        help="batch_wait_timeout_s of both modes")
    parser.add_argument("--attention", default=None,
                        help="attention mode of the requests (default: not sent, so the "
                             "API default topk:8); 'none' asks for statistics only")
    parser.add_argument("--layout", choices=("rows", "dense"), default=None,
                        help="JSON attention layout of the requests (default: not sent: rows)")
    parser.add_argument("--batched-only", action="store_true",
                        help="skip the max_batch_size 1 run")
    parser.add_argument("--job-texts", type=int, default=None,
                        help="texts of the in-process job (default all; --smoke 64)")
    parser.add_argument("--model", default="minilm", help="registry name or local folder")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                        help="CPUs of the local Ray")
    parser.add_argument("--worker-cpus", type=float, default=1.0,
                        help="num_cpus of the model replica (sets its torch threads)")
    parser.add_argument("--ingress-cpus", type=float, default=0.25)
    parser.add_argument("--max-queued-requests", type=int, default=-1,
                        help="on the worker and the ingress; -1: unbounded")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else QUICK if args.quick else FULL
    args.clients = args.clients if args.clients is not None else preset.get("clients", 32)
    args.seconds = args.seconds if args.seconds is not None else preset["seconds"]
    args.warmup = args.warmup if args.warmup is not None else preset["warmup"]
    args.job_texts = args.job_texts if args.job_texts is not None else preset.get("job_texts")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import ray
    from ray import serve

    texts = short_texts()
    lengths = [len(t) for t in texts]
    print(f"headscope serve load: {args.clients} clients, {args.seconds:.0f} s per mode "
          f"(+{args.warmup:.0f} s warm-up), max_batch_size {args.batch_size} vs 1, "
          f"attention {args.attention or 'topk:8 (API default)'}, batch_wait_timeout_s "
          f"{args.batch_wait_timeout_s}")
    print(f"traffic: {len(texts)} texts of the Python help topics, one per request, "
          f"{min(lengths)}–{max(lengths)} chars (median {int(np.median(lengths))})")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"Ray {ray.__version__}, local Ray with {args.cpus} CPUs, model replica "
          f"{args.worker_cpus} CPU, ingress {args.ingress_cpus} CPU", flush=True)
    work = Path(tempfile.mkdtemp(prefix="headscope-serve-bench-"))
    backend = load_backend(args)
    job = job_rate(args, backend, texts[:args.job_texts], work)
    print(f"in-process job on {len(texts[:args.job_texts])} of these texts, {args.cpus} torch "
          f"threads: {job:.1f} docs/s", flush=True)
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=200 * 2**20,
             include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base_url = f"http://127.0.0.1:{port}"
        sizes = (args.batch_size,) if args.batched_only else (args.batch_size, 1)
        results = [run_mode(args, base_url, size, texts, work / "data") for size in sizes]
        report(results, args.clients)
        batch = max(1, round(float(np.mean(results[0].batch_sizes or [1]))))
        sample = texts[:min(WORKER_TEXTS, len(texts[:args.job_texts]))]
        workers = {threads: worker_rate(backend, sample, args.attention, batch, threads)
                   for threads in sorted({max(1, int(args.worker_cpus)), args.cpus})}
        job_ratio(results, job, args.attention, workers, batch)
        failed = args.smoke and (sum(r.load.ok for r in results) == 0 or any(
            s not in (200, 503) for r in results for s in r.load.statuses)
            or any(r.load.errors for r in results))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if failed:
        print("smoke run FAILED: no 200 response, or errors other than 503", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
