"""Per-pixel losses: value and derivative together, against autograd and closed forms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import tireg

from tireg.losses import (
    LOSSES,
    CauchyLoss,
    CharbonnierLoss,
    GemanMcClureLoss,
    HuberLoss,
    L1Loss,
    L2Loss,
    PerPixelLoss,
    constant_irls_weight,
    get_loss,
)

# (name, constructor keyword arguments): every loss with defaults, and the
# tunable ones with a non-default setting too.
CONFIGS = [
    ("l2", {}),
    ("cauchy", {}),
    ("cauchy", {"scale": 0.5}),
    ("cauchy", {"scale": 3.0}),
    ("l1", {}),
    ("charbonnier", {}),
    ("charbonnier", {"eps": 0.3}),
    ("huber", {}),
    ("huber", {"delta": 0.4}),
    ("geman_mcclure", {}),
    ("geman_mcclure", {"scale": 2.0}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kwargs.items()) for name, kwargs in CONFIGS]


def test_configs_cover_every_registered_loss():
    assert {name for name, _ in CONFIGS} == set(LOSSES)
    assert set(LOSSES) == {"l2", "cauchy", "l1", "charbonnier", "huber", "geman_mcclure"}


def random_pair(generator, shape=(2, 3, 5, 7), dtype=torch.float64):
    """``x, y`` whose residuals ``x - y`` spread over roughly [-3, 3]."""
    y = torch.rand(*shape, generator=generator, dtype=dtype)
    x = y + 1.5 * torch.randn(*shape, generator=generator, dtype=dtype)
    return x, y


# ----------------------------------------------------------------------------
# value and derivative


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
def test_gradient_matches_autograd(name, kwargs, generator):
    loss_fn = LOSSES[name](**kwargs)
    x, y = random_pair(generator)
    residual = x - y
    if name == "huber":  # both branches are exercised
        delta = loss_fn.delta
        assert (residual.abs() < delta).sum() > 20 and (residual.abs() > delta).sum() > 20
    x_leaf = x.clone().requires_grad_(True)
    loss, grad = loss_fn(x_leaf, y, gradient=True)
    (autograd_grad,) = torch.autograd.grad(loss.sum(), x_leaf)
    assert loss.shape == x.shape and grad.shape == x.shape
    torch.testing.assert_close(grad.detach(), autograd_grad, rtol=1e-12, atol=1e-12)
    # the derivative is not trivially zero
    assert grad.abs().max() > 0.05


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
def test_gradient_matches_finite_differences(name, kwargs, generator):
    loss_fn = LOSSES[name](**kwargs)
    x, y = random_pair(generator)
    step = 1e-6
    _, grad = loss_fn(x, y, gradient=True)
    numeric = (loss_fn(x + step, y) - loss_fn(x - step, y)) / (2 * step)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
def test_loss_with_and_without_gradient_agree(name, kwargs, generator):
    loss_fn = LOSSES[name](**kwargs)
    x, y = random_pair(generator)
    plain = loss_fn(x, y)
    assert isinstance(plain, torch.Tensor)
    assert plain.shape == x.shape
    loss, _ = loss_fn.forward(x, y, gradient=True)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    torch.testing.assert_close(loss_fn.forward(x, y), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
def test_loss_depends_on_the_residual_and_vanishes_at_zero(name, kwargs, generator):
    loss_fn = LOSSES[name](**kwargs)
    x, y = random_pair(generator)
    shift = 0.7
    torch.testing.assert_close(loss_fn(x + shift, y + shift), loss_fn(x, y), rtol=1e-12, atol=1e-12)
    minimum = loss_fn(y, y)
    # rho is smallest at r = 0 (Charbonnier's minimum is eps, the others' 0)
    assert bool((loss_fn(x, y) >= minimum).all())
    # and there it is the table's value exactly: sqrt(0 + eps^2) = eps for Charbonnier, 0 for the others;
    # its derivative there is 0 (L1's sign(0) too)
    at_zero = loss_fn.eps if name == "charbonnier" else 0.0
    assert torch.equal(minimum, torch.full_like(y, at_zero)), (minimum, at_zero)
    assert torch.equal(loss_fn(y, y, gradient=True)[1], torch.zeros_like(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, kwargs", CONFIGS[:6], ids=IDS[:6])
def test_dtype_and_device_follow_the_input(name, kwargs, dtype, device, generator):
    x, y = (t.to(dtype=dtype, device=device) for t in random_pair(generator))
    loss, grad = LOSSES[name](**kwargs)(x, y, gradient=True)
    for out in (loss, grad):
        assert out.dtype == dtype
        assert out.device.type == torch.device(device).type


# ----------------------------------------------------------------------------
# closed-form values (computed by hand from the formulas in the docstring)

KNOWN = [
    # loss, r, rho(r), rho'(r)
    (L2Loss(), 3.0, 9.0, 6.0),
    (L2Loss(), -0.5, 0.25, -1.0),
    (CauchyLoss(), 1.0, math.log(2.0), 1.0),  # the seed's derivative said 0.5
    (CauchyLoss(), -1.0, math.log(2.0), -1.0),
    (CauchyLoss(), 0.0, 0.0, 0.0),
    (CauchyLoss(), 3.0, math.log(10.0), 0.6),
    (CauchyLoss(scale=2.0), 2.0, math.log(2.0), 0.5),
    (L1Loss(), -2.5, 2.5, -1.0),
    (L1Loss(), 0.5, 0.5, 1.0),
    (L1Loss(), 0.0, 0.0, 0.0),
    (CharbonnierLoss(eps=0.3), 0.4, 0.5, 0.8),
    (CharbonnierLoss(eps=0.3), 0.0, 0.3, 0.0),
    (CharbonnierLoss(), -4.0, math.sqrt(16 + 1e-6), -4.0 / math.sqrt(16 + 1e-6)),
    (HuberLoss(), 0.5, 0.125, 0.5),
    (HuberLoss(), 1.0, 0.5, 1.0),
    (HuberLoss(), 3.0, 2.5, 1.0),
    (HuberLoss(), -2.0, 1.5, -1.0),
    (HuberLoss(delta=0.4), 1.0, 0.32, 0.4),
    (HuberLoss(delta=0.4), -0.2, 0.02, -0.2),
    (GemanMcClureLoss(), 1.0, 0.5, 0.5),
    (GemanMcClureLoss(), 2.0, 0.8, 0.16),
    (GemanMcClureLoss(scale=2.0), 2.0, 0.5, 0.25),
    (GemanMcClureLoss(), 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize(
    "loss_fn, r, value, derivative", KNOWN, ids=[f"{type(k[0]).__name__}-r={k[1]}" for k in KNOWN]
)
def test_known_values(loss_fn, r, value, derivative):
    y = torch.tensor([[[[0.25]]]], dtype=torch.float64)
    x = y + r
    loss, grad = loss_fn(x, y, gradient=True)
    assert loss.item() == pytest.approx(value, abs=1e-12)
    assert grad.item() == pytest.approx(derivative, abs=1e-12)


def test_huber_is_continuous_at_delta():
    loss_fn = HuberLoss(delta=0.4)
    r = torch.tensor([0.4 - 1e-9, 0.4, 0.4 + 1e-9], dtype=torch.float64)
    values = loss_fn(r, torch.zeros_like(r))
    torch.testing.assert_close(values, torch.full_like(values, 0.08), rtol=0, atol=1e-9)


def test_l1_derivative_is_zero_at_zero_residual():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    loss, grad = L1Loss()(x, x.clone(), gradient=True)
    assert loss.tolist() == [0.0, 0.0, 0.0]
    assert grad.tolist() == [0.0, 0.0, 0.0]


def test_cauchy_derivative_is_twice_the_seeds():
    """The seed wrote ``r / (1 + r^2)``; the derivative of ``log(1 + r^2)`` is twice that."""
    r = torch.linspace(-3, 3, 13, dtype=torch.float64)
    _, grad = CauchyLoss()(r, torch.zeros_like(r), gradient=True)
    torch.testing.assert_close(grad, 2 * r / (1 + r * r), rtol=1e-14, atol=1e-14)


class _SeedCauchy(tireg.losses.PerPixelLoss):
    """The seed's Cauchy loss as it wrote it: ``log(1 + r^2)``, derivative ``r / (1 + r^2)`` (half)."""

    def forward(self, x, y, gradient=False):
        if x.dim() != 4:
            raise Exception("error")
        c = torch.pow(x - y, 2.0) + 1.0
        return (torch.log(c), (x - y) / c) if gradient else torch.log(c)


