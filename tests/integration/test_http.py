"""The HTTP service on a real local Ray Serve, over real HTTP.

One Ray and one Serve instance for the whole module, with three applications built by
``service.app.build``:

- ``open`` at ``/``: no auth, the engine comparisons, errors, batching and ``store``;
- ``secure`` at ``/secure``: a bearer token from ``auth_token_file``, and a public model name
  ("mini") that differs from the model it loads ("minilm");
- ``overload`` at ``/overload``: tiny queues on the ingress and on the model worker.

Every application writes its datasets under its own temporary ``dataset_root``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import requests
from compare_tables import assert_attention_equal, assert_same_tables
from conftest import SAMPLE_TEXTS, free_port, wait_until_ready
from tolerances import ATTENTION_ATOL, FLOAT16_ATOL

from pipelines.analysis import registry
from pipelines.analysis.batch import analyse_windows, sort_tables
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset import schema
from pipelines.dataset.reader import Dataset
from pipelines.jobs.local import run_job
from pipelines.text.tokenize import Document, Windower
from pipelines.views import view_data
from pipelines.views.data import unb64
from service.schemas import ARROW_STREAM

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-test-token"
#: An environment variable nobody sets, so only ``auth_token_file`` can switch auth on.
UNSET_TOKEN_ENV = "HEADSCOPE_TEST_TOKEN_THAT_IS_NEVER_SET"
PREFIXES = {"open": "", "secure": "/secure", "overload": "/overload", "onnx": "/onnx",
            "decoder": "/decoder"}
SECURE_MODEL = "mini"
LIMITS = {"max_inputs": 8, "max_characters": 5000, "max_tokens": 2000}
WORKER = {"max_batch_size": 16, "batch_wait_timeout_s": 0.1, "num_cpus": 0.5}
RETRY_AFTER_S = 1.5
SCHEMAS = {"documents": schema.DOCUMENTS, "tokens": schema.TOKENS,
           "head_stats": schema.HEAD_STATS, "attention": schema.attention_schema(False)}
LONG_TEXT = " ".join(SAMPLE_TEXTS) * 2  # several windows at max_length 48


@dataclass
class Service:
    url: str
    base: Path  # holds every dataset_root and the token file
    roots: dict[str, Path]

    def address(self, app: str, path: str) -> str:
        return f"{self.url}{PREFIXES[app]}{path}"

    def post(self, payload: object = None, app: str = "open", data: bytes | None = None,
             headers: dict | None = None, token: str | None = None) -> requests.Response:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if data is not None:
            return requests.post(self.address(app, "/v1/attention"), data=data,
                                 headers={"Content-Type": "application/json", **headers},
                                 timeout=120)
        return requests.post(self.address(app, "/v1/attention"), json=payload,
                             headers=headers, timeout=120)

    def get(self, path: str, app: str = "open", token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return requests.get(self.address(app, path), headers=headers, timeout=60)

    def wait_ready(self, app: str) -> None:
        wait_until_ready(self.address(app, ""))


def app_configs(base: Path, token_file: Path, onnx_dir: Path,
                gemma_dir: Path) -> dict[str, dict]:
    common = {"auth_token_env": UNSET_TOKEN_ENV, "limits": LIMITS}
    return {
        # a Gemma-3 decoder: grouped-query attention, sliding-window layers, a BOS token
        "decoder": {**common, "dataset_root": str(base / "data-decoder"),
                    "models": [{"name": "gemma", "model": str(gemma_dir), **WORKER}]},
        "onnx": {**common, "dataset_root": str(base / "data-onnx"),
                 "models": [{"name": "minilm", "model": str(onnx_dir), **WORKER,
                             "onnx": {"intra_op_threads": 1}}]},
        "open": {**common, "dataset_root": str(base / "data-open"),
                 "models": [{"name": "minilm", **WORKER}]},
        "secure": {**common, "dataset_root": str(base / "data-secure"),
                   "auth_token_file": str(token_file),
                   "models": [{"name": SECURE_MODEL, "model": "minilm", **WORKER}]},
        "overload": {**common, "dataset_root": str(base / "data-overload"),
                     "limits": {**LIMITS, "max_inputs": 2},  # fits the tiny worker queue
                     "models": [{"name": "minilm", "max_batch_size": 1, "num_cpus": 0.25,
                                 "batch_wait_timeout_s": 0, "max_ongoing_requests": 1,
                                 "max_queued_requests": 2}],
                     "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 2,
                                 "max_queued_requests": 2, "retry_after_s": RETRY_AFTER_S}},
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, minilm_onnx_dir: Path,
            gemma_dir: Path) -> Iterator[Service]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop(UNSET_TOKEN_ENV, None)
    import ray
    from ray import serve

    from service.app import build

    base = tmp_path_factory.mktemp("service")
    token_file = base / "token"
    token_file.write_text(f"{TOKEN}\n")
    configs = app_configs(base, token_file, minilm_onnx_dir, gemma_dir)
    # address="local": always a new cluster of our own, never someone else's.
    # Four logical CPUs on two cores: five apps reserve 3.25 of them, and most replicas idle.
    ray.init(address="local", num_cpus=4, object_store_memory=200 * 2**20,
             include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # All three deploy at once (serve.run would deploy them one after another).
        serve.run_many([serve.RunTarget(build(configs[name]), name=name,
                                        route_prefix=PREFIXES[name] or "/")
                        for name in PREFIXES])
        roots = {name: Path(config["dataset_root"]) for name, config in configs.items()}
        found = Service(f"http://127.0.0.1:{port}", base, roots)
        for name in PREFIXES:
            found.wait_ready(name)
        yield found
    finally:
        serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------------------ helpers


def local_tables(backend: TorchBackend, docs: list[Document], mode: str = "topk:8",
                 local_window: int = 2, windows: WindowConfig | None = None) -> dict:
    """What the engine gives for ``docs``, in the service's sort order."""
    windower = Windower(backend.tokenizer, backend.info, windows or WindowConfig())
    flat = [w for doc in docs for w in windower.windows(doc)]
    config = RunConfig(attention=AttentionMode.parse(mode), local_window=local_window)
    return sort_tables(analyse_windows(backend, flat, config))


