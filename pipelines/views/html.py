"""One self-contained HTML page (inline CSS, JS and data; no external URL) per view payload."""

from __future__ import annotations

import html
import json
import logging
from functools import cache
from importlib import resources
from pathlib import Path

from pipelines.dataset.reader import Dataset
from pipelines.views.data import Selection, view_data

log = logging.getLogger("pipelines.views")

#: The page may run its own inline script and styles and show data: images; nothing else
#: (no network request of any kind).
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:")
#: A page estimated above this many bytes is written with a warning giving its size and the
#: thinning options. For scale: a 512-token window kept with topk:8 is a 3.2 MB page that
#: draws in about 0.6 s; the same window with every weight (``--attention full``) is 201 MB,
#: with 3.1 M lines per layer in the head view, and takes minutes to draw.
WARN_PAGE_BYTES = 25_000_000
#: Above this many bytes a page is refused unless forced (``--force``, ``force=True``): a
#: browser could not even read its data, which the page parses as one JavaScript string, and
#: Chromium's engine (V8) holds at most 2**29 - 24 characters (about 537 M) in one string.
MAX_PAGE_BYTES = 500_000_000
#: What thins a page, as the command line and Python name it.
THIN_HINT = ("--layers, --heads and --top-k (e.g. --layers 0-1 --top-k 8; in Python "
             "view(..., layers=, heads=, top_k=))")


class PageTooLarge(ValueError):
    """The page would be over the hard limit (:data:`MAX_PAGE_BYTES`) and was not forced."""

_BODY = """<div id="hs-app">
<header class="hs-top">
  <div><h1 id="hs-title">{title}</h1><div id="hs-meta" class="hs-meta"></div></div>
  <div id="hs-pager" class="hs-pager" hidden>
    <button id="hs-prev" type="button">&#9664; previous</button>
    <select id="hs-window" aria-label="window"></select>
    <button id="hs-next" type="button">next &#9654;</button>
  </div>
  <span id="hs-window-info" class="hs-meta"></span>
</header>
<div id="hs-error" class="hs-note" hidden></div>
{thinned}
<nav class="hs-tabs">
  <button type="button" class="hs-tab" data-tab="head" aria-selected="true">Head view</button>
  <button type="button" class="hs-tab" data-tab="model">Model view</button>
  <button type="button" class="hs-tab" data-tab="neuron">Neuron view</button>
</nav>
<section id="hs-head" class="hs-panel" data-tab="head">
  <div class="hs-controls">
    <label>Layer <select id="hs-layer"></select></label>
    <label id="hs-filter-label">Sentences <select id="hs-filter">
      <option value="all">all</option><option value="aa">A &#8594; A</option>
      <option value="ab">A &#8594; B</option><option value="ba">B &#8594; A</option>
      <option value="bb">B &#8594; B</option></select></label>
    <label><input type="checkbox" id="hs-hide-special"> hide special tokens</label>
    <span id="hs-head-count" class="hs-count"></span>
  </div>
  <div id="hs-heads" class="hs-heads"></div>
  <p class="hs-note">Each line joins a query token (left) to a key token it attends (right);
    its opacity is the stored weight, its colour the head. Only the weights the dataset kept
    ({mode}) are drawn. Hover a token to highlight its lines.</p>
  <div class="hs-svg-wrap"><div class="hs-stage">
    <svg id="hs-head-svg" width="580" height="40"><g id="hs-lines"></g></svg>
    <svg id="hs-head-top" width="580" height="40"><g id="hs-hl"></g><g id="hs-toks"></g></svg>
  </div></div>
</section>
<section id="hs-model" class="hs-panel" data-tab="model" hidden>
  <p class="hs-note">Every layer (rows) and head (columns): stored weights, queries down and
    keys across. Click a thumbnail to enlarge it.</p>
  <div class="hs-model-wrap">
    <div id="hs-model-grid" class="hs-model-grid"></div>
    <div id="hs-model-detail" class="hs-detail">
      <h2 id="hs-detail-title"></h2>
      <canvas id="hs-detail-canvas"></canvas>
      <div id="hs-detail-readout" class="hs-readout"></div>
      <div id="hs-detail-stats" class="hs-meta"></div>
      <ol id="hs-detail-top"></ol>
      <button id="hs-detail-open" type="button">show this head in the head view</button>
    </div>
  </div>
</section>
<section id="hs-neuron" class="hs-panel" data-tab="neuron" hidden>
  <p id="hs-neuron-missing" class="hs-note">This dataset has no query/key vectors, so the neuron
    view is not available. Re-run the job with the <code>qk</code> capture option (it writes a
    <code>qk</code> table of per-head query and key vectors) to see how q&#183;k/&#8730;d and
    the softmax make each weight.</p>
  <div id="hs-neuron-main" hidden>
    <div class="hs-controls">
      <label>Layer <select id="hs-nv-layer"></select></label>
      <label>Head <select id="hs-nv-head"></select></label>
      <label>Query <select id="hs-nv-query"></select></label>
    </div>
    <p class="hs-note">For the query token: its query vector q, each key vector k, their
      elementwise product q&#215;k (orange positive, blue negative), the score
      q&#183;k/&#8730;d, its softmax over the keys, and the weight the dataset stored.
      Click a token to make it the query.</p>
    <div class="nv-head">
      <div class="nv-col nv-label" id="hs-nv-qlabel"></div>
      <div class="nv-col nv-vec" id="hs-nv-khead">query q<canvas id="hs-nv-qcanvas"
        class="nv-canvas"></canvas></div>
      <div class="nv-col nv-vec" id="hs-nv-phead">q &#215; k</div>
      <div class="nv-col nv-num">q&#183;k/&#8730;d</div>
      <div class="nv-col nv-num nv-sm">softmax</div>
      <div class="nv-col nv-num" id="hs-nv-stored-head">stored</div>
    </div>
    <div class="nv-body">
      <div class="nv-col nv-label" id="hs-nv-labels"></div>
      <div class="nv-col nv-vec"><canvas id="hs-nv-kcanvas" class="nv-canvas"></canvas></div>
      <div class="nv-col nv-vec"><canvas id="hs-nv-pcanvas" class="nv-canvas"></canvas></div>
      <div class="nv-col nv-num" id="hs-nv-dots"></div>
      <div class="nv-col nv-num nv-sm" id="hs-nv-probs"></div>
      <div class="nv-col nv-num" id="hs-nv-kept"></div>
    </div>
  </div>
</section>
</div>"""


