"""``register(fixed, moving)``: the transform that aligns two images, in one call.

A registration is a composition (as in ITK): a **transform** kind
(:data:`tireg.transforms.TRANSFORMS`), a **metric** (a per-pixel loss on
intensity-normalised images, or NCC / mutual information from
:mod:`tireg.metrics`), an **optimiser** (Gauss-Newton / Levenberg-Marquardt
on the analytic Jacobian for per-pixel losses and NCC, L-BFGS for the other
metrics (batched: every pair its own history and line search), or Adam or
SGD from ``torch.optim``), an
**interpolator** (bilinear or bicubic) and a **pyramid** (coarse to fine),
started from an **initialisation** (:mod:`tireg.initialize`).

The state of the search is one parameter vector per image pair in natural,
full-resolution units (angle in radians, scale, translation in pixels) about
the fixed image's centre.  A pyramid level only changes the pixel grid: the
level's matrix is ``S^-1 A(p) S`` and its Jacobian ``S^-1 dA/dp S``
(:func:`tireg.sampling.shrink_matrix`), so nothing is converted between
levels.

Gauss-Newton / Levenberg-Marquardt.  With residuals ``r = M(A x) - F(x)``
over the valid pixels (inside the fixed mask, sampling inside the moving
image and its mask), per-pixel Jacobian rows ``j(x) = grad M(A x)^T dA/dp x~``
and IRLS weights ``w = rho'(r) / r`` (2 for L2)::

    g = sum rho'(r) j / n,    H = sum w j j^T / n,    (H + lambda diag H) dp = -g

The sums are taken once in matrix space (a 2x3 gradient and a 6x6 normal
matrix from image moments, :func:`tireg.sampling.grid_moments`) and mapped to
the parameters by the transform's Jacobian.  A step is kept if it lowers the
cost (then ``lambda`` shrinks), else ``lambda`` grows; every pair of a batch
has its own ``lambda`` and stops on its own.  NCC takes ECC's step in the same
loop (:meth:`tireg.metrics.NCC.ecc_gradient`; docs/design.md, "NCC's step").
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import _chunks, fused
from ._device import autocast_off, constant
from ._validation import (
    GRADIENT_INTERPOLATIONS,
    INTERPOLATIONS,
    PADDING_MODES,
    ImageLike,
    all_finite,
    as_device,
    as_image,
    check_affine,
    check_compile_option,
    check_dense,
    check_option,
    check_size,
    is_sequence,
    is_whole,
    is_wide_integer,
    of_pairs,
    pair_names,
    real_number,
    tensor_of_array,
    user_stacklevel,
    wide_pairs,
    writable,
)
from .losses import CauchyLoss, GemanMcClureLoss, PerPixelLoss, constant_irls_weight
from .metrics import (
    ECCSystem,
    LocalNCC,
    Metric,
    MutualInformation,
    NCC,
    NCCStatistics,
    NormalizedMutualInformation,
    PerPixelMetric,
    _independent_pairs,
    _mean_count,
    _own_cost,
    _pixel_parts,
    _set_masked_ranges,
    _sums_of_parts,
    get_metric,
)
from .sampling import (
    _derivative_kernels,
    MASK_BLOCK_INSIDE,
    _coarse_image,
    _grid_moments,
    _normalized_blur,
    _sampler_gradient,
    checked_warp,
    downsample,
    gaussian_blur,
    gaussian_blur_in_place,
    pixel_axes,
    sample,
    sample_with_gradient,
    sampling_grid,
    shared_pixel_scale,
    _shrink_values,
)
from .transforms import Transform, _determinant, get_transform, image_center

__all__ = ["register", "RegistrationResult", "LevelHistory", "IterationState", "Pyramid", "STOP_REASONS"]


#: Why a pair stopped: ``stop_reason`` takes one of these keys.
STOP_REASONS = {
    "converged": "the largest displacement of a step fell below the tolerance at the finest level (Levenberg-"
                 "Marquardt: its nearly undamped step too, below STALL_FACTOR tolerances or STALL_FLOOR px; "
                 "Adam and SGD: three steps running, each below FIRST_ORDER_STEP_FRACTION of the level's "
                 "largest too)",
    "max_iterations": "the iteration limit of the finest level was reached",
    "stalled": "no step lowered the cost any more (Levenberg-Marquardt damping at its limit, or rejected steps "
               "shrank the step below the tolerance while the undamped step was still large; Adam and SGD: a "
               "step began where the cost is not finite, off the images' overlap, where no gradient leads back, "
               "or left the finite numbers: the level keeps the best point it saw)",
    "callback": "the callback raised StopIteration while the pair was running (a pair that had stopped at the "
                "last level keeps its own reason)",
    "degenerate": "the found transform is no alignment, whatever the optimiser's own test said: its linear "
                  "part mirrors where the start's did not (or the reverse), its singular values' ratio "
                  "(smaller / larger) fell below DEGENERATE_ANISOTROPY (1/20) of the start's, or the images "
                  "overlap on fewer than DEGENERATE_OVERLAP_PIXELS (64, an 8 x 8 patch; a sixteenth of the "
                  "smaller image inside its mask where that is less) pixels, counted in the pixels of either "
                  "image (the matrix found is kept)",
    "no_overlap": "the images do not overlap (too few valid pixels) at the found transform",
    "not_finite": "the cost is NaN at the found transform, or infinite where the images overlap: "
                  "intensities whose squares or sums leave float32's range (keep normalize=True, or scale "
                  "the images)",
}

OPTIMIZERS = ("auto", "gauss-newton", "adam", "lbfgs", "sgd")

#: Fewer valid (overlapping) pixels than this at a level count as no overlap.
MIN_VALID_PIXELS = 16

#: A bilinearly resampled 0/1 mask above this is 1 (all four taps inside the mask) up to rounding:
#: the weights of a bilinear sample sum to 1 within a few ulp.
_MASK_FULL = 1.0 - 1e-4

#: ``register(compile="auto")`` compiles when one call registers at least this many fixed
#: pixels (batch x height x width): 64 pairs of 1024 x 1024, 1024 of 256 x 256.  Measured on
#: the CPU (one thread): the compiled kernel saves about 0.14 s per 1024 x 1024 pair while the
#: first compile in a process costs 2-7 s with inductor's cache warm and up to 15 s cold, so
#: below this a call would not win back its compile.  A batch of two pairs or more only: one
#: large pair runs in bands of rows, where the compiled kernel does not win even once compiled
#: (one 4096 x 4096 pair: 3.7 s eager, 4.1 s compiled and 19 s with its compile; one 8192 x 8192
#: pair, over this size: 29 s eager, 60 s compiled, 129 s with its compile; 16 pairs of 1024 x 1024:
#: 4.6-5.2 s eager, 3.1 s compiled).
AUTO_COMPILE_PIXELS = 1 << 26


def _use_compiled(compile: Union[bool, str], fixed: torch.Tensor, caller: str) -> bool:
    """Resolve ``compile`` (``True``, ``False`` or ``"auto"``) for a ``(B, C, H, W)`` fixed batch."""
    if check_compile_option(compile, caller) == "auto":
        batch, _, height, width = fixed.shape
        return batch > 1 and batch * height * width >= AUTO_COMPILE_PIXELS
    return compile


#: Levenberg-Marquardt's step falls below the tolerance also where rejected steps raised the
#: damping: a pair whose undamped step would still move a corner by this many tolerances, and by
#: :data:`STALL_FLOOR` pixels or more, is "stalled" there, not "converged".  Near an optimum the
#: undamped step is about the distance to it, so this errs towards "converged".
STALL_FACTOR = 10.0

#: ... and at least this many pixels (times the level's factor): on small images the cost is not
#: smooth at the last hundredths of a pixel (pixels enter and leave the valid set), and ordinary
#: pairs 0.02-0.07 px from the truth had undamped steps of 0.1 px (a 64 x 128 crop: 3 of 160).
STALL_FLOOR = 0.25


#: NCC's ECC step goes at most this many pixels of its level at first (the largest corner
#: displacement; every trial step, damped or not, scaled down to it; not the stall test's free
#: step, whose limit on a coarse level is this same pixel), twice as far after each capped step
#: that did not raise the cost, and this far again after a rejected one: the linearised image it
#: maximises the correlation of holds within about a pixel of the level, while the step's scale
#: (``lambda``) grows as the correlation falls.  Uncapped, a brick texture 5.7 px off at a coarse
#: level jumped about 30 of its pixels to another brick (118 px at full resolution; 0.01 px capped).
#: Each L-BFGS iteration's first trial is bounded alike (:class:`_BatchedLBFGS`'s ``reach``).
ECC_RADIUS = 1.0


#: Adam's and SGD's step counts as small only below this fraction of the largest step the pair took
#: at the level, as well as below the tolerance: a step is short near a minimum, or because the
#: learning rate allows no more.  Adam's first step moves each parameter by about ``lr`` (one unit of
#: the scaled parameters ~ one level pixel), so with ``lr=1e-3`` every step was under the tolerance
#: (0.005 px) and each level stopped "converged" after three steps, 1-5 px from the truth; SGD's step
#: is ``lr`` times a gradient of any scale.  Near a minimum both shrink against their start (Adam's
#: ``m / sqrt(v)`` falls with the gradient, SGD's step with it); a learning rate too small to get
#: there runs to ``max_iterations`` and says so.  accuracy.py's 16 cases of seed 1 (4 a kind): Adam's
#: defaults the same errors in 12 % more iterations; SGD's from 4 pairs at 0.2-8.6 px
#: ("max_iterations": its coarse levels had "converged" creeping) to all within 0.11 px.  0.1 cost
#: Adam 60 % more iterations; at 0.5, ``lr=1e-3`` still read "converged" 0.3 px off.
FIRST_ORDER_STEP_FRACTION = 0.25

#: Convergence tolerance of a coarse level (``factor > 1``) in its own pixels, at
#: least: it need only hand the next level a start well inside its capture range,
#: and iterating it to the final tolerance cost half the Gauss-Newton steps with
#: no change in the result (accuracy.py: same errors on every case, with 0.05,
#: 0.1 and 0.25; the finest level keeps ``tolerance``).
COARSE_TOLERANCE = 0.1


#: Default smoothing (Gaussian sigma, pixels) of the full-resolution level, both images, for a
#: metric that takes the intensities as linearly related (``Metric.linear_intensity``).
#: Bilinear resampling averages the moving image's noise, least at whole-pixel positions
#: and most at half pixels, so the unsmoothed cost is lowest near half-pixel offsets:
#: exact sub-pixel shifts (noise 5 % of the range) ended 0.08-0.13 px off, smoothed
#: 0.01-0.05 px.  accuracy.py's standard suite: medians 0.052 / 0.028 / 0.025 / 0.029 ->
#: 0.012 / 0.008 / 0.012 / 0.011 px, no case worse by 0.01 px; ncc alike (0.03 -> 0.01).
#: 0.7 px left twice the error, 1.5 px no less.  Not for mi and nmi: smoothing does not
#: commute with a non-linear intensity relation, and on gamma-changed and other-channel
#: pairs mi's medians grew 1.4x and 2.2x (docs/design.md, "Smoothing at full
#: resolution"); they take :data:`FINEST_SMOOTHING_MI`.  OpenCV's ECC smooths both images
#: by default too.
FINEST_SMOOTHING = 1.0

#: The full-resolution sigma (pixels) for mutual information and NMI (``MutualInformation``,
#: ``NormalizedMutualInformation``).  Unsmoothed, a sharp-edged photo shifted (0.3, 0.2) px
#: without noise ended 0.22 px off (l2 0.03, SimpleITK's Mattes MI 0.02); 0.12 now.  accuracy.py
#: (``--suite all --methods tireg-mi tireg-nmi``), 0 -> 0.5 px: successes mi 304 -> 304, nmi
#: 303 -> 304 of 320; medians standard 0.031 -> 0.022 px, inverted 0.027 -> 0.019, gamma
#: 0.029 / 0.027 -> 0.025 / 0.022, other channel 0.107 -> 0.142 (worse: smoothing does not
#: commute with that relation).  1 px, as the other metrics: standard 0.012, inverted 0.009,
#: but gamma 0.040 / 0.037, other channel 0.237 and 4 successes fewer there.
FINEST_SMOOTHING_MI = 0.5

#: Noise-adapted full-resolution smoothing (when the pyramid gives neither ``smoothing_sigmas`` nor
#: ``finest_smoothing``): the moving image's noise, resampled, pulls the cost towards half pixels by
#: about ``noise variance x B(sigma)`` (:func:`_half_pixel_noise_drop`: how much less variance its
#: smoothed noise has at (0.5, 0.5) than at a whole pixel), against the cost's curvature, the signal's
#: gradient energy.  That pull acts on every pixel's own sub-pixel phase: a translation gives every
#: pixel one phase and keeps all of it, a rotation of a few degrees spreads the phases over whole
#: pixels and averages it away (:func:`_phase_coherence`, at the start of the full-resolution level),
#: while smoothing still costs the detail that a rotation, a scale or a shear is measured by.  Per
#: pair, the ratio of the two at 1 px (:func:`_noise_to_structure`, the larger of the two images'),
#: times the share of the pull the transform keeps (:data:`PHASE_INCOHERENT_SHARE` + the rest times
#: the coherence), scaled by ``B(sigma) / B(1)``, is to be at most this: the finest sigma is the
#: default unless it is above, else the smallest multiple of :data:`NOISE_SMOOTHING_STEP` that brings
#: it there, at most :data:`NOISE_SMOOTHING_MAX`.  Calibrated with benchmarks/noise_smoothing.py
#: (seven scenes, Gaussian noise of 2-20 % of the range and Poisson noise, 10 pairs each, translation,
#: drift, rigid and affine; docs/design.md, "Noise-adapted smoothing at full resolution"): a
#: translation or a drift wants 1.5-2.5 px from a ratio of about 0.02 (0.05 had kept 1-1.25 px there,
#: twice the error), a rotated or affine pair 1 px up to a ratio of about 0.1, more only on very noisy
#: images (cell at 5 % noise, moon at 10 %).
NOISE_BIAS_LIMIT = 0.0125

#: The share of a pair's noise pull (:data:`NOISE_BIAS_LIMIT`) that counts where its transform spreads
#: the moving samples' sub-pixel phases evenly (:func:`_phase_coherence` 0: a rotation of a few
#: degrees); a translation keeps all of it.  Above 0: resampled noise also adds noise to the moving
#: image's gradient, which smoothing takes out whatever the phases (rotated cell at 5 % noise and more
#: wanted 2-3 px).
PHASE_INCOHERENT_SHARE = 0.125

#: The largest noise-adapted finest sigma (pixels), and its step: pairs of one batch with nearly one
#: noise level share a smoothing call.  Beyond 3 px the errors of noisy pairs did not fall further.
NOISE_SMOOTHING_MAX = 3.0
NOISE_SMOOTHING_STEP = 0.25


#: The smallest side of a pyramid level, in its pixels: a schedule whose coarsest level would have
#: fewer is refused, and the automatic one (:attr:`Pyramid.min_size`) stops above it.
_LEAST_LEVEL_SIDE = 4


@dataclass(frozen=True)
class Pyramid:
    """Multi-resolution schedule, coarse to fine.

    Attributes:
        shrink_factors: integer downsampling factor per level, e.g. ``(4, 2, 1)``;
            ``None``: halve until the smaller side would drop below ``min_size``.
        smoothing_sigmas: per level, the total Gaussian smoothing in
            full-resolution pixels, the block average's own included: a level
            is the ``factor x factor`` block average (variance
            ``(factor^2 - 1) / 12``), blurred by the rest,
            ``sqrt(sigma^2 - (factor^2 - 1) / 12) / factor`` level pixels
            (none where the average already has ``sigma``); ``None``:
            ``factor / 2``, and at factor 1 ``finest_smoothing``.
        finest_smoothing: the sigma at factor 1 when ``smoothing_sigmas`` is
            ``None``; ``None``: :func:`register`'s choice (the ``finest``
            argument of :meth:`levels`), :data:`FINEST_SMOOTHING` (1 px) for a
            metric that takes the intensities as linearly related
            (:attr:`tireg.metrics.Metric.linear_intensity`: per-pixel losses,
            ``ncc``, ``ncc_any``, ``lncc``, ``lncc_any``), raised per pair up to
            :data:`NOISE_SMOOTHING_MAX` (3 px) on noisy images
            (:data:`NOISE_BIAS_LIMIT`; ``result.metadata["smoothing"]`` says which),
            :data:`FINEST_SMOOTHING_MI` (0.5 px) for ``mi`` and ``nmi``, 0 for
            a metric of one's own and with ``optimizer="sgd"``.  The last level's
            sigma is that of the images the result is fitted on:
            ``Pyramid(finest_smoothing=0)`` fits the unsmoothed images.  Not
            together with ``smoothing_sigmas``; every sigma at most half the
            image's smaller side.  A sigma above 0 at factor 1 also scales the
            moving image's sigma by the transform's ``sqrt|det L|``, crops the
            fixed image's ``ceil(sigma)`` border band (without a fixed mask;
            the default sigma's where noise raised it, :data:`NOISE_BIAS_LIMIT`)
            and smooths masked images by normalised convolution
            (docs/design.md, "Smoothing at full resolution").
        min_size: smallest side of the coarsest level for the automatic schedule
            (a whole number of at least 1; below 4 it counts as 4, the smallest
            level side any schedule may have).
    """

    shrink_factors: Optional[tuple[int, ...]] = None
    smoothing_sigmas: Optional[tuple[float, ...]] = None
    min_size: int = 32
    finest_smoothing: Optional[float] = None

    def levels(self, size: Sequence[int], finest: float = FINEST_SMOOTHING, *,
               caller: str = "Pyramid.levels()") -> list[tuple[int, float]]:
        """``[(factor, sigma), ...]`` coarse to fine for an image of ``size = (H, W)``; without
        ``smoothing_sigmas`` and ``finest_smoothing``, ``finest`` is the sigma at factor 1.

        Raises ``ValueError`` (its message starting with ``caller``; :func:`register` passes its
        own) for a ``size`` that is not two positive whole numbers, or a schedule that does not fit
        it: a level of fewer than 4 pixels a side, a sigma above half the smaller side."""
        size = check_size(size, caller)  # None: "'NoneType' object is not iterable"
        factors = self.shrink_factors
        if factors is None:
            if not (is_whole(self.min_size) and self.min_size >= 1):
                raise ValueError(
                    f"{caller}: the pyramid's min_size must be an integer of at least 1; got {self.min_size!r}")
            # a level keeps 4 pixels a side at least (the check below): min_size 1 had halved down to
            # 1 pixel, and that check then refused the schedule this loop made
            least = max(self.min_size, _LEAST_LEVEL_SIDE)
            factors, factor = [1], 1
            while min(size) // (2 * factor) >= least:
                factor *= 2
                factors.insert(0, factor)
        if not is_sequence(factors):  # 5: "'int' is not iterable"; a 0-d tensor: "iteration over a 0-d tensor"
            raise ValueError(f"{caller}: shrink factors must be a sequence of positive integers, e.g. (4, 2, 1); "
                             f"got {factors!r}")
        factors = tuple(factors)
        if not factors or not all(is_whole(f) and f >= 1 for f in factors):
            raise ValueError(f"{caller}: shrink factors must be positive integers; got {factors}")
        factors = tuple(int(f) for f in factors)
        if min(size) // max(factors) < _LEAST_LEVEL_SIDE:  # any of them: (2, 64, 1) made a 3 x 4 level
            raise ValueError(
                f"{caller}: shrink factor {max(factors)} leaves fewer than {_LEAST_LEVEL_SIDE} pixels of a "
                f"{tuple(size)} image"
            )
        sigmas = self.smoothing_sigmas
        if sigmas is not None and self.finest_smoothing is not None:
            raise ValueError(f"{caller}: give the pyramid smoothing_sigmas or finest_smoothing, not both; got "
                             f"{tuple(sigmas)} and {self.finest_smoothing!r}")
        if sigmas is None:
            if self.finest_smoothing is not None:
                finest = real_number(self.finest_smoothing)
                if finest is None or not (math.isfinite(finest) and finest >= 0):
                    raise ValueError(f"{caller}: the pyramid's finest_smoothing must be a finite number of at "
                                     f"least 0; got {self.finest_smoothing!r}")
            sigmas = tuple(f / 2.0 if f > 1 else finest for f in factors)
        if not is_sequence(sigmas):  # 3.0: "float has no len()"
            raise ValueError(f"{caller}: smoothing sigmas must be a sequence of numbers, one per level; got "
                             f"{sigmas!r}")
        sigmas = tuple(sigmas)
        if len(sigmas) != len(factors):
            raise ValueError(
                f"{caller}: {len(factors)} shrink factors but {len(sigmas)} smoothing sigmas; give one per level"
            )
        values = [real_number(sigma) for sigma in sigmas]  # numbers, NumPy numbers, 0-d tensors
        if not all(value is not None and math.isfinite(value) and value >= 0 for value in values):
            raise ValueError(f"{caller}: smoothing sigmas must be finite numbers of at least 0; got {tuple(sigmas)}")
        if max(values) > min(size) / 2:  # the image would be a blur (and the kernel 8 sigma long)
            raise ValueError(f"{caller}: a smoothing sigma of {max(values):g} px leaves nothing of a "
                             f"{tuple(size)} image to align; give at most {min(size) / 2:g}")
        return list(zip(factors, values))


@dataclass
class LevelHistory:
    """One pyramid level: its factor, size (the fixed image's, ``(H // factor, W // factor)``) and
    ``cost``, ``(iterations + 1, B)``: every pair's cost at the level's start, then after each iteration
    (a first-order optimiser's: the lowest it has seen at the level).  A cost that is not finite (no
    overlap) reads ``inf``, as :attr:`RegistrationResult.cost` does, with every optimiser.

    The batch's iterations are those of its longest-running pair: below a pair's own rows, the first
    ``lengths[i]`` (its start and one row per iteration it ran at the level), its column repeats its
    last cost.  ``result[i].history`` holds pair ``i``'s own rows only, as a registration of that pair
    alone; ``lengths`` ``(B,)`` int64, or ``None`` where every row is every pair's."""

    factor: int
    size: tuple[int, int]
    cost: torch.Tensor
    lengths: Optional[torch.Tensor] = None


@dataclass(eq=False)  # compared as objects: field by field, ``==`` raised on the tensors' truth value
class RegistrationResult:
    """What :func:`register` found.  Every field is always present.

    Attributes:
        matrix: fixed -> moving pixel matrices, ``(B, 3, 3)``, or ``(3, 3)``
            when single images (not a batch) were given; float64, CPU.
        transform: the transform kind's name.
        parameter_names: order of :attr:`parameter_values`' columns.
        parameter_values: ``(B, P)`` in natural units (radians, scale, pixels)
            about :attr:`center`.
        center: the centre of rotation and scale, the fixed image's centre.
        cost: ``(B,)`` final cost at full resolution, on the images of the
            pyramid's level at factor 1 (smoothed as :class:`Pyramid` says;
            unsmoothed if the pyramid ends above factor 1): the mean per-pixel
            loss over the valid pixels, or the metric's cost (``1 - NCC``,
            ``-MI``, ...).
        iterations: ``(B,)`` iterations over all levels.
        converged: ``(B,)`` bool; a pair that did not converge is a status, not an error.
        stop_reason: per pair, a key of :data:`STOP_REASONS`.
        history: per level (:class:`LevelHistory`), the cost of every pair at
            its start and after every iteration.
        fixed_size, moving_size: ``(H, W)``.
        batched: whether the inputs were ``(B, C, H, W)`` batches.
        seconds: wall-clock time of the call.
    """

    matrix: torch.Tensor
    transform: str
    parameter_names: tuple[str, ...]
    parameter_values: torch.Tensor
    center: tuple[float, float]
    cost: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    stop_reason: list[str]
    history: list[LevelHistory]
    fixed_size: tuple[int, int]
    moving_size: tuple[int, int]
    batched: bool
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.stop_reason)

    def __getitem__(self, index: Union[int, slice, Sequence, torch.Tensor, np.ndarray]) -> "RegistrationResult":
        """The result of pair ``index`` alone (not batched) for an integer; for a slice, a sequence of
        integers or a boolean mask of the pairs (a tensor, an array or a list), the batched result of
        those pairs in that order, e.g. ``result[result.converged]`` (each with its own history rows
        and a copy of :attr:`metadata`)."""
        if isinstance(index, (bool, np.bool_)) or (isinstance(index, torch.Tensor) and index.dtype == torch.bool
                                                   and index.dim() == 0):
            raise TypeError("RegistrationResult: a single boolean picks no pair (True had picked pair 1); "
                            "pass a boolean mask of the pairs, e.g. result[result.converged]")
        try:
            single = operator.index(index)  # an int, a NumPy integer, a 0-d integer tensor
        except TypeError:
            single = None
        if single is not None:
            if not -len(self) <= single < len(self):
                raise IndexError(f"RegistrationResult: pair {single} out of range for {len(self)} pairs")
            return self._of_pairs([single % len(self)], batched=False)
        return self._of_pairs(self._picked(index), batched=True)

    def _picked(self, index: Union[slice, Sequence, torch.Tensor, np.ndarray]) -> list[int]:
        """The pairs, ``0 <= i < len(self)``, that a slice, integers or a boolean mask pick."""
        caller, count = "RegistrationResult", len(self)
        if isinstance(index, slice):
            pairs = list(range(count))[index]
        else:
            if isinstance(index, (torch.Tensor, np.ndarray)) or (is_sequence(index) and not isinstance(index, str)):
                picks = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
            else:
                raise TypeError(f"{caller}: pairs are picked by an integer, a slice, integers or a boolean mask; "
                                f"got {type(index).__name__}")
            if picks.dtype == torch.bool:
                if picks.shape != (count,):
                    raise IndexError(f"{caller}: a boolean mask of the pairs must have shape ({count},); "
                                     f"got {tuple(picks.shape)}")
                pairs = picks.nonzero()[:, 0].tolist()
            elif picks.dim() == 1 and (picks.numel() == 0 or not (picks.is_floating_point() or picks.is_complex())):
                pairs = picks.tolist()
                outside = [pair for pair in pairs if not -count <= pair < count]
                if outside:
                    raise IndexError(f"{caller}: pair {outside[0]} out of range for {count} pairs")
                pairs = [pair % count for pair in pairs]
            else:
                raise TypeError(f"{caller}: pairs are picked by an integer, a slice, integers or a boolean mask; "
                                f"got a {picks.dtype} tensor of shape {tuple(picks.shape)}")
        if not pairs:
            raise IndexError(f"{caller}: {index!r} picks no pair of {count}")
        return pairs

    def _of_pairs(self, pairs: list[int], *, batched: bool) -> "RegistrationResult":
        """The result of ``pairs`` (indices in range), batched or (one pair) not."""
        columns = torch.tensor(pairs, dtype=torch.long)
        matrices = self.matrix.reshape(-1, 3, 3)[columns]
        return replace(
            self,
            matrix=matrices if batched else matrices[0],
            parameter_values=self.parameter_values[columns],
            cost=self.cost[columns],
            iterations=self.iterations[columns],
            converged=self.converged[columns],
            stop_reason=[self.stop_reason[pair] for pair in pairs],
            history=[_pairs_history(level, columns) for level in self.history],
            batched=batched,
            metadata=_pairs_metadata(self.metadata, pairs),
        )

    @property
    def parameters(self) -> dict[str, Union[float, torch.Tensor]]:
        """Parameters in natural units by name; angles also in degrees (``angle_deg``).

        Floats for a single pair, ``(B,)`` tensors for a batch.
        """
        values = {name: self.parameter_values[:, i] for i, name in enumerate(self.parameter_names)}
        if "angle" in values:
            values["angle_deg"] = torch.rad2deg(values["angle"])
        if not self.batched:
            return {name: float(value[0]) for name, value in values.items()}
        return values

    def _matrices(self) -> torch.Tensor:
        return self.matrix.reshape(-1, 3, 3)

    def warp(
        self,
        moving: ImageLike,
        *,
        size: Optional[Sequence[int]] = None,
        interpolation: Optional[str] = None,
        padding_mode: str = "zeros",
    ) -> torch.Tensor:
        """Resample ``moving`` onto the fixed grid with the found transform: ``M(A x)``.

        ``moving`` as for :func:`register`; the result has its dimensions.  ``interpolation``:
        ``"bilinear"``, ``"bicubic"`` or ``"nearest"`` (for labels); default: the one the
        registration used (``metadata["interpolation"]``, as ``tireg apply`` does), else bilinear.
        """
        if interpolation is None:  # a bicubic registration's result had warped bilinearly
            interpolation = self.metadata.get("interpolation", "bilinear")
        image, ndim = as_image(moving, "moving", "RegistrationResult.warp()", finite=False)
        matrix = self._matrices().to(image.dtype if image.is_floating_point() else torch.float32)
        image = image.to(matrix.dtype)
        size = self.fixed_size if size is None else size
        warped = checked_warp(image, matrix.to(image.device), size, interpolation, padding_mode,
                              "RegistrationResult.warp()", affine=False)  # register's matrices are affine
        return _restore_dims(warped, ndim)

    def map_points(self, points: Union[torch.Tensor, np.ndarray, Sequence]) -> torch.Tensor:
        """Map fixed-image points ``(N, 2)`` (or ``(B, N, 2)``) ``(x, y)`` to the moving image: ``A x``.

        ``points``: a tensor, array or nested lists of real numbers (float64 result; a tensor's
        device kept).  Strings, booleans, complex numbers and ragged lists are refused (``TypeError``),
        as are other shapes (``ValueError``)."""
        caller = "RegistrationResult.map_points()"
        if isinstance(points, torch.Tensor):
            if points.is_complex() or points.dtype == torch.bool:  # a complex's imaginary part was dropped
                raise TypeError(f"{caller}: 'points' must be real numbers; got {points.dtype}")
        else:
            from .transform_io import _as_float_array  # strings, ragged lists, complex numbers refused by name

            points = torch.from_numpy(writable(_as_float_array(points, "points", caller)))
        points = points.to(torch.float64)
        if points.dim() not in (2, 3) or points.shape[-1] != 2:
            raise ValueError(f"{caller}: 'points' must have shape (N, 2) or (B, N, 2); got {tuple(points.shape)}")
        matrices = self._matrices().to(points.device)  # the result's matrices are on the CPU
        if points.dim() == 3 and points.shape[0] not in (1, matrices.shape[0]):
            raise ValueError(f"{caller}: {points.shape[0]} point sets for {matrices.shape[0]} pairs; "
                             "give (N, 2) points for every pair, or (B, N, 2) with one set per pair")
        mapped = points @ matrices[..., :2, :2].transpose(-1, -2) + matrices[..., None, :2, 2]
        return mapped[0] if (points.dim() == 2 and not self.batched) else mapped

    def inverse(self) -> "RegistrationResult":
        """The transform from the moving image to the fixed one (matrices inverted, about the moving centre).

        Its kind is this one's where that holds every inverse (translation, rigid, similarity,
        affine), else affine: the inverse of an anisotropic similarity ``R S`` is ``S^-1 R^-1``, whose
        parameters as an anisotropic similarity had rebuilt a matrix 6-13 px from it.  Each pair's
        parameters must rebuild its inverse to ``1e-6`` of that pair's own scale (its largest
        ``|A| |x|`` at the corners).  A result holds one kind: one pair whose inverse needs an
        affine makes the whole batch's inverse affine, while the inverse of another pair alone
        (``result[i].inverse()``) may keep the kind; the matrices are the same either way.  A kind
        that is not built in (a :class:`tireg.transforms.Transform` of one's own given to
        :func:`register`; the result keeps its name only) has an affine inverse too.

        Raises ``ValueError`` naming the pairs whose matrix is not finite or not invertible (a
        linear part singular to rounding: condition number above ``1 / eps``)."""
        from .transforms import TRANSFORMS

        inverse = _checked_inverse(self._matrices(), "RegistrationResult.inverse()")
        center = image_center(*self.moving_size)
        affine = TRANSFORMS["affine"]
        kind = TRANSFORMS.get(self.transform)
        if kind is None or kind.parameter_names != tuple(self.parameter_names):  # a kind of one's own
            kind = affine
        values = kind.from_matrix(inverse, center)
        corners = _image_corners(self.moving_size, inverse.dtype)
        rebuilt = kind.matrix(values, torch.tensor(center, dtype=inverse.dtype))
        # each pair against its own scale: one pair's far translation had loosened every pair's tolerance
        if not bool((_corner_distance(rebuilt, inverse, corners)
                     <= 1e-6 * (1.0 + _corner_reach(inverse, corners))).all()):
            kind = affine
            values = kind.from_matrix(inverse, center)
        return replace(
            self,
            matrix=inverse if self.batched else inverse[0],
            transform=kind.name,
            parameter_names=kind.parameter_names,
            parameter_values=values,
            center=center,
            fixed_size=self.moving_size,
            moving_size=self.fixed_size,
        )

    def save(self, path: str, **options: Any) -> None:
        """Write the transform as tireg JSON (``.json``) or an ITK text transform (``.tfm``) that SimpleITK reads.

        The metadata records ``cost``, ``converged``, ``stop_reason``, the sizes and the interpolation.
        A cost that is not finite (``stop_reason`` ``"no_overlap"`` or ``"not_finite"``, statuses, not
        errors) is recorded as the string ``"inf"``, ``"-inf"`` or ``"nan"``, which JSON can hold and
        ``float()`` reads back: one such pair does not stop a batch from being saved.  The matrices
        and parameters are written exactly, and must be finite (``save_transform`` checks them).
        ``path``: a ``str`` or ``os.PathLike`` whose suffix picks the format (anything else:
        ``TypeError``).
        """
        from .transform_io import save_transform

        # the path first (a bare "expected str, bytes or os.PathLike object" came from deep inside)
        if not (isinstance(path, (str, os.PathLike)) and isinstance(os.fspath(path), str)):
            raise TypeError(f"RegistrationResult.save(): 'path' must be a file name, a str or os.PathLike; "
                            f"got {type(path).__name__}")
        parameters = {name: self.parameter_values[:, i].tolist() for i, name in enumerate(self.parameter_names)}
        if not self.batched:
            parameters = {name: value[0] for name, value in parameters.items()}
        save_transform(
            path,
            self.matrix,
            transform=self.transform,
            parameters=parameters,
            center=self.center,
            metadata={
                "cost": [value if math.isfinite(value) else repr(value) for value in self.cost.tolist()],
                "converged": self.converged.tolist(),
                "stop_reason": self.stop_reason,
                "fixed_size": list(self.fixed_size),
                "moving_size": list(self.moving_size),
                # what resampling reproduces the registration's warped image (`tireg apply`'s default)
                **({"interpolation": self.metadata["interpolation"]} if "interpolation" in self.metadata else {}),
            },
            **options,
        )

    def summary(self) -> str:
        """A few lines for people: matrix, parameters, cost, iterations, time, status per pair."""
        lines = []
        for index in range(len(self)):
            pair = self[index]
            params = ", ".join(f"{name}={value:.6g}" for name, value in pair.parameters.items())
            matrix = pair.matrix.tolist()
            reason = pair.stop_reason[0]
            status = ("converged" if bool(pair.converged[0]) else "not converged") + (
                "" if reason == "converged" else f" ({reason})")  # not "converged (converged)"
            lines.append(f"pair {index}: {self.transform}: {params}")
            lines.append(f"  matrix (fixed -> moving, pixels): {[[round(v, 6) for v in row] for row in matrix[:2]]}")
            lines.append(
                f"  cost {float(pair.cost[0]):.6g}, {int(pair.iterations[0])} iterations, {status}"
            )
        lines.append(f"{self.seconds:.3f} s")
        return "\n".join(lines)


