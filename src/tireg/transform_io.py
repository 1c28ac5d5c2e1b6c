"""Transform files: tireg's JSON document and ITK's text transform format (``.tfm``/``.txt``).

Convention:
    A transform is a homogeneous ``3 x 3`` matrix ``A`` in **pixel units** that
    maps a point of the **fixed** image to a point of the **moving** image,
    ``warped(x) = M(A x)``; ``x`` = column, ``y`` = row, pixel centres at the
    integers.  This is ITK's direction: an ITK transform maps points of the
    fixed image's *physical* space to the moving image's physical space.

    An image's geometry (:class:`ImageGeometry`, ITK's ``spacing``,
    ``origin`` and ``direction``, all in ``(x, y)`` order) sends a pixel to a
    physical point::

        p = D diag(spacing) x + origin,     P = [[D diag(spacing), origin], [0, 0, 1]]

    so the physical transform stored in an ITK file is
    ``A_physical = P_moving A P_fixed^-1``.  With the default geometry
    (spacing 1, origin 0, identity direction -- what SimpleITK gives a NumPy
    array, whose index ``(i, j)`` is ``(column, row)``) physical coordinates
    are pixel coordinates and ``A`` *is* the ITK transform.

    ITK writes an affine transform as a linear part ``L``, a translation ``t``
    and a centre ``c`` (its fixed parameters):
    ``x_moving = L (x_fixed - c) + c + t``.  ITK's 2-D rotation is
    ``[[cos, -sin], [sin, cos]]``; tireg's :func:`tireg.transforms.rotation`
    (OpenCV's) is its transpose, so with the default geometry a tireg angle
    ``theta`` is ITK's ``-theta``.  Files store matrices, so no angle is ever
    converted.

Formats, chosen by the file's suffix:

* ``.json``: tireg's document (full fidelity: batch, transform kind,
  parameters, centre, metadata; matrix always in pixel units)::

      {"format": "tireg-transform", "version": 1, "convention": "...",
       "matrix": [[...], [...], [...]]  (or a list of B such matrices),
       "transform": "rigid" | null, "parameters": {"angle": 0.1, ...},
       "center": [cx, cy] | [[cx, cy], ...] | null, "metadata": {...},
       "fixed_geometry": {...} | null, "moving_geometry": {...} | null}

* ``.tfm`` / ``.txt``: ITK's text format (``#Insight Transform File V1.0``),
  read by ITK, SimpleITK and 3D Slicer (2-D transforms only).  tireg writes
  one ``AffineTransform_double_2_2`` in physical units; the transform kind,
  parameters and metadata go into one ``#tireg: {...}`` comment line, which
  ITK skips.

JSON has no NaN or Inf, and :func:`save_transform` refuses them everywhere.  The
metadata written by :meth:`tireg.RegistrationResult.save` records a cost that is
not finite (a pair whose images do not overlap, ``stop_reason`` ``"no_overlap"``
or ``"not_finite"``) as the string ``"inf"``, ``"-inf"`` or ``"nan"``, which
``float()`` reads back; its matrices and parameters are always finite numbers.

Floats are written with Python's shortest round-trip ``repr`` (what ITK's
own writer does), so a value read back is bit-identical; a pixel matrix
that went through physical units comes back from the ``#tireg:`` comment's
record, also bit-identical, while the ITK lines still give it.  Files are written
atomically: to a temporary file in the same folder, then ``os.replace``; an
existing file is replaced as ``open()`` writes it (through a symbolic link,
keeping its permissions; one the user may not write is refused).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ._validation import as_path, check_flag, user_stacklevel

__all__ = [
    "ImageGeometry",
    "TransformFile",
    "save_transform",
    "load_transform",
    "JSON_SUFFIXES",
    "ITK_SUFFIXES",
]

#: Suffixes written and read as tireg's JSON document.
JSON_SUFFIXES = (".json",)
#: Suffixes written and read as ITK's text transform format.
ITK_SUFFIXES = (".tfm", ".txt")
#: ITK's binary transform files: not read, with a hint to convert them to text.
BINARY_SUFFIXES = (".h5", ".hdf5", ".mat", ".xfm")

FORMAT_NAME = "tireg-transform"
FORMAT_VERSION = 1
CONVENTION = (
    "matrix maps a fixed-image point to a moving-image point (warped(x) = moving(matrix @ x)), "
    "in pixel units, x = column, y = row, pixel centres at integer coordinates"
)

PathLike = Union[str, "os.PathLike[str]"]
MatrixLike = Union[torch.Tensor, np.ndarray, Sequence]
GeometryLike = Union["ImageGeometry", Mapping[str, Any], None]

_ITK_HEADER = "#Insight Transform File V1.0"
_TIREG_COMMENT = "#tireg:"
# Tolerance (pixels / unitless) for "the matrix recorded in a #tireg comment is
# the matrix the file's ITK lines give": far above round-off, far below an edit.
_COMMENT_ATOL = 1e-7
# ... to which is added this many units in the last place of the numbers the conversion through
# physical units handled (_rounding_scale): at an origin of 1e9 its round-off alone exceeds 1e-7 px,
# and the record was dropped for half of the matrices.  Measured: at most 3 units, over random
# geometries (origins up to 1e12, spacings 1e-3 to 1e3, rotated directions, centres).
_COMMENT_ULPS = 64


# ----------------------------------------------------------------------------
# image geometry


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image's pixels lie in physical space (ITK's image geometry, 2-D).

    ``p = direction @ diag(spacing) @ (x, y) + origin`` for the pixel
    ``(x, y)`` = (column, row).  All three are in ``(x, y)`` order, as ITK
    and SimpleITK give them (``image.GetSpacing()`` is (column spacing, row
    spacing); NumPy's ``(rows, columns)`` order is the reverse).

    Attributes:
        spacing: ``(sx, sy)``, physical size of a pixel; positive.
        origin: ``(ox, oy)``, physical position of pixel ``(0, 0)``'s centre.
        direction: ``2 x 2`` direction cosines ``((d00, d01), (d10, d11))``;
            also accepted flat, row by row (SimpleITK's ``GetDirection()``).
            Must be invertible.
    """

    spacing: tuple[float, float] = (1.0, 1.0)
    origin: tuple[float, float] = (0.0, 0.0)
    direction: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))

    def __post_init__(self) -> None:
        caller = "ImageGeometry()"
        spacing = _float_vector(self.spacing, 2, "spacing", caller)
        origin = _float_vector(self.origin, 2, "origin", caller)
        direction = _as_float_array(self.direction, "direction", caller)  # the checks spacing and origin get
        if direction.shape == (4,):
            direction = direction.reshape(2, 2)
        if direction.shape != (2, 2):
            raise ValueError(
                f"{caller}: 'direction' must have shape (2, 2) or (4,); got {tuple(direction.shape)}"
            )
        if not np.isfinite(direction).all():
            raise ValueError(f"{caller}: 'direction' contains NaN or Inf values")
        # a subnormal spacing has no finite (or no accurate) inverse: pixel <-> physical conversions gave
        # NaN and Inf; the message says so, as a spacing of 5e-324 is positive
        tiny = np.finfo(np.float64).tiny
        if not (spacing >= tiny).all():
            raise ValueError(
                f"{caller}: 'spacing' must be positive and at least {tiny:.2g}, float64's smallest normal number "
                f"(a smaller, subnormal spacing has no finite or no accurate inverse); got {tuple(spacing.tolist())}"
            )
        if abs(np.linalg.det(direction)) < 1e-12:
            raise ValueError(f"{caller}: 'direction' must be invertible; got {direction.tolist()}")
        object.__setattr__(self, "spacing", tuple(spacing.tolist()))
        object.__setattr__(self, "origin", tuple(origin.tolist()))
        object.__setattr__(self, "direction", tuple(tuple(row) for row in direction.tolist()))

    @classmethod
    def from_sitk(cls, image: Any) -> "ImageGeometry":
        """Geometry of a 2-D SimpleITK image (``GetSpacing``, ``GetOrigin``, ``GetDirection``)."""
        if not all(hasattr(image, name) for name in ("GetSpacing", "GetOrigin", "GetDirection")):
            raise TypeError(f"ImageGeometry.from_sitk(): expected a SimpleITK image; got {type(image).__name__}")
        spacing = tuple(image.GetSpacing())
        if len(spacing) != 2:
            raise ValueError(f"ImageGeometry.from_sitk(): the image must be 2-D; got {len(spacing)} dimensions")
        return cls(spacing=spacing, origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()))

    def physical_matrix(self) -> torch.Tensor:
        """``P = [[D diag(spacing), origin], [0, 0, 1]]``: pixel ``(x, y, 1)`` to physical point; float64 ``(3, 3)``."""
        return torch.from_numpy(self._matrix())

    def _matrix(self) -> np.ndarray:
        matrix = np.eye(3)
        matrix[:2, :2] = np.asarray(self.direction) * np.asarray(self.spacing)[None, :]
        matrix[:2, 2] = self.origin
        return matrix

    def to_dict(self) -> dict[str, list]:
        """``{"spacing": [sx, sy], "origin": [ox, oy], "direction": [[...], [...]]}`` (as stored in JSON)."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": [list(row) for row in self.direction],
        }


def _as_geometry(geometry: GeometryLike, name: str, caller: str) -> Optional[ImageGeometry]:
    """``None``, an :class:`ImageGeometry` or a mapping with (some of) its fields."""
    if geometry is None or isinstance(geometry, ImageGeometry):
        return geometry
    if isinstance(geometry, Mapping):
        unknown = set(geometry) - {"spacing", "origin", "direction"}
        if unknown:
            raise ValueError(
                f"{caller}: '{name}' has unknown keys {sorted(map(str, unknown))}; "
                "expected 'spacing', 'origin', 'direction'"
            )
        try:
            return ImageGeometry(**geometry)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{caller}: '{name}': {error}") from None
    raise TypeError(
        f"{caller}: '{name}' must be an ImageGeometry, a dict with 'spacing'/'origin'/'direction' "
        f"or None; got {type(geometry).__name__}"
    )


def _geometry_matrix(geometry: Optional[ImageGeometry]) -> np.ndarray:
    return np.eye(3) if geometry is None else geometry._matrix()


# ----------------------------------------------------------------------------
# the loaded result


@dataclass(frozen=True)
class TransformFile:
    """What :func:`load_transform` read.

    Attributes:
        matrix: float64 ``(3, 3)``, or ``(B, 3, 3)`` for a batch saved as JSON;
            fixed -> moving, pixel units (see the module's Convention).
        transform: the transform kind (e.g. ``"rigid"``) for files written by
            tireg with one; for other ITK files the ITK type of the file's
            (outer) transform, e.g. ``"Euler2DTransform_double_2_2"``; or ``None``.
        parameters: ``{name: float or list}`` as saved; ``{}`` when unknown.
        center: float64 ``(2,)`` or ``(B, 2)`` in fixed-image pixels, or
            ``None`` (for ITK files: the transform's centre, converted from
            physical units; ``None`` for translations, identities, composites).
        metadata: the saved metadata; for ITK files not written by tireg,
            ``{"itk_transforms": [{"transform", "parameters",
            "fixed_parameters"}, ...]}``, the raw blocks in file order.
        fixed_geometry, moving_geometry: the geometries the pixel matrix
            refers to: those passed to :func:`load_transform`, else those the
            file records (a JSON document, or an ITK file written by
            :func:`save_transform`); ``None`` for pixel = physical.

    A ``TransformFile`` made directly keeps detached copies of the ``matrix`` and ``center`` it is
    given (tensors or arrays): kept by reference, a later in-place change of the caller's tensor
    changed the "file" too.
    """

    matrix: torch.Tensor
    transform: Optional[str] = None
    parameters: dict[str, Any] = field(default_factory=dict)
    center: Optional[torch.Tensor] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    fixed_geometry: Optional[ImageGeometry] = None
    moving_geometry: Optional[ImageGeometry] = None

    def __post_init__(self) -> None:
        for name in ("matrix", "center"):  # frozen: set through object.__setattr__
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                object.__setattr__(self, name, value.detach().clone())
            elif isinstance(value, np.ndarray):
                object.__setattr__(self, name, value.copy())


# ----------------------------------------------------------------------------
# checks and conversions


def _float_vector(value: Any, size: int, name: str, caller: str) -> np.ndarray:
    """``value`` as a finite float64 vector of ``size`` entries."""
    array = _as_float_array(value, name, caller)
    if array.shape != (size,):
        raise ValueError(f"{caller}: '{name}' must have {size} values; got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{caller}: '{name}' contains NaN or Inf values")
    return array


def _as_float_array(value: Any, name: str, caller: str) -> np.ndarray:
    """A tensor, array or nested list of real numbers as a float64 NumPy array.

    Strict where NumPy is lenient: strings (``"1"``), booleans and complex numbers are refused,
    not converted; a Python integer beyond float64's range is a ``ValueError``, not an
    ``OverflowError`` from deep inside.
    """
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise TypeError(f"{caller}: '{name}' is a meta tensor, which holds no values")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{caller}: '{name}' must be real numbers; got {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    expected = f"{caller}: '{name}' must be a tensor, an array or nested lists of real numbers"
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{expected}; got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # ragged lists
        raise TypeError(f"{expected}, all rows of one length; got {type(value).__name__}") from None
    if not isinstance(value, np.ndarray) and array.dtype.kind in "iuf":  # lists: NumPy made [True, 0] numbers
        boolean = next((item for item in np.asarray(value, dtype=object).reshape(-1)
                        if isinstance(item, (bool, np.bool_))), None)
        if boolean is not None:
            raise TypeError(f"{expected}; got an entry {boolean!r}")
    if array.dtype == object:  # Python integers beyond int64, or entries that are not numbers
        odd = [item for item in array.reshape(-1) if not isinstance(item, numbers.Real) or isinstance(item, bool)]
        if odd:  # a list, not next(..., None): an entry None was taken for "none found", and read as NaN
            raise TypeError(f"{expected}; got an entry {odd[0]!r}")
        try:
            return array.astype(np.float64)
        except OverflowError:
            raise ValueError(f"{caller}: '{name}' has a value beyond float64's range") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{expected}; got {type(value).__name__} of {array.dtype}")
    return array.astype(np.float64)


def _check_matrix(array: np.ndarray, prefix: str) -> np.ndarray:
    """Finite affine ``(3, 3)`` or ``(B, 3, 3)`` float64 array with last row ``(0, 0, 1)`` (set exactly).

    ``prefix`` starts every message, e.g. ``"save_transform(): 'matrix'"``.
    """
    if array.ndim not in (2, 3) or array.shape[-2:] != (3, 3) or (array.ndim == 3 and array.shape[0] == 0):
        raise ValueError(f"{prefix} must have shape (3, 3) or (B, 3, 3) with B >= 1; got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{prefix} contains NaN or Inf values")
    last = array[..., 2, :].reshape(-1, 3)
    bad = np.abs(last - np.array([0.0, 0.0, 1.0])).max(axis=1) > 1e-9
    if bad.any():
        raise ValueError(
            f"{prefix} must be affine, with last row (0, 0, 1); got {last[bad][0].tolist()}"
        )
    array = array.copy()
    array[..., 2, :] = (0.0, 0.0, 1.0)
    return array


def _warn_if_singular(array: np.ndarray, caller: str) -> None:
    """``UserWarning`` when a linear part is singular (numerically): allowed, but rarely intended."""
    linear = array.reshape(-1, 3, 3)[:, :2, :2]
    singular = [i for i, block in enumerate(linear) if np.linalg.cond(block) > 1.0 / np.finfo(np.float64).eps]
    if singular:
        which = "" if array.ndim == 2 else f" (batch entries {singular})"
        warnings.warn(
            f"{caller}: the matrix's linear part is singular{which}: it maps the fixed image onto a line "
            "or a point and has no inverse; it is saved as given",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _jsonable(value: Any, where: str, caller: str) -> Any:
    """``value`` with tensors and arrays as (nested) lists; ``TypeError`` naming the first bad entry.

    JSON keeps ``dict`` (with ``str`` keys), lists, strings, finite numbers,
    booleans and ``None``; tuples become lists.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        try:
            str(value)  # what json.dumps does; Python refuses more than 4300 digits
        except ValueError:
            raise ValueError(f"{caller}: {where} is an integer of more than 4300 digits") from None
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{caller}: {where} is {value}; JSON has no NaN or Inf")
        return value
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        if isinstance(value, torch.Tensor):
            if value.is_meta:
                raise TypeError(f"{caller}: {where} is a meta tensor, which holds no values")
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return _jsonable(array.tolist(), where, caller)
        raise TypeError(f"{caller}: {where} has dtype {array.dtype}, which JSON cannot store")
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{caller}: {where} has a key {key!r} that is not a string (JSON keys are strings)")
            result[key] = _jsonable(item, f"{where}[{key!r}]", caller)
        return result
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]", caller) for i, item in enumerate(value)]
    raise TypeError(f"{caller}: {where} has type {type(value).__name__}, which JSON cannot store")


