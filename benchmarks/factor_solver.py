"""Why FISTA in torch: its codes against scikit-learn's lasso on the same rows, one run.

Rows are MiniLM-sized (d = 384) unit vectors made from a random dictionary of k atoms with a
few active each, plus noise; both solvers encode them with the same dictionary and λ (the
positive lasso of ``pipelines/factors/solver.py``; scikit-learn's ``sparse_encode`` with
``lasso_cd`` and ``positive=True``). scikit-learn gets fewer rows (it is slower); rates are
rows per second. It reports and never asserts.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from sklearn.decomposition import sparse_encode

from pipelines.factors.solver import encode, objective


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factors", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rows", type=int, default=4096, help="rows for FISTA (4096)")
    parser.add_argument("--sklearn-rows", type=int, default=256, help="rows for scikit-learn")
    parser.add_argument("--sparsity", type=float, default=0.1)
    return parser.parse_args(argv)


def problem(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(args.factors, args.dim, generator=generator)
    atoms /= atoms.norm(dim=1, keepdim=True)
    codes = torch.zeros(args.rows, args.factors)
    chosen = torch.rand(args.rows, args.factors, generator=generator).argsort(dim=1)[:, :20]
    codes.scatter_(1, chosen, torch.rand(args.rows, 20, generator=generator))
    rows = codes @ atoms + 0.05 * torch.randn(args.rows, args.dim, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True), atoms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, atoms = problem(args)
    print(f"{args.factors} factors × {args.dim} dims, λ {args.sparsity}, "
          f"torch threads {torch.get_num_threads()}")
    encode(rows[:64], atoms, args.sparsity)  # warm-up
    start = time.perf_counter()
    ours = encode(rows, atoms, args.sparsity)
    fista_s = time.perf_counter() - start
    sample = rows[:args.sklearn_rows]
    start = time.perf_counter()
    theirs = sparse_encode(sample.numpy(), atoms.numpy(), algorithm="lasso_cd",
                           alpha=args.sparsity, positive=True)
    sklearn_s = time.perf_counter() - start
    fista_rate, sklearn_rate = len(rows) / fista_s, len(sample) / sklearn_s
    active = float((ours > 0).sum(dim=1).float().mean())
    gap = (objective(sample, ours[:len(sample)], atoms, args.sparsity)
           - objective(sample, torch.from_numpy(theirs), atoms, args.sparsity))
    print(f"  FISTA (torch)          {fista_rate:9,.0f} rows/s ({len(rows)} rows, "
          f"{active:.1f} active per row)")
    print(f"  scikit-learn lasso_cd  {sklearn_rate:9,.0f} rows/s ({len(sample)} rows)")
    print(f"  FISTA / scikit-learn = x{fista_rate / sklearn_rate:.1f}; objective difference "
          f"(FISTA − sklearn) mean {float(gap.mean()):+.2e}, max {float(gap.max()):+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
