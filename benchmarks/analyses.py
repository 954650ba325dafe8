"""The cost of each head analysis relative to the same job without analyses, in one run.

One corpus (prose of the Python help topics), MiniLM on the CPU. Jobs run with no analysis,
then each analysis alone, then all of them, in alternating order over ``--repeats`` rounds; the
best time of each is compared with the best time without analyses. Head ablation (its own
command, one forward pass per disabled head) is timed on a subset and reported per ablation
and for all heads. It reports and never asserts. ``python benchmarks/analyses.py --help``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from corpus_throughput import evenly_spaced, make_corpus, timed_job
from smoke import parse_args_with_smoke

from pipelines.analysis.importance import head_importance
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.torch.ablation import load_for_ablation
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig
from pipelines.jobs.demo import paragraphs
from pipelines.text.tokenize import Windower

VARIANTS = {"no analysis": (), "patterns": ("patterns",), "words": ("words",),
            "similarity": ("similarity",), "all three": ("patterns", "words", "similarity")}


#: --smoke: a tiny input, the same code path (about 20 s on 2 cores)
SMOKE = {"docs": 8, "repeats": 1, "ablation_docs": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="documents (default 200)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--attention", default="topk:8",
                        help="attention mode of every job (default topk:8, which word-level "
                             "attention also keeps)")
    parser.add_argument("--ablation-docs", type=int, default=20,
                        help="documents for the ablation timing (default 20)")
    args = parse_args_with_smoke(parser, argv, SMOKE)
    return args


def time_jobs(backend: TorchBackend, corpus, attention: str, work: Path,
              repeats: int) -> dict[str, float]:
    best: dict[str, float] = {}
    names = list(VARIANTS)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            config = RunConfig(device="cpu", attention=AttentionMode.parse(attention),
                               analyses=VARIANTS[name])
            out = work / f"job-{round_index}"
            seconds = timed_job(backend, corpus, config, out)[0]
            shutil.rmtree(out)
            best[name] = min(best.get(name, seconds), seconds)
    return best


def time_ablation(corpus, count: int) -> tuple[float, float, int]:
    """Seconds for a baseline + 4 single-head ablations on the first ``count`` documents."""
    bundle = load_for_ablation("minilm", "cpu")
    windows = [w for ws in corpus.windows[:count] for w in ws]
    masks = [HeadMask.of((layer, 0)) for layer in range(4)]
    head_importance(bundle, windows[:2], masks[:1], progress=False)  # warm-up
    start = time.perf_counter()
    head_importance(bundle, windows, masks, progress=False)
    seconds = time.perf_counter() - start
    return seconds, sum(w.n_tokens for w in windows), len(masks)


def run(args: argparse.Namespace, work: Path) -> None:
    backend = TorchBackend("minilm", device="cpu")
    windower = Windower(backend.tokenizer, backend.info, RunConfig().windows)
    corpus = make_corpus("corpus", evenly_spaced(paragraphs(), args.docs), work, windower)
    print(f"minilm on CPU; {len(corpus.rows)} documents, {corpus.tokens:,} tokens; "
          f"attention {args.attention}; best of {args.repeats}")
    timed_job(backend, corpus, RunConfig(device="cpu", analyses=VARIANTS["all three"]),
              work / "warm")
    shutil.rmtree(work / "warm")
    best = time_jobs(backend, corpus, args.attention, work, args.repeats)
    base = best["no analysis"]
    for name, seconds in best.items():
        print(f"  {name:16s} {corpus.tokens / seconds:7,.0f} tok/s ({seconds:6.2f} s)"
              f"  cost x{seconds / base:.2f} of the job without analyses")
    seconds, tokens, ablations = time_ablation(corpus, args.ablation_docs)
    per_pass = seconds / (ablations + 1)  # baseline + each ablation
    heads = backend.info.num_layers * backend.info.num_heads
    stats_rate = corpus.tokens / base
    print(f"  ablation: {tokens:,} tokens, baseline + {ablations} heads in {seconds:.2f} s = "
          f"{tokens / per_pass:,.0f} tok/s per pass; every head ({heads} + 1 passes) costs "
          f"x{(heads + 1) * stats_rate / (tokens / per_pass):.0f} of the job without analyses")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headscope-analyses-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
