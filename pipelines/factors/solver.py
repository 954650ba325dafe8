"""Non-negative sparse coding and online dictionary learning, in torch on any device.

Rows x [d] are explained by a dictionary Φ [k, d] of unit-length atoms and codes α ≥ 0:

    codes:       minimise over α ≥ 0   ½‖x − αΦ‖² + λ‖α‖₁           (FISTA, batched)
    dictionary:  minimise the same, summed over rows, over Φ with ‖φ_j‖ ≤ 1 (optionally ≥ 0)

The dictionary is learned online (Mairal et al., 2010): each minibatch is encoded, its
sufficient statistics αᵀα and αᵀx are added to decayed running sums, and each atom takes one
block-coordinate-descent step on them. The learner's state is O(k² + k·d) whatever the number
of rows seen.
"""

from __future__ import annotations

import math

import torch


def lipschitz(gram: torch.Tensor) -> float:
    """Largest eigenvalue of ΦΦᵀ: the step size of FISTA is its inverse."""
    return float(torch.linalg.eigvalsh(gram.double()).max())


def encode(x: torch.Tensor, dictionary: torch.Tensor, sparsity: float, steps: int = 300,
           tol: float = 1e-4, gram: torch.Tensor | None = None,
           init: torch.Tensor | None = None) -> torch.Tensor:
    """Non-negative lasso codes [n, k] of rows ``x`` [n, d] by FISTA.

    A row stops once no code of it moved by more than ``tol`` (relative to its largest code)
    in one step, or after ``steps``; each row's result depends on that row alone, so batching
    does not change it. Inactive codes are exactly 0.
    """
    gram = dictionary @ dictionary.T if gram is None else gram  # [k, k]
    step = 1.0 / lipschitz(gram)
    correlation = x @ dictionary.T  # [n, k]: xΦᵀ
    codes = torch.zeros_like(correlation) if init is None else init.clone()  # α
    momentum, t = codes.clone(), 1.0  # y, t of FISTA
    running = torch.ones(len(x), dtype=torch.bool, device=x.device)  # rows not converged
    for _ in range(steps):
        gradient = momentum @ gram - correlation  # [n, k]: (yΦ − x)Φᵀ
        updated = (momentum - step * (gradient + sparsity)).clamp_min_(0)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        change = (updated - codes).abs().amax(dim=1)  # [n]
        scale = updated.abs().amax(dim=1).clamp_min(1e-12)  # [n]
        keep = running[:, None]
        momentum = torch.where(keep, updated + ((t - 1) / t_next) * (updated - codes), momentum)
        codes = torch.where(keep, updated, codes)
        running &= change > tol * scale
        t = t_next
        if not running.any():
            break
    return codes


def objective(x: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor,
              sparsity: float) -> torch.Tensor:
    """½‖x − αΦ‖² + λ‖α‖₁ per row, [n]."""
    residual = x - codes @ dictionary
    return 0.5 * residual.square().sum(dim=1) + sparsity * codes.abs().sum(dim=1)


class DictionaryLearner:
    """Learns Φ [k, d] from minibatches of rows (``partial_fit``), in bounded memory."""

    def __init__(self, dim: int, n_factors: int, sparsity: float, nonneg_dict: bool = False,
                 seed: int = 0, device: str = "cpu", forget: float = 0.95,
                 encode_steps: int = 300) -> None:
        self.dim, self.n_factors, self.sparsity = dim, n_factors, sparsity
        self.nonneg_dict, self.forget, self.encode_steps = nonneg_dict, forget, encode_steps
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.dictionary = torch.zeros(n_factors, dim, device=self.device)  # Φ [k, d]
        self.code_gram = torch.zeros(n_factors, n_factors, device=self.device)  # A = Σ αᵀα
        self.code_data = torch.zeros(n_factors, dim, device=self.device)  # B = Σ αᵀx
        self.updates = 0
        self.initialised = False

    def init_from(self, samples: torch.Tensor) -> None:
        """Atoms from randomly chosen rows of ``samples`` [m, d] (with repeats if m < k)."""
        picks = torch.randint(len(samples), (self.n_factors,), generator=self.generator)
        noise = 0.01 * torch.randn(self.n_factors, self.dim, generator=self.generator)
        self.dictionary = self._project(samples.cpu()[picks] + noise).to(self.device)
        self.initialised = True

    def _project(self, atoms: torch.Tensor) -> torch.Tensor:
        """Onto the constraint set: non-negative if asked, then at most unit length."""
        if self.nonneg_dict:
            atoms = atoms.clamp_min(0)
        return atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1.0)

    def _normalise(self, atoms: torch.Tensor) -> torch.Tensor:
        return atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def partial_fit(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> dict:
        """One online step on the rows ``x`` [n, d]; returns the batch's loss statistics.

        ``weights`` [n] scale each row's share of the statistics (e.g. token frequency
        weighting); a weight of 0 leaves the statistics unchanged.
        """
        if not self.initialised:
            self.init_from(x)
        x = x.to(self.device)
        gram = self.dictionary @ self.dictionary.T  # [k, k]
        codes = encode(x, self.dictionary, self.sparsity, self.encode_steps, gram=gram)  # [n, k]
        stats = self._batch_stats(x, codes)
        weights = torch.ones(len(x), device=self.device) if weights is None \
            else weights.to(self.device)  # [n]
        weighted = codes * weights[:, None]  # [n, k]
        total = float(weights.sum()) or 1.0
        self.updates += 1
        decay = self.forget if self.updates > 1 else 0.0
        self.code_gram = decay * self.code_gram + weighted.T @ codes / total
        self.code_data = decay * self.code_data + weighted.T @ x / total
        self._update_atoms()
        self._restart_unused(x, codes)
        return stats

    def _batch_stats(self, x: torch.Tensor, codes: torch.Tensor) -> dict:
        rebuilt = codes @ self.dictionary
        error = (x - rebuilt).square().sum(dim=1)  # [n]
        return {"loss": float(objective(x, codes, self.dictionary, self.sparsity).mean()),
                "relative_error": float(error.sum() / x.square().sum().clamp_min(1e-12)),
                "mean_active": float((codes > 0).sum(dim=1).float().mean())}

    def _update_atoms(self) -> None:
        """One block-coordinate-descent sweep: φ_j ← φ_j + (B_j − A_j Φ) / A_jj, projected."""
        atoms = self.dictionary.clone()
        for j in range(self.n_factors):
            weight = self.code_gram[j, j]
            if weight <= 1e-12:
                continue
            residual = self.code_data[j] - self.code_gram[j] @ atoms  # [d]
            atoms[j] = self._project((atoms[j] + residual / weight)[None])[0]
        self.dictionary = atoms

    def _restart_unused(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Atoms no row has used (A_jj ≈ 0) restart at this batch's worst-rebuilt rows."""
        unused = torch.nonzero(self.code_gram.diagonal() <= 1e-10).flatten()
        if len(unused) == 0:
            return
        error = (x - codes @ self.dictionary).square().sum(dim=1)  # [n]
        worst = error.argsort(descending=True)[: len(unused)]
        rows = x[worst]
        if self.nonneg_dict:
            rows = rows.clamp_min(0)
        self.dictionary[unused[: len(rows)]] = self._normalise(rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"dictionary": self.dictionary.cpu(), "code_gram": self.code_gram.cpu(),
                "code_data": self.code_data.cpu(),
                "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.dictionary = state["dictionary"].to(self.device)
        self.code_gram = state["code_gram"].to(self.device)
        self.code_data = state["code_data"].to(self.device)
        self.updates, self.initialised = int(state["updates"]), True
