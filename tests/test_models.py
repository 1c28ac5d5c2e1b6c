"""The two gradient paths: analytic == autograd on the same function, and the model API."""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import CUDA, CudaSynchronisations, HostSyncs, smooth_random_image

import tireg
from tireg.losses import LOSSES
from tireg.mappings import ExpMapping, IdentityMapping, Mapping, SigmoidMapping
from tireg.transforms import TRANSFORMS

SHAPE = (3, 2, 37, 53)  # B, C, H, W: batched, multi-channel, non-square


def random_values(name: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Parameter values near identity: angles ~0.1 rad, scales ~1 +- 0.05, shifts ~2 px."""
    transform = TRANSFORMS[name]
    spread = torch.tensor(
        [0.1 if n == "angle" else 2.0 if n in ("tx", "ty") else 0.05 for n in transform.parameter_names],
        dtype=torch.float64,
    )
    noise = torch.randn(batch, transform.num_parameters, generator=generator, dtype=torch.float64)
    return torch.tensor(transform.identity, dtype=torch.float64) + spread * noise


def set_values(models, values: torch.Tensor, mappings) -> None:
    for i in range(values.shape[1]):
        for model in models:
            model.set_parameter(i, values[:, i], mappings[i])


def mappings_for(kind: str, values: torch.Tensor):
    if kind == "identity":
        return [IdentityMapping() for _ in range(values.shape[1])]
    # sigmoid ranges around the values, lopsided so that m'(r) differs from its maximum
    return [SigmoidMapping(float(v.min()) - 0.3, float(v.max()) + 1.7) for v in values.T]


def gradients(model) -> torch.Tensor:
    return torch.stack([p.grad for p in model.p], dim=-1)


def autograd_gradient(model, moving, fixed, loss) -> tuple[torch.Tensor, torch.Tensor]:
    total = loss(model(moving), fixed).sum()
    total.backward()
    return total.detach(), gradients(model)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(7)
    fixed = torch.rand(*SHAPE, generator=generator, dtype=torch.float64)
    moving = torch.rand(*SHAPE, generator=generator, dtype=torch.float64)
    return fixed, moving


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("mapping", ["identity", "sigmoid"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_analytic_equals_autograd(images, transform, loss_name, mapping, padding, device):
    fixed, moving = (image.to(device) for image in images)
    loss = LOSSES[loss_name]()
    values = random_values(transform, SHAPE[0], torch.Generator().manual_seed(zlib.crc32(f"{transform}/{loss_name}".encode())))
    autograd = tireg.create_model(transform, moving, gradients="autograd", padding_mode=padding)
    analytic = tireg.create_model(transform, moving, gradients="analytic", padding_mode=padding, loss=loss)
    set_values([autograd, analytic], values, mappings_for(mapping, values))

    expected_loss, expected = autograd_gradient(autograd, moving, fixed, loss)
    warped, total = analytic(moving, fixed)

    assert torch.allclose(total, expected_loss, rtol=1e-12)
    assert torch.equal(warped, autograd(moving))
    assert expected.abs().max() > 0
    error = (gradients(analytic) - expected).abs().max() / expected.abs().max()
    assert error <= 1e-5


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_analytic_equals_autograd_every_sampler(images, interpolation, padding, device):
    fixed, moving = (image.to(device) for image in images)
    loss = tireg.CauchyLoss(0.5)
    values = random_values("affine", SHAPE[0], torch.Generator().manual_seed(3))
    values[:, 4:] *= 8.0  # large shifts: many points sample outside the moving image
    options = dict(padding_mode=padding, interpolation=interpolation)
    autograd = tireg.create_model("affine", moving, gradients="autograd", **options)
    analytic = tireg.create_model("affine", moving, gradients="analytic", loss=loss, **options)
    set_values([autograd, analytic], values, mappings_for("sigmoid", values))
    _, expected = autograd_gradient(autograd, moving, fixed, loss)
    analytic(moving, fixed)
    assert (gradients(analytic) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_analytic_fixed_and_moving_of_different_sizes():
    generator = torch.Generator().manual_seed(11)
    fixed = torch.rand(2, 1, 29, 41, generator=generator, dtype=torch.float64)
    moving = torch.rand(2, 1, 37, 53, generator=generator, dtype=torch.float64)
    values = random_values("similarity", 2, generator)
    autograd = tireg.create_model("similarity", moving, gradients="autograd")
    analytic = tireg.create_model("similarity", moving, gradients="analytic")
    set_values([autograd, analytic], values, mappings_for("identity", values))
    warped = autograd(moving, size=fixed.shape[-2:])
    (tireg.L2Loss()(warped, fixed).sum()).backward()
    analytic_warped, _ = analytic(moving, fixed)
    assert analytic_warped.shape == fixed.shape
    assert torch.allclose(gradients(analytic), gradients(autograd), rtol=1e-9, atol=1e-9)


def finite_difference(model, moving, fixed, loss, step: float = 1e-4) -> torch.Tensor:
    """Central differences of sum(loss(model(moving), fixed)) with respect to each raw parameter."""
    result = torch.zeros(moving.shape[0], len(model.p), dtype=torch.float64)
    with torch.no_grad():
        for i, param in enumerate(model.p):
            for b in range(param.numel()):
                original = param[b].item()
                costs = []
                for sign in (1.0, -1.0):
                    param[b] = original + sign * step
                    costs.append(loss(model(moving), fixed)[b].sum())
                param[b] = original
                result[b, i] = (costs[0] - costs[1]) / (2 * step)
    return result


@pytest.mark.parametrize(
    "method, sigma, tolerance",
    [
        # Measured on this case: 3.6-6.7 % (central), 5.0-5.4 % (Gaussian, sigma 0.7). The
        # sampled function is the bilinear interpolant, whose true derivative is piecewise
        # constant; a precomputed gradient is a smooth stand-in for it.
        ("central", 1.0, 0.10),
        ("gaussian", 0.7, 0.10),
    ],
)
def test_precomputed_gradient_approximates_finite_differences(method, sigma, tolerance):
    """A registration-like case: moving is fixed seen through a transform; gradient away from it."""
    generator = torch.Generator().manual_seed(5)
    fixed = smooth_random_image((2, 1, 40, 56), generator, sigma=3.0)
    truth = torch.tensor([[0.08, 1.03, 2.0, -1.0], [-0.05, 0.98, -1.5, 1.0]], dtype=torch.float64)
    true_matrix = TRANSFORMS["similarity"].matrix(truth, tireg.image_center(40, 56))
    moving = tireg.warp(fixed, torch.linalg.inv(true_matrix), padding_mode="border")
    # border padding: the extended image stays smooth (with zeros, the step at the edge is
    # what a smoothed or differenced gradient cannot follow; the exact gradient can)
    options = dict(padding_mode="border")
    analytic = tireg.create_model(
        "similarity", moving, gradients="analytic", image_gradient=method, sigma=sigma, **options
    )
    reference = tireg.create_model("similarity", moving, gradients="autograd", **options)
    halfway = truth / 2 + torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    set_values([analytic, reference], halfway, mappings_for("identity", halfway))
    analytic(moving, fixed)
    expected = finite_difference(reference, moving, fixed, tireg.L2Loss())
    relative = (gradients(analytic) - expected).norm(dim=1) / expected.norm(dim=1)
    assert relative.max() < tolerance, relative


@pytest.mark.parametrize("method, sigma, padding", [("central", 1.0, "border"), ("gaussian", 0.7, "zeros")])
def test_precomputed_gradient_path_is_exactly_the_public_building_blocks(method, sigma, padding):
    """The model's built-in ``image_gradient="central"/"gaussian"`` step, exactly: the moving image's
    gradient images (tireg.image_gradient with the model's sigma and padding), stacked with it and
    sampled by cost_and_gradient, contracted with the transform's Jacobian, times each mapping's
    derivative.  The finite-difference test above allows 10 % (a precomputed gradient is only an
    approximation), so a gradient scaled by a few percent passed it."""
    generator = torch.Generator().manual_seed(7)
    fixed = smooth_random_image((2, 1, 40, 56), generator, sigma=3.0)
    moving = smooth_random_image((2, 1, 40, 56), generator, sigma=3.0)
    values = random_values("similarity", 2, generator)
    mappings = mappings_for("sigmoid", values)  # m'(r) != 1: the chain rule is part of the check
    model = tireg.create_model("similarity", moving, gradients="analytic", image_gradient=method, sigma=sigma,
                               padding_mode=padding, compile=False)
    set_values([model], values, mappings)
    warped, cost = model(moving, fixed)

    stacked = tireg.sampling.stack_with_gradient(
        moving, tireg.image_gradient(moving, method=method, sigma=sigma, padding_mode=padding))
    transform, center = TRANSFORMS["similarity"], torch.tensor(tireg.image_center(40, 56), dtype=torch.float64)
    true_values = torch.stack([mapping(p.detach()) for p, mapping in zip(model.p, mappings)], dim=-1)
    torch.testing.assert_close(true_values, values, rtol=1e-12, atol=1e-12)
    expected_warped, expected_cost, matrix_gradient = tireg.analytic.cost_and_gradient(
        fixed, moving, transform.matrix(true_values, center), tireg.L2Loss(), padding_mode=padding,
        moving_with_gradient=stacked)
    value_gradient = tireg.analytic.parameter_gradient(matrix_gradient, transform.jacobian(true_values, center))
    expected = torch.stack([value_gradient[:, i] * mapping.derivative(p.detach())
                            for i, (p, mapping) in enumerate(zip(model.p, mappings))], dim=-1)
    assert expected.abs().min() > 1e-4 * expected.abs().max()  # no component vanishes by accident
    torch.testing.assert_close(gradients(model), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(warped, expected_warped, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cost, expected_cost.sum(), rtol=1e-12, atol=1e-12)
    # the precomputed gradient really is what was sampled: the exact one differs from it
    _, _, exact_gradient = tireg.analytic.cost_and_gradient(
        fixed, moving, transform.matrix(true_values, center), tireg.L2Loss(), padding_mode=padding)
    assert not torch.allclose(exact_gradient, matrix_gradient, rtol=1e-3, atol=0)


def _difference_of_gaussians(moving: torch.Tensor) -> torch.Tensor:
    """A user's moving-image gradient (the seed: "a custom method, e.g., difference of Gaussian"):
    central differences of the image blurred by 0.7 px, as (B, C, 2, H, W)."""
    blurred = tireg.sampling.gaussian_blur(moving, 0.7, padding_mode="border")
    return tireg.sampling.image_gradient(blurred, method="central", padding_mode="border")


def test_a_custom_image_gradient_function_is_sampled_and_trains_to_the_truth():
    # the seed's "precalculated using a custom method": only 'exact', 'central' and 'gaussian' were
    # accepted
    generator = torch.Generator().manual_seed(5)
    fixed = smooth_random_image((1, 1, 40, 56), generator, sigma=3.0)
    truth = torch.tensor([[0.06, 1.02, 1.5, -1.0]], dtype=torch.float64)
    moving = tireg.warp(fixed, torch.linalg.inv(TRANSFORMS["similarity"].matrix(truth, tireg.image_center(40, 56))),
                        padding_mode="border")
    model = tireg.create_model("similarity", moving, image_gradient=_difference_of_gaussians, padding_mode="border")
    stacked = model.moving_with_gradient  # the image, then its two gradient images, per channel
    assert torch.equal(stacked[:, 1:].reshape(1, 1, 2, 40, 56), _difference_of_gaussians(moving))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        optimizer.zero_grad()
        model(moving, fixed)
        optimizer.step()
    # an approximate gradient stops where it vanishes, near the truth; each parameter to its own scale
    # (one 0.15 for all let the identity's angle 0 and scale 1 pass).  Measured: angle 3e-4 rad,
    # scale 1.6e-3, tx 0.027 px, ty 0.016 px (Adam's last steps at lr 0.02 included)
    error = (model.parameter_values().detach().double() - truth).abs()[0]
    assert error[0] < 0.003 and error[1] < 0.006 and error[2] < 0.1 and error[3] < 0.1, error
    # a function that returns something else is named
    for wrong in (lambda image: image, lambda image: "gradient"):
        with pytest.raises(ValueError, match=r"the image_gradient function must return the moving image's gradient "
                                             r"images \(B, C, 2, H, W\) = \(1, 1, 2, 40, 56\)"):
            tireg.create_model("similarity", moving, image_gradient=wrong)


def test_exact_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(6)
    fixed = smooth_random_image((2, 1, 40, 56), generator)
    moving = smooth_random_image((2, 1, 40, 56), generator)
    values = random_values("rigid", 2, generator)
    analytic = tireg.create_model("rigid", moving, gradients="analytic")
    reference = tireg.create_model("rigid", moving, gradients="autograd")
    set_values([analytic, reference], values, mappings_for("sigmoid", values))
    analytic(moving, fixed)
    expected = finite_difference(reference, moving, fixed, tireg.L2Loss(), step=1e-6)
    assert torch.allclose(gradients(analytic), expected, rtol=1e-4, atol=1e-6)


# -- the seed's API -----------------------------------------------------------------


def test_base_models_are_the_seed_four_parameter_similarity(images):
    fixed, moving = images
    cx, cy = tireg.image_center(*SHAPE[-2:])
    autograd = tireg.AffineModel(cx, cy, "zeros").double()
    analytic = tireg.AffineModelAnalytic(cx, cy, "zeros", moving).double()
    assert autograd.parameter_values()[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert torch.equal(autograd.get_matrix()[0], torch.eye(3, dtype=torch.float64))
    # angle, dx, dy, scale
    for model in (autograd, analytic):
        for i, value in enumerate((0.1, 2.0, -1.5, 1.05)):
            model.set_parameter(i, value, SigmoidMapping(value - 1, value + 0.5) if i != 1 else ExpMapping())
    expected = tireg.transforms.similarity_matrix(torch.tensor([0.1, 1.05, 2.0, -1.5], dtype=torch.float64), (cx, cy))
    assert torch.allclose(autograd.get_matrix()[0], expected)
    analytic.loss_func = tireg.HuberLoss(0.2)
    _, reference = autograd_gradient(autograd, moving, fixed, tireg.HuberLoss(0.2))
    analytic(moving, fixed)
    assert torch.allclose(gradients(analytic), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compile", [False, True])
def test_an_analytic_step_under_autocast_keeps_its_gradient_in_the_images_dtype(images, compile):
    """Under torch.autocast(bfloat16) the analytic step's sums ran in bfloat16: its gradient 2-6 %
    off with a .grad present, a dtype error from inside torch with none; backward() keeps the
    autograd model's float32.  The step now leaves autocast: the same gradient as without it."""
    fixed, moving = (image.float() for image in images)
    model = tireg.create_model("similarity", moving, padding_mode="border", compile=compile)
    for i, value in enumerate((0.013, 1.011, 0.337, -0.271)):
        model.set_parameter(i, value)
    model(moving, fixed)
    expected = gradients(model).clone()
    for present in (False, True):  # .grad None (zero_grad()'s default) or there (set_to_none=False)
        model.zero_grad(set_to_none=not present)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            warped, loss = model(moving, fixed)
        assert warped.dtype == loss.dtype == torch.float32
        assert all(parameter.grad.dtype == torch.float32 for parameter in model.parameters())
        torch.testing.assert_close(gradients(model), expected, rtol=0, atol=0)


def test_a_subclass_get_derva_may_hand_parameters_to_the_base_class(images):
    """A subclass's get_derva that writes one derivative itself and hands the others to
    ``super().get_derva(i)`` (it had recursed without end: the base read parameter_jacobian(),
    which calls the override) gives autograd's gradient."""
    fixed, moving = images
    cx, cy = tireg.image_center(*SHAPE[-2:])

    class OwnAngle(tireg.AffineModelAnalytic):
        def get_derva(self, i):
            if i != 0:
                return super().get_derva(i)
            angle, scale = self.get(0), self.get(3)  # d/d angle of s R(angle) about the centre
            sin, cos = torch.sin(angle) * scale, torch.cos(angle) * scale
            zero = torch.zeros_like(angle)
            linear = torch.stack([torch.stack([-sin, cos], -1), torch.stack([-cos, -sin], -1)], -2)
            centre = torch.tensor([cx, cy], dtype=linear.dtype)
            shift = -(linear @ centre)
            rows = torch.cat([linear, shift[..., None]], -1)
            return torch.cat([rows, torch.stack([zero, zero, zero], -1)[..., None, :]], -2)

    autograd = tireg.AffineModel(cx, cy, "zeros").double()
    analytic = OwnAngle(cx, cy, "zeros", moving).double()
    for model in (autograd, analytic):
        for i, value in enumerate((0.1, 2.0, -1.5, 1.05)):
            model.set_parameter(i, value)
    torch.testing.assert_close(analytic.get_derva(0), analytic.parameter_jacobian()[:, 0])
    _, reference = autograd_gradient(autograd, moving, fixed, tireg.L2Loss())
    analytic(moving, fixed)
    assert torch.allclose(gradients(analytic), reference, rtol=1e-9, atol=1e-12)


def test_user_subclass_with_get_derva_equals_autograd(images):
    """A user's own parameterisation, written as in the seed: shear plus shift."""
    fixed, moving = images
    from torch import nn

    def shear_matrix(shear, dx, dy):
        one, zero = torch.ones_like(shear), torch.zeros_like(shear)
        rows = [torch.stack([one, shear, dx], -1), torch.stack([zero, one, dy], -1), torch.stack([zero, zero, one], -1)]
        return torch.stack(rows, -2)

    class Shear(tireg.AffineModel):
        def __init__(self, cx, cy, bordermode):
            super().__init__(cx, cy, bordermode)
            self.p = nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in [0.0, 0.0, 0.0])
            self.m = [IdentityMapping() for _ in self.p]

        def get_matrix(self):
            return shear_matrix(self.get(0), self.get(1), self.get(2))

    class ShearAnalytic(tireg.AffineModelAnalytic):
        def __init__(self, cx, cy, bordermode, moving):
            super().__init__(cx, cy, bordermode, moving)
            self.p = nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in [0.0, 0.0, 0.0])
            self.m = [IdentityMapping() for _ in self.p]

        def get_matrix(self):
            return shear_matrix(self.get(0), self.get(1), self.get(2))

        def get_derva(self, idx):
            unit = torch.zeros(3, 3, dtype=torch.float64)
            unit[[0, 0, 1][idx], [1, 2, 2][idx]] = 1.0
            return unit

    autograd, analytic = Shear(0, 0, "border"), ShearAnalytic(0, 0, "border", moving)
    for model in (autograd, analytic):
        model.set_parameter(0, 0.05, SigmoidMapping(-0.5, 0.5))
        model.set_parameter(1, 1.3)
        model.set_parameter(2, -0.7)
    analytic.loss_func = tireg.CauchyLoss()
    _, expected = autograd_gradient(autograd, moving, fixed, tireg.CauchyLoss())
    analytic(moving, fixed)
    # one shared parameter set for B = 3 pairs: gradients sum over the pairs
    assert analytic.p[0].grad.shape == (1,)
    assert torch.allclose(gradients(analytic), expected, rtol=1e-9, atol=1e-12)


