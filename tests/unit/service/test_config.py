"""Service configuration: defaults, the shipped deploy/serve.yaml, and values that must fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.config import (
    HttpOptions,
    IngressConfig,
    Limits,
    ModelConfig,
    ServiceConfig,
    read_serve_file,
)

ROOT = Path(__file__).resolve().parents[3]
SERVE_YAML = ROOT / "deploy" / "serve.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def serve_file(tmp_path: Path, args: dict, **top: object) -> Path:
    app = {"name": "headscope", "route_prefix": "/", "import_path": "service.app:build",
           "args": args}
    return write_yaml(tmp_path / "serve.yaml", {"applications": [app], **top})


# ------------------------------------------------------------------------------ defaults


def test_defaults() -> None:
    config = ServiceConfig()
    assert [m.name for m in config.models] == ["minilm"]
    assert config.default_model == "minilm"
    model = config.models[0]
    assert (model.model, model.backend, model.device, model.dtype) == \
        ("minilm", "auto", "auto", "float32")
    assert model.onnx.intra_op_threads == model.onnx.inter_op_threads == 0
    assert model.max_batch_size == 32 and model.batch_wait_timeout_s == 0.02
    assert model.num_replicas == 1 and model.autoscaling is None
    assert config.limits == Limits(max_inputs=64, max_characters=200_000, max_tokens=32_768)
    assert config.ingress == IngressConfig()
    assert 0 < config.ingress.num_cpus < 1, "the ingress takes a fraction of a CPU"
    assert config.dataset_root == "service_data"
    assert config.auth_token_env == "HEADSCOPE_API_TOKEN" and config.auth_token_file is None
    assert config.model("minilm") is model and config.model("other") is None
    assert HttpOptions() == HttpOptions(host="127.0.0.1", port=8000)


def test_default_config_round_trips_through_model_dump() -> None:
    """``headscope serve`` passes ``config.model_dump()`` to ``build``; it must validate."""
    config = ServiceConfig(models=[ModelConfig(name="a"), ModelConfig(name="b", model="x")],
                           limits=Limits(max_inputs=3))
    assert ServiceConfig.model_validate(config.model_dump()) == config


# ---------------------------------------------------------------------- deploy/serve.yaml


def test_shipped_serve_yaml_validates() -> None:
    config, http = read_serve_file(SERVE_YAML)
    assert http == HttpOptions(host="127.0.0.1", port=8000)
    assert [m.name for m in config.models] == ["minilm"]
    assert config.models[0].max_batch_size == 32
    assert config.limits.max_tokens == 32_768
    assert config.ingress.retry_after_s == 1
    # Every key the file spells out is a real field with the value the file gives.
    raw = yaml.safe_load(SERVE_YAML.read_text())
    args = raw["applications"][0]["args"]
    dumped = config.model_dump()
    for key, value in args.items():
        if key == "models":
            for given, parsed in zip(value, dumped["models"], strict=True):
                assert {k: parsed[k] for k in given} == given
        elif isinstance(value, dict):
            assert {k: dumped[key][k] for k in value} == value
        else:
            assert dumped[key] == value


def test_shipped_serve_yaml_is_a_ray_serve_config() -> None:
    """``serve run deploy/serve.yaml`` reads the same file: Serve's own schema must accept it."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))


def test_read_serve_file_without_args_gives_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", {"applications": [
        {"name": "x", "import_path": "service.app:build"}]})
    config, http = read_serve_file(path)
    assert config == ServiceConfig() and http == HttpOptions()


def test_read_serve_file_picks_the_headscope_app_and_http_options(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", {
        "http_options": {"host": "0.0.0.0", "port": 9123},
        "applications": [
            {"name": "other", "import_path": "somewhere.else:app", "args": {"bogus": 1}},
            {"name": "hs", "import_path": "service.app:build",
             "args": {"models": [{"name": "m1"}], "limits": {"max_inputs": 2}}},
        ]})
    config, http = read_serve_file(path)
    assert [m.name for m in config.models] == ["m1"] and config.limits.max_inputs == 2
    assert http == HttpOptions(host="0.0.0.0", port=9123)


def test_read_serve_file_without_headscope_app(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", {"applications": [
        {"name": "other", "import_path": "somewhere.else:app"}]})
    with pytest.raises(ValueError, match="import_path service.app:build"):
        read_serve_file(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="no application"):
        read_serve_file(empty)


