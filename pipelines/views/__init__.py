"""Self-contained HTML attention views (head, model and neuron view) of one document.

    from pipelines.views import DocumentView
    DocumentView("runs/corpus1", "pydoc#3").save("pydoc3.html")

The page inlines its script, styles and data and requests nothing from anywhere.
"""

from __future__ import annotations

from functools import cached_property
from html import escape
from pathlib import Path

from pipelines.dataset.reader import Dataset
from pipelines.views.data import QK_TABLE, view_data
from pipelines.views.html import default_title, render_html, render_view

__all__ = ["QK_TABLE", "DocumentView", "render_html", "render_view", "view_data"]


class DocumentView:
    """The views of one document of a dataset: ``.html``, ``.save(path)``, notebook display."""

    #: Height of the notebook frame, in pixels (the page scrolls inside it).
    frame_height = 760

    def __init__(self, dataset: Dataset | str | Path, doc_id: str, window: int | None = None,
                 title: str | None = None, qk: bool = True) -> None:
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
        self.doc_id, self.window, self.title = doc_id, window, title
        self.payload = view_data(self.dataset, doc_id, window, qk)  # errors show up here, early

    @cached_property
    def html(self) -> str:
        """The complete HTML page."""
        return render_html(self.payload, self.title or default_title(self.payload))

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (UTF-8) and return the path."""
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        """An iframe holding the page, so its script runs and its ids stay its own."""
        return (f'<iframe srcdoc="{escape(self.html, quote=True)}" '
                f'sandbox="allow-scripts" title="{escape(self.doc_id, quote=True)}" '
                f'style="width:100%;height:{self.frame_height}px;border:1px solid #ddd">'
                "</iframe>")

    def __repr__(self) -> str:
        window = "" if self.window is None else f", window={self.window}"
        return f"DocumentView({str(self.dataset.root)!r}, {self.doc_id!r}{window})"
