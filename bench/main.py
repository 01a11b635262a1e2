"""Benchmarks, each fast path beside its baseline in the same run: `python -m bench` (make bench).

1. training: the seed tutorial's loop (torchvision DataLoader, per-item ToTensor/Normalize) vs
   the tensor fast path, same model, batch 64 and recipe, three runs (the speedup's spread); then
   each recipe (`--recipes`, default seed and fast) to its end, with the training seconds it took
   to first reach 90% and 91% test accuracy;
2. in-process inference, batch 1 and 64: eager PyTorch, TorchScript, onnxruntime (1 thread);
3. REST: wrk against TorchServe as it ships (handlers/model-config.yaml and config.properties
   unchanged: one worker per core) with PNG and with JSON bodies, against variants (batching
   off/on, 1 and 2 workers), against the peers users pick instead (bench/peers.py: LitServe and
   BentoML serving the same ONNX model with the same preprocessing and the same JSON bodies),
   and against a minimal loopback HTTP server (the transport ceiling);
4. start-up: seconds from starting TorchServe to every worker READY;
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
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.load import CORES, wrk, write_script

if TYPE_CHECKING:
    from train.data import DatasetInfo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA_DIR = ROOT / "data"


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True, **kwargs)


# 1. training ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingData:
    """Fashion-MNIST as both loops see it: decoded once, normalized with the training images'
    mean and std."""
    info: DatasetInfo
    mean: float
    std: float
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_training_data() -> TrainingData:
    from train.data import ensure_dataset, load_split, normalize, pixel_statistics

    info = ensure_dataset("fashion-mnist", DATA_DIR, allow_download=False)
    train_split, test_split = load_split(info, DATA_DIR, True), load_split(info, DATA_DIR, False)
    mean, std = pixel_statistics(train_split.images)
    return TrainingData(info, mean, std, normalize(train_split.images, mean, std), train_split.labels,
                        normalize(test_split.images, mean, std), test_split.labels)


def fast_path_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The seed's model and SGD, set up as `python -m train` sets them up on the CPU."""
    from train.model import build_model

    torch.manual_seed(1)
    model = build_model().to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5, foreach=True)


def bench_training_loops(threads: int, runs: int) -> dict:
    """`runs` times one epoch of each loop; the speedup of every run, and its spread."""
    data = load_training_data()
    every = [one_training_run(data, threads) for _ in range(runs)]
    speedups = [r["speedup"] for r in every]
    results = {"runs": every, "speedups": speedups, "speedup": statistics.median(speedups),
               "speedup_min": min(speedups), "speedup_max": max(speedups),
               "seed_loop": {"images_per_second": statistics.median(r["seed_loop"]["images_per_second"] for r in every),
                             "test_accuracy_after_1_epoch": every[0]["seed_loop"]["test_accuracy_after_1_epoch"]},
               "fast_path": {"images_per_second": statistics.median(r["fast_path"]["images_per_second"] for r in every),
                             "test_accuracy_after_1_epoch": every[0]["fast_path"]["test_accuracy_after_1_epoch"]},
               "fast_path_one_thread": {"images_per_second": statistics.median(
                   r["fast_path_one_thread"]["images_per_second"] for r in every)},
               "speedup_ceiling": statistics.median(r["speedup_ceiling"] for r in every),
               "threads": threads, "batch": 64, "device": "cpu"}
    torch.set_num_threads(1)
    results["step_breakdown"] = step_breakdown(data)
    torch.set_num_threads(threads)
    log(f"training over {runs} runs: fast path / seed loop {results['speedup']:.2f}x median, "
        f"{results['speedup_min']:.2f}x to {results['speedup_max']:.2f}x")
    return results


