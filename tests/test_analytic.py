"""Input checks of :mod:`tireg.analytic` (its results are tested against autograd in test_models,
test_chunks and test_fused)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_fused import _matrix as generic_matrix
from test_fused import needs_compile

from tireg import fused
from tireg.analytic import cost_and_gradient, parameter_gradient
from tireg.losses import L2Loss
from tireg.metrics import NCC
from tireg.sampling import image_gradient, pixel_axes, stack_with_gradient

BATCH, CHANNELS = 2, 2


def _inputs():
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(BATCH, CHANNELS, 13, 17, generator=generator, dtype=torch.float64)
    moving = torch.rand(BATCH, CHANNELS, 11, 19, generator=generator, dtype=torch.float64)
    matrix = torch.tensor([[[1.05, 0.1, 0.7], [-0.08, 0.95, -0.4], [0.0, 0.0, 1.0]],
                           [[0.9, -0.2, 1.3], [0.1, 1.1, 0.2], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    return fixed, moving, matrix


def test_cost_and_gradient_accepts_its_documented_inputs():
    fixed, moving, matrix = _inputs()
    warped, cost, gradient = cost_and_gradient(fixed, moving, matrix, L2Loss())
    assert warped.shape == fixed.shape and cost.shape == (BATCH,) and gradient.shape == (BATCH, 2, 3)
    stacked = stack_with_gradient(moving, image_gradient(moving))
    options = dict(weight=torch.ones(1, 1, 13, 17, dtype=torch.float64), moving_with_gradient=stacked,
                   axes=pixel_axes((13, 17), dtype=torch.float64))
    assert cost_and_gradient(fixed, moving, matrix, NCC(), **options)[2].shape == (BATCH, 2, 3)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(matrix=lambda m: m[0]), ValueError, r"'matrix' must have shape \(B, 3, 3\) = \(2, 3, 3\).*got \(3, 3\)"),
        (dict(matrix=lambda m: m[:1]), ValueError, r"'matrix' must have shape \(B, 3, 3\) = \(2, 3, 3\)"),
        (dict(matrix=lambda m: m.float()), ValueError, r"'matrix' \(torch.float32, cpu\).*same dtype"),
        (dict(matrix=lambda m: m.tolist()), TypeError, r"'matrix' must be a torch.Tensor; got list"),
        (dict(moving=lambda m: m[:1]), ValueError, r"'moving' must have the batch and channels of 'fixed'"),
        (dict(moving=lambda m: m[:, :1]), ValueError, r"'moving' must have the batch and channels of 'fixed'"),
        (dict(moving=lambda m: m.float()), ValueError, r"'fixed' \(torch.float64, cpu\) and 'moving' \(torch.float32"),
        (dict(moving=lambda m: m[0]), ValueError, r"'moving' must have 4 dimensions"),
        (dict(fixed=lambda f: f[0]), ValueError, r"'fixed' must have 4 dimensions"),
        (dict(fixed=lambda f: f.numpy()), TypeError, r"'fixed' must be a torch.Tensor"),
        (dict(fixed=lambda f: f.long()), TypeError, r"'fixed' must be float32 or float64"),
        (dict(metric="l2"), TypeError, r"'metric' must be a tireg.metrics.Metric or a per-pixel loss.*got str"),
        (dict(metric=None), TypeError, r"'metric' must be a tireg.metrics.Metric"),
        (dict(interpolation="cubic"), ValueError, r"unknown interpolation 'cubic'"),
        (dict(padding_mode="wrap"), ValueError, r"unknown padding mode 'wrap'"),
        (dict(weight=torch.ones(2, 1, 5, 5)), ValueError, r"'weight' must have shape \(2, 1, 13, 17\) or \(1, 1, 13"),
        (dict(weight=torch.ones(2, 2, 13, 17)), ValueError, r"'weight' must have shape"),
        (dict(weight=[1.0]), TypeError, r"'weight' must be a torch.Tensor or None"),
        (dict(moving_with_gradient=lambda m: m), ValueError,
         r"'moving_with_gradient' must be \[M, dM/dx, dM/dy\].*\(2, 6, 11, 19\); got \(2, 2, 11, 19\)"),
        (dict(moving_with_gradient=lambda m: torch.cat([m, m, m], 1).float()), ValueError,
         r"'moving_with_gradient' \(torch.float32.*same dtype"),
        (dict(axes=pixel_axes((11, 19), dtype=torch.float64)), ValueError, r"'axes' must be pixel_axes\(\(13, 17\)\)"),
        (dict(axes=pixel_axes((13, 17))), ValueError, r"'axes' must be pixel_axes"),
    ],
    ids=["matrix-unbatched", "matrix-batch-1", "matrix-dtype", "matrix-list", "moving-batch-1", "channels",
         "moving-dtype", "moving-3d", "fixed-3d", "fixed-numpy", "fixed-int", "metric-str", "metric-none",
         "interpolation", "padding", "weight-size", "weight-channels", "weight-list", "moving-with-gradient-shape",
         "moving-with-gradient-dtype", "axes-size", "axes-dtype"],
)
def test_cost_and_gradient_rejects(change, error, pattern):
    """Each mistake was an error from deep inside (an expand, a reshape, "'str' object is not callable")."""
    fixed, moving, matrix = _inputs()
    arguments = dict(fixed=fixed, moving=moving, matrix=matrix, metric=L2Loss())
    for name in ("fixed", "moving", "matrix"):
        if name in change:
            arguments[name] = change.pop(name)(arguments[name])
    if "metric" in change:
        arguments["metric"] = change.pop("metric")
    if callable(change.get("moving_with_gradient")):
        change["moving_with_gradient"] = change["moving_with_gradient"](moving)
    with pytest.raises(error, match=r"^cost_and_gradient\(\): " + pattern):
        cost_and_gradient(**arguments, **change)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compile)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cost_and_gradient_accepts_a_prepared_moving_image_and_coordinate_grids(dtype, compile):
    """prepare_moving() packs float32 pairs into int64 on the CPU; pad_moving()'s plain image is read too.

    Only the compiled kernel reads the prepared inputs (the reference path ignores them): with them it
    gives the warped image, cost and gradient it computes from the moving image itself."""
    fixed, moving, _ = (tensor.to(dtype) for tensor in _inputs())
    # no point on a pixel's edge, where the interpolant's derivative jumps and either side is right
    # (_inputs' matrices put some there: the two paths' gradients then differ by the jump)
    matrix = generic_matrix(BATCH, dtype)
    with warnings.catch_warnings():
        # a compile failure falls back to the reference path, with a warning
        warnings.filterwarnings("error", message="tireg: ", category=RuntimeWarning)
        expected = cost_and_gradient(fixed, moving, matrix, L2Loss(), padding_mode="border", compile=compile)
    reference = cost_and_gradient(fixed, moving, matrix, L2Loss(), padding_mode="border")
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, want in zip(expected, reference):  # the compiled kernel: the reference's numbers
        torch.testing.assert_close(got, want, **tolerance)
    assert fused.prepare_moving(moving, "border").dtype == (torch.int64 if dtype == torch.float32 else dtype)
    for padded in (fused.prepare_moving(moving, "border"), fused.pad_moving(moving, "border")):
        got = cost_and_gradient(fixed, moving, matrix, L2Loss(), padding_mode="border", padded_moving=padded,
                                coordinates=fused.coordinate_grids(fixed), compile=compile)
        for name, value, want in zip(("warped", "cost", "gradient"), got, expected):
            # float32: the kernel given the grids sums the gradient in another order (1e-5 of 90)
            scale = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(value, want, rtol=scale, atol=scale * float(want.abs().max()), msg=name)


@pytest.mark.parametrize(
    "dtype, change, error, pattern",
    [
        (torch.float64, dict(padded_moving=lambda f, m: fused.prepare_moving(m[..., :8, :8], "zeros")), ValueError,
         r"'padded_moving' must be tireg.fused.prepare_moving\(moving, 'zeros'\) of 'moving' \(2, 2, 11, 19\): "
         r"shape \(2, 2, 15, 23\), torch.float64 on cpu; got \(2, 2, 12, 12\), torch.float64 on cpu"),
        (torch.float32, dict(padded_moving=lambda f, m: fused.prepare_moving(m[..., :8, :8], "zeros")), ValueError,
         r"'padded_moving' must be .*: shape \(2, 2, 15, 22\), torch.int64 on cpu; got \(2, 2, 12, 11\)"),
        (torch.float32, dict(padded_moving=lambda f, m: fused.prepare_moving(m[:1], "zeros")), ValueError,
         r"'padded_moving' must be .*; got \(1, 2, 15, 22\), torch.int64"),
        (torch.float64, dict(padded_moving=lambda f, m: fused.prepare_moving(m.float(), "zeros")), ValueError,
         r"'padded_moving' must be .*torch.float64 on cpu; got \(2, 2, 15, 22\), torch.int64 on cpu"),
        (torch.float32, dict(padded_moving=lambda f, m: fused.prepare_moving(m, "border"), padding_mode="zeros"),
         None, None),  # the same shape for both modes: values are not looked at
        (torch.float32, dict(padded_moving=lambda f, m: [0.0]), TypeError,
         r"'padded_moving' must be a torch.Tensor or None; got list"),
        (torch.float32, dict(coordinates=lambda f, m: fused.coordinate_grids(m)), ValueError,
         r"'coordinates' must be tireg.fused.coordinate_grids\(fixed\): two \(1, 1, 13, 17\) tensors of "
         r"torch.float32 on cpu; got \(1, 1, 11, 19\) torch.float32 on cpu, \(1, 1, 11, 19\)"),
        (torch.float32, dict(coordinates=lambda f, m: fused.coordinate_grids(f.double())), ValueError,
         r"'coordinates' must be .*; got \(1, 1, 13, 17\) torch.float64 on cpu"),
        (torch.float32, dict(coordinates=lambda f, m: fused.coordinate_grids(f)[0]), ValueError,
         r"'coordinates' must be .*; got Tensor$"),
        (torch.float32, dict(coordinates=lambda f, m: fused.coordinate_grids(f)[:1]), ValueError,
         r"'coordinates' must be .*; got \(1, 1, 13, 17\) torch.float32 on cpu$"),
    ],
    ids=["padded-size", "packed-size", "padded-batch", "padded-dtype", "other-mode-same-shape", "padded-list",
         "coordinates-size", "coordinates-dtype", "coordinates-tensor", "coordinates-one"],
)
def test_cost_and_gradient_checks_the_prepared_moving_image_and_coordinate_grids(dtype, change, error, pattern):
    """The compiled kernel does no bounds checks: a prepared image of an 8 x 8 moving image for a
    64 x 64 one gave a cost of 1331 for 687 and a garbage gradient (the checks come before compiling)."""
    fixed, moving, matrix = (tensor.to(dtype) for tensor in _inputs())
    options = {name: value(fixed, moving) if callable(value) else value for name, value in change.items()}
    if error is None:
        cost_and_gradient(fixed, moving, matrix, L2Loss(), **options)
        return
    with pytest.raises(error, match=r"^cost_and_gradient\(\): " + pattern):
        cost_and_gradient(fixed, moving, matrix, L2Loss(), compile=True, **options)


def test_cost_and_gradient_refuses_a_projective_matrix_and_the_models_path_reads_no_value():
    """The public function checks the last row as warp() does (a value read); the models call the
    unchecked one every step, which runs on meta tensors (no values to read)."""
    from tireg.analytic import _cost_and_gradient

    fixed, moving, matrix = _inputs()
    projective = matrix.clone()
    projective[:, 2, 0] = 1e-3
    with pytest.raises(ValueError, match=r"^cost_and_gradient\(\): 'matrix' must be affine, with last row"):
        cost_and_gradient(fixed, moving, projective, L2Loss())
    with pytest.raises(ValueError, match=r"^cost_and_gradient\(\): 'matrix' contains NaN or Inf$"):
        cost_and_gradient(fixed, moving, matrix.clone().fill_(float("inf")), L2Loss())
    # nearest's derivative is 0 almost everywhere: its G was 0, as the models refuse it
    with pytest.raises(ValueError, match=r"^cost_and_gradient\(\): interpolation 'nearest' has no gradient"):
        cost_and_gradient(fixed, moving, matrix, L2Loss(), interpolation="nearest")
    fixed, moving, matrix = (tensor.to("meta") for tensor in (fixed, moving, matrix))
    warped, cost, gradient = _cost_and_gradient(fixed, moving, matrix, L2Loss())
    assert warped.shape == fixed.shape and gradient.shape == (BATCH, 2, 3)
    jacobian = torch.empty(1, 6, 3, 3, dtype=gradient.dtype, device="meta")
    assert parameter_gradient(gradient, jacobian).shape == (BATCH, 6)


def test_parameter_gradient():
    generator = torch.Generator().manual_seed(1)
    gradient = torch.rand(2, 2, 3, generator=generator, dtype=torch.float64)
    jacobian = torch.rand(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    expected = torch.einsum("bij,bpij->bp", gradient, jacobian[:, :, :2])
    assert torch.allclose(parameter_gradient(gradient, jacobian), expected)
    shared = torch.einsum("bij,pij->bp", gradient, jacobian[0, :, :2])  # one Jacobian for every pair
    assert torch.allclose(parameter_gradient(gradient, jacobian[:1]), shared)
    padded = torch.cat([gradient, torch.zeros(2, 1, 3, dtype=torch.float64)], 1)  # (B, 3, 3): last row ignored
    assert torch.allclose(parameter_gradient(padded, jacobian), expected)


@pytest.mark.parametrize(
    "gradient, jacobian, error, pattern",
    [
        (torch.rand(2, 2, 3), torch.rand(3, 4, 3, 3), ValueError,
         r"'jacobian' must have shape \(B, P, 3, 3\) or \(1, P, 3, 3\) with B = 2; got \(3, 4, 3, 3\)"),
        (torch.rand(2, 2, 3), torch.rand(4, 3, 3), ValueError, r"'jacobian' must have shape"),
        (torch.rand(2, 6), torch.rand(2, 4, 3, 3), ValueError, r"'matrix_gradient' must have shape \(B, 2, 3\)"),
        (torch.rand(2, 2, 3), torch.rand(2, 4, 3, 3, dtype=torch.float64), ValueError,
         r"'jacobian' \(torch.float64, cpu\) and 'matrix_gradient' \(torch.float32, cpu\) must have the same dtype"),
        (torch.rand(2, 2, 3).tolist(), torch.rand(2, 4, 3, 3), TypeError, r"'matrix_gradient' must be a torch.Tensor"),
    ],
    ids=["jacobian-batch", "jacobian-3d", "gradient-flat", "dtypes", "list"],
)
def test_parameter_gradient_rejects(gradient, jacobian, error, pattern):
    with pytest.raises(error, match=r"^parameter_gradient\(\): " + pattern):
        parameter_gradient(gradient, jacobian)


@pytest.mark.parametrize("padding_mode", ["border", "reflection", "zeros"])
def test_a_precomputed_gradient_outside_the_moving_image_gives_autograds_gradient(padding_mode):
    """A precomputed gradient sampled outside the moving image is the extended image's derivative
    (sign flipped in a mirrored copy, 0 where the border is repeated), so ``G`` is autograd's of the
    same warp: with ``"reflection"`` a translation's gradient had the wrong sign.  A ramp (whose
    central difference is exact inside), the fixed pixels that map near the edges (where the
    gradient images' edge pixels are half differences) weighted 0; many map into mirrored copies
    or past the border."""
    from tireg.metrics import PerPixelMetric
    from tireg.sampling import sampling_grid, warp

    size = (12, 15)
    ys, xs = torch.meshgrid(torch.arange(12.0, dtype=torch.float64), torch.arange(15.0, dtype=torch.float64),
                            indexing="ij")
    moving = torch.stack([0.7 * xs - 1.3 * ys + 2.0, -0.4 * xs + 0.9 * ys]).unsqueeze(0)  # (1, 2, 12, 15)
    fixed = torch.rand(1, 2, 30, 36, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    matrix = torch.tensor([[[1.2, 0.15, -19.0], [-0.1, 1.1, -11.5], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    grid = sampling_grid(matrix, fixed.shape[-2:], size)
    weight = torch.ones(1, 1, 30, 36, dtype=torch.float64)
    for axis, length in ((0, 15), (1, 12)):  # keep each axis's coordinate off the edge pixels' reach
        x = ((grid[..., axis] + 1.0) * length - 1.0) / 2.0
        if padding_mode == "reflection":
            t = torch.remainder(x + 0.5, 2 * length)
            x = torch.where(t < length, t, 2 * length - t) - 0.5
            near = ((x > -1e-3) & (x < 2)) | ((x > length - 3) & (x < length - 1 + 1e-3))
        elif padding_mode == "border":
            near = ((x > -1e-3) & (x < 2)) | ((x > length - 3) & (x < length - 1 + 1e-3))
        else:
            near = ((x > -3) & (x < 2)) | ((x > length - 3) & (x < length + 2))
        weight[:, 0] *= (~near).to(weight.dtype)
    assert weight.sum() > 200
    metric = PerPixelMetric("l2")
    stacked = stack_with_gradient(moving, image_gradient(moving, method="central", padding_mode=padding_mode))
    _, cost, gradient = cost_and_gradient(fixed, moving, matrix, metric, weight=weight, padding_mode=padding_mode,
                                          moving_with_gradient=stacked)
    tracked = matrix.clone().requires_grad_(True)
    reference = metric(warp(moving, tracked, size=fixed.shape[-2:], padding_mode=padding_mode), fixed, weight)
    (expected,) = torch.autograd.grad(reference.sum(), tracked)
    torch.testing.assert_close(cost, reference.detach(), rtol=1e-12, atol=0)
    assert expected[:, :2].abs().max() > 0.1
    torch.testing.assert_close(gradient, expected[:, :2], rtol=1e-9, atol=1e-9)


def test_a_complex_weight_is_refused_naming_it():
    """cost_and_gradient handed a complex weight on to the metric (or the compiled kernel), which
    dropped its imaginary part: a weight of 1j weighed nothing."""
    fixed = torch.rand(1, 1, 8, 9, generator=torch.Generator().manual_seed(0))
    weight = torch.ones(1, 1, 8, 9, dtype=torch.complex64) * 1j
    with pytest.raises(TypeError, match=r"^cost_and_gradient\(\): 'weight' must be real; got torch.complex64$"):
        cost_and_gradient(fixed, fixed.flip(-1), torch.eye(3)[None], L2Loss(), weight=weight)


def test_sparse_inputs_are_refused_naming_them():
    """A sparse matrix, weight or gradient reached torch's internals, which named no argument."""
    fixed = torch.rand(1, 1, 8, 9, generator=torch.Generator().manual_seed(0))
    dense = r"must be a dense tensor; got layout torch.sparse_coo"
    with pytest.raises(TypeError, match=rf"^cost_and_gradient\(\): 'matrix' {dense}"):
        cost_and_gradient(fixed, fixed, torch.eye(3)[None].to_sparse(), L2Loss())
    with pytest.raises(TypeError, match=rf"^cost_and_gradient\(\): 'weight' {dense}"):
        cost_and_gradient(fixed, fixed, torch.eye(3)[None], NCC(), weight=torch.ones(1, 1, 8, 9).to_sparse())
    with pytest.raises(TypeError, match=rf"^parameter_gradient\(\): 'matrix_gradient' {dense}"):
        parameter_gradient(torch.zeros(1, 2, 3).to_sparse(), torch.zeros(1, 3, 3, 3))
    with pytest.raises(TypeError, match=rf"^parameter_gradient\(\): 'jacobian' {dense}"):
        parameter_gradient(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3, 3).to_sparse())


def test_cost_and_gradient_refuses_a_compile_flag_that_is_not_one():
    # 'no' is truthy: it had compiled (30 s) instead of being refused as register(compile='no') is
    from tireg.analytic import per_pixel_cost_and_gradient

    fixed = torch.rand(1, 1, 16, 16)
    for flag in ("no", "x", 2.5):
        with pytest.raises(TypeError, match=r"cost_and_gradient\(\): 'compile'"):
            cost_and_gradient(fixed, fixed, torch.eye(3)[None], L2Loss(), compile=flag)
    with pytest.raises(TypeError, match=r"per_pixel_cost_and_gradient\(\): 'loss' must be a per-pixel loss"):
        per_pixel_cost_and_gradient(fixed, fixed, torch.eye(3)[None], NCC())
    _, cost, _ = per_pixel_cost_and_gradient(fixed, fixed, torch.eye(3)[None], L2Loss())
    assert float(cost.abs().max()) < 1e-12
