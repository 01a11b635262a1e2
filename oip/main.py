"""Serve the archive over the Open Inference Protocol (KServe v2), REST and gRPC.

    python -m oip serve   verify model_store/mnist.mar as `make serve` does (serve/trust.py: a private
                          copy, the pinned --expect-sha256, the signature and SHA-256 sums, no
                          rollback) into a private read-only folder, self-test its model.onnx,
                          then run KServe's ModelServer on it in the foreground
    python -m oip start   `serve` in the background (logs/oip/); returns once the model is ready
                          and prints the REST and gRPC addresses
    python -m oip stop    stop what `start` started; returns once it has exited

Ports: OIP_HTTP_PORT (8085) and OIP_GRPC_PORT (8086), beside TorchServe's 8080-8082 and
7070-7071; OIP_HOST (127.0.0.1). Inside a KServe pod the image runs `serve --host 0.0.0.0
--http-port 8080 --grpc-port 8081`, the ports KServe's ModelServer and InferenceService expect.
Runs in .venv-oip (`make oip-venv`): kserve's gRPC stubs need protobuf < 7.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from contract import MODEL_NAME
from contract.paths import ROOT

DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT = 8085, 8086
STOP_PATIENCE_S = 45  # KServe's grace period for requests in flight is 30 s


def verified_copy(mar: Path, allow_unsigned: bool, expect_sha256: str | None = None,
                  allow_rollback: bool = False) -> tuple[Path, dict, str]:
    """Check `mar` as `make serve` does (serve/trust.py) and unpack it into a new private
    read-only folder; returns the folder, the archive's release (release.json) and its SHA-256.

    The archive is copied first and only the copy is hashed, checked against the pinned digest
    (--expect-sha256), verified (structure, signature, hashes) and unpacked: never the archive,
    which could change after the check. Its release must not be older than the newest this host
    has served (--allow-rollback to mean it). The model is ONNX, so the check needs no torch
    (TorchServe's path self-tests its own format in the worker; here MnistOnnxModel.load
    self-tests model.onnx)."""
    from contract.bundle import BundleError
    from export.verify import verify_archive_release
    from serve import trust

    private = Path(tempfile.mkdtemp(prefix="oip-model-"))  # mkdtemp: mode 0700
    tree = private / "archive"
    try:
        expected = trust.check_digest(expect_sha256) if expect_sha256 else None
        copy, digest = trust.private_copy(mar, private, mar.name)
        if expected is not None and digest != expected:
            raise trust.TrustError(f"{mar} has SHA-256 {digest}, not the pinned {expected} "
                                   "(--expect-sha256): refusing any other archive")
        verified = verify_archive_release(copy, allow_unsigned=allow_unsigned, run_self_test=False,
                                          unpack_into=tree)
        freshness = trust.ServedState().check(MODEL_NAME, verified.release, digest, allow_rollback)
    except BundleError as error:
        remove_copy(tree)
        raise SystemExit(f"[oip] refusing to serve: {error}\n[oip] Rebuild and sign the archive with "
                         "`make archive` (where the private key is), or pin the right public key "
                         "($MNIST_SIGNING_PUBLIC_KEY) and digest (--expect-sha256)") from None
    copy.unlink()
    for path in sorted(tree.rglob("*"), reverse=True):
        path.chmod(0o500 if path.is_dir() else 0o400)
    tree.chmod(0o500)
    print(f"[oip] verified {mar} (SHA-256 {digest}{', as pinned' if expected else ''}); model version "
          f"{verified.release['model_version']}: {freshness}", flush=True)
    return tree, verified.release, digest


def remove_copy(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")] if tree.exists() else []:
        if path.is_dir():
            path.chmod(0o700)
    shutil.rmtree(tree.parent, ignore_errors=True)


def bind_to(host: str) -> None:
    """Make KServe's ModelServer listen on `host` only.

    kserve 0.21 binds REST to 0.0.0.0 and gRPC to [::], fixed: right inside a pod, wrong on a
    laptop or a shared host, where the default here is loopback. Both servers are built inside
    ModelServer.start(); this sets the address on what it builds."""
    import grpc
    import kserve.model_server
    import kserve.protocol.grpc.server as grpc_server
    from kserve.protocol.rest.server import RESTServer

    class HostRESTServer(RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host  # read by uvicorn when it starts serving

    literal = f"[{host}]" if ":" in host else host

    class HostAio:
        def __getattr__(self, name):
            return getattr(grpc.aio, name)

        @staticmethod
        def server(*args, **kwargs):
            server = grpc.aio.server(*args, **kwargs)
            add_port = server.add_insecure_port
            server.add_insecure_port = lambda address: add_port(literal + address[address.rindex(":"):])
            return server

    kserve.model_server.RESTServer = HostRESTServer
    grpc_server.aio = HostAio()


class JsonWhenUndeclared:
    """ASGI middleware: an infer body with neither a Content-Type nor an
    Inference-Header-Content-Length is JSON, as the protocol says.

    tritonclient's http client sends JSON bodies with no Content-Type; kserve 0.21 then takes the
    body for binary tensors and answers 400 "the 'inference-header-content-length' header is
    missing"."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            names = {name.lower() for name, _ in scope["headers"]}
            if not names & {b"content-type", b"inference-header-content-length"}:
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def serve(args) -> None:
    mar = args.model_store.resolve() / f"{MODEL_NAME}.mar"
    if not mar.exists():
        raise SystemExit(f"[oip] {mar} is missing: run `make archive` first")
    tree, release, digest = verified_copy(mar, args.allow_unsigned or os.environ.get("ALLOW_UNSIGNED") == "1",
                                          args.expect_sha256, args.allow_rollback)
    try:
        # kserve parses sys.argv when it is imported: it must see none of ours.
        sys.argv = sys.argv[:1]
        import kserve.model_server
        from kserve import ModelServer

        from oip import versions
        from oip.model import MnistOnnxModel, TooLarge, too_large_handler

        version = str(release["model_version"])
        model = MnistOnnxModel(MODEL_NAME, tree, threads=args.threads, version=version)
        model.load()
        from serve.trust import ServedState
        ServedState().record(MODEL_NAME, release, digest)
        print(f"[oip] {MODEL_NAME} version {version}: model.onnx verified and self-tested; REST http://{args.host}:"
              f"{args.http_port}/v2, gRPC {args.host}:{args.grpc_port}", flush=True)
        bind_to(args.host)
        kserve.model_server.app.add_exception_handler(TooLarge, too_large_handler)
        kserve.model_server.app.add_middleware(JsonWhenUndeclared)
        versions.install({MODEL_NAME: version})
        ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                    enable_docs_url=False, enable_latency_logging=False).start([model])
    finally:
        remove_copy(tree)


