"""Per-head attention statistics, vectorised over layer × batch × head on the device.

Notation (see docs/statistics.md): A is one head's attention restricted to the n valid
positions; rows are queries i, columns keys j; k_i is the number of keys query i may see
(n for bidirectional models, i + 1 for causal ones). "mean_i" averages over valid query rows.
Everything runs in float32. ``pipelines.reference`` holds the same definitions as plain loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Column name → definition, written into every manifest.
DEFINITIONS: dict[str, str] = {
    "entropy": "mean_i of -sum_j A_ij ln A_ij, nats, 0 ln 0 = 0",
    "entropy_norm": "mean over i with k_i > 1 of H_i / ln k_i; k_i = keys query i may see",
    "max_weight": "mean_i max_j A_ij",
    "mass_self": "mean_i A_ii",
    "mass_prev": "mean_i A_i,i-1 (0 for i = 0)",
    "mass_next": "mean_i A_i,i+1 (0 for the last token)",
    "mass_first": "mean_i A_i,0",
    "mass_sep": "mean_i sum over separator keys j of A_ij (null without a separator token)",
    "mass_special": "mean_i sum over special keys j (CLS/SEP/BOS/EOS) of A_ij",
    "mass_punct": "mean_i sum over punctuation keys j of A_ij",
    "mean_distance": "mean_i sum_j A_ij |i - j|",
    "mass_window": "mean_i sum over |i - j| <= w of A_ij",
    "mass_sparse": "mean_i sum over (|i - j| <= w) or special j of A_ij",
    "k90": "mean_i of the fewest keys whose largest weights sum to >= 0.9",
    "n_tokens": "n, valid tokens in the window",
}
STAT_NAMES: tuple[str, ...] = tuple(k for k in DEFINITIONS if k != "n_tokens")
K90_MASS = 0.9


@dataclass
class KeyFlags:
    """Per-position facts of a padded batch, on the device."""

    valid: torch.Tensor  # [B, S] bool
    is_sep: torch.Tensor  # [B, S] bool
    is_special: torch.Tensor  # [B, S] bool
    is_punct: torch.Tensor  # [B, S] bool


@dataclass
class SortedRows:
    """Each query row's weights sorted descending; shared by k90 and top-k extraction."""

    values: torch.Tensor  # [L, B, H, S, S]
    indices: torch.Tensor  # [L, B, H, S, S]


def keys_visible(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, S] float: k_i, the number of keys query i may see (0 on padding)."""
    n = valid.sum(-1, keepdim=True)  # [B, 1]
    if causal:
        positions = torch.arange(1, valid.shape[-1] + 1, device=valid.device)
        return torch.minimum(positions[None, :], n).float() * valid
    return n.float() * valid


def sort_rows(attn: torch.Tensor) -> SortedRows:
    values, indices = torch.sort(attn, dim=-1, descending=True, stable=True)
    return SortedRows(values, indices)


def _diagonal(attn: torch.Tensor, offset: int) -> torch.Tensor:
    """[L, B, H, S]: A_i,i+offset for every query i (0 where that key does not exist)."""
    diag = attn.diagonal(offset=offset, dim1=-2, dim2=-1)
    pad = (0, abs(offset)) if offset > 0 else (abs(offset), 0)
    return torch.nn.functional.pad(diag, pad)


def head_statistics(attn: torch.Tensor, flags: KeyFlags, causal: bool, local_window: int,
                    has_sep: bool, rows: SortedRows | None = None) -> dict[str, torch.Tensor]:
    """Every statistic as a [L, B, H] float32 tensor (``n_tokens`` as [B]).

    ``attn`` is [L, B, H, S, S] float32 with zeros on padded keys; padded query rows are
    ignored whatever they hold.
    """
    size = attn.shape[-1]
    q = flags.valid.float()  # [B, S] query weights for the mean over rows
    n = q.sum(-1)  # [B]

    def row_mean(per_row: torch.Tensor) -> torch.Tensor:  # [L, B, H, S] → [L, B, H]
        return (per_row * q[None, :, None, :]).sum(-1) / n[None, :, None]

    k_i = keys_visible(flags.valid, causal)  # [B, S]
    norm_rows = (k_i > 1).float()  # rows entering entropy_norm
    log_k = torch.where(k_i > 1, k_i.clamp(min=2).log(), torch.ones_like(k_i))  # no 0 divisor
    entropy_rows = -torch.special.xlogy(attn, attn).sum(-1)  # [L, B, H, S]

    positions = torch.arange(size, device=attn.device)
    distance = (positions[:, None] - positions[None, :]).abs().float()  # [S, S]
    near = distance <= local_window  # [S, S]
    sparse_keys = near[None] | flags.is_special[:, None, :]  # [B, S, S]
    key_features = torch.stack([flags.is_sep, flags.is_special, flags.is_punct], -1).float()
    key_mass = torch.einsum("lbhqk,bkf->lbhqf", attn, key_features)  # [L, B, H, S, 3]

    rows = rows or sort_rows(attn)
    k90_rows = (rows.values.cumsum(-1) < K90_MASS).sum(-1).float() + 1  # [L, B, H, S]
    k90_rows = torch.minimum(k90_rows, k_i[None, :, None, :].clamp(min=1))

    stats = {
        "entropy": row_mean(entropy_rows),
        "entropy_norm": (entropy_rows / log_k[None, :, None, :] * norm_rows[None, :, None, :])
        .sum(-1) / norm_rows.sum(-1).clamp(min=1)[None, :, None],
        "max_weight": row_mean(rows.values[..., 0]),
        "mass_self": row_mean(_diagonal(attn, 0)),
        "mass_prev": row_mean(_diagonal(attn, -1)),
        "mass_next": row_mean(_diagonal(attn, 1)),
        "mass_first": row_mean(attn[..., 0]),
        "mass_sep": row_mean(key_mass[..., 0]),
        "mass_special": row_mean(key_mass[..., 1]),
        "mass_punct": row_mean(key_mass[..., 2]),
        "mean_distance": row_mean((attn * distance).sum(-1)),
        "mass_window": row_mean((attn * near).sum(-1)),
        "mass_sparse": row_mean((attn * sparse_keys[None, :, None]).sum(-1)),
        "k90": row_mean(k90_rows),
    }
    no_norm_rows = norm_rows.sum(-1) == 0  # [B]: a one-token window has no entropy_norm
    stats["entropy_norm"] = stats["entropy_norm"].masked_fill(no_norm_rows[None, :, None], float("nan"))
    if not has_sep:
        stats["mass_sep"] = torch.full_like(stats["mass_sep"], float("nan"))
    stats["n_tokens"] = n
    return stats
