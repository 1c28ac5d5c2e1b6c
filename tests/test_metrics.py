"""Metrics for changed contrast and other modalities: exact analytic gradients, and register() with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import grid_error, registration_pair

import tireg
from tireg.metrics import (
    NCC,
    LocalNCC,
    MutualInformation,
    NCCStatistics,
    NormalizedMutualInformation,
    PerPixelMetric,
    get_metric,
)
from tireg.transforms import TRANSFORMS

SHAPE = (3, 2, 37, 53)  # batched, multi-channel, non-square

ALL = {
    "ncc": lambda: NCC(),
    "ncc_any": lambda: NCC("any"),
    "lncc": lambda: LocalNCC(3),
    "lncc_any": lambda: LocalNCC(2, "any"),
    "mi": lambda: MutualInformation(16),
    "nmi": lambda: NormalizedMutualInformation(16),
    "cauchy": lambda: PerPixelMetric("cauchy"),
}


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(21)
    fixed = torch.rand(*SHAPE, generator=generator, dtype=torch.float64)
    moving = 0.5 * torch.rand(*SHAPE, generator=generator, dtype=torch.float64) + 0.5 * fixed.flip(-1)
    weight = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=generator, dtype=torch.float64) > 0.2).double()
    return fixed, moving, weight


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("weighted", [False, True])
def test_metric_derivative_equals_autograd(images, name, weighted):
    fixed, moving, weight = images
    metric = ALL[name]()
    weight = weight if weighted else None
    cost, derivative = metric(moving, fixed, weight, gradient=True)
    warped = moving.clone().requires_grad_(True)
    reference = metric(warped, fixed, weight)
    (expected,) = torch.autograd.grad(reference.sum(), warped)
    assert cost.shape == (SHAPE[0],) and torch.allclose(cost, reference.detach())
    assert expected.abs().max() > 0
    assert (derivative - expected).abs().max() <= 1e-12 * expected.abs().max()


@pytest.mark.parametrize("name", ["ncc", "ncc_any", "lncc", "mi", "nmi"])
@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_analytic_model_with_metric_equals_autograd(images, name, transform, device):
    fixed, moving, _ = (image.to(device) for image in images)
    generator = torch.Generator().manual_seed(4)
    kind = TRANSFORMS[transform]
    values = torch.tensor(kind.identity, dtype=torch.float64) + torch.tensor(
        [0.08 if n == "angle" else 1.5 if n in ("tx", "ty") else 0.04 for n in kind.parameter_names],
        dtype=torch.float64,
    ) * torch.randn(SHAPE[0], kind.num_parameters, generator=generator, dtype=torch.float64)
    metric = ALL[name]()
    autograd = tireg.create_model(transform, moving, gradients="autograd", padding_mode="border")
    analytic = tireg.create_model(transform, moving, gradients="analytic", padding_mode="border", metric=metric)
    for i in range(kind.num_parameters):
        for model in (autograd, analytic):
            bounds = (float(values[:, i].min()) - 1.0, float(values[:, i].max()) + 2.0)
            model.set_parameter(i, values[:, i], tireg.SigmoidMapping(*bounds))
    if name in ("mi", "nmi"):  # the whole images' ranges, which the analytic model would set too
        metric.set_ranges(moving, fixed)
    total = metric(autograd(moving), fixed).sum()
    total.backward()
    warped, analytic_total = analytic(moving, fixed)
    expected = torch.stack([p.grad for p in autograd.p], -1)
    found = torch.stack([p.grad for p in analytic.p], -1)
    assert torch.allclose(analytic_total, total.detach())
    assert (found - expected).abs().max() <= 1e-11 * expected.abs().max()  # exact: MI once 2.6e-7 (log clamped at 1e-12)


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_per_pixel_metric_is_the_weighted_sum_or_mean_of_its_loss(images, mean, weighted):
    """cost = sum_c sum_x w rho(x - y), divided by C sum w with ``mean``; the derivative w rho' / that;
    and weighted() with term_weights()' s (register's Gauss-Newton path) gives the same."""
    fixed, moving, weight = images
    weight = weight if weighted else None
    metric = PerPixelMetric("cauchy", mean=mean)
    rho, rho_prime = tireg.CauchyLoss()(moving, fixed, True)
    w = torch.ones_like(fixed[:, :1]) if weight is None else weight
    divisor = (w.sum(dim=(1, 2, 3)) * fixed.shape[1])[:, None, None, None] if mean else 1.0
    expected_cost = (w * rho / divisor).sum(dim=(1, 2, 3))
    expected_derivative = (w * rho_prime / divisor).expand_as(moving)
    for cost, derivative in (metric(moving, fixed, weight, gradient=True),
                             metric.weighted(moving, fixed, metric.term_weights(fixed, weight), gradient=True),
                             metric.weighted(moving, fixed, metric.term_weights(
                                 fixed, weight, weight_sum=None if weight is None else weight.sum(dim=(1, 2, 3))),
                                 gradient=True)):
        torch.testing.assert_close(cost, expected_cost, rtol=1e-12, atol=0)
        torch.testing.assert_close(derivative, expected_derivative, rtol=1e-12, atol=0)


def test_ncc_is_invariant_to_gain_and_offset(images):
    fixed, moving, weight = images
    assert torch.allclose(NCC()(3.0 * moving + 2.0, fixed, weight), NCC()(moving, fixed, weight))
    assert torch.allclose(NCC()(fixed, fixed), torch.zeros(SHAPE[0], dtype=torch.float64), atol=1e-12)
    # the sign: 'positive' rejects inverted contrast, 'any' accepts it
    assert torch.allclose(NCC()(-fixed, fixed), torch.full((SHAPE[0],), 2.0, dtype=torch.float64))
    assert torch.allclose(NCC("any")(-fixed, fixed), torch.zeros(SHAPE[0], dtype=torch.float64), atol=1e-12)


def test_mutual_information_is_highest_for_a_deterministic_relation(images):
    fixed, _, _ = images
    remapped = torch.cos(4 * fixed)  # a non-monotonic intensity map
    noise = torch.rand(fixed.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for metric in (MutualInformation(), NormalizedMutualInformation()):
        assert bool((metric(remapped, fixed) < metric(noise, fixed)).all())


def test_degenerate_inputs_give_finite_costs():
    flat = torch.ones(2, 1, 20, 30, dtype=torch.float64)
    image = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    nothing = torch.zeros(2, 1, 20, 30, dtype=torch.float64)
    for metric in ALL.values():
        for x, y, weight in ((flat, image, None), (image, flat, None), (image, image, nothing)):
            cost, derivative = metric()(x, y, weight, gradient=True)
            assert bool(torch.isfinite(cost).all()) and bool(torch.isfinite(derivative).all()), metric()


def test_get_metric_names():
    assert isinstance(get_metric("mi"), MutualInformation)
    assert get_metric("ncc_any").sign == "any"
    assert isinstance(get_metric("huber"), PerPixelMetric)
    assert isinstance(get_metric(tireg.CauchyLoss()), PerPixelMetric)
    with pytest.raises(ValueError, match="unknown metric 'ssd'"):
        get_metric("ssd")
    with pytest.raises(ValueError, match="bins"):
        MutualInformation(bins=4)
    with pytest.raises(ValueError, match="radius"):
        LocalNCC(radius=0)
    # radius 2.9 was cut to 2 and "2" taken; eps -1 or NaN ended a registration 'not_finite'
    for radius in (2.9, "2"):
        with pytest.raises(ValueError, match=rf"^LocalNCC\(\): 'radius' must be a whole number of at least 1; "
                                             rf"got {radius!r}$"):
            LocalNCC(radius=radius)
    with pytest.raises(ValueError, match=r"^LocalNCC\(\): 'eps' must be above 0; got -1$"):
        LocalNCC(eps=-1)
    with pytest.raises(ValueError, match=r"^LocalNCC\(\): 'eps' must be finite; got nan$"):
        LocalNCC(eps=float("nan"))
    with pytest.raises(TypeError, match=r"^LocalNCC\(\): 'eps' must be a number; got 'a'$"):
        LocalNCC(eps="a")
    assert LocalNCC(radius=3.0).radius == 3
    with pytest.raises(ValueError, match="sign"):
        NCC(sign="negative")


def test_the_histogram_taps_are_the_cubic_bspline_and_its_derivative():
    """The Parzen window's four taps in closed form (one pass each, not beta3 piece by piece) are
    beta3(f + 1 - l), they sum to one, and their slopes are their derivatives."""
    from tireg.metrics import _cubic_bspline_tap_slopes, _cubic_bspline_taps

    def beta3(u):  # the textbook pieces
        a = u.abs()
        return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, 0.0))

    f = torch.cat([torch.linspace(0.0, 1.0, 101, dtype=torch.float64), torch.tensor([1e-9, 1 - 1e-9])])
    taps = torch.stack(list(_cubic_bspline_taps(f)))  # (4, N): made tap by tap
    expected = torch.stack([beta3(f + 1 - tap) for tap in range(4)])
    torch.testing.assert_close(taps, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(taps.sum(0), torch.ones_like(f), rtol=0, atol=1e-15)
    point = f.clone().requires_grad_(True)
    slopes = torch.stack([torch.autograd.grad(list(_cubic_bspline_taps(point))[tap].sum(), point)[0]
                          for tap in range(4)])
    torch.testing.assert_close(torch.stack(list(_cubic_bspline_tap_slopes(f))), slopes, rtol=0, atol=1e-15)


# -- register() across contrasts ----------------------------------------------------


@pytest.mark.parametrize("metric", ["ncc_any", "mi", "nmi"])
def test_register_inverted_contrast(metric):
    fixed, moving, truth = registration_pair("astronaut", "rigid", [0.25, 12.0, -8.0], noise=0.02)
    result = tireg.register(fixed, 1.0 - moving, transform="rigid", metric=metric)
    assert grid_error(result.matrix, truth, fixed.shape) < 0.5, result.summary()


def test_the_contrast_whose_quick_start_scores_higher_searches_first(monkeypatch):
    """A metric that accepts inverted contrast starts from what the initialiser finds on the moving image
    and on the inverted one.  Both contrasts' quick candidates come first; the contrast whose start scores
    higher searches first where that start scores below AUTO_THRESHOLD, the other only where the first
    still does.  The image's own contrast had searched first whatever matched: an inverted pair searched
    for nothing there, the stretched affine stages included (0.14 s of a 0.3 s ncc_any call at 256^2).
    Each pair of a batch gets the result it has alone."""
    import tireg.initialize as init_module

    searched, contrast, chunks = [], [], []
    initialize, search = init_module._initialize, init_module._search

    def recording_initialize(*args, **kwargs):
        contrast[:] = [kwargs.get("negate_moving", args[7] if len(args) > 7 else False)]
        chunks.append(kwargs.get("start") is not None)
        return initialize(*args, **kwargs)

    def recording_search(images, *args, **kwargs):
        searched.append(("inverted" if contrast[0] else "own", images.fixed.shape[0]))
        return search(images, *args, **kwargs)

    monkeypatch.setattr(init_module, "_initialize", recording_initialize)
    monkeypatch.setattr(init_module, "_search", recording_search)
    quick = []
    fourier_mellin = init_module._fourier_mellin
    monkeypatch.setattr(init_module, "_fourier_mellin",
                        lambda fixed, *args: quick.append(fixed.shape[0]) or fourier_mellin(fixed, *args))
    # an aspect change that no quick candidate finds (0.72 in the matching contrast, 0.27 in the other)
    linear = tireg.transforms.rotation(torch.tensor(0.35, dtype=torch.float64)) @ torch.diag(
        torch.tensor([1.25, 0.85], dtype=torch.float64))
    params = torch.cat([linear.reshape(-1), torch.tensor([6.0, -4.0], dtype=torch.float64)])
    fixed, moving, truth = registration_pair("camera", "affine", params, noise=0.02)
    assert torch.allclose(truth[:2, :2], linear)
    fixed, moving = fixed[None, None], moving[None, None]
    both = torch.cat([moving, 1.0 - moving])  # the same contrast, then inverted
    pair = torch.cat([fixed, fixed])
    quick = [init_module._scored_initialize(pair, sign * both, "affine", search=torch.zeros(2, dtype=torch.bool))[1]
             for sign in (1.0, -1.0)]
    assert bool((quick[0][0] > quick[1][0]) & (quick[1][1] > quick[0][1])), quick
    assert bool((torch.stack(quick) < init_module.AUTO_THRESHOLD).all()), quick
    searched.clear()
    quick.clear()
    chunks.clear()
    batch = tireg.register(pair, both, transform="affine", metric="ncc_any")
    # each pair searched once, in its matching contrast, which found a start that scores high; the quick
    # candidates were found once in each contrast, not again for the search
    assert searched == [("own", 1), ("inverted", 1)], searched
    assert sum(quick) == 4  # 2 pairs in 2 contrasts
    # the pairs go in a chunk each: a search prepares only the chunk with a pair to search
    assert chunks == [False, False, False, False, True, True], chunks
    for index in range(2):
        assert grid_error(batch.matrix[index], truth, fixed.shape[-2:]) < 0.05, batch.summary()
        alone = tireg.register(fixed[0, 0], both[index, 0], transform="affine", metric="ncc_any")
        assert torch.equal(batch.matrix[index], alone.matrix)
    # a translation has no search: each contrast is started once
    starts = []
    monkeypatch.setattr(init_module, "_initialize", lambda *args, **kwargs: starts.append(1) or initialize(*args, **kwargs))
    tireg.register(pair[:1], torch.rand(1, 1, *pair.shape[-2:], generator=torch.Generator().manual_seed(0)),
                   transform="translation", metric="ncc_any")
    assert len(starts) == 2


@pytest.mark.parametrize("metric", ["ncc", "lncc", "mi", "nmi"])
def test_register_gamma_changed(metric):
    fixed, moving, truth = registration_pair("camera", "similarity", [-0.2, 1.06, 9.0, 6.0], noise=0.02)
    result = tireg.register(fixed, moving.clamp_min(0) ** 2.5, transform="similarity", metric=metric)
    assert grid_error(result.matrix, truth, fixed.shape) < 0.5, result.summary()


@pytest.mark.parametrize("metric", ["mi", "nmi"])
def test_register_two_stain_channels_of_a_histology_image(metric):
    """Immunohistochemistry: red channel as fixed, blue channel of the transformed image as moving."""
    from tireg.data import immunohistochemistry

    rgb = immunohistochemistry(dtype=torch.float64)
    margin = 20
    height, width = rgb.shape[-2] - 2 * margin, rgb.shape[-1] - 2 * margin
    truth = TRANSFORMS["rigid"].matrix(torch.tensor([0.2, 10.0, -7.0], dtype=torch.float64),
                                       tireg.image_center(height, width))
    to_scene = TRANSFORMS["translation"].matrix(torch.tensor([float(margin), float(margin)], dtype=torch.float64))
    fixed = tireg.warp(rgb[None, :1], to_scene, size=(height, width))[0, 0]
    moving = tireg.warp(rgb[None, 2:], to_scene @ torch.linalg.inv(truth), size=(height, width),
                        padding_mode="border")[0, 0]
    assert torch.corrcoef(torch.stack([fixed.flatten(), tireg.warp(
        moving[None, None], truth, padding_mode="border")[0, 0].flatten()]))[0, 1] < 0.9  # really another channel
    result = tireg.register(fixed.float(), moving.float(), transform="rigid", metric=metric)
    assert grid_error(result.matrix, truth, (height, width)) < 0.5, result.summary()


def test_register_reports_no_overlap_as_a_status():
    fixed, moving, _ = registration_pair("astronaut", "rigid", [0.25, 12.0, -8.0])
    far = torch.tensor([[1.0, 0.0, 1000.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for metric in ("l2", "ncc", "mi"):
        result = tireg.register(fixed, moving, transform="rigid", metric=metric, init=far)
        assert result.stop_reason == ["no_overlap"] and not bool(result.converged[0])
        assert not math.isnan(float(result.cost[0]))
        assert not bool(torch.isnan(result.matrix).any())


def test_register_metric_with_batch_and_masks():
    pairs = [registration_pair("camera", "rigid", p, margin=48, noise=0.02, seed=i)
             for i, p in enumerate([[0.1, 4.0, -3.0], [-0.15, -6.0, 2.0]])]
    fixed = torch.stack([p[0] for p in pairs])[:, None]
    moving = 1.0 - torch.stack([p[1] for p in pairs])[:, None]
    mask = torch.ones_like(fixed, dtype=torch.bool)
    mask[..., :20, :] = False
    result = tireg.register(fixed, moving, transform="rigid", metric="mi", mask=mask)
    for index, (_, _, truth) in enumerate(pairs):
        assert grid_error(result.matrix[index], truth, fixed.shape[-2:]) < 0.5
    for index in range(1):  # the same pair alone gives the same answer
        single = tireg.register(fixed[index], moving[index], transform="rigid", metric="mi", mask=mask[index])
        assert grid_error(single.matrix, result.matrix[index], fixed.shape[-2:]) < 0.01


def test_metric_registration_is_deterministic():
    fixed, moving, _ = registration_pair("coins", "similarity", [0.1, 1.05, 5.0, -4.0], noise=0.02)
    first = tireg.register(fixed, moving, transform="similarity", metric="mi")
    second = tireg.register(fixed, moving, transform="similarity", metric="mi")
    assert torch.equal(first.matrix, second.matrix)


@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
@pytest.mark.parametrize("budget, products", [(None, 3), (16 * 700, 18), (16 * 4000, 3), (16 * 40, 300)])
def test_histogram_paths_agree(monkeypatch, images, cls, budget, products):
    """The GPU's one-hot matrix product and the CPU's scatter-add build the same joint histogram,
    cost, derivative and autograd gradient, in ``products`` one-hot matrix products of at most the
    budget's values a matrix (16 bins: the default 2^16, and 16 x 4000, take two whole pairs of
    37 x 53 at a time; 16 x 700 three slices a pair, the last shorter; 16 x 40 fifty).  Kept whole,
    the fixed one-hot matrix alone was ``bins`` values a pixel (``register`` at 74x its input images)."""
    if budget is not None:
        monkeypatch.setattr(tireg._chunks, "EAGER_CHUNK_PIXELS", budget)
    fixed, moving, weight = images
    made = []
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *size, **options: made.append(math.prod(
        size[0] if len(size) == 1 and not isinstance(size[0], int) else size)) or zeros(*size, **options))
    product = cls(16, use_matmul=True)(moving, fixed, weight, gradient=True)
    assert len(made) == products and max(made) <= (budget or tireg._chunks.EAGER_CHUNK_PIXELS)
    scatter = cls(16, use_matmul=False)(moving, fixed, weight, gradient=True)
    assert torch.allclose(product[0], scatter[0], rtol=1e-12)
    assert torch.allclose(product[1], scatter[1], rtol=1e-10, atol=1e-14)
    gradients = []
    for matmul in (True, False):
        warped = moving.clone().requires_grad_(True)
        cls(16, use_matmul=matmul)(warped, fixed, weight).sum().backward()
        gradients.append(warped.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gradients[0], product[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("matmul", [False, True])
def test_histogram_backward_is_its_own_and_saves_little(matmul):
    """The counts' backward pass gathers the counts' gradient by each pixel's cells (gradcheck in
    float64, past and weights); autograd through the scatter-adds saved 56 bytes a pixel, through
    the one-hot product 432 (its slices' one-hot matrices), now 20."""
    from tireg.metrics import _ParzenCounts

    generator = torch.Generator().manual_seed(3)
    pairs, n, bins = 3, 50, 12
    fixed_bin = torch.randint(0, bins, (pairs, n), generator=generator)
    base = torch.randint(0, bins - 3, (pairs, n), generator=generator)
    past = torch.rand(pairs, n, generator=generator, dtype=torch.float64).requires_grad_()
    weights = (torch.rand(pairs, n, generator=generator, dtype=torch.float64) + 0.1).requires_grad_()
    counts = lambda past, weights: _ParzenCounts.apply(past, weights, fixed_bin * bins + base, fixed_bin, base,  # noqa: E731
                                                       bins, matmul)
    assert torch.autograd.gradcheck(counts, (past, weights))
    saved = {}

    def pack(tensor):
        saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.rand(1, 1, 256, 256, generator=generator).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        cost = MutualInformation(32, use_matmul=matmul)(x, torch.rand(1, 1, 256, 256, generator=generator))
    assert sum(saved.values()) / x.numel() <= 24  # bytes a pixel (the gradient itself: the tests above)
    (gradient,) = torch.autograd.grad(cost.sum(), x)
    assert bool(torch.isfinite(gradient).all()) and gradient.abs().max() > 0


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func over the product's scatter_
@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:DeprecationWarning")  # torch's own hessian
@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
@pytest.mark.parametrize("matmul", [False, True])
def test_histogram_second_derivatives_and_torch_func_go_through(cls, matmul):
    """With a backward pass of its own (once differentiable), the Hessian of mutual information came
    out 0 without an error, and vmap, jacfwd and forward-mode AD refused the histogram: the Hessian
    by reverse over reverse (through that pass) equals torch.func's (through the operations), and
    vmap gives each image's own cost (the one-hot product's in-place scatter_ had refused it with
    torch's "vmap: aten::scatter_(self, *extra_args) is not possible")."""
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 10, 12, generator=generator, dtype=torch.float64)
    y = 0.5 * x + 0.5 * torch.rand(1, 1, 10, 12, generator=generator, dtype=torch.float64)
    metric = cls(12, use_matmul=matmul)
    metric.set_ranges(x, y)
    cost = lambda image: metric(image, y).sum()  # noqa: E731
    hessian = torch.autograd.functional.hessian(cost, x)
    assert hessian.abs().sum() > 1.0
    torch.testing.assert_close(hessian, torch.func.hessian(cost)(x), rtol=1e-9, atol=1e-12)
    images = torch.stack([x[0], 0.9 * x[0]])
    costs = torch.func.vmap(lambda image: metric(image[None], y).sum())(images)
    torch.testing.assert_close(costs, torch.stack([cost(image[None]) for image in images]), rtol=1e-12, atol=0)
    fixed_images = torch.stack([y[0], y[0].flip(-1)])  # the fixed image batched: its one-hot matrix too
    costs = torch.func.vmap(lambda image: metric(x, image[None]).sum())(fixed_images)
    torch.testing.assert_close(costs, torch.stack([metric(x, image[None]).sum() for image in fixed_images]),
                               rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
@pytest.mark.parametrize("budget", [None, 16 * 700])
def test_cuda_histogram_equals_the_cpus_and_repeats_bit_for_bit(monkeypatch, images, cls, budget):
    """A GPU's histogram is the one-hot matrix product (its scatter-add is atomic, in no set
    order), whole pairs or in slices of pixels: the CPU's scatter-add's cost and derivative, and
    the same bits on every call."""
    if budget is not None:
        monkeypatch.setattr(tireg._chunks, "EAGER_CHUNK_PIXELS_ACCELERATOR", budget)
    fixed, moving, weight = images
    cpu = cls(16)(moving, fixed, weight, gradient=True)
    metric = cls(16)
    first, second = (metric(moving.cuda(), fixed.cuda(), weight.cuda(), gradient=True) for _ in range(2))
    assert all(torch.equal(one, other) for one, other in zip(first, second))
    torch.testing.assert_close(first[0].cpu(), cpu[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(first[1].cpu(), cpu[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
@pytest.mark.parametrize("ranges", [False, True])
def test_kept_fixed_bins_follow_the_fixed_image(images, cls, ranges):
    """The fixed image's bins are kept between calls without reading the image back (a GPU would
    wait for that); a change in place, another image or other ranges still count."""
    fixed, moving, _ = images

    def fresh(fixed_image):  # a new metric: nothing kept
        metric = cls(16)
        if ranges:
            metric.set_ranges(moving, fixed_image)
        return metric(moving, fixed_image)

    metric = cls(16)
    if ranges:
        metric.set_ranges(moving, fixed)
    assert torch.equal(metric(moving, fixed), fresh(fixed))
    kept = metric._fixed_cache.bins
    assert torch.equal(metric(moving, fixed), fresh(fixed)) and metric._fixed_cache.bins is kept  # kept, not redone
    changed = fixed.clone()
    if ranges:
        metric.set_ranges(moving, changed)
    metric(moving, changed)
    changed[:, :, :10] = changed[:, :, :10].flip(-1)  # in place: the same object, another version
    expected = fresh(changed)
    assert not torch.equal(expected, fresh(fixed))
    assert torch.equal(metric(moving, changed), expected)
    other = fixed.roll(3, -1)  # another tensor
    if ranges:
        metric.set_ranges(moving, other)
    assert torch.equal(metric(moving, other), fresh(other))
    if ranges:  # the same image under other ranges
        metric.set_ranges(moving, fixed)
        metric(moving, fixed)
        metric.set_ranges(moving, 2.0 * fixed)
        expected = cls(16)
        expected.set_ranges(moving, 2.0 * fixed)
        assert torch.equal(metric(moving, fixed), expected(moving, fixed))
    with torch.inference_mode():  # inference tensors keep no version counter: keyed by contents
        frozen = fixed.clone()
        if ranges:
            metric.set_ranges(moving, frozen)
        metric(moving, frozen)
        frozen[:, :, :10] = frozen[:, :, :10].flip(-1)
        assert torch.equal(metric(moving, frozen), fresh(frozen))


@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
def test_kept_fixed_bins_follow_the_weight_without_ranges(cls):
    """Without set_ranges the fixed range is that of the weighted pixels: a call with another
    weight (a bright band left out) bins the fixed image anew, in either order, as a fresh metric
    does (the bins had been kept from the first call's range: MI -1.01 for -1.99)."""
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 32, 32, dtype=torch.float64, generator=generator)
    moving = torch.sin(3.0 * fixed) + 0.05 * torch.rand(fixed.shape, dtype=torch.float64, generator=generator)
    fixed[..., :4, :] += 5.0
    whole = torch.ones_like(fixed)
    band_out = whole.clone()
    band_out[..., :4, :] = 0.0
    for first, second in ((whole, band_out), (band_out, whole), (None, band_out), (band_out, None)):
        metric = cls(32)
        metric(moving, fixed, first)
        expected = cls(32)(moving, fixed, second, gradient=True)
        assert not torch.allclose(expected[0], cls(32)(moving, fixed, first))  # the weights matter here
        assert all(torch.equal(got, want) for got, want in zip(metric(moving, fixed, second, gradient=True),
                                                                expected))
    metric = cls(32)
    metric(moving, fixed, band_out)
    kept = metric._fixed_cache.bins
    metric(moving, fixed, band_out)
    assert metric._fixed_cache.bins is kept  # the same weight: kept
    band_out[..., 4, :] = 0.0  # changed in place
    assert torch.equal(metric(moving, fixed, band_out), cls(32)(moving, fixed, band_out))


@pytest.mark.parametrize("metric", [NCC(), LocalNCC(), MutualInformation(), NormalizedMutualInformation(),
                                    PerPixelMetric("l2")], ids=lambda metric: type(metric).__name__)
def test_pooling_metrics_name_bad_input(metric):
    """Mismatched shapes, a wrong weight, 2-D or integer images surfaced as reshape, broadcast or
    scatter errors deep inside."""
    name = type(metric).__name__
    generator = torch.Generator().manual_seed(8)
    x = torch.rand(2, 1, 16, 16, generator=generator)
    with pytest.raises(ValueError, match=rf"^{name}\(\): 'x' and 'y' must have the same shape"):
        metric(x, x[:, :, :8])
    with pytest.raises(ValueError, match=rf"^{name}\(\): 'weight' must be \(B, 1, H, W\)"):
        metric(x, x, torch.ones(2, 1, 8, 8))
    floats = "a float" if isinstance(metric, PerPixelMetric) else "a float32 or float64"
    with pytest.raises(ValueError, match=rf"^{name}\(\): 'x' must be {floats} tensor \(B, C, H, W\); got \(16, 16\)"):
        metric(x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match=rf"'y' must be {floats} tensor .* torch.int64"):
        metric(x, (x * 10).long())
    for half in (torch.float16, torch.bfloat16):  # local NCC read 2.83 for 0.83, mutual information NaN
        if isinstance(metric, PerPixelMetric):  # a per-pixel loss keeps its sums (mixed precision)
            torch.testing.assert_close(metric(x.to(half), x.flip(-1).to(half)).float(), metric(x, x.flip(-1)),
                                       rtol=2e-2, atol=1e-3)
            continue
        with pytest.raises(ValueError, match=rf"^{name}\(\): 'x' must be a float32 or float64 tensor .* {half}$"):
            metric(x.to(half), x.to(half))
    with pytest.raises(TypeError, match=rf"^{name}\(\): 'weight' must be a torch.Tensor; got ndarray"):
        metric(x, x, np.ones((2, 1, 16, 16)))
    weight = torch.rand(2, 1, 16, 16, generator=generator) > 0.3  # a bool or float64 mask is taken in x's dtype (MI's scatter refused it)
    torch.testing.assert_close(metric(x, x.flip(-1), weight.double()), metric(x, x.flip(-1), weight.float()))


def test_histogram_bins_are_bounded():
    with pytest.raises(ValueError, match="'bins' must be a whole number from 8 to 1024; got 100000"):
        MutualInformation(bins=10**5)  # its joint histogram would have been 40 GB
    with pytest.raises(ValueError, match="got 31.5"):
        NormalizedMutualInformation(bins=31.5)


@pytest.mark.parametrize("radius", [1, 4, 6])
def test_the_box_sum_is_every_window_summed_and_its_own_adjoint(radius):
    """Local NCC's window sums against a loop over the windows (zeros outside the image, windows
    wider than the image too), and ``<box(a), b> = <a, box(b)>``, which its derivative relies on."""
    from tireg.metrics import _box_sum

    generator = torch.Generator().manual_seed(radius)
    image = torch.randn(2, 3, 9, 11, generator=generator, dtype=torch.float64)
    padded = torch.nn.functional.pad(image, (radius,) * 4)
    expected = torch.zeros_like(image)
    for row in range(image.shape[-2]):
        for column in range(image.shape[-1]):
            expected[..., row, column] = padded[..., row:row + 2 * radius + 1, column:column + 2 * radius + 1].sum((-2, -1))
    torch.testing.assert_close(_box_sum(image, radius), expected, rtol=1e-12, atol=1e-12)
    other = torch.randn(image.shape, generator=generator, dtype=torch.float64)
    torch.testing.assert_close((_box_sum(image, radius) * other).sum(), (image * _box_sum(other, radius)).sum(),
                               rtol=1e-12, atol=1e-12)
    single = image.float()  # float32, as register runs it: the same sums to rounding
    torch.testing.assert_close(_box_sum(single, radius), expected.float(), rtol=1e-5, atol=1e-5)


def test_local_ncc_of_a_flat_patch_is_finite_and_as_in_float64():
    """S_xx - S_x^2 / S_w cancelled to a small negative number in a flat window: the root gave NaN
    (float32 in [0, 1], float64 in 0..255), or a cost of -5.5 at values of 1000."""
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 32, 32, generator=generator, dtype=torch.float64)
    x[..., 8:24, 8:24] = 0.37
    y = torch.rand(1, 1, 32, 32, generator=generator, dtype=torch.float64)
    reference, reference_derivative = LocalNCC()(x, y, gradient=True)
    for gain, offset, dtype in ((1.0, 0.0, torch.float32), (255.0, 0.0, torch.float64), (1.0, 10.0, torch.float32)):
        cost, derivative = LocalNCC()((gain * x + offset).to(dtype), (gain * y + offset).to(dtype), gradient=True)
        assert bool(torch.isfinite(derivative).all()) and 0.0 <= float(cost) <= 2.0
        if (gain, offset) == (1.0, 0.0):  # eps is absolute (the cost varies with the gain), and an offset
            # costs float32 precision in the window sums
            torch.testing.assert_close(cost.double(), reference, rtol=2e-4, atol=0)
            # float32 box sums around a flat window cancel: a few per cent of the largest derivative
            torch.testing.assert_close(derivative.double(), reference_derivative, rtol=0,
                                       atol=0.06 * float(reference_derivative.abs().max()))


@pytest.mark.parametrize("gain", [1e-4, 1e-8, 1e6])
def test_ncc_is_gain_invariant_at_any_scale_and_keeps_its_exact_derivative(images, gain):
    """An absolute 1e-12 under the root scored 0.64 at gain 1e-4 for 0.30 at gain 1, and the
    derivative (with cov / var_x) no longer matched autograd (0.73 relative)."""
    fixed, moving, weight = images
    for metric in (NCC(), NCC("any")):
        cost, derivative = metric(gain * moving, gain * fixed, weight, gradient=True)
        torch.testing.assert_close(cost, metric(moving, fixed, weight), rtol=1e-10, atol=1e-12)
        warped = (gain * moving).requires_grad_(True)
        (expected,) = torch.autograd.grad(metric(warped, gain * fixed, weight).sum(), warped)
        assert (derivative - expected).abs().max() <= 1e-10 * expected.abs().max()
    flat = torch.full_like(fixed, 0.37 * gain)  # a flat side, its centred values rounding noise: ncc 0
    cost, derivative = NCC()(flat, gain * fixed, weight, gradient=True)
    assert torch.equal(cost, torch.ones_like(cost)) and not bool(derivative.any())


def _ncc_system(metric: NCC, x, y, weight, rows):
    """:meth:`NCC.ecc_system` for values whose Jacobian rows are ``rows`` ``(B, C, H, W, K)``."""
    deviations = metric.deviations(x, y, weight)
    flat_rows = rows.flatten(1, -2)  # (B, N, K)
    w, x_deviation, y_deviation = (factor.expand_as(x).flatten(1)
                                   for factor in (deviations.weight, deviations.x, deviations.y))
    second = torch.einsum("bn,bnk,bnl->bkl", w, flat_rows, flat_rows)
    sums = [torch.einsum("bn,bnk->bk", factor, flat_rows) for factor in (w, x_deviation, y_deviation)]
    return deviations.statistics, metric.ecc_system(deviations.statistics, second, *sums)


def _linear_values(images, count: int, seed: int):
    """Warped values linear in ``count`` parameters, ``x(p) = x0 + rows p``: the moving image and its rows."""
    _, moving, _ = images
    rows = torch.randn(*moving.shape, count, generator=torch.Generator().manual_seed(seed), dtype=moving.dtype)
    return rows, lambda p: moving + (rows * p[:, None, None, None, :]).sum(-1)


@pytest.mark.parametrize("sign", ["positive", "any"])
def test_ncc_gauss_newton_in_any_parameters_equals_autograd(images, sign):
    """Values linear in K parameters: the gradient is autograd's of the cost, the matrix
    ``c J^T J`` (``J`` by central differences) of the residual ``sqrt(w) (x^ - t y^)`` whose
    squared norm times ``c / 2`` is the cost (``t = 1``, ``c = 1`` for ``1 - ncc``; ``t = ncc``,
    ``c = 2`` for ``1 - ncc^2``)."""
    fixed, moving, weight = images
    metric = NCC(sign)
    rows, values = _linear_values(images, 3, 3)
    _, system = _ncc_system(metric, moving, fixed, weight, rows)
    gradient, normal = metric.normal_equations(system)
    zero = torch.zeros(moving.shape[0], 3, dtype=moving.dtype)
    (expected,) = torch.autograd.grad(metric(values(zero.requires_grad_(True)), fixed, weight).sum(), zero)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    w = weight.expand_as(moving)

    def residuals(p):
        out = []
        for b in range(moving.shape[0]):
            x, y = values(p)[b], fixed[b]
            x_unit, y_unit = ((v - (w[b] * v).sum() / w[b].sum()) for v in (x, y))
            x_unit, y_unit = (v / (w[b] * v * v).sum().sqrt() for v in (x_unit, y_unit))
            t = 1.0 if sign == "positive" else (w[b] * x_unit * y_unit).sum()
            out.append((w[b].sqrt() * (x_unit - t * y_unit)).flatten())
        return torch.stack(out)

    # by central differences (pairs are independent, each moved by its own parameters): K columns
    step = 1e-5
    steps = step * torch.eye(3, dtype=moving.dtype)
    jacobian = torch.stack([(residuals(zero.detach() + e) - residuals(zero.detach() - e)) / (2 * step)
                            for e in steps], dim=-1)  # (B, N, K)
    expected_normal = jacobian.mT @ jacobian * (1.0 if sign == "positive" else 2.0)
    torch.testing.assert_close(normal, expected_normal, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("sign", ["positive", "any"])
def test_the_ecc_step_maximises_the_correlation_of_values_linear_in_the_parameters(images, sign):
    """For values linear in the parameters the ECC model is no approximation: its correlation
    ``(ncc + template' dp) / sqrt(1 + 2 image' dp + dp' H dp)`` is ``ncc(x0 + rows dp)``, and ECC's
    step (``H dp = -gradient``) is where that is largest (``any``: its magnitude), 1 in one step where
    the values can reach the target."""
    fixed, moving, weight = images
    metric = NCC(sign)
    target = 0.6 * moving + 0.4 * fixed  # correlated with the values, negatively for "any"
    target = -target if sign == "any" else target
    rows, values = _linear_values(images, 4, 5)
    # the first row leads to the target (its negative for "any") at dp_0 = 1: |ncc| = 1 can be reached
    rows[..., 0] = (target if sign == "positive" else -target) - moving
    _, system = _ncc_system(metric, moving, target, weight, rows)
    assert bool((system.ncc > 0.2).all()) if sign == "positive" else bool((system.ncc < -0.2).all())
    ncc_of = lambda p: 1.0 - metric(values(p), target, weight) if sign == "positive" else (  # noqa: E731
        (1.0 - metric(values(p), target, weight)).sqrt())  # |ncc|
    generator = torch.Generator().manual_seed(6)
    for _ in range(3):
        dp = 0.3 * torch.randn(moving.shape[0], 4, generator=generator, dtype=moving.dtype)
        numerator = system.ncc.abs() + (system.template * dp).sum(1) * system.ncc.sign()
        square = 1.0 + 2.0 * (system.image * dp).sum(1) + torch.einsum("bk,bkl,bl->b", dp, system.centred, dp)
        torch.testing.assert_close(numerator / square.sqrt(), ncc_of(dp), rtol=1e-10, atol=1e-12)
    gradient, ok = metric.ecc_gradient(system, system.centred)
    assert bool(ok.all())
    step = torch.linalg.solve(system.centred, -gradient)
    best = ncc_of(step)
    torch.testing.assert_close(best, torch.ones_like(best), rtol=0, atol=1e-9)
    at_step = step.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(ncc_of(at_step).sum(), at_step)
    assert float(slope.abs().max()) < 1e-8
    for _ in range(5):
        nearby = step + 0.05 * torch.randn(step.shape, generator=generator, dtype=step.dtype)
        assert bool((ncc_of(nearby) < best).all())


@pytest.mark.parametrize("sign", ["positive", "any"])
def test_ncc_steps_of_a_flat_pair_are_none(images, sign):
    """A flat warped image (or fixed one) has no correlation to improve: the system is zeros,
    Gauss-Newton's gradient and matrix too, and ECC's step does not exist (not the rounding noise
    of the centred values over their tiny norm)."""
    fixed, moving, weight = images
    metric = NCC(sign)
    rows, _ = _linear_values(images, 4, 2)
    for x, y in ((torch.full_like(moving, 0.37), fixed), (moving, torch.full_like(fixed, 2.5))):
        _, system = _ncc_system(metric, x, y, weight, rows)
        assert not bool(system.ncc.any()) and torch.equal(metric(x, y, weight), torch.ones_like(system.ncc))
        gradient, normal = metric.normal_equations(system)
        assert not bool(gradient.any()) and not bool(normal.any())
        assert not bool(metric.ecc_gradient(system, system.centred)[1].any())
    _, system = _ncc_system(metric, moving, fixed, weight, rows)  # not flat: a real step
    gradient, normal = metric.normal_equations(system)
    assert bool(gradient.abs().gt(0).all()) and bool((torch.linalg.eigvalsh(normal) > 0).all())


def test_ncc_sums_of_bands_merge_into_the_sums_of_the_whole(images):
    """:meth:`NCCStatistics.merged`: bands of rows, each centred on its own means (one with no
    weighted pixel), add up to the whole pair's means and centred sums; on an offset of 1000 in
    float32 as closely as the whole's own sums, where raw sums ``sum w x^2 - n mean^2`` are off
    by 5x their value.  A flat band 0.4 above the rest: each band's rounded mean leaves a residual
    ``sum w x~_b``, which the merge carries (without it ``ncc`` was 3e-4 off, the whole's 4e-8)."""
    fixed, moving, weight = images
    weight = weight.clone()
    weight[..., :2, :] = 0.0  # the first band counts nothing
    metric = NCC()
    rows = [slice(0, 2), slice(2, 5), slice(5, 20), slice(20, None)]
    ncc = lambda statistics: statistics.cross * torch.mul(*metric.inverse_norms(statistics))  # noqa: E731
    lifted = moving.clone()
    lifted[..., 5:20, :] = 0.4  # flat, off the mean
    for offset, dtype, x in ((0.0, torch.float64, moving), (1000.0, torch.float32, moving),
                             (1000.0, torch.float32, lifted)):
        x, y, w = (tensor.to(dtype) for tensor in (x + offset, 2.0 * fixed - offset, weight))
        whole = metric.deviations(x, y, w).statistics
        exact = metric.deviations(*(tensor.double() for tensor in (x, y, w))).statistics
        merged = NCCStatistics.merged([metric.deviations(x[..., part, :], y[..., part, :], w[..., part, :]).statistics
                                       for part in rows])
        own_error = lambda statistics, name: float(  # noqa: E731
            ((getattr(statistics, name).double() - getattr(exact, name)).abs() / getattr(exact, name).abs()).max())
        for name in ("count", "x_mean", "y_mean", "x_scatter", "y_scatter", "cross"):
            assert own_error(merged, name) <= max(4.0 * own_error(whole, name), 1e-12), (offset, name)
        assert float((ncc(merged).double() - ncc(exact)).abs().max()) <= max(
            4.0 * float((ncc(whole).double() - ncc(exact)).abs().max()), 1e-14)


@pytest.mark.parametrize("name", ["ncc", "ncc_any", "mi", "nmi"])
def test_sums_of_bands_give_the_cost_and_derivative_of_the_whole(images, name):
    """The two passes of one large pair (``register``'s bands): each band's ``sums``, merged, give
    the pair's cost; each band's ``derivative`` with the merged sums is the whole derivative's band;
    a band with no weighted pixel adds nothing (float64, two channels, a batch of three)."""
    fixed, moving, weight = images
    weight = weight.clone()
    weight[..., :3, :] = 0.0  # the first band counts nothing
    metric = ALL[name]()
    if hasattr(metric, "set_ranges"):  # a band's own ranges differ: the whole images' (as register)
        metric.set_ranges(moving, fixed)
    cost, derivative = metric(moving, fixed, weight, gradient=True)
    rows = [slice(0, 3), slice(3, 4), slice(4, 20), slice(20, None)]
    band = lambda image, part: image[..., part, :]  # noqa: E731
    sums = metric.merged_sums([metric.sums(band(moving, part), band(fixed, part), band(weight, part))
                               for part in rows])
    torch.testing.assert_close(metric.cost_of_sums(sums), cost, rtol=1e-12, atol=1e-14)
    merged_cost, terms = metric.cost_of_sums(sums, gradient=True)
    torch.testing.assert_close(merged_cost, cost, rtol=1e-12, atol=1e-14)
    banded = torch.cat([metric.derivative(band(moving, part), band(fixed, part), band(weight, part), terms)
                        for part in rows], dim=-2)
    scale = float(derivative.abs().max())
    assert scale > 0.0
    torch.testing.assert_close(banded, derivative, rtol=1e-10, atol=1e-12 * scale)


@pytest.mark.parametrize("name", ["lncc", "lncc_any"])
def test_local_ncc_in_bands_with_margins_gives_the_cost_and_derivative_of_the_whole(images, name):
    """:meth:`LocalNCC.part`: bands of rows, each with a margin of ``2 r`` rows (cut at the image's
    edges), give the whole pair's cost ``1 - sum S_b / sum n_b`` and derivative ``D_b / n``; a
    margin of ``2 r - 1`` rows does not (the test can tell)."""
    fixed, moving, weight = images
    metric = ALL[name]()
    cost, derivative = metric(moving, fixed, weight, gradient=True)
    height = moving.shape[-2]

    def banded(margin):
        scores, counts, derivatives = [], [], []
        for rows in (slice(0, 5), slice(5, 6), slice(6, 20), slice(20, height)):
            start, stop = max(0, rows.start - margin), min(height, rows.stop + margin)
            part = lambda image: image[..., start:stop, :]  # noqa: E731, B023
            score, count, band = metric.part(part(moving), part(fixed), part(weight),
                                             slice(rows.start - start, rows.stop - start))
            scores.append(score)
            counts.append(count)
            derivatives.append(band)
        count = sum(counts)
        return metric.cost_of_sums(sum(scores), count), torch.cat(derivatives, -2) / count[:, None, None, None]

    got_cost, got_derivative = banded(metric.margin)
    torch.testing.assert_close(got_cost, cost, rtol=1e-12, atol=1e-14)
    scale = float(derivative.abs().max())
    torch.testing.assert_close(got_derivative, derivative, rtol=1e-10, atol=1e-12 * scale)
    _, short = banded(metric.margin - 1)
    assert float((short - derivative).abs().max()) > 1e-6 * scale


def test_local_ncc_part_counts_each_pair_with_a_shared_weight(images):
    """:meth:`LocalNCC.part`'s count is ``(B,)``, ``C sum w`` over the band's rows, with one weight
    image for every pair too (it was ``(1,)``, right only by broadcasting)."""
    fixed, moving, weight = images
    shared = weight[:1]
    score, count, derivative = LocalNCC(2).part(moving, fixed, shared, slice(3, 20))
    assert count.shape == score.shape == (SHAPE[0],)
    torch.testing.assert_close(count, shared[..., 3:20, :].sum().expand(SHAPE[0]) * SHAPE[1], rtol=0, atol=0)
    assert derivative.shape == (*SHAPE[:2], 17, SHAPE[-1])


@pytest.mark.parametrize("bins", [33, 37, 64, 1024])
@pytest.mark.parametrize("matmul", [False, True])
def test_histograms_of_many_bins_in_float32(images, bins, matmul):
    """The clamp bound bins - 2 - 1e-6 is bins - 2 itself in float32 from 33 bins: the image's
    maximum fell one bin past the end ('index out of bounds'), also in register()."""
    fixed, moving, weight = (tensor.float() for tensor in images)
    for cls in (MutualInformation, NormalizedMutualInformation):
        metric = cls(bins)
        metric.use_matmul = matmul
        cost, derivative = metric(moving, fixed, weight, gradient=True)
        reference = cls(bins)(moving.double(), fixed.double(), weight.double())
        assert bool(torch.isfinite(derivative).all())
        torch.testing.assert_close(cost.double(), reference, rtol=1e-3, atol=1e-4)


def test_histogram_bins_of_inference_tensors_are_not_kept(images):
    """Under inference_mode the fixed bins were kept by (id, shape, sum): an image and its flip
    have one sum, and the next call reused the first image's bins."""
    fixed, moving, _ = images
    for cls in (MutualInformation, NormalizedMutualInformation):
        metric = cls(16)
        with torch.inference_mode():
            target = fixed.clone()
            metric(moving, target)
            target.copy_(fixed.flip(-1))
            kept = metric(moving, target)
        torch.testing.assert_close(kept, cls(16)(moving, fixed.flip(-1)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
def test_a_histogram_metric_shared_by_threads_gives_each_call_its_own_fixed_bins(cls):
    # Key and bins were two attributes: a thread could match the key another had just set and read
    # the bins of the other's fixed image (296 of 1500 calls wrong in an audit's run).
    import sys
    import threading

    generator = torch.Generator().manual_seed(3)
    fixed = [torch.rand(1, 1, 48, 48, generator=generator) for _ in range(2)]
    moving = torch.rand(1, 1, 48, 48, generator=generator)
    metric = cls(16)
    metric.set_ranges(moving, fixed[0])
    expected = [cls(16), cls(16)]
    for index, reference in enumerate(expected):
        reference.set_ranges(moving, fixed[0])
        expected[index] = reference(moving, fixed[index], gradient=True)
    wrong = []

    def work(offset: int) -> None:
        for call in range(150):
            index = (call + offset) % 2
            cost, derivative = metric(moving, fixed[index], gradient=True)
            if not (torch.equal(cost, expected[index][0]) and torch.equal(derivative, expected[index][1])):
                wrong.append(index)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often
    try:
        threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []


def test_a_histogram_metric_pickles_without_its_fixed_bins_and_holds_no_image():
    import gc
    import pickle
    import weakref

    metric = MutualInformation(16)
    fixed, moving = torch.rand(2, 1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    metric(moving, fixed)
    assert len(pickle.dumps(metric)) < 2000  # the bins (64^2 int64) are made again on first use
    held = weakref.ref(fixed)
    del fixed
    gc.collect()
    assert held() is None  # the kept bins do not keep the fixed image alive


def test_a_per_pixel_metric_in_half_precision_sums_in_float32():
    """65,536 weights of 1 summed in float16 are inf (its largest is 65,504): the mean read 0, and
    without weights a mean of 1.84 read inf (an audit of the public metrics)."""
    generator = torch.Generator().manual_seed(3)
    x, y = (torch.rand(1, 1, 256, 256, generator=generator) for _ in range(2))
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool)
    for scale, weight in ((1.0, mask), (3.0, None)):
        expected = PerPixelMetric()(scale * x, y, weight)
        cost, derivative = PerPixelMetric()((scale * x).half(), y.half(), weight, gradient=True)
        assert cost.dtype == derivative.dtype == torch.float16
        torch.testing.assert_close(cost.float(), expected, rtol=2e-3, atol=0.0)
        _, exact = PerPixelMetric()(scale * x, y, weight, gradient=True)
        torch.testing.assert_close(derivative.float(), exact, rtol=1e-2, atol=1e-7)


def test_a_per_pixel_mean_does_not_depend_on_the_weights_scale():
    """The count was clamped at 1: weights summing below 1 (normalised, or a scaled mask) gave
    0.0071 for a mean of 0.0136 (NCC, MI and NMI: the next test)."""
    generator = torch.Generator().manual_seed(4)
    x, y, weight = (torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64) for _ in range(3))
    weight = weight[:, :1]
    metric = PerPixelMetric("cauchy")
    for scale in (1e-3, 1e-6):
        torch.testing.assert_close(metric(x, y, scale * weight), metric(x, y, weight), rtol=1e-12, atol=0.0)
    cost, derivative = metric(x, y, 0 * weight, gradient=True)  # an empty pair counts nothing
    assert torch.equal(cost, torch.zeros(2, dtype=torch.float64)) and not derivative.any()
    with pytest.raises(TypeError, match="'mean' must be True or False; got 'no'"):
        PerPixelMetric(mean="no")


@pytest.mark.parametrize("cls", [MutualInformation, NormalizedMutualInformation])
def test_a_float32_histogram_of_a_large_flat_region_is_float64s_to_float32_accuracy(cls):
    """The CPU's scatter-add added each pixel's taps into float32 cells one after another: a cell
    of hundreds of thousands of pixels (a flat background) lost the small taps' share, 6e-4 of
    MI's cost and 4e-4 of its gradient at 512^2 (0.5 % of the cost at 2048^2, 5.6 % at 4096^2).
    The same float32 values in float64 are the reference; the fixed values are bin centres, so
    that no pixel changes fixed bin with the dtype (a box kernel's jump, not rounding).  Whole,
    and by bands' sums (the analytic path's, ``register``'s)."""
    generator = torch.Generator().manual_seed(0)
    size, bins = 512, 32
    y = ((torch.rand(1, 1, size, size, generator=generator, dtype=torch.float64) * bins).floor() + 0.5) / bins
    y[..., :, : 3 * size // 4] = 0.5 / bins  # three quarters of the pairs in one cell
    y[..., 0, 0], y[..., -1, -1] = 0.0, 1.0
    x = (y ** 2 + 0.05 * torch.rand(y.shape, generator=generator, dtype=torch.float64)).float().double()
    x[..., :, : 3 * size // 4] = 0.3
    cost, derivative = cls(bins)(x, y, gradient=True)
    single_cost, single_derivative = cls(bins)(x.float(), y.float(), gradient=True)
    assert float((single_cost.double() - cost).abs() / cost.abs()) < 4e-6
    assert float((single_derivative.double() - derivative).abs().max() / derivative.abs().max()) < 1e-5
    metric = cls(bins)
    metric.set_ranges(x.float(), y.float())
    bands = [slice(start, start + 128) for start in range(0, size, 128)]
    sums = metric.merged_sums([metric.sums(x.float()[..., rows, :], y.float()[..., rows, :]) for rows in bands])
    assert float((metric.cost_of_sums(sums).double() - cost).abs() / cost.abs()) < 4e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["ncc", "ncc_any", "mi", "nmi"])
def test_pooling_metrics_do_not_depend_on_the_weights_scale(images, name, dtype):
    """Only the weights' ratios count: NCC's means and the histograms' probabilities divided by
    ``sum w`` clamped at an absolute 1e-12, so weights summing below it changed the cost (MI -0.18
    for -1.49, NCC 0.13 for 0.73 with the weights times 1e-15).  Whole, and by sums of bands; an
    empty pair still costs a finite number with a zero derivative."""
    fixed, moving, weight = (tensor.to(dtype) for tensor in images)
    weight = weight * torch.rand(weight.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    metric = ALL[name]()
    if hasattr(metric, "set_ranges"):  # the whole images' (a band's sums need them)
        metric.set_ranges(moving, fixed)
    cost, derivative = metric(moving, fixed, weight, gradient=True)
    rows = [slice(0, 10), slice(10, None)]
    band = lambda image, part: image[..., part, :]  # noqa: E731
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for scale in (1e-15, 1e-30):
        scaled = weight * scale
        scaled_cost, scaled_derivative = metric(moving, fixed, scaled, gradient=True)
        torch.testing.assert_close(scaled_cost, cost, **tolerance)
        torch.testing.assert_close(scaled_derivative, derivative, **tolerance)
        sums = metric.merged_sums([metric.sums(band(moving, part), band(fixed, part), band(scaled, part))
                                   for part in rows])
        torch.testing.assert_close(metric.cost_of_sums(sums), cost, **tolerance)
    empty_cost, empty_derivative = metric(moving, fixed, 0.0 * weight, gradient=True)
    assert torch.isfinite(empty_cost).all() and not empty_derivative.any()


@pytest.mark.parametrize("sign", ["positive", "any"])
def test_lncc_does_not_depend_on_the_weights_scale_where_eps_is_negligible(images, sign):
    """LNCC's window sums and count were clamped at an absolute 1e-12 where the others take the
    dtype's smallest normal: on values near 1e10, where ``eps`` counts for nothing, weights times
    1e-15 gave a cost of 0.747 for 0.044.  Whole, and by bands (:meth:`LocalNCC.part`)."""
    fixed, moving, weight = images
    fixed, moving = 1e10 * fixed, 1e10 * moving
    metric = LocalNCC(2, sign=sign)
    cost, derivative = metric(moving, fixed, weight, gradient=True)
    scaled = weight * 1e-15
    scaled_cost, scaled_derivative = metric(moving, fixed, scaled, gradient=True)
    torch.testing.assert_close(scaled_cost, cost, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scaled_derivative, derivative, rtol=1e-9, atol=1e-30)
    margin, height = metric.margin, fixed.shape[-2]
    score = count = 0.0
    for start, stop in ((0, 10), (10, height)):
        lower, upper = max(0, start - margin), min(height, stop + margin)
        part = lambda image: image[..., lower:upper, :]  # noqa: E731
        band_score, band_count, _ = metric.part(part(moving), part(fixed), part(scaled),
                                                slice(start - lower, stop - lower), gradient=False)
        score, count = score + band_score, count + band_count
    torch.testing.assert_close(metric.cost_of_sums(score, count), cost, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sign", ["positive", "any"])
def test_the_ncc_step_does_not_depend_on_the_weights_scale(images, sign):
    """:meth:`NCC.ecc_system` takes ``s s^T / n`` with the count clamped as the means' is."""
    fixed, moving, weight = images
    metric = NCC(sign)
    rows, _ = _linear_values(images, 3, 3)
    _, system = _ncc_system(metric, moving, fixed, weight, rows)
    _, scaled = _ncc_system(metric, moving, fixed, weight * 1e-18, rows)
    for expected, got in zip(system, scaled):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mi", "nmi"])
@pytest.mark.parametrize("use_matmul", [False, True])
def test_a_histogram_metric_of_an_image_with_nan_is_nan(name, use_matmul):
    """A NaN became the least int64 as a bin: the fixed image's was counted in bin 0, a plausible
    finite cost, and with 33 bins or the one-hot product an index error; every other metric
    returns NaN. Only the pair that holds it, with set ranges or each call's own."""
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 32, 32, generator=generator, dtype=torch.float64)
    y = 0.5 * x + 0.5 * torch.rand(2, 1, 32, 32, generator=generator, dtype=torch.float64)
    clean = get_metric(name)(x, y)
    for ranges in (False, True):
        metric = {"mi": MutualInformation, "nmi": NormalizedMutualInformation}[name](33, use_matmul=use_matmul)
        if ranges:
            metric.set_ranges(x, y)
        for moving, fixed, pair in ((x, y.clone(), 0), (x.clone(), y, 1)):
            (fixed if pair == 0 else moving)[pair, 0, 3, 3] = float("nan")
            cost, derivative = metric(moving, fixed, gradient=True)
            assert torch.isnan(cost[pair]) and torch.isfinite(cost[1 - pair]), (ranges, pair)
            if ranges:  # the other pair's own ranges: its cost and derivative as before
                torch.testing.assert_close(cost[1 - pair], metric(x, y)[1 - pair])
                assert torch.isfinite(derivative[1 - pair]).all()
    assert torch.isfinite(clean).all()


def test_histogram_ranges_are_checked_against_the_images_and_can_be_unset():
    """Ranges set for one channel were applied to three silently; for two pairs, to one, as a reshape
    error; set_ranges(None, None) after a call raised AttributeError on every later call; a span
    below 1e-12 fell into one bin (MI 0 where NCC saw the same images)."""
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(2, 1, 32, 32, generator=generator, dtype=torch.float64)
    y = 0.5 * x + 0.5 * torch.rand(2, 1, 32, 32, generator=generator, dtype=torch.float64)
    metric = MutualInformation()
    metric.set_ranges(x, y)
    expected = metric(x, y)
    with pytest.raises(ValueError, match=r"ranges \(set_ranges\) are for 2 pair\(s\) of 1 channel\(s\); got "
                                         r"images \(2, 3, 32, 32\)"):
        metric(x.expand(2, 3, 32, 32), y.expand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="are for 2 pair"):
        metric(x[:1].expand(3, 1, 32, 32), y[:1].expand(3, 1, 32, 32))
    metric.set_ranges(None, None)
    torch.testing.assert_close(metric(x, y), expected)  # each call's own ranges: these images' own
    with pytest.raises(TypeError, match="set_ranges\\(\\): 'moving' must be a float tensor .B, C, H, W.; got ndarray"):
        metric.set_ranges(x.numpy(), y)
    torch.testing.assert_close(MutualInformation()(1e-13 * x, 1e-13 * y), expected, rtol=1e-9, atol=0.0)
    with pytest.raises(TypeError, match="'use_matmul' must be None, True or False; got 'no'"):
        MutualInformation(use_matmul="no")


def test_images_of_another_dtype_or_device_are_named():
    """float32 x with float64 y gave NCC's derivative in float64, and a per-pixel loss's own check
    blamed the loss ("L2Loss.forward(...) must return ... in x's dtype")."""
    x = torch.rand(1, 1, 8, 8)
    for metric in ALL.values():
        with pytest.raises(ValueError, match=r"'y' \(torch.float64, cpu\) and 'x' \(torch.float32, cpu\) must have "
                                             "the same dtype and device"):
            metric()(x, x.double())


def test_images_without_pixels_are_refused_and_no_pairs_give_no_costs():
    """MI with no pairs and a gradient raised a reshape error; images without pixels gave a
    ZeroDivisionError, an IndexError from amin, or NCC's cost of 1."""
    for metric in ALL.values():
        cost, derivative = metric()(torch.rand(0, 1, 8, 8), torch.rand(0, 1, 8, 8), gradient=True)
        assert cost.shape == (0,) and derivative.shape == (0, 1, 8, 8), metric()
        for shape in ((1, 0, 8, 8), (1, 1, 0, 8)):
            with pytest.raises(ValueError, match=r"'x' and 'y' have no pixels; got shape"):
                metric()(torch.rand(shape), torch.rand(shape))


def test_a_mean_of_weights_summing_below_one_is_the_same_whole_and_in_chunks(monkeypatch):
    """The metric's count had been clamped at 1 and then at the smallest normal number, but the
    chunked evaluation (an image beyond one chunk) and the fused kernel still clamped at 1: half the
    cost and gradient, for weights summing to 0.5 (an audit of this session's commits)."""
    from tireg import _chunks
    from tireg.analytic import cost_and_gradient

    generator = torch.Generator().manual_seed(8)
    fixed, moving, weight = (torch.rand(1, 1, 64, 64, generator=generator, dtype=torch.float64) for _ in range(3))
    weight = weight / weight.sum() * 0.5
    matrix = torch.eye(3, dtype=torch.float64)[None]
    metric = PerPixelMetric("l2")
    _, cost, gradient = cost_and_gradient(fixed, moving, matrix, metric, weight=weight)
    monkeypatch.setattr(_chunks, "EAGER_CHUNK_PIXELS", 1024)
    _, chunked_cost, chunked_gradient = cost_and_gradient(fixed, moving, matrix, metric, weight=weight)
    torch.testing.assert_close(cost, metric(moving, fixed, weight), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(chunked_cost, cost, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(chunked_gradient, gradient, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", ["mi", "nmi"])
def test_a_histogram_metric_of_no_pairs_backpropagates(name):
    x = torch.rand(0, 1, 16, 16, requires_grad=True)
    get_metric(name)(x, torch.rand(0, 1, 16, 16)).sum().backward()
    assert x.grad.shape == (0, 1, 16, 16)


@pytest.mark.parametrize("metric", [MutualInformation, NormalizedMutualInformation])
def test_set_ranges_of_the_pixels_inside_the_masks(metric):
    # a value under a mask (no data, -9999) is no part of the range; a mask without a pixel gives
    # the whole plane's
    generator = torch.Generator().manual_seed(0)
    moving = torch.rand(2, 2, 9, 11, generator=generator)
    fixed = torch.rand(2, 2, 9, 11, generator=generator)
    moving_mask = torch.ones(2, 1, 9, 11)
    moving_mask[0, :, :, :3] = 0
    moving_mask[1] = 0
    fixed_mask = torch.ones(1, 1, 9, 11)
    fixed_mask[..., 4, 5] = 0
    moving_nodata = moving.clone()
    moving_nodata[0, :, :, :3] = -9999.0
    fixed_nodata = fixed.clone()
    fixed_nodata[..., 4, 5] = 1e6
    instance = metric()
    instance.set_ranges(moving_nodata, fixed_nodata, moving_mask=moving_mask, fixed_mask=fixed_mask)
    moving_range, fixed_range = instance.ranges
    inside = moving[0, :, :, 3:]
    assert torch.equal(moving_range[0], torch.stack([inside.amin((1, 2)), inside.amax((1, 2))], -1))
    assert torch.equal(moving_range[1], torch.stack([moving[1].amin((1, 2)), moving[1].amax((1, 2))], -1))
    kept = fixed.flatten(2)[..., torch.arange(99) != 4 * 11 + 5]
    assert torch.equal(fixed_range, torch.stack([kept.amin(-1), kept.amax(-1)], -1))


@pytest.mark.parametrize("metric", [MutualInformation, NormalizedMutualInformation])
def test_per_call_ranges_leave_out_the_pixels_of_weight_zero(metric):
    """Without set_ranges, a histogram metric took its ranges over every pixel, a no-data value of
    weight 0 included: the counted intensities fell into one bin, MI 0 (NMI 1) and a zero
    derivative; so did cost_and_gradient(weight=...), which sets the ranges per call."""
    from tireg.analytic import cost_and_gradient

    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(2, 1, 24, 28, generator=generator, dtype=torch.float64)
    moving = 0.7 * fixed + 0.1 + 0.05 * torch.rand(2, 1, 24, 28, generator=generator, dtype=torch.float64)
    weight = torch.ones(2, 1, 24, 28, dtype=torch.float64)
    weight[0, ..., :9] = 0
    weight[1, ..., 5:11, :] = 0
    identity = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    expected = metric()(moving, fixed, weight, gradient=True)
    expected_analytic = cost_and_gradient(fixed, moving, identity, metric(), weight=weight)
    assert (expected[0] < -0.3).all() and expected[1].abs().amax() > 0  # informative images
    for nodata in (50.0, -9999.0):
        moving_nodata = torch.where(weight > 0, moving, nodata)
        fixed_nodata = torch.where(weight > 0, fixed, -nodata)
        cost, derivative = metric()(moving_nodata, fixed_nodata, weight, gradient=True)
        torch.testing.assert_close(cost, expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(derivative * weight, expected[1] * weight, rtol=1e-10, atol=1e-12)
        # the moving image's gradient at a counted pixel reads its neighbour below and to the right
        # (the interpolant's one-sided slope at a pixel centre): no-data one pixel off the counted ones
        apart = torch.ones_like(weight, dtype=torch.bool)
        apart[0, ..., :8] = apart[1, ..., 6:10, :] = False
        moving_apart = torch.where(apart, moving, nodata)
        analytic = cost_and_gradient(fixed_nodata, moving_apart, identity, metric(), weight=weight.bool())
        torch.testing.assert_close(analytic[1], expected_analytic[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(analytic[2], expected_analytic[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_complex_weight_is_refused_not_cast_to_its_real_part(images, name):
    """The cast to the images' dtype dropped the imaginary part with a warning: a weight of 1j was 0,
    and the cost of every pair 0 (per-pixel) or 1 (NCC)."""
    fixed, moving, weight = images
    metric = ALL[name]()
    with pytest.raises(TypeError, match=rf"^{type(metric).__name__}\(\): 'weight' must be real; got torch.complex128$"):
        metric(moving, fixed, weight * 1j)
    with pytest.raises(TypeError, match=r"'weight' must be real"):
        metric(moving, fixed, weight.to(torch.complex64), gradient=True)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("flag, shown", [("no", "'no'"), (2, "2"), (torch.tensor([1, 1]), r"a tensor of shape \(2,\)"),
                                         (None, "NoneType")])
def test_a_metric_s_gradient_flag_must_be_a_bool(images, name, flag, shown):
    """gradient="no" was taken for true, and a tensor raised "Boolean value of Tensor ... is ambiguous"."""
    fixed, moving, weight = images
    metric = ALL[name]()
    with pytest.raises(TypeError, match=rf"^{type(metric).__name__}\(\): 'gradient' must be True or False; "
                                        rf"got {shown}$"):
        metric(moving, fixed, weight, gradient=flag)
    assert isinstance(metric(moving, fixed, weight, gradient=np.bool_(True)), tuple)
    assert isinstance(metric(moving, fixed, weight, gradient=1), tuple)  # 0 and 1, as Python takes them
    assert not isinstance(metric(moving, fixed, weight, gradient=0), tuple)


def test_per_pixel_metric_s_mean_must_be_a_bool():
    """One check for every flag (check_flag): a NumPy bool is a bool, "no" is not."""
    assert PerPixelMetric(mean=np.bool_(False)).mean is False
    with pytest.raises(TypeError, match=r"^PerPixelMetric\(\): 'mean' must be True or False; got 'no'$"):
        PerPixelMetric(mean="no")


def test_an_unknown_metric_is_named_by_the_function_that_was_given_it():
    """get_metric("x") said "unknown metric 'x'" naming no function."""
    with pytest.raises(ValueError, match=r"^get_metric\(\): unknown metric 'x'; choose one of 'ncc'"):
        get_metric("x")
    with pytest.raises(ValueError, match=r"^my_function\(\): unknown metric 3"):
        get_metric(3, "my_function()")


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_sparse_weight_is_refused_naming_it(images, name):
    """It reached torch's internals (a cast, a product with a dense image) in torch's words."""
    fixed, moving, weight = images
    metric = ALL[name]()
    with pytest.raises(TypeError, match=rf"^{type(metric).__name__}\(\): 'weight' must be a dense tensor; got layout "
                                        r"torch.sparse_coo"):
        metric(moving, fixed, weight.to_sparse())


def test_local_ncc_window_wider_than_the_image_is_cut_to_it_exactly():
    # a window reaching past every pixel sums what one the image's size does; radius 10**6 had
    # padded the image by it (an allocation of terabytes) and 2000 took 74 s on a 64^2 pair
    from tireg.metrics import _box_sum

    image = torch.rand(2, 1, 13, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for radius in (3, 12):  # against a convolution with a window of ones, zeros outside
        window = torch.ones(1, 1, 2 * radius + 1, 2 * radius + 1, dtype=torch.float64)
        expected = F.conv2d(F.pad(image, (radius,) * 4), window)
        torch.testing.assert_close(_box_sum(image, radius), expected, rtol=0, atol=1e-12)
    whole = _box_sum(image, 19)  # 19 = W - 1: every column and row reached from each
    assert torch.allclose(whole, image.sum((-1, -2), keepdim=True).expand_as(whole), rtol=1e-12, atol=0)
    for radius in (25, 10**6):
        assert torch.equal(_box_sum(image, radius), whole)
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    assert LocalNCC(radius=10**6)(fixed, moving) == LocalNCC(radius=31)(fixed, moving)
