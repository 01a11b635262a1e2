"""Data sets: find (or fetch) the IDX files, decode them once into tensors.

Layout under the data root is torchvision's: data/MNIST/raw, data/FashionMNIST/raw. torchvision's
own dataset classes read the files; the training loop then works on whole tensors (no per-item
PIL transform), which is what makes it fast on a few CPU cores.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.datasets.utils import extract_archive

# Debian's `dataset-fashion-mnist` package (installed by `make install` where apt-get works).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataUnavailable(RuntimeError):
    """The data set is neither on disk nor downloadable; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # the name users type: mnist, fashion-mnist
    torchvision_class: type
    classes: tuple[str, ...]
    # Label-safe augmentation: a left-right flip only where the labels are invariant to it
    # (a mirrored shoe is a shoe; a mirrored 2, 3, 4, 5, 7 or 9 is no digit).
    mirror_symmetric: bool
    # The strength of the robustness augmentation (train/augment.py) that the default recipe
    # trains with, chosen on the validation split (docs/training.md has the figures).
    robustness: float

    def raw_dir(self, root: Path) -> Path:
        # torchvision's layout: <root>/<ClassName>/raw
        return Path(root) / self.torchvision_class.__name__ / "raw"


DATASETS = {
    "mnist": DatasetInfo("mnist", datasets.MNIST, tuple(str(d) for d in range(10)),
                         mirror_symmetric=False, robustness=1.0),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        datasets.FashionMNIST,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mirror_symmetric=True, robustness=0.0,
    ),
}
CHOICES = ("auto", *DATASETS)


@dataclass
class TensorData:
    """A split decoded once: uint8 images (N, 28, 28) and int64 labels (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _unpack_gzipped(raw: Path) -> None:
    """torchvision wants the unpacked IDX files; users and Debian often have only the .gz."""
    for name in IDX_FILES:
        gz = raw / f"{name}.gz"
        if not (raw / name).exists() and gz.exists():
            extract_archive(str(gz), str(raw))


def _has_idx_files(raw: Path) -> bool:
    if raw.is_dir():
        _unpack_gzipped(raw)
    return all((raw / name).exists() for name in IDX_FILES)


def _copy_from_debian(info: DatasetInfo, root: Path) -> bool:
    if info.name != "fashion-mnist" or not DEBIAN_FASHION_MNIST.is_dir():
        return False
    raw = info.raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        src = DEBIAN_FASHION_MNIST / f"{name}.gz"
        if src.exists() and not (raw / src.name).exists():
            shutil.copyfile(src, raw / src.name)
    return _has_idx_files(raw)


def _download(info: DatasetInfo, root: Path) -> bool:
    try:
        info.torchvision_class(str(root), train=True, download=True)
        info.torchvision_class(str(root), train=False, download=True)
    except Exception as error:  # offline: URLError, RuntimeError from every mirror, ...
        print(f"[data] could not download {info.name}: {str(error).splitlines()[0]}")
        return False
    return _has_idx_files(info.raw_dir(root))


def ensure_dataset(name: str, root: Path | str = "data", allow_download: bool = True) -> DatasetInfo:
    """Make the IDX files of `name` ('mnist', 'fashion-mnist' or 'auto') present under `root`.

    Returns the DatasetInfo of the data set taken; raises DataUnavailable with the remedies.
    """
    root = Path(root)
    if name == "auto":
        return _choose_automatically(root, allow_download)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(CHOICES)}")
    info = DATASETS[name]
    raw = info.raw_dir(root)
    if _has_idx_files(raw):
        return info
    if _copy_from_debian(info, root):
        print(f"[data] {name}: copied Debian's {DEBIAN_FASHION_MNIST} into {raw}")
        return info
    if allow_download and _download(info, root):
        return info
    remedies = [f"put the four IDX files ({', '.join(IDX_FILES)}, gzipped or not) into {raw}/"]
    if name == "fashion-mnist":
        remedies.append("or install Debian's package: apt-get install dataset-fashion-mnist")
    remedies.append("or run with internet access so that torchvision can download it")
    raise DataUnavailable(f"{name} is not available: " + "; ".join(remedies))


def _choose_automatically(root: Path, allow_download: bool) -> DatasetInfo:
    mnist = DATASETS["mnist"]
    if _has_idx_files(mnist.raw_dir(root)):
        print(f"[data] auto: took mnist (found in {mnist.raw_dir(root)})")
        return mnist
    if allow_download and _download(mnist, root):
        print("[data] auto: took mnist (downloaded)")
        return mnist
    info = ensure_dataset("fashion-mnist", root, allow_download)
    print("[data] auto: took fashion-mnist (mnist is neither in "
          f"{mnist.raw_dir(root)} nor downloadable here)")
    return info


def load_split(info: DatasetInfo, root: Path | str, train: bool) -> TensorData:
    ds = info.torchvision_class(str(root), train=train, download=False)
    return TensorData(ds.data.contiguous(), ds.targets.to(torch.int64).contiguous())


# The default validation split: 1/12 of the training set (5,000 of MNIST's 60,000).
DEFAULT_VALIDATION_FRACTION = 1 / 12
# At most a quarter held out: beyond that the training images it costs matter more than a
# steadier choice of best.pt.
MAX_VALIDATION_FRACTION = 0.25


def parse_validation_size(text: str) -> int | float:
    """--validation-size: a count of images ("5000") or a fraction of the training set ("0.1")."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--validation-size {text!r}: give a count of images (5000) or a fraction of "
                         f"the training set (0.1)") from None
    if value.is_integer() and "." not in text and "e" not in text.lower():
        return int(value)
    if not 0 < value < 1:
        raise ValueError(f"--validation-size {text}: a fraction must lie between 0 and 1 (0.1 holds "
                         f"out a tenth); a count is a whole number (5000)")
    return value


