"""A real, tiny file system for one shell script: a tmpfs that fills up like a full disk.

The script runs inside a private mount namespace where a tmpfs of the given size is mounted
on ``TinyDisk.mount``: ``unshare -rm`` (a user namespace, so no privileges are needed where
the kernel allows them), else ``unshare -m`` as root, else a plain mount as root that the
script unmounts when it ends. The mount exists only while the script runs, so a script does
all its steps (run, look, ``mount -o remount,size=...``, rerun) and copies out what the test
reads. Without any of the three, ``TinyDisk.create`` skips the test, saying why.

Shared by tests (imported as a plain module, like ``conftest``).
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CLI, Outcome

#: How a mount namespace is entered, best first (None: in this namespace, unmounting at exit).
ENTRIES: tuple[tuple[str, ...] | None, ...] = (("unshare", "-rm"), ("unshare", "-m"), None)


def _wrap(entry: tuple[str, ...] | None, mount: Path, size: str, script: str) -> list[str]:
    """The command that runs ``script`` with a ``size`` tmpfs on ``mount``."""
    target = shlex.quote(str(mount))
    setup = f"mount -t tmpfs -o size={size} tmpfs {target} || exit 97\n"
    if entry is None:
        setup += f"trap 'umount {target}' EXIT\n"
    return [*(entry or ()), "sh", "-c", setup + script]


@functools.cache
def _entry() -> tuple[str, ...] | None | str:
    """The first way to mount a tmpfs that works here, or why none does."""
    with tempfile.TemporaryDirectory() as probe:
        for entry in ENTRIES:
            if entry is None and os.geteuid() != 0:
                continue
            done = subprocess.run(_wrap(entry, Path(probe), "64k", "exit 0"),
                                  capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                return entry
    return ("cannot mount a tmpfs: unshare -rm is refused (user namespaces disabled?) and "
            "this is not root")


@dataclass(frozen=True)
class TinyDisk:
    """A mount point and the size of the tmpfs a script gets on it."""

    mount: Path
    size: str
    entry: tuple[str, ...] | None

    @classmethod
    def create(cls, mount: Path, size: str) -> TinyDisk:
        """An empty folder to mount on; skips the test where no tmpfs can be mounted."""
        entry = _entry()
        if isinstance(entry, str):
            pytest.skip(entry)
        mount.mkdir(parents=True)
        return cls(mount, size, entry)

    def run(self, script: str, timeout: float = 900) -> None:
        """Run ``script`` (sh) with the tmpfs mounted; fail the test if the script fails."""
        done = subprocess.run(_wrap(self.entry, self.mount, self.size, script),
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1"})
        assert done.returncode == 0, f"script failed ({done.returncode}): {done.stderr[-3000:]}"


def cli_line(args: list[str | Path], logs: Path, name: str) -> str:
    """A script line running ``headscope ARGS``; :func:`step` reads what it did."""
    command = shlex.join([*CLI, *map(str, args)])
    out = shlex.quote(str(logs / name))
    return f"{command} >{out}.out 2>{out}.err; echo $? >{out}.rc"


def step(logs: Path, name: str) -> Outcome:
    """What the command that :func:`cli_line` named ``name`` did."""
    read = functools.partial(Path.read_text, encoding="utf-8")
    return Outcome(int(read(logs / f"{name}.rc")), read(logs / f"{name}.out"),
                read(logs / f"{name}.err"))
