"""PyTorch (transformers) backend with eager attention."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from pipelines import models
from pipelines.analysis import ablation
from pipelines.backends.base import resolve_device
from pipelines.backends.batching import Batch


class EmptyAttentionError(RuntimeError):
    """The model returned no attention probabilities (e.g. an SDPA/flash implementation)."""


class TorchBackend:
    name = "torch"

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32",
                 allow_download: bool = False) -> None:
        self.device, self.dtype = resolve_device(device, dtype)
        loaded = models.load(model, self.device, self.dtype, allow_download)
        self.info, self._tokenizer, self.model = loaded.info, loaded.tokenizer, loaded.model
        # Eager attention that can disable heads; with none disabled it is bit for bit eager.
        ablation.enable_head_masking(self.model)

    def disabled_heads(self, mask: ablation.HeadMask) -> AbstractContextManager[None]:
        """Forward passes inside the block run with the heads of ``mask`` disabled."""
        return ablation.disabled_heads(self.model, mask)

    @property
    def tokenizer(self):
        return self._tokenizer

    @torch.inference_mode()
    def attentions(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if self.info.accepts_token_type_ids:
            inputs["token_type_ids"] = batch.type_ids
        outputs = self.model(**inputs, output_attentions=True)
        layers = outputs.attentions
        if not layers or len(layers) != self.info.num_layers:
            raise EmptyAttentionError(
                f"model {self.info.name!r} returned {len(layers or ())} attention tensors for "
                f"{self.info.num_layers} layers; load it with attn_implementation='eager'"
            )
        attn = torch.stack(layers).float()  # [L, B, H, S, S]
        return attn * batch.valid[None, :, None, None, :]

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "torch_version": torch.__version__}
