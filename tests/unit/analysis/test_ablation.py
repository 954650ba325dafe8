"""Head ablation: masking semantics against the eager model and an independent reference."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import SAMPLE_TEXTS
from tolerances import ATTENTION_ATOL
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
)

from pipelines import models
from pipelines.analysis.importance import HEAD_IMPORTANCE, head_importance, mlm_positions
from pipelines.backends.batching import collate, plan_batches
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.torch.ablation import AblationModel, load_for_ablation
from pipelines.backends.torch.hooks import (
    HEAD_MASK_ATTENTION,
    disabled_heads,
    enable_head_masking,
)
from pipelines.config import ConfigError, WindowConfig
from pipelines.models import resolve
from pipelines.text.tokenize import Document, Window, Windower

LAYER, HEAD = 1, 2
#: float32 losses (≈ ln V ≈ 10) and representation distances from another reduction or batch
#: shape: pairwise sums of n ≤ 100 terms, log2(n)·eps32·10 ≈ 8e-6
LOSS_ATOL = 1e-5
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


@pytest.fixture(scope="module")
def mlm_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 3-layer BERT with an MLM head and MiniLM's (uncased BERT) vocabulary."""
    folder = tmp_path_factory.mktemp("bert-mlm-random")
    minilm_dir = Path(resolve("minilm")[0])
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, folder / name)
    torch.manual_seed(4321)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, initializer_range=0.2)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundles(gpt2_dir: Path, mlm_bert_dir: Path) -> dict[str, AblationModel]:
    return {"minilm": load_for_ablation("minilm"), "gpt2": load_for_ablation(str(gpt2_dir)),
            "bert_mlm": load_for_ablation(str(mlm_bert_dir))}


@pytest.fixture(scope="module")
def eager_minilm() -> torch.nn.Module:
    """MiniLM with transformers' own eager attention (TorchBackend switches to head masking)."""
    return models.load("minilm", torch.device("cpu")).model


@pytest.fixture(scope="module")
def eager_models(eager_minilm: torch.nn.Module, gpt2_dir: Path, mlm_bert_dir: Path) -> dict:
    """The plain eager models (transformers' own attention) the ablation models must match."""
    return {
        "minilm": eager_minilm,
        "gpt2": AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation="eager",
                                                     local_files_only=True).eval(),
        "bert_mlm": BertForMaskedLM.from_pretrained(mlm_bert_dir, attn_implementation="eager",
                                                    local_files_only=True).eval(),
    }


FAMILIES = ["minilm", "gpt2", "bert_mlm"]


def make_windows(bundle: AblationModel, texts: list[str] = SAMPLE_TEXTS) -> list[Window]:
    windower = Windower(bundle.tokenizer, bundle.info, WindowConfig())
    return [w for i, text in enumerate(texts) for w in windower.windows(Document(f"d{i}", text))]


def model_inputs(bundle: AblationModel, windows: list[Window]) -> dict[str, torch.Tensor]:
    """A right-padded batch of all windows (so padding is exercised)."""
    batch = collate(windows, bundle.info.pad_token_id)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if bundle.info.accepts_token_type_ids:
        inputs["token_type_ids"] = batch.type_ids
    assert not batch.valid.all(), "the batch should contain padding"
    return inputs


@torch.inference_mode()
def run(model, inputs: dict[str, torch.Tensor]):
    return model(**inputs, output_attentions=True, output_hidden_states=True)


def head_dim(bundle: AblationModel) -> int:
    return bundle.model.config.hidden_size // bundle.info.num_heads


# --------------------------------------------------------------------------- HeadMask


def test_head_mask_parse_and_tensor() -> None:
    mask = HeadMask.parse(" 3.5, 3.7,0.*,3.5 ")
    assert mask.entries == frozenset({(3, 5), (3, 7), (0, None)})
    assert str(mask) == "0.*,3.5,3.7"
    assert HeadMask.parse(str(mask)) == mask
    assert mask.pairs(4) == [(0, 0), (0, 1), (0, 2), (0, 3), (3, 5), (3, 7)]
    keep = mask.as_tensor(6, 12)
    assert keep.shape == (6, 12) and keep.dtype == torch.float32
    assert torch.equal(keep[0], torch.zeros(12))
    assert keep[3, 5] == 0 and keep[3, 7] == 0 and keep.sum() == 6 * 12 - 12 - 2
    assert torch.equal(HeadMask.parse("").as_tensor(2, 3), torch.ones(2, 3))
    assert HeadMask.of((1, 2), (1, 2)) == HeadMask.parse("1.2")


