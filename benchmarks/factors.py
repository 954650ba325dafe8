"""Transformer factors: training and applying speed, and peak memory as the corpus grows 4×.

Each measurement runs in a fresh process (``--child``), so peak RSS is that job's alone: the
model is loaded, the process's peak is reset, then the job runs and its peak is read
(VmHWM, Linux). The corpus is the demo paragraphs; the larger corpus repeats them under new
ids (``--scale``, 4× by default).
Peak memory grows with the forward batch and the shard until they are full, then stays flat;
batches (``--batch-tokens``) and ``apply``'s shards (``--shard-tokens``) are set small enough
that the 1× corpus fills them as well as the 4× one. With the defaults (8,192 and 32,768) the
150 paragraphs would fill neither: they have too few windows of each length for full batches.
Training and applying are timed on both corpora; the dictionary for ``apply`` is the one
trained on the 1× corpus. It reports and never asserts. ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpus_throughput import _memory_kb, _reset_peak, print_allocator_settings
from smoke import parse_args_with_smoke

from pipelines.jobs.demo import paragraphs

REPO = Path(__file__).resolve().parents[1]


#: --smoke: a tiny input, the same code path (four child processes)
SMOKE = {"docs": 4, "n_factors": 32, "shard_tokens": 256, "batch_tokens": 256, "scale": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=150, help="documents in the 1× corpus")
    parser.add_argument("--n-factors", type=int, default=512, help="dictionary size (512)")
    parser.add_argument("--sparsity", type=float, default=0.1, help="λ (default 0.1)")
    parser.add_argument("--shard-tokens", type=int, default=2048,
                        help="apply's shard size: both corpora fill many shards (2048)")
    parser.add_argument("--batch-tokens", type=int, default=2048,
                        help="padded tokens per forward pass: both corpora fill them (2048)")
    parser.add_argument("--scale", type=int, default=4,
                        help="the larger corpus is the first one repeated this often (4)")
    parser.add_argument("--apply-only", action="store_true",
                        help="train on the first corpus only (for apply's dictionary)")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "CORPUS", "OUT", "DICT"),
                        help=argparse.SUPPRESS)
    args = parse_args_with_smoke(parser, argv, SMOKE)
    if args.scale < 2:
        parser.error("--scale must be at least 2")
    return args


def child(step: str, corpus: str, out: str, dictionary: str, args: argparse.Namespace) -> None:
    """In a fresh process: one train or apply job; print tokens, seconds and peak RSS."""
    from pipelines.backends.torch.backend import TorchBackend
    from pipelines.jobs.factors.apply import apply_factors
    from pipelines.jobs.factors.train import FactorConfig, train_factors

    TorchBackend("minilm", "cpu")  # imports and the model's first load, before the reset
    reset = _reset_peak()
    start = time.perf_counter()
    if step == "train":
        config = FactorConfig(device="cpu", n_factors=args.n_factors, sparsity=args.sparsity,
                              batch_tokens=args.batch_tokens)
        manifest = train_factors([corpus], out, config, progress=False)
        tokens, rows = manifest["rows"]["tokens"], manifest["rows"]["rows"]
    else:
        manifest = apply_factors(dictionary, [corpus], out, device="cpu",
                                 shard_tokens=args.shard_tokens,
                                 batch_tokens=args.batch_tokens, progress=False)
        tokens, rows = manifest["counts"]["tokens"], manifest["counts"]["factor_activations"]
    print(json.dumps({"tokens": tokens, "rows": rows, "seconds": time.perf_counter() - start,
                      "peak_kb": _memory_kb()["VmHWM"], "reset": reset}))


def spawn(step: str, corpus: Path, out: Path, dictionary: Path,
          args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--n-factors",
               str(args.n_factors), "--sparsity", str(args.sparsity), "--shard-tokens",
               str(args.shard_tokens), "--batch-tokens", str(args.batch_tokens),
               "--child", step,
               str(corpus), str(out), str(dictionary)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{step} child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_corpora(work: Path, docs: int, scale: int) -> tuple[Path, Path]:
    rows = paragraphs()[:docs]
    small, large = work / "1x.jsonl", work / f"{scale}x.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    large.write_text("".join(json.dumps({"id": f"{r['id']}~{copy}", "text": r["text"]}) + "\n"
                             for copy in range(scale) for r in rows))
    return small, large


def run(args: argparse.Namespace, work: Path) -> None:
    small, large = write_corpora(work, args.docs, args.scale)
    print(f"minilm on CPU, all 7 hidden-state layers, {args.n_factors} factors, λ "
          f"{args.sparsity}; batches of {args.batch_tokens} tokens, apply's shards of "
          f"{args.shard_tokens}; each job in its own process")
    print_allocator_settings()
    results = {}
    for step in ("train", "apply"):
        for corpus in (small, large):
            if step == "train" and corpus == large and args.apply_only:
                continue
            out = work / f"{step}-{corpus.stem}"
            results[(step, corpus.stem)] = report = spawn(step, corpus, out,
                                                          work / "train-1x", args)
            unit = "rows" if step == "train" else "codes"
            print(f"  {step:5s} {corpus.stem}: {report['tokens']:7,} tokens "
                  f"({report['rows']:,} {unit}) in {report['seconds']:6.1f} s = "
                  f"{report['tokens'] / report['seconds']:6,.0f} tok/s; peak RSS "
                  f"{report['peak_kb'] / 1024:,.0f} MB")
    for step in ("apply",) if args.apply_only else ("train", "apply"):
        ratio = results[(step, large.stem)]["peak_kb"] / results[(step, "1x")]["peak_kb"]
        print(f"  {step}: {args.scale}× / 1× peak RSS = {ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(*args.child, args)
        return 0
    with tempfile.TemporaryDirectory(prefix="headscope-factors-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
