"""The local engine against the Ray engine: the same corpus and settings, one run.

The corpus (demo paragraphs, split over several files) is processed by the local engine and
by the Ray engine with 1 and 2 inference actors on a local Ray, in alternating order; the best
of ``--repeats`` rounds is reported. Ray itself is started once, before the rounds (its start-up
time is printed on its own); each Ray job still pays for starting its actors and loading the
model in each. The ratios are the Ray overhead on one machine and the step from one actor to
two. It reports and never asserts. ``python benchmarks/engines.py --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from corpus_throughput import evenly_spaced
from smoke import parse_args_with_smoke

from pipelines.config import AttentionMode, RunConfig
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.local import JobResult, run_job
from pipelines.jobs.ray_engine import RayOptions, run_ray_job

#: --smoke: a tiny input, the same code path (local Ray, all three engines)
SMOKE = {"docs": 8, "files": 2, "repeats": 1, "shard_tokens": 512}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=400, help="documents (default 400)")
    parser.add_argument("--files", type=int, default=4, help="input files (default 4)")
    parser.add_argument("--attention", default="topk:8", help="attention mode (default topk:8)")
    parser.add_argument("--shard-tokens", type=int, default=4096,
                        help="tokens per shard, the unit of work of an actor (default 4096)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per engine (default 2)")
    args = parse_args_with_smoke(parser, argv, SMOKE)
    return args


def write_files(work: Path, docs: int, files: int) -> list[Path]:
    rows = evenly_spaced(paragraphs(), docs)
    paths = []
    for index in range(files):
        path = work / f"part{index}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[index::files]))
        paths.append(path)
    return paths


def engines(config: RunConfig) -> dict[str, Callable[[list[Path], Path], JobResult]]:
    def local(inputs: list[Path], out: Path) -> JobResult:
        return run_job(inputs, out, config, progress=False)

    def on_ray(workers: int) -> Callable[[list[Path], Path], JobResult]:
        def job(inputs: list[Path], out: Path) -> JobResult:
            return run_ray_job(inputs, out, config, options=RayOptions(workers=workers),
                               progress=False)
        return job

    return {"local": local, "ray, 1 actor": on_ray(1), "ray, 2 actors": on_ray(2)}


def run(args: argparse.Namespace, work: Path) -> None:
    config = RunConfig(device="cpu", attention=AttentionMode.parse(args.attention),
                       shard_tokens=args.shard_tokens)
    inputs = write_files(work, args.docs, args.files)
    start = time.perf_counter()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 1024**2)
    cpus = ray.cluster_resources()["CPU"]
    print(f"local Ray with {cpus:g} CPUs started in {time.perf_counter() - start:.1f} s; "
          f"torch threads in this process: {torch.get_num_threads()}")
    best: dict[str, float] = {}
    tokens = 0
    for round_ in range(args.repeats):
        names = list(engines(config))
        for name in names if round_ % 2 == 0 else names[::-1]:
            out = work / "out"
            result = engines(config)[name](inputs, out)
            tokens = result.tokens
            best[name] = min(best.get(name, float("inf")), result.seconds)
            shutil.rmtree(out)
    ray.shutdown()
    print(f"{args.docs} documents in {args.files} files, {tokens:,} tokens, attention "
          f"{args.attention}, shards of {args.shard_tokens} tokens; best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:14s} {tokens / seconds:7,.0f} tok/s ({seconds:6.2f} s)  "
              f"x{best['local'] / seconds:.2f} of local")
    print(f"  2 actors / 1 actor = x{best['ray, 1 actor'] / best['ray, 2 actors']:.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headscope-engines-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
