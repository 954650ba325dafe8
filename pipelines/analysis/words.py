"""The ``words`` analysis: subword tokens merged into words the way Clark et al. (2019) did.

A word is what the tokenizer's pre-tokenizer made of the text before splitting it into
subwords (BERT: runs of letters or digits, each punctuation mark; GPT-2: a word with its
leading space); every special token is a word of its own, and the two texts of a pair never
share a word. (Clark et al.'s words were their corpus's given words, e.g. Penn Treebank
tokens.) For a word made of several tokens, the attention *to* it is the sum of the weights
to its tokens and the attention *from* it is the mean of its tokens' rows (``word_rows``
``mean``, their paper) or its first token's row (``first``, their released script's
default), so every word row still sums to 1. A window that starts or ends inside a word keeps
only the pieces it holds.

The merging of attention maps is tensor maths in :mod:`pipelines.compute.words`; this module
decides the words of a window, builds the ``words`` and ``word_attention`` tables and declares
the analysis to the registry.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipelines.analysis.registry import Analysis, BatchContext, BatchTables
from pipelines.compute.kept import kept_weights
from pipelines.compute.stats import row_order
from pipelines.compute.words import word_attention
from pipelines.config import RunConfig
from pipelines.dataset.schema import INDEX, KEY_FIELDS, SEGMENT, TableSpec, weight_type
from pipelines.dataset.tables import key_columns
from pipelines.text.tokenize import Window

__all__ = ["ANALYSIS", "WORDS", "word_attention_schema", "word_attention_table", "word_index",
           "word_of_token", "words_table"]

WORDS = pa.schema([
    ("doc_id", pa.string()),
    ("window", INDEX),
    ("word", INDEX),
    ("token_start", INDEX),  # first position of the word in the window
    ("token_end", INDEX),  # one past its last position
    ("text", pa.string()),
    ("segment", SEGMENT),
    ("is_special", pa.bool_()),
])


def word_attention_schema(full: bool) -> pa.Schema:
    return pa.schema(KEY_FIELDS + [("query_word", INDEX), ("key_word", INDEX),
                                   ("weight", weight_type(full))])


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
            rows["token_start"].append(int(start))
            rows["token_end"].append(int(end))
            rows["text"].append(_surface(window, int(start), int(end)))
            rows["segment"].append(int(window.segment[start]))
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


def word_attention_table(context: BatchContext) -> tuple[pa.Table, np.ndarray]:
    """The kept word-to-word weights in the job's attention mode, and each row's batch row."""
    batch, attn, config = context.batch, context.attn, context.config
    mode, full = config.attention, config.attention.kind == "full"
    if mode.kind == "none":
        return word_attention_schema(full).empty_table(), np.zeros(0, np.int64)
    index = word_index(batch.windows, attn.shape[-1], attn.device)  # [B, S]
    word_attn, word_valid = word_attention(attn, index, config.word_rows)  # [L,B,H,W,W], [B,W]
    order = row_order(word_attn, mode.k if mode.kind == "topk" else None)
    kept = kept_weights(word_attn, word_valid, context.info.causal, mode, order.kth_largest)
    assert kept is not None  # only the "none" mode keeps nothing
    columns = {**key_columns(batch.windows, kept["batch_index"]), "layer": kept["layer"],
               "head": kept["head"], "query_word": kept["query"], "key_word": kept["key"],
               "weight": kept["weight"]}
    return pa.table(columns, schema=word_attention_schema(full)), kept["batch_index"]


def _per_batch(context: BatchContext) -> BatchTables:
    return {"word_attention": word_attention_table(context)}


_FROM_WORD = {
    "mean": ("mean of its tokens' rows", "same as their paper (mode='mean'); their released "
             "script defaults to the first token's row (word_rows=first)"),
    "first": ("its first token's row", "same as their released script's default "
              "(bpe_utils.get_word_word_attention, mode='first'); the paper used the mean"),
}


def _describe(config: RunConfig) -> dict:
    from_word, relation = _FROM_WORD[config.word_rows]
    return {"to_word": "sum of the weights to its tokens", "word_rows": config.word_rows,
            "from_word": from_word, "unit": "pre-tokenizer words",
            "clark_et_al_2019": f"{relation}; their words were their corpus's given words, "
                                "here the tokenizer's pre-tokenizer words"}


ANALYSIS = Analysis(
    name="words",
    tables=(TableSpec("words", WORDS, ("doc_id", "window", "word"), 131072),
            TableSpec("word_attention", lambda full=False, **_: word_attention_schema(full),
                      ("doc_id", "window", "layer", "head", "query_word", "key_word"), 262144,
                      per_head=True)),
    per_batch=_per_batch,
    text_tables=lambda windows: {"words": words_table(windows)},
    describe=_describe,
    service=True,
    layerwise=True,
)
