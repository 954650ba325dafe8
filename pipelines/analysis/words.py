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

from pipelines.schema import WORDS
from pipelines.tokenize import Window


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


def membership(windows: list[Window], length: int, device: torch.device) -> torch.Tensor:
    """[B, S, W] float32 one-hot: position s of window b belongs to word w (pads: none)."""
    words = [word_of_token(w) for w in windows]
    width = max(int(w[-1]) + 1 for w in words)
    member = torch.zeros((len(windows), length, width), dtype=torch.float32)
    for row, word in enumerate(words):
        member[row, torch.arange(len(word)), torch.from_numpy(word)] = 1.0
    return member.to(device)


def word_attention(attn: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-to-word attention [L, B, H, W, W] and the valid words [B, W].

    ``attn`` is [L, B, H, S, S] with zeros on pad keys; ``member`` is [B, S, W].
    """
    pieces = member.sum(1)  # [B, W] tokens per word, 0 for words a window does not have
    to_words = attn @ member[None, :, None]  # [L, B, H, S, W]: summed over each key word
    from_words = member.transpose(1, 2)[None, :, None] @ to_words  # [L, B, H, W, W]: summed rows
    mean_rows = from_words / pieces.clamp(min=1)[None, :, None, :, None]
    return mean_rows, pieces > 0
