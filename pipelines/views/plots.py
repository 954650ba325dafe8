"""Statistic plots of a dataset, as PNG or SVG images.

    from pipelines.views.plots import plot
    plot("runs/c1", "mass_prev", "heatmap", "prev.png")      # corpus mean per layer × head
    plot("runs/c1", None, "patterns", "classes.svg")         # each head's most frequent class
    plot("runs/c1", "entropy", "layers", "entropy.png")      # distribution over windows, per layer

``heatmap`` and ``patterns`` draw from ``head_summary`` (``<stat>_mean`` and ``share_<class>``;
a dataset without it, such as the service's ``store``, is summarised from ``head_stats`` and
``head_patterns`` on the fly); ``layers`` reads only the ``layer``, ``head`` and statistic
columns of ``head_stats``. :func:`stat_matrix` and :func:`pattern_matrix` return the numbers a
plot draws. Figures are plain :class:`matplotlib.figure.Figure` objects on the Agg canvas:
pyplot is never imported, so no window opens, no global backend changes and no figure is kept
after the call. ``headscope plot`` calls :func:`plot`.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pipelines.compute.patterns import PATTERN_CLASSES
from pipelines.compute.stats import DEFINITIONS
from pipelines.dataset.reader import Dataset
from pipelines.dataset.summaries import pattern_shares
from pipelines.dataset.writer import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

KINDS = ("heatmap", "patterns", "layers")
SUFFIXES = (".png", ".svg")
DPI = 150
#: Grids up to this many layers and heads get a number in every cell.
ANNOTATE_MAX = 12
CMAP = "viridis"
#: Fixed colours, so that a class looks the same in every dataset's map.
CLASS_COLOURS = {"vertical": "#1f77b4", "diagonal": "#ff7f0e", "vertical+diagonal": "#2ca02c",
                 "block": "#9467bd", "heterogeneous": "#8c8c8c"}
MISSING_COLOUR = "#e6e6e6"
UNITS = {"entropy": "nats", "entropy_norm": "share of ln k, 0–1", "max_weight": "weight, 0–1",
         "mean_distance": "tokens", "k90": "keys", "n_tokens": "tokens"}
#: Matplotlib settings for every figure: a fixed pixel size and text that stays text in SVG.
STYLE: dict[RcKeyType, Any] = {"savefig.bbox": "standard", "svg.fonttype": "none",
                               "svg.hashsalt": "headscope", "font.size": 9}


class PlotError(ValueError):
    """The dataset cannot give the plot that was asked for."""


# --------------------------------------------------------------------------- the numbers


@dataclass
class Heads:
    """A dataset's per-head summary and the layer × head grid it fills."""

    dataset: Dataset
    summary: pd.DataFrame
    layers: int
    heads: int

    @classmethod
    def load(cls, dataset: Dataset | str | Path) -> Heads:
        ds = (dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
              ).require_corpus("headscope plot")
        summary = _summary(ds)
        if summary.empty or summary["n_windows"].max() == 0:
            raise PlotError(f"dataset {ds.root} is empty: no head statistics (0 windows)")
        model = ds.manifest.get("model", {})
        layers = max(int(model.get("num_layers") or 0), int(summary["layer"].max()) + 1)
        heads = max(int(model.get("num_heads") or 0), int(summary["head"].max()) + 1)
        return cls(ds, summary, layers, heads)

    @property
    def stats(self) -> list[str]:
        """The statistics this dataset has, in table order."""
        return [c.removesuffix("_mean") for c in self.summary.columns if c.endswith("_mean")]

    def grid(self, values: pd.Series | np.ndarray, fill: object = np.nan) -> np.ndarray:
        """[layers, heads] array of per-row ``values``; heads without a row get ``fill``."""
        values = np.asarray(values)
        grid = np.full((self.layers, self.heads), fill, dtype=values.dtype)
        layer, head = self.summary["layer"].to_numpy(int), self.summary["head"].to_numpy(int)
        grid[layer, head] = values
        return grid

    def check_stat(self, stat: str | None) -> str:
        """``stat`` if the dataset has values of it, else a :class:`PlotError` saying why."""
        if stat not in self.stats:
            raise PlotError(f"unknown statistic {stat!r}; available: {', '.join(self.stats)}")
        if self.summary[f"{stat}_mean"].isna().all():
            raise PlotError(f"{stat} is null for every head of this dataset "
                            f"({self.definition(stat)})")
        return stat

    def definition(self, stat: str) -> str:
        """The statistic's definition as the dataset's manifest records it."""
        recorded = self.dataset.manifest.get("statistics", {}).get("definitions", {})
        return recorded.get(stat) or DEFINITIONS.get(stat, "")

    def caption(self) -> str:
        """Model name and number of windows, for titles."""
        name = self.dataset.manifest.get("model", {}).get("name") or self.dataset.root.name
        text = f"{name}, {int(self.summary['n_windows'].max()):,} windows"
        status = self.dataset.manifest.get("status")
        return text if status in (None, "complete", "open") else f"{text} (job {status})"


