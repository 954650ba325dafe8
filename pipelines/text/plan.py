"""The shard plan: which documents make up which output shard, the same for every engine.

Input files are grouped into *read units*: runs of consecutive files holding at least
``shard_tokens`` tokens (a large file is a unit of its own, small files are packed together).
Within a unit, whole documents fill shards of about ``shard_tokens`` tokens; a shard never
crosses the end of a unit. The survey fixes the plan before anything is written, so the local
engine (one unit after another) and the Ray engine (one read task per unit) write the same
shards, and either can resume a job the other started.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


@dataclass
class PlanBuilder:
    """Builds the read units from the survey's per-document token counts, file by file."""

    shard_tokens: int
    units: list[ReadUnit] = field(default_factory=list)
    docs: int = 0  # documents seen so far
    _files: list[Path] = field(default_factory=list)
    _unit_first_doc: int = 0
    _unit_tokens: int = 0
    _closed_shards: int = 0  # of the open unit
    _open_shard_tokens: int = 0

    def add_document(self, tokens: int) -> None:
        self.docs += 1
        self._unit_tokens += tokens
        self._open_shard_tokens += tokens
        if self._open_shard_tokens >= self.shard_tokens:
            self._closed_shards, self._open_shard_tokens = self._closed_shards + 1, 0

    def end_file(self, path: Path) -> None:
        self._files.append(path)
        if self._unit_tokens >= self.shard_tokens:
            self._close_unit()

    def finish(self) -> list[ReadUnit]:
        if self._files:
            self._close_unit()
        return self.units

    def _close_unit(self) -> None:
        shards = self._closed_shards + (1 if self._open_shard_tokens else 0)
        first_shard = self.units[-1].shard_indices.stop if self.units else 0
        self.units.append(ReadUnit(tuple(self._files), first_shard, shards,
                                   self._unit_first_doc, self._unit_tokens))
        self._files, self._unit_first_doc = [], self.docs
        self._unit_tokens = self._closed_shards = self._open_shard_tokens = 0


def document_windows(windower: Windower, doc: Document) -> list[Window]:
    """The windows of ``doc``, or an InputError naming its file and line."""
    try:
        return windower.windows(doc)
    except ConfigError as exc:
        raise InputError(f"{doc.source}:{doc.source_line}: {exc}") from None


def fill_shards(docs: Iterable[Document], windower: Windower, shard_tokens: int,
                first_shard: int = 0, first_doc: int = 0) -> Iterator[Shard]:
    """Whole documents into shards that close once they hold ``shard_tokens`` tokens."""
    windowed = ((doc, document_windows(windower, doc)) for doc in docs)
    return pack_shards(windowed, shard_tokens, first_shard, first_doc)


def pack_shards(windowed: Iterable[tuple[Document, list[Window]]], shard_tokens: int,
                first_shard: int = 0, first_doc: int = 0) -> Iterator[Shard]:
    """:func:`fill_shards` for documents already cut into windows (in document order)."""
    shard = Shard(first_shard, first_doc)
    for doc, windows in windowed:
        shard.docs.append(doc)
        shard.windows.extend(windows)
        if shard.tokens >= shard_tokens:
            yield shard
            shard = Shard(shard.index + 1, shard.first_doc + len(shard.docs))
    if shard.docs:
        yield shard


def unit_shards(unit: ReadUnit, columns: Columns, windower: Windower,
                shard_tokens: int) -> Iterator[Shard]:
    """Read a unit's files and yield its shards, exactly as the survey planned them."""
    end = unit.first_shard
    for shard in fill_shards(read_documents(list(unit.files), columns), windower, shard_tokens,
                             unit.first_shard, unit.first_doc):
        end = shard.index + 1
        if end > unit.shard_indices.stop:
            break
        yield shard
    if end != unit.shard_indices.stop:
        raise InputError(f"{', '.join(map(str, unit.files))} changed while the job was running "
                         "(its shards differ from the survey); run the job again")
