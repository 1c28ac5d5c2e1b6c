"""Image similarity metrics with their exact derivative with respect to the warped image.

A metric compares the warped moving image ``x`` with the fixed image ``y``
over weighted pixels (``weight``: 1 where a pixel counts, 0 where not) and
returns a **cost per image pair** (lower is better)::

    metric(x, y, weight)                 -> cost (B,)
    metric(x, y, weight, gradient=True)  -> (cost (B,), d cost / d x  (B, C, H, W))

The derivative is what the analytic path multiplies with the moving
image's gradient: one sampler-derivative pass then gives ``dL/dA``
(:func:`tireg.analytic.cost_and_gradient`).  The costs are written with
plain differentiable tensor operations too, so autograd gives the same
gradient; the tests hold the two to 1e-11 in float64.  The weight is taken as
a constant (which fixed pixels count changes only by whole pixels).  Weights
are real (a complex weight is refused: its cast dropped the imaginary part, and
``1j`` weighed 0), at least 0 (not checked: a check reads the values, a wait on a GPU), and
only their ratios count (a mean's ``sum w``; local NCC's ``eps`` is absolute).
A NaN in ``x`` or ``y`` makes its pair's cost NaN, as in any sum, where its
weight is 0 too (``0 x NaN``); ``register`` refuses NaN and Inf in its images.

=================================  ==========================================================
metric                             cost
=================================  ==========================================================
:class:`PerPixelMetric` (loss)     ``sum_c sum w rho(x - y) / (C sum w)`` (or the plain sum)
:class:`NCC`                       ``1 - ncc`` (``sign="positive"``) or ``1 - ncc^2`` (``"any"``)
:class:`LocalNCC`                  the same per window of ``(2 r + 1)^2`` pixels, averaged
:class:`MutualInformation`         ``-MI`` from a Parzen (cubic B-spline) joint histogram (Mattes)
:class:`NormalizedMutualInformation`  ``-(H(F) + H(M)) / H(F, M)`` (Studholme)
=================================  ==========================================================

Sums of parts.  :class:`NCC`, :class:`MutualInformation` and
:class:`NormalizedMutualInformation` are functions of sums over pixels
(NCC's means and centred sums, the joint histogram's counts), so one pair
can be evaluated part by part (``register`` and the analytic models do, in
bands of rows of one large pair, to keep its memory to a band's) in two
passes::

    sums = metric.merged_sums([metric.sums(x_b, y_b, w_b) for each part b])
    cost, terms = metric.cost_of_sums(sums, gradient=True)
    d cost / d x_b = metric.derivative(x_b, y_b, w_b, terms)

The same cost and derivative as ``metric(x, y, w, gradient=True)``, to
rounding.  Mutual information's parts need the whole images' ranges
(:meth:`MutualInformation.set_ranges`).  Where ``additive_sums`` (the
histograms' counts) ``merged_sums`` adds the parts elementwise, so
``d cost / d sums_b`` is ``d cost / d sums`` for every part and a running
sum is all a caller keeps; NCC's parts, each centred on its own means,
merge otherwise (``register``'s autograd path differentiates through
:meth:`NCCStatistics.merged`, keeping every part's eight numbers).
:class:`LocalNCC`'s windows cross parts by their radius instead:
:meth:`LocalNCC.part` takes a band with a margin of :attr:`LocalNCC.margin`
rows, in one pass.

References: Evangelidis & Psarakis 2008 (ECC, NCC); Mattes et al. 2003
(Parzen-window MI with B-splines, its derivative); Studholme et al. 1999 (NMI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _chunks
from ._validation import (
    FLOAT_DTYPES, TensorStamp, check_dense, check_flag, check_real, check_same_kind, finite_number, is_whole, matches,
)
from .losses import LOSSES, PerPixelLoss, get_loss, loss_and_derivative

__all__ = [
    "Metric",
    "PerPixelMetric",
    "NCC",
    "LocalNCC",
    "MutualInformation",
    "NormalizedMutualInformation",
    "METRICS",
    "METRIC_NAMES",
    "get_metric",
]

MetricOutput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
_TINY = 1e-12


def _weight(weight: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` weights; all ones when ``None``."""
    return torch.ones_like(x[:, :1]) if weight is None else weight


