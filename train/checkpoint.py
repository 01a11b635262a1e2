"""Checkpoints: plain data only, written atomically, loaded with weights_only=True.

A checkpoint holds tensors, numbers, strings, lists and dicts and nothing else, so that
`torch.load(weights_only=True)` (PyTorch's default) loads it and a tampered file holding a pickled
object is refused instead of executed.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from contract.bundle import write_atomically

# 2: settings as train/settings.py's TrainingSettings, the validation split and its figures,
# best_epoch, run_id, launch_id and trained_on always present. 3: the robustness augmentation's
# setting and the training time (wall_seconds).
FORMAT_VERSION = 3
RETRAIN = ("train a new run with `make train` (python -m train --start-over, or another "
           "--checkpoint-dir), then `make export`")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def save_checkpoint(state: dict, path: Path | str) -> None:
    """Write `state` to `path` so that a reader never sees a half-written file.

    torch.save goes to a temporary file in the same directory, which is flushed to disk and then
    renamed over `path` (a rename within one file system is atomic). A crash at any point leaves
    either the previous file or the new one.
    """
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first (make train) or pass --checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines()]
        detail = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(
            f"refusing {path}: it holds objects that torch.load(weights_only=True) does not allow "
            f"(only tensors, numbers, strings, lists and dicts are); it was not written by "
            f"`python -m train` or was tampered with. {detail}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or corrupt ({first_line})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by an older `python -m train` (checkpoint format "
                              f"{version}, this code reads {FORMAT_VERSION}): {RETRAIN}")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {FORMAT_VERSION}): "
                              "it was not written by `python -m train` (or by a newer one)")
    return state


CHECKPOINT_FILES = ("last.pt", "best.pt", "metrics.csv", "curves.png")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files a killed writer left (write_atomically's `.<name>.*.tmp`); returns them."""
    stale = [p for p in Path(directory).glob(".*.tmp")
             if p.is_file() and p.name.startswith(tuple(f".{name}." for name in CHECKPOINT_FILES))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def reconcile_best(directory: Path | str, last: dict | None = None) -> bool:
    """Bring best.pt up to last.pt after a stop between their writes; True if it was rewritten.

    last.pt is written first and names its best epoch: if that is last.pt's own epoch and best.pt
    holds another epoch (or another run), last.pt holds the best state and becomes best.pt.
    """
    directory = Path(directory)
    last = last if last is not None else load_checkpoint(directory / "last.pt")
    if last["best_epoch"] != last["epoch"]:
        return False
    best_path = directory / "best.pt"
    try:
        best = load_checkpoint(best_path)
        if (best["run_id"], best["epoch"]) == (last["run_id"], last["epoch"]):
            return False
    except CheckpointError:
        pass  # missing or unreadable: last.pt replaces it all the same
    save_checkpoint(last, best_path)
    print(f"[train] {best_path} was behind {directory / 'last.pt'} (stopped between the two "
          f"writes): rewritten from last.pt, epoch {last['epoch']}")
    return True



def load_model(source: Path | str | dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The eager model of a checkpoint (a path, or a state already loaded), in eval mode."""
    from train.model import build_model

    state = source if isinstance(source, dict) else load_checkpoint(source)
    model = build_model(state["architecture"])
    model.load_state_dict(state["model_state"])
    return model.eval().to(device)
