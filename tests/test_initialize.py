"""Initialisation: phase correlation, Fourier–Mellin, moments and initialize() on real images.

Every pair is cut out of a bundled photograph or texture, so that both images
hold real content everywhere: the fixed image is a crop ``fixed(x) = I(A_f x)``
(an integer shift, no interpolation) and the moving image is sampled as
``moving(y) = I(A_f A_true^-1 y)``, hence ``moving(A_true x) = fixed(x)``
exactly; ``cut_pair`` asserts that the moving image's footprint lies inside
the photograph.  Estimates are judged by the mean distance between
``A_est x`` and ``A_true x`` over a 10 x 10 grid spanning the fixed image.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tireg
import tireg.initialize as init_module
from tireg.data import load
from tireg.initialize import (
    AUTO_THRESHOLD,
    METHODS,
    center_of_mass,
    fourier_mellin,
    initialize,
    moments,
    overlap_ncc,
    phase_correlation,
)
from tireg.transforms import TRANSFORMS, similarity_matrix, translation_matrix

IMAGES = ["astronaut", "camera", "coins", "gravel"]
SIZE = (96, 128)  # (H, W) of the similarity pairs: non-square on purpose
DEGREE = math.pi / 180.0


def cut_pair(name, truth, size, *, moving_size=None, dtype=torch.float32, channels=False):
    """``fixed`` ``(B, C, h, w)`` cut from the centre of a bundled image, ``moving`` with ``moving(A x) = fixed(x)``.

    ``truth``: ``(B, 3, 3)`` fixed -> moving pixel matrices.
    """
    image = load(name, dtype=torch.float64)
    image = image[None] if image.dim() == 2 else image
    if not channels:
        image = image.mean(dim=0, keepdim=True)
    height, width = image.shape[-2:]
    batch = truth.shape[0]
    big = image[None].expand(batch, *image.shape)
    h, w = size
    offset = torch.tensor([[round((width - w) / 2), round((height - h) / 2)]], dtype=torch.float64)
    crop = translation_matrix(offset).expand(batch, 3, 3)
    to_image = crop @ torch.linalg.inv(truth.double())
    fixed = tireg.warp(big, crop, size=size)
    hm, wm = moving_size or size
    corners = torch.tensor([[0, 0, 1], [wm - 1, 0, 1], [0, hm - 1, 1], [wm - 1, hm - 1, 1]], dtype=torch.float64).T
    footprint = to_image @ corners
    assert footprint[:, 0].min() >= 0 and footprint[:, 0].max() <= width - 1, "moving image leaves the photograph"
    assert footprint[:, 1].min() >= 0 and footprint[:, 1].max() <= height - 1, "moving image leaves the photograph"
    moving = tireg.warp(big, to_image, size=(hm, wm))
    return fixed.to(dtype), moving.to(dtype)


def similarity(angle_deg, scale, tx, ty, size=SIZE, dtype=torch.float64):
    """``(1, 3, 3)`` similarity about the centre of an image of ``size``."""
    params = torch.tensor([[angle_deg * DEGREE, scale, tx, ty]], dtype=dtype)
    return similarity_matrix(params, tireg.image_center(*size))


def grid_error(estimate, truth, size):
    """Mean distance ``|A_est x - A_true x|`` over a 10 x 10 grid of the fixed image, ``(B,)``."""
    h, w = size
    ys, xs = torch.meshgrid(torch.linspace(0, h - 1, 10), torch.linspace(0, w - 1, 10), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten(), torch.ones(100)]).double()
    difference = (estimate.double().cpu() @ points - truth.double().cpu() @ points)[:, :2]
    return difference.norm(dim=1).mean(dim=1)


def decompose(matrix, size):
    """Angle (degrees), isotropic scale and the shift ``A c - c`` of the centre, for ``(B, 3, 3)``."""
    matrix = matrix.double().cpu()
    linear = matrix[:, :2, :2]
    angle = torch.atan2(linear[:, 0, 1], linear[:, 0, 0]) / DEGREE
    scale = torch.sqrt(torch.det(linear))
    centre = torch.tensor([*tireg.image_center(*size), 1.0], dtype=torch.float64)
    shift = (matrix @ centre)[:, :2] - centre[:2]
    return angle, scale, shift


def angle_difference(a, b):
    return (a - b + 180.0) % 360.0 - 180.0


# ----------------------------------------------------------------------------
# phase correlation


@pytest.mark.parametrize("name", IMAGES)
def test_phase_correlation_recovers_20_percent_shifts_batched(name):
    size = (128, 160)
    # 20 % of the size, both signs, both axes, sub-pixel parts
    shifts = torch.tensor([[32.3, 0.0], [0.0, -25.6], [-31.7, 25.2]], dtype=torch.float64)
    fixed, moving = cut_pair(name, translation_matrix(shifts), size)
    found = phase_correlation(fixed, moving)
    assert found.shape == (3, 2) and found.dtype == torch.float32
    error = (found.double() - shifts).norm(dim=1)
    assert error.max() < 0.3, (found, error)


def test_phase_correlation_sub_pixel_on_area_sampled_images():
    """Shifts of thirds of a pixel, made exactly by area-averaging 3 x 3 blocks of integer-shifted crops."""
    image = load("coins")[None, None]
    factor, (h, w) = 3, (60, 80)
    top, left = (image.shape[-2] - factor * h) // 2, (image.shape[-1] - factor * w) // 2
    shifts = [(1, 0), (2, 0), (-1, 1), (-2, -2), (31, -22), (-29, 20)]
    fixed = F.avg_pool2d(image[..., top : top + factor * h, left : left + factor * w], factor)
    movings = [
        F.avg_pool2d(image[..., top - dy : top - dy + factor * h, left - dx : left - dx + factor * w], factor)
        for dx, dy in shifts
    ]
    found = phase_correlation(fixed, torch.cat(movings))
    truth = torch.tensor(shifts, dtype=torch.float32) / factor
    assert (found - truth).abs().max() < 0.2, (found, truth)


def _fourier_shifted(scene: torch.Tensor, shift) -> torch.Tensor:
    """``scene(x - shift)``, circularly, exactly for its trigonometric interpolant (a phase ramp on its DFT)."""
    frequency_y = torch.fft.fftfreq(scene.shape[-2], dtype=torch.float64)[:, None]
    frequency_x = torch.fft.fftfreq(scene.shape[-1], dtype=torch.float64)
    ramp = torch.polar(torch.ones((), dtype=torch.float64),
                       -2 * math.pi * (frequency_x * shift[0] + frequency_y * shift[1]))
    return torch.fft.ifft2(torch.fft.fft2(scene) * ramp).real


# true shifts half-way between points of the 1/10-pixel grid on at least one axis: the grid's best
# point alone is 0.05 px off there, the parabolic fit through it and its neighbours is not
BETWEEN_GRID_POINTS = [(3.35, -7.46), (-5.05, 2.15), (0.25, 11.75)]


@pytest.mark.parametrize("name", ["camera", "gravel"])
def test_phase_correlation_refines_between_the_upsampled_grid_points(name):
    """An exact circular shift of a whole image: with no window the normalised cross-power spectrum is
    exactly the shift's phase ramp, and the correlation surface (tapered) peaks exactly at the shift.
    Measured: 5e-5 px (no window), 0.017 px (a crop, windowed, the window not shifted with the content)."""
    scene = load(name, dtype=torch.float64)
    scene = scene.mean(dim=0) if scene.dim() == 3 else scene
    truth = torch.tensor(BETWEEN_GRID_POINTS, dtype=torch.float64)
    moving = torch.stack([_fourier_shifted(scene, shift) for shift in BETWEEN_GRID_POINTS])[:, None]
    fixed = scene[None, None].expand_as(moving)
    found = phase_correlation(fixed, moving, window=False)
    assert (found - truth).abs().max() < 1e-3, (found, truth)
    # cut from the middle (no wrap-around in the data), Hann-windowed as by default
    inside = (slice(None), slice(None), slice(40, -40), slice(40, -40))
    found = phase_correlation(fixed[inside], moving[inside])
    assert (found - truth).abs().max() < 0.025, (found, truth)


@pytest.mark.parametrize("height, width", [(48, 64), (45, 63), (50, 33)])
def test_band_limited_interpolant_from_the_half_spectrum_equals_the_full_one(height, width):
    """The Hermitian half (rfft2) gives the interpolant that the full spectrum gives, at any point,
    for even widths (a Nyquist column) and odd ones; the spectrum tapered as _cross_power's."""
    generator = torch.Generator().manual_seed(5)
    surface = torch.randn(2, height, width, generator=generator, dtype=torch.float64)
    freq_y = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    freq_x = torch.fft.fftfreq(width, dtype=torch.float64)
    taper = torch.cos(math.pi * freq_y) ** 2 * torch.cos(math.pi * freq_x) ** 2
    full = torch.fft.fft2(surface) * taper
    half = full[..., : width // 2 + 1]
    rows = torch.rand(2, 5, generator=generator, dtype=torch.float64) * height
    columns = torch.rand(2, 5, generator=generator, dtype=torch.float64) * width
    got = init_module._band_limited(half, width, rows, columns)
    one = torch.ones((), dtype=torch.float64)
    phase_y = torch.polar(one, 2 * math.pi * rows[:, :, None] * freq_y[:, 0])  # (N, K, H)
    phase_x = torch.polar(one, 2 * math.pi * freq_x[:, None] * columns[:, None, :])  # (N, W, K)
    expected = (phase_y @ full @ phase_x).real
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    on_grid = init_module._band_limited(half, width, torch.arange(height)[None].double().expand(2, -1),
                                        torch.arange(width)[None].double().expand(2, -1))
    torch.testing.assert_close(on_grid / (height * width), torch.fft.irfft2(half, s=(height, width)))


@pytest.mark.parametrize("window", [True, False])
def test_phase_correlation_wraps_shifts_beyond_half_the_size(window):
    fixed = load("gravel")[None, None, :64, :80]
    # a circular shift by 73 columns is one by -7; 3 rows down is +3
    moving = torch.roll(fixed, shifts=(3, 73), dims=(-2, -1))
    found = phase_correlation(fixed, moving, window=window)
    assert torch.allclose(found, torch.tensor([[-7.0, 3.0]]), atol=0.05), found


def test_phase_correlation_sign_matches_warp():
    """The returned (tx, ty) is the A of tireg.warp: warp(moving, translation(t)) matches fixed."""
    fixed, moving = cut_pair("camera", translation_matrix(torch.tensor([[9.0, -6.0]], dtype=torch.float64)), (96, 128))
    shift = phase_correlation(fixed, moving)
    warped = tireg.warp(moving, translation_matrix(shift))
    inner = (slice(None), slice(None), slice(10, -10), slice(12, -12))
    assert (warped - fixed)[inner].abs().max() < 0.02
    assert (tireg.warp(moving, translation_matrix(-shift)) - fixed)[inner].abs().max() > 0.2


# ----------------------------------------------------------------------------
# Fourier–Mellin and initialize() on rotations and scales

CASES = [(30.0, 1.2, 5.0, -4.0), (-45.0, 1.2, -6.0, 3.0)]


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("case", CASES, ids=["30deg", "-45deg"])
def test_fourier_mellin_recovers_angle_and_scale(name, case):
    truth = similarity(*case)
    fixed, moving = cut_pair(name, truth, SIZE)
    angle, scale = fourier_mellin(fixed, moving)
    assert angle.shape == (1,) and scale.shape == (1,)
    assert abs(angle.item() / DEGREE - case[0]) < 2.0
    assert abs(scale.item() / case[1] - 1.0) < 0.03


def test_fourier_mellin_returns_angles_modulo_180_degrees():
    truth = similarity(130.0, 1.0, 2.0, 2.0)
    fixed, moving = cut_pair("coins", truth, SIZE)
    angle, scale = fourier_mellin(fixed, moving)
    assert -90.0 <= angle.item() / DEGREE < 90.0
    assert abs(angle.item() / DEGREE - (130.0 - 180.0)) < 2.0
    assert abs(scale.item() - 1.0) < 0.03


@pytest.mark.parametrize("method", ["auto", "fourier-mellin"])
@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("case", CASES, ids=["30deg", "-45deg"])
def test_initialize_recovers_rotation_scale_and_shift(method, name, case):
    truth = similarity(*case)
    fixed, moving = cut_pair(name, truth, SIZE)
    found = initialize(fixed, moving, "similarity", method=method)
    angle, scale, shift = decompose(found, SIZE)
    assert abs(angle_difference(angle.item(), case[0])) < 2.0
    assert abs(scale.item() / case[1] - 1.0) < 0.03
    assert (shift - torch.tensor(case[2:], dtype=torch.float64)).norm() < 3.0
    assert grid_error(found, truth, SIZE).item() < 1.5


def test_initialize_resolves_the_180_degree_ambiguity():
    truth = similarity(160.0, 1.0, 4.0, -3.0)
    fixed, moving = cut_pair("astronaut", truth, SIZE)
    for method in ("auto", "fourier-mellin"):
        found = initialize(fixed, moving, "rigid", method=method)
        assert grid_error(found, truth, SIZE).item() < 1.5, method


def test_initialize_downsamples_and_converts_back():
    """A 160 x 200 pair worked on at 80 x 100 (factor 2), and at 40 x 50 (factor 4)."""
    size = (160, 200)
    truth = similarity(-30.0, 1.15, 12.0, -9.0, size=size)
    fixed, moving = cut_pair("coins", truth, size)
    assert grid_error(initialize(fixed, moving, "similarity"), truth, size).item() < 1.5
    assert grid_error(initialize(fixed, moving, "similarity", max_size=50), truth, size).item() < 3.0


def test_downsampling_coordinate_map():
    """x_full = s x_small + (s - 1) / 2: area-averaging a coordinate ramp gives exactly that."""
    from tireg.sampling import downsample, shrink_matrix

    for factor in (2, 3, 4):
        ys, xs = torch.meshgrid(torch.arange(37.0), torch.arange(50.0), indexing="ij")
        pooled = downsample(torch.stack([xs, ys])[None], factor)[0]
        small = torch.stack(
            torch.meshgrid(torch.arange(float(pooled.shape[1])), torch.arange(float(pooled.shape[2])), indexing="ij")[
                ::-1
            ]
        )
        scale = shrink_matrix(factor)
        mapped = torch.einsum("ij,jhw->ihw", scale[:2, :2], small) + scale[:2, 2, None, None]
        assert torch.allclose(mapped, pooled)


def test_initialize_with_different_image_sizes():
    truth = similarity(25.0, 1.1, 6.0, 8.0)
    fixed, moving = cut_pair("coins", truth, SIZE, moving_size=(120, 150))
    found = initialize(fixed, moving, "similarity")
    assert grid_error(found, truth, SIZE).item() < 1.5
    centred = initialize(fixed, moving, "similarity", method="center")
    assert torch.allclose(centred[0, :2, 2], torch.tensor([11.0, 12.0]))  # ((150-128)/2, (120-96)/2)
    shift_only = similarity(0.0, 1.0, 17.0, -6.0)
    fixed, moving = cut_pair("camera", shift_only, SIZE, moving_size=(110, 140))
    assert grid_error(initialize(fixed, moving, "translation", method="phase"), shift_only, SIZE).item() < 0.5


def test_template_offsets_are_the_best_normalised_cross_correlation_wholly_inside():
    """The placement and score equal a direct evaluation of OpenCV's TM_CCOEFF_NORMED at every
    placement, for a template of another shape than its image, a batch of two."""
    generator = torch.Generator().manual_seed(4)
    large = torch.rand(2, 1, 30, 33, generator=generator, dtype=torch.float64)
    small = large[:, :, 7:19, 16:30].clone()  # 12 x 14, at (x, y) = (16, 7)
    small[1] += 0.3 * torch.rand(12, 14, generator=generator, dtype=torch.float64)  # not exact in pair 1
    offsets, scores = init_module._template_offsets(small, large)
    for pair in range(2):
        template = small[pair, 0] - small[pair, 0].mean()
        best, where = -2.0, None
        for y in range(30 - 12 + 1):
            for x in range(33 - 14 + 1):
                window = large[pair, 0, y:y + 12, x:x + 14]
                window = window - window.mean()
                ncc = float((template * window).sum() / (template.square().sum() * window.square().sum()).sqrt())
                if ncc > best:
                    best, where = ncc, (x, y)
        assert tuple(offsets[pair].tolist()) == where == (16, 7)
        assert abs(float(scores[pair]) - best) < 1e-9
    assert abs(float(scores[0]) - 1.0) < 1e-9


@pytest.mark.parametrize("angle, scale", [(0.0, 1.0), (4.0, 1.04)])
@pytest.mark.parametrize("inside", ["fixed in moving", "moving in fixed"])
def test_an_image_inside_a_larger_one_is_found_where_it_lies(angle, scale, inside):
    """A fixed image cut off the middle of a larger moving one (a template, a tile of an overview),
    or the other way round: the candidates saw the moving image only where it overlaps the fixed one
    with their centres aligned, and started 24-66 px off; template matching finds the place."""
    small, large = (72, 80), (150, 190)  # the small one 36 x 40 working pixels (TEMPLATE_MIN_SIDE)
    if inside == "fixed in moving":  # the fixed image's centre 45 px left of, 35 px above the moving one's
        truth = similarity(angle, scale, 94.5 - 45.0 - 39.5, 74.5 - 35.0 - 35.5, size=small)
        fixed, moving = cut_pair("coins", truth, small, moving_size=large)
        error = lambda matrix: grid_error(matrix, truth, small).item()  # noqa: E731
    else:  # the moving image's centre 40 px right of, 30 px below the fixed one's
        truth = similarity(angle, scale, 39.5 + 40.0 - 94.5, 35.5 + 30.0 - 74.5, size=large)
        fixed, moving = cut_pair("coins", truth, large, moving_size=small)
        # over the moving image, the overlap: the inverse matrices on its grid
        error = lambda matrix: grid_error(torch.linalg.inv(matrix.double()), torch.linalg.inv(truth), small).item()  # noqa: E731
    assert error(initialize(fixed, moving, "similarity")) < 4.0  # a translation: the turn and zoom left
    assert error(tireg.register(fixed, moving, transform="similarity").matrix) < 0.1


@pytest.mark.parametrize("inside, small, large, angle, scale", [
    ("fixed in moving", (40, 48), (240, 300), 0.0, 1.0),  # the small one 20 x 24 working pixels: matched at full resolution
    ("moving in fixed", (72, 80), (300, 380), 0.0, 1.0),  # 24 x 26: matched at half resolution
    ("fixed in moving", (72, 80), (220, 280), 2.0, 1.15),  # 24 x 26, zoomed: matched at the search's zooms too
])
def test_an_image_much_smaller_than_the_other_is_found_at_a_finer_resolution(inside, small, large, angle, scale):
    """Under TEMPLATE_MIN_SIDE working pixels a side (the working images keep about 128 on the larger
    image's side), the smaller image had no template candidate: a 48^2 crop of a 256^2 image or a
    128^2 tile of a 1024^2 overview started 86-720 px off, every one.  It is matched now where it keeps
    that many pixels, as OpenCV's matchTemplate would at full resolution."""
    centre_large = ((large[1] - 1) / 2, (large[0] - 1) / 2)
    centre_small = ((small[1] - 1) / 2, (small[0] - 1) / 2)
    if inside == "fixed in moving":  # the fixed image's centre 30 px left of, 20 px above the moving one's
        truth = similarity(angle, scale, centre_large[0] - 30.0 - centre_small[0],
                           centre_large[1] - 20.0 - centre_small[1], size=small)
        fixed, moving = cut_pair("coins", truth, small, moving_size=large)
        error = lambda matrix: grid_error(matrix, truth, small).item()  # noqa: E731
    else:  # the moving image's centre 80 px right of, 60 px below the fixed one's
        truth = similarity(angle, scale, centre_small[0] + 80.0 - centre_large[0],
                           centre_small[1] + 60.0 - centre_large[1], size=large)
        fixed, moving = cut_pair("coins", truth, large, moving_size=small)
        error = lambda matrix: grid_error(torch.linalg.inv(matrix.double()), torch.linalg.inv(truth), small).item()  # noqa: E731
    kind = "translation" if scale == 1.0 else "similarity"
    assert error(initialize(fixed, moving, kind)) < 4.0
    assert error(tireg.register(fixed, moving, transform=kind).matrix) < 0.1


@pytest.mark.parametrize("side, kind", [(48, "translation"), (63, "translation"), (56, "similarity")])
def test_a_template_within_16_times_its_side_is_matched_at_a_fractional_step(monkeypatch, side, kind):
    """A template under 64 px (80 for a kind with a scale) is matched at step 1, where a larger image of
    more than TEMPLATE_MAX_PIXELS was refused: a 48-63 px crop of a 606 x 768 image (12-16 times its
    side) had no template candidate, and register ended 100-400 px off, "converged".  Both images are
    now downsampled by the fractional step that brings the larger one to the cap, where the template
    keeps TEMPLATE_MIN_SIDE pixels: up to (16 x its side)^2 pixels for the larger image."""
    scene = torch.nn.functional.interpolate(load("coins", dtype=torch.float32)[None, None], scale_factor=2.0,
                                            mode="bilinear", antialias=True)[0, 0]  # 606 x 768
    top, left = 380, 520
    fixed = scene[top:top + side, left:left + side]
    truth = translation_matrix(torch.tensor([[float(left), float(top)]], dtype=torch.float64))
    start = initialize(fixed, scene, kind).reshape(1, 3, 3)
    assert grid_error(start, truth, (side, side)).item() < 2.0
    found = tireg.register(fixed, scene, transform=kind).matrix.reshape(1, 3, 3)
    assert grid_error(found, truth, (side, side)).item() < 0.1
    # and one over 16 times (sqrt(606 x 768) = 682 against 16 x 42): no candidate, as documented
    # and a 48 px one within it ((16 x 48)^2 pixels > 606 x 768)
    candidates = []
    template_candidate = init_module._template_candidate

    def recorded(*args, **kwargs):
        candidates.append(template_candidate(*args, **kwargs))
        return candidates[-1]

    monkeypatch.setattr(init_module, "_template_candidate", recorded)
    for template_side in (42, 48):
        initialize(scene[top:top + template_side, left:left + template_side], scene, kind)
    assert candidates[0] is None and candidates[1] is not None


def test_a_zoomed_template_takes_the_zoom_that_matches_best():
    """The zooms were compared each with the best so far plus the margin: once 1.118 had cleared it,
    1.25 had to beat 1.118 by the margin too, and a template zoomed 1.21 kept 1.118 (scores 0.88
    and 0.95).  The best zoom is compared with the template's own size alone."""
    truth = similarity(0.0, 1.21, 20.0, 10.0, size=(96, 100))
    fixed, moving = cut_pair("coins", truth, (96, 100), moving_size=(200, 240))
    candidate = init_module._template_candidate(fixed, moving, "similarity", 1, finer=None)
    assert candidate is not None
    linear = candidate[0, 0, 0, :2, :2]
    assert torch.allclose(linear, torch.eye(2, dtype=linear.dtype) * 1.25, atol=0.01), linear
    # and a kind without a scale places it at its own size
    shift_only = init_module._template_candidate(fixed, moving, "translation", 1, finer=None)
    assert torch.equal(shift_only[0, 0, 0, :2, :2], torch.eye(2, dtype=linear.dtype))


@pytest.mark.parametrize("kind", ["translation", "similarity"])
def test_a_side_one_pixel_longer_than_the_others_at_a_finer_level_is_no_template(kind):
    """101 x 40 and 100 x 400 are 50 x 20 and 50 x 200 at the working level: the first looked inside
    the second, and at full resolution, where it is not, no placement was left (an IndexError)."""
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 101, 40, generator=generator)
    moving = torch.rand(1, 1, 100, 400, generator=generator)
    assert torch.isfinite(initialize(fixed, moving, kind)).all()


