"""The Open Inference Protocol server (oip/): KServe's ModelServer on the archive's model.onnx,
driven by unchanged clients (tritonclient http JSON and binary, tritonclient grpc, kserve's
InferenceRESTClient and InferenceGRPCClient) in .venv-oip, compared with eager PyTorch."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from contract import TOLERANCE
from serve.process import free_ports
from tests import runtimes
from tests.helpers import ROOT, report

pytestmark = [pytest.mark.oip, pytest.mark.slow]
OIP_PYTHON = ROOT / ".venv-oip" / "bin" / "python"
CLIENTS = ("triton-http-json", "triton-http-binary", "triton-grpc", "kserve-rest", "kserve-grpc")
INPUTS = ("fp32", "uint8", "bytes")


def oip(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    if not OIP_PYTHON.exists():
        pytest.fail(f"{OIP_PYTHON} is missing: run `make oip-venv`")
    return subprocess.run([str(OIP_PYTHON), "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def start_server(model_store: Path, work: Path, env: dict | None = None,
                 *extra: str) -> tuple[subprocess.CompletedProcess, int, int]:
    http, grpc = free_ports(2)
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    result = oip("oip", "start", "--model-store", str(model_store), "--workdir", str(work),
                 "--http-port", str(http), "--grpc-port", str(grpc), *extra,
                 env={"TMPDIR": str(work / "tmp"), **(env or {})})
    return result, http, grpc


@pytest.fixture(scope="module")
def oip_server(artifacts, tmp_path_factory):
    work = tmp_path_factory.mktemp("oip")
    started, http, grpc = start_server(artifacts.model_store, work)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((work / "logs" / "oip" / "oip.pid").read_text())
    yield SimpleNamespace(http=f"127.0.0.1:{http}", grpc=f"127.0.0.1:{grpc}", work=work, pid=pid,
                          said=started.stdout, log=work / "logs" / "oip" / "oip.log")
    stopped = oip("oip", "stop", "--workdir", str(work))
    assert "has exited" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(scope="module")
def images_on_disk(test_pngs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("oip-images")
    paths = []
    for i, png in enumerate(test_pngs[0]):
        paths.append(folder / f"{i:03d}.png")
        paths[-1].write_bytes(png)
    return paths


@pytest.fixture(scope="module")
def eager_reference(artifacts, test_pngs):
    x = runtimes.preprocessed(test_pngs[0], artifacts.bundle)
    return runtimes.eager(artifacts.checkpoint_dir / "best.pt", x)


def run_client(client, server, kind, paths, artifacts, tmp_path, concurrency=1, batch=1) -> dict:
    url = server.grpc if client.endswith("grpc") else server.http
    out = tmp_path / f"{client}-{kind}-{concurrency}.json"
    result = oip("oip.clients", client, "--url", url, "--input", kind, "--images", *map(str, paths),
                 "--bundle", str(artifacts.build_dir / "bundle.json"), "--concurrency", str(concurrency),
                 "--batch", str(batch), "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


def test_start_verifies_and_serves_a_private_read_only_copy_on_loopback(oip_server):
    assert f"REST  http://{oip_server.http}/v2/models/mnist/infer" in oip_server.said
    assert f"gRPC  {oip_server.grpc}" in oip_server.said
    log = oip_server.log.read_text()
    assert "OK:" in log and "signed by" in log and "model.onnx verified and self-tested" in log
    copies = list((oip_server.work / "tmp").glob("oip-model-*/archive"))
    assert len(copies) == 1
    served = copies[0]
    assert (served / "model.onnx").stat().st_mode & 0o777 == 0o400
    assert served.stat().st_mode & 0o777 == 0o500
    assert (served.parent.stat().st_mode & 0o777) == 0o700
    listening = {c.laddr.ip for c in psutil.Process(oip_server.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


@pytest.mark.parametrize("client", CLIENTS)
def test_every_client_and_input_matches_eager_pytorch(client, oip_server, images_on_disk, artifacts,
                                                      eager_reference, test_pngs, tmp_path):
    """256 real test images per input kind, one request at a time, then 16 clients at once in
    batches of 4: every probability within TOLERANCE of eager PyTorch, the same argmax."""
    for kind in INPUTS:
        for concurrency, batch in ((1, 1), (16, 4)):
            answer = run_client(client, oip_server, kind, images_on_disk, artifacts, tmp_path,
                                concurrency, batch)
            health = answer["health"]
            assert health["live"] and health["ready"] and health["model_ready"], health
            if "metadata" in health:
                names = {t["name"]: t["datatype"] for t in health["metadata"]["inputs"]}
                assert names == {"input": "FP32", "pixels": "UINT8", "image": "BYTES"}
            p = np.asarray(answer["probabilities"])
            assert p.shape == eager_reference.shape == (256, len(artifacts.bundle["classes"]))
            diff = float(np.abs(p - eager_reference).max())
            assert diff <= TOLERANCE, f"{client} {kind}: max |dp| {diff:.3g}"
            assert (p.argmax(1) == eager_reference.argmax(1)).all()
            report(f"OIP {client} {kind}, 256 images, {concurrency} client(s), batch {batch}: "
                   f"max |dp| vs eager = {diff:.3g}")


def infer_json(server, inputs, model="mnist", **extra) -> requests.Response:
    return requests.post(f"http://{server.http}/v2/models/{model}/infer", json={"inputs": inputs, **extra},
                         timeout=30)


def good_request(png) -> list[dict]:
    return [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]


def huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (60000, 1)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_REST = {
    "wrong shape": ([{"name": "input", "datatype": "FP32", "shape": [1, 28, 28], "data": [0.0] * 784}],
                    400, "send [N,1,28,28]"),
    "wrong datatype": ([{"name": "input", "datatype": "INT32", "shape": [1, 1, 28, 28], "data": [0] * 784}],
                       400, "has datatype INT32"),
    "values out of range": ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [300] * 784}],
                            400, "does not match its datatype UINT8"),
    "too few values": ([{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0, 1.0]}],
                       400, "does not match its datatype FP32 and shape [1, 1, 28, 28]"),
    "garbage bytes": ([{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(b"qwerty garbage").decode()]}],
                      400, "not an image"),
    "oversize image": ([{"name": "image", "datatype": "BYTES", "shape": [1],
                         "data": [base64.b64encode(huge_png()).decode()]}], 413, "exceeds the limit"),
    "oversize body": ([{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(os.urandom((1 << 20) + 1)).decode()]}], 413, "byte limit"),
    "oversize batch": ([{"name": "input", "datatype": "FP32", "shape": [1000, 1, 28, 28], "data": [0.0]}],
                       413, "images per request"),
    "two inputs": ([{"name": "a", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}] * 2,
                   400, "exactly one input"),
}


@pytest.mark.parametrize("case", sorted(BAD_REST))
def test_bad_rest_requests_get_the_protocols_error_json_and_the_server_lives_on(case, oip_server, test_pngs):
    inputs, status, message = BAD_REST[case]
    response = infer_json(oip_server, inputs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text
    assert infer_json(oip_server, good_request(test_pngs[0][0])).status_code == 200


def test_unknown_model_and_malformed_body_are_4xx(oip_server, test_pngs):
    response = infer_json(oip_server, good_request(test_pngs[0][0]), model="nope")
    assert response.status_code == 404 and "nope" in response.json()["error"]
    response = requests.get(f"http://{oip_server.http}/v2/models/nope", timeout=10)
    assert response.status_code == 404
    response = requests.post(f"http://{oip_server.http}/v2/models/mnist/infer", data=b"{not json",
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert 400 <= response.status_code < 500
    assert infer_json(oip_server, good_request(test_pngs[0][0])).status_code == 200


GRPC_CASES = r"""
import base64, io, json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
from PIL import Image
url, png = sys.argv[1], open(sys.argv[2], "rb").read()
client = g.InferenceServerClient(url=url)
def tensor(name, datatype, array):
    t = g.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t
