"""Benchmarks, each fast path beside its baseline in the same run: `python -m bench` (make bench).

1. training: the seed tutorial's loop (torchvision DataLoader, per-item ToTensor/Normalize) vs
   the tensor fast path, same model, batch 64 and recipe; then `--recipe seed` vs `--recipe fast`
   to the accuracy target;
2. in-process inference, batch 1 and 64: eager PyTorch, TorchScript, onnxruntime (1 thread);
3. REST: wrk against TorchServe (batching off/on, 1 and 2 workers) at concurrency 1, 8, 32, and
   against a minimal loopback HTTP server (the transport ceiling);
4. start-up: seconds from starting TorchServe to a READY worker;
5. formats: the archive served as TorchScript, pt2 (AOTInductor) and ONNX side by side: in-process
   latency at batch 1 and 64, REST throughput at concurrency 32, start-up, archive size
   (`python -m bench --formats-only --build DIR` runs this part alone).

Writes bench/results/<host>-<date>.json, bench/results/latest.md and bench/results/latest.png.
The machine is shared and noisy: figures are medians, and comparisons are ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA_DIR = ROOT / "data"
CORES = len(os.sched_getaffinity(0))


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True, **kwargs)


# 1. training ---------------------------------------------------------------------------------

def bench_training_loops(threads: int) -> dict:
    """One epoch of each loop, same initial weights; img/s as the median of 100-step chunks."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from train.data import ensure_dataset, load_split, normalize, pixel_statistics
    from train.loop import epoch_order, test, train_epoch
    from train.model import build_model

    torch.set_num_threads(threads)
    info = ensure_dataset("fashion-mnist", DATA_DIR, allow_download=False)
    train_split, test_split = load_split(info, DATA_DIR, True), load_split(info, DATA_DIR, False)
    mean, std = pixel_statistics(train_split.images)
    x_test, y_test = normalize(test_split.images, mean, std), test_split.labels
    results = {}

    # the seed's loop, as in pytorch/examples mnist/main.py
    torch.manual_seed(1)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    dataset = info.torchvision_class(str(DATA_DIR), train=True, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((mean,), (std,))]))
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    chunk_rates, started, chunk_start, images = [], time.perf_counter(), time.perf_counter(), 0
    model.train()
    for step, (data, target) in enumerate(loader, 1):
        optimizer.zero_grad()
        F.nll_loss(model(data), target).backward()
        optimizer.step()
        images += len(target)
        if step % 100 == 0:
            now = time.perf_counter()
            chunk_rates.append(100 * 64 / (now - chunk_start))
            chunk_start = now
    seconds = time.perf_counter() - started
    results["seed_loop"] = {"images_per_second": statistics.median(chunk_rates), "epoch_seconds": seconds,
                            "test_accuracy_after_1_epoch": test(model, x_test, y_test, 1000)[1]}

    # the tensor fast path, set up as `python -m train` sets it up on the CPU
    torch.manual_seed(1)
    model = build_model().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5, foreach=True)
    x_train, y_train = normalize(train_split.images, mean, std), train_split.labels
    order = epoch_order(len(y_train), 1, 1)
    chunk_rates = []

    class Chunks:  # stands in for the progress bar: times every 100 steps
        def __init__(self):
            self.steps, self.start = 0, time.perf_counter()

        def update(self, n):
            self.steps += 1
            if self.steps % 100 == 0:
                now = time.perf_counter()
                chunk_rates.append(100 * 64 / (now - self.start))
                self.start = now

    started = time.perf_counter()
    train_epoch(model, optimizer, x_train, y_train, 64, order, Chunks())
    seconds = time.perf_counter() - started
    results["fast_path"] = {"images_per_second": statistics.median(chunk_rates), "epoch_seconds": seconds,
                            "test_accuracy_after_1_epoch": test(model, x_test, y_test, 1000)[1]}
    results["speedup"] = results["fast_path"]["images_per_second"] / results["seed_loop"]["images_per_second"]
    results.update(threads=threads, batch=64, device="cpu")
    log(f"training: seed loop {results['seed_loop']['images_per_second']:,.0f} img/s, fast path "
        f"{results['fast_path']['images_per_second']:,.0f} img/s ({results['speedup']:.1f}x)")
    return results