def test_a_subclass_forming_its_own_values_gets_their_gradient(images):
    """``get(i)`` overridden: the analytic gradient took it as ``m_i(p_i)`` and chained ``m_i'``, and an
    angle stored in degrees had 180 / pi times autograd's gradient. It goes through the subclass's own
    values by autograd now: a get() in degrees, a parameter_values() where one value feeds another,
    per pair and shared, and with the seed's own get_derva (dA/d get(i))."""
    fixed, moving = images

    def in_degrees(model, i):
        value = model.m[i](model.p[i])
        return value * (math.pi / 180) if i == 0 else value

    def coupled(model):  # the scale follows the angle: s = m_1(p_1) + 0.5 angle
        values = [model.m[i](model.p[i]) for i in range(len(model.p))]
        values[1] = values[1] + 0.5 * values[0]
        return torch.stack(torch.broadcast_tensors(*values), dim=-1)

    kinds = {"degrees": dict(get=in_degrees), "coupled": dict(parameter_values=coupled)}
    for name, methods in kinds.items():
        for shared in (False, True):
            autograd_class = type("Own", (tireg.SimilarityModel,), methods)
            analytic_class = type("OwnAnalytic", (tireg.SimilarityModelAnalytic,), methods)
            pairs = 1 if shared else moving.shape[0]
            autograd = autograd_class(26.0, 18.0, "zeros", batch_size=pairs).double()
            analytic = analytic_class(26.0, 18.0, "zeros", moving, loss_func="l2", batch_size=pairs).double()
            values = (3.0, 1.02, 1.5, -0.7) if shared else ((3.0, -2.0, 1.0), 1.02, (1.5, 0.2, -1.0), -0.7)
            for model in (autograd, analytic):
                for i, value in enumerate(values):
                    model.set_parameter(i, torch.tensor(value, dtype=torch.float64),
                                        SigmoidMapping(0.5, 1.5) if i == 1 else None)
            tireg.L2Loss()(autograd(moving), fixed).sum().backward()
            analytic(moving, fixed)
            for mine, theirs in zip(analytic.p, autograd.p):
                assert torch.allclose(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12), (name, shared)

    class SeedStyle(tireg.AffineModelAnalytic):  # the seed's own A and dA/d get(i), get() in degrees
        get = in_degrees

        def get_matrix(self):
            return tireg.transforms.translation_matrix(torch.stack([self.get(0), self.get(1)], -1))

        def get_derva(self, i):
            unit = torch.zeros(3, 3, dtype=torch.float64)
            unit[i, 2] = 1.0
            return unit

    class SeedStyleAutograd(tireg.AffineModel):
        get = in_degrees
        get_matrix = SeedStyle.get_matrix

    from torch import nn

    autograd, analytic = SeedStyleAutograd(0, 0, "zeros"), SeedStyle(0, 0, "zeros", moving)
    for model in (autograd, analytic):
        model.p = nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in (60.0, 0.5))
        model.m = [IdentityMapping(), IdentityMapping()]
    _, expected = autograd_gradient(autograd, moving, fixed, tireg.L2Loss())
    analytic(moving, fixed)
    assert torch.allclose(gradients(analytic), expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected[0], expected[0] * 180 / math.pi)


