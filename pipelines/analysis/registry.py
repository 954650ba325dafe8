"""The registry of analyses: what each one computes, which tables it writes, where it runs.

An analysis is one :class:`Analysis` entry. The corpus jobs (``analyse_batch``,
``shard_tables``, the writer's finish step, the manifest) and the HTTP service read the
registry, so adding an analysis is one module that builds an entry, plus either one line in
``BUILTIN`` or a ``register(...)`` call in a module loaded as a plugin (``--plugin`` of
``headscope run``, ``plugins:`` of the service config).

Canonical order: the built-in analyses in ``BUILTIN`` order, then plugins as they register.
``RunConfig.analyses`` holds names in this order, and tables come out in it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from pipelines.backends.batching import Batch
from pipelines.config import ConfigError, RunConfig
from pipelines.dataset import schema
from pipelines.dataset.schema import TableSpec
from pipelines.models import ModelInfo
from pipelines.text.plan import Shard
from pipelines.text.tokenize import Window

#: Modules whose ``ANALYSIS`` is registered first, in this (canonical) order.
BUILTIN = (
    "pipelines.analysis.patterns",
    "pipelines.analysis.words",
    "pipelines.analysis.similarity",
)


@dataclass(frozen=True)
class BatchContext:
    """What a per-batch analysis gets: one padded batch and its attention."""

    batch: Batch  # on the attention's device
    attn: torch.Tensor  # [L, B, H, S, S] float32, zeros on pad keys ([1, ...] if layerwise)
    info: ModelInfo
    config: RunConfig
    layer: int = 0  # the model layer of attn[0] (layerwise analyses see one at a time)

    @property
    def per_head_owner(self) -> np.ndarray:
        """The batch row of each row of a per-(window, layer, head) table of this context."""
        layers, size, heads = self.attn.shape[:3]
        return per_head_owner(layers, size, heads)


def per_head_owner(layers: int, size: int, heads: int) -> np.ndarray:
    """The batch row of each row of a per-(window, layer, head) table of ``size`` windows,
    in (batch row, layer, head) order (as ``pipelines.dataset.tables.per_head_columns`` lays
    them out)."""
    return np.repeat(np.arange(size), layers * heads)


#: Per-batch tables by name, each with the batch row (window) of every table row: rows must
#: come grouped by batch row, in the table's sort order within a window.
BatchTables = dict[str, tuple[pa.Table, np.ndarray]]


class ShardState(Protocol):
    """What an analysis accumulates over the batches of one shard of a corpus job."""

    def add(self, context: BatchContext) -> None: ...

    def tables(self) -> dict[str, pa.Table]: ...


@dataclass(frozen=True)
class Analysis:
    """One analysis.

    - ``tables``: the specs of every table it writes per shard (from batches, from text or
      from its shard state);
    - ``per_batch``: its tables of one batch (with row owners), or None;
    - ``text_tables``: tables made from the windows alone (no model), or None;
    - ``shard_state``: ``(model info, config, shard) → ShardState`` for results that
      accumulate over a shard of a corpus job (one partial table per shard), or None;
    - ``final_tables`` and ``finalise``: corpus-level tables written when a job finishes;
      ``finalise(dataset folder, finals)`` adds or replaces tables in ``finals`` (which holds
      ``head_summary`` and the tables of the analyses before it);
    - ``describe``: its entry in the manifest's ``analyses``;
    - ``service``: whether an HTTP request may ask for it;
    - ``layerwise``: its ``per_batch`` works on one layer at a time: the engine calls it once
      per layer with ``context.attn`` of shape [1, B, H, S, S] and ``context.layer`` set, and
      adds ``context.layer`` to the ``layer`` column of its tables. An analysis that is not
      layerwise (a per-batch one, or one with a shard state) gets every layer stacked
      ([L, B, H, S, S]), which the engine then holds for the whole batch.
    """

    name: str
    tables: tuple[TableSpec, ...] = ()
    per_batch: Callable[[BatchContext], BatchTables] | None = None
    text_tables: Callable[[list[Window]], dict[str, pa.Table]] | None = None
    shard_state: Callable[[ModelInfo, RunConfig, Shard], ShardState] | None = None
    final_tables: tuple[TableSpec, ...] = ()
    finalise: Callable[[Path, dict[str, pa.Table]], None] | None = None
    describe: Callable[[RunConfig], dict] = lambda config: {}
    service: bool = False
    layerwise: bool = False

    @property
    def needs_all_layers(self) -> bool:
        """Whether it reads every layer's attention at once (see ``layerwise``)."""
        return ((self.per_batch is not None and not self.layerwise)
                or self.shard_state is not None)