def bench_recipes(work: Path, threads: int, target: float) -> dict:
    """`--recipe seed` (10 epochs) and `--recipe fast` (15 epochs), wall time to `target`."""
    import csv

    from train.checkpoint import load_checkpoint
    results = {}
    for recipe in ("seed", "fast"):
        directory = work / f"checkpoints-{recipe}"
        started = time.perf_counter()
        run("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR), "--recipe", recipe,
            "--threads", str(threads), "--checkpoint-dir", str(directory))
        wall = time.perf_counter() - started
        rows = list(csv.DictReader(open(directory / "metrics.csv")))
        best = load_checkpoint(directory / "best.pt")  # chosen on the validation set
        elapsed, reached = 0.0, None
        for row in rows:
            elapsed += float(row["epoch_seconds"])
            if reached is None and float(row["test_accuracy"]) >= target:
                reached = {"epoch": int(row["epoch"]), "training_seconds": elapsed}
        results[recipe] = {"epochs": len(rows), "wall_seconds": wall,
                           "final_test_accuracy": float(rows[-1]["test_accuracy"]),
                           # the test figure of the epoch that validation chose, not the test set's own best
                           "best_test_accuracy": best["metrics"]["test_accuracy"],
                           "best_epoch": best["epoch"],
                           "best_validation_accuracy": best["metrics"]["validation_accuracy"],
                           "reached_target": reached, "checkpoint": str(directory / "best.pt")}
        log(f"recipe {recipe}: best.pt (epoch {best['epoch']}, chosen on validation) test accuracy "
            f"{100 * results[recipe]['best_test_accuracy']:.2f}% in {wall:.0f} s; "
            f"target {100 * target:.1f}% {'reached at epoch %d' % reached['epoch'] if reached else 'not reached'}")
    results.update(target=target, threads=threads)
    return results


# 2. inference --------------------------------------------------------------------------------

def bench_inference(build: Path, checkpoint: Path) -> dict:
    from contract.onnx_session import input_name, open_session
    from export.edge_artifacts import median_us_per_image
    from train.checkpoint import load_model

    torch.set_num_threads(1)
    eager = load_model(checkpoint)
    scripted = torch.jit.load(str(build / "model.pt"))
    session = open_session(str(build / "model.onnx"), "cpu", threads=1)
    name = input_name(session)
    results = {}
    for batch, repeats in ((1, 3000), (64, 300)):
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
        t = torch.from_numpy(x)
        with torch.inference_mode():
            results[f"batch{batch}"] = {
                "eager": median_us_per_image(eager, t, repeats),
                "torchscript": median_us_per_image(scripted, t, repeats),
                "onnxruntime": median_us_per_image(lambda a: session.run(None, {name: a}), x, repeats),
            }
    results.update(threads=1, device="cpu", unit="us per image, median")
    b1 = results["batch1"]
    log(f"inference batch 1: eager {b1['eager']:.1f} us, TorchScript {b1['torchscript']:.1f} us, "
        f"onnxruntime {b1['onnxruntime']:.1f} us")
    return results


# 3. and 4. serving ---------------------------------------------------------------------------

WRK_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def parse_wrk(output: str) -> dict:
    def ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
        return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    percentiles = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", output, re.M))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": ms(percentiles["50"]), "p99_ms": ms(percentiles["99"]), "requests": total,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    threads = 1 if connections < 8 else max(2, min(8, CORES // 4))
    result = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                             "--latency", "-s", str(script), url], capture_output=True, text=True, check=True)
    return parse_wrk(result.stdout)


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