def _check_parameters(parameters: Optional[Mapping[str, Any]], caller: str) -> dict[str, Any]:
    """``{name: float or (nested) list of floats}``."""
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise TypeError(f"{caller}: 'parameters' must be a dict {{name: value}}; got {type(parameters).__name__}")
    result = {}
    for name, value in parameters.items():
        if not isinstance(name, str):
            raise TypeError(f"{caller}: 'parameters' names must be strings; got {name!r}")
        array = _as_float_array(value, f"parameters[{name!r}]", caller)
        if not np.isfinite(array).all():
            raise ValueError(f"{caller}: 'parameters[{name!r}]' contains NaN or Inf values")
        result[name] = float(array) if array.ndim == 0 else array.tolist()
    return result


def _check_center(center: Any, batch: Optional[int], caller: str) -> Optional[np.ndarray]:
    """``(2,)``, or ``(B, 2)`` for a batch of ``B`` matrices; finite."""
    if center is None:
        return None
    array = _as_float_array(center, "center", caller)
    shapes = [(2,)] if batch is None else [(2,), (batch, 2)]
    if array.shape not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{caller}: 'center' must have shape {expected}; got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{caller}: 'center' contains NaN or Inf values")
    return array


def _format(value: float) -> str:
    """Shortest string that reads back as the same double (ITK's writer does the same)."""
    return repr(float(value))


