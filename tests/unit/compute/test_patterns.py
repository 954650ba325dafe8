"""Attention-pattern classes: synthetic maps of every class, the scores against plain loops,
the decision rules, and padding invariance on real forward passes of both model families."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS
from tolerances import STAT_ATOL

from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.patterns import (
    PATTERN_CLASSES,
    VERTICAL_COLUMNS,
    PatternThresholds,
    classify,
    pattern_scores,
)
from pipelines.config import WindowConfig
from pipelines.text.tokenize import Document, Window, Windower

#: float32 scores vs float64 loops (``reference_scores``) or another padding: row masses are
#: float32 sums of ≤ n weights (``tolerances.STAT_ATOL``), averaged and divided by the chance
#: correction mean(1 − inside/visible) ≥ 0.8 at n ≥ 16: ≤ 1.25x that, within its 4-5x margin;
#: 1e-5 alike for uniform and perfect maps (exact in float64, float32-rounded here)
TOL = STAT_ATOL
LENGTHS = (16, 23, 40)
GARBAGE = 0.37

# ---------------------------------------------------------------------------------------------
# synthetic maps: [n, n] rows that sum to 1 over the keys each query may see


def visible_mask(n: int, causal: bool) -> np.ndarray:
    return np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)


def normalised(weights: np.ndarray, causal: bool) -> np.ndarray:
    weights = weights * visible_mask(len(weights), causal)
    return weights / weights.sum(1, keepdims=True)


def vertical_map(n: int, causal: bool) -> np.ndarray:
    """Bidirectional: every row on [CLS] (0.6) and [SEP] (0.4). Causal: on the first token,
    and from a mid-text period on, half on the period."""
    a = np.zeros((n, n))
    if causal:
        period = n // 2
        a[:, 0] = 1.0
        a[period:, [0, period]] = 0.5
        return a
    a[:, 0], a[:, n - 1] = 0.6, 0.4
    return a


def diagonal_map(n: int, causal: bool) -> np.ndarray:
    """Previous / self / next band (causal: previous and self)."""
    weights = {-1: 0.7, 0: 0.3} if causal else {-1: 0.3, 0: 0.2, 1: 0.5}
    a = sum(w * np.eye(n, k=offset) for offset, w in weights.items())
    return normalised(a, causal)


def mixed_map(n: int, causal: bool, share: float = 0.5) -> np.ndarray:
    return share * vertical_map(n, causal) + (1 - share) * diagonal_map(n, causal)


def pair_segment(n: int, first: int) -> np.ndarray:
    """[CLS] text [SEP] as segment 0 (``first`` tokens), pair [SEP] as segment 1."""
    return (np.arange(n) >= first).astype(np.uint8)


def block_map(segment: np.ndarray, causal: bool) -> np.ndarray:
    """Every row uniform over the keys of its own segment."""
    return normalised((segment[:, None] == segment[None, :]).astype(float), causal)


def dirichlet_map(n: int, causal: bool, seed: int) -> np.ndarray:
    return normalised(np.random.default_rng(seed).dirichlet(np.ones(n), size=n), causal)


def uniform_map(n: int, causal: bool) -> np.ndarray:
    return normalised(np.ones((n, n)), causal)


def padded_batch(maps: list[np.ndarray], segments: list[np.ndarray] | None = None,
                 extra: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn [1, B, 1, S, S] (zero padded keys, garbage padded queries), valid, segment [B, S]."""
    size = max(len(a) for a in maps) + extra
    attn = torch.zeros(1, len(maps), 1, size, size)
    valid = torch.zeros(len(maps), size, dtype=torch.bool)
    segment = torch.zeros(len(maps), size, dtype=torch.uint8)
    for b, a in enumerate(maps):
        n = len(a)
        attn[0, b, 0, :n, :n] = torch.from_numpy(a).float()
        attn[0, b, 0, n:, :n] = GARBAGE
        valid[b, :n] = True
        if segments is not None:
            segment[b, :n] = torch.from_numpy(segments[b])
    return attn, valid, segment


