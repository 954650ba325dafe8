"""Recognising "out of space" in every form a write failure takes (the CLI's exit code 74).

The forms are those the libraries produce: Python's OSError, pyarrow's (the errno in the
exception, or only in its message's "Detail: [errno N]"), Rust's io::Error text (safetensors),
and a traceback made in another process (Ray). A real full disk: tests/integration/
test_disk_full.py.
"""

from __future__ import annotations

import errno

import pyarrow as pa
import pytest

from pipelines.dataset.writer import NoSpaceError, no_space

PYARROW = "Error writing bytes to file. Detail: [errno 28] No space left on device"
RAY_TRACEBACK = (  # the last lines of a Ray task error's text
    "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    "\n\nThe above exception was the direct cause of the following exception:\n\n"
    "pipelines.dataset.writer.NoSpaceError: [Errno 28] No space left on device: "
    "'/data/out/attention/part-00004.parquet'\n"
    "ray.exceptions.UserCodeException: UDF failed to process a data block.")


def caused(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


class RayTaskError(Exception):
    """Ray's error of a remote task keeps the remote exception in ``cause``."""

    def __init__(self, text: str, cause: BaseException) -> None:
        super().__init__(text)
        self.cause = cause


#: name → (exception, errno and file the CLI reports)
FOUND: dict[str, tuple[BaseException, int, str | None]] = {
    "python": (OSError(errno.ENOSPC, "No space left on device", "/d/x.json"), 28, "/d/x.json"),
    "quota": (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT, None),
    "pyarrow": (OSError(errno.ENOSPC, PYARROW), 28, None),
    "pyarrow-errno-in-text-only": (pa.ArrowInvalid(PYARROW), 28, None),
    "safetensors": (RuntimeError("Error while serializing: I/O error: Disk quota exceeded "
                                 "(os error 122)"), errno.EDQUOT, None),
    "wrapped": (caused(RuntimeError("export failed"), OSError(28, "No space", "/d/m.onnx")),
                28, "/d/m.onnx"),
    "ray-cause": (RayTaskError("task failed", OSError(28, "No space", "/d/p.parquet")), 28,
                  "/d/p.parquet"),
    "ray-traceback": (RuntimeError(RAY_TRACEBACK), 28, "/data/out/attention/part-00004.parquet"),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_out_of_space_is_found_with_its_file(name: str) -> None:
    exc, code, filename = FOUND[name]
    found = no_space(exc)
    assert isinstance(found, NoSpaceError)
    assert (found.errno, found.filename) == (code, filename)
    assert found.strerror == {28: "No space left on device",
                              errno.EDQUOT: "Disk quota exceeded"}[code]


@pytest.mark.parametrize("exc", [
    PermissionError(errno.EACCES, "Permission denied", "/d"),
    OSError(errno.EIO, "Input/output error [errno 5]"),
    ValueError("bad value"),
    caused(RuntimeError("no space? no: errno 28 without brackets"), KeyError("x")),
], ids=["permission", "io-error", "value-error", "unrelated-chain"])
def test_other_failures_are_not_out_of_space(exc: BaseException) -> None:
    assert no_space(exc) is None


def test_a_cycle_of_causes_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert no_space(first) is None
