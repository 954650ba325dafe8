"""The shard plan: read units of whole files, shards of whole documents, fixed by the survey."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE_TEXTS

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import RunConfig, WindowConfig
from pipelines.jobs.local import survey
from pipelines.text.inputs import Columns, InputError, read_documents
from pipelines.text.plan import PlanBuilder, unit_shards
from pipelines.text.tokenize import Windower


def plain_plan(file_docs: list[list[int]], limit: int) -> list[list[list[int]]]:
    """Reference: units as lists of shards, each a list of document token counts."""
    units, unit, shard, unit_tokens = [], [], [], 0
    for docs in file_docs:
        for tokens in docs:
            shard.append(tokens)
            unit_tokens += tokens
            if sum(shard) >= limit:
                unit.append(shard)
                shard = []
        if unit_tokens >= limit:
            units.append(unit + ([shard] if shard else []))
            unit, shard, unit_tokens = [], [], 0
    if unit or shard:
        units.append(unit + ([shard] if shard else []))
    return units


@pytest.mark.parametrize("file_docs", [
    [[5, 5, 5], [30], [1], [1], [1], [50, 2, 2]],  # small files packed, a big one alone
    [[3] * 40],  # one file, many shards
    [[1], [1], [1]],  # everything fits one shard
    [[12], [8, 2], [10, 10, 10, 1]],
])
def test_plan_builder_matches_the_plain_rules(file_docs: list[list[int]]) -> None:
    limit = 10
    builder = PlanBuilder(limit)
    for index, docs in enumerate(file_docs):
        for tokens in docs:
            builder.add_document(tokens)
        builder.end_file(Path(f"f{index}"))
    units = builder.finish()
    expected = plain_plan(file_docs, limit)
    assert [u.n_shards for u in units] == [len(u) for u in expected]
    assert [u.tokens for u in units] == [sum(map(sum, u)) for u in expected]
    assert [u.first_doc for u in units] == [
        sum(len(s) for u in expected[:i] for s in u) for i in range(len(expected))]
    shards = [i for u in units for i in u.shard_indices]
    assert shards == list(range(len(shards)))  # consecutive, from 0
    assert [f for u in units for f in u.files] == [Path(f"f{i}") for i in range(len(file_docs))]


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for index, count in enumerate((1, 2, 12, 3)):
        path = tmp_path / f"file{index}.txt"
        path.write_text("\n".join(SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(count))
                        + "\n")
        paths.append(path)
    return paths


def test_read_units_yield_the_surveyed_shards(minilm: TorchBackend, files: list[Path]) -> None:
    config = RunConfig(shard_tokens=60, windows=WindowConfig(max_length=32, stride=4))
    windower = Windower(minilm.tokenizer, minilm.info, config.windows)
    found = survey(files, Columns(), windower, config, minilm.info)
    assert len(found.units) > 1 and found.shards > len(found.units)
    shards = [s for unit in found.units
              for s in unit_shards(unit, Columns(), windower, config.shard_tokens)]
    assert [s.index for s in shards] == list(range(found.shards))
    docs = [d.doc_id for s in shards for d in s.docs]
    assert docs == [d.doc_id for d in read_documents(files)]  # every document once, in order
    assert [s.first_doc for s in shards] == [sum(len(t.docs) for t in shards[:i])
                                             for i in range(len(shards))]
    assert sum(s.tokens for s in shards) == found.tokens
    assert all(s.tokens >= config.shard_tokens for s in shards
               if s.index + 1 not in {u.shard_indices.stop for u in found.units})


def test_a_file_changed_after_the_survey_is_an_error(minilm: TorchBackend,
                                                    files: list[Path]) -> None:
    config = RunConfig(shard_tokens=60)
    windower = Windower(minilm.tokenizer, minilm.info, config.windows)
    unit = survey(files, Columns(), windower, config, minilm.info).units[-1]
    unit.files[-1].write_text("\n".join(SAMPLE_TEXTS * 4) + "\n")
    with pytest.raises(InputError, match="changed while the job was running"):
        list(unit_shards(unit, Columns(), windower, config.shard_tokens))
