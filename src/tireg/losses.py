"""Per-pixel costs ``rho(x - y)`` that return their own derivative.

A per-pixel loss compares the warped moving image ``x`` with the fixed image
``y`` pixel by pixel.  ``forward(x, y)`` returns the per-pixel loss (same
shape as ``x``), and ``forward(x, y, gradient=True)`` returns
``(loss, dloss/dx)``: the derivative that the analytic gradient path
multiplies with the moving image's gradient (the seed's ``C'``).  A model's
cost (and :func:`tireg.analytic.cost_and_gradient`'s) is the sum over pixels
and channels; :func:`tireg.register`'s is the mean over the valid pixels and
channels.

Write your own by subclassing :class:`PerPixelLoss` and implementing
``forward(x, y, gradient=False)``, as in the seed.  With ``r = x - y``:

=================  ======================================  ==========================================
loss               rho(r)                                  rho'(r)
=================  ======================================  ==========================================
L2Loss             r^2                                     2 r
CauchyLoss(c)      log(1 + (r/c)^2)                        2 r / (c^2 + r^2)
L1Loss             |r|                                     sign(r)
CharbonnierLoss    sqrt(r^2 + eps^2)                       r / sqrt(r^2 + eps^2)
HuberLoss(delta)   r^2/2 if |r| <= delta,                  clamp(r, -delta, delta)
                   delta (|r| - delta/2) otherwise
GemanMcClureLoss   r^2 / (r^2 + c^2)                       2 r c^2 / (r^2 + c^2)^2
=================  ======================================  ==========================================

Cauchy, Charbonnier, Huber and Geman-McClure are evaluated in forms chosen for floating point (their
docstrings say which, and where a value still overflows): precise for small ``r``, with
derivatives (analytic, and Huber's through autograd) finite for every finite ``r`` over the
settings' whole accepted range, in float32 too.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Union

import torch
from torch import nn

from ._validation import broadcast_shape, check_flag, checked_derivative, finite_number, real_number, user_stacklevel

__all__ = [
    "PerPixelLoss",
    "L2Loss",
    "CauchyLoss",
    "L1Loss",
    "CharbonnierLoss",
    "HuberLoss",
    "GemanMcClureLoss",
    "LOSSES",
    "get_loss",
]

LossOutput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class PerPixelLoss(nn.Module):
    """Base class of per-pixel losses: ``forward(x, y, gradient=False)``.

    Returns the per-pixel loss ``rho(x, y)``, or ``(rho, d rho / d x)`` when
    ``gradient`` is true (a bool: ``TypeError`` otherwise); both have ``x``'s shape.  Subclasses that depend on
    ``r = x - y`` only may implement :meth:`residual` instead.  For float16 and
    bfloat16 images, ``r`` and :meth:`residual` are evaluated in float32 and the results
    returned in the images' dtype: a setting's square (``eps^2 = 1e-12``, ``c^2 = 1e-8``) is 0
    in float16, and Charbonnier's ``rho'(0)`` and Geman-McClure's ``rho(0)`` were ``0 / 0``.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = check_flag(gradient, "gradient", f"{type(self).__name__}()")  # "no" was taken for true
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise TypeError(
                f"{type(self).__name__}(): x and y must be tensors; got {type(x).__name__} and {type(y).__name__}")
        if not (x.is_floating_point() and y.is_floating_point()):  # an integer x - y wraps around
            raise TypeError(f"{type(self).__name__}(): x and y must be floating point; got {x.dtype} and {y.dtype}")
        if x.shape != y.shape and not _broadcasts_to(y.shape, x.shape):  # the result has x's shape
            raise ValueError(f"{type(self).__name__}(): y {tuple(y.shape)} must have x's shape {tuple(x.shape)} "
                             "(or broadcast to it)")
        if x.device != y.device and y.dim() > 0:  # torch's words named neither (a 0-d y may stay on the CPU)
            raise ValueError(f"{type(self).__name__}(): x and y must be on one device; got {x.device} and {y.device}")
        dtype = torch.promote_types(x.dtype, y.dtype)
        if dtype not in _HALF:
            return self.residual(x - y, gradient)
        return _in_dtype(self.residual(x.float() - y.float(), gradient), dtype, gradient)

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        """``rho(r)``, or ``(rho(r), rho'(r))`` when ``gradient``.  The built-in losses take a
        floating-point tensor ``r`` and a bool ``gradient`` only (``TypeError`` otherwise)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward() or residual()")


def _checked_residual(loss: PerPixelLoss, r, gradient) -> bool:
    """A built-in loss's :meth:`~PerPixelLoss.residual` arguments: ``r`` a floating-point tensor (a list
    raised "can't multiply sequence by non-int", a complex ``r`` gave complex losses), ``gradient`` a
    bool; returns ``gradient``.  Types and a dtype only (no value read): ``forward`` and the
    compiled kernel pass through it with no graph break."""
    caller = f"{type(loss).__name__}.residual()"
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{caller}: 'r' must be a torch.Tensor; got {type(r).__name__}")
    if not r.is_floating_point():
        raise TypeError(f"{caller}: 'r' must be a floating-point tensor; got {r.dtype}")
    return check_flag(gradient, "gradient", caller)


#: Evaluated in float32 (:meth:`PerPixelLoss.forward`, and the residuals whose settings are squared).
_HALF = (torch.float16, torch.bfloat16)


def _in_float32(residual: Callable[[torch.Tensor, bool], LossOutput], r: torch.Tensor, gradient: bool) -> LossOutput:
    """``residual`` of a float16 or bfloat16 ``r`` evaluated in float32 and returned in ``r``'s dtype:
    a setting's square (``eps^2``, ``c^2``) is 0 there, and the caps near the dtype's largest value
    (128 in float16) fell inside the residuals' ordinary range (Charbonnier's ``rho'(0)`` was NaN
    with ``eps = 1e-4``, ``rho(200)`` 128)."""
    return _in_dtype(residual(r.float(), gradient), r.dtype, gradient)


def _in_dtype(result: LossOutput, dtype: torch.dtype, gradient: bool) -> LossOutput:
    """A residual's ``rho``, or ``(rho, rho')`` with ``gradient``, in ``dtype``."""
    return tuple(value.to(dtype) for value in result) if gradient else result.to(dtype)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return broadcast_shape(shape, target) == tuple(target)
    except ValueError:
        return False


def loss_and_derivative(loss: PerPixelLoss, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss(x, y, True)``, checked: a loss of one's own must return ``(rho, rho')``, both of ``x``'s
    shape (a summed derivative broadcast silently, and register converged to a wrong answer), its
    ``rho'`` the derivative of its ``rho`` (:func:`check_derivative`, once per loss)."""
    result = loss(x, y, True)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{type(loss).__name__}.forward(x, y, gradient=True) must return (loss, derivative); "
                        f"got {type(result).__name__}")
    per_pixel, derivative = result
    if not (isinstance(per_pixel, torch.Tensor) and isinstance(derivative, torch.Tensor)):
        raise TypeError(f"{type(loss).__name__}.forward(x, y, gradient=True) must return two tensors; "
                        f"got {type(per_pixel).__name__} and {type(derivative).__name__}")
    if per_pixel.shape != x.shape or derivative.shape != x.shape:
        raise ValueError(f"{type(loss).__name__}.forward(x, y, gradient=True) must return the loss and its "
                         f"derivative per pixel, of x's shape {tuple(x.shape)}; got {tuple(per_pixel.shape)} "
                         f"and {tuple(derivative.shape)}")
    if per_pixel.dtype != x.dtype or derivative.dtype != x.dtype:  # the sampler's kernel raised on a mix
        raise TypeError(f"{type(loss).__name__}.forward(x, y, gradient=True) must return the loss and its "
                        f"derivative in x's dtype {x.dtype}; got {per_pixel.dtype} and {derivative.dtype}")
    check_derivative(loss)
    return per_pixel, derivative


