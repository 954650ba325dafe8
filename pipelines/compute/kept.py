"""Attention reduction: which (query, key) weights a job keeps, as table columns."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.compute.stats import keys_visible
from pipelines.config import AttentionMode


def visible_pairs(valid: torch.Tensor, causal: bool, start: int = 0,
                  rows: int | None = None, window: int | None = None) -> torch.Tensor:
    """[B, Q, S] bool: query i may see key j (both real; j <= i in causal models; within
    a sliding ``window`` as ``stats.keys_visible`` says), for the query rows i = ``start`` ..
    ``start`` + Q - 1 (default: every row, Q = S)."""
    stop = valid.shape[-1] if rows is None else start + rows
    pairs = valid[:, start:stop, None] & valid[:, None, :]
    if causal or window is not None:
        queries = torch.arange(start, stop, device=valid.device)[:, None]  # [Q, 1]
        keys = torch.arange(valid.shape[-1], device=valid.device)[None, :]  # [1, S]
        if causal:
            pairs = pairs & (keys <= queries)[None]
        if window is not None:
            pairs = pairs & ((queries - keys).abs() < window)[None]
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
                 kth_largest: torch.Tensor | None = None, start: int = 0,
                 first_layer: int = 0, window: int | None = None
                 ) -> dict[str, np.ndarray] | None:
    """Columns (batch_index, layer, head, query, key, weight) of the kept weights, or None.

    ``attn`` is [L, B, H, Q, S] with zeros on padded keys: the query rows ``start`` ..
    ``start`` + Q - 1 (default: whole maps) of layers ``first_layer`` .. + L - 1. Padded
    queries and keys and, in causal models, future keys are never kept, nor keys beyond a
    sliding-window layer's ``window`` (every layer of ``attn`` has that window). ``topk``
    needs each row's k-th largest weight (``row_order(attn, k).kth_largest``).
    """
    if mode.kind == "none":
        return None
    rows = attn.shape[-2]
    visible = visible_pairs(valid, causal, start, rows, window)  # [B, Q, S]
    if mode.kind == "topk":
        if kth_largest is None:
            raise ValueError("topk needs each row's k-th largest weight (row_order)")
        k = min(mode.k, attn.shape[-1])
        quota = torch.minimum(keys_visible(valid, causal, window)[:, start:start + rows],
                              torch.tensor(float(k))).long()
        keep = top_k_mask(attn, kth_largest, visible, quota)
    elif mode.kind == "threshold":
        keep = (attn >= mode.threshold) & visible[None, :, None]
    else:
        keep = visible[None, :, None].expand_as(attn)
    batch_first = keep.permute(1, 0, 2, 3, 4)  # a view: (batch, layer, head, query, key)
    found = batch_first.nonzero().to(torch.int32).cpu().numpy()  # [N, 5]
    weights = attn.permute(1, 0, 2, 3, 4)[batch_first]  # the same row-major order
    return {  # rows in (batch, layer, head, query, key) order
        "batch_index": found[:, 0],
        "layer": found[:, 1] + np.int32(first_layer),  # int32: signed, as every integer
        "head": found[:, 2].copy(),  # column is stored (copies: contiguous columns)
        "query": found[:, 3] + np.int32(start),
        "key": found[:, 4].copy(),
        "weight": weights.cpu().numpy().astype(np.float16 if mode.kind == "full" else np.float32),
    }
