"""Constant tensors, made once per device, so that a loop never copies from the host.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, and
PyTorch waits for that copy, and with it for all the work queued on the
stream: a host synchronisation (pytorch/pytorch#120996;
``torch.cuda.set_sync_debug_mode`` reports it).  So does indexing a GPU
tensor with a CPU index tensor, which is copied over first.  In an
optimisation loop one such constant per evaluation (a normalisation matrix,
the bottom row of a homogeneous matrix, an index table) leaves the GPU idle
while the host queues the next launches, however rarely the loop itself
looks at the device.  :func:`constant` makes each one once per
``(values, dtype, device)`` and hands out the same tensor from then on.

:func:`cached` keeps, the same way, tensors that are computed on the device
but depend only on a size (a window, a filter, a sampling grid, a kernel):
each was a dozen operations a call, every one a launch on a GPU.

The tensors are shared: callers use them as operands and never modify them
in place, nor return them to users (a public function returns a copy).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch

__all__ = ["constant", "cached"]

Values = Union[float, int, Sequence]


def _frozen(values: Values) -> Union[float, int, tuple]:
    """``values`` as nested tuples (a cache key); numbers stay numbers.

    A tuple that hashes already (of numbers, the usual case) is its own key: rebuilding a
    36-entry index table element by element took 8 us, more than the lookup itself.
    """
    if isinstance(values, tuple):
        try:
            hash(values)
            return values
        except TypeError:  # it holds a list
            pass
    if isinstance(values, (list, tuple)):
        return tuple(_frozen(value) for value in values)
    return values


def constant(values: Values, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensor of ``values`` with ``like``'s device (and dtype, unless ``dtype`` is given).

    Made on the first call for these values, dtype and device, and the same tensor from then
    on (:func:`cached`): the one host-to-device copy happens once, not in every iteration.
    Inside code that ``torch.compile`` traces it is a plain ``torch.tensor``, a constant of the
    compiled graph.
    """
    dtype = like.dtype if dtype is None else dtype
    return cached(("constant", _frozen(values)), dtype, like.device,
                  lambda: torch.tensor(values, dtype=dtype, device=like.device))


#: How many :func:`cached` entries (constants included) are kept, the least recently used
#: going first: a registration uses a few dozen (some per pyramid level and initialiser size).
CACHED_ENTRIES = 256
class ForkSafeLock:
    """A :class:`threading.Lock` (``with lock: ...``) that a child process made by ``fork`` gets anew:
    ``fork`` copies a lock as it is, and one that another thread of the parent held would be held
    forever in the child, where only the forking thread lives on.  For process-wide locks (each
    registers a handler with :func:`os.register_at_fork` for the life of the process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):  # POSIX
            os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exception: Any) -> None:
        self._lock.__exit__(*exception)


_cache: "OrderedDict[tuple, Any]" = OrderedDict()
_cache_lock = ForkSafeLock()


def cached(key: tuple, dtype: torch.dtype, device: Union[torch.device, str], make: Callable[[], Any]) -> Any:
    """What ``make()`` returns (tensors on ``device`` in ``dtype``, made by device operations),
    kept under ``(key, dtype, device)``: made on the first call, the same object afterwards.

    ``key`` must name everything the result depends on besides dtype and device (a size, a
    sigma).  Made outside autograd and inference mode (the result may meet either later);
    inside code that ``torch.compile`` traces, ``make()`` itself.
    """
    if torch.compiler.is_compiling():
        return make()
    full_key = (key, dtype, device if isinstance(device, torch.device) else torch.device(device))
    with _cache_lock:
        if full_key in _cache:
            _cache.move_to_end(full_key)
            return _cache[full_key]
    with torch.inference_mode(False), torch.no_grad():
        value = make()
    with _cache_lock:
        _cache[full_key] = value
        while len(_cache) > CACHED_ENTRIES:
            _cache.popitem(last=False)
    return value


#: The device types whose ``torch.autocast`` a tireg computation leaves (:func:`without_autocast`).
AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (torch 2.4's ``is_autocast_enabled(device_type)``;
    before it, the CUDA and CPU flags)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def autocast_off() -> contextlib.AbstractContextManager:
    """A context in which every active ``torch.autocast`` is turned off (nothing where none is on).

    Why: tireg's sums over the pixels are its results (a gradient, a score, a normal matrix), not a
    network's activations: under a user's ``torch.autocast(dtype=torch.bfloat16)`` an analytic model's
    gradient was 2-6 % off (its reductions ran in bfloat16; float16 overflows sums of a large image)
    or raised a dtype error from inside torch, and ``register()`` raised "'matrix' must be float32 or
    float64; got torch.bfloat16".  The autograd model's ``backward()`` keeps float32 gradients there.
    """
    active = [device for device in AUTOCAST_DEVICES if _autocast_on(device)]
    if not active:
        return contextlib.nullcontext()  # every step of a training loop passes here
    stack = contextlib.ExitStack()
    for device in active:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def without_autocast(function: Callable) -> Callable:
    """``function`` run in :func:`autocast_off` (a frame more: where a warning's ``stacklevel`` must
    reach the caller, as ``register``'s, the function enters the context itself)."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        with autocast_off():
            return function(*args, **kwargs)

    return run