def _suffix(path: Path, caller: str) -> str:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES + ITK_SUFFIXES:
        return suffix
    hint = ""
    if suffix in BINARY_SUFFIXES and caller.startswith("load"):
        hint = " (convert it to text first, e.g. sitk.WriteTransform(sitk.ReadTransform(path), 'out.tfm'))"
    elif suffix in BINARY_SUFFIXES:  # writing: the reading hint misled
        hint = " (tireg writes text transforms; SimpleITK converts one: sitk.WriteTransform(sitk.ReadTransform(" \
               "'t.tfm'), 'out" + suffix + "'))"
    raise ValueError(
        f"{caller}: unsupported file suffix {suffix or '(none)'!r} in {str(path)!r}; "
        f"use one of {', '.join(JSON_SUFFIXES + ITK_SUFFIXES)}{hint}"
    )


# ----------------------------------------------------------------------------
# writing


def save_transform(
    path: PathLike,
    matrix: MatrixLike,
    *,
    transform: Optional[str] = None,
    parameters: Optional[Mapping[str, Any]] = None,
    center: Optional[MatrixLike] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    fixed_geometry: GeometryLike = None,
    moving_geometry: GeometryLike = None,
    overwrite: bool = True,
) -> Path:
    """Write a fixed -> moving pixel matrix to ``path``; the format follows the suffix.

    * ``.json``: tireg's document; keeps a batch ``(B, 3, 3)``, the kind,
      parameters, centre and metadata exactly.  The matrix stays in pixel
      units; geometries, if given, are recorded alongside.
    * ``.tfm`` / ``.txt``: ITK's text format, one ``AffineTransform_double_2_2``
      in physical units, ``A_physical = P_moving A P_fixed^-1`` (see the
      module's Convention), with ITK's parameters
      ``Parameters: a00 a01 a10 a11 tx ty`` and ``FixedParameters: cx cy``,
      ``x_moving = L (x - c) + c + t``.  ``c`` is ``center`` (fixed-image
      pixels) taken to physical units, or ITK's default ``(0, 0)``.  A batch
      of ``B > 1`` matrices is refused (ITK would read one transform or a
      composition, never a batch); ``(1, 3, 3)`` is written as one.

    Args:
        path: destination; its suffix picks the format.
        matrix: ``(3, 3)`` or ``(B, 3, 3)`` tensor, array or nested lists;
            finite, affine (last row ``(0, 0, 1)``).  A singular linear part
            is saved with a ``UserWarning`` (a valid forward map, but one
            with no inverse; ITK writes such matrices as well).
        transform: the kind's name (e.g. ``"rigid"``; any string); recorded.
        parameters: ``{name: value}``, values numbers, tensors or lists,
            e.g. ``{"angle": 0.1, "tx": 2.0, "ty": -1.0}`` (or one list per
            name for a batch); recorded as given, not checked against ``matrix``.
        center: ``(2,)`` (or ``(B, 2)`` in JSON), fixed-image pixels.
        metadata: JSON-serialisable ``dict`` (tensors and arrays become lists).
        fixed_geometry, moving_geometry: :class:`ImageGeometry` or dict with
            ``spacing``/``origin``/``direction``; ``None`` is pixel = physical.
        overwrite: if ``False``, refuse to replace an existing file
            (``FileExistsError``).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    The file is written to a temporary file in the same folder and moved into
    place with ``os.replace``; on any error no file, partial or temporary,
    is left behind, and an existing ``path`` is untouched.  An error while
    writing names ``path``, not the temporary file: ``PermissionError:
    save_transform(): cannot write 'x/a.tfm': the folder 'x' is not writable``.
    """
    caller = "save_transform()"
    path = as_path(path, caller)  # before the matrix: save_transform(None, m) raised os.fspath's words
    suffix = _suffix(path, caller)
    array = _check_matrix(_as_float_array(matrix, "matrix", caller), f"{caller}: 'matrix'")
    if transform is not None and not isinstance(transform, str):
        raise TypeError(f"{caller}: 'transform' must be a string or None; got {type(transform).__name__}")
    params = _check_parameters(parameters, caller)
    center_array = _check_center(center, array.shape[0] if array.ndim == 3 else None, caller)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"{caller}: 'metadata' must be a dict; got {type(metadata).__name__}")
    try:
        meta = _jsonable(dict(metadata or {}), "'metadata'", caller)
    except RecursionError:
        raise ValueError(f"{caller}: 'metadata' is nested too deeply, or contains itself") from None
    fixed = _as_geometry(fixed_geometry, "fixed_geometry", caller)
    moving = _as_geometry(moving_geometry, "moving_geometry", caller)
    if not check_flag(overwrite, "overwrite", caller) and path.exists():  # 'no' had replaced the file (truthy)
        raise FileExistsError(f"{caller}: {str(path)!r} already exists; pass overwrite=True to replace it")
    _warn_if_singular(array, caller)

    if suffix in JSON_SUFFIXES:
        document = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "convention": CONVENTION,
            "matrix": array.tolist(),
            "transform": transform,
            "parameters": params,
            "center": None if center_array is None else center_array.tolist(),
            "metadata": meta,
            "fixed_geometry": None if fixed is None else fixed.to_dict(),
            "moving_geometry": None if moving is None else moving.to_dict(),
        }
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    else:
        if array.ndim == 3:
            if array.shape[0] > 1:
                raise ValueError(
                    f"{caller}: an ITK transform file holds one transform, got a batch of {array.shape[0]} "
                    f"matrices; save each pair separately (e.g. one file per index), or use .json for a batch"
                )
            array = array[0]
            if center_array is not None and center_array.ndim == 2:
                center_array = center_array[0]
        text = _itk_text(array, center_array, fixed, moving, transform, params, meta, caller)
    _atomic_write(path, text, overwrite, caller)
    return path


