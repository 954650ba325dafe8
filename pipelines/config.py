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
    """How documents become windows: their length, and which tokens are punctuation.

    ``max_length`` counts special tokens (None: the model's limit). Long inputs are cut into
    overlapping windows that share ``stride`` tokens, or cut once if ``truncate`` is set.
    ``punctuation`` names the rule that sets ``is_punct`` (``pipelines.text.punctuation``:
    ``unicode`` or ``clark``, only "." and ","); the ``Windower`` refuses other names.
    """

    max_length: int | None = None
    stride: int = 64
    truncate: bool = False
    punctuation: str = "unicode"

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length {self.max_length} must be a positive number of "
                              "tokens (or left out for the model's limit)")
        if self.stride < 0:
            raise ConfigError(f"stride {self.stride} must be 0 or more tokens")


@dataclass(frozen=True)
class OnnxOptions:
    """ONNX Runtime session threads (0: the runtime's default, one per physical core)."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0

    def __post_init__(self) -> None:
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("ONNX Runtime thread counts must be 0 (default) or positive")


#: Named values of ``RunConfig.entropy_epsilon``: ``clark`` is Clark et al.'s (2019) 1e-4.
ENTROPY_EPSILONS: dict[str, float] = {"none": 0.0, "clark": 1e-4}
#: ``RunConfig.similarity_measure``: headscope's mean Jensen–Shannon distance, or Clark et
#: al.'s smoothed divergence summed over rows (``pipelines.compute.similarity``).
SIMILARITY_MEASURES = ("distance", "clark")
#: ``RunConfig.word_rows``: a word's attention row is the mean of its pieces' rows (Clark et
#: al.'s paper) or its first piece's row (their released script's default).
WORD_ROWS = ("mean", "first")


def parse_entropy_epsilon(value: str | float) -> float:
    """ε of the entropy smoothing from a number or a name (``none``, ``clark``); 0 <= ε < 1."""
    if isinstance(value, str) and value.strip() in ENTROPY_EPSILONS:
        return ENTROPY_EPSILONS[value.strip()]
    try:
        epsilon = float(value)
    except ValueError:
        epsilon = -1.0
    if not 0.0 <= epsilon < 1.0:
        raise ConfigError(f"entropy epsilon {value!r}: use a number in [0, 1), none (0) or "
                          "clark (1e-4)")
    return epsilon


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """A ``ConfigError`` naming the choices unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}: use {' or '.join(choices)}")


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
    #: ε of ``entropy``'s smoothing A' = (1 - ε) A + ε / n (0: none; Clark et al.: 1e-4).
    entropy_epsilon: float = 0.0
    #: What ``head_similarity`` holds (``SIMILARITY_MEASURES``).
    similarity_measure: str = "distance"
    #: How a word's attention row merges its pieces' rows (``WORD_ROWS``).
    word_rows: str = "mean"
    #: Bytes of working memory beyond the model (``pipelines.compute.budget``): bounds the
    #: batches, the reduction's query blocks and the rows buffered before a shard is written.
    memory_budget: int = 2 * 2**30

    def __post_init__(self) -> None:
        object.__setattr__(self, "entropy_epsilon", parse_entropy_epsilon(self.entropy_epsilon))
        check_choice("similarity measure", self.similarity_measure, SIMILARITY_MEASURES)
        check_choice("word rows", self.word_rows, WORD_ROWS)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["attention"] = str(self.attention)
        data["analyses"] = list(self.analyses)  # as JSON reads it back
        return data