class _Kinked(tireg.losses.PerPixelLoss):
    """``|r|``, or with ``wrong`` a derivative of another function (``r``: L2's half) than its loss."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.wrong = wrong

    def forward(self, x, y, gradient=False):
        r = x - y
        return (r.abs(), r if self.wrong else torch.sign(r)) if gradient else r.abs()


def test_a_loss_whose_derivative_is_not_its_losss_is_told_once():
    """The seed's own Cauchy loss, run unchanged, gave the analytic model half the gradient, silently
    (SGD then ran at half its rate).  A loss of one's own is now checked once against a central
    difference of its forward: a constant multiple is warned about with its factor, at the user's
    line; a derivative of another function is refused; a right one, kinked at 0, passes."""
    generator = torch.Generator().manual_seed(3)
    moving = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 40, 48, generator=generator, dtype=torch.float64), 5, 1, 2)
    fixed = torch.roll(moving, 1, -1)
    model = tireg.create_model("rigid", moving, loss=_SeedCauchy(), compile=False)
    model.set_parameter(1, 0.3)
    with pytest.warns(UserWarning, match=r"_SeedCauchy.forward\(x, y, gradient=True\) returns 0.5 times the derivative "
                                         r"of its loss") as caught:
        model(moving, fixed)
    assert [warning.filename for warning in caught] == [__file__]
    automatic = tireg.create_model("rigid", moving, gradients="autograd")
    automatic.set_parameter(1, 0.3)
    _SeedCauchy()(automatic(moving), fixed).sum().backward()
    torch.testing.assert_close(model.p[1].grad, 0.5 * automatic.p[1].grad)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(moving, fixed)  # once per loss
        tireg.create_model("rigid", moving, loss=_Kinked(), compile=False)(moving, fixed)
    wrong = _Kinked(wrong=True)
    for _ in range(2):  # refused every time, not once
        with pytest.raises(ValueError, match=r"_Kinked.forward\(x, y, gradient=True\) does not return the derivative "
                                             r"of its loss in x"):
            tireg.register(fixed, moving, transform="translation", metric=wrong)


# ----------------------------------------------------------------------------
# precision at the ends of the ranges (exact rational references)

F32_TINY = float(torch.finfo(torch.float32).tiny)


def _residuals(dtype):
    """0 and +-r over the dtype's finite range, with the audit's cases (1e-12, 1e10, 1.8e19)."""
    top = 38 if dtype == torch.float32 else 300
    sizes = [10.0 ** k for k in range(-top, top + 1, 3)] + [1e-12, 3e-3, 1.0, 1e10, 1.8e19, 1e20, 3e38]
    if dtype == torch.float32:
        sizes = [v for v in sizes if v <= 3.4e38]
    values = [0.0] + sizes + [-v for v in sizes]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _assert_close_to(got: torch.Tensor, exact: list, dtype, rtol: float):
    """``got`` finite and within ``rtol`` of the exact values (rounded to float64), or, for those below
    the dtype's normal range, within its smallest normal value (gradual underflow)."""
    tiny = float(torch.finfo(dtype).tiny)
    assert bool(torch.isfinite(got).all()), got
    for value, want in zip(got.tolist(), exact):
        assert abs(value - want) <= rtol * abs(want) + tiny, (value, want)