def one_training_run(data: TrainingData, threads: int) -> dict:
    """One epoch of each loop, same initial weights; img/s as the median of 100-step chunks."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from train.loop import test
    from train.model import build_model

    torch.set_num_threads(threads)
    results = {}

    # the seed's loop, as in pytorch/examples mnist/main.py
    torch.manual_seed(1)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    dataset = data.info.torchvision_class(str(DATA_DIR), train=True, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((data.mean,), (data.std,))]))
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    chunk_rates, started, chunk_start, images = [], time.perf_counter(), time.perf_counter(), 0
    model.train()
    for step, (images_batch, target) in enumerate(loader, 1):
        optimizer.zero_grad()
        F.nll_loss(model(images_batch), target).backward()
        optimizer.step()
        images += len(target)
        if step % 100 == 0:
            now = time.perf_counter()
            chunk_rates.append(100 * 64 / (now - chunk_start))
            chunk_start = now
    seconds = time.perf_counter() - started
    results["seed_loop"] = {"images_per_second": statistics.median(chunk_rates), "epoch_seconds": seconds,
                            "test_accuracy_after_1_epoch": test(model, data.x_test, data.y_test, 1000)[1]}

    # the tensor fast path; then again on one thread, whose rate times the threads is what
    # perfect scaling over the cores would give
    results["fast_path"] = time_fast_path(data)
    torch.set_num_threads(1)
    one_thread = time_fast_path(data, steps=300)
    torch.set_num_threads(threads)
    results["fast_path_one_thread"] = {"images_per_second": one_thread["images_per_second"]}
    results["speedup"] = results["fast_path"]["images_per_second"] / results["seed_loop"]["images_per_second"]
    results["speedup_ceiling"] = threads * one_thread["images_per_second"] / results["seed_loop"]["images_per_second"]
    log(f"training: seed loop {results['seed_loop']['images_per_second']:,.0f} img/s, fast path "
        f"{results['fast_path']['images_per_second']:,.0f} img/s ({results['speedup']:.1f}x); on 1 "
        f"thread {one_thread['images_per_second']:,.0f} img/s (perfect scaling: {results['speedup_ceiling']:.1f}x)")
    return results


def step_breakdown(data: TrainingData, steps: int = 300) -> dict:
    """Where a fast-path step's time goes, layer by layer: the median microseconds of each part
    over `steps` steps (batch 64, channels-last, the seed's SGD), on the threads set now.

    Timed with the wall clock between the forward calls and with gradient hooks in the backward
    pass, not with torch.profiler: under the profiler, max-pooling's backward looked like 0.4 ms
    of zero-filling on this host, and timed so it is 0.09 ms.
    """
    import torch.nn.functional as F

    from train.loop import epoch_order

    model, optimizer = fast_path_model()
    order = epoch_order(len(data.y_train), 1, 1)
    seen, parts = {}, {}

    def reached(name):
        def hook(_):
            seen[name] = time.perf_counter()
        return hook

    for step in range(steps + 30):  # the first 30 warm up
        batch = order[step * 64:(step + 1) * 64]
        x = data.x_train[batch]
        # train/model.py's forward, written out to be timed layer by layer
        t0 = time.perf_counter()
        conv1 = model.conv1(x)
        t1 = time.perf_counter()
        pool1 = F.max_pool2d(conv1, 2)
        t2 = time.perf_counter()
        relu1 = F.relu(pool1)
        conv2 = model.conv2(relu1)
        t3 = time.perf_counter()
        hidden = F.relu(model.fc1(torch.flatten(F.relu(F.max_pool2d(conv2, 2)), 1)))
        log_probs = F.log_softmax(model.fc2(hidden), dim=1)
        loss = F.nll_loss(log_probs, data.y_train[batch])
        t4 = time.perf_counter()
        if step == 0:  # the written-out forward must stay the model's
            with torch.no_grad():
                torch.testing.assert_close(log_probs, model(x))
        for name, tensor in (("conv1", conv1), ("pool1", pool1), ("relu1", relu1), ("conv2", conv2)):
            tensor.register_hook(reached(name))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        optimizer.step()
        t6 = time.perf_counter()
        if step < 30:
            continue
        # a gradient hook runs when the gradient of its tensor is ready, i.e. when the backward of
        # the layer after it has finished
        for part, seconds in (("conv1 forward", t1 - t0), ("max-pool 1 forward", t2 - t1),
                              ("ReLU + conv2 forward", t3 - t2), ("rest of the forward (pool 2, fc, loss)", t4 - t3),
                              ("backward to conv2's output", seen["conv2"] - t4),
                              ("conv2 backward", seen["relu1"] - seen["conv2"]),
                              ("ReLU 1 backward", seen["pool1"] - seen["relu1"]),
                              ("max-pool 1 backward", seen["conv1"] - seen["pool1"]),
                              ("conv1 backward", t5 - seen["conv1"]), ("SGD step", t6 - t5), ("step", t6 - t0)):
            parts.setdefault(part, []).append(seconds * 1e6)
    medians = {part: statistics.median(values) for part, values in parts.items()}
    convolution = sum(v for k, v in medians.items() if k.startswith(("conv1", "conv2")))
    threads = torch.get_num_threads()
    log(f"training step breakdown ({threads} thread(s)): {medians['step']:.0f} us per step, convolutions "
        f"{100 * convolution / medians['step']:.0f}%")
    return {"threads": threads, "steps": steps, "microseconds": medians}


def time_fast_path(data: TrainingData, steps: int | None = None) -> dict:
    """One epoch (or its first `steps` batches) of train/loop.py's train_epoch on the seed's
    recipe; img/s as the median of 100-step chunks."""
    from train.loop import epoch_order, test, train_epoch

    model, optimizer = fast_path_model()
    order = epoch_order(len(data.y_train), 1, 1)[:None if steps is None else steps * 64]
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
    train_epoch(model, optimizer, data.x_train, data.y_train, 64, order, Chunks())
    seconds = time.perf_counter() - started
    return {"images_per_second": statistics.median(chunk_rates), "epoch_seconds": seconds,
            "test_accuracy_after_1_epoch": test(model, data.x_test, data.y_test, 1000)[1]}


def bench_recipes(work: Path, threads: int, recipes: list[str], targets: list[float]) -> dict:
    """Each recipe trained to its end; training seconds (evaluation excluded) until each target
    test accuracy is first reached, from the run's metrics.csv."""
    import csv

    from train.checkpoint import load_checkpoint
    results = {}
    for recipe in recipes:
        directory = work / f"checkpoints-{recipe}"
        started = time.perf_counter()
        run("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR), "--recipe", recipe,
            "--threads", str(threads), "--checkpoint-dir", str(directory))
        wall = time.perf_counter() - started
        rows = list(csv.DictReader(open(directory / "metrics.csv")))
        best = load_checkpoint(directory / "best.pt")  # chosen on the validation set
        reached, elapsed = {}, 0.0
        for row in rows:
            elapsed += float(row["epoch_seconds"])
            for target in targets:
                if str(target) not in reached and float(row["test_accuracy"]) >= target:
                    reached[str(target)] = {"epoch": int(row["epoch"]), "training_seconds": elapsed}
        results[recipe] = {"epochs": len(rows), "wall_seconds": wall, "training_seconds": elapsed,
                           "final_test_accuracy": float(rows[-1]["test_accuracy"]),
                           # the test figure of the epoch that validation chose, not the test set's own best
                           "best_test_accuracy": best["metrics"]["test_accuracy"],
                           "best_epoch": best["epoch"],
                           "best_validation_accuracy": best["metrics"]["validation_accuracy"],
                           "reached": reached, "checkpoint": str(directory / "best.pt")}
        log(f"recipe {recipe}: best.pt (epoch {best['epoch']}, chosen on validation) test accuracy "
            f"{100 * results[recipe]['best_test_accuracy']:.2f}% in {wall:.0f} s; " + ", ".join(
                f"{100 * t:.0f}% " + (f"after {reached[str(t)]['training_seconds']:.0f} s" if str(t) in reached
                                      else "not reached") for t in targets))
    return {"recipes": results, "targets": targets, "threads": threads}


def bench_framing(build: Path, count: int = 1000) -> dict:
    """Accuracy of the exported model on the same test images sent as paper photos, canvas
    drawings and phone JPEGs, framing off and auto, next to the data set's own form."""
    from bench.realistic_inputs import framing_report

    from bench.forms import forms_report

    report = framing_report(build, DATA_DIR, count)
    log("framing: " + ", ".join(f"{form} {100 * row['framing_auto']:.1f}% (off {100 * row['framing_off']:.1f}%)"
                                for form, row in report["forms"].items()))
    report["per_form"] = forms_report(build, DATA_DIR, min(count, 500))  # every form that applies
    log("forms: " + ", ".join(f"{form} {100 * a:.1f}%" for form, a in report["per_form"]["accuracy"].items()))
    return report


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


def formats_markdown(fr: dict) -> list[str]:
    lines = ["", f"## Formats (CPU, 1 thread; REST: wrk, concurrency {fr['concurrency']}, "
             f"{fr['duration_seconds']} s, the shipped model-config.yaml: one worker per core, batches of up to 16)", "",
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

def yes(ok: bool) -> str:
    return "yes" if ok else "no"


def training_rows(tr: dict) -> list[tuple[str, str, str, str]]:
    runs = tr.get("runs", [tr])  # results written before the spread was measured hold one run
    speedups = [run["speedup"] for run in runs]
    spread = (f"{min(speedups):.2f}x to {max(speedups):.2f}x over {len(runs)} runs, median "
              f"{statistics.median(speedups):.2f}x" if len(runs) > 1 else f"{speedups[0]:.2f}x (1 run)")
    acc_seed, acc_fast = tr["seed_loop"]["test_accuracy_after_1_epoch"], tr["fast_path"]["test_accuracy_after_1_epoch"]
    why = ("the seed loop builds, converts and normalizes a PIL image per item on every step; the fast path "
           "(channels-last, data decoded once) is left with oneDNN's kernels: see the step's parts below")
    if "speedup_ceiling" in tr:  # measured since the one-thread run was added
        why += (f"; on 1 thread the fast path runs {tr['fast_path_one_thread']['images_per_second']:,.0f} img/s, and "
                f"{tr['threads']} x that would be {tr['speedup_ceiling']:.2f}x the seed loop (median)")
    return [
        ("training fast path >= 4x the seed loop's img/s in every run (batch 64, CPU)",
         f"{spread} ({tr['fast_path']['images_per_second']:,.0f} vs {tr['seed_loop']['images_per_second']:,.0f} "
         f"img/s, medians, {tr['threads']} threads)", yes(min(speedups) >= 4), why),
        ("... with the same test accuracy (after 1 epoch)", f"{100 * acc_fast:.2f}% vs {100 * acc_seed:.2f}%",
         yes(abs(acc_fast - acc_seed) <= 0.01), "same recipe; the epoch orders differ"),
    ]


def recipe_rows(rc: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    best_name, best = max(rc["recipes"].items(), key=lambda item: item[1]["best_test_accuracy"])
    rows.append(("a recipe reaches >= 91.0% Fashion-MNIST test accuracy on this CPU",
                 f"--recipe {best_name}: best {100 * best['best_test_accuracy']:.2f}% ({best['epochs']} epochs, "
                 f"{best['wall_seconds']:.0f} s)", yes(best["best_test_accuracy"] >= 0.91), "the same network"))
    for name, recipe in rc["recipes"].items():
        reached = ", ".join(
            f"{100 * t:.0f}%: " + (f"{recipe['reached'][str(t)]['training_seconds']:.0f} s (epoch "
                                   f"{recipe['reached'][str(t)]['epoch']})" if str(t) in recipe["reached"] else "not reached")
            for t in rc["targets"])
        rows.append((f"time to accuracy, --recipe {name} ({rc['threads']} threads)",
                     f"{reached}; best {100 * recipe['best_test_accuracy']:.2f}% after {recipe['epochs']} epochs",
                     "-", "training seconds, evaluation excluded"))
    return rows


def serving_rows(r: dict) -> list[tuple[str, str, str, str]]:
    sv, rows = r["serving"], []
    c = 32 if 32 in sv["ceiling"] else max(sv["ceiling"])
    ceiling = sv["ceiling"][c]["requests_per_second"]
    if "shipped" in sv:
        shipped = sv["shipped"]
        v = shipped["by_concurrency"][c]
        ok = v["requests_per_second"] >= 3000 and v["p99_ms"] <= 50 and v["non_2xx"] == 0
        rows.append((f"TorchServe as shipped >= 3,000 req/s at concurrency {c}, p99 <= 50 ms, PNG bodies, 0 non-2xx",
                     f"{v['requests_per_second']:,.0f} req/s, p99 {v['p99_ms']:.1f} ms, non-2xx {v['non_2xx']}",
                     yes(ok), f"{shipped['workers']} workers (one per core here), batches of up to "
                     f"{shipped['batch_size']} within {shipped['max_delay_ms']} ms; "
                     f"{100 * v['requests_per_second'] / ceiling:.0f}% of the loopback ceiling ({ceiling:,.0f} req/s)"))
        peers = {name: row for name, row in sv.get("peers", {}).items()}
        from bench.peers import best_peer
        best = best_peer(peers)
        if best:
            name, row = best
            ours = shipped["json_body"]["requests_per_second"]
            rows.append((f"... >= 2x the best peer, same JSON bodies at concurrency {c}",
                         f"{ours / row['requests_per_second']:.1f}x ({ours:,.0f} vs {row['requests_per_second']:,.0f} "
                         f"req/s, {name})", yes(ours >= 2 * row["requests_per_second"]),
                         "peers serve model.onnx with onnxruntime and the project's preprocessing"))
        elif "peers" in sv:
            rows.append(("... >= 2x the best peer", "no peer was measured", "no", "see the peers table"))
    configs = sv["configs"]
    unbatched = {cfg["workers"]: cfg["by_concurrency"][c] for cfg in configs.values() if cfg["batch_size"] == 1}
    batched = [(cfg["workers"], cfg["by_concurrency"][c]) for cfg in configs.values() if cfg["batch_size"] > 1]
    if unbatched and batched:
        workers, on = max(batched, key=lambda item: item[1]["requests_per_second"])
        off_workers = workers if workers in unbatched else min(unbatched)
        off = unbatched[off_workers]
        rows.append(("batching >= 3x TorchServe's own unbatched figure",
                     f"{on['requests_per_second'] / off['requests_per_second']:.1f}x ({on['requests_per_second']:,.0f} "
                     f"req/s batched with {workers} worker(s) vs {off['requests_per_second']:,.0f} unbatched with "
                     f"{off_workers})", yes(on["requests_per_second"] >= 3 * off["requests_per_second"]), ""))
    rows.append(("start-up: torchserve --start to every worker READY",
                 f"median {statistics.median(sv['startup_seconds']):.1f} s", "-", "no target"))
    if sv["device"] != "cpu":
        cmax = max(sv["ceiling"])
        best_name, best = max(((n, cfg["by_concurrency"][cmax]) for n, cfg in configs.items()),
                              key=lambda item: item[1]["requests_per_second"])
        ok = best["requests_per_second"] >= 20000 and best["p99_ms"] <= 20 and best["non_2xx"] == 0
        rows.append((f"GPU ({sv['device']}): >= 20,000 req/s at concurrency {cmax}, p99 <= 20 ms, no errors",
                     f"{best['requests_per_second']:,.0f} req/s, p99 {best['p99_ms']:.1f} ms ({best_name})",
                     yes(ok), f"frontend threads {sv['frontend_threads']}"))
    return rows


def targets(r: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, met, note) rows."""
    rows = []
    if "training" in r:
        rows += training_rows(r["training"])
    if "recipes" in r and "recipes" in r["recipes"]:
        rows += recipe_rows(r["recipes"])
    if "inference" in r:
        b1 = r["inference"]["batch1"]
        ratio = b1["eager"] / b1["onnxruntime"]
        rows.append(("onnxruntime batch 1 <= 60 us per image and >= 4x eager PyTorch (1 thread)",
                     f"{b1['onnxruntime']:.1f} us; {ratio:.1f}x eager ({b1['eager']:.1f} us)",
                     yes(b1["onnxruntime"] <= 60 and ratio >= 4), "per-call overhead dominates at batch 1"))
    if "framing" in r:
        forms = r["framing"]["forms"]
        worst = max((row["points_below_dataset_form"], form) for form, row in forms.items() if form != "dataset")
        rows.append(("each real-world form (paper, canvas, phone) within 3 points of the data set's form",
                     f"worst: {worst[1]}, {worst[0]:.1f} points below ({r['framing']['images']} images per form)",
                     yes(worst[0] <= 3), "framing auto; onnxruntime on the same preprocessing as every runtime"))
    if "serving" in r:
        rows += serving_rows(r)
    if "serving" not in r or r["serving"]["device"] == "cpu":
        rows.append(("GPU: >= 20,000 req/s at concurrency 128 (p99 <= 20 ms); 91.0% in <= 2 s of training",
                     "not measured by this run", "-", "no GPU here"))
    return rows


def write_markdown(r: dict, path: Path) -> None:
    lines = [f"# Benchmark, {r['host']}, {r['date']}", "",
             f"{r['cpu']}, {r['cores']} cores, torch {r['torch']}, onnxruntime {r['onnxruntime']}. "
             "Medians; every comparison within this one run.", "",
             "## Targets", "", "| target | measured | met | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(r)]
    if "step_breakdown" in r.get("training", {}):
        sb = r["training"]["step_breakdown"]
        step = sb["microseconds"]["step"]
        lines += ["", f"## A fast-path training step, part by part (CPU, {sb['threads']} thread(s), batch 64, "
                  f"median of {sb['steps']} steps)", "", "| part | us | share |", "| --- | --- | --- |"]
        lines += [f"| {part} | {us:,.0f} | {100 * us / step:.0f}% |" for part, us in sb["microseconds"].items()]
        lines += ["", "Timed with the wall clock and gradient hooks (bench/main.py step_breakdown), not the "
                  "profiler, whose per-op attribution misled here. The parts add up to the step but for "
                  "zero_grad and registering the hooks."]
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
        rows = list(sv["configs"].items())
        if "shipped" in sv:
            shipped = sv["shipped"]
            rows.insert(0, (f"as shipped ({shipped['workers']} workers, batching on ({shipped['batch_size']}))", shipped))
        for name, cfg in rows:
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
        if "peers" in sv:
            lines += peers_table(sv)
    if "formats" in r:
        lines += formats_markdown(r["formats"])
    if "framing" in r:
        from bench.realistic_inputs import markdown_table
        lines += ["", "## Real-world inputs: accuracy per form (bench/realistic_inputs.py)", "",
                  markdown_table(r["framing"])]
        if "per_form" in r["framing"]:
            from bench.forms import markdown_table as forms_table
            lines += ["", "## Every form that applies: accuracy (bench/forms.py)", "", forms_table(r["framing"]["per_form"])]
    path.write_text("\n".join(lines) + "\n")


def peers_table(sv: dict) -> list[str]:
    shipped = sv["shipped"]
    ours = shipped["json_body"]
    lines = ["", f"## Peers (wrk, {sv['duration_seconds']} s, concurrency {ours['concurrency']}, the same JSON body "
             "{\"image\": \"<base64 PNG>\"}, same model, same preprocessing)", "",
             "| server | req/s | p50 ms | p99 ms | non-2xx | start-up s | project / peer |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| TorchServe as shipped ({shipped['workers']} workers, batching on ({shipped['batch_size']})) | "
             f"{ours['requests_per_second']:,.0f} | {ours['p50_ms']:.2f} | {ours['p99_ms']:.2f} | {ours['non_2xx']} | "
             f"{sv['startup_seconds'][0]:.1f} | 1.0x |"]
    for name, row in sv["peers"].items():
        if "requests_per_second" not in row:
            lines.append(f"| {name} | not measured: {row['error'][:200]} | | | | | |")
            continue
        lines.append(f"| {name} | {row['requests_per_second']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['non_2xx']} | {row['startup_seconds']:.1f} | "
                     f"{ours['requests_per_second'] / row['requests_per_second']:.1f}x |")
    lines += ["", "Every peer serves build/model.onnx with onnxruntime (1 thread per worker) and contract/'s "
              "preprocessing, and must answer a real test image within 1e-5 of onnxruntime before it is measured "
              "(all did: max |dp| " + ", ".join(f"{row['max_abs_dp']:.1e}" for row in sv["peers"].values()
                                                   if "max_abs_dp" in row) + "). "
              "BentoML's batchable API takes a list per request, so its body is {\"image\": [\"<base64 PNG>\"]}."]
    return lines


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
        configs = dict(sv["configs"])
        if "shipped" in sv:
            configs = {"as shipped": sv["shipped"], **configs}
        for name, cfg in configs.items():
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
        for cfg in [*serving["configs"].values(), *([serving["shipped"]] if "shipped" in serving else [])]:
            cfg["by_concurrency"] = {int(k): v for k, v in cfg["by_concurrency"].items()}
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=6, help="wrk duration per point")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--recipes", nargs="+", default=["seed", "fast"], help="train/main.py recipes to time")
    p.add_argument("--accuracy-targets", type=float, nargs="+", default=[0.90, 0.91],
                   help="test accuracies whose time to reach is reported per recipe")
    p.add_argument("--training-runs", type=int, default=3, help="runs of the seed loop vs fast path comparison")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-peers", action="store_true", help="TorchServe alone, without LitServe and BentoML")
    p.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python",
                   help="the peers' venv interpreter (make peers-venv)")
    p.add_argument("--build", type=Path, default=None,
                   help="serve this existing export (with samples/) and skip training and inference")
    p.add_argument("--variants", nargs="+", default=["1x1", "16x1", "1x2", "16x2"],
                   help="TorchServe configurations as BATCHxWORKERS")
    p.add_argument("--frontend-threads", type=int, default=None,
                   help="TorchServe netty threads for the variants (default: TorchServe's, from the cores)")
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
            results["training"] = bench_training_loops(CORES, args.training_runs)
            results["recipes"] = bench_recipes(work, CORES, args.recipes, args.accuracy_targets)
            checkpoint = results["recipes"]["recipes"][args.recipes[0]]["checkpoint"]
            build = work / "build"
            run("export", "build", "--format", "pt2", "--device", "cpu", "--checkpoint", checkpoint,
                "--build-dir", str(build), "--data-dir", str(DATA_DIR))
            results["inference"] = bench_inference(build, Path(checkpoint))
            results["framing"] = bench_framing(build)
        if not args.skip_serving and not args.formats_only:
            results["serving"] = bench_serving(build, work, args.seconds, args.concurrency, variants,
                                               args.frontend_threads, not args.skip_peers, args.peers_python)
        if not args.skip_serving:
            results["formats"] = bench_formats(build, work, args.seconds)
    results["bench_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{results['host']}-{results['date']}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / "latest.md")
    plot(results, RESULTS / "latest.png")
    log(f"wrote {out}, {RESULTS / 'latest.md'}, {RESULTS / 'latest.png'} in {results['bench_seconds']:.0f} s")
