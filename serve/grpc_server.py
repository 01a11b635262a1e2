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
TorchServe decides (a call without one is refused at once where tokens are on). It is a grpc.aio
server calling REST with aiohttp: every call is a coroutine, none holds a thread. `--exit-with
PID` ends it when that process is gone (the TorchServe it fronts).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc

from contract.paths import ROOT
from serve.client import read_properties, tokens_on
from serve.grpc_protos import INPUT_KEY, stubs

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
# What TorchServe answers for a missing key; a call without one is refused with it before it
# holds anything, when CONFIG has tokens on.
NO_KEY = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # a model name or version
# Metadata that travels on as a header: the token, and the handler's per-request framing choice.
FORWARDED_METADATA = ("authorization", "x-framing")
# Printable ASCII (nothing a header could split on), at most 4 KiB: grpc refuses more than 8 KiB of
# metadata in all, and drops calls at random between its soft limit and that.
HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,4096}")
DEFAULT_LIMIT = 6553500  # TorchServe's max_request_size and max_response_size when unset
# The message around the body (model name, map key, lengths) may take this much beyond
# max_request_size: bodies near the limit are REST's to judge, with REST's 413 and message.
MESSAGE_OVERHEAD = 4096
MAX_DETAILS = 2048  # UTF-8 bytes of a status's details: they travel in a header
READY_TIMEOUT_S = 60  # compiling the stubs on a first start takes a few seconds
# Every call is a coroutine: one waiting for its message holds no thread and no place. Predictions
# in flight to REST are bounded by TorchServe's job_queue_size: one more is refused at once
# (UNAVAILABLE, as REST's 503 for a full queue), never left to burn its deadline waiting. Ping and
# the management calls have connections of their own: slow predictions cannot hold them up.
CONTROL_CONNECTIONS = 8
STREAM_FIRST_S = 10  # a StreamPredictions2 stream whose first message takes longer is ended
STREAM_IDLE_S = 60  # ... and one with no new message for this long
CONNECTION_AGE_MS = 30 * 60 * 1000  # connections are recycled (clients reconnect by themselves)
logger = logging.getLogger("serve.grpc_server")


class RestError(Exception):
    """REST's refusal, as the gRPC status and details it becomes."""

    def __init__(self, code: grpc.StatusCode, details: str):
        # grpc percent-encodes every byte of the UTF-8 outside printable ASCII (up to 3x) into a
        # header: the cap is on the encoded bytes, well below grpc's 8 KiB for all metadata.
        encoded = details.encode()
        if len(encoded) > MAX_DETAILS:
            details = encoded[:MAX_DETAILS - 3].decode("utf-8", "ignore") + "..."
        super().__init__(details)
        self.code, self.details = code, details


def grpc_error(status: int, data: bytes, reason: str | None = None) -> RestError:
    """The gRPC status and details for a REST answer that is not a success."""
    text = data.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("error") or body.get("message") or text
        if not isinstance(message, str):
            message = json.dumps(message)
        if body.get("type") == TOKEN_REFUSED:
            return RestError(grpc.StatusCode.UNAUTHENTICATED, message)
    else:
        message = text.strip() or " ".join(filter(None, ("HTTP", str(status), reason)))
    code = STATUS_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500
                            else grpc.StatusCode.INTERNAL)
    return RestError(code, str(message))


def forwarded_headers(context) -> dict[str, str]:
    """The metadata that travels on as headers, checked: a value REST could not take as it is is
    refused here, without repeating it (it may be a key)."""
    headers = {}
    for name, value in context.invocation_metadata() or ():
        if name in FORWARDED_METADATA:
            value = value.strip() if isinstance(value, str) else ""
            if not HEADER_VALUE.fullmatch(value):
                raise RestError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the {name} metadata is empty, too long or holds characters other "
                                "than printable ASCII")
            headers[name] = value
    return headers


