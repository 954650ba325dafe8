"""Which tokens count as punctuation: named rules for ``tokens.is_punct`` and ``mass_punct``.

A rule sees a token's text: the characters of the input it covers (its surface), or the
token string where it covers none, with subword markers and surrounding spaces removed.
Special tokens are never punctuation (the ``Windower`` checks that before asking a rule).

- ``unicode`` (default): the text is one or more Unicode punctuation characters (general
  category P*: . , ; : ! ? ' " ( ) - — « » ...).
- ``clark``: the text is exactly "." or ",", as Clark et al. (2019) counted punctuation
  (``token == "." or token == ","`` in their General_Analysis.ipynb). On BERT's WordPiece
  tokens that is their test exactly; on other tokenizers it is the same test on the text.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from pipelines.config import ConfigError

_SUBWORD_MARKERS = ("##", "Ġ", "▁", "Ċ")

#: A rule: (surface text, token string) → is the token punctuation?
PunctuationRule = Callable[[str, str], bool]


def token_text(surface: str, token: str) -> str:
    """The text a rule judges: ``surface`` (else ``token``) without markers and spaces."""
    text = surface or token
    for marker in _SUBWORD_MARKERS:
        text = text.replace(marker, "")
    return text.strip()


def is_punctuation(text: str) -> bool:
    """True if ``text`` (subword markers and spaces removed) is only Unicode punctuation."""
    text = token_text("", text)
    return bool(text) and all(unicodedata.category(c).startswith("P") for c in text)


def _unicode(surface: str, token: str) -> bool:
    return is_punctuation(surface or token)


def _clark(surface: str, token: str) -> bool:
    return token_text(surface, token) in (".", ",")


#: Rule name → (rule, definition written into the manifest).
RULES: dict[str, tuple[PunctuationRule, str]] = {
    "unicode": (_unicode, "a non-special token whose text (surface, else token string, "
                          "without subword markers and spaces) is only Unicode punctuation "
                          "(general category P*)"),
    "clark": (_clark, 'a non-special token whose text is exactly "." or "," (Clark et al. '
                      "2019, General_Analysis.ipynb)"),
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
