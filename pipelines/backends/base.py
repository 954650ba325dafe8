"""The one interface every runtime implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from pipelines.backends.batching import Batch
from pipelines.config import BACKENDS, ConfigError, OnnxOptions
from pipelines.models import ModelInfo, onnx_metadata

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Backend(Protocol):
    """A model runtime. Everything above it is backend-agnostic."""

    name: str
    info: ModelInfo
    device: torch.device

    @property
    def tokenizer(self): ...

    def attentions(self, batch: Batch) -> torch.Tensor:
        """[L, B, H, S, S] float32 attention probabilities on ``device``; pad keys get 0."""
        ...

    def describe(self) -> dict:
        """Runtime facts for the manifest (device, dtype, provider...)."""
        ...


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
