"""The shipped nginx gateway (`make gateway`: serve/gateway.py, deploy/gateway.nginx.conf) in front
of a real TorchServe with its tokens on, as `make serve` runs it: each fault of TorchServe's own
frontend sent through it gets a 4xx JSON answer or the right answer, and TorchServe still serves."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys

import pytest
import requests

from contract.preprocessing import MAX_BODY_BYTES
from serve.process import free_ports
from tests import hostile
from tests.helpers import ROOT, report

pytestmark = [pytest.mark.gateway, pytest.mark.slow]  # and torchserve, on each test that sends through to one


@pytest.fixture(scope="module")
def gateway(torchserve, tmp_path_factory):
    """`python -m serve.gateway start` on free ports in front of the test TorchServe; always stopped."""
    run = tmp_path_factory.mktemp("gateway") / "run"
    ports = free_ports(3)
    server = torchserve.server
    env = {**os.environ, "TORCHSERVE_URL": server.inference_url, "TORCHSERVE_MANAGEMENT_URL": server.management_url,
           "TORCHSERVE_METRICS_URL": server.metrics_url, "GATEWAY_PORT": str(ports[0]),
           "GATEWAY_MANAGEMENT_PORT": str(ports[1]), "GATEWAY_METRICS_PORT": str(ports[2])}
    command = [sys.executable, "-m", "serve.gateway"]
    where = ["--run-dir", str(run), "--torchserve-dir", str(torchserve.workdir)]
    started = subprocess.run(command + ["start"] + where, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield type("Gateway", (), {"url": f"http://127.0.0.1:{ports[0]}", "port": ports[0],
                                   "management": f"http://127.0.0.1:{ports[1]}", "metrics": f"http://127.0.0.1:{ports[2]}",
                                   "token": (run / "gateway-token").read_text().strip(), "run": run})
    finally:
        stopped = subprocess.run(command + ["stop"] + where, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", ports[0]), timeout=2).close()


def post(gateway, body: bytes, content_type: str = "image/png", scheme: str = "Bearer", token=None):
    return requests.post(f"{gateway.url}/predictions/mnist", data=body, timeout=30,
                         headers={"Content-Type": content_type, "Authorization": f"{scheme} {token or gateway.token}"})


def assert_json_error(response, status: int, words: str = ""):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    answer = json.loads(response.content)  # strict JSON: the handler's shape
    assert set(answer) == {"error", "status"} and answer["status"] == status, answer
    assert words in answer["error"], answer


@pytest.mark.torchserve
def test_the_bearer_scheme_in_any_case_and_only_the_gateway_token(gateway, server, test_pngs):
    png = test_pngs[0][0]
    expected = requests.post(f"{server.inference_url}/predictions/mnist", data=png, timeout=30,
                             headers={"Content-Type": "image/png", **server.auth("inference")}).json()
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        response = post(gateway, png, scheme=scheme)
        assert response.status_code == 200, (scheme, response.text)
        assert response.json()["probabilities"] == expected["probabilities"]
    assert_json_error(post(gateway, png, token=gateway.token.swapcase()), 401, "gateway token")
    assert_json_error(post(gateway, png, token=server.key("inference")), 401, "gateway token")
    assert_json_error(post(gateway, png, scheme="Basic"), 401)
    assert_json_error(requests.post(f"{gateway.url}/predictions/mnist", data=png, timeout=30), 401)


def multipart(part_headers: str, payload: bytes, boundary: str = "XyZ") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.png\"\r\n"
            f"{part_headers}\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.torchserve
def test_frontend_faults_get_a_4xx_and_the_server_serves_on(gateway, server, test_pngs):
    png = test_pngs[0][0]
    faults = {
        "multipart with an empty boundary": (multipart("Content-Type: image/png\r\n", png), "multipart/form-data; boundary="),
        "a base64 part": (multipart("Content-Transfer-Encoding: base64\r\n", base64.b64encode(png)),
                          "multipart/form-data; boundary=XyZ"),
        "a form post (curl -d @file)": (png, "application/x-www-form-urlencoded"),
        "a form post, upper case": (png, "Application/X-WWW-Form-Urlencoded; charset=utf-8"),
    }
    direct = {}
    for name, (body, content_type) in faults.items():
        assert_json_error(post(gateway, body, content_type), 415, "--data-binary")
        direct[name] = requests.post(f"{server.inference_url}/predictions/mnist", data=body, timeout=30,
                                     headers={"Content-Type": content_type, **server.auth("inference")}).status_code
    report(f"gateway: TorchServe's frontend, asked directly: {direct}; through the gateway: 415 each")
    assert post(gateway, png, "application/octet-stream").status_code == 200


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """`count` HTTP/1.1 responses read in order from one connection (Content-Length or chunked)."""
    buffer, out = b"", []

    def need(n):
        nonlocal buffer
        while len(buffer) < n:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed after {len(out)} of {count} answers"
            buffer += chunk

    for _ in range(count):
        while b"\r\n\r\n" not in buffer:
            need(len(buffer) + 1)
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        body = b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while b"\r\n" not in buffer:
                    need(len(buffer) + 1)
                size_line, buffer = buffer.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                need(size + 2)
                body, buffer = body + buffer[:size], buffer[size + 2:]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            need(length)
            body, buffer = buffer[:length], buffer[length:]
        out.append((int(lines[0].split()[1]), body))
    return out


@pytest.mark.torchserve
def test_pipelined_requests_are_answered_in_order(gateway, test_pngs):
    pngs, labels = test_pngs
    # a slow request (a large photo) before fast refusals: TorchServe alone answers the fast first
    slow = hostile.png_of_size(2048, 2048, "RGBA")
    bodies = [slow, b"not an image", pngs[0], b"{", pngs[1], b"not an image either", pngs[2]]
    raw = b"".join(b"POST /predictions/mnist HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                   b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (gateway.token.encode(), len(b), b)
                   for b in bodies)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as sock:
        sock.sendall(raw)
        answers = read_responses(sock, len(bodies))
    assert [status for status, _ in answers] == [200, 400, 200, 400, 200, 400, 200]
    expected = [requests.post(f"{gateway.url}/predictions/mnist", data=b, timeout=30, headers={
        "Content-Type": "application/octet-stream", "Authorization": f"Bearer {gateway.token}"}).content for b in bodies]
    for i, ((_, body), alone) in enumerate(zip(answers, expected)):
        if answers[i][0] == 200:
            assert json.loads(body)["probabilities"] == json.loads(alone)["probabilities"], f"answer {i} is another request's"


@pytest.mark.torchserve
def test_metrics_only_for_allowed_host_names(gateway):
    ok = requests.get(f"{gateway.metrics}/metrics", timeout=10)
    assert ok.status_code == 200 and "ts_inference_requests_total" in ok.text
    for host in ("evil.example", "attacker.test:8082", "127.0.0.1.nip.io"):
        assert_json_error(requests.get(f"{gateway.metrics}/metrics", headers={"Host": host}, timeout=10), 421, "Host")
    assert_json_error(requests.post(f"{gateway.metrics}/metrics", timeout=10), 405)
    assert_json_error(requests.get(f"{gateway.url}/metrics", timeout=10), 404)


@pytest.mark.torchserve
def test_management_needs_the_gateway_token(gateway):
    listed = requests.get(f"{gateway.management}/models", headers={"Authorization": f"bearer {gateway.token}"}, timeout=10)
    assert listed.status_code == 200 and listed.json()["models"][0]["modelName"] == "mnist"
    assert_json_error(requests.get(f"{gateway.management}/models", timeout=10), 401)
    assert_json_error(requests.delete(f"{gateway.management}/models/mnist",
                                      headers={"Authorization": f"Bearer {gateway.token}"}, timeout=10), 405)


@pytest.mark.torchserve
def test_the_gateways_own_errors_are_the_handlers_json(gateway):
    auth = {"Authorization": f"Bearer {gateway.token}"}
    assert_json_error(requests.get(f"{gateway.url}/predictions/mnist", headers=auth, timeout=10), 405)
    assert_json_error(requests.get(f"{gateway.url}/nothing", timeout=10), 404)
    assert_json_error(requests.post(f"{gateway.url}/predictions/mnist", data=b"\0" * (MAX_BODY_BYTES + 1),
                                    headers={**auth, "Content-Type": "application/octet-stream"}, timeout=30), 413)
    assert_json_error(requests.get(f"{gateway.url}/" + "a" * 10_000, timeout=10), 414)
    assert_json_error(requests.get(f"{gateway.url}/ping", headers={"X-Big": "b" * 10_000}, timeout=10), 431)
    for raw in (b"POST /predictions/mnist HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n",
                b"POST /predictions/mnist HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Framing: on\r\n off\r\nContent-Length: 0\r\n\r\n",
                b"GARBAGE\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
            sock.sendall(raw)
            head = sock.recv(65536)
        status = int(head.split()[1])
        assert status == 400 and b"application/json" in head and b'"status": 400' in head, (raw, head)


def test_an_unreachable_torchserve_is_a_502_in_json(tmp_path):
    """The gateway's own 502 when nothing listens behind it, in the handler's JSON."""
    from serve import gateway as shipped
    ports, closed = free_ports(3), free_ports(1)[0]
    run = tmp_path / "run"
    run.mkdir()
    listen = {role: f"127.0.0.1:{port}" for role, port in zip(("inference", "management", "metrics"), ports)}
    (run / "nginx.conf").write_text(shipped.render(run, "t0ken", listen, {role: [f"127.0.0.1:{closed}"] for role in listen}))
    process = subprocess.Popen(shipped.nginx(run, "-g", "daemon off;"), start_new_session=True)
    try:
        shipped.wait_until_answering(f"http://{listen['inference']}/", process=process)
        response = requests.post(f"http://{listen['inference']}/predictions/mnist", data=b"x", timeout=30,
                                 headers={"Authorization": "Bearer t0ken", "Content-Type": "application/octet-stream"})
        assert_json_error(response, 502, "TorchServe did not answer")
    finally:
        process.terminate()
        process.wait(timeout=20)
