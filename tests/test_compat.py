"""The seed document's names and walkthrough, through ``tireg.compat``."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tireg.compat import Affy, AffyModel, AffyModelAnal, Mapping, PerPixelLoss
from tireg.transforms import anisotropic_similarity_matrix

ROOT = Path(__file__).resolve().parents[1]
#: An integer dtype of each float dtype's width: equal views are equal bits.
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
EXAMPLE = ROOT / "examples" / "seed_walkthrough.py"
SEED = ROOT.parent / "shared" / "seed" / "000_6a13fb89c99a4973.txt"


def load_example():
    spec = importlib.util.spec_from_file_location("seed_walkthrough", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_names_exist():
    import tireg

    assert PerPixelLoss.PerPixelLoss is tireg.PerPixelLoss
    assert AffyModel.AffineModel is tireg.AffineModel
    assert AffyModelAnal.AffineModelAnalytic is tireg.AffineModelAnalytic
    assert Mapping.IdentityMapping is tireg.IdentityMapping
    assert Mapping.SigmoidMapping is tireg.SigmoidMapping
    for name in ("get_matrix", "da", "dx", "dy", "ds", "dsx", "dsy"):
        assert callable(getattr(Affy, name))


def test_affy_get_matrix_is_opencv_rotation_about_a_centre_plus_shift():
    angle, scale, cx, cy, dx, dy = 0.3, 1.2, 10.0, 7.0, 2.0, -3.0
    alpha, beta = scale * torch.cos(torch.tensor(angle)), scale * torch.sin(torch.tensor(angle))
    opencv = torch.tensor(
        [
            [alpha, beta, (1 - alpha) * cx - beta * cy + dx],
            [-beta, alpha, beta * cx + (1 - alpha) * cy + dy],
            [0.0, 0.0, 1.0],
        ]
    )
    assert torch.allclose(Affy.get_matrix(torch.tensor(angle), scale, scale, dx, dy, cx, cy), opencv, atol=1e-6)


@pytest.mark.parametrize("name, index", [("da", 0), ("dsx", 1), ("dsy", 2), ("dx", 3), ("dy", 4)])
def test_affy_derivatives_against_autograd(name, index):
    values = torch.tensor([0.2, 1.1, 0.9, 3.0, -2.0], dtype=torch.float64)
    cx, cy = 12.0, 5.0
    jacobian = torch.autograd.functional.jacobian(lambda p: Affy.get_matrix(*p, cx, cy), values)
    derivative = getattr(Affy, name)(*values, cx, cy)
    assert torch.allclose(derivative, jacobian[..., index], atol=1e-12)


@pytest.mark.parametrize("name", ["da", "dsx", "dsy", "ds"])
def test_affy_derivatives_differentiate_through_every_argument_as_the_general_path(name):
    """The seed's call (tensors, a centre of Python numbers) takes a short path; where autograd
    records, that path left the arguments a derivative does not depend on out of the graph, and
    ``autograd.grad`` raised "appears to not have been used in the graph" where a NumPy centre
    (the general path) gives them zeros.  (``dx``, ``dy``: constants on either path.)"""
    count = 4 if name == "ds" else 5

    def gradients(cx, cy):
        values = [torch.tensor([x], dtype=torch.float64, requires_grad=True) for x in (0.3, 1.1, 0.9, 3.0, -2.0)]
        values = values[:2] + values[3:] if name == "ds" else values
        result = getattr(Affy, name)(*values, cx, cy)
        return result, torch.autograd.grad((result * torch.arange(9.0, dtype=torch.float64).view(3, 3)).sum(), values)

    short, short_gradients = gradients(27.5, 19.5)
    general, general_gradients = gradients(np.float64(27.5), np.float64(19.5))
    assert torch.equal(short, general) and len(short_gradients) == count
    for got, expected in zip(short_gradients, general_gradients):
        assert torch.equal(got, expected)


def test_affy_ds_is_the_isotropic_scale_derivative():
    angle, scale, dx, dy = torch.tensor(0.2, dtype=torch.float64), 1.1, 3.0, -2.0
    step = 1e-6
    numeric = (Affy.get_matrix(angle, scale + step, scale + step, dx, dy, 4.0, 9.0)
               - Affy.get_matrix(angle, scale - step, scale - step, dx, dy, 4.0, 9.0)) / (2 * step)
    assert torch.allclose(Affy.ds(angle, scale, dx, dy, 4.0, 9.0), numeric, atol=1e-8)
    assert not torch.allclose(Affy.ds(angle, scale, dx, dy, 4.0, 9.0), Affy.dsx(angle, scale, scale, dx, dy, 4.0, 9.0))


def test_affy_is_batched_and_keeps_dtype_and_device(device):
    angles = torch.tensor([0.0, 0.1, 0.2], device=device)
    matrices = Affy.get_matrix(angles, 1.0, 1.0, 0.0, 0.0, 5.0, 5.0)
    assert matrices.shape == (3, 3, 3) and matrices.device.type == device and matrices.dtype == torch.float32
    params = torch.stack([angles, torch.ones(3, device=device), torch.ones(3, device=device),
                          torch.zeros(3, device=device), torch.zeros(3, device=device)], -1)
    assert torch.allclose(matrices, anisotropic_similarity_matrix(params, (5.0, 5.0)))


@pytest.mark.slow
def test_seed_walkthrough_recovers_the_known_transform():
    example = load_example()
    errors = example.run(iterations=300, verbose=False)
    assert errors["autograd"] < 0.5, errors
    assert errors["analytic"] < 0.5, errors


def test_seed_walkthrough_image_is_real_and_non_square():
    example = load_example()
    source, target, true_matrix, cx, cy = example.make_pair()
    assert target.shape[-2] != target.shape[-1]
    assert (cx, cy) == ((target.shape[-1] - 1) / 2, (target.shape[-2] - 1) / 2)
    assert target.std() > 0.1  # a photograph, not a flat image
    assert not torch.allclose(source, target)


def _seed_code_blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [[line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
            for block in blocks]


@pytest.mark.skipif(not SEED.exists(), reason="the seed document lies outside this checkout")
def test_every_seed_snippet_appears_verbatim_in_the_example():
    example_lines = [line.strip() for line in EXAMPLE.read_text().splitlines()]
    blocks = _seed_code_blocks(SEED.read_text())
    assert len(blocks) >= 6
    for block in blocks:
        position = 0
        for line in block:
            assert line in example_lines[position:], f"seed line not found in order: {line!r}"
            position = example_lines.index(line, position) + 1


def _reference(values, dtype=torch.float64):
    """``anisotropic_similarity_matrix`` from ``(angle, sx, sy, dx, dy, cx, cy)`` converted once to ``dtype``."""
    numbers = [float(v) for v in values]
    return anisotropic_similarity_matrix(torch.tensor(numbers[:5], dtype=dtype), torch.tensor(numbers[5:], dtype=dtype))


def test_affy_float64_centre_makes_the_whole_matrix_float64():
    # The dtype had come from the parameters alone: float32 here, the centre rounded.
    matrix = Affy.get_matrix(0.1, 1, 1, 0, 0, torch.tensor(1000.1, dtype=torch.float64), 2000.3)
    assert matrix.dtype == torch.float64
    assert torch.equal(matrix, _reference((0.1, 1, 1, 0, 0, 1000.1, 2000.3)))


def test_affy_python_float_centre_is_converted_in_float64_not_through_float32():
    # A float64 angle with a Python-float centre had used a float32 centre: 5e-6 px off at 1000 px.
    matrix = Affy.get_matrix(torch.tensor(0.1, dtype=torch.float64), 1, 1, 0, 0, 1000.1, 2000.3)
    assert matrix.dtype == torch.float64
    assert torch.equal(matrix, _reference((0.1, 1, 1, 0, 0, 1000.1, 2000.3)))
    derivative = Affy.da(torch.tensor(0.1, dtype=torch.float64), 1, 1, 0, 0, 1000.1, 2000.3)
    assert derivative.dtype == torch.float64
    assert derivative[0, 2].item() == pytest.approx(-(-math.sin(0.1) * 1000.1 + math.cos(0.1) * 2000.3), abs=1e-12)


@pytest.mark.parametrize("values, dtype", [
    ((torch.tensor(0.3), torch.tensor(1.0, dtype=torch.float64), 1, 0, 0, 0, 0), torch.float64),
    ((0.3, 1, 1, 0, 0, 5.0, torch.tensor([5.0], dtype=torch.float64)), torch.float64),
    ((torch.tensor(0.3, dtype=torch.float16), torch.tensor(1.0), 1, 0, 0, 0, 0), torch.float32),
    ((torch.tensor([1, 2]), 1, 1, 0, 0, 0, 0), torch.float32),  # integers: the default dtype
    ((0.3, 1, 1, 0, 0, 5.0, 5.0), torch.float32),
])
def test_affy_result_dtype_is_torch_promotion_over_all_tensor_arguments(values, dtype):
    for function in (Affy.get_matrix, Affy.da, Affy.dsx, Affy.dy):
        assert function(*values).dtype == dtype
    assert Affy.ds(values[0], values[1], *values[3:]).dtype == dtype


def test_affy_zero_dimensional_cpu_tensor_goes_with_a_batch_on_any_device(device):
    angles = torch.tensor([0.0, 0.1], device=device)
    matrices = Affy.get_matrix(angles, 1, 1, 0, 0, torch.tensor(5.0, dtype=torch.float64), 5.0)
    assert matrices.device.type == device and matrices.dtype == torch.float64 and matrices.shape == (2, 3, 3)


@pytest.mark.parametrize("position, value, error, message", [
    (0, None, TypeError, r"'angle' must be a number, an array of numbers or a real tensor; got NoneType$"),
    (0, "0.3", TypeError, r"'angle' must be a number, an array of numbers or a real tensor; got '0.3'$"),
    (1, True, TypeError, r"'scalex' must be a number, an array of numbers or a real tensor; got True$"),
    (6, [[1.0], [2.0, 3.0]], TypeError, r"'cy' must be a number, an array of numbers or a real tensor; got list$"),
    (5, float("nan"), ValueError, r"'cx' must be finite; got nan$"),
    (3, [0.0, float("inf")], ValueError, r"'dx' holds NaN or Inf values$"),
    (0, torch.zeros(2, dtype=torch.complex64), TypeError, r"'angle' must hold real numbers; got a tensor of "
                                                          r"torch.complex64$"),
    (4, torch.zeros(2, dtype=torch.float16), TypeError, r"'dy' must be float32 or float64; got torch.float16$"),
    (2, torch.ones(2), ValueError, r"the shapes of 'angle' \(3,\) and 'scaley' \(2,\) do not broadcast$"),
])
def test_affy_refuses_bad_arguments_naming_them(position, value, error, message):
    values = [torch.arange(3), 1, 1, 0, 0, 0, 0]  # integers: no float dtype of their own
    values[position] = value
    with pytest.raises(error, match=r"^Affy.get_matrix\(\): " + message):
        Affy.get_matrix(*values)
    with pytest.raises(error, match=r"^Affy.dsy\(\): " + message):
        Affy.dsy(*values)


def test_affy_ds_names_its_scale_argument():
    with pytest.raises(ValueError, match=r"^Affy.ds\(\): the shapes of 'angle' \(3,\) and 'scale' \(2,\) do not "
                                         r"broadcast$"):
        Affy.ds(torch.zeros(3), torch.ones(2), 0, 0, 0, 0)


@pytest.mark.parametrize("position, value, message", [
    (1, 1e300, r"'scalex' is 1e\+300, beyond the range of float32"),
    (3, 1e39, r"'dx' is 1e\+39, beyond the range of float32"),
    (6, 10**39, r"'cy' is 1e\+39, beyond the range of float32"),
    (5, np.float64(-1e39), r"'cx' is -1e\+39, beyond the range of float32"),
    (4, [0.0, 1e39], r"'dy' holds values beyond the range of float32"),
])
def test_affy_refuses_a_finite_number_beyond_the_result_dtypes_range(position, value, message):
    # Every argument was finite, yet the float32 matrix had held inf and NaN, with no error.
    values = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    values[position] = value
    with pytest.raises(ValueError, match=r"^Affy.get_matrix\(\): " + message + r", the result's dtype .*"
                                         r"give it as a float64 tensor for a float64 result$"):
        Affy.get_matrix(*values)
    with pytest.raises(ValueError, match=r"^Affy.ds\(\): 'cx' is 1e\+39, beyond the range of float32"):
        Affy.ds(0.0, 1.0, 0.0, 0.0, 1e39, 0.0)
    # the largest float32 is no overflow, and a float64 result takes the number as it is
    assert torch.isfinite(Affy.get_matrix(0.0, 1.0, 1.0, 3.4028235e38, 0.0, 0.0, 0.0)).all()
    values[0] = torch.tensor(0.0, dtype=torch.float64)
    assert torch.isfinite(Affy.get_matrix(*values)).all()


@pytest.mark.parametrize("value", [10**400, -10**400, 10**5000], ids=["1e400", "-1e400", "1e5000"])
def test_an_integer_beyond_float64_is_refused_naming_the_caller_and_argument(value):
    # (10**5000 is too long even for str(): the message does not show the value.)
    # float() had raised a bare "OverflowError: int too large to convert to float", naming nothing.
    with pytest.raises(ValueError, match=r"^Affy.get_matrix\(\): 'angle' is beyond float64's range"):
        Affy.get_matrix(value, 1, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"^Affy.dy\(\): 'cy' is beyond float64's range"):
        Affy.dy(0, 1, 1, 0, 0, 0, value)
    # where a number is only read (real_number), such an integer is infinite, refused as infinity is
    with pytest.raises(ValueError, match=r"^SigmoidMapping\(\): need finite lo < hi; got lo=0.0, hi=-?inf$"):
        Mapping.SigmoidMapping(0.0, value)


# -- the seed's subclasses, written as the seed shows them ------------------------------------------


class SeedModel(AffyModel.AffineModel):
    def __init__(self, cx, cy, bordermode):
        super().__init__(cx, cy, bordermode)
        self.p = torch.nn.ParameterList(torch.tensor([i]) for i in [0.0, 0.0, 0.0, 1.0])
        self.m = [Mapping.IdentityMapping() for i in range(len(self.p))]

    def get_matrix(self):
        return Affy.get_matrix(self.get(0), self.get(3), self.get(3), self.get(1), self.get(2), self.cx, self.cy)


class SeedModelAnalytic(AffyModelAnal.AffineModelAnalytic):
    def __init__(self, cx, cy, bordermode, movingImage):
        super().__init__(cx, cy, bordermode, movingImage)

    def get_derva(self, idx):
        if idx == 0:
            return Affy.da(self.get(0), self.get(3), self.get(3), self.get(1), self.get(2), self.cx, self.cy)
        elif idx == 1:
            return Affy.dx(self.get(0), self.get(3), self.get(3), self.get(1), self.get(2), self.cx, self.cy)
        elif idx == 2:
            return Affy.dy(self.get(0), self.get(3), self.get(3), self.get(1), self.get(2), self.cx, self.cy)
        elif idx == 3:
            return Affy.ds(self.get(0), self.get(3), self.get(1), self.get(2), self.cx, self.cy)


def seed_mappings(model):
    model.set_parameter(0, 0.0, Mapping.SigmoidMapping(-0.25, 0.25))
    model.set_parameter(1, 0.0, Mapping.SigmoidMapping(-80.0, 80.0))
    model.set_parameter(2, 0.0, Mapping.SigmoidMapping(-130.0, 130.0))
    model.set_parameter(3, 1.0, Mapping.SigmoidMapping(0.5, 1.6))


def seed_images(dtype, batch=1):
    generator = torch.Generator().manual_seed(3)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(batch, 1, 40, 56, generator=generator), 5, 1, 2)
    moving = torch.roll(fixed, (1, -2), (-2, -1))
    return fixed.to(dtype), moving.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_seeds_analytic_model_equals_its_autograd_model(dtype):
    """The seed's pair as written (the analytic one overrides get_derva only, in the base's order),
    sigmoid mappings, three pairs sharing one parameter set: the same gradient, and no complaint
    from the check of get_derva against the matrix."""
    fixed, moving = seed_images(dtype, batch=3)
    cx, cy = (56 - 1) / 2, (40 - 1) / 2
    autograd, analytic = SeedModel(cx, cy, "zeros").to(dtype), SeedModelAnalytic(cx, cy, "zeros", moving).to(dtype)
    loss = PerPixelLoss.PerPixel_CauchyLoss()
    analytic.loss_func = loss
    for model in (autograd, analytic):
        seed_mappings(model)
        for i, value in enumerate((0.03, 1.5, -2.0, 1.04)):
            model.set_parameter(i, value)
    loss.forward(autograd(moving), fixed, False).sum().backward()
    analytic(moving, fixed)
    tolerance = dict(rtol=2e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(analytic.parameters(), autograd.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance)


def test_a_seed_style_get_derva_in_another_order_than_the_base_matrix_is_refused():
    """The seed's analytic model overrides get_derva only: its matrix is the base's, parameters
    (angle, dx, dy, scale). One copied with the parameters in its own order (angle, scale, dx, dy)
    warped with one function and differentiated another (loss 538 against autograd's 119, gradients
    4-450 % off), silently; the first forward says so and what to override."""
    fixed, moving = seed_images(torch.float64)

    class Mine(AffyModelAnal.AffineModelAnalytic):
        def __init__(self, cx, cy, bordermode, movingImage):
            super().__init__(cx, cy, bordermode, movingImage)
            self.p = torch.nn.ParameterList(torch.tensor([i]) for i in [0.0, 1.0, 0.0, 0.0])
            self.m = [Mapping.IdentityMapping() for i in range(len(self.p))]

        def get_derva(self, idx):
            arguments = (self.get(0), self.get(1), self.get(1), self.get(2), self.get(3), self.cx, self.cy)
            if idx == 1:
                return Affy.ds(self.get(0), self.get(1), self.get(2), self.get(3), self.cx, self.cy)
            return [Affy.da, None, Affy.dx, Affy.dy][idx](*arguments)

    model = Mine(27.5, 19.5, "zeros", moving).double()
    for i, value in enumerate((0.02, 1.02, 0.4, -0.2)):
        model.set_parameter(i, value)
    with pytest.raises(ValueError, match=r"^Mine.forward\(\): get_derva\(\d\) is not the derivative of get_matrix\(\)"
                       r".*Mine overrides get_derva but not get_matrix\(\).*order \(angle, tx, ty, scale\).*"
                       r"Override get_matrix\(\)"):
        model(moving, fixed)
    assert all(param.grad is None for param in model.parameters())

    class MineFixed(Mine):  # the same with its own matrix: accepted, and as autograd's
        get_matrix = lambda self: Affy.get_matrix(self.get(0), self.get(1), self.get(1), self.get(2),  # noqa: E731
                                                  self.get(3), self.cx, self.cy)

    class MineAutograd(AffyModel.AffineModel):
        def __init__(self, cx, cy, bordermode):
            super().__init__(cx, cy, bordermode)
            self.p = torch.nn.ParameterList(torch.tensor([i]) for i in [0.0, 1.0, 0.0, 0.0])
            self.m = [Mapping.IdentityMapping() for i in range(len(self.p))]

        get_matrix = MineFixed.get_matrix

    analytic, autograd = MineFixed(27.5, 19.5, "zeros", moving).double(), MineAutograd(27.5, 19.5, "zeros").double()
    for model in (analytic, autograd):
        for i, value in enumerate((0.02, 1.02, 0.4, -0.2)):
            model.set_parameter(i, value)
    torch.sum((autograd(moving) - fixed) ** 2).backward()
    analytic(moving, fixed)
    for mine, theirs in zip(analytic.parameters(), autograd.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)


class _CountingSigmoid(Mapping.SigmoidMapping):
    calls = 0

    def forward(self, raw):
        type(self).calls += 1
        return super().forward(raw)


def test_a_seed_style_analytic_step_forms_each_parameter_value_once():
    """The seed's get_derva asks for get(i) 19 times a step, and its matrix four more: each had gone
    through the mapping again (about a third of the step's time, with Affy's per-call argument work).
    A step forms each value once; the gradients are those of the autograd model all the same."""
    fixed, moving = seed_images(torch.float32)
    model = SeedModelAnalytic(27.5, 19.5, "zeros", moving)
    for i, (value, lo, hi) in enumerate(((0.02, -0.25, 0.25), (1.0, -80, 80), (-0.5, -130, 130), (1.02, 0.5, 1.6))):
        model.set_parameter(i, value, _CountingSigmoid(lo, hi))
    model(moving, fixed)  # the first forward also checks get_derva against the matrix
    _CountingSigmoid.calls = 0
    model(moving, fixed)
    assert _CountingSigmoid.calls == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affy_of_tensor_parameters_and_a_number_centre_is_the_general_paths_result(dtype, monkeypatch):
    """Tensors of one shape and a centre of Python numbers (the seed's calls) take a short path:
    bit for bit the general path's result (a NumPy centre takes that one), and a new tensor each call.
    Which path a call took is counted: without the short path the comparison passed as well."""
    import tireg.compat as compat

    taken = []
    common_case = compat._common_case

    def counted(*arguments):
        result = common_case(*arguments)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(compat, "_common_case", counted)
    generator = torch.Generator().manual_seed(4)
    batches = [[torch.tensor([0.2, -0.1]), torch.tensor([1.1, 0.9]), torch.tensor([0.95, 1.0]),
                torch.tensor([3.0, 0.5]), torch.tensor([-2.0, 1.5])],
               [torch.tensor(0.0), torch.tensor(-0.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0)],
               [torch.randn(40, generator=generator) * scale for scale in (1.0, 1.0, 1.0, 50.0, 50.0)]]
    for values in ([value.to(dtype) for value in values] for values in batches):
        angle, scalex, scaley, dx, dy = values
        for cx, cy in ((127.3, 95.1), (-3.7, 0.0), (0.0, -2.2)):
            for name in ("get_matrix", "da", "dsx", "dsy", "dx", "dy", "ds"):
                function = getattr(Affy, name)
                arguments = (angle, scalex, dx, dy) if name == "ds" else values
                taken.clear()
                short, general = function(*arguments, cx, cy), function(*arguments, np.float64(cx), np.float64(cy))
                assert taken == [True, False], name  # the short path, then the general one
                assert short.dtype == dtype and short.shape == general.shape, name
                # bit for bit, the sign of a zero too
                assert torch.equal(short.view(-1).view(BITS[dtype]), general.view(-1).view(BITS[dtype])), name
                short.add_(1.0)  # the centre it was made from is kept: a result is no view of it
                assert torch.equal(function(*arguments, cx, cy), general), name
    with pytest.raises(ValueError, match="'cx'"):
        Affy.da(*values, float("nan"), cy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_seed_style_analytic_step_forms_the_general_paths_numbers(dtype, batch_size):
    """A seed-style analytic step forms its values (four sigmoids at once), its base matrix (from the
    values as they are) and its raw gradients (four sigmoid derivatives at once) by short paths: bit for
    bit what the per-parameter mappings, get_matrix() and the per-parameter chain rule give, also at
    saturation (raw 40) and for one parameter set per pair."""
    from tireg.models import _raw_gradients

    fixed, moving = seed_images(dtype, batch=3)
    model = SeedModelAnalytic(27.5, 19.5, "zeros", moving).to(dtype)
    seed_mappings(model)
    raw = ([0.3], [-1.2], [40.0], [0.7]) if batch_size == 1 else ([0.3, 0.1, -0.2], [-1.2], [40.0], [0.7])
    for param, values in zip(model.p, raw):
        param.data = torch.tensor(values, dtype=dtype)
    params = list(model.p)
    with torch.no_grad():
        with model._step_values():
            values = [model.get(i) for i in range(4)]
            matrix, _ = model._matrix_and_jacobian(3)
        for value, param, mapping in zip(values, params, model.m):
            assert torch.equal(value, mapping(param)) and value.shape == param.shape
        assert torch.equal(matrix, model.get_matrix().reshape(-1, 3, 3).expand(3, 3, 3))
        for pairs in (1, 3):
            gradient = torch.randn(pairs, 4, dtype=dtype, generator=torch.Generator().manual_seed(pairs))
            gradient[0, 1] = -0.0
            expected = [(gradient[:, i] * mapping.derivative(param)).sum().reshape(param.shape)
                        if param.numel() == 1 else gradient[:, i] * mapping.derivative(param)
                        for i, (param, mapping) in enumerate(zip(params, model.m))]
            for mine, theirs in zip(_raw_gradients(gradient, params, model.m), expected):
                assert torch.equal(mine.view(-1).view(BITS[dtype]), theirs.view(-1).view(BITS[dtype]))