def test_subclass_without_get_derva_is_refused_by_the_analytic_path(images):
    fixed, moving = images

    class NoDerivative(tireg.AffineModelAnalytic):
        def get_matrix(self):
            return torch.eye(3, dtype=torch.float64)[None]

    model = NoDerivative(0, 0, "zeros", moving).double()
    with pytest.raises(NotImplementedError, match="get_derva"):
        model(moving, fixed)
    with pytest.raises(NotImplementedError, match="overrides get_matrix"):  # not the built-in matrix's
        model.get_derva(0)


def test_shared_parameters_sum_the_per_pair_gradients(images, device):
    fixed, moving = (image.to(device) for image in images)
    per_pair = tireg.create_model("rigid", moving, gradients="analytic")
    shared = tireg.RigidModelAnalytic(26.0, 18.0, "zeros", moving).to(device, torch.float64)  # shared
    for i, value in enumerate((0.05, 1.0, -2.0)):
        per_pair.set_parameter(i, value)
        shared.set_parameter(i, value)
    per_pair(moving, fixed)
    shared(moving, fixed)
    assert torch.allclose(gradients(shared)[0], gradients(per_pair).sum(0))


def test_pairs_in_a_batch_are_independent(images):
    fixed, moving = images
    batched = tireg.create_model("similarity", moving, gradients="analytic")
    values = random_values("similarity", SHAPE[0], torch.Generator().manual_seed(2))
    set_values([batched], values, mappings_for("identity", values))
    batched(moving, fixed)
    for b in range(SHAPE[0]):
        single = tireg.create_model("similarity", moving[b : b + 1], gradients="analytic")
        set_values([single], values[b : b + 1], mappings_for("identity", values))
        single(moving[b : b + 1], fixed[b : b + 1])
        assert torch.allclose(gradients(single)[0], gradients(batched)[b], rtol=1e-10)


def test_gradients_accumulate_like_backward(images):
    fixed, moving = images
    model = tireg.create_model("translation", moving, gradients="analytic")
    model.set_parameter(0, torch.tensor([1.0, 2.0, 3.0]))
    model(moving, fixed)
    once = gradients(model).clone()
    model(moving, fixed)
    assert torch.allclose(gradients(model), 2 * once)


#: (gradients, loss, metric) of the models whose steps are checked for waits on the host
STEP_SETUPS = [("analytic", "l2", None), ("analytic", "cauchy", None), ("analytic", "l2", "ncc"), ("autograd", "l2", None)]


