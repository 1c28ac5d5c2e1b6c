"""The ``tireg`` command: ``register``, ``apply``, ``stack``, ``demo``.

Run ``tireg COMMAND --help`` for each command's options and an example.

Convention:
    Every matrix printed or saved maps **fixed**-image pixels to **moving**-
    image pixels, ``warped(x) = moving(A x)``, ``x`` = column, ``y`` = row,
    pixel centres at integers (ITK's direction).  Images on disk are
    ``(H, W)`` or ``(H, W, C)``; colour images are registered on their
    luminance (``--channel K``: on channel ``K``) and every channel is warped.

Errors in the input (a missing or unreadable file, an unsupported format,
mismatched channels or sizes, an empty or constant image, NaN or Inf, an
unknown option) print one line, ``tireg: error: ...``, to stderr and exit
with status 2 (command line) or 1 (input), leaving no output file: every
output is written under a temporary name and moved into place only when all
of them are complete.  Ctrl-C (status 130) and SIGTERM (143) leave none either.
An existing output is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import math
import os
import re
import signal
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ._validation import check_size, writable
from .io import (
    _finite,
    ImageData,
    ImageError,
    ImageFormat,
    MissingDependencyError,
    OutputFiles,
    SUFFIXES,
    check_writable,
    errors_named_by,
    format_for_path,
    luminance,
    luminance_words,
    on_grid_of,
    premultiply,
    read_image,
    read_stack,
    require,
    unpremultiply,
    write_frames,
)

__all__ = ["main", "build_parser"]

PROG = "tireg"


class UsageError(Exception):
    """A wrong command line (exit status 2)."""


class CommandError(Exception):
    """Input the command cannot work with (exit status 1)."""


class Terminated(BaseException):
    """SIGTERM while :func:`main` runs (then the process ends by SIGTERM: status 143, 128 + 15, in a shell).

    A ``BaseException``, as ``KeyboardInterrupt`` is: code that catches ``Exception`` on the way
    does not swallow it, and the outputs' ``with`` block discards the temporary files and the
    folders the command created.
    """


def _before_separator(arguments: list[str]) -> list[str]:
    """The arguments before ``--`` (after it, every argument is positional)."""
    return arguments[: arguments.index("--")] if "--" in arguments else arguments


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (raised, printed by :func:`main`)."""

    def parse_known_args(self, args=None, namespace=None):
        self._arguments = list(sys.argv[1:] if args is None else args)  # for error(), below
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # noqa: D401 - argparse's API
        if message.startswith("the following arguments are required"):
            # a mistyped option (--wobble) took a required argument's place: name it, not what is missing
            unknown = [argument for argument in _before_separator(getattr(self, "_arguments", []))
                       if argument.startswith("-") and len(argument) > 1 and not argument[1].isdigit()
                       and not self._known_option(argument)]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def _known_option(self, argument: str) -> bool:
        """Whether argparse would take ``argument`` as one of this parser's options: exact, a unique
        prefix of a long one (``--trans``), or a short one with its value attached (``-oOUT``)."""
        name = argument.split("=")[0]
        if name in self._option_string_actions:
            return True
        if name.startswith("--"):
            return any(option.startswith(name) for option in self._option_string_actions)
        return argument[:2] in self._option_string_actions


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples' line breaks; show defaults, except where there is none to show (``None``,
    a required option, a flag) or the help already says it ("(default: None)" had followed them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.required or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------
# the command line


def _register_defaults() -> dict[str, Any]:
    """``register()``'s own defaults, so that the command follows the library."""
    from .register import register

    return {name: p.default for name, p in inspect.signature(register).parameters.items()}


#: Most levels ``--levels N`` takes: a factor of 2^15 already leaves 4 pixels of a 131072-pixel side.
MAX_LEVELS = 16


class _Levels(tuple):
    """``--levels``'s shrink factors, with the text given (for messages: ``--levels 7``, not its 7 factors)."""

    text: str = ""


def _levels(text: str) -> tuple[int, ...]:
    """``"3"`` -> ``(4, 2, 1)``; ``"8,4,2,1"`` -> as given."""
    factors = _Levels(_factors(text))
    factors.text = text
    return factors


def _factors(text: str) -> tuple[int, ...]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of levels (e.g. 3) or shrink factors (e.g. 4,2,1); got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"levels must be positive integers; got {text!r}")
    if len(values) == 1 and "," not in text:
        if values[0] > MAX_LEVELS:  # 2**k for a huge k ran out of memory before any check
            raise argparse.ArgumentTypeError(
                f"at most {MAX_LEVELS} levels (a shrink factor of {2 ** (MAX_LEVELS - 1)}); got {text!r}")
        return tuple(2**k for k in reversed(range(values[0])))
    return tuple(values)


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N or auto")
    return str(device)


#: Most pixels an output of ``tireg apply`` may have (--size, a transform's fixed_size): 8 TiB a channel in
#: float64, beyond any machine's memory, and far from numpy's limit ("Maximum allowed dimension exceeded",
#: "array is too big", which named no option or file).  Between what memory holds and this: out of memory.
MAX_OUTPUT_PIXELS = 2**40


def _too_many_pixels(size: Sequence[int]) -> str:
    """``""``, or why an output of ``size`` ``(H, W)`` is refused."""
    pixels = int(size[0]) * int(size[1])
    if pixels <= MAX_OUTPUT_PIXELS:
        return ""
    return f"{pixels} pixels is too large; an output has at most {MAX_OUTPUT_PIXELS} (2**40) pixels"


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 480x640; got {text!r}")
    size = int(match[1]), int(match[2])
    if _too_many_pixels(size):  # argparse names the option: "argument --size: ..."
        raise argparse.ArgumentTypeError(f"{text}: {_too_many_pixels(size)}")
    return size


def _output(text: str) -> str:
    """An output path: not empty (``-o ""`` wrote every output into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path; got {text!r}")
    return text


def _whole_number(text: str, least: int, expected: str) -> int:
    """``int(text)`` if it is at least ``least``; else argparse's error, ``expected ...; got ...``."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "a positive integer")


def _compile_choice(text: str):
    """``--compile auto|on|off`` -> ``register(compile="auto" | True | False)``."""
    choices = {"auto": "auto", "on": True, "off": False}
    if text not in choices:
        # "--compile a.png b.png": the option's optional value took the first image
        hint = " (--compile alone takes the next argument as its value: put it after the images)" \
            if Path(text).suffix.lower() in SUFFIXES or os.sep in text else ""
        raise argparse.ArgumentTypeError(f"expected auto, on or off; got {text!r}{hint}")
    return choices[text]


def _finite_number(text: str, accepted: Callable[[float], bool], expected: str) -> float:
    """``float(text)`` if finite and ``accepted``; else argparse's error, ``expected ...; got ...``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accepted(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def _channel_index(text: str) -> int:
    return _whole_number(text, 0, "a channel number, 0 for the first")


def _sigma(text: str) -> float:
    return _finite_number(text, lambda value: value >= 0, "a number of pixels of at least 0")


def _positive_float(text: str) -> float:
    return _finite_number(text, lambda value: value > 0, "a positive number")


REGISTER_EXAMPLE = """\
example:
  tireg register fixed.png moving.png -o aligned --transform rigid

writes into aligned/: warped.png (the moving image on the fixed grid, same
format, bit depth and channels as moving.png), transform.json and
transform.tfm (ITK: SimpleITK, 3D Slicer and ITK-SNAP read it),
before_after.png (overlay and checkerboard, before and after) and
convergence.png (cost per iteration).  The matrix maps fixed-image pixels to
moving-image pixels (x = column, y = row), ITK's direction.
"""

APPLY_EXAMPLE = """\
examples:
  tireg apply aligned/transform.json moving_red.tif -o red_aligned.tif
  tireg apply sitk_transform.tfm moving.png -o warped.png --reference fixed.png
  tireg apply green_aligned.csv red.tif -o red_aligned.tif    # a stack's drift, on another channel

TRANSFORM is a tireg .json or an ITK .tfm/.txt (written by tireg, SimpleITK,
ITK, 3D Slicer), read in pixel units (spacing 1, origin 0), or the .csv of
'tireg stack' (one matrix per page: a row's frame column names its page, the
rows in any order; frames numbered 0 to n - 1 for the n rows, so a CSV cut
to some frames is renumbered first).  The output is IMAGE resampled onto the
fixed grid, warped(x) = IMAGE(A x); its size is that of --reference, --size,
the registration's fixed image when the .json records it, or else IMAGE's
own.  Every page of a multi-page TIFF is resampled.
"""

STACK_EXAMPLE = """\
examples:
  tireg stack timelapse.tif -o aligned.tif
  tireg stack frames/ -o aligned/ --reference previous --transform translation

INPUT is a multi-page TIFF, a (N, H, W[, C]) .npy array or a folder of
images (read in natural order: 2.png before 10.png, A.png before a.png).  OUTPUT is a .tif/.tiff,
a .npy, or a folder (no suffix) with one file per frame.  A CSV of per-frame
transforms goes beside it (OUTPUT with the suffix .csv, or --csv): each row's
matrix maps the reference's pixels to the frame's pixels.  With --reference
previous, frame k is registered to frame k-1 (A_k maps frame k-1 pixels to
frame k pixels) and the matrices are chained so that every frame is aligned
to the first: frame 0 -> frame k is A_k A_(k-1) ... A_1 (A_1 applied first).
With --reference mean, the frames so aligned are averaged on frame 0's grid and
every frame is registered again to that mean (two passes).
"""

DEMO_EXAMPLE = """\
example:
  tireg demo
  tireg register tireg-demo/fixed.png tireg-demo/moving.png -o tireg-demo/register --transform similarity

