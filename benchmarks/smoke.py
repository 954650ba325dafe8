"""``--smoke``, shared by every benchmark: the same code path on a tiny input (make bench-smoke)."""

from __future__ import annotations

import argparse


def parse_args_with_smoke(parser: argparse.ArgumentParser, argv: list[str] | None,
                          smoke: dict[str, object]) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke`` the ``smoke`` sizes become the defaults (options
    given on the command line still win)."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"quick check of the same code path on a tiny input: {smoke}")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args
