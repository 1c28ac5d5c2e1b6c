"""The seed document's names, so that its snippets run verbatim after one line::

    from tireg.compat import PerPixelLoss, AffyModel, AffyModelAnal, Affy, Mapping

Each name is a namespace holding what the seed's module of that name held.
They are thin aliases of tireg's own functions and classes; new code should
use those (:mod:`tireg.transforms`, :mod:`tireg.models`, ...).
"""

from __future__ import annotations

import math
from functools import reduce
from types import SimpleNamespace
from typing import Optional, Union

import numpy as np
import torch

from . import losses as _losses
from ._device import cached
from . import mappings as _mappings
from . import models as _models
from ._validation import FLOAT_DTYPES, broadcast_shape, finite_number
from .transforms import (
    _anisotropic_similarity_derivative,
    _anisotropic_similarity_derivative_of_values,
    anisotropic_similarity_matrix,
)

__all__ = ["PerPixelLoss", "AffyModel", "AffyModelAnal", "Affy", "Mapping"]

#: A number (Python or NumPy), an array of numbers, or a real tensor.
Scalar = Union[float, np.ndarray, torch.Tensor]


#: The largest finite value of each result dtype: a number above it may round to infinity there.
_LARGEST = {dtype: torch.finfo(dtype).max for dtype in FLOAT_DTYPES}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _as_number_array(value, name: str, caller: str, dtype: torch.dtype) -> np.ndarray:
    """A non-tensor argument as a finite real NumPy array of the result ``dtype`` (converted once,
    from what was given, never through float32 for a float64 result)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # a ragged list
        array = None
    if array is None or array.dtype.kind not in "iuf":  # not bool: True is no angle
        shown = repr(value) if isinstance(value, (bool, np.bool_, str, bytes)) else type(value).__name__
        raise TypeError(f"{caller}: '{name}' must be a number, an array of numbers or a real tensor; got {shown}")
    if not np.isfinite(array).all():
        if array.ndim == 0:
            finite_number(array, name, caller)  # raises, saying the value
        raise ValueError(f"{caller}: '{name}' holds NaN or Inf values")
    return _in_range(array, name, caller, dtype)


def _in_range(array: np.ndarray, name: str, caller: str, dtype: torch.dtype) -> np.ndarray:
    """``array`` (finite) converted to ``dtype`` on the host; raise a ``ValueError`` naming the argument
    where a value is beyond the dtype's range: 1e39 had become inf in float32, and the matrix held inf
    and NaN, though every argument given was finite."""
    with np.errstate(over="ignore"):  # the overflow is refused below, by name
        converted = array.astype(_NUMPY_DTYPES[dtype], copy=False)
    if not np.isfinite(converted).all():
        kind = str(dtype).replace("torch.", "")
        subject = f"'{name}' is {array}, beyond" if array.ndim == 0 else f"'{name}' holds values beyond"
        raise ValueError(f"{caller}: {subject} the range of {kind}, the result's dtype (at most "
                         f"{_LARGEST[dtype]:.3g} in magnitude); give it as a float64 tensor for a float64 result")
    return converted


def _arguments(caller: str, **values: Scalar) -> dict[str, torch.Tensor]:
    """The arguments as tensors of one dtype, on one device, broadcast to one shape.

    The dtype is that of the floating-point tensor arguments, promoted as torch does (float64 if
    any is float64); with none, the default dtype.  Numbers and arrays are converted straight into
    it: a float64 angle with a Python-float centre had gone through a float32 centre (5e-6 px off
    at 1000 px), and a float64 centre with Python-float parameters had given a float32 matrix.
    Tensor values are not read (no wait for a GPU); a number's are, on the host, and one that is
    beyond the result dtype's range (1e39 in float32) is refused by name.  Called in every step of a
    seed-style model (its matrix and each derivative): the common case, tensors and Python
    numbers, takes no NumPy round trip.
    """
    floats = []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"{caller}: '{name}' must hold real numbers; got a tensor of {value.dtype}")
            if value.is_floating_point():
                floats.append(value.dtype)
    dtype = reduce(torch.promote_types, floats) if floats else torch.get_default_dtype()
    if dtype not in FLOAT_DTYPES:  # float16 or bfloat16 alone: no tireg function computes in those
        name = next((name for name, value in values.items() if isinstance(value, torch.Tensor)
                     and value.dtype == dtype), None)
        subject = f"'{name}'" if name else "the default dtype"
        raise TypeError(f"{caller}: {subject} must be float32 or float64; got {dtype}")

    # A 0-d CPU tensor goes with a tensor on any device, as in torch's own arithmetic.
    placed = {name: value.device for name, value in values.items()
              if isinstance(value, torch.Tensor) and (value.dim() > 0 or value.device.type != "cpu")}
    device = next(iter(placed.values()), None)
    for name, where in placed.items():
        if where != device:
            first = next(iter(placed))
            raise ValueError(f"{caller}: '{name}' is on {where} but '{first}' is on {device}; "
                             "give all tensors on one device")

    converted = []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            converted.append(value.to(dtype=dtype, device=device))  # the same tensor where nothing changes
        elif type(value) in (int, float):  # the common case: no NumPy round trip
            number = finite_number(value, name, caller)
            if abs(number) > _LARGEST[dtype]:  # rare: may round to infinity in dtype (checked on the host)
                _in_range(np.asarray(number), name, caller, dtype)
            converted.append(torch.tensor(number, dtype=dtype, device=device))
        else:
            converted.append(torch.as_tensor(_as_number_array(value, name, caller, dtype), device=device))
    try:
        return dict(zip(values, torch.broadcast_tensors(*converted)))
    except RuntimeError:  # name the two arguments whose shapes do not broadcast
        shapes = {name: tuple(tensor.shape) for name, tensor in zip(values, converted)}
        for index, (name, shape) in enumerate(shapes.items()):
            for other in list(shapes)[:index]:
                try:
                    broadcast_shape(shapes[other], shape)
                except ValueError:
                    raise ValueError(f"{caller}: the shapes of '{other}' {shapes[other]} and '{name}' {shape} "
                                     "do not broadcast") from None
        raise


def _common_case(params: tuple, cx, cy) -> Optional[torch.Tensor]:
    """The centre ``(2,)`` for a seed-style model's call, or ``None`` for any other: parameters that
    are float32 or float64 tensors of one shape, dtype and device (``self.get(i)``), a centre of
    Python numbers (``self.cx``), finite and within the dtype's range.  With it the results are
    :func:`_arguments`'s, without its work per argument: the centre is made once (:func:`cached`;
    read only), the parameters are taken as they are.  The seed's analytic model makes four calls
    a step, and the general path had taken half of each."""
    first = params[0]
    if not isinstance(first, torch.Tensor) or type(cx) not in (int, float) or type(cy) not in (int, float):
        return None
    dtype, device, shape = first.dtype, first.device, first.shape
    if dtype not in _NUMPY_DTYPES:
        return None
    for value in params[1:]:
        if not (isinstance(value, torch.Tensor) and value.dtype == dtype and value.device == device
                and value.shape == shape):
            return None
    if not (math.isfinite(cx) and math.isfinite(cy) and abs(cx) <= _LARGEST[dtype] and abs(cy) <= _LARGEST[dtype]):
        return None  # the general path names it
    return cached(("seed centre", float(cx), float(cy)), dtype, device,
                  lambda: torch.tensor([cx, cy], dtype=dtype, device=device))


def _params_and_center(caller: str, angle, scalex, scaley, dx, dy, cx, cy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., 5)`` parameters and ``(..., 2)`` centre, of one dtype and device."""
    params = (angle, scalex, scaley, dx, dy)
    center = _common_case(params, cx, cy)
    if center is not None:
        return torch.stack(params, dim=-1), center.expand(*angle.shape, 2)
    return _general_params_and_center(caller, angle, scalex, scaley, dx, dy, cx, cy)


