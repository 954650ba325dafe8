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
    assert (ours <= theirs + 1e-10).all()  # never worse than scikit-learn
    assert same_support(converged, want, 1e-6 * scale)
    # float32 with the default steps and tolerance (a duality gap of 1e-4 of the objective)
    default = encode(x.float(), atoms.float(), sparsity).double()
    assert (default >= 0).all()
    assert float((default - want).abs().max()) <= 1e-3 * scale
    np.testing.assert_allclose(objective(x, default, atoms, sparsity).numpy(), theirs.numpy(),
                               rtol=1e-4)
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
        assert (gap >= excess - 1e-12).all() and (excess > 0).all()


def test_cached_lipschitz_and_warm_start() -> None:
    x, atoms = gaussian(3)
    gram = atoms @ atoms.T  # [k, k]
    codes = encode(x, atoms, 0.1, tol=1e-8)
    same = encode(x, atoms, 0.1, tol=1e-8, gram=gram, lipschitz_constant=lipschitz(gram))
    torch.testing.assert_close(same, codes)
    assert abs(lipschitz(gram) - float(torch.linalg.matrix_norm(atoms, ord=2)) ** 2) < 1e-9
    restarted = encode(x, atoms, 0.1, steps=1, tol=1e-8, init=codes)  # already optimal
    torch.testing.assert_close(restarted, codes, atol=1e-7, rtol=0)


def test_a_row_codes_the_same_alone_or_in_a_batch() -> None:
    """Rows stop on their own: in float64 a row's codes do not depend on its batch; in float32
    the stopping step may move with the rounding (BLAS sums in another order for another batch
    size), within the solver's accuracy."""
    rows, atoms = planted(n=64)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-3)):
        x, dictionary = rows.to(dtype), atoms.to(dtype)
        batched = encode(x, dictionary, 0.1)  # [64, k]
        for index in (0, 17, 63):
            alone = encode(x[index:index + 1], dictionary, 0.1)[0]  # [k]
            np.testing.assert_allclose(batched[index].numpy(), alone.numpy(), rtol=0,
                                       atol=atol * float(batched[index].max()))


def test_rows_are_solved_in_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded by solving CHUNK_ELEMENTS // k rows at a time; results do not change."""
    rows, atoms = planted(n=64)
    x, dictionary = rows.double(), atoms.double()
    whole = encode(x, dictionary, 0.1)  # [64, k]: one chunk
    warm = encode(x, dictionary, 0.1, steps=20)  # [64, k]: an unfinished start point
    warm_whole = encode(x, dictionary, 0.1, steps=30, init=warm)
    monkeypatch.setattr(solver, "CHUNK_ELEMENTS", 5 * len(dictionary))  # 5 rows per chunk
    np.testing.assert_allclose(encode(x, dictionary, 0.1).numpy(), whole.numpy(), atol=1e-12)
    np.testing.assert_allclose(encode(x, dictionary, 0.1, steps=30, init=warm).numpy(),
                               warm_whole.numpy(), atol=1e-12)


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
    assert (learner.dictionary.norm(dim=1) <= 1 + 1e-5).all()


def test_unused_atoms_restart_at_badly_rebuilt_rows() -> None:
    rows, _ = planted(n=512)  # non-negative rows
    learner = DictionaryLearner(64, 32, sparsity=0.05, seed=1)
    learner.init_from(rows)
    learner.dictionary[:4] = 0  # dead atoms: no row can use them
    learner.partial_fit(rows)
    restarted = learner.dictionary[:4]  # [4, d]: unit-length copies of rows
    np.testing.assert_allclose(restarted.norm(dim=1).numpy(), 1.0, atol=1e-6)
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
        assert float((ours - theirs).abs().max()) <= 1e-4 * float(ours.abs().max()), name
    assert first == pytest.approx(second, rel=1e-4)


def test_learning_is_deterministic_with_a_seed() -> None:
    rows, _ = planted(n=2048)
    first, second, other = (DictionaryLearner(64, 32, 0.05, seed=s) for s in (7, 7, 8))
    for learner in (first, second, other):
        for start in range(0, 2048, 512):
            learner.partial_fit(rows[start:start + 512])
    assert torch.equal(first.dictionary, second.dictionary)
    assert not torch.equal(first.dictionary, other.dictionary)
