"""``headscope factors apply``: sparse codes of every token, and each factor's top contexts.

Writes a dataset folder (``Dataset.open`` reads it) with, per shard of documents:

- ``documents`` and ``tokens``: as a corpus job writes them;
- ``factor_activations``: (doc_id, window, layer, position, factor, activation), non-zero
  codes only;

and, once the corpus is done:

- ``factor_top``: each factor's ``top`` strongest activations per layer, with the token and
  its context;
- ``factor_profile``: per factor and layer, the mean activation per token and the share of
  tokens where it is active, and where over the layers it peaks (low, middle, high).

Memory stays flat: codes are written per shard and the top lists are bounded.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from pipelines.analysis.batch import sort_tables
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.sparse_coding import encode
from pipelines.config import ConfigError, RunConfig, WindowConfig
from pipelines.dataset.labels import token_labels
from pipelines.dataset.manifest import FACTOR_CODES_FORMAT, FACTORS_FORMAT, header
from pipelines.dataset.schema import INDEX
from pipelines.dataset.tables import documents_table, tokens_table
from pipelines.dataset.writer import (
    DatasetWriter,
    atomic_write_json,
    atomic_write_parquet,
    part_name,
)
from pipelines.jobs.factors.hidden import TokenRows, token_rows
from pipelines.jobs.factors.train import DICTIONARY, MANIFEST
from pipelines.jobs.local import survey
from pipelines.text.inputs import Columns, expand, validate
from pipelines.text.plan import Shard, ShardRule, unit_shards
from pipelines.text.tokenize import Windower

log = logging.getLogger(__name__)
#: Tokens of context kept on each side of a top activation.
CONTEXT = 12
PEAKS = ("low", "middle", "high")

FACTOR_ACTIVATIONS = pa.schema([
    ("doc_id", pa.string()), ("window", INDEX), ("layer", INDEX), ("position", INDEX),
    ("factor", INDEX), ("activation", pa.float32())])
ACTIVATION_KEYS = ("doc_id", "window", "layer", "position", "factor")
TOKEN_KEYS = ("doc_id", "window", "position")
FACTOR_TOP = pa.schema([
    ("factor", INDEX), ("layer", INDEX), ("rank", INDEX), ("activation", pa.float32()),
    ("doc_id", pa.string()), ("window", INDEX), ("position", INDEX), ("token", pa.string()),
    ("before", pa.string()), ("after", pa.string())])
FACTOR_PROFILE = pa.schema([
    ("factor", INDEX), ("layer", INDEX), ("mean_activation", pa.float64()),
    ("active_share", pa.float64()), ("peak_layer", INDEX), ("peak", pa.string())])


@dataclass
class Dictionary:
    """A trained dictionary and its manifest."""

    atoms: torch.Tensor  # [k, D]
    manifest: dict

    @classmethod
    def load(cls, folder: str | Path) -> Dictionary:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file() or not (folder / DICTIONARY).is_file():
            raise ConfigError(f"{folder} is not a factors dictionary (no {MANIFEST} and "
                              f"{DICTIONARY}); make one with `headscope factors train`")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FACTORS_FORMAT:
            raise ConfigError(f"{folder}: format {manifest.get('format')!r}, "
                              f"expected {FACTORS_FORMAT}")
        return cls(load_file(str(folder / DICTIONARY))["dictionary"], manifest)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])


@dataclass
class TopActivations:
    """The ``top`` strongest activations of every (factor, layer), kept as the codes stream by."""

    top: int
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)

    def add(self, rows: pd.DataFrame) -> None:
        merged = pd.concat([self.frame, rows]) if len(self.frame) else rows
        merged = merged.sort_values(["factor", "layer", "activation", "doc_id", "window",
                                     "position"], ascending=[True, True, False, True, True,
                                                              True], kind="stable")
        self.frame = merged.groupby(["factor", "layer"], sort=False).head(self.top)


@dataclass
class Profile:
    """Per (layer, factor): summed activation and active count; tokens per layer."""

    layers: tuple[int, ...]
    n_factors: int
    total: np.ndarray = field(init=False)  # [layers, k]
    active: np.ndarray = field(init=False)  # [layers, k]
    tokens: np.ndarray = field(init=False)  # [layers]

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.n_factors)
        self.total, self.active = np.zeros(shape), np.zeros(shape)
        self.tokens = np.zeros(len(self.layers))

    def add(self, layer_slot: np.ndarray, codes: torch.Tensor) -> None:
        codes_np = codes.cpu().numpy()
        for slot in np.unique(layer_slot):
            part = codes_np[layer_slot == slot]
            self.total[slot] += part.sum(axis=0)
            self.active[slot] += (part > 0).sum(axis=0)
            self.tokens[slot] += len(part)

    def table(self) -> pa.Table:
        mean = self.total / np.maximum(self.tokens, 1)[:, None]  # [layers, k]
        share = self.active / np.maximum(self.tokens, 1)[:, None]
        peak_slot = mean.argmax(axis=0)  # [k]
        thirds = np.minimum(3 * peak_slot // max(len(self.layers), 1), 2)
        layer, factor = np.meshgrid(np.arange(len(self.layers)), np.arange(self.n_factors),
                                    indexing="ij")
        layers = np.asarray(self.layers)
        return pa.table({
            "factor": factor.ravel().astype(np.int32),
            "layer": layers[layer.ravel()].astype(np.int32),
            "mean_activation": mean.ravel(), "active_share": share.ravel(),
            "peak_layer": layers[peak_slot][factor.ravel()].astype(np.int32),
            "peak": pa.array(PEAKS).take(pa.array(thirds[factor.ravel()].astype(np.int64))),
        }, schema=FACTOR_PROFILE).sort_by([("factor", "ascending"), ("layer", "ascending")])


def activation_rows(rows: TokenRows, codes: torch.Tensor) -> pd.DataFrame:
    """The non-zero codes of ``rows`` as factor_activations rows."""
    row, factor = torch.nonzero(codes, as_tuple=True)
    row_np = row.cpu().numpy()
    windows = rows.windows
    owner = rows.window_index[row_np]
    return pd.DataFrame({
        "doc_id": [windows[i].doc.doc_id for i in owner],
        "window": np.array([windows[i].window for i in owner], dtype=np.int32),
        "layer": rows.layer[row_np].astype(np.int32),
        "position": rows.position[row_np].astype(np.int32),
        "factor": factor.cpu().numpy().astype(np.int32),
        "activation": codes[row, factor].cpu().numpy().astype(np.float32),
    })


def apply_factors(dictionary_dir: str | Path, inputs: list[str | Path], out: str | Path,
                  columns: Columns | None = None, windows: WindowConfig | None = None,
                  device: str = "auto", top: int = 20, shard_tokens: int = 32768,
                  batch_tokens: int = 8192, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Encode every token of ``inputs`` with a trained dictionary; write ``out``."""
    started = time.perf_counter()
    columns, windows = columns or Columns(), windows or WindowConfig()
    dictionary = Dictionary.load(dictionary_dir)
    writer = DatasetWriter(out)
    writer.check(overwrite=overwrite)
    files = expand(inputs)
    summary = validate(files, columns)
    backend = _backend(dictionary, device)
    windower = Windower(backend.tokenizer, backend.info, windows)
    plan_config = RunConfig(shard_tokens=shard_tokens, windows=windows,
                            attention=RunConfig().attention)
    rule = ShardRule(shard_tokens)  # its rows are codes, not attention: shards close on tokens
    found = survey(files, columns, windower, plan_config, backend.info, rule)
    log.info("apply: %d documents, %d tokens, %d layers × %d factors",
             summary.documents, found.tokens, len(dictionary.layers),
             dictionary.manifest["n_factors"])
    root = _open(Path(out), dictionary, summary, overwrite)
    atoms = dictionary.atoms.to(backend.device)
    gram = atoms @ atoms.T  # [k, k]
    best = TopActivations(top)
    profile = Profile(dictionary.layers, len(atoms))
    bar = tqdm(total=found.tokens, unit="tok", unit_scale=True, disable=not progress,
               desc="encoding", dynamic_ncols=True)
    for unit in found.units:
        for shard in unit_shards(unit, columns, windower, rule):
            _write_shard(root, shard, backend, dictionary, atoms, gram, best, profile,
                         batch_tokens)
            bar.update(shard.tokens)
    bar.close()
    return _finish(root, best, profile, dictionary, summary, found.tokens,
                   time.perf_counter() - started)