# ------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("args", "field"), [
    ({"unknown_key": 1}, "unknown_key"),
    ({"limits": {"max_input": 3}}, "max_input"),
    ({"models": [{"name": "m", "max_batch": 4}]}, "max_batch"),
    ({"ingress": {"cpus": 1}}, "cpus"),
    ({"models": [{"name": "m", "autoscaling": {"min": 1}}]}, "min"),
], ids=["top", "limits", "model", "ingress", "autoscaling"])
def test_unknown_keys_fail(tmp_path: Path, args: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        read_serve_file(serve_file(tmp_path, args))


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-x", "x" * 65, "a b", "ü",
                                  "..", "x\n"])
def test_unsafe_model_names_fail(name: str) -> None:
    with pytest.raises(ValidationError, match="model name"):
        ModelConfig(name=name)


@pytest.mark.parametrize("name", ["minilm", "gpt2-small", "m.v2", "A_1", "x" * 64])
def test_safe_model_names_pass(name: str) -> None:
    assert ModelConfig(name=name).name == name


def test_duplicate_or_no_model_names_fail() -> None:
    with pytest.raises(ValidationError, match="unique names"):
        ServiceConfig(models=[ModelConfig(name="a"), ModelConfig(name="a", model="other")])
    with pytest.raises(ValidationError, match="at least one"):
        ServiceConfig(models=[])


@pytest.mark.parametrize(("section", "values"), [
    ("model", {"max_batch_size": 0}),
    ("model", {"max_batch_size": -1}),
    ("model", {"batch_wait_timeout_s": -0.1}),
    ("model", {"batch_tokens": 0}),
    ("model", {"num_replicas": 0}),
    ("model", {"num_cpus": 0}),
    ("model", {"num_gpus": -1}),
    ("model", {"max_ongoing_requests": 0}),
    ("model", {"max_queued_requests": -2}),
    ("model", {"dtype": "int8"}),
    ("model", {"backend": "tensorrt"}),
    ("model", {"onnx": {"intra_op_threads": -1}}),
    ("model", {"onnx": {"threads": 2}}),
    ("model", {"max_batch_size": "many"}),
    ("limits", {"max_inputs": 0}),
    ("limits", {"max_characters": -5}),
    ("limits", {"max_tokens": 0}),
    ("ingress", {"num_cpus": 0}),
    ("ingress", {"max_ongoing_requests": 0}),
    ("ingress", {"retry_after_s": 0}),
    ("autoscaling", {"min_replicas": -1}),
    ("autoscaling", {"max_replicas": 0}),
])
def test_bad_values_fail(tmp_path: Path, section: str, values: dict) -> None:
    if section == "model":
        args = {"models": [{"name": "m", **values}]}
    elif section == "autoscaling":
        args = {"models": [{"name": "m", "autoscaling": values}]}
    else:
        args = {section: values}
    with pytest.raises(ValidationError) as info:
        read_serve_file(serve_file(tmp_path, args))
    assert next(iter(values)) in str(info.value)


def test_bad_http_options_fail(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="port"):
        read_serve_file(serve_file(tmp_path, {}, http_options={"port": "eighty"}))


def test_good_values_pass(tmp_path: Path) -> None:
    args = {"dataset_root": "/data/hs", "auth_token_file": "/run/secrets/token",
            "models": [{"name": "small", "model": "minilm", "max_batch_size": 1,
                        "batch_wait_timeout_s": 0, "max_queued_requests": -1,
                        "autoscaling": {"min_replicas": 0, "max_replicas": 4}},
                       {"name": "gpt2", "model": "/models/gpt2", "num_cpus": 0.5}],
            "limits": {"max_inputs": 1}, "ingress": {"num_cpus": 0.1, "retry_after_s": 0.5}}
    config, _ = read_serve_file(serve_file(tmp_path, args))
    assert config.default_model == "small"
    assert config.model("small").autoscaling.max_replicas == 4
    assert config.model("gpt2").num_cpus == 0.5


# ------------------------------------------------------------------------------ token


def test_auth_token_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    monkeypatch.delenv("HS_TEST_TOKEN", raising=False)
    assert ServiceConfig(auth_token_env="HS_TEST_TOKEN").auth_token() is None
    config = ServiceConfig(auth_token_env="HS_TEST_TOKEN", auth_token_file=str(token_file))
    assert config.auth_token() == "from-file"
    monkeypatch.setenv("HS_TEST_TOKEN", "from-env")
    assert config.auth_token() == "from-env"
    monkeypatch.setenv("HS_TEST_TOKEN", "")
    assert config.auth_token() == "from-file"
    token_file.write_text("   \n")
    assert config.auth_token() is None
