"""Devices and dtypes: the CUDA path (skipped without a GPU) and its CPU twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS, needs_minilm

from pipelines.analysis.batch import analyse_windows
from pipelines.backends.base import resolve_device
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.stats import STAT_NAMES
from pipelines.config import ConfigError, RunConfig, WindowConfig
from pipelines.text.tokenize import Document, Windower

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def stats_frame(backend: TorchBackend) -> dict[str, np.ndarray]:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    windows = [w for i, t in enumerate(SAMPLE_TEXTS) for w in windower.windows(Document(str(i), t))]
    table = analyse_windows(backend, windows, RunConfig())["head_stats"]
    return {name: table[name].to_numpy(zero_copy_only=False) for name in STAT_NAMES}


def test_auto_device_is_cpu_without_cuda() -> None:
    device, dtype = resolve_device("auto", "float32")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda", "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_refused(dtype: str) -> None:
    with pytest.raises(ConfigError, match="CUDA only"):
        resolve_device("cpu", dtype)


def test_unknown_device_and_dtype() -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu", "float32")
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_device("cpu", "float64")


def test_cpu_statistics_are_float32_and_finite(minilm: TorchBackend) -> None:
    """The CPU twin of the GPU test: the same pipeline, checked for sane values."""
    stats = stats_frame(minilm)
    for name, values in stats.items():
        assert values.dtype == np.float32, name
        assert np.isfinite(values).all(), name


@pytest.mark.gpu
@needs_cuda
@needs_minilm
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_statistics_match_cpu(minilm: TorchBackend, dtype: str) -> None:
    """On CUDA (fp32, or fp16 weights with float32 statistics) the numbers match the CPU's."""
    gpu = TorchBackend("minilm", device="cuda", dtype=dtype)
    # other kernels (cuBLAS vs CPU BLAS; TF32 stays off for matmuls): float32 statistics sum
    # n weights that each moved by ≲ 1e-5 over 6 layers: 1e-4 (10x tolerances.STAT_ATOL).
    # float16 weights and activations: logits |z| ≲ 10 round at ~|z|·eps16 ≈ 1e-2, a weight w
    # by w·that, so 2e-2 absolute and relative
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    cpu_stats, gpu_stats = stats_frame(minilm), stats_frame(gpu)
    for name in STAT_NAMES:
        np.testing.assert_allclose(gpu_stats[name], cpu_stats[name], atol=tolerance,
                                   rtol=tolerance, err_msg=name)
