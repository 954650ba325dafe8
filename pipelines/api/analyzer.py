"""Analysing texts in this process: a loaded model (``Analyzer``) and ``analyze``.

``pipelines.analyze(texts, ...)`` runs the stages of a corpus job on texts given in Python
(``pipelines.jobs.local.run_windowed``: the same shards, batches, tables, writer and
summaries as ``headscope run``) into a temporary dataset, and returns a
:class:`~pipelines.api.result.Result`. The model stays loaded: ``analyze`` keeps one
``Analyzer`` per model and device options (``cache_info()``, ``clear_cache()``), and an
``Analyzer`` held by the caller keeps its own.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.analysis.registry import check_analyses, parse_analyses
from pipelines.api.result import Result
from pipelines.api.texts import SOURCE, Texts, documents, windowed
from pipelines.backends import Backend, create_backend
from pipelines.compute.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, parse_size
from pipelines.config import AttentionMode, ConfigError, OnnxOptions, RunConfig, WindowConfig
from pipelines.jobs.local import memory_input, run_windowed
from pipelines.text.tokenize import Windower


@dataclass(frozen=True)
class ModelKey:
    """What loading a model depends on: ``analyze`` keeps one Analyzer per key."""

    model: str = "minilm"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    allow_download: bool = False
    onnx: OnnxOptions = OnnxOptions()


class Analyzer:
    """A model loaded once, analysing texts in this process; ``analyze`` calls cost only their
    forward passes.

        an = Analyzer("minilm", device="cpu")
        result = an.analyze(["The cat sat on the mat."], attention="full")
    """

    def __init__(self, model: str = "minilm", *, backend: str = "auto", device: str = "auto",
                 dtype: str = "float32", allow_download: bool = False, onnx_threads: int = 0,
                 onnx_inter_threads: int = 0) -> None:
        """Load ``model`` (a registry name, a local folder, or a hub id with
        ``allow_download``); the options are ``headscope run``'s. ConfigError on a bad one."""
        key = ModelKey(model, backend, device, dtype, allow_download,
                       OnnxOptions(onnx_threads, onnx_inter_threads))
        started = time.perf_counter()
        loaded = create_backend(backend, model, device, dtype, allow_download, key.onnx)
        self._init(key, loaded, time.perf_counter() - started)

    @classmethod
    def from_backend(cls, backend: Backend, key: ModelKey) -> Analyzer:
        """An Analyzer around a backend already loaded with the options of ``key``."""
        analyzer = cls.__new__(cls)
        analyzer._init(key, backend, 0.0)
        return analyzer

    def _init(self, key: ModelKey, backend: Backend, load_seconds: float) -> None:
        self.key, self.backend, self.load_seconds = key, backend, load_seconds

    def config(self, attention: str = "topk:8", analyses: Sequence[str] | str = (),
               max_length: int | None = None, stride: int = 64, truncate: bool = False,
               local_window: int = 2, batch_tokens: int = 8192, shard_tokens: int = 32768,
               similarity_docs: int = 0, capture_qk: bool = False,
               memory_budget: int | str = DEFAULT_MEMORY_BUDGET) -> RunConfig:
        """The RunConfig ``headscope run`` builds from the same options (ConfigError).
        ``memory_budget``: bytes, or a size such as "4GiB" (``--memory-budget``)."""
        for name, value in (("batch_tokens", batch_tokens), ("shard_tokens", shard_tokens)):
            if value < 1:
                raise ConfigError(f"{name} must be a positive integer")
        if similarity_docs < 0:
            raise ConfigError("similarity_docs must be 0 (all documents) or positive")
        chosen = (parse_analyses(analyses) if isinstance(analyses, str)
                  else check_analyses(analyses))
        key = self.key
        return RunConfig(model=key.model, backend=key.backend, device=key.device,
                         dtype=key.dtype, attention=AttentionMode.parse(attention),
                         windows=WindowConfig(max_length, stride, truncate),
                         batch_tokens=batch_tokens, local_window=local_window,
                         shard_tokens=shard_tokens, allow_download=key.allow_download,
                         onnx=key.onnx, analyses=chosen, similarity_docs=similarity_docs,
                         capture_qk=capture_qk,
                         memory_budget=MemoryBudget(parse_size(memory_budget)).total)

    def analyze(self, texts: Texts, *, attention: str = "topk:8",
                analyses: Sequence[str] | str = (), max_length: int | None = None,
                stride: int = 64, truncate: bool = False, local_window: int = 2,
                batch_tokens: int = 8192, shard_tokens: int = 32768, similarity_docs: int = 0,
                capture_qk: bool = False, memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
                progress: bool = True) -> Result:
        """Every table ``headscope run`` writes for ``texts``, computed in this process.

        ``texts``: a string, a list of strings and ``(text, text_pair)`` tuples, or a
        DataFrame with ``text`` (and optional ``text_pair``, ``id``) columns. The options
        are ``headscope run``'s (``attention`` "none", "topk:K", "threshold:T" or "full";
        ``analyses`` names or "patterns,words"). Raises InputError naming ``texts[i]`` (blank
        text, no content for the model, duplicate id) and ConfigError for a bad option;
        nothing is computed then.
        """
        config = self.config(attention, analyses, max_length, stride, truncate, local_window,
                             batch_tokens, shard_tokens, similarity_docs, capture_qk,
                             memory_budget)
        docs = documents(texts)
        windows = windowed(docs, Windower(self.backend.tokenizer, self.backend.info,
                                          config.windows))
        folder = Path(tempfile.mkdtemp(prefix="headscope-analyze-"))
        try:
            job = run_windowed(windows, folder, config, self.backend,
                               memory_input(docs, SOURCE), progress)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Result(folder, [doc.doc_id for doc in docs], job.seconds)

    def __repr__(self) -> str:
        info, runtime = self.backend.info, self.backend.describe()
        return (f"Analyzer({self.key.model!r}: {info.num_layers} layers × {info.num_heads} "
                f"heads, {runtime.get('backend', '?')} on {runtime.get('device', '?')}, "
                f"loaded in {self.load_seconds:.1f} s)")