registers a bundled photograph to a copy of itself turned, scaled and shifted
by a known transform, prints the recovered and the true parameters, and
writes fixed.png, moving.png, warped.png, before_after.png, convergence.png,
transform.json and transform.tfm into the folder (default ./tireg-demo).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``tireg`` argument parser with its four subcommands."""
    from . import __version__
    from .initialize import METHODS
    from .losses import LOSSES
    from .metrics import METRIC_NAMES
    from .register import OPTIMIZERS
    from .transforms import TRANSFORMS
    from .data import IMAGES

    defaults = _register_defaults()
    parser = _Parser(
        prog=PROG,
        description="Align images from the terminal: register two images, apply a saved transform, "
        "align a stack, or run the demo.",
        epilog="examples:\n  tireg demo\n  tireg register fixed.png moving.png -o out\n"
        "  tireg apply out/transform.tfm other.tif -o other_aligned.tif\n"
        "  tireg stack movie.tif -o movie_aligned.tif\n\n"
        "'tireg COMMAND --help' describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--force", action="store_true", help="overwrite existing outputs")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors (no progress bar)")
    common.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)

    def registration_options(sub: argparse.ArgumentParser, transform: str, mask_help: str) -> None:
        group = sub.add_argument_group("registration")
        group.add_argument("-t", "--transform", choices=list(TRANSFORMS), default=transform,
                           help="transform to find")
        # the per-pixel losses first (the default among them), then the image-level metrics
        group.add_argument("-m", "--metric", choices=[*LOSSES, *(n for n in METRIC_NAMES if n not in LOSSES)],
                           default=defaults["metric"],
                           help="cost: a per-pixel loss on intensity-normalised images (robust: cauchy, huber, ...), "
                                "or for changed contrast and other modalities ncc (ncc_any: inverted contrast too), "
                                "lncc (uneven illumination), mi or nmi (any intensity mapping)")
        group.add_argument("--loss-scale", type=_positive_float, default=None, metavar="S",
                           help="outlier scale of -m cauchy, geman_mcclure (scale) or huber (delta), in "
                           "normalised intensities (default 1); smaller rejects more, e.g. 0.3 for a moving "
                           "foreground")
        group.add_argument("--optimizer", choices=list(OPTIMIZERS), default=defaults["optimizer"],
                           help="Levenberg-Marquardt (gauss-newton) or a torch.optim optimiser")
        group.add_argument("--init", choices=list(METHODS), default=defaults["init"],
                           help="initial transform: automatic search, or one method")
        group.add_argument("--levels", type=_levels, default=None, metavar="N|F,F,..",
                           help="pyramid: a number of levels (3 = shrink 4,2,1) or the shrink factors; "
                           "default: halve down to about 32 pixels")
        group.add_argument("--smoothing", type=_sigma, default=None, metavar="SIGMA",
                           help="Gaussian smoothing of the full-resolution level, in pixels (default: 1 for the "
                           "per-pixel losses, ncc(_any) and lncc(_any), against noise; 0.5 for mi and nmi; 0 for --optimizer sgd)")
        group.add_argument("--max-iterations", type=_positive_int, default=defaults["max_iterations"],
                           metavar="N", help="iterations per level (default: 50 for gauss-newton, 300 otherwise)")
        group.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear",
                           help="interpolation, for the registration and the warped output")
        group.add_argument("--device", type=_device, default="cpu", metavar="DEVICE",
                           help="cpu, cuda, cuda:N, or auto (cuda when available)")
        group.add_argument("--mask", metavar="IMAGE", help=mask_help)
        group.add_argument("--nodata", type=_nodata_value, default=None, metavar="V",
                           help="value of pixels without data (GDAL's nodata, e.g. -9999 or nan): left out of the "
                           "registration, and the value of output pixels without data; default: a GeoTIFF's "
                           "GDAL_NODATA tag; none: ignore that tag")
        group.add_argument("--channel", type=_channel_index, default=None, metavar="K",
                           help="register on channel K (0 for the first) instead of the luminance, e.g. a "
                           "hyperstack's structural channel; every channel is warped all the same")
        group.add_argument("--compile", type=_compile_choice, nargs="?", const=True, default=defaults["compile"],
                           metavar="auto|on|off",
                           help="compiled fast path (torch.compile): seconds to start, then faster; "
                           "pays for long stacks. auto: when one batch of two frames or more has "
                           "64 Mpx or more; --compile alone: on")

    # register
    sub = commands.add_parser(
        "register", parents=[common], formatter_class=_Formatter, epilog=REGISTER_EXAMPLE,
        help="find the transform that aligns MOVING to FIXED",
        description="Find the transform A with moving(A x) ~ fixed(x) and write the warped moving image, "
        "the transform (.json, .tfm) and pictures into OUTDIR.",
    )
    sub.add_argument("fixed", metavar="FIXED", help="reference image (.png, .jpg, .tif, .npy)")
    sub.add_argument("moving", metavar="MOVING", help="image to align to FIXED")
    sub.add_argument("-o", "--output", type=_output, required=True, metavar="OUTDIR", help="folder for the outputs (created)")
    registration_options(sub, "affine", "where FIXED counts (nonzero pixels), same size as FIXED")
    sub.add_argument("--moving-mask", metavar="IMAGE", help="where MOVING counts, same size as MOVING")
    sub.set_defaults(handler=_cmd_register)

    # apply
    sub = commands.add_parser(
        "apply", parents=[common], formatter_class=_Formatter, epilog=APPLY_EXAMPLE,
        help="resample an image with a saved transform",
        description="Resample IMAGE with the transform saved in TRANSFORM (a tireg .json, an ITK .tfm, or "
        "the .csv of tireg stack).",
    )
    sub.add_argument("transform", metavar="TRANSFORM",
                     help="transform file: .json, .tfm or .txt, or the .csv of tireg stack (a matrix per page)")
    sub.add_argument("image", metavar="IMAGE", help="image to resample")
    sub.add_argument("-o", "--output", type=_output, required=True, metavar="OUT",
                     help="output image; its suffix picks the format, the bit depth is IMAGE's")
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--reference", metavar="IMAGE", help="take the output size from this (fixed) image")
    where.add_argument("--size", type=_size, metavar="HxW", help="output size in pixels, e.g. 480x640")
    sub.add_argument("--interpolation", choices=list(APPLY_INTERPOLATIONS), default=None,
                     help="interpolation (nearest for label images); default: the one the registration used, "
                     "as TRANSFORM records it (tireg's .json and .tfm, a stack's .csv), else bilinear")
    sub.add_argument("--nodata", type=_nodata_value, default=None, metavar="V",
                     help="value of IMAGE's pixels without data (GDAL's nodata, e.g. -9999 or nan), and of the "
                     "output's; default: a GeoTIFF's GDAL_NODATA tag; none: ignore that tag")
    sub.set_defaults(handler=_cmd_apply)

    # stack
    sub = commands.add_parser(
        "stack", parents=[common], formatter_class=_Formatter, epilog=STACK_EXAMPLE,
        help="align every frame of a stack (drift correction)",
        description="Align every frame of a multi-page TIFF, a .npy stack or a folder of images to a "
        "reference, in batches, and save the aligned stack and a CSV of per-frame transforms.",
    )
    sub.add_argument("input", metavar="INPUT", help="multi-page .tif, (N, H, W[, C]) .npy, or a folder of images")
    sub.add_argument("-o", "--output", type=_output, required=True, metavar="OUTPUT",
                     help="aligned stack: .tif/.tiff, .npy, or a folder")
    sub.add_argument("-r", "--reference", choices=["first", "previous", "mean"], default="first",
                     help="align to the first frame, to the previous one (chained), or to the mean of the frames "
                          "(aligned to the first by a chained pass, then every frame to it)")
    sub.add_argument("--csv", metavar="PATH", help="per-frame transforms (default: OUTPUT with suffix .csv)")
    sub.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                     help="frames registered together in one batched call")
    registration_options(sub, "rigid", "where the reference counts (nonzero pixels), same size as the frames")
    sub.add_argument("--frame-mask", metavar="IMAGE",
                     help="where every frame has data (nonzero pixels): a label or dead region at the same place in "
                          "every frame, left out of each frame as the moving image and as the reference")
    sub.set_defaults(handler=_cmd_stack)

    # demo
    sub = commands.add_parser(
        "demo", parents=[common], formatter_class=_Formatter, epilog=DEMO_EXAMPLE,
        help="register a bundled image to a known transform of itself",
        description="Register bundled example images, print the recovered and the true transform, "
        "and write the pictures to a folder.",
    )
    sub.add_argument("-o", "--output", type=_output, default="tireg-demo", metavar="DIR", help="folder for the pictures")
    sub.add_argument("--image", choices=list(IMAGES), default="camera", help="bundled image to use")
    sub.set_defaults(
        handler=_cmd_demo, transform="similarity", metric=defaults["metric"], optimizer=defaults["optimizer"],
        init=defaults["init"], levels=None, smoothing=None, max_iterations=defaults["max_iterations"],
        interpolation="bilinear",
        device="cpu", mask=None, compile=defaults["compile"],
    )
    return parser


# ----------------------------------------------------------------------------
# shared pieces


def _say(args: argparse.Namespace, text: str = "") -> None:
    if not args.quiet:
        print(text, flush=True)


class _Progress:
    """A tqdm bar fed by ``register()``'s callback: level and iteration (shown after a second)."""

    def __init__(self, args: argparse.Namespace, levels: int, *, total: Optional[int] = None, unit: str = "it"):
        self.levels, self.bar = levels, None
        if not args.quiet:
            tqdm = require("tqdm", "the progress bar (or pass --quiet)")
            if total is None:
                layout = "{desc}{postfix} [{elapsed}]"
            else:
                layout = "{n_fmt}/{total_fmt} " + unit + "s |{bar}| {desc}{postfix} [{elapsed}<{remaining}]"
            # shown on a terminal only, after a second: quick runs stay quiet
            self.bar = tqdm.tqdm(total=total, unit=unit, delay=1.0, leave=False, dynamic_ncols=True,
                                 file=sys.stderr, disable=None, bar_format=layout)
        self.frames = total is not None

    def __call__(self, state) -> None:
        if self.bar is None:
            return
        cost = float(state.cost.float().mean())
        resolution = "full" if state.factor == 1 else f"1/{state.factor}"
        self.bar.set_description_str(f"level {state.level + 1}/{self.levels} ({resolution})", refresh=False)
        self.bar.set_postfix_str(f"iteration {state.iteration + 1}, cost {cost:.4g}", refresh=False)
        self.bar.update(0 if self.frames else 1)  # update() honours the delay; refresh() would not

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _schedule(args: argparse.Namespace, size: tuple[int, int], what: str = "image") -> list[tuple[int, float]]:
    """The pyramid's levels for images of ``size``; :class:`UsageError` naming ``--levels`` for a factor
    too large for them, ``--smoothing`` for a sigma too (register()'s own messages named a Python
    tuple, not the option)."""
    if args.levels is not None and min(size) // max(args.levels) < 4:
        largest = min(size) // 4  # the largest factor that leaves 4 pixels; --levels N reaches 2**(N - 1)
        text = getattr(args.levels, "text", "") or ",".join(map(str, args.levels))
        raise UsageError(f"--levels {text}: shrink factor {max(args.levels)} leaves fewer than 4 pixels of the "
                         f"{size[1]} x {size[0]} {what}; use factors of at most {largest} (--levels "
                         f"{largest.bit_length()} at most)")
    # register()'s own limit (Pyramid.levels), named here as the option: its message gave a Python
    # (H, W) tuple and exited 1
    if args.smoothing is not None and args.smoothing > min(size) / 2:
        raise UsageError(f"--smoothing {args.smoothing:g}: a sigma of that many pixels leaves nothing of the "
                         f"{size[1]} x {size[0]} {what} to align; give at most {min(size) / 2:g}")
    return _pyramid(args).levels(size)  # register() warns about factors that do not end with 1


def _pyramid(args: argparse.Namespace):
    """The ``register()`` pyramid of ``--levels`` and ``--smoothing``."""
    from .register import Pyramid

    return Pyramid(shrink_factors=args.levels, finest_smoothing=args.smoothing)


def _single(image: ImageData, what: str) -> ImageData:
    if image.count != 1:
        hint = " (use 'tireg stack' for a stack of frames)" if what in ("fixed image", "moving image") else ""
        raise CommandError(
            f"{what} {str(image.path)!r} has {image.count} pages; this command takes one image{hint}"
        )
    return image


def _check_finite(image: ImageData, what: str, nodata: Optional[float] = None) -> None:
    """NaN or Inf in ``image`` refused, naming the frame; NaN taken where it is the no-data value."""
    if image.frames.dtype.kind == "f":
        finite = _finite(image.frames, nodata is not None and math.isnan(nodata)).reshape(image.count, -1).all(axis=1)
        if not finite.all():
            frame = "" if image.count == 1 else f" (frame {image.names[int(np.argmin(finite))]!r})"
            hint = "" if nodata is not None else "; where NaN marks pixels without data, give --nodata nan"
            raise CommandError(f"{what} {str(image.path)!r} contains {'Inf' if nodata is not None else 'NaN or Inf'} "
                               f"values{frame}{hint}")


def _nodata_value(text: str) -> float | str:
    """``--nodata``: a number (``nan`` too), or ``none``."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (e.g. -9999, 0, nan) or none; got {text!r}") from None


def _nodata(args: argparse.Namespace, image: ImageData, what: str) -> Optional[float]:
    """The value that marks ``image``'s pixels without data: ``--nodata`` where given (``none``: no
    value), else its file's ``GDAL_NODATA`` tag (:attr:`~tireg.io.ImageFormat.nodata`), else ``None``.

    A value the image's type cannot hold is refused when it is ``--nodata``'s, and left out with a
    warning when it is the file's (GDAL keeps the tag of a float original through a cast to bytes)."""
    chosen = getattr(args, "nodata", None)
    value = image.format.nodata if chosen is None else None if chosen == "none" else chosen
    dtype = image.frames.dtype
    if value is None or dtype.kind == "f" or (not math.isnan(value) and value == int(value) and (
            dtype.kind == "b" and value in (0, 1) or dtype.kind in "iu" and
            np.iinfo(dtype).min <= value <= np.iinfo(dtype).max)):
        return value
    holds = "0 and 1" if dtype.kind == "b" else f"whole numbers {np.iinfo(dtype).min} to {np.iinfo(dtype).max}"
    if chosen is None:
        warnings.warn(f"{what} {str(image.path)!r}: its GDAL_NODATA value {value:g} is no {dtype} value "
                      f"({holds}); no pixel is taken as without data (--nodata V names the value)", UserWarning)
        return None
    raise CommandError(f"--nodata {value:g}: {what} {str(image.path)!r} holds {dtype} values ({holds}); "
                       "no pixel of it can be that value")