_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # a loss -> the (dtype, channels) it passed
_DERIVATIVE_CHECKED: "weakref.WeakSet" = weakref.WeakSet()  # the losses of one's own check_derivative has seen


def check_derivative(loss: PerPixelLoss) -> None:
    """Once per loss of one's own: its ``rho'(x, y)`` against a float64 central difference of its
    ``rho`` in ``x``, on a probe of 17 differences from -2.25 to 1.75.

    The analytic gradient is ``sum rho' dM/dp``: a derivative that is not ``rho``'s is the
    gradient of another function than the cost.  Where it is a constant positive multiple of it
    (the seed's Cauchy loss, ``r / (1 + r^2)`` for ``2 r / (1 + r^2)``: half), the gradient of the
    same cost scaled, it warns, naming the factor (the seed's code runs unchanged: Adam does not
    see a scale, SGD runs at that multiple of its rate); otherwise it raises ``ValueError``.  Points
    where the one-sided differences disagree (a kink: L1 at 0) are left out; a loss that cannot
    take the probe (float64, ``(1, 1, 1, 17)``) is not checked."""
    if type(loss) in _BUILT_IN or loss in _DERIVATIVE_CHECKED:
        return
    ratio = _derivative_ratio(loss)
    if ratio is None or ratio.numel() == 0 or float((ratio - 1).abs().max()) <= 1e-3:
        _DERIVATIVE_CHECKED.add(loss)
        return
    name = type(loss).__name__
    factor = float(ratio.mean())
    if factor > 0 and float((ratio - factor).abs().max()) <= 1e-3 * factor:
        _DERIVATIVE_CHECKED.add(loss)  # told once; a refused one is refused again
        warnings.warn(f"{name}.forward(x, y, gradient=True) returns {factor:.4g} times the derivative of its loss "
                      "(a central difference of forward(x, y) in x): the analytic gradient is the cost's scaled by "
                      f"{factor:.4g} (the seed's Cauchy loss, (x - y) / (1 + (x - y)^2), is half of 2 (x - y) / "
                      "(1 + (x - y)^2)); Adam does not see a scale, SGD's and L-BFGS's steps do",
                      UserWarning, stacklevel=user_stacklevel())
        return
    raise ValueError(f"{name}.forward(x, y, gradient=True) does not return the derivative of its loss in x: against "
                     f"a central difference of forward(x, y), its ratio runs from {float(ratio.min()):.4g} to "
                     f"{float(ratio.max()):.4g} on differences x - y from -2.25 to 1.75; the analytic gradient would "
                     "be that of another function than the cost")