def _itk_text(
    array: np.ndarray,
    center: Optional[np.ndarray],
    fixed: Optional[ImageGeometry],
    moving: Optional[ImageGeometry],
    transform: Optional[str],
    parameters: dict[str, Any],
    metadata: dict[str, Any],
    caller: str,
) -> str:
    """ITK text for one pixel matrix, in physical units, with a ``#tireg:`` comment that records
    the pixel matrix and centre as given (read back bit for bit while they still describe the file)."""
    fixed_matrix = _geometry_matrix(fixed)
    with np.errstate(all="ignore"):  # an overflow is refused below, by name
        physical = _geometry_matrix(moving) @ array @ np.linalg.inv(fixed_matrix)
        linear, offset = physical[:2, :2], physical[:2, 2]
        center_physical = np.zeros(2) if center is None else (fixed_matrix @ np.append(center, 1.0))[:2]
        translation = offset - center_physical + linear @ center_physical
    values = [*linear.reshape(-1), *translation]
    if not np.isfinite([*values, *center_physical]).all():
        raise ValueError(f"{caller}: the matrix in physical units (the geometries' spacing and origin applied) "
                         "is beyond float64's range; nothing was written")
    comment = {"transform": transform, "parameters": parameters, "metadata": metadata, "matrix": array.tolist(),
               "center": None if center is None else center.tolist(),
               "fixed_geometry": None if fixed is None else fixed.to_dict(),
               "moving_geometry": None if moving is None else moving.to_dict()}
    return "\n".join(
        [
            _ITK_HEADER,
            _TIREG_COMMENT + " " + json.dumps(comment, allow_nan=False),
            "#Transform 0",
            "Transform: AffineTransform_double_2_2",
            "Parameters: " + " ".join(_format(v) for v in values),
            "FixedParameters: " + " ".join(_format(v) for v in center_physical),
            "",
        ]
    )


