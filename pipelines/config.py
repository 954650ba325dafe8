"""Run configuration: what a job computes and how it batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

AttentionKind = Literal["none", "topk", "threshold", "full"]


class ConfigError(ValueError):
    """A configuration value the user has to fix."""


@dataclass(frozen=True)
class AttentionMode:
    """How much of the attention weights a job keeps.

    ``none`` keeps nothing, ``topk:K`` keeps the K largest weights of every query row,
    ``threshold:T`` keeps every weight >= T, ``full`` keeps every weight as float16.
    """

    kind: AttentionKind
    k: int = 0
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> AttentionMode:
        name, _, arg = text.strip().partition(":")
        if name == "none" and not arg:
            return cls("none")
        if name == "full" and not arg:
            return cls("full")
        if name == "topk":
            if not (arg.isascii() and arg.isdecimal()) or int(arg) < 1:
                raise ConfigError(
                    f"attention mode {text!r}: topk needs a positive integer, e.g. topk:8"
                )
            return cls("topk", k=int(arg))
        if name == "threshold":
            try:
                value = float(arg)
            except ValueError:
                value = -1.0
            if not 0.0 < value <= 1.0:
                raise ConfigError(
                    f"attention mode {text!r}: threshold needs a number in (0, 1], "
                    "e.g. threshold:0.1"
                )
            return cls("threshold", threshold=value)
        raise ConfigError(
            f"unknown attention mode {text!r}: use none, topk:K, threshold:T or full"
        )

    def __str__(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "threshold":
            return f"threshold:{self.threshold:g}"
        return self.kind


@dataclass(frozen=True)
class WindowConfig:
    """How inputs longer than the model allows are handled.

    ``max_length`` counts special tokens (None: the model's limit). Long inputs are cut into
    overlapping windows that share ``stride`` tokens, or cut once if ``truncate`` is set.
    """

    max_length: int | None = None
    stride: int = 64
    truncate: bool = False


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX Runtime session threads (0: the runtime's default, one per physical core)."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("ONNX Runtime thread counts must be 0 (default) or positive")


#: ``auto`` runs an ONNX export folder with ONNX Runtime and anything else with PyTorch.
BACKENDS = ("auto", "torch", "onnx")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the rows a job writes (saved in the manifest)."""

    model: str = "minilm"
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    attention: AttentionMode = field(default_factory=lambda: AttentionMode("topk", k=8))
    windows: WindowConfig = field(default_factory=WindowConfig)
    #: Padded tokens (batch size × longest window) per forward pass.
    batch_tokens: int = 8192
    #: Half-width w of the local window used by ``mass_window`` and ``mass_sparse``.
    local_window: int = 2
    #: A shard (one Parquet part per table) closes after this many content tokens.
    shard_tokens: int = 32768
    allow_download: bool = False
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    #: Extra analyses by name, in registry order (``pipelines.analysis.registry``).
    analyses: tuple[str, ...] = ()
    #: Head similarity over the first N documents only (0: all of them).
    similarity_docs: int = 0
    #: Store every head's query and key vectors per token (``qk`` table, for the neuron view).
    capture_qk: bool = False

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["attention"] = str(self.attention)
        data["analyses"] = list(self.analyses)  # as JSON reads it back
        return data
