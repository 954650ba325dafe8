"""The factor solver: codes against scikit-learn, KKT conditions, recovery of planted atoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode

from pipelines.factors.solver import DictionaryLearner, encode, objective


def unit_rows(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(dim=1, keepdim=True)


def planted(k: int = 32, d: int = 64, n: int = 20000, active: int = 4, noise: float = 0.02,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows made from a known non-negative dictionary [k, d] and non-negative codes + noise."""
    generator = torch.Generator().manual_seed(seed)
    atoms = unit_rows(torch.rand(k, d, generator=generator))
    codes = torch.zeros(n, k)
    chosen = torch.rand(n, k, generator=generator).argsort(dim=1)[:, :active]  # [n, active]
    codes.scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=generator))
    rows = codes @ atoms + noise * torch.randn(n, d, generator=generator)
    return rows, atoms


def sklearn_codes(x: torch.Tensor, atoms: torch.Tensor, sparsity: float) -> torch.Tensor:
    """scikit-learn's coordinate-descent lasso with positive codes, same objective.

    sparse_encode(lasso_cd) fits Lasso with alpha = regularisation / n_features, whose
    objective is (1 / (2 n_features)) ‖x − αΦ‖² + alpha ‖α‖₁ = (½‖x − αΦ‖² + λ‖α‖₁) / d when
    regularisation = λ: the same minimiser as ours.
    """
    codes = sparse_encode(x.double().numpy(), atoms.double().numpy(), algorithm="lasso_cd",
                          alpha=sparsity, positive=True, max_iter=20000)
    return torch.from_numpy(codes)


@pytest.mark.parametrize("problem", ["gaussian", "planted"])
def test_codes_equal_scikit_learn(problem: str) -> None:
    if problem == "gaussian":
        generator = torch.Generator().manual_seed(1)
        atoms = unit_rows(torch.randn(64, 48, generator=generator, dtype=torch.float64))
        x = torch.randn(300, 48, generator=generator, dtype=torch.float64)
    else:
        x, atoms = (t.double() for t in planted(n=300))
    sparsity = 0.1
    want = sklearn_codes(x, atoms, sparsity)
    converged = encode(x, atoms, sparsity, steps=5000, tol=1e-10)
    assert (converged >= 0).all()
    np.testing.assert_allclose(converged.numpy(), want.numpy(), atol=1e-5)
    default = encode(x.float(), atoms.float(), sparsity)  # the settings the pipeline uses
    ours = objective(x, default.double(), atoms, sparsity)
    theirs = objective(x, want, atoms, sparsity)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4)
    assert ((want > 1e-3) == (default > 1e-3)).float().mean() > 0.99  # the same support


def test_codes_satisfy_the_optimality_conditions() -> None:
    """KKT of the non-negative lasso: ∂/∂α_j of ½‖x − αΦ‖² is −λ where α_j > 0, ≥ −λ else."""
    generator = torch.Generator().manual_seed(2)
    atoms = unit_rows(torch.randn(40, 30, generator=generator, dtype=torch.float64))
    x = torch.randn(200, 30, generator=generator, dtype=torch.float64)
    sparsity = 0.05
    codes = encode(x, atoms, sparsity, steps=5000, tol=1e-12)
    gradient = (codes @ atoms - x) @ atoms.T  # [n, k]
    active = codes > 0
    np.testing.assert_allclose(gradient[active].numpy(), -sparsity, atol=1e-6)
    assert (gradient[~active] >= -sparsity - 1e-6).all()
    assert active.any() and (~active).any()


@pytest.mark.parametrize("nonneg_dict", [True, False])
def test_planted_atoms_are_recovered(nonneg_dict: bool) -> None:
    rows, atoms = planted()
    learner = DictionaryLearner(64, 32, sparsity=0.05, nonneg_dict=nonneg_dict, seed=1)
    generator = torch.Generator().manual_seed(5)
    errors = []
    for _ in range(3):
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), 1024):
            errors.append(learner.partial_fit(rows[order[start:start + 1024]])
                          ["relative_error"])
    cosine = (unit_rows(learner.dictionary) @ atoms.T).max(dim=0).values  # per planted atom
    share = float((cosine >= 0.9).float().mean())
    print(f"nonneg_dict={nonneg_dict}: {share:.0%} of 32 planted atoms recovered "
          f"(best-match cosine ≥ 0.9); relative error {errors[0]:.3f} → {errors[-1]:.4f}")
    assert share >= 0.8
    assert errors[-1] < errors[0] / 10
    if nonneg_dict:
        assert (learner.dictionary >= 0).all()
    np.testing.assert_allclose(learner.dictionary.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_state_is_bounded_and_zero_weights_change_nothing() -> None:
    rows, _ = planted(n=4096)
    learner = DictionaryLearner(64, 32, sparsity=0.05, seed=1)
    learner.partial_fit(rows[:1024])
    sizes = {name: tuple(t.shape) for name, t in learner.state_dict().items()}
    learner.partial_fit(rows[1024:])  # three times as many rows
    assert {name: tuple(t.shape) for name, t in learner.state_dict().items()} == sizes
    twin = DictionaryLearner(64, 32, sparsity=0.05, seed=1)
    twin.load_state_dict(learner.state_dict())
    learner.forget = twin.forget = 1.0  # compare the sums without decay
    batch = rows[:512]
    learner.partial_fit(batch)
    twin.partial_fit(torch.cat([batch, 5 * rows[512:1024]]),
                     weights=torch.cat([torch.ones(512), torch.zeros(512)]))
    torch.testing.assert_close(learner.code_data, twin.code_data)
    torch.testing.assert_close(learner.code_gram, twin.code_gram)


def test_learning_is_deterministic_with_a_seed() -> None:
    rows, _ = planted(n=2048)
    first, second = (DictionaryLearner(64, 32, 0.05, seed=7) for _ in range(2))
    for learner in (first, second):
        for start in range(0, 2048, 512):
            learner.partial_fit(rows[start:start + 512])
    torch.testing.assert_close(first.dictionary, second.dictionary)


def test_a_row_codes_the_same_alone_or_in_a_batch() -> None:
    """Up to float32 rounding (BLAS sums in another order for another batch size)."""
    rows, atoms = planted(n=64)
    batched = encode(rows, atoms, 0.05)
    for index in (0, 17, 63):
        alone = encode(rows[index:index + 1], atoms, 0.05)[0]
        np.testing.assert_allclose(batched[index].numpy(), alone.numpy(), atol=1e-5)
