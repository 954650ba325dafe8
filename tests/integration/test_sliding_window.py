"""A seeded random Gemma-3-architecture decoder built at test time: local layers with a
sliding window of w = 4 keys between a global one, one key/value head for four query heads,
and a Llama-style tokenizer that puts <s> before each text.

Each local layer's mask lets query i see keys i - w < j <= i only: its attention is exactly 0
beyond, and every statistic, the kept weights and k_i (``entropy_norm``'s ln k_i) follow it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GEMMA_LAYER_TYPES, GEMMA_WINDOW, run_cli
from float64_stats import float64_statistics
from tolerances import STAT_ATOL, STREAM_RTOL

from pipelines.analysis.batch import analyse_windows
from pipelines.backends.batching import Batch, collate
from pipelines.backends.torch.backend import MaskMismatchError, TorchBackend
from pipelines.compute.stats import KeyFlags
from pipelines.compute.streaming import LayerReduction, ReductionSpec
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset.reader import Dataset
from pipelines.text.tokenize import Document, Window, Windower

WINDOW = GEMMA_WINDOW
LAYER_TYPES = GEMMA_LAYER_TYPES
TEXTS = ["The cat sat on the mat. It was happy!",
         "Attention is all you need, they said; was it, though?",
         "Short question?",
         "The cat was happy, they said. Is it all you need? It sat on the mat, though."]


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path) -> TorchBackend:
    return TorchBackend(str(gemma_dir), device="cpu")


def windows_of(backend: TorchBackend) -> list[Window]:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    return [w for i, text in enumerate(TEXTS) for w in windower.windows(Document(f"d{i}", text))]


def padded(backend: TorchBackend) -> Batch:
    windows = windows_of(backend)
    assert len({w.n_tokens for w in windows}) > 1 and max(w.n_tokens for w in windows) > 3 * WINDOW
    return collate(windows, backend.info.pad_token_id)


def test_the_model_is_described_with_its_windows_and_key_value_heads(gemma: TorchBackend) -> None:
    info = gemma.info
    assert (info.model_type, info.causal, info.layer_windows) == ("gemma3_text", True,
                                                                 (WINDOW, None, WINDOW))
    assert (info.key_value_heads, [info.kv_head(h) for h in range(4)]) == (1, [0, 0, 0, 0])
    assert windows_of(gemma)[0].tokens[0] == "<s>", "the Llama-style tokenizer adds a BOS"


def test_a_local_layer_puts_zero_weight_beyond_its_window(gemma: TorchBackend) -> None:
    batch = padded(gemma)
    attn = gemma.attentions(batch)  # [L, B, H, S, S]
    length = attn.shape[-1]
    query, key = np.indices((length, length))
    beyond = torch.from_numpy(query - key >= WINDOW)  # keys a local layer must not see
    rows = batch.valid[:, None, :, None]  # [B, 1, S, 1]: padded query rows are not read
    for layer, kind in enumerate(LAYER_TYPES):
        mass = (attn[layer] * rows)[..., beyond]
        if kind == "sliding_attention":  # bitwise: masked logits give exp(-inf) = 0 exactly
            assert torch.equal(mass, torch.zeros_like(mass)), layer
        else:  # the global layer does look there (the test can tell the two apart)
            assert float(mass.max()) > 0.01


def test_statistics_follow_each_layers_window(gemma: TorchBackend) -> None:
    """head_stats against float64 NumPy of the definitions with the keys each layer lets a
    query see; a local layer's entropy_norm differs from one normalised by i + 1."""
    windows = windows_of(gemma)
    batch = collate(windows, gemma.info.pad_token_id)
    attn = gemma.attentions(batch)
    config = RunConfig(model="gemma", attention=AttentionMode("none"))
    stats = analyse_windows(gemma, windows, config)["head_stats"].to_pandas()
    got = stats.set_index(["doc_id", "layer", "head"])
    moved = 0.0
    for b, window in enumerate(windows):
        n = window.n_tokens
        for layer, kind in enumerate(LAYER_TYPES):
            span = WINDOW if kind == "sliding_attention" else None
            for head in range(4):
                a = attn[layer, b, head, :n, :n].double().numpy()
                flags = (np.asarray(window.is_special, bool), np.asarray(window.is_punct, bool))
                want = float64_statistics(a, *flags, True, config.local_window, span)
                row = got.loc[(window.doc.doc_id, layer, head)]
                for name, value in want.items():
                    # float32 sums of n <= 25 terms vs float64 (STAT_ATOL); in tokens: / n
                    scale = n if name == "mean_distance" else 1
                    assert math.isclose(row[name] / scale, value / scale, rel_tol=0,
                                        abs_tol=STAT_ATOL), (window.doc.doc_id, layer, head,
                                                             name, row[name], value)
                if span is not None:
                    full = float64_statistics(a, *flags, True, config.local_window)
                    moved = max(moved, abs(full["entropy_norm"] - want["entropy_norm"]))
    assert moved > 0.05, "ln k_i with k_i = min(i + 1, w) must matter on these windows"


