"""The model deployment: batches documents from concurrent requests into forward passes.

``analyse_documents`` is the batching logic as a plain function (tested without Serve);
``ModelWorker`` feeds it from a ``service.batcher.DynamicBatcher`` on a Ray Serve replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray import serve
from ray.serve.metrics import Counter, Histogram

from pipelines.analysis import registry
from pipelines.analysis.batch import model_tables
from pipelines.backends import Backend, create_backend
from pipelines.backends.base import Capability, require
from pipelines.backends.head_mask import HeadMask
from pipelines.config import AttentionMode, OnnxOptions, RunConfig
from pipelines.text.tokenize import Window
from service.batcher import DynamicBatcher
from service.config import ModelConfig

log = logging.getLogger(__name__)
BATCH_SIZE_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128]


@dataclass
class DocumentJob:
    """One document's windows and the options its request asked for."""

    windows: list[Window]
    attention: str
    local_window: int
    analyses: tuple[str, ...] = ()
    disable_heads: str | None = None  # HeadMask text, e.g. "3.5,0.*"
    capture_qk: bool = False  # also the qk table (torch backend only)
    entropy_epsilon: float = 0.0  # RunConfig.entropy_epsilon
    word_rows: str = "mean"  # RunConfig.word_rows


def _tag(windows: list[Window], key: str) -> list[Window]:
    """The same windows under a batch-unique doc_id (ids from different requests may clash)."""
    return [dataclasses.replace(w, doc=dataclasses.replace(w.doc, doc_id=key)) for w in windows]


def _key(index: int) -> str:
    """A job's batch-unique doc_id: zero-padded, so keys sort in job order."""
    return f"{index:08d}"


def _split(tables: dict[str, pa.Table], members: list[int],
           doc_ids: list[str]) -> list[dict[str, pa.Table]]:
    """Each member job's rows (zero-copy slices: rows are sorted by key) under its doc_id."""
    out: list[dict[str, pa.Table]] = [{} for _ in members]
    keys = pa.array([_key(i) for i in members], pa.string())
    for name, table in tables.items():
        owner = pc.index_in(table["doc_id"], keys).to_numpy(zero_copy_only=False)
        bounds = np.searchsorted(owner, np.arange(len(members) + 1))
        column = table.schema.get_field_index("doc_id")
        for j, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            part = table.slice(start, stop - start)
            ids = pa.repeat(pa.scalar(doc_ids[j], pa.string()), part.num_rows)
            out[j][name] = part.set_column(column, "doc_id", ids)
    return out


def disabled_heads(backend: Backend, text: str | None) -> AbstractContextManager[None]:
    """The backend with the heads of ``text`` ("3.5,0.*") disabled, or unchanged for None."""
    if not text:
        return contextlib.nullcontext()
    require(backend, Capability.HEAD_MASKING, "disable_heads")
    info = backend.info
    return backend.disabled_heads(HeadMask.parse(text, info.num_layers, info.num_heads))


def job_config(job: DocumentJob, batch_tokens: int) -> RunConfig:
    """The run settings of one document's request options."""
    return RunConfig(attention=AttentionMode.parse(job.attention), local_window=job.local_window,
                     batch_tokens=batch_tokens, analyses=job.analyses, capture_qk=job.capture_qk,
                     entropy_epsilon=job.entropy_epsilon, word_rows=job.word_rows)


def analyse_documents(backend: Backend, jobs: list[DocumentJob],
                      batch_tokens: int) -> list[dict[str, pa.Table]]:
    """head_stats and attention for every job, computed in as few forward passes as possible.

    Jobs that share options are analysed together (one length-bucketed batching over all of
    their windows); results come back in job order, under each job's own doc_id.
    """
    results: list[dict[str, pa.Table] | None] = [None] * len(jobs)
    groups: dict[tuple[RunConfig, str | None], list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((job_config(job, batch_tokens), job.disable_heads), []).append(index)
    for (config, disable_heads), members in groups.items():
        windows = [w for i in members for w in _tag(jobs[i].windows, _key(i))]
        with disabled_heads(backend, disable_heads):
            tables = model_tables(backend, windows, config)
        doc_ids = [jobs[i].windows[0].doc.doc_id for i in members]
        for i, part in zip(members, _split(tables, members, doc_ids), strict=True):
            results[i] = part
    return [r for r in results if r is not None]


@serve.deployment
class ModelWorker:
    """A replica holding one model; documents from concurrent requests share batches."""

    def __init__(self, config: ModelConfig, plugins: list[str] | None = None) -> None:
        registry.load_plugins(plugins or [])  # the analyses requests may name
        self.config = config
        self.backend = create_backend(config.backend, config.model, config.device, config.dtype,
                                      onnx=OnnxOptions(**config.onnx.model_dump()))
        # its asyncio objects bind to the replica's event loop on first use
        self.batcher = DynamicBatcher(self._analyse_batch, config.max_batch_size,
                                      config.batch_wait_timeout_s)
        self.tags = {"model": config.name}
        self.documents = Counter("headscope_documents", "documents analysed", tag_keys=("model",))
        self.tokens = Counter("headscope_tokens", "tokens analysed", tag_keys=("model",))
        self.batch_sizes = Histogram("headscope_batch_size", "documents per forward batch",
                                     boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("model",))
        self.recent_batch_sizes: list[int] = []

    def describe(self) -> dict:
        """The model's facts, the runtime's (as a manifest records them) and its capabilities."""
        info = self.backend.info.to_dict()
        capabilities = sorted(c.value for c in self.backend.capabilities)
        return {**info, "runtime": self.backend.describe(), "capabilities": capabilities}

    def batch_size_log(self) -> list[int]:
        """Sizes of the most recent batches (for tests and the load benchmark)."""
        return list(self.recent_batch_sizes)

    async def analyse(self, job: DocumentJob) -> dict[str, pa.Table]:
        """One document's tables, computed in a batch with the documents of other requests."""
        return await self.batcher.submit(job)

    async def _analyse_batch(self, jobs: list[DocumentJob]) -> list[dict[str, pa.Table]]:
        # In a thread: the event loop keeps taking requests while this batch runs.
        results = await asyncio.to_thread(analyse_documents, self.backend, jobs,
                                          self.config.batch_tokens)
        self.batch_sizes.observe(len(jobs), tags=self.tags)
        self.documents.inc(len(jobs), tags=self.tags)
        self.tokens.inc(sum(w.n_tokens for job in jobs for w in job.windows), tags=self.tags)
        self.recent_batch_sizes = (self.recent_batch_sizes + [len(jobs)])[-1000:]
        return results
