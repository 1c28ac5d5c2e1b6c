"""Pictures of a registration: before/after comparison and convergence plot.

Both are drawn with matplotlib's Agg canvas on a :class:`matplotlib.figure.Figure`
(no ``pyplot``: nothing changes the caller's backend or global state) and
written as PNG atomically (a temporary file, then ``os.replace``).

* :func:`overlay` -- fixed in green, the other image in magenta: where they
  agree the picture is grey, where they differ it is green or magenta.
* :func:`checkerboard` -- tiles taken alternately from the two images:
  edges that continue across tiles are aligned.
* :func:`save_comparison` -- both, before and after, in one 2 x 2 figure.
* :func:`save_convergence` -- cost per iteration, coarse to fine.

Images are ``(H, W)`` arrays on the same pixel grid (resample the moving
image onto the fixed grid first); each is scaled to ``[0, 1]`` between its
0.5th and 99.5th percentiles, so gain and offset do not colour the overlay.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .io import atomic_path, require

__all__ = ["overlay", "checkerboard", "save_comparison", "save_convergence", "normalize"]

PathLike = Union[str, "os.PathLike[str]"]


def normalize(image: np.ndarray) -> np.ndarray:
    """``image`` scaled to ``[0, 1]`` between its 0.5th and 99.5th percentiles (finite values)."""
    image = np.asarray(image, dtype=np.float64)
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image)
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros_like(image)
    return np.clip((np.nan_to_num(image, nan=low) - low) / (high - low), 0.0, 1.0)


def _check_pair(first: np.ndarray, second: np.ndarray, caller: str) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first), np.asarray(second)
    if first.ndim != 2 or first.shape != second.shape:
        raise ValueError(
            f"{caller}: the images must be (H, W) arrays of one shape; got {first.shape} and {second.shape}"
        )
    return first, second


def overlay(fixed: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB in ``[0, 1]``: red = blue = ``other``, green = ``fixed`` (both normalised)."""
    fixed, other = _check_pair(fixed, other, "overlay()")
    fixed, other = normalize(fixed), normalize(other)
    return np.stack([other, fixed, other], axis=-1)


def checkerboard(fixed: np.ndarray, other: np.ndarray, *, tiles: int = 8) -> np.ndarray:
    """``(H, W)`` in ``[0, 1]``: squares of side ``min(H, W) / tiles``, alternately from ``fixed`` and ``other``."""
    fixed, other = _check_pair(fixed, other, "checkerboard()")
    side = max(1, int(round(min(fixed.shape) / max(int(tiles), 1))))
    rows = (np.arange(fixed.shape[0]) // side)[:, None]
    columns = (np.arange(fixed.shape[1]) // side)[None, :]
    return np.where((rows + columns) % 2 == 0, normalize(fixed), normalize(other))


def _figure(width_inches: float, height_inches: float):
    require("matplotlib", "drawing pictures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_inches, height_inches))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: PathLike, dpi: float) -> Path:
    path = Path(os.fspath(path))
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    return path


def save_comparison(
    path: PathLike,
    fixed: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    *,
    title: Optional[str] = None,
    tiles: int = 8,
    panel_width: int = 320,
) -> Path:
    """Write a PNG with the overlay (top) and checkerboard (bottom) of ``fixed`` against ``before`` and ``after``.

    Args:
        path: the ``.png`` to write.
        fixed: ``(H, W)`` fixed image.
        before: ``(H, W)`` moving image on the fixed grid, untransformed.
        after: ``(H, W)`` moving image warped onto the fixed grid.
        title: a line above the panels.
        panel_width: width of one panel in pixels (the PNG is about twice that wide).
    """
    fixed, before = _check_pair(fixed, before, "save_comparison()")
    _check_pair(fixed, after, "save_comparison()")
    height, width = fixed.shape
    dpi = 100.0
    panel_w = panel_width / dpi
    panel_h = panel_w * height / width
    figure = _figure(2 * panel_w + 0.3, 2 * panel_h + 0.9 + (0.3 if title else 0.0))
    axes = figure.subplots(2, 2)
    panels = [
        (overlay(fixed, before), "before: fixed green, moving magenta"),
        (overlay(fixed, after), "after: fixed green, warped magenta"),
        (checkerboard(fixed, before, tiles=tiles), "before: checkerboard"),
        (checkerboard(fixed, after, tiles=tiles), "after: checkerboard"),
    ]
    for axis, (picture, label) in zip(axes.flat, panels):
        axis.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axis.set_title(label, fontsize=8)
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(pad=0.4)
    return _save(figure, path, dpi)


def save_convergence(
    path: PathLike,
    levels: Sequence[tuple[int, np.ndarray]],
    *,
    title: Optional[str] = None,
    metric: str = "cost",
) -> Path:
    """Write a PNG of the cost against the iteration, one colour per pyramid level.

    Args:
        path: the ``.png`` to write.
        levels: coarse to fine, ``(shrink factor, costs)`` with ``costs`` of
            shape ``(iterations + 1, B)`` (the start, then after each
            iteration), as in :attr:`tireg.RegistrationResult.history`.  With
            ``B > 1`` pairs the median is drawn and every pair thinly (up to 50).
        title: the plot's title.
        metric: the y axis label.
    """
    figure = _figure(6.0, 3.6)
    axis = figure.subplots()
    start = 0
    low, high = math.inf, 0.0
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for index, (factor, costs) in enumerate(levels):
        costs = np.asarray(costs, dtype=np.float64)
        if costs.ndim == 1:
            costs = costs[:, None]
        steps = np.arange(start, start + costs.shape[0])
        colour = colours[index % len(colours)]
        if costs.shape[1] > 1:
            for column in costs.T[:50]:
                axis.plot(steps, column, color=colour, alpha=0.2, linewidth=0.6)
        label = f"level {index + 1}: 1/{factor} resolution" if factor > 1 else f"level {index + 1}: full resolution"
        axis.plot(steps, np.median(costs, axis=1), color=colour, marker="o", markersize=3, label=label)
        if index:
            axis.axvline(start, color="0.8", linewidth=0.8, zorder=0)
        finite = costs[np.isfinite(costs)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        start += costs.shape[0] - 1
    if levels and low > 0 and high / low > 20:  # a log scale only where the cost spans decades
        axis.set_yscale("log")
    axis.set_xlabel("iteration (each level starts at its first cost)")
    axis.set_ylabel(metric)
    if title:
        axis.set_title(title, fontsize=9)
    if levels:
        axis.legend(fontsize=8)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    return _save(figure, path, 100.0)
