"""Attention reduction: which (query, key) weights a job keeps, as table columns."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.compute.stats import keys_visible
from pipelines.config import AttentionMode


def visible_pairs(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, S, S] bool: query i may see key j (both real; j <= i in causal models)."""
    pairs = valid[:, :, None] & valid[:, None, :]
    if causal:
        pairs = pairs & torch.ones_like(pairs[0]).tril()[None]
    return pairs


def top_k_mask(attn: torch.Tensor, kth_largest: torch.Tensor, visible: torch.Tensor,
               quota: torch.Tensor) -> torch.Tensor:
    """[L, B, H, S, S] bool: the ``quota`` (<= k) largest visible weights of every row.

    A weight is kept if it reaches the row's k-th largest value; exact ties at that value
    (e.g. weights that underflowed to 0) are broken by the lowest key index.
    """
    tau = kth_largest[..., None]  # [L, B, H, S, 1] the row's k-th largest weight
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
                 kth_largest: torch.Tensor | None = None) -> dict[str, np.ndarray] | None:
    """Columns (batch_index, layer, head, query, key, weight) of the kept weights, or None.

    ``attn`` is [L, B, H, S, S] with zeros on padded keys; padded queries and keys and, in
    causal models, future keys are never kept. ``topk`` needs each row's k-th largest weight
    (``row_order(attn, k).kth_largest``).
    """
    if mode.kind == "none":
        return None
    visible = visible_pairs(valid, causal)  # [B, S, S]
    if mode.kind == "topk":
        if kth_largest is None:
            raise ValueError("topk needs each row's k-th largest weight (row_order)")
        k = min(mode.k, attn.shape[-1])
        quota = torch.minimum(keys_visible(valid, causal), torch.tensor(float(k))).long()
        keep = top_k_mask(attn, kth_largest, visible, quota)
    elif mode.kind == "threshold":
        keep = (attn >= mode.threshold) & visible[None, :, None]
    else:
        keep = visible[None, :, None].expand_as(attn)
    index = keep.permute(1, 0, 2, 3, 4).nonzero()  # [N, 5]: batch, layer, head, query, key
    layer_first = index[:, [1, 0, 2, 3, 4]]
    weights = attn[layer_first.unbind(-1)]
    rows = index.cpu().numpy()
    return {  # rows in (batch, layer, head, query, key) order
        "batch_index": rows[:, 0],
        "layer": rows[:, 1].astype(np.int32),  # signed, as every integer column is stored
        "head": rows[:, 2].astype(np.int32),
        "query": rows[:, 3].astype(np.int32),
        "key": rows[:, 4].astype(np.int32),
        "weight": weights.cpu().numpy().astype(np.float16 if mode.kind == "full" else np.float32),
    }
