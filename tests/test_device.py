"""Small constants made once per device (tireg._device), and public functions that stay fresh."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tireg._device import constant
from tireg.sampling import pixel_scale, sampling_grid
from tireg.transforms import normalization_matrix, pixel_to_normalized, translation_jacobian


def test_a_constant_is_made_once_per_values_dtype_and_device(device):
    like = torch.zeros(2, device=device)
    first = constant(((1.0, 2.0), (3.0, 4.5)), like=like)
    assert torch.equal(first.cpu(), torch.tensor([[1.0, 2.0], [3.0, 4.5]]))
    assert first.dtype == like.dtype and first.device == like.device
    assert constant([[1.0, 2.0], [3.0, 4.5]], like=like) is first  # lists and tuples alike
    assert constant(((1.0, 2.0), [3.0, 4.5]), like=like) is first  # a tuple that holds a list too
    assert constant(((1.0, 2.0), (3.0, 4.5)), like=like.double()) is not first
    assert constant(((1.0, 2.0), (3.0, 4.0)), like=like) is not first
    index = constant((2, 0, 1), like=like, dtype=torch.long)
    assert index.dtype == torch.long and index.tolist() == [2, 0, 1]


def test_a_constant_first_made_under_inference_mode_serves_autograd_later():
    matrix = torch.eye(3, dtype=torch.float64)[None]
    size = (17, 29)  # a size no other test uses: the constant is made here, under inference mode
    with torch.inference_mode():
        expected = pixel_to_normalized(matrix, size)
    matrix = matrix.clone().requires_grad_(True)
    normalized = pixel_to_normalized(matrix, size)  # the same constant, now in an autograd graph
    normalized.sum().backward()
    assert torch.equal(normalized.detach(), expected)
    # d/dA sum((N A)[:2]) = N[:2]^T 1: row i of the gradient is the sum of N[:2]'s column i
    norm = normalization_matrix(size, dtype=torch.float64)
    assert torch.allclose(matrix.grad[0], norm[:2].sum(0)[:, None].expand(3, 3))


def test_public_functions_return_tensors_of_their_own():
    size = (8, 10)
    for make in (lambda: normalization_matrix(size), lambda: pixel_scale(size, like=torch.zeros(1)),
                 lambda: translation_jacobian(torch.zeros(2))):
        first = make()
        expected = first.clone()
        first.add_(1.0)  # a caller's change in place
        assert torch.equal(make(), expected)
    # and the sampling grid, which uses the shared normalisation, is unchanged by the above
    grid = sampling_grid(torch.eye(3)[None], size, size)
    assert torch.allclose(grid[0, 0, 0], torch.tensor([-1 + 1 / 10, -1 + 1 / 8]))


def test_cached_makes_once_per_key_dtype_and_device_and_keeps_a_bounded_number(monkeypatch):
    import tireg._device as device_module

    calls = []

    def make():
        calls.append(1)
        return torch.arange(4.0)

    first = device_module.cached(("test ramp", 4), torch.float32, "cpu", make)
    assert device_module.cached(("test ramp", 4), torch.float32, "cpu", make) is first and len(calls) == 1
    assert device_module.cached(("test ramp", 5), torch.float32, "cpu", make) is not first  # another key
    assert device_module.cached(("test ramp", 4), torch.float64, "cpu", make) is not first  # another dtype
    assert len(calls) == 3
    monkeypatch.setattr(device_module, "CACHED_ENTRIES", 2)
    for size in range(10):
        device_module.cached(("test bound", size), torch.float32, "cpu", make)
    assert len(device_module._cache) == 2  # the least recently used went first
    with torch.inference_mode():  # made under inference mode, still a normal tensor
        made = device_module.cached(("test inference",), torch.float32, "cpu", make)
    assert not made.is_inference()


def test_no_caller_changes_a_kept_tensor():
    """The initialiser's windows, the blur kernels and the padding indices are kept: the first call
    makes them, the second takes them from the cache and gives the first call's result bit for bit
    (a caller that changed one in place would show here)."""
    import tireg
    import tireg._device as device_module
    from tireg.sampling import gaussian_blur

    device_module._cache.clear()

    generator = torch.Generator().manual_seed(3)
    fixed = torch.rand(1, 1, 80, 96, generator=generator)
    moving = torch.roll(fixed, (3, -5), (-2, -1))
    first = (tireg.initialize.initialize(fixed, moving, "similarity"), gaussian_blur(fixed, 1.5))
    second = (tireg.initialize.initialize(fixed, moving, "similarity"), gaussian_blur(fixed, 1.5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_never_waits_on_a_lock_its_parent_held():
    # fork copies a lock as it is: held by another thread of the parent (a registration in a worker
    # thread), the child, where that thread does not exist, waited on it forever
    from tireg import _device, fused

    with _device._cache_lock, fused._lock:  # held while forking, as by another thread
        child = os.fork()
        if child == 0:  # the child: take both locks, or hang
            try:
                _device.cached(("forked child",), torch.float32, "cpu", lambda: 1)
                with fused._lock:
                    pass
            finally:
                os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        finished, status = os.waitpid(child, os.WNOHANG)
        if finished:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked child hung on a lock its parent held")
