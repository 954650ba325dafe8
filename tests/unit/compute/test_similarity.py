"""Jensen–Shannon distances between heads: SciPy on real and random maps, hand values,
symmetry, batching, padding, row weighting, the Arrow table and the MDS coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_TEXTS
from scipy.spatial.distance import jensenshannon

from pipelines.analysis.similarity import similarity_table
from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.similarity import CHUNK_CELLS, HeadSimilarity, chunk_shape, coordinates
from pipelines.config import WindowConfig
from pipelines.text.tokenize import Document, Window, Windower

#: float64 sqrt(JSD) per row vs SciPy's (another formula) or another batch shape: the JSD
#: itself rounds at ~n·eps64·log2(n) ≈ 1e-13 (n ≤ 101 keys), but sqrt turns an absolute error ε
#: near JSD = 0 into up to √ε ≈ 4e-7: 1e-6. For the model's float32 attention under another
#: padding, weights move by δ/p ~ 1e-6 relative, and by the triangle inequality of the JS
#: metric the distance moves by ≤ d(p, p') + d(q, q') ≈ 2·‖δ/√p‖/√(8 ln 2) ≲ 1e-6 too.
TOL = 1e-6

# ---------------------------------------------------------------------------------------------
# helpers


def scipy_distance(windows: list[np.ndarray]) -> np.ndarray:
    """[N, N]: SciPy's JS distance (base 2) per query row, averaged over every row.

    Each window is [N, n, n]: all heads (layer-major) over its n valid rows and keys.
    """
    total, rows = 0.0, 0
    for heads in windows:
        heads = heads.astype(np.float64)
        per_row = jensenshannon(heads[:, None], heads[None, :], base=2, axis=-1)  # [N, N, n]
        total = total + per_row.sum(-1)
        rows += heads.shape[1]
    return total / rows


def window_slices(attn: torch.Tensor, valid: torch.Tensor) -> list[np.ndarray]:
    """Every window's [N, n, n] un-padded heads, layer-major."""
    layers, _, heads = attn.shape[:3]
    out = []
    for b, n in enumerate(valid.sum(-1).tolist()):
        out.append(attn[:, b, :, :n, :n].reshape(layers * heads, n, n).numpy())
    return out


def similarity_of(attn: torch.Tensor, valid: torch.Tensor, **kwargs) -> HeadSimilarity:
    sim = HeadSimilarity(attn.shape[0], attn.shape[2], **kwargs)
    sim.add(attn, valid)
    return sim


