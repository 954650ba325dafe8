"""Attention-map classes of Kovaleva et al. (2019) from transparent rules on map features.

Kovaleva et al. ("Revealing the dark secrets of BERT") labelled 400 attention maps by hand as
vertical, diagonal, vertical+diagonal, block or heterogeneous and trained a CNN on images of
the maps; neither the labels nor the CNN were released. Here each (window, layer, head) map gets
three feature scores (vertical, diagonal, block) and threshold rules (``PatternThresholds``,
recorded in the run manifest) turn them into a class. The classes are reproducible and can be
explained from the scores, but they are our rules, not their classifier, and their agreement
with the hand labels is unmeasured.

Every score is corrected for chance. For query row i the pattern holds some keys; a uniform
row over the k_i keys the query may see (n bidirectional, i + 1 causal) would put chance_i on
them, and over the valid rows with chance_i < 1

    score = sum_i (mass_i - chance_i) / sum_i (1 - chance_i).

A uniform map scores 0, a map whose rows sit entirely on the pattern scores 1 (negative: less
than chance). Rows whose visible keys all belong to the pattern tell nothing and are left out,
so a uniform causal map is not "vertical" or "diagonal" by accident on its first tokens (row 0
sees only itself). Rows weigh by their room above chance, 1 - chance_i: in a bidirectional
window that is (nearly) the same for every row, so the score is the chance-corrected mean over
rows and chance (about 3/n) matters only for short windows; in a causal one the early rows,
which see few keys, weigh less. A score with no row left is NaN. Short windows are noisy:
random (Dirichlet) rows over 8 keys reach scores of 0.3-0.5, over 20 keys stay below 0.17.
Everything runs in float32, vectorised over layer × batch × head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipelines.compute.stats import keys_visible

PATTERN_CLASSES: tuple[str, ...] = (
    "vertical", "diagonal", "vertical+diagonal", "block", "heterogeneous")
#: m, the columns of the vertical score: [CLS] and both [SEP] of a sentence pair.
VERTICAL_COLUMNS = 3
#: The diagonal band is |i - j| <= DIAGONAL_REACH (self included).
DIAGONAL_REACH = 1


@dataclass(frozen=True)
class PatternThresholds:
    """Rules on the chance-corrected scores; the first that holds gives the class.

    1. vertical+diagonal: vertical >= substantial, diagonal >= substantial and together
       >= dominant (both lines are clearly there and between them explain most of the mass);
    2. vertical: vertical >= dominant and diagonal < substantial;
    3. diagonal: diagonal >= dominant and vertical < substantial;
    4. block (sentence pairs only): block >= block;
    5. heterogeneous: anything else, including windows too short to score (NaN).

    Rules 1-3 cannot overlap (``substantial < dominant``). Defaults: ``dominant`` 0.6 — a part
    dominates when it holds a clear majority of the mass a row could put above chance, so the
    map reads as that line; ``substantial`` 0.25 — a quarter of it still draws a visible second
    line (an even vertical/diagonal mixture scores about 0.5 and 0.5), while random rows over
    20 or more keys stay below 0.17; ``block`` 0.5 — at least half of the mass a uniform row
    would send to the other segment stays in the query's own segment. Block is tried after
    vertical and diagonal because a diagonal head, or one on its own segment's [SEP], also
    stays in its segment.
    """

    dominant: float = 0.6
    substantial: float = 0.25
    block: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.substantial < self.dominant <= 1.0:
            raise ValueError("thresholds need 0 < substantial < dominant <= 1")
        if not 0.0 < self.block <= 1.0:
            raise ValueError("the block threshold must be in (0, 1]")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


DEFAULT_THRESHOLDS = PatternThresholds()


def _corrected(mass: torch.Tensor, inside: torch.Tensor, visible: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
    """[L, B, H]: sum_i (mass_i - chance_i) / sum_i (1 - chance_i), chance_i = inside_i / k_i.

    ``mass`` is [L, B, H, S]; ``inside`` (pattern keys row i may see, [L, B, H, S] or
    [1, B, 1, S]), ``visible`` (k_i) and ``valid`` ([1, B, 1, S]) broadcast to it. Only valid
    rows with inside_i < k_i count; none left gives NaN.
    """
    counted = valid & (inside < visible)
    chance = torch.where(counted, inside / visible.clamp(min=1), 0.0)
    room = (counted.float() - chance).sum(-1)
    excess = torch.where(counted, mass - chance, 0.0).sum(-1)
    return excess / room


def _per_row(flags: torch.Tensor) -> torch.Tensor:
    """[B, S] → [1, B, 1, S], to broadcast against [L, B, H, S]."""
    return flags[None, :, None, :]


def _column_chance(valid: torch.Tensor, visible: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, S]: sum_i [key j visible to query i] / k_i, the column mass of a uniform map."""
    share = valid / visible.clamp(min=1)  # [B, S]: 1 / k_i on valid rows
    if causal:  # query i sees key j <= i
        return share.flip(-1).cumsum(-1).flip(-1) * valid
    return share.sum(-1, keepdim=True) * valid


