"""GGUF files (llama.cpp's single-file format): what headscope records about one, and the
check that transformers can load its architecture.

transformers reads a GGUF file itself (``from_pretrained(folder, gguf_file=name)``) and
dequantises its tensors to float32; headscope adds the facts a dataset needs to say which
weights made it: the file, its SHA-256 and its quantisation type.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".gguf"
#: Keys of transformers' GGUF table that name metadata sections, not architectures.
_NOT_ARCHITECTURES = frozenset({"general", "tokenizer"})
_CHUNK = 1 << 22


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or whose architecture transformers cannot load."""


@dataclass(frozen=True)
class GGUFFacts:
    """One GGUF file, as a manifest records it.

    ``quantization`` is the file type llama.cpp wrote (``general.file_type``, e.g. ``Q4_1``:
    most tensors 4-bit with a scale and minimum per block of 32); ``tensor_types`` counts the
    tensors of each storage type (norms stay F32).
    """

    file: str
    sha256: str
    size_bytes: int
    architecture: str
    quantization: str
    tensor_types: dict[str, int]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader, key: str):  # noqa: ANN202 (the field's own type: str, int, list...)
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_facts(path: Path) -> GGUFFacts:
    """The facts of ``path``; raises GGUFError when it is not a GGUF file or transformers
    does not support its architecture (the message names both)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise GGUFError(f"{path} is not a readable GGUF file ({exc})") from None
    architecture = str(_field(reader, "general.architecture"))
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES)
    if architecture not in readable:
        raise GGUFError(
            f"{path}: GGUF architecture {architecture!r} cannot be loaded by transformers "
            f"(it reads {', '.join(readable)}); convert the model to a transformers folder "
            "(config.json, weights, tokenizer) instead")
    file_type = _field(reader, "general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") \
            if file_type is not None else "unknown"
    except ValueError:
        quantization = f"file_type {file_type}"
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return GGUFFacts(file=str(path), sha256=sha256(path), size_bytes=path.stat().st_size,
                     architecture=architecture, quantization=quantization,
                     tensor_types=dict(sorted(types.items())))


def find_in_folder(folder: Path) -> Path | None:
    """The one GGUF file of a folder without config.json (None when it holds none); a folder
    with several is ambiguous (GGUFError)."""
    files = sorted(folder.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        raise GGUFError(f"model folder {folder} holds {len(files)} GGUF files "
                        f"({', '.join(f.name for f in files[:4])}); name one of them")
    return files[0] if files else None
