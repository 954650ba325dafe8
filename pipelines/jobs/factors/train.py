"""``headscope factors train``: one dictionary of transformer factors for chosen layers.

The corpus is streamed: each forward batch's token vectors go into a bounded shuffle buffer,
and every full minibatch updates the dictionary online (:class:`DictionaryLearner`). Memory is
the model, the buffer and the learner's state (O(factors × (factors + width))), whatever the
corpus size. After the last epoch, one more pass encodes every row with the final dictionary
and measures the reconstruction error and the number of active factors, per layer.

The output folder holds ``dictionary.safetensors`` (the atoms, [factors, width]) and
``manifest.json`` (model, layers, sizes, sparsity, errors, settings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.sparse_coding import DictionaryLearner, encode
from pipelines.config import ConfigError, WindowConfig
from pipelines.dataset.manifest import FACTORS_FORMAT, header, model_entry
from pipelines.dataset.writer import DatasetWriter, atomic_write_json, replacing
from pipelines.jobs.factors.hidden import TokenRows, parse_layers, token_rows
from pipelines.text.inputs import Columns, expand, read_documents, validate
from pipelines.text.plan import document_windows
from pipelines.text.tokenize import Window, Windower

log = logging.getLogger(__name__)
DICTIONARY = "dictionary.safetensors"
MANIFEST = "manifest.json"
#: Windows handed to the model at a time while streaming (bounds the tokenised text in memory).
WINDOW_CHUNK = 256


@dataclass(frozen=True)
class FactorConfig:
    """What a dictionary is learned from and how (saved in its manifest)."""

    model: str = "minilm"
    device: str = "auto"
    layers: str = "all"  # hidden-state layers: 0 = embeddings .. num_layers
    n_factors: int = 1024
    sparsity: float = 0.1  # λ of the lasso penalty, for unit-length rows
    epochs: int = 1
    minibatch: int = 4096  # rows per dictionary update
    shuffle_batches: int = 4  # the shuffle buffer holds this many minibatches
    batch_tokens: int = 8192  # padded tokens per forward pass
    nonneg_dict: bool = False  # also keep the atoms non-negative (codes always are)
    #: FISTA steps per row: few while training (inexact codes are enough for the online
    #: updates), more for the evaluation pass and ``apply`` (benchmarks/factor_solver.py).
    train_steps: int = 50
    encode_steps: int = 100
    include_special: bool = False  # [CLS], [SEP], ... rows too
    normalise: bool = True  # unit-length rows: one λ means the same at every layer
    seed: int = 0
    windows: WindowConfig = field(default_factory=WindowConfig)

    def check(self) -> None:
        for name in ("n_factors", "epochs", "minibatch", "shuffle_batches", "batch_tokens",
                     "train_steps", "encode_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.sparsity <= 0:
            raise ConfigError("--sparsity must be positive (the lasso penalty λ)")


@dataclass
class LayerErrors:
    """Running sums for the per-layer reconstruction error and code sparsity."""

    squared_error: dict[int, float] = field(default_factory=dict)
    squared_norm: dict[int, float] = field(default_factory=dict)
    #: Σ‖min(x, 0)‖²: what non-negative atoms with non-negative codes can never rebuild
    squared_negative: dict[int, float] = field(default_factory=dict)
    active: dict[int, float] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)

    def add(self, rows: TokenRows, codes: torch.Tensor, dictionary: torch.Tensor) -> None:
        residual = (rows.vectors - codes @ dictionary).square().sum(dim=1)  # [N]
        energy = rows.vectors.square().sum(dim=1)  # [N]
        negative = rows.vectors.clamp_max(0).square().sum(dim=1)  # [N]
        active = (codes > 0).sum(dim=1).float()  # [N]
        for layer in np.unique(rows.layer):
            mask = torch.from_numpy(rows.layer == layer).to(codes.device)
            key = int(layer)
            for store, values in ((self.squared_error, residual), (self.squared_norm, energy),
                                  (self.squared_negative, negative), (self.active, active)):
                store[key] = store.get(key, 0.0) + float(values[mask].sum())
            self.rows[key] = self.rows.get(key, 0) + int(mask.sum())

    def report(self) -> dict:
        layers = sorted(self.rows)
        total = sum(self.rows.values())
        return {
            "relative_error_by_layer": {str(x): self.squared_error[x] / self.squared_norm[x]
                                        for x in layers},
            "relative_error": sum(self.squared_error.values()) / sum(self.squared_norm.values()),
            "nonneg_floor_by_layer": {str(x): self.squared_negative[x] / self.squared_norm[x]
                                      for x in layers},
            "nonneg_floor": (sum(self.squared_negative.values())
                             / sum(self.squared_norm.values())),
            "mean_active_by_layer": {str(x): self.active[x] / self.rows[x] for x in layers},
            "mean_active": sum(self.active.values()) / total,
            "rows_by_layer": {str(x): self.rows[x] for x in layers},
        }


def corpus_rows(backend: TorchBackend, files: list[Path], columns: Columns,
                windower: Windower, config: FactorConfig,
                layers: tuple[int, ...]) -> Iterator[TokenRows]:
    """Every selected token vector of the corpus, in reading order, batch by batch."""
    chunk: list[Window] = []
    for doc in read_documents(files, columns):
        chunk.extend(document_windows(windower, doc))
        if len(chunk) >= WINDOW_CHUNK:
            yield from token_rows(backend, chunk, layers, config.batch_tokens,
                                  config.include_special, config.normalise)
            chunk = []
    if chunk:
        yield from token_rows(backend, chunk, layers, config.batch_tokens,
                              config.include_special, config.normalise)


def minibatches(stream: Iterator[TokenRows], size: int, buffer_batches: int,
                generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Rows of ``stream`` in shuffled minibatches of ``size`` (the last may be smaller).

    A buffer of ``buffer_batches`` minibatches is filled, shuffled and emptied by minibatches,
    so one minibatch mixes documents and layers.
    """
    buffer: list[torch.Tensor] = []
    held = 0
    for rows in stream:
        buffer.append(rows.vectors)
        held += len(rows.vectors)
        if held >= size * buffer_batches:
            yield from _drain(torch.cat(buffer), size, generator)
            buffer, held = [], 0
    if buffer:
        yield from _drain(torch.cat(buffer), size, generator)


