"""Serve the archive with TorchServe from the repository root.

    python -m serve start             copy model_store/mnist.mar into logs/private/model_store/
                                      (read-only), verify that copy (signature, contents, the
                                      pinned --expect-sha256, no rollback: serve/trust.py), then
                                      torchserve --start --ncs with config.properties serving the
                                      copy; wait for a READY worker (--foreground: exec TorchServe);
                                      then the gRPC API in front of it (serve/grpc_server.py) on
                                      config.properties' grpc_* ports, TorchServe's own gRPC
                                      listener moved to free loopback ports
    python -m serve predict IMAGE...  POST each image with the inference key; prints the answer
    python -m serve predict --grpc IMAGE...  the same over the gRPC API (port 7070)
    python -m serve grpc-stubs DIR    write Python stubs of TorchServe's own protos into DIR
    python -m serve token             print the inference key alone (for a client that should
                                      not see key_file.json's management and API keys)
    python -m serve status            the model's workers
    python -m serve stop              stop the gRPC API, torchserve --stop, then wait until both
                                      have exited

TorchServe's pid file and worker sockets go to logs/private/ (mode 0700) instead of the shared
/tmp; key_file.json and logs are created with umask 077 (readable by their owner only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from contract.paths import ROOT
from serve.client import MODEL_NAME, Server, ServerError, content_type_of
from serve.process import (anchored_allowed_urls, free_ports, private_directory, private_environment,
                           torchserve_command, write_config)

STOP_PATIENCE_S = 60


def verify_before_serving(mar: Path, private: Path, args) -> tuple[Path, dict, str]:
    """Copy `mar` into `private`/model_store, read-only, and check that copy: the digest pinned by
    --expect-sha256, the signature and contents (export/verify.py), and no rollback against the
    newest release this host has served (serve/trust.py). Returns (the model store to serve, the
    release, the SHA-256); SystemExit before TorchServe starts otherwise."""
    from contract.bundle import BundleError
    from export.verify import verify_archive_release
    from serve import trust
    allow_unsigned = args.allow_unsigned or os.environ.get("ALLOW_UNSIGNED") == "1"
    try:
        expected = trust.check_digest(args.expect_sha256) if args.expect_sha256 else None
        copy, digest = trust.private_copy(mar, private / "model_store", mar.name)
        if expected is not None and digest != expected:
            raise trust.TrustError(f"{mar} has SHA-256 {digest}, not the pinned {expected} "
                                   "(--expect-sha256): refusing any other archive")
        verified = verify_archive_release(copy, allow_unsigned=allow_unsigned, run_self_test=False)
        freshness = trust.ServedState().check(MODEL_NAME, verified.release, digest, args.allow_rollback)
    except BundleError as error:
        raise SystemExit(f"[serve] refusing to serve: {error}\n[serve] TorchServe was not started. "
                         "Rebuild and sign the archive with `make archive` (where the private key "
                         "is), or pin the right public key ($MNIST_SIGNING_PUBLIC_KEY)") from None
    copy = trust.install(copy, mar.name)
    print(f"[serve] serving the verified read-only copy {copy} (SHA-256 {digest}"
          f"{', as pinned' if expected else ''}); model version {verified.release['model_version']}: "
          f"{freshness}")
    return copy.parent, verified.release, digest


def start(args, server: Server) -> None:
    store = args.model_store.resolve()
    mar = store / f"{MODEL_NAME}.mar"
    if not mar.exists():
        raise SystemExit(f"{mar} is missing: run `make archive` first")
    private = private_directory(args.workdir / "logs" / "private")
    served_store, release, digest = verify_before_serving(mar, private, args)
    # The effective config: the shipped one with the verified copy's folder as the model store,
    # and allowed_urls anchored to it (a relative `model_store` and a `.*model_store.*` pattern
    # would follow the working directory and admit any path containing the word).
    config = private / "config.properties"
    overrides = {"model_store": str(served_store), "allowed_urls": anchored_allowed_urls(served_store)}
    if not args.foreground:
        # config.properties' gRPC ports are the gRPC API's (started below); TorchServe's own
        # listener, whose statuses are wrong under batching (serve/grpc_server.py), takes free
        # loopback ports nobody is told about.
        internal = free_ports(2)
        overrides.update(grpc_inference_address="127.0.0.1", grpc_management_address="127.0.0.1",
                         grpc_inference_port=str(internal[0]), grpc_management_port=str(internal[1]))
    write_config(args.config, config, overrides)
    if args.foreground:
        start_in_foreground(args, config, private, release, digest)
    command = [torchserve_command(), "--start", "--ncs", "--ts-config", str(config)]
    print("[serve] " + " ".join(command[1:]).replace(str(args.workdir) + "/", ""))
    # The Java process inherits the launcher's stdout: a pipe here would never close, so its
    # console output goes to a file beside TorchServe's own logs.
    console = args.workdir / "logs" / "torchserve-console.log"
    with open(console, "w") as out:
        returncode = subprocess.run(command, cwd=args.workdir, stdout=out, stderr=subprocess.STDOUT,
                                    umask=0o077, env={**os.environ, **private_environment(private / "tmp")}
                                    ).returncode
    said = console.read_text()
    if returncode != 0 or "already running" in said:
        raise SystemExit(f"[serve] torchserve --start failed: {said.strip()[-2000:]}")
    description = server.wait_until_ready(timeout=args.timeout, every_worker=True)
    from serve.trust import ServedState
    ServedState().record(MODEL_NAME, release, digest)
    if server.key_file.exists():
        os.chmod(server.key_file, 0o600)  # umask 077 made it so; an older file is tightened
    worker = next(w for w in description["workers"] if w["status"] == "READY")
    print(f"[serve] {MODEL_NAME} is READY (worker pid {worker['pid']}, gpu {worker['gpu']}, "
          f"batch size {description['batchSize']}, max delay {description['maxBatchDelay']} ms)")
    start_grpc(args.workdir, config, server)
    print("[serve] call it with the inference key (key_file.json, readable by you only):\n"
          "  TOKEN=$(python -m serve token)\n"
          f"  curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/octet-stream' "
          f"--data-binary @image.png {server.inference_url}/predictions/{MODEL_NAME}\n"
          "  or: make predict IMG=image.png        stop it with: make stop")


def grpc_pid_file(workdir: Path) -> Path:
    return workdir / "logs" / "private" / "grpc-server.pid"


def frontend_pid_file(workdir: Path) -> Path:
    """The pid file TorchServe's launcher writes into its TMPDIR (private_environment)."""
    return workdir / "logs" / "private" / "tmp" / ".model_server.pid"