def test_initialize_search_recovers_rotation_and_scale():
    cases = [("gravel", similarity(75.0, 0.9, 10.0, -8.0)), ("coins", similarity(-45.0, 1.2, -6.0, 3.0))]
    for name, truth in cases:
        fixed, moving = cut_pair(name, truth, SIZE)
        assert grid_error(initialize(fixed, moving, "similarity", method="search"), truth, SIZE).item() < 2.0, name


@pytest.mark.parametrize("size, halved", [(SIZE, (48, 64)), ((64, 64), None)])
def test_the_search_ranks_its_first_stages_on_halved_images(monkeypatch, size, halved):
    """The first two stages (240 of 258 candidates) only rank the angles and scales to refine: they run
    on the working images halved where their smaller side keeps SEARCH_HALVED_MIN_SIDE pixels (a quarter
    of their time), the last refines the 2 best on the working images, and the answer is still the
    truth, on textures and near-periodic content."""
    sizes = []
    score = init_module._score_candidates

    def recording(fixed_spectra, canvas, *args, readings=True):  # (working size, candidates, readings)
        sizes.append((tuple(canvas.shape[-2:]), args[-3].shape[1], readings))
        return score(fixed_spectra, canvas, *args, readings=readings)

    monkeypatch.setattr(init_module, "_score_candidates", recording)
    cases = [("gravel", similarity(75.0, 0.9, 10.0, -8.0, size)), ("coins", similarity(-135.0, 1.15, -6.0, 3.0, size)),
             ("brick", similarity(160.0, 0.85, 4.0, 5.0, size))]
    for name, truth in cases:
        sizes.clear()
        fixed, moving = cut_pair(name, truth, size)
        found = initialize(fixed, moving, "similarity", method="search")
        # stage 1 ranks 5 scales; the ranking stages each candidate's wrapped shift alone, the others every reading
        plan = ([(halved, 180, False), (halved, 60, False), (size, 18, True)] if halved
                else [(size, 180, False), (size, 60, True), (size, 9, True)])
        assert sizes == plan, sizes
        assert grid_error(found, truth, size).item() < 2.0, name


