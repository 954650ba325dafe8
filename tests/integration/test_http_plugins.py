"""An analysis added by a plugin, served over real HTTP by a real local Ray Serve.

The toy analysis (tests/toy_analysis.py) is one registry entry in one module; the service
config names that module in ``plugins`` and nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
from conftest import SAMPLE_TEXTS, free_port, wait_until_ready

from service.schemas import ARROW_STREAM

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
PLUGIN = "toy_analysis"
NAME, TABLE = "diagonal", "head_diagonal"
KEYS = ["doc_id", "window", "layer", "head"]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "PYTHONPATH")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray's workers inherit this environment: they import the plugin by its module name.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT), *filter(None, [saved["PYTHONPATH"]])])
    import ray
    from ray import serve

    from service.app import build

    base = tmp_path_factory.mktemp("plugins")
    config = {"auth_token_env": "HEADSCOPE_TEST_TOKEN_THAT_IS_NEVER_SET",
              "dataset_root": str(base / "data"), "plugins": [PLUGIN],
              "models": [{"name": "minilm", "max_batch_size": 8, "batch_wait_timeout_s": 0.01,
                          "num_cpus": 0.5}]}
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20,
             include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(config), name="plugins", route_prefix="/")
        address = f"http://127.0.0.1:{port}"
        wait_until_ready(address)
        yield address
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def post(url: str, payload: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/v1/attention", json=payload, headers=headers or {},
                         timeout=120)


def diagonal_reference(body: dict) -> pd.DataFrame:
    """From the returned full attention: mean over query rows of the weight on self."""
    attention = pd.DataFrame(body["attention"])
    documents = pd.DataFrame(body["documents"])[["doc_id", "window", "n_tokens"]]
    on_self = attention[attention["query"] == attention["key"]]
    sums = on_self.groupby(KEYS, sort=True)["weight"].sum().reset_index()
    sums = sums.merge(documents, on=["doc_id", "window"])
    sums["want"] = sums["weight"] / sums["n_tokens"]
    return sums[[*KEYS, "want"]]


def test_plugin_analysis_is_served(url: str) -> None:
    payload = {"texts": SAMPLE_TEXTS[:3], "analyses": [NAME], "attention": "full"}
    response = post(url, payload)
    assert response.status_code == 200, response.text
    body = response.json()
    got = pd.DataFrame(body[TABLE])
    assert len(got) == len(body["head_stats"]) == 3 * 6 * 12
    assert got[KEYS].equals(got[KEYS].sort_values(KEYS).reset_index(drop=True))
    merged = got.merge(diagonal_reference(body), on=KEYS)
    assert len(merged) == len(got)
    np.testing.assert_allclose(merged["diagonal_mass"], merged["want"], rtol=0, atol=2e-3)


def test_plugin_table_as_arrow_with_layer_filter(url: str) -> None:
    payload = {"texts": SAMPLE_TEXTS[:2], "analyses": [NAME], "table": TABLE, "layers": [1]}
    response = post(url, payload, {"Accept": ARROW_STREAM})
    assert response.status_code == 200, response.text
    assert response.headers["X-Headscope-Table"] == TABLE
    table = pa.ipc.open_stream(response.content).read_all()
    import toy_analysis

    assert table.schema.equals(toy_analysis.SCHEMA)
    assert table.num_rows == 2 * 12 and set(table["layer"].to_pylist()) == {1}


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"texts": ["a b"], "analyses": ["nope"]}, "unknown analysis 'nope'"),
    ({"texts": ["a b"], "analyses": ["similarity"]}, "unknown analysis 'similarity'"),
    ({"texts": ["a b"], "table": "everything"}, "table"),
])
def test_unknown_names_are_422(url: str, payload: dict, fragment: str) -> None:
    response = post(url, payload)
    assert response.status_code == 422
    body = response.json()
    assert fragment in body["error"] and body["details"][0]["field"] in ("analyses", "table")


def test_plugin_table_not_asked_for_is_a_422(url: str) -> None:
    response = post(url, {"texts": ["a b"], "table": TABLE}, {"Accept": ARROW_STREAM})
    assert response.status_code == 422
    assert f"analyses ['{NAME}']" in response.json()["error"]