def json_tables(body: dict) -> dict[str, pa.Table]:
    """The JSON response's tables as Arrow tables with the dataset schemas."""
    return {name: pa.Table.from_pylist(body[name], schema=SCHEMAS[name]) for name in SCHEMAS}


def http_docs(body: dict, items: list[dict]) -> list[Document]:
    """The documents the service made of ``items``, under the doc_ids it chose."""
    ids = {row["source_line"]: row["doc_id"] for row in body["documents"]}
    return [Document(ids[i], item["text"], item.get("text_pair"), source="http", source_line=i)
            for i, item in enumerate(items)]


def arrow(service: Service, payload: dict, table: str, app: str = "open",
          token: str | None = None) -> pa.Table:
    response = service.post({**payload, "table": table}, app=app, token=token,
                            headers={"Accept": ARROW_STREAM})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(ARROW_STREAM)
    assert response.headers["x-headscope-table"] == table
    return pa.ipc.open_stream(response.content).read_all()


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def concurrently(count: int, call) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


# --------------------------------------------------------------------- engine equality


def test_texts_equal_the_engine(service: Service, minilm: TorchBackend) -> None:
    """Several texts, one of them cut into windows, against the engine on each document."""
    texts = [*SAMPLE_TEXTS, LONG_TEXT]
    options = {"attention": "topk:4", "max_length": 48, "stride": 8, "local_window": 3}
    body = ok(service.post({"texts": texts, **options}))
    assert body["model"] == "minilm" and body["attention_mode"] == "topk:4"
    assert set(body) == {"model", "attention_mode", *SCHEMAS}
    docs = http_docs(body, [{"text": t} for t in texts])
    prefixes = {doc.doc_id.rsplit(":", 1)[0] for doc in docs}
    assert len(prefixes) == 1 and prefixes.pop().startswith("request-")
    assert [doc.doc_id.rsplit(":", 1)[1] for doc in docs] == [str(i) for i in range(len(texts))]
    want = local_tables(minilm, docs, "topk:4", local_window=3,
                        windows=WindowConfig(max_length=48, stride=8))
    assert max(row["n_windows"] for row in body["documents"]) > 2
    assert_same_tables(json_tables(body), want, "topk:4")


def test_a_decoder_with_sliding_windows_equals_the_engine(service: Service,
                                                          gemma_dir: Path) -> None:
    """A Gemma-3 decoder served over HTTP gives the engine's tables, its own token text
    (the BOS it adds included) and its model description (windows, key/value heads)."""
    texts = [*SAMPLE_TEXTS, LONG_TEXT]
    body = ok(service.post({"texts": texts, "attention": "topk:4"}, app="decoder"))
    assert body["model"] == "gemma"
    docs = http_docs(body, [{"text": t} for t in texts])
    want = local_tables(TorchBackend(str(gemma_dir), device="cpu"), docs, "topk:4")
    assert_same_tables(json_tables(body), want, "topk:4")
    first = [row for row in body["tokens"] if row["doc_id"] == docs[0].doc_id]
    assert [row["token"] for row in first[:3]] == ["<s>", "▁The", "▁cat"]
    assert [row["surface"] for row in first[:3]] == ["<s>", "The", " cat"]
    [model] = ok(service.get("/v1/models", app="decoder"))
    assert (model["layer_windows"], model["num_kv_heads"]) == ([4, None, 4], 1)


def test_inputs_with_ids_and_a_text_pair_equal_the_engine(service: Service,
                                                          minilm: TorchBackend) -> None:
    items = [{"id": "first", "text": SAMPLE_TEXTS[0]},
             {"id": "qa", "text": SAMPLE_TEXTS[1], "text_pair": SAMPLE_TEXTS[3]},
             {"text": SAMPLE_TEXTS[2]}]
    body = ok(service.post({"inputs": items}))
    docs = http_docs(body, items)
    assert [doc.doc_id for doc in docs[:2]] == ["first", "qa"]
    assert docs[2].doc_id.startswith("request-") and docs[2].doc_id.endswith(":2")
    pair_tokens = [t for t in body["tokens"] if t["doc_id"] == "qa"]
    assert {t["segment"] for t in pair_tokens} == {0, 1}
    assert_same_tables(json_tables(body), local_tables(minilm, docs), "topk:8")


@pytest.mark.parametrize("table", list(SCHEMAS))
def test_arrow_tables_have_the_dataset_schema_and_the_json_values(service: Service,
                                                                   table: str) -> None:
    payload = {"inputs": [{"id": "a", "text": SAMPLE_TEXTS[0]},
                          {"id": "b", "text": SAMPLE_TEXTS[3]}], "attention": "topk:3"}
    got = arrow(service, payload, table)
    assert got.schema == SCHEMAS[table]
    assert got.num_rows > 0
    from_json = json_tables(ok(service.post(payload)))
    if table in ("head_stats", "attention"):
        assert_same_tables({**from_json, table: got}, from_json, "topk:3")
    else:
        # exact: the same request runs the same batch on the same kernels, and JSON carries
        # float32 values exactly (the shortest repr of the widened float64 round-trips)
        assert got.equals(from_json[table])


