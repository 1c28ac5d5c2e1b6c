"""Shared fixtures: devices (CPU always, CUDA when present) and seeded data."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every test that takes ``device`` runs on the CPU, and on CUDA when one is present."""
    return request.param


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def smooth_random_image(shape, generator, *, sigma: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    """Random image blurred with a Gaussian: smooth enough for finite differences."""
    from tireg.sampling import extend

    image = torch.rand(*shape, generator=generator, dtype=dtype)
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    batch, channels, height, width = image.shape
    flat = extend(image.reshape(batch * channels, 1, height, width), radius, "reflection")
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(batch, channels, height, width)
