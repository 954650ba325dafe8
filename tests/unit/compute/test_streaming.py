"""The streaming reduction (layer by layer, block by block) against the stacked path.

Both sides reduce the very same probabilities (one forward pass, every layer kept for the
stacked side), so the only differences are those the reduction itself makes. Row-wise terms
(entropy, diagonals, order statistics) with one block per layer run the same kernels on the
same rows: bitwise equal. Terms taken by einsum (key masses, mean_distance) go through matmul
kernels whose blocking depends on the leading shape (one layer vs all of them), and with
blocks of 1 or 7 query rows the rows' sums are added block by block in float64 against the
stacked path's pairwise float32 sum over the window: the stacked sum's own error is at most
about (log2(S) + 1) eps32 of the sum of |terms| and each term's a few eps32, so they agree
within STREAM_RTOL of max(1, |value|).
Kept weights are chosen by row from the same values and the same sorted order: identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS
from tolerances import STREAM_RTOL

from pipelines.backends.batching import Batch, collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.kept import kept_weights
from pipelines.compute.stats import KeyFlags, head_statistics, row_order
from pipelines.compute.streaming import LayerReduction, ReductionSpec, interleave
from pipelines.config import AttentionMode, WindowConfig
from pipelines.text.tokenize import Document, Windower

MODES = [AttentionMode("none"), AttentionMode("topk", k=3), AttentionMode("threshold",
                                                                          threshold=0.1),
         AttentionMode("full")]
BLOCKS = [1, 7, None]  # None: the whole window, one block per layer
#: Statistics whose row terms come from an einsum (module docstring).
BY_EINSUM = {"mass_sep", "mass_special", "mass_punct", "mean_distance", "mass_sparse"}


def batch_of(backend: TorchBackend, max_length: int | None = None) -> Batch:
    """Sentences of mixed lengths, a sentence pair and a document cut into several windows."""
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is it raining?", "No, the sun is out today."))
    docs.append(Document("long", " ".join(SAMPLE_TEXTS * 3)))
    windower = Windower(backend.tokenizer, backend.info, WindowConfig(max_length=48, stride=8))
    windows = [w for doc in docs for w in windower.windows(doc)]
    assert sum(w.doc.doc_id == "long" for w in windows) > 2, "the long document needs windows"
    assert len({w.n_tokens for w in windows}) > 3, "the batch needs padding"
    return collate(windows, backend.info.pad_token_id)


def streamed(backend: TorchBackend, batch: Batch, spec: ReductionSpec) -> LayerReduction:
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    reduction = LayerReduction(spec, flags)
    backend.layers(batch, reduction.add_layer)
    return reduction


def spec_of(backend: TorchBackend, mode: AttentionMode, block: int | None,
            epsilon: float = 0.0) -> ReductionSpec:
    info = backend.info
    return ReductionSpec(info.num_layers, info.causal, 2, info.sep_token_id is not None, mode,
                         epsilon, block)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("epsilon", [0.0, 1e-4])
def test_statistics_equal_the_stacked_path(backend: TorchBackend, block: int | None,
                                           epsilon: float) -> None:
    batch = batch_of(backend)
    attn = backend.attentions(batch)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    info = backend.info
    want = head_statistics(attn, flags, info.causal, 2, info.sep_token_id is not None,
                           entropy_epsilon=epsilon)
    got = streamed(backend, batch, spec_of(backend, AttentionMode("none"), block,
                                           epsilon)).statistics()
    assert set(got) == set(want)
    for name, expected in want.items():
        if block is None and name not in BY_EINSUM:
            assert torch.equal(got[name].nan_to_num(-1), expected.nan_to_num(-1)), name
        torch.testing.assert_close(got[name], expected, rtol=STREAM_RTOL, atol=STREAM_RTOL,
                                   equal_nan=True, msg=name)


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_kept_weights_identical_to_the_stacked_path(backend: TorchBackend, mode: AttentionMode,
                                                    block: int | None) -> None:
    batch = batch_of(backend)
    attn = backend.attentions(batch)
    want = kept_weights(attn, batch.valid, backend.info.causal, mode,
                        row_order(attn, mode.k or None).kth_largest)
    got = streamed(backend, batch, spec_of(backend, mode, block)).kept()
    if want is None:
        assert got is None
        return
    assert got is not None and set(got) == set(want)
    assert len(want["weight"]) > 0
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_layers_must_arrive_in_order(minilm: TorchBackend) -> None:
    batch = batch_of(minilm)
    attn = minilm.attentions(batch)
    reduction = LayerReduction(spec_of(minilm, AttentionMode("none"), None),
                               KeyFlags(batch.valid, batch.is_sep, batch.is_special,
                                        batch.is_punct))
    with pytest.raises(RuntimeError, match="in order"):
        reduction.add_layer(1, attn[1])
    reduction.add_layer(0, attn[0])
    with pytest.raises(RuntimeError, match="1 of 6 layers"):
        reduction.statistics()


def test_interleave_lays_out_runs_by_batch_layer_head() -> None:
    """Two layers × two blocks of rows in (batch, head, ...) order → (batch, layer, head)."""
    rng = np.random.default_rng(0)
    layers, blocks, batch, heads = 2, 2, 3, 2
    parts, labels = [], []
    for layer in range(layers):
        for block in range(blocks):
            b = np.sort(rng.integers(0, batch, 20))
            h = rng.integers(0, heads, 20)
            order = np.lexsort((h, b))
            b, h = b[order], h[order]
            parts.append({"batch_index": b, "head": h})
            labels += [(bi, layer, hi, block) for bi, hi in zip(b, h, strict=True)]
    order = interleave(parts, layers, batch, heads)
    laid_out = [labels[i] for i in order]
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert laid_out == sorted(labels)
