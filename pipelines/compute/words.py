"""Word-level attention maths: token-to-token maps merged into word-to-word maps.

For a word made of several tokens, the attention *to* it is the sum of the weights to its
tokens and the attention *from* it is the mean of its tokens' rows (``mean``, as Clark et al.
2019 did in the paper) or its first token's row (``first``, the default of their released
``bpe_utils.get_word_word_attention``); either way every word row still sums to 1. Which
token belongs to which word is decided on the text side (:mod:`pipelines.analysis.words`);
this module only merges tensors.
"""

from __future__ import annotations

import torch


def word_attention(attn: torch.Tensor, index: torch.Tensor,
                   rows: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Word-to-word attention [L, B, H, W, W] and the valid words [B, W].

    ``attn`` is [L, B, H, S, S] with zeros on pad keys; ``index`` is [B, S] int64, the word of
    every position and S on padding; ``rows`` is ``mean`` or ``first``. A scatter-add over
    keys merges the pieces a word is attended through; then a scatter-add over queries (the
    mean) or a gather of each word's first position (``first``). Padding goes to one extra
    slot, dropped at the end.
    """
    if rows not in ("mean", "first"):
        raise ValueError(f"unknown word rows {rows!r}: use mean or first")
    layers, size, heads, length, _ = attn.shape
    padding = index == length
    words = int(index.masked_fill(padding, -1).max()) + 1  # W, in the widest window
    index = index.masked_fill(padding, words)  # padding → slot W
    keys = index[None, :, None, None, :].expand(layers, size, heads, length, length)
    to_words = attn.new_zeros((layers, size, heads, length, words + 1))  # [L, B, H, S, W+1]
    to_words.scatter_add_(-1, keys, attn)
    pieces = torch.zeros((size, words + 1), dtype=attn.dtype, device=attn.device)
    pieces.scatter_add_(1, index, torch.ones_like(attn[0, :, 0, 0]))
    pieces = pieces[:, :words]  # [B, W]: tokens per word, 0 where a window has fewer words
    valid = pieces > 0
    if rows == "first":
        return _first_rows(to_words, index, words) * valid[None, :, None, :, None], valid
    queries = index[None, :, None, :, None].expand(layers, size, heads, length, words + 1)
    summed = attn.new_zeros((layers, size, heads, words + 1, words + 1))
    summed.scatter_add_(-2, queries, to_words)  # [L, B, H, W+1, W+1]
    mean_rows = summed[..., :words, :words] / pieces.clamp(min=1)[None, :, None, :, None]
    return mean_rows, valid


def _first_rows(to_words: torch.Tensor, index: torch.Tensor, words: int) -> torch.Tensor:
    """[L, B, H, W, W]: the row of each word's first position in ``to_words`` [L, B, H, S,
    W+1] (a window without word w reads position 0 there; the caller zeroes it)."""
    layers, size, heads, length, _ = to_words.shape
    positions = torch.arange(length, device=index.device).expand(size, length)
    first = torch.full((size, words + 1), length, dtype=torch.int64, device=index.device)
    first.scatter_reduce_(1, index, positions, "amin")  # [B, W+1]
    first = first[:, :words].clamp(max=length - 1)  # absent words → a real row, zeroed later
    gather = first[None, :, None, :, None].expand(layers, size, heads, words, words + 1)
    return to_words.gather(-2, gather)[..., :words]
