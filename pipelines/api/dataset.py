"""Datasets that also show their documents, in HTML or in BertViz.

``pipelines.Dataset`` is :class:`pipelines.dataset.reader.Dataset` (tables as pandas frames)
plus :meth:`Dataset.view` and :meth:`Dataset.to_bertviz`, which need the views; the reader
itself never imports them, so data access does not depend on presentation.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.dataset import reader
from pipelines.views import DocumentView
from pipelines.views.bertviz import BertVizInput, bertviz_input
from pipelines.views.data import Indices


class Dataset(reader.Dataset):
    """A dataset folder written by a corpus job (or the service's ``store``), with views."""

    def view(self, doc_id: str, window: int | None = None, qk: bool = True, *,
             layers: Indices = None, heads: Indices = None, top_k: int | None = None,
             force: bool = False) -> DocumentView:
        """Head, model and neuron views of one document; in a notebook it shows inline.

        ``.save("doc.html")`` on the result writes the page. ``window`` None shows every
        window of the document (with a pager); ``qk`` includes the neuron view's vectors
        where the dataset has a ``qk`` table. ``layers`` and ``heads`` (``"0,3-5"`` or
        integers) and ``top_k`` (the largest stored weights per query row) thin the page;
        ``force`` writes a page over ``views.MAX_PAGE_BYTES``.
        """
        return DocumentView(self, doc_id, window, qk=qk, layers=layers, heads=heads,
                            top_k=top_k, force=force)

    def to_bertviz(self, doc_id: str, window: int = 0,
                   allow_sparse: bool = False) -> BertVizInput:
        """``bertviz.head_view(**ds.to_bertviz(doc_id))``: one window's attention (a float32
        [1, H, n, n] tensor per layer), token labels and ``sentence_b_start`` (pairs).

        Needs a dataset made with ``--attention full``: ValueError otherwise, unless
        ``allow_sparse`` (weights not kept are then 0). KeyError for an unknown document.
        """
        return bertviz_input(self, doc_id, window, allow_sparse)


def open_dataset(root: str | Path) -> Dataset:
    """:meth:`Dataset.open`: raises FileNotFoundError if ``root`` has no manifest.json."""
    return Dataset.open(root)
