"""A write-once Parquet dataset folder with atomic shard writes and resume.

Layout::

    DIR/manifest.json              how the dataset was made (written first, completed last)
    DIR/<table>/part-00000.parquet one part per shard and table, rows sorted by the table's keys
    DIR/head_summary/part-00000.parquet
    DIR/_shards/00000.json         written after all parts of a shard: the shard is finished

A file appears only complete (written to a temporary name, then renamed). A shard without a
marker is rewritten on resume, so no row is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.analysis.patterns import PATTERN_CLASSES
from pipelines.compute.similarity import coordinates
from pipelines.compute.stats import STAT_NAMES
from pipelines.dataset import schema

MANIFEST = "manifest.json"
SHARDS = "_shards"
#: Tables written once, when a job finishes.
FINAL_TABLES = ("head_summary", "head_similarity", "head_coords")


class OutputError(ValueError):
    """The output folder cannot be used as asked."""


#: The process umask, read once at import (os.umask is the only portable way to read it).
UMASK = os.umask(0o022)
os.umask(UMASK)


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temporary file the usual permissions and move it into place."""
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates files readable by their owner only
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    publish(tmp, path)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=False, default=str).encode())


def atomic_write_parquet(path: Path, table: pa.Table, row_group_rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd",
                   use_dictionary=strings, write_statistics=True)
    publish(tmp, path)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class DatasetWriter:
    """Writes one dataset folder; see the module docstring for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

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
        finished = {part_name(s) for s in self.finished_shards()}
        for name in (*schema.SHARD_TABLES, *FINAL_TABLES, SHARDS):
            folder = self.root / name
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                unfinished_part = path.suffix == ".parquet" and path.name not in finished
                if path.name.startswith(".tmp-") or (name in schema.SHARD_TABLES
                                                     and unfinished_part):
                    path.unlink()

    def write_shard(self, shard: int, tables: dict[str, pa.Table]) -> dict[str, int]:
        """Write every table of one shard, then its marker; return row counts."""
        missing = [name for name in schema.TABLES if name not in tables]
        unknown = [name for name in tables if name not in schema.SHARD_TABLES]
        if missing or unknown:
            raise ValueError(f"shard tables: missing {missing}, unknown {unknown}")
        for name, table in tables.items():
            atomic_write_parquet(self.root / name / part_name(shard), table,
                                 schema.ROW_GROUP_ROWS[name])
        counts = {name: table.num_rows for name, table in tables.items()
                  if name != schema.SIMILARITY_PARTS}
        atomic_write_json(self.root / SHARDS / f"{shard:05d}.json", counts)
        return counts

    def shard_counts(self) -> dict[str, int]:
        totals = dict.fromkeys(schema.TABLES, 0)
        for path in (self.root / SHARDS).glob("[0-9]*.json"):
            for name, count in json.loads(path.read_text()).items():
                totals[name] = totals.get(name, 0) + count
        return totals

    def finish(self, manifest: dict) -> None:
        """Write the corpus-level tables and the completed manifest."""
        finals = {"head_summary": head_summary(self.root / "head_stats",
                                               self.root / "head_patterns")}
        if (self.root / schema.SIMILARITY_PARTS).is_dir():
            finals.update(merge_similarity(self.root / schema.SIMILARITY_PARTS))
        for name, table in finals.items():
            atomic_write_parquet(self.root / name / part_name(0), table, 65536)
        manifest["counts"] = {**self.shard_counts(),
                              **{name: table.num_rows for name, table in finals.items()}}
        manifest["status"] = "complete"
        self.finish_manifest(manifest)

    def finish_manifest(self, manifest: dict) -> None:
        """Replace the manifest (last, so a complete manifest means a complete dataset)."""
        atomic_write_json(self.root / MANIFEST, manifest)


def merge_similarity(parts_dir: Path) -> dict[str, pa.Table]:
    """``head_similarity`` (row-weighted mean over the shards) and ``head_coords`` (2-D MDS)."""
    parts = pq.read_table(parts_dir).to_pandas()
    keys = ["layer_a", "head_a", "layer_b", "head_b"]
    parts = parts[parts["n_rows"] > 0]
    parts["weighted"] = parts["js_distance"].astype(np.float64) * parts["n_rows"]
    merged = parts.groupby(keys, sort=True)[["weighted", "n_rows"]].sum().reset_index()
    merged["js_distance"] = (merged["weighted"] / merged["n_rows"]).astype(np.float32)
    table = pa.Table.from_pandas(merged[[*keys, "js_distance", "n_rows"]],
                                 schema=schema.HEAD_SIMILARITY, preserve_index=False)
    if table.num_rows == 0:
        return {"head_similarity": table, "head_coords": schema.HEAD_COORDS.empty_table()}
    layers, heads = int(merged["layer_a"].max()) + 1, int(merged["head_a"].max()) + 1
    distance = merged["js_distance"].to_numpy(np.float64).reshape(layers * heads, -1)
    xy = coordinates(distance)
    layer, head = np.divmod(np.arange(layers * heads), heads)
    coords = pa.table({"layer": layer.astype(np.uint8), "head": head.astype(np.uint8),
                       "x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32)},
                      schema=schema.HEAD_COORDS)
    return {"head_similarity": table, "head_coords": coords}


def pattern_shares(patterns_dir: Path) -> pd.DataFrame | None:
    """Per (layer, head): the share of windows in each pattern class, or None."""
    if not patterns_dir.is_dir():
        return None
    frame = pq.read_table(patterns_dir, columns=["layer", "head", "pattern"]).to_pandas()
    if frame.empty:
        return None
    shares = pd.crosstab([frame["layer"], frame["head"]], frame["pattern"].astype(str),
                         normalize="index")
    shares = shares.reindex(columns=list(PATTERN_CLASSES), fill_value=0.0)
    shares.columns = [f"share_{name.replace('+', '_')}" for name in shares.columns]
    return shares.reset_index()


def head_summary(head_stats_dir: Path, patterns_dir: Path | None = None) -> pa.Table:
    """Per (layer, head) statistics summary, plus pattern-class shares where they exist."""
    table = stats_summary(head_stats_dir)
    shares = pattern_shares(patterns_dir) if patterns_dir is not None else None
    if shares is None or table.num_rows == 0:
        return table
    frame = table.to_pandas().merge(shares, on=["layer", "head"], how="left")
    return pa.Table.from_pandas(frame, preserve_index=False)


def stats_summary(head_stats_dir: Path) -> pa.Table:
    """Per (layer, head): mean and std of every statistic over all windows.

    Reads one part at a time and keeps running sums, so memory stays flat. Nulls (e.g.
    ``mass_sep`` of a GPT-2 model) are left out of a statistic's mean; all-null gives null.
    """
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    shape: tuple[int, int] | None = None
    windows = tokens = None
    for path in sorted(head_stats_dir.glob("part-*.parquet")):
        table = pq.read_table(path)
        if table.num_rows == 0:
            continue
        layer = table["layer"].to_numpy().astype(np.int64)
        head = table["head"].to_numpy().astype(np.int64)
        if shape is None:
            shape = (int(layer.max()) + 1, int(head.max()) + 1)
            windows, tokens = np.zeros(shape), np.zeros(shape)
        np.add.at(windows, (layer, head), 1)
        np.add.at(tokens, (layer, head), table["n_tokens"].to_numpy().astype(np.float64))
        for name in STAT_NAMES:
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
            present = ~np.isnan(values)
            for store, data in ((sums, values), (squares, values**2), (counts, present)):
                store.setdefault(name, np.zeros(shape))
                np.add.at(store[name], (layer[present], head[present]), data[present])
    if shape is None:
        return schema.HEAD_SUMMARY.empty_table()
    layer, head = (a.ravel() for a in np.meshgrid(np.arange(shape[0]), np.arange(shape[1]),
                                                  indexing="ij"))
    columns: dict[str, object] = {"layer": layer.astype(np.uint8), "head": head.astype(np.uint8),
                                  "n_windows": windows.ravel().astype(np.int64)}
    for name in STAT_NAMES:
        count = counts[name].ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums[name].ravel() / count
            var = np.maximum(squares[name].ravel() / count - mean**2, 0.0)
            std = np.sqrt(var * count / np.maximum(count - 1, 1))
        columns[f"{name}_mean"] = pa.array(mean, from_pandas=True)
        columns[f"{name}_std"] = pa.array(np.where(count > 1, std, np.nan), from_pandas=True)
    columns["n_tokens_mean"] = tokens.ravel() / windows.ravel()
    return pa.table(columns, schema=schema.HEAD_SUMMARY)


def append_parts(root: str | Path, part_id: str, tables: dict[str, pa.Table],
                 manifest: dict) -> dict[str, int]:
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
        atomic_write_parquet(root / table_name / name, table, schema.ROW_GROUP_ROWS[table_name])
    return {table_name: table.num_rows for table_name, table in tables.items()}
