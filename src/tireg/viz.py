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

import torch

from ._validation import as_path, is_sequence, is_whole, real_number
from .io import atomic_path, require

__all__ = ["overlay", "checkerboard", "save_comparison", "save_convergence", "normalize"]

PathLike = Union[str, "os.PathLike[str]"]


def _real_array(value, label: str, caller: str) -> np.ndarray:
    """``value`` (an array, a nested list or a tensor) as a NumPy array of real numbers; raise otherwise.

    A tensor is detached and copied to the CPU first (``.numpy()`` refused one that requires grad);
    complex values are refused, not cast (the cast dropped the imaginary part without a word).
    ``label`` names the value in the message: ``"'fixed'"``.
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{caller}: {label} holds complex values; pass their real part or magnitude")
        value = value.detach().to("cpu", torch.float64).numpy()  # float64: NumPy has no bfloat16
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # a ragged list
        raise TypeError(f"{caller}: {label} must be an array of numbers; got {type(value).__name__}") from None
    if array.dtype.kind == "c":
        raise TypeError(f"{caller}: {label} holds complex values; pass their real part or magnitude")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{caller}: {label} must hold real numbers; got {type(value).__name__} of {array.dtype}")
    return array


def _image(value, name: str, caller: str) -> np.ndarray:
    """``value`` as a non-empty ``(H, W)`` array of real numbers; raise, naming ``name``, otherwise."""
    image = _real_array(value, f"'{name}'", caller)
    if image.ndim != 2:
        raise ValueError(f"{caller}: '{name}' must be an (H, W) image; got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"{caller}: '{name}' is empty; got shape {image.shape}")
    return image


def _pair(first, second, names: tuple[str, str], caller: str) -> tuple[np.ndarray, np.ndarray]:
    """Two images of one shape (see :func:`_image`)."""
    first, second = _image(first, names[0], caller), _image(second, names[1], caller)
    if first.shape != second.shape:
        raise ValueError(f"{caller}: '{names[0]}' and '{names[1]}' must have the same shape (H, W); "
                         f"got {first.shape} and {second.shape}")
    return first, second


#: The widest panel :func:`save_comparison` draws, in pixels (the PNG is about twice as wide).
MAX_PANEL_WIDTH = 8192

#: The shortest side of a :func:`save_comparison` panel, as a fraction of ``panel_width``: a strip
#: image (2 x 1000 pixels) is drawn stretched to a visible strip, not 0.6 pixels tall.
MIN_PANEL_SIDE = 1 / 8

#: Room for a panel's title, in pixels: a tall strip's narrow panels are set this far apart.
TITLE_ROOM = 320


def _panel_size(height: int, width: int, box: int) -> tuple[float, float]:
    """``(width, height)`` in pixels of a panel showing an ``height x width`` image: fitted into a
    ``box x box`` square by its aspect ratio, its shorter side at least ``box * MIN_PANEL_SIDE``."""
    shortest = box * MIN_PANEL_SIDE
    if height <= width:
        return float(box), max(box * height / width, shortest)
    return max(box * width / height, shortest), float(box)


def _positive_whole(value, label: str, caller: str) -> int:
    """``value`` as an ``int`` if it is a whole number >= 1 (``8.0`` too); raise, saying ``label``
    (``"'tiles'"``), otherwise: ``int()`` had failed on NaN and truncated 2.7, and 0 or -3 passed."""
    if real_number(value) is None:  # "8", True, None
        shown = repr(value) if isinstance(value, (bool, str, bytes)) else type(value).__name__
        raise TypeError(f"{caller}: {label} must be a positive whole number; got {shown}")
    if not (is_whole(value) and value >= 1):  # NaN, Inf, 0, -3, 2.7
        raise ValueError(f"{caller}: {label} must be a positive whole number; got {value!r}")
    return int(value)


def _check_path(path: PathLike, caller: str) -> Path:
    """``path`` as a :class:`Path`, refused before the drawing if it is no path at all or does not
    end in ``.png`` (PNG data was written under any name: ``c.jpg``, ``plot.txt``)."""
    path = as_path(path, caller)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{caller}: 'path' must end in .png (the picture is a PNG); got {str(path)!r}")
    return path


def normalize(image: np.ndarray) -> np.ndarray:
    """``image`` scaled to ``[0, 1]`` between its 0.5th and 99.5th percentiles (finite values).

    ``image`` is any array of real numbers (a tensor too, detached); NaN becomes 0, +-Inf the ends.
    Raises ``TypeError`` for complex or non-numeric values.
    """
    image = _real_array(image, "'image'", "normalize()").astype(np.float64)
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image)
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros_like(image)
    # Inf to the ends directly: nan_to_num's default, the largest float, overflowed the division.
    image = np.nan_to_num(image, nan=low, posinf=high, neginf=low)
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def overlay(fixed: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB in ``[0, 1]``: red = blue = ``other``, green = ``fixed`` (both normalised).

    Raises:
        TypeError: an image of complex or non-numeric values.
        ValueError: an image that is not ``(H, W)``, is empty, or differs in shape from the other.
    """
    return _overlay(*_pair(fixed, other, ("fixed", "other"), "overlay()"))


