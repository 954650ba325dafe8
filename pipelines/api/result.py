"""What ``pipelines.analyze`` returns: the dataset of some texts, as pandas tables.

A ``Result`` holds the dataset ``headscope run`` would write for the same texts, in a
temporary folder that lives as long as the result (``tempfile``'s folder: ``TMPDIR``).
``save(path)`` copies it to a folder of your own; ``view`` and ``to_bertviz`` read it like
any dataset.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import pandas as pd

from pipelines.api.dataset import Dataset
from pipelines.dataset.writer import MANIFEST, TEMP_PREFIX, UMASK, OutputError
from pipelines.views import DocumentView
from pipelines.views.bertviz import BertVizInput
from pipelines.views.data import Indices


class Result:
    """The tables of an in-process analysis as pandas DataFrames, with views.

    ``r.documents``, ``r.tokens``, ``r.head_stats``, ``r.attention``, ``r.head_summary``;
    ``r.tables`` has every table (the analyses' too). A document is named by its id or by
    its position in the input (an int): ``r.view(0)``, ``r.to_bertviz("q1")``.
    """

    def __init__(self, folder: Path, doc_ids: list[str], seconds: float) -> None:
        """``folder``: a finished dataset this result owns (deleted with the result)."""
        self.dataset = Dataset.open(folder)
        self.doc_ids = doc_ids  # in input order
        self.seconds = seconds  # the analysis: forward passes, tables, writing
        self._frames: dict[str, pd.DataFrame] = {}
        self._manifest = self.dataset.manifest
        self._remove = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def names(self) -> list[str]:
        """The tables, in the manifest's order (hidden partial tables left out)."""
        return list(self._manifest["counts"])

    def table(self, name: str) -> pd.DataFrame:
        """One table, read once (KeyError naming the tables for an unknown one)."""
        if name not in self._frames:
            self._frames[name] = self.dataset.table(name)
        return self._frames[name]

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        return {name: self.table(name) for name in self.names}

    @property
    def documents(self) -> pd.DataFrame:
        return self.table("documents")

    @property
    def tokens(self) -> pd.DataFrame:
        return self.table("tokens")

    @property
    def head_stats(self) -> pd.DataFrame:
        return self.table("head_stats")

    @property
    def attention(self) -> pd.DataFrame:
        return self.table("attention")

    @property
    def head_summary(self) -> pd.DataFrame:
        return self.table("head_summary")

    def doc_id(self, doc: str | int) -> str:
        """The id of ``doc``: an id as is, an int as a position in the input (IndexError)."""
        if isinstance(doc, str):
            return doc
        if not -len(self.doc_ids) <= doc < len(self.doc_ids):
            raise IndexError(f"document {doc}: the input had {len(self.doc_ids)} texts")
        return self.doc_ids[doc]

    def view(self, doc: str | int, window: int | None = None, qk: bool = True, *,
             layers: Indices = None, heads: Indices = None, top_k: int | None = None,
             force: bool = False) -> DocumentView:
        """Head, model and neuron views of one document, thinned by ``layers``, ``heads`` and
        ``top_k`` (see ``pipelines.Dataset.view``)."""
        return self.dataset.view(self.doc_id(doc), window, qk, layers=layers, heads=heads,
                                 top_k=top_k, force=force)

    def to_bertviz(self, doc: str | int, window: int = 0,
                   allow_sparse: bool = False) -> BertVizInput:
        """``bertviz.head_view(**r.to_bertviz(0))``; see ``pipelines.Dataset.to_bertviz``
        (``attention="full"`` needed, or ``allow_sparse``)."""
        return self.dataset.to_bertviz(self.doc_id(doc), window, allow_sparse)

    def save(self, path: str | Path, overwrite: bool = False) -> Dataset:
        """Copy the dataset to ``path`` (new or empty; ``overwrite`` replaces a dataset, never
        another folder) and open it there. It appears whole or not at all (OutputError)."""
        target = Path(path)
        _check_target(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=TEMP_PREFIX))
        try:
            shutil.copytree(self.dataset.root, staging, dirs_exist_ok=True)
            staging.chmod(0o777 & ~UMASK)  # mkdtemp makes it private
            if target.exists() and any(target.iterdir()):
                shutil.rmtree(target)  # a dataset: _check_target allowed it
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Dataset.open(target)

    def _summary(self) -> tuple[str, list[tuple[str, int]]]:
        manifest, model = self._manifest, self._manifest["model"]
        size = manifest.get("counts_input", {})
        head = (f"{model['name']} ({model['num_layers']} layers × {model['num_heads']} heads), "
                f"attention {manifest['attention_mode']}: {len(self.doc_ids)} documents, "
                f"{size.get('windows', 0)} windows, {size.get('tokens', 0)} tokens "
                f"in {self.seconds:.2f} s")
        return head, list(manifest["counts"].items())

    def __repr__(self) -> str:
        head, counts = self._summary()
        tables = ", ".join(f"{name} {count:,}" for name, count in counts)
        return f"<headscope Result: {head}; tables: {tables}>"

    def _repr_html_(self) -> str:
        head, counts = self._summary()
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{count:,}</td></tr>"
                       for name, count in counts)
        return (f"<b>headscope result</b> {html.escape(head)}"
                f"<table><tr><th>table</th><th>rows</th></tr>{rows}</table>"
                "<code>.head_stats</code>, <code>.tables[name]</code>, "
                "<code>.view(doc)</code>, <code>.to_bertviz(doc)</code>, "
                "<code>.save(path)</code>")


def _check_target(target: Path, overwrite: bool) -> None:
    """An OutputError unless ``target`` may receive a dataset (``Result.save``'s rule)."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file; save to a folder")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"{target} is not empty; pass overwrite=True to replace the dataset "
                          "there, or choose another folder")
    if not (target / MANIFEST).is_file():
        raise OutputError(f"{target} is not empty and is not a headscope dataset (no "
                          f"{MANIFEST}); refusing to delete it")
