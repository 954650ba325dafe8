"""Texts given in Python → documents and their windows, through the one input rule.

Accepted: a string, a sequence of strings and ``(text, text_pair)`` tuples, or a pandas
DataFrame with a ``text`` column and optional ``text_pair`` and ``id`` columns. Documents get
``source`` "python" and ``source_line`` = their position; without an id, the position,
zero-padded so that ids sort in input order ("0".."9", or "00".."11" for twelve texts).
Every problem is an ``InputError`` naming the text as ``texts[i]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import pandas as pd

from pipelines.config import ConfigError
from pipelines.text.inputs import InputError
from pipelines.text.tokenize import BlankText, Document, Window, Windower

#: ``source`` of the documents given in Python (the service's are "http").
SOURCE = "python"
#: What ``texts`` may be.
Texts: TypeAlias = str | Sequence[str | tuple[str, str | None]] | pd.DataFrame
#: One text before the input rule: (text, text_pair, id), as given.
_Item: TypeAlias = tuple[object, object, object]


def documents(texts: Texts) -> list[Document]:
    """One document per text, in order; an InputError for a text the input rule refuses, a
    duplicate id or no text at all."""
    items = _items(texts)
    if not items:
        raise InputError("no texts given; pass at least one")
    width = len(str(len(items) - 1))
    docs: list[Document] = []
    first: dict[str, int] = {}
    for index, (text, pair, given_id) in enumerate(items):
        doc = _document(index, text, pair, given_id, f"{index:0{width}d}")
        if doc.doc_id in first:
            raise InputError(f"texts[{index}]: duplicate id {doc.doc_id!r} "
                             f"(first at texts[{first[doc.doc_id]}])")
        first[doc.doc_id] = index
        docs.append(doc)
    return docs


def windowed(docs: list[Document], windower: Windower) -> list[tuple[Document, list[Window]]]:
    """Each document with its windows; an InputError naming the text that has no content for
    the model (or a pair too long to leave room for it)."""
    out = []
    for doc in docs:
        try:
            out.append((doc, windower.windows(doc)))
        except ConfigError as exc:
            raise InputError(f"texts[{doc.source_line}]: {exc}") from None
    return out


def _items(texts: Texts) -> list[_Item]:
    if isinstance(texts, str):
        return [(texts, None, None)]
    if isinstance(texts, pd.DataFrame):
        return _frame_items(texts)
    if isinstance(texts, pd.Series):
        texts = texts.tolist()
    if not isinstance(texts, Sequence):
        raise InputError(f"texts: a {type(texts).__name__}; pass a string, a list of strings "
                         "or (text, text_pair) tuples, or a DataFrame with a 'text' column")
    return [_item(index, value) for index, value in enumerate(texts)]


def _item(index: int, value: object) -> _Item:
    if isinstance(value, str):
        return (value, None, None)
    if isinstance(value, tuple | list) and len(value) == 2:
        return (value[0], value[1], None)
    raise InputError(f"texts[{index}] is a {type(value).__name__}; each text is a string or "
                     "a (text, text_pair) tuple")


def _frame_items(frame: pd.DataFrame) -> list[_Item]:
    if "text" not in frame.columns:
        names = ", ".join(map(str, frame.columns))
        raise InputError(f"the DataFrame has no column 'text' (columns: {names}); rename the "
                         "text column to 'text' (and optionally 'text_pair', 'id')")
    none = [None] * len(frame)

    def column(name: str) -> list:
        return [_missing_as_none(v) for v in frame[name]] if name in frame.columns else none

    return list(zip(column("text"), column("text_pair"), column("id"), strict=True))


def _missing_as_none(value: object) -> object:
    """None for a missing value (None, NaN, pandas NA), else the value."""
    if isinstance(value, str) or value is None:
        return value
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):  # not a scalar: left for the type check to name
        return value


def _document(index: int, text: object, pair: object, given_id: object,
              default_id: str) -> Document:
    """The input rule, naming ``texts[index]``: a string text with content, a string pair or
    none (blank is none), an id (any value but an empty one; else ``default_id``)."""
    where = f"texts[{index}]"
    if not isinstance(text, str):
        what = "missing" if text is None else f"a {type(text).__name__}, not a string"
        raise InputError(f"{where}: the text is {what}")
    if pair is not None and not isinstance(pair, str):
        raise InputError(f"{where}: text_pair is a {type(pair).__name__}, not a string")
    doc_id = str(given_id) if given_id not in (None, "") else default_id
    try:
        return Document(doc_id, text, pair, source=SOURCE, source_line=index)
    except BlankText:
        raise InputError(f"{where}: the text is empty; every text needs content") from None
