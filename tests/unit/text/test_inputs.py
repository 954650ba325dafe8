"""Input readers: every format, folder expansion, and errors that name the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.text.inputs import Columns, InputError, expand, read_documents, validate
from pipelines.text.tokenize import Document

DEFAULT = Columns()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_all(*paths: Path, columns: Columns = DEFAULT) -> list[Document]:
    return list(read_documents(expand(list(paths)), columns))


def error_of(*paths: Path, columns: Columns = DEFAULT) -> str:
    """The message of the InputError raised by expanding and validating ``paths``."""
    with pytest.raises(InputError) as info:
        validate(expand(list(paths)), columns)
    return str(info.value)


# --- formats ---------------------------------------------------------------------------------


def test_txt_one_document_per_line_blank_lines_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \nsecond line\r\nthird\n", encoding="utf-8")
    docs = read_all(path)
    assert docs == [
        Document("corpus.txt:1", "first line", None, str(path), 1),
        Document("corpus.txt:4", "second line", None, str(path), 4),
        Document("corpus.txt:5", "third", None, str(path), 5),
    ]
    summary = validate([path])
    assert (summary.documents, summary.skipped_blank_lines) == (3, 2)
    assert summary.characters == len("first line") + len("second line") + len("third")
    assert summary.files[0]["documents"] == 3
    assert summary.files[0]["path"] == str(path.resolve())


def test_jsonl_ids_given_or_generated_and_text_pair(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"id": "a", "text": "Alpha text."},
        {"text": "No id here.", "text_pair": "A second text."},
        {"id": 7, "text": "Numeric id."},
        {"id": "", "text": "Empty id falls back."},
    ])
    docs = read_all(path)
    assert docs == [
        Document("a", "Alpha text.", None, str(path), 1),
        Document("data.jsonl:2", "No id here.", "A second text.", str(path), 2),
        Document("7", "Numeric id.", None, str(path), 3),
        Document("data.jsonl:4", "Empty id falls back.", None, str(path), 4),
    ]


def test_jsonl_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert [(d.doc_id, d.source_line) for d in read_all(path)] == [
        ("gaps.jsonl:1", 1), ("gaps.jsonl:3", 3)]
    assert validate([path]).skipped_blank_lines == 1


def test_csv_default_columns(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text('id,text,text_pair\nx1,"Hello, world.",Second part.\n,Plain row.,Pair two.\n',
                    encoding="utf-8")
    assert read_all(path) == [
        Document("x1", "Hello, world.", "Second part.", str(path), 2),
        Document("table.csv:3", "Plain row.", "Pair two.", str(path), 3),
    ]


def test_csv_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "custom.csv"
    path.write_text("key,body,other,extra\nk1,Body one.,Other one.,ignored\n", encoding="utf-8")
    columns = Columns(text="body", id="key", text_pair="other")
    assert read_all(path, columns=columns) == [
        Document("k1", "Body one.", "Other one.", str(path), 2)]


def test_csv_multiline_quoted_field_keeps_its_newline(tmp_path: Path) -> None:
    """A quoted CSV field may span lines; the reader must keep the line break in the text."""
    path = tmp_path / "multi.csv"
    path.write_text('id,text\na,"line one\nline two"\nb,plain\n', encoding="utf-8")
    docs = read_all(path)
    assert [d.text for d in docs] == ["line one\nline two", "plain"]


def test_parquet_default_and_custom_columns(tmp_path: Path) -> None:
    default = tmp_path / "default.parquet"
    pq.write_table(pa.table({"text": ["P one.", "P two."], "id": ["p1", None],
                             "text_pair": [None, "Pair."]}), default)
    assert read_all(default) == [
        Document("p1", "P one.", None, str(default), 1),
        Document("default.parquet:2", "P two.", "Pair.", str(default), 2),
    ]
    custom = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"body": ["C one."], "key": [42], "second": ["C pair."]}), custom)
    columns = Columns(text="body", id="key", text_pair="second")
    assert read_all(custom, columns=columns) == [
        Document("42", "C one.", "C pair.", str(custom), 1)]


def test_folder_expands_to_supported_files_sorted(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("from b\n", encoding="utf-8")
    write_jsonl(folder / "a.jsonl", [{"text": "from a"}])
    (folder / "notes.md").write_text("not an input\n", encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text("nested, not read\n", encoding="utf-8")
    single = tmp_path / "single.txt"
    single.write_text("single\n", encoding="utf-8")
    assert expand([folder, single]) == [folder / "a.jsonl", folder / "b.txt", single]
    docs = read_all(folder, single)
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.jsonl:1", "from a"), ("b.txt:1", "from b"), ("single.txt:1", "single")]
    summary = validate(expand([folder, single]))
    assert [f["documents"] for f in summary.files] == [1, 1, 1]
    assert summary.documents == 3


def test_fingerprint_follows_file_content(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("one\n", encoding="utf-8")
    first = validate([path]).fingerprint
    assert validate([path]).fingerprint == first
    path.write_text("two\n", encoding="utf-8")
    assert validate([path]).fingerprint != first


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.csv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    message = error_of(path)
    assert str(path) in message
    assert "empty" in message


def test_only_blank_lines_counts_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    assert str(path) in error_of(path)


def test_empty_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    message = error_of(path)
    assert str(path) in message
    assert "empty" in message


def test_csv_missing_text_column(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("id,body\n1,hello\n", encoding="utf-8")
    message = error_of(path)
    assert str(path) in message
    assert "'text'" in message and "body" in message


def test_csv_custom_text_column_missing(tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("id,text\n1,hello\n", encoding="utf-8")
    message = error_of(path, columns=Columns(text="content"))
    assert str(path) in message and "'content'" in message


def test_parquet_missing_text_column(tmp_path: Path) -> None:
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"body": ["hello"]}), path)
    message = error_of(path)
    assert str(path) in message
    assert "'text'" in message and "body" in message


def test_invalid_json_names_line_3(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n',
                    encoding="utf-8")
    message = error_of(path)
    assert f"{path}:3:" in message
    assert "invalid JSON" in message


@pytest.mark.parametrize("line", ['["a list"]', '"just a string"', "42", "null"])
def test_json_line_that_is_not_an_object(tmp_path: Path, line: str) -> None:
    path = tmp_path / "scalar.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    message = error_of(path)
    assert f"{path}:2:" in message
    assert "JSON object" in message


@pytest.mark.parametrize("row", [{"text": ""}, {"text": "   "}])
def test_empty_text_field(tmp_path: Path, row: dict) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": "fine"}, row])
    message = error_of(path)
    assert f"{path}:2:" in message
    assert "empty" in message


@pytest.mark.parametrize("pair", ["", " ", None])
def test_empty_text_pair_means_no_pair(tmp_path: Path, pair: str | None) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "fine", "text_pair": pair}])
    (doc,) = read_documents([path])
    assert doc.text == "fine" and doc.text_pair is None


def test_empty_text_cell_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "cells.csv"
    path.write_text("id,text\na,fine\nb,\n", encoding="utf-8")
    message = error_of(path)
    assert f"{path}:3:" in message and "empty" in message


@pytest.mark.parametrize(("row", "what"), [
    ({"text": 5}, "int"), ({"text": ["a"]}, "list"), ({"text": None}, "missing"),
    ({"id": "no text"}, "missing"), ({"text": "ok", "text_pair": 3.5}, "float"),
])
def test_non_string_or_missing_text(tmp_path: Path, row: dict, what: str) -> None:
    path = write_jsonl(tmp_path / "types.jsonl", [{"text": "fine"}, {"text": "fine too"}, row])
    message = error_of(path)
    assert f"{path}:3:" in message
    assert what in message


def test_non_string_text_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    message = error_of(path)
    assert f"{path}:1:" in message and "int" in message


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_undecodable_bytes_on_line_2(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin{suffix}"
    lines = {".txt": [b"good line", b"bad \xff\xfe line", b"after"],
             ".jsonl": [b'{"text": "good"}', b'{"text": "bad \xff\xfe"}', b'{"text": "after"}'],
             ".csv": [b"text", b"bad \xff\xfe cell", b"after"]}[suffix]
    path.write_bytes(b"\n".join(lines) + b"\n")
    message = error_of(path)
    assert f"{path}:2:" in message
    assert "UTF-8" in message


def test_duplicate_ids_across_two_files(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "one.jsonl",
                        [{"id": "x", "text": "a"}, {"id": "y", "text": "b"}])
    second = write_jsonl(tmp_path / "two.jsonl",
                         [{"id": "z", "text": "c"}, {"id": "y", "text": "d"}])
    message = error_of(first, second)
    assert f"{second}:2:" in message
    assert "duplicate id 'y'" in message
    assert f"{first}:2" in message


def test_duplicate_ids_within_one_csv(tmp_path: Path) -> None:
    path = tmp_path / "dups.csv"
    path.write_text("id,text\nq,one\nr,two\nq,three\n", encoding="utf-8")
    message = error_of(path)
    assert f"{path}:4:" in message and "'q'" in message and f"{path}:2" in message


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("# hello\n", encoding="utf-8")
    with pytest.raises(InputError, match="unsupported file type") as info:
        expand([path])
    assert str(path) in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(InputError, match="no such file or folder") as info:
        expand([path])
    assert str(path) in str(info.value)


def test_folder_without_supported_files(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x\n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no") as info:
        expand([tmp_path])
    assert str(tmp_path) in str(info.value)


def test_broken_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    message = error_of(path)
    assert str(path) in message and "Parquet" in message


# --- the input rule: byte-order marks, blank pairs (pipelines.text.tokenize.Document) ---------

BOM = b"\xef\xbb\xbf"


def test_bom_of_a_csv_utf8_export_is_not_part_of_the_header(tmp_path: Path) -> None:
    """What spreadsheet programs write as "CSV UTF-8": the mark must not hide 'text'."""
    path = tmp_path / "b.csv"
    path.write_bytes(BOM + b"text,id\nThe cat sat.,r1\n")
    assert read_all(path) == [Document("r1", "The cat sat.", None, str(path), 2)]
    assert validate([path]).documents == 1


@pytest.mark.parametrize(("name", "content", "want"), [
    ("b.jsonl", b'{"id": "j", "text": "Hi"}\n{"id": "k", "text": "Ho"}\n', ["Hi", "Ho"]),
    ("b.txt", b"First line.\nSecond line.\n", ["First line.", "Second line."]),
    ("crlf.csv", b"id,text\r\nc,Comma row.\r\n", ["Comma row."]),
])
def test_bom_at_the_start_of_a_file_is_dropped(tmp_path: Path, name: str, content: bytes,
                                               want: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes(BOM + content)
    docs = read_all(path)
    assert [doc.text for doc in docs] == want
    assert docs[0].source_line == (2 if name.endswith(".csv") else 1)


@pytest.mark.parametrize(("name", "content"), [
    ("cat.jsonl", b'{"id": "j", "text": "Hi"}\n' + BOM + b'{"id": "k", "text": "Ho"}\n'),
    ("cat.txt", b"Hi\n" + BOM + b"Ho\n"),
    ("cat.csv", b"id,text\nj,Hi\n" + BOM + b"k,Ho\n"),
])
def test_bom_starting_a_later_line_is_dropped(tmp_path: Path, name: str, content: bytes) -> None:
    """Files concatenated from several exports carry a mark where each one began."""
    path = tmp_path / name
    path.write_bytes(BOM + content)
    docs = read_all(path)
    assert [doc.text for doc in docs] == ["Hi", "Ho"]
    if name != "cat.txt":
        assert [doc.doc_id for doc in docs] == ["j", "k"]


def test_bom_in_field_names_is_dropped(tmp_path: Path) -> None:
    """A Parquet or JSON file made from a "CSV UTF-8" export keeps the mark in a name."""
    parquet_path = tmp_path / "marked.parquet"
    pq.write_table(pa.table({"\ufefftext": ["Parquet row."], "id": ["p"]}), parquet_path)
    jsonl_path = write_jsonl(tmp_path / "marked.jsonl", [{"\ufeffid": "j", "text": "Row."}])
    docs = read_all(parquet_path, jsonl_path)
    assert [(d.doc_id, d.text) for d in docs] == [("p", "Parquet row."), ("j", "Row.")]


def test_bom_at_the_start_of_a_text_or_pair_is_dropped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "marks.jsonl", [
        {"id": "a", "text": "\ufeffHello.", "text_pair": "\ufeff\ufeffWorld."},
        {"id": "b", "text": "Mid\ufeffword stays."}])
    assert [(d.text, d.text_pair) for d in read_all(path)] == [
        ("Hello.", "World."), ("Mid\ufeffword stays.", None)]


@pytest.mark.parametrize("text", ["\ufeff", "\ufeff  \t"])
def test_text_of_only_a_bom_is_empty(tmp_path: Path, text: str) -> None:
    path = write_jsonl(tmp_path / "bom-only.jsonl", [{"text": "fine"}, {"text": text}])
    message = error_of(path)
    assert f"{path}:2:" in message and "'text' is empty" in message


def test_txt_line_of_only_a_bom_is_a_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "marks.txt"
    path.write_bytes(BOM + b"\nreal text\n\xef\xbb\xbf \n")
    assert [(d.text, d.source_line) for d in read_all(path)] == [("real text", 2)]
    assert validate([path]).skipped_blank_lines == 2


@pytest.mark.parametrize("pair", ["", "  ", "\ufeff", "\t\n"])
def test_blank_pair_is_no_pair_in_csv_and_parquet(tmp_path: Path, pair: str) -> None:
    csv_path = tmp_path / "pairs.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([["id", "text", "text_pair"], ["a", "Hi there", pair]])
    parquet_path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"id": ["b"], "text": ["Hi there"], "text_pair": [pair]}),
                   parquet_path)
    assert [d.text_pair for d in read_all(csv_path, parquet_path)] == [None, None]