def start_grpc(workdir: Path, config: Path, server: Server) -> None:
    """The gRPC API in front of the TorchServe just started, on `server`'s gRPC addresses; it
    exits by itself when TorchServe's frontend does."""
    from serve import grpc_server
    frontend = int(frontend_pid_file(workdir).read_text().split()[0])
    try:
        process = grpc_server.start_process(config, server.grpc_inference_target, server.grpc_management_target,
                                            workdir / "logs" / "grpc-server.log", exit_with_pid=frontend)
    except RuntimeError as error:
        stop(workdir)
        raise SystemExit(f"[serve] {error}\n[serve] TorchServe was stopped again; free the port or set "
                         "grpc_inference_port / grpc_management_port in config.properties") from None
    grpc_pid_file(workdir).write_text(f"{process.pid}\n")
    print(f"[serve] gRPC API (TorchServe's protos) on {server.grpc_inference_target} (inference) and "
          f"{server.grpc_management_target} (management); docs/grpc.md")


def stop_grpc(workdir: Path) -> None:
    """End the gRPC API that `start` left running, and wait until it has exited."""
    import psutil
    pid_file = grpc_pid_file(workdir)
    try:
        process = psutil.Process(int(pid_file.read_text().split()[0]))
        if "serve.grpc_server" not in " ".join(process.cmdline()):
            raise psutil.NoSuchProcess(process.pid)  # the pid was reused by another program
    except (OSError, ValueError, IndexError, psutil.Error):
        pid_file.unlink(missing_ok=True)
        return
    process.terminate()
    _, alive = psutil.wait_procs([process], timeout=15)
    for straggler in alive:
        straggler.kill()
    pid_file.unlink(missing_ok=True)
    print("[serve] the gRPC API has exited")


def start_in_foreground(args, config: Path, private: Path, release: dict, digest: str) -> None:
    """Become TorchServe (--foreground), as a container's entrypoint does: the process that
    verified the archive is replaced by the server, so nothing else runs between the two."""
    from serve.trust import ServedState
    ServedState().record(MODEL_NAME, release, digest)
    command = [torchserve_command(), "--start", "--foreground", "--ncs", "--ts-config", str(config)]
    print("[serve] exec " + " ".join(command[1:]), flush=True)
    os.chdir(args.workdir)
    os.umask(0o077)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # workers import the archive's contract/
    os.execve(command[0], command, {**env, **private_environment(private / "tmp")})


