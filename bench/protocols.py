"""The protocols side by side at one concurrency, same model and image: TorchServe REST (wrk),
TorchServe gRPC (its own stubs, grpcio) through the gRPC API make serve runs (serve/grpc_server.py)
and straight to TorchServe's own gRPC listener, and the Open Inference Protocol over REST and gRPC
(KServe's ModelServer, bench/oip.py). Each server runs alone while it is measured.

    python -m bench.protocols --build build --seconds 10      (also part of `make bench`)
"""
from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

from bench.common import log, run
from bench.load import write_script, wrk
from contract.paths import ROOT


def grpc_load(client, body: bytes, concurrency: int, seconds: float) -> dict:
    """`concurrency` threads, each with one unary Predictions call in flight at a time, for
    `seconds`; requests/s and latency percentiles of the calls that answered."""
    import grpc

    latencies, errors, lock = [], [], threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                json.loads(client.predict(body))["label"]
            except (grpc.RpcError, KeyError) as error:
                with lock:
                    errors.append(str(error)[:200])
                continue
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"requests_per_second": len(latencies) / elapsed, "requests": len(latencies),
            "errors": len(errors), "p50_ms": percentile(0.50), "p99_ms": percentile(0.99),
            "concurrency": concurrency, "client": "grpcio (Python), one channel, threads"}


def bench_torchserve_protocols(build: Path, work: Path, concurrency: int, seconds: int) -> dict:
    """TorchServe as it ships, REST with wrk and gRPC with grpcio (through the gRPC API, then
    straight to TorchServe's own listener), one after the other."""
    from serve.grpc_client import GrpcClient
    from serve.process import TorchServeProcess

    store = work / "protocols-store"
    run("export", "archive", "--build-dir", str(build), "--model-store", str(store))
    png = sorted((build / "samples").glob("*.png"))[0]
    body = work / "protocols-body.png"
    shutil.copy(png, body)
    process = TorchServeProcess(store, work / "protocols-ts", grpc=True)
    server = process.start()
    try:
        url = f"{server.inference_url}/predictions/mnist"
        script = write_script(work / "protocols.lua", body, "image/png", server.key("inference"))
        wrk(url, script, 8, 2)  # warm-up
        rest = {**wrk(url, script, concurrency, seconds), "concurrency": concurrency, "client": "wrk"}
        grpc = {}
        for key, target in (("torchserve_grpc", server), ("torchserve_grpc_direct", process.torchserve_grpc_server())):
            with GrpcClient(target) as client:
                grpc_load(client, body.read_bytes(), 8, 2)  # warm-up
                grpc[key] = grpc_load(client, body.read_bytes(), concurrency, seconds)
    finally:
        process.stop()
    return {"torchserve_rest": rest, **grpc}


def bench_protocols(build: Path, work: Path, concurrency: int = 32, seconds: int = 10) -> dict:
    from bench.oip import bench_oip

    results = bench_torchserve_protocols(build, work, concurrency, seconds)
    log(f"TorchServe REST {results['torchserve_rest']['requests_per_second']:,.0f} req/s, gRPC "
        f"{results['torchserve_grpc']['requests_per_second']:,.0f} req/s (its own listener "
        f"{results['torchserve_grpc_direct']['requests_per_second']:,.0f}) at concurrency {concurrency}")
    images = sorted((build / "samples").glob("*.png"))
    results["oip"] = bench_oip(work / "protocols-store", build, images, concurrency, seconds)
    results.update(concurrency=concurrency, duration_seconds=seconds)
    return results


def rows(results: dict) -> list[tuple[str, str, str]]:
    """(what, requests/s, how) for the report: TorchServe's rows, then the OIP server's."""
    from bench.oip import rows as oip_rows

    out = []
    for key, name in (("torchserve_rest", "TorchServe REST (wrk)"),
                      ("torchserve_grpc", "TorchServe gRPC through serve/grpc_server.py (grpcio client, Predictions)"),
                      ("torchserve_grpc_direct", "TorchServe's own gRPC listener (not served: statuses wrong under batching)")):
        if key not in results:  # results files from before the gRPC API
            continue
        r = results[key]
        failed = r.get("non_2xx", r.get("errors", 0))
        out.append((name, f"{r['requests_per_second']:,.0f}",
                    f"concurrency {r['concurrency']}, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                    f"failed {failed}"))
    return out + oip_rows(results["oip"])


def markdown(results: dict) -> list[str]:
    lines = ["", f"## Protocols side by side (concurrency {results['concurrency']}, "
                 f"{results['duration_seconds']} s each, the same PNG and model)", "",
             "| path | req/s | how |", "| --- | --- | --- |"]
    return lines + [f"| {what} | {rate} | {how} |" for what, rate, how in rows(results)]


def main(argv=None) -> None:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=ROOT / "build", help="an export with samples/")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-protocols-") as tmp:
        results = bench_protocols(args.build, Path(tmp), args.concurrency, args.seconds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(markdown(results)))


if __name__ == "__main__":
    main()
