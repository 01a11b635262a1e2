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

    def raw_dir(self, root: Path) -> Path:
        # torchvision's layout: <root>/<ClassName>/raw
        return Path(root) / self.torchvision_class.__name__ / "raw"


DATASETS = {
    "mnist": DatasetInfo("mnist", datasets.MNIST, tuple(str(d) for d in range(10))),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        datasets.FashionMNIST,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
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


def hold_out(split: TensorData, size: int, seed: int) -> tuple[TensorData, TensorData]:
    """(the rest, `size` held-out images): a validation set drawn from the training set.

    Which images are held out depends on the seed alone (not on the device, the process count
    or --train-limit), so a resumed or distributed run holds out the same ones. Both parts keep
    the data set's own order.
    """
    if not 0 < size < len(split):
        raise ValueError(f"--validation-size {size}: choose between 1 and {len(split) - 1} "
                         f"(the training set has {len(split)} images)")
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
