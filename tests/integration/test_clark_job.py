"""``headscope run`` with Clark et al.'s (2019) conventions against the defaults: the manifest
records them, tokens.is_punct follows the rule, only entropy and mass_punct change in
head_stats, and the summed head divergences merge over shards as sums."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_TEXTS
from tolerances import EPS64

from pipelines.analysis.similarity import PARTS
from pipelines.cli import main
from pipelines.compute.stats import DEFINITIONS, STAT_NAMES
from pipelines.dataset.reader import Dataset

TEXTS = [*SAMPLE_TEXTS, "Wait: is it 'done'? Yes; no (maybe) - fine, fine.",
         " ".join(SAMPLE_TEXTS)]
CLARK = ["--punctuation", "clark", "--entropy-epsilon", "clark", "--similarity-measure",
         "clark", "--word-rows", "first"]


def run(tmp: Path, name: str, *options: str) -> tuple[int, str, Path]:
    """(exit code, stderr, --out) of an in-process `headscope run` on TEXTS."""
    corpus = tmp / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS)), encoding="utf-8")
    out, stderr = tmp / name, io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["run", str(corpus), "--out", str(out), "--device", "cpu", "--no-progress",
                     "--max-length", "32", "--stride", "8", "--shard-tokens", "40",
                     "--analyses", "words,similarity", *options])
    return code, stderr.getvalue(), out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("clark")
    out = {}
    for name, options in (("default", []), ("clark", CLARK)):
        code, stderr, out[name] = run(tmp, name, *options)
        assert code == 0, stderr
    return out


def test_manifest_records_the_conventions(datasets: dict[str, Path]) -> None:
    clark = Dataset.open(datasets["clark"]).manifest
    default = Dataset.open(datasets["default"]).manifest
    assert clark["config"]["windows"]["punctuation"] == "clark"
    assert (clark["config"]["entropy_epsilon"], clark["config"]["similarity_measure"],
            clark["config"]["word_rows"]) == (1e-4, "clark", "first")
    stats = clark["statistics"]
    assert stats["definitions"] == DEFINITIONS and stats["entropy_epsilon"] == 1e-4
    assert stats["punctuation"]["rule"] == "clark"
    assert set(stats["clark_et_al_2019"]) == set(DEFINITIONS)
    for name in ("entropy", "mass_punct", "mass_prev", "mass_sep"):
        assert stats["clark_et_al_2019"][name].startswith("same"), name
        assert default["statistics"]["clark_et_al_2019"][name].startswith(
            "differs" if name in ("entropy", "mass_punct") else "same"), name
    assert clark["analyses"]["similarity"]["measure"] == "clark"
    assert clark["analyses"]["words"]["word_rows"] == "first"
    assert clark["job_key"] != default["job_key"]


def test_tokens_is_punct_follows_the_rule(datasets: dict[str, Path]) -> None:
    tokens = {name: pd.read_parquet(path / "tokens") for name, path in datasets.items()}
    clark, default = tokens["clark"], tokens["default"]
    assert clark["token"].equals(default["token"])
    np.testing.assert_array_equal(clark["is_punct"], clark["token"].isin([".", ","]))
    assert (default["is_punct"] & ~clark["is_punct"]).sum() >= 8  # : ' ? ; ( ) - ! ...
    assert not (clark["is_punct"] & ~default["is_punct"]).any()


def test_only_entropy_and_mass_punct_change(datasets: dict[str, Path]) -> None:
    clark, default = (pd.read_parquet(datasets[n] / "head_stats") for n in ("clark", "default"))
    for name in STAT_NAMES:
        if name not in ("entropy", "mass_punct"):
            # bitwise: the same windows in the same batches through the same kernels
            np.testing.assert_array_equal(clark[name], default[name], err_msg=name)
    raised = clark["entropy"] - default["entropy"]  # smoothing raises every entropy
    assert (raised >= -1e-5).all() and raised.max() > 5e-4  # float32 rounding: STAT_ATOL
    # float32 sums over fewer keys of the same weights: ≤ theirs within rounding, STAT_ATOL
    assert (clark["mass_punct"] <= default["mass_punct"] + 1e-5).all()


def test_summed_divergences_merge_as_sums(datasets: dict[str, Path]) -> None:
    root = datasets["clark"]
    parts = pq.read_table(root / PARTS).to_pandas()
    merged = pq.read_table(root / "head_similarity")
    assert merged.schema.field("js_divergence").type == "double"
    assert "js_distance" not in merged.column_names
    keys = ["layer_a", "head_a", "layer_b", "head_b"]
    summed = parts.groupby(keys, sort=True)[["js_divergence", "n_rows"]].sum().reset_index()
    table = merged.to_pandas()
    assert len(parts) >= 2 * 72 * 72  # several shards' partials, 72 × 72 head pairs each
    # float64 sums of the same shard values in another order: ≤ shards·eps64 relative
    np.testing.assert_allclose(table["js_divergence"], summed["js_divergence"],
                               rtol=16 * EPS64, atol=0)
    tokens = pd.read_parquet(root / "documents")["n_tokens"].sum()
    assert (table["n_rows"] == tokens).all()
    assert len(pd.read_parquet(root / "head_coords")) == 72


def test_an_epsilon_outside_zero_to_one_is_a_clean_error(tmp_path: Path) -> None:
    code, stderr, out = run(tmp_path, "bad", "--entropy-epsilon", "2")
    assert code == 2 and not out.exists()
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("headscope: error:")]
    assert "entropy epsilon '2'" in line
