"""The seed document's names, so that its snippets run verbatim after one line::

    from tireg.compat import PerPixelLoss, AffyModel, AffyModelAnal, Affy, Mapping

Each name is a namespace holding what the seed's module of that name held.
They are thin aliases of tireg's own functions and classes; new code should
use those (:mod:`tireg.transforms`, :mod:`tireg.models`, ...).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Union

import torch

from . import losses as _losses
from . import mappings as _mappings
from . import models as _models
from .transforms import anisotropic_similarity_jacobian, anisotropic_similarity_matrix

__all__ = ["PerPixelLoss", "AffyModel", "AffyModelAnal", "Affy", "Mapping"]

Scalar = Union[float, torch.Tensor]


def _stack(*values: Scalar) -> torch.Tensor:
    """Broadcast scalars and tensors to one ``(..., n)`` float tensor on the tensors' device."""
    reference = next((v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    device = reference.device if reference is not None else None
    tensors = [torch.as_tensor(v, dtype=dtype, device=device) for v in values]
    return torch.stack(torch.broadcast_tensors(*tensors), dim=-1)


def get_matrix(angle: Scalar, scalex: Scalar, scaley: Scalar, dx: Scalar, dy: Scalar, cx: Scalar, cy: Scalar) -> torch.Tensor:
    """The seed's ``Affy.get_matrix``: OpenCV's ``getRotationMatrix2D`` about ``(cx, cy)``
    (angle in radians, per-axis scale) plus the shift ``(dx, dy)``;
    :func:`tireg.transforms.anisotropic_similarity_matrix`."""
    return anisotropic_similarity_matrix(_stack(angle, scalex, scaley, dx, dy), _stack(cx, cy))


def _derivative(index: int, angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:
    params = _stack(angle, scalex, scaley, dx, dy)
    return anisotropic_similarity_jacobian(params, _stack(cx, cy))[..., index, :, :]


def da(angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:
    """``dA/d angle`` of :func:`get_matrix`."""
    return _derivative(0, angle, scalex, scaley, dx, dy, cx, cy)


def dsx(angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:
    """``dA/d scalex`` of :func:`get_matrix`."""
    return _derivative(1, angle, scalex, scaley, dx, dy, cx, cy)


def dsy(angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:
    """``dA/d scaley`` of :func:`get_matrix`."""
    return _derivative(2, angle, scalex, scaley, dx, dy, cx, cy)


def dx(angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:  # noqa: D417 - the seed's names
    """``dA/d dx`` of :func:`get_matrix`."""
    return _derivative(3, angle, scalex, scaley, dx, dy, cx, cy)


def dy(angle, scalex, scaley, dx, dy, cx, cy) -> torch.Tensor:
    """``dA/d dy`` of :func:`get_matrix`."""
    return _derivative(4, angle, scalex, scaley, dx, dy, cx, cy)


def ds(angle, scale, dx, dy, cx, cy) -> torch.Tensor:
    """``dA/d scale`` of ``get_matrix(angle, scale, scale, dx, dy, cx, cy)``: ``dsx + dsy`` at ``scalex = scaley``."""
    jacobian = anisotropic_similarity_jacobian(_stack(angle, scale, scale, dx, dy), _stack(cx, cy))
    return jacobian[..., 1, :, :] + jacobian[..., 2, :, :]


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