def layers_held(chosen: Iterable[str], num_layers: int) -> int:
    """Layers of attention a batch holds at once with the analyses ``chosen``: 1 when the
    engine streams layer by layer, ``num_layers`` when one of them needs every layer."""
    return num_layers if any(a.needs_all_layers for a in selected(chosen)) else 1


_REGISTRY: dict[str, Analysis] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        _add(importlib.import_module(module).ANALYSIS)


def _add(analysis: Analysis) -> None:
    for spec in (*analysis.tables, *analysis.final_tables):
        if spec.name in schema.CORE_TABLE_SPECS:
            raise ValueError(f"analysis {analysis.name!r}: table {spec.name!r} is a core table")
        owner = table_owner(spec.name)
        if owner is not None and owner != analysis.name:
            raise ValueError(f"analysis {analysis.name!r}: table {spec.name!r} already belongs "
                             f"to analysis {owner!r}")
    _REGISTRY[analysis.name] = analysis  # a module imported twice replaces its own entry


def register(analysis: Analysis) -> Analysis:
    """Add an analysis (after the built-in ones); registering a name again replaces it."""
    _load_builtins()
    if not analysis.name or "," in analysis.name or analysis.name != analysis.name.strip():
        raise ValueError(f"analysis name {analysis.name!r}: no commas or surrounding spaces")
    _add(analysis)
    return analysis


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module (which registers its analyses when imported)."""
    _load_builtins()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"plugin {module!r} cannot be imported: {exc}") from exc


def names() -> tuple[str, ...]:
    """Every registered analysis, in canonical order."""
    _load_builtins()
    return tuple(_REGISTRY)


def service_names() -> tuple[str, ...]:
    """The analyses an HTTP request may ask for."""
    return tuple(name for name, analysis in _entries() if analysis.service)


def _entries() -> list[tuple[str, Analysis]]:
    _load_builtins()
    return list(_REGISTRY.items())


def get(name: str) -> Analysis:
    _load_builtins()
    return _REGISTRY[name]


def selected(chosen: Iterable[str]) -> list[Analysis]:
    """The registered analyses among ``chosen``, in canonical order."""
    wanted = set(chosen)
    return [analysis for name, analysis in _entries() if name in wanted]


def parse_analyses(text: str) -> tuple[str, ...]:
    """``"patterns,words"`` → ("patterns", "words"), in canonical order; '' → ()."""
    return check_analyses(name.strip() for name in text.split(","))


def check_analyses(chosen: Iterable[str]) -> tuple[str, ...]:
    """Analysis names, checked against the registry, in canonical order."""
    wanted = {name for name in chosen if name}
    known = names()
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ConfigError(f"unknown analysis {', '.join(unknown)}: use {', '.join(known)}")
    return tuple(name for name in known if name in wanted)


def table_owner(table: str) -> str | None:
    """The analysis that writes ``table``, or None (a core table, or unknown)."""
    for name, analysis in _REGISTRY.items():
        if table in {spec.name for spec in (*analysis.tables, *analysis.final_tables)}:
            return name
    return None


def table_specs(chosen: Sequence[str] | None = None) -> dict[str, TableSpec]:
    """Specs of every table a job with analyses ``chosen`` (default: all) may write."""
    _load_builtins()
    specs = dict(schema.CORE_TABLE_SPECS)
    for analysis in selected(names() if chosen is None else chosen):
        specs.update({spec.name: spec for spec in (*analysis.tables, *analysis.final_tables)})
    return specs


def sort_keys(chosen: Sequence[str] | None = None) -> dict[str, list[str]]:
    return {name: list(spec.sort_keys) for name, spec in table_specs(chosen).items()}


def finalisers(chosen: Iterable[str]) -> list[Callable[[Path, dict[str, pa.Table]], None]]:
    """The corpus finalisers of the chosen analyses, in canonical order."""
    return [a.finalise for a in selected(chosen) if a.finalise is not None]


def describe(config: RunConfig) -> dict:
    """The manifest's ``analyses``: what each analysis of the job computes."""
    return {analysis.name: analysis.describe(config) for analysis in selected(config.analyses)}


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "ANALYSES":  # the registered names, as they are now
        return names()
    raise AttributeError(name)