def scores_of(maps: list[np.ndarray], causal: bool,
              segments: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Scores [B] of single-head maps in one padded batch."""
    attn, valid, segment = padded_batch(maps, segments)
    return {k: v[0, :, 0].numpy() for k, v in pattern_scores(attn, valid, segment,
                                                             causal).items()}


def classes_of(maps: list[np.ndarray], causal: bool,
               segments: list[np.ndarray] | None = None) -> list[str]:
    attn, valid, segment = padded_batch(maps, segments)
    codes = classify(pattern_scores(attn, valid, segment, causal))
    assert codes.dtype == torch.int8 and codes.shape == (1, len(maps), 1)
    return [PATTERN_CLASSES[int(c)] for c in codes[0, :, 0]]


# ---------------------------------------------------------------------------------------------
# synthetic maps of every class


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("name", "build"), [("vertical", vertical_map),
                                             ("diagonal", diagonal_map),
                                             ("vertical+diagonal", mixed_map)])
def test_synthetic_maps_get_their_class(name: str, build, causal: bool) -> None:
    maps = [build(n, causal) for n in LENGTHS]
    assert classes_of(maps, causal) == [name] * len(LENGTHS)


@pytest.mark.parametrize("causal", [False, True])
def test_random_rows_are_heterogeneous(causal: bool) -> None:
    maps = [dirichlet_map(n, causal, seed) for n in LENGTHS for seed in range(5)]
    assert classes_of(maps, causal) == ["heterogeneous"] * len(maps)
    pairs = [pair_segment(len(a), len(a) // 2) for a in maps]
    assert classes_of(maps, causal, pairs) == ["heterogeneous"] * len(maps)


@pytest.mark.parametrize("causal", [False, True])
def test_sentence_pair_blocks(causal: bool) -> None:
    segments = [pair_segment(n, first) for n in LENGTHS for first in (n // 3, n // 2)]
    maps = [block_map(s, causal) for s in segments]
    assert classes_of(maps, causal, segments) == ["block"] * len(maps)
    np.testing.assert_allclose(scores_of(maps, causal, segments)["block"], 1.0, atol=TOL)


def test_block_needs_a_sentence_pair() -> None:
    """The same two-block map with one segment: block is NaN and never the class."""
    segments = [pair_segment(n, n // 2) for n in LENGTHS]
    maps = [block_map(s, False) for s in segments]
    scores = scores_of(maps, False)
    assert np.isnan(scores["block"]).all()
    assert "block" not in classes_of(maps, False)
    attn, valid, _ = padded_batch(maps)
    assert pattern_scores(attn, valid, None, False)["block"].isnan().all()


@pytest.mark.parametrize("causal", [False, True])
def test_patterns_keep_their_class_in_sentence_pairs(causal: bool) -> None:
    """Diagonal and vertical heads also stay in their segment; block must not win over them."""
    for name, build in [("vertical", vertical_map), ("diagonal", diagonal_map),
                        ("vertical+diagonal", mixed_map)]:
        maps = [build(n, causal) for n in LENGTHS]
        segments = [pair_segment(n, n // 2) for n in LENGTHS]
        assert classes_of(maps, causal, segments) == [name] * len(LENGTHS)
        assert np.isfinite(scores_of(maps, causal, segments)["block"]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_perfect_patterns_score_one(causal: bool) -> None:
    np.testing.assert_allclose(scores_of([vertical_map(n, causal) for n in LENGTHS],
                                         causal)["vertical"], 1.0, atol=TOL)
    np.testing.assert_allclose(scores_of([diagonal_map(n, causal) for n in LENGTHS],
                                         causal)["diagonal"], 1.0, atol=TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [5, 16, 41])
def test_uniform_maps_score_zero(n: int, causal: bool) -> None:
    """Chance correction: a uniform map, causal triangle included, shows no pattern."""
    scores = scores_of([uniform_map(n, causal)], causal, [pair_segment(n, n // 2)])
    for name in ("vertical", "diagonal", "block"):
        assert abs(scores[name][0]) <= TOL, (name, scores[name][0])
    assert classes_of([uniform_map(n, causal)], causal) == ["heterogeneous"]


def test_causal_first_rows_do_not_count() -> None:
    """Rows that see only pattern keys carry no evidence: causal rows 0-1 for the band, and
    rows 0-2 when the three chosen columns are keys 0-2. Rewriting them changes nothing."""
    n = 20
    base = dirichlet_map(n, True, seed=3)
    base[:, :3] += 1.0
    base = normalised(base, True)  # keys 0-2 are the vertical columns
    first_rows = base.copy()
    first_rows[1, :2] = [0.9, 0.1]
    first_rows[2, :3] = [0.05, 0.05, 0.9]
    row_one = base.copy()
    row_one[1, :2] = [0.2, 0.8]
    scores = scores_of([base, first_rows, row_one], True)
    assert scores["vertical"][0] > 0.3
    assert scores["vertical"][0] == pytest.approx(scores["vertical"][1], abs=TOL)
    assert scores["diagonal"][0] == pytest.approx(scores["diagonal"][2], abs=TOL)
    assert scores["diagonal"][0] != pytest.approx(scores["diagonal"][1], abs=TOL)  # row 2


@pytest.mark.parametrize(("share", "name", "causal"), [
    (0.05, "diagonal", False), (0.35, "vertical+diagonal", False),
    (0.5, "vertical+diagonal", False), (0.65, "vertical+diagonal", False),
    (0.95, "vertical", False),
    # Causal rows early in the window see few keys, so their band is already a large share
    # by chance and a 35 % band is little evidence: short causal mixtures read less diagonal.
    (0.05, "diagonal", True), (0.35, "vertical+diagonal", True),
    (0.5, "vertical+diagonal", True), (0.95, "vertical", True),
])
def test_mixture_share_decides(share: float, name: str, causal: bool) -> None:
    maps = [mixed_map(n, causal, share) for n in LENGTHS]
    assert classes_of(maps, causal) == [name] * len(LENGTHS)
    vertical = scores_of(maps, causal)["vertical"]
    # a modelling bound, not rounding: the chance-corrected score only approximates the
    # vertical part's share (the band and columns overlap, early causal rows see few keys)
    np.testing.assert_allclose(vertical, share, atol=0.15)


# ---------------------------------------------------------------------------------------------
# the scores against plain loops


def corrected(mass: list[float], inside: list[int], visible: list[int]) -> float:
    rows = [i for i in range(len(mass)) if inside[i] < visible[i]]
    if not rows:
        return math.nan
    excess = sum(mass[i] - inside[i] / visible[i] for i in rows)
    return excess / sum(1 - inside[i] / visible[i] for i in rows)


def reference_scores(a: np.ndarray, segment: np.ndarray, causal: bool) -> dict[str, float]:
    """The three scores of one [n, n] map, one row at a time."""
    n = len(a)
    visible = [i + 1 if causal else n for i in range(n)]
    m = min(VERTICAL_COLUMNS, n)
    column_chance = [sum(1 / k for k in visible if j < k) for j in range(n)]
    top = np.argsort(-(a.sum(0) - column_chance), kind="stable")[:m]
    top_seen = [sum(1 for c in top if c < visible[i]) for i in range(n)]
    band = [[j for j in range(visible[i]) if abs(i - j) <= 1] for i in range(n)]
    own = [[j for j in range(visible[i]) if segment[j] == segment[i]] for i in range(n)]
    block = corrected([a[i, own[i]].sum() for i in range(n)], [len(o) for o in own], visible)
    return {
        "vertical": corrected([a[i, top].sum() for i in range(n)], top_seen, visible),
        "diagonal": corrected([a[i, band[i]].sum() for i in range(n)], [len(b) for b in band],
                              visible),
        "block": block if len(set(segment.tolist())) == 2 else math.nan,
    }


@pytest.mark.parametrize("causal", [False, True])
def test_scores_match_plain_loops(causal: bool) -> None:
    lengths = [1, 2, 3, 4, 7, 16, 30]
    maps = [dirichlet_map(n, causal, seed=n) ** 3 for n in lengths]
    maps = [normalised(a, causal) for a in maps]  # peakier rows
    segments = [pair_segment(n, max(1, n // 3)) if n % 2 else np.zeros(n, np.uint8)
                for n in lengths]
    got = scores_of(maps, causal, segments)
    for b, (a, segment) in enumerate(zip(maps, segments, strict=True)):
        for name, expected in reference_scores(a, segment, causal).items():
            actual = float(got[name][b])
            assert math.isnan(actual) == math.isnan(expected), (len(a), name, actual, expected)
            if not math.isnan(expected):
                assert abs(actual - expected) <= TOL, (len(a), name, actual, expected)


def test_layers_batch_and_heads_are_independent() -> None:
    """[L, B, H] layout: each map's scores do not depend on its neighbours."""
    causal = False
    builders = [vertical_map, diagonal_map, uniform_map]
    attn = torch.zeros(2, 2, 3, 20, 20)
    valid = torch.zeros(2, 20, dtype=torch.bool)
    for b, n in enumerate((20, 13)):
        valid[b, :n] = True
        for layer in range(2):
            for head in range(3):
                a = builders[(layer + head) % 3](n, causal)
                attn[layer, b, head, :n, :n] = torch.from_numpy(a).float()
    codes = classify(pattern_scores(attn, valid, torch.zeros_like(valid), causal))
    names = ["vertical", "diagonal", "heterogeneous"]
    for layer in range(2):
        for head in range(3):
            expected = PATTERN_CLASSES.index(names[(layer + head) % 3])
            assert codes[layer, :, head].tolist() == [expected, expected]


def test_too_short_windows_are_heterogeneous() -> None:
    """A one-token window (and a batch of S = 1) has nothing to score."""
    attn = torch.ones(2, 1, 3, 1, 1)
    valid = torch.ones(1, 1, dtype=torch.bool)
    for causal in (False, True):
        scores = pattern_scores(attn, valid, torch.zeros_like(valid), causal)
        assert all(v.isnan().all() for v in scores.values())
        assert (classify(scores) == PATTERN_CLASSES.index("heterogeneous")).all()


# ---------------------------------------------------------------------------------------------
# the rules


def one_head_scores(vertical: float, diagonal: float, block: float) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([[[value]]]) for name, value in
            (("vertical", vertical), ("diagonal", diagonal), ("block", block))}


