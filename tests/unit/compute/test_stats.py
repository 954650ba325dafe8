"""Per-head statistics: vectorised code vs. the NumPy reference, hand-computed values,
synthetic heads and padding invariance, on real forward passes of both model families."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import SAMPLE_TEXTS
from tolerances import ATTENTION_ATOL, EPS32, STAT_ATOL

from pipelines.analysis.batch import analyse_batch, analyse_windows, sort_tables
from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute import reference
from pipelines.compute.stats import STAT_NAMES, KeyFlags, head_statistics, row_order
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.text.tokenize import Document, Window, Windower

#: float32 statistics vs the float64 reference (``reference.one_head``) or vs another batch
#: shape: sums of n weights, see ``tolerances.STAT_ATOL`` (1e-5; seen ≤ 2.4e-6 here)
TOL = STAT_ATOL
LOCAL_WINDOW = 2
LONG_TEXT = SAMPLE_TEXTS[3] * 3

# ---------------------------------------------------------------------------------------------
# helpers


def make_windows(backend: TorchBackend, docs: list[Document],
                 config: WindowConfig | None = None) -> list[Window]:
    windower = Windower(backend.tokenizer, backend.info, config or WindowConfig())
    return [w for doc in docs for w in windower.windows(doc)]


def sample_docs(backend: TorchBackend) -> list[Document]:
    """Texts of different lengths, a sentence pair, and (GPT-2) a one-token window."""
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is the cat happy?", "The cat sat on the mat, purring."))
    if backend.info.causal:
        docs.append(Document("one", "Hello"))
    return docs


def flags_of(batch) -> KeyFlags:
    return KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)


def has_sep(backend: TorchBackend) -> bool:
    return backend.info.sep_token_id is not None


def reference_rows(attn: torch.Tensor, b: int, window: Window, backend: TorchBackend,
                   w: int = LOCAL_WINDOW, entropy_epsilon: float = 0.0) -> list[dict]:
    """Reference statistics of batch row ``b`` on its un-padded [L, H, n, n] slice."""
    n = window.n_tokens
    sliced = attn[:, b, :, :n, :n].numpy()
    return reference.all_heads(sliced, window.is_sep, window.is_special, window.is_punct,
                               backend.info.causal, w, has_sep(backend), entropy_epsilon)


def assert_close(actual: float | None, expected: float | None, what: str) -> None:
    """Equal within TOL, with None/NaN (null) only where the other side is null too."""
    a_null = actual is None or math.isnan(actual)
    e_null = expected is None or math.isnan(expected)
    assert a_null == e_null, f"{what}: null mismatch ({actual} vs {expected})"
    if not a_null:
        assert abs(actual - expected) <= TOL, f"{what}: {actual} vs {expected}"


def stats_of_batch(backend: TorchBackend, windows: list[Window]) -> dict[str, np.ndarray]:
    """head_statistics of one padded batch as NumPy [L, B, H] arrays (n_tokens [B])."""
    batch = collate(windows, backend.info.pad_token_id)
    attn = backend.attentions(batch)
    out = head_statistics(attn, flags_of(batch), backend.info.causal, LOCAL_WINDOW,
                          has_sep(backend))
    return {k: v.numpy() for k, v in out.items()}


def keyed_rows(table: pa.Table, keys: list[str]) -> dict[tuple, dict]:
    return {tuple(row[k] for k in keys): row for row in table.to_pylist()}


# ---------------------------------------------------------------------------------------------
# vectorised statistics vs. the reference on real attentions


#: Entropy smoothing: none, Clark et al.'s, and one large enough that its ε/n term dominates
#: the rows' small weights (the smoothed entropy's terms are ≤ 0 each, so no cancellation).
EPSILONS = [0.0, 1e-4, 0.25]


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_head_stats_match_reference_on_padded_batch(backend: TorchBackend,
                                                    epsilon: float) -> None:
    windows = make_windows(backend, sample_docs(backend))
    lengths = {w.n_tokens for w in windows}
    assert len(lengths) > 2, "the batch must mix lengths so that padding is exercised"
    batch = collate(windows, backend.info.pad_token_id)
    attn = backend.attentions(batch)
    config = RunConfig(local_window=LOCAL_WINDOW, attention=AttentionMode("none"),
                       entropy_epsilon=epsilon)
    table = analyse_batch(backend, batch, config)["head_stats"]
    info = backend.info
    assert table.num_rows == len(windows) * info.num_layers * info.num_heads
    rows = keyed_rows(table, ["doc_id", "window", "layer", "head"])

    checked = 0
    for b, window in enumerate(windows):
        for ref in reference_rows(attn, b, window, backend, entropy_epsilon=epsilon):
            row = rows[(window.doc.doc_id, window.window, ref["layer"], ref["head"])]
            assert row["n_tokens"] == window.n_tokens == ref["n_tokens"]
            for name in STAT_NAMES:
                what = f"{window.doc.doc_id} L{ref['layer']} H{ref['head']} {name}"
                assert_close(row[name], ref[name], what)
                checked += 1
    assert checked == len(windows) * info.num_layers * info.num_heads * len(STAT_NAMES)


def test_nulls_line_up(backend: TorchBackend) -> None:
    windows = make_windows(backend, sample_docs(backend))
    batch = collate(windows, backend.info.pad_token_id)
    config = RunConfig(attention=AttentionMode("none"))
    table = analyse_batch(backend, batch, config)["head_stats"]
    sep_nulls = table.column("mass_sep").null_count
    assert sep_nulls == (table.num_rows if backend.info.causal else 0)
    for name in STAT_NAMES:
        if name not in ("mass_sep", "entropy_norm"):
            assert table.column(name).null_count == 0, name
    one_token = np.array(table.column("n_tokens").to_pylist()) == 1
    norm_null = np.array(table.column("entropy_norm").is_null().to_pylist())
    np.testing.assert_array_equal(norm_null, one_token)
    assert one_token.any() == backend.info.causal  # GPT-2 sample has a one-token window


def test_sentence_pair_has_two_separators(minilm: TorchBackend) -> None:
    (window,) = make_windows(minilm, [Document("p", "A cat.", "A dog.")])
    assert window.is_sep.sum() == 2
    stats = stats_of_batch(minilm, [window])
    # [SEP] keys are special keys too, so their mass is part of mass_special.
    assert (stats["mass_sep"] <= stats["mass_special"] + TOL).all()
    assert (stats["mass_sep"] > 0).all()


# ---------------------------------------------------------------------------------------------
# the reference itself, against values computed by hand

# Bidirectional 3x3: key 2 is [SEP] (and special), key 0 is special, key 1 is punctuation.
HAND_BIDIR = np.array([[0.25, 0.50, 0.25],
                       [0.05, 0.85, 0.10],
                       [0.00, 0.40, 0.60]])
HAND_BIDIR_FLAGS = (np.array([False, False, True]), np.array([True, False, True]),
                    np.array([False, True, False]))


def hand_bidir_expected(w: int) -> dict[str, float]:
    ln = math.log
    h0 = -(0.25 * ln(0.25) + 0.5 * ln(0.5) + 0.25 * ln(0.25))
    h1 = -(0.05 * ln(0.05) + 0.85 * ln(0.85) + 0.10 * ln(0.10))
    h2 = -(0.40 * ln(0.40) + 0.60 * ln(0.60))  # 0 ln 0 = 0
    window, sparse = {0: (1.70, 2.10), 1: (2.75, 3.00)}[w]
    return {
        "entropy": (h0 + h1 + h2) / 3,
        "entropy_norm": (h0 + h1 + h2) / (3 * ln(3)),
        "max_weight": (0.50 + 0.85 + 0.60) / 3,
        "mass_self": (0.25 + 0.85 + 0.60) / 3,
        "mass_prev": (0.0 + 0.05 + 0.40) / 3,
        "mass_next": (0.50 + 0.10 + 0.0) / 3,
        "mass_first": (0.25 + 0.05 + 0.00) / 3,
        "mass_sep": (0.25 + 0.10 + 0.60) / 3,
        "mass_special": (0.50 + 0.15 + 0.60) / 3,
        "mass_punct": (0.50 + 0.85 + 0.40) / 3,
        "mean_distance": (1.00 + 0.15 + 0.40) / 3,
        "mass_window": window / 3,
        "mass_sparse": sparse / 3,
        "k90": (3 + 2 + 2) / 3,
    }


# Causal 3x3 (lower triangular), key 2 is punctuation, no special tokens, no separator.
HAND_CAUSAL = np.array([[1.0, 0.0, 0.0],
                        [0.3, 0.7, 0.0],
                        [0.2, 0.3, 0.5]])
HAND_CAUSAL_FLAGS = (np.zeros(3, bool), np.zeros(3, bool), np.array([False, False, True]))


def hand_causal_expected() -> dict[str, float]:
    ln = math.log
    h1 = -(0.3 * ln(0.3) + 0.7 * ln(0.7))
    h2 = -(0.2 * ln(0.2) + 0.3 * ln(0.3) + 0.5 * ln(0.5))
    return {
        "entropy": (0.0 + h1 + h2) / 3,
        "entropy_norm": (h1 / ln(2) + h2 / ln(3)) / 2,  # row 0 sees one key: left out
        "max_weight": (1.0 + 0.7 + 0.5) / 3,
        "mass_self": (1.0 + 0.7 + 0.5) / 3,
        "mass_prev": (0.0 + 0.3 + 0.3) / 3,
        "mass_next": 0.0,
        "mass_first": (1.0 + 0.3 + 0.2) / 3,
        "mass_sep": float("nan"),
        "mass_special": 0.0,
        "mass_punct": (0.0 + 0.0 + 0.5) / 3,
        "mean_distance": (0.0 + 0.3 + (0.2 * 2 + 0.3)) / 3,
        "mass_window": (1.0 + 0.7 + 0.5) / 3,  # w = 0: the diagonal
        "mass_sparse": (1.0 + 0.7 + 0.5) / 3,
        "k90": (1 + 2 + 3) / 3,
    }


@pytest.mark.parametrize("w", [0, 1])
def test_reference_by_hand_bidirectional(w: int) -> None:
    got = reference.one_head(HAND_BIDIR, *HAND_BIDIR_FLAGS, causal=False, w=w, has_sep=True)
    for name, value in hand_bidir_expected(w).items():
        assert_close(got[name], value, name)


def test_reference_by_hand_causal() -> None:
    got = reference.one_head(HAND_CAUSAL, *HAND_CAUSAL_FLAGS, causal=True, w=0, has_sep=False)
    for name, value in hand_causal_expected().items():
        assert_close(got[name], value, name)


def test_reference_all_heads_layout() -> None:
    attn = np.stack([np.stack([HAND_BIDIR, HAND_BIDIR.T / HAND_BIDIR.T.sum(-1, keepdims=True)])
                     ] * 2)  # [L=2, H=2, 3, 3]
    rows = reference.all_heads(attn, *HAND_BIDIR_FLAGS, causal=False, w=1, has_sep=True)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["n_tokens"] == 3 for r in rows)
    assert_close(rows[2]["mass_prev"], hand_bidir_expected(1)["mass_prev"], "mass_prev")


def padded_synthetic(matrix: np.ndarray, size: int, garbage: float = 0.37) -> torch.Tensor:
    """[1, 1, 1, size, size]: ``matrix`` top-left, zero padded keys, garbage padded queries."""
    n = matrix.shape[0]
    out = torch.zeros(size, size)
    out[:n, :n] = torch.tensor(matrix, dtype=torch.float32)
    out[n:, :n] = garbage
    return out[None, None, None]


def synthetic_flags(n: int, size: int, sep=None, special=None, punct=None) -> KeyFlags:
    def pad(values) -> torch.Tensor:
        out = torch.zeros(1, size, dtype=torch.bool)
        if values is not None:
            out[0, :n] = torch.as_tensor(values)
        return out

    return KeyFlags(pad(np.ones(n, bool)), pad(sep), pad(special), pad(punct))


def scalar_stats(attn: torch.Tensor, flags: KeyFlags, causal: bool, w: int,
                 sep: bool = True) -> dict[str, float]:
    out = head_statistics(attn, flags, causal, w, sep)
    return {k: float(v.reshape(-1)[0]) for k, v in out.items()}


@pytest.mark.parametrize("w", [0, 1])
def test_vectorised_by_hand_bidirectional_with_padding(w: int) -> None:
    flags = synthetic_flags(3, 5, *HAND_BIDIR_FLAGS)
    got = scalar_stats(padded_synthetic(HAND_BIDIR, 5), flags, causal=False, w=w)
    assert got["n_tokens"] == 3
    for name, value in hand_bidir_expected(w).items():
        assert_close(got[name], value, name)


def test_vectorised_by_hand_causal_with_padding() -> None:
    flags = synthetic_flags(3, 6, *HAND_CAUSAL_FLAGS)
    got = scalar_stats(padded_synthetic(HAND_CAUSAL, 6), flags, causal=True, w=0, sep=False)
    for name, value in hand_causal_expected().items():
        assert_close(got[name], value, name)


# ---------------------------------------------------------------------------------------------
# synthetic heads through head_statistics


def test_previous_token_head() -> None:
    n = 6
    a = np.zeros((n, n))
    a[0, 0] = 1.0
    a[np.arange(1, n), np.arange(n - 1)] = 1.0
    got = scalar_stats(padded_synthetic(a, n), synthetic_flags(n, n), causal=False, w=0)
    assert_close(got["mass_prev"], (n - 1) / n, "mass_prev")
    assert_close(got["mass_self"], 1 / n, "mass_self")
    assert_close(got["mass_next"], 0.0, "mass_next")
    assert_close(got["mean_distance"], (n - 1) / n, "mean_distance")
    assert_close(got["entropy"], 0.0, "entropy")
    assert_close(got["entropy_norm"], 0.0, "entropy_norm")
    assert_close(got["max_weight"], 1.0, "max_weight")
    assert_close(got["k90"], 1.0, "k90")
    assert_close(got["mass_window"], 1 / n, "mass_window")


def test_next_token_head_causal_is_impossible_but_bidirectional_works() -> None:
    n = 5
    a = np.zeros((n, n))
    a[np.arange(n - 1), np.arange(1, n)] = 1.0
    a[n - 1, n - 1] = 1.0
    got = scalar_stats(padded_synthetic(a, n), synthetic_flags(n, n), causal=False, w=1)
    assert_close(got["mass_next"], (n - 1) / n, "mass_next")
    assert_close(got["mass_prev"], 0.0, "mass_prev")
    assert_close(got["mass_window"], 1.0, "mass_window")


def test_first_token_head() -> None:
    n = 7
    a = np.zeros((n, n))
    a[:, 0] = 1.0
    special = np.zeros(n, bool)
    special[[0, n - 1]] = True
    flags = synthetic_flags(n, n + 3, special=special)
    got = scalar_stats(padded_synthetic(a, n + 3), flags, causal=True, w=0)
    assert_close(got["mass_first"], 1.0, "mass_first")
    assert_close(got["k90"], 1.0, "k90")
    assert_close(got["mass_special"], 1.0, "mass_special")
    assert_close(got["mass_sparse"], 1.0, "mass_sparse")
    assert_close(got["mass_self"], 1 / n, "mass_self")
    assert_close(got["mean_distance"], sum(range(n)) / n, "mean_distance")


@pytest.mark.parametrize("n", [2, 5, 9, 25, 41])
def test_uniform_bidirectional_rows(n: int) -> None:
    a = np.full((n, n), 1.0 / n)
    got = scalar_stats(padded_synthetic(a, n + 2), synthetic_flags(n, n + 2), False, w=0)
    assert_close(got["entropy_norm"], 1.0, "entropy_norm")
    assert_close(got["entropy"], math.log(n), "entropy")
    assert_close(got["max_weight"], 1 / n, "max_weight")
    assert_close(got["mean_distance"], (n * n - 1) / (3 * n), "mean_distance")
    assert_close(got["k90"], math.ceil(0.9 * n), "k90")


def test_uniform_causal_rows() -> None:
    n = 6
    a = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    got = scalar_stats(padded_synthetic(a, n + 1), synthetic_flags(n, n + 1), True, w=0,
                       sep=False)
    assert_close(got["entropy_norm"], 1.0, "entropy_norm")
    assert_close(got["entropy"], np.mean(np.log(np.arange(1, n + 1))), "entropy")
    assert_close(got["mass_next"], 0.0, "mass_next")
    assert math.isnan(got["mass_sep"])


def test_one_token_window_has_no_entropy_norm() -> None:
    got = scalar_stats(padded_synthetic(np.ones((1, 1)), 4), synthetic_flags(1, 4), True, w=0)
    assert math.isnan(got["entropy_norm"])
    assert_close(got["entropy"], 0.0, "entropy")
    assert_close(got["k90"], 1.0, "k90")
    assert_close(got["mass_first"], 1.0, "mass_first")


@pytest.mark.parametrize("w", [0, 1, 2, 5])
def test_single_position_batch(w: int) -> None:
    """S = 1 (e.g. a one-token GPT-2 document, batched alone): nothing to pad, nothing to sort."""
    attn = torch.ones(2, 1, 3, 1, 1)
    valid = torch.ones(1, 1, dtype=torch.bool)
    none = torch.zeros_like(valid)
    out = head_statistics(attn, KeyFlags(valid, none, none, none), True, w, False)
    for name, value in {"entropy": 0.0, "max_weight": 1.0, "mass_self": 1.0, "mass_prev": 0.0,
                        "mass_first": 1.0, "mean_distance": 0.0, "mass_window": 1.0,
                        "mass_sparse": 1.0, "k90": 1.0}.items():
        np.testing.assert_allclose(out[name].numpy(), value, atol=TOL, err_msg=name)
    assert out["entropy_norm"].isnan().all() and out["mass_sep"].isnan().all()


@pytest.mark.parametrize("w", [2, 3, 4, 7])
def test_local_window_wider_than_the_batch(w: int) -> None:
    """A half-width w reaching past the padded length S covers every key."""
    flags = synthetic_flags(3, 3, *HAND_BIDIR_FLAGS)
    got = scalar_stats(padded_synthetic(HAND_BIDIR, 3), flags, causal=False, w=w)
    ref = reference.one_head(HAND_BIDIR, *HAND_BIDIR_FLAGS, causal=False, w=w, has_sep=True)
    for name in STAT_NAMES:
        assert_close(got[name], ref[name], name)
    assert_close(got["mass_window"], 1.0, "mass_window")


@pytest.mark.parametrize("size", [1, 2, 7, 40])
def test_row_order_reads_a_sort(size: int) -> None:
    """max, k-th largest and k90 from one in-place sort equal a plain NumPy sort of each row."""
    raw = torch.rand(2, 3, 2, size, size, generator=torch.Generator().manual_seed(size)) ** 4
    attn = raw / raw.sum(-1, keepdim=True)
    k = min(3, size)
    order = row_order(attn, k)
    descending = -np.sort(-attn.numpy().astype(np.float64), axis=-1)
    # bitwise: max and k-th largest are selections of stored float32 values (no arithmetic)
    np.testing.assert_array_equal(order.max_weight.numpy(), attn.numpy().max(-1))
    np.testing.assert_array_equal(order.kth_largest.numpy(), descending[..., k - 1])
    # k90 counts partial sums below 0.9: the code sums in float32 (ascending), this in float64
    # (descending), which agree on the count unless a partial sum lies within the float32
    # error of a size-term sum (≤ size·eps32·1) of 0.9; these seeds keep clear of that
    partial = np.cumsum(descending, -1)
    assert np.abs(partial - 0.9).min() > size * EPS32
    expected_k90 = (partial < 0.9).sum(-1) + 1
    np.testing.assert_array_equal(order.k90.numpy(), expected_k90)


def test_batch_rows_are_independent() -> None:
    """Two windows of different lengths in one batch give each its own statistics."""
    size = 6
    first = np.zeros((4, 4))
    first[:, 0] = 1.0
    second = np.eye(6)
    attn = torch.cat([padded_synthetic(first, size), padded_synthetic(second, size)], dim=1)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    none = torch.zeros_like(valid)
    out = head_statistics(attn, KeyFlags(valid, none, none, none), False, 0, True)
    np.testing.assert_allclose(out["mass_first"][0, :, 0].numpy(), [1.0, 1 / 6], atol=TOL)
    np.testing.assert_allclose(out["mass_self"][0, :, 0].numpy(), [1 / 4, 1.0], atol=TOL)
    np.testing.assert_array_equal(out["n_tokens"].numpy(), [4, 6])
    np.testing.assert_allclose(out["mass_sep"][0, :, 0].numpy(), [0.0, 0.0], atol=TOL)


# ---------------------------------------------------------------------------------------------
# padding invariance


def test_statistics_do_not_depend_on_padding(backend: TorchBackend) -> None:
    short = make_windows(backend, sample_docs(backend))
    (long_window,) = make_windows(backend, [Document("long", LONG_TEXT)])
    assert long_window.n_tokens > 2 * max(w.n_tokens for w in short)
    together = stats_of_batch(backend, [long_window, *short])
    for b, window in enumerate(short, start=1):
        alone = stats_of_batch(backend, [window])
        assert together["n_tokens"][b] == alone["n_tokens"][0] == window.n_tokens
        for name in STAT_NAMES:
            np.testing.assert_allclose(together[name][:, b], alone[name][:, 0], atol=TOL,
                                       rtol=0, equal_nan=True, err_msg=name)


def test_attention_does_not_depend_on_padding(backend: TorchBackend) -> None:
    short = make_windows(backend, sample_docs(backend))[:3]
    (long_window,) = make_windows(backend, [Document("long", LONG_TEXT)])
    batch = collate([*short, long_window], backend.info.pad_token_id)
    together = backend.attentions(batch)
    for b, window in enumerate(short):
        n = window.n_tokens
        alone = backend.attentions(collate([window], backend.info.pad_token_id))
        # exactly 0 by construction: masked logits underflow exp() to +0.0
        assert (together[:, b, :, :, n:] == 0).all(), "padded keys must get zero weight"
        # another batch shape (padded to the long window): ATTENTION_ATOL (seen ≤ 2.2e-6)
        torch.testing.assert_close(together[:, b, :, :n, :n], alone[:, 0], atol=ATTENTION_ATOL,
                                   rtol=0)
        row_sums = together[:, b, :, :n, :].sum(-1)  # float32 sum of ≤ 101 weights: ≪ 1e-5
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=TOL, rtol=0)


def corpus_windows(backend: TorchBackend) -> list[Window]:
    docs = [*sample_docs(backend)[:3], Document("long", SAMPLE_TEXTS[3] * 2)]
    return make_windows(backend, docs, WindowConfig(max_length=24, stride=6))


def test_analyse_windows_independent_of_batch_tokens(backend: TorchBackend) -> None:
    windows = corpus_windows(backend)
    assert any(w.n_windows > 1 for w in windows)
    mode = AttentionMode("topk", k=3)
    small = sort_tables(analyse_windows(
        backend, windows, RunConfig(attention=mode, batch_tokens=30)))
    large = sort_tables(analyse_windows(
        backend, windows, RunConfig(attention=mode, batch_tokens=8192)))

    key_columns = ["doc_id", "window", "layer", "head", "n_tokens"]
    for name in key_columns:
        assert small["head_stats"].column(name).equals(large["head_stats"].column(name)), name
    for name in STAT_NAMES:
        a = np.array(small["head_stats"].column(name).to_pylist(), dtype=float)
        b = np.array(large["head_stats"].column(name).to_pylist(), dtype=float)
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, equal_nan=True, err_msg=name)

    compare_topk_tables(small["attention"], large["attention"], windows, backend, mode.k)


ROW_KEYS = ["doc_id", "window", "layer", "head", "query"]


def ranked(table: pa.Table) -> pd.DataFrame:
    """Attention rows sorted by query row, then weight descending, with the rank in the row."""
    df = table.to_pandas().sort_values([*ROW_KEYS, "weight"],
                                       ascending=[True] * len(ROW_KEYS) + [False])
    df = df.reset_index(drop=True)
    df["rank"] = df.groupby(ROW_KEYS).cumcount()
    return df


def distinct_ranks(attn: torch.Tensor, n: int, k: int, gap: float) -> np.ndarray:
    """[L, H, n, k] bool: the rank-r weight of the row is more than ``gap`` away from the
    weights ranked just above and below it (so its key is well defined under float noise).
    ``attn`` is one window's [L, H, S, S] with zeros on keys the query may not see."""
    k = min(k, n)
    values = torch.sort(attn[:, :, :n, :n], dim=-1, descending=True).values
    values = torch.nn.functional.pad(values, (1, 1), value=float("nan"))  # no neighbour
    above, centre, below = values[..., :k], values[..., 1 : k + 1], values[..., 2 : k + 2]
    ok = ~((above - centre) <= gap) & ~((centre - below) <= gap)  # NaN compares False
    return ok.numpy()


