"""Documents → model-ready windows with special tokens, offsets, segments and flags.

A document longer than the model allows is cut into overlapping windows (consecutive windows
share ``stride`` content tokens) or, if the user asks, truncated once. Each window records the
span of document tokens it covers, so nothing is dropped without a trace.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

from pipelines.config import ConfigError, WindowConfig
from pipelines.models import ModelInfo
from pipelines.text.punctuation import punctuation_rule

# --- the one input rule ----------------------------------------------------------------------
#
# Every front door (the file readers, the HTTP service, the Python API) makes its documents with
# ``Document``, which applies ``clean_text`` and ``clean_pair``; the service's request models
# call the same two functions to refuse a request before any work. What a text must give the
# model (at least one token that is not special) depends on the tokenizer, so ``Windower``
# checks it and raises ``NoContentError``.

#: U+FEFF, the byte-order mark that "CSV UTF-8" exports and some editors put first in a file.
BOM = "\ufeff"


class BlankText(ValueError):
    """A text with nothing but white space (and byte-order marks)."""


def strip_bom(text: str) -> str:
    """``text`` without the byte-order marks (U+FEFF) it starts with."""
    return text.lstrip(BOM)


def is_blank(text: str) -> bool:
    """True if ``text`` holds nothing but white space and byte-order marks."""
    return not strip_bom(text).strip()


def clean_text(text: str) -> str:
    """The text a document keeps: leading byte-order marks removed; blank is a ``BlankText``."""
    if is_blank(text):
        raise BlankText("text is blank")
    return strip_bom(text)


def clean_pair(pair: str | None) -> str | None:
    """The second text of a pair: leading byte-order marks removed; empty or blank is no pair."""
    if pair is None:
        return None
    return None if is_blank(pair) else strip_bom(pair)


@dataclass(frozen=True)
class Document:
    """One input text (and optional second text of a pair) with where it came from.

    Made through the input rule: ``text`` and ``text_pair`` are stored cleaned
    (``clean_text``, ``clean_pair``), so every front door gives the model the same input.
    """

    doc_id: str
    text: str
    text_pair: str | None = None
    source: str = ""
    source_line: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", clean_text(self.text))
        object.__setattr__(self, "text_pair", clean_pair(self.text_pair))


@dataclass
class Window:
    """One model input cut from a document; arrays are per position (length n_tokens)."""

    doc: Document
    window: int
    n_windows: int
    token_start: int  # first document content token in this window
    token_end: int  # one past the last
    n_doc_tokens: int  # content tokens of the whole text (not the pair)
    truncated: bool
    input_ids: np.ndarray  # [n] int64
    type_ids: np.ndarray  # [n] int64, fed to BERT-style models
    segment: np.ndarray  # [n] int8: 0 = text, 1 = text_pair
    char_start: np.ndarray  # [n] int32, -1 for tokens the tokenizer added ([CLS], [SEP])
    char_end: np.ndarray  # [n] int32, -1 likewise
    doc_position: np.ndarray  # [n] int32, -1 for added and pair tokens
    tokens: list[str]  # the tokenizer's own strings (byte-level BPE: bytes as symbols)
    surfaces: list[str]  # what a person reads: the source characters each token covers
    word_ids: np.ndarray  # [n] int32: word index within its text (tokenizer), -1 if added
    is_special: np.ndarray  # [n] bool: control tokens (see ``control_token_ids``)
    is_sep: np.ndarray  # [n] bool
    is_punct: np.ndarray  # [n] bool

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_content_tokens(self) -> int:
        return self.token_end - self.token_start


class NoContentError(ConfigError):
    """A text (or pair) of which the tokenizer makes no token but special ones."""


def control_token_ids(tokenizer) -> np.ndarray:
    """Sorted int64 ids of the tokens that are not text: the tokenizer's special tokens
    ([CLS], [SEP], [PAD], <s>, </s>, <|endoftext|>, chat markers...) and every added token it
    flags special, except the stand-ins for text.

    [UNK] and [MASK] stand for characters of the text (an emoji, a 130-letter word, a typed
    "[MASK]"), so they are text positions, unless the tokenizer also uses the same id as a
    control token (GPT-2's unknown token is <|endoftext|>), or its unknown token can never
    stand for text: a byte-level BPE (GPT-2, SmolLM2, Llama 3) spells every character in
    bytes, so its unknown token (SmolLM2's is <|endoftext|>) appears only where it is typed.
    This one rule decides both ``Window.is_special`` (what ``mass_special`` and
    ``mass_sparse`` count and what views hide) and whether a text has content.
    """
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    flagged = set(tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}
    control = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
               tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    if not unknown_stands_for_text(tokenizer):
        control.add(tokenizer.unk_token_id)
    stand_ins = {tokenizer.unk_token_id, tokenizer.mask_token_id} - control
    return np.asarray(sorted(flagged - stand_ins - {None}), dtype=np.int64)


def unknown_stands_for_text(tokenizer) -> bool:
    """Whether the tokenizer can emit its unknown token for characters of a text: not when
    every character has bytes to fall back on (a ByteLevel pre-tokenizer, or a BPE with
    ``byte_fallback``)."""
    backend = tokenizer.backend_tokenizer  # its parts, not the whole vocabulary as JSON
    pre = backend.pre_tokenizer
    byte_level = pre is not None and b'"ByteLevel"' in pre.__getstate__()
    return not (byte_level or getattr(backend.model, "byte_fallback", False))


@dataclass
class _Cut:
    """A document cut into windows' content: each part's encoding and first document token."""

    pair: Encoding | None
    parts: list[tuple[Encoding, int]]
    n_doc: int  # the document's content tokens
    truncated: bool


class Windower:
    """Tokenises documents into windows for one model and one window configuration."""

    def __init__(self, tokenizer, info: ModelInfo, config: WindowConfig) -> None:
        self.info = info
        self.tokenizer = copy.deepcopy(tokenizer.backend_tokenizer)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # Texts are encoded without the post-processor and finished once by ``_finish``: a
        # post-processor that trims offsets (RoBERTa's) must not run twice.
        self.post = self.tokenizer.post_processor
        self.tokenizer.post_processor = None
        self.max_length = config.max_length or info.max_length
        if self.max_length > info.max_length:
            raise ConfigError(
                f"max_length {self.max_length} exceeds the limit of model {info.name!r}, "
                f"{info.max_length} tokens"
            )
        self.stride = config.stride
        self.truncate = config.truncate
        # is_control[id]: one lookup per token (np.isin sorts for every window)
        control_ids = control_token_ids(tokenizer)
        size = max(self.tokenizer.get_vocab_size(with_added_tokens=True),
                   int(control_ids.max(initial=-1)) + 1)
        self.is_control = np.zeros(size, dtype=bool)
        self.is_control[control_ids] = True
        self.is_punct = punctuation_rule(config.punctuation)  # pipelines.text.punctuation
        if not self.truncate and self.stride >= self.max_length - self._n_special(False):
            raise ConfigError(
                f"stride {self.stride} must be smaller than the "
                f"{self.max_length - self._n_special(False)} content tokens of a window"
            )

    def _n_special(self, pair: bool) -> int:
        return self.post.num_special_tokens_to_add(pair) if self.post is not None else 0

    def _finish(self, content: Encoding, pair: Encoding | None) -> Encoding:
        if self.post is None:
            return Encoding.merge([content, pair]) if pair is not None else content
        return self.post.process(content, pair, add_special_tokens=True)

    def windows(self, doc: Document) -> list[Window]:
        """All windows of ``doc`` (one when it fits)."""
        cut = self._cut(doc)
        return [self._window(doc, part, cut.pair, index, len(cut.parts), start,
                             start + len(part.ids), cut.n_doc, cut.truncated)
                for index, (part, start) in enumerate(cut.parts)]

    def window_lengths(self, doc: Document) -> list[int]:
        """``[w.n_tokens for w in self.windows(doc)]`` without building the windows (the
        same checks and errors): what a size survey needs."""
        cut = self._cut(doc)
        added = self._n_special(cut.pair is not None) + (len(cut.pair.ids) if cut.pair else 0)
        return [len(part.ids) + added for part, _ in cut.parts]

    def _cut(self, doc: Document) -> _Cut:
        """``doc`` encoded, checked and cut into the content of each window."""
        text_enc = self.tokenizer.encode(doc.text, add_special_tokens=False)
        pair_enc = (
            self.tokenizer.encode(doc.text_pair, add_special_tokens=False)
            if doc.text_pair is not None else None
        )
        self._require_content(doc, "text", text_enc)
        if pair_enc is not None:
            self._require_content(doc, "text_pair", pair_enc)
        n_doc = len(text_enc.ids)
        n_pair = len(pair_enc.ids) if pair_enc is not None else 0
        budget = self.max_length - self._n_special(pair_enc is not None) - n_pair
        if budget < 1:
            raise ConfigError(
                f"document {doc.doc_id!r}: text_pair has {n_pair} tokens, leaving no room for the "
                f"text within max_length {self.max_length}"
            )
        if n_doc <= budget:
            return _Cut(pair_enc, [(text_enc, 0)], n_doc, False)
        if self.truncate:
            text_enc.truncate(budget)
            return _Cut(pair_enc, [(text_enc, 0)], n_doc, True)
        if self.stride >= budget:
            raise ConfigError(
                f"stride {self.stride} must be smaller than the {budget} content tokens per window"
            )
        text_enc.truncate(budget, stride=self.stride)
        step = budget - self.stride
        return _Cut(pair_enc, [(part, index * step) for index, part
                               in enumerate([text_enc, *text_enc.overflowing])], n_doc, False)

    def _require_content(self, doc: Document, name: str, enc: Encoding) -> None:
        """A ``NoContentError`` unless ``enc`` holds a token that is not a control token."""
        ids = np.asarray(enc.ids, dtype=np.int64)
        if not self.is_control[ids].all():
            return
        value = doc.text if name == "text" else doc.text_pair or ""
        shown = repr(value if len(value) <= 40 else value[:40] + "…")
        made = (f"only special tokens ({' '.join(enc.tokens[:8])})" if enc.ids
                else "no token at all (it drops characters such as zero-width spaces)")
        raise NoContentError(
            f"document {doc.doc_id!r}: {name} {shown} has no content for this model: its "
            f"tokenizer gives {made}; give the {name} some content or remove it")

    def _window(self, doc: Document, content: Encoding, pair: Encoding | None, index: int,
                n_windows: int, start: int, end: int, n_doc: int, truncated: bool) -> Window:
        enc = self._finish(content, pair)
        ids = np.asarray(enc.ids, dtype=np.int64)
        added = np.asarray(enc.special_tokens_mask, dtype=bool)  # added by the post-processor
        # Special: added, or a control token typed in the text (e.g. <|endoftext|>).
        special = added | self.is_control[ids]
        # Tokens not added come in order: the window's text tokens, then the pair's.
        content_rank = np.cumsum(~added) - 1
        is_pair = ~added & (content_rank >= len(content.ids))
        # An added token belongs to the segment of the content token before it.
        segment = np.maximum.accumulate(np.where(added, 0, is_pair)).astype(np.int8)
        offsets = np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2)
        offsets[added] = -1
        doc_position = np.where(added | is_pair, -1, start + content_rank).astype(np.int32)
        sep_id = self.info.sep_token_id
        is_sep = special & (ids == sep_id) if sep_id is not None else np.zeros(len(ids), bool)
        surfaces = [
            token if was_added else (doc.text_pair or "" if pair_token else doc.text)[a:b]
            for token, pair_token, (a, b), was_added
            in zip(enc.tokens, is_pair, offsets, added, strict=True)
        ]
        punct = np.array([not sp and self.is_punct(text) for text, sp in zip(
            surfaces, special, strict=True)], dtype=bool)
        return Window(
            doc=doc, window=index, n_windows=n_windows, token_start=start, token_end=end,
            n_doc_tokens=n_doc, truncated=truncated, input_ids=ids,
            type_ids=np.asarray(enc.type_ids, dtype=np.int64), segment=segment,
            char_start=offsets[:, 0].copy(), char_end=offsets[:, 1].copy(),
            doc_position=doc_position, tokens=list(enc.tokens), surfaces=surfaces,
            word_ids=np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int32),
            is_special=special,
            is_sep=is_sep, is_punct=punct,
        )