class Rest:
    """TorchServe's REST API over aiohttp sessions, all on the event loop (no thread per call):
    one for predictions, at most `queue` in flight, one for Ping and management."""

    def __init__(self, inference_url: str, management_url: str, timeout: float, queue: int):
        self.inference_url, self.management_url, self.timeout = inference_url, management_url, timeout
        self.queue = queue
        self.in_flight = 0
        self.predictions: aiohttp.ClientSession | None = None
        self.control: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # No proxy from the environment (it would see every caller's key) and no ~/.netrc: the
        # REST API is on loopback.
        def session(limit: int) -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), trust_env=False,
                                         auto_decompress=False)
        self.predictions, self.control = session(self.queue), session(CONTROL_CONNECTIONS)

    async def close(self) -> None:
        for session in (self.predictions, self.control):
            if session is not None:
                await session.close()

    async def predict(self, context, url: str, body: bytes) -> bytes:
        """POST `body` to `url`, or UNAVAILABLE at once when `queue` predictions are in flight."""
        if self.in_flight >= self.queue:
            raise RestError(grpc.StatusCode.UNAVAILABLE,
                            f"{self.queue} predictions are in flight (job_queue_size): retry shortly")
        self.in_flight += 1
        try:
            return await self.call(context, "POST", url, data=body, session=self.predictions,
                                   headers={"Content-Type": "application/octet-stream"})
        finally:
            self.in_flight -= 1

    async def call(self, context, method: str, url: str, session: aiohttp.ClientSession | None = None,
                   **kwargs) -> bytes:
        """One REST request on `session` (the control one by default); its body, or RestError."""
        session = session or self.control
        headers = forwarded_headers(context)
        headers.update(kwargs.pop("headers", {}))
        remaining = context.time_remaining()
        timeout = self.timeout if remaining is None else max(0.001, min(self.timeout, remaining))
        try:
            async with session.request(method, url, headers=headers, allow_redirects=False,
                                       timeout=aiohttp.ClientTimeout(total=timeout), **kwargs) as response:
                data = await response.read()
        except TimeoutError:
            raise RestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"TorchServe did not answer within {timeout:.1f} s") from None
        except (aiohttp.ClientConnectionError, ConnectionError):
            raise RestError(grpc.StatusCode.UNAVAILABLE,
                            f"TorchServe is not answering at {url.split('/', 3)[2]}: is it running "
                            "(make serve)?") from None
        except (aiohttp.ClientError, ValueError) as error:
            logger.warning("REST request failed in aiohttp: %s", type(error).__name__)
            raise RestError(grpc.StatusCode.INTERNAL, "the request could not be sent to TorchServe "
                            f"({type(error).__name__})") from None
        if "X-Batch-Size" in response.headers:  # how many requests shared the model call
            context.set_trailing_metadata((("x-batch-size", response.headers["X-Batch-Size"]),))
        if not 200 <= response.status < 300:
            raise grpc_error(response.status, data, response.reason)
        return data


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
    names = sorted(request.input)
    shown = ", ".join(repr(n[:64]) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    raise RestError(grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request's input map holds {len(names)} entries ({shown or 'none'}); put the "
                    f"image bytes, base64 text or JSON body under '{INPUT_KEY}'")


def servicers(rest: Rest, pb):
    inference_pb2, management_pb2 = pb.inference_pb2, pb.management_pb2

    async def predict(request, context) -> bytes:
        url = f"{rest.inference_url}/predictions{model_path(request.model_name, request.model_version)}"
        # gRPC carries no content type and needs none: the handler reads what the bytes are, as it
        # does for TorchServe's own gRPC.
        return await rest.predict(context, url, request_body(request))

    def answer(call):
        """A unary method from `async call(request, context) -> message`: refusals abort with
        their status."""
        async def method(self, request, context):
            try:
                return await call(request, context)
            except RestError as error:
                await context.abort(error.code, error.details)
        return method

    async def ping(request, context):
        return inference_pb2.TorchServeHealthResponse(
            health=(await rest.call(context, "GET", f"{rest.inference_url}/ping")).decode())

    async def predictions(request, context):
        return inference_pb2.PredictionResponse(prediction=await predict(request, context))

    class Inference(pb.inference_pb2_grpc.InferenceAPIsServiceServicer):
        Ping = answer(ping)
        Predictions = answer(predictions)

        async def StreamPredictions(self, request, context):
            # The model answers in one message: the stream carries it and ends.
            try:
                reply = inference_pb2.PredictionResponse(prediction=await predict(request, context))
            except RestError as error:
                await context.abort(error.code, error.details)
            yield reply

        async def StreamPredictions2(self, request_iterator, context):
            # One answer per request, in order; a refused one carries its status in the message
            # (PredictionResponse.status) and the stream goes on. A stream left idle is ended.
            from google.rpc import status_pb2

            patience = STREAM_FIRST_S
            while True:
                try:
                    request = await asyncio.wait_for(context.read(), patience)
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"no message for {patience} s: the stream is ended")
                if request is grpc.aio.EOF:
                    return
                patience = STREAM_IDLE_S
                sequence = {"sequence_id": request.sequence_id} if request.HasField("sequence_id") else {}
                try:
                    reply = inference_pb2.PredictionResponse(prediction=await predict(request, context), **sequence)
                except RestError as error:
                    if error.code == grpc.StatusCode.UNAUTHENTICATED:  # no later message has another key
                        await context.abort(error.code, error.details)
                    reply = inference_pb2.PredictionResponse(
                        status=status_pb2.Status(code=error.code.value[0], message=error.details), **sequence)
                await context.write(reply)

    def management(call):
        async def message(request, context):
            return management_pb2.ManagementResponse(msg=(await call(request, context)).decode())
        return answer(message)

    def models(request) -> str:
        return f"{rest.management_url}/models{model_path(request.model_name, request.model_version)}"

    def present(**params) -> dict:
        """Query parameters for the fields a client set (proto3 reads an unset number as 0, so a
        0 cannot be sent: REST's default applies, as on TorchServe's own listener). A negative
        worker or GPU count is refused: TorchServe takes it and removes every worker."""
        for name in ("min_worker", "max_worker", "number_gpu"):
            if params.get(name, 0) < 0:
                raise RestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is {params[name]}: it cannot be negative")
        return {name: str(value).lower() if isinstance(value, bool) else value
                for name, value in params.items() if value not in (0, "", False)}

    def set_default(r, c):
        if not r.model_version:
            raise RestError(grpc.StatusCode.INVALID_ARGUMENT, "SetDefault needs model_version: the version to make the default")
        return rest.call(c, "PUT", models(r) + "/set-default")

    class Management(pb.management_pb2_grpc.ManagementAPIsServiceServicer):
        # An absent limit is REST's default (100), not TorchServe gRPC's 0 that lists nothing.
        ListModels = management(lambda r, c: rest.call(c, "GET", f"{rest.management_url}/models", params=present(
            limit=r.limit, next_page_token=r.next_page_token)))
        DescribeModel = management(lambda r, c: rest.call(c, "GET", models(r), params=present(
            customized=r.customized)))
        ScaleWorker = management(lambda r, c: rest.call(c, "PUT", models(r), params=present(
            min_worker=r.min_worker, max_worker=r.max_worker, number_gpu=r.number_gpu,
            synchronous=r.synchronous, timeout=r.timeout)))
        SetDefault = management(set_default)
        UnregisterModel = management(lambda r, c: rest.call(c, "DELETE", models(r)))
        RegisterModel = management(lambda r, c: rest.call(c, "POST", f"{rest.management_url}/models", params=present(
            url=r.url, model_name=r.model_name, handler=r.handler, runtime=r.runtime,
            batch_size=r.batch_size, max_batch_delay=r.max_batch_delay, initial_workers=r.initial_workers,
            response_timeout=r.response_timeout, startup_timeout=r.startup_timeout,
            synchronous=r.synchronous, s3_sse_kms=r.s3_sse_kms)))

    return Inference(), Management()


