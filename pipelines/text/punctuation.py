"""Which tokens count as punctuation: named rules for ``tokens.is_punct`` and ``mass_punct``.

A rule judges a token's surface: the characters of the input it covers, white space aside.
It never sees the tokenizer's string, so WordPiece ("##,"), byte-level BPE ("Ġ,") and
SentencePiece ("▁,") tokens of the same characters get the same answer. Special tokens are
never punctuation (the ``Windower`` checks that before asking a rule).

- ``unicode`` (default): the surface is one or more Unicode punctuation characters (general
  category P*: . , ; : ! ? ' " ( ) - — « » ...).
- ``clark``: the surface is exactly "." or ",", as Clark et al. (2019) counted punctuation
  (``token == "." or token == ","`` in their General_Analysis.ipynb). On BERT's WordPiece
  tokens that is their test exactly; on other tokenizers it is the same test on the text.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from pipelines.config import ConfigError

#: A rule: a token's surface (source characters) → is the token punctuation?
PunctuationRule = Callable[[str], bool]


def is_punctuation(surface: str) -> bool:
    """True if ``surface``, white space aside, is only Unicode punctuation."""
    text = surface.strip()
    return bool(text) and all(unicodedata.category(c).startswith("P") for c in text)


def _clark(surface: str) -> bool:
    return surface.strip() in (".", ",")


#: Rule name → (rule, definition written into the manifest).
RULES: dict[str, tuple[PunctuationRule, str]] = {
    "unicode": (is_punctuation, "a non-special token whose source characters (white space "
                                "aside) are all Unicode punctuation (general category P*)"),
    "clark": (_clark, 'a non-special token whose source characters (white space aside) are '
                      'exactly "." or "," (Clark et al. 2019, General_Analysis.ipynb)'),
}
DEFAULT_RULE = "unicode"


def punctuation_rule(name: str) -> PunctuationRule:
    """The rule called ``name``; a ``ConfigError`` naming the choices for any other name."""
    if name not in RULES:
        raise ConfigError(f"unknown punctuation rule {name!r}: use {' or '.join(RULES)}")
    return RULES[name][0]


def definition(name: str) -> str:
    """What ``is_punct`` means under rule ``name`` (for the manifest)."""
    punctuation_rule(name)  # refuses unknown names
    return RULES[name][1]
