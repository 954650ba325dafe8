"""The shard plan: which documents make up which output shard, the same for every engine.

A shard closes once it holds ``shard_tokens`` tokens, or once the rows its documents add to
the shard's tables (estimated before anything runs, :class:`RowBytes`) reach the shard's
share of the memory budget; a document that would take an open shard past that share starts
a new one, so only a document larger than the share on its own makes a larger shard
(:class:`ShardRule`). Input files are grouped into *read units*: runs of consecutive files
holding at least ``shard_tokens`` tokens (a large file is a unit of its own, small files are
packed together). Within a unit, whole documents fill shards by the rule; a shard never
crosses the end of a unit. The survey fixes the plan before anything is written, so the local
engine (one unit after another), the Ray engine (one read task per unit) and a job over
documents in memory (one unit) write the same shards, and either engine can resume a job the
other started.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import ConfigError
from pipelines.text.inputs import Columns, InputError, read_documents
from pipelines.text.tokenize import Document, Window, Windower


@dataclass(frozen=True)
class ReadUnit:
    """Consecutive input files that one task reads, and the shards they fill."""

    files: tuple[Path, ...]
    first_shard: int
    n_shards: int
    first_doc: int  # corpus index of the unit's first document
    tokens: int

    @property
    def shard_indices(self) -> range:
        return range(self.first_shard, self.first_shard + self.n_shards)


@dataclass
class Shard:
    """Whole documents and their windows: one part file per table."""

    index: int
    first_doc: int  # corpus index of the shard's first document
    docs: list[Document] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(w.n_tokens for w in self.windows)

    def following(self) -> Shard:
        """The next shard, empty: it starts after this one's documents."""
        return Shard(self.index + 1, self.first_doc + len(self.docs))


def kept_pairs(n: int, causal: bool, top_k: int | None = None) -> int:
    """(query, key) pairs of one head of an ``n``-token window that a job keeps: every pair
    a query sees (all n², or n(n + 1)/2 when causal), or at most ``top_k`` per query."""
    visible = n * (n + 1) // 2 if causal else n * n
    return visible if top_k is None else min(visible, n * top_k)


@dataclass(frozen=True)
class RowBytes:
    """Uncompressed bytes the rows of one window add to a shard's tables, before they run.

    ``pair`` per (query, key) pair kept (:func:`kept_pairs`, summed over layers, heads and
    the tables that keep pairs), ``token`` per token and ``window`` per window. Built from a
    job's settings by ``pipelines.jobs.sizing.row_bytes``.
    """

    pair: int = 0
    token: int = 0
    window: int = 0
    causal: bool = False
    top_k: int | None = None  # at most this many pairs per query; None: every visible pair

    def of_window(self, n: int) -> int:
        pairs = kept_pairs(n, self.causal, self.top_k) if self.pair else 0
        return self.pair * pairs + self.token * n + self.window

    def of_document(self, lengths: Iterable[int]) -> int:
        """The bytes of a document whose windows have ``lengths`` tokens."""
        return sum(self.of_window(n) for n in lengths)


@dataclass(frozen=True)
class ShardRule:
    """When a shard of whole documents closes; every engine plans its shards by this rule.

    A shard closes once it holds ``tokens`` tokens or ``max_bytes`` estimated bytes of rows
    (``sizes`` estimates a document's; without it, or with ``max_bytes`` infinite, shards
    close on tokens alone). A document that would take an open shard past ``max_bytes``
    starts a new shard instead, so a shard exceeds ``max_bytes`` only when one document
    does, and then holds that document alone.
    """

    tokens: int
    max_bytes: float = math.inf
    sizes: RowBytes | None = None

    def document_bytes(self, lengths: Iterable[int]) -> int:
        """The estimated bytes of the rows of a document whose windows have ``lengths``
        tokens (0 without ``sizes``)."""
        return self.sizes.of_document(lengths) if self.sizes is not None else 0

    def starts_new(self, open_tokens: int, open_bytes: int, doc_bytes: int) -> bool:
        """Whether a document of ``doc_bytes`` must start a new shard: the open one holds
        documents (``open_tokens`` > 0) and would pass ``max_bytes`` with it."""
        return open_tokens > 0 and open_bytes + doc_bytes > self.max_bytes

    def closes(self, tokens: int, nbytes: int) -> bool:
        """Whether a shard of ``tokens`` tokens and ``nbytes`` bytes is full."""
        return tokens >= self.tokens or nbytes >= self.max_bytes


