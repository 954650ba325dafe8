"""Attention reduction (none / topk:K / threshold:T / full) against a NumPy reference on real
attentions of a padded batch, for both model families."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS

from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.kept import kept_weights, visible_pairs
from pipelines.compute.stats import keys_visible, row_order
from pipelines.config import AttentionMode, WindowConfig
from pipelines.text.tokenize import Document, Windower

COLUMNS = ("batch_index", "layer", "head", "query", "key", "weight")


@dataclass
class Forward:
    attn: torch.Tensor  # [L, B, H, S, S]
    valid: torch.Tensor  # [B, S]
    lengths: list[int]
    causal: bool

    def kept(self, mode: AttentionMode) -> dict[str, np.ndarray] | None:
        return kept_weights(self.attn, self.valid, self.causal, mode,
                            row_order(self.attn, mode.k or None).kth_largest)

    def visible_rows(self):
        """((b, layer, head, query), weights of the keys that query may see) of valid rows."""
        values = self.attn.numpy()
        for b, n in enumerate(self.lengths):
            for layer in range(values.shape[0]):
                for head in range(values.shape[2]):
                    for query in range(n):
                        k_i = query + 1 if self.causal else n
                        yield (b, layer, head, query), values[layer, b, head, query, :k_i]


@pytest.fixture(scope="module", params=["minilm", "gpt2"])
def forward(request: pytest.FixtureRequest) -> Forward:
    backend: TorchBackend = request.getfixturevalue(request.param)
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is it raining?", "No, the sun is out."))
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    windows = [w for doc in docs for w in windower.windows(doc)]
    batch = collate(windows, backend.info.pad_token_id)
    assert len({w.n_tokens for w in windows}) > 2
    return Forward(backend.attentions(batch), batch.valid, [w.n_tokens for w in windows],
                   backend.info.causal)


def as_rows(kept: dict[str, np.ndarray]) -> set[tuple]:
    assert set(kept) == set(COLUMNS)
    return set(zip(*(kept[c].tolist() for c in COLUMNS), strict=True))


def assert_only_valid_positions(kept: dict[str, np.ndarray], fwd: Forward) -> None:
    n = np.asarray(fwd.lengths)[kept["batch_index"]]
    assert (kept["query"] < n).all(), "a padded query was kept"
    assert (kept["key"] < n).all(), "a padded key was kept"
    if fwd.causal:
        assert (kept["key"] <= kept["query"]).all(), "a future key was kept"


def test_none_keeps_nothing(forward: Forward) -> None:
    assert forward.kept(AttentionMode("none")) is None


def reference_pairs(fwd: Forward, threshold: float | None) -> set[tuple]:
    """Every (b, layer, head, query, key, weight) the query may see, weight >= threshold."""
    out = set()
    for (b, layer, head, query), weights in fwd.visible_rows():
        for key, weight in enumerate(weights.tolist()):
            if threshold is None or weight >= threshold:
                out.add((b, layer, head, query, key, weight))
    return out


@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_threshold_matches_reference(forward: Forward, threshold: float) -> None:
    kept = forward.kept(AttentionMode("threshold", threshold=threshold))
    assert kept["weight"].dtype == np.float32
    assert_only_valid_positions(kept, forward)
    expected = reference_pairs(forward, threshold)
    assert expected, "the threshold keeps nothing: the test would be vacuous"
    assert as_rows(kept) == expected


def test_full_matches_reference(forward: Forward) -> None:
    kept = forward.kept(AttentionMode("full"))
    assert kept["weight"].dtype == np.float16
    assert_only_valid_positions(kept, forward)
    n = np.asarray(forward.lengths)
    layers, heads = forward.attn.shape[0], forward.attn.shape[2]
    pairs = n * (n + 1) // 2 if forward.causal else n * n
    assert len(kept["weight"]) == layers * heads * pairs.sum()
    expected = {row[:5] + (float(np.float16(row[5])),) for row in reference_pairs(forward, None)}
    assert as_rows(kept) == expected


def group_topk(kept: dict[str, np.ndarray]) -> dict[tuple, list[tuple[float, int]]]:
    """(b, layer, head, query) → [(weight, key)] sorted by weight descending."""
    groups: dict[tuple, list[tuple[float, int]]] = {}
    rows = zip(*(kept[c].tolist() for c in COLUMNS), strict=True)
    for b, layer, head, query, key, weight in rows:
        groups.setdefault((b, layer, head, query), []).append((weight, key))
    return {k: sorted(v, key=lambda item: -item[0]) for k, v in groups.items()}


def distinct_at(ordered: np.ndarray, rank: int) -> bool:
    """The weight at ``rank`` differs from its neighbours in the descending row."""
    before = rank == 0 or ordered[rank - 1] != ordered[rank]
    after = rank + 1 >= len(ordered) or ordered[rank + 1] != ordered[rank]
    return before and after


@pytest.mark.parametrize("k", [1, 3, 64])
def test_topk_matches_reference(forward: Forward, k: int) -> None:
    kept = forward.kept(AttentionMode("topk", k=k))
    assert kept["weight"].dtype == np.float32
    assert_only_valid_positions(kept, forward)
    assert len(as_rows(kept)) == len(kept["key"]), "a (query, key) pair was kept twice"
    got = group_topk(kept)

    expected_rows, compared = 0, 0
    for row, weights in forward.visible_rows():
        order = np.argsort(-weights, kind="stable")[:k]
        ordered = weights[order]
        expected_rows += len(order)
        kept_row = got.pop(row)
        assert len(kept_row) == min(k, len(weights)), row
        # exact: top-k selects stored float32 weights of the same forward pass (no arithmetic)
        np.testing.assert_array_equal([w for w, _ in kept_row], ordered, err_msg=str(row))
        full_order = np.sort(weights)[::-1]
        for rank, (_, key) in enumerate(kept_row):
            if distinct_at(full_order, rank):
                assert key == order[rank], (row, rank)
                compared += 1
    assert not got, f"rows kept for queries that are not valid: {sorted(got)[:5]}"
    assert expected_rows == len(kept["key"])
    assert compared > 0.9 * expected_rows


def synthetic_ties() -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 2, 1, 5, 5] attention with exact ties (and zeros) and a padded second window."""
    first = torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.0],
                          [0.25, 0.25, 0.25, 0.25, 0.0],
                          [0.0, 0.0, 1.0, 0.0, 0.0],
                          [0.5, 0.0, 0.0, 0.5, 0.0],
                          [0.2, 0.2, 0.2, 0.2, 0.2]])
    second = torch.zeros(5, 5)
    second[:3, :3] = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]])
    second[3:, :] = 0.2  # padded query rows hold garbage
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return torch.stack([first, second])[None, :, None], valid


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_topk_with_exact_ties_keeps_k_per_row(k: int) -> None:
    attn, valid = synthetic_ties()
    kept = kept_weights(attn, valid, False, AttentionMode("topk", k=k),
                        row_order(attn, k).kth_largest)
    got = group_topk(kept)
    lengths = valid.sum(-1).tolist()
    assert sorted(got) == [(b, 0, 0, q) for b, n in enumerate(lengths) for q in range(n)]
    for (b, _, _, query), kept_row in got.items():
        n = lengths[b]
        weights = attn[0, b, 0, query, :n].numpy()
        keys = [key for _, key in kept_row]
        assert len(keys) == len(set(keys)) == min(k, n), (b, query)
        assert max(keys) < n
        # exact: a selection of the same float32 weights
        np.testing.assert_array_equal([w for w, _ in kept_row], np.sort(weights)[::-1][:k])
        assert all(weight == weights[key] for weight, key in kept_row), "weight of another key"


