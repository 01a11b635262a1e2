"""Train the ConvNet and write checkpoints: `python -m train --help`.

The defaults are the seed tutorial's recipe (SGD lr 0.01, momentum 0.5, batch 64, 10 epochs).
Each split is decoded once into a tensor that lives on the training device; every epoch draws
its order from (seed, epoch), so a run resumed from `last.pt` sees exactly the batches that an
uninterrupted run would have seen.

Under torchrun, --batch-size stays the global batch: each of the N processes takes its 1/N
slice of every batch, and the gradients are averaged so that the step is the single-process one.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train import distributed
from train.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from train.data import (CHOICES, DataUnavailable, ensure_dataset, load_split, normalize,
                        pixel_statistics)
from train.model import ARCHITECTURE, INPUT_SHAPE, build_model

# Settings that define the run; on --resume they come from the checkpoint, not the command line.
RECIPE_KEYS = ("dataset", "recipe", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
               "schedule", "flip", "seed", "train_limit", "test_limit")

# --recipe picks the defaults; any flag given explicitly still wins. "seed" is the tutorial's
# recipe; "fast" is the same network trained harder: a larger batch, Nesterov momentum, weight
# decay, a one-cycle learning rate and random horizontal flips.
RECIPES = {
    "seed": {"epochs": 10, "batch_size": 64, "lr": 0.01, "momentum": 0.5, "nesterov": False,
             "weight_decay": 0.0, "schedule": "constant", "flip": False},
    "fast": {"epochs": 15, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "schedule": "onecycle", "flip": True},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=CHOICES, default="auto",
                   help="auto: mnist when present or downloadable, else fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--recipe", choices=tuple(RECIPES), default="seed",
                   help="seed: the tutorial's recipe; fast: same network, trained to higher accuracy")
    p.add_argument("--epochs", type=int, help="total epochs, counting resumed ones (seed: 10)")
    p.add_argument("--batch-size", type=int, help="global batch (seed: 64)")
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, help="learning rate; the peak of the one-cycle schedule (seed: 0.01)")
    p.add_argument("--momentum", type=float, help="SGD momentum (seed: 0.5)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=("constant", "onecycle"))
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of training images")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--threads", type=int,
                   default=max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))),
                   help="CPU threads for PyTorch (default: the usable cores, divided among the "
                        "processes torchrun starts on this machine); use 1 when other work shares them")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="end this session after that epoch; --resume continues the planned --epochs")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--prepare-data-only", action="store_true",
                   help="make the data set present under --data-dir, then exit")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return torch.device("cpu")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch `epoch`: a function of (seed, epoch) alone, hence resumable."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train_epoch(model, optimizer, images, labels, batch_size, order, progress,
                group: distributed.Group = distributed.Group(), scheduler=None,
                flips: torch.Tensor | None = None) -> float:
    """One pass over `order`. flips: a bool per training image, True to mirror it this epoch."""
    model.train()
    total_loss = torch.zeros((), device=images.device)
    order = order.to(images.device)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        mine = distributed.my_share(batch, group)
        x = images[mine]
        if flips is not None:
            x = torch.where(flips[mine].view(-1, 1, 1, 1), x.flip(-1), x)
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


def write_metrics(history: list[dict], directory: Path) -> None:
    """metrics.csv and curves.png, rewritten from the full history (so a resume never duplicates)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    tmp = directory / ".metrics.csv.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, directory / "metrics.csv")
    plot_curves(history, directory / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="NLL loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in history], "o-")
    ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    group = distributed.from_environment()
    if not group.is_main:  # only rank 0 reports; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    torch.set_num_threads(args.threads)
    device = select_device(args.device, group.local_rank)
    distributed.start(group, device)
    try:
        run(args, group, device)
    finally:
        distributed.stop(group)


def run(args, group: distributed.Group, device: torch.device) -> None:
    ckpt_dir = args.checkpoint_dir
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    resumed = None
    if args.resume or (group.restarted and (ckpt_dir / "last.pt").exists()):
        try:
            resumed = load_checkpoint(ckpt_dir / "last.pt")
        except CheckpointError as error:
            raise SystemExit(f"--resume: {error}")
        for key in RECIPE_KEYS:
            if settings[key] != resumed["settings"][key] and not (key == "dataset" and settings[key] == "auto"):
                print(f"[train] --resume keeps the run's {key}={resumed['settings'][key]!r} "
                      f"(ignoring {settings[key]!r})")
            settings[key] = resumed["settings"][key]
        if settings["schedule"] == "onecycle" and args.epochs != resumed["settings"]["epochs"]:
            raise SystemExit(f"--resume: the one-cycle schedule was planned for --epochs "
                             f"{resumed['settings']['epochs']}; resume with that number")

    try:
        if not group.is_main:
            distributed.barrier(group)  # rank 0 unpacks or copies the files first
        info = ensure_dataset(settings["dataset"], args.data_dir)
        if group.is_main:
            distributed.barrier(group)
    except DataUnavailable as error:
        raise SystemExit(f"[data] {error}")
    settings["dataset"] = info.name
    if args.prepare_data_only:
        print(f"[data] {info.name} is ready in {info.raw_dir(args.data_dir)}")
        return
    train_split = load_split(info, args.data_dir, train=True)
    test_split = load_split(info, args.data_dir, train=False)
    if settings["train_limit"]:
        train_split.images, train_split.labels = (t[: settings["train_limit"]] for t in (train_split.images, train_split.labels))
    if settings["test_limit"]:
        test_split.images, test_split.labels = (t[: settings["test_limit"]] for t in (test_split.images, test_split.labels))
    if resumed:
        mean, std = resumed["data"]["mean"], resumed["data"]["std"]
    else:
        mean, std = pixel_statistics(train_split.images)

    x_train = normalize(train_split.images, mean, std).to(device)
    y_train = train_split.labels.to(device)
    x_test = normalize(test_split.images, mean, std).to(device)
    y_test = test_split.labels.to(device)

    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    model = build_model(ARCHITECTURE).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions and max-pooling are vectorized for channels-last tensors: a
        # training step is 1.6x faster here (the profile: max_pool2d was 28% of a step). The
        # weights are the same numbers either way; checkpoints load into any layout.
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                nesterov=settings["nesterov"], weight_decay=settings["weight_decay"],
                                foreach=True)
    scheduler = None
    if settings["schedule"] == "onecycle":
        steps = -(-len(y_train) // settings["batch_size"])
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"],
                                                        epochs=args.epochs, steps_per_epoch=steps)
    history, first_epoch, best_accuracy = [], 1, -1.0
    if resumed:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler_state"])
        restore_rng_state(resumed["rng_state"])
        history = resumed["history"]
        first_epoch = resumed["epoch"] + 1
        best_accuracy = resumed["best_test_accuracy"]
        print(f"[train] resumed from {ckpt_dir / 'last.pt'} after epoch {resumed['epoch']}")
    trained = distributed.wrap(model, group, device)

    print(f"[train] {info.name}: {len(y_train)} training / {len(y_test)} test images, "
          f"mean {mean:.4f} std {std:.4f}; device {device}, {torch.get_num_threads()} thread(s)"
          f"{f', {group.world_size} process(es), {distributed.backend(device)}' if group.launched else ''}; "
          f"recipe {settings['recipe']}: epochs {first_epoch}..{args.epochs}, batch "
          f"{settings['batch_size']}, lr {settings['lr']}{' one-cycle' if scheduler else ''}")
    if first_epoch > args.epochs:
        print(f"[train] nothing to do: {ckpt_dir / 'last.pt'} already has {first_epoch - 1} epochs")
        return

    last_epoch = min(args.epochs, args.stop_after_epoch or args.epochs)
    for epoch in range(first_epoch, last_epoch + 1):
        started = time.perf_counter()
        order = epoch_order(len(y_train), settings["seed"], epoch)
        flips = None
        if settings["flip"]:  # like the order, a function of (seed, epoch): resumable
            g = torch.Generator().manual_seed(settings["seed"] * 100_003 + epoch + 50_000)
            flips = (torch.rand(len(y_train), generator=g) < 0.5).to(device)
        with tqdm(total=len(order), desc=f"epoch {epoch}/{args.epochs}", unit="img",
                  disable=None if group.is_main else True, leave=False, file=sys.stderr) as progress:
            train_loss = train_epoch(trained, optimizer, x_train, y_train, settings["batch_size"],
                                     order, progress, group, scheduler, flips)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if group.is_main:  # rank 0 evaluates and writes; the others wait at the barrier
            best_accuracy = finish_epoch(model, optimizer, scheduler, x_test, y_test, args, settings, info,
                                         mean, std, device, group, history, epoch, train_loss,
                                         seconds, len(order), best_accuracy)
        distributed.barrier(group)
    if last_epoch < args.epochs:
        print(f"[train] stopped after epoch {last_epoch} of {args.epochs}: the same command with "
              f"--resume continues")
    print(f"[train] done: best test accuracy {100 * best_accuracy:.2f}%; checkpoints in {ckpt_dir}/")


