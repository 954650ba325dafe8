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
from conftest import mixed_batch
from tolerances import ATTENTION_ATOL, STAT_ATOL, STREAM_RTOL

from pipelines.backends.batching import Batch
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.kept import kept_weights
from pipelines.compute.stats import KeyFlags, head_statistics, row_order
from pipelines.compute.streaming import LayerReduction, ReductionSpec, interleave
from pipelines.config import AttentionMode

MODES = [AttentionMode("none"), AttentionMode("topk", k=3), AttentionMode("threshold",
                                                                          threshold=0.1),
         AttentionMode("full")]
BLOCKS = [1, 7, None]  # None: the whole window, one block per layer
#: Statistics whose row terms come from an einsum (module docstring).
BY_EINSUM = {"mass_sep", "mass_special", "mass_punct", "mean_distance", "mass_sparse"}


def streamed(backend: TorchBackend, batch: Batch, spec: ReductionSpec) -> LayerReduction:
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    reduction = LayerReduction(spec, flags)
    backend.layers(batch, reduction.add_rows)
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
    batch = mixed_batch(backend)
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
    batch = mixed_batch(backend)
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
    batch = mixed_batch(minilm)
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


# ------------------------------------------------------------- attention in query blocks

@pytest.mark.parametrize("block_rows", [1, 7, 13])
def test_blocked_attention_equals_the_eager_attention(backend: TorchBackend,
                                                      block_rows: int) -> None:
    """The blocked attention runs the eager maths on fewer query rows: the matmuls round
    in a shape-dependent order, so the weights agree within ATTENTION_ATOL (the bound for
    one window under other batch shapes, tests/tolerances.py), not bit for bit."""
    batch = mixed_batch(backend)
    want = backend.attentions(batch)
    blocks: dict[int, list[torch.Tensor]] = {}
    starts: dict[int, list[int]] = {}

    def take(layer: int, start: int, probs: torch.Tensor) -> None:
        assert probs.shape[-2] <= block_rows
        blocks.setdefault(layer, []).append(probs.clone())
        starts.setdefault(layer, []).append(start)

    backend.layers(batch, take, block_rows)
    length = batch.input_ids.shape[1]
    assert sorted(blocks) == list(range(backend.info.num_layers))
    for layer, parts in blocks.items():
        assert starts[layer] == list(range(0, length, block_rows))
        got = torch.cat(parts, dim=-2)
        torch.testing.assert_close(got, want[layer], rtol=0, atol=ATTENTION_ATOL)
        padded_keys = ~batch.valid[:, None, None, :].expand_as(got)
        assert (got[padded_keys] == 0).all(), "padded keys must hold exact zeros"


def test_blocked_attention_reduces_like_whole_layers(backend: TorchBackend) -> None:
    """Statistics from attention computed 5 rows at a time equal those of whole layers
    within STAT_ATOL (the weights' own difference, ATTENTION_ATOL, carried through sums of
    weights that add to 1); kept top-k keys are the same wherever the k-th and (k+1)-th
    weights of a row are further apart than the weights' own difference."""
    batch = mixed_batch(backend)
    spec = spec_of(backend, AttentionMode("topk", k=3), None)
    flags = KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)
    whole, blocked = LayerReduction(spec, flags), LayerReduction(spec, flags)
    backend.layers(batch, whole.add_rows)
    backend.layers(batch, blocked.add_rows, 5)
    want, got = whole.statistics(), blocked.statistics()
    for name, expected in want.items():
        scale = batch.valid.sum(-1).max().item() if name in ("mean_distance", "k90") else 1
        torch.testing.assert_close(got[name], expected, rtol=0, atol=STAT_ATOL * scale,
                                   equal_nan=True, msg=name)
    kept_want, kept_got = whole.kept(), blocked.kept()
    assert kept_want is not None and kept_got is not None
    want_rows, got_rows = kept_by_row(kept_want), kept_by_row(kept_got)
    attn = backend.attentions(batch)
    for row in want_rows.keys() | got_rows.keys():
        expected, actual = want_rows.get(row, {}), got_rows.get(row, {})
        if expected.keys() == actual.keys():
            for key, weight in expected.items():
                assert abs(actual[key] - weight) <= ATTENTION_ATOL, (row, key)
        else:  # rounding may only swap keys whose weights are as close as its error
            b, layer, head, query = row
            weights = attn[layer, b, head, query].sort(descending=True).values
            assert float(weights[2] - weights[3]) <= 2 * ATTENTION_ATOL, row


def kept_by_row(kept: dict[str, np.ndarray]) -> dict[tuple, dict[int, float]]:
    """(batch row, layer, head, query) → {key: weight} of the kept weights."""
    out: dict[tuple, dict[int, float]] = {}
    columns = ("batch_index", "layer", "head", "query", "key", "weight")
    for b, layer, head, query, key, weight in zip(*(kept[c].tolist() for c in columns),
                                                  strict=True):
        out.setdefault((b, layer, head, query), {})[key] = weight
    return out
