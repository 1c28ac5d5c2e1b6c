"""Sampling: the align_corners convention, warps against grid_sample, exact and
precomputed image gradients against autograd, padding extension, input checks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import smooth_random_image
from tireg.sampling import (
    downsample,
    extend,
    gaussian_blur,
    grid_moments,
    image_gradient,
    pixel_axes,
    pixel_grid,
    pixel_scale,
    sample,
    sample_with_gradient,
    sampler_gradient,
    sampling_grid,
    shrink_matrix,
    stack_with_gradient,
    warp,
    warp_gradient,
)
from tireg.transforms import affine_matrix, normalization_matrix, pixel_to_normalized, translation_matrix

PADDING_MODES = ["zeros", "border", "reflection"]
INTERPOLATIONS = ["bilinear", "bicubic"]
HEIGHT, WIDTH = 37, 53  # non-square on purpose


def random_image(generator, shape=(2, 3, HEIGHT, WIDTH), dtype=torch.float64):
    return torch.rand(*shape, generator=generator, dtype=dtype)


def random_affine(generator, batch=2, dtype=torch.float64):
    """Random pixel matrices near the identity about the image centre, ``(B, 3, 3)``."""
    noise = torch.rand(batch, 6, generator=generator, dtype=dtype) * 2 - 1
    params = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=dtype) + noise * torch.tensor(
        [0.2, 0.2, 0.2, 0.2, 4.0, 4.0], dtype=dtype
    )
    return affine_matrix(params, ((WIDTH - 1) / 2, (HEIGHT - 1) / 2))


def to_grid(points: torch.Tensor, moving_size) -> torch.Tensor:
    """Moving-image pixel points ``(..., 2)`` to ``grid_sample`` coordinates, through ``normalization_matrix``."""
    norm = normalization_matrix(moving_size, dtype=points.dtype, device=points.device)
    return points @ norm[:2, :2].T + norm[:2, 2]


def random_points(generator, batch=2, shape=(5, 6), size=(HEIGHT, WIDTH), margin=4.0, dtype=torch.float64):
    """Random points in moving pixels, ``(B, h, w, 2)``, reaching ``margin`` pixels outside the image."""
    height, width = size
    unit = torch.rand(batch, *shape, 2, generator=generator, dtype=dtype)
    x = unit[..., 0] * (width - 1 + 2 * margin) - margin
    y = unit[..., 1] * (height - 1 + 2 * margin) - margin
    return torch.stack([x, y], dim=-1)


def grid_sample(image, grid, interpolation, padding_mode):
    return F.grid_sample(image, grid, mode=interpolation, padding_mode=padding_mode, align_corners=False)


# ----------------------------------------------------------------------------
# grids


def test_pixel_grid_rows_are_x_y_one():
    height, width = 3, 4
    grid = pixel_grid((height, width), dtype=torch.float64)
    assert grid.shape == (height * width, 3)
    expected = torch.tensor(
        [[j, i, 1.0] for i in range(height) for j in range(width)], dtype=torch.float64
    )
    torch.testing.assert_close(grid, expected, rtol=0, atol=0)
    assert grid[1 * width + 2].tolist() == [2.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pixel_grid_dtype_and_device(dtype, device):
    grid = pixel_grid((2, 5), dtype=dtype, device=device)
    assert grid.dtype == dtype and grid.device.type == torch.device(device).type


def test_sampling_grid_equals_pixel_grid_times_theta(generator):
    fixed_size, moving_size = (9, 14), (HEIGHT, WIDTH)
    matrix = random_affine(generator)
    grid = sampling_grid(matrix, fixed_size, moving_size)
    assert grid.shape == (2, *fixed_size, 2)
    theta = pixel_to_normalized(matrix, moving_size)  # (B, 2, 3)
    expected = (pixel_grid(fixed_size, dtype=torch.float64) @ theta.transpose(-1, -2)).reshape(2, *fixed_size, 2)
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-14)


def test_sampling_grid_refuses_axes_of_another_grid(generator):
    """Cached axes of another size had made a grid of their size, silently ((1, 6, 7, 2) for a
    fixed size of (4, 5)); of another dtype, one of mixed precision."""
    matrix = random_affine(generator)
    axes = pixel_axes((4, 5), dtype=torch.float64)
    torch.testing.assert_close(sampling_grid(matrix, (4, 5), (9, 9), axes=axes), sampling_grid(matrix, (4, 5), (9, 9)),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("sampling_grid(): 'axes' have 6 rows and 7 columns but "
                                                   "'fixed_size' (4, 5) has 4 and 5")):
        sampling_grid(matrix, (4, 5), (9, 9), axes=pixel_axes((6, 7), dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("sampling_grid(): 'axes' (torch.float32, torch.float32) and "
                                                   "'matrix' (torch.float64) must have the same dtype")):
        sampling_grid(matrix, (4, 5), (9, 9), axes=pixel_axes((4, 5), dtype=torch.float32))
    with pytest.raises(ValueError, match=r"^sampling_grid\(\): 'axes' must be two 1-D tensors"):
        sampling_grid(matrix, (4, 5), (9, 9), axes=pixel_grid((4, 5), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_pairs_sampling_grid_does_not_depend_on_the_batch_around_it(dtype, device):
    """Bit for bit: a batched matrix product (the former baddbmm) took another kernel for a batch
    of one than for five on an Intel CPU with MKL, so chunks of pairs differed from the whole."""
    matrix = random_affine(torch.Generator().manual_seed(7), batch=5, dtype=dtype).to(device)
    for fixed_size in [(23, 31), (256, 256)]:
        whole = sampling_grid(matrix, fixed_size, (40, 50))
        for pairs in [slice(index, index + 1) for index in range(5)] + [slice(1, 4)]:
            assert torch.equal(sampling_grid(matrix[pairs], fixed_size, (40, 50)), whole[pairs]), pairs


# ----------------------------------------------------------------------------
# warp


@pytest.mark.parametrize("interpolation", INTERPOLATIONS + ["nearest"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_warp_returns_the_image(interpolation, padding_mode, dtype, device, generator):
    """The one ``align_corners`` convention: pixel centres map onto pixel centres (not bit-exact: roundoff)."""
    image = random_image(generator, dtype=dtype).to(device)
    out = warp(image, torch.eye(3, dtype=dtype, device=device), interpolation=interpolation, padding_mode=padding_mode)
    assert out.shape == image.shape and out.dtype == dtype and out.device == image.device
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, image, rtol=0, atol=tolerance)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_integer_translation_shifts_the_array(interpolation, padding_mode, generator):
    image = random_image(generator)
    matrix = translation_matrix(torch.tensor([3.0, -2.0], dtype=torch.float64))
    out = warp(image, matrix, interpolation=interpolation, padding_mode=padding_mode)
    # warped(x, y) = M(x + 3, y - 2): warped[i, j] = M[i - 2, j + 3]
    torch.testing.assert_close(out[..., 2:, : WIDTH - 3], image[..., : HEIGHT - 2, 3:], rtol=0, atol=1e-12)
    if padding_mode == "zeros":
        assert out[..., :2, :].abs().max() < 1e-12
        assert out[..., :, WIDTH - 3 :].abs().max() < 1e-12
    if padding_mode == "border":
        torch.testing.assert_close(out[..., 0, : WIDTH - 3], image[..., 0, 3:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_integer_translation_samples_the_extended_image(padding_mode, generator):
    """Outside values of ``warp`` are those that ``extend`` produces (same padding definition)."""
    image = random_image(generator, shape=(1, 2, 8, 11))
    out = warp(image, translation_matrix(torch.tensor([-2.0, -3.0], dtype=torch.float64)), padding_mode=padding_mode)
    extended = extend(image, 3, padding_mode)
    # warped[i, j] = M(j - 2, i - 3) = extended[i, j + 1]
    torch.testing.assert_close(out, extended[..., :8, 1:12], rtol=0, atol=1e-12)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS + ["nearest"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_warp_equals_grid_sample_with_affine_grid(interpolation, padding_mode, generator):
    image = random_image(generator)
    matrix = random_affine(generator)
    fixed_size = (23, 29)  # output grid differs from the moving image
    norm_moving = normalization_matrix((HEIGHT, WIDTH), dtype=torch.float64)
    norm_fixed = normalization_matrix(fixed_size, dtype=torch.float64)
    theta = (norm_moving @ matrix @ torch.linalg.inv(norm_fixed))[:, :2]
    reference_grid = F.affine_grid(theta, [2, 3, *fixed_size], align_corners=False)
    expected = grid_sample(image, reference_grid, interpolation, padding_mode)
    out = warp(image, matrix, size=fixed_size, interpolation=interpolation, padding_mode=padding_mode)
    assert out.shape == (2, 3, *fixed_size)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # not a trivial comparison: the transform moved the image
    assert (out - image[..., : fixed_size[0], : fixed_size[1]]).abs().max() > 0.1


def test_single_matrix_broadcasts_over_the_batch(generator):
    image = random_image(generator)
    matrix = random_affine(generator, batch=1)[0]  # (3, 3)
    out = warp(image, matrix)
    torch.testing.assert_close(out, warp(image, matrix.expand(2, 3, 3)), rtol=0, atol=0)
    torch.testing.assert_close(out, warp(image, matrix.unsqueeze(0)), rtol=0, atol=0)
    for b in range(2):
        torch.testing.assert_close(out[b : b + 1], warp(image[b : b + 1], matrix), rtol=0, atol=1e-14)


def test_single_image_broadcasts_over_matrices(generator):
    image = random_image(generator, shape=(1, 3, HEIGHT, WIDTH))
    matrices = random_affine(generator, batch=3)
    out = warp(image, matrices)
    assert out.shape == (3, 3, HEIGHT, WIDTH)
    for b in range(3):
        torch.testing.assert_close(out[b : b + 1], warp(image, matrices[b]), rtol=0, atol=1e-14)


def test_warp_takes_matrices_in_any_memory_layout(generator):
    # a (B, 3, 3) batch whose batch dimension is innermost in memory (a permuted or broadcast
    # copy): the sampling grid's view() failed with torch's "view size is not compatible"
    image = random_image(generator, shape=(4, 1, HEIGHT, WIDTH))
    matrices = random_affine(generator, batch=4)
    permuted = matrices.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert torch.equal(permuted, matrices) and not permuted.is_contiguous()
    torch.testing.assert_close(warp(image, permuted), warp(image, matrices), rtol=0, atol=0)


def test_warp_is_differentiable_in_the_matrix(generator):
    image = smooth_random_image((1, 1, 9, 12), generator)
    params = torch.tensor([1.05, 0.1, -0.05, 0.95, 0.3, -0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p: warp(image, affine_matrix(p, (5.5, 4.0)), padding_mode="border"), (params,), eps=1e-6, atol=1e-6
    )


# ----------------------------------------------------------------------------
# exact gradient of the sampled function


def autograd_point_gradient(moving, points, weight, interpolation, padding_mode):
    """``d/dp sum weight * M(p)`` by autograd, with ``p`` in moving pixels: ``(B, h, w, 2)``."""
    points = points.clone().requires_grad_(True)
    values = grid_sample(moving, to_grid(points, moving.shape[-2:]), interpolation, padding_mode)
    (gradient,) = torch.autograd.grad((values * weight).sum(), points)
    return gradient


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_warp_gradient_matches_autograd(interpolation, padding_mode, generator):
    moving = random_image(generator, shape=(2, 3, 11, 16))
    points = random_points(generator, size=(11, 16))  # some outside the image
    assert bool(((points[..., 0] < -0.5) | (points[..., 0] > 15.5)).any())
    weight = torch.randn(2, 3, *points.shape[1:3], generator=generator, dtype=torch.float64)
    grid = to_grid(points, (11, 16))
    gradient = warp_gradient(weight, moving, grid, interpolation=interpolation, padding_mode=padding_mode)
    expected = autograd_point_gradient(moving, points, weight, interpolation, padding_mode)
    assert gradient.shape == (2, *points.shape[1:3], 2)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_warp_gradient_matches_finite_differences(interpolation, padding_mode, generator):
    """Independent of the sampler's backward kernel: central differences in pixel units."""
    moving = random_image(generator, shape=(1, 2, 11, 16))
    points = random_points(generator, batch=1, size=(11, 16))
    weight = torch.randn(1, 2, *points.shape[1:3], generator=generator, dtype=torch.float64)
    gradient = warp_gradient(
        weight, moving, to_grid(points, (11, 16)), interpolation=interpolation, padding_mode=padding_mode
    )
    step = 1e-6
    for axis in range(2):
        delta = torch.zeros(2, dtype=torch.float64)
        delta[axis] = step
        plus = grid_sample(moving, to_grid(points + delta, (11, 16)), interpolation, padding_mode)
        minus = grid_sample(moving, to_grid(points - delta, (11, 16)), interpolation, padding_mode)
        numeric = ((plus - minus) * weight).sum(dim=1) / (2 * step)
        torch.testing.assert_close(gradient[..., axis], numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_sample_with_gradient_exact_matches_autograd(interpolation, padding_mode, generator):
    size = (11, 16)
    moving = random_image(generator, shape=(2, 3, *size))
    points = random_points(generator, size=size)
    grid = to_grid(points, size)
    values, gradients = sample_with_gradient(moving, grid, interpolation=interpolation, padding_mode=padding_mode)
    assert values.shape == (2, 3, 5, 6) and gradients.shape == (2, 3, 2, 5, 6)
    torch.testing.assert_close(values, grid_sample(moving, grid, interpolation, padding_mode), rtol=0, atol=0)
    for channel in range(3):
        weight = torch.zeros(2, 3, 5, 6, dtype=torch.float64)
        weight[:, channel] = 1.0
        expected = autograd_point_gradient(moving, points, weight, interpolation, padding_mode)  # (B, h, w, 2)
        torch.testing.assert_close(gradients[:, channel], expected.permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)

    assert gradients.is_contiguous()  # the products that use it read plain images


def test_sample_with_gradient_keeps_autograd(generator):
    """With a grid that requires grad, the gradients stay differentiable (out= takes no autograd)
    and equal the plain call's; their derivative by the points is the sampler's second derivative."""
    size = (9, 12)
    moving = random_image(generator, shape=(2, 3, *size))
    grid = to_grid(random_points(generator, size=size), size)
    _, plain = sample_with_gradient(moving, grid)
    tracked = grid.clone().requires_grad_()
    _, gradients = sample_with_gradient(moving, tracked, padding_mode="zeros")
    torch.testing.assert_close(gradients, plain, rtol=0, atol=0)
    (gradients * torch.randn(gradients.shape, generator=generator, dtype=gradients.dtype)).sum().backward()
    assert tracked.grad is not None and torch.isfinite(tracked.grad).all()


@pytest.mark.parametrize("method, sigma", [("central", 1.0), ("gaussian", 0.7)])
@pytest.mark.parametrize(
    "interpolation, tolerance",
    # Relative L2 difference, precomputed vs exact, inside the image.  Bilinear:
    # the exact gradient is a one-pixel difference, ~0.09 measured here.
    # Bicubic: PyTorch's cubic kernel (a = -0.75) does not reproduce a linear
    # ramp, so its exact derivative departs from the smooth one by up to 25%
    # between pixels, ~0.23 measured, however smooth the image.
    [("bilinear", 0.15), ("bicubic", 0.3)],
)
def test_precomputed_gradient_approximates_the_exact_one(method, sigma, interpolation, tolerance, generator):
    size = (24, 31)
    moving = smooth_random_image((2, 2, *size), generator, sigma=4.0)
    points = random_points(generator, shape=(6, 7), size=size, margin=-4.0)  # inside, 4 pixels from the edges
    grid = to_grid(points, size)
    gradient_images = image_gradient(moving, method=method, sigma=sigma, padding_mode="border")
    values, approximate = sample_with_gradient(
        moving, grid, interpolation=interpolation, padding_mode="border", gradient=gradient_images
    )
    exact_values, exact = sample_with_gradient(moving, grid, interpolation=interpolation, padding_mode="border")
    torch.testing.assert_close(values, exact_values, rtol=0, atol=1e-14)
    relative = ((approximate - exact).norm() / exact.norm()).item()
    assert relative < tolerance


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_precomputed_gradient_of_a_ramp_is_exact_inside(interpolation, padding_mode):
    a, b = 0.7, -1.3
    size = (12, 15)
    ys, xs = torch.meshgrid(torch.arange(12.0, dtype=torch.float64), torch.arange(15.0, dtype=torch.float64), indexing="ij")
    moving = (a * xs + b * ys + 2.0).expand(1, 1, *size).clone()
    points = torch.tensor([[[[4.3, 5.6], [7.75, 3.2], [10.1, 8.9]]]], dtype=torch.float64)
    gradient_images = image_gradient(moving, method="central", padding_mode=padding_mode)
    values, gradients = sample_with_gradient(
        moving, to_grid(points, size), interpolation=interpolation, padding_mode=padding_mode, gradient=gradient_images
    )
    torch.testing.assert_close(gradients[0, 0, 0], torch.full((1, 3), a, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(gradients[0, 0, 1], torch.full((1, 3), b, dtype=torch.float64), rtol=0, atol=1e-12)


def mapped_into_the_image(x: torch.Tensor, length: int, padding_mode: str) -> torch.Tensor:
    """The image's point that the padding reads at pixel coordinate ``x`` (mirrored about
    ``-0.5`` and ``length - 0.5``, period ``2 length``; clamped; itself)."""
    if padding_mode == "reflection":
        t = torch.remainder(x + 0.5, 2 * length)
        return torch.where(t < length, t, 2 * length - t) - 0.5
    return x.clamp(0, length - 1) if padding_mode == "border" else x


def ramp_sample_regions(x: torch.Tensor, length: int, interpolation: str, padding_mode: str):
    """Along one axis, ``(deep, flat)``: where a ramp's precomputed central difference should be
    its extended interpolant's derivative, the point mapping two pixels or more inside the image
    (the gradient images' edge pixels are half differences), and where the extended image is
    flat along the axis (zeros: all taps outside; border: outside, bicubic beyond -1 and W;
    reflection: the outer half pixel, bilinear), a little off the kinks."""
    mapped = mapped_into_the_image(x, length, "reflection" if padding_mode == "reflection" else "zeros")
    deep = (mapped >= 2) & (mapped <= length - 3)
    if padding_mode == "zeros":
        return deep, (x < -2 - 1e-3) | (x > length + 1 + 1e-3)
    if padding_mode == "border":
        low, high = (-1.0, length) if interpolation == "bicubic" else (0.0, length - 1.0)
        return deep, (x < low - 1e-3) | (x > high + 1e-3)
    if interpolation == "bilinear":
        return deep, (mapped < -1e-3) | (mapped > length - 1 + 1e-3)
    return deep, torch.zeros_like(deep)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_precomputed_gradient_outside_is_the_extended_images_derivative(interpolation, padding_mode, generator):
    """Outside the image a precomputed gradient is the derivative of the image as the padding
    extends it, by finite differences of the sampled image: mirrored with its sign flipped
    (reflection; the inside sign was kept), 0 along a clamped axis (border; the edge pixel's was
    repeated).  Points up to two and a half images out (mirrored several times), a ramp: inside
    its central difference is exact.  Bicubic's own kernel (a = -0.75) has 1.5 times a ramp's
    slope at the pixels (:func:`test_precomputed_gradient_approximates_the_exact_one`): to that
    tolerance where the image is not flat, below a sign's error (2 slopes)."""
    size = (12, 15)
    slopes = torch.tensor([[0.7, -1.3], [-1.4, 2.6]], dtype=torch.float64)  # [channel, axis]
    moving = ramp(0.7, -1.3, (1, 2, *size))
    moving[:, 1] *= -2.0
    height, width = size
    unit = torch.rand(1, 40, 40, 2, generator=generator, dtype=torch.float64)
    points = torch.stack([unit[..., 0] * 6 * width - 2.5 * width, unit[..., 1] * 6 * height - 2.5 * height], dim=-1)
    gradients = sample_with_gradient(moving, to_grid(points, size), interpolation=interpolation,
                                     padding_mode=padding_mode,
                                     gradient=image_gradient(moving, method="central", padding_mode=padding_mode))[1]
    step = 1e-5
    for axis, length in ((0, width), (1, height)):
        shift = torch.zeros(2, dtype=torch.float64)
        shift[axis] = step
        ahead, behind = (sample(moving, to_grid(points + sign * shift, size), interpolation=interpolation,
                                padding_mode=padding_mode) for sign in (1.0, -1.0))
        expected = (ahead - behind) / (2 * step)  # (1, 2, 40, 40)
        error = (gradients[:, :, axis] - expected).abs() / slopes[:, axis].abs()[None, :, None, None]
        deep, flat = ramp_sample_regions(points[..., axis], length, interpolation, padding_mode)
        if padding_mode == "zeros":  # the zero-padded gradient images vanish across the image too
            deep_across, flat_across = ramp_sample_regions(points[..., 1 - axis], size[axis], interpolation,
                                                           padding_mode)
            deep, flat = deep & deep_across, flat | flat_across
        assert deep.sum() > 10 and (padding_mode == "reflection" and interpolation == "bicubic" or flat.sum() > 50)
        if flat.any():
            assert float(error[flat.expand_as(error)].max()) < 1e-7, axis
        assert float(error[deep.expand_as(error)].max()) < (1e-6 if interpolation == "bilinear" else 0.55), axis


def reference_padding_slopes(grid: torch.Tensor, size, interpolation: str, padding_mode: str) -> torch.Tensor:
    """``_padding_slopes`` as 72e8dc2 first wrote it (``remainder``, ``where`` and bools on the
    ``(B, H, W, 2)`` grid, 3-5 times an analytic step's cost with reflection), as ``(2, B, H, W)``."""
    height, width = size
    lengths = torch.tensor((float(width), float(height)), dtype=grid.dtype)
    x = ((grid + 1.0) * lengths - 1.0) / 2.0
    cubic = interpolation == "bicubic"
    if padding_mode == "border":
        low, high = (-1.0, lengths) if cubic else (0.0, lengths - 1.0)
        slopes = ((x > low) & (x < high)).to(grid.dtype)
    else:
        shifted = x + 0.5
        flips = torch.floor(shifted.abs() / lengths)
        odd = torch.remainder(flips, 2.0) == 1.0
        slopes = torch.where((shifted < 0) != odd, -1.0, 1.0).to(grid.dtype)
        if not cubic:
            extra = torch.remainder(shifted.abs(), lengths)
            reflected = torch.where(odd, lengths - extra, extra) - 0.5
            slopes = slopes * ((reflected > 0.0) & (reflected < lengths - 1.0)).to(grid.dtype)
    return slopes.permute(3, 0, 1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(12, 15), (256, 256), (1, 5), (7, 1)])
def test_padding_slopes_are_the_reference_formulations_exactly(size, dtype):
    """The slopes take a few vectorised passes (floor and products for remainder, comparisons
    written as 0 or 1 for bools and where): the same values as the reference's, bit for bit,
    at random points up to 7 images out, on and one or two ulps around every whole and half pixel
    (where the slopes switch), at coordinates up to 2^22 pixels, and at NaN and infinities."""
    from tireg.sampling import _padding_slopes

    generator = torch.Generator().manual_seed(size[0] * size[1])
    height, width = size
    lengths = torch.tensor((float(width), float(height)), dtype=torch.float64)
    spread = (torch.rand(4000, 2, generator=generator, dtype=torch.float64) * 14 - 7) * lengths
    halves = torch.arange(-4.0 * max(size), 5.0 * max(size), 0.5, dtype=torch.float64)
    kinks = torch.stack([halves, halves.flip(0)], dim=-1)
    far = (torch.rand(2000, 2, generator=generator, dtype=torch.float64) * 2 - 1) * 2.0 ** torch.randint(
        0, 23, (2000, 2), generator=generator)
    grid = to_grid(torch.cat([spread, kinks, far]), size).to(dtype)
    up, down = torch.full_like(grid, math.inf), torch.full_like(grid, -math.inf)
    grid = torch.cat([grid, torch.nextafter(grid, up), torch.nextafter(torch.nextafter(grid, up), up),
                      torch.nextafter(grid, down)])
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
    grid = torch.cat([grid, torch.cartesian_prod(special, special)]).reshape(1, 1, -1, 2)
    for interpolation in ("bilinear", "bicubic", "nearest"):
        for padding_mode in ("border", "reflection"):
            expected = reference_padding_slopes(grid, size, interpolation, padding_mode)
            slopes = _padding_slopes(grid, size, interpolation, padding_mode)
            assert slopes.dtype == dtype and slopes.shape == expected.shape
            assert torch.equal(slopes, expected), (interpolation, padding_mode)


# ----------------------------------------------------------------------------
# image_gradient


def ramp(a, b, shape, dtype=torch.float64):
    height, width = shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij"
    )
    return (a * xs + b * ys + 0.5).expand(*shape).clone()


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_central_gradient_of_a_ramp(padding_mode):
    a, b = 0.7, -1.3
    image = ramp(a, b, (2, 2, 9, 12))
    gradient = image_gradient(image, method="central", padding_mode=padding_mode)
    assert gradient.shape == (2, 2, 2, 9, 12)
    inside = gradient[..., 1:-1, 1:-1]
    torch.testing.assert_close(inside[:, :, 0], torch.full_like(inside[:, :, 0], a), rtol=0, atol=1e-12)
    torch.testing.assert_close(inside[:, :, 1], torch.full_like(inside[:, :, 1], b), rtol=0, atol=1e-12)
    # at the left edge the padding decides: (M(1) - M(-1)) / 2
    left = gradient[:, :, 0, 3, 0]
    outside = {"zeros": 0.0, "border": image[0, 0, 3, 0].item(), "reflection": image[0, 0, 3, 0].item()}[padding_mode]
    expected = (image[0, 0, 3, 1].item() - outside) / 2
    torch.testing.assert_close(left, torch.full_like(left, expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.5])
def test_gaussian_gradient_of_a_ramp(sigma):
    a, b = -0.4, 2.2
    image = ramp(a, b, (1, 2, 20, 24))
    gradient = image_gradient(image, method="gaussian", sigma=sigma, padding_mode="zeros")
    radius = max(1, math.ceil(4 * sigma))
    inside = gradient[..., radius:-radius, radius:-radius]
    assert inside.numel() > 0
    torch.testing.assert_close(inside[:, :, 0], torch.full_like(inside[:, :, 0], a), rtol=0, atol=1e-12)
    torch.testing.assert_close(inside[:, :, 1], torch.full_like(inside[:, :, 1], b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, sigma", [(torch.float32, 0.05), (torch.float32, 0.06), (torch.float64, 0.01),
                                          (torch.float64, 1e-6)])
def test_gaussian_gradient_of_a_small_sigma_is_the_central_difference(dtype, sigma, generator):
    """Every tap off the centre underflows for a small sigma: the kernel was 0 / 0, NaN gradient
    images without a word; its limit is the central difference."""
    image = random_image(generator, shape=(1, 2, 9, 11), dtype=dtype)
    gaussian = image_gradient(image, method="gaussian", sigma=sigma, padding_mode="reflection")
    central = image_gradient(image, method="central", padding_mode="reflection")
    torch.testing.assert_close(gaussian, central, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_gaussian_gradient_is_continuous_towards_a_small_sigma(generator):
    """Between the limit and the usual sigmas the kernel is the normalised derivative of Gaussian
    itself: sigma 0.3 against the formula in float64, by hand."""
    image = random_image(generator, shape=(1, 1, 9, 11))
    sigma = 0.3
    offsets = torch.arange(-2.0, 3.0, dtype=torch.float64)
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    derivative, smoothing = offsets * g / (offsets * offsets * g).sum(), g / g.sum()
    padded = F.pad(image, (2, 2, 2, 2))
    expected = sum(derivative[k] * smoothing[m] * padded[..., m:m + 9, k:k + 11] for k in range(5) for m in range(5))
    gradient = image_gradient(image, method="gaussian", sigma=sigma, padding_mode="zeros")
    torch.testing.assert_close(gradient[:, :, 0], expected, rtol=0, atol=1e-14)


def test_gaussian_gradient_smooths(generator):
    """On noise, derivative of Gaussian is smaller than central differences (it is not the same filter)."""
    image = random_image(generator, shape=(1, 1, 20, 24))
    central = image_gradient(image, method="central")
    gaussian = image_gradient(image, method="gaussian", sigma=2.0)
    assert gaussian[..., 8:-8, 8:-8].abs().mean() < 0.5 * central[..., 8:-8, 8:-8].abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["central", "gaussian"])
def test_image_gradient_dtype_and_device(dtype, method, device, generator):
    image = random_image(generator, shape=(1, 2, 6, 7), dtype=dtype).to(device)
    gradient = image_gradient(image, method=method)
    assert gradient.dtype == dtype and gradient.device == image.device
    assert gradient.shape == (1, 2, 2, 6, 7)


# ----------------------------------------------------------------------------
# extend

NUMPY_MODES = {"zeros": "constant", "border": "edge", "reflection": "symmetric"}


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("pad", [2, 5])  # 5 > width: reflection repeats
def test_extend_matches_numpy_pad(padding_mode, pad):
    image = torch.arange(24, dtype=torch.float64).reshape(1, 2, 3, 4) + 1.0
    out = extend(image, pad, padding_mode)
    assert out.shape == (1, 2, 3 + 2 * pad, 4 + 2 * pad)
    expected = np.pad(image.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=NUMPY_MODES[padding_mode])
    np.testing.assert_array_equal(out.numpy(), expected)


def test_extend_reflection_mirrors_about_the_pixel_edge():
    image = torch.tensor([[[[10.0, 20.0, 30.0, 40.0]]]])
    row = extend(image, 2, "reflection")[0, 0, 2]  # the original row
    # M(-2), M(-1) | M(0) .. M(3) | M(4), M(5)
    assert row.tolist() == [20.0, 10.0, 10.0, 20.0, 30.0, 40.0, 40.0, 30.0]


def test_extend_border_and_zeros():
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    border = extend(image, 1, "border")[0, 0]
    assert border.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    zeros = extend(image, 1, "zeros")[0, 0]
    assert zeros.tolist() == [[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda image: extend(image, -1, "zeros"), ValueError, r"extend\(\): 'pad' must be a non-negative whole number; got -1"),
        (lambda image: extend(image, -1, "border"), ValueError, r"extend\(\): 'pad' .* got -1"),
        (lambda image: extend(image, 1.5, "border"), ValueError, r"extend\(\): 'pad' .* got 1.5"),
        (lambda image: extend(image, True, "zeros"), ValueError, r"extend\(\): 'pad'"),
        (lambda image: extend(image[0], 1, "zeros"), ValueError, r"extend\(\): 'image' must have 4 dimensions"),
        (lambda image: stack_with_gradient(image, torch.rand(1, 1, 8, 9, dtype=image.dtype)), ValueError,
         r"stack_with_gradient\(\): 'gradient' must have shape \(B, C, 2, Hm, Wm\) = \(1, 1, 2, 8, 9\)"),
        (lambda image: stack_with_gradient(image, image_gradient(image).float()), ValueError,
         r"stack_with_gradient\(\): 'gradient' \(torch.float32, cpu\) and 'moving'"),
        (lambda image: stack_with_gradient(image, None), TypeError, r"stack_with_gradient\(\): 'gradient' must be a torch.Tensor"),
        (lambda image: pixel_grid((-1, 3)), ValueError, r"pixel_grid\(\): 'size' must be \(H, W\), two positive whole numbers"),
        (lambda image: pixel_grid((2.5, 3)), ValueError, r"pixel_grid\(\): 'size'"),
        (lambda image: pixel_axes((0, 3)), ValueError, r"pixel_axes\(\): 'size'"),
    ],
)
def test_public_helpers_name_a_bad_argument(call, error, message):
    """A negative pad cropped the image without a word, and the rest failed with raw torch errors."""
    image = torch.rand(1, 1, 8, 9, dtype=torch.float64)
    with pytest.raises(error, match=message):
        call(image)