def _atomic_write(path: Path, text: str, overwrite: bool, caller: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flushed to disk, then move it into place."""
    from .io import atomic_path  # light: image libraries load only when an image is read or written

    with atomic_path(path, overwrite=overwrite, caller=caller) as temporary:
        with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------
# reading


def load_transform(
    path: PathLike,
    *,
    fixed_geometry: GeometryLike = None,
    moving_geometry: GeometryLike = None,
) -> TransformFile:
    """Read a transform file as a fixed -> moving pixel matrix.

    * ``.json``: tireg's document.  Its matrix is in pixel units and returned
      as saved (``(3, 3)`` or ``(B, 3, 3)``).  Geometries given here must
      match those recorded in the file (if any), else ``ValueError``.
    * ``.tfm`` / ``.txt``: ITK's text format, written by tireg, ITK, SimpleITK
      or 3D Slicer, in physical units: the pixel matrix is
      ``A = P_moving^-1 A_physical P_fixed`` for the geometries given here
      (``None``: those a file written by :func:`save_transform` records in
      its ``#tireg:`` comment, as a JSON document's; else pixel = physical).  2-D types read (``double`` or ``float``):

      =================================  ==========================  ==================
      type                               Parameters                  FixedParameters
      =================================  ==========================  ==================
      ``AffineTransform``                ``a00 a01 a10 a11 tx ty``   ``cx cy``
      ``MatrixOffsetTransformBase``      ``a00 a01 a10 a11 tx ty``   ``cx cy``
      ``CenteredAffineTransform``        ``a00 a01 a10 a11 cx cy tx ty``  two, ignored
      ``Euler2DTransform``               ``angle tx ty``             ``cx cy``
      ``Rigid2DTransform``               ``angle tx ty``             ``cx cy``
      ``CenteredRigid2DTransform``       ``angle cx cy tx ty``       (ignored)
      ``Similarity2DTransform``          ``scale angle tx ty``       ``cx cy``
      ``CenteredSimilarity2DTransform``  ``scale angle cx cy tx ty``  (ignored)
      ``ScaleTransform``                 ``sx sy``                   ``cx cy``
      ``TranslationTransform``           ``tx ty``                   none
      ``IdentityTransform``              none                        none
      ``CompositeTransform``             (header of the blocks that follow)
      =================================  ==========================  ==================

      with ``x_moving = L (x - c) + c + t`` and ITK's rotation
      ``L = scale [[cos, -sin], [sin, cos]]``.  A ``CompositeTransform`` file
      lists transforms ``T1 .. Tn`` in the order they were added; ITK applies
      the **last** first, ``x_moving = T1(T2(... Tn(x)))``, so
      ``A_physical = T1 @ T2 @ ... @ Tn``.

      Stricter than ITK where ITK would silently misread: a block without a
      ``FixedParameters:`` line (ITK then keeps the identity), several
      transforms without a ``CompositeTransform`` header (SimpleITK keeps the
      first), and unknown ``Name:`` entries are refused; so are numbers that
      only Python's ``float()`` reads (``1_0``, non-ASCII digits,
      ``infinity``): a number is a plain decimal such as ``-1.5`` or
      ``2.5e-3``, separated by ASCII white space.  Comment lines are
      skipped, and may hold bytes that are not UTF-8 (a Latin-1 ``# für``,
      which ITK and SimpleITK read); every other line must be UTF-8 text,
      the ``#tireg:`` comment too.  A ``#tireg:`` comment written by
      :func:`save_transform` gives back the kind, parameters and metadata
      when its recorded pixel matrix equals the one read (same geometries,
      file not edited; metadata always).
      Unknown keys in a JSON document are ignored.

    Args:
        path: the file; its suffix picks the format.
        fixed_geometry, moving_geometry: :class:`ImageGeometry` or dict, for
            ITK files (see above).

    Returns:
        A :class:`TransformFile`; ``matrix`` is float64 on the CPU.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder.
        ValueError: unsupported suffix; malformed file, unsupported or 3-D
            transform type, wrong parameter count, non-finite or non-affine
            values, text that is not UTF-8 (outside an ITK file's comment
            lines) -- naming the file and, for ITK files, the line.
    """
    caller = "load_transform()"
    path = as_path(path, caller)
    if path.is_dir():  # before the suffix: a folder has none, and that message misled
        raise IsADirectoryError(f"{caller}: {str(path)!r} is a folder, not a transform file")
    suffix = _suffix(path, caller)
    fixed = _as_geometry(fixed_geometry, "fixed_geometry", caller)
    moving = _as_geometry(moving_geometry, "moving_geometry", caller)
    if not path.exists():
        raise FileNotFoundError(f"{caller}: no such file: {str(path)!r}")
    data = path.read_bytes()
    if suffix in JSON_SUFFIXES:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError(f"{caller}: {str(path)!r} is not a UTF-8 text file") from None
        return _read_json(text, path, fixed, moving, caller)
    # ITK reads bytes, and its comments may be in any encoding (a Latin-1 "# für"): a byte that is not
    # UTF-8 becomes a lone surrogate here, allowed in comment lines only (_read_itk)
    return _read_itk(data.decode("utf-8-sig", errors="surrogateescape"), path, fixed, moving, caller)


def _read_json(
    text: str, path: Path, fixed: Optional[ImageGeometry], moving: Optional[ImageGeometry], caller: str
) -> TransformFile:
    where = f"{caller}: {str(path)!r}"
    try:
        document = _parse_json(text)
    except ValueError as error:  # JSONDecodeError, NaN or Infinity, an integer of over 4300 digits
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a tireg transform document (no \"format\": \"{FORMAT_NAME}\")")
    version = document.get("version")
    if type(version) is not int or version != FORMAT_VERSION:  # not true, not 1.0
        raise ValueError(f"{where} has version {version!r}; this tireg reads version {FORMAT_VERSION}")
    if "matrix" not in document:
        raise ValueError(f"{where} has no \"matrix\"")
    array = _check_matrix(_json_numbers(document["matrix"], "matrix", "a 3 x 3 list of numbers (or a list of them)",
                                        where), f"{where}: \"matrix\"")
    transform = document.get("transform")
    if transform is not None and not isinstance(transform, str):
        raise ValueError(f"{where}: \"transform\" must be a string or null; got {transform!r}")
    parameters, metadata = (_json_object(document, key, where) for key in ("parameters", "metadata"))
    try:
        parameters = _check_parameters(parameters, where)
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None
    center = document.get("center")
    if center is not None:
        center = _json_numbers(center, "center", "[cx, cy] (or one per matrix)", where)
        shapes = [(2,)] if array.ndim == 2 else [(2,), (array.shape[0], 2)]
        if center.shape not in shapes or not np.isfinite(center).all():
            raise ValueError(
                f"{where}: \"center\" must be finite with shape {' or '.join(map(str, shapes))}; "
                f"got {center.tolist()}"
            )
    recorded = {}
    for key, given in (("fixed_geometry", fixed), ("moving_geometry", moving)):
        try:
            stored = _as_geometry(document.get(key), key, where)
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None
        if given is not None and stored is not None and given != stored:
            raise ValueError(
                f"{where}: its pixel matrix refers to {key} {stored}, not the {given} given; "
                "a JSON matrix is in pixel units and is not converted"
            )
        recorded[key] = stored if stored is not None else given
    return TransformFile(
        matrix=torch.from_numpy(array),
        transform=transform,
        parameters=parameters,
        center=None if center is None else torch.from_numpy(center),
        metadata=metadata,
        **recorded,
    )


def _parse_json(text: str) -> Any:
    """``json.loads``, refusing what Python's reader takes but JSON has not (NaN, Infinity) and
    turning a ``RecursionError`` (arrays nested thousands deep) into a ``ValueError``."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_numbers(value: Any, key: str, expected: str, where: str) -> np.ndarray:
    """A document's numbers (``"matrix"``, ``"center"``) as float64; strings and booleans refused."""
    try:
        return _as_float_array(value, key, where)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: \"{key}\" must be {expected}; got {json.dumps(value)[:80]}") from None