def _training_step(kind: str, fixed: torch.Tensor, moving: torch.Tensor, setup: tuple):
    """A model of ``setup`` (:data:`STEP_SETUPS`) and one Adam step of it, ``step()``, taken once."""
    gradients, loss, metric = setup
    model = tireg.create_model(kind, moving, gradients=gradients, loss=loss, metric=metric, compile=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        if gradients == "analytic":
            model(moving, fixed)
        else:
            ((model(moving) - fixed) ** 2).sum().backward()
        optimizer.step()

    step()  # the first step checks the images for NaN once (a read, by design)
    return model, step


@pytest.mark.parametrize("kind", ["similarity", "affine"])
@pytest.mark.parametrize("setup", STEP_SETUPS)
def test_a_training_step_never_waits_for_the_device(images, kind, setup):
    """On a GPU every read of a value on the host, and every tensor made from host data, waits for
    the queued work: a step must have none.

    The compiled step is one graph (``fullgraph``), where a read could not stand; the eager one is
    counted here (a count on the CPU, where the same operations run).
    """
    fixed, moving = images
    model, step = _training_step(kind, fixed, moving, setup)
    with HostSyncs() as syncs:
        for _ in range(3):
            step()
    assert syncs.count == 0
    if setup[0] == "analytic":
        with HostSyncs() as syncs:  # and the count sees a wait where there is one
            model(moving.clone(), fixed)
        assert syncs.count > 0


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("kind", ["similarity", "affine"])
@pytest.mark.parametrize("setup", STEP_SETUPS)
def test_on_cuda_a_training_step_never_synchronises(images, kind, setup):
    # PyTorch's own account of synchronisations (sync debug mode), complete where the count above is not
    fixed, moving = (image.cuda() for image in images)
    _, step = _training_step(kind, fixed, moving, setup)
    with CudaSynchronisations():
        for _ in range(3):
            step()


def test_each_parameter_gets_a_gradient_of_its_own(images):
    """A first gradient is stored without a copy: no two parameters may share its memory."""
    fixed, moving = images
    model = tireg.create_model("affine", moving, gradients="analytic")
    model(moving, fixed)
    pointers = {param.grad.data_ptr() for param in model.p}
    assert len(pointers) == model.num_parameters


def test_the_model_follows_a_changed_center_and_parameter_list(images):
    """The cached centre tensor and parameter list follow what the user changes, as the seed's users do."""
    _, moving = images
    model = tireg.create_model("rigid", moving, gradients="analytic")
    model.set_parameter(0, 0.2)
    before = model.get_matrix()
    model.cx, model.cy = model.cx + 3.0, model.cy - 2.0
    expected = tireg.TRANSFORMS["rigid"].matrix(model.parameter_values(), torch.tensor([model.cx, model.cy]))
    torch.testing.assert_close(model.get_matrix(), expected.to(before.dtype))
    assert not torch.allclose(model.get_matrix(), before)
    model.p[1] = torch.nn.Parameter(torch.full((3,), 4.0, dtype=torch.float64))
    assert model._parameter_list() == list(model.p) and model.get(1)[0] == 4.0
    model.float()
    assert model._center_tensor().dtype == torch.float32


def test_set_parameter_keeps_the_parameter_object_for_the_optimiser(images):
    _, moving = images
    model = tireg.create_model("rigid", moving, gradients="autograd")
    before = model.p[0]
    model.set_parameter(0, torch.tensor([0.1, 0.2, 0.3]), SigmoidMapping(-1, 1))
    assert model.p[0] is before
    assert torch.allclose(model.get(0), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert isinstance(model.m[0], SigmoidMapping)


def test_set_parameter_keeps_a_zero_dimensional_parameter_zero_dimensional(images):
    """A model whose parameters are 0-d tensors (one's own, ``nn.Parameter(torch.tensor(0.0))``) runs;
    ``set_parameter`` with one value had failed inside torch's ``expand`` (a (1,) value onto ``()``)."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving[:1], compile=False)
    model.p = torch.nn.ParameterList(torch.nn.Parameter(torch.tensor(0.0, dtype=moving.dtype)) for _ in range(3))
    before = model.p[1]
    model.set_parameter(1, 2.5)
    assert model.p[1] is before and model.p[1].shape == () and model.p[1].item() == 2.5
    model(moving[:1], fixed[:1])
    assert model.p[1].grad.shape == () and bool(torch.isfinite(model.p[1].grad))


def test_get_derva_is_the_jacobian_of_get_matrix(images):
    _, moving = images
    model = tireg.create_model("anisotropic_similarity", moving, gradients="autograd")
    set_values([model], random_values("anisotropic_similarity", 3, torch.Generator().manual_seed(9)),
               [IdentityMapping()] * 5)
    matrix = model.get_matrix()
    for i in range(model.num_parameters):
        (row_grads,) = torch.autograd.grad(matrix.sum(), model.p[i], retain_graph=True)
        assert torch.allclose(model.get_derva(i).sum((-1, -2)), row_grads)


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "RMSprop", "LBFGS"])
def test_any_torch_optimiser_recovers_a_translation(optimizer):
    generator = torch.Generator().manual_seed(4)
    fixed = smooth_random_image((1, 1, 48, 64), generator, sigma=3.0)
    fixed = (fixed - fixed.mean()) / fixed.std()
    truth = torch.tensor([[1.0, 0.0, 1.5], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    moving = tireg.warp(fixed, torch.linalg.inv(truth), padding_mode="border")
    model = tireg.create_model("translation", moving, gradients="analytic", padding_mode="border")
    options = {
        "SGD": dict(lr=1.0),
        "Adam": dict(lr=0.1),
        "RMSprop": dict(lr=0.02),
        "LBFGS": dict(lr=1.0, line_search_fn="strong_wolfe"),
    }
    optim = getattr(torch.optim, optimizer)(model.parameters(), **options[optimizer])

    def closure():  # mean instead of sum: the same step sizes suit any image size
        optim.zero_grad()
        _, loss = model(moving, fixed)
        for p in model.p:
            p.grad /= fixed.numel()
        return loss / fixed.numel()

    for _ in range(10 if optimizer == "LBFGS" else 150):
        optim.step(closure)
    shift = model.parameter_values()[0].detach()
    assert torch.allclose(shift, torch.tensor([1.5, -1.0], dtype=torch.float64), atol=0.02), shift


# -- dtype, device, batch ----------------------------------------------------------


def test_models_move_with_to(device, images):
    fixed, moving = images
    fixed, moving = fixed.to(device), moving.to(device)
    for gradient in ("exact", "central"):
        model = tireg.create_model("similarity", moving.cpu(), gradients="analytic", image_gradient=gradient)
        model.set_parameter(0, torch.tensor([0.1, 0.0, -0.1]))
        model = model.to(device)
        assert model.get_matrix().device.type == device
        if gradient == "central":
            assert model.moving_with_gradient.device.type == device
        warped, loss = model(moving, fixed)
        assert warped.device.type == device and loss.device.type == device
        assert model.p[0].grad.device.type == device


def test_float32_model_and_images(images):
    fixed, moving = (x.float() for x in images)
    model = tireg.create_model("rigid", moving, gradients="analytic")
    assert model.p[0].dtype == torch.float32
    warped, loss = model(moving, fixed)
    assert warped.dtype == torch.float32 and math.isfinite(float(loss))


# -- bad input ----------------------------------------------------------------------


def test_errors_name_the_problem(images):
    fixed, moving = images
    model = tireg.create_model("rigid", moving, gradients="analytic")
    autograd = tireg.create_model("rigid", moving, gradients="autograd")
    with pytest.raises(ValueError, match="4 dimensions"):
        model(moving[0], fixed[0])
    with pytest.raises(ValueError, match="4 dimensions"):
        autograd(moving[0, 0])
    with pytest.raises(ValueError, match="same batch size and channels"):
        model(moving, fixed[:, :1])
    with pytest.raises(ValueError, match="parameter sets"):
        model(moving[:2], fixed[:2])
    bad = fixed.clone()
    bad[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(moving, bad)
    with pytest.raises(ValueError, match="NaN"):
        autograd(torch.where(bad.isnan(), bad, moving))
    with pytest.raises(ValueError, match="empty"):
        model(moving[:, :, :0], fixed[:, :, :0])
    with pytest.raises(TypeError, match="float32 or float64"):
        autograd(moving.to(torch.int32))
    with pytest.raises(ValueError, match="move the model"):
        model(moving.float(), fixed.float())
    with pytest.raises(IndexError, match="out of range.*3 parameters"):
        model.get(3)
    with pytest.raises(IndexError, match="out of range"):
        model.set_parameter(-1, 0.0)
    with pytest.raises(IndexError, match="out of range"):
        model.get_derva(7)
    with pytest.raises(ValueError, match="outside the open range"):
        model.set_parameter(0, 2.0, SigmoidMapping(-1, 1))
    with pytest.raises(ValueError, match="border mode 'mirror'"):
        tireg.RigidModel(0, 0, "mirror")
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        tireg.RigidModel(0, 0, "zeros", interpolation="cubic")
    with pytest.raises(ValueError, match="image gradient 'sobel'"):
        tireg.RigidModelAnalytic(0, 0, "zeros", moving, image_gradient="sobel")
    with pytest.raises(ValueError, match="unknown transform 'projective'"):
        tireg.create_model("projective", moving)
    with pytest.raises(ValueError, match="unknown loss"):
        tireg.create_model("rigid", moving, loss="l3")
    with pytest.raises(ValueError, match="batch_size"):
        tireg.RigidModel(0, 0, batch_size=0)
    with pytest.raises(ValueError, match="'batch_size' must be a whole number"):
        tireg.RigidModel(0, 0, batch_size=2.7)
    with pytest.raises(ValueError, match=r"^AffineModel.cx: 'cx' must be finite; got nan"):
        tireg.AffineModel(float("nan"), 1.0, "zeros")
    with pytest.raises(ValueError, match=r"^RigidModelAnalytic.cy: 'cy' must be finite; got inf"):
        model.cy = float("inf")  # also when set later (a NaN centre made every matrix NaN)
    pairs = moving.shape[0]
    with pytest.raises(ValueError, match=rf"{pairs + 1} values for a model of {pairs} image pairs"):
        model.set_parameter(0, [0.1] * (pairs + 1))  # it was taken, and every later step failed
    with pytest.raises(TypeError, match=r"'source' must be a torch.Tensor; got ndarray"):
        model(moving.numpy(), fixed.numpy())
    with pytest.raises(ValueError, match=r"RigidModelAnalytic.interpolation: unknown interpolation 'nearest'"):
        model.interpolation = "nearest"  # the constructor's check, also when set later
    with pytest.raises(ValueError, match=r"RigidModelAnalytic.bordermode: unknown border mode 'mirror'"):
        model.bordermode = "mirror"
    with pytest.raises(ValueError, match="gives a NaN or infinite parameter"):
        model.set_parameter(0, float("nan"))
    with pytest.raises(TypeError, match="'value' must be a number"):
        model.set_parameter(0, "0.1")
    with pytest.raises(TypeError, match="parameter index must be an integer; got float"):
        model.get(1.0)
    with pytest.raises(ValueError, match=r"'center' must be \(cx, cy\) in pixels; got \(1, 2, 3\)"):
        tireg.create_model("rigid", moving, center=(1, 2, 3))
    with pytest.raises(ValueError, match="'metric' applies to the analytic model"):
        tireg.create_model("rigid", moving, gradients="autograd", metric="ncc")
    with pytest.raises(ValueError, match="give a loss or a metric, not both"):
        tireg.create_model("rigid", moving, loss="cauchy", metric="ncc")


def test_set_parameter_solves_a_number_in_float64(images):
    """A Python number became float32 before the mapping solved it: 0.1 on a float64 model was
    off by 1.5e-9 (4e-8 through a sigmoid), which finite differences through it would show."""
    model = tireg.create_model("rigid", images[1][:1])
    assert model.p[0].dtype == torch.float64
    model.set_parameter(1, 0.1)
    model.set_parameter(0, 0.1, SigmoidMapping(-1, 1))
    model.set_parameter(2, [0.1], ExpMapping())
    assert model.get(1).item() == 0.1 and model.get(0).item() == pytest.approx(0.1, abs=1e-15)
    assert model.get(2).item() == pytest.approx(0.1, abs=1e-15)
    with pytest.raises(TypeError, match=r"^set_parameter\(\): 'value' must be numbers; got \['a'\]"):
        model.set_parameter(1, ["a"])


def test_a_failed_set_parameter_changes_nothing(images):
    """The mapping is taken only once its value solves (an ExpMapping of 0 raises)."""
    _, moving = images
    model = tireg.create_model("similarity", moving)
    before = model.get(1).detach().clone()
    with pytest.raises(ValueError, match="must be positive"):
        model.set_parameter(1, 0.0, ExpMapping())
    assert torch.equal(model.get(1), before) and type(model.m[1]) is not ExpMapping
    model.set_parameter(np.int64(1), 1.5)  # a NumPy index is an index
    assert torch.allclose(model.get(1), torch.tensor(1.5, dtype=before.dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("compile", [False, True])
def test_a_training_step_never_synchronises_on_cuda(compile):
    """torch's sync debug mode raises on any host synchronisation: none in an analytic step."""
    generator = torch.Generator().manual_seed(0)
    fixed = smooth_random_image((2, 1, 64, 64), generator).float().cuda()
    moving = smooth_random_image((2, 1, 64, 64), generator).float().cuda()
    model = tireg.create_model("similarity", moving, compile=compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():  # a compile that fell back would check the reference path twice
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):  # warm-up: the NaN check, the compile
            optimizer.zero_grad()
            model(moving, fixed)
            optimizer.step()
    assert "cuda" not in tireg.fused._failed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.zero_grad()
            model(moving, fixed)
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_state_dict_keeps_the_mappings(images, tmp_path):
    """Raw values mean nothing without their mappings: a sigmoid's 0.3 came back as 0.62."""
    _, moving = images
    saved = tireg.create_model("similarity", moving)
    saved.set_parameter(0, 0.3, SigmoidMapping(-1.0, 1.0))
    saved.set_parameter(1, 1.1, ExpMapping())
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    loaded = tireg.create_model("similarity", moving)
    loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # plain data only
    assert isinstance(loaded.m[0], SigmoidMapping) and (loaded.m[0].lo, loaded.m[0].hi) == (-1.0, 1.0)
    assert isinstance(loaded.m[1], ExpMapping) and isinstance(loaded.m[2], IdentityMapping)
    torch.testing.assert_close(loaded.parameter_values(), saved.parameter_values())

    class Halved(IdentityMapping):  # a mapping of one's own is not saved: the loading model keeps its own
        def forward(self, raw):
            return raw / 2

    saved.m[2] = Halved()
    loaded.load_state_dict(saved.state_dict())
    assert type(loaded.m[2]) is IdentityMapping


@pytest.mark.parametrize("gradients", ["analytic", "autograd"])
def test_a_state_dict_with_nan_parameters_is_refused_whole(images, gradients):
    """set_parameter refuses NaN; load_state_dict took it, and every later cost was NaN.  Refused
    before any parameter of the model is loaded, inside another module too."""
    _, moving = images
    model = tireg.create_model("similarity", moving, gradients=gradients)
    model.set_parameter(1, 1.1)
    before = model.parameter_values().clone()
    state = model.state_dict()
    state["p.0"], state["p.2"] = torch.tensor([0.2]), torch.tensor([float("inf")])
    name = type(model).__name__
    with pytest.raises(ValueError, match=rf"^{name}.load_state_dict\(\): 'p.2' contains NaN or Inf; nothing of "
                                         r"this model was loaded$"):
        model.load_state_dict(state)
    assert torch.equal(model.parameter_values(), before)
    outer = torch.nn.Sequential(model)
    with pytest.raises(ValueError, match=r"'0.p.2' contains NaN or Inf"):
        outer.load_state_dict({f"0.{key}": value for key, value in state.items()})
    assert torch.equal(model.parameter_values(), before)


# ----------------------------------------------------------------------------
# the analytic model as the nn.Module a PyTorch user expects


def test_a_fresh_tensor_each_step_is_the_image_warped():
    """The precomputed gradient images were kept by (id, version): a new frame.clone() made where
    the previous one had been freed matched, and the model warped the previous frame."""
    fixed = smooth_random_image((1, 1, 64, 64), torch.Generator().manual_seed(3))
    frames = [torch.roll(fixed, 3 * k, -1) for k in range(4)]
    expected = [tireg.create_model("translation", fixed, image_gradient="central")(frame, fixed)[1]
                for frame in frames]
    model = tireg.create_model("translation", fixed, image_gradient="central")
    costs = []
    for frame in frames:
        fresh = frame.clone()
        costs.append(model(fresh, fixed)[1])
        del fresh  # freed: the next clone may take its id and its memory
    assert all(torch.equal(cost, truth) for cost, truth in zip(costs, expected))


def test_a_tensor_stamp_matches_only_the_same_live_unchanged_tensor():
    from tireg._validation import TensorStamp, matches

    image = torch.zeros(4, 4)
    stamp = TensorStamp(image, "border")
    assert stamp.matches(image, "border") and not stamp.matches(image, "zeros") and not matches(None, image)
    assert not stamp.matches(image.clone(), "border")
    image.add_(1.0)  # in place: the version counter moves
    assert not stamp.matches(image, "border")
    with torch.inference_mode():
        inference = torch.zeros(4, 4)
    assert not TensorStamp(inference).matches(inference)  # no version counter: never trusted
    stamp = TensorStamp(torch.ones(3))  # its tensor freed at once: nothing made later is it
    assert not any(stamp.matches(torch.ones(3)) for _ in range(100))
    stack = torch.rand(3, 1, 8, 8)
    stamp = TensorStamp(stack[:1])  # a view, a new object each time: stamped by its base and place
    assert stamp.matches(stack[:1]) and stamp.matches(stack.narrow(0, 0, 1))
    assert not stamp.matches(stack[1:2]) and not stamp.matches(stack[:1].clone())
    stack[2].zero_()  # views share the base's version counter: any write counts
    assert not stamp.matches(stack[:1])


def test_a_view_passed_each_step_keeps_the_models_caches():
    """Stamped by object, a view made anew each step (stack[:1]) missed every cache: the NaN check
    (a wait on a GPU) and the gradient images were made again each step (1.2 -> 2.0 ms at 256^2)."""
    stack = smooth_random_image((3, 1, 48, 48), torch.Generator().manual_seed(5))
    model = tireg.create_model("translation", stack[:1], image_gradient="gaussian")
    model(stack[:1], stack[1:2])
    kept = model.moving_with_gradient
    model(stack[:1], stack[1:2])
    assert model.moving_with_gradient is kept
    stack[0].mul_(2.0)  # a write through the base: made again
    model(stack[:1], stack[1:2])
    assert model.moving_with_gradient is not kept


def test_analytic_gradients_are_laid_out_for_fused_optimisers(images):
    """Each per-pair gradient was a strided column of one (B, P) tensor; Adam/SGD(fused=True) read a
    .grad as laid out like its parameter, and pair 1 took pair 0's ty gradient as its tx."""
    fixed, moving = images[0][:2], images[1][:2]
    models = {kind: tireg.create_model("translation", moving, gradients=kind) for kind in ("analytic", "autograd")}
    for model in models.values():
        set_values([model], torch.tensor([[1.0, -0.5], [0.5, 2.0]], dtype=torch.float64), [IdentityMapping()] * 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, fused=True)
        if model is models["analytic"]:
            model(moving, fixed)
        else:
            tireg.losses.L2Loss()(model(moving), fixed).sum().backward()
        assert all(param.grad.is_contiguous() and param.grad.stride() == param.stride() for param in model.p)
        optimizer.step()
    torch.testing.assert_close(models["analytic"].parameter_values(), models["autograd"].parameter_values(),
                               rtol=1e-9, atol=1e-12)


def test_frozen_parameters_and_no_grad_get_no_gradient(images):
    """The analytic model wrote param.grad for a parameter that does not require grad (Adam then
    moved it) and under no_grad()/inference_mode() (a validation forward doubled the gradient)."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving)
    model.p[0].requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(moving, fixed)
    assert model.p[0].grad is None and model.p[1].grad is not None
    once = [param.grad.clone() for param in model.p[1:]]
    with torch.no_grad():
        model(moving, fixed)
    with torch.inference_mode():
        model(moving, fixed)
    assert all(torch.equal(param.grad, grad) for param, grad in zip(model.p[1:], once))
    optimizer.step()
    assert bool((model.get(0) == 0.0).all()) and bool((model.get(1) != 0.0).all())


def test_inference_tensors_meta_models_and_a_dtype_mismatch_are_handled(images):
    """An inference tensor raised inside the NaN check's cache (it keeps no version counter);
    printing a model on 'meta' read its values; the autograd model named a 'matrix' never passed."""
    fixed, moving = images
    with torch.inference_mode():
        frozen_fixed, frozen_moving = fixed.clone(), moving.clone()
    model = tireg.create_model("translation", moving)
    _, cost = model(frozen_moving, frozen_fixed)
    assert torch.isfinite(cost) and model.p[0].grad is not None
    assert "values on 'meta'" in repr(tireg.create_model("rigid", moving).to("meta"))
    autograd = tireg.create_model("rigid", moving.float(), gradients="autograd")
    with pytest.raises(ValueError, match=r"forward\(\): the model's parameters are torch.float32 on cpu but the "
                                         r"images are torch.float64"):
        autograd(moving)


@pytest.mark.parametrize("metric", ["mi", "nmi"])
def test_a_histogram_metric_gradient_is_the_derivative_of_its_cost(metric):
    """Without set_ranges the ranges were each warped image's own: they move with the transform, and
    the analytic model's (and autograd's) gradient was 3 % off the cost's finite differences."""
    generator = torch.Generator().manual_seed(11)
    fixed = smooth_random_image((1, 1, 48, 56), generator, sigma=2.0)
    moving = smooth_random_image((1, 1, 48, 56), generator, sigma=2.0)
    model = tireg.create_model("rigid", moving, metric=metric, compile=False)
    values = torch.tensor([[0.03, 0.37, -0.61]], dtype=torch.float64)
    set_values([model], values, mappings_for("identity", values))
    model(moving, fixed)
    expected = torch.zeros(1, 3, dtype=torch.float64)
    with torch.no_grad():
        for i, param in enumerate(model.p):
            costs = []
            for sign in (1.0, -1.0):
                param[0] = values[0, i] + sign * 1e-6
                costs.append(model(moving, fixed)[1])
            param[0] = values[0, i]
            expected[0, i] = (costs[0] - costs[1]) / 2e-6
    assert torch.allclose(gradients(model), expected, rtol=1e-4, atol=1e-7), (gradients(model), expected)
    assert model.metric.ranges is None  # the model's copy holds the whole images' ranges, not the metric
    own = tireg.metrics.get_metric(metric)
    own.set_ranges(moving * 2, fixed)
    model.metric = own
    before = dict(vars(own))
    model(moving, fixed)
    assert torch.equal(own.ranges[0], torch.stack([(moving * 2).amin((2, 3)), (moving * 2).amax((2, 3))], -1))
    # the user's ranges are used, and the user's metric is left as it was: it kept the fixed bins
    # (and the fixed image) of the model's step, shared by every model and thread using it
    assert vars(own).keys() == before.keys() and all(vars(own)[key] is value for key, value in before.items())


def test_a_histogram_metric_shared_or_copied_follows_each_models_images():
    """The model set its images' ranges on the metric itself: a copy of the model, or a second model
    sharing the metric, then costed other images with stale ranges (-1e-5, zero gradients)."""
    import copy

    generator = torch.Generator().manual_seed(12)
    first = [smooth_random_image((1, 1, 48, 48), generator, sigma=2.0) for _ in range(2)]
    second = [3.0 + 5.0 * smooth_random_image((1, 1, 48, 48), generator, sigma=2.0) for _ in range(2)]
    shared = tireg.metrics.get_metric("mi")
    model = tireg.create_model("rigid", first[0], metric=shared, compile=False)
    model(*first)
    fresh = tireg.create_model("rigid", second[0], metric="mi", compile=False)
    _, expected = fresh(*second)
    for other in (copy.deepcopy(model), tireg.create_model("rigid", second[0], metric=shared, compile=False)):
        other.zero_grad()
        _, cost = other(*second)
        assert torch.allclose(cost, expected) and torch.equal(gradients(other), gradients(fresh))
    assert shared.ranges is None


def test_a_used_model_pickles_without_its_image_caches(images, tmp_path):
    """Its caches are keyed by weak references, which cannot be pickled: torch.save and a process pool
    failed once the model had run a forward."""
    import pickle

    fixed, moving = images
    for options in (dict(), dict(image_gradient="gaussian"), dict(gradients="autograd")):
        model = tireg.create_model("similarity", moving, **options)
        model(moving, fixed) if "gradients" not in options else model(moving)
        data = pickle.dumps(model)
        assert len(data) < 0.1 * moving.numel() * 8, len(data)  # no image-sized cache inside
        copy = pickle.loads(data)
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        if "gradients" in options:
            assert torch.equal(copy(moving), model(moving)) and torch.equal(loaded(moving), model(moving))
            continue
        for each in (model, copy, loaded):
            each.zero_grad()
        expected = model(moving, fixed)[1]
        for each in (copy, loaded):
            assert torch.equal(each(moving, fixed)[1], expected)
            assert torch.equal(gradients(each), gradients(model))


def test_an_inference_mode_forward_leaves_the_autograd_model_trainable(images):
    """Its centre, made under inference_mode() and kept, was an inference tensor: every later
    backward() failed ("Inference tensors cannot be saved for backward")."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving, gradients="autograd")
    with torch.inference_mode():
        model(moving)
    ((model(moving) - fixed) ** 2).sum().backward()
    assert all(p.grad is not None for p in model.p)


def test_the_autograd_model_runs_under_vmap_and_on_meta(images):
    """Its NaN check read a value: vmap raised on data-dependent control flow, meta on .item()."""
    fixed, moving = images
    model = tireg.create_model("translation", moving[:1], gradients="autograd")
    batched = torch.func.vmap(lambda image: model(image[None])[0])(moving)
    assert torch.equal(batched, torch.cat([model(image[None]) for image in moving]))
    on_meta = model.to("meta")(moving[:1].to("meta"))
    assert on_meta.is_meta and on_meta.shape == moving[:1].shape


def test_torch_func_on_the_analytic_model_is_refused_with_a_message(images):
    """torch.func.grad of an analytic model raised from inside the sampler, or (after one forward)
    returned zero gradients without a word."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving, compile=False)
    model(moving, fixed)
    parameters = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match=r"torch.func transforms .* cannot run an analytic model"):
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (moving, fixed))[1])(parameters)