SCALES = [1e-15, 1e-12, 1e-6, 1.0, 10.0, 1e6, 1e15]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", SCALES)
def test_geman_mcclure_is_finite_and_accurate_for_every_scale(scale, dtype):
    """(r^2 + c^2)^2 scales as c^4 and underflowed: GemanMcClureLoss(1e-12) gave NaN derivatives at
    r = 0 and inf at r = 1e-12 in float32, r^2 overflowed into inf / inf = NaN from r = 1.8e19, and
    scale 1e15 gave a NaN derivative at r = 1e10."""
    from fractions import Fraction

    r = _residuals(dtype)
    loss, derivative = GemanMcClureLoss(scale)(r, torch.zeros_like(r), gradient=True)
    c2 = Fraction(torch.tensor(scale, dtype=dtype).item()) ** 2  # c as the dtype holds it
    exact_loss, exact_derivative = [], []
    for value in r.tolist():
        r2 = Fraction(value) ** 2
        exact_loss.append(float(r2 / (r2 + c2)))
        exact_derivative.append(float(2 * Fraction(value) * c2 / (r2 + c2) ** 2))
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    finfo = torch.finfo(dtype)
    # where r^2 underflows (rho < tiny / c^2, below 1.2e-8 in float32) rho is as close as r^2 is
    squares = r.double() ** 2
    keep = squares >= finfo.tiny
    _assert_close_to(loss[keep], [v for v, k in zip(exact_loss, keep) if k], dtype, rtol)
    underflow = torch.tensor([v for v, k in zip(exact_loss, keep) if not k], dtype=torch.float64)
    assert bool(((loss[~keep].double() - underflow).abs() <= finfo.tiny / float(c2) + finfo.tiny).all())
    # beyond B = sqrt(max) / 2, r is capped at +-B: rho is 1, rho' its value at B, at most 2 c^2 / B^3
    limit = finfo.max ** 0.5 / 2
    keep = r.abs() <= limit
    _assert_close_to(derivative[keep], [v for v, k in zip(exact_derivative, keep) if k], dtype, rtol)
    beyond = ~keep
    assert beyond.sum() > 0 and bool((loss[beyond] == 1).all())
    capped = r[beyond].sign() * limit
    _, at_limit = GemanMcClureLoss(scale)(capped, torch.zeros_like(capped), gradient=True)
    assert derivative[beyond].tolist() == at_limit.tolist()
    bound = float(2 * c2 / Fraction(limit) ** 3) * (1 + rtol) + finfo.tiny
    assert bool((derivative[beyond].abs() <= bound).all())
    assert GemanMcClureLoss(scale)(r.new_tensor([float("nan")]), r.new_zeros(1)).isnan().all()  # NaN is kept


