"""The training loop, importable without a command line (train/main.py parses one; bench/ and
the tests import this).

A validation set is held out of the training set (its size and the seed say which images):
it chooses `best.pt`; the test set is only reported. Each split is decoded once into a tensor
that lives on the training device; every epoch draws
its order (and its augmentation: train/augment.py) from (seed, epoch), so a run resumed from `last.pt` sees exactly the
batches that an uninterrupted run would have seen.

Under torchrun the batch size stays the global batch: each of the N processes takes its 1/N
slice of every batch, and the loss is scaled so that the averaged gradient is the
single-process one. Rank 0 evaluates and writes checkpoints; the others wait at a barrier.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train import augment, distributed
from contract.bundle import write_atomically
from train.checkpoint import FORMAT_VERSION, CheckpointError, save_checkpoint
from train.settings import TrainingSettings
from train.data import DatasetInfo, hold_out, load_split, normalize, pixel_statistics
from train.model import ARCHITECTURE, INPUT_SHAPE, build_model


@dataclass
class Data:
    """The splits of one data set, normalized, on the training device. The validation images
    are held out of the training set; the test set is the data set's own."""
    info: DatasetInfo
    mean: float
    std: float
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    validation_size: int | float = 5000  # as asked for: a count or a fraction of the training set

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "validation": len(self.y_val), "test": len(self.y_test)}


@dataclass
class Run:
    """One training run: its settings (plain data, saved in every checkpoint), what it trains,
    and how far it got."""
    settings: dict
    epochs: int
    checkpoint_dir: Path
    device: torch.device
    group: distributed.Group
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    history: list[dict] = field(default_factory=list)
    best_validation_accuracy: float = -1.0
    best_epoch: int = 0
    first_epoch: int = 1
    run_id: str = ""  # made when the run starts, kept by every resume: a restart resumes its own run only
    wall_seconds: float = 0.0  # epochs with their evaluation and checkpoints, over every session


def load_data(info: DatasetInfo, data_dir: Path, device: torch.device, validation_size: int | float, seed: int,
              train_limit: int | None = None, test_limit: int | None = None,
              normalization: tuple[float, float] | None = None) -> Data:
    """Training, validation and test tensors on `device`, normalized with the training images'
    own mean and std (or `normalization`, a resumed run's).

    The validation images are held out of the whole training set before --train-limit takes
    the first images of the rest: they are never trained on, whatever the limit.
    """
    rest, validation = hold_out(load_split(info, data_dir, train=True), validation_size, seed)
    test_split = load_split(info, data_dir, train=False)
    train_images, train_labels = rest.images[:train_limit], rest.labels[:train_limit]
    test_images, test_labels = test_split.images[:test_limit], test_split.labels[:test_limit]
    mean, std = normalization or pixel_statistics(train_images)
    return Data(info, mean, std,
                normalize(train_images, mean, std).to(device), train_labels.to(device),
                normalize(validation.images, mean, std).to(device), validation.labels.to(device),
                normalize(test_images, mean, std).to(device), test_labels.to(device), validation_size)


def build_run(settings: dict, epochs: int, checkpoint_dir: Path, device: torch.device,
              group: distributed.Group, data: Data, resumed: dict | None = None) -> Run:
    """Model, optimizer and schedule for `settings`, restored from `resumed` (a checkpoint) if given."""
    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    model = build_model(ARCHITECTURE).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions and max-pooling are vectorized for channels-last tensors; in the
        # default layout max_pool2d alone was a large share of a step's profile. The weights
        # are the same numbers either way.
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                nesterov=settings["nesterov"], weight_decay=settings["weight_decay"],
                                foreach=True)
    scheduler = None
    if settings["schedule"] == "onecycle":
        steps = -(-len(data.y_train) // settings["batch_size"])
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"],
                                                        epochs=epochs, steps_per_epoch=steps)
    run = Run(settings, epochs, checkpoint_dir, device, group, data, model, optimizer, scheduler)
    if resumed:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler_state"])
        restore_rng_state(resumed["rng_state"])
        run.history = resumed["history"]
        run.first_epoch = resumed["epoch"] + 1
        run.best_validation_accuracy = resumed["best_validation_accuracy"]
        run.best_epoch = resumed["best_epoch"]
        run.run_id = resumed["run_id"]
        run.wall_seconds = resumed["wall_seconds"]
    if not run.run_id:
        import uuid
        run.run_id = uuid.uuid4().hex[:12]
    return run


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch `epoch`: a function of (seed, epoch) alone, hence resumable."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which training images are mirrored in epoch `epoch`: like the order, resumable."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_000)
    return torch.rand(n, generator=g) < 0.5


