"""A write-once Parquet dataset folder with atomic shard writes and resume.

Layout::

    DIR/manifest.json              how the dataset was made (written first, completed last)
    DIR/<table>/part-00000.parquet one part per shard and table, rows sorted by the table's keys
    DIR/head_summary/part-00000.parquet
    DIR/_shards/00000.json         written after all parts of a shard: the shard is finished

A file appears only complete (written to a temporary name, then renamed); a write that fails
(a full disk) removes its temporary file and the shard's other parts. Temporary names start
with ``.tmp-`` (hidden: pandas and pyarrow skip them) and end with ``.tmp``, so that a
``*.parquet`` glob of DuckDB or Polars, which do read hidden files, never matches one. A
shard without a marker is rewritten on resume, so no row is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.dataset import schema
from pipelines.dataset.summaries import stats_summary

MANIFEST = "manifest.json"
SHARDS = "_shards"
#: Called when a job finishes with the dataset folder and the corpus-level tables so far
#: (``head_summary`` first); adds or replaces tables in that dict.
Finaliser = Callable[[Path, dict[str, pa.Table]], None]


class OutputError(ValueError):
    """The output folder cannot be used as asked."""


#: The process umask, read once at import (os.umask is the only portable way to read it).
UMASK = os.umask(0o022)
os.umask(UMASK)
#: Temporary files: ``.tmp-<random><suffix>.tmp``; a ``*.parquet`` glob never matches one.
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".tmp"


def temp_file(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (descriptor, name), named per ``TEMP_PREFIX``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX,
                            suffix=path.suffix + TEMP_SUFFIX)


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temporary file the usual permissions and move it into place."""
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates files readable by their owner only
    os.replace(tmp, path)


