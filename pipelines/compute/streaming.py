"""The streaming reduction: statistics and kept weights taken layer by layer, block by block.

A backend hands each layer's attention probabilities to :meth:`LayerReduction.add_rows` as
the forward pass forms them; the layer is cut into blocks of query rows, every statistic's
per-row terms (``stats.row_terms``) and the kept weights of a block are taken, and the block
is dropped. Only the [L, B, H] row sums and the kept rows outlive a layer, so no tensor of
size L x B x H x S x S is ever built. ``stats.head_statistics`` and ``kept.kept_weights`` on
stacked maps are the explicit path computing the same terms at once. They keep identical
weights. With one block per layer the row-wise terms (entropy, diagonals, order statistics)
agree bit for bit; the einsum terms round differently with the block's shape, and with
smaller blocks each block's float32 row sum is added in float64, so those differ by the
stacked path's own float32 summation error (pairwise: about log2(S) ulps of the mean) and a
few ulps of each term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.compute.kept import kept_weights
from pipelines.compute.stats import (
    KeyFlags,
    finish_statistics,
    row_order,
    row_sums,
    row_terms,
)
from pipelines.config import AttentionMode

#: Bytes of temporaries the reduction keeps alive per attention cell of a block: the sort's
#: scratch copy, the masks and the row terms' products; and where every cell may be kept
#: (threshold, full), the kept cells' indices (int64 from nonzero, int32 copies) and weights.
BLOCK_TEMPORARY_BYTES = {"none": 16, "topk": 16, "threshold": 80, "full": 80}


def query_block_rows(batch: int, heads: int, length: int, budget_bytes: int,
                     mode: AttentionMode | None = None) -> int:
    """Query rows per block so that a block's temporaries (B x H x Q x S cells, each
    ``BLOCK_TEMPORARY_BYTES`` of the attention mode) stay within ``budget_bytes``; at least
    1, at most S."""
    per_cell = BLOCK_TEMPORARY_BYTES[mode.kind if mode is not None else "none"]
    per_row = batch * heads * length * per_cell
    return max(1, min(length, budget_bytes // max(1, per_row)))


@dataclass
class ReductionSpec:
    """What the reduction of one batch takes from each layer."""

    num_layers: int
    causal: bool
    local_window: int
    has_sep: bool
    mode: AttentionMode
    entropy_epsilon: float = 0.0
    #: Query rows per block (None: the whole window, one block per layer).
    block_rows: int | None = None
    #: Each layer's sliding window (``ModelInfo.layer_windows``; empty: no layer has one).
    layer_windows: tuple[int | None, ...] = ()

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None


@dataclass
class LayerReduction:
    """The statistics and kept weights of one padded batch, fed one layer at a time.

    ``flags`` describe the batch's windows ([B, S], on the attention's device). Call
    :meth:`add_rows` (or :meth:`add_layer`) for layers 0 .. L - 1 in order, then
    :meth:`statistics` and :meth:`kept`.
    """

    spec: ReductionSpec
    flags: KeyFlags
    _sums: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per layer, [1, B, H]
    _kept: list[dict[str, np.ndarray]] = field(default_factory=list)  # per (layer, block)
    _open: dict[str, torch.Tensor] = field(default_factory=dict)  # the current layer's sums
    _next_row: int = 0  # the current layer's first row not yet reduced

    def add_layer(self, layer: int, probs: torch.Tensor) -> None:
        """Reduce layer ``layer``'s probabilities [B, H, S, S] float32 (zeros on pad keys)."""
        self.add_rows(layer, 0, probs)

    def add_rows(self, layer: int, start: int, probs: torch.Tensor) -> None:
        """Reduce the query rows ``start`` .. ``start`` + Q - 1 of layer ``layer``,
        ``probs`` [B, H, Q, S] float32 (zeros on pad keys). Layers in order, each layer's
        rows in order; the layer is complete with its last row."""
        if layer != len(self._sums) or start != self._next_row:
            raise RuntimeError(f"rows {start}.. of layer {layer} arrived after row "
                               f"{self._next_row} of layer {len(self._sums)}; the reduction "
                               "takes layers and rows in order")
        spec, rows, length = self.spec, probs.shape[-2], probs.shape[-1]
        step = min(spec.block_rows or rows, rows)
        k = spec.mode.k if spec.mode.kind == "topk" else None
        window = spec.window(layer)
        for offset in range(0, rows, step):
            first = start + offset  # the block's first query row in the window
            block = probs[None, :, :, offset:offset + step]  # [1, B, H, Q, S]
            order = row_order(block, k)
            terms = row_terms(block, self.flags, spec.causal, spec.local_window, first, order,
                              spec.entropy_epsilon, window)
            for name, total in row_sums(terms, self.flags.valid, spec.causal, first,
                                        window).items():
                total = total.double()  # blocks add up exactly; one block is the float32 sum
                self._open[name] = self._open[name] + total if name in self._open else total
            kept = kept_weights(block, self.flags.valid, spec.causal, spec.mode,
                                order.kth_largest, start=first, first_layer=layer,
                                window=window)
            if kept is not None:
                self._kept.append(kept)
        self._next_row = start + rows
        if self._next_row == length:
            self._sums.append(self._open)
            self._open, self._next_row = {}, 0

    def _check_complete(self) -> None:
        if len(self._sums) != self.spec.num_layers:
            raise RuntimeError(f"{len(self._sums)} of {self.spec.num_layers} layers reduced")

    def statistics(self) -> dict[str, torch.Tensor]:
        """Every statistic [L, B, H] float32 (``n_tokens`` [B]), as ``head_statistics``."""
        self._check_complete()
        sums = {name: torch.cat([layer[name] for layer in self._sums]).float()
                for name in self._sums[0]}
        return finish_statistics(sums, self.flags.valid, self.spec.causal, self.spec.has_sep,
                                 self.spec.layer_windows)

    def kept(self) -> dict[str, np.ndarray] | None:
        """The kept weights' columns in (batch, layer, head, query, key) order, as
        ``kept_weights`` of the stacked maps gives them; None in the ``none`` mode."""
        self._check_complete()
        if self.spec.mode.kind == "none":
            return None
        batch, heads = self.flags.valid.shape[0], self._sums[0]["entropy"].shape[-1]
        order = interleave(self._kept, self.spec.num_layers, batch, heads)
        return {name: np.concatenate([part[name] for part in self._kept])[order]
                for name in self._kept[0]}


def interleave(parts: list[dict[str, np.ndarray]], layers: int, batch: int,
               heads: int) -> np.ndarray:
    """Row order that turns the concatenated ``parts`` into (batch, layer, head, query, key).

    ``parts`` come layer by layer, block by block (the same number of blocks per layer), each
    in (batch, head, query, key) order; the rows of one (batch, layer, head) are the
    contiguous runs of that (batch, head) in the layer's blocks, in block order. No sort:
    the runs are counted and laid out in the wanted order.
    """
    blocks = len(parts) // layers
    groups = batch * heads
    counts = np.stack([np.bincount(part["batch_index"] * heads + part["head"],
                                   minlength=groups) for part in parts])  # [parts, B·H]
    starts = np.cumsum(counts.ravel()).reshape(counts.shape) - counts  # in the concatenation
    # [layer, block, batch, head] → [batch, layer, head, block]
    shape = (layers, blocks, batch, heads)
    starts = starts.reshape(shape).transpose(2, 0, 3, 1).ravel()
    counts = counts.reshape(shape).transpose(2, 0, 3, 1).ravel()
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total) + np.repeat(starts - (ends - counts), counts)
