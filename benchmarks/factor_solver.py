"""Why FISTA in torch, and how many steps: codes of real hidden states, one run.

Rows are MiniLM's hidden states (all 7 layers, unit length) of demo paragraphs; the dictionary
is ``--factors`` of those rows drawn at random (how training starts). FISTA runs with several
step limits and is compared with its own converged solution (float64, duality gap at most 1e-9
of the objective), and with scikit-learn's ``sparse_encode`` (``lasso_cd``, ``positive=True``)
on the same rows, dictionary and λ. Rates are rows per second. It reports and never asserts.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from sklearn.decomposition import sparse_encode
from smoke import parse_args_with_smoke

from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.sparse_coding import encode, objective
from pipelines.config import WindowConfig
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.factors.hidden import token_rows
from pipelines.text.tokenize import Document, Windower

#: --smoke: a tiny input, the same code path
SMOKE = {"paragraphs": 10, "factors": 64, "rows": 256, "sklearn_rows": 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factors", type=int, default=512)
    parser.add_argument("--rows", type=int, default=2048, help="rows for FISTA (2048)")
    parser.add_argument("--sklearn-rows", type=int, default=256, help="rows for scikit-learn")
    parser.add_argument("--sparsity", type=float, default=0.1)
    parser.add_argument("--paragraphs", type=int, default=60,
                        help="demo paragraphs the rows come from (60)")
    args = parse_args_with_smoke(parser, argv, SMOKE)
    return args


def problem(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden-state rows [rows, 384] and a dictionary [factors, 384] drawn from them."""
    backend = TorchBackend("minilm", "cpu")
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    windows = [w for row in paragraphs()[:args.paragraphs]
               for w in windower.windows(Document(row["id"], row["text"]))]
    rows = torch.cat([r.vectors for r in token_rows(backend, windows, tuple(range(7)), 8192)])
    generator = torch.Generator().manual_seed(0)
    atoms = rows[torch.randint(len(rows), (args.factors,), generator=generator)]
    return rows[torch.randperm(len(rows), generator=generator)[:args.rows]], atoms


def timed(function, *arguments, **options):
    start = time.perf_counter()
    result = function(*arguments, **options)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, atoms = problem(args)
    sparsity = args.sparsity
    print(f"{len(rows)} MiniLM hidden-state rows, {args.factors} factors drawn from them, "
          f"λ {sparsity}, torch threads {torch.get_num_threads()}")
    best = encode(rows.double(), atoms.double(), sparsity, steps=5000, tol=1e-9).float()
    floor = objective(rows, best, atoms, sparsity)  # [n]
    print(f"  converged: {float((best > 0).sum(dim=1).float().mean()):.1f} active per row")
    rates = {}
    for steps in (50, 100, 300):
        codes, seconds = timed(encode, rows, atoms, sparsity, steps=steps)
        gap = (objective(rows, codes, atoms, sparsity) - floor) / floor
        rates[steps] = len(rows) / seconds
        print(f"  FISTA ≤{steps:3d} steps {rates[steps]:8,.0f} rows/s; objective above the "
              f"converged one by {float(gap.mean()):.1e} on average, {float(gap.max()):.1e} "
              f"at most; {float((codes > 0).sum(dim=1).float().mean()):.1f} active per row")
    sample = rows[:args.sklearn_rows]
    theirs, seconds = timed(sparse_encode, sample.numpy(), atoms.numpy(), algorithm="lasso_cd",
                            alpha=sparsity, positive=True)
    gap = (objective(sample, torch.from_numpy(theirs), atoms, sparsity) - floor[:len(sample)]) \
        / floor[:len(sample)]
    sklearn_rate = len(sample) / seconds
    print(f"  scikit-learn lasso_cd  {sklearn_rate:8,.0f} rows/s ({len(sample)} rows); "
          f"objective above the converged one by {float(gap.mean()):.1e} on average")
    for steps, rate in rates.items():
        print(f"  FISTA ≤{steps} steps / scikit-learn = x{rate / sklearn_rate:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
