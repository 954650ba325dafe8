"""What a position is, from the tokenizer's own facts and the source characters, for every
tokenizer family: WordPiece (MiniLM), byte-level BPE without offset trimming (GPT-2) and with
it (RoBERTa), and SentencePiece-style "▁" markers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import build_sentencepiece_tokenizer
from tolerances import STAT_ATOL

from pipelines.analysis.batch import analyse_batch
from pipelines.analysis.words import words_table
from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset.labels import token_labels
from pipelines.dataset.tables import tokens_table
from pipelines.models import ModelInfo
from pipelines.text.tokenize import Document, Window, Windower, control_token_ids

ACCENTED = "Le café 😀 à Tōkyō 東京 is naïve — ok."
EMOJI = "I love pizza 🍕 so much!"
LONG_WORD = "A " + "x" * 130 + " word."
TEXTS = ["Short question?", ACCENTED, EMOJI, LONG_WORD, "  spaced\tout\nlines  "]


@dataclass
class Family:
    name: str
    tokenizer: object
    info: ModelInfo

    def windows(self, text: str, pair: str | None = None) -> list[Window]:
        windower = Windower(self.tokenizer, self.info, WindowConfig())
        return windower.windows(Document("d", text, pair))


def sentencepiece_info(tokenizer) -> ModelInfo:
    """A Llama-style causal model's facts for the SentencePiece-style test tokenizer."""
    return ModelInfo(name="sentencepiece", path="", family="gpt2", model_type="llama",
                     config_hash="", num_layers=1, num_heads=1, max_length=256, causal=True,
                     sep_token_id=None, pad_token_id=tokenizer.pad_token_id,
                     accepts_token_type_ids=False)


@pytest.fixture(scope="module")
def sentencepiece() -> Family:
    tokenizer = build_sentencepiece_tokenizer()
    return Family("sentencepiece", tokenizer, sentencepiece_info(tokenizer))


@pytest.fixture(params=["minilm", "gpt2", "roberta", "sentencepiece"])
def family(request: pytest.FixtureRequest) -> Family:
    if request.param == "sentencepiece":
        return request.getfixturevalue("sentencepiece")
    backend: TorchBackend = request.getfixturevalue(request.param)
    return Family(request.param, backend.tokenizer, backend.info)


def own_encoding(family: Family, text: str, pair: str | None) -> dict:
    """The tokenizer's own answer for the whole input (post-processed once)."""
    return family.tokenizer(text, pair, return_offsets_mapping=True,
                            return_special_tokens_mask=True)


def added_positions(window: Window) -> np.ndarray:
    return window.char_start < 0


# ---------------------------------------------------------------------------------------------
# tokens and offsets are the tokenizer's own


@pytest.mark.parametrize("pair", [None, "Is it naïve?"])
@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_offsets_equal_the_tokenizers_own(family: Family, text: str,
                                                  pair: str | None) -> None:
    (window,) = family.windows(text, pair)
    own = own_encoding(family, text, pair)
    np.testing.assert_array_equal(window.input_ids, own["input_ids"])
    added = np.asarray(own["special_tokens_mask"], dtype=bool)
    np.testing.assert_array_equal(added_positions(window), added)
    offsets = np.asarray(own["offset_mapping"]).reshape(-1, 2)
    np.testing.assert_array_equal(window.char_start[~added], offsets[~added, 0])
    np.testing.assert_array_equal(window.char_end[~added], offsets[~added, 1])


def test_roberta_offsets_are_trimmed_once(roberta: TorchBackend) -> None:
    windower = Windower(roberta.tokenizer, roberta.info, WindowConfig())
    (window,) = windower.windows(Document("d", "Short question?"))
    position = window.tokens.index("Ġquestion")
    assert (window.char_start[position], window.char_end[position]) == (6, 14)


@pytest.mark.parametrize(("text", "words"), [
    (ACCENTED, ["Le", "café", "😀", "à", "Tōkyō", "東京", "is", "naïve", "—", "ok", "."]),
    ("Short question?", ["Short", "question", "?"]),
])
def test_roberta_words_are_whole(roberta: TorchBackend, text: str, words: list[str]) -> None:
    windower = Windower(roberta.tokenizer, roberta.info, WindowConfig())
    table = words_table(windower.windows(Document("d", text)))
    assert table.column("text").to_pylist() == ["<s>", *words, "</s>"]


# ---------------------------------------------------------------------------------------------
# the surface: the source characters a token covers


@pytest.mark.parametrize("text", TEXTS)
def test_surface_is_the_source_characters(family: Family, text: str) -> None:
    (window,) = family.windows(text, "A pair?")
    for pos, surface in enumerate(window.surfaces):
        if added_positions(window)[pos]:
            assert surface == window.tokens[pos]
            continue
        source = "A pair?" if window.segment[pos] else text
        assert surface == source[window.char_start[pos]:window.char_end[pos]]
        # Only offset trimming (RoBERTa) leaves a token of white space with no character.
        assert surface or family.name == "roberta", f"{family.name}: {pos} covers nothing"


