"""A corpus job on a Ray cluster (Ray Data): the same shards, rows and manifest as the local job.

The driver validates and surveys the inputs exactly like the local engine (which fixes the shard
plan), opens the output folder, then streams the plan through Ray Data:

    read units ─► read + tokenise (CPU tasks) ─► shards ─► analyse + write (actor pool) ─► counts

Each inference actor loads the model once (one GPU per actor where the cluster has GPUs,
fractional CPUs otherwise), computes a shard's tables with the same stage functions as the
local engine and writes them with the same atomic shard writer. A shard is written completely
or not at all, so when Ray retries a shard after an actor or node died, or ``--resume``
finishes a job, no row is lost or written twice. ``--out`` must be a folder every node sees
at the same path (one machine, or a shared file system).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.backends import create_backend
from pipelines.config import ConfigError, RunConfig
from pipelines.jobs.local import (
    JobResult,
    finish,
    job_writer,
    prepare,
    progress_bar,
    shard_tables,
)
from pipelines.jobs.memory import keep_freed_memory, release_freed_memory
from pipelines.text.inputs import Columns
from pipelines.text.plan import ReadUnit, ShardRule, unit_shards
from pipelines.text.tokenize import Windower

log = logging.getLogger(__name__)
#: CPUs a read-and-tokenise task reserves; the inference actors leave at least this much free.
READ_CPUS = 0.25


@dataclass(frozen=True)
class RayOptions:
    """Where the job runs and how many inference actors it gets."""

    address: str | None = None  # None: RAY_ADDRESS or a new local Ray; "auto": a running one
    workers: int = 0  # inference actors; 0: one per GPU, or one per CPU without GPUs
    worker_cpus: float = 0.0  # CPUs per actor; 0: share the cluster's CPUs, minus READ_CPUS
    worker_gpus: float | None = None  # GPUs per actor; None: 1 if the cluster has GPUs
    object_store_mb: int = 1024  # object store of a local Ray started for this job


@dataclass(frozen=True)
class Placement:
    """The actor pool resolved against the cluster's resources."""

    workers: int
    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        """Intra-op threads per actor: its CPU share, at least one."""
        return max(1, round(self.cpus))


def place_workers(options: RayOptions, config: RunConfig, resources: dict[str, float]
                  ) -> Placement:
    """How many actors, with how many CPUs and GPUs each, for this cluster and device."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if config.device.startswith("cuda") and gpus == 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPUs; use --device cpu or auto")
    use_gpus = options.worker_gpus if options.worker_gpus is not None else (
        1.0 if gpus and config.device != "cpu" else 0.0)
    workers = options.workers or (int(gpus // use_gpus) if use_gpus else int(cpus) or 1)
    shared = max(cpus - READ_CPUS, 0.1) / workers  # rounded down to hundredths, as Ray does
    worker_cpus = options.worker_cpus or math.floor(shared * 100) / 100
    if workers * worker_cpus + READ_CPUS > cpus + 1e-9:
        raise ConfigError(
            f"{workers} workers × {worker_cpus} CPUs plus {READ_CPUS} for reading exceed the "
            f"cluster's {cpus:g} CPUs; lower --workers or --worker-cpus (fractions are fine)")
    if use_gpus and workers * use_gpus > gpus + 1e-9:
        raise ConfigError(f"{workers} workers × {use_gpus} GPUs exceed the cluster's {gpus:g}")
    return Placement(workers, worker_cpus, use_gpus)


def read_unit(row: dict, columns: Columns, windower: Windower, rule: ShardRule,
              finished: frozenset[int]) -> Iterator[dict]:
    """Ray Data ``flat_map``: one read unit → its unfinished shards (cut by the survey's
    ``rule``), tokenised and pickled."""
    unit: ReadUnit = pickle.loads(row["unit"])
    for shard in unit_shards(unit, columns, windower, rule):
        if shard.index not in finished:
            yield {"shard": shard.index, "tokens": shard.tokens, "payload": pickle.dumps(shard)}


class ShardWorker:
    """An inference actor: loads the model once, then analyses and writes whole shards."""

    def __init__(self, config: RunConfig, out: str, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        keep_freed_memory()
        self.config = config
        self.writer = job_writer(out, config)
        self.backend = create_backend(config.backend, config.model, config.device,
                                      config.dtype, config.allow_download, config.onnx)
        self.node = ray.get_runtime_context().get_node_id()
        self.runtime = json.dumps(self.backend.describe())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        done: dict[str, list] = collections.defaultdict(list)
        for payload in batch["payload"]:
            shard = pickle.loads(payload)
            tables = shard_tables(self.backend, shard, self.config)
            self.writer.write_shard(shard.index, tables)
            del tables
            release_freed_memory()
            for key, value in (("shard", shard.index), ("tokens", shard.tokens),
                               ("node", self.node), ("pid", os.getpid()),
                               ("runtime", self.runtime)):
                done[key].append(value)
        return dict(done)


def _connect(options: RayOptions) -> bool:
    """Join or start Ray; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster of this process
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # "local": a new Ray of this process, even if `ray start` runs on this machine
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 object_store_memory=options.object_store_mb * 1024**2)
    return True


