"""Read documents from .txt, .jsonl, .csv and .parquet files (or folders of them).

Readers stream, so memory does not grow with the corpus. Every problem is an ``InputError``
that names the file and line to fix; nothing is skipped silently (blank lines of a .txt file
are the only thing skipped, and they are counted). A byte-order mark (U+FEFF, as "CSV UTF-8"
exports write) at the start of a line (of a file, or of files concatenated into one) or of a
field name is not part of it; texts follow the input rule of ``pipelines.text.tokenize``
(``Document``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.text.tokenize import BlankText, Document, is_blank, strip_bom

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


class InputError(ValueError):
    """Bad input: the message names the file and line."""


@dataclass(frozen=True)
class Columns:
    """Field names for structured inputs (.jsonl, .csv, .parquet)."""

    text: str = "text"
    id: str = "id"
    text_pair: str = "text_pair"


@dataclass
class InputSummary:
    """What a validation pass saw; goes into the manifest."""

    files: list[dict] = field(default_factory=list)
    documents: int = 0
    characters: int = 0
    skipped_blank_lines: int = 0

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.files, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def expand(paths: list[str | Path]) -> list[Path]:
    """Files named directly, plus the supported files of named folders (sorted)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise InputError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
            out.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise InputError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
            out.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return out


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` with the byte-order marks they start with removed."""
    for line in lines:
        yield strip_bom(line)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) with a clear error on undecodable bytes; the
    byte-order marks a line starts with are removed."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                yield number, strip_bom(line)
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: bytes that are not UTF-8 at column {exc.start + 1}; "
                    "re-encode the file as UTF-8"
                ) from None


def _text(value: object, path: Path, line: int, name: str, required: bool) -> str | None:
    """A string; an optional field may be missing (no pair). Blank text is ``_record``'s."""
    if not required and value is None:
        return None
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise InputError(f"{path}:{line}: field {name!r} is {what}")
    return value


def _record(row: dict, path: Path, line: int, columns: Columns) -> Document:
    row = {strip_bom(str(name)): value for name, value in row.items()}
    text = _text(row.get(columns.text), path, line, columns.text, True)
    assert text is not None  # a required field is a string or an InputError
    pair = _text(row.get(columns.text_pair), path, line, columns.text_pair, False)
    raw_id = row.get(columns.id)
    doc_id = str(raw_id) if raw_id not in (None, "") else f"{path.name}:{line}"
    try:  # the input rule: a blank pair is no pair, a blank text an error
        return Document(doc_id, text, pair, source=str(path), source_line=line)
    except BlankText:
        raise InputError(f"{path}:{line}: field {columns.text!r} is empty") from None


def _read_txt(path: Path, columns: Columns, summary: InputSummary) -> Iterator[Document]:
    for number, line in _lines(path):
        if is_blank(line):
            summary.skipped_blank_lines += 1
            continue
        yield Document(f"{path.name}:{number}", line, None, source=str(path), source_line=number)


def _read_jsonl(path: Path, columns: Columns, summary: InputSummary) -> Iterator[Document]:
    for number, line in _lines(path):
        if not line.strip():
            summary.skipped_blank_lines += 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") \
                from None
        if not isinstance(row, dict):
            raise InputError(
                f"{path}:{number}: expected a JSON object with a {columns.text!r} field"
            )
        yield _record(row, path, number, columns)


def _require_columns(path: Path, present: list[str], columns: Columns) -> None:
    if columns.text not in present:
        raise InputError(
            f"{path}: no column {columns.text!r} (columns: {', '.join(present)}); "
            "name the text column with --text-column"
        )


def _read_csv(path: Path, columns: Columns, summary: InputSummary) -> Iterator[Document]:
    for _ in _lines(path):  # fails with the line number on bytes that are not UTF-8
        pass
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(_without_bom(handle))
        if reader.fieldnames is None:
            raise InputError(f"{path}: empty CSV file (no header line)")
        _require_columns(path, list(reader.fieldnames), columns)
        start = reader.line_num + 1  # a record may span lines (quoted line breaks)
        for row in reader:
            yield _record(row, path, start, columns)
            start = reader.line_num + 1


def _read_parquet(path: Path, columns: Columns, summary: InputSummary) -> Iterator[Document]:
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    names = handle.schema_arrow.names
    _require_columns(path, [strip_bom(name) for name in names], columns)
    fields = (columns.text, columns.id, columns.text_pair)
    wanted = [name for name in names if strip_bom(name) in fields]
    row_number = 0
    for batch in handle.iter_batches(columns=wanted, batch_size=4096):
        for row in batch.to_pylist():
            row_number += 1
            yield _record(row, path, row_number, columns)


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv,
           ".parquet": _read_parquet}


def read_documents(files: list[Path], columns: Columns = Columns(),
                   summary: InputSummary | None = None) -> Iterator[Document]:
    """Stream documents from ``files`` in order."""
    summary = summary or InputSummary()
    for path in files:
        yield from READERS[path.suffix](path, columns, summary)


def validate(files: list[Path], columns: Columns = Columns()) -> InputSummary:
    """Read everything once: count documents, check ids are unique, fail on the first problem."""
    summary = InputSummary()
    seen: dict[str, str] = {}
    for path in files:
        before = summary.documents
        for doc in READERS[path.suffix](path, columns, summary):
            where = f"{doc.source}:{doc.source_line}"
            if doc.doc_id in seen:
                first = seen[doc.doc_id]
                raise InputError(f"{where}: duplicate id {doc.doc_id!r} (first at {first})")
            seen[doc.doc_id] = where
            summary.documents += 1
            summary.characters += len(doc.text) + len(doc.text_pair or "")
        if summary.documents == before:
            raise InputError(f"{path}: no documents (the file is empty)")
        stat = path.stat()
        summary.files.append({"path": str(path.resolve()), "bytes": stat.st_size,
                              "sha256": _sha256(path), "documents": summary.documents - before})
    return summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
