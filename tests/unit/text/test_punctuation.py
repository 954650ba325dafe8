"""Punctuation rules: ``unicode`` (default) and ``clark`` ("." and "," only), on strings and
through the ``Windower`` on real tokenizers of both model families."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import ConfigError, WindowConfig
from pipelines.text.punctuation import RULES, definition, punctuation_rule
from pipelines.text.tokenize import Document, Windower

TEXT = "Wait, what?! A cat... (really) - yes; no. «Fine», she said: 'done'."


@pytest.mark.parametrize(("surface", "unicode", "clark"), [
    (".", True, True), (",", True, True), (" .", True, True), (", ", True, True),
    (";", True, False), ("...", True, False), ("?!", True, False), ("«", True, False),
    ("##", True, False), ("a.", False, False), ("", False, False), (" ", False, False),
    ("cat", False, False), ("$", False, False), (".,", True, False),
    # token strings are not surfaces: markers are letters to the rules
    ("Ġ,", False, False), ("▁.", False, False),
])
def test_rules_on_surfaces(surface: str, unicode: bool, clark: bool) -> None:
    assert punctuation_rule("unicode")(surface) is unicode
    assert punctuation_rule("clark")(surface) is clark


def test_unknown_rule_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="unicode or clark"):
        punctuation_rule("ascii")
    with pytest.raises(ConfigError, match="unknown punctuation rule"):
        definition("ascii")
    assert set(RULES) == {"unicode", "clark"} and '"." or ","' in definition("clark")


def flags(backend: TorchBackend, rule: str, text: str = TEXT) -> tuple[list[str], np.ndarray,
                                                                        np.ndarray]:
    """Token surfaces, special flags and ``is_punct`` of ``text``'s one window under ``rule``."""
    windower = Windower(backend.tokenizer, backend.info, WindowConfig(punctuation=rule))
    (window,) = windower.windows(Document("d", text))
    surfaces = [text[a:b].strip() if a >= 0 else ""
                for a, b in zip(window.char_start, window.char_end, strict=True)]
    return surfaces, window.is_special, window.is_punct


def test_clark_rule_flags_only_full_stops_and_commas(backend: TorchBackend) -> None:
    surfaces, special, clark = flags(backend, "clark")
    expected = np.isin(surfaces, [".", ","]) & ~special
    np.testing.assert_array_equal(clark, expected)
    assert clark.sum() >= 3  # "Wait," "no." and the last "." at least (BPE may merge "»,")


def test_clark_flags_are_a_subset_of_the_default(backend: TorchBackend) -> None:
    _, _, unicode = flags(backend, "unicode")
    _, _, clark = flags(backend, "clark")
    assert not (clark & ~unicode).any()
    assert (unicode & ~clark).sum() >= 8  # ? ! ( ) - ; « » : ' ...


def test_windower_refuses_an_unknown_rule(minilm: TorchBackend) -> None:
    with pytest.raises(ConfigError, match="punctuation rule"):
        Windower(minilm.tokenizer, minilm.info, WindowConfig(punctuation="ascii"))
