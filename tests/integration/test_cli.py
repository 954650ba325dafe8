"""The ``headscope run`` command as a real subprocess: success, clear errors, write-once output.

Every command of this module runs once, in parallel, from one module fixture (starting Python
with torch takes seconds); the tests then look at the outcome they are about.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CLI, Outcome

from pipelines.cli import main
from pipelines.dataset.reader import Dataset
from pipelines.dataset.schema import TABLES

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--model", "minilm", "--device", "cpu", "--no-progress"]
PARALLEL = 4


Snapshot = dict[str, tuple[int, bytes]]


def snapshot(folder: Path) -> Snapshot:
    """Every file under ``folder`` with its mtime and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_all(commands: dict[str, list[str]]) -> dict[str, Outcome]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(args: list[str]) -> Outcome:
        done = subprocess.run([*CLI, "run", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        return Outcome(done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def model_folder(path: Path, config: dict, tokenizer: bool) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if tokenizer:
        (path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    return path


@dataclass
class World:
    paths: dict[str, Path]
    results: dict[str, Outcome]
    before: dict[str, Snapshot]
    after: dict[str, Snapshot]


#: Commands run first, in parallel: name → arguments ({name} is a path of the World).
FIRST_STAGE = {
    "ok": ["{good}", "--out", "{ok}"],
    "bad_json": ["{bad_json}", "--out", "{tmp}/out-bad-json"],
    "no_text": ["{no_text}", "--out", "{tmp}/out-no-text"],
    "empty": ["{empty}", "--out", "{tmp}/out-empty"],
    "topk0": ["{good}", "--out", "{tmp}/out-topk0", "--attention", "topk:0"],
    "foo": ["{good}", "--out", "{tmp}/out-foo", "--attention", "foo"],
    "no_model": ["{good}", "--out", "{tmp}/out-no-model", "--model", "{tmp}/no-such-model"],
    "no_tokenizer": ["{good}", "--out", "{tmp}/out-no-tok", "--model", "{no_tokenizer}"],
    "t5": ["{good}", "--out", "{tmp}/out-t5", "--model", "{t5}"],
    "mpnet": ["{good}", "--out", "{tmp}/out-mpnet", "--model", "{mpnet}"],
    "unknown_type": ["{good}", "--out", "{tmp}/out-unknown", "--model", "{unknown_type}"],
    "out_is_file": ["{good}", "--out", "{out_file}"],
}
#: Commands on existing folders (copies of the dataset made by "ok", and a foreign folder).
SECOND_STAGE = {
    "again": ["{good}", "--out", "{again}"],
    "resume_bad": ["{bad_json}", "--out", "{resume_bad}", "--resume"],
    "overwrite": ["{other}", "--out", "{overwrite}", "--overwrite"],
    "overwrite_foreign": ["{good}", "--out", "{foreign}", "--overwrite"],
}


def expand_args(args: list[str], paths: dict[str, Path]) -> list[str]:
    names = {k: str(v) for k, v in paths.items()}
    with_model = [a.format(**names) for a in args]
    if "--model" in with_model:  # a test model replaces the default one
        return with_model + ["--device", "cpu", "--no-progress"]
    return with_model + FAST


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("cli")
    paths = {"tmp": tmp, "ok": tmp / "ok", "again": tmp / "again",
             "resume_bad": tmp / "resume-bad", "overwrite": tmp / "overwrite",
             "foreign": tmp / "foreign", "out_file": tmp / "just-a-file"}
    paths["good"] = write_jsonl(tmp / "good.jsonl", [
        {"id": "a", "text": "The cat sat on the mat."},
        {"id": "b", "text": "Is attention all you need?", "text_pair": "Maybe not."}])
    paths["other"] = write_jsonl(tmp / "other.jsonl", [{"id": "z", "text": "Something else."}])
    paths["bad_json"] = tmp / "bad.jsonl"
    paths["bad_json"].write_text('{"text": "one"}\n{"text": "two"}\n{"text": three}\n',
                                 encoding="utf-8")
    paths["no_text"] = tmp / "no-text.csv"
    paths["no_text"].write_text("id,body\n1,hello\n", encoding="utf-8")
    paths["empty"] = tmp / "empty.jsonl"
    paths["empty"].write_bytes(b"")
    paths["no_tokenizer"] = model_folder(tmp / "no-tokenizer", {"model_type": "bert"}, False)
    paths["t5"] = model_folder(tmp / "t5-model", {"model_type": "t5"}, True)
    paths["mpnet"] = model_folder(tmp / "mpnet-model", {"model_type": "mpnet"}, True)
    paths["unknown_type"] = model_folder(tmp / "odd-model", {"model_type": "not-a-model"}, True)
    paths["out_file"].write_text("I am a file, not a folder.\n", encoding="utf-8")
    paths["foreign"].mkdir()
    (paths["foreign"] / "thesis.txt").write_text("precious work\n", encoding="utf-8")

    results = run_all({n: expand_args(a, paths) for n, a in FIRST_STAGE.items()})
    assert results["ok"].returncode == 0, results["ok"].stderr
    for name in ("again", "resume_bad", "overwrite"):
        shutil.copytree(paths["ok"], paths[name])
    watched = ("again", "resume_bad", "foreign", "out_file")
    before = {name: snapshot(paths[name]) if paths[name].is_dir()
              else {"": (paths[name].stat().st_mtime_ns, paths[name].read_bytes())}
              for name in watched}
    results.update(run_all({n: expand_args(a, paths) for n, a in SECOND_STAGE.items()}))
    after = {name: snapshot(paths[name]) if paths[name].is_dir()
             else {"": (paths[name].stat().st_mtime_ns, paths[name].read_bytes())}
             for name in watched}
    return World(paths, results, before, after)


def assert_clean_error(outcome: Outcome, *needles: str) -> None:
    """Non-zero exit, no traceback, one ``headscope: error:`` line holding every needle."""
    assert outcome.returncode != 0
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert len(outcome.error_lines) == 1, outcome.stderr
    for needle in needles:
        assert needle in outcome.error_lines[0]


def test_run_writes_a_readable_dataset(world: World) -> None:
    outcome = world.results["ok"]
    assert outcome.returncode == 0
    assert "Traceback" not in outcome.stderr
    assert outcome.stdout.startswith(f"wrote {world.paths['ok']}: 2 documents")
    dataset = Dataset.open(world.paths["ok"])
    assert dataset.manifest["status"] == "complete"
    assert dataset.manifest["config"]["device"] == "cpu"
    documents = dataset.table("documents")
    assert sorted(documents["doc_id"]) == ["a", "b"]
    assert documents.set_index("doc_id").loc["b", "text_pair"] == "Maybe not."
    for table in (*TABLES, "head_summary"):
        assert len(dataset.table(table)) == dataset.manifest["counts"][table] > 0


#: Failing commands: name → (what the error line must contain, folder that must not appear).
ERRORS = {
    "bad_json": (["{bad_json}:3:", "invalid JSON"], "out-bad-json"),
    "no_text": (["{no_text}", "'text'", "--text-column"], "out-no-text"),
    "empty": (["{empty}", "empty"], "out-empty"),
    "topk0": (["'topk:0'", "positive integer"], "out-topk0"),
    "foo": (["'foo'", "none, topk:K, threshold:T or full"], "out-foo"),
    "no_model": (["{tmp}/no-such-model", "--allow-download"], "out-no-model"),
    "no_tokenizer": (["{no_tokenizer}", "no tokenizer"], "out-no-tok"),
    "t5": (["'t5'", "encoder-decoder"], "out-t5"),
    # MPNet computes its attention (with a relative position bias) in its own module
    "mpnet": (["'mpnet'", "AttentionInterface"], "out-mpnet"),
    "unknown_type": (["not-a-model"], "out-unknown"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_gives_one_line_error(world: World, name: str) -> None:
    needles, out = ERRORS[name]
    names = {k: str(v) for k, v in world.paths.items()}
    assert_clean_error(world.results[name], *(n.format(**names) for n in needles))
    assert not (world.paths["tmp"] / out).exists()


def test_out_that_is_a_file_is_refused(world: World) -> None:
    assert_clean_error(world.results["out_is_file"], str(world.paths["out_file"]))
    assert world.after["out_file"] == world.before["out_file"]


def test_second_run_into_a_dataset_is_refused_untouched(world: World) -> None:
    assert_clean_error(world.results["again"], str(world.paths["again"]), "not empty",
                       "--resume", "--overwrite")
    assert world.before["again"]
    assert world.after["again"] == world.before["again"]


def test_bad_input_with_resume_leaves_the_dataset_intact(world: World) -> None:
    assert_clean_error(world.results["resume_bad"], f"{world.paths['bad_json']}:3:")
    assert world.after["resume_bad"] == world.before["resume_bad"]
    assert Dataset.open(world.paths["resume_bad"]).manifest["status"] == "complete"


def test_overwrite_replaces_the_dataset(world: World) -> None:
    outcome = world.results["overwrite"]
    assert outcome.returncode == 0, outcome.stderr
    dataset = Dataset.open(world.paths["overwrite"])
    assert dataset.manifest["status"] == "complete"
    assert [f["path"] for f in dataset.manifest["input"]["files"]] == [
        str(world.paths["other"].resolve())]
    for table in ("documents", "tokens", "head_stats", "attention"):
        assert set(dataset.table(table)["doc_id"]) == {"z"}, table
    assert len(list((world.paths["overwrite"] / "_shards").glob("*.json"))) == 1


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(world: World) -> None:
    assert_clean_error(world.results["overwrite_foreign"], str(world.paths["foreign"]),
                       "not a headscope dataset")
    assert world.after["foreign"] == world.before["foreign"]
    assert list(world.after["foreign"]) == ["thesis.txt"]


# ------------------------------------------------ the input rule, through `headscope run`
# In-process (pipelines.cli.main): one job each, on a one-line file.

BOM = b"\xef\xbb\xbf"


def run_in_process(tmp_path: Path, name: str, content: bytes, model: str = "minilm",
                   options: tuple[str, ...] = ()) -> tuple[int, str, Path]:
    """(exit code, stderr, --out) of `headscope run` on a file holding ``content``."""
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["run", str(path), "--out", str(out), "--model", model, "--device", "cpu",
                     "--no-progress", *options])
    return code, stderr.getvalue(), out


def test_run_reads_a_csv_utf8_export_with_its_bom(tmp_path: Path) -> None:
    code, stderr, out = run_in_process(tmp_path, "b.csv", BOM + b"text,id\nThe cat sat.,r1\n")
    assert code == 0, stderr
    documents = Dataset.open(out).table("documents")
    assert documents[["doc_id", "text"]].values.tolist() == [["r1", "The cat sat."]]


@pytest.mark.parametrize("pair", ["", "  "])
def test_run_reads_an_empty_pair_as_no_pair(tmp_path: Path, pair: str) -> None:
    row = {"id": "a", "text": "Hi there", "text_pair": pair}
    code, stderr, out = run_in_process(tmp_path, "p.jsonl", json.dumps(row).encode() + b"\n")
    assert code == 0, stderr
    assert Dataset.open(out).tokens("a")["token"].tolist() == ["[CLS]", "hi", "there", "[SEP]"]


#: name → (file content, model, what the error line names besides the file and line 1)
NO_CONTENT = {
    "zero-width-spaces": ('{"id":"zw","text":"\\u200b\\u200b"}\n', "minilm", "'zw'"),
    "word-joiner-soft-hyphens": ("\u2060\u00ad\u00ad\n", "minilm", "no.txt:1"),
    "pair-of-zero-width-spaces": ('{"id":"p","text":"Hi","text_pair":"\\u200b"}\n', "minilm",
                                  "text_pair"),
    "gpt2-special-tokens-only": ('{"id":"eot","text":"<|endoftext|><|endoftext|>"}\n', "gpt2",
                                 "'eot'"),
}


@pytest.mark.parametrize("case", list(NO_CONTENT))
def test_run_refuses_a_text_without_content_tokens(tmp_path: Path, gpt2_dir: Path,
                                                   case: str) -> None:
    content, model, names = NO_CONTENT[case]
    name = "no.txt" if not content.startswith("{") else "no.jsonl"
    code, stderr, out = run_in_process(tmp_path, name, content.encode(),
                                       str(gpt2_dir) if model == "gpt2" else model)
    assert code == 2
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("headscope: error:")]
    assert f"{tmp_path / name}:1:" in line and names in line and "no content" in line, line
    assert not out.exists()


def test_run_keeps_ignorable_characters_that_gpt2_reads(tmp_path: Path, gpt2_dir: Path) -> None:
    """Byte-level BPE makes tokens of zero-width spaces: for GPT-2 they are content."""
    content = b'{"id":"zw","text":"\\u200b\\u200b"}\n'
    code, stderr, out = run_in_process(tmp_path, "zw.jsonl", content, str(gpt2_dir))
    assert code == 0, stderr
    tokens = Dataset.open(out).tokens("zw")
    assert len(tokens) > 0 and not tokens["is_special"].any()


# ------------------------------------------------------------------------ --memory-budget


def error_line(stderr: str) -> str:
    """The one ``headscope: error:`` line, which must be the last line of stderr."""
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("headscope: error:")]
    assert stderr.splitlines()[-1] == line and "Traceback" not in stderr
    return line


@pytest.mark.parametrize(("value", "needle"), [
    ("lots", "memory size 'lots'"), ("2TiB", "memory size '2TiB'"), ("-1GiB", "'-1GiB'"),
    ("", "memory size ''"), ("1MiB", "below the minimum of 64 MiB"),
])
def test_a_bad_memory_budget_is_one_line_and_exit_2(tmp_path: Path, value: str,
                                                    needle: str) -> None:
    code, stderr, out = run_in_process(tmp_path, "a.txt", b"The cat sat.\n",
                                       options=(f"--memory-budget={value}",))
    assert code == 2
    line = error_line(stderr)
    assert line.startswith("headscope: error: --memory-budget: ") and needle in line, line
    assert not out.exists()


def test_the_memory_budget_lands_in_the_manifest(tmp_path: Path) -> None:
    code, stderr, out = run_in_process(tmp_path, "a.txt", b"The cat sat.\n",
                                       options=("--memory-budget", "1.5GiB"))
    assert code == 0, stderr
    assert Dataset.open(out).manifest["config"]["memory_budget"] == 3 * 2**29


def test_a_window_that_cannot_fit_the_budget_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    """With ``words`` (which reads whole layers), MiniLM's 512-token window needs 12 heads ×
    512² × 4 bytes × 3 copies ≈ 36 MiB for one layer's attention: more than the 12 MiB of
    attention a 64 MiB budget allows. Without it, the same job runs in query blocks."""
    text = " ".join(["Attention is all you need, they said; was it, though?"] * 60)
    words = ("--memory-budget", "64MiB", "--analyses", "words")
    code, stderr, out = run_in_process(tmp_path, "long.txt", text.encode() + b"\n",
                                       options=words)
    assert code == 2
    line = error_line(stderr)
    for needle in ("512 tokens", "36 MiB", "12 MiB", "64 MiB", "words", "--memory-budget",
                   "--max-length"):
        assert needle in line, line
    assert not out.exists()
    shorter = (*words, "--max-length", "256", "--overwrite")
    code, stderr, _ = run_in_process(tmp_path, "long.txt", text.encode() + b"\n",
                                     options=shorter)
    assert code == 0, stderr  # windows of 256 tokens need a quarter of that
    blocked = ("--memory-budget", "64MiB", "--overwrite")
    code, stderr, out = run_in_process(tmp_path, "long.txt", text.encode() + b"\n",
                                       options=blocked)
    assert code == 0, stderr
    assert set(Dataset.open(out).table("head_stats")["n_tokens"]) >= {512}


def test_a_refused_job_leaves_the_dataset_it_would_overwrite(tmp_path: Path) -> None:
    code, stderr, out = run_in_process(tmp_path, "a.txt", b"The cat sat.\n")
    assert code == 0, stderr
    before = snapshot(out)
    text = " ".join(["The cat sat on the mat."] * 120)
    code, stderr, _ = run_in_process(tmp_path, "a.txt", text.encode() + b"\n",
                                     options=("--memory-budget", "64MiB", "--analyses", "words",
                                              "--overwrite"))
    assert code == 2 and "--memory-budget" in error_line(stderr)
    assert snapshot(out) == before
