"""Per-pixel work in chunks under a pixel budget (tireg._chunks): the same numbers as all at once."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import OwnPerPixelCost, OwnWeightedCost

import tireg
import tireg._chunks as chunks_module
from tireg._chunks import bands_with_margins, chunk_slices, pair_and_row_chunks
from tireg.analytic import cost_and_gradient
from tireg.metrics import PerPixelMetric
from tireg.sampling import image_gradient, stack_with_gradient

analytic_module = importlib.import_module("tireg.analytic")


def test_chunk_slices_cover_every_item_once_within_the_budget():
    assert chunk_slices(10, 3, 9) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert chunk_slices(4, 100, 10) == [slice(i, i + 1) for i in range(4)]  # one item larger than the budget
    assert chunk_slices(5, 1, 1 << 40) == [slice(0, 5)]
    assert chunk_slices(0, 3, 9) == []


def test_pairs_fit_or_go_one_at_a_time_in_bands_of_rows():
    shape = torch.Size((5, 2, 10, 7))  # 140 pixels a pair, 14 a row
    assert pair_and_row_chunks(shape, 300) == [(slice(0, 2), slice(None)), (slice(2, 4), slice(None)),
                                               (slice(4, 5), slice(None))]
    bands = pair_and_row_chunks(shape, 50)  # 3 rows a band: 4 bands a pair
    assert len(bands) == 5 * 4
    assert bands[:4] == [(slice(0, 1), slice(0, 3)), (slice(0, 1), slice(3, 6)), (slice(0, 1), slice(6, 9)),
                         (slice(0, 1), slice(9, 10))]


def test_bands_with_margins_cover_every_row_once_with_their_margins_cut_at_the_edges():
    bands = bands_with_margins(10, 7, 21, 2)  # 3 rows a band, 2 of margin each side
    assert bands == [(slice(0, 5), slice(0, 3)), (slice(1, 8), slice(2, 5)), (slice(4, 10), slice(2, 5)),
                     (slice(7, 10), slice(2, 3))]
    own_rows = [row for around, own in bands for row in range(around.start + own.start, around.start + own.stop)]
    assert own_rows == list(range(10))


def _problem(shape, generator):
    fixed = torch.rand(*shape, generator=generator, dtype=torch.float64)
    moving = torch.rand(*shape, generator=generator, dtype=torch.float64)
    matrix = torch.eye(3, dtype=torch.float64).repeat(shape[0], 1, 1)
    matrix[:, :2] += 0.05 * torch.randn(shape[0], 2, 3, generator=generator, dtype=torch.float64)
    matrix[:, :2, 2] += 3.0 * torch.randn(shape[0], 2, generator=generator, dtype=torch.float64)  # some points outside
    return fixed, moving, matrix


def _options(moving, weighted: str, gradient: str, generator) -> dict:
    """cost_and_gradient's options: weights of each pair, shared or none; a precomputed gradient or none."""
    shape = moving.shape
    weight = None
    if weighted != "none":
        weight = (torch.rand(shape[0] if weighted == "per pair" else 1, 1, *shape[2:], generator=generator) > 0.3)
        weight = weight.double()
    stacked = None
    if gradient != "exact":
        stacked = stack_with_gradient(moving, image_gradient(moving, method=gradient, padding_mode="border"))
    return dict(weight=weight, padding_mode="border", moving_with_gradient=stacked)


def _spy(monkeypatch, *names: str) -> list:
    """Record ``(name, pairs)`` of each call of the analytic module's functions ``names``."""
    calls = []
    for name in names:
        function = getattr(analytic_module, name)
        monkeypatch.setattr(analytic_module, name, lambda *args, name=name, function=function: (
            calls.append((name, args[0].shape[0])) or function(*args)))
    return calls


@pytest.mark.parametrize("weighted", ["none", "per pair", "shared"])
@pytest.mark.parametrize("metric", [tireg.L2Loss(), PerPixelMetric("huber", mean=True), PerPixelMetric("l1", mean=False)])
@pytest.mark.parametrize("shape, budget", [((5, 2, 23, 31), 2 * 2 * 23 * 31), ((2, 1, 47, 29), 5 * 29)],
                         ids=["chunks of pairs", "bands of rows"])
