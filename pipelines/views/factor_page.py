"""A self-contained HTML page for one transformer factor: where it peaks and what fires it.

Made from the ``factor_profile`` and ``factor_top`` tables that ``headscope factors apply``
writes. Static HTML and inline SVG: no script, no request to anywhere.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pandas as pd

from pipelines.config import ConfigError

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
.meta { color: #666; margin-bottom: 14px; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
.bar { fill: #4c78a8; } .bar.peak { fill: #f58518; }
table { border-collapse: collapse; width: 100%; }
td { padding: 3px 6px; border-bottom: 1px solid #eee; vertical-align: top; }
td.act { text-align: right; color: #555; width: 5em; font-variant-numeric: tabular-nums; }
td.ctx { font-family: ui-monospace, monospace; font-size: 13px; }
td.src { color: #888; width: 12em; font-size: 12px; }
mark { background: #ffd966; padding: 0 2px; border-radius: 2px; font-weight: 600; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
"""


def factor_data(root: str | Path, factor: int) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The codes dataset's manifest, and one factor's profile and top rows."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file() or not (root / "factor_profile").is_dir():
        raise ConfigError(f"{root} holds no factor codes; make it with `headscope factors "
                          "apply DICTIONARY INPUT --out DIR`")
    manifest = json.loads(manifest_path.read_text())
    n_factors = int(manifest["dictionary"]["n_factors"])
    if not 0 <= factor < n_factors:
        raise ConfigError(f"factor {factor} does not exist: the dictionary has factors 0 to "
                          f"{n_factors - 1}")
    filters = [("factor", "==", factor)]
    profile = pd.read_parquet(root / "factor_profile", filters=filters).sort_values("layer")
    top = pd.read_parquet(root / "factor_top", filters=filters).sort_values(["layer", "rank"])
    return manifest, profile, top


def _bars(profile: pd.DataFrame) -> str:
    """Inline SVG: mean activation per layer, the peak layer highlighted."""
    width, height, pad = 46, 120, 22
    peak = int(profile["peak_layer"].iloc[0])
    top = max(float(profile["mean_activation"].max()), 1e-12)
    bars = []
    for slot, row in enumerate(profile.itertuples()):
        h = height * float(row.mean_activation) / top
        x = pad + slot * width
        css = "bar peak" if int(row.layer) == peak else "bar"
        bars.append(
            f'<rect class="{css}" data-layer="{int(row.layer)}" x="{x}" y="{height - h + 8:.1f}"'
            f' width="{width - 10}" height="{h:.1f}"><title>layer {int(row.layer)}: mean '
            f'{row.mean_activation:.4g}, active on {100 * row.active_share:.2f}% of tokens'
            f'</title></rect><text x="{x + (width - 10) / 2}" y="{height + 24}" '
            f'text-anchor="middle">{int(row.layer)}</text>')
    total = pad + len(profile) * width
    return (f'<svg id="profile" width="{total}" height="{height + 34}" role="img" '
            f'aria-label="mean activation per layer">{"".join(bars)}</svg>')


def _contexts(top: pd.DataFrame, layer: int) -> str:
    rows = []
    for row in top[top["layer"] == layer].itertuples():
        context = (f"{escape(row.before)} <mark>{escape(row.token)}</mark> "
                   f"{escape(row.after)}")
        rows.append(f'<tr><td class="act">{row.activation:.3f}</td><td class="ctx">{context}'
                    f'</td><td class="src">{escape(row.doc_id)} · w{int(row.window)}</td></tr>')
    return "<table>" + "".join(rows) + "</table>" if rows else "<p>No activation.</p>"


def render_factor_page(root: str | Path, factor: int) -> str:
    """The page of ``factor`` in the codes dataset at ``root``."""
    manifest, profile, top = factor_data(root, factor)
    model = manifest["dictionary"]["model"]["name"]
    peak, peak_layer = str(profile["peak"].iloc[0]), int(profile["peak_layer"].iloc[0])
    sections = []
    for layer in profile["layer"].astype(int):
        is_open = " open" if layer == peak_layer else ""
        count = int((top["layer"] == layer).sum())
        sections.append(f"<details{is_open}><summary>layer {layer} · top {count}</summary>"
                        f"{_contexts(top, layer)}</details>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">",
        '<link rel="icon" href="data:,">',
        f"<title>factor {factor} · {escape(model)}</title>", f"<style>{_STYLE}</style>",
        "</head>", "<body>",
        f"<h1>Factor {factor}</h1>",
        f'<div class="meta">{escape(model)} · dictionary of '
        f'{manifest["dictionary"]["n_factors"]} factors · peaks at layer {peak_layer} '
        f'(<b id="peak">{peak}</b> layers)</div>',
        "<h2>Mean activation per token, by layer</h2>", _bars(profile),
        "<h2>Top contexts</h2>", *sections, "</body>", "</html>", ""])