def test_a_loss_or_metric_set_after_construction_is_taken_by_name_and_checked(images):
    """model.loss_func = "cauchy" raised torch's "cannot assign 'str' as child module", and
    model.metric = 3 was taken until the next forward failed."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving)
    model.loss_func = "cauchy"
    assert isinstance(model.loss_func, tireg.CauchyLoss) and "loss_func" in dict(model.named_children())
    model.metric = "ncc"
    assert isinstance(model.metric, tireg.metrics.NCC)
    name = type(model).__name__
    with pytest.raises(ValueError, match=rf"^{name}.metric: unknown metric 3"):
        model.metric = 3
    with pytest.raises(ValueError, match=rf"^{name}.loss_func: unknown loss 'bar'"):
        model.loss_func = "bar"
    assert isinstance(model.metric, tireg.metrics.NCC) and isinstance(model.loss_func, tireg.CauchyLoss)
    model.metric = None
    model.loss_func = None  # as in the constructor: L2
    assert isinstance(model.loss_func, tireg.L2Loss)
    model(moving, fixed)


def test_sigma_and_sigmoid_bounds_are_named_when_wrong(images):
    """create_model(sigma="1") raised "'>' not supported"; sigma=1e6 ran out of memory inside torch;
    SigmoidMapping("a", 1) said only "could not convert string to float" (and took "1")."""
    _, moving = images
    with pytest.raises(TypeError, match=r"^RigidModelAnalytic.sigma: 'sigma' must be a number; got '1'$"):
        tireg.create_model("rigid", moving, image_gradient="gaussian", sigma="1")
    with pytest.raises(ValueError, match=r"^image_gradient\(\): 'sigma' 1e\+06 px is wider than the"):
        tireg.create_model("rigid", moving, image_gradient="gaussian", sigma=1e6)
    tireg.create_model("translation", torch.rand(1, 1, 1, 40))  # sigma (1) unused: an image of one row
    for lo, hi in (("a", 1), (0, "1"), (None, 1.0)):
        with pytest.raises(TypeError, match=r"^SigmoidMapping\(\): 'lo' and 'hi' must be numbers"):
            SigmoidMapping(lo, hi)
    assert SigmoidMapping(np.float32(-1), torch.tensor(2.0)).hi == 2.0


def test_image_gradient_and_sigma_set_after_construction_are_checked(images):
    """The constructor refused an unknown image gradient and a sigma <= 0, but both were taken
    without a word when set later, and the model ran on (bordermode and interpolation are checked)."""
    _, moving = images
    model = tireg.create_model("rigid", moving, image_gradient="central", compile=False)
    with pytest.raises(ValueError, match=r"^RigidModelAnalytic.image_gradient: unknown image gradient 'bogus'; "
                                         r"choose one of 'exact', 'central', 'gaussian'$"):
        model.image_gradient = "bogus"
    with pytest.raises(ValueError, match=r"^RigidModelAnalytic.sigma: 'sigma' must be positive; got -1$"):
        model.sigma = -1.0
    with pytest.raises(TypeError, match=r"^RigidModelAnalytic.sigma: 'sigma' must be a number; got 'x'$"):
        model.sigma = "x"
    assert model.image_gradient == "central" and model.sigma == 1.0  # a refused value changes nothing
    model.image_gradient, model.sigma = "gaussian", 2
    assert model.image_gradient == "gaussian" and model.sigma == 2.0


class _CentralGradient(torch.nn.Module):
    """An image gradient of one's own that is a module (checked as a callable, kept as a child)."""

    def forward(self, image):
        return tireg.image_gradient(image, method="central")


