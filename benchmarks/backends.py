"""ONNX Runtime against PyTorch: the same corpus, the same batches, one run.

For each attention mode (statistics only, and ``topk:8``) a corpus job runs with each backend,
in alternating order, and the best of ``--repeats`` rounds is reported. The forward passes alone
are then timed on the exact batches the jobs ran, which splits each job into forward time and
everything after it (statistics, reduction, Parquet: the same code for both backends). Last,
ONNX Runtime's own profiler says which operators take the forward time. It reports and never
asserts. Run ``python benchmarks/backends.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from corpus_throughput import (
    RecordingBackend,
    evenly_spaced,
    make_corpus,
    padded_tokens,
    timed_forward,
    timed_job,
)
from smoke import parse_args_with_smoke

from pipelines.backends import Backend
from pipelines.backends.batching import Batch
from pipelines.backends.onnx.backend import SLOWER_FUSIONS, OnnxBackend
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, OnnxOptions, RunConfig
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.export_onnx import export_onnx, graph_inputs
from pipelines.text.tokenize import Windower

MODES = ("none", "topk:8")
#: --smoke: a tiny input, the same code path (export included)
SMOKE = {"docs": 8, "repeats": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="documents (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per backend (default 3)")
    parser.add_argument("--onnx", default=None,
                        help="an existing export of minilm (default: export to a temp folder)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (default 0: one per core)")
    args = parse_args_with_smoke(parser, argv, SMOKE)
    return args


def export(work: Path, given: str | None) -> tuple[Path, float]:
    if given:
        return Path(given), 0.0
    start = time.perf_counter()
    export_onnx("minilm", work / "minilm-onnx")
    return work / "minilm-onnx", time.perf_counter() - start


def best_jobs(backends: dict[str, Backend], corpus, config: RunConfig, work: Path,
              repeats: int) -> dict[str, float]:
    """Best job seconds per backend over ``repeats`` rounds, alternating which goes first."""
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    for round_index in range(repeats):
        order = list(backends) if round_index % 2 == 0 else list(reversed(backends))
        for name in order:
            out = work / f"job-{name}-{round_index}"
            seconds[name].append(timed_job(backends[name], corpus, config, out)[0])
            shutil.rmtree(out)
    return {name: min(values) for name, values in seconds.items()}


def best_forward(backends: dict[str, Backend], batches: list[Batch], repeats: int) -> dict:
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, backend in backends.items():
            seconds[name].append(timed_forward(backend, batches))
    return {name: min(values) for name, values in seconds.items()}


def operator_shares(backend: OnnxBackend, batches: list[Batch], work: Path,
                    top: int = 6) -> list[tuple]:
    """ONNX Runtime's profile of ``batches``: share of kernel time per operator type.

    The profile is written under ``work`` (the run's temporary folder), never into the current
    folder, which is ONNX Runtime's default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = backend.options.intra_op_threads
    options.log_severity_level = 3
    options.profile_file_prefix = str(work / "ort-profile")
    session = ort.InferenceSession(str(backend.export.graph), options,  # as the backend's
                                   providers=["CPUExecutionProvider"],
                                   disabled_optimizers=SLOWER_FUSIONS)
    names = backend.export.names
    for batch in batches:
        inputs = graph_inputs(batch, names)
        session.run(names.attentions, {n: t.numpy() for n, t in zip(names.inputs, inputs,
                                                                     strict=True)})
    trace = Path(session.end_profiling())
    kernel: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernel[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(kernel.values())
    return [(op, micros / total) for op, micros in kernel.most_common(top)]


def run(args: argparse.Namespace, work: Path) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder, export_s = export(work, args.onnx)
    backends: dict[str, Backend] = {
        "torch": TorchBackend("minilm", device="cpu"),
        "onnx": OnnxBackend(str(folder), device="cpu",
                            options=OnnxOptions(intra_op_threads=args.threads)),
    }
    runtime = backends["onnx"].describe()
    windower = Windower(backends["torch"].tokenizer, backends["torch"].info,
                        RunConfig().windows)
    corpus = make_corpus("corpus", evenly_spaced(paragraphs(), args.docs), work, windower)
    print(f"model minilm on CPU; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{runtime['provider']} onnxruntime {runtime['onnxruntime_version']} "
          f"(intra-op threads {args.threads or 'default'})")
    print(f"corpus: {len(corpus.rows)} documents, {corpus.tokens:,} tokens"
          + (f"; export took {export_s:.1f} s" if export_s else ""))
    recorder = RecordingBackend(backends["torch"])
    timed_job(recorder, corpus, RunConfig(device="cpu"), work / "warm")  # warm-up, batches
    shutil.rmtree(work / "warm")
    batches = recorder.batches
    timed_forward(backends["onnx"], batches[:4])
    forward = best_forward(backends, batches, args.repeats)
    print(f"\nforward only, {len(batches)} batches, {padded_tokens(batches):,} padded tokens:")
    for name, seconds in forward.items():
        print(f"  {name:5s} {corpus.tokens / seconds:8,.0f} tok/s ({seconds:.2f} s)")
    print(f"  onnx / torch = {forward['torch'] / forward['onnx']:.2f}x")
    for mode in MODES:
        config = RunConfig(device="cpu", attention=AttentionMode.parse(mode))
        jobs = best_jobs(backends, corpus, config, work, args.repeats)
        print(f"\njob, attention {mode} (best of {args.repeats}):")
        for name, seconds in jobs.items():
            rest = seconds - forward[name]
            print(f"  {name:5s} {corpus.tokens / seconds:8,.0f} tok/s ({seconds:.2f} s: forward "
                  f"{forward[name]:.2f} s = {forward[name] / seconds:.0%}, rest {rest:.2f} s)")
        print(f"  onnx / torch = {jobs['torch'] / jobs['onnx']:.2f}x")
    print("\nONNX Runtime kernel time by operator (all batches once):")
    for op, share in operator_shares(backends["onnx"], batches, work):
        print(f"  {op:24s} {share:6.1%}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headscope-backends-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
