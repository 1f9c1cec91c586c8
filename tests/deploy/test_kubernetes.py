"""The Kubernetes manifests (docker/kubernetes/), checked offline against real components.

* Rendering: ``kubectl kustomize`` (kustomize v5 inside kubectl) builds both serving overlays
  (``overlays/gpu``, ``overlays/cpu``), the KServe folder and the training folder.
* Core kinds: every object validates with ``kubernetes-validate`` (the Kubernetes OpenAPI
  schemas it ships, strict: an unknown field is an error) for Kubernetes 1.30, the oldest
  version the manifests are written for, and 1.37.
* Custom resources: no PyPI or Debian package ships the CRD schemas of KServe
  (ServingRuntime, InferenceService) or of the Prometheus Operator (ServiceMonitor, PodMonitor,
  PrometheusRule). :data:`CRD_SCHEMAS` restates, as JSON Schema, the required fields, types,
  enums and patterns of their upstream CRDs (serving.kserve.io v1alpha1/v1beta1,
  monitoring.coreos.com v1) for every field these manifests use, rejecting any other field;
  the core types they embed (a Container, EnvVar, ResourceRequirements, LabelSelector,
  ObjectMeta) are checked against kubernetes-validate's own definitions. A test shows that
  each schema rejects what the API server would.
* The alerts have one source: the PrometheusRule is what ``docker/kubernetes/generate.py``
  makes of ``docker/prometheus/alerts.yml``, byte for byte.
* The manifests agree with each other and with the server: ports, probes, the drain on
  SIGTERM, selectors, the HPA's metric and the prometheus-adapter rule that serves it, the
  job label the alerts select on, the training job's rendezvous.

The two-replica behaviour (load balancer, SIGTERM, metrics summed across replicas) is
tests/deploy/test_replicas.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from promql import ALERTS, METRICS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "kubernetes"
RENDERED = ("overlays/gpu", "overlays/cpu", "kserve", "training")
PLAIN_FILES = ("prometheus-adapter/rules.yaml", "publish/models-publisher.yaml")
K8S_VERSIONS = ("1.30", "1.37")
# What the server does on SIGTERM (docs/service.md): stop accepting, answer what it accepted
# within MONDEQ_GRACEFUL_TIMEOUT_S, exit 0.
GRACEFUL_TIMEOUT_S = 30
PRESTOP_SLEEP_S = 10
HTTP_PORT, GRPC_PORT = 8000, 8001

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extras (make test)"
)


# ---- rendering -------------------------------------------------------------------------------
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    return found


_rendered: dict[str, list[dict]] = {}


def render(folder: str) -> list[dict]:
    """The objects ``kubectl kustomize docker/kubernetes/<folder>`` builds."""
    if folder not in _rendered:
        out = subprocess.run(
            [kubectl(), "kustomize", str(K8S / folder)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        _rendered[folder] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return copy.deepcopy(_rendered[folder])


def plain(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def all_objects() -> list[tuple[str, dict]]:
    out = [(folder, o) for folder in RENDERED for o in render(folder)]
    out += [(path, o) for path in PLAIN_FILES for o in plain(path)]
    return out


# ---- schemas of the custom resources -----------------------------------------------------------
def _ref(name: str) -> dict:
    return {"$ref": f"/api/_definitions.json#/$defs/{name}"}


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_INT_OR_STR = {"type": ["integer", "string"]}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The Prometheus Operator's duration pattern (monitoring.coreos.com CRDs).
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_RELABEL = _obj(
    {
        "action": {
            "enum": [
                *("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep"),
                *("lowercase", "uppercase", "keepequal", "dropequal"),
            ]
        },
        "sourceLabels": {"type": "array", "items": _STR},
        "separator": _STR,
        "targetLabel": _STR,
        "regex": _STR,
        "modulus": _INT,
        "replacement": _STR,
    }
)
_SCRAPE = {
    "path": _STR,
    "scheme": {"enum": ["http", "https"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": _BOOL,
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
}
_SELECTOR = _ref("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")
_NAMESPACES = _obj({"any": _BOOL, "matchNames": {"type": "array", "items": _STR}})


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://kubernetes.io/api/mondeq-crds.json",
        **_obj(
            {
                "apiVersion": {"const": api_version},
                "kind": {"const": kind},
                "metadata": _ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                "spec": spec,
            },
            ("apiVersion", "kind", "metadata", "spec"),
        ),
    }


CRD_SCHEMAS: dict[tuple[str, str], dict] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _obj(
            {
                "jobLabel": _STR,
                "targetLabels": {"type": "array", "items": _STR},
                "podTargetLabels": {"type": "array", "items": _STR},
                "selector": _SELECTOR,
                "namespaceSelector": _NAMESPACES,
                "endpoints": {
                    "type": "array",
                    "items": _obj({"port": _STR, "targetPort": _INT_OR_STR} | _SCRAPE),
                },
            },
            ("selector",),
        ),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _resource(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        _obj(
            {
                "jobLabel": _STR,
                "podTargetLabels": {"type": "array", "items": _STR},
                "selector": _SELECTOR,
                "namespaceSelector": _NAMESPACES,
                "podMetricsEndpoints": {
                    "type": "array",
                    "items": _obj({"port": _STR, "portNumber": _INT} | _SCRAPE),
                },
            },
            ("selector",),
        ),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _obj(
            {
                "groups": {
                    "type": "array",
                    "items": _obj(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "labels": _MAP,
                            "limit": _INT,
                            "query_offset": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    **_obj(
                                        {
                                            "alert": _STR,
                                            "record": _STR,
                                            "expr": {"type": ["integer", "string"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _MAP,
                                            "annotations": _MAP,
                                        },
                                        ("expr",),
                                    ),
                                    # "Only one of record and alert must be set."
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                },
                            },
                        },
                        ("name",),
                    ),
                }
            }
        ),
    ),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): _resource(
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
        _obj(
            {
                "supportedModelFormats": {
                    "type": "array",
                    "items": _obj(
                        {"name": _STR, "version": _STR, "autoSelect": _BOOL, "priority": _INT},
                        ("name",),
                    ),
                },
                "protocolVersions": {
                    "type": "array",
                    "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                },
                "multiModel": _BOOL,
                "disabled": _BOOL,
                "annotations": _MAP,
                "labels": _MAP,
                "nodeSelector": _MAP,
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _ref("io.k8s.api.core.v1.Container"),
                },
                "volumes": {"type": "array", "items": _ref("io.k8s.api.core.v1.Volume")},
                "tolerations": {"type": "array", "items": _ref("io.k8s.api.core.v1.Toleration")},
            },
            ("containers",),
        ),
    ),
    ("serving.kserve.io/v1beta1", "InferenceService"): _resource(
        "serving.kserve.io/v1beta1",
        "InferenceService",
        _obj(
            {
                "predictor": _obj(
                    {
                        "minReplicas": {"type": "integer", "minimum": 0},
                        "maxReplicas": {"type": "integer", "minimum": 0},
                        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                        "scaleTarget": _INT,
                        "containerConcurrency": _INT,
                        "timeout": _INT,
                        "terminationGracePeriodSeconds": _INT,
                        "serviceAccountName": _STR,
                        "nodeSelector": _MAP,
                        "tolerations": {
                            "type": "array",
                            "items": _ref("io.k8s.api.core.v1.Toleration"),
                        },
                        "model": _obj(
                            {
                                "modelFormat": _obj({"name": _STR, "version": _STR}, ("name",)),
                                "runtime": _STR,
                                "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                                "storageUri": _STR,
                                "env": {
                                    "type": "array",
                                    "items": _ref("io.k8s.api.core.v1.EnvVar"),
                                },
                                "resources": _ref("io.k8s.api.core.v1.ResourceRequirements"),
                            },
                            ("modelFormat",),
                        ),
                    }
                )
            },
            ("predictor",),
        ),
    ),
}


def validate(obj: dict, version: str) -> None:
    """A core kind with kubernetes-validate (strict); a custom one with :data:`CRD_SCHEMAS`
    over kubernetes-validate's core definitions of the same version. Raises
    ``jsonschema.ValidationError``."""
    import jsonschema
    import referencing
    from kubernetes_validate.utils import schema_contents

    key = (obj["apiVersion"], obj["kind"])
    if key not in CRD_SCHEMAS:
        kubernetes_validate.validate(obj, version, strict=True)
        return
    full = next(v for v in kubernetes_validate.utils.all_versions() if v.startswith(version))
    definitions = schema_contents(f"kubernetes-json-schema/v{full}-local-strict/_definitions.json",
                                  version)  # fmt: skip
    schema = CRD_SCHEMAS[key]
    registry = referencing.Registry().with_resources(
        [
            (definitions["$id"], referencing.Resource.from_contents(definitions)),
            (schema["$id"], referencing.Resource.from_contents(schema)),
        ]
    )
    jsonschema.Draft202012Validator(schema, registry=registry).validate(obj)


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", RENDERED)
def test_kustomize_renders(folder):
    objects = render(folder)
    assert objects
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mondeq", o["kind"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates(version):
    kinds = set()
    for where, obj in all_objects():
        try:
            validate(obj, version)
        except Exception as e:  # name the object: a bare schema error does not
            raise AssertionError(f"{where}: {obj['kind']} {obj['metadata']['name']}: {e}") from e
        kinds.add(obj["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "PersistentVolumeClaim", "Job", "ConfigMap", "Pod", "ServiceMonitor", "PodMonitor",
            "PrometheusRule", "ServingRuntime", "InferenceService"} <= kinds  # fmt: skip


def _break(objects: list[dict], kind: str, change) -> dict:
    o = one(objects, kind)
    change(o)
    return o


BROKEN = {
    "Deployment without a selector": lambda: _break(
        render("overlays/gpu"), "Deployment", lambda o: o["spec"].pop("selector")
    ),
    "container port as a string": lambda: _break(
        render("overlays/gpu"),
        "Deployment",
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
            containerPort="8000"
        ),
    ),
    "ServingRuntime without containers": lambda: _break(
        render("kserve"), "ServingRuntime", lambda o: o["spec"].pop("containers")
    ),
    "ServingRuntime container with an unknown field": lambda: _break(
        render("kserve"),
        "ServingRuntime",
        lambda o: o["spec"]["containers"][0].update(readiness={}),
    ),
    "ServingRuntime protocol v3": lambda: _break(
        render("kserve"), "ServingRuntime", lambda o: o["spec"].update(protocolVersions=["v3"])
    ),
    "InferenceService model without modelFormat": lambda: _break(
        render("kserve"),
        "InferenceService",
        lambda o: o["spec"]["predictor"]["model"].pop("modelFormat"),
    ),
    "ServiceMonitor without selector": lambda: _break(
        render("overlays/cpu"), "ServiceMonitor", lambda o: o["spec"].pop("selector")
    ),
    "ServiceMonitor interval 5 seconds": lambda: _break(
        render("overlays/cpu"),
        "ServiceMonitor",
        lambda o: o["spec"]["endpoints"][0].update(interval="5 seconds"),
    ),
    "PodMonitor without selector": lambda: _break(
        render("kserve"), "PodMonitor", lambda o: o["spec"].pop("selector")
    ),
    "PrometheusRule rule without expr": lambda: _break(
        render("overlays/cpu"),
        "PrometheusRule",
        lambda o: o["spec"]["groups"][0]["rules"][0].pop("expr"),
    ),
    "PrometheusRule rule both alert and record": lambda: _break(
        render("overlays/cpu"),
        "PrometheusRule",
        lambda o: o["spec"]["groups"][0]["rules"][0].update(record="x"),
    ),
    "PrometheusRule for: 5 min": lambda: _break(
        render("overlays/cpu"),
        "PrometheusRule",
        lambda o: o["spec"]["groups"][0]["rules"][0].update({"for": "5 min"}),
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_the_schemas_reject_what_the_api_server_would(case):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate(BROKEN[case](), K8S_VERSIONS[0])


def test_the_prometheus_rule_is_generated_from_the_alerts_file():
    sys.path.insert(0, str(K8S))
    try:
        import generate
    finally:
        sys.path.remove(str(K8S))
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == generate.render(), "run .venv/bin/python docker/kubernetes/generate.py"
    rule = yaml.safe_load(committed)
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    (rendered,) = [o for o in render("overlays/gpu") if o["kind"] == "PrometheusRule"]
    assert rendered["spec"] == rule["spec"]


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_the_server_pods(overlay):
    objects = render(overlay)
    deployment = one(objects, "Deployment", "mondeq")
    pod = deployment["spec"]["template"]["spec"]
    c = container(pod, "mondeq")
    variables = env(c)

    # One GPU per pod on the GPU overlay, none on the CPU one; the device is never guessed.
    limits = c["resources"]["limits"]
    if overlay == "overlays/gpu":
        assert limits["nvidia.com/gpu"] == "1" == c["resources"]["requests"]["nvidia.com/gpu"]
        assert variables["MONDEQ_DEVICE"] == "cuda"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in pod
        assert variables["MONDEQ_DEVICE"] == "cpu"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]

    # Ports, probes, the model repository, the admin token from a file.
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {
        ("http", HTTP_PORT),
        ("grpc", GRPC_PORT),
    }
    assert variables["MONDEQ_PORT"] == str(HTTP_PORT)
    assert variables["MONDEQ_GRPC_PORT"] == str(GRPC_PORT)
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["command"] == ["mondeq", "serve"]
    assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
    token_file = Path(c["args"][c["args"].index("--admin-token-file") + 1])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["admin-token"]["mountPath"] == str(token_file.parent)
    assert token_file.name in ("admin-token",)
    assert volumes["admin-token"]["secret"]["secretName"] == "mondeq-admin-token"
    assert mounts["models"]["mountPath"] == variables["MONDEQ_MODEL_DIR"] == "/models"
    assert mounts["models"]["readOnly"] is True
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]

    # The drain: preStop, then SIGTERM and the server's graceful timeout, within the grace period.
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_S)]
    assert variables["MONDEQ_GRACEFUL_TIMEOUT_S"] == str(GRACEFUL_TIMEOUT_S)
    grace = pod["terminationGracePeriodSeconds"]
    assert PRESTOP_SLEEP_S + GRACEFUL_TIMEOUT_S < grace <= PRESTOP_SLEEP_S + GRACEFUL_TIMEOUT_S + 10

    # Non-root, as the image's user.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_service_pdb_hpa_and_monitor_select_the_server(overlay):
    objects = render(overlay)
    deployment = one(objects, "Deployment", "mondeq")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = one(objects, "Service", "mondeq")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (HTTP_PORT, "http"), "grpc": (GRPC_PORT, "grpc")}

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "mondeq",
    }
    # An eviction allowed by the PDB always leaves a pod serving.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"] >= 1

    # The ServiceMonitor scrapes the Service's http port, and its job label is "mondeq", the
    # job the alerts and the dashboard select on.
    monitor = one(objects, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "mondeq"
    alerts = ALERTS.read_text()
    assert 'up{job="mondeq"}' in alerts


def test_the_hpa_metric_is_served_by_the_adapter_rule():
    (hpa_metric,) = one(render("overlays/gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert hpa_metric["type"] == "Pods"
    config = yaml.safe_load(one(plain("prometheus-adapter/rules.yaml"), "ConfigMap")["data"]
                            ["config.yaml"])  # fmt: skip
    (rule,) = config["rules"]
    assert rule["name"]["as"] == hpa_metric["pods"]["metric"]["name"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert METRICS[series] == "gauge"  # a per-pod value, averaged by the query
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_kserve_runtime_and_inference_service():
    objects = render("kserve")
    runtime = one(objects, "ServingRuntime", "mondeq")["spec"]
    isvc = one(objects, "InferenceService", "mondeq")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "mondeq"
    assert {"name": "mondeq", "version": "1", "autoSelect": True} in runtime[
        "supportedModelFormats"
    ]
    assert model["modelFormat"]["name"] == "mondeq"
    assert {"v2", "grpc-v2"} <= set(runtime["protocolVersions"])
    assert model["protocolVersion"] == "v2"
    # Two ports need RawDeployment (Knative allows one per container).
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert model["storageUri"] == "pvc://mondeq-models"
    (c,) = runtime["containers"]
    assert c["name"] == "kserve-container"
    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {
        ("http", HTTP_PORT),
        ("grpc", GRPC_PORT),
    }
    # KServe mounts the storageUri at /mnt/models: the server's repository.
    assert c["args"][c["args"].index("--model-dir") + 1] == "/mnt/models"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert env(c)["MONDEQ_GRACEFUL_TIMEOUT_S"] == str(GRACEFUL_TIMEOUT_S)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_S)]
    grace = isvc["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert grace > PRESTOP_SLEEP_S + GRACEFUL_TIMEOUT_S
    assert runtime["annotations"]["prometheus.kserve.io/port"] == str(HTTP_PORT)
    assert isvc["spec"]["predictor"]["minReplicas"] >= 2
    monitor = one(objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]
    }
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "mondeq"} in endpoint[
        "relabelings"
    ]


def test_the_training_job_resumes_on_shared_storage():
    objects = render("training")
    job = one(objects, "Job", "mondeq-train")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    variables = env(c)
    script = " ".join(c["command"] + c["args"])

    # An indexed Job of N pods, each one torchrun agent of N nodes.
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(variables["NNODES"]) >= 2
    assert '--nnodes="$NNODES"' in script
    # The c10d rendezvous at pod 0, reached by name through the headless Service.
    service = one(objects, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    endpoint = re.search(r"--rdzv-endpoint=(\S+):(\d+)", script)
    assert endpoint.group(1) == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert int(endpoint.group(2)) == service["spec"]["ports"][0]["port"]
    assert "--rdzv-backend=c10d" in script and "--max-restarts=" in script
    assert spec["backoffLimit"] >= 1  # a pod lost with its node is recreated

    # The run folder on shared storage; a start with a checkpoint resumes it.
    assert variables["PRESET"] in ("cifar-conv-lg", "cifar-multitier-lg")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert variables["RUN"].startswith(mounts["runs"] + "/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["runs"]["persistentVolumeClaim"]["claimName"]
    assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert 'if [ -f "$RUN/last.pt" ]; then exec python -m training --resume "$RUN";' in script
    assert '--preset "$PRESET"' in script and '--out "$RUN"' in script
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_training_command_lines_parse_as_mondeq_train():
    """The shell line is valid sh, and its two branches are ``python -m training`` (≡ ``mondeq
    train``) command lines that the real parser accepts, with the preset and the run folder."""
    import shlex

    from mondeq_cli.main import build_parser

    c = one(render("training"), "Job")["spec"]["template"]["spec"]["containers"][0]
    variables = env(c)
    inner = re.search(r"--no-python /bin/sh -c '(.+)'$", c["args"][0], re.S).group(1)
    out = subprocess.run(
        ["/bin/sh", "-n", "-c", inner], capture_output=True, text=True, timeout=10, check=False
    )
    assert out.returncode == 0, out.stderr
    branches = re.findall(r"exec python -m training ([^;]+?)\s*(?:;|$)", inner)
    assert len(branches) == 2, inner
    parsed = []
    for branch in branches:
        words = shlex.split(branch.replace('"$RUN"', variables["RUN"])
                            .replace('"$PRESET"', variables["PRESET"]))  # fmt: skip
        parsed.append(build_parser().parse_args(["train", *words]))
    resume, fresh = parsed
    assert str(resume.resume) == variables["RUN"]
    assert (fresh.preset, fresh.out, fresh.resume) == (variables["PRESET"], variables["RUN"], None)
