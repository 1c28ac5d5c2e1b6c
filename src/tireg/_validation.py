"""Input checks shared by every public entry point.

Every rejection raises an error whose message starts with the calling
function's name and names the offending argument, e.g.
``warp(): 'moving' must have 4 dimensions (B, C, H, W); got shape (5, 7)``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ._device import constant

FLOAT_DTYPES = (torch.float32, torch.float64)

#: What the entry points about images a user holds take: a tensor or a NumPy array.
ImageLike = Union[torch.Tensor, np.ndarray]

INTERPOLATIONS = {"bilinear": 0, "nearest": 1, "bicubic": 2}
#: The interpolations a gradient can be taken through: nearest's derivative is 0 almost everywhere.
GRADIENT_INTERPOLATIONS = ("bilinear", "bicubic")
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}


def writable(value: Any) -> Any:
    """``value``, or a copy where it is a NumPy array that torch cannot share as it is.

    A read-only array (``np.asarray`` of a PIL image, a ``np.broadcast_to`` view, a read-only
    memory map): ``torch.from_numpy`` and ``torch.as_tensor`` share an array's memory and warn
    that a read-only one may be written ("The given NumPy array is not writable", an error under
    ``python -W error``).  An array in the other byte order (``astype(">f4")``, FITS and some TIFF
    data): torch refused it in its own words, which name no argument; the copy is in the native
    order, its values exact.
    """
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:
            return value.astype(value.dtype.newbyteorder("="))
        if not value.flags.writeable:
            return value.copy()
    return value


def tensor_of_array(array: np.ndarray, name: str, caller: str) -> torch.Tensor:
    """A tensor of the numbers in ``array`` (its memory where torch can share it): the one way from
    NumPy for images, masks and matrices.

    Any byte order (:func:`writable`); a long double array as float64 (``torch.from_numpy`` takes
    none; a finite value beyond float64's range raises ``ValueError``), a complex long double one as
    complex128 (for the caller to refuse as complex).  An array of anything but numbers and
    booleans raises ``TypeError``.
    """
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{caller}: '{name}' must hold numbers; got dtype {array.dtype}")
    array = writable(array)
    if array.dtype.type in (np.longdouble, np.clongdouble):
        wide = array
        with np.errstate(over="ignore"):  # beyond float64's range is refused just below, not warned of
            array = array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)
        if not np.isfinite(array).all() and np.isfinite(wide).all():
            raise ValueError(f"{caller}: '{name}' has values beyond float64's range (dtype {wide.dtype}); "
                             "scale it first")
    return torch.from_numpy(np.ascontiguousarray(array))


def check_dense(tensor: torch.Tensor, name: str, caller: str) -> None:
    """Raise ``TypeError`` naming ``name`` where ``tensor`` is not dense (sparse COO, CSR, ...): it
    failed deep inside, in torch's words ("expand is unsupported for Sparse tensors")."""
    if tensor.layout != torch.strided:
        raise TypeError(f"{caller}: '{name}' must be a dense tensor; got layout {tensor.layout} "
                        "(pass tensor.to_dense())")


def check_real(tensor: torch.Tensor, name: str, caller: str) -> None:
    """Raise ``TypeError`` naming ``name`` where ``tensor`` is complex: a cast to a real dtype drops
    the imaginary part with only a warning (a weight of ``1j`` became 0, and a metric's cost 0).
    The dtype only: no value is read."""
    if tensor.is_complex():
        raise TypeError(f"{caller}: '{name}' must be real; got {tensor.dtype}")


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether a check may read ``tensor``'s values back: not while ``torch.compile`` traces (a graph
    break, an error with ``fullgraph=True``), not inside ``torch.vmap`` (an error: data-dependent
    control flow; ``torch.func.grad`` reads them), not for a meta tensor (it holds no values).  Checks
    that read values are skipped there, as :func:`torch.nn.functional.grid_sample` checks none."""
    return not (torch.compiler.is_compiling() or tensor.is_meta or _vmapped(tensor))


def _vmapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``vmap`` at any of its ``torch.func`` levels."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element of ``tensor`` is NaN or +-Inf (``True`` where no value can be read:
    :func:`values_readable`).

    A sum is NaN or infinite as soon as one term is, so a finite sum proves every element finite
    in one reduction; ``isfinite(x).all()`` writes a boolean image first and took 40x longer
    (128 x 256^2 float32: 32 against 0.8 ms, one thread).  Only a non-finite sum (or one that
    overflowed) needs the elementwise test.
    """
    if tensor.numel() == 0 or not values_readable(tensor) or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def check_image(image: torch.Tensor, name: str, caller: str, *, finite: bool = True) -> torch.Tensor:
    """Return ``image`` if it is a float tensor ``(B, C, H, W)``; raise otherwise.

    Checks type, layout (dense), number of dimensions, dtype (float32/float64), non-empty
    spatial size and, unless ``finite=False``, the absence of NaN/Inf.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{caller}: '{name}' must be a torch.Tensor; got {type(image).__name__}")
    check_dense(image, name, caller)
    if image.dim() != 4:
        raise ValueError(
            f"{caller}: '{name}' must have 4 dimensions (B, C, H, W); got shape {tuple(image.shape)}"
        )
    if image.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{caller}: '{name}' must be float32 or float64; got {image.dtype}")
    if image.numel() == 0:
        raise ValueError(f"{caller}: '{name}' is empty; got shape {tuple(image.shape)}")
    if finite and not all_finite(image):
        raise ValueError(f"{caller}: '{name}' contains NaN or Inf values")
    return image


def broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
    """NumPy broadcasting of shapes, in plain Python.

    ``torch.broadcast_shapes`` would do, but its first call imports a part of
    torch that costs the command line almost half a second at start-up.
    """
    length = max(len(shape) for shape in shapes)
    result = []
    for sizes in zip(*[(1,) * (length - len(shape)) + tuple(shape) for shape in shapes]):
        size = next((s for s in sizes if s != 1), 1)  # 0 too: (0,) with (1,) is (0,), as in NumPy
        if any(s not in (1, size) for s in sizes):
            raise ValueError(f"shapes {[tuple(shape) for shape in shapes]} do not broadcast")
        result.append(size)
    return tuple(result)


def check_same_shape(first: torch.Tensor, second: torch.Tensor, names: Sequence[str], caller: str) -> None:
    """Raise ``ValueError`` unless the two tensors have identical shapes."""
    if first.shape != second.shape:
        raise ValueError(
            f"{caller}: '{names[0]}' and '{names[1]}' must have the same shape; "
            f"got {tuple(first.shape)} and {tuple(second.shape)}"
        )


def check_matrix(
    matrix: torch.Tensor, caller: str, *, any_batch: bool = False, any_float: bool = False
) -> torch.Tensor:
    """Return ``matrix`` as ``(B, 3, 3)``; accepts ``(3, 3)``; raise otherwise (a sparse one too).

    ``any_batch``: any number of leading dimensions, ``(..., 3, 3)``, returned as it is.
    ``any_float``: any float dtype (half precision too), not float32 or float64 only.
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{caller}: 'matrix' must be a torch.Tensor; got {type(matrix).__name__}")
    check_dense(matrix, "matrix", caller)  # a sparse one failed in torch's words ("aten::ne.Scalar", "as_strided")
    shape_ok = matrix.dim() >= 2 if any_batch else matrix.dim() in (2, 3)
    if not shape_ok or matrix.shape[-2:] != (3, 3):
        expected = "(..., 3, 3)" if any_batch else "(B, 3, 3) or (3, 3)"
        raise ValueError(f"{caller}: 'matrix' must have shape {expected}; got {tuple(matrix.shape)}")
    if matrix.dim() == 2 and not any_batch:
        matrix = matrix.unsqueeze(0)
    if any_float and not matrix.is_floating_point():
        raise TypeError(f"{caller}: 'matrix' must be a float tensor; got {matrix.dtype}")
    if not any_float and matrix.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{caller}: 'matrix' must be float32 or float64; got {matrix.dtype}")
    return matrix