def _derivative_ratio(loss: PerPixelLoss) -> Optional[torch.Tensor]:
    """:func:`check_derivative`'s probe: ``rho'`` over the central difference of ``rho`` where that is
    clean (:func:`~tireg._validation.checked_derivative`); ``None`` where the loss cannot take it."""
    x = torch.linspace(-2.0, 2.0, 17, dtype=torch.float64).reshape(1, 1, 1, 17)
    y = torch.full_like(x, 0.25)
    pairs = checked_derivative(lambda at: loss(at, y), lambda at: loss(at, y, True)[1], x)
    return None if pairs is None else pairs[0] / pairs[1]


def verified(loss: PerPixelLoss, dtype: torch.dtype = torch.float32, channels: int = 1) -> PerPixelLoss:
    """``loss``, its ``(rho, rho')`` contract tried once (a dtype and channel count) on two small
    images of ``channels`` channels (:func:`loss_and_derivative`).

    For a path that calls the loss where the check cannot run (the compiled kernel, which took a
    summed derivative without a word); a built-in loss needs no trial.  Two pairs, so that a
    derivative reduced over the pairs (``mean(0, keepdim=True)``) is refused too; the images'
    channels (a loss written for grey images works on them) and dtype (a derivative in another
    one is refused).
    """
    key = (dtype, int(channels))
    if type(loss) in _BUILT_IN or key in _VERIFIED.get(loss, ()):
        return loss
    probe = torch.linspace(0.0, 1.0, 8 * key[1], dtype=dtype).reshape(2, key[1], 2, 2)
    loss_and_derivative(loss, probe, probe.flip(-1))
    _VERIFIED.setdefault(loss, set()).add(key)
    return loss


def _positive(value: float, name: str, caller: str) -> float:
    """``value`` as a ``float`` from 1e-15 to 1e15: a number (not a bool or a string: CauchyLoss("abc")
    raised float()'s own message, which named neither, and ``True`` was 1), finite (an ``int`` beyond
    float64's range raised a bare ``OverflowError``: :func:`tireg._validation.finite_number` names them)."""
    number = real_number(value)
    if number is None or isinstance(value, int):  # not a number, or an int (perhaps beyond float64's range)
        number = finite_number(value, name, caller)
    value = number
    if not 1e-15 <= value <= 1e15:  # its square must stay inside float32: beyond, NaN losses or derivatives
        raise ValueError(f"{caller}: '{name}' must be positive and finite, from 1e-15 to 1e15; got {value}")
    return value


