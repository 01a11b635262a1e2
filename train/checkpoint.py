"""Checkpoints: plain data only, written atomically, loaded with weights_only=True.

A checkpoint holds tensors, numbers, strings, lists and dicts and nothing else, so that
`torch.load(weights_only=True)` (PyTorch's default) loads it and a tampered file holding a pickled
object is refused instead of executed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def save_checkpoint(state: dict, path: Path | str) -> None:
    """Write `state` to `path` so that a reader never sees a half-written file.

    torch.save goes to a temporary file in the same directory, which is flushed to disk and then
    renamed over `path` (a rename within one file system is atomic). A crash at any point leaves
    either the previous file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {FORMAT_VERSION})")
    return state

