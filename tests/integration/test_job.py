"""Corpus jobs end to end: manifest, counts, summary, kill-and-resume, filters, modes, windows."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from tolerances import EPS32, EPS64, FLOAT16_ATOL

from pipelines.analysis import registry
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.stats import DEFINITIONS, STAT_NAMES
from pipelines.config import AttentionMode, ConfigError, RunConfig, WindowConfig
from pipelines.dataset import schema
from pipelines.dataset.writer import TEMP_PREFIX, TEMP_SUFFIX
from pipelines.jobs.local import run_job, survey
from pipelines.text.inputs import Columns, expand
from pipelines.text.tokenize import Windower

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "pipelines"]
ALL_TABLES = (*schema.TABLES, "head_summary")
SORT_KEYS = registry.sort_keys()  # head_summary included
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon"]
TEXTS = [
    "The cat sat on the mat. It was happy!",
    "Attention is all you need, they said; was it, though?",
    "Short.",
    "Transformers read text in parallel: every token attends to every other token.",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def word_docs(count: int, first: int = 3, spread: int = 4) -> list[dict]:
    """``count`` short documents with ids d000, d001, ... of a few words each."""
    return [{"id": f"d{i:03d}",
             "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(first + i % spread)) + "."}
            for i in range(count)]


def cpu_config(**changes: object) -> RunConfig:
    values: dict = {"model": "minilm", "device": "cpu", **changes}
    if isinstance(values.get("attention"), str):
        values["attention"] = AttentionMode.parse(values["attention"])
    return RunConfig(**values)


def read(out: Path, table: str) -> pd.DataFrame:
    """A whole table, sorted by its keys, with a fresh index."""
    frame = pd.read_parquet(out / table)
    return frame.sort_values(SORT_KEYS[table], kind="stable").reset_index(drop=True)


def markers(out: Path) -> list[Path]:
    return sorted(p for p in (out / "_shards").glob("*.json") if not p.name.startswith("."))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def assert_same_dataset(left: Path, right: Path) -> None:
    """Every table holds identical rows (exact, floats included).

    Bitwise by construction: a resumed job redoes whole shards, whose windows and batches are
    planned from the corpus and ``shard_tokens`` alone, so every forward pass runs the same
    CPU kernels on the same shapes as the uninterrupted job.
    """
    for table in ALL_TABLES:
        pd.testing.assert_frame_equal(read(left, table), read(right, table), check_exact=True,
                                      obj=table)


def field_types(path: Path) -> list[tuple[str, object]]:
    return [(f.name, f.type) for f in pq.read_schema(path)]


def cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("corpus")
    rows = [{"id": f"j{i}", "text": text} for i, text in enumerate(TEXTS)]
    rows[1]["text_pair"] = "And a second text for the pair."
    txt = folder / "lines.txt"
    txt.write_text("A plain line of text.\n\nAnother line, with punctuation!\n", encoding="utf-8")
    return [write_jsonl(folder / "docs.jsonl", rows), txt]


E2E_CONFIG = cpu_config(attention="topk:4", shard_tokens=40)


@pytest.fixture(scope="module")
def e2e(minilm: TorchBackend, corpus: list[Path],
        tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "ds"
    run_job(corpus, out, E2E_CONFIG, backend=minilm, progress=False)
    return out


def test_all_tables_exist_and_counts_match_manifest(e2e: Path) -> None:
    meta = manifest(e2e)
    assert set(meta["counts"]) == set(ALL_TABLES)
    for table in ALL_TABLES:
        assert list((e2e / table).glob("part-*.parquet")), table
        assert len(pd.read_parquet(e2e / table)) == meta["counts"][table], table
    documents = read(e2e, "documents")
    assert meta["counts_input"] == {"documents": 6, "windows": len(documents),
                                    "tokens": len(read(e2e, "tokens"))}
    assert sorted(documents["doc_id"]) == ["j0", "j1", "j2", "j3", "lines.txt:1", "lines.txt:3"]
    assert meta["counts"]["head_stats"] == len(documents) * 6 * 12
    assert meta["counts"]["head_summary"] == 6 * 12
    assert meta["counts"]["attention"] > 0


def test_manifest_describes_the_job(e2e: Path, minilm: TorchBackend, corpus: list[Path]) -> None:
    meta = manifest(e2e)
    assert meta["status"] == "complete"
    model = meta["model"]
    assert (model["name"], model["family"], model["model_type"]) == ("minilm", "bert", "bert")
    assert Path(model["path"]).is_dir()
    assert model["config_hash"] == minilm.info.config_hash
    assert re.fullmatch(r"[0-9a-f]{16}", model["config_hash"])
    assert (model["num_layers"], model["num_heads"], model["causal"]) == (6, 12, False)
    assert meta["runtime"]["device"] == "cpu" and meta["runtime"]["backend"] == "torch"
    assert meta["config"] == E2E_CONFIG.to_dict()
    assert meta["attention_mode"] == "topk:4"
    assert meta["statistics"]["definitions"] == DEFINITIONS
    assert meta["input"]["documents"] == 6
    assert meta["input"]["skipped_blank_lines"] == 1
    assert [f["path"] for f in meta["input"]["files"]] == [str(p.resolve()) for p in corpus]
    assert [f["documents"] for f in meta["input"]["files"]] == [4, 2]
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in meta["input"]["files"])
    assert re.fullmatch(r"[0-9a-f]{16}", meta["job_key"])


def test_one_part_per_shard_and_table(e2e: Path, minilm: TorchBackend,
                                      corpus: list[Path]) -> None:
    windower = Windower(minilm.tokenizer, minilm.info, E2E_CONFIG.windows)
    expected = survey(expand(corpus), Columns(), windower, E2E_CONFIG, minilm.info).shards
    assert expected > 1
    assert len(markers(e2e)) == expected
    for table in schema.TABLES:
        assert len(list((e2e / table).glob("part-*.parquet"))) == expected
    assert not list(e2e.rglob(".tmp-*"))


def test_head_summary_equals_groupby_of_head_stats(e2e: Path) -> None:
    stats = read(e2e, "head_stats")
    summary = read(e2e, "head_summary")
    grouped = stats.groupby(["layer", "head"]).agg(
        **{f"{name}_{agg}": (name, agg) for name in STAT_NAMES for agg in ("mean", "std")},
        n_windows=("entropy", "size"), n_tokens_mean=("n_tokens", "mean"),
    ).reset_index()
    assert len(grouped) == len(summary) == 72
    assert (summary["n_windows"].to_numpy() == grouped["n_windows"].to_numpy()).all()
    # the same float32 values aggregated two ways: head_summary in float64 (running sums,
    # E[v²] − mean²), pandas returning float32 for a float32 column (rounded once: ≤ ½ ulp
    # ≤ eps32/2·max|v|). A std also keeps the float64 cancellation of E[v²] − mean², up to
    # √(2N·eps64)·max|v| where std ≈ 0 (N windows a head). Was atol=1e-6 for every column
    n = int(grouped["n_windows"].max())
    for column in [c for c in grouped.columns if c.endswith(("_mean", "_std"))]:
        scale = float(np.nanmax(np.abs(stats[column.rsplit("_", 1)[0]].to_numpy(float))))
        share = EPS32 + (np.sqrt(2 * n * EPS64) if column.endswith("_std") else 0.0)
        np.testing.assert_allclose(summary[column].to_numpy(float),
                                   grouped[column].to_numpy(float), atol=share * scale, rtol=0,
                                   err_msg=column)


# --- kill and resume -------------------------------------------------------------------------


KILL_SHARD_TOKENS = 20


def test_kill_and_resume_gives_the_same_dataset(minilm: TorchBackend, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", word_docs(24))
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    base = [*CLI, "run", str(corpus), "--model", "minilm", "--device", "cpu", "--no-progress",
            "--shard-tokens", str(KILL_SHARD_TOKENS)]

    job = subprocess.Popen([*base, "--out", str(killed)], cwd=ROOT, env=cli_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while job.poll() is None and time.monotonic() < deadline and not markers(killed):
            time.sleep(0.002)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait()
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    done_before_kill = {p.name for p in markers(killed)}

    # A resume with other settings is refused and leaves the partial dataset alone; run it
    # while the uninterrupted reference job runs in this process.
    refused = subprocess.Popen([*base, "--out", str(killed), "--resume", "--attention", "full"],
                               cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    run_job([corpus], reference, cpu_config(shard_tokens=KILL_SHARD_TOKENS), backend=minilm,
            progress=False)
    _, refused_err = refused.communicate(timeout=300)
    total = len(markers(reference))

    assert 1 <= len(done_before_kill) < total
    assert manifest(killed)["status"] != "complete"
    assert refused.returncode != 0
    assert "job_key" in refused_err and "Traceback" not in refused_err
    assert {p.name for p in markers(killed)} == done_before_kill

    resumed = subprocess.run([*base, "--out", str(killed), "--resume"], cwd=ROOT, env=cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert manifest(killed)["status"] == "complete"
    assert len(markers(killed)) == total
    assert not list(killed.rglob(".tmp-*"))
    assert manifest(killed)["counts"] == manifest(reference)["counts"]
    assert_same_dataset(killed, reference)


@pytest.fixture(scope="module")
def small_done(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished dataset of several shards, copied by the simulated-interruption tests."""
    folder = tmp_path_factory.mktemp("small")
    corpus = write_jsonl(folder / "corpus.jsonl", word_docs(12))
    run_job([corpus], folder / "done", cpu_config(shard_tokens=20), backend=minilm,
            progress=False)
    assert len(markers(folder / "done")) >= 3
    return folder


