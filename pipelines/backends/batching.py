"""Length-bucketed batches under a token budget, and padding into tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from pipelines.text.tokenize import Window


@dataclass
class Batch:
    """Windows padded on the right to a common length S. Padding is masked everywhere."""

    windows: list[Window]
    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64, 1 = real token
    type_ids: torch.Tensor  # [B, S] int64
    segment: torch.Tensor  # [B, S] int64: 0 = text, 1 = text_pair (0 on padding)
    is_special: torch.Tensor  # [B, S] bool
    is_sep: torch.Tensor  # [B, S] bool
    is_punct: torch.Tensor  # [B, S] bool

    @property
    def valid(self) -> torch.Tensor:
        """[B, S] bool: real (non-pad) positions."""
        return self.attention_mask.bool()

    def to(self, device: torch.device) -> Batch:
        moved = {k: v.to(device, non_blocking=True) for k, v in vars(self).items()
                 if isinstance(v, torch.Tensor)}
        return Batch(windows=self.windows, **moved)


#: Attention cells (layers × heads × B × S²) per batch: 2**26 float32 cells = 256 MiB.
MAX_ATTENTION_CELLS = 2**26


def plan_batches(lengths: Sequence[int], batch_tokens: int, heads: int = 1,
                 max_attention_cells: int = MAX_ATTENTION_CELLS,
                 min_fill: float = 0.75) -> list[list[int]]:
    """Group indices into batches of similar length.

    Indices are visited longest first. A batch holds at most ``batch_tokens`` padded tokens
    (B × longest), at most ``max_attention_cells`` attention weights over all ``heads``
    (layers × heads × B × longest², which bounds memory for long windows), and only windows
    at least ``min_fill`` × its longest, so padding stays small. Every index lands in
    exactly one batch.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order.tolist():
        length = lengths[index]
        size = len(current) + 1
        fits = (size * longest <= batch_tokens
                and heads * size * longest**2 <= max_attention_cells
                and length >= min_fill * longest)
        if not current or not fits:
            if current:
                batches.append(current)
            current, longest = [], length
        current.append(index)
    if current:
        batches.append(current)
    return batches


def collate(windows: list[Window], pad_token_id: int) -> Batch:
    """Pad windows on the right into one Batch (CPU tensors)."""
    size, longest = len(windows), max(w.n_tokens for w in windows)

    def padded(name: str, dtype: npt.DTypeLike, fill: int | bool) -> torch.Tensor:
        out = np.full((size, longest), fill, dtype=dtype)
        for row, window in enumerate(windows):
            values = getattr(window, name)
            out[row, : len(values)] = values
        return torch.from_numpy(out)

    mask = np.zeros((size, longest), dtype=np.int64)
    for row, window in enumerate(windows):
        mask[row, : window.n_tokens] = 1
    return Batch(
        windows=windows,
        input_ids=padded("input_ids", np.int64, pad_token_id),
        attention_mask=torch.from_numpy(mask),
        type_ids=padded("type_ids", np.int64, 0),
        segment=padded("segment", np.int64, 0),
        is_special=padded("is_special", np.bool_, False),
        is_sep=padded("is_sep", np.bool_, False),
        is_punct=padded("is_punct", np.bool_, False),
    )
