"""The Backend contract: capabilities are declared, tested by callers, and refused clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.backends import create_backend
from pipelines.backends.base import Capability, UnsupportedCapability, require
from pipelines.backends.batching import collate
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import WindowConfig
from pipelines.jobs.factors.hidden import token_rows
from pipelines.text.tokenize import Document, Windower


def windows_of(backend, texts: list[str]):
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    return [w for i, text in enumerate(texts)
            for w in windower.windows(Document(f"d{i}", text))]


def test_torch_declares_every_capability(minilm: TorchBackend) -> None:
    assert minilm.capabilities == frozenset(Capability)
    for capability in Capability:
        require(minilm, capability, "a test")  # raises if missing


def test_onnx_declares_none_and_refuses_each(minilm_onnx_dir: Path) -> None:
    onnx = create_backend("auto", str(minilm_onnx_dir), "cpu")
    assert onnx.name == "onnx" and onnx.capabilities == frozenset()
    batch = collate(windows_of(onnx, ["The cat sat."]), onnx.info.pad_token_id)
    calls = {Capability.HEAD_MASKING: lambda: onnx.disabled_heads(HeadMask.of((0, 0))),
             Capability.QUERY_KEY_CAPTURE: onnx.capture_queries_keys,
             Capability.HIDDEN_STATES: lambda: onnx.hidden_states(batch)}
    for capability, call in calls.items():
        with pytest.raises(UnsupportedCapability, match=capability.value):
            call()
        with pytest.raises(UnsupportedCapability, match=f"needs a backend with {capability.value}"):
            require(onnx, capability, "a test")


def test_factors_refuse_a_backend_without_hidden_states(minilm_onnx_dir: Path) -> None:
    onnx = create_backend("auto", str(minilm_onnx_dir), "cpu")
    rows = token_rows(onnx, windows_of(onnx, ["The cat sat."]), (1,), 4096)
    with pytest.raises(UnsupportedCapability, match="transformer factors needs a backend with "
                                                    "hidden_states"):
        next(rows)


def test_hidden_states_are_the_models_own(minilm: TorchBackend) -> None:
    batch = collate(windows_of(minilm, ["The cat sat.", "A much longer second sentence."]),
                    minilm.info.pad_token_id)
    got = minilm.hidden_states(batch)  # [L+1, B, S, D]
    with torch.inference_mode():
        direct = minilm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              token_type_ids=batch.type_ids, output_hidden_states=True)
    assert got.shape[0] == minilm.info.num_layers + 1
    # Bitwise: the same model, inputs and shapes run the same kernels.
    assert torch.equal(got, torch.stack(direct.hidden_states).float())


def test_importing_registers_nothing_with_transformers() -> None:
    """Only the torch backend's constructor (or the ablation loader) registers its hook."""
    code = ("import pipelines.cli, pipelines.jobs.local, pipelines.jobs.ablation, "
            "pipelines.analysis.batch, pipelines.backends.torch.backend, service.app\n"
            "from transformers import AttentionInterface\n"
            "from pipelines.backends.torch.hooks import HEAD_MASK_ATTENTION\n"
            "print(HEAD_MASK_ATTENTION in AttentionInterface._global_mapping)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
