"""The gRPC API: TorchServe's own protos, answered by a grpcio server in front of TorchServe's REST API.

    python -m serve.grpc_server --config CONFIG [--inference HOST:PORT] [--management HOST:PORT]

Clients keep the stubs generated from TorchServe's jar (serve/grpc_protos.py): the services,
methods and messages are TorchServe's (`org.pytorch.serve.grpc.inference` and `.management`).
Each call becomes one REST request to the TorchServe that CONFIG names (its inference and
management addresses, its request and response limits), and REST's answer becomes the call's:

- 200: the body is the prediction (or the management message), byte for byte;
- an error: the gRPC status for REST's status (STATUS_CODES) with REST's message as details, the
  handler's `error` or TorchServe's own `message`, word for word.

The trailing metadata `x-batch-size` says how many requests shared the model call, as REST's
X-Batch-Size header does.

Why not TorchServe's own gRPC listener (0.12.0, archived upstream): its frontend answers every
response of a dynamically batched request with OK whatever status the handler set for it (a bad
request batched with good ones got OK and the error JSON), says INTERNAL for an unknown model, lists
no model unless ListModels carries a limit, and throws on a StreamPredictions response without a
`ts_stream_next` header. Through REST each call is one request with a status of its own, and the
handler's batching still works: REST requests are batched like any others. TorchServe's own gRPC
listener still runs (it cannot be switched off), on internal loopback ports that `serve start`
and serve/process.py choose.

The server holds no key: the `authorization` metadata travels on as the Authorization header and
TorchServe decides. `--exit-with PID` ends it when that process is gone (the TorchServe it fronts).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import requests

from contract.paths import ROOT
from serve.client import read_properties
from serve.grpc_protos import stubs

# REST status -> gRPC status. TorchServe refuses a missing or wrong token with 400 and the type
# InvalidKeyException: that one is UNAUTHENTICATED (below), every other 400 INVALID_ARGUMENT.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,  # e.g. RegisterModel while enable_model_api=false
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over a decode limit or max_request_size
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,  # the job queue is full or no worker is up
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
TOKEN_REFUSED = "InvalidKeyException"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # a model name or version
INPUT_KEY = "data"  # TorchServe's convention; a lone entry under any other name is taken too
# Metadata that travels on as a header: the token, and the handler's per-request framing choice.
FORWARDED_METADATA = ("authorization", "x-framing")
DEFAULT_LIMIT = 6553500  # TorchServe's max_request_size and max_response_size when unset
# The message around the body (model name, map key, lengths) may take this much beyond
# max_request_size: bodies near the limit are REST's to judge, with REST's 413 and message.
MESSAGE_OVERHEAD = 4096
READY_TIMEOUT_S = 60  # compiling the stubs on a first start takes a few seconds
THREADS = 64  # calls in flight; each waits on one REST request while TorchServe batches them


class RestError(Exception):
    """REST's refusal, as the gRPC status and details it becomes."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def grpc_error(response: requests.Response) -> RestError:
    """The gRPC status and details for a REST answer other than 200."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("error") or body.get("message") or response.text
        if body.get("type") == TOKEN_REFUSED:
            return RestError(grpc.StatusCode.UNAUTHENTICATED, message)
    else:
        message = response.text.strip() or " ".join(filter(None, ("HTTP", str(response.status_code), response.reason)))
    code = STATUS_CODES.get(response.status_code,
                            grpc.StatusCode.INVALID_ARGUMENT if 400 <= response.status_code < 500
                            else grpc.StatusCode.INTERNAL)
    return RestError(code, str(message))


class Rest:
    """TorchServe's REST API, one HTTP session per server thread (requests' sessions are not
    shared safely between threads)."""

    def __init__(self, inference_url: str, management_url: str, timeout: float):
        self.inference_url, self.management_url, self.timeout = inference_url, management_url, timeout
        self.local = threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def call(self, context, method: str, url: str, **kwargs) -> bytes:
        headers = {name: value for name, value in context.invocation_metadata()
                   if name in FORWARDED_METADATA}
        headers.update(kwargs.pop("headers", {}))
        remaining = context.time_remaining()
        timeout = self.timeout if remaining is None else max(0.001, min(self.timeout, remaining))
        try:
            response = self.session().request(method, url, headers=headers, timeout=timeout, **kwargs)
        except requests.Timeout:
            raise RestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"TorchServe did not answer within {timeout:.1f} s") from None
        except requests.ConnectionError:
            raise RestError(grpc.StatusCode.UNAVAILABLE,
                            f"TorchServe is not answering at {url.split('/', 3)[2]}: is it running "
                            "(make serve)?") from None
        if "X-Batch-Size" in response.headers:  # how many requests shared the model call
            context.set_trailing_metadata([("x-batch-size", response.headers["X-Batch-Size"])])
        if response.status_code != 200:
            raise grpc_error(response)
        return response.content


def model_path(name: str, version: str = "") -> str:
    """/NAME or /NAME/VERSION. TorchServe decodes %2F in a path into a separator, so escaping
    cannot keep a name to its segment: names and versions are held to what TorchServe itself
    accepts for them."""
    if not name:
        raise RestError(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
    for what, value in (("model_name", name), ("model_version", version)):
        if value and not NAME.fullmatch(value):
            raise RestError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{what} {value[:64]!r} is not one: letters, digits, '_', '-' and '.', "
                            "starting with a letter or digit")
    return "/" + name + ("/" + version if version else "")


def request_body(request) -> bytes:
    """The one body in a PredictionsRequest's input map."""
    if INPUT_KEY in request.input:
        return request.input[INPUT_KEY]
    if len(request.input) == 1:
        return next(iter(request.input.values()))
    raise RestError(grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request's input map holds {len(request.input)} entries "
                    f"({', '.join(sorted(request.input)) or 'none'}); put the image bytes, base64 text "
                    f"or JSON body under '{INPUT_KEY}'")


