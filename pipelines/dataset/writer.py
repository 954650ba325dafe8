"""A write-once Parquet dataset folder with atomic shard writes and resume.

Layout::

    DIR/manifest.json              how the dataset was made (written first, completed last)
    DIR/<table>/part-00000.parquet one part per shard and table, rows sorted by the table's keys
    DIR/head_summary/part-00000.parquet
    DIR/_shards/00000.json         written after all parts of a shard: the shard is finished

A file appears only complete (written to a temporary name, then renamed). Temporary names
start with ``.tmp-`` (hidden: pandas and pyarrow skip them) and end with ``.tmp``, so that a
``*.parquet`` glob of DuckDB or Polars, which do read hidden files, never matches one. A
shard without a marker is rewritten on resume, so no row is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = temp_file(path)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    publish(tmp, path)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=False, default=str).encode())


def atomic_write_parquet(path: Path, table: pa.Table, row_group_rows: int) -> None:
    fd, tmp = temp_file(path)
    os.close(fd)
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd",
                   use_dictionary=strings, write_statistics=True)
    publish(tmp, path)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class DatasetWriter:
    """Writes one dataset folder; see the module docstring for the layout."""

    def __init__(self, root: str | Path,
                 specs: Mapping[str, schema.TableSpec] | None = None) -> None:
        """``specs``: the tables a job may write, by name (default: the core tables; a corpus
        job passes ``pipelines.analysis.registry.table_specs(its analyses)``)."""
        self.root = Path(root)
        self.specs = dict(schema.CORE_TABLE_SPECS if specs is None else specs)

    def check(self, resume: bool = False, overwrite: bool = False) -> None:
        """Fail early (before any model is loaded) if the folder cannot be used as asked."""
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{self.root} is a file; --out must be a folder")
        if resume and not (self.root / MANIFEST).is_file():
            raise OutputError(f"{self.root}: nothing to resume (no {MANIFEST})")
        if resume or not self.root.exists() or not any(self.root.iterdir()):
            return
        if not overwrite:
            raise OutputError(
                f"{self.root} is not empty; pass --resume to finish an interrupted job, "
                "--overwrite to replace it, or choose another --out"
            )
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
        for name, table in tables.items():
            atomic_write_parquet(self.root / name / part_name(shard), table,
                                 self.specs[name].row_group_rows)
        counts = {name: table.num_rows for name, table in tables.items()
                  if not self.specs[name].hidden}
        atomic_write_json(self.root / SHARDS / f"{shard:05d}.json", counts)
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
    if not (root / MANIFEST).is_file():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / MANIFEST, {**manifest, "status": "open"})
    name = f"part-{part_id}.parquet"
    for table_name, table in tables.items():
        atomic_write_parquet(root / table_name / name, table, row_group_rows[table_name])
    return {table_name: table.num_rows for table_name, table in tables.items()}