def _backend(dictionary: Dictionary, device: str) -> TorchBackend:
    model = dictionary.manifest["model"]
    backend = TorchBackend(model["path"], device)
    if backend.info.config_hash != model["config_hash"]:
        raise ConfigError(f"the model at {model['path']} changed since the dictionary was "
                          "trained (config hash differs); train a new dictionary")
    return backend


def _open(root: Path, dictionary: Dictionary, summary, overwrite: bool) -> Path:
    if overwrite and root.is_dir():
        shutil.rmtree(root)  # DatasetWriter.check allowed it: a dataset folder
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MANIFEST, {
        **header(FACTOR_CODES_FORMAT),
        "model": dictionary.manifest["model"], "dictionary": dictionary.manifest,
        "input": {"files": summary.files, "documents": summary.documents,
                  "fingerprint": summary.fingerprint}})
    return root


def _write_shard(root: Path, shard: Shard, backend: TorchBackend, dictionary: Dictionary,
                 atoms: torch.Tensor, gram: torch.Tensor, best: TopActivations,
                 profile: Profile, batch_tokens: int) -> None:
    """Encode one shard's tokens; write its documents, tokens and non-zero codes."""
    config = dictionary.manifest["config"]
    layers = np.asarray(dictionary.layers)
    parts = []
    for rows in token_rows(backend, shard.windows, dictionary.layers, batch_tokens,
                           config["include_special"], config["normalise"]):
        codes = encode(rows.vectors, atoms, dictionary.manifest["sparsity"],
                       config["encode_steps"], gram=gram)
        frame = activation_rows(rows, codes)
        parts.append(frame)
        best.add(frame)
        profile.add(np.searchsorted(layers, rows.layer), codes)
    codes_table = pa.Table.from_pandas(pd.concat(parts), schema=FACTOR_ACTIVATIONS,
                                       preserve_index=False)
    tables = sort_tables({"documents": documents_table(shard.windows),
                                 "tokens": tokens_table(shard.windows)})
    tables["factor_activations"] = codes_table.sort_by(
        [(key, "ascending") for key in ACTIVATION_KEYS])
    for name, table in tables.items():
        atomic_write_parquet(root / name / part_name(shard.index), table, 131072)