def servicers(rest: Rest, pb):
    inference_pb2, management_pb2 = pb.inference_pb2, pb.management_pb2

    def predict(request, context) -> bytes:
        url = f"{rest.inference_url}/predictions{model_path(request.model_name, request.model_version)}"
        # gRPC carries no content type and needs none: the handler reads what the bytes are, as it
        # does for TorchServe's own gRPC.
        return rest.call(context, "POST", url, data=request_body(request),
                         headers={"Content-Type": "application/octet-stream"})

    def answer(call):
        """A unary method from `call(request, context) -> message`: refusals abort with their status."""
        def method(self, request, context):
            try:
                return call(request, context)
            except RestError as error:
                context.abort(error.code, error.details)
        return method

    class Inference(pb.inference_pb2_grpc.InferenceAPIsServiceServicer):
        Ping = answer(lambda request, context: inference_pb2.TorchServeHealthResponse(
            health=rest.call(context, "GET", f"{rest.inference_url}/ping").decode()))
        Predictions = answer(lambda request, context: inference_pb2.PredictionResponse(
            prediction=predict(request, context)))

        def StreamPredictions(self, request, context):
            # The model answers in one message: the stream carries it and ends.
            try:
                yield inference_pb2.PredictionResponse(prediction=predict(request, context))
            except RestError as error:
                context.abort(error.code, error.details)

        def StreamPredictions2(self, requests_, context):
            # One answer per request, in order; a refused one carries its status in the message
            # (PredictionResponse.status) and the stream goes on.
            from google.rpc import status_pb2

            for request in requests_:
                sequence = {"sequence_id": request.sequence_id} if request.HasField("sequence_id") else {}
                try:
                    yield inference_pb2.PredictionResponse(prediction=predict(request, context), **sequence)
                except RestError as error:
                    status = status_pb2.Status(code=error.code.value[0], message=error.details)
                    yield inference_pb2.PredictionResponse(status=status, **sequence)

    def management(call):
        return answer(lambda request, context: management_pb2.ManagementResponse(
            msg=call(request, context).decode()))

    def models(request) -> str:
        return f"{rest.management_url}/models{model_path(request.model_name, request.model_version)}"

    def present(**params) -> dict:
        """Query parameters for the fields a client set (proto3 reads an unset number as 0)."""
        return {name: str(value).lower() if isinstance(value, bool) else value
                for name, value in params.items() if value not in (0, "", False)}

    class Management(pb.management_pb2_grpc.ManagementAPIsServiceServicer):
        # An absent limit is REST's default (100), not TorchServe gRPC's 0 that lists nothing.
        ListModels = management(lambda r, c: rest.call(c, "GET", f"{rest.management_url}/models", params=present(
            limit=r.limit, next_page_token=r.next_page_token)))
        DescribeModel = management(lambda r, c: rest.call(c, "GET", models(r), params=present(
            customized=r.customized)))
        ScaleWorker = management(lambda r, c: rest.call(c, "PUT", models(r), params=present(
            min_worker=r.min_worker, max_worker=r.max_worker, number_gpu=r.number_gpu,
            synchronous=r.synchronous, timeout=r.timeout)))
        SetDefault = management(lambda r, c: rest.call(c, "PUT", models(r) + "/set-default"))
        UnregisterModel = management(lambda r, c: rest.call(c, "DELETE", models(r)))
        RegisterModel = management(lambda r, c: rest.call(c, "POST", f"{rest.management_url}/models", params=present(
            url=r.url, model_name=r.model_name, handler=r.handler, runtime=r.runtime,
            batch_size=r.batch_size, max_batch_delay=r.max_batch_delay, initial_workers=r.initial_workers,
            response_timeout=r.response_timeout, startup_timeout=r.startup_timeout,
            synchronous=r.synchronous, s3_sse_kms=r.s3_sse_kms)))

    return Inference(), Management()