@dataclass
class PlanBuilder:
    """Builds the read units from the survey's per-document tokens and bytes, file by file."""

    rule: ShardRule
    units: list[ReadUnit] = field(default_factory=list)
    docs: int = 0  # documents seen so far
    largest_shard_bytes: int = 0  # the estimated bytes of the largest shard so far
    _files: list[Path] = field(default_factory=list)
    _unit_first_doc: int = 0
    _unit_tokens: int = 0
    _closed_shards: int = 0  # of the open unit
    _open_shard_tokens: int = 0
    _open_shard_bytes: int = 0

    def add_document(self, tokens: int, nbytes: int = 0) -> None:
        """Add the next document: its tokens and the estimated bytes of its rows."""
        if self.rule.starts_new(self._open_shard_tokens, self._open_shard_bytes, nbytes):
            self._close_shard()
        self.docs += 1
        self._unit_tokens += tokens
        self._open_shard_tokens += tokens
        self._open_shard_bytes += nbytes
        if self.rule.closes(self._open_shard_tokens, self._open_shard_bytes):
            self._close_shard()

    def end_file(self, path: Path) -> None:
        self._files.append(path)
        if self._unit_tokens >= self.rule.tokens:
            self._close_unit()

    def finish(self) -> list[ReadUnit]:
        if self._files:
            self._close_unit()
        return self.units

    def _close_shard(self) -> None:
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._open_shard_bytes)
        self._closed_shards += 1
        self._open_shard_tokens = self._open_shard_bytes = 0

    def _close_unit(self) -> None:
        if self._open_shard_tokens:
            self._close_shard()
        first_shard = self.units[-1].shard_indices.stop if self.units else 0
        self.units.append(ReadUnit(tuple(self._files), first_shard, self._closed_shards,
                                   self._unit_first_doc, self._unit_tokens))
        self._files, self._unit_first_doc = [], self.docs
        self._unit_tokens = self._closed_shards = 0


@contextmanager
def _located(doc: Document) -> Iterator[None]:
    """A ConfigError of cutting ``doc`` as an InputError naming its file and line."""
    try:
        yield
    except ConfigError as exc:
        raise InputError(f"{doc.source}:{doc.source_line}: {exc}") from None


def document_windows(windower: Windower, doc: Document) -> list[Window]:
    """The windows of ``doc``, or an InputError naming its file and line."""
    with _located(doc):
        return windower.windows(doc)


def document_window_lengths(windower: Windower, doc: Document) -> list[int]:
    """The tokens of each window of ``doc`` (as :func:`document_windows` would cut it), or the
    same InputError."""
    with _located(doc):
        return windower.window_lengths(doc)


def fill_shards(docs: Iterable[Document], windower: Windower, rule: ShardRule,
                first_shard: int = 0, first_doc: int = 0) -> Iterator[Shard]:
    """Whole documents into shards, closed by ``rule``."""
    windowed = ((doc, document_windows(windower, doc)) for doc in docs)
    return pack_shards(windowed, rule, first_shard, first_doc)


def pack_shards(windowed: Iterable[tuple[Document, list[Window]]], rule: ShardRule,
                first_shard: int = 0, first_doc: int = 0) -> Iterator[Shard]:
    """:func:`fill_shards` for documents already cut into windows (in document order)."""
    shard, tokens, nbytes = Shard(first_shard, first_doc), 0, 0
    for doc, windows in windowed:
        doc_bytes = rule.document_bytes(w.n_tokens for w in windows)
        if rule.starts_new(tokens, nbytes, doc_bytes):
            yield shard
            shard, tokens, nbytes = shard.following(), 0, 0
        shard.docs.append(doc)
        shard.windows.extend(windows)
        tokens += sum(w.n_tokens for w in windows)
        nbytes += doc_bytes
        if rule.closes(tokens, nbytes):
            yield shard
            shard, tokens, nbytes = shard.following(), 0, 0
    if shard.docs:
        yield shard


def unit_shards(unit: ReadUnit, columns: Columns, windower: Windower,
                rule: ShardRule) -> Iterator[Shard]:
    """Read a unit's files and yield its shards, exactly as the survey planned them."""
    end = unit.first_shard
    for shard in fill_shards(read_documents(list(unit.files), columns), windower, rule,
                             unit.first_shard, unit.first_doc):
        end = shard.index + 1
        if end > unit.shard_indices.stop:
            break
        yield shard
    if end != unit.shard_indices.stop:
        raise InputError(f"{', '.join(map(str, unit.files))} changed while the job was running "
                         "(its shards differ from the survey); run the job again")
