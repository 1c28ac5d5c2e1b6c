"""The fused fast path (tireg.fused) against the reference path: same values, gradients, matrices.

The formulation is checked eagerly in float64 (exact to rounding), and the
compiled kernel once per use (model step, register) in float32; the compiled
tests skip where torch.compile cannot build a kernel on this machine.
"""

from __future__ import annotations

import importlib
import os
import warnings
import weakref

import pytest
import torch
from conftest import (
    OwnPerPixelCost,
    count_evaluated_pairs,
    grid_error,
    registration_pair,
    smooth_random_image,
    staggered_affine_batch,
)

import tireg
from tireg import fused
from tireg.analytic import cost_and_gradient
from tireg.losses import get_loss
from tireg.metrics import PerPixelMetric, get_metric
from tireg.register import _make_level, _Problem
from tireg.sampling import grid_moments, sample_with_gradient, sampling_grid
from tireg.transforms import TRANSFORMS


def _matrix(batch: int, dtype=torch.float64) -> torch.Tensor:
    """A generic affine batch (no point lands exactly on a pixel, where the interpolant has a kink)."""
    matrix = torch.eye(3, dtype=dtype).repeat(batch, 1, 1)
    matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = 1.0213, 0.0513, -0.0417, 0.9871
    matrix[:, 0, 2] = torch.tensor([3.31, -4.13, 10.07, 0.37], dtype=dtype)[:batch]
    matrix[:, 1, 2] = torch.tensor([-2.71, 1.19, -0.43, 6.61], dtype=dtype)[:batch]
    return matrix


def _compiles() -> bool:
    """Whether torch.compile builds a kernel here (it needs a C++ compiler on the CPU)."""
    try:
        torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)(torch.ones(4))
        return True
    except Exception:
        return False


needs_compile = pytest.mark.skipif(not _compiles(), reason="torch.compile cannot build kernels on this machine")


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("loss", ["l2", "cauchy", "huber", "geman_mcclure"])
def test_formulation_equals_reference_cost_and_gradient(padding_mode, loss, generator):
    fixed = smooth_random_image((3, 2, 37, 53), generator)
    moving = smooth_random_image((3, 2, 41, 47), generator)  # another size than the fixed image
    weight = (torch.rand(3, 1, 37, 53, generator=generator, dtype=torch.float64) > 0.3).double()
    loss = get_loss(loss)
    matrix = _matrix(3)
    warped, cost, matrix_gradient = cost_and_gradient(
        fixed, moving, matrix, PerPixelMetric(loss, mean=False), weight=weight, padding_mode=padding_mode
    )
    result = fused.bilinear_moments(
        fixed, fused.pad_moving(moving, padding_mode), matrix, loss, padding_mode, weight, return_warped=True
    )
    torch.testing.assert_close(result.warped, warped, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.cost, cost, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.matrix_gradient, matrix_gradient, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.count, weight.sum(dim=(1, 2, 3)))


def test_products_equal_the_gauss_newton_moments(generator):
    fixed = smooth_random_image((2, 2, 30, 34), generator)
    moving = smooth_random_image((2, 2, 30, 34), generator)
    matrix = _matrix(2)
    loss = tireg.L2Loss()
    result = fused.bilinear_moments(fixed, fused.pad_moving(moving, "border"), matrix, loss, "border", hessian=True)
    grid = sampling_grid(matrix, (30, 34), (30, 34))
    _, gradients = sample_with_gradient(moving, grid, padding_mode="border")  # (B, C, 2, H, W)
    gx, gy = gradients[:, :, 0], gradients[:, :, 1]
    irls = 2.0  # L2: rho'(r) / r
    products = torch.stack([(irls * gx * gx).sum(1), (irls * gx * gy).sum(1), (irls * gy * gy).sum(1)], 1)
    expected = grid_moments(products, (torch.arange(30.0).double(), torch.arange(34.0).double()),
                            channel_dim=1, second_order=True)
    torch.testing.assert_close(result.products, expected, rtol=1e-10, atol=1e-9)


@needs_compile
def test_grid_moments_trace_under_compile(generator):
    """grid_moments inside a torch.compile graph (its power tables made in the graph, nothing kept)."""
    values = torch.randn(2, 9, 11, 3, generator=generator, dtype=torch.float64)
    axes = (torch.arange(9.0).double() + 4.0, torch.arange(11.0).double())
    traced = torch.compile(lambda v, ys, xs: grid_moments(v, (ys, xs), second_order=True), fullgraph=True)
    torch.testing.assert_close(traced(values, *axes), grid_moments(values, axes, second_order=True))


def test_inside_only_counts_points_inside_the_moving_image(generator):
    fixed = smooth_random_image((1, 1, 20, 20), generator)
    moving = smooth_random_image((1, 1, 20, 20), generator)
    shift = torch.eye(3, dtype=torch.float64)[None].clone()
    shift[0, 0, 2] = 5.5  # columns 0..13 sample inside (x = 5.5 .. 18.5 <= 19)
    result = fused.bilinear_moments(fixed, fused.pad_moving(moving, "border"), shift, tireg.L2Loss(), "border",
                                    inside_only=True)
    assert float(result.count) == 14 * 20


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_wild_matrices_stay_finite_and_count_nothing_outside(bad, generator):
    fixed = smooth_random_image((2, 1, 16, 16), generator)
    moving = smooth_random_image((2, 1, 16, 16), generator)
    matrix = _matrix(2)
    matrix[0, 0, 2] = bad
    result = fused.bilinear_moments(fixed, fused.pad_moving(moving, "zeros"), matrix, tireg.L2Loss(), "zeros",
                                    inside_only=True, hessian=True)
    for value in (result.cost, result.matrix_gradient, result.products):
        assert torch.isfinite(value).all()
    assert float(result.count[0]) == 0.0 and float(result.count[1]) > 0


def test_stored_coordinates_give_the_same_moments(generator):
    """coordinate_grids (stored x = j, y = i) in place of the broadcast axes: the same numbers."""
    fixed = smooth_random_image((2, 2, 18, 23), generator)
    moving = smooth_random_image((2, 2, 21, 17), generator)
    coordinates = fused.coordinate_grids(fixed)
    xs, ys = coordinates
    assert xs.shape == ys.shape == (1, 1, 18, 23) and xs.dtype == torch.float64
    assert xs[0, 0, 5, 7] == 7 and ys[0, 0, 5, 7] == 5
    padded = fused.pad_moving(moving, "border")
    options = dict(inside_only=True, hessian=True, return_warped=True)
    expected = fused.bilinear_moments(fixed, padded, _matrix(2), tireg.CauchyLoss(), "border", **options)
    got = fused.bilinear_moments(fixed, padded, _matrix(2), tireg.CauchyLoss(), "border", coordinates=coordinates,
                                 **options)
    for name in ("cost", "count", "matrix_gradient", "products", "warped"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-12, atol=1e-12)
    assert fused.coordinate_grids(torch.zeros(1, 1, 4, 4, device="meta")) is None  # a GPU kernel needs none


