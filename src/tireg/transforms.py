"""Affine transforms in pixel units: matrix builders and their parameter Jacobians.

Convention:
    Images are ``(B, C, H, W)``.  A point is ``(x, y)`` = (column, row) with
    pixel centres at the integers ``0 .. W-1`` and ``0 .. H-1``.  A transform is
    a homogeneous ``3 x 3`` matrix ``A`` in pixel units that maps a point of the
    **fixed** image to a point of the **moving** image, ``warped(x) = M(A x)``
    (ITK's direction).  Rotations and scalings act about a centre ``c``,
    by default the image centre ``((W-1)/2, (H-1)/2)``:

        A = [ L | c + t - L c ]        (x_moving = L (x_fixed - c) + c + t)

    The rotation is OpenCV's ``getRotationMatrix2D``::

        R(theta) = [[ cos theta, sin theta],
                    [-sin theta, cos theta]]

    in radians; with the y axis pointing down, ``theta > 0`` means that the
    moving image shows the fixed image turned counter-clockwise on screen.

Every builder takes parameters ``(..., P)`` and a centre ``(..., 2)``
(broadcast against each other), returns matrices ``(..., 3, 3)``, keeps the
parameters' dtype and device, and is differentiable by autograd.  Every
``*_jacobian`` returns ``dA/dp`` as ``(..., P, 3, 3)`` (last rows zero).

The single conversion between pixel matrices and ``grid_sample``'s
normalised frame is :func:`normalization_matrix` (with ``align_corners=False``,
the only setting used in tireg), applied by :func:`pixel_to_normalized`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._device import cached, constant
from ._validation import (
    FLOAT_DTYPES,
    as_device,
    beyond_float64,
    broadcast_shape,
    check_affine,
    check_dense,
    check_dtype,
    check_matrix,
    check_size,
    tensor_of_array,
)

__all__ = [
    "ALIGN_CORNERS",
    "Transform",
    "TRANSFORMS",
    "get_transform",
    "image_center",
    "normalization_matrix",
    "pixel_to_normalized",
    "rotation",
    "rotation_derivative",
    "translation_matrix",
    "translation_jacobian",
    "rigid_matrix",
    "rigid_jacobian",
    "similarity_matrix",
    "similarity_jacobian",
    "affine_matrix",
    "affine_jacobian",
    "anisotropic_similarity_matrix",
    "anisotropic_similarity_jacobian",
    "translation_from_matrix",
    "rigid_from_matrix",
    "similarity_from_matrix",
    "anisotropic_similarity_from_matrix",
    "affine_from_matrix",
]

#: ``align_corners`` used for every ``grid_sample`` call in tireg.
ALIGN_CORNERS = False

CenterLike = Union[torch.Tensor, Sequence[float]]


def image_center(height: int, width: int) -> tuple[float, float]:
    """Centre of an ``height x width`` image in pixel units: ``((W-1)/2, (H-1)/2)``.

    Raises ``ValueError`` unless ``height`` and ``width`` are positive whole numbers (a string
    raised "unsupported operand type(s) for -")."""
    height, width = check_size((height, width), "image_center()", "(height, width)")
    return ((width - 1) / 2.0, (height - 1) / 2.0)


def normalization_matrix(
    size: Sequence[int], *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Matrix ``N`` with ``u = N x`` from pixel to ``grid_sample`` coordinates.

    For an image of ``size = (H, W)`` and ``align_corners=False``::

        u = (2 x + 1) / W - 1,   v = (2 y + 1) / H - 1

    so pixel ``x = -0.5`` maps to ``u = -1`` and ``x = W - 0.5`` to ``u = 1``.

    Returns:
        ``(3, 3)`` tensor of ``dtype``, float32 or float64 (an integer dtype truncated the entries to 0).
    """
    caller = "normalization_matrix()"
    return torch.tensor(_normalization_values(check_size(size, caller)), dtype=check_dtype(dtype, caller),
                        device=as_device(device, caller))


def _normalization_values(size: Sequence[int]) -> tuple:
    """:func:`normalization_matrix`'s entries, row by row."""
    height, width = int(size[0]), int(size[1])
    return ((2.0 / width, 0.0, 1.0 / width - 1.0), (0.0, 2.0 / height, 1.0 / height - 1.0), (0.0, 0.0, 1.0))


