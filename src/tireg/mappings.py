"""Parameter mappings: an unconstrained raw value ``r`` (what the optimiser
updates) to a parameter value ``p = m(r)``.

Each mapping gives the value ``m(r)``, the derivative ``m'(r)`` (which the
analytic gradient multiplies in by the chain rule, ``dL/dr = dL/dp * m'(r)``)
and the inverse ``r = m^{-1}(p)`` (the seed calls it ``solve``).  Mappings
are plain callables on floating-point tensors of any shape and device.

``forward`` and ``derivative`` keep the raw tensor's dtype; the built-in mappings take a
floating-point tensor only (``TypeError`` otherwise: a bool tensor raised torch's "Negation ... on a
bool tensor is not supported", and an integer or complex one gave integer or complex values).  ``solve`` keeps a
floating-point tensor's dtype; anything else (a Python number or sequence, an
integer tensor) is solved in float64 and comes back in torch's default dtype,
rounded once at the end: rounded to float32 first, ``SigmoidMapping(0, 1).solve(1 - 1e-9)``
fell onto the bound and ``ExpMapping().solve(1e39)`` overflowed.  (A model's
``set_parameter`` passes float64 and casts the result to the parameter's dtype.)
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch.autograd import forward_ad

from ._device import cached
from ._validation import beyond_float64, real_number

__all__ = ["Mapping", "IdentityMapping", "SigmoidMapping", "ExpMapping"]

Number = Union[float, torch.Tensor]


class Mapping:
    """Base class: ``p = forward(r)``, ``derivative(r) = dp/dr``, ``solve(p) = r``.

    A mapping of one's own implements all three: ``forward`` for every model,
    ``solve`` for ``set_parameter``, ``derivative`` for the analytic model.
    One that lacks one raises a ``NotImplementedError`` that names it and what needs it.
    """

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Parameter value ``p = m(r)``."""
        raise NotImplementedError(f"{type(self).__name__}.forward(): every model needs the parameter value "
                                  "p = m(r) of every mapping; implement forward()")

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        """``dp/dr = m'(r)``."""
        # a bare NotImplementedError had surfaced from deep inside the analytic model's first step
        raise NotImplementedError(f"{type(self).__name__}.derivative(): the analytic model needs m'(r) of every "
                                  "mapping (dL/dr = dL/dp * m'(r)); implement derivative() or use the autograd "
                                  "model")

    def solve(self, value: Number) -> torch.Tensor:
        """Raw value ``r`` with ``m(r) = value`` (the inverse mapping)."""
        raise NotImplementedError(f"{type(self).__name__}.solve(): set_parameter() needs the raw value r with "
                                  "m(r) = value (the inverse mapping); implement solve()")

    def inverse(self, value: Number) -> torch.Tensor:
        """Alias of :meth:`solve`."""
        return self.solve(value)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self.forward(raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_float_tensor(value: Number) -> tuple[torch.Tensor, torch.dtype]:
    """``(value to solve, dtype of the result)``: a floating-point tensor as it is, in its dtype;
    anything else (Python numbers, sequences, integer tensors) as float64, so that no value is
    rounded before it is solved, with the default dtype for the result (what ``solve`` gave).
    An integer beyond float64's range (``10**400``) raises a ``ValueError`` naming ``'value'``."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value, value.dtype
    if (value.is_complex() if isinstance(value, torch.Tensor)  # as_tensor(.., float64) dropped the imaginary part
            else getattr(getattr(value, "dtype", None), "kind", None) == "c"):  # a NumPy array's
        raise TypeError(f"solve(): 'value' must be real; got values of dtype {value.dtype}")
    try:
        return torch.as_tensor(value, dtype=torch.float64), torch.get_default_dtype()
    except OverflowError:  # an int such as 10**400 (float64 holds no such value)
        raise beyond_float64("value", "solve()", several=not isinstance(value, numbers.Number)) from None
    except (TypeError, ValueError, RuntimeError):  # "new(): invalid data type 'str'"
        raise TypeError(f"solve(): 'value' must be a number, a sequence of numbers or a tensor; got "
                        f"{value!r}") from None


def _raw(mapping: Mapping, raw, method: str) -> torch.Tensor:
    """A built-in mapping's ``raw`` argument, a floating-point tensor (a type and dtype check: no value
    read, nothing for a compiled step to break on); raise a ``TypeError`` naming it otherwise."""
    if not isinstance(raw, torch.Tensor):
        raise TypeError(f"{type(mapping).__name__}.{method}(): 'raw' must be a floating-point tensor; "
                        f"got {type(raw).__name__}")
    if not raw.is_floating_point():
        raise TypeError(f"{type(mapping).__name__}.{method}(): 'raw' must be a floating-point tensor; got {raw.dtype}")
    return raw


class IdentityMapping(Mapping):
    """``p = r``, ``m'(r) = 1``."""

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return _raw(self, raw, "forward")

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(_raw(self, raw, "derivative"))

    def solve(self, value: Number) -> torch.Tensor:
        value, dtype = _as_float_tensor(value)
        return value.to(dtype, copy=True)


