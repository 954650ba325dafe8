"""The Ray engine on a two-node Ray cluster on this machine, started with `ray start`.

The head and a second node (joined with ``ray start --address``) have one CPU each; a job
with two actors of 0.6 CPU puts one actor on each. `headscope run --engine ray --address` runs
as a user would run it, in its own process. Killing an actor, a node or the driver mid-job
loses and duplicates no row: the job finishes, or ``--resume`` finishes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from compare_tables import assert_datasets_equal
from conftest import free_port
from tolerances import ENGINE_ATOL

from pipelines.config import AttentionMode, RunConfig
from pipelines.jobs.local import run_job

RAY = str(Path(sys.executable).with_name("ray"))
HEADSCOPE = str(Path(sys.executable).with_name("headscope"))
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
NODE_OPTIONS = ["--num-cpus=1", "--object-store-memory=150000000", "--disable-usage-stats"]
JOB_OPTIONS = ["--attention", "topk:4", "--shard-tokens", "400", "--device", "cpu",
               "--workers", "2", "--worker-cpus", "0.6", "--no-progress"]
CONFIG = RunConfig(device="cpu", attention=AttentionMode.parse("topk:4"), shard_tokens=400)


@dataclass
class Cluster:
    address: str
    worker_port: int  # node-manager port of the second node: finds its raylet
    dashboard: str  # the job server's URL, for `ray job submit`

    def start_worker(self) -> None:
        run([RAY, "start", f"--address={self.address}",
             f"--node-manager-port={self.worker_port}", *NODE_OPTIONS])

    def node_ids(self) -> set[str]:
        script = ("import ray; ray.init(address=%r, log_to_driver=False); "
                  "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))")
        return set(run([sys.executable, "-c", script % self.address]).split())

    def worker_raylet(self) -> psutil.Process:
        flag = f"--node_manager_port={self.worker_port}"
        return next(p for p in psutil.process_iter(["name", "cmdline"])
                    if "raylet" in (p.info["name"] or "") and flag in (p.info["cmdline"] or []))


def run(command: list[str]) -> str:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{command[:3]}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    port, dashboard = free_port(), free_port()
    run([RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", *NODE_OPTIONS])
    found = Cluster(f"127.0.0.1:{port}", free_port(), f"http://127.0.0.1:{dashboard}")
    try:
        found.start_worker()
        deadline = time.monotonic() + 60
        while len(found.node_ids()) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        yield found
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~31k tokens in 68 shards: long enough to interrupt, short enough for a test."""
    path = tmp_path_factory.mktemp("cluster_corpus") / "corpus.txt"
    path.write_text("\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog "
                              f"number {i}. " * (1 + i % 9) for i in range(400)) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local engine with one thread per forward pass, like each actor here."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job([corpus], out, CONFIG, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def start_job(cluster: Cluster, corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([HEADSCOPE, "run", str(corpus), "--out", str(out), "--engine", "ray",
                             "--address", cluster.address, *JOB_OPTIONS, *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(job: subprocess.Popen) -> tuple[int, str]:
    output, _ = job.communicate(timeout=600)
    return job.returncode, output


def shards_written(out: Path) -> int:
    folder = out / "_shards"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def wait_for_shards(out: Path, job: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 180
    while shards_written(out) < count:
        assert job.poll() is None, f"the job ended early: {job.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, "no shards written in 180 s"
        time.sleep(0.1)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_actors_run_on_both_nodes(cluster: Cluster, corpus: Path, reference: Path,
                                  tmp_path: Path) -> None:
    code, output = finish(start_job(cluster, corpus, tmp_path / "out"))
    assert code == 0, output[-3000:]
    runtime = manifest(tmp_path / "out")["runtime"]
    assert set(runtime["shards_by_node"]) == cluster.node_ids()
    assert all(count > 0 for count in runtime["shards_by_node"].values())
    assert_datasets_equal(tmp_path / "out", reference, atol=ENGINE_ATOL)


def test_ray_job_submit(cluster: Cluster, corpus: Path, reference: Path,
                        tmp_path: Path) -> None:
    """The documented way to run on a cluster: the job finds it through RAY_ADDRESS."""
    out = tmp_path / "out"
    run([RAY, "job", "submit", "--address", cluster.dashboard, "--", HEADSCOPE, "run",
         str(corpus), "--out", str(out), "--engine", "ray", *JOB_OPTIONS])
    assert manifest(out)["runtime"]["engine"] == "ray"
    assert_datasets_equal(out, reference, atol=ENGINE_ATOL)


def shard_workers() -> list[psutil.Process]:
    """The inference actors' processes on this machine (Ray titles them `ray::ShardWorker...`)."""
    return [p for p in psutil.process_iter(["cmdline"])
            if any("ShardWorker" in part for part in p.info["cmdline"] or [])]


def wait_for_no_shard_workers() -> None:
    """Ray kills a dead driver's actors, but a moment later: one may finish a shard meanwhile."""
    deadline = time.monotonic() + 60
    while shard_workers():
        assert time.monotonic() < deadline, "the dead driver's actors still run after 60 s"
        time.sleep(0.2)


def test_an_inference_actor_killed_mid_job(cluster: Cluster, corpus: Path, reference: Path,
                                           tmp_path: Path) -> None:
    job = start_job(cluster, corpus, tmp_path / "out")
    wait_for_shards(tmp_path / "out", job, 3)
    actors = shard_workers()
    assert actors, "no inference actor process found"
    actors[0].send_signal(signal.SIGKILL)
    code, output = finish(job)
    assert code == 0, output[-3000:]
    assert shards_written(tmp_path / "out") == 68
    assert_datasets_equal(tmp_path / "out", reference, atol=ENGINE_ATOL)


def test_the_driver_killed_mid_job_and_resumed(cluster: Cluster, corpus: Path,
                                               reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = start_job(cluster, corpus, out)
    wait_for_shards(out, job, 5)
    job.send_signal(signal.SIGKILL)
    job.wait()
    wait_for_no_shard_workers()
    written = shards_written(out)
    assert 5 <= written < 68 and manifest(out)["status"] == "running"
    code, output = finish(start_job(cluster, corpus, out, "--resume"))
    assert code == 0, output[-3000:]
    assert f"resuming: {written} of 68 shards" in output
    assert_datasets_equal(out, reference, atol=ENGINE_ATOL)


def test_a_worker_node_killed_mid_job(cluster: Cluster, corpus: Path, reference: Path,
                                      tmp_path: Path) -> None:
    """Last: the second node is gone afterwards (and started again for any later test)."""
    out = tmp_path / "out"
    job = start_job(cluster, corpus, out)
    wait_for_shards(out, job, 5)
    cluster.worker_raylet().send_signal(signal.SIGKILL)
    code, output = finish(job)
    if code != 0:  # the documented remedy: resume on what is left of the cluster
        code, output = finish(start_job(cluster, corpus, out, "--resume", "--workers", "1"))
    assert code == 0, output[-3000:]
    assert_datasets_equal(out, reference, atol=ENGINE_ATOL)
    cluster.start_worker()
