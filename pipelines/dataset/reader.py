"""Reading a dataset back: thin helpers over ``pandas.read_parquet``.

Every table is a folder of Parquet parts, so plain pandas works too::

    pd.read_parquet("out/head_stats", filters=[("layer", "==", 3)])

A dataset of format 1 (unsigned integer columns) reads with the signed types of format 2, so
``key - query`` and ``layer - 1`` mean the same whichever headscope wrote it; plain pandas
gives such a dataset's stored, unsigned types.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from pipelines.dataset.formats import (
    ABLATION_FORMAT,
    COMPARE_FORMAT,
    DATASET_FORMAT,
    FACTOR_CODES_FORMAT,
    UNSIGNED_FORMATS,
)
from pipelines.dataset.schema import signed_schema
from pipelines.version import __version__

#: The formats whose tables read as they are stored.
CURRENT_FORMATS = (DATASET_FORMAT, ABLATION_FORMAT, FACTOR_CODES_FORMAT, COMPARE_FORMAT)


@dataclass
class Dataset:
    """A dataset folder written by a corpus job (or by the service's ``store``)."""

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> Self:
        root = Path(root)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not a headscope dataset (no manifest.json)")
        _unsigned(root, json.loads((root / "manifest.json").read_text()))  # a known format
        return cls(root)

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    def require_corpus(self, reader: str) -> Self:
        """This dataset when a corpus job (``headscope run``, or the service's store) wrote
        it; a ValueError naming ``reader`` and what wrote the folder otherwise."""
        found = self.manifest.get("format")
        if found not in (DATASET_FORMAT, *UNSIGNED_FORMATS):
            raise ValueError(f"{self.root} is a {found} folder, not a corpus dataset; "
                             f"{reader} reads the output of headscope run")
        return self

    @property
    def unsigned(self) -> bool:
        """Whether the dataset stored its integer columns unsigned (format 1; they read as
        signed); raises ValueError for a format this reader does not know."""
        return _unsigned(self.root, self.manifest)

    def table(self, name: str, filters: list | None = None,
              columns: list[str] | None = None) -> pd.DataFrame:
        """One table as a DataFrame; ``filters`` are pushed down to the Parquet scan."""
        present = sorted(p.name for p in self.root.iterdir()
                         if p.is_dir() and not p.name.startswith(("_", ".")))
        if name not in present:
            raise KeyError(f"no table {name!r} in {self.root}; tables: {', '.join(present)}")
        if self.unsigned:
            return _read_signed(self.root / name, filters, columns)
        return pd.read_parquet(self.root / name, filters=filters, columns=columns)

    def head_stats(self, **equals: object) -> pd.DataFrame:
        """Per-head statistics, e.g. ``ds.head_stats(layer=3)``."""
        return self.table("head_stats", filters=_equals(equals) or None)

    def heads(self) -> pd.DataFrame:
        """One row per (layer, head) of the model: ``kv_head``, the key/value head it reads
        (grouped-query attention; equal to ``head`` without it), and ``window``, its
        layer's sliding window (NA for full attention). Merge it on ("layer", "head") to
        group statistics, e.g. ``ds.head_stats().merge(ds.heads()).groupby(["layer",
        "kv_head"])``. Datasets written before these were recorded read as full attention
        without grouping."""
        manifest = self.manifest
        model = manifest.get("model") or manifest.get("models", {}).get("a")  # compare: A's
        if not model:
            raise ValueError(f"{self.root}: its manifest describes no model")
        layers, heads = int(model["num_layers"]), int(model["num_heads"])
        group = heads // int(model.get("num_kv_heads") or heads)
        windows = model.get("layer_windows") or [None] * layers
        layer, head = np.divmod(np.arange(layers * heads, dtype=np.int32), heads)
        return pd.DataFrame({
            "layer": layer, "head": head, "kv_head": (head // group).astype(np.int32),
            "window": pd.array([windows[i] for i in layer], dtype="Int32")})

    def tokens(self, doc_id: str, window: int = 0) -> pd.DataFrame:
        return self.table("tokens", filters=[("doc_id", "==", doc_id), ("window", "==", window)])

    def attention(self, doc_id: str, window: int = 0, **equals: object) -> pd.DataFrame:
        """Stored weights of one document window (optionally one layer/head)."""
        filters = [("doc_id", "==", doc_id), ("window", "==", window), *_equals(equals)]
        return self.table("attention", filters=filters)

    def attention_matrix(self, doc_id: str, layer: int, head: int, window: int = 0) -> np.ndarray:
        """[n, n] float32 matrix of one head; weights the mode did not keep are 0."""
        n = len(self.tokens(doc_id, window))
        rows = self.attention(doc_id, window, layer=layer, head=head)
        matrix = np.zeros((n, n), dtype=np.float32)
        matrix[rows["query"].to_numpy(int), rows["key"].to_numpy(int)] = rows["weight"]
        return matrix


    def _repr_html_(self) -> str:
        """In a notebook: what the dataset holds, and how to look at a document."""
        manifest, rows = self.manifest, ""
        counts = manifest.get("counts", {})
        for name, count in counts.items():
            rows += f"<tr><td>{html.escape(name)}</td><td>{count:,}</td></tr>"
        model = manifest.get("model", {})
        return (f"<b>headscope dataset</b> {html.escape(str(self.root))}: "
                f"{html.escape(str(model.get('name')))}, attention "
                f"{html.escape(str(manifest.get('attention_mode')))}, status "
                f"{html.escape(str(manifest.get('status')))}"
                f"<table>{rows}</table><code>pipelines.Dataset.open(root).view(doc_id)</code> "
                "shows a document.")


def _unsigned(root: Path, manifest: dict) -> bool:
    """Whether ``manifest``'s format stored integer columns unsigned; ValueError if unknown."""
    found = manifest.get("format")
    if found in UNSIGNED_FORMATS:
        return True
    if found in CURRENT_FORMATS:
        return False
    raise ValueError(f"{root}: format {found!r}, which headscope {__version__} does not read; "
                     f"it reads {', '.join([*CURRENT_FORMATS, *UNSIGNED_FORMATS])}")


def _read_signed(folder: Path, filters: list | None, columns: list[str] | None) -> pd.DataFrame:
    """A format 1 table with each unsigned integer column cast to its signed type, in the
    Parquet scan (filters see the signed values; a value that does not fit is an error)."""
    stored = pads.dataset(folder, format="parquet").schema
    try:
        return pd.read_parquet(folder, filters=filters, columns=columns,
                               schema=signed_schema(stored))
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{folder}: a format 1 (unsigned) column does not fit its signed "
                         f"type: {exc}; pandas.read_parquet reads the stored types") from exc


def _equals(values: dict[str, object]) -> list[tuple[str, str, object]]:
    return [(name, "==", value) for name, value in values.items()]


def open_dataset(root: str | Path) -> Dataset:
    return Dataset.open(root)
