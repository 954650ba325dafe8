"""Attention reduction: which (query, key) weights a job keeps, as table columns."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.config import AttentionMode
from pipelines.stats import keys_visible


def visible_pairs(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, S, S] bool: query i may see key j (both real; j <= i in causal models)."""
    pairs = valid[:, :, None] & valid[:, None, :]
    if causal:
        pairs = pairs & torch.ones_like(pairs[0]).tril()[None]
    return pairs


def top_k_mask(attn: torch.Tensor, sorted_desc: torch.Tensor, visible: torch.Tensor,
               quota: torch.Tensor, k: int) -> torch.Tensor:
    """[L, B, H, S, S] bool: the ``quota`` (<= k) largest visible weights of every row.

    A weight is kept if it reaches the row's k-th largest value; exact ties at that value
    (e.g. weights that underflowed to 0) are broken by the lowest key index.
    """
    tau = sorted_desc[..., k - 1 : k]  # [L, B, H, S, 1] k-th largest weight of the row
    keep = (attn >= tau) & visible[None, :, None]
    quota = quota[None, :, None, :].expand(keep.shape[:-1])  # [L, B, H, S]
    excess = keep.sum(-1) > quota
    if bool(excess.any()):
        rows, row_tau = attn[excess], tau[excess]  # [R, S], [R, 1]
        row_visible = visible[None, :, None].expand_as(keep)[excess]
        greater = (rows > row_tau) & row_visible
        ties = (rows == row_tau) & row_visible
        need = quota[excess] - greater.sum(-1)  # [R]
        keep[excess] = greater | (ties & (ties.cumsum(-1) <= need[:, None]))
    return keep


def kept_weights(attn: torch.Tensor, valid: torch.Tensor, causal: bool, mode: AttentionMode,
                 sorted_desc: torch.Tensor | None = None) -> dict[str, np.ndarray] | None:
    """Columns (batch_index, layer, head, query, key, weight) of the kept weights, or None.

    ``attn`` is [L, B, H, S, S] with zeros on padded keys; padded queries and keys and, in
    causal models, future keys are never kept. ``topk`` needs ``sorted_desc`` (``sort_rows``).
    """
    if mode.kind == "none":
        return None
    visible = visible_pairs(valid, causal)  # [B, S, S]
    if mode.kind == "topk":
        if sorted_desc is None:
            raise ValueError("topk needs the rows sorted in descending order (sort_rows)")
        k = min(mode.k, attn.shape[-1])
        quota = torch.minimum(keys_visible(valid, causal), torch.tensor(float(k))).long()
        keep = top_k_mask(attn, sorted_desc, visible, quota, k)
    elif mode.kind == "threshold":
        keep = (attn >= mode.threshold) & visible[None, :, None]
    else:
        keep = visible[None, :, None].expand_as(attn)
    index = keep.nonzero()  # [N, 5]: layer, batch, head, query, key
    weights = attn[index.unbind(-1)]
    index = index.cpu().numpy()
    return {
        "batch_index": index[:, 1],
        "layer": index[:, 0].astype(np.uint8),
        "head": index[:, 2].astype(np.uint8),
        "query": index[:, 3].astype(np.uint16),
        "key": index[:, 4].astype(np.uint16),
        "weight": weights.cpu().numpy().astype(np.float16 if mode.kind == "full" else np.float32),
    }
