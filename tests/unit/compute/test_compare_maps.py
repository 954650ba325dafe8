"""The maps' cosine similarity and JS distance of ``headscope compare``
(``pipelines.compute.compare``): a plain NumPy float64 computation of the definitions on
random maps with padding and causal masks, a model against itself exactly 1 and 0, cells a
query may not see ignored, and small cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerances import EPS64

from pipelines.compute.compare import MapAgreement, map_agreement, row_js_distance
from pipelines.compute.kept import visible_pairs

#: Float64 against float64 summed in another order: a sum of m terms of size <= 1 moves by at
#: most m·eps64 (here m <= 7² cells per head), so cosine (three such sums) by ~3·49·eps64 ≈
#: 3e-14, and a row's JS divergence (<= ln 2, terms <= 1) by ~8·eps64 plus a few ulps of each
#: log. The distance's sqrt turns an error ε at divergence x into ε / (2 sqrt(x)): rows of one
#: visible key are exactly 0 on both sides (P = Q = (1)), and the smallest other divergence of
#: these random maps is 8e-6 (a causal row of two keys), a factor <= 180: <= ~4e-13.
#: (Seen: <= 3.3e-16 for both.)
REFERENCE_ATOL = 1e-12

LENGTHS = [7, 4, 1, 6]  # one window of a single token; S = 7, so three windows are padded


def random_maps(lengths: list[int], causal: bool, seed: int, layers: int = 2,
                heads: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [L, B, H, S, S] float32, valid [B, S]): softmax rows over the keys each query
    may see, exact zeros on padded (and causally hidden) keys as backends return them, and
    padded query rows filled with non-zero garbage, which nothing may read."""
    generator = torch.Generator().manual_seed(seed)
    size = max(lengths)
    valid = torch.arange(size)[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
    keys = valid[:, None, :].expand(-1, size, -1)  # [B, Q, S]
    if causal:
        keys = keys & torch.ones(size, size, dtype=torch.bool).tril()[None]
    logits = 3 * torch.randn((layers, len(lengths), heads, size, size), generator=generator)
    maps = logits.masked_fill(~keys[None, :, None], float("-inf")).softmax(-1)
    garbage = torch.rand(maps.shape, generator=generator)
    return torch.where(valid[None, :, None, :, None], maps, garbage), valid


def reference(a: np.ndarray, b: np.ndarray, lengths: list[int],
              causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, js_distance) [L, B, H] by the definitions, one head of one window at a time."""
    layers, batch, heads = a.shape[:3]
    cosine, distance = np.zeros((layers, batch, heads)), np.zeros((layers, batch, heads))
    for layer in range(layers):
        for row in range(batch):
            n = lengths[row]
            seen = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
            for head in range(heads):
                x = a[layer, row, head, :n, :n].astype(np.float64)
                y = b[layer, row, head, :n, :n].astype(np.float64)
                u, v = x[seen], y[seen]
                cosine[layer, row, head] = u @ v / math.sqrt((u @ u) * (v @ v))
                per_row = []
                for i in range(n):
                    p, q = x[i][seen[i]], y[i][seen[i]]
                    p, q = p / p.sum(), q / q.sum()
                    m = (p + q) / 2
                    kl_p = sum(pi * math.log(pi / mi)
                               for pi, mi in zip(p, m, strict=True) if pi > 0)
                    kl_q = sum(qi * math.log(qi / mi)
                               for qi, mi in zip(q, m, strict=True) if qi > 0)
                    per_row.append(math.sqrt(max(0.0, (kl_p + kl_q) / 2)))
                distance[layer, row, head] = np.mean(per_row)
    return cosine, distance


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_cells", [2**20, 1])  # one chunk per layer; one row a chunk
def test_random_maps_match_the_definitions(causal: bool, chunk_cells: int) -> None:
    a, valid = random_maps(LENGTHS, causal, seed=1)
    b, _ = random_maps(LENGTHS, causal, seed=2)
    cosine, distance = map_agreement(a, b, valid, causal, chunk_cells)
    want_cosine, want_distance = reference(a.numpy(), b.numpy(), LENGTHS, causal)
    assert cosine.dtype == distance.dtype == torch.float64
    np.testing.assert_allclose(cosine.numpy(), want_cosine, rtol=0, atol=REFERENCE_ATOL)
    np.testing.assert_allclose(distance.numpy(), want_distance, rtol=0, atol=REFERENCE_ATOL)
    # the single-token window: one visible cell, all its mass on it in both maps (bitwise:
    # softmax over one key is exactly 1)
    assert (cosine[:, 2] == 1).all() and (distance[:, 2] == 0).all()
    others = distance[:, [0, 1, 3]]
    assert others.min() > 0 and others.max() <= math.sqrt(math.log(2))


@pytest.mark.parametrize("causal", [False, True])
def test_rows_given_in_blocks_add_up_to_whole_layers(causal: bool) -> None:
    """Backends may hand over query blocks (``Backend.layers``' ``block_rows``)."""
    a, valid = random_maps(LENGTHS, causal, seed=3)
    b, _ = random_maps(LENGTHS, causal, seed=4)
    blocked = MapAgreement(a.shape[0], valid, causal)
    for layer in range(a.shape[0]):
        for start in range(0, a.shape[-1], 3):  # blocks of 3, 3 and 1 rows
            blocked.add_rows(layer, start, a[layer, :, :, start:start + 3],
                             b[layer, :, :, start:start + 3])
    got = blocked.result()
    want = map_agreement(a, b, valid, causal)
    for got_values, want_values in zip(got, want, strict=True):
        # the same float64 terms summed in other groups: REFERENCE_ATOL's bound
        np.testing.assert_allclose(got_values.numpy(), want_values.numpy(), rtol=0,
                                   atol=REFERENCE_ATOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_cells", [2**20, 5])
def test_a_map_against_itself_is_exactly_one_and_zero(causal: bool, chunk_cells: int) -> None:
    a, valid = random_maps(LENGTHS, causal, seed=5)
    cosine, distance = map_agreement(a, a.clone(), valid, causal, chunk_cells)
    # Bitwise: float32 products are exact in float64, so dot, |a|² and |b|² are the same sums;
    # sqrt(x·x) == x and x / x == 1 in IEEE arithmetic; M = (P + P) / 2 == P, ln 1 == 0.
    assert (cosine == 1.0).all()
    assert (distance == 0.0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_cells_a_query_cannot_see_are_ignored(causal: bool) -> None:
    """Maps that differ only on padded rows and keys (and future keys) compare as equal."""
    a, valid = random_maps(LENGTHS, causal, seed=6)
    b = a.clone()
    hidden = ~visible_pairs(valid, causal)[None, :, None]  # [1, B, 1, S, S]
    b = torch.where(hidden, torch.rand(b.shape, generator=torch.Generator().manual_seed(7)), b)
    assert (b != a).any()
    cosine, distance = map_agreement(a, b, valid, causal)
    # bitwise: the visible cells are the same values (as in the test above)
    assert (cosine == 1.0).all() and (distance == 0.0).all()


def one_head(rows: list[list[float]]) -> torch.Tensor:
    """[1, 1, 1, S, S] float32: one layer, window and head."""
    return torch.tensor(rows, dtype=torch.float32)[None, None, None]


#: Hand values (float64 from exact inputs 0, 0.5, 1) against a few roundings of math's:
#: a handful of ulps.
HAND_RTOL = 8 * EPS64


def test_disjoint_rows_are_as_far_apart_as_rows_can_be() -> None:
    """P = (1, 0), Q = (0, 1): M = (1/2, 1/2), KL = ln 2 each, so JS = ln 2 and the maps'
    cells never overlap: cosine 0."""
    valid = torch.ones(1, 2, dtype=torch.bool)
    cosine, distance = map_agreement(one_head([[1, 0], [0, 1]]), one_head([[0, 1], [1, 0]]),
                                     valid, causal=False)
    assert cosine.item() == 0.0  # exact: every product is 0
    assert distance.item() == pytest.approx(math.sqrt(math.log(2)), rel=HAND_RTOL)
    p, q = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0],
                                                                        dtype=torch.float64)
    assert row_js_distance(p, q).item() == pytest.approx(math.sqrt(math.log(2)), rel=HAND_RTOL)


def test_a_uniform_head_against_one_that_looks_at_the_first_token() -> None:
    """A = rows (1/2, 1/2), B = rows (1, 0). Cosine: dot = 1/2 + 1/2 = 1, |A|² = 4/4 = 1,
    |B|² = 2, so 1/sqrt(2). Per row, M = (3/4, 1/4): KL(P||M) = ln(4/3)/2, KL(Q||M) = ln(4/3),
    JS = 3/4 ln(4/3), the same for both rows."""
    valid = torch.ones(1, 2, dtype=torch.bool)
    cosine, distance = map_agreement(one_head([[0.5, 0.5], [0.5, 0.5]]),
                                     one_head([[1, 0], [1, 0]]), valid, causal=False)
    assert cosine.item() == pytest.approx(1 / math.sqrt(2), rel=HAND_RTOL)
    assert distance.item() == pytest.approx(math.sqrt(0.75 * math.log(4 / 3)), rel=HAND_RTOL)


def test_a_causal_head_with_padding_counts_only_what_queries_see() -> None:
    """Causal, a window of 2 tokens padded to 3; garbage on the future key of row 0, the
    padded key and the padded query row. Visible cells (0,0), (1,0), (1,1): A = (1, 1/2, 1/2),
    B = (1, 1, 0), so cosine = 3/2 / sqrt(3/2 · 2) = sqrt(3)/2. Row 0 is (1) in both (distance
    0); row 1 as in the test above: sqrt(3/4 ln(4/3)); the mean over the 2 valid rows."""
    valid = torch.tensor([[True, True, False]])
    a = one_head([[1, 0.7, 0.2], [0.5, 0.5, 0.9], [0.3, 0.3, 0.4]])
    b = one_head([[1, 0.1, 0.6], [1, 0, 0.4], [0.9, 0.05, 0.05]])
    cosine, distance = map_agreement(a, b, valid, causal=True)
    assert cosine.item() == pytest.approx(math.sqrt(3) / 2, rel=HAND_RTOL)
    assert distance.item() == pytest.approx(math.sqrt(0.75 * math.log(4 / 3)) / 2,
                                            rel=HAND_RTOL)


def test_layers_out_of_order_are_refused() -> None:
    a, valid = random_maps([3], causal=False, seed=8)
    agreement = MapAgreement(2, valid, causal=False)
    with pytest.raises(RuntimeError, match="out of order"):
        agreement.add_rows(1, 0, a[1], a[1])
    agreement.add_rows(0, 0, a[0], a[0])
    with pytest.raises(RuntimeError, match="1 of 2 layers"):
        agreement.result()
