"""Reading a dataset back with ``pipelines.dataset.reader.Dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tolerances import FLOAT16_ATOL

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig
from pipelines.dataset.reader import Dataset, open_dataset
from pipelines.dataset.schema import TABLES
from pipelines.jobs.local import run_job

DOCS = [
    {"id": "cat", "text": "The cat sat on the mat. It was happy!"},
    {"id": "pair", "text": "Is attention all you need?", "text_pair": "Perhaps, perhaps not."},
    {"id": "tiny", "text": "Short."},
]


@pytest.fixture(scope="module")
def dataset(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    folder = tmp_path_factory.mktemp("reader")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    config = RunConfig(model="minilm", device="cpu", attention=AttentionMode.parse("full"))
    run_job([corpus], folder / "ds", config, backend=minilm, progress=False)
    return Dataset.open(folder / "ds")


def n_tokens(dataset: Dataset, doc_id: str) -> int:
    documents = dataset.table("documents", filters=[("doc_id", "==", doc_id)])
    return int(documents["n_tokens"].iloc[0])


def test_open_and_manifest(dataset: Dataset) -> None:
    assert open_dataset(dataset.root) == dataset
    assert dataset.manifest["status"] == "complete"
    assert dataset.manifest["attention_mode"] == "full"


def test_open_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "head_stats").mkdir()
    with pytest.raises(FileNotFoundError, match="not a headscope dataset") as info:
        Dataset.open(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unknown_table_name(dataset: Dataset) -> None:
    with pytest.raises(KeyError, match="no table 'heads'"):
        dataset.table("heads")


@pytest.mark.parametrize("name", [*TABLES, "head_summary"])
def test_every_table_reads_with_its_count(dataset: Dataset, name: str) -> None:
    assert len(dataset.table(name)) == dataset.manifest["counts"][name] > 0


def test_table_with_filters_and_columns(dataset: Dataset) -> None:
    frame = dataset.table("tokens", filters=[("doc_id", "==", "cat")],
                          columns=["doc_id", "position", "token"])
    assert list(frame.columns) == ["doc_id", "position", "token"]
    assert set(frame["doc_id"]) == {"cat"}
    assert len(frame) == n_tokens(dataset, "cat")


def test_head_stats_by_layer_and_head(dataset: Dataset) -> None:
    layer = dataset.head_stats(layer=2)
    assert set(layer["layer"]) == {2}
    assert len(layer) == len(DOCS) * 12
    one = dataset.head_stats(layer=4, head=7, doc_id="pair")
    assert len(one) == 1
    assert (int(one["layer"].iloc[0]), int(one["head"].iloc[0])) == (4, 7)


def test_tokens_of_a_pair(dataset: Dataset) -> None:
    tokens = dataset.tokens("pair")
    assert tokens["position"].tolist() == list(range(n_tokens(dataset, "pair")))
    assert tokens["token"].iloc[0] == "[CLS]" and tokens["token"].iloc[-1] == "[SEP]"
    assert tokens["segment"].iloc[0] == 0 and tokens["segment"].iloc[-1] == 1
    assert set(tokens["segment"]) == {0, 1}
    assert dataset.tokens("pair", window=1).empty
    assert dataset.tokens("no-such-doc").empty


def test_attention_of_one_head(dataset: Dataset) -> None:
    rows = dataset.attention("cat", layer=1, head=3)
    n = n_tokens(dataset, "cat")
    assert len(rows) == n * n
    assert set(rows["doc_id"]) == {"cat"}
    assert set(zip(rows["layer"], rows["head"], strict=True)) == {(1, 3)}
    assert len(dataset.attention("cat")) == 6 * 12 * n * n


@pytest.mark.parametrize(("doc_id", "layer", "head"), [("cat", 0, 0), ("pair", 5, 11),
                                                       ("tiny", 2, 6)])
def test_attention_matrix_matches_rows(dataset: Dataset, doc_id: str, layer: int,
                                       head: int) -> None:
    matrix = dataset.attention_matrix(doc_id, layer, head)
    n = n_tokens(dataset, doc_id)
    assert matrix.shape == (n, n) and matrix.dtype == np.float32
    # full mode stores float16: each weight rounds by ≤ 2^-12·w, a row summing to 1 by
    # ≤ 2.4e-4 (+ float32 summation ≪): within FLOAT16_ATOL (was 5e-3, looser than needed)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=FLOAT16_ATOL)
    rows = dataset.attention(doc_id, layer=layer, head=head)
    stored = rows["weight"].to_numpy(np.float32)
    # exact: the matrix places the same stored values (float16 → float32 widening is exact)
    assert np.array_equal(matrix[rows["query"].to_numpy(int), rows["key"].to_numpy(int)], stored)
    assert np.count_nonzero(matrix) == np.count_nonzero(stored)
