"""The factor solver: codes against scikit-learn, KKT conditions, recovery of planted atoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode

from pipelines.compute import sparse_coding as solver
from pipelines.compute.sparse_coding import (
    DictionaryLearner,
    duality_gap,
    encode,
    lipschitz,
    objective,
)

EPS64 = float(torch.finfo(torch.float64).eps)
EPS32 = float(torch.finfo(torch.float32).eps)
DEFAULT_TOL = 1e-4  # ``encode``'s default: a row stops once gap ≤ 1e-4·objective


def unit_rows(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(dim=1, keepdim=True)


def planted(k: int = 32, d: int = 64, n: int = 20000, active: int = 4, noise: float = 0.03,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, d] from a known non-negative unit dictionary [k, d], ``active`` non-negative
    codes per row, plus Gaussian noise (0.03 per coordinate: about 25 dB SNR here)."""
    generator = torch.Generator().manual_seed(seed)
    atoms = unit_rows(torch.rand(k, d, generator=generator))  # [k, d]
    codes = torch.zeros(n, k)
    chosen = torch.rand(n, k, generator=generator).argsort(dim=1)[:, :active]  # [n, active]
    codes.scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=generator))
    clean = codes @ atoms  # [n, d]
    return clean + noise * torch.randn(n, d, generator=generator), atoms


