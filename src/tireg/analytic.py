"""The analytic gradient in one reduction (the seed's forward chain rule).

For a cost of the warped image, e.g. summed over the fixed image's pixels,
``L = sum_x C(F(x), M(A x))``, with ``C'`` its derivative with respect to each
warped pixel (a per-pixel loss's ``rho'``, or any :mod:`tireg.metrics`
metric's), ``g(x) = C'(x) * grad M(A x)`` (summed over channels, pixel units
of the moving image) and ``x~ = (x, y, 1)``::

    dL/dA = sum_x g(x) x~^T = G          (a 2 x 3 matrix per image pair)
    dL/dp_k = < G, dA/dp_k >             (Frobenius product)
    dL/dr_k = dL/dp_k * m_k'(r_k)        (through the parameter mapping)

So one pass over the pixels yields ``G``; every parameter's gradient is a
dot product of six numbers.  No per-parameter loop touches the pixels.
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch

from . import _chunks, fused
from ._validation import (
    GRADIENT_INTERPOLATIONS, INTERPOLATIONS, PADDING_MODES, check_affine, check_dense, check_flag, check_image,
    check_real, check_same_kind,
)
from .losses import PerPixelLoss
from .metrics import (
    LocalNCC, Metric, PerPixelMetric, _independent_pairs, _mean_count, _pixel_parts, _set_masked_ranges, _sums_of_parts,
)
from .sampling import (
    _grid_moments, _modes, _pixel_axes, _sample_stacked_gradient, _sampler_gradient, sample, sampling_grid,
    shared_pixel_scale,
)

__all__ = ["cost_and_gradient", "per_pixel_cost_and_gradient", "parameter_gradient"]


def cost_and_gradient(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    matrix: torch.Tensor,
    metric: Union[Metric, PerPixelLoss],
    *,
    weight: Optional[torch.Tensor] = None,
    interpolation: str = "bilinear",
    padding_mode: str = "zeros",
    moving_with_gradient: Optional[torch.Tensor] = None,
    axes: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    compile: bool = False,
    padded_moving: Optional[torch.Tensor] = None,
    coordinates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp, cost and ``G = dL/dA`` in one pass, without autograd.

    The metric gives the cost and its derivative with respect to every
    warped pixel, ``C'``; the sampler's derivative kernel contracts ``C'``
    with the moving image's gradient at the warped points, ``g = C' grad M``,
    and ``G = sum_x g x~^T`` from a sum over rows of sums over columns (:func:`~tireg.sampling.grid_moments`).

    Args:
        fixed: ``(B, C, H, W)``.
        moving: ``(B, C, Hm, Wm)``.
        matrix: ``(B, 3, 3)`` fixed -> moving pixel matrices.
        metric: a :class:`~tireg.metrics.Metric`, or a per-pixel loss (its
            plain sum over pixels and channels, the seed's cost).
        weight: optional ``(B, 1, H, W)`` real pixel weights passed to the metric.
        moving_with_gradient: ``None`` for the exact gradient of the
            interpolant (default); or ``[M, dM/dx, dM/dy]`` stacked as
            ``(B, 3C, Hm, Wm)`` (:func:`tireg.sampling.stack_with_gradient`) to
            sample a precomputed gradient at the same points instead.
        axes: optional cached :func:`~tireg.sampling.pixel_axes` of the fixed image.
        compile: use the compiled fused kernel (:mod:`tireg.fused`) where it
            applies (bilinear, zeros or border padding, a per-pixel metric,
            exact gradient); it gives the same result in one pass over the
            pixels.  Elsewhere, or where compiling fails, the reference path.
        padded_moving: optional cached :func:`tireg.fused.prepare_moving` of ``moving``
            (its shape, dtype and device are checked, not its values).
        coordinates: optional cached :func:`tireg.fused.coordinate_grids` of ``fixed``
            (likewise).

    Returns:
        ``warped (B, C, H, W)``, ``cost (B,)``, ``G (B, 2, 3)`` with ``G = sum_x g(x) x~^T``.

    Raises:
        TypeError, ValueError: naming the argument: images not float ``(B, C, H, W)``
            tensors of one batch, channels, dtype and device; ``matrix`` not ``(B, 3, 3)``
            (one per pair: no broadcasting); a ``metric`` that is neither a metric nor a
            per-pixel loss; ``weight``, ``moving_with_gradient``, ``axes``, ``padded_moving``
            or ``coordinates`` of the wrong shape, dtype or device (the compiled kernel
            does no bounds checks); unknown modes; a ``matrix`` whose last row is not ``(0, 0, 1)``, as
            :func:`~tireg.sampling.warp` (that check reads the matrix back, a wait on a
            GPU; the models call the unchecked function, their matrices affine by
            construction).  NaNs in the images are not looked for.
    """
    _check_inputs(fixed, moving, matrix, metric, weight, interpolation, padding_mode, moving_with_gradient, axes,
                  padded_moving, coordinates)
    check_affine(matrix, "cost_and_gradient()")
    compile = check_flag(compile, "compile", "cost_and_gradient()")  # 'no' had compiled (truthy)
    return _cost_and_gradient(
        fixed, moving, matrix, metric, weight=weight, interpolation=interpolation, padding_mode=padding_mode,
        moving_with_gradient=moving_with_gradient, axes=axes, compile=compile, padded_moving=padded_moving,
        coordinates=coordinates,
    )


