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

from dataclasses import dataclass, fields

import torch

CHECK_EVERY = 10  # FISTA steps between two duality-gap checks
#: rows × factors solved at once: FISTA holds a few [rows, k] tensors, so this bounds its memory
#: (about 16 MB each in float32) whatever the number of rows passed to ``encode``
CHUNK_ELEMENTS = 1 << 22
GROW, SHRINK = 1.25, 0.5  # a row's step: tried 1.25 times larger each step, halved on failure


def lipschitz(gram: torch.Tensor) -> float:
    """Largest eigenvalue of ΦΦᵀ [k, k]: the gradient's Lipschitz constant, FISTA's 1/step.

    Computed in float64: an underestimate would make the step unsafe.
    """
    return float(torch.linalg.eigvalsh(gram.double()).max())


def duality_gap(x: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor,
                sparsity: float) -> torch.Tensor:
    """Per row [n], a bound on objective(α) − its minimum, for codes α ≥ 0 [n, k]."""
    return _certificate(x, codes, dictionary, sparsity)[0]


def _certificate(x: torch.Tensor, codes: torch.Tensor, dictionary: torch.Tensor,
                 sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Duality gap and objective per row, ([n], [n]).

    The dual point is the residual r = x − αΦ scaled by s = min(1, λ / max_j φ_j·r), so that
    Φ(s r) ≤ λ; the gap P − D is then ½(1 − s)²‖r‖² + Σ_j α_j (λ − s φ_j·r), a sum of
    non-negative terms (no cancellation in float32).
    """
    residual = x - codes @ dictionary  # [n, d]: r
    correlation = residual @ dictionary.T  # [n, k]: Φr
    peak = correlation.amax(dim=1, keepdim=True)  # [n, 1]
    scale = torch.where(peak > sparsity, sparsity / peak, 1.0)  # [n, 1]: s
    squared = residual.square().sum(dim=1)  # [n]: ‖r‖²
    gap = (0.5 * (1 - scale[:, 0]) ** 2 * squared
           + (codes * (sparsity - scale * correlation)).sum(dim=1))
    return gap, 0.5 * squared + sparsity * codes.sum(dim=1)


@dataclass
class _Running:
    """The rows FISTA still iterates on; every tensor has one row per running row."""

    rows: torch.Tensor  # [m]: their indices in the batch
    inputs: torch.Tensor  # [m, d]: x
    target: torch.Tensor  # [m, k]: xΦᵀ − λ
    codes: torch.Tensor  # [m, k]: α_i
    codes_gram: torch.Tensor  # [m, k]: α_i G, with G = ΦΦᵀ
    previous: torch.Tensor  # [m, k]: α_{i−1}
    previous_gram: torch.Tensor  # [m, k]: α_{i−1} G
    t: torch.Tensor  # [m, 1]: FISTA's t_i
    step: torch.Tensor  # [m, 1]: the step accepted last

    def subset(self, index: torch.Tensor) -> _Running:
        return _Running(*(getattr(self, f.name)[index] for f in fields(self)))


def _attempt(run: _Running, step: torch.Tensor, gram: torch.Tensor, floor: float
             ) -> tuple[torch.Tensor, ...]:
    """One FISTA step of size ``step`` [m, 1] for every row of ``run``.

    Returns (accepted [m], α_{i+1} [m, k], α_{i+1} G [m, k], t_{i+1} [m, 1], y [m, k]). The
    step is accepted when ½‖x − αΦ‖² at α_{i+1} is below its quadratic model at y with
    curvature 1/step, i.e. DᵀGD ≤ ‖D‖²/step with D = α_{i+1} − y; a step of 1/L (``floor``)
    always is.
    """
    t_next = (1 + torch.sqrt(1 + 4 * (run.step / step) * run.t * run.t)) / 2  # [m, 1]
    weight = (run.t - 1) / t_next  # [m, 1]: momentum
    momentum = run.codes + weight * (run.codes - run.previous)  # [m, k]: y
    momentum_gram = run.codes_gram + weight * (run.codes_gram - run.previous_gram)  # yG
    updated = (momentum - step * (momentum_gram - run.target)).clamp_min_(0)  # [m, k]
    updated_gram = updated @ gram  # [m, k]
    moved = updated - momentum  # [m, k]: D
    curvature = (moved * (updated_gram - momentum_gram)).sum(dim=1, keepdim=True)  # DᵀGD
    accepted = ((curvature * step <= moved.square().sum(dim=1, keepdim=True) * (1 + 1e-4))
                | (step <= floor * (1 + 1e-6)))  # [m, 1]
    return accepted[:, 0], updated, updated_gram, t_next, momentum


def _iterate(run: _Running, gram: torch.Tensor, floor: float, ceiling: float) -> _Running:
    """One accepted FISTA step for every running row (backtracking where needed)."""
    step = (run.step * GROW).clamp_max(ceiling)  # [m, 1]
    accepted, updated, updated_gram, t_next, momentum = _attempt(run, step, gram, floor)
    retry = torch.nonzero(~accepted).flatten()  # [r]
    while len(retry):
        step[retry] = (step[retry] * SHRINK).clamp_min(floor)
        retried = _attempt(run.subset(retry), step[retry], gram, floor)
        updated[retry], updated_gram[retry], t_next[retry], momentum[retry] = retried[1:]
        retry = retry[~retried[0]]
    moved = updated - run.codes  # [m, k]
    restart = ((momentum - updated) * moved).sum(dim=1, keepdim=True) > 0  # [m, 1]
    return _Running(run.rows, run.inputs, run.target, updated, updated_gram,
                    torch.where(restart, updated, run.codes),
                    torch.where(restart, updated_gram, run.codes_gram),
                    torch.where(restart, 1.0, t_next), step)


def encode(x: torch.Tensor, dictionary: torch.Tensor, sparsity: float, steps: int = 300,
           tol: float = 1e-4, gram: torch.Tensor | None = None,
           init: torch.Tensor | None = None, lipschitz_constant: float | None = None
           ) -> torch.Tensor:
    """Non-negative lasso codes [n, k] of rows ``x`` [n, d] by FISTA, on the inputs' device.

    Each step is a gradient step on ½‖x − αΦ‖² from the momentum point y, then the prox
    α ← max(α − step·λ, 0), so inactive codes are exactly 0. The step is each row's own: it
    starts at 1/L (L the largest eigenvalue of ΦΦᵀ, always safe), is tried ``GROW`` times
    larger at every step (up to 1/max_j ‖φ_j‖², the curvature along one atom) and shrunk by
    ``SHRINK`` (never below 1/L) until ½‖x − αΦ‖² stays under its quadratic model:
    backtracking that may also increase the step, with t updated for it (Scheinberg, Goldfarb
    and Bai, 2014). Sparse codes of anisotropic hidden states only feel the curvature of their
    few active atoms, often tens of times below L. Momentum restarts for a row whose step goes
    against it (O'Donoghue and Candès, 2015).

    Every ``CHECK_EVERY`` steps, a row whose duality gap is at most ``tol`` times its
    objective stops (its objective is then within ``tol``, relatively, of the minimum); the
    others stop after ``steps``. Stopped rows leave the batch, so each row's result depends on
    that row alone, and rows are solved ``CHUNK_ELEMENTS // k`` at a time to bound memory.
    ``gram`` (ΦΦᵀ) and ``lipschitz_constant`` (its largest eigenvalue) may be
    passed to reuse them across batches; ``init`` [n, k] warm-starts.
    """
    gram = dictionary @ dictionary.T if gram is None else gram  # [k, k]
    constant = lipschitz(gram) if lipschitz_constant is None else lipschitz_constant
    chunk = max(1, CHUNK_ELEMENTS // len(dictionary))  # rows per FISTA batch
    if len(x) <= chunk:
        return _fista(x, dictionary, sparsity, steps, tol, gram, init, constant)
    return torch.cat([_fista(x[start:start + chunk], dictionary, sparsity, steps, tol, gram,
                             None if init is None else init[start:start + chunk], constant)
                      for start in range(0, len(x), chunk)])


def _fista(x: torch.Tensor, dictionary: torch.Tensor, sparsity: float, steps: int,
           tol: float, gram: torch.Tensor, init: torch.Tensor | None,
           lipschitz_constant: float) -> torch.Tensor:
    """``encode`` for one batch of rows, all held at once."""
    floor = 1.0 / lipschitz_constant
    ceiling = max(floor, 1.0 / float(gram.diagonal().max()))
    codes = (torch.zeros(len(x), len(dictionary), dtype=x.dtype, device=x.device)
             if init is None else init.to(x).clamp_min(0))  # [n, k]: α, the result
    if len(x) == 0:
        return codes
    codes_gram = codes @ gram  # [n, k]
    scalar = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)  # [n, 1]
    run = _Running(torch.arange(len(x), device=x.device), x, x @ dictionary.T - sparsity,
                   codes.clone(), codes_gram, codes.clone(), codes_gram, scalar, floor * scalar)
    for index in range(1, steps + 1):
        run = _iterate(run, gram, floor, ceiling)
        if index % CHECK_EVERY or index == steps:
            continue
        gap, primal = _certificate(run.inputs, run.codes, dictionary, sparsity)  # [m], [m]
        done = gap <= tol * primal  # [m]
        if done.any():
            codes[run.rows[done]] = run.codes[done]
            run = run.subset(~done)
            if len(run.rows) == 0:
                return codes
    codes[run.rows] = run.codes
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
                 seed: int = 0, device: str = "cpu", forgetting: float = 4.0,
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

        Drawn without repeats while m ≥ k; when m < k, rows repeat with 1 % noise added.
        """
        if len(samples) >= self.n_factors:
            picks = torch.randperm(len(samples), generator=self.generator)[:self.n_factors]
            atoms = samples[picks.to(samples.device)].detach().float().cpu()  # [k, d]
        else:
            picks = torch.randint(len(samples), (self.n_factors,), generator=self.generator)
            atoms = samples[picks.to(samples.device)].detach().float().cpu()  # [k, d]
            noise = torch.randn(self.n_factors, self.dim, generator=self.generator)  # [k, d]
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
        if len(weights) != len(x) or bool((weights < 0).any()):
            raise ValueError("weights must be one non-negative number per row")
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
        return {"dictionary": self.dictionary.to("cpu", copy=True),
                "code_gram": self.code_gram.to("cpu", copy=True),
                "code_data": self.code_data.to("cpu", copy=True),
                "updates": torch.tensor(self.updates)}

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
