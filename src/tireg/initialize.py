"""Initial transforms for registration: phase correlation, Fourier–Mellin, moments, search.

A gradient-based registration converges only from a start inside its basin of
attraction (typically a few degrees and a fraction of the image size).  The
functions here give such a start without any iteration on the cost:

* :func:`phase_correlation` — the translation, from the normalised
  cross-power spectrum (Kuglin & Hines 1975);
* :func:`fourier_mellin` — rotation and isotropic scale, from the phase
  correlation of log-polar magnitude spectra (Reddy & Chatterji 1996);
* :func:`center_of_mass` and :func:`moments` — centroids and principal axes of
  the intensities (ITK's ``MOMENTS`` initialiser);
* :func:`initialize` — one entry point that runs these (or a coarse batched
  search over rotations and scales) on downsampled copies, scores the
  candidates by normalised cross-correlation over their overlap, and returns a
  matrix of the requested transform kind at full resolution.

Convention:
    Images are ``(B, C, H, W)`` (``(H, W)`` and ``(C, H, W)`` are promoted to a
    batch of one), tensors or NumPy arrays of any real dtype, as :func:`tireg.register`
    takes them: computed in float32, or float64 where either image is float64 (or
    of integers beyond float32's 24 bits), and the results are of that dtype;
    channels are averaged to one luminance channel first.  Every result is
    invariant to each image's gain: a luminance whose largest ``|x|`` lies
    outside ``[2^-32, 2^32]`` is first scaled by a power of two, exactly.  A
    point is ``(x, y)`` = (column, row) with pixel centres at integers.  Every
    returned matrix ``A`` maps a **fixed**-image point to a **moving**-image
    point, ``warped(x) = M(A x)`` (:func:`tireg.warp`), and every returned
    shift ``(tx, ty)`` is that of ``A = translation(tx, ty)``: if the moving
    image is the fixed image moved right by 5 pixels, ``M(x) = F(x - 5)``,
    then ``tx = +5``.  Angles are in radians with OpenCV's sign,
    ``R(theta) = [[cos, sin], [-sin, cos]]``, about the image centre
    ``((W-1)/2, (H-1)/2)`` unless stated otherwise.

Everything is batched over ``B`` (no Python loop over images or pixels) and
follows the input's dtype and device.  Nothing here is differentiable in a
useful sense (peaks are found by ``argmax``); the functions run under
``torch.no_grad()``.

References:
    C. D. Kuglin, D. C. Hines, "The phase correlation image alignment method",
    Proc. IEEE Int. Conf. Cybernetics and Society, 1975.

    B. S. Reddy, B. N. Chatterji, "An FFT-based technique for translation,
    rotation, and scale-invariant image registration", IEEE Trans. Image
    Processing 5(8):1266–1271, 1996.

    M. Guizar-Sicairos, S. T. Thurman, J. R. Fienup, "Efficient subpixel image
    registration algorithms", Optics Letters 33(2):156–158, 2008.

    M. R. Teague, "Image analysis via the general theory of moments", J. Opt.
    Soc. Am. 70(8):920–930, 1980.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._chunks import chunk_slices
from ._device import cached, constant, without_autocast
from ._validation import (
    ImageLike,
    all_finite,
    as_image,
    check_affine,
    check_batch,
    check_flag,
    check_image,
    check_matrix,
    check_not_meta,
    check_option,
    check_same_kind,
    finite_number,
)
from .metrics import _flat_variance
from .sampling import (
    MASK_BLOCK_INSIDE,
    _coarse_image,
    _shrunk_points,
    checked_warp,
    downsample,
    gaussian_blur,
    shrink_matrix,
)
from .transforms import (
    _about_center,
    _determinant,
    _real_center,
    get_transform,
    rigid_matrix,
    rotation,
    translation_matrix,
)

__all__ = [
    "METHODS",
    "AUTO_THRESHOLD",
    "MIN_OVERLAP",
    "phase_correlation",
    "fourier_mellin",
    "center_of_mass",
    "moments",
    "overlap_ncc",
    "initialize",
]

#: Methods accepted by :func:`initialize`.
METHODS = ("auto", "identity", "center", "moments", "phase", "fourier-mellin", "search")

#: ``initialize(method="auto")`` accepts its best quick candidate when its
#: overlap NCC (on images blurred with sigma = 1 working pixel) reaches this
#: value; below it, it runs the search as well and keeps the best of all.
#: Measured on crops of the bundled images (rotations 4–170 degrees, scales
#: 0.9–1.2, Gaussian noise up to 0.15): correct alignments score 0.76–1.0
#: (0.96 and above without noise); wrong candidates up to 0.62, and a pure
#: shift for a 10-degree rotation up to 0.84.  A score below the threshold
#: costs only the search's time, so it errs on the high side.
AUTO_THRESHOLD = 0.8

#: A candidate whose overlap covers less than this fraction of the fixed image, or of the
#: moving image's footprint on it where that is smaller (but a quarter of it of the fixed
#: image at least), scores -1 (an NCC over a sliver of pixels is not evidence).
MIN_OVERLAP = 0.25

#: Candidates are scored in chunks of at most this many working pixels (pairs x candidates x
#: pixels): a chunk's warps, spectra and sums are a few arrays of that size, so scoring holds
#: tens of megabytes whatever the batch and the candidate count (108 search candidates at
#: 128 x 128 held about 70 MB per pair at once; a batch's peak memory counts them all).  2^18
#: rather than 2^20: the search of one 256^2 pair peaked at 15x instead of 57x its input, and
#: ``initialize`` of 16 x 256^2 at 3.9x instead of 6.6x, in the same time (one thread).
CHUNK_PIXELS = 1 << 18

#: The scoring images' image channels (:func:`_scoring_image`): as it is, and clipped.
SCORE_IMAGES = 2
#: :func:`_clipped`'s range: the median +- this many robust deviations (1.4826 MAD, the deviation of
#: a normal distribution).
SCORE_CLIP = 1.5

#: Pairs are initialised in chunks of at most this many working pixels (pairs x pixels): one
#: pair's working set is about 30 images of its working size (blurred and centred copies,
#: spectra, candidate warps); for all 128 pairs of 256 x 256 at once that was 3.9x the input
#: images, the peak of a whole compiled registration.
PAIR_CHUNK_PIXELS = 1 << 18

#: ... and in this many chunks at least (of one pair at least) where the batch holds fewer working
#: pixels than :data:`PAIR_CHUNKS` x :data:`PAIR_CHUNK_PIXELS`: a chunk's working set is then a
#: fraction of the batch's input, where 2^18 working pixels (about 32 MB) was a fixed amount, above
#: a small batch's whole registration.  ``register`` of 16 x 256^2 (8 MiB of input; 2 pairs a
#: chunk) peaked at 4.25x its input, now 2.77x; 8 x 256^2 at 4.99x, now 3.12x; 4 x 256^2 at 7.21x,
#: now 3.64x.  Each chunk costs the initialiser's operations again: CPU time +10 % at 8 pairs,
#: +3 % at 16, +1 % at 64 (one thread, alternating runs).
PAIR_CHUNKS = 8

#: The working copies keep at least this many pixels on their smaller side (or ``max_size``, if
#: smaller; or the image's own, if smaller still): :func:`initialize` reduces a wide strip by the
#: factor its smaller side allows, not by the one its long side asks for.  A 32 x 2000 strip
#: reduced to ``max_size`` 128 along its length kept 2 rows, where phase correlation has no
#: information across them (the taper leaves only the zero frequency of an axis of 2): its
#: (5, 3) px shift was lost.  16 rows keep it (factor 2: 16 x 1000 working pixels).
MIN_WORKING_SIDE = 16

#: The search's first two stages (every 10 degrees, then around the 4 best: 168 of its 177
#: candidates) run on the working images halved where their smaller side keeps this many pixels
#: halved (96 working pixels, and the default ``max_size`` 128 gives up to 128): they only rank
#: the angles and scales that the last stage refines on the working images (around the 2 best).
#: One 256^2 affine pair's search took 90-130 ms, 40-60 with the first stage halved, 25-40 with
#: both.  32 (64^2 working images halved, first stage) solved one of 57 random 64^2 similarity
#: pairs fewer.
SEARCH_HALVED_MIN_SIDE = 48

#: Angles (degrees) and scales of the coarse search.
SEARCH_ANGLE_STEP = 10.0
SEARCH_SCALES = (0.8, 1.0, 1.25)
#: The scales between :data:`SEARCH_SCALES` (``1.25^(+-1/2)``, 0.894 and 1.118), ranked by the
#: similarity search's first stage with them (180 candidates, not 108; the stretched stage keeps the
#: three).  A scale of 1.1 with about half of the image overlapping was 10 % from either coarse
#: scale, and its right angle never reached the 4 that stage 2 refines: 3 pairs of 160 x 192 (50 %
#: overlap, turned by 6 degrees) started 98-178 px off, scoring 0.24-0.36.  A second search from
#: these scales for the pairs left below :data:`AUTO_THRESHOLD` found them too, but doubled the
#: search of every pair that stays weak (other channels, unrelated pairs: +55-95 % initialiser time);
#: ranked in the first stage they cost +8-14 %.
SEARCH_SCALES_BETWEEN = (1.25 ** -0.5, 1.25 ** 0.5)

#: The stretch of the affine search's anisotropic candidates: lengths times ``r`` along an axis and
#: ``1 / r`` across it (an aspect ratio of ``r^2``), axes every ``180 / SEARCH_STRETCH_AXES`` degrees.
#: Similarity candidates alone had left pairs with an aspect change of 1.4-1.5 (scales 1.25 and
#: 0.85 along a turned axis) 14-222 px off in 21 of 72 cases; see :func:`_search`.
SEARCH_STRETCH = 1.2
SEARCH_STRETCH_AXES = 4
#: The affine search stretches its candidates for the pairs whose best similarity scores below this
#: (overlap NCC).  At :data:`AUTO_THRESHOLD` (0.8), wrong similarities scoring 0.82-0.85 left 2 of
#: 48 random anisotropic pairs (aspect up to 1.7) tens of pixels off; a stretched start is still kept
#: only where it scores :data:`AUTO_THRESHOLD` or more and above the similarity.  It applies where the
#: search runs: with ``"auto"``, only for pairs whose quick candidates score below
#: :data:`AUTO_THRESHOLD`; a wrong quick start at 0.80-0.85 stands (the registration recovered the
#: two such of 60 random 128^2 anisotropic pairs, started 12-14 px off).
SEARCH_STRETCH_BELOW = 0.9
#: How much the stretched search's best first-stage candidate must outscore the best similarity
#: there (overlap NCC) for its later stages to run.
SEARCH_STRETCH_GAIN = 0.05
#: The stretched search's first stage ranks on the images halved once more than the similarities'
#: where they keep this many pixels (32 for a working image of 128, a quarter of the time); a pair
#: of 96 x 128 ranked on 24 x 32 had its right stretch score 0.55 and stop there.
SEARCH_STRETCH_MIN_SIDE = 32

_SCALED_KINDS = ("similarity", "anisotropic_similarity", "affine")

CenterLike = Union[torch.Tensor, Sequence[float], None]


# ----------------------------------------------------------------------------
# input handling



def _warp(image: torch.Tensor, matrix: torch.Tensor, size) -> torch.Tensor:
    """:func:`~tireg.sampling.warp` of matrices made here (affine by construction: no read of their last rows)."""
    return checked_warp(image, matrix, size, "bilinear", "zeros", "initialize()", affine=False)

def _promote(image: ImageLike, name: str, caller: str) -> torch.Tensor:
    """An image as :func:`tireg.register` takes it (:func:`~tireg._validation.as_image`: a tensor or array
    of ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``, any real dtype, float32 but float64 and wide
    integers, which stay float64) as ``(B, C, H, W)``; then the shared image checks.  A NumPy array or
    a uint8 tensor had been refused here, where register took it."""
    image, _ = as_image(image, name, caller, finite=False)
    check_image(image, name, caller)
    return image


#: A pair's luminance whose largest magnitude lies outside ``[2^-32, 2^32]`` is scaled by a power of two
#: (:func:`_in_range`).
_RANGE_EXPONENT = 32


def _in_range(luminance: torch.Tensor) -> torch.Tensor:
    """``luminance`` ``(B, 1, H, W)``, each pair whose largest ``|x|`` lies outside
    ``[2^-32, 2^32]`` times the power of two that brings it into ``[0.5, 1)``; the others (and
    ``luminance`` itself where none is far) as they are.

    Why: every initialiser is invariant to the images' gain, but their sums are not to overflow:
    squares of ``1e18`` in the overlap NCC overflowed float32 (those of ``1e-25`` underflowed), and
    :func:`initialize` returned the identity, or a wrong start, without a word.  A power of two
    multiplies exactly (no rounding), so a far pair gets the start it has at an ordinary scale, and
    an ordinary one (register's, normalised before) is not copied."""
    flat = luminance.flatten(1)
    peak = torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg())  # aminmax(dim=) is slower on the CPU
    far = (peak > 2.0 ** _RANGE_EXPONENT) | ((peak < 2.0 ** -_RANGE_EXPONENT) & (peak > 0))
    if not bool(far.any()):
        return luminance
    _, exponent = torch.frexp(peak)  # peak = m 2^e, 0.5 <= m < 1
    scale = torch.where(far, torch.ldexp(torch.ones_like(peak), -exponent), torch.ones_like(peak))
    return luminance * scale[:, None, None, None]


def _pair(fixed: ImageLike, moving: ImageLike, caller: str, *, same_size: bool = False):
    """Checked luminance images ``(B, 1, H, W)`` of a fixed/moving pair (batch 1 broadcasts), in the
    wider of their dtypes (a float32 and a float64 image: both float64), each pair's brought into range
    (:func:`_in_range`)."""
    fixed = _promote(fixed, "fixed", caller)
    moving = _promote(moving, "moving", caller)
    if fixed.dtype != moving.dtype:  # as register, which takes any two dtypes
        dtype = torch.promote_types(fixed.dtype, moving.dtype)
        fixed, moving = fixed.to(dtype), moving.to(dtype)
    check_same_kind(fixed, "fixed", moving, "moving", caller)
    batch_f, batch_m = fixed.shape[0], moving.shape[0]
    if batch_f != batch_m and 1 not in (batch_f, batch_m):
        raise ValueError(f"{caller}: batch sizes differ: {batch_f} fixed and {batch_m} moving images")
    if same_size and fixed.shape[-2:] != moving.shape[-2:]:
        raise ValueError(
            f"{caller}: 'fixed' and 'moving' must have the same size (H, W); got {tuple(fixed.shape[-2:])} "
            f"and {tuple(moving.shape[-2:])} (resample one first, or use initialize())"
        )
    batch = max(batch_f, batch_m)
    # one channel is its own luminance: no copy (a batch's peak memory counts every image)
    luminance = lambda image: _in_range(image if image.shape[1] == 1 else image.mean(dim=1, keepdim=True))  # noqa: E731
    fixed = luminance(fixed).expand(batch, 1, *fixed.shape[-2:])
    moving = luminance(moving).expand(batch, 1, *moving.shape[-2:])
    return fixed, moving


def _check_kind(transform: str, caller: str) -> str:
    """``transform`` if it names a built-in kind; the transforms module's ``ValueError``, naming ``caller``, otherwise."""
    get_transform(transform, caller)
    return transform


def _hann(length: int, like: torch.Tensor) -> torch.Tensor:
    """Symmetric Hann window ``w(n) = sin^2(pi n / (N - 1))`` (ones for ``N <= 2``)."""
    if length <= 2:
        return torch.ones(length, dtype=like.dtype, device=like.device)
    return torch.hann_window(length, periodic=False, dtype=like.dtype, device=like.device)


