"""How far two models' attention maps are apart, head by head, on the same windows.

After Kovaleva et al. (2019, "Revealing the dark secrets of BERT", §5: how fine-tuning
changes the attention of each head), for one window and one (layer, head) of models A and B:

- ``cosine``: the cosine similarity of the two maps over the cells a query may see (valid
  query rows × valid keys, keys <= query in a causal model, within a sliding-window layer's
  window), the cells flattened:
  dot / sqrt(|a|² |b|²), in float64.
- ``js_distance``: the Jensen–Shannon distance (natural log, so 0 .. sqrt(ln 2)) between the
  two rows of each valid query, each row divided by its sum first, averaged over the valid
  query rows: sqrt(JS(P, Q)) with JS = (KL(P || M) + KL(Q || M)) / 2, M = (P + Q) / 2 and
  0 ln 0 = 0. (``head_similarity`` compares heads of one model with log base 2 instead.)

A model compared with itself gives exactly 1 and 0, by IEEE arithmetic and not by a special
case: float32 products are exact in float64, so dot, |a|² and |b|² are the same sums of the
same terms; sqrt(x·x) == x (correctly rounded sqrt), and x / x == 1. Rows P == Q give
M = (P + P) / 2 == P, every ln(P / M) == 0, and sqrt(0) == 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipelines.compute.kept import visible_pairs

#: Bytes of temporaries per cell (B × H × query rows × S) of a chunk of the comparison: about
#: ten float64 copies alive at once (both maps, both rows' distributions, their mean and the
#: divergence's products).
CELL_TEMPORARY_BYTES = 80
#: Cells of one chunk unless told otherwise: 2**20 cells peak near 80 MiB.
CHUNK_CELLS = 2**20


def row_js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[...]: sqrt of the Jensen–Shannon divergence (nats) between rows ``p`` and ``q``
    [..., S] float64, each a distribution (non-negative, summing to 1); 0 ln 0 = 0."""
    m = (p + q) / 2

    def kl(x: torch.Tensor) -> torch.Tensor:  # KL(x || m); x > 0 implies m > 0
        return torch.where(x > 0, x * torch.log(x / m), torch.zeros_like(x)).sum(-1)

    # A divergence a rounding below 0 (rows that nearly agree) is 0.
    return ((kl(p) + kl(q)) / 2).clamp_min(0.0).sqrt()


@dataclass
class MapAgreement:
    """Cosine similarity and mean JS distance of two models' maps for one padded batch,
    fed layer by layer (either model's query rows in any blocks, in order).

    ``valid`` [B, S] bool describes the batch's windows; ``causal`` the models' layout and
    ``layer_windows`` each layer's sliding window (``ModelInfo.layer_windows``): the cells
    compared are those ``kept.visible_pairs`` lets a query see. Keeps only [L, B, H] float64
    sums: dot, |a|², |b|², and the rows' distances.
    """

    num_layers: int
    valid: torch.Tensor
    causal: bool
    chunk_cells: int = CHUNK_CELLS
    layer_windows: tuple[int | None, ...] = ()
    _sums: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per layer, [B, H]
    _next_row: int = 0

    def add_rows(self, layer: int, start: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Query rows ``start`` .. ``start`` + Q - 1 of layer ``layer`` of both models,
        ``a`` and ``b`` [B, H, Q, S] float32 (whatever they hold outside the visible cells)."""
        if layer != len(self._sums) - (self._next_row > 0) or start != self._next_row:
            raise RuntimeError(f"rows {start}.. of layer {layer} arrived out of order")
        if start == 0:
            size, heads = a.shape[:2]
            zeros = torch.zeros((size, heads), dtype=torch.float64, device=a.device)
            self._sums.append({name: zeros.clone() for name in ("dot", "aa", "bb", "js")})
        sums, (size, heads, rows, length) = self._sums[layer], a.shape
        step = max(1, min(rows, self.chunk_cells // max(1, size * heads * length)))
        for offset in range(0, rows, step):
            first, count = start + offset, min(step, rows - offset)
            window = self.layer_windows[layer] if self.layer_windows else None
            cells = visible_pairs(self.valid, self.causal, first, count,
                                  window)[:, None]  # [B, 1, Q, S]
            zero = torch.zeros((), dtype=torch.float64, device=a.device)
            x = torch.where(cells, a[:, :, offset:offset + count].double(), zero)
            y = torch.where(cells, b[:, :, offset:offset + count].double(), zero)
            sums["dot"] += (x * y).sum((-2, -1))
            sums["aa"] += (x * x).sum((-2, -1))
            sums["bb"] += (y * y).sum((-2, -1))
            tiny = torch.finfo(torch.float64).tiny  # a padded row (all 0) stays 0
            p = x / x.sum(-1, keepdim=True).clamp_min(tiny)
            q = y / y.sum(-1, keepdim=True).clamp_min(tiny)
            queries = self.valid[:, first:first + count].double()[:, None]  # [B, 1, Q]
            sums["js"] += (row_js_distance(p, q) * queries).sum(-1)
        self._next_row = 0 if start + rows == length else start + rows

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine, js_distance), each [L, B, H] float64."""
        if len(self._sums) != self.num_layers or self._next_row:
            raise RuntimeError(f"{len(self._sums)} of {self.num_layers} layers compared")
        stacked = {name: torch.stack([layer[name] for layer in self._sums])
                   for name in self._sums[0]}
        cosine = stacked["dot"] / torch.sqrt(stacked["aa"] * stacked["bb"])
        rows = self.valid.sum(-1).double()[None, :, None]  # [1, B, 1]
        return cosine, stacked["js"] / rows


def map_agreement(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, causal: bool,
                  chunk_cells: int = CHUNK_CELLS) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, js_distance) [L, B, H] float64 of stacked maps ``a`` and ``b``
    [L, B, H, S, S] (``valid`` [B, S] bool); see the module docstring."""
    agreement = MapAgreement(a.shape[0], valid, causal, chunk_cells)
    for layer in range(a.shape[0]):
        agreement.add_rows(layer, 0, a[layer], b[layer])
    return agreement.result()