def check_affine(matrix: torch.Tensor, caller: str, name: str = "matrix") -> None:
    """Raise ``ValueError`` unless every ``(3, 3)`` matrix is finite and has the last row ``(0, 0, 1)``
    (to 1e-6: an inverse computed in float32 is affine to rounding).  Reads the values back
    (not checked where none can be read: :func:`values_readable`)."""
    if matrix.numel() == 0 or not values_readable(matrix):
        return
    if not bool(torch.isfinite(matrix.detach()).all()):  # (a warp by it was an image of NaN)
        raise ValueError(f"{caller}: '{name}' contains NaN or Inf")
    last = matrix.detach()[..., 2, :].reshape(-1, 3)
    error = (last - constant((0.0, 0.0, 1.0), like=last)).abs().amax(dim=1)
    worst = int(error.argmax())
    if not float(error[worst]) <= 1e-6:  # NaN too
        raise ValueError(
            f"{caller}: '{name}' must be affine, with last row (0, 0, 1); got {last[worst].tolist()} "
            "(a projective matrix is not supported)"
        )


def _as_float(value) -> Optional[float]:
    """``float(value)`` for a real number, ``None`` for what is not one; an ``OverflowError`` passes
    through (an ``int`` or ``Fraction`` beyond float64's range)."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def real_number(value) -> Optional[float]:
    """``value`` as a ``float`` if it is a real number (a NumPy number, a 0-d tensor too), else ``None``;
    a ``bool`` or a string is not one (``float("3")`` would take it).  An integer beyond float64's
    range (``10**400``) is a real number too, ``+-inf`` as a float: ``float()`` had raised a bare
    ``OverflowError`` through every caller; they refuse it as they refuse an infinite number."""
    try:
        return _as_float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def beyond_float64(name: str, caller: str, *, several: bool = False) -> ValueError:
    """The ``ValueError`` for a number beyond float64's range (a Python ``int`` such as ``10**400``, whose
    conversion raised a bare ``OverflowError`` naming nothing), naming ``name``; ``several``: ``name``
    holds several numbers, one of them beyond.  The value is not shown: ``str()`` of an ``int`` of over
    4300 digits raises."""
    subject = "has a value" if several else "is"
    return ValueError(f"{caller}: '{name}' {subject} beyond float64's range (at most {sys.float_info.max:.3g} "
                      "in magnitude)")


def finite_number(value, name: str, caller: str) -> float:
    """``value`` as a finite ``float``; raise a ``TypeError`` for a non-number, a ``ValueError`` for NaN,
    Inf or an integer beyond float64's range (``10**400``), naming ``name`` and ``caller``."""
    try:
        number = _as_float(value)
    except OverflowError:
        raise beyond_float64(name, caller) from None
    if number is None:
        shown = repr(value) if isinstance(value, (bool, str)) else type(value).__name__
        raise TypeError(f"{caller}: '{name}' must be a number; got {shown}")
    if not math.isfinite(number):
        raise ValueError(f"{caller}: '{name}' must be finite; got {number}")
    return number