def _drain(rows: torch.Tensor, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(len(rows), generator=generator).to(rows.device)
    for start in range(0, len(rows), size):
        yield rows[order[start:start + size]]


def count_rows(files: list[Path], columns: Columns, windower: Windower,
               config: FactorConfig, layers: tuple[int, ...]) -> tuple[int, int]:
    """Tokens of the corpus and the rows they give (tokenising only): the job's size."""
    tokens = rows = 0
    for doc in read_documents(files, columns):
        for window in document_windows(windower, doc):
            kept = window.n_tokens - (0 if config.include_special
                                      else int(window.is_special.sum()))
            tokens, rows = tokens + window.n_tokens, rows + kept * len(layers)
    return tokens, rows


def train_factors(inputs: list[str | Path], out: str | Path, config: FactorConfig | None = None,
                  columns: Columns | None = None, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Learn a dictionary over ``inputs`` and write it to ``out``; return its manifest."""
    started = time.perf_counter()
    config, columns = config or FactorConfig(), columns or Columns()
    config.check()
    writer = DatasetWriter(out)
    writer.check(overwrite=overwrite)
    files = expand(inputs)
    summary = validate(files, columns)
    backend = TorchBackend(config.model, config.device)
    info = backend.info
    layers = parse_layers(config.layers, info.num_layers)
    windower = Windower(backend.tokenizer, info, config.windows)
    tokens, n_rows = count_rows(files, columns, windower, config, layers)
    width = int(backend.model.config.hidden_size)
    log.info("factors: %d documents, %d tokens → %s rows of width %d (%d layers); "
             "%d factors = %.1f MB of dictionary; %d epoch(s) + 1 evaluation pass",
             summary.documents, tokens, f"{n_rows:,}", width, len(layers), config.n_factors,
             config.n_factors * width * 4 / 1e6, config.epochs)
    learner = DictionaryLearner(width, config.n_factors, config.sparsity,
                                nonneg_dict=config.nonneg_dict, seed=config.seed,
                                device=str(backend.device), encode_steps=config.train_steps)
    history = _fit(learner, backend, files, columns, windower, config, layers, n_rows, progress)
    errors = _evaluate(learner, backend, files, columns, windower, config, layers, n_rows,
                       progress)
    manifest = _manifest(config, info, layers, width, summary, tokens, n_rows, history,
                         errors.report(), time.perf_counter() - started)
    _save(Path(out), learner, manifest, overwrite)
    log.info("wrote %s: %d factors; relative error %.3f, %.1f active factors per row",
             out, config.n_factors, manifest["evaluation"]["relative_error"],
             manifest["evaluation"]["mean_active"])
    return manifest


def _fit(learner: DictionaryLearner, backend: TorchBackend, files: list[Path],
         columns: Columns, windower: Windower, config: FactorConfig,
         layers: tuple[int, ...], n_rows: int, progress: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    bar = tqdm(total=n_rows * config.epochs, unit="row", unit_scale=True, disable=not progress,
               desc="training", dynamic_ncols=True)
    for epoch in range(config.epochs):
        stream = corpus_rows(backend, files, columns, windower, config, layers)
        for batch in minibatches(stream, config.minibatch, config.shuffle_batches, generator):
            if not learner.initialised:
                learner.init_from(batch)
            stats = learner.partial_fit(batch)
            bar.update(len(batch))
            bar.set_postfix(epoch=epoch + 1, error=f"{stats['relative_error']:.3f}",
                            active=f"{stats['mean_active']:.1f}")
            history.append({"epoch": epoch, **{k: float(v) for k, v in stats.items()}})
    bar.close()
    return history


def _evaluate(learner: DictionaryLearner, backend: TorchBackend, files: list[Path],
              columns: Columns, windower: Windower, config: FactorConfig,
              layers: tuple[int, ...], n_rows: int, progress: bool) -> LayerErrors:
    errors = LayerErrors()
    dictionary = learner.dictionary
    gram = dictionary @ dictionary.T  # [k, k]
    bar = tqdm(total=n_rows, unit="row", unit_scale=True, disable=not progress,
               desc="evaluating", dynamic_ncols=True)
    for rows in corpus_rows(backend, files, columns, windower, config, layers):
        codes = encode(rows.vectors, dictionary, config.sparsity, config.encode_steps,
                       gram=gram)  # [N, k]
        errors.add(rows, codes, dictionary)
        bar.update(len(rows.vectors))
    bar.close()
    return errors


def _manifest(config: FactorConfig, info, layers: tuple[int, ...], width: int, summary,
              tokens: int, n_rows: int, history: list[dict], evaluation: dict,
              seconds: float) -> dict:
    return {
        **header(FACTORS_FORMAT, status=None),
        "model": model_entry(info, ("name", "path", "family", "config_hash", "num_layers")),
        "layers": list(layers),
        "n_factors": config.n_factors,
        "width": width,
        "sparsity": config.sparsity,
        "objective": "per row: ½‖x − αΦ‖² + λ‖α‖₁ with α ≥ 0 and unit-length atoms"
                     + (" ≥ 0" if config.nonneg_dict else ""),
        "solver": "FISTA codes (pipelines/compute/sparse_coding.py) and online block-coordinate "
                  "dictionary updates",
        "rows": {"tokens": tokens, "rows": n_rows, "normalised": config.normalise,
                 "special_tokens": config.include_special},
        "token_frequency_weighting": None,
        "config": {**asdict(config), "windows": asdict(config.windows)},
        "input": {"files": summary.files, "documents": summary.documents,
                  "fingerprint": summary.fingerprint},
        "training": {"updates": len(history),
                     "last_relative_error": history[-1]["relative_error"] if history else None,
                     "seconds": seconds},
        "evaluation": evaluation,
    }


def _save(out: Path, learner: DictionaryLearner, manifest: dict, overwrite: bool) -> None:
    """Write the dictionary, then the manifest (a complete manifest means a complete folder)."""
    if overwrite and (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / DICTIONARY) as tmp:
        save_file({"dictionary": learner.dictionary.detach().cpu().contiguous()}, tmp)
    atomic_write_json(out / MANIFEST, manifest)
