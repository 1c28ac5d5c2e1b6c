"""Bundled example images (see ``README.md`` in this folder for sources and licences)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

__all__ = ["astronaut"]


def _load(name: str) -> np.ndarray:
    with resources.files(__name__).joinpath(f"{name}.npz").open("rb") as handle:
        return np.load(handle)["image"]


def astronaut(*, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eileen Collins, NASA portrait (public domain), grey, ``(192, 256)``, values in ``[0, 1]``.

    A non-square real photograph with edges, texture and flat regions,
    downsampled from scikit-image's ``astronaut``.
    """
    return torch.from_numpy(_load("astronaut").astype(np.float64) / 255.0).to(dtype)
