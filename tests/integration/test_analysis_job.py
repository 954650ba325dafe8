"""Analyses inside a corpus job: tables, corpus summaries, shards merged, resume, ablate CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import CLI, SAMPLE_TEXTS

from pipelines.analysis import registry
from pipelines.analysis.batch import model_tables, sort_tables
from pipelines.analysis.registry import parse_analyses
from pipelines.analysis.similarity import PARTS
from pipelines.backends.batching import collate, plan_batches
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.patterns import PATTERN_CLASSES
from pipelines.compute.similarity import HeadSimilarity
from pipelines.config import ConfigError, RunConfig, WindowConfig
from pipelines.dataset.reader import Dataset
from pipelines.dataset.tables import concat
from pipelines.jobs.local import run_job
from pipelines.text.tokenize import Document, Windower

ANALYSES = ("patterns", "words", "similarity")
WINDOWS = WindowConfig(max_length=32, stride=8)
TEXTS = [*SAMPLE_TEXTS, " ".join(SAMPLE_TEXTS) * 2, "Is it raining?", "Yes; it pours."]


def corpus(folder: Path) -> Path:
    path = folder / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(**changes: object) -> RunConfig:
    values: dict = {"model": "minilm", "device": "cpu", "windows": WINDOWS,
                    "analyses": ANALYSES, "shard_tokens": 40, **changes}
    return RunConfig(**values)


@pytest.fixture(scope="module")
def analysed(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("analysed")
    run_job([corpus(folder)], folder / "ds", config(), backend=minilm, progress=False)
    return folder / "ds"


def all_windows(backend: TorchBackend) -> list:
    windower = Windower(backend.tokenizer, backend.info, WINDOWS)
    return [w for i, t in enumerate(TEXTS) for w in windower.windows(Document(f"d{i}", t))]


def test_parse_analyses() -> None:
    assert parse_analyses("similarity, patterns") == ("patterns", "similarity")
    assert parse_analyses("") == ()
    with pytest.raises(ConfigError, match="unknown analysis attention: use patterns"):
        parse_analyses("patterns,attention")


def test_every_analysis_table_is_written_and_counted(analysed: Path) -> None:
    manifest = Dataset.open(analysed).manifest
    assert manifest["status"] == "complete" and set(manifest["analyses"]) == set(ANALYSES)
    assert manifest["analyses"]["patterns"]["classes"] == list(PATTERN_CLASSES)
    shards = len(list((analysed / "_shards").glob("*.json")))
    assert shards > 2
    for table in ("head_patterns", "words", "word_attention"):
        frame = pd.read_parquet(analysed / table)
        assert len(frame) == manifest["counts"][table] > 0, table
        assert len(list((analysed / table).glob("part-*.parquet"))) == shards
    stats = pd.read_parquet(analysed / "head_stats")
    patterns = pd.read_parquet(analysed / "head_patterns")
    keys = registry.sort_keys()["head_stats"]
    pd.testing.assert_frame_equal(stats[keys], patterns[keys])  # one class per head row
    assert set(patterns["pattern"]) <= set(PATTERN_CLASSES)


def test_head_summary_has_the_share_of_each_class(analysed: Path) -> None:
    summary = pd.read_parquet(analysed / "head_summary")
    patterns = pd.read_parquet(analysed / "head_patterns")
    shares = summary.filter(like="share_")
    assert len(shares.columns) == len(PATTERN_CLASSES)
    # float64 count ratios, ≤ 6 of them summed: ≤ 6·eps64 ≈ 1e-15 (was 1e-9, looser than needed)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    head = patterns[(patterns["layer"] == 2) & (patterns["head"] == 7)]["pattern"]
    row = summary[(summary["layer"] == 2) & (summary["head"] == 7)].iloc[0]
    for name in PATTERN_CLASSES:
        # count / N in float64 either way: ≤ 1 ulp, within approx's default rel 1e-6
        assert row[f"share_{name.replace('+', '_')}"] == pytest.approx((head == name).mean())


def test_similarity_merged_over_shards_equals_one_pass(analysed: Path,
                                                       minilm: TorchBackend) -> None:
    """The job accumulates per shard and merges at the end; one accumulator must agree."""
    windows = all_windows(minilm)
    whole = HeadSimilarity(minilm.info.num_layers, minilm.info.num_heads)
    heads = minilm.info.num_layers * minilm.info.num_heads
    for indices in plan_batches([w.n_tokens for w in windows], 160, heads):
        batch = collate([windows[i] for i in indices], minilm.info.pad_token_id)
        whole.add(minilm.attentions(batch), batch.valid)
    merged = pq.read_table(analysed / "head_similarity").to_pandas()
    n = heads
    assert len(merged) == n * n
    # the job's batches vs this plan (float32 attention under other shapes: ≲ 1e-6 of the
    # distance, test_similarity.TOL), float64 per-shard sums merged, stored as float32
    # (≤ eps32/2 ≈ 6e-8 for distances ≤ 1): 1e-5 keeps a 10x margin over the ~1.1e-6
    np.testing.assert_allclose(merged["js_distance"].to_numpy().reshape(n, n), whole.distance(),
                               rtol=0, atol=1e-5)
    assert (merged["n_rows"] == whole.rows).all()
    coords = pq.read_table(analysed / "head_coords").to_pandas()
    assert len(coords) == n and np.isfinite(coords[["x", "y"]].to_numpy()).all()
    assert PARTS not in Dataset.open(analysed).manifest["counts"]


def test_similarity_docs_limits_the_sample(minilm: TorchBackend, tmp_path: Path) -> None:
    run_job([corpus(tmp_path)], tmp_path / "ds", config(analyses=("similarity",),
                                                         similarity_docs=2),
            backend=minilm, progress=False)
    windows = [w for w in all_windows(minilm) if w.doc.doc_id in ("d0", "d1")]
    rows = sum(w.n_tokens for w in windows)
    merged = pq.read_table(tmp_path / "ds" / "head_similarity").to_pandas()
    assert (merged["n_rows"] == rows).all()


def test_resume_with_analyses_gives_the_same_tables(minilm: TorchBackend, analysed: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "ds"
    run_job([corpus(tmp_path)], out, config(), backend=minilm, progress=False)
    for marker in sorted((out / "_shards").glob("*.json"))[2:]:  # as if killed after shard 2
        marker.unlink()
    (out / "head_summary" / "part-00000.parquet").unlink()
    run_job([corpus(tmp_path)], out, config(), backend=minilm, progress=False, resume=True)
    for table in ("head_patterns", "words", "word_attention", "head_similarity", "head_summary"):
        # bitwise: resumed shards rerun the same windows and batch shapes on the same kernels,
        # and the finals are rebuilt from the same parts and float64 partial sums
        pd.testing.assert_frame_equal(pd.read_parquet(out / table),
                                      pd.read_parquet(analysed / table), obj=table,
                                      check_exact=True)


def test_patterns_are_stable_under_batching(minilm: TorchBackend) -> None:
    windows = all_windows(minilm)
    run = RunConfig(analyses=("patterns",))
    batched = model_tables(minilm, windows, run)["head_patterns"]
    single = sort_tables({"head_patterns": concat(
        model_tables(minilm, [w], run) for w in windows)["head_patterns"]})
    # classes threshold float32 scores that move by ≲ 1e-5 between batch shapes: equal unless
    # a score sits that close to a class boundary, which these heads do not
    assert batched["pattern"].equals(single["head_patterns"]["pattern"])


def test_ablate_cli_writes_head_importance(tmp_path: Path, gpt2_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    docs = corpus(tmp_path)
    done = subprocess.run([*CLI, "ablate", str(docs), "--out", str(tmp_path / "ab"), "--model",
                           str(gpt2_dir), "--heads", "0.1", "--heads", "1.*", "--device", "cpu",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = Dataset.open(tmp_path / "ab").table("head_importance")
    assert table["disabled"].tolist() == ["0.1", "1.*"]
    assert table["metric"].tolist() == ["lm_loss", "lm_loss"] and (table["delta"] != 0).all()
    bad = subprocess.run([*CLI, "ablate", str(docs), "--out", str(tmp_path / "bad"), "--model",
                          str(gpt2_dir), "--heads", "9.1", "--device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "layer 9 is out of range" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_the_documented_pandas_recipes_run(analysed: Path, capsys: pytest.CaptureFixture) -> None:
    """docs/analysis.md's recipe block, run as written on a real analysed dataset."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "analysis.md").read_text()
    code = text.split("## Recipes", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"runs/a"', repr(str(analysed))).replace('"j1"', '"d4"')
    exec(compile(code, "docs/analysis.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "attends_to" in printed and "js_distance" in printed


def test_roberta_job_keeps_the_tokenizers_offsets_and_whole_words(
        roberta: TorchBackend, roberta_dir: Path, tmp_path: Path) -> None:
    """A corpus job on a RoBERTa model (byte-level BPE with offset trimming): the tokens
    table holds the tokenizer's own offsets (trimmed once) and its surfaces, and the words
    table whole words (issue: "Le, afé, '', '', ōkyō, 京, s, aïve")."""
    text = "Le café 😀 à Tōkyō 東京 is naïve — ok."
    path = tmp_path / "accented.jsonl"
    path.write_text(json.dumps({"id": "acc", "text": text}) + "\n", encoding="utf-8")
    run_job([path], tmp_path / "ds", config(model=str(roberta_dir), analyses=("words",)),
            backend=roberta, progress=False)
    ds = Dataset.open(tmp_path / "ds")
    tokens = ds.tokens("acc").sort_values("position")
    own = roberta.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    content = ~np.asarray(own["special_tokens_mask"], dtype=bool)
    offsets = np.asarray(own["offset_mapping"])[content]
    np.testing.assert_array_equal(tokens["char_start"].to_numpy()[content], offsets[:, 0])
    np.testing.assert_array_equal(tokens["char_end"].to_numpy()[content], offsets[:, 1])
    assert list(tokens["surface"][content]) == [text[a:b] for a, b in offsets]
    words = ds.table("words").sort_values("word")["text"].tolist()
    assert words == ["<s>", "Le", "café", "😀", "à", "Tōkyō", "東京", "is", "naïve", "—", "ok",
                     ".", "</s>"]