buffer = io.BytesIO(); Image.new("L", (60000, 1)).save(buffer, "PNG")
cases = {
    "wrong shape": ("mnist", tensor("input", "FP32", np.zeros((1, 28, 28), np.float32))),
    "wrong datatype": ("mnist", tensor("input", "INT32", np.zeros((1, 1, 28, 28), np.int32))),
    "garbage bytes": ("mnist", tensor("image", "BYTES", np.array([b"\x00\x01garbage\xff"], dtype=object))),
    "oversize image": ("mnist", tensor("image", "BYTES", np.array([buffer.getvalue()], dtype=object))),
    "unknown model": ("nope", tensor("image", "BYTES", np.array([png], dtype=object))),
}
answers = {}
for case, (model, t) in cases.items():
    try:
        client.infer(model, [t])
        answers[case] = ["OK", ""]
    except InferenceServerException as error:
        answers[case] = [error.status(), error.message()]
good = client.infer("mnist", [tensor("image", "BYTES", np.array([png], dtype=object))])
answers["after"] = good.as_numpy("probabilities").tolist()
print(json.dumps(answers))
"""


def test_bad_grpc_requests_get_the_matching_status_and_the_server_lives_on(oip_server, test_pngs,
                                                                            tmp_path, eager_reference):
    png = tmp_path / "good.png"
    png.write_bytes(test_pngs[0][0])
    result = subprocess.run([str(OIP_PYTHON), "-c", GRPC_CASES, oip_server.grpc, str(png)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    for case in ("wrong shape", "wrong datatype", "garbage bytes", "oversize image"):
        assert answers[case][0] == "StatusCode.INVALID_ARGUMENT", (case, answers[case])
    assert "send [N,1,28,28]" in answers["wrong shape"][1]
    assert "not an image" in answers["garbage bytes"][1]
    assert "exceeds the limit" in answers["oversize image"][1]
    assert answers["unknown model"][0] == "StatusCode.NOT_FOUND", answers["unknown model"]
    assert np.abs(np.asarray(answers["after"][0]) - eager_reference[0]).max() <= TOLERANCE


VERSION_CASES = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
url, version = sys.argv[1], sys.argv[2]
client = g.InferenceServerClient(url=url)
pixels = g.InferInput("pixels", [1, 28, 28], "UINT8")
pixels.set_data_from_numpy(np.zeros((1, 28, 28), np.uint8))
answers = {"versions": list(client.get_model_metadata("mnist").versions),
           "ready": client.is_model_ready("mnist", version),
           "infer": client.infer("mnist", [pixels], model_version=version).get_response().model_version}
for name, call in (("metadata", lambda: client.get_model_metadata("mnist", "1")),
                   ("ready other", lambda: client.is_model_ready("mnist", "1")),
                   ("infer other", lambda: client.infer("mnist", [pixels], model_version="1"))):
    try:
        call()
        answers[name] = ["OK", ""]
    except InferenceServerException as error:
        answers[name] = [error.status(), error.message()]
print(json.dumps(answers))
"""


