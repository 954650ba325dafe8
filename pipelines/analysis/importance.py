"""Each head's importance: model quality with the head disabled against none disabled.

Disabling follows Michel et al. (2019) and Kovaleva et al. (2019); the masking itself is the
torch backend's (:mod:`pipelines.backends.torch.hooks`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.backends.batching import collate, plan_batches
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.torch.ablation import AblationModel
from pipelines.backends.torch.hooks import disabled_heads
from pipelines.config import ConfigError
from pipelines.dataset.schema import INDEX
from pipelines.text.tokenize import Window

#: Name of the table :func:`head_importance` returns.
TABLE = "head_importance"
HEAD_IMPORTANCE = pa.schema([
    ("disabled", pa.string()),  # the disabled heads as HeadMask text, e.g. "3.5" or "3.5,3.7"
    ("layer", INDEX),  # filled when exactly one head is disabled, else null
    ("head", INDEX),
    ("metric", pa.string()),
    ("baseline", pa.float64()),
    ("ablated", pa.float64()),
    ("delta", pa.float64()),  # ablated - baseline
    ("n_tokens", pa.int64()),  # tokens the metric averages over
])
METRICS = ("lm_loss", "mlm_loss", "representation_cosine", "representation_l2")
#: Share of non-special tokens replaced by the mask token for the masked-LM loss.
MLM_FRACTION = 0.15
#: Logit cells (batch tokens × vocabulary) per forward pass: 2**26 float32 = 256 MiB.
MAX_LOGIT_CELLS = 2**26


@dataclass
class _Prepared:
    """One batch with everything the measurements reuse across ablations."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask[, token_type_ids]: [B, S]
    valid: torch.Tensor  # [B, S] bool
    mlm_inputs: dict[str, torch.Tensor] | None = None  # inputs with [MASK] tokens: [B, S]
    mlm_rows: torch.Tensor | None = None  # [N] int64, masked positions
    mlm_cols: torch.Tensor | None = None  # [N] int64
    mlm_labels: torch.Tensor | None = None  # [N] int64, original token ids
    baseline_hidden: torch.Tensor | None = None  # [B, S, D] final hidden states, no ablation


def mlm_positions(window: Window, seed: int, fraction: float = MLM_FRACTION) -> np.ndarray:
    """Sorted positions of ``window`` to mask: a seeded ``fraction`` of its non-special tokens.

    The choice depends only on the seed, the document id and the window number, so it is the
    same in every batch arrangement and for every ablation.
    """
    candidates = np.flatnonzero(~window.is_special)
    if candidates.size == 0:
        return candidates
    count = max(1, round(fraction * candidates.size))
    key = zlib.crc32(window.doc.doc_id.encode())
    rng = np.random.default_rng([seed, key, window.window])
    return np.sort(rng.choice(candidates, size=count, replace=False))


