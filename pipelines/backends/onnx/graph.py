"""The export format ONNX Runtime reads: file names, and the graph's input and output names.

``headscope export-onnx`` (:mod:`pipelines.jobs.export_onnx`) writes this format; the ONNX
backend checks a folder's metadata against it before it loads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipelines import models
from pipelines.backends.batching import Batch

FORMAT = "headscope-onnx/1"
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"


#: The families ``headscope export-onnx`` exports and verifies (``ModelInfo.family``).
ONNX_FAMILIES = frozenset({"bert", "gpt2"})


@dataclass(frozen=True)
class GraphNames:
    """Input and output names of an exported graph."""

    inputs: list[str]
    attentions: list[str]  # one per layer, [B, H, S, S]
    hidden_states: list[str]  # embeddings + one per layer, [B, S, D]; empty when not exported

    @classmethod
    def for_model(cls, info: models.ModelInfo, hidden_states: bool) -> GraphNames:
        inputs = ["input_ids", "attention_mask"]
        if info.accepts_token_type_ids:
            inputs.append("token_type_ids")
        layers = range(info.num_layers)
        hidden = [f"hidden_state_{i}" for i in range(info.num_layers + 1)] if hidden_states else []
        return cls(inputs, [f"attention_{i}" for i in layers], hidden)


def graph_inputs(batch: Batch, names: GraphNames) -> tuple[torch.Tensor, ...]:
    """The batch's tensors in the graph's input order."""
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
               "token_type_ids": batch.type_ids}
    return tuple(tensors[name].contiguous() for name in names.inputs)