def pixel_to_normalized(matrix: torch.Tensor, moving_size: Sequence[int]) -> torch.Tensor:
    """Compose a pixel matrix with the moving image's normalisation: ``N_moving A``.

    The result maps a **fixed-image pixel** ``(x, y, 1)`` straight to the
    moving image's ``grid_sample`` coordinates ``(u, v)``.

    Args:
        matrix: ``(..., 3, 3)`` fixed -> moving pixel matrices.
        moving_size: ``(H, W)`` of the moving image.

    Returns:
        ``(..., 2, 3)``.
    """
    size = check_size(moving_size, "pixel_to_normalized()", "moving_size")  # Python ints: no value read
    check_matrix(matrix, "pixel_to_normalized()", any_batch=True, any_float=True)  # a (2, 2) failed in a broadcast
    (scale_x, _, offset_x), (_, scale_y, offset_y), _ = _normalization_values(size)
    scale = constant(((scale_x,), (scale_y,)), like=matrix)  # made once: no host copy per call
    offset = constant(((offset_x,), (offset_y,)), like=matrix)
    # row i of N A is s_i A_i + o_i A_2, elementwise: a batched matrix product may take another
    # kernel (and rounding) for one matrix than for several (MKL on Intel CPUs did, cuBLAS may),
    # and a pair's sampling grid must not depend on the pairs beside it
    return matrix[..., :2, :] * scale + offset * matrix[..., 2:, :]


# ----------------------------------------------------------------------------
# building blocks


def _real_center(center, caller: str):
    """``center`` for ``torch.as_tensor``: a NumPy array as a tensor (:func:`tireg._validation.tensor_of_array`:
    any byte order, long double as float64), other values as given; raise ``TypeError`` naming
    ``'center'`` where its values are bool or complex.

    A bool centre ``(True, False)`` had been taken as ``(1, 0)``, and a complex one had lost its
    imaginary part with only a warning; a big-endian or long double array had raised torch's own
    error, under a message that called it no ``(cx, cy)``; an integer beyond float64's range
    (``10**400``) a bare ``OverflowError``: a ``ValueError`` naming ``'center'`` now.  Values that do not make a tensor are
    left to the caller's own conversion, which names them.
    """
    given = center
    if isinstance(center, np.ndarray):
        center = tensor_of_array(center, "center", caller)
    try:  # the kind of the values as given (a tensor's own dtype; its values are not read)
        kind = center.dtype if isinstance(center, torch.Tensor) else torch.as_tensor(center).dtype
    except OverflowError:  # an int beyond float64's range among floats: a bare OverflowError at last
        raise beyond_float64("center", caller, several=True) from None
    except (TypeError, ValueError, RuntimeError):  # ints only, one beyond int64 too ("Overflow when unpacking")
        try:
            torch.as_tensor(center, dtype=torch.float64)
        except OverflowError:
            raise beyond_float64("center", caller, several=True) from None
        except (TypeError, ValueError, RuntimeError):
            pass
        return center
    if kind == torch.bool or kind.is_complex:
        shown = f"a tensor of {kind}" if isinstance(given, torch.Tensor) else f"{given!r}, {kind} values"
        raise TypeError(f"{caller}: 'center' must be (cx, cy), real numbers in pixels; got {shown}")
    return center