def test_each_start_comes_with_the_score_auto_compares_with_its_threshold():
    """register() asks for the inverted start only where the start scores below AUTO_THRESHOLD
    (_scored_initialize); the score is the overlap NCC of the start on the blurred working images
    (the mean of theirs as they are and clipped: _scoring_image)."""
    truth = similarity(-45.0, 1.2, -6.0, 3.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    pair_f, pair_m = torch.cat([fixed, fixed]), torch.cat([moving, 1.0 - moving])
    for method in ("auto", "search", "moments", "fourier-mellin", "identity", "center", "phase"):
        matrix, score = init_module._scored_initialize(pair_f, pair_m, "similarity", method=method)
        assert torch.equal(matrix, initialize(pair_f, pair_m, "similarity", method=method)), method
        if method in ("identity", "center", "phase"):
            assert bool(score.isnan().all()), method  # no candidate scored
            continue
        # SIZE is within max_size: the working images are the images themselves, blurred by 1 pixel to score
        blurred = [tireg.sampling.gaussian_blur(image, 1.0, padding_mode="reflection") for image in (pair_f, pair_m)]
        clipped = [init_module._clipped(image, None) for image in blurred]
        expected = sum(init_module._ncc_scores(*images, matrix[:, None], init_module.MIN_OVERLAP, images=1)[:, 0]
                       for images in (blurred, clipped)) / 2
        torch.testing.assert_close(score, expected, atol=1e-5, rtol=0), method
        if method in ("auto", "search"):
            assert bool(score[0] >= AUTO_THRESHOLD) and bool(score[1] < AUTO_THRESHOLD), (method, score)
    constant = init_module._scored_initialize(fixed, torch.ones_like(moving), "similarity")[1]
    assert bool(constant.isnan().all())


@pytest.mark.parametrize("size", [SIZE, (150, 180)])  # within max_size (the working images are the images), and beyond
def test_a_start_on_the_inverted_moving_image_negates_the_working_copies_only(size):
    """_scored_initialize(negate_moving=True), register's start on the inverted image for a metric
    of any contrast: every method's start and score are those of ``-moving``, bit for bit (box
    downsampling and blurs are odd functions), without a negated copy of the images."""
    truth = similarity(-12.0, 1.05, -6.0, 3.0, size)
    fixed, moving = cut_pair("camera", truth, size)
    pair_f, pair_m = torch.cat([fixed, fixed]), torch.cat([1.0 - moving, moving])
    for method in ("auto", "search", "moments", "fourier-mellin", "identity", "center", "phase"):
        expected = init_module._scored_initialize(pair_f, -pair_m, "similarity", method=method)
        found = init_module._scored_initialize(pair_f, pair_m, "similarity", method=method, negate_moving=True)
        assert torch.equal(found[0], expected[0]), method
        assert torch.equal(found[1].nan_to_num(-9.0), expected[1].nan_to_num(-9.0)), method


def test_the_last_stage_refines_two_distinct_candidates():
    """Stage 2's neighbourhoods of coarse winners 10 degrees apart overlap, and its two best were
    often one candidate twice (75 and 75 degrees): the second is the best one unlike the first, by
    angle modulo a turn, by scale, or by stretch."""
    degree = math.pi / 180
    angles = torch.tensor([[75.0, 75.0 + 1e-5, 77.5, 75.0], [-185.0, 175.0, 170.0, 175.0]], dtype=torch.float64) * degree
    scales = torch.tensor([[0.9, 0.9, 0.9, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    scores = torch.tensor([[0.9, 0.89, 0.5, 0.6], [0.8, 0.79, 0.3, 0.7]], dtype=torch.float64)
    params = init_module._similarity_params(angles, scales)
    two = init_module._two_distinct(params, scores)
    assert torch.equal(two[0], params[0, [0, 3]])
    assert torch.equal(two[1], params[1, [0, 2]])  # -185 and 175 degrees are one angle
    alike = init_module._two_distinct(params[:, :2], scores[:, :2])
    assert torch.equal(alike[0], params[0, [0, 0]])  # nothing unlike the first: the first again
    # the same similarity stretched by 1.2 along 0 or 90 degrees differs; the axis of no stretch does not
    stretched = params[:1, :1].repeat(1, 4, 1)
    stretched[0, 1, 3] = math.log(1.2)
    stretched[0, 2, 2:] = torch.tensor([math.pi / 2, math.log(1.2)])
    stretched[0, 3, 2] = math.pi / 4  # no stretch: the axis is moot
    order = torch.tensor([[0.9, 0.5, 0.6, 0.89]], dtype=torch.float64)
    assert torch.equal(init_module._two_distinct(stretched, order)[0], stretched[0, [0, 2]])


def test_candidate_linear_parts():
    """``s R(theta) R(phi) diag(r, 1/r) R(phi)^T``: a similarity for ``r = 1``; determinant ``s^2``;
    the stretch's axis ``phi`` is an eigenvector of the symmetric part with eigenvalue ``r``."""
    params = torch.tensor([[0.3, math.log(1.1), 0.7, math.log(1.3)], [0.3, math.log(1.1), 0.7, 0.0]],
                          dtype=torch.float64)
    linear = init_module._candidate_linear(params)
    assert torch.allclose(linear[1], 1.1 * tireg.transforms.rotation(torch.tensor(0.3, dtype=torch.float64)))
    assert torch.allclose(torch.linalg.det(linear), torch.full((2,), 1.21, dtype=torch.float64))
    symmetric = tireg.transforms.rotation(torch.tensor(-0.3, dtype=torch.float64)) @ linear[0] / 1.1
    assert torch.allclose(symmetric, symmetric.T)
    axis = tireg.transforms.rotation(torch.tensor(0.7, dtype=torch.float64))[:, 0]
    assert torch.allclose(symmetric @ axis, 1.3 * axis)


def test_auto_falls_back_to_search_when_fourier_mellin_fails(monkeypatch):
    truth = similarity(-45.0, 1.2, -6.0, 3.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    calls = []
    search = init_module._search

    def counting_search(*args, **kwargs):
        calls.append(args[0].fixed.shape[0])
        return search(*args, **kwargs)

    monkeypatch.setattr(init_module, "_search", counting_search)
    assert grid_error(initialize(fixed, moving, "similarity"), truth, SIZE).item() < 1.5
    assert calls == []  # a good Fourier–Mellin candidate: no search
    # a broken Fourier–Mellin (angle off by 1 rad): the search must take over
    broken = lambda f, m: (torch.ones(f.shape[0], dtype=f.dtype), torch.ones(f.shape[0], dtype=f.dtype))  # noqa: E731
    monkeypatch.setattr(init_module, "_fourier_mellin", broken)
    assert grid_error(initialize(fixed, moving, "similarity"), truth, SIZE).item() < 2.0
    assert calls == [1]
    assert 0.0 < AUTO_THRESHOLD < 1.0


def stretched(angle_deg, scale_x, scale_y, tx, ty, size=SIZE):
    """``(1, 3, 3)``: ``R(theta) diag(sx, sy)`` about the centre of an image of ``size``, then ``(tx, ty)``."""
    linear = tireg.transforms.rotation(torch.tensor(angle_deg * DEGREE, dtype=torch.float64)) @ torch.diag(
        torch.tensor([scale_x, scale_y], dtype=torch.float64))
    centre = torch.tensor(tireg.image_center(*size), dtype=torch.float64)
    return tireg.transforms._about_center(linear, torch.tensor([tx, ty], dtype=torch.float64), centre)[None]


def test_affine_search_tries_stretched_candidates(monkeypatch):
    """An aspect change of 1.4-1.5 (scales 1.25 and 0.85 along an axis turned by 20-25 degrees):
    similarity candidates alone started these pairs 8-12 px off, and ``register`` ended two of them
    8 and 12 px off.  The affine search stretches its candidates where similarities score low;
    other kinds, and pairs a similarity fits, do not pay for it."""
    truths = torch.cat([stretched(20.0, 1.25, 0.85, 6.0, -4.0), stretched(-25.0, 0.85, 1.2, 6.0, -4.0)])
    calls = []
    stages = init_module._search_stages
    monkeypatch.setattr(init_module, "_search_stages",
                        lambda *args, **kwargs: calls.append(kwargs.get("stretched", False)) or stages(*args, **kwargs))
    for name in ("brick", "gravel"):
        fixed, moving = cut_pair(name, truths, SIZE)
        assert (grid_error(initialize(fixed, moving, "affine"), truths, SIZE) < 2.0).all(), name
        result = tireg.register(fixed, moving, transform="affine")
        assert (grid_error(result.matrix, truths, SIZE) < 0.05).all(), name
    assert calls.count(True) >= 2
    calls.clear()
    initialize(fixed, moving, "similarity")  # not an affine: similarities only
    assert True not in calls
    calls.clear()
    truth = similarity(-45.0, 1.2, -6.0, 3.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    assert grid_error(initialize(fixed, moving, "affine", method="search"), truth, SIZE).item() < 1.5
    assert calls == [False]  # a similarity fits: no stretched search


def polar(angle_deg, scale, axis_deg, stretch, shift, size):
    """``(1, 3, 3)``: ``s R(theta) R(phi) diag(r, 1/r) R(phi)^T`` about the centre of an image of ``size``, then ``shift``."""
    axis = tireg.transforms.rotation(torch.tensor(axis_deg * DEGREE, dtype=torch.float64))
    linear = scale * tireg.transforms.rotation(torch.tensor(angle_deg * DEGREE, dtype=torch.float64)) @ axis @ torch.diag(
        torch.tensor([stretch, 1.0 / stretch], dtype=torch.float64)) @ axis.T
    centre = torch.tensor(tireg.image_center(*size), dtype=torch.float64)
    return tireg.transforms._about_center(linear, torch.tensor(shift, dtype=torch.float64), centre)[None]


@pytest.mark.parametrize("method", ["auto", "search"])
def test_a_centre_away_from_the_middle_gives_the_same_start_for_a_large_turn(method):
    """``center`` only says about which point the result is expressed; the candidates had been turned
    about it, and about a corner or an edge a turn of 90 degrees or more took the canvas off the grid:
    no shift was found, and the start was 80-130 px off (0 px about the middle)."""
    size = (128, 128)
    truth = similarity(90.0, 1.0, 3.0, -2.0, size=size)
    fixed, moving = cut_pair("camera", truth, size)
    for center in (None, (0.0, 0.0), (127.0, 127.0), (63.5, 0.0)):
        found = initialize(fixed, moving, "similarity", method=method, center=center)
        assert grid_error(found, truth, size).item() < 1.0, center


def test_affine_search_stretches_where_the_best_similarity_scores_below_0_9():
    """Aspect changes of 1.34-1.41 whose best similarity scores 0.8-0.9: the stretched search ran only
    below 0.8, and these started 7-12 px off (of 154 random anisotropic pairs at 128^2, 53 started more
    than 3 px off, now 27; at 256^2, 2 of 48 ended tens of pixels off).  It runs below
    SEARCH_STRETCH_BELOW (0.9) and starts them within 1.5 px."""
    size = (128, 128)
    cases = [("camera", polar(-7.2, 1.103, 179.3, 1.190, (3.5, -12.4), size)),
             ("astronaut", polar(24.9, 0.893, 91.6, 1.157, (3.7, -11.1), size))]
    for name, truth in cases:
        fixed, moving = cut_pair(name, truth, size)
        start = initialize(fixed, moving, "affine")
        assert grid_error(start, truth, size).item() < 1.5, name
    assert init_module.AUTO_THRESHOLD < init_module.SEARCH_STRETCH_BELOW < 1.0


@pytest.mark.parametrize("method", ["search", "auto"])
def test_candidates_scored_in_chunks_give_the_same_answer(monkeypatch, method):
    """Chunking bounds the memory of scoring many candidates; it must not change a result."""
    truths = [similarity(75.0, 0.9, 10.0, -8.0), similarity(-45.0, 1.2, -6.0, 3.0)]
    pairs = [cut_pair(name, truth, SIZE) for name, truth in zip(("gravel", "coins"), truths)]
    fixed, moving = torch.cat([f for f, _ in pairs]), torch.cat([m for _, m in pairs])
    calls = []
    chunks = init_module.chunk_slices
    monkeypatch.setattr(init_module, "chunk_slices", lambda *args: calls.append(chunks(*args)) or calls[-1])
    monkeypatch.setattr(init_module, "PAIR_CHUNKS", 1)  # the pairs together (a small batch goes in eighths)
    monkeypatch.setattr(init_module, "CHUNK_PIXELS", 1 << 40)  # every candidate at once
    at_once = initialize(fixed, moving, "similarity", method=method)
    assert all(len(parts) == 1 for parts in calls)
    calls.clear()
    monkeypatch.setattr(init_module, "CHUNK_PIXELS", 1)  # one candidate at a time
    one_by_one = initialize(fixed, moving, "similarity", method=method)
    assert any(len(parts) > 1 for parts in calls)
    assert torch.equal(one_by_one, at_once)
    for found, truth in zip(at_once, truths):
        assert grid_error(found[None], truth, SIZE).item() < 2.0


@pytest.mark.parametrize("method", ["moments", "phase", "search", "auto"])
def test_pairs_initialised_in_chunks_give_the_same_answer(monkeypatch, method):
    """Chunks of pairs bound the initialiser's memory for a large batch; each pair's answer is unchanged."""
    truths = [similarity(75.0, 0.9, 10.0, -8.0), similarity(-45.0, 1.2, -6.0, 3.0), similarity(5.0, 1.0, 3.0, 2.0)]
    pairs = [cut_pair(name, truth, SIZE) for name, truth in zip(("gravel", "coins", "astronaut"), truths)]
    fixed, moving = torch.cat([f for f, _ in pairs]), torch.cat([m for _, m in pairs])
    calls = []
    chunks = init_module.chunk_slices
    monkeypatch.setattr(init_module, "chunk_slices", lambda *args: calls.append(chunks(*args)) or calls[-1])
    monkeypatch.setattr(init_module, "PAIR_CHUNKS", 1)  # (a small batch goes in eighths: below)
    together = initialize(fixed, moving, "similarity", method=method)
    assert len(calls[0]) == 1  # the pairs: all in one chunk
    calls.clear()
    monkeypatch.setattr(init_module, "PAIR_CHUNK_PIXELS", 1)  # one pair at a time
    one_by_one = initialize(fixed, moving, "similarity", method=method)
    assert calls[0] == [slice(0, 1), slice(1, 2), slice(2, 3)]
    # Equal to rounding, not bit for bit: a batched product (einsum, matmul) of one pair may take
    # another BLAS kernel than that of three (MKL on Intel CPUs), and the moments' eigenvectors
    # carry that rounding (2e-5 px measured); a pair mixed up with another would be pixels off.
    assert bool((grid_error(one_by_one, together, SIZE) < 1e-3).all())
    one_moving = initialize(fixed, moving[:1], "similarity", method=method)  # a batch of 1 broadcasts
    assert grid_error(one_moving[:1], together[:1], SIZE).item() < 1e-3


def test_a_small_batch_is_initialised_in_eighths(monkeypatch):
    """A batch under PAIR_CHUNKS x PAIR_CHUNK_PIXELS working pixels goes in PAIR_CHUNKS chunks (one
    pair at least): 2^18 working pixels at once were a fixed 32 MB, more than a small batch's whole
    registration (16 x 256^2 peaked at 4.25x its input, now 2.77x); each pair's answer is unchanged."""
    assert [init_module._pair_chunk_budget(batch, 128 * 128) for batch in (1, 4, 16, 64, 128, 1024)] == [
        1 << 14, 1 << 14, 1 << 15, 1 << 17, 1 << 18, 1 << 18]
    generator = torch.Generator().manual_seed(5)
    fixed = torch.rand(16, 1, 24, 24, generator=generator, dtype=torch.float64)
    moving = torch.roll(fixed, shifts=(2, -1), dims=(-2, -1))
    parts = []
    run = init_module._initialize
    monkeypatch.setattr(init_module, "_initialize", lambda fixed, *args, **kwargs: parts.append(fixed.shape[0])
                        or run(fixed, *args, **kwargs))
    eighths = initialize(fixed, moving, "translation", method="phase")
    assert parts == [2] * 8
    parts.clear()
    monkeypatch.setattr(init_module, "PAIR_CHUNKS", 1)
    whole = initialize(fixed, moving, "translation", method="phase")
    assert parts == [16]
    torch.testing.assert_close(eighths, whole, rtol=0, atol=1e-9)
    truth = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert bool((grid_error(eighths, truth, (24, 24)) < 0.1).all())  # noise: 0.01-0.05 px


def test_one_channel_is_its_own_luminance():
    """No copy of a one-channel image (a batch's peak memory counts every copy); channels are averaged."""
    image = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    fixed, moving = init_module._pair(image, image[:1], "initialize()")
    assert fixed.data_ptr() == image.data_ptr() and moving.data_ptr() == image.data_ptr()
    colour = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(init_module._pair(colour, colour, "initialize()")[0], colour.mean(1, keepdim=True))


def test_initialize_center_argument_does_not_change_the_answer():
    truth = similarity(30.0, 1.2, 5.0, -4.0)
    fixed, moving = cut_pair("astronaut", truth, SIZE)
    for center in [(20.0, 30.0), torch.tensor([[100.0, 70.0]])]:
        found = initialize(fixed, moving, "similarity", center=center)
        assert grid_error(found, truth, SIZE).item() < 1.5


# ----------------------------------------------------------------------------
# the kind is respected


@pytest.mark.parametrize("method", METHODS)
def test_result_respects_the_transform_kind(method):
    truth = similarity(30.0, 1.2, 5.0, -4.0)
    fixed, moving = cut_pair("coins", truth, SIZE)
    for kind in TRANSFORMS:
        found = initialize(fixed, moving, kind, method=method)
        assert found.shape == (1, 3, 3) and torch.isfinite(found).all()
        assert torch.equal(found[0, 2], torch.tensor([0.0, 0.0, 1.0]))
        linear = found[0, :2, :2].double()
        if kind == "translation":
            assert torch.equal(linear, torch.eye(2, dtype=torch.float64)), (method, linear)
        elif kind == "rigid":
            assert torch.allclose(linear.T @ linear, torch.eye(2, dtype=torch.float64), atol=1e-5), (method, linear)
            assert torch.det(linear) > 0
        elif kind in ("similarity", "anisotropic_similarity"):
            assert abs(linear[0, 0] - linear[1, 1]) < 1e-5 and abs(linear[0, 1] + linear[1, 0]) < 1e-5


def test_rigid_recovers_a_rigid_truth_and_drops_scale_about_the_centre():
    truth = similarity(-35.0, 1.0, -7.0, 5.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    assert grid_error(initialize(fixed, moving, "rigid"), truth, SIZE).item() < 1.5
    scaled = similarity(-35.0, 1.2, -7.0, 5.0)
    fixed, moving = cut_pair("camera", scaled, SIZE)
    angle, scale, shift = decompose(initialize(fixed, moving, "rigid"), SIZE)
    assert abs(angle.item() + 35.0) < 2.0 and abs(scale.item() - 1.0) < 1e-5
    assert (shift - torch.tensor([-7.0, 5.0], dtype=torch.float64)).norm() < 3.0


def test_translation_kind_recovers_a_shift():
    truth = similarity(0.0, 1.0, -23.4, 14.8)
    fixed, moving = cut_pair("gravel", truth, SIZE)
    for method in ("auto", "phase", "fourier-mellin", "search"):
        assert grid_error(initialize(fixed, moving, "translation", method=method), truth, SIZE).item() < 0.5


# ----------------------------------------------------------------------------
# batches, dtypes, devices


def batch_of_pairs(dtype=torch.float32):
    pairs = [
        cut_pair("astronaut", similarity(30.0, 1.2, 5.0, -4.0), SIZE, dtype=dtype),
        cut_pair("coins", similarity(-45.0, 1.2, -6.0, 3.0), SIZE, dtype=dtype),
        cut_pair("gravel", similarity(12.0, 0.9, 15.0, 9.0), SIZE, dtype=dtype),
    ]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


@pytest.mark.parametrize("method", ["auto", "search", "moments", "phase"])
def test_batch_equals_one_by_one(method):
    fixed, moving = batch_of_pairs()
    batched = initialize(fixed, moving, "similarity", method=method)
    single = torch.cat([initialize(fixed[i : i + 1], moving[i : i + 1], "similarity", method=method) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-3), (batched - single).abs().max()
    if method == "auto":
        angle, scale = fourier_mellin(fixed, moving)
        for i in range(3):
            one = fourier_mellin(fixed[i : i + 1], moving[i : i + 1])
            assert torch.allclose(angle[i], one[0][0], atol=1e-4) and torch.allclose(scale[i], one[1][0], atol=1e-4)
        assert torch.allclose(
            phase_correlation(fixed, moving),
            torch.cat([phase_correlation(fixed[i : i + 1], moving[i : i + 1]) for i in range(3)]),
            atol=1e-3,
        )


@pytest.mark.parametrize("height", [29, 120])
def test_a_narrow_pair_is_initialised_alone_as_in_a_batch_bit_for_bit(height):
    """A 16-pixel-wide plane's spectrum depended on the batch it was transformed in (torch's CPU FFT
    transforms a batch of one otherwise), so a pair's shift did too once the fixed spectrum was taken
    on its own; a single small plane is now transformed with a zero plane after it (initialize._fft)."""
    camera = load("camera", dtype=torch.float32)
    fixed = torch.stack([camera[7 * i : 7 * i + height, 5 * i : 5 * i + 16] for i in range(4)])[:, None]
    moving = torch.stack([camera[7 * i + 3 : 7 * i + 3 + height, 5 * i + 2 : 5 * i + 18] for i in range(4)])[:, None]
    for method in ("phase", "auto"):
        batch = initialize(fixed, moving, "similarity", method=method)
        for index in range(4):
            alone = initialize(fixed[index : index + 1], moving[index : index + 1], "similarity", method=method)
            assert torch.equal(alone[0], batch[index]), (method, index)
    planes = torch.randn(8, height, 16, generator=torch.Generator().manual_seed(3))
    spectra = init_module._centred_spectra(planes, None)
    for index in range(8):
        assert torch.equal(init_module._centred_spectra(planes[index : index + 1], None)[0], spectra[index])
    torch.testing.assert_close(spectra, torch.fft.rfft2(planes - planes.mean(dim=(-2, -1), keepdim=True)))
    surfaces = init_module._fft(torch.fft.irfft2, spectra, s=(height, 15))  # an odd width: the inverse too
    for index in range(8):
        alone = init_module._fft(torch.fft.irfft2, spectra[index : index + 1], s=(height, 15))
        assert torch.equal(alone[0], surfaces[index])


def test_batch_of_one_moving_broadcasts():
    fixed, moving = batch_of_pairs()
    shared = initialize(fixed, moving[:1], "similarity")
    assert shared.shape == (3, 3, 3)
    assert torch.allclose(shared[0], initialize(fixed[:1], moving[:1], "similarity")[0], atol=1e-3)


def test_float64_and_colour_and_unbatched_inputs():
    truth = similarity(30.0, 1.2, 5.0, -4.0)
    fixed, moving = cut_pair("astronaut", truth, SIZE, dtype=torch.float64)
    found = initialize(fixed, moving, "similarity")
    assert found.dtype == torch.float64
    assert grid_error(found, truth, SIZE).item() < 1.5
    assert phase_correlation(fixed, moving).dtype == torch.float64
    # (H, W) and (C, H, W) are promoted to a batch of one; colour is averaged to luminance
    assert torch.allclose(initialize(fixed[0, 0], moving[0, 0], "similarity"), found)
    fixed_c, moving_c = cut_pair("immunohistochemistry", truth, SIZE, channels=True)
    assert fixed_c.shape[1] == 3
    assert grid_error(initialize(fixed_c[0], moving_c[0], "similarity"), truth, SIZE).item() < 1.5


def test_inputs_are_not_modified():
    fixed, moving = batch_of_pairs()
    before = (fixed.clone(), moving.clone(), fixed._version, moving._version)
    initialize(fixed, moving, "similarity")
    assert torch.equal(fixed, before[0]) and torch.equal(moving, before[1])
    assert (fixed._version, moving._version) == before[2:]


def test_runs_on_device(device):
    fixed, moving = batch_of_pairs()
    on_cpu = initialize(fixed, moving, "similarity")
    found = initialize(fixed.to(device), moving.to(device), "similarity")
    assert found.device.type == torch.device(device).type and found.dtype == torch.float32
    assert torch.allclose(found.cpu(), on_cpu, atol=0.05)
    shifts = phase_correlation(fixed.to(device), moving.to(device))
    assert shifts.device.type == torch.device(device).type
    for function in (center_of_mass, moments):
        assert function(fixed.to(device), moving.to(device)).device.type == torch.device(device).type


# ----------------------------------------------------------------------------
# moments


def blobs(points: torch.Tensor) -> torch.Tensor:
    """A skewed, elongated intensity pattern: an ellipse and a smaller offset blob, at points ``(..., 2)``."""
    x, y = points[..., 0], points[..., 1]
    ellipse = torch.exp(-0.5 * ((x / 8.0) ** 2 + (y / 3.5) ** 2))
    side = 0.6 * torch.exp(-0.5 * (((x - 6.5) / 2.2) ** 2 + ((y - 1.5) / 1.8) ** 2))
    return ellipse + side


def render(matrix_to_pattern: torch.Tensor, size) -> torch.Tensor:
    """``image(x) = blobs(P x)`` for ``P`` ``(3, 3)`` mapping image pixels to pattern coordinates."""
    h, w = size
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ matrix_to_pattern.T
    return blobs(points[..., :2])[None, None]


@pytest.mark.parametrize(
    "kind, params", [("rigid", (30.0, 1.0)), ("rigid", (170.0, 1.0)), ("similarity", (-60.0, 1.2))]
)
def test_moments_recovers_rotation_and_scale_of_a_skewed_pattern(kind, params):
    size = (80, 96)
    to_pattern = translation_matrix(torch.tensor([-40.0, -35.0], dtype=torch.float64))  # pattern at (40, 35)
    truth = similarity(params[0], params[1], 4.0, -3.0, size=size)
    fixed = render(to_pattern, size)
    moving = render(to_pattern @ torch.linalg.inv(truth[0]), size)  # moving(A x) = fixed(x)
    found = moments(fixed, moving, transform=kind)
    assert grid_error(found, truth, size).item() < 0.3, found
    assert grid_error(initialize(fixed, moving, kind, method="moments"), truth, size).item() < 0.3


def test_moments_affine_maps_the_covariances():
    size = (80, 96)
    to_pattern = translation_matrix(torch.tensor([-45.0, -40.0], dtype=torch.float64))
    truth = torch.tensor([[[1.1, 0.25, 3.0], [-0.15, 0.9, -2.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    fixed = render(to_pattern, size)
    moving = render(to_pattern @ torch.linalg.inv(truth[0]), size)
    found = moments(fixed, moving, transform="affine")
    _, cov_f, _, _ = init_module._centroid_and_covariance(fixed)
    _, cov_m, _, _ = init_module._centroid_and_covariance(moving)
    linear = found[:, :2, :2]
    assert torch.allclose(linear @ cov_f @ linear.transpose(1, 2), cov_m, rtol=1e-6, atol=1e-8)
    translation = moments(fixed, moving, transform="translation")
    assert torch.equal(translation[0, :2, :2], torch.eye(2, dtype=torch.float64))


def test_masked_moments_weigh_only_the_masked_pixels():
    """register's masks reach the initialiser: a mask's moments are those of its pixels alone,
    measured from their own minimum (what lies outside, no-data or another pattern, weighs nothing)."""
    size = (80, 96)
    to_pattern = translation_matrix(torch.tensor([-30.0, -35.0], dtype=torch.float64))
    image = render(to_pattern, size)
    mask = torch.zeros_like(image)
    mask[..., :, :60] = 1.0
    cluttered = torch.where(mask > 0, image, 7.0 + image.flip(-1))  # something else beyond the mask
    expected = init_module._centroid_and_covariance(image[..., :, :60])
    found = init_module._centroid_and_covariance(cluttered, mask)
    for mine, theirs in zip(found[:3], expected[:3]):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert torch.equal(found[3][..., 60:], torch.zeros_like(found[3][..., 60:]))


def test_center_of_mass_aligns_centroids():
    size = (70, 90)
    shift = torch.tensor([7.25, -3.5], dtype=torch.float64)
    to_pattern = translation_matrix(torch.tensor([-40.0, -35.0], dtype=torch.float64))
    fixed = render(to_pattern, size)
    moving = render(to_pattern @ translation_matrix(-shift), size)
    found = center_of_mass(fixed, moving)
    assert torch.allclose(found[0, :2, 2], shift, atol=1e-3)
    assert torch.equal(found[0, :2, :2], torch.eye(2, dtype=torch.float64))
    # adding a constant to an image changes nothing
    assert torch.allclose(center_of_mass(fixed + 3.0, moving), found)


# ----------------------------------------------------------------------------
# degenerate input and errors


@pytest.mark.parametrize("method", METHODS)
def test_constant_images_give_the_identity(method):
    generator = torch.Generator().manual_seed(0)
    textured = torch.rand(1, 1, 40, 50, generator=generator)
    for fixed, moving in [
        (torch.full((1, 1, 40, 50), 0.5), textured),
        (textured, torch.zeros(1, 1, 40, 50)),
        (torch.ones(1, 1, 40, 50), torch.ones(1, 1, 40, 50)),
    ]:
        for kind in ("translation", "rigid", "affine"):
            assert torch.equal(initialize(fixed, moving, kind, method=method), torch.eye(3)[None]), (method, kind)
    if method == "identity":
        return
    # different sizes: the geometric centres aligned
    found = initialize(torch.zeros(1, 1, 40, 50), torch.zeros(1, 1, 44, 60), "similarity", method=method)
    assert torch.allclose(found[0, :2, 2], torch.tensor([5.0, 2.0])) and torch.equal(found[0, :2, :2], torch.eye(2))


def test_constant_images_in_the_low_level_functions():
    flat = torch.full((2, 1, 32, 40), 0.25)
    assert torch.equal(phase_correlation(flat, flat), torch.zeros(2, 2))
    angle, scale = fourier_mellin(flat, flat)
    assert torch.equal(angle, torch.zeros(2)) and torch.equal(scale, torch.ones(2))
    # a value that is not exact in binary: centred, its rounding residues had given any shift
    # ((-16.1, -19.1) for 0.7) and any angle and scale; the textured pair beside it keeps its own
    textured = load("camera")[:64, :80]
    truth = similarity(0.0, 1.0, 6.0, -4.0, size=(64, 80))
    pair = cut_pair("camera", truth, (64, 80))
    fixed = torch.stack([torch.full((1, 64, 80), 0.7), torch.full((1, 64, 80), 1 / 3), pair[0][0]])
    moving = torch.stack([textured[None], textured[None], pair[1][0]])
    shifts = phase_correlation(fixed, moving)
    assert torch.equal(shifts[:2], torch.zeros(2, 2)) and torch.allclose(shifts[2], truth[0, :2, 2].float(), atol=0.2)
    angle, scale = fourier_mellin(fixed, moving)
    assert torch.equal(angle[:2], torch.zeros(2)) and torch.equal(scale[:2], torch.ones(2))
    # a constant resampled (bicubic weights: about 22 eps of variation) is still constant
    resampled = tireg.warp(torch.full((1, 1, 64, 80), 0.999, dtype=torch.float64), similarity(7.0, 1.1, 0.3, 0.2,
                           size=(64, 80)), interpolation="bicubic", padding_mode="border")
    assert float(resampled.max() - resampled.min()) > 0.0
    assert torch.equal(phase_correlation(resampled, textured.double()), torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(initialize(resampled, textured.double(), "similarity"), torch.eye(3, dtype=torch.float64)[None])
    assert torch.equal(center_of_mass(flat, flat), torch.eye(3).expand(2, 3, 3))
    assert torch.equal(moments(flat, flat), torch.eye(3).expand(2, 3, 3))
    assert torch.equal(overlap_ncc(flat, flat, torch.eye(3)), torch.zeros(2))


def test_fourier_mellin_gives_no_rotation_nor_scale_below_8_pixels(generator):
    # as documented: a larger side below 8 pixels has no spectrum to speak of (a 7 x 7 pair was
    # rounded up to 8 before the test, and gave an angle of -90 degrees)
    for shape in [(7, 7), (5, 7), (6, 6)]:
        fixed, moving = torch.rand(2, 1, 1, *shape, generator=generator)
        angle, scale = fourier_mellin(fixed, moving)
        assert torch.equal(angle, torch.zeros(1)) and torch.equal(scale, torch.ones(1)), shape


def test_overlap_ncc():
    fixed, moving = cut_pair("camera", similarity(0.0, 1.0, 10.0, 0.0), SIZE)
    assert overlap_ncc(fixed, fixed, torch.eye(3)).item() == pytest.approx(1.0, abs=1e-5)
    assert overlap_ncc(fixed, moving, translation_matrix(torch.tensor([10.0, 0.0]))).item() > 0.999
    assert overlap_ncc(fixed, -fixed, torch.eye(3)).item() == pytest.approx(-1.0, abs=1e-5)
    far = translation_matrix(torch.tensor([110.0, 0.0]))  # 18 of 128 columns overlap: below MIN_OVERLAP
    assert overlap_ncc(fixed, fixed, far).item() == -1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda f, m: phase_correlation(f, m),
        lambda f, m: fourier_mellin(f, m),
        lambda f, m: center_of_mass(f, m),
        lambda f, m: moments(f, m),
        lambda f, m: initialize(f, m, "rigid"),
    ],
    ids=["phase_correlation", "fourier_mellin", "center_of_mass", "moments", "initialize"],
)
def test_invalid_images_are_rejected(call):
    good = torch.rand(1, 1, 16, 20, generator=torch.Generator().manual_seed(1))
    nan = good.clone()
    nan[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"\(\): 'moving' contains NaN"):
        call(good, nan)
    with pytest.raises(ValueError, match=r"'fixed' must be \(H, W\), \(C, H, W\) or \(B, C, H, W\); got shape \(20,\)"):
        call(torch.rand(20), good)
    with pytest.raises(ValueError, match=r"'fixed' must be \(H, W\), \(C, H, W\) or \(B, C, H, W\)"):
        call(torch.rand(1, 1, 1, 16, 20), good)
    with pytest.raises(ValueError, match=r"'moving' is empty"):
        call(good, torch.rand(1, 1, 0, 20))
    with pytest.raises(TypeError, match=r"'fixed' must be real; got torch.complex64"):
        call(good.to(torch.complex64), good)
    with pytest.raises(TypeError, match=r"'moving' must be a torch.Tensor or numpy.ndarray; got list"):
        call(good, good.tolist())
    with pytest.raises(ValueError, match=r"batch sizes differ"):
        call(good.expand(2, 1, 16, 20), good.expand(3, 1, 16, 20))


INITIALISERS = [
    lambda f, m: phase_correlation(f, m),
    lambda f, m: torch.stack(fourier_mellin(f, m), dim=1),
    lambda f, m: center_of_mass(f, m),
    lambda f, m: moments(f, m),
    lambda f, m: overlap_ncc(f, m, similarity(5.0, 1.05, 2.0, -1.0)),
    lambda f, m: initialize(f, m, "similarity"),
    lambda f, m: initialize(f, m, "affine", method="search"),
]
INITIALISER_NAMES = ["phase_correlation", "fourier_mellin", "center_of_mass", "moments", "overlap_ncc",
                     "initialize", "search"]


@pytest.mark.parametrize("call", INITIALISERS, ids=INITIALISER_NAMES)
def test_every_initialiser_takes_images_as_register_does(call):
    """NumPy arrays, integer, half and boolean images, and a float32 with a float64 image, as
    :func:`tireg.register` takes them (they were refused: 'must be float32 or float64', 'must be a
    torch.Tensor', 'same dtype'): the result is that of the same values in float32 (float64 for the
    mixed pair), in that dtype."""
    fixed, moving = cut_pair("camera", similarity(12.0, 1.1, 3.0, -2.0), SIZE, dtype=torch.float64)
    fixed, moving = ((image * 255).round() for image in (fixed, moving))
    reference = call(fixed.float(), moving.float())
    for as_given in (lambda image: image.to(torch.uint8).numpy()[0, 0],  # (H, W) uint8 array
                     lambda image: image.to(torch.int16),
                     lambda image: image.to(torch.float16)):  # whole numbers to 255: exact in float16
        found = call(as_given(fixed), as_given(moving))
        assert found.dtype == torch.float32
        torch.testing.assert_close(found, reference, rtol=0, atol=0)
    mixed = call(fixed.float(), moving)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, call(fixed, moving), rtol=0, atol=0)
    spots = call(fixed > 128, moving > 128)  # a boolean image: its 0/1 values
    torch.testing.assert_close(spots, call((fixed > 128).float(), (moving > 128).float()), rtol=0, atol=0)


@pytest.mark.parametrize("call", INITIALISERS, ids=INITIALISER_NAMES)
@pytest.mark.parametrize("dtype, gains", [(torch.float32, (2.0 ** 70, 2.0 ** -90, 1e18, 1e-25)),
                                          (torch.float64, (2.0 ** 600, 2.0 ** -600, 1e160, 1e-160))])
def test_every_initialiser_is_invariant_to_the_images_gain(call, dtype, gains):
    """Images of huge or tiny values get the result they have at an ordinary scale: the same to the
    bit for a power of two, to the values' rounding otherwise.  Squares of 1e18 had overflowed
    float32 (and those of 1e-25 underflowed), and initialize() returned the identity without a word."""
    fixed, moving = cut_pair("camera", similarity(12.0, 1.1, 3.0, -2.0), SIZE, dtype=dtype)
    reference = call(fixed, moving)
    for gain in gains:
        found = call(fixed * gain, moving * gain)
        if math.frexp(gain)[0] == 0.5:  # a power of two
            torch.testing.assert_close(found, reference, rtol=0, atol=0)
        else:
            torch.testing.assert_close(found, reference, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-3)
    uneven = call(torch.cat([fixed, fixed * 2.0 ** 70]), torch.cat([moving * 2.0 ** -70, moving]))  # pair by pair
    torch.testing.assert_close(uneven, torch.cat([reference, reference]), rtol=0, atol=0)


def test_invalid_options_are_rejected():
    image = torch.rand(1, 1, 16, 20, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"^initialize\(\): unknown transform 'projective'; choose one of"):
        initialize(image, image, "projective")
    with pytest.raises(ValueError, match=r"^initialize\(\): unknown method 'ransac'; choose one of 'auto'"):
        initialize(image, image, "rigid", method="ransac")
    for bad in (4, 100.0, True, "64"):
        with pytest.raises(ValueError, match=r"^initialize\(\): 'max_size' must be an integer >= 8"):
            initialize(image, image, "rigid", max_size=bad)
    for bad in ((1.0, 2.0, 3.0), torch.zeros(2, 2), (float("nan"), 1.0), "centre"):
        with pytest.raises(ValueError, match=r"^initialize\(\): 'center' must be"):
            initialize(image, image, "rigid", center=bad)
    for bad in ((True, False), torch.tensor([1 + 2j, 3.0])):  # (True, False) had been the centre (1, 0)
        with pytest.raises(TypeError, match=r"^initialize\(\): 'center' must be \(cx, cy\), real numbers in pixels"):
            initialize(image, image, "rigid", center=bad)
    with pytest.raises(ValueError, match=r"^phase_correlation\(\): 'fixed' and 'moving' must have the same size"):
        phase_correlation(image, image[..., :15, :])
    with pytest.raises(ValueError, match=r"^moments\(\): unknown transform 'shear'"):
        moments(image, image, transform="shear")
    with pytest.raises(ValueError, match=r"^overlap_ncc\(\): 'matrix' must have shape \(B, 3, 3\) or \(3, 3\)"):
        overlap_ncc(image, image, torch.eye(2))


# ----------------------------------------------------------------------------
# audit: short axes, strips, gain invariance, checks


def _strip_pair():
    """A 32 x 2000 strip and its copy moved by (5, 3) px: ``moving(x) = fixed(x - (5, 3))``, truth ``t = (5, 3)``."""
    generator = torch.Generator().manual_seed(0)
    big = tireg.sampling.gaussian_blur(torch.rand(1, 1, 80, 2100, generator=generator), 3.0, padding_mode="reflection")
    return big[..., 10:42, 50:2050], big[..., 7:39, 45:2045]


@pytest.mark.parametrize("window", [True, False])
def test_phase_correlation_finds_no_shift_along_an_axis_of_two(window):
    """The taper zeroes an axis of 2's only non-zero frequency: the surface is flat there, no shift
    (it gave -1.5 px, the first point of the refining grid, even for identical images)."""
    image = torch.rand(2, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(phase_correlation(image, image, window=window)[:, 1], torch.zeros(1, dtype=torch.float64))
    assert phase_correlation(image, image, window=window).abs().max().item() < 1e-9
    columns = phase_correlation(image.mT, image.mT, window=window)  # (9, 2): the axis of 2 is x
    assert torch.equal(columns[:, 0], torch.zeros(1, dtype=torch.float64))
    # the long axis still carries its shift
    generator = torch.Generator().manual_seed(1)
    row = tireg.sampling.gaussian_blur(torch.rand(1, 1, 2, 300, generator=generator, dtype=torch.float64), 2.0)
    shift = phase_correlation(row[..., 50:250], row[..., 45:245], window=window)[0]
    assert shift[1].item() == 0.0 and shift[0].item() == pytest.approx(5.0, abs=0.5)


@pytest.mark.parametrize("method", ["phase", "auto"])
def test_initialize_finds_the_shift_of_a_wide_strip(method):
    """A 32 x 2000 strip was reduced to 2 x 125 (factor 16 for max_size 128): "phase" gave
    ty = -24 px and "auto" the identity.  The working copy now keeps 16 rows (factor 2)."""
    fixed, moving = _strip_pair()
    found = initialize(fixed, moving, "translation", method=method)
    assert torch.allclose(found[0, :2, :2], torch.eye(2))
    assert (found[0, :2, 2] - torch.tensor([5.0, 3.0])).abs().max().item() < 1.0


def test_working_copies_keep_the_smaller_side():
    factor = init_module._downsample_factor
    assert factor([(32, 2000)], 128) == 2  # 16 x 1000, not 2 x 125
    assert factor([(24, 2000)], 128) == 1
    assert factor([(2000, 32), (32, 2000)], 128) == 2
    assert factor([(256, 256)], 128) == 2 and factor([(96, 128)], 128) == 1  # square images as before
    assert factor([(160, 200)], 50) == 4
    assert factor([(128, 128)], 8) == 16  # max_size below MIN_WORKING_SIDE: the smaller side keeps max_size
    # slightly above max_size, halved (kept whole up to 1.25 max_size, noisy pairs started wrong)
    assert factor([(128, 144)], 128) == 2 and factor([(160, 160)], 128) == 2 and factor([(161, 120)], 128) == 2
    assert factor([(5, 7)], 8) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlap_ncc_is_gain_invariant(dtype):
    """An absolute 1e-12 under the root scored an aligned pair 1.0 at gain 1, 0.96 at 1e-4 and 0.03 at 1e-5."""
    fixed, moving = cut_pair("camera", similarity(0.0, 1.0, 6.0, -3.0), SIZE, dtype=dtype)
    shift = translation_matrix(torch.tensor([6.0, -3.0]))
    wrong = translation_matrix(torch.tensor([-4.0, 7.0]))
    reference = [overlap_ncc(fixed, moving, matrix).item() for matrix in (shift, wrong, torch.eye(3))]
    assert reference[0] > 0.999 and reference[1] < 0.9
    for gain in (1e-5, 1e-8, 1e8):
        scores = [overlap_ncc(fixed * gain, moving * gain, matrix).item() for matrix in (shift, wrong, torch.eye(3))]
        assert scores == pytest.approx(reference, abs=1e-5), gain


def test_overlap_ncc_of_a_flat_side_is_zero_at_any_gain():
    """No variation on the overlap scores 0, also where the mean is not exact in float32 (rounding
    is not variation) and whatever the gain."""
    textured = torch.rand(1, 1, 40, 50, generator=torch.Generator().manual_seed(3))
    for gain in (1.0, 1e-8, 1e8):
        flat = torch.full((1, 1, 40, 50), 0.1 * gain)
        shifted = translation_matrix(torch.tensor([0.37, -0.61]))  # interpolated: rounding in every pixel
        assert overlap_ncc(textured * gain, flat, shifted).item() == 0.0
        assert overlap_ncc(flat, textured * gain, shifted).item() == 0.0


@pytest.mark.parametrize("gain", [1e-4, 1e-8, 1e6])
def test_initialize_does_not_depend_on_the_gain(gain):
    """float32 images around 1e-8 returned the identity for a 6.7 px shift (the NCC's absolute constant)."""
    truth = similarity(0.0, 1.0, 6.0, -3.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    assert grid_error(initialize(fixed * gain, moving * gain, "translation"), truth, SIZE).item() < 0.5
    assert grid_error(initialize(fixed * gain, moving * gain, "rigid"), truth, SIZE).item() < 0.5


@pytest.mark.parametrize("dtype, offset, gain", [(torch.float64, 1e5, 0.05), (torch.float64, 1e6, 0.5),
                                                (torch.float32, 1000.0, 0.005)])
def test_an_offset_image_of_little_contrast_is_not_constant(dtype, offset, gain):
    """A fixed 1e-6 of the largest value called these constant (their contrast is 5e-7 of it), and
    initialize returned the identity where phase correlation found the shift: constant is now no
    variation beyond 32 eps of the values in their dtype."""
    truth = similarity(0.0, 1.0, 6.0, -4.0)
    fixed, moving = (image.to(dtype) * gain + offset for image in cut_pair("camera", truth, SIZE, dtype=dtype))
    assert grid_error(initialize(fixed, moving, "translation"), truth, SIZE).item() < 0.1


@pytest.mark.parametrize("offset", [1000.0, 5000.0])
def test_initialize_does_not_depend_on_an_offset(offset):
    """A flatness rule of 64 eps |mean| called float32 detail of deviation 0.0076 on an offset of
    1000 flat: the overlap NCC was 0 everywhere and 'auto' returned the identity (a re-audit)."""
    truth = similarity(25.0, 1.0, 6.0, -4.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    fixed, moving = fixed * 0.02 + offset, moving * 0.02 + offset
    assert grid_error(initialize(fixed, moving, "rigid"), truth, SIZE).item() < 1.0
    assert overlap_ncc(fixed, moving, truth).item() > 0.2  # 0 before; float32 keeps 80 (1000) or 10 levels


def test_overlap_ncc_broadcasts_matrices_and_images():
    fixed, moving = cut_pair("camera", similarity(0.0, 1.0, 6.0, -3.0), SIZE)
    matrices = translation_matrix(torch.tensor([[6.0, -3.0], [0.0, 0.0], [-4.0, 7.0]]))
    scores = overlap_ncc(fixed, moving, matrices)
    assert scores.shape == (3,)
    for index in range(3):
        assert scores[index].item() == pytest.approx(overlap_ncc(fixed, moving, matrices[index]).item(), abs=1e-6)
    assert overlap_ncc(fixed.expand(3, 1, *SIZE), moving, matrices[:1]).shape == (3,)
    assert overlap_ncc(fixed, moving, torch.eye(3, dtype=torch.float64)).dtype == torch.float32


@pytest.mark.parametrize(
    "matrix, options, error, pattern",
    [
        (torch.diag(torch.tensor([1.0, 1.0, 2.0])), {}, ValueError, r"'matrix' must be affine, with last row"),
        (torch.full((3, 3), float("nan")), {}, ValueError, r"'matrix' contains NaN or Inf"),
        (torch.tensor([[1.0, 0.0, float("inf")], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), {}, ValueError,
         r"'matrix' contains NaN or Inf"),
        (torch.eye(3).expand(3, 3, 3), {}, ValueError, r"batch sizes differ: 3 transforms for 2 images"),
        (torch.zeros(0, 3, 3), {}, ValueError, r"'matrix' holds no matrix"),
        (torch.eye(3, dtype=torch.int64), {}, TypeError, r"'matrix' must be float32 or float64"),
        (torch.eye(3).tolist(), {}, TypeError, r"'matrix' must be a torch.Tensor"),
        (torch.eye(3), {"min_overlap": float("nan")}, ValueError, r"'min_overlap' must be finite"),
        (torch.eye(3), {"min_overlap": 1.5}, ValueError, r"'min_overlap' must be a fraction in \[0, 1\]; got 1.5"),
        (torch.eye(3), {"min_overlap": -0.1}, ValueError, r"'min_overlap' must be a fraction in \[0, 1\]"),
        (torch.eye(3), {"min_overlap": "a"}, TypeError, r"'min_overlap' must be a number; got 'a'"),
    ],
    ids=["projective", "nan", "inf", "batch", "empty", "int", "list", "overlap-nan", "overlap-above-1",
         "overlap-negative", "overlap-str"],
)
def test_overlap_ncc_rejects(matrix, options, error, pattern):
    images = torch.rand(2, 1, 16, 20, generator=torch.Generator().manual_seed(4))
    with pytest.raises(error, match=r"^overlap_ncc\(\): " + pattern):
        overlap_ncc(images, images, matrix, **options)


def test_max_size_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    fixed, moving = cut_pair("camera", similarity(0.0, 1.0, 6.0, -3.0), SIZE)
    expected = initialize(fixed, moving, "rigid", max_size=64)
    for size in (np.int64(64), np.int32(64), torch.tensor(64)):
        assert torch.equal(initialize(fixed, moving, "rigid", max_size=size), expected)
    for bad in (np.float64(64.0), np.int64(4), torch.tensor(64.0)):
        with pytest.raises(ValueError, match=r"^initialize\(\): 'max_size' must be an integer >= 8"):
            initialize(fixed, moving, "rigid", max_size=bad)


@pytest.mark.parametrize("window", ["no", 2, None])
def test_phase_correlation_window_must_be_a_bool(window):
    image = torch.rand(1, 1, 16, 20, generator=torch.Generator().manual_seed(5))
    with pytest.raises(TypeError, match=r"^phase_correlation\(\): 'window' must be True or False"):
        phase_correlation(image, image, window=window)


def test_phase_correlation_takes_a_numpy_bool():
    image = torch.rand(1, 1, 16, 20, generator=torch.Generator().manual_seed(5))
    for window in (np.True_, np.False_):
        assert torch.equal(phase_correlation(image, image, window=window),
                           phase_correlation(image, image, window=bool(window)))


def test_fourier_mellin_angle_stays_in_its_range_in_float32():
    """-pi/2 rounded to float32 lies below -pi/2: a 90-degree turn returned it, outside [-pi/2, pi/2)."""
    for dtype in (torch.float32, torch.float64):
        fixed, moving = cut_pair("camera", similarity(-90.0, 1.0, 0.0, 0.0, size=(128, 128)), (128, 128), dtype=dtype)
        angle = fourier_mellin(fixed, moving)[0].item()
        assert -math.pi / 2 <= angle < math.pi / 2
        assert abs(abs(angle) - math.pi / 2) < 1 * DEGREE


def test_translation_keeps_the_phase_shift_on_a_tie(monkeypatch):
    """The docstring: phase correlation is kept where it scores at least the identity."""
    truth = similarity(0.0, 1.0, 6.0, -3.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    monkeypatch.setattr(init_module, "_ncc_scores", lambda f, m, matrices, overlap, **_: torch.zeros(matrices.shape[:2]))
    for method in ("auto", "search", "fourier-mellin"):
        assert grid_error(initialize(fixed, moving, "translation", method=method), truth, SIZE).item() < 0.5, method


@pytest.mark.parametrize("name", ["coins", "gravel"])
def test_a_moving_image_zoomed_2x_into_the_fixed_one_is_found(name):
    # Its footprint on the fixed image is at most a quarter of it: the overlap rule, a quarter of the
    # fixed image, scored the right candidate -1, and register ended 100-300 px off, "converged".
    world = load(name, dtype=torch.float64)[None, None]
    shift = translation_matrix(torch.tensor([40.0, 40.0], dtype=torch.float64))
    centre = tireg.image_center(128, 128)
    for scale in (2.0, 2.2):
        truth = similarity_matrix(torch.tensor([0.1, scale, 5.0, -4.0], dtype=torch.float64), centre)
        fixed = tireg.warp(world, shift, size=(128, 128), interpolation="bicubic")[0, 0]
        moving = tireg.warp(world, shift @ torch.linalg.inv(truth), size=(128, 128), interpolation="bicubic",
                            padding_mode="border")[0, 0]
        assert float(overlap_ncc(fixed[None, None], moving[None, None], truth)) > 0.9  # was -1
        result = tireg.register(fixed.float(), moving.float(), transform="similarity")
        assert result.parameters["scale"] == pytest.approx(scale, abs=0.01), scale
        assert float((result.matrix - truth)[:2].abs().max()) < 0.2, scale


def test_large_shifts_are_found_by_phase_correlation_without_the_window():
    # 30-45 % shifts put the overlap at the images' edges, which the Hann window suppresses: 33 of
    # 40 such pairs of the bundled scenes registered wrong, "converged"; unwindowed phase correlation
    # is a candidate too now
    generator = torch.Generator().manual_seed(0)
    for name in ["coins", "astronaut", "brick"]:
        scene = load(name)
        height, width = scene.shape
        size = (height // 2 + 8, width // 2 + 8)
        dy, dx = int(0.4 * size[0]), int(0.4 * size[1])
        fixed = scene[:size[0], :size[1]] + 0.01 * torch.randn(size, generator=generator)
        moving = scene[dy:dy + size[0], dx:dx + size[1]] + 0.01 * torch.randn(size, generator=generator)
        result = tireg.register(fixed, moving, transform="translation")
        assert result.parameters["tx"] == pytest.approx(-dx, abs=0.3), name
        assert result.parameters["ty"] == pytest.approx(-dy, abs=0.3), name


def test_a_sparse_image_or_a_big_endian_centre_gets_its_own_words():
    """A sparse image failed deep inside ("expand is unsupported for Sparse tensors"); a big-endian
    centre raised torch's byte-order error under "must be (cx, cy)"."""
    fixed = load("camera")[None, None]
    with pytest.raises(TypeError, match=r"^initialize\(\): 'fixed' must be a dense tensor; got layout"):
        initialize(fixed.to_sparse(), fixed, "rigid")
    moving = fixed.roll(3, -1)
    native = initialize(fixed, moving, "rigid", center=np.array([100.0, 90.0]))
    assert torch.equal(initialize(fixed, moving, "rigid", center=np.array([100.0, 90.0]).astype(">f8")), native)


@pytest.mark.parametrize("angle, scale", [(17.0, 1.2), (0.0, 1.3)])
def test_a_small_template_in_a_large_scene_keeps_its_right_candidates(angle, scale):
    """A moving image of fewer than a sixteenth of the fixed image's pixels (64 x 64 in 200 x 300),
    zoomed 1.2-1.3x, covered less than the overlap floor of a sixteenth of the fixed image at the
    truth: every right candidate scored -1, and register() ended 55 px off, "converged"."""
    size, template = (200, 300), (64, 64)
    centring = translation_matrix(torch.tensor([[-(size[1] - template[1]) / 2, -(size[0] - template[0]) / 2]],
                                               dtype=torch.float64))
    truth = centring @ similarity(angle, scale, 3.0, -2.0, size=size)
    fixed, moving = cut_pair("coins", truth, size, moving_size=template)
    assert overlap_ncc(fixed, moving, truth.float()).item() > 0.95
    # errors over the template's footprint on the fixed image (the scene beyond it is unconstrained)
    corners = torch.tensor([[0, 0, 1], [63, 0, 1], [0, 63, 1], [63, 63, 1]], dtype=torch.float64).T
    footprint = torch.linalg.inv(truth[0]) @ corners

    def error(matrix):
        return ((matrix.double().reshape(3, 3) - truth[0]) @ footprint)[:2].norm(dim=0).mean().item()

    result = tireg.register(fixed, moving, transform="similarity")
    assert error(result.matrix) < 0.1 and result.converged.all()


@pytest.mark.parametrize("center", [(10**400, 1.0), (10**400, 1)])
def test_a_centre_beyond_float64_is_a_value_error_naming_it(center):
    """initialize(center=10**400, ...) raised a bare OverflowError ("int too large to convert to float")."""
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^initialize\(\): 'center' has a value beyond float64's range"):
        initialize(image, image, "rigid", center=center)


def test_a_sparse_matrix_for_overlap_ncc_is_refused_naming_it():
    """It reached torch's internals ("Could not run 'aten::...' with arguments from the 'SparseCPU' backend")."""
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"^overlap_ncc\(\): 'matrix' must be a dense tensor; got layout torch.sparse"):
        overlap_ncc(image, image, torch.eye(3).to_sparse())


# ----------------------------------------------------------------------------
# shifts beyond half the image: the other readings of a phase-correlation peak

#: (image, size, truth (angle, scale, tx, ty)): 41-48 % of the fixed image overlapping
BEYOND_HALF = [
    ("coins", (128, 128), (0.0, 1.0, 70.0, 0.0)),
    ("coins", (128, 128), (0.0, 1.0, 0.0, -75.0)),
    ("coins", (96, 128), (0.0, 1.0, -70.0, 2.0)),
    ("camera", (96, 112), (0.0, 1.0, 62.0, 2.0)),
]


@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
@pytest.mark.parametrize("name, size, params", BEYOND_HALF)
def test_a_shift_beyond_half_the_image_is_found_not_its_wrapped_alias(kind, name, size, params):
    # The peak of phase correlation is known modulo the image; it was read in [-N/2, N/2) only, and
    # register() ended at the wrapped alias (70 -> -58 px on 128^2), 82-196 px off, "converged".
    truth = similarity(*params, size=size)
    fixed, moving = cut_pair(name, truth, size)
    assert grid_error(initialize(fixed, moving, kind), truth, size).item() < 0.5
    result = tireg.register(fixed, moving, transform=kind)
    assert grid_error(result.matrix.reshape(-1, 3, 3), truth, size).item() < 0.1 and result.converged.all()


@pytest.mark.parametrize("angle", [0.0, 10.0])
def test_the_search_reads_its_candidates_shifts_beyond_half_the_image(angle):
    # Every search candidate's shift is phase correlation's too: 58 px of 112 was read as -54.
    size = (80, 112)
    truth = similarity(angle, 1.0, 58.0, 2.0, size=size)
    fixed, moving = cut_pair("astronaut", truth, size)
    assert grid_error(initialize(fixed, moving, "similarity", method="search"), truth, size).item() < 1.0


def test_wrap_readings_are_the_other_multiples_of_the_grid():
    shifts = torch.tensor([[[-58.0, 3.0], [0.0, -40.0]]], dtype=torch.float64)  # (1, 2, 2)
    matrices = translation_matrix(shifts)
    readings = init_module._wrap_readings(matrices, shifts, (96, 128))  # (H, W)
    found = readings[..., :2, 2]  # (1, 2, 4, 2)
    expected = torch.tensor([[[[-58.0, 3.0], [70.0, 3.0], [-58.0, -93.0], [70.0, -93.0]],
                              [[0.0, -40.0], [0.0, -40.0], [0.0, 56.0], [0.0, 56.0]]]], dtype=torch.float64)
    assert torch.equal(found, expected)  # a zero shift has no other reading: the first again


def test_other_readings_cost_nothing_below_a_quarter_of_the_image(monkeypatch):
    """Another reading of a shift below a quarter of the image overlaps by less than the quarter a
    score needs: none is warped nor scored (the initialiser runs on every register() call)."""
    scored = record_ncc_scores(monkeypatch)
    truth = similarity(0.0, 1.0, 0.2 * SIZE[1], -0.2 * SIZE[0])
    fixed, moving = cut_pair("camera", truth, SIZE)
    for kind, count in (("translation", 3), ("similarity", 5)):  # identity, phase (windowed, not), Fourier-Mellin x 2
        scored.clear()
        assert grid_error(initialize(fixed, moving, kind), truth, SIZE).item() < 0.5
        assert scored == [count], kind
    truth = similarity(0.0, 1.0, 70.0, 0.0, size=(128, 128))
    fixed, moving = cut_pair("coins", truth, (128, 128))
    scored.clear()
    initialize(fixed, moving, "translation")
    assert len(scored) == 2 and scored[1] > 0  # the readings of 70 px (-58 wrapped) are scored


def record_ncc_scores(monkeypatch) -> list:
    """How many matrices each call of ``_ncc_scores`` scores (pairs times candidates), as a list."""
    scored = []
    ncc_scores = init_module._ncc_scores

    def recording(fixed, moving, matrices, min_overlap, **options):
        scored.append(matrices.shape[0] * matrices.shape[1])
        return ncc_scores(fixed, moving, matrices, min_overlap, **options)

    monkeypatch.setattr(init_module, "_ncc_scores", recording)
    return scored


def test_a_pairs_other_readings_are_scored_for_it_alone(monkeypatch):
    """One pair of a batch shifted beyond half the image: its other readings are scored on its own
    images, not for every pair of the batch (32 unrelated pairs took 3x the time of b268dba~1)."""
    size = (128, 128)
    truths = [similarity(0.0, 1.0, 70.0, 0.0, size=size)] + [similarity(0.0, 1.0, 5.0 + k, -4.0, size=size)
                                                             for k in range(3)]
    pairs = [cut_pair("coins", truth, size) for truth in truths]
    fixed, moving = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    monkeypatch.setattr(init_module, "PAIR_CHUNKS", 1)  # the 4 pairs in one chunk
    scored = record_ncc_scores(monkeypatch)
    initialize(fixed[:1], moving[:1], "translation")
    alone = scored[1:]
    scored.clear()
    found = initialize(fixed, moving, "translation")
    assert scored == [4 * 3] + alone and alone[0] <= 3 * 3  # 3 translations; 3 other readings of each at most
    assert grid_error(found, torch.cat(truths), size).max().item() < 0.5


def test_a_pair_shifted_beyond_half_initialises_alone_as_in_a_batch():
    """A reading is scored where any pair of the batch needs it, and kept by its own pair's test."""
    pairs = [cut_pair("coins", similarity(0.0, 1.0, 70.0, 0.0, size=(128, 128)), (128, 128)),
             cut_pair("coins", similarity(20.0, 1.1, 5.0, -8.0, size=(128, 128)), (128, 128)),
             cut_pair("coins", similarity(0.0, 1.0, -3.0, 72.0, size=(128, 128)), (128, 128))]
    fixed, moving = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    for kind in ("translation", "similarity"):
        batch = initialize(fixed, moving, kind)
        alone = torch.cat([initialize(fixed[i : i + 1], moving[i : i + 1], kind) for i in range(3)])
        assert torch.allclose(batch, alone, atol=1e-3), (kind, (batch - alone).abs().max())


@pytest.mark.parametrize("kind", ["translation", "similarity"])
@pytest.mark.parametrize("shift", [(70.0, 0.0), (0.0, -70.0)])
def test_an_other_reading_is_scored_inside_the_masks(kind, shift):
    """A pair shifted beyond half the image, a 16 px frame of zeros (no-data) masked out on both sides:
    its right reading, the other one, scores about 0.99 inside the masks (and overlaps 27 % of the
    masked fixed image, a quarter being needed) but below AUTO_THRESHOLD with the no-data counted.
    Scored without the masks it was refused, and the start was 52-120 px off."""
    size, frame = (128, 128), 16
    truth = similarity(0.0, 1.0, *shift, size=size)
    fixed, moving = cut_pair("coins", truth, size)
    mask = torch.zeros_like(fixed)
    mask[..., frame:-frame, frame:-frame] = 1.0
    fixed, moving = fixed * mask, moving * mask
    score_fixed, score_moving = init_module._scoring_image(fixed, mask), init_module._scoring_image(moving, mask)
    reading = truth.float()[:, None]
    images = init_module.SCORE_IMAGES  # the channels before the mask
    unmasked = init_module._ncc_scores(score_fixed[:, :images], score_moving[:, :images], reading, init_module.MIN_OVERLAP)
    assert unmasked.item() < AUTO_THRESHOLD  # the masks decide: the no-data alone refuses the reading
    start, score = init_module._scored_initialize(fixed, moving, kind, fixed_mask=mask, moving_mask=mask)
    assert grid_error(start, truth, size).item() < 1.0 and score.item() > 0.95


# ----------------------------------------------------------------------------
# starts at about half overlap: scales between the search's; the other readings' rules


@pytest.mark.parametrize("name, size, params", [
    ("gravel", (96, 128), (6.0, 1.1, 56.3, 0.0)),
    ("immunohistochemistry", (96, 128), (10.0, 1.1, 51.2, 9.6)),
])
def test_a_scale_between_the_search_scales_is_found_at_half_overlap(name, size, params):
    # x1.1 lies 10 % from both coarse scales (1 and 1.25); with half the image overlapping its right
    # angle never reached the 4 that stage 2 refines, and the start was 13-98 px off.
    truth = similarity(*params, size=size)
    fixed, moving = cut_pair(name, truth, size)
    assert grid_error(initialize(fixed, moving, "similarity"), truth, size).item() < 2.0
    result = tireg.register(fixed, moving, transform="similarity")
    assert grid_error(result.matrix.reshape(-1, 3, 3), truth, size).item() < 0.1


def smooth_noise(size, seed, sigma=2.0):
    """``(1, 1, H, W)`` Gaussian noise blurred with ``sigma``, zero-mean, unit variance."""
    generator = torch.Generator().manual_seed(seed)
    image = tireg.sampling.gaussian_blur(torch.randn(1, 1, *size, generator=generator, dtype=torch.float64), sigma)
    return ((image - image.mean()) / image.std()).float()


def scoring_channels(image: torch.Tensor) -> torch.Tensor:
    """``image`` as a scoring image's channels (:func:`tireg.initialize._scoring_image`: as it is,
    and clipped) with both the image itself: the mean of their NCC is the image's NCC."""
    return image.repeat(1, init_module.SCORE_IMAGES, 1, 1)


def test_an_other_reading_needs_a_quarter_of_the_fixed_image():
    """An other reading overlapping 14 % of the fixed image is not kept, however well it scores: its
    overlap was counted on the moving footprint alone (a quarter of the fixed image zoomed 2x), and
    such a reading of a search candidate (1.48x, 12 % of the fixed image) outscored a right start
    (accuracy.py's contrast suite, affine channel #3: 0.3 -> 336 px)."""
    fixed = smooth_noise((64, 64), 0)
    zoomed = torch.tensor([[[2.0, 0.0, -80.0], [0.0, 2.0, -80.0], [0.0, 0.0, 1.0]]])  # overlap 24 x 24 px
    moving = tireg.warp(fixed, torch.linalg.inv(zoomed))  # moving(A x) = fixed(x)
    first = torch.eye(3)[None]
    readings = torch.stack([first, zoomed, first, first], dim=1)[:, None]  # (1, 1, 4, 3, 3)
    assert init_module._ncc_scores(fixed, moving, zoomed[:, None], init_module.MIN_OVERLAP, images=1).item() > 0.99
    matrix, score = init_module._best_readings(readings, *map(scoring_channels, (fixed, moving)))
    assert torch.equal(matrix[0, 0], first[0]) and score.item() < 0.8


def test_an_other_reading_is_kept_only_where_it_convinces():
    """An other reading replaces the wrapped one only where it scores AUTO_THRESHOLD or more: on an
    other-channel pair a translation's other reading (36 % overlap, 0.65) outscored a wrong start
    that register() recovered from (affine channel #10 with mi: 0.09 -> 192 px)."""
    fixed = smooth_noise((64, 64), 1)
    shifted = translation_matrix(torch.tensor([[24.0, 0.0]]))  # 62 % overlap
    generator = torch.Generator().manual_seed(2)
    moving = tireg.warp(fixed, torch.linalg.inv(shifted)) + 1.2 * torch.randn(1, 1, 64, 64, generator=generator)
    first = translation_matrix(torch.tensor([[-40.0, 0.0]]))  # the wrapped reading: 38 % overlap
    readings = torch.stack([first, shifted, first, first], dim=1)[:, None]
    other = init_module._ncc_scores(fixed, moving, shifted[:, None], init_module.MIN_OVERLAP, images=1).item()
    assert 0.3 < other < init_module.AUTO_THRESHOLD
    assert init_module._ncc_scores(fixed, moving, first[:, None], init_module.MIN_OVERLAP, images=1).item() < other
    matrix, _ = init_module._best_readings(readings, *map(scoring_channels, (fixed, moving)))
    assert torch.equal(matrix[0, 0], first[0])


def test_overlap_ncc_names_a_meta_matrix():
    image = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"overlap_ncc\(\): 'matrix' is a meta tensor, which holds no values"):
        overlap_ncc(image, image, torch.eye(3).to("meta"))


def clouded(moving: torch.Tensor, seed: int, cover: float = 0.2) -> torch.Tensor:
    """``moving`` under smooth bright clouds over ``cover`` of it, twice the image's range above its 99th percentile."""
    generator = torch.Generator().manual_seed(seed)
    field = tireg.sampling.gaussian_blur(torch.randn(moving.shape, generator=generator, dtype=torch.float64), 8.0)
    edge = ((field - field.flatten().quantile(1 - cover)) / (0.15 * field.std())).clamp(0, 1)
    cloud = edge * edge * (3 - 2 * edge)
    low, high = moving.flatten().quantile(0.01), moving.flatten().quantile(0.99)
    return (moving * (1 - cloud) + cloud * (2 * high - low)).float()


def test_a_bright_cloud_over_one_image_does_not_pick_the_start():
    """The candidates' scores are the mean of the NCC of the working images as they are and clipped to
    their robust range: a fifth of the moving image under bright cloud outweighed the scene in the NCC,
    and a wrong candidate won (28 px off here; register then ended there)."""
    truth = similarity(-30.0, 0.9, -10.0, 5.0)
    fixed, moving = cut_pair("camera", truth, SIZE)
    moving = clouded(moving, 1)
    assert grid_error(initialize(fixed, moving, "similarity"), truth, SIZE).item() < 4.0
    result = tireg.register(fixed, moving, transform="similarity", metric="mi")
    assert grid_error(result.matrix.reshape(-1, 3, 3), truth, SIZE).item() < 0.5


def test_clipped_scoring_images_keep_a_binary_image_and_count_the_mask_alone():
    def expected(values, image):  # median +- SCORE_CLIP robust deviations (1.4826 MAD) of values, in NumPy (the
        # lower of the middle two as the median, as torch's): the least and largest of image clipped there
        lower = lambda v: np.sort(v)[(len(v) - 1) // 2]  # noqa: E731
        median = lower(values)
        spread = 1.4826 * init_module.SCORE_CLIP * lower(np.abs(values - median))
        return max(median - spread, image.min()), min(median + spread, image.max())

    image = torch.linspace(0.0, 1.0, 64, dtype=torch.float64)[None, None].expand(2, 1, 64, 64).clone()
    image[0, ..., 54:] = 10.0  # a bright cloud over the last 10 columns
    image[1] = (image[1] > 0.7).double()  # more than half its pixels 0: MAD 0, kept as it is
    clipped = init_module._clipped(image, None)
    low, high = expected(image[0].flatten().numpy(), image[0].numpy())
    assert high < 2.0 and (clipped[0].min().item(), clipped[0].max().item()) == pytest.approx((low, high), abs=1e-12)
    kept = (image[0] >= low) & (image[0] <= high)
    assert torch.equal(clipped[0][kept], image[0][kept])
    assert torch.equal(clipped[1], image[1])
    mask = torch.zeros_like(image[:1])
    mask[..., :40] = 1.0  # the ramp's left part alone: the cloud outside counts for nothing
    inside = init_module._clipped(image[:1], mask)
    low, high = expected(image[0, 0, :, :40].flatten().numpy(), image[0].numpy())
    assert (inside.min().item(), inside.max().item()) == pytest.approx((low, high), abs=1e-12)


def resolution_pair(name, step_fixed, step_moving, size, angle_deg, shift):
    """One footprint of a bundled photograph at two resolutions: ``fixed`` ``size`` pixels sampled every
    ``step_fixed`` photograph pixels, ``moving`` every ``step_moving`` (each smoothed by 0.42 step first
    where the step is above 1), turned by ``angle_deg`` and shifted by ``shift`` photograph pixels about
    the photograph's middle; and the fixed -> moving pixel matrix ``(1, 3, 3)``."""
    scene = load(name, dtype=torch.float64)
    scene = (scene.mean(0, keepdim=True) if scene.dim() == 3 else scene[None])[None]
    middle = torch.tensor([(scene.shape[-1] - 1) / 2, (scene.shape[-2] - 1) / 2], dtype=torch.float64)

    def to_scene(step, height, width, turn):  # grid pixel -> photograph pixel
        centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
        zoom = torch.diag(torch.tensor([step, step, 1.0], dtype=torch.float64))
        turned = similarity_matrix(torch.tensor([[turn * DEGREE, 1.0, *shift]], dtype=torch.float64), middle)[0]
        return turned @ translation_matrix(middle) @ zoom @ translation_matrix(-centre)

    images = []
    for step, turn in ((step_fixed, 0.0), (step_moving, angle_deg)):
        height, width = round(size[0] * step_fixed / step), round(size[1] * step_fixed / step)
        grid = to_scene(step, height, width, turn)
        source = tireg.sampling.gaussian_blur(scene, 0.42 * step) if step > 1 else scene
        images.append((tireg.warp(source, grid[None], size=(height, width)).float(), grid))
    (fixed, to_fixed), (moving, to_moving) = images
    return fixed, moving, (torch.linalg.inv(to_moving) @ to_fixed)[None]


@pytest.mark.parametrize("name, step_fixed, step_moving", [
    ("coins", 1.0, 3.0), ("camera", 2.0, 1.0), ("astronaut", 1.0, 2.0)])
def test_one_footprint_at_two_resolutions_is_found(name, step_fixed, step_moving):
    """Landsat at 30 m against Sentinel-2 at 10 m (or 20 m against 10 m): pasted onto the fixed grid at its
    own pixel size, the moving image covered a ninth of it (or showed a quarter of itself), and the start
    was 30-100 px off, 7 of these 9 pairs ending there (a remote-sensing audit); the candidates with the
    images' extents met (_extent_candidates) start them within 3 px."""
    size = (90, 120) if step_fixed > 1 else (150, 210)
    fixed, moving, truth = resolution_pair(name, step_fixed, step_moving, size, 2.0, (3.0, -2.0))
    assert grid_error(initialize(fixed, moving, "similarity"), truth, size).item() < 4.0
    result = tireg.register(fixed, moving, transform="similarity")
    assert grid_error(result.matrix.reshape(-1, 3, 3), truth, size).item() < 0.05
