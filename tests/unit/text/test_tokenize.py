"""Documents → windows: coverage and overlap, truncation, offsets, segments, flags, errors."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from conftest import SAMPLE_TEXTS

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import ConfigError, WindowConfig
from pipelines.text.punctuation import is_punctuation
from pipelines.text.tokenize import (
    BlankText,
    Document,
    NoContentError,
    Window,
    Windower,
)

LONG_TEXT = " ".join(SAMPLE_TEXTS) * 2
ASCII_TEXT = "The Quick brown fox jumps over lazy dogs while tokenization happens quietly"


def windower(backend: TorchBackend, max_length: int | None = None, stride: int = 64,
             truncate: bool = False) -> Windower:
    return Windower(backend.tokenizer, backend.info,
                    WindowConfig(max_length=max_length, stride=stride, truncate=truncate))


def doc_ids(backend: TorchBackend, text: str) -> list[int]:
    return backend.tokenizer(text, add_special_tokens=False)["input_ids"]


def n_special(backend: TorchBackend, pair: bool = False) -> int:
    return 0 if backend.info.causal else (3 if pair else 2)


def content(window: Window) -> np.ndarray:
    """Positions of the window holding document (not pair, not special) tokens."""
    return np.flatnonzero(window.doc_position >= 0)


# ---------------------------------------------------------------------------------------------
# windows cover the document


@pytest.mark.parametrize(("max_length", "stride"), [(16, 4), (24, 1), (20, 9)])
@pytest.mark.parametrize("pair", [None, "Is it so?"])
def test_windows_cover_the_document(backend: TorchBackend, max_length: int, stride: int,
                                    pair: str | None) -> None:
    ids = doc_ids(backend, LONG_TEXT)
    windows = windower(backend, max_length, stride).windows(Document("d", LONG_TEXT, pair))
    assert len(windows) > 2
    budget = max_length - n_special(backend, pair is not None) - (
        len(doc_ids(backend, pair)) if pair else 0)

    for index, window in enumerate(windows):
        assert (window.window, window.n_windows) == (index, len(windows))
        assert window.n_doc_tokens == len(ids)
        assert not window.truncated
        assert window.n_tokens <= max_length
        positions = window.doc_position[content(window)]
        np.testing.assert_array_equal(positions, np.arange(window.token_start, window.token_end))
        np.testing.assert_array_equal(window.input_ids[content(window)],
                                      ids[window.token_start:window.token_end])
        if index < len(windows) - 1:
            assert window.n_content_tokens == budget

    for before, after in pairwise(windows):
        assert before.token_end - after.token_start == stride
        shared_before = before.input_ids[content(before)][-stride:]
        shared_after = after.input_ids[content(after)][:stride]
        np.testing.assert_array_equal(shared_before, shared_after)

    assert windows[0].token_start == 0
    assert windows[-1].token_end == len(ids)
    covered = np.unique(np.concatenate([w.doc_position[content(w)] for w in windows]))
    np.testing.assert_array_equal(covered, np.arange(len(ids)))


def test_pair_repeats_in_every_window(minilm: TorchBackend) -> None:
    pair = "Is it so?"
    pair_ids = doc_ids(minilm, pair)
    for window in windower(minilm, 20, 4).windows(Document("d", LONG_TEXT, pair)):
        in_pair = window.segment.astype(bool) & ~window.is_special
        np.testing.assert_array_equal(window.input_ids[in_pair], pair_ids)
        assert (window.doc_position[in_pair] == -1).all()


def test_truncation_gives_one_window(backend: TorchBackend) -> None:
    ids = doc_ids(backend, LONG_TEXT)
    (window,) = windower(backend, 16, 4, truncate=True).windows(Document("d", LONG_TEXT))
    budget = 16 - n_special(backend)
    assert window.truncated
    assert (window.window, window.n_windows) == (0, 1)
    assert (window.token_start, window.token_end) == (0, budget)
    assert window.n_doc_tokens == len(ids) > budget
    assert window.n_tokens == 16
    np.testing.assert_array_equal(window.input_ids[content(window)], ids[:budget])


@pytest.mark.parametrize("truncate", [False, True])
def test_text_that_fits_gives_one_window(backend: TorchBackend, truncate: bool) -> None:
    text = SAMPLE_TEXTS[0]
    ids = doc_ids(backend, text)
    (window,) = windower(backend, 64, 4, truncate=truncate).windows(Document("d", text))
    assert not window.truncated
    assert (window.window, window.n_windows) == (0, 1)
    assert (window.token_start, window.token_end, window.n_doc_tokens) == (0, len(ids), len(ids))
    assert window.n_tokens == len(ids) + n_special(backend)


def test_text_exactly_at_the_budget_is_not_windowed(backend: TorchBackend) -> None:
    text = SAMPLE_TEXTS[1]
    max_length = len(doc_ids(backend, text)) + n_special(backend)
    (window,) = windower(backend, max_length, 2).windows(Document("d", text))
    assert window.n_tokens == max_length
    assert not window.truncated
    windows = windower(backend, max_length - 1, 2).windows(Document("d", text))
    assert len(windows) == 2


# ---------------------------------------------------------------------------------------------
# offsets, segments, flags


def test_minilm_offsets_map_back_to_the_text(minilm: TorchBackend) -> None:
    windows = windower(minilm, 10, 3).windows(Document("d", ASCII_TEXT))
    assert len(windows) > 1
    assert any(t.startswith("##") for w in windows for t in w.tokens), "needs a word piece"
    for window in windows:
        for pos in content(window):
            start, end = window.char_start[pos], window.char_end[pos]
            assert ASCII_TEXT[start:end].lower() == window.tokens[pos].removeprefix("##")
        special = window.is_special
        assert (window.char_start[special] == -1).all() and (window.char_end[special] == -1).all()


def test_gpt2_offsets_map_back_to_the_text(gpt2: TorchBackend) -> None:
    for window in windower(gpt2, 8, 2).windows(Document("d", ASCII_TEXT)):
        for pos in range(window.n_tokens):
            text = ASCII_TEXT[window.char_start[pos]:window.char_end[pos]]
            assert text == window.tokens[pos].replace("Ġ", " ")


def test_pair_offsets_point_into_the_pair(minilm: TorchBackend) -> None:
    text, pair = "Quick question", "Brown foxes jump"
    (window,) = windower(minilm).windows(Document("d", text, pair))
    for pos in range(window.n_tokens):
        if window.is_special[pos]:
            continue
        source = pair if window.segment[pos] else text
        chunk = source[window.char_start[pos]:window.char_end[pos]]
        assert chunk.lower() == window.tokens[pos].removeprefix("##")


def test_minilm_pair_segments_and_separators(minilm: TorchBackend) -> None:
    text, pair = "The cat sat.", "Did it?"
    n_a, n_b = len(doc_ids(minilm, text)), len(doc_ids(minilm, pair))
    (window,) = windower(minilm).windows(Document("d", text, pair))
    assert window.tokens[0] == "[CLS]"
    assert window.tokens[n_a + 1] == window.tokens[-1] == "[SEP]"
    expected = np.array([0] * (n_a + 2) + [1] * (n_b + 1))
    np.testing.assert_array_equal(window.segment, expected)
    np.testing.assert_array_equal(window.type_ids, expected)
    sep = np.zeros(window.n_tokens, bool)
    sep[[n_a + 1, window.n_tokens - 1]] = True
    np.testing.assert_array_equal(window.is_sep, sep)
    special = sep.copy()
    special[0] = True
    np.testing.assert_array_equal(window.is_special, special)
    np.testing.assert_array_equal(window.doc_position[1:n_a + 1], np.arange(n_a))
    assert (window.doc_position[n_a + 1:] == -1).all() and window.doc_position[0] == -1


def test_minilm_single_text_separator(minilm: TorchBackend) -> None:
    (window,) = windower(minilm).windows(Document("d", SAMPLE_TEXTS[0]))
    np.testing.assert_array_equal(window.is_sep, np.array(window.tokens) == "[SEP]")
    assert window.is_sep[-1] and window.is_sep.sum() == 1
    assert not window.segment.any()


def test_gpt2_pair_segments_and_no_separator(gpt2: TorchBackend) -> None:
    text, pair = "The cat sat.", " Did it?"
    n_a, n_b = len(doc_ids(gpt2, text)), len(doc_ids(gpt2, pair))
    (window,) = windower(gpt2).windows(Document("d", text, pair))
    assert window.n_tokens == n_a + n_b
    np.testing.assert_array_equal(window.segment, [0] * n_a + [1] * n_b)
    assert not window.is_sep.any()
    assert not window.is_special.any()
    np.testing.assert_array_equal(window.doc_position, list(range(n_a)) + [-1] * n_b)


def test_punctuation_flags_on_real_tokens(backend: TorchBackend) -> None:
    text = "Wait, what?! A cat... (really) - yes; no."
    (window,) = windower(backend).windows(Document("d", text))
    for pos in range(window.n_tokens):
        surface = text[window.char_start[pos]:window.char_end[pos]].strip()
        expected = not window.is_special[pos] and all(c in ",?!.()-;" for c in surface)
        assert window.is_punct[pos] == expected, (window.tokens[pos], surface)
    assert window.is_punct.sum() >= 6


@pytest.mark.parametrize(("text", "expected"), [
    (",", True), (" .", True), ("...", True), ("—", True), ("«", True), ("?!", True),
    ("##", True), ("a.", False), ("", False), (" ", False), ("cat", False), ("$", False),
    ("1", False), ("Ġ.", False), ("▁", False),
])
def test_is_punctuation(text: str, expected: bool) -> None:
    assert is_punctuation(text) is expected


# ---------------------------------------------------------------------------------------------
# configuration errors


def test_stride_not_below_budget_is_an_error(backend: TorchBackend) -> None:
    budget = 16 - n_special(backend)
    with pytest.raises(ConfigError, match="stride"):
        windower(backend, 16, budget).windows(Document("d", LONG_TEXT))
    with pytest.raises(ConfigError, match="stride"):
        windower(backend, 16, budget + 5).windows(Document("d", LONG_TEXT))
    assert len(windower(backend, 16, budget - 1).windows(Document("d", LONG_TEXT))) > 1


def test_max_length_above_model_limit_is_an_error(backend: TorchBackend) -> None:
    limit = backend.info.max_length
    with pytest.raises(ConfigError, match="exceeds"):
        windower(backend, limit + 1)
    assert windower(backend, limit).max_length == limit
    assert windower(backend).max_length == limit


def test_pair_longer_than_max_length_is_an_error(backend: TorchBackend) -> None:
    with pytest.raises(ConfigError, match="text_pair"):
        windower(backend, 16, 2).windows(Document("d", "Short.", LONG_TEXT))


# ---------------------------------------------------------------------------------------------
# the input rule: a blank pair is no pair; a text (or pair) needs a token that is not special

#: Characters WordPiece's normaliser drops (format characters): zero-width space, word joiner,
#: soft hyphen. GPT-2's byte-level BPE makes tokens of their bytes, so there they are content.
IGNORABLE = ["\u200b\u200b", "\u2060", "\u00ad\u00ad", "\u200b \u2060\u00ad"]


@pytest.mark.parametrize("pair", ["", " ", "  ", "\ufeff", "\n\t"])
def test_blank_pair_is_no_pair(backend: TorchBackend, pair: str) -> None:
    doc = Document("a", "Hi there", pair)
    assert doc.text_pair is None
    (got,) = windower(backend).windows(doc)
    (want,) = windower(backend).windows(Document("a", "Hi there"))
    assert got.tokens == want.tokens and not got.segment.any()
    if not backend.info.causal:
        assert got.tokens == ["[CLS]", "hi", "there", "[SEP]"]


def test_document_drops_leading_boms_and_refuses_blank_text() -> None:
    assert Document("a", "\ufeff\ufeffHi", "\ufeffthere").text == "Hi"
    assert Document("a", "\ufeffHi", "\ufeffthere").text_pair == "there"
    for blank in ("", "   ", "\ufeff", "\ufeff\n"):
        with pytest.raises(BlankText, match="blank"):
            Document("a", blank)


@pytest.mark.parametrize("text", IGNORABLE)
def test_text_of_ignorable_characters_depends_on_the_tokenizer(backend: TorchBackend,
                                                               text: str) -> None:
    if backend.info.causal:  # byte-level BPE: the bytes are tokens, the text is content
        (window,) = windower(backend).windows(Document("zw", text))
        assert window.n_doc_tokens > 0 and not window.is_special.any()
        return
    with pytest.raises(NoContentError, match=r"document 'zw': text .*no token at all"):
        windower(backend).windows(Document("zw", text))


def test_text_of_only_control_tokens_has_no_content(backend: TorchBackend) -> None:
    tokenizer = backend.tokenizer
    control = tokenizer.sep_token or tokenizer.eos_token  # [SEP] / <|endoftext|>
    with pytest.raises(NoContentError, match=r"'only'.*only special tokens"):
        windower(backend).windows(Document("only", control * 2))


@pytest.mark.parametrize("text", ["🍕", "🍕 😀", "[MASK]", "[UNK]"])
def test_unknown_and_mask_tokens_are_content(minilm: TorchBackend, text: str) -> None:
    """[UNK] (characters the vocabulary lacks) and a typed [MASK] stand for the text."""
    (window,) = windower(minilm).windows(Document("u", text))
    assert window.n_doc_tokens > 0


def test_pair_without_content_is_refused(minilm: TorchBackend) -> None:
    with pytest.raises(NoContentError, match=r"document 'p': text_pair '\\u200b'"):
        windower(minilm).windows(Document("p", "Hi there", "\u200b"))
    (window,) = windower(minilm).windows(Document("p", "\u200bHi there\u200b"))
    assert window.tokens == ["[CLS]", "hi", "there", "[SEP]"]


# ---------------------------------------------------------------------------------------------
# window_lengths: the survey's count without building windows


@pytest.mark.parametrize("family", ["minilm", "gpt2", "roberta", "gemma"])
@pytest.mark.parametrize(("max_length", "stride", "truncate"),
                         [(None, 64, False), (16, 4, False), (24, 1, True), (20, 9, False)])
def test_window_lengths_are_the_windows_token_counts(
        request: pytest.FixtureRequest, family: str, max_length: int | None, stride: int,
        truncate: bool) -> None:
    if family == "gemma":
        from pipelines.backends import create_backend
        model = create_backend("torch", str(request.getfixturevalue("gemma_dir")), "cpu",
                               "float32")
    else:
        model = request.getfixturevalue(family)
    cutter = Windower(model.tokenizer, model.info,
                      WindowConfig(max_length=max_length, stride=stride, truncate=truncate))
    for doc in [Document("long", LONG_TEXT), Document("pair", LONG_TEXT, "Is it so?"),
                Document("short", "Hi."), Document("short pair", "Hi.", "Yes, it is.")]:
        assert cutter.window_lengths(doc) == [w.n_tokens for w in cutter.windows(doc)], doc.doc_id


def test_window_lengths_refuse_what_windows_refuse(minilm: TorchBackend) -> None:
    cutter = windower(minilm, max_length=8, stride=2)
    doc = Document("d", "a b c", "a much longer pair than eight tokens can hold here")
    with pytest.raises(ConfigError) as by_windows:
        cutter.windows(doc)
    with pytest.raises(ConfigError) as by_lengths:
        cutter.window_lengths(doc)
    assert str(by_lengths.value) == str(by_windows.value)