def _check_inputs(fixed, moving, matrix, metric, weight, interpolation, padding_mode, moving_with_gradient, axes,
                  padded_moving=None, coordinates=None):
    """:func:`cost_and_gradient`'s checks: shapes, types, dtypes, devices and options (Python
    only, a few microseconds; no value is read)."""
    caller = "cost_and_gradient()"
    if not isinstance(metric, (Metric, PerPixelLoss)):
        raise TypeError(
            f"{caller}: 'metric' must be a tireg.metrics.Metric or a per-pixel loss (tireg.losses.PerPixelLoss); "
            f"got {type(metric).__name__} (a name such as 'l2' or 'ncc': tireg.metrics.get_metric(name))"
        )
    _modes(interpolation, padding_mode, caller)
    if interpolation not in GRADIENT_INTERPOLATIONS:  # nearest: its G was 0
        raise ValueError(f"{caller}: interpolation {interpolation!r} has no gradient (its derivative is 0 almost "
                         f"everywhere); choose one of {', '.join(map(repr, GRADIENT_INTERPOLATIONS))}")
    check_image(fixed, "fixed", caller, finite=False)
    check_image(moving, "moving", caller, finite=False)
    batch, channels, height, width = fixed.shape
    if moving.shape[:2] != fixed.shape[:2]:
        raise ValueError(
            f"{caller}: 'moving' must have the batch and channels of 'fixed' {tuple(fixed.shape)} (one moving "
            f"image per pair: no broadcasting); got {tuple(moving.shape)}"
        )
    like = (fixed.dtype, fixed.device)
    check_same_kind(fixed, "fixed", moving, "moving", caller)
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{caller}: 'matrix' must be a torch.Tensor; got {type(matrix).__name__}")
    check_dense(matrix, "matrix", caller)
    if matrix.shape != (batch, 3, 3):
        raise ValueError(
            f"{caller}: 'matrix' must have shape (B, 3, 3) = ({batch}, 3, 3), one per pair (no broadcasting); "
            f"got {tuple(matrix.shape)}"
        )
    check_same_kind(matrix, "matrix", fixed, "the images", caller)
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{caller}: 'weight' must be a torch.Tensor or None; got {type(weight).__name__}")
        check_dense(weight, "weight", caller)
        check_real(weight, "weight", caller)  # the compiled kernel takes it as it is, no metric to check it
        if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] not in (1, batch) or (
            weight.shape[-2:] != fixed.shape[-2:]
        ):
            raise ValueError(
                f"{caller}: 'weight' must have shape ({batch}, 1, {height}, {width}) or (1, 1, {height}, {width}); "
                f"got {tuple(weight.shape)}"
            )
        if weight.device != fixed.device:
            raise ValueError(f"{caller}: 'weight' is on {weight.device} but the images on {fixed.device}")
    if moving_with_gradient is not None:
        if not isinstance(moving_with_gradient, torch.Tensor):
            raise TypeError(
                f"{caller}: 'moving_with_gradient' must be a torch.Tensor or None; "
                f"got {type(moving_with_gradient).__name__}"
            )
        expected = (batch, 3 * channels, *moving.shape[-2:])
        if moving_with_gradient.shape != expected:
            raise ValueError(
                f"{caller}: 'moving_with_gradient' must be [M, dM/dx, dM/dy] of 'moving' (stack_with_gradient()), "
                f"shape {expected}; got {tuple(moving_with_gradient.shape)}"
            )
        check_same_kind(moving_with_gradient, "moving_with_gradient", fixed, "the images", caller)
    if axes is not None:
        if not isinstance(axes, (tuple, list)) or len(axes) != 2 or not all(
            isinstance(axis, torch.Tensor) and axis.dim() == 1 and (axis.dtype, axis.device) == like for axis in axes
        ) or (axes[0].shape[0], axes[1].shape[0]) != (height, width):
            raise ValueError(
                f"{caller}: 'axes' must be pixel_axes(({height}, {width})) of 'fixed', two 1-D tensors of "
                f"{height} and {width} points, its dtype and device"
            )
    # the compiled kernel does no bounds checks: a prepared image or grid of another size was read
    # out of its bounds (a wrong cost and gradient, or a crash), so their shapes are checked here
    if padded_moving is not None:
        _check_padded_moving(padded_moving, moving, padding_mode, caller)
    if coordinates is not None:
        expected = (1, 1, height, width)
        if not isinstance(coordinates, (tuple, list)) or len(coordinates) != 2 or not all(
            isinstance(grid, torch.Tensor) and grid.shape == expected and (grid.dtype, grid.device) == like
            for grid in coordinates
        ):
            got = (", ".join(map(_describe, coordinates)) if isinstance(coordinates, (tuple, list))
                   else type(coordinates).__name__)
            raise ValueError(
                f"{caller}: 'coordinates' must be tireg.fused.coordinate_grids(fixed): two {expected} tensors "
                f"of {fixed.dtype} on {fixed.device}; got {got}"
            )