def test_extend_takes_a_whole_float_pad():
    image = torch.rand(1, 1, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(extend(image, 2.0, "reflection"), extend(image, 2, "reflection"), rtol=0, atol=0)
    assert extend(image, 0, "border").shape == image.shape


def test_extend_unknown_mode():
    with pytest.raises(ValueError, match="unknown padding mode 'wrap'"):
        extend(torch.zeros(1, 1, 2, 2), 1, "wrap")


# ----------------------------------------------------------------------------
# input checks


def _image(dtype=torch.float64):
    return torch.zeros(2, 1, 5, 7, dtype=dtype)


@pytest.mark.parametrize(
    "moving, matrix, kwargs, error, pattern",
    [
        (torch.zeros(5, 7), torch.eye(3), {}, ValueError, r"warp\(\): 'moving' must have 4 dimensions.*\(5, 7\)"),
        (torch.zeros(1, 5, 7), torch.eye(3), {}, ValueError, r"'moving' must have 4 dimensions"),
        (torch.zeros(1, 1, 1, 5, 7), torch.eye(3), {}, ValueError, r"'moving' must have 4 dimensions"),
        ([[1.0]], torch.eye(3), {}, TypeError, r"'moving' must be a torch.Tensor"),
        (torch.zeros(2, 1, 5, 7, dtype=torch.int64), torch.eye(3), {}, TypeError, r"'moving' must be float32 or float64"),
        (torch.zeros(2, 1, 0, 7), torch.eye(3), {}, ValueError, r"'moving' is empty"),
        (_image(torch.float32), torch.zeros(2, 3), {}, ValueError, r"'matrix' must have shape \(B, 3, 3\) or \(3, 3\)"),
        (_image(torch.float32), torch.zeros(4, 3, 2), {}, ValueError, r"'matrix' must have shape .*\(4, 3, 2\)"),
        (_image(torch.float32), torch.zeros(1, 2, 3, 3), {}, ValueError, r"'matrix' must have shape"),
        (_image(torch.float32), torch.eye(3).tolist(), {}, TypeError, r"'matrix' must be a torch.Tensor"),
        (_image(torch.float32), torch.eye(3, dtype=torch.int64), {}, TypeError, r"'matrix' must be float32 or float64"),
        (_image(torch.float32), torch.eye(3), {"padding_mode": "wrap"}, ValueError, r"warp\(\): unknown padding mode 'wrap'"),
        (_image(torch.float32), torch.eye(3), {"interpolation": "cubic"}, ValueError, r"unknown interpolation 'cubic'"),
        (_image(torch.float32), torch.eye(3).expand(3, 3, 3), {}, ValueError, r"3 matrices for 2 images"),
        (_image(torch.float32), torch.diag(torch.tensor([1.0, 1.0, 2.0])), {}, ValueError,
         r"'matrix' must be affine, with last row \(0, 0, 1\); got \[0.0, 0.0, 2.0\]"),
        (_image(torch.float32), torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), {},
         ValueError, r"^warp\(\): 'matrix' contains NaN or Inf$"),  # (it gave an image of NaN)
        (_image(torch.float32), torch.eye(3), {"size": (-5, 10)}, ValueError, r"'size' must be \(H, W\), two positive"),
        (_image(torch.float32), torch.eye(3), {"size": 5}, ValueError, r"'size' must be \(H, W\)"),
        (_image(torch.float32), torch.eye(3), {"size": torch.rand(3, 12, 15)}, ValueError,  # was printed whole
         r"^warp\(\): 'size' must be \(H, W\), two positive whole numbers; got a tensor of shape \(3, 12, 15\)$"),
    ],
    ids=[
        "2d-image",
        "3d-image",
        "5d-image",
        "list-image",
        "int-image",
        "empty-image",
        "matrix-2x3",
        "matrix-4x3x2",
        "matrix-4d",
        "list-matrix",
        "int-matrix",
        "padding",
        "interpolation",
        "batch-mismatch",
        "projective",
        "nan-matrix",
        "negative-size",
        "number-size",
        "image-size",
    ],
)
def test_warp_rejects(moving, matrix, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        warp(moving, matrix, **kwargs)


def test_warp_takes_a_matrix_of_the_other_float_dtype_in_the_images():
    """A float64 matrix (a RegistrationResult's) warps a float32 image as the same matrix in float32
    does, and a float32 one a float64 image; the gradient reaches the matrix as given (it had raised
    "must have the same dtype")."""
    generator = torch.Generator().manual_seed(3)
    image = smooth_random_image((2, 1, 24, 30), generator, dtype=torch.float32)
    matrix = random_affine(generator).requires_grad_()
    warped = warp(image, matrix, size=(20, 26))
    assert warped.dtype == torch.float32
    torch.testing.assert_close(warped, warp(image, matrix.detach().float(), size=(20, 26)), rtol=0, atol=0)
    warped.sum().backward()
    assert matrix.grad is not None and matrix.grad.dtype == torch.float64 and bool(matrix.grad.abs().sum() > 0)
    wide = warp(image.double(), matrix.detach().float(), size=(20, 26))
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, warp(image.double(), matrix.detach().float().double(), size=(20, 26)),
                               rtol=0, atol=0)


