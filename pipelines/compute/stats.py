"""Per-head attention statistics, vectorised over layer × batch × head on the device.

Notation (see docs/statistics.md): A is one head's attention restricted to the n valid
positions; rows are queries i, columns keys j; k_i is the number of keys query i may see
(n for bidirectional models, i + 1 for causal ones; a sliding-window layer of window w sees
min(i + 1, w) causal keys, or those with |i - j| < w bidirectionally). "mean_i" averages
over valid query rows.
Everything runs in float32. ``pipelines.compute.reference`` holds the same definitions as
plain loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.config import ENTROPY_EPSILONS

#: Column name → definition, written into every manifest (with the job's option values).
DEFINITIONS: dict[str, str] = {
    "entropy": "mean_i of -sum_j A'_ij ln A'_ij, nats, 0 ln 0 = 0, with A' = (1 - eps) A + "
               "eps/n over the n keys and eps = entropy_epsilon (0: A' = A)",
    "entropy_norm": "mean over i with k_i > 1 of H_i / ln k_i, H_i of A (never smoothed); "
                    "k_i = keys query i may see",
    "max_weight": "mean_i max_j A_ij",
    "mass_self": "mean_i A_ii",
    "mass_prev": "mean_i A_i,i-1 (0 for i = 0)",
    "mass_next": "mean_i A_i,i+1 (0 for the last token)",
    "mass_first": "mean_i A_i,0",
    "mass_sep": "mean_i sum over separator keys j of A_ij (null without a separator token)",
    "mass_special": "mean_i sum over special keys j of A_ij; special = control tokens "
                    "(CLS/SEP/BOS/EOS/PAD, added or typed), never [UNK]/[MASK]",
    "mass_punct": "mean_i sum over punctuation keys j (tokens.is_punct: source characters, "
                  "by the job's punctuation rule) of A_ij",
    "mean_distance": "mean_i sum_j A_ij |i - j|",
    "mass_window": "mean_i sum over |i - j| <= w of A_ij",
    "mass_sparse": "mean_i sum over (|i - j| <= w) or special j of A_ij",
    "k90": "mean_i of the fewest keys whose largest weights sum to >= 0.9",
    "n_tokens": "n, valid tokens in the window",
}
STAT_NAMES: tuple[str, ...] = tuple(k for k in DEFINITIONS if k != "n_tokens")
K90_MASS = 0.9
#: Clark et al.'s (2019) entropy smoothing: 0.9999 A + 1e-4 / n (General_Analysis.ipynb).
CLARK_ENTROPY_EPSILON = ENTROPY_EPSILONS["clark"]

#: How each statistic relates to Clark et al.'s released code (General_Analysis.ipynb), for
#: the statistics that do not depend on the job's options; ``clark_relation`` adds the rest.
_CLARK_FIXED: dict[str, str] = {
    "mass_self": "same: their 'self' selector (np.eye(n))",
    "mass_prev": "same: their 'left' selector (np.eye(n, n, -1), key i-1)",
    "mass_next": "same: their 'right' selector (np.eye(n, n, 1), key i+1)",
    "mass_first": "same on BERT: their 'cls' ([CLS] is token 0); GPT-2 has no [CLS]",
    "mass_sep": "same: their 'sep' (every [SEP] key)",
    "n_tokens": "same: their n (attns.shape[-1])",
}
_NOT_IN_CLARK = "not in Clark et al. (2019)"


def clark_relation(punctuation: str, entropy_epsilon: float) -> dict[str, str]:
    """Statistic → "same: ..." or "differs: ..." against Clark et al.'s code, for a job that
    used punctuation rule ``punctuation`` and entropy smoothing ``entropy_epsilon``.

    Means over query rows per window, like theirs per document; their corpus figure is the
    unweighted mean over documents, as ``head_summary``'s ``<stat>_mean`` over windows.
    """
    relation = {name: _CLARK_FIXED.get(name, _NOT_IN_CLARK) for name in DEFINITIONS}
    relation["mass_punct"] = (
        "same: their 'punct' (keys whose token is '.' or ',')" if punctuation == "clark" else
        "differs: they count only keys whose token is '.' or ','; this rule also counts "
        "other punctuation, so mass_punct >= theirs (punctuation=clark gives theirs)")
    if entropy_epsilon == CLARK_ENTROPY_EPSILON:
        relation["entropy"] = ("same formula as their 'entropies': A' = 0.9999 A + 1e-4/n, "
                               "-sum_j A' ln A' averaged over query rows (their NumPy ran it "
                               "in float16 on float16 maps; here float32)")
    else:
        relation["entropy"] = (
            f"differs: they smooth A' = 0.9999 A + 1e-4/n first, this job used eps = "
            f"{entropy_epsilon:g}; smoothing only raises entropy, most in peaked heads "
            "(entropy_epsilon=clark gives theirs)")
    return relation


@dataclass
class KeyFlags:
    """Per-position facts of a padded batch, on the device."""

    valid: torch.Tensor  # [B, S] bool
    is_sep: torch.Tensor  # [B, S] bool
    is_special: torch.Tensor  # [B, S] bool
    is_punct: torch.Tensor  # [B, S] bool


def keys_visible(valid: torch.Tensor, causal: bool, window: int | None = None) -> torch.Tensor:
    """[B, S] float: k_i, the number of keys query i may see (0 on padding).

    Valid tokens are the first n positions of each row. ``window`` w (a sliding-window
    layer): a causal query i sees keys i - w < j <= i, a bidirectional one |i - j| < w.
    """
    n = valid.sum(-1, keepdim=True)  # [B, 1]
    positions = torch.arange(valid.shape[-1], device=valid.device)[None, :]  # [1, S]
    reach = valid.shape[-1] if window is None else window - 1  # keys on each side beyond i
    before = torch.clamp(positions, max=reach)
    after = torch.zeros_like(n) if causal else torch.clamp(n - 1 - positions, 0, reach)
    return ((before + after + 1).clamp(max=n)).float() * valid


@dataclass
class RowOrder:
    """What each query row's weights in sorted order tell; all [L, B, H, S]."""

    max_weight: torch.Tensor  # largest weight of the row
    k90: torch.Tensor  # fewest keys whose largest weights sum to >= K90_MASS (float)
    kth_largest: torch.Tensor | None  # the k-th largest weight (for top-k), if k was given


