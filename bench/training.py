"""1. Training: the seed tutorial's loop (torchvision DataLoader, per-item ToTensor/Normalize) vs
the tensor fast path, same model, batch 64 and recipe, several runs (the speedup's spread); then
each recipe to its end, with the training seconds it took to first reach each target accuracy."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.common import log, run
from contract.paths import DATA_DIR

if TYPE_CHECKING:
    from train.data import DatasetInfo


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


def bench_training_loops(data: TrainingData, threads: int, runs: int) -> dict:
    """`runs` times one epoch of each loop; the speedup of every run, and its spread."""
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
                           "splits": best["data"]["splits"], "augmentation": best["data"]["augmentation"],
                           "reached": reached, "checkpoint": str(directory / "best.pt")}
        log(f"recipe {recipe}: best.pt (epoch {best['epoch']}, chosen on validation) test accuracy "
            f"{100 * results[recipe]['best_test_accuracy']:.2f}% in {wall:.0f} s; " + ", ".join(
                f"{100 * t:.0f}% " + (f"after {reached[str(t)]['training_seconds']:.0f} s" if str(t) in reached
                                      else "not reached") for t in targets))
    return {"recipes": results, "targets": targets, "threads": threads}
