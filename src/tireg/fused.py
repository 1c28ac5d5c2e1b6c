"""The compiled fast path: sample, exact gradient, per-pixel cost and moments in one pass.

The reference analytic path (:mod:`tireg.analytic`) runs three heavy kernels
per evaluation: ``grid_sample`` for ``M(A x)``, ``grid_sampler_2d_backward``
for ``C' grad M(A x)``, and the row/column sums of the moments, with the
sampling grid and the per-pixel cost as further passes over memory.  The
two sampler kernels each find the same four neighbours of every point.
PyTorch has no sampler that returns the value *and* its derivative from one
gather, so this module writes the bilinear interpolant out by hand, in
plain tensor operations that ``torch.compile`` fuses into one loop over the
pixels (C++ on the CPU, Triton on a GPU)::

    (x, y) = A (j, i, 1)          x0 = floor x, fx = x - x0 (likewise y)
    a = m10 - m00,  b = m01 - m00,  c = m11 - m10 - m01 + m00
    M(x, y)  = m00 + fx a + fy (b + fx c)
    dM/dx    = a + fy c,          dM/dy = b + fx c

``m00 .. m11`` are the four neighbours of the padding-extended image, so the
value and the derivative are exactly those of ``grid_sample``'s bilinear
interpolant and of its derivative kernel.  (On the CPU each pixel is stored
packed with its right-hand neighbour, :func:`pack_pairs`, so that two
gathers fetch all four.)  Where the interpolant has a kink
(an integer coordinate) this path takes the right-hand derivative;
``grid_sample`` gets its point back from normalised coordinates within
rounding of the integer on either side, so it takes the left-hand one at
some pixels (and 0 on the edge pixels with ``"border"`` padding, where this
path takes the inward one): a set of measure zero, but one a registration
can start on (the identity), and then the first steps differ
(``docs/design.md``, "Same numbers").  The same pass forms
the per-pixel cost ``rho(r)``, ``rho'(r)`` and the sums a step needs::

    G[k, :] = sum_x rho'(r) dM/dk (x, y, 1)                 (k in x, y)
    H[kl, :] = sum_x w_irls dM/dk dM/dl (x^2, xy, y^2, x, y, 1)

No ``(B, H, W, 2)`` sampling grid and no per-pixel gradient image is stored
(on the CPU one pair of coordinate images ``x, y`` per grid size is kept,
:func:`coordinate_grids`, shared by every pair and step).

Eagerly these operations are slower than the reference kernels (each
gather is its own pass), so the path is used only compiled; where
``torch.compile`` cannot run (no C++ compiler, an unsupported device) the
first call warns once and the reference path is used from then on.
Supported: bilinear interpolation, ``"zeros"`` and ``"border"`` padding,
per-pixel losses.  Anything else uses the reference path.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ._chunks import chunk_slices
from ._device import ForkSafeLock
from ._validation import user_stacklevel
from .losses import PerPixelLoss, constant_irls_weight, verified
from .metrics import _mean_count
from .sampling import gaussian_blur_in_place

__all__ = [
    "FusedMoments", "FUSED_PADDING", "supports", "pad_moving", "bilinear_moments", "compiled",
    "compiled_bilinear_moments", "run_compiled", "call_compiled", "coordinate_grids", "pack_pairs", "prepare_moving",
    "dynamic_shapes", "prepared_image", "run_compiled_in_bands", "BAND_PIXELS", "band_rows", "STEP_BAND_PIXELS",
    "STEP_BANDS", "step_band_rows", "step_in_bands",
]

#: Padding modes of the fused path and the pixels each adds on every side of the moving image.
FUSED_PADDING = {"zeros": 2, "border": 2}
IRLS_EPS = 1e-3  # |r| below this uses the IRLS weight's limit rho'(eps) / eps (as the reference path)


@dataclass
class FusedMoments:
    """What one fused pass returns, per image pair (sums over the fixed pixels, weighted).

    Attributes:
        cost: ``(B,)`` ``sum_c sum_x w rho(r)``.
        count: ``(B,)`` ``sum_x w``.
        matrix_gradient: ``(B, 2, 3)`` ``G = sum_c sum_x w rho'(r) grad M(A x) (x, y, 1)``
            in moving-image pixel units.
        products: ``(B, 3, 6)`` or ``None``: for the products ``(gx gx, gx gy, gy gy)``
            weighted by ``w rho'(r) / r``, the moments ``(x^2, xy, y^2, x, y, 1)``
            (:func:`tireg.sampling.grid_moments`' second order).
        warped: ``(B, C, H, W)`` ``M(A x)``, or ``None`` when not asked for.
    """

    cost: torch.Tensor
    count: torch.Tensor
    matrix_gradient: torch.Tensor
    products: Optional[torch.Tensor]
    warped: Optional[torch.Tensor]

    def mean(self, channels: int) -> "FusedMoments":
        """The sums divided by ``C sum w`` (:func:`tireg.metrics._mean_count`): a :class:`~tireg.metrics.PerPixelMetric`'s mean."""
        scale = _mean_count(self.count, channels)
        return FusedMoments(
            self.cost / scale,
            self.count,
            self.matrix_gradient / scale[:, None, None],
            None if self.products is None else self.products / scale[:, None, None],
            self.warped,
        )


def supports(interpolation: str, padding_mode: str, loss: object, dtype: torch.dtype = torch.float32,
             channels: int = 1) -> bool:
    """Whether the fused path computes this configuration (otherwise use the reference path).

    A loss of one's own is tried once first on two pairs of the images' ``channels`` and ``dtype``
    (:func:`tireg.losses.verified`): inside the kernel a derivative of the wrong shape would
    broadcast without a word, and one of another dtype failed the trace, which turned the compiled
    path off for the whole process.  A loss that fails the trial is not supported: the reference
    path, which checks the loss on the real images, runs it (or names its mistake).
    """
    if not (interpolation == "bilinear" and padding_mode in FUSED_PADDING and isinstance(loss, PerPixelLoss)):
        return False
    try:
        verified(loss, dtype, channels)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: e.g. a loss that holds CUDA tensors
        return False
    return True


def pad_moving(moving: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """The moving image extended as :func:`bilinear_moments` expects, ``(B, C, Hm + 2p, Wm + 2p)``.

    Two rows and columns on every side: zeros for ``"zeros"``, the repeated
    edge for ``"border"``.  Compute it once per moving image.
    """
    pad = FUSED_PADDING[padding_mode]
    return F.pad(moving, (pad, pad, pad, pad), mode="constant" if padding_mode == "zeros" else "replicate")


def pack_pairs(padded: torch.Tensor) -> torch.Tensor:
    """Each float32 pixel with its right-hand neighbour, packed into one int64: ``(B, C, Hp, Wp - 1)``.

    ``packed[..., i, j]`` holds the bits of ``padded[..., i, j]`` in its low and
    of ``padded[..., i, j + 1]`` in its high 32 bits (whatever the byte order;
    :func:`_unpack_pairs` splits them by arithmetic), so one gather fetches two of a point's four bilinear
    neighbours and :func:`bilinear_moments` gathers twice per point instead of
    four times.  Why by hand: inductor's C++ backend gathers lane by lane
    (one scalar load and store each), so halving the gathers took 13-15 % off
    the kernel at 256 x 256 and 1024 x 1024 on the CPU.
    """
    if padded.dtype != torch.float32:
        raise ValueError(f"pack_pairs(): the image must be float32; got {padded.dtype}")
    words = padded.contiguous().view(torch.int32)
    packed = torch.empty((*padded.shape[:-1], padded.shape[-1] - 1), dtype=torch.int64, device=padded.device)
    # written as two int32 halves, low or high word first as this machine orders them: no
    # int64 temporaries (a batch's peak memory counts every image-sized copy)
    halves = packed.view(torch.int32).unflatten(-1, (-1, 2))
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    halves[..., low] = words[..., :-1]
    halves[..., high] = words[..., 1:]
    return packed


def _unpack_pairs(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 values of :func:`pack_pairs`' int64s: (low, high), bit for bit."""
    low = ((packed << 32) >> 32).to(torch.int32)  # sign-extended back into int32's range: no overflow
    high = (packed >> 32).to(torch.int32)
    return low.view(torch.float32), high.view(torch.float32)


def prepare_moving(
    moving: torch.Tensor, padding_mode: str, normalization: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """The moving image as :func:`bilinear_moments` reads it: :func:`pad_moving`, and on the CPU
    in float32 also :func:`pack_pairs` (the GPU kernel keeps four plain gathers: unmeasured there).

    ``normalization``: ``(mean, std)``, each broadcastable to ``(B, C, 1, 1)``: prepare
    ``(moving - mean) / std`` instead, bit for bit, without that image as a copy of its own
    (``"border"`` padding only: a zero pad would not stay zero).  ``smoothing``: then a Gaussian of
    this sigma (:func:`tireg.sampling.gaussian_blur_in_place`, border padding), inside the prepared
    copy, ``"border"`` only.  Compute it once per moving image.
    """
    if moving.device.type == "cpu" and moving.dtype == torch.float32:
        prepared = _pack_padded(moving, padding_mode)
    else:
        prepared = pad_moving(moving, padding_mode)
    if normalization is not None:
        if padding_mode != "border":
            raise ValueError(f"prepare_moving(): normalization needs 'border' padding; got {padding_mode!r}")
        mean, std = normalization
        # a packed pixel is two float32 values: the same arithmetic on each, in place
        prepared.view(moving.dtype).sub_(mean).div_(std)
    if smoothing > 0:
        if padding_mode != "border":
            raise ValueError(f"prepare_moving(): smoothing needs 'border' padding; got {padding_mode!r}")
        _smooth_prepared(prepared, smoothing)
    return prepared


def _smooth_prepared(prepared: torch.Tensor, sigma: float) -> None:
    """Smooth the moving image inside :func:`prepare_moving`'s ``"border"`` result, in place, then
    write its padding ring again (and, packed, the high words: padded column ``j + 1``)."""
    pad = FUSED_PADDING["border"]
    image = gaussian_blur_in_place(prepared_image(prepared, "border"), sigma)
    height, width = image.shape[-2:]
    packed = prepared.dtype == torch.int64
    low = 0 if sys.byteorder == "little" else 1
    plane = prepared.view(torch.float32)[..., low::2] if packed else prepared
    plane[..., pad:pad + height, :pad] = image[..., :1]
    plane[..., pad:pad + height, pad + width:] = image[..., -1:]
    plane[..., :pad, :] = plane[..., pad:pad + 1, :]
    plane[..., pad + height:, :] = plane[..., pad + height - 1:pad + height, :]
    if packed:  # column j's high word is padded column j + 1; the last is the border's edge value again
        high = prepared.view(torch.float32)[..., 1 - low::2]
        # in bands of rows: the two views share memory, so torch copies the source whole first
        for start in range(0, high.shape[-2], 64):
            rows = slice(start, start + 64)
            high[..., rows, :-1] = plane[..., rows, 1:]
            high[..., rows, -1:] = plane[..., rows, -1:]


def prepared_image(prepared: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """The moving image inside :func:`prepare_moving`'s result, as a view: the same pixels, no copy.

    A caller that keeps the prepared image can drop its own copy of the moving image.
    """
    pad = FUSED_PADDING[padding_mode]
    packed = prepared.dtype == torch.int64
    # a packed pixel's low word is the padded image's pixel j (its high word pixel j + 1)
    low = 0 if sys.byteorder == "little" else 1
    plane = prepared.view(torch.float32)[..., low::2] if packed else prepared
    height, width = plane.shape[-2] - 2 * pad, plane.shape[-1] + int(packed) - 2 * pad
    return plane[..., pad:pad + height, pad:pad + width]


def _pack_padded(moving: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``pack_pairs(pad_moving(moving, padding_mode))``, bit for bit, written straight from ``moving``:
    no padded image in between (a batch's peak memory counts every image-sized copy)."""
    pad = FUSED_PADDING[padding_mode]
    border = padding_mode == "border"
    batch, channels, height, width = moving.shape
    words = moving.view(torch.int32)  # any strides (an expanded batch stays a view)
    packed = torch.empty((batch, channels, height + 2 * pad, width + 2 * pad - 1), dtype=torch.int64,
                         device=moving.device)  # (packed on the CPU only, :func:`prepare_moving`)
    halves = packed.view(torch.int32).unflatten(-1, (-1, 2))
    for half, shift in zip((0, 1) if sys.byteorder == "little" else (1, 0), (0, 1)):
        target = halves[..., half]  # column j holds padded column j + shift
        rows = target[..., pad:pad + height, :]
        first = pad - shift  # the column holding the moving image's column 0
        rows[..., first:first + width] = words
        rows[..., :first] = words[..., :1] if border else 0  # int32 0: the bits of 0.0
        rows[..., first + width:] = words[..., -1:] if border else 0
        target[..., :pad, :] = target[..., pad:pad + 1, :] if border else 0
        target[..., pad + height:, :] = target[..., pad + height - 1:pad + height, :] if border else 0
    return packed


def bilinear_moments(
    fixed: torch.Tensor,
    padded: torch.Tensor,
    matrix: torch.Tensor,
    loss: PerPixelLoss,
    padding_mode: str,
    weight: Optional[torch.Tensor] = None,
    inside_only: bool = False,
    hessian: bool = False,
    return_warped: bool = False,
    coordinates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    warped_into: Optional[torch.Tensor] = None,
) -> FusedMoments:
    """One pass over the fixed pixels: warped value, exact gradient, cost and moments (see the module).

    Args:
        fixed: ``(B, C, H, W)``.
        padded: :func:`pad_moving` of the moving image, ``(B, C, Hm + 2p, Wm + 2p)``,
            or its :func:`pack_pairs` (int64, one column fewer); :func:`prepare_moving`
            picks.
        matrix: ``(B, 3, 3)`` fixed -> moving pixel matrices.
        loss: the per-pixel loss; ``loss(x, y, True)`` gives ``(rho, rho')``.
        padding_mode: ``"zeros"`` or ``"border"``, as :func:`pad_moving` used.
        weight: optional ``(B, 1, H, W)`` pixel weights ``w`` (default 1).
        inside_only: also weight by whether ``A x`` lies inside the moving
            image, ``0 <= x <= Wm - 1`` and ``0 <= y <= Hm - 1`` (what
            :func:`tireg.register` counts).
        hessian: also return the Gauss-Newton product moments.
        return_warped: also return ``M(A x)``.
        warped_into: optional ``(B, C, H, W)`` tensor (a view of a taller image's rows) that
            ``M(A x)`` is written into (returned as ``warped`` only with ``return_warped``):
            compiled, the pass stores it there, with no copy (:func:`run_compiled_in_bands`).
        coordinates: optional :func:`coordinate_grids` ``(x, y)`` of the fixed
            grid (default: broadcast ``arange`` rows and columns).
    """
    batch, channels, height, width = fixed.shape
    pad = FUSED_PADDING[padding_mode]
    packed = padded.dtype == torch.int64
    padded_height, padded_width = padded.shape[-2], padded.shape[-1] + int(packed)
    moving_height, moving_width = padded_height - 2 * pad, padded_width - 2 * pad
    dtype, device = fixed.dtype, fixed.device
    if coordinates is None:
        xs = torch.arange(width, dtype=dtype, device=device).view(1, 1, 1, width)
        ys = torch.arange(height, dtype=dtype, device=device).view(1, 1, height, 1)
    else:
        xs, ys = coordinates
    coefficients = matrix[:, :2, :].to(dtype).reshape(batch, 6, 1, 1, 1)
    x = coefficients[:, 0] * xs + coefficients[:, 1] * ys + coefficients[:, 2]  # (B, 1, H, W)
    y = coefficients[:, 3] * xs + coefficients[:, 4] * ys + coefficients[:, 5]
    inside = (x >= 0) & (x <= moving_width - 1) & (y >= 0) & (y <= moving_height - 1)  # False for NaN
    # Two padding pixels a side: a point clamped into the outermost cell sees four equal
    # neighbours (zeros, or the repeated edge), so its value is right and its derivative 0.
    # A trial step far off may give a huge, infinite or NaN point: fmin/fmax (unlike clamp)
    # send NaN to the bound too, so every gather stays in range.  (Per point, two vector
    # operations; sanitising the six matrix entries instead is recomputed for every vector
    # of points in the fused loop, and cost 12 % of the kernel.)
    x_clamped = torch.fmax(torch.fmin(x, _scalar(moving_width, x)), _scalar(-2.0, x))
    y_clamped = torch.fmax(torch.fmin(y, _scalar(moving_height, y)), _scalar(-2.0, y))
    x0, y0 = x_clamped.floor(), y_clamped.floor()
    fx, fy = x_clamped - x0, y_clamped - y0
    # flat index of the top-left neighbour in (B, C, Hp, row): one gather base per point and channel
    row = padded.shape[-1]
    plane = torch.arange(batch * channels, device=device).view(batch, channels, 1, 1) * (padded_height * row)
    top_left = plane + (y0.long() + pad) * row + (x0.long() + pad)  # (B, C, H, W)
    flat = padded.reshape(-1)
    if packed:  # one gather per row of the 2 x 2 cell
        m00, m10 = _unpack_pairs(flat[top_left])
        m01, m11 = _unpack_pairs(flat[top_left + row])
    else:
        m00, m10 = flat[top_left], flat[top_left + 1]
        m01, m11 = flat[top_left + row], flat[top_left + row + 1]
    slope_x, slope_y, twist = m10 - m00, m01 - m00, m11 - m10 - m01 + m00
    gradient_y = slope_y + fx * twist
    gradient_x = slope_x + fy * twist
    warped = m00 + fx * slope_x + fy * gradient_y

    pixel_weight = torch.ones_like(x) if weight is None else weight.to(dtype)
    if inside_only:
        pixel_weight = pixel_weight * inside.to(dtype)
    rho, derivative = loss(warped, fixed, True)
    cost = (pixel_weight * rho).sum(dim=(1, 2, 3))
    count = pixel_weight.sum(dim=(1, 2, 3)).expand(cost.shape)  # (B,): a shared (1, 1, H, W) weight gave (1,)
    weighted = pixel_weight * derivative  # w rho'(r), (B, C, H, W)
    pixels = (1, 2, 3)  # channels are summed with the pixels

    def first_moments(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([(values * xs).sum(dim=pixels), (values * ys).sum(dim=pixels), values.sum(dim=pixels)], 1)

    matrix_gradient = torch.stack([first_moments(weighted * gradient_x), first_moments(weighted * gradient_y)], dim=1)
    products = None
    if hessian:
        constant = constant_irls_weight(loss)  # L2: 2 everywhere, no division by the residual
        if constant is not None:
            irls = pixel_weight * constant
        else:
            residual = warped - fixed
            small = residual.abs() < IRLS_EPS
            _, at_eps = loss(fixed + IRLS_EPS, fixed, True)
            safe = torch.where(small, torch.full_like(residual, IRLS_EPS), residual)
            irls = pixel_weight * torch.where(small, at_eps / IRLS_EPS, derivative / safe)
        monomials = (xs * xs, xs * ys, ys * ys, xs, ys, torch.ones_like(xs))
        rows = []
        for product in (irls * gradient_x * gradient_x, irls * gradient_x * gradient_y, irls * gradient_y * gradient_y):
            rows.append(torch.stack([(product * monomial).sum(dim=pixels) for monomial in monomials], 1))
        products = torch.stack(rows, dim=1)
    if warped_into is not None:
        warped_into.copy_(warped)
    return FusedMoments(cost, count, matrix_gradient, products, warped if return_warped else None)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=like.dtype, device=like.device)


def coordinate_grids(fixed: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Pixel coordinates ``x = j``, ``y = i`` of ``fixed``'s grid as two stored ``(1, 1, H, W)`` images,
    for :func:`bilinear_moments` on the CPU; ``None`` on other devices.

    Why stored: with broadcast ``arange`` axes inductor's C++ backend splits
    the pass into several loops (the sums over ``x`` and ``y`` get a 2-D loop
    nest, the gather a flat one, with the sampled points stored between
    them); with stored coordinates every operand is indexed alike and the
    whole pass is one loop: measured 10-15 % off the kernel at 256 x 256 and
    1024 x 1024.  A GPU kernel computes ``i, j`` from its index for free, so
    there the axes stay.  Build once per grid size and keep (``8 H W`` bytes
    in float32).
    """
    if fixed.device.type != "cpu":
        return None
    height, width = fixed.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=fixed.dtype), torch.arange(width, dtype=fixed.dtype), indexing="ij"
    )
    return xs.reshape(1, 1, height, width).contiguous(), ys.reshape(1, 1, height, width).contiguous()


_compiled: dict[tuple[Callable, str, bool], Callable] = {}
_failed: set[str] = set()
#: What running out of device memory raises (torch.cuda's name in older torch).
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory: a GPU's, or the CPU allocator's ``RuntimeError``."""
    return (isinstance(error, (_OUT_OF_MEMORY, MemoryError))
            or isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
_lock = ForkSafeLock()


#: Inductor options of the compiled kernels: every gather index is in range by construction (the
#: points are clamped into the padded image, see :func:`bilinear_moments`), so the per-vector
#: bounds check goes; and index arithmetic in 32 bits where every tensor has fewer than 2^31
#: elements (:func:`compiled` picks).  Together about 15 % off the kernel at 256 x 256.
#: ``force_pointwise_cat``: the matrix algebra of a model's step stacks a few scalars into
#: 3 x 3 matrices; lowered as copies into views of a buffer, every piece was a view made by
#: the wrapper on every call (64 for a similarity step, about 40 us of a 0.55 ms step).
_OPTIONS = {"assert_indirect_indexing": False, "force_pointwise_cat": True}
_OPTIONS_32_BIT = {**_OPTIONS, "assume_32bit_indexing": True}


def compiled(
    function: Callable, device: torch.device, *, small: bool = False, dynamic: Optional[bool] = None
) -> Callable:
    """``torch.compile(function, fullgraph=True, dynamic=dynamic)`` for ``device``'s type, built once per process.

    ``small``: every tensor the function sees has fewer than ``2^31``
    elements, so its indices may be computed in 32 bits.  ``dynamic``: as
    ``torch.compile``'s (see :func:`dynamic_shapes` for the kernel's choice).
    ``torch.compile`` itself keeps one specialisation per shape, dtype and
    option set (a pyramid level is compiled on its first evaluation; later
    processes reuse inductor's on-disk cache).
    """
    key = (function, torch.device(device).type, small, dynamic)
    with _lock:
        if key not in _compiled:
            _quiet_own_recompile_limit()
            _compiled[key] = torch.compile(function, fullgraph=True, dynamic=dynamic, options=_known_options(small))
        return _compiled[key]


class _OwnRecompileLimit(logging.Filter):
    """Drops dynamo's warning that a function of tireg's hit its recompile limit: :func:`call_compiled`
    raises the limit for that call (:data:`RECOMPILE_LIMIT`) and runs it compiled, so the warning
    (nine lines a new variant past the eighth, past ``-q`` too: a log record, not a Python
    warning) told of a fallback that did not happen.  The warning about any other function stays."""

    _package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("recompile_limit" in message and self._package in message)


def _quiet_own_recompile_limit() -> None:
    """Install :class:`_OwnRecompileLimit` on dynamo's logger, once per process."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(existing, _OwnRecompileLimit) for existing in logger.filters):
        logger.addFilter(_OwnRecompileLimit())


def dynamic_shapes(fixed: torch.Tensor) -> Optional[bool]:
    """``torch.compile``'s ``dynamic`` for a kernel built on :func:`bilinear_moments` (it, or a
    model's whole step) on a batch like ``fixed``: ``True`` for a batch of several pairs on the
    CPU, else ``None`` (torch's default).

    Why: with every size symbolic, inductor's C++ backend loops over the batch
    outside and keeps each pair's intermediate images in buffers of one image
    plane, which stay in cache; a kernel specialised to the batch size (torch's
    default on a first call), or to it alone (its default after a pyramid's
    second level size), stores those intermediates as whole-batch images and
    reads them back.  Measured on the CPU with one thread: 128 pairs of
    256 x 256 at 49 ms a pass, against 89 ms static and 150 ms with only the
    image size symbolic, and a registration of 8 pairs of 1024 x 1024
    peaks at 3.7x its input instead of 6.6x.  One pair gains nothing from
    it (0.4 ms static, 0.6 ms symbolic at 256 x 256).  A model's step over
    16 pairs: 4.3-5.2 against 5.2-5.8 ms at 256 x 256, 101 against
    126-133 ms at 1024 x 1024.  GPU kernels keep torch's default: unmeasured.
    """
    return True if fixed.device.type == "cpu" and fixed.shape[0] > 1 else None


def _known_options(small: bool) -> dict:
    """The inductor options that this torch has (an older one lacks some, and would reject them)."""
    import torch._inductor.config as inductor_config

    options = _OPTIONS_32_BIT if small else _OPTIONS
    return {name: value for name, value in options.items() if hasattr(inductor_config, name)}


def fits_32_bit(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether every tensor has fewer than ``2^31`` elements (32-bit indices suffice)."""
    return all(tensor is None or tensor.numel() < 2**31 for tensor in tensors)


def compiled_bilinear_moments(
    device: torch.device, *, small: bool = False, dynamic: Optional[bool] = None
) -> Callable[..., FusedMoments]:
    """:func:`bilinear_moments` compiled for ``device``'s type (built on the first call); options as :func:`compiled`."""
    return compiled(bilinear_moments, device, small=small, dynamic=dynamic)


#: Specialisations of a compiled function allowed per process.  Each combination of loss,
#: padding, weights and flags is one (and each new image size at most one more, before
#: dynamic shapes take over); dynamo's default limit of 8 per function would end the fast
#: path for a process that tries a few losses with and without masks.
RECOMPILE_LIMIT = 64


def run_compiled(*args, **kwargs) -> Optional[FusedMoments]:
    """:func:`bilinear_moments`, compiled (:func:`call_compiled`, with :func:`dynamic_shapes`);
    ``None`` where it cannot compile."""
    fixed = args[0]
    small = fits_32_bit(*[value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)])
    kernel = compiled_bilinear_moments(fixed.device, small=small, dynamic=dynamic_shapes(fixed))
    return call_compiled(kernel, fixed.device, *args, **kwargs)


#: On the CPU, :func:`run_compiled_in_bands` runs a fixed image of more pixels than this in bands of rows.
#: Measured (one thread, ``register(compile=True)``): with 2^20, one 1024^2 pair peaked at 6.5x its
#: input (one band: the kernel's whole-plane buffers) and 8 x 1024^2 at 3.2x; with 2^16, 2.9x both
#: and one 512^2 pair 6.5x -> 3.4x, in the same time.  Smaller bands cost a call each.
BAND_PIXELS = 1 << 16


#: A warped image's step (an analytic model's, or :func:`tireg.analytic.cost_and_gradient`'s given
#: stored ``coordinates``) on the CPU runs in at most :data:`STEP_BANDS` bands of about at least this
#: many pixels (:func:`step_band_rows`); an image of less than twice as many runs whole.  Its kernel
#: keeps no image between its loops, so a band is for the stored coordinates (:func:`coordinate_grids`,
#: 8 bytes a pixel: for one pair as much as its two input images), and its call costs what a whole
#: image's does plus about 0.1 ms (one thread).
STEP_BAND_PIXELS = 1 << 20
STEP_BANDS = 8


def band_rows(height: int, width: int) -> int:
    """Rows of one band of :func:`run_compiled_in_bands` (``height`` where one band takes the whole image)."""
    return min(height, max(1, BAND_PIXELS // width))


def step_band_rows(height: int, width: int) -> int:
    """Rows of one band of a warped image's step: ``n = H W // STEP_BAND_PIXELS`` bands, at most
    :data:`STEP_BANDS` and at least one, of ``ceil(H / n)`` rows, so that the last band is short by
    fewer than ``n`` rows (not a remainder of one row; a shorter last band is still one more
    compiled variant, once per image size); ``height`` where one band takes the whole image."""
    bands = min(STEP_BANDS, max(1, height * width // STEP_BAND_PIXELS))
    return -(-height // bands)


def step_in_bands(fixed: torch.Tensor) -> bool:
    """Whether a warped image's step on ``fixed`` runs in bands (:func:`step_band_rows`): on the CPU
    (the stored coordinates), for an image beyond one band."""
    return fixed.device.type == "cpu" and step_band_rows(*fixed.shape[-2:]) < fixed.shape[-2]


def run_compiled_in_bands(
    fixed: torch.Tensor,
    padded: torch.Tensor,
    matrix: torch.Tensor,
    loss: PerPixelLoss,
    padding_mode: str,
    weight: Optional[torch.Tensor] = None,
    *,
    coordinates: Optional[tuple[torch.Tensor, torch.Tensor]],
    rows: Optional[int] = None,
    **options,
) -> Optional[FusedMoments]:
    """:func:`run_compiled` over bands of ``rows`` rows (default :func:`band_rows`), the sums added.

    Every field of :class:`FusedMoments` but ``warped`` is a sum over the fixed pixels.  A
    band starting at row ``r0`` is the kernel on those rows in its own coordinates
    ``(x, y')``, ``y = y' + r0``: with the matrix ``A T(0, r0)`` it samples the same points,
    and its moments are shifted back, ``y -> y' + r0`` in ``(x, y, 1)`` and
    ``(x^2, xy, y^2, x, y, 1)``.  So ``coordinates`` need only cover one band
    (:func:`coordinate_grids` of the first ``rows`` rows; a taller grid is cut).
    Why: the kernel keeps some intermediate images between its loops (a pair's plane, or
    whole images where its sizes are specialised), so a large image held several more
    images of its size; a band holds them for its rows only, and so does the stored grid.
    The warped image (``return_warped``) is one output image, each band's rows stored into it
    by the band's own pass (``warped_into``): a copy of it after each band took a quarter as
    long as the pass (one 2048^2 pair).
    Bands need the stored coordinates (the CPU); without them, or for an image within one
    band, this is :func:`run_compiled`.  The sums are those of one call up to rounding.
    """
    height, width = fixed.shape[-2:]
    bands = chunk_slices(height, 1, band_rows(height, width) if rows is None else rows)
    if coordinates is None or len(bands) == 1:
        return run_compiled(fixed, padded, matrix, loss, padding_mode, weight, coordinates=coordinates, **options)
    # A T(0, r0) of every band at once: A's third column plus r0 times its second
    offsets = torch.tensor([float(band.start) for band in bands], dtype=matrix.dtype, device=matrix.device)
    shifted = matrix.expand(len(bands), *matrix.shape).clone()
    shifted[..., 2].add_(offsets.view(-1, 1, 1) * matrix[..., 1])
    warped = fixed.new_empty(fixed.shape) if options.pop("return_warped", False) else None
    results = []
    for band, band_matrix in zip(bands, shifted):
        count = band.stop - band.start
        result = run_compiled(
            fixed[..., band, :], padded, band_matrix, loss, padding_mode,
            None if weight is None else weight[..., band, :],
            coordinates=(coordinates[0][..., :count, :], coordinates[1][..., :count, :]),
            warped_into=None if warped is None else warped[..., band, :], **options,
        )
        if result is None:
            return None
        results.append(result)
    return _shifted_sums(results, offsets, warped)


def _shifted_sums(results: list[FusedMoments], offsets: torch.Tensor, warped: Optional[torch.Tensor]) -> FusedMoments:
    """The bands' sums added, each band's moments over ``(x, y')`` taken as moments over
    ``(x, y' + r0)`` with its ``offsets`` ``r0`` (see :func:`run_compiled_in_bands`):
    ``y = y' + r0`` in ``(x, y, 1)``, and ``xy``, ``y^2``, ``y`` in ``(x^2, xy, y^2, x, y, 1)``."""
    total = lambda name: torch.stack([getattr(result, name) for result in results])  # noqa: E731
    offset = offsets.view(-1, 1, 1)
    local = total("matrix_gradient")  # (bands, B, 2, 3) over (x, y', 1)
    gradient = local.sum(0)
    gradient[..., 1] += (offset * local[..., 2]).sum(0)
    products = None
    if results[0].products is not None:  # (bands, B, 3, 6) over (x^2, xy', y'^2, x, y', 1)
        local = total("products")
        products = local.sum(0)
        products[..., 1] += (offset * local[..., 3]).sum(0)
        products[..., 2] += (2.0 * offset * local[..., 4] + offset * offset * local[..., 5]).sum(0)
        products[..., 4] += (offset * local[..., 5]).sum(0)
    return FusedMoments(total("cost").sum(0), total("count").sum(0), gradient, products, warped)


#: Variants refused past :data:`RECOMPILE_LIMIT` (:func:`_variant`): not tried again.  Each try of
#: one costs two failed dynamo attempts (about 3 ms of host time) and two logged warnings, every
#: call (a model steps through its compiled path on every forward).
_refused: set = set()


def _variant(kernel: Callable, args: tuple, kwargs: dict) -> tuple:
    """A call's key for :data:`_refused`: the kernel, each tensor's shape, dtype and device, and every
    other argument by identity (a model's own loss and mappings; a freed object's id taken by a new
    one can only send that one to the reference path: the same numbers, slower)."""
    def key(value):
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.dtype, value.device)
        if isinstance(value, (list, tuple)):
            return tuple(key(item) for item in value)
        if isinstance(value, (bool, int, float, str, type(None))):
            return value
        return id(value)
    return (id(kernel), key(args), tuple(sorted((name, key(value)) for name, value in kwargs.items())))


def _past_recompile_limit(error: BaseException) -> bool:
    """Whether ``error`` is dynamo's refusal of one more specialisation (older torch: a cache limit)."""
    return type(error).__name__ in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")


#: Objects of the caller's own (:func:`_own_objects`) whose compiled call failed: every call with one
#: of them runs the reference path, and the fast path stays on for the rest.
_uncompilable: "weakref.WeakSet" = weakref.WeakSet()


def _own_objects(args: tuple, kwargs: dict) -> list:
    """The arguments whose type is not tireg's, torch's or Python's own: a loss (or transform) of the
    caller's, which the compiled kernel traces like its own code."""
    found = []

    def visit(value):
        if isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif not isinstance(value, (torch.Tensor, torch.device, torch.dtype, bool, int, float, str, type(None))):
            module = type(value).__module__ or ""
            if not (module == "tireg" or module.startswith(("tireg.", "torch.", "builtins"))):
                found.append(value)

    visit(args)
    visit(tuple(kwargs.values()))
    return found


#: The errors of the compiler behind dynamo (no working C++ compiler, a failed build): the machine's,
#: whatever code was traced.  Matched by name along the error's causes (their classes move between
#: torch versions).
_BACKEND_ERRORS = ("BackendCompilerFailed", "InductorError", "InvalidCxxCompiler", "CppCompileError")


def _backend_failure(error: BaseException) -> bool:
    """Whether ``error``, or one of its causes, is the compiler's (:data:`_BACKEND_ERRORS`), not
    the tracing of the code given."""
    seen = set()
    while error is not None and id(error) not in seen:
        if type(error).__name__ in _BACKEND_ERRORS:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _marked_uncompilable(value: Any) -> bool:
    try:
        return value in _uncompilable
    except TypeError:  # unhashable: never added
        return False


def call_compiled(kernel: Callable, device: torch.device, *args: Any, **kwargs: Any) -> Optional[Any]:
    """Call a compiled function; on a compile failure warn once per device type, remember it, return ``None``.

    A failure of a call that holds an object of the caller's own (a loss of one's own that
    dynamo cannot trace: a branch on a tensor's value) is that object's, not the machine's,
    unless the compiler behind dynamo failed (:func:`_backend_failure`: no C++ compiler):
    the calls with it run the reference path, the others stay compiled (marking the device
    failed had sent the built-in losses, the models and :func:`tireg.register` to the
    reference path for the rest of the process, with a warning blaming the device).
    Running out of memory is raised, not taken for a compile failure: the work does not fit,
    and the reference path for the rest of the process would not make it fit (it needs more).
    """
    key = torch.device(device).type
    if key in _failed or (_refused and _variant(kernel, args, kwargs) in _refused):
        return None
    if len(_uncompilable) and any(map(_marked_uncompilable, _own_objects(args, kwargs))):
        return None
    try:
        try:
            return kernel(*args, **kwargs)
        except Exception as error:
            if not _past_recompile_limit(error):
                raise
            # Raised only where a new specialisation is needed past dynamo's limit: raise the
            # limit then (patching it on every call would cost 30 us a call).
            import torch._dynamo as dynamo

            name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
            with dynamo.config.patch(**{name: RECOMPILE_LIMIT}):
                return kernel(*args, **kwargs)
    except Exception as error:  # torch.compile raises many types (BackendCompilerFailed, InductorError, ...)
        if _past_recompile_limit(error):
            # past tireg's own limit too: this variant runs on the reference path; those compiled so
            # far still run compiled (marking the device failed ended the fast path for the process:
            # a long-running program that made models of ever new mapping bounds)
            warnings.warn(f"tireg: over {RECOMPILE_LIMIT} compiled variants of one kernel in this process; this "
                          "one runs on the reference path", RuntimeWarning, stacklevel=user_stacklevel())
            with _lock:
                _refused.add(_variant(kernel, args, kwargs))
            return None
        if _out_of_memory(error):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        own = [] if _backend_failure(error) else _own_objects(args, kwargs)
        if own:
            with _lock:
                for value in own:
                    try:
                        _uncompilable.add(value)
                    except TypeError:  # not weakly referable, or unhashable: this variant only
                        _refused.add(_variant(kernel, args, kwargs))
            names = ", ".join(sorted({type(value).__name__ for value in own}))
            warnings.warn(f"tireg: a compiled call with your own {names} failed ({type(error).__name__}: "
                          f"{first_line}); calls with it use the reference path", RuntimeWarning,
                          stacklevel=user_stacklevel())
            return None
        with _lock:
            _failed.add(key)
        warnings.warn(
            f"tireg: the compiled fast path is unavailable on {key} ({type(error).__name__}: {first_line}); "
            "using the reference path",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return None