def _json_object(document: dict, key: str, where: str) -> dict:
    """``document[key]``: an object, or ``{}`` where it is absent or null (``[]``, ``""``, ``0`` are refused)."""
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: \"{key}\" must be an object; got {value!r}")
    return value


# ITK types: name -> (number of parameters, allowed numbers of fixed parameters, builder).
# A builder takes (parameters, fixed parameters) and returns (L, t, c or None) with
# x_moving = L (x - c) + c + t, all in ITK's physical frame.


def _itk_rotation(angle: float) -> np.ndarray:
    """ITK's 2-D rotation ``[[cos, -sin], [sin, cos]]``."""
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


# Two fixed parameters where ITK requires them (MatrixOffsetTransformBase.SetFixedParameters, which
# CenteredAffineTransform inherits though its centre is in its parameters): an empty line, once read
# here as the centre (0, 0), is "Error setting fixed parameters: parameters array size (0)" to ITK.
# CenteredRigid2D and CenteredSimilarity2D ignore theirs, whatever their number (0 or 2 here).
_ITK_TYPES = {
    "AffineTransform": (6, (2,), lambda p, f: (p[:4].reshape(2, 2), p[4:6], f)),
    "MatrixOffsetTransformBase": (6, (2,), lambda p, f: (p[:4].reshape(2, 2), p[4:6], f)),
    "CenteredAffineTransform": (8, (2,), lambda p, f: (p[:4].reshape(2, 2), p[6:8], p[4:6])),
    "Euler2DTransform": (3, (2,), lambda p, f: (_itk_rotation(p[0]), p[1:3], f)),
    "Rigid2DTransform": (3, (2,), lambda p, f: (_itk_rotation(p[0]), p[1:3], f)),
    "CenteredRigid2DTransform": (5, (0, 2), lambda p, f: (_itk_rotation(p[0]), p[3:5], p[1:3])),
    "Similarity2DTransform": (4, (2,), lambda p, f: (p[0] * _itk_rotation(p[1]), p[2:4], f)),
    "CenteredSimilarity2DTransform": (6, (0, 2), lambda p, f: (p[0] * _itk_rotation(p[1]), p[4:6], p[2:4])),
    "ScaleTransform": (2, (2,), lambda p, f: (np.diag(p), np.zeros(2), f)),
    "TranslationTransform": (2, (0,), lambda p, f: (np.eye(2), p, None)),
    "IdentityTransform": (0, (0,), lambda p, f: (np.eye(2), np.zeros(2), None)),
}
_COMPOSITE = "CompositeTransform"
_TYPE_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(double|float)_(\d+)_(\d+)$")


@dataclass
class _Block:
    type: str
    line: int
    parameters: Optional[np.ndarray] = None
    fixed: Optional[np.ndarray] = None


