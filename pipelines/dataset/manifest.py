"""The one manifest builder: every folder headscope writes says how it was made.

A manifest opens with the same header (format, tool version, creation time, status), describes
its model the same way, and hashes what must match for ``--resume`` with :func:`job_key`.
Writers: corpus jobs (local and Ray), the service's ``store``, ``ablate``, ``compare``,
``factors train`` and ``factors apply``, and ``export-onnx``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Sequence

from pipelines.compute.stats import DEFINITIONS, K90_MASS, clark_relation
from pipelines.dataset.formats import (  # noqa: F401  (the writers import them from here)
    ABLATION_FORMAT,
    COMPARE_FORMAT,
    DATASET_FORMAT,
    FACTOR_CODES_FORMAT,
    FACTORS_FORMAT,
    UNSIGNED_FORMATS,
)
from pipelines.models import ModelInfo
from pipelines.text import punctuation as punctuation_rules
from pipelines.version import STATS_VERSION, __version__

#: The model fields a corpus dataset records: ``num_kv_heads`` (grouped-query attention:
#: query head h reads key/value head h // (num_heads / num_kv_heads)), ``layer_windows`` (each
#: layer's sliding window, null for full attention) and ``gguf`` (the GGUF file the weights
#: came from: path, sha256, quantisation; null for other weights).
DATASET_MODEL_FIELDS = ("name", "path", "family", "model_type", "config_hash", "num_layers",
                        "num_heads", "max_length", "causal", "num_kv_heads", "layer_windows",
                        "gguf")


def created_now() -> str:
    """UTC time in ISO 8601 to the second, as every manifest records it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def header(format: str, status: str | None = "running", stats_version: bool = False) -> dict:
    """The opening fields of every manifest, in their usual order.

    ``stats_version`` adds the version of the statistic definitions (datasets that hold
    head statistics); ``status`` None leaves the status to the writer (the service's store).
    """
    head: dict = {"format": format, "tool_version": __version__}
    if stats_version:
        head["stats_version"] = STATS_VERSION
    head["created"] = created_now()
    if status is not None:
        head["status"] = status
    return head


def model_entry(info: ModelInfo, fields: Sequence[str] | None = DATASET_MODEL_FIELDS,
                **extra: object) -> dict:
    """``info``'s ``fields`` (None: all of them) and any ``extra`` facts, for the manifest."""
    names = fields if fields is not None else info.__dataclass_fields__
    return {**{name: _model_value(info, name) for name in names}, **extra}


def _model_value(info: ModelInfo, name: str) -> object:
    """One ModelInfo field as JSON: every layer's window, the GGUF facts as an object."""
    if name == "layer_windows":
        return info.windows_by_layer()
    if name == "num_kv_heads":
        return info.key_value_heads
    if name == "gguf":
        return dataclasses.asdict(info.gguf) if info.gguf is not None else None
    return getattr(info, name)


def statistics_entry(punctuation: str, entropy_epsilon: float,
                     local_window: int | None = None) -> dict:
    """The manifest's ``statistics``: every definition, the constants and options they use,
    and how each statistic relates to Clark et al.'s (2019) code under those options.

    ``local_window`` None leaves it out (the service's store, where requests choose it).
    """
    entry: dict = {"definitions": DEFINITIONS, "k90_mass": K90_MASS}
    if local_window is not None:
        entry["local_window"] = local_window
    entry.update({
        "entropy_unit": "nats", "entropy_epsilon": entropy_epsilon,
        "punctuation": {"rule": punctuation,
                        "definition": punctuation_rules.definition(punctuation)},
        "clark_et_al_2019": clark_relation(punctuation, entropy_epsilon),
    })
    return entry


def job_key(keyed: object) -> str:
    """A 16-hex-digit fingerprint of what must match for ``--resume`` (JSON, keys sorted)."""
    text = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
