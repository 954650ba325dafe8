"""What a person reads for a token: its source characters, not the tokenizer's string.

Views and the factor pages show these labels; the ``tokens`` table keeps both the raw
``token`` (``ĠcafÃ©`` for byte-level BPE) and its ``surface`` (`` café``).
"""

from __future__ import annotations

import pyarrow as pa

#: How white space is drawn when a token covers nothing else (GPT-2's newline and space tokens).
_WHITESPACE_SHOWN = {"\n": "\\n", "\r": "\\r", "\t": "\\t", " ": "␣"}


def display_label(surface: str, token: str) -> str:
    """The label of one token: its source characters (``surface``), white space trimmed, so
    byte-level BPE reads "café", not "ĠcafÃ©"; a token of white space only shows it escaped
    ("\\n", "␣"); one whose offsets the tokenizer trimmed to nothing (RoBERTa's lone "Ġ"),
    its token string."""
    if not surface:
        return token
    return surface.strip() or "".join(_WHITESPACE_SHOWN.get(c, c) for c in surface)


def token_labels(tokens: pa.Table) -> list[str]:
    """The label of every row of a ``tokens`` table; datasets written before the ``surface``
    column (format 1) show the tokenizer's strings."""
    raw = tokens.column("token").to_pylist()
    if "surface" not in tokens.column_names:
        return raw
    surfaces = tokens.column("surface").to_pylist()
    return [display_label(surface, token) for surface, token in zip(surfaces, raw, strict=True)]