def is_whole(value) -> bool:
    """A whole number (an ``int``, or a float, NumPy number or 0-d tensor equal to one), not a
    ``bool`` nor a string (``float("3")`` would take it)."""
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        return float(value).is_integer()
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return False


def is_sequence(value) -> bool:
    """Whether ``value`` is a sequence of values to iterate over (a list, a tuple, an array or a
    tensor of one dimension or more, a generator): not a string, nor a 0-d tensor or array, which
    have ``__iter__`` but hold one number (iterating one raised "iteration over a 0-d tensor")."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return False
    return not (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0)


def positive_whole(value, name: str, caller: str) -> int:
    """``value`` as an ``int`` if it is a whole number of at least 1 (``2``, ``2.0``, a NumPy integer);
    raise a ``ValueError`` naming ``name`` otherwise (a bool, ``2.5``, ``-1``, a tensor of several
    values).  An ``int`` passes with one type check: it is a step's batch size."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) and value >= 1:
        return value
    if not (is_whole(value) and value >= 1):
        raise ValueError(f"{caller}: '{name}' must be a whole number of at least 1; got {value!r}")
    return int(value)


def check_flag(value, name: str, caller: str) -> bool:
    """``value`` as a ``bool`` if it is one (a NumPy bool too) or the whole number 0 or 1 (``gradient=1``,
    as Python takes it); raise a ``TypeError`` naming ``name`` otherwise: ``"no"`` was taken for
    true, and a tensor raised "Boolean value of Tensor with more than one value is ambiguous" (a 0-d
    one would wait for a GPU).  Type checks only, for hot paths."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, (str, bytes, int, float)):
        shown = repr(value)
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        shown = f"{'a tensor' if isinstance(value, torch.Tensor) else 'an array'} of shape {tuple(value.shape)}"
    else:
        shown = type(value).__name__
    raise TypeError(f"{caller}: '{name}' must be True or False; got {shown}")


def check_size(size: Sequence[int], caller: str, name: str = "size") -> tuple[int, int]:
    """``(H, W)`` as two ints; raise a ``ValueError`` unless ``size`` holds two positive whole numbers
    (a 0-d tensor or array is one number, not a size: :func:`is_sequence`)."""
    values = tuple(size) if is_sequence(size) else None  # arrays too
    if values is None or len(values) != 2 or not all(is_whole(value) and value >= 1 for value in values):
        # an image passed as the size had been printed whole (7.8 kB for 3 x 12 x 15)
        shown = repr(size)
        if isinstance(size, (torch.Tensor, np.ndarray)) and math.prod(size.shape) != 2:
            shown = f"{'a tensor' if isinstance(size, torch.Tensor) else 'an array'} of shape {tuple(size.shape)}"
        raise ValueError(f"{caller}: '{name}' must be (H, W), two positive whole numbers; got {shown}")
    return int(values[0]), int(values[1])


def as_path(path, caller: str, name: str = "path") -> Path:
    """``path`` (a ``str`` or ``os.PathLike``) as a :class:`~pathlib.Path`, or a ``TypeError`` naming
    ``name``: ``os.fspath``'s "expected str, bytes or os.PathLike object, not NoneType" named no
    argument and no function."""
    try:
        return Path(os.fspath(path))
    except TypeError:
        raise TypeError(f"{caller}: '{name}' must be a str or os.PathLike; got {type(path).__name__}") from None


def check_same_kind(tensor: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str,
                    caller: str) -> None:
    """Raise a ``ValueError`` unless ``tensor`` has ``reference``'s dtype and device (operations
    that mix them failed deep inside, or promoted without a word); both named as in the message
    ``"'grid' (torch.float64, cpu) and 'moving' (torch.float32, cpu) must have the same dtype and device"``."""
    if tensor.dtype != reference.dtype or tensor.device != reference.device:
        raise ValueError(f"{caller}: {_label(name)} ({tensor.dtype}, {tensor.device}) and {_label(reference_name)} "
                         f"({reference.dtype}, {reference.device}) must have the same dtype and device")


def _label(name: str) -> str:
    """An argument's name quoted (``'moving'``), a description as it is (``the images``)."""
    return name if " " in name else f"'{name}'"