class SigmoidMapping(Mapping):
    """A bounded parameter: ``p = lo + (hi - lo) * sigmoid(r)`` in the open range ``(lo, hi)``.

    ``m'(r) = (hi - lo) * sigmoid(r) * sigmoid(-r)`` and
    ``m^{-1}(p) = log((p - lo) / (hi - p))``; a value outside ``(lo, hi)`` has
    no inverse and raises ``ValueError``.

    Saturation: in floating point ``sigmoid(r)`` rounds to 1 from ``r ~ 17``
    (float32; 37 in float64), and ``lo + (hi - lo) sigmoid(r)`` onto ``lo`` or ``hi``
    for large ``|r|``, where :meth:`solve` of the result raised.  ``forward``
    therefore clamps its value to the dtype's values strictly inside
    ``(lo, hi)``: at saturation it gives the representable value next to the
    bound, so it stays in the open range for every raw value, and
    ``solve(forward(r))`` is a raw value whose ``forward`` is that value to one
    unit in the last place (not ``r`` itself, which no longer changes the value).  ``derivative`` is the exact
    mapping's, accurate on both sides (about ``(hi - lo) e^{-|r|}``, 0 only
    where that underflows), not the clamp's 0, and so is autograd's derivative
    of ``forward`` (the analytic and autograd models take the same gradient
    there: autograd's had been the clamp's 0, and sigmoid's ``y (1 - y)`` is 0
    once ``y`` rounds to 1).  The value is the clamped one; only its
    derivative is the exact mapping's, a step from saturation back inside
    that the rounded value cannot show.  (Where a dtype has no value
    strictly between ``lo`` and ``hi``, as float16 may for a narrow range,
    nothing can stay inside.)  Autograd and forward-mode AD (under ``no_grad``
    too) take that derivative through a ``torch.autograd.Function``; without
    either, ``forward`` is the value alone.

    A range whose width ``hi - lo`` overflows a dtype's arithmetic (float32's,
    for float16, bfloat16 and float32; float64's at construction) is refused
    with a ``ValueError`` by ``forward`` and ``derivative`` in that dtype: in
    float32, ``(-3e38, 3e38)`` had given every raw value the upper bound, and
    NaN under grad.
    """

    def __init__(self, lo: float, hi: float):
        numbers = real_number(lo), real_number(hi)
        if None in numbers:  # float("a") said only "could not convert string to float"; float("1") took it
            raise TypeError(f"SigmoidMapping(): 'lo' and 'hi' must be numbers; got lo={lo!r}, hi={hi!r}")
        lo, hi = numbers
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"SigmoidMapping(): need finite lo < hi; got lo={lo}, hi={hi}")
        if math.isinf(hi - lo):  # m'(r) = (hi - lo) s (1 - s) overflowed in every dtype
            raise ValueError(f"SigmoidMapping(): the range's width hi - lo overflows float64; got lo={lo}, hi={hi}")
        self._lo, self._hi = lo, hi
        # the dtypes whose arithmetic cannot hold the width: float16 and bfloat16 compute in float32
        self._too_wide = frozenset(dtype for dtype in (torch.float16, torch.bfloat16, torch.float32)
                                   if hi - lo > torch.finfo(torch.float32).max)
        # the dtype's values next to lo and hi, strictly inside: forward's clamp (Python floats,
        # exact in their dtype: nothing for a compiled step to copy or trace)
        self._inside = {dtype: _open_range(lo, hi, dtype)
                        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

    # read-only: forward's clamp is made from them once (a range changed later gave values clamped
    # to the old one); a new range is a new mapping, set_parameter(i, value, SigmoidMapping(lo, hi))
    lo = property(lambda self: self._lo, doc="Lower bound (read-only).")
    hi = property(lambda self: self._hi, doc="Upper bound (read-only).")

    def __setstate__(self, state: dict) -> None:
        """Unpickling: the bounds, also from a mapping pickled before they were read-only (``lo``, ``hi``)."""
        self.__init__(state.get("_lo", state.get("lo")), state.get("_hi", state.get("hi")))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        raw = _raw(self, raw, "forward")
        self._check_width(raw.dtype, "forward")
        span, inside = self._hi - self._lo, self._inside.get(raw.dtype)
        transformed = torch._C._are_functorch_transforms_active()  # torch.func.grad, jacfwd, vmap, ...
        if not (transformed or (raw.requires_grad and torch.is_grad_enabled()) or forward_ad._current_level >= 0):
            return _sigmoid_value(raw, self._lo, span, inside)  # no derivative wanted (a compiled step's too)
        # autograd's derivative is the exact mapping's, as derivative() gives it: the clamp's is 0 at
        # saturation, and sigmoid's own backward, y (1 - y), is 0 where y rounds to 1 (float32 from r ~ 17);
        # the analytic path wrote 2.7e-7 where autograd wrote 0, and Adam made either a full step.
        # A forward-mode dual (under no_grad() too) takes it as well
        if torch.compiler.is_compiling():  # dynamo traces no Function with a jvp (fullgraph=True raised)
            return _sigmoid_value_with_exact_tail(raw, self._lo, span, inside)
        if transformed:
            return _ExactSigmoidFunc.apply(raw, self._lo, span, inside)
        return _ExactSigmoid.apply(raw, self._lo, span, inside)

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        raw = _raw(self, raw, "derivative")
        self._check_width(raw.dtype, "derivative")
        return _sigmoid_derivative(raw, self._hi - self._lo)

    def _check_width(self, dtype: torch.dtype, method: str) -> None:
        """Raise a ``ValueError`` where the range's width overflows ``dtype``'s arithmetic: in float32
        ``SigmoidMapping(-3e38, 3e38)`` gave every raw value the upper bound without grad, NaN with it
        (``inf - inf``), and an infinite derivative."""
        if dtype in self._too_wide:
            raise ValueError(f"{self!r}.{method}(): the range's width hi - lo = {self._hi - self._lo:g} overflows "
                             f"{dtype}'s arithmetic (float32's, largest {torch.finfo(torch.float32).max:g}): its "
                             "values and derivative would be infinite or NaN; use a narrower range or float64 "
                             "parameters")

    def solve(self, value: Number) -> torch.Tensor:
        value, dtype = _as_float_tensor(value)
        if not bool(((value > self.lo) & (value < self.hi)).all()):
            raise ValueError(
                f"SigmoidMapping.solve(): value {value.tolist()} is outside the open range "
                f"({self.lo}, {self.hi}); widen the range or choose another start value"
            )
        # both differences are exact next to their bound and positive inside (no 1 - q to round)
        return (torch.log(value - self.lo) - torch.log(self.hi - value)).to(dtype)

    def __repr__(self) -> str:
        return f"SigmoidMapping({self.lo}, {self.hi})"


class ExpMapping(Mapping):
    """A positive parameter such as a scale: ``p = exp(r)``, ``m'(r) = exp(r)``, ``m^{-1}(p) = log p``.

    Gives equal steps in ``r`` equal *relative* changes of ``p``; a value
    ``p <= 0`` raises ``ValueError``.  ``forward`` and ``derivative`` are not
    guarded: they overflow to ``inf`` above ``r ~ 88.7`` in float32 (709.8 in
    float64) and underflow to 0 below ``r ~ -103`` (-745), where an optimiser
    has long diverged.
    """

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp(_raw(self, raw, "forward"))

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp(_raw(self, raw, "derivative"))

    def solve(self, value: Number) -> torch.Tensor:
        value, dtype = _as_float_tensor(value)
        if not bool((value > 0).all()):
            raise ValueError(f"ExpMapping.solve(): value {value.tolist()} must be positive")
        return torch.log(value).to(dtype)


def _sigmoid_value(raw: torch.Tensor, lo: float, span: float, inside: Optional[tuple]) -> torch.Tensor:
    """``lo + span sigmoid(raw)``, clamped to ``inside`` (the dtype's values strictly inside the range);
    ``lo``, ``span`` and the bounds numbers, or rows of several mappings (:func:`_sigmoid_values_at_once`)."""
    value = lo + span * torch.sigmoid(raw)
    return value if inside is None else value.clamp(*inside)


def _sigmoid_derivative(raw: torch.Tensor, span: float) -> torch.Tensor:
    """``m'(r) = span sigmoid(r) sigmoid(-r)``: ``s (1 - s)`` was 0 from ``r = 17`` in float32 (off by
    4.6e-4 at ``r = 10``); this is accurate on both sides, and its own derivative by autograd too.
    ``span`` a number, or a row of several mappings' (:func:`_sigmoid_derivatives_at_once`)."""
    return span * torch.sigmoid(raw) * torch.sigmoid(-raw)


def _sigmoid_value_with_exact_tail(raw: torch.Tensor, lo: float, span: float, inside: Optional[tuple]) -> torch.Tensor:
    """:func:`_sigmoid_value` with the exact derivative by plain operations, for a graph dynamo traces: the
    distance to the nearer bound, ``span sigmoid(-|r|)``, has an accurate derivative on both sides (and
    second derivative); added as ``tail - tail = 0`` exactly, it leaves the value as it is, to the last bit."""
    tail = torch.where(raw < 0, span * torch.sigmoid(raw), -span * torch.sigmoid(-raw))
    return _sigmoid_value(raw, lo, span, inside).detach() + (tail - tail.detach())


class _ExactSigmoid(torch.autograd.Function):
    """:meth:`SigmoidMapping.forward` where a derivative is wanted: the value :func:`_sigmoid_value`, to the
    last bit; the derivative (backward and forward mode) the exact :func:`_sigmoid_derivative`, formed
    only when one is asked for, and differentiable again (a second derivative).  The value's own ops
    and their backward, clamp's 0 included, are not recorded: the earlier exact derivative, an added
    ``tail - tail`` of ten recorded ops, made a mapping's forward 3x and the seed's autograd step at
    192 x 256 15 % slower.  (``ctx`` in ``forward``: ``apply`` binds the arguments by
    ``inspect.signature`` for a Function with ``setup_context``, a third of the forward's time.)"""

    @staticmethod
    def forward(ctx, raw, lo, span, inside):
        ctx.span = span
        ctx.save_for_backward(raw)
        ctx.save_for_forward(raw)
        return _sigmoid_value(raw, lo, span, inside)

    @staticmethod
    def backward(ctx, grad):
        (raw,) = ctx.saved_tensors
        return grad * _sigmoid_derivative(raw, ctx.span), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        (raw,) = ctx.saved_tensors
        return tangent * _sigmoid_derivative(raw, ctx.span)


class _ExactSigmoidFunc(torch.autograd.Function):
    """:class:`_ExactSigmoid` for torch.func's transforms (``grad``, ``jacfwd``, ``vmap``, ...), which
    take a Function with ``setup_context`` only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(raw, lo, span, inside):
        return _sigmoid_value(raw, lo, span, inside)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.span = inputs[2]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    backward = _ExactSigmoid.backward
    jvp = _ExactSigmoid.jvp


def _sigmoid_rows(mappings: Sequence[Mapping], like: torch.Tensor) -> Optional[tuple[torch.Tensor, ...]]:
    """For ``SigmoidMapping`` s alone (not a subclass: one may have its own ``forward``), in a dtype
    whose arithmetic holds their widths: ``(lo, span, lower, upper)``, each ``(P,)`` in ``like``'s
    dtype and device, their bounds, widths and clamps (kept, :func:`tireg._device.cached`); else ``None``.

    With them :func:`_sigmoid_values_at_once` and :func:`_sigmoid_derivatives_at_once` form P mappings' values or
    derivatives in one pass of each operation, with the same numbers: a Python number in an
    operation with a float32 or float64 tensor is rounded to the tensor's dtype, as these rows are.
    A seed-style model maps its four parameters so, each through four or five operations of its own."""
    dtype = like.dtype
    if dtype not in (torch.float32, torch.float64) or not all(type(mapping) is SigmoidMapping for mapping in mappings):
        return None
    if any(dtype in mapping._too_wide for mapping in mappings):
        return None  # their own forward and derivative say so
    key = ("sigmoid rows", tuple((mapping._lo, mapping._hi) for mapping in mappings))

    def make() -> tuple[torch.Tensor, ...]:
        rows = ([mapping._lo for mapping in mappings], [mapping._hi - mapping._lo for mapping in mappings],
                [mapping._inside[dtype][0] for mapping in mappings], [mapping._inside[dtype][1] for mapping in mappings])
        return tuple(torch.tensor(row, dtype=dtype, device=like.device) for row in rows)

    return cached(key, dtype, like.device, make)


def _sigmoid_values_at_once(raw: torch.Tensor, rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``forward`` of P sigmoid mappings at once: ``raw`` ``(..., P)``, ``rows`` from :func:`_sigmoid_rows`;
    the values without a derivative (no autograd node: for a step that forms none)."""
    lo, span, lower, upper = rows
    return _sigmoid_value(raw, lo, span, (lower, upper))


def _sigmoid_derivatives_at_once(raw: torch.Tensor, rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``derivative`` of P sigmoid mappings at once, as :func:`_sigmoid_values_at_once` their values."""
    return _sigmoid_derivative(raw, rows[1])


def _open_range(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    """The smallest and the largest value of ``dtype`` strictly inside ``(lo, hi)``: the neighbours
    of ``lo`` and ``hi`` rounded to ``dtype``, towards each other (strictly inside in exact arithmetic
    too: a bound rounded outward has the bound itself between it and its neighbour)."""
    bounds = torch.tensor([lo, hi], dtype=dtype)
    lower, upper = torch.nextafter(bounds, bounds.flip(0)).tolist()
    return lower, upper


def mapping_state(mapping: Mapping) -> Optional[tuple]:
    """A built-in mapping as plain data for a state dict, ``(name, *arguments)``; ``None`` for a
    mapping of one's own (an arbitrary object would not load with ``weights_only=True``)."""
    kind = type(mapping)
    if kind is IdentityMapping:
        return ("identity",)
    if kind is ExpMapping:
        return ("exp",)
    if kind is SigmoidMapping:
        return ("sigmoid", mapping.lo, mapping.hi)
    return None


def mapping_from_state(state: Sequence) -> Mapping:
    """The mapping that :func:`mapping_state` described."""
    name, *arguments = state
    makers = {"identity": IdentityMapping, "exp": ExpMapping, "sigmoid": SigmoidMapping}
    if name not in makers:
        raise ValueError(f"unknown mapping {name!r} in a saved state; expected one of {sorted(makers)}")
    return makers[name](*arguments)
