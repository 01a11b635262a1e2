"""Robustness augmentation: training images made to look like what people send.

Stroke width (thinner and thicker pens), small rotations, shear and scale, elastic distortion
(a hand is not a font), blur, lower contrast and sensor noise. Each transform is applied to a
whole batch at once on the training device: grey-scale dilation is the maximum over each
pixel's 3x3 neighbourhood (max-pooling), erosion the minimum, the blur a weighted sum of the same
nine neighbours, the geometry one affine_grid + grid_sample with the elastic field added to the
affine grid. The neighbourhood is nine shifted views of the padded batch rather than
F.max_pool2d / F.conv2d: with one channel and stride 1 those take a slow path on the CPU.

What is random is drawn per image for a whole epoch from (seed, epoch) alone, like the epoch's
order: a resumed run, or a rank's share of a batch under torchrun, sees exactly the images an
uninterrupted single-process run would have seen.

`strength` scales every range below at once (0: off); each data set's strength is declared with
its other facts in train/data.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The ranges at strength 1. Geometry in affine_grid's coordinates (the image spans -1..1).
RANGES = {
    "rotate": 12.0,          # degrees, +- this
    "shear": 0.2,            # x += shear * y, +- this
    "scale": 0.12,           # zoom by 1 +- this
    "elastic": 0.08,         # displacement of a smooth random field, +- this (0.08: ~1 pixel)
    "stroke": 1.0,           # blend towards 3x3 dilation (thicker) or erosion (thinner), +- this
    "blur": 1.0,             # blend towards a 3x3 binomial blur, 0..this
    "contrast": 0.5,         # ink scaled by 1 - 0..this
    "noise": 0.08,           # Gaussian noise of std 0..this, in pixel / 255 units
}
ELASTIC_GRID = 4  # the random field is drawn on 4x4 points and interpolated: smooth, not jitter
NOISE_PATTERNS = 256  # noise images drawn per epoch; each training image takes one of them


# The 3x3 binomial blur ([1, 2, 1] / 4 along rows and columns), in neighbourhood()'s order.
BLUR = (torch.tensor([1.0, 2.0, 1.0])[:, None] * torch.tensor([1.0, 2.0, 1.0])[None, :]).flatten() / 16


def neighbourhood(x: torch.Tensor) -> torch.Tensor:
    """(9, B, C, H, W): each pixel's 3x3 neighbours (row by row), background (0) beyond the edge."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return torch.stack([padded[..., dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)])


def interpolation(points: int, size: int, device, dtype) -> torch.Tensor:
    """(size, points): linear interpolation from `points` evenly spaced values to `size` pixels;
    a smooth field from a few random numbers."""
    position = torch.linspace(0, points - 1, size, device=device, dtype=dtype)
    return (1 - (position[:, None] - torch.arange(points, device=device, dtype=dtype)).abs()).clamp(min=0)


def parameters(strength: float) -> dict:
    """The ranges at `strength`, as recorded in the checkpoint and bundle.json."""
    return {name: round(value * strength, 6) for name, value in RANGES.items()}


@dataclass
class EpochDraws:
    """One epoch's random numbers: per training image (indexed like the images) and a bank of
    noise patterns shared by all."""
    per_image: dict[str, torch.Tensor]
    noise_patterns: torch.Tensor

    def to(self, device) -> EpochDraws:
        return EpochDraws({k: v.to(device) for k, v in self.per_image.items()}, self.noise_patterns.to(device))

    def take(self, indices: torch.Tensor) -> EpochDraws:
        return EpochDraws({k: v[indices] for k, v in self.per_image.items()}, self.noise_patterns)


def epoch_draws(n: int, seed: int, epoch: int, height: int = 28, width: int = 28) -> EpochDraws:
    """The draws of epoch `epoch` for `n` training images: a function of (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 90_000)  # apart from order, flips, shifts

    def symmetric(*shape):  # uniform in -1..1
        return torch.rand(n, *shape, generator=g) * 2 - 1

    per_image = {"rotate": symmetric(), "shear": symmetric(), "scale": symmetric(),
                 "elastic": symmetric(2, ELASTIC_GRID, ELASTIC_GRID), "stroke": symmetric(),
                 "blur": torch.rand(n, generator=g), "contrast": torch.rand(n, generator=g),
                 "noise": torch.rand(n, generator=g),
                 "noise_pattern": torch.randint(0, NOISE_PATTERNS, (n,), generator=g)}
    return EpochDraws(per_image, torch.randn(NOISE_PATTERNS, 1, height, width, generator=g))


def augment(x: torch.Tensor, draws: EpochDraws, ranges: dict, mean: float, std: float) -> torch.Tensor:
    """A normalized batch (B, 1, H, W) with each image transformed by its draws."""
    d = draws.per_image
    x = x * std + mean  # back to 0..1 pixels: the background is 0, what moves in is background

    def each(name):  # per image, shaped to broadcast over (1, H, W)
        return (d[name] * ranges[name]).view(-1, 1, 1, 1)

    stroke = each("stroke")
    around = neighbourhood(x)
    thicker, thinner = around.amax(0), around.amin(0)
    x = x + stroke.clamp(min=0) * (thicker - x) + (-stroke).clamp(min=0) * (thinner - x)

    angle = each("rotate").flatten() * (math.pi / 180)
    shear, zoom = each("shear").flatten(), 1 + each("scale").flatten()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output -> input coordinates: rotation times shear, divided by the zoom
    theta = torch.stack([torch.stack([cos, cos * shear - sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, sin * shear + cos, torch.zeros_like(cos)], 1)], 1) / zoom.view(-1, 1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    rows, cols = (interpolation(ELASTIC_GRID, size, x.device, x.dtype) for size in x.shape[-2:])
    field = torch.einsum("hi,bcij,wj->bhwc", rows, d["elastic"] * ranges["elastic"], cols)
    x = F.grid_sample(x, grid + field, mode="bilinear", padding_mode="zeros", align_corners=False)

    blurred = torch.einsum("k,kbchw->bchw", BLUR.to(x.device, x.dtype), neighbourhood(x))
    x = x + each("blur") * (blurred - x)
    x = x * (1 - each("contrast"))
    x = x + each("noise") * draws.noise_patterns[d["noise_pattern"]]
    return (x.clamp(0, 1) - mean) / std
