"""Corpus jobs under a memory budget: shards that close on bytes, written by the writer thread.

Real jobs on MiniLM: a part read back from Parquet holds exactly the tables its shard
computes in memory (the writer thread loses, reorders or mixes nothing); a job of full
attention under the smallest budget writes the shards its survey planned on bytes; and
``pipelines.analyze`` (``run_windowed``) cuts the same shards as ``run_job``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from compare_tables import assert_same_tables
from conftest import SAMPLE_TEXTS

from pipelines.api import Analyzer, ModelKey
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.budget import MIN_MEMORY_BUDGET, MemoryBudget
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset import schema
from pipelines.dataset.writer import part_name
from pipelines.jobs.local import run_job, shard_tables, survey
from pipelines.text.inputs import Columns
from pipelines.text.plan import Shard, unit_shards
from pipelines.text.tokenize import Windower

ROWS = [{"id": f"d{i:02d}", "text": SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} for i in range(24)]
#: Full attention under the smallest budget: shards of at most 16 MiB of rows (~8 documents).
FULL_SMALL = RunConfig(model="minilm", device="cpu", attention=AttentionMode("full"),
                       memory_budget=MIN_MEMORY_BUDGET, windows=WindowConfig(max_length=128))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("budget") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def planned_shards(corpus: Path, config: RunConfig, backend: TorchBackend) -> list[Shard]:
    windower = Windower(backend.tokenizer, backend.info, config.windows)
    found = survey([corpus], Columns(), windower, config, backend.info)
    return [shard for unit in found.units
            for shard in unit_shards(unit, Columns(), windower, found.rule)]


def test_each_part_holds_the_tables_its_shard_computes(corpus: Path, minilm: TorchBackend,
                                                      tmp_path: Path) -> None:
    """Written on the writer thread while the next shard computed: every part equals its
    shard's tables computed here, table by table."""
    config = RunConfig(model="minilm", device="cpu", attention=AttentionMode("topk", k=4),
                       shard_tokens=60)
    run_job([corpus], tmp_path / "ds", config, backend=minilm, progress=False)
    shards = planned_shards(corpus, config, minilm)
    assert len(shards) >= 4
    for shard in shards:
        want = shard_tables(minilm, shard, config)
        got = {name: pq.read_table(tmp_path / "ds" / name / part_name(shard.index))
               for name in schema.TABLES}
        assert_same_tables(got, want, mode="topk:4")
        assert {n: t.num_rows for n, t in got.items()} == {
            n: want[n].num_rows for n in schema.TABLES}
    markers = sorted(p.name for p in (tmp_path / "ds" / "_shards").iterdir())
    assert markers == [f"{s.index:05d}.json" for s in shards]


def test_full_attention_under_a_small_budget_writes_shards_closed_on_bytes(
        corpus: Path, minilm: TorchBackend, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.jobs")
    out = tmp_path / "ds"
    run_job([corpus], out, FULL_SMALL, backend=minilm, progress=False)
    shards = planned_shards(corpus, FULL_SMALL, minilm)
    assert len(shards) > 1  # by bytes: 24 short documents are far fewer than 32768 tokens
    share = MemoryBudget(MIN_MEMORY_BUDGET).shard_bytes
    for shard in shards:
        rows = pq.read_metadata(out / "attention" / part_name(shard.index)).num_rows
        assert rows == sum(72 * w.n_tokens ** 2 for w in shard.windows)
        assert rows * 28 <= share  # the estimate counts 28 bytes a row, and more besides
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["memory_budget"] == MIN_MEMORY_BUDGET
    (memory,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:")]
    assert "working memory expected (budget 64 MiB) beyond the model" in memory, memory


def test_analyze_cuts_the_shards_run_job_cuts(corpus: Path, minilm: TorchBackend,
                                               tmp_path: Path) -> None:
    """``pipelines.analyze`` (``run_windowed``) plans by the same rule, on the same bytes."""
    out = tmp_path / "job"
    run_job([corpus], out, FULL_SMALL, backend=minilm, progress=False)
    analyzer = Analyzer.from_backend(minilm, ModelKey(device="cpu"))
    result = analyzer.analyze([row["text"] for row in ROWS], attention="full", max_length=128,
                              memory_budget="64MiB", progress=False)

    def parts(root: Path) -> list[list[int]]:  # the n_tokens of each part's documents
        return [pq.read_table(part, columns=["n_tokens"])["n_tokens"].to_pylist()
                for part in sorted((root / "documents").glob("part-*.parquet"))]

    assert len(parts(out)) > 1
    assert parts(result.dataset.root) == parts(out)