def _has_data(image: ImageData, nodata: Optional[float], channel: Optional[int],
              frames: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """``(N, H, W)`` bool, where ``image``'s frames (or ``frames``, some of them) have data: the
    registered channels (``--channel``'s, else every colour channel; not alpha) differ from
    ``nodata`` (GDAL's no-data rule; NaN for ``nan``).  ``None`` where every pixel has data or
    there is no value: the registration then runs as without a mask."""
    if nodata is None:
        return None
    frames = image.frames if frames is None else frames
    colour = frames.shape[-1] - (image.format.alpha is not None)
    values = frames[..., channel:channel + 1] if channel is not None else frames[..., :colour]
    missing = (np.isnan(values) if math.isnan(nodata) else values == nodata).any(axis=-1)
    return None if not missing.any() else ~missing


def _filled(grey: np.ndarray, has_data: Optional[np.ndarray]) -> np.ndarray:
    """``grey`` ``(..., H, W)`` with its no-data pixels set to the least value with data, per frame:
    out of the registration by its mask, and out of the pictures' contrast (-9999 or NaN there)."""
    if has_data is None:
        return grey
    least = np.where(has_data, grey, np.inf).reshape(*grey.shape[:-2], -1).min(axis=-1)
    least = np.where(np.isfinite(least), least, 0.0)  # a frame without data: refused by its mask's count
    return np.where(has_data, grey, least[..., None, None])


def _data_mask(mask: Optional[np.ndarray], has_data: Optional[np.ndarray], image: ImageData, what: str,
               nodata: Optional[float]) -> Optional[np.ndarray]:
    """``mask`` (``--mask``, ``(H, W)``) and ``has_data`` (``(H, W)``), as a float32 mask: the pixels
    that count.  At least 16 are needed."""
    if has_data is None:
        return mask
    counted = has_data.astype(np.float32) if mask is None else mask * has_data
    if counted.sum() < 16:
        inside = " inside the mask" if mask is not None else ""
        raise CommandError(f"{what} {str(image.path)!r} has {int(counted.sum())} pixels with data{inside} (the "
                           f"rest are the no-data value {nodata:g}); at least 16 are needed")
    return counted


def _registered_grey(image: ImageData, channel: Optional[int], what: str, frames: Optional[np.ndarray] = None
                     ) -> np.ndarray:
    """What is registered of ``image``'s frames (or of ``frames``, some of them), ``(..., H, W)``
    float64: their luminance (:func:`~tireg.io.luminance`), or channel ``channel`` (``--channel``;
    a 2-channel fluorescence image was registered on channel 0, whatever it held)."""
    frames = image.frames if frames is None else frames
    if channel is None:
        return luminance(frames)
    if channel >= image.channels:
        raise CommandError(f"--channel {channel}: {what} {str(image.path)!r} has {image.channels} channel"
                           f"{'s' if image.channels > 1 else ''} (--channel 0 to {image.channels - 1})")
    return frames[..., channel].astype(np.float64)


def _registered_on(channels: int, channel: Optional[int]) -> str:
    """What of an image of ``channels`` channels :func:`_registered_grey` registers, in words (printed:
    a 4-band B, G, R, NIR scene was registered on a luma that weighs blue as red, without a word)."""
    return f"channel {channel}" if channel is not None else luminance_words(channels)


def _check_size(grey: np.ndarray, image: ImageData, what: str) -> None:
    """``grey`` ``(N, H, W)``: frames of at least 8 x 8 pixels."""
    if min(grey.shape[-2:]) < 8:
        raise CommandError(
            f"{what} {str(image.path)!r} is {grey.shape[-1]} x {grey.shape[-2]} pixels; at least 8 x 8 are needed"
        )


def _constant(grey: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: which frames of ``grey`` ``(N, H, W)`` have one value in every pixel."""
    flat = grey.reshape(grey.shape[0], -1)
    return flat.max(axis=1) == flat.min(axis=1)  # not a deviation: it overflowed at 1e305 and said constant


def _check_grey(grey: np.ndarray, image: ImageData, what: str) -> None:
    """``grey`` ``(1, H, W)``, one image: at least 8 x 8 and not constant."""
    _check_size(grey, image, what)
    if _constant(grey)[0]:
        raise CommandError(f"{what} {str(image.path)!r} is constant (every pixel {float(grey.flat[0]):g}); "
                           "nothing to align")


def _constant_frames(grey: np.ndarray, stack: ImageData, without_data: Optional[np.ndarray] = None) -> np.ndarray:
    """``(N,)`` bool: the constant ("blank") frames of ``stack`` (``grey`` ``(N, H, W)``, what is
    registered of it), a dropped frame (all 0) or a white one, and those ``without_data``
    (:func:`_frames_without_data`): nothing to align them by, so :func:`_register_stack` passes them
    over (refused, they had stopped the whole stack, and leaving them out renumbered the frames
    after them).  Frame 0, the reference of every ``--reference`` (of ``mean``'s first pass), may
    not be one, and one frame that is not leaves nothing to register."""
    _check_size(grey, stack, "stack")
    constant = _constant(grey) if without_data is None else _constant(grey) | without_data
    # "stack 'x.tif' is constant ...: frame 0" read as if the whole stack were
    if constant[0]:
        raise CommandError(f"stack {str(stack.path)!r}: its first frame {stack.names[0]!r} is constant (every pixel "
                           f"{float(grey[0].flat[0]):g}); it is the reference the other frames are aligned to "
                           "(start the stack at a frame with an image)")
    if (~constant).sum() < 2:
        others = (f"its frame {stack.names[1]!r}" if stack.count == 2 else
                  f"every frame but its first ({stack.names[1]!r} ... {stack.names[-1]!r})")
        raise CommandError(f"stack {str(stack.path)!r}: {others} is constant; nothing to register")
    return constant


def _read_mask(path: Optional[str], size: tuple[int, int], what: str) -> Optional[np.ndarray]:
    """The mask image at ``path`` as ``(H, W)`` float32 ones and zeros: a pixel counts where its
    grey value (:func:`~tireg.io.luminance`) is nonzero and, in an image with alpha, its alpha too."""
    if path is None:
        return None
    mask = _single(read_image(path, what=what), what)
    _check_finite(mask, what)
    if mask.size != size:
        raise CommandError(
            f"{what} {str(mask.path)!r} is {mask.size[1]} x {mask.size[0]} pixels but must match the image's "
            f"{size[1]} x {size[0]}"
        )
    selected = luminance(mask.frames[0]) != 0
    if mask.format.alpha is not None:  # and opaque: a region drawn on a white, transparent canvas had
        selected &= mask.frames[0][..., -1] != 0  # selected the whole image, without a word
    if selected.sum() < 16:
        raise CommandError(f"{what} {str(mask.path)!r} selects {int(selected.sum())} pixels; at least 16 are needed")
    return selected.astype(np.float32)


def _format_parameters(names: Sequence[str], values: Sequence[float]) -> str:
    parts = []
    for name, value in zip(names, values):
        if name == "angle":
            parts.append(f"angle {math.degrees(value):.4f} deg")
        elif name in ("tx", "ty"):
            parts.append(f"{name} {value:.4f} px")
        else:
            parts.append(f"{name} {value:.6f}")
    return ", ".join(parts)


def _format_matrix(matrix: np.ndarray, first: str, rest: Optional[str] = None) -> list[str]:
    """The top two rows of a 3 x 3 matrix, aligned, each line prefixed (``first``, then ``rest``)."""
    rows = [[f"{v:.6f}" for v in row] for row in np.asarray(matrix)[:2]]
    width = max(len(v) for row in rows for v in row)
    prefixes = [first, first if rest is None else rest]
    return [prefix + "[" + "  ".join(v.rjust(width) for v in row) + "]" for prefix, row in zip(prefixes, rows)]


def _summary(result, metric: str, schedule: list[tuple[int, float]]) -> list[str]:
    """What ``tireg register`` prints: matrix, parameters in natural units, cost, iterations, time."""
    from .losses import LOSSES
    pair = result[0] if result.batched else result
    status = "converged" if bool(pair.converged[0]) else f"not converged ({pair.stop_reason[0]})"
    resolutions = ", ".join("full" if f == 1 else f"1/{f}" for f, _ in schedule)
    center = ", ".join(f"{c:g}" for c in pair.center)
    return [
        f"transform   {pair.transform}: fixed -> moving pixels (x = column, y = row)",
        *_format_matrix(pair.matrix.numpy(), "matrix      ", "            "),
        f"parameters  {_format_parameters(pair.parameter_names, pair.parameter_values[0].tolist())}"
        f"  (about the centre ({center}))",
        f"cost        {float(pair.cost[0]):.6g} ({metric}{', normalised intensities' if metric in LOSSES else ''})",
        f"iterations  {int(pair.iterations[0])} over {len(schedule)} level{'s' if len(schedule) != 1 else ''} "
        f"({resolutions}), {status}",
        f"time        {result.seconds:.2f} s",
    ]


def _history(result) -> list[tuple[int, np.ndarray]]:
    return [(level.factor, level.cost.numpy()) for level in result.history]


def _identity_before(moving_grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The moving image on the fixed grid without any transform (cropped or padded with zeros)."""
    before = np.zeros(size, dtype=np.float64)
    height, width = min(size[0], moving_grey.shape[0]), min(size[1], moving_grey.shape[1])
    before[:height, :width] = moving_grey[:height, :width]
    return before


def _warp_frames(frames: np.ndarray, matrices: np.ndarray, size: tuple[int, int], interpolation: str,
                 device: str = "cpu", batch: int = 32,
                 alpha: Optional[str] | Sequence[Optional[str]] = None,
                 nodata: Optional[float] = None, has_data: Optional[np.ndarray] = None) -> np.ndarray:
    """``(N, H, W, C)`` frames resampled by ``(N or 1, 3, 3)`` matrices onto ``size``: float64 ``(N, h, w, C)``,
    computed on ``device`` (``--device``: with ``cuda`` the outputs were warped on the host).

    ``alpha``: the frames' :attr:`ImageFormat.alpha <tireg.io.ImageFormat>`, one for all or one per
    frame (a folder stack may mix a PNG's straight alpha and a TIFF's associated one: each frame
    is warped by its own file's rule, not frame 0's for all).  Straight
    (``"unassociated"``) alpha, the last of 2 or 4 channels, is resampled premultiplied: colour
    times alpha, warped, divided by the warped alpha (0 where it is 0).  Each channel warped on its
    own mixed the colour of transparent pixels into the edges (a dark fringe round an opaque shape
    on transparent black).  Associated (premultiplied) alpha is warped as it is; nearest
    interpolation mixes nothing and is left alone (the colour under alpha 0 kept).

    ``nodata`` (``--nodata``, a GeoTIFF's ``GDAL_NODATA``): the value of output pixels without data,
    and ``has_data`` ``(N, H, W)`` (:func:`_has_data`; ``None``: every input pixel) where the frames
    have it.  The frames are resampled by normalised convolution, ``warp(I m) / warp(m)`` for the
    0/1 data mask ``m``, where ``warp(m) >= 1/2`` (at least half the interpolation's weight on
    data, GDAL's rule for its resampling kernels), and are ``nodata`` elsewhere and outside the
    frame: warped as they were, a -9999 border blended into its neighbours along its edge and the
    area beyond the moving image was 0, which is data."""
    import torch

    from .sampling import warp

    count = frames.shape[0]
    matrices = np.broadcast_to(matrices, (count, 3, 3))
    if torch.device(device).type == "mps":  # (no float64 there: the host's)
        device = "cpu"
    kinds = [alpha] * count if alpha is None or isinstance(alpha, str) else list(alpha)
    if len(kinds) != count:
        raise ValueError(f"_warp_frames(): {len(kinds)} alpha kinds for {count} frames")
    straight = np.array([kind == "unassociated" for kind in kinds], dtype=bool)
    if frames.shape[-1] not in (2, 4) or interpolation == "nearest":
        straight[:] = False
    if straight.any():  # the colour's range: bicubic ringing over an alpha near 0 gave quotients far beyond it
        low, high = float(frames[straight, ..., :-1].min()), float(frames[straight, ..., :-1].max())
    out = np.empty((count, *size, frames.shape[-1]), dtype=np.float64)
    covered = np.ones((count, *size), dtype=bool)
    for start in range(0, count, batch):
        chunk = np.moveaxis(frames[start:start + batch], -1, 1).astype(np.float64)
        premultiplied = straight[start:start + batch]  # (io.premultiply's colour x alpha, channels first)
        if premultiplied.any():
            chunk[premultiplied, :-1] *= chunk[premultiplied, -1:]
        if nodata is not None:  # the data mask beside the channels, and the channels 0 where it is 0
            inside = np.ones((chunk.shape[0], 1, *chunk.shape[2:])) if has_data is None else \
                has_data[start:start + batch, None].astype(np.float64)
            chunk = np.concatenate([np.where(inside != 0, chunk, 0.0), inside], axis=1)
        image = torch.from_numpy(np.ascontiguousarray(writable(chunk))).to(device)
        matrix = torch.from_numpy(np.array(matrices[start:start + batch], order="C")).to(device)  # a writable copy
        warped = np.moveaxis(warp(image, matrix, size=size, interpolation=interpolation,
                                  padding_mode="zeros").cpu().numpy(), 1, -1)
        if nodata is not None:
            coverage = warped[..., -1]
            has = covered[start:start + batch] = coverage >= 0.5 - 1e-9
            warped = warped[..., :-1] / np.where(has, coverage, 1.0)[..., None]
        out[start:start + batch] = warped
    if straight.any():  # colour / warped alpha (io.unpremultiply at full scale 1), clipped where covered
        part = unpremultiply(out[straight], np.float64)
        part[..., :-1] = np.where(part[..., -1:] > 0, np.clip(part[..., :-1], low, high), 0.0)
        out[straight] = part
    if nodata is not None:
        out[~covered] = nodata
    return out


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


# ----------------------------------------------------------------------------
# register


#: The robust losses whose outlier scale ``--loss-scale`` sets, and the name of their setting.
LOSS_SCALES = {"cauchy": "scale", "geman_mcclure": "scale", "huber": "delta"}


def _metric(args: argparse.Namespace):
    """``--metric`` for ``register()``: its name, or with ``--loss-scale`` the robust loss of that scale."""
    from .losses import LOSSES

    if getattr(args, "loss_scale", None) is None:
        return args.metric
    return LOSSES[args.metric](**{LOSS_SCALES[args.metric]: args.loss_scale})


def _check_loss_scale(args: argparse.Namespace) -> None:
    """:class:`UsageError` for ``--loss-scale`` with a metric that has no outlier scale, before any work."""
    if getattr(args, "loss_scale", None) is not None and args.metric not in LOSS_SCALES:
        raise UsageError(f"--loss-scale sets the outlier scale of --metric {', '.join(LOSS_SCALES)}; "
                         f"--metric {args.metric} has none")


def _check_optimizer(args: argparse.Namespace) -> None:
    """:class:`UsageError` for ``--optimizer gauss-newton`` with a metric it cannot serve, before any work.

    ``register()`` refused it too, in its Python words ("use optimizer='lbfgs' (the default for
    'mi') or 'adam'"), after the images were read; its rule, ``register._gauss_newton_serves``
    (the command always passes ``gradients="analytic"``).
    """
    from .metrics import get_metric
    from .register import _gauss_newton_serves

    if args.optimizer == "gauss-newton" and not _gauss_newton_serves(get_metric(args.metric)):
        raise UsageError(
            f"--optimizer gauss-newton needs a per-pixel loss (--metric l2, cauchy, ...) or --metric ncc or "
            f"ncc_any; for --metric {args.metric} use --optimizer lbfgs (what the default, --optimizer auto, "
            f"picks for it) or adam (see '{PROG} {args.command} --help')"
        )


def _register_images(args, fixed_grey, moving_grey, *, mask=None, moving_mask=None, progress=None, init=None):
    """``tireg.register`` on ``(H, W)`` or ``(B, 1, H, W)`` grey arrays with the command line's options
    (``init``: start matrices in place of ``--init``)."""
    from .register import register

    return register(
        fixed_grey,
        moving_grey,
        transform=args.transform,
        metric=_metric(args),
        optimizer=args.optimizer,
        gradients="analytic",
        pyramid=_pyramid(args),
        mask=mask,
        moving_mask=moving_mask,
        init=args.init if init is None else init,
        device=args.device,
        callback=progress,
        max_iterations=args.max_iterations,
        interpolation=args.interpolation,
        compile=args.compile,
    )


def _write_register_outputs(outputs: OutputFiles, paths: dict[str, Path], result, *, moving: ImageData,
                            fixed_grey: np.ndarray, moving_grey: np.ndarray, title: str, args,
                            grid: Optional[ImageFormat] = None, nodata: Optional[float] = None,
                            moving_data: Optional[np.ndarray] = None) -> None:
    """Warped image, transform files and pictures, all under temporary names until committed; the
    warped image stored as ``moving``'s, with the pixel size and georeference of ``grid`` (the fixed
    image's format), ``nodata`` where it has no data (``moving_data``: where ``moving`` has it)."""
    from . import viz

    size = result.fixed_size
    warped = _warp_frames(moving.frames, result.matrix.numpy()[None], size, args.interpolation, args.device,
                          alpha=moving.format.alpha, nodata=nodata, has_data=moving_data)
    warped_format = replace(moving.format if grid is None else on_grid_of(moving.format, grid), nodata=nodata)
    with outputs.writing(paths["warped"]) as temporary:
        write_frames(temporary, warped, warped_format)
    for name in ("json", "tfm"):
        with outputs.writing(paths[name]) as temporary:
            result.save(temporary)
    after = _warp_frames(moving_grey[None, :, :, None], result.matrix.numpy()[None], size, args.interpolation,
                         args.device)
    with outputs.writing(paths["picture"]) as temporary:
        viz.save_comparison(temporary, fixed_grey, _identity_before(moving_grey, size), after[0, :, :, 0], title=title)
    with outputs.writing(paths["plot"]) as temporary:
        viz.save_convergence(temporary, _history(result), title=f"{result.transform}, {args.metric}",
                             metric=f"cost ({args.metric})")


#: The suffix tireg writes a format with, where an input's own suffix names another format.
_FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "npy": ".npy"}


def _output_name(name: str, image_format: ImageFormat) -> str:
    """``name`` for an output written in ``image_format``: its suffix kept where it names that
    format, else the format's own (a 16-bit PNG named ``.jpg`` is written back as ``.png``: as
    ``.jpg`` the write failed after the work, naming a temporary file)."""
    path = Path(name)
    if SUFFIXES.get(path.suffix.lower()) == image_format.kind:
        return name
    return path.stem + _FORMAT_SUFFIX[image_format.kind]


#: The centimetres of a TIFF ResolutionUnit (2 inch, 3 centimetre); 1 (none) has no length.
_UNIT_CM = {2: 2.54, 3: 1.0}

#: The pixel-size ratios (x, y) that a transform kind can take up: translation and rigid none,
#: similarity one scale, the others any two.
_TAKES_SCALE = {"translation": "none", "rigid": "none", "similarity": "isotropic"}


def _pixel_size(image_format: ImageFormat) -> Optional[tuple[float, float, str]]:
    """``(x, y, unit)``: the size of a pixel as a TIFF's resolution says, in cm where its unit is a
    length, else in the ImageJ unit (or none) as read; ``None`` without a resolution."""
    if image_format.resolution is None:
        return None
    x, y, unit = image_format.resolution
    if unit in _UNIT_CM:
        return _UNIT_CM[unit] / x, _UNIT_CM[unit] / y, "cm"
    return 1 / x, 1 / y, str(dict(image_format.imagej).get("unit", ""))


def _warn_pixel_sizes(fixed: ImageData, moving: ImageData, transform: str) -> None:
    """A warning where FIXED and MOVING have pixels of different sizes (their TIFF resolutions) that
    ``transform`` cannot take up: tireg registers in pixels, so a rigid transform of a 1 mm slice to
    a 0.5 mm one came out 151 degrees off, "converged" (a medical-imaging audit)."""
    sizes = _pixel_size(fixed.format), _pixel_size(moving.format)
    if None in sizes or sizes[0][2] != sizes[1][2]:
        return
    ratio = sizes[0][0] / sizes[1][0], sizes[0][1] / sizes[1][1]  # moving pixels per fixed pixel
    takes = _TAKES_SCALE.get(transform, "any")
    same = math.isclose(ratio[0], ratio[1], rel_tol=1e-2)
    if takes == "any" or (same and (takes == "isotropic" or math.isclose(ratio[0], 1, rel_tol=1e-2))):
        return
    unit = f" {sizes[0][2]}" if sizes[0][2] else ""
    kinds = "-t anisotropic_similarity or affine" if not same else "-t similarity (or anisotropic_similarity, affine)"
    warnings.warn(
        f"the fixed image's pixels are {sizes[0][0]:.4g} x {sizes[0][1]:.4g}{unit} and the moving image's "
        f"{sizes[1][0]:.4g} x {sizes[1][1]:.4g}{unit} (their TIFF resolutions): tireg registers in pixels, where "
        f"a {transform} transform cannot scale by {ratio[0]:.4g} x {ratio[1]:.4g}; resample MOVING to the fixed "
        f"pixel size first, or register with {kinds}", UserWarning)


def _register_paths(folder: Path, moving_suffix: str) -> dict[str, Path]:
    return {
        "warped": folder / f"warped{moving_suffix}",
        "json": folder / "transform.json",
        "tfm": folder / "transform.tfm",
        "picture": folder / "before_after.png",
        "plot": folder / "convergence.png",
    }


def _plain(name: str) -> str:
    """A file name as plain text for a picture's title: matplotlib reads ``$...$`` as mathematics
    (``m$_$.png`` raised a parse error after the work), and a name that is not UTF-8 (its bytes
    kept as surrogates) cannot be drawn."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("$", r"\$")


def _cmd_register(args: argparse.Namespace, outputs: OutputFiles) -> int:
    require("matplotlib", "drawing pictures")  # before the work, not after it
    folder = Path(args.output)
    if folder.suffix.lower() in SUFFIXES and not folder.is_dir():  # an image's name for an output folder
        raise UsageError(f"-o {str(folder)!r}: 'tireg register' writes a folder of outputs (the warped image, "
                         f"the transform, pictures); give a folder name such as {str(folder.with_suffix(''))!r}")
    fixed = _single(read_image(args.fixed, what="fixed image"), "fixed image")
    moving = _single(read_image(args.moving, what="moving image"), "moving image")
    # an alpha channel does not enter the luminance registered on (grey + alpha: the grey channel;
    # RGBA: the RGB luma), so RGB against RGBA and grey against grey + alpha are the same images to
    # register; the warped output keeps MOVING's own channels (they were refused, with the advice to
    # give "both in colour or both in grey", which they were)
    if args.channel is None and fixed.channels != moving.channels and {fixed.channels, moving.channels} not in (
            {1, 2}, {3, 4}):
        raise CommandError(
            f"fixed image {str(fixed.path)!r} has {fixed.channels} channel(s) but moving image "
            f"{str(moving.path)!r} has {moving.channels}; give both in colour or both in grey, or register on "
            "one channel of each (--channel K)"
        )
    _warn_pixel_sizes(fixed, moving, args.transform)
    fixed_nodata, moving_nodata = _nodata(args, fixed, "fixed image"), _nodata(args, moving, "moving image")
    _check_finite(fixed, "fixed image", fixed_nodata)
    _check_finite(moving, "moving image", moving_nodata)
    fixed_data = _has_data(fixed, fixed_nodata, args.channel)
    moving_data = _has_data(moving, moving_nodata, args.channel)
    fixed_grey = _filled(_registered_grey(fixed, args.channel, "fixed image", fixed.frames[0]),
                         None if fixed_data is None else fixed_data[0])
    moving_grey = _filled(_registered_grey(moving, args.channel, "moving image", moving.frames[0]),
                          None if moving_data is None else moving_data[0])
    _check_grey(fixed_grey[None], fixed, "fixed image")
    _check_grey(moving_grey[None], moving, "moving image")
    mask = _data_mask(_read_mask(args.mask, fixed.size, "mask"), None if fixed_data is None else fixed_data[0],
                      fixed, "fixed image", fixed_nodata)
    moving_mask = _data_mask(_read_mask(args.moving_mask, moving.size, "moving mask"),
                             None if moving_data is None else moving_data[0], moving, "moving image", moving_nodata)

    paths = _register_paths(folder, Path(_output_name(moving.path.name.lower(), moving.format)).suffix)
    outputs.check(*paths.values())
    check_writable(paths["warped"], (1, moving.channels), moving.format)  # before the work, not after it
    schedule = _schedule(args, (min(fixed.size[0], moving.size[0]), min(fixed.size[1], moving.size[1])),
                         "image" if fixed.size == moving.size else "pixels both images span")

    progress = _Progress(args, len(schedule))
    try:
        # float64 as luminance() made it: register() normalises it in float64 before its float32 cast
        # (cast here first, 1e8 + detail lost the detail and was 'constant'; 1e300 overflowed)
        result = _register_images(args, fixed_grey, moving_grey, mask=mask, moving_mask=moving_mask,
                                  progress=progress)
    finally:
        progress.close()
    if result.stop_reason[0] == "no_overlap":  # an infinite cost, and nothing a transform file could say
        raise CommandError(
            "the images do not overlap at the found transform (too few pixels inside both images"
            + (" and their masks" if args.mask or args.moving_mask else "") + "); there is nothing to compare"
        )
    title = f"{_plain(fixed.path.name)} (fixed) and {_plain(moving.path.name)} (moving): {result.transform}"
    _write_register_outputs(outputs, paths, result, moving=moving, fixed_grey=fixed_grey,
                            moving_grey=moving_grey, title=title, args=args, grid=fixed.format,
                            nodata=moving_nodata,  # every channel warped: no data where any of them has none
                            moving_data=moving_data if args.channel is None else _has_data(moving, moving_nodata, None))
    written = outputs.commit()
    for line in _summary(result, args.metric, schedule):
        _say(args, line)
    _say(args, f"registered  on {_registered_on(moving.channels, args.channel)} (--channel K: another)")
    _say(args, f"wrote       {_names(written)}")
    return 0


# ----------------------------------------------------------------------------
# apply


#: ``tireg apply``'s interpolations.
APPLY_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _apply_interpolation(args: argparse.Namespace, transform) -> tuple[str, str]:
    """``(interpolation, why)``: ``--interpolation`` where given, else the one the transform file
    records (``metadata.interpolation``, written by ``RegistrationResult.save``; a stack CSV's
    ``interpolation`` column), else bilinear.

    Bilinear whatever the registration had used made ``tireg apply`` differ from the warped image
    of ``tireg register --interpolation bicubic`` (by 25 grey levels).
    """
    if args.interpolation is not None:
        return args.interpolation, ""
    recorded = transform.metadata.get("interpolation")
    if isinstance(recorded, str) and recorded in APPLY_INTERPOLATIONS:
        return recorded, f" (as {Path(args.transform).name} records)"
    if recorded is not None:  # an edited or foreign file's value had been passed over without a word
        warnings.warn(f"{Path(args.transform).name} records the interpolation {recorded!r}, which apply does not "
                      f"know; bilinear is used (--interpolation picks one of {', '.join(APPLY_INTERPOLATIONS)})",
                      stacklevel=2)
    return "bilinear", ""


#: The matrix columns of ``tireg stack``'s CSV.
_MATRIX_COLUMNS = ("m00", "m01", "m02", "m10", "m11", "m12")


def _load_stack_csv(path: str):
    """The per-frame matrices of a ``tireg stack`` CSV as a :class:`~tireg.transform_io.TransformFile`."""
    import torch

    from .transform_io import TransformFile

    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise CommandError(f"no such file: {path!r} (transform)") from None
    except (OSError, csv.Error, UnicodeError) as error:
        raise CommandError(f"cannot read transform {path!r} as a tireg stack CSV: {error}") from None
    # before m00 .. m12 the matrix columns were a00 .. a12 (DictReader keeps the last of a repeated
    # name: the matrix's, after the affine kind's parameters of the same names)
    columns = next((names for names in (_MATRIX_COLUMNS, tuple("a" + name[1:] for name in _MATRIX_COLUMNS))
                    if rows and all(column in rows[0] for column in names)), None)
    if columns is None:
        raise CommandError(f"transform {path!r} is not a CSV written by 'tireg stack' (it needs one row per frame "
                           f"with the columns {', '.join(_MATRIX_COLUMNS)})")
    matrices = np.tile(np.eye(3), (len(rows), 1, 1))
    frames = _stack_csv_frames(path, rows)
    for k, row in enumerate(rows):
        try:
            values = [float(row[column]) for column in columns]
        except (TypeError, ValueError):
            raise CommandError(f"transform {path!r}: row {k + 1} holds a matrix entry that is not a number") from None
        if not all(math.isfinite(value) for value in values):
            raise CommandError(f"transform {path!r}: row {k + 1} holds a matrix entry that is NaN or infinite")
        matrices[frames[k], :2] = np.reshape(values, (2, 3))
    # the interpolation the stack was resampled with (apply's default), where every row names the same
    recorded = {row.get("interpolation") for row in rows}
    metadata = {"interpolation": recorded.pop()} if len(recorded) == 1 and None not in recorded else {}
    return TransformFile(matrix=torch.from_numpy(matrices), metadata=metadata)


def _stack_csv_frames(path: str, rows: list[dict]) -> list[int]:
    """Each row's frame: its ``frame`` column, which must number the rows' frames 0 .. n - 1 once
    each, in any order (rows sorted or edited by hand were applied by position, each matrix to
    another page, without a word); the row's position where there is no such column."""
    if "frame" not in rows[0]:
        return list(range(len(rows)))
    frames = []
    for k, row in enumerate(rows):
        text = (row.get("frame") or "").strip()
        if not (text.isascii() and text.isdigit() and int(text) < len(rows)):
            raise CommandError(f"transform {path!r}: row {k + 1} has frame {text!r}; the frames of its {len(rows)} "
                               f"rows must be the numbers 0 to {len(rows) - 1}")
        if int(text) in frames:
            raise CommandError(f"transform {path!r}: frame {int(text)} is in rows {frames.index(int(text)) + 1} "
                               f"and {k + 1}; each frame must have one row")
        frames.append(int(text))
    return frames


def _cmd_apply(args: argparse.Namespace, outputs: OutputFiles) -> int:
    from .transform_io import BINARY_SUFFIXES, ITK_SUFFIXES, JSON_SUFFIXES, load_transform

    _output_suffix(Path(args.output))  # a wrong command line, said before any file is read
    suffix = Path(args.transform).suffix.lower()
    known = (*JSON_SUFFIXES, *ITK_SUFFIXES, *BINARY_SUFFIXES, ".csv")  # load_transform names the binary ones
    if suffix not in known and not Path(args.transform).is_dir():
        # load_transform's own message listed its suffixes only, without the stack's .csv, and did
        # not say which argument was wrong (TRANSFORM and IMAGE swapped: an image first)
        swapped = suffix in SUFFIXES  # a wrong command line (exit status 2), not a file it cannot use
        raise (UsageError if swapped else CommandError)(
            f"transform {args.transform!r}: unsupported suffix {suffix or '(none)'!r}; apply reads a transform file "
            f"({', '.join((*JSON_SUFFIXES, *ITK_SUFFIXES))}) or a stack's per-frame .csv"
            + (" - it looks like an image: the transform comes first, tireg apply TRANSFORM IMAGE -o OUTPUT"
               if swapped else ""))
    if suffix == ".csv":  # a stack's per-frame matrices
        transform = _load_stack_csv(args.transform)
    else:
        transform = load_transform(args.transform)
    image = read_image(args.image, what="image")
    nodata = _nodata(args, image, "image")
    _check_finite(image, "image", nodata)
    matrices = transform.matrix.reshape(-1, 3, 3).numpy()
    with np.errstate(all="ignore"):  # entries near 1e308 overflow the determinant: refused below
        determinants = np.linalg.det(matrices[:, :2, :2])
    if not np.isfinite(determinants).all() or not np.isfinite(matrices).all():
        raise CommandError(f"transform {args.transform!r} has entries too large to apply (its determinant "
                           "overflows)")
    if not (np.abs(determinants) > 1e-12).all():  # every output pixel would sample one line or point
        raise CommandError(f"transform {args.transform!r} is singular or nearly so (its 2 x 2 part has "
                           f"determinant {float(np.abs(determinants).min()):.3g}); it maps the image onto a line")
    if matrices.shape[0] not in (1, image.count):
        raise CommandError(
            f"transform {args.transform!r} holds {matrices.shape[0]} matrices but image {args.image!r} has "
            f"{image.count} frame(s); give one matrix, or one per frame"
        )
    grid = None  # the format of --reference, the image whose pixels the output lies on
    if args.reference is not None:
        reference = _single(read_image(args.reference, what="reference image"), "reference image")
        size, grid = reference.size, reference.format
    elif args.size is not None:
        size = args.size
    elif transform.metadata.get("fixed_size") is not None:
        stored = transform.metadata["fixed_size"]
        try:
            size = check_size(stored, "apply")
        except ValueError:
            raise CommandError(f"transform {args.transform!r}: \"metadata.fixed_size\" must be two positive integers "
                               f"[height, width]; got {stored!r} (or give --size or --reference)") from None
        if _too_many_pixels(size):  # numpy's "array is too big" named neither the file nor the field
            raise CommandError(f"transform {args.transform!r}: \"metadata.fixed_size\" {stored!r}: "
                               f"{_too_many_pixels(size)} (give --size or --reference)")
    else:
        size = image.size
    output = Path(args.output)
    _output_suffix(output)
    kind = check_writable(output, (image.count, image.channels), image.format)
    outputs.check(output)
    # its dtype, channel axis, photometric and alpha; the pixel size and georeference of the grid it
    # lies on (--reference's), and none without one (IMAGE's own were moved by the transform)
    out_format = replace(image.format if grid is None else on_grid_of(image.format, grid), kind=kind, nodata=nodata,
                         georeference=() if grid is None else grid.georeference)
    interpolation, why = _apply_interpolation(args, transform)
    warped = _warp_frames(image.frames, matrices, size, interpolation, alpha=image.format.alpha, nodata=nodata,
                          has_data=_has_data(image, nodata, None))
    with outputs.writing(output) as temporary:
        write_frames(temporary, warped, out_format)
    written = outputs.commit()
    # sizes as width x height, as describe() gives them (--size takes height x width: said so)
    _say(args, f"resampled {image.path.name} ({image.describe()}) onto {size[1]} x {size[0]} pixels "
               f"(width x height) with {Path(args.transform).name}, {interpolation} interpolation{why}")
    if matrices.shape[0] > 1:
        _say(args, f"  {matrices.shape[0]} matrices, one per frame; the first:")
    for line in _format_matrix(matrices[0], "  "):
        _say(args, line)
    _say(args, f"wrote {_names(written)}")
    return 0


# ----------------------------------------------------------------------------
# stack


def _data_counts(has_data: Optional[np.ndarray], stack: ImageData, nodata: Optional[float]) -> Optional[np.ndarray]:
    """``(N,)``: how many pixels of each frame of ``stack`` have data (``has_data``, :func:`_has_data`;
    ``None``: all of them).  A frame with fewer than 16 is passed over as a blank one
    (:func:`_constant_frames`; a scene wholly outside a swath had stopped the whole stack), but frame
    0 is the reference: refused."""
    if has_data is None:
        return None
    counts = has_data.reshape(has_data.shape[0], -1).sum(axis=1)
    if counts[0] < 16:
        raise CommandError(f"stack {str(stack.path)!r}: its first frame {stack.names[0]!r} has {int(counts[0])} "
                           f"pixels with data (the rest are the no-data value {nodata:g}); it is the reference the "
                           "other frames are aligned to, and at least 16 are needed")
    return counts


def _output_suffix(path: Path) -> str:
    """The format kind of an output's suffix; :class:`UsageError` (a wrong command line) for a suffix
    tireg does not write."""
    try:
        return format_for_path(path, what="output")
    except ImageError as error:
        raise UsageError(f"-o {str(path)!r}: {error}") from None


def _stack_output(path: Path) -> str:
    """``"tiff"``, ``"npy"`` or ``"folder"``."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return "tiff"
    if suffix == ".npy":
        return "npy"
    if suffix == "" or path.is_dir():
        return "folder"
    raise UsageError(f"stack output {str(path)!r}: use a .tif/.tiff or .npy file, or a folder (no suffix)")


def _register_stack(args, grey: np.ndarray, masks: "_StackMasks", progress: _Progress, blank: np.ndarray
                    ) -> dict[str, Any]:
    """Batched registration of every frame to the reference; matrices map reference -> frame pixels.

    ``blank`` ``(N,)``: the constant frames (:func:`_constant_frames`), not registered and marked
    (:func:`_give_blank_frames`).  A frame that fits its reference poorly (:func:`_fit_threshold`)
    is marked unreliable as one that did not converge."""
    count = grey.shape[0]
    frames = grey[:, None]  # (N, 1, H, W) float64: normalised in float64 by register() (see _cmd_register)
    if args.reference == "mean":
        return _register_to_mean(args, grey, masks, progress, blank)
    if args.reference == "first":
        fixed_all, moving_index = frames[:1], [k for k in range(1, count) if not blank[k]]
    else:  # previous: no link from a blank frame; the chain bridges the frame after it
        fixed_all, moving_index = frames[:-1], [k for k in range(1, count) if not blank[k] and not blank[k - 1]]
    references = [0] if args.reference == "first" else list(range(count - 1))
    found = _register_frames(args, fixed_all, frames, moving_index, masks.reference_for(references),
                             masks.frames(), progress)
    _judge_fits(found, moving_index)
    if args.reference == "previous":
        _chain(args, frames, found, masks, progress, blank)
    _give_blank_frames(found, blank)
    return found


def _chain(args, frames: np.ndarray, found: dict[str, Any], masks: "_StackMasks", progress: _Progress,
           blank: np.ndarray) -> None:
    """``--reference previous``: the links ``A_k`` (frame ``k-1`` -> frame ``k`` pixels) in ``found``
    made frame 0 -> frame ``k`` matrices, ``A_k A_(k-1) ... A_1``, in place.

    A link that did not converge (a dark or blank frame, a cut) leaves its frame unreliable, and
    the frame after it is registered again to the last reliable frame directly (a bridge, from
    the automatic start), its chain continuing from there: chained through a dark frame, every
    later frame of a clip had come out about 95 px off, "converged" (a video audit).  The
    unreliable frames keep their own links and stop reasons; ``found["bridges"]`` lists
    ``(frame, reference frame)``.

    A link unreliable by its fit (a cut: 'converged' at -109 deg, every later frame written turned)
    is one that did not converge; a bridge is held to the links' fit threshold
    (``found["fit_threshold"]``).  A blank frame is passed over (``blank``)."""
    pairs, count = found["matrices"], frames.shape[0]
    matrices, bridges = np.tile(np.eye(3), (count, 1, 1)), []
    last_reliable = 0
    for k in range(1, count):
        if blank[k]:  # not registered: it takes the last reliable frame's matrix (_give_blank_frames)
            continue
        if last_reliable == k - 1:
            matrices[k] = pairs[k] @ matrices[k - 1]
        else:  # frame k-1 is unreliable: frame k to the last reliable frame
            bridge = _register_frames(args, frames[last_reliable][None], frames, [k],
                                      masks.reference_for([last_reliable]), masks.frames(), progress, advance=False)
            _flag_poor_fits(bridge, found["fit_threshold"], [k])
            matrices[k] = bridge["matrices"][k] @ matrices[last_reliable]
            link_iterations = int(found["iterations"][k])  # spent too
            for key in ("costs", "fits", "iterations", "converged", "reasons"):
                found[key][k] = bridge[key][k]
            found["iterations"][k] += link_iterations
            found["results"] += bridge["results"]
            found["seconds"] += bridge["seconds"]
            bridges.append((k, last_reliable))
        if found["converged"][k]:
            last_reliable = k
    found["matrices"], found["bridges"] = matrices, bridges


@dataclass(frozen=True)
class _StackMasks:
    """``tireg stack``'s masks, float32 0/1 or ``None``.

    ``region`` (``--mask``, ``(H, W)``): where the reference counts (a region of interest, or the
    reference's own no-data).  ``frame`` (``--frame-mask``, ``(H, W)``): where every frame has data
    (a label burnt into each frame, a dead region of the sensor), as the moving image and as the
    reference.  ``data`` (``(N, H, W)``, :func:`_has_data`): where each frame has data, its pixels
    other than ``--nodata`` (a scene's own no-data border).
    """

    region: Optional[np.ndarray]
    frame: Optional[np.ndarray]
    data: Optional[np.ndarray] = None

    def frames(self) -> Optional[np.ndarray]:
        """Where each frame counts (``frame`` and ``data``): ``(H, W)`` for all, ``(N, H, W)``, or ``None``."""
        return _both(self.frame, self.data)

    def reference_for(self, index: Sequence[int]) -> Optional[np.ndarray]:
        """Where frames ``index`` count as references (``region`` too): ``(H, W)`` or ``(len(index), H, W)``."""
        frames = self.frames()
        return _both(self.region, frames if frames is None or frames.ndim == 2 else frames[list(index)])


def _both(first: Optional[np.ndarray], second: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The pixels inside both masks (``None``: no mask, every pixel; ``(H, W)`` and ``(N, H, W)`` broadcast)."""
    if first is None or second is None:
        return second if first is None else first
    return first * second


def _register_frames(args, fixed_all: np.ndarray, frames: np.ndarray, moving_index: list[int],
                     reference_mask: Optional[np.ndarray], frame_mask: Optional[np.ndarray],
                     progress: _Progress, init: Optional[np.ndarray] = None, advance: bool = True
                     ) -> dict[str, Any]:
    """Frames ``moving_index`` registered in batches to ``fixed_all`` (one reference, or frame ``k``'s
    at ``k - 1``), from ``init[k]`` where given; the other frames keep the identity ("reference").
    ``advance``: count the frames on the progress bar (not a bridge's: :func:`_chain`).

    ``reference_mask``: where the reference counts, ``(H, W)`` for every one or ``(R, H, W)`` a
    mask per ``fixed_all`` frame; ``frame_mask``: where each moving frame counts, ``(H, W)`` or
    ``(N, H, W)`` a mask per frame (:class:`_StackMasks`)."""
    import torch

    from .transforms import image_center

    count = frames.shape[0]
    costs, iterations = np.zeros(count), np.zeros(count, dtype=np.int64)
    converged, reasons = np.ones(count, dtype=bool), ["reference"] * count
    pairs, fits = np.eye(3)[None].repeat(count, axis=0), np.full(count, np.nan)
    histories = []
    for start in range(0, len(moving_index), args.batch_size):
        index = moving_index[start:start + args.batch_size]
        references = [0] if fixed_all.shape[0] == 1 else [k - 1 for k in index]
        fixed = fixed_all[references]
        start_matrices = None if init is None else torch.from_numpy(np.ascontiguousarray(writable(init[index])))
        fixed_mask, moving_mask = _pick_masks(reference_mask, references), _pick_masks(frame_mask, index)
        result = _register_images(args, fixed, frames[index], mask=fixed_mask, moving_mask=moving_mask,
                                  progress=progress, init=start_matrices)
        pairs[index] = result.matrix.numpy().reshape(-1, 3, 3)
        costs[index] = result.cost.numpy()
        iterations[index] = result.iterations.numpy()
        converged[index] = result.converged.numpy()
        for k, reason in zip(index, result.stop_reason):
            reasons[k] = reason
        fits[index] = _fits(args, fixed, frames[index], pairs[index], fixed_mask, moving_mask)
        histories.append(result)
        if advance:
            progress.advance(len(index))
    return dict(matrices=pairs, costs=costs, iterations=iterations, converged=converged, reasons=reasons,
                fits=fits, results=histories, seconds=sum(r.seconds for r in histories),
                center=histories[0].center if histories else image_center(*frames.shape[-2:]))


#: Metrics that align images whatever the sign of their contrast: a frame's fit is the size of its
#: overlap NCC (:func:`_fits`), as an inverted-contrast frame registered by MI correlates at -0.9.
_SIGN_FREE_METRICS = ("mi", "nmi", "ncc_any", "lncc_any")


def _fits(args, fixed: np.ndarray, moving: np.ndarray, matrices: np.ndarray, fixed_mask: Optional[np.ndarray],
          moving_mask: Optional[np.ndarray]) -> np.ndarray:
    """How well each registered frame fits its reference, ``(B,)``: the normalised cross-correlation
    of ``fixed`` ``(1 or B, 1, H, W)`` and ``moving`` ``(B, 1, H, W)`` resampled by ``matrices``
    ``(B, 3, 3)`` over their overlap inside the masks the registration had (:func:`_pick_masks`'
    ``(H, W)`` or ``(B, 1, H, W)``, or ``None``): :func:`~tireg.initialize.overlap_ncc`'s score, -1
    where they hardly overlap; its size for a metric blind to the contrast's sign
    (:data:`_SIGN_FREE_METRICS`).

    Not the registration's own cost: a frame of another scene (a cut) had 'converged' on its metric,
    at -109 deg, and only its fit to the reference, beside the other frames' fits, tells
    (:func:`_fit_threshold`).  Without the masks, a burnt-in label or a no-data border that moves
    with the frame had pulled the fits down to -0.19 (a label of 65535) and 0.64 of the typical."""
    import torch

    from .initialize import MIN_OVERLAP, _ncc_scores

    count, size = moving.shape[0], moving.shape[-2:]

    def with_mask(images: np.ndarray, mask: Optional[np.ndarray]) -> torch.Tensor:
        # overlap_ncc's score, with the masks as its last channel (its scoring's own rule: the
        # overlap is inside both, the moving mask warped)
        images = np.broadcast_to(images, (count, 1, *size))
        mask = np.ones((count, 1, *size)) if mask is None else np.broadcast_to(mask, (count, 1, *size))
        stacked = np.concatenate([images, mask.astype(images.dtype)], axis=1)
        return torch.from_numpy(stacked).to(args.device)

    with torch.no_grad():
        scores = _ncc_scores(with_mask(fixed, fixed_mask), with_mask(moving, moving_mask),
                             torch.from_numpy(np.ascontiguousarray(matrices))[:, None].to(args.device),
                             MIN_OVERLAP, images=1)[:, 0].cpu().numpy().astype(np.float64)
    return np.abs(scores) if args.metric in _SIGN_FREE_METRICS else scores


#: :func:`_fit_threshold`: a frame fits poorly when its fit is more than ``POOR_FIT_SPREADS`` spreads
#: below the stack's typical fit and below ``POOR_FIT_FRACTION`` of it.  Measured on 40-frame drifting
#: stacks (docs/cli.md): clean frames fit 0.99 (noise-free) and 0.95 (noise 0.05), each within 0.01
#: of the typical fit; frames of another scene fit 0.22, a fade to 2 % contrast 0.2-0.6, a frame
#: saturated 3x 0.67.  The fraction alone would flag a real stack's noisier frames; the spreads alone
#: a synthetic stack's frames 0.01 below the rest.
POOR_FIT_SPREADS, POOR_FIT_FRACTION = 6.0, 0.8


def _fit_threshold(fits: np.ndarray) -> tuple[float, float]:
    """The typical fit (:func:`_fits`) of a stack whose registered frames fit as ``fits`` did, and
    the fit below which a frame fits poorly (``-inf``: none does).

    The typical fit is the median of the better half of ``fits`` (their 75th percentile), and its
    spread the better half's median absolute deviation from it, times 2.5 (a normal
    distribution's standard deviation): the stack's median had been that of the frames after a
    cut where they are half of a ``first`` stack, and lets the frames after a cut pass.  No
    threshold where the typical fit is 0 or less (frames that do not correlate with their
    reference even where registered well: another modality)."""
    fits = fits[np.isfinite(fits)]
    if fits.size == 0:
        return math.nan, -math.inf
    better = fits[fits >= np.median(fits)]
    typical = float(np.median(better))
    if typical <= 0:
        return typical, -math.inf
    spread = 2.5 * float(np.median(np.abs(better - typical)))
    return typical, min(typical - POOR_FIT_SPREADS * spread, POOR_FIT_FRACTION * typical)


def _judge_fits(found: dict[str, Any], index: Sequence[int]) -> None:
    """Frames ``index`` of ``found`` (:func:`_register_frames`) judged by their fits, in place: the
    stack's typical fit and threshold (:func:`_fit_threshold`, over the frames that converged) in
    ``found["typical_fit"]`` and ``found["fit_threshold"]``, and the frames below it marked
    (:func:`_flag_poor_fits`)."""
    found["typical_fit"], found["fit_threshold"] = _fit_threshold(
        found["fits"][[k for k in index if found["converged"][k]]])
    _flag_poor_fits(found, found["fit_threshold"], index)


def _flag_poor_fits(found: dict[str, Any], threshold: float, index: Sequence[int]) -> None:
    """Frames ``index`` of ``found`` (:func:`_register_frames`) whose fit is below ``threshold``
    marked unreliable, in place: not converged, stop reason ``poor_fit``."""
    for k in index:
        if found["converged"][k] and found["fits"][k] < threshold:
            found["converged"][k], found["reasons"][k] = False, "poor_fit"


def _give_blank_frames(found: dict[str, Any], blank: np.ndarray) -> None:
    """The blank frames (``blank`` ``(N,)``) of ``found`` (:func:`_register_frames`) marked, in place:
    not converged, stop reason ``blank``, no cost or fit, each with the matrix of the last reliable
    frame before it (the identity where there is none): ``tireg apply`` of the CSV to another
    channel keeps those frames where their neighbours are (a dropped frame had stopped the whole
    stack).  ``found["blank"]`` lists ``(frame, the frame whose matrix it took or None)``."""
    given, last_reliable = [], None
    for k in range(len(blank)):
        if blank[k]:
            found["matrices"][k] = np.eye(3) if last_reliable is None else found["matrices"][last_reliable]
            found["converged"][k], found["reasons"][k] = False, "blank"
            found["costs"][k] = found["fits"][k] = math.nan
            given.append((k, last_reliable))
        elif found["converged"][k]:
            last_reliable = k
    found["blank"] = given


def _pick_masks(masks: Optional[np.ndarray], index: list[int]) -> Optional[np.ndarray]:
    """A mask for the pairs of frames ``index``: ``(H, W)`` as it is, one of ``(N, H, W)`` as
    ``(H, W)``, several as ``(len(index), 1, H, W)``."""
    if masks is None or masks.ndim == 2:
        return masks
    if masks.shape[0] == 1:
        return masks[0]
    return masks[index][:, None]


def _register_to_mean(args, grey: np.ndarray, masks: _StackMasks, progress: _Progress, blank: np.ndarray
                      ) -> dict[str, Any]:
    """``--reference mean`` in two passes: the frames aligned to frame 0 by a chained first pass
    (as ``previous``), their mean on frame 0's grid (each pixel over the frames that cover it), then
    every frame registered to that mean from its first-pass matrix.

    One pass against the mean of the *unaligned* frames failed under drift: each frame left a faint
    copy of itself in that mean, settled on it and stayed near the identity, 'converged' (frames
    2 px apart came out 0.15 px apart).

    With ``--frame-mask``, a pixel of the mean is the mean of the frames' pixels inside it (their
    no-data values left out), and the mean counts where those cover half a frame's worth or more;
    ``--mask`` is where the mean counts, on frame 0's grid.

    The frames unreliable in the first pass (not converged, a poor fit, blank) stay out of the mean;
    in the second, a frame that fits the mean poorly (beside the other frames' fits to it,
    :func:`_fit_threshold`) is unreliable, and a blank frame is not registered.
    """
    count, height, width = grey.shape
    chained = _register_stack(argparse.Namespace(**{**vars(args), "reference": "previous"}), grey, masks, progress,
                              blank)
    first = chained["matrices"]  # frame 0 -> frame k
    frame_masks = masks.frames()
    inside = np.ones((count, height, width)) if frame_masks is None else \
        np.broadcast_to(frame_masks, (count, height, width)).astype(np.float64)
    counted = grey if frame_masks is None else np.where(inside != 0, grey, 0.0)
    # a frame whose chain did not converge (a dark frame) stays out of the mean: at its wrong place it
    # had blurred the mean, and every frame had come out 0.5 px off instead of 0.01
    reliable = np.flatnonzero(chained["converged"])  # frame 0 (the reference) among them
    values = _warp_frames(counted[reliable, ..., None], first[reliable], (height, width), "bilinear",
                          args.device)[..., 0]
    cover = _warp_frames(inside[reliable, ..., None], first[reliable], (height, width), "bilinear",
                         args.device)[..., 0]
    covered = cover.sum(axis=0)
    template = np.where(covered > 0.5, values.sum(axis=0) / np.maximum(covered, 1e-12), 0.0)
    covering = None if frame_masks is None else (covered > 0.5).astype(np.float32)
    moving_index = [k for k in range(count) if not blank[k]]
    found = _register_frames(args, template[None, None], grey[:, None], moving_index,
                             _both(masks.region, covering), frame_masks, progress, init=first)
    _judge_fits(found, moving_index)
    if found["converged"][0]:
        # on frame 0's grid: the mean lies where the chained pass put it, off frame 0 by that pass's
        # error (500 frames: every frame 0.24 px off, while they agreed with one another to 0.014);
        # frame 0's own matrix to the mean takes it back
        found["matrices"] = found["matrices"] @ np.linalg.inv(found["matrices"][0])
        found["matrices"][0] = np.eye(3)  # (not 1e-21 off it)
    _give_blank_frames(found, blank)
    found["iterations"] = found["iterations"] + chained["iterations"]
    found["bridges"] = chained.get("bridges", [])
    found["results"] = chained["results"] + found["results"]
    found["seconds"] += chained["seconds"]
    return found


def _write_stack_csv(path: Path, stack: ImageData, found: dict[str, Any], kind_name: str, interpolation: str) -> None:
    import torch

    from .transforms import get_transform

    kind = get_transform(kind_name)
    center = torch.tensor(found["center"], dtype=torch.float64)
    values = kind.from_matrix(torch.from_numpy(found["matrices"]), center).numpy()
    names = ["angle_deg" if n == "angle" else n for n in kind.parameter_names]
    # a file name that is not UTF-8 (its bytes kept as surrogates by Python) is written back as its bytes
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        # the matrix as m00 .. m12: the affine kind's own parameters are named a00 .. a11 (two columns
        # of one name broke readers that index by name)
        writer.writerow(["frame", "source", *names, "m00", "m01", "m02", "m10", "m11", "m12",
                         "cost", "fit", "iterations", "converged", "stop_reason", "interpolation"])
        for k in range(stack.count):
            params = [math.degrees(v) if n == "angle" else v for n, v in zip(kind.parameter_names, values[k])]
            matrix = found["matrices"][k][:2].reshape(-1)
            writer.writerow([k, stack.names[k], *(repr(float(v)) for v in params),
                             *(repr(float(v)) for v in matrix), repr(float(found["costs"][k])),
                             repr(float(found["fits"][k])), int(found["iterations"][k]), bool(found["converged"][k]), found["reasons"][k],
                             interpolation])


def _frames_by_reason(reasons: Sequence[str], frames: Sequence[int]) -> str:
    """``frames`` with their stop reasons, a run of one reason named once: ``3, 4 (poor_fit), 7 (blank)``."""
    parts: list[str] = []
    for position, k in enumerate(frames):
        following = frames[position + 1] if position + 1 < len(frames) else None
        ends_run = following is None or reasons[following] != reasons[k]
        parts.append(f"{k} ({reasons[k]})" if ends_run else str(k))
    return ", ".join(parts)


def _frame_names(stack: ImageData) -> list[str]:
    """The file names of a stack's aligned frames in a folder output: a folder's own names, or
    ``frame_00000.tif`` ... for the pages of one file (a name's suffix that names another format
    than the frame's content takes the content's: :func:`_output_name`)."""
    if not stack.path.is_file():
        return [_output_name(name, image_format) for name, image_format in zip(stack.names, stack.formats)]
    return [_output_name(f"frame_{k:05d}{stack.path.suffix.lower()}", stack.format) for k in range(stack.count)]


def _alpha_as(frames: np.ndarray, stack: ImageData, alpha: Optional[str]) -> np.ndarray:
    """Warped ``frames`` of ``stack``, each in its own file's alpha kind, all in ``alpha``'s: a
    multi-page file is tagged with one kind (a folder's associated-alpha TIFF frame among straight
    PNG frames went into the file as it was, read back as straight)."""
    kinds = ("associated", "unassociated")
    if alpha not in kinds or frames.shape[-1] not in (2, 4):
        return frames
    convert = {"associated": unpremultiply, "unassociated": premultiply}  # from that kind to the other
    frames = frames.copy()
    for k, image_format in enumerate(stack.formats):
        if image_format.alpha in kinds and image_format.alpha != alpha:
            frames[k] = convert[image_format.alpha](frames[k], stack.format.dtype)
    return frames


def _ignores_case(folder: Path) -> Optional[bool]:
    """Whether the file system where ``folder`` goes takes ``A.png`` and ``a.png`` for one file (macOS
    and Windows by default), as a hidden file made in it, or in its nearest existing parent, tells:
    looked up in capitals, it is found or not.  ``None`` where no such file can be made."""
    nearest = next((parent for parent in [folder, *folder.parents] if parent.is_dir()), Path("."))
    try:
        with tempfile.NamedTemporaryFile(prefix=".tireg-case-", dir=nearest) as probe:
            name = os.path.basename(probe.name)
            return os.path.exists(os.path.join(os.path.dirname(probe.name), name.upper()))
    except OSError:
        return None


def _cmd_stack(args: argparse.Namespace, outputs: OutputFiles) -> int:
    output = Path(args.output)
    kind = _stack_output(output)  # wrong command lines first, before any file is read
    if kind == "folder" and not args.csv and output.name in ("", ".."):
        # '.' or '..' gave the CSV the name '.csv' ('... must end in .csv') or '...csv'
        raise UsageError(f"-o {args.output!r}: the frames' folder has no name of its own for the CSV beside it; "
                         "give the CSV's path (--csv drift.csv) or a new folder's name (-o aligned)")
    csv_path = Path(args.csv) if args.csv else (
        output.parent / f"{output.name}.csv" if kind == "folder" else output.with_suffix(".csv"))
    if csv_path.suffix.lower() != ".csv":
        raise UsageError(f"the CSV file {str(csv_path)!r} must end in .csv")
    stack = read_stack(args.input, what="stack")
    if stack.count < 2:
        raise CommandError(f"stack {args.input!r} has {stack.count} frame; at least 2 are needed")
    nodata = _nodata(args, stack, "stack")
    _check_finite(stack, "stack", nodata)
    has_data = _has_data(stack, nodata, args.channel)
    grey = _filled(_registered_grey(stack, args.channel, "stack"), has_data)
    data_counts = _data_counts(has_data, stack, nodata)
    blank = _constant_frames(grey, stack, None if data_counts is None else data_counts < 16)
    mask = _read_mask(args.mask, stack.size, "mask")
    frame_mask = _read_mask(args.frame_mask, stack.size, "frame mask")

    if kind != "folder":
        outputs.check(output, csv_path)
        check_writable(output, (stack.count, stack.channels), stack.format)
    else:  # the frames go into the folder by name, an existing folder too (as register's -o), each checked
        outputs.check(output, csv_path, folders=[output], exist_ok=[output])
        names = _frame_names(stack)
        ignores_case = _ignores_case(output)
        seen: dict[str, int] = {}
        for k, name in enumerate(names):  # t0.png and a PNG named t0.jpg would both be written as t0.png
            first = seen.setdefault(name if ignores_case is False else name.casefold(), k)
            if first == k:
                continue
            if names[first] == name:
                raise CommandError(f"frames {stack.names[first]!r} and {stack.names[k]!r} would both be written as "
                                   f"{str(output / name)!r} (a frame is written in the format its content is); "
                                   "rename one of them")
            # A.png and a.png: two files, but one where the file system takes them for one name
            where = (f"the file system of {str(output)!r}, which ignores case" if ignores_case else
                     f"a file system that ignores case (macOS's and Windows's by default), as that of {str(output)!r} "
                     "may")
            raise CommandError(f"frames {stack.names[first]!r} and {stack.names[k]!r} would be written as "
                               f"{str(output / names[first])!r} and {str(output / name)!r}: one file on {where}; "
                               "rename one of them")
        for name, image_format in zip(names, stack.formats):
            if (output / name).is_dir():  # a folder of one of those names would stop the merge halfway
                raise CommandError(f"cannot write {str(output / name)!r}: it is a folder")
            outputs.check(output / name)
            check_writable(output / name, (1, stack.channels), image_format)
    schedule = _schedule(args, stack.size, "frames")

    # mean: a chained pass of count - 1 frames, then every frame to the mean of the aligned frames
    total = 2 * stack.count - 1 if args.reference == "mean" else stack.count - 1
    progress = _Progress(args, len(schedule), total=total, unit="frame")
    try:
        found = _register_stack(args, grey, _StackMasks(mask, frame_mask, None if has_data is None else
                                                        has_data.astype(np.float32)), progress, blank)
    finally:
        progress.close()
    # each frame by its own file's alpha rule: a folder may mix a PNG's straight alpha and a TIFF's
    # associated one (frame 0's rule for all gave the other kind's frames fringes of 100 grey levels)
    aligned = _warp_frames(stack.frames, found["matrices"], stack.size, args.interpolation, args.device,
                           batch=args.batch_size, alpha=[image_format.alpha for image_format in stack.formats],
                           nodata=nodata, has_data=has_data)

    if kind == "folder":
        folder = outputs.temporary(output)
        folder.mkdir()
        for k, name in enumerate(_frame_names(stack)):
            with errors_named_by(output / name):  # the frame's output, not the temporary folder
                # on frame 0's grid: its pixel size and georeference (frame k's own are moved)
                write_frames(folder / name, aligned[k:k + 1],
                             replace(on_grid_of(stack.formats[k], stack.formats[0]), nodata=nodata))
    else:
        with outputs.writing(output) as temporary:  # one file, tagged with frame 0's alpha: every frame in it
            write_frames(temporary, _alpha_as(aligned, stack, stack.format.alpha),
                         replace(stack.format, kind=kind, nodata=nodata))
    with outputs.writing(csv_path) as temporary:
        _write_stack_csv(temporary, stack, found, args.transform, args.interpolation)
    written = outputs.commit()

    matrices = found["matrices"]
    center = np.array([*found["center"], 1.0])
    shifts = np.linalg.norm((matrices @ center)[:, :2] - center[:2], axis=1)
    angles = np.degrees(np.arctan2(matrices[:, 0, 1] - matrices[:, 1, 0], matrices[:, 0, 0] + matrices[:, 1, 1]))
    reference = {"first": "the first frame", "previous": "the previous frame, chained to the first",
                 "mean": "the mean of the aligned frames"}[args.reference]
    _say(args, f"aligned {stack.count} frames of {stack.path.name} ({stack.describe()}) to {reference}: "
               f"{args.transform}, {args.metric}, on {_registered_on(stack.channels, args.channel)}")
    moved = found["converged"]
    # over the reliable frames: a frame flagged as not converged (a cut's, at -109 deg) had been the
    # largest rotation of a stack whose other frames turned by 0.7 deg
    reliable = np.flatnonzero(moved)
    if reliable.size == 0:
        _say(args, "  no frame converged: no largest shift or rotation")
    else:
        largest, turned = reliable[shifts[reliable].argmax()], reliable[np.abs(angles[reliable]).argmax()]
        left_out = stack.count - reliable.size
        over = f", over the {reliable.size} frames that converged" if left_out else ""
        _say(args, f"  largest shift of the centre {shifts[largest]:.3f} px (frame {largest}), "
                   f"largest rotation {abs(angles[turned]):.3f} deg (frame {turned}){over}")
    registered = ~blank  # a blank frame has no cost
    _say(args, f"  mean cost {found['costs'][registered].mean():.6g}, {int(found['iterations'].sum())} iterations, "
               f"{int(moved.sum())}/{stack.count} converged, {found['seconds']:.2f} s")
    if not moved.all():
        _say(args, f"  not converged: frames {_frames_by_reason(found['reasons'], np.flatnonzero(~moved))}")
    if found["reasons"].count("poor_fit"):
        _say(args, f"  poor_fit: the frame fits its reference (their overlap NCC) below {found['fit_threshold']:.3f}; "
                   f"the stack's frames typically {found['typical_fit']:.3f}")
    for frame, source in found["blank"]:
        given = "the identity" if source is None else f"frame {source}'s transform"
        empty = data_counts is not None and data_counts[frame] < 16
        what = (f"has {int(data_counts[frame])} pixels with data (the rest are {nodata:g})" if empty else
                f"is constant (every pixel {float(grey[frame].flat[0]):g})")
        _say(args, f"  frame {frame} {what}: not registered, given {given}")
    for frame, reference in found.get("bridges", []):  # the chain around frames that did not converge
        skipped = f"frame {frame - 1}" if frame - 1 == reference + 1 else f"frames {reference + 1}-{frame - 1}"
        _say(args, f"  frame {frame} registered to frame {reference} directly: the chain skips {skipped}")
    _say(args, f"wrote {_names(written)}")
    return 0


# ----------------------------------------------------------------------------
# demo

#: The demo's true transform: similarity about the fixed image's centre.
DEMO_TRUTH = {"angle_deg": 10.0, "scale": 1.08, "tx": 9.0, "ty": -6.0}


def _cmd_demo(args: argparse.Namespace, outputs: OutputFiles) -> int:
    import torch

    from .data import load
    from .sampling import pixel_grid, warp
    from .transforms import image_center, similarity_matrix, translation_matrix

    require("matplotlib", "drawing pictures")
    folder = Path(args.output)
    names = ["fixed.png", "moving.png", *(p.name for p in _register_paths(folder, ".png").values())]
    paths = {name: folder / name for name in names}
    outputs.check(*paths.values())

    # fixed: the bundled photograph cropped by a margin; moving: the same scene seen through the
    # true transform, moving(A x) = fixed(x), so that both have content everywhere.
    scene = load(args.image, dtype=torch.float64)
    if scene.dim() == 3:
        scene = torch.from_numpy(luminance(np.moveaxis(scene.numpy(), 0, -1)))
    margin = 24
    height, width = scene.shape[0] - 2 * margin, scene.shape[1] - 2 * margin
    truth_params = torch.tensor([math.radians(DEMO_TRUTH["angle_deg"]), DEMO_TRUTH["scale"], DEMO_TRUTH["tx"],
                                 DEMO_TRUTH["ty"]], dtype=torch.float64)
    truth = similarity_matrix(truth_params, image_center(height, width))
    to_scene = translation_matrix(torch.tensor([float(margin), float(margin)], dtype=torch.float64))
    fixed = warp(scene[None, None], to_scene, size=(height, width))[0, 0].numpy()
    moving = warp(scene[None, None], to_scene @ torch.linalg.inv(truth), size=(height, width),
                  padding_mode="border")[0, 0].numpy()
    fixed_u8 = np.clip(np.rint(fixed * 255), 0, 255).astype(np.uint8)
    moving_u8 = np.clip(np.rint(moving * 255), 0, 255).astype(np.uint8)

    schedule = _schedule(args, (height, width))
    progress = _Progress(args, len(schedule))
    try:
        result = _register_images(args, fixed_u8.astype(np.float32), moving_u8.astype(np.float32),
                                  progress=progress)
    finally:
        progress.close()

    png = ImageFormat("png", np.dtype(np.uint8))
    for name, image in (("fixed.png", fixed_u8), ("moving.png", moving_u8)):
        with outputs.writing(paths[name]) as temporary:
            write_frames(temporary, image[None, :, :, None], png)
    moving_image = ImageData(moving_u8[None, :, :, None], png, paths["moving.png"], ["moving.png"], [png])
    _write_register_outputs(outputs, _register_paths(folder, ".png"), result, moving=moving_image,
                            fixed_grey=fixed_u8.astype(np.float64), moving_grey=moving_u8.astype(np.float64),
                            title=f"tireg demo: {args.image}, similarity", args=args)
    written = outputs.commit()

    found = result.parameters
    points = pixel_grid((height, width), dtype=torch.float64)
    error = float((points @ (result.matrix - truth).T)[:, :2].norm(dim=-1).mean())
    rows = [("angle (deg)", DEMO_TRUTH["angle_deg"], found["angle_deg"]),
            ("scale", DEMO_TRUTH["scale"], found["scale"]),
            ("tx (px)", DEMO_TRUTH["tx"], found["tx"]),
            ("ty (px)", DEMO_TRUTH["ty"], found["ty"])]
    _say(args, f"tireg demo: registered '{args.image}' ({width} x {height} pixels, width x height) to a copy turned, scaled and shifted "
               "by a known similarity transform")
    _say(args, f"  {'parameter':<12}{'true':>10}{'recovered':>12}{'error':>10}")
    for name, true, value in rows:
        _say(args, f"  {name:<12}{true:>10.4f}{value:>12.4f}{value - true:>+10.4f}")
    _say(args, f"  mean distance between true and recovered pixel positions: {error:.4f} px; "
               f"cost {float(result.cost[0]):.4g}, {int(result.iterations[0])} iterations, {result.seconds:.2f} s")
    _say(args, f"wrote in {folder}/: {', '.join(p.name for p in written)}")
    _say(args, f"the same from the command line: tireg register {folder / 'fixed.png'} {folder / 'moving.png'} "
               f"-o {folder / 'register'} --transform similarity")
    if not error < 0.5:
        raise CommandError(f"the demo did not recover the transform (mean error {error:.3f} px)")
    return 0


# ----------------------------------------------------------------------------
# main


_CALLER = re.compile(r"^[A-Za-z_][\w.]*\(\): ")


def _one_line(error: BaseException) -> str:
    """A one-line message for ``error``: no caller prefix (``register(): ``), no traceback."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename!r}: {error.strerror}"
    elif isinstance(error, OSError) and error.strerror:  # "No space left on device", not "[Errno 28] ..."
        text = error.strerror
    else:
        text = str(error).strip()
    text = " ".join(text.split())  # one line
    return _CALLER.sub("", text) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``tireg`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: success; 1: the input could not be processed; 2: a wrong command line; 130: Ctrl-C.
    SIGTERM, while this runs in the main thread and SIGTERM has its default handler: the outputs
    discarded, then the process ends by the signal's default action (143 in a shell).
    Errors print one line, ``tireg: error: ...``, to stderr and leave no output file; so do Ctrl-C and SIGTERM.
    """
    _CommandWarnings.enter()
    try:
        with _terminate_as_exception():
            return _main(argv)
    finally:
        _CommandWarnings.leave()


#: Set when SIGTERM arrived while :func:`main` ran: once the outputs are discarded, the process ends
#: by SIGTERM's default action after all.
_TERMINATED = threading.Event()


def _raise_terminated(signum: int, frame: Any) -> None:
    _TERMINATED.set()
    raise Terminated()


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """SIGTERM raised as :class:`Terminated` inside ``with``; the handler found is put back after it.

    Python's default for SIGTERM ends the process at once: the hidden temporary files
    (``.tireg-*.tmp.*``) and the folders the command had created stayed behind, where Ctrl-C
    (``KeyboardInterrupt``) left nothing.  Installed only where it can be and is wanted: in the
    main thread (the only one that may set a handler) and over the default, ``SIG_DFL``; a host
    program's own handler (or one ignoring SIGTERM) is left alone.  Once the outputs are discarded,
    SIGTERM is sent again under the default, which ends the process as it would have without
    tireg (status 143 in a shell): a program that calls :func:`main` and had not chosen to handle
    SIGTERM went on running, with a signal that may have interrupted an import half-way.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                previous = signal.signal(signal.SIGTERM, _raise_terminated)
        except (ValueError, OSError, AttributeError):  # no SIGTERM to handle here
            previous = None
    try:
        yield
    finally:
        # unless the program replaced it meanwhile
        if previous is not None and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, previous)
            if _TERMINATED.is_set():
                _TERMINATED.clear()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGTERM)


_PYTHON_SHOWWARNING = warnings.showwarning  # what a thread's warning falls back to


class _CommandWarnings:
    """Warnings shown as the command's own lines, ``tireg: warning: ...``, while :func:`main` runs
    (Python's default prefixed them with a source file and line of tireg's code), and Python's
    display everywhere else.

    Why not ``warnings.catch_warnings()`` around each call: it swaps process-wide state and puts
    back what it found, so two calls in two threads could leave tireg's display installed for
    good (the first to end restores Python's, the second then restores tireg's).  Here one
    display is installed while any call runs, chosen per thread, and the one found before the
    first call is put back after the last.
    """

    _lock = threading.Lock()
    _calls = 0
    _saved: Any = None
    _installed: Any = None
    _local = threading.local()

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._calls == 0:
                cls._saved = warnings.showwarning
                cls._installed = warnings.showwarning = cls._show  # a bound method: one object, kept
            cls._calls += 1
        cls._local.depth = getattr(cls._local, "depth", 0) + 1

    @classmethod
    def leave(cls) -> None:
        cls._local.depth -= 1
        with cls._lock:
            cls._calls -= 1
            if cls._calls == 0:
                if warnings.showwarning is cls._installed:  # unless the program replaced it meanwhile
                    warnings.showwarning = cls._saved
                cls._saved = cls._installed = None

    @classmethod
    def _show(cls, message, category, filename, lineno, file=None, line=None) -> None:
        if getattr(cls._local, "depth", 0) == 0:  # another thread's warning, not the command's
            (cls._saved or _PYTHON_SHOWWARNING)(message, category, filename, lineno, file, line)
            return
        text = _one_line(message if isinstance(message, Warning) else Warning(message))
        print(f"{PROG}: warning: {_command_words(text)}", file=sys.stderr if file is None else file)


#: ``register()``'s Python words in its warnings, and the command line's for them (the pyramid's
#: ``(1, 2)`` and ``e.g. (4, 2, 1)`` are ``--levels 1,2`` and ``--levels 4,2,1`` here).
_COMMAND_WORDS = [
    # a pyramid of one level keeps its comma: on the command line '--levels 4' is four levels
    (re.compile(r"\bthe pyramid \(([\d, ]+?)(,?)\)"), lambda match: f"--levels {match[1].replace(' ', '')}{match[2]}"),
    (re.compile(r"\be\.g\. \((\d+(?:, \d+)+)\)"), lambda match: f"e.g. --levels {match[1].replace(' ', '')}"),
]


def _command_words(text: str) -> str:
    """``text`` (a library warning) with the Python wording of options replaced by the command's."""
    for pattern, words in _COMMAND_WORDS:
        text = pattern.sub(words, text)
    return text


def _outputs_left(outputs: Optional[OutputFiles]) -> str:
    """What an interrupted command leaves: nothing, or (a Ctrl-C after the commit, while the summary
    was printed) every output, complete; "no output written" had been said of files in place."""
    if outputs is None or not outputs.written:
        return "no output written"
    return f"the outputs were complete and stay: {_names(outputs.written)}"


def _main(argv: Optional[Sequence[str]]) -> int:
    args: Optional[argparse.Namespace] = None
    outputs: Optional[OutputFiles] = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            where = f"{PROG} {args.command}" if args.command else PROG
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{where} --help')")
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if hasattr(args, "optimizer"):
            _check_optimizer(args)
            _check_loss_scale(args)
        outputs = OutputFiles(force=args.force)
        with outputs:
            return args.handler(args, outputs)
    except SystemExit as exit:  # --help, --version
        return exit.code if isinstance(exit.code, int) else 0
    except UsageError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `tireg ... | head`: the reader left; the outputs are written
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {_outputs_left(outputs)}", file=sys.stderr)
        return 130
    except Terminated:  # SIGTERM (kill, a job scheduler's time limit): the outputs were discarded as for Ctrl-C
        print(f"{PROG}: terminated; {_outputs_left(outputs)}", file=sys.stderr)
        return 128 + int(signal.SIGTERM)
    except (CommandError, ImageError, MissingDependencyError, ValueError, TypeError, OSError, RuntimeError,
            MemoryError, Warning) as error:  # a Warning: raised under python -W error
        if args is not None and getattr(args, "traceback", False):
            raise
        # numpy's _ArrayMemoryError is a MemoryError; torch's CPU allocator raises a RuntimeError
        if isinstance(error, MemoryError) or isinstance(error, RuntimeError) and "can't allocate memory" in str(error):
            message = "out of memory (an image or its result is too large for this machine); no output written"
        else:
            message = _one_line(error)
        if outputs is not None:  # a write that failed names the output, not its temporary name
            message = outputs.final_names(message)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