def check_batch(matrix_batch: int, image_batch: int, caller: str) -> int:
    """Return the common batch size of a matrix batch and an image batch (1 broadcasts)."""
    if matrix_batch == image_batch or matrix_batch == 1 or image_batch == 1:
        return max(matrix_batch, image_batch)
    raise ValueError(
        f"{caller}: batch sizes differ: {matrix_batch} transforms for {image_batch} images "
        "(give one transform per image pair, or one for all)"
    )


def check_dtype(dtype: torch.dtype, caller: str) -> torch.dtype:
    """``dtype`` if it is one that tireg computes in (float32, float64); raise otherwise.

    An integer or bool dtype truncated values (a bundled image's ``[0, 1]`` to 0 and 1, the
    normalisation matrix's entries to 0), and a string reached ``Tensor.to`` as a device name.
    float16 and bfloat16 are refused too: no tireg function takes them.
    """
    if not isinstance(dtype, torch.dtype):
        shown = f"the string {dtype!r}" if isinstance(dtype, str) else type(dtype).__name__
        raise TypeError(f"{caller}: 'dtype' must be torch.float32 or torch.float64; got {shown}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{caller}: 'dtype' must be torch.float32 or torch.float64; got {dtype}")
    return dtype


def as_device(device: Union[torch.device, str, int, None], caller: str) -> Optional[torch.device]:
    """``device`` as a :class:`torch.device` (``None`` as it is), or a ``ValueError`` naming
    ``'device'``: torch's own "Expected one of cpu, cuda, ... device type at start of device
    string: foo" named neither the argument nor the function."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{caller}: 'device' must name a torch device such as 'cpu' or 'cuda'; got {device!r}") from None


def check_not_meta(matrix: torch.Tensor, image: torch.Tensor, caller: str) -> None:
    """A ``ValueError`` for a meta ``matrix`` with an ``image`` that holds values: its values are read
    (or copied to the image's device: "Cannot copy out of meta tensor; no data!").  Both on meta is
    a shape computation (a model run on meta), and passes."""
    if matrix.is_meta and not image.is_meta:
        raise ValueError(f"{caller}: 'matrix' is a meta tensor, which holds no values")


def check_option(value: str, options: Sequence[str], name: str, caller: str) -> str:
    """Return ``value`` if it is one of ``options``; raise a ``ValueError`` listing them otherwise."""
    if value not in options:
        raise ValueError(f"{caller}: unknown {name} {value!r}; choose one of {', '.join(map(repr, options))}")
    return value


def check_compile_option(value: object, caller: str) -> Union[bool, str]:
    """``compile`` must be ``True``, ``False`` or ``"auto"``: return it, or raise naming the option."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{caller}: 'compile' must be True, False or 'auto'; got {value!r}")
        return value
    if not isinstance(value, bool):
        raise TypeError(f"{caller}: 'compile' must be True, False or 'auto'; got {type(value).__name__}")
    return value