def test_geman_mcclure_audit_cases():
    z = torch.zeros(1, 1, 2, 2)
    assert GemanMcClureLoss(1e-12)(z, z, True)[1].tolist() == z.tolist()  # was NaN
    _, derivative = GemanMcClureLoss(1e-12)(torch.tensor([1e-12]), torch.zeros(1), True)
    assert derivative.item() == pytest.approx(2e-12 * 1e-24 / (2e-24) ** 2, rel=1e-5)  # was inf
    assert GemanMcClureLoss(1.0)(torch.tensor([1.8e19, 3e38]), torch.zeros(2)).tolist() == [1.0, 1.0]  # was NaN
    _, derivative = GemanMcClureLoss(1e15)(torch.tensor([1e10]), torch.zeros(1), True)
    assert derivative.item() == pytest.approx(2e10 * 1e30 / (1e30 + 1e20) ** 2, rel=1e-5)  # was NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", SCALES)
def test_cauchy_keeps_its_precision_for_small_residuals(scale, dtype):
    """log((c^2 + r^2) / c^2) was 0 for r <= 1e-3 at scale 10 in float32 (32 % off at 3e-3); the
    derivative 2 r / (c^2 + r^2) was NaN where 2 r overflowed."""
    from fractions import Fraction

    r = _residuals(dtype)
    ratio = r.abs() / scale
    r = r[ratio < (1e19 if dtype == torch.float32 else 1e150)]  # beyond, (r / c)^2 overflows: rho = inf
    loss, derivative = CauchyLoss(scale)(r, torch.zeros_like(r), gradient=True)
    c = Fraction(torch.tensor(scale, dtype=dtype).item())
    exact_loss = [math.log1p(float((Fraction(value) / c) ** 2)) for value in r.tolist()]
    exact_derivative = [float(2 * Fraction(value) / (c * c + Fraction(value) ** 2)) for value in r.tolist()]
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    _assert_close_to(loss, exact_loss, dtype, rtol)
    _assert_close_to(derivative, exact_derivative, dtype, rtol)
    # every finite r has a finite derivative
    huge = torch.tensor([3e38, -3e38], dtype=dtype)
    assert bool(torch.isfinite(CauchyLoss(scale)(huge, torch.zeros_like(huge), True)[1]).all())


def test_cauchy_audit_case():
    r = torch.tensor([1e-3, 3e-3, 1e-5])
    loss = CauchyLoss(10.0)(r, torch.zeros_like(r))
    expected = torch.log1p((r.double() / 10) ** 2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)  # was 0, 32 % off, 0


@pytest.mark.parametrize("loss, limit", [
    (CauchyLoss(), lambda r: torch.zeros_like(r)),
    (CharbonnierLoss(), torch.sign),
    (GemanMcClureLoss(), lambda r: torch.zeros_like(r)),
    (HuberLoss(), torch.sign),
    (L1Loss(), torch.sign),
], ids=lambda value: type(value).__name__ if isinstance(value, PerPixelLoss) else "")
def test_bounded_derivatives_take_their_limit_where_the_residual_overflows(loss, limit):
    """x - y of finite float32 images overflows to inf beyond 3.4e38: Cauchy's and Charbonnier's
    rho' were inf / inf = NaN there (one such pixel made its pair's whole gradient NaN), and
    Charbonnier's was 0, not 1, from |r| = 1.8e19, where r^2 overflowed."""
    x = torch.tensor([3e38, -3e38, 2e19, 1e20, -1e30, float("inf"), -float("inf")])
    y = torch.tensor([-3e38, 3e38, 0.0, 0.0, 0.0, 0.0, 0.0])
    rho, derivative = loss(x, y, True)
    residual = (x.double() - y.double()).float()  # +-inf for the first two
    torch.testing.assert_close(derivative, limit(residual), rtol=1e-6, atol=1e-30)
    assert not rho.isnan().any()


