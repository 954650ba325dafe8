"""Export a model to ONNX with every layer's attention probabilities as graph outputs.

The export folder holds the graph (``model.onnx`` and its weights ``model.onnx.data``), the
config and tokenizer of the source model, and ``headscope_onnx.json``: source model and hash,
opset, exporter, input and output names, and the verification that was run. The export checks
itself before the folder appears: ONNX Runtime and PyTorch run the same padded batches (and a
full-length window), and a graph whose attentions differ by more than the tolerance is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipelines import models
from pipelines.backends.batching import Batch, collate
from pipelines.backends.onnx.graph import (
    FORMAT,
    GRAPH_FILE,
    ONNX_FAMILIES,
    WEIGHTS_FILE,
    GraphNames,
    graph_inputs,
)
from pipelines.config import WindowConfig
from pipelines.dataset.manifest import header
from pipelines.dataset.writer import UMASK, atomic_write_json
from pipelines.models import DEFAULT_OPSET, ExportError
from pipelines.text.tokenize import Document, Windower

log = logging.getLogger(__name__)

TOLERANCE = 1e-4

_SAMPLES = [
    "The cat sat on the mat because it was warm.",
    "Attention heads often look at the previous token, at punctuation, or at separators.",
    "Short.",
    "In 1905, Einstein published four papers; each one changed physics in its own way.",
]
_PAIR = ("Where did the cat sit?", "It sat on the mat.")


class _AttentionGraph(torch.nn.Module):
    """The model as a function of token tensors to a flat tuple of named outputs."""

    def __init__(self, model: torch.nn.Module, names: GraphNames) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.names.inputs, inputs, strict=True))
        out = self.model(**kwargs, output_attentions=True,
                         output_hidden_states=bool(self.names.hidden_states))
        return (*out.attentions, *(out.hidden_states if self.names.hidden_states else ()))


def sample_batches(tokenizer, info: models.ModelInfo) -> list[Batch]:
    """Padded batches of several sizes, a sentence pair, and one window of the full length."""
    windower = Windower(tokenizer, info, WindowConfig(truncate=True))
    docs = [Document(doc_id=str(i), text=t) for i, t in enumerate(_SAMPLES)]
    if not info.causal:
        docs.append(Document(doc_id="pair", text=_PAIR[0], text_pair=_PAIR[1]))
    windows = [w for doc in docs for w in windower.windows(doc)]
    long_text = " ".join(_SAMPLES * (4 * info.max_length // 40 + 1))
    full = windower.windows(Document(doc_id="long", text=long_text))
    pad = info.pad_token_id
    return [collate(windows, pad), collate(windows[1:3], pad), collate(windows[:1], pad),
            collate(full + windows[:2], pad)]


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, independent of the file format it came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's per-pass INFO logs and its warnings about axis names."""
    quiet = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING,
             "torch.onnx": logging.ERROR}  # torch.onnx warns that torchvision is missing
    loggers = [logging.getLogger(name) for name in quiet]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(axis name|LeafSpec)", category=Warning)
        for logger, level in zip(loggers, quiet.values(), strict=True):
            logger.setLevel(level)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _export(module: _AttentionGraph, example: tuple[torch.Tensor, ...], path: Path,
            opset: int) -> dict[str, int]:
    """torch.export-based ONNX export, then GELU fusions for ONNX Runtime; returns their counts.

    Only the GELU fusions are applied: ``onnxscript``'s full ``optimize_for_ort`` also fuses
    residual adds into SkipLayerNormalization, whose CPU kernel made the forward pass slower
    here (benchmarks/backends.py; the backend turns ONNX Runtime's own fusion of it off too).
    """
    import onnx_ir
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu

    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    shapes = {"inputs": tuple({0: batch, 1: sequence} for _ in example)}
    with _quiet_exporter():
        program = torch.onnx.export(
            module, example, input_names=module.names.inputs,
            output_names=module.names.attentions + module.names.hidden_states,
            dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False)
        assert program is not None  # the dynamo exporter returns its ONNXProgram
        graph = program.model
        counts = {"erf_gelu": fuse_erfgelu(graph), "bias_gelu": fuse_bias_gelu(graph)}
    onnx_ir.save(graph, path, external_data=WEIGHTS_FILE)
    return counts


