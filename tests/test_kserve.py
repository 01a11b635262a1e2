"""deploy/kserve/: the InferenceService, validated offline against KServe's CRD schema (vendored
from kserve/kserve, deploy/kserve/schema/) and its pod against Kubernetes' own schemas."""
from __future__ import annotations

import copy
import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helpers import ROOT

KSERVE_DIR = ROOT / "deploy" / "kserve"
SCHEMA = json.loads((KSERVE_DIR / "schema" / "inferenceservice-v1beta1.json").read_text())
K8S_VERSIONS = ("1.31.0", "1.37.0")  # as deploy/k8s/: the oldest promised and the newest known
# Predictor fields that KServe copies into the pod's spec (the rest are KServe's own).
KSERVE_ONLY = {"minReplicas", "maxReplicas", "scaleMetric", "scaleMetricType", "scaleTarget",
               "containerConcurrency", "timeout", "canaryTrafficPercent", "batcher", "logger",
               "autoScaling", "deploymentStrategy", "storageUris", "annotations", "labels", "name"}


def strict(schema):
    """The CRD schema as the API server applies it with strict field validation: an object that
    lists its properties admits no others (unless it says it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


VALIDATOR = jsonschema.Draft4Validator(strict(SCHEMA["openAPIV3Schema"]))


def inference_service() -> dict:
    documents = [d for d in yaml.safe_load_all((KSERVE_DIR / "inferenceservice.yaml").read_text()) if d]
    assert len(documents) == 1
    return documents[0]


def kserve_errors(document: dict) -> list[str]:
    if document.get("apiVersion") != f"{SCHEMA['group']}/{SCHEMA['version']}" or document.get("kind") != SCHEMA["kind"]:
        return [f"not a {SCHEMA['kind']} {SCHEMA['group']}/{SCHEMA['version']}"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


def pod_of(service: dict) -> dict:
    """The pod KServe makes of the predictor: its pod-spec fields under the service's metadata."""
    predictor = service["spec"]["predictor"]
    metadata = {k: service["metadata"][k] for k in ("name", "namespace", "labels", "annotations")}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {k: v for k, v in predictor.items() if k not in KSERVE_ONLY}}


def test_the_vendored_schema_says_where_it_comes_from():
    assert re.search(r"kserve/kserve [0-9a-f]{40}", SCHEMA["$comment"])
    predictor = SCHEMA["openAPIV3Schema"]["properties"]["spec"]["properties"]["predictor"]["properties"]
    assert {"containers", "canaryTrafficPercent", "scaleMetric", "minReplicas"} <= set(predictor)


def test_the_inference_service_validates_against_kserves_crd_schema():
    assert kserve_errors(inference_service()) == []


@pytest.mark.parametrize("break_it, complaint", [
    (lambda p: p.__setitem__("canaryTrafficPercnt", 10), "Additional properties"),  # a typo
    (lambda p: p.__setitem__("scaleMetric", "latency"), "is not one of"),
    (lambda p: p["containers"][0]["readinessProbe"].__setitem__("periodSecond", 5), "Additional properties"),
    (lambda p: p.__setitem__("minReplicas", "two"), "is not of type"),
    (lambda p: p.__setitem__("sklearn", {"storageUri": "gs://x"}), "Additional properties"),
])
def test_the_crd_validation_catches_mistakes(break_it, complaint):
    broken = inference_service()
    break_it(broken["spec"]["predictor"])
    errors = kserve_errors(broken)
    assert errors and any(complaint in e for e in errors), errors


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_its_pod_validates_against_kubernetes_own_schema(version):
    pod = pod_of(inference_service())
    kubernetes_validate.validate(pod, version, strict=True)
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/v2/health/live"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_inference_service_holds_the_deployment_decisions():
    service = inference_service()
    predictor = service["spec"]["predictor"]
    container = predictor["containers"][0]
    # The project's image (the one deploy/k8s/ runs), in its Open Inference Protocol mode.
    k8s = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    assert container["image"] == k8s["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["args"] == ["oip"]
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    assert re.search(r"oip serve .*--http-port 8080 --grpc-port 8081", entrypoint)
    # KServe's ports and the protocol's health routes as probes.
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/models/mnist/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    # The archive is verified at start against a public key the cluster provides.
    env = {e["name"]: e.get("value") for e in container["env"]}
    key_dir = env["MNIST_SIGNING_PUBLIC_KEY"].rsplit("/", 1)[0]
    assert any(m["mountPath"] == key_dir and m["readOnly"] for m in container["volumeMounts"])
    # ... the archive's digest pinned, as in deploy/k8s/, and the served-release record writable
    # on a read-only root (the image's MNIST_BUNDLE_STATE_DIR is under /app/run).
    assert re.fullmatch(r"[0-9a-f]{64}", env["EXPECTED_SHA256"])
    assert re.search(r'oip serve (?:[^\n]|\\\n)*--expect-sha256 "\$EXPECTED_SHA256"', entrypoint)  # one command
    assert any(m["mountPath"] == "/app/run" for m in container["volumeMounts"])
    assert "MNIST_BUNDLE_STATE_DIR=/app/run/state" in (ROOT / "deploy" / "Dockerfile").read_text()
    # Resources, autoscaling on a request metric, a canary split.
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    assert predictor["scaleMetric"] in ("rps", "concurrency") and predictor["scaleTarget"] > 0
    assert 2 <= predictor["minReplicas"] < predictor["maxReplicas"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