def row_order(attn: torch.Tensor, k: int | None = None, mass: float = K90_MASS) -> RowOrder:
    """Sort every query row once (ascending, in one scratch buffer) and read off its order.

    k90 uses ascending cumulative sums c: the k largest weights reach ``mass`` exactly when
    the other S - k sum to at most total - mass, so k90 = S - #{m : c_m <= total - mass},
    counted by a binary search in each row (c never decreases).
    On the CPU NumPy's in-place sort (x86-simd-sort) is several times faster than torch.sort.
    """
    size = attn.shape[-1]
    if attn.device.type == "cpu":
        scratch = attn.numpy().copy()
        scratch.sort(axis=-1)
        ascending = torch.from_numpy(scratch)  # shares the buffer
    else:
        ascending = torch.sort(attn, dim=-1).values
    max_weight = ascending[..., -1].clone()
    kth = ascending[..., size - min(k, size)].clone() if k else None
    cumulative = ascending.cumsum_(-1)  # in the scratch buffer; nondecreasing (weights >= 0)
    droppable = torch.searchsorted(cumulative, cumulative[..., -1:] - mass, right=True)[..., 0]
    return RowOrder(max_weight, (size - droppable).float(), kth)


def block_diagonal(attn: torch.Tensor, start: int, offset: int) -> torch.Tensor:
    """[..., Q]: A_i,i+offset for the query rows i = start .. start + Q - 1 of a block
    ``attn`` [..., Q, S] (0 where that key does not exist)."""
    rows, keys = attn.shape[-2:]
    shift = start + offset  # key of block row r is r + shift
    first = min(rows, max(0, -shift))  # block rows before it have no such key
    diag = attn.diagonal(offset=shift, dim1=-2, dim2=-1) if -rows < shift < keys \
        else attn[..., :0, 0]
    return torch.nn.functional.pad(diag, (first, rows - first - diag.shape[-1]))


def shifted_keys(flags: torch.Tensor, start: int, rows: int, offset: int) -> torch.Tensor:
    """[B, Q]: flags[i + offset] for the query rows i = start .. start + Q - 1 (0 where that
    key does not exist); ``flags`` is [B, S]."""
    keys = flags.shape[-1]
    positions = torch.arange(start, start + rows, device=flags.device) + offset  # [Q]
    inside = (positions >= 0) & (positions < keys)
    return flags[:, positions.clamp(0, keys - 1)] * inside[None, :]