def _describe(value) -> str:
    """``'(1, 1, 8, 8) torch.float32 on cpu'`` for a tensor, its type's name otherwise."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {value.dtype} on {value.device}"
    return type(value).__name__


def _check_padded_moving(padded_moving, moving, padding_mode, caller):
    """``padded_moving`` of :func:`tireg.fused.prepare_moving`'s shape, dtype and device for ``moving``
    (or :func:`tireg.fused.pad_moving`'s, which the kernel reads too); unused, so unchecked, for a
    padding mode of the reference path alone."""
    if not isinstance(padded_moving, torch.Tensor):
        raise TypeError(f"{caller}: 'padded_moving' must be a torch.Tensor or None; got {type(padded_moving).__name__}")
    if padding_mode not in fused.FUSED_PADDING:
        return
    pad = 2 * fused.FUSED_PADDING[padding_mode]
    padded_shape = (*moving.shape[:2], moving.shape[2] + pad, moving.shape[3] + pad)
    packed_shape = (*padded_shape[:3], padded_shape[3] - 1)
    kinds = {(padded_shape, moving.dtype)}  # pad_moving()
    if moving.dtype == torch.float32:  # pack_pairs(): each pixel and its right-hand neighbour in one int64
        kinds.add((packed_shape, torch.int64))
    if (tuple(padded_moving.shape), padded_moving.dtype) in kinds and padded_moving.device == moving.device:
        return
    packs = moving.device.type == "cpu" and moving.dtype == torch.float32
    shape, dtype = (packed_shape, torch.int64) if packs else (padded_shape, moving.dtype)
    raise ValueError(
        f"{caller}: 'padded_moving' must be tireg.fused.prepare_moving(moving, {padding_mode!r}) of 'moving' "
        f"{tuple(moving.shape)}: shape {shape}, {dtype} on {moving.device}; got {tuple(padded_moving.shape)}, "
        f"{padded_moving.dtype} on {padded_moving.device}"
    )


def _cost_and_gradient(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    matrix: torch.Tensor,
    metric: Union[Metric, PerPixelLoss],
    *,
    weight: Optional[torch.Tensor] = None,
    interpolation: str = "bilinear",
    padding_mode: str = "zeros",
    moving_with_gradient: Optional[torch.Tensor] = None,
    axes: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    compile: bool = False,
    padded_moving: Optional[torch.Tensor] = None,
    coordinates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cost_and_gradient` without its checks, for a caller whose inputs are right by construction."""
    if isinstance(metric, PerPixelLoss):
        metric = PerPixelMetric(metric, mean=False)
    if compile and moving_with_gradient is None:
        result = _fused_cost_and_gradient(
            fixed, moving, matrix, metric, weight, interpolation, padding_mode, padded_moving, coordinates
        )
        if result is not None:
            return result
    if axes is None:
        axes = _pixel_axes(tuple(fixed.shape[-2:]), matrix.dtype, matrix.device)
    budget = _chunks.eager_budget(fixed.device)
    chunks = _chunks.pair_and_row_chunks(fixed.shape, budget)
    options = (interpolation, padding_mode, moving_with_gradient, axes)
    if len(chunks) > 1 and _pixel_parts(metric):  # (one of one's own pools the pair: by pair, below)
        return _reference_in_chunks(chunks, fixed, moving, matrix, metric, weight, *options)
    pairs = _chunks.chunk_slices(fixed.shape[0], fixed[0].numel(), budget)
    # other metrics pool a pair's pixels: a metric whose pairs are independent runs in chunks of
    # pairs, and one pair above the budget of NCC, local NCC or mutual information in passes
    passes = fixed[0].numel() > budget and (isinstance(metric, LocalNCC) or _sums_of_parts(metric))
    if (len(pairs) > 1 or passes) and _independent_pairs(metric):
        return _reference_by_pair(pairs, fixed, moving, matrix, metric, weight, *options, passes=passes)
    return _reference(fixed, moving, matrix, metric, weight, *options)


def _reference(fixed, moving, matrix, metric, weight, interpolation, padding_mode, moving_with_gradient, axes):
    """:func:`cost_and_gradient` by the reference kernels, all pixels at once."""
    grid = sampling_grid(matrix, fixed.shape[-2:], moving.shape[-2:], axes=axes)
    warped, gradient = _sampled(moving, moving_with_gradient, grid, fixed.shape[1], interpolation, padding_mode)
    cost, derivative = metric(warped, fixed, weight, gradient=True)
    matrix_gradient = _matrix_gradient(derivative, moving, grid, gradient, axes, interpolation, padding_mode)
    return warped, cost, matrix_gradient


def _sampled(moving, moving_with_gradient, grid, channels, interpolation, padding_mode):
    """The warped image, and the moving image's gradient sampled at the same points where it is
    precomputed (``moving_with_gradient``; else ``None``): the extended image's derivative
    (:func:`~tireg.sampling._sample_stacked_gradient`)."""
    if moving_with_gradient is None:
        return sample(moving, grid, interpolation=interpolation, padding_mode=padding_mode), None
    return _sample_stacked_gradient(moving_with_gradient, grid, channels, interpolation, padding_mode)


def _matrix_gradient(derivative, moving, grid, gradient, axes, interpolation, padding_mode):
    """``G = sum_x g x~^T`` with ``g = C' grad M``: through the sampler's derivative kernel, or
    from the sampled precomputed ``gradient`` ``(B, C, 2, H, W)``."""
    if gradient is None:
        g = _sampler_gradient(derivative, moving, grid, INTERPOLATIONS[interpolation], PADDING_MODES[padding_mode])
        # normalised -> moving pixel units, applied to the 2 x 3 result rather than every pixel
        scale = shared_pixel_scale(moving.shape[-2:], like=grid)
        return _grid_moments(g, axes, True, False) * scale[:, None]
    g = torch.einsum("bchw,bckhw->bkhw", derivative, gradient)  # (B, 2, H, W), pixel units
    return _grid_moments(g, axes, False, False)


def _reference_in_passes(fixed, moving, matrix, metric, weight, interpolation, padding_mode, moving_with_gradient,
                         axes):
    """:func:`_reference` of one pair above the budget in bands of rows, for NCC, mutual
    information or NMI (two passes over sums of parts: :mod:`tireg.metrics`) or local NCC (bands
    with a margin of :attr:`~tireg.metrics.LocalNCC.margin` rows: :meth:`~tireg.metrics.LocalNCC.part`).

    The warped image is the step's output and is kept: it is sampled band by band first; then
    the metric's sums are added up over its bands (mutual information's ranges, where none are
    set, those of the whole warped and fixed images, as in one call); then each band's
    derivative is taken from it, and ``G`` through the sampler's derivative kernel (or the
    precomputed gradient, sampled again).
    """
    channels, height, width = fixed.shape[1:]
    budget = _chunks.eager_budget(fixed.device)
    bands = _chunks.chunk_slices(height, width * channels, budget)
    ys, xs = axes
    rows_of = lambda image, rows: None if image is None else image[..., rows, :]  # noqa: E731
    grid_of = lambda rows: sampling_grid(matrix, (rows.stop - rows.start, width), moving.shape[-2:],  # noqa: E731
                                         axes=(ys[rows], xs))
    # the warped image only: a precomputed stack's first C channels (the moving image's values)
    values = moving if moving_with_gradient is None else moving_with_gradient[:, :channels]
    warped = None
    for rows in bands:
        band = sample(values, grid_of(rows), interpolation=interpolation, padding_mode=padding_mode)
        if warped is None:
            warped = band.new_empty(*band.shape[:2], height, width)
        warped[..., rows, :] = band
        del band
    windows = isinstance(metric, LocalNCC)
    if not windows:
        if getattr(metric, "ranges", False) is None:  # per call: the whole warped image's, as whole
            metric = copy.copy(metric)
            _set_masked_ranges(metric, warped, fixed, weight, weight)
        sums = None
        for rows in bands:  # a running merge: mutual information's sums are a histogram a pair
            part = metric.sums(rows_of(warped, rows), rows_of(fixed, rows), rows_of(weight, rows))
            sums = part if sums is None else metric.merged_sums([sums, part])
        cost, terms = metric.cost_of_sums(sums, gradient=True)
    score = count = matrix_gradient = 0
    margins = _chunks.bands_with_margins(height, width * channels, budget, metric.margin) if windows else None
    for index, rows in enumerate(bands):
        if windows:
            around, own = margins[index]
            band_score, band_count, derivative = metric.part(
                rows_of(warped, around), rows_of(fixed, around), rows_of(weight, around), own)
            score, count = score + band_score, count + band_count
        else:
            derivative = metric.derivative(rows_of(warped, rows), rows_of(fixed, rows), rows_of(weight, rows), terms)
        grid = grid_of(rows)
        gradient = None if moving_with_gradient is None else _sampled(
            moving, moving_with_gradient, grid, channels, interpolation, padding_mode)[1]
        matrix_gradient = matrix_gradient + _matrix_gradient(derivative, moving, grid, gradient, (ys[rows], xs),
                                                             interpolation, padding_mode)
        del derivative, grid, gradient  # before the next band's are made
    if windows:
        cost, inverse_count = metric.cost_of_sums(score, count, gradient=True)
        matrix_gradient = matrix_gradient * inverse_count[:, None, None]
    return warped, cost, matrix_gradient


def _reference_in_chunks(
    chunks, fixed, moving, matrix, metric, weight, interpolation, padding_mode, moving_with_gradient, axes
):
    """:func:`_reference` of a per-pixel metric over ``(pairs, rows)`` chunks (:mod:`tireg._chunks`).

    Each per-pixel quantity is an image (grid, warped, derivative, sampler gradient), so a
    batch at once held several images as large as its fixed images; a chunk holds them for
    its pixels only, and they stay in cache.  The sums ``sum w rho`` and ``G`` of a pair are
    its chunks' sums (a band's axes are its own rows of the fixed grid, so its ``G`` needs no
    shift); a mean metric divides them by ``C sum w`` afterwards.
    """
    sums = PerPixelMetric(metric.loss, mean=False)
    ys, xs = axes
    batch = fixed.shape[0]
    shared_weight = weight is not None and weight.shape[0] != batch  # one weight image for every pair
    warped = cost = matrix_gradient = None
    for pairs, rows in chunks:
        part_warped, part_cost, part_gradient = _reference(
            fixed[pairs, :, rows], moving[pairs], matrix[pairs], sums,
            None if weight is None else weight[slice(None) if shared_weight else pairs, :, rows],
            interpolation, padding_mode,
            None if moving_with_gradient is None else moving_with_gradient[pairs], (ys[rows], xs),
        )
        if warped is None:
            warped = part_warped.new_empty(batch, *part_warped.shape[1:2], *fixed.shape[-2:])
            cost = part_cost.new_zeros(batch)
            matrix_gradient = part_gradient.new_zeros(batch, *part_gradient.shape[1:])
        warped[pairs, :, rows] = part_warped
        cost[pairs] += part_cost
        matrix_gradient[pairs] += part_gradient
    if metric.mean:  # the metric's count, C sum w (metrics._mean_count)
        if weight is None:  # a number: no tensor made on the host and copied to the device
            count = float(fixed.shape[-2] * fixed.shape[-1] * fixed.shape[1])
            cost, matrix_gradient = cost / count, matrix_gradient / count
        else:
            count = _mean_count(weight.flatten(1).sum(1), fixed.shape[1])
            cost, matrix_gradient = cost / count, matrix_gradient / count.reshape(-1, 1, 1)
    return warped, cost, matrix_gradient


def _reference_by_pair(
    parts, fixed, moving, matrix, metric, weight, interpolation, padding_mode, moving_with_gradient, axes, *,
    passes: bool = False,
):
    """:func:`_reference` of a metric whose pairs are independent (:func:`~tireg.metrics._independent_pairs`:
    NCC, local NCC, mutual information on the CPU) over chunks of pairs ``parts``; with
    ``passes``, chunks of one pair above the budget, each by :func:`_reference_in_passes`.

    An image-level metric's evaluation holds ten to thirty images' worth of per-pixel
    tensors (local NCC's window sums, mutual information's Parzen taps), so a batch at once
    held 11-17x its input images; a chunk holds them for its pairs only.  Histogram ranges set
    on the metric (per pair) go with each chunk's copy of it.
    """
    batch = fixed.shape[0]
    shared_weight = weight is not None and weight.shape[0] != batch
    ranges = getattr(metric, "ranges", None)
    warped, costs, gradients = None, [], []
    for pairs in parts:
        chunk_metric = metric
        if ranges is not None:  # a copy: the caller's metric is never changed (it may be shared)
            chunk_metric = copy.copy(metric)  # (ranges of one pair hold for every pair)
            chunk_metric.ranges = tuple(values[pairs] if values.shape[0] == batch else values for values in ranges)
        part_warped, part_cost, part_gradient = (_reference_in_passes if passes else _reference)(
            fixed[pairs], moving[pairs], matrix[pairs], chunk_metric,
            weight if weight is None or shared_weight else weight[pairs], interpolation, padding_mode,
            None if moving_with_gradient is None else moving_with_gradient[pairs], axes,
        )
        if len(parts) == 1:  # one pair in passes: its warped image as it is, no batch buffer
            return part_warped, part_cost, part_gradient
        if warped is None:
            warped = part_warped.new_empty(batch, *part_warped.shape[1:])
        warped[pairs] = part_warped
        costs.append(part_cost)
        gradients.append(part_gradient)
    return warped, torch.cat(costs), torch.cat(gradients)


def _fused_cost_and_gradient(
    fixed, moving, matrix, metric, weight, interpolation, padding_mode, padded_moving, coordinates
):
    """:func:`cost_and_gradient` by the compiled kernel, or ``None`` where it does not apply or cannot compile."""
    # the kernel writes sum w rho itself: PerPixelMetric's own cost only (not a subclass's own)
    if not (_pixel_parts(metric) and fused.supports(interpolation, padding_mode, metric.loss, fixed.dtype,
                                                    fixed.shape[1])):
        return None
    padded = fused.prepare_moving(moving, padding_mode) if padded_moving is None else padded_moving
    result = fused.run_compiled_in_bands(
        fixed, padded, matrix, metric.loss, padding_mode, weight, return_warped=True, coordinates=coordinates,
        rows=fused.step_band_rows(*fixed.shape[-2:]),
    )
    if result is None:
        return None
    if metric.mean:
        result = result.mean(fixed.shape[1])
    return result.warped, result.cost, result.matrix_gradient


def per_pixel_cost_and_gradient(
    fixed: torch.Tensor, moving: torch.Tensor, matrix: torch.Tensor, loss: PerPixelLoss, **options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cost_and_gradient` for the seed's cost, the plain sum of a per-pixel loss (a
    :class:`tireg.losses.PerPixelLoss`; an image-level metric is :func:`cost_and_gradient`'s)."""
    if not isinstance(loss, PerPixelLoss):
        raise TypeError(f"per_pixel_cost_and_gradient(): 'loss' must be a per-pixel loss (tireg.losses.PerPixelLoss); "
                        f"got {type(loss).__name__} (an image-level metric: tireg.analytic.cost_and_gradient)")
    return cost_and_gradient(fixed, moving, matrix, loss, **options)


def parameter_gradient(matrix_gradient: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """``dL/dp_k = <G, dA/dp_k>`` for all parameters at once.

    Args:
        matrix_gradient: ``G``, ``(B, 2, 3)`` (or ``(B, 3, 3)``; the last row is ignored).
        jacobian: ``dA/dp``, ``(B, P, 3, 3)`` or ``(1, P, 3, 3)``.

    Returns:
        ``(B, P)``.

    Raises:
        TypeError, ValueError: naming the argument, for shapes, dtypes or devices that do not
            fit together (checked outside a ``torch.compile`` trace; no value is read).
    """
    if not torch.compiler.is_compiling():
        _check_parameter_gradient(matrix_gradient, jacobian)
    jacobian = jacobian[:, :, :2, :].expand(matrix_gradient.shape[0], -1, -1, -1)
    return torch.einsum("bij,bpij->bp", matrix_gradient[:, :2, :], jacobian)


def _check_parameter_gradient(matrix_gradient: torch.Tensor, jacobian: torch.Tensor) -> None:
    """:func:`parameter_gradient`'s checks: shapes, dtypes and devices only."""
    caller = "parameter_gradient()"
    for name, tensor in (("matrix_gradient", matrix_gradient), ("jacobian", jacobian)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{caller}: '{name}' must be a torch.Tensor; got {type(tensor).__name__}")
        check_dense(tensor, name, caller)
    if matrix_gradient.dim() != 3 or matrix_gradient.shape[1:] not in ((2, 3), (3, 3)):
        raise ValueError(
            f"{caller}: 'matrix_gradient' must have shape (B, 2, 3) or (B, 3, 3); got {tuple(matrix_gradient.shape)}"
        )
    batch = matrix_gradient.shape[0]
    if jacobian.dim() != 4 or jacobian.shape[-2:] != (3, 3) or jacobian.shape[0] not in (1, batch):
        raise ValueError(
            f"{caller}: 'jacobian' must have shape (B, P, 3, 3) or (1, P, 3, 3) with B = {batch}; "
            f"got {tuple(jacobian.shape)}"
        )
    check_same_kind(jacobian, "jacobian", matrix_gradient, "matrix_gradient", caller)
