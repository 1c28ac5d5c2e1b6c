"""Per-pixel work in chunks under a pixel budget: one place for the rule and its budgets.

A batch's peak memory counts every image-sized temporary, so work that is a
sum over pixels, or independent per pair, runs on consecutive chunks of pairs
(or, for one pair above the budget, bands of rows) of at most a budget of
pixels each, and its sums are added.  Users: the initialiser's candidates and
pairs (:mod:`tireg.initialize`), the reference evaluation of ``register``
(a per-pixel loss's, NCC's system, the image-level metrics' calls) and of the analytic models
(:mod:`tireg.register`, :mod:`tireg.analytic`; local NCC's bands with margins,
:func:`bands_with_margins`), and the fused kernel's bands (:mod:`tireg.fused`).
"""

from __future__ import annotations

import torch

#: The reference (eager) evaluation of a per-pixel metric runs in chunks of at most this many
#: fixed pixels (x channels) on the CPU: each of its per-pixel quantities (grid, sampled
#: values, derivatives, products) is an image, about nine in all.  Measured on the CPU, one
#: thread: ``register`` of 128 x 256^2 and 8 x 1024^2 peaked at 9.1x its input images whole,
#: 3.3x in chunks of 2^20 and 2.9x in chunks of 2^16, in the same time or less (a chunk's
#: images stay in cache); the reference ``cost_and_gradient`` of 16 x 1024^2 took 200 instead
#: of 385 ms, an analytic model's whole eager step 240-255 instead of 400 ms
#: (``docs/design.md``, "Memory").  2^17 was 10-13 % faster but took one 1024^2 pair's
#: ``register`` from 2.66x to 2.99x its input (EPYC, ``speed.py --tables memory``).
EAGER_CHUNK_PIXELS = 1 << 16

#: The same on other devices, larger: every chunk costs its kernel launches (unmeasured: no GPU lent).
EAGER_CHUNK_PIXELS_ACCELERATOR = 1 << 24


def eager_budget(device: torch.device) -> int:
    """:data:`EAGER_CHUNK_PIXELS` on the CPU, :data:`EAGER_CHUNK_PIXELS_ACCELERATOR` elsewhere."""
    return EAGER_CHUNK_PIXELS if torch.device(device).type == "cpu" else EAGER_CHUNK_PIXELS_ACCELERATOR


def chunk_slices(count: int, item_pixels: int, budget: int) -> list[slice]:
    """``0 .. count`` in consecutive slices of ``max(1, budget // item_pixels)`` items (the last shorter).

    Items are pairs, candidates or rows of ``item_pixels`` pixels each; a chunk holds at most
    ``budget`` pixels, or one item where one item is larger.
    """
    size = max(1, budget // max(1, item_pixels))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def pair_and_row_chunks(shape: torch.Size, budget: int) -> list[tuple[slice, slice]]:
    """``(pairs, rows)`` chunks of a ``(B, C, H, W)`` batch of at most ``budget`` pixels each.

    Pairs go in :func:`chunk_slices` (all rows) where one pair fits the budget; otherwise one
    pair at a time, in bands of rows (``C W`` pixels a row; one row where a row is larger).
    """
    batch, channels, height, width = shape
    if channels * height * width <= budget:
        return [(pairs, slice(None)) for pairs in chunk_slices(batch, channels * height * width, budget)]
    bands = chunk_slices(height, channels * width, budget)
    return [(slice(index, index + 1), rows) for index in range(batch) for rows in bands]


def bands_with_margins(height: int, row_pixels: int, budget: int, margin: int) -> list[tuple[slice, slice]]:
    """Bands of rows of :func:`chunk_slices` (``row_pixels`` a row), each as ``(around, own)``: its
    rows with ``margin`` more on each side (cut at the image's edges), and its own rows within
    those.  Local NCC's windows reach across bands by their radius (:meth:`tireg.metrics.LocalNCC.part`)."""
    bands = []
    for rows in chunk_slices(height, row_pixels, budget):
        around = slice(max(0, rows.start - margin), min(height, rows.stop + margin))
        bands.append((around, slice(rows.start - around.start, rows.stop - around.start)))
    return bands
