"""Shared fixtures: devices (CPU always, CUDA when present) and seeded data."""

from __future__ import annotations

import sys

import pytest
import torch

from tireg.metrics import PerPixelMetric

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


def staggered_affine_batch(count: int = 8, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` affine pairs ``(count, 1, size, size)`` of camera and coins crops, different
    enough that they finish a level at different iterations (the pairs still active then vary)."""
    pairs = [registration_pair(["camera", "coins"][i % 2], "affine",
                               [1.0 + 0.01 * (i % 5), 0.02 * (i % 3), -0.01 * (i % 4), 0.98 + 0.01 * (i % 6),
                                2.0 - 0.3 * (i % 5), -1.0 + 0.2 * (i % 7)], noise=0.02, seed=i) for i in range(count)]
    fixed = torch.stack([f[:size, :size] for f, _, _ in pairs])[:, None]
    moving = torch.stack([m[:size, :size] for _, m, _ in pairs])[:, None]
    return fixed, moving


def count_evaluated_pairs(monkeypatch) -> list:
    """The number of pairs of every evaluation register makes from here on (a list that grows)."""
    import importlib

    register_module = importlib.import_module("tireg.register")
    sizes = []
    evaluate = register_module._Problem.evaluate

    def counting(self, params, level, *, hessian):
        sizes.append(params.shape[0])
        return evaluate(self, params, level, hessian=hessian)

    monkeypatch.setattr(register_module._Problem, "evaluate", counting)
    return sizes


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the tensor operations that make the host wait for a GPU: reads of values,
    boolean-mask indexing and copies to the host, and tensors made from host data (PyTorch
    waits for a copy from pageable host memory, and for the work queued before it:
    ``torch.tensor(numbers, device=...)``, ``as_tensor(numbers, device=...)``, ``new_tensor``, an index
    given as a list or as a tensor on another device).  On the CPU they run, and are counted, alike."""

    READS = {"__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "cpu", "numpy"}
    FROM_HOST = {"tensor", "as_tensor", "new_tensor"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        indexing = name in ("__getitem__", "__setitem__")
        masked = indexing and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        # torch.optim keeps a non-capturable optimiser's step counter on the host even beside
        # CUDA parameters (made by torch.tensor(0.0, device="cpu"), read by .item()): no wait
        optimizer = "torch/optim/" in sys._getframe(1).f_code.co_filename.replace("\\", "/")
        data = args[1] if name == "new_tensor" else (args[0] if args else kwargs.get("data"))
        # made for a device: another tensor's, or one named (without one, a host tensor by intent)
        for_device = name == "new_tensor" or kwargs.get("device") is not None
        from_host = name in self.FROM_HOST and for_device and not isinstance(data, torch.Tensor)
        host_index = indexing and _copied_index(args[0], args[1])
        if (name in self.READS or masked or from_host or host_index) and not optimizer:
            self.count += 1
        return func(*args, **kwargs)


def _copied_index(tensor: torch.Tensor, index) -> bool:
    """Whether indexing ``tensor`` by ``index`` first copies an index from the host: a list, or a
    tensor on another device, at any place of the index."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, list) or (isinstance(part, torch.Tensor) and part.dim() > 0
                                          and part.device != tensor.device) for part in parts)


class CudaSynchronisations:
    """On a CUDA device, fails an operation that synchronises with the host while :meth:`on`
    (``torch.cuda.set_sync_debug_mode("error")``: PyTorch's own account, complete where
    :class:`HostSyncs` counts what it can see on the CPU); :meth:`off` lets them run again."""

    def on(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def off(self) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def __enter__(self) -> "CudaSynchronisations":
        self.on()
        return self

    def __exit__(self, *exc_info) -> None:
        self.off()


class OwnPerPixelCost(PerPixelMetric):
    """A per-pixel loss's mean plus a tenth of the warped image's mean: a PerPixelMetric subclass
    with its own cost (``__call__``), which pools a pair's pixels as no band of it does."""

    def __call__(self, x, y, weight=None, gradient=False):
        result = super().__call__(x, y, weight, gradient)
        extra = 0.1 * x.mean(dim=(1, 2, 3))
        if not gradient:
            return result + extra
        return result[0] + extra, result[1] + 0.1 / x[0].numel()


class OwnWeightedCost(PerPixelMetric):
    """The square of a per-pixel loss's mean, by its own ``weighted`` (which ``__call__`` and
    Gauss-Newton compute the cost with)."""

    def weighted(self, x, y, term_weights, gradient=False):
        result = super().weighted(x, y, term_weights, gradient)
        if not gradient:
            return result.square()
        return result[0].square(), 2.0 * result[0][:, None, None, None] * result[1]
