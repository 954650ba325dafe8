"""Non-negative sparse coding and online dictionary learning, in torch on any device.

Rows x [d] are explained by a dictionary Φ [k, d] of unit-length atoms and codes α ≥ 0:

    codes:       minimise over α ≥ 0   ½‖x − αΦ‖² + λ‖α‖₁           (FISTA, batched)
    dictionary:  minimise the same, summed over rows, over Φ with ‖φ_j‖ ≤ 1 (optionally ≥ 0)

The dictionary is learned online (Mairal et al., 2009/2010): each minibatch is encoded, its
sufficient statistics A = Σ w αᵀα [k, k] and B = Σ w αᵀx [k, d] are added to running sums that
forget old minibatches, and each atom takes one block-coordinate-descent step on them. The
learner's state is Φ, A and B, O(k·d + k²) whatever the number of rows seen.
"""

from __future__ import annotations

import torch


def lipschitz(gram: torch.Tensor) -> float:
    """Largest eigenvalue of ΦΦᵀ [k, k]: the gradient's Lipschitz constant, FISTA's 1/step.

    Computed in float64 (exact enough for a step size, and faster than float32 on CPU).
    """
    return float(torch.linalg.eigvalsh(gram.double()).max())


def encode(x: torch.Tensor, dictionary: torch.Tensor, sparsity: float, steps: int = 300,
           tol: float = 1e-4, gram: torch.Tensor | None = None,
           init: torch.Tensor | None = None, lipschitz_constant: float | None = None
           ) -> torch.Tensor:
    """Non-negative lasso codes [n, k] of rows ``x`` [n, d] by FISTA, on the inputs' device.

    Each iteration is a gradient step of size 1/L on ½‖x − αΦ‖² from the momentum point, then
    the prox α ← max(α − λ/L, 0), so inactive codes are exactly 0. Momentum restarts for a row
    whose step goes against it (O'Donoghue and Candès, 2015), which keeps the local linear
    convergence of the lasso. A row stops once no code of it moved by more than ``tol`` times
    its largest code, or after ``steps``; stopped rows leave the batch, and each row's result
    depends on that row alone. ``gram`` (ΦΦᵀ) and ``lipschitz_constant`` (its largest
    eigenvalue) may be passed to reuse them across batches; ``init`` [n, k] warm-starts.
    """
    gram = dictionary @ dictionary.T if gram is None else gram  # [k, k]
    step = 1.0 / (lipschitz(gram) if lipschitz_constant is None else lipschitz_constant)
    correlation = x @ dictionary.T  # [n, k]: xΦᵀ
    codes = (torch.zeros_like(correlation) if init is None
             else init.to(correlation).clamp_min(0))  # [n, k]: α, the result
    rows = torch.arange(len(x), device=x.device)  # [m]: rows still running
    current, momentum = codes.clone(), codes.clone()  # [m, k]: α and y of the running rows
    t = torch.ones(len(x), 1, dtype=codes.dtype, device=x.device)  # [m, 1]: FISTA's t
    target = step * (correlation - sparsity)  # [m, k]: y − step·(∇ + λ) = y − step·yG + target
    for _ in range(steps):
        updated = (momentum - step * (momentum @ gram) + target).clamp_min_(0)  # [m, k]
        moved = updated - current  # [m, k]
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2  # [m, 1]
        restart = ((momentum - updated) * moved).sum(dim=1, keepdim=True) > 0  # [m, 1]
        momentum = updated + torch.where(restart, 0.0, (t - 1) / t_next) * moved
        t = torch.where(restart, 1.0, t_next)
        current = updated
        done = moved.abs().amax(dim=1) <= tol * updated.amax(dim=1)  # [m]
        if done.any():
            codes[rows[done]] = updated[done]
            running = ~done
            rows, current, momentum = rows[running], current[running], momentum[running]
            t, target = t[running], target[running]
            if len(rows) == 0:
                return codes
    codes[rows] = current
    return codes


