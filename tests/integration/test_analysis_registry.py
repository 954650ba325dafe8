"""The registry of analyses: built-ins keep their order, and a toy analysis defined in one
module (tests/toy_analysis.py) runs in a corpus job and lands in its dataset and manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import toy_analysis
from conftest import SAMPLE_TEXTS

from pipelines.analysis import registry
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, ConfigError, RunConfig, WindowConfig
from pipelines.dataset.reader import Dataset
from pipelines.jobs.local import run_job

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
KEYS = ["doc_id", "window", "layer", "head"]


def diagonal_reference(root: Path) -> pd.DataFrame:
    """Per (doc_id, window, layer, head): mean over query rows of the stored weight on self."""
    attention = pq.read_table(root / "attention").to_pandas()
    documents = pq.read_table(root / "documents", columns=["doc_id", "window", "n_tokens"])
    on_self = attention[attention["query"] == attention["key"]]
    sums = on_self.groupby(KEYS, sort=True)["weight"].sum().astype(np.float64).reset_index()
    sums = sums.merge(documents.to_pandas(), on=["doc_id", "window"])
    sums["diagonal_mass"] = sums["weight"] / sums["n_tokens"]
    return sums[[*KEYS, "diagonal_mass"]]


def test_builtins_in_canonical_order_and_plugin_after_them() -> None:
    assert registry.names()[:3] == ("patterns", "words", "similarity")
    assert toy_analysis.NAME in registry.names()
    assert registry.parse_analyses(f"{toy_analysis.NAME}, similarity,patterns") == (
        "patterns", "similarity", toy_analysis.NAME)
    assert set(registry.service_names()) >= {"patterns", "words", toy_analysis.NAME}
    assert "similarity" not in registry.service_names()
    assert registry.table_owner("word_attention") == "words"
    assert registry.table_owner(toy_analysis.TABLE) == toy_analysis.NAME
    assert registry.table_owner("head_stats") is None
    with pytest.raises(ConfigError, match="unknown analysis nope"):
        registry.parse_analyses("patterns,nope")


def test_a_table_cannot_belong_to_two_analyses() -> None:
    clash = registry.Analysis("clash", tables=toy_analysis.ANALYSIS.tables)
    with pytest.raises(ValueError, match="already belongs"):
        registry.register(clash)
    assert "clash" not in registry.names()


def test_toy_analysis_in_a_corpus_job(tmp_path: Path, minilm: TorchBackend) -> None:
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join([*SAMPLE_TEXTS, " ".join(SAMPLE_TEXTS)]) + "\n")
    config = RunConfig(attention=AttentionMode("full"), windows=WindowConfig(32, 8),
                       shard_tokens=64, analyses=("patterns", toy_analysis.NAME))
    out = tmp_path / "out"
    run_job([inputs], out, config, backend=minilm, progress=False)
    ds = Dataset.open(out)
    assert ds.manifest["analyses"][toy_analysis.NAME] == toy_analysis.DESCRIPTION
    assert list(ds.manifest["analyses"]) == ["patterns", toy_analysis.NAME]
    parts = sorted(p.name for p in (out / toy_analysis.TABLE).iterdir())
    assert len(parts) > 1 and parts == sorted(p.name for p in (out / "head_stats").iterdir())
    table = pq.read_table(out / toy_analysis.TABLE)
    assert table.schema.equals(toy_analysis.SCHEMA)
    assert ds.manifest["counts"][toy_analysis.TABLE] == table.num_rows \
        == ds.manifest["counts"]["head_stats"]
    got = table.to_pandas()
    assert got[KEYS].equals(got[KEYS].sort_values(KEYS).reset_index(drop=True))  # sort order
    want = diagonal_reference(out)
    merged = got.merge(want, on=KEYS, suffixes=("", "_numpy"))
    assert len(merged) == len(got) == len(want)
    np.testing.assert_allclose(merged["diagonal_mass"], merged["diagonal_mass_numpy"],
                               rtol=0, atol=2e-3)  # the stored weights are float16


def test_plugin_option_of_headscope_run(tmp_path: Path) -> None:
    inputs = tmp_path / "in.txt"
    inputs.write_text("The cat sat on the mat.\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}

    def run(out: str, *options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines", "run", str(inputs), "--out",
                               str(tmp_path / out), "--attention", "none", "--no-progress",
                               *options], env=env, cwd=tmp_path, capture_output=True, text=True)

    done = run("out", "--plugin", "toy_analysis", "--analyses", toy_analysis.NAME)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["analyses"] == [toy_analysis.NAME]
    assert manifest["counts"][toy_analysis.TABLE] == 6 * 12  # one window × layers × heads
    refused = run("other", "--analyses", toy_analysis.NAME)  # without --plugin
    assert refused.returncode != 0 and "unknown analysis diagonal" in refused.stderr
