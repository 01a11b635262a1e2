"""The validation split: a count or a fraction of the training set, sized to the data set, refused
where it would leave no validation set or too little to train on."""
import gzip
import struct

import pytest
import torch

from tests.helpers import DATA_DIR, run_module
from train.checkpoint import load_checkpoint
from train.data import (DATASETS, TensorData, hold_out, load_split, parse_validation_size,
                        validation_count)


def test_a_count_or_a_fraction():
    assert parse_validation_size("5000") == 5000 and isinstance(parse_validation_size("5000"), int)
    assert parse_validation_size("0.1") == 0.1 and isinstance(parse_validation_size("0.1"), float)
    for bad in ("1.5", "0.0", "-0.1", "ten", "5000.0"):
        with pytest.raises(ValueError, match="--validation-size"):
            parse_validation_size(bad)


def test_the_default_twelfth_fits_every_size():
    assert validation_count(1 / 12, 60_000) == 5000  # MNIST's and Fashion-MNIST's 60,000
    assert validation_count(1 / 12, 8000) == 667  # a small data set keeps 7,333 to train on
    assert validation_count(0.1, 8000) == 800 and validation_count(800, 8000) == 800


@pytest.mark.parametrize("size, words", [(5000, "leaves 3000 to train on"), (0.5, "leaves 4000"),
                                         (0, "empty validation set"), (0.00001, "empty validation set")])
def test_a_split_that_starves_training_or_validation_is_refused_saying_what_to_pass(size, words):
    with pytest.raises(ValueError) as error:
        validation_count(size, 8000)
    message = str(error.value)
    assert words in message and f"--validation-size {size}" in message
    assert "0.1 (800 images)" in message and "667 images" in message  # what to pass instead


def test_a_fraction_and_its_count_hold_out_the_same_images():
    split = TensorData(torch.arange(8000 * 4, dtype=torch.uint8).view(8000, 2, 2), torch.arange(8000) % 10)
    (rest_f, held_f), (rest_c, held_c) = hold_out(split, 0.1, seed=3), hold_out(split, 800, seed=3)
    assert torch.equal(held_f.labels, held_c.labels) and len(rest_f) == len(rest_c) == 7200


def write_idx(raw, prefix, images: torch.Tensor, labels: torch.Tensor):
    with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.numpy().tobytes())
    with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A data set of 1,200 training and 300 test images (real Fashion-MNIST, the first ones) as
    IDX files: sized as the data set is, not cut by --train-limit."""
    root = tmp_path_factory.mktemp("small")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    info = DATASETS["fashion-mnist"]
    for prefix, train, count in (("train", True, 1200), ("t10k", False, 300)):
        split = load_split(info, DATA_DIR, train=train)
        write_idx(raw, prefix, split.images[:count], split.labels[:count])
    return root


def train_small(data_dir, checkpoint_dir, *extra, check=True):
    return run_module("train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--recipe", "seed",
                      "--epochs", "1", "--threads", "1", "--checkpoint-dir", str(checkpoint_dir), *extra,
                      check=check)


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports and work
def test_a_small_data_set_keeps_eleven_twelfths_to_train_on_and_records_the_split(small_dataset, tmp_path):
    result = train_small(small_dataset, tmp_path)
    assert "1100 training / 100 validation" in result.stdout and "a fraction 0.08333" in result.stdout
    splits = load_checkpoint(tmp_path / "best.pt")["data"]["splits"]
    assert {k: splits[k] for k in ("train", "validation", "test", "validation_size")} == \
        {"train": 1100, "validation": 100, "test": 300, "validation_size": 1 / 12}


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports and work
def test_a_fixed_size_meant_for_60000_is_refused_on_a_small_set(small_dataset, tmp_path):
    result = train_small(small_dataset, tmp_path, "--validation-size", "5000", check=False)
    assert result.returncode != 0 and not (tmp_path / "last.pt").exists()
    assert "--validation-size 5000" in result.stderr and "0.1 (120 images)" in result.stderr


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports and work
def test_the_command_line_says_what_a_bad_size_is(tmp_path):
    result = run_module("train", "--validation-size", "1.5", "--checkpoint-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and "fraction must lie between 0 and 1" in result.stderr


def test_among_equal_validation_accuracies_the_lower_loss_is_best():
    """A small validation set is often all right for many epochs: the first of them is the least
    trained, so the loss breaks the tie."""
    from train.loop import best_epoch
    history = [{"epoch": 1, "validation_accuracy": 1.0, "validation_loss": 0.01},
               {"epoch": 2, "validation_accuracy": 1.0, "validation_loss": 0.002},
               {"epoch": 3, "validation_accuracy": 0.99, "validation_loss": 0.001},
               {"epoch": 4, "validation_accuracy": 1.0, "validation_loss": 0.002}]
    assert best_epoch(history)["epoch"] == 2