def predict_grpc(args, server: Server) -> int:
    """predict over the gRPC API: the same bodies and answers as REST, its errors as gRPC statuses."""
    import grpc

    from serve.grpc_client import GrpcClient

    failures = 0
    with GrpcClient(server) as client:
        for path in args.images:
            try:
                body = json.loads(client.predict(Path(path).read_bytes()))
            except grpc.RpcError as error:
                print(f"{path}: gRPC {error.code().name} {error.details()}")
                failures += 1
                continue
            if args.json:
                print(json.dumps(body))
            else:
                print(f"{path}: {body['class']} (label {body['label']}, p={body['probabilities'][body['label']]:.4f})")
    return 1 if failures else 0


def predict(args, server: Server) -> int:
    if args.grpc:
        return predict_grpc(args, server)
    failures = 0
    for path in args.images:
        response = server.predict(Path(path).read_bytes(), content_type_of(path))
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text
        if response.status_code == 200 and not args.json:
            top = body["probabilities"][body["label"]]
            print(f"{path}: {body['class']} (label {body['label']}, p={top:.4f})")
        else:
            print(f"{path}: HTTP {response.status_code} {json.dumps(body)}" if response.status_code != 200
                  else json.dumps(body))
        failures += response.status_code != 200
    return 1 if failures else 0


def stop(workdir: Path) -> None:
    """torchserve --stop, then wait until the frontend and its workers have exited: the launcher
    returns as soon as it has sent the signal, seconds before the Java process is gone."""
    import psutil
    stop_grpc(workdir)
    pid_file = frontend_pid_file(workdir)
    tmp = pid_file.parent
    processes = []
    try:
        frontend = psutil.Process(int(pid_file.read_text().split()[0]))
        processes = [frontend, *frontend.children(recursive=True)]
    except (OSError, ValueError, IndexError, psutil.Error):
        pass  # not running, or started otherwise: the launcher says so below
    subprocess.run([torchserve_command(), "--stop"], cwd=workdir, check=False,
                   env={**os.environ, **private_environment(tmp)})
    started = time.monotonic()
    _, alive = psutil.wait_procs(processes, timeout=STOP_PATIENCE_S)
    if alive:
        raise SystemExit(f"[serve] TorchServe still running after {STOP_PATIENCE_S} s: pids "
                         f"{', '.join(str(p.pid) for p in alive)}")
    if processes:
        print(f"[serve] TorchServe has exited ({len(processes)} processes, "
              f"{time.monotonic() - started:.1f} s after the stop signal)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("start", "stop", "status", "predict", "token", "grpc-stubs"))
    p.add_argument("images", nargs="*", help="predict: image files; grpc-stubs: the folder to write into")
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY")
    p.add_argument("--json", action="store_true", help="print the full JSON answers")
    p.add_argument("--grpc", action="store_true", help="predict over the gRPC API instead of REST")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store",
                   help="start: the folder holding mnist.mar")
    p.add_argument("--workdir", type=Path, default=ROOT,
                   help="where TorchServe runs: key_file.json, logs/, logs/private/ (pid file, sockets)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="start: serve although no public key is configured (or ALLOW_UNSIGNED=1); "
                        "says so loudly")
    p.add_argument("--expect-sha256", default=None, metavar="DIGEST",
                   help="start: serve only the archive with this SHA-256 (sha256sum model_store/mnist.mar)")
    p.add_argument("--allow-rollback", action="store_true",
                   help="start: serve an archive older than the newest this host has served")
    p.add_argument("--foreground", action="store_true",
                   help="start: verify, then become TorchServe in the foreground (a container's entrypoint)")
    p.add_argument("--inference-key-file", type=Path, default=None,
                   help="predict: a file holding the inference key alone (from `python -m serve token`)")
    args = p.parse_intermixed_args(argv)
    args.workdir = args.workdir.resolve()
    server = Server.from_config(args.config, args.workdir)
    server.inference_key_file = args.inference_key_file
    try:
        if args.command == "start":
            start(args, server)
        elif args.command == "stop":
            stop(args.workdir)
        elif args.command == "token":
            print(server.key("inference"))
        elif args.command == "grpc-stubs":
            from serve.grpc_client import write_stubs
            if len(args.images) != 1:
                raise SystemExit("usage: python -m serve grpc-stubs DIR (writes inference_pb2*.py and management_pb2*.py)")
            print(f"[serve] wrote the gRPC stubs of TorchServe's protos into {write_stubs(Path(args.images[0]))}")
        elif args.command == "status":
            print(json.dumps(server.describe(), indent=2))
        else:
            if not args.images:
                raise SystemExit("predict needs image paths: python -m serve predict IMAGE...")
            sys.exit(predict(args, server))
    except ServerError as error:
        raise SystemExit(f"[serve] {error}")
    except OSError as error:  # connection refused, missing image file
        raise SystemExit(f"[serve] {error}")
