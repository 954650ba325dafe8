"""Attention reduction: which (query, key) weights a job keeps, as table columns."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.config import AttentionMode
from pipelines.stats import SortedRows, keys_visible


def kept_weights(attn: torch.Tensor, valid: torch.Tensor, causal: bool, mode: AttentionMode,
                 rows: SortedRows | None) -> dict[str, np.ndarray] | None:
    """Columns (batch_index, layer, head, query, key, weight) of the kept weights, or None.

    ``attn`` is [L, B, H, S, S] with zeros on padded keys; padded query rows are never kept.
    ``rows`` (the descending sort shared with k90) is required for ``topk``.
    """
    if mode.kind == "none":
        return None
    if mode.kind == "topk":
        assert rows is not None, "topk needs the sorted rows"
        k = min(mode.k, attn.shape[-1])
        rank = torch.arange(k, device=attn.device)
        visible = keys_visible(valid, causal)  # [B, S]
        keep = rank[None, None, None, None, :] < visible[None, :, None, :, None]  # [1,B,1,S,k]
        keep = keep.expand(attn.shape[0], -1, attn.shape[2], -1, -1)
        index = keep.nonzero()  # [N, 5]: layer, batch, head, query, rank
        keys = rows.indices[..., :k][keep]
        weights = rows.values[..., :k][keep]
    else:
        pair_valid = valid[:, :, None] & valid[:, None, :]  # [B, S, S]
        if causal:
            pair_valid = pair_valid & torch.ones_like(pair_valid[0]).tril()[None]
        keep = pair_valid[None, :, None].expand_as(attn)
        if mode.kind == "threshold":
            keep = keep & (attn >= mode.threshold)
        index = keep.nonzero()  # [N, 5]: layer, batch, head, query, key
        keys = index[:, 4]
        weights = attn[keep]
    index = index.cpu().numpy()
    return {
        "batch_index": index[:, 1],
        "layer": index[:, 0].astype(np.uint8),
        "head": index[:, 2].astype(np.uint8),
        "query": index[:, 3].astype(np.uint16),
        "key": keys.cpu().numpy().astype(np.uint16),
        "weight": weights.cpu().numpy().astype(np.float16 if mode.kind == "full" else np.float32),
    }