@pytest.mark.parametrize("gradient", ["exact", "central"])
def test_reference_in_chunks_equals_all_at_once(monkeypatch, shape, budget, metric, weighted, gradient):
    """The reference path of cost_and_gradient in chunks of pairs or bands of rows: the warped image
    bit for bit, cost and G to rounding (float64), with weights of each pair or shared, a mean or a
    sum, and a precomputed gradient."""
    generator = torch.Generator().manual_seed(3)
    fixed, moving, matrix = _problem(shape, generator)
    options = _options(moving, weighted, gradient, generator)
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 1 << 40)
    expected = cost_and_gradient(fixed, moving, matrix, metric, **options)
    calls = []
    reference = analytic_module._reference
    monkeypatch.setattr(analytic_module, "_reference", lambda *args: calls.append(1) or reference(*args))
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", budget)
    warped, cost, matrix_gradient = cost_and_gradient(fixed, moving, matrix, metric, **options)
    assert len(calls) == len(pair_and_row_chunks(fixed.shape, budget)) > 2
    assert torch.equal(warped, expected[0])
    torch.testing.assert_close(cost, expected[1], rtol=1e-12, atol=0)
    assert expected[2].abs().max() > 0
    torch.testing.assert_close(matrix_gradient, expected[2], rtol=1e-12, atol=1e-12 * expected[2].abs().max().item())


def test_a_metric_that_pools_a_pair_runs_in_chunks_of_pairs_and_one_of_ones_own_whole(monkeypatch):
    """NCC pools a pair's pixels: a budget of one pair gives chunks of one pair, each whole, and a
    smaller one each pair in passes over its bands; a metric of one's own (its own cost: it may pool
    the batch) runs whole."""
    fixed, moving, matrix = _problem((3, 1, 20, 20), torch.Generator().manual_seed(4))
    calls = _spy(monkeypatch, "_reference", "_reference_in_passes")
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 400)
    cost_and_gradient(fixed, moving, matrix, tireg.metrics.get_metric("ncc"))
    assert calls == [("_reference", 1)] * 3
    calls.clear()
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 50)
    cost_and_gradient(fixed, moving, matrix, tireg.metrics.get_metric("ncc"))
    assert calls == [("_reference_in_passes", 1)] * 3

    class Pooled(tireg.metrics.NCC):
        def __call__(self, x, y, weight=None, gradient=False):
            return super().__call__(x, y, weight, gradient)

    class PooledWeights(tireg.metrics.NCC):  # NCC's cost, its own deviations (an audit's: batch-pooled)
        def deviations(self, x, y, weight=None):
            weight = torch.ones_like(x[:, :1]) if weight is None else weight
            return super().deviations(x, y, weight * (y[:, :1] > y.mean()).to(x.dtype))

    for metric in (Pooled(), PooledWeights()):
        calls.clear()
        cost_and_gradient(fixed, moving, matrix, metric)
        assert calls == [("_reference", 3)]




@pytest.mark.parametrize("metric", [OwnPerPixelCost("l2"), OwnWeightedCost("l2")], ids=["own __call__", "own weighted"])
def test_a_per_pixel_metric_of_ones_own_cost_runs_each_pair_whole(monkeypatch, metric):
    """A PerPixelMetric subclass with its own __call__ or weighted may pool a pair's pixels: in chunks
    of pairs each pair whole, never in bands of rows (whose sums stood in for its cost: the base
    class's, in two audits), with the cost and G of the whole batch at once."""
    fixed, moving, matrix = _problem((3, 1, 20, 20), torch.Generator().manual_seed(4))
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 1 << 40)
    expected = cost_and_gradient(fixed, moving, matrix, metric)
    calls = _spy(monkeypatch, "_reference", "_reference_in_chunks")
    for budget, pairs in ((400, [1, 1, 1]), (50, [1, 1, 1])):  # one pair a chunk; below one pair, still whole
        calls.clear()
        monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", budget)
        warped, cost, matrix_gradient = cost_and_gradient(fixed, moving, matrix, metric)
        assert calls == [("_reference", count) for count in pairs]
        assert torch.equal(warped, expected[0])
        torch.testing.assert_close(cost, expected[1], rtol=1e-12, atol=0)
        torch.testing.assert_close(matrix_gradient, expected[2], rtol=1e-12, atol=1e-15)