def bench_serving(build: Path, work: Path, seconds: int, concurrencies: list[int],
                  variants: list[tuple[int, int]], frontend_threads: int) -> dict:
    from serve.process import TorchServeProcess, free_ports

    body = work / "body.png"
    shutil.copy(sorted((build / "samples").glob("*.png"))[0], body)
    results = {"configs": {}, "startup_seconds": [], "duration_seconds": seconds,
               "frontend_threads": frontend_threads,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    overrides = {"number_of_netty_threads": str(frontend_threads),
                 "netty_client_threads": str(frontend_threads)}
    for batch_size, workers in variants:
        name, delay = variant_name(batch_size, workers), 0 if batch_size == 1 else 5
        store = work / re.sub(r"\W+", "-", name)
        archive_variant(build, store, batch_size, workers, delay)
        process = TorchServeProcess(store, work / (store.name + "-ts"), overrides=overrides)
        started = time.perf_counter()
        server = process.start()
        while len([w for w in server.describe()["workers"] if w["status"] == "READY"]) < workers:
            time.sleep(0.2)
        results["startup_seconds"].append(time.perf_counter() - started)
        try:
            script = work / "wrk.lua"
            script.write_text(WRK_SCRIPT.format(body=body, token=server.key("inference")))
            url = f"{server.inference_url}/predictions/mnist"
            wrk(url, script, 8, 2)  # warm-up
            results["configs"][name] = {"batch_size": batch_size, "workers": workers, "max_delay_ms": delay,
                                        "by_concurrency": {c: wrk(url, script, c, seconds) for c in concurrencies}}
        finally:
            process.stop()
        c = results["configs"][name]["by_concurrency"][concurrencies[-1]]
        log(f"TorchServe, {name}: {c['requests_per_second']:,.0f} req/s at concurrency {concurrencies[-1]}, "
            f"p99 {c['p99_ms']:.1f} ms, non-2xx {c['non_2xx']}")

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
        script = work / "ceiling.lua"
        script.write_text(WRK_SCRIPT.format(body=body, token="none"))
        results["ceiling"] = {c: wrk(f"http://127.0.0.1:{port}/", script, c, seconds) for c in concurrencies}
    finally:
        ceiling.terminate()
        ceiling.wait(timeout=10)
    log(f"loopback ceiling: {results['ceiling'][concurrencies[-1]]['requests_per_second']:,.0f} req/s")
    return results


# 5. formats ----------------------------------------------------------------------------------

def format_callables(build: Path, bundle: dict) -> dict:
    """Each format's model as the handler runs it on the CPU: float32 batch -> log-probs."""
    import warnings

    from contract.onnx_session import input_name, open_session
    from export.formats import load_pt2

    models = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        scripted = torch.jit.load(str(build / "model.pt")).eval()
        # frozen and oneDNN-fused, as handlers/mnist_handler.py serves it on the CPU
        models["torchscript"] = torch.jit.optimize_for_inference(torch.jit.freeze(scripted))
    if "pt2" in bundle["formats"]:
        pt2 = load_pt2(str(build / "model.pt2"), torch.device("cpu"))
        models["pt2"] = lambda x: pt2(torch.from_numpy(x))
    session = open_session(str(build / "model.onnx"), "cpu", threads=1)
    name = input_name(session)
    models["onnx"] = lambda x: session.run(None, {name: x})
    return models


def bench_formats(build: Path, work: Path, seconds: int, concurrency: int = 32) -> dict:
    """The three formats side by side, each served from its own archive with the shipped
    model-config.yaml (1 worker, batches of up to 16). The pt2 model must be in `build`
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
                    script = work / f"wrk-{fmt}.lua"
                    script.write_text(WRK_SCRIPT.format(body=body, token=server.key("inference")))
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


def formats_markdown(fr: dict) -> list[str]:
    lines = ["", f"## Formats (CPU, 1 thread; REST: wrk, concurrency {fr['concurrency']}, "
             f"{fr['duration_seconds']} s, 1 worker, batches of up to 16)", "",
             "| format | us/image batch 1 | us/image batch 64 | REST req/s | p99 ms | non-2xx | "
             "start-up to READY s | archive KiB | model file KiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fmt, v in fr["formats"].items():
        startup = f"{v['startup_seconds']:.1f}"
        if "startup_seconds_warm_cache" in v:
            startup += f" (warm inductor cache: {v['startup_seconds_warm_cache']:.1f})"
        lines.append(f"| {fmt} | {v['us_per_image_batch1']:.1f} | {v['us_per_image_batch64']:.1f} | "
                     f"{v['rest']['requests_per_second']:,.0f} | {v['rest']['p99_ms']:.1f} | {v['rest']['non_2xx']} | "
                     f"{startup} | {v['archive_bytes'] / 1024:.0f} | {v['file_bytes'] / 1024:.0f} |")
    lines += ["", "TorchScript runs frozen and oneDNN-fused, as the handler serves it on the CPU; pt2 is "
              "compiled for this host's CPU; onnx is the edge's model.onnx in onnxruntime. Each server "
              "starts with an empty inductor cache (pt2: then a second start with it warm)."]
    return lines


# results -------------------------------------------------------------------------------------

def targets(r: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, met, note) rows."""
    rows = []
    if "training" in r:
        tr = r["training"]
        rows.append(("training fast path >= 3x the seed loop's img/s (batch 64)",
                     f"{tr['speedup']:.1f}x ({tr['fast_path']['images_per_second']:,.0f} vs "
                     f"{tr['seed_loop']['images_per_second']:,.0f} img/s, {tr['threads']} threads)",
                     "yes" if tr["speedup"] >= 3 else "no",
                     "the seed loop builds, converts and normalizes a PIL image per item on every step; the fast "
                     "path (channels-last, data decoded once) is left with oneDNN's convolution kernels, "
                     "convolution backward first"))
        acc_seed, acc_fast = tr["seed_loop"]["test_accuracy_after_1_epoch"], tr["fast_path"]["test_accuracy_after_1_epoch"]
        rows.append(("... with the same test accuracy (after 1 epoch)",
                     f"{100 * acc_fast:.2f}% vs {100 * acc_seed:.2f}%",
                     "yes" if abs(acc_fast - acc_seed) <= 0.01 else "no", "same recipe; the epoch orders differ"))
    if "recipes" in r:
        rc = r["recipes"]
        fast = rc["fast"]
        rows.append((f"--recipe fast >= {100 * rc['target']:.1f}% Fashion-MNIST test accuracy",
                     f"best.pt {100 * fast['best_test_accuracy']:.2f}% in {fast['wall_seconds']:.0f} s "
                     f"({fast['epochs']} epochs); seed recipe best.pt {100 * rc['seed']['best_test_accuracy']:.2f}% in "
                     f"{rc['seed']['wall_seconds']:.0f} s ({rc['seed']['epochs']} epochs)",
                     "yes" if fast["best_test_accuracy"] >= rc["target"] else "no",
                     f"target first reached at epoch {fast['reached_target']['epoch']}, after "
                     f"{fast['reached_target']['training_seconds']:.0f} s of training" if fast["reached_target"] else ""))
    if "inference" in r:
        b1 = r["inference"]["batch1"]
        ratio = b1["eager"] / b1["onnxruntime"]
        rows.append(("onnxruntime batch 1 <= 60 us per image and >= 4x eager PyTorch (1 thread)",
                     f"{b1['onnxruntime']:.1f} us; {ratio:.1f}x eager ({b1['eager']:.1f} us)",
                     "yes" if b1["onnxruntime"] <= 60 and ratio >= 4 else "no", "per-call overhead dominates at batch 1"))
    if "serving" in r:
        sv = r["serving"]
        c = 32 if 32 in sv["ceiling"] else max(sv["ceiling"])
        configs = sv["configs"]
        unbatched = {cfg["workers"]: cfg["by_concurrency"][c] for cfg in configs.values() if cfg["batch_size"] == 1}
        workers, best = max(((cfg["workers"], cfg["by_concurrency"][c]) for cfg in configs.values()
                             if cfg["batch_size"] > 1), key=lambda item: item[1]["requests_per_second"])
        off_workers = workers if workers in unbatched else min(unbatched)
        on, off = best, unbatched[off_workers]
        ok = best["requests_per_second"] >= 2000 and best["p99_ms"] <= 50 and best["non_2xx"] == 0
        rows.append((f"TorchServe with batching >= 2,000 req/s at concurrency {c}, p99 <= 50 ms, 0 non-2xx",
                     f"{best['requests_per_second']:,.0f} req/s, p99 {best['p99_ms']:.1f} ms, non-2xx {best['non_2xx']}",
                     "yes" if ok else "no",
                     f"{100 * best['requests_per_second'] / sv['ceiling'][c]['requests_per_second']:.0f}% of the "
                     f"loopback ceiling ({sv['ceiling'][c]['requests_per_second']:,.0f} req/s); wrk, the Java "
                     f"frontend and the Python workers share {r['cores']} cores"))
        rows.append(("... and >= 3x its own unbatched figure",
                     f"{on['requests_per_second'] / off['requests_per_second']:.1f}x ({on['requests_per_second']:,.0f} "
                     f"req/s batched with {workers} worker(s) vs {off['requests_per_second']:,.0f} unbatched "
                     f"with {off_workers})",
                     "yes" if on["requests_per_second"] >= 3 * off["requests_per_second"] else "no", ""))
        rows.append(("start-up: torchserve --start to a READY worker", f"median {statistics.median(sv['startup_seconds']):.1f} s",
                     "-", "no target"))
    if "serving" in r and r["serving"]["device"] != "cpu" and 64 in r["serving"]["ceiling"]:
        sv = r["serving"]
        best_name, best = max(((n, cfg["by_concurrency"][64]) for n, cfg in sv["configs"].items()),
                              key=lambda item: item[1]["requests_per_second"])
        ok = best["requests_per_second"] >= 10000 and best["p99_ms"] <= 20 and best["non_2xx"] == 0
        rows.append((f"GPU ({sv['device']}): >= 10,000 req/s at concurrency 64, p99 <= 20 ms",
                     f"{best['requests_per_second']:,.0f} req/s, p99 {best['p99_ms']:.1f} ms ({best_name})",
                     "yes" if ok else "no", f"frontend threads {sv['frontend_threads']}"))
    else:
        rows.append(("GPU: >= 10,000 req/s at concurrency 64 (p99 <= 20 ms); an epoch in <= 2 s",
                     "not measured by this run", "-", "no GPU here; see the README for the GPU host's figures"))
    return rows


def write_markdown(r: dict, path: Path) -> None:
    lines = [f"# Benchmark, {r['host']}, {r['date']}", "",
             f"{r['cpu']}, {r['cores']} cores, torch {r['torch']}, onnxruntime {r['onnxruntime']}. "
             "Medians; every comparison within this one run.", "",
             "## Targets", "", "| target | measured | met | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(r)]
    if "inference" in r:
        inf = r["inference"]
        lines += ["", "## In-process inference (CPU, 1 thread, us per image, median)", "",
                  "| batch | eager | TorchScript | onnxruntime |", "| --- | --- | --- | --- |"]
        for batch in ("batch1", "batch64"):
            v = inf[batch]
            lines.append(f"| {batch[5:]} | {v['eager']:.1f} | {v['torchscript']:.1f} | {v['onnxruntime']:.1f} |")
    if "serving" in r:
        sv = r["serving"]
        lines += ["", f"## REST (wrk, {sv['duration_seconds']} s per point, POST of a 28x28 PNG with the token)", "",
                  "| server | concurrency | req/s | p50 ms | p99 ms | non-2xx | % of ceiling |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, cfg in sv["configs"].items():
            for c, v in cfg["by_concurrency"].items():
                share = 100 * v["requests_per_second"] / sv["ceiling"][c]["requests_per_second"]
                lines.append(f"| TorchServe, {name} | {c} | {v['requests_per_second']:,.0f} | {v['p50_ms']:.2f} | "
                             f"{v['p99_ms']:.2f} | {v['non_2xx']} | {share:.0f}% |")
        for c, v in sv["ceiling"].items():
            lines.append(f"| loopback ceiling (asyncio, fixed answer) | {c} | {v['requests_per_second']:,.0f} | "
                         f"{v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['non_2xx']} | 100% |")
        lines += ["", f"Batching on: maxBatchDelay 5 ms. Each worker: 1 torch thread. Frontend (netty) threads: "
                  f"{sv['frontend_threads']}. Device: {sv['device']}. "
                  "TorchServe's own overhead is the gap between its unbatched figure and the ceiling: "
                  "the Java frontend's HTTP handling and the frontend-to-worker socket hop per batch."]
    if "formats" in r:
        lines += formats_markdown(r["formats"])
    path.write_text("\n".join(lines) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if "training" in r:
        tr = r["training"]
        axes[0].bar(["seed loop", "fast path"], [tr["seed_loop"]["images_per_second"], tr["fast_path"]["images_per_second"]])
        axes[0].set(title=f"training, batch 64, {tr['threads']} threads", ylabel="images/s")
    if "inference" in r:
        inf = r["inference"]["batch1"]
        axes[1].bar(list(inf), list(inf.values()))
        axes[1].set(title="inference, batch 1, 1 thread", ylabel="us per image")
    if "serving" in r:
        sv = r["serving"]
        for name, cfg in sv["configs"].items():
            cs = list(cfg["by_concurrency"])
            axes[2].plot(cs, [cfg["by_concurrency"][c]["requests_per_second"] for c in cs], "o-", label=name)
        cs = list(sv["ceiling"])
        axes[2].plot(cs, [sv["ceiling"][c]["requests_per_second"] for c in cs], "k--", label="loopback ceiling")
        axes[2].set(title="REST (wrk)", xlabel="concurrency", ylabel="requests/s (log)", xscale="log", yscale="log")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_results(path: Path) -> dict:
    """A results JSON, with the concurrency keys JSON turned into strings made integers again."""
    results = json.loads(path.read_text())
    serving = results.get("serving")
    if serving:
        serving["ceiling"] = {int(k): v for k, v in serving["ceiling"].items()}
        for cfg in serving["configs"].values():
            cfg["by_concurrency"] = {int(k): v for k, v in cfg["by_concurrency"].items()}
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=6, help="wrk duration per point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--target", type=float, default=0.905, help="accuracy target of --recipe fast")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--build", type=Path, default=None,
                   help="serve this existing export (with samples/) and skip training and inference")
    p.add_argument("--variants", nargs="+", default=["1x1", "16x1", "1x2", "16x2"],
                   help="TorchServe configurations as BATCHxWORKERS")
    p.add_argument("--frontend-threads", type=int, default=2, help="TorchServe netty threads")
    p.add_argument("--formats-only", action="store_true",
                   help="only compare the serving formats (5.); needs --build DIR exported with --format pt2")
    p.add_argument("--render", type=Path, default=None,
                   help="only rewrite the markdown table and plot from this results JSON")
    args = p.parse_args(argv)
    variants = [tuple(int(n) for n in v.split("x")) for v in args.variants]
    if args.render:
        results = load_results(args.render)
        write_markdown(results, args.render.with_suffix(".md"))
        plot(results, args.render.with_suffix(".png"))
        log(f"wrote {args.render.with_suffix('.md')} and {args.render.with_suffix('.png')}")
        return
    if not args.skip_serving and not shutil.which("wrk"):
        raise SystemExit("[bench] wrk not found: apt-get install wrk (make bench installs it where apt-get works)")
    import onnxruntime
    started = time.perf_counter()
    results = {"host": socket.gethostname(), "date": datetime.date.today().isoformat(),
               "cpu": platform.processor() or platform.machine(), "cores": CORES,
               "torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        build = args.build
        if build is None and args.formats_only:
            raise SystemExit("[bench] --formats-only needs --build DIR (an export made with --format pt2)")
        if build is None:
            results["training"] = bench_training_loops(CORES)
            results["recipes"] = bench_recipes(work, CORES, args.target)
            build = work / "build"
            run("export", "build", "--format", "pt2", "--device", "cpu",
                "--checkpoint", results["recipes"]["seed"]["checkpoint"],
                "--build-dir", str(build), "--data-dir", str(DATA_DIR))
            results["inference"] = bench_inference(build, Path(results["recipes"]["seed"]["checkpoint"]))
        if not args.skip_serving and not args.formats_only:
            results["serving"] = bench_serving(build, work, args.seconds, args.concurrency, variants,
                                               args.frontend_threads)
        if not args.skip_serving:
            results["formats"] = bench_formats(build, work, args.seconds)
    results["bench_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{results['host']}-{results['date']}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / "latest.md")
    plot(results, RESULTS / "latest.png")
    log(f"wrote {out}, {RESULTS / 'latest.md'}, {RESULTS / 'latest.png'} in {results['bench_seconds']:.0f} s")
