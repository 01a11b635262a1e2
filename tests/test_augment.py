"""Random translation of training images (--shift): each image moves by its own (dy, dx)."""
import torch

from train.loop import epoch_shifts, shift_images


def test_each_image_moves_by_its_own_shift_and_the_edge_fills_in():
    x = torch.rand(4, 1, 28, 28)
    shifts = torch.tensor([[0, 0], [2, 0], [0, -1], [-2, 2]])
    out = shift_images(x, shifts)
    assert out.shape == x.shape
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1, :, 2:], x[1, :, :-2])  # down by 2
    assert torch.equal(out[1, :, :2], x[1, :, :1].expand(-1, 2, -1))  # the top row repeated
    assert torch.equal(out[2, :, :, :-1], x[2, :, :, 1:])  # left by 1
    assert torch.equal(out[3, :, :-2, 2:], x[3, :, 2:, :-2])  # up by 2, right by 2


def test_shifts_are_a_function_of_seed_and_epoch():
    a, b = epoch_shifts(1000, 1, 3, 2), epoch_shifts(1000, 1, 3, 2)
    assert torch.equal(a, b) and not torch.equal(a, epoch_shifts(1000, 1, 4, 2))
    assert a.min() == -2 and a.max() == 2


# Robustness augmentation (train/augment.py) and the label-safe choice per data set (train/data.py)
import pytest  # noqa: E402

from tests.helpers import DATA_DIR, run_module  # noqa: E402
from train import augment  # noqa: E402
from train.checkpoint import load_checkpoint  # noqa: E402
from train.data import DATASETS  # noqa: E402
from train.main import parse_args, settings_from_dataset  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def digit_like(batch: int = 4) -> torch.Tensor:
    """Normalized images with a bar of ink: a stroke 2 pixels wide, 12 long, on black."""
    x = torch.zeros(batch, 1, 28, 28)
    x[:, :, 8:20, 13:15] = 1.0
    return (x - MEAN) / STD


def only(name: str, value: float) -> dict:
    return {key: (value if key == name else 0.0) for key in augment.RANGES}


def ink(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN).flatten(1).sum(1)


def test_strength_zero_leaves_the_images_as_they_are():
    x = digit_like()
    out = augment.augment(x, augment.epoch_draws(4, 1, 1), augment.parameters(0.0), MEAN, STD)
    assert torch.allclose(out, x, atol=1e-5)


def test_thicker_and_thinner_strokes_are_dilation_and_erosion():
    x, draws = digit_like(2), augment.epoch_draws(2, 1, 1)
    draws.per_image["stroke"] = torch.tensor([1.0, -1.0])
    out = augment.augment(x, draws, only("stroke", 1.0), MEAN, STD)
    assert ink(out)[0] == pytest.approx(4 * 14)  # dilated: 4 wide, 14 long
    assert ink(out)[1] == pytest.approx(0.0, abs=1e-4)  # 2 wide eroded by a 3x3 minimum: gone


def test_a_rotation_of_90_degrees_is_a_quarter_turn():
    x = torch.rand(1, 1, 28, 28)
    draws = augment.epoch_draws(1, 1, 1)
    draws.per_image["rotate"] = torch.ones(1)
    out = augment.augment((x - MEAN) / STD, draws, only("rotate", 90.0), MEAN, STD) * STD + MEAN
    assert min(float((out - torch.rot90(x, k, (2, 3))).abs().max()) for k in (1, -1)) < 1e-4


def test_blur_contrast_and_noise_stay_in_the_pixel_range_and_keep_the_ink_in_place():
    x, draws = digit_like(8), augment.epoch_draws(8, 1, 2)
    out = augment.augment(x, draws, augment.parameters(2.0), MEAN, STD) * STD + MEAN
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    centre = (out[:, 0] * torch.arange(28.0).view(-1, 1)).sum((1, 2)) / out[:, 0].sum((1, 2))
    assert (centre - 13.5).abs().max() < 3  # moved a little, not thrown out of the image


def test_draws_are_a_function_of_seed_and_epoch():
    a, b, c = augment.epoch_draws(100, 1, 3), augment.epoch_draws(100, 1, 3), augment.epoch_draws(100, 1, 4)
    assert all(torch.equal(a.per_image[k], b.per_image[k]) for k in a.per_image)
    assert torch.equal(a.noise_patterns, b.noise_patterns)
    assert not torch.equal(a.per_image["rotate"], c.per_image["rotate"])


@pytest.mark.parametrize("dataset, flip", [("mnist", False), ("fashion-mnist", True)])
def test_the_default_recipe_flips_only_what_the_labels_allow(dataset, flip):
    settings = vars(parse_args(["--dataset", dataset]))
    settings_from_dataset(settings, DATASETS[dataset])
    assert settings["flip"] is flip and settings["robust"] == DATASETS[dataset].robustness


def test_a_flip_of_digits_is_refused():
    settings = vars(parse_args(["--dataset", "mnist", "--flip"]))
    with pytest.raises(SystemExit, match="not invariant to a left-right flip"):
        settings_from_dataset(settings, DATASETS["mnist"])


@pytest.mark.slow  # starts `python -m train`/`export`: seconds of imports and work
def test_a_robust_run_resumes_bit_exactly_and_records_its_augmentation(tmp_path):
    common = ("train", "--dataset", "fashion-mnist", "--data-dir", str(DATA_DIR), "--train-limit", "1000",
              "--validation-size", "500", "--test-limit", "300", "--threads", "1", "--epochs", "2",
              "--robust", "1")
    run_module(*common, "--checkpoint-dir", str(tmp_path / "straight"))
    run_module(*common, "--checkpoint-dir", str(tmp_path / "resumed"), "--stop-after-epoch", "1")
    run_module(*common, "--checkpoint-dir", str(tmp_path / "resumed"), "--resume")
    straight, resumed = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "resumed"))
    assert resumed["epoch"] == 2
    for name, tensor in straight["model_state"].items():
        assert torch.equal(tensor, resumed["model_state"][name]), name
    assert straight["data"]["augmentation"] == {"flip": True, "shift": 1, "robustness": 1.0,
                                                "robustness_ranges": augment.parameters(1.0)}
