"""Service configuration: one file that `headscope serve` and `serve run` both read.

The file is a Ray Serve config (``applications:`` with ``import_path: service.app:build``);
headscope's own settings are that application's ``args`` and are validated here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from pipelines.config import BACKENDS

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: PositiveInt = 2
    target_ongoing_requests: PositiveFloat = 8


class OnnxSettings(Strict):
    """ONNX Runtime threads per replica (0: the runtime's default)."""

    intra_op_threads: NonNegativeInt = 0
    inter_op_threads: NonNegativeInt = 0


class ModelConfig(Strict):
    """One model deployment: which model, how it batches, what resources a replica gets."""

    name: str = "minilm"  # public name in the API and the store folder
    model: str = "minilm"  # registry name, local folder, or a folder from export-onnx
    #: One of pipelines.config.BACKENDS; auto: ONNX Runtime for an export folder, PyTorch
    #: otherwise.
    backend: str = "auto"
    onnx: OnnxSettings = OnnxSettings()
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_batch_size: PositiveInt = 32  # documents per forward batch
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    batch_tokens: PositiveInt = 8192
    num_replicas: PositiveInt = 1
    autoscaling: Autoscaling | None = None
    num_cpus: PositiveFloat = 1.0
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: PositiveInt = 64
    max_queued_requests: int = Field(256, ge=-1)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}: use {', '.join(BACKENDS)}")
        return value

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not _SAFE_NAME.fullmatch(value):
            raise ValueError("model name: letters, digits, '_', '.', '-' (at most 64)")
        return value


class Limits(Strict):
    """Per-request limits; a request over any of them gets HTTP 413."""

    max_inputs: PositiveInt = 64
    max_characters: PositiveInt = 200_000  # summed over all texts of a request
    max_tokens: PositiveInt = 32_768  # summed over all windows of a request
    #: Attention rows a request may produce (over all layers and heads): bounds the response
    #: of ``full`` and ``threshold`` modes, which grow with the square of the length.
    max_attention_rows: PositiveInt = 2_000_000
    #: Bytes of a request body, checked from Content-Length before reading, while reading,
    #: and again after gzip decompression.
    max_body_bytes: PositiveInt = 4 * 2**20


class IngressConfig(Strict):
    """The ingress admits ``max_ongoing_requests`` API requests at once and queues
    ``max_queued_requests`` more (-1: any number); others get a JSON 503 with Retry-After."""

    num_cpus: PositiveFloat = 0.25
    max_ongoing_requests: PositiveInt = 64
    max_queued_requests: int = Field(128, ge=-1)
    retry_after_s: PositiveFloat = 1.0
    #: Requests Serve passes on beyond those two so the ingress can refuse them as JSON
    #: (Serve's own max_ongoing_requests is the sum of the three; its queue holds as many).
    refusal_room: PositiveInt = 64


class ServiceConfig(Strict):
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()])
    limits: Limits = Field(default_factory=Limits)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    #: Where ``"store": true`` appends datasets (one folder per model).
    dataset_root: str = "service_data"
    #: Bearer token: read from this environment variable, or from ``auth_token_file``.
    auth_token_env: str = "HEADSCOPE_API_TOKEN"
    auth_token_file: str | None = None
    #: Modules the ingress and every model worker import at start-up, before serving: a
    #: module that calls ``pipelines.analysis.registry.register(...)`` adds an analysis that
    #: requests can name in ``analyses`` (it must be importable on every Ray node).
    plugins: list[str] = Field(default_factory=list)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        if not names or len(set(names)) != len(names):
            raise ValueError("models: at least one, with unique names")
        return models

    @model_validator(mode="after")
    def _queues_fit_a_request(self) -> ServiceConfig:
        """Every document of the largest request must fit in a worker's queue at once (the
        ingress sends them together)."""
        for model in self.models:
            room = model.max_queued_requests
            if room != -1 and room < self.limits.max_inputs:
                raise ValueError(
                    f"model {model.name}: max_queued_requests ({room}) must be at least "
                    f"limits.max_inputs ({self.limits.max_inputs})")
        return self

    @property
    def default_model(self) -> str:
        return self.models[0].name

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def auth_token(self) -> str | None:
        """The configured token, or None when auth is off."""
        token = os.environ.get(self.auth_token_env)
        if not token and self.auth_token_file:
            token = Path(self.auth_token_file).read_text().strip()
        return token or None


class HttpOptions(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000


def read_serve_file(path: str | Path) -> tuple[ServiceConfig, HttpOptions]:
    """headscope settings and HTTP options from a Serve config file."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    apps = data.get("applications") or []
    app = next((a for a in apps if str(a.get("import_path", "")).startswith("service.app")), None)
    if app is None:
        raise ValueError(f"{path}: no application with import_path service.app:build")
    return ServiceConfig.model_validate(app.get("args") or {}), \
        HttpOptions.model_validate(data.get("http_options") or {})
