"""Jensen–Shannon distances between attention heads, and a 2-D map of them for plotting.

Clark et al. (2019, "What does BERT look at?", §6; head_distances.py in their code) compare
two heads by the Jensen–Shannon divergence between their attention maps, each smoothed as
0.999 A + 0.001 / n (n: the map's length), in nats, summed over every query row of every
document. Two measures, for heads a and b (all N = L·H heads of the model) over every valid
query row i of a window:

- ``distance`` (the default): sqrt(JSD(A_a[i], A_b[i])) with log base 2 (so 0..1), the
  Jensen–Shannon distance, unsmoothed, averaged over the rows: a metric (so MDS of it is
  meaningful) on one scale for runs of any size, every row weighing the same.
- ``clark``: their number exactly: JSD in nats of the smoothed rows, summed over the rows.

Every pair sees the same rows, so mean and sum, and the log base, order pairs alike; the
square root of each row's divergence (before the mean) and the smoothing do not, and the two
measures order a small share of head pairs differently (docs/analysis.md).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch

#: Cells (head pairs × query rows × keys) per chunk of the pairwise computation.
CHUNK_CELLS = 2**20
_LN2 = math.log(2.0)
#: Clark et al.'s smoothing of the maps before the divergence: 0.999 A + 0.001 / n.
CLARK_SMOOTHING = 1e-3
#: Measure → the ``head_similarity`` column holding it.
COLUMNS = {"distance": "js_distance", "clark": "js_divergence"}


def chunk_shape(n: int, pairs: int, cells: int) -> tuple[int, int]:
    """(pairs, rows) per chunk so that pairs × rows × n stays within ``cells``."""
    rows = min(n, max(1, cells // n))
    return min(pairs, max(1, cells // (rows * n))), rows


class HeadSimilarity:
    """Jensen–Shannon distance (mean) or Clark et al.'s divergence (sum) between every pair
    of heads, over all rows added; ``measure`` is ``distance`` or ``clark`` (module doc).

    Memory: the work runs in chunks of at most ``chunk_cells`` cells (head pairs × query
    rows × keys, or heads × rows × keys for the row entropies) in float64. A chunk peaks at 20
    bytes a cell (the rows of both heads, gathered as float32 and widened to float64), so live
    temporaries stay under 20 MiB for the default 2**20 cells whatever N and S; N = 144 heads
    and S = 512 take 2,574 chunks of 4 pairs × 512 rows per window. Beyond that the
    accumulator holds [N, N] float64 sums and an [N, n] float64 table of row entropies (the
    process RSS can grow by more, as the allocator keeps freed chunks for reuse).
    Float64 because sqrt amplifies rounding in a near-zero divergence.
    """

    def __init__(self, num_layers: int, num_heads: int, *, chunk_cells: int = CHUNK_CELLS,
                 measure: str = "distance") -> None:
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"{num_layers} layers × {num_heads} heads: both must be positive")
        if measure not in COLUMNS:
            raise ValueError(f"unknown measure {measure!r}: use {' or '.join(COLUMNS)}")
        self.num_layers, self.num_heads = num_layers, num_heads
        self.measure = measure
        self._smoothing = CLARK_SMOOTHING if measure == "clark" else 0.0
        self.chunk_cells = chunk_cells
        size = num_layers * num_heads
        self._sums = np.zeros((size, size))  # [N, N]: sum over rows of the measure, a < b only
        self._pairs = torch.from_numpy(np.stack(np.triu_indices(size, k=1)))  # [2, P]
        self.rows = 0

    def add(self, attn: torch.Tensor, valid: torch.Tensor) -> None:
        """Add every valid query row of a padded batch; ``attn`` is [L, B, H, S, S]."""
        layers, _, heads, _, _ = attn.shape
        if (layers, heads) != (self.num_layers, self.num_heads):
            raise ValueError(f"attention has {layers} layers × {heads} heads, expected "
                             f"{self.num_layers} × {self.num_heads}")
        for b, n in enumerate(valid.sum(-1).tolist()):
            if n:
                self._add_window(attn[:, b], n)  # [L, H, S, S]
                self.rows += n

    def _add_window(self, window: torch.Tensor, n: int) -> None:
        """Sums of the measure over the n valid rows of one window's [L, H, S, S] map."""
        pairs = self._pairs.to(window.device)  # [2, P]
        neg_entropy = self._row_neg_entropy(window, n)  # [N, n]
        pair_step, row_step = chunk_shape(n, pairs.shape[1], self.chunk_cells)
        for start in range(0, pairs.shape[1], pair_step):
            first, second = pairs[:, start : start + pair_step]  # [p] each
            total = torch.zeros(len(first), dtype=torch.float64, device=window.device)
            for row in range(0, n, row_step):
                rows = slice(row, min(row + row_step, n))
                total += self._row_distances(window, first, second, rows, n,
                                             neg_entropy).sum(-1)
            self._sums[first.cpu().numpy(), second.cpu().numpy()] += total.cpu().numpy()

    def _rows_of(self, window: torch.Tensor, heads: torch.Tensor, rows: slice,
                 n: int) -> torch.Tensor:
        """[len(heads), rows, n] float64: query rows of flat head indices (layer·H + head),
        smoothed as (1 - δ) A + δ / n for the ``clark`` measure."""
        layer, head = heads // self.num_heads, heads % self.num_heads
        out = window[layer, head, rows, :n].double()
        if self._smoothing:
            out.mul_(1.0 - self._smoothing).add_(self._smoothing / n)
        return out

    def _row_neg_entropy(self, window: torch.Tensor, n: int) -> torch.Tensor:
        """[N, n] float64: sum_j p_j ln p_j of every head's valid rows (0 ln 0 = 0)."""
        heads = torch.arange(self.num_layers * self.num_heads, device=window.device)
        head_step, row_step = chunk_shape(n, len(heads), self.chunk_cells)

        def chunk(chosen: torch.Tensor, row: int) -> torch.Tensor:  # [heads, rows]
            rows = self._rows_of(window, chosen, slice(row, row + row_step), n)
            return torch.special.xlogy(rows, rows).sum(-1)

        return torch.cat([torch.cat([chunk(chosen, row) for row in range(0, n, row_step)], 1)
                          for chosen in heads.split(head_step)])

    def _row_distances(self, window: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                       rows: slice, n: int, neg_entropy: torch.Tensor) -> torch.Tensor:
        """[p, rows] float64: the measure for each pair and row, sqrt(JSD) in bits
        (``distance``) or JSD in nats (``clark``).

        JSD(p, q) = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2; identical rows give m = p
        exactly, hence 0 exactly.
        """
        mean = self._rows_of(window, first, rows, n)  # [p, r, n]
        mean += self._rows_of(window, second, rows, n)
        mean *= 0.5
        mean_term = torch.special.xlogy(mean, mean).sum(-1)  # [p, r]
        own = (neg_entropy[first, rows] + neg_entropy[second, rows]) * 0.5  # [p, r]
        divergence = (own - mean_term).clamp_(min=0.0)  # nats
        return divergence if self._smoothing else divergence.div_(_LN2).sqrt_()

    @property
    def column(self) -> str:
        """The ``head_similarity`` column of this measure."""
        return COLUMNS[self.measure]

    def distance(self) -> np.ndarray:
        """[N, N] float64: ``distance``: mean over every row seen (each row weighs the same)
        of sqrt(JSD) in bits; ``clark``: sum over every row seen of JSD in nats.

        Heads are ordered layer-major (index = layer · H + head); symmetric, 0 on the
        diagonal; NaN before any row was added.
        """
        if not self.rows:
            return np.full(self._sums.shape, np.nan)
        total = self._sums + self._sums.T
        return total if self._smoothing else total / self.rows


def _precomputed_mds_options(mds_class: type) -> dict:
    """Keyword arguments for metric MDS of a precomputed matrix on this scikit-learn."""
    if "metric_mds" in inspect.signature(mds_class).parameters:  # scikit-learn >= 1.8
        return {"metric": "precomputed", "metric_mds": True, "init": "random"}
    return {"dissimilarity": "precomputed", "metric": True}


def coordinates(distance: np.ndarray, seed: int = 0) -> np.ndarray:
    """[N, 2]: metric MDS (SMACOF, best of 4 seeded starts) of a distance matrix, to plot."""
    from sklearn.manifold import MDS

    matrix = np.asarray(distance, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.isfinite(matrix).all():
        raise ValueError("coordinates need a square, finite distance matrix")
    mds = MDS(n_components=2, n_init=4, random_state=seed, **_precomputed_mds_options(MDS))
    return mds.fit_transform(matrix)
