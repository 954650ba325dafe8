"""Transformer factors end to end on MiniLM: train, apply, the tables, the page, the CLI.

The solver itself is checked against scikit-learn and on planted dictionaries in
``tests/unit/compute/test_sparse_coding.py``; here the pipeline around it is checked against plain
recomputations (the model called directly, pandas over the written tables).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from playwright.sync_api import Browser, sync_playwright
from safetensors.torch import load_file
from test_views_browser import CHROMIUM, CHROMIUM_ARGS, Watched

from pipelines.backends.torch.backend import TorchBackend
from pipelines.cli import main
from pipelines.compute.sparse_coding import encode
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.factors.apply import CONTEXT, apply_factors
from pipelines.jobs.factors.train import FactorConfig, train_factors
from pipelines.views.factor_page import render_factor_page

CONFIG = FactorConfig(model="minilm", device="cpu", n_factors=96, sparsity=0.15, epochs=2,
                      minibatch=1024, shuffle_batches=2, seed=3)
TOP = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factors") / "demo.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in paragraphs()[:40]))
    return path


@pytest.fixture(scope="module")
def trained(corpus: Path) -> tuple[Path, dict]:
    out = corpus.parent / "dictionary"
    return out, train_factors([corpus], out, CONFIG, progress=False)


@pytest.fixture(scope="module")
def codes(trained: tuple[Path, dict], corpus: Path) -> Path:
    out = corpus.parent / "codes"
    apply_factors(trained[0], [corpus], out, device="cpu", top=TOP, shard_tokens=1500,
                  progress=False)
    return out


def table(root: Path, name: str) -> pd.DataFrame:
    frame = pd.read_parquet(root / name)
    if "doc_id" in frame:
        frame["doc_id"] = frame["doc_id"].astype(str)
    return frame


def content_states(minilm: TorchBackend, mine: pd.DataFrame) -> list[torch.Tensor]:
    """Per layer, the unit-length hidden states [n, D] of one window's non-special tokens
    (``mine``: its rows of ``tokens``, by position), from the model called directly."""
    ids = torch.tensor(mine["token_id"].to_numpy(np.int64))[None]  # [1, S]
    with torch.inference_mode():
        states = minilm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                              output_hidden_states=True).hidden_states  # L+1 × [1, S, D]
    content = torch.from_numpy(~mine["is_special"].to_numpy())  # [S]
    return [layer[0][content] / layer[0][content].norm(dim=1, keepdim=True) for layer in states]


def test_training_reports_errors_and_sparsity_per_layer(trained: tuple[Path, dict],
                                                        minilm: TorchBackend) -> None:
    folder, manifest = trained
    atoms = load_file(str(folder / "dictionary.safetensors"))["dictionary"]
    assert tuple(atoms.shape) == (96, 384)
    # float32 unit atoms of D = 384: the norm rounds by ≤ D·eps32 ≈ 4.6e-5
    np.testing.assert_allclose(atoms.norm(dim=1).numpy(), 1.0, atol=1e-4)
    evaluation = manifest["evaluation"]
    assert manifest["layers"] == list(range(7))
    assert set(evaluation["relative_error_by_layer"]) == {str(x) for x in range(7)}
    assert all(0 < e < 1 for e in evaluation["relative_error_by_layer"].values())
    assert 1 <= evaluation["mean_active"] <= 96 / 4
    content = [len(minilm.tokenizer.encode(row["text"], add_special_tokens=False))
               for row in paragraphs()[:40]]
    assert max(content) <= 510  # one window each: [CLS] and [SEP] are the only special tokens
    rows = sum(evaluation["rows_by_layer"].values())
    assert rows == manifest["rows"]["rows"] == 7 * sum(content)


def test_the_evaluation_equals_a_numpy_recomputation(codes: Path, trained: tuple[Path, dict],
                                                      minilm: TorchBackend) -> None:
    """Per-layer error, floor and sparsity from the model called directly and the written codes."""
    atoms = load_file(str(trained[0] / "dictionary.safetensors"))["dictionary"].double().numpy()
    activations = table(codes, "factor_activations")
    sums = {key: np.zeros(7) for key in ("error", "norm", "negative", "active", "rows")}
    for doc_id, mine in table(codes, "tokens").groupby("doc_id"):
        mine = mine.sort_values("position")
        content = ~mine["is_special"].to_numpy()
        dense = np.zeros((7, len(mine), len(atoms)))  # [layer, position, factor]
        got = activations[activations["doc_id"] == doc_id]
        dense[got["layer"].to_numpy(int), got["position"].to_numpy(int),
              got["factor"].to_numpy(int)] = got["activation"].to_numpy()
        for layer, states in enumerate(content_states(minilm, mine)):
            x = states.double().numpy()  # [n, D]
            alpha = dense[layer][content]  # [n, k]
            sums["error"][layer] += np.square(x - alpha @ atoms).sum()
            sums["norm"][layer] += np.square(x).sum()
            sums["negative"][layer] += np.square(np.minimum(x, 0)).sum()
            sums["active"][layer] += (alpha > 0).sum()
            sums["rows"][layer] += len(x)
    evaluation = trained[1]["evaluation"]
    # not the same computation: the job encodes float32 rows of its own batches (codes within
    # the solver's accuracy, DEFAULT_TOL = 1e-4 of the objective: the relative error within
    # ~1e-3), this sums float64 from the stored codes and a direct forward pass. The floor
    # only involves hidden states (float32, other batch shapes, ~1e-6 relative, summed
    # pairwise: ≲ 3e-6): rel 1e-4. A code near 0 may be active in one run only: mean_active
    # within 0.01 of a count per row
    for layer in range(7):
        key = str(layer)
        assert evaluation["rows_by_layer"][key] == sums["rows"][layer]
        assert evaluation["relative_error_by_layer"][key] == pytest.approx(
            sums["error"][layer] / sums["norm"][layer], rel=1e-3)
        assert evaluation["nonneg_floor_by_layer"][key] == pytest.approx(
            sums["negative"][layer] / sums["norm"][layer], rel=1e-4)
        assert evaluation["mean_active_by_layer"][key] == pytest.approx(
            sums["active"][layer] / sums["rows"][layer], abs=0.01)
    assert evaluation["relative_error"] == pytest.approx(sums["error"].sum() / sums["norm"].sum(),
                                                         rel=1e-3)


def test_a_dictionary_folder_is_write_once(trained: tuple[Path, dict], corpus: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    before = (trained[0] / "dictionary.safetensors").read_bytes()
    assert main(["factors", "train", str(corpus), "--out", str(trained[0]),
                 "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (trained[0] / "dictionary.safetensors").read_bytes() == before


def test_codes_equal_a_direct_forward_pass(codes: Path, trained: tuple[Path, dict],
                                           minilm: TorchBackend) -> None:
    """Bookkeeping check: one document recomputed by calling the model directly."""
    activations = table(codes, "factor_activations")
    tokens = table(codes, "tokens")
    doc_id = str(tokens["doc_id"].iloc[0])
    mine = tokens[tokens["doc_id"] == doc_id].sort_values("position")
    atoms = load_file(str(trained[0] / "dictionary.safetensors"))["dictionary"]
    content = ~mine["is_special"].to_numpy()
    got = activations[activations["doc_id"] == doc_id]
    for layer, x in enumerate(content_states(minilm, mine)):
        want = encode(x, atoms, CONFIG.sparsity, CONFIG.encode_steps).numpy()  # [n, k]
        positions = mine["position"].to_numpy()[content]
        dense = np.zeros_like(want)
        rows = got[got["layer"] == layer]
        slot = {p: i for i, p in enumerate(positions)}
        dense[[slot[p] for p in rows["position"]], rows["factor"].to_numpy(int)] = \
            rows["activation"]
        # the job coded this window in other (padded, multi-window) float32 batches, so as in
        # the next test the solver's accuracy bounds it, not rounding: 1e-3 (was 1e-4, below
        # the 2e-4 of the largest code seen between batch shapes in test_sparse_coding)
        np.testing.assert_allclose(dense, want, rtol=0, atol=1e-3, err_msg=f"layer {layer}")


def test_codes_do_not_depend_on_the_forward_batch(codes: Path, trained: tuple[Path, dict],
                                                  corpus: Path) -> None:
    """The fixture's batches hold up to 8,192 padded tokens; here at most 256, so windows are
    padded to other lengths and encoded beside other rows. Float32 rounds differently for
    other batch shapes, which can move a row's stopping step: codes agree within the solver's
    accuracy (1e-3, as against scikit-learn), and almost all of them exactly."""
    out = corpus.parent / "codes-small-batches"
    apply_factors(trained[0], [corpus], out, device="cpu", top=TOP, shard_tokens=1500,
                  batch_tokens=256, progress=False)
    keys = ["doc_id", "window", "layer", "position", "factor"]
    both = table(codes, "factor_activations").merge(
        table(out, "factor_activations"), on=keys, how="outer", suffixes=("", "_small"))
    assert len(both) > 10_000
    both = both.fillna(0.0)  # a code written by one run only is zero in the other
    difference = (both["activation_small"] - both["activation"]).abs()
    assert float(difference.max()) <= 1e-3
    assert float((difference <= 1e-6).mean()) >= 0.99


def test_top_contexts_are_the_largest_codes(codes: Path) -> None:
    activations = table(codes, "factor_activations")
    top = table(codes, "factor_top")
    want = (activations.sort_values(["factor", "layer", "activation", "doc_id", "window",
                                     "position"],
                                    ascending=[True, True, False, True, True, True])
            .groupby(["factor", "layer"]).head(TOP).reset_index(drop=True))
    got = top.sort_values(["factor", "layer", "rank"]).reset_index(drop=True)
    keys = ["factor", "layer", "doc_id", "window", "position"]
    pd.testing.assert_frame_equal(got[keys], want[keys], check_dtype=False)  # no floats
    # exact: factor_top copies the stored float32 activations it ranks
    np.testing.assert_array_equal(got["activation"], want["activation"])
    # contexts show what a person reads: the source characters of each token
    texts = {key: list(group.sort_values("position")["surface"].str.strip())
             for key, group in table(codes, "tokens").groupby(["doc_id", "window"])}
    anchors = list(zip(got["doc_id"], got["window"], got["position"], strict=True))
    assert list(got["token"]) == [texts[(d, w)][p] for d, w, p in anchors]
    assert list(got["before"]) == [" ".join(texts[(d, w)][max(0, p - CONTEXT):p])
                                   for d, w, p in anchors]
    assert list(got["after"]) == [" ".join(texts[(d, w)][p + 1:p + 1 + CONTEXT])
                                  for d, w, p in anchors]
    assert any(p < CONTEXT for _, _, p in anchors)  # contexts cut at both window ends
    assert any(p + CONTEXT >= len(texts[(d, w)]) for d, w, p in anchors)


def test_profile_is_the_mean_code_per_layer(codes: Path, trained: tuple[Path, dict]) -> None:
    activations = table(codes, "factor_activations")
    profile = table(codes, "factor_profile")
    rows = trained[1]["evaluation"]["rows_by_layer"]
    sums = activations.groupby(["factor", "layer"])["activation"].agg(["sum", "count"])
    merged = profile.set_index(["factor", "layer"]).join(sums).fillna(0.0)
    per_layer = merged.index.get_level_values("layer").map(lambda x: rows[str(x)])
    # the profile sums each batch's float32 codes (≥ 0, no cancellation) row by row: ≤ N·eps32
    # relative for N rows a batch, ~√N·eps32 ≈ 4e-6 in practice; pandas sums in float64:
    # rtol 1e-5. Shares are integer counts over rows, one float64 division each: 1 ulp
    np.testing.assert_allclose(merged["mean_activation"], merged["sum"] / per_layer, rtol=1e-5)
    np.testing.assert_allclose(merged["active_share"], merged["count"] / per_layer, rtol=1e-9)
    for factor, group in profile.groupby("factor"):
        peak = int(group.loc[group["mean_activation"].idxmax(), "layer"])
        assert (group["peak_layer"] == peak).all(), factor
        assert set(group["peak"]) == {("low", "middle", "high")[min(3 * peak // 7, 2)]}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make browser` to install Debian's chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                              args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.mark.browser
def test_factor_page_opens_offline(codes: Path, browser: Browser, tmp_path: Path) -> None:
    top = table(codes, "factor_top")
    factor = int(top.groupby("factor").size().idxmax())
    path = tmp_path / "factor.html"
    assert main(["factors", "page", str(codes), "--factor", str(factor), "--out",
                 str(path)]) == 0
    assert path.read_text() == render_factor_page(codes, factor)
    page = browser.new_page()
    watched = Watched(page)
    watched.url = path.resolve().as_uri()
    page.goto(watched.url)
    assert watched.problems == []
    assert page.locator("mark").count() == int((top["factor"] == factor).sum())
    assert page.locator("#profile rect").count() == 7
    page.close()


@pytest.mark.parametrize(("argv", "says"), [
    (["factors", "page", "{codes}", "--factor", "100000", "--out", "{tmp}/f.html"],
     "does not exist"),
    (["factors", "page", "{tmp}", "--factor", "1", "--out", "{tmp}/f.html"],
     "holds no factor codes"),
    (["factors", "apply", "{tmp}", "{corpus}", "--out", "{tmp}/o"], "not a factors dictionary"),
    (["factors", "train", "{corpus}", "--out", "{tmp}/d", "--layers", "9"],
     "layers are 0 (embeddings) to 6"),
    (["factors", "train", "{corpus}", "--out", "{tmp}/d", "--sparsity", "0"],
     "--sparsity must be positive"),
])
def test_cli_errors_say_what_to_fix(argv: list[str], says: str, codes: Path, corpus: Path,
                                    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    filled = [a.format(codes=codes, corpus=corpus, tmp=tmp_path) for a in argv]
    assert main(filled) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "f.html").exists() and not (tmp_path / "d").exists()
