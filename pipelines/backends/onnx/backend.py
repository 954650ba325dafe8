"""ONNX Runtime backend for folders written by ``headscope export-onnx``.

Outputs are bound (I/O binding) straight into one preallocated ``[L, B, H, S, S]`` torch
tensor on the backend's device, so the attentions are never copied after the run; inputs are
bound from the batch's own tensors.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import models
from pipelines.backends.base import (
    Capability,
    LayerSink,
    QueryKey,
    resolve_device,
    unsupported,
)
from pipelines.backends.batching import Batch
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.onnx.graph import FORMAT, ONNX_FAMILIES, GraphNames, graph_inputs
from pipelines.config import ConfigError, OnnxOptions
from pipelines.models import ModelError

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
#: Graph fusions left off: a separate Add and LayerNormalization ran faster on the CPU than
#: the fused SkipLayerNormalization kernel (benchmarks/backends.py).
SLOWER_FUSIONS = ["SkipLayerNormFusion"]


def _import_runtime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "the onnx backend needs ONNX Runtime: install the project's cpu extra "
            "(onnxruntime) or its gpu extra (onnxruntime-gpu), not both"
        ) from None
    return onnxruntime


@dataclass(frozen=True)
class ExportedModel:
    """A checked export folder: its metadata, graph path and graph names."""

    folder: Path
    metadata: dict
    names: GraphNames

    @property
    def graph(self) -> Path:
        return self.folder / self.metadata["graph"]["file"]


def export_metadata(name: str, folder: str, family: str) -> dict:
    """The metadata of the export in ``folder``, or an error saying how to make one (or, for
    a family ``headscope export-onnx`` does not cover, to use the torch backend)."""
    metadata = models.onnx_metadata(folder)
    if metadata is None and family not in ONNX_FAMILIES:
        raise ModelError(f"model {name!r} ({family}): the onnx backend runs exports of BERT- "
                         "and GPT-2-family models; use --backend torch")
    if metadata is None:
        raise ModelError(
            f"model {name!r} has no ONNX export in {folder}: run "
            f"`headscope export-onnx --model {name} --out DIR` and use DIR as the model"
        )
    return metadata


def open_export(info: models.ModelInfo, metadata: dict) -> ExportedModel:
    """Check that the export ``metadata`` describes at ``info.path`` is of this very model."""
    folder = Path(info.path)
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{folder}: export format {metadata.get('format')!r} is not {FORMAT}")
    source = metadata["source"]
    if (source["model_type"], source["config_hash"]) != (info.model_type, info.config_hash):
        raise ModelError(
            f"{folder}: the graph was exported from a {source['model_type']} model with config "
            f"{source['config_hash']}, but config.json describes a {info.model_type} model with "
            f"config {info.config_hash}; export this model again"
        )
    graph = metadata["graph"]
    names = GraphNames(graph["inputs"], graph["attention_outputs"],
                       graph["hidden_state_outputs"])
    expected = GraphNames.for_model(info, bool(names.hidden_states))
    if (names.inputs, names.attentions) != (expected.inputs, expected.attentions):
        raise ModelError(f"{folder}: graph names do not fit a {info.model_type} model with "
                         f"{info.num_layers} layers; export this model again")
    return ExportedModel(folder, metadata, names)


def _check_graph(session, export: ExportedModel, info: models.ModelInfo) -> None:
    """The graph itself must take the inputs and give the attentions the metadata promises."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    missing = [n for n in export.names.attentions if n not in outputs]
    if missing:
        raise ModelError(
            f"{export.graph} has no attention outputs {', '.join(missing)} (it has "
            f"{', '.join(outputs)}); export the model with `headscope export-onnx`"
        )
    if inputs != export.names.inputs:
        raise ModelError(f"{export.graph} takes inputs {inputs}, expected {export.names.inputs}")
    for name in export.names.attentions:
        shape = outputs[name]
        heads = shape[1] if len(shape) == 4 else None
        if len(shape) != 4 or (isinstance(heads, int) and heads != info.num_heads):
            raise ModelError(f"{export.graph}: output {name} has shape {shape}, expected "
                             f"[batch, {info.num_heads}, sequence, sequence]")


def _providers(ort, device: str) -> list:
    """CUDA then CPU where CUDA is asked for (or auto and present), else CPU only."""
    available = ort.get_available_providers()
    wants_cuda = device.startswith("cuda") or (device == "auto" and CUDA in available
                                               and torch.cuda.is_available())
    if not wants_cuda:
        return [CPU]
    if CUDA not in available:
        raise ConfigError(f"device {device!r}: this ONNX Runtime has no CUDA provider "
                          f"(it has {', '.join(available)}); install onnxruntime-gpu")
    index = int(device.partition(":")[2] or 0)
    return [(CUDA, {"device_id": index}), CPU]


