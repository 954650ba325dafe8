"""FastAPI ingress and the Ray Serve application builder.

Routes: POST /v1/attention, POST /v1/view, GET /v1/models, GET /healthz, GET /readyz, and
OpenAPI at /docs.
The ingress validates and tokenises requests (so limits are checked before any model work),
sends each document to its model deployment, where documents from concurrent requests are
batched, and assembles tables with the same names and schema as a corpus job's Parquet files.
"""


import asyncio
import dataclasses
import datetime as dt
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import pyarrow as pa
import pyarrow.compute as pc
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.analysis import registry
from pipelines.analysis.batch import sort_tables, text_tables
from pipelines.backends.base import Capability
from pipelines.backends.head_mask import HeadMask
from pipelines.config import AttentionMode, ConfigError, WindowConfig
from pipelines.dataset import manifest as manifests
from pipelines.dataset import schema
from pipelines.dataset.tables import concat
from pipelines.dataset.writer import OutputError, append_parts
from pipelines.models import ModelInfo, load_tokenizer
from pipelines.text.tokenize import Window, Windower
from pipelines.version import __version__
from pipelines.views.data import build_payload
from pipelines.views.html import default_title, render_html
from service.config import ServiceConfig
from service.responses import (
    arrow_response,
    dense_attention,
    dense_cells,
    json_response,
    records,
)
from service.schemas import ARROW_STREAM, AttentionRequest, ModelDescription, ViewRequest
from service.wire import Gate, Reservation, WireError, read_body, retry_after
from service.worker import DocumentJob, ModelWorker

log = logging.getLogger(__name__)
OPEN_ROUTES = {"/healthz", "/readyz"}
#: The API docs hold no data: served without the token (the page's Authorize button sends it).
DOC_ROUTES = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def per_head_tables() -> set[str]:
    """Tables with layer and head columns, which the request's layers/heads filters apply to
    (core and registered; read per request, so plugins count)."""
    return {name for name, spec in registry.table_specs().items()
            if spec.per_head and spec.per_shard}