def _finish(root: Path, best: TopActivations, profile: Profile, dictionary: Dictionary,
            summary, tokens: int, seconds: float) -> dict:
    top = _with_context(root, best.frame)
    atomic_write_parquet(root / "factor_top" / part_name(0), top, 65536)
    atomic_write_parquet(root / "factor_profile" / part_name(0), profile.table(), 65536)
    manifest = json.loads((root / MANIFEST).read_text())
    codes = int(profile.active.sum())  # every non-zero code was counted once by the profile
    manifest.update(status="complete", seconds=seconds, counts={
        "documents": summary.documents, "tokens": tokens,
        "factor_activations": codes, "factor_top": top.num_rows})
    atomic_write_json(root / MANIFEST, manifest)
    log.info("wrote %s: %d non-zero codes for %d tokens in %.1f s", root,
             codes, tokens, seconds)
    return manifest


def _with_context(root: Path, frame: pd.DataFrame) -> pa.Table:
    """The top activations with their token and ``CONTEXT`` tokens each side.

    The tokens are read one part at a time, keeping only positions within ``CONTEXT`` of a
    top activation, so memory is bounded by the top lists, not by the corpus.
    """
    if frame.empty:
        return FACTOR_TOP.empty_table()
    frame = frame.reset_index(drop=True)
    frame["rank"] = frame.groupby(["factor", "layer"]).cumcount()
    near = _context_keys(frame[list(TOKEN_KEYS)].drop_duplicates())
    token_at = pd.concat([_tokens_part(part).merge(near, on=list(TOKEN_KEYS))
                          for part in sorted((root / "tokens").glob("part-*.parquet"))]
                         ).set_index(list(TOKEN_KEYS))["token"]
    shifted = {offset: _shifted_tokens(frame, token_at, offset)
               for offset in range(-CONTEXT, CONTEXT + 1)}
    frame["token"] = shifted[0]
    frame["before"] = _joined([shifted[o] for o in range(-CONTEXT, 0)])
    frame["after"] = _joined([shifted[o] for o in range(1, CONTEXT + 1)])
    return pa.Table.from_pandas(frame[FACTOR_TOP.names], schema=FACTOR_TOP,
                                preserve_index=False)


def _context_keys(anchors: pd.DataFrame) -> pd.DataFrame:
    """(doc_id, window, position) of every token within ``CONTEXT`` of an anchor."""
    offsets = np.arange(-CONTEXT, CONTEXT + 1)
    near = anchors.loc[anchors.index.repeat(len(offsets))]
    near = near.assign(position=near["position"].to_numpy(np.int64)
                       + np.tile(offsets, len(anchors)))
    return near[near["position"] >= 0].drop_duplicates()


def _tokens_part(part: Path) -> pd.DataFrame:
    """A part's tokens, ``token`` being what a person reads (``token_labels``)."""
    table = pq.read_table(part, columns=[*TOKEN_KEYS, "token", "surface"])
    tokens = table.select(list(TOKEN_KEYS)).to_pandas()
    tokens["token"] = token_labels(table)
    return tokens.astype({"doc_id": str, "position": np.int64})


def _shifted_tokens(frame: pd.DataFrame, token_at: pd.Series, offset: int) -> list:
    """The token ``offset`` positions from each top activation (NaN past its window's ends)."""
    index = pd.MultiIndex.from_arrays([frame["doc_id"], frame["window"],
                                       frame["position"].to_numpy(np.int64) + offset])
    return token_at.reindex(index).tolist()


def _joined(columns: list[list]) -> list[str]:
    """Row-wise " ".join of the tokens that exist (a context stops at its window's ends)."""
    return [" ".join(t for t in row if isinstance(t, str)) for row in zip(*columns, strict=True)]