class Front:
    """The two grpcio servers, inference and management, each on its own port with its own service."""

    def __init__(self, props: dict[str, str], inference: str, management: str):
        """`inference` and `management`: the HOST:PORT each service listens on."""
        pb = stubs()
        timeout = float(props.get("default_response_timeout", 120)) + 5
        rest = Rest(props.get("inference_address", "http://127.0.0.1:8080"),
                    props.get("management_address", "http://127.0.0.1:8081"), timeout)
        limits = [("grpc.max_receive_message_length",
                   int(props.get("max_request_size", DEFAULT_LIMIT)) + MESSAGE_OVERHEAD),
                  ("grpc.max_send_message_length",
                   int(props.get("max_response_size", DEFAULT_LIMIT)) + MESSAGE_OVERHEAD),
                  ("grpc.so_reuseport", 0)]  # a port in use is an error, not shared
        # Calls beyond the job queue's size are refused at once (RESOURCE_EXHAUSTED), as REST's 503.
        queue = int(props.get("job_queue_size", 100))
        self.servers = []
        inference_service, management_service = servicers(rest, pb)
        for address, threads, add, service in (
                (inference, THREADS, pb.inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server, inference_service),
                (management, 4, pb.management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server, management_service)):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                                 maximum_concurrent_rpcs=queue, options=limits)
            add(service, server)
            try:
                bound = server.add_insecure_port(address)
            except RuntimeError:  # grpcio raises where older releases returned 0
                bound = 0
            if bound == 0:
                raise SystemExit(f"[grpc] cannot listen on {address}: is the port taken?")
            self.servers.append(server)
        for server in self.servers:
            server.start()

    def stop(self, grace: float = 5) -> None:
        for event in [server.stop(grace) for server in self.servers]:
            event.wait()

    def wait(self) -> None:
        for server in self.servers:
            server.wait_for_termination()


def start_process(config: Path, inference: str, management: str, log: Path,
                  exit_with_pid: int | None = None) -> subprocess.Popen:
    """This server in a process of its own (its own session, output into `log`), listening on
    the HOST:PORT `inference` and `management`; returned once both accept connections."""
    command = [sys.executable, "-m", "serve.grpc_server", "--config", str(config),
               "--inference", inference, "--management", management]
    if exit_with_pid is not None:
        command += ["--exit-with", str(exit_with_pid)]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    for address in (inference, management):
        host, port = address.rsplit(":", 1)
        target = f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"
        with grpc.insecure_channel(target) as channel:
            ready = grpc.channel_ready_future(channel)
            while True:
                try:
                    ready.result(timeout=0.5)
                    break
                except grpc.FutureTimeoutError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        process.kill() if process.poll() is None else None
                        tail = log.read_text(errors="replace")[-1500:]
                        raise RuntimeError(f"the gRPC server did not start on {address}: {tail}")
    return process


def stop_process(process: subprocess.Popen | None, patience: float = 15) -> None:
    """SIGTERM, then SIGKILL after `patience` seconds; returns once it has exited."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(patience)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def exit_with(pid: int, front: Front) -> None:
    """Stop `front` once process `pid` is gone, checking every second."""
    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"[grpc] process {pid} has exited: stopping", flush=True)
                front.stop(grace=2)
                return
            except PermissionError:
                pass
            time.sleep(1)
    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.grpc_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True,
                   help="the config.properties TorchServe runs with: its REST addresses and limits")
    p.add_argument("--inference", default="127.0.0.1:7070", metavar="HOST:PORT")
    p.add_argument("--management", default="127.0.0.1:7071", metavar="HOST:PORT")
    p.add_argument("--exit-with", type=int, default=None, metavar="PID",
                   help="stop when this process (the TorchServe fronted) has exited")
    args = p.parse_args(argv)
    front = Front(read_properties(args.config), args.inference, args.management)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=front.stop).start())
    if args.exit_with:
        exit_with(args.exit_with, front)
    print(f"[grpc] TorchServe's gRPC API on {args.inference} (inference) and {args.management} "
          "(management), answered through its REST API", flush=True)
    front.wait()


if __name__ == "__main__":
    main()
