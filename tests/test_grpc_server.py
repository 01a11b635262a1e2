"""serve/grpc_server.py without a TorchServe behind it: a clear UNAVAILABLE instead of a hang, the
status mapping of REST answers, and a process that ends with the TorchServe it fronts."""
from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import requests

from serve import grpc_server
from serve.grpc_protos import stubs
from serve.process import free_ports


def rest_answer(status: int, body: bytes, content_type="application/json") -> requests.Response:
    response = requests.Response()
    response.status_code, response._content = status, body
    response.headers["Content-Type"] = content_type
    return response


@pytest.mark.parametrize("status, body, code, details", [
    (400, b'{"error": "body is not an image", "status": 400}', grpc.StatusCode.INVALID_ARGUMENT, "body is not an image"),
    (413, b'{"error": "image is 9000x9000", "status": 413}', grpc.StatusCode.RESOURCE_EXHAUSTED, "image is 9000x9000"),
    (400, b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed."}',
     grpc.StatusCode.UNAUTHENTICATED, "Token Authorization failed."),
    (404, b'{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: x"}',
     grpc.StatusCode.NOT_FOUND, "Model not found: x"),
    (503, b'{"code": 503, "type": "ServiceUnavailableException", "message": "Model \\"mnist\\" has no worker"}',
     grpc.StatusCode.UNAVAILABLE, 'Model "mnist" has no worker'),
    (507, b'{"error": "out of memory", "status": 507}', grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"),
    (500, b"<html>oops</html>", grpc.StatusCode.INTERNAL, "<html>oops</html>"),
    (418, b"", grpc.StatusCode.INVALID_ARGUMENT, "HTTP 418"),
])
def test_rest_statuses_become_grpc_statuses_with_rests_message(status, body, code, details):
    error = grpc_server.grpc_error(rest_answer(status, body))
    assert (error.code, error.details) == (code, details)


@pytest.fixture
def front(tmp_path):
    """The server in its own process, fronting REST ports where nothing listens."""
    rest, inference, management = free_ports(3)
    config = tmp_path / "config.properties"
    config.write_text(f"inference_address=http://127.0.0.1:{rest}\nmanagement_address=http://127.0.0.1:{rest}\n"
                      "max_request_size=1048576\n")
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    process = grpc_server.start_process(config, f"127.0.0.1:{inference}", f"127.0.0.1:{management}",
                                        tmp_path / "grpc.log", exit_with_pid=keeper.pid)
    yield process, keeper, f"127.0.0.1:{inference}", tmp_path / "grpc.log"
    keeper.kill()
    grpc_server.stop_process(process)


def test_without_torchserve_calls_are_unavailable_at_once(front):
    process, _, target, _ = front
    pb = stubs()
    with grpc.insecure_channel(target) as channel:
        stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predictions(pb.inference_pb2.PredictionsRequest(model_name="mnist", input={"data": b"x"}), timeout=20)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "TorchServe is not answering" in raised.value.details()
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.RpcError) as raised:  # checked before any REST call
            stub.Predictions(pb.inference_pb2.PredictionsRequest(model_name="..", input={"data": b"x"}), timeout=20)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert process.poll() is None


def test_it_exits_with_the_process_it_fronts(front):
    process, keeper, _, log = front
    keeper.kill()
    keeper.wait()
    process.wait(timeout=15)
    assert "has exited: stopping" in log.read_text()


def test_a_taken_port_is_a_clear_error(tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\n")
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            grpc_server.start_process(config, f"127.0.0.1:{taken.getsockname()[1]}",
                                      f"127.0.0.1:{free_ports(1)[0]}", tmp_path / "grpc.log")
        assert "is the port taken?" in (tmp_path / "grpc.log").read_text()
    finally:
        taken.close()