def test_arrow_full_mode_keeps_float16_weights(service: Service) -> None:
    payload = {"inputs": [{"id": "a", "text": SAMPLE_TEXTS[2]}], "attention": "full"}
    got = arrow(service, payload, "attention")
    assert got.schema == schema.attention_schema(True)
    body = ok(service.post(payload))
    n = len(body["tokens"])
    assert got.num_rows == 6 * 12 * n * n  # every (query, key) of every head
    from_json = pa.Table.from_pylist(body["attention"], schema=schema.attention_schema(False))
    # Arrow keeps float16, JSON float32 weights of the same pass: FLOAT16_ATOL
    assert_attention_equal(got.cast(schema.attention_schema(False)), from_json,
                           atol=FLOAT16_ATOL)


def test_arrow_documents_and_default_table(service: Service) -> None:
    """Without ``table``, Arrow sends head_stats."""
    payload = {"inputs": [{"id": "only", "text": SAMPLE_TEXTS[1]}]}
    response = service.post(payload, headers={"Accept": ARROW_STREAM})
    assert response.status_code == 200
    assert response.headers["x-headscope-table"] == "head_stats"
    stats = pa.ipc.open_stream(response.content).read_all()
    assert stats.schema == schema.HEAD_STATS and stats.num_rows == 6 * 12


# ------------------------------------------------------------------------ request options


def test_layers_and_heads_filter(service: Service, minilm: TorchBackend) -> None:
    items = [{"id": "x", "text": SAMPLE_TEXTS[3]}]
    layers, heads = [0, 5], [1, 3, 11]
    body = ok(service.post({"inputs": items, "layers": layers, "heads": heads}))
    stats = pd.DataFrame(body["head_stats"])
    assert sorted(set(zip(stats["layer"], stats["head"], strict=True))) == \
        [(layer, head) for layer in layers for head in heads]
    attention = pd.DataFrame(body["attention"])
    assert set(attention["layer"]) == set(layers) and set(attention["head"]) == set(heads)
    want = local_tables(minilm, http_docs(body, items))
    for name in ("head_stats", "attention"):
        keep = pc.and_(pc.is_in(want[name]["layer"], pa.array(layers, pa.int32())),
                       pc.is_in(want[name]["head"], pa.array(heads, pa.int32())))
        want[name] = want[name].filter(keep)
    assert_same_tables(json_tables(body), want)
    # Documents and tokens are not filtered.
    assert len(body["tokens"]) == len(want["tokens"])


def test_statistics_false(service: Service) -> None:
    payload = {"inputs": [{"id": "x", "text": SAMPLE_TEXTS[0]}], "statistics": False,
               "attention": "topk:2"}
    body = ok(service.post(payload))
    assert body["head_stats"] == []
    assert len(body["attention"]) > 0 and len(body["tokens"]) > 0
    empty = arrow(service, payload, "head_stats")
    assert empty.schema == schema.HEAD_STATS and empty.num_rows == 0


def test_attention_none(service: Service) -> None:
    body = ok(service.post({"texts": [SAMPLE_TEXTS[0]], "attention": "none"}))
    assert body["attention"] == [] and len(body["head_stats"]) == 6 * 12
    assert body["attention_mode"] == "none"


def dense_from_rows(rows: list[dict], doc_id: str, window: int, n: int,
                    layers: list[int], heads: list[int]) -> np.ndarray:
    """The dense [layer][head][query][key] array that the row layout's rows describe."""
    dense = np.zeros((len(layers), len(heads), n, n), dtype=np.float32)
    for row in rows:
        if (row["doc_id"], row["window"]) == (doc_id, window):
            dense[layers.index(row["layer"]), heads.index(row["head"]), row["query"],
                  row["key"]] = row["weight"]
    return dense


@pytest.mark.parametrize(("mode", "layers", "heads"), [("topk:4", [5, 0], [3, 1, 11]),
                                                       ("full", [2], None)])
def test_dense_layout_equals_the_rows(service: Service, mode: str, layers: list[int] | None,
                                      heads: list[int] | None) -> None:
    """Same request in both layouts: each window's dense array holds exactly the rows'
    weights (float32 both ways: JSON's shortest float32 text reads back to the same float32,
    so equality is exact) and zeros elsewhere; the other tables are the same."""
    inputs = [{"id": "short", "text": SAMPLE_TEXTS[0]}, {"id": "long", "text": LONG_TEXT}]
    payload = {"inputs": inputs, "attention": mode, "max_length": 48, "stride": 8,
               "layers": layers, "heads": heads}
    payload = {k: v for k, v in payload.items() if v is not None}
    rows = ok(service.post({**payload, "layout": "rows"}))
    dense = ok(service.post({**payload, "layout": "dense"}))
    want_layers, want_heads = sorted(layers or range(6)), sorted(heads or range(12))
    lengths = Counter((t["doc_id"], t["window"]) for t in rows["tokens"])
    assert len(lengths) > 2  # the long text has several windows
    assert [(d["doc_id"], d["window"]) for d in dense["attention"]] == list(lengths)
    for entry in dense["attention"]:
        assert entry["layers"] == want_layers and entry["heads"] == want_heads
        n = lengths[(entry["doc_id"], entry["window"])]
        got = np.asarray(entry["weights"], dtype=np.float32)
        assert got.shape == (len(want_layers), len(want_heads), n, n)
        want = dense_from_rows(rows["attention"], entry["doc_id"], entry["window"], n,
                               want_layers, want_heads)
        np.testing.assert_array_equal(got, want)
    assert sum(np.count_nonzero(np.asarray(e["weights"])) for e in dense["attention"]) == \
        sum(1 for r in rows["attention"] if r["weight"] != 0)
    assert {k: v for k, v in dense.items() if k != "attention"} == \
        {k: v for k, v in rows.items() if k != "attention"}