class TensorStamp:
    """A tensor as it is now, for caches of what is derived from it: the same live object, not
    changed in place since (its version counter), with the same ``settings``.

    The object is held by a weak reference: a key of ``id()`` (and even the data pointer and the
    shape) matched a *new* tensor made where a freed one had been, as a loop that passes a fresh
    ``frame.clone()`` every step does, and a model warped the previous frame.  A view (a new
    object each time: ``stack[:1]``, ``x.unsqueeze(0)``) is stamped by its base, held weakly,
    and where it lies in the base's memory (offset, shape, strides, dtype); views share their
    base's version counter.  An inference tensor keeps no version counter: its stamp matches
    nothing, and what derives from it is made again on every use.  A write that bypasses the
    counter (``.data``, a NumPy view) is not seen.
    """

    __slots__ = ("_tensor", "_layout", "_version", "_settings")

    def __reduce__(self):
        # a copy (pickle, torch.save, a process pool) cannot hold a weak reference: it matches nothing,
        # so that what was derived from the tensor is made again on its first use
        return (_expired_stamp, ())

    def __init__(self, tensor: torch.Tensor, *settings: Any) -> None:
        base, self._layout = _base_and_layout(tensor)
        self._tensor = weakref.ref(base)
        self._version = _version(tensor)
        self._settings = settings

    def matches(self, tensor: torch.Tensor, *settings: Any) -> bool:
        """Whether ``tensor`` is the stamped object (or the same view of the same base), unchanged,
        with the same ``settings``."""
        if self._version is None or self._settings != settings:
            return False
        base, layout = _base_and_layout(tensor)
        return self._tensor() is base and layout == self._layout and _version(tensor) == self._version


def _expired_stamp() -> TensorStamp:
    """A stamp that matches no tensor (what a pickled stamp becomes)."""
    stamp = TensorStamp.__new__(TensorStamp)
    stamp._tensor, stamp._layout, stamp._version, stamp._settings = None, None, None, ()
    return stamp


