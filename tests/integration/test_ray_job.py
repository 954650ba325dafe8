"""The Ray Data engine on a local Ray: the same dataset as the local engine, shard for shard."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import ray
import torch
from compare_tables import assert_datasets_equal
from conftest import SAMPLE_TEXTS
from tolerances import ENGINE_ATOL

from pipelines.config import AttentionMode, ConfigError, RunConfig, WindowConfig
from pipelines.jobs.local import run_job
from pipelines.jobs.ray_engine import READ_CPUS, RayOptions, place_workers, run_ray_job

CONFIG = RunConfig(device="cpu", attention=AttentionMode.parse("topk:4"),
                   windows=WindowConfig(max_length=48, stride=8), shard_tokens=60,
                   analyses=("patterns", "words", "similarity"), similarity_docs=9)


def write_corpus(folder: Path) -> list[Path]:
    """Three files of three formats: short texts, sentence pairs, and windowed long texts."""
    folder.mkdir(parents=True, exist_ok=True)
    short = folder / "short.txt"
    short.write_text("\n".join(SAMPLE_TEXTS * 2) + "\n")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"id": f"pair{i}", "text": a, "text_pair": b})
                               for i, (a, b) in enumerate(pairwise(SAMPLE_TEXTS)))
                     + "\n")
    long = folder / "long.txt"
    long.write_text("\n".join(" ".join(SAMPLE_TEXTS[i:] + SAMPLE_TEXTS[:i]) for i in range(3))
                    + "\n")
    return [short, pairs, long]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The local engine with one intra-op thread, as each Ray worker here gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_run(corpus: list[Path], tmp_path_factory: pytest.TempPathFactory,
              one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    run_job(corpus, out, CONFIG, progress=False)
    return out


@pytest.fixture(scope="module")
def ray_run(corpus: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "out"
    run_ray_job(corpus, out, CONFIG, options=RayOptions(workers=2), progress=False)
    assert not ray.is_initialized(), "the job shuts down the Ray it started"
    return out


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_same_rows_as_the_local_engine(ray_run: Path, local_run: Path) -> None:
    assert_datasets_equal(ray_run, local_run, atol=ENGINE_ATOL)


def test_same_shards_as_the_local_engine(ray_run: Path, local_run: Path) -> None:
    for folder in ("_shards", "documents", "attention", "_similarity"):
        names = sorted(p.name for p in (local_run / folder).iterdir())
        assert len(names) > 3
        assert sorted(p.name for p in (ray_run / folder).iterdir()) == names


def test_same_manifest_but_the_runtime(ray_run: Path, local_run: Path) -> None:
    got, want = manifest(ray_run), manifest(local_run)
    assert {k for k in want if got[k] != want[k]} == {"created", "runtime"}
    assert got["status"] == "complete"
    assert want["runtime"]["engine"] == "local"
    runtime = got["runtime"]
    assert runtime["engine"] == "ray" and runtime["workers"] == 2
    assert runtime["backend"] == "torch" and runtime["device"] == "cpu"
    assert sum(runtime["shards_by_node"].values()) >= len(list((local_run / "_shards").iterdir()))


def test_resume_with_either_engine(ray_run: Path, local_run: Path, tmp_path: Path,
                                   corpus: list[Path]) -> None:
    """An interrupted dataset (two shards unwritten) is finished by the other engine."""
    for first, resume_with in (("ray", "local"), ("local", "ray")):
        out = tmp_path / first
        shutil.copytree(ray_run if first == "ray" else local_run, out)
        for shard in ("00001", "00003"):
            (out / "_shards" / f"{shard}.json").unlink()
        (out / "head_summary" / "part-00000.parquet").unlink()
        if resume_with == "ray":
            run_ray_job(corpus, out, CONFIG, resume=True, options=RayOptions(workers=1),
                        progress=False)
        else:
            run_job(corpus, out, CONFIG, resume=True, progress=False)
        assert manifest(out)["runtime"]["engine"] == resume_with
        assert_datasets_equal(out, local_run, atol=ENGINE_ATOL)


@pytest.mark.parametrize(("resources", "options", "expected"), [
    ({"CPU": 2.0}, RayOptions(), (2, 0.87, 0.0)),
    ({"CPU": 8.0}, RayOptions(workers=3), (3, 2.58, 0.0)),
    ({"CPU": 2.0}, RayOptions(workers=2, worker_cpus=0.5), (2, 0.5, 0.0)),
    ({"CPU": 16.0, "GPU": 4.0}, RayOptions(), (4, 3.93, 1.0)),
    ({"CPU": 16.0, "GPU": 4.0}, RayOptions(worker_gpus=0.5), (8, 1.96, 0.5)),
])
def test_worker_placement(resources: dict, options: RayOptions, expected: tuple) -> None:
    config = RunConfig(device="auto")
    placement = place_workers(options, config, resources)
    assert (placement.workers, placement.cpus, placement.gpus) == expected
    assert placement.workers * placement.cpus + READ_CPUS <= resources["CPU"]


@pytest.mark.parametrize(("resources", "options", "device", "message"), [
    ({"CPU": 2.0}, RayOptions(workers=2, worker_cpus=1.0), "cpu", "exceed the cluster's 2 CPUs"),
    ({"CPU": 2.0}, RayOptions(), "cuda", "no GPUs"),
    ({"CPU": 8.0, "GPU": 1.0}, RayOptions(workers=2), "auto", "exceed the cluster's 1"),
])
def test_worker_placement_errors(resources: dict, options: RayOptions, device: str,
                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        place_workers(options, RunConfig(device=device), resources)
