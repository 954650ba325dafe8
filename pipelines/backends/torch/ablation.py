"""Loading a PyTorch model for head ablation: the head-masking attention and, where the
checkpoint has one, its pretraining head (causal LM for GPT-2, masked LM for BERT)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from pipelines import models
from pipelines.backends.base import resolve_device
from pipelines.backends.torch.hooks import HEAD_MASK_ATTENTION, register_attention_hook
from pipelines.models import ModelInfo

log = logging.getLogger(__name__)


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
    register_attention_hook()
    torch_device, torch_dtype = resolve_device(device, dtype)
    source, config, common = models.load_config(name, allow_download)
    models.refuse_onnx_export(name, source, common,
                              "head ablation needs the PyTorch model it was exported from")
    tokenizer = models.load_fast_tokenizer(name, source, common)
    options = {"attn_implementation": HEAD_MASK_ATTENTION, "dtype": torch_dtype, **common}
    causal = models.is_causal(config)
    objective: str | None
    head_class, objective = ((AutoModelForCausalLM, "lm_loss") if causal
                             else (AutoModelForMaskedLM, "mlm_loss"))
    model: PreTrainedModel | None = None
    if objective == "mlm_loss" and tokenizer.mask_token_id is None:
        missing = ["(the tokenizer has no mask token)"]
    else:
        with _quiet_transformers(), models.loading_errors(name, source, common):
            # output_loading_info=True returns (model, info); the stubs give the model alone
            model, loading = head_class.from_pretrained(  # type: ignore[misc]
                source, output_loading_info=True, **options)
        prefix = f"{model.base_model_prefix}."
        missing = [key for key in loading["missing_keys"] if not key.startswith(prefix)]
        models.check_weights_complete(name, [key.removeprefix(prefix) for key in
                                             loading["missing_keys"] if key.startswith(prefix)])
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        log.warning("model %r has no trained %s head (missing %s); loading the encoder alone: "
                    "only representation metrics are available", name,
                    objective.removesuffix("_loss").upper(), shown)
        model, loading = AutoModel.from_pretrained(
            source, output_loading_info=True, **options)
        models.check_weights_complete(name, loading["missing_keys"])
        objective = None
    assert model is not None  # loaded with its head, or without it when the head is missing
    model.eval().to(torch_device)
    info = models.describe_torch(name, source, config, tokenizer, model, common)
    log.info("loaded %s for head ablation (%s, objective %s) on %s", name,
             type(model).__name__, objective, torch_device)
    return AblationModel(info=info, tokenizer=tokenizer, model=model, device=torch_device,
                         objective=objective)

