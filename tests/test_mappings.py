"""Parameter mappings: value, derivative (against autograd), inverse, range checks."""

from __future__ import annotations

import math

import pytest
import torch

from tireg.mappings import ExpMapping, IdentityMapping, Mapping, SigmoidMapping

MAPPINGS = {
    "identity": IdentityMapping,
    "sigmoid(-2,3)": lambda: SigmoidMapping(-2.0, 3.0),
    "sigmoid(0.5,2)": lambda: SigmoidMapping(0.5, 2),
    "exp": ExpMapping,
}


@pytest.fixture(params=list(MAPPINGS))
def mapping(request) -> Mapping:
    return MAPPINGS[request.param]()


def raw_values(generator, dtype=torch.float64):
    """Raw values spread over [-4, 4] in a (2, 5) tensor (several values, not one)."""
    return torch.rand(2, 5, generator=generator, dtype=dtype) * 8 - 4


def parameter_values(mapping, generator, dtype=torch.float64):
    """Valid parameter values in the mapping's range, (2, 5)."""
    unit = torch.rand(2, 5, generator=generator, dtype=dtype) * 0.98 + 0.01  # inside (0, 1)
    if isinstance(mapping, SigmoidMapping):
        return mapping.lo + (mapping.hi - mapping.lo) * unit
    if isinstance(mapping, ExpMapping):
        return unit * 10
    return unit * 20 - 10


# ----------------------------------------------------------------------------
# forward and derivative


def test_forward_formulas():
    raw = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(IdentityMapping().forward(raw), raw)
    exp = torch.tensor([math.exp(-1), 1.0, math.exp(2)], dtype=torch.float64)
    torch.testing.assert_close(ExpMapping().forward(raw), exp)
    sigmoid = SigmoidMapping(-2.0, 3.0)
    expected = torch.tensor([-2 + 5 / (1 + math.exp(1)), 0.5, -2 + 5 / (1 + math.exp(-2))], dtype=torch.float64)
    torch.testing.assert_close(sigmoid.forward(raw), expected, rtol=0, atol=1e-14)
    # the midpoint of the range at r = 0
    assert SigmoidMapping(10, 20).forward(torch.tensor(0.0)).item() == pytest.approx(15.0)


def test_derivative_matches_autograd(mapping, generator):
    raw = raw_values(generator).requires_grad_(True)
    mapping.forward(raw).sum().backward()
    derivative = mapping.derivative(raw.detach())
    assert derivative.shape == raw.shape
    torch.testing.assert_close(derivative, raw.grad, rtol=1e-13, atol=1e-14)


def test_derivative_matches_finite_differences(mapping, generator):
    raw = raw_values(generator)
    step = 1e-6
    numeric = (mapping.forward(raw + step) - mapping.forward(raw - step)) / (2 * step)
    torch.testing.assert_close(mapping.derivative(raw), numeric, rtol=1e-7, atol=1e-8)


