"""Statistic plots of real datasets: the numbers drawn, the images written, the errors."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE_TEXTS
from matplotlib.colors import Normalize, to_hex

from pipelines.backends.torch.backend import TorchBackend
from pipelines.cli import main
from pipelines.compute.patterns import PATTERN_CLASSES
from pipelines.compute.stats import STAT_NAMES
from pipelines.config import RunConfig, WindowConfig
from pipelines.dataset import schema
from pipelines.dataset.reader import Dataset
from pipelines.dataset.writer import atomic_write_parquet
from pipelines.jobs.local import run_job
from pipelines.views import plots
from pipelines.views.plots import (
    PlotError,
    heatmap_figure,
    layer_values,
    layers_figure,
    pattern_matrix,
    patterns_figure,
    plot,
    stat_matrix,
)

TEXTS = [*SAMPLE_TEXTS, " ".join(SAMPLE_TEXTS) * 2, "Is it raining?", "Yes; it pours."]
SVG = "{http://www.w3.org/2000/svg}"


def run(backend: TorchBackend, folder: Path, texts: list[str], **config: object) -> Path:
    """A real corpus job over ``texts``; returns the dataset folder."""
    source = folder / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                              for i, t in enumerate(texts)), encoding="utf-8")
    values: dict = {"model": backend.info.name, "device": "cpu",
                    "windows": WindowConfig(max_length=32, stride=8), **config}
    run_job([source], folder / "ds", RunConfig(**values), backend=backend, progress=False)
    return folder / "ds"


@pytest.fixture(scope="module")
def dataset(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM over a small corpus, with the pattern analysis."""
    return run(minilm, tmp_path_factory.mktemp("plots"), TEXTS, analyses=("patterns",))


