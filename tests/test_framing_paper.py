"""Framing handwriting on a page (contract/framing.py, steps 3a-5a of the MNIST recipe): ruled,
squared and dotted paper, shadows, tinted paper, coloured ink, fine pens and markers, each framed
close to the clean digit's framing; the data set's own form still passes through unchanged.

The digits are bench/standin_digits.py's font glyphs (MNIST cannot be had here), framed as MNIST
was made, sent as bench/forms.py's forms.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench.forms import make_form
from bench.standin_digits import make as make_digits
from contract import framing
from contract.framing import frame, recipe_for
from contract.preprocessing import InputSpec, decode_image, preprocess_framed

MNIST = recipe_for("mnist")
# The recipe bundles recorded before the page cleaning existed: none of steps 3a-5a.
CLEANING_KEYS = ("opening", "line_threshold", "line_coverage", "line_window", "cells", "cell_threshold",
                 "component_mass", "component_gap", "stroke_width", "stroke_tolerance")
OLD_MNIST = {k: v for k, v in MNIST.items() if k not in CLEANING_KEYS}
SPEC = InputSpec(1, 28, 28, (0.0,), (1.0,), MNIST)
OLD_SPEC = InputSpec(1, 28, 28, (0.0,), (1.0,), OLD_MNIST)
PLAIN = InputSpec(1, 28, 28, (0.0,), (1.0,))
COUNT = 16


@pytest.fixture(scope="module")
def digits():
    images, labels = make_digits(COUNT, seed=7)
    return images


def framed(data: bytes, spec=SPEC):
    x, what = preprocess_framed(data, spec)
    return x[0, 0].astype(np.float64) * 255.0, what


def correlation(a, b) -> float:
    """Pearson correlation, the best over shifts of up to one pixel (centring rounds)."""
    return max(float(np.corrcoef(np.roll(a, (dy, dx), (0, 1)).ravel(), b.ravel())[0, 1])
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def clean(digit: np.ndarray) -> np.ndarray:
    """The digit's own framing (framing on, the data set's form)."""
    return frame(digit.astype(np.float64), None, MNIST, "on")[0].astype(np.float64)


def scores(digits, form, spec=SPEC):
    results = [framed(make_form(d, form, 0, i), spec) for i, d in enumerate(digits)]
    return [correlation(x, clean(d)) for (x, _), d in zip(results, digits)], [what for _, what in results]


# ---- the data set's form is left alone -----------------------------------------------------------

def test_digits_in_the_data_sets_form_pass_through_bit_identical(digits):
    for digit in digits:
        png = make_form(digit, "dataset", 0, 0)
        x, what = preprocess_framed(png, SPEC)
        assert what["reason"] == "already in the data set's form"
        np.testing.assert_array_equal(x, decode_image(png, PLAIN))


def test_framing_on_keeps_a_clean_digit_close_to_itself(digits):
    for digit in digits:
        out, what = frame(digit.astype(np.float64), None, MNIST, "on")
        assert what["components"][0] >= 1 and what["lines_removed"] == 0, what
        assert correlation(out.astype(np.float64), digit.astype(np.float64)) > 0.93


# ---- the new forms -----------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["ruled", "squared", "dotted", "shadow", "tinted", "colour", "darkmode",
                                  "webp", "noisy", "paper", "canvas", "phone"])
def test_each_form_is_framed_like_the_clean_digit(digits, form):
    found, reports = scores(digits, form)
    assert all(what["applied"] for what in reports), form
    assert np.median(found) > 0.93 and np.percentile(found, 25) > 0.85, (form, np.round(found, 2))


@pytest.mark.parametrize("form", ["ruled", "squared"])
def test_printed_lines_are_found_removed_and_not_in_the_box(digits, form):
    found, reports = scores(digits, form)
    before, _ = scores(digits, form, OLD_SPEC)
    assert all(what["lines_removed"] >= 5 for what in reports), [what["lines_removed"] for what in reports]
    # the box is the digit's (the digit is 30-70 % of the page's short side), not the page's
    assert all(max(what["box"][2:]) <= 0.75 * 480 for what in reports)
    assert np.median(before) < 0.8 < np.median(found), (np.median(before), np.median(found))


def test_paper_dots_and_specks_are_left_out_of_the_box(digits):
    found, reports = scores(digits, "dotted")
    before, old_reports = scores(digits, "dotted", OLD_SPEC)
    # the box is the digit's (30-70 % of the page's short side), not the dot lattice's
    assert all(max(what["box"][2:]) <= 0.75 * 480 for what in reports), [what["box"] for what in reports]
    assert np.median(before) < 0.8 < np.median(found)


@pytest.mark.parametrize("form, direction", [("fine", "thin"), ("marker", "thick")])
def test_stroke_width_is_brought_to_the_data_sets(digits, form, direction):
    target, tolerance = MNIST["stroke_width"], MNIST["stroke_tolerance"]
    found, reports = scores(digits, form)
    widths = np.array([what["stroke_width"] for what in reports])
    if direction == "thin":
        assert np.median(widths) < target / tolerance  # the pen was thin, and was widened
    else:
        assert np.median(widths) > target * tolerance
    assert np.median(found) > 0.88, np.round(found, 2)
    # after widening or thinning, the ink in the 20-pixel box weighs about what the clean digit's does
    mass = [framed(make_form(d, form, 0, i))[0].sum() / clean(d).sum() for i, d in enumerate(digits)]
    assert 0.6 < np.median(mass) < 1.5, np.round(mass, 2)


def test_a_stroke_in_the_box_is_measured_by_area_over_half_the_perimeter():
    bar = np.zeros((40, 120))
    bar[10:16, 10:110] = 255.0  # 100 x 6
    assert framing.stroke_width(bar) == pytest.approx(2 * 600 / (2 * 106))
    assert framing.stroke_width(np.zeros((5, 5))) == 0.0


def test_running_minimum_and_maximum_are_the_windows_exactly():
    x = np.random.default_rng(3).normal(size=(4, 53))
    for radius in (0, 1, 2, 5, 26, 60):
        for op, reduce in ((np.minimum, np.min), (np.maximum, np.max)):
            expected = [[reduce(x[i, max(0, j - radius):j + radius + 1]) for j in range(53)] for i in range(4)]
            np.testing.assert_array_equal(framing.running(x, radius, op), expected)


def test_a_fashion_recipe_does_not_clean_the_page():
    assert "opening" not in recipe_for("fashion-mnist")  # a solid object is no stroke: no opening
    assert OLD_MNIST == {k: v for k, v in MNIST.items() if k in OLD_MNIST}


# ---- fuzz: framing never fails on any array, and stays in range --------------------------------

@settings(derandomize=True, database=None, deadline=None, max_examples=150,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(image=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=48),
                        elements=st.floats(0, 255)),
       with_alpha=st.booleans(), mode=st.sampled_from(["auto", "on"]), data=st.data())
def test_framing_any_image_gives_a_28x28_in_range_or_nothing(image, with_alpha, mode, data):
    alpha = None
    if with_alpha:
        alpha = data.draw(hnp.arrays(np.float64, image.shape, elements=st.floats(0, 1)))
    out, what = frame(image, alpha, MNIST, mode)
    if out is None:
        assert not what["applied"] and what.get("reason")
    else:
        assert out.shape == (28, 28) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
