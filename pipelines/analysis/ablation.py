"""Disabling attention heads (Michel et al. 2019; Kovaleva et al. 2019) and measuring the effect.

transformers 5 removed the ``head_mask`` argument from BERT and GPT-2, so headscope masks heads
itself, with the old semantics: a disabled head's attention probabilities are multiplied by 0,
so its context vector is 0 and the attention it returns is 0. The mask is applied by an
attention function registered with transformers' ``AttentionInterface`` under the name
:data:`HEAD_MASK_ATTENTION`. It runs the model family's own eager attention unchanged and then
scales each head's output, so with nothing disabled the model is bit-for-bit the eager model.
The mask itself lives in a :class:`contextvars.ContextVar` set by :func:`disabled_heads`; the
model's weights and modules are never changed.
"""

from __future__ import annotations

import logging
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedModel,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from pipelines import models
from pipelines.backends.base import resolve_device
from pipelines.backends.batching import collate, plan_batches
from pipelines.config import ConfigError
from pipelines.models import ModelInfo
from pipelines.text.tokenize import Window

log = logging.getLogger(__name__)

#: The ``attn_implementation`` name under which the head-masking attention is registered.
HEAD_MASK_ATTENTION = "headscope_head_mask"
#: Name of the table :func:`head_importance` returns.
TABLE = "head_importance"
HEAD_IMPORTANCE = pa.schema([
    ("disabled", pa.string()),  # the disabled heads as HeadMask text, e.g. "3.5" or "3.5,3.7"
    ("layer", pa.uint8()),  # filled when exactly one head is disabled, else null
    ("head", pa.uint8()),
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


# --------------------------------------------------------------------------- which heads


@dataclass(frozen=True)
class HeadMask:
    """A set of disabled heads: ``(layer, head)`` pairs, ``(layer, None)`` for a whole layer.

    The text form is ``"3.5,3.7,0.*"``: comma-separated ``layer.head`` entries, 0-based, with
    ``*`` for all heads of a layer. The empty mask disables nothing.
    """

    entries: frozenset[tuple[int, int | None]] = frozenset()

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None,
              num_heads: int | None = None) -> HeadMask:
        """Parse the text form; with the model's sizes, also check every entry is in range."""
        entries: set[tuple[int, int | None]] = set()
        if text.strip():
            for raw in text.split(","):
                entries.add(_parse_entry(raw.strip(), text))
        mask = cls(frozenset(entries))
        if num_layers is not None and num_heads is not None:
            mask.validate(num_layers, num_heads)
        return mask

    @classmethod
    def of(cls, *heads: tuple[int, int]) -> HeadMask:
        """The mask disabling the given ``(layer, head)`` pairs."""
        return cls(frozenset((int(layer), int(head)) for layer, head in heads))

    def validate(self, num_layers: int, num_heads: int) -> None:
        """Raise ConfigError if an entry names a layer or head the model does not have."""
        for layer, head in sorted(self.entries, key=_entry_key):
            entry = _entry_text(layer, head)
            if not 0 <= layer < num_layers:
                raise ConfigError(
                    f"disabled head {entry!r}: layer {layer} is out of range; the model has "
                    f"layers 0-{num_layers - 1}"
                )
            if head is not None and not 0 <= head < num_heads:
                raise ConfigError(
                    f"disabled head {entry!r}: head {head} is out of range; each layer has "
                    f"heads 0-{num_heads - 1}"
                )

    def pairs(self, num_heads: int) -> list[tuple[int, int]]:
        """The disabled ``(layer, head)`` pairs, whole layers expanded, sorted."""
        out: set[tuple[int, int]] = set()
        for layer, head in self.entries:
            out.update([(layer, head)] if head is not None else
                       [(layer, h) for h in range(num_heads)])
        return sorted(out)

    def as_tensor(self, num_layers: int, num_heads: int) -> torch.Tensor:
        """[L, H] float32: 1 for a kept head, 0 for a disabled one."""
        self.validate(num_layers, num_heads)
        keep = torch.ones(num_layers, num_heads)  # [L, H]
        for layer, head in self.pairs(num_heads):
            keep[layer, head] = 0.0
        return keep

    def __str__(self) -> str:
        return ",".join(_entry_text(*entry) for entry in sorted(self.entries, key=_entry_key))


def _parse_entry(entry: str, text: str) -> tuple[int, int | None]:
    layer, dot, head = entry.partition(".")
    if not entry:
        raise ConfigError(f"disabled heads {text!r}: empty entry; use e.g. 3.5,3.7,0.*")
    if not dot or not _is_index(layer) or not (head == "*" or _is_index(head)):
        raise ConfigError(
            f"disabled heads {text!r}: entry {entry!r} is not layer.head (0-based integers, "
            "'*' for all heads of a layer), e.g. 3.5 or 0.*"
        )
    return int(layer), None if head == "*" else int(head)


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdecimal()


def _entry_text(layer: int, head: int | None) -> str:
    return f"{layer}.{'*' if head is None else head}"


def _entry_key(entry: tuple[int, int | None]) -> tuple[int, int]:
    return entry[0], -1 if entry[1] is None else entry[1]


# --------------------------------------------------------------------------- masking


@dataclass
class _MaskState:
    """The mask of one :func:`disabled_heads` block and its progress through a forward pass."""

    base: nn.Module  # the transformer whose forward passes are masked
    keep: list[torch.Tensor | None]  # per layer: [H] factors, None when no head is disabled
    calls: int | None = None  # attention calls so far in the running forward; None outside one


_ACTIVE: ContextVar[_MaskState | None] = ContextVar("headscope_head_mask", default=None)
#: While set, every attention call appends its (query, key, scaling); query/key [B, H, S, d].
QueryKey = tuple[torch.Tensor, torch.Tensor, float]
_QK_SINK: ContextVar[list[QueryKey] | None] = ContextVar("headscope_qk_sink", default=None)
_EAGER: dict[type, Callable] = {}


def _eager_attention(module: nn.Module) -> Callable:
    """The eager attention function of the module's own model family."""
    cls = type(module)
    if cls not in _EAGER:
        function = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
        if function is None:
            raise NotImplementedError(
                f"{cls.__name__} has no eager_attention_forward to wrap; head masking supports "
                "models whose attention goes through transformers' AttentionInterface"
            )
        _EAGER[cls] = function
    return _EAGER[cls]


def _head_masked_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention, then the current layer's heads scaled by the active mask.

    ``query`` is [B, H, Sq, d], ``key``/``value`` [B, H, Sk, d]. Scaling the context by the
    head factor equals scaling the probabilities before they meet ``value`` (the old
    ``head_mask``), and leaves kept heads bit-identical.
    """
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's optional eager variant
        context, probs = module._upcast_and_reordered_attn(query, key, value, attention_mask)
    else:
        context, probs = _eager_attention(module)(module, query, key, value, attention_mask,
                                                  **kwargs)
    # context: [B, Sq, H, d]; probs: [B, H, Sq, Sk]
    sink = _QK_SINK.get()
    if sink is not None:  # capture_queries_keys(): this layer's projected queries and keys
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) \
            or query.shape[-1] ** -0.5
        sink.append((query.detach(), key.detach(), float(scaling)))
    state = _ACTIVE.get()
    if state is None or state.calls is None:  # not inside a masked forward pass
        return context, probs
    layer = state.calls
    state.calls += 1
    if layer >= len(state.keep):
        raise RuntimeError(f"attention ran {layer + 1} times for a mask of {len(state.keep)} "
                           "layers; head masking supports encoder self-attention only")
    keep = state.keep[layer]  # [H] or None
    if keep is None:
        return context, probs
    context = context * keep.to(context)[None, None, :, None]  # [B, Sq, H, d]
    probs = probs * keep.to(probs)[None, :, None, None]  # [B, H, Sq, Sk]
    return context, probs


def _start_forward(module: nn.Module, args: tuple) -> None:
    state = _ACTIVE.get()
    if state is not None and state.base is module:
        state.calls = 0


def _end_forward(module: nn.Module, args: tuple, output: object) -> None:
    state = _ACTIVE.get()
    if state is None or state.base is not module or state.calls is None:
        return
    calls, state.calls = state.calls, None
    if calls != len(state.keep):
        raise RuntimeError(f"attention ran {calls} times in a forward pass of a "
                           f"{len(state.keep)}-layer model; the head mask was not applied fully")


@contextmanager
def capture_queries_keys() -> Iterator[list[QueryKey]]:
    """Within the block, attention calls of head-masking models append (query, key, scaling).

    Query and key are the projected per-head vectors the eager attention multiplies,
    [B, H, S, d], in layer order; softmax(query @ key.T * scaling + mask) is the attention.
    """
    sink: list[QueryKey] = []
    token = _QK_SINK.set(sink)
    try:
        yield sink
    finally:
        _QK_SINK.reset(token)


def register_head_masking() -> None:
    """Register :data:`HEAD_MASK_ATTENTION` with transformers (idempotent).

    A custom attention name needs a mask function as well; without one transformers builds no
    attention mask at all (padding and causality would be silently ignored). The eager one is
    registered, so the additive mask is exactly the eager model's.
    """
    AttentionInterface.register(HEAD_MASK_ATTENTION, _head_masked_attention)
    AttentionMaskInterface.register(HEAD_MASK_ATTENTION, eager_mask)


def enable_head_masking(model: PreTrainedModel) -> PreTrainedModel:
    """Switch a loaded eager model to the head-masking attention (same outputs when unmasked)."""
    register_head_masking()
    model.set_attn_implementation(HEAD_MASK_ATTENTION)
    return model


def _model_sizes(model: PreTrainedModel) -> tuple[int, int]:
    return int(model.config.num_hidden_layers), int(model.config.num_attention_heads)


@contextmanager
def disabled_heads(model: PreTrainedModel, mask: HeadMask | torch.Tensor) -> Iterator[None]:
    """Within the block, forward passes of ``model`` run with the heads of ``mask`` disabled.

    ``mask`` is a HeadMask or an [L, H] tensor of per-head factors (1 keeps a head, 0 disables
    it). ``model`` must use :data:`HEAD_MASK_ATTENTION` (:func:`load_for_ablation` or
    :func:`enable_head_masking`). Calling ``model`` or its ``base_model`` is masked; each
    forward pass is checked to have masked every layer exactly once.

    Thread safety: the mask is held in a ContextVar, so it applies only to the thread (or
    asyncio task) that entered the block. The block temporarily adds a forward pre-hook and
    hook to ``model.base_model``; the service calls this from one worker thread at a time,
    and concurrent blocks on one model are not supported.
    """
    implementation = model.config._attn_implementation
    if implementation != HEAD_MASK_ATTENTION:
        raise ValueError(
            f"the model uses attention {implementation!r}, which cannot disable heads; load it "
            "with load_for_ablation() or call enable_head_masking(model) first"
        )
    num_layers, num_heads = _model_sizes(model)
    if isinstance(mask, HeadMask):
        factors = mask.as_tensor(num_layers, num_heads)  # [L, H]
    else:
        factors = mask.detach().float().cpu()  # [L, H]
        if tuple(factors.shape) != (num_layers, num_heads):
            raise ValueError(f"head mask has shape {tuple(factors.shape)}; the model needs "
                             f"({num_layers}, {num_heads})")
    device = next(model.parameters()).device
    keep = [None if bool((row == 1).all()) else row.to(device) for row in factors]
    base = model.base_model
    token = _ACTIVE.set(_MaskState(base=base, keep=keep))
    handles = [base.register_forward_pre_hook(_start_forward),
               base.register_forward_hook(_end_forward)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class AblationModel:
    """A model loaded for head ablation, with its pretraining head where it has one."""

    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    device: torch.device
    #: "lm_loss" (GPT-2 causal LM head), "mlm_loss" (BERT masked-LM head) or None (no head).
    objective: str | None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics :func:`head_importance` reports for this model."""
        if self.objective == "lm_loss":
            return ("lm_loss",)
        representation = ("representation_cosine", "representation_l2")
        return (self.objective, *representation) if self.objective else representation


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while probing for a head we may not use."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_for_ablation(name: str, device: str = "cpu", dtype: str = "float32",
                      allow_download: bool = False) -> AblationModel:
    """Load a model with the head-masking attention and its pretraining head where present.

    GPT-2 loads as a causal LM. A BERT-family model loads as a masked LM if its checkpoint
    holds the MLM head's weights; otherwise (e.g. sentence encoders such as all-MiniLM-L6-v2)
    it falls back to the bare encoder, and only representation metrics are available.
    """
    register_head_masking()
    torch_device, torch_dtype = resolve_device(device, dtype)
    source, config, common = models.load_config(name, allow_download)
    models.refuse_onnx_export(name, source, common,
                              "head ablation needs the PyTorch model it was exported from")
    tokenizer = models.load_fast_tokenizer(name, source, common)
    options = {"attn_implementation": HEAD_MASK_ATTENTION, "dtype": torch_dtype, **common}
    causal = config.model_type in models.CAUSAL_TYPES
    head_class, objective = ((AutoModelForCausalLM, "lm_loss") if causal
                             else (AutoModelForMaskedLM, "mlm_loss"))
    if objective == "mlm_loss" and tokenizer.mask_token_id is None:
        model, missing = None, ["(the tokenizer has no mask token)"]
    else:
        with _quiet_transformers():
            model, loading = head_class.from_pretrained(source, output_loading_info=True,
                                                        **options)
        prefix = f"{model.base_model_prefix}."
        missing = [key for key in loading["missing_keys"] if not key.startswith(prefix)]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        log.warning("model %r has no trained %s head (missing %s); loading the encoder alone: "
                    "only representation metrics are available", name,
                    objective.removesuffix("_loss").upper(), shown)
        model = AutoModel.from_pretrained(source, **options)
        objective = None
    model.eval().to(torch_device)
    info = models.describe_torch(name, source, config, tokenizer, model)
    log.info("loaded %s for head ablation (%s, objective %s) on %s", name,
             type(model).__name__, objective, torch_device)
    return AblationModel(info=info, tokenizer=tokenizer, model=model, device=torch_device,
                         objective=objective)


# --------------------------------------------------------------------------- measuring


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
        if bundle.objective == "mlm_loss" and item.mlm_rows.numel():
            logits = model(**item.mlm_inputs).logits  # [B, S, V]
            picked = logits[item.mlm_rows, item.mlm_cols].float()  # [N, V]
            loss = F.cross_entropy(picked, item.mlm_labels, reduction="sum")
            sums["mlm_loss"] += float(loss)
            counts["mlm_loss"] += int(item.mlm_rows.numel())
        if "representation_l2" in sums:
            hidden = model.base_model(**item.inputs).last_hidden_state.float()  # [B, S, D]
            if baseline:
                item.baseline_hidden = hidden
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


register_head_masking()
