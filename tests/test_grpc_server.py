"""serve/grpc_server.py without a TorchServe behind it: a clear UNAVAILABLE instead of a hang, the
status mapping of REST answers, and a process that ends with the TorchServe it fronts."""
from __future__ import annotations

import stat
import subprocess
import sys
import time

import grpc
import pytest

from serve import grpc_server
from serve.grpc_protos import stubs
from serve.process import free_ports


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
    error = grpc_server.grpc_error(status, body)
    assert (error.code, error.details) == (code, details)


KEY = [("authorization", "Bearer some-key")]


def start_front(tmp_path, rest_port: int, tokens: bool = True, queue: int = 256):
    """The server in its own process, fronting REST on `rest_port`, ending with a `keeper` process."""
    inference, management = free_ports(2)
    config = tmp_path / "config.properties"
    config.write_text(f"inference_address=http://127.0.0.1:{rest_port}\nmanagement_address=http://127.0.0.1:{rest_port}\n"
                      f"max_request_size=1048576\ndisable_token_authorization={'false' if tokens else 'true'}\n"
                      f"job_queue_size={queue}\n")
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    process = grpc_server.start_process(config, f"127.0.0.1:{inference}", f"127.0.0.1:{management}",
                                        tmp_path / "grpc.log", exit_with_pid=keeper.pid)
    return process, keeper, f"127.0.0.1:{inference}", tmp_path / "grpc.log"


@pytest.fixture
def front(tmp_path):
    """The server fronting REST ports where nothing listens."""
    process, keeper, target, log = start_front(tmp_path, free_ports(1)[0])
    yield process, keeper, target, log
    keeper.kill()
    keeper.wait()
    grpc_server.stop_process(process)


def predictions(target: str, request=None, metadata=KEY, timeout=20):
    pb = stubs()
    with grpc.insecure_channel(target) as channel:
        stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = request or pb.inference_pb2.PredictionsRequest(model_name="mnist", input={"data": b"x"})
        return stub.Predictions(request, metadata=metadata, timeout=timeout)


def test_without_torchserve_calls_are_unavailable_at_once(front):
    process, _, target, log = front
    pb = stubs()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        predictions(target)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "TorchServe is not answering" in raised.value.details()
    assert time.monotonic() - started < 5
    with pytest.raises(grpc.RpcError) as raised:  # checked before any REST call
        predictions(target, pb.inference_pb2.PredictionsRequest(model_name="..", input={"data": b"x"}))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:  # an input map too big to list: the details stay short
        predictions(target, pb.inference_pb2.PredictionsRequest(
            model_name="mnist", input={f"{i:05d}" + "k" * 200: b"" for i in range(2000)}))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2000 entries" in raised.value.details() and len(raised.value.details()) < 1000
    assert process.poll() is None
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_call_without_a_key_is_refused_before_anything_else(front):
    _, _, target, _ = front
    for metadata in ([], [("authorization", "")], [("authorization", "   ")]):
        with pytest.raises(grpc.RpcError) as raised:
            predictions(target, metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert raised.value.details().startswith("Token Authorization failed")


def test_with_tokens_off_a_call_needs_no_key(tmp_path):
    process, keeper, target, _ = start_front(tmp_path, free_ports(1)[0], tokens=False)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            predictions(target, metadata=[])
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # on to REST
    finally:
        keeper.kill()
        keeper.wait()
        grpc_server.stop_process(process)


def test_metadata_rest_cannot_take_is_refused_without_repeating_it(front):
    _, _, target, _ = front
    with pytest.raises(grpc.RpcError) as raised:  # a leading space is HTTP's optional whitespace
        predictions(target, metadata=[("authorization", "  Bearer secret-key")])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as raised:
        predictions(target, metadata=[("authorization", "Bearer " + "k" * 5000)])  # under grpc's own limit
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kkk" not in raised.value.details()


def test_idle_streams_do_not_starve_other_calls(front):
    """300 open streams with a wrong key, none sending a message (more than job_queue_size): a
    call with its message still gets its answer at once."""
    _, _, target, _ = front
    pb = stubs()
    channels = [grpc.insecure_channel(target) for _ in range(3)]
    idle = []
    try:
        for channel in channels:
            stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            for _ in range(100):
                idle.append(stub.StreamPredictions2(iter(lambda: time.sleep(30), 1),
                                                    metadata=[("authorization", "Bearer wrong")], timeout=60))
        time.sleep(2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            predictions(target, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # answered: not RESOURCE_EXHAUSTED
        assert "TorchServe is not answering" in raised.value.details()
        assert time.monotonic() - started < 5
    finally:
        for call in idle:
            call.cancel()
        for channel in channels:
            channel.close()


def test_predictions_beyond_the_job_queue_are_refused_at_once(tmp_path):
    import socket

    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    process, keeper, target, _ = start_front(tmp_path, silent.getsockname()[1], queue=4)
    pb = stubs()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            request = pb.inference_pb2.PredictionsRequest(model_name="mnist", input={"data": b"x"})
            hanging = [stub.Predictions.future(request, metadata=KEY, timeout=30) for _ in range(4)]
            time.sleep(1)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predictions(request, metadata=KEY, timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "4 predictions are in flight" in raised.value.details()
            assert time.monotonic() - started < 3
            for call in hanging:
                call.cancel()
    finally:
        silent.close()
        keeper.kill()
        keeper.wait()
        grpc_server.stop_process(process)


def test_details_stay_under_grpcs_header_limit():
    error = grpc_server.RestError(grpc.StatusCode.INVALID_ARGUMENT, "é中" * 1000)
    assert len(error.details.encode()) <= grpc_server.MAX_DETAILS and error.details.endswith("...")
    assert grpc_server.grpc_error(400, b'{"error": {"a": "b"}}').details == '{"a": "b"}'


def test_it_exits_with_the_process_it_fronts(front):
    process, keeper, _, log = front
    keeper.kill()  # not reaped: a zombie, as a launcher whose Java died is until its parent waits
    process.wait(timeout=15)
    assert "has exited: stopping" in log.read_text()


@pytest.mark.slow
def test_sigterm_ends_it_while_a_rest_request_hangs(tmp_path):
    import socket

    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    process, keeper, target, _ = start_front(tmp_path, silent.getsockname()[1])
    try:
        pb = stubs()
        with grpc.insecure_channel(target) as channel:
            stub = pb.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            pending = stub.Predictions.future(pb.inference_pb2.PredictionsRequest(
                model_name="mnist", input={"data": b"x"}), metadata=KEY, timeout=120)
            time.sleep(1)
            started = time.monotonic()
            process.terminate()
            process.wait(timeout=20)
            assert time.monotonic() - started < 10
            with pytest.raises(grpc.RpcError):
                pending.result(timeout=10)
    finally:
        silent.close()
        keeper.kill()
        keeper.wait()
        grpc_server.stop_process(process)


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