class KeyRequired(grpc.aio.ServerInterceptor):
    """Refuse a call without `authorization` metadata at once, as TorchServe would, before it
    waits for its message or holds a place among the calls in flight."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or any(name == "authorization" and str(value).strip()
                                  for name, value in details.invocation_metadata or ()):
            return handler

        async def refuse(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_KEY)

        async def refuse_streaming(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_KEY)
            yield  # an async generator, as a response-streaming handler must be

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, handler.response_streaming)]
        return make(refuse_streaming if handler.response_streaming else refuse,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class Front:
    """The two grpc.aio servers, inference and management, each on its own port with its own service."""

    def __init__(self, props: dict[str, str], inference: str, management: str):
        """`inference` and `management`: the HOST:PORT each service listens on."""
        self.props, self.addresses = props, (inference, management)
        self.servers: list[grpc.aio.Server] = []
        self.rest: Rest | None = None

    async def start(self) -> None:
        props, pb = self.props, stubs()
        timeout = float(props.get("default_response_timeout", 120)) + 5
        rest = Rest(props.get("inference_address", "http://127.0.0.1:8080"),
                    props.get("management_address", "http://127.0.0.1:8081"), timeout,
                    int(props.get("job_queue_size", 100)))
        await rest.open()
        self.rest = rest
        options = [("grpc.max_receive_message_length",
                    int(props.get("max_request_size", DEFAULT_LIMIT)) + MESSAGE_OVERHEAD),
                   ("grpc.max_send_message_length",
                    int(props.get("max_response_size", DEFAULT_LIMIT)) + MESSAGE_OVERHEAD),
                   ("grpc.max_connection_age_ms", CONNECTION_AGE_MS),
                   ("grpc.max_connection_age_grace_ms", 60_000),
                   ("grpc.so_reuseport", 0)]  # a port in use is an error, not shared
        interceptors = [KeyRequired()] if tokens_on(props) else []
        inference_service, management_service = servicers(rest, pb)
        for address, add, service in (
                (self.addresses[0], pb.inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server, inference_service),
                (self.addresses[1], pb.management_pb2_grpc.add_ManagementAPIsServiceServicer_to_server, management_service)):
            server = grpc.aio.server(interceptors=interceptors, options=options)
            add(service, server)
            try:
                bound = server.add_insecure_port(address)
            except RuntimeError:  # grpcio raises where older releases returned 0
                bound = 0
            if bound == 0:
                raise SystemExit(f"[grpc] cannot listen on {address}: is the port taken?")
            self.servers.append(server)
        for server in self.servers:
            await server.start()

    async def stop(self, grace: float = 5) -> None:
        await asyncio.gather(*(server.stop(grace) for server in self.servers))
        await self.rest.close()

    async def wait(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self.servers))


def start_process(config: Path, inference: str, management: str, log: Path,
                  exit_with_pid: int | None = None) -> subprocess.Popen:
    """This server in a process of its own (its own session, output into `log`), listening on
    the HOST:PORT `inference` and `management`; returned once both accept connections."""
    command = [sys.executable, "-m", "serve.grpc_server", "--config", str(config),
               "--inference", inference, "--management", management]
    if exit_with_pid is not None:
        command += ["--exit-with", str(exit_with_pid)]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # its owner's only, like TorchServe's logs
    with os.fdopen(fd, "ab") as out:
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


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie its parent has not reaped yet has)."""
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


async def serve(args) -> None:
    front = Front(read_properties(args.config), args.inference, args.management)
    await front.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def watch(pid: int) -> None:
        while not gone(pid):
            await asyncio.sleep(1)
        print(f"[grpc] process {pid} has exited: stopping", flush=True)
        stopping.set()

    watcher = asyncio.create_task(watch(args.exit_with)) if args.exit_with else None
    print(f"[grpc] TorchServe's gRPC API on {args.inference} (inference) and {args.management} "
          "(management), answered through its REST API", flush=True)
    await stopping.wait()
    if watcher is not None:
        watcher.cancel()
    await front.stop(grace=5)


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
    # Unexpected errors in a call reach the log (grpc's own logger only has a NullHandler).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    print("[grpc] stopped", flush=True)


if __name__ == "__main__":
    main()
