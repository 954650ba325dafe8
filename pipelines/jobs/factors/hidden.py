"""Hidden states of chosen layers, streamed batch by batch as rows of token vectors.

Layer ``0`` is the embedding output and layer ``l`` the output of transformer block ``l``
(transformers' ``hidden_states`` tuple), so a 6-layer model has layers 0..6. Each row of a
:class:`TokenRows` is one (window, layer, position) vector; padding never appears, special
tokens only when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.backends.base import Backend, Capability, require
from pipelines.backends.batching import collate, plan_batches
from pipelines.config import ConfigError
from pipelines.text.tokenize import Window


@dataclass
class TokenRows:
    """Token vectors of one batch and where each came from."""

    windows: list[Window]  # the batch's windows
    vectors: torch.Tensor  # [N, D] float32, unit length when normalised
    norms: torch.Tensor  # [N] the vectors' lengths before normalising
    window_index: np.ndarray  # [N] index into ``windows``
    layer: np.ndarray  # [N] hidden-state layer (0 = embeddings)
    position: np.ndarray  # [N] position in the window


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """``"all"``, ``"0,3,6"`` or ``"1-6"`` → layer indices into 0..num_layers."""
    if text.strip() == "all":
        return tuple(range(num_layers + 1))
    layers: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise ConfigError(f"--layers {text!r}: use 'all', '0,3,6' or '1-6'") from None
        layers.update(span)
    bad = sorted(x for x in layers if not 0 <= x <= num_layers)
    if bad or not layers:
        raise ConfigError(f"--layers {text!r}: layers are 0 (embeddings) to {num_layers}")
    return tuple(sorted(layers))


def token_rows(backend: Backend, windows: list[Window], layers: tuple[int, ...],
               batch_tokens: int, include_special: bool = False,
               normalise: bool = True) -> Iterator[TokenRows]:
    """The selected layers' token vectors of ``windows``, one forward batch at a time."""
    require(backend, Capability.HIDDEN_STATES, "transformer factors")
    lengths = [w.n_tokens for w in windows]
    for indices in plan_batches(lengths, batch_tokens):
        batch = collate([windows[i] for i in indices], backend.info.pad_token_id)
        states = backend.hidden_states(batch)[list(layers)]  # [l, B, S, D]
        keep = batch.valid.to(states.device)  # [B, S]
        if not include_special:
            keep &= ~batch.is_special.to(states.device)
        layer_i, row_i, pos_i = torch.nonzero(keep.expand(len(layers), -1, -1),
                                              as_tuple=True)
        vectors = states[layer_i, row_i, pos_i]  # [N, D]
        norms = vectors.norm(dim=1)  # [N]
        if normalise:
            vectors = vectors / norms.clamp_min(1e-12)[:, None]
        yield TokenRows(batch.windows, vectors, norms, row_i.cpu().numpy(),
                        np.asarray(layers)[layer_i.cpu().numpy()], pos_i.cpu().numpy())
