"""A full disk, for real: commands write into a tmpfs of a few MB (see ``tiny_disk``).

A corpus job that fills the disk stops with one line and exit code 74, leaving its finished
shards and no temporary file; after the tmpfs is enlarged, ``--resume`` in the same folder
makes the dataset an uninterrupted job makes. Before the job starts, a warning compares its
size estimate with the free space.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from compare_tables import assert_datasets_equal
from tiny_disk import Outcome, TinyDisk, cli_line, step
from tolerances import ENGINE_ATOL

from pipelines.analysis import registry
from pipelines.backends.torch.backend import TorchBackend
from pipelines.cli import NO_SPACE_EXIT
from pipelines.config import RunConfig
from pipelines.dataset import schema
from pipelines.jobs.local import run_job

SHARD_TOKENS = 256  # ten shards of ~0.7 MB: about four fit in 3 MB
JOB = ["--model", "minilm", "--device", "cpu", "--no-progress", "--shard-tokens",
       str(SHARD_TOKENS)]
TABLES = (*schema.TABLES, "head_summary")
TEXTS = ["The cat sat on the mat. It was happy!",
         "Attention is all you need, they said; was it, though?",
         "Transformers read text in parallel: every token attends to every other token (or, "
         "in causal models, to those before it), and the weights say how much."]
WARNING = re.compile(r"WARNING .*the output may not fit: ~([\d,.]+) MB estimated \(before "
                     r"compression\), ([\d,.]+) MB free on the file system of (\S+);")


NO_SPACE = "headscope: error: no space left on device while writing"
RESUME = "free space and rerun with --resume (finished shards are kept)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 documents, 2,680 tokens: ~7 MB of Parquet with the default topk:8."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = [{"id": f"d{i}", "text": f"{TEXTS[i % 3]} {TEXTS[(i + 1) % 3]} Document {i}."}
            for i in range(60)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(corpus: Path, minilm: TorchBackend, tmp_path_factory: pytest.TempPathFactory
              ) -> Path:
    """The dataset an uninterrupted job writes, on a disk with room."""
    out = tmp_path_factory.mktemp("reference") / "out"
    config = RunConfig(model="minilm", device="cpu", shard_tokens=SHARD_TOKENS)
    run_job([corpus], out, config, backend=minilm, progress=False)
    return out


@dataclass
class Interrupted:
    """A job that filled a 3 MB disk, then ``--resume`` after the disk grew to 200 MB."""

    out: Path  # where the job wrote (gone with the tmpfs)
    full: Outcome
    files: list[str]  # under out after the failure, relative
    resumed: Outcome
    result: Path  # out after the resume, copied off the tmpfs


def fill_then_resume(tmp_path: Path, corpus: Path, engine: list[str]) -> Interrupted:
    """Run the job on a 3 MB tmpfs with ``engine`` options, list what it left, enlarge the
    tmpfs and finish the job with ``--resume`` on the local engine."""
    disk = TinyDisk.create(tmp_path / "disk", "3m")
    logs, out, result = tmp_path, disk.mount / "out", tmp_path / "result"
    disk.run("\n".join([
        cli_line(["run", corpus, "--out", out, *JOB, *engine], logs, "full"),
        f"(cd {shlex.quote(str(out))} && find . -type f) >{shlex.quote(str(logs / 'files'))}",
        f"mount -o remount,size=200m {shlex.quote(str(disk.mount))}",
        cli_line(["run", corpus, "--out", out, *JOB, "--resume"], logs, "resumed"),
        f"cp -r {shlex.quote(str(out))} {shlex.quote(str(result))}",
    ]))
    files = sorted(line[2:] for line in (logs / "files").read_text().splitlines())
    return Interrupted(out, step(logs, "full"), files, step(logs, "resumed"), result)


@pytest.fixture(scope="module")
def local(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    return fill_then_resume(tmp_path_factory.mktemp("local"), corpus, [])


def assert_one_line_no_space(full: Outcome, out: Path, then: str) -> str:
    """Exit code 74 and one error line, the last of stderr, naming a file under ``out``;
    returns the file."""
    assert full.returncode == NO_SPACE_EXIT, full.stderr
    assert "Traceback" not in full.stderr
    (line,) = full.error_lines
    assert full.stderr.splitlines()[-1] == line
    match = re.fullmatch(re.escape(f"{NO_SPACE} {out}/") + r"(\S+)" + re.escape(f"; {then}"),
                         line)
    assert match, line
    return match.group(1)


def test_full_disk_stops_with_one_line_and_exit_code_74(local: Interrupted) -> None:
    written = assert_one_line_no_space(local.full, local.out, RESUME)
    table, part = written.split("/")
    assert table in schema.TABLES and re.fullmatch(r"part-\d{5}\.parquet", part), written


def test_full_disk_leaves_finished_shards_and_no_temporary_file(local: Interrupted,
                                                                reference: Path) -> None:
    assert not [f for f in local.files if Path(f).name.startswith(".tmp-")], local.files
    finished = {int(Path(f).stem) for f in local.files if f.startswith("_shards/")}
    assert 0 < len(finished) < len(list((reference / "_shards").iterdir()))
    for table in schema.TABLES:  # the failed shard's parts are gone too
        parts = {int(Path(f).stem[5:]) for f in local.files if f.startswith(f"{table}/")}
        assert parts == finished, table
    assert "manifest.json" in local.files


def test_warning_before_the_job_names_estimate_and_free_space(local: Interrupted) -> None:
    lines = local.full.stderr.splitlines()
    (warning,) = [line for line in lines if WARNING.search(line)]
    found = WARNING.search(warning)
    assert found
    estimate, free, where = found.groups()
    assert where == str(local.out)
    assert float(free.replace(",", "")) <= 3.2 < float(estimate.replace(",", ""))
    assert lines.index(warning) < lines.index(local.full.error_lines[0])
    assert not WARNING.search(local.resumed.stderr), "200 MB is room enough: no warning"


def test_resume_after_freeing_space_makes_the_uninterrupted_dataset(local: Interrupted,
                                                                    reference: Path) -> None:
    assert local.resumed.returncode == 0, local.resumed.stderr
    manifest = json.loads((local.result / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == json.loads((reference / "manifest.json").read_text())["counts"]
    keys = registry.sort_keys()
    for table in TABLES:  # same shards, batches and kernels: identical rows
        got, want = (pd.read_parquet(root / table).sort_values(keys[table]).reset_index(drop=True)
                     for root in (local.result, reference))
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=table)


def test_ray_engine_stops_the_same_way_and_local_resume_finishes(
        corpus: Path, reference: Path, tmp_path: Path) -> None:
    ray = fill_then_resume(tmp_path, corpus, ["--engine", "ray", "--workers", "1"])
    assert_one_line_no_space(ray.full, ray.out, RESUME)
    assert not [f for f in ray.files if Path(f).name.startswith(".tmp-")], ray.files
    assert any(f.startswith("_shards/") for f in ray.files)
    assert ray.resumed.returncode == 0, ray.resumed.stderr
    assert_datasets_equal(ray.result, reference, atol=ENGINE_ATOL)  # Ray actors: 1 thread


def test_other_writing_commands_fail_the_same_way_on_a_full_disk(
        corpus: Path, reference: Path, tmp_path: Path) -> None:
    """view, plot, ablate and factors train on a tmpfs filled to the last byte."""
    disk = TinyDisk.create(tmp_path / "disk", "1m")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:3]))
    outs = {"view": disk.mount / "d0.html", "plot": disk.mount / "entropy.png",
            "ablate": disk.mount / "ablation", "factors": disk.mount / "dictionary"}
    commands = {
        "view": ["view", reference, "--doc", "d0", "--out", outs["view"]],
        "plot": ["plot", reference, "--out", outs["plot"]],
        "ablate": ["ablate", small, "--out", outs["ablate"], "--heads", "0.0", "--device",
                   "cpu", "--no-progress"],
        "factors": ["factors", "train", small, "--out", outs["factors"], "--n-factors", "8",
                    "--minibatch", "64", "--device", "cpu", "--no-progress"],
    }
    filler = shlex.quote(str(disk.mount / "filler"))
    disk.run("\n".join([f"cat /dev/zero >{filler} 2>/dev/null",
                        *(f"({cli_line(args, tmp_path, name)}) &"
                          for name, args in commands.items()),
                        "wait",
                        f"rm {filler}",
                        f"find {shlex.quote(str(disk.mount))} -type f >{tmp_path / 'left'}"]))
    for name, out in outs.items():
        written = assert_one_line_no_space(step(tmp_path, name), disk.mount,
                                           "free space and rerun")
        assert str(disk.mount / written).startswith(str(out)), (name, written)
    assert (tmp_path / "left").read_text() == "", "no file is left half written"
