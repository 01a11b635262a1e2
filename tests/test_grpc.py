"""The gRPC API (TorchServe's own protos, answered by serve/grpc_server.py in front of TorchServe's
REST API) with real stubs generated from TorchServe's jar: every body REST takes, the same answers
sequentially and concurrently, REST's statuses as gRPC statuses with REST's messages (batched with
other requests too), the token, unknown models, both streaming calls, and TorchServe's own gRPC
listener kept from taking a worker down."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serve.grpc_client import GrpcClient
from serve.grpc_protos import write_stubs
from tests.helpers import BackgroundClients, report, worker_pids
from tests.hostile import bad_cases, good_cases

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def client(server):
    with GrpcClient(server) as grpc_client:
        yield grpc_client


@pytest.fixture(scope="module")
def torchserves_own(torchserve):
    """A client of TorchServe's own gRPC listener (the internal ports), for the handler's guard."""
    with GrpcClient(torchserve.torchserve_grpc_server()) as grpc_client:
        yield grpc_client


def rest_json(server, body: bytes) -> tuple[int, dict]:
    response = server.predict(body)
    return response.status_code, response.json()


def batch_size(error_or_call) -> int:
    return int(dict(error_or_call.trailing_metadata() or ()).get("x-batch-size", 0))


def test_stubs_are_generated_from_torchserves_own_protos(tmp_path):
    written = sorted(p.name for p in write_stubs(tmp_path).glob("*.py"))
    assert written == ["inference_pb2.py", "inference_pb2_grpc.py", "management_pb2.py", "management_pb2_grpc.py"]
    assert "StreamPredictions" in (tmp_path / "inference_pb2_grpc.py").read_text()


def test_ping_and_management_calls(server, client):
    assert json.loads(client.ping())["status"] == "Healthy"
    # No limit set: REST's default, not the empty list TorchServe's own listener gives.
    assert [m["modelName"] for m in json.loads(client.list_models())["models"]] == ["mnist"]
    assert [m["modelName"] for m in json.loads(client.list_models(limit=1))["models"]] == ["mnist"]
    pb = client.pb.management_pb2
    described = json.loads(client.management.DescribeModel(
        pb.DescribeModelRequest(model_name="mnist"), metadata=client.metadata("management"), timeout=10).msg)
    assert described[0]["modelName"] == "mnist" and described[0]["workers"]
    with pytest.raises(grpc.RpcError) as raised:  # enable_model_api=false: REST's 405
        client.management.RegisterModel(pb.RegisterModelRequest(url="https://example.com/x.mar"),
                                        metadata=client.metadata("management"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # ScaleWorker to the count it has: REST's 202 "Processing worker updates..." is a success.
    workers = len(described[0]["workers"])
    scaled = client.management.ScaleWorker(pb.ScaleWorkerRequest(model_name="mnist", min_worker=workers, max_worker=workers),
                                           metadata=client.metadata("management"), timeout=30).msg
    assert "Processing worker updates" in scaled or "Workers scaled" in scaled, scaled
    for request in (pb.ScaleWorkerRequest(model_name="mnist", min_worker=-1),):
        with pytest.raises(grpc.RpcError) as raised:
            client.management.ScaleWorker(request, metadata=client.metadata("management"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be negative" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        client.management.SetDefault(pb.SetDefaultRequest(model_name="mnist"), metadata=client.metadata("management"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs model_version" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:  # the inference key on the management API
        client.management.ListModels(pb.ListModelsRequest(), metadata=client.metadata("inference"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


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


def test_concurrent_grpc_answers_match_rest(server, client, test_pngs):
    pngs, _ = test_pngs
    with ThreadPoolExecutor(16) as pool:
        rest = list(pool.map(lambda png: rest_json(server, png)[1], pngs))
        answers = list(pool.map(lambda png: json.loads(client.predict(png)), pngs))
    worst = max(float(np.abs(np.subtract(a["probabilities"], r["probabilities"])).max()) for a, r in zip(answers, rest))
    report(f"gRPC vs REST, 16 concurrent clients on {len(pngs)} test images: max |dp| {worst:.1e}")
    assert [a["label"] for a in answers] == [r["label"] for r in rest]
    assert worst <= 1e-6


@pytest.mark.parametrize("case", bad_cases(), ids=lambda c: c.name)
def test_bad_bodies_get_the_grpc_status_and_the_rest_message(server, client, case):
    status, rest = rest_json(server, case.body)
    assert status == case.status
    with pytest.raises(grpc.RpcError) as raised:
        client.predict(case.body)
    assert raised.value.code() == CODES[case.status], raised.value.details()
    assert raised.value.details() == rest["error"]


def test_a_message_over_the_limit_is_refused_before_torchserve(server, client, test_pngs):
    pids = worker_pids(server)
    with pytest.raises(grpc.RpcError) as raised:
        client.predict(b"\x89PNG" + bytes(2 * 1024 * 1024))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in raised.value.details()
    assert "label" in json.loads(client.predict(test_pngs[0][0]))
    assert worker_pids(server) == pids


def test_calls_without_the_right_token_are_refused(server, client, test_pngs):
    png = test_pngs[0][0]
    for metadata in ([], [("authorization", "Bearer not-the-key")], [("authorization", server.key("management"))]):
        with pytest.raises(grpc.RpcError) as raised:
            client.inference.Predictions(client.request(png), metadata=metadata, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert raised.value.details().startswith("Token Authorization failed")


def test_unknown_models_and_versions_are_not_found(server, client, test_pngs):
    pids = worker_pids(server)
    png = test_pngs[0][0]
    for name, version, words in (("no-such-model", "", "Model not found: no-such-model"),
                                 ("mnist", "0.0.1", "does not exist for model: mnist")):
        request = client.pb.inference_pb2.PredictionsRequest(model_name=name, model_version=version,
                                                             input={"data": png})
        with pytest.raises(grpc.RpcError) as raised:
            client.inference.Predictions(request, metadata=client.metadata(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND, (name, raised.value.details())
        assert words in raised.value.details()
    R = client.pb.inference_pb2.PredictionsRequest
    for request, words in ((R(model_name="mnist"), "put the image bytes"),
                           (R(model_name="mnist", input={"a": png, "b": png}), "put the image bytes"),
                           (R(model_name="mnist/../../models", input={"data": png}), "is not one"),
                           (R(model_name="mnist", model_version="../1", input={"data": png}), "is not one"),
                           (R(model_name="..", input={"data": png}), "is not one")):
        with pytest.raises(grpc.RpcError) as raised:
            client.inference.Predictions(request, metadata=client.metadata(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in raised.value.details()
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


def test_stream_predictions2_answers_each_message_with_its_own_status(server, client, test_pngs):
    pngs, _ = test_pngs
    R = client.pb.inference_pb2.PredictionsRequest
    requests = [R(model_name="mnist", input={"data": pngs[0]}, sequence_id="a"),
                R(model_name="mnist", input={"data": b"not an image"}, sequence_id="b"),
                R(model_name="no-such-model", input={"data": pngs[1]}),
                R(model_name="mnist", input={"data": pngs[2]}, sequence_id="d")]
    replies = list(client.inference.StreamPredictions2(iter(requests), metadata=client.metadata(), timeout=30))
    assert [r.sequence_id for r in replies] == ["a", "b", "", "d"]
    assert json.loads(replies[0].prediction) == json.loads(client.predict(pngs[0]))
    assert json.loads(replies[3].prediction) == json.loads(client.predict(pngs[2]))
    assert not replies[0].HasField("status") and not replies[3].HasField("status")
    assert replies[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[1].status.message == rest_json(server, b"not an image")[1]["error"]
    assert replies[2].status.code == grpc.StatusCode.NOT_FOUND.value[0]


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


def test_bad_grpc_calls_batched_with_others_keep_their_status(server, client, test_pngs):
    """Under REST load a bad gRPC call shares a batch with good requests; it still gets its own
    status and REST's message, and every REST client and good gRPC call gets its answer."""
    pngs, _ = test_pngs
    pids = worker_pids(server)
    message = rest_json(server, b"not an image")[1]["error"]

    def good(i):
        call = client.inference.Predictions.with_call(client.request(pngs[i % len(pngs)]),
                                                      metadata=client.metadata(), timeout=30)
        return json.loads(call[0].prediction)

    def bad(_):
        with pytest.raises(grpc.RpcError) as raised:
            client.predict(b"not an image")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == message
        return batch_size(raised.value)

    with RestLoad(server, pngs[:64], clients=8) as load, ThreadPoolExecutor(16) as pool:
        goods = pool.map(good, range(64))
        batched = list(pool.map(bad, range(64)))
        answers = list(goods)
    shared = sum(size > 1 for size in batched)
    report(f"under REST load (8 clients, {len(load.statuses)} requests): 64 bad gRPC calls all "
           f"INVALID_ARGUMENT, {shared} of them in a batch shared with other requests (largest "
           f"{max(batched)}); 64 good gRPC calls answered")
    assert all("label" in a for a in answers)
    assert load.statuses and set(load.statuses) == {200}
    assert shared > 0, "no bad call was batched with another request: the test proved nothing"
    assert worker_pids(server) == pids


