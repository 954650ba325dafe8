"""headscope's attention function for PyTorch models: the layer sink, head masking and
query/key capture.

Every attention call of a model loaded by the torch backend runs here. Inside a
:func:`layer_sink` block each call hands its layer's probabilities [B, H, S, S] to the sink
as soon as they are formed (the streaming reduction takes them there, one layer at a time).

transformers 5 removed the ``head_mask`` argument from BERT and GPT-2, so headscope masks heads
itself, with the old semantics: a disabled head's attention probabilities are multiplied by 0,
so its context vector is 0 and the attention it returns is 0. The mask is applied by an
attention function registered with transformers' ``AttentionInterface`` under the name
:data:`HEAD_MASK_ATTENTION`. It runs the model family's own eager attention unchanged and then
scales each head's output, so with nothing disabled the model is bit-for-bit the eager model.
The mask itself lives in a :class:`contextvars.ContextVar` set by :func:`disabled_heads`; the
model's weights and modules are never changed.

Nothing is registered with transformers when this module is imported: the torch backend (and
the ablation loader) call :func:`register_attention_hook` explicitly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from pipelines.backends.base import QueryKey
from pipelines.backends.head_mask import HeadMask

#: The ``attn_implementation`` name under which the head-masking attention is registered.
HEAD_MASK_ATTENTION = "headscope_head_mask"


@dataclass
class _MaskState:
    """The mask of one :func:`disabled_heads` block and its progress through a forward pass."""

    base: nn.Module  # the transformer whose forward passes are masked
    keep: list[torch.Tensor | None]  # per layer: [H] factors, None when no head is disabled
    calls: int | None = None  # attention calls so far in the running forward; None outside one


_ACTIVE: ContextVar[_MaskState | None] = ContextVar("headscope_head_mask", default=None)
#: While set, every attention call appends its (query, key, scaling); query/key [B, H, S, d].
_QK_SINK: ContextVar[list[QueryKey] | None] = ContextVar("headscope_qk_sink", default=None)


@dataclass
class AttentionSink:
    """Where attention calls send their probabilities, and in how many query rows at a time.

    ``take(start, probs, visible)`` receives [B, H, Q, Sk]: query rows ``start`` ..
    ``start`` + Q - 1 of the layer (after head masking), in order, and ``visible`` [B, Q],
    the number of keys the layer's attention mask let each of those rows see
    (:func:`mask_visible_keys`); a layer ends with its last row. With
    ``block_rows`` None (or at least Sq) the model family's own eager attention runs and the
    whole layer comes at once (Q = Sq); otherwise :func:`blocked_attention` computes the
    layer ``block_rows`` query rows at a time, so no [B, H, Sq, Sk] tensor exists.
    """

    take: Callable[[int, torch.Tensor, torch.Tensor], None]
    block_rows: int | None = None


def mask_visible_keys(attention_mask: torch.Tensor | None, start: int, rows: int,
                      keys: int, device: torch.device) -> torch.Tensor:
    """[B or 1, Q] int: how many keys each query row ``start`` .. ``start`` + Q - 1 may see
    under the additive mask the model passed to its attention ([B, 1, Sq, Sk]: 0 where a key
    is visible, the dtype's minimum where not; None: every key)."""
    if attention_mask is None:
        return torch.full((1, rows), keys, dtype=torch.long, device=device)
    block = attention_mask[:, 0, start:start + rows, :keys]
    if block.dtype == torch.bool:
        return block.sum(-1)
    return (block > torch.finfo(block.dtype).min / 2).sum(-1)


#: While set, every attention call passes its probabilities to this sink.
_LAYER_SINK: ContextVar[AttentionSink | None] = ContextVar("headscope_layer_sink", default=None)
#: Keyword arguments of attention functions that change the maths in ways the blocked
#: attention does not implement (learned sink logits, e.g. gpt-oss).
_UNSUPPORTED_IN_BLOCKS = ("sinks", "s_aux")
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
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention, then the current layer's heads scaled by the active mask.

    ``query`` is [B, H, Sq, d], ``key``/``value`` [B, H_kv, Sk, d]. Scaling the context by
    the head factor equals scaling the probabilities before they meet ``value`` (the old
    ``head_mask``), and leaves kept heads bit-identical. Inside a :func:`layer_sink` block
    the probabilities go to the sink, and a sink with ``block_rows`` below Sq gets them from
    :func:`blocked_attention` instead (then no probabilities are returned).
    """
    sink = _QK_SINK.get()
    if sink is not None:  # capture_queries_keys(): this layer's projected queries and keys
        sink.append((query.detach(), key.detach(), float(_scaling(module, query, kwargs))))
    layer_sink = _LAYER_SINK.get()
    keep = _next_layer_keep()
    if layer_sink is not None and layer_sink.block_rows and \
            query.shape[2] > layer_sink.block_rows:
        return blocked_attention(module, query, key, value, attention_mask, layer_sink, keep,
                                 **kwargs), None
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's optional eager variant
        upcast = cast(Callable[..., tuple[torch.Tensor, torch.Tensor]],
                      module._upcast_and_reordered_attn)  # nn.Module.__getattr__ is untyped
        context, probs = upcast(query, key, value, attention_mask)
    else:
        context, probs = _eager_attention(module)(module, query, key, value, attention_mask,
                                                  **kwargs)
    # context: [B, Sq, H, d]; probs: [B, H, Sq, Sk]
    if keep is not None:
        context = context * keep.to(context)[None, None, :, None]  # [B, Sq, H, d]
        probs = probs * keep.to(probs)[None, :, None, None]  # [B, H, Sq, Sk]
    if layer_sink is not None:
        layer_sink.take(0, probs, mask_visible_keys(attention_mask, 0, probs.shape[-2],
                                                    probs.shape[-1], probs.device))
    return context, probs


def _scaling(module: nn.Module, query: torch.Tensor, kwargs: dict) -> float:
    """The factor q·k is scaled by: the call's ``scaling``, the module's, or 1/sqrt(d)."""
    for value in (kwargs.get("scaling"), getattr(module, "scaling", None)):
        if value is not None:
            return float(value)
    return query.shape[-1] ** -0.5


def blocked_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      sink: AttentionSink, keep: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
    """The eager attention of the AttentionInterface families, ``sink.block_rows`` query
    rows at a time; returns the context [B, Sq, H, d].

    Per block: softmax(q k^T · scaling [→ softcap · tanh(· / softcap)] + mask) in float32,
    cast to the values' dtype, head factors ``keep`` [H] applied, handed to ``sink``, then
    multiplied with the values. Grouped-query attention repeats each key/value head for the
    query heads that share it (as ``repeat_kv``). The products are those of the eager
    function on fewer rows, so the probabilities equal it up to the rounding of the matmul
    kernels (shape-dependent), not bit for bit. Raises NotImplementedError for variants it
    does not implement (attention sinks; GPT-2's reorder_and_upcast_attn; dropout in
    training).
    """
    unsupported = [name for name in _UNSUPPORTED_IN_BLOCKS if kwargs.get(name) is not None]
    if unsupported or getattr(module, "reorder_and_upcast_attn", False) or module.training:
        raise NotImplementedError(
            f"{type(module).__name__}: attention in query blocks does not implement "
            f"{', '.join(unsupported) or 'this variant'}; raise --memory-budget so that a "
            "whole layer's attention fits, or shorten --max-length")
    size, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: key/value head h serves query heads h·g ..
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling, softcap = _scaling(module, query, kwargs), kwargs.get("softcap")
    keys, step = key.shape[2], sink.block_rows or length
    context = query.new_empty((size, heads, length, value.shape[-1]))
    for start in range(0, length, step):
        stop = min(start + step, length)
        scores = torch.matmul(query[:, :, start:stop], key.transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, start:stop, :keys]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        del scores
        if keep is not None:
            probs = probs * keep.to(probs)[None, :, None, None]
        context[:, :, start:stop] = torch.matmul(probs, value)
        # after its use here: the sink may change it in place
        sink.take(start, probs, mask_visible_keys(attention_mask, start, stop - start, keys,
                                                  probs.device))
    return context.transpose(1, 2).contiguous()


def _next_layer_keep() -> torch.Tensor | None:
    """The head factors [H] of the layer this attention call runs (None: keep every head),
    counting the call against the active mask."""
    state = _ACTIVE.get()
    if state is None or state.calls is None:  # not inside a masked forward pass
        return None
    layer = state.calls
    state.calls += 1
    if layer >= len(state.keep):
        raise RuntimeError(f"attention ran {layer + 1} times for a mask of {len(state.keep)} "
                           "layers; head masking supports encoder self-attention only")
    return state.keep[layer]


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
def layer_sink(sink: AttentionSink) -> Iterator[None]:
    """Within the block, each attention call hands its layer's probabilities to ``sink``
    (see :class:`AttentionSink`), in layer order, while the forward pass runs."""
    token = _LAYER_SINK.set(sink)
    try:
        yield
    finally:
        _LAYER_SINK.reset(token)


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


def register_attention_hook() -> None:
    """Register :data:`HEAD_MASK_ATTENTION` with transformers (idempotent).

    A custom attention name needs a mask function as well; without one transformers builds no
    attention mask at all (padding and causality would be silently ignored). The eager one is
    registered, so the additive mask is exactly the eager model's.
    """
    AttentionInterface.register(HEAD_MASK_ATTENTION, _head_masked_attention)
    AttentionMaskInterface.register(HEAD_MASK_ATTENTION, eager_mask)


def enable_head_masking(model: PreTrainedModel) -> PreTrainedModel:
    """Switch a loaded eager model to the head-masking attention (same outputs when unmasked)."""
    register_attention_hook()
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