def epoch_shifts(n: int, seed: int, epoch: int, max_shift: int) -> torch.Tensor:
    """(dy, dx) per training image for epoch `epoch`, each in -max_shift..max_shift: resumable."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 70_000)
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)


def shift_images(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image of (B, C, H, W) moved by its (dy, dx); the edge pixels (background in these
    data sets) fill what moves in."""
    _, _, height, width = x.shape
    pad = int(shifts.abs().max()) if len(shifts) else 0  # a rank's share of a last batch can be empty
    # every (2 pad + 1)^2 crop of the padded batch as a view, then one crop per image
    windows = F.pad(x, (pad, pad, pad, pad), mode="replicate").unfold(2, height, 1).unfold(3, width, 1)
    return windows[torch.arange(len(x), device=x.device), :, pad - shifts[:, 0], pad - shifts[:, 1]]


def train_epoch(model, optimizer, images, labels, batch_size, order, progress,
                group: distributed.Group = distributed.Group(), scheduler=None,
                flips: torch.Tensor | None = None, shifts: torch.Tensor | None = None,
                robust: tuple[augment.EpochDraws, dict, float, float] | None = None) -> float:
    """One pass over `order`. flips: a bool per training image, True to mirror it this epoch;
    shifts: a (dy, dx) per training image to move it by this epoch; robust: the epoch's draws,
    the ranges and the normalization for train/augment.py."""
    model.train()
    total_loss = torch.zeros((), device=images.device)
    order = order.to(images.device)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        mine = distributed.my_share(batch, group)
        x = images[mine]
        if flips is not None:
            x = torch.where(flips[mine].view(-1, 1, 1, 1), x.flip(-1), x)
        if shifts is not None:
            x = shift_images(x, shifts[mine])
        if robust is not None:
            draws, ranges, mean, std = robust
            x = augment.augment(x, draws.take(mine), ranges, mean, std)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = F.nll_loss(model(x), labels[mine], reduction="sum")
        # DDP averages gradients over the ranks: scaled so, the step is that of the global mean
        (loss_sum * group.world_size / len(batch)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss_sum.detach()  # stays on the device: no per-step sync
        progress.update(len(batch))
    return float(distributed.sum_over_ranks(total_loss, group)) / len(order)


@torch.no_grad()
def test(model, images, labels, batch_size) -> tuple[float, float]:
    model.eval()
    loss = torch.zeros((), device=images.device, dtype=torch.float64)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    for start in range(0, len(labels), batch_size):
        out = model(images[start:start + batch_size])
        target = labels[start:start + batch_size]
        loss += F.nll_loss(out, target, reduction="sum")
        correct += (out.argmax(1) == target).sum()
    return float(loss) / len(labels), float(correct) / len(labels)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def train(run: Run, last_epoch: int, test_batch_size: int = 1000) -> None:
    """Epochs run.first_epoch..last_epoch; after each, rank 0 evaluates and writes checkpoints."""
    settings, data = run.settings, run.data
    trained = distributed.wrap(run.model, run.group, run.device)
    for epoch in range(run.first_epoch, last_epoch + 1):
        started = time.perf_counter()
        order = epoch_order(len(data.y_train), settings["seed"], epoch)
        flips = epoch_flips(len(data.y_train), settings["seed"], epoch).to(run.device) if settings["flip"] else None
        shifts = (epoch_shifts(len(data.y_train), settings["seed"], epoch, settings["shift"]).to(run.device)
                  if settings["shift"] else None)
        robust = ((augment.epoch_draws(len(data.y_train), settings["seed"], epoch).to(run.device),
                   augment.parameters(settings["robust"]), data.mean, data.std)
                  if settings["robust"] else None)
        with tqdm(total=len(order), desc=f"epoch {epoch}/{run.epochs}", unit="img",
                  disable=None if run.group.is_main else True, leave=False, file=sys.stderr) as progress:
            train_loss = train_epoch(trained, run.optimizer, data.x_train, data.y_train,
                                     settings["batch_size"], order, progress, run.group, run.scheduler, flips,
                                     shifts, robust)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if run.group.is_main:  # rank 0 evaluates and writes; the others wait at the barrier
            row = evaluate(run, test_batch_size)
            row.update(epoch=epoch, train_loss=round(train_loss, 6), epoch_seconds=round(seconds, 3),
                       images_per_second=round(len(order) / seconds, 1))
            run.history.append({key: row[key] for key in HISTORY_COLUMNS})
            # best.pt is chosen on the validation set; the test set only reports
            improved = best_epoch(run.history)["epoch"] == epoch
            run.best_validation_accuracy = max(run.best_validation_accuracy, row["validation_accuracy"])
            run.wall_seconds += time.perf_counter() - started  # before the write that records it
            save_checkpoints(run, epoch, improved)
            print(f"[train] epoch {epoch}/{run.epochs}: train loss {train_loss:.4f}; validation loss "
                  f"{row['validation_loss']:.4f}, accuracy {100 * row['validation_accuracy']:.2f}%; test loss "
                  f"{row['test_loss']:.4f}, accuracy {100 * row['test_accuracy']:.2f}%; {seconds:.1f} s "
                  f"({len(order) / seconds:,.0f} img/s){' -> best.pt' if improved else ''}", flush=True)
        distributed.barrier(run.group)


# metrics.csv's columns, in order: which split each figure comes from is in its name
HISTORY_COLUMNS = ("epoch", "train_loss", "validation_loss", "validation_accuracy", "test_loss",
                   "test_accuracy", "epoch_seconds", "images_per_second")


def evaluate(run: Run, batch_size: int) -> dict:
    """Loss and accuracy on the validation and the test set."""
    data = run.data
    validation_loss, validation_accuracy = test(run.model, data.x_val, data.y_val, batch_size)
    test_loss, test_accuracy = test(run.model, data.x_test, data.y_test, batch_size)
    return {"validation_loss": round(validation_loss, 6), "validation_accuracy": validation_accuracy,
            "test_loss": round(test_loss, 6), "test_accuracy": test_accuracy}


def best_epoch(history: list[dict]) -> dict:
    """The history row best.pt holds: the epoch with the highest validation accuracy; among
    equals the lower validation loss (a small validation set is often all right for many
    epochs, and the first of them is the least trained), then the earlier epoch."""
    return max(history, key=lambda row: (row["validation_accuracy"], -row["validation_loss"], -row["epoch"]))


def save_checkpoints(run: Run, epoch: int, improved: bool) -> None:
    """last.pt (and best.pt when the epoch improved), metrics.csv and curves.png.

    last.pt is written first: it records which epoch is the best, so a stop between the two
    writes leaves a last.pt that holds the best state itself, and train/checkpoint.reconcile_best
    brings best.pt up to it. A failed write (a full disk) leaves both previous files as they were.
    """
    if improved:
        run.best_epoch = epoch
    state = {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "model_state": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict() if run.scheduler is not None else {},
        "epoch": epoch,
        "rng_state": rng_state(),
        "settings": TrainingSettings.from_dict(run.settings).to_dict(),  # checked: resumable
        "metrics": run.history[-1],
        "history": run.history,
        "best_validation_accuracy": run.best_validation_accuracy,
        "best_epoch": run.best_epoch,
        "run_id": run.run_id,
        "wall_seconds": round(run.wall_seconds, 3),
        # torchrun's id of this launch (stable across its --max-restarts): a restarted group
        # resumes only a last.pt written by its own launch.
        "launch_id": os.environ.get("TORCHELASTIC_RUN_ID", ""),
        "data": {"dataset": run.data.info.name, "classes": list(run.data.info.classes),
                 "mean": run.data.mean, "std": run.data.std, "input_shape": list(INPUT_SHAPE),
                 # the validation set is held out of the training set: seed and size say which
                 "splits": {**run.data.sizes(), "validation_held_out_of": "train",
                            "validation_seed": run.settings["seed"],
                            "validation_size": run.data.validation_size},
                 "augmentation": augmentation_record(run.settings)},
        "torch_version": str(torch.__version__),
        "trained_on": run.device.type,
        "world_size": run.group.world_size,
    }
    try:
        save_checkpoint(state, run.checkpoint_dir / "last.pt")
        if improved:
            save_checkpoint(state, run.checkpoint_dir / "best.pt")
        write_metrics(run.history, run.checkpoint_dir)
    except OSError as error:
        raise CheckpointError(
            f"writing the checkpoints of epoch {epoch} in {run.checkpoint_dir} failed: {error}. "
            f"The previous last.pt and best.pt are intact (no temporary file is left); free space "
            f"there, then continue with the same command and --resume") from None


def augmentation_record(settings: dict) -> dict:
    """What the training images went through, as plain data (checkpoint and bundle.json)."""
    strength = settings["robust"]
    return {"flip": bool(settings["flip"]), "shift": settings["shift"],
            "robustness": strength, "robustness_ranges": augment.parameters(strength) if strength else {}}


def write_metrics(history: list[dict], directory: Path) -> None:
    """metrics.csv and curves.png, rewritten from the full history (so a resume never duplicates)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomically(directory / "metrics.csv", buf.getvalue().encode())
    plot_curves(history, directory / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    colours = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}  # same in both
    for split in ("train", "validation", "test"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], "o-", color=colours[split], label=split)
    ax_loss.set(xlabel="epoch", ylabel="NLL loss", title="loss")
    ax_loss.legend()
    for split in ("validation", "test"):
        ax_acc.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], "o-", color=colours[split],
                    label=split)
    ax_acc.axvline(best_epoch(history)["epoch"], color="grey", linestyle=":", label="best.pt (validation)")
    ax_acc.set(xlabel="epoch", ylabel="%", title="accuracy")
    ax_acc.legend()
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
