"""``--memory-budget`` sizes and how a budget is shared out."""

from __future__ import annotations

import pytest

from pipelines.compute.budget import (
    DEFAULT_MEMORY_BUDGET,
    MIN_MEMORY_BUDGET,
    MemoryBudget,
    parse_size,
)
from pipelines.config import ConfigError, RunConfig


@pytest.mark.parametrize(("text", "size"), [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("64 mib", 2**26),
    ("100000000", 100_000_000), (" 3 KiB ", 3072), ("0.5g", 500_000_000), (12345, 12345),
])
def test_sizes_with_and_without_units(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "2TiB", "-1GiB", "GiB", "1e9", "2 Gib s", "nan"])
def test_other_sizes_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(ConfigError, match=r"memory size .*KiB, MiB, GiB .* e\.g\. 2GiB"):
        parse_size(text)


def test_a_budget_is_shared_between_the_batch_and_two_shards() -> None:
    budget = MemoryBudget(parse_size("2GiB"))
    assert budget.total == DEFAULT_MEMORY_BUDGET == RunConfig().memory_budget
    assert budget.batch_bytes == 2**30 and budget.shard_bytes == 2**29
    assert budget.batch_bytes + 2 * budget.shard_bytes == budget.total
    assert budget.attention_cells(6) == budget.attention_cells(1) // 6


def test_a_budget_below_the_minimum_is_refused() -> None:
    MemoryBudget(MIN_MEMORY_BUDGET)
    with pytest.raises(ConfigError, match="below the minimum of 64 MiB"):
        MemoryBudget(MIN_MEMORY_BUDGET - 1)