class L2Loss(PerPixelLoss):
    """``rho(r) = r^2``, ``rho'(r) = 2 r``."""

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = _checked_residual(self, r, gradient)
        loss = r * r
        return (loss, 2.0 * r) if gradient else loss


def constant_irls_weight(loss: PerPixelLoss) -> Optional[float]:
    """The IRLS weight ``rho'(r) / r`` where it is one number for every ``r`` (L2: 2), else ``None``.

    Gauss-Newton's normal matrix weighs each pixel by it; where it is constant the weight
    image is the pixel weight times that number, with no division by the residual.  Only
    L2's own ``forward`` and ``residual`` qualify (a subclass that changes them changes rho).
    """
    kind = type(loss)
    if isinstance(loss, L2Loss) and kind.forward is PerPixelLoss.forward and kind.residual is L2Loss.residual:
        return 2.0
    return None


class CauchyLoss(PerPixelLoss):
    """Cauchy (Lorentzian) loss ``rho(r) = log(1 + (r/c)^2)``, ``rho'(r) = 2 r / (c^2 + r^2)``.

    At ``scale = 1`` this is the seed's loss, whose derivative the seed
    wrote as ``r / (1 + r^2)``, half the true value.

    Evaluated with ``u = r / c`` as ``rho = log1p(u^2)`` (``log((c^2 + r^2) / c^2)`` was 0 for
    ``|r| <= 1e-3 c`` in float32) and ``rho' = r / (1 + u^2) * (2 / c^2)``, which is finite for
    every finite ``r`` (``2 r / (c^2 + r^2)`` was NaN where ``2 r`` overflowed, and 0 where
    ``c^2 + r^2`` did).  Where ``u^2`` overflows (``|r / c| > 1.8e19`` in float32) ``rho`` is
    ``inf`` and ``rho'`` 0, its limit; at ``r = +-inf`` too, with ``r`` first clamped to the dtype's
    largest value (``inf / inf`` was NaN there: ``x - y`` of two finite images overflows beyond
    ``3.4e38`` in float32).
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = _positive(scale, "scale", "CauchyLoss()")

    def extra_repr(self) -> str:  # CauchyLoss(scale=0.3), not CauchyLoss()
        return f"scale={self.scale}"

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = _checked_residual(self, r, gradient)
        if r.dtype in _HALF:
            return _in_float32(self.residual, r, gradient)
        r = r.clamp(-torch.finfo(r.dtype).max, torch.finfo(r.dtype).max)  # +-inf: rho inf, rho' 0 (not NaN)
        u = r / self.scale
        square = u * u
        loss = torch.log1p(square)
        return (loss, r / (1.0 + square) * (2.0 / (self.scale * self.scale))) if gradient else loss


class L1Loss(PerPixelLoss):
    """``rho(r) = |r|``, ``rho'(r) = sign(r)`` (0 at ``r = 0``, as autograd)."""

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = _checked_residual(self, r, gradient)
        loss = r.abs()
        return (loss, torch.sign(r)) if gradient else loss


class CharbonnierLoss(PerPixelLoss):
    """Smooth L1: ``rho(r) = sqrt(r^2 + eps^2)``, ``rho'(r) = r / sqrt(r^2 + eps^2)``.

    Evaluated with ``r`` capped at ``+-B``, half the square root of the dtype's largest value
    (``B = 9.2e18`` in float32; :class:`GemanMcClureLoss`'s cap), so that ``r^2 + eps^2`` stays
    finite: beyond, ``rho`` keeps its value at ``B`` and ``rho'`` is ``+-1``.  Uncapped, ``r^2``
    overflowed beyond ``|r| = 1.8e19`` in float32, where ``rho'`` came out 0 (not 1), and
    ``rho'(+-inf)`` was NaN.  (``hypot`` needs no cap, at three times the time of the loss.)
    """

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = _positive(eps, "eps", "CharbonnierLoss()")

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = _checked_residual(self, r, gradient)
        if r.dtype in _HALF:
            return _in_float32(self.residual, r, gradient)
        limit = _root_limit(r.dtype)
        r = r.clamp(-limit, limit)  # r^2 + eps^2 finite; NaN stays NaN
        loss = torch.sqrt(r * r + self.eps * self.eps)
        return (loss, r / loss) if gradient else loss


