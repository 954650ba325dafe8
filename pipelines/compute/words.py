"""Word-level attention maths: token-to-token maps merged into word-to-word maps.

For a word made of several tokens, the attention *to* it is the sum of the weights to its
tokens and the attention *from* it is the mean of its tokens' rows, so every word row still
sums to 1 (Clark et al. 2019). Which token belongs to which word is decided on the text side
(:mod:`pipelines.analysis.words`); this module only merges tensors.
"""

from __future__ import annotations

import torch


def word_attention(attn: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-to-word attention [L, B, H, W, W] and the valid words [B, W].

    ``attn`` is [L, B, H, S, S] with zeros on pad keys; ``index`` is [B, S] int64, the word of
    every position and S on padding. Two scatter-adds (over keys, then over queries) merge the
    pieces; padding goes to one extra slot, dropped at the end.
    """
    layers, size, heads, length, _ = attn.shape
    padding = index == length
    words = int(index.masked_fill(padding, -1).max()) + 1  # W, in the widest window
    index = index.masked_fill(padding, words)  # padding → slot W
    keys = index[None, :, None, None, :].expand(layers, size, heads, length, length)
    to_words = attn.new_zeros((layers, size, heads, length, words + 1))  # [L, B, H, S, W+1]
    to_words.scatter_add_(-1, keys, attn)
    queries = index[None, :, None, :, None].expand(layers, size, heads, length, words + 1)
    summed = attn.new_zeros((layers, size, heads, words + 1, words + 1))
    summed.scatter_add_(-2, queries, to_words)  # [L, B, H, W+1, W+1]
    pieces = torch.zeros((size, words + 1), dtype=attn.dtype, device=attn.device)
    pieces.scatter_add_(1, index, torch.ones_like(attn[0, :, 0, 0]))
    pieces = pieces[:, :words]  # [B, W]: tokens per word, 0 where a window has fewer words
    mean_rows = summed[..., :words, :words] / pieces.clamp(min=1)[None, :, None, :, None]
    return mean_rows, pieces > 0