def test_an_image_gradient_module_is_kept_as_a_child_and_can_be_replaced(images):
    """A module set as the image gradient moves with the model (a child); a name set after it is
    taken (torch had refused it: "cannot assign 'str' as child module")."""
    fixed, moving = images
    gradient = _CentralGradient()
    model = tireg.create_model("rigid", moving, image_gradient=gradient, compile=False)
    assert model.image_gradient is gradient and any(child is gradient for child in model.children())
    model(moving, fixed)
    model.image_gradient = "exact"
    assert model.image_gradient == "exact" and not any(child is gradient for child in model.children())
    model(moving, fixed)

    class EarlyCentre(tireg.AffineModel):  # a setting set before nn.Module.__init__, as the seed's users may
        def __init__(self):
            self.cx = 1.0
            super().__init__(1.0, 2.0)

    assert EarlyCentre().cx == 1.0


@pytest.mark.parametrize("built, changed", [
    (dict(image_gradient="central", padding_mode="zeros"), dict(bordermode="border")),
    (dict(image_gradient="gaussian", sigma=1.0), dict(sigma=3.0)),
    (dict(image_gradient="central"), dict(image_gradient="gaussian")),
])
def test_a_changed_setting_makes_the_gradient_images_again(built, changed):
    """The precomputed gradient images were made again only for another source tensor: after
    ``bordermode = "border"`` the model sampled gradients made with zero padding (and a new sigma
    or method was not used).  A changed setting gives the gradients of a model built with it."""
    generator = torch.Generator().manual_seed(0)
    moving = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 36, 44, generator=generator, dtype=torch.float64), 5, 1)
    fixed = torch.roll(moving, (1, 2), (2, 3))

    def gradient_of(model):
        model.set_parameter(1, 2.5)
        model.set_parameter(2, -1.5)
        model.zero_grad()
        model(moving, fixed)
        return gradients(model)

    model = tireg.create_model("rigid", moving, compile=False, **built)
    before = gradient_of(model)  # the gradient images made with the first settings
    for name, value in changed.items():
        setattr(model, name, value)
    options = dict(built, **{"padding_mode" if name == "bordermode" else name: value for name, value in changed.items()})
    expected = gradient_of(tireg.create_model("rigid", moving, compile=False, **options))
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(gradient_of(model), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.Adam(params, lr=0.01),
    lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
])
def test_set_parameter_refuses_a_change_of_shape_an_optimiser_cannot_follow(images, optimizer):
    """One value per pair on a shared (1,) parameter replaced its data by a (B,) tensor: the
    optimiser built before kept (1,) state, and its next step failed inside torch.optim
    ("output with shape [1] doesn't match the broadcast shape [3]")."""
    fixed, moving = images
    model = tireg.RigidModelAnalytic(*tireg.image_center(*SHAPE[-2:]), "zeros", moving).double()  # shared (1,)
    step = optimizer(model.parameters())
    model(moving, fixed)
    step.step()
    step.zero_grad()
    before = model.get(1).detach().clone()
    with pytest.raises(ValueError, match=r"^set_parameter\(\): parameter 1 has shape \(1,\); 3 values change its "
                                         r"shape, which an optimiser built before cannot follow: build the model "
                                         r"with batch_size=3"):
        model.set_parameter(1, torch.tensor([0.5, 1.0, 1.5]))
    assert torch.equal(model.get(1), before)
    model.set_parameter(1, 0.5)  # one value keeps the shape
    model(moving, fixed)
    step.step()
    assert model.p[1].shape == (1,)
    per_pair = tireg.create_model("rigid", moving)  # what the message says: one parameter set per pair
    per_pair.set_parameter(1, torch.tensor([0.5, 1.0, 1.5]))
    assert per_pair.get(1).tolist() == [0.5, 1.0, 1.5]


def test_the_autograd_model_refuses_a_loss_or_sigma_it_would_ignore(images):
    """metric and image_gradient were refused for gradients="autograd", but loss and sigma were
    neither refused nor checked: loss="bogus", loss=3, sigma=-5 and sigma="x" all gave a model."""
    _, moving = images
    for loss in ("bogus", 3):
        with pytest.raises(ValueError, match=rf"^create_model\(\): unknown loss {loss!r}; choose one of 'l2'"):
            tireg.create_model("rigid", moving, gradients="autograd", loss=loss)
    for sigma in (-5.0, "x", 2.0):
        with pytest.raises(ValueError, match=rf"^create_model\(\): 'sigma' applies to the analytic model; got "
                                             rf"sigma={sigma!r} with gradients='autograd'"):
            tireg.create_model("rigid", moving, gradients="autograd", sigma=sigma)
    with pytest.raises(ValueError, match=r"^create_model\(\): 'loss', 'metric' and 'sigma' apply to the analytic "
                                         r"model; got loss='cauchy', metric='ncc', sigma=2 with"):
        tireg.create_model("rigid", moving, gradients="autograd", loss="cauchy", metric="ncc", sigma=2)
    for options in (dict(loss="l2", sigma=1), dict(loss=tireg.L2Loss()), dict(loss=None)):  # the defaults' own
        assert type(tireg.create_model("rigid", moving, gradients="autograd", **options)) is tireg.RigidModel


def test_a_subclass_setting_only_its_transform_takes_the_transforms_order(images):
    """The base's transform_slots are the seed's (0, 3, 1, 2): a subclass that set only ``transform``
    inherited them, and its constructor raised an IndexError (rigid) or its model had four parameters
    and failed at the first forward (affine).  It takes the transform's own order now, and slots that
    are no permutation of the transform's parameters are refused when the class is defined."""
    fixed, moving = images
    for name in ("rigid", "affine"):
        for base in (tireg.AffineModel, tireg.AffineModelAnalytic):
            mine = type(f"My{name}", (base,), {"transform": TRANSFORMS[name]})
            arguments = (26.0, 18.0, "zeros") + ((moving,) if base is tireg.AffineModelAnalytic else ())
            model = mine(*arguments, batch_size=SHAPE[0]).double()
            ready = tireg.create_model(name, moving, gradients="autograd", center=(26.0, 18.0))
            assert model.num_parameters == TRANSFORMS[name].num_parameters
            values = random_values(name, SHAPE[0], torch.Generator().manual_seed(5))
            set_values([model, ready], values, [IdentityMapping()] * values.shape[1])
            torch.testing.assert_close(model.get_matrix(), ready.get_matrix(), rtol=0, atol=0)
            if base is tireg.AffineModelAnalytic:
                model(moving, fixed)
    for slots in ((0, 3, 1, 2), (0, 1, 1), (0, 1), "012", (0, 1.0, 2)):
        with pytest.raises(ValueError, match=r"^MyRigid: 'transform_slots' must be None or a permutation of "
                                             r"range\(3\), .* \(set transform_slots = None for the transform's own"):
            type("MyRigid", (tireg.AffineModelAnalytic,), {"transform": TRANSFORMS["rigid"], "transform_slots": slots})
    with pytest.raises(TypeError, match=r"^Mine: 'transform' must be a tireg Transform \(tireg.TRANSFORMS\); got str"):
        type("Mine", (tireg.AffineModel,), {"transform": "rigid"})
    seed = type("Seed", (tireg.AffineModel,), {"transform_slots": (0, 1, 2, 3)})(0.0, 0.0)  # base's transform
    assert seed.num_parameters == 4


def test_the_autograd_model_called_as_the_analytic_one_says_so_briefly(images):
    """model(moving, fixed), the analytic model's call, passed the fixed image as the autograd model's
    size: the message spoke of 'size' only and printed the whole image (7.8 kB for 3 x 12 x 15)."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving, gradients="autograd")
    with pytest.raises(ValueError, match=r"^RigidModel.forward\(\): 'size' must be \(H, W\); got a tensor of shape "
                                         r"\(3, 2, 37, 53\): the autograd model takes forward\(source\) and returns "
                                         r"the warped image \(the fixed image goes into your loss\)$"):
        model(moving, fixed)
    assert model(moving, torch.tensor([20, 30])).shape == (*SHAPE[:2], 20, 30)  # a size as a tensor still works


def test_a_subclass_restating_its_inherited_transform_keeps_the_inherited_slots(images):
    """``class Mine(AffineModel): transform = TRANSFORMS["similarity"]`` restates the base's own
    transform: it had the seed's order (0, 3, 1, 2), then (a reset on any ``transform`` in the class)
    the transform's own, and the seed's scale p3 silently became ty.  A different transform still
    takes its own order, and slots that are no permutation are still refused."""
    _, moving = images
    for base in (tireg.AffineModel, tireg.AffineModelAnalytic):
        arguments = (26.0, 18.0, "zeros") + ((moving,) if base is tireg.AffineModelAnalytic else ())
        restated = type("Mine", (base,), {"transform": TRANSFORMS["similarity"]})
        again = type("Again", (restated,), {"transform": TRANSFORMS["similarity"]})
        assert restated.transform_slots == again.transform_slots == (0, 3, 1, 2)
        for cls in (restated, again):
            model, seed = cls(*arguments).double(), base(*arguments).double()
            for each in (model, seed):
                each.set_parameter(3, 1.25)  # the seed's order: p3 is the scale
            torch.testing.assert_close(model.get_matrix(), seed.get_matrix(), rtol=0, atol=0)
            assert model.get_matrix()[0, 0, 0].item() == 1.25
        other = type("Other", (restated,), {"transform": TRANSFORMS["rigid"]})  # another transform: its order
        assert other.transform_slots is None and other(*arguments).num_parameters == 3
        with pytest.raises(ValueError, match=r"^Bad: 'transform_slots' must be None or a permutation of range\(4\)"):
            type("Bad", (base,), {"transform": TRANSFORMS["similarity"], "transform_slots": (0, 1, 1, 2)})


class _ScaledCentralGradient(torch.nn.Module):
    """An image gradient of one's own with a parameter: it has state dict entries."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, image):
        return self.scale * tireg.image_gradient(image, method="central")


