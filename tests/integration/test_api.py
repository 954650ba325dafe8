"""``pipelines.analyze`` in this process: the tables, shards and manifest of a corpus job on the
same texts, a model loaded once, ``save``, views and reprs.

One analysis (full weights, every analysis, long texts windowed, several shards) is compared
with ``run_job`` in this process (the same kernels on the same batches: bitwise equal) and
with ``headscope run`` in a subprocess (``ENGINE_ATOL``: another process may split a
reduction over another number of threads).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_TEXTS
from tolerances import ENGINE_ATOL

import pipelines
from pipelines.api import Analyzer, ModelKey, Result, analyzer, cache_info, clear_cache
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, ConfigError, RunConfig, WindowConfig
from pipelines.dataset.writer import OutputError
from pipelines.jobs.local import run_job
from pipelines.text.inputs import InputError

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"id": "cat", "text": SAMPLE_TEXTS[0]},
        {"id": "pair", "text": "Is it raining?", "text_pair": "It is pouring."},
        {"id": "long", "text": SAMPLE_TEXTS[3]},
        {"id": "short", "text": SAMPLE_TEXTS[2]},
        {"id": "need", "text": SAMPLE_TEXTS[1], "text_pair": "Perhaps."}]
#: Windows of 32 tokens (the long text gets two), shards of about 40 tokens (two parts).
OPTIONS = {"attention": "full", "analyses": "patterns,words,similarity", "max_length": 32,
           "stride": 8, "shard_tokens": 40}
CLI_OPTIONS = ["--attention", "full", "--analyses", "patterns,words,similarity",
               "--max-length", "32", "--stride", "8", "--shard-tokens", "40"]
#: Manifest fields that say when and from what input a dataset was made.
DIFFERS = ("created", "input", "job_key")
#: ``documents`` columns that say where a document came from (a file line, or "python" and
#: the position in the list).
SOURCE_COLUMNS = ["source", "source_line"]


def config() -> RunConfig:
    return RunConfig(model="minilm", device="cpu", attention=AttentionMode.parse("full"),
                     windows=WindowConfig(32, 8), shard_tokens=40,
                     analyses=("patterns", "words", "similarity"))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.DataFrame(ROWS)


@pytest.fixture(scope="module")
def result(frame: pd.DataFrame) -> Result:
    return pipelines.analyze(frame, device="cpu", progress=False, **OPTIONS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def job(corpus: Path, minilm: TorchBackend) -> Path:
    out = corpus.parent / "job"
    run_job([corpus], out, config(), backend=minilm, progress=False)
    return out


@pytest.fixture(scope="module")
def cli(corpus: Path) -> Path:
    out = corpus.parent / "cli"
    done = subprocess.run([sys.executable, "-m", "pipelines", "run", str(corpus), "--out",
                           str(out), "--model", "minilm", "--device", "cpu", "--no-progress",
                           *CLI_OPTIONS], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return out


def table_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def parts(root: Path) -> dict[str, list[str]]:
    """Every Parquet file of every folder (hidden ones too), by folder."""
    return {folder.name: sorted(p.name for p in folder.glob("*.parquet"))
            for folder in sorted(root.iterdir()) if folder.is_dir()}


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in frame.columns if not pd.api.types.is_float_dtype(frame[c])]
    return frame.sort_values(keys).reset_index(drop=True)


def assert_tables_equal(got: pd.DataFrame, want: pd.DataFrame, name: str,
                        atol: float = 0.0) -> None:
    """Same columns, dtypes and rows (sorted); floats within ``atol`` (0: bitwise)."""
    if name == "documents":
        got, want = got.drop(columns=SOURCE_COLUMNS), want.drop(columns=SOURCE_COLUMNS)
    got, want = sorted_frame(got), sorted_frame(want)
    floats = [c for c in want.columns if pd.api.types.is_float_dtype(want[c])]
    pd.testing.assert_frame_equal(got.drop(columns=floats), want.drop(columns=floats),
                                  check_exact=True, obj=name)
    for column in floats:
        if atol == 0.0:
            assert np.array_equal(got[column].to_numpy(), want[column].to_numpy(),
                                  equal_nan=True), f"{name}.{column}"
        else:
            np.testing.assert_allclose(got[column].to_numpy(float), want[column].to_numpy(float),
                                       rtol=0, atol=atol, equal_nan=True,
                                       err_msg=f"{name}.{column}")


# --- the same rows as a corpus job -----------------------------------------------------------


def test_every_table_equals_the_corpus_job_bitwise(result: Result, job: Path) -> None:
    want = pipelines.open_dataset(job)
    assert result.names == list(want.manifest["counts"])
    assert sorted(result.names) == table_names(job)
    assert {"head_patterns", "words", "word_attention", "head_similarity"} <= set(result.names)
    for name in result.names:
        assert_tables_equal(result.tables[name], want.table(name), name)


def test_the_shards_are_the_corpus_jobs(result: Result, job: Path) -> None:
    assert parts(result.dataset.root) == parts(job)
    assert len(parts(job)["head_stats"]) > 1  # the plan really made several shards
    for part in parts(job)["attention"]:
        got = pq.read_table(result.dataset.root / "attention" / part)
        assert got.equals(pq.read_table(job / "attention" / part)), part


def test_documents_say_they_came_from_python(result: Result, job: Path) -> None:
    docs = result.documents.drop_duplicates("doc_id")
    assert set(docs["source"]) == {"python"}
    assert dict(zip(docs["doc_id"], docs["source_line"], strict=True)) == \
        {row["id"]: index for index, row in enumerate(ROWS)}
    assert result.doc_ids == [row["id"] for row in ROWS]
    windows = result.documents.query("doc_id == 'long'")["n_windows"].tolist()
    assert len(windows) == windows[0] == 2


def test_save_equals_headscope_run(result: Result, cli: Path, tmp_path: Path) -> None:
    saved = result.save(tmp_path / "saved")
    assert parts(saved.root) == parts(cli)
    for name in table_names(cli):
        assert_tables_equal(saved.table(name), pipelines.open_dataset(cli).table(name), name,
                            atol=ENGINE_ATOL)
    got, want = saved.manifest, json.loads((cli / "manifest.json").read_text())
    assert got.keys() == want.keys()
    for field in want.keys() - set(DIFFERS):
        assert got[field] == want[field], field
    assert got["input"] == {"source": "python", "documents": len(ROWS),
                            "characters": want["input"]["characters"],
                            "fingerprint": got["input"]["fingerprint"]}
    assert got["status"] == "complete" and got["runtime"]["engine"] == "local"


def test_save_refuses_what_it_must_not_replace(result: Result, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty; pass overwrite=True"):
        result.save(tmp_path / "notes")
    with pytest.raises(OutputError, match="is not a headscope dataset"):
        result.save(tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    first = result.save(tmp_path / "ds")
    (first.root / "extra.txt").write_text("from before")
    again = result.save(tmp_path / "ds", overwrite=True)
    assert not (again.root / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "notes"]  # no staging left


# --- the model is loaded once ----------------------------------------------------------------


def test_a_second_call_reuses_the_loaded_model() -> None:
    clear_cache()
    before = cache_info()
    texts = ["The cat sat on the mat.", ("Is it raining?", "It is pouring.")]
    started = time.perf_counter()
    first = pipelines.analyze(texts, model="minilm", device="cpu", progress=False)
    first_seconds = time.perf_counter() - started
    loaded = analyzer("minilm", device="cpu")  # the cached one: a hit
    started = time.perf_counter()
    second = pipelines.analyze(texts, model="minilm", device="cpu", progress=False)
    second_seconds = time.perf_counter() - started
    after = cache_info()
    assert (after.loads - before.loads, after.hits - before.hits) == (1, 2)
    assert after.models == [ModelKey("minilm", device="cpu")]
    assert analyzer("minilm", device="cpu") is loaded and loaded.load_seconds > 0
    pd.testing.assert_frame_equal(first.head_stats, second.head_stats, check_exact=True)
    print(f"\nfirst call {first_seconds:.2f} s (model load {loaded.load_seconds:.2f} s), "
          f"second call {second_seconds:.2f} s")


def test_an_analyzer_keeps_its_own_model(minilm: TorchBackend) -> None:
    own = Analyzer.from_backend(minilm, ModelKey("minilm", device="cpu"))
    one, two = own.analyze("Short.", progress=False), own.analyze("Short.", progress=False)
    assert own.backend is minilm
    pd.testing.assert_frame_equal(one.head_stats, two.head_stats, check_exact=True)
    assert "minilm" in repr(own) and "6 layers × 12 heads" in repr(own)


def test_the_temporary_folder_goes_with_the_result(minilm: TorchBackend) -> None:
    own = Analyzer.from_backend(minilm, ModelKey("minilm", device="cpu"))
    result = own.analyze("Short.", progress=False)
    root = result.dataset.root
    assert (root / "manifest.json").is_file()
    del result
    gc.collect()
    assert not root.exists()


# --- errors before any work ------------------------------------------------------------------


@pytest.mark.parametrize(("texts", "options", "error", "message"), [
    (["fine", " \t"], {}, InputError, r"texts\[1\]: the text is empty"),
    (["fine", ("ok", "\u200b\u200b")], {}, InputError,
     r"texts\[1\]: document '1': text_pair .* has no content for this model"),
    (["fine"], {"attention": "top:3"}, ConfigError, "unknown attention mode 'top:3'"),
    (["fine"], {"analyses": "patterns,nope"}, ConfigError, "unknown analysis nope"),
    (["fine"], {"max_length": 4096}, ConfigError,
     "exceeds the limit of model 'minilm', 512 tokens"),
    (["fine"], {"batch_tokens": 0}, ConfigError, "batch_tokens must be a positive integer"),
    (["fine"], {"max_length": 0}, ConfigError, "max_length 0 must be a positive number"),
])
def test_bad_input_is_refused_clearly(texts: list, options: dict, error: type,
                                      message: str) -> None:
    with pytest.raises(error, match=message):
        pipelines.analyze(texts, device="cpu", progress=False, **options)


# --- views and reprs -------------------------------------------------------------------------


def test_view_by_id_and_by_position(result: Result) -> None:
    by_id, by_position = result.view("pair", window=0), result.view(1, window=0)
    assert by_id.payload == by_position.payload
    assert by_id.payload["windows"][0]["pair"] is True
    assert "<iframe" in by_id._repr_html_()
    with pytest.raises(IndexError, match="the input had 5 texts"):
        result.view(5)
    with pytest.raises(KeyError, match="no document 'nope'"):
        result.view("nope")


def test_reprs_name_the_model_documents_and_tables(result: Result) -> None:
    text, page = repr(result), result._repr_html_()
    assert "minilm (6 layers × 12 heads), attention full: 5 documents" in text
    for name, count in result.manifest["counts"].items():
        assert f"{name} {count:,}" in text
        assert f"<tr><td>{name}</td><td>{count:,}</td></tr>" in page
    assert len(result.head_stats) == result.manifest["counts"]["head_stats"]