def interrupt_like_a_kill(out: Path, marker_tmp: bool) -> None:
    """Leave ``out`` as a kill in the middle of the last shard would.

    The last shard's marker is missing, one of its parts too, and a half-written temporary
    file sits next to the parts (or, with ``marker_tmp``, next to the markers: the kill came
    while the marker itself was being written).
    """
    last = markers(out)[-1]
    last.unlink()
    (out / "tokens" / f"part-{int(last.stem):05d}.parquet").unlink()
    folder = out / ("_shards" if marker_tmp else "attention")
    suffix = (".json" if marker_tmp else ".parquet") + TEMP_SUFFIX  # as the writer names them
    (folder / (TEMP_PREFIX + "k1ll3d" + suffix)).write_bytes(b"{\"doc")
    meta = manifest(out)
    meta["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("marker_tmp", [False, True], ids=["during-parts", "during-marker"])
def test_resume_after_simulated_interruption(minilm: TorchBackend, small_done: Path,
                                             tmp_path: Path, marker_tmp: bool) -> None:
    out = tmp_path / "copy"
    shutil.copytree(small_done / "done", out)
    interrupt_like_a_kill(out, marker_tmp)
    run_job([small_done / "corpus.jsonl"], out, cpu_config(shard_tokens=20), resume=True,
            backend=minilm, progress=False)
    assert manifest(out)["status"] == "complete"
    assert not list(out.rglob(".tmp-*"))
    assert_same_dataset(out, small_done / "done")


# --- filters and row-group pruning -----------------------------------------------------------


def test_layer_filter_on_head_stats(e2e: Path) -> None:
    frame = pd.read_parquet(e2e / "head_stats", filters=[("layer", "==", 3)])
    n_windows = len(read(e2e, "documents"))
    assert len(frame) == n_windows * 12
    assert set(frame["layer"]) == {3}
    assert sorted(set(frame["head"])) == list(range(12))


@pytest.fixture(scope="module")
def full_many(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full attention of 16 documents in one shard: its attention part has several row groups."""
    folder = tmp_path_factory.mktemp("full-many")
    corpus = write_jsonl(folder / "corpus.jsonl", word_docs(16, first=14, spread=6))
    run_job([corpus], folder / "ds", cpu_config(attention="full"), backend=minilm,
            progress=False)
    return folder / "ds"


@pytest.mark.parametrize("table", schema.TABLES)
def test_parts_are_sorted_by_their_keys(e2e: Path, full_many: Path, table: str) -> None:
    """Every part is in (doc_id, window, layer, head, ...) order, as row-group pruning needs."""
    for root in (e2e, full_many):
        for part in sorted((root / table).glob("part-*.parquet")):
            frame = pq.read_table(part).to_pandas()
            keys = registry.sort_keys()[table]
            assert len(frame) > 0
            expected = frame.sort_values(keys, kind="stable").reset_index(drop=True)
            # the same rows reordered (a stable sort of the part itself): exact
            pd.testing.assert_frame_equal(frame.reset_index(drop=True), expected)


def test_doc_id_filter_on_attention(full_many: Path) -> None:
    frame = pd.read_parquet(full_many / "attention", filters=[("doc_id", "==", "d005")])
    n = int(read(full_many, "documents").set_index("doc_id").loc["d005", "n_tokens"])
    assert set(frame["doc_id"]) == {"d005"}
    assert len(frame) == 6 * 12 * n * n


def test_doc_id_filter_prunes_row_groups(full_many: Path) -> None:
    dataset = pads.dataset(full_many / "attention", format="parquet")
    fragments = list(dataset.get_fragments())
    total = sum(f.num_row_groups for f in fragments)
    assert len(fragments) == 1 and total >= 3
    wanted = pads.field("doc_id") == "d005"
    matching = [piece for f in fragments for piece in f.split_by_row_group(wanted)]
    assert 1 <= len(matching) < total
    rows = sum(piece.to_table(filter=wanted).num_rows for piece in matching)
    assert rows == dataset.to_table(filter=wanted).num_rows > 0


# --- attention modes -------------------------------------------------------------------------


MODES = ["none", "topk:2", "threshold:0.2", "full"]
KEYS = ["doc_id", "window", "layer", "head", "query", "key"]


@pytest.fixture(scope="module")
def modes(minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("modes")
    corpus = write_jsonl(folder / "corpus.jsonl",
                         [{"id": f"m{i}", "text": text} for i, text in enumerate(TEXTS[:3])])
    outs = {}
    for mode in MODES:
        outs[mode] = folder / mode.replace(":", "-")
        run_job([corpus], outs[mode], cpu_config(attention=mode), backend=minilm,
                progress=False)
    return outs


@pytest.mark.parametrize("mode", MODES)
def test_attention_schema_per_mode(modes: dict[str, Path], mode: str) -> None:
    out = modes[mode]
    (part,) = (out / "attention").glob("part-*.parquet")
    expected = schema.attention_schema(full=mode == "full")
    assert field_types(part) == [(f.name, f.type) for f in expected]
    assert str(pq.read_schema(part).field("weight").type) == ("halffloat" if mode == "full"
                                                              else "float")
    assert manifest(out)["attention_mode"] == mode
    rows = pq.read_table(out / "attention").num_rows
    assert rows == manifest(out)["counts"]["attention"]
    assert (rows == 0) == (mode == "none")


def test_none_mode_still_writes_statistics(modes: dict[str, Path]) -> None:
    # bitwise: the attention mode only changes what is kept, not the forward passes or the
    # statistics (same windows, batches, kernels)
    pd.testing.assert_frame_equal(read(modes["none"], "head_stats"),
                                  read(modes["full"], "head_stats"), check_exact=True)


def test_full_mode_keeps_every_pair(modes: dict[str, Path]) -> None:
    full = read(modes["full"], "attention")
    n_tokens = read(modes["full"], "documents").set_index("doc_id")["n_tokens"]
    sizes = full.groupby("doc_id").size()
    assert sizes.to_dict() == {d: 72 * int(n) ** 2 for d, n in n_tokens.items()}
    row_sums = full.groupby(["doc_id", "layer", "head", "query"])["weight"].sum()
    # float16 weights: each rounds by ≤ half an ulp ≤ 2^-12·w, so a row summing to 1 moves by
    # ≤ 2^-12 ≈ 2.4e-4; pandas accumulates wider but returns float16, rounding the sum by ≤ half
    # an ulp at 1 (2^-11 ≈ 4.9e-4): ≤ 7.3e-4 < FLOAT16_ATOL (was 5e-3, looser than needed)
    np.testing.assert_allclose(row_sums.to_numpy(float), 1.0, rtol=0, atol=FLOAT16_ATOL)


def test_topk_keeps_the_two_largest_weights(modes: dict[str, Path]) -> None:
    full = read(modes["full"], "attention")
    topk = read(modes["topk:2"], "attention")
    per_query = topk.groupby(["doc_id", "layer", "head", "query"]).size()
    assert (per_query == 2).all()
    assert len(per_query) == full.groupby(["doc_id", "layer", "head", "query"]).ngroups
    largest = (full.sort_values("weight", ascending=False)
               .groupby(["doc_id", "layer", "head", "query"])["weight"].nth([0, 1]))
    # full mode stores float16 (FLOAT16_ATOL), top-k float32, same forward passes
    assert np.isclose(np.sort(largest.to_numpy(float)), np.sort(topk["weight"].to_numpy(float)),
                      rtol=0, atol=FLOAT16_ATOL).all()
    merged = topk.merge(full, on=KEYS, suffixes=("", "_full"), validate="one_to_one")
    assert len(merged) == len(topk)
    np.testing.assert_allclose(merged["weight"], merged["weight_full"].astype(float), rtol=0,
                               atol=FLOAT16_ATOL)


def test_threshold_keeps_weights_at_or_above(modes: dict[str, Path]) -> None:
    full = read(modes["full"], "attention")
    kept = read(modes["threshold:0.2"], "attention")
    assert len(kept) > 0 and (kept["weight"] >= 0.2).all()
    merged = full.merge(kept, on=KEYS, how="left", suffixes=("_full", ""))
    clearly_above = merged["weight_full"].astype(float) >= 0.201
    assert merged.loc[clearly_above, "weight"].notna().all()
    present = merged["weight"].notna()
    assert present.sum() == len(kept)
    assert (merged.loc[present, "weight_full"].astype(float) >= 0.199).all()


# --- GPT-2 -----------------------------------------------------------------------------------


def test_gpt2_job(gpt2: TorchBackend, gpt2_dir: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl",
                         [{"id": f"g{i}", "text": text} for i, text in enumerate(TEXTS)])
    out = tmp_path / "gpt2"
    run_job([corpus], out, cpu_config(model=str(gpt2_dir), attention="full"), backend=gpt2,
            progress=False)
    meta = manifest(out)
    assert (meta["status"], meta["model"]["family"], meta["model"]["causal"]) == (
        "complete", "gpt2", True)
    stats = read(out, "head_stats")
    assert len(stats) == len(TEXTS) * 3 * 4
    assert stats["mass_sep"].isna().all()
    assert (stats["mass_next"] == 0).all()
    assert stats["entropy"].notna().all()
    summary = read(out, "head_summary")
    assert summary["mass_sep_mean"].isna().all() and (summary["mass_next_mean"] == 0).all()
    attention = read(out, "attention")
    assert (attention["key"] <= attention["query"]).all()
    n_tokens = read(out, "documents").set_index("doc_id")["n_tokens"]
    assert attention.groupby("doc_id").size().to_dict() == {
        d: 12 * int(n) * (int(n) + 1) // 2 for d, n in n_tokens.items()}


# --- long inputs -----------------------------------------------------------------------------


LONG = ("One long document keeps going, sentence after sentence, so that it cannot fit into a "
        "tiny window of sixteen tokens and has to be cut into several overlapping windows.")


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("long") / "corpus.jsonl",
                       [{"id": "long", "text": LONG}, {"id": "short", "text": "Tiny one."}])


def run_long(minilm: TorchBackend, corpus: Path, out: Path, truncate: bool) -> Path:
    windows = WindowConfig(max_length=16, stride=4, truncate=truncate)
    run_job([corpus], out, cpu_config(windows=windows, attention="full"), backend=minilm,
            progress=False)
    return out


def test_long_document_is_windowed(minilm: TorchBackend, long_corpus: Path,
                                   tmp_path: Path) -> None:
    out = run_long(minilm, long_corpus, tmp_path / "windowed", truncate=False)
    docs = read(out, "documents")
    long, short = docs[docs["doc_id"] == "long"], docs[docs["doc_id"] == "short"]
    n_doc = int(long["n_doc_tokens"].iloc[0])
    budget, step = 16 - 2, 16 - 2 - 4
    assert n_doc > budget
    assert len(long) == int(np.ceil((n_doc - budget) / step)) + 1 >= 3
    assert long["windowed"].all() and not long["truncated"].any()
    assert (long["n_windows"] == len(long)).all()
    assert long["window"].tolist() == list(range(len(long)))
    assert long["token_start"].tolist() == [w * step for w in range(len(long))]
    assert (long["token_end"] == np.minimum(long["token_start"] + budget, n_doc)).all()
    assert long["token_end"].iloc[-1] == n_doc
    assert (long["n_tokens"] == long["token_end"] - long["token_start"] + 2).all()
    assert short[["window", "n_windows", "windowed", "truncated"]].values.tolist() == [
        [0, 1, False, False]]
    assert_tokens_follow_spans(out)
    stats = read(out, "head_stats")
    assert len(stats) == len(docs) * 72


def assert_tokens_follow_spans(out: Path) -> None:
    """Each window's content tokens are document tokens token_start..token_end - 1, and the
    same document position always holds the same token in every window."""
    docs = read(out, "documents")
    tokens = read(out, "tokens")
    for row in docs.itertuples():
        window = tokens[(tokens["doc_id"] == row.doc_id) & (tokens["window"] == row.window)]
        assert window["position"].tolist() == list(range(row.n_tokens))
        content = window[~window["is_special"]]
        assert content["doc_position"].tolist() == list(range(row.token_start, row.token_end))
        assert (window.loc[window["is_special"], "doc_position"] == -1).all()
        for token in content.itertuples():  # minilm is uncased; the texts are plain ASCII
            assert row.text[token.char_start:token.char_end].lower() == token.token.removeprefix(
                "##")
    content = tokens[tokens["doc_position"] >= 0]
    assert (content.groupby(["doc_id", "doc_position"])["token_id"].nunique() == 1).all()


def test_long_document_truncated(minilm: TorchBackend, long_corpus: Path,
                                 tmp_path: Path) -> None:
    out = run_long(minilm, long_corpus, tmp_path / "truncated", truncate=True)
    docs = read(out, "documents")
    long = docs[docs["doc_id"] == "long"]
    assert len(long) == 1
    row = long.iloc[0]
    assert bool(row["truncated"]) and not bool(row["windowed"])
    assert (row["window"], row["n_windows"], row["token_start"], row["token_end"]) == (0, 1, 0, 14)
    assert row["n_doc_tokens"] > 14 and row["n_tokens"] == 16
    assert not docs.loc[docs["doc_id"] == "short", "truncated"].any()
    assert_tokens_follow_spans(out)


def test_window_config_error_writes_nothing(minilm: TorchBackend, long_corpus: Path,
                                            tmp_path: Path) -> None:
    """A stride that does not fit the window is a usage error like a bad input: it must be
    reported before the output folder is created, so that the corrected command can run."""
    out = tmp_path / "never"
    config = cpu_config(windows=WindowConfig(max_length=16, stride=20))
    with pytest.raises(ConfigError, match="stride 20"):
        run_job([long_corpus], out, config, backend=minilm, progress=False)
    assert not out.exists()
