"""Shared fixtures: devices (CPU always, CUDA when present) and seeded data."""

from __future__ import annotations

import sys

import pytest
import torch

# The tests use small images, on which torch's intra-op threads gain little, and on a
# shared machine they lose a lot: with another process on a core, every parallel region
# waits for it (a metric registration measured 0.3 s single-threaded, 22 s with two
# threads under load). Results do not depend on the thread count.
torch.set_num_threads(1)

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


def registration_pair(
    name: str,
    kind: str,
    params,
    *,
    margin: int = 24,
    noise: float = 0.0,
    gain: float = 1.0,
    offset: float = 0.0,
    seed: int = 0,
):
    """Fixed and moving crops of a bundled image, related by a known transform, with real content everywhere.

    The fixed image is the scene cropped by ``margin`` pixels on every side;
    the moving image samples the scene at ``A^-1 y`` on the same crop grid,
    so ``moving(A x) = fixed(x)`` wherever that point stays in the scene.
    Noise (Gaussian, std ``noise``) and a contrast change ``gain * I + offset``
    apply to the moving image.

    Returns:
        ``fixed (h, w)``, ``moving (h, w)`` float32 and the true matrix ``A`` (float64, crop pixels).
    """
    import tireg
    from tireg.data import load
    from tireg.transforms import TRANSFORMS, translation_matrix

    scene = load(name, dtype=torch.float64)
    if scene.dim() == 3:
        scene = scene.mean(0)
    height, width = scene.shape[-2] - 2 * margin, scene.shape[-1] - 2 * margin
    center = tireg.image_center(height, width)
    truth = TRANSFORMS[kind].matrix(torch.as_tensor(params, dtype=torch.float64), center)
    to_scene = translation_matrix(torch.tensor([float(margin), float(margin)], dtype=torch.float64))
    scene = scene[None, None]
    fixed = tireg.warp(scene, to_scene, size=(height, width))[0, 0]
    moving = tireg.warp(scene, to_scene @ torch.linalg.inv(truth), size=(height, width), padding_mode="border")[0, 0]
    generator = torch.Generator().manual_seed(seed)
    moving = gain * moving + offset + noise * torch.randn(moving.shape, generator=generator, dtype=torch.float64)
    return fixed.float(), moving.float(), truth


def grid_error(matrix, truth, size) -> float:
    """Mean distance in pixels between where two fixed -> moving matrices send every fixed pixel."""
    from tireg.sampling import pixel_grid

    points = pixel_grid(size, dtype=torch.float64)
    difference = points @ (torch.as_tensor(matrix, dtype=torch.float64) - truth).transpose(-1, -2)
    return float(difference[..., :2].norm(dim=-1).mean())


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor operations that make the host wait for a GPU (reads of values,
    boolean-mask indexing, copies to the host); on the CPU they run, and are counted, alike."""

    READS = {"__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        masked = name in ("__getitem__", "__setitem__") and isinstance(args[1], torch.Tensor) \
            and args[1].dtype == torch.bool
        # torch.optim's step counter of a non-capturable optimiser lives on the host even
        # beside CUDA parameters: its .item() in _get_value waits for nothing
        counter = sys._getframe(1).f_code.co_name == "_get_value"
        if (name in self.READS or masked) and not counter:
            self.count += 1
        return func(*args, **kwargs)