def test_the_model_has_the_archives_version_on_both_protocols(oip_server, artifacts, test_pngs):
    from export.release import version_in_store

    version = str(version_in_store(artifacts.mar))  # release.json's, as TorchServe reports it
    base = f"http://{oip_server.http}/v2/models/mnist"
    metadata = requests.get(base, timeout=10).json()
    assert metadata["versions"] == [version]
    assert requests.get(f"{base}/versions/{version}", timeout=10).json() == metadata
    assert requests.get(f"{base}/versions/{version}/ready", timeout=10).status_code == 200
    answered = infer_json(oip_server, good_request(test_pngs[0][0]), model=f"mnist/versions/{version}")
    assert answered.status_code == 200 and answered.json()["model_version"] == version
    for route in (f"{base}/versions/1", f"{base}/versions/1/ready"):
        response = requests.get(route, timeout=10)
        assert response.status_code == 404 and f"serves version {version}" in response.json()["error"]
    response = infer_json(oip_server, good_request(test_pngs[0][0]), model="mnist/versions/1")
    assert response.status_code == 404 and "has no version 1" in response.json()["error"]
    result = subprocess.run([str(OIP_PYTHON), "-c", VERSION_CASES, oip_server.grpc, version], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert answers["versions"] == [version] and answers["ready"] is True and answers["infer"] == version
    for name in ("metadata", "ready other", "infer other"):
        assert answers[name][0] == "StatusCode.NOT_FOUND", (name, answers[name])
        assert f"serves version {version}" in answers[name][1]


def rewritten(mar: Path, target: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, replace.get(info.filename, source.read(info.filename)))
    return target


def test_a_tampered_or_unsigned_archive_is_not_served(artifacts, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(artifacts.mar) as mar:
        onnx = mar.read("model.onnx")
    rewritten(artifacts.mar, store / "mnist.mar", {"model.onnx": onnx + b"\0"})
    refused, _, _ = start_server(store, tmp_path / "work")
    assert refused.returncode != 0
    assert "refusing to serve" in refused.stderr and "model.onnx" in refused.stderr, refused.stderr
    assert not (tmp_path / "work" / "logs" / "oip" / "oip.pid").exists()
    assert not list((tmp_path / "work" / "tmp").glob("oip-model-*")), "the refused copy stays behind"

    unsigned, _, _ = start_server(artifacts.model_store, tmp_path / "work2",
                                  env={"MNIST_SIGNING_PUBLIC_KEY": str(tmp_path / "no-such-key.pub")})
    assert unsigned.returncode != 0 and "refusing to serve" in unsigned.stderr, unsigned.stderr


def test_start_checks_the_pinned_digest_and_refuses_a_rollback(artifacts, tmp_path):
    """As `make serve` does (serve/trust.py): another archive than the pinned one, or an older
    release than this host has served, is refused before the server listens."""
    from contract.bundle import sha256_file
    from tests.helpers import run_module

    state = {"MNIST_BUNDLE_STATE_DIR": str(tmp_path / "state")}
    stores = {}
    for version in (5, 3):
        stores[version] = tmp_path / f"store{version}"
        run_module("export", "archive", "--build-dir", str(artifacts.build_dir), "--model-store",
                   str(stores[version]), "--model-version", str(version))
    wrong, _, _ = start_server(stores[5], tmp_path / "w1", state, "--expect-sha256", "0" * 64)
    assert wrong.returncode != 0 and "not the pinned" in wrong.stderr, wrong.stderr
    pinned, _, _ = start_server(stores[5], tmp_path / "w2", state, "--expect-sha256",
                                sha256_file(stores[5] / "mnist.mar"))
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert "as pinned" in pinned.stdout and "model version 5" in pinned.stdout
    assert "has exited" in oip("oip", "stop", "--workdir", str(tmp_path / "w2")).stdout
    older, _, _ = start_server(stores[3], tmp_path / "w3", state)
    assert older.returncode != 0 and "refusing a rollback" in older.stderr, older.stderr
    allowed, _, _ = start_server(stores[3], tmp_path / "w4", state, "--allow-rollback")
    assert allowed.returncode == 0 and "ROLLBACK allowed" in allowed.stdout, allowed.stdout + allowed.stderr
    assert "has exited" in oip("oip", "stop", "--workdir", str(tmp_path / "w4")).stdout


def test_the_kserve_manifests_probes_answer_on_the_real_server(oip_server):
    import yaml
    service = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    container = service["spec"]["predictor"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        response = requests.get(f"http://{oip_server.http}{path}", timeout=10)
        assert response.status_code == 200, (probe, path, response.text)
    metrics = requests.get(f"http://{oip_server.http}/metrics", timeout=10)
    assert metrics.status_code == 200 and "request_predict_seconds" in metrics.text