@cache
def asset(name: str) -> str:
    """Text of ``assets/<name>`` (shipped inside the package)."""
    text = (resources.files("pipelines.views") / "assets" / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise ValueError(f"asset {name} must not close its inline element")
    return text


def payload_json(payload: dict) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``<`` at all)."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c")


def thinned_note(payload: dict) -> str:
    """The page's statement of what it leaves out of the dataset's weights ("" if nothing)."""
    what = payload.get("thinned")
    if not what:
        return ""
    mode = html.escape(str(payload.get("attention_mode", "")))
    return (f'<p id="hs-thinned" class="hs-thinned"><b>Thinned view:</b> {html.escape(what)} '
            f"(of the weights the dataset stored, attention {mode}); the rest is not in this "
            "page.</p>")


def render_html(payload: dict, title: str) -> str:
    """A complete HTML document showing ``payload`` (from :func:`view_data`)."""
    mode = str(payload.get("attention_mode", ""))
    if payload.get("top_k"):
        mode += f"; on this page at most the top {payload['top_k']} per query"
    body = _BODY.format(title=html.escape(title), thinned=thinned_note(payload),
                        mode=html.escape(mode))
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        '<link rel="icon" href="data:,">',
        f"<style>\n{asset('view.css')}</style>",
        "</head>",
        "<body>",
        body,
        f'<script type="application/json" id="hs-payload">{payload_json(payload)}</script>',
        f"<script>\n{asset('view.js')}</script>",
        "</body>",
        "</html>",
        "",
    ])


@cache
def _shell_bytes() -> int:
    """Size of a page without its data: markup, styles, script, a thinning note."""
    return len(render_html({"thinned": "x" * 80}, "x" * 40).encode("utf-8"))


def page_bytes(selection: Selection) -> int:
    """Estimated size of the page of ``selection``, from the rows it holds."""
    return _shell_bytes() + selection.data_bytes()


def check_page_size(size: int, doc_id: str, warn_bytes: int = WARN_PAGE_BYTES,
                    max_bytes: int | None = MAX_PAGE_BYTES) -> None:
    """Refuse a page over ``max_bytes`` (None: no limit); warn about one over ``warn_bytes``."""
    if max_bytes is not None and size > max_bytes:
        raise PageTooLarge(
            f"the page of document {doc_id!r} would be about {size / 1e6:.1f} MB, over the "
            f"{max_bytes / 1e6:g} MB limit (a browser could not load its data); thin it with "
            f"{THIN_HINT}, or force it (--force, force=True)")
    if size > warn_bytes:
        log.warning("the page of document %r will be about %.1f MB (over %g MB: slow to open "
                    "and draw in a browser); thin it with %s", doc_id, size / 1e6,
                    warn_bytes / 1e6, THIN_HINT)


def default_title(payload: dict) -> str:
    return f"{payload['doc_id']} · {payload['model']['name']} attention"


def render_view(dataset_path: str | Path | Dataset, doc_id: str,
                window: int | None = None) -> str:
    """The HTML view of one document (all its windows, or one) of a dataset folder."""
    payload = view_data(dataset_path, doc_id, window)
    return render_html(payload, default_title(payload))