def test_query_blocks_follow_the_window(gemma: TorchBackend) -> None:
    """Blocks of 1 and 3 query rows (the blocked attention applies the model's mask block by
    block) give the statistics of whole layers."""
    batch = padded(gemma)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)

    def statistics(block_rows: int | None) -> dict[str, torch.Tensor]:
        spec = ReductionSpec(3, True, 2, False, AttentionMode("none"),
                             layer_windows=gemma.info.layer_windows)
        reduction = LayerReduction(spec, flags)
        gemma.layers(batch, reduction.add_rows, block_rows)
        return reduction.statistics()

    whole = statistics(None)
    for rows in (1, 3):
        blocked = statistics(rows)
        for name, value in whole.items():
            # the same maths on fewer rows: matmul rounding of the block's shape, then the
            # streaming sums' bound (tests/tolerances.py)
            torch.testing.assert_close(blocked[name], value, rtol=STREAM_RTOL, atol=STAT_ATOL,
                                       equal_nan=True, msg=f"{rows} rows: {name}")


def test_a_mask_the_config_does_not_describe_is_refused(gemma: TorchBackend,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    monkeypatch.setattr(gemma, "info", replace(gemma.info, layer_windows=()))
    with pytest.raises(MaskMismatchError, match="layer 0: its attention mask lets query"):
        gemma.layers(padded(gemma), lambda layer, start, probs: None)


def test_a_job_records_the_windows_and_keeps_no_weight_beyond_them(gemma_dir: Path,
                                                                   tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                              for i, t in enumerate(TEXTS)))
    out = tmp_path / "out"
    done = run_cli("run", str(corpus), "--model", str(gemma_dir), "--attention", "full",
                   "--capture-qk", "--analyses", "patterns,words,similarity",
                   "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.error_lines() or done.stderr[-2000:]
    dataset = Dataset.open(out)
    model = dataset.manifest["model"]
    assert (model["layer_windows"], model["num_kv_heads"]) == ([WINDOW, None, WINDOW], 1)
    heads = dataset.heads()
    assert heads["window"].isna().tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert set(heads["window"].dropna()) == {WINDOW} and set(heads["kv_head"]) == {0}
    kept = dataset.table("attention")
    local = kept[kept["layer"] != 1]
    assert (local["query"] - local["key"] < WINDOW).all()
    n = dataset.table("documents")["n_tokens"].to_numpy()
    per_layer = {layer: sum(sum(min(i + 1, WINDOW if layer != 1 else i + 1) for i in range(k))
                            for k in n) * 4 for layer in range(3)}
    assert kept.groupby("layer").size().to_dict() == per_layer  # every visible pair, no more
    # one key/value head: every query head's captured key is that head's (bitwise: copies)
    qk = dataset.table("qk")
    keys = qk.groupby(["doc_id", "layer", "position"])["key"].agg(
        lambda k: len({tuple(v) for v in k}))
    assert (keys == 1).all() and qk["head"].nunique() == 4
    for table in ("head_patterns", "word_attention", "head_similarity"):
        assert len(dataset.table(table)) > 0, table
    page = tmp_path / "d0.html"
    shown = run_cli("view", str(out), "--doc", "d0", "--out", str(page))
    assert shown.returncode == 0, shown.stderr[-2000:]
    html = page.read_text(encoding="utf-8")  # the tokens as the text spells them, BOS shown
    assert "neuron view" in shown.stdout and '"\\u003cs>","The","cat","sat"' in html