def finish_epoch(model, optimizer, scheduler, x_test, y_test, args, settings, info, mean, std, device, group,
                 history, epoch, train_loss, seconds, images, best_accuracy) -> float:
    """Evaluate, append to the history, write last.pt (and best.pt), metrics.csv, curves.png."""
    test_loss, test_accuracy = test(model, x_test, y_test, args.test_batch_size)
    history.append({"epoch": epoch, "train_loss": round(train_loss, 6),
                    "test_loss": round(test_loss, 6), "test_accuracy": test_accuracy,
                    "epoch_seconds": round(seconds, 3),
                    "images_per_second": round(images / seconds, 1)})
    improved = test_accuracy > best_accuracy
    best_accuracy = max(best_accuracy, test_accuracy)
    state = {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict() if scheduler is not None else {},
        "epoch": epoch,
        "rng_state": rng_state(),
        "settings": settings,
        "metrics": history[-1],
        "history": history,
        "best_test_accuracy": best_accuracy,
        "data": {"dataset": info.name, "classes": list(info.classes), "mean": mean, "std": std,
                 "input_shape": list(INPUT_SHAPE)},
        "torch_version": str(torch.__version__),
        "trained_on": device.type,
        "world_size": group.world_size,
    }
    ckpt_dir = args.checkpoint_dir
    save_checkpoint(state, ckpt_dir / "last.pt")
    if improved:
        save_checkpoint(state, ckpt_dir / "best.pt")
    write_metrics(history, ckpt_dir)
    print(f"[train] epoch {epoch}/{args.epochs}: train loss {train_loss:.4f}, test loss "
          f"{test_loss:.4f}, test accuracy {100 * test_accuracy:.2f}%, {seconds:.1f} s "
          f"({images / seconds:,.0f} img/s){' -> best.pt' if improved else ''}", flush=True)
    return best_accuracy