HALF_CONFIGS = [  # settings whose squares are 0 in float16
    CharbonnierLoss(eps=1e-6), GemanMcClureLoss(scale=1e-4), CauchyLoss(scale=1e-4), HuberLoss(delta=1e-4), L2Loss(),
    L1Loss(),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", HALF_CONFIGS, ids=lambda loss: repr(loss))
def test_half_precision_images_are_evaluated_in_float32(loss, dtype, generator):
    """In float16, eps^2 = 1e-12 and c^2 = 1e-8 are 0: Charbonnier's rho'(0) and Geman-McClure's
    rho(0) and rho'(0) were 0 / 0 = NaN, though the metrics take float16 and bfloat16 images."""
    x = torch.rand((2, 1, 5, 6), generator=generator).to(dtype)
    y = torch.rand((2, 1, 5, 6), generator=generator).to(dtype)
    x[0] = y[0]  # zero residuals
    rho, derivative = loss(x, y, True)
    expected = loss(x.float(), y.float(), True)
    assert rho.dtype == derivative.dtype == dtype
    assert torch.equal(rho, expected[0].to(dtype)) and torch.equal(derivative, expected[1].to(dtype))
    assert torch.equal(loss(x, y), expected[0].to(dtype))
    assert not rho.isnan().any() and not derivative.isnan().any()
    assert (derivative[0] == 0).all()
    # residual, public, too: Charbonnier's rho'(0) was NaN with eps = 1e-6, and its cap at half the
    # square root of float16's largest value (128) made rho(200) 128
    r = torch.tensor([0.0, 1e-4, 0.5, 200.0, -1e4], dtype=dtype)
    residual = loss.residual(r, True)
    reference = loss.residual(r.float(), True)
    assert all(torch.equal(value, want.to(dtype)) for value, want in zip(residual, reference))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("delta", [1e-3, 1.0, 1e3, 1e6, 1e15])
def test_huber_autograd_derivative_is_the_clamp(delta, dtype):
    """delta (|r| - |clipped|) cancelled: autograd gave 0.0 instead of 0.01 at delta = 1e6 in float32.
    The values stay the documented formula's."""
    sizes = [1e-30, 1e-8, 0.01, 0.3, 1.0, 2.5, 1e3, 1e6, 1e7, 1e15, 1e16]
    r = torch.tensor([0.0] + sizes + [-v for v in sizes], dtype=dtype)
    leaf = r.clone().requires_grad_(True)
    loss = HuberLoss(delta)(leaf, torch.zeros_like(r))
    (autograd,) = torch.autograd.grad(loss.sum(), leaf)
    _, analytic = HuberLoss(delta)(r, torch.zeros_like(r), gradient=True)
    assert analytic.tolist() == r.clamp(-delta, delta).tolist()
    torch.testing.assert_close(autograd, analytic, rtol=1e-7 if dtype == torch.float32 else 1e-15, atol=0)
    d = torch.tensor(delta, dtype=dtype).item()  # the documented formula, step by step in the dtype
    documented = [v * v / 2 if abs(v) <= d else d * (abs(v) - d / 2) for v in r.tolist()]
    if dtype == torch.float64:
        assert loss.tolist() == documented
    else:
        torch.testing.assert_close(loss.detach().double(), torch.tensor(documented, dtype=torch.float64),
                                   rtol=3e-7, atol=F32_TINY)


# ----------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(
    "cls, parameter",
    [(CauchyLoss, "scale"), (GemanMcClureLoss, "scale"), (CharbonnierLoss, "eps"), (HuberLoss, "delta")],
)
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), 1e20, 1e-30])  # squares leave float32
def test_non_positive_setting_is_rejected(cls, parameter, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(\).*'{parameter}' must be positive"):
        cls(**{parameter: value})


def test_settings_are_stored_as_floats():
    assert CauchyLoss(2).scale == 2.0 and isinstance(CauchyLoss(2).scale, float)
    assert HuberLoss(delta=3).delta == 3.0
    assert CharbonnierLoss(eps=0.5).eps == 0.5


# ----------------------------------------------------------------------------
# user subclasses


class SeedStyleCauchy(PerPixelLoss):
    """The seed's way: override ``forward(x, y, gradient=False)``, own formulas."""

    def __init__(self):
        super().__init__()

    def forward(self, x, y, gradient=False):
        if x.dim() != 4:
            raise ValueError("SeedStyleCauchy: x must be 4-D")
        c = torch.pow(x - y, 2.0) + 1.0
        loss = torch.log(c)
        if not gradient:
            return loss
        return loss, 2.0 * (x - y) / c


class ResidualStyleL2(PerPixelLoss):
    """Depends on ``r`` only: implement ``residual``."""

    def residual(self, r, gradient=False):
        loss = 0.5 * r * r
        return (loss, r) if gradient else loss


class Incomplete(PerPixelLoss):
    """Implements neither ``forward`` nor ``residual``."""


def test_seed_style_subclass_works(generator):
    x, y = random_pair(generator)
    custom = SeedStyleCauchy()
    assert get_loss(custom) is custom
    loss, grad = custom(x, y, gradient=True)
    expected_loss, expected_grad = CauchyLoss()(x, y, gradient=True)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(custom(x, y), expected_loss)


def test_residual_style_subclass_works(generator):
    x, y = random_pair(generator)
    loss, grad = ResidualStyleL2()(x, y, gradient=True)
    torch.testing.assert_close(loss, 0.5 * (x - y) ** 2)
    torch.testing.assert_close(grad, x - y)


def test_incomplete_subclass_raises_not_implemented(generator):
    x, y = random_pair(generator)
    with pytest.raises(NotImplementedError, match="Incomplete must implement forward"):
        Incomplete()(x, y)
    with pytest.raises(NotImplementedError):
        Incomplete()(x, y, gradient=True)


# ----------------------------------------------------------------------------
# lookup


@pytest.mark.parametrize("name", list(LOSSES))
def test_get_loss_by_name(name):
    loss_fn = get_loss(name)
    assert type(loss_fn) is LOSSES[name]


def test_get_loss_cauchy_is_default_cauchy():
    loss_fn = get_loss("cauchy")
    assert isinstance(loss_fn, CauchyLoss)
    assert loss_fn.scale == 1.0
    assert isinstance(get_loss("Cauchy"), CauchyLoss)  # case-insensitive


def test_get_loss_returns_an_instance_unchanged():
    loss_fn = HuberLoss(delta=0.3)
    assert get_loss(loss_fn) is loss_fn


@pytest.mark.parametrize("bad", ["nope", "", 3, None, CauchyLoss])
def test_get_loss_unknown_lists_the_names(bad):
    with pytest.raises(ValueError, match="unknown loss") as info:
        get_loss(bad)
    for name in LOSSES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
def test_constant_irls_weight_is_rho_prime_over_r(name, kwargs):
    """Where the IRLS weight ``rho'(r) / r`` is one number, Gauss-Newton uses it without dividing:
    it must be that number for every residual (L2 only), and ``None`` for every other loss."""
    loss = get_loss(name) if not kwargs else type(get_loss(name))(**kwargs)
    r = torch.tensor([-3.0, -0.7, -1e-4, 2e-3, 0.4, 5.0], dtype=torch.float64)
    _, derivative = loss(r, torch.zeros_like(r), True)
    ratios = derivative / r
    constant = constant_irls_weight(loss)
    assert (constant is not None) == (name == "l2")
    assert (constant is not None) == bool(torch.allclose(ratios, ratios[:1].expand_as(ratios)))
    if constant is not None:
        assert torch.allclose(ratios, torch.full_like(ratios, constant))


def test_a_subclass_that_changes_l2_has_no_constant_irls_weight():
    class Scaled(L2Loss):
        def residual(self, r, gradient=False):
            loss = 3.0 * r * r
            return (loss, 6.0 * r) if gradient else loss

    class Shifted(L2Loss):
        def forward(self, x, y, gradient=False):
            return super().forward(x, y + 0.1, gradient)

    class Named(L2Loss):  # a subclass that only renames keeps L2's rho
        pass

    assert constant_irls_weight(Scaled()) is None and constant_irls_weight(Shifted()) is None
    assert constant_irls_weight(Named()) == 2.0


@pytest.mark.parametrize("loss", [L2Loss(), CauchyLoss(), L1Loss(), HuberLoss()], ids=lambda loss: type(loss).__name__)
def test_integer_and_non_tensor_inputs_are_rejected(loss):
    """uint8 0 - 1 wraps to 255: L2 gave a derivative of 510 instead of -2."""
    name = type(loss).__name__
    with pytest.raises(TypeError, match=rf"^{name}\(\): x and y must be floating point; got torch.uint8"):
        loss(torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8), gradient=True)
    with pytest.raises(TypeError, match=rf"^{name}\(\): x and y must be tensors; got ndarray"):
        loss(np.zeros(3), torch.zeros(3))