def _general_params_and_center(caller: str, angle, scalex, scaley, dx, dy, cx, cy) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_params_and_center` by :func:`_arguments`, for any call."""
    tensors = _arguments(caller, angle=angle, scalex=scalex, scaley=scaley, dx=dx, dy=dy, cx=cx, cy=cy)
    values = list(tensors.values())
    return torch.stack(values[:5], dim=-1), torch.stack(values[5:], dim=-1)


def get_matrix(
    angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar
) -> torch.Tensor:
    """The seed's ``Affy.get_matrix``: OpenCV's ``getRotationMatrix2D`` about ``(cx, cy)``
    (angle in radians, per-axis scale) plus the shift ``(dx, dy)``;
    :func:`tireg.transforms.anisotropic_similarity_matrix`.

    Each argument is a number, an array or a real tensor; they broadcast to a batch ``(...)`` and
    the result is ``(..., 3, 3)``, float64 if any tensor argument is float64, else float32 (the
    default dtype), on the tensors' device.

    Raises:
        TypeError: an argument that is not a real number, array or tensor (naming it), or float16 alone.
        ValueError: a NaN or infinite number, a number beyond the range of the result's dtype (1e39
            with a float32 result), shapes that do not broadcast, tensors on two devices.
    """
    params, center = _params_and_center("Affy.get_matrix()", angle, scalex, scaley, dx, dy, cx, cy)
    return anisotropic_similarity_matrix(params, center)


def _untracked_common_case(params: tuple, cx, cy) -> Optional[torch.Tensor]:
    """:func:`_common_case` for a derivative's short path, where autograd records nothing: that path
    does not touch the parameters a derivative does not depend on (``dx``, ``dy``; a scale), and
    ``autograd.grad`` through such a call raised "appears to not have been used in the graph" where
    the general path gives those parameters zeros.  The seed's step runs under ``no_grad``."""
    if torch.is_grad_enabled() and any(isinstance(value, torch.Tensor) and value.requires_grad for value in params):
        return None
    return _common_case(params, cx, cy)


def _derivative(index: int, caller: str, angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:
    center = _untracked_common_case((angle, scalex, scaley, dx, dy), cx, cy)
    if center is not None:  # the seed's call: the values as they are, in a few operations
        return _anisotropic_similarity_derivative_of_values(angle, scalex, scaley, center, index)
    params, center = _general_params_and_center(caller, angle, scalex, scaley, dx, dy, cx, cy)
    return _anisotropic_similarity_derivative(params, center, index)  # the one asked for, not all five


def da(
    angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar
) -> torch.Tensor:
    """``dA/d angle`` of :func:`get_matrix`: ``[R'(angle) S | -R'(angle) S c]``, ``R'`` the rotation's
    derivative, ``S = diag(scalex, scaley)``, ``c = (cx, cy)``; bottom row 0."""
    return _derivative(0, "Affy.da()", angle, scalex, scaley, dx, dy, cx, cy)


def dsx(
    angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar
) -> torch.Tensor:
    """``dA/d scalex`` of :func:`get_matrix`: ``[r0 0 | -r0 cx]``, ``r0`` the rotation's column 0; bottom row 0."""
    return _derivative(1, "Affy.dsx()", angle, scalex, scaley, dx, dy, cx, cy)


def dsy(
    angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar
) -> torch.Tensor:
    """``dA/d scaley`` of :func:`get_matrix`: ``[0 r1 | -r1 cy]``, ``r1`` the rotation's column 1; bottom row 0."""
    return _derivative(2, "Affy.dsy()", angle, scalex, scaley, dx, dy, cx, cy)


def dx(
    angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar
) -> torch.Tensor:  # noqa: D417 - the seed's names
    """``dA/d dx`` of :func:`get_matrix`: 1 at ``(0, 2)``, 0 elsewhere."""
    return _derivative(3, "Affy.dx()", angle, scalex, scaley, dx, dy, cx, cy)


def dy(
    angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar
) -> torch.Tensor:
    """``dA/d dy`` of :func:`get_matrix`: 1 at ``(1, 2)``, 0 elsewhere."""
    return _derivative(4, "Affy.dy()", angle, scalex, scaley, dx, dy, cx, cy)


def ds(angle: Scalar, scale: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar) -> torch.Tensor:
    """``dA/d scale`` of ``get_matrix(angle, scale, scale, dx, dy, cx, cy)``: ``dsx + dsy`` at
    ``scalex = scaley``, ``[R | -R c]`` (bottom row 0)."""
    center = _untracked_common_case((angle, scale, dx, dy), cx, cy)
    if center is not None:  # the seed's call
        return _anisotropic_similarity_derivative_of_values(angle, scale, scale, center, 5)
    tensors = _arguments("Affy.ds()", angle=angle, scale=scale, dx=dx, dy=dy, cx=cx, cy=cy)
    angle, scale, dx, dy, cx, cy = tensors.values()
    return _anisotropic_similarity_derivative(torch.stack([angle, scale, scale, dx, dy], dim=-1),
                                              torch.stack([cx, cy], dim=-1), 5)


Affy = SimpleNamespace(get_matrix=get_matrix, da=da, dx=dx, dy=dy, ds=ds, dsx=dsx, dsy=dsy)
PerPixelLoss = SimpleNamespace(
    PerPixelLoss=_losses.PerPixelLoss,
    PerPixel_CauchyLoss=_losses.CauchyLoss,
    PerPixel_L2Loss=_losses.L2Loss,
)
AffyModel = SimpleNamespace(AffineModel=_models.AffineModel)
AffyModelAnal = SimpleNamespace(AffineModelAnalytic=_models.AffineModelAnalytic)
Mapping = SimpleNamespace(
    Mapping=_mappings.Mapping,
    IdentityMapping=_mappings.IdentityMapping,
    SigmoidMapping=_mappings.SigmoidMapping,
    ExpMapping=_mappings.ExpMapping,
)
