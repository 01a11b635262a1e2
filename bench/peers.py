"""Peers that users pick instead of TorchServe, served and loaded exactly like the project:
LitServe and BentoML, each serving the same build/model.onnx with onnxruntime and the project's
own preprocessing (bench/peer_litserve.py, bench/peer_bentoml.py), started as subprocesses on
free loopback ports in their own venv (`make peers-venv`: .venv-peers), measured with the same wrk
script and the same JSON bodies {"image": "<base64 PNG>"} as TorchServe.

Before it is measured, each peer answers one real test image and must agree with onnxruntime
run in this process within contract.TOLERANCE: a peer that answers something else is not
serving the same model, and its row says so instead of a rate.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from bench.load import CORES, wrk, write_script
from contract import TOLERANCE
from contract.paths import ROOT
from serve.process import free_ports, stop_process_group

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


@dataclass(frozen=True)
class Peer:
    server: str  # LitServe, BentoML
    workers: int
    batch: int  # 1: batching off
    delay_ms: int = 5

    @property
    def name(self) -> str:
        if self.batch == 1:
            batching = "batching off"
        elif self.server == "BentoML":  # adaptive batching: no fixed delay to set
            batching = f"adaptive batching (up to {self.batch})"
        else:
            batching = f"batching on ({self.batch}, {self.delay_ms} ms)"
        return f"{self.server}, {batching}, {self.workers} worker{'s' if self.workers > 1 else ''}"

    def body(self, image_b64: str) -> bytes:
        # BentoML's batchable APIs take a list per request (its documented form)
        value = [image_b64] if self.server == "BentoML" and self.batch > 1 else image_b64
        return json.dumps({"image": value}).encode()

    def command(self, python: Path, build: Path, port: int) -> tuple[list[str], dict[str, str]]:
        if self.server == "LitServe":
            return ([str(python), "-m", "bench.peer_litserve", "--build", str(build), "--port", str(port),
                     "--workers", str(self.workers), "--batch", str(self.batch), "--delay-ms", str(self.delay_ms)], {})
        bentoml = str(python.with_name("bentoml"))
        return ([bentoml, "serve", "bench.peer_bentoml:Classifier", "--host", "127.0.0.1", "--port", str(port)],
                {"PEER_BUILD": str(build), "PEER_WORKERS": str(self.workers), "PEER_BATCH": str(self.batch),
                 "BENTOML_DO_NOT_TRACK": "true"})

    @property
    def health_path(self) -> str:
        return "/health" if self.server == "LitServe" else "/readyz"


def default_peers(cores: int = CORES) -> list[Peer]:
    """LitServe with batching at 1 worker and at one per core (its best is reported), LitServe
    without batching, BentoML with and without batching: each as users would run it here."""
    worker_counts = sorted({1, cores})
    return ([Peer("LitServe", w, 16) for w in worker_counts] + [Peer("LitServe", cores, 1)]
            + [Peer("BentoML", cores, 16), Peer("BentoML", cores, 1)])


class PeerProcess:
    """One peer server in its own process group, on a free loopback port; stop() ends all of it."""

    def __init__(self, peer: Peer, build: Path, workdir: Path, python: Path = PEERS_PYTHON):
        self.peer, self.build, self.workdir, self.python = peer, build, workdir, python
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 120) -> str:
        if not self.python.exists():
            raise RuntimeError(f"{self.python} is missing: run `make peers-venv` (make bench does)")
        port = free_ports(1)[0]
        command, env = self.peer.command(self.python, self.build, port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "server.log", "wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env})
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.process.returncode}: "
                                   f"{self.tail_of_log()}")
            try:
                if requests.get(self.url + self.peer.health_path, timeout=1).status_code == 200:
                    return self.url
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.peer.name} not ready within {timeout:.0f} s: {self.tail_of_log()}")

    def tail_of_log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")[-1500:]

    def stop(self) -> None:
        stop_process_group(self.process)


def reference_probabilities(build: Path, png: bytes) -> np.ndarray:
    """What the model answers for `png`: onnxruntime in this process, the project's preprocessing."""
    from contract.bundle import load_bundle
    from contract.onnx_session import open_session, run_log_probs
    from contract.preprocessing import InputSpec, preprocess

    session = open_session(str(build / "model.onnx"), "cpu", threads=1)
    x = preprocess(png, InputSpec.from_bundle(load_bundle(build / "bundle.json")))
    return np.exp(run_log_probs(session, x))[0]


def bench_peers(build: Path, work: Path, png: Path, concurrency: int, seconds: int,
                peers: list[Peer] | None = None, python: Path = PEERS_PYTHON, log=print) -> dict:
    """{peer name: settings, start-up seconds, max |dp| against onnxruntime, wrk figures}."""
    image_b64 = base64.b64encode(png.read_bytes()).decode()
    expected = reference_probabilities(build, png.read_bytes())
    results = {}
    for peer in peers or default_peers():
        directory = work / re.sub(r"\W+", "-", peer.name).strip("-")
        directory.mkdir(parents=True, exist_ok=True)
        body = directory / "body.json"
        body.write_bytes(peer.body(image_b64))
        row = {"server": peer.server, "workers": peer.workers, "batch_size": peer.batch,
               "max_delay_ms": peer.delay_ms if peer.batch > 1 and peer.server == "LitServe" else 0}
        process = PeerProcess(peer, build, directory, python)
        started = time.perf_counter()
        try:
            url = process.start() + "/predict"
            row["startup_seconds"] = time.perf_counter() - started
            answer = requests.post(url, data=body.read_bytes(), headers={"Content-Type": "application/json"},
                                   timeout=30)
            answer.raise_for_status()
            answered = answer.json()
            answered = answered[0] if isinstance(answered, list) else answered
            row["max_abs_dp"] = float(np.max(np.abs(np.asarray(answered["probabilities"]) - expected)))
            if row["max_abs_dp"] > TOLERANCE:
                raise RuntimeError(f"answers differ from onnxruntime by {row['max_abs_dp']:.2e} > {TOLERANCE}")
            script = write_script(directory / "wrk.lua", body, "application/json")
            wrk(url, script, 8, 2)  # warm-up
            row.update(wrk(url, script, concurrency, seconds), concurrency=concurrency)
            log(f"{peer.name}: {row['requests_per_second']:,.0f} req/s at concurrency {concurrency}, "
                f"p99 {row['p99_ms']:.1f} ms, non-2xx {row['non_2xx']}")
        except (RuntimeError, requests.RequestException, subprocess.CalledProcessError) as error:
            row["error"] = str(error)[-600:]
            log(f"{peer.name}: not measured: {row['error']}")
        finally:
            process.stop()
        results[peer.name] = row
    return results


def best_peer(peers: dict) -> tuple[str, dict] | None:
    measured = [(name, row) for name, row in peers.items() if "requests_per_second" in row and row["non_2xx"] == 0]
    return max(measured, key=lambda item: item[1]["requests_per_second"]) if measured else None