def test_dense_layout_over_the_limit_is_a_413(service: Service) -> None:
    """The dense layout sends n² weights per head, kept or not: bounded like the rows."""
    response = service.post({"texts": ["word " * 300], "attention": "topk:1",
                             "layout": "dense"})
    assert response.status_code == 413, response.text
    assert "dense layout" in response.json()["error"]


def test_models_and_health(service: Service) -> None:
    assert ok(service.get("/healthz")) == {"status": "ok"}
    assert ok(service.get("/readyz")) == {"status": "ready", "models": ["minilm"]}
    [model] = ok(service.get("/v1/models"))
    assert model["name"] == "minilm" and model["model"] == "minilm"
    assert (model["num_layers"], model["num_heads"], model["max_length"]) == (6, 12, 512)
    assert model["runtime"]["device"] == "cpu"
    assert ok(service.get("/openapi.json"))["info"]["title"] == "headscope"


def test_onnx_model_gives_the_same_tables_as_torch(service: Service) -> None:
    """The same request to a PyTorch model and to its ONNX export (auto backend)."""
    items = [{"id": f"t{i}", "text": text} for i, text in enumerate([*SAMPLE_TEXTS, LONG_TEXT])]
    items.append({"id": "pair", "text": "Where is the cat?", "text_pair": "On the mat."})
    payload = {"inputs": items, "max_length": 48, "stride": 8}
    torch_body, onnx_body = ok(service.post(payload)), ok(service.post(payload, app="onnx"))
    assert_same_tables(json_tables(onnx_body), json_tables(torch_body))
    [model] = ok(service.get("/v1/models", app="onnx"))
    runtime = model["runtime"]
    assert runtime["backend"] == "onnx" and runtime["provider"] == "CPUExecutionProvider"
    assert runtime["intra_op_threads"] == 1 and model["num_heads"] == 12


def test_analyses_return_patterns_and_words_like_the_engine(service: Service,
                                                            minilm: TorchBackend) -> None:
    items = [{"id": "a", "text": LONG_TEXT}, {"id": "b", "text": "Is it raining?",
                                               "text_pair": "It pours."}]
    options = {"max_length": 48, "stride": 8, "attention": "topk:3"}
    body = ok(service.post({"inputs": items, "analyses": ["patterns", "words"], **options}))
    docs = [Document(i["id"], i["text"], i.get("text_pair")) for i in items]
    windower = Windower(minilm.tokenizer, minilm.info, WindowConfig(48, 8))
    flat = [w for doc in docs for w in windower.windows(doc)]
    config = RunConfig(attention=AttentionMode.parse("topk:3"), analyses=("patterns", "words"))
    want = analyse_windows(minilm, flat, config)
    for name in ("head_patterns", "words", "word_attention"):
        got = pa.Table.from_pylist(body[name], schema=want[name].schema)
        keys = registry.sort_keys()[name]
        assert got.select(keys).equals(want[name].select(keys)), name
    got = pa.Table.from_pylist(body["word_attention"], schema=want["word_attention"].schema)
    assert pc.max(pc.abs(pc.subtract(got["weight"], want["word_attention"]["weight"]))).as_py() \
        <= 1e-5
    arrow_words = arrow(service, {"inputs": items, "analyses": ["words"], **options}, "words")
    assert arrow_words.num_rows == len(body["words"])


def test_arrow_table_of_an_analysis_not_asked_for_is_a_422(service: Service) -> None:
    response = service.post({"texts": ["a b"], "table": "words"},
                            headers={"Accept": ARROW_STREAM})
    assert response.status_code == 422 and "analyses ['words']" in response.json()["error"]


def test_disable_heads_equals_the_engine_with_those_heads_disabled(
        service: Service, minilm: TorchBackend) -> None:
    from pipelines.backends.head_mask import HeadMask

    text = SAMPLE_TEXTS[3]
    body = ok(service.post({"inputs": [{"id": "x", "text": text}], "disable_heads": "1.3,4.*"}))
    doc = Document("x", text, source="http", source_line=0)
    windows = Windower(minilm.tokenizer, minilm.info, WindowConfig()).windows(doc)
    with minilm.disabled_heads(HeadMask.parse("1.3,4.*")):
        want = analyse_windows(minilm, windows, RunConfig())
    assert_same_tables(json_tables(body), want)
    stats = pd.DataFrame(body["head_stats"])
    off = stats[((stats["layer"] == 1) & (stats["head"] == 3)) | (stats["layer"] == 4)]
    assert len(off) == 13 and (off["max_weight"] == 0).all()
    plain = pd.DataFrame(ok(service.post({"texts": [text]}))["head_stats"])
    assert (plain["max_weight"] > 0).all()
    layer0 = ["entropy", "mass_prev", "mean_distance"]
    # bitwise: layer 0 precedes every disabled head; same inputs, shapes and kernels
    np.testing.assert_array_equal(stats[stats["layer"] == 0][layer0].to_numpy(),
                                  plain[plain["layer"] == 0][layer0].to_numpy())