@contextlib.contextmanager
def _one_shard_per_block() -> Iterator[None]:
    """Datasets made inside get a block per shard, and no Ray Data progress bars.

    A block is what Ray Data hands to one actor; by default a read task's shards would be
    packed into one block of up to 128 MB and go to a single actor. The context is captured
    when a dataset is created; this process's default context is restored afterwards.
    """
    import ray

    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.enable_progress_bars
    context.target_max_block_size, context.enable_progress_bars = 1, False
    try:
        yield
    finally:
        context.target_max_block_size, context.enable_progress_bars = saved


def _pipeline(units: list[ReadUnit], columns: Columns, windower: Windower, rule: ShardRule,
              finished: frozenset[int], config: RunConfig, out: Path, placement: Placement):
    """The Ray Data dataset of finished-shard records (lazy: runs while it is iterated)."""
    import ray

    rows = [{"unit": pickle.dumps(unit)} for unit in units]
    units_ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    shards_ds = units_ds.flat_map(
        # flat_map's stub takes a one-argument function; fn_kwargs supplies read_unit's others
        read_unit,  # type: ignore[arg-type]
        fn_kwargs={"columns": columns, "windower": windower,
                   "rule": rule, "finished": finished},
        num_cpus=READ_CPUS)
    return shards_ds.map_batches(
        ShardWorker, fn_constructor_kwargs={"config": config, "out": str(out),
                                            "threads": placement.threads},
        batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=placement.workers),
        num_cpus=placement.cpus, num_gpus=placement.gpus or None)


def run_ray_job(inputs: list[str | Path], out: str | Path, config: RunConfig | None = None,
                columns: Columns | None = None, resume: bool = False, overwrite: bool = False,
                options: RayOptions | None = None, progress: bool = True) -> JobResult:
    """Run a corpus job on a Ray cluster (or a local Ray) and return what it wrote."""
    import ray

    started = time.perf_counter()
    config, columns, options = config or RunConfig(), columns or Columns(), options or RayOptions()
    writer = job_writer(out, config)
    writer.check(resume=resume, overwrite=overwrite)
    # The driver needs the tokenizer and the model's shape only; workers load the weights
    # on their own devices. A CPU copy here keeps one code path with the local engine.
    driver_backend = create_backend(config.backend, config.model, "cpu", "float32",
                                    config.allow_download, config.onnx)
    started_ray = _connect(options)
    try:
        placement = place_workers(options, config, ray.cluster_resources())
        job = prepare(inputs, writer, driver_backend, config, columns, resume, overwrite)
        windower = job.windower  # the survey's
        assert windower is not None  # prepare() surveys with it
        del driver_backend
        todo = [u for u in job.found.units if not job.finished.issuperset(u.shard_indices)]
        log.info("ray: %d read units, %d shards to write; %d workers × %g CPUs, %g GPUs",
                 len(todo), job.found.shards - len(job.finished), placement.workers,
                 placement.cpus, placement.gpus)
        with _one_shard_per_block():
            records = _pipeline(todo, columns, windower, job.found.rule,
                                frozenset(job.finished), config, Path(out), placement)
        job.manifest["runtime"] = _collect(records, job, placement, progress)
    finally:
        if started_ray:
            ray.shutdown()
    return finish(job, started)


def _collect(records, job, placement: Placement, progress: bool) -> dict:
    """Follow the finished shards (progress bar) and describe how the job ran."""
    bar = progress_bar(job.found, progress)
    bar.update(sum(u.tokens for u in job.found.units
                   if job.finished.issuperset(u.shard_indices)))
    shards_by_node: collections.Counter = collections.Counter()
    runtime = dict(job.manifest["runtime"])  # the driver's, until a worker reports its own
    for record in records.iter_rows():
        bar.update(int(record["tokens"]))
        shards_by_node[record["node"]] += 1
        runtime = json.loads(record["runtime"])
        bar.set_postfix(shards=sum(shards_by_node.values()), nodes=len(shards_by_node))
    bar.close()
    written = sum(shards_by_node.values())
    expected = job.found.shards - len(job.finished)
    if written != expected:  # a retried shard is reported again: never fewer, maybe more
        log.info("ray: %d shard results for %d shards (some were retried)", written, expected)
    missing = set(range(job.found.shards)) - job.writer.finished_shards()
    if missing:
        raise RuntimeError(f"ray job ended with {len(missing)} shards unwritten "
                           f"(e.g. {sorted(missing)[:5]}); run it again with --resume")
    runtime.update(engine="ray", workers=placement.workers, worker_cpus=placement.cpus,
                   worker_gpus=placement.gpus, shards_by_node=dict(shards_by_node))
    return runtime