def _base_and_layout(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor a view looks into (itself if it is none) and where in its memory the view lies."""
    base = tensor if tensor._base is None else tensor._base
    return base, (tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def _version(tensor: torch.Tensor) -> Optional[int]:
    """The version counter, or ``None`` for an inference tensor (it keeps none, and says so by raising)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def matches(stamp: Optional[TensorStamp], tensor: torch.Tensor, *settings: Any) -> bool:
    """:meth:`TensorStamp.matches`, false where there is no stamp yet."""
    return stamp is not None and stamp.matches(tensor, *settings)


class FiniteCheckCache:
    """Remembers which tensors already passed :func:`check_image`.

    A training loop passes the same image tensors every step; checking them
    for NaN each time costs a pass over the data (and, on a GPU, a host
    synchronisation).  A tensor is checked again unless it is the same object,
    not modified in place since (:class:`TensorStamp`).
    """

    def __init__(self) -> None:
        self._seen: dict[str, TensorStamp] = {}

    def check(self, image: torch.Tensor, name: str, caller: str) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{caller}: '{name}' must be a torch.Tensor; got {type(image).__name__}")
        if not matches(self._seen.get(name), image):
            check_image(image, name, caller)
            self._seen[name] = TensorStamp(image)
        return image


# ----------------------------------------------------------------------------
# images as the public entry points take them


def pair_names(indices: Sequence[int]) -> str:
    """``pair 2`` or ``pairs [0, 2]``: the pairs of a batch that an error is about."""
    return f"pair {indices[0]}" if len(indices) == 1 else f"pairs {list(indices)}"


def of_pairs(bad: Union[torch.Tensor, Sequence[bool]], preposition: str = "in") -> str:
    """`` in pair 2`` or `` in pairs [0, 2]`` (``preposition`` first) for the true entries of ``bad``,
    one flag per entry of an input's batch; nothing for an input of one entry (it serves every pair,
    or is the only one)."""
    flags = bad.tolist() if isinstance(bad, torch.Tensor) else list(bad)
    indices = [index for index, flag in enumerate(flags) if flag]
    return f" {preposition} {pair_names(indices)}" if len(flags) > 1 and indices else ""


#: Unsigned integer dtypes of more than 16 bits (torch 2.3 and later), which torch's amax/amin refuse.
UNSIGNED_WIDE = tuple(getattr(torch, name) for name in ("uint32", "uint64") if hasattr(torch, name))


#: Modules whose frames lie between a user's call and a warning raised inside tireg: its own, the
#: context-manager decorators (``torch.no_grad()`` on a function) a call may pass through, and
#: ``nn.Module.__call__`` (``model(moving, fixed)``).
_PASSED_THROUGH = ("contextlib", "torch.utils._contextlib", "torch.nn.modules.module")


def user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for a warning raised by this function's caller: the first
    frame outside tireg (and the decorators of :data:`_PASSED_THROUGH`), the user's call.

    Why not a number: one check serves entry points that reach it through different numbers of
    their own calls (``initialize()``'s image check is one call deeper than ``register()``'s); a
    fixed ``stacklevel`` pointed one of them into tireg.  (Python 3.12's ``skip_file_prefixes``
    does this; tireg runs on 3.10.)
    """
    frame, level = sys._getframe(1), 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == "tireg" or module.startswith("tireg.") or module in _PASSED_THROUGH):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def checked_derivative(function: Callable[[torch.Tensor], Any], derivative: Callable[[torch.Tensor], Any],
                       x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A user's own derivative ``derivative(x)`` and a float64 central difference of ``function`` at
    ``x`` (float64), where that difference is clean: ``(theirs, central)``, each flattened to the
    points where the one-sided differences agree (not a kink) and ``central`` is not zero.  ``None``
    where either raises, is not finite, or is not of ``x``'s shape: a check of a mapping's or a
    loss's derivative leaves those to the step that uses it, which says what failed."""
    step = 1e-6 * max(1.0, float(x.abs().max()))
    try:
        with torch.no_grad():
            down, middle, up = (torch.as_tensor(function(x + offset), dtype=torch.float64)
                                for offset in (-step, 0.0, step))
            theirs = torch.as_tensor(derivative(x), dtype=torch.float64)
    except Exception:
        return None
    if not (theirs.shape == middle.shape == x.shape):
        return None
    central = (up - down) / (2 * step)
    one_sided = ((up - middle) - (middle - down)).abs() / step
    if not bool(torch.isfinite(central).all() and torch.isfinite(theirs).all()):
        return None
    clean = (one_sided <= 1e-4 * central.abs().max() + 1e-9) & (central.abs() > 1e-9 * central.abs().max())
    return theirs[clean], central[clean]


def as_image(image: ImageLike, name: str, caller: str, *, finite: bool = True,
             keep_wide_integers: bool = False) -> tuple[torch.Tensor, int]:
    """``(B, C, H, W)`` float tensor from a tensor or array of ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``
    (an array of any byte order, a long double one as float64: :func:`~tireg._validation.tensor_of_array`; a sparse
    tensor refused by name).  ``keep_wide_integers``: an integer image of more than 16 bits
    (:func:`is_wide_integer`) is returned as it is, for :func:`tireg.register` to convert pair by pair
    (``tireg.register._integer_float32``).  One conversion for ``register``, a result's ``warp``,
    the masks and the initialisers."""
    if isinstance(image, np.ndarray):
        image = tensor_of_array(image, name, caller)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{caller}: '{name}' must be a torch.Tensor or numpy.ndarray; got {type(image).__name__}")
    check_dense(image, name, caller)
    if image.is_meta:  # no values: the first one read failed deep inside
        raise ValueError(f"{caller}: '{name}' is a meta tensor, which holds no values")
    ndim = image.dim()
    if ndim not in (2, 3, 4):
        raise ValueError(
            f"{caller}: '{name}' must be (H, W), (C, H, W) or (B, C, H, W); got shape {tuple(image.shape)}"
        )
    if image.numel() == 0 or min(image.shape[-2:]) < 1:
        raise ValueError(f"{caller}: '{name}' is empty; got shape {tuple(image.shape)}")
    channels, _, width = image.shape if ndim == 3 else (0, 0, 0)
    if width < 8 and channels >= 4 * width and channels > 4:  # (H, W, C) with C <= 4 read as (C, H, W)
        # register() refuses images under 8 x 8 with the same hint; RegistrationResult.warp() resampled
        # a (192, 256, 3) RGB array as 192 channels of 256 x 3 pixels without a word
        raise ValueError(f"{caller}: '{name}' of shape {tuple(image.shape)} is read as (C, H, W): {channels} "
                         f"channels of {image.shape[1]} x {width} pixels; if it is (H, W, C), pass "
                         "np.moveaxis(image, -1, 0) or tensor.permute(2, 0, 1)")
    if 8 <= width <= 16 and channels >= 4 * width:  # an (H, W, C) array of 8 to 16 channels read as
        # (C, H, W): registered as a few columns of many channels, without a word (fewer columns than 8 are
        # refused by the size check, with the same hint)
        warnings.warn(f"{caller}: '{name}' of shape {tuple(image.shape)} is read as (C, H, W): {channels} channels "
                      f"of {image.shape[1]} x {width} pixels; if it is (H, W, C), pass np.moveaxis(image, -1, 0) "
                      "or tensor.permute(2, 0, 1)", UserWarning, stacklevel=user_stacklevel())
    if image.is_complex():
        raise TypeError(f"{caller}: '{name}' must be real; got {image.dtype}")
    if keep_wide_integers and is_wide_integer(image):
        pass  # register: pair by pair, each by its own values (_integer_float32)
    elif not image.is_floating_point():
        # integers beyond float32's 24 bits in float64 (float32 rounded them: an image of 3e10 + counts
        # was called constant), one dtype for the whole tensor (RegistrationResult.warp() resamples it).
        # By value, not by type: int32 and int64 images of small values are common (astype(int), PIL's
        # "I" mode), and float64 doubled their copies (a batch's peak memory 3x)
        wide = is_wide_integer(image) and any(wide_pairs(image.reshape(1, -1)))
        image = image.to(torch.float64 if wide else torch.float32)
    elif image.dtype not in (torch.float32, torch.float64):
        image = image.to(torch.float32)
    if finite and not all_finite(image):  # a mask's (register's images: _refuse_not_finite, once filled)
        # in a batch, which pairs (pair by pair: no image-sized flags)
        where = of_pairs([not all_finite(pair) for pair in image]) if ndim == 4 else ""
        raise ValueError(f"{caller}: '{name}' contains NaN or Inf values{where}")
    while image.dim() < 4:
        image = image.unsqueeze(0)
    return image, ndim


def is_wide_integer(image: torch.Tensor) -> bool:
    """Whether ``image`` is of an integer dtype of more than 16 bits (int32, int64, uint32, uint64),
    whose values may lie beyond float32's 24 bits."""
    return not image.is_floating_point() and image.dtype != torch.bool and torch.iinfo(image.dtype).bits > 16


def wide_pairs(image: torch.Tensor) -> list[bool]:
    """Per pair (first dimension) of an integer image of more than 16 bits: whether any of its values
    lies beyond float32's 24 bits (``|x| > 2^24``); an unsigned 32- or 64-bit one read in float64 a
    pair at a time (torch has no amax for them)."""
    if image.dtype in UNSIGNED_WIDE:
        return [bool(pair.to(torch.float64).amax() > 1 << 24) for pair in image]
    flat = image.flatten(1)
    return ((flat.amax(dim=1) > 1 << 24) | (flat.amin(dim=1) < -(1 << 24))).tolist()