@pytest.mark.parametrize(("text", "message"), [
    ("3", r"entry '3' is not layer\.head"),
    ("3.x", r"entry '3\.x' is not layer\.head"),
    ("a.1", r"entry 'a\.1' is not layer\.head"),
    ("-1.2", r"entry '-1\.2' is not layer\.head"),
    ("3.5.1", r"entry '3\.5\.1' is not layer\.head"),
    ("*.1", r"entry '\*\.1' is not layer\.head"),
    ("3.5,,3.7", "empty entry"),
    ("6.0", r"'6\.0': layer 6 is out of range; the model has layers 0-5"),
    ("0.12", r"'0\.12': head 12 is out of range; each layer has heads 0-11"),
    ("9.*", r"'9\.\*': layer 9 is out of range"),
])
def test_head_mask_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HeadMask.parse(text, num_layers=6, num_heads=12)


def test_head_mask_range_checked_by_as_tensor() -> None:
    mask = HeadMask.parse("7.1")  # no sizes: only the syntax is checked
    with pytest.raises(ConfigError, match="layer 7 is out of range"):
        mask.as_tensor(6, 12)


# --------------------------------------------------------------------------- loading


def test_load_picks_the_pretraining_head(bundles: dict[str, AblationModel]) -> None:
    assert type(bundles["minilm"].model).__name__ == "BertModel"
    assert bundles["minilm"].objective is None
    assert bundles["minilm"].metrics == ("representation_cosine", "representation_l2")
    assert type(bundles["gpt2"].model).__name__ == "GPT2LMHeadModel"
    assert bundles["gpt2"].metrics == ("lm_loss",)
    assert type(bundles["bert_mlm"].model).__name__ == "BertForMaskedLM"
    assert bundles["bert_mlm"].metrics == ("mlm_loss", "representation_cosine",
                                           "representation_l2")
    for bundle in bundles.values():
        assert bundle.model.config._attn_implementation == HEAD_MASK_ATTENTION
        assert not bundle.model.training


def test_minilm_without_mlm_head_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipelines.backends.torch.ablation"):
        bundle = load_for_ablation("minilm")
    assert bundle.objective is None
    assert "has no trained MLM head" in caplog.text
    assert "cls.predictions" in caplog.text


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("family", FAMILIES)
def test_no_disabled_head_is_bit_identical(family: str, bundles, eager_models) -> None:
    bundle = bundles[family]
    inputs = model_inputs(bundle, make_windows(bundle))
    expected = run(eager_models[family], inputs)
    unmasked = run(bundle.model, inputs)  # outside any block: plain eager attention
    with disabled_heads(bundle.model, HeadMask()):
        masked = run(bundle.model, inputs)
    with disabled_heads(bundle.model, torch.ones(bundle.info.num_layers, bundle.info.num_heads)):
        ones = run(bundle.model, inputs)
    # bitwise by construction: with no head disabled the masking attention runs the eager
    # kernels on the same shapes (a mask of ones multiplies by 1.0, which is exact)
    for got in (unmasked, masked, ones):
        assert len(got.attentions) == bundle.info.num_layers
        for a, b in zip(got.attentions, expected.attentions, strict=True):
            assert torch.equal(a, b)  # [B, H, S, S]
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(a, b)  # [B, S, D]
        if family == "minilm":
            assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
        else:
            assert torch.equal(got.logits, expected.logits)  # [B, S, V]


@pytest.mark.parametrize("family", FAMILIES)
def test_disabling_one_head(family: str, bundles) -> None:
    bundle = bundles[family]
    inputs = model_inputs(bundle, make_windows(bundle))
    base = run(bundle.model, inputs)
    with disabled_heads(bundle.model, HeadMask.of((LAYER, HEAD))):
        ablated = run(bundle.model, inputs)
    # attentions: [B, H, S, S] per layer; hidden_states[i + 1] is layer i's output
    assert base.attentions[LAYER][:, HEAD].abs().sum() > 0
    # bitwise: the disabled head is multiplied by 0.0 (exact); every other head and every
    # earlier layer runs the same kernels on the same inputs and shapes
    assert torch.equal(ablated.attentions[LAYER][:, HEAD],
                       torch.zeros_like(base.attentions[LAYER][:, HEAD]))
    others = [h for h in range(bundle.info.num_heads) if h != HEAD]
    assert torch.equal(ablated.attentions[LAYER][:, others], base.attentions[LAYER][:, others])
    for layer in range(LAYER):
        assert torch.equal(ablated.attentions[layer], base.attentions[layer])
    for index in range(LAYER + 1):
        assert torch.equal(ablated.hidden_states[index], base.hidden_states[index])
    valid = inputs["attention_mask"].bool()  # [B, S]
    # later layers really change: far beyond allclose's float32 noise (rtol 1e-5, atol 1e-8)
    for index in range(LAYER + 1, bundle.info.num_layers + 1):
        assert not torch.allclose(ablated.hidden_states[index][valid],
                                  base.hidden_states[index][valid])
    for layer in range(LAYER + 1, bundle.info.num_layers):
        assert not torch.allclose(ablated.attentions[layer], base.attentions[layer])
    if family != "minilm":
        assert not torch.allclose(ablated.logits[valid], base.logits[valid])
    # Leaving the block restores the model.
    assert torch.equal(run(bundle.model, inputs).hidden_states[-1], base.hidden_states[-1])


