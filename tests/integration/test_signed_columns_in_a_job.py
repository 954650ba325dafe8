"""Signed integer columns end to end: a real job's files, users' arithmetic on them, and
datasets of format 1 (unsigned columns) read back, refused for resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import open_dataset
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset.reader import Dataset
from pipelines.dataset.schema import unsigned_fields
from pipelines.dataset.writer import OutputError
from pipelines.jobs.local import run_job
from pipelines.views.data import view_data

DOCS = [
    {"id": "cat", "text": "The cat sat on the mat. It was happy!"},
    {"id": "pair", "text": "Is attention all you need?", "text_pair": "Perhaps, perhaps not."},
    {"id": "long", "text": " ".join(["Transformers read text in parallel; every token attends "
                                     "to the others."] * 3)},
]
CONFIG = RunConfig(model="minilm", device="cpu", attention=AttentionMode.parse("full"),
                   windows=WindowConfig(max_length=32, stride=8), shard_tokens=48,
                   analyses=("patterns", "words", "similarity"), capture_qk=True)
U8, U16, U32 = pa.uint8(), pa.uint16(), pa.uint32()
KEYS = {"window": U16, "layer": U8, "head": U8}
#: The unsigned columns of format 1 (headscope-dataset/1), table by table.
FORMAT_1 = {
    "documents": {"window": U16, "n_windows": U16, "n_tokens": U16},
    "tokens": {"window": U16, "position": U16, "token_id": U32, "segment": U8},
    "head_stats": {**KEYS, "n_tokens": U16},
    "attention": {**KEYS, "query": U16, "key": U16},
    "qk": {**KEYS, "position": U16},
    "head_summary": {"layer": U8, "head": U8},
    "head_patterns": KEYS,
    "words": {"window": U16, "word": U16, "token_start": U16, "token_end": U16, "segment": U8},
    "word_attention": {**KEYS, "query_word": U16, "key_word": U16},
    "head_similarity": {"layer_a": U8, "head_a": U8, "layer_b": U8, "head_b": U8},
    "head_coords": {"layer": U8, "head": U8},
}


def tables_of(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def set_format(root: Path, format: str) -> None:
    path = root / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": format}))


def to_format_1(root: Path) -> None:
    """Rewrite every table of ``root`` with format 1's unsigned types, and say format 1."""
    for name, old in FORMAT_1.items():
        for part in (root / name).glob("part-*.parquet"):
            table = pq.read_table(part)
            fields = [f.with_type(old.get(f.name, f.type)) for f in table.schema]
            pq.write_table(table.cast(pa.schema(fields, metadata=table.schema.metadata)), part)
    set_format(root, "headscope-dataset/1")


@pytest.fixture(scope="module")
def dataset(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("signed")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    run_job([corpus], folder / "ds", CONFIG, backend=minilm, progress=False)
    return folder / "ds"


@pytest.fixture(scope="module")
def format_1(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset as format 1 wrote it (read-only for the tests)."""
    root = tmp_path_factory.mktemp("format-1") / "ds"
    shutil.copytree(dataset, root)
    to_format_1(root)
    return root


def test_every_file_has_only_signed_integer_columns(dataset: Path) -> None:
    parts = sorted(dataset.rglob("*.parquet"))
    assert {p.parent.name for p in parts} >= set(FORMAT_1)  # every table was written
    assert {str(p.relative_to(dataset)): unsigned_fields(pq.read_schema(p))
            for p in parts if unsigned_fields(pq.read_schema(p))} == {}


def test_relative_positions_with_plain_pandas(dataset: Path) -> None:
    att = pd.read_parquet(dataset / "attention")
    distance = att["key"] - att["query"]
    assert distance.min() < 0 < distance.max()  # full attention: keys on both sides
    want = np.abs(att["key"].to_numpy(np.int64) - att["query"].to_numpy(np.int64)).mean()
    # exact: both sum integers below 2**53, which float64 holds exactly
    assert distance.abs().mean() == want
    wrapped = (att["key"].astype(np.uint16) - att["query"].astype(np.uint16)).abs().mean()
    assert wrapped > 100 * want  # what format 1's uint16 columns gave


def test_layer_arithmetic_and_torch_indexing(dataset: Path) -> None:
    stats = pd.read_parquet(dataset / "head_stats")
    first = stats[stats["layer"] == 0]
    assert len(first) > 0 and ((first["layer"] - 1) == -1).all()
    layer = torch.tensor(stats["layer"].to_numpy())
    # an index, not a boolean mask (as torch took a uint8 column)
    assert torch.equal(torch.arange(6)[layer], layer.long())


def test_a_format_1_dataset_reads_with_signed_columns(dataset: Path, format_1: Path) -> None:
    assert tables_of(format_1) == sorted(FORMAT_1)  # the copy covers every table
    stored = pq.read_schema(next((format_1 / "attention").glob("part-*.parquet")))
    assert stored.field("query").type == U16  # the copy really is unsigned
    new, old = Dataset.open(dataset), Dataset.open(format_1)
    assert old.unsigned and not new.unsigned
    for name in FORMAT_1:
        pd.testing.assert_frame_equal(old.table(name), new.table(name), check_exact=True,
                                      obj=name)
    filters = [("doc_id", "==", "long"), ("window", "==", 1), ("layer", "==", 0)]
    got = open_dataset(format_1).table("attention", filters=filters)
    assert len(got) > 0 and (got["layer"] - 1 == -1).all()
    pd.testing.assert_frame_equal(got, new.table("attention", filters=filters),
                                  check_exact=True)


def test_a_format_1_dataset_has_the_same_view(dataset: Path, format_1: Path) -> None:
    assert view_data(format_1, "long") == view_data(dataset, "long")


def test_a_format_1_value_that_does_not_fit_is_an_error(format_1: Path,
                                                         tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(format_1, root)
    part = next((root / "tokens").glob("part-*.parquet"))
    table = pq.read_table(part)
    ids = pa.array([2**31] * table.num_rows, U32)
    pq.write_table(table.set_column(table.schema.get_field_index("token_id"), "token_id", ids),
                   part)
    with pytest.raises(ValueError, match="does not fit its signed type"):
        Dataset.open(root).table("tokens")


def test_an_unknown_format_is_refused(dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    set_format(root, "headscope-dataset/3")
    with pytest.raises(ValueError, match="'headscope-dataset/3', which headscope .* does not "
                                         "read"):
        Dataset.open(root)


def test_resume_refuses_a_format_1_dataset(minilm: TorchBackend, dataset: Path,
                                           format_1: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(format_1, root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="cannot resume: it holds format "
                                          "'headscope-dataset/1'"):
        run_job([dataset.parent / "corpus.jsonl"], root, CONFIG, resume=True, backend=minilm,
                progress=False)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
