"""The shard plan: read units of whole files, shards of whole documents, fixed by the survey;
shards close on tokens or on the estimated bytes of their rows, alike in every engine."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import pytest
from conftest import SAMPLE_TEXTS

from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.budget import MIN_MEMORY_BUDGET, MemoryBudget
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.jobs.local import Survey, survey
from pipelines.jobs.ray_engine import read_unit
from pipelines.jobs.sizing import shard_rule
from pipelines.text.inputs import Columns, InputError, read_documents
from pipelines.text.plan import PlanBuilder, Shard, ShardRule, pack_shards, unit_shards
from pipelines.text.tokenize import Windower

Doc = tuple[int, int]  # a document's tokens and the estimated bytes of its rows


def plain_plan(file_docs: list[list[Doc]], limit: int,
               max_bytes: float = math.inf) -> list[list[list[Doc]]]:
    """Reference: units as lists of shards, each a list of documents. A document that would
    take a shard past ``max_bytes`` starts the next; a shard closes at ``limit`` tokens or
    ``max_bytes`` bytes."""
    units, unit, shard, unit_tokens = [], [], [], 0
    for docs in file_docs:
        for tokens, nbytes in docs:
            if shard and sum(b for _, b in shard) + nbytes > max_bytes:
                unit.append(shard)
                shard = []
            shard.append((tokens, nbytes))
            unit_tokens += tokens
            if sum(t for t, _ in shard) >= limit or sum(b for _, b in shard) >= max_bytes:
                unit.append(shard)
                shard = []
        if unit_tokens >= limit:
            units.append(unit + ([shard] if shard else []))
            unit, shard, unit_tokens = [], [], 0
    if unit or shard:
        units.append(unit + ([shard] if shard else []))
    return units


def tokens_only(*files: list[int]) -> list[list[Doc]]:
    return [[(tokens, 0) for tokens in docs] for docs in files]


@pytest.mark.parametrize(("file_docs", "max_bytes"), [
    # small files packed, a big one alone
    (tokens_only([5, 5, 5], [30], [1], [1], [1], [50, 2, 2]), math.inf),
    (tokens_only([3] * 40), math.inf),  # one file, many shards
    (tokens_only([1], [1], [1]), math.inf),  # everything fits one shard
    (tokens_only([12], [8, 2], [10, 10, 10, 1]), math.inf),
    # bytes close shards before tokens do; a document over the share is a shard of its own
    ([[(1, 4)] * 7, [(1, 30)], [(1, 3), (1, 3)], [(2, 9), (1, 2)]], 10),
    ([[(1, 6), (1, 6), (1, 10), (1, 1)], [(1, 11), (1, 1)]], 10),
    ([[(4, 3), (4, 3), (4, 3), (4, 3)], [(1, 2)] * 12], 10),  # tokens and bytes in turn
])
def test_plan_builder_matches_the_plain_rules(file_docs: list[list[Doc]],
                                              max_bytes: float) -> None:
    limit = 10
    builder = PlanBuilder(ShardRule(limit, max_bytes))
    for index, docs in enumerate(file_docs):
        for tokens, nbytes in docs:
            builder.add_document(tokens, nbytes)
        builder.end_file(Path(f"f{index}"))
    units = builder.finish()
    expected = plain_plan(file_docs, limit, max_bytes)
    assert [u.n_shards for u in units] == [len(u) for u in expected]
    assert [u.tokens for u in units] == [sum(t for s in u for t, _ in s) for u in expected]
    assert builder.largest_shard_bytes == max(sum(b for _, b in s) for u in expected for s in u)
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
              for s in unit_shards(unit, Columns(), windower, found.rule)]
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
    found = survey(files, Columns(), windower, config, minilm.info)
    unit = found.units[-1]
    unit.files[-1].write_text("\n".join(SAMPLE_TEXTS * 4) + "\n")
    with pytest.raises(InputError, match="changed while the job was running"):
        list(unit_shards(unit, Columns(), windower, found.rule))


# ---------------------------------------------------------------- shards that close on bytes

#: The smallest budget: a quarter of it, 16 MiB, for the rows of one shard.
FULL_SMALL_BUDGET = RunConfig(attention=AttentionMode("full"), memory_budget=MIN_MEMORY_BUDGET,
                              shard_tokens=10**6, windows=WindowConfig(max_length=128))
LONG_ID = "long"


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """48 short documents (~40 MiB of full attention rows in all) with a long one of several
    128-token windows (~120 MiB) among them."""
    rows = [{"id": f"s{i:02d}", "text": SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} for i in range(48)]
    rows.insert(9, {"id": LONG_ID, "text": " ".join(SAMPLE_TEXTS * 4)})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def planned(found: Survey, windower: Windower) -> list[Shard]:
    return [s for unit in found.units for s in unit_shards(unit, Columns(), windower, found.rule)]


def test_shards_of_full_attention_close_on_bytes(minilm: TorchBackend, mixed: Path) -> None:
    config = FULL_SMALL_BUDGET
    windower = Windower(minilm.tokenizer, minilm.info, config.windows)
    found = survey([mixed], Columns(), windower, config, minilm.info)
    rule = found.rule
    assert rule.max_bytes == MemoryBudget(MIN_MEMORY_BUDGET).shard_bytes == 16 * 2**20
    shards = planned(found, windower)
    sizes = [rule.document_bytes(w.n_tokens for w in s.windows) for s in shards]
    assert len(shards) > 3 and all(s.tokens < config.shard_tokens for s in shards)
    assert found.largest_shard_bytes == max(sizes)
    for shard, size, following in zip(shards, sizes, shards[1:], strict=False):
        assert size <= rule.max_bytes or len(shard.docs) == 1
        # full: the next shard's first document would have taken this one past the share
        first = windower.window_lengths(following.docs[0])
        assert size + rule.document_bytes(first) > rule.max_bytes
    (alone,) = [s for s in shards if LONG_ID in [d.doc_id for d in s.docs]]
    assert [d.doc_id for d in alone.docs] == [LONG_ID]
    assert rule.document_bytes(w.n_tokens for w in alone.windows) > rule.max_bytes


def test_fewer_rows_make_fewer_shards(minilm: TorchBackend, mixed: Path) -> None:
    """The same corpus and budget: topk:8 keeps fewer rows than full, so fewer shards; the
    statistics alone fit one shard, which closes on tokens only."""
    windower = Windower(minilm.tokenizer, minilm.info, FULL_SMALL_BUDGET.windows)
    shards = {mode: survey([mixed], Columns(), windower,
                           dataclasses.replace(FULL_SMALL_BUDGET, attention=AttentionMode.parse(
                               mode)), minilm.info).shards
              for mode in ("full", "threshold:0.5", "topk:8", "none")}
    assert shards["full"] == shards["threshold:0.5"] > shards["topk:8"] > shards["none"] == 1


def test_every_engine_cuts_the_same_shards(minilm: TorchBackend, mixed: Path) -> None:
    """The local engine (survey, then unit_shards), the Ray engine's read tasks and
    ``run_windowed`` (pack_shards over documents in memory) make the same plan."""
    config = FULL_SMALL_BUDGET
    windower = Windower(minilm.tokenizer, minilm.info, config.windows)
    found = survey([mixed], Columns(), windower, config, minilm.info)
    local = planned(found, windower)
    ray = [pickle.loads(row["payload"]) for unit in found.units
           for row in read_unit({"unit": pickle.dumps(unit)}, Columns(), windower, found.rule,
                                frozenset())]
    windowed = [(doc, windower.windows(doc)) for doc in read_documents([mixed])]
    in_memory = list(pack_shards(windowed, shard_rule(config, minilm.info)))

    def layout(shards: list[Shard]) -> list[tuple[int, int, list[str]]]:
        return [(s.index, s.first_doc, [d.doc_id for d in s.docs]) for s in shards]

    assert layout(local) == layout(ray) == layout(in_memory)
    assert len(local) == found.shards > 3