class HuberLoss(PerPixelLoss):
    """``rho(r) = r^2 / 2`` for ``|r| <= delta``, else ``delta (|r| - delta / 2)``; ``rho' = clamp(r, -delta, delta)``.

    Evaluated with ``k = clamp(r, -delta, delta)`` as ``rho = k (r - k / 2)``: the documented
    branches to the last bit (``r (r - r/2) = r^2 / 2`` inside, ``delta (|r| - delta/2)`` outside),
    and autograd through it gives ``k`` with no cancellation.  ``k^2 / 2 + delta (|r| - |k|)``
    had cancelled: autograd's derivative was 0 instead of 0.01 at ``r = 0.01``, ``delta = 1e6`` in
    float32.
    """

    def __init__(self, delta: float = 1.0):
        super().__init__()
        self.delta = _positive(delta, "delta", "HuberLoss()")

    def extra_repr(self) -> str:
        return f"delta={self.delta}"

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = _checked_residual(self, r, gradient)
        clipped = r.clamp(-self.delta, self.delta)
        loss = clipped * (r - 0.5 * clipped)
        return (loss, clipped) if gradient else loss


class GemanMcClureLoss(PerPixelLoss):
    """``rho(r) = r^2 / (r^2 + c^2)``, ``rho'(r) = 2 r c^2 / (r^2 + c^2)^2``: bounded, ignores outliers.

    Evaluated with ``d = r^2 + c^2`` as ``rho = r^2 / d`` and ``rho' = (r / d) 2 c^2 / d``, in that
    order: ``|r / d| <= 1 / (2 c)`` and ``(r / d) 2 c^2 = rho' d`` stay in range, where ``d^2``
    scales as ``c^4`` and under- or overflowed (NaN or inf derivatives in float32 for a small or
    large ``c``).  ``r`` is capped at ``+-B``, half the square root of the dtype's largest value
    (``B = 9.2e18`` in float32), so that ``d`` stays finite: beyond, ``rho`` is 1 to rounding (it
    was ``inf / inf = NaN`` from ``|r| = 1.8e19`` in float32) and ``rho'`` keeps its value at
    ``B``, at most ``2 c^2 / B^3`` (``4e-12`` of its peak ``0.65 / c`` at ``c = 1e15``).
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = _positive(scale, "scale", "GemanMcClureLoss()")

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def residual(self, r: torch.Tensor, gradient: bool = False) -> LossOutput:
        gradient = _checked_residual(self, r, gradient)
        if r.dtype in _HALF:
            return _in_float32(self.residual, r, gradient)
        c2 = self.scale * self.scale
        limit = _root_limit(r.dtype)
        r = r.clamp(-limit, limit)  # r^2 + c^2 finite; NaN stays NaN
        square = r * r
        denominator = square + c2
        loss = square / denominator
        return (loss, r / denominator * (2.0 * c2) / denominator) if gradient else loss


def _root_limit(dtype: torch.dtype) -> float:
    """``B``, half the square root of ``dtype``'s largest value: ``B^2 + c^2`` is finite for every accepted
    ``c`` (up to ``1e15``) in float32 and float64."""
    return torch.finfo(dtype).max ** 0.5 / 2


LOSSES: dict[str, type[PerPixelLoss]] = {
    "l2": L2Loss,
    "cauchy": CauchyLoss,
    "l1": L1Loss,
    "charbonnier": CharbonnierLoss,
    "huber": HuberLoss,
    "geman_mcclure": GemanMcClureLoss,
}
#: The built-in losses: their derivative's shape needs no trial (:func:`verified`).
_BUILT_IN = frozenset(LOSSES.values())


def get_loss(loss: Union[str, PerPixelLoss], caller: str = "get_loss()") -> PerPixelLoss:
    """A loss instance from a name in :data:`LOSSES` (default settings) or an instance (returned as is);
    otherwise a ``ValueError`` listing the names, its message starting with ``caller`` (the function
    that was given the loss)."""
    if isinstance(loss, PerPixelLoss):
        return loss
    if isinstance(loss, str) and loss.lower() in LOSSES:
        return LOSSES[loss.lower()]()
    raise ValueError(f"{caller}: unknown loss {loss!r}; choose one of {', '.join(map(repr, LOSSES))} "
                     "or a PerPixelLoss")
