"""The Helm chart helm/headscope: lint, render, and check what it renders, all offline.

Helm runs in-process (helm-python-sdk binds Helm's Go library). Core objects and the pod
templates inside the RayService are validated against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields fail); the RayService itself, a KubeRay custom
resource without a bundled schema, is checked field by field below.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

import pipelines
from service.config import ServiceConfig, read_serve_file

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "headscope"
KUBE_VERSION = "1.30"
RELEASE, NAMESPACE = "hs", "ml"
FULLNAME = "hs-headscope"
GPU_VALUES = helm.values_from_yaml((CHART / "values-gpu.yaml").read_text())
INGRESS = {"enabled": True, "className": "nginx", "host": "hs.example.com",
           "tlsSecretName": "hs-tls", "annotations": {"a.example.com/b": "c"}}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def merge(base: dict, extra: dict) -> dict:
    """Values as Helm combines them: dicts merge, None deletes a key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


class Rendered:
    """One render: objects by kind (one each at most), and NOTES.txt."""

    def __init__(self, chart: helm.Chart, values: dict | None = None) -> None:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        self.notes = files.pop("headscope/templates/NOTES.txt")
        self.objects: dict[str, dict] = {}
        for text in files.values():
            for obj in yaml.safe_load_all(text):
                if obj:
                    assert obj["kind"] not in self.objects
                    self.objects[obj["kind"]] = obj

    @property
    def rayservice(self) -> dict:
        return self.objects["RayService"]

    @property
    def cluster(self) -> dict:
        return self.rayservice["spec"]["rayClusterConfig"]

    def groups(self) -> dict[str, dict]:
        """Head and worker groups by name ("head", "cpu", "gpu")."""
        return {"head": self.cluster["headGroupSpec"],
                **{g["groupName"]: g for g in self.cluster.get("workerGroupSpecs") or []}}

    def pods(self) -> dict[str, dict]:
        """Every pod template, wrapped into the Pod that KubeRay would create from it."""
        return {name: {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"{FULLNAME}-{name}", **group["template"]["metadata"]},
                       "spec": group["template"]["spec"]}
                for name, group in self.groups().items()}

    def serve_service(self) -> dict:
        """The Service KubeRay creates from spec.serveService (name and selector its own)."""
        service = copy.deepcopy(self.rayservice["spec"]["serveService"])
        service["metadata"].setdefault("name", f"{FULLNAME}-serve-svc")
        return {"apiVersion": "v1", "kind": "Service", **service}


@pytest.fixture(scope="module")
def default(chart: helm.Chart) -> Rendered:
    return Rendered(chart)


@pytest.fixture(scope="module")
def gpu(chart: helm.Chart) -> Rendered:
    return Rendered(chart, merge(GPU_VALUES, {"ingress": INGRESS, "auth": {"token": "s3cret"}}))


# ------------------------------------------------------------------------ lint, schema


@pytest.mark.parametrize("values", [None, GPU_VALUES, {"ingress": INGRESS}],
                         ids=["default", "gpu", "ingress"])
