"""Wire-level behaviour of the HTTP service on a real local Ray Serve, over real HTTP: body
encodings and size limits, admission (JSON 503 with Retry-After at the ingress and per
request at the model), the docs with auth on, and what ``store`` accepts.

One application with a bearer token, a 64 KiB body limit, an ingress that runs 2 requests at
once and queues none, and a model worker with room for 4 documents (its queue; 1 runs at a time).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import SAMPLE_TEXTS, free_port, wait_until_ready

TOKEN = "wire-test-token"
BODY_LIMIT = 64 * 1024
RETRY_AFTER_S = 1.5
LONG_TEXT = " ".join(SAMPLE_TEXTS) * 4


@dataclass
class Wire:
    url: str
    port: int
    root: Path  # dataset_root

    def post(self, data: bytes, headers: dict | None = None,
             token: str | None = TOKEN) -> requests.Response:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(f"{self.url}/v1/attention", data=data, timeout=120,
                             headers={"Content-Type": "application/json", **auth,
                                      **(headers or {})})

    def post_json(self, payload: dict) -> requests.Response:
        return self.post(json.dumps(payload).encode())


def config(base: Path) -> dict:
    token_file = base / "token"
    token_file.write_text(TOKEN)
    return {"auth_token_env": "HEADSCOPE_TEST_TOKEN_THAT_IS_NEVER_SET",
            "auth_token_file": str(token_file), "dataset_root": str(base / "data"),
            "limits": {"max_inputs": 4, "max_body_bytes": BODY_LIMIT},
            "models": [{"name": "minilm", "max_batch_size": 1, "batch_wait_timeout_s": 0,
                        "num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 4}],
            "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 2, "max_queued_requests": 0,
                        "retry_after_s": RETRY_AFTER_S}}


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from service.app import build

    base = tmp_path_factory.mktemp("wire")
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20,
             include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(config(base)), name="wire", route_prefix="/")
        found = Wire(f"http://127.0.0.1:{port}", port, base / "data")
        wait_until_ready(found.url)
        yield found
    finally:
        serve.shutdown()
        ray.shutdown()


def error(response: requests.Response | http.client.HTTPResponse, status: int,
          body: bytes | None = None) -> str:
    """The JSON error message of a refusal with ``status``."""
    got = response.status_code if isinstance(response, requests.Response) else response.status
    raw = response.content if isinstance(response, requests.Response) else body
    assert got == status, raw
    assert response.headers["content-type"].startswith("application/json")
    return json.loads(raw or b"")["error"]


def raw_request(wire: Wire, headers: dict[str, str], parts: Iterator[bytes]
                ) -> tuple[http.client.HTTPResponse, bytes]:
    """POST whose body is ``parts`` and never finished: the answer must come without it."""
    with socket.create_connection(("127.0.0.1", wire.port), timeout=30) as sock:
        head = {"Host": "127.0.0.1", "Content-Type": "application/json",
                "Authorization": f"Bearer {TOKEN}", **headers}
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        sock.sendall(f"POST /v1/attention HTTP/1.1\r\n{lines}\r\n".encode())
        for part in parts:
            sock.sendall(part)
        response = http.client.HTTPResponse(sock)
        response.begin()  # times out (30 s) if the server waits for the rest of the body
        return response, response.read()


# ------------------------------------------------------------------------------- bodies


def test_gzip_body_gives_the_plain_answer(wire: Wire) -> None:
    payload = json.dumps({"inputs": [{"id": "g1", "text": SAMPLE_TEXTS[0]}],
                          "attention": "topk:2"}).encode()
    plain = wire.post(payload)
    zipped = wire.post(gzip.compress(payload), {"Content-Encoding": "gzip"})
    identity = wire.post(payload, {"Content-Encoding": "identity"})
    assert plain.status_code == zipped.status_code == identity.status_code == 200, zipped.text
    assert zipped.json() == plain.json() == identity.json()


def test_unknown_encoding_is_a_415_naming_what_is_accepted(wire: Wire) -> None:
    response = wire.post(b'{"texts": ["x"]}', {"Content-Encoding": "br"})
    message = error(response, 415)
    assert "'br'" in message and "identity or gzip" in message


def test_invalid_gzip_is_a_400(wire: Wire) -> None:
    response = wire.post(b'{"texts": ["x"]}', {"Content-Encoding": "gzip"})
    assert "not valid gzip" in error(response, 400)


def test_gzip_bomb_is_a_413(wire: Wire) -> None:
    bomb = gzip.compress(b'{"texts": ["' + b"a" * 50 * 2**20 + b'"]}')
    assert len(bomb) < BODY_LIMIT
    message = error(wire.post(bomb, {"Content-Encoding": "gzip"}), 413)
    assert "decompressed request body over 65,536 bytes" in message


def test_oversized_content_length_is_refused_before_the_body_is_sent(wire: Wire) -> None:
    response, body = raw_request(wire, {"Content-Length": str(200 * 2**20)},
                                 iter([b'{"texts": ["' + b"a" * 1024]))
    assert "request body over 65,536 bytes" in error(response, 413, body)


def test_oversized_chunked_body_is_refused_while_streaming(wire: Wire) -> None:
    chunk = b"a" * 16384
    frames = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6))  # 96 KiB, no end
    response, body = raw_request(wire, {"Transfer-Encoding": "chunked"}, frames)
    assert "request body over 65,536 bytes" in error(response, 413, body)


def test_a_body_within_the_limit_without_content_length_is_read(wire: Wire) -> None:
    payload = json.dumps({"texts": ["Chunked but small."], "attention": "none"}).encode()
    response = requests.post(f"{wire.url}/v1/attention", data=iter([payload[:10], payload[10:]]),
                             headers={"Authorization": f"Bearer {TOKEN}",
                                      "Content-Type": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------- admission


def documents_analysed() -> int:
    from ray import serve

    worker = serve.get_deployment_handle("model-minilm", app_name="wire")
    return sum(worker.batch_size_log.remote().result())


def test_ingress_refusal_is_a_json_503_with_retry_after(wire: Wire) -> None:
    payload = {"texts": [LONG_TEXT, LONG_TEXT], "attention": "none"}
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: wire.post_json(payload), range(8)))
        assert {r.status_code for r in responses} <= {200, 503}, [r.text for r in responses]
        busy = [r for r in responses if r.status_code == 503]
        if busy:
            assert all("service is busy" in error(r, 503) for r in busy), busy[0].text
            assert all(r.headers["retry-after"] == "2" for r in busy)
            return
    pytest.fail("8 concurrent requests never passed an ingress that runs 2 at once")


def test_a_refused_request_costs_no_model_work(wire: Wire) -> None:
    """A 4-document request fills the worker (room for 4); a 2-document request sent while
    it runs is refused whole: the documents analysed are exactly those of the 200s."""
    big = {"texts": [LONG_TEXT] * 4, "attention": "none"}
    small = {"texts": ["First of two.", "Second of two."], "attention": "none"}
    for _ in range(5):
        before = documents_analysed()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(wire.post_json, big)
            time.sleep(0.15)
            second = pool.submit(wire.post_json, small).result()
            first_response = first.result()
        assert first_response.status_code == 200, first_response.text
        done = 4 + (2 if second.status_code == 200 else 0)
        assert documents_analysed() - before == done
        if second.status_code == 503:
            assert "model is overloaded" in error(second, 503)
            assert second.headers["retry-after"] == "2"
            return
    pytest.fail("the 2-document request always found room next to the 4-document one")


# --------------------------------------------------------------------------- docs, auth


def test_docs_load_without_the_token_while_data_needs_it(wire: Wire) -> None:
    page = requests.get(f"{wire.url}/docs", timeout=60)
    assert page.status_code == 200 and "swagger" in page.text.lower()
    schema = requests.get(f"{wire.url}/openapi.json", timeout=60)
    assert schema.status_code == 200
    document = schema.json()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method in (("/v1/attention", "post"), ("/v1/view", "post"), ("/v1/models", "get")):
        assert document["paths"][path][method]["security"] == [{"HTTPBearer": []}], path
    assert "security" not in document["paths"]["/healthz"]["get"]
    error(wire.post(b'{"texts": ["x"]}', token=None), 401)
    assert requests.get(f"{wire.url}/v1/models", timeout=60).status_code == 401


# -------------------------------------------------------------------------------- store


@pytest.mark.parametrize("selection", [{"layers": [0]}, {"heads": [1, 2]},
                                       {"statistics": False}])
def test_store_refuses_a_selection(wire: Wire, selection: dict) -> None:
    response = wire.post_json({"texts": ["Not stored."], "store": True, **selection})
    message = error(response, 422)
    assert "store keeps every layer, head and head_stats row" in message
    assert next(iter(selection)) in message
    assert not (wire.root / "minilm").exists()
    without_store = wire.post_json({"texts": ["Selected."], **selection})
    assert without_store.status_code == 200, without_store.text