def vertical_score(attn: torch.Tensor, valid: torch.Tensor, visible: torch.Tensor,
                   causal: bool) -> torch.Tensor:
    """[L, B, H]: row mass on the m = VERTICAL_COLUMNS keys with the most mass above chance.

    Vertical heads put most of every row on the same few keys — [CLS], the [SEP] tokens, a
    frequent punctuation mark, a causal model's first token. Choosing the columns by their mass
    finds all of these without token flags, and m = 3 covers [CLS] and both [SEP] of a pair
    while keeping chance (m/n) small. A column's chance is sum_i [j visible to i] / k_i, what
    uniform rows give it: the same for every key of a bidirectional window, larger for a
    causal model's first keys, which every later row sees. chance_i = (chosen keys row i may
    see) / k_i; rows that see only chosen keys are left out.
    """
    m = min(VERTICAL_COLUMNS, attn.shape[-1])
    column_chance = _column_chance(valid, visible, causal)  # [B, S]
    column_mass = torch.einsum("lbhqk,bq->lbhk", attn, valid.float())  # [L, B, H, S]
    above_chance = (column_mass - column_chance[None, :, None]).masked_fill(
        ~valid[None, :, None, :], -float("inf"))  # [L, B, H, S]; never a pad key
    top = above_chance.topk(m, dim=-1).indices  # [L, B, H, m]
    on_top = attn.gather(-1, top[..., None, :].expand(*attn.shape[:-1], m))  # [L, B, H, S, m]
    top_seen = (top[..., None, :] < _per_row(visible)[..., None]).sum(-1)  # [L, B, H, S]
    return _corrected(on_top.sum(-1), top_seen, _per_row(visible), _per_row(valid))


def _band_keys(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, S] float: keys within |i - j| <= DIAGONAL_REACH that query i may see."""
    n = valid.sum(-1, keepdim=True)  # [B, 1]
    positions = torch.arange(valid.shape[-1], device=valid.device)[None, :]  # [1, S]
    low = (positions - DIAGONAL_REACH).clamp(min=0)  # [1, S]
    high = positions if causal else torch.minimum(positions + DIAGONAL_REACH, n - 1)  # [B, S]
    return (high - low + 1).float() * valid


def diagonal_score(attn: torch.Tensor, valid: torch.Tensor, visible: torch.Tensor,
                   causal: bool) -> torch.Tensor:
    """[L, B, H]: row mass within |i - j| <= 1, the query itself included.

    Self is included because Kovaleva et al. labelled images of the maps, where attention to
    the previous token, to the token itself and to the next one all draw the same diagonal
    line (heads often split their weight among them), and a causal model's band is only
    i - 1 and i. chance_i = (band keys row i may see) / k_i, so a causal model's rows 0 and 1,
    which see nothing but the band, are left out.
    """
    size = attn.shape[-1]
    band = torch.zeros_like(attn[..., 0])  # [L, B, H, S]
    for offset in range(-min(DIAGONAL_REACH, size - 1), min(DIAGONAL_REACH, size - 1) + 1):
        diag = attn.diagonal(offset=offset, dim1=-2, dim2=-1)  # [L, B, H, S - |offset|]
        band += torch.nn.functional.pad(diag, (0, offset) if offset > 0 else (-offset, 0))
    return _corrected(band, _per_row(_band_keys(valid, causal)), _per_row(visible),
                      _per_row(valid))


def block_score(attn: torch.Tensor, valid: torch.Tensor, segment: torch.Tensor,
                visible: torch.Tensor, causal: bool) -> torch.Tensor:
    """[L, B, H]: row mass on keys of the query's own segment; NaN unless the window is a pair.

    chance_i = (own-segment keys row i may see) / k_i: what a uniform map keeps inside. Rows
    that see only their own segment are left out: all rows of a single-segment window (hence
    NaN), and in a causal model the first segment's rows.
    """
    second = segment.bool() & valid  # [B, S]
    sides = torch.stack([valid & ~second, second], -1).float()  # [B, S, 2]
    side_mass = torch.einsum("lbhqk,bkc->lbhqc", attn, sides)  # [L, B, H, S, 2]
    own_mass = torch.where(second[None, :, None], side_mass[..., 1], side_mass[..., 0])
    side_keys = sides.cumsum(1) if causal else sides.sum(1, keepdim=True).expand_as(sides)
    own_keys = torch.where(second, side_keys[..., 1], side_keys[..., 0])  # [B, S]
    return _corrected(own_mass, _per_row(own_keys), _per_row(visible), _per_row(valid))


def pattern_scores(attn: torch.Tensor, valid: torch.Tensor, segment: torch.Tensor | None,
                   causal: bool) -> dict[str, torch.Tensor]:
    """``vertical``, ``diagonal``, ``block`` as [L, B, H] float32 chance-corrected scores.

    ``attn`` is [L, B, H, S, S] with zeros on padded keys (padded query rows are ignored),
    ``valid`` [B, S] bool, ``segment`` [B, S] (1 = text_pair; None: no pairs).
    """
    attn = attn.float()
    if segment is None:
        segment = torch.zeros_like(valid)
    visible = keys_visible(valid, causal)  # [B, S]
    return {
        "vertical": vertical_score(attn, valid, visible, causal),
        "diagonal": diagonal_score(attn, valid, visible, causal),
        "block": block_score(attn, valid, segment.to(valid.device), visible, causal),
    }


def classify(scores: dict[str, torch.Tensor],
             thresholds: PatternThresholds = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """[L, B, H] int8 codes into PATTERN_CLASSES, by the rules of ``PatternThresholds``."""
    t = thresholds
    vertical, diagonal, block = scores["vertical"], scores["diagonal"], scores["block"]
    rules = [  # first match wins; NaN fails every comparison
        ("vertical+diagonal", (vertical >= t.substantial) & (diagonal >= t.substantial)
         & (vertical + diagonal >= t.dominant)),
        ("vertical", (vertical >= t.dominant) & (diagonal < t.substantial)),
        ("diagonal", (diagonal >= t.dominant) & (vertical < t.substantial)),
        ("block", block >= t.block),
    ]
    codes = torch.full(vertical.shape, PATTERN_CLASSES.index("heterogeneous"),
                       dtype=torch.int8, device=vertical.device)
    for name, holds in reversed(rules):
        codes = codes.masked_fill(holds, PATTERN_CLASSES.index(name))
    return codes