@pytest.mark.parametrize(("app", "heads", "message"), [
    ("open", "6.0", "layer 6 is out of range"),
    ("open", "1.x", "disable_heads"),
    ("onnx", "1.3", "disable_heads needs a backend with head_masking"),
])
def test_bad_disable_heads_is_a_422(service: Service, app: str, heads: str,
                                    message: str) -> None:
    response = service.post({"texts": ["a b"], "disable_heads": heads}, app=app)
    assert response.status_code == 422 and message in response.json()["error"], response.text


# ------------------------------------------------------------------------------ batching


def test_concurrent_requests_share_batches(service: Service, minilm: TorchBackend) -> None:
    from ray import serve

    worker = serve.get_deployment_handle("model-minilm", app_name="open")
    before = len(worker.batch_size_log.remote().result())
    texts = [f"Request {i}: {SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]}" for i in range(24)]

    def one(i: int) -> dict:
        return ok(service.post({"inputs": [{"id": f"r{i}", "text": texts[i]}]}))

    bodies = concurrently(len(texts), one)
    sizes = worker.batch_size_log.remote().result()[before:]
    assert sum(sizes) == len(texts), sizes
    assert max(sizes) > 1, f"no batch held more than one document: {sizes}"
    assert max(sizes) <= WORKER["max_batch_size"]
    # Each request got its own document's rows, whatever it was batched with.
    docs = [Document(f"r{i}", text, source="http") for i, text in enumerate(texts)]
    want = local_tables(minilm, docs)
    for i, body in enumerate(bodies):
        assert [row["text"] for row in body["documents"]] == [texts[i]]
        mine = {name: table.filter(pc.equal(table["doc_id"], f"r{i}"))
                for name, table in want.items()}
        assert_same_tables(json_tables(body), mine)


# -------------------------------------------------------------------------------- errors

ERRORS = {
    # 413: over a limit of the request
    "too-many-inputs": ({"texts": ["x"] * 9}, 413, "at most 8"),
    "too-many-characters": ({"texts": ["a" * 2600, "b" * 2600]}, 413, "at most 5000"),
    "too-many-tokens": ({"texts": ["a " * 2400]}, 413, "at most 2000"),
    "too-many-tokens-windows": ({"texts": ["a " * 900], "max_length": 8, "stride": 4}, 413,
                                "split the texts"),
    # 422: fields that are invalid
    "empty-texts": ({"texts": []}, 422, "at least one"),
    "empty-inputs": ({"inputs": []}, 422, "at least one"),
    "blank-text": ({"texts": ["fine", "   "]}, 422, "empty"),
    "blank-input": ({"inputs": [{"text": " \n"}]}, 422, "blank"),
    "both-sources": ({"texts": ["a"], "inputs": [{"text": "b"}]}, 422, "either"),
    "no-source": ({"attention": "none"}, 422, "either"),
    "unknown-mode": ({"texts": ["a"], "attention": "top5"}, 422, "none, topk:K"),
    "bad-topk": ({"texts": ["a"], "attention": "topk:0"}, 422, "positive integer"),
    "bad-threshold": ({"texts": ["a"], "attention": "threshold:2"}, 422, "(0, 1]"),
    "layer-range": ({"texts": ["a"], "layers": [6]}, 422, "0..5"),
    "negative-layer": ({"texts": ["a"], "layers": [-1]}, 422, "out of range"),
    "head-range": ({"texts": ["a"], "heads": [0, 12]}, 422, "0..11"),
    "duplicate-ids": ({"inputs": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}, 422,
                      "unique"),
    "texts-not-a-list": ({"texts": "just one string"}, 422, "texts"),
    "text-not-a-string": ({"texts": [1, 2]}, 422, "texts.0"),
    "layers-not-ints": ({"texts": ["a"], "layers": ["first"]}, 422, "layers.0"),
    "statistics-not-bool": ({"texts": ["a"], "statistics": "maybe"}, 422, "statistics"),
    "store-not-bool": ({"texts": ["a"], "store": "please"}, 422, "store"),
    "unknown-field": ({"texts": ["a"], "colour": "red"}, 422, "colour"),
    "unknown-input-field": ({"inputs": [{"text": "a", "label": 1}]}, 422, "label"),
    "bad-table": ({"texts": ["a"], "table": "everything"}, 422, "table"),
    "max-length-too-big": ({"texts": ["a"], "max_length": 4096}, 422, "512"),
    "max-length-too-small": ({"texts": ["a"], "max_length": 1}, 422, "max_length"),
    "stride-too-big": ({"texts": ["a"], "max_length": 16, "stride": 20}, 422, "stride"),
    "negative-stride": ({"texts": ["a"], "stride": -1}, 422, "stride"),
    "local-window": ({"texts": ["a"], "local_window": 1000}, 422, "local_window"),
    "pair-too-long": ({"inputs": [{"text": "a", "text_pair": "word " * 40}],
                       "max_length": 16, "stride": 0}, 422, "text_pair"),
    "empty-id": ({"inputs": [{"id": "", "text": "a"}]}, 422, "id"),
    "bom-only-text": ({"texts": ["a", "\ufeff"]}, 422, "texts [1] are empty"),
    "no-content-text": ({"inputs": [{"text": "a"}, {"id": "zw", "text": "\u200b\u200b"}]},
                        422, "inputs.1: document 'zw': text '\\u200b\\u200b' has no content"),
    "no-content-pair": ({"inputs": [{"id": "p", "text": "a", "text_pair": "\u2060"}]}, 422,
                        "inputs.0: document 'p': text_pair"),
    "body-is-a-list": (["not", "an", "object"], 422, "JSON object"),
    "body-is-null": (None, 422, "JSON object"),
    # 404: a model this service does not have
    "unknown-model": ({"texts": ["a"], "model": "bert-huge"}, 404, "available: minilm"),
    "path-as-model": ({"texts": ["a"], "model": "../minilm"}, 404, "GET /v1/models"),
    # 400: the bytes are not JSON
    "invalid-json": (b'{"texts": ["a"', 400, "not valid JSON"),
    "empty-body": (b"", 400, "not valid JSON"),
    "not-utf8": (b'{"texts": ["caf\xe9"]}', 400, "UTF-8"),
    "utf16": ('{"texts": ["a"]}'.encode("utf-16"), 400, "UTF-8"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_say_what_to_fix(service: Service, case: str) -> None:
    payload, status, fragment = ERRORS[case]
    if isinstance(payload, bytes):
        response = service.post(data=payload)
    elif payload is None:
        response = service.post(data=b"null")
    else:
        response = service.post(payload)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert fragment.lower() in body["error"].lower(), body["error"]


def test_invalid_fields_are_listed_one_by_one(service: Service) -> None:
    response = service.post({"texts": [1], "layers": "x", "colour": 1})
    assert response.status_code == 422
    fields = {d["field"] for d in response.json()["details"]}
    assert {"texts.0", "layers", "colour"} <= fields


def test_deeply_nested_json_is_a_400_not_a_500(service: Service) -> None:
    """BUG: json.loads raises RecursionError (not JSONDecodeError) → unhandled → 500."""
    response = service.post(data=b"[" * 100_000)
    assert response.status_code == 400, (response.status_code, response.text[:200])
    assert "error" in response.json()


def test_errors_leave_the_service_working(service: Service) -> None:
    for payload, _, _ in list(ERRORS.values())[:6]:
        if isinstance(payload, dict):
            service.post(payload)
    assert ok(service.post({"texts": ["Still here."]}))["documents"][0]["text"] == "Still here."


# ---------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(("method", "path"), [("post", "/v1/attention"),
                                              ("get", "/v1/models"), ("post", "/v1/view")])