def test_an_image_gradient_module_keeps_its_public_state_dict_keys(images):
    """A module set as the image gradient was a plain child, ``image_gradient.*`` in the state dict;
    kept as a checked setting it had become ``_image_gradient.*``, and a strict load_state_dict of a
    state dict saved before raised (missing "_image_gradient.scale", unexpected "image_gradient.scale")."""
    fixed, moving = images
    model = tireg.create_model("rigid", moving, image_gradient=_ScaledCentralGradient(), compile=False)
    assert [key for key in model.state_dict() if "gradient" in key] == ["image_gradient.scale"]
    saved = dict(model.state_dict())
    saved["image_gradient.scale"] = torch.tensor(2.0, dtype=torch.float64)
    model.load_state_dict(saved)  # strict
    assert model.image_gradient.scale.item() == 2.0 and dict(model.named_children())["image_gradient"].scale == 2.0
    assert model.float().image_gradient.scale.dtype == torch.float32  # a child: it moves with the model
    model.double()(moving, fixed)
    model.image_gradient = "central"  # the module goes, and its keys with it
    assert model.image_gradient == "central" and not any("gradient" in key for key in model.state_dict())
    model.image_gradient = gradient = _ScaledCentralGradient()
    assert model.image_gradient is gradient and list(model.state_dict())[-1] == "image_gradient.scale"


@pytest.mark.parametrize("batch_size", [-3, -1, 0, 2.5, True, torch.tensor([1, 2]), "2"])
def test_matrix_refuses_a_batch_size_that_is_not_a_whole_number_of_at_least_one(batch_size):
    """-3 raised torch's "integer multiplication overflow", 2.5 a TypeError from expand, a 1-d
    tensor "Boolean value of Tensor ... is ambiguous", and -1 and True gave one pair without a word."""
    model = tireg.create_model("rigid", torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"^matrix\(\): 'batch_size' must be a whole number of at least 1; got "):
        model.matrix(batch_size)
    assert model.matrix(3.0).shape == (3, 3, 3) and model.matrix(np.int64(2)).shape == (2, 3, 3)


def test_set_parameter_of_a_value_beyond_float64_is_a_value_error_naming_it():
    """set_parameter(0, 10**400) raised a bare OverflowError from torch.as_tensor."""
    model = tireg.create_model("rigid", torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"^set_parameter\(\): 'value' is beyond float64's range"):
        model.set_parameter(0, 10**400)
    with pytest.raises(ValueError, match=r"^set_parameter\(\): 'value' has a value beyond float64's range"):
        model.set_parameter(0, [10**400])
    assert float(model.get(0)) == 0.0


@pytest.mark.parametrize("index", [True, False, np.True_])
def test_a_bool_parameter_index_is_a_type_error(index):
    """set_parameter(True, 0.1) said "parameter index True is out of range" (an IndexError, as for
    get(False)): a bool is no index at all, as a float or a string."""
    model = tireg.create_model("rigid", torch.rand(1, 1, 8, 8))
    for call, caller in ((lambda: model.set_parameter(index, 0.1), "set_parameter"), (lambda: model.get(index), "get"),
                         (lambda: model.get_derva(index), "get_derva")):
        with pytest.raises(TypeError, match=rf"^{caller}\(\): parameter index must be an integer; got bool"):
            call()
    with pytest.raises(IndexError, match=r"^get\(\): parameter index -3 is out of range"):
        model.get(-3)


# -- seed-style subclasses: lists built by hand (the seed's MyModel / MyModelAnalytic) --------------


def test_set_parameter_of_several_values_on_zero_dimensional_parameters_is_the_shape_error():
    """0-d parameters (``torch.tensor(0.0)``) and one value per pair: a bare IndexError from reading
    ``shape[0]`` of a 0-d parameter; it is the ValueError that says to build with ``batch_size``."""
    from torch import nn

    model = tireg.AffineModel(31.5, 23.5, "zeros")
    model.p = nn.ParameterList(torch.tensor(v) for v in (0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(\).*batch_size=2"):
        model.set_parameter(1, torch.tensor([0.1, 0.2]))
    assert model.p[1].item() == 0.0


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_a_mapping_list_shorter_than_the_parameters_is_named(images, gradients):
    """self.p with five entries and self.m with four: get(), set_parameter(), forward and state_dict()
    raised a bare "list index out of range" (or saved four mappings); each names self.m now."""
    from torch import nn

    fixed, moving = (image.float() for image in images)
    model = (tireg.AffineModel(26.0, 18.0, "zeros") if gradients == "autograd"
             else tireg.AffineModelAnalytic(26.0, 18.0, "zeros", moving))
    model.p = nn.ParameterList(torch.tensor([v]) for v in (0.0, 0.0, 0.0, 1.0, 0.0))
    message = r"5 parameters \(self.p\) but 4 mappings \(self.m\)"
    with pytest.raises(ValueError, match=message):
        model.get(4)
    with pytest.raises(ValueError, match=message):
        model.set_parameter(4, 0.5)
    with pytest.raises(ValueError, match=message):
        model.state_dict()
    with pytest.raises(ValueError, match=message):
        model(moving) if gradients == "autograd" else model(moving, fixed)
    assert "5 parameters, 4 mappings" in repr(model)


@pytest.mark.parametrize("count", [3, 5])
@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_a_parameter_count_the_base_matrix_does_not_take_says_override_get_matrix(images, gradients, count):
    """A subclass that replaced self.p with three parameters and kept the base get_matrix() failed in
    index_select ("INDICES element is out of DATA bounds"); with five the fifth was silently ignored."""
    from torch import nn

    fixed, moving = (image.float() for image in images)
    model = (tireg.AffineModel(26.0, 18.0, "zeros") if gradients == "autograd"
             else tireg.AffineModelAnalytic(26.0, 18.0, "zeros", moving))
    model.p = nn.ParameterList(torch.tensor([0.0]) for _ in range(count))
    model.m = [IdentityMapping() for _ in model.p]
    message = (rf"has {count} parameters \(self.p\), but its matrix is the base class's get_matrix\(\): the "
               r"'similarity' transform of 4 parameters, in the order \(angle, tx, ty, scale\)\. Override get_matrix")
    with pytest.raises(ValueError, match=message):
        model(moving) if gradients == "autograd" else model(moving, fixed)
    with pytest.raises(ValueError, match=message):
        model.get_matrix()


def _shear_matrix(shear, dx, dy):
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    rows = [torch.stack([one, shear, dx], -1), torch.stack([zero, one, dy], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


class _Shear(tireg.AffineModelAnalytic):
    """A user's own model (shear, dx, dy) whose get_derva(1) is twice what it should be."""

    def __init__(self, moving):
        super().__init__(0.0, 0.0, "zeros", moving)
        self.p = torch.nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in (0.05, 0.3, -0.2))
        self.m = [IdentityMapping() for _ in self.p]

    def get_matrix(self):
        return _shear_matrix(self.get(0), self.get(1), self.get(2))

    def get_derva(self, idx):
        unit = torch.zeros(3, 3, dtype=torch.float64)
        unit[[0, 0, 1][idx], [1, 2, 2][idx]] = 2.0 if idx == 1 else 1.0
        return unit


def test_a_get_derva_that_is_not_the_matrixs_derivative_is_found_when_it_counts(images):
    """get_derva is checked against autograd's derivative of get_matrix at the first forward and again
    when the parameters or mappings change: a frozen parameter's derivative is not used (and not
    checked) until it requires grad again; a new parameter list or mapping is checked anew."""
    fixed, moving = images
    model = _Shear(moving)
    model.p[1].requires_grad_(False)
    model(moving, fixed)  # the wrong derivative goes into no gradient
    assert model.p[1].grad is None and model.p[0].grad is not None
    model.p[1].requires_grad_(True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"get_derva\(1\) is not the derivative"):
        model(moving, fixed)  # a validation step first: checked all the same (it had raised torch's error)
    with pytest.raises(ValueError, match=r"get_derva\(1\) is not the derivative of get_matrix\(\) with respect to "
                                         r"parameter 1: autograd's differs from it by 50.0% .*Check get_derva\(1\)"):
        model(moving, fixed)
    model.p[1].requires_grad_(False)
    model(moving, fixed)
    model.p = torch.nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in (0.05, 0.3, -0.2))  # a new list
    with pytest.raises(ValueError, match=r"get_derva\(1\) is not the derivative"):
        model(moving, fixed)

    class Right(_Shear):
        def get_derva(self, idx):
            return super().get_derva(idx) / (2.0 if idx == 1 else 1.0)

    model = Right(moving)
    model(moving, fixed)
    model.set_parameter(1, 0.1, SigmoidMapping(-0.5, 0.5))  # a new mapping: checked again, still right
    model(moving, fixed)
    assert model.p[1].grad is not None


class _Cube(Mapping):
    """``p = r^3``; ``derivative`` ``3 r^2``, or ``r^2`` (wrong) with ``wrong``."""

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    def forward(self, raw):
        return raw**3

    def derivative(self, raw):
        return raw**2 * (1.0 if self.wrong else 3.0)

    def solve(self, value):
        value = torch.as_tensor(value, dtype=torch.float64)
        return value.sign() * value.abs() ** (1 / 3)


def test_a_mapping_whose_derivative_is_not_its_forwards_is_named_at_the_first_forward(images):
    """The analytic gradient is dL/dp * m'(r): a mapping of one's own whose derivative() was not its
    forward()'s gave a ready-made model a wrong gradient without a word (a rigid shift's 10.2 for
    autograd's 30.5), and a seed-style subclass an error that blamed its right get_derva.  Checked
    like get_derva, naming the mapping; a right one gives autograd's gradient, and a subclass of a
    built-in mapping that changes its forward only is checked too."""
    fixed, moving = images

    class RightShear(_Shear):  # its get_derva right
        def get_derva(self, idx):
            return super().get_derva(idx) / (2.0 if idx == 1 else 1.0)

    RightShear(moving)(moving, fixed)
    for model in (tireg.create_model("rigid", moving, compile=False), RightShear(moving)):
        model.set_parameter(1, 0.7, _Cube(wrong=True))
        with pytest.raises(ValueError, match=r"_Cube.derivative\(\) of parameter 1 is not the derivative of its "
                                             r"forward\(\): a central difference of forward\(\) differs from it by 66.7%"):
            model(moving, fixed)

    class Halved(IdentityMapping):
        def forward(self, raw):
            return raw / 2

        def solve(self, value):
            return torch.as_tensor(2.0 * value, dtype=torch.float64)

    model = tireg.create_model("rigid", moving, compile=False)
    model.set_parameter(2, -0.4, Halved())
    with pytest.raises(ValueError, match=r"Halved.derivative\(\) of parameter 2 .* by 50.0%"):
        model(moving, fixed)
    analytic = tireg.create_model("rigid", moving, compile=False)
    automatic = tireg.create_model("rigid", moving, gradients="autograd")
    for each in (analytic, automatic):
        each.set_parameter(0, 0.03)
        each.set_parameter(1, 0.7, _Cube())
        each.set_parameter(2, -0.4)
    analytic(moving, fixed)
    ((automatic(moving) - fixed) ** 2).sum().backward()
    for mine, theirs in zip(analytic.p, automatic.p):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-9)


def test_a_parameter_the_matrix_does_not_use_gets_no_gradient_as_with_backward(images):
    """An extra parameter that get_matrix() does not use (get_derva(i) zero): backward() leaves its
    .grad None, so optimisers skip it; the analytic model wrote a zero .grad, and AdamW's weight decay
    moved it (0.5 to 0.476 in 50 steps) where the autograd model's stayed."""
    fixed, moving = images

    class Extra(_Shear):
        def __init__(self, moving):
            super().__init__(moving)
            self.p.append(torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64)))
            self.m.append(IdentityMapping())

        def get_derva(self, idx):
            if idx == 3:
                return torch.zeros(3, 3, dtype=torch.float64)
            return super().get_derva(idx) / (2.0 if idx == 1 else 1.0)

    class ExtraAutograd(tireg.AffineModel):
        def __init__(self):
            super().__init__(0.0, 0.0, "zeros")
            self.p = torch.nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in (0.05, 0.3, -0.2, 0.5))
            self.m = [IdentityMapping() for _ in self.p]

        get_matrix = _Shear.get_matrix

    analytic, autograd = Extra(moving), ExtraAutograd()
    optimizers = [torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1) for model in (analytic, autograd)]
    for _ in range(3):
        analytic(moving, fixed)
        tireg.L2Loss()(autograd(moving), fixed).sum().backward()
        assert analytic.p[3].grad is None and autograd.p[3].grad is None
        for mine, theirs in zip(analytic.p[:3], autograd.p[:3]):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert analytic.p[3].item() == autograd.p[3].item() == 0.5