def url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/v2/models/{MODEL_NAME}/ready", timeout=2) as response:
            return response.status == 200 and json.loads(response.read()).get("ready") is True
    except (OSError, ValueError):
        return False


def start(args) -> None:
    state = args.workdir / "logs" / "oip"
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    pid_file, log = state / "oip.pid", state / "oip.log"
    if pid_file.exists() and alive(int(pid_file.read_text())):
        raise SystemExit(f"[oip] already running (pid {pid_file.read_text().strip()}): make stop-oip first")
    base = url(args.host, args.http_port)
    if ready(base):
        raise SystemExit(f"[oip] something already answers on {base}: choose OIP_HTTP_PORT")
    command = [sys.executable, "-m", "oip", "serve", "--model-store", str(args.model_store.resolve()),
               "--host", args.host, "--http-port", str(args.http_port),
               "--grpc-port", str(args.grpc_port), "--threads", str(args.threads)]
    if args.allow_unsigned:
        command.append("--allow-unsigned")
    if args.expect_sha256:
        command += ["--expect-sha256", args.expect_sha256]
    if args.allow_rollback:
        command.append("--allow-rollback")
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + args.timeout
    while not ready(base):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                stop_process(process.pid)
            pid_file.unlink(missing_ok=True)
            raise SystemExit(f"[oip] the server did not become ready (exit code {process.poll()}); "
                             f"its log, {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    verified = next((line for line in log.read_text().splitlines() if line.startswith("[oip] verified")), "")
    if verified:
        print(verified)
    print(f"[oip] {MODEL_NAME} is ready (pid {process.pid}, log {log.relative_to(args.workdir)})\n"
          f"[oip]   REST  {base}/v2/models/{MODEL_NAME}/infer\n"
          f"[oip]   gRPC  {args.host}:{args.grpc_port} (inference.GRPCInferenceService)\n"
          f"[oip] stop it with: make stop-oip")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours has exited already
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_process(pid: int) -> float:
    """SIGTERM the server's process group; the seconds it took to exit."""
    started = time.monotonic()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0.0
    while alive(pid):
        if time.monotonic() - started > STOP_PATIENCE_S:
            raise SystemExit(f"[oip] the server (pid {pid}) is still running {STOP_PATIENCE_S} s "
                             "after SIGTERM")
        time.sleep(0.1)
    return time.monotonic() - started


def stop(args) -> None:
    pid_file = args.workdir / "logs" / "oip" / "oip.pid"
    if not pid_file.exists():
        print("[oip] not running (no logs/oip/oip.pid)")
        return
    pid = int(pid_file.read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if alive(pid) else []
    if b"oip" not in cmdline or b"serve" not in cmdline:
        pid_file.unlink()
        print(f"[oip] not running (pid {pid} is gone or another program)")
        return
    took = stop_process(pid)
    pid_file.unlink(missing_ok=True)
    print(f"[oip] the server has exited ({took:.1f} s after SIGTERM)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m oip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("serve", "start", "stop"))
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store",
                   help="the folder holding mnist.mar")
    p.add_argument("--host", default=os.environ.get("OIP_HOST", "127.0.0.1"),
                   help="address to listen on (OIP_HOST; 0.0.0.0 inside a container)")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("OIP_HTTP_PORT", DEFAULT_HTTP_PORT)))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("OIP_GRPC_PORT", DEFAULT_GRPC_PORT)))
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="onnxruntime intra-op threads")
    p.add_argument("--workdir", type=Path, default=ROOT, help="start/stop: logs/oip/ goes here")
    p.add_argument("--timeout", type=float, default=120, help="start: seconds to wait for ready")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="serve although no public key is configured (or ALLOW_UNSIGNED=1); says so loudly")
    p.add_argument("--expect-sha256", default=None, metavar="DIGEST",
                   help="serve only the archive with this SHA-256 (sha256sum model_store/mnist.mar)")
    p.add_argument("--allow-rollback", action="store_true",
                   help="serve an archive older than the newest this host has served")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    {"serve": serve, "start": start, "stop": stop}[args.command](args)