class ApiError(Exception):
    """An error with an HTTP status and a message that says what to fix."""

    def __init__(self, status: int, message: str, headers: dict | None = None,
                 details: list | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.details = details


def error_response(status: int, message: str, details: list | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body: dict = {"error": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ModelState:
    """What the ingress keeps per model: its worker handle, what the worker runs, tokenizer."""

    handle: DeploymentHandle
    info: ModelInfo
    runtime: dict
    tokenizer: object
    capabilities: frozenset[Capability]
    reservation: Reservation  # documents in flight to the deployment, admitted per request

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def refuse(self, request_field: str, capability: Capability) -> ApiError:
        backend = self.runtime.get("backend")
        return ApiError(422, f"{request_field} needs a backend with {capability.value}; this "
                             f"model runs on the {backend} backend, which cannot do that")


def _select(table: pa.Table, layers: list[int] | None, heads: list[int] | None) -> pa.Table:
    for name, wanted in (("layer", layers), ("head", heads)):
        if wanted is not None:
            table = table.filter(pc.is_in(table[name], pa.array(wanted, table[name].type)))
    return table


def _dense_axes(body: AttentionRequest, info: ModelInfo) -> tuple[list[int], list[int]]:
    """The layers and heads of the dense layout: the request's, or all of the model's."""
    layers = range(info.num_layers) if body.layers is None else body.layers
    heads = range(info.num_heads) if body.heads is None else body.heads
    return sorted(set(layers)), sorted(set(heads))


app = FastAPI(title="headscope", version=__version__,
              description="Attention statistics and weights for posted text. Tables have "
                          "the same names and columns as a corpus job's Parquet dataset.")
app.state.token = None
app.state.gate = None
app.state.max_body_bytes = None


def _path(request: Request) -> str:
    return request.scope["path"].removeprefix(request.scope.get("root_path", ""))


#: Declares the bearer scheme in OpenAPI (the docs page's Authorize button); the check itself
#: is the ``authenticate`` middleware, so this never refuses.
BEARER = [Depends(HTTPBearer(auto_error=False, description="needed when the service has a "
                             "token (auth_token_env or auth_token_file)"))]


@app.middleware("http")
async def admit(request: Request, call_next):
    """The ingress's own admission: API requests run, wait in a bounded queue, or get a JSON
    503 with Retry-After (Serve's own limits are set above this one)."""
    gate: Gate | None = request.app.state.gate
    if gate is None or not _path(request).startswith("/v1/"):
        return await call_next(request)
    try:
        async with gate.admit():
            return await call_next(request)
    except WireError as exc:
        return error_response(exc.status, exc.message, headers=exc.headers)


@app.middleware("http")
async def authenticate(request: Request, call_next):
    """With a token configured, every route but the health checks and the docs needs it."""
    token: str | None = request.app.state.token
    path = _path(request)
    if token is not None and path not in OPEN_ROUTES | DOC_ROUTES:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error_response(401, "missing or wrong bearer token: send "
                                  "'Authorization: Bearer <token>'",
                                  headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer in the same JSON shape as every error."""
    return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                          headers=getattr(exc, "headers", None))


@app.exception_handler(ApiError)
async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.details, exc.headers)


@app.exception_handler(WireError)
async def wire_error(request: Request, exc: WireError) -> JSONResponse:
    return error_response(exc.status, exc.message, headers=exc.headers)


@overload
async def parse_request(request: Request, model: type[AttentionRequest] = ...
                        ) -> AttentionRequest: ...


@overload
async def parse_request(request: Request, model: type[ViewRequest]) -> ViewRequest: ...


async def parse_request(request: Request,
                        model: type[AttentionRequest | ViewRequest] = AttentionRequest
                        ) -> AttentionRequest | ViewRequest:
    """Body → a request model: 413/415 for size and encoding, 400 for bytes/JSON problems,
    422 for invalid fields."""
    body = await read_body(request, request.app.state.max_body_bytes)
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8 text; send JSON encoded as UTF-8") \
            from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} "
                            f"column {exc.colno})") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply; send a flat JSON object") \
            from None
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object, e.g. "
                            f"{json.dumps(model.model_json_schema()['examples'][0])}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [{"field": ".".join(str(p) for p in e["loc"]) or "body",
                    "problem": e["msg"].removeprefix("Value error, ")}
                   for e in exc.errors(include_url=False, include_input=False)]
        summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        raise ApiError(422, f"invalid request: {summary}", details=details) from None


def attention_rows_bound(windows: list[Window], mode: AttentionMode, info: ModelInfo) -> int:
    """At most how many attention rows ``mode`` keeps for ``windows`` (all layers, heads)."""
    per_row_cap = {"none": 0, "topk": mode.k, "full": None,
                   "threshold": int(1 / mode.threshold) if mode.kind == "threshold" else 0}
    cap = per_row_cap[mode.kind]
    rows = 0
    for window in windows:
        n = window.n_tokens
        visible = range(1, n + 1) if info.causal else [n] * n  # keys each query may see
        rows += sum(k if cap is None else min(k, cap) for k in visible)
    return rows * info.num_layers * info.num_heads


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP front: validation, tokenisation, limits, fan-out to model workers, responses."""

    def __init__(self, config: ServiceConfig, workers: dict[str, DeploymentHandle]) -> None:
        registry.load_plugins(config.plugins)
        self.config = config
        self.workers = workers
        self.models: dict[str, ModelState] = {}
        self.windowers: dict[tuple, Windower] = {}
        self.lock = asyncio.Lock()
        app.state.token = config.auth_token()
        ingress = config.ingress
        app.state.gate = Gate(ingress.max_ongoing_requests, ingress.max_queued_requests,
                              ingress.retry_after_s)
        app.state.max_body_bytes = config.limits.max_body_bytes
        self.store_root = Path(config.dataset_root).resolve()

    async def _model(self, name: str | None) -> ModelState:
        name = name or self.config.default_model
        if name not in self.workers:
            raise ApiError(404, f"unknown model {name!r}; available: "
                                f"{', '.join(self.workers)} (GET /v1/models)")
        async with self.lock:
            if name not in self.models:
                handle = self.workers[name]
                description = await handle.describe.remote()
                runtime = description.pop("runtime")
                capabilities = frozenset(map(Capability, description.pop("capabilities")))
                info = ModelInfo.from_dict(description)
                tokenizer = await asyncio.to_thread(load_tokenizer, info.path)
                reservation = Reservation(self._capacity(name), self.config.ingress.retry_after_s)
                self.models[name] = ModelState(handle, info, runtime, tokenizer, capabilities,
                                               reservation)
        return self.models[name]

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            for name in self.workers:
                await asyncio.wait_for(self._model(name), timeout=30)
        except Exception as exc:  # not ready yet: a worker is starting or failing
            return error_response(503, f"not ready: {exc}", headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready", "models": list(self.workers)})

    @app.get("/v1/models", response_model=list[ModelDescription], dependencies=BEARER)
    async def list_models(self) -> list[ModelDescription]:
        out = []
        for name in self.workers:
            state = await self._model(name)
            info = state.info
            configured = self.config.model(name)
            assert configured is not None  # the workers are the configured models
            out.append(ModelDescription(
                name=name, model=configured.model, family=info.family,
                model_type=info.model_type, num_layers=info.num_layers,
                num_heads=info.num_heads, max_length=info.max_length,
                config_hash=info.config_hash, runtime=state.runtime, causal=info.causal,
                num_kv_heads=info.key_value_heads,
                layer_windows=info.windows_by_layer()))
        return out

    @app.post("/v1/attention", dependencies=BEARER,
              openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": AttentionRequest.model_json_schema()}}}})
    async def attention(self, request: Request) -> Response:
        """Statistics and weights for the posted texts (JSON, or Arrow IPC via Accept)."""
        body = await parse_request(request)
        state = await self._model(body.model)
        self._check_ranges(body, state.info)
        self._check_disabled(body, state)
        windows = self._windows(body, state)
        analyses = registry.check_analyses(body.analyses)
        jobs = [DocumentJob(doc_windows, body.attention, body.local_window, analyses,
                            body.disable_heads, entropy_epsilon=body.entropy_epsilon,
                            word_rows=body.word_rows) for doc_windows in windows]
        flat = [w for doc_windows in windows for w in doc_windows]
        self._check_dense(body, state.info, flat)
        results = await self._analyse(state, jobs)
        text = text_tables(flat, analyses)
        # documents and tokens, the model's tables, then the analyses' text tables (as before)
        tables = sort_tables({**{name: text[name] for name in ("documents", "tokens")},
                                     **concat(results),
                                     **{n: t for n, t in text.items()
                                        if n not in ("documents", "tokens")}})
        if body.store:
            self._store(body, state, tables)
        for name in per_head_tables() & tables.keys():
            tables[name] = _select(tables[name], body.layers, body.heads)
        if not body.statistics:
            tables["head_stats"] = schema.HEAD_STATS.empty_table()
        if ARROW_STREAM in request.headers.get("accept", ""):
            if body.table not in tables:
                raise ApiError(422, f"table {body.table!r} needs analyses "
                                    f"[{registry.table_owner(body.table)!r}] in the request")
            return arrow_response(tables[body.table], body.table)
        payload = {"model": body.model or self.config.default_model,
                   "attention_mode": body.attention,
                   **{name: self._attention_json(body, state.info, t, flat)
                      if name == "attention" else records(t) for name, t in tables.items()}}
        return json_response(payload)

    @app.post("/v1/view", response_class=HTMLResponse, dependencies=BEARER,
              openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {
            "schema": ViewRequest.model_json_schema()}}}})
    async def view(self, request: Request) -> HTMLResponse:
        """A self-contained HTML page with the head, model and neuron views of one text."""
        body = await parse_request(request, ViewRequest)
        state = await self._model(body.model)
        can_capture = state.can(Capability.QUERY_KEY_CAPTURE)
        if body.qk and not can_capture:
            raise state.refuse("qk (the neuron view's vectors)", Capability.QUERY_KEY_CAPTURE)
        as_attention = body.attention_request()
        self._check_ranges(as_attention, state.info)
        windows = self._windows(as_attention, state)[0]
        job = DocumentJob(windows, body.attention, local_window=2,
                          capture_qk=can_capture if body.qk is None else body.qk)
        (tables,) = await self._analyse(state, [job])
        text = text_tables(windows, ())
        model = {**dataclasses.asdict(state.info), "name": body.model or self.config.default_model}
        payload = build_payload(model, body.attention, body.id,
                                text["documents"].to_pylist(), text["tokens"],
                                tables["attention"], tables.get("qk"))
        return HTMLResponse(render_html(payload, default_title(payload)))

    def _capacity(self, name: str) -> int | None:
        """Documents model ``name``'s deployment takes at once from this ingress: its queue
        (Serve counts every document there until a replica takes it, and refuses the
        surplus of a burst); None when the queue is unbounded."""
        model = self.config.model(name)
        assert model is not None  # the workers are the configured models
        return None if model.max_queued_requests == -1 else model.max_queued_requests

    def _attention_json(self, body: AttentionRequest, info: ModelInfo, table: pa.Table,
                        windows: list[Window]) -> list[dict]:
        """The attention table in the request's layout (rows, or dense per window)."""
        if body.layout == "rows":
            return records(table)
        return dense_attention(table, windows, *_dense_axes(body, info))

    def _check_dense(self, body: AttentionRequest, info: ModelInfo,
                     windows: list[Window]) -> None:
        """413 when the dense layout would send more weights than ``max_attention_rows``."""
        if body.layout != "dense":
            return
        layers, heads = _dense_axes(body, info)
        cells, limit = dense_cells(windows, len(layers), len(heads)), \
            self.config.limits.max_attention_rows
        if cells > limit:
            raise ApiError(413, f"the dense layout would send {cells:,} weights; at most "
                                f"{limit:,} per request: use layout 'rows', fewer layers or "
                                "heads, or shorter texts")

    async def _analyse(self, state: ModelState, jobs: list[DocumentJob]) -> list[dict]:
        """Each job's tables from the model deployment: all jobs are admitted together or the
        request gets a 503 before any is sent."""
        with state.reservation.hold(len(jobs)):
            try:
                return await asyncio.gather(*(state.handle.analyse.remote(job) for job in jobs))
            except BackPressureError:  # another caller filled the queue (e.g. a 2nd ingress)
                raise ApiError(503, "the model is overloaded; retry shortly",
                               retry_after(self.config.ingress.retry_after_s)) from None

    def _check_disabled(self, body: AttentionRequest, state: ModelState) -> None:
        if body.disable_heads is None:
            return
        if not state.can(Capability.HEAD_MASKING):
            raise state.refuse("disable_heads", Capability.HEAD_MASKING)
        try:
            HeadMask.parse(body.disable_heads, state.info.num_layers, state.info.num_heads)
        except ConfigError as exc:
            raise ApiError(422, f"disable_heads: {exc}") from None

    def _check_ranges(self, body: AttentionRequest, info: ModelInfo) -> None:
        for name, values, limit in (("layers", body.layers, info.num_layers),
                                    ("heads", body.heads, info.num_heads)):
            bad = [v for v in values or [] if not 0 <= v < limit]
            if bad:
                raise ApiError(422, f"{name} {bad} out of range: this model has {limit} "
                                    f"{name} (0..{limit - 1})")
        limits = self.config.limits
        items = body.items()
        if len(items) > limits.max_inputs:
            raise ApiError(413, f"{len(items)} inputs; at most {limits.max_inputs} per request")
        chars = sum(len(i.text) + len(i.text_pair or "") for i in items)
        if chars > limits.max_characters:
            raise ApiError(413, f"{chars} characters; at most {limits.max_characters} per "
                                "request: split the texts over several requests")

    def _windower(self, state: ModelState, config: WindowConfig) -> Windower:
        """One Windower per model and window setting (building one copies the tokenizer)."""
        key = (state.info.name, config)
        if key not in self.windowers:
            if len(self.windowers) >= 64:
                self.windowers.clear()
            self.windowers[key] = Windower(state.tokenizer, state.info, config)
        return self.windowers[key]

    def _windows(self, body: AttentionRequest, state: ModelState) -> list[list[Window]]:
        try:
            windower = self._windower(state, WindowConfig(body.max_length, body.stride,
                                                          body.truncate, body.punctuation))
        except ConfigError as exc:
            raise ApiError(422, str(exc)) from None
        windows = []
        for index, doc in enumerate(body.documents(uuid.uuid4().hex[:12])):
            try:
                windows.append(windower.windows(doc))
            except ConfigError as exc:  # this document cannot be windowed: say which one
                where = body.location(index)
                raise ApiError(422, f"{where}: {exc}",
                               details=[{"field": where, "problem": str(exc)}]) from None
        limits = self.config.limits
        flat = [w for doc_windows in windows for w in doc_windows]
        tokens = sum(w.n_tokens for w in flat)
        if tokens > limits.max_tokens:
            raise ApiError(413, f"{tokens} tokens; at most {limits.max_tokens} per "
                                "request: split the texts over several requests")
        rows = attention_rows_bound(flat, AttentionMode.parse(body.attention), state.info)
        if rows > limits.max_attention_rows:
            raise ApiError(413, f"attention mode {body.attention} would return up to {rows:,} "
                                f"rows; at most {limits.max_attention_rows:,} per request: use "
                                "topk:K or a higher threshold, or fewer or shorter texts")
        return windows

    def _store(self, body: AttentionRequest, state: ModelState,
               tables: dict[str, pa.Table]) -> None:
        """Append to <dataset_root>/<model name>/ — a folder no client can choose."""
        root = self.store_root / (body.model or self.config.default_model)
        manifest = {
            **manifests.header(manifests.DATASET_FORMAT, status=None, stats_version=True),
            "model": manifests.model_entry(state.info, fields=None),
            "runtime": state.runtime,
            # requests choose local_window; store takes only the default conventions (schemas)
            "statistics": manifests.statistics_entry(body.punctuation, body.entropy_epsilon),
            "input": {"source": "http"},
        }
        part = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        try:
            append_parts(root, part, tables, manifest, {
                name: spec.row_group_rows for name, spec in registry.table_specs().items()})
        except OutputError as exc:  # a folder of an older format: refuse to mix schemas
            raise ApiError(409, f"store: {exc}") from None


def build(args: dict) -> serve.Application:
    """Serve application builder (``import_path: service.app:build``)."""
    config = ServiceConfig.model_validate(args or {})
    registry.load_plugins(config.plugins)  # fail at build time on a plugin that cannot load
    workers = {}
    for model in config.models:
        options = {
            "name": f"model-{model.name}",
            "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
            "max_ongoing_requests": model.max_ongoing_requests,
            "max_queued_requests": model.max_queued_requests,
        }
        if model.autoscaling is not None:
            options["autoscaling_config"] = model.autoscaling.model_dump()
        else:
            options["num_replicas"] = model.num_replicas
        # @serve.deployment makes the class a Deployment; its stub keeps the class type
        workers[model.name] = ModelWorker.options(  # type: ignore[attr-defined]
            **options).bind(model, config.plugins)
    ingress = config.ingress
    # Serve's limits sit above the ingress's own Gate, so that its refusals are JSON
    serve_ongoing = ingress.max_ongoing_requests + max(ingress.max_queued_requests, 0) \
        + ingress.refusal_room
    return Ingress.options(  # type: ignore[attr-defined]  # a Deployment, as above
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_ongoing_requests=serve_ongoing,
        max_queued_requests=-1 if ingress.max_queued_requests == -1 else ingress.refusal_room,
        backpressure_config={"status_code": 503, "retry_after_s": ingress.retry_after_s},
    ).bind(config, workers)