def zero_head_output(model, family: str, layer: int, head: int, dim: int) -> None:
    """Zero the output projection's weights that read head ``head`` of ``layer``."""
    cols = slice(head * dim, (head + 1) * dim)
    with torch.no_grad():
        if family == "gpt2":  # Conv1D: weight is [in, out], y = x @ W + b
            model.base_model.h[layer].attn.c_proj.weight[cols, :] = 0
        else:  # nn.Linear: weight is [out, in]
            model.base_model.encoder.layer[layer].attention.output.dense.weight[:, cols] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_zeroed_output_projection(family: str, bundles) -> None:
    bundle = bundles[family]
    inputs = model_inputs(bundle, make_windows(bundle))
    reference = copy.deepcopy(bundle.model)
    reference.set_attn_implementation("eager")
    zero_head_output(reference, family, LAYER, HEAD, head_dim(bundle))
    expected = run(reference, inputs)
    with disabled_heads(bundle.model, HeadMask.of((LAYER, HEAD))):
        got = run(bundle.model, inputs)
    valid = inputs["attention_mask"].bool()  # [B, S]
    # another kernel path (zeroed probabilities vs zeroed projection weights, masking vs eager
    # attention): float32 layers sum in another order, a few eps32 relative per layer, on
    # activations |h| ≲ 10 (after LayerNorm) over ≤ 6 layers: ≲ 1e-5
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-5)
    others = [h for h in range(bundle.info.num_heads) if h != HEAD]
    for layer, (a, b) in enumerate(zip(got.attentions, expected.attentions, strict=True)):
        heads = others if layer == LAYER else slice(None)
        torch.testing.assert_close(a[:, heads], b[:, heads], rtol=0, atol=ATTENTION_ATOL)
    if family != "minilm":
        torch.testing.assert_close(got.logits[valid], expected.logits[valid], rtol=0, atol=1e-5)


def test_disabled_heads_needs_the_masking_attention(eager_minilm: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="enable_head_masking"), \
            disabled_heads(eager_minilm, HeadMask.of((0, 0))):
        pass
    model = enable_head_masking(copy.deepcopy(eager_minilm))
    bundle_inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]),
                     "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    expected = run(eager_minilm, bundle_inputs)
    with disabled_heads(model, HeadMask.of((0, 3))):
        got = run(model, bundle_inputs)
    # bitwise: head 3 is multiplied by 0.0; heads 0-2 of layer 0 run the eager kernels on the
    # same inputs and shapes
    assert torch.equal(got.attentions[0][:, 3], torch.zeros_like(got.attentions[0][:, 3]))
    assert torch.equal(got.attentions[0][:, :3], expected.attentions[0][:, :3])
    with pytest.raises(ValueError, match="shape"), disabled_heads(model, torch.ones(2, 2)):
        pass
    assert eager_minilm.config._attn_implementation == "eager"  # the copy was switched


#: Encoders, GPT-2, and decoders whose attention goes through the AttentionInterface (with
#: grouped-query attention where the family has it).
ARCHITECTURES = ("albert", "bert", "camembert", "distilbert", "electra", "roberta",
                 "xlm-roberta", "gpt2", "gemma2", "gemma3_text", "llama", "mistral", "phi3",
                 "qwen2", "qwen3")