def _inputs(metric: "Metric", x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_checked_weight`, all ones where there is none (:func:`_weight`)."""
    return _weight(_checked_weight(metric, x, y, weight), x)


def _weight_divisor(weight_sum: torch.Tensor) -> torch.Tensor:
    """A sum of weights (a count of weighted pixels) as a mean's divisor: clamped at the dtype's
    smallest normal number, so that an empty pair's mean is 0 and any other's is its own for
    weights of any scale (only their ratios count: module docstring).  The one rule of every
    metric's weighted means: :class:`PerPixelMetric` (:func:`_mean_count`), :class:`NCC`'s means
    and moments, :class:`LocalNCC`'s window sums and count, the joint histograms' probabilities.
    Clamped at 1, weights summing below 1 (normalised, or a scaled mask) were no mean (0.0071 for
    0.0136); clamped at an absolute 1e-12, NCC, MI, NMI and LNCC changed once the weights summed
    below it (MI -0.18 for -1.49 with the weights times 1e-15)."""
    return weight_sum.clamp_min(torch.finfo(weight_sum.dtype).tiny)


def _mean_count(weight_sum: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-pixel mean's divisor ``C sum w`` ``(B,)`` (:func:`_weight_divisor`): one rule for
    :class:`PerPixelMetric` and the paths that sum its terms themselves (chunks, bands, the fused
    kernel), where chunked sums had given another mean than whole."""
    return _weight_divisor(weight_sum * channels)


def _accumulated(x: torch.Tensor) -> Optional[torch.dtype]:
    """float32 for float16 and bfloat16 ``x``, whose sums over an image leave their range or
    precision (65,536 weights of 1 are beyond float16's 65,504: a mean of 0 or inf); else ``None``
    (``x``'s own dtype)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None


def _gradient_flag(metric: "Metric", gradient) -> bool:
    """A metric's ``gradient`` argument, a bool (:func:`tireg._validation.check_flag`: ``"no"`` was
    taken for true, a tensor raised "Boolean value of Tensor ... is ambiguous")."""
    return check_flag(gradient, "gradient", f"{type(metric).__name__}()")


def _checked_weight(
    metric: "Metric", x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """Check a metric's ``x``, ``y`` (float ``(B, C, H, W)`` of one shape) and ``weight``
    (real, ``(B, 1, H, W)`` or ``(1, 1, H, W)``, converted to ``x``'s dtype); return the weight.  A
    mistake surfaced as a reshape, broadcast or scatter error deep inside.  Shapes only: no value
    is read (a wait on a GPU in a loop)."""
    name = f"{type(metric).__name__}()"
    # float16 and bfloat16 lose a pooling metric's sums (local NCC read 2.83 for 0.83, mutual
    # information NaN); a per-pixel loss keeps them (mixed precision)
    floats = "a float" if isinstance(metric, PerPixelMetric) else "a float32 or float64"
    for label, tensor in (("x", x), ("y", y)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or not (
                tensor.dtype in FLOAT_DTYPES or tensor.is_floating_point() and isinstance(metric, PerPixelMetric)):
            raise ValueError(f"{name}: '{label}' must be {floats} tensor (B, C, H, W); got "
                             f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}"
                             f"{'' if not isinstance(tensor, torch.Tensor) else ' ' + str(tensor.dtype)}")
    if x.shape != y.shape:
        raise ValueError(f"{name}: 'x' and 'y' must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    if 0 in x.shape[1:]:  # a ZeroDivisionError, an IndexError from amin, or a cost of 1 (no batch: no costs)
        raise ValueError(f"{name}: 'x' and 'y' have no pixels; got shape {tuple(x.shape)}")
    # float32 with float64 gave NCC's derivative in float64, and a per-pixel loss's check blamed the loss
    check_same_kind(y, "y", x, "x", name)
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: 'weight' must be a torch.Tensor; got {type(weight).__name__}")
    if weight is not None:  # a complex weight lost its imaginary part in the cast below: 1j weighed 0
        check_dense(weight, "weight", name)
        check_real(weight, "weight", name)
    if weight is not None and (weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[-2:] != x.shape[-2:]
                               or weight.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"{name}: 'weight' must be (B, 1, H, W) or (1, 1, H, W) for images {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}")
    if weight is not None and weight.dtype != x.dtype:  # a bool or float64 mask with float32 images
        weight = weight.to(x.dtype)
    return weight


class Metric:
    """Base class: ``metric(x, y, weight=None, gradient=False)``; see the module docstring.
    ``gradient`` is a bool (``TypeError`` otherwise: ``"no"`` had been taken for true).

    Attributes:
        per_pixel: whether the cost is a (weighted) sum of per-pixel terms.
            ``register`` runs Levenberg-Marquardt for :class:`PerPixelMetric`
            (its loss) and :class:`NCC`, and their subclasses that keep the
            class's ``__call__`` (its cost); L-BFGS for the others.
        any_contrast: whether a match may have any intensity relation
            (inverted, or another modality): then ``register`` also tries
            initialisations found on the inverted moving image (with the
            search of ``init="auto"`` only for the pairs whose own start
            scores below ``initialize.AUTO_THRESHOLD``).
        linear_intensity: whether the metric takes the moving image's
            intensities for a linear function of the fixed image's
            (``a F + b``, ``a > 0``; ``a < 0`` too for ``ncc_any`` and
            ``lncc_any``; ``lncc``: window by window).  Smoothing commutes with
            such a relation, so ``register`` smooths its full-resolution
            level for these metrics by default (not with ``optimizer="sgd"``)
            (:data:`tireg.register.FINEST_SMOOTHING`); with another relation
            (a gamma, another channel) it does not, and smoothing moved the
            optimum: ``mi`` and ``nmi`` take a lighter default
            (:data:`tireg.register.FINEST_SMOOTHING_MI`), a metric of one's
            own none (docs/design.md, "Smoothing at full resolution").
    """

    per_pixel = False
    any_contrast = False
    linear_intensity = False

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None, gradient: bool = False
    ) -> MetricOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PerPixelMetric(Metric):
    """A per-pixel loss as a metric: ``sum_c sum_x w rho(x - y)``, divided by ``C sum w`` when ``mean``.

    ``mean=False`` gives the plain sum of the seed's models.
    """

    per_pixel = True
    linear_intensity = True

    def __init__(self, loss: Union[str, PerPixelLoss] = "l2", *, mean: bool = True):
        self.loss = get_loss(loss, "PerPixelMetric()")
        self.mean = check_flag(mean, "mean", "PerPixelMetric()")  # mean="no" was taken, and truthy

    def __call__(self, x, y, weight=None, gradient=False):
        gradient = _gradient_flag(self, gradient)
        weight = _checked_weight(self, x, y, weight)  # the shapes, as the other metrics (no ones image)
        return self.weighted(x, y, self.term_weights(x, weight), gradient)

    def term_weights(
        self, x: torch.Tensor, weight: Optional[torch.Tensor] = None, *, weight_sum: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, float, None]:
        """The weight ``s`` of each pixel's term in the cost, ``cost = sum_c sum_x s rho(x - y)``.

        With ``mean``, ``s = w / (C sum w)`` (0 where ``sum w = 0``), ``(B, 1, H, W)``, or
        ``1 / (C H W)`` as a number without weights; otherwise ``w`` (``None``: 1).
        ``weight_sum``: ``sum w`` per pair ``(B,)`` where the caller has it already.  float16 and
        bfloat16 sum in float32 (65,536 pixels' weights are beyond float16's range).
        """
        if not self.mean:
            return weight
        if weight is None:  # a number: no tensor made on the host and copied to the device
            return 1.0 / (x.shape[1] * x.shape[-2] * x.shape[-1])
        weight_sum = weight.flatten(1).sum(1, dtype=_accumulated(x)) if weight_sum is None else weight_sum
        return weight / _mean_count(weight_sum, x.shape[1])[:, None, None, None]

    def weighted(
        self, x: torch.Tensor, y: torch.Tensor, term_weights: Union[torch.Tensor, float, None], gradient: bool = False
    ) -> MetricOutput:
        """``cost = sum_c sum_x s rho(x - y)`` and, with ``gradient``, ``d cost / d x = s rho'(x - y)``.

        ``term_weights`` is :meth:`term_weights`' ``s``: an image ``(B, 1, H, W)``, a number or
        ``None`` (1).  A caller that needs ``s`` itself (register's Gauss-Newton weights) makes
        it once and passes it here: one product per image instead of a weight and a division.
        """
        if gradient:
            per_pixel, derivative = loss_and_derivative(self.loss, x, y)
        else:
            per_pixel, derivative = self.loss(x, y), None
        if isinstance(term_weights, torch.Tensor):
            per_pixel = per_pixel * term_weights
        accumulated = _accumulated(x)
        cost = per_pixel.flatten(1).sum(1, dtype=accumulated)
        if term_weights is not None and not isinstance(term_weights, torch.Tensor):
            cost = cost * term_weights
        if derivative is not None and term_weights is not None:
            derivative = derivative * term_weights
        if accumulated is not None:  # float16 / bfloat16: summed in float32, returned in x's dtype
            cost, derivative = cost.to(x.dtype), None if derivative is None else derivative.to(x.dtype)
        return (cost, derivative) if gradient else cost

    def __repr__(self) -> str:
        return f"PerPixelMetric({self.loss!r}, mean={self.mean})"


def _flat_variance(variance: torch.Tensor, mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Whether values of this ``mean`` over ``count`` (weighted) pixels are flat: their summed
    squared deviation ``variance`` within rounding of the values, ``variance <= count (4 eps mean)^2``.

    Relative to the values, so the same for images of any gain; a flat image's centred values
    are the mean's rounding error, a few ``eps |mean|`` each, not zeros (and the score of such
    values is near 0 anyway: they are all alike).  Four, not more: the rule also calls an image
    of real detail flat if its deviation is below ``4 eps |mean|`` (64 took float32 detail of
    deviation 0.0076 on an offset of 1000 for flat).  One rule for :class:`NCC` and the
    initialiser's overlap score (:func:`tireg.initialize.overlap_ncc`).
    """
    tolerance = (4.0 * torch.finfo(variance.dtype).eps) ** 2
    return variance <= mean.square() * count * tolerance


def _check_sign(sign: str, caller: str) -> str:
    if sign not in ("positive", "any"):
        raise ValueError(f"{caller}: unknown sign {sign!r}; choose 'positive' or 'any'")
    return sign


class NCCStatistics(NamedTuple):
    """:meth:`NCC.deviations`' sums over the weighted pixels of each pair (or of a part of it, such
    as a band of rows; :meth:`merged` adds parts up), all ``(B,)``.  ``x~ = x - x_mean`` with the
    mean as rounded: its ``residual`` ``sum w x~`` is not quite 0."""

    count: torch.Tensor  # n = C sum w
    x_mean: torch.Tensor  # sum w x / n
    y_mean: torch.Tensor
    x_residual: torch.Tensor  # sum w x~
    y_residual: torch.Tensor
    x_scatter: torch.Tensor  # sum w x~^2: n times the variance
    y_scatter: torch.Tensor
    cross: torch.Tensor  # sum w x~ y~: n times the covariance

    @staticmethod
    def merged(parts: Sequence["NCCStatistics"]) -> "NCCStatistics":
        """The sums of the union of disjoint ``parts``, each centred on its own means (Chan, Golub &
        LeVeque 1983), exactly: with ``r_b = sum_b w x~_b`` and ``d_b = mean_b - mean``,
        ``mean = sum_b (n_b mean_b + r_b) / n``, ``sum w x~^2 = sum_b (sum_b w x~_b^2 + 2 d_b r_b + n_b d_b^2)``
        and ``sum w x~ y~ = sum_b (sum_b w x~_b y~_b + d_b^x r_b^y + d_b^y r_b^x + n_b d_b^x d_b^y)``.
        No part's sums lose the digits that raw sums ``sum w x^2 - n mean^2`` cancel, and the
        residuals carry what each part's rounded mean left (a band 0.4 off the mean at an
        offset of 1000 in float32: 3e-4 of ``ncc`` without them, 1e-8 with)."""
        if len(parts) == 1:
            return parts[0]
        stacked = NCCStatistics(*(torch.stack(values) for values in zip(*parts)))  # each (parts, B)
        count = stacked.count.sum(0)
        x_mean, y_mean = ((stacked.count * means + residuals).sum(0) / _weight_divisor(count)
                          for means, residuals in ((stacked.x_mean, stacked.x_residual),
                                                   (stacked.y_mean, stacked.y_residual)))
        x_shift, y_shift = stacked.x_mean - x_mean, stacked.y_mean - y_mean
        scatter = lambda own, shift, residual: (own + (2.0 * residual + stacked.count * shift) * shift).sum(0)  # noqa: E731
        cross = (stacked.cross + x_shift * stacked.y_residual
                 + (stacked.x_residual + stacked.count * x_shift) * y_shift).sum(0)
        return NCCStatistics(count, x_mean, y_mean, (stacked.x_residual + stacked.count * x_shift).sum(0),
                             (stacked.y_residual + stacked.count * y_shift).sum(0),
                             scatter(stacked.x_scatter, x_shift, stacked.x_residual),
                             scatter(stacked.y_scatter, y_shift, stacked.y_residual), cross)


class NCCDeviations(NamedTuple):
    """:meth:`NCC.deviations`: the sums and the weighted deviations from the means, images ``(B, C, H, W)``."""

    statistics: NCCStatistics
    x: torch.Tensor  # w x~
    y: torch.Tensor  # w y~
    weight: torch.Tensor  # (B or 1, 1, H, W): w


class ECCSystem(NamedTuple):
    """:meth:`NCC.ecc_system`: what a Gauss-Newton or ECC step of NCC takes, in ``K`` parameters."""

    centred: torch.Tensor  # (B, K, K): sum w a~ a~^T / sd_x^2
    image: torch.Tensor  # (B, K): sum w x^ a~ / sd_x
    template: torch.Tensor  # (B, K): sum w y^ a~ / sd_x
    ncc: torch.Tensor  # (B,)


class NCC(Metric):
    """Global normalised cross-correlation over the weighted pixels, invariant to gain and offset.

    With weighted means removed, ``x~ = x - mean_w x`` and ``y~`` likewise,
    over all channels and pixels of a pair::

        ncc = sum w x~ y~ / sqrt(sum w x~^2  sum w y~^2)
        d ncc / d x_i = w_i (y~_i - (cov / var_x) x~_i) / sqrt(var_x var_y)

    ``sign="positive"`` (default) expects a positive correlation (same
    contrast) and the cost is ``1 - ncc``; ``sign="any"`` accepts inverted
    contrast too, cost ``1 - ncc^2``.  A pair with a flat image over its
    valid pixels has ``ncc = 0`` and no derivative: flat within rounding of
    its values (:func:`_flat_variance`), so the same for images of any gain
    (an absolute constant under the root had scored an aligned pair 0.30 at
    gain 1 and 0.64 at gain 1e-4).  The sums are in the images' dtype: in
    float32 the centred squares ``w x~^2`` leave its range for values below
    about 1e-18 or above 1e18 (a 32^2 pair of values in [0, 1.3] times 1e-22
    cost ``-inf``, times 1e18 1.0 (flat), times 1e19 NaN); give such images in
    float64 or rescaled (``register`` normalises its images).  Likewise detail
    on a large offset: flat means a deviation under ``4 eps |mean|``, 0.48 on a
    mean of 1e6 in float32, so detail of deviation 0.3 there has ``ncc = 0``
    and no derivative (float64 scores it 0.94); subtract the offset first.
    """

    linear_intensity = True

    def __init__(self, sign: str = "positive"):
        self.sign = _check_sign(sign, "NCC()")
        self.any_contrast = self.sign == "any"

    def __call__(self, x, y, weight=None, gradient=False):
        gradient = _gradient_flag(self, gradient)
        deviations = self.deviations(x, y, weight)
        cost = self.cost_of_sums(deviations.statistics)
        if not gradient:
            return cost
        return cost, self._derivative(deviations.x, deviations.y, deviations.statistics)

    # sums of parts (module docstring): NCCStatistics.merged adds parts up, each on its own means
    merged_sums = staticmethod(NCCStatistics.merged)
    additive_sums = False

    def sums(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> NCCStatistics:
        """:class:`NCCStatistics` of the pixels given (a part of each pair: a band of rows), which
        :meth:`merged_sums` adds up and :meth:`cost_of_sums` and :meth:`derivative` take."""
        return self.deviations(x, y, weight).statistics

    def _ncc(self, statistics: NCCStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ncc, 1 / (sd_x sd_y), flat)``, the norm 0 for a pair with a flat side."""
        flat, x_root, y_root = self._roots(statistics)
        inverse_norm = torch.where(flat, 0.0, x_root * y_root)
        return statistics.cross * inverse_norm, inverse_norm, flat

    def cost_of_sums(self, statistics: NCCStatistics, gradient: bool = False
                     ) -> Union[torch.Tensor, tuple[torch.Tensor, NCCStatistics]]:
        """The cost of a pair from its sums (:meth:`sums`, :meth:`merged_sums`): :meth:`cost_of` its
        ``ncc``; with ``gradient`` also what :meth:`derivative` takes (the sums themselves)."""
        cost = self.cost_of(self._ncc(statistics)[0])
        return (cost, statistics) if gradient else cost

    def derivative(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor],
                   statistics: NCCStatistics) -> torch.Tensor:
        """``d cost / d x`` at the pixels given (a part of each pair), of the pair whose sums over
        all its pixels are ``statistics``: the deviations are from the pair's means (the weight
        as given: a subclass whose :meth:`deviations` weights otherwise is not served here)."""
        w = _inputs(self, x, y, weight)
        centred = lambda values, mean: w * (values - mean[:, None, None, None])  # noqa: E731
        return self._derivative(centred(x, statistics.x_mean), centred(y, statistics.y_mean), statistics)

    def _derivative(self, x_deviation: torch.Tensor, y_deviation: torch.Tensor,
                    statistics: NCCStatistics) -> torch.Tensor:
        """``d cost / d x`` from the deviations ``w x~``, ``w y~`` and the pair's sums."""
        ncc, inverse_norm, flat = self._ncc(statistics)
        # d ncc / d x = (w y~ - (cov / var_x) w x~) / (sd_x sd_y); a flat pair's is 0 (its var_x as 1)
        slope = statistics.cross / torch.where(flat, 1.0, statistics.x_scatter)
        d_ncc = (y_deviation - slope[:, None, None, None] * x_deviation) * inverse_norm[:, None, None, None]
        scale = -1.0 if self.sign == "positive" else -2.0 * ncc[:, None, None, None]
        return scale * d_ncc

    def cost_of(self, ncc: torch.Tensor) -> torch.Tensor:
        """The cost of a correlation: ``1 - ncc`` (``sign="positive"``) or ``1 - ncc^2`` (``"any"``)."""
        return 1.0 - ncc if self.sign == "positive" else 1.0 - ncc * ncc

    def deviations(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> NCCDeviations:
        """The weighted means, centred sums and deviations ``w x~``, ``w y~`` of each pair
        (:class:`NCCDeviations`): what the cost, its derivative and :meth:`ecc_system` are made of::

            n = C sum w,  mean x = sum w x / n,  x~ = x - mean x,  sum w x~^2,  sum w x~ y~

        Sums of a part of the pixels (a band of rows) are centred on that part's means;
        :meth:`NCCStatistics.merged` adds parts up.
        """
        w = _inputs(self, x, y, weight)
        dims = (1, 2, 3)
        count = w.sum(dims) * x.shape[1]
        divisor = _weight_divisor(count)
        x_mean = (w * x).sum(dims) / divisor
        y_mean = (w * y).sum(dims) / divisor
        x_centred = x - x_mean[:, None, None, None]
        y_centred = y - y_mean[:, None, None, None]
        x_deviation, y_deviation = w * x_centred, w * y_centred
        statistics = NCCStatistics(count, x_mean, y_mean, x_deviation.sum(dims), y_deviation.sum(dims),
                                   (x_deviation * x_centred).sum(dims), (y_deviation * y_centred).sum(dims),
                                   (x_deviation * y_centred).sum(dims))
        return NCCDeviations(statistics, x_deviation, y_deviation, w)

    @staticmethod
    def _roots(statistics: NCCStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(flat, 1 / sd_x, 1 / sd_y)``: whether a side is flat (:func:`_flat_variance`), and the
        roots, of 1 on a flat side (no NaN for autograd to meet where it is not used).

        Two roots, not one of the product: ``var_x var_y`` leaves float32 for values near 1e10 or
        1e-10.
        """
        flat = (_flat_variance(statistics.x_scatter, statistics.x_mean, statistics.count)
                | _flat_variance(statistics.y_scatter, statistics.y_mean, statistics.count))
        return (flat, torch.where(flat, 1.0, statistics.x_scatter).rsqrt(),
                torch.where(flat, 1.0, statistics.y_scatter).rsqrt())

    @staticmethod
    def inverse_norms(statistics: NCCStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 / sd_x, 1 / sd_y)`` with ``sd_x^2 = sum w x~^2``, both 0 for a pair with a flat side."""
        flat, x_root, y_root = NCC._roots(statistics)
        return torch.where(flat, 0.0, x_root), torch.where(flat, 0.0, y_root)

    def ecc_system(
        self, statistics: NCCStatistics, second: torch.Tensor, total: torch.Tensor, along_x: torch.Tensor,
        along_y: torch.Tensor,
    ) -> "ECCSystem":
        """The step's system in any ``K`` parameters, from sums over the weighted values of their
        Jacobian rows ``a_i = d x_i / dp`` (``(B, K)`` and ``(B, K, K)``)::

            second = sum w a a^T,  total s = sum w a,  along_x = sum w x~ a,  along_y = sum w y~ a

        In the units of ``x^ = x~ / sd_x`` (the warped image centred and scaled to unit norm,
        ``sd_x^2 = sum w x~^2``), with ``a~ = a - s / n`` (``n = C sum w``) and ``y^`` as ``x^``:
        ``centred = sum w a~ a~^T / sd_x^2 = (second - s s^T / n) / sd_x^2``,
        ``image = sum w x^ a~ / sd_x = along_x / sd_x^2`` and
        ``template = sum w y^ a~ / sd_x = along_y / (sd_x sd_y)`` (``sum w x~ = sum w y~ = 0``).
        Linear in the rows: ``J``-mapped sums give the system in other parameters.  A flat pair's
        is zeros.
        """
        x_scale, y_scale = self.inverse_norms(statistics)
        inverse_variance = x_scale * x_scale
        outer = total[:, :, None] * total[:, None, :]
        centred = (second - outer / _weight_divisor(statistics.count)[:, None, None]) * inverse_variance[:, None, None]
        ncc = statistics.cross * (x_scale * y_scale)
        return ECCSystem(centred, along_x * inverse_variance[:, None], along_y * (x_scale * y_scale)[:, None], ncc)

    def normal_equations(self, system: "ECCSystem") -> tuple[torch.Tensor, torch.Tensor]:
        """The cost's gradient and Gauss-Newton matrix from :meth:`ecc_system`'s ``system``.

        ``1 - ncc = ||x^ - y^||^2 / 2``: a least-squares problem in ``x^``, whose Jacobian rows
        are ``(a~_i - x^_i b) / sd_x``; with ``v = grad ncc = template - ncc image``::

            H+ = centred - image image^T,     gradient -v

        ``1 - ncc^2 = min_t ||x^ - t y^||^2`` (variable projection, at ``t = ncc``): residual
        ``x^ - ncc y^``, matrix ``2 (H+ - v v^T)``, gradient ``-2 ncc v``.  Both matrices are
        positive semi-definite.
        """
        outer = lambda first, other: first[..., :, None] * other[..., None, :]  # noqa: E731
        gradient = system.template - system.ncc[:, None] * system.image  # d ncc / dp
        positive = system.centred - outer(system.image, system.image)
        if self.sign == "positive":
            return -gradient, positive
        return -2.0 * system.ncc[:, None] * gradient, 2.0 * (positive - outer(gradient, gradient))

    def ecc_gradient(self, system: "ECCSystem", matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ECC step's least-squares problem (Evangelidis & Psarakis 2008): its gradient, whose
        system with ``centred`` (``H``) gives ECC's step.

        ECC maximises the correlation of the linearised warped image ``x^ + A dp`` with ``y^``
        (``A`` the rows ``a~ / sd_x``; ``sign="any"``: with ``sign(ncc) y^``).  Its maximiser is
        ``dp = H^-1 (lambda template - image)`` with::

            lambda = (1 - image' H^-1 image) / (ncc - template' H^-1 image)

        the least-squares step of ``||x^ + A dp - lambda y^||^2 / 2``, whose gradient at ``dp = 0`` is
        ``image - lambda template``.  Unlike Gauss-Newton on ``x^ - y^``, whose linearised norm ties
        a step's size to the target's, the scale ``lambda`` lets a step from a poor start go as far
        as the correlation rises (a brick texture 11 px off: Gauss-Newton crept, 50 iterations to
        4.6 px; ECC 0.07 px).  Levenberg-Marquardt damps ``H`` with ``lambda`` held, so that a
        damped step shrinks (``lambda`` chosen again for each damping grew as the step shrank).
        ``matrix``: ``H`` as the caller solves with it for ``lambda`` (nearly undamped).

        Returns ``(gradient, ok)``; ``ok`` where ECC's step exists (``ncc - template' H^-1 image > 0``,
        ``lambda > 0``, finite; ECC itself stops where the first is not): elsewhere take another step.
        """
        sign = torch.ones_like(system.ncc) if self.sign == "positive" else torch.where(system.ncc < 0, -1.0, 1.0)
        template = system.template * sign[:, None]
        solved = torch.linalg.solve_ex(matrix, system.image[..., None])[0][..., 0]  # H^-1 image
        alpha = system.ncc * sign - (template * solved).sum(-1)
        scale = (1.0 - (system.image * solved).sum(-1)) / alpha
        gradient = system.image - scale[:, None] * template
        return gradient, (alpha > 0) & (scale > 0) & gradient.isfinite().all(-1)

    def __repr__(self) -> str:
        return f"NCC(sign={self.sign!r})"


def _box_sum(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over the ``(2r+1)^2`` window around every pixel, zeros outside; its own adjoint.

    Separable, by shifted adds: the ``2r + 1`` columns of the zero-padded image, then the rows of
    that (torch has no box filter).  For six 256^2 images at ``r = 4`` on one CPU thread: 0.9 ms,
    against 5.0 ms for two 1-D convolutions with rows of ones (the same sums) and 18.6 ms for
    ``avg_pool2d`` of the whole window times its size; a running sum (``cumsum``) rounds with the
    image's width and offset.

    A window wider than the image sums what one of the image's width does (``r = W - 1`` reaches
    every column from every column; rows alike): the radius is cut to that, exactly, so that a
    radius of 10^6 neither pads the image by it (terabytes) nor adds 2 r shifted copies.
    """
    height, width = image.shape[-2:]
    across, down = min(radius, width - 1), min(radius, height - 1)
    padded = F.pad(image, (across, across, down, down))
    columns = padded[..., :width].clone()  # (..., H + 2 down, W)
    for offset in range(1, 2 * across + 1):
        columns += padded[..., offset:offset + width]
    window = columns[..., :height, :].clone()
    for offset in range(1, 2 * down + 1):
        window += columns[..., offset:offset + height, :]
    return window


class LocalNCC(Metric):
    """Local (windowed) normalised cross-correlation, averaged over the weighted pixels.

    Per window ``W_i`` of ``(2 r + 1)^2`` pixels around pixel ``i`` (only
    weighted pixels enter its sums), ``lncc_i = cov_i / sqrt(var_x,i var_y,i + eps)``
    with the window sums ``cov_i = S_xy - S_x S_y / S_w`` and
    ``var_x,i = S_xx - S_x^2 / S_w`` (``S_xy = sum_{j in W_i} w_j x_j y_j``, ...:
    ``n_i`` times the window's covariance and variances, ``n_i = S_w``);
    the cost is ``1 - sum_i w_i lncc_i / sum w`` (``sign="positive"``) or with
    ``lncc_i^2`` (``"any"``), per channel and averaged over channels.  Robust
    to intensity changes that vary slowly across the image.  The derivative
    flows back through the window sums, whose adjoint is the same box sum.
    A window's variances are clamped at 0 (a flat window's difference of sums
    rounds below zero: the root was NaN).  The sums are of the values as they
    are: in float32, images on a large offset lose precision in them (an
    image against itself, 224 × 256: a cost of 0.269 at offset 0, 0.297 at 10,
    2.33 at 100): give them without it (``register`` normalises its images, or
    with ``normalize=False`` takes each one's mean off).  Shifting each image
    by its mean or its minimum here, at every call, made registrations of
    normalised images less precise (0.03 → 0.1 px), so none is taken.
    Such rounding can put a window's ``lncc_i`` far outside ``[-1, 1]``
    (float32 at an offset of 1e3: a cost of 12.9 where 0.76 is right; float64
    at 1e6: 0.763), so the cost is then no longer bounded.
    ``eps`` is absolute: the cost is the same for any offset, and for any gain
    only where the product of the window sums ``var_x var_y`` (``n_i^2`` times
    the variances' product) is large against ``eps``.
    """

    linear_intensity = True  # window by window

    def __init__(self, radius: int = 4, sign: str = "positive", eps: float = 1e-4):
        # radius=2.9 was cut to 2 and "2" taken; eps=-1 or NaN ended a registration 'not_finite'
        if not (is_whole(radius) and float(radius) >= 1):
            raise ValueError(f"LocalNCC(): 'radius' must be a whole number of at least 1; got {radius!r}")
        self.radius = int(radius)
        self.sign = _check_sign(sign, "LocalNCC()")
        self.any_contrast = self.sign == "any"
        self.eps = finite_number(eps, "eps", "LocalNCC()")
        if not self.eps > 0:
            raise ValueError(f"LocalNCC(): 'eps' must be above 0; got {eps!r}")

    def _terms(self, x, y, w):
        box = lambda image: _box_sum(image, self.radius)  # noqa: E731
        sum_w = _weight_divisor(box(w))  # a window's weights of any scale (module docstring)
        sum_x, sum_y = box(w * x), box(w * y)
        # each second-order window sum used as soon as it is made (a band's peak memory counts them)
        covariance = box(w * x * y) - sum_x * sum_y / sum_w
        # S_xx - S_x^2 / S_w cancels to a small negative number in a flat window, and the root
        # of var_x var_y + eps was NaN: clamped at 0 (a flat window's lncc is then 0)
        x_var = (box(w * x * x) - sum_x * sum_x / sum_w).clamp_min(0.0)
        y_var = (box(w * y * y) - sum_y * sum_y / sum_w).clamp_min(0.0)
        denominator = torch.sqrt(x_var * y_var + self.eps)
        return sum_w, sum_x, sum_y, covariance, y_var, denominator

    def __call__(self, x, y, weight=None, gradient=False):
        gradient = _gradient_flag(self, gradient)
        w = _inputs(self, x, y, weight)
        count = _mean_count(w.sum((1, 2, 3)), x.shape[1])
        score, derivative = self._scores(x, y, w, count, gradient)
        cost = self.cost_of_sums((w * score).sum((1, 2, 3)), count)
        return (cost, derivative) if gradient else cost

    @staticmethod
    def cost_of_sums(score: torch.Tensor, count: torch.Tensor, gradient: bool = False
                     ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``1 - S / n``: the cost of a pair from its score sum ``S = sum_i w_i s_i`` and count
        ``n = C sum w`` (:meth:`part`'s, added over bands); with ``gradient`` also ``1 / n``, which
        turns a band's ``D_b`` into its derivative."""
        count = _weight_divisor(count)
        cost = 1.0 - score / count
        return (cost, 1.0 / count) if gradient else cost

    @property
    def margin(self) -> int:
        """Rows of context a band needs on each side (:meth:`part`): ``2 r``, a window's reach
        and that of the windows it enters."""
        return 2 * self.radius

    def part(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor], rows: slice,
             gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One band of a pair's rows (``register`` splits one large pair so), ``(S, n, D)``.

        ``x``, ``y``, ``weight`` are the band's rows ``rows`` with a margin of :attr:`margin`
        rows each side (fewer at the image's edge, where the windows stop anyway): the windows
        about the band's pixels, and those about the pixels they reach, are then whole.  Over the
        band's rows ``S = sum_i w_i s_i`` (``s_i`` the window's score, ``lncc_i`` or its square)
        and ``n = C sum w`` ``(B,)``, and ``D = n d cost / d x`` at them, ``(B, C, rows, W)``.  The
        pair's cost is ``1 - sum_b S_b / n`` and its derivative ``D_b / n`` with ``n = sum_b n_b``.
        Without ``gradient``, ``D`` is ``None`` (and ``S`` differentiable by autograd).
        """
        w = _inputs(self, x, y, weight)
        score, derivative = self._scores(x, y, w, w.new_ones(x.shape[0]), gradient)
        band = lambda image: image[..., rows, :]  # noqa: E731
        count = (band(w).sum((1, 2, 3)) * x.shape[1]).expand(x.shape[0])  # (B,): a shared weight's too
        return (band(w) * band(score)).sum((1, 2, 3)), count, None if derivative is None else band(derivative)

    def _scores(self, x, y, w, count: torch.Tensor, gradient: bool):
        """Each window's score ``s_i`` and, with ``gradient``, ``d cost / d x`` for a cost of
        ``1 - sum_i w_i s_i / count``."""
        sum_w, sum_x, sum_y, covariance, y_var, denominator = self._terms(x, y, w)
        lncc = covariance / denominator
        score = lncc if self.sign == "positive" else lncc * lncc
        if not gradient:
            return score, None
        # c_i = d cost / d lncc_i, then through cov_i, var_x,i (and the window sums) to x_j
        c = -w / count[:, None, None, None]
        if self.sign == "any":
            c = c * 2.0 * lncc
        # lncc = cov / sqrt(var_x var_y + eps): d lncc / d cov = 1 / D, d lncc / d var_x = -lncc var_y / (2 D^2)
        d_cov = c / denominator
        d_var = -c * lncc * y_var / (2.0 * denominator * denominator)
        del c, lncc, covariance, y_var, denominator  # each image goes once used (``score`` keeps lncc)
        # cov = S_xy - S_x S_y / S_w ; var_x = S_xx - S_x^2 / S_w: d S_xy = d_cov, d S_xx = d_var
        d_sum_x = -d_cov * sum_y / sum_w - 2.0 * d_var * sum_x / sum_w
        del sum_w, sum_x, sum_y
        box = lambda image: _box_sum(image, self.radius)  # noqa: E731
        derivative = box(d_cov).mul_(y)
        del d_cov
        derivative = derivative.add_(2.0 * box(d_var) * x)
        del d_var
        return score, w * derivative.add_(box(d_sum_x))

    def __repr__(self) -> str:
        return f"LocalNCC(radius={self.radius}, sign={self.sign!r}, eps={self.eps})"


def _cubic_bspline_taps(f: torch.Tensor) -> Iterator[torch.Tensor]:
    """Cubic B-spline weights ``beta3(f + 1 - l)``, ``l = 0 .. 3``, of points ``f`` ``(..., N)`` in ``[0, 1]``
    past their second tap: ``((1 - f)^3, 3 f^3 - 6 f^2 + 4, -3 f^3 + 3 f^2 + 3 f + 1, f^3) / 6``, four
    images, each made when it is asked for (a caller that takes them one by one holds one at a time).

    The four pieces of ``beta3`` written for the four taps at once: evaluated as ``beta3(u)`` of
    ``u = t - l`` with ``|u|`` and two ``where``s, each tap cost about fifteen passes over ``4 N``
    values (half of a mutual-information evaluation).
    """
    square = f * f
    cube = square * f
    rest = 1.0 - f
    yield rest * rest * rest / 6.0
    yield cube / 2.0 - square + 2.0 / 3.0
    yield (f + square - cube) / 2.0 + 1.0 / 6.0
    yield cube / 6.0


def _cubic_bspline_tap_slopes(f: torch.Tensor) -> Iterator[torch.Tensor]:
    """``d/df`` of :func:`_cubic_bspline_taps`: ``(-(1 - f)^2 / 2, 3 f^2 / 2 - 2 f, -3 f^2 / 2 + f + 1/2, f^2 / 2)``,
    made one by one as well."""
    square = f * f
    rest = 1.0 - f
    yield rest * rest / -2.0
    yield 1.5 * square - 2.0 * f
    yield f - 1.5 * square + 0.5
    yield square / 2.0


class HistogramSums(NamedTuple):
    """:meth:`MutualInformation.sums` (and NMI's) of each pair and channel: the joint histogram's
    counts before they are divided by the weight."""

    counts: torch.Tensor  # (B, C, bins, bins): sum_i w_i [a_i = a] beta3(t_i - b)
    weight: torch.Tensor  # (B, C): sum w


class HistogramSlopes(NamedTuple):
    """:meth:`MutualInformation.cost_of_sums`' terms of the derivative, per pair and channel."""

    joint: torch.Tensor  # (B C, bins, bins): d cost / d p
    weight: torch.Tensor  # (B C,): sum w (at least a tiny number)


@dataclass
class _FixedBins:
    """A histogram metric's fixed bins ``(P, N)``, with the fixed image and ranges they were made
    from (:class:`TensorStamp`: held weakly)."""

    fixed: TensorStamp
    ranges: Optional[TensorStamp]
    bins: torch.Tensor
    not_a_number: torch.Tensor  # (P,) bool: a pair whose fixed image holds NaN


def _one_hot_product(fixed_bin: torch.Tensor, base: torch.Tensor, past: torch.Tensor, weights: torch.Tensor,
                     bins: int) -> torch.Tensor:
    """A joint histogram ``(P, bins, bins)`` as a sum of one-hot matrix products over slices of pixels.

    ``p[a, b] = sum_i [a_i = a] w_i beta3(t_i - b) = (E^T M)[a, b]``, with ``E`` the fixed bins'
    one-hot matrix ``(N, bins)`` and ``M`` the moving intensities' Parzen weights ``(N, bins)``,
    four nonzero a row (columns ``base_i .. base_i + 3``).  A matrix product adds in an order of its
    own, the same on every call, where a GPU's scatter-add adds atomically in the order its threads
    come.  Both matrices are ``bins`` values a pixel (32 x the image at 32 bins), so they are made
    and multiplied a slice at a time, at most :func:`tireg._chunks.eager_budget` values each (or
    ``bins``, one pixel, where the budget is smaller): a pair's slices of ``budget // bins`` pixels
    (one pair's slicing whatever the batch), groups of pairs of slices together up to the budget.
    Kept whole for a level, the fixed one-hot matrix was 16 x the input images (fixed and moving,
    float32, 32 bins; 32 x while ``F.one_hot`` made it in int64), and ``register``'s peak with it
    74 x (on the CPU with ``use_matmul=True``).  It runs without a graph: autograd takes the counts'
    gradient back by :class:`_ParzenCounts` (through the product it kept every slice's one-hot
    matrices for the backward pass).

    Args: ``fixed_bin`` ``(P, N)`` (long), the first of the four moving bins ``base`` ``(P, N)``
    (long), ``past`` ``(P, N)`` the moving bin coordinate past ``base + 1``, in ``[0, 1]``,
    ``weights`` ``(P, N)``.  Differentiable through ``M`` (torch.func's transforms take this way);
    reverse-mode autograd takes :class:`_ParzenCounts`' own backward pass, which keeps no ``M``.
    """
    pairs, n = fixed_bin.shape
    # under torch.func's transforms, out of place: vmap cannot write a batched value into the
    # unbatched zeros in place ("vmap: aten::scatter_(self, *extra_args) is not possible")
    in_place = _reverse_mode_only(past)
    scatter = torch.Tensor.scatter_ if in_place else torch.Tensor.scatter
    budget = _chunks.eager_budget(fixed_bin.device)
    width = min(n, max(1, budget // bins))
    groups = _chunks.chunk_slices(pairs, width * bins, budget)
    joints = []
    for group in groups:
        joint = None
        for start in range(0, n, width):
            pixels = slice(start, min(start + width, n))
            slice_bins = fixed_bin[group, pixels, None]
            zeros = torch.zeros(*slice_bins.shape[:2], bins, dtype=past.dtype, device=past.device)
            fixed_matrix = scatter(zeros, 2, slice_bins, 1.0)
            moving_matrix = torch.zeros_like(zeros)
            first = base[group, pixels]
            taps = _cubic_bspline_taps(past[group, pixels])
            for tap, weight_of_tap in enumerate(taps):  # distinct columns a row; in place: the largest tensor
                moving_matrix = scatter(moving_matrix, 2, (first + tap)[..., None],
                                        (weight_of_tap * weights[group, pixels])[..., None])
            product = fixed_matrix.mT @ moving_matrix
            joint = product if joint is None else joint + product
            del zeros, fixed_matrix, moving_matrix
        joints.append(joint)
    return joints[0] if len(joints) == 1 else torch.cat(joints)


def _scatter_counts(past: torch.Tensor, weights: torch.Tensor, cell: torch.Tensor, bins: int) -> torch.Tensor:
    """A joint histogram ``(P, bins, bins)`` by a sequential scatter-add (the CPU's): deterministic,
    ``4 N`` additions, not ``2 N bins^2``; tap by tap, in the order of the additions.

    The counts add up in float64 (:func:`_count_dtype`), rounded to ``past``'s dtype at the end.
    Added up in float32, a cell that holds millions of pixels (a flat background) lost the small
    taps' share as its count grew past 2^24 times them: at 2048^2 MI's cost was 0.5 % off float64's
    and its gradient 36 % (NMI 43 %), at 4096^2 the cost 5.6 %.  The pixels go in slices of
    :func:`tireg._chunks.eager_budget` values (all pairs' columns), so that the float64 copies of
    the taps are a slice's, not an image's: on the CPU (one thread) 1024^2 took 13 instead of
    21-34 ms, whole-image temporaries (and float64 ones besides, 60-70 ms) each a fresh
    allocation; 256^2 (one slice) 0.78 against 0.66 ms.
    """
    wide = _count_dtype(past)
    joint = torch.zeros(past.shape[0], bins * bins, dtype=wide, device=past.device)
    budget = _chunks.eager_budget(past.device)
    for pixels in _chunks.chunk_slices(past.shape[1], max(1, past.shape[0]), budget):
        part_weights, part_cell = weights[:, pixels], cell[:, pixels]
        for tap, weight_of_tap in enumerate(_cubic_bspline_taps(past[:, pixels])):  # (out of place: vmap takes it)
            joint = joint.scatter_add(1, part_cell + tap, (weight_of_tap * part_weights).to(wide))
    return joint.to(past.dtype).reshape(-1, bins, bins)


def _count_dtype(values: torch.Tensor) -> torch.dtype:
    """The dtype a histogram's counts add up in: float64 (on MPS, which has none, ``values``')."""
    return values.dtype if values.device.type == "mps" else torch.float64


def _gathered_taps(d_joint: torch.Tensor, cell: torch.Tensor, past: torch.Tensor,
                   pieces: Callable[[torch.Tensor], Iterator[torch.Tensor]]) -> torch.Tensor:
    """``sum_l D[cell_i + l] piece_l(past_i)`` ``(P, N)`` over the four taps ``l``, from ``D`` ``(P,
    bins^2)``: ``pieces`` :func:`_cubic_bspline_tap_slopes` gives ``d/d past`` of the counts'
    ``sum D p``, :func:`_cubic_bspline_taps` ``d/d w``.  Tap by tap: one index image at a time; in
    place but where a graph is recorded (a second derivative through :class:`_ParzenCounts`)."""
    graph = torch.is_grad_enabled() and (d_joint.requires_grad or past.requires_grad)
    total = None
    for tap, piece in enumerate(pieces(past)):
        term = torch.gather(d_joint, 1, cell + tap)
        term = term * piece if graph else term.mul_(piece)
        total = term if total is None else (total + term if graph else total.add_(term))
    return total


def _parzen_counts(past: torch.Tensor, weights: torch.Tensor, cell: torch.Tensor, fixed_bin: torch.Tensor,
                   base: torch.Tensor, bins: int, matmul: bool) -> torch.Tensor:
    """The joint histogram's counts ``(P, bins, bins)``: :func:`_one_hot_product` with ``matmul``
    (deterministic where scatter-adds are atomic and their order varies: GPUs), else
    :func:`_scatter_counts`."""
    if matmul:
        return _one_hot_product(fixed_bin, base, past, weights, bins)
    return _scatter_counts(past, weights, cell, bins)


def _reverse_mode_only(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is outside torch.func's transforms and forward-mode AD (a dual tensor):
    :class:`_ParzenCounts` has a backward pass of its own, no vmap rule and no jvp."""
    return (torch._C._functorch.maybe_current_level() is None
            and torch.autograd.forward_ad.unpack_dual(tensor).tangent is None)


class _ParzenCounts(torch.autograd.Function):
    """A joint histogram's counts ``p[a, b] = sum_i w_i [a_i = a] beta3(t_i - b)`` ``(P, bins, bins)``
    from each pixel's ``past`` (its moving bin coordinate past ``base + 1``) and weight ``w``, with a
    backward pass of its own, from the counts' gradient ``D``::

        d/d past_i = w_i sum_l D[cell_i + l] beta3_l'(past_i),   d/d w_i = sum_l D[cell_i + l] beta3_l(past_i)

    Autograd through the histogram saved what made it: through the scatter-add its four index
    images and each tap's weights; through the one-hot matrix product each slice's one-hot
    matrices besides, ``bins`` values a pixel: a 256^2 pair's metric (32 bins) saved 56 and 432
    bytes a pixel for the backward pass, and ``register`` of one 1024^2 pair with ``mi`` and
    ``gradients="autograd"`` peaked at 3.69x its input with the product.  This saves ``past``, ``w``
    and the cells (20 bytes a pixel in all, with the clamp's own).  The counts are
    :func:`_scatter_counts` or, with ``matmul``, :func:`_one_hot_product`.  The backward pass is
    made of differentiable operations: a second derivative (``create_graph``) goes through it.
    Under torch.func's transforms and forward-mode AD the histogram goes through the operations
    themselves instead (:func:`_reverse_mode_only`).
    """

    forward = staticmethod(_parzen_counts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        past, weights, cell = inputs[:3]
        ctx.save_for_backward(past, weights, cell)

    @staticmethod
    def backward(ctx, d_counts):
        past, weights, cell = ctx.saved_tensors
        d_joint = d_counts.reshape(past.shape[0], d_counts.shape[-2] * d_counts.shape[-1])  # (no pairs: -1 fails)
        d_past = d_weights = None
        if ctx.needs_input_grad[0]:
            d_past = _gathered_taps(d_joint, cell, past, _cubic_bspline_tap_slopes) * weights
        if ctx.needs_input_grad[1]:
            d_weights = _gathered_taps(d_joint, cell, past, _cubic_bspline_taps)
        return d_past, d_weights, None, None, None, None, None


def _plane_ranges(image: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, C, 2)``: the smallest and largest value of each plane of ``image`` ``(B, C, H, W)``, of
    the pixels where ``mask`` (``(B or 1, 1, H, W)``) is nonzero; a plane whose mask holds no pixel
    (or without a mask), of the whole plane.  On the device, no wait for it."""
    image = image.detach()
    whole = torch.stack([image.amin((2, 3)), image.amax((2, 3))], -1)
    if mask is None:
        return whole
    inside = mask.detach().to(image.device) != 0
    low = image.masked_fill(~inside, torch.inf).amin((2, 3))
    high = image.masked_fill(~inside, -torch.inf).amax((2, 3))
    empty = ~inside.flatten(1).any(1)[:, None, None]  # (B or 1, 1, 1)
    return torch.where(empty, whole, torch.stack([low, high], -1))


class _JointHistogramMetric(Metric):
    """Parzen-window joint histogram of fixed (box kernel) and moving (cubic B-spline) intensities.

    Per pair and channel, intensities are mapped to bin coordinates with the
    *images'* ranges (so the mapping does not change with the transform):
    fixed ``s = (y - y_min) / (y_max - y_min) * bins`` to bin ``floor(s)``,
    moving ``t = 1 + (x - x_min) / (x_max - x_min) * (bins - 3)`` spread
    over bins ``floor(t) - 1 .. floor(t) + 2`` with weights ``beta3(t - l)``.
    ``p(a, b) = sum_i w_i [a_i = a] beta3(t_i - b) / sum w``.  Histograms are
    a sequential scatter-add on the CPU and a one-hot matrix product on a GPU
    (``use_matmul``), both deterministic; the scatter-add's counts add up in
    float64, so that float32 images of any size give float64's histogram to
    float32's rounding.

    The ranges come from :meth:`set_ranges` (``register`` sets them from each
    level's whole images, of the pixels inside their masks; the analytic model
    and :func:`tireg.analytic.cost_and_gradient` from the whole images, of the
    pixels of nonzero weight) or, if not set, from the inputs of each call, of
    the pixels of nonzero weight.  Those move with the transform, and the gradient (analytic or
    autograd) treats them as constants: it is then not quite the derivative
    of the returned cost (3 % off on a test).  Call ``set_ranges(moving,
    fixed)`` before an autograd loop.
    """

    any_contrast = True

    def __init__(self, bins: int = 32, *, use_matmul: Optional[bool] = None):
        if not (is_whole(bins) and 8 <= bins <= 1024):  # the joint histogram is bins^2 per pair
            raise ValueError(f"{type(self).__name__}(): 'bins' must be a whole number from 8 to 1024; got {bins!r}")
        self.bins = int(bins)
        # None: the one-hot matrix product on a GPU, a scatter-add on the CPU (both deterministic)
        if use_matmul is not None and not isinstance(use_matmul, bool):  # "no" was taken, and truthy
            raise TypeError(f"{type(self).__name__}(): 'use_matmul' must be None, True or False; got {use_matmul!r}")
        self.use_matmul = use_matmul
        self.ranges: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._fixed_cache: Optional[_FixedBins] = None

    def __getstate__(self) -> dict:
        # a copy (pickle, copy.copy, a model's torch.save) leaves the fixed bins out: they are made
        # again on first use (kept, they made a pickled model of a 256^2 pair 0.8 MB instead of 3 KB)
        return {**self.__dict__, "_fixed_cache": None}

    def set_ranges(self, moving: Optional[torch.Tensor], fixed: Optional[torch.Tensor], *,
                   moving_mask: Optional[torch.Tensor] = None, fixed_mask: Optional[torch.Tensor] = None) -> None:
        """Fix the intensity ranges from whole images ``(B, C, H, W)`` (``None``: per call).  A later
        call's images must have their channels and their batch (or ranges of one pair serve every pair).

        ``moving_mask`` / ``fixed_mask`` (``(B or 1, 1, H, W)``, nonzero where a pixel counts): the
        range of the pixels inside only (a pair whose mask holds none: its whole image's).  Why: a
        no-data value beyond the content (``-9999`` under a mask) had set the range, every real
        intensity fell into one bin, and the cost was flat: ``register`` did not move from its start
        and read "converged".
        """
        if moving is None or fixed is None:
            self.ranges = None
            return
        for label, image, mask in (("moving", moving, moving_mask), ("fixed", fixed, fixed_mask)):
            if not isinstance(image, torch.Tensor) or image.dim() != 4 or not image.is_floating_point():
                raise TypeError(f"{type(self).__name__}.set_ranges(): {label!r} must be a float tensor (B, C, H, W); "
                                f"got {tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
            if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1
                                         and mask.shape[0] in (1, image.shape[0])
                                         and mask.shape[-2:] == image.shape[-2:]):
                raise ValueError(f"{type(self).__name__}.set_ranges(): '{label}_mask' must be a tensor (B or 1, 1, H, W) "
                                 f"of the image's size {tuple(image.shape[-2:])}; got "
                                 f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        self.ranges = (_plane_ranges(moving, moving_mask), _plane_ranges(fixed, fixed_mask))

    def _histogram(self, x, y, w, *, counts: bool = True, weight: Optional[torch.Tensor] = None):
        """The joint histogram's counts ``sum_i w_i [a_i = a] beta3(t_i - b)`` ``(B C, bins, bins)``
        (``None`` without ``counts``) and what the derivative takes of each pixel (its taps).

        Without :meth:`set_ranges`, the ranges are the images' own, of the pixels where the caller's
        ``weight`` is nonzero (:func:`_plane_ranges`): a no-data value of weight 0 had set them, and
        every weighted intensity fell into one bin (MI 0, its derivative 0).
        """
        batch, channels = x.shape[:2]
        bins = self.bins
        if self.ranges is not None:
            x_range, y_range = self.ranges
            for ranges in (x_range, y_range):  # a mismatch broadcast one channel's range over three, silently
                if ranges.dim() != 3 or ranges.shape[0] not in (1, batch) or ranges.shape[1] != channels:
                    raise ValueError(
                        f"{type(self).__name__}(): its ranges (set_ranges) are for {ranges.shape[0]} pair(s) of "
                        f"{ranges.shape[1]} channel(s); got images {tuple(x.shape)} (set_ranges() from these "
                        "images, or set_ranges(None, None) for each call's own)")
        else:
            x_range, y_range = _plane_ranges(x, weight), _plane_ranges(y, weight)
        # a span clamped near the dtype's smallest normal (times bins: bins / span stays finite, and a
        # flat image's 0 x bins / span is 0), not at an absolute 1e-12: images of a span below that
        # (values ~1e-13) fell into one bin, MI 0 where NCC saw the same images
        tiny = torch.finfo(x.dtype).tiny * bins
        x_span = (x_range[..., 1] - x_range[..., 0]).clamp_min(tiny)[..., None, None]
        y_span = (y_range[..., 1] - y_range[..., 0]).clamp_min(tiny)[..., None, None]
        t_scale = (bins - 3) / x_span  # dt / dx
        t_raw = 1.0 + (x - x_range[..., 0, None, None]) * t_scale
        t = t_raw.clamp(1.0, bins - 2.0 - 1e-6)  # bicubic overshoot stays inside the histogram
        s = ((y - y_range[..., 0, None, None]) / y_span * bins).clamp(0.0, bins - 1e-6)
        n = x.shape[-2] * x.shape[-1]
        pairs = batch * channels
        t_flat = t.reshape(pairs, n)
        fixed_bin, fixed_nan = self._fixed_bins(y, s, pairs, n, weight)
        weights = w.expand(batch, channels, *w.shape[-2:]).reshape(pairs, n)
        # (P, N): first of the 4 moving bins; clamped as integers too: the float clamp's bound
        # bins - 2 - 1e-6 is bins - 2 itself in float32 from 33 bins, one bin past the end; and
        # below, where a NaN became the least int64 (its taps' weights stay NaN, and so the cost)
        base = (t_flat.detach().floor().long() - 1).clamp_(0, bins - 4)
        # t past the second of its taps, in [0, 1] (1 where the integer clamp moved the taps)
        past = t_flat - (base + 1).to(t_flat.dtype)
        total = _weight_divisor(weights.sum(1))  # (P,)
        # a NaN in the fixed image: the pair's cost NaN, as every other metric's (its bin had been 0)
        total = torch.where(fixed_nan, torch.nan, total)
        # joint-histogram cell (a_i, b_i) of each pixel's first tap, flat (its tap l's is cell + l):
        # used again by the derivative.  The four taps go one by one, each an index image made
        # when it is used: all four at once were 22 images' worth a pixel at the derivative's peak
        cell = fixed_bin * bins + base  # (P, N)
        parts = dict(past=past.detach(), weights=weights, cell=cell, total=total,
                     t_scale=t_scale, shape=x.shape, t_raw=t_raw.detach())
        if not counts:
            return None, parts
        matmul = self.use_matmul if self.use_matmul is not None else x.is_cuda
        # torch.func's transforms (vmap, jacfwd) and forward-mode AD: through the operations themselves
        counts = _ParzenCounts.apply if _reverse_mode_only(past) else _parzen_counts
        return counts(past, weights, cell, fixed_bin, base, bins, matmul), parts

    def __call__(self, x, y, weight=None, gradient=False):
        gradient = _gradient_flag(self, gradient)
        counts, parts = self._histogram(x, y, _inputs(self, x, y, weight), weight=weight)
        cost, d_joint = self._scores(counts / parts["total"][:, None, None], x.shape[1], gradient)
        return (cost, self._derivative(d_joint, parts)) if gradient else cost

    def _scores(self, joint: torch.Tensor, channels: int, gradient: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The cost ``(B,)`` of the joint histograms ``p`` ``(B C, bins, bins)`` and, with
        ``gradient``, ``d cost / d p``: the subclass's score."""
        raise NotImplementedError

    def sums(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> HistogramSums:
        """:class:`HistogramSums` of the pixels given (a part of each pair: a band of rows), which
        :meth:`merged_sums` adds up and :meth:`cost_of_sums` and :meth:`derivative` take.  Set the
        ranges from the whole images first (:meth:`set_ranges`): a part's own differ."""
        counts, parts = self._histogram(x, y, _inputs(self, x, y, weight), weight=weight)
        weights = parts["weights"].sum(1)  # the count before the clamp: an empty part adds nothing
        return HistogramSums(counts.reshape(*x.shape[:2], *counts.shape[1:]), weights.reshape(x.shape[:2]))

    additive_sums = True  # merged_sums adds them (module docstring, "Sums of parts")

    @staticmethod
    def merged_sums(parts: Sequence[HistogramSums]) -> HistogramSums:
        """The sums of the union of disjoint ``parts``: the counts and weights added up."""
        if len(parts) == 1:
            return parts[0]
        return HistogramSums(*(torch.stack(values).sum(0) for values in zip(*parts)))

    def cost_of_sums(self, sums: HistogramSums, gradient: bool = False
                     ) -> Union[torch.Tensor, tuple[torch.Tensor, HistogramSlopes]]:
        """The cost of a pair from its sums (:meth:`sums`, :meth:`merged_sums`); with ``gradient``
        also what :meth:`derivative` takes: ``d cost / d p`` and the weight, made once."""
        weight = _weight_divisor(sums.weight.flatten())
        cost, d_joint = self._scores(sums.counts.flatten(0, 1) / weight[:, None, None], sums.counts.shape[1],
                                     gradient)
        return (cost, HistogramSlopes(d_joint, weight)) if gradient else cost

    def derivative(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor],
                   slopes: HistogramSlopes) -> torch.Tensor:
        """``d cost / d x`` at the pixels given (a part of each pair), of the pair whose
        :meth:`cost_of_sums` gave ``slopes``."""
        _, parts = self._histogram(x, y, _inputs(self, x, y, weight), counts=False, weight=weight)
        parts["total"] = slopes.weight
        return self._derivative(slopes.joint, parts)

    def _fixed_bins(self, y: torch.Tensor, s: torch.Tensor, pairs: int, n: int,
                    weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed bins ``(P, N)``, and which pairs' fixed images hold NaN ``(P,)``: the same on every
        call of a level, so kept.

        Recomputed when the fixed image or what its range comes from changes: the ranges of
        :meth:`set_ranges`, or without them the caller's ``weight`` (the range is that of the
        pixels it weights; keyed on the fixed image alone, a metric called with one weight and then
        another binned the second call's pixels by the first one's range: MI -1.01 for -1.99).
        Changed means another tensor object, or the same one changed in place (its version
        counter), by :class:`TensorStamp` (held weakly: the metric keeps no image alive); nothing
        is read back from the device (on a GPU a read waits for all queued work).  An inference
        tensor keeps no version counter: its bins are made on every call.
        """
        # what y's range comes from: the set ranges, else the weight (None: y's whole planes)
        source, origin = (weight, "weight") if self.ranges is None else (self.ranges[1], "ranges")
        cache = getattr(self, "_fixed_cache", None)  # (a metric pickled before it had one)
        if not (cache is not None and matches(cache.fixed, y, pairs, n, self.bins)
                and (source is None if cache.ranges is None
                     else source is not None and matches(cache.ranges, source, origin))):
            # one record, replaced whole: a thread reads a record's bins with its own key (two threads
            # sharing one metric read each other's bins when key and bins were two attributes)
            # (NaN: the least int64, clamped to bin 0; its pair is marked, and its cost NaN)
            s = s.detach().reshape(pairs, n)
            cache = _FixedBins(TensorStamp(y, pairs, n, self.bins),
                               None if source is None else TensorStamp(source, origin),
                               s.floor().long().clamp_(0, self.bins - 1), s.isnan().any(1))
            self._fixed_cache = cache
        return cache.bins, cache.not_a_number

    @staticmethod
    def _entropies(joint):
        fixed_marginal = joint.sum(2)
        moving_marginal = joint.sum(1)
        # p log p with log clamped: 0 at p = 0, and a finite autograd derivative there
        entropy = lambda p: -(p * _safe_log(p)).flatten(1).sum(1)  # noqa: E731
        return fixed_marginal, moving_marginal, entropy(fixed_marginal), entropy(moving_marginal), entropy(joint)

    def _derivative(self, d_joint, parts):
        """``d cost / d x_i = sum_l D[a_i, l] beta3'(t_i - l) w_i / N * dt/dx`` from ``D = d cost / d p``."""
        pairs, n = parts["weights"].shape
        d_joint = d_joint.reshape(pairs, self.bins * self.bins)  # (-1 is ambiguous for no pairs)
        d_t = _gathered_taps(d_joint, parts["cell"], parts["past"], _cubic_bspline_tap_slopes).mul_(parts["weights"])
        d_t = d_t / parts["total"][:, None]
        batch, channels, height, width = parts["shape"]
        t = parts["t_raw"]
        inside = ((t >= 1.0) & (t <= self.bins - 2.0 - 1e-6)).to(t.dtype)  # the clamp's derivative (bounds included, as autograd)
        return d_t.reshape(batch, channels, height, width) * parts["t_scale"] * inside


def _matmul_repr(metric: "_JointHistogramMetric") -> str:
    """``, use_matmul=...`` where it is set (``None``, the device's choice, is the default)."""
    return "" if metric.use_matmul is None else f", use_matmul={metric.use_matmul}"


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """``log p``, and a finite ``log tiny`` at ``p = 0`` (so that ``p log p`` is 0 there with a finite
    autograd derivative).  Clamped at the dtype's smallest normal number, below any nonzero cell of
    a histogram (a cubic B-spline weight is at least about 1e-21 in float32, 1e-46 in float64):
    clamped at 1e-12, cells between 0 and 1e-12 took ``log 1e-12`` where the analytic derivative
    takes ``log p + 1`` with its constant dropped, and MI's gradient was 2.6e-7 off autograd's in
    float64 instead of 1e-16 (an audit, 2026-12-07)."""
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


class MutualInformation(_JointHistogramMetric):
    """Mattes mutual information, cost ``-MI``, ``MI = sum p log(p / (p_F p_M))``.

    ``d MI / d p(a, b) = log(p / (p_F p_M)) - 1``; the constant drops out
    because the B-spline weights of every pixel sum to one.  Averaged over
    channels.
    """

    def _scores(self, joint, channels, gradient):
        fixed_marginal, moving_marginal, h_fixed, h_moving, h_joint = self._entropies(joint)
        information = h_fixed + h_moving - h_joint
        cost = -information.reshape(-1, channels).mean(1)
        if not gradient:
            return cost, None
        ratio = _safe_log(joint) - _safe_log(fixed_marginal)[:, :, None] - _safe_log(moving_marginal)[:, None, :]
        return cost, torch.where(joint > 0, -ratio, torch.zeros_like(ratio)) / channels

    def __repr__(self) -> str:
        return f"MutualInformation(bins={self.bins}{_matmul_repr(self)})"


class NormalizedMutualInformation(_JointHistogramMetric):
    """Studholme's normalised mutual information, cost ``-NMI``, ``NMI = (H(F) + H(M)) / H(F, M)``.

    ``d NMI / d p(a, b) = (NMI log p - log p_F - log p_M) / H(F, M)`` up to a
    constant that drops out.  Averaged over channels.
    """

    def _scores(self, joint, channels, gradient):
        fixed_marginal, moving_marginal, h_fixed, h_moving, h_joint = self._entropies(joint)
        h_joint = h_joint.clamp_min(_TINY)
        nmi = (h_fixed + h_moving) / h_joint
        cost = -nmi.reshape(-1, channels).mean(1)
        if not gradient:
            return cost, None
        numerator = (
            nmi[:, None, None] * _safe_log(joint)
            - _safe_log(fixed_marginal)[:, :, None]
            - _safe_log(moving_marginal)[:, None, :]
        )
        d_joint = torch.where(joint > 0, -numerator / h_joint[:, None, None], torch.zeros_like(numerator))
        return cost, d_joint / channels

    def __repr__(self) -> str:
        return f"NormalizedMutualInformation(bins={self.bins}{_matmul_repr(self)})"


def _own_cost(metric: Metric, bases: tuple[type, ...]) -> bool:
    """Whether ``metric`` is one of ``bases`` with that class's own cost (its ``__call__``)."""
    return any(isinstance(metric, base) and type(metric).__call__ is base.__call__ for base in bases)


def _pixel_parts(metric: Metric) -> bool:
    """Whether ``metric`` is a per-pixel metric whose cost is :class:`PerPixelMetric`'s own,
    ``sum_c sum_x s rho``, with its own term weights ``s`` (a mean's ``w / (C sum w)``, or ``w``):
    then one pair's parts (bands of rows) add up, their sums, or their means weighted by their
    counts.  A subclass's own ``__call__`` or ``term_weights`` may pool a pair's pixels otherwise
    (a band of ``mean=False``'s sum weighted as a mean read 3.0 for 23.7), and runs whole; so does
    one with its own ``weighted``, which ``__call__`` computes the cost with.  The compiled kernel,
    which writes ``sum w rho`` itself, serves only these too."""
    return _own_cost(metric, (PerPixelMetric,)) and all(
        getattr(type(metric), name) is getattr(PerPixelMetric, name) for name in ("term_weights", "weighted"))


def _sums_of_parts(metric: Metric) -> bool:
    """Whether ``metric``'s evaluation of one pair can be split in parts in two passes (module
    docstring, "Sums of parts"): mutual information, NMI, and NCC with NCC's own ``deviations``
    (its derivative takes the pair's means and the weight as given; a subclass's own weighting,
    in bands, got a gradient 40 % off).  Local NCC splits by :meth:`LocalNCC.part` instead."""
    return isinstance(metric, (MutualInformation, NormalizedMutualInformation)) or (
        isinstance(metric, NCC) and type(metric).deviations is NCC.deviations)  # (and its Gauss-Newton system)


def _independent_pairs(metric: Metric) -> bool:
    """Whether each pair's cost and derivative are its own, no statistic pooled over the batch, so
    that ``register`` and the analytic models may evaluate a batch in chunks of pairs.

    A per-pixel loss's pairs are (any :class:`PerPixelMetric`); tireg's :class:`NCC`,
    :class:`LocalNCC`, :class:`MutualInformation` and :class:`NormalizedMutualInformation`, where
    the class's own cost and, for NCC its deviations and for the histograms its ranges, are kept.
    Another metric of one's own may pool the batch, and runs whole.  Mutual information keeps one
    record of its fixed image's bins, made again for each chunk: cheap beside its histogram.
    """
    if isinstance(metric, PerPixelMetric) or _own_cost(metric, (LocalNCC,)):
        return True
    if _own_cost(metric, (NCC,)):  # and its own deviations, a public hook (one may pool the batch)
        return type(metric).deviations is NCC.deviations
    return not _own_ranges(metric) and _own_cost(metric, (MutualInformation, NormalizedMutualInformation))


def _own_ranges(metric: Metric) -> bool:
    """Whether ``metric``'s ``set_ranges`` is a subclass's own (which takes the two images only)."""
    return getattr(type(metric), "set_ranges", None) is not _JointHistogramMetric.set_ranges


def _set_masked_ranges(metric: Metric, moving: torch.Tensor, fixed: torch.Tensor,
                       moving_mask: Optional[torch.Tensor], fixed_mask: Optional[torch.Tensor]) -> None:
    """``metric.set_ranges`` of the pixels inside the masks (a no-data value outside them had set the
    ranges: every counted intensity in one bin, a flat cost); a subclass's own ``set_ranges``, which
    takes the two images only, gets the images."""
    if _own_ranges(metric):
        metric.set_ranges(moving, fixed)
    else:
        metric.set_ranges(moving, fixed, moving_mask=moving_mask, fixed_mask=fixed_mask)


METRICS: dict[str, type[Metric]] = {
    "ncc": NCC,
    "lncc": LocalNCC,
    "mi": MutualInformation,
    "nmi": NormalizedMutualInformation,
}


#: Every name :func:`get_metric` takes: the metrics, their either-sign forms, then the per-pixel losses.
METRIC_NAMES = (*METRICS, "ncc_any", "lncc_any", *LOSSES)


def get_metric(metric: Union[str, Metric, PerPixelLoss], caller: str = "get_metric()") -> Metric:
    """A metric from a name (``"ncc"``, ``"ncc_any"``, ``"lncc"``, ``"mi"``, ``"nmi"``, or a per-pixel
    loss name such as ``"l2"``), a :class:`Metric`, or a :class:`~tireg.losses.PerPixelLoss`; otherwise
    a ``ValueError`` listing the names, its message starting with ``caller`` (the function that was
    given the metric)."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, PerPixelLoss):
        return PerPixelMetric(metric)
    if isinstance(metric, str):
        name = metric.lower()
        if name in METRICS:
            return METRICS[name]()
        if name in ("ncc_any", "lncc_any"):
            return METRICS[name[:-4]](sign="any")
        if name in LOSSES:
            return PerPixelMetric(name)
    raise ValueError(f"{caller}: unknown metric {metric!r}; choose one of {', '.join(map(repr, METRIC_NAMES))}")
