"""5. Formats: the archive served as TorchScript, pt2 (AOTInductor) and ONNX side by side:
in-process latency at batch 1 and 64, REST throughput, start-up, archive size."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import log, run
from bench.load import write_script, wrk


def format_callables(build: Path, bundle: dict) -> dict:
    """Each format's model as the handler loads it on the CPU (TorchScript frozen and fused):
    TorchScript takes a tensor, the others a numpy batch; all answer log-probs."""
    import formats

    models = {}
    for fmt, record in bundle["formats"].items():
        model = formats.load(fmt, build / record["file"], record, "cpu", threads=1, optimize=True)
        if fmt == "torchscript":
            models[fmt] = model.run
        else:
            models[fmt] = model.run_numpy or (lambda x, run=model.run: run(torch.from_numpy(x)))
    return models


def bench_formats(build: Path, work: Path, seconds: int, concurrency: int = 32) -> dict:
    """The three formats side by side, each served from its own archive with the shipped
    model-config.yaml (one worker per core, batches of up to 16). The pt2 model must be in `build`
    (`python -m export build --format pt2`); a format not built is left out, saying so."""
    from contract.bundle import load_bundle
    from export.edge_artifacts import median_us_per_image
    from serve.process import TorchServeProcess

    torch.set_num_threads(1)
    bundle = load_bundle(build)
    formats = [f for f in ("torchscript", "pt2", "onnx") if f in bundle.get("formats", {})]
    if "pt2" not in formats:
        log(f"formats: {build} holds no pt2 model (python -m export build --format pt2): left out")
    models = format_callables(build, bundle)
    results = {"formats": {}, "concurrency": concurrency, "duration_seconds": seconds, "threads": 1, "device": "cpu"}
    body = work / "body.png"
    shutil.copy(sorted((build / "samples").glob("*.png"))[0], body)
    for fmt in formats:
        entry = results["formats"][fmt] = {"file_bytes": bundle["formats"][fmt]["bytes"]}
        with torch.inference_mode():
            for batch, repeats in ((1, 3000), (64, 300)):
                x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
                arg = torch.from_numpy(x) if fmt == "torchscript" else x
                entry[f"us_per_image_batch{batch}"] = median_us_per_image(models[fmt], arg, repeats)
        store = work / f"formats-{fmt}"
        run("export", "archive", "--format", fmt, "--build-dir", str(build), "--model-store", str(store))
        entry["archive_bytes"] = (store / "mnist.mar").stat().st_size
        # A fresh inductor cache per server: the pt2 worker's first start includes what a first
        # start on a new host pays (aoti_load_package's CPU-feature probes); then a second start.
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{fmt}")}
        starts = []
        for attempt in range(2 if fmt == "pt2" else 1):
            process = TorchServeProcess(store, work / f"formats-{fmt}-ts{attempt}", env=cache)
            started = time.perf_counter()
            server = process.start()
            starts.append(time.perf_counter() - started)
            try:
                if attempt == 0:
                    script = write_script(work / f"wrk-{fmt}.lua", body, "image/png", server.key("inference"))
                    url = f"{server.inference_url}/predictions/mnist"
                    wrk(url, script, 8, 2)  # warm-up
                    entry["rest"] = wrk(url, script, concurrency, seconds)
            finally:
                process.stop()
        entry["startup_seconds"] = starts[0]
        if len(starts) > 1:
            entry["startup_seconds_warm_cache"] = starts[1]
        log(f"format {fmt}: batch 1 {entry['us_per_image_batch1']:.1f} us, batch 64 "
            f"{entry['us_per_image_batch64']:.1f} us per image; REST {entry['rest']['requests_per_second']:,.0f} "
            f"req/s at concurrency {concurrency} (p99 {entry['rest']['p99_ms']:.1f} ms, non-2xx "
            f"{entry['rest']['non_2xx']}); READY after {entry['startup_seconds']:.1f} s; "
            f"archive {entry['archive_bytes'] / 1024:.0f} KiB")
    return results