def _pairs_metadata(metadata: dict[str, Any], pairs: list[int]) -> dict[str, Any]:
    """A copy of a batch's ``metadata`` for ``pairs`` (a pair's had been the batch's dict): a
    full-resolution smoothing given per pair (a list, :data:`NOISE_BIAS_LIMIT`) becomes the
    pairs' own, one number where they share it, as each would report alone."""
    picked = dict(metadata)
    smoothing = picked.get("smoothing")
    if isinstance(smoothing, list) and smoothing and isinstance(smoothing[-1], list):
        own = [smoothing[-1][pair] for pair in pairs]
        picked["smoothing"] = smoothing[:-1] + [own[0] if len(set(own)) == 1 else own]
    return picked


def _pairs_history(level: LevelHistory, columns: torch.Tensor) -> LevelHistory:
    """The part of a level's history of the pairs ``columns`` ``(K,)``: their columns, down to the
    longest's own rows (:attr:`LevelHistory.lengths`), not the batch's padding below them."""
    if level.lengths is None:
        return replace(level, cost=level.cost[:, columns])
    lengths = level.lengths[columns]
    return replace(level, cost=level.cost[: int(lengths.max()), columns], lengths=lengths)


def _checked_inverse(matrices: torch.Tensor, caller: str) -> torch.Tensor:
    """``inv(A)`` of float64 ``(B, 3, 3)`` affine matrices; ``ValueError`` naming the pairs whose
    matrix is not finite, or not invertible: a linear part whose condition number is above
    ``1 / eps`` (singular to rounding, as :func:`tireg.transform_io.save_transform` warns), or whose
    inverse leaves float64's range.  torch's ``LinAlgError`` from deep inside (or a NaN matrix's
    error from the kind's ``from_matrix``) named neither the caller nor the pair."""
    pairs = pair_names
    finite = torch.isfinite(matrices).flatten(1).all(1).tolist()
    bad = [index for index, ok in enumerate(finite) if not ok]
    if bad:
        raise ValueError(f"{caller}: the matrix of {pairs(bad)} is not finite (NaN or Inf); it has no inverse")
    limit = 1.0 / torch.finfo(matrices.dtype).eps
    condition = torch.linalg.cond(matrices[:, :2, :2]).tolist()
    bad = [index for index, value in enumerate(condition) if not value <= limit]
    if bad:
        raise ValueError(f"{caller}: the matrix of {pairs(bad)} is not invertible: its linear part is singular "
                         f"(condition number {condition[bad[0]]:.3g}, above 1/eps = {limit:.3g}); it maps the "
                         "fixed image onto a line or a point")
    inverse = torch.linalg.inv(matrices)
    bad = [index for index, ok in enumerate(torch.isfinite(inverse).flatten(1).all(1).tolist()) if not ok]
    if bad:
        raise ValueError(f"{caller}: the matrix of {pairs(bad)} is not invertible in float64: its inverse is "
                         "beyond float64's range")
    return inverse


# ----------------------------------------------------------------------------
# input handling


def _integer_float32(image: torch.Tensor, mask: Optional[torch.Tensor], name: str, device: torch.device,
                     caller: str, *, centred: bool, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An integer image ``(b, C, H, W)`` of more than 16 bits (:func:`is_wide_integer`) as register's
    float32 working copy on ``device``, pair by pair, each pair as it would be alone: filled outside its
    mask (:func:`_filled_outside`; ``mask`` as there), in float32 where its values stay within float32's
    24 bits (exactly), else in float64 (:func:`wide_pairs`), then, ``centred``, centred as a float64
    image (:func:`_float32`) or less its ``offset`` (``(1 or B, C, 1, 1)`` float64, taken in the pair's
    precision: :func:`_without_offsets`), and cast.  ``(b, ...)``, or ``(B, ...)`` where one image has an
    offset per pair.

    Why pair by pair: the batch's largest value had decided float32 or float64 for every pair, so one
    pair of int32 values above 2^24 sent the others down the float64 path, and a pair's result in a
    batch differed from its result alone (mi 0.33 px, lncc 0.15).  One pair at a time, a float64 copy
    is never the whole batch's (a batch's peak memory counts every copy).

    But not in a Python loop where it need not be: the float32 pairs go together, a whole batch at
    once where none is wide (512 pairs of 64^2 had taken 57 instead of 7 ms), and the float64 ones
    in chunks of pairs under the eager budget (every step is per pair and plane, so each pair's
    numbers are those it gets alone, to the bit); a shared image
    (``b`` 1) is converted and filled once (its masks' union taken once, not once per pair: that
    was O(B^2 H W)), and only its offsets per pair, if any, make it a batch."""
    wide = wide_pairs(image)
    count = image.shape[0] if offset is None else max(image.shape[0], offset.shape[0])
    if image.shape[0] == 1:
        # a shared image keeps every pair's mask (_filled_outside: their union), as a batch of one
        shared = image.to(torch.float64 if wide[0] else torch.float32)  # a copy
        shared = _filled_outside(shared, mask, in_place=True)
        if offset is None or offset.shape[0] == 1:
            if offset is not None:
                shared = shared - offset.to(device=shared.device, dtype=shared.dtype)
            return _float32(shared, name, device, caller, centred=centred, mask=mask)
        converted = torch.empty((count, *image.shape[1:]), dtype=torch.float32, device=device)
        for index in range(count):  # an offset per pair: as many images
            pair = shared - offset[index][None].to(device=shared.device, dtype=shared.dtype)
            converted[index:index + 1] = _float32(pair, name, device, caller, centred=centred, mask=mask)
        return converted
    # the float32 pairs at once (their float32 copy is the result); the float64 ones in chunks of
    # pairs under the eager budget, so that no float64 copy is the whole batch's (16 x 256^2 int32 on
    # 2^26 had peaked at 6.5x its input converted whole, 3.8x pair by pair)
    size = max(1, _chunks.eager_budget(device) // max(1, image[0].numel()))
    groups = [[index for index in range(count) if not wide[index]]]
    chosen = [index for index in range(count) if wide[index]]
    groups += [chosen[start:start + size] for start in range(0, len(chosen), size)]
    converted = None
    for precision, chosen in zip([False] + [True] * (len(groups) - 1), groups):
        if not chosen:
            continue
        every = len(chosen) == count
        pick = (lambda tensor: tensor) if every else (  # noqa: E731
            lambda tensor: tensor[torch.tensor(chosen, device=tensor.device)])
        group_mask = None if mask is None else (
            mask if _one_for_every_pair(mask) else pick(mask))
        if group_mask is not None and group_mask.stride(0) == 0 and not every:
            group_mask = mask[:1].expand(len(chosen), *mask.shape[1:])  # one mask for every pair, still
        group = pick(image).to(torch.float64 if precision else torch.float32)  # a copy
        group = _filled_outside(group, group_mask, in_place=True)
        if offset is not None:
            group_offset = offset if offset.shape[0] == 1 else pick(offset)
            group = group - group_offset.to(device=group.device, dtype=group.dtype)
        result = _float32(group, name, device, caller, centred=centred, mask=group_mask)
        if every:
            return result
        if converted is None:
            converted = torch.empty((count, *image.shape[1:]), dtype=torch.float32, device=device)
        converted[torch.tensor(chosen, device=device)] = result
    return converted


def _float32(image: torch.Tensor, name: str, device: torch.device, caller: str, *, centred: bool,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``image`` (finite, checked) as float32 on ``device``, detached: register differentiates
    its parameters only (an image that requires grad would carry autograd into every operation,
    and the in-place and out= ones refuse it).  float64 values beyond float32's range raise (they
    became Inf and surfaced as the initialiser's NaN error).

    ``centred`` (register normalises the images anyway): a float64 image is first made zero-mean
    and unit-deviation per plane in float64, so that float32 keeps its detail (an image of
    ``1e8 + camera`` lost it all in the cast, and was called constant; one of 1e300 overflowed).
    Any change of gain and offset leaves the registration as it is.  With a ``mask`` (``(B, 1, H, W)``
    0/1) of one batch with the image's, or shared by every pair, over the pixels inside it: a field
    of view of ``1e6 +`` data over zeros, centred on the whole image's mean, kept its data 0.44e6
    from 0 and lost it to float32's rounding (0.1 px off where ``1e3 +`` gave 0.05).  A shared image
    with a mask per pair is centred over all of it, which register has filled outside the masks'
    union with the mean inside it (:func:`_filled_outside`): 1e8 there had kept little of the data.
    """
    image = image.detach()
    if centred and image.dtype == torch.float64:
        peak = image.abs().amax(dim=(2, 3), keepdim=True)  # first into [-1, 1]: squares of 1e300 overflow
        image = image / torch.where(peak > 0, peak, torch.ones_like(peak))
        if mask is not None and _one_for_every_pair(mask):
            mask = mask[:1]
        if mask is not None and mask.shape[0] in (1, image.shape[0]):  # (one mask for a batch: each pair
            # over it, as alone; it had been centred over the whole image there, a pair of 1e7 + data 2e-7 px
            # and with mi 3e-4 px from its result alone)
            mean, deviation = _masked_mean_and_deviation(image, mask)
        else:  # a mask per pair for a shared image: centring per pair would copy the image per pair
            mean, deviation = _mean_and_deviation(image)
        image = (image - mean) / torch.where(deviation > 0, deviation, torch.ones_like(deviation))
    converted = image.to(device=device, dtype=torch.float32)
    if image.dtype == torch.float64 and not all_finite(converted):
        where = of_pairs([not all_finite(pair) for pair in converted])
        raise ValueError(f"{caller}: '{name}' has values beyond float32's range{where} (|x| up to "
                         f"{float(image.abs().max()):.3g}), which register computes in; scale it first")
    return converted


def _restore_dims(image: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B, C, H, W)`` back to the caller's ``ndim`` dimensions; a batch of several results keeps
    its batch dimension (``(B, H, W)`` for a 2-D image; squeezing it looped forever)."""
    if image.shape[0] > 1:
        return image[:, 0] if ndim == 2 and image.shape[1] == 1 else image
    while image.dim() > ndim:
        image = image.squeeze(0)
    return image


def _as_mask(mask: Optional[ImageLike], image: torch.Tensor, name: str,
             device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """A ``(B, 1, H, W)`` float32 0/1 mask matching ``image`` (or ``None``), on ``device`` (default: the image's)."""
    if mask is None:
        return None
    tensor, ndim = as_image(mask, name, "register()")
    if tensor.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"register(): '{name}' must have the image's size {tuple(image.shape[-2:])}; got {tuple(tensor.shape[-2:])}"
        )
    if tensor.shape[1] != 1:
        hint = (f"; a 3-D mask is read as (C, H, W): for a mask per pair pass (B, 1, H, W), {name}[:, None]"
                if ndim == 3 else "")
        raise ValueError(f"register(): '{name}' must have one channel; got {tensor.shape[1]}{hint}")
    # nonzero, as documented and as the CLI reads masks
    tensor = (tensor != 0).to(torch.float32).to(image.device if device is None else device)
    if tensor.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"register(): '{name}' has {tensor.shape[0]} masks for {image.shape[0]} "
                         f"image{'s' if image.shape[0] != 1 else ''}")
    few = tensor.flatten(1).sum(1) < 16
    if bool(few.any()):
        raise ValueError(f"register(): '{name}' selects fewer than 16 pixels{of_pairs(few)}")
    return tensor.expand(image.shape[0], 1, *image.shape[-2:])


def _one_for_every_pair(mask: torch.Tensor) -> bool:
    """Whether ``mask`` ``(B, 1, H, W)`` is one mask for every pair: a batch of one, or one expanded
    (stride 0), whose pair ``[:1]`` stands for all."""
    return mask.shape[0] == 1 or mask.stride(0) == 0


def _filled_outside(image: torch.Tensor, mask: Optional[torch.Tensor], *, in_place: bool = False) -> torch.Tensor:
    """``image`` ``(b, C, H, W)`` (``b`` 1 or ``B``; float32 or float64, NaN and Inf allowed) with every
    pixel outside ``mask`` (:func:`_as_mask`'s ``(B, 1, H, W)``) set to the mean inside it, per pair and
    channel; ``image`` itself (no copy) without a mask.  A shared image (``b`` 1) with a mask per pair
    is filled outside the masks' union (not copied per pair): its pixels inside one pair's mask are
    that pair's data, no no-data.

    Why: what lies under a mask is no data, and nothing that register computes may depend on it, but
    much did: a bilinear sample whose masked tap weighs below the mask test's rounding, the sampler's
    one-sided derivative at whole pixels, the float64 centring of a shared image over all of it,
    squares of 1e19 in the overlap statistics (Inf, then NaN: the normalisation silently fell back),
    -FLT_MAX (GDAL's no-data) or 1e100 refused as NaN or beyond float32, and a NaN refused outright.
    With the data there replaced by a value of the data inside, every later step sees the same numbers
    whatever the no-data is.  The mean sums only the pixels inside (``where``, not ``image * mask``:
    ``0 * Inf`` is NaN), in float64, so a huge or non-finite value outside never enters it; a
    non-finite value inside makes it non-finite, which :func:`_refuse_not_finite` then reports.

    ``in_place``: ``image`` is the caller's own working copy (:func:`_working_copy`), filled as it is
    (one copy serves both the conversion and the fill); else the result is a new image.  Both the
    sums and the fill run in chunks of pairs or bands of rows (:func:`tireg._chunks.pair_and_row_chunks`,
    which depend on a pair's size only: a pair's sums are added in the same order alone as in a
    batch): no image-sized temporary beyond the result.
    """
    if mask is None:
        return image
    mask = mask.to(image.device)
    if _one_for_every_pair(mask):
        mask = mask[:1]
    elif image.shape[0] == 1:
        mask = mask.amax(dim=0, keepdim=True)  # a shared image, a mask per pair: their union
    inside = mask != 0
    count = inside.sum(dim=(2, 3), keepdim=True, dtype=torch.float64)
    chunks = _chunks.pair_and_row_chunks(image.shape, _chunks.eager_budget(image.device))
    own = lambda pairs: pairs if inside.shape[0] > 1 else slice(None)  # noqa: E731
    total = torch.zeros((image.shape[0], image.shape[1], 1, 1), dtype=torch.float64, device=image.device)
    for pairs, rows in chunks:
        part = image[pairs, :, rows]
        total[pairs] += torch.where(inside[own(pairs), :, rows], part, part.new_zeros(())).sum(
            dim=(2, 3), keepdim=True, dtype=torch.float64)
    fill = (total / count).to(image.dtype)
    filled = image if in_place else torch.empty(image.shape, dtype=image.dtype, device=image.device)
    for pairs, rows in chunks:
        filled[pairs, :, rows] = torch.where(inside[own(pairs), :, rows], image[pairs, :, rows], fill[pairs])
    return filled


