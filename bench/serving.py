"""3. and 4. REST and start-up: wrk against TorchServe as it ships, against variants (batching
off/on, 1 and 2 workers), against the peers (bench/peers.py) and against a minimal loopback HTTP
server (the transport ceiling); seconds from starting TorchServe to every worker READY."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import log, run
from bench.load import write_script, wrk
from contract.paths import ROOT


def archive_variant(build: Path, store: Path, batch_size: int, workers: int, delay_ms: int) -> None:
    import yaml
    config = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())
    config.update(minWorkers=workers, maxWorkers=workers, batchSize=batch_size, maxBatchDelay=delay_ms)
    store.mkdir(parents=True)
    path = store / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    run("export", "archive", "--build-dir", str(build), "--model-store", str(store), "--model-config", str(path))


def variant_name(batch_size: int, workers: int) -> str:
    batching = "batching off" if batch_size == 1 else f"batching on ({batch_size})"
    return f"{batching}, {workers} worker{'s' if workers > 1 else ''}"


def json_body(png: Path, path: Path) -> Path:
    """The body every server gets in the peers' comparison: {"image": "<base64 of the PNG>"}."""
    import base64
    path.write_text(json.dumps({"image": base64.b64encode(png.read_bytes()).decode()}))
    return path


def measure_torchserve(store: Path, workdir: Path, overrides: dict, body: Path, concurrencies: list[int],
                       seconds: int, json_request: Path | None = None) -> tuple[dict, float]:
    """wrk against one TorchServe (PNG bodies at each concurrency; JSON bodies at the last one
    if json_request is given); returns the figures and the seconds from start to every worker READY."""
    from serve.process import TorchServeProcess

    process = TorchServeProcess(store, workdir, overrides=overrides)
    started = time.perf_counter()
    server = process.start()  # returns when every worker is READY
    startup = time.perf_counter() - started
    try:
        description = server.describe()
        token, url = server.key("inference"), f"{server.inference_url}/predictions/mnist"
        script = write_script(workdir / "png.lua", body, "image/png", token)
        wrk(url, script, 8, 2)  # warm-up
        figures = {"workers": len(description["workers"]), "batch_size": description["batchSize"],
                   "max_delay_ms": description["maxBatchDelay"],
                   "by_concurrency": {c: wrk(url, script, c, seconds) for c in concurrencies}}
        if json_request is not None:
            script = write_script(workdir / "json.lua", json_request, "application/json", token)
            figures["json_body"] = {**wrk(url, script, concurrencies[-1], seconds), "concurrency": concurrencies[-1]}
    finally:
        process.stop()
    return figures, startup


def bench_serving(build: Path, work: Path, seconds: int, concurrencies: list[int],
                  variants: list[tuple[int, int]], frontend_threads: int | None,
                  peers: bool, peers_python: Path) -> dict:
    from bench.peers import bench_peers
    from serve.process import free_ports

    body = work / "body.png"
    shutil.copy(sorted((build / "samples").glob("*.png"))[0], body)
    request = json_body(body, work / "body.json")
    results = {"configs": {}, "startup_seconds": [], "duration_seconds": seconds,
               "frontend_threads": frontend_threads or "TorchServe's default (follows the cores)",
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}

    # what ships: handlers/model-config.yaml and config.properties as they are (other ports)
    store = work / "shipped"
    store.mkdir()
    run("export", "archive", "--build-dir", str(build), "--model-store", str(store))
    shipped, startup = measure_torchserve(store, work / "shipped-ts", {}, body, concurrencies, seconds, request)
    results["shipped"], results["startup_seconds"] = shipped, [startup]
    c = shipped["by_concurrency"][concurrencies[-1]]
    log(f"TorchServe as shipped ({shipped['workers']} workers, batch {shipped['batch_size']}): "
        f"{c['requests_per_second']:,.0f} req/s at concurrency {concurrencies[-1]} with PNG bodies, p99 "
        f"{c['p99_ms']:.1f} ms; {shipped['json_body']['requests_per_second']:,.0f} req/s with JSON bodies")

    overrides = {"number_of_netty_threads": str(frontend_threads),
                 "netty_client_threads": str(frontend_threads)} if frontend_threads else {}
    for batch_size, workers in variants:
        name, delay = variant_name(batch_size, workers), 0 if batch_size == 1 else 5
        store = work / re.sub(r"\W+", "-", name)
        archive_variant(build, store, batch_size, workers, delay)
        figures, startup = measure_torchserve(store, work / (store.name + "-ts"), overrides, body,
                                              concurrencies, seconds)
        results["configs"][name] = {**figures, "max_delay_ms": delay}
        results["startup_seconds"].append(startup)
        c = figures["by_concurrency"][concurrencies[-1]]
        log(f"TorchServe, {name}: {c['requests_per_second']:,.0f} req/s at concurrency {concurrencies[-1]}, "
            f"p99 {c['p99_ms']:.1f} ms, non-2xx {c['non_2xx']}")

    if peers:
        results["peers"] = bench_peers(build, work / "peers", body, concurrencies[-1], seconds,
                                       python=peers_python, log=lambda m: log("peer " + m))

    port = free_ports(1)[0]
    ceiling = subprocess.Popen([sys.executable, "-m", "bench.loopback", str(port)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        script = write_script(work / "ceiling.lua", body, "image/png")
        results["ceiling"] = {c: wrk(f"http://127.0.0.1:{port}/", script, c, seconds) for c in concurrencies}
    finally:
        ceiling.terminate()
        ceiling.wait(timeout=10)
    log(f"loopback ceiling: {results['ceiling'][concurrencies[-1]]['requests_per_second']:,.0f} req/s")
    return results