def test_call_equals_forward(mapping, generator):
    raw = raw_values(generator)
    torch.testing.assert_close(mapping(raw), mapping.forward(raw), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_the_input(mapping, dtype, device, generator):
    raw = raw_values(generator, dtype).to(device)
    for out in (mapping(raw), mapping.derivative(raw), mapping.solve(mapping(raw))):
        assert out.dtype == dtype
        assert out.device.type == torch.device(device).type
        assert out.shape == raw.shape


# ----------------------------------------------------------------------------
# inverse


def test_solve_inverts_forward(mapping, generator):
    raw = raw_values(generator)
    torch.testing.assert_close(mapping.solve(mapping.forward(raw)), raw, rtol=1e-10, atol=1e-10)


def test_forward_inverts_solve(mapping, generator):
    values = parameter_values(mapping, generator)
    raw = mapping.solve(values)
    assert raw.shape == values.shape
    torch.testing.assert_close(mapping.forward(raw), values, rtol=1e-12, atol=1e-12)


def test_solve_accepts_python_numbers():
    assert SigmoidMapping(-2.0, 3.0).solve(0.5).item() == pytest.approx(0.0, abs=1e-6)
    assert ExpMapping().solve(1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert ExpMapping().solve(math.e).item() == pytest.approx(1.0, abs=1e-6)
    assert IdentityMapping().solve(2).item() == 2.0
    # integers come back as floats
    assert IdentityMapping().solve(2).is_floating_point()
    assert ExpMapping().solve(1).is_floating_point()


def test_identity_solve_returns_a_copy():
    value = torch.tensor([1.0, 2.0])
    raw = IdentityMapping().solve(value)
    raw += 1
    assert value.tolist() == [1.0, 2.0]


def test_inverse_is_an_alias_of_solve(mapping, generator):
    values = parameter_values(mapping, generator)
    torch.testing.assert_close(mapping.inverse(values), mapping.solve(values), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# ranges


def test_sigmoid_output_stays_inside_the_open_range(generator):
    mapping = SigmoidMapping(-2.0, 3.0)
    raw = torch.linspace(-30, 30, 121, dtype=torch.float64)
    values = mapping(raw)
    assert bool((values > -2.0).all()) and bool((values < 3.0).all())
    # and covers most of it
    assert values.min().item() < -1.99 and values.max().item() > 2.99


@pytest.mark.parametrize(
    "value",
    [-2.0, 3.0, -2.5, 7.0, float("nan"), [0.0, 3.0], [0.0, 1.0, -3.0]],
    ids=["lo", "hi", "below", "above", "nan", "one-on-hi", "one-below"],
)
def test_sigmoid_solve_outside_the_range_raises(value):
    mapping = SigmoidMapping(-2.0, 3.0)
    with pytest.raises(ValueError, match=r"SigmoidMapping\.solve\(\).*outside the open range \(-2\.0, 3\.0\)"):
        mapping.solve(torch.tensor(value, dtype=torch.float64))


@pytest.mark.parametrize("lo, hi", [(2, 1), (1, 1), (float("nan"), 1), (0, float("inf")), (-float("inf"), 0)])
def test_sigmoid_needs_finite_increasing_bounds(lo, hi):
    with pytest.raises(ValueError, match=r"SigmoidMapping\(\).*lo < hi"):
        SigmoidMapping(lo, hi)


@pytest.mark.parametrize("value", [0.0, -1.0, [1.0, 0.0], [2.0, -3.0], float("nan")])
def test_exp_solve_of_non_positive_value_raises(value):
    with pytest.raises(ValueError, match=r"ExpMapping\.solve\(\).*must be positive"):
        ExpMapping().solve(torch.tensor(value))


def test_base_mapping_is_abstract():
    base = Mapping()
    for method in (base.forward, base.derivative, base.solve):
        with pytest.raises(NotImplementedError, match=rf"^Mapping\.{method.__name__}\(\): .*implement "
                                                      rf"{method.__name__}\(\)"):
            method(torch.zeros(2))


def test_a_mapping_without_derivative_is_named_by_the_analytic_model():
    """A mapping of one's own with forward and solve works with set_parameter and the autograd
    model; the analytic model's first step raised a NotImplementedError with no message."""
    import tireg

    class Tanh(Mapping):
        def forward(self, raw):
            return 0.3 * torch.tanh(raw)

        def solve(self, value):
            return torch.atanh(torch.as_tensor(value, dtype=torch.float64) / 0.3)

    moving = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    autograd = tireg.create_model("rigid", moving, gradients="autograd")
    autograd.set_parameter(0, 0.1, Tanh())
    autograd(moving).sum().backward()
    model = tireg.create_model("rigid", moving, compile=False)
    model.set_parameter(0, 0.1, Tanh())
    with pytest.raises(NotImplementedError, match=r"^Tanh\.derivative\(\): the analytic model needs m'\(r\) of "
                                                  r"every mapping .*implement derivative\(\) or use the autograd"):
        model(moving, moving)


def test_repr():
    assert repr(SigmoidMapping(-2, 3)) == "SigmoidMapping(-2.0, 3.0)"
    assert repr(ExpMapping()) == "ExpMapping()"


# ----------------------------------------------------------------------------
# the ends of the ranges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lo, hi", [(-2.0, 3.0), (0.0, 1.0), (0.1, 0.7), (100.0, 100.001), (-1e-3, 1e-3)])
def test_sigmoid_forward_stays_inside_and_solves_back_when_it_saturates(lo, hi, dtype):
    """forward returned hi exactly from raw ~ 17 (float32) / 37 (float64), lo for large negative raw
    with lo != 0, and solve(forward(raw)) raised: forward now stops at the dtype's neighbours of the
    bounds, inside the open range, and what it gives solves back to a raw value with the same value."""
    mapping = SigmoidMapping(lo, hi)
    raw = torch.cat([torch.linspace(-200, 200, 801, dtype=dtype),
                     torch.tensor([-1e30, 1e30, -float("inf"), float("inf")], dtype=dtype)])
    values = mapping(raw)
    # inside both in the dtype (as solve compares) and in exact arithmetic
    assert bool((values > lo).all()) and bool((values < hi).all())
    assert bool((values.double() > lo).all()) and bool((values.double() < hi).all())
    again = mapping(mapping.solve(values))
    assert bool(torch.isfinite(mapping.solve(values)).all())
    torch.testing.assert_close(again, values, rtol=0, atol=4 * (hi - lo) * torch.finfo(dtype).eps)
    # saturated: the dtype's values next to the bounds
    bounds = torch.tensor([lo, hi], dtype=dtype)
    assert values[-1].item() == torch.nextafter(bounds[1], bounds[0]).item()
    assert values[-2].item() == torch.nextafter(bounds[0], bounds[1]).item()
    # not saturated: the formula, unchanged
    middle = raw.abs() < 5
    expected = lo + (hi - lo) * torch.sigmoid(raw[middle].double())
    atol = 2 * (hi + abs(lo)) * torch.finfo(dtype).eps
    torch.testing.assert_close(values[middle].double(), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_derivative_is_accurate_on_both_sides(dtype):
    """s (1 - s) was exactly 0 from raw ~ 17 in float32 and off by 4.6e-4 at raw = 10."""
    mapping = SigmoidMapping(-2.0, 3.0)
    top = 80 if dtype == torch.float32 else 700  # beyond, e^-|r| leaves the dtype's normal range
    raw = torch.linspace(-top, top, 2 * top + 1, dtype=dtype)
    derivative = mapping.derivative(raw)
    exact = [5.0 * math.exp(-abs(r)) / (1.0 + math.exp(-abs(r))) ** 2 for r in raw.tolist()]
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(derivative.double(), torch.tensor(exact, dtype=torch.float64), rtol=rtol, atol=0)
    at_ten = 5 * math.exp(-10) / (1 + math.exp(-10)) ** 2
    assert mapping.derivative(torch.tensor([10.0])).item() == pytest.approx(at_ten, rel=1e-6)


def test_python_numbers_are_solved_in_float64():
    """As float32 first: solve(1 - 1e-9) raised 'outside the open range', (100, 100.001).solve(100.0005)
    gave 0.014, ExpMapping().solve(1e39) inf and solve(1e-50) raised 'must be positive'."""
    unit = SigmoidMapping(0.0, 1.0)
    raw = unit.solve(1 - 1e-9)
    assert raw.dtype == torch.get_default_dtype()  # solved in float64, rounded once at the end
    assert raw.item() == pytest.approx(math.log((1 - 1e-9) / 1e-9), rel=1e-7)
    assert unit.solve(1e-300).item() == pytest.approx(math.log(1e-300), rel=1e-7)
    assert SigmoidMapping(100.0, 100.001).solve(100.0005).item() == pytest.approx(0.0, abs=1e-9)
    assert ExpMapping().solve(1e39).item() == pytest.approx(math.log(1e39), rel=1e-7)
    assert ExpMapping().solve(1e-50).item() == pytest.approx(math.log(1e-50), rel=1e-7)
    assert ExpMapping().solve([1e-50, 1e39]).dtype == torch.get_default_dtype()
    assert IdentityMapping().solve(0.1).dtype == torch.get_default_dtype()
    assert ExpMapping().solve(torch.tensor([1, 2])).dtype == torch.get_default_dtype()  # an integer tensor too
    # as a float64 tensor (what set_parameter passes), the float64 result as it is
    assert IdentityMapping().solve(torch.tensor(0.1, dtype=torch.float64)).item() == 0.1
    # a floating-point tensor keeps its dtype
    assert unit.solve(torch.tensor(0.25)).dtype == torch.float32
    assert unit.solve(torch.tensor(0.25, dtype=torch.float64)).dtype == torch.float64


def test_sigmoid_solve_is_accurate_next_to_the_bounds():
    """log(q) - log1p(-q) rounded 1 - q; the differences to the bounds are exact there."""
    mapping = SigmoidMapping(-2.0, 3.0)
    for gap in (1e-3, 1e-9, 1e-14):
        value = 3.0 - gap
        exact_gap = 3.0 - value  # exact (Sterbenz): the gap the float value has
        solved = mapping.solve(torch.tensor(value, dtype=torch.float64))
        assert solved.item() == pytest.approx(math.log((5.0 - exact_gap) / exact_gap), rel=1e-14)
    values = torch.tensor([-2.0, 3.0], dtype=torch.float32)
    inside = torch.nextafter(values, values.flip(0))
    assert bool(torch.isfinite(mapping.solve(inside)).all())  # the float32 neighbours of the bounds


def test_exp_forward_overflow_is_documented():
    assert "88.7" in ExpMapping.__doc__
    assert ExpMapping()(torch.tensor([88.0])).isfinite().all() and ExpMapping()(torch.tensor([89.0])).isinf().all()


def test_sigmoid_bounds_are_read_only():
    """forward's clamp is made from lo and hi once: a range changed later gave values clamped to the old one."""
    mapping = SigmoidMapping(0.0, 1.0)
    with pytest.raises(AttributeError):
        mapping.hi = 2.0
    assert (mapping.lo, mapping.hi) == (0.0, 1.0)


def test_a_sigmoid_mapping_pickled_before_its_bounds_were_read_only_loads():
    import pickle

    mapping = SigmoidMapping(-1.0, 2.0)
    old = SigmoidMapping.__new__(SigmoidMapping)
    old.__dict__.update(lo=-1.0, hi=2.0)  # the attributes an earlier version pickled
    for loaded in (pickle.loads(pickle.dumps(mapping)), pickle.loads(pickle.dumps(old))):
        assert (loaded.lo, loaded.hi) == (-1.0, 2.0)
        assert torch.equal(loaded(torch.tensor([30.0])), mapping(torch.tensor([30.0])))


def test_solve_names_a_value_that_is_no_number():
    """torch said only "new(): invalid data type 'str'"."""
    for mapping in (IdentityMapping(), SigmoidMapping(0.0, 1.0), ExpMapping()):
        with pytest.raises(TypeError, match=r"^solve\(\): 'value' must be a number, a sequence of numbers or a "
                                            r"tensor; got 'a'$"):
            mapping.solve("a")


@pytest.mark.parametrize("mapping", [IdentityMapping(), SigmoidMapping(-1, 1), ExpMapping()])
def test_a_value_beyond_float64_is_a_value_error_naming_it(mapping):
    """solve(10**400) (and inverse()) raised a bare OverflowError from torch.as_tensor."""
    with pytest.raises(ValueError, match=r"^solve\(\): 'value' is beyond float64's range"):
        mapping.inverse(10**400)
    with pytest.raises(ValueError, match=r"^solve\(\): 'value' has a value beyond float64's range"):
        mapping.solve([0.5, -10**400])


@pytest.mark.parametrize("mapping", [IdentityMapping(), SigmoidMapping(-1, 1), ExpMapping()], ids=repr)
@pytest.mark.parametrize("raw", [torch.tensor([True]), torch.tensor([1]), torch.tensor([1j]), [0.5]],
                         ids=["bool", "int", "complex", "list"])
def test_forward_and_derivative_take_a_floating_point_tensor_only(mapping, raw):
    """SigmoidMapping.derivative of a bool tensor raised torch's "Negation, the `-` operator, on a bool
    tensor is not supported"; an integer or complex raw gave integer or complex parameter values."""
    shown = raw.dtype if isinstance(raw, torch.Tensor) else "list"
    for method in ("forward", "derivative"):
        with pytest.raises(TypeError, match=rf"^{type(mapping).__name__}\.{method}\(\): 'raw' must be a "
                                            rf"floating-point tensor; got {shown}$"):
            getattr(mapping, method)(raw)
    assert mapping(torch.zeros(2, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:DeprecationWarning")  # torch's own, in jacfwd
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_through_a_saturated_sigmoid_is_the_exact_derivative(dtype):
    """Saturated (float32 from raw ~ 17), forward clamps its value next to the bound: autograd's
    derivative through it had been the clamp's 0 (and sigmoid's y (1 - y) rounds to 0 there too),
    while the analytic path multiplied by the exact m'(r): Adam made a full step on one path and
    none on the other. Autograd's derivative of forward is derivative() on both sides now, its
    second derivative the exact mapping's, and the value is what it was, to the last bit."""
    mapping = SigmoidMapping(0.5, 1.6)
    raw = torch.tensor([-60.0, -20.0, -10.0, -1.0, 0.0, 2.0, 10.0, 20.0, 60.0], dtype=dtype, requires_grad=True)
    value = mapping.forward(raw)
    (grad,) = torch.autograd.grad(value.sum(), raw, create_graph=True)
    exact = mapping.derivative(raw.detach())
    assert bool((exact[[1, -2]] > 0).all())  # saturated in float32, not 0
    torch.testing.assert_close(grad, exact, rtol=4 * torch.finfo(dtype).eps, atol=0)
    with torch.no_grad():
        assert torch.equal(value, mapping.forward(raw))
    assert bool((value > 0.5).all() and (value < 1.6).all())
    forward_mode = torch.func.jacfwd(mapping.forward)(raw.detach()).diagonal()
    torch.testing.assert_close(forward_mode, exact, rtol=4 * torch.finfo(dtype).eps, atol=0)
    (second,) = torch.autograd.grad(grad.sum(), raw)
    s, t = torch.sigmoid(raw.detach().double()), torch.sigmoid(-raw.detach().double())  # m'' = m' (t - s)
    torch.testing.assert_close(second.double(), 1.1 * s * t * (t - s),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-30)


def test_a_saturated_sigmoid_takes_the_same_adam_step_on_both_gradient_paths():
    """The audit's case: float32, the seed's scale mapping saturated at raw 20."""
    import tireg

    generator = torch.Generator().manual_seed(5)
    fixed = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 30, 40, generator=generator), 5, 1, 2)
    moving = torch.roll(fixed, 1, -1)
    models = [tireg.create_model("similarity", moving, gradients=kind, compile=False) for kind in ("analytic", "autograd")]
    for model in models:
        model.set_parameter(1, 1.0, SigmoidMapping(0.5, 1.6))
        with torch.no_grad():
            model.p[1].fill_(20.0)
    analytic, autograd = models
    analytic(moving, fixed)
    tireg.L2Loss()(autograd(moving), fixed).sum().backward()
    assert autograd.p[1].grad.item() != 0.0
    torch.testing.assert_close(analytic.p[1].grad, autograd.p[1].grad, rtol=1e-4, atol=0)
    for model in models:
        torch.optim.Adam(model.parameters(), lr=0.1).step()
    assert analytic.p[1].item() == autograd.p[1].item() < 20.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_forward_mode_through_a_saturated_sigmoid_is_the_exact_derivative_under_no_grad(dtype):
    """Forward-mode AD needs no grad mode: under no_grad() its tangent had been the clamp's 0 at
    saturation (the exact derivative was added only where torch.is_grad_enabled())."""
    import torch.autograd.forward_ad as fwAD

    mapping = SigmoidMapping(0.5, 1.6)
    raw = torch.tensor([0.0, 20.0, -30.0, 3.0], dtype=dtype)
    for context in (torch.no_grad, torch.enable_grad):
        with fwAD.dual_level(), context():
            dual = mapping(fwAD.make_dual(raw, torch.full_like(raw, 2.0)))
            value, tangent = fwAD.unpack_dual(dual)
        assert torch.equal(value, torch.no_grad()(mapping)(raw))
        assert torch.equal(tangent, 2.0 * mapping.derivative(raw)), context


def test_a_sigmoid_forward_records_one_node_and_none_without_a_derivative_wanted():
    """The exact derivative costs nothing until it is asked for: forward under grad records one node
    (ten had been recorded, the mapping's forward 3x and the seed's autograd step at 192 x 256 15 %
    slower), and none where nothing needs a derivative. Value bit for bit the same either way."""
    mapping = SigmoidMapping(0.5, 1.6)
    raw = torch.tensor([-40.0, -3.0, 0.0, 0.7, 20.0], requires_grad=True)
    value = mapping(raw)
    assert value.grad_fn is not None
    assert [type(node).__name__ for node, _ in value.grad_fn.next_functions] == ["AccumulateGrad"]
    assert mapping(raw.detach()).grad_fn is None
    with torch.no_grad():
        plain = mapping(raw)
    assert plain.grad_fn is None and torch.equal(plain, value.detach())
    (grad,) = torch.autograd.grad(value.sum(), raw)
    assert torch.equal(grad, mapping.derivative(raw.detach()))


def test_a_compiled_graph_takes_the_sigmoids_exact_derivative():
    """Dynamo traces no autograd.Function with a jvp (fullgraph=True raised 'Unsupported custom jvp'):
    a compiled graph takes the exact derivative by plain operations."""
    mapping = SigmoidMapping(0.5, 1.6)
    compiled = torch.compile(lambda raw: mapping(raw) * 2.0, backend="aot_eager", fullgraph=True)
    raw = torch.tensor([0.0, 3.0, 20.0], requires_grad=True)
    value = compiled(raw)
    value.sum().backward()
    with torch.no_grad():
        assert torch.equal(value, mapping(raw) * 2.0)
    torch.testing.assert_close(raw.grad, 2.0 * mapping.derivative(raw.detach()), rtol=1e-6, atol=0)
    assert raw.grad[2] > 0


def test_torch_func_transforms_take_the_sigmoids_exact_derivative():
    mapping = SigmoidMapping(-2.0, 3.0)
    raw = torch.tensor([0.3, 20.0, -20.0], dtype=torch.float64)
    exact = mapping.derivative(raw)
    torch.testing.assert_close(torch.func.grad(lambda r: mapping(r).sum())(raw), exact, rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.func.jacrev(mapping)(raw).diagonal(), exact, rtol=1e-15, atol=0)
    assert torch.equal(torch.vmap(mapping)(raw), torch.no_grad()(mapping)(raw))
    s, t = torch.sigmoid(raw), torch.sigmoid(-raw)
    torch.testing.assert_close(torch.func.hessian(lambda r: mapping(r).sum())(raw).diagonal(), 5 * s * t * (t - s),
                               rtol=1e-12, atol=1e-30)


def test_a_sigmoid_range_wider_than_the_dtypes_arithmetic_is_refused():
    """float32 (-3e38, 3e38): hi - lo = 6e38 overflows, and forward gave the upper bound for every raw
    value without grad and NaN with it (inf - inf). Refused in that dtype; float64 takes it, and
    float16 (-40000, 40000), which computes in float32, keeps its values."""
    mapping = SigmoidMapping(-3e38, 3e38)
    raw = torch.tensor([-1.0, 0.0, 1.0])
    for method in ("forward", "derivative"):
        with pytest.raises(ValueError, match=rf"{method}\(\): the range's width hi - lo = 6e\+38 overflows "
                                             "torch.float32's arithmetic"):
            getattr(mapping, method)(raw.clone().requires_grad_())
    with pytest.raises(ValueError, match="torch.bfloat16's arithmetic"):
        mapping(raw.to(torch.bfloat16))
    value = mapping(raw.double())
    assert bool(torch.isfinite(value).all()) and value[0] < 0 < value[2]
    half = SigmoidMapping(-40000.0, 40000.0)(raw.half().requires_grad_())
    torch.testing.assert_close(half.detach().float(), 80000 * torch.sigmoid(raw) - 40000, rtol=0, atol=32)
    with pytest.raises(ValueError, match="width hi - lo overflows float64"):
        SigmoidMapping(-1e308, 1e308)


@pytest.mark.parametrize("value", [torch.tensor([0.5 + 2j]), torch.tensor(0.5 + 0j, dtype=torch.complex128)])
def test_solve_refuses_complex_tensors_as_it_refuses_complex_numbers(value):
    # torch.as_tensor(..., dtype=float64) had dropped the imaginary part with only torch's warning
    for mapping in (IdentityMapping(), SigmoidMapping(0.0, 1.0), ExpMapping()):
        with pytest.raises(TypeError, match="'value' must be real"):
            mapping.solve(value)
        with pytest.raises(TypeError, match="'value' must be real"):
            mapping.solve(value.numpy())
