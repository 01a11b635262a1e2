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