def _working_copy(image: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``(image, owned)`` for :func:`_filled_outside`: a float32 ``image`` not on ``device`` as the
    float32 copy on ``device`` that :func:`_float32` would have made anyway (``owned``: register's own,
    filled in place: one copy serves both the move and the fill, and the fill runs on the device);
    any other (on ``device`` already, or float64, which :func:`_float32` centres first) as it is."""
    if image.dtype == torch.float32:
        copy = image.detach().to(device=device)
        # owned only where .to made a copy: torch.device("cuda") differs from a tensor's cuda:0, and
        # .to("cuda") of that tensor is the tensor itself (the caller's, filled in place)
        if copy.data_ptr() != image.data_ptr():
            return copy, True
    return image, False


def _refuse_not_finite(image: torch.Tensor, ndim: int, masked: bool, name: str, caller: str) -> None:
    """Raise ``ValueError`` where ``image`` (:func:`_filled_outside`: outside its mask, finite) holds NaN
    or Inf, naming the pairs of a batch (pair by pair: no image-sized flags)."""
    if all_finite(image):
        return
    where = of_pairs([not all_finite(pair) for pair in image]) if ndim == 4 else ""
    if masked:
        raise ValueError(f"{caller}: '{name}' contains NaN or Inf values inside its mask{where} (outside it "
                         "any value is left out)")
    raise ValueError(f"{caller}: '{name}' contains NaN or Inf values{where} (where a mask leaves them out, they "
                     f"are left out: pass one, {'mask' if name == 'fixed' else 'moving_mask'}=, or fill them)")


def _normalized(image: torch.Tensor, statistics: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``(image - mean) / std``: one image-sized result (a batch's peak memory counts every copy of
    its images); with :func:`_normalization`'s statistics, zero mean and unit deviation per image and
    channel (over the mask)."""
    mean, std = statistics
    return (image - mean).div_(std)


#: A redescending per-pixel loss (:class:`~tireg.losses.CauchyLoss`,
#: :class:`~tireg.losses.GemanMcClureLoss`) whose scale is below the fixed image's deviation (in the
#: units the loss sees) by more than this factor is warned about: it counts nearly every difference
#: as an outlier.  Measured on astronaut (a 3 px, 3 degree rigid pair, registered affine; largest
#: matrix error, 0.007 px at a ratio of 1-10), normalised and ``normalize=False``: a ratio of 33 ends
#: at 0.007-0.033 px, 100 at 0.015-0.080, 1,000 at 0.05-1.0 ("converged" after 0 iterations),
#: 16-bit counts at scale 1 (a ratio of 18,700) at 0.24 / 1.0 px (Cauchy / Geman-McClure).
OUTLIER_SCALE_LIMIT = 30.0


def _warn_outlier_scale(metric: Metric, fixed: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                        caller: str) -> None:
    """Warn where ``metric``'s redescending loss has a scale far below the images' deviation.

    A Cauchy or Geman-McClure loss of scale ``c`` weighs a difference ``r`` by ``c^2 / (c^2 + r^2)``
    (Cauchy; Geman-McClure by its square): with ``c`` far below the deviation ``s`` of the images,
    every misaligned pixel and most of the edges of an aligned pair count as outliers, the cost is
    flat or rugged, and the optimiser stops short.  ``s`` is 1 for normalised images, else the
    largest of the fixed image's deviations per pair and channel (over its mask).
    """
    loss = getattr(metric, "loss", None) if isinstance(metric, PerPixelMetric) else None
    if not isinstance(loss, (CauchyLoss, GemanMcClureLoss)):
        return
    deviation = 1.0 if normalize else float(_normalization(fixed, mask, "fixed")[1].max())
    if deviation <= OUTLIER_SCALE_LIMIT * loss.scale:
        return
    units = ("normalised images, deviation 1" if normalize
             else f"the intensities as given (normalize=False), deviation {deviation:.3g}")
    warnings.warn(f"{caller}: {type(loss).__name__}(scale={loss.scale:g}) counts a difference beyond its scale as "
                  f"an outlier, and it compares {units}: {deviation / loss.scale:.3g} times the scale, so most "
                  "pixels count as outliers and the result may stop short of the alignment; pass "
                  + ("a scale near 1, or " if normalize else "normalize=True (the default), or ")
                  + f"{type(loss).__name__}(scale={deviation:.3g})", UserWarning, stacklevel=user_stacklevel())


def _normalization(image: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of :func:`_normalize`, each ``(B, C, 1, 1)``."""
    mean, std = _mean_and_deviation(image) if mask is None else _masked_mean_and_deviation(image, mask)
    _refuse_constant(image, mask, name)
    if image.dtype != torch.float64:
        # squares beyond float32's range (values near 1e19), or below it (near 1e-31): in float64, the
        # pairs that need it (the whole batch had been, and every pair's statistics changed with it)
        redo = ~((std > 0) & torch.isfinite(std)).flatten(1).all(dim=1)
        if bool(redo.any()):
            pairs = redo.nonzero()[:, 0]
            pair_mask = None if mask is None else (mask if mask.shape[0] == 1 else mask[pairs]).double()
            wide = _normalization(image[pairs].double(), pair_mask, name)
            mean, std = mean.clone(), std.clone()
            mean[pairs], std[pairs] = wide[0].to(image.dtype), wide[1].to(image.dtype)
    return mean, std


#: The overlap's statistics (:func:`_normalize_over_overlap`) are taken on a grid of fixed pixels
#: strided to about this many points per pair: both images are sampled at the same points, so an
#: exact gain and offset between them is found exactly on any subset.
OVERLAP_SAMPLES = 1 << 14

#: Normalised over the whole image, a plane whose deviation over the overlap is below this keeps
#: its whole-image normalisation (a flat overlap: dividing by it would magnify its noise).
_MIN_OVERLAP_DEVIATION = 1e-3


#: The overlap's moving deviation is corrected for the noise its resampling removed
#: (:func:`_overlap_statistics`) where the correction is at least this share of its sampled variance
#: (a gain 0.5 % off); below, the deviation is the samples' own, bit for bit.  On clean photographs
#: Immerkaer's estimate is their finest structure's: at 1e-3, 78 of 80 sub-pixel shifts of five
#: clean scenes moved (< 0.002 px, camera / coins / astronaut slightly worse); at 1e-2 only gravel's
#: (grainy: median 0.015 -> 0.009 px), the others bit for bit.
MIN_NOISE_CORRECTION = 1e-2


def _resampled_noise_share(offset: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Along one axis, the share of a white noise's variance that ``interpolation`` keeps at fractional
    ``offset`` (0 <= offset < 1): the sum of its weights' squares (bilinear ``(1 - a)^2 + a^2``, 1 at
    whole pixels and 0.5 halfway; bicubic: ``grid_sample``'s cubic convolution, A = -0.75)."""
    if interpolation == "nearest":
        return torch.ones_like(offset)
    if interpolation == "bicubic":
        a = -0.75

        def near(x):  # |x| <= 1
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        weights = (far(offset + 1.0), near(offset), near(1.0 - offset), far(2.0 - offset))
        return sum(weight * weight for weight in weights)
    return (1.0 - offset) ** 2 + offset**2


def _overlap_statistics(
    problem: "_Problem", params: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
    fixed_mask: Optional[torch.Tensor], moving_mask: Optional[torch.Tensor],
    moving_noise: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """``(count, fixed mean, fixed std, moving mean, moving std)`` over the pixels the cost counts at
    ``params`` (inside the fixed mask, sampling inside the moving image and its mask), the moving
    image resampled there; count ``(B, 1)``, the others ``(B, C)``, float64.

    On fixed pixels strided to about :data:`OVERLAP_SAMPLES` per pair, in chunks of pairs
    (:mod:`tireg._chunks`), summed in float64.

    ``moving_noise``: ``(B, C)``, the moving image's noise variance in ``moving``'s units (or
    ``None``).  Resampling averages its noise: at fractional offsets ``(a, b)`` a bilinear sample keeps
    ``w(a, b) = ((1 - a)^2 + a^2)((1 - b)^2 + b^2)`` of its variance (:func:`_resampled_noise_share`),
    so the samples' variance depends on the parameters' sub-pixel phase (a 13-photon image's gain came
    out 1.08-1.12 too high, the cost 1 px periodic, a start at the true shift walked 0.5-1 px off); the
    moving variance is given back ``noise x (1 - mean w)`` over the counted samples, where that is at
    least :data:`MIN_NOISE_CORRECTION` of it.  The fixed image's are its own pixels: nothing to correct.
    """
    height, width = fixed.shape[-2:]
    stride = max(1, math.isqrt(height * width // OVERLAP_SAMPLES))
    whole = _make_level(fixed, moving, fixed_mask, moving_mask, 1, 0.0)  # views, at factor 1
    ys, xs = whole.axes
    points = (slice(None), slice(None), slice(None, None, stride), slice(None, None, stride))
    level = replace(whole, fixed=fixed[points], axes=(ys[::stride], xs[::stride]),
                    fixed_weight=None if fixed_mask is None else fixed_mask[points])
    pair_pixels = level.fixed.shape[1] * level.fixed.shape[2] * level.fixed.shape[3]
    correct = moving_noise is not None and problem.interpolation != "nearest"
    sums = []
    parts = _chunks.chunk_slices(fixed.shape[0], pair_pixels, _chunks.eager_budget(fixed.device))
    for part in parts:
        pairs = level if len(parts) == 1 else level.pairs(part)
        grid = problem.grid(problem.matrices(params[part], pairs)[0], pairs)
        valid = problem._valid(grid, pairs)  # (b, 1, h, w)
        values = sample(pairs.moving, grid, interpolation=problem.interpolation, padding_mode="border")
        planes = [pairs.fixed, pairs.fixed * pairs.fixed, values, values * values]
        if correct:  # the share of the noise's variance each sample kept
            size = grid.new_tensor([pairs.moving.shape[-1], pairs.moving.shape[-2]])
            coordinates = ((grid + 1.0) * size - 1.0) * 0.5  # pixel coordinates (align_corners=False)
            offsets = coordinates - coordinates.floor()
            kept = (_resampled_noise_share(offsets[..., 0], problem.interpolation)
                    * _resampled_noise_share(offsets[..., 1], problem.interpolation))[:, None]  # (b, 1, h, w)
            planes.append(kept.expand_as(values))
        sums.append(torch.stack([valid.sum(dim=(2, 3), dtype=torch.float64).expand(-1, fixed.shape[1]),
                                 *[(valid * plane).sum(dim=(2, 3), dtype=torch.float64) for plane in planes]]))
    count, fixed_sum, fixed_squares, moving_sum, moving_squares, *kept_sum = torch.cat(sums, dim=1)  # each (B, C)
    safe = count.clamp_min(1.0)
    fixed_mean, moving_mean = fixed_sum / safe, moving_sum / safe
    fixed_std = (fixed_squares / safe - fixed_mean**2).clamp_min(0.0).sqrt()
    moving_variance = (moving_squares / safe - moving_mean**2).clamp_min(0.0)
    if correct:
        removed = moving_noise.to(moving_variance) * (1.0 - kept_sum[0] / safe).clamp_min(0.0)
        moving_variance = torch.where(removed >= MIN_NOISE_CORRECTION * moving_variance,
                                      moving_variance + removed, moving_variance)
    moving_std = moving_variance.sqrt()
    return count[:, :1], fixed_mean, fixed_std, moving_mean, moving_std


def _normalize_over_overlap(
    problem: "_Problem", params: torch.Tensor, fixed: tuple, moving: tuple,
    fixed_mask: Optional[torch.Tensor], moving_mask: Optional[torch.Tensor],
    moving_noise: Optional[torch.Tensor] = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Normalise both images again, to zero mean and unit deviation over the pixels the cost
    counts at ``params`` (:func:`_overlap_statistics`), in place; returns the new ``(mean, std)``
    of the unnormalised fixed and moving images.

    ``fixed`` and ``moving``: ``(image, normalised image, (mean, std))`` each.  Why: normalised
    over each whole image, two images showing different areas of one scene (a template, a partial
    overlap, a no-data border) get different gains and offsets, which L2 does not forgive: an exact
    crop registered 0.16 px off and a 128^2 pair shifted by (40, 30) 0.25 px; over the same pixels,
    an exact gain and offset between the images drops out.  A pair with fewer than
    :data:`MIN_VALID_PIXELS` such pixels, or a plane nearly flat there, keeps its whole-image
    normalisation.

    ``moving_noise``: ``(B, C)`` float64, the unnormalised moving image's noise variance (or ``None``):
    the moving deviation over the overlap is corrected for the share its resampling removed
    (:func:`_overlap_statistics`).
    """
    fixed_t, fixed_n, fixed_stats = fixed
    moving_t, moving_n, moving_stats = moving
    if moving_noise is not None and not bool((moving_noise > 0).any()):  # (on the CPU: no wait)
        moving_noise = None
    if moving_noise is not None:  # in the units of the normalised image sampled
        deviation = moving_stats[1].detach().double().flatten(1)
        moving_noise = moving_noise.to(deviation.device) / deviation**2
    count, fixed_mean, fixed_std, moving_mean, moving_std = _overlap_statistics(
        problem, params, fixed_n, moving_n, fixed_mask, moving_mask, moving_noise)
    usable = ((count >= MIN_VALID_PIXELS) & (fixed_std > _MIN_OVERLAP_DEVIATION)
              & (moving_std > _MIN_OVERLAP_DEVIATION))  # (B, C)
    updated = []
    for image, normalized, (mean, std), (overlap_mean, overlap_std) in (
            (fixed_t, fixed_n, fixed_stats, (fixed_mean, fixed_std)),
            (moving_t, moving_n, moving_stats, (moving_mean, moving_std))):
        # normalized = (image - mean) / std, normalised again over the overlap: (image - m') / s'
        overlap_mean = torch.where(usable, overlap_mean, 0.0).to(mean.dtype)[..., None, None]
        overlap_std = torch.where(usable, overlap_std, 1.0).to(std.dtype)[..., None, None]
        mean, std = mean + overlap_mean * std, std * overlap_std
        torch.sub(image, mean, out=normalized).div_(std)  # as _normalized, into the same memory
        updated.append((mean, std))
    return updated[0], updated[1]


def _refuse_constant(image: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> None:
    """Raise ``ValueError`` naming the pair and channel where a plane of ``image`` is constant (inside
    its mask): there is nothing to align, whether or not the images are normalised."""
    flat = _constant_planes(image, mask)
    if bool(flat.any()):
        pair, channel = (int(index) for index in flat.nonzero()[0])
        where, advice = _plane_location(flat, pair, channel), ""
        if flat.shape[1] > 1:
            advice = "; pass the channels that hold the image, or register on one"
        if image.dtype == torch.float32 and float(image.abs().amax()) >= 1 << 24:  # rounded to one value?
            advice += (f"; its values reach {float(image.abs().amax()):.3g}, where float32 (register's arithmetic) "
                       "steps by 1 or more: keep normalize=True, which centres them in float64 first, or subtract "
                       "an offset")
        raise ValueError(
            f"register(): '{name}' is constant (inside its mask){where}: there is nothing to align{advice}")


def _constant_planes(image: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, C)``: whether each image plane holds one value (inside its mask), exactly.

    Not by its deviation: a threshold on it either depends on the values' scale (an image of
    values near 1e-20 was called constant) or on the rounding of the mean.  Without a mask, the
    largest equals the smallest value; with one, every masked pixel equals the first masked one.
    """
    values = image.flatten(2)
    if mask is None:
        return values.amax(dim=-1) == values.amin(dim=-1)  # torch.aminmax(dim=) is 10x slower on the CPU
    weights = mask.flatten(2)  # (B, 1, N) of 0 and 1
    first = weights.argmax(dim=-1, keepdim=True).expand(-1, values.shape[1], -1)  # first masked pixel
    return ((values - values.gather(-1, first)).abs_() * weights).amax(dim=-1) == 0


#: Metrics whose cost sees neither the gain nor the offset of either image (with their class's own
#: cost): ``register(normalize=False)`` computes them on the normalised images all the same.
_GAIN_INVARIANT = (NCC, MutualInformation, NormalizedMutualInformation)


def _offset_kind(metric: Metric) -> Optional[str]:
    """Which offset ``register(normalize=False)`` takes off the images for ``metric``: ``"common"``,
    one for both, for a per-pixel metric of PerPixelMetric's own cost whose loss is a function of
    ``x - y`` (PerPixelLoss's own ``forward``: every built-in loss, their scales on ``x - y`` too);
    ``"each"``, each image its own, for local NCC (its own cost: invariant to each image's offset,
    not to its gain); ``None`` for a metric of one's own, which gets the intensities as given."""
    if _pixel_parts(metric) and type(metric.loss).forward is PerPixelLoss.forward:
        return "common"
    if _own_cost(metric, (LocalNCC,)):
        return "each"
    return None


def _plane_mean(image: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of ``image`` ``(b, C, H, W)`` per pair and channel, over ``mask`` (``(B, 1, H, W)``,
    ``b`` 1 or ``B``), summed in float64: ``(b, C, 1, 1)``, or ``(B, C, 1, 1)`` where one image has a
    mask per pair.  A mask shared by the pairs (a broadcast one) counts once."""
    if mask is None:
        return image.sum(dim=(2, 3), keepdim=True, dtype=torch.float64) / (image.shape[-2] * image.shape[-1])
    mask = mask.to(image.device)
    if image.shape[0] == 1 and _one_for_every_pair(mask):
        mask = mask[:1]
    count = mask.sum(dim=(2, 3), keepdim=True, dtype=torch.float64)
    return (image * mask.to(image.dtype)).sum(dim=(2, 3), keepdim=True, dtype=torch.float64) / count


def _without_offsets(
    fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: Optional[torch.Tensor],
    moving_mask: Optional[torch.Tensor], metric: Metric, batch: int, device: torch.device, caller: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``register(normalize=False)``'s working images: ``fixed`` and ``moving`` ``(b, C, H, W)`` (``b``
    1 or ``batch``, as given: float32, float64, or integers of more than 16 bits, whose pairs are
    float32 or float64 by their own values: :func:`_integer_float32`) less the offset that ``metric``
    does not see (:func:`_offset_kind`), taken off in their own precision, then as float32 on
    ``device`` (:func:`_float32`), ``(batch, C, H, W)``.

    Why: register computes in float32, and a cast first kept little of an image on a large offset
    (``1e6 + camera`` in float64: NCC read 1.0 and MI ended 12 px off, "converged"; 16-bit counts on
    ``1e9``, L2, 0.9 px).  ``"common"``: the mean (over its mask) of the image with fewer pairs, the
    fixed one on a tie (neither then grows to the batch), per pair and channel, rounded to float32
    where either image's pair is in float32 (:func:`_float32_pairs`), so that both lose exactly the
    same number.  ``"each"``: each image its own mean.
    """
    kind = _offset_kind(metric)
    if kind == "common":
        source, mask = (fixed, fixed_mask) if fixed.shape[0] <= moving.shape[0] else (moving, moving_mask)
        offset = _plane_mean(source, mask)
        narrow = [first or second for first, second in zip(*_broadcast_pairs(_float32_pairs(fixed),
                                                                             _float32_pairs(moving)))]
        if all(narrow):
            offset = offset.to(torch.float32).to(torch.float64)
        elif any(narrow):  # pair by pair (integer pairs of both precisions): each as it would be alone
            flags = torch.tensor(narrow, device=offset.device)[:, None, None, None]
            offset = torch.where(flags, offset.to(torch.float32).to(torch.float64), offset)
        offsets = (offset, offset)
    elif kind == "each":
        offsets = (_plane_mean(fixed, fixed_mask), _plane_mean(moving, moving_mask))
    else:
        offsets = (None, None)
    images = []
    for image, offset, name, mask in zip((fixed, moving), offsets, ("fixed", "moving"), (fixed_mask, moving_mask)):
        image = image.detach()
        if is_wide_integer(image):
            converted = _integer_float32(image, mask, name, device, caller, centred=False, offset=offset)
        else:
            if offset is not None:
                image = image - offset.to(device=image.device, dtype=image.dtype)
            converted = _float32(image, name, device, caller, centred=False)
        images.append(converted.expand(batch, *converted.shape[1:]))
    return images[0], images[1]


def _float32_pairs(image: torch.Tensor) -> list[bool]:
    """Per pair of ``image`` ``(b, C, H, W)``: whether register takes it in float32 (a float32 image; a
    pair of an integer image of more than 16 bits whose values stay within float32's 24 bits), not
    float64 (:func:`_integer_float32`)."""
    if is_wide_integer(image):
        return [not wide for wide in wide_pairs(image)]
    return [image.dtype == torch.float32] * image.shape[0]


def _broadcast_pairs(first: list, second: list) -> tuple[list, list]:
    """Two per-pair lists of length 1 or ``B``, each ``B`` long."""
    count = max(len(first), len(second))
    return first * (count // len(first)), second * (count // len(second))


#: ``register(normalize=False)`` refuses a per-pixel loss or local NCC on an image plane whose values
#: (less the offset) are all below this: the square root of float32's smallest normal number, so that
#: every square and product of them, which their cost and gradient are made of, is 0 or subnormal.
_UNDERFLOW = torch.finfo(torch.float32).tiny ** 0.5


def _refuse_underflow(image: torch.Tensor, mask: Optional[torch.Tensor], name: str) -> None:
    """Raise ``ValueError`` naming the pair and channel where a plane of ``image`` (float32, less its
    offset) holds no value of size :data:`_UNDERFLOW` or more (inside its mask): its squares are 0 in
    float32, the cost and gradient 0 everywhere, and the start read "converged"."""
    values = image.abs() if mask is None else image.abs() * mask
    peak = values.amax(dim=(2, 3))  # (B, C)
    small = peak < _UNDERFLOW
    if bool(small.any()):
        pair, channel = (int(index) for index in small.nonzero()[0])
        raise ValueError(
            f"register(): '{name}'{_plane_location(small, pair, channel)} holds values of at most "
            f"{float(peak[pair, channel]):.3g} about its offset, whose squares are below float32's smallest "
            f"number ({torch.finfo(torch.float32).tiny:.3g}), which register computes in: the cost and its "
            "gradient would be 0 everywhere; keep normalize=True, or scale both images")


def _plane_location(flags: torch.Tensor, pair: int, channel: int) -> str:
    """`` in pair 1``, `` in pair 1, channel 0 of 3``, `` in channel 0 of 3`` or nothing: where in a
    ``(B, C)`` set of planes (``flags``) the one at ``(pair, channel)`` is, as much as there is to say."""
    where = f" in pair {pair}" if flags.shape[0] > 1 else ""
    if flags.shape[1] > 1:
        where += f"{',' if where else ' in'} channel {channel} of {flags.shape[1]}"
    return where


def _masked_mean_and_deviation(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation per image and channel over a 0/1 ``mask``
    ``(B or 1, 1, H, W)`` (at least one pixel), each ``(B, C, 1, 1)``, in ``image``'s dtype and on
    its device."""
    mask = mask.to(device=image.device, dtype=image.dtype)
    count = mask.sum(dim=(2, 3), keepdim=True)
    mean = (image * mask).sum(dim=(2, 3), keepdim=True) / count
    return mean, (((image - mean) ** 2) * mask).sum(dim=(2, 3), keepdim=True).div(count).sqrt()


def _mean_and_deviation(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation per image and channel, each ``(B, C, 1, 1)``.

    Two passes: the mean, then ``sqrt(sum (x - mean)^2 / n)`` over chunks of pairs or bands of
    rows (:mod:`tireg._chunks`), so the deviations are never a whole image.  Why not
    ``torch.std_mean``: on the CPU it is a one-pass (Welford) loop, 8x slower (128 x 256^2:
    46 against 5.4 ms, one thread); the difference is float32 rounding (about 1e-7 relative).
    """
    mean = image.mean(dim=(2, 3), keepdim=True)
    squares = image.new_zeros(image.shape[:2])
    for pairs, rows in _chunks.pair_and_row_chunks(image.shape, _chunks.eager_budget(image.device)):
        squares[pairs] += torch.linalg.vector_norm(image[pairs, :, rows] - mean[pairs], dim=(2, 3)).square_()
    return mean, squares.div_(image.shape[-2] * image.shape[-1]).sqrt_()[..., None, None]


# ----------------------------------------------------------------------------
# one level's problem


@dataclass
class _Level:
    """The images of one pyramid level and what maps full-resolution parameters onto it."""

    fixed: torch.Tensor  # (B, C, h, w) normalised
    moving: torch.Tensor
    fixed_weight: Optional[torch.Tensor]  # (B, 1, h, w) or None
    moving_mask: Optional[torch.Tensor]
    shrink: torch.Tensor  # S_f: level -> full-resolution pixels of the fixed image (its crop included)
    shrink_inverse: torch.Tensor  # S_m^-1: full-resolution -> level pixels of the moving image (never cropped)
    axes: tuple[torch.Tensor, torch.Tensor]
    factor: int
    inside_limit: tuple[float, float]  # (1 - 1/W, 1 - 1/H): |u|, |v| within it sample inside the moving image
    cache: dict = field(default_factory=dict)
    # the full-resolution level's (unnormalised moving image, mean, std): the compiled path builds its
    # packed image from it and drops ``moving`` first (a batch's peak memory counts every copy)
    source: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = None  # (raw, mean, std, sigma)

    def pairs(self, part: slice) -> "_Level":
        """The level of the pairs ``part`` (views of its images, a cache of its own but for the
        compiled kernel's packed moving image and coordinates, views too, and the histogram ranges)."""
        pick = lambda tensor: None if tensor is None else tensor[part]  # noqa: E731
        cache = {}
        if "padded" in self.cache:
            cache = {"padded": self.cache["padded"][part], "coordinates": self.cache["coordinates"]}
        if "ranges" in self.cache:  # the histogram ranges, per pair
            cache["ranges"] = tuple(ranges[part] for ranges in self.cache["ranges"])
        if "footprint mask" in self.cache:  # bicubic's eroded moving mask, per pair
            cache["footprint mask"] = self.cache["footprint mask"][part]
        return replace(self, fixed=self.fixed[part], moving=self.moving[part], fixed_weight=pick(self.fixed_weight),
                       moving_mask=pick(self.moving_mask), cache=cache, source=None)

    def select(self, index: torch.Tensor) -> "_Level":
        """The level of the pairs ``index`` (copies of their images, a cache of its own but for the
        histogram ranges, which are per pair): a trial of the pairs still running
        (:func:`_evaluate_active`)."""
        pick = lambda tensor: None if tensor is None else tensor[index]  # noqa: E731
        cache = {}
        if "ranges" in self.cache:
            cache["ranges"] = tuple(pick(ranges) for ranges in self.cache["ranges"])
        if "footprint mask" in self.cache:
            cache["footprint mask"] = pick(self.cache["footprint mask"])
        return replace(self, fixed=self.fixed[index], moving=self.moving[index], fixed_weight=pick(self.fixed_weight),
                       moving_mask=pick(self.moving_mask), cache=cache, source=None)

    def rows(self, part: slice) -> "_Level":
        """The level of the fixed rows ``part`` (views; the moving image whole, a cache of its own
        but for bicubic's eroded moving mask)."""
        weight = None if self.fixed_weight is None else self.fixed_weight[..., part, :]
        cache = {key: self.cache[key] for key in ("footprint mask",) if key in self.cache}
        return replace(self, fixed=self.fixed[..., part, :], fixed_weight=weight,
                       axes=(self.axes[0][part], self.axes[1]), cache=cache, source=None)


@dataclass
class _Evaluation:
    cost: torch.Tensor  # (B,)
    gradient: torch.Tensor  # (B, P): d cost / dp
    hessian: Optional[torch.Tensor]  # (B, P, P) or None
    ecc: Optional[ECCSystem] = None  # NCC's: Levenberg-Marquardt takes the ECC step where it can

    @staticmethod
    def joined(parts: list["_Evaluation"]) -> "_Evaluation":
        """The evaluations of consecutive parts of a batch as one."""
        if len(parts) == 1:
            return parts[0]
        join = lambda values: None if values[0] is None else torch.cat(values)  # noqa: E731
        ecc = None if parts[0].ecc is None else ECCSystem(*map(torch.cat, zip(*[part.ecc for part in parts])))
        return _Evaluation(*(join([getattr(part, name) for part in parts]) for name in ("cost", "gradient", "hessian")),
                           ecc)

    def where(self, keep: torch.Tensor, other: "_Evaluation") -> "_Evaluation":
        """Pair by pair, this evaluation where ``keep`` (``(B,)`` bool), else ``other``."""
        pick = lambda mine, theirs: None if mine is None else torch.where(  # noqa: E731
            keep.view(-1, *[1] * (mine.dim() - 1)), mine, theirs)
        ecc = None if self.ecc is None else ECCSystem(*map(pick, self.ecc, other.ecc))
        return _Evaluation(pick(self.cost, other.cost), pick(self.gradient, other.gradient),
                           pick(self.hessian, other.hessian), ecc)


def _eroded(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask ``(B, 1, H, W)`` less every pixel with a neighbour (of its 3 x 3) outside it; the
    image's border is no such neighbour (beyond it, border padding repeats the edge pixels)."""
    outside = torch.nn.functional.pad(1.0 - mask, (1, 1, 1, 1), mode="replicate")
    return 1.0 - torch.nn.functional.max_pool2d(outside, 3, stride=1)


class _Problem:
    """Cost, gradient and Gauss-Newton matrix of the parameters at one level."""

    def __init__(
        self, kind: Transform, center: torch.Tensor, metric: Metric, interpolation: str, compile: bool = False,
        channels: int = 1,
    ):
        self.kind, self.center, self.metric, self.interpolation = kind, center, metric, interpolation
        self.linear_parts = None  # for a linear kind, A(0) and J (A(p) = A(0) + sum_k p_k J_k), once
        if kind.linear:
            zeros = center.new_zeros(1, kind.num_parameters)
            self.linear_parts = (kind.matrix(zeros, center)[0], kind.jacobian(zeros, center)[0])
        self.loss = metric.loss if isinstance(metric, PerPixelMetric) else None  # Gauss-Newton's rho
        self.irls_constant = None if self.loss is None else constant_irls_weight(self.loss)
        self.by_pair = _independent_pairs(metric)  # then a batch runs in chunks of pairs
        # a per-pixel metric of PerPixelMetric's own cost: one large pair in bands of rows, added up
        self.pixel_parts = _pixel_parts(metric)
        # of those, the metrics whose cost is a function of sums over pixels (tireg.metrics, "Sums of
        # parts"): one large pair's first-order evaluation runs in two passes over bands of rows
        # (NCC's Gauss-Newton system in bands too, on the same condition)
        self.two_pass = self.by_pair and _sums_of_parts(metric)
        # the compiled kernel serves a per-pixel metric's mean (of PerPixelMetric's own cost: it
        # writes sum w rho itself), bilinear, without a moving mask
        self.compile = (
            bool(compile) and self.pixel_parts and self.metric.mean
            and fused.supports(interpolation, "border", self.loss, center.dtype, channels)
        )

    def _level_metric(self, level: _Level) -> Metric:
        """The metric, with histogram ranges taken from this level's whole images (fixed while it runs),
        of the pixels inside their masks: a no-data value beyond a mask (-9999) had set the range,
        squeezed the content into one bin and left a flat cost ("converged" at the start).  A
        metric's own ``set_ranges`` (of the two images only) gets the images."""
        if hasattr(self.metric, "set_ranges"):
            if "ranges" not in level.cache:
                _set_masked_ranges(self.metric, level.moving, level.fixed, level.moving_mask, level.fixed_weight)
                level.cache["ranges"] = self.metric.ranges
            self.metric.ranges = level.cache["ranges"]
        return self.metric

    def matrices(self, params: torch.Tensor, level: _Level) -> tuple[torch.Tensor, torch.Tensor]:
        """Level matrix ``S^-1 A S`` and Jacobian ``S^-1 dA/dp S``.

        For a linear kind (:attr:`Transform.linear`) from the level's parts, made once:
        ``S^-1 A(0) S + sum_k p_k S^-1 J_k S`` (elementwise, so that a pair's matrix does not
        depend on the batch around it), and the constant Jacobian.
        """
        if self.kind.linear:
            if "linear parts" not in level.cache:
                offset, jacobian = self.linear_parts
                level.cache["linear parts"] = (level.shrink_inverse @ offset @ level.shrink,
                                               level.shrink_inverse @ jacobian @ level.shrink)
            offset, jacobian = level.cache["linear parts"]
            matrix = offset + (params[:, :, None, None] * jacobian).sum(1)
            return matrix, jacobian.expand(params.shape[0], -1, -1, -1)
        matrix = self.kind.matrix(params, self.center)
        jacobian = self.kind.jacobian(params, self.center)
        return (
            level.shrink_inverse @ matrix @ level.shrink,
            level.shrink_inverse @ jacobian @ level.shrink,
        )

    def _valid(self, grid: torch.Tensor, level: _Level) -> torch.Tensor:
        """1 where a fixed pixel counts: inside its mask, sampling inside the moving image and its mask."""
        limit_u, limit_v = level.inside_limit  # one comparison per axis: 3x faster than all(dim=-1)
        inside = ((grid[..., 0].abs() <= limit_u) & (grid[..., 1].abs() <= limit_v)).unsqueeze(1).to(grid.dtype)
        if level.fixed_weight is not None:
            inside = inside * level.fixed_weight
        if level.moving_mask is not None:
            # every bilinear tap inside the mask (the sampled 0/1 mask is then 1, to rounding): with
            # "> 0.5", points up to half a pixel into a masked no-data area counted, and their values,
            # blended with it, biased a registration along the whole edge (0.10 px, as with no mask)
            sampled = sample(self._footprint_mask(level), grid, interpolation="bilinear", padding_mode="zeros")
            inside = inside * (sampled > _MASK_FULL).to(grid.dtype)
        return inside

    def _footprint_mask(self, level: _Level) -> torch.Tensor:
        """The level's moving mask whose bilinear test (:meth:`_valid`) is this interpolation's
        footprint test: the mask itself for bilinear (and nearest, whose pixel is one of the four);
        for bicubic, which reads the 4 x 4 pixels ``floor(x) - 1 .. floor(x) + 2``, the mask eroded by
        one pixel (3 x 3), so that a sample counts where the pixels ``floor(x) - 1 .. floor(x) + 2``
        are all in the mask, exactly the 4 x 4 taps (but for a weight below the bilinear test's
        rounding, 1e-4, as there).  The bilinear test had let values under the mask into the cost:
        holes of 50 in a camera image, l2, a cost 1700 x too high.  Beyond the image's border the
        eroded mask is the edge's own: register samples the image with border padding, whose taps
        there are the edge pixels.  Made once per level (kept in its cache).

        Only at the full-resolution level (factor 1), where the exact footprint decides the result:
        a coarse level's pixel is ``factor`` full-resolution pixels, and eroding it took a thin mask
        (a ring 4-6 px wide) away whole (no overlap, no iterations, 0.044 -> 0.236 px); the values
        under the masks are the in-mask mean there (:func:`_filled_outside`), no no-data values.  A
        pair whose eroded mask keeps fewer than :data:`MIN_VALID_PIXELS` pixels keeps its uneroded
        mask (the bilinear test) rather than no overlap at all; counted in cells of 2 x 2 eroded pixels,
        where a point between pixels can pass."""
        if self.interpolation != "bicubic" or level.factor != 1:
            return level.moving_mask
        if "footprint mask" not in level.cache:
            mask = level.moving_mask
            shared = _one_for_every_pair(mask)  # eroded once
            own = mask[:1] if shared else mask
            eroded = _eroded(own)
            # on the device, no host sync: a pair left with too few cells keeps its own mask (cells of 2 x 2
            # eroded pixels, where a point between pixels passes: a 3 px ring eroded to a 1 px line kept
            # 292 pixels and no cell, and ended "no_overlap" where a 2 px ring fell back and converged)
            cells = 1.0 - torch.nn.functional.max_pool2d(1.0 - eroded, 2, stride=1)
            enough = cells.sum(dim=(1, 2, 3), dtype=torch.float64) >= MIN_VALID_PIXELS
            eroded = torch.where(enough.view(-1, 1, 1, 1), eroded, own)
            level.cache["footprint mask"] = eroded.expand(mask.shape) if shared else eroded
        return level.cache["footprint mask"]

    def _irls_weight(
        self, residual: torch.Tensor, derivative: torch.Tensor, scale: torch.Tensor, level: _Level
    ) -> torch.Tensor:
        """IRLS weights ``derivative / r`` where ``derivative = scale rho'(r)``; near ``r = 0`` the
        limit ``scale rho'(eps) / eps`` (``rho'(eps)`` computed once per level).

        ``residual`` is overwritten (the caller's temporary): one image-sized result and
        one temporary, where each image counts in a batch's peak memory.
        """
        eps = fused.IRLS_EPS  # the same limit in the fused kernel
        if "irls_at_eps" not in level.cache:
            _, at_eps = self.loss(level.fixed + eps, level.fixed, True)
            level.cache["irls_at_eps"] = at_eps / eps
        small = residual.abs() < eps
        weight = derivative / residual.masked_fill_(small, eps)
        return torch.where(small, level.cache["irls_at_eps"] * scale, weight, out=weight)

    def grid(self, matrix: torch.Tensor, level: _Level) -> torch.Tensor:
        """The sampling grid, with wild points (an optimiser's trial far off) pinned outside the image.

        Points beyond ``|u| > 2`` are outside either way and do not count; pinning
        them keeps the sampler's arithmetic finite.
        """
        grid = sampling_grid(matrix, level.fixed.shape[-2:], level.moving.shape[-2:], axes=level.axes)
        if grid.requires_grad:  # the autograd path differentiates through it
            return grid.nan_to_num(nan=2.0).clamp(-2.0, 2.0)
        return grid.nan_to_num_(nan=2.0).clamp_(-2.0, 2.0)  # in place: no image-sized temporaries

    def evaluate(self, params: torch.Tensor, level: _Level, *, hessian: bool) -> _Evaluation:
        matrix, flat_jacobian = self._matrix_and_flat_jacobian(params, level)
        fused_result = self._evaluate_fused(matrix, flat_jacobian, level, hessian) if self.compile else None
        if fused_result is not None:
            evaluation, valid_count = fused_result
        else:
            evaluation, valid_count = self._evaluate_eager(matrix, flat_jacobian, level, hessian)
        return _with_overlap(evaluation, valid_count)

    def overlaps(self, params: torch.Tensor, level: _Level) -> torch.Tensor:
        """``(B,)`` bool: whether each pair has :data:`MIN_VALID_PIXELS` valid pixels at ``params``
        (:meth:`evaluate`'s cost is infinite both without them and where it overflows)."""
        _, valid_count = self._evaluate_eager(*self._matrix_and_flat_jacobian(params, level), level, False)
        return valid_count >= MIN_VALID_PIXELS

    def _matrix_and_flat_jacobian(self, params: torch.Tensor, level: _Level) -> tuple[torch.Tensor, torch.Tensor]:
        """The level's matrices ``(B, 3, 3)`` (:meth:`matrices`) and ``dA/dp``'s top rows ``(B, P, 6)``."""
        matrix, jacobian = self.matrices(params, level)
        return matrix, jacobian[:, :, :2, :].reshape(*params.shape, 6)

    def _evaluate_fused(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, level: _Level, hessian: bool
    ) -> Optional[tuple[_Evaluation, torch.Tensor]]:
        """:meth:`_evaluate` by the compiled kernel (:mod:`tireg.fused`), or ``None`` where it cannot run."""
        if level.moving_mask is not None:
            return None
        if "padded" not in level.cache:
            if level.source is not None:  # normalised while packed: the level's copy goes first
                raw, mean, std, smoothing = level.source
                level.moving = level.source = None
                level.cache["padded"] = fused.prepare_moving(raw, "border", normalization=(mean, std),
                                                             smoothing=smoothing)
            else:
                level.cache["padded"] = fused.prepare_moving(level.moving, "border")
            # one band's grid (fused.run_compiled_in_bands): a large image's would be two images
            band = fused.band_rows(*level.fixed.shape[-2:])
            level.cache["coordinates"] = fused.coordinate_grids(level.fixed[..., :band, :])
            # the same pixels inside the kernel's copy: the level's own can go (register drops its
            # reference at full resolution; a batch's peak memory counts every image)
            level.moving = fused.prepared_image(level.cache["padded"], "border")
            level.cache.pop("parts", None)  # its parts' levels (eager evaluations') hold the image that went
        result = fused.run_compiled_in_bands(
            level.fixed, level.cache["padded"], matrix, self.loss, "border", level.fixed_weight,
            inside_only=True, hessian=hessian, coordinates=level.cache["coordinates"],
        )
        if result is None:
            self.compile = False
            return None
        mean = result.mean(level.fixed.shape[1])  # the metric's mean over C sum w
        return _in_parameters(mean.cost, flat_jacobian, mean.matrix_gradient, mean.products), result.count

    def _evaluate_eager(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, level: _Level, hessian: bool
    ) -> tuple[_Evaluation, torch.Tensor]:
        """:meth:`_evaluate` by the reference kernels; for a metric whose pairs are independent
        (:attr:`by_pair`: a per-pixel loss, NCC, local NCC, mutual information and NMI with the
        CPU's histogram) in chunks of pairs of at most
        :func:`tireg._chunks.eager_budget` fixed pixels, and one larger pair in bands of rows where
        the evaluation is a sum over pixels (a per-pixel loss, NCC's Gauss-Newton system) or a
        function of such sums (NCC's, mutual information's and NMI's first-order evaluation: two
        passes, :meth:`_evaluate_in_two_passes`), or of windows (local NCC's: bands with margins,
        :meth:`_evaluate_windows_in_bands`).

        Each per-pixel quantity of an evaluation is an image (about nine in all; local NCC's
        window sums twenty, mutual information's Parzen taps thirty), so a whole batch at once held
        9-17x its input images; a chunk holds them for its pairs only.  A metric of one's own but
        a per-pixel loss's may pool statistics over the batch, and runs whole.
        """
        batch = level.fixed.shape[0]
        pair_pixels = level.fixed.shape[-2] * level.fixed.shape[-1] * level.fixed.shape[1]
        budget = _chunks.eager_budget(level.fixed.device)
        if batch == 1 and pair_pixels > budget:
            if hessian and isinstance(self.metric, NCC) and self.two_pass:  # its system: sums over pixels
                return self._evaluate_ncc(matrix, flat_jacobian, self._bands(level, budget))
            if self.pixel_parts:
                return self._evaluate_in_bands(matrix, flat_jacobian, level, hessian, budget)
            if self.two_pass and not hessian:
                return self._evaluate_in_two_passes(matrix, flat_jacobian, level, budget)
            if self.by_pair and isinstance(self.metric, LocalNCC) and not hessian:
                return self._evaluate_windows_in_bands(matrix, flat_jacobian, level, budget)
        chunks = self.chunks(level, budget)
        if chunks is None:
            return self._evaluate_whole(matrix, flat_jacobian, level, hessian)
        results = [self._evaluate_eager(matrix[part], flat_jacobian[part], pairs, hessian) for part, pairs in chunks]
        return _Evaluation.joined([evaluation for evaluation, _ in results]), torch.cat([count for _, count in results])

    def chunks(self, level: _Level, budget: int) -> Optional[list[tuple[slice, _Level]]]:
        """The level's consecutive chunks of pairs of at most ``budget`` fixed pixels (one pair
        where one is larger), as ``(pairs, their level)`` made once; ``None`` where the batch
        runs whole: one chunk, or a metric whose pairs may not be independent (:attr:`by_pair`).
        The histogram ranges are taken from the level's whole images first."""
        batch = level.fixed.shape[0]
        parts = _chunks.chunk_slices(batch, level.fixed[0].numel(), budget)
        if not self.by_pair or len(parts) == 1:
            return None

        def make() -> list[tuple[slice, _Level]]:
            self._level_metric(level)  # the ranges go with the pairs' levels
            return [(part, level.pairs(part)) for part in parts]

        return self._parts(level, "chunks", budget, make)

    def _parts(self, level: _Level, kind: str, key: Any, make: Callable[[], list]) -> list:
        """The levels of ``level``'s parts of one ``kind`` (chunks of pairs, bands of rows), made
        once for each ``key`` (the budget).  One entry of its cache holds them all: they view its
        moving image, and go with it when the compiled path drops it (:meth:`_evaluate_fused`).
        Bicubic's eroded moving mask is made first, for the parts to share (a band's own would be
        an image-sized copy of the whole mask per band)."""
        parts = level.cache.setdefault("parts", {})
        if kind not in parts or parts[kind][0] != key:
            if level.moving_mask is not None:
                self._footprint_mask(level)
            parts[kind] = (key, make())
        return parts[kind][1]

    def _bands(self, level: _Level, budget: int) -> list[_Level]:
        """The level of one pair in bands of rows of at most ``budget`` fixed pixels, made once."""
        channels, height, width = level.fixed.shape[1:]
        return self._parts(level, "bands", budget, lambda: [
            level.rows(part) for part in _chunks.chunk_slices(height, width * channels, budget)])

    def _evaluate_windows_in_bands(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, level: _Level, budget: int
    ) -> tuple[_Evaluation, torch.Tensor]:
        """The first-order :meth:`_evaluate` of one pair of :class:`~tireg.metrics.LocalNCC` larger
        than ``budget`` fixed pixels, in bands of rows, each sampled with a margin of
        :attr:`~tireg.metrics.LocalNCC.margin` rows each side (its windows, and those they reach,
        whole: :meth:`~tireg.metrics.LocalNCC.part`).

        The pair's derivative depends on its other bands only through its count ``n``, so one
        pass: each band's score sum ``S_b``, count ``n_b`` and ``D_b = n d cost / d x``; the cost
        ``1 - sum S_b / n`` and the gradient's moments ``sum_b (moments of D_b) / n``.  The margins
        are sampled twice (a 2^16-pixel band of a 1024-pixel-wide image at ``r = 4``: 64 rows and
        16 of margin).
        """
        metric = self.metric
        channels = level.fixed.shape[1]
        scores, counts, moments = [], [], []
        for band, own, own_level in self._window_bands(level, budget):
            grid, valid, values = self._sampled(matrix, band)
            score, count, derivative = metric.part(values, band.fixed, valid, own)
            del values, valid
            scores.append(score)
            counts.append(count)
            moments.append(self._gradient_moments(derivative, grid[:, own], own_level))
        count = torch.stack(counts).sum(0)
        cost, inverse_count = metric.cost_of_sums(torch.stack(scores).sum(0), count, gradient=True)
        g_moments = torch.stack(moments).sum(0) * inverse_count[:, None, None]
        return _in_parameters(cost, flat_jacobian, g_moments, None), count / channels

    def _window_bands(self, level: _Level, budget: int) -> list[tuple[_Level, slice, _Level]]:
        """Local NCC's bands of one pair (:meth:`_evaluate_windows_in_bands`), made once: each as
        ``(its rows with the margins, its own rows within them, the level of its own rows)``."""
        channels, height, width = level.fixed.shape[1:]
        margin = self.metric.margin
        return self._parts(level, "windows", (budget, margin), lambda: [
            (level.rows(around), own, level.rows(slice(around.start + own.start, around.start + own.stop)))
            for around, own in _chunks.bands_with_margins(height, width * channels, budget, margin)])

    def _evaluate_in_bands(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, level: _Level, hessian: bool, budget: int
    ) -> tuple[_Evaluation, torch.Tensor]:
        """:meth:`_evaluate` of one pair larger than ``budget`` fixed pixels, in bands of rows
        (:attr:`pixel_parts`: a per-pixel metric's own cost).

        A band's cost, gradient and Gauss-Newton matrix are its sums divided by its own
        count ``n_b = C sum w`` (the metric's mean); the level's are
        ``sum_b n_b (band's) / n``, with ``n`` the whole level's count (both at least 1, as
        the metric's); a sum's (``mean=False``) add up (:func:`_bands_combined`).
        """
        results = [self._evaluate_whole(matrix, flat_jacobian, band, hessian) for band in self._bands(level, budget)]
        evaluations = [evaluation for evaluation, _ in results]
        counts = torch.stack([count for _, count in results])  # (bands, B)
        combined = functools.partial(_bands_combined, counts=counts, channels=level.fixed.shape[1],
                                     mean=self.metric.mean)
        evaluation = _Evaluation(
            combined([evaluation.cost for evaluation in evaluations]),
            combined([evaluation.gradient for evaluation in evaluations]),
            None if not hessian else combined([evaluation.hessian for evaluation in evaluations]),
        )
        return evaluation, counts.sum(0)

    def _evaluate_whole(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, level: _Level, hessian: bool
    ) -> tuple[_Evaluation, torch.Tensor]:
        """:meth:`_evaluate` of the whole ``level`` at once, and its count of valid pixels per pair."""
        if hessian and isinstance(self.metric, NCC):
            return self._evaluate_ncc(matrix, flat_jacobian, [level])
        grid = self.grid(matrix, level)
        valid = self._valid(grid, level)
        valid_count = valid.sum(dim=(1, 2, 3))
        return self._evaluate(grid, valid, valid_count, flat_jacobian, level, hessian), valid_count

    def _evaluate(self, grid, valid, valid_count, flat_jacobian, level: _Level, hessian: bool) -> _Evaluation:
        if hessian:  # Gauss-Newton: a per-pixel metric, its IRLS weights and the normal matrix
            values, gradients = sample_with_gradient(
                level.moving, grid, interpolation=self.interpolation, padding_mode="border"
            )  # gradients (B, C, 2, h, w) in level pixels
            # each pixel's weight s = w / n (the metric's mean), made once: the metric's derivative
            # is s rho'(r), the IRLS weight s rho'(r) / r (for L2 the number 2 s)
            scale = self.metric.term_weights(level.fixed, valid, weight_sum=valid_count)
            cost, derivative = self.metric.weighted(values, level.fixed, scale, gradient=True)
            # the per-pixel images whose moments a step needs, in one buffer for one grid_moments
            # call: the metric's gradient (gx, gy) summed over channels, then the products
            # (gx gx, gx gy, gy gy) weighted by the IRLS weight, summed over channels
            pixels = gradients.new_empty(gradients.shape[0], 5, *gradients.shape[3:])  # (B, 5, h, w)
            _channel_sum(derivative.unsqueeze(2), gradients, out=pixels[:, :2])
            irls = scale * self.irls_constant if self.irls_constant is not None else self._irls_weight(
                values - level.fixed, derivative, scale, level)
            del values, derivative  # no longer needed: a batch's peak memory counts every image
            gx, gy = gradients[:, :, 0], gradients[:, :, 1]
            _channel_sum((irls * gx).unsqueeze(2), gradients, out=pixels[:, 2:4])  # w gx (gx, gy)
            # in place where the weights are an image of the channels' shape (a constant IRLS weight
            # gives one per pixel, (B, 1, h, w), shared by the channels)
            _channel_sum(irls.mul_(gy) if irls.shape == gy.shape else irls * gy, gy, out=pixels[:, 4])
            # (B, 5, 6): moments (x^2, xy, y^2, x, y, 1); the gradient's are its last three
            # the unchecked forms on this per-evaluation path: the inputs are made here (the public
            # functions' shape checks cost a few microseconds each, most of a small level's time)
            moments = _grid_moments(pixels, level.axes, False, True)
            g_moments, h_moments = moments[:, :2, 3:], moments[:, 2:]
            return _in_parameters(cost, flat_jacobian, g_moments, h_moments)
        values = sample(level.moving, grid, interpolation=self.interpolation, padding_mode="border")
        cost, derivative = self._level_metric(level)(values, level.fixed, valid, gradient=True)
        del values  # before the sampler's derivative: a batch's peak memory counts every image
        return _in_parameters(cost, flat_jacobian, self._gradient_moments(derivative, grid, level), None)

    def _gradient_moments(self, derivative: torch.Tensor, grid: torch.Tensor, level: _Level) -> torch.Tensor:
        """``d cost / d A`` ``(B, 2, 3)`` in the level's pixels from the metric's derivative with
        respect to the warped values: through the sampler to the grid (its normalised
        coordinates), then the first-order moments ``sum g (x, y, 1)`` over the level's axes."""
        g_normalized = _sampler_gradient(derivative, level.moving, grid, INTERPOLATIONS[self.interpolation],
                                         PADDING_MODES["border"])
        scale = shared_pixel_scale(level.moving.shape[-2:], like=grid)
        return _grid_moments(g_normalized, level.axes, True, False) * scale[:, None]

    def _sampled(self, matrix: torch.Tensor, level: _Level) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grid, valid, values)`` of ``level`` at ``matrix``: the sampling grid, the valid pixels
        (:meth:`_valid`, of the grid's values: no graph) and the warped moving image, both through
        autograd where ``matrix`` requires grad."""
        grid = self.grid(matrix, level)
        valid = self._valid(grid.detach(), level)
        return grid, valid, sample(level.moving, grid, interpolation=self.interpolation, padding_mode="border")

    def _band_sums(self, matrix: torch.Tensor, bands: list[_Level], metric: Metric, *, merge: bool = True
                   ) -> tuple[list, torch.Tensor]:
        """The first pass over one pair's ``bands`` (without a graph): each band's ``metric.sums``
        and the pair's count of valid pixels ``(B,)``.  The sums as one merged part (a running
        merge: mutual information's are a histogram a band, 4 MiB at 1024 bins), or with
        ``merge=False`` one part a band (what differentiating NCC's merge needs)."""
        parts, count = [], 0
        with torch.no_grad():
            for band in bands:
                _, valid, values = self._sampled(matrix, band)
                count = count + valid.sum(dim=(1, 2, 3))
                part = metric.sums(values, band.fixed, valid)
                parts = [metric.merged_sums([*parts, part])] if merge else [*parts, part]
        return parts, count

    def _evaluate_in_two_passes(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, level: _Level, budget: int
    ) -> tuple[_Evaluation, torch.Tensor]:
        """The first-order :meth:`_evaluate` of one pair larger than ``budget`` fixed pixels, for a
        metric whose cost is a function of sums over pixels (:attr:`two_pass`: NCC, mutual
        information, NMI), in bands of rows.

        Its derivative at a pixel needs the whole pair's sums (NCC's means and norms, the joint
        histogram), so two passes: each band's ``sums``, merged (:meth:`~tireg.metrics.NCC.merged_sums`),
        give the cost; then each band's derivative with the pair's sums gives its part of the
        gradient's moments, which add up.  The second pass samples again rather than keep the
        warped image: one image less at the peak (one 1024^2 pair of mi peaked at 17x its input
        whole).
        The histogram ranges are the level's (its whole images), as for the whole pair.
        """
        metric = self._level_metric(level)
        bands = self._bands(level, budget)
        (sums,), count = self._band_sums(matrix, bands, metric)
        cost, terms = metric.cost_of_sums(sums, gradient=True)  # the derivative's terms, made once
        moments = 0
        for band in bands:
            grid, valid, values = self._sampled(matrix, band)
            derivative = metric.derivative(values, band.fixed, valid, terms)
            del values, valid
            moments = moments + self._gradient_moments(derivative, grid, band)
        return _in_parameters(cost, flat_jacobian, moments, None), count

    def _evaluate_ncc(
        self, matrix: torch.Tensor, flat_jacobian: torch.Tensor, bands: list[_Level]
    ) -> tuple[_Evaluation, torch.Tensor]:
        """Cost, gradient and Gauss-Newton matrix of :class:`~tireg.metrics.NCC` (the ECC step,
        :meth:`~tireg.metrics.NCC.ecc_gradient`), and the count of valid pixels, from sums over
        ``bands`` (a level whole, or one pair's bands of rows).

        In matrix space a value's Jacobian row is ``a = vec(grad M q^T)`` (``q = (x, y, 1)`` its pixel), so
        :meth:`~tireg.metrics.NCC.ecc_system`'s sums ``sum c a`` are the first-order moments of
        ``c grad M`` (``c`` one of ``w``, ``w x~``, ``w y~``) and ``sum w a a^T`` the per-pixel
        path's normal matrix of weight ``w``: nine images, each summed over channels, through one
        buffer of three in turn.  A band's deviations are from its own means; with ``d_b`` its
        mean's offset from the pair's, ``sum w x~ a = sum_b (sum_b w x~_b a + d_b sum_b w a)``
        (:meth:`~tireg.metrics.NCCStatistics.merged` for the scalar sums).  One 2048^2 pair's peak
        over its start was 19 images with all nine at once, 13 with the buffer, 3.0 in bands (l2's).
        """
        statistics, first, middle, products, counts = [], [], [], [], []
        for band in bands:
            grid = self.grid(matrix, band)
            valid = self._valid(grid, band)
            counts.append(valid.sum(dim=(1, 2, 3)))
            values, gradients = sample_with_gradient(band.moving, grid, interpolation=self.interpolation,
                                                     padding_mode="border")  # gradients (B, C, 2, h, w)
            del grid
            deviations = self.metric.deviations(values, band.fixed, valid)
            del values, valid
            weight, gx, gy = deviations.weight, gradients[:, :, 0], gradients[:, :, 1]
            buffer = gradients.new_empty(gradients.shape[0], 3, *gradients.shape[3:])
            # (B, 3, 6): the moments (x^2, xy, y^2, x, y, 1) of the buffer's three images
            moments = lambda: _grid_moments(buffer, band.axes, False, True)  # noqa: E731, B023
            _channel_sum(weight, gx, out=buffer[:, 0])
            _channel_sum(weight, gy, out=buffer[:, 1])
            _channel_sum(deviations.x, gx, out=buffer[:, 2])
            first.append(moments())  # w (gx, gy), w x~ gx
            _channel_sum(deviations.x, gy, out=buffer[:, 0])
            _channel_sum(deviations.y.unsqueeze(2), gradients, out=buffer[:, 1:])
            middle.append(moments())  # w x~ gy, w y~ (gx, gy)
            statistics.append(deviations.statistics)
            deviations = None  # its images go before the products are made
            _channel_sum((weight * gx).unsqueeze(2), gradients, out=buffer[:, :2])  # w gx (gx, gy)
            _channel_sum(weight * gy, gy, out=buffer[:, 2])
            products.append(moments())
        merged = NCCStatistics.merged(statistics)
        batch = matrix.shape[0]
        total = [part[:, :2, 3:].reshape(batch, 6) for part in first]
        along_x = [torch.cat([head[:, 2, 3:], tail[:, 0, 3:]], 1) for head, tail in zip(first, middle)]
        along_y = [part[:, 1:, 3:].reshape(batch, 6) for part in middle]
        if len(bands) > 1:  # each band's deviations to the pair's means
            along_x = [part + (own.x_mean - merged.x_mean)[:, None] * own_total
                       for part, own, own_total in zip(along_x, statistics, total)]
            along_y = [part + (own.y_mean - merged.y_mean)[:, None] * own_total
                       for part, own, own_total in zip(along_y, statistics, total)]
        added = lambda parts: parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)  # noqa: E731
        system = self.metric.ecc_system(merged, _assemble_hessian(added(products)), added(total), added(along_x),
                                        added(along_y))
        vector = lambda matrix_space: (flat_jacobian @ matrix_space[..., None])[..., 0]  # noqa: E731
        system = ECCSystem(flat_jacobian @ system.centred @ flat_jacobian.transpose(1, 2), vector(system.image),
                           vector(system.template), system.ncc)  # in the parameters
        evaluation = _Evaluation(self.metric.cost_of(system.ncc), *self.metric.normal_equations(system), ecc=system)
        return evaluation, added(counts)


def _channel_sum(first: torch.Tensor, second: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``out = sum_c first * second`` over dimension 1 (the channels), broadcasting the rest;
    with one channel a single product written straight into ``out``."""
    if first.shape[1] == 1 and second.shape[1] == 1:
        return torch.mul(first[:, 0], second[:, 0], out=out)
    return torch.sum(first * second, 1, out=out)


# Hessian in matrix space: H[(i, a), (j, b)] = sum w g_i g_j m_a m_b, with gradient components
# i, j in (x, y), coordinates a, b in (x, y, 1).  grid_moments' second order gives, per product
# (gx gx, gx gy, gy gy), the monomials (xx, xy, yy, x, y, 1).
_PRODUCT = [[0, 1], [1, 2]]
_MONOMIAL = [[0, 1, 3], [1, 2, 4], [3, 4, 5]]
_HESSIAN_PRODUCT = tuple(_PRODUCT[i // 3][j // 3] for i in range(6) for j in range(6))
_HESSIAN_MONOMIAL = tuple(_MONOMIAL[i % 3][j % 3] for i in range(6) for j in range(6))


def _in_parameters(
    cost: torch.Tensor, flat_jacobian: torch.Tensor, matrix_gradient: torch.Tensor, products: Optional[torch.Tensor]
) -> _Evaluation:
    """Matrix-space moments -> parameter space: ``g = J vec(G)`` and ``H = J H_A J^T``, with ``J``
    the ``(B, P, 6)`` flat Jacobian, ``G`` ``(B, 2, 3)`` and ``products`` ``(B, 3, 6)`` or ``None``."""
    batch = flat_jacobian.shape[0]
    gradient = (flat_jacobian @ matrix_gradient.reshape(batch, 6, 1)).squeeze(-1)
    if products is None:
        return _Evaluation(cost, gradient, None)
    return _Evaluation(cost, gradient, flat_jacobian @ _assemble_hessian(products) @ flat_jacobian.transpose(1, 2))


def _assemble_hessian(moments: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 6)`` product moments -> ``(B, 6, 6)`` normal matrix in ``vec(A[:2, :])`` order."""
    batch = moments.shape[0]
    # index tables on the moments' device (a CPU index would be copied over in every call)
    products = constant(_HESSIAN_PRODUCT, like=moments, dtype=torch.long)
    monomials = constant(_HESSIAN_MONOMIAL, like=moments, dtype=torch.long)
    return moments[:, products, monomials].reshape(batch, 6, 6)


# ----------------------------------------------------------------------------
# optimisers


@dataclass
class IterationState:
    """What a ``callback`` of :func:`register` sees after every iteration; raise ``StopIteration`` to stop.

    Attributes:
        level: the pyramid level's index, 0 for the coarsest.
        factor: its shrink factor (1: full resolution).
        iteration: the iteration within the level, from 0.
        cost: ``(B,)``, each pair's cost at the level's resolution.
        matrix: ``(B, 3, 3)``, each pair's current matrix, fixed -> moving in full-resolution pixels.
        active: ``(B,)`` bool, the pairs still moving at this level.
    """

    level: int
    factor: int
    iteration: int
    cost: torch.Tensor
    matrix: torch.Tensor
    active: torch.Tensor


class _Stop(Exception):
    """The callback asked to stop; ``outcome`` is the interrupted level's, as the level returns it
    (``(params, iterations, reasons, costs, rows)``): the result keeps the progress the callback saw;
    ``active`` ``(B,)``, the pairs it interrupted (the others had stopped at the level)."""

    outcome: Optional[tuple] = None
    active: Optional[torch.Tensor] = None


def _with_overlap(evaluation: _Evaluation, valid_count: torch.Tensor) -> _Evaluation:
    """``evaluation`` where a pair has :data:`MIN_VALID_PIXELS` valid pixels (``valid_count``
    ``(B,)``) or more; elsewhere an infinite cost and zero derivatives.  Too little overlap is no
    match at all: an infinite cost that no step is taken towards, never a small cost of a few
    pixels (or a NaN of none; l2 of no overlap read 0, better than any match)."""
    overlap = valid_count >= MIN_VALID_PIXELS
    # on the CPU a look is free and saves the masking; on a GPU it would wait for the device
    if _looks_are_free(overlap.device) and bool(overlap.all()):
        return evaluation
    return evaluation.where(overlap, _Evaluation(
        torch.full_like(evaluation.cost, math.inf), torch.zeros_like(evaluation.gradient),
        None if evaluation.hessian is None else torch.zeros_like(evaluation.hessian),
        None if evaluation.ecc is None else ECCSystem(*map(torch.zeros_like, evaluation.ecc))))


def _bands_combined(values: Sequence[torch.Tensor], counts: torch.Tensor, channels: int, mean: bool
                    ) -> torch.Tensor:
    """A per-pixel metric's value of one pair from its bands' ``values``: for a mean (each band's
    over its own count ``n_b = C sum w``) ``sum_b n_b value_b / n``, ``n = sum_b n_b``, both clamped
    as the metric's (:func:`tireg.metrics._mean_count`; ``counts`` ``(bands, B)``, the valid pixels
    ``sum w``); for a sum
    (``mean=False``) the sum of the bands'."""
    if not mean:
        return sum(values)
    total = _mean_count(counts.sum(0), channels)  # (B,)
    fractions = _mean_count(counts, channels) / total
    return sum(fraction.view(-1, *[1] * (value.dim() - 1)) * value for fraction, value in zip(fractions, values))


def _image_corners(size: Sequence[int], dtype: torch.dtype, device: Optional[torch.device] = None) -> torch.Tensor:
    """The corner pixels of an ``(H, W)`` image as homogeneous points ``(4, 3)``: where the
    convergence tests and the start's and the inverse's checks measure how far a matrix moves it."""
    height, width = size
    return torch.tensor([[0.0, 0.0, 1.0], [width - 1.0, 0.0, 1.0], [0.0, height - 1.0, 1.0],
                         [width - 1.0, height - 1.0, 1.0]], dtype=dtype, device=device)


def _corner_distance(first: torch.Tensor, second: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """The largest distance (pixels) between where matrices ``first`` and ``second`` ``(..., 3, 3)``
    send the ``corners`` ``(4, 3)`` (:func:`_image_corners`), per matrix: ``(...)``.  Per matrix, not
    over a batch: a tolerance of one pair's scale (:func:`_corner_reach`) is that pair's own."""
    return ((first - second)[..., :2, :] @ corners.T).norm(dim=-2).amax(dim=-1)


def _corner_reach(matrix: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """The largest ``|A| |x|`` over the ``corners`` (the scale against which rounding of ``matrix``
    moves them), per matrix: ``(...)``."""
    return (matrix[..., :2, :].abs() @ corners.abs().T).amax(dim=(-2, -1))


def _displacement(problem: _Problem, before: torch.Tensor, step: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Largest distance in full-resolution pixels that a corner of the fixed image moves from
    parameters ``before`` to ``before + step`` (in their dtype: float64 measures a step that
    float32 parameters would round away), per pair ``(B,)``.

    In elementwise operations only: a batched product may round by the batch's size (another BLAS
    kernel for one pair than for several), and what this decides (a pair's convergence, the
    length of its L-BFGS step) must be each pair's own, bit for bit."""
    difference = _step_difference(problem, before, step)
    moved = (difference[:, None, :2, :] * corners.to(difference.dtype)[None, :, None, :]).sum(-1)  # (B, 4, 2)
    return moved.norm(dim=-1).amax(dim=-1)


def _within_radius(extent: torch.Tensor, radius: torch.Tensor, active: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The trust region's cap, ``(capped, shrink)`` ``(B,)``: which ``active`` pairs' step moves a corner
    ``extent`` beyond their ``radius``, and the factor that brings it back to the radius (1 elsewhere).
    One rule for Gauss-Newton's ECC step and each L-BFGS iteration's first trial."""
    capped = active & (extent > radius)
    return capped, torch.where(capped, radius / extent, 1.0)


def _next_radius(radius: torch.Tensor, capped: torch.Tensor, kept: torch.Tensor, base: float) -> torch.Tensor:
    """The trust region's next radius ``(B,)``: twice as far after a capped step that was kept whole, the
    same after an uncapped one, back to ``base`` after a step that was not (rejected or shortened)."""
    return torch.where(kept, torch.where(capped, 2.0 * radius, radius), base)


def _step_difference(problem: _Problem, before: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``A(before + step) - A(before)`` ``(B, 3, 3)``."""
    if problem.kind.linear:  # A(before + step) - A(before) = sum_k step_k J_k
        return (step[:, :, None, None] * problem.linear_parts[1].to(step.dtype)).sum(1)
    both = problem.kind.matrix(torch.cat([before + step, before]), problem.center.to(before.dtype))  # one call
    return both[: before.shape[0]] - both[before.shape[0]:]


#: On a GPU, how many iterations run between the host's looks at the pairs' convergence flags,
#: after a level's first :data:`EARLY_LOOKS`.  Each look (``bool(active.any())``) waits for all
#: queued work, a host synchronisation that leaves the GPU idle while the next launches are
#: queued; between looks the flags, stop reasons and iteration counts stay on the device, and a
#: pass after every pair has stopped changes nothing.  On the CPU a look costs nothing and a
#: wasted pass a full evaluation: it looks every time.
DEVICE_CHECK_INTERVAL = 4

#: On a GPU, the host also looks at each of a level's first iterations: most Gauss-Newton levels
#: end within a few (a pyramid hands each level a start near its optimum; 125 of the 128 levels of
#: ``accuracy.py``'s 32 cases at 256 x 256 ended within 8), and looking only every
#: :data:`DEVICE_CHECK_INTERVAL` iterations ran up to three passes after such a level had ended,
#: each a full evaluation: one 512 x 512 pair's ``register`` ran 25 evaluations instead of 9 (as
#: on a GPU, on the CPU).  A look costs the GPU a pause of about one launch, where a wasted pass
#: costs a whole evaluation's launches or kernels.
EARLY_LOOKS = 8

# stop reasons as device codes while a level runs (one host transfer at its end)
_MAX_ITERATIONS, _CONVERGED, _STALLED = 0, 1, 2
_REASON_NAMES = ("max_iterations", "converged", "stalled")


def _looks_are_free(device: torch.device) -> bool:
    """Whether the host reads a device value at no cost (the CPU), or waits for queued work (a GPU)."""
    return device.type == "cpu"


def _check_interval(device: torch.device, callback) -> int:
    """Iterations between host looks at the convergence flags (:data:`DEVICE_CHECK_INTERVAL`)."""
    return 1 if _looks_are_free(device) or callback is not None else DEVICE_CHECK_INTERVAL


def _should_look(iteration: int, interval: int) -> bool:
    """Whether the host looks at the flags in ``iteration``: each of the first :data:`EARLY_LOOKS`,
    then every ``interval``."""
    return iteration < EARLY_LOOKS or (iteration + 1) % interval == 0


def _level_outcome(status: torch.Tensor, iterations: torch.Tensor, costs: list, passes: list,
                   rows: torch.Tensor) -> tuple:
    """Device state of a finished level -> ``(iterations, reasons, costs, rows)`` on the host.

    ``passes`` holds, per loop pass after the first cost, whether any pair was still active in
    it; passes after the last such one (run only because the host had not looked) are dropped
    from the cost history, which then equals that of a loop looking every iteration.  ``rows``
    ``(B,)``: how many of the history's rows are each pair's own (its start, then a row for each
    pass it was active in), the length of its history alone (:attr:`LevelHistory.lengths`).
    """
    kept = 1 + (int(torch.stack(passes).sum()) if passes else 0)
    reasons = [_REASON_NAMES[code] for code in status.tolist()]
    return iterations.cpu(), reasons, torch.stack(costs[:kept]), rows.cpu()


def _notify(callback, level_index: int, level: _Level, iteration: int, cost, problem, params, active) -> None:
    if callback is None:
        return
    state = IterationState(
        level_index, level.factor, iteration, cost.detach().clone(), problem.kind.matrix(params, problem.center),
        active.clone(),
    )
    try:
        callback(state)
    except StopIteration:
        raise _Stop() from None


def _gauss_newton(problem, level, params, *, max_iterations, tolerance, corners, callback, level_index):
    """Levenberg-Marquardt from ``params``; returns ``(params, iterations, reasons, costs, rows)`` per pair
    (:func:`_level_outcome`).

    Nothing inside the loop waits for the device but a look at the convergence flags in the
    iterations :func:`_should_look` names (and a callback's).
    """
    batch, device = params.shape[0], params.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    status = torch.full((batch,), _MAX_ITERATIONS, dtype=torch.int8, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    damping = torch.full((batch,), 1e-3, dtype=torch.float64, device=device)
    first_damping = damping.clone()
    # NCC (its evaluations carry the ECC system): how far ECC's next trial step may go, per pair
    # (full-resolution pixels); none for the per-pixel losses, whose loop keeps its operations
    radius = None
    interval = _check_interval(device, callback)
    current = problem.evaluate(params, level, hessian=True)
    if current.ecc is not None:
        radius = torch.full((batch,), ECC_RADIUS * level.factor, dtype=params.dtype, device=device)
    # the costs kept as they are: every evaluation's are new tensors, never changed in place
    costs, passes = [current.cost], []
    rows = torch.ones(batch, dtype=torch.long, device=device)  # each pair's own rows of the history
    subsets: dict = {}  # _evaluate_active's levels of the pairs still active
    largest = torch.finfo(current.cost.dtype).max
    for iteration in range(max_iterations):
        # (H + damping diag(H) + floor I) step = -g, in float64: the damping and the floor on
        # the diagonal of a copy
        # with the pair's damping and, for the stop test below, the first damping, in one solve
        dampings = torch.stack([damping, first_damping])
        gradient, damped = current.gradient.to(torch.float64), _damped(current.hessian, dampings)
        if current.ecc is not None:  # NCC: ECC's least-squares problem where its step exists
            system = ECCSystem(*(part.to(torch.float64) for part in current.ecc))
            centred = _damped(system.centred, dampings)
            ecc_gradient, ok = problem.metric.ecc_gradient(system, centred[1])
            gradient = torch.where(ok[:, None], ecc_gradient, gradient)
            damped = torch.where(ok[:, None, None], centred, damped)
        # solve_ex: linalg.solve would wait for the device to check for a singular matrix; a
        # singular one gives a non-finite step here, whose trial is rejected like any worse one
        solution, _ = torch.linalg.solve_ex(damped, gradient.neg()[..., None].expand(2, -1, -1, 1))
        step, free_step = solution[..., 0].to(params.dtype)
        displacement = _displacement(problem, params, step, corners)
        if radius is not None:  # ECC's trial steps capped at the pair's radius (ECC_RADIUS)
            # (not the free step of the stall test below: capped, it tied with the coarse levels'
            # stall limit, which is the same level pixel)
            capped, shrink = _within_radius(displacement, radius, ok)
            step, displacement = step * shrink[:, None], displacement * shrink
        # A proposed step this small ends the level without the evaluation that would try it
        # (the most expensive part of an iteration; near the optimum noise decides the sign of
        # so tiny a cost change). On a coarse level the step is taken: the next level starts
        # from it and judges it. On the finest it is left, so that the cost matches the result.
        # The step is small, too, where rejected steps raised the damping: that is convergence
        # only if the nearly undamped step (the first damping) is small as well; else the pair is stuck
        # ("stalled") where the model does not predict the cost (docs/design.md, "Convergence").
        limit = tolerance * level.factor
        small = active & (displacement < limit)
        free_limit = max(STALL_FACTOR * limit, STALL_FLOOR * level.factor)
        stuck = small & (_displacement(problem, params, free_step, corners) >= free_limit)
        converged = small ^ stuck
        status = torch.where(converged, _CONVERGED, torch.where(stuck, _STALLED, status))
        if level.factor > 1:
            params = torch.where(converged[:, None], params + step, params)
        active = active ^ small  # active & ~small (small pairs are active ones): one operation
        any_active = active.any()
        # the look that saves an evaluation: before the trial, after the convergence test
        if _should_look(iteration, interval) and not bool(any_active):
            break
        passes.append(any_active)
        rows += active
        step = torch.where(active[:, None], step, 0.0)
        trial_params = params + step
        trial = _evaluate_active(lambda p, on: problem.evaluate(p, on, hessian=True), trial_params, level, active,
                                 subsets)
        # better: a finite trial cost no higher than the current one; comparing with the current
        # cost capped at the largest finite number rejects an infinite or NaN trial cost
        # (isfinite is four operations)
        better = active & (trial.cost <= current.cost.clamp_max(largest))
        params = torch.where(better[:, None], trial_params, params)
        current = trial.where(better, current)
        damping = torch.where(better, (damping * 0.3).clamp_min(1e-9), damping * 10.0)
        # a capped step that did not raise the cost: the next may go twice as far; a rejected one: back to
        # ECC_RADIUS (a trust region's rule; with a fixed pixel a step, a 20-degree turn at one level
        # took over 50 iterations)
        if radius is not None:
            radius = _next_radius(radius, capped, better, ECC_RADIUS * level.factor)
        iterations += active
        stalled = (active ^ better) & (damping > 1e6)  # better pairs are active ones
        status = torch.where(stalled, _STALLED, status)
        active = active ^ stalled
        costs.append(current.cost)
        try:
            _notify(callback, level_index, level, iteration, current.cost, problem, params, active)
        except _Stop as stop:
            stop.outcome = (params, *_level_outcome(status, iterations, costs, passes, rows))
            stop.active = active
            raise
        # where looks are free, a stalled level also ends without the next solve (on a GPU the
        # next iteration's look, before its trial, ends it)
        if interval == 1 and not bool(active.any()):
            break
    return (params, *_level_outcome(status, iterations, costs, passes, rows))


def _damped(matrix: torch.Tensor, dampings: torch.Tensor) -> torch.Tensor:
    """``H + damping diag(H) + floor I`` in float64 for each of ``dampings`` ``(D, B)``: ``(D, B, P, P)``,
    the floor ``1e-9`` of the largest diagonal entry (at least ``1e-21``)."""
    damped = matrix.to(torch.float64)[None].repeat(dampings.shape[0], 1, 1, 1)
    diagonal = damped.diagonal(dim1=-2, dim2=-1)
    floor = diagonal[0].amax(dim=1, keepdim=True).mul_(1e-9).clamp_min_(1e-21)
    diagonal.mul_(dampings[..., None] + 1.0).add_(floor)
    return damped


#: A compiled kernel call costs about as much as evaluating this many pixels (EPYC, one thread: about
#: 0.23 ms, 5.5 ns a pixel): a trial of the active pairs as runs of consecutive pairs, a call each,
#: pays where the stopped pairs it skips hold more (a batch of 128 x 64^2, every other pair active:
#: 64 runs 16.1 ms, the whole batch 2.8 ms; 16 x 256^2, 8 runs: 4.4 against 5.9 ms).
RUN_PIXELS = 1 << 16

#: On the CPU a Gauss-Newton trial evaluates only the pairs still active once they are at most this
#: fraction of the batch (the reference path copies their images for it: two image passes against
#: an evaluation's ten or so, worth it only when enough pairs have stopped; the compiled kernel
#: takes runs of consecutive pairs as views, a kernel call each).
COMPACT_FRACTION = 0.75


def _evaluate_active(evaluate: Callable[[torch.Tensor, _Level], _Evaluation], params: torch.Tensor,
                     level: _Level, active: Optional[torch.Tensor], subsets: dict, *,
                     always: bool = False) -> _Evaluation:
    """``evaluate(params, level)`` of every pair, or of the ``active`` pairs only where that pays: on
    the CPU (where a look at ``active`` is free; ``always``: anywhere, for a caller that looks
    already) once they are at most :data:`COMPACT_FRACTION` of the batch.  The others read an
    infinite cost (never better) and zero derivatives.  Pairs finish a level at different
    iterations (32 affine pairs of 128^2: 2-10 iterations in all, the batch's full-resolution level
    8 evaluations).  ``subsets`` keeps the pairs' levels (:meth:`_Level.select`'s copies, or the
    compiled kernel's runs of views, :data:`RUN_PIXELS`) while they stay the same.  Each pair's
    values are those it has alone (batch invariance)."""
    batch = params.shape[0]
    if active is None or batch == 1 or not (always or _looks_are_free(params.device)):
        return evaluate(params, level)
    count = int(active.sum())
    if count == 0 or count > COMPACT_FRACTION * batch:
        return evaluate(params, level)
    index = active.nonzero()[:, 0]
    key = tuple(index.tolist())
    if key not in subsets:
        subsets.clear()  # one set at a time: the levels of the last one are all that is kept
        if "padded" not in level.cache:
            subsets[key] = [(index, level.select(index))]
        else:
            # the compiled kernel's level: runs of consecutive pairs as views, which share its packed
            # moving image (copies of the active pairs' images had raised the peak of a batch of
            # 128 x 256^2 from 2.9x to 3.9x its input), where their calls cost less than the
            # stopped pairs would; otherwise the whole batch (None)
            runs = _runs(key)
            saved = (batch - count) * level.fixed[0].numel()
            subsets[key] = [(run, level.pairs(run)) for run in runs] if len(runs) * RUN_PIXELS <= saved else None
    if subsets[key] is None:
        return evaluate(params, level)
    part = _Evaluation.joined([evaluate(params[pairs], subset) for pairs, subset in subsets[key]])
    spread = lambda values: None if values is None else values.new_zeros(  # noqa: E731
        batch, *values.shape[1:]).index_copy(0, index, values)
    return _Evaluation(
        part.cost.new_full((batch,), math.inf).index_copy(0, index, part.cost),
        spread(part.gradient.to(part.cost.dtype)),
        spread(part.hessian),
        None if part.ecc is None else ECCSystem(*map(spread, part.ecc)),
    )


def _runs(indices: Sequence[int]) -> list[slice]:
    """Increasing ``indices`` as slices of consecutive ones: ``(0, 1, 2, 5, 7, 8)`` -> ``0:3, 5:6, 7:9``."""
    runs, start = [], 0
    for position in range(1, len(indices) + 1):
        if position == len(indices) or indices[position] != indices[position - 1] + 1:
            runs.append(slice(indices[start], indices[position - 1] + 1))
            start = position
    return runs


_FIRST_ORDER_DEFAULTS = {
    "adam": (torch.optim.Adam, dict(lr=0.1)),
    "sgd": (torch.optim.SGD, dict(lr=0.5, momentum=0.5)),
    # a few inner iterations per step: with one, the strong-Wolfe search stalls on the first step
    "lbfgs": (torch.optim.LBFGS, dict(lr=1.0, max_iter=5, line_search_fn="strong_wolfe")),
}


#: One pair's autograd bands (:func:`_autograd_in_bands`) of mutual information, NMI and local NCC
#: take this fraction of the eager budget: a band's graph of theirs holds three to four times the
#: images of a per-pixel loss's or NCC's (one 1024^2 pair, L-BFGS, peak over input at the eager
#: budget / half / a quarter: mi 3.29 / 3.05 / 3.00x, the analytic path 2.95x; local NCC 3.10 / 2.73
#: / 2.72x; l2 and ncc 2.76x and 2.79x at the eager budget).  Each halving costs a tenth to a
#: quarter of the evaluation's time (bands, and local NCC's margins, more often).
AUTOGRAD_BAND_DIVISOR = 2


def _autograd_evaluation(problem: _Problem, params: torch.Tensor, level: _Level) -> _Evaluation:
    """The same cost as :meth:`_Problem.evaluate`, its gradient by ``backward()``; in the
    analytic path's chunks of pairs (:meth:`_Problem.chunks`), each with its own graph, freed
    before the next is built (a graph holds its images: 64 x 256^2 with l2 peaked at 8.4x its
    input whole, 2.7x in chunks), and one larger pair in bands of rows
    (:func:`_autograd_in_bands`)."""
    budget = _chunks.eager_budget(level.fixed.device)
    chunks = problem.chunks(level, budget)
    if chunks is not None:
        return _Evaluation.joined([_autograd_evaluation(problem, params[part], pairs) for part, pairs in chunks])
    if level.fixed.shape[0] == 1 and level.fixed[0].numel() > budget and problem.by_pair:
        graph_heavy = problem.loss is None and not isinstance(problem.metric, NCC)  # mi, nmi, lncc
        banded = _autograd_in_bands(problem, params, level,
                                    budget // AUTOGRAD_BAND_DIVISOR if graph_heavy else budget)
        if banded is not None:
            cost, gradient_of_matrix, valid_count = banded
            with torch.enable_grad():
                params = params.detach().requires_grad_(True)
                matrix, _ = problem.matrices(params, level)
                (gradient,) = torch.autograd.grad(matrix, params, gradient_of_matrix)
            return _with_overlap(_Evaluation(cost, gradient, None), valid_count)
    with torch.enable_grad():
        params = params.detach().requires_grad_(True)
        matrix, _ = problem.matrices(params, level)
        _, valid, values = problem._sampled(matrix, level)
        cost = problem._level_metric(level)(values, level.fixed, valid)
        (gradient,) = torch.autograd.grad(cost.sum(), params)
    return _with_overlap(_Evaluation(cost.detach(), gradient, None), valid.sum(dim=(1, 2, 3)))


def _autograd_in_bands(problem: _Problem, params: torch.Tensor, level: _Level, budget: int
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The cost ``(1,)`` of one pair larger than ``budget`` fixed pixels, its gradient with
    respect to the level matrix ``A`` ``(1, 3, 3)`` by ``backward()`` and its count of valid pixels
    ``(1,)`` (for :func:`_with_overlap`), in the bands of rows of the
    analytic path, each band's graph (from the matrix, a leaf) freed before the next; ``None``
    for a metric that cannot be split (the pair then runs whole).  One 1024^2 pair whole held
    its graph: images of every intermediate (l2 about 8x its input, mutual information 18x).

    - A per-pixel metric of its own cost (:attr:`_Problem.pixel_parts`): the pair's cost and
      gradient are its bands' weighted by their counts, ``sum_b n_b c_b / n``, or their sums
      (:func:`_bands_combined`).
    - A function of sums over pixels (:attr:`_Problem.two_pass`: NCC, mutual information, NMI):
      first each band's ``sums``, without a graph; then ``d cost / d sums_b`` by autograd
      through ``cost_of_sums(merged_sums(...))`` (for additive sums, the histograms' counts, once
      for all bands; NCC's eight numbers a band through their merge); then each band again, its
      sums differentiated with those as their gradients (a vector-Jacobian product).
    - Local NCC: each band with its margins (:meth:`_Problem._window_bands`), ``1 - sum_b S_b / n``
      with ``S_b`` its own rows' score sum.
    """
    metric = problem._level_metric(level)
    with torch.no_grad():
        matrix = problem.matrices(params, level)[0]

    def band_gradient(band: _Level, outputs: Callable[[torch.Tensor, torch.Tensor, _Level], tuple]
                      ) -> torch.Tensor:
        """``d <outputs, their gradients> / d A`` of one band (``outputs(values, valid, band)``
        gives ``(tensors, gradients)``), its graph freed on return."""
        with torch.enable_grad():
            leaf = matrix.detach().requires_grad_(True)
            _, valid, values = problem._sampled(leaf, band)
            tensors, gradients = outputs(values, valid, band)
            (gradient,) = torch.autograd.grad(tensors, leaf, gradients, allow_unused=True)
        return torch.zeros_like(matrix) if gradient is None else gradient

    if problem.pixel_parts:
        costs, counts, gradients = [], [], []
        for band in problem._bands(level, budget):
            def mean(values, valid, band):
                cost = metric(values, band.fixed, valid)
                costs.append(cost.detach())
                counts.append(valid.sum(dim=(1, 2, 3)))
                return (cost,), (torch.ones_like(cost),)
            gradients.append(band_gradient(band, mean))
        counts = torch.stack(counts)
        combined = functools.partial(_bands_combined, counts=counts, channels=level.fixed.shape[1], mean=metric.mean)
        return combined(costs), combined(gradients), counts.sum(0)
    if problem.two_pass:
        bands = problem._bands(level, budget)
        parts, count = problem._band_sums(matrix, bands, metric, merge=metric.additive_sums)
        with torch.enable_grad():
            leaves = [type(part)(*(value.detach().requires_grad_(True) for value in part)) for part in parts]
            cost = metric.cost_of_sums(metric.merged_sums(leaves))
            flat = [value for part in leaves for value in part]
            adjoints = torch.autograd.grad(cost.sum(), flat, allow_unused=True)
        fields = len(parts[0])
        adjoints = [adjoints[index * fields:(index + 1) * fields] for index in range(len(parts))]
        gradient = torch.zeros_like(matrix)
        for index, band in enumerate(bands):
            adjoint = adjoints[0 if metric.additive_sums else index]

            def sums(values, valid, band, adjoint=adjoint):
                pairs = [(value, slope) for value, slope in zip(metric.sums(values, band.fixed, valid), adjoint)
                         if slope is not None and value.requires_grad]
                return tuple(value for value, _ in pairs), tuple(slope for _, slope in pairs)
            gradient = gradient + band_gradient(band, sums)
        return cost.detach(), gradient, count
    if isinstance(metric, LocalNCC):
        scores, counts, gradient = [], [], torch.zeros_like(matrix)
        for band, own, _ in problem._window_bands(level, budget):
            def score(values, valid, band, own=own):
                total, count, _ = metric.part(values, band.fixed, valid, own, gradient=False)
                scores.append(total.detach())
                counts.append(count)
                return (total,), (torch.ones_like(total),)
            gradient = gradient + band_gradient(band, score)
        count = torch.stack(counts).sum(0)  # C sum w
        cost, inverse_count = metric.cost_of_sums(torch.stack(scores).sum(0), count, gradient=True)
        return cost, gradient * -inverse_count[:, None, None], count / level.fixed.shape[1]
    return None


def _gauss_newton_serves(metric: Metric) -> bool:
    """Whether Levenberg-Marquardt can minimise ``metric`` (with analytic gradients): a per-pixel loss
    (:class:`PerPixelMetric`: its loss and term weights) or NCC (its ECC system), each by the class's
    own cost: a subclass that changes the cost (its ``__call__``) is not what those describe.  L-BFGS
    for the others, one of one's own that says ``per_pixel`` too.  (The command line checks its
    options by this rule before it reads an image.)"""
    return _own_cost(metric, (PerPixelMetric, NCC))


def _check_optimizer_options(optimizer: str, options: Optional[dict], caller: str) -> None:
    """``optimizer_options`` go to a ``torch.optim`` optimiser: raise here, naming them, if
    Gauss-Newton would ignore them or the optimiser rejects them (tried on a dummy parameter)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise TypeError(f"{caller}: 'optimizer_options' must be a dict; got {type(options).__name__}")
    if optimizer == "gauss-newton":
        if options:
            raise ValueError(f"{caller}: 'optimizer_options' {options!r} apply to 'adam', 'lbfgs' and 'sgd'; "
                             "Gauss-Newton takes none")
        return
    for key, value in options.items():  # torch.optim takes lr=inf, and the first step makes every parameter NaN
        numbers = [real_number(number) for number in (value if isinstance(value, (tuple, list)) else (value,))]
        if any(number is not None and not math.isfinite(number) for number in numbers):
            raise ValueError(f"{caller}: 'optimizer_options' {key}={value!r} must be finite")
    # torch.optim takes lr=0 and L-BFGS max_iter=0, and every parameter then stays where it began,
    # its step "below the tolerance": the level reported converged at the start
    for key in ("lr", "max_iter"):
        number = real_number(options[key]) if key in options else 1.0
        if number is None or not number > 0:
            raise ValueError(f"{caller}: 'optimizer_options' {key} must be a number above 0; got {options[key]!r}")
    constructor, defaults = _FIRST_ORDER_DEFAULTS[optimizer]
    if optimizer == "lbfgs" and options.get("line_search_fn", None) not in (None, "strong_wolfe"):
        # torch.optim.LBFGS takes any value and fails only in its first step
        raise ValueError(f"{caller}: 'optimizer_options' line_search_fn must be None or 'strong_wolfe'; "
                         f"got {options['line_search_fn']!r}")
    try:
        constructor([torch.zeros(1, requires_grad=True)], **{**defaults, **options})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{caller}: 'optimizer_options' {options!r} rejected by torch.optim.{constructor.__name__}: "
                         f"{error}") from None


class _BatchedLBFGS:
    """L-BFGS for a batch of independent problems, in lockstep: every pair has its own curvature
    history, step length and stopping tests, and every evaluation is of the whole batch.

    ``torch.optim.LBFGS`` over a ``(B, P)`` tensor takes one step length for the whole vector, and its
    curvature pairs are inner products over it: a pair's result depended on the others (0.2 px for
    pairs of different contrast; 0.004-0.035 px, several times the tolerance, with the default
    metrics).  One ``torch.optim.LBFGS`` per pair fixed that, at 7.5x the time of a batch of 64
    pairs of 64^2 (one evaluation per pair per line-search trial, and on a GPU a host read each).

    Per pair ``i``, as ``torch.optim.LBFGS`` (Nocedal and Wright, *Numerical Optimization*, 2nd ed.,
    Algorithm 7.4): the direction ``d = -H g`` by the two-loop recursion over the pair's last
    ``history_size`` pairs ``(s, y)`` with ``s'y > 1e-10``, ``H0 = s'y / y'y``; its first iteration
    ``d = -g``, step ``min(1, 1 / |g|_1) lr``, later ones ``lr``.  The line search
    (``line_search_fn="strong_wolfe"``, tireg's default) is a backtracking one here: until
    ``f(x + t d) <= f(x) + 1e-4 t g'd`` (Armijo), at most 25 trials, each step the minimum of the
    quadratic through ``f(0)``, ``f'(0)`` and the last trial, within ``[0.1 t, 0.5 t]`` (a strong-Wolfe
    zoom per pair does not vectorise); ``None``: the step ``t`` as it is.  A pair's inner loop stops,
    as torch's, when ``max |g| <= tolerance_grad``,
    ``max |t d| <= tolerance_change`` or its cost changes by less than ``tolerance_change``; a step
    holds at most ``max_iter`` iterations and ``max_eval`` evaluations, but each iteration tries
    its step at least once, and a pair whose search the budget cut off before it moved at all goes
    on searching in its next step (``searching``: not converged) while its next trial would move it
    by ``min_search`` or more (``max_iter=1`` gives ``max_eval`` 1, spent by the step's start).
    ``uninformed``: the pairs whose last iteration was their first, whose short step is no sign of
    convergence (``register`` runs them on).  Adds the batch's host reads once per iteration and
    trial, not once per pair.

    ``reach(x, s)``: how far (the largest corner displacement, in the level's pixels) a step ``s``
    from ``x`` moves the image, per pair; given, each iteration's first trial goes at most the pair's
    radius, from ``radius`` (:data:`ECC_RADIUS`) and as Gauss-Newton's ECC step: twice as far after a
    capped step that its first trial took, back to ``radius`` after a step the search had to shorten.
    The curvature pairs (``H0 = s'y / y'y``) know nothing of the images' extent: on a flat stretch of
    the cost ``y`` is tiny and the direction thousands of pixels long, and Armijo accepts a point on a
    sliver of overlap whose mutual information is optimistic (an ``mi`` affine pair 6.7 px off jumped
    1063 px at its first level and ended "degenerate" 1130 px off; 0.02 px capped).
    """

    def __init__(self, x: torch.Tensor, *, lr: float = 1.0, max_iter: int = 20, max_eval: Optional[int] = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: Optional[str] = None, min_search: float = 0.0,
                 reach: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 radius: float = ECC_RADIUS):
        self.lr, self.max_iter = float(lr), int(max_iter)
        self.max_eval = int(max_eval) if max_eval is not None else self.max_iter * 5 // 4
        self.tolerance_grad, self.tolerance_change = float(tolerance_grad), float(tolerance_change)
        self.line_search = line_search_fn is not None
        batch, size = x.shape
        self.memory = max(1, int(history_size))
        # each pair's last `memory` curvature pairs in a ring of its own: slot (position - 1 - k) % memory
        # holds its k-th newest (a shared list would give a pair's slots to the others' updates)
        self.steps = x.new_zeros(batch, self.memory, size)
        self.changes = x.new_zeros(batch, self.memory, size)
        self.rho = x.new_zeros(batch, self.memory)
        self.position = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.count = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.filled = 0  # the most any pair holds, bounded on the host (a read of count would wait on a GPU)
        self.scale = x.new_ones(batch)  # H0 per pair
        self.last_step = torch.zeros_like(x)  # each pair's s = t d of its last iteration
        self.last_gradient = torch.zeros_like(x)  # and its gradient before it
        self.has_last = torch.zeros(batch, dtype=torch.bool, device=x.device)
        self.started = torch.zeros(batch, dtype=torch.bool, device=x.device)
        # a pair whose line search the budget cut off before it moved at all in a step: the step length
        # it would have tried next, which its next step starts from (NaN: none), and whether it is
        # searching still (not converged), while that trial would move it by min_search or more
        self.retry = torch.full((batch,), math.nan, dtype=x.dtype, device=x.device)
        self.searching = torch.zeros(batch, dtype=torch.bool, device=x.device)
        self.min_search = float(min_search)
        # a pair whose last iteration was its first (d = -g, its length min(1, 1/|g|_1) lr): a step of
        # no curvature, whose length says nothing of the distance to the minimum (not converged)
        self.uninformed = torch.zeros(batch, dtype=torch.bool, device=x.device)
        # how far each pair's next first trial may move the image (level pixels), where reach is given
        self.reach, self.base_radius = reach, float(radius)
        self.radius = x.new_full((batch,), self.base_radius)

    def _remember(self, useful: torch.Tensor, step: torch.Tensor, change: torch.Tensor, rho: torch.Tensor) -> None:
        """Add ``(s, y, 1 / s'y)`` to the rings of the ``useful`` pairs."""
        slots = torch.arange(self.memory, device=useful.device)
        slot = useful[:, None] & (slots == (self.position % self.memory)[:, None])
        self.steps = torch.where(slot[..., None], step[:, None, :], self.steps)
        self.changes = torch.where(slot[..., None], change[:, None, :], self.changes)
        self.rho = torch.where(slot, rho[:, None], self.rho)
        self.position = self.position + useful
        self.count = (self.count + useful).clamp_max(self.memory)
        self.filled = min(self.filled + 1, self.memory)

    def _direction(self, gradient: torch.Tensor) -> torch.Tensor:
        """``-H g`` per pair by the two-loop recursion over its own ring, newest first (a pair's slots
        past its count have ``rho = 0`` and zero ``s``, ``y``: they change nothing)."""
        entries = []
        for k in range(self.filled):
            slot = ((self.position - 1 - k) % self.memory)[:, None]
            rho = torch.where(k < self.count, self.rho.gather(1, slot)[:, 0], 0.0)  # 0: the pair has no k-th
            index = slot[..., None].expand(-1, 1, gradient.shape[1])
            entries.append((self.steps.gather(1, index)[:, 0], self.changes.gather(1, index)[:, 0], rho))
        q = -gradient
        alphas = []
        for s, y, rho in entries:
            alpha = rho * (s * q).sum(1)
            q = q - alpha[:, None] * y
            alphas.append(alpha)
        r = q * self.scale[:, None]
        for (s, y, rho), alpha in zip(reversed(entries), reversed(alphas)):
            beta = rho * (y * r).sum(1)
            r = r + s * (alpha - beta)[:, None]
        return r

    def step(self, evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
             active: torch.Tensor, current: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to ``max_iter`` iterations from ``x`` of the ``active`` pairs; ``evaluate(x)`` gives every
        pair's ``(cost (B,), gradient (B, P))`` (``evaluate(x, pending)``: those of the ``pending`` pairs,
        the others' are not read), and ``current`` is that at ``x`` where known (the
        last step's end: not evaluated again, but counted, as torch's first evaluation of a step).
        Returns ``(x, cost, gradient)`` at the end."""
        cost, gradient = evaluate(x) if current is None else current
        evaluations = torch.ones_like(self.count)  # per pair: its own budget of max_eval
        still = torch.ones_like(active)  # pairs that have not moved in this step
        running = active & (gradient.abs().amax(dim=1) > self.tolerance_grad)
        self.uninformed = self.uninformed & ~active  # of this step's iterations (none: a gradient at rest)
        for _ in range(self.max_iter):
            if not bool(running.any()):
                break
            # the curvature pair of each running pair's last iteration
            change = gradient - self.last_gradient
            curvature = (self.last_step * change).sum(1)
            useful = running & self.has_last & (curvature > 1e-10)
            self._remember(useful, self.last_step, change, 1.0 / torch.where(useful, curvature, 1.0))
            self.scale = torch.where(useful, curvature / (change * change).sum(1).clamp_min(1e-300), self.scale)
            first = running & ~self.started
            direction = torch.where(first[:, None], -gradient, self._direction(gradient))
            step = torch.where(first, (1.0 / gradient.abs().sum(1).clamp_min(1e-300)).clamp_max(1.0) * self.lr,
                               torch.full_like(cost, self.lr))
            step = torch.where(running & torch.isfinite(self.retry), self.retry, step)  # a search cut off goes on
            capped = torch.zeros_like(running)
            if self.reach is not None:  # at most the pair's radius (its step's farthest corner)
                capped, shrink = _within_radius(self.reach(x, step[:, None] * direction), self.radius, running)
                step = step * shrink
            slope = (gradient * direction).sum(1)
            running = running & (slope <= -self.tolerance_change)  # not a descent direction: stop
            self.started = self.started | running
            self.uninformed = torch.where(running, first, self.uninformed)
            # the line search, the whole batch at every trial; pairs not pending stay where they are
            pending, new_x, new_cost, new_gradient = running, x, cost, gradient
            accepted_step = torch.zeros_like(step)
            blocked = torch.zeros_like(running)
            whole = torch.zeros_like(running)  # the first trial accepted: the step went as far as it might
            # an iteration's first trial whatever the budget, later ones within it: checked before every
            # trial, max_iter=1 (max_eval 1, spent by the step's start) let nothing move, and register
            # called the start converged.  Unlike torch's search, which takes up to 25 trials and meets
            # the budget after: in lockstep every pair would wait for the slowest (64 x 64^2, ncc: 140
            # evaluations instead of 33)
            for trial in range(25 if self.line_search else 1):
                if trial:
                    blocked = blocked | (pending & (evaluations >= self.max_eval))
                    pending = pending & (evaluations < self.max_eval)
                if not bool(pending.any()):
                    break
                trial_x = torch.where(pending[:, None], x + step[:, None] * direction, new_x)
                trial_cost, trial_gradient = evaluate(trial_x, pending)  # the pending pairs' values only
                evaluations = evaluations + pending
                good = pending & torch.isfinite(trial_cost)
                if self.line_search:  # Armijo's sufficient decrease
                    good = good & (trial_cost <= cost + 1e-4 * step * slope)
                new_x = torch.where(good[:, None], trial_x, new_x)
                new_cost = torch.where(good, trial_cost, new_cost)
                new_gradient = torch.where(good[:, None], trial_gradient, new_gradient)
                accepted_step = torch.where(good, step, accepted_step)
                if trial == 0:
                    whole = good
                pending = pending & ~good
                # the minimum of the quadratic through f(0), f'(0) and f(t), kept within [0.1 t, 0.5 t]
                # (Nocedal and Wright, section 3.5): fewer trials than halving
                rise = (trial_cost - cost - slope * step).clamp_min(1e-300)
                quadratic = (-slope * step * step / (2.0 * rise)).nan_to_num(nan=0.0, posinf=0.0)  # a NaN trial: 0.1 t
                step = torch.where(pending, torch.minimum(torch.maximum(quadratic, 0.1 * step), 0.5 * step), step)
            # a search the budget cut off goes on in the next step, from the step length it reached (so
            # that max_iter=1 still gets there); one that ran out of trials has nowhere to go
            moved = running & (accepted_step > 0)  # a pair no step of which was accepted stops here
            if self.reach is not None:  # a trust region's rule, as ECC_RADIUS's
                self.radius = torch.where(running, _next_radius(self.radius, capped, whole, self.base_radius),
                                          self.radius)
            cut = blocked & still & ((step[:, None] * direction).abs().amax(dim=1) >= self.min_search)
            self.retry = torch.where(running, torch.where(cut, step, math.nan), self.retry)
            self.searching = torch.where(running, cut, self.searching)
            still = still & ~moved
            taken = accepted_step[:, None] * direction
            self.last_step = torch.where(moved[:, None], taken, self.last_step)
            self.last_gradient = torch.where(moved[:, None], gradient, self.last_gradient)
            self.has_last = torch.where(running, moved, self.has_last)
            done = ((new_gradient.abs().amax(dim=1) <= self.tolerance_grad)
                    | (taken.abs().amax(dim=1) <= self.tolerance_change)
                    | ((new_cost - cost).abs() < self.tolerance_change)
                    | (evaluations >= self.max_eval))
            x, cost, gradient = new_x, new_cost, new_gradient
            running = moved & ~done
        return x, cost, gradient


def _first_order(problem, level, params, *, name, options, gradients, max_iterations, tolerance, corners, callback,
                 level_index):
    """A first-order optimiser on scaled parameters ``p = p0 + D q`` (one unit of q ~ one level pixel):
    ``torch.optim``'s Adam and SGD, which update each parameter on its own (one optimiser serves the
    batch), or :class:`_BatchedLBFGS`, whose pairs are independent as well."""
    batch, device = params.shape[0], params.device
    start = params.detach()
    # D: parameter change that moves the farthest corner by one level pixel, per parameter
    jacobian = problem.kind.jacobian(start, problem.center)  # full resolution
    reach = (corners @ jacobian[:, :, :2, :].transpose(-1, -2)).norm(dim=-1).amax(dim=-1)  # (B, P) px per unit
    scales = level.factor / reach.clamp_min(1e-12)
    constructor, defaults = _FIRST_ORDER_DEFAULTS[name]
    q = torch.zeros_like(start, requires_grad=name != "lbfgs")
    settings = {**defaults, **(options or {})}
    # (L-BFGS: a line search cut off by max_eval goes on in the next step while its trial would move
    # the image by the tolerance or more: one unit of q is about one level pixel)
    if name == "lbfgs":  # each step bounded in the level's pixels (ECC_RADIUS, as Gauss-Newton's ECC step)
        def reach(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:  # in the level's pixels
            return _displacement(problem, start + x * scales, step * scales, corners) / level.factor

        optim = _BatchedLBFGS(q, **settings, min_search=tolerance, reach=reach)
    else:
        optim = constructor([q], **settings)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    status = torch.full((batch,), _MAX_ITERATIONS, dtype=torch.int8, device=device)
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    interval = _check_interval(device, callback)
    evaluate_on = (lambda p, on: problem.evaluate(p, on, hessian=False)) if gradients == "analytic" else (
        lambda p, on: _autograd_evaluation(problem, p, on))
    subsets: dict = {}  # _evaluate_active's level of the pairs evaluated last
    first = evaluate_on(start, level)
    # The lowest cost seen per pair, and where: what the level returns, so that an optimiser's
    # excursion (a line search far off, a step to NaN) never ends a pair worse than it began;
    # and whether the last evaluation's cost was finite (Adam's and SGD's: at the step's start).
    best = {"cost": first.cost.detach().clone(), "params": start.clone(), "finite": torch.isfinite(first.cost)}

    def cost_and_gradient(scaled: torch.Tensor, pending: Optional[torch.Tensor] = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair's cost (a non-finite one as 1e30, for the optimiser's arithmetic) and gradient in
        ``q`` at ``scaled``; the best kept, with its cost as it is (inf in the history, not 1e30).

        ``pending``: only these pairs are evaluated (the others read cost 1e30, gradient 0, and are not
        kept): a batched L-BFGS trial of a few pairs evaluated them all, 33 batch evaluations where a
        pair alone took about 20 (ncc, 64 x 64^2).  Each pair's result is its own either way."""
        trial = start + scaled.detach() * scales
        # L-BFGS looks at its pending pairs anyway (always=True); Adam and SGD on the CPU
        evaluation = _evaluate_active(evaluate_on, trial, level, pending, subsets, always=name == "lbfgs")
        found, gradient = evaluation.cost, evaluation.gradient.to(trial.dtype)
        best["finite"] = torch.isfinite(found)
        cost = torch.where(best["finite"], found, torch.full_like(found, 1e30))
        gradient = torch.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0)
        # (an infinite or NaN cost is never lower: the best cost stays inf where no finite one was seen)
        improved = active & (found < best["cost"]) & torch.isfinite(trial).all(dim=1)
        best["cost"] = torch.where(improved, found, best["cost"])
        best["params"] = torch.where(improved[:, None], trial, best["params"])
        return cost, torch.where(active[:, None], gradient * scales, torch.zeros_like(gradient))

    def closure():
        optim.zero_grad()
        cost, q.grad = cost_and_gradient(q, active)  # a stopped pair's gradient is 0 either way
        return (cost * active).sum()

    costs, passes = [first.cost], []
    rows = torch.ones(batch, dtype=torch.long, device=device)  # each pair's own rows of the history
    quiet = torch.zeros(batch, dtype=torch.long, device=device)
    largest = torch.zeros(batch, dtype=torch.float64, device=device)  # Adam's and SGD's longest step so far
    wide = start.to(torch.float64), scales.to(torch.float64)  # where a step is measured
    # L-BFGS starts a step where the last one ended, already evaluated (the first: at q = 0, `first`)
    current = None if name != "lbfgs" else (
        torch.where(torch.isfinite(first.cost), first.cost, torch.full_like(first.cost, 1e30)),
        torch.nan_to_num(first.gradient, nan=0.0, posinf=0.0, neginf=0.0) * scales)
    for iteration in range(max_iterations):
        passes.append(active.any())
        rows += active
        before_q = q.detach().clone()
        before = start + before_q * scales
        if name == "lbfgs":
            with torch.no_grad():
                found, *current = optim.step(cost_and_gradient, q, active, tuple(current))
                q.copy_(found)
        else:
            optim.step(closure)
        with torch.no_grad():
            # a pair that left the finite numbers stops where this step began (its best is kept);
            # so does an Adam or SGD pair whose step began where the cost is not finite (off the
            # images' overlap: its gradient there is 0, and its momentum only carries it further)
            broken = ~torch.isfinite(q).all(dim=1)
            if name != "lbfgs":
                broken = broken | ~best["finite"]
            status = torch.where(broken & active, _STALLED, status)
            active = active & ~broken
            q.copy_(torch.where(active[:, None], q, (before - start) / scales))
        after = start + q.detach() * scales
        # the step the optimiser took, measured in float64: the float32 parameters round a short one
        # (lr=1e-6) to nothing or to noise, which read as a pair at rest ("converged" at the start)
        moved = _displacement(problem, wide[0] + before_q.to(torch.float64) * wide[1],
                              (q.detach() - before_q).to(torch.float64) * wide[1], corners)
        iterations += active
        small = moved < tolerance * level.factor
        if name == "lbfgs":  # a pair whose line search the budget cut off has not converged: it goes on
            # and neither has one whose step was only its first iteration, d = -g of length
            # min(1, 1/|g|_1) lr, set by the gradient's size and not by any curvature: with max_iter
            # 1 or 2 (max_eval 1 or 2: one iteration a step) that step was all of the first, short
            # for a steep cost, and every level "converged" there (0.19 px off, 0.01 with the
            # defaults).  The next step has a curvature pair; a pair whose gradient is below
            # tolerance_grad takes no iteration and converges as before
            small = small & ~optim.searching & ~optim.uninformed
        else:  # short against the level's largest step: near the minimum, not held back by lr
            largest = torch.maximum(largest, torch.where(active, moved, torch.zeros_like(moved)))
            # (<=: a pair that never moves, at its optimum from the start, converges; 0 < 0 ran it
            # to max_iterations at every level, 900 steps for 9.  Measured in float64 a step is 0
            # only where the gradient is: lr > 0 is required)
            small = small & (moved <= FIRST_ORDER_STEP_FRACTION * largest)
        quiet = torch.where(small, quiet + 1, torch.zeros_like(quiet))
        # one L-BFGS step holds several inner iterations; stochastic-looking Adam/SGD steps need a run
        converged = active & (quiet >= (1 if name == "lbfgs" else 3))
        status = torch.where(converged, _CONVERGED, status)
        active = active & ~converged
        costs.append(best["cost"].detach().clone())
        try:
            _notify(callback, level_index, level, iteration, best["cost"], problem, after, active)
        except _Stop as stop:
            stop.outcome = (best["params"], *_level_outcome(status, iterations, costs, passes, rows))
            stop.active = active
            raise
        if _should_look(iteration, interval) and not bool(active.any()):
            break
    return (best["params"], *_level_outcome(status, iterations, costs, passes, rows))


# ----------------------------------------------------------------------------
# register


#: Kinds whose matrices never mirror: an ``init`` with a negative determinant has no parameters there.
_ORIENTATION_KEEPING = ("translation", "rigid", "similarity")


def _check_start(matrix: torch.Tensor, kind: Transform, caller: str, name: str) -> None:
    """A start matrix (``init``, or the matrix of a model given as ``transform``) must be finite,
    affine, not singular and, for a kind that never mirrors, not mirroring: otherwise the kind's
    parameters of it are meaningless.  An anisotropic start is fine (a line scanner's 25:1 is a
    legitimate geometry): the end's test (:func:`_degenerate`) judges a result's squeeze relative to
    its start's.  Of a batch of matrices ``(B, 3, 3)``, the error names the pairs."""
    matrices = matrix.reshape(-1, 3, 3)
    finite = torch.isfinite(matrices).flatten(1).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{caller}: '{name}' matrix{of_pairs(~finite, 'of')} contains NaN or Inf")
    last = matrices[:, 2, :] - constant((0.0, 0.0, 1.0), like=matrices)
    projective = ~(last.abs().amax(dim=1) <= 1e-6)
    if matrices.shape[0] > 1 and bool(projective.any()):  # (one matrix: check_affine's own words)
        row = matrices[int(projective.nonzero()[0]), 2].tolist()
        raise ValueError(f"{caller}: '{name}'{of_pairs(projective, 'of')} must be affine, with last row (0, 0, 1); "
                         f"got {row} (a projective matrix is not supported)")
    check_affine(matrix, caller, name)
    determinant = torch.linalg.det(matrices[:, :2, :2])
    singular = ~(determinant.abs() > 1e-9)
    if bool(singular.any()):
        raise ValueError(f"{caller}: '{name}' matrix{of_pairs(singular, 'of')} is singular (its 2 x 2 part has "
                         "determinant 0)")
    mirrors = ~(determinant > 0)
    if kind.name in _ORIENTATION_KEEPING and bool(mirrors.any()):
        raise ValueError(f"{caller}: '{name}' matrix{of_pairs(mirrors, 'of')} mirrors the image (negative "
                         f"determinant), which a {kind.name} transform cannot; use transform='affine'")


def _initial_matrix(init, fixed, moving, kind: Transform, center, caller: str,
                    search: Optional[torch.Tensor] = None, negate_moving: bool = False,
                    masks: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
                    start: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The start ``(B, 3, 3)`` float64 that ``init`` names or gives, and each pair's initialiser score ``(B,)``
    (:func:`tireg.initialize._scored_initialize`, ``search`` its pairs that may search, ``negate_moving``
    for ``-moving``, ``masks`` the fixed and the moving mask, ``start`` ``auto``'s quick starts and scores
    found before, for its search to improve on; NaN for a given matrix)."""
    batch = fixed.shape[0]
    if isinstance(init, torch.Tensor) and init.is_meta:  # Tensor.item() raised inside
        raise TypeError(f"{caller}: 'init' is a meta tensor, which holds no values")
    if isinstance(init, (torch.Tensor, np.ndarray)):
        if isinstance(init, torch.Tensor):
            check_dense(init, "init", caller)
        if np.iscomplexobj(init) if isinstance(init, np.ndarray) else init.is_complex():  # imaginary part dropped
            raise TypeError(f"{caller}: 'init' matrix must be real numbers; got {init.dtype}")
        if init.dtype in (torch.bool, np.bool_):  # read as a 0/1 matrix: a shift of -2 started at +1
            raise TypeError(f"{caller}: 'init' matrix must be numbers, not booleans; got {init.dtype}")
        # an array of any byte order and long double too; of objects or strings refused by name
        tensor = tensor_of_array(init, "init", caller) if isinstance(init, np.ndarray) else init
        matrix = tensor.detach().to(torch.float64)
        if matrix.dim() in (2, 3) and matrix.shape[-2:] == (2, 3):  # OpenCV's affine matrix (warpAffine,
            # findTransformECC): its top two rows, the same fixed -> moving map (README, "Conventions")
            bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(*matrix.shape[:-2], 1, 3)
            matrix = torch.cat([matrix, bottom], dim=-2)
        if matrix.shape[-2:] != (3, 3) or matrix.dim() not in (2, 3) or matrix.reshape(-1, 3, 3).shape[0] not in (1, batch):
            batched = f", ({batch}, 3, 3) or ({batch}, 2, 3)" if batch > 1 else " or (1, 3, 3)"
            raise ValueError(f"{caller}: 'init' matrix must be (3, 3), (2, 3) (OpenCV's){batched}; "
                             f"got {tuple(matrix.shape)}")
        _check_start(matrix, kind, caller, "init")
        return matrix.reshape(-1, 3, 3).expand(batch, 3, 3).to(fixed.device), torch.full((batch,), math.nan)
    if not isinstance(init, str):
        raise TypeError(f"{caller}: 'init' must be a method name or a (3, 3) matrix; got {type(init).__name__}")
    from .initialize import METHODS, _scored_initialize
    from .transforms import TRANSFORMS

    # named as register's own option (the initialiser's own message said "initialize(): unknown method")
    check_option(init, METHODS, "init", caller)

    # a user's own kind starts from the best similarity, projected on the kind by from_matrix
    name = kind.name if kind.name in TRANSFORMS else "similarity"
    matrix, score = _scored_initialize(fixed, moving, name, method=init, center=center, caller="initialize()",
                                       search=search, negate_moving=negate_moving, fixed_mask=masks[0],
                                       moving_mask=masks[1], start=start)
    return matrix.to(torch.float64), score


def _either_contrast_starts(init: str, fixed: torch.Tensor, moving: torch.Tensor, kind: Transform, center,
                            caller: str, masks: tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
                            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The starts ``init`` finds for a contrast-agnostic metric on the moving image and on the inverted
    one: ``[(matrix (B, 3, 3), score (B,)), (the same, inverted)]`` (:func:`_initial_matrix`).

    For ``"auto"``, each pair's quick candidates are found in both contrasts first; the contrast whose
    start scores higher searches first where that start scores below ``AUTO_THRESHOLD``, and the other
    contrast searches only where the first still scores below it.  The image's own contrast used to
    search first, whichever matched: an inverted pair searched its own contrast for nothing, the
    stretched affine stages included (0.14 s of an ``ncc_any`` affine call of 0.3 s at 256^2).  Every
    quick candidate stays, because a high score is no proof: an inverted camera image turned by 180
    degrees scored 0.8 and more against the fixed one.
    """
    from .initialize import AUTO_THRESHOLD

    if init != "auto" or kind.name == "translation":  # the others search for every pair or none
        return [_initial_matrix(init, fixed, moving, kind, center, caller, masks=masks, negate_moving=negate)
                for negate in (False, True)]
    quick = torch.zeros(fixed.shape[0], dtype=torch.bool, device=fixed.device)
    starts = [_initial_matrix(init, fixed, moving, kind, center, caller, masks=masks, search=quick,
                              negate_moving=negate) for negate in (False, True)]
    inverted_first = starts[1][1] > starts[0][1]
    for turn in ("first", "second"):
        for negate in (False, True):
            need = (inverted_first == negate) if turn == "first" else (inverted_first != negate)
            need &= starts[negate][1] < AUTO_THRESHOLD  # NaN (constant images): nothing to search
            if turn == "second":
                need &= ~(starts[not negate][1] >= AUTO_THRESHOLD)
            if bool(need.any()):  # the search improves on the quick start; the others keep theirs
                found = _initial_matrix(init, fixed, moving, kind, center, caller, masks=masks, search=need,
                                        negate_moving=negate, start=starts[negate])
                starts[negate] = tuple(torch.where(need.view(-1, *[1] * (new.dim() - 1)), new, old)
                                       for new, old in zip(found, starts[negate]))
    return starts


#: A given start further than this from its kind's closest transform (pixels, at the fixed image's
#: corners) draws a warning: the kind cannot represent it, and the registration starts elsewhere.
PROJECTED_START_PIXELS = 0.5


def _warn_if_projected(start: torch.Tensor, projected: torch.Tensor, kind: Transform, size, caller: str) -> None:
    """Warn where a given ``init`` matrix is not of the transform's kind: its closest one of the kind
    (``from_matrix``) moves the fixed image's corners by more than :data:`PROJECTED_START_PIXELS`.
    A scale of 2 given to a rigid registration was dropped without a word, and the registration,
    started 60 px off, reported 'converged' there."""
    corners = _image_corners(size, torch.float64, start.device)
    start = start.to(torch.float64)
    distances = _corner_distance(projected.to(torch.float64), start, corners)  # per pair
    # and beyond the rounding of the parameters' dtype (an affine start of 1e20 in float32 came back
    # 1e15 px off, and an affine kind holds every affine matrix), each pair's own
    rounding = 1e3 * torch.finfo(projected.dtype).eps * _corner_reach(start, corners)
    beyond = ~(distances <= PROJECTED_START_PIXELS + rounding)
    if bool(beyond.any()):
        distance = float(distances[beyond].amax())
        warnings.warn(f"{caller}: 'init' is not of the transform kind {kind.name!r}: the closest {kind.name} "
                      f"transform, where the registration starts, moves the fixed image's corners by up to "
                      f"{distance:.3g} px from it (a kind that can hold it, such as transform='affine', starts "
                      "from it whole)", UserWarning, stacklevel=user_stacklevel())


def _model_start(model, init, batch: int, caller: str) -> torch.Tensor:
    """A ready-made model's matrix ``(B, 3, 3)`` as the start of :func:`register`.

    The matrix, not the raw parameter values: a model's parameters may come in its own
    order (the seed's ``AffineModel``: angle, dx, dy, scale) about its own centre, while
    register's are its kind's about the fixed image's centre.  A model with its own
    ``get_matrix`` has a parameterisation that register cannot optimise.
    """
    name = type(model).__name__
    if isinstance(model, type):  # the class: "_has_own_math() missing 1 required positional argument"
        raise TypeError(f"{caller}: 'transform' is the class {model.__name__}; pass a model, "
                        f"{model.__name__}(...), or a kind's name such as 'rigid'")
    if getattr(model, "_has_own_math", lambda: False)():
        raise ValueError(
            f"{caller}: 'transform' is a {name} with its own matrix or Jacobian, which register() cannot "
            "optimise; pass a transform kind and the model's matrix as the start, e.g. "
            "transform='affine', init=model.get_matrix().detach()"
        )
    if not (isinstance(init, str) and init == "auto"):
        raise ValueError(f"{caller}: a model as 'transform' gives the start itself; 'init' must be left out")
    with torch.no_grad():
        matrix = model.matrix().detach().to(torch.float64)
    if matrix.shape[0] not in (1, batch):
        raise ValueError(
            f"{caller}: the {name} holds {matrix.shape[0]} parameter sets but there are {batch} image pairs")
    _check_start(matrix, model.transform, caller, "transform")
    return matrix.expand(batch, 3, 3)


def _outside_inference_mode(function: Callable) -> Callable:
    """``function`` run with ``torch.inference_mode(False)`` when called under inference mode with
    ``gradients="autograd"``, and outside a user's ``torch.autocast`` always
    (:func:`tireg._device.autocast_off`; in this one frame, which the warnings' ``stacklevel`` counts).

    The autograd evaluation's ``backward()`` cannot run in inference mode (``enable_grad()`` does
    not leave it), nor on images made there (inference tensors are not saved for backward): under
    ``inference_mode()`` a registration with ``gradients="autograd"`` failed deep inside torch.
    Outside it, everything the registration makes is an ordinary tensor; its results hold no graph.
    The analytic path stays in inference mode, where a callback may write into inference tensors.
    """

    @functools.wraps(function)
    def run(*args, **kwargs):
        if not (torch.is_inference_mode_enabled() and kwargs.get("gradients") == "autograd"):
            with autocast_off():
                return function(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad(), autocast_off():
            return function(*args, **kwargs)

    return run


@_outside_inference_mode
def register(
    fixed: ImageLike,
    moving: ImageLike,
    *,
    transform: Union[str, Transform, Any] = "affine",
    metric: Union[str, Metric, PerPixelLoss] = "l2",
    optimizer: str = "auto",
    gradients: str = "analytic",
    pyramid: Union[Pyramid, Sequence[int], None] = None,
    mask: Optional[ImageLike] = None,
    moving_mask: Optional[ImageLike] = None,
    init: Union[str, torch.Tensor, np.ndarray] = "auto",
    device: Union[str, torch.device, None] = None,
    callback: Optional[Callable[[IterationState], None]] = None,
    max_iterations: Optional[int] = None,
    tolerance: float = 0.005,
    interpolation: str = "bilinear",
    normalize: bool = True,
    optimizer_options: Optional[dict] = None,
    compile: Union[bool, str] = "auto",
) -> RegistrationResult:
    """Find the transform ``A`` with ``moving(A x) ~ fixed(x)``, coarse to fine.

    Args:
        fixed, moving: images as tensors or arrays, ``(H, W)``, ``(C, H, W)``
            or ``(B, C, H, W)`` for ``B`` pairs (a batch of 1 is broadcast);
            any real dtype (an array of either byte order; a long double one
            as float64), dense tensors (a sparse one is refused); same channel
            count.  They may differ in size: the
            automatic start aligns their centres and searches about them, and
            where one image fits inside the other it also places the smaller
            where it matches best (template matching: a fixed image cut off the
            middle of a larger moving one, turned by a few degrees at most, at
            least 32 pixels a side, and the larger at most (16 times its
            side)² pixels; one smaller or turned further needs a start near
            it, ``init``).
        transform: ``"translation"``, ``"rigid"``, ``"similarity"``,
            ``"anisotropic_similarity"``, ``"affine"``, a
            :class:`~tireg.transforms.Transform`, or a ready-made model
            (its transform kind, and its current matrix as the start).
        metric: a per-pixel loss by name (``"l2"``, ``"cauchy"``, ``"huber"``,
            ...) or instance, applied to intensity-normalised images
            (zero mean, unit deviation per image: gain and offset drop out);
            or a :mod:`tireg.metrics` metric for changed contrast and other
            modalities: ``"ncc"`` (expects a positive correlation),
            ``"ncc_any"`` (either sign: inverted contrast too), ``"lncc"``,
            ``"mi"`` (Mattes), ``"nmi"`` (Studholme), or an instance.
        optimizer: ``"auto"`` (default): Gauss-Newton for a per-pixel loss and
            for ``"ncc"`` / ``"ncc_any"`` with analytic gradients, L-BFGS otherwise;
            ``"gauss-newton"`` (Levenberg-Marquardt on the analytic Jacobian, robust
            losses by IRLS, NCC by the ECC step of :meth:`tireg.metrics.NCC.ecc_gradient`); or ``"adam"``, ``"sgd"``
            (``torch.optim``), ``"lbfgs"`` (``torch.optim.LBFGS``'s algorithm
            and options, batched: each pair its own curvature history and a
            backtracking line search, so that a pair's result does not depend
            on the batch), on parameters scaled so that a unit moves the image
            by about one pixel.
        gradients: ``"analytic"`` (default) or ``"autograd"`` (first-order optimisers).
        pyramid: a :class:`Pyramid`, a sequence of shrink factors such as
            ``(4, 2, 1)``, or ``None`` for an automatic schedule; its
            full-resolution level is smoothed as
            :attr:`Pyramid.finest_smoothing` says (1 px for intensity-matching
            metrics, 0.5 px for ``mi`` and ``nmi``; none with
            ``optimizer="sgd"`` or for a metric of one's own).
        mask, moving_mask: where the fixed / moving image counts (nonzero);
            fixed pixels that sample outside the moving image or its mask (any
            pixel the interpolation reads outside it: the 2 x 2 around the
            sample point for bilinear, the 4 x 4 for bicubic) do not
            count, and the cost is the mean over those that do (without a
            fixed mask, neither does the ``ceil(sigma)`` border band of a
            smoothed full-resolution level; with one, the mask's pixels
            within ``MASK_EDGE_BANDS`` such bands of its edge or the border,
            unless that leaves under half of it).  A coarse
            level's pixel counts where at least half its block is in the mask.
            The initialiser leaves out what lies outside them too, and so do
            the intensity normalisation and ``mi`` / ``nmi``'s histogram
            ranges: a no-data value under a mask (``-9999``, ``-FLT_MAX``,
            ``1e100``, NaN, Inf) is never seen, as each image is first
            filled outside its mask with its mean inside (per pair; a fixed
            or moving image shared by pairs with masks of their own, outside
            their union), and the result is the same whatever lies there.
            NaN or Inf inside a mask, or in an image without one, raises
            ``ValueError``.
        init: ``"auto"`` (default; see :func:`tireg.initialize.initialize`),
            another method name there (``"identity"``, ``"center"``,
            ``"moments"``, ``"phase"``, ``"fourier-mellin"``, ``"search"``),
            or a ``(3, 3)`` / ``(B, 3, 3)`` fixed -> moving pixel matrix (or
            its top two rows, ``(2, 3)``: OpenCV's ``warpAffine`` /
            ``findTransformECC`` matrix is that map, README "Conventions").
            A matrix the transform kind cannot hold starts from the kind's
            closest one (``from_matrix``), with a ``UserWarning`` where that
            moves the fixed image's corners by more than half a pixel.  A
            singular one raises ``ValueError``, and so does a mirroring one
            for a kind that cannot mirror (an anisotropic one is fine: the
            end's ``"degenerate"`` test judges the result's squeeze relative
            to the start's).
            When ``transform`` is a model, leave ``init`` out: the model's
            matrix is the start (the model itself is not changed).
        device: where to compute (default: the fixed image's device).
        callback: called with an :class:`IterationState` after every
            iteration; raising ``StopIteration`` stops (status ``"callback"``)
            with the parameters reached so far (Gauss-Newton's: the state's
            matrix; a first-order optimiser's: the best of its level).  At
            the last level a pair that had already stopped (not
            ``state.active``) keeps its own status and ``converged`` flag.
        max_iterations: per level (default 50 for Gauss-Newton, 300 otherwise).
        tolerance: a pair has converged at a level when a step moves no
            corner of the image by more than ``tolerance * factor`` pixels
            (at a coarse level, ``factor > 1``, at least
            :data:`COARSE_TOLERANCE` level pixels: the next level refines it).
            Levenberg-Marquardt's step shrinks with rejected steps too: a small
            step counts only if the nearly undamped one (the first damping,
            1e-3) is small as well, below :data:`STALL_FACTOR` tolerances or
            :data:`STALL_FLOOR` px (times the factor; with the default
            tolerance the floor decides); else the pair is ``"stalled"``.
            Adam and SGD: three steps running below it and below
            :data:`FIRST_ORDER_STEP_FRACTION` of the pair's largest at the
            level (a step held back by the learning rate is no convergence:
            such a pair runs to ``max_iterations``; steps are measured in
            float64, so one that float32 parameters round away still
            counts), and a pair whose step begins off the images' overlap
            is ``"stalled"``.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        normalize: ``True`` (default): each image and channel is brought to
            zero mean and unit deviation (over its mask) before a per-pixel
            loss compares them, and again over the pixels the cost counts
            (the overlap, at the start and before the full-resolution
            level), so gain and offset drop out; ``False``
            compares the intensities as given, less an offset the metric
            does not see, taken off in the images' own precision (float64
            for float64 images and for the pairs of an integer image whose
            values leave float32's 24 bits) before register's float32,
            which would keep little of an image on a large offset: a
            per-pixel loss (a function of ``x - y``, its scale too) one
            offset common to both images (the fixed image's mean per pair
            and channel, over its mask: a Cauchy or Geman-McClure scale is
            then in the images' units, and one below their deviation by more
            than ``OUTLIER_SCALE_LIMIT`` = 30 times, which counts most pixels
            as outliers, is warned about); ``"lncc"`` each image its own (it
            is invariant to offset only: its ``eps`` is absolute, and at a
            gain of 0.01 it is no longer invariant).  ``"ncc"``,
            ``"ncc_any"``, ``"mi"`` and ``"nmi"`` see neither gain nor
            offset and run on the normalised images either way.  A per-pixel
            loss or ``"lncc"`` on an image whose values (less the offset)
            are all below about 1e-19 raises ``ValueError``: their squares
            are 0 in float32.  A metric of one's own gets the images as
            given.
        optimizer_options: keyword arguments of the ``torch.optim``
            optimiser (``"adam"``, ``"lbfgs"``, ``"sgd"``; ``torch.optim.LBFGS``'s
            for the batched L-BFGS), e.g. ``{"lr": 0.05}``, over tireg's
            defaults; Gauss-Newton takes none.
        compile: ``True``: evaluate the cost, gradient and Gauss-Newton
            matrix with the compiled fused kernel (:mod:`tireg.fused`), one
            pass over the pixels instead of a dozen operations; it applies
            to per-pixel metrics with bilinear interpolation and no
            ``moving_mask`` (elsewhere the reference path runs) and gives
            the same matrices.  Compiling costs seconds on first use in a
            process (once per pyramid level size), so it pays for large
            images, batches and stacks, not for one small pair
            (``benchmarks/speed.py``).  ``"auto"`` (default): compile when
            this call's work alone pays for it, a batch of ``B >= 2`` pairs
            with ``B H W >=`` :data:`AUTO_COMPILE_PIXELS` fixed pixels (one
            pair, however large, runs in bands of rows, where compiling does
            not pay).  ``False``: never.

    Returns:
        :class:`RegistrationResult`; non-convergence is a status in it, never an exception.
    """
    caller = "register()"
    started = time.perf_counter()
    # finite or not: a NaN under a mask is no data, checked once the masks fill it (_filled_outside)
    # (an integer image of more than 16 bits as it is: converted pair by pair below, _integer_float32)
    fixed_t, fixed_ndim = as_image(fixed, "fixed", caller, finite=False, keep_wide_integers=True)
    moving_t, moving_ndim = as_image(moving, "moving", caller, finite=False, keep_wide_integers=True)
    batched = fixed_ndim == 4 or (isinstance(moving, (torch.Tensor, np.ndarray)) and np.ndim(moving) == 4)
    three_d = [name for name, ndim in (("fixed", fixed_ndim), ("moving", moving_ndim)) if ndim == 3]
    if fixed_t.shape[1] != moving_t.shape[1]:
        # a stack of grey frames (N, H, W) is N channels of one image: the fix is (N, 1, H, W), not grey
        hint = "".join(f"; a 3-D '{name}' is read as (C, H, W): for a batch of grey images pass (B, 1, H, W), "
                       f"{name}[:, None]" for name in three_d)
        raise ValueError(
            f"{caller}: 'fixed' has {fixed_t.shape[1]} channels but 'moving' has {moving_t.shape[1]}; "
            f"convert both to grey (or the same channels) first{hint}"
        )
    if fixed_t.shape[0] != moving_t.shape[0] and 1 not in (fixed_t.shape[0], moving_t.shape[0]):
        raise ValueError(f"{caller}: {fixed_t.shape[0]} fixed images but {moving_t.shape[0]} moving images")
    batch = max(fixed_t.shape[0], moving_t.shape[0])
    device = as_device(device, caller)
    device = fixed_t.device if device is None else device
    if device.type == "meta":  # meta tensors hold no values: the first value read fails deep inside
        raise ValueError(f"{caller}: device 'meta' holds no values; register on 'cpu' or 'cuda'")
    if callback is not None and not callable(callback):
        raise TypeError(f"{caller}: 'callback' must be callable; got {type(callback).__name__}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{caller}: device {str(device)!r} requested but CUDA is not available")
    try:  # another backend missing from this build ("mps" on Linux) raised torch's error deep inside
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        raise ValueError(f"{caller}: device {str(device)!r} is not available in this PyTorch build") from None
    if not (isinstance(normalize, (bool, np.bool_))
            or isinstance(normalize, torch.Tensor) and normalize.dtype == torch.bool and normalize.numel() == 1):
        raise TypeError(f"{caller}: 'normalize' must be True or False; got {normalize!r}")
    normalize = bool(normalize)
    dtype = torch.float32
    if min(fixed_t.shape[-2:]) < 8 or min(moving_t.shape[-2:]) < 8:
        layout = ""
        if fixed_ndim == 3 or moving_ndim == 3:
            layout = ("; a 3-D image is read as (C, H, W), channels first (an (H, W, C) array needs "
                      "np.moveaxis(image, -1, 0) or tensor.permute(2, 0, 1))")
        raise ValueError(f"{caller}: images must be at least 8 x 8 pixels; got 'fixed' (H, W) = "
                         f"{tuple(fixed_t.shape[-2:])} and 'moving' {tuple(moving_t.shape[-2:])}{layout}")

    if isinstance(transform, str):
        kind = get_transform(transform, caller)
        start_params = None
    elif isinstance(transform, Transform):
        kind, start_params = transform, None
    elif hasattr(transform, "transform") and hasattr(transform, "parameter_values"):
        kind, start_params = transform.transform, _model_start(transform, init, batch, caller)
    else:
        raise TypeError(f"{caller}: 'transform' must be a name, a Transform or a tireg model; got {type(transform).__name__}")
    check_option(optimizer, OPTIMIZERS, "optimizer", caller)
    check_option(gradients, ("analytic", "autograd"), "gradients", caller)
    check_option(interpolation, GRADIENT_INTERPOLATIONS, "interpolation", caller)
    metric_object = copy.copy(get_metric(metric, caller))  # a copy: register sets its histogram ranges per level
    stepped = _gauss_newton_serves(metric_object)
    if optimizer == "auto":
        optimizer = "gauss-newton" if stepped and gradients == "analytic" else "lbfgs"
    if optimizer == "gauss-newton" and gradients == "autograd":
        raise ValueError(f"{caller}: Gauss-Newton needs the analytic Jacobian; use gradients='analytic' "
                         "or a first-order optimizer ('adam', 'lbfgs', 'sgd') with autograd")
    if optimizer == "gauss-newton" and not stepped:
        raise ValueError(f"{caller}: Gauss-Newton needs a per-pixel loss (such as 'l2') or 'ncc' / 'ncc_any', "
                         f"with the cost of tireg's own PerPixelMetric or NCC; use optimizer='lbfgs' (the default "
                         f"for {metric!r}) or 'adam'")
    if real_number(tolerance) is None:
        raise TypeError(f"{caller}: 'tolerance' must be a number; got {type(tolerance).__name__}")
    tolerance = real_number(tolerance)
    if not tolerance > 0:
        raise ValueError(f"{caller}: 'tolerance' must be positive; got {tolerance}")
    if max_iterations is None:
        max_iterations = 50 if optimizer == "gauss-newton" else 300
    if not (is_whole(max_iterations) and max_iterations >= 1):
        raise ValueError(f"{caller}: 'max_iterations' must be a whole number of at least 1; got {max_iterations!r}")
    _check_optimizer_options(optimizer, optimizer_options, caller)
    if pyramid is None:
        pyramid = Pyramid()
    elif not isinstance(pyramid, Pyramid):
        if not is_sequence(pyramid):  # a 0-d tensor too ("iteration over a 0-d tensor")
            shown = ("a 0-d tensor (one number)" if isinstance(pyramid, (torch.Tensor, np.ndarray))
                     else type(pyramid).__name__)
            raise TypeError(f"{caller}: 'pyramid' must be a Pyramid or a sequence of shrink factors such as (4, 2, 1); "
                            f"got {shown}")
        pyramid = Pyramid(shrink_factors=tuple(pyramid))  # a list, a range, an array or a tensor of factors
    smaller = (min(fixed_t.shape[-2], moving_t.shape[-2]), min(fixed_t.shape[-1], moving_t.shape[-1]))
    # not for SGD: smoothing shrinks the gradient, and its fixed learning rate's steps then met the
    # stop test early (2.5-4x the error, "converged")
    finest = 0.0
    if optimizer != "sgd":
        if metric_object.linear_intensity:
            finest = FINEST_SMOOTHING
        elif isinstance(metric_object, (MutualInformation, NormalizedMutualInformation)):
            finest = FINEST_SMOOTHING_MI
    schedule = pyramid.levels(smaller, finest=finest, caller=caller)
    if schedule[-1][0] != 1:  # (4,) or (1, 2, 4): a coarse result, reported 'converged' without a word
        factors = tuple(factor for factor, _ in schedule)
        warnings.warn(f"{caller}: the pyramid {factors} ends at shrink factor {factors[-1]}: the result is found at "
                      f"1/{factors[-1]} of the resolution (shrink factors go from coarse to fine and end with 1 for "
                      "full resolution, e.g. (4, 2, 1))", UserWarning, stacklevel=user_stacklevel())

    # ncc, ncc_any, mi and nmi see neither gain nor offset: on the normalised images their cost is the
    # same, and float32 keeps their detail whatever the range (1e-25 x an image: NCC read 1.0 at the start)
    normalize = normalize or _own_cost(metric_object, _GAIN_INVARIANT)
    fixed_mask = _as_mask(mask, fixed_t.expand(batch, *fixed_t.shape[1:]), "mask", device)
    moving_mask_t = _as_mask(moving_mask, moving_t.expand(batch, *moving_t.shape[1:]), "moving_mask", device)
    # what lies under a mask is no data: no step below may see it (a copy only where there is a mask;
    # an integer image of more than 16 bits is filled pair by pair as it is converted: _integer_float32)
    filled = []
    for image, image_mask in ((fixed_t, fixed_mask), (moving_t, moving_mask_t)):
        if image_mask is not None and not is_wide_integer(image):
            image, owned = _working_copy(image, device)
            image = _filled_outside(image, image_mask, in_place=owned)
        filled.append(image)
    fixed_t, moving_t = filled
    _refuse_not_finite(fixed_t, fixed_ndim, fixed_mask is not None, "fixed", caller)
    _refuse_not_finite(moving_t, moving_ndim, moving_mask_t is not None, "moving", caller)
    if normalize:
        fixed_t, moving_t = ((_integer_float32(image, image_mask, name, device, caller, centred=True)
                              if is_wide_integer(image) else
                              _float32(image, name, device, caller, centred=True, mask=image_mask))
                             .expand(batch, *image.shape[1:])
                             for image, name, image_mask in ((fixed_t, "fixed", fixed_mask),
                                                             (moving_t, "moving", moving_mask_t)))
    else:  # in the images' own precision until the offset their metric does not see is off
        fixed_t, moving_t = _without_offsets(fixed_t, moving_t, fixed_mask, moving_mask_t, metric_object, batch,
                                             device, caller)
        # (_normalization refuses constant images too)
        _refuse_constant(fixed_t, fixed_mask, "fixed")
        _refuse_constant(moving_t, moving_mask_t, "moving")
        if _offset_kind(metric_object) is not None:
            _refuse_underflow(fixed_t, fixed_mask, "fixed")
            _refuse_underflow(moving_t, moving_mask_t, "moving")
    fixed_stats = _normalization(fixed_t, fixed_mask, "fixed") if normalize else None
    fixed_n = _normalized(fixed_t, fixed_stats) if normalize else fixed_t
    moving_stats = _normalization(moving_t, moving_mask_t, "moving") if normalize else None
    moving_n = _normalized(moving_t, moving_stats) if normalize else moving_t
    _warn_outlier_scale(metric_object, fixed_n, fixed_mask, normalize, caller)
    # the full-resolution sigma, per pair, raised above the default where noise would pull the
    # result towards half pixels (NOISE_BIAS_LIMIT); only where the pyramid leaves it to register
    finest_sigmas = None
    # the moving image's noise (Immerkaer's estimate), measured once: for the noise-adapted sigma and,
    # in the unnormalised image's units, for the overlap's moving deviation (_overlap_statistics)
    moving_measures = moving_noise = None
    # (not for mi / nmi: raised from their 0.5 px, the contrast suite's gamma and other-channel pairs
    # lost as FINEST_SMOOTHING_MI's own table says)
    adapted = (finest > 0 and metric_object.linear_intensity and pyramid.smoothing_sigmas is None
               and pyramid.finest_smoothing is None and schedule[-1][0] == 1)
    if adapted or (normalize and isinstance(metric_object, PerPixelMetric)):
        moving_measures = _noise_measures(moving_n, moving_mask_t)
        if normalize:
            moving_noise = moving_measures[1] * moving_stats[1].detach().double().flatten(1).cpu() ** 2
    # per pair, the larger of the two images' noise-to-structure ratios; the sigmas follow from them
    # at the start of the full-resolution level, where the transform says how much of the noise's
    # pull survives the average over the fixed pixels (_phase_coherence)
    noise_ratios = None
    largest_sigma = min(NOISE_SMOOTHING_MAX, min(smaller) / 2)
    if adapted:
        noise_ratios = torch.maximum(_noise_to_structure(fixed_n, fixed_mask), moving_measures[0])

    center = image_center(*fixed_t.shape[-2:])
    center_t = torch.tensor(center, dtype=dtype, device=device)
    problem = _Problem(kind, center_t, metric_object, interpolation, compile=_use_compiled(compile, fixed_t, caller),
                       channels=fixed_t.shape[1])
    if start_params is None:
        masks = (fixed_mask, moving_mask_t)
        either_contrast = isinstance(init, str) and init != "identity" and metric_object.any_contrast
        if either_contrast:
            # Initialisers match intensities; for a metric that accepts inverted or other
            # contrast, also start from what they find on the inverted image (its working copies
            # negated, not a copy of the batch's images), and keep the start the metric itself
            # prefers, pair by pair, at the coarsest level
            (start, _), (flipped, _) = _either_contrast_starts(init, fixed_n, moving_n, kind, center, caller, masks)
        else:
            start, _ = _initial_matrix(init, fixed_n, moving_n, kind, center, caller, masks=masks)
        params = kind.from_matrix(start.to(device=device, dtype=dtype), center_t)
        if not isinstance(init, str):
            _warn_if_projected(start, kind.matrix(params, center_t), kind, fixed_t.shape[-2:], caller)
        if either_contrast:
            flipped_params = kind.from_matrix(flipped.to(device=device, dtype=dtype), center_t)
            coarse = _make_level(fixed_n, moving_n, fixed_mask, moving_mask_t, *schedule[0])
            with torch.no_grad():
                costs = [problem.evaluate(p, coarse, hessian=False).cost for p in (params, flipped_params)]
            params = torch.where((costs[1] < costs[0])[:, None], flipped_params, params)
    else:  # the model's own matrix (its centre and parameter order), as this call's parameters
        params = kind.from_matrix(start_params.to(device=device, dtype=dtype), center_t)
    # a per-pixel loss compares intensities: both images normalised over the pixels the cost counts
    overlap_normalization = normalize and problem.loss is not None
    if overlap_normalization:
        fixed_stats, moving_stats = _normalize_over_overlap(
            problem, params, (fixed_t, fixed_n, fixed_stats), (moving_t, moving_n, moving_stats),
            fixed_mask, moving_mask_t, moving_noise)

    height, width = fixed_t.shape[-2:]
    corners = _image_corners((height, width), dtype, device)
    start_matrix = kind.matrix(params.detach().to(torch.float64), center_t.to(torch.float64)).cpu()
    history: list[LevelHistory] = []
    total_iterations = torch.zeros(batch, dtype=torch.long)
    reasons = ["max_iterations"] * batch
    def full_resolution_level(sigma: float, normalize_again: bool, in_place: bool) -> tuple[_Level, Optional[list]]:
        """The level at factor 1 at the current parameters, and the moving image's scale it used: for
        a per-pixel loss the images normalised again over the overlap there first; the moving image
        smoothed as the fixed one, in the fixed image's frame."""
        nonlocal fixed_stats, moving_stats, finest_sigmas
        if noise_ratios is not None and finest_sigmas is None and sigma == schedule[-1][1]:
            finest_sigmas = _noise_adapted_sigmas(
                noise_ratios, _phase_coherence(kind.matrix(params.detach(), center_t), fixed_t.shape[-2:]),
                sigma, largest_sigma)
        if overlap_normalization and normalize_again:
            fixed_stats, moving_stats = _normalize_over_overlap(
                problem, params, (fixed_t, fixed_n, fixed_stats), (moving_t, moving_n, moving_stats),
                fixed_mask, moving_mask_t, moving_noise)
        scale = _moving_scale(kind, params, center_t) if sigma > 0 else None
        return _make_level(fixed_n, moving_n, fixed_mask, moving_mask_t, 1, sigma, scale, in_place=in_place,
                           sigmas=finest_sigmas if sigma == schedule[-1][1] else None), scale

    full_resolution = None  # the level at factor 1, once no other level follows
    for level_index, (factor, sigma) in enumerate(schedule):
        if factor == 1 and all(entry == schedule[-1] for entry in schedule[level_index:]):
            if full_resolution is None:
                # normalised again over the overlap the levels found (level 0: as at the start); normalised,
                # the images are this call's own copies, smoothed in themselves
                full_resolution, moving_scale = full_resolution_level(sigma, level_index > 0, in_place=normalize)
                # the level holds the image from here on (the compiled path only inside its
                # kernel's copy, made from the unnormalised one: a batch's peak memory counts
                # every image)
                groups = _scale_groups(moving_scale, moving_t.shape[0])
                one_sigma = finest_sigmas is None or len(set(finest_sigmas)) == 1
                if moving_stats is not None and moving_mask_t is None and len(groups) == 1 and one_sigma:
                    # the compiled path packs it again from the unnormalised image, normalised and smoothed
                    # inside the packed copy: the level's own copy goes first
                    pair_sigma = sigma if finest_sigmas is None else finest_sigmas[0]
                    full_resolution.source = (moving_t, *moving_stats, pair_sigma * next(iter(groups)))
                moving_n = fixed_n = None  # the level holds them (or its crop of the fixed one) from here on
            level = full_resolution
        else:
            level = _make_level(fixed_n, moving_n, fixed_mask, moving_mask_t, factor, sigma)
        options = dict(
            max_iterations=int(max_iterations),
            tolerance=tolerance if factor == 1 else max(tolerance, COARSE_TOLERANCE),
            corners=corners,
            callback=callback,
            level_index=level_index,
        )
        try:
            if optimizer == "gauss-newton":
                params, iterations, reasons, costs, rows = _gauss_newton(problem, level, params, **options)
            else:
                params, iterations, reasons, costs, rows = _first_order(
                    problem, level, params, name=optimizer, options=optimizer_options, gradients=gradients, **options
                )
        except _Stop as stop:  # the interrupted level's progress is kept, as far as the callback saw it
            reasons = ["callback"] * batch
            if stop.outcome is not None:
                params, iterations, level_reasons, costs, rows = stop.outcome
                if level_index == len(schedule) - 1 and stop.active is not None:
                    # at the last level a pair that had stopped keeps its own reason ("converged" at
                    # iteration 1 had read "callback" with the others); at a coarser one every pair
                    # had a level to go
                    reasons = ["callback" if running else reason
                               for running, reason in zip(stop.active.tolist(), level_reasons)]
                total_iterations += iterations
                history.append(LevelHistory(factor, (height // factor, width // factor), costs.cpu(), rows))
            break
        total_iterations += iterations
        history.append(LevelHistory(factor, (height // factor, width // factor), costs.cpu(), rows))

    finished_at_full_resolution = len(history) == len(schedule) and schedule[-1][0] == 1
    final_level = full_resolution
    if optimizer == "gauss-newton" and finished_at_full_resolution:
        cost = history[-1].cost[-1].to(device)  # Levenberg-Marquardt's last accepted cost is at these parameters
    else:
        if final_level is None:  # a callback stopped before it, or the pyramid ends above factor 1
            # the cost a finished run reports: normalised over this overlap, on its level's images
            sigma = schedule[-1][1] if schedule[-1][0] == 1 else 0.0
            final_level, _ = full_resolution_level(sigma, True, in_place=False)
        with torch.no_grad():
            cost = problem.evaluate(params, final_level, hessian=False).cost
    # no overlap is an infinite cost (_Problem.evaluate); a NaN is arithmetic gone wrong, not that, and
    # so is an infinite cost of pairs that overlap (squares beyond float32: intensities of 1e20 had
    # read "no_overlap")
    values = cost.tolist()
    overlapping = [True] * batch
    if any(math.isinf(value) for value in values):
        with torch.no_grad():
            overlapping = problem.overlaps(params, final_level).tolist()
    reasons = ["not_finite" if math.isnan(value) or math.isinf(value) and overlaps else
               "no_overlap" if math.isinf(value) else reason
               for value, overlaps, reason in zip(values, overlapping, reasons)]
    matrix = kind.matrix(params.detach().to(torch.float64), center_t.to(torch.float64)).cpu()
    # a transform that collapsed, mirrored or slid off to a sliver of overlap is no alignment, whatever
    # the optimiser's own test said (one look at the end, not in the loops)
    with torch.no_grad():
        overlap = _overlap_pixels(problem, params, fixed_t, moving_t, fixed_mask, moving_mask_t)
    smaller = torch.minimum(*(_pixel_counts(mask, size, batch)
                                for mask, size in ((fixed_mask, (height, width)), (moving_mask_t, moving_t.shape[-2:]))))
    degenerate = _degenerate(start_matrix, matrix, overlap, smaller).tolist()
    reasons = ["degenerate" if collapsed and reason in _DEGENERATE_OVERRIDES else reason
               for collapsed, reason in zip(degenerate, reasons)]
    return RegistrationResult(
        matrix=matrix if batched else matrix[0],
        transform=kind.name,
        parameter_names=kind.parameter_names,
        parameter_values=params.detach().to(torch.float64).cpu(),
        center=center,
        cost=cost.detach().cpu().to(torch.float64),
        iterations=total_iterations,
        converged=torch.tensor([reason == "converged" for reason in reasons]),
        stop_reason=list(reasons),
        history=history,
        fixed_size=tuple(fixed_t.shape[-2:]),
        moving_size=tuple(moving_t.shape[-2:]),
        batched=batched,
        seconds=time.perf_counter() - started,
        metadata={"metric": repr(metric_object), "optimizer": optimizer, "gradients": gradients,
                  "pyramid": [factor for factor, _ in schedule],
                  "smoothing": [sigma for _, sigma in schedule[:-1]] + [
                      schedule[-1][1] if finest_sigmas is None
                      else finest_sigmas[0] if len(set(finest_sigmas)) == 1 else list(finest_sigmas)],
                  "interpolation": interpolation},
    )


#: A found transform whose linear part's singular-value ratio (smaller / larger) is below this
#: fraction of its start's ratio is "degenerate": it squeezes the fixed image along one direction 20
#: times more than the start did (a similarity or identity start has ratio 1; a line scanner's 25:1
#: start is judged against its own 1/25).  Started from ``C 0.01 I C^-1``, affine registrations of
#: every metric ended with singular values such as 0.037 and 0.002, mirrored, 44-73 px off,
#: "converged".
DEGENERATE_ANISOTROPY = 1.0 / 20.0

#: A found transform under which fewer than this many pixels of either image carry the match (an
#: 8 x 8 patch), counted in fixed pixels or in moving pixels (``overlap |det A|``), is "degenerate":
#: the fixed image squeezed onto a few moving pixels (a start at scale 0.01 ended at 0.012, 5 moving
#: pixels, "converged").  An absolute floor, not a fraction of the images: a genuine zoom beyond 4x
#: between same-size images, or mosaic tiles overlapping on 4 % of their pixels, are alignments.
DEGENERATE_OVERLAP_PIXELS = 64

#: The stop reasons that "degenerate" replaces (a callback's stop and a cost that is not finite stay).
_DEGENERATE_OVERRIDES = ("converged", "max_iterations", "stalled")


def _overlap_pixels(problem: "_Problem", params: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                    fixed_mask: Optional[torch.Tensor], moving_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` float64 on the CPU: how many fixed pixels count at ``params`` at full resolution,
    unsmoothed (inside the fixed mask, sampling inside the moving image and its mask: the
    interpolation's footprint, :meth:`_Problem._valid`).

    Estimated as :func:`_overlap_statistics` samples, on fixed pixels strided to about
    :data:`OVERLAP_SAMPLES` a pair: the fraction of the strided pixels inside the fixed mask that
    count, times the mask's pixels (every pixel where the stride leaves fewer than
    :data:`MIN_VALID_PIXELS` of a pair's mask), in bands of rows of every pair: no image-sized grid."""
    batch, _, height, width = fixed.shape
    whole = _make_level(fixed, moving, fixed_mask, moving_mask, 1, 0.0)  # views, at factor 1
    matrices = problem.matrices(params, whole)[0]

    def counts(stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        points = (slice(None), slice(None), slice(None, None, stride), slice(None, None, stride))
        ys, xs = whole.axes
        level = whole if stride == 1 else replace(
            whole, fixed=fixed[points], axes=(ys[::stride], xs[::stride]),
            fixed_weight=None if fixed_mask is None else fixed_mask[points])
        rows_strided, columns = level.fixed.shape[-2:]
        valid = torch.zeros(batch, dtype=torch.float64, device=fixed.device)
        bands = _chunks.chunk_slices(rows_strided, batch * columns, _chunks.eager_budget(fixed.device))
        for rows in bands:
            part = level if len(bands) == 1 else level.rows(rows)
            valid += problem._valid(problem.grid(matrices, part), part).sum(dim=(1, 2, 3), dtype=torch.float64)
        counted = (torch.full((batch,), float(rows_strided * columns), dtype=torch.float64, device=fixed.device)
                   if fixed_mask is None else level.fixed_weight.sum(dim=(1, 2, 3), dtype=torch.float64))
        return valid, counted

    stride = max(1, math.isqrt(height * width // OVERLAP_SAMPLES))
    valid, counted = counts(stride)
    if stride > 1 and bool((counted < MIN_VALID_PIXELS).any()):  # a small mask that the stride misses
        valid, counted = counts(1)
    return (valid / counted.clamp_min(1.0)).cpu() * _pixel_counts(fixed_mask, (height, width), batch)


def _pixel_counts(mask: Optional[torch.Tensor], size: Sequence[int], batch: int) -> torch.Tensor:
    """``(B,)`` float64 on the CPU: the pixels inside each pair's mask (``(B or 1, 1, H, W)``), or all."""
    if mask is None:
        return torch.full((batch,), float(size[0] * size[1]), dtype=torch.float64)
    return mask.sum(dim=(1, 2, 3), dtype=torch.float64).cpu().expand(batch)


def _degenerate(start: torch.Tensor, found: torch.Tensor, overlap: torch.Tensor, smaller: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the pairs whose found matrix (``found``, ``(B, 3, 3)`` float64 on the CPU, started
    from ``start``) is no alignment (:data:`STOP_REASONS`' ``"degenerate"``):

    * its linear part mirrors where the start's did not, or the reverse (the determinant's sign
      changed: a registration passed through a singular matrix);
    * its singular-value ratio (smaller / larger) is below :data:`DEGENERATE_ANISOTROPY` times the
      start's (a similarity start has ratio 1; an anisotropic start is judged against itself);
    * its ``overlap`` (:func:`_overlap_pixels`) is below :data:`DEGENERATE_OVERLAP_PIXELS` (or a
      sixteenth of ``smaller``, ``(B,)`` the smaller image's pixels inside its mask, where that is
      less), counted in fixed pixels or, seen from the moving image, in moving pixels, ``overlap |det A|``: the
      fixed image squeezed onto a few moving pixels (a start at scale 0.01 ended at 0.012, 5 moving
      pixels, "converged").  An absolute floor: a relative one (a sixteenth of the smaller image)
      called a genuine 5-8x zoom between same-size images, and mosaic tiles overlapping on 4-6 %,
      "degenerate".  A moving image zoomed in on a small part of the fixed one (an ``mi``
      similarity at scale 7.6 on 974 of 57,344 fixed pixels) passes: no rule on the geometry alone
      tells it from a real zoom.

    The overlap is counted inside the masks (:func:`_overlap_pixels`)."""
    from .initialize import MIN_OVERLAP

    linear, start_linear = found[:, :2, :2], start[:, :2, :2].to(found)
    determinant, start_determinant = torch.linalg.det(linear), torch.linalg.det(start_linear)
    flipped = torch.sign(determinant) != torch.sign(start_determinant)
    singular = torch.linalg.svdvals(linear)  # (B, 2), descending
    start_singular = torch.linalg.svdvals(start_linear)
    # ratio < DEGENERATE_ANISOTROPY * start ratio, without dividing (NaN counts as squeezed)
    squeezed = ~(singular[:, 1] * start_singular[:, 0] > DEGENERATE_ANISOTROPY * start_singular[:, 1] * singular[:, 0])
    invertible = determinant.abs() > 0
    # at most a sixteenth of the smaller image (inside its mask): an 8 x 8 pair, or a 7 x 7 mask, never
    # holds 64 pixels, and its good results had read "degenerate"
    least = smaller.mul(MIN_OVERLAP / 4).clamp_max(float(DEGENERATE_OVERLAP_PIXELS))
    sliver = ~(overlap >= least) | ~(overlap * determinant.abs() >= least)
    return flipped | squeezed | sliver | ~invertible


def _moving_scale(kind: Transform, params: torch.Tensor, center: torch.Tensor) -> list[float]:
    """Per pair, ``sqrt|det L|`` of the transform at ``params``: moving pixels per fixed pixel."""
    linear = kind.matrix(params.detach(), center)[:, :2, :2]
    return _determinant(linear).abs().sqrt().tolist()


def _gaussian_taps(sigma: float) -> list[float]:
    """The taps of :func:`tireg.sampling.gaussian_blur`'s kernel of ``sigma`` px, as numbers."""
    return _derivative_kernels("gaussian", float(sigma), torch.float64, torch.device("cpu"))[0].tolist()


@functools.lru_cache(maxsize=None)
def _half_pixel_noise_drop(sigma: float) -> float:
    """How much less variance unit white noise smoothed by the Gaussian of ``sigma`` px (the kernel
    :func:`tireg.sampling.gaussian_blur` uses) has when resampled bilinearly at (0.5, 0.5) than at a
    whole pixel: ``(sum g^2)^2 - (sum h^2)^2``, ``h`` the kernel averaged with itself shifted by 1."""
    kernel = _gaussian_taps(sigma)
    whole = sum(value * value for value in kernel)
    half = sum(((a + b) / 2) ** 2 for a, b in zip([0.0] + kernel, kernel + [0.0]))
    return whole * whole - half * half


@functools.lru_cache(maxsize=None)
def _noise_gradient_energy(sigma: float) -> float:
    """``E |grad (G_sigma * n)|^2`` for unit white noise ``n``, the gradient by central differences."""
    kernel = _gaussian_taps(sigma)
    padded = [0.0, 0.0] + kernel + [0.0, 0.0]
    derivative = [(padded[i + 2] - padded[i]) / 2 for i in range(len(kernel) + 2)]
    return 2.0 * sum(value * value for value in derivative) * sum(value * value for value in kernel)


#: Immerkaer's noise estimate: a white noise of deviation s gives |L * n| a mean of 6 s sqrt(2 / pi)
_IMMERKAER = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))


#: :func:`_noise_measures` reads an image of more pixels than this on four tiles of ``_NOISE_TILE``
#: px a side, one at the centre of each quadrant (16 for its second look): a 256^2 pair's estimate took 9 % of
#: its registration, a 1024^2 pair's 28 % (one thread), the tiles' about 2 % whatever the size.
_NOISE_TILED_PIXELS = 1 << 15
_NOISE_TILE = 64


def _immerkaer_variance(mean_response: torch.Tensor) -> torch.Tensor:
    """White noise's variance from the mean ``|L * I|`` of :data:`_IMMERKAER`'s stencil ``L``:
    ``sigma = sqrt(pi / 2) mean |L * I| / 6`` (Immerkaer 1996)."""
    return (math.pi / 2.0) * (mean_response / 6.0) ** 2


def _noise_to_structure(image: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B,)`` float64 on the CPU: per pair of ``image`` ``(B, C, H, W)``, its noise variance times
    :func:`_half_pixel_noise_drop` at 1 px over its signal's gradient energy at 1 px (the first of
    :func:`_noise_measures`)."""
    return _noise_measures(image, mask)[0]


def _noise_measures(image: torch.Tensor, mask: Optional[torch.Tensor], *,
                    grid: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``((B,), (B, C))`` float64 on the CPU: per pair of ``image`` ``(B, C, H, W)``, its noise variance times
    :func:`_half_pixel_noise_drop` at 1 px over its signal's gradient energy at 1 px: how far, in
    squared pixels, resampling the noise pulls a 1 px-smoothed cost towards half pixels.  Scale-free.

    The noise by Immerkaer's estimate (J. Immerkaer, "Fast noise variance estimation", 1996): the mean
    ``|L * I|`` of the Laplacian difference ``L`` that cancels planes and ramps, ``sigma = sqrt(pi / 2)
    mean |L * I| / 6``; the signal's gradient energy as the mean ``|grad (G_1 * I)|^2`` less the
    noise's own share of it.  Over the pixels whose stencils lie inside the image and ``mask``
    (``(B or 1, 1, H, W)`` or ``None``), on ``grid x grid`` tiles of :data:`_NOISE_TILE` px spread
    evenly over a large image (:data:`_NOISE_TILED_PIXELS`; the whole of a smaller one); a pair whose
    four tiles show no signal beyond their noise or hold under 64 counted pixels (a scene on black,
    a mask's region of interest between them: they had read as all noise, or none) is measured again
    on 16 (not on its whole image: a 1024^2 one's temporaries had taken register's peak from 2.7x to
    6.5x its input).  0 (no noise to speak of) where fewer than 64 pixels count or the image is flat
    (no noise and no signal), inf where the noise is all there is.  Second, per pair and channel, the
    noise variance alone (Immerkaer's estimate over that channel's pixels; 0 where fewer than 64
    pixels count).  A stride-0 batch (one image for every pair) is measured once."""
    batch, channels, height, width = image.shape
    if image.stride(0) == 0 and batch > 1 and (mask is None or mask.shape[0] == 1 or mask.stride(0) == 0):
        ratio, variance = _noise_measures(image[:1], None if mask is None else mask[:1], grid=grid)
        return ratio.expand(batch).clone(), variance.expand(batch, -1).clone()
    tiled = height * width > _NOISE_TILED_PIXELS and min(height, width) >= 2 * grid * _NOISE_TILE
    parts = _chunks.chunk_slices(batch, channels * (grid**2 * _NOISE_TILE**2 if tiled else height * width),
                                 _chunks.eager_budget(image.device))
    if len(parts) > 1:  # in chunks of pairs: its half-dozen temporaries of the whole batch's tiles had
        # raised a batch's peak memory (16 x 256^2, register: 2.82 -> 3.16x its input)
        own = lambda part: mask if mask is None or mask.shape[0] == 1 else mask[part]  # noqa: E731
        measures = [_noise_measures(image[part], own(part), grid=grid) for part in parts]
        return torch.cat([ratio for ratio, _ in measures]), torch.cat([variance for _, variance in measures])
    whole_image = image
    mask_given = None if mask is None else mask.expand(batch, *mask.shape[1:])
    tiles = 1
    if tiled:
        size = _NOISE_TILE
        centres = [(2 * k + 1) / (2 * grid) for k in range(grid)]  # 1/4 and 3/4 for 2 a side
        corners = [(int(height * i) - size // 2, int(width * j) - size // 2) for i in centres for j in centres]
        image = torch.cat([image[..., y:y + size, x:x + size] for y, x in corners])
        if mask is not None:
            mask = torch.cat([mask_given[..., y:y + size, x:x + size] for y, x in corners])
        tiles, height, width = len(corners), size, size
    planes = image.reshape(tiles * batch * channels, 1, height, width)
    if planes.dtype not in (torch.float32, torch.float64):
        planes = planes.float()
    edge = 5  # the 1 px Gaussian's radius (4) and the central difference's
    if min(height, width) <= 2 * edge + 2:
        return torch.zeros(batch, dtype=torch.float64), torch.zeros(batch, channels, dtype=torch.float64)
    laplacian = torch.tensor(_IMMERKAER, dtype=planes.dtype, device=planes.device)[None, None]
    response = torch.nn.functional.conv2d(planes, laplacian).abs()  # (TBC, 1, H - 2, W - 2)
    smoothed = gaussian_blur(planes, 1.0)
    gx = (smoothed[..., 1:-1, 2:] - smoothed[..., 1:-1, :-2]) * 0.5
    gy = (smoothed[..., 2:, 1:-1] - smoothed[..., :-2, 1:-1]) * 0.5
    energy = (gx * gx + gy * gy)[..., edge - 1:-(edge - 1), edge - 1:-(edge - 1)]  # (TBC, 1, H - 2e, W - 2e)
    if mask is None:
        noise_weight = energy_weight = None
    else:
        outside = 1.0 - mask.to(planes.dtype).expand(tiles * batch, 1, height, width)
        noise_weight = (1.0 - torch.nn.functional.max_pool2d(outside, 3, stride=1)).repeat_interleave(channels, 0)
        energy_weight = (1.0 - torch.nn.functional.max_pool2d(outside, 2 * edge + 1, stride=1)
                         ).repeat_interleave(channels, 0)

    def pair_mean(values: torch.Tensor, weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per pair the weighted mean and count; then per tile, pair and channel the sums and counts."""
        if weight is None:
            total = values.sum(dim=(1, 2, 3), dtype=torch.float64)
            count = torch.full_like(total, float(values.shape[-1] * values.shape[-2]))
        else:
            total = (values * weight).sum(dim=(1, 2, 3), dtype=torch.float64)
            count = weight.sum(dim=(1, 2, 3), dtype=torch.float64)
        # tiles are stacked tile-major: (T, B, C) -> per pair
        total, count = total.reshape(tiles, batch, channels), count.reshape(tiles, batch, channels)
        return total.sum((0, 2)) / count.sum((0, 2)).clamp_min(1.0), count.sum((0, 2)), total, count

    absolute, noise_count, channel_total, channel_count = pair_mean(response, noise_weight)
    gradient, energy_count, _, _ = pair_mean(energy, energy_weight)
    channel_count = channel_count.sum(0)  # (B, C)
    channel_variance = _immerkaer_variance(channel_total.sum(0) / channel_count.clamp_min(1.0))
    channel_variance = torch.where(channel_count >= 64, channel_variance, torch.zeros_like(channel_variance)).cpu()
    noise = _immerkaer_variance(absolute)
    signal = gradient - noise * _noise_gradient_energy(1.0)
    # a flat image (no gradient, no noise; a tile of zero background) has nothing to pull: 0, not inf
    ratio = torch.where(signal > 0, noise * _half_pixel_noise_drop(1.0) / signal.clamp_min(1e-300),
                        torch.where(gradient > 0, math.inf, 0.0))
    enough = (noise_count >= 64 * channels) & (energy_count >= 64 * channels)
    ratio = torch.where(enough, ratio, torch.zeros_like(ratio)).cpu()
    if tiled and grid == 2:  # flat tiles, or tiles outside a mask, said nothing of the content between them
        own_mask = lambda pair: None if mask_given is None else mask_given[pair:pair + 1]  # noqa: E731
        for pair in (~((signal > 0) & enough)).cpu().nonzero()[:, 0].tolist():
            ratio[pair], channel_variance[pair] = (
                part[0] for part in _noise_measures(whole_image[pair:pair + 1], own_mask(pair), grid=4))
    return ratio, channel_variance


def _noise_adapted_sigmas(ratios: torch.Tensor, coherence: list[float], base: float,
                          largest: float) -> list[float]:
    """Per pair, the full-resolution sigma (:data:`NOISE_BIAS_LIMIT`): ``base`` unless the pair's noise
    pull, its :func:`_noise_to_structure` ratio (``ratios``, the larger of its two images') times
    ``B(sigma) / B(1)`` times the share of it that its transform keeps (``PHASE_INCOHERENT_SHARE +
    (1 - PHASE_INCOHERENT_SHARE) x coherence``, :func:`_phase_coherence`), is above the limit at
    ``base``; then the smallest multiple of :data:`NOISE_SMOOTHING_STEP` that keeps it below, at
    most ``largest``.  Each pair's own images and transform decide: a pair's sigma does not depend
    on its batch."""
    reference = _half_pixel_noise_drop(1.0)
    sigmas = []
    for ratio, share in zip(ratios.tolist(), coherence):
        pull = ratio * (PHASE_INCOHERENT_SHARE + (1.0 - PHASE_INCOHERENT_SHARE) * share) / reference
        sigma = base
        if not pull * _half_pixel_noise_drop(base) <= NOISE_BIAS_LIMIT:  # NaN: raised
            sigma = max(base, largest)
            candidate = math.ceil(base / NOISE_SMOOTHING_STEP) * NOISE_SMOOTHING_STEP
            while candidate < largest:
                if candidate > base and pull * _half_pixel_noise_drop(candidate) <= NOISE_BIAS_LIMIT:
                    sigma = candidate
                    break
                candidate += NOISE_SMOOTHING_STEP
        sigmas.append(float(sigma))
    return sigmas


def _phase_coherence(matrix: torch.Tensor, size: tuple[int, int]) -> list[float]:
    """Per pair, how much the moving image's samples over the fixed grid share one sub-pixel phase,
    at ``matrix`` (``(B, 3, 3)``, fixed -> moving pixels) on a fixed image of ``size`` ``(H, W)``: 1 for
    a translation, near 0 where a rotation or a scale spreads the phases over whole pixels.

    Resampled noise pulls the cost towards half pixels by a first harmonic in each pixel's phase;
    the cost's mean over the fixed pixels keeps ``|mean_x exp(2 pi i u(x))|`` of it along a moving
    axis whose coordinate is ``u = a x + b y + c``.  Over a ``W x H`` grid that is a product of
    Dirichlet kernels, ``|D_W(a) D_H(b)|`` with ``D_N(a) = sin(pi N a) / (N sin(pi a))`` (1 where
    ``a`` is whole); the larger of the two axes' is returned.  On a 256^2 image a rotation of 3
    degrees keeps 2 % of the pull, of 1 degree 7 %, of 0.1 degree 70 %, of 0.03 degree 97 %.  A
    matrix that is not finite (a start gone wrong) keeps all of it, as a translation."""
    height, width = size
    linear = matrix[:, :2, :2].detach().to(device="cpu", dtype=torch.float64)
    counts = torch.tensor([float(width), float(height)], dtype=torch.float64)  # x's and y's coefficients
    angle = math.pi * (linear - linear.round())
    denominator = counts * torch.sin(angle)
    whole = denominator.abs() < 1e-12
    kernel = torch.where(whole, 1.0, torch.sin(angle * counts) / torch.where(whole, 1.0, denominator)).abs()
    return kernel.prod(dim=2).amax(dim=1).nan_to_num(nan=1.0).tolist()


def _make_level(fixed, moving, fixed_mask, moving_mask, factor: int, sigma: float,
                moving_scale: Optional[list[float]] = None, *, in_place: bool = False,
                sigmas: Optional[list[float]] = None) -> _Level:
    """Smooth, then area-downsample the images and masks of one level.

    At factor 1 with ``sigma > 0`` (:func:`_smooth_full_resolution`), ``moving_scale`` (per pair, the
    current transform's ``sqrt|det L|``, moving pixels per fixed pixel) scales the moving image's sigma,
    so that both images are smoothed alike in the fixed image's frame; without a fixed mask, the fixed
    pixels nearest the border (a band of ``ceil(sigma)``), whose smoothing took the most made-up
    values beyond it, are left out: the level's fixed image is the interior, its pixel ``x`` the
    full-resolution pixel ``x + band`` (``shrink``); with one, the mask's pixels within
    :data:`MASK_EDGE_BANDS` bands of its edge or the border (:func:`_without_edge_band`).
    ``in_place``: the images are the caller's own copies, which the smoothing may overwrite.
    ``sigmas``: at factor 1, per pair, the sigma each pair's images are smoothed by in place of
    ``sigma`` (:func:`_noise_adapted_sigmas`); the border band (crop or mask edge) stays ``sigma``'s,
    so that the level's shape is the same whatever the batch.
    """
    residual = max(sigma**2 - (factor**2 - 1) / 12.0, 0.0) ** 0.5 / factor
    if factor != 1 or sigmas is None or all(value == sigma for value in sigmas):
        sigmas = None
    smoothing = residual  # what the images are smoothed by (the band below is residual's whatever it is)
    if sigmas is not None and len(set(sigmas)) == 1:  # one sigma for the batch: a shared image (one for
        smoothing, sigmas = sigmas[0], None  # every pair) smoothed once, not copied per pair

    def shrink_mask(mask):
        # a level pixel counts where enough of its block does (MASK_BLOCK_INSIDE); the full-resolution
        # level, which decides the result, has no blocks
        return None if mask is None else (downsample(mask, factor) >= MASK_BLOCK_INSIDE).to(mask.dtype)

    fixed_weight = shrink_mask(fixed_mask)
    cropped = False
    if factor == 1 and (smoothing > 0 or sigmas is not None):
        fixed_level = _smooth_full_resolution(fixed, fixed_mask, smoothing, in_place=in_place, sigmas=sigmas)
        moving_level = _smooth_full_resolution(moving, moving_mask, smoothing, moving_scale, in_place=in_place,
                                               sigmas=sigmas)
        band = max(1, math.ceil(residual))
        # a fixed pixel near the border was smoothed with made-up values: the level is the fixed image
        # without that band (a crop, not a weight image: no image-sized weight, fewer pixels).  With a
        # fixed mask, which may hold little more than the band (a row became "no overlap"), the mask
        # loses its edge bands instead, where enough of it is left
        if fixed_mask is None and min(fixed.shape[-2:]) >= 8 * band:
            fixed_level = fixed_level[..., band:-band, band:-band].contiguous()
            cropped, offset = True, float(band)
        elif fixed_mask is not None:
            fixed_weight = _without_edge_band(fixed_weight, MASK_EDGE_BANDS * band)
    else:
        # Area-average first, then smooth at the level's resolution with the remaining
        # sigma (variances add: the box filter already has about f^2 / 12): the same
        # anti-aliasing for a fraction of the cost of blurring the full image.
        fixed_level, moving_level = (_coarse_image(image, mask, factor, residual)
                                     for image, mask in ((fixed, fixed_mask), (moving, moving_mask)))
    # level -> full-resolution pixels, made once per value and device (constant()): a tensor from host
    # data is a waiting copy on a GPU; the inverse written out, as linalg.inv's error check waits on a GPU
    if cropped:  # fixed: x_full = x + band; the moving image is whole (factor 1: no change)
        scale = constant(((1.0, 0.0, offset), (0.0, 1.0, offset), (0.0, 0.0, 1.0)), like=fixed)
        inverse = constant(_shrink_values(1.0), like=fixed)
    else:  # x_full = f x + (f - 1) / 2
        scale = constant(_shrink_values(factor), like=fixed)
        inverse = constant(_shrink_values(1.0 / factor), like=fixed)
    return _Level(
        fixed=fixed_level,
        moving=moving_level,
        fixed_weight=fixed_weight,
        moving_mask=shrink_mask(moving_mask),
        shrink=scale,
        shrink_inverse=inverse,
        axes=pixel_axes(fixed_level.shape[-2:], dtype=fixed.dtype, device=fixed.device),
        factor=factor,
        # inside [0, W-1] x [0, H-1] in moving pixels <=> |u| <= 1 - 1/W, |v| <= 1 - 1/H; no rounding to
        # spare, on purpose: a point u rounds one unit above the limit has x a little past W - 1, where
        # grid_sample's border padding gives it a zero derivative (docs/design.md, "Same numbers")
        inside_limit=(1.0 - 1.0 / moving_level.shape[-1], 1.0 - 1.0 / moving_level.shape[-2]),
    )


#: A fixed mask at the smoothed full-resolution level leaves out this many smoothing bands
#: (``ceil(sigma)`` px each) along its edge and the image's border (:func:`_without_edge_band`).
MASK_EDGE_BANDS = 2


def _without_edge_band(mask: torch.Tensor, band: int) -> torch.Tensor:
    """A 0/1 mask ``(B, 1, H, W)`` without the pixels within ``band`` px (chessboard distance) of a
    pixel outside it or of the image's border; per pair, the mask itself where that leaves fewer
    than half of its pixels (a mask of a row or two).

    The fixed image is smoothed inside its mask only (normalised convolution), the moving image over
    what it holds: near the mask's edge the two differ as a one-sided and a whole Gaussian do, and a
    mask through the middle of the content pulled the result 0.03-0.2 px (a similarity pair of
    96 x 112, 0.001-0.003 px unsmoothed); without a mask, the crop of the same band at the border."""
    if band < 1:
        return mask
    outside = torch.nn.functional.pad(1.0 - mask, (band,) * 4, value=1.0)
    eroded = 1.0 - torch.nn.functional.max_pool2d(outside, 2 * band + 1, stride=1)
    enough = eroded.sum((-1, -2, -3)) * 2 >= mask.sum((-1, -2, -3))
    return torch.where(enough[:, None, None, None], eroded, mask)


#: The moving image's scale factor at full resolution is rounded to a multiple of this, so that a
#: batch's pairs of nearly one scale share one smoothing call.
_SCALE_STEP = 0.05


def _scale_groups(scales: Optional[list[float]], batch: int,
                  sigmas: Optional[list[float]] = None) -> dict[Any, list[int]]:
    """The pairs (indices) of each moving-image scale, rounded to multiples of :data:`_SCALE_STEP`
    within ``[1/8, 8]``; ``None``: every pair at scale 1.  With per-pair ``sigmas``, of each
    ``(sigma, rounded scale)``."""
    groups: dict[Any, list[int]] = {}
    for index, scale in enumerate([1.0] * batch if scales is None else scales):
        scale = scale if math.isfinite(scale) else 1.0  # a degenerate start: its cost says no overlap
        rounded = round(min(max(scale, 0.125), 8.0) / _SCALE_STEP) * _SCALE_STEP
        groups.setdefault(rounded if sigmas is None else (sigmas[index], rounded), []).append(index)
    return groups


def _smooth_full_resolution(image: torch.Tensor, mask: Optional[torch.Tensor], sigma: float,
                            scales: Optional[list[float]] = None, *, in_place: bool = False,
                            sigmas: Optional[list[float]] = None) -> torch.Tensor:
    """``image`` ``(B, C, H, W)`` smoothed by a Gaussian of ``sigma * scales[b]`` pixels per pair.

    With a ``mask``, by normalised convolution, ``G * (I m) / G * m``: a counted pixel is smoothed over
    counted pixels only, or the no-data beyond a mask's edge (a border, a hole) bleeds 2-3 sigma into
    the pixels that decide the result.  The scales are rounded to multiples of :data:`_SCALE_STEP`
    (within ``[1/8, 8]``), and pairs of one rounded scale are smoothed in one call.  ``in_place``:
    ``image`` is the caller's own copy; without a mask and with one scale it is smoothed in itself
    (an image-sized copy less at the peak).  ``sigmas``: per pair, in place of ``sigma`` (a
    stride-0 batch, one image for every pair, is smoothed per pair where they differ).
    """
    if sigmas is not None and image.shape[0] != len(sigmas):
        image = image.expand(len(sigmas), *image.shape[1:])
    groups = _scale_groups(scales, image.shape[0], sigmas)

    def effective(key) -> float:
        return sigma * key if sigmas is None else key[0] * key[1]

    def smooth(part: torch.Tensor, part_mask: Optional[torch.Tensor], part_sigma: float) -> torch.Tensor:
        if part_mask is None:
            return gaussian_blur(part, part_sigma)
        return _normalized_blur(part * part_mask, part_mask, part_sigma)

    if in_place and mask is None and image.is_contiguous():
        # each group's runs of consecutive pairs are views, smoothed in themselves: no image-sized
        # result beside the input (16 x 256^2 mixing noisy and clean pairs peaked at 3.9x, 2.7x now)
        for key, indices in groups.items():
            for run in _runs(indices):
                gaussian_blur_in_place(image[run], effective(key))
        return image
    if len(groups) == 1:
        (key,) = groups
        return smooth(image, mask, effective(key))
    # one image for every pair (stride 0), and one mask or none: smoothed once per group, and
    # broadcast into the group's pairs (not gathered into a copy per pair first)
    shared = image.stride(0) == 0 and (mask is None or mask.shape[0] == 1 or mask.stride(0) == 0)
    result = torch.empty(image.shape, dtype=image.dtype, device=image.device)
    for key, indices in groups.items():
        index = torch.tensor(indices, device=image.device)
        if shared:
            result[index] = smooth(image[:1], None if mask is None else mask[:1], effective(key))
            continue
        part_mask = None if mask is None else mask.expand(image.shape[0], *mask.shape[1:])[index]
        result[index] = smooth(image[index], part_mask, effective(key))
    return result