def _overlay(fixed: np.ndarray, other: np.ndarray) -> np.ndarray:
    fixed, other = normalize(fixed), normalize(other)
    return np.stack([other, fixed, other], axis=-1)


def checkerboard(fixed: np.ndarray, other: np.ndarray, *, tiles: int = 8) -> np.ndarray:
    """``(H, W)`` in ``[0, 1]``: squares of side ``min(H, W) / tiles``, alternately from ``fixed`` and ``other``.

    Raises:
        TypeError: an image as for :func:`overlay`, or a ``tiles`` that is not a number.
        ValueError: an image as for :func:`overlay`, or a ``tiles`` that is not a positive whole number.
    """
    fixed, other = _pair(fixed, other, ("fixed", "other"), "checkerboard()")
    return _checkerboard(fixed, other, _positive_whole(tiles, "'tiles'", "checkerboard()"))


def _checkerboard(fixed: np.ndarray, other: np.ndarray, tiles: int) -> np.ndarray:
    side = max(1, int(round(min(fixed.shape) / tiles)))  # more tiles than pixels: one-pixel squares
    rows = (np.arange(fixed.shape[0]) // side)[:, None]
    columns = (np.arange(fixed.shape[1]) // side)[None, :]
    return np.where((rows + columns) % 2 == 0, normalize(fixed), normalize(other))


def _reduced(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` ``(H, W)`` reduced by a whole factor ``f`` so that its longer side is at most about
    ``side`` pixels: the mean of each ``f x f`` block (area averaging, no aliasing of fine texture),
    the last blocks padded by the edge's values; as it is where it is no larger."""
    factor = -(-max(image.shape) // side)
    if factor <= 1:
        return image
    height, width = -(-image.shape[0] // factor) * factor, -(-image.shape[1] // factor) * factor
    padded = np.pad(np.asarray(image, dtype=np.float64), ((0, height - image.shape[0]), (0, width - image.shape[1])),
                    mode="edge")
    return padded.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))


def _figure(width_inches: float, height_inches: float):
    require("matplotlib", "drawing pictures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_inches, height_inches))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path, dpi: float) -> Path:
    # A temporary file renamed when complete: a failed or interrupted draw leaves no half-written PNG.
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
        path: the ``.png`` to write (atomically: a temporary file, then renamed).
        fixed: ``(H, W)`` fixed image.
        before: ``(H, W)`` moving image on the fixed grid, untransformed.
        after: ``(H, W)`` moving image warped onto the fixed grid.
        title: a line above the panels.
        tiles: checkerboard squares along the shorter side, a positive whole number.
        panel_width: the side of the square box, in pixels, each panel is fitted into by the image's
            aspect ratio (the width of a landscape image's panel, the height of a portrait one's), a
            whole number from 1 to :data:`MAX_PANEL_WIDTH`; the PNG is about twice that wide and tall
            at most.  A strip's shorter side is drawn :data:`MIN_PANEL_SIDE` of it at least (the image
            stretched), so that it shows.

    Raises:
        TypeError, ValueError: before anything is drawn or written, naming the argument: images as
            for :func:`overlay` (``before`` and ``after`` of ``fixed``'s shape), ``tiles`` or
            ``panel_width`` not a positive whole number, ``path`` not a path.
    """
    caller = "save_comparison()"
    path = _check_path(path, caller)
    fixed, before = _pair(fixed, before, ("fixed", "before"), caller)
    fixed, after = _pair(fixed, after, ("fixed", "after"), caller)
    tiles = _positive_whole(tiles, "'tiles'", caller)
    panel_width = _positive_whole(panel_width, "'panel_width'", caller)
    if panel_width > MAX_PANEL_WIDTH:  # 10^6 ran out of memory inside matplotlib
        raise ValueError(f"{caller}: 'panel_width' must be at most {MAX_PANEL_WIDTH} pixels; got {panel_width}")
    # the panels are drawn panel_width pixels a side at most: the images are reduced to about twice
    # that first (matplotlib resampled a 4096^2 pair's panels from the full images: 42 s and 4 GB for a
    # picture 640 pixels wide)
    fixed, before, after = (_reduced(image, 2 * panel_width) for image in (fixed, before, after))
    height, width = fixed.shape
    dpi = 100.0
    # fitted into a panel_width square, not panel_width wide whatever the height: a (300, 2) image made a
    # 670 x 96090 PNG (1.7 GB, 12 s), and a (2, 1000) one panels 0.6 pixels tall, blank
    panel_w, panel_h = (side / dpi for side in _panel_size(height, width, panel_width))
    aspect = (panel_h / panel_w) / (height / width)  # a strip stretched to its panel: 1 otherwise
    cell_w = max(panel_w, min(panel_width, TITLE_ROOM) / dpi)  # a narrow panel's title still fits
    figure = _figure(2 * cell_w + 0.3, 2 * panel_h + 0.9 + (0.3 if title else 0.0))
    axes = figure.subplots(2, 2)
    panels = [
        (_overlay(fixed, before), "before: fixed green, moving magenta"),
        (_overlay(fixed, after), "after: fixed green, warped magenta"),
        (_checkerboard(fixed, before, tiles), "before: checkerboard"),
        (_checkerboard(fixed, after, tiles), "after: checkerboard"),
    ]
    for axis, (picture, label) in zip(axes.flat, panels):
        axis.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect=aspect)
        axis.set_title(label, fontsize=8)
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(pad=0.4)
    return _save(figure, path, dpi)


def _levels(levels, caller: str) -> list[tuple[int, np.ndarray]]:
    """``levels`` as a list of ``(factor, costs)``, ``costs`` float64 ``(iterations + 1, B)``; raise,
    naming ``levels[i]``, for anything else (all checked before a figure is made)."""
    if not is_sequence(levels):  # a 0-d tensor too: "iteration over a 0-d tensor"
        raise TypeError(f"{caller}: 'levels' must be a sequence of (shrink factor, costs); "
                        f"got {type(levels).__name__}")
    checked = []
    for index, level in enumerate(levels):  # a generator too: read once, here
        name = f"levels[{index}]"
        if not is_sequence(level) or not hasattr(level, "__len__") or len(level) != 2:
            shape = f" of shape {tuple(level.shape)}" if hasattr(level, "shape") else ""
            raise TypeError(f"{caller}: '{name}' must be a pair (shrink factor, costs); "
                            f"got {type(level).__name__}{shape}")
        factor, costs = level
        factor = _positive_whole(factor, f"the shrink factor of '{name}'", caller)
        costs = _real_array(costs, f"the cost array of '{name}'", caller).astype(np.float64)
        shape = costs.shape
        if costs.ndim == 1:
            costs = costs[:, None]
        if costs.ndim != 2 or costs.size == 0:  # a scalar had raised IndexError, 3-D was drawn flattened
            raise ValueError(f"{caller}: the cost array of '{name}' must have shape (iterations + 1,) or "
                             f"(iterations + 1, B), at least one cost; got shape {shape}")
        checked.append((factor, costs))
    return checked


def save_convergence(
    path: PathLike,
    levels: Sequence[tuple[int, np.ndarray]],
    *,
    title: Optional[str] = None,
    metric: str = "cost",
) -> Path:
    """Write a PNG of the cost against the iteration, one colour per pyramid level.

    Args:
        path: the ``.png`` to write (atomically: a temporary file, then renamed).
        levels: coarse to fine, ``(shrink factor, costs)`` with a positive whole shrink factor and
            ``costs`` of shape ``(iterations + 1, B)`` or ``(iterations + 1,)`` (the start, then
            after each iteration), as in
            :attr:`tireg.RegistrationResult.history`.  With ``B > 1`` pairs the median is drawn
            and every pair thinly (up to 50).
        title: the plot's title.
        metric: the y axis label.

    Raises:
        TypeError, ValueError: before anything is drawn or written, naming ``levels[i]``: not a
            pair, a shrink factor that is not a positive whole number, costs that are not real
            numbers of one of those shapes or hold none; ``path`` not a path.
    """
    caller = "save_convergence()"
    path = _check_path(path, caller)
    levels = _levels(levels, caller)
    figure = _figure(6.0, 3.6)
    axis = figure.subplots()
    start = 0
    low, high = math.inf, 0.0
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for index, (factor, costs) in enumerate(levels):
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
