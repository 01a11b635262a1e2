"""Train the ConvNet and write checkpoints: `python -m train --help`.

The default recipe ("fast") trains the tutorial's network harder: Nesterov momentum, weight
decay, a one-cycle learning rate, 30 epochs, and the augmentation the data set's labels allow
(train/data.py declares it per data set). `--recipe seed` is the tutorial's own recipe (SGD lr
0.01, momentum 0.5, batch 64, 10 epochs, no augmentation). A twelfth of the training images
(--validation-size), chosen by the seed, is held out as a validation set that picks `best.pt`;
the test set is evaluated for reporting only.
A run resumed from `last.pt` sees exactly the batches that an uninterrupted run would have seen
(train/loop.py, which holds the loop itself).

Under torchrun, --batch-size stays the global batch: each of the N processes takes its 1/N
slice of every batch, and the gradients are averaged so that the step is the single-process one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from train import distributed
from train.checkpoint import (CHECKPOINT_FILES, RETRAIN, CheckpointError, load_checkpoint,
                              reconcile_best, remove_stale_temporaries)
from train.data import (CHOICES, DEFAULT_VALIDATION_FRACTION, DataUnavailable, DatasetInfo, ensure_dataset,
                        parse_validation_size)
from train.loop import best_epoch, build_run, load_data, train
from train.settings import SettingsError, TrainingSettings

# Settings that define the run; on --resume they come from the checkpoint, not the command line.
RECIPE_KEYS = ("dataset", "recipe", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
               "schedule", "flip", "shift", "robust", "seed", "validation_size", "train_limit",
               "test_limit")
# A recipe's value for a setting the data set decides (train/data.py: what its labels allow).
FROM_DATASET = "dataset"

# --recipe picks the defaults; any flag given explicitly still wins. "seed" is the tutorial's
# recipe; "fast" is the same network trained harder: Nesterov momentum, weight decay, a one-cycle
# learning rate, shifts, and the flips and robustness augmentation the data set declares.
RECIPES = {
    "seed": {"epochs": 10, "batch_size": 64, "lr": 0.01, "momentum": 0.5, "nesterov": False,
             "weight_decay": 0.0, "schedule": "constant", "flip": False, "shift": 0, "robust": 0.0},
    # batch 64 at a peak of 0.05, shifts of up to 1 pixel, 30 epochs: the shortest of the runs
    # tried whose best.pt (chosen on the validation split) cleared 91% test accuracy with every
    # seed; 20 epochs fell short (docs/training.md)
    "fast": {"epochs": 30, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "schedule": "onecycle", "flip": FROM_DATASET, "shift": 1,
             "robust": FROM_DATASET},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=CHOICES, default="auto",
                   help="auto: mnist when present or downloadable, else fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--recipe", choices=tuple(RECIPES), default="fast",
                   help="fast: the tutorial's network trained to higher accuracy (the default); "
                        "seed: the tutorial's recipe")
    p.add_argument("--epochs", type=int, help="total epochs, counting resumed ones (fast: 30, seed: 10)")
    p.add_argument("--batch-size", type=int, help="global batch (64)")
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, help="learning rate; the peak of the one-cycle schedule (seed: 0.01)")
    p.add_argument("--momentum", type=float, help="SGD momentum (seed: 0.5)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=("constant", "onecycle"))
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of training images (fast: where the data set's "
                        "labels allow them; refused for digits)")
    p.add_argument("--shift", type=int, help="move each training image by up to this many pixels, "
                   "at random per image and epoch (0: off)")
    p.add_argument("--robust", type=float, help="strength of the robustness augmentation (stroke "
                   "width, rotation, shear, elastic distortion, blur, contrast, noise; 0: off; fast: "
                   "the data set's, seed: 0)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--threads", type=int,
                   default=max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))),
                   help="CPU threads for PyTorch (default: the usable cores, divided among the "
                        "processes torchrun starts on this machine); use 1 when other work shares them")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt")
    p.add_argument("--start-over", action="store_true",
                   help="delete the checkpoints already in --checkpoint-dir and start a new run there")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="end this session after that epoch; --resume continues the planned --epochs")
    p.add_argument("--validation-size", type=validation_size, default=DEFAULT_VALIDATION_FRACTION,
                   help="training images held out (chosen by --seed) to pick best.pt, never trained on: "
                        "a count (5000) or a fraction of the training set (0.1); default 1/12, at most 1/4")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on the first N training images left after the validation set")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--prepare-data-only", action="store_true",
                   help="make the data set present under --data-dir, then exit")
    p.add_argument("--summary", action="store_true",
                   help="say what the run in --checkpoint-dir trained and how long it took, then exit")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def validation_size(text: str) -> int | float:
    try:
        return parse_validation_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--validation-size ")) from None


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return torch.device("cpu")


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


def resume_settings(args, settings: dict, group: distributed.Group) -> dict | None:
    """The checkpoint to resume from, if any; its recipe replaces the command line's in `settings`.
    Decided by rank 0 alone and handed to every rank (distributed.from_main)."""
    if args.prepare_data_only:
        return None
    resumed = distributed.from_main(group, lambda: checkpoint_to_resume(args, group))
    if resumed is None:
        return None
    try:
        recorded = TrainingSettings.from_dict(resumed["settings"], f"{args.checkpoint_dir / 'last.pt'}")
    except SettingsError as error:
        raise SystemExit(f"--resume: {error}; {RETRAIN}") from None
    for key in RECIPE_KEYS:
        kept = getattr(recorded, key)
        asked_nothing = (key == "dataset" and settings[key] == "auto") or settings[key] == FROM_DATASET
        if settings[key] != kept and not asked_nothing:
            print(f"[train] --resume keeps the run's {key}={kept!r} (ignoring {settings[key]!r})")
        settings[key] = kept
    if settings["schedule"] == "onecycle" and args.epochs != recorded.epochs:
        raise SystemExit(f"--resume: the one-cycle schedule was planned for --epochs "
                         f"{recorded.epochs}; resume with that number")
    return resumed


def settings_from_dataset(settings: dict, info: DatasetInfo) -> None:
    """Fill in what the recipe leaves to the data set (train/data.py), and refuse a flip of
    images whose labels a mirror changes."""
    if settings["flip"] == FROM_DATASET:
        settings["flip"] = info.mirror_symmetric
    elif settings["flip"] and not info.mirror_symmetric:
        raise SystemExit(f"[train] --flip: {info.name}'s labels are not invariant to a left-right flip "
                         f"(a mirrored digit is no digit); leave --flip out (the recipe takes what "
                         f"the data set allows) or pass --no-flip")
    if settings["robust"] == FROM_DATASET:
        settings["robust"] = info.robustness
    if settings["robust"] < 0:
        raise SystemExit(f"[train] --robust {settings['robust']}: a strength is 0 (off) or more")


def checkpoint_to_resume(args, group: distributed.Group) -> dict | None:
    """What this run continues: nothing (a fresh run in an empty folder), the folder's last.pt
    (--resume, or a torchrun restart of the launch that wrote it), or a refusal that says why."""
    folder = args.checkpoint_dir
    ckpt = folder / "last.pt"
    for path in remove_stale_temporaries(folder) if folder.is_dir() else []:
        print(f"[train] removed {path}, left by a run that was stopped while writing")
    if args.start_over and not group.restarted:  # a restart keeps what its own launch wrote
        for name in CHECKPOINT_FILES:
            (folder / name).unlink(missing_ok=True)
        print(f"[train] --start-over: removed the checkpoints in {folder}/")
        return None
    restart = group.restarted and not args.resume
    if not (args.resume or restart):
        present = [name for name in ("last.pt", "best.pt") if (folder / name).exists()]
        if present:
            raise SystemExit(f"[train] {folder}/ holds another run's checkpoints ({', '.join(present)}"
                             f"{describe(folder / present[0])}); a new run would overwrite them. "
                             f"--resume continues that run, --start-over deletes them and starts a new "
                             f"one, --checkpoint-dir DIR trains into another folder")
        return None
    if restart and not ckpt.exists():
        return None  # restarted before this launch wrote its first checkpoint
    way_out = (f"Move {ckpt} aside (or restore a good copy) and resume again, or --start-over to "
               f"start a new run in {folder}/, or --checkpoint-dir DIR for another folder")
    try:
        resumed = load_checkpoint(ckpt)
    except CheckpointError as error:
        raise SystemExit(f"--resume: {error}. {way_out}")
    if restart and resumed["launch_id"] != os.environ.get("TORCHELASTIC_RUN_ID"):
        raise SystemExit(f"[train] torchrun restarted this launch ({os.environ.get('TORCHELASTIC_RUN_ID')}), "
                         f"but {ckpt} was written by another one ({resumed['launch_id'] or 'not torchrun'}, "
                         f"run {resumed['run_id']}): not resuming it. {way_out}")
    reconcile_best(folder, resumed)
    return resumed


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def summary(folder: Path) -> str:
    """One line on the run in `folder`: recipe, epochs, best.pt's figures, how long it trained."""
    try:
        last = load_checkpoint(folder / "last.pt")
    except CheckpointError as error:
        raise SystemExit(f"[train] --summary: {error}")
    best = best_epoch(last["history"])
    settings, splits = last["settings"], last["data"]["splits"]
    return (f"[train] {last['data']['dataset']}, recipe {settings['recipe']}, {last['epoch']} of "
            f"{settings['epochs']} epochs on {splits['train']} training images ({splits['validation']} "
            f"held out for validation): trained in {duration(last['wall_seconds'])}; best.pt is "
            f"epoch {best['epoch']}, validation {100 * best['validation_accuracy']:.2f}%, test "
            f"{100 * best['test_accuracy']:.2f}%")


