"""TorchServe's gRPC API with real stubs (generated from the protos in TorchServe's jar): every body
REST takes, the same answers, statuses instead of OK-wrapped errors, the token, and a
StreamPredictions call that can no longer take a worker down, alone or under REST load."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serve.grpc_client import GrpcClient, write_stubs
from tests.helpers import BackgroundClients, report
from tests.hostile import bad_cases, good_cases

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server):
    with GrpcClient(server) as grpc_client:
        yield grpc_client


def worker_pids(server) -> list[int]:
    return sorted(w["pid"] for w in server.describe()["workers"])


def rest_json(server, body: bytes) -> tuple[int, dict]:
    response = server.predict(body)
    return response.status_code, response.json()


def test_stubs_are_generated_from_torchserves_own_protos(tmp_path):
    written = sorted(p.name for p in write_stubs(tmp_path).glob("*.py"))
    assert written == ["inference_pb2.py", "inference_pb2_grpc.py", "management_pb2.py", "management_pb2_grpc.py"]
    assert "StreamPredictions" in (tmp_path / "inference_pb2_grpc.py").read_text()


def test_ping_and_list_models(client):
    assert json.loads(client.ping())["status"] == "Healthy"
    models = json.loads(client.list_models())["models"]
    assert [m["modelName"] for m in models] == ["mnist"]


def test_every_rest_body_gets_the_same_answer_over_grpc(server, client, test_pngs):
    pngs, labels = test_pngs
    cases = [(c.name, c.body) for c in good_cases()] + [(f"test image {i}", png) for i, png in enumerate(pngs[:32])]
    worst = 0.0
    for name, body in cases:
        status, expected = rest_json(server, body)
        assert status == 200, name
        answer = json.loads(client.predict(body))
        assert answer["label"] == expected["label"], name
        worst = max(worst, float(np.abs(np.subtract(answer["probabilities"], expected["probabilities"])).max()))
    report(f"gRPC vs REST on {len(cases)} bodies (odd forms and test images): max |dp| {worst:.1e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c.name)
def test_bad_bodies_get_the_grpc_status_and_the_rest_message(server, client, case):
    status, rest = rest_json(server, case.body)
    assert status == case.status
    with pytest.raises(grpc.RpcError) as raised:
        client.predict(case.body)
    expected = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}[case.status]
    assert raised.value.code() == expected, raised.value.details()
    # TorchServe's frontend appends the name of its own exception class on a second line.
    assert raised.value.details().splitlines()[0] == rest["error"]


def test_a_body_over_the_limit_is_refused_by_the_frontend(server, client, test_pngs):
    pids = worker_pids(server)
    with pytest.raises(grpc.RpcError) as raised:
        client.predict(b"\x89PNG" + bytes(2 * 1024 * 1024))
    # grpc-java refuses a message over max_request_size by resetting the stream (RST_STREAM CANCEL).
    assert raised.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
    assert "label" in json.loads(client.predict(test_pngs[0][0]))
    assert worker_pids(server) == pids


def test_calls_without_the_right_token_are_refused(server, client, test_pngs):
    png = test_pngs[0][0]
    for metadata in ([], [("authorization", "Bearer not-the-key")], [("authorization", server.key("management"))]):
        with pytest.raises(grpc.RpcError) as raised:
            client.inference.Predictions(client.request(png), metadata=metadata, timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "Token Authorization failed" in raised.value.details()


def test_an_unknown_model_is_refused_without_touching_a_worker(server, client, test_pngs):
    pids = worker_pids(server)
    with pytest.raises(grpc.RpcError) as raised:
        client.predict(test_pngs[0][0], model="no-such-model")
    # TorchServe's frontend answers INTERNAL here, before any handler runs (docs/grpc.md).
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "Model not found: no-such-model" in raised.value.details()
    assert worker_pids(server) == pids


def test_stream_predictions_answers_one_message_like_predictions(server, client, test_pngs):
    pids = worker_pids(server)
    png = test_pngs[0][0]
    messages = client.stream_predict(png)
    assert len(messages) == 1
    assert json.loads(messages[0]) == json.loads(client.predict(png))
    with pytest.raises(grpc.RpcError) as raised:
        client.stream_predict(b"not an image")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert worker_pids(server) == pids


class RestLoad(BackgroundClients):
    """REST clients sending test images until the block ends; every answer is kept."""

    def __init__(self, server, pngs, clients: int):
        super().__init__(clients)
        self.server, self.pngs, self.statuses, self.lock = server, pngs, [], threading.Lock()

    def run(self, index: int) -> None:
        import requests

        with requests.Session() as session:
            i = index
            while not self.stop.is_set():
                status = self.server.predict(self.pngs[i % len(self.pngs)], "image/png", session=session).status_code
                with self.lock:
                    self.statuses.append(status)
                i += 1


def test_streams_and_grpc_errors_under_rest_load_hurt_no_one(server, client, test_pngs):
    pngs, _ = test_pngs
    pids = worker_pids(server)
    streamed, refused, wrapped = 0, 0, 0

    def stream_good(i):
        return json.loads(client.stream_predict(pngs[i % len(pngs)])[0])

    def send_bad(_):
        # Batched with REST requests, a bad gRPC body keeps its error JSON inside an OK reply:
        # TorchServe's frontend ignores per-request statuses on gRPC (docs/grpc.md).
        try:
            answer = json.loads(client.stream_predict(b"not an image")[0])
            assert answer["status"] == 400 and "not an image" in answer["error"]
            return "wrapped"
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            return "refused"

    with RestLoad(server, pngs[:64], clients=8) as load, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stream_good, range(64)))
        outcomes = list(pool.map(send_bad, range(32)))
    streamed = sum("label" in a for a in answers)
    refused, wrapped = outcomes.count("refused"), outcomes.count("wrapped")
    report(f"under REST load (8 clients, {len(load.statuses)} requests): {streamed} streams answered, "
           f"bad gRPC bodies {refused} refused with INVALID_ARGUMENT and {wrapped} answered OK with the "
           f"error JSON (batched with REST)")
    assert streamed == 64
    assert load.statuses and set(load.statuses) == {200}
    assert worker_pids(server) == pids


def test_the_command_line_predicts_over_grpc(torchserve, tmp_path, test_pngs):
    from tests.helpers import run_module

    (tmp_path / "digit.png").write_bytes(test_pngs[0][0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    config = torchserve.workdir / "config.properties"
    result = run_module("serve", "predict", "--grpc", "--config", str(config), "--workdir", str(torchserve.workdir),
                        str(tmp_path / "digit.png"), str(tmp_path / "broken.png"), check=False)
    assert result.returncode == 1, result.stderr
    good, bad = result.stdout.splitlines()
    assert "digit.png: " in good and "(label " in good
    assert "broken.png: gRPC INVALID_ARGUMENT" in bad