def _prepare(bundle: AblationModel, windows: Sequence[Window], seed: int,
             batch_tokens: int) -> list[_Prepared]:
    info = bundle.info
    vocab = int(bundle.model.config.vocab_size)
    if bundle.objective is not None:  # keep the logits of one batch within MAX_LOGIT_CELLS
        batch_tokens = min(batch_tokens, max(1, MAX_LOGIT_CELLS // vocab))
    lengths = [w.n_tokens for w in windows]
    prepared = []
    for indices in plan_batches(lengths, batch_tokens, heads=info.num_heads):
        batch = collate([windows[i] for i in indices], info.pad_token_id).to(bundle.device)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if info.accepts_token_type_ids:
            inputs["token_type_ids"] = batch.type_ids
        item = _Prepared(inputs=inputs, valid=batch.valid)
        if bundle.objective == "mlm_loss":
            rows, cols = [], []
            for row, window in enumerate(batch.windows):
                positions = mlm_positions(window, seed)
                rows.append(np.full(positions.size, row, dtype=np.int64))
                cols.append(positions.astype(np.int64))
            item.mlm_rows = torch.from_numpy(np.concatenate(rows)).to(bundle.device)  # [N]
            item.mlm_cols = torch.from_numpy(np.concatenate(cols)).to(bundle.device)  # [N]
            item.mlm_labels = batch.input_ids[item.mlm_rows, item.mlm_cols]  # [N]
            masked = batch.input_ids.clone()  # [B, S]
            masked[item.mlm_rows, item.mlm_cols] = bundle.tokenizer.mask_token_id
            item.mlm_inputs = {**inputs, "input_ids": masked}
        prepared.append(item)
    return prepared


def _measure(bundle: AblationModel, prepared: list[_Prepared],
             baseline: bool = False) -> dict[str, tuple[float, int]]:
    """Mean and token count of every metric over all batches, with the active mask.

    ``baseline`` records the final hidden states the representation metrics compare against.
    """
    sums = dict.fromkeys(bundle.metrics, 0.0)
    counts = dict.fromkeys(bundle.metrics, 0)
    model = bundle.model
    for item in prepared:
        if bundle.objective == "lm_loss":
            logits = model(**item.inputs, use_cache=False).logits  # [B, S, V]
            targets = item.inputs["input_ids"][:, 1:]  # [B, S-1]
            predicted = item.valid[:, 1:]  # [B, S-1]: right padding, so the source is valid too
            loss = F.cross_entropy(logits[:, :-1][predicted].float(), targets[predicted],
                                   reduction="sum")
            sums["lm_loss"] += float(loss)
            counts["lm_loss"] += int(predicted.sum())
        if bundle.objective == "mlm_loss":
            # _prepare fills the masked inputs for the mlm objective
            assert item.mlm_inputs is not None and item.mlm_rows is not None
            assert item.mlm_cols is not None and item.mlm_labels is not None
            if item.mlm_rows.numel():
                logits = model(**item.mlm_inputs).logits  # [B, S, V]
                picked = logits[item.mlm_rows, item.mlm_cols].float()  # [N, V]
                loss = F.cross_entropy(picked, item.mlm_labels, reduction="sum")
                sums["mlm_loss"] += float(loss)
                counts["mlm_loss"] += int(item.mlm_rows.numel())
        if "representation_l2" in sums:
            hidden = model.base_model(**item.inputs).last_hidden_state.float()  # [B, S, D]
            if baseline:
                item.baseline_hidden = hidden
            assert item.baseline_hidden is not None  # the baseline pass runs first
            cosine = F.cosine_similarity(hidden, item.baseline_hidden, dim=-1)  # [B, S]
            distance = (hidden - item.baseline_hidden).norm(dim=-1)  # [B, S]
            n_valid = int(item.valid.sum())
            sums["representation_cosine"] += float((1.0 - cosine)[item.valid].double().sum())
            sums["representation_l2"] += float(distance[item.valid].double().sum())
            counts["representation_cosine"] += n_valid
            counts["representation_l2"] += n_valid
    return {name: (sums[name] / counts[name] if counts[name] else float("nan"), counts[name])
            for name in bundle.metrics}


@torch.inference_mode()
def head_importance(model_bundle: AblationModel, windows: Sequence[Window],
                    heads: Sequence[tuple[int, int] | HeadMask] | None = None, seed: int = 0,
                    batch_tokens: int = 4096, progress: bool = True) -> pa.Table:
    """Each head's importance: the metrics with it (or each given set) disabled vs. none.

    ``heads``: ``(layer, head)`` pairs and/or HeadMask sets, each ablated on its own; None
    ablates every single head in turn. Metrics (means over tokens of all windows; padding
    never counts): ``lm_loss`` — mean next-token cross-entropy (GPT-2); ``mlm_loss`` — mean
    cross-entropy at a seeded 15% of non-special tokens replaced by the mask token, the same
    positions for the baseline and every ablation (BERT with an MLM head);
    ``representation_cosine`` / ``representation_l2`` — mean 1 - cosine similarity and mean
    L2 distance of the final hidden states to the unablated ones (BERT family).

    Returns a table with the :data:`HEAD_IMPORTANCE` schema, one row per ablation and metric.
    """
    if not windows:
        raise ValueError("head_importance needs at least one window")
    if seed < 0:
        raise ConfigError(f"seed must be 0 or positive, got {seed}")
    info = model_bundle.info
    num_layers, num_heads = info.num_layers, info.num_heads
    if heads is None:
        ablations = [HeadMask.of((layer, head)) for layer in range(num_layers)
                     for head in range(num_heads)]
    else:
        ablations = [item if isinstance(item, HeadMask) else HeadMask.of(item) for item in heads]
    for mask in ablations:
        mask.validate(num_layers, num_heads)
    prepared = _prepare(model_bundle, windows, seed, batch_tokens)
    model = model_bundle.model
    with disabled_heads(model, HeadMask()):
        baseline = _measure(model_bundle, prepared, baseline=True)
    for name in ("representation_cosine", "representation_l2"):
        if name in baseline:  # the unablated states against themselves
            baseline[name] = (0.0, baseline[name][1])
    columns: dict[str, list] = {name: [] for name in HEAD_IMPORTANCE.names}
    for mask in tqdm(ablations, desc="ablating heads", unit="ablation", disable=not progress):
        with disabled_heads(model, mask):
            ablated = _measure(model_bundle, prepared)
        pairs = mask.pairs(num_heads)
        single = pairs[0] if len(pairs) == 1 else (None, None)
        for name in model_bundle.metrics:
            (base_value, count), (value, _) = baseline[name], ablated[name]
            columns["disabled"].append(str(mask))
            columns["layer"].append(single[0])
            columns["head"].append(single[1])
            columns["metric"].append(name)
            columns["baseline"].append(base_value)
            columns["ablated"].append(value)
            columns["delta"].append(value - base_value)
            columns["n_tokens"].append(count)
    return pa.Table.from_pydict(columns, schema=HEAD_IMPORTANCE)