def _read_itk(
    text: str, path: Path, fixed: Optional[ImageGeometry], moving: Optional[ImageGeometry], caller: str
) -> TransformFile:
    where = f"{caller}: {str(path)!r}"
    blocks: list[_Block] = []
    comment: Optional[dict] = None
    for number, raw in enumerate(_LINE_BREAK.split(text), start=1):
        line = raw.strip()
        if not line:
            continue
        undecoded = _UNDECODED_BYTE.search(line)
        if undecoded and (line.startswith(_TIREG_COMMENT) or not line.startswith("#")):
            byte = ord(undecoded.group()) - 0xDC00
            which = "tireg's '#tireg:' record, which it writes in UTF-8" if line.startswith("#") else "not a comment"
            raise ValueError(f"{where} is not a UTF-8 text file: line {number} ({which}) holds the byte "
                             f"0x{byte:02x}; only comment lines may hold text in another encoding")
        if line.startswith(_TIREG_COMMENT):
            try:
                comment = _parse_json(line[len(_TIREG_COMMENT):])
            except ValueError:
                comment = None  # a damaged comment only loses the provenance
            continue
        if line.startswith("#"):
            continue
        if line.startswith("("):
            raise ValueError(
                f"{where}, line {number}: looks like an elastix parameter file, not an ITK transform file "
                f"({line[:60]!r})"
            )
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon:
            raise ValueError(f"{where}, line {number}: expected 'Name: values'; got {line[:80]!r}")
        if name == "Transform":
            if not value.strip():
                raise ValueError(f"{where}, line {number}: 'Transform:' names no type")
            blocks.append(_Block(value.strip(), number))
        elif name in ("Parameters", "FixedParameters"):
            if not blocks:
                raise ValueError(f"{where}, line {number}: '{name}:' before any 'Transform:' line")
            attribute = "parameters" if name == "Parameters" else "fixed"
            if getattr(blocks[-1], attribute) is not None:
                raise ValueError(f"{where}, line {number}: a second '{name}:' line for one transform")
            setattr(blocks[-1], attribute, _parse_numbers(value, f"{where}, line {number}"))
        else:
            raise ValueError(
                f"{where}, line {number}: unknown entry {name!r}; expected 'Transform', 'Parameters' "
                "or 'FixedParameters'"
            )
    if not blocks:
        raise ValueError(f"{where} is not an ITK transform file: it has no 'Transform:' line")

    kinds = [_split_type(block, where) for block in blocks]
    if kinds[0] == _COMPOSITE:
        for block in blocks[:1]:
            if block.parameters is not None and block.parameters.size:
                raise ValueError(f"{where}, line {block.line}: a CompositeTransform has no parameters of its own")
        members = list(zip(blocks[1:], kinds[1:]))
    elif len(blocks) > 1:
        raise ValueError(
            f"{where} holds {len(blocks)} transforms without a CompositeTransform header (line {blocks[1].line}); "
            "ITK readers disagree on such files (SimpleITK uses only the first), so tireg refuses it"
        )
    else:
        members = [(blocks[0], kinds[0])]

    physical = np.eye(3)
    magnitude = np.eye(3)  # of the numbers that went into physical (_rounding_scale)
    center_physical: Optional[np.ndarray] = None
    for block, kind in members:
        if kind == _COMPOSITE:
            raise ValueError(f"{where}, line {block.line}: a CompositeTransform can only be the first transform")
        matrix, center_physical = _itk_block_matrix(block, kind, where)
        with np.errstate(all="ignore"):  # an overflow is refused below, by name (NumPy's warnings came first)
            physical = physical @ matrix  # T1 @ T2 @ ... : ITK applies the last-added transform first
            magnitude = magnitude @ _block_magnitude(matrix, center_physical)  # inf: _rounding_scale's 0
    if not np.isfinite(physical).all():  # each block's is finite: their product is not
        raise ValueError(f"{where}: the product of its {len(members)} transforms (a CompositeTransform) is beyond "
                         "float64's range")
    if len(blocks) > 1 or kinds[0] == _COMPOSITE:
        center_physical = None

    given = (fixed, moving)
    if isinstance(comment, dict):  # written by tireg: geometries not given are those recorded, as in JSON
        fixed, moving = (geometry if geometry is not None else _recorded_geometry(comment, key)
                         for geometry, key in ((fixed, "fixed_geometry"), (moving, "moving_geometry")))
    fixed_matrix = _geometry_matrix(fixed)
    with np.errstate(all="ignore"):  # an overflow is refused below, by name
        array = np.linalg.solve(_geometry_matrix(moving), physical @ fixed_matrix)
        array[2] = (0.0, 0.0, 1.0)
        center = None
        if center_physical is not None:
            center = np.linalg.solve(fixed_matrix, np.append(center_physical, 1.0))[:2]
    if not np.isfinite(array).all() or (center is not None and not np.isfinite(center).all()):
        # finite in physical units: the geometries did it (given, or recorded in the #tireg: comment)
        applied = " and ".join(f"{key}{'' if before is not None else ' (recorded in the file)'}"
                               for key, geometry, before in zip(("fixed_geometry", "moving_geometry"),
                                                                (fixed, moving), given) if geometry is not None)
        raise ValueError(f"{where}: the transform in pixel units (the spacing and origin of {applied} "
                         "applied) is beyond float64's range")
    scales = _rounding_scale(magnitude, center_physical, fixed_matrix, _geometry_matrix(moving))

    raw_blocks = [
        {
            "transform": block.type,
            "parameters": [] if block.parameters is None else block.parameters.tolist(),
            "fixed_parameters": [] if block.fixed is None else block.fixed.tolist(),
        }
        for block in blocks
    ]
    transform, parameters, metadata = blocks[0].type, {}, {"itk_transforms": raw_blocks}
    if isinstance(comment, dict):
        _warn_other_geometries(comment, *given, path)
        transform, parameters, metadata, array, center = _restore_comment(
            comment, (transform, parameters, metadata, array, center), scales)
    return TransformFile(
        matrix=torch.from_numpy(array),
        transform=transform,
        parameters=parameters,
        center=None if center is None else torch.from_numpy(center),
        metadata=metadata,
        fixed_geometry=fixed,
        moving_geometry=moving,
    )


# A number as ITK's text reader takes one (a C++ stream's extraction): ASCII digits, a sign, a point
# and exponent.  Python's float() takes more, read otherwise or not at all by ITK and SimpleITK:
# "1_0" (10 to Python), non-ASCII digits ("١٠", "１０"), "infinity".
_ITK_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_ITK_NOT_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_ASCII_SPACE = re.compile(r"[ \t\n\r\f\v]+")
# A byte that is not UTF-8, as ``errors="surrogateescape"`` decodes it (0x80-0xff to U+DC80-U+DCFF).
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")
# Where a line ends: at "\n" as ITK reads it, and at "\r\n" or a lone "\r" (Python's universal newlines).
# ``str.splitlines()`` also broke lines at VT, FF, \x1c-\x1e, NEL, U+2028 and U+2029, which ITK reads as
# characters: a comment holding one made a file that SimpleITK reads "unknown entry" here, and the line
# numbers after it wrong.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _parse_numbers(value: str, where: str) -> np.ndarray:
    """The numbers of a ``Parameters:`` or ``FixedParameters:`` line: plain decimal or scientific
    tokens (:data:`_ITK_NUMBER`) separated by ASCII white space; NaN and Inf refused by name."""
    tokens = [token for token in _ASCII_SPACE.split(value) if token]
    if any(_ITK_NOT_FINITE.fullmatch(token) for token in tokens):
        raise ValueError(f"{where}: NaN or Inf in {value.strip()[:80]!r}")
    odd = next((token for token in tokens if not _ITK_NUMBER.fullmatch(token)), None)
    if odd is not None:
        raise ValueError(f"{where}: expected numbers; got {value.strip()[:80]!r} ({odd[:40]!r} is not a "
                         "decimal number such as -1.5 or 2.5e-3)")
    numbers = np.array([float(token) for token in tokens], dtype=np.float64)
    if not np.isfinite(numbers).all():  # beyond float64's range, e.g. 1e999
        raise ValueError(f"{where}: NaN or Inf in {value.strip()[:80]!r}")
    return numbers


def _split_type(block: _Block, where: str) -> str:
    """The class name of ``Name_double_2_2``; ``ValueError`` for 3-D or unsupported types."""
    match = _TYPE_PATTERN.match(block.type)
    if match is None:
        raise ValueError(
            f"{where}, line {block.line}: malformed transform type {block.type!r}; "
            "expected e.g. 'AffineTransform_double_2_2'"
        )
    kind, _, input_dim, output_dim = match.groups()
    if (input_dim, output_dim) != ("2", "2"):
        raise ValueError(
            f"{where}, line {block.line}: {block.type!r} is a {input_dim}-D -> {output_dim}-D transform; "
            "tireg reads 2-D transforms only (type ..._2_2)"
        )
    if kind != _COMPOSITE and kind not in _ITK_TYPES:
        raise ValueError(
            f"{where}, line {block.line}: unsupported transform type {block.type!r}; tireg reads "
            f"{', '.join([*_ITK_TYPES, _COMPOSITE])} (2-D, double or float)"
        )
    return kind