def validation_count(size: int | float, total: int) -> int:
    """How many of `total` training images --validation-size holds out; refuses a split that
    leaves no validation set or too little to train on, saying what to pass instead."""
    count = round(size * total) if isinstance(size, float) else int(size)
    suggestion = (f"the default ({DEFAULT_VALIDATION_FRACTION:.4f}, i.e. "
                  f"{round(DEFAULT_VALIDATION_FRACTION * total)} images) or 0.1 "
                  f"({round(0.1 * total)} images)")
    if count < 1:
        raise ValueError(f"--validation-size {size}: that holds out {count} of the {total} training images, "
                         f"an empty validation set that cannot choose best.pt; pass {suggestion}")
    limit = int(MAX_VALIDATION_FRACTION * total)
    if count > limit:
        raise ValueError(f"--validation-size {size}: that holds out {count} of the {total} training images "
                         f"and leaves {total - count} to train on; hold out at most a quarter "
                         f"({limit}): pass {suggestion}")
    return count


def hold_out(split: TensorData, size: int | float, seed: int) -> tuple[TensorData, TensorData]:
    """(the rest, the held-out images): a validation set drawn from the training set; `size` is a
    count or a fraction of it (validation_count).

    Which images are held out depends on the seed and the size alone (not on the device, the
    process count or --train-limit), so a resumed or distributed run holds out the same ones.
    Both parts keep the data set's own order.
    """
    size = validation_count(size, len(split))
    g = torch.Generator().manual_seed(seed * 100_003 + 99_991)  # apart from the epoch orders' seeds
    held = torch.zeros(len(split), dtype=torch.bool)
    held[torch.randperm(len(split), generator=g)[:size]] = True
    return (TensorData(split.images[~held], split.labels[~held]),
            TensorData(split.images[held], split.labels[held]))


def pixel_statistics(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of the [0, 1]-scaled pixels: the normalization the model is trained with."""
    x = images.to(torch.float64) / 255.0
    return float(x.mean()), float(x.std())


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), the same arithmetic as handlers/preprocessing."""
    return ((images.to(torch.float32) / 255.0 - mean) / std).unsqueeze(1)


def default_root() -> Path:
    return Path(os.environ.get("DATA_DIR", "data"))
