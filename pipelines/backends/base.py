"""The one interface every runtime implements, and what a runtime may additionally do.

Every backend runs a forward pass and returns attention probabilities. Anything more is a
:class:`Capability` the backend declares in ``capabilities``; callers test the capability
(:func:`require`), never the backend's name.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from pipelines.backends.batching import Batch
from pipelines.config import BACKENDS, ConfigError, OnnxOptions
from pipelines.models import ModelInfo, onnx_metadata

if TYPE_CHECKING:
    from pipelines.backends.head_mask import HeadMask

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: One layer's projected queries and keys [B, H, S, d] and the factor their dot products are
#: scaled by before the softmax: softmax(q @ k.T * scaling + mask) is the attention.
QueryKey = tuple[torch.Tensor, torch.Tensor, float]
#: Receives (layer, start, probabilities [B, H, Q, S] float32 with zeros on padded keys):
#: the query rows start .. start + Q - 1 of that layer. Layers come in order, each layer's
#: rows in order; a whole layer at once is (layer, 0, [B, H, S, S]).
LayerSink = Callable[[int, int, torch.Tensor], None]


class Capability(str, enum.Enum):
    """What a backend can do beyond returning attention probabilities."""

    #: ``disabled_heads(mask)``: forward passes with chosen heads' probabilities set to 0.
    HEAD_MASKING = "head_masking"
    #: ``capture_queries_keys()``: each layer's projected queries and keys (the neuron view).
    QUERY_KEY_CAPTURE = "query_key_capture"
    #: ``hidden_states(batch)``: the residual stream after the embeddings and every block.
    HIDDEN_STATES = "hidden_states"
    #: ``layers(batch, sink)`` hands each layer over while the forward pass runs, so one
    #: layer's attention is held at a time (without it, every layer exists at once).
    LAYER_STREAMING = "layer_streaming"


class UnsupportedCapability(ConfigError):
    """A job or request asked a backend for something it does not declare."""


class Backend(Protocol):
    """A model runtime. Everything above it is backend-agnostic.

    Methods that belong to a :class:`Capability` raise :class:`UnsupportedCapability` on a
    backend that does not list it in ``capabilities``.
    """

    name: str
    info: ModelInfo
    device: torch.device
    capabilities: frozenset[Capability]

    @property
    def tokenizer(self): ...

    def layers(self, batch: Batch, sink: LayerSink, block_rows: int | None = None) -> None:
        """Run the forward pass and hand every layer's probabilities to ``sink`` (on
        ``device``, pad keys 0), layers 0 .. L - 1 in order. With LAYER_STREAMING each layer
        arrives as the forward pass forms it, and ``block_rows`` (if below S) asks for the
        attention to be computed that many query rows at a time; otherwise whole layers."""
        ...

    def attentions(self, batch: Batch) -> torch.Tensor:
        """[L, B, H, S, S] float32 attention probabilities on ``device``; pad keys get 0.
        Every layer at once: for tests, views and analyses that need them stacked."""
        ...

    def describe(self) -> dict:
        """Runtime facts for the manifest (device, dtype, provider...)."""
        ...

    def disabled_heads(self, mask: HeadMask) -> AbstractContextManager[None]:
        """Within the block, forward passes run with the heads of ``mask`` disabled."""
        ...

    def capture_queries_keys(self) -> AbstractContextManager[list[QueryKey]]:
        """Within the block, each attention call appends its layer's :data:`QueryKey`."""
        ...

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """[L+1, B, S, D] float32: the embeddings' and every block's output."""
        ...


def stacked_attentions(backend: Backend, batch: Batch) -> torch.Tensor:
    """[L, B, H, S, S]: the layers ``backend.layers`` hands over, stacked."""
    layers: list[torch.Tensor] = []
    backend.layers(batch, lambda layer, start, probs: layers.append(probs))
    return torch.stack(layers)


def require(backend: Backend, capability: Capability, purpose: str) -> None:
    """Raise :class:`UnsupportedCapability` naming ``purpose`` unless ``backend`` can do it."""
    if capability not in backend.capabilities:
        offered = ", ".join(sorted(c.value for c in backend.capabilities)) or "none"
        raise UnsupportedCapability(
            f"{purpose} needs a backend with {capability.value}; the {backend.name} backend "
            f"running {backend.info.name!r} offers: {offered}. Use --backend torch with the "
            "source model")


def unsupported(backend: Backend, capability: Capability) -> UnsupportedCapability:
    """The error a backend raises from a capability method it does not have."""
    return UnsupportedCapability(f"the {backend.name} backend cannot do {capability.value}")


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Turn 'auto' | 'cpu' | 'cuda[:N]' and a dtype name into torch objects, or explain why not."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    if dtype != "float32" and device == "cpu":
        raise ConfigError(f"dtype {dtype} is for CUDA only; on the CPU use float32")
    return torch.device(device), DTYPES[dtype]


def choose_backend(name: str, model: str) -> str:
    """Resolve ``auto``: an ONNX export folder runs on ONNX Runtime, anything else on PyTorch."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: use {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    folder = Path(model).expanduser()
    return "onnx" if folder.is_dir() and onnx_metadata(folder) is not None else "torch"


def create_backend(name: str, model: str, device: str = "auto", dtype: str = "float32",
                   allow_download: bool = False, onnx: OnnxOptions | None = None) -> Backend:
    """Build the backend called ``name`` (auto, torch or onnx) for ``model``."""
    if choose_backend(name, model) == "onnx":
        from pipelines.backends.onnx.backend import OnnxBackend

        return OnnxBackend(model, device, dtype, onnx)
    from pipelines.backends.torch.backend import TorchBackend

    return TorchBackend(model, device, dtype, allow_download)
