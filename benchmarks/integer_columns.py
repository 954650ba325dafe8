"""What signed integer columns cost: one `full` attention table written three ways, one run.

A real job (MiniLM on the CPU, attention ``full``: every weight of every head) over
``--windows`` windows of ``--tokens`` tokens of demo prose writes the attention table; its rows
are then written with headscope's own Parquet writer (zstd, the table's row groups) three ways:

- format 1: unsigned, ``layer``/``head`` uint8, ``window``/``query``/``key`` uint16;
- format 2: signed, every one int32 (what headscope writes);
- int16 layer/head: the alternative format 2 did not take (torch cannot index with int16).

For each it prints the Parquet size and the in-memory pandas size (``pd.read_parquet``,
``memory_usage(deep=True)``, whole frame and integer columns alone) against format 1's, and
the mean |key - query| computed the way users write it, ``(att.key - att.query).abs().mean()``,
against the int64 truth. It reports and never asserts. ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from smoke import parse_args_with_smoke

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset.schema import CORE_TABLE_SPECS
from pipelines.dataset.writer import atomic_write_parquet
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.local import run_job

INTEGERS = ("window", "layer", "head", "query", "key")
VARIANTS = {
    "format 1 (unsigned)": {"window": pa.uint16(), "layer": pa.uint8(), "head": pa.uint8(),
                            "query": pa.uint16(), "key": pa.uint16()},
    "format 2 (int32)": dict.fromkeys(INTEGERS, pa.int32()),
    "int16 layer/head": {"window": pa.int32(), "layer": pa.int16(), "head": pa.int16(),
                         "query": pa.int32(), "key": pa.int32()},
}
#: --smoke: a tiny input, the same code path (a few seconds)
SMOKE = {"windows": 2, "tokens": 64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="windows (default 4)")
    parser.add_argument("--tokens", type=int, default=256,
                        help="tokens per window, special tokens included (default 256)")
    return parse_args_with_smoke(parser, argv, SMOKE)


def corpus(path: Path, windows: int, tokens: int) -> Path:
    """``windows`` documents of demo paragraphs, each long enough to fill ``tokens`` tokens."""
    rows, text = [], ""
    for paragraph in paragraphs():
        text = f"{text} {paragraph['text']}".strip()
        if len(text) >= 8 * tokens:  # well over ``tokens`` tokens: truncation fills the window
            rows.append({"id": f"doc{len(rows)}", "text": text})
            text = ""
            if len(rows) == windows:
                break
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def attention_table(work: Path, args: argparse.Namespace) -> pa.Table:
    """The attention table of a real ``full`` job (format 2 types)."""
    config = RunConfig(device="cpu", attention=AttentionMode.parse("full"),
                       windows=WindowConfig(max_length=args.tokens, truncate=True))
    result = run_job([corpus(work / "corpus.jsonl", args.windows, args.tokens)],
                     work / "ds", config, backend=TorchBackend("minilm", "cpu"), progress=False)
    table = pq.read_table(work / "ds" / "attention")
    print(f"minilm, attention full: {result.windows} windows, {result.tokens:,} tokens, "
          f"{table.num_rows:,} attention rows")
    return table


def measure(table: pa.Table, types: dict[str, pa.DataType], path: Path) -> dict[str, float]:
    """Parquet bytes, pandas bytes (all, integers) and the users' mean |key - query|."""
    fields = [field.with_type(types.get(field.name, field.type)) for field in table.schema]
    atomic_write_parquet(path, table.cast(pa.schema(fields)),
                         CORE_TABLE_SPECS["attention"].row_group_rows)
    frame = pd.read_parquet(path)
    memory = frame.memory_usage(deep=True, index=False)
    return {"parquet": path.stat().st_size, "memory": memory.sum(),
            "integers": memory[list(INTEGERS)].sum(),
            "distance": (frame["key"] - frame["query"]).abs().mean()}


def report(table: pa.Table, found: dict[str, dict[str, float]]) -> None:
    key, query = (table[name].to_numpy().astype(np.int64) for name in ("key", "query"))
    truth = np.abs(key - query).mean()
    base = found["format 1 (unsigned)"]
    print(f"  {'types':22s} {'Parquet MB':>10s} {'ratio':>6s} {'pandas MB':>10s} {'ratio':>6s}"
          f" {'int cols MB':>11s} {'ratio':>6s} {'mean |key-query|':>17s}")
    for name, got in found.items():
        print(f"  {name:22s} {got['parquet'] / 1e6:10.2f} {got['parquet'] / base['parquet']:6.3f}"
              f" {got['memory'] / 1e6:10.1f} {got['memory'] / base['memory']:6.3f}"
              f" {got['integers'] / 1e6:11.1f} {got['integers'] / base['integers']:6.3f}"
              f" {got['distance']:17.4f}")
    print(f"  mean |key - query| in int64 (the truth): {truth:.4f}; ratios are against "
          "format 1 in the same run")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headscope-integers-") as tmp:
        work = Path(tmp)
        table = attention_table(work, args)
        found = {name: measure(table, types, work / f"variant-{index}.parquet")
                 for index, (name, types) in enumerate(VARIANTS.items())}
        report(table, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
