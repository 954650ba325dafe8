"""Texts given in Python become documents through the one input rule, named ``texts[i]``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.api.texts import SOURCE, documents, windowed
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import WindowConfig
from pipelines.text.inputs import InputError
from pipelines.text.tokenize import Windower


def described(texts: object) -> list[tuple[str, str, str | None, int]]:
    return [(d.doc_id, d.text, d.text_pair, d.source_line) for d in documents(texts)]


def test_strings_and_pairs_get_their_positions_as_ids() -> None:
    got = described(["A cat.", ("Is it?", "It is."), ["Yes.", None]])
    assert got == [("0", "A cat.", None, 0), ("1", "Is it?", "It is.", 1),
                   ("2", "Yes.", None, 2)]
    assert {d.source for d in documents(["A cat."])} == {SOURCE}


def test_one_string_is_one_text() -> None:
    assert described("A cat.") == [("0", "A cat.", None, 0)]


def test_ids_are_zero_padded_so_they_sort_in_input_order() -> None:
    ids = [d.doc_id for d in documents([f"text {i}" for i in range(12)])]
    assert ids == [f"{i:02d}" for i in range(12)]
    assert sorted(ids) == ids


def test_a_dataframe_gives_ids_and_pairs_and_missing_values_mean_none() -> None:
    frame = pd.DataFrame({"id": ["q1", None, 7], "text": ["Rain?", "Sun.", "Snow."],
                          "text_pair": ["Pouring.", np.nan, "  "]})
    assert described(frame) == [("q1", "Rain?", "Pouring.", 0), ("1", "Sun.", None, 1),
                                ("7", "Snow.", None, 2)]


def test_the_input_rule_applies_bom_and_blank_pair() -> None:
    assert described([("\ufeffHi there", "\ufeff ")]) == [("0", "Hi there", None, 0)]


@pytest.mark.parametrize(("texts", "message"), [
    ([], "no texts given"),
    (["ok", "   "], r"texts\[1\]: the text is empty"),
    (["ok", ("\ufeff", "pair")], r"texts\[1\]: the text is empty"),
    (["ok", 3], r"texts\[1\] is a int; each text is a string or a \(text, text_pair\) tuple"),
    ([("ok", 5)], r"texts\[0\]: text_pair is a int, not a string"),
    ([(None, "pair")], r"texts\[0\]: the text is missing"),
    (pd.DataFrame({"body": ["x"]}), "the DataFrame has no column 'text' \\(columns: body\\)"),
    (pd.DataFrame({"id": ["a", "a"], "text": ["x", "y"]}),
     r"texts\[1\]: duplicate id 'a' \(first at texts\[0\]\)"),
    (42, "texts: a int; pass a string"),
])
def test_bad_texts_are_named(texts: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        documents(texts)


def test_a_text_without_content_for_the_model_is_named(minilm: TorchBackend) -> None:
    windower = Windower(minilm.tokenizer, minilm.info, WindowConfig())
    docs = documents(["fine", "\u200b"])
    with pytest.raises(InputError, match=r"texts\[1\]: document '1': text .* has no content "
                                         "for this model"):
        windowed(docs, windower)
    (doc, windows), = windowed(docs[:1], windower)
    assert doc is docs[0] and windows[0].tokens == ["[CLS]", "fine", "[SEP]"]