def objective(x: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor,
              sparsity: float) -> torch.Tensor:
    """½‖x − αΦ‖² + λ‖α‖₁ per row, [n]."""
    residual = x - codes @ dictionary  # [n, d]
    return 0.5 * residual.square().sum(dim=1) + sparsity * codes.abs().sum(dim=1)


class DictionaryLearner:
    """Learns Φ [k, d] from minibatches of rows (``partial_fit``), in bounded memory.

    Forgetting: before minibatch t (t = 1, 2, ...) is added, A and B are multiplied by
    β_t = (1 − 1/t)^ρ (``forgetting`` = ρ ≥ 0). Minibatch s then weighs (s/t)^ρ in the sums
    at step t: ρ = 0 keeps every minibatch alike (plain sums), larger ρ forgets the early
    minibatches, coded with a poor dictionary, sooner (the statistics span roughly the last
    1/(ρ+1) of the minibatches seen). Rows count by their weight, so minibatches of different
    sizes or weights mix in proportion.
    """

    def __init__(self, dim: int, n_factors: int, sparsity: float, nonneg_dict: bool = False,
                 seed: int = 0, device: str = "cpu", forgetting: float = 1.0,
                 encode_steps: int = 300, encode_tol: float = 1e-4) -> None:
        self.dim, self.n_factors, self.sparsity = dim, n_factors, sparsity
        self.nonneg_dict, self.forgetting = nonneg_dict, forgetting
        self.encode_steps, self.encode_tol = encode_steps, encode_tol
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the same draws anywhere
        self.dictionary = torch.zeros(n_factors, dim, device=self.device)  # Φ [k, d]
        self.code_gram = torch.zeros(n_factors, n_factors, device=self.device)  # A [k, k]
        self.code_data = torch.zeros(n_factors, dim, device=self.device)  # B [k, d]
        self.updates = 0  # t: minibatches seen
        self.initialised = False

    def init_from(self, samples: torch.Tensor) -> None:
        """Atoms: unit-length copies of randomly chosen rows of ``samples`` [m, d].

        Drawn without repeats while m ≥ k; a little noise separates repeats when m < k.
        """
        if len(samples) >= self.n_factors:
            picks = torch.randperm(len(samples), generator=self.generator)[:self.n_factors]
        else:
            picks = torch.randint(len(samples), (self.n_factors,), generator=self.generator)
        noise = torch.randn(self.n_factors, self.dim, generator=self.generator)  # [k, d]
        atoms = samples.detach().float().cpu()[picks]  # [k, d]
        atoms = atoms + 0.01 * atoms.norm(dim=1, keepdim=True) * noise / self.dim ** 0.5
        self.dictionary = self._unit(atoms).to(self.device)
        self.initialised = True

    def _unit(self, atoms: torch.Tensor) -> torch.Tensor:
        """Rows [r, d] made admissible (≥ 0 if asked) and unit length; zero rows get random."""
        if self.nonneg_dict:
            atoms = atoms.clamp_min(0)
        norms = atoms.norm(dim=1, keepdim=True)  # [r, 1]
        empty = norms[:, 0] <= 1e-12  # [r]
        if empty.any():
            fill = torch.randn(int(empty.sum()), self.dim, generator=self.generator)
            atoms = atoms.clone()
            atoms[empty] = (fill.abs() if self.nonneg_dict else fill).to(atoms)
            norms = atoms.norm(dim=1, keepdim=True)
        return atoms / norms

    def partial_fit(self, x: torch.Tensor, weights: torch.Tensor | None = None
                    ) -> dict[str, float]:
        """One online step on the rows ``x`` [n, d]; returns the batch's statistics.

        ``weights`` [n] (≥ 0, e.g. token-frequency weights) scale each row's share of A and
        B and of the statistics; a row of weight 0 changes nothing. The statistics, measured
        with the dictionary before this step: ``loss`` (mean objective), ``relative_error``
        (Σ‖x − αΦ‖² / Σ‖x‖²) and ``mean_active`` (non-zero codes per row).
        """
        if not self.initialised:
            self.init_from(x)
        x = x.to(self.device, torch.float32)  # [n, d]
        weights = (torch.ones(len(x), device=self.device) if weights is None
                   else weights.to(self.device, torch.float32))  # [n]
        gram = self.dictionary @ self.dictionary.T  # [k, k]
        codes = encode(x, self.dictionary, self.sparsity, self.encode_steps, self.encode_tol,
                       gram=gram)  # [n, k]
        error = (x - codes @ self.dictionary).square().sum(dim=1)  # [n]
        stats = self._batch_stats(x, codes, error, weights)
        self.updates += 1
        decay = (1 - 1 / self.updates) ** self.forgetting
        weighted = codes * weights[:, None]  # [n, k]
        self.code_gram = decay * self.code_gram + weighted.T @ codes
        self.code_data = decay * self.code_data + weighted.T @ x
        self._update_atoms()
        self._restart_unused(x, error * weights)
        return stats

    def _batch_stats(self, x: torch.Tensor, codes: torch.Tensor, error: torch.Tensor,
                     weights: torch.Tensor) -> dict[str, float]:
        total = weights.sum().clamp_min(1e-12)
        penalty = self.sparsity * codes.sum(dim=1)  # [n]: codes are ≥ 0
        active = (codes > 0).sum(dim=1).float()  # [n]
        return {"loss": float((weights * (0.5 * error + penalty)).sum() / total),
                "relative_error": float((weights * error).sum()
                                        / (weights * x.square().sum(dim=1)).sum().clamp_min(1e-12)),
                "mean_active": float((weights * active).sum() / total)}

    def _update_atoms(self) -> None:
        """One block-coordinate-descent sweep over the atoms on A and B.

        φ_j ← φ_j + (B_j − A_j Φ) / A_jj, i.e. (B_j − Σ_{i≠j} A_ji φ_i) / A_jj, then made ≥ 0
        if asked and projected onto the unit ball. Unused atoms (A_jj = 0) are left alone.
        """
        atoms = self.dictionary.clone()  # [k, d]
        diagonal = self.code_gram.diagonal().tolist()  # one transfer, not k
        for j, weight in enumerate(diagonal):
            if weight <= 0:
                continue
            atom = atoms[j] + (self.code_data[j] - self.code_gram[j] @ atoms) / weight  # [d]
            if self.nonneg_dict:
                atom = atom.clamp_min(0)
            atoms[j] = atom / atom.norm().clamp_min(1.0)
        self.dictionary = atoms

    def _restart_unused(self, x: torch.Tensor, error: torch.Tensor) -> None:
        """Atoms no row uses (A_jj ≈ 0) restart at this batch's worst-rebuilt rows.

        ``error`` [n] is each row's weighted squared error, so weight-0 rows are never taken;
        a restarted atom's statistics are cleared.
        """
        diagonal = self.code_gram.diagonal()  # [k]
        unused = torch.nonzero(diagonal <= 1e-8 * diagonal.mean()).flatten()  # [u]
        worst = error.argsort(descending=True)[:len(unused)]  # [≤ u]
        worst = worst[error[worst] > 0]
        if len(worst) == 0:
            return
        unused = unused[:len(worst)]
        self.dictionary[unused] = self._unit(x[worst].cpu()).to(self.device)
        self.code_gram[unused, :] = 0
        self.code_gram[:, unused] = 0
        self.code_data[unused] = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Φ, A, B and t, on the CPU (``safetensors`` or ``torch.save`` can store it)."""
        return {"dictionary": self.dictionary.cpu(), "code_gram": self.code_gram.cpu(),
                "code_data": self.code_data.cpu(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a ``state_dict`` of a learner with the same k and d."""
        expected = {"dictionary": (self.n_factors, self.dim),
                    "code_gram": (self.n_factors, self.n_factors),
                    "code_data": (self.n_factors, self.dim)}
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, not {shape}")
        self.dictionary = state["dictionary"].to(self.device, torch.float32).clone()
        self.code_gram = state["code_gram"].to(self.device, torch.float32).clone()
        self.code_data = state["code_data"].to(self.device, torch.float32).clone()
        self.updates, self.initialised = int(state["updates"]), True
