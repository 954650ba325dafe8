"""``--smoke``, shared by every benchmark: the same code path on a tiny input (make bench-smoke)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def work_folder(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh temporary folder for a benchmark's files, removed afterwards unless ``keep``
    (then its path is printed)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
