"""What a person is shown for a token: the views and the factor pages draw these labels.

Plain strings only (no model, no tokenizer), so that the views, which read datasets and never
the text layer, can use them.
"""

from __future__ import annotations

#: How white space is drawn when a token covers nothing else (GPT-2's newline and space tokens).
_WHITESPACE_SHOWN = {"\n": "\\n", "\r": "\\r", "\t": "\\t", " ": "␣"}


def display_label(surface: str, token: str) -> str:
    """What a person is shown for a token: its source characters (``surface``), white space
    trimmed, so byte-level BPE reads "café", not "ĠcafÃ©"; a token of white space only shows
    it escaped ("\\n", "␣"); one whose offsets the tokenizer trimmed to nothing (RoBERTa's
    lone "Ġ"), its token string."""
    if not surface:
        return token
    return surface.strip() or "".join(_WHITESPACE_SHOWN.get(c, c) for c in surface)
