"""Length-bucketed batch planning under a token budget, and right padding with masks."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS

from pipelines.backends.batching import collate, plan_batches
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import WindowConfig
from pipelines.text.tokenize import Document, Window, Windower


def random_lengths(seed: int, count: int = 200, high: int = 300) -> list[int]:
    return np.random.default_rng(seed).integers(1, high, size=count).tolist()


def assert_partition(batches: list[list[int]], count: int) -> None:
    flat = [i for batch in batches for i in batch]
    assert all(batches), "empty batch"
    assert sorted(flat) == list(range(count)), "every index must be in exactly one batch"


def assert_budgets(batches: list[list[int]], lengths: list[int], batch_tokens: int,
                   cells: int, heads: int = 1) -> None:
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        if len(batch) > 1:
            assert len(batch) * longest <= batch_tokens, (batch, longest)
            assert heads * len(batch) * longest**2 <= cells, (batch, longest)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("batch_tokens", "cells"), [(512, 2**27), (1024, 2**27),
                                                     (4096, 200_000), (64, 2**27)])
@pytest.mark.parametrize("heads", [1, 72])
def test_plan_is_a_partition_within_budgets(seed: int, batch_tokens: int, cells: int,
                                            heads: int) -> None:
    lengths = random_lengths(seed)
    batches = plan_batches(lengths, batch_tokens, heads, max_attention_cells=cells)
    assert_partition(batches, len(lengths))
    assert_budgets(batches, lengths, batch_tokens, cells, heads)


def test_windows_longer_than_the_budget_go_alone() -> None:
    lengths = [10, 700, 12, 900, 11]
    batches = plan_batches(lengths, batch_tokens=512)
    assert_partition(batches, len(lengths))
    assert [3] in batches and [1] in batches
    assert sorted(next(b for b in batches if 0 in b)) == [0, 2, 4]


def test_attention_cell_cap_splits_batches() -> None:
    lengths = [100] * 10
    assert len(plan_batches(lengths, batch_tokens=10_000)) == 1
    batches = plan_batches(lengths, batch_tokens=10_000, max_attention_cells=3 * 100**2)
    assert_partition(batches, len(lengths))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    by_heads = plan_batches(lengths, batch_tokens=10_000, heads=3,
                            max_attention_cells=3 * 3 * 100**2)
    assert [len(b) for b in by_heads] == [3, 3, 3, 1]


def test_budget_is_used_not_wasted() -> None:
    lengths = [8] * 20
    batches = plan_batches(lengths, batch_tokens=64)
    assert [len(b) for b in batches] == [8, 8, 4]


def test_batches_are_length_buckets() -> None:
    lengths = random_lengths(7)
    batches = plan_batches(lengths, batch_tokens=1024)
    for longer, shorter in pairwise(batches):
        assert min(lengths[i] for i in longer) >= max(lengths[i] for i in shorter)


@pytest.mark.parametrize("min_fill", [0.5, 0.75, 0.9])
def test_batches_hold_similar_lengths(min_fill: float) -> None:
    lengths = random_lengths(3)
    batches = plan_batches(lengths, batch_tokens=4096, min_fill=min_fill)
    assert_partition(batches, len(lengths))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert min(lengths[i] for i in batch) >= min_fill * longest, batch


def test_short_windows_are_not_padded_to_long_ones() -> None:
    batches = plan_batches([100, 10, 99, 11], batch_tokens=10_000)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 3]]


def test_empty_input_gives_no_batches() -> None:
    assert plan_batches([], batch_tokens=128) == []


def sample_windows(backend: TorchBackend) -> list[Window]:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    docs = [Document(f"d{i}", t) for i, t in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Who?", "The cat, of course."))
    return [w for doc in docs for w in windower.windows(doc)]


def test_collate_pads_right_and_masks_padding(backend: TorchBackend) -> None:
    windows = sample_windows(backend)
    pad = backend.info.pad_token_id
    batch = collate(windows, pad)
    longest = max(w.n_tokens for w in windows)
    assert batch.windows == windows
    for name in ("input_ids", "attention_mask", "type_ids", "is_special", "is_sep", "is_punct"):
        assert getattr(batch, name).shape == (len(windows), longest), name
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64
    assert batch.is_special.dtype == batch.is_sep.dtype == batch.is_punct.dtype == torch.bool

    for row, window in enumerate(windows):
        n = window.n_tokens
        np.testing.assert_array_equal(batch.input_ids[row, :n].numpy(), window.input_ids)
        np.testing.assert_array_equal(batch.type_ids[row, :n].numpy(), window.type_ids)
        for flag in ("is_special", "is_sep", "is_punct"):
            np.testing.assert_array_equal(getattr(batch, flag)[row, :n].numpy(),
                                          getattr(window, flag))
            assert not getattr(batch, flag)[row, n:].any(), flag
        assert (batch.input_ids[row, n:] == pad).all()
        assert (batch.type_ids[row, n:] == 0).all()
        assert (batch.attention_mask[row, :n] == 1).all()
        assert (batch.attention_mask[row, n:] == 0).all()
    assert torch.equal(batch.valid, batch.attention_mask.bool())
    assert int(batch.attention_mask.sum()) == sum(w.n_tokens for w in windows)


def test_collate_single_window_has_no_padding(minilm: TorchBackend) -> None:
    window = sample_windows(minilm)[0]
    batch = collate([window], minilm.info.pad_token_id)
    assert batch.input_ids.shape == (1, window.n_tokens)
    assert bool(batch.valid.all())


def test_batch_to_keeps_everything(minilm: TorchBackend) -> None:
    windows = sample_windows(minilm)
    batch = collate(windows, minilm.info.pad_token_id)
    moved = batch.to(torch.device("cpu"))
    assert moved.windows is batch.windows
    for name in ("input_ids", "attention_mask", "type_ids", "is_special", "is_sep", "is_punct"):
        assert torch.equal(getattr(moved, name), getattr(batch, name)), name


def test_plan_then_collate_covers_every_window(backend: TorchBackend) -> None:
    windows = sample_windows(backend)
    lengths = [w.n_tokens for w in windows]
    seen = []
    for indices in plan_batches(lengths, batch_tokens=40):
        batch = collate([windows[i] for i in indices], backend.info.pad_token_id)
        assert batch.input_ids.numel() <= 40 or len(indices) == 1
        seen.extend(indices)
    assert sorted(seen) == list(range(len(windows)))