def _summary(ds: Dataset) -> pd.DataFrame:
    """``head_summary``, or the same means and shares computed from the per-window tables."""
    if (ds.root / "head_summary").is_dir():
        return ds.table("head_summary")
    if not (ds.root / "head_stats").is_dir():
        raise PlotError(f"dataset {ds.root} is empty: it has no head_stats table")
    stats = ds.table("head_stats").drop(columns=["doc_id", "window"])
    values = {c: np.float64 for c in stats.columns if c not in ("layer", "head")}
    grouped = stats.astype(values).groupby(["layer", "head"], sort=True)
    summary = grouped.mean().add_suffix("_mean")
    summary.insert(0, "n_windows", grouped.size())
    summary = summary.reset_index()
    shares = pattern_shares(ds.root / "head_patterns", PATTERN_CLASSES)
    if shares is not None:
        summary = summary.merge(shares, on=["layer", "head"], how="left")
    return summary


def stat_matrix(dataset: Dataset | str | Path, stat: str) -> np.ndarray:
    """[layers, heads] float64: the statistic's mean over all windows (NaN: no value)."""
    heads = Heads.load(dataset)
    return heads.grid(heads.summary[f"{heads.check_stat(stat)}_mean"].astype(np.float64))


def _share_columns(heads: Heads) -> dict[str, str]:
    """Pattern class → its ``share_`` column in the summary; an error without the analysis."""
    columns = {name: f"share_{name.replace('+', '_')}" for name in PATTERN_CLASSES}
    columns = {name: column for name, column in columns.items() if column in heads.summary}
    if not columns:
        raise PlotError(f"dataset {heads.dataset.root} has no pattern analysis (no share_* "
                        "columns in head_summary): run the job with --analyses patterns")
    return columns


