"""The statistic definitions as plain NumPy loops: the explicit path beside ``stats``.

Slow on purpose — one head at a time, one query row at a time — so that it reads like the
definitions in docs/statistics.md. Tests check the vectorised code against it, and the
throughput benchmark uses it as the naive baseline.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.compute.stats import K90_MASS


def smoothed_entropy(row: np.ndarray, epsilon: float) -> float:
    """-sum_j p_j ln p_j, nats, of p = (1 - ε) ``row`` + ε / n over the row's n keys."""
    n = len(row)
    return -sum(p * math.log(p) for p in ((1 - epsilon) * a + epsilon / n for a in row))


def one_head(a: np.ndarray, is_sep: np.ndarray, is_special: np.ndarray, is_punct: np.ndarray,
             causal: bool, w: int, has_sep: bool,
             entropy_epsilon: float = 0.0) -> dict[str, float]:
    """Statistics of one head; ``a`` is [n, n] over valid positions only.

    ``entropy_epsilon`` > 0 smooths the rows for ``entropy`` (not ``entropy_norm``).
    """
    n = a.shape[0]
    a = a.astype(np.float64)
    rows: dict[str, list[float]] = {name: [] for name in (
        "entropy", "max_weight", "mass_self", "mass_prev", "mass_next", "mass_first",
        "mass_sep", "mass_special", "mass_punct", "mean_distance", "mass_window",
        "mass_sparse", "k90")}
    entropy_norm: list[float] = []
    for i in range(n):
        row = a[i]
        k_i = i + 1 if causal else n
        h = -sum(p * math.log(p) for p in row if p > 0)
        rows["entropy"].append(smoothed_entropy(row, entropy_epsilon) if entropy_epsilon
                               else h)
        if k_i > 1:
            entropy_norm.append(h / math.log(k_i))
        rows["max_weight"].append(row.max())
        rows["mass_self"].append(row[i])
        rows["mass_prev"].append(row[i - 1] if i > 0 else 0.0)
        rows["mass_next"].append(row[i + 1] if i + 1 < n else 0.0)
        rows["mass_first"].append(row[0])
        rows["mass_sep"].append(row[is_sep].sum())
        rows["mass_special"].append(row[is_special].sum())
        rows["mass_punct"].append(row[is_punct].sum())
        rows["mean_distance"].append(sum(row[j] * abs(i - j) for j in range(n)))
        in_window = [j for j in range(n) if abs(i - j) <= w]
        rows["mass_window"].append(row[in_window].sum())
        kept = [j for j in range(n) if abs(i - j) <= w or is_special[j]]
        rows["mass_sparse"].append(row[kept].sum())
        total, count = 0.0, 0
        for p in sorted(row, reverse=True):
            total += p
            count += 1
            if total >= K90_MASS or count == k_i:
                break
        rows["k90"].append(count)
    out = {name: float(np.mean(values)) for name, values in rows.items()}
    out["entropy_norm"] = float(np.mean(entropy_norm)) if entropy_norm else float("nan")
    if not has_sep:
        out["mass_sep"] = float("nan")
    return out


def all_heads(attn: np.ndarray, is_sep: np.ndarray, is_special: np.ndarray,
              is_punct: np.ndarray, causal: bool, w: int, has_sep: bool,
              entropy_epsilon: float = 0.0) -> list[dict]:
    """Rows for every layer and head of one window; ``attn`` is [L, H, n, n]."""
    out = []
    for layer in range(attn.shape[0]):
        for head in range(attn.shape[1]):
            stats = one_head(attn[layer, head], is_sep, is_special, is_punct, causal, w, has_sep,
                             entropy_epsilon)
            out.append({"layer": layer, "head": head, **stats, "n_tokens": attn.shape[-1]})
    return out