def _itk_block_matrix(block: _Block, kind: str, where: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Physical ``3 x 3`` matrix and centre (or ``None``) of one ITK transform block."""
    count, fixed_counts, build = _ITK_TYPES[kind]
    at = f"{where}, line {block.line} ({block.type})"
    # ITK applies the parameters only once it has read the FixedParameters line:
    # a block without it silently becomes the identity in ITK, so it is refused here.
    if block.parameters is None or block.fixed is None:
        missing = "Parameters" if block.parameters is None else "FixedParameters"
        raise ValueError(f"{at}: no '{missing}:' line")
    if block.parameters.size != count:
        raise ValueError(f"{at}: expected {count} parameters; got {block.parameters.size}")
    if block.fixed.size not in fixed_counts:
        expected = " or ".join(str(n) for n in fixed_counts)
        refused = "; ITK refuses it too" if block.fixed.size < 2 and 0 not in fixed_counts else ""
        raise ValueError(f"{at}: expected {expected} fixed parameters; got {block.fixed.size}{refused}")
    linear, translation, center = build(block.parameters, block.fixed)
    with np.errstate(all="ignore"):  # refused below, by name (NumPy's warnings came first)
        offset = translation if center is None else center + translation - linear @ center
    if not np.isfinite(offset).all():  # e.g. Parameters: 1e308 0 0 1e308 ... and a centre of (10, 20)
        raise ValueError(f"{at}: its offset in physical units, c + t - L c, is beyond float64's range")
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = offset
    return matrix, center


def _block_magnitude(matrix: np.ndarray, center: Optional[np.ndarray]) -> np.ndarray:
    """``|matrix|``, its offset column raised by the magnitudes of what :func:`_itk_block_matrix` summed
    into it, ``c + t - L c`` (an offset near 0 may come of terms near 1e9)."""
    magnitude = np.abs(matrix)
    if center is not None:
        magnitude[:2, 2] += np.abs(center) + np.abs(matrix[:2, :2]) @ np.abs(center)
    return magnitude


def _rounding_scale(magnitude: np.ndarray, center_physical: Optional[np.ndarray], fixed_matrix: np.ndarray,
                    moving_matrix: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """How large, in pixel units, the numbers were that gave the pixel matrix (and centre) read from the
    ITK lines: ``|P_moving^-1| magnitude |P_fixed|`` (``magnitude``: :func:`_block_magnitude`'s, the
    physical matrix's), and ``|P_fixed^-1| |c|``.  Round-off through physical units is a few units in the
    last place of these, per entry (at an origin of 1e9, a few 1e-7 px).  An entry beyond float64's range
    (a geometry near overflow) is 0: the fixed tolerance alone, not an infinite one that any edit passes."""
    with np.errstate(all="ignore"):
        matrix_scale = np.abs(np.linalg.inv(moving_matrix)) @ magnitude @ np.abs(fixed_matrix)
        center_scale = None
        if center_physical is not None:
            center_scale = (np.abs(np.linalg.inv(fixed_matrix)) @ np.append(np.abs(center_physical), 1.0))[:2]
    return tuple(None if scale is None else np.where(np.isfinite(scale), scale, 0.0)
                 for scale in (matrix_scale, center_scale))


def _recorded_geometry(comment: dict, key: str) -> Optional[ImageGeometry]:
    """The geometry a ``#tireg:`` comment records under ``key`` (``None``: none, or unreadable)."""
    try:
        return _as_geometry(comment.get(key), key, "")
    except (TypeError, ValueError):  # a damaged comment only loses the provenance
        return None


def _warn_other_geometries(comment: dict, fixed: Optional[ImageGeometry], moving: Optional[ImageGeometry],
                           path: Path) -> None:
    """Warn where a ``#tireg:`` comment records geometries other than those given (``None``: not given,
    the recorded ones are used): the ITK lines are in physical units, and read with other geometries
    they give another pixel matrix (3 px off on a test, silently)."""
    differences = []
    for key, given in (("fixed_geometry", fixed), ("moving_geometry", moving)):
        if key not in comment or given is None:  # written before geometries were recorded; or not given
            continue
        stored = _recorded_geometry(comment, key)
        if (stored or ImageGeometry()) != given:
            differences.append(f"{key} {stored} but is read with {given}")
    if differences:
        warnings.warn(f"load_transform(): {str(path)!r} was saved with {'; and with '.join(differences)}: its pixel "
                      "matrix is not the one saved (pass the geometries as when saving)", UserWarning, stacklevel=user_stacklevel())


def _restore_comment(comment: dict, read: tuple, scales: tuple[np.ndarray, Optional[np.ndarray]]) -> tuple:
    """``(transform, parameters, metadata, matrix, center)`` from a ``#tireg:`` comment where it
    still describes the file, else ``read``'s (what the ITK lines gave).

    The comment records the pixel matrix (and centre) it was written with.  Where the matrix
    read from the ITK lines is that matrix to rounding (same geometry, file not edited), the
    recorded matrix and centre are returned, bit for bit as saved (the round trip through
    physical units differs in the last bits), with the kind and parameters; metadata always.
    "To rounding" is scaled by ``scales`` (:func:`_rounding_scale`): the size of the numbers
    the conversion handled, large where the geometry's origin is.
    """
    transform, parameters, metadata, array, center = read
    if isinstance(comment.get("metadata"), dict):
        metadata = comment["metadata"]
    matrix_scale, center_scale = scales
    recorded = _recorded(comment.get("matrix"), (3, 3), array, matrix_scale)
    if recorded is None:
        return transform, parameters, metadata, array, center
    if center is not None and comment.get("center") is not None:  # none recorded: ITK's (0, 0) as read
        recorded_center = _recorded(comment["center"], (2,), center, center_scale)
        center = center if recorded_center is None else recorded_center
    recorded_kind = comment.get("transform")
    try:
        recorded_parameters = _check_parameters(comment.get("parameters"), "")
    except (TypeError, ValueError):
        recorded_parameters = parameters
    return (recorded_kind if isinstance(recorded_kind, str) or recorded_kind is None else transform,
            recorded_parameters, metadata, recorded, center)


def _recorded(value: Any, shape: tuple, read: np.ndarray, scale: np.ndarray) -> Optional[np.ndarray]:
    """A ``#tireg:`` comment's ``value`` as float64 of ``shape`` if it equals ``read`` to rounding, else
    ``None``: to ``_COMMENT_ATOL`` and a relative 1e-9, and to ``_COMMENT_ULPS`` units in the last place
    of ``scale`` (per entry, :func:`_rounding_scale`)."""
    try:
        recorded = _as_float_array(value, "", "")
    except (TypeError, ValueError):
        return None
    if recorded.shape != shape or not np.isfinite(recorded).all():
        return None
    tolerance = _COMMENT_ATOL + 1e-9 * np.abs(recorded) + _COMMENT_ULPS * np.finfo(np.float64).eps * scale
    return recorded if bool((np.abs(read - recorded) <= tolerance).all()) else None
