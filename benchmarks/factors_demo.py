"""Transformer factors on the demo corpus: reconstruction error and sparsity per layer.

Trains MiniLM dictionaries on the demo paragraphs (`pipelines.jobs.demo.paragraphs()`), once with
signed atoms (the default) and once with non-negative atoms (``--nonneg-dict``); the codes are
non-negative in both. For each hidden-state layer it prints the relative reconstruction error
‖x − αΦ‖² / ‖x‖² and the mean number of active factors per token, as the final evaluation pass
of `train_factors` measured them (a zero code has error 1.0). It reports and never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from smoke import parse_args_with_smoke

from pipelines.jobs.demo import write_corpus
from pipelines.jobs.factors.train import FactorConfig, train_factors

VARIANTS = {"signed atoms": False, "atoms ≥ 0": True}


#: --smoke: a tiny input, the same code path
SMOKE = {"docs": 8, "n_factors": 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="first N paragraphs (all 940)")
    parser.add_argument("--n-factors", type=int, default=512, help="dictionary size (512)")
    parser.add_argument("--sparsity", type=float, default=0.1, help="λ (default 0.1)")
    parser.add_argument("--model", default="minilm", help="registry name or folder (minilm)")
    args = parse_args_with_smoke(parser, argv, SMOKE)
    return args


def train(corpus: Path, out: Path, args: argparse.Namespace, nonneg_dict: bool) -> dict:
    config = FactorConfig(model=args.model, device="cpu", n_factors=args.n_factors,
                          sparsity=args.sparsity, nonneg_dict=nonneg_dict)
    return train_factors([corpus], out, config, progress=False)


def by_layer(evaluation: dict, key: str, layer: str) -> float:
    return evaluation[key] if layer == "all" else evaluation[f"{key}_by_layer"][layer]


def report(results: dict[str, dict]) -> None:
    names = list(results)
    evaluations = [results[name]["evaluation"] for name in names]
    first = evaluations[0]
    print(f"  {'layer':>5} {'rows':>8}" + "".join(f"  {name + ': error':>20} {'active':>6}"
                                                 for name in names)
          + f"  {'floor for atoms ≥ 0':>20}")
    for layer in [*first["rows_by_layer"], "all"]:
        rows = (sum(first["rows_by_layer"].values()) if layer == "all"
                else first["rows_by_layer"][layer])
        line = f"  {layer:>5} {rows:>8,}"
        for evaluation in evaluations:
            line += (f"  {by_layer(evaluation, 'relative_error', layer):>20.3f}"
                     f" {by_layer(evaluation, 'mean_active', layer):>6.1f}")
        print(line + f"  {by_layer(first, 'nonneg_floor', layer):>20.3f}")
    print("  error = ‖x − αΦ‖² / ‖x‖² over the layer's rows; active = mean non-zero codes per"
          " token;\n  floor = ‖min(x, 0)‖² / ‖x‖², the least error non-negative atoms and codes"
          " can reach")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headscope-factors-demo-") as tmp:
        corpus = Path(tmp) / "demo.jsonl"
        docs = write_corpus(corpus, args.docs)
        results = {}
        for name, nonneg in VARIANTS.items():
            results[name] = manifest = train(corpus, Path(tmp) / name, args, nonneg)
            print(f"{name}: trained in {manifest['training']['seconds']:.0f} s", file=sys.stderr)
    first = next(iter(results.values()))
    print(f"{args.model} on CPU over {docs} demo paragraphs: {first['rows']['tokens']:,} "
          f"tokens, {first['rows']['rows']:,} rows; {args.n_factors} factors, λ "
          f"{args.sparsity}, {first['config']['epochs']} epoch; codes ≥ 0 in both")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