def describe(path) -> str:
    try:
        state = load_checkpoint(path)
        return f": run {state.get('run_id', '?')}, epoch {state['epoch']} of {state['settings'].get('epochs', '?')}"
    except CheckpointError:
        return ", unreadable"


def run(args, group: distributed.Group, device: torch.device) -> None:
    ckpt_dir = args.checkpoint_dir
    if args.summary:
        print(summary(ckpt_dir))
        return
    # Checked against TrainingSettings once the data set has filled in what the recipe leaves to it.
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    resumed = resume_settings(args, settings, group)
    try:
        if not group.is_main:
            distributed.barrier(group)  # rank 0 unpacks or copies the files first
        info = ensure_dataset(settings["dataset"], args.data_dir)
        if group.is_main:
            distributed.barrier(group)
    except DataUnavailable as error:
        raise SystemExit(f"[data] {error}")
    settings["dataset"] = info.name
    if not resumed:
        settings_from_dataset(settings, info)
    if args.prepare_data_only:
        print(f"[data] {info.name} is ready in {info.raw_dir(args.data_dir)}")
        return
    try:
        TrainingSettings.from_dict(settings, "python -m train's settings")
    except SettingsError as error:
        raise SystemExit(f"[train] {error}") from None
    normalization = (resumed["data"]["mean"], resumed["data"]["std"]) if resumed else None
    try:
        data = load_data(info, args.data_dir, device, settings["validation_size"], settings["seed"],
                         settings["train_limit"], settings["test_limit"], normalization)
    except ValueError as error:
        raise SystemExit(f"[train] {error}")
    training = build_run(settings, args.epochs, ckpt_dir, device, group, data, resumed)
    if resumed:
        print(f"[train] resumed from {ckpt_dir / 'last.pt'} after epoch {resumed['epoch']} "
              f"(run {training.run_id})")

    asked = settings["validation_size"]
    print(f"[train] {info.name}: {len(data.y_train)} training / {len(data.y_val)} validation (held out of "
          f"the training set{f', a fraction {asked:.4g}' if isinstance(asked, float) else ''}, seed "
          f"{settings['seed']}) / {len(data.y_test)} test images, "
          f"mean {data.mean:.4f} std {data.std:.4f}; device {device}, {torch.get_num_threads()} thread(s)"
          f"{f', {group.world_size} process(es), {distributed.backend(device)}' if group.launched else ''}; "
          f"recipe {settings['recipe']}: epochs {training.first_epoch}..{args.epochs}, batch "
          f"{settings['batch_size']}, lr {settings['lr']}{' one-cycle' if training.scheduler else ''}; "
          f"augmentation: flip {'on' if settings['flip'] else 'off'}, shift {settings['shift']}, "
          f"robustness {settings['robust']}")
    if training.first_epoch > args.epochs:
        print(f"[train] nothing to do: {ckpt_dir / 'last.pt'} already has {training.first_epoch - 1} epochs")
        print(summary(ckpt_dir))
        return
    last_epoch = min(args.epochs, args.stop_after_epoch or args.epochs)
    train(training, last_epoch, args.test_batch_size)
    if last_epoch < args.epochs:
        print(f"[train] stopped after epoch {last_epoch} of {args.epochs}: the same command with "
              f"--resume continues")
    if not group.is_main:  # the other ranks keep no history
        return
    best = best_epoch(training.history)
    print(f"[train] done: best.pt is epoch {best['epoch']}, chosen on validation accuracy "
          f"{100 * best['validation_accuracy']:.2f}%; its test accuracy {100 * best['test_accuracy']:.2f}%; "
          f"checkpoints in {ckpt_dir}/; training took {duration(training.wall_seconds)}"
          f"{' over every session of the run' if resumed else ''}")