@pytest.mark.parametrize("token", [None, "wrong", f"{TOKEN}x", ""])
def test_auth_rejects_missing_or_wrong_tokens(service: Service, method: str, path: str,
                                              token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    url = service.address("secure", path)
    if method == "post":
        response = requests.post(url, json={"texts": ["a"]}, headers=headers, timeout=60)
    else:
        response = requests.get(url, headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["error"]


def test_auth_rejects_other_schemes(service: Service) -> None:
    for header in (TOKEN, f"Basic {TOKEN}", f"Token {TOKEN}", f"Bearer  {TOKEN}x"):
        response = requests.get(service.address("secure", "/v1/models"),
                                headers={"Authorization": header}, timeout=60)
        assert response.status_code == 401, header


def test_auth_accepts_the_right_token(service: Service) -> None:
    [model] = ok(service.get("/v1/models", "secure", token=TOKEN))
    assert model["name"] == SECURE_MODEL and model["model"] == "minilm"
    assert service.get("/docs", "secure", token=TOKEN).status_code == 200
    assert service.get("/openapi.json", "secure", token=TOKEN).status_code == 200
    body = ok(service.post({"texts": ["Tokens open doors."]}, app="secure", token=TOKEN))
    assert body["documents"][0]["text"] == "Tokens open doors."
    lower = requests.get(service.address("secure", "/v1/models"),
                         headers={"Authorization": f"bearer {TOKEN}"}, timeout=60)
    assert lower.status_code == 200


def test_health_checks_and_docs_need_no_token(service: Service) -> None:
    assert ok(service.get("/healthz", "secure")) == {"status": "ok"}
    assert service.get("/docs", "secure").status_code == 200  # under the route prefix
    assert "HTTPBearer" in ok(service.get("/openapi.json", "secure"))["components"][
        "securitySchemes"]
    assert ok(service.get("/readyz", "secure"))["models"] == [SECURE_MODEL]


def test_errors_behind_auth_are_still_errors(service: Service) -> None:
    response = service.post({"texts": []}, app="secure", token=TOKEN)
    assert response.status_code == 422
    response = service.post({"texts": ["a"], "model": "minilm"}, app="secure", token=TOKEN)
    assert response.status_code == 404 and SECURE_MODEL in response.json()["error"]


def test_open_app_needs_no_token(service: Service) -> None:
    assert service.get("/v1/models").status_code == 200
    assert service.get("/docs").status_code == 200


def test_response_names_the_public_model(service: Service) -> None:
    """BUG: without ``model`` the response says "minilm" (the loaded model, ModelInfo.name)
    instead of the configured public name "mini" it says when ``model`` is given."""
    named = ok(service.post({"texts": ["a b"], "model": SECURE_MODEL}, "secure", token=TOKEN))
    default = ok(service.post({"texts": ["a b"]}, "secure", token=TOKEN))
    assert named["model"] == SECURE_MODEL
    assert default["model"] == SECURE_MODEL


# --------------------------------------------------------------------------------- store


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def repo_outputs() -> set[str]:
    """Untracked dataset files in the repository (other untracked files may come and go)."""
    listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line for line in listed.splitlines()
            if line.endswith((".parquet", "manifest.json")) or "service_data" in line}


def test_store_appends_parts_under_dataset_root(service: Service) -> None:
    root = service.roots["open"] / "minilm"
    outside_before = files_under(service.base) - files_under(service.roots["open"])
    repo_before = repo_outputs()
    first = ok(service.post({"inputs": [{"id": "s1", "text": SAMPLE_TEXTS[0]},
                                        {"id": "s2", "text": SAMPLE_TEXTS[1]}],
                             "store": True, "attention": "topk:2"}))
    assert (root / "manifest.json").is_file()
    manifest = Dataset.open(root).manifest
    assert manifest["status"] == "open" and manifest["input"] == {"source": "http"}
    assert manifest["model"]["num_layers"] == 6 and manifest["runtime"]["device"] == "cpu"
    statistics = manifest["statistics"]  # store takes only the default conventions
    assert (statistics["punctuation"]["rule"], statistics["entropy_epsilon"]) == ("unicode", 0)
    assert statistics["clark_et_al_2019"]["mass_punct"].startswith("differs")
    for name in SCHEMAS:
        stored = pa.Table.from_pandas(pd.read_parquet(root / name), preserve_index=False)
        # exact: the stored rows are the response's rows, float32 written losslessly
        assert stored.cast(SCHEMAS[name]).equals(json_tables(first)[name]), name
    second = ok(service.post({"inputs": [{"id": "s3", "text": SAMPLE_TEXTS[3]}],
                              "store": True, "attention": "topk:2"}))
    for name in SCHEMAS:
        assert len(list((root / name).glob("part-*.parquet"))) == 2, name
        stored = pd.read_parquet(root / name)
        assert len(stored) == len(first[name]) + len(second[name]), name
    stats = Dataset.open(root).head_stats(layer=0)
    assert sorted(stats.doc_id.unique()) == ["s1", "s2", "s3"]
    # A request without store writes nothing.
    ok(service.post({"texts": ["Not stored."]}))
    assert len(list((root / "head_stats").glob("part-*.parquet"))) == 2
    # Nothing outside dataset_root: not next to it, not in the repo, not in the cwd.
    assert files_under(service.base) - files_under(service.roots["open"]) == outside_before
    assert repo_outputs() == repo_before
    assert not (Path.cwd() / "service_data").exists()


def test_store_refuses_a_folder_of_format_1(service: Service) -> None:
    root = service.roots["onnx"] / "minilm"  # no other test stores through this app
    root.mkdir(parents=True)
    old = {"format": "headscope-dataset/1", "status": "open"}
    (root / "manifest.json").write_text(json.dumps(old))
    try:
        response = service.post({"texts": ["Not mixed in."], "store": True}, "onnx")
        assert response.status_code == 409, response.text
        assert "cannot append to it: it holds format 'headscope-dataset/1'" in \
            response.json()["error"]
        assert [p.name for p in root.iterdir()] == ["manifest.json"]
        assert json.loads((root / "manifest.json").read_text()) == old
    finally:
        shutil.rmtree(root)


def test_clark_conventions_are_request_options(service: Service) -> None:
    text = {"texts": ["Wait: is it done? Yes; no (maybe), fine."], "attention": "none"}
    default = ok(service.post(text))
    clark = ok(service.post({**text, "punctuation": "clark", "entropy_epsilon": "clark"}))
    punct = [row["token"] for row in clark["tokens"] if row["is_punct"]]
    assert punct == [",", "."] and sum(row["is_punct"] for row in default["tokens"]) == 7
    for mine, theirs in zip(default["head_stats"], clark["head_stats"], strict=True):
        # more keys' weights summed: never less, up to float32 rounding (STAT_ATOL, 1e-5)
        assert mine["mass_punct"] >= theirs["mass_punct"] - 1e-5
        assert theirs["entropy"] >= mine["entropy"] - 1e-5  # smoothing raises it
    refused = service.post({**text, "store": True, "punctuation": "clark"})
    assert refused.status_code == 422 and "default conventions" in refused.text


def test_store_folder_is_the_public_model_name(service: Service) -> None:
    ok(service.post({"texts": ["Stored under mini."], "store": True}, "secure", token=TOKEN))
    assert (service.roots["secure"] / SECURE_MODEL / "manifest.json").is_file()
    assert [p.name for p in service.roots["secure"].iterdir()] == [SECURE_MODEL]


# ------------------------------------------------------------------------------ overload


def test_a_burst_gets_503_with_retry_after_and_never_500(service: Service) -> None:
    """The overload ingress takes 2 requests at a time and queues 2: the rest get 503."""

    def one(i: int) -> requests.Response:
        return service.post({"texts": [f"Burst request number {i}."]}, app="overload")

    responses = concurrently(32, one)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 0, statuses
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
    # And afterwards it serves again.
    assert ok(service.post({"texts": ["After the burst."]}, app="overload"))


def worker_backpressure(service: Service) -> requests.Response:
    """Concurrent two-document requests against the overload worker (a queue of 2):
    some get the ingress's own JSON 503. Retried in case the worker kept up."""
    def post(i: int) -> requests.Response:
        return service.post({"texts": [f"Document {i}.", f"Another {i}."]}, app="overload")

    for _ in range(5):
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        assert all(r.status_code in (200, 503) for r in responses), [r.text for r in responses]
        ours = [r for r in responses if r.status_code == 503
                and r.headers.get("content-type", "").startswith("application/json")]
        if ours:
            return ours[0]
    pytest.fail("concurrent documents never overloaded a worker with room for 2")


def test_worker_backpressure_is_a_json_503(service: Service) -> None:
    response = worker_backpressure(service)
    assert "retry" in response.json()["error"]
    assert "retry-after" in response.headers


def test_retry_after_is_rounded_up(service: Service) -> None:
    """BUG: the ingress sends Retry-After int(1.5) = "1" where Serve's own 503 sends "2"
    (RFC 9110 delay-seconds rounded up, so a client never retries too early)."""
    response = worker_backpressure(service)
    assert response.headers["retry-after"] == "2"


# --- POST /v1/view ----------------------------------------------------------------------------


def view_payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="hs-payload">(.*?)</script>', page,
                      re.S)
    assert match, "no embedded payload"
    return json.loads(match.group(1))