#: errno values meaning the file system has no room left: no space, or the user's quota is spent.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: How errno appears in a message when a library keeps it only there: pyarrow ("Detail:
#: [errno 28] ..."), Rust's io::Error ("(os error 28)", safetensors), and a traceback
#: made elsewhere (Ray: "[Errno 28] No space left on device: '<file>'").
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\](?:[^\n']*?: '([^'\n]+)')?|\(os error (\d+)\)",
                            re.IGNORECASE)


class NoSpaceError(OSError):
    """The file system, or the user's quota, had no room for ``filename``."""


def no_space(exc: BaseException) -> NoSpaceError | None:
    """If ``exc``, or what it wraps, says the space ran out: that error as a NoSpaceError
    (naming the file when known); otherwise None."""
    chain = _wrapped(exc)
    for error in chain:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return NoSpaceError(error.errno, os.strerror(error.errno), error.filename)
    for error in chain:  # the errno is only in a message
        quoted = [(int(code or rust), name) for code, name, rust
                  in _ERRNO_IN_TEXT.findall(str(error)) if int(code or rust) in NO_SPACE]
        if quoted:  # a traceback prints the outermost error, naming our file, last
            code, name = ([q for q in quoted if q[1]] or quoted)[-1]
            return NoSpaceError(code, os.strerror(code), name or None)
    return None


def _wrapped(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``__cause__``, ``__context__``, Ray's ``cause``."""
    found: list[BaseException] = []
    todo: list[object] = [exc]
    while todo:
        error = todo.pop(0)
        if isinstance(error, BaseException) and all(error is not e for e in found):
            found.append(error)
            todo += [error.__cause__, error.__context__, getattr(error, "cause", None)]
    return found


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` to write; moved onto ``path`` when the block ends.

    If anything fails, the temporary file is removed; running out of space (however the
    library writing reports it) is raised as a NoSpaceError naming ``path``.
    """
    tmp = None
    try:
        fd, tmp = temp_file(path)
        os.close(fd)
        yield tmp
        publish(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        full = no_space(exc)
        if full is not None and not isinstance(exc, NoSpaceError):
            raise NoSpaceError(full.errno, full.strerror, str(path)) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=False, default=str).encode())


def atomic_write_parquet(path: Path, table: pa.Table, row_group_rows: int) -> None:
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    with replacing(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd",
                       use_dictionary=strings, write_statistics=True)


def same_format(root: Path, previous: dict, manifest: dict, action: str, advice: str) -> None:
    """Refuse to ``action`` a folder written in another format: its parts and the new ones
    would have different schemas (format 1 stored integer columns unsigned)."""
    found, writes = previous.get("format"), manifest["format"]
    if found != writes:
        raise OutputError(
            f"{root}: cannot {action}: it holds format {found!r} and this headscope writes "
            f"{writes!r}, with other column types; one folder cannot mix them. {advice} "
            "(headscope still reads the old folder)"
        )


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class DatasetWriter:
    """Writes one dataset folder; see the module docstring for the layout."""

    def __init__(self, root: str | Path,
                 specs: Mapping[str, schema.TableSpec] | None = None,
                 resumable: bool = True) -> None:
        """``specs``: the tables a job may write, by name (default: the core tables; a corpus
        job passes ``pipelines.analysis.registry.table_specs(its analyses)``);
        ``resumable``: whether the command has ``--resume`` (its errors offer it)."""
        self.root = Path(root)
        self.specs = dict(schema.CORE_TABLE_SPECS if specs is None else specs)
        self.resumable = resumable

    def check(self, resume: bool = False, overwrite: bool = False) -> None:
        """Fail early (before any model is loaded) if the folder cannot be used as asked."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{self.root} is a file; --out must be a folder")
        if resume and not (self.root / MANIFEST).is_file():
            raise OutputError(f"{self.root}: nothing to resume (no {MANIFEST})")
        if resume or not self.root.exists() or not any(self.root.iterdir()):
            return
        if not overwrite:
            resume_hint = "pass --resume to finish an interrupted job, " if self.resumable \
                else "pass "
            raise OutputError(f"{self.root} is not empty; {resume_hint}--overwrite to replace "
                              "it, or choose another --out")
        if not (self.root / MANIFEST).is_file():
            raise OutputError(
                f"{self.root} is not empty and is not a headscope dataset (no {MANIFEST}); "
                "refusing to delete it"
            )

    def open(self, manifest: dict, resume: bool = False, overwrite: bool = False) -> set[int]:
        """Prepare the folder; return the shards already finished (only when resuming)."""
        self.check(resume, overwrite)
        existing = self.root / MANIFEST
        if resume:
            previous = json.loads(existing.read_text())
            same_format(self.root, previous, manifest, "resume",
                        "Run the job again into a new --out, or with --overwrite")
            if previous.get("job_key") != manifest["job_key"]:
                raise OutputError(
                    f"{self.root}: cannot resume: it was made with other inputs, model or "
                    "settings (job_key differs); use a new --out or --overwrite"
                )
            manifest["created"] = previous.get("created", manifest["created"])
            self._clean_unfinished()
        elif existing.is_file():
            shutil.rmtree(self.root)  # --overwrite of a dataset (check() allowed it)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(existing, manifest)
        return self.finished_shards()

    def finished_shards(self) -> set[int]:
        folder = self.root / SHARDS
        return {int(p.stem) for p in folder.glob("[0-9]*.json")} if folder.is_dir() else set()

    def _clean_unfinished(self) -> None:
        """Temporary files anywhere, and the parts of unfinished shards in every table
        folder (tables written when the job finishes are rewritten then)."""
        finished = {part_name(s) for s in self.finished_shards()}
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            spec = self.specs.get(folder.name)
            shard_parts = folder.name != SHARDS and (spec is None or spec.per_shard)
            for path in folder.iterdir():
                unfinished_part = (path.name.startswith("part-") and path.suffix == ".parquet"
                                   and path.name not in finished)
                if path.name.startswith(TEMP_PREFIX) or (shard_parts and unfinished_part):
                    path.unlink()

    def write_shard(self, shard: int, tables: dict[str, pa.Table]) -> dict[str, int]:
        """Write every table of one shard, then its marker; return row counts."""
        missing = [name for name in schema.TABLES if name not in tables]
        unknown = [name for name in tables
                   if name not in self.specs or not self.specs[name].per_shard]
        if missing or unknown:
            raise ValueError(f"shard tables: missing {missing}, unknown {unknown}")
        parts = [self.root / name / part_name(shard) for name in tables]
        counts = {name: table.num_rows for name, table in tables.items()
                  if not self.specs[name].hidden}
        try:
            for part, (name, table) in zip(parts, tables.items(), strict=True):
                atomic_write_parquet(part, table, self.specs[name].row_group_rows)
            atomic_write_json(self.root / SHARDS / f"{shard:05d}.json", counts)
        except BaseException:  # e.g. a full disk: leave only finished shards behind
            for part in parts:
                part.unlink(missing_ok=True)
            raise
        return counts

    def shard_counts(self) -> dict[str, int]:
        totals = dict.fromkeys(schema.TABLES, 0)
        for path in (self.root / SHARDS).glob("[0-9]*.json"):
            for name, count in json.loads(path.read_text()).items():
                totals[name] = totals.get(name, 0) + count
        return totals

    def finish(self, manifest: dict, finalisers: Iterable[Finaliser] = ()) -> None:
        """Write the corpus-level tables (``head_summary``, and whatever ``finalisers`` add)
        and the completed manifest."""
        finals = {"head_summary": stats_summary(self.root / "head_stats")}
        for finalise in finalisers:
            finalise(self.root, finals)
        for name, table in finals.items():
            atomic_write_parquet(self.root / name / part_name(0), table, 65536)
        manifest["counts"] = {**self.shard_counts(),
                              **{name: table.num_rows for name, table in finals.items()}}
        manifest["status"] = "complete"
        self.finish_manifest(manifest)

    def finish_manifest(self, manifest: dict) -> None:
        """Replace the manifest (last, so a complete manifest means a complete dataset)."""
        atomic_write_json(self.root / MANIFEST, manifest)


def append_parts(root: str | Path, part_id: str, tables: dict[str, pa.Table],
                 manifest: dict, row_group_rows: Mapping[str, int]) -> dict[str, int]:
    """Add one part per table to an open-ended dataset (the service's ``store``).

    The manifest is written once, when the folder is new; each part file appears atomically
    under a name no other writer uses, so concurrent writers never clash.
    """
    root = Path(root)
    if (root / MANIFEST).is_file():
        same_format(root, json.loads((root / MANIFEST).read_text()), manifest, "append to it",
                    "Move the folder away to start a new one")
    else:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / MANIFEST, {**manifest, "status": "open"})
    name = f"part-{part_id}.parquet"
    for table_name, table in tables.items():
        atomic_write_parquet(root / table_name / name, table, row_group_rows[table_name])
    return {table_name: table.num_rows for table_name, table in tables.items()}