def gaussian(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows [300, 48] and a random unit dictionary [64, 48] (overcomplete), float64."""
    generator = torch.Generator().manual_seed(seed)
    atoms = unit_rows(torch.randn(64, 48, generator=generator, dtype=torch.float64))
    return torch.randn(300, 48, generator=generator, dtype=torch.float64), atoms


def sklearn_codes(x: torch.Tensor, atoms: torch.Tensor, sparsity: float) -> torch.Tensor:
    """scikit-learn's coordinate-descent lasso with positive codes, on the same objective.

    The mapping (sklearn 1.9, decomposition/_dict_learning.py, ``_sparse_encode``): with
    ``lasso_cd`` it fits ``Lasso(alpha=alpha / n_features, fit_intercept=False, tol=1e-8)`` to
    X = Φᵀ [d, k], y = xᵀ [d, n]. Lasso minimises (1 / (2 n_samples)) ‖y − Xw‖² + alpha' ‖w‖₁,
    and its n_samples is d here, so per row it minimises
    (1/(2d)) ‖x − αΦ‖² + (λ/d) ‖α‖₁ = (½‖x − αΦ‖² + λ‖α‖₁) / d  when ``alpha`` = λ:
    the same minimiser as ours. So ``alpha=sparsity``, unscaled.
    """
    codes = sparse_encode(x.double().numpy(), atoms.double().numpy(), algorithm="lasso_cd",
                          alpha=sparsity, positive=True, max_iter=20000)
    return torch.from_numpy(codes)


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is fastest, and unaffected by other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("problem", ["gaussian", "planted"])
def test_codes_equal_scikit_learn(problem: str) -> None:
    x, atoms = gaussian() if problem == "gaussian" else (t.double() for t in planted(n=300))
    sparsity = 0.1
    want = sklearn_codes(x, atoms, sparsity)  # [n, k]
    scale = float(want.abs().max())
    # converged (float64, tight tolerance): the same codes within 1e-5 of the largest code
    converged = encode(x, atoms, sparsity, steps=5000, tol=1e-10)
    assert (converged >= 0).all() and (want > 0).any()
    assert float((converged - want).abs().max()) <= 1e-5 * scale
    ours, theirs = (objective(x, c, atoms, sparsity) for c in (converged, want))  # [n]
    assert (ours <= theirs + 1e-10).all()  # never worse than scikit-learn (its tol=1e-8)
    assert same_support(converged, want, 1e-6 * scale)
    # float32 with the default steps and tolerance (a duality gap of 1e-4 of the objective)
    default = encode(x.float(), atoms.float(), sparsity).double()
    assert (default >= 0).all()
    assert float((default - want).abs().max()) <= 1e-3 * scale
    # the stopping rule: gap ≤ DEFAULT_TOL·P, so P is within DEFAULT_TOL of the minimum
    np.testing.assert_allclose(objective(x, default, atoms, sparsity).numpy(), theirs.numpy(),
                               rtol=DEFAULT_TOL)
    assert same_support(default, want, 1e-3 * scale)


def same_support(ours: torch.Tensor, theirs: torch.Tensor, near: float) -> bool:
    """Active (> ``near``) in both or in neither, except where ``theirs`` is in (0, 2·near]."""
    clear = (theirs == 0) | (theirs > 2 * near)
    return bool(((ours > near) == (theirs > near))[clear].all())


def test_codes_satisfy_the_optimality_conditions() -> None:
    """KKT of the non-negative lasso: ∂/∂α_j of ½‖x − αΦ‖² is −λ where α_j > 0, ≥ −λ else."""
    generator = torch.Generator().manual_seed(2)
    atoms = unit_rows(torch.randn(40, 30, generator=generator, dtype=torch.float64))
    x = torch.randn(200, 30, generator=generator, dtype=torch.float64)
    sparsity = 0.05
    codes = encode(x, atoms, sparsity, steps=5000, tol=1e-12)
    gradient = (codes @ atoms - x) @ atoms.T  # [n, k]
    active = codes > 0
    assert active.any() and (~active).any()
    # converged to gap ≤ 1e-12·P (float64); the gradient's distance to −λ is that accuracy
    # times ‖G‖, not rounding (k·eps64 ≈ 1e-14): 1e-8 leaves room for the slow last digits
    np.testing.assert_allclose(gradient[active].numpy(), -sparsity, atol=1e-8)
    assert (gradient[~active] >= -sparsity - 1e-8).all()
    # float32 with the defaults: the same conditions, within 1e-3
    loose = encode(x.float(), atoms.float(), sparsity).double()
    gradient = (loose @ atoms - x) @ atoms.T  # [n, k]
    assert float((gradient[loose > 0] + sparsity).abs().max()) < 1e-3
    assert (gradient[loose == 0] >= -sparsity - 1e-3).all()


def test_the_duality_gap_bounds_the_distance_to_the_minimum() -> None:
    x, atoms = gaussian(4)
    best = encode(x, atoms, 0.1, steps=5000, tol=1e-12)  # [n, k]
    floor = objective(x, best, atoms, 0.1)  # [n]
    assert (duality_gap(x, best, atoms, 0.1) <= 1e-11 * floor).all()
    generator = torch.Generator().manual_seed(4)
    for noise in (1e-3, 1e-1):
        rough = (best + noise * torch.rand(best.shape, generator=generator,
                                           dtype=torch.float64)).clamp_min(0)
        excess = objective(x, rough, atoms, 0.1) - floor  # [n], > 0
        gap = duality_gap(x, rough, atoms, 0.1)  # [n]
        # float64 objectives of P ≈ 15 over d = 48: each rounds by ≤ d·eps64·P ≈ 2e-13
        assert (gap >= excess - 1e-12).all() and (excess > 0).all()


def test_cached_lipschitz_and_warm_start() -> None:
    x, atoms = gaussian(3)
    gram = atoms @ atoms.T  # [k, k]
    codes = encode(x, atoms, 0.1, tol=1e-8)
    same = encode(x, atoms, 0.1, tol=1e-8, gram=gram, lipschitz_constant=lipschitz(gram))
    # bitwise: encode computes the same ``atoms @ atoms.T`` and eigvalsh on it, same shapes
    assert torch.equal(same, codes)
    # eigvalsh vs SVD (both backward stable, float64): |ΔL| ≤ ~k·eps64·L ≈ 1e-14·L
    constant = lipschitz(gram)
    assert abs(constant - float(torch.linalg.matrix_norm(atoms, ord=2)) ** 2) < 1e-12 * constant
    restarted = encode(x, atoms, 0.1, steps=1, tol=1e-8, init=codes)  # already optimal
    # one FISTA step from a gap ≤ 1e-8·P: it moves α by step·‖gradient map‖, the solver's
    # residual (not rounding, ~1e-15); 1e-7 of codes ~1 states "already optimal" to 1e-7
    torch.testing.assert_close(restarted, codes, atol=1e-7, rtol=0)


def solver_accuracy(x: torch.Tensor, codes: torch.Tensor, atoms: torch.Tensor,
                    sparsity: float) -> torch.Tensor:
    """Per row [n], a bound on ‖α − α*‖₂, the distance of ``codes`` to the exact minimiser.

    With k < d the atoms are independent, so ½‖x − αΦ‖² + λ‖α‖₁ is μ-strongly convex on α ≥ 0,
    μ = λ_min(ΦΦᵀ) > 0, and (μ/2)‖α − α*‖² ≤ P(α) − P* ≤ gap(α): ‖α − α*‖ ≤ √(2·gap/μ). All in
    float64 (float32 codes are cast: a valid point like any other), plus d·eps64·P for the
    rounding of the gap itself.
    """
    x, codes, atoms = x.double(), codes.double(), atoms.double()
    mu = float(torch.linalg.eigvalsh(atoms @ atoms.T).min())
    assert len(atoms) < atoms.shape[1] and mu > 0
    gap = duality_gap(x, codes, atoms, sparsity)  # [n]
    rounding = atoms.shape[1] * EPS64 * objective(x, codes, atoms, sparsity)  # [n]
    return torch.sqrt(2 * (gap.clamp_min(0) + rounding) / mu)


def assert_same_minimiser(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor,
                          atoms: torch.Tensor, sparsity: float, eps: float) -> None:
    """Two solves of the same rows on different shapes: each row stopped on its own duality
    gap (≤ DEFAULT_TOL·P, up to the d·eps rounding of that check in the solve's dtype), so each
    is within √(2·gap/μ) of the one minimiser, and the two within the sum of those bounds.

    Not bitwise, not even within rounding: a different batch or chunk shape sums the BLAS
    products in another order, and a backtracking, restart or stopping decision that sits
    within rounding of its threshold then goes the other way; the solver amplifies that
    ~1e-16 into up to ~1e-9 (float64) or ~1e-4 (float32) of the codes, which only its
    accuracy bounds.
    """
    d = atoms.shape[1]
    for codes in (got, want):
        gap = duality_gap(x.double(), codes.double(), atoms.double(), sparsity)
        primal = objective(x.double(), codes.double(), atoms.double(), sparsity)
        assert (gap <= (DEFAULT_TOL + d * eps) * primal).all()  # every row stopped on its gap
    bound = (solver_accuracy(x, got, atoms, sparsity)
             + solver_accuracy(x, want, atoms, sparsity))  # [n]
    distance = (got.double() - want.double()).norm(dim=1)  # [n]
    assert (distance <= bound).all(), float((distance - bound).max())


def test_a_row_codes_the_same_alone_or_in_a_batch() -> None:
    """Rows stop on their own, so a row's codes do not depend on its batch beyond the solver's
    accuracy (``assert_same_minimiser``: another batch size rounds differently)."""
    rows, atoms = planted(n=64)
    for dtype, eps in ((torch.float64, EPS64), (torch.float32, EPS32)):
        x, dictionary = rows.to(dtype), atoms.to(dtype)
        batched = encode(x, dictionary, 0.1)  # [64, k]
        for index in (0, 17, 63):
            alone = encode(x[index:index + 1], dictionary, 0.1)  # [1, k]
            assert_same_minimiser(x[index:index + 1], batched[index:index + 1], alone,
                                  dictionary, 0.1, eps)


def test_rows_are_solved_in_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded by solving CHUNK_ELEMENTS // k rows at a time; results do not change
    beyond the solver's accuracy (float64)."""
    rows, atoms = planted(n=64)
    x, dictionary = rows.double(), atoms.double()
    whole = encode(x, dictionary, 0.1)  # [64, k]: one chunk
    warm = encode(x, dictionary, 0.1, steps=20)  # [64, k]: an unfinished start point
    warm_whole = encode(x, dictionary, 0.1, steps=30, init=warm)
    monkeypatch.setattr(solver, "CHUNK_ELEMENTS", 5 * len(dictionary))  # 5 rows per chunk
    # default solve: each row stops on its duality gap; chunks of 5 rows round differently
    # (3 of 2,048 codes moved by 7.8e-10 on one machine), so the solver's accuracy bounds it
    assert_same_minimiser(x, encode(x, dictionary, 0.1), whole, dictionary, 0.1, EPS64)
    # 30 warm steps, unconverged (gaps up to 7% of P: the accuracy bound is vacuous here), so
    # the bound is float64 rounding carried along the same steps: each step rounds its
    # [rows, k] @ [k, k] products at ≤ k·eps64 ≈ 7e-15 of the codes, and FISTA's momentum adds
    # the errors of all earlier steps: ≤ steps²·k·eps64·max|α| ≈ 30²·7e-15·1.5 ≈ 1e-11 (seen:
    # 3.5e-13). It assumes no backtracking/restart decision flips within rounding, as for
    # this fixed seed; a misplaced ``init`` chunk would be off by O(1).
    warm_atol = 30 ** 2 * len(dictionary) * EPS64 * float(warm_whole.abs().max())
    np.testing.assert_allclose(encode(x, dictionary, 0.1, steps=30, init=warm).numpy(),
                               warm_whole.numpy(), rtol=0, atol=warm_atol)


@pytest.mark.parametrize("nonneg_dict", [True, False])
def test_planted_atoms_are_recovered(nonneg_dict: bool) -> None:
    rows, atoms = planted()
    learner = DictionaryLearner(64, 32, sparsity=0.1, nonneg_dict=nonneg_dict, seed=1,
                                encode_steps=50)  # as `factors train` does
    generator = torch.Generator().manual_seed(5)
    errors = []
    for _ in range(3):
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), 1000):
            stats = learner.partial_fit(rows[order[start:start + 1000]])
            errors.append(stats["relative_error"])
    cosine = (learner.dictionary @ atoms.T).max(dim=0).values  # [32]: best match per planted
    share = float((cosine >= 0.9).float().mean())
    floor = 0.03 ** 2 / float(rows.square().mean())  # the relative error of the noise alone
    print(f"\nnonneg_dict={nonneg_dict}: {share:.0%} of 32 planted atoms recovered "
          f"(best-match cosine ≥ 0.9, min {float(cosine.min()):.3f}); relative error "
          f"{errors[0]:.4f} → {errors[-1]:.4f} (noise alone {floor:.4f}); "
          f"{stats['mean_active']:.1f} active per row")
    assert share >= 0.8
    assert errors[-1] < errors[0] / 2 and np.mean(errors[-20:]) < np.mean(errors[:20])
    if nonneg_dict:
        assert (learner.dictionary >= 0).all()
    assert (learner.dictionary.norm(dim=1) <= 1 + 64 * EPS32).all()  # float32 rescale, d = 64