@pytest.fixture(scope="module")
def plain(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset made without any analysis."""
    return run(minilm, tmp_path_factory.mktemp("plain"), SAMPLE_TEXTS[:2])


@pytest.fixture(scope="module")
def stats(dataset: Path) -> pd.DataFrame:
    return pd.read_parquet(dataset / "head_stats")


def pixels(path: Path) -> np.ndarray:
    """[height, width, 3] RGB floats of a PNG."""
    return matplotlib.image.imread(path)[..., :3]


def expected_pixels(figure: matplotlib.figure.Figure) -> tuple[int, int]:
    width, height = figure.get_size_inches() * plots.DPI
    return round(height), round(width)


# ----------------------------------------------------------------------- the numbers drawn


def test_stat_matrix_is_the_groupby_mean_of_head_stats(dataset: Path, stats: pd.DataFrame) -> None:
    model = Dataset.open(dataset).manifest["model"]
    for stat in [*STAT_NAMES, "n_tokens"]:
        means = stats.astype({stat: np.float64}).groupby(["layer", "head"])[stat].mean()
        expected = means.unstack("head").to_numpy()
        matrix = stat_matrix(dataset, stat)
        assert matrix.shape == (model["num_layers"], model["num_heads"]), stat
        # float64 means of the same float32 values (head_summary's running sums vs pandas):
        # ≤ 2N·eps64·max|v|, ~1e-13 for these few windows; 1e-9 (was 1e-6: looser than needed)
        np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-9, err_msg=stat)


def test_pattern_matrix_is_each_heads_most_frequent_class(dataset: Path) -> None:
    patterns = pd.read_parquet(dataset / "head_patterns")
    counts = pd.crosstab([patterns["layer"], patterns["head"]], patterns["pattern"])
    counts = counts.reindex(columns=[c for c in PATTERN_CLASSES if c in counts.columns])
    classes, shares = pattern_matrix(dataset)
    for (layer, head), row in counts.iterrows():
        assert classes[layer, head] == row.idxmax()  # idxmax: first of equal counts
        # a ratio of integer counts: one float64 division either way, ≤ 1 ulp apart
        assert shares[layer, head] == pytest.approx(row.max() / row.sum(), abs=1e-12)
    assert len(counts) == classes.size


def test_without_head_summary_the_same_numbers_come_from_the_window_tables(
        dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shutil.rmtree(copy / "head_summary")
    # float64 means of the same float32 values by two paths (summary vs window tables):
    # ≤ 2N·eps64·max|v|, ~1e-13 for these few windows
    for stat in ("entropy", "mass_sep", "k90"):
        np.testing.assert_allclose(stat_matrix(copy, stat), stat_matrix(dataset, stat),
                                   rtol=0, atol=1e-9)
    # classes and shares: counts of the same stored classes, the same float64 division
    for got, want in zip(pattern_matrix(copy), pattern_matrix(dataset), strict=True):
        np.testing.assert_array_equal(got, want)


def test_layer_values_are_the_non_null_rows(dataset: Path, stats: pd.DataFrame) -> None:
    values = layer_values(dataset, "mean_distance")
    assert list(values.columns) == ["layer", "head", "mean_distance"]
    assert len(values) == stats["mean_distance"].notna().sum() == len(stats)


# ----------------------------------------------------------------------- the images


@pytest.mark.parametrize(("kind", "build", "inked"), [
    ("heatmap", lambda ds: heatmap_figure(ds, "entropy"), 0.4),
    ("patterns", patterns_figure, 0.4),
    ("layers", lambda ds: layers_figure(ds, "entropy"), 0.1),
])
def test_png_has_the_figure_size_and_is_drawn(dataset: Path, tmp_path: Path, kind: str,
                                              build: Callable, inked: float) -> None:
    out = plot(dataset, "entropy", kind, tmp_path / f"{kind}.png")
    assert out == tmp_path / f"{kind}.png"
    image = pixels(out)
    assert image.shape[:2] == expected_pixels(build(dataset))
    assert image.shape[0] > 300 and image.shape[1] > 600
    colours = np.unique((image * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50
    assert (image < 0.95).any(axis=-1).mean() > inked  # share of pixels that are not white


def test_heatmap_cells_follow_the_statistic(dataset: Path, tmp_path: Path) -> None:
    first = pixels(plot(dataset, "entropy", "heatmap", tmp_path / "entropy.png"))
    second = pixels(plot(dataset, "mass_prev", "heatmap", tmp_path / "prev.png"))
    assert first.shape == second.shape
    changed = np.abs(first - second).max(axis=-1) > 0.1
    assert changed.mean() > 0.3


def test_svg_has_one_cell_per_head_in_the_colour_of_its_value(dataset: Path,
                                                              tmp_path: Path) -> None:
    out = plot(dataset, "mass_prev", "heatmap", tmp_path / "prev.svg")
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG}svg"
    group = next(e for e in root.iter(f"{SVG}g") if e.get("id") == "heatmap-cells")
    fills = [p.get("style").removeprefix("fill: ") for p in group.iter(f"{SVG}path")]
    matrix = stat_matrix(dataset, "mass_prev")
    assert len(fills) == matrix.size == 72
    colour = matplotlib.colormaps[plots.CMAP]
    norm = Normalize(matrix.min(), matrix.max())
    assert fills == [to_hex(colour(norm(value))) for value in matrix.ravel()]
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "mass_prev" in texts and "minilm" in texts and "13 windows" in texts


def test_heatmap_annotates_small_grids_and_labels_the_unit(dataset: Path) -> None:
    figure = heatmap_figure(dataset, "entropy")
    ax, colourbar = figure.axes
    matrix = stat_matrix(dataset, "entropy")
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in matrix.ravel()]
    assert colourbar.get_ylabel() == "entropy (nats)"
    windows = Dataset.open(dataset).manifest["counts"]["documents"]
    assert f"minilm, {windows} windows" in ax.get_title(loc="left")


def test_pattern_map_legend_names_the_classes_present(dataset: Path, tmp_path: Path) -> None:
    classes, _ = pattern_matrix(dataset)
    present = [c for c in PATTERN_CLASSES if (classes == c).any()]
    assert len(present) >= 2
    figure = patterns_figure(dataset)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert [text.split(" (")[0] for text in legend] == present
    assert sum(int(text.split("(")[1].split()[0]) for text in legend) == classes.size
    svg = plot(dataset, None, "patterns", tmp_path / "classes.svg").read_text()
    assert all(name in svg for name in present)


def test_layers_plot_draws_each_layers_median(dataset: Path, stats: pd.DataFrame) -> None:
    figure = layers_figure(dataset, "entropy")
    ax = figure.axes[0]
    medians = [line for line in ax.lines if line.get_color() == "#08306b"]
    drawn = [line.get_ydata()[0] for line in medians]
    expected = stats.groupby("layer")["entropy"].median().to_numpy()
    # a median of an even count averages two float32 values, in float32 or float64: ≤ eps32
    # relative apart (rtol 1e-6 ≈ 8·eps32)
    np.testing.assert_allclose(drawn, expected, rtol=1e-6)
    assert len(ax.collections[0].get_offsets()) == 72  # a dot per head


def test_cli_writes_the_plot(dataset: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k90.svg"
    assert main(["plot", str(dataset), "--stat", "k90", "--kind", "layers",
                 "--out", str(out)]) == 0
    assert ET.parse(out).getroot().tag == f"{SVG}svg"
    assert main(["plot", str(dataset), "--stat", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown statistic 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------- the errors


def test_unknown_statistic_lists_the_available_ones(dataset: Path, tmp_path: Path) -> None:
    for kind in ("heatmap", "layers"):
        with pytest.raises(PlotError, match="unknown statistic 'entropie'; available: "
                                            "entropy, entropy_norm, max_weight, .*, k90"):
            plot(dataset, "entropie", kind, tmp_path / "x.png")
    with pytest.raises(PlotError, match="unknown statistic None"):
        stat_matrix(dataset, None)
    assert not (tmp_path / "x.png").exists()


def test_unknown_kind_and_format(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="unknown plot kind 'bars': use heatmap, patterns, "
                                        "layers"):
        plot(dataset, "entropy", "bars", tmp_path / "x.png")
    for name in ("x.jpg", "x.pdf", "x"):
        with pytest.raises(PlotError, match=r"must end in \.png or \.svg"):
            plot(dataset, "entropy", "heatmap", tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    assert plot(dataset, "entropy", "heatmap", tmp_path / "upper.PNG").stat().st_size > 0


def test_pattern_map_without_the_analysis(plain: Path, tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="no pattern analysis .* run the job with --analyses "
                                        "patterns"):
        plot(plain, None, "patterns", tmp_path / "x.png")
    assert plot(plain, "entropy", "heatmap", tmp_path / "ok.png").is_file()


def test_empty_dataset(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "empty"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("*.parquet"))
    atomic_write_parquet(copy / "head_summary" / "part-00000.parquet",
                         schema.HEAD_SUMMARY.empty_table(), 65536)
    for kind in plots.KINDS:
        with pytest.raises(PlotError, match="is empty: no head statistics"):
            plot(copy, "entropy", kind, tmp_path / "x.png")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(dataset / "manifest.json", bare)
    with pytest.raises(PlotError, match="is empty: it has no head_stats table"):
        plot(bare, "entropy", "heatmap", tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="not a headscope dataset"):
        plot(tmp_path / "missing", "entropy", "heatmap", tmp_path / "x.png")


def test_a_statistic_null_everywhere(gpt2: TorchBackend, tmp_path: Path) -> None:
    gpt2_dataset = run(gpt2, tmp_path, SAMPLE_TEXTS[:2])
    with pytest.raises(PlotError, match="mass_sep is null for every head of this dataset "
                                        r"\(.*null without a separator token\)"):
        plot(gpt2_dataset, "mass_sep", "heatmap", tmp_path / "x.png")
    assert plot(gpt2_dataset, "mass_first", "layers", tmp_path / "first.png").is_file()