def pattern_matrix(dataset: Dataset | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Each head's most frequent pattern class and the share of windows it has.

    Returns ``(classes, shares)``, both [layers, heads]: class names (object array, ``None``
    for a head without windows) and float64 shares (NaN there). Ties go to the class listed
    first in ``PATTERN_CLASSES``.
    """
    return _pattern_matrix(Heads.load(dataset))


def _pattern_matrix(heads: Heads) -> tuple[np.ndarray, np.ndarray]:
    columns = _share_columns(heads)
    shares = heads.summary[list(columns.values())].to_numpy(np.float64)
    known = ~np.isnan(shares).all(axis=1)
    best = np.argmax(np.nan_to_num(shares, nan=-1.0), axis=1)
    names = np.array(list(columns), dtype=object)[best]
    top = shares[np.arange(len(shares)), best]
    return (heads.grid(np.where(known, names, np.array(None)).astype(object), fill=None),
            heads.grid(np.where(known, top, np.nan)))


def layer_values(dataset: Dataset | str | Path, stat: str) -> pd.DataFrame:
    """``layer``, ``head`` and the statistic of every window (nulls left out) from head_stats."""
    heads = Heads.load(dataset)
    return _layer_values(heads, heads.check_stat(stat))


def _layer_values(heads: Heads, stat: str) -> pd.DataFrame:
    frame = heads.dataset.table("head_stats", columns=["layer", "head", stat])
    return frame.dropna(subset=[stat]).astype({"layer": int, "head": int})


# --------------------------------------------------------------------------- the figures


def unit(stat: str) -> str:
    """The statistic's unit, for axis and colour-bar labels."""
    if stat.startswith("mass_"):
        return "share of attention, 0–1"
    return UNITS.get(stat, "")


def label(stat: str) -> str:
    """``stat (unit)``, or the bare name of a statistic without a unit."""
    return f"{stat} ({unit(stat)})" if unit(stat) else stat


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _grid_figure(heads: Heads, extra_height: float = 0.0) -> tuple[Figure, Axes]:
    """A figure and axes sized for square cells, layer 0 at the top."""
    cell = float(np.clip(min(11 / heads.heads, 8 / heads.layers), 0.18, 0.55))
    figure = _new_figure(max(heads.heads * cell + 2.6, 5.5),
                         max(heads.layers * cell + 1.9 + extra_height, 3.2))
    ax = figure.add_subplot()
    ax.set_xlim(-0.5, heads.heads - 0.5)
    ax.set_ylim(heads.layers - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    for axis, count in ((ax.xaxis, heads.heads), (ax.yaxis, heads.layers)):
        if count <= 24:
            axis.set_ticks(range(count))
        else:
            # a new axis's default locator is an AutoLocator, a MaxNLocator
            cast(MaxNLocator, axis.get_major_locator()).set_params(integer=True)
    return figure, ax


def _edges(heads: Heads) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(heads.heads + 1) - 0.5, np.arange(heads.layers + 1) - 0.5


def _title(ax: Axes, width: float, headline: str, detail: str) -> None:
    wrapped = textwrap.fill(detail, width=max(int((width - 1.2) * 13), 40))
    ax.set_title(f"{headline}\n{wrapped}", fontsize=9, loc="left")


def _cell_text(ax: Axes, layer: int, head: int, text: str, background: tuple) -> None:
    red, green, blue = background[:3]
    light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
    ax.text(head, layer, text, ha="center", va="center", fontsize=7,
            color="black" if light else "white")


def _number(value: float) -> str:
    """A cell's value in at most four or five characters."""
    if np.isnan(value):
        return "–"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f}"


@matplotlib.rc_context(STYLE)
def heatmap_figure(dataset: Dataset | str | Path, stat: str | None) -> Figure:
    """Layer × head grid of the statistic's corpus mean, with a colour bar."""
    heads = Heads.load(dataset)
    stat = heads.check_stat(stat)
    matrix = heads.grid(heads.summary[f"{stat}_mean"].astype(np.float64))
    figure, ax = _grid_figure(heads)
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=MISSING_COLOUR)
    mesh = ax.pcolormesh(*_edges(heads), np.ma.masked_invalid(matrix), cmap=cmap)
    mesh.set_gid("heatmap-cells")
    figure.colorbar(mesh, ax=ax, label=label(stat), shrink=0.9)
    if max(heads.layers, heads.heads) <= ANNOTATE_MAX:
        colours = mesh.to_rgba(np.ma.masked_invalid(matrix))
        for (layer, head), value in np.ndenumerate(matrix):
            _cell_text(ax, layer, head, _number(value), tuple(colours[layer, head]))
    _title(ax, figure.get_figwidth(), f"{stat}: mean per head — {heads.caption()}",
           heads.definition(stat))
    return figure


def _class_rgb(classes: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """[layers, heads, 3] cell colours: the class colour, paler for a smaller share."""
    rgb = np.ones((*classes.shape, 3))
    for (layer, head), name in np.ndenumerate(classes):
        colour = np.array(to_rgb(CLASS_COLOURS.get(name, MISSING_COLOUR) if name else
                                 MISSING_COLOUR))
        strength = 0.3 + 0.7 * shares[layer, head] if name else 1.0
        rgb[layer, head] = 1 - strength * (1 - colour)
    return rgb


def _count_label(name: str, count: int) -> str:
    return f"{name} ({count} head{'s' if count != 1 else ''})"


@matplotlib.rc_context(STYLE)
def patterns_figure(dataset: Dataset | str | Path) -> Figure:
    """Layer × head grid coloured by each head's most frequent pattern class."""
    heads = Heads.load(dataset)
    classes, shares = _pattern_matrix(heads)
    figure, ax = _grid_figure(heads, extra_height=0.5)
    rgb = _class_rgb(classes, shares)
    ax.pcolormesh(*_edges(heads), rgb).set_gid("pattern-cells")
    annotate = max(heads.layers, heads.heads) <= ANNOTATE_MAX
    if annotate:
        for (layer, head), share in np.ndenumerate(shares):
            text = "–" if np.isnan(share) else f"{100 * share:.0f}"
            _cell_text(ax, layer, head, text, tuple(rgb[layer, head]))
    present = [name for name in PATTERN_CLASSES if (classes == name).any()]
    handles = [Patch(color=CLASS_COLOURS.get(name, MISSING_COLOUR),
                     label=_count_label(name, int((classes == name).sum()))) for name in present]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
                  fontsize=8, frameon=False)
    _title(ax, figure.get_figwidth(), f"pattern classes per head — {heads.caption()}",
           "colour: the head's most frequent class; "
           f"shade{' and number' if annotate else ''}: the % of windows in that class")
    return figure