def post_view(service: Service, payload: dict, app: str = "open",
              token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(service.address(app, "/v1/view"), json=payload, headers=headers,
                         timeout=120)


def test_view_equals_the_view_of_a_job_dataset(service: Service, minilm: TorchBackend,
                                               tmp_path: Path) -> None:
    """The page for posted text carries the payload of the same text run as a corpus job."""
    item = {"id": "v1", "text": SAMPLE_TEXTS[0], "text_pair": SAMPLE_TEXTS[1]}
    response = post_view(service, {**item, "attention": "topk:4"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    got = view_payload(response.text)
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps(item) + "\n")
    config = RunConfig(device="cpu", attention=AttentionMode.parse("topk:4"), capture_qk=True)
    run_job([corpus], tmp_path / "out", config, backend=minilm, progress=False)
    want = view_data(tmp_path / "out", "v1")
    assert got["model"] == {**want["model"], "name": "minilm"}
    assert (got["doc_id"], got["n_windows"]) == (want["doc_id"], want["n_windows"])
    for mine, theirs in zip(got["windows"], want["windows"], strict=True):
        assert mine["tokens"] == theirs["tokens"] and mine["segment"] == theirs["segment"]
        for part, kind in (("offsets", "<u4"), ("query", "<u2"), ("key", "<u2")):
            np.testing.assert_array_equal(unb64(mine["attention"][part], kind),
                                          unb64(theirs["attention"][part], kind))
        # the service's batch vs the job's: other shapes, ATTENTION_ATOL; q, k vectors as
        # in test_qk (float32 projections, |q|, |k| ≲ 10: < 1e-5)
        np.testing.assert_allclose(unb64(mine["attention"]["weight"], "<f4"),
                                   unb64(theirs["attention"]["weight"], "<f4"), rtol=0,
                                   atol=ATTENTION_ATOL)
        for part in ("query", "key"):
            np.testing.assert_allclose(unb64(mine["qk"][part], "<f4"),
                                       unb64(theirs["qk"][part], "<f4"), atol=1e-5)


def test_view_of_an_onnx_model_has_no_neuron_vectors(service: Service) -> None:
    response = post_view(service, {"text": SAMPLE_TEXTS[0]}, app="onnx")
    assert response.status_code == 200, response.text
    assert all(w["qk"] is None for w in view_payload(response.text)["windows"])
    refused = post_view(service, {"text": SAMPLE_TEXTS[0], "qk": True}, app="onnx")
    assert refused.status_code == 422 and "query_key_capture" in refused.json()["error"]


@pytest.mark.parametrize(("payload", "status", "says"), [
    ({"text": "hi", "attention": "none"}, 422, "use topk:K"),
    ({"text": "  "}, 422, "text is blank"),
    ({"text": "\u00ad\u200b"}, 422, "has no content"),
    ({"texts": ["hi"]}, 422, "text: Field required"),
    ({"text": "hi", "model": "nope"}, 404, "unknown model"),
    ({"text": "word " * 3000}, 413, "characters"),
])
def test_view_errors_say_what_to_fix(service: Service, payload: dict, status: int,
                                     says: str) -> None:
    response = post_view(service, payload)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]


def test_view_needs_the_token_where_auth_is_on(service: Service) -> None:
    assert post_view(service, {"text": "hi"}, app="secure").status_code == 401
    assert post_view(service, {"text": "hi"}, app="secure", token=TOKEN).status_code == 200


# ------------------------------------------------------------------ the input rule


@pytest.mark.parametrize("pair", ["", "  "])
def test_empty_pair_gives_the_tokens_of_the_corpus_job(service: Service, minilm: TorchBackend,
                                                       tmp_path: Path, pair: str) -> None:
    """One document, one model input: a blank text_pair is no pair at every front door."""
    item = {"id": "a", "text": "Hi there", "text_pair": pair}
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps(item) + "\n")
    run_job([corpus], tmp_path / "out", RunConfig(device="cpu"), backend=minilm, progress=False)
    tokens = Dataset.open(tmp_path / "out").tokens("a")
    want = tokens["token"].tolist()
    assert want == ["[CLS]", "hi", "there", "[SEP]"]
    body = ok(service.post({"inputs": [item]}))
    assert [t["token"] for t in body["tokens"]] == want
    assert body["documents"][0]["text_pair"] is None
    view = post_view(service, item)
    assert view.status_code == 200, view.text
    # the view draws the source characters: "Hi", not the token "hi"
    labels = [surface.strip() for surface in tokens["surface"]]
    assert labels == ["[CLS]", "Hi", "there", "[SEP]"]
    assert view_payload(view.text)["windows"][0]["tokens"] == labels


def test_text_without_content_is_a_422_naming_the_input(service: Service) -> None:
    response = service.post({"texts": ["Fine.", "\u200b\u200b"]})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"].startswith("texts.1: document 'request-")
    assert body["details"][0]["field"] == "texts.1"
    assert ok(service.post({"texts": ["Fine."]}))["documents"][0]["text"] == "Fine."
