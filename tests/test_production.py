"""Production: Prometheus metrics, truthful probes, the Kubernetes manifests, the gateway's single
token for N replicas, and a model update under load that loses no request. Real TorchServes,
a real nginx, real images."""
from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import kubernetes_validate
import numpy as np
import psutil
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from contract import TOLERANCE
from serve import gateway
from serve.client import read_properties
from serve.process import TorchServeProcess, free_ports
from tests.helpers import ROOT, BackgroundClients, encode_image, report, run_module, tampered_copy


# ---------------------------------------------------------------- metrics

def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of <metrics_url>/metrics, parsed by prometheus_client: (name, labels) -> value.

    The parser names a counter's samples <name>_total, whether TorchServe wrote the suffix or not.
    """
    response = requests.get(f"{server.metrics_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("Hostname", "hostname")))
            samples[(sample.name, labels)] = sample.value
    return samples


def total(samples, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab))


@pytest.mark.torchserve
@pytest.mark.slow
def test_metrics_count_good_and_bad_requests_by_status(server, test_pngs):
    pngs, _ = test_pngs
    too_many_pixels = encode_image(np.zeros((5000, 5000), np.uint8), "PNG")  # handler's 413
    over_one_mib = b"\0" * 1_100_000  # the frontend's own 413, before the handler
    before = scrape(server)
    statuses = [server.predict(png, "image/png").status_code for png in pngs[:5]]
    statuses += [server.predict(b"not an image", "application/octet-stream").status_code for _ in range(2)]
    statuses += [server.predict(too_many_pixels, "image/png").status_code,
                 server.predict(over_one_mib, "application/octet-stream").status_code]
    assert statuses == [200] * 5 + [400, 400, 413, 413]

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    # The worker's metrics reach the frontend through its log, a moment after the responses.
    deadline = time.monotonic() + 15
    while True:
        after = scrape(server)
        arrived = delta("mnist_decode_milliseconds_count") >= 8 and delta("mnist_model_milliseconds_count") >= 5
        if arrived or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The handler's metrics (metrics.yaml, model_metrics): 8 requests reached it one at a time.
    assert delta("mnist_requests_total", Status="200") == 5
    assert delta("mnist_requests_total", Status="400") == 2
    assert delta("mnist_requests_total", Status="413") == 1
    assert delta("mnist_batch_size_count") == 8 and delta("mnist_batch_size_sum") == 8
    assert delta("mnist_decode_milliseconds_count") == 8 and delta("mnist_decode_milliseconds_sum") > 0
    assert delta("mnist_model_milliseconds_count") == 5  # batches with a valid image only
    # TorchServe's own: requests that reached the model, their latency, answers by status class.
    assert delta("ts_inference_requests_total", model_name="mnist") == 8
    assert delta("ts_inference_latency_microseconds_total", model_name="mnist") > 0
    # 2 x 400 and the handler's 413; the frontend's 413 for a body over max_request_size is
    # refused before TorchServe counts anything (seen here), so only a proxy in front sees those.
    assert delta("Requests4XX_total") == 3
    assert delta("Requests2XX_total") >= 5
    report(f"metrics: handler model time per batch (batch 1) "
           f"{delta('mnist_model_milliseconds_sum') / 5:.2f} ms, decode per request "
           f"{delta('mnist_decode_milliseconds_sum') / 8:.2f} ms (means of 5 and 8 sequential requests; "
           f"the 8 include a 25-megapixel PNG)")


# ---------------------------------------------------------------- probes

def probe(kind: str, process: TorchServeProcess) -> tuple[int, str]:
    """`python -m serve.probe kind`, as the Deployment's exec probes run it."""
    result = subprocess.run([sys.executable, "-m", "serve.probe", kind,
                             "--config", str(process.workdir / "config.properties")],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.torchserve
@pytest.mark.slow
def test_probes_say_ready_and_live_for_a_serving_model(torchserve):
    code, said = probe("ready", torchserve)
    workers = len(torchserve.server.describe()["workers"])
    assert code == 0 and said == f"ready: yes (mnist workers: {', '.join(['READY'] * workers)})\n", said
    code, said = probe("live", torchserve)
    assert code == 0 and "frontend answers (/ping: HTTP 200)" in said


@pytest.mark.torchserve
@pytest.mark.slow
def test_tampered_model_is_live_but_never_ready_and_a_stopped_server_is_neither(artifacts, tmp_path):
    bad = tmp_path / "store" / "mnist.mar"
    tampered_copy(artifacts.mar, bad)
    process = TorchServeProcess(bad.parent, tmp_path / "ts")
    process.start(wait=False)
    try:
        deadline = time.monotonic() + 60
        while probe("live", process)[0] != 0:
            assert time.monotonic() < deadline, "the frontend never answered"
            time.sleep(0.5)
        # The worker fails to load, TorchServe restarts it, again and again: never ready.
        answers = []
        for _ in range(8):
            answers.append(probe("ready", process))
            time.sleep(1)
        assert all(code == 1 for code, _ in answers), answers
        assert probe("live", process)[0] == 0
        ping = requests.get(f"{process.server.inference_url}/ping", timeout=5,
                            headers=process.server.auth("inference"))
        report(f"probes: tampered model: ready 'no' 8 of 8 times over ~{8 + 8 * 0.6:.0f} s, live 'yes'; "
               f"TorchServe's /ping meanwhile: HTTP {ping.status_code} {ping.json().get('status')}")
        log = (tmp_path / "ts" / "logs" / "model_log.log").read_text()
        assert "refusing to serve model.pt" in log
    finally:
        process.stop()
    assert probe("live", process)[0] == 1 and probe("ready", process)[0] == 1


# ---------------------------------------------------------------- the gateway: one token, N replicas

TOKEN_OFF = {"disable_token_authorization": "true"}  # as deploy/container.properties sets it


class Gateway:
    """deploy/gateway.nginx.conf run by Debian's nginx from a private directory, always stopped."""

    def __init__(self, run_dir, token: str):
        self.run, self.token = run_dir, token
        self.ports = free_ports(3)  # inference, management, metrics
        self.port = self.ports[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def write_config(self, replicas) -> None:
        listen = {role: f"127.0.0.1:{port}" for role, port in zip(("inference", "management", "metrics"), self.ports)}
        upstreams = {role: [urlsplit(getattr(r.server, f"{role}_url")).netloc for r in replicas]
                     for role in listen}
        (self.run / "nginx.conf").write_text(gateway.render(self.run, self.token, listen, upstreams))

    def nginx(self, *args: str) -> list[str]:
        return ["nginx", "-p", str(self.run), "-c", str(self.run / "nginx.conf"), *args]

    def start(self, replicas) -> None:
        if shutil.which("nginx") is None:
            pytest.fail("these tests need nginx: apt-get install nginx-light (make install does)")
        self.run.mkdir(parents=True, exist_ok=True)
        self.write_config(replicas)
        subprocess.run(self.nginx("-t", "-q"), check=True, capture_output=True, timeout=30)
        self.process = subprocess.Popen(self.nginx("-g", "daemon off;"), start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.url, timeout=2)
                return
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.1)

    def route_to(self, replicas, drain_timeout: float = 30) -> None:
        """New upstreams by `nginx -s reload`, then wait until the old workers have finished
        their requests and exited: only then may a replica that left the list be stopped."""
        old_workers = self.workers()
        self.write_config(replicas)
        subprocess.run(self.nginx("-s", "reload"), check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + drain_timeout
        while old_workers & self.workers():
            assert time.monotonic() < deadline, "nginx's old workers did not finish"
            time.sleep(0.05)

    def workers(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children()}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def predict(self, body: bytes, token: str | None = None, timeout: float = 30) -> requests.Response:
        # A new connection per request, as from many independent clients (a kept-alive one can
        # be closed under its client by the gateway's reload, and would then need a retry).
        headers = {"Content-Type": "image/png", "Connection": "close"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(f"{self.url}/predictions/mnist", data=body, headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def fleet(artifacts, tmp_path_factory):
    """Two token-off replicas of the model behind the gateway; the rolling-update test replaces them."""
    base = tmp_path_factory.mktemp("fleet")
    fleet = SimpleNamespace(base=base, replicas=[], retired=[],
                            gateway=Gateway(base / "gateway", secrets.token_urlsafe(24)))
    try:
        for name in ("a", "b"):
            fleet.replicas.append(TorchServeProcess(artifacts.model_store, base / name, TOKEN_OFF))
            fleet.replicas[-1].start()
        fleet.gateway.start(fleet.replicas)
        yield fleet
    finally:
        fleet.gateway.stop()
        for replica in fleet.replicas + fleet.retired:
            replica.stop()


@pytest.mark.torchserve
@pytest.mark.gateway
@pytest.mark.slow
def test_one_gateway_token_opens_every_replica_and_nothing_else_does(fleet, server, test_pngs):
    png, gateway = test_pngs[0][0], fleet.gateway
    # No token, a wrong one, or a TorchServe's own inference key (the shared test server's):
    # only the gateway's token passes the gateway.
    for token in (None, "wrong", server.key("inference")):
        response = gateway.predict(png, token)
        assert response.status_code == 401 and "gateway token" in response.json()["error"]
    answered_by = set()
    for _ in range(20):
        response = gateway.predict(png, gateway.token)
        assert response.status_code == 200 and response.json()["label"] == test_pngs[1][0]
        answered_by.add(response.headers["X-Replica"])
    assert answered_by == {urlsplit(r.server.inference_url).netloc for r in fleet.replicas}
    # No key file, no token: a replica itself admits anyone who reaches it. What keeps everyone
    # else out is the NetworkPolicy (tested below) and management on loopback.
    replica = fleet.replicas[0]
    assert not (replica.workdir / "key_file.json").exists()
    assert requests.post(f"{replica.server.inference_url}/predictions/mnist", data=png,
                         headers={"Content-Type": "image/png"}, timeout=30).status_code == 200


# ---------------------------------------------------------------- a model update under load

@pytest.fixture(scope="module")
def new_model(artifacts, tmp_path_factory):
    """A second export: another seed, one epoch on 6,000 images, through the real commands."""
    base = tmp_path_factory.mktemp("new_model")
    # the tutorial's recipe, as the suite's first model: one epoch leaves the two models far apart
    run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(ROOT / "data"), "--recipe", "seed",
               "--epochs", "1", "--seed", "2", "--train-limit", "6000", "--threads", "1", "--checkpoint-dir", str(base / "checkpoints"))
    run_module("export", "build", "--checkpoint", str(base / "checkpoints" / "best.pt"),
               "--build-dir", str(base / "build"), "--data-dir", str(ROOT / "data"))
    run_module("export", "archive", "--build-dir", str(base / "build"), "--model-store", str(base / "model_store"))
    return base / "model_store"


class Load(BackgroundClients):
    """`clients` threads sending 8 real images round and round through the gateway until stopped."""

    def __init__(self, gateway: Gateway, pngs: list[bytes], clients: int = 4):
        self.gateway, self.pngs = gateway, pngs
        self.results: list[tuple[int, int, list | str]] = []  # (image, status, probabilities or error)
        super().__init__(clients)

    def run(self, offset: int) -> None:
        sent = offset
        while not self.stop.is_set():
            image = sent % len(self.pngs)
            try:
                response = self.gateway.predict(self.pngs[image], self.gateway.token)
                answer = response.json()["probabilities"] if response.status_code == 200 else response.text
                self.results.append((image, response.status_code, answer))
            except (requests.RequestException, ValueError) as error:
                self.results.append((image, 0, repr(error)))
            sent += 1


def answers(replica: TorchServeProcess, pngs: list[bytes]) -> np.ndarray:
    """The replica's probabilities for each image, asked directly (not through the gateway)."""
    return np.array([replica.server.predict(png, "image/png").json()["probabilities"] for png in pngs])


@pytest.mark.torchserve
@pytest.mark.gateway
@pytest.mark.slow
def test_rolling_model_update_under_load_loses_no_request(fleet, new_model, test_pngs):
    pngs = test_pngs[0][:8]
    old = answers(fleet.replicas[0], pngs)
    started = time.monotonic()
    with Load(fleet.gateway, pngs) as load:
        time.sleep(1)
        new = None
        for slot in range(len(fleet.replicas)):
            # Surge first, as the Deployment does (maxSurge 1, maxUnavailable 0): the new replica
            # joins only once READY; the old one leaves the gateway, drains, and only then stops.
            replacement = TorchServeProcess(new_model, fleet.base / f"new{slot}", TOKEN_OFF)
            fleet.retired.append(replacement)  # stopped at the end even if this test fails
            replacement.start()
            if new is None:
                new = answers(replacement, pngs)
            routed = [replacement if i == slot else r for i, r in enumerate(fleet.replicas)]
            fleet.gateway.route_to(routed)
            fleet.replicas[slot].stop()
            fleet.replicas = routed
            time.sleep(1)
        time.sleep(1)
    seconds = time.monotonic() - started

    assert np.abs(old - new).max(axis=1).min() > 100 * TOLERANCE, "the two models must be told apart"
    failures = [(image, status, answer) for image, status, answer in load.results if status != 200]
    assert not failures, f"{len(failures)} of {len(load.results)} requests failed: {failures[:5]}"
    came_from = []
    for image, _, probabilities in load.results:
        p = np.array(probabilities)
        from_old = np.abs(p - old[image]).max() <= TOLERANCE
        from_new = np.abs(p - new[image]).max() <= TOLERANCE
        assert from_old != from_new, f"image {image}: an answer from neither model (or both): {p}"
        came_from.append("new" if from_new else "old")
    assert came_from.count("old") > 0 and came_from.count("new") > 0
    assert set(came_from[-20:]) == {"new"}, "after the roll every answer comes from the new model"
    report(f"rolling update (2 replicas behind nginx, 4 clients, this 2-core host): {len(load.results)} "
           f"requests in {seconds:.0f} s, 0 failed, {came_from.count('old')} answered by the old model "
           f"and {came_from.count('new')} by the new one, none by neither")


# ---------------------------------------------------------------- the Kubernetes manifests

K8S_DIR = ROOT / "deploy" / "k8s"
# The oldest Kubernetes release the manifests promise to run on, and the newest the validator knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")


def manifests() -> dict[str, dict]:
    documents = [d for path in sorted(K8S_DIR.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["kind"]: d for d in documents}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_offline_against_pinned_kubernetes(version):
    found = manifests()
    assert set(found) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for document in found.values():
        kubernetes_validate.validate(document, version, strict=True)
    broken = copy.deepcopy(found["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_manifests_hold_the_production_decisions():
    found = manifests()
    deployment, pod = found["Deployment"], found["Deployment"]["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    # Probes: readiness and startup ask for a READY worker, liveness for a frontend that answers.
    # PYTHONPATH for the probes alone: the server imports the contract/ of its signed archive
    probe = ["env", "PYTHONPATH=/app", "python3", "-m", "serve.probe"]
    assert container["readinessProbe"]["exec"]["command"][:6] == probe + ["ready"]
    assert container["startupProbe"]["exec"]["command"][:6] == probe + ["ready"]
    assert container["livenessProbe"]["exec"]["command"][:6] == probe + ["live"]
    assert "PYTHONPATH" not in {e["name"] for e in container.get("env", [])}
    # Non-root, nothing writable but its volumes, no privileges: the image's user.
    user = re.search(r"^USER (\d+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M).group(1)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(user)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Only inference and metrics leave the pod; management (8081) stays on loopback.
    container_props = read_properties(ROOT / "deploy" / "container.properties")
    assert {p["containerPort"] for p in container["ports"]} == {8080, 8082}
    assert urlsplit(container_props["management_address"]).hostname == "127.0.0.1"
    assert container_props["disable_token_authorization"] == "true"
    # Tokens are off in the pod, so the NetworkPolicy admits the gateway alone to 8080,
    # Prometheus alone to 8082, and no one else; the pods connect nowhere.
    policy = found["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == []
    admitted = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert all(len(rule["ports"]) == 1 for rule in policy["ingress"]) and set(admitted) == {8080, 8082}
    assert admitted[8080] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mnist-gateway"}}}]
    assert all("namespaceSelector" in peer and "podSelector" in peer for peer in admitted[8082])
    # The other objects point at these pods.
    assert found["Service"]["spec"]["selector"] == labels
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