def compare_topk_tables(small: pa.Table, large: pa.Table, windows: list[Window],
                        backend: TorchBackend, k: int) -> None:
    a, b = ranked(small), ranked(large)
    for name in [*ROW_KEYS, "rank"]:
        np.testing.assert_array_equal(a[name].to_numpy(), b[name].to_numpy(), err_msg=name)
    # other batch_tokens, so other padding: ATTENTION_ATOL (== TOL)
    np.testing.assert_allclose(a["weight"], b["weight"], atol=ATTENTION_ATOL, rtol=0)

    compared = 0
    for window in windows:
        in_window = ((a["doc_id"] == window.doc.doc_id) & (a["window"] == window.window)).to_numpy()
        rows = a[in_window]
        n = window.n_tokens
        visible = np.arange(1, n + 1) if backend.info.causal else np.full(n, n)
        per_row = rows.groupby(["layer", "head", "query"]).size().to_numpy()
        np.testing.assert_array_equal(per_row, np.tile(np.minimum(k, visible),
                                                       backend.info.num_layers
                                                       * backend.info.num_heads))
        attn = backend.attentions(collate([window], backend.info.pad_token_id))[:, 0]
        distinct = distinct_ranks(attn, n, k, gap=TOL)
        index = tuple(rows[c].to_numpy().astype(np.int64) for c in ("layer", "head", "query",
                                                                      "rank"))
        check = distinct[index]
        np.testing.assert_array_equal(rows["key"].to_numpy()[check],
                                      b["key"].to_numpy()[in_window][check])
        compared += int(check.sum())
    assert compared > 0.5 * len(a), f"only {compared} of {len(a)} keys could be compared"