def test_warp_reports_the_matrix_shape_as_given():
    with pytest.raises(ValueError, match=r"got \(2, 3\)$"):
        warp(_image(torch.float32), torch.zeros(2, 3))


def test_warp_lists_the_options_when_rejecting():
    with pytest.raises(ValueError) as info:
        warp(_image(), torch.eye(3, dtype=torch.float64), padding_mode="wrap")
    for mode in PADDING_MODES:
        assert repr(mode) in str(info.value)


def test_sample_rejects_unknown_modes():
    grid = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"sample\(\): unknown interpolation"):
        sample(torch.zeros(1, 1, 3, 3), grid, interpolation="area")
    with pytest.raises(ValueError, match=r"sample\(\): unknown padding mode"):
        sample(torch.zeros(1, 1, 3, 3), grid, padding_mode="circular")


def test_warp_gradient_rejects_unknown_modes():
    with pytest.raises(ValueError, match=r"warp_gradient\(\): unknown padding mode"):
        warp_gradient(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 2, 2), padding_mode="wrap")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_image_gradient_rejects_non_finite_images(bad):
    image = torch.zeros(1, 1, 4, 5)
    image[0, 0, 2, 3] = bad
    with pytest.raises(ValueError, match=r"image_gradient\(\): 'image' contains NaN or Inf"):
        image_gradient(image)