def test_one_pair_in_passes_returns_its_warped_image_not_a_copy(monkeypatch):
    """The warped image of one pair in passes is the step's output as it is: a copy into a batch
    buffer was a second image at the step's end (an audit's: 2.00 -> 1.78x for ncc)."""
    fixed, moving, matrix = _problem((1, 1, 30, 20), torch.Generator().manual_seed(9))
    results = []
    passes = analytic_module._reference_in_passes
    monkeypatch.setattr(analytic_module, "_reference_in_passes", lambda *args: results.append(passes(*args))
                        or results[-1])
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 5 * 20)
    warped, _, _ = cost_and_gradient(fixed, moving, matrix, tireg.metrics.get_metric("ncc"))
    assert len(results) == 1 and warped is results[0][0]


@pytest.mark.parametrize("name", ["mi", "nmi"])
def test_ranges_of_one_pair_hold_for_every_chunk(monkeypatch, name):
    """Histogram ranges set from one pair broadcast over the batch (as whole): each chunk takes them
    as they are (sliced per pair, every chunk after the first had none: an audit's error)."""
    fixed, moving, matrix = _problem((4, 1, 40, 40), torch.Generator().manual_seed(8))
    metric = tireg.metrics.get_metric(name)
    metric.set_ranges(moving[:1], fixed[:1])
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 1 << 40)
    expected = cost_and_gradient(fixed, moving, matrix, metric)
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 2 * 40 * 40)
    got = cost_and_gradient(fixed, moving, matrix, metric)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-10, atol=1e-12 * float(expected[2].abs().max()))


@pytest.mark.parametrize("weighted", ["none", "per pair", "shared"])
@pytest.mark.parametrize("name", ["ncc_any", "lncc", "mi", "mi ranged", "nmi"])
@pytest.mark.parametrize("gradient", ["exact", "central"])
@pytest.mark.parametrize("split", ["pairs", "bands"])
def test_image_level_metrics_in_chunks_of_pairs_equal_all_at_once(monkeypatch, name, weighted, gradient, split):
    """cost_and_gradient of NCC, local NCC and mutual information (an analytic model's step) in
    chunks of pairs, or each pair in passes over bands of 5 rows (local NCC's margins of 8): the
    warped image bit for bit, cost and G to rounding (float64), with weights of each pair or
    shared, a precomputed gradient, and ranges set on the metric, which each chunk takes its
    pairs' of and which stay as they were (batch-pooled ranges would differ)."""
    generator = torch.Generator().manual_seed(6)
    shape = (5, 2, 23, 31)
    fixed, moving, matrix = _problem(shape, generator)
    moving = moving * torch.arange(1.0, 6.0, dtype=torch.float64).view(-1, 1, 1, 1)  # ranges per pair
    metric = tireg.metrics.get_metric(name.split()[0])
    if name.endswith("ranged"):
        metric.set_ranges(moving, fixed)
    ranges = getattr(metric, "ranges", None)
    options = _options(moving, weighted, gradient, generator)
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 1 << 40)
    expected = cost_and_gradient(fixed, moving, matrix, metric, **options)
    calls = _spy(monkeypatch, "_reference", "_reference_in_passes")
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 2 * 2 * 23 * 31 if split == "pairs" else 2 * 31 * 5)
    warped, cost, matrix_gradient = cost_and_gradient(fixed, moving, matrix, metric, **options)
    if split == "pairs":  # two pairs a chunk
        assert calls == [("_reference", 2), ("_reference", 2), ("_reference", 1)]
    else:
        assert calls == [("_reference_in_passes", 1)] * 5
    assert getattr(metric, "ranges", None) is ranges
    assert torch.equal(warped, expected[0])
    torch.testing.assert_close(cost, expected[1], rtol=1e-12, atol=0)
    assert expected[2].abs().max() > 0
    torch.testing.assert_close(matrix_gradient, expected[2], rtol=1e-10, atol=1e-12 * expected[2].abs().max().item())