def test_lint_is_clean(values: dict | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not report["errors"], report


def test_values_and_schema_agree(chart: helm.Chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"]), "every value has a schema and vice versa"
    jsonschema.Draft7Validator(schema).validate(values)
    jsonschema.Draft7Validator(schema).validate(merge(values, GPU_VALUES))
    chart.validate_schema(GPU_VALUES)


def test_versions_agree() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    # the project's version is written once, in pipelines/version.py (pyproject reads it)
    assert meta["appVersion"] == pipelines.__version__, "the image tag defaults to appVersion"
    assert GPU_VALUES["image"]["tag"] == f"{meta['appVersion']}-gpu"


# Values that must fail, and a word the error must name. The first group breaks the schema
# (Helm refuses them before rendering, and so does plain jsonschema); the second passes the
# schema and is refused by the chart's own checks while rendering.
SCHEMA_CASES = [
    ({"serveConfig": "tpu"}, "serveConfig"),
    ({"gpuWorkers": {"replicas": -1}}, "gpuWorkers/replicas"),
    ({"cpuWorkers": {"maxReplicas": "4"}}, "cpuWorkers/maxReplicas"),
    ({"gpuWorkers": {"gpusPerPod": 0}}, "gpuWorkers/gpusPerPod"),
    ({"autoscaling": {"enabled": "yes"}}, "autoscaling/enabled"),
    ({"replicas": 3}, "replicas"),
    ({"image": {"repository": ""}}, "image/repository"),
    ({"image": {"repository": None}}, "repository"),
    ({"image": {"tag": "latest"}}, "image/tag"),
    ({"image": {"repository": "headscope:0.1.0"}}, "image/repository"),
    ({"cpuWorkers": {"resources": {"limits": {"cpu": "lots"}}}}, "cpuWorkers/resources"),
    ({"gpuWorkers": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}, "gpuWorkers/resources"),
    ({"head": {"resource": {}}}, "resource"),
    ({"service": {"type": "ExternalName"}}, "service/type"),
    ({"ingress": {"path": "api"}}, "ingress/path"),
    ({"rayVersion": "2.60"}, "rayVersion"),
]
TEMPLATE_CASES = [
    ({"serveConfig": "gpu"}, "gpuWorkers.enabled"),
    ({"cpuWorkers": {"replicas": 9}}, "cpuWorkers: needs minReplicas <= replicas <= maxReplicas"),
    ({"cpuWorkers": {"enabled": False}}, "no pod can run Serve replicas"),
    ({"auth": {"token": "t", "existingSecret": "s"}}, "not both"),
]


@pytest.mark.parametrize(("values", "field"), SCHEMA_CASES,
                         ids=[field for _, field in SCHEMA_CASES])
def test_bad_values_fail_the_schema(chart: helm.Chart, values: dict, field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE)
    assert field in str(info.value)
    report = helm.lint(CHART, values)
    assert any(field in error for error in report["errors"]), report
    schema = json.loads((CHART / "values.schema.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(merge(chart.values, values)))
    assert errors, "jsonschema accepted values that Helm refused"
    where = ["/".join(map(str, e.absolute_path)) + " " + e.message for e in errors]
    assert any(field.split("/")[-1] in w for w in where), where


@pytest.mark.parametrize(("values", "message"), TEMPLATE_CASES,
                         ids=[m.split(":")[0][:30] for _, m in TEMPLATE_CASES])
def test_inconsistent_values_fail_the_render(chart: helm.Chart, values: dict,
                                             message: str) -> None:
    chart.validate_schema(values)
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE)


# -------------------------------------------------------- what the default render holds


def test_default_render_objects(default: Rendered) -> None:
    assert set(default.objects) == {"RayService"}, "no token, no Ingress by default"
    assert "OFF. No token is configured" in default.notes
    assert f"port-forward svc/{FULLNAME}-serve-svc 8000:8000" in default.notes
    groups = default.groups()
    assert set(groups) == {"head", "cpu"}
    assert groups["cpu"]["minReplicas"] <= groups["cpu"]["replicas"] <= \
        groups["cpu"]["maxReplicas"]
    pod = default.pods()["cpu"]["spec"]
    assert pod["containers"][0]["image"] == "headscope:0.1.0"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "env" not in pod["containers"][0], "auth off: no token variable"
    assert pod["volumes"] == [{"name": "headscope-data", "emptyDir": {}}]


@pytest.mark.parametrize("render", ["default", "gpu"])
def test_rayservice_structure(render: str, request: pytest.FixtureRequest) -> None:
    """What KubeRay's RayService (ray.io/v1) requires, and only fields it knows."""
    rendered: Rendered = request.getfixturevalue(render)
    service = rendered.rayservice
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["metadata"]["name"] == FULLNAME
    assert set(service) == {"apiVersion", "kind", "metadata", "spec"}
    spec = service["spec"]
    assert set(spec) == {"serveConfigV2", "serveService", "rayClusterConfig"}
    assert isinstance(spec["serveConfigV2"], str)
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                            "headGroupSpec", "workerGroupSpecs"}
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert set(cluster["autoscalerOptions"]) <= {"idleTimeoutSeconds", "upscalingMode"}
    head = cluster["headGroupSpec"]
    assert set(head) == {"rayStartParams", "template"}
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    assert cluster["workerGroupSpecs"], "the head runs no replicas: workers must"
    for group in cluster["workerGroupSpecs"]:
        assert set(group) == {"groupName", "replicas", "minReplicas", "maxReplicas",
                              "rayStartParams", "template"}
        counts = [group[k] for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(n, int) for n in counts) and counts == sorted(counts)
    for name, group in rendered.groups().items():
        # rayStartParams is a map of strings in the CRD: an unquoted 0 would be refused.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        containers = group["template"]["spec"]["containers"]
        assert containers[0]["name"] == f"ray-{'head' if name == 'head' else 'worker'}"
        ports = {p["name"]: p["containerPort"] for p in containers[0]["ports"]}
        assert ports["serve"] == 8000, "KubeRay finds Serve by the port named serve"
        if name == "head":
            assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001,
                             "serve": 8000}


@pytest.mark.parametrize("render", ["default", "gpu"])
def test_core_objects_validate(render: str, request: pytest.FixtureRequest) -> None:
    rendered: Rendered = request.getfixturevalue(render)
    objects = [obj for kind, obj in rendered.objects.items() if kind != "RayService"]
    objects += [rendered.serve_service(), *rendered.pods().values()]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert len(objects) == {"default": 3, "gpu": 5}[render]  # + Secret and Ingress with gpu


def test_validation_is_strict(default: Rendered) -> None:
    """The check above can fail: a misspelt field in a pod template is refused."""
    pod = copy.deepcopy(default.pods()["head"])
    pod["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


# ------------------------------------------------------------ the Serve config it sends


@pytest.mark.parametrize("render", ["default", "gpu"])
def test_serve_config_is_the_deploy_file(render: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    rendered: Rendered = request.getfixturevalue(render)
    name = "cpu" if render == "default" else "gpu"
    deploy_file = ROOT / "deploy" / f"serve-{name}.yaml"
    sent = rendered.rayservice["spec"]["serveConfigV2"]
    assert sent == deploy_file.read_text(), "the chart applies no overrides to the file"
    parsed = yaml.safe_load(sent)
    ServeDeploySchema.model_validate(parsed)
    app = next(a for a in parsed["applications"] if a["import_path"] == "service.app:build")
    config = ServiceConfig.model_validate(app["args"])
    (tmp_path / "sent.yaml").write_text(sent)
    assert read_serve_file(tmp_path / "sent.yaml") == read_serve_file(deploy_file)
    # The chart's pods follow the file: volume at dataset_root, Serve port, token variable.
    for pod in rendered.pods().values():
        container = pod["spec"]["containers"][0]
        assert container["volumeMounts"] == [{"name": "headscope-data",
                                              "mountPath": config.dataset_root}]
        if "env" in container:
            assert [e["name"] for e in container["env"]] == [config.auth_token_env]


def test_chart_follows_an_edited_serve_file(tmp_path: Path) -> None:
    """Port and dataset_root come from the file; a relative dataset_root is refused."""
    copy_dir = tmp_path / "headscope"
    shutil.copytree(CHART, copy_dir)
    serve_file = copy_dir / "serve" / "cpu.yaml"
    text = serve_file.read_text()
    serve_file.write_text(text.replace("port: 8000", "port: 8123")
                          .replace("/data/headscope", "/srv/hs"))
    with helm.Chart.load(copy_dir) as edited:
        rendered = Rendered(edited)
        assert rendered.serve_service()["spec"]["ports"] == [
            {"name": "serve", "port": 8123, "targetPort": "serve"}]
        for pod in rendered.pods().values():
            container = pod["spec"]["containers"][0]
            assert {"name": "serve", "containerPort": 8123} in container["ports"]
            assert container["volumeMounts"][0]["mountPath"] == "/srv/hs"
    serve_file.write_text(text.replace("/data/headscope", "service_data"))
    with helm.Chart.load(copy_dir) as edited, \
            pytest.raises(helm.HelmRenderError, match="dataset_root must be an absolute path"):
        edited.render(name=RELEASE)


# ------------------------------------------------------------------- GPU, auth, Ingress


def test_gpu_workers(gpu: Rendered) -> None:
    groups = gpu.groups()
    assert set(groups) == {"head", "gpu"}
    pod = gpu.pods()["gpu"]["spec"]
    assert pod["containers"][0]["image"] == "headscope:0.1.0-gpu"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert "tolerations" not in gpu.pods()["head"]["spec"], "the head needs no GPU node"
    config, _ = read_serve_file(ROOT / "deploy" / "serve-gpu.yaml")
    assert groups["gpu"]["maxReplicas"] >= config.models[0].autoscaling.max_replicas


def test_token_secret(gpu: Rendered) -> None:
    secret = gpu.objects["Secret"]
    assert secret["metadata"]["name"] == f"{FULLNAME}-auth"
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    for pod in gpu.pods().values():  # the ingress replica may land on any pod
        assert pod["spec"]["containers"][0]["env"] == [{
            "name": "HEADSCOPE_API_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": f"{FULLNAME}-auth", "key": "token"}}}]
    assert f"get secret {FULLNAME}-auth" in gpu.notes and "OFF" not in gpu.notes


def test_existing_secret(chart: helm.Chart) -> None:
    rendered = Rendered(chart, {"auth": {"existingSecret": "api", "existingSecretKey": "k"}})
    assert "Secret" not in rendered.objects, "the chart does not own an existing Secret"
    env = rendered.pods()["cpu"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "api", "key": "k"}


def test_ingress(gpu: Rendered) -> None:
    ingress = gpu.objects["Ingress"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == INGRESS["annotations"]
    assert ingress["spec"]["tls"] == [{"secretName": "hs-tls", "hosts": ["hs.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "hs.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-serve-svc", "port": {"name": "serve"}}
    assert gpu.serve_service()["metadata"]["name"] == backend["name"]


def test_service_storage_and_pod_options(chart: helm.Chart) -> None:
    rendered = Rendered(chart, {"service": {"type": "LoadBalancer",
                                            "annotations": {"x.example.com/lb": "internal"}},
                                "storage": {"existingClaim": "hs-data"},
                                "head": {"runWorkloads": True},
                                "cpuWorkers": {"nodeSelector": {"pool": "cpu"}},
                                "imagePullSecrets": ["regcred"],
                                "podSecurityContext": {"fsGroup": 100}})
    service = rendered.serve_service()
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {"x.example.com/lb": "internal"}
    assert "num-cpus" not in rendered.groups()["head"]["rayStartParams"]
    for pod in rendered.pods().values():
        assert pod["spec"]["volumes"] == [{"name": "headscope-data",
                                           "persistentVolumeClaim": {"claimName": "hs-data"}}]
        assert pod["spec"]["securityContext"] == {"fsGroup": 100}
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    assert rendered.pods()["cpu"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert "nodeSelector" not in rendered.pods()["head"]["spec"]
    assert "PersistentVolumeClaim hs-data" in rendered.notes