def _band(attn: torch.Tensor, start: int, width: int,
          key_flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, B, H, Q] each: mass with abs(i - j) <= width, and the part of it on flagged keys."""
    inside = torch.zeros_like(attn[..., 0])
    inside_flagged = torch.zeros_like(inside)
    reach = min(width, attn.shape[-1] - 1)  # diagonals beyond the matrix hold nothing
    for offset in range(-reach, reach + 1):
        diag = block_diagonal(attn, start, offset)
        inside += diag
        inside_flagged += diag * shifted_keys(key_flags, start, attn.shape[-2],
                                              offset)[None, :, None, :]
    return inside, inside_flagged


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """[L, B, H, S]: -sum_j A_ij ln A_ij with 0 ln 0 = 0, on one scratch buffer."""
    tiny = torch.finfo(attn.dtype).tiny  # A ln(max(A, tiny)) = 0 for A = 0
    return attn.clamp_min(tiny).log_().mul_(attn).sum(-1).neg_()


def smoothed_row_entropy(attn: torch.Tensor, valid: torch.Tensor,
                         epsilon: float) -> torch.Tensor:
    """[L, B, H, S] nats: -sum_j A'_ij ln A'_ij over the n valid keys, A' = (1 - ε) A + ε / n.

    ``attn`` [L, B, H, S, S] has zeros on padded keys, ``valid`` [B, S]; n is each window's
    valid tokens (Clark et al. 2019 smooth with ε = 1e-4 over the whole map's length). With
    c = ε / n, -sum_j A' ln A' = -((1 - ε) sum_j A_ij ln A'_ij + c sum_j ln A'_ij); one
    scratch buffer holds ln A', which is exactly ln c on the S - n padded keys (A = 0 there).
    """
    n = valid.sum(-1).clamp(min=1)  # [B]
    spread = (epsilon / n.to(attn.dtype))[None, :, None, None]  # c, [1, B, 1, 1]
    logs = attn.mul(1.0 - epsilon).add_(spread[..., None]).log_()  # ln A' >= ln c, finite
    padded = (attn.shape[-1] - n)[None, :, None, None] * spread.log()  # (S - n) ln c
    log_sum = logs.sum(-1) - padded  # sum over the valid keys of ln A'
    weighted = logs.mul_(attn).sum(-1)  # sum_j A_ij ln A'_ij (A = 0 on padded keys)
    return -((1.0 - epsilon) * weighted + spread * log_sum)


#: Columns of ``key_feature_columns``: on the CPU the product with 16 columns ran 2 to 2.6
#: times as fast as with 3 on MiniLM's batch shapes (the GEMM kernels' width). It stays an
#: einsum: torch.matmul broadcasting the [B, 1, S, 16] columns over heads took more memory
#: (a 2,048-token SmolLM2 window went past its 2 GiB budget).
KEY_FEATURE_COLUMNS = 16


def key_feature_columns(flags: KeyFlags) -> torch.Tensor:
    """[B, S, 16] float: separator, special and punctuation keys as columns 0, 1, 2 (zeros
    after them), so that attn @ columns gives each row's mass on each kind of key."""
    columns = torch.zeros((*flags.valid.shape, KEY_FEATURE_COLUMNS), device=flags.valid.device)
    columns[..., 0], columns[..., 1], columns[..., 2] = flags.is_sep, flags.is_special, \
        flags.is_punct
    return columns


#: Statistics that are means over the rows with k_i > 1, not over every valid row.
_NORM_ROW_STATS = ("entropy_norm",)


def row_terms(attn: torch.Tensor, flags: KeyFlags, causal: bool, local_window: int,
              start: int = 0, order: RowOrder | None = None,
              entropy_epsilon: float = 0.0, window: int | None = None
              ) -> dict[str, torch.Tensor]:
    """Every statistic's term for each query row of a block, [L, B, H, Q] float32.

    ``attn`` [L, B, H, Q, S] holds the query rows ``start`` .. ``start`` + Q - 1 of every
    window (Q = S and ``start`` = 0 for whole maps), zeros on padded keys; ``flags`` describe
    the whole windows ([B, S]). A statistic is the mean of its terms over the valid rows
    (``row_sums``, ``finish_statistics``). ``order`` (``row_order`` of the same block) is
    reused if given; ``entropy_epsilon`` > 0 smooths ``entropy``'s maps; ``window`` is the
    layers' sliding window (``keys_visible``).
    """
    rows, size = attn.shape[-2:]
    k_i = keys_visible(flags.valid, causal, window)[:, start:start + rows]  # [B, Q]
    log_k = torch.where(k_i > 1, k_i.clamp(min=2).log(), torch.ones_like(k_i))
    entropy_rows = row_entropy(attn)  # [L, B, H, Q]
    queries = torch.arange(start, start + rows, device=attn.device)
    distance = (queries[:, None] - torch.arange(size, device=attn.device)[None, :]).abs()
    key_mass = torch.einsum("lbhqk,bkf->lbhqf", attn, key_feature_columns(flags))  # [.., Q, 16]
    band, band_special = _band(attn, start, local_window, flags.is_special.float())
    order = order or row_order(attn)
    return {
        "entropy": entropy_rows if not entropy_epsilon else
        smoothed_row_entropy(attn, flags.valid, entropy_epsilon),
        "entropy_norm": entropy_rows / log_k[None, :, None, :],
        "max_weight": order.max_weight,
        "mass_self": block_diagonal(attn, start, 0),
        "mass_prev": block_diagonal(attn, start, -1),
        "mass_next": block_diagonal(attn, start, 1),
        "mass_first": attn[..., 0],
        "mass_sep": key_mass[..., 0],
        "mass_special": key_mass[..., 1],
        "mass_punct": key_mass[..., 2],
        "mean_distance": torch.einsum("lbhqk,qk->lbhq", attn, distance.float()),
        "mass_window": band,
        "mass_sparse": band + key_mass[..., 1] - band_special,
        "k90": torch.minimum(order.k90, k_i[None, :, None, :].clamp(min=1)),
    }


def row_weights(valid: torch.Tensor, causal: bool, start: int = 0,
                rows: int | None = None, window: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Q] float each: the rows ``start`` .. ``start`` + Q - 1 that enter a statistic's
    mean: every valid query, and (for ``entropy_norm``) those with k_i > 1."""
    stop = valid.shape[-1] if rows is None else start + rows
    q = valid[:, start:stop].float()
    return q, (keys_visible(valid, causal, window)[:, start:stop] > 1).float()


def row_sums(terms: dict[str, torch.Tensor], valid: torch.Tensor, causal: bool,
             start: int = 0, window: int | None = None) -> dict[str, torch.Tensor]:
    """[L, B, H] float32: each statistic's terms (``row_terms``) summed over the rows that
    enter its mean."""
    rows = next(iter(terms.values())).shape[-1]
    q, norm_rows = row_weights(valid, causal, start, rows, window)
    return {name: (term * (norm_rows if name in _NORM_ROW_STATS else q)[None, :, None, :])
            .sum(-1) for name, term in terms.items()}


def finish_statistics(sums: dict[str, torch.Tensor], valid: torch.Tensor, causal: bool,
                      has_sep: bool, windows: Sequence[int | None] = ()
                      ) -> dict[str, torch.Tensor]:
    """Every statistic [L, B, H] (``n_tokens`` [B]) from its row sums over whole windows:
    divided by the rows counted; NaN ``entropy_norm`` for a window with no row of k_i > 1,
    NaN ``mass_sep`` for a model without a separator token. ``windows``: each layer's
    sliding window (empty: none)."""
    layers = next(iter(sums.values())).shape[0]
    q = valid.float()
    n = q.sum(-1)  # [B]
    norm_count = torch.stack([row_weights(valid, causal, window=window)[1].sum(-1)
                              for window in (windows or (None,) * layers)])  # [L, B]
    stats = {name: total / (norm_count.clamp(min=1)[:, :, None] if name in _NORM_ROW_STATS
                            else n[None, :, None]) for name, total in sums.items()}
    stats["entropy_norm"] = stats["entropy_norm"].masked_fill((norm_count == 0)[:, :, None],
                                                              float("nan"))
    if not has_sep:
        stats["mass_sep"] = torch.full_like(stats["mass_sep"], float("nan"))
    stats["n_tokens"] = n
    return stats


def head_statistics(attn: torch.Tensor, flags: KeyFlags, causal: bool, local_window: int,
                    has_sep: bool, order: RowOrder | None = None,
                    entropy_epsilon: float = 0.0, windows: Sequence[int | None] = ()
                    ) -> dict[str, torch.Tensor]:
    """Every statistic as a [L, B, H] float32 tensor (``n_tokens`` as [B]), from whole maps.

    ``attn`` is [L, B, H, S, S] float32 with zeros on padded keys; padded query rows are
    ignored whatever they hold. ``order`` (from ``row_order``) is reused if given.
    ``entropy_epsilon`` > 0 smooths the maps of ``entropy`` (``smoothed_row_entropy``).
    ``windows`` gives each layer's sliding window (empty: no layer has one).
    This is the stacked path, every layer at once; ``pipelines.compute.streaming`` reduces
    the same terms layer by layer and block by block.
    """
    if any(window is not None for window in windows):  # layers see different keys
        parts = [row_sums(row_terms(attn[layer:layer + 1], flags, causal, local_window, 0,
                                    None, entropy_epsilon, window), flags.valid, causal,
                          window=window) for layer, window in enumerate(windows)]
        sums = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    else:
        terms = row_terms(attn, flags, causal, local_window, 0, order, entropy_epsilon)
        sums = row_sums(terms, flags.valid, causal)
    return finish_statistics(sums, flags.valid, causal, has_sep, windows)
