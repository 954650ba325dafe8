"""docs/statistics.md for one head in float64 NumPy, written from the definitions alone (no
headscope code): the independent reference for tests on real and long windows.

Imported as a plain module, like ``tolerances`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import numpy as np


def keys_seen(n: int, causal: bool, window: int | None = None) -> np.ndarray:
    """[n] int: k_i, the keys query i may see (causal: j <= i; a sliding window w:
    i - w < j <= i causal, |i - j| < w bidirectional)."""
    i, j = np.indices((n, n))
    seen = (j <= i) if causal else np.ones((n, n), bool)
    if window is not None:
        seen &= np.abs(i - j) < window
    return seen.sum(1)


def float64_statistics(a: np.ndarray, is_special: np.ndarray, is_punct: np.ndarray,
                       causal: bool, local_window: int, window: int | None = None,
                       is_sep: np.ndarray | None = None) -> dict[str, float]:
    """Every statistic of one head; ``a`` [n, n] over the valid positions, float64.

    ``window`` is the layer's sliding window (None: full attention); ``is_sep`` None leaves
    ``mass_sep`` out (a model without a separator token).
    """
    a = a.astype(np.float64)
    n = a.shape[0]
    i, j = np.indices((n, n))
    k_i = keys_seen(n, causal, window)
    logs = np.log(np.where(a > 0, a, 1.0))
    entropy = -(a * logs).sum(1)
    descending = -np.sort(-a, axis=1)
    k90 = np.minimum((np.cumsum(descending, axis=1) < 0.9).sum(1) + 1, k_i)
    band = np.abs(i - j) <= local_window
    several = k_i > 1
    out = {
        "entropy": entropy.mean(),
        "entropy_norm": (entropy[several] / np.log(k_i[several])).mean()
        if several.any() else float("nan"),
        "max_weight": a.max(1).mean(),
        "mass_self": np.diagonal(a).mean(),
        "mass_prev": np.concatenate([[0.0], np.diagonal(a, -1)]).mean(),
        "mass_next": np.concatenate([np.diagonal(a, 1), [0.0]]).mean(),
        "mass_first": a[:, 0].mean(),
        "mass_special": a[:, is_special].sum(1).mean(),
        "mass_punct": a[:, is_punct].sum(1).mean(),
        "mean_distance": (a * np.abs(i - j)).sum(1).mean(),
        "mass_window": (a * band).sum(1).mean(),
        "mass_sparse": (a * (band | is_special[None, :])).sum(1).mean(),
        "k90": k90.mean(),
    }
    if is_sep is not None:
        out["mass_sep"] = a[:, is_sep].sum(1).mean()
    return out