def test_image_gradient_rejects_unknown_method():
    with pytest.raises(ValueError, match=r"image_gradient\(\): unknown gradient method 'sobel'"):
        image_gradient(torch.zeros(1, 1, 4, 5), method="sobel")


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_image_gradient_rejects_non_positive_sigma(sigma):
    with pytest.raises(ValueError, match=r"image_gradient\(\): 'sigma' must be (positive|finite)"):
        image_gradient(torch.zeros(1, 1, 4, 5), method="gaussian", sigma=sigma)


@pytest.mark.parametrize("shape", [(4, 5), (1, 4, 5)])
def test_image_gradient_rejects_wrong_dimensions(shape):
    with pytest.raises(ValueError, match=r"image_gradient\(\): 'image' must have 4 dimensions"):
        image_gradient(torch.zeros(*shape))


def test_gradient_functions_name_themselves_in_errors():
    image = torch.zeros(1, 1, 4, 5)
    with pytest.raises(ValueError, match=r"^image_gradient\(\): unknown padding mode 'wrap'"):
        image_gradient(image, padding_mode="wrap")
    with pytest.raises(ValueError, match=r"^sample_with_gradient\(\): unknown interpolation 'cubic'"):
        sample_with_gradient(image, torch.zeros(1, 2, 2, 2), interpolation="cubic")