@pytest.mark.parametrize("model_type", [*ARCHITECTURES, "gpt2-upcast"])
@torch.inference_mode()
def test_every_supported_architecture(model_type: str) -> None:
    """Tiny random models of every supported type: unmasked = eager, a disabled head is 0."""
    torch.manual_seed(0)
    sizes = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 3,
             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
    if model_type == "albert":  # one layer's weights shared by all layers
        sizes["embedding_size"] = 16
    if model_type in ("gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3"):
        sizes |= {"num_key_value_heads": 2, "head_dim": 8,  # two query heads per kv head
                  "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "gpt2-upcast":  # GPT-2's alternative eager path
        model_type, sizes["reorder_and_upcast_attn"] = "gpt2", True
    config = AutoConfig.for_model(model_type, **sizes)
    eager = AutoModel.from_config(config, attn_implementation="eager").eval()
    model = enable_head_masking(copy.deepcopy(eager))
    inputs = {"input_ids": torch.randint(5, 100, (2, 7)),
              "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    expected = eager(**inputs, output_attentions=True)
    with disabled_heads(model, HeadMask()):
        same = model(**inputs, output_attentions=True)
    with disabled_heads(model, HeadMask.of((LAYER, 3))):
        ablated = model(**inputs, output_attentions=True)
    # bitwise by construction: unmasked, the masking attention is the eager one (a ×1.0 mask
    # is exact), same inputs and shapes; layer 0 precedes the disabled head
    assert torch.equal(same.last_hidden_state, expected.last_hidden_state)
    for a, b in zip(same.attentions, expected.attentions, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ablated.attentions[0], expected.attentions[0])
    assert torch.equal(ablated.attentions[LAYER][:, 3],
                       torch.zeros_like(ablated.attentions[LAYER][:, 3]))
    assert not torch.allclose(ablated.last_hidden_state, expected.last_hidden_state)


# --------------------------------------------------------------------------- importance


def test_importance_table_minilm(bundles) -> None:
    bundle = bundles["minilm"]
    windows = make_windows(bundle)
    heads = [(0, 1), (2, 3), HeadMask.parse("1.0,1.1"), HeadMask.parse("4.*")]
    table = head_importance(bundle, windows, heads, progress=False)
    assert table.schema == HEAD_IMPORTANCE
    assert table.num_rows == len(heads) * 2
    rows = table.to_pylist()
    assert {r["metric"] for r in rows} == {"representation_cosine", "representation_l2"}
    assert [r["disabled"] for r in rows[::2]] == ["0.1", "2.3", "1.0,1.1", "4.*"]
    assert [(r["layer"], r["head"]) for r in rows[::2]] == [(0, 1), (2, 3), (None, None),
                                                            (None, None)]
    n_tokens = sum(w.n_tokens for w in windows)
    for r in rows:
        # exact: the code sets the unablated run against itself to 0.0, and delta is the
        # same float64 subtraction as here
        assert r["baseline"] == 0.0
        assert r["ablated"] > 0
        assert r["delta"] == r["ablated"] - r["baseline"]
        assert r["n_tokens"] == n_tokens
        if r["metric"] == "representation_cosine":
            assert r["ablated"] <= 2.0


def test_importance_every_head_gpt2(bundles) -> None:
    bundle = bundles["gpt2"]
    windows = make_windows(bundle)
    table = head_importance(bundle, windows, progress=False)
    layers, heads = bundle.info.num_layers, bundle.info.num_heads
    assert table.num_rows == layers * heads
    assert table.column("metric").to_pylist() == ["lm_loss"] * (layers * heads)
    pairs = list(zip(table.column("layer").to_pylist(), table.column("head").to_pylist(),
                     strict=True))
    assert pairs == [(layer, head) for layer in range(layers) for head in range(heads)]
    assert table.column("disabled").to_pylist() == [f"{lay}.{h}" for lay, h in pairs]
    baseline = table.column("baseline").to_numpy()
    ablated = table.column("ablated").to_numpy()
    # exact: one baseline pass reused for every row; delta is the same float64 subtraction
    assert np.all(baseline == baseline[0]) and np.isfinite(baseline[0])
    np.testing.assert_array_equal(table.column("delta").to_numpy(), ablated - baseline)
    assert np.any(ablated != baseline)
    n_predicted = sum(w.n_tokens - 1 for w in windows)
    assert table.column("n_tokens").to_pylist() == [n_predicted] * (layers * heads)


@torch.inference_mode()
def test_lm_loss_baseline_equals_labels_loss(bundles) -> None:
    bundle = bundles["gpt2"]
    window = make_windows(bundle)[-1]
    table = head_importance(bundle, [window], [(0, 0), HeadMask.parse("1.*")], progress=False)
    ids = torch.from_numpy(window.input_ids)[None]  # [1, S]
    expected = bundle.model(input_ids=ids, labels=ids).loss
    # another reduction than HF's labels loss: float32 cross-entropy ≈ ln V ≈ 10 averaged
    # pairwise over n ≤ 100 tokens: log2(n)·eps32·10 ≈ 8e-6, so LOSS_ATOL
    for row in table.to_pylist():
        assert row["baseline"] == pytest.approx(float(expected), abs=LOSS_ATOL)
        assert row["n_tokens"] == window.n_tokens - 1
    whole_layer = table.to_pylist()[1]
    with disabled_heads(bundle.model, HeadMask.parse("1.*")):
        ablated = bundle.model(input_ids=ids, labels=ids).loss
    assert whole_layer["ablated"] == pytest.approx(float(ablated), abs=LOSS_ATOL)


@torch.inference_mode()
def test_mlm_loss(bundles) -> None:
    bundle = bundles["bert_mlm"]
    windows = make_windows(bundle)
    window = windows[-1]
    positions = mlm_positions(window, seed=7)
    non_special = int((~window.is_special).sum())
    assert len(positions) == max(1, round(0.15 * non_special))
    assert not window.is_special[positions].any()
    assert np.array_equal(positions, mlm_positions(window, seed=7))
    assert not np.array_equal(positions, mlm_positions(window, seed=8))

    table = head_importance(bundle, [window], [(2, 1)], seed=7, progress=False)
    assert table.column("metric").to_pylist() == ["mlm_loss", "representation_cosine",
                                                  "representation_l2"]
    mlm = table.to_pylist()[0]
    assert mlm["n_tokens"] == len(positions)
    ids = torch.from_numpy(window.input_ids)[None]  # [1, S]
    labels = torch.full_like(ids, -100)
    labels[0, positions] = ids[0, positions]
    masked = ids.clone()
    masked[0, positions] = bundle.tokenizer.mask_token_id
    types = torch.from_numpy(window.type_ids)[None]
    expected = bundle.model(input_ids=masked, token_type_ids=types, labels=labels).loss
    assert mlm["baseline"] == pytest.approx(float(expected), abs=LOSS_ATOL)  # as for lm_loss
    with disabled_heads(bundle.model, HeadMask.of((2, 1))):
        ablated = bundle.model(input_ids=masked, token_type_ids=types, labels=labels).loss
    assert mlm["ablated"] == pytest.approx(float(ablated), abs=LOSS_ATOL)
    assert mlm["delta"] == mlm["ablated"] - mlm["baseline"] != 0  # the same float64 subtraction


@pytest.mark.slow  # a model run per window: left out of make test-fast
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_window_at_a_time(family: str, bundles) -> None:
    bundle = bundles[family]
    texts = [*SAMPLE_TEXTS, SAMPLE_TEXTS[0] + " And then it slept.",
             SAMPLE_TEXTS[1].upper()]
    windows = make_windows(bundle, texts)
    batches = plan_batches([w.n_tokens for w in windows], 4096, heads=bundle.info.num_heads)
    assert any(len({windows[i].n_tokens for i in b}) > 1 for b in batches), "no padded batch"
    heads = [(0, 0), (LAYER, HEAD), HeadMask.parse("0.1,2.0")]
    batched = head_importance(bundle, windows, heads, seed=3, batch_tokens=4096,
                              progress=False)
    single = head_importance(bundle, windows, heads, seed=3, batch_tokens=1, progress=False)
    assert batched.select(["disabled", "layer", "head", "metric", "n_tokens"]).equals(
        single.select(["disabled", "layer", "head", "metric", "n_tokens"]))
    # other padding and batch shapes: losses (≈ 10) and representation distances from float32
    # forward passes, a few eps32 relative per layer, summed pairwise: ≲ LOSS_ATOL
    for name in ("baseline", "ablated", "delta"):
        np.testing.assert_allclose(batched.column(name).to_numpy(),
                                   single.column(name).to_numpy(), rtol=0, atol=LOSS_ATOL)


def test_importance_rejects_bad_heads(bundles) -> None:
    bundle = bundles["gpt2"]
    windows = make_windows(bundle)
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        head_importance(bundle, windows, [(3, 0)], progress=False)
    with pytest.raises(ValueError, match="at least one window"):
        head_importance(bundle, [], progress=False)
    assert isinstance(head_importance(bundle, windows[:1], [(0, 0)], progress=False), pa.Table)