# ------------------------------------------------------------------ sliding-window layers

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 2, 3, 9])
def test_visible_pairs_and_keys_visible_follow_the_window(causal: bool,
                                                          window: int | None) -> None:
    """Against the rule written cell by cell: query i sees valid key j when j <= i (causal)
    and |i - j| < w (a window w); k_i counts those keys."""
    lengths = [7, 4]
    valid = torch.tensor([[True] * n + [False] * (7 - n) for n in lengths])
    want = np.zeros((2, 7, 7), dtype=bool)
    for b, n in enumerate(lengths):
        for i in range(n):
            for j in range(n):
                want[b, i, j] = (j <= i or not causal) and (window is None or abs(i - j) < window)
    assert np.array_equal(visible_pairs(valid, causal, window=window).numpy(), want)
    assert np.array_equal(visible_pairs(valid, causal, 2, 3, window).numpy(), want[:, 2:5])
    assert np.array_equal(keys_visible(valid, causal, window).numpy(), want.sum(-1))


def test_topk_keeps_no_key_beyond_the_window() -> None:
    """A uniform map over every key (as if the mask let all through) keeps only the keys
    inside the window: min(k, k_i) per row, all within it."""
    valid = torch.ones((1, 10), dtype=torch.bool)
    attn = torch.full((1, 1, 1, 10, 10), 0.1)
    mode = AttentionMode("topk", k=4)
    kept = kept_weights(attn, valid, True, mode, row_order(attn, 4).kth_largest, window=3)
    assert kept is not None
    assert ((kept["query"] - kept["key"] < 3) & (kept["key"] <= kept["query"])).all()
    assert len(kept["query"]) == sum(min(4, i + 1, 3) for i in range(10))