@matplotlib.rc_context(STYLE)
def layers_figure(dataset: Dataset | str | Path, stat: str | None) -> Figure:
    """Per layer: a box of the statistic over all windows and heads, a dot per head's mean."""
    heads = Heads.load(dataset)
    stat = heads.check_stat(stat)
    frame = _layer_values(heads, stat)
    layers = sorted(frame["layer"].unique())
    figure = _new_figure(float(np.clip(1.5 + 0.55 * len(layers), 6.0, 16.0)), 4.6)
    ax = figure.add_subplot()
    by_layer = frame.groupby("layer")[stat]
    ax.boxplot([by_layer.get_group(layer).to_numpy() for layer in layers], positions=layers,
               whis=(5, 95), showfliers=False, widths=0.6, patch_artist=True,
               boxprops={"facecolor": "#c6dbef", "edgecolor": "#3b6ea5"},
               medianprops={"color": "#08306b"})
    means = frame.groupby(["layer", "head"])[stat].mean().reset_index()
    offset = (means["head"] / max(heads.heads - 1, 1) - 0.5) * 0.5
    ax.scatter(means["layer"] + offset, means[stat], s=10, color="#d62728", alpha=0.8,
               zorder=3, label="a head's mean")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(label(stat))
    ax.legend(loc="best", fontsize=8)
    _title(ax, figure.get_figwidth(), f"{stat} per layer — {heads.caption()}",
           "boxes: every window and head of the layer (median, quartiles, whiskers at the "
           f"5th and 95th percentiles). {stat}: {heads.definition(stat)}")
    return figure


# --------------------------------------------------------------------------- the files


FIGURES: dict[str, Callable[[Dataset | str | Path, str | None], Figure]] = {
    "heatmap": heatmap_figure,
    "patterns": lambda dataset, _stat: patterns_figure(dataset),
    "layers": layers_figure,
}


def check_out(out: str | Path) -> Path:
    """``out`` as a Path if its suffix names a format we write, else a :class:`PlotError`."""
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES:
        raise PlotError(f"{out}: the image's file name must end in {' or '.join(SUFFIXES)}")
    return out


def save(figure: Figure, out: str | Path) -> Path:
    """Write the figure as PNG or SVG (by suffix), atomically; return the path."""
    out = check_out(out)
    buffer = io.BytesIO()
    fmt = out.suffix.lower().lstrip(".")
    metadata = {"Date": None} if fmt == "svg" else None
    with matplotlib.rc_context(STYLE):
        figure.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def plot_stat(dataset: Dataset | str | Path, stat: str | None, out: str | Path,
              kind: str = "heatmap") -> Path:
    """Draw one plot of a dataset into ``out`` (.png or .svg); ``stat`` is unused by patterns."""
    if kind not in FIGURES:
        raise PlotError(f"unknown plot kind {kind!r}: use {', '.join(KINDS)}")
    check_out(out)
    return save(FIGURES[kind](dataset, stat), out)


def plot(dataset_root: Dataset | str | Path, stat: str | None, kind: str,
         out: str | Path) -> Path:
    """The ``headscope plot`` entry point: ``kind`` is heatmap, patterns or layers."""
    return plot_stat(dataset_root, stat, out, kind)
