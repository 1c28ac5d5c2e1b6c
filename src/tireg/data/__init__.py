"""Bundled example images (see ``README.md`` in this folder for sources and licences).

Each loader returns a float tensor (float32, or float64 with ``dtype=torch.float64``)
with values in ``[0, 1]``: grey images as ``(H, W)``, colour images as
``(3, H, W)``.  They are small (192-224 x 256 pixels, coins 303 x 384), non-square, real
photographs and textures, stored as ``.npz`` so that loading needs nothing
beyond NumPy.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from .._validation import check_dtype, check_option

__all__ = ["IMAGES", "load", "astronaut", "camera", "coins", "brick", "gravel", "immunohistochemistry"]

#: Names of the bundled images.
IMAGES = ("astronaut", "camera", "coins", "brick", "gravel", "immunohistochemistry")


def _load(name: str, dtype: torch.dtype, caller: str) -> torch.Tensor:
    if not isinstance(name, str):
        raise TypeError(f"{caller}: 'name' must be a string, one of {', '.join(map(repr, IMAGES))}; "
                        f"got {type(name).__name__}")
    check_option(name, IMAGES, "bundled image", caller)
    dtype = check_dtype(dtype, caller)  # an integer dtype truncated the [0, 1] values to 0 and 1
    with resources.files(__name__).joinpath(f"{name}.npz").open("rb") as handle:
        image = np.load(handle)["image"]
    if image.ndim == 3:
        image = np.moveaxis(image, -1, 0)
    return torch.from_numpy(image.astype(np.float64) / 255.0).to(dtype)


def load(name: str, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bundled image by name, values in ``[0, 1]``: ``(H, W)`` grey or ``(3, H, W)`` colour.

    Args:
        name: one of :data:`IMAGES`.
        dtype: ``torch.float32`` or ``torch.float64``.

    Raises:
        ValueError: an unknown ``name``.
        TypeError: a ``name`` that is not a string, or another ``dtype``.
    """
    return _load(name, dtype, "load()")


def astronaut(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eileen Collins, NASA portrait (public domain), grey ``(192, 256)``."""
    return _load("astronaut", dtype, "astronaut()")


def camera(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Photographer with camera, Lav Varshney (CC0), grey ``(224, 256)``."""
    return _load("camera", dtype, "camera()")


def coins(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Greek coins from Pompeii (no known copyright restrictions), grey ``(303, 384)``."""
    return _load("coins", dtype, "coins()")


def brick(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Brick wall texture, CC0Textures Bricks25 (CC0), grey ``(192, 256)``: a periodic pattern."""
    return _load("brick", dtype, "brick()")


def gravel(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gravel texture, CC0Textures Gravel04 (CC0), grey ``(192, 256)``."""
    return _load("gravel", dtype, "gravel()")


def immunohistochemistry(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Immunohistochemistry (IHC) stained tissue (no known copyright restrictions), colour ``(3, 192, 256)``."""
    return _load("immunohistochemistry", dtype, "immunohistochemistry()")