class OnnxBackend:
    """An exported graph on ONNX Runtime: attention only, no extra :class:`Capability`."""

    name = "onnx"
    capabilities: frozenset[Capability] = frozenset()

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32",
                 options: OnnxOptions | None = None) -> None:
        ort = _import_runtime()
        if dtype != "float32":
            raise ConfigError(f"dtype {dtype}: the onnx backend runs the exported float32 graph")
        self.options = options or OnnxOptions()
        source, config, common = models.load_config(model)
        self._tokenizer = models.load_fast_tokenizer(model, source, common)
        metadata = export_metadata(model, source, models.family_of(config))
        self.info = models.describe(model, source, config, self._tokenizer,
                                    "token_type_ids" in metadata["graph"]["inputs"])
        self.export = open_export(self.info, metadata)
        self.session = self._session(ort, device)
        self.provider = self.session.get_providers()[0]
        self.device = torch.device("cuda", self._cuda_index()) if self.provider == CUDA \
            else torch.device("cpu")
        if device.startswith("cuda") and self.provider != CUDA:
            raise ConfigError(f"device {device!r}: ONNX Runtime gave {self.provider}, not CUDA")
        resolve_device(str(self.device), dtype)  # torch must reach the same device
        log.info("ONNX model %s on %s (%s)", model, self.provider, self.export.graph)

    def _session(self, ort, device: str):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: not its notes on unused initializers
        opts.intra_op_num_threads = self.options.intra_op_threads
        opts.inter_op_num_threads = self.options.inter_op_threads
        # Idle ONNX Runtime threads would otherwise spin after each run and take the cores
        # from the statistics that follow every forward pass.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _providers(ort, device)
        try:
            session = ort.InferenceSession(str(self.export.graph), opts, providers=providers,
                                           disabled_optimizers=SLOWER_FUSIONS)
        except Exception as exc:  # ORT raises its own untyped errors for bad graphs
            raise ModelError(f"{self.export.graph}: ONNX Runtime cannot load it "
                             f"({str(exc).splitlines()[0]})") from None
        _check_graph(session, self.export, self.info)
        return session

    def _cuda_index(self) -> int:
        options = self.session.get_provider_options().get(CUDA, {})
        return int(options.get("device_id", 0))

    @property
    def tokenizer(self):
        return self._tokenizer

    def attentions(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        size, length = batch.input_ids.shape
        info = self.info
        # attn: [L, B, H, S, S]; each layer's output is written in place by ONNX Runtime.
        attn = torch.empty((info.num_layers, size, info.num_heads, length, length),
                           dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        inputs = graph_inputs(batch, self.export.names)
        for name, tensor in zip(self.export.names.inputs, inputs, strict=True):
            binding.bind_input(name, kind, index, np.int64, list(tensor.shape),
                               tensor.data_ptr())
        for layer, name in enumerate(self.export.names.attentions):
            binding.bind_output(name, kind, index, np.float32, list(attn[layer].shape),
                                attn[layer].data_ptr())
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return attn.mul_(batch.valid[None, :, None, None, :])

    def layers(self, batch: Batch, sink: LayerSink, block_rows: int | None = None) -> None:
        """The graph returns every layer at once; they go to ``sink`` whole, one by one after
        it (``block_rows`` does not apply: the runtime has formed them already)."""
        for layer, probs in enumerate(self.attentions(batch)):
            sink(layer, 0, probs)

    def disabled_heads(self, mask: HeadMask) -> AbstractContextManager[None]:
        raise unsupported(self, Capability.HEAD_MASKING)

    def capture_queries_keys(self) -> AbstractContextManager[list[QueryKey]]:
        raise unsupported(self, Capability.QUERY_KEY_CAPTURE)

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        raise unsupported(self, Capability.HIDDEN_STATES)

    def describe(self) -> dict:
        import onnxruntime

        return {"backend": self.name, "device": str(self.device), "dtype": "float32",
                "provider": self.provider, "providers": self.session.get_providers(),
                "onnxruntime_version": onnxruntime.__version__,
                "intra_op_threads": self.options.intra_op_threads,
                "inter_op_threads": self.options.inter_op_threads,
                "graph": str(self.export.graph),
                "exported_from": self.export.metadata["source"]}