@dataclass
class CacheInfo:
    """What ``analyze``'s cache did: models loaded, calls that found theirs loaded, and the
    keys of the models it holds."""

    loads: int
    hits: int
    models: list[ModelKey]


_analyzers: dict[ModelKey, Analyzer] = {}
_counts = {"loads": 0, "hits": 0}
_lock = threading.Lock()


def analyzer(model: str = "minilm", *, backend: str = "auto", device: str = "auto",
             dtype: str = "float32", allow_download: bool = False, onnx_threads: int = 0,
             onnx_inter_threads: int = 0) -> Analyzer:
    """The cached Analyzer of these options, loading the model on first use."""
    key = ModelKey(model, backend, device, dtype, allow_download,
                   OnnxOptions(onnx_threads, onnx_inter_threads))
    with _lock:
        if key in _analyzers:
            _counts["hits"] += 1
            return _analyzers[key]
        loaded = Analyzer(model, backend=backend, device=device, dtype=dtype,
                          allow_download=allow_download, onnx_threads=onnx_threads,
                          onnx_inter_threads=onnx_inter_threads)
        _counts["loads"] += 1
        _analyzers[key] = loaded
        return loaded


def cache_info() -> CacheInfo:
    with _lock:
        return CacheInfo(_counts["loads"], _counts["hits"], list(_analyzers))


def clear_cache() -> None:
    """Forget the cached models (their memory is freed once nothing else holds them)."""
    with _lock:
        _analyzers.clear()


def analyze(texts: Texts, model: str = "minilm", *, attention: str = "topk:8",
            analyses: Sequence[str] | str = (), max_length: int | None = None,
            stride: int = 64, truncate: bool = False, local_window: int = 2,
            batch_tokens: int = 8192, shard_tokens: int = 32768, similarity_docs: int = 0,
            capture_qk: bool = False, memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
            progress: bool = True, backend: str = "auto",
            device: str = "auto", dtype: str = "float32", allow_download: bool = False,
            onnx_threads: int = 0, onnx_inter_threads: int = 0) -> Result:
    """:meth:`Analyzer.analyze` with the cached Analyzer of ``model`` and the device options
    (``backend``, ``device``, ``dtype``, ``allow_download``, ONNX threads): a second call with
    the same ones reuses the loaded model."""
    loaded = analyzer(model, backend=backend, device=device, dtype=dtype,
                      allow_download=allow_download, onnx_threads=onnx_threads,
                      onnx_inter_threads=onnx_inter_threads)
    return loaded.analyze(texts, attention=attention, analyses=analyses, max_length=max_length,
                          stride=stride, truncate=truncate, local_window=local_window,
                          batch_tokens=batch_tokens, shard_tokens=shard_tokens,
                          similarity_docs=similarity_docs, capture_qk=capture_qk,
                          memory_budget=memory_budget, progress=progress)
