"""Word-level attention: subword tokens merged into words the way Clark et al. (2019) did.

A word is what the tokenizer's pre-tokenizer made of the text before splitting it into
subwords (BERT: runs of letters or digits, each punctuation mark; GPT-2: a word with its
leading space); every special token is a word of its own, and the two texts of a pair never
share a word. For a word made of several tokens, the attention *to* it is the sum of the
weights to its tokens and the attention *from* it is the mean of its tokens' rows, so every
word row still sums to 1. A window that starts or ends inside a word keeps only the pieces it
holds.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipelines.dataset.schema import WORDS
from pipelines.text.tokenize import Window


def word_of_token(window: Window) -> np.ndarray:
    """[n] int64: the index of the word each position belongs to (0, 1, ... in order)."""
    new_word = np.ones(window.n_tokens, dtype=bool)
    same_text_word = ((window.word_ids[1:] == window.word_ids[:-1])
                      & (window.segment[1:] == window.segment[:-1])
                      & (window.word_ids[1:] >= 0))
    new_word[1:] = ~same_text_word | window.is_special[1:] | window.is_special[:-1]
    return np.cumsum(new_word) - 1


def words_table(windows: list[Window]) -> pa.Table:
    """One row per word of every window, with its token span and surface text."""
    rows: dict[str, list] = {name: [] for name in WORDS.names}
    for window in windows:
        word = word_of_token(window)
        starts = np.flatnonzero(np.diff(word, prepend=-1))
        ends = np.append(starts[1:], window.n_tokens)
        for index, (start, end) in enumerate(zip(starts, ends, strict=True)):
            rows["doc_id"].append(window.doc.doc_id)
            rows["window"].append(window.window)
            rows["word"].append(index)
            rows["token_start"].append(start)
            rows["token_end"].append(end)
            rows["text"].append(_surface(window, start, end))
            rows["segment"].append(window.segment[start])
            rows["is_special"].append(bool(window.is_special[start]))
    return pa.table(rows, schema=WORDS)


def _surface(window: Window, start: int, end: int) -> str:
    if window.char_start[start] < 0:  # a token the tokenizer added
        return window.tokens[start]
    text = window.doc.text_pair if window.segment[start] else window.doc.text
    return (text or "")[window.char_start[start]: window.char_end[end - 1]]


def word_index(windows: list[Window], length: int, device: torch.device) -> torch.Tensor:
    """[B, S] int64: the word of every position, and S (no word can have it) on padding."""
    index = torch.full((len(windows), length), length, dtype=torch.int64)
    for row, window in enumerate(windows):
        index[row, : window.n_tokens] = torch.from_numpy(word_of_token(window))
    return index.to(device)


def word_attention(attn: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-to-word attention [L, B, H, W, W] and the valid words [B, W].

    ``attn`` is [L, B, H, S, S] with zeros on pad keys; ``index`` is [B, S] from
    :func:`word_index`. Two scatter-adds (over keys, then over queries) merge the pieces;
    padding goes to one extra slot, dropped at the end.
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