def _as_center(center: CenterLike, like: torch.Tensor, caller: str, *, matrix: bool = False) -> torch.Tensor:
    """Centre as a ``(..., 2)`` tensor with ``like``'s dtype and device (its shape and kind checked:
    real numbers, :func:`_real_center`; its values are not read: no wait for a GPU)."""
    if center is None or isinstance(center, (str, bytes)):
        raise TypeError(f"{caller}: 'center' must be (cx, cy) in pixels; got {center!r}")
    given = center
    center = _real_center(center, caller)
    try:  # straight to like's dtype
        tensor = torch.as_tensor(center, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{caller}: 'center' must be (cx, cy) in pixels; got {given!r}") from None
    if tensor.dim() == 0 or tensor.shape[-1] != 2:
        raise ValueError(f"{caller}: 'center' must be (cx, cy) or (..., 2) in pixels; got shape {tuple(tensor.shape)}")
    if tensor.dim() > 1:  # one centre per parameter set (or matrix): their batch shapes must broadcast
        batch = like.shape[:-2] if matrix else like.shape[:-1]
        try:
            broadcast_shape(tensor.shape[:-1], batch)
        except ValueError:
            raise ValueError(f"{caller}: 'center' {tuple(tensor.shape)} does not broadcast with the "
                             f"{'matrices' if matrix else 'parameters'} {tuple(like.shape)} (batch shapes "
                             f"{tuple(tensor.shape[:-1])} and {tuple(batch)})") from None
    return tensor


def _homogeneous(linear: torch.Tensor, offset: torch.Tensor, corner: float = 1.0) -> torch.Tensor:
    """``[[linear, offset], [0, 0, corner]]`` from ``(..., 2, 2)`` and ``(..., 2)``, broadcast.

    ``corner`` is 1 for a transform and 0 for a derivative of one.
    """
    shape = broadcast_shape(linear.shape[:-2], offset.shape[:-1])
    top = torch.cat([linear.expand(*shape, 2, 2), offset.expand(*shape, 2).unsqueeze(-1)], dim=-1)
    bottom = constant((0.0, 0.0, corner), like=top).expand(*shape, 1, 3)
    return torch.cat([top, bottom], dim=-2)


def _apply_linear(linear: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``L v`` for ``(..., 2, 2)`` and ``(..., 2)``, broadcast, as a product and a sum.

    Elementwise rather than ``@``: in a compiled step (:mod:`tireg.fused`) it fuses
    with the rest of the matrix algebra, where a 2 x 2 matmul is a library call of
    its own (three of them were a tenth of a 256 x 256 step's overhead).
    """
    return (linear * vector.unsqueeze(-2)).sum(-1)


def _about_center(linear: torch.Tensor, translation: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``A = [L | c + t - L c]``: linear map ``L`` about ``center`` followed by ``translation``."""
    return _homogeneous(linear, center + translation - _apply_linear(linear, center))


def _linear_derivative(d_linear: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``dA = [dL | -dL c]``: derivative of ``_about_center`` along a linear-part parameter."""
    return _homogeneous(d_linear, -_apply_linear(d_linear, center), corner=0.0)


def _translation_derivatives(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """``dA/dtx, dA/dty`` as ``(*shape, 2, 3, 3)``: an expanded view of one kept tensor (callers
    that hand it out copy it)."""
    # Unit vectors e_k as column 2 of zero matrices.  The unit matrices here are built by device
    # operations and kept (cached: no operation in an eager call; inside a compiled step they are
    # built there, as before).  Not literals (constant): those had made inductor's step kernel
    # 20 % slower (1024^2 x 16, CPU), measured.
    basis = cached(("translation basis",), like.dtype, like.device,
                   lambda: F.pad(torch.eye(2, dtype=like.dtype, device=like.device).unsqueeze(-1), (2, 0, 0, 1)))
    return basis.expand(*shape, 2, 3, 3)


def _determinant(linear: torch.Tensor) -> torch.Tensor:
    """``det L`` of ``(..., 2, 2)`` matrices, written out: elementwise (no LU factorisation, no
    error check that waits for a GPU)."""
    return linear[..., 0, 0] * linear[..., 1, 1] - linear[..., 0, 1] * linear[..., 1, 0]


def rotation(angle: torch.Tensor) -> torch.Tensor:
    """``R(theta) = [[cos, sin], [-sin, cos]]`` (OpenCV's sign), ``(...) -> (..., 2, 2)``.

    ``angle``: a dense floating-point tensor (``TypeError`` otherwise: a sparse one failed inside
    ``torch.stack``, a complex one gave a complex matrix)."""
    return _rotation(_check_angle(angle, "rotation()"))


def rotation_derivative(angle: torch.Tensor) -> torch.Tensor:
    """``dR/dtheta = [[-sin, cos], [-cos, -sin]]``, ``(...) -> (..., 2, 2)``; ``angle`` as :func:`rotation`'s."""
    return _rotation_derivative(_check_angle(angle, "rotation_derivative()"))


def _check_angle(angle: torch.Tensor, caller: str) -> torch.Tensor:
    """:func:`rotation`'s ``angle``, checked by type, layout and dtype (no value read)."""
    if not isinstance(angle, torch.Tensor):
        raise TypeError(f"{caller}: 'angle' must be a torch.Tensor; got {type(angle).__name__}")
    check_dense(angle, "angle", caller)
    if not angle.is_floating_point():
        raise TypeError(f"{caller}: 'angle' must be a floating-point tensor; got {angle.dtype}")
    return angle


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """:func:`rotation` of a checked angle (the builders' parameters are checked already)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)


def _rotation_derivative(angle: torch.Tensor) -> torch.Tensor:
    """:func:`rotation_derivative` of a checked angle."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([-sin, cos], -1), torch.stack([-cos, -sin], -1)], -2)


def _check_params(params: torch.Tensor, count: int, caller: str) -> torch.Tensor:
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"{caller}: 'params' must be a torch.Tensor; got {type(params).__name__}")
    check_dense(params, "params", caller)  # a sparse one failed in torch's words ("aten::as_strided")
    if params.dim() == 0 or params.shape[-1] != count:
        raise ValueError(f"{caller}: 'params' must have shape (..., {count}); got {tuple(params.shape)}")
    if params.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{caller}: 'params' must be float32 or float64; got {params.dtype}")
    return params


# ----------------------------------------------------------------------------
# the transform kinds


def _translation_batch(params: torch.Tensor, center: CenterLike | None, caller: str) -> tuple[int, ...]:
    """The batch shape of a translation's matrices: ``params``' and ``center``'s broadcast, as for
    every other kind (the centre's values do not enter a translation; its shape does)."""
    if center is None:
        return tuple(params.shape[:-1])
    return broadcast_shape(params.shape[:-1], _as_center(center, params, caller).shape[:-1])


def translation_matrix(params: torch.Tensor, center: CenterLike | None = None) -> torch.Tensor:
    """Translation ``A = [[1, 0, tx], [0, 1, ty], [0, 0, 1]]``; params ``(..., 2) = (tx, ty)`` in pixels.

    ``center`` (optional) has no effect on the values, but its batch shape broadcasts with the
    parameters' as for every kind: params ``(2,)`` and centres ``(4, 2)`` give ``(4, 3, 3)``.
    """
    params = _check_params(params, 2, "translation_matrix()")
    shape = _translation_batch(params, center, "translation_matrix()")
    eye = cached(("identity", 2), params.dtype, params.device,  # kept: see _translation_derivatives
                 lambda: torch.eye(2, dtype=params.dtype, device=params.device))
    return _homogeneous(eye.expand(*shape, 2, 2), params)


def translation_jacobian(params: torch.Tensor, center: CenterLike | None = None) -> torch.Tensor:
    """``dA/d(tx, ty)``: constant unit matrices, ``(..., 2, 3, 3)``, ``...`` the batch shape of
    ``params`` and ``center`` broadcast (see :func:`translation_matrix`)."""
    params = _check_params(params, 2, "translation_jacobian()")
    shape = _translation_batch(params, center, "translation_jacobian()")
    return _translation_derivatives(shape, params).clone()  # the caller's own tensor


def rigid_matrix(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """Rigid ``A = [R(theta) | c + t - R(theta) c]``; params ``(..., 3) = (theta [rad], tx, ty)``."""
    params = _check_params(params, 3, "rigid_matrix()")
    center = _as_center(center, params, "rigid_matrix()")
    return _about_center(_rotation(params[..., 0]), params[..., 1:3], center)


def rigid_jacobian(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``dA/d(theta, tx, ty)`` with ``dA/dtheta = [R' | -R' c]``; ``(..., 3, 3, 3)``."""
    params = _check_params(params, 3, "rigid_jacobian()")
    center = _as_center(center, params, "rigid_jacobian()")
    d_angle = _linear_derivative(_rotation_derivative(params[..., 0]), center)
    d_shift = _translation_derivatives(d_angle.shape[:-2], params)
    return torch.cat([d_angle.unsqueeze(-3), d_shift], dim=-3)


def similarity_matrix(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """Similarity ``A = [s R(theta) | c + t - s R c]``; params ``(..., 4) = (theta [rad], s, tx, ty)``.

    (Its twin for the seed's model, :func:`_similarity_matrix_of_values`, keeps the same operations
    in the same order: the same bits, tested.)"""
    params = _check_params(params, 4, "similarity_matrix()")
    center = _as_center(center, params, "similarity_matrix()")
    linear = params[..., 1, None, None] * _rotation(params[..., 0])
    return _about_center(linear, params[..., 2:4], center)


def similarity_jacobian(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``dA/d(theta, s, tx, ty)``: ``[s R' | -s R' c]``, ``[R | -R c]``, unit shifts; ``(..., 4, 3, 3)``."""
    params = _check_params(params, 4, "similarity_jacobian()")
    center = _as_center(center, params, "similarity_jacobian()")
    angle, scale = params[..., 0], params[..., 1, None, None]
    d_angle = _linear_derivative(scale * _rotation_derivative(angle), center)
    d_scale = _linear_derivative(_rotation(angle), center)
    d_angle, d_scale = torch.broadcast_tensors(d_angle, d_scale)
    d_shift = _translation_derivatives(d_angle.shape[:-2], params)
    return torch.cat([d_angle.unsqueeze(-3), d_scale.unsqueeze(-3), d_shift], dim=-3)


def anisotropic_similarity_matrix(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """Rotation with per-axis scale, the seed's ``get_matrix`` form.

    ``A = [R(theta) S | c + t - R(theta) S c]`` with ``S = diag(sx, sy)``
    (scale along the fixed image's axes, then rotate); params
    ``(..., 5) = (theta [rad], sx, sy, tx, ty)``.  With ``sx = sy = s`` this is
    OpenCV's ``getRotationMatrix2D(c, theta, s)`` plus the shift ``t``.
    """
    params = _check_params(params, 5, "anisotropic_similarity_matrix()")
    center = _as_center(center, params, "anisotropic_similarity_matrix()")
    linear = _rotation(params[..., 0]) * params[..., None, 1:3]  # R @ diag(sx, sy): scales columns
    return _about_center(linear, params[..., 3:5], center)


def anisotropic_similarity_jacobian(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``dA/d(theta, sx, sy, tx, ty)``; ``dA/dsx`` keeps column 0 of ``R``, ``dA/dsy`` column 1."""
    params = _check_params(params, 5, "anisotropic_similarity_jacobian()")
    center = _as_center(center, params, "anisotropic_similarity_jacobian()")
    angle, scales = params[..., 0], params[..., None, 1:3]
    rot = _rotation(angle)
    d_angle, d_scale_x, d_scale_y = (
        _linear_derivative(_anisotropic_linear_derivative(angle, scales, index, rot), center) for index in range(3))
    d_angle, d_scale_x, d_scale_y = torch.broadcast_tensors(d_angle, d_scale_x, d_scale_y)
    d_shift = _translation_derivatives(d_angle.shape[:-2], params)
    derivatives = [d.unsqueeze(-3) for d in (d_angle, d_scale_x, d_scale_y)]
    return torch.cat([*derivatives, d_shift], dim=-3)


def _anisotropic_linear_derivative(
    angle: torch.Tensor, scales: torch.Tensor, index: int, rot: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``d(R S)/dp_index``, the linear part's derivative: ``R' S`` (0, theta), ``R``'s column 0 with
    column 1 zero (1, sx), column 1 with column 0 zero (2, sy), or ``R`` (5: both scales at once);
    ``rot``: ``R(angle)`` where already made."""
    if index == 0:
        return _rotation_derivative(angle) * scales
    rot = _rotation(angle) if rot is None else rot
    if index == 5:
        return rot
    return F.pad(rot[..., index - 1:index], (0, 1) if index == 1 else (1, 0))


def _anisotropic_similarity_derivative(params: torch.Tensor, center: torch.Tensor, index: int) -> torch.Tensor:
    """One slice ``dA/dp_index`` of :func:`anisotropic_similarity_jacobian` (checked ``params`` and
    ``center``), made alone: the seed's ``Affy.da``/``dx``/``dy`` ask for one each, and the whole
    Jacobian for each made a seed-style analytic model's step 1.5x as slow as autograd's.
    ``index`` 5: ``dA/dsx + dA/dsy = [R | -R c]``, the derivative along one scale for both axes.
    Its twin for the seed's call, :func:`_anisotropic_similarity_derivative_of_values`, must keep the
    same products and sums in the same order: the two give the same bits (tests/test_compat.py)."""
    angle, scales = params[..., 0], params[..., None, 1:3]
    if index in (3, 4):  # a shift: a unit matrix, the same for every angle and scale
        shape = torch.broadcast_shapes(angle.shape, center.shape[:-1])
        return _translation_derivatives(shape, params)[..., index - 3, :, :].clone()
    return _linear_derivative(_anisotropic_linear_derivative(angle, scales, index), center)


def _anisotropic_similarity_derivative_of_values(
    angle: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor, center: torch.Tensor, index: int
) -> torch.Tensor:
    """:func:`_anisotropic_similarity_derivative` from the values as tensors of one shape ``S``
    (not stacked) and one centre ``(2,)`` of their dtype and device, ``(*S, 3, 3)``: the seed's
    ``Affy.da``/``dsx``/``dsy``/``dx``/``dy``/``ds`` as its model calls them.

    The same products and sums, so the same numbers to the last bit, in about half the operations
    (the linear part's four entries made by one ``stack`` and one product, no broadcast of the
    parameters or the centre, no shape helpers): each of those calls had taken 20-25 small
    operations and most of 100 us, and a seed-style analytic step makes four of them."""
    if index in (3, 4):  # a shift: a unit matrix, the same for every angle and scale
        unit = cached(("translation unit", index), angle.dtype, angle.device,
                      lambda: _translation_derivatives(torch.Size(), angle)[index - 3].clone())
        return unit.expand(*angle.shape, 3, 3).clone()
    cos, sin = torch.cos(angle), torch.sin(angle)
    if index == 0:  # R' S: R' = [[-sin, cos], [-cos, -sin]], columns scaled by (sx, sy)
        minus_sin = torch.neg(sin)
        linear = torch.stack([minus_sin, cos, torch.neg(cos), minus_sin], -1) \
            * torch.stack([scale_x, scale_y, scale_x, scale_y], -1)
    elif index == 5:  # R
        linear = torch.stack([cos, sin, torch.neg(sin), cos], -1)
    else:  # R's column 0 (sx) or 1 (sy), the other column zero
        zero = torch.zeros_like(cos)
        linear = (torch.stack([cos, zero, torch.neg(sin), zero], -1) if index == 1
                  else torch.stack([zero, sin, zero, cos], -1))
    linear = linear.unflatten(-1, (2, 2))
    offset = torch.neg((linear * center).sum(-1))  # -dL c, as _linear_derivative forms it
    return F.pad(torch.cat([linear, offset.unsqueeze(-1)], -1), (0, 0, 0, 1))  # bottom row 0


def _similarity_matrix_of_values(
    angle: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, center: torch.Tensor
) -> torch.Tensor:
    """:func:`similarity_matrix` from the values as tensors of one shape ``S`` (not stacked) and one
    centre ``(2,)`` of their dtype and device, ``(*S, 3, 3)``: the same products and sums, so the
    same numbers to the last bit, in about half its operations and none of its checks (the seed's
    analytic model, whose matrix is the base's, forms it so every step)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = (scale.unsqueeze(-1) * torch.stack([cos, sin, torch.neg(sin), cos], -1)).unflatten(-1, (2, 2))
    offset = (center + torch.stack([tx, ty], -1)) - (linear * center).sum(-1)
    top = torch.cat([linear, offset.unsqueeze(-1)], -1)
    bottom = constant((0.0, 0.0, 1.0), like=top).expand(*top.shape[:-2], 1, 3)
    return torch.cat([top, bottom], -2)


def affine_matrix(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """Full affine about a centre: ``A = [L | c + t - L c]``.

    params ``(..., 6) = (a00, a01, a10, a11, tx, ty)`` with ``L = [[a00, a01], [a10, a11]]``
    (ITK's order: matrix row by row, then translation); identity is ``(1, 0, 0, 1, 0, 0)``.
    """
    params = _check_params(params, 6, "affine_matrix()")
    center = _as_center(center, params, "affine_matrix()")
    linear = params[..., :4].reshape(*params.shape[:-1], 2, 2)
    return _about_center(linear, params[..., 4:6], center)


def affine_jacobian(params: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``dA/d(a00, a01, a10, a11, tx, ty)``: ``[E_ij | -E_ij c]`` and unit shifts; constant, ``(..., 6, 3, 3)``."""
    params = _check_params(params, 6, "affine_jacobian()")
    center = _as_center(center, params, "affine_jacobian()")
    units = cached(("affine units",), params.dtype, params.device,  # E_00 .. E_11, kept as the translation basis
                   lambda: torch.eye(4, dtype=params.dtype, device=params.device).reshape(4, 2, 2))
    d_linear = _linear_derivative(units, center.unsqueeze(-2))  # (..., 4, 3, 3)
    shape = broadcast_shape(params.shape[:-1], d_linear.shape[:-3])
    d_shift = _translation_derivatives(shape, params)
    return torch.cat([d_linear.expand(*shape, 4, 3, 3), d_shift], dim=-3)


def _center_shift(matrix: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``t = A c - c``: where the matrix moves the centre.

    Exact for a matrix of any kind (``A c = c + t``), and for a projection
    onto a smaller kind it keeps the centre's image, where a registration
    is most reliable.
    """
    return _apply_linear(matrix[..., :2, :2], center) + matrix[..., :2, 2] - center


def _closest_rotation(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle and scale of the similarity ``s R(theta)`` closest (Frobenius) to ``A[:2, :2]``
    (``matrix`` may be ``(..., 2, 2)`` or ``(..., 3, 3)``).

    With ``R = [[cos, sin], [-sin, cos]]``: ``s cos = (a00 + a11) / 2``, ``s sin = (a01 - a10) / 2``;
    both vanish for a pure reflection, whose angle is then ``atan2(0, 0) = 0``.
    """
    cosine = 0.5 * (matrix[..., 0, 0] + matrix[..., 1, 1])
    sine = 0.5 * (matrix[..., 0, 1] - matrix[..., 1, 0])
    return torch.atan2(sine, cosine), torch.hypot(cosine, sine)


def _joined(*parts: torch.Tensor) -> torch.Tensor:
    """``parts`` ``(..., k_i)`` concatenated along the last dimension, their batch shapes broadcast
    first: an angle has the matrices' batch shape, a shift the matrices' and the centre's together
    (a centre ``(4, 2)`` for one matrix gives four parameter sets, as the ``*_matrix`` builders)."""
    shape = broadcast_shape(*(part.shape[:-1] for part in parts))
    return torch.cat([part.expand(*shape, part.shape[-1]) for part in parts], dim=-1)


def _checked_affine(matrix: torch.Tensor, caller: str) -> torch.Tensor:
    """``matrix`` as ``(..., 3, 3)``, refused unless affine: a kind's parameters describe the top
    two rows, and a projective last row would be dropped without a word (reads the values back:
    for use outside loops).  Not checked where no value can be read: inside ``torch.compile``
    (a graph break) or ``torch.func`` transforms such as ``vmap`` (an error; ``values_readable``)."""
    matrix = check_matrix(matrix, caller, any_batch=True)
    check_affine(matrix, caller)
    return matrix


def translation_from_matrix(matrix: torch.Tensor, center: CenterLike | None = None) -> torch.Tensor:
    """``(tx, ty) = A c - c``: where ``matrix`` moves the centre (``A[:2, 2]`` without a centre)."""
    matrix = _checked_affine(matrix, "translation_from_matrix()")
    if center is None:
        return matrix[..., :2, 2].clone()
    return _center_shift(matrix, _as_center(center, matrix, "translation_from_matrix()", matrix=True))


def rigid_from_matrix(matrix: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``(theta, tx, ty)``: the closest rotation, and the shift that ``matrix`` gives the centre.

    A mirror (``det A[:2, :2] < 0``) has no rotation: the angle is still that of the closest
    similarity (:func:`similarity_from_matrix`), and 0 for a pure reflection ``s R diag(1, -1)``,
    whose closest similarity is the zero matrix.  ``register`` refuses a mirrored start for this
    kind before it projects one.
    """
    matrix = _checked_affine(matrix, "rigid_from_matrix()")
    center = _as_center(center, matrix, "rigid_from_matrix()", matrix=True)
    angle, _ = _closest_rotation(matrix)
    translation = _center_shift(matrix, center)
    return _joined(angle.unsqueeze(-1), translation)


def similarity_from_matrix(matrix: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``(theta, s, tx, ty)`` of the similarity closest to ``matrix`` about ``center``.

    ``s R(theta)`` is the Frobenius-closest similarity to ``L = A[:2, :2]``: ``s = (sigma_1 + sigma_2) / 2``
    for ``L``'s singular values when ``det L > 0``.  A mirror (``det L < 0``) has no similarity; its
    projection has the smaller ``s = (sigma_1 - sigma_2) / 2``, and for a pure reflection
    ``s R diag(1, -1)`` it is ``s = 0`` with ``theta = 0`` (the zero matrix).  ``register`` refuses a
    mirrored start for this kind before it projects one.
    """
    matrix = _checked_affine(matrix, "similarity_from_matrix()")
    center = _as_center(center, matrix, "similarity_from_matrix()", matrix=True)
    angle, scale = _closest_rotation(matrix)
    translation = _center_shift(matrix, center)
    return _joined(angle.unsqueeze(-1), scale.unsqueeze(-1), translation)


def anisotropic_similarity_from_matrix(matrix: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``(theta, sx, sy, tx, ty)`` with ``L = R(theta) diag(sx, sy)`` close to ``A[:2, :2]``; exact for
    a matrix of this kind, mirrors included.

    The kind mirrors when ``sx sy < 0``.  With ``sign = sign(det L)`` (``+1`` for ``det L = 0``), the
    angle is that of the rotation closest to ``L diag(1, sign)`` (a mirror's column 1 negated:
    orientation-keeping, so the angle is well defined and well conditioned), and ``sx, sy`` are
    ``L``'s columns projected on ``R(theta)``'s.  The convention, for a matrix of the kind:
    ``sx > 0``, and ``sy`` has the sign of ``det L`` (a mirror flips the fixed image's y axis,
    then rotates).  ``(theta + pi, -sx, -sy)`` gives the same matrix.
    """
    matrix = _checked_affine(matrix, "anisotropic_similarity_from_matrix()")
    center = _as_center(center, matrix, "anisotropic_similarity_from_matrix()", matrix=True)
    linear = matrix[..., :2, :2]
    determinant = _determinant(linear)
    # (1, sign) per matrix: the closest rotation to a mirror (sx = -sy) was atan2(0, 0) = 0
    one = torch.ones_like(determinant)
    sign = torch.stack([one, torch.where(determinant < 0, -one, one)], -1)
    kept = linear * sign.unsqueeze(-2)  # L diag(1, sign): column 1 negated for a mirror
    angle, _ = _closest_rotation(kept)
    scales = (_rotation(angle) * linear).sum(dim=-2)  # column-wise dot products R[:, j] . L[:, j]
    translation = _center_shift(matrix, center)
    return _joined(angle.unsqueeze(-1), scales, translation)


def affine_from_matrix(matrix: torch.Tensor, center: CenterLike) -> torch.Tensor:
    """``(a00, a01, a10, a11, tx, ty)`` of ``matrix`` about ``center`` (exact)."""
    matrix = _checked_affine(matrix, "affine_from_matrix()")
    center = _as_center(center, matrix, "affine_from_matrix()", matrix=True)
    linear = matrix[..., :2, :2]
    translation = _center_shift(matrix, center)
    return _joined(linear.reshape(*linear.shape[:-2], 4), translation)


@dataclass(frozen=True)
class Transform:
    """A transform kind: named parameters, their identity values, ``A(p)`` and ``dA/dp``.

    Attributes:
        name: the name used by ``register(transform=...)`` and the models.
        parameter_names: parameter order and meaning (units in the docstrings
            of ``matrix``).
        identity: parameter values of the identity transform.
        matrix: ``(params (..., P), center (..., 2)) -> (..., 3, 3)``.
        jacobian: ``(params, center) -> (..., P, 3, 3)``.
        from_matrix: ``(matrix (..., 3, 3), center) -> (..., P)``: the
            parameters of the transform of this kind closest to a matrix
            (exact when the matrix is of this kind).
        linear: ``A(p)`` is affine in ``p`` (its Jacobian does not depend on
            ``p``): ``A(p) = A(0) + sum_k p_k dA/dp_k``.  True for
            translation and affine; ``register`` then forms a level's matrix
            from precomputed parts in three operations instead of building
            ``A`` and ``dA/dp`` at every evaluation.  Leave it ``False``
            unless that identity holds.
    """

    name: str
    parameter_names: tuple[str, ...]
    identity: tuple[float, ...]
    matrix: Callable[[torch.Tensor, CenterLike], torch.Tensor]
    jacobian: Callable[[torch.Tensor, CenterLike], torch.Tensor]
    from_matrix: Callable[[torch.Tensor, CenterLike], torch.Tensor]
    linear: bool = False

    @property
    def num_parameters(self) -> int:
        """Number of parameters ``P``."""
        return len(self.parameter_names)


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform(
            "translation", ("tx", "ty"), (0.0, 0.0), translation_matrix, translation_jacobian, translation_from_matrix,
            linear=True,
        ),
        Transform("rigid", ("angle", "tx", "ty"), (0.0, 0.0, 0.0), rigid_matrix, rigid_jacobian, rigid_from_matrix),
        Transform(
            "similarity",
            ("angle", "scale", "tx", "ty"),
            (0.0, 1.0, 0.0, 0.0),
            similarity_matrix,
            similarity_jacobian,
            similarity_from_matrix,
        ),
        Transform(
            "anisotropic_similarity",
            ("angle", "scale_x", "scale_y", "tx", "ty"),
            (0.0, 1.0, 1.0, 0.0, 0.0),
            anisotropic_similarity_matrix,
            anisotropic_similarity_jacobian,
            anisotropic_similarity_from_matrix,
        ),
        Transform(
            "affine",
            ("a00", "a01", "a10", "a11", "tx", "ty"),
            (1.0, 0.0, 0.0, 1.0, 0.0, 0.0),
            affine_matrix,
            affine_jacobian,
            affine_from_matrix,
            linear=True,
        ),
    )
}


def get_transform(name: str, caller: str = "get_transform()") -> Transform:
    """Look up a built-in transform kind by name; ``ValueError`` listing the names otherwise, its
    message starting with ``caller`` (the function that was given the name)."""
    try:
        return TRANSFORMS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{caller}: unknown transform {name!r}; choose one of {', '.join(map(repr, TRANSFORMS))}"
        ) from None
