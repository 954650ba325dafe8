"""PyTorch (transformers) backend with eager attention and headscope's attention hook."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from pipelines import models
from pipelines.backends.base import (
    Capability,
    LayerSink,
    QueryKey,
    resolve_device,
    stacked_attentions,
)
from pipelines.backends.batching import Batch
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.torch import hooks
from pipelines.compute.stats import keys_visible


class EmptyAttentionError(RuntimeError):
    """The model returned no attention probabilities (e.g. an SDPA/flash implementation)."""


class MaskMismatchError(RuntimeError):
    """A layer's attention mask lets queries see other keys than ``ModelInfo`` describes."""


class TorchBackend:
    """A transformers model on one device; every :class:`Capability` is available."""

    name = "torch"
    capabilities = frozenset(Capability)

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32",
                 allow_download: bool = False) -> None:
        self.device, self.dtype = resolve_device(device, dtype)
        loaded = models.load(model, self.device, self.dtype, allow_download)
        self.info, self._tokenizer, self.model = loaded.info, loaded.tokenizer, loaded.model
        # The eager attention with headscope's hook (head masking, query/key capture); with no
        # head disabled it is bit for bit the eager model.
        hooks.register_attention_hook()
        hooks.enable_head_masking(self.model)

    def disabled_heads(self, mask: HeadMask) -> AbstractContextManager[None]:
        """Forward passes inside the block run with the heads of ``mask`` disabled."""
        return hooks.disabled_heads(self.model, mask)

    def capture_queries_keys(self) -> AbstractContextManager[list[QueryKey]]:
        """Attention calls inside the block append their layer's (query, key, scaling)."""
        return hooks.capture_queries_keys()

    @property
    def tokenizer(self):
        return self._tokenizer

    def _inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self.info.accepts_token_type_ids:
            inputs["token_type_ids"] = batch.type_ids
        return inputs

    @torch.inference_mode()
    def layers(self, batch: Batch, sink: LayerSink, block_rows: int | None = None) -> None:
        """Run the forward pass; each attention call hands its layer's probabilities to
        ``sink`` as it forms them, whole or ``block_rows`` query rows at a time (see
        :meth:`Backend.layers` and ``hooks.blocked_attention``). Each block's attention mask
        is checked against the keys ``ModelInfo`` says the layer's queries see
        (:class:`MaskMismatchError` otherwise)."""
        batch = batch.to(self.device)
        valid_keys = batch.valid[:, None, None, :]  # [B, 1, 1, S]
        length = batch.input_ids.shape[1]
        by_window = {window: keys_visible(batch.valid, self.info.causal, window).long()
                     for window in set(self.info.layer_windows or (None,))}  # each [B, S]
        layer = 0

        def take(start: int, probs: torch.Tensor, visible: torch.Tensor) -> None:
            nonlocal layer  # probs [B, H, Q, S] in the model's dtype, visible [B or 1, Q]
            rows = probs.shape[-2]
            want = by_window[self.info.layer_window(layer)][:, start:start + rows]
            self._check_mask(layer, start, visible, want, batch.valid[:, start:start + rows])
            probs = probs.float()  # the same tensor when it is float32 already
            sink(layer, start, probs.mul_(valid_keys))  # exact zeros on padded keys
            if start + rows == length:
                layer += 1

        with hooks.layer_sink(hooks.AttentionSink(take, block_rows)):
            self.model(**self._inputs(batch))
        if layer != self.info.num_layers:
            raise EmptyAttentionError(
                f"model {self.info.name!r} ran {layer} attention calls for "
                f"{self.info.num_layers} layers; its attention must go through "
                "transformers' AttentionInterface")

    def _check_mask(self, layer: int, start: int, visible: torch.Tensor, want: torch.Tensor,
                    valid_rows: torch.Tensor) -> None:
        """MaskMismatchError unless every valid query row saw as many keys as expected."""
        wrong = (visible.expand_as(want) != want) & valid_rows
        if bool(wrong.any()):
            b, q = (int(i) for i in wrong.nonzero()[0])
            window = self.info.layer_window(layer)
            raise MaskMismatchError(
                f"model {self.info.name!r}, layer {layer}: its attention mask lets query "
                f"{start + q} of window {b} see {int(visible.expand_as(want)[b, q])} keys, "
                f"but headscope expects {int(want[b, q])} ("
                f"{'causal' if self.info.causal else 'bidirectional'}"
                f"{f', sliding window {window}' if window else ''}); the model's config does "
                "not describe the mask it applies, so its statistics would be wrong")

    def attentions(self, batch: Batch) -> torch.Tensor:
        """[L, B, H, S, S] float32, zeros on padded keys: every layer, stacked."""
        return stacked_attentions(self, batch)

    @torch.inference_mode()
    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """[L+1, B, S, D] float32: embeddings and every block's output."""
        batch = batch.to(self.device)
        outputs = self.model(**self._inputs(batch), output_hidden_states=True)
        return torch.stack(outputs.hidden_states).float()

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "torch_version": torch.__version__}