def test_torchserves_own_stream_predictions_cannot_take_a_worker_down(server, torchserves_own, test_pngs):
    """TorchServe's own listener still runs on internal ports: the handler's ts_stream_next header
    keeps a StreamPredictions there from killing the worker, under REST load."""
    pngs, _ = test_pngs
    pids = worker_pids(server)

    def stream_good(i):
        return json.loads(torchserves_own.stream_predict(pngs[i % len(pngs)])[0])

    def send_bad(_):
        try:
            answer = json.loads(torchserves_own.stream_predict(b"not an image")[0])
            assert answer["status"] == 400  # batched with REST: the error JSON inside an OK
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()

    with RestLoad(server, pngs[:64], clients=8) as load, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stream_good, range(32)))
        list(pool.map(send_bad, range(16)))
    assert all("label" in a for a in answers)
    assert load.statuses and set(load.statuses) == {200}
    assert worker_pids(server) == pids


def test_the_command_line_predicts_over_grpc(torchserve, tmp_path, test_pngs):
    from tests.helpers import run_module

    (tmp_path / "digit.png").write_bytes(test_pngs[0][0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    from serve.process import write_config

    # TorchServe's config names its own listener's ports; a client's names the gRPC API's, as
    # config.properties does for `make serve`.
    config = tmp_path / "client.properties"
    write_config(torchserve.workdir / "config.properties", config,
                 {"grpc_inference_port": torchserve.server.grpc_inference_target.rsplit(":", 1)[1]})
    result = run_module("serve", "predict", "--grpc", "--config", str(config), "--workdir", str(torchserve.workdir),
                        str(tmp_path / "digit.png"), str(tmp_path / "broken.png"), check=False)
    assert result.returncode == 1, result.stderr
    good, bad = result.stdout.splitlines()
    assert "digit.png: " in good and "(label " in good
    assert "broken.png: gRPC INVALID_ARGUMENT " in bad and "send image bytes" in bad