def test_y_must_have_or_broadcast_to_x_shape():
    """L2Loss()(x, x.expand(3, ...)) broadcast x and returned three images for one."""
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^L2Loss\(\): y \(3, 1, 8, 8\) must have x's shape \(1, 1, 8, 8\)"):
        L2Loss()(x, x.expand(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"must have x's shape"):
        CauchyLoss()(x, torch.rand(1, 1, 8, 7), gradient=True)
    assert L2Loss()(x.expand(3, 1, 8, 8), x).shape == (3, 1, 8, 8)  # y broadcast to x: as documented


def test_a_loss_of_ones_own_is_tried_before_the_compiled_kernel_uses_it():
    """Inside the compiled kernel a summed derivative broadcast without a word (the eager path raised)."""
    from tireg.losses import verified

    class Summed(tireg.PerPixelLoss):
        def forward(self, x, y, gradient=False):
            r = x - y
            return (r * r, (2 * r).sum()) if gradient else r * r

    moving = torch.rand(1, 1, 32, 32)
    model = tireg.create_model("similarity", moving, loss=Summed(), compile=True)
    with pytest.raises(ValueError,
                       match=r"Summed.forward\(x, y, gradient=True\) must return the loss and its derivative"):
        model(moving, moving.roll(1, -1))  # raised before any compile
    assert verified(CauchyLoss()) is not None  # built-in losses need no trial


def test_a_derivative_pooled_over_pairs_or_of_another_dtype_is_refused_by_both_paths():
    """A derivative reduced over the pairs passed the 2 x 2 trial and the compiled kernel broadcast it
    (register() 'converged' on a wrong gradient); a float64 one failed the trace, turned the compiled
    path off for the process, and the eager path raised from the sampler's kernel."""
    from tireg import fused
    from tireg.analytic import cost_and_gradient

    class Pooled(tireg.PerPixelLoss):
        def residual(self, r, gradient=False):
            return (r * r, (2 * r).mean(0, keepdim=True)) if gradient else r * r

    class Float64(tireg.PerPixelLoss):
        def residual(self, r, gradient=False):
            return (r * r, (2 * r).double()) if gradient else r * r

    generator = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(3, 1, 30, 34, generator=generator), torch.rand(3, 1, 30, 34, generator=generator)
    matrix = torch.eye(3).repeat(3, 1, 1)
    failed = set(fused._failed)
    for compile in (False, True):  # the trial runs before any compile
        with pytest.raises(ValueError, match=r"Pooled.forward\(x, y, gradient=True\) must return the loss and its "
                                             r"derivative per pixel"):
            cost_and_gradient(fixed, moving, matrix, Pooled(), compile=compile)
        with pytest.raises(TypeError, match=r"Float64.forward\(x, y, gradient=True\) must return the loss and its "
                                            r"derivative in x's dtype torch.float32; got torch.float32 and "
                                            r"torch.float64"):
            cost_and_gradient(fixed, moving, matrix, Float64(), compile=compile)
    assert fused._failed == failed


def test_a_loss_written_for_grey_images_runs_compiled_on_grey_images():
    """The trial on two channels refused a loss that works on the images it is given (one channel)."""
    from tireg import fused
    from tireg.analytic import cost_and_gradient

    class Grey(tireg.PerPixelLoss):
        def forward(self, x, y, gradient=False):
            r = (x - y)[:, 0]
            return ((r * r)[:, None], (2 * r)[:, None]) if gradient else (r * r)[:, None]

    assert fused.supports("bilinear", "zeros", Grey(), torch.float32, 1)
    assert not fused.supports("bilinear", "zeros", Grey(), torch.float32, 2)  # the reference path names it
    generator = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(2, 1, 20, 24, generator=generator), torch.rand(2, 1, 20, 24, generator=generator)
    matrix = torch.eye(3).repeat(2, 1, 1)
    matrix[:, 0, 2] = 0.3
    for compile in (False, True):
        _, cost, gradient = cost_and_gradient(fixed, moving, matrix, Grey(), compile=compile)
        _, expected_cost, expected = cost_and_gradient(fixed, moving, matrix, L2Loss(), compile=compile)
        torch.testing.assert_close(cost, expected_cost)
        torch.testing.assert_close(gradient, expected)


def test_a_loss_says_its_settings_and_names_a_setting_that_is_no_number():
    """repr(CauchyLoss(0.3)) read 'CauchyLoss()', as every metric of it; CauchyLoss("abc") raised
    float()'s own message (an audit of the public metrics)."""
    from tireg.metrics import LocalNCC, MutualInformation, PerPixelMetric

    assert repr(tireg.CauchyLoss(0.3)) == "CauchyLoss(scale=0.3)"
    assert repr(PerPixelMetric(tireg.CauchyLoss(0.3))) == "PerPixelMetric(CauchyLoss(scale=0.3), mean=True)"
    assert repr(LocalNCC(3, eps=1e-3)) == "LocalNCC(radius=3, sign='positive', eps=0.001)"
    assert repr(MutualInformation(16, use_matmul=True)) == "MutualInformation(bins=16, use_matmul=True)"
    assert repr(MutualInformation(16)) == "MutualInformation(bins=16)"
    with pytest.raises(TypeError, match="CauchyLoss\\(\\): 'scale' must be a number; got 'abc'"):
        tireg.CauchyLoss("abc")


@pytest.mark.parametrize("kind, name", [(CauchyLoss, "scale"), (CharbonnierLoss, "eps"), (HuberLoss, "delta"),
                                        (GemanMcClureLoss, "scale")])
def test_a_robust_loss_setting_beyond_float64_or_a_bool_is_refused_naming_it(kind, name):
    """10**400 raised a bare OverflowError from float(); True was taken for 1, where every other
    setting of tireg (finite_number) refuses a bool."""
    caller = kind.__name__
    with pytest.raises(ValueError, match=rf"^{caller}\(\): '{name}' is beyond float64's range"):
        kind(10**400)
    with pytest.raises(TypeError, match=rf"^{caller}\(\): '{name}' must be a number; got True$"):
        kind(True)
    assert getattr(kind(np.float32(0.5)), name) == 0.5 and getattr(kind(torch.tensor(2.0)), name) == 2.0


@pytest.mark.parametrize("flag, shown", [("no", "'no'"), (torch.tensor([1, 1]), r"a tensor of shape \(2,\)")])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_s_gradient_flag_must_be_a_bool(name, flag, shown):
    """gradient="no" was taken for true, and a tensor raised "Boolean value of Tensor ... is ambiguous"."""
    loss, x = LOSSES[name](), torch.rand(2, 1, 3, 4)
    with pytest.raises(TypeError, match=rf"^{type(loss).__name__}\(\): 'gradient' must be True or False; got {shown}$"):
        loss(x, x.flip(-1), gradient=flag)
    assert isinstance(loss(x, x.flip(-1), np.bool_(True)), tuple)
    # 0 and 1 are False and True, as Python takes them (gradient=1 worked before the check)
    assert isinstance(loss(x, x.flip(-1), 1), tuple) and isinstance(loss(x, x.flip(-1), np.int64(0)), torch.Tensor)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_built_in_residual_checks_its_arguments(name):
    """residual, public, checked nothing: a list raised "can't multiply sequence by non-int", a complex
    r gave complex losses, gradient="no" was taken for true."""
    loss = LOSSES[name]()
    caller = rf"^{type(loss).__name__}\.residual\(\): "
    for r, message in (([1.0], "'r' must be a torch.Tensor; got list$"), (None, "'r' must be a torch.Tensor; got NoneType$"),
                       (torch.tensor([1j]), "'r' must be a floating-point tensor; got torch.complex64$"),
                       (torch.tensor([1]), "'r' must be a floating-point tensor; got torch.int64$")):
        with pytest.raises(TypeError, match=caller + message):
            loss.residual(r)
    with pytest.raises(TypeError, match=caller + "'gradient' must be True or False; got 'no'$"):
        loss.residual(torch.ones(3), "no")
    assert loss.residual(torch.ones(3, dtype=torch.float16)).dtype == torch.float16


def test_the_residual_and_flag_checks_trace_with_no_graph_break_nor_recompile():
    """The checks are types and dtypes only: forward and residual compile whole (fullgraph) and a
    second call with new values does not compile again."""
    from torch._dynamo.testing import CompileCounter

    x, y = torch.rand(2, 1, 5, 6), torch.rand(2, 1, 5, 6)
    for name in sorted(LOSSES):
        loss = LOSSES[name]()
        torch._dynamo.reset()
        counter = CompileCounter()
        forward = torch.compile(lambda a, b: loss(a, b, True), backend=counter, fullgraph=True)
        residual = torch.compile(lambda r: loss.residual(r, True), backend=counter, fullgraph=True)
        for shift in (0.0, 1.0):
            torch.testing.assert_close(forward(x + shift, y), loss(x + shift, y, True))
            torch.testing.assert_close(residual(x + shift - y), loss.residual(x + shift - y, True))
        assert counter.frame_count == 2, name


def test_an_unknown_loss_is_named_by_the_function_that_was_given_it():
    """get_loss("x") said "unknown loss 'x'" naming no function, from PerPixelMetric too."""
    from tireg.metrics import PerPixelMetric

    with pytest.raises(ValueError, match=r"^get_loss\(\): unknown loss 'x'; choose one of 'l2'"):
        get_loss("x")
    with pytest.raises(ValueError, match=r"^PerPixelMetric\(\): unknown loss 'x'; choose one of 'l2'"):
        PerPixelMetric("x")
    with pytest.raises(ValueError, match=r"^my_function\(\): unknown loss 3"):
        get_loss(3, "my_function()")


def test_losses_name_images_on_two_devices():
    # torch's "Tensor on device meta is not on the expected device cpu!" named neither image
    x = torch.rand(1, 1, 8, 8)
    for loss in (tireg.L2Loss(), tireg.losses.CauchyLoss(), tireg.losses.HuberLoss()):
        with pytest.raises(ValueError, match=r"x and y must be on one device; got cpu and meta"):
            loss(x, x.to("meta"))
    assert torch.equal(tireg.L2Loss()(x, torch.tensor(0.5)), (x - 0.5) ** 2)  # a 0-d y broadcasts, as in torch
