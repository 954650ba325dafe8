"""One rule for every table headscope writes: integer columns are signed.

Unsigned columns made users' arithmetic wrap (``key - query`` in uint16, ``layer - 1`` at
layer 0) and torch took a uint8 column for a boolean mask. The rule is checked on every
registered table spec and on every Arrow schema or spec that any module of ``pipelines`` or
``service`` defines, so a new table cannot bring an unsigned column back.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

import pipelines
import service
from pipelines.analysis import registry
from pipelines.dataset import schema
from pipelines.dataset.manifest import DATASET_FORMAT, UNSIGNED_FORMATS, header
from pipelines.dataset.schema import TableSpec, signed_schema, unsigned_fields
from pipelines.dataset.writer import MANIFEST, DatasetWriter, OutputError, append_parts

#: Every option a table factory takes (``full``: float16 weights; ``head_dim``: qk vectors).
FACTORY_OPTIONS = ({"full": False, "head_dim": 8}, {"full": True, "head_dim": 64})
OLD_DATASET_FORMAT = "headscope-dataset/1"


def spec_schemas(name: str, spec: TableSpec) -> Iterator[tuple[str, pa.Schema]]:
    for options in FACTORY_OPTIONS:
        yield f"{name} {options}", spec.arrow_schema(**options)


def module_schemas(package: object) -> Iterator[tuple[str, pa.Schema]]:
    """Every Arrow schema, and every table spec's schemas, a module of ``package`` defines."""
    for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if module.name.endswith("__main__"):  # runs the CLI when imported
            continue
        for attr, value in vars(importlib.import_module(module.name)).items():
            where = f"{module.name}.{attr}"
            specs = value if isinstance(value, tuple | list) else (value,)
            if isinstance(value, pa.Schema):
                yield where, value
            elif specs and all(isinstance(spec, TableSpec) for spec in specs):
                for spec in specs:
                    yield from spec_schemas(f"{where}: {spec.name}", spec)


def every_schema() -> Iterator[tuple[str, pa.Schema]]:
    for name, spec in registry.table_specs().items():  # core tables and every analysis'
        yield from spec_schemas(name, spec)
    for package in (pipelines, service):  # ablation, factors, and any other writer
        yield from module_schemas(package)


def test_no_table_has_an_unsigned_integer_column() -> None:
    checked = dict(every_schema())
    unsigned = {where: unsigned_fields(found) for where, found in checked.items()
                if unsigned_fields(found)}
    assert unsigned == {}
    # the walk reached the writers outside the registry too
    assert {"pipelines.analysis.importance.HEAD_IMPORTANCE",
            "pipelines.jobs.factors.apply.FACTOR_ACTIVATIONS"} <= checked.keys()
    assert any(where.startswith("word_attention") for where in checked)


def test_the_rule_finds_unsigned_columns_nested_or_not() -> None:
    found = pa.schema([("layer", pa.uint8()), ("query", pa.int32()),
                       ("ids", pa.list_(pa.uint32(), 4)), ("name", pa.dictionary(pa.uint16(),
                                                                                  pa.string()))])
    assert unsigned_fields(found) == ["layer", "ids", "name"]
    assert unsigned_fields(schema.attention_schema(True)) == []


def test_layer_head_and_positions_are_int32_segment_int8() -> None:
    attention = schema.attention_schema(False)
    for name in ("window", "layer", "head", "query", "key"):
        assert attention.field(name).type == pa.int32(), name
    assert schema.TOKENS.field("segment").type == pa.int8()
    assert schema.TOKENS.field("token_id").type == pa.int32()


def test_signed_schema_maps_format_1_types() -> None:
    old = pa.schema([("doc_id", pa.string()), ("layer", pa.uint8()), ("query", pa.uint16()),
                     ("token_id", pa.uint32()), ("segment", pa.uint8()),
                     ("char_start", pa.int32()), ("weight", pa.float16())])
    assert signed_schema(old) == pa.schema([
        ("doc_id", pa.string()), ("layer", pa.int32()), ("query", pa.int32()),
        ("token_id", pa.int32()), ("segment", pa.int8()), ("char_start", pa.int32()),
        ("weight", pa.float16())])
    with pytest.raises(ValueError, match="'big'"):
        signed_schema(pa.schema([("big", pa.uint64())]))


# --- folders of the older format are never mixed with the new one -------------------------


def dataset_manifest(format: str = DATASET_FORMAT) -> dict:
    return {**header(format), "job_key": "k"}


def old_folder(root: Path) -> Path:
    root.mkdir()
    (root / MANIFEST).write_text(json.dumps(dataset_manifest(OLD_DATASET_FORMAT)))
    return root


def test_the_older_formats_read_as_the_current_ones() -> None:
    assert UNSIGNED_FORMATS[OLD_DATASET_FORMAT] == DATASET_FORMAT == "headscope-dataset/2"


def test_resume_refuses_a_folder_of_the_older_format(tmp_path: Path) -> None:
    root = old_folder(tmp_path / "ds")
    with pytest.raises(OutputError, match=r"cannot resume: it holds format "
                                          r"'headscope-dataset/1'.*'headscope-dataset/2'"):
        DatasetWriter(root).open(dataset_manifest(), resume=True)
    assert json.loads((root / MANIFEST).read_text())["format"] == OLD_DATASET_FORMAT


def test_append_refuses_a_folder_of_the_older_format(tmp_path: Path) -> None:
    root = old_folder(tmp_path / "store")
    table = schema.HEAD_STATS.empty_table()
    with pytest.raises(OutputError, match="cannot append to it.*headscope-dataset/1"):
        append_parts(root, "p1", {"head_stats": table}, dataset_manifest(),
                     {"head_stats": 65536})
    assert not (root / "head_stats").exists()
    append_parts(tmp_path / "new", "p1", {"head_stats": table}, dataset_manifest(),
                 {"head_stats": 65536})
    append_parts(tmp_path / "new", "p2", {"head_stats": table}, dataset_manifest(),
                 {"head_stats": 65536})  # the same format appends
    assert len(list((tmp_path / "new" / "head_stats").glob("part-*.parquet"))) == 2