def test_packed_pairs_hold_both_neighbours_bit_for_bit(generator):
    padded = torch.randn(2, 3, 5, 7, generator=generator)
    padded[0, 0, 0, :5] = torch.tensor([-0.0, float("inf"), float("nan"), 1e-40, -float("inf")])  # subnormal too
    packed = fused.pack_pairs(padded)
    assert packed.dtype == torch.int64 and packed.shape == (2, 3, 5, 6)
    low, high = fused._unpack_pairs(packed)
    assert torch.equal(low.view(torch.int32), padded[..., :-1].contiguous().view(torch.int32))
    assert torch.equal(high.view(torch.int32), padded[..., 1:].contiguous().view(torch.int32))
    with pytest.raises(ValueError, match="float32"):
        fused.pack_pairs(padded.double())


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (1, 2, 1, 6), (3, 1, 8, 1)])
def test_moving_packed_without_a_padded_copy_is_bit_for_bit_the_same(padding_mode, shape, generator):
    moving = torch.randn(*shape, generator=generator)
    moving.view(-1)[:3] = torch.tensor([-0.0, float("nan"), 1e-40])[: moving.numel()]
    expected = fused.pack_pairs(fused.pad_moving(moving, padding_mode))
    got = fused.prepare_moving(moving, padding_mode)
    assert got.shape == expected.shape and torch.equal(got, expected)
    padded = fused.prepare_moving(moving.double(), padding_mode)  # float64: padded, not packed
    torch.testing.assert_close(padded, fused.pad_moving(moving.double(), padding_mode), rtol=0, atol=0, equal_nan=True)
    # the moving image is a view inside either, bit for bit
    for prepared, original in ((got, moving), (padded, moving.double())):
        inside = fused.prepared_image(prepared, padding_mode)
        assert inside.dtype == original.dtype and inside.shape == original.shape
        assert inside.untyped_storage().data_ptr() == prepared.untyped_storage().data_ptr()
        torch.testing.assert_close(inside, original, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["packed", "padded"])
def test_moving_normalised_while_prepared_is_bit_for_bit_the_same(dtype, generator):
    """prepare_moving(raw, normalization=(mean, std)) == prepare_moving((raw - mean) / std), with no normalised copy;
    an expanded batch stays a view."""
    raw = (3.0 * torch.randn(3, 2, 9, 11, generator=generator) + 5.0).to(dtype)
    std, mean = torch.std_mean(raw, dim=(2, 3), correction=0, keepdim=True)
    expected = fused.prepare_moving((raw - mean).div_(std), "border")
    got = fused.prepare_moving(raw, "border", normalization=(mean, std))
    assert torch.equal(got, expected)
    one = raw[:1].expand(3, -1, -1, -1)
    assert torch.equal(fused.prepare_moving(one, "border"), fused.prepare_moving(one.contiguous(), "border"))
    with pytest.raises(ValueError, match="normalization needs 'border' padding"):
        fused.prepare_moving(raw, "zeros", normalization=(mean, std))


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_packed_moving_gives_the_same_moments(padding_mode, generator):
    """prepare_moving packs a float32 CPU image; the kernel's two gathers give what its four give."""
    fixed = smooth_random_image((2, 2, 18, 23), generator).float()
    moving = smooth_random_image((2, 2, 21, 17), generator).float()
    prepared = fused.prepare_moving(moving, padding_mode)
    assert prepared.dtype == torch.int64
    assert fused.prepare_moving(moving.double(), padding_mode).dtype == torch.float64  # nothing to pack into
    matrix = _matrix(2, torch.float32)
    matrix[1, 0, 2] = 40.0  # some points outside, on the padding
    options = dict(weight=None, inside_only=True, hessian=True, return_warped=True)
    expected = fused.bilinear_moments(fixed, fused.pad_moving(moving, padding_mode), matrix, tireg.CauchyLoss(),
                                      padding_mode, **options)
    got = fused.bilinear_moments(fixed, prepared, matrix, tireg.CauchyLoss(), padding_mode, **options)
    for name in ("cost", "count", "matrix_gradient", "products", "warped"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)


def test_register_plumbing_with_the_formulation_equals_reference(monkeypatch, generator):
    """register's fused evaluation (the formulation standing in for the compiled kernel) == its reference one."""
    fixed = smooth_random_image((2, 1, 40, 44), generator)
    moving = smooth_random_image((2, 1, 40, 44), generator)
    weight = (torch.rand(2, 1, 40, 44, generator=generator, dtype=torch.float64) > 0.2).double()
    monkeypatch.setattr(fused, "compiled_bilinear_moments", lambda device, **options: fused.bilinear_moments)
    kind = TRANSFORMS["affine"]
    center = torch.tensor([21.5, 19.5], dtype=torch.float64)
    params = kind.from_matrix(_matrix(2), center)
    level = _make_level(fixed, moving, weight, None, 2, 1.0)
    for loss in ("l2", "cauchy"):
        reference = _Problem(kind, center, get_metric(loss), "bilinear")
        fast = _Problem(kind, center, get_metric(loss), "bilinear", compile=True)
        assert fast.compile
        for hessian in (True, False):
            expected = reference.evaluate(params, level, hessian=hessian)
            got = fast.evaluate(params, level, hessian=hessian)
            torch.testing.assert_close(got.cost, expected.cost, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got.gradient, expected.gradient, rtol=1e-8, atol=1e-10)
            if hessian:
                torch.testing.assert_close(got.hessian, expected.hessian, rtol=1e-8, atol=1e-8)


def test_unsupported_settings_use_the_reference_path():
    for interpolation, padding, loss in [("bicubic", "zeros", tireg.L2Loss()), ("bilinear", "reflection", tireg.L2Loss()),
                                         ("bilinear", "zeros", get_metric("ncc"))]:
        assert not fused.supports(interpolation, padding, loss)
    assert not _Problem(TRANSFORMS["rigid"], torch.zeros(2), get_metric("ncc"), "bilinear", compile=True).compile


def _kernel_that_raises(monkeypatch, generator, error: Exception):
    """A compiled kernel that raises ``error``, no failure remembered yet, and a pair of 24² images."""
    def kernel(*args, **kwargs):
        raise error

    monkeypatch.setattr(fused, "compiled_bilinear_moments", lambda device, **options: kernel)
    monkeypatch.setattr(fused, "_failed", set())
    return (smooth_random_image((1, 1, 24, 24), generator).float(),
            smooth_random_image((1, 1, 24, 24), generator).float())