@pytest.mark.parametrize(("vertical", "diagonal", "block", "name"), [
    (0.9, 0.1, 0.9, "vertical"),
    (0.1, 0.9, 0.9, "diagonal"),
    (0.9, 0.3, math.nan, "vertical+diagonal"),  # the diagonal line is no longer negligible
    (0.4, 0.4, math.nan, "vertical+diagonal"),
    (0.3, 0.26, 0.9, "block"),  # both present, but together not most of the mass
    (0.5, 0.1, 0.2, "heterogeneous"),  # neither dominates, block below its threshold
    (0.1, 0.1, 0.6, "block"),
    (0.1, 0.1, math.nan, "heterogeneous"),
    (math.nan, math.nan, math.nan, "heterogeneous"),
    (0.9, math.nan, 0.9, "block"),  # a NaN diagonal cannot confirm a vertical head
])
def test_classify_rules(vertical: float, diagonal: float, block: float, name: str) -> None:
    code = classify(one_head_scores(vertical, diagonal, block))
    assert PATTERN_CLASSES[int(code.reshape(-1)[0])] == name


def test_thresholds_are_recorded_and_used() -> None:
    defaults = PatternThresholds()
    assert defaults.to_dict() == {"dominant": 0.6, "substantial": 0.25, "block": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.dominant = 0.7  # type: ignore[misc]
    scores = one_head_scores(0.55, 0.1, math.nan)
    assert PATTERN_CLASSES[int(classify(scores).reshape(-1)[0])] == "heterogeneous"
    lenient = PatternThresholds(dominant=0.5)
    assert PATTERN_CLASSES[int(classify(scores, lenient).reshape(-1)[0])] == "vertical"


@pytest.mark.parametrize("values", [{"substantial": 0.7}, {"dominant": 1.5}, {"block": 0.0},
                                    {"substantial": 0.0}])
def test_thresholds_are_validated(values: dict) -> None:
    with pytest.raises(ValueError):
        PatternThresholds(**values)


def test_class_names() -> None:
    assert PATTERN_CLASSES == ("vertical", "diagonal", "vertical+diagonal", "block",
                               "heterogeneous")


# ---------------------------------------------------------------------------------------------
# real models: padding must not change scores or classes


def real_windows(backend: TorchBackend) -> list[Window]:
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is the cat happy?", "The cat sat on the mat, purring."))
    if backend.info.causal:
        docs.append(Document("one", "Hello"))
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    return [w for doc in docs for w in windower.windows(doc)]


def real_scores(backend: TorchBackend,
                windows: list[Window]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    batch = collate(windows, backend.info.pad_token_id)
    segment = torch.zeros(batch.valid.shape, dtype=torch.uint8)
    for b, window in enumerate(windows):
        segment[b, : window.n_tokens] = torch.from_numpy(window.segment)
    scores = pattern_scores(backend.attentions(batch), batch.valid, segment,
                            backend.info.causal)
    return {k: v.numpy() for k, v in scores.items()}, classify(scores).numpy()


def test_real_patterns_do_not_depend_on_padding(backend: TorchBackend) -> None:
    short = real_windows(backend)
    (long_window,) = Windower(backend.tokenizer, backend.info, WindowConfig()).windows(
        Document("long", SAMPLE_TEXTS[3] * 3))
    assert long_window.n_tokens > 2 * max(w.n_tokens for w in short)
    together, together_classes = real_scores(backend, [long_window, *short])
    info = backend.info
    assert together_classes.shape == (info.num_layers, len(short) + 1, info.num_heads)
    for b, window in enumerate(short, start=1):
        alone, alone_classes = real_scores(backend, [window])
        for name in ("vertical", "diagonal", "block"):
            np.testing.assert_allclose(together[name][:, b], alone[name][:, 0], atol=TOL,
                                       rtol=0, equal_nan=True, err_msg=name)
        # classes threshold the scores: equal unless a score sits within its rounding (≲ TOL)
        # of a class boundary, which these real heads do not
        np.testing.assert_array_equal(together_classes[:, b], alone_classes[:, 0])
        is_pair = window.doc.text_pair is not None
        assert np.isfinite(together["block"][:, b]).all() == is_pair
        assert np.isnan(together["block"][:, b]).all() == (not is_pair)
    assert np.isfinite(together["vertical"][:, 0]).all()
    assert np.isfinite(together["diagonal"][:, 0]).all()
