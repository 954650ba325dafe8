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
from pipelines.views.data import QK_TABLE, Indices, select, view_data
from pipelines.views.html import (
    MAX_PAGE_BYTES,
    WARN_PAGE_BYTES,
    PageTooLarge,
    check_page_size,
    default_title,
    log,
    page_bytes,
    render_html,
    render_view,
)

__all__ = ["MAX_PAGE_BYTES", "QK_TABLE", "WARN_PAGE_BYTES", "DocumentView", "PageTooLarge",
           "render_html", "render_view", "view_data"]


class DocumentView:
    """The views of one document of a dataset: ``.html``, ``.save(path)``, notebook display."""

    #: Height of the notebook frame, in pixels (the page scrolls inside it).
    frame_height = 760

    def __init__(self, dataset: Dataset | str | Path, doc_id: str, window: int | None = None,
                 title: str | None = None, qk: bool = True, *, layers: Indices = None,
                 heads: Indices = None, top_k: int | None = None, force: bool = False,
                 warn_bytes: int = WARN_PAGE_BYTES, max_bytes: int = MAX_PAGE_BYTES) -> None:
        """``layers``/``heads`` (``"0,3-5"`` or integers) and ``top_k`` (weights per query row)
        thin the page. A page estimated over ``warn_bytes`` is logged as a warning; over
        ``max_bytes`` it raises :class:`PageTooLarge` unless ``force``."""
        self.dataset = (dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
                        ).require_corpus("headscope view")
        self.doc_id, self.window, self.title = doc_id, window, title
        # errors (unknown document, window, layer or head; a page too large) show up here
        selection = select(self.dataset, doc_id, window, qk, layers, heads, top_k)
        #: The page size estimated from the rows selected, in bytes.
        self.estimated_bytes = page_bytes(selection)
        check_page_size(self.estimated_bytes, doc_id, warn_bytes, None if force else max_bytes)
        self.payload = selection.payload()

    @cached_property
    def html(self) -> str:
        """The complete HTML page."""
        return render_html(self.payload, self.title or default_title(self.payload))

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (UTF-8) and return the path."""
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        log.info("wrote %s: %.1f MB", path, path.stat().st_size / 1e6)
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