@pytest.mark.parametrize("lengths", [(9, 9), (3, 7), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separable_correlation_equals_conv2d(lengths, dtype, device, generator):
    from tireg.sampling import _correlate_separable

    row_kernel = torch.randn(lengths[0], generator=generator, dtype=dtype).to(device)  # asymmetric
    column_kernel = torch.randn(lengths[1], generator=generator, dtype=dtype).to(device)
    extended = torch.randn(3, 1, 20 + lengths[1] - 1, 30 + lengths[0] - 1, generator=generator, dtype=dtype).to(device)
    result = _correlate_separable(extended, row_kernel, column_kernel)
    reference = F.conv2d(F.conv2d(extended, row_kernel.view(1, 1, 1, -1)), column_kernel.view(1, 1, -1, 1))
    assert result.shape == (3, 1, 20, 30)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(result, reference, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("padding_mode, numpy_mode", [("border", "edge"), ("reflection", "symmetric")])
def test_gaussian_blur_is_the_truncated_normalised_gaussian_sum(sigma, padding_mode, numpy_mode, generator):
    """``out(i, j) = sum_{|k|, |l| <= r} g_k g_l I(i + k, j + l)``, ``g_k ~ exp(-k^2 / 2 sigma^2)`` summing
    to 1, ``r = ceil(4 sigma)``, ``I`` extended by the padding mode (``scipy.ndimage.gaussian_filter``
    with ``truncate=4`` and mode ``nearest`` / ``reflect`` computes the same)."""
    from tireg.sampling import gaussian_blur

    image = torch.rand(2, 2, 40, 50, generator=generator, dtype=torch.float64)
    blurred = gaussian_blur(image, sigma, padding_mode=padding_mode).numpy()
    radius = math.ceil(4 * sigma)
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights /= weights.sum()
    padded = np.pad(image.numpy(), ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode=numpy_mode)
    reference = np.zeros_like(blurred)
    for k, row_weight in enumerate(weights):
        for m, column_weight in enumerate(weights):
            reference += row_weight * column_weight * padded[..., k : k + 40, m : m + 50]
    assert np.abs(blurred - reference).max() < 1e-12


def test_blur_and_gaussian_gradient_stay_differentiable(generator):
    """The in-place sums of the CPU filters must keep autograd's gradient right."""
    from tireg.sampling import gaussian_blur

    image = torch.rand(1, 1, 9, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 1.0), (image,))
    assert torch.autograd.gradcheck(lambda t: image_gradient(t, method="gaussian", sigma=1.0), (image,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_by_a_sum_agrees_with_the_elementwise_test(dtype):
    """The sum shortcut: any NaN or +-Inf (also both infinities, whose sum is NaN) is found, and
    finite values whose sum overflows are still finite."""
    import tireg
    from tireg._validation import all_finite

    image = torch.rand(3, 2, 17, 19, dtype=dtype)
    assert all_finite(image)
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        broken = image.clone()
        broken.view(-1)[torch.tensor([5, 700][: len(bad)])] = torch.tensor(bad, dtype=dtype)
        assert not all_finite(broken) and not bool(torch.isfinite(broken).all())
    huge = torch.full((4, 1, 8, 8), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not bool(torch.isfinite(huge.sum())) and all_finite(huge)
    with pytest.raises(ValueError, match=r"register\(\): 'fixed' contains NaN or Inf"):
        tireg.register(torch.where(image[:1, :1] > 0.5, image[:1, :1], torch.tensor(float("inf"), dtype=dtype)),
                       image[:1, :1])


def _moments_per_pixel(values: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, second_order: bool) -> torch.Tensor:
    """Reference: a per-pixel coordinate array, ``(B, K, H, W)`` values -> ``(B, K, 3 or 6)``."""
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    monomials = [x, y, torch.ones_like(x)]
    if second_order:
        monomials = [x * x, x * y, y * y] + monomials
    return torch.stack([(values * m).sum(dim=(-2, -1)) for m in monomials], dim=-1)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_grid_moments_equal_the_per_pixel_sums(second_order, channels, channel_dim, generator):
    """Both layouts, both orders, one and several channels, axes that start anywhere (a band's rows)."""
    values = torch.randn(2, channels, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    ys = torch.arange(HEIGHT, dtype=torch.float64) + 11.0  # rows 11.. of a taller image
    xs = torch.arange(WIDTH, dtype=torch.float64) - 3.5
    expected = _moments_per_pixel(values, ys, xs, second_order)
    laid_out = values if channel_dim == 1 else values.permute(0, 2, 3, 1).contiguous()
    moments = grid_moments(laid_out, (ys, xs), channel_dim=channel_dim, second_order=second_order)
    assert moments.shape == (2, channels, 6 if second_order else 3)
    torch.testing.assert_close(moments, expected, rtol=1e-12, atol=1e-9)


def test_grid_moments_follow_axes_changed_in_place(generator):
    """The axes' power tables are kept per tensor: changing the tensor in place must not reuse stale ones."""
    values = torch.randn(1, 2, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    ys, xs = pixel_axes((HEIGHT, WIDTH), dtype=torch.float64)
    before = grid_moments(values, (ys, xs), channel_dim=1, second_order=True)
    torch.testing.assert_close(before, _moments_per_pixel(values, ys, xs, True))
    xs.add_(2.0)
    ys.mul_(0.5)
    after = grid_moments(values, (ys, xs), channel_dim=1, second_order=True)
    torch.testing.assert_close(after, _moments_per_pixel(values, ys, xs, True))
    assert not torch.allclose(after, before)


def test_grid_moments_keep_one_table_for_every_view_of_the_same_rows(generator):
    """A band's axis ``ys[rows]`` is a new view in every call: its power table is found again
    (the cache does not grow with the calls), and it is the band's own."""
    from tireg import _device

    values = torch.randn(1, 1, 12, WIDTH, generator=generator, dtype=torch.float64)
    ys, xs = pixel_axes((HEIGHT, WIDTH), dtype=torch.float64)
    grid_moments(values, (ys[5:17], xs), channel_dim=1, second_order=True)
    entries = len(_device._cache)
    for _ in range(5):
        moments = grid_moments(values, (ys[5:17], xs), channel_dim=1, second_order=True)
    assert len(_device._cache) == entries
    torch.testing.assert_close(moments, _moments_per_pixel(values, ys[5:17], xs, True))
    other = grid_moments(values, (ys[10:22], xs), channel_dim=1, second_order=True)  # other rows
    torch.testing.assert_close(other, _moments_per_pixel(values, ys[10:22], xs, True))


def test_grid_moments_take_inference_mode_axes(generator):
    """Axes made under ``torch.inference_mode`` (no version counter) work inside and outside it."""
    values = torch.randn(2, HEIGHT, WIDTH, 2, generator=generator, dtype=torch.float64)
    with torch.inference_mode():
        axes = pixel_axes((HEIGHT, WIDTH), dtype=torch.float64)
        inside = grid_moments(values, axes)
    outside = grid_moments(values, axes)
    expected = _moments_per_pixel(values.movedim(-1, 1), *axes, second_order=False)
    torch.testing.assert_close(inside, expected)
    torch.testing.assert_close(outside, expected)


# ----------------------------------------------------------------------------
# audit: shapes checked before the kernels, named errors


def _gradient_case():
    moving = torch.rand(2, 1, 16, 20, generator=torch.Generator().manual_seed(0))
    grid = sampling_grid(torch.eye(3).expand(2, 3, 3), (16, 20), (16, 20))
    return moving, grid


@pytest.mark.parametrize("function", [warp_gradient, sampler_gradient])
@pytest.mark.parametrize("shape", [(1, 1, 16, 20), (2, 1, 5, 5), (2, 3, 16, 20), (2, 1, 16, 1), (3, 1, 16, 20),
                                   (16, 20)])
def test_warp_gradient_rejects_a_weight_of_another_shape(function, shape):
    """The sampler's backward kernel reads the weight as (B, C, H, W) whatever its shape: a smaller one
    gave garbage, inf or NaN read from outside it, a larger one was silently cut."""
    moving, grid = _gradient_case()
    name = function.__name__
    with pytest.raises(ValueError, match=rf"^{name}\(\): 'weight' must have shape \(B, C, H, W\) = \(2, 1, 16, 20\)"):
        function(torch.ones(shape), moving, grid)


@pytest.mark.parametrize(
    "weight, moving, grid, error, pattern",
    [
        (np.ones((2, 1, 16, 20)), None, None, TypeError, r"'weight' must be a torch.Tensor"),
        (torch.ones(2, 1, 16, 20, dtype=torch.float64), None, None, ValueError,
         r"'weight' \(torch.float64.*same dtype"),
        (None, torch.rand(1, 16, 20), None, ValueError, r"'moving' must have 4 dimensions"),
        (None, torch.ones(2, 1, 16, 20, dtype=torch.int64), None, TypeError, r"'moving' must be float32 or float64"),
        (None, None, torch.zeros(16, 20, 2), ValueError, r"'grid' must be \(B, H, W, 2\) with B = 2"),
        (None, None, torch.zeros(2, 16, 20, 3), ValueError, r"'grid' must be \(B, H, W, 2\)"),
        (None, None, torch.zeros(3, 16, 20, 2), ValueError, r"'grid' must be \(B, H, W, 2\) with B = 2"),
        (None, None, torch.zeros(2, 16, 20, 2, dtype=torch.float64), ValueError, r"'grid' \(torch.float64.*same dtype"),
    ],
    ids=["numpy-weight", "weight-dtype", "3d-moving", "int-moving", "3d-grid", "grid-last-3", "grid-batch",
         "grid-dtype"],
)
def test_warp_gradient_rejects(weight, moving, grid, error, pattern):
    good_moving, good_grid = _gradient_case()
    weight = torch.ones(2, 1, 16, 20) if weight is None else weight
    with pytest.raises(error, match=r"^warp_gradient\(\): " + pattern):
        warp_gradient(weight, good_moving if moving is None else moving, good_grid if grid is None else grid)


@pytest.mark.parametrize(
    "moving, grid, gradient, error, pattern",
    [
        (torch.rand(1, 16, 20), None, None, ValueError, r"'moving' must have 4 dimensions"),
        (torch.ones(2, 1, 16, 20, dtype=torch.int64), None, None, TypeError, r"'moving' must be float32 or float64"),
        (None, torch.zeros(2, 16, 20, 3), None, ValueError, r"'grid' must be \(B, H, W, 2\)"),
        (None, torch.zeros(3, 16, 20, 2), None, ValueError, r"'grid' must be \(B, H, W, 2\) with B = 2"),
        (None, torch.zeros(2, 16, 20, 2, dtype=torch.float64), None, ValueError, r"'grid' \(torch.float64.*same dtype"),
        (None, None, torch.zeros(2, 1, 16, 20), ValueError,
         r"'gradient' must have shape \(B, C, 2, Hm, Wm\) = \(2, 1, 2, 16, 20\)"),
        (None, None, torch.zeros(2, 1, 2, 8, 10), ValueError, r"'gradient' must have shape"),
        (None, None, torch.zeros(2, 1, 2, 16, 20, dtype=torch.float64), ValueError, r"'gradient' \(torch.float64"),
        (None, None, np.zeros((2, 1, 2, 16, 20)), TypeError, r"'gradient' must be a torch.Tensor"),
    ],
    ids=["3d-moving", "int-moving", "grid-last-3", "grid-batch", "mixed-dtypes", "gradient-4d", "gradient-size",
         "gradient-dtype", "gradient-numpy"],
)
def test_sample_with_gradient_rejects(moving, grid, gradient, error, pattern):
    good_moving, good_grid = _gradient_case()
    with pytest.raises(error, match=r"^sample_with_gradient\(\): " + pattern):
        sample_with_gradient(good_moving if moving is None else moving, good_grid if grid is None else grid,
                             gradient=gradient)


def test_sampling_checks_read_no_value():
    """The functions a registration calls every evaluation check shapes only: they run on meta
    tensors, which have no values to read (a read waits for a GPU)."""
    meta = dict(device="meta")
    moving, grid = torch.empty(2, 1, 16, 20, **meta), torch.empty(2, 16, 20, 2, **meta)
    weight = torch.empty(2, 1, 16, 20, **meta)
    assert warp_gradient(weight, moving, grid).shape == (2, 16, 20, 2)
    assert sampler_gradient(weight, moving, grid).shape == (2, 16, 20, 2)
    assert sample_with_gradient(moving, grid)[1].shape == (2, 1, 2, 16, 20)
    assert sample_with_gradient(moving, grid, gradient=torch.empty(2, 1, 2, 16, 20, **meta))[1].shape == (
        2, 1, 2, 16, 20)
    assert grid_moments(torch.empty(2, 16, 20, 2, **meta), pixel_axes((16, 20), **meta)).shape == (2, 2, 3)
    assert gaussian_blur(moving, 1.0).shape == moving.shape
    assert downsample(moving, 2).shape == (2, 1, 8, 10)


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: gaussian_blur(torch.rand(16, 20), 1.0), ValueError, r"^gaussian_blur\(\): 'image' must have 4 dim"),
        (lambda: gaussian_blur(torch.rand(1, 16, 20), 1.0), ValueError, r"^gaussian_blur\(\): 'image' must have 4"),
        (lambda: gaussian_blur(torch.rand(1, 1, 0, 5), 1.0), ValueError, r"^gaussian_blur\(\): 'image' is empty"),
        (lambda: gaussian_blur(np.zeros((1, 1, 4, 4)), 1.0), TypeError, r"^gaussian_blur\(\): 'image' must be a torch"),
        (lambda: gaussian_blur(torch.rand(1, 1, 4, 4), float("nan")), ValueError,
         r"^gaussian_blur\(\): 'sigma' must be finite"),
        (lambda: gaussian_blur(torch.rand(1, 1, 4, 4), float("inf")), ValueError, r"'sigma' must be finite"),
        (lambda: gaussian_blur(torch.rand(1, 1, 4, 4), "1"), TypeError,
         r"^gaussian_blur\(\): 'sigma' must be a number"),
        (lambda: gaussian_blur(torch.rand(1, 1, 4, 4), None), TypeError, r"'sigma' must be a number; got NoneType"),
        (lambda: gaussian_blur(torch.rand(1, 1, 4, 4), 1.0, padding_mode="wrap"), ValueError,
         r"^gaussian_blur\(\): unknown padding mode 'wrap'"),
        (lambda: downsample(torch.rand(1, 1, 4, 4), 0), ValueError,
         r"^downsample\(\): 'factor' must be a positive whole number; got 0"),
        (lambda: downsample(torch.rand(1, 1, 4, 4), -2), ValueError, r"'factor' must be a positive whole number"),
        (lambda: downsample(torch.rand(1, 1, 4, 4), 2.5), ValueError, r"'factor' must be a positive whole number"),
        (lambda: downsample(torch.rand(1, 1, 4, 4), True), ValueError, r"'factor' must be a positive whole number"),
        (lambda: downsample(torch.rand(1, 1, 4, 4), "2"), ValueError, r"'factor' must be a positive whole number"),
        (lambda: downsample(torch.rand(1, 1, 16, 20), 17), ValueError,
         r"^downsample\(\): 'factor' 17 is larger than the image \(16, 20\)"),
        (lambda: downsample(torch.rand(16, 20), 2), ValueError, r"^downsample\(\): 'image' must have 4 dimensions"),
        (lambda: downsample(np.zeros((1, 1, 4, 4)), 2), TypeError, r"^downsample\(\): 'image' must be a torch.Tensor"),
        (lambda: shrink_matrix(0), ValueError, r"^shrink_matrix\(\): 'factor' must be a positive whole number"),
        (lambda: shrink_matrix(1.5), ValueError, r"^shrink_matrix\(\): 'factor' must be a positive whole number"),
        (lambda: grid_moments(torch.rand(16, 20, 2), pixel_axes((16, 20))), ValueError,
         r"^grid_moments\(\): 'values' must have 4 dimensions"),
        (lambda: grid_moments(torch.rand(1, 16, 20, 2), pixel_axes((10, 20))), ValueError,
         r"^grid_moments\(\): 'axes' have 10 rows and 20 columns"),
        (lambda: grid_moments(torch.rand(1, 2, 16, 20), pixel_axes((16, 20)), channel_dim=0), ValueError,
         r"^grid_moments\(\): 'channel_dim' must be 1 \(B, K, H, W\) or -1 \(B, H, W, K\); got 0"),
        (lambda: grid_moments(torch.rand(1, 16, 2, 20), pixel_axes((16, 20)), channel_dim=2), ValueError,
         r"'channel_dim' must be 1"),
        (lambda: grid_moments(torch.rand(1, 16, 20, 2, dtype=torch.float64), pixel_axes((16, 20))), ValueError,
         r"^grid_moments\(\): 'axes' \(torch.float32, torch.float32\) and 'values' \(torch.float64\)"),
        (lambda: grid_moments(torch.rand(1, 16, 20, 2), torch.arange(16.0)), ValueError,
         r"^grid_moments\(\): 'axes' must be two 1-D tensors"),
        (lambda: grid_moments(torch.ones(1, 16, 20, 2, dtype=torch.long), (torch.arange(16), torch.arange(20))),
         TypeError, r"^grid_moments\(\): 'values' must be a float tensor"),
        (lambda: image_gradient(torch.rand(1, 1, 4, 5), method="gaussian", sigma="1"), TypeError,
         r"^image_gradient\(\): 'sigma' must be a number"),
        (lambda: image_gradient(torch.rand(1, 1, 4, 5), method="gaussian", sigma=None), TypeError,
         r"^image_gradient\(\): 'sigma' must be a number"),
        (lambda: image_gradient(torch.rand(1, 1, 4, 5), method="gaussian", sigma=float("inf")), ValueError,
         r"^image_gradient\(\): 'sigma' must be finite"),
        (lambda: warp(torch.rand(1, 1, 4, 5), torch.zeros(0, 3, 3)), ValueError,
         r"^warp\(\): 'matrix' holds no matrix; got shape \(0, 3, 3\)"),
    ],
    ids=["blur-2d", "blur-3d", "blur-empty", "blur-numpy", "blur-sigma-nan", "blur-sigma-inf", "blur-sigma-str",
         "blur-sigma-none", "blur-padding", "down-0", "down-negative", "down-2.5", "down-true", "down-str",
         "down-too-large", "down-2d", "down-numpy", "shrink-0", "shrink-1.5", "moments-3d", "moments-axes",
         "moments-channel-0", "moments-channel-2", "moments-dtypes", "moments-one-axis", "moments-int",
         "gradient-sigma-str", "gradient-sigma-none", "gradient-sigma-inf", "warp-empty-matrix-batch"],
)
def test_sampling_functions_reject(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_downsample_takes_whole_numbers_of_any_type():
    image = torch.rand(1, 2, 9, 12, generator=torch.Generator().manual_seed(1))
    expected = downsample(image, 2)
    assert expected.shape == (1, 2, 4, 6)
    for factor in (2.0, np.int64(2), np.float32(2.0), torch.tensor(2)):
        assert torch.equal(downsample(image, factor), expected)
        assert torch.equal(shrink_matrix(factor), shrink_matrix(2))
    assert downsample(image, 1) is image and downsample(image, 9).shape == (1, 2, 1, 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16, "float64"])
def test_shrink_matrix_refuses_a_dtype_tireg_does_not_compute_in(dtype):
    """An integer dtype truncated the (f - 1) / 2 offsets (0.5 for f = 2) to 0 without a word,
    as normalization_matrix's entries were before it checked its dtype."""
    with pytest.raises(TypeError, match=r"^shrink_matrix\(\): 'dtype' must be torch.float32 or torch.float64; got "):
        shrink_matrix(2, dtype=dtype)
    for good in (torch.float32, torch.float64):
        assert shrink_matrix(2, dtype=good)[0, 2] == 0.5 and shrink_matrix(2, dtype=good).dtype == good


def test_gaussian_blur_takes_any_real_sigma():
    image = torch.rand(1, 1, 9, 12, generator=torch.Generator().manual_seed(2))
    expected = gaussian_blur(image, 1.5)
    for sigma in (np.float64(1.5), torch.tensor(1.5)):
        assert torch.equal(gaussian_blur(image, sigma), expected)
    assert gaussian_blur(image, 0) is image and gaussian_blur(image, -1.0) is image


def test_central_image_gradient_ignores_sigma():
    """Central differences do not use sigma: sigma=0 (or any value) is not an error there."""
    image = torch.rand(1, 1, 9, 12, generator=torch.Generator().manual_seed(3))
    expected = image_gradient(image)
    for sigma in (0, -1.0, None, "x"):
        assert torch.equal(image_gradient(image, method="central", sigma=sigma), expected)


@pytest.mark.parametrize("first, last", [(1, -1), (-3, 3)])
def test_grid_moments_name_a_layout_by_either_index(first, last, generator):
    values = torch.rand(2, 3, 7, 9, generator=generator, dtype=torch.float64)
    axes = pixel_axes((7, 9), dtype=torch.float64)
    expected = grid_moments(values, axes, channel_dim=1)
    assert torch.allclose(grid_moments(values, axes, channel_dim=first), expected)
    assert torch.allclose(grid_moments(values.permute(0, 2, 3, 1).contiguous(), axes, channel_dim=last), expected)


def test_grid_moments_points_to_the_layout_that_fits(generator):
    """(B, K, H, W) values with the default channel_dim=-1 were reported as mismatched axes only."""
    values = torch.rand(2, 5, 12, 16, generator=generator)
    with pytest.raises(ValueError, match=r"has 5 and 12; as \(B, K, H, W\) they match: pass channel_dim=1$"):
        grid_moments(values, pixel_axes((12, 16)))
    with pytest.raises(ValueError, match=r"has 5 and 12$"):  # no layout fits: no hint
        grid_moments(values, pixel_axes((11, 16)))


def test_checks_that_read_values_still_run_under_torch_func_grad():
    """Skipped for every torch.func transform, grad let a projective matrix through; only vmap
    (which cannot read values) skips them."""
    image = torch.rand(1, 1, 16, 16)
    projective = torch.eye(3)
    projective[2, 0] = 0.01

    def warped_sum(shift):
        matrix = projective.clone()
        matrix[0, 2] = shift
        return warp(image, matrix).sum()

    with pytest.raises(ValueError, match="must be affine"):
        torch.func.grad(warped_sum)(torch.tensor(0.3))


@pytest.mark.parametrize("sigma, band", [(1.0, 64), (1.0, 5), (2.5, 7), (0.6, 1)])
def test_gaussian_blur_in_place_equals_the_blur(sigma, band):
    # register smooths its own normalised copies in themselves, band by band (an image-sized copy less)
    from tireg.sampling import gaussian_blur, gaussian_blur_in_place

    image = torch.rand(2, 3, 37, 29, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = gaussian_blur(image, sigma)
    target = image.clone()
    assert gaussian_blur_in_place(target, sigma, band=band) is target
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_blur_in_place_of_a_view():
    # a view into a larger tensor (the moving image inside the fused path's padded copy) is smoothed
    # in itself; what lies around it is left as it was
    from tireg.sampling import gaussian_blur, gaussian_blur_in_place

    outer = torch.rand(2, 1, 30, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    original = outer.clone()
    view = outer[..., 3:25, 5:33:2]  # strided too
    expected = gaussian_blur(view.clone(), 1.3)
    gaussian_blur_in_place(view, 1.3, band=4)
    torch.testing.assert_close(outer[..., 3:25, 5:33:2], expected, rtol=1e-12, atol=1e-12)
    untouched = torch.ones_like(outer, dtype=torch.bool)
    untouched[..., 3:25, 5:33:2] = False
    assert torch.equal(outer[untouched], original[untouched])


def test_sample_sampling_grid_and_pixel_to_normalized_name_what_does_not_fit():
    """A grid of three coordinates, of another batch or dtype failed inside grid_sample; a (3, 3)
    matrix in sampling_grid and a (2, 2) one in pixel_to_normalized in a broadcast ("the size of
    tensor a must match"); an int64 matrix gave an int64 grid."""
    image = torch.rand(1, 1, 8, 8)
    for grid, message in [(torch.zeros(1, 4, 4, 3), r"'grid' must be \(B, H, W, 2\) with B = 1"),
                          (torch.zeros(2, 4, 4, 2), r"'grid' must be \(B, H, W, 2\) with B = 1"),
                          (torch.zeros(1, 4, 4, 2, dtype=torch.float64), r"'grid' .*float64.*'image'")]:
        with pytest.raises((TypeError, ValueError), match=rf"^sample\(\): {message}"):
            sample(image, grid)
    with pytest.raises(ValueError, match=r"^sample\(\): 'image' must"):
        sample(image[0], torch.zeros(1, 4, 4, 2))
    # what grid_sample takes stays taken: half precision, a volume and its (B, D, H, W, 3) grid
    assert sample(image.half(), torch.zeros(1, 4, 4, 2).half()).dtype == torch.float16
    assert sample(torch.rand(1, 1, 3, 4, 5), torch.zeros(1, 2, 2, 2, 3)).shape == (1, 1, 2, 2, 2)
    assert sampling_grid(torch.eye(3).half(), (4, 5), (8, 8)).dtype == torch.float16
    assert pixel_to_normalized(torch.eye(3, dtype=torch.bfloat16), (4, 4)).dtype == torch.bfloat16
    grid = sampling_grid(torch.eye(3), (4, 5), (8, 8))  # one matrix: a batch of one
    assert grid.shape == (1, 4, 5, 2) and grid.dtype == torch.float32
    torch.testing.assert_close(grid, sampling_grid(torch.eye(3)[None], (4, 5), (8, 8)), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"^sampling_grid\(\): 'matrix' must be a float tensor; got torch.int64"):
        sampling_grid(torch.eye(3, dtype=torch.int64), (4, 5), (8, 8))
    with pytest.raises(ValueError, match=r"^sampling_grid\(\): 'fixed_size' must be \(H, W\)"):
        sampling_grid(torch.eye(3), 4, (8, 8))
    with pytest.raises(ValueError, match=r"^pixel_to_normalized\(\): 'matrix' must have shape \(\.\.\., 3, 3\); "
                                         r"got \(2, 2\)"):
        pixel_to_normalized(torch.eye(2), (4, 4))


def test_a_gaussian_wider_than_the_image_is_refused():
    """Its kernel, 8 sigma long, padded the image by 4 sigma a side: sigma 1e5 asked for 2.5 TB."""
    image = torch.rand(1, 1, 16, 12)
    with pytest.raises(ValueError, match=r"^gaussian_blur\(\): 'sigma' 100000 px is wider than the 16 x 12 image; "
                                         r"give at most 64$"):
        gaussian_blur(image, 1e5)
    with pytest.raises(ValueError, match=r"^image_gradient\(\): 'sigma' 65 px is wider than the 16 x 12 image"):
        image_gradient(image, method="gaussian", sigma=65)
    assert gaussian_blur(image, 64).shape == image.shape and gaussian_blur(image[..., :4, :4], 5).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_image_is_refused_naming_the_argument(layout):
    """A sparse image failed inside grid_sample in torch's words ("Could not run 'aten::grid_sampler_2d'
    with arguments from the 'SparseCPU' backend")."""
    image = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    sparse = image.to_sparse() if layout == "coo" else image[0, 0].to_sparse_csr()
    with pytest.raises(TypeError, match=r"^warp\(\): 'moving' must be a dense tensor; got layout torch.sparse"):
        warp(sparse, torch.eye(3)[None])



@pytest.mark.parametrize("zero_d", [torch.tensor(16), np.array(16)], ids=["tensor", "array"])
def test_a_zero_d_size_is_one_number_not_a_size(zero_d):
    """A 0-d tensor or array has __iter__ but holds one number: iterating it raised torch's
    "TypeError: iteration over a 0-d tensor" (NumPy's "iteration over a 0-d array")."""
    image = torch.rand(1, 1, 16, 16)
    shape = r"got (a tensor|an array) of shape \(\)$"
    cases = [
        (lambda: warp(image, torch.eye(3), size=zero_d), r"^warp\(\): 'size' must be \(H, W\)"),
        (lambda: pixel_grid(zero_d), r"^pixel_grid\(\): 'size' must be \(H, W\)"),
        (lambda: pixel_axes(zero_d), r"^pixel_axes\(\): 'size' must be \(H, W\)"),
        (lambda: sampling_grid(torch.eye(3), zero_d, (8, 8)), r"^sampling_grid\(\): 'fixed_size' must be \(H, W\)"),
        (lambda: sampling_grid(torch.eye(3), (8, 8), zero_d),
         r"^pixel_to_normalized\(\): 'moving_size' must be \(H, W\)"),
        (lambda: normalization_matrix(zero_d), r"^normalization_matrix\(\): 'size' must be \(H, W\)"),
        (lambda: pixel_to_normalized(torch.eye(3), zero_d),
         r"^pixel_to_normalized\(\): 'moving_size' must be \(H, W\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message + r", two positive whole numbers; " + shape):
            call()
    # a size of two 0-d tensors is still a size
    assert pixel_grid((torch.tensor(2), np.array(3))).shape == (6, 3)


def test_a_factor_of_one_or_no_blur_returns_the_image_itself_as_documented():
    """No copy (register's full-resolution level is the image itself): the documented identity."""
    image = torch.rand(1, 1, 6, 7)
    assert downsample(image, 1) is image and gaussian_blur(image, 0.0) is image and gaussian_blur(image, -1) is image


@pytest.mark.parametrize("size, like, error, message", [
    (None, torch.zeros(1), ValueError, r"'moving_size' must be \(H, W\), two positive whole numbers; got None$"),
    ((0, 16), torch.zeros(1), ValueError, r"'moving_size' must be \(H, W\), two positive whole numbers; got \(0, 16\)$"),
    ((16, 16), None, TypeError, r"'like' must be a float tensor \(the result's dtype and device\); got NoneType$"),
    ((4, 4), torch.zeros(2, dtype=torch.long), TypeError, r"'like' must be a float tensor .*; got torch.int64$"),
    ((4, 4), torch.zeros(2, dtype=torch.complex64), TypeError, r"'like' must be a float tensor .*; got torch.complex64$"),
])
def test_pixel_scale_checks_its_arguments(size, like, error, message):
    """pixel_scale checked nothing: None raised "'NoneType' object is not subscriptable", (0, 16) a
    ZeroDivisionError, like=None an AttributeError, and an int64 'like' gave the scale (0, 0)."""
    with pytest.raises(error, match=r"^pixel_scale\(\): " + message):
        pixel_scale(size, like=like)
    assert pixel_scale((4, 8), like=torch.zeros(1, dtype=torch.float64)).tolist() == [0.25, 0.5]


@pytest.mark.parametrize("shape", [(1, 1, 0, 0), (2, 3, 4, 0), (1, 1, 0, 4, 4)])
def test_sample_refuses_an_image_of_no_pixels(shape):
    """grid_sample raised its own "expected input to have non-empty spatial dimensions"."""
    image = torch.empty(shape)
    grid = torch.zeros(shape[0], *([4] * (len(shape) - 2)), len(shape) - 2)
    with pytest.raises(ValueError, match=rf"^sample\(\): 'image' has no pixels; got shape {re.escape(str(shape))}$"):
        sample(image, grid)
    assert sample(torch.rand(0, 1, 3, 3), torch.zeros(0, 2, 2, 2)).shape == (0, 1, 2, 2)  # a batch of 0: 0 results


@pytest.mark.parametrize("second_order", [False, True])
def test_grid_moments_of_an_empty_batch_are_empty_in_either_layout(second_order):
    """Channels last, a batch of 0 raised "cannot reshape tensor of 0 elements into shape [0, -1, 5, 2]";
    channels first gave (0, K, 3) already, as the metrics give no costs for no pairs."""
    axes = pixel_axes((4, 5))
    width = 6 if second_order else 3
    assert grid_moments(torch.empty(0, 4, 5, 2), axes, second_order=second_order).shape == (0, 2, width)
    assert grid_moments(torch.empty(0, 2, 4, 5), axes, channel_dim=1, second_order=second_order).shape == (0, 2, width)


def test_grid_moments_flags_must_be_a_bool_and_an_int():
    """second_order="no" was taken for true; a tensor channel_dim or second_order raised "Boolean
    value of Tensor with more than one value is ambiguous"."""
    values, axes = torch.rand(1, 4, 5, 2), pixel_axes((4, 5))
    with pytest.raises(ValueError, match=r"^grid_moments\(\): 'channel_dim' must be 1 \(B, K, H, W\) or -1"):
        grid_moments(values, axes, channel_dim=torch.tensor([1, 1]))
    for flag, shown in (("no", "'no'"), (torch.tensor([1, 1]), r"a tensor of shape \(2,\)")):
        with pytest.raises(TypeError, match=rf"^grid_moments\(\): 'second_order' must be True or False; got {shown}$"):
            grid_moments(values, axes, second_order=flag)
    assert grid_moments(values, axes, channel_dim=np.int64(-1), second_order=np.bool_(True)).shape == (1, 2, 6)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_matrix_grid_or_gradient_is_refused_naming_it(layout):
    """They reached torch's internals, which said "Could not run 'aten::ne.Scalar' with arguments from
    the 'SparseCPU' backend" (or another operator's name) and named no argument."""
    def sparse(tensor):
        return tensor.to_sparse() if layout == "coo" else tensor.to_sparse_csr()

    image, grid = torch.rand(1, 1, 6, 7), torch.zeros(1, 6, 7, 2)
    gradient = torch.zeros(1, 1, 2, 6, 7)
    dense = r"must be a dense tensor; got layout torch.sparse"
    cases = [
        (lambda: warp(image, sparse(torch.eye(3))), r"^warp\(\): 'matrix' "),
        (lambda: sampling_grid(sparse(torch.eye(3)), (4, 4), (6, 7)), r"^sampling_grid\(\): 'matrix' "),
        (lambda: pixel_to_normalized(sparse(torch.eye(3)), (6, 7)), r"^pixel_to_normalized\(\): 'matrix' "),
        (lambda: sample(image, sparse(grid)), r"^sample\(\): 'grid' "),
        (lambda: warp_gradient(image, image, sparse(grid)), r"^warp_gradient\(\): 'grid' "),
        (lambda: sampler_gradient(image, image, sparse(grid)), r"^sampler_gradient\(\): 'grid' "),
        (lambda: sample_with_gradient(image, grid, gradient=sparse(gradient)), r"^sample_with_gradient\(\): 'gradient' "),
        (lambda: stack_with_gradient(image, sparse(gradient)), r"^stack_with_gradient\(\): 'gradient' "),
    ]
    for call, message in cases:
        if layout == "csr" and "'matrix'" not in message:
            continue  # CSR is 2-D (or batched 2-D) only: the 4-D and 5-D cases are COO's
        with pytest.raises(TypeError, match=message + dense):
            call()


def test_grid_helpers_and_warp_name_a_bad_dtype_device_or_meta_matrix():
    # torch's "arange() received an invalid combination of arguments", "Expected one of cpu, cuda, ...
    # device type at start of device string: foo" and "Cannot copy out of meta tensor" named no argument
    for call in (lambda **kw: pixel_grid((4, 5), **kw), lambda **kw: pixel_axes((4, 5), **kw),
                 lambda **kw: shrink_matrix(2, **kw)):
        with pytest.raises(TypeError, match="'dtype' must be torch.float32 or torch.float64"):
            call(dtype="float32")
        with pytest.raises(TypeError, match="'dtype' must be torch.float32 or torch.float64"):
            call(dtype=torch.int64)
        with pytest.raises(ValueError, match=r"\(\): 'device' must name a torch device .* got 'foo'"):
            call(device="foo")
    assert pixel_grid((2, 3), dtype=torch.float64, device="cpu")[5].tolist() == [2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"warp\(\): 'matrix' is a meta tensor"):
        warp(torch.rand(1, 1, 8, 8), torch.eye(3).to("meta"))