def test_a_compile_failure_warns_once_and_falls_back(monkeypatch, generator):
    fixed, moving = _kernel_that_raises(monkeypatch, generator, RuntimeError("no compiler\nmore detail"))
    with pytest.warns(RuntimeWarning, match="compiled fast path is unavailable on cpu .*no compiler"):
        assert fused.run_compiled(fixed, fused.pad_moving(moving, "zeros"), _matrix(1).float(), tireg.L2Loss(),
                                  "zeros") is None
    assert "cpu" in fused._failed
    # the warning names the user's line, however deep the compiled call (it named one inside tireg)
    monkeypatch.setattr(fused, "_failed", set())
    with pytest.warns(RuntimeWarning, match="compiled fast path is unavailable") as caught:
        tireg.register(fixed[0, 0], moving[0, 0], transform="translation", init="identity", compile=True)
    assert [warning.filename for warning in caught] == [__file__]
    # the model still steps, by the reference path, with the reference numbers
    model = tireg.create_model("affine", moving, compile=True)
    reference = tireg.create_model("affine", moving)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cost = model(moving, fixed)
    _, expected = reference(moving, fixed)
    assert float(cost) == float(expected)


def test_running_out_of_memory_is_raised_not_taken_for_a_compile_failure(monkeypatch, generator):
    """An out-of-memory error turned the compiled path off for the process, and the next call ran the
    reference path (which needs more memory) under the compiled path's name."""
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    fixed, moving = _kernel_that_raises(monkeypatch, generator,
                                        out_of_memory("CUDA out of memory. Tried to allocate 8.00 GiB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(out_of_memory, match="Tried to allocate"):
            fused.run_compiled(fixed, fused.pad_moving(moving, "zeros"), _matrix(1).float(), tireg.L2Loss(), "zeros")
    assert fused._failed == set()


def test_one_variant_past_the_recompile_limit_runs_the_reference_path_and_no_other(monkeypatch, generator):
    """Past tireg's recompile limit the device was marked failed: every compiled path of the process,
    variants compiled before included, ran the reference path from then on (a long-running program
    that made models of ever new mapping bounds)."""
    class FailOnRecompileLimitHit(Exception):  # dynamo's, by name
        pass

    fixed, moving = _kernel_that_raises(monkeypatch, generator, FailOnRecompileLimitHit("recompile_limit reached"))
    monkeypatch.setattr(fused, "_refused", set())
    with pytest.warns(RuntimeWarning, match="over 64 compiled variants of one kernel"):
        assert fused.run_compiled(fixed, fused.pad_moving(moving, "zeros"), _matrix(1).float(), tireg.L2Loss(),
                                  "zeros") is None
    assert fused._failed == set()
    assert fused.call_compiled(lambda value: value + 1, torch.device("cpu"), 1) == 2  # the others still run
    # the refused variant is not tried again (two failed dynamo attempts and two logged warnings a call)
    attempts = []

    def refusing(*args):
        attempts.append(args)
        raise FailOnRecompileLimitHit("recompile_limit reached")

    with pytest.warns(RuntimeWarning, match="over 64 compiled variants"):
        assert fused.call_compiled(refusing, torch.device("cpu"), fixed) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.call_compiled(refusing, torch.device("cpu"), fixed) is None
    assert len(attempts) == 2  # the first call's two attempts, none after
    with pytest.warns(RuntimeWarning, match="over 64 compiled variants"):  # another shape: another variant
        assert fused.call_compiled(refusing, torch.device("cpu"), fixed[..., :8]) is None


class _BranchingL2(tireg.PerPixelLoss):
    """L2 with a branch on a tensor's value: fine eagerly, which dynamo cannot trace."""

    def residual(self, r, gradient=False):
        r = r if float(r.abs().max()) < 1e9 else r.clamp(-1e9, 1e9)
        return (r * r, 2.0 * r) if gradient else r * r


def test_a_loss_of_ones_own_that_fails_to_compile_sends_only_its_calls_to_the_reference_path(monkeypatch, generator):
    """Such a loss marked the device failed: the built-in losses, the models and register() ran the
    reference path for the rest of the process, under a warning that blamed the machine."""
    attempts = []

    def kernel(fixed, padded, matrix, loss, *args, **kwargs):
        attempts.append(type(loss).__name__)
        if isinstance(loss, _BranchingL2):
            raise RuntimeError("Could not guard on data-dependent expression")
        return "compiled"

    fixed, moving = _kernel_that_raises(monkeypatch, generator, RuntimeError("unused"))
    monkeypatch.setattr(fused, "compiled_bilinear_moments", lambda device, **options: kernel)
    monkeypatch.setattr(fused, "_uncompilable", weakref.WeakSet(), raising=False)
    padded, matrix, own = fused.pad_moving(moving, "zeros"), _matrix(1).float(), _BranchingL2()
    with pytest.warns(RuntimeWarning, match=r"your own _BranchingL2 failed \(RuntimeError: Could not guard"):
        assert fused.run_compiled(fixed, padded, matrix, own, "zeros") is None
    assert fused._failed == set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.run_compiled(fixed, padded, matrix, own, "zeros") is None  # not tried again
        assert fused.run_compiled(fixed[..., :8, :], padded, matrix, own, "zeros") is None  # nor at another size
        assert fused.run_compiled(fixed, padded, matrix, tireg.L2Loss(), "zeros") == "compiled"
    assert attempts == ["_BranchingL2", "L2Loss"]
    # a model with it, on the real compiler: warned of once, then stepped by the reference path
    model = tireg.create_model("affine", moving.double(), loss=_BranchingL2(), compile=True)
    reference = tireg.create_model("affine", moving.double(), loss=tireg.L2Loss(), compile=False)
    with pytest.warns(RuntimeWarning, match="your own _BranchingL2 failed"):
        _, cost = model(moving.double(), fixed.double())
    assert fused._failed == set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = model(moving.double(), fixed.double())
    _, expected = reference(moving.double(), fixed.double())
    assert float(cost) == float(again) == float(expected)


def test_a_compiler_failure_is_the_machines_even_with_a_loss_of_ones_own(monkeypatch, generator):
    """With no working C++ compiler, every call with a loss of one's own was taken for that loss's
    failure: the device was never marked, each new loss tried to compile again (seconds each) and
    warned that the loss had failed."""
    class InvalidCxxCompiler(RuntimeError):  # inductor's, by name
        pass

    class InductorError(RuntimeError):
        pass

    def kernel(*args, **kwargs):
        try:
            raise InvalidCxxCompiler("No working C++ compiler found")
        except InvalidCxxCompiler as cause:
            raise InductorError("InvalidCxxCompiler: No working C++ compiler found") from cause

    fixed, moving = _kernel_that_raises(monkeypatch, generator, RuntimeError("unused"))
    monkeypatch.setattr(fused, "compiled_bilinear_moments", lambda device, **options: kernel)
    monkeypatch.setattr(fused, "_uncompilable", weakref.WeakSet(), raising=False)
    with pytest.warns(RuntimeWarning, match="compiled fast path is unavailable on cpu .*InductorError"):
        assert fused.run_compiled(fixed, fused.pad_moving(moving, "zeros"), _matrix(1).float(), _BranchingL2(),
                                  "zeros") is None
    assert fused._failed == {"cpu"} and len(fused._uncompilable) == 0


def test_the_fused_count_is_one_per_pair_with_a_shared_weight_image(generator):
    fixed = smooth_random_image((3, 1, 9, 11), generator)
    moving = smooth_random_image((3, 1, 9, 11), generator)
    weight = torch.rand((1, 1, 9, 11), generator=generator, dtype=torch.float64)
    result = fused.bilinear_moments(fixed, fused.pad_moving(moving, "zeros"), _matrix(3), tireg.L2Loss(), "zeros",
                                    weight)
    assert result.cost.shape == result.count.shape == (3,)
    torch.testing.assert_close(result.count, weight.sum().expand(3))


def test_register_compiles_automatically_only_for_work_that_pays(monkeypatch):
    """compile="auto": the fused kernel for a batch of AUTO_COMPILE_PIXELS or more, the same matrices as without;
    never for one pair, however large (in bands of rows, where compiling does not pay: one 8192^2 pair took
    29 s eager and 60 s compiled, a scale audit)."""
    register_module = importlib.import_module("tireg.register")
    calls = []

    def counting(device, **options):
        def kernel(*args, **kwargs):
            calls.append(args[0].shape)
            return fused.bilinear_moments(*args, **kwargs)  # the formulation stands in for the compiled kernel
        return kernel

    monkeypatch.setattr(fused, "compiled_bilinear_moments", counting)
    fixed, moving, truth = registration_pair("camera", "similarity", [0.06, 1.04, 4.0, -3.0], noise=0.02)
    batch_pixels = fixed.numel()
    assert batch_pixels < register_module.AUTO_COMPILE_PIXELS  # a small pair: the reference path
    reference = tireg.register(fixed, moving, transform="similarity")
    assert calls == []
    monkeypatch.setattr(register_module, "AUTO_COMPILE_PIXELS", batch_pixels)  # now it is "large"
    tireg.register(fixed, moving, transform="similarity")
    assert calls == []  # but one pair: never
    monkeypatch.setattr(register_module, "AUTO_COMPILE_PIXELS", 2 * batch_pixels)
    fast = tireg.register(torch.stack([fixed] * 2)[:, None], torch.stack([moving] * 2)[:, None],
                          transform="similarity")[0]
    height, width = fixed.shape[-2:]
    assert calls and calls[-1][-2:] == (height - 2, width - 2)  # full resolution, without the smoothed 1-px band
    assert grid_error(fast.matrix, reference.matrix, fixed.shape) < 1e-3
    assert grid_error(fast.matrix, truth, fixed.shape) < 0.2
    calls.clear()
    tireg.register(fixed, moving, transform="similarity", compile=False)
    assert calls == []


@pytest.mark.parametrize("bad, error", [("fast", ValueError), (1, TypeError), (None, TypeError)])
def test_register_names_a_bad_compile_option(bad, error):
    fixed = torch.rand(32, 32)
    with pytest.raises(error, match="register\\(\\): 'compile' must be True, False or 'auto'"):
        tireg.register(fixed, fixed, compile=bad)
    moving = torch.rand(1, 1, 16, 16)
    with pytest.raises(error, match="create_model\\(\\): 'compile' must be True, False or 'auto'"):
        tireg.create_model("rigid", moving, compile=bad)
    model = tireg.create_model("rigid", moving)
    with pytest.raises(error, match="RigidModelAnalytic\\(\\): 'compile' must be True, False or 'auto'"):
        model.compile = bad


@needs_compile
def test_many_settings_in_one_process_keep_the_compiled_path(monkeypatch):
    """Past dynamo's 8 specialisations of one function the kernel still compiles (no fallback warning)."""

    def toy(fixed, padded, matrix, loss, padding_mode, weight=None):
        return fixed * int(padding_mode[5:]) + matrix.sum()  # a string: one specialisation per value

    compiled = torch.compile(toy, fullgraph=True)
    monkeypatch.setattr(fused, "compiled_bilinear_moments", lambda device, **options: compiled)
    monkeypatch.setattr(fused, "_failed", set())
    fixed = torch.ones(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in range(10):  # dynamo's default limit is 8
            result = fused.run_compiled(fixed, None, torch.zeros(3), None, f"scale{scale}")
            torch.testing.assert_close(result, fixed * scale)
    assert fused._failed == set()


def _mapped_similarity(moving: torch.Tensor, compile: "bool | str") -> tireg.models.AffineModelAnalytic:
    """A batch-of-2 similarity model with a bounded angle, a positive scale and a shared shift."""
    model = tireg.create_model("similarity", moving, loss="cauchy", padding_mode="border", compile=compile)
    model.set_parameter(0, torch.tensor([0.031, -0.017]), tireg.mappings.SigmoidMapping(-0.5, 0.5))
    model.set_parameter(1, torch.tensor([1.02, 0.97]), tireg.mappings.ExpMapping())
    model.p[2] = torch.nn.Parameter(torch.tensor([2.37], dtype=moving.dtype))  # one shift shared by both pairs
    model.set_parameter(3, torch.tensor([-1.61, 0.83]))
    return model


def _assert_same_step(models, moving, fixed, rtol=1e-9):
    (warped_ref, cost_ref), (warped, cost) = [model(moving, fixed) for model in models]
    torch.testing.assert_close(warped, warped_ref, rtol=rtol, atol=rtol)
    torch.testing.assert_close(cost, cost_ref, rtol=rtol, atol=0)
    # rounding of sums over the pixels goes with the largest gradient (one parameter's may be near 0)
    scale = max(float(reference.grad.abs().max()) for reference in models[0].p)
    for reference, fast in zip(models[0].p, models[1].p):
        assert fast.grad.shape == reference.grad.shape
        torch.testing.assert_close(fast.grad, reference.grad, rtol=rtol, atol=rtol * scale)


def test_whole_compiled_step_equals_reference_step(monkeypatch, generator):
    """The ready-made model's one-graph step (run eagerly here) == the reference step, mappings and sharing included."""
    monkeypatch.setattr(fused, "compiled", lambda function, device, **options: function)
    fixed = smooth_random_image((2, 1, 36, 40), generator)
    moving = smooth_random_image((2, 1, 36, 40), generator)
    models = [_mapped_similarity(moving, compile) for compile in (False, True)]
    assert models[1]._compiled_step_applies() and not models[0]._compiled_step_applies()
    _assert_same_step(models, moving, fixed)
    _assert_same_step(models, moving, fixed)  # a second step accumulates into param.grad, as backward() would


class _OwnMatrix(tireg.FullAffineModelAnalytic):
    """A subclass with its own get_matrix/get_derva (the seed's way): no whole compiled step."""

    def get_matrix(self):
        return super().get_matrix()

    def get_derva(self, i):
        return TRANSFORMS["affine"].jacobian(self._transform_parameters(), self._center_tensor())[:, i]


class _OwnMapping(tireg.mappings.IdentityMapping):
    pass


def test_own_math_runs_eagerly_around_the_kernel(monkeypatch, generator):
    monkeypatch.setattr(fused, "compiled", lambda function, device, **options: function)
    fixed = smooth_random_image((1, 1, 30, 34), generator)
    moving = smooth_random_image((1, 1, 30, 34), generator)
    own = _OwnMatrix(16.5, 14.5, "zeros", moving, compile=True).double()
    mapped = tireg.create_model("affine", moving, compile=True)
    mapped.set_parameter(4, 1.5, _OwnMapping())
    assert not own._compiled_step_applies() and not mapped._compiled_step_applies()
    for model in (own, mapped):
        for i, value in enumerate((1.0213, 0.0513, -0.0417, 0.9871, 3.31, -2.71)):  # no point on a pixel (a kink)
            model.set_parameter(i, value)
        reference = tireg.create_model("affine", moving)
        for i in range(6):
            reference.set_parameter(i, model.get(i))
        _assert_same_step([reference, model], moving, fixed)


def test_inductor_options_unknown_to_this_torch_are_left_out(monkeypatch):
    monkeypatch.setattr(fused, "_OPTIONS_32_BIT", {**fused._OPTIONS_32_BIT, "no_such_option_in_any_torch": 1})
    options = fused._known_options(small=True)
    assert "no_such_option_in_any_torch" not in options
    assert options.get("assert_indirect_indexing") is False  # this torch (2.13) has it


def test_compile_needs_the_analytic_model():
    with pytest.raises(ValueError, match="'compile' applies to the analytic model"):
        tireg.create_model("rigid", torch.rand(1, 1, 16, 16), gradients="autograd", compile=True)
    assert isinstance(tireg.create_model("rigid", torch.rand(1, 1, 16, 16), gradients="autograd"), tireg.RigidModel)


def test_model_compiles_automatically_once_its_eager_steps_have_paid(monkeypatch, generator):
    """compile="auto", the default: eager steps until they have taken AUTO_COMPILE_SECONDS, then
    the compiled step (run eagerly here), with the reference numbers.

    The model's clock is a fake one that advances 1.25 s at each reading (a step reads it twice,
    before and after): the real one made "three steps are far from paying" a wall-clock bet, and
    1.25 s steps reach the default 10 s exactly, after the eighth."""
    models_module = importlib.import_module("tireg.models")
    calls = []

    def counting(function, device, **options):
        def run(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)
        return run

    readings = []

    def perf_counter() -> float:
        readings.append(1.25 * len(readings))  # exact in binary: the sums below are too
        return readings[-1]

    monkeypatch.setattr(fused, "compiled", counting)
    monkeypatch.setattr(models_module, "time", type("FakeTime", (), {"perf_counter": staticmethod(perf_counter)}))
    assert models_module.AUTO_COMPILE_SECONDS == 10.0
    fixed = smooth_random_image((2, 1, 36, 40), generator)
    moving = smooth_random_image((2, 1, 36, 40), generator)
    assert tireg.create_model("similarity", moving).compile == "auto"
    reference, auto = _mapped_similarity(moving, False), _mapped_similarity(moving, "auto")
    for step in range(1, 9):  # eight eager steps of 1.25 s each: 10 s, due at the next
        _assert_same_step([reference, auto], moving, fixed)
        assert calls == [] and auto._eager_seconds == 1.25 * step and len(readings) == 2 * step
    _assert_same_step([reference, auto], moving, fixed)  # the ninth: compiled, and no longer timed
    assert calls == ["_fused_step"] and auto._eager_seconds == 10.0 and len(readings) == 16
    _assert_same_step([reference, auto], moving, fixed)
    assert calls == ["_fused_step"] * 2 and len(readings) == 16
    auto.compile = "auto"  # setting it starts the clock again
    assert auto._eager_seconds == 0.0
    _assert_same_step([reference, auto], moving, fixed)
    assert calls == ["_fused_step"] * 2 and auto._eager_seconds == 1.25 and len(readings) == 18
    monkeypatch.setattr(models_module, "AUTO_COMPILE_SECONDS", 1.25)  # now it has paid
    _assert_same_step([reference, auto], moving, fixed)
    assert calls == ["_fused_step"] * 3 and len(readings) == 18
    assert reference.compile is False and reference._eager_seconds == 0.0  # False never compiles, nor times


# -- the compiled kernel ------------------------------------------------------


@needs_compile
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_compiled_model_step_equals_reference_step(padding_mode, device, generator):
    fixed = smooth_random_image((2, 2, 48, 40), generator).float().to(device)  # two channels,
    moving = smooth_random_image((2, 2, 44, 52), generator).float().to(device)  # another size
    models = [tireg.create_model("similarity", moving, padding_mode=padding_mode, loss="cauchy", compile=flag)
              for flag in (False, True)]
    for model in models:
        model.set_parameter(0, torch.tensor([0.031, -0.017]), tireg.mappings.SigmoidMapping(-0.5, 0.5))
        model.set_parameter(2, torch.tensor([2.37, -1.61]))
        model.to(device)
    assert models[1]._compiled_step_applies()  # the whole step in one compiled graph
    with warnings.catch_warnings():  # a compile that fell back would compare the reference with itself
        warnings.simplefilter("error", RuntimeWarning)
        (warped_ref, cost_ref), (warped, cost) = [model(moving, fixed) for model in models]
    assert torch.device(device).type not in fused._failed
    torch.testing.assert_close(warped, warped_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(cost, cost_ref, rtol=1e-5, atol=0)
    for reference, fast in zip(models[0].p, models[1].p):
        torch.testing.assert_close(fast.grad, reference.grad, rtol=1e-3, atol=1e-3 * float(reference.grad.abs().max()))


@needs_compile
def test_compiled_model_step_of_a_large_image_runs_in_bands(monkeypatch, generator):
    """An image beyond one band of a warped image's step (fused.step_in_bands, made small here):
    the kernel in bands around the eager chain rule, the model keeping one band's coordinates,
    not the whole image's (8 bytes a pixel: for one pair as much as its input images); the
    reference step's numbers.  One pair (a batch's bands: test_bands_of_a_batch_add_up_to_one_calls_sums)."""
    monkeypatch.setattr(fused, "STEP_BAND_PIXELS", 12 * 40)  # four bands of twelve rows
    fixed = smooth_random_image((1, 1, 48, 40), generator).float()
    moving = smooth_random_image((1, 1, 44, 52), generator).float()
    models = [tireg.create_model("similarity", moving, padding_mode="border", loss="cauchy", compile=flag)
              for flag in (False, True)]
    for model in models:
        model.set_parameter(0, 0.031, tireg.mappings.SigmoidMapping(-0.5, 0.5))
        model.set_parameter(2, 2.37)
    calls = []
    run = fused.run_compiled
    monkeypatch.setattr(fused, "run_compiled", lambda *args, **kwargs: calls.append(args[0].shape[-2]) or run(*args, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        _assert_same_step(models, moving, fixed, rtol=1e-4)
        _assert_same_step(models, moving, fixed, rtol=1e-4)
    assert calls == [12] * 8  # no whole compiled step: four bands a step
    assert [tuple(grid.shape) for grid in models[1]._coordinates[1]] == [(1, 1, 12, 40)] * 2



@needs_compile
def test_the_compiled_kernel_serves_no_per_pixel_cost_of_ones_own(generator):
    """The kernel writes sum w rho itself: a PerPixelMetric subclass with its own cost runs the
    reference path, in cost_and_gradient(compile=True) and register(compile=True) (both had taken
    the kernel and given the base class's cost, in an audit)."""
    register_module = importlib.import_module("tireg.register")
    fixed = smooth_random_image((2, 1, 40, 36), generator).float()
    moving = smooth_random_image((2, 1, 40, 36), generator).float()
    matrix = _matrix(2, torch.float32)
    metric = OwnPerPixelCost("l2")
    expected = tireg.analytic.cost_and_gradient(fixed, moving, matrix, metric)
    compiled = tireg.analytic.cost_and_gradient(fixed, moving, matrix, metric, compile=True)
    for want, got in zip(expected, compiled):
        assert torch.equal(got, want)
    center = torch.tensor(tireg.transforms.image_center(40, 36))
    kind = tireg.transforms.TRANSFORMS["affine"]
    assert not register_module._Problem(kind, center, metric, "bilinear", compile=True).compile
    assert register_module._Problem(kind, center, tireg.metrics.PerPixelMetric("l2"), "bilinear", compile=True).compile


@needs_compile
@pytest.mark.parametrize("kind", ["translation", "rigid", "anisotropic_similarity", "affine"])
def test_every_ready_made_model_compiles_its_whole_step(kind, generator):
    """Each transform's matrix and Jacobian trace into the one graph (no fallback), with the reference numbers.

    One pair: its graph has fixed sizes, which compile in about half the time of a batch's
    symbolic ones (test_compiled_model_step_equals_reference_step compiles a batch's)."""
    fixed = smooth_random_image((1, 1, 40, 48), generator).float()
    moving = smooth_random_image((1, 1, 40, 48), generator).float()
    models = [tireg.create_model(kind, moving, padding_mode="border", compile=flag) for flag in (False, True)]
    for model in models:
        count = model.num_parameters
        model.set_parameter(count - 2, 0.37)
        model.set_parameter(count - 1, -0.21)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        _assert_same_step(models, moving, fixed, rtol=1e-4)
        _assert_same_step(models, moving, fixed, rtol=1e-4)  # accumulates: no two gradients share memory
    assert len({param.grad.data_ptr() for param in models[1].p}) == models[1].num_parameters


@needs_compile
@pytest.mark.parametrize("prepare", [fused.pad_moving, fused.prepare_moving], ids=["padded", "packed"])
def test_compiled_kernel_keeps_wild_matrices_finite(prepare, generator):
    """A NaN, infinite or huge shift sends every point to the padding (fmin/fmax): finite sums,
    nothing counted, and no gather outside the image's memory."""
    fixed = smooth_random_image((4, 1, 24, 20), generator).float()
    moving = smooth_random_image((4, 1, 24, 20), generator).float()
    padded = prepare(moving, "zeros")
    matrix = _matrix(4, torch.float32)
    matrix[0, 0, 2], matrix[1, 1, 2], matrix[2, 0, 2] = float("nan"), float("inf"), -1e30
    result = fused.run_compiled(fixed, padded, matrix, tireg.L2Loss(), "zeros", inside_only=True, hessian=True,
                                coordinates=fused.coordinate_grids(fixed))
    for value in (result.cost, result.matrix_gradient, result.products):
        assert torch.isfinite(value).all()
    assert result.count[:3].tolist() == [0.0, 0.0, 0.0] and float(result.count[3]) > 0
    expected = fused.bilinear_moments(fixed[3:], padded[3:], matrix[3:], tireg.L2Loss(), "zeros", inside_only=True)
    torch.testing.assert_close(result.matrix_gradient[3:], expected.matrix_gradient, rtol=1e-4, atol=1e-4)


def test_batches_on_the_cpu_compile_with_every_size_symbolic():
    """fused.dynamic_shapes: a batch of pairs on the CPU gets dynamic=True, one pair (or another device) torch's default."""
    assert fused.dynamic_shapes(torch.zeros(2, 1, 8, 8)) is True
    assert fused.dynamic_shapes(torch.zeros(1, 3, 8, 8)) is None
    assert fused.dynamic_shapes(torch.zeros(4, 1, 8, 8, device="meta")) is None


@needs_compile
def test_one_kernel_serves_every_batch_and_level_size(monkeypatch, generator):
    """A batch's kernel is compiled once for all batch sizes and pyramid level sizes, with the formulation's sums."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "_compiled", {})
    torch._dynamo.reset()
    counters.clear()
    for shape in [(2, 1, 24, 20), (3, 1, 30, 28), (4, 1, 40, 36)]:
        fixed = smooth_random_image(shape, generator).float()
        moving = smooth_random_image(shape, generator).float()
        padded, matrix = fused.prepare_moving(moving, "border"), _matrix(shape[0], torch.float32)
        options = dict(inside_only=True, hessian=True, coordinates=fused.coordinate_grids(fixed))
        result = fused.run_compiled(fixed, padded, matrix, tireg.CauchyLoss(), "border", **options)
        expected = fused.bilinear_moments(fixed, padded, matrix, tireg.CauchyLoss(), "border", **options)
        for name in ("cost", "count", "matrix_gradient", "products"):
            torch.testing.assert_close(getattr(result, name), getattr(expected, name), rtol=1e-4, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("return_warped", [False, True])
def test_bands_of_a_batch_add_up_to_one_calls_sums(monkeypatch, return_warped, generator):
    """run_compiled_in_bands on a batch, its kernel run eagerly (the same function the compiled one
    traces): the bands' shifted sums are one call's sums in float64, weights and products included,
    and the warped image is stored band by band."""
    fixed = smooth_random_image((3, 2, 37, 23), generator)
    moving = smooth_random_image((3, 2, 33, 29), generator)
    weight = (torch.rand(3, 1, 37, 23, generator=generator, dtype=torch.float64) > 0.2).double()
    padded, matrix = fused.prepare_moving(moving, "border"), _matrix(3)
    options = dict(inside_only=True, hessian=True)
    whole = fused.bilinear_moments(fixed, padded, matrix, tireg.CauchyLoss(), "border", weight,
                                   return_warped=return_warped, **options)
    bands = []
    monkeypatch.setattr(fused, "run_compiled", lambda *args, **kwargs: bands.append(args[0].shape[-2])
                        or fused.bilinear_moments(*args, **kwargs))
    banded = fused.run_compiled_in_bands(fixed, padded, matrix, tireg.CauchyLoss(), "border", weight,
                                         coordinates=fused.coordinate_grids(fixed), rows=10,
                                         return_warped=return_warped, **options)
    assert bands == [10, 10, 10, 7]
    for name in ("cost", "count", "matrix_gradient", "products") + (("warped",) if return_warped else ()):
        torch.testing.assert_close(getattr(banded, name), getattr(whole, name), rtol=1e-12, atol=1e-10)


@needs_compile
def test_kernel_in_bands_of_rows_gives_the_same_sums(monkeypatch, generator):
    """run_compiled_in_bands: bands of rows (the last one shorter) add up to one call's sums, weights included.

    One pair (the case bands are for: one large image); a batch's kernel is the same code with
    every size symbolic, and each variant compiled costs CI 10-20 s."""
    fixed = smooth_random_image((1, 1, 37, 23), generator).float()
    moving = smooth_random_image((1, 1, 33, 29), generator).float()
    weight = (torch.rand(1, 1, 37, 23, generator=generator) > 0.2).float()
    padded, matrix = fused.prepare_moving(moving, "border"), _matrix(1, torch.float32)
    options = dict(inside_only=True, hessian=True, coordinates=fused.coordinate_grids(fixed))
    whole = fused.run_compiled(fixed, padded, matrix, tireg.CauchyLoss(), "border", weight, **options)
    calls = []
    run = fused.run_compiled
    monkeypatch.setattr(fused, "run_compiled", lambda *args, **kwargs: calls.append(args[0].shape) or run(*args, **kwargs))
    monkeypatch.setattr(fused, "BAND_PIXELS", 10 * 23)  # ten rows a band
    banded = fused.run_compiled_in_bands(fixed, padded, matrix, tireg.CauchyLoss(), "border", weight, **options)
    assert [shape[-2] for shape in calls] == [10, 10, 10, 7]
    for name in ("cost", "count", "matrix_gradient", "products"):
        torch.testing.assert_close(getattr(banded, name), getattr(whole, name), rtol=1e-5, atol=1e-4)
    calls.clear()
    options["coordinates"] = None  # a GPU's kernel (no stored coordinates): one call (not compiled here)
    monkeypatch.setattr(fused, "run_compiled", lambda *args, **kwargs: calls.append(args[0].shape) or whole)
    assert fused.run_compiled_in_bands(fixed, padded, matrix, tireg.CauchyLoss(), "border", weight, **options) is whole
    assert [shape[-2] for shape in calls] == [37]


@needs_compile
def test_kernel_in_bands_writes_the_warped_image_band_by_band(monkeypatch, generator):
    """run_compiled_in_bands(return_warped=True): each band's pass stores its rows into one output
    image (warped_into), which equals one call's warped image; the sums as one call's."""
    fixed = smooth_random_image((1, 2, 37, 23), generator).float()
    moving = smooth_random_image((1, 2, 33, 29), generator).float()
    padded, matrix = fused.prepare_moving(moving, "border"), _matrix(1, torch.float32)
    whole = fused.run_compiled(fixed, padded, matrix, tireg.L2Loss(), "border", return_warped=True,
                               coordinates=fused.coordinate_grids(fixed))
    calls = []
    run = fused.run_compiled
    monkeypatch.setattr(fused, "run_compiled", lambda *args, **kwargs: calls.append(kwargs) or run(*args, **kwargs))
    band_grid = fused.coordinate_grids(fixed[..., :10, :])  # one band's coordinates are enough
    banded = fused.run_compiled_in_bands(fixed, padded, matrix, tireg.L2Loss(), "border", return_warped=True,
                                         coordinates=band_grid, rows=10)
    assert len(calls) == 4 and all(call["warped_into"] is not None and "return_warped" not in call for call in calls)
    assert banded.warped.shape == fixed.shape
    torch.testing.assert_close(banded.warped, whole.warped, rtol=1e-5, atol=1e-5)
    for name in ("cost", "count", "matrix_gradient"):
        torch.testing.assert_close(getattr(banded, name), getattr(whole, name), rtol=1e-5, atol=1e-4)


def test_bilinear_moments_writes_the_warped_image_into_a_given_tensor(generator):
    """bilinear_moments(warped_into=...): M(A x) stored into a view of a taller image, nothing returned."""
    fixed = smooth_random_image((2, 1, 12, 10), generator)
    moving = smooth_random_image((2, 1, 11, 13), generator)
    padded, matrix = fused.pad_moving(moving, "zeros"), _matrix(2, torch.float64)
    expected = fused.bilinear_moments(fixed, padded, matrix, tireg.L2Loss(), "zeros", return_warped=True)
    image = torch.full((2, 1, 20, 10), -7.0, dtype=torch.float64)
    result = fused.bilinear_moments(fixed, padded, matrix, tireg.L2Loss(), "zeros", warped_into=image[:, :, 5:17])
    assert result.warped is None
    assert torch.equal(image[:, :, 5:17], expected.warped)
    assert (image[:, :, :5] == -7.0).all() and (image[:, :, 17:] == -7.0).all()
    torch.testing.assert_close(result.matrix_gradient, expected.matrix_gradient, rtol=0, atol=0)


def test_a_warped_images_step_runs_in_bands_only_where_they_pay():
    """step_band_rows: bands of about STEP_BAND_PIXELS pixels or more, at most STEP_BANDS of them,
    the last short by fewer rows than there are bands; an image of less than two bands' pixels
    (one 1024^2 pair) runs whole, and a GPU (no stored coordinates) whole."""
    assert fused.STEP_BAND_PIXELS == 1 << 20 and fused.STEP_BANDS == 8
    assert fused.step_band_rows(1024, 1024) == 1024 and not fused.step_in_bands(torch.empty(8, 1, 1024, 1024))
    assert fused.step_band_rows(2048, 2048) == 512  # four bands of 2^20 pixels
    assert fused.step_band_rows(4096, 4096) == 512  # eight bands: the stored coordinates an eighth of a plane
    assert fused.step_band_rows(3000, 5000) == 375
    assert fused.step_band_rows(1025, 1024) == 1025  # not 1024 rows and one (an audit's)
    assert fused.step_band_rows(2049, 1024) == 1025  # two bands, 1025 and 1024 rows, not three
    for height, width in ((1100, 1000), (2049, 1024), (5000, 3001), (4097, 4096)):
        rows = fused.step_band_rows(height, width)
        bands = -(-height // rows)
        assert bands <= fused.STEP_BANDS and height - (bands - 1) * rows > rows - bands
    assert fused.step_in_bands(torch.empty(1, 1, 2048, 2048))
    assert not fused.step_in_bands(torch.empty(1, 1, 2048, 2048, device="meta"))


@needs_compile
def test_compiled_register_in_bands_gives_the_same_matrices(monkeypatch):
    """The finer levels in bands of rows, the coarser whole, with a robust loss: the reference's matrix."""
    fixed, moving, truth = registration_pair("camera", "similarity", [0.06, 1.04, 4.0, -3.0], noise=0.02)
    reference = tireg.register(fixed, moving, transform="similarity", metric="cauchy", compile=False)
    monkeypatch.setattr(fused, "BAND_PIXELS", 40 * fixed.shape[-1])  # bands of 40 rows at full resolution
    calls = []
    run = fused.run_compiled
    monkeypatch.setattr(fused, "run_compiled", lambda *args, **kwargs: calls.append(args[0].shape[-2]) or run(*args, **kwargs))
    with warnings.catch_warnings():  # a compile that fell back would compare the reference with itself
        warnings.simplefilter("error", RuntimeWarning)
        banded = tireg.register(fixed, moving, transform="similarity", metric="cauchy", compile=True)
    assert 40 in calls and fixed.shape[-2] not in calls  # the full resolution in bands
    assert banded.stop_reason == reference.stop_reason == ["converged"]
    assert grid_error(banded.matrix, reference.matrix, fixed.shape) < 1e-3
    assert grid_error(banded.matrix, truth, fixed.shape) < 0.2


@needs_compile
def test_compiled_trials_of_the_active_pairs_share_the_packed_image(monkeypatch):
    """Once pairs have stopped, a compiled trial evaluates the active ones as runs of consecutive
    pairs, views of the level that share its packed moving image, where the runs' kernel calls cost
    less than the stopped pairs (``RUN_PIXELS``), else the whole batch: copies of their images (the
    reference path's ``_Level.select``) had raised the peak of 128 pairs of 256^2 from 2.9x to 3.9x
    their input.  Each pair's result is still the one it has alone, bit for bit."""
    register_module = importlib.import_module("tireg.register")
    fixed, moving = staggered_affine_batch()
    sizes, runs = count_evaluated_pairs(monkeypatch), []
    pairs_of = register_module._Level.pairs

    def viewed(level, part):
        view = pairs_of(level, part)
        if "padded" in level.cache:  # a compiled level's
            runs.append(part)
            assert view.cache["padded"].data_ptr() == level.cache["padded"][part].data_ptr()  # a view, not a copy
        return view

    monkeypatch.setattr(register_module._Level, "pairs", viewed)
    monkeypatch.setattr(register_module._Level, "select", lambda *args: pytest.fail("copied the active pairs"))
    monkeypatch.setattr(register_module, "RUN_PIXELS", 1)  # runs pay (96^2 pairs: a call costs more)
    batch = tireg.register(fixed, moving, transform="affine", compile=True)
    assert min(sizes) < 8 and runs, sizes
    sizes.clear(), runs.clear()
    monkeypatch.setattr(register_module, "RUN_PIXELS", 1 << 30)  # they do not: the whole batch
    again = tireg.register(fixed, moving, transform="affine", compile=True)
    assert set(sizes) == {8} and not runs, sizes
    assert torch.equal(again.matrix, batch.matrix)
    monkeypatch.undo()
    for index in (0, 3, 6):
        alone = tireg.register(fixed[index], moving[index], transform="affine", compile=True)
        assert torch.equal(batch.matrix[index], alone.matrix), index
        assert batch.stop_reason[index] == alone.stop_reason[0]


@needs_compile
def test_compiled_register_gives_the_same_matrices(device):
    pairs = [registration_pair("camera", "affine", params, noise=0.02, seed=seed)
             for seed, params in enumerate([[1.05, 0.06, -0.04, 0.96, 5.0, -3.5], [0.97, -0.05, 0.03, 1.04, -6.0, 2.5]])]
    fixed = torch.stack([pair[0] for pair in pairs])[:, None].to(device)
    moving = torch.stack([pair[1] for pair in pairs])[:, None].to(device)
    for metric in ("l2",):  # a robust loss: test_compiled_register_in_bands_gives_the_same_matrices
        reference = tireg.register(fixed, moving, transform="affine", metric=metric, compile=False)
        with warnings.catch_warnings():  # a compile that fell back would compare the reference with itself
            warnings.simplefilter("error", RuntimeWarning)
            fast = tireg.register(fixed, moving, transform="affine", metric=metric, compile=True)
        assert torch.device(device).type not in fused._failed
        assert fast.stop_reason == reference.stop_reason == ["converged", "converged"]
        for index, (_, _, truth) in enumerate(pairs):
            size = fixed.shape[-2:]
            assert grid_error(fast.matrix[index], reference.matrix[index], size) < 1e-3, metric
            assert grid_error(fast.matrix[index], truth, size) < 0.2, metric


def test_the_cpu_allocator_running_out_is_raised_too(monkeypatch, generator):
    """The CPU's allocator raises a RuntimeError, which was taken for a compile failure."""
    fixed, moving = _kernel_that_raises(monkeypatch, generator,
                                        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB"))
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        fused.run_compiled(fixed, fused.pad_moving(moving, "zeros"), _matrix(1).float(), tireg.L2Loss(), "zeros")
    assert fused._failed == set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepare_moving_smooths_inside_the_prepared_copy(dtype):
    # register's full-resolution level is smoothed (register.FINEST_SMOOTHING); the compiled path packs
    # the moving image from the unnormalised one, normalised and smoothed inside the packed copy (no
    # image-sized copy of its own): bit for bit the packing of the normalised, smoothed image
    from tireg.sampling import gaussian_blur

    moving = 5.0 * torch.rand(2, 3, 21, 17, generator=torch.Generator().manual_seed(0), dtype=dtype) + 1.0
    mean, std = moving.mean((2, 3), keepdim=True), moving.std(dim=(2, 3), keepdim=True)
    prepared = fused.prepare_moving(moving, "border", normalization=(mean, std), smoothing=1.0)
    expected = fused.prepare_moving(gaussian_blur((moving - mean) / std, 1.0), "border")
    assert prepared.dtype == expected.dtype and torch.equal(prepared, expected)
    with pytest.raises(ValueError, match="smoothing needs 'border' padding"):
        fused.prepare_moving(moving, "zeros", smoothing=1.0)


def test_dynamo_s_recompile_limit_warning_about_tireg_s_own_kernels_is_dropped():
    """call_compiled raises the limit for a tireg kernel past dynamo's eighth variant and runs it
    compiled; dynamo's nine-line warning of a fallback that did not happen got past -q (a log
    record).  Its warning about any other function stays."""
    import logging

    fused.compiled(fused.bilinear_moments, torch.device("cpu"))
    fused.compiled(fused.bilinear_moments, torch.device("cpu"), small=True)
    logger = logging.getLogger("torch._dynamo.convert_frame")
    assert sum(isinstance(existing, fused._OwnRecompileLimit) for existing in logger.filters) == 1

    def record(path: str) -> logging.LogRecord:
        return logging.LogRecord(logger.name, logging.WARNING, "convert_frame.py", 1,
                                 "torch._dynamo hit config.recompile_limit (8)\n   function: 'f' (%s:254)", (path,), None)

    own = os.path.join(os.path.dirname(fused.__file__), "fused.py")
    assert not logger.filter(record(own))
    assert logger.filter(record(os.path.join(os.getcwd(), "users_model.py")))