@pytest.mark.parametrize("budget", [2 * 37 * 53 * 2, 2 * 53 * 6], ids=["chunks of pairs", "bands of rows"])
def test_an_analytic_step_in_chunks_equals_autograd(monkeypatch, budget):
    """A model's reference step over chunks writes autograd's gradient and returns its warped image."""
    generator = torch.Generator().manual_seed(5)
    fixed, moving, _ = _problem((3, 2, 37, 53), generator)
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", budget)
    autograd = tireg.create_model("affine", moving, gradients="autograd")
    analytic = tireg.create_model("affine", moving, gradients="analytic", compile=False)
    values = torch.tensor([1.02, 0.03, -0.04, 0.97, 1.5, -2.0], dtype=torch.float64)
    for index, value in enumerate(values):
        per_pair = value + 0.01 * torch.randn(3, generator=generator, dtype=torch.float64)
        for model in (autograd, analytic):
            model.set_parameter(index, per_pair)
    total = tireg.L2Loss()(autograd(moving), fixed).sum()
    total.backward()
    calls = []
    reference = analytic_module._reference
    monkeypatch.setattr(analytic_module, "_reference", lambda *args: calls.append(1) or reference(*args))
    warped, cost = analytic(moving, fixed)
    assert len(calls) > 1
    assert torch.equal(warped, autograd(moving).detach())
    torch.testing.assert_close(cost, total.detach(), rtol=1e-12, atol=0)
    for analytic_parameter, autograd_parameter in zip(analytic.p, autograd.p):
        torch.testing.assert_close(analytic_parameter.grad, autograd_parameter.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", ["ncc", "lncc", "mi"])
def test_an_image_level_metric_step_of_one_large_pair_in_bands_equals_whole(monkeypatch, metric):
    """An analytic model's step of one pair above the budget, in passes over bands of 6 rows: the
    same warped image, cost and parameter gradients as the step whole (float64)."""
    generator = torch.Generator().manual_seed(7)
    fixed, moving, _ = _problem((1, 1, 47, 53), generator)
    values = torch.tensor([1.02, 0.03, -0.04, 0.97, 1.5, -2.0], dtype=torch.float64)
    calls = []
    passes = analytic_module._reference_in_passes
    monkeypatch.setattr(analytic_module, "_reference_in_passes", lambda *args: calls.append(1) or passes(*args))
    steps = []
    for budget in (1 << 40, 6 * 53):
        monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", budget)
        model = tireg.create_model("affine", moving, gradients="analytic", compile=False, metric=metric)
        for index, value in enumerate(values):
            model.set_parameter(index, value.reshape(1))
        warped, cost = model(moving, fixed)
        steps.append((warped, cost, [parameter.grad.clone() for parameter in model.p]))
    (whole_warped, whole_cost, whole_grads), (warped, cost, grads) = steps
    assert calls == [1]  # the banded step only
    assert torch.equal(warped, whole_warped)
    torch.testing.assert_close(cost, whole_cost, rtol=1e-12, atol=0)
    assert max(float(grad.abs().max()) for grad in whole_grads) > 0
    for got, expected in zip(grads, whole_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_bands_of_a_fixed_image_with_a_moving_image_of_another_size(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    fixed = torch.rand(2, 1, 45, 31, generator=generator, dtype=torch.float64)
    moving = torch.rand(2, 1, 38, 52, generator=generator, dtype=torch.float64)
    matrix = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    matrix[:, :2, 2] = torch.tensor([[4.0, -2.5], [-1.5, 3.0]], dtype=torch.float64)
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 1 << 40)
    expected = cost_and_gradient(fixed, moving, matrix, tireg.L2Loss())
    monkeypatch.setattr(chunks_module, "EAGER_CHUNK_PIXELS", 31 * 4)  # bands of 4 rows
    got = cost_and_gradient(fixed, moving, matrix, tireg.L2Loss())
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-12, atol=1e-9)