def _centred(image: torch.Tensor) -> torch.Tensor:
    """Subtract each image's mean over its last two axes."""
    return image - image.mean(dim=(-2, -1), keepdim=True)


def _is_constant(image: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: luminance ``(B, 1, H, W)`` varies by no more than its values' rounding, ``max - min
    <= 32 eps max|x|`` in its dtype (a constant resampled by bicubic weights varies by about 22 eps).
    A fixed ``1e-6`` of the largest value had called ``1e5 + 0.05 camera`` (float64, 2e9 eps)
    constant, and started it at the identity where phase correlation found the shift."""
    flat = image.flatten(1)
    lowest, highest = flat.amin(dim=1), flat.amax(dim=1)  # torch.aminmax(dim=) is 10x slower on the CPU
    scale = torch.maximum(highest, lowest.neg())  # max |x|
    finfo = torch.finfo(image.dtype)
    return highest - lowest <= torch.add(constant(finfo.tiny, like=scale), scale, alpha=32.0 * finfo.eps)


# ----------------------------------------------------------------------------
# phase correlation


#: A batch of one plane of at most this many pixels is transformed with a zero plane after it.
#: torch's CPU FFT (Intel MKL) transforms a batch of one otherwise than a batch of two or more, and
#: rounds otherwise (measured on an AMD EPYC: 15 of 212 plane sizes forward, 65 inverse; batches of
#: 2, 3, 8 and 17 agreed on every one), so a pair's start depended on the batch it came in: a
#: 16-pixel-wide pair was initialised differently alone (tested).  Larger planes are left alone: a
#: second plane costs 2-6x there (the initialiser's working planes are at most 128 x 128).  On the
#: CPU only: MKL's behaviour is what was measured, and a GPU's call counts its operations.
_PADDED_PLANE_PIXELS = 1 << 16


def _fft(transform, planes: torch.Tensor, **options) -> torch.Tensor:
    """``transform`` (``torch.fft.rfft2`` or ``irfft2``) of ``(N, H, W)`` planes, on the CPU a single
    small plane with a zero plane after it (:data:`_PADDED_PLANE_PIXELS`)."""
    if (planes.shape[0] != 1 or planes.shape[-2] * planes.shape[-1] > _PADDED_PLANE_PIXELS
            or planes.device.type != "cpu"):
        return transform(planes, **options)
    return transform(torch.cat([planes, torch.zeros_like(planes)]), **options)[:1]


def _centred_spectra(images: torch.Tensor, window: Optional[torch.Tensor]) -> torch.Tensor:
    """``rfft2`` of ``(N, H, W)`` images less their means, times ``window`` if given: ``(N, H, W // 2 + 1)``.

    Half spectra: the images are real, so their spectra (and ``R`` of
    :func:`_cross_power`) are Hermitian and the other half adds nothing (the
    real transforms cost a quarter of the complex ones: 108 candidate pairs of
    128 x 128, 131 -> about 50 ms).
    """
    centred = images - images.mean(dim=(-2, -1), keepdim=True)
    if window is not None:
        centred = centred.mul_(window)
    return _fft(torch.fft.rfft2, centred)


def _cross_power(moving_spectra: torch.Tensor, fixed_spectra: torch.Tensor, width: int) -> torch.Tensor:
    """Tapered normalised cross-power spectrum ``R = M F* / |M F*| cos^2(pi xi) cos^2(pi eta)``.

    ``M`` and ``F`` are :func:`_centred_spectra`'s half spectra of images ``width``
    pixels wide, of shapes that broadcast, ``(..., H, width // 2 + 1)``: a fixed
    image's spectrum is taken once and shared by all the candidates it is
    correlated with (:func:`_candidates`; the search transformed it for each of
    its 177).

    The taper (``xi, eta`` in cycles per pixel) is the DFT of the 3-tap kernel
    ``[1/4, 1/2, 1/4]`` along each axis: it smooths the correlation surface
    slightly and down-weights the highest frequencies, whose phase aliasing and
    interpolation distort most (it halves the sub-pixel bias on area-sampled
    and bilinearly resampled real images, measured: 0.17 -> 0.11 px worst case).
    """
    cross = moving_spectra * fixed_spectra.conj_physical()  # a conjugate view would be copied first
    magnitude = cross.abs()
    floor = 1e-9 * magnitude.amax(dim=(-2, -1), keepdim=True) + torch.finfo(magnitude.dtype).tiny
    height = cross.shape[-2]
    taper = cached(("taper", height, width), magnitude.dtype, cross.device, lambda: _taper(height, width, magnitude))
    # scale the real and imaginary parts by one real factor: a complex division costs twice as much
    scale = taper / (magnitude + floor)
    return torch.view_as_complex(torch.view_as_real(cross) * scale[..., None])


def _taper(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`_cross_power`'s ``cos^2(pi xi) cos^2(pi eta)`` on the rfft2 half grid, ``(H, W // 2 + 1)``."""
    taper_y = torch.cos(math.pi * torch.fft.fftfreq(height, dtype=like.dtype, device=like.device)) ** 2
    taper_x = torch.cos(math.pi * torch.fft.rfftfreq(width, dtype=like.dtype, device=like.device)) ** 2
    return taper_y[:, None] * taper_x


def _parabolic_offset(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through ``(-1, left), (0, centre), (1, right)``, clamped to ``[-0.5, 0.5]``:
    ``(left - right) / (2 c)`` with the curvature ``c = left + right - 2 centre`` where ``c < 0``, else 0."""
    curvature = torch.add(left + right, centre, alpha=-2.0)
    concave = curvature < 0
    offset = torch.addcdiv(constant(0.0, like=curvature), left - right, torch.where(concave, curvature, -1.0),
                           value=0.5)
    return torch.where(concave, offset, 0.0).clamp(-0.5, 0.5)


def _unravel(flat_index: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Flat indices ``y W + x`` ``(N,)`` of ``(H, W)`` planes -> ``(N, 2)`` integer ``(x, y)``:
    ``(i // (1, W)) % (W, H)``, two operations."""
    divisors = constant((1, width), like=flat_index)
    return torch.div(flat_index[:, None], divisors, rounding_mode="floor") % constant((width, height), like=flat_index)


def _neighbourhood(values: torch.Tensor, xy: torch.Tensor, *, wrap: bool) -> torch.Tensor:
    """``values`` ``(N, H, W)`` at each item's integer ``xy`` ``(N, 2)`` and its four neighbours,
    wrapped around (``wrap``) or clamped at the edges: ``(N, 5)`` in the order centre, left, up,
    right, down.

    One gather for the five: picked one by one they were five index computations each.
    """
    count, height, width = values.shape
    # (N, 2, 5): the five points' columns, then their rows
    points = xy[:, :, None] + constant(((0, -1, 0, 1, 0), (0, 0, -1, 0, 1)), like=xy)
    if wrap:
        points = points % constant(((width,), (height,)), like=xy)
    else:
        points = points.clamp_(min=constant(0, like=xy), max=constant(((width - 1,), (height - 1,)), like=xy))
    items = cached(("items", count), xy.dtype, xy.device, lambda: torch.arange(count, device=xy.device)[:, None])
    return values[items, points[:, 1], points[:, 0]]


def _parabolic_offsets(neighbourhood: torch.Tensor) -> torch.Tensor:
    """:func:`_parabolic_offset` along ``x`` and ``y`` at once: ``(N, 5)`` of :func:`_neighbourhood` -> ``(N, 2)``."""
    return _parabolic_offset(neighbourhood[:, 1:3], neighbourhood[:, :1], neighbourhood[:, 3:5])


def _band_limited(spectrum: torch.Tensor, width: int, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``H W r(y, x)`` on the grid ``rows x columns`` ``(N, K)`` each: ``(N, K, K)``, where
    ``r(p) = (1 / HW) sum_k R(k) exp(2 pi i k . p)`` is the band-limited interpolant of the
    real surface whose Hermitian spectrum's rfft2 half is ``spectrum`` ``(N, H, width // 2 + 1)``.

    Rows, then columns, as two batched matrix products (Guizar-Sicairos et al. 2008).  The
    columns ``-k_x`` hold the complex conjugates of the columns ``k_x``: the half spectrum is
    summed with the columns that have a partner counted twice, and the real part taken
    (exact up to the Nyquist row and column, which the taper of :func:`_cross_power`
    sets to zero).
    """
    height, half_width = spectrum.shape[-2:]
    real = spectrum.real.dtype
    weights = [2.0] * half_width
    weights[0] = 1.0
    if width % 2 == 0:
        weights[-1] = 1.0  # the Nyquist column is its own partner
    # made once a size: no host copy, and no operation, a call
    weight = constant(tuple(weights), like=rows)
    unit = constant(1.0, like=rows)
    angular_x = cached(("angular frequencies", width), real, spectrum.device,
                       lambda: 2 * math.pi * torch.fft.fftfreq(width, device=spectrum.device, dtype=real))
    angular_y = cached(("angular frequencies", height), real, spectrum.device,
                       lambda: 2 * math.pi * torch.fft.fftfreq(height, device=spectrum.device, dtype=real))
    kernel_y = torch.polar(unit, rows[:, :, None] * angular_y)  # (N, K, H)
    kernel_x = torch.polar(weight[:, None], angular_x[:half_width, None] * columns[:, None, :])  # (N, W', K)
    return torch.bmm(torch.bmm(kernel_y, spectrum), kernel_x).real


def _peak_shift(spectrum: torch.Tensor, width: int, *, upsample: int = 10) -> torch.Tensor:
    """Sub-pixel location ``(dx, dy)`` of the peak of ``irfft2(spectrum)``, wrapped to ``[-N/2, N/2)``.

    ``spectrum`` is a Hermitian spectrum's half, ``(N, H, width // 2 + 1)``
    (:func:`_cross_power`).  The integer peak is refined by evaluating
    the band-limited interpolant of the correlation surface (a matrix-multiply
    DFT, Guizar-Sicairos et al. 2008) on a grid of spacing ``1 / upsample``
    within 1.5 pixels of it, then by a parabolic fit through the best grid
    point and its neighbours.  With ``upsample=1`` only the parabolic fit on
    the integer grid is used.
    """
    height = spectrum.shape[1]
    real = spectrum.real.dtype
    surface = _fft(torch.fft.irfft2, spectrum, s=(height, width))
    peak_xy = _unravel(surface.flatten(1).argmax(dim=1), width, height)  # (N, 2) integer
    peak = peak_xy.to(real)
    if upsample <= 1:
        shift = peak + _parabolic_offsets(_neighbourhood(surface, peak_xy, wrap=True))
    else:
        half = int(math.ceil(1.5 * upsample))
        size = 2 * half + 1
        # the local grid: point k of an axis at corner + k / upsample, k = 0 .. 2 half
        corner = peak - half / upsample  # (N, 2)
        steps = cached(("grid steps", size, upsample), real, spectrum.device,
                       lambda: torch.arange(size, device=spectrum.device, dtype=real) / upsample)  # (K,)
        local = _band_limited(spectrum, width, corner[:, 1:] + steps, corner[:, :1] + steps)  # (N, K, K)
        best_xy = _unravel(local.flatten(1).argmax(dim=1), size, size)
        # the parabola only inside the grid: at its edge the peak lies beyond (the grid spans 1.5 pixels)
        inner = (best_xy > 0) & (best_xy < size - 1)
        offsets = torch.where(inner, _parabolic_offsets(_neighbourhood(local, best_xy, wrap=False)), 0.0)
        shift = torch.add(corner, offsets + best_xy, alpha=1.0 / upsample)
    # wrap-around: a peak beyond half the size is a negative shift.  An axis of length 1 or 2 has
    # no shift to find: the taper of _cross_power, cos^2(pi xi), is zero at the Nyquist
    # frequency (xi = 1/2), the only non-zero one of an axis of 2, so the surface is flat along
    # it and its argmax meaningless (it gave -1.5, the local grid's first point)
    sizes = constant((float(width), float(height)), like=shift)
    shift = shift - sizes * (shift >= constant((width / 2, height / 2), like=shift))
    if min(width, height) <= 2:
        shift = torch.where(sizes > 2, shift, 0.0)
    # a flat surface (a constant image: R = 0) has no peak: no shift
    flat = surface.flatten(1)
    lowest, highest = flat.amin(dim=1), flat.amax(dim=1)  # torch.aminmax(dim=) is 10x slower on the CPU
    return torch.where((highest - lowest <= torch.finfo(real).tiny)[:, None], 0.0, shift)


def _spectra(images: torch.Tensor, *, window: bool = True) -> torch.Tensor:
    """:func:`_centred_spectra` of checked ``(N, 1, H, W)`` luminance images, Hann-windowed if ``window``."""
    height, width = images.shape[-2:]
    hann = cached(("hann", height, width), images.dtype, images.device,
                  lambda: _hann(height, images)[:, None] * _hann(width, images)) if window else None
    return _centred_spectra(images[:, 0], hann)


def _shifts(fixed_spectra: torch.Tensor, moving: torch.Tensor, *, window: bool = True, upsample: int = 10) -> torch.Tensor:
    """Phase correlation shifts ``(B K, 2)`` of ``B K`` moving images ``(B K, 1, H, W)`` (``K`` for each
    pair, pair-major) against their pair's fixed image, given as its :func:`_spectra` ``(B, H, W // 2 + 1)``."""
    width = moving.shape[-1]
    moving_spectra = _spectra(moving, window=window)
    moving_spectra = moving_spectra.view(fixed_spectra.shape[0], -1, *moving_spectra.shape[1:])
    return _peak_shift(_cross_power(moving_spectra, fixed_spectra[:, None], width).flatten(0, 1), width,
                       upsample=upsample)


def _phase_shift(fixed: torch.Tensor, moving: torch.Tensor, *, window: bool = True, upsample: int = 10) -> torch.Tensor:
    """:func:`phase_correlation` on checked ``(N, 1, H, W)`` luminance images; ``(N, 2)``."""
    # both in one transform: one call, and no zero plane for a single pair (_fft)
    spectra = _spectra(torch.cat([moving, fixed]), window=window)
    count, width = fixed.shape[0], fixed.shape[-1]
    return _peak_shift(_cross_power(spectra[:count], spectra[count:], width), width, upsample=upsample)


@without_autocast
def phase_correlation(fixed: torch.Tensor, moving: torch.Tensor, *, window: bool = True) -> torch.Tensor:
    """Translation between two images by phase correlation, with sub-pixel refinement.

    With ``F`` and ``M`` the 2-D DFTs of the mean-subtracted (and, with
    ``window=True``, Hann-windowed) luminance images, the normalised
    cross-power spectrum and its inverse transform are::

        R(k) = M(k) conj(F(k)) / |M(k) conj(F(k))|,     r = IDFT(R)

    If ``moving(x) = fixed(x - d)`` then ``R(k) = exp(-2 pi i k . d)`` and
    ``r`` is a unit impulse at ``d`` (Kuglin & Hines 1975).  ``R`` is tapered
    by ``cos^2(pi xi) cos^2(pi eta)`` (``xi, eta`` in cycles per pixel), i.e.
    ``r`` is smoothed by ``[1/4, 1/2, 1/4]`` along each axis, which
    down-weights the aliased highest frequencies.  The integer peak
    of ``r`` is refined by evaluating the band-limited interpolant of ``r``
    on a ``1/10``-pixel grid around it (matrix-multiply DFT, Guizar-Sicairos
    et al. 2008) and a parabolic fit there.  Shifts are circular: a peak
    index ``>= N/2`` along an axis of length ``N`` means ``index - N``.  The
    Hann window ``w(n) = sin^2(pi n / (N - 1))`` (separable) suppresses the
    edge discontinuities of the periodic extension, which otherwise produce a
    spurious peak at zero shift.

    Args:
        fixed: ``(B, C, H, W)`` reference image (``(H, W)``, ``(C, H, W)`` promoted).
        moving: image of the same ``(H, W)``; a batch of 1 broadcasts.
        window: apply the Hann window (``True``, default, or ``False``).

    Returns:
        ``(B, 2)`` shift ``(tx, ty)`` in pixels such that
        ``A = translation_matrix((tx, ty))`` maps fixed to moving points:
        ``moving(x + t) ≈ fixed(x)``.  Constant images give ``(0, 0)``.
        The magnitude is below half the image size along each axis; an axis
        of length 1 or 2 gives 0 (it carries no shift: see above, the taper).

    Raises:
        ValueError: wrong dimensions, empty images, NaN/Inf, different sizes.
        TypeError: ``window`` not a bool.
    """
    caller = "phase_correlation()"
    window = check_flag(window, "window", caller)  # a NumPy bool too (1 or "no" are no answer)
    fixed, moving = _pair(fixed, moving, caller, same_size=True)
    with torch.no_grad():
        # a constant image's centred values are rounding residues, whose phases gave any shift
        # (0.7 everywhere: (-16.1, -19.1)); the surface's own flatness test caught exact values only
        constant_pair = _is_constant(fixed) | _is_constant(moving)
        return torch.where(constant_pair[:, None], 0.0, _phase_shift(fixed, moving, window=window))


# ----------------------------------------------------------------------------
# template matching


#: The smallest side, in working pixels, of an image placed inside a larger one by template
#: matching (:func:`_template_candidate`).  A 64^2 moving image zoomed 1.3x in a 200 x 300 fixed
#: one is 21 working pixels a side: its best placement at scale 1, a wrong one, scored 0.90 over so
#: few pixels, above the right candidates' 0.86 and the search's threshold (register() ended 55 px
#: off); a 64^2 fixed image in a 256^2 moving one keeps 32.
TEMPLATE_MIN_SIDE = 32


def _box_sums(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sums of ``image`` ``(B, 1, H, W)`` over every ``height x width`` window wholly inside it,
    ``(B, H - height + 1, W - width + 1)`` (summed-area table, in the image's dtype)."""
    table = F.pad(image[:, 0].cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    return (table[:, height:, width:] - table[:, :-height, width:]
            - table[:, height:, :-width] + table[:, :-height, :-width])


def _template_offsets(small: torch.Tensor, large: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the image ``small`` ``(B, 1, h, w)`` lies in ``large`` ``(B, 1, H, W)`` (``h <= H``,
    ``w <= W``): the offset ``(dx, dy)`` ``(B, 2)`` of its top-left pixel at the placement, wholly
    inside, of the highest normalised cross-correlation, and that NCC ``(B,)`` (OpenCV's
    ``matchTemplate(TM_CCOEFF_NORMED)``)::

        NCC(u) = sum_x s~(x) L(x + u) / sqrt(sum_x s~^2  sum_x (L(x + u) - mean_u L)^2)

    with ``s~`` the small image less its mean; the numerator for every ``u`` at once by FFT (the
    small image zero-padded at the top left: no placement wraps), the window sums by summed-area
    tables, in float64.  A flat window scores 0.

    Why: the other candidates see the moving image only where it overlaps the fixed one with the
    centres aligned, so a 64^2 fixed image cut 80 px off the middle of a 256^2 moving one (a
    template, a tile in an overview) started 24-66 px off, "converged", where OpenCV's template
    matching found it."""
    height, width = small.shape[-2:]
    large = large.to(torch.float64)
    large = large - large.mean(dim=(-2, -1), keepdim=True)  # the window sums cancel less
    small = _centred(small.to(torch.float64))
    size = large.shape[-2:]
    # (_fft: a pair's numbers are those it gets alone, whatever its batch)
    spectrum = _fft(torch.fft.rfft2, large[:, 0], s=size) * _fft(torch.fft.rfft2, small[:, 0], s=size).conj()
    numerator = _fft(torch.fft.irfft2, spectrum, s=size)[:, : size[0] - height + 1, : size[1] - width + 1]
    count = height * width
    sums = _box_sums(large, height, width)
    variance = (_box_sums(large.square(), height, width) - sums.square() / count).clamp_min(0.0)
    energy = small.square().sum(dim=(1, 2, 3))[:, None, None]
    denominator = (variance * energy).sqrt()
    flat = denominator <= 1e-12 * (large.square().sum(dim=(1, 2, 3))[:, None, None] * energy).sqrt()
    ncc = torch.where(flat, 0.0, numerator / torch.where(flat, 1.0, denominator))
    best = ncc.flatten(1).argmax(dim=1)
    columns = ncc.shape[-1]
    offsets = torch.stack([best % columns, torch.div(best, columns, rounding_mode="floor")], dim=1)
    return offsets.to(small.dtype), ncc.flatten(1).gather(1, best[:, None])[:, 0]


# ----------------------------------------------------------------------------
# Fourier–Mellin


def _radial_window(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant Hann window ``cos^2(pi r / (2 R))`` for ``r < R``, ``R = min(H, W) / 2``, about the centre."""
    ys = torch.arange(height, dtype=like.dtype, device=like.device) - (height - 1) / 2
    xs = torch.arange(width, dtype=like.dtype, device=like.device) - (width - 1) / 2
    radius = torch.sqrt(ys[:, None] ** 2 + xs**2) / (min(height, width) / 2.0)
    return torch.where(radius < 1, torch.cos(0.5 * math.pi * radius) ** 2, torch.zeros_like(radius))


def _log_polar_spectrum(
    image: torch.Tensor, size: int, angles: int, radii: int, r_min: float, r_max: float
) -> torch.Tensor:
    """High-pass filtered magnitude spectrum of ``(N, 1, H, W)`` on a log-polar grid, ``(N, 1, angles, radii)``.

    The image (mean removed, radial Hann window) is zero-padded to
    ``size x size`` so that its frequency samples are isotropic; the magnitude
    ``|DFT|`` is multiplied by Reddy & Chatterji's high-pass filter
    ``H = (1 - X)(2 - X)``, ``X = cos(pi xi) cos(pi eta)`` (``xi, eta`` in cycles
    per pixel, ``[-1/2, 1/2)``), and sampled bilinearly at
    ``k = rho (cos phi, sin phi)`` for ``phi = pi j / angles`` (half a turn: the
    magnitude of a real image's spectrum is centrally symmetric) and
    ``rho = r_min (r_max / r_min)^(i / (radii - 1))``, in frequency-index units.
    """
    count, _, height, width = image.shape
    dtype, device = image.dtype, image.device
    window = cached(("radial window", height, width), dtype, device, lambda: _radial_window(height, width, image))
    windowed = _centred(image[:, 0]) * window
    magnitude = torch.fft.fftshift(torch.fft.fft2(windowed, s=(size, size)).abs(), dim=(-2, -1))
    high_pass = cached(("high-pass", size), dtype, device, lambda: _high_pass(size, image))
    grid = cached(("log-polar grid", size, angles, radii, r_min, r_max), dtype, device,
                  lambda: _log_polar_grid(size, angles, radii, r_min, r_max, image))
    return F.grid_sample((magnitude * high_pass)[:, None], grid.expand(count, angles, radii, 2), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def _high_pass(size: int, like: torch.Tensor) -> torch.Tensor:
    """Reddy & Chatterji's ``H = (1 - X)(2 - X)``, ``X = cos(pi xi) cos(pi eta)``, on the fftshifted ``size^2`` grid."""
    freq = torch.fft.fftshift(torch.fft.fftfreq(size, dtype=like.dtype, device=like.device))
    cosines = torch.cos(math.pi * freq)
    band = cosines[:, None] * cosines
    return (1.0 - band) * (2.0 - band)


def _log_polar_grid(size: int, angles: int, radii: int, r_min: float, r_max: float, like: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` points of :func:`_log_polar_spectrum`'s samples, ``(1, angles, radii, 2)``."""
    phi = torch.arange(angles, dtype=like.dtype, device=like.device) * (math.pi / angles)
    rho = r_min * torch.exp(
        torch.arange(radii, dtype=like.dtype, device=like.device) * (math.log(r_max / r_min) / (radii - 1))
    )
    centre = size // 2  # zero frequency after fftshift
    kx = centre + rho[None, :] * torch.cos(phi)[:, None]  # (angles, radii), index units
    ky = centre + rho[None, :] * torch.sin(phi)[:, None]
    return torch.stack([(2 * kx + 1) / size - 1, (2 * ky + 1) / size - 1], dim=-1)[None]


def _fourier_mellin(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fourier_mellin` on checked ``(N, 1, H, W)`` luminance images."""
    size = max(*fixed.shape[-2:], *moving.shape[-2:])
    if size < 8:  # no spectrum to speak of: no rotation, no scale (tested before the rounding to even)
        zeros = torch.zeros(fixed.shape[0], dtype=fixed.dtype, device=fixed.device)
        return zeros, zeros + 1.0
    size += size % 2
    angles = 360
    radii = max(32, size // 2)
    r_max = size / 2.0 - 1.0
    r_min = max(1.0, size / 64.0)
    polar_fixed = _log_polar_spectrum(fixed, size, angles, radii, r_min, r_max)
    polar_moving = _log_polar_spectrum(moving, size, angles, radii, r_min, r_max)
    # phi is periodic (no window); log rho is not (Hann along it)
    window = _hann(radii, fixed).expand(angles, radii)
    spectra = _centred_spectra(torch.cat([polar_moving[:, 0], polar_fixed[:, 0]]), window)  # one transform
    spectrum = _cross_power(spectra[: fixed.shape[0]], spectra[fixed.shape[0]:], radii)
    shift = _peak_shift(spectrum, polar_fixed.shape[-1])  # (d log-rho bins, d phi bins)
    # |M^(k)| = s^2 |F^(s R(-theta) k)|: M's log-polar image is F's shifted by (-log s, -theta)
    angle = -shift[:, 1] * (math.pi / angles)
    scale = torch.exp(-shift[:, 0] * (math.log(r_max / r_min) / (radii - 1)))
    # the peak wrap gives d_phi in [-angles/2, angles/2): angle in (-pi/2, pi/2]; map to [-pi/2, pi/2)
    angle = torch.where(angle >= math.pi / 2, angle - math.pi, angle)
    return angle, scale


@without_autocast
def fourier_mellin(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation and isotropic scale between two images by the Fourier–Mellin transform.

    If ``moving(A x) = fixed(x)`` with ``A x = s R(theta) (x - c) + c + t``,
    the magnitudes of the spectra satisfy (translation drops out)::

        |M^(k)| = s^2 |F^(s R(-theta) k)|,

    so on a log-polar grid ``k = e^u (cos phi, sin phi)`` the moving magnitude
    is the fixed one shifted by ``(delta phi, delta u) = (-theta, -log s)``,
    which phase correlation finds (Reddy & Chatterji 1996).  Each image is
    mean-subtracted, weighted by a radial Hann window (a disk of diameter
    ``min(H, W)`` about its centre, so that rotating the content does not
    rotate the window's own spectral footprint), zero-padded to a common
    even square size ``N``, and its magnitude spectrum is high-pass filtered
    by ``H = (1 - X)(2 - X)``, ``X = cos(pi xi) cos(pi eta)``, before the
    log-polar resampling (360 angles over half a turn, ``max(32, N/2)`` radii
    from ``max(1, N/64)`` to ``N/2 - 1`` frequency bins).  The two images may
    differ in size.  A bin is 0.5 degree and ``log(r_max / r_min) / (radii - 1)``
    in log-scale (5.5 % for ``N = 128``), refined to sub-bin accuracy; the
    detectable scale range is ``(r_min / r_max)^(1/2) .. (r_max / r_min)^(1/2)``
    (0.18 .. 5.6 for ``N = 128``), in practice narrower as the overlap of the
    spectra shrinks.
    Images whose larger side is below 8 pixels give ``(0, 1)``.

    **180-degree ambiguity — left to the caller.**  The magnitude spectrum of
    a real image is centrally symmetric, so ``theta`` and ``theta + pi`` give
    the same data; the angle returned lies in ``[-pi/2, pi/2)``.
    :func:`initialize` resolves it by trying both and scoring each by
    normalised cross-correlation.

    Args:
        fixed: ``(B, C, H, W)`` reference image.
        moving: ``(B, C, H', W')`` image (a batch of 1 broadcasts).

    Returns:
        ``(angle, scale)``, each ``(B,)``: angle in radians (tireg's/OpenCV's
        sign, in ``[-pi/2, pi/2)``, modulo ``pi``) and scale ``s > 0`` of the
        similarity ``A = similarity_matrix((angle, scale, tx, ty), centre)``
        mapping fixed to moving points (``s > 1``: the moving image shows the
        content enlarged).  The translation is not estimated (see
        :func:`initialize`, method ``"fourier-mellin"``).  Constant images
        give ``(0, 1)``.

    Raises:
        ValueError: wrong dimensions, empty images, NaN/Inf.
    """
    caller = "fourier_mellin()"
    fixed, moving = _pair(fixed, moving, caller)
    with torch.no_grad():
        angle, scale = _fourier_mellin(fixed, moving)
        constant_pair = _is_constant(fixed) | _is_constant(moving)  # as phase_correlation: no spectrum to read
        # -pi/2 rounded to float32 lies below -pi/2: the least value of the dtype in [-pi/2, pi/2)
        return (torch.where(constant_pair, 0.0, angle.clamp_min(_least_angle(angle.dtype))),
                torch.where(constant_pair, 1.0, scale))


def _least_angle(dtype: torch.dtype) -> float:
    """The least value of ``dtype`` that is at least ``-pi/2``."""
    value = torch.tensor(-math.pi / 2, dtype=dtype)
    if float(value) < -math.pi / 2:
        value = torch.nextafter(value, torch.zeros_like(value))
    return float(value)


# ----------------------------------------------------------------------------
# moments


def _centroid_and_covariance(image: torch.Tensor, mask: Optional[torch.Tensor] = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intensity centroid ``(N, 2)``, covariance ``(N, 2, 2)``, mass ``(N,)`` and weights of ``(N, 1, H, W)``.

    The weights are the luminance minus its minimum, ``w = I - min I``; with a 0/1 ``mask``
    ``(N, 1, H, W)``, ``w = (I - min_mask I) mask``: only the masked pixels carry mass.
    """
    if mask is None:
        weights = image[:, 0] - image.flatten(1).amin(dim=1).view(-1, 1, 1)
    else:
        inside = mask[:, 0] > 0
        lowest = torch.where(inside, image[:, 0], math.inf).flatten(1).amin(dim=1).view(-1, 1, 1)
        weights = torch.where(inside, image[:, 0] - lowest, 0.0)
    height, width = weights.shape[-2:]
    ys = torch.arange(height, dtype=image.dtype, device=image.device)
    xs = torch.arange(width, dtype=image.dtype, device=image.device)
    mass = weights.sum(dim=(1, 2))
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    column_sums, row_sums = weights.sum(dim=1), weights.sum(dim=2)  # (N, W), (N, H)
    mean_x = (column_sums * xs).sum(dim=1) / safe
    mean_y = (row_sums * ys).sum(dim=1) / safe
    dx = xs[None, :] - mean_x[:, None]  # (N, W)
    dy = ys[None, :] - mean_y[:, None]  # (N, H)
    cxx = (column_sums * dx**2).sum(dim=1) / safe
    cyy = (row_sums * dy**2).sum(dim=1) / safe
    cxy = torch.einsum("nhw,nh,nw->n", weights, dy, dx) / safe
    centroid = torch.stack([mean_x, mean_y], dim=1)
    geometric = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0], dtype=image.dtype, device=image.device)
    centroid = torch.where((mass > 0)[:, None], centroid, geometric)
    covariance = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return centroid, covariance, mass, weights


@without_autocast
def center_of_mass(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Translation that aligns the intensity centroids (ITK's ``MOMENTS`` initialiser, translation part).

    With weights ``w(x) = I(x) - min I`` (so adding a constant to an image
    changes nothing; for images with a zero background this is ITK's
    centroid), the centroid is ``c = sum_x w(x) x / sum_x w(x)`` and::

        A = [[1, 0, c_m,x - c_f,x], [0, 1, c_m,y - c_f,y], [0, 0, 1]]

    maps the fixed centroid onto the moving one.  An image with no
    variation has no centroid: its geometric centre ``((W-1)/2, (H-1)/2)`` is
    used instead (two constant images of equal size give the identity).

    Args:
        fixed: ``(B, C, H, W)``; moving: ``(B, C, H', W')`` (sizes may differ;
            a batch of 1 broadcasts).

    Returns:
        ``(B, 3, 3)`` fixed -> moving pixel matrix.
    """
    caller = "center_of_mass()"
    fixed, moving = _pair(fixed, moving, caller)
    with torch.no_grad():
        centroid_f = _centroid_and_covariance(fixed)[0]
        centroid_m = _centroid_and_covariance(moving)[0]
        return translation_matrix(centroid_m - centroid_f)


def _principal_axes(covariance: torch.Tensor, weights: torch.Tensor, centroid: torch.Tensor):
    """Eigenvalues ``(N, 2)`` (descending) and proper-rotation eigenvectors ``(N, 2, 2)`` (columns).

    Each axis' sign is chosen so that the third moment of the intensities
    projected on it is non-negative; the second axis is then set so that the
    determinant is +1.
    """
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(-1), vectors.flip(-1)
    height, width = weights.shape[-2:]
    ys = torch.arange(height, dtype=weights.dtype, device=weights.device)
    xs = torch.arange(width, dtype=weights.dtype, device=weights.device)
    dx = xs[None, None, :] - centroid[:, 0, None, None]  # (N, 1, W)
    dy = ys[None, :, None] - centroid[:, 1, None, None]  # (N, H, 1)
    major = vectors[:, :, 0]  # (N, 2)
    projection = major[:, 0, None, None] * dx + major[:, 1, None, None] * dy  # (N, H, W)
    skew = (weights * projection**3).sum(dim=(1, 2))
    sign = torch.where(skew < 0, -torch.ones_like(skew), torch.ones_like(skew))
    major = major * sign[:, None]
    minor = torch.stack([-major[:, 1], major[:, 0]], dim=1)  # det [major, minor] = +1
    return values, torch.stack([major, minor], dim=2)


def _moments(fixed: torch.Tensor, moving: torch.Tensor, kind: str, fixed_mask: Optional[torch.Tensor] = None,
             moving_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`moments` on checked luminance images (of their masked pixels, where masks are given); ``(N, 3, 3)``."""
    centroid_f, cov_f, mass_f, weights_f = _centroid_and_covariance(fixed, fixed_mask)
    centroid_m, cov_m, mass_m, weights_m = _centroid_and_covariance(moving, moving_mask)
    eye = torch.eye(2, dtype=fixed.dtype, device=fixed.device).expand(fixed.shape[0], 2, 2)
    if kind == "translation":
        linear = eye
    else:
        values_f, axes_f = _principal_axes(cov_f, weights_f, centroid_f)
        values_m, axes_m = _principal_axes(cov_m, weights_m, centroid_m)
        tiny = torch.finfo(fixed.dtype).eps
        valid = (values_f[:, 1] > tiny * values_f[:, 0].clamp_min(tiny)) & (
            values_m[:, 1] > tiny * values_m[:, 0].clamp_min(tiny)
        )
        valid = valid & (mass_f > 0) & (mass_m > 0)
        safe_f = torch.where(valid[:, None], values_f, torch.ones_like(values_f))
        safe_m = torch.where(valid[:, None], values_m, torch.ones_like(values_m))
        if kind == "affine":
            stretch = torch.diag_embed(torch.sqrt(safe_m / safe_f))
        elif kind == "rigid":
            stretch = eye
        else:  # similarity, anisotropic_similarity: isotropic scale sqrt(sqrt(det C_m / det C_f))
            scale = (safe_m.prod(dim=1) / safe_f.prod(dim=1)) ** 0.25
            stretch = scale[:, None, None] * eye
        linear = axes_m @ stretch @ axes_f.transpose(1, 2)
        linear = torch.where(valid[:, None, None], linear, eye)
    offset = centroid_m - (linear @ centroid_f[:, :, None])[:, :, 0]
    top = torch.cat([linear, offset[:, :, None]], dim=2)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=fixed.dtype, device=fixed.device).expand(fixed.shape[0], 1, 3)
    return torch.cat([top, bottom], dim=1)


@without_autocast
def moments(fixed: torch.Tensor, moving: torch.Tensor, *, transform: str = "similarity") -> torch.Tensor:
    """Centroids and principal axes of the intensities aligned (image moments).

    With weights ``w = I - min I``, centroid ``c`` and covariance
    ``C = sum_x w (x - c)(x - c)^T / sum_x w = V diag(l1, l2) V^T``
    (``l1 >= l2``, ``V`` a proper rotation whose columns are the principal
    axes), a point ``x`` of the fixed image corresponds to
    ``L (x - c_f) + c_m`` in the moving image with::

        rigid:       L = V_m V_f^T
        similarity:  L = (l1_m l2_m / (l1_f l2_f))^(1/4) V_m V_f^T
        affine:      L = V_m diag(sqrt(l1_m / l1_f), sqrt(l2_m / l2_f)) V_f^T

    so that ``L C_f L^T = C_m`` (exactly for affine, up to the isotropic part
    otherwise) (Teague 1980; ITK's ``ImageMomentsCalculator``).
    ``"anisotropic_similarity"`` uses the similarity form and
    ``"translation"`` the identity ``L`` (:func:`center_of_mass`).

    **Sign ambiguity.**  An eigenvector is defined only up to its sign, so
    the rotation is defined only modulo 180 degrees.  Here each major axis is
    oriented so that the third moment (skewness) of the intensities along it
    is non-negative, the minor axis completing a proper rotation.  For
    content with little skewness along its major axis the result may be off
    by 180 degrees (:func:`initialize` with ``method="moments"`` tries both);
    for nearly isotropic content (``l1 ≈ l2``) the axes and the angle are
    not determined at all.  Degenerate covariances (constant images, a
    single bright pixel, a line) give ``L = I``.

    Args:
        fixed: ``(B, C, H, W)``; moving: ``(B, C, H', W')`` (sizes may differ).
        transform: ``"translation"``, ``"rigid"``, ``"similarity"`` (default),
            ``"anisotropic_similarity"`` or ``"affine"``.

    Returns:
        ``(B, 3, 3)`` fixed -> moving pixel matrix ``[L | c_m - L c_f]``.
    """
    caller = "moments()"
    _check_kind(transform, caller)
    fixed, moving = _pair(fixed, moving, caller)
    with torch.no_grad():
        return _moments(fixed, moving, transform)


# ----------------------------------------------------------------------------
# scoring


def _ncc_scores(fixed: torch.Tensor, moving: torch.Tensor, matrices: torch.Tensor, min_overlap: float,
                *, of_fixed: float = 0.0, images: int = SCORE_IMAGES) -> torch.Tensor:
    """Overlap NCC of fixed ``(B, I, H, W)`` and moving ``(B, I, h, w)`` for candidates ``(B, K, 3, 3)``: ``(B, K)``,
    the mean over the ``I = images`` channels of each side's NCC (the scoring images' two,
    :func:`_scoring_image`; :func:`overlap_ncc`'s one).

    The ``B K`` warps of a chunk of candidates (:func:`tireg._chunks.chunk_slices`) run as one
    :func:`tireg.warp` call of the moving image's channels and its
    coverage (ones warped with zero padding).  A side of ``I + 1`` channels brings its mask as the
    last (0/1, :func:`_working_image`; halved for the search's first stages, a pixel counts
    where at least half of its block does, :func:`_shrunk_scoring`): the overlap is then also
    inside both masks (the moving mask warped, all four of a point's neighbours inside), and the
    overlap a candidate needs is counted in masked pixels.

    Gain invariant: no absolute constant.  The two sides' centred values are summed as they
    are and ``cov / (sqrt(var_f) sqrt(var_m))`` taken as a product of two reciprocal roots
    (the product ``var_f var_m`` overflows float32 for images of about 1e8, and underflows
    near 1e-10).  A side is flat on the overlap (the score 0) where its variance is within
    rounding of its mean (:func:`tireg.metrics._flat_variance`): relative to the values, so
    the same whatever their gain (an absolute 1e-12 under the root scored an aligned pair 1
    at gain 1 and 0.03 at 1e-5).
    """
    # a candidate holds about 4 I + 2 images of the fixed size (warped, centred, their product): the
    # budget was set for one channel, 6
    held = matrices.shape[0] * fixed.shape[-2] * fixed.shape[-1] * (4 * images + 2) // 6
    return torch.cat([_ncc_chunk(fixed, moving, matrices[:, part], min_overlap, of_fixed, images)
                      for part in chunk_slices(matrices.shape[1], held, CHUNK_PIXELS)], dim=1)


def _ncc_chunk(fixed: torch.Tensor, moving: torch.Tensor, matrices: torch.Tensor, min_overlap: float,
               of_fixed: float, images: int) -> torch.Tensor:
    """:func:`_ncc_scores` of one chunk of candidates, ``(B, K)``."""
    batch, count = matrices.shape[:2]
    stacked = moving if moving.shape[1] > images else torch.cat([moving, torch.ones_like(moving[:, :1])], dim=1)
    stacked = stacked[:, None].expand(batch, count, *stacked.shape[1:]).reshape(
        batch * count, images + 1, *moving.shape[-2:])
    warped = _warp(stacked, matrices.reshape(batch * count, 3, 3), fixed.shape[-2:])
    pairs = warped.reshape(batch, count, images + 1, -1)  # (B, K, I + 1, P): the warped moving image, its coverage
    inside = (pairs[:, :, images:] > 0.999).to(fixed.dtype)  # (B, K, 1, P): the overlap
    if fixed.shape[1] > images:  # and inside the fixed mask
        inside = inside.mul_(fixed[:, images:].reshape(batch, 1, 1, -1))
    fixed_pixels, moving_pixels = _pixel_counts(fixed, moving, images)
    overlap = inside.sum(-1)  # (B, K, 1): n
    sides = []  # each side's centred values and their summed squares, (B, K, I, P) and (B, K, I)
    for values in (pairs[:, :, :images], fixed[:, :images].reshape(batch, 1, images, -1)):
        mean = (values * inside).sum(-1) / overlap.clamp_min(1.0)  # (B, K, I)
        centred = (values - mean[..., None]).mul_(inside)
        sides.append((centred, centred.square().sum(-1), mean))
    (moving_centred, moving_variance, moving_mean), (fixed_centred, fixed_variance, fixed_mean) = sides
    covariance = (moving_centred * fixed_centred).sum(-1)
    ncc = (covariance * moving_variance.rsqrt() * fixed_variance.rsqrt()).clamp(-1.0, 1.0)
    # a flat side: NaN or noise above
    flat = _flat_variance(moving_variance, moving_mean, overlap) | _flat_variance(fixed_variance, fixed_mean, overlap)
    ncc = torch.where(flat, 0.0, ncc).mean(-1)
    least = _least_overlap(matrices, moving_pixels, fixed_pixels, min_overlap, of_fixed=of_fixed)
    return torch.where(overlap[..., 0] >= least, ncc, -1.0)


def _pixel_counts(fixed: torch.Tensor, moving: torch.Tensor, images: int = SCORE_IMAGES) -> tuple:
    """The pixels of the scoring images ``fixed`` ``(B, I or I + 1, H, W)`` and ``moving``
    (:func:`_ncc_scores`', ``I = images``): each a number, or ``(B, 1)`` counts inside a pair's mask
    where the image has one (the last channel)."""
    counts = []
    for image in (fixed, moving):
        counts.append(image[:, images:].sum((-1, -2, -3))[:, None] if image.shape[1] > images
                      else image.shape[-2] * image.shape[-1])
    return tuple(counts)


def _least_overlap(matrices: torch.Tensor, moving_pixels, fixed_pixels, min_overlap: float, *,
                   of_fixed: float = 0.0) -> torch.Tensor:
    """``(B, K)``: the overlap a candidate needs, ``min_overlap`` of the smaller of the fixed image and
    the moving image's footprint on it (``moving_pixels / |det A|`` fixed pixels), and at least
    ``min_overlap / 4`` of the smaller image's pixels.  Of the fixed image alone, a moving image
    zoomed 2x or more into part of the fixed one (its footprint a quarter of it at most) had its
    right candidate refused; and with the floor a part of the fixed image, a moving image of less
    than a sixteenth of its pixels (a 64 x 64 template in a 200 x 300 scene, zoomed 1.2x) had
    every right candidate refused, and register() ended 55 px off, "converged".  The pixel counts
    are numbers, or ``(B, 1)`` counts inside each pair's masks (:func:`_pixel_counts`).  ``of_fixed``:
    and at least this fraction of the fixed pixels (the other readings of a shift, :func:`_best_readings`)."""
    determinant = _determinant(matrices[..., :2, :2]).abs()
    footprint = moving_pixels / determinant.clamp_min(1e-12)
    fixed_pixels = torch.as_tensor(fixed_pixels, dtype=footprint.dtype, device=footprint.device)
    smaller = torch.minimum(fixed_pixels,
                            torch.as_tensor(moving_pixels, dtype=footprint.dtype, device=footprint.device))
    least = torch.minimum(footprint, fixed_pixels).mul(min_overlap).maximum(smaller * (min_overlap / 4))
    return least.maximum(fixed_pixels * of_fixed) if of_fixed else least


#: A wrap-around reading of a phase shift (:func:`_wrap_readings`) is scored only where a coarse count
#: of its overlap (:func:`_coarse_overlap`, on :data:`READING_GRID` x :data:`READING_GRID` points)
#: reaches this fraction of the overlap it needs (:func:`_least_overlap`, and :data:`MIN_OVERLAP` of the
#: fixed image: :func:`_best_readings`); the others score -1 unscored.
#: The count errs by a grid cell along the overlap's edges (a sixteenth of a side), so the margin
#: never refuses a reading that the exact count would pass, and a shift of less than a quarter of
#: the image (whose other readings overlap by less than a quarter) costs no scoring.
READING_MARGIN = 0.75
READING_GRID = 16


def _wrap_readings(matrices: torch.Tensor, shifts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The four readings ``(B, K, 4, 3, 3)`` of candidates ``A = P T(t)`` ``(B, K, 3, 3)`` whose shifts
    ``t = (dx, dy)`` ``(B, K, 2)`` are phase-correlation peaks on a grid of ``size = (H, W)``.

    A peak is known only modulo the grid, and :func:`_peak_shift` wraps it to ``[-N/2, N/2)``; the
    true shift may be the other reading of either axis, ``dx' = dx - W sign(dx)``, ``dy' = dy - H
    sign(dy)`` (a shift of more than half the image, with less than half of it overlapping; a zero
    shift has no other reading: its reading is the first again, which :func:`_best_readings` skips).  The
    readings are ``P T(dx, dy)``, ``P T(dx', dy)``, ``P T(dx, dy')``, ``P T(dx', dy')`` in that
    order, i.e. ``A T(d)`` for ``d = (0, 0), (dx' - dx, 0), (0, dy' - dy), (dx' - dx, dy' - dy)``.
    A 128 x 128 pair shifted by (70, 0) (45 % overlap) had started at (-58, 0) and ended 129 px
    off, "converged"."""
    height, width = size
    period = constant((float(width), float(height)), like=shifts)
    other = shifts.sign().neg_().mul_(period)  # (B, K, 2): dx' - dx, dy' - dy (0 for a zero shift)
    zero = torch.zeros_like(other[..., :1])
    deltas = torch.stack([torch.cat([zero, zero], -1), torch.cat([other[..., :1], zero], -1),
                          torch.cat([zero, other[..., 1:]], -1), other], dim=-2)  # (B, K, 4, 2)
    return matrices[:, :, None] @ translation_matrix(deltas)


def _coarse_overlap(matrices: torch.Tensor, fixed_size: Sequence[int], moving_size: Sequence[int]) -> torch.Tensor:
    """``(...)``: about how many fixed pixels of a ``fixed_size`` grid each matrix ``(..., 3, 3)`` maps
    inside a moving grid of ``moving_size`` (``0 <= x <= w - 1``, ``0 <= y <= h - 1``, the overlap
    that :func:`_ncc_scores` counts), from the centres of a :data:`READING_GRID` square grid of cells."""
    (height, width), (moving_height, moving_width) = fixed_size, moving_size
    rows, columns = min(READING_GRID, height), min(READING_GRID, width)

    def points():  # (3, rows * columns) homogeneous cell centres
        like = matrices
        ys = (torch.arange(rows, dtype=like.dtype, device=like.device) + 0.5) * (height / rows) - 0.5
        xs = (torch.arange(columns, dtype=like.dtype, device=like.device) + 0.5) * (width / columns) - 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1), torch.ones_like(grid_x.reshape(-1))])

    grid = cached(("reading grid", height, width, rows, columns), matrices.dtype, matrices.device, points)
    mapped = matrices[..., :2, :] @ grid  # (..., 2, P)
    limits = constant(((moving_width - 1.0,), (moving_height - 1.0,)), like=mapped)
    inside = ((mapped >= 0) & (mapped <= limits)).all(dim=-2)
    return inside.to(matrices.dtype).mean(dim=-1) * (height * width)


def _best_readings(readings: torch.Tensor, score_fixed: torch.Tensor, score_moving: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's best reading ``(B, K, 3, 3)`` of :func:`_wrap_readings`' ``(B, K, 4, 3, 3)``, and
    its overlap NCC ``(B, K)`` (:func:`_ncc_scores` of the working images ``score_fixed``,
    ``score_moving``; the first reading, the wrapped shift, on a tie).

    An other reading (not the first) is kept only where its overlap reaches :data:`MIN_OVERLAP` of
    the whole fixed image (inside its mask) as well as what any score needs, and where it scores
    :data:`AUTO_THRESHOLD` or more.  With the moving footprint's share alone, an other reading of a
    search candidate zoomed 1.48x, overlapping 12 % of the fixed image (46 % of its footprint),
    scored 0.81 on an other-channel pair and outscored the right start (``accuracy.py``'s contrast
    suite, affine, channel #3 with ``mi``: 0.3 px -> 336 px); and with that rule alone, kept at any
    score, a translation's other reading (36 % overlap, 0.65) outscored a wrong start that
    ``register`` recovered from (channel #10: 0.09 -> 192 px).  Pairs of one modality shifted beyond half the image score
    their right reading far above the threshold.  Only the other readings whose coarse overlap
    (:func:`_coarse_overlap`) can reach that overlap (:data:`READING_MARGIN`) are warped and scored,
    each on its own pair's images: a pair's start is the same in any batch, and one pair's
    readings cost nothing for the others."""
    batch, count = readings.shape[:2]
    first = _ncc_scores(score_fixed, score_moving, readings[:, :, 0], MIN_OVERLAP)  # (B, K)
    others = readings[:, :, 1:]  # (B, K, 3, 3, 3)
    fixed_pixels, moving_pixels = _pixel_counts(score_fixed, score_moving)
    least = _least_overlap(others.flatten(1, 2), moving_pixels, fixed_pixels, MIN_OVERLAP, of_fixed=MIN_OVERLAP)
    coarse = _coarse_overlap(others.flatten(1, 2), score_fixed.shape[-2:], score_moving.shape[-2:])
    plausible = (coarse >= READING_MARGIN * least).view(batch, count, 3)
    plausible &= (others != readings[:, :, :1]).flatten(-2).any(dim=-1)  # not the first again
    scores = first[..., None].repeat(1, 1, 4)
    scores[..., 1:] = -1.0  # an other reading unscored: as an overlap too small
    index = plausible.nonzero()  # (N, 3): pair, candidate, other reading
    if index.numel():
        pairs, matrices = index[:, 0], others[index[:, 0], index[:, 1], index[:, 2]]  # (N,), (N, 3, 3)
        found = torch.cat([
            _ncc_scores(score_fixed[pairs[part]], score_moving[pairs[part]], matrices[part, None], MIN_OVERLAP,
                        of_fixed=MIN_OVERLAP)[:, 0]
            for part in chunk_slices(len(pairs), score_fixed.shape[-2] * score_fixed.shape[-1], CHUNK_PIXELS)])
        found = found.where(found >= AUTO_THRESHOLD, -1.0)  # convincing only: see above
        scores[index[:, 0], index[:, 1], index[:, 2] + 1] = found
    best = scores.argmax(dim=-1, keepdim=True)  # the first of equals: the wrapped shift
    return (readings.gather(2, best[..., None, None].expand(batch, count, 1, 3, 3))[:, :, 0],
            scores.gather(2, best)[..., 0])


@without_autocast
def overlap_ncc(
    fixed: torch.Tensor, moving: torch.Tensor, matrix: torch.Tensor, *, min_overlap: float = MIN_OVERLAP
) -> torch.Tensor:
    """Normalised cross-correlation of ``fixed(x)`` and ``moving(A x)`` over their overlap.

    With ``Omega = {x : A x inside the moving image}`` (bilinear support),::

        NCC = sum_Omega (F - mean F)(M(A x) - mean M) / sqrt(sum_Omega (F - mean F)^2 sum_Omega (M(A x) - mean M)^2)

    means taken over ``Omega``.  It is ``-1`` when ``Omega`` covers less than
    ``min_overlap`` of the smaller of the fixed image and the moving image's
    footprint on it (``h w / |det A|`` pixels: a moving image zoomed into part
    of the fixed one covers no more), or less than ``min_overlap / 4`` of the
    smaller image's pixels; and ``0`` when either side has no
    variation on ``Omega`` (within rounding of its values: ``sum_Omega (F - mean F)^2
    <= |Omega| (4 eps mean F)^2``).  It is the same for images of any gain: no absolute
    constant enters.  This is the score :func:`initialize` uses (there on
    slightly blurred, downsampled copies).

    Args:
        fixed: ``(B, C, H, W)``; moving: ``(B, C, H', W')`` (luminance used; a batch of 1
            broadcasts).
        matrix: ``(B, 3, 3)`` or ``(3, 3)`` fixed -> moving pixel matrices, finite and affine
            (last row ``(0, 0, 1)``); a single matrix, or a batch of 1, applies to every pair.
        min_overlap: minimum fraction in ``Omega`` (see above), in ``[0, 1]``.

    Returns:
        ``(B,)`` scores in ``[-1, 1]``.

    Raises:
        TypeError: a matrix that is not a float tensor, a ``min_overlap`` that is not a number.
        ValueError: the images' checks (:func:`initialize`'s); a matrix of another shape, not
            finite or not affine; batches that differ (other than 1); ``min_overlap`` outside
            ``[0, 1]`` or NaN.
    """
    caller = "overlap_ncc()"
    fixed, moving = _pair(fixed, moving, caller)
    matrix = check_matrix(matrix, caller)
    check_not_meta(matrix, fixed, caller)
    if matrix.shape[0] == 0:
        raise ValueError(f"{caller}: 'matrix' holds no matrix; got shape {tuple(matrix.shape)}")
    if not all_finite(matrix):
        raise ValueError(f"{caller}: 'matrix' contains NaN or Inf values")
    check_affine(matrix, caller)
    min_overlap = finite_number(min_overlap, "min_overlap", caller)
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"{caller}: 'min_overlap' must be a fraction in [0, 1]; got {min_overlap}")
    batch = check_batch(matrix.shape[0], fixed.shape[0], caller)
    fixed = fixed.expand(batch, *fixed.shape[1:])
    moving = moving.expand(batch, *moving.shape[1:])
    matrix = matrix.to(fixed).expand(batch, 3, 3)
    with torch.no_grad():
        return _ncc_scores(fixed, moving, matrix[:, None], min_overlap, images=1)[:, 0]


# ----------------------------------------------------------------------------
# initialize


def _downsample_factor(sizes: Sequence[Sequence[int]], max_size: int) -> int:
    """``ceil(largest side / max_size)``, but no more than keeps ``min(MIN_WORKING_SIDE, max_size)``
    pixels on the smallest side (:data:`MIN_WORKING_SIDE`: a strip keeps rows to correlate), and at least 1.

    An image slightly above ``max_size`` is halved: sparse spots of sigma 1.5 px in 128 x 144 can be
    averaged away (one such pair started 54 px off), but kept whole up to 1.25 ``max_size``, noisy
    pairs of 129-160 px (noise sigma 0.3 of the range) started more than 5 px off twice as often
    (translation 15 of 97 instead of 6, rigid 10 of 80 instead of 5), in up to twice the time."""
    largest = max(max(int(s) for s in size) for size in sizes)
    smallest = min(min(int(s) for s in size) for size in sizes)
    return max(1, min(int(math.ceil(largest / max_size)), smallest // min(MIN_WORKING_SIDE, max_size)))


def _candidate_linear(params: torch.Tensor) -> torch.Tensor:
    """A candidate's linear part ``(..., 2, 2)`` from ``params (..., 4)`` = ``(theta, log s, phi, log r)``:

    ``L = s R(theta) R(phi) diag(r, 1/r) R(phi)^T``, a similarity (``r = 1``) or one followed by a
    stretch of determinant 1 along the axis ``phi`` (every linear part with a positive determinant
    has this form: a rotation times a symmetric positive definite matrix).
    """
    axis = rotation(params[..., 2])
    stretch = torch.exp(torch.stack([params[..., 3], -params[..., 3]], dim=-1))
    symmetric = (axis * stretch[..., None, :]) @ axis.transpose(-1, -2)
    return torch.exp(params[..., 1])[..., None, None] * rotation(params[..., 0]) @ symmetric


def _similarity_params(angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`_candidate_linear`'s parameters ``(..., 4)`` of similarities, from angles and scales ``(...)``."""
    zeros = torch.zeros_like(angles)
    return torch.stack([angles, scales.log(), zeros, zeros], dim=-1)


def _candidates(
    fixed_spectra: torch.Tensor,
    canvas: torch.Tensor,
    base: torch.Tensor,
    params: torch.Tensor,
    centre: torch.Tensor,
    *,
    upsample: int,
) -> torch.Tensor:
    """Candidates ``base S0 T(t)`` for given linear parts, their shifts by phase correlation.

    ``S0`` is the linear part of ``params`` (:func:`_candidate_linear`) about ``centre`` with zero
    shift, and ``t`` the shift that phase correlation finds between the fixed image and the canvas
    resampled by ``S0``.

    ``fixed_spectra`` ``(B, H, W // 2 + 1)``: the fixed images' windowed
    :func:`_spectra`; ``canvas`` ``(B, 1, H, W)`` mean-free moving image on the
    fixed grid (``canvas(x) = M(base x)``); ``base`` ``(B, 3, 3)``; ``params``
    ``(B, K, 4)``; ``centre`` ``(B, 2)``.  Returns ``(B, K, 3, 3)`` and the shifts ``t`` ``(B, K, 2)``
    (in ``[-N/2, N/2)`` along an axis of ``N`` pixels: :func:`_wrap_readings` gives the others).
    """
    batch, count = params.shape[:2]
    repeat = lambda t: t[:, None].expand(batch, count, *t.shape[1:]).reshape(batch * count, *t.shape[1:])  # noqa: E731
    start = _about_center(_candidate_linear(params.reshape(-1, 4)), torch.zeros_like(params[0, :1, :2]),
                          repeat(centre))
    turned = _warp(repeat(canvas), start, None)
    shift = _shifts(fixed_spectra, turned, upsample=upsample)
    return ((repeat(base) @ start @ translation_matrix(shift)).view(batch, count, 3, 3),
            shift.view(batch, count, 2))


#: :func:`_extent_candidates` runs where the images' sizes differ by this ratio or more (either way):
#: Fourier-Mellin on the moving image pasted onto the fixed grid finds a zoom of up to about 2.
EXTENT_RATIO = 1.5


def _extent_candidates(small_f: torch.Tensor, small_m: torch.Tensor, base: torch.Tensor, fixed_spectra: torch.Tensor,
                       turn_centre: torch.Tensor, kind: str, centre: torch.Tensor) -> Optional[torch.Tensor]:
    """``auto``'s candidates for two images of one footprint at different resolutions, ``(B, 2, 4, 3, 3)``
    (both 180-degree options, each in its wrap-around readings), or ``None``: for a kind with a scale
    and working images whose sizes differ by :data:`EXTENT_RATIO` or more.

    The moving image is zoomed onto the fixed grid so that its extent is the fixed image's (the
    zoom ``r``, the geometric mean of the two sides' ratios, about the fixed image's middle;
    smoothed by ``0.42 r`` px first where it is the finer), and Fourier-Mellin and phase
    correlation find the rest, as for the candidates of equal sizes.  Why: satellite scenes of one
    area at 10 m and 30 m (Landsat against Sentinel-2), or 20 m against 10 m, started 170-280 px
    off, "converged" there: pasted onto the fixed grid at its own pixel size the moving image
    covered a ninth of it, or showed a quarter of itself, and Fourier-Mellin found a zoom of 1.3
    for 1/3 (a remote-sensing audit).  Scored with the others, they lose where the smaller image is
    a part of the larger one at its own pixel size (the template candidates' case)."""
    if kind not in _SCALED_KINDS:
        return None
    (height, width), (height_m, width_m) = small_f.shape[-2:], small_m.shape[-2:]
    ratio = math.sqrt((width_m / width) * (height_m / height))  # moving pixels per fixed pixel
    if abs(math.log(ratio)) < math.log(EXTENT_RATIO):
        return None
    batch = small_f.shape[0]
    moving = gaussian_blur(small_m, 0.42 * ratio, padding_mode="reflection") if ratio > 1.0 else small_m
    zoom = torch.eye(2, dtype=base.dtype, device=base.device).mul(ratio).expand(batch, 2, 2)
    extent = base @ _about_center(zoom, torch.zeros_like(turn_centre), turn_centre)  # fixed -> moving, extents met
    canvas = _warp(_centred(moving), extent, small_f.shape[-2:])
    angle, scale = _fourier_mellin(small_f, canvas)
    params = _similarity_params(torch.stack([angle, angle + math.pi], dim=1), torch.stack([scale, scale], dim=1))
    options = _wrap_readings(*_candidates(fixed_spectra, canvas, extent, params, turn_centre, upsample=10),
                             small_f.shape[-2:])  # (B, 2, 4, 3, 3)
    return _project(options.flatten(0, 2), kind, centre.repeat_interleave(8, dim=0)).view(batch, 2, 4, 3, 3)


def _project(matrix: torch.Tensor, kind: str, centre: torch.Tensor) -> torch.Tensor:
    """The matrix of kind ``kind`` that agrees with ``matrix (N, 3, 3)`` at ``centre (N, 2)``.

    translation: ``T(A c - c)``; rigid: the rotation ``R`` nearest to ``L``
    (angle ``atan2(L01 - L10, L00 + L11)``) about ``c``, ``[R | A c - R c]``
    (for a similarity, ``L / s``: the scale dropped, the centre kept in
    place); other kinds: unchanged (every candidate is a similarity, or the
    affine of ``moments``).
    """
    if kind not in ("translation", "rigid"):
        return matrix
    point = torch.cat([centre, torch.ones_like(centre[:, :1])], dim=1)[:, :, None]
    target = (matrix @ point)[:, :2, 0]
    if kind == "translation":
        return translation_matrix(target - centre)
    linear = matrix[:, :2, :2]
    angle = torch.atan2(linear[:, 0, 1] - linear[:, 1, 0], linear[:, 0, 0] + linear[:, 1, 1])
    return rigid_matrix(torch.stack([angle, target[:, 0] - centre[:, 0], target[:, 1] - centre[:, 1]], dim=1), centre)


def _best(matrices: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch element, the candidate ``(B, K, 3, 3)`` with the highest score ``(B, K)`` (first on ties)."""
    index = scores.argmax(dim=1)
    rows = torch.arange(matrices.shape[0], device=matrices.device)
    return matrices[rows, index], scores[rows, index]


def _score_candidates(
    fixed_spectra: torch.Tensor,
    canvas: torch.Tensor,
    base: torch.Tensor,
    centre: torch.Tensor,
    params: torch.Tensor,
    score_fixed: torch.Tensor,
    score_moving: torch.Tensor,
    *,
    readings: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates' parameters ``(B, K, 4)`` (:func:`_candidate_linear`) -> matrices ``(B, K, 3, 3)`` and
    overlap NCC ``(B, K)``, a chunk of candidates (:func:`tireg._chunks.chunk_slices`) at a time; with
    ``readings``, each candidate's shift is the best of its wrap-around readings (:func:`_best_readings`),
    without, the wrapped one (the search's first stage, :func:`_search_stages`)."""
    batch = params.shape[0]
    pixels = batch * canvas.shape[-2] * canvas.shape[-1]
    matrices, shifts = (torch.cat(parts, dim=1) for parts in zip(*[
        _candidates(fixed_spectra, canvas, base, params[:, part], centre, upsample=1)
        for part in chunk_slices(params.shape[1], pixels, CHUNK_PIXELS)
    ]))
    if not readings:
        return matrices, _ncc_scores(score_fixed, score_moving, matrices, MIN_OVERLAP)
    return _best_readings(_wrap_readings(matrices, shifts, canvas.shape[-2:]), score_fixed, score_moving)


def _improved(result: torch.Tensor, score: torch.Tensor, index: torch.Tensor, found: torch.Tensor,
              found_score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``result (B, 3, 3)`` and ``score (B,)`` with the pairs ``index`` replaced by ``found`` where
    ``found_score`` is higher."""
    better = found_score > score[index]
    result = result.index_put((index,), torch.where(better[:, None, None], found, result[index]))
    return result, score.index_put((index,), torch.where(better, found_score, score[index]))


class _SearchImages(NamedTuple):
    """What :func:`_search` scores candidates on, per pair: ``fixed`` ``(B, 1, H, W)`` and its
    windowed :func:`_spectra`, the mean-free ``canvas`` on its grid (:func:`_candidates`),
    ``base`` ``(B, 3, 3)``, the turn ``centre`` ``(B, 2)``, and the blurred images that score the
    candidates by overlap NCC."""

    fixed: torch.Tensor
    fixed_spectra: torch.Tensor
    canvas: torch.Tensor
    base: torch.Tensor
    centre: torch.Tensor
    score_fixed: torch.Tensor
    score_moving: torch.Tensor

    def pairs(self, index: torch.Tensor) -> "_SearchImages":
        """The pairs ``index`` of each part."""
        return _SearchImages(*(part[index] for part in self))


def _search(images: _SearchImages, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine batched search over rotation (and scale, and for affine stretch); returns the
    best ``(B, 3, 3)`` and its score ``(B,)``.

    :func:`_search_stages` over similarities; for ``"affine"``, the pairs whose best scores below
    :data:`SEARCH_STRETCH_BELOW` are searched again over similarities followed by a stretch
    (:data:`SEARCH_STRETCH`, ``stretched=True``), and a stretched candidate that scores at least
    :data:`AUTO_THRESHOLD` and more than the similarity is kept.  Similarities alone had started
    pairs with an aspect change of 1.4-1.5 (scales 1.25 and 0.85 along an axis turned by 10-30
    degrees) 14-222 px off in 21 of 72 cases, worse than the identity in some; their stretched
    candidates scored 0.82-0.99.  The threshold is for other modalities, where a wrong stretched
    candidate outscored the right similarity at 0.44-0.72 (its freedom fits the wrong place
    better too).
    """
    result, score = _search_stages(images, kind)
    if kind == "affine":
        weak = score < SEARCH_STRETCH_BELOW
        if bool(weak.any()):
            index = weak.nonzero()[:, 0]
            found, found_score = _search_stages(images.pairs(index), kind, stretched=True)
            convincing = found_score >= AUTO_THRESHOLD  # more freedom fits the wrong place better too
            result, score = _improved(result, score, index, found, found_score.where(convincing, -math.inf))
    return result, score


def _search_stages(images: _SearchImages, kind: str, *, stretched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The three stages of :func:`_search`; returns the best ``(B, 3, 3)`` and its score ``(B,)``.

    Stage 1: every 10 degrees, scales 0.8, 0.894, 1, 1.118, 1.25 for scaled kinds (36 or 180
    candidates; :data:`SEARCH_SCALES`, :data:`SEARCH_SCALES_BETWEEN`).  Stage 1, and stage 2 where it
    only ranks on halved images (below), score each candidate's wrapped shift only, the others every
    candidate in its wrap-around readings (:func:`_best_readings`).
    Stage 2: around each of the 4 best, angles +-2.5 and +-5 degrees and scales times
    ``1.25^(+-1/2)``.  Stage 3: around the best, +-1.25 degrees and ``1.25^(+-1/4)``.  The best of
    all three wins.  Where the images' smaller side keeps :data:`SEARCH_HALVED_MIN_SIDE` pixels halved,
    stages 1 and 2 only rank, on the halved images (a quarter of the time
    each), and stage 3 refines the 2 best of stage 2 on the working images,
    whose best wins (2 distinct ones: :func:`_two_distinct`).  Every candidate gets its shift from
    phase correlation of the de-rotated moving image and is scored by overlap
    NCC; refining several coarse winners guards against near-periodic content
    (coins in rows, bricks) where a wrong coarse candidate can outscore the
    right one by a hair.

    ``stretched``: the candidates are followed by a stretch ``r`` (:func:`_candidate_linear`).
    Stage 1 ranks the 108 similarities and the same stretched by ``r =`` :data:`SEARCH_STRETCH`
    along :data:`SEARCH_STRETCH_AXES` axes (0, 45, 90 and 135 degrees: 432 more), on the images
    halved once more where they keep :data:`SEARCH_STRETCH_MIN_SIDE` pixels; the pairs whose
    best stretched candidate does not outscore the best similarity by :data:`SEARCH_STRETCH_GAIN`
    stop there, with the score ``-inf`` (and ``base``): a similarity fits them as well.  For the
    others, stage 2 ranks around the 4 best stretched candidates (angle ``+-5`` degrees, scale
    ``1.25^(+-1/2)``, axis ``+-22.5`` degrees, ``r^(+-1/2)``), stage 3 around its 2 best distinct
    ones (half those steps), on the images stage 2 of the similarities ranks on, and the 2 best
    distinct ones of stage 3 are scored on the working images.

    """
    fixed, _, canvas, base, centre, score_fixed, score_moving = images
    batch = canvas.shape[0]
    dtype, device = canvas.dtype, canvas.device
    degree = math.pi / 180.0
    log_step = math.log(1.25) if kind in _SCALED_KINDS else 0.0

    def grid(angles, log_scales, axes, log_ratios):  # every combination, (K, 4)
        values = [torch.tensor(sorted(set(v)), dtype=dtype, device=device)
                  for v in (angles, log_scales, axes, log_ratios)]
        return torch.stack([v.reshape(-1) for v in torch.meshgrid(*values, indexing="ij")], dim=-1)

    def keep(params, scores, count):  # the parameters of the `count` best candidates
        top = scores.topk(min(count, scores.shape[1]), dim=1).indices
        return params.gather(1, top[..., None].expand(-1, -1, 4))

    def shrunk(factor):  # the images that rank candidates, downsampled by `factor`
        shrink = shrink_matrix(factor, dtype=dtype, device=device)
        return (_spectra(downsample(fixed, factor)), downsample(canvas, factor),
                torch.linalg.inv(shrink) @ base @ shrink, _shrunk_points(centre, factor),
                _shrunk_scoring(score_fixed, factor), _shrunk_scoring(score_moving, factor))

    def moves(*steps):  # each parameter by -step, 0 and +step, (81, 4)
        return grid(*[(-step, 0.0, step) for step in steps])

    angles = [(-180.0 + SEARCH_ANGLE_STEP * k) * degree for k in range(int(round(360 / SEARCH_ANGLE_STEP)))]
    log_scales = [math.log(s) for s in SEARCH_SCALES] if log_step else [0.0]  # the stretched stage's
    between = [math.log(s) for s in SEARCH_SCALES_BETWEEN] if log_step else []
    coarse = grid(angles, log_scales + ([] if stretched else between), [0.0], [0.0])
    side = min(*fixed.shape[-2:], *score_moving.shape[-2:])
    halved = side // 2 >= SEARCH_HALVED_MIN_SIDE
    working = images[1:]  # (fixed_spectra, canvas, base, centre, score_fixed, score_moving)
    ranking = shrunk(2) if halved else working  # stage 2's images (and stage 1's, unstretched)

    # stage 1, and the stages that only rank (on halved images), score each candidate's wrapped shift
    # alone, the others every candidate in all its readings (_best_readings): reading every ranked
    # candidate had doubled a weak pair's search (on images too small to halve, stages 2 and 3 read)
    def evaluate(params, readings=True):  # matrices and scores on the working images
        return _score_candidates(*working[:4], params, *working[4:], readings=readings)

    def rank(params):  # scores on stage 2's images, each candidate's wrapped shift
        return _score_candidates(*ranking[:4], params, *ranking[4:], readings=False)[1]

    if stretched:
        # stage 1: similarities and stretched ones, ranked together; the pairs a stretch does not help stop
        log_stretch, axis_step = math.log(SEARCH_STRETCH), math.pi / SEARCH_STRETCH_AXES
        count = coarse.shape[0]
        params = torch.cat([coarse, grid(angles, log_scales, [axis_step * k for k in range(SEARCH_STRETCH_AXES)],
                                         [log_stretch])]).expand(batch, -1, -1)
        factor = 4 if halved else 2
        first = shrunk(factor) if side // factor >= SEARCH_STRETCH_MIN_SIDE else ranking
        scores = _score_candidates(*first[:4], params, *first[4:], readings=False)[1]
        promising = scores[:, count:].amax(dim=1) > scores[:, :count].amax(dim=1) + SEARCH_STRETCH_GAIN
        index = promising.nonzero()[:, 0]
        found = base.clone(), torch.full((batch,), -math.inf, dtype=dtype, device=device)
        if index.numel():
            # stages 2 and 3 rank (81 moves around each of 4, then of 2), and the 2 best are scored on the
            # working images: the registration refines the start, which need only lie in its basin
            # (stage 3 on the working images, as for the similarities, took three times the similarity search)
            working, ranking = (tuple(part[index] for part in images) for images in (working, ranking))
            params = keep(params[index, count:], scores[index, count:], 4)
            for offsets in (moves(5.0 * degree, log_step / 2, axis_step / 2, log_stretch / 2),
                            moves(2.5 * degree, log_step / 4, axis_step / 4, log_stretch / 4)):
                params = _around(params, offsets)
                params = _two_distinct(params, rank(params))
            found = _improved(*found, index, *_best(*evaluate(params)))
        return found
    refine = (grid([-5.0 * degree, -2.5 * degree, 0.0, 2.5 * degree, 5.0 * degree],
                   [-log_step / 2, 0.0, log_step / 2], [0.0], [0.0]),  # stage 2
              moves(1.25 * degree, log_step / 4, 0.0, 0.0))  # stage 3
    params = coarse.expand(batch, -1, -1)
    if halved:
        # stages 1 and 2 only rank, on the images halved: pixel x of a halved image is the point
        # 2 x + 1/2 of the working one (downsample, shrink_matrix); stage 3 refines the two best
        # on the working images and takes the best of its candidates
        params = _around(keep(params, rank(params), 4), refine[0])
        params = _two_distinct(params, rank(params))
        return _best(*evaluate(_around(params, refine[1])))
    matrices, scores = evaluate(params, False)
    best_m, best_s = _best(matrices, scores)
    params = keep(params, scores, 4)
    for offsets in refine:
        params = _around(params, offsets)
        matrices, scores = evaluate(params)
        found_m, found_s = _best(matrices, scores)
        better = found_s > best_s
        best_m = torch.where(better[:, None, None], found_m, best_m)
        best_s = torch.where(better, found_s, best_s)
        params = keep(params, scores, 1)
    return best_m, best_s


def _around(params: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Candidates' parameters ``(B, k, 4)`` moved by each of ``offsets (n, 4)``: ``(B, k * n, 4)``."""
    return (params[:, :, None] + offsets).flatten(1, 2)


def _two_distinct(params: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The best candidate ``(B, K, 4)`` (:func:`_candidate_linear`'s parameters) and the best one
    that differs from it (by 0.5 degree, 2 % in scale, or a stretch whose matrix differs by 0.02),
    ``(B, 2, 4)``.  Stage 2's neighbourhoods of coarse winners 10 degrees apart overlap
    (``a + 5 = (a + 10) - 5``), and its two best were often one candidate twice."""
    first = scores.argmax(dim=1, keepdim=True)
    best = params.gather(1, first[..., None].expand(-1, -1, 4))
    turn = torch.remainder(params[..., 0] - best[..., 0] + math.pi, 2 * math.pi) - math.pi
    stretch = lambda p: _candidate_linear(p * torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=p.dtype, device=p.device))  # noqa: E731
    same = ((turn.abs() < math.radians(0.5)) & ((params[..., 1] - best[..., 1]).abs() < math.log(1.02))
            & ((stretch(params) - stretch(best)).abs().amax(dim=(-2, -1)) < 0.02))
    second = scores.masked_fill(same, -math.inf).argmax(dim=1, keepdim=True)  # all alike: the first again
    index = torch.cat([first, second], dim=1)
    return params.gather(1, index[..., None].expand(-1, -1, 4))


def _as_centre(center: CenterLike, batch: int, height: int, width: int, like: torch.Tensor, caller: str):
    if center is None:
        centre = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0], dtype=like.dtype, device=like.device)
    else:
        center = _real_center(center, caller)
        try:
            centre = torch.as_tensor(center, dtype=like.dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{caller}: 'center' must be (x, y) or a (B, 2) tensor; got {center!r}") from None
        if centre.shape not in ((2,), (1, 2), (batch, 2)) or not bool(torch.isfinite(centre).all()):
            raise ValueError(
                f"{caller}: 'center' must be finite with shape (2,) or ({batch}, 2); got shape {tuple(centre.shape)}"
            )
    return centre.reshape(-1, 2).expand(batch, 2)


@without_autocast
def initialize(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    transform: str,
    *,
    method: str = "auto",
    center: CenterLike = None,
    max_size: int = 128,
) -> torch.Tensor:
    """An initial fixed -> moving matrix for a registration with the given transform kind.

    The work is done on luminance copies area-downsampled by an integer
    factor ``s`` so that the larger side of either image is at most
    ``max_size``, except that ``s`` never leaves the smaller side of either
    image below ``min(16, max_size)`` pixels (:data:`MIN_WORKING_SIDE`; an
    image with fewer is not reduced): a wide strip keeps enough rows for
    its shift across them, and works on more than ``max_size`` pixels
    along its length; a downsampled pixel ``x_small`` covers full-resolution pixels
    ``s x_small .. s x_small + s - 1``, so ``x_full = S x_small`` with
    ``S = [[s, 0, (s-1)/2], [0, s, (s-1)/2], [0, 0, 1]]`` and the matrix found
    there is returned as ``A = S A_small S^-1``.  When the sizes differ, the
    moving copy is first resampled onto the fixed grid with the geometric
    centres aligned (``"center"``), and that shift is composed into ``A``.

    Methods:
        ``"identity"``: ``A = I``.
        ``"center"``: the geometric centres aligned, ``A = T(c_moving - c_fixed)``
        (the identity for images of one size).
        ``"moments"``: :func:`moments` (:func:`center_of_mass` for
        translation; the similarity form for anisotropic_similarity), trying
        both 180-degree orientations of the axes and keeping the one with the
        higher overlap NCC.
        ``"phase"``: the geometric centres aligned, then :func:`phase_correlation`
        (a translation for every kind).
        ``"fourier-mellin"``: :func:`fourier_mellin` gives ``(theta, s)`` modulo
        180 degrees; for ``theta`` and ``theta + pi`` the moving image is
        resampled by the similarity ``S0 = similarity(theta, s, 0, 0)`` about
        the fixed image's middle, phase correlation of the fixed image with it gives the
        remaining shift ``t'``, and of the two candidates ``A = S0 T(t')`` the
        one with the higher overlap NCC is kept (the 180-degree ambiguity is
        resolved here).
        ``"search"``: coarse to fine: every 10 degrees (and scales 0.8, 0.894, 1,
        1.118, 1.25 for similarity, anisotropic_similarity, affine), then +-5 and
        +-2.5 degrees (and ``1.25^(+-1/2)``) around the 4 best, then +-1.25
        degrees (and ``1.25^(+-1/4)``) around the best; each candidate
        de-rotated and phase-correlated as above, in batched warps and FFTs;
        the highest overlap NCC wins.  Where the working images' smaller
        side is at least 96 pixels (:data:`SEARCH_HALVED_MIN_SIDE`), the
        first two stages rank on the images halved, and the last refines
        their 2 best on the working images.  For ``"affine"``, pairs whose best
        still scores below :data:`SEARCH_STRETCH_BELOW` (0.9) are searched again with
        every candidate followed by a stretch (lengths times 1.2 along an
        axis at 0, 45, 90 or 135 degrees and divided by 1.2 across it,
        :data:`SEARCH_STRETCH`), refined where its first stage outscores the
        similarities by :data:`SEARCH_STRETCH_GAIN`, and kept where it scores
        :data:`AUTO_THRESHOLD` or more and above the similarity: an aspect
        change of 1.4 or more defeats similarity candidates.
        ``"auto"``: the candidates identity (centres aligned), the phase
        translation, Fourier–Mellin (both 180-degree options) and, for images
        of different sizes where one fits inside the other, the translation
        that places the smaller where it matches best in the larger
        (:func:`_template_offsets`, OpenCV's ``matchTemplate`` with
        ``TM_CCOEFF_NORMED``, at working resolution), and, for a kind with a
        scale and sizes that differ by :data:`EXTENT_RATIO` or more, Fourier–Mellin
        on the moving image zoomed to the fixed image's extent (one footprint at
        two resolutions: :func:`_extent_candidates`) are scored
        by overlap NCC; if the best scores below :data:`AUTO_THRESHOLD`
        (0.8) the search runs too (for those pairs only), and the best of all
        is returned.
        For ``"translation"``, ``"fourier-mellin"``, ``"search"`` and
        ``"auto"`` all reduce to phase correlation, kept only where it scores
        at least the identity's NCC (on a tie, the phase translation), and
        the template placement above.

    The score is the NCC over the overlap (:func:`overlap_ncc`, at least
    :data:`MIN_OVERLAP` of the fixed image) of the downsampled images blurred
    with a Gaussian of sigma = 1 (working) pixel, averaged with the same NCC of
    those images clipped to their robust range, median +- :data:`SCORE_CLIP`
    robust deviations (a bright cloud over one image outweighed the scene).  A phase-correlation shift is
    known only modulo the image, ``(dx + k W, dy + l H)``: the phase shifts and the
    candidates the search refines are scored in their four readings, ``dx`` or
    ``dx - W sign(dx)`` along ``x`` and the same along ``y`` (:func:`_wrap_readings`;
    a shift of more than half the image, with less than half of it overlapping);
    a reading other than the wrapped one counts only where it overlaps
    :data:`MIN_OVERLAP` of the whole fixed image and scores :data:`AUTO_THRESHOLD`
    or more (:func:`_best_readings`).
    ``"phase"`` returns the wrapped shift, ``|d| <= N/2``, as
    :func:`phase_correlation` does.  Pairs where either image is
    constant get the ``"center"`` matrix (the identity for equal sizes) from
    every method but ``"identity"`` (which gives the identity): nothing can be
    estimated, and this is not an error.

    The result respects the kind: a candidate is projected onto it keeping
    the image of ``center``: ``"translation"`` gives ``T(A c - c)``,
    ``"rigid"`` the rotation nearest to ``A``'s linear part (scale 1) about
    ``c`` with ``A c`` kept (the shift is found with the estimated scale,
    which a scale mismatch would otherwise mislead), ``"similarity"`` and
    ``"anisotropic_similarity"`` a similarity, ``"affine"`` a similarity
    (or, with ``"moments"``, the principal-axes affine).

    Args:
        fixed: ``(B, C, H, W)`` fixed image (``(H, W)``, ``(C, H, W)`` promoted).
        moving: ``(B, C, H', W')`` moving image (sizes may differ; a batch of 1
            broadcasts).
        transform: ``"translation"``, ``"rigid"``, ``"similarity"``,
            ``"anisotropic_similarity"`` or ``"affine"``.
        method: one of :data:`METHODS`.
        center: ``(x, y)`` or ``(B, 2)`` in full-resolution fixed-image pixels:
            the point whose image a rigid start keeps where it drops the scale
            of a similarity candidate (Fourier–Mellin's; default: the fixed
            image centre).  Candidates turn about the fixed image's middle
            whatever it says (turned about a corner, they left the grid), and
            the returned matrix has the same meaning whatever the centre (it
            is not a parameter vector); translation and search candidates do
            not depend on it.
        max_size: largest side of the working copies (an integer ``>= 8``; see
            above for a strip).

    Returns:
        ``(B, 3, 3)`` fixed -> moving pixel matrix, on ``fixed``'s device, in the
        dtype computed in (see the module's convention: float32 or float64).

    Raises:
        ValueError: unknown transform or method, bad ``max_size`` or ``center``,
            wrong dimensions, empty images, NaN/Inf.
    """
    return _scored_initialize(fixed, moving, transform, method=method, center=center, max_size=max_size,
                              caller="initialize()")[0]


def _scored_initialize(
    fixed: torch.Tensor, moving: torch.Tensor, transform: str, *, method: str = "auto", center: CenterLike = None,
    max_size: int = 128, caller: str = "initialize()", search: Optional[torch.Tensor] = None,
    negate_moving: bool = False, fixed_mask: Optional[torch.Tensor] = None, moving_mask: Optional[torch.Tensor] = None,
    start: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`initialize`, and each pair's score ``(B,)``: the overlap NCC of its start on the working
    images (the one ``auto`` compares with :data:`AUTO_THRESHOLD`), NaN where no candidate is scored
    (``identity``, ``center``, ``phase`` other than for translation, constant images).  ``search``
    ``(B,)`` bool: the pairs that ``auto`` may run its search for (default all).  ``negate_moving``:
    the same as for ``-moving`` (``register``'s start on the inverted image), the working copies
    negated, not the image (a copy of a batch's moving images was half its input again).
    ``fixed_mask``, ``moving_mask``: ``register``'s checked 0/1 masks ``(B or 1, 1, H, W)``, or
    ``None`` (:func:`_initialize`).  ``start``: for ``auto``, each pair's start ``(B, 3, 3)`` and score ``(B,)``
    from its quick candidates (an earlier call with no pair searching), which the search then improves
    on (``search``'s pairs) instead of finding them again."""
    _check_kind(transform, caller)
    check_option(method, METHODS, "method", caller)
    max_size = _check_max_size(max_size, caller)
    fixed, moving = _pair(fixed, moving, caller)
    batch, (height, width) = fixed.shape[0], fixed.shape[-2:]
    centre_full = _as_centre(center, batch, height, width, fixed, caller)
    factor = _downsample_factor([fixed.shape[-2:], moving.shape[-2:]], max_size)
    working = max((size[0] // factor) * (size[1] // factor) for size in (fixed.shape[-2:], moving.shape[-2:]))
    masks = [None if mask is None else mask.expand(batch, *mask.shape[1:]) for mask in (fixed_mask, moving_mask)]
    with torch.no_grad():
        found = []
        for part in chunk_slices(batch, working, _pair_chunk_budget(batch, working)):
            given = None if start is None else tuple(part_of[part].to(fixed.dtype) for part_of in start)
            if given is not None and search is not None and not bool(search[part].any()):
                found.append(given)  # nothing to improve on in this chunk: its working images not made
                continue
            found.append(_initialize(fixed[part], moving[part], transform, method, centre_full[part], max_size,
                                     None if search is None else search[part], negate_moving,
                                     *(None if mask is None else mask[part] for mask in masks), start=given))
    return tuple(torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*found))


def _working_image(image: torch.Tensor, mask: Optional[torch.Tensor], factor: int
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The working copy ``(B, 1, h, w)`` of a full-resolution ``image`` (:func:`downsample`), and its
    0/1 mask there (``None`` without ``mask``).

    With a 0/1 ``mask``: a working pixel is inside where enough of its block is
    (:data:`tireg.sampling.MASK_BLOCK_INSIDE`, as ``register``'s coarse levels count them), its
    value the average of the block's pixels inside, and the pixels outside are the
    mean inside: flat, so that phase correlation and Fourier-Mellin, which take the whole
    mean-free image, see only the masked content; the scores leave them out
    (:func:`_scoring_image`)."""
    if mask is None:
        return downsample(image, factor), None
    inside = downsample(mask, factor) >= MASK_BLOCK_INSIDE
    small = _coarse_image(image, mask, factor, 0.0)  # the block means inside, as register's coarse levels
    inside_count = inside.sum((-1, -2), keepdim=True).clamp_min(1)
    mean = torch.where(inside, small, 0.0).sum((-1, -2), keepdim=True) / inside_count
    return torch.where(inside, small, mean), inside.to(small.dtype)


#: The most pixels the larger image may have at the template's own working resolution
#: (:func:`_template_candidate`), so that its float64 FFTs stay a small part of a registration's
#: memory (2^18: 512^2, a few MB a pair; a 64^2 template in a 2048^2 image, matched at 1024^2, would
#: have held about 50 MB, three times that image): with the template kept at TEMPLATE_MIN_SIDE
#: pixels (a fractional step where needed), the larger image holds at most (16 x its side)^2.
TEMPLATE_MAX_PIXELS = 2**18


#: The zooms at which the smaller image is matched in the larger one for a kind with a scale
#: (:func:`_template_candidate`), the search's five (:data:`SEARCH_SCALES`,
#: :data:`SEARCH_SCALES_BETWEEN`): a 64^2 template zoomed 1.3x, matched at its own size only, gave
#: a wrong placement that outscored the right candidates at the working resolution.
TEMPLATE_SCALES = tuple(sorted(SEARCH_SCALES + SEARCH_SCALES_BETWEEN))
#: How much more NCC the best other zoom must score than the template at its own size to replace it: small
#: noisy templates (32-96 px in 256-2048 px images, noise 10 % of the range) match best at a wrong
#: place and zoom: with no margin 10 of 80 such pairs started 20-800 px off, at 0.05 6, at 0.1 4-5 (at
#: their own size alone 4); 0.2 lost the zoomed template again.
TEMPLATE_ZOOM_MARGIN = 0.1


def _template_candidate(small_f: torch.Tensor, small_m: torch.Tensor, kind: str, factor: int,
                        finer: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """For images of different sizes where one holds the other (``h <= H`` and ``w <= W``), the
    transform that places the smaller where it matches best in the larger (:func:`_template_offsets`)
    as a candidate ``(B, 1, 4, 3, 3)`` in working pixels (its four readings the same: it is no phase
    shift); ``None`` otherwise.  For a ``kind`` with a scale (similarity, affine), the smaller is also
    matched zoomed by each of :data:`TEMPLATE_SCALES`: the zoom and placement of the highest NCC
    replace those of its own size where they score :data:`TEMPLATE_ZOOM_MARGIN` more; else a
    translation.

    The match is made where the smaller keeps :data:`TEMPLATE_MIN_SIDE` pixels a side at its smallest
    zoom: on the working images ``small_f``, ``small_m`` (downsampled by ``factor``) where they keep
    that many, else on the images downsampled by the largest factor ``t`` that does (at least 1:
    ``finer(t)``, the fixed and the moving image there, as the working ones are made; at full
    resolution a zoom that leaves fewer is skipped).  Where the larger would have over
    :data:`TEMPLATE_MAX_PIXELS` there, both are downsampled by the fractional step that brings it
    to the cap (:func:`_fractional_step`); none where the smaller then keeps fewer than
    :data:`TEMPLATE_MIN_SIDE` (a larger image beyond ``(16 x the smaller's side)^2`` pixels), or
    has fewer at full resolution.  Why: the working images keep
    about 128 pixels on the larger side, and a 48^2 crop of a 256^2 image, or a 128^2 tile of a
    1024^2 overview, had under 32 there: every such pair started 86-720 px off (OpenCV's
    matchTemplate, at full resolution, places them)."""
    (height, width), (height_m, width_m) = small_f.shape[-2:], small_m.shape[-2:]
    if (height, width) == (height_m, width_m):
        return None
    if height <= height_m and width <= width_m:  # the fixed image inside the moving one
        fixed_inside = True
    elif height_m <= height and width_m <= width:  # the moving image inside the fixed one
        fixed_inside = False
    else:
        return None
    zooms = TEMPLATE_SCALES if kind in _SCALED_KINDS else (1.0,)
    needed = math.ceil(TEMPLATE_MIN_SIDE / min(zooms))  # so that its smallest zoom keeps TEMPLATE_MIN_SIDE
    step = factor
    sides = (height, width) if fixed_inside else (height_m, width_m)
    if min(sides) < needed:
        smaller = min(sides) * factor  # the working images' sides are the full ones // factor
        step = max(1, smaller // needed)  # below factor
        larger = (height_m * width_m if fixed_inside else height * width) * factor**2  # at full resolution
        if smaller < TEMPLATE_MIN_SIDE:
            return None
        if larger > TEMPLATE_MAX_PIXELS * step**2:
            # the larger image over the cap at the whole step: the step that brings it to the cap, a
            # fraction above the whole one (a 63 px template took step 1, and its image was refused
            # beyond 512^2: 8x its side, not 16x), where the template keeps TEMPLATE_MIN_SIDE there
            step = math.sqrt(larger / TEMPLATE_MAX_PIXELS)
            if smaller < TEMPLATE_MIN_SIDE * step:
                return None
        small_f, small_m = _fractional_step(finer, step)
    template, image = (small_f, small_m) if fixed_inside else (small_m, small_f)
    size = template.shape[-2:]
    if size[0] > image.shape[-2] or size[1] > image.shape[-1]:  # not inside at this level (a side one pixel
        return None  # longer than the other image's, equal at the working level)
    placements = []  # per zoom that fits: NCC (B,), and per pair and axis x -> scale x + shift in the image
    for zoom in sorted(zooms, key=lambda value: value != 1.0):  # its own size first
        zoomed = (round(size[0] * zoom), round(size[1] * zoom))
        if min(zoomed) < TEMPLATE_MIN_SIDE or zoomed[0] > image.shape[-2] or zoomed[1] > image.shape[-1]:
            continue
        resized = template if zoomed == tuple(size) else F.interpolate(
            template, size=zoomed, mode="bilinear", align_corners=False, antialias=zoom < 1)
        offsets, score = _template_offsets(resized, image)
        # the zoomed template's pixel j shows the template at (j + 1/2) / r - 1/2 (r its zoom per axis)
        # and lies at offset + j in the larger image: x -> r x + offset + (r - 1) / 2
        ratios = torch.tensor([zoomed[1] / size[1], zoomed[0] / size[0]], dtype=offsets.dtype,
                              device=offsets.device).expand_as(offsets)
        placements.append((score, ratios, offsets + (ratios - 1) / 2))
    own_score, scale, shift = placements[0]  # (at step 1 a template of 32-39 px has no zoom below 1)
    if len(placements) > 1:  # the best other zoom, where it scores TEMPLATE_ZOOM_MARGIN more than its own size
        scores = torch.stack([score for score, _, _ in placements[1:]])
        best = scores.argmax(dim=0)[None, :, None].expand(1, -1, 2)
        other_scale = torch.stack([ratios for _, ratios, _ in placements[1:]]).gather(0, best)[0]
        other_shift = torch.stack([placed for _, _, placed in placements[1:]]).gather(0, best)[0]
        better = (scores.amax(dim=0) > own_score + TEMPLATE_ZOOM_MARGIN)[:, None]
        scale, shift = torch.where(better, other_scale, scale), torch.where(better, other_shift, shift)
    if not fixed_inside:  # fixed -> moving is the inverse map: x -> (x - shift) / scale
        scale, shift = 1 / scale, -shift / scale
    if step != factor:  # level pixels of `step` -> working pixels of `factor`: x -> c x + d (shrink_matrix)
        c, d = step / factor, (step - factor) / (2 * factor)
        shift = c * shift + d * (1 - scale)
    matrix = torch.diag_embed(torch.cat([scale, torch.ones_like(scale[:, :1])], dim=1))
    matrix[:, :2, 2] = shift
    return matrix.to(small_f.dtype)[:, None, None].expand(-1, 1, 4, 3, 3)


def _fractional_step(finer: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                     step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed and the moving image downsampled by ``step``, which may be fractional: ``finer`` at
    its whole part ``k``, then both resampled by ``r = step / k`` (antialiased bilinear, one ratio for
    both), so that ``x_full = step x + (step - 1) / 2`` as at a whole step: ``x_k = r x + (r - 1) / 2``
    composed with ``x_full = k x_k + (k - 1) / 2``."""
    whole = max(1, math.floor(step))
    images = finer(whole)
    ratio = step / whole
    if ratio == 1.0:
        return images
    return tuple(F.interpolate(image, scale_factor=1.0 / ratio, mode="bilinear", align_corners=False,
                               antialias=True, recompute_scale_factor=False) for image in images)


def _scoring_image(small: torch.Tensor, inside: Optional[torch.Tensor]) -> torch.Tensor:
    """What scores the candidates (:func:`_ncc_scores`), ``(B, 2 or 3, h, w)``: the working image
    blurred with sigma 1, the same clipped to its robust range (:func:`_clipped`), and its mask as
    a third channel, where one is given.  A candidate's score is the mean of the two images' NCC."""
    blurred = gaussian_blur(small, 1.0, padding_mode="reflection")
    return torch.cat([blurred, _clipped(blurred, inside)] + ([] if inside is None else [inside]), dim=1)


def _clipped(image: torch.Tensor, inside: Optional[torch.Tensor]) -> torch.Tensor:
    """``image`` ``(B, 1, h, w)`` clipped to ``median +- SCORE_CLIP * 1.4826 MAD`` of its values (inside
    its 0/1 mask, where given), each pair's own; an image whose MAD is 0 (more than half its
    pixels of one value: a binary image, a dark background) as it is.

    Why: a bright occluder in one image only (a fifth of a satellite scene under cloud, at twice
    the scene's range) outweighed the scene in the NCC of every candidate, and the wrong one won:
    ``register`` on 32 such affine and similarity pairs (``mi``) started 14 right without the
    clipped channel.  Clipped, it is a plateau no brighter than much of the scene.  Alone the
    clipped score lost a start the plain one found (1 of 99 scenes: a rocket against a flat sky,
    2 -> 54 px); their mean solved 21 of the 32 cloudy pairs, changed no result of the standard
    suite nor of sparse fluorescent beads, where clipping the candidates' images too (not only
    their scores) had lost 2 of 20, and flipped 5 of the contrast suite's 768 registrations, all
    of nearly uncorrelated stains, both ways (645 -> 644 within 0.5 px; ``docs/design.md``).
    1.5 deviations: 1, 1.5 and 2 clipped alike."""
    flat = image.flatten(1)  # (B, h w)
    if inside is not None:
        flat = torch.where(inside.flatten(1) > 0, flat, math.nan)
    median = flat.nanmedian(dim=1, keepdim=True).values
    spread = (flat - median).abs().nanmedian(dim=1, keepdim=True).values * (1.4826 * SCORE_CLIP)
    low, high = (median - spread)[..., None, None], (median + spread)[..., None, None]
    clipped = torch.minimum(torch.maximum(image, low), high)
    return torch.where(spread[..., None, None] > 0, clipped, image)


def _shrunk_scoring(image: torch.Tensor, factor: int) -> torch.Tensor:
    """A :func:`_scoring_image` downsampled by ``factor`` (:func:`downsample`), its mask channel,
    where it has one, 0/1 again (:data:`tireg.sampling.MASK_BLOCK_INSIDE`)."""
    shrunk = downsample(image, factor)
    if image.shape[1] > SCORE_IMAGES:
        shrunk[:, SCORE_IMAGES] = (shrunk[:, SCORE_IMAGES] >= MASK_BLOCK_INSIDE).to(shrunk.dtype)
    return shrunk


def _pair_chunk_budget(batch: int, working: int) -> int:
    """Working pixels a chunk of ``batch`` pairs of ``working`` working pixels each may hold:
    :data:`PAIR_CHUNK_PIXELS`, or the batch's over :data:`PAIR_CHUNKS` where that is less (one
    pair at least)."""
    return min(PAIR_CHUNK_PIXELS, max(working, batch * working // PAIR_CHUNKS))


def _check_max_size(max_size, caller: str) -> int:
    """``max_size`` as an ``int`` if it is an integer (a NumPy integer too, not a bool nor a float) ``>= 8``."""
    try:
        value = None if isinstance(max_size, bool) else operator.index(max_size)
    except TypeError:
        value = None
    if value is None or value < 8:
        raise ValueError(f"{caller}: 'max_size' must be an integer >= 8; got {max_size!r}")
    return value


def _initialize(
    fixed: torch.Tensor, moving: torch.Tensor, kind: str, method: str, centre_full: torch.Tensor, max_size: int,
    search: Optional[torch.Tensor] = None, negate_moving: bool = False, fixed_mask: Optional[torch.Tensor] = None,
    moving_mask: Optional[torch.Tensor] = None, *, start: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`initialize` on checked luminance images ``(B, 1, H, W)``, ``(B, 1, H', W')``, and the
    overlap NCC ``(B,)`` of each pair's start (:func:`_scored_initialize`); ``search`` ``(B,)`` bool:
    the pairs ``auto`` may run its search for (all if ``None``); ``negate_moving``: as for ``-moving``,
    bit for bit (box downsampling and blurs are odd functions; only ``moments`` negates the image);
    ``start``: as for :func:`_scored_initialize`.

    Masks (0/1, ``(B, 1, H, W)`` and ``(B, 1, H', W')``, or ``None``): what lies outside one is
    left out (:func:`_working_image`).  ``register`` with a mask over no-data (zeros beyond a
    field of view) had started every metric 116-169 px off from ``"auto"``: the candidates matched
    the mask's edge, and the identity had scored on the no-data."""
    batch = fixed.shape[0]
    dtype, device = fixed.dtype, fixed.device
    (height, width), (height_m, width_m) = fixed.shape[-2:], moving.shape[-2:]
    shift_centres = torch.tensor([(width_m - width) / 2.0, (height_m - height) / 2.0], dtype=dtype, device=device)
    centred = translation_matrix(shift_centres.expand(batch, 2))  # "center": geometric centres aligned
    unscored = torch.full((batch,), math.nan, dtype=dtype, device=device)
    if method == "identity":
        return torch.eye(3, dtype=dtype, device=device).expand(batch, 3, 3).clone(), unscored
    if method == "center":
        return centred, unscored

    factor = _downsample_factor([fixed.shape[-2:], moving.shape[-2:]], max_size)
    scale_up = shrink_matrix(factor, dtype=fixed.dtype, device=fixed.device)
    scale_down = torch.linalg.inv(scale_up)
    small_f, small_fixed_mask = _working_image(fixed, fixed_mask, factor)
    small_m, small_moving_mask = _working_image(moving, moving_mask, factor)
    if negate_moving:
        small_m = -small_m  # a working copy; downsample(-m) is -downsample(m), bit for bit
    score_f = _scoring_image(small_f, small_fixed_mask)
    score_m = _scoring_image(small_m, small_moving_mask)
    centre = _shrunk_points(centre_full, factor)  # working pixels: where the kind's projection keeps the image
    # the candidates turn about the fixed image's centre, whatever `center`: turned about a corner by
    # 90 degrees or more, the canvas left the grid and no shift was found (80-300 px off)
    turn_centre = _shrunk_points(_as_centre(None, batch, height, width, fixed, "initialize()"), factor)
    score = lambda options: _ncc_scores(score_f, score_m, options, MIN_OVERLAP)  # noqa: E731
    base = scale_down @ centred @ scale_up

    if method == "moments":
        first = scale_down @ _moments(fixed, -moving if negate_moving else moving, kind, fixed_mask,
                                      moving_mask) @ scale_up
        # the 180-degree alternative: L -> -L about the fixed centroid (A c_f = c_m is kept)
        centroid = _shrunk_points(_centroid_and_covariance(fixed, fixed_mask)[0], factor)
        flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=dtype, device=device))
        second = first @ translation_matrix(centroid) @ flip @ translation_matrix(-centroid)
        options = torch.stack([first, second], dim=1) if kind != "translation" else first[:, None]
        result, best_score = _best(options, score(options))
    else:
        # the moving image on the fixed grid, centres aligned, mean-free so that the zero padding is neutral
        if small_f.shape[-2:] == small_m.shape[-2:] and not bool(shift_centres.any()):
            canvas = _centred(small_m)
        else:
            canvas = _warp(_centred(small_m), base, small_f.shape[-2:])
        fixed_spectra = _spectra(small_f)  # windowed, shared by every candidate's phase correlation
        images = _SearchImages(small_f, fixed_spectra, canvas, base, turn_centre, score_f, score_m)
        reuse = start is not None and method == "auto" and kind != "translation"  # the quick candidates given
        phase_shift = None if reuse else _shifts(fixed_spectra, canvas)
        # and without the window: a large shift (30-60 % overlap) puts the overlap at the images' edges,
        # which the window suppresses (17 of 80 such pairs failed with the window alone, none without)
        unwindowed = lambda: _phase_shift(small_f, canvas, window=False)  # noqa: E731

        def readings(*shifts):  # the translations base T(t), each in its wrap-around readings (B, K, 4, 3, 3)
            shifts = torch.stack(shifts, dim=1)  # (B, K, 2)
            return _wrap_readings(base[:, None] @ translation_matrix(shifts), shifts, small_f.shape[-2:])

        scored = lambda options: _best(*_best_readings(options, score_f, score_m))  # noqa: E731

        def finer(step):  # the images as the working ones, downsampled by `step` only
            finer_f, finer_m = _working_image(fixed, fixed_mask, step)[0], _working_image(moving, moving_mask, step)[0]
            return finer_f, -finer_m if negate_moving else finer_m

        def with_template(options):  # and, for images of different sizes, where the smaller lies in the larger
            template = _template_candidate(small_f, small_m, kind, factor, finer)
            return options if template is None else torch.cat([options, template], dim=1)

        if method == "phase":
            result, best_score = base @ translation_matrix(phase_shift), unscored
        elif kind == "translation":
            # no angle to find: "fourier-mellin", "search" and "auto" are phase correlation (its wrap-around
            # readings too), checked against the identity (centres aligned); the phase first, kept on a tie;
            # and, for images of different sizes, where the smaller lies in the larger
            result, best_score = scored(with_template(readings(phase_shift, unwindowed(), torch.zeros_like(phase_shift))))
        elif method == "search":
            result, best_score = _search(images, kind)
        else:
            # Fourier–Mellin, both 180-degree options, batched.  For rigid, the shift is found with the
            # estimated scale (a scale mismatch misleads phase correlation), then the scale is dropped
            # keeping the centre's image in place.
            if reuse:  # the quick candidates' best, found before
                result = scale_down @ start[0].to(dtype=dtype, device=device) @ scale_up
                best_score = start[1].to(dtype=dtype, device=device)
            else:
                angle, scale = _fourier_mellin(small_f, canvas)
                params = _similarity_params(torch.stack([angle, angle + math.pi], dim=1),
                                            torch.stack([scale, scale], dim=1))
                options = _wrap_readings(*_candidates(fixed_spectra, canvas, base, params, turn_centre, upsample=10),
                                         small_f.shape[-2:])  # (B, 2, 4, 3, 3)
                options = _project(options.flatten(0, 2), kind, centre.repeat_interleave(8, dim=0))
                options = options.view(batch, 2, 4, 3, 3)
                if method == "auto":
                    options = with_template(torch.cat([readings(torch.zeros_like(phase_shift), phase_shift,
                                                                unwindowed()), options], dim=1))
                    extent = _extent_candidates(small_f, small_m, base, fixed_spectra, turn_centre, kind, centre)
                    options = options if extent is None else torch.cat([options, extent], dim=1)
                result, best_score = scored(options)
            weak = best_score < AUTO_THRESHOLD
            if search is not None:
                weak &= search
            if method == "auto" and bool(weak.any()):
                index = weak.nonzero()[:, 0]
                found, found_score = _search(images.pairs(index), kind)
                result, best_score = _improved(result, best_score, index, found, found_score)
    result = scale_up @ _project(result, kind, centre) @ scale_down
    constant = _is_constant(fixed) | _is_constant(moving)
    return torch.where(constant[:, None, None], centred, result), torch.where(constant, math.nan, best_score)