# -- the get_derva check: tied parameters, a second point, a matrix built with numbers, an own get() ------------


def _affy_arguments(model, scale_x=3, scale_y=3):
    return model.get(0), model.get(scale_x), model.get(scale_y), model.get(1), model.get(2), model.cx, model.cy


class _SeedStyleAnalytic(tireg.AffineModelAnalytic):
    """The seed's MyModelAnalytic: the base matrix (angle, dx, dy, scale), its own get_derva, float64."""

    def __init__(self, moving):
        super().__init__(13.0, 9.0, "zeros", moving)
        self.p = torch.nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in (0.0, 0.0, 0.0, 1.0))
        self.m = [IdentityMapping() for _ in self.p]

    def get_derva(self, idx):
        from tireg.compat import Affy

        if idx == 3:
            return Affy.ds(self.get(0), self.get(3), self.get(1), self.get(2), self.cx, self.cy)
        return (Affy.da, Affy.dx, Affy.dy)[idx](*_affy_arguments(self))


def test_one_parameter_in_two_slots_is_checked_by_the_sum_of_its_slots_derivatives(images):
    """scale x and scale y tied (one nn.Parameter in slots 1 and 2), get_matrix and get_derva both right:
    autograd's derivative is the parameter's whole, which the check compared with one slot's and
    refused ("get_derva(1) is not the derivative ... 72.3%"); the step's .grad, both slots' sum, was right."""
    from torch import nn
    from tireg.compat import Affy

    fixed, moving = images

    def tied(model):
        scale = nn.Parameter(torch.tensor([1.02], dtype=torch.float64))
        model.p = nn.ParameterList([nn.Parameter(torch.tensor([0.05], dtype=torch.float64)), scale, scale,
                                    nn.Parameter(torch.tensor([1.0], dtype=torch.float64)),
                                    nn.Parameter(torch.tensor([-2.0], dtype=torch.float64))])
        model.m = [IdentityMapping() for _ in model.p]
        return model

    def matrix(model):
        return Affy.get_matrix(model.get(0), model.get(1), model.get(2), model.get(3), model.get(4), 13.0, 9.0)

    class Tied(tireg.AffineModelAnalytic):
        get_matrix = matrix

        def get_derva(self, i):
            return [Affy.da, Affy.dsx, Affy.dsy, Affy.dx, Affy.dy][i](
                self.get(0), self.get(1), self.get(2), self.get(3), self.get(4), 13.0, 9.0)

    class TiedAutograd(tireg.AffineModel):
        get_matrix = matrix

    analytic = tied(Tied(13.0, 9.0, "zeros", moving))
    autograd = tied(TiedAutograd(13.0, 9.0, "zeros"))
    analytic(moving, fixed)
    tireg.L2Loss()(autograd(moving), fixed).sum().backward()
    assert len(list(analytic.parameters())) == 4
    for mine, theirs in zip(analytic.parameters(), autograd.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)

    class HalfWrong(Tied):  # one slot's derivative wrong: the sum is, and is named by both slots
        def get_derva(self, i):
            return super().get_derva(i) * (0.0 if i == 2 else 1.0)

    with pytest.raises(ValueError, match=r"get_derva\(1\) \+ get_derva\(2\) is not the derivative of get_matrix\(\) "
                                         r"with respect to the parameter in slots 1, 2 of self.p"):
        tied(HalfWrong(13.0, 9.0, "zeros", moving))(moving, fixed)


def test_a_get_derva_right_only_at_the_identity_start_is_refused_at_the_first_forward(images):
    """The check ran once, at the first forward, usually the identity start (angle 0, scale 1): a
    dA/d angle without the scale passed there and gave the angle a gradient 0.417 for 0.625 once the
    scale was 1.5. It is also checked at raw values a few tenths away, on temporaries: the
    parameters, their .grad and an optimiser's state are as they were."""
    from tireg.compat import Affy

    fixed, moving = images

    class ForgotScale(_SeedStyleAnalytic):
        def get_derva(self, idx):
            if idx == 0:
                one = torch.ones_like(self.get(3))
                return Affy.da(self.get(0), one, one, self.get(1), self.get(2), self.cx, self.cy)
            return super().get_derva(idx)

    model = ForgotScale(moving)
    with pytest.raises(ValueError, match=r"get_derva\(0\) is not the derivative of get_matrix\(\) with respect to "
                                         r"parameter 0: autograd's differs from it by .* at raw values a few tenths "
                                         r"from the current ones \(it agrees at the current values"):
        model(moving, fixed)

    right = _SeedStyleAnalytic(moving)
    optimizer = torch.optim.Adam(right.parameters(), lr=0.01)
    right(moving, fixed)
    optimizer.step()
    raw = [param.detach().clone() for param in right.p]
    gradients = [param.grad.clone() for param in right.p]
    state = {key: value.clone() for key, value in optimizer.state[right.p[0]].items()}
    right._jacobian_checked = (None, None, frozenset())
    right._check_own_jacobian("check")
    assert all(torch.equal(param, value) for param, value in zip(right.p, raw))
    assert all(torch.equal(param.grad, value) for param, value in zip(right.p, gradients))
    assert all(torch.equal(optimizer.state[right.p[0]][key], value) for key, value in state.items())
    assert [param.requires_grad and param.is_leaf for param in right.p] == [True] * 4
    assert list(right.p._parameters.values()) == list(right.p)


def test_a_matrix_built_partly_from_python_numbers_is_checked_by_a_finite_difference(images):
    """get_matrix() may use a Python number (s = float(self.get(3))): autograd has no path to that
    parameter, and the check refused an exact get_derva ("get_matrix() does not depend on parameter 3");
    the analytic path never needs a differentiable matrix. A float64 central difference checks it."""
    from tireg.compat import Affy

    fixed, moving = images

    class NumberScale(_SeedStyleAnalytic):
        def get_matrix(self):
            scale = float(self.get(3))
            return Affy.get_matrix(self.get(0), scale, scale, self.get(1), self.get(2), self.cx, self.cy)

    class NumberScaleWrong(NumberScale):
        def get_derva(self, idx):
            return super().get_derva(idx) * (1.5 if idx == 3 else 1.0)

    model, reference = NumberScale(moving), _SeedStyleAnalytic(moving)
    for each in (model, reference):
        each.set_parameter(0, 0.1)
        each.set_parameter(3, 1.2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True to a scalar")
        model(moving, fixed)
        reference(moving, fixed)
        assert model._jacobian_checked[2] == frozenset()  # not taken for unused
        for mine, theirs in zip(model.p, reference.p):
            assert torch.equal(mine.grad, theirs.grad)
        with pytest.raises(ValueError, match=r"get_derva\(3\) is not the derivative of get_matrix\(\) with respect to "
                                             r"parameter 3: a float64 finite difference of get_matrix\(\)'s differs "
                                             r"from it by 33.3%"):
            NumberScaleWrong(moving)(moving, fixed)


@pytest.mark.parametrize("gradients", ["autograd", "analytic"])
def test_an_own_get_may_serve_the_base_matrix_from_more_parameters(images, gradients):
    """A subclass whose get(3) is p3 * p4 (five raw parameters, the base matrix's four values) worked
    on both paths, p4's gradient by autograd through get(); the parameter-count check refused it."""
    from torch import nn

    fixed, moving = images

    class TwoPartScale:
        def __init__(self, *arguments):
            super().__init__(*arguments)
            self.p = nn.ParameterList(torch.tensor([v], dtype=torch.float64) for v in (0.02, 1.0, -0.5, 1.1, 0.95))
            self.m = [IdentityMapping() for _ in self.p]

        def get(self, i):
            return self.p[3] * self.p[4] if i == 3 else super().get(i)

    class Autograd(TwoPartScale, tireg.AffineModel):
        pass

    class Analytic(TwoPartScale, tireg.AffineModelAnalytic):
        pass

    reference = Autograd(13.0, 9.0, "zeros")
    tireg.L2Loss()(reference(moving), fixed).sum().backward()
    if gradients == "autograd":
        model = reference
    else:
        model = Analytic(13.0, 9.0, "zeros", moving)
        model(moving, fixed)
    assert model.p[4].grad is not None and model.p[4].grad.item() != 0.0
    for mine, theirs in zip(model.p, reference.p):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
