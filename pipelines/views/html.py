"""One self-contained HTML page (inline CSS, JS and data; no external URL) per view payload."""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources
from pathlib import Path

from pipelines.dataset.reader import Dataset
from pipelines.views.data import view_data

#: The page may run its own inline script and styles and show data: images; nothing else
#: (no network request of any kind).
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src data: blob:")

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
      <div class="nv-col nv-num">stored</div>
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


def render_html(payload: dict, title: str) -> str:
    """A complete HTML document showing ``payload`` (from :func:`view_data`)."""
    body = _BODY.format(title=html.escape(title),
                        mode=html.escape(str(payload.get("attention_mode", ""))))
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


def default_title(payload: dict) -> str:
    return f"{payload['doc_id']} · {payload['model']['name']} attention"


def render_view(dataset_path: str | Path | Dataset, doc_id: str,
                window: int | None = None) -> str:
    """The HTML view of one document (all its windows, or one) of a dataset folder."""
    payload = view_data(dataset_path, doc_id, window)
    return render_html(payload, default_title(payload))