def random_batch(lengths: list[int], layers: int = 2, heads: int = 3, causal: bool = False,
                 seed: int = 0, extra: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaked random maps with exact zeros, padded on the right; padded query rows and padded
    keys hold garbage (both must be ignored)."""
    rng = np.random.default_rng(seed)
    size = max(lengths) + extra
    attn = rng.uniform(0.1, 0.9, (layers, len(lengths), heads, size, size))  # garbage
    valid = np.zeros((len(lengths), size), bool)
    for b, n in enumerate(lengths):
        valid[b, :n] = True
        weights = rng.dirichlet(np.full(n, 0.5), size=(layers, heads, n)) ** 2
        weights[rng.random(weights.shape) < 0.3] = 0.0  # exact zeros: 0 log 0 = 0
        if causal:
            weights *= np.tril(np.ones((n, n)))
        weights[..., 0] += 1e-3  # no empty row
        attn[:, b, :, :n, :n] = weights / weights.sum(-1, keepdims=True)
    return torch.from_numpy(attn).float(), torch.from_numpy(valid)


def make_windows(backend: TorchBackend, docs: list[Document]) -> list[Window]:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    return [w for doc in docs for w in windower.windows(doc)]


def sample_docs() -> list[Document]:
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is the cat happy?", "The cat sat on the mat, purring."))
    return docs


def real_attention(backend: TorchBackend,
                   windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate(windows, backend.info.pad_token_id)
    return backend.attentions(batch), batch.valid


# ---------------------------------------------------------------------------------------------
# against SciPy and by hand


def test_matches_scipy_on_real_attention(backend: TorchBackend) -> None:
    windows = make_windows(backend, sample_docs())
    attn, valid = real_attention(backend, windows)
    assert len(set(valid.sum(-1).tolist())) > 2, "the batch must mix lengths"
    sim = similarity_of(attn, valid)
    info = backend.info
    assert sim.rows == sum(w.n_tokens for w in windows)
    expected = scipy_distance(window_slices(attn, valid))
    assert expected.shape == (info.num_layers * info.num_heads,) * 2
    np.testing.assert_allclose(sim.distance(), expected, atol=TOL, rtol=0)
    off_diagonal = expected[~np.eye(len(expected), dtype=bool)]
    assert off_diagonal.min() > 0.01, "real heads differ"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_cells", [None, 7, 150])
def test_matches_scipy_on_random_maps(causal: bool, chunk_cells: int | None) -> None:
    """Tiny chunks split both the head pairs and the query rows."""
    attn, valid = random_batch([1, 5, 17, 30], causal=causal, seed=int(causal))
    kwargs = {"chunk_cells": chunk_cells} if chunk_cells else {}
    sim = similarity_of(attn, valid, **kwargs)
    assert sim.rows == 1 + 5 + 17 + 30
    np.testing.assert_allclose(sim.distance(), scipy_distance(window_slices(attn, valid)),
                               atol=TOL, rtol=0)


def test_hand_computed_distance() -> None:
    """One layer, two heads, two rows: JSD([1, 0], [0, 1]) = 1 bit; for [.5, .5] vs [1, 0],
    m = [.75, .25] and JSD = H(m) - (1 + 0) / 2."""
    attn = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 0.0]]]])[:, None]
    h_m = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    expected = (1.0 + np.sqrt(h_m - 0.5)) / 2
    distance = similarity_of(attn, torch.ones(1, 2, dtype=torch.bool)).distance()
    # float64, JSDs 1 and 0.31 (far from 0, so sqrt does not amplify): a few eps64
    np.testing.assert_allclose(distance, [[0.0, expected], [expected, 0.0]], atol=1e-12, rtol=0)


def test_self_distance_is_zero_and_matrix_symmetric() -> None:
    attn, valid = random_batch([4, 9, 12], seed=3)
    attn[1, :, 2] = attn[0, :, 1]  # head (1, 2) copies head (0, 1)
    distance = similarity_of(attn, valid).distance()
    # exact by construction: sums are kept for a < b only, mirrored, with a zero diagonal
    assert (np.diag(distance) == 0).all()
    assert (distance == distance.T).all()
    copy, original = 1 * 3 + 2, 0 * 3 + 1
    # exact by construction: for p = q, m = (p + p)/2 = p exactly, so the two entropy terms
    # are the same float64 sums and their difference is 0 (clamped at 0 before the sqrt)
    assert distance[copy, original] == 0.0
    others = np.delete(distance[original], [original, copy])
    assert (others > 0.05).all()


def test_empty_accumulator() -> None:
    sim = HeadSimilarity(2, 3)
    assert sim.rows == 0
    assert np.isnan(sim.distance()).all()
    sim.add(torch.zeros(2, 1, 3, 4, 4), torch.zeros(1, 4, dtype=torch.bool))  # all padding
    assert sim.rows == 0


def test_wrong_shape_is_rejected() -> None:
    sim = HeadSimilarity(2, 3)
    attn, valid = random_batch([4], layers=2, heads=4)
    with pytest.raises(ValueError, match="2 × 3"):
        sim.add(attn, valid)


@pytest.mark.parametrize("n", [1, 7, 64, 512, 3000])
@pytest.mark.parametrize("pairs", [1, 10, 10296])
@pytest.mark.parametrize("cells", [100, 5000, CHUNK_CELLS])
def test_chunks_stay_within_the_cell_budget(n: int, pairs: int, cells: int) -> None:
    """pairs × rows × keys per chunk <= cells (one row of one pair when even that is more)."""
    pair_step, row_step = chunk_shape(n, pairs, cells)
    assert 1 <= pair_step <= pairs and 1 <= row_step <= n
    assert pair_step * row_step * n <= max(cells, n)
    if row_step < n:
        assert pair_step == 1, "rows are split only when one pair's rows do not fit"
    assert pair_step == pairs or (pair_step + 1) * row_step * n > cells, "chunks as large as fit"


# ---------------------------------------------------------------------------------------------
# batching, padding, row weighting


def test_batched_equals_one_window_at_a_time() -> None:
    attn, valid = random_batch([3, 11, 20, 7], seed=5)
    together = similarity_of(attn, valid)
    alone = HeadSimilarity(2, 3)
    for b, n in enumerate(valid.sum(-1).tolist()):
        alone.add(attn[:, b : b + 1, :, :n, :n], valid[b : b + 1, :n])  # no padding at all
    assert together.rows == alone.rows
    # float64, other shapes (padding, chunks): each row's JSD rounds at ~n·eps64 ≈ 1e-14 and
    # random maps keep JSD ≥ ~0.01, where sqrt's slope 1/(2√JSD) ≤ 5: ≤ 1e-13, so 1e-12
    np.testing.assert_allclose(together.distance(), alone.distance(), atol=1e-12, rtol=0)


def test_padding_is_ignored() -> None:
    """Garbage in padded rows and keys, and more or less padding, change nothing."""
    attn, valid = random_batch([6, 10], seed=7, extra=0)
    base = similarity_of(attn, valid).distance()
    for extra, garbage in [(1, 0.0), (9, 0.5), (30, 3.0)]:
        size = attn.shape[-1] + extra
        padded = torch.full((*attn.shape[:3], size, size), garbage)
        padded[..., : attn.shape[-1], : attn.shape[-1]] = attn
        valid_padded = torch.nn.functional.pad(valid, (0, extra))
        got = similarity_of(padded, valid_padded).distance()
        # float64, other padded shapes: as in the test above, ≤ 1e-13 away from JSD = 0
        np.testing.assert_allclose(got, base, atol=1e-12, rtol=0, err_msg=str(extra))


@pytest.mark.slow  # a model run per window: left out of make test-fast
def test_real_padding_does_not_matter(backend: TorchBackend) -> None:
    """Forward passes alone and in a padded batch agree up to the model's float noise."""
    short = make_windows(backend, sample_docs())
    (long_window,) = make_windows(backend, [Document("long", SAMPLE_TEXTS[3] * 3)])
    together = similarity_of(*real_attention(backend, [long_window, *short]))
    alone = HeadSimilarity(backend.info.num_layers, backend.info.num_heads)
    for window in [long_window, *short]:
        alone.add(*real_attention(backend, [window]))
    assert together.rows == alone.rows
    np.testing.assert_allclose(together.distance(), alone.distance(), atol=TOL, rtol=0)


def test_every_row_weighs_the_same() -> None:
    """Two windows: the mean over rows, i.e. window means weighted by their row counts."""
    attn, valid = random_batch([2, 6], seed=11)
    both = similarity_of(attn, valid)
    short = similarity_of(attn[:, :1], valid[:1])
    long = similarity_of(attn[:, 1:], valid[1:])
    expected = (2 * short.distance() + 6 * long.distance()) / 8
    # float64 means of 2 and 6 rows, summed in another order: a few eps64 (JSD far from 0)
    np.testing.assert_allclose(both.distance(), expected, atol=1e-12, rtol=0)
    unweighted = (short.distance() + long.distance()) / 2
    assert np.abs(both.distance() - unweighted).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# the table and the coordinates


def test_to_table_round_trips(tmp_path: Path) -> None:
    layers, heads = 2, 3
    attn, valid = random_batch([5, 8], layers=layers, heads=heads, seed=13)
    sim = similarity_of(attn, valid)
    table = similarity_table(sim)
    assert table.schema == pa.schema([
        ("layer_a", pa.int32()), ("head_a", pa.int32()), ("layer_b", pa.int32()),
        ("head_b", pa.int32()), ("js_distance", pa.float32()), ("n_rows", pa.int64())])
    size = layers * heads
    assert table.num_rows == size * size
    pq.write_table(table, tmp_path / "similarity.parquet")
    back = pq.read_table(tmp_path / "similarity.parquet")
    assert back.equals(table)  # exact: Parquet stores float32 losslessly

    columns = {name: back.column(name).to_numpy() for name in back.column_names}
    first = columns["layer_a"].astype(int) * heads + columns["head_a"]
    second = columns["layer_b"].astype(int) * heads + columns["head_b"]
    np.testing.assert_array_equal(first, np.repeat(np.arange(size), size))  # a-major
    np.testing.assert_array_equal(second, np.tile(np.arange(size), size))
    rebuilt = np.zeros((size, size), np.float32)
    rebuilt[first, second] = columns["js_distance"]
    # exact: to_table casts the same float64 distance() to float32
    np.testing.assert_array_equal(rebuilt, sim.distance().astype(np.float32))
    assert (columns["n_rows"] == 13).all()


def test_coordinates_recover_a_planar_layout() -> None:
    points = np.random.default_rng(0).normal(size=(12, 2))
    distance = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    got = coordinates(distance, seed=1)
    assert got.shape == (12, 2)
    recovered = np.linalg.norm(got[:, None] - got[None, :], axis=-1)
    # MDS is an iterative stress minimisation: its accuracy (~1e-3 of distances ~1), not
    # rounding, bounds this; 1e-2 says "the layout is recovered"
    np.testing.assert_allclose(recovered, distance, atol=1e-2)


def test_coordinates_of_heads_are_deterministic(minilm: TorchBackend) -> None:
    windows = make_windows(minilm, sample_docs())
    distance = similarity_of(*real_attention(minilm, windows)).distance()
    heads = minilm.info.num_layers * minilm.info.num_heads
    first = coordinates(distance, seed=3)
    assert first.shape == (heads, 2) and np.isfinite(first).all()
    # bitwise: the same seed, inputs, shapes and kernels
    np.testing.assert_array_equal(coordinates(distance, seed=3), first)
    assert not np.allclose(coordinates(distance, seed=4), first)


def test_coordinates_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        coordinates(np.zeros((3, 4)))
    with pytest.raises(ValueError):
        coordinates(np.full((3, 3), np.nan))


def test_clark_measure_table_holds_the_summed_divergence() -> None:
    attn, valid = random_batch([5, 8], seed=21)
    sim = similarity_of(attn, valid, measure="clark")
    table = similarity_table(sim)
    assert table.schema.names == ["layer_a", "head_a", "layer_b", "head_b", "js_divergence",
                                  "n_rows"]
    assert table.schema.field("js_divergence").type == pa.float64()
    # exact: the table holds distance() itself, flattened a-major
    np.testing.assert_array_equal(table["js_divergence"].to_numpy(), sim.distance().reshape(-1))
    # a sum over rows: one window's rows added twice give exactly twice (x + x is exact)
    one, twice = (similarity_of(attn[:, :1], valid[:1], measure="clark") for _ in range(2))
    twice.add(attn[:, :1], valid[:1])
    np.testing.assert_array_equal(twice.distance(), 2 * one.distance())
    assert twice.rows == 2 * one.rows == 10
    with pytest.raises(ValueError, match="unknown measure 'kl'"):
        HeadSimilarity(2, 3, measure="kl")
