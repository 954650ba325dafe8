"""``headscope compare`` through the console script: MiniLM against its fine-tune and against
itself on paragraphs of the demo corpus, and the refusals (another tokenizer, an --out that
is taken, one --model only, a memory budget too small for model A's stacked layers).

Every command runs once, from one module fixture, two at a time; the tests then look at the
outcome they are about.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from compare_tables import assert_head_stats_equal
from conftest import CLI, Outcome, run_cli
from tolerances import EPS64

from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.stats import STAT_NAMES
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset import schema
from pipelines.dataset.reader import Dataset
from pipelines.jobs.demo import paragraphs
from pipelines.jobs.local import run_job

ROOT = Path(__file__).resolve().parents[2]
DOCS = 30
LAYERS, HEADS = 6, 12  # both MiniLMs
FAST = ["--device", "cpu", "--no-progress"]
DIFFS = [f"{name}_diff" for name in STAT_NAMES]


@dataclass
class World:
    tmp: Path
    corpus: Path
    results: dict[str, Outcome]

    def out(self, name: str) -> Path:
        return self.tmp / name

    def table(self, name: str, table: str = "head_compare") -> pd.DataFrame:
        return pd.read_parquet(self.out(name) / table)


def run_all(commands: dict[str, list[str]]) -> dict[str, Outcome]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(args: list[str]) -> Outcome:
        done = subprocess.run([*CLI, "compare", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        return Outcome(done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(2) as pool:  # two models per command already
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> World:
    tmp = tmp_path_factory.mktemp("compare")
    corpus = tmp / "demo.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in paragraphs()[:DOCS]),
                      encoding="utf-8")
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me", encoding="utf-8")
    inputs = [str(corpus), *FAST]
    commands = {
        "finetune": [*inputs, "--model", "minilm", "--model", "minilm-sre",
                     "--out", str(tmp / "finetune")],
        "self": [*inputs, "--model", "minilm", "--model", "minilm", "--out", str(tmp / "self")],
        "self_causal": [*inputs, "--model", str(gpt2_dir), "--model", str(gpt2_dir),
                        "--out", str(tmp / "self_causal")],
        "tokenizers": [*inputs, "--model", "minilm", "--model", str(gpt2_dir),
                       "--out", str(tmp / "tokenizers")],
        "taken": [*inputs, "--model", "minilm", "--model", "minilm-sre", "--out", str(taken)],
        "one_model": [*inputs, "--model", "minilm", "--out", str(tmp / "one_model")],
        "budget": [*inputs, "--model", "minilm", "--model", "minilm", "--memory-budget",
                   "64MiB", "--out", str(tmp / "budget")],
    }
    return World(tmp, corpus, run_all(commands))


def test_a_fine_tune_differs_from_its_base_model_head_by_head(world: World) -> None:
    result = world.results["finetune"]
    assert result.returncode == 0, result.stderr
    manifest = json.loads((world.out("finetune") / "manifest.json").read_text())
    assert manifest["format"] == "headscope-compare/1" and manifest["status"] == "complete"
    assert [manifest["models"][m]["name"] for m in "ab"] == ["minilm", "minilm-sre"]
    assert "Kovaleva" in manifest["reference"]
    windows = manifest["counts"]["windows"]
    assert windows >= DOCS

    summary = world.table("finetune", "head_compare_summary")
    assert len(summary) == LAYERS * HEADS
    assert list(zip(summary.layer, summary["head"], strict=True)) == \
        [(layer, head) for layer in range(LAYERS) for head in range(HEADS)]
    assert (summary.n_windows == windows).all()
    assert (summary.cosine_mean < 1).any() and (summary.js_distance_mean > 0).any()

    rows = world.table("finetune")
    assert len(rows) == windows * LAYERS * HEADS
    assert not rows.isna().any().any()
    assert (rows.cosine < 1).any() and (rows.js_distance > 0).any()
    # Cosine of non-negative maps is in [0, 1]; float64 may round a near-1 value up by
    # (2 log2(cells) + 3) eps64 at most (three pairwise sums, a product, sqrt, a division).
    assert rows.cosine.min() >= 0 and rows.cosine.max() <= 1 + 64 * EPS64
    # sqrt(JS) <= sqrt(ln 2), up to a few eps64 of rounding
    assert rows.js_distance.min() >= 0
    assert rows.js_distance.max() <= math.sqrt(math.log(2)) * (1 + 8 * EPS64)
    assert (rows[DIFFS] != 0).any().all()
    # the difference is B − A of the stored values (float64 holds it exactly)
    for name in STAT_NAMES:
        want = rows[f"{name}_b"].astype(np.float64) - rows[f"{name}_a"].astype(np.float64)
        assert (rows[f"{name}_diff"] == want).all(), name
    assert result.stdout.startswith(f"wrote {world.out('finetune')}")


def test_a_model_against_itself_is_exactly_one_and_zero(world: World) -> None:
    result = world.results["self"]
    assert result.returncode == 0, result.stderr
    rows, summary = world.table("self"), world.table("self", "head_compare_summary")
    # Bitwise: both copies run the same kernels on the identical padded batches, so their
    # maps and statistics are equal; then cosine is x / sqrt(x·x) == 1 and JS == 0 exactly
    # (pipelines.compute.compare), and means of 1s and 0s are 1 and 0.
    assert (rows.cosine == 1.0).all() and (rows.js_distance == 0.0).all()
    assert (rows[DIFFS] == 0.0).all().all()
    for name in STAT_NAMES:
        assert (rows[f"{name}_a"] == rows[f"{name}_b"]).all(), name
    assert (summary.cosine_mean == 1.0).all() and (summary.js_distance_mean == 0.0).all()
    assert (summary[[f"{d}_mean" for d in DIFFS]] == 0.0).all().all()


def test_a_causal_model_against_itself_is_exactly_one_and_zero(world: World) -> None:
    """The random GPT-2 test model: causal masks, and a statistic that is null (mass_sep:
    no separator token), whose difference is null too."""
    result = world.results["self_causal"]
    assert result.returncode == 0, result.stderr
    rows = world.table("self_causal")
    assert len(rows) and rows.layer.max() == 2 and rows["head"].max() == 3
    # Bitwise, as for MiniLM above.
    assert (rows.cosine == 1.0).all() and (rows.js_distance == 0.0).all()
    assert rows.mass_sep_diff.isna().all()
    for name in STAT_NAMES:  # null exactly where the statistic is, else 0
        diff = rows[f"{name}_diff"]
        assert (diff.isna() == rows[f"{name}_a"].isna()).all(), name
        assert (diff.dropna() == 0.0).all(), name
    summary = world.table("self_causal", "head_compare_summary")
    assert (summary.cosine_mean == 1.0).all() and (summary.js_distance_mean == 0.0).all()
    assert summary.mass_sep_diff_mean.isna().all()


def test_the_statistics_are_those_headscope_run_writes(world: World, minilm: TorchBackend,
                                                       tmp_path: Path) -> None:
    """Model A's columns against a corpus job of MiniLM on the same windows (the compare job
    cuts at the smaller model limit, 256 tokens, so the job does too)."""
    assert world.results["finetune"].returncode == 0
    config = RunConfig(model="minilm", device="cpu", attention=AttentionMode("none"),
                       windows=WindowConfig(max_length=256))
    run_job([world.corpus], tmp_path / "run", config, backend=minilm, progress=False)
    compared = pq.read_table(world.out("finetune") / "head_compare")
    columns = {key: compared[key] for key in ("doc_id", "window", "layer", "head")}
    columns.update({name: compared[f"{name}_a"] for name in STAT_NAMES})
    columns["n_tokens"] = compared["n_tokens"]
    # Other batches (compare holds every layer of a batch, so its batches are smaller): the
    # statistics round differently, within STAT_ATOL (assert_head_stats_equal's default).
    assert_head_stats_equal(pa.table(columns, schema=schema.HEAD_STATS),
                            pq.read_table(tmp_path / "run" / "head_stats"))


def test_models_with_other_tokenizers_are_refused(world: World) -> None:
    result = world.results["tokenizers"]
    assert result.returncode == 2, result.stderr
    assert len(result.error_lines) == 1, result.stderr
    message = result.error_lines[0]
    assert "do not share a tokenizer" in message
    assert "6 vs 3 layers" in message and "bidirectional vs causal" in message
    assert not world.out("tokenizers").exists()


def test_an_out_that_is_not_empty_is_refused(world: World) -> None:
    result = world.results["taken"]
    assert result.returncode == 2
    assert len(result.error_lines) == 1 and "not empty" in result.error_lines[0]
    assert "--resume" not in result.error_lines[0], "compare has no --resume"
    taken = world.out("taken")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert (taken / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_compare_takes_exactly_two_models(world: World) -> None:
    result = world.results["one_model"]
    assert result.returncode == 2
    assert result.error_lines == ["headscope: error: --model: give exactly two models, A then "
                                  "B (got 1)"]
    assert not world.out("one_model").exists()


def test_a_window_too_long_for_the_memory_budget_is_refused(world: World) -> None:
    """64 MiB leaves 12 MiB of attention: 174,762 cells over 6 layers held, less than the
    12 heads × n² of the corpus's longest window (n > 120)."""
    result = world.results["budget"]
    assert result.returncode == 2
    assert len(result.error_lines) == 1 and "Raise --memory-budget" in result.error_lines[0]
    assert not world.out("budget").exists()


def test_the_documented_recipe_runs(world: World, capsys: pytest.CaptureFixture) -> None:
    """docs/analysis.md's pandas lines for a compare folder, run as written."""
    assert world.results["finetune"].returncode == 0
    text = (ROOT / "docs" / "analysis.md").read_text(encoding="utf-8")
    section = text.split("## Comparing two models", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("runs/cmp", str(world.out("finetune")))  # a path without quotes
    exec(compile(code, "docs/analysis.md", "exec"), {})
    assert "cosine_mean" in capsys.readouterr().out


def test_view_and_plot_say_a_compare_folder_is_not_a_corpus_dataset(world: World) -> None:
    folder = world.out("finetune")
    for command in (["view", str(folder), "--doc", "x", "--out", str(world.tmp / "x.html")],
                    ["plot", str(folder), "--out", str(world.tmp / "x.png")]):
        result = run_cli(*command)
        assert result.returncode == 2 and len(result.error_lines) == 1, result.stderr
        assert "headscope-compare/1 folder, not a corpus dataset" in result.error_lines[0]
    heads = Dataset.open(folder).heads()  # model A's heads
    assert len(heads) == 6 * 12 and (heads["kv_head"] == heads["head"]).all()
