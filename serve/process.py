"""A TorchServe of its own, for tests and benchmarks: private directory, free ports, always stopped.

`torchserve --start` returns at once and writes its pid file, logs/ and key_file.json into shared
places; a killed test can leave the Java process behind. Here TorchServe runs with --foreground
in its own process group and its own TMPDIR (where its pid file and worker sockets go), from a
private working directory, and stop() ends the whole group.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from serve.client import Server, read_properties

ROOT = Path(__file__).resolve().parent.parent


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
    target.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


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
    def __init__(self, model_store: Path, workdir: Path, overrides: dict[str, str] | None = None,
                 config: Path = ROOT / "config.properties", env: dict[str, str] | None = None):
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.overrides = overrides or {}
        self.config = config
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.server: Server | None = None

    def start(self, timeout: float = 180) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        overrides = {
            "inference_address": f"http://127.0.0.1:{inference}",
            "management_address": f"http://127.0.0.1:{management}",
            "metrics_address": f"http://127.0.0.1:{metrics}",
            "grpc_inference_port": str(grpc_inference),
            "grpc_management_port": str(grpc_management),
            "initial_worker_port": str(20000 + inference % 20000),
            "model_store": str(self.model_store),
            **self.overrides,
        }
        config = self.workdir / "config.properties"
        write_config(self.config, config, overrides)
        env = {**os.environ, "TMPDIR": str(self.workdir / "tmp"), **self.env}
        log = open(self.workdir / "torchserve.out", "wb")
        self.process = subprocess.Popen(
            [torchserve_command(), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.server = Server.from_config(config, self.workdir)
        try:
            self.server.wait_until_ready(timeout=timeout, process=self.process, every_worker=True)
        except BaseException:
            self.stop()
            raise
        return self.server

    def stop(self) -> None:
        """End the whole process group (launcher, Java frontend, Python workers) and wait for it."""
        stop_process_group(self.process)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