@pytest.mark.parametrize("family_name", ["gpt2", "roberta"])
def test_byte_level_tokens_are_shown_as_text(family_name: str,
                                             request: pytest.FixtureRequest) -> None:
    backend: TorchBackend = request.getfixturevalue(family_name)
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    (window,) = windower.windows(Document("d", ACCENTED + "\nnext line"))
    assert "ĠcafÃ©" in window.tokens  # the tokenizer's own string stays in `token`
    table = tokens_table([window])
    labels = token_labels(table)
    for word in ("café", "😀", "naïve", "—", "Tōkyō"[1], "東"):
        assert word in labels, (word, labels)
    assert not any(mark in label for label in labels for mark in ("Ġ", "Ã", "Ċ", "ð"))
    assert table.column("surface").to_pylist() == window.surfaces


def test_a_token_of_white_space_is_shown_escaped(gpt2: TorchBackend) -> None:
    windower = Windower(gpt2.tokenizer, gpt2.info, WindowConfig())
    (window,) = windower.windows(Document("d", "one\n\ntwo"))
    labels = token_labels(tokens_table([window]))
    assert labels[0] == "one" and labels[-1] == "two"
    assert "\\n" in "".join(labels[1:-1])


# ---------------------------------------------------------------------------------------------
# text positions are never special


def stand_in_positions(family: Family, window: Window) -> np.ndarray:
    ids = {family.tokenizer.unk_token_id, family.tokenizer.mask_token_id}
    return np.isin(window.input_ids, [i for i in ids if i is not None]) & ~added_positions(window)


@pytest.mark.parametrize("text", [EMOJI, LONG_WORD, "a typed {mask} here", "🍕🍕"])
def test_unknown_and_mask_positions_are_text(family: Family, text: str) -> None:
    mask = family.tokenizer.mask_token
    (window,) = family.windows(text.format(mask=mask))
    control = control_token_ids(family.tokenizer)
    expected = added_positions(window) | np.isin(window.input_ids, control)
    np.testing.assert_array_equal(window.is_special, expected)
    stand_ins = stand_in_positions(family, window)
    if family.name != "gpt2":  # GPT-2's unknown token is <|endoftext|>, a control token
        assert not window.is_special[stand_ins].any()
    if "{mask}" in text and family.name != "gpt2":
        assert stand_ins.any(), f"{family.name}: the typed mask token is not one token"


def test_minilm_emoji_is_an_unknown_text_position(minilm: TorchBackend) -> None:
    windower = Windower(minilm.tokenizer, minilm.info, WindowConfig())
    (window,) = windower.windows(Document("e", EMOJI))
    pos = window.tokens.index("[UNK]")
    assert (window.char_start[pos], window.char_end[pos]) == (13, 14)
    assert window.surfaces[pos] == "🍕"
    assert not window.is_special[pos]
    assert window.is_special.sum() == 2  # [CLS] and [SEP]


@pytest.mark.parametrize(("family_name", "control"), [
    ("minilm", "[SEP]"), ("gpt2", "<|endoftext|>"), ("roberta", "</s>")])
def test_a_typed_control_token_is_special(family_name: str, control: str,
                                          request: pytest.FixtureRequest) -> None:
    backend: TorchBackend = request.getfixturevalue(family_name)
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    (window,) = windower.windows(Document("d", f"before {control} after"))
    typed = [pos for pos, tok in enumerate(window.tokens)
             if tok == control and not added_positions(window)[pos]]
    assert len(typed) == 1 and window.is_special[typed[0]]


@pytest.mark.parametrize("text", [EMOJI, LONG_WORD, "I [MASK] pizza."])
def test_mass_special_counts_only_cls_and_sep(minilm: TorchBackend, text: str) -> None:
    """mass_special and mass_sparse against the mass on [CLS] (0) and [SEP] (n − 1) computed
    here from the attention maps; float32 sums of n weights: ``STAT_ATOL``."""
    windower = Windower(minilm.tokenizer, minilm.info, WindowConfig())
    windows = windower.windows(Document("e", text))
    assert any(tok in ("[UNK]", "[MASK]") for tok in windows[0].tokens)
    batch = collate(windows, minilm.info.pad_token_id)
    attn = minilm.attentions(batch)[:, 0].double()  # [L, H, n, n]
    n = windows[0].n_tokens
    config = RunConfig(local_window=2, attention=AttentionMode("none"))
    table = analyse_batch(minilm, batch, config)["head_stats"].to_pandas()
    layer, head = table["layer"].to_numpy(np.int64), table["head"].to_numpy(np.int64)
    special = attn[..., [0, n - 1]].sum(-1).mean(-1).numpy()  # [L, H]
    np.testing.assert_allclose(table["mass_special"], special[layer, head], atol=STAT_ATOL)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = ((i - j).abs() <= 2) | (j == 0) | (j == n - 1)
    sparse = (attn * keep).sum(-1).mean(-1).numpy()
    np.testing.assert_allclose(table["mass_sparse"], sparse[layer, head], atol=STAT_ATOL)


# ---------------------------------------------------------------------------------------------
# punctuation from the source characters


def test_punctuation_comes_from_the_source_characters(family: Family) -> None:
    text = "Wait, what?! A cat... (really) - yes; no ## ok."
    (window,) = family.windows(text)
    for pos, surface in enumerate(window.surfaces):
        chars = surface.strip()
        expected = (not window.is_special[pos] and bool(chars)
                    and all(c in ",?!.()-;#" for c in chars))
        assert window.is_punct[pos] == expected, (family.name, window.tokens[pos], surface)
    assert window.is_punct.sum() >= 3