def verify(graph: Path, module: _AttentionGraph, batches: list[Batch]) -> dict:
    """Run ONNX Runtime and PyTorch on ``batches``; the largest attention difference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = module.names
    worst = 0.0
    for batch in batches:
        inputs = graph_inputs(batch, names)
        got = session.run(names.attentions, dict(zip(names.inputs, (t.numpy() for t in inputs),
                                                     strict=True)))
        with torch.inference_mode():
            want = module(*inputs)[: len(names.attentions)]
        valid = batch.valid.numpy()[None, :, None, None, :]  # pad keys are masked anyway
        for g, w in zip(got, want, strict=True):
            worst = max(worst, float(np.abs((g - w.numpy()) * valid).max()))
    return {"runtime": f"onnxruntime {ort.__version__}", "provider": session.get_providers()[0],
            "batches": [list(b.input_ids.shape) for b in batches],
            "max_abs_diff_attention": worst, "tolerance": TOLERANCE}


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose a new folder or --overwrite")
    if models.onnx_metadata(out) is None:
        raise ExportError(f"{out} is not an ONNX export of headscope; refusing to replace it")


def export_onnx(model: str, out: str | Path, hidden_states: bool = False,
                opset: int = DEFAULT_OPSET, overwrite: bool = False,
                allow_download: bool = False) -> dict:
    """Export ``model`` to ``out`` and return the metadata written beside the graph."""
    out = Path(out)
    _check_out(out, overwrite)
    loaded = models.load(model, torch.device("cpu"), torch.float32, allow_download)
    info, tokenizer = loaded.info, loaded.tokenizer
    if info.family not in ONNX_FAMILIES:
        raise ExportError(f"model {model!r} ({info.model_type}): ONNX export covers the "
                          f"BERT and GPT-2 families; run {info.model_type} models with the "
                          "torch backend")
    names = GraphNames.for_model(info, hidden_states)
    module = _AttentionGraph(loaded.model, names).eval()
    batches = sample_batches(tokenizer, info)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log.info("exporting %s (%d layers) to ONNX opset %d", info.name, info.num_layers, opset)
        fusions = _export(module, graph_inputs(batches[0], names), staging / GRAPH_FILE, opset)
        check = verify(staging / GRAPH_FILE, module, batches)
        worst = check["max_abs_diff_attention"]
        if worst > TOLERANCE:
            raise ExportError(
                f"ONNX Runtime and PyTorch attentions differ by {worst:.2e} (> {TOLERANCE:g}) on "
                "padded sample batches; nothing was written"
            )
        loaded.model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        metadata = _metadata(info, loaded.model, names, opset, fusions, check)
        atomic_write_json(staging / models.ONNX_METADATA, metadata)
        staging.chmod(0o777 & ~UMASK)  # mkdtemp makes a private folder
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (attention max |ORT - torch| = %.1e)", out,
             check["max_abs_diff_attention"])
    return metadata


def _metadata(info: models.ModelInfo, model: torch.nn.Module, names: GraphNames, opset: int,
              fusions: dict[str, int], check: dict) -> dict:
    import onnx
    import onnxscript

    return {
        **header(FORMAT, status=None),
        "source": {"model": info.name, "path": info.path, "model_type": info.model_type,
                   "config_hash": info.config_hash, "state_dict_sha256": state_dict_sha256(model)},
        "graph": {"file": GRAPH_FILE, "weights_file": WEIGHTS_FILE, "opset": opset,
                  "inputs": names.inputs, "attention_outputs": names.attentions,
                  "hidden_state_outputs": names.hidden_states,
                  "dynamic_axes": {"batch": "dim 0 of every input and output",
                                   "sequence": "dim 1 of inputs; dims 2, 3 of attentions"},
                  "num_layers": info.num_layers, "num_heads": info.num_heads},
        "exporter": {"name": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                     "ort_fusions": fusions},
        "verification": check,
    }
