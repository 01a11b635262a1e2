"""The Open Inference Protocol server (oip/, KServe's ModelServer on model.onnx) under load.

    python -m bench.oip [--model-store model_store] [--images build/samples] [--concurrency 32]

REST: wrk (bench/load.py, the load generator of every other REST row) POSTing one v2 infer body
that carries a PNG as a BYTES tensor (base64 text, as JSON must). gRPC: tritonclient's grpc
client, `concurrency` threads, the same PNGs as BYTES (raw). REST once more with tritonclient's
http client (binary tensors), so the two protocols are also compared with the same kind of
client. Each answer is checked against onnxruntime in-process on the same image.

bench_oip() returns {"rest_wrk", "rest_tritonclient", "grpc_tritonclient"}, each with
requests_per_second; rows() makes the report's table rows (name, figure, detail).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.load import wrk, write_script
from serve.process import free_ports
from contract.paths import ROOT

OIP_PYTHON = ROOT / ".venv-oip" / "bin" / "python"


def oip(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    if not OIP_PYTHON.exists():
        raise SystemExit(f"{OIP_PYTHON} is missing: run `make oip-venv`")
    return subprocess.run([str(OIP_PYTHON), "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, **(env or {})})


def reference(model_dir_onnx: Path, bundle: dict, pngs: list[bytes]) -> np.ndarray:
    from contract.onnx_session import open_session, run_log_probs
    from contract.preprocessing import InputSpec, decode_image
    spec = InputSpec.from_bundle(bundle)
    x = np.concatenate([decode_image(png, spec) for png in pngs])
    return np.exp(run_log_probs(open_session(model_dir_onnx), x).astype(np.float64))


def client_run(client: str, url: str, images: list[Path], concurrency: int, repeat: int, work: Path) -> dict:
    out = work / f"{client}.json"
    done = oip("oip.clients", client, "--url", url, "--input", "bytes", "--images", *map(str, images),
               "--concurrency", str(concurrency), "--repeat", str(repeat), "--out", str(out))
    if done.returncode != 0:
        raise RuntimeError(f"{client} failed: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def bench_oip(model_store: Path, build: Path, images: list[Path], concurrency: int = 32,
              seconds: int = 10, repeat: int = 20) -> dict:
    bundle = json.loads((build / "bundle.json").read_text())
    pngs = [p.read_bytes() for p in images]
    expected = reference(build / "model.onnx", bundle, pngs)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-oip-") as tmp:
        work = Path(tmp)
        (work / "tmp").mkdir()
        http, grpc = free_ports(2)
        started = oip("oip", "start", "--model-store", str(model_store), "--workdir", str(work),
                      "--http-port", str(http), "--grpc-port", str(grpc),
                      env={"TMPDIR": str(work / "tmp"), "OMP_NUM_THREADS": "1"})
        if started.returncode != 0:
            raise RuntimeError(f"the OIP server did not start: {started.stderr[-3000:]}")
        try:
            body = work / "infer.json"
            body.write_text(json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                    "data": [base64.b64encode(pngs[0]).decode()]}]}))
            script = write_script(work / "infer.lua", body, "application/json")
            results["rest_wrk"] = {**wrk(f"http://127.0.0.1:{http}/v2/models/mnist/infer", script,
                                         concurrency, seconds), "client": "wrk", "concurrency": concurrency}
            for name, client, url in (("rest_tritonclient", "triton-http-binary", f"127.0.0.1:{http}"),
                                      ("grpc_tritonclient", "triton-grpc", f"127.0.0.1:{grpc}")):
                answer = client_run(client, url, images, concurrency, repeat, work)
                p = np.asarray(answer["probabilities"])  # the last pass over the images
                results[name] = {"requests_per_second": answer["requests"] / answer["seconds"],
                                 "requests": answer["requests"], "seconds": answer["seconds"],
                                 "client": client, "concurrency": concurrency,
                                 "max_abs_dp_vs_onnxruntime": float(np.abs(p - expected).max())}
        finally:
            oip("oip", "stop", "--workdir", str(work))
    return results


def rows(results: dict) -> list[tuple[str, str, str]]:
    """(what, requests/s, how) for the report, beside TorchServe's REST and gRPC rows."""
    names = {"rest_wrk": "OIP REST (KServe ModelServer, onnxruntime), wrk",
             "rest_tritonclient": "OIP REST, tritonclient http (binary tensors)",
             "grpc_tritonclient": "OIP gRPC, tritonclient grpc"}
    out = []
    for key, name in names.items():
        r = results[key]
        detail = f"concurrency {r['concurrency']}, {r['requests']} requests"
        if "p99_ms" in r:
            detail += f", p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, non-2xx {r['non_2xx']}"
        if "max_abs_dp_vs_onnxruntime" in r:
            detail += f", max |dp| vs onnxruntime {r['max_abs_dp_vs_onnxruntime']:.2g}"
        out.append((name, f"{r['requests_per_second']:,.0f}", detail))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.oip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--build", type=Path, default=ROOT / "build", help="bundle.json and model.onnx")
    p.add_argument("--images", type=Path, default=ROOT / "build" / "samples")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=10, help="wrk's duration")
    p.add_argument("--repeat", type=int, default=20, help="tritonclient: passes over the images")
    args = p.parse_args(argv)
    images = sorted(args.images.glob("*.png")) if args.images.is_dir() else [args.images]
    results = bench_oip(args.model_store, args.build, images, args.concurrency, args.seconds, args.repeat)
    print(json.dumps(results, indent=1))
    print("| what | requests/s | how |\n| --- | ---: | --- |")
    for row in rows(results):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