def test_unused_atoms_restart_at_badly_rebuilt_rows() -> None:
    rows, _ = planted(n=512)  # non-negative rows
    learner = DictionaryLearner(64, 32, sparsity=0.05, seed=1)
    learner.init_from(rows)
    learner.dictionary[:4] = 0  # dead atoms: no row can use them
    learner.partial_fit(rows)
    restarted = learner.dictionary[:4]  # [4, d]: unit-length copies of rows
    # float32 x/‖x‖ over d = 64: |‖·‖ − 1| ≤ d·eps32 ≈ 7.6e-6
    np.testing.assert_allclose(restarted.norm(dim=1).numpy(), 1.0, atol=64 * EPS32)
    cosine = restarted @ unit_rows(rows).T  # [4, n]
    assert (cosine.max(dim=1).values > 0.999).all()


def test_state_is_bounded_and_zero_weights_change_nothing() -> None:
    rows, _ = planted(n=8192)
    learner = DictionaryLearner(64, 32, sparsity=0.05, seed=1)
    learner.partial_fit(rows[:512])
    sizes = {name: tuple(t.shape) for name, t in learner.state_dict().items()}
    for start in range(512, 8192, 2048):  # fifteen times as many rows
        learner.partial_fit(rows[start:start + 2048])
    assert {name: tuple(t.shape) for name, t in learner.state_dict().items()} == sizes
    assert sum(t.numel() for t in learner.state_dict().values()) == 32 * 64 * 2 + 32 * 32 + 1
    twin = DictionaryLearner(64, 32, sparsity=0.05, seed=1)
    twin.load_state_dict(learner.state_dict())
    batch, ignored = rows[:512], 5 * rows[512:1024]  # rows that would weigh a lot
    first = learner.partial_fit(batch)
    second = twin.partial_fit(torch.cat([batch, ignored]),
                              weights=torch.cat([torch.ones(512), torch.zeros(512)]))
    # equal up to the solver's accuracy (a batch of another size rounds differently, which
    # may move a row's stopping step): weight-0 rows five times larger add nothing
    for name in ("code_gram", "code_data", "dictionary"):
        ours, theirs = getattr(learner, name), getattr(twin, name)
        assert float((ours - theirs).abs().max()) <= DEFAULT_TOL * float(ours.abs().max()), name
    assert first == pytest.approx(second, rel=DEFAULT_TOL)


def test_learning_is_deterministic_with_a_seed() -> None:
    rows, _ = planted(n=2048)
    first, second, other = (DictionaryLearner(64, 32, 0.05, seed=s) for s in (7, 7, 8))
    for learner in (first, second, other):
        for start in range(0, 2048, 512):
            learner.partial_fit(rows[start:start + 512])
    # bitwise: same seed, same minibatch shapes, one thread (``one_thread``): the same kernels
    assert torch.equal(first.dictionary, second.dictionary)
    assert not torch.equal(first.dictionary, other.dictionary)
