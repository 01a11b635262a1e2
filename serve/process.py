"""A TorchServe of its own, for tests and benchmarks: private directory, free ports, always stopped.

`torchserve --start` returns at once and writes its pid file, logs/ and key_file.json into shared
places; a killed test can leave the Java process behind. Here TorchServe runs with --foreground
in its own process group and its own TMPDIR and TEMP (the launcher's pid file goes to TMPDIR, the
Java frontend's worker sockets to TEMP, its java.io.tmpdir), from a private working directory,
with umask 077 (key_file.json readable by its owner only), and stop() ends the whole group.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from contract.paths import ROOT
from serve.client import Server, read_properties



def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def torchserve_command() -> str:
    beside = Path(sys.executable).with_name("torchserve")
    found = str(beside) if beside.exists() else shutil.which("torchserve")
    if not found:
        raise RuntimeError("torchserve not found: run `make install`")
    return found


def write_config(source: Path, target: Path, overrides: dict[str, str]) -> None:
    """config.properties with `overrides` applied: the shipped settings, other ports and paths."""
    props = read_properties(source)
    props.update(overrides)
    # A relative metrics_config is relative to the shipped config, not to the private workdir.
    if "metrics_config" in props and not Path(props["metrics_config"]).is_absolute():
        props["metrics_config"] = str((source.parent / props["metrics_config"]).resolve())
    target.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def anchored_allowed_urls(model_store: Path) -> str:
    """allowed_urls admitting the archives directly inside `model_store` and nothing else.

    The value is a Java regular expression read from a .properties file, where a backslash is
    itself an escape: each one is doubled so that Java's regex sees `\\.` and not `.`.
    """
    pattern = "^file://" + re.escape(str(Path(model_store).resolve())) + r"/[^/]+\.mar$"
    return pattern.replace("\\", "\\\\")


def private_directory(path: Path) -> Path:
    """A folder only its owner can enter (mode 0700), made or tightened."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_environment(tmp: Path) -> dict[str, str]:
    """TorchServe's temporary files in `tmp`: the launcher's pid file (TMPDIR) and the frontend's
    worker sockets (TEMP becomes -Djava.io.tmpdir) stay out of the shared /tmp."""
    private_directory(tmp)
    return {"TMPDIR": str(tmp), "TEMP": str(tmp)}


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_process_group(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL, to the group of a process started with start_new_session=True,
    waiting until none of it is left (its children included)."""
    if process is None:
        return
    group = process.pid
    for sig, patience in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and _group_alive(group):
            process.poll()  # reap the launcher so that it does not linger as a zombie
            time.sleep(0.1)
        if not _group_alive(group):
            break
    process.poll()


class TorchServeProcess:
    """TorchServe, and with `grpc` the gRPC API in front of it (serve/grpc_server.py) on
    `server`'s gRPC targets; TorchServe's own gRPC listener is on the ports `torchserve_grpc`
    names (the server's gRPC targets without `grpc`)."""

    def __init__(self, model_store: Path, workdir: Path, overrides: dict[str, str] | None = None,
                 config: Path = ROOT / "config.properties", env: dict[str, str] | None = None,
                 grpc: bool = False):
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.overrides = overrides or {}
        self.config = config
        self.env = env or {}
        self.grpc = grpc
        self.process: subprocess.Popen | None = None
        self.grpc_process: subprocess.Popen | None = None
        self.server: Server | None = None
        self.torchserve_grpc: tuple[int, int] | None = None  # (inference, management)

    def start(self, timeout: float = 180, wait: bool = True) -> Server:
        """Start TorchServe; unless `wait` is False, return once the model has a READY worker."""
        private_directory(self.workdir)
        inference, management, metrics, grpc_inference, grpc_management, *internal = free_ports(7)
        self.torchserve_grpc = (internal[0], internal[1])
        overrides = {
            "inference_address": f"http://127.0.0.1:{inference}",
            "management_address": f"http://127.0.0.1:{management}",
            "metrics_address": f"http://127.0.0.1:{metrics}",
            "grpc_inference_port": str(internal[0]),
            "grpc_management_port": str(internal[1]),
            "initial_worker_port": str(20000 + inference % 20000),
            "model_store": str(self.model_store),
            "allowed_urls": anchored_allowed_urls(self.model_store),
            **self.overrides,
        }
        config = self.workdir / "config.properties"
        write_config(self.config, config, overrides)
        env = {**os.environ, **private_environment(self.workdir / "tmp"), **self.env}
        log = open(self.workdir / "torchserve.out", "wb")
        self.process = subprocess.Popen(
            [torchserve_command(), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            umask=0o077)
        log.close()
        self.server = Server.from_config(config, self.workdir)
        try:
            if self.grpc:
                from serve import grpc_server
                self.grpc_process = grpc_server.start_process(
                    config, f"127.0.0.1:{grpc_inference}", f"127.0.0.1:{grpc_management}",
                    self.workdir / "grpc-server.log", exit_with_pid=self.process.pid)
                self.server.grpc_inference_target = f"127.0.0.1:{grpc_inference}"
                self.server.grpc_management_target = f"127.0.0.1:{grpc_management}"
            if wait:
                self.server.wait_until_ready(timeout=timeout, process=self.process, every_worker=True)
        except BaseException:
            self.stop()
            raise
        return self.server

    def torchserve_grpc_server(self) -> Server:
        """`server` with its gRPC targets on TorchServe's own listener (for comparisons)."""
        import dataclasses
        inference, management = self.torchserve_grpc
        return dataclasses.replace(self.server, grpc_inference_target=f"127.0.0.1:{inference}",
                                   grpc_management_target=f"127.0.0.1:{management}")

    def stop(self) -> None:
        """End the gRPC server, then TorchServe's whole process group (launcher, Java frontend,
        Python workers), and wait for them."""
        from serve import grpc_server
        grpc_server.stop_process(self.grpc_process)
        stop_process_group(self.process)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
