"""Other engines read a dataset directly: DuckDB, Polars and pyarrow datasets get pandas' rows.

The recipes of docs/datasets.md, on a dataset of several parts per table, next to a leftover
temporary file named as the writer names them (what a killed job leaves behind): a
``*.parquet`` glob must not read it. Values are compared exactly (float16 weights read as
float32 or float16 are the same numbers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig
from pipelines.dataset.writer import temp_file
from pipelines.jobs.local import run_job

duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra")
pl = pytest.importorskip("polars", reason="polars is in the test extra")

DOCS = [{"id": "cat", "text": "The cat sat on the mat. It was happy!"},
        {"id": "pair", "text": "Is attention all you need?", "text_pair": "Perhaps not."},
        {"id": "tiny", "text": "Short."}]


@pytest.fixture(scope="module")
def root(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("engines")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    config = RunConfig(model="minilm", device="cpu", attention=AttentionMode.parse("full"),
                       shard_tokens=10)  # one document per shard: three parts per table
    run_job([corpus], folder / "ds", config, backend=minilm, progress=False)
    out = folder / "ds"
    assert len(list((out / "attention").glob("part-*.parquet"))) == 3
    for table in ("head_stats", "attention"):  # a complete part under a temporary name
        fd, name = temp_file(out / table / "part-00000.parquet")
        os.close(fd)
        pq.write_table(pq.read_table(out / table / "part-00000.parquet"), name)
    return out


def same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal values row for row after sorting by the non-float columns (dtypes may differ:
    DuckDB reads float16 as float32; nulls are NaN on both sides)."""
    keys = [c for c in want.columns if not pd.api.types.is_float_dtype(want[c])]
    got = got.sort_values(keys).reset_index(drop=True)
    want = want.sort_values(keys).reset_index(drop=True)
    assert list(got.columns) == list(want.columns)
    for column in want.columns:
        pd.testing.assert_series_equal(got[column], want[column], check_dtype=False,
                                       check_exact=True, obj=column)


def test_duckdb_reads_a_filtered_table(root: Path) -> None:
    want = pd.read_parquet(root / "attention", filters=[("doc_id", "==", "cat"),
                                                        ("layer", "==", 3)])
    got = duckdb.sql(f"select * from read_parquet('{root}/attention/*.parquet') "
                     "where doc_id = 'cat' and layer = 3").df()
    n = int(pd.read_parquet(root / "documents", filters=[("doc_id", "==", "cat")])["n_tokens"][0])
    assert len(want) == 12 * n * n  # full: every (head, query, key) of the window
    same_rows(got, want)


def test_polars_scans_a_filtered_table(root: Path) -> None:
    want = pd.read_parquet(root / "head_stats", filters=[("layer", "==", 3)])
    got = (pl.scan_parquet(f"{root}/head_stats/*.parquet").filter(pl.col("layer") == 3)
           .collect().to_pandas())
    assert len(want) == len(DOCS) * 12
    same_rows(got, want)


def test_polars_joins_weights_to_tokens(root: Path) -> None:
    """The docs' join: each weight with its query and key token (doc_id, window, position)."""
    tokens = pl.scan_parquet(f"{root}/tokens/*.parquet").select(
        "doc_id", "window", "position", "surface")
    got = (pl.scan_parquet(f"{root}/attention/*.parquet")
           .filter((pl.col("doc_id") == "cat") & (pl.col("layer") == 0) & (pl.col("head") == 0))
           .join(tokens, left_on=["doc_id", "window", "query"],
                 right_on=["doc_id", "window", "position"])
           .collect())
    want = pd.read_parquet(root / "attention", filters=[("doc_id", "==", "cat"),
                                                        ("layer", "==", 0), ("head", "==", 0)])
    assert got.height == len(want) and got["surface"].null_count() == 0


def test_pyarrow_datasets_read_a_filtered_table(root: Path) -> None:
    dataset = pads.dataset(root / "attention", format="parquet")
    got = dataset.to_table(filter=(pads.field("doc_id") == "cat") & (pads.field("layer") == 5))
    want = pd.read_parquet(root / "attention", filters=[("doc_id", "==", "cat"),
                                                        ("layer", "==", 5)])
    same_rows(got.to_pandas(), want)


def test_every_engine_counts_the_manifest_rows(root: Path) -> None:
    counts = json.loads((root / "manifest.json").read_text())["counts"]
    for table in ("head_stats", "attention", "tokens"):
        glob = f"{root}/{table}/*.parquet"
        assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall() == \
            [(counts[table],)], table
        assert pl.scan_parquet(glob).select(pl.len()).collect().item() == counts[table]
        assert len(pd.read_parquet(root / table)) == counts[table]
