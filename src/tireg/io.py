"""Image files for the ``tireg`` command: read, convert, write back the same way.

Formats, chosen by the file's suffix (case-insensitive); a PNG or JPEG file is
checked as what its content is (a PNG named ``.jpg`` is read as a PNG):

======================  =====================  ==========================================
suffix                  read with              kept on writing
======================  =====================  ==========================================
``.png``                imageio (Pillow)       1, 8 or 16 bit grey; 8 bit grey+alpha, RGB, RGBA
``.jpg``, ``.jpeg``     imageio (Pillow)       8 bit grey or RGB (lossy)
``.tif``, ``.tiff``     tifffile               1 bit grey, any integer or float dtype, any channel count,
                                               several pages (frames)
``.npy``                NumPy                  any real dtype and shape
======================  =====================  ==========================================

Convention:
    On disk an image is ``(H, W)`` or ``(H, W, C)`` (channels last), a stack
    ``(N, H, W)`` or ``(N, H, W, C)``.  In memory every image read here is
    ``frames``: ``(N, H, W, C)`` in the file's dtype, ``N = 1`` for a single
    image, ``C = 1`` for grey.  tireg's tensors are ``(C, H, W)``:
    :func:`to_chw` and :func:`from_chw` convert.

What is needed to write a result back as the input was stored -- format,
dtype, whether grey had a channel axis, TIFF photometric -- travels in an
:class:`ImageFormat`.  Every write goes to a temporary file in the
destination's folder and is moved into place with ``os.replace``, so a
failed write leaves no file behind and never a half-written one
(:func:`atomic_path`, :class:`OutputFiles`); a file replaced is replaced as
``open()`` writes it: through a symbolic link, its permissions kept, refused
where the user may not write it.  Data no file holds as it is (NaN,
Inf, complex, no pixels) is refused before anything is written.

The optional packages (``imageio``, ``tifffile``) are imported when a file
needs them; a missing one raises :class:`MissingDependencyError` naming
``pip install "torch-image-registration[cli]"``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import shutil
import stat
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ._validation import as_path, user_stacklevel

__all__ = [
    "SUFFIXES",
    "ImageFormat",
    "ImageData",
    "ImageError",
    "MissingDependencyError",
    "read_image",
    "read_stack",
    "write_image",
    "write_frames",
    "errors_named_by",
    "format_for_path",
    "luminance",
    "luminance_words",
    "to_chw",
    "from_chw",
    "convert_dtype",
    "atomic_path",
    "OutputFiles",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Supported suffixes and the format each one means.
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}
_SUPPORTED = ".png, .jpg/.jpeg, .tif/.tiff, .npy"
# ITU-R BT.601 luma weights, as Pillow's "L" conversion and OpenCV use.
_LUMA = np.array([0.299, 0.587, 0.114])
INSTALL_HINT = 'pip install "torch-image-registration[cli]"'


class ImageError(ValueError):
    """An image file that cannot be read, or an array that cannot be written in the asked format."""


class MissingDependencyError(ImportError):
    """An optional package (imageio, tifffile, matplotlib, tqdm) is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs the package {package!r}, which is not installed; run: {INSTALL_HINT}"
        ) from None


@dataclass(frozen=True)
class ImageFormat:
    """How an image is stored, so that a result can be written back the same way.

    Attributes:
        kind: ``"png"``, ``"jpeg"``, ``"tiff"`` or ``"npy"``.
        dtype: the pixel type, e.g. ``uint8``, ``uint16``, ``float32``.
        channel_axis: whether the file has a channel axis (``(H, W, C)``);
            ``False`` for grey ``(H, W)``.
        photometric: TIFF only: ``"rgb"`` or ``"minisblack"``.
        alpha: whether the last channel of grey + alpha or RGBA was alpha in the file:
            ``"unassociated"`` (a PNG's; a TIFF's ExtraSamples UNASSALPHA), ``"associated"``
            (premultiplied: ASSOCALPHA), or ``None`` where the file did not say so (an ``.npy``;
            a TIFF of two fluorescence channels, whose extra sample is UNSPECIFIED).
        extrasamples: TIFF only: the page's ExtraSamples as read, one tag per sample beyond grey
            or RGB (0 unspecified, 1 associated alpha, 2 unassociated alpha), written back so; ``()``
            where there are none or the channels are not the page's samples (a hyperstack's C axis).
        resolution: TIFF only: ``(x, y, unit)``, the first page's XResolution and YResolution
            (pixels per unit) and its ResolutionUnit (1 none, 2 inch, 3 centimetre), written back
            so; ``None`` where the file has none.
        imagej: an ImageJ TIFF's calibration and display entries as read (``unit``, ``spacing``,
            ``finterval``, ...), ``(key, value)`` pairs; ``()`` for any other file.  A TIFF written
            with it is an ImageJ hyperstack again (:func:`write_frames`).
        frame_axes: an ImageJ TIFF's frame axes and their lengths as read, e.g. ``(("T", 4), ("Z", 3))``
            for 12 frames: written back as those axes where the frame count is the same.
        nodata: TIFF only: the value that marks pixels without data, GDAL's ``GDAL_NODATA`` tag
            (42113) as a number (``nan`` for NaN), written back so; ``None`` where there is none.
        georeference: TIFF only: the first page's GeoTIFF tags (:data:`GEOREFERENCE_TAGS`) as
            ``(code, TIFF type, value)``, written back so: where the image lies on the Earth.
            ``()`` where there are none.
    """

    kind: str
    dtype: np.dtype
    channel_axis: bool = False
    photometric: Optional[str] = None
    alpha: Optional[str] = None
    extrasamples: tuple[int, ...] = ()
    resolution: Optional[tuple[float, float, int]] = None
    imagej: tuple[tuple[str, Any], ...] = ()
    frame_axes: tuple[tuple[str, int], ...] = ()
    nodata: Optional[float] = None
    georeference: tuple[tuple[int, int, Any], ...] = ()


#: The GeoTIFF tags kept from a TIFF read to one written on the same grid: ModelPixelScale (33550),
#: ModelTiepoint (33922), ModelTransformation (34264), GeoKeyDirectory (34735), GeoDoubleParams
#: (34736), GeoAsciiParams (34737) and GDAL_METADATA (42112).  The no-data value, GDAL_NODATA
#: (42113), is :attr:`ImageFormat.nodata`.
GEOREFERENCE_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112)
NODATA_TAG = 42113


#: The entries of an ImageJ TIFF's metadata kept from a file read to one written (its calibration and
#: display; the counts and the axes follow the frames written, and ranges and LUTs their channels).
IMAGEJ_KEPT = ("unit", "spacing", "finterval", "fps", "tunit", "loop", "mode")


@dataclass
class ImageData:
    """Frames read from a file (or a folder), in the file's dtype.

    Attributes:
        frames: ``(N, H, W, C)``.
        format: how the (first) file was stored.
        path: where it was read from.
        names: a name per frame (file names for a folder, ``page 0`` ... otherwise).
        formats: per frame, for a folder of images (else every entry is ``format``).
    """

    frames: np.ndarray
    format: ImageFormat
    path: Path
    names: list[str] = field(default_factory=list)
    formats: list[ImageFormat] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of frames (pages), ``N``."""
        return self.frames.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.frames.shape[1], self.frames.shape[2]

    @property
    def channels(self) -> int:
        """Number of channels, ``C`` (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA, or as many as the file holds)."""
        return self.frames.shape[3]

    def describe(self) -> str:
        """``'128 x 160, 3 channels, uint8'`` (W x H as image viewers show it)."""
        channels = "grey" if self.channels == 1 else f"{self.channels} channels"
        return f"{self.size[1]} x {self.size[0]}, {channels}, {self.frames.dtype}"


# ----------------------------------------------------------------------------
# conversions


def to_chw(frame: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` -> ``(C, H, W)`` (a view).  ``TypeError`` for what is no array, ``ValueError`` for an
    array of another number of dimensions (``None`` raised NumPy's "axis -1 is out of bounds")."""
    return np.moveaxis(_three_axes(frame, "frame", "(H, W, C)", "to_chw()"), -1, 0)


def from_chw(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, C)`` (a view); the checks of :func:`to_chw`."""
    return np.moveaxis(_three_axes(image, "image", "(C, H, W)", "from_chw()"), 0, -1)


def _three_axes(array, name: str, layout: str, caller: str) -> np.ndarray:
    """``array`` as a NumPy array (itself if it is one) if it holds numbers in three dimensions; raise
    naming ``name`` otherwise."""
    try:
        values = array if isinstance(array, np.ndarray) else np.asarray(array)
    except (TypeError, ValueError, RuntimeError):  # a ragged list, a tensor that requires grad
        values = None
    if values is None or values.dtype == object or values.dtype.kind not in "biufc":
        raise TypeError(f"{caller}: '{name}' must be an array {layout}; got {type(array).__name__}")
    if values.ndim != 3:
        raise ValueError(f"{caller}: '{name}' must be an array {layout}; got shape {values.shape}")
    return values


def luminance(frames: np.ndarray) -> np.ndarray:
    """Grey values ``(..., H, W)`` float64 of ``(..., H, W, C)`` frames.

    ``C = 1``: the channel; ``C = 2`` (grey + alpha): the first channel;
    ``C = 3`` or ``4`` (RGB, RGBA): BT.601 luma ``0.299 R + 0.587 G + 0.114 B``
    (alpha ignored); other ``C``: the mean of the channels.  Raises ``TypeError`` for values that
    are not real numbers (a complex image's imaginary part was dropped) or an array of no dimension.
    """
    frames = np.asarray(frames)
    if frames.dtype.kind not in "biuf" or frames.ndim < 1:
        raise TypeError(f"luminance(): 'frames' must be (..., H, W, C) real numbers; got {frames.dtype} of shape "
                        f"{frames.shape}")
    channels = frames.shape[-1]
    if channels == 0:  # the mean of no channel was NaN, with NumPy's "Mean of empty slice"
        raise ValueError(f"luminance(): 'frames' has no channel; got shape {frames.shape}")
    rule = _luminance_rule(channels)
    if rule == "first":
        return frames[..., 0].astype(np.float64)
    if rule == "luma":
        return frames[..., :3].astype(np.float64) @ _LUMA
    return frames.astype(np.float64).mean(axis=-1)


def _luminance_rule(channels: int) -> str:
    """How :func:`luminance` makes grey values of ``channels`` channels: ``"first"`` (1 and 2: grey,
    grey + alpha), ``"luma"`` (3 and 4: RGB, RGBA) or ``"mean"``; :func:`luminance_words` says it."""
    return "first" if channels in (1, 2) else "luma" if channels in (3, 4) else "mean"


def luminance_words(channels: int) -> str:
    """What :func:`luminance` takes of an image of ``channels`` channels, in words for a summary line."""
    rule = _luminance_rule(channels)
    if rule == "first":
        return "its grey values" if channels == 1 else "channel 0 of 2"
    if rule == "luma":
        return "the luminance of channels 0-2 (BT.601, as RGB" + ("; channel 3 left out)" if channels == 4 else ")")
    return f"the mean of its {channels} channels"


def convert_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float ``values`` as ``dtype``: integers rounded and clipped to the type's range (an infinity
    to its end); bool by ``> 0.5``.

    ``TypeError`` for a ``dtype`` NumPy does not know (``"abc"``: NumPy's "data type 'abc' not
    understood" named no argument) or ``values`` that are not real numbers; ``ValueError`` for a
    NaN bound for an integer or bool ``dtype`` (which holds none)."""
    caller = "convert_dtype()"
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{caller}: 'dtype' must be a NumPy dtype; got {dtype!r}") from None
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":  # None is an object array; > 0.5 or rint failed on it in NumPy's words
        raise TypeError(f"{caller}: 'values' must be real numbers; got {values.dtype}")
    if (dtype == np.bool_ or np.issubdtype(dtype, np.integer)) and values.dtype.kind == "f" and np.isnan(
            values).any():  # NaN was cast to 0 (or False), with NumPy's "invalid value" warning at most
        raise ValueError(f"{caller}: 'values' hold NaN, which {dtype} cannot hold")
    if dtype == np.bool_:
        return values > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# ----------------------------------------------------------------------------
# reading


def format_for_path(path: PathLike, *, what: str = "image") -> str:
    """The format kind of ``path``'s suffix; :class:`ImageError` for an unsupported one."""
    path = as_path(path, "format_for_path()")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        name = path.name.lower()
        suffix = next((medical for medical in _MEDICAL if name.endswith(medical)), path.suffix) or "(no suffix)"
        # a video or an animation: its frames, not another single-image format, are what to give
        hint = (f" (an animation or a video: extract its frames into a folder of images or a multi-page TIFF "
                f"first, e.g. ffmpeg -i {path.name} frames/%05d.png)") if path.suffix.lower() in _VIDEOS else ""
        if suffix in _MEDICAL:  # a volume or a DICOM slice: what to convert it to, and what is lost
            hint = (" (a medical image: write its slice or slices as a float32 TIFF first, e.g. with SimpleITK, "
                    "sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), 'slice.tif'); tireg registers in pixels, "
                    "so resample both to one pixel spacing first where theirs differ)")
        raise ImageError(f"unsupported {what} format {suffix!r} for {str(path)!r}; use {_SUPPORTED}{hint}")
    return kind


#: Suffixes of medical images (NIfTI, MetaImage, NRRD, DICOM, Analyze), which tireg does not read.
_MEDICAL = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom", ".hdr", ".img")

#: Suffixes of animations and videos, which tireg does not read (their frames, extracted, it does).
_VIDEOS = (".gif", ".apng", ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".mpg", ".mpeg",
           ".ogv", ".flv")


def _check_file(path: Path, what: str) -> None:
    """Raise naming ``path`` and ``what`` unless it is a file that holds something.

    By one ``stat``: ``Path.exists()`` is false for any error, and a loop of symbolic links was
    reported as "no such file"; the system's own reason is named now."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {str(path)!r} ({what})") from None
    except OSError as error:  # a loop of links, a name too long, a folder that may not be searched
        raise ImageError(f"cannot open {str(path)!r} ({what}): {error.strerror or error}") from None
    if stat.S_ISDIR(status.st_mode):
        raise ImageError(f"{str(path)!r} is a folder, not an image file ({what})")
    if status.st_size == 0:
        raise ImageError(f"{str(path)!r} is an empty file (0 bytes) ({what})")


def read_image(path: PathLike, *, what: str = "image", frames: bool = False) -> ImageData:
    """Read one image file as ``(N, H, W, C)`` frames in its own dtype.

    Args:
        path: a ``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff`` or ``.npy`` file.
        what: how error messages name the file, e.g. ``"fixed image"``.
        frames: how a 3-D ``.npy`` array is read: ``False``: ``(H, W, C)``
            with ``C <= 4``; ``True``: ``(N, H, W)`` (a stack).

    Raises:
        FileNotFoundError: no such file.
        ImageError: unsupported suffix, unreadable or corrupt file, an array
            that is not an image, no pixels, non-numeric pixels.
        MissingDependencyError: imageio / tifffile not installed.
        TypeError: ``path`` not a path.
    """
    path = as_path(path, "read_image()")
    if path.is_dir():  # said first: its "unsupported format '(no suffix)'" hid what it is
        raise ImageError(f"{str(path)!r} is a folder, not an image file ({what})")
    kind = format_for_path(path, what=what)
    _check_file(path, what)
    reader = {"png": _read_pillow, "jpeg": _read_pillow, "tiff": _read_tiff, "npy": _read_npy}[kind]
    data, image_format = reader(path, kind, what, frames)
    if data.dtype.kind not in "biuf":
        raise ImageError(f"{what} {str(path)!r} has pixels of type {data.dtype}; expected integers or floats")
    if data.size == 0 or min(data.shape[1:3]) < 1:
        raise ImageError(f"{what} {str(path)!r} is empty (shape {_disk_shape(data, image_format)})")
    count = data.shape[0]
    # "page k" where frame k is page k; else "frame k" (an .npy stack; a TIFF whose pages are also
    # channels, where frame 1 of a 2-channel hyperstack is pages 2 and 3)
    unit = "page" if kind == "tiff" and _tiff_page_count(path) == count else "frame"
    names = [path.name] if count == 1 else [f"{path.name} {unit} {i}" for i in range(count)]
    return ImageData(data, image_format, path, names, [image_format] * count)


def _tiff_page_count(path: Path) -> int:
    """How many pages a (readable) TIFF holds, reduced-resolution ones left out."""
    import tifffile

    with _tifffile_messages(), tifffile.TiffFile(path) as tif:  # its messages were the read's
        return sum(1 for page in tif.pages if not getattr(page, "is_reduced", False))


def _disk_shape(data: np.ndarray, image_format: ImageFormat) -> tuple[int, ...]:
    shape = data.shape if image_format.channel_axis else data.shape[:3]
    return shape[1:] if shape[0] == 1 else shape


def _png_header(path: Path) -> tuple[int, int]:
    """PNG ``(bit depth, colour type)`` from the IHDR chunk, or ``(0, 0)`` if not a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return 0, 0
    return head[24], head[25]


#: tireg's format kind of what Pillow's ``Image.format`` detects.
_PILLOW_KINDS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}

#: The mode with alpha that a Pillow image of a mode with a transparent entry (PNG's ``tRNS``: a
#: palette index or a colour) is read in.
_WITH_ALPHA = {"P": "RGBA", "L": "LA", "RGB": "RGBA"}


def _with_transparent_value(grey: np.ndarray, value) -> np.ndarray:
    """A 1-bit grey ``(H, W)`` image (Pillow gives it no alpha mode) and its ``tRNS`` ``value`` as
    ``(H, W, 2)``: the grey and an alpha, ``False`` where the pixel is ``value``; it was read opaque.
    A 16-bit grey one stays opaque: PNG's writer holds no 16-bit grey + alpha, and its outputs, in
    its input's format, could then not be written at all (``tireg register`` of two of them)."""
    return np.stack([grey, grey != bool(value)], axis=-1)


def _read_pillow(path: Path, kind: str, what: str, frames: bool) -> tuple[np.ndarray, ImageFormat]:
    iio = require("imageio.v3", f"reading {kind.upper()} files")
    # Pillow reads a file by its content, whatever its suffix: so do these checks (a 16-bit PNG or an
    # animated GIF named .jpg was read as 8 bits, or as its first frame, silently)
    depth, colour = _png_header(path)
    if depth == 16 and colour in (2, 4, 6):
        raise ImageError(
            f"{what} {str(path)!r} is a 16-bit colour PNG, which Pillow reads as 8 bits; "
            "save it as a 16-bit TIFF (or as grey) instead"
        )
    try:
        from PIL import Image  # imageio's own reader of PNG and JPEG

        with Image.open(path) as opened:
            mode, count, content = opened.mode, getattr(opened, "n_frames", 1), opened.format
            transparent = opened.info.get("transparency")  # a palette's, a grey's or a colour's tRNS entry
        if content == "TIFF":  # Pillow read a 16-bit RGB TIFF named .png as 8 bits, and one page of many
            raise ImageError(f"{what} {str(path)!r} is a TIFF file under a {path.suffix!r} name; name it .tif "
                             "(tireg reads TIFFs with tifffile, which keeps their bit depth, channels and pages)")
        if count > 1 and content != "MPO":  # an animated PNG, GIF or WebP: its first frame was taken silently
            # (a JPEG with several pictures, MPO, holds a preview or depth map after its main one: frame 0 is right)
            raise ImageError(f"{what} {str(path)!r} is an animation of {count} frames ({content}); tireg reads one "
                             "image from it (save the frames as a multi-page TIFF or a folder for 'tireg stack')")
        kind = _PILLOW_KINDS.get(content, kind)
        # Pillow only (imageio tried other plugins on a bad file and reported theirs); the EXIF
        # orientation applied, as viewers show the image; CMYK, Lab and YCbCr as RGB (their four
        # or three samples are not RGB(A): a CMYK JPEG registered as RGBA)
        options = dict(mode="RGB") if mode in ("CMYK", "LAB", "YCbCr", "HSV") else {}
        if transparent is not None and mode in _WITH_ALPHA:  # as a viewer shows it: a palette's transparent
            options = dict(mode=_WITH_ALPHA[mode])  # entries were read as their colour, opaque
        array = np.asarray(iio.imread(path, plugin="pillow", index=0, rotate=True, **options))
    except ImageError:
        raise
    except Exception as error:  # the readers raise anything from OSError to SyntaxError on a bad file
        raise ImageError(f"cannot read {what} {str(path)!r} as {kind.upper()}: {_reason(error)}") from None
    if transparent is not None and mode == "1" and array.ndim == 2:
        array = _with_transparent_value(array, transparent)
    if array.ndim == 2:
        return array[None, :, :, None], ImageFormat(kind, array.dtype, False)
    if array.ndim == 3:
        # Pillow's two and four channels are LA and RGBA (CMYK was read as RGB, above)
        alpha = "unassociated" if array.shape[-1] in (2, 4) else None
        return array[None], ImageFormat(kind, array.dtype, True, alpha=alpha)
    raise ImageError(f"{what} {str(path)!r} has shape {array.shape}; expected (H, W) or (H, W, C)")


#: What the TIFF photometric interpretations that tireg refuses hold.
_PHOTOMETRIC = {
    "PALETTE": "indices into a colour table",
    "MINISWHITE": "grey with 0 as white",
    "SEPARATED": "CMYK or other ink separations",
    "CIELAB": "Lab colour",
    "ICCLAB": "Lab colour",
    "ITULAB": "Lab colour",
    "CFA": "a raw colour filter array",
    "MASK": "a transparency mask",
}


class _TifffileMessages(logging.Filter):
    """tifffile's log records (warning level and above) from the thread that reads a file, kept for
    the reader instead of printed: Python's last-resort display wrote them to stderr as
    ``<tifffile.TiffPages @8> invalid page offset 82896``, past ``-q`` too, beside the command's own
    lines.  Other threads' records, and lower levels, go on as they would have."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or threading.get_ident() != self.thread:
            return True
        # without the object's repr: '<tifffile.TiffPages @8> invalid page offset 82896'
        self.messages.append(re.sub(r"^<[^>]*> ", "", record.getMessage()))
        return False


@contextlib.contextmanager
def _tifffile_messages() -> Iterator[list[str]]:
    """The messages tifffile logs inside ``with`` (:class:`_TifffileMessages`), in order."""
    logger = logging.getLogger("tifffile")
    kept = _TifffileMessages()
    logger.addFilter(kept)
    try:
        yield kept.messages
    finally:
        logger.removeFilter(kept)


#: tifffile's messages that the chain of pages breaks off before its end -- a file cut short (a copy
#: or a transfer that stopped), or damaged -- which it logs, reading the pages before as the file;
#: each with the page (counted from the pages it kept) that cannot be read, and why.
_TIFF_BROKEN = [
    # the first page's link: it said 'holds no image' of a file that is no TIFF but for its first bytes
    (re.compile(r"invalid offset to first page (\d+)"), 0, "the link to it points to byte {0} of a file of {size} bytes"),
    (re.compile(r"invalid page offset (\d+)"), 0, "the link to it points to byte {0} of a file of {size} bytes"),
    (re.compile(r"invalid offset to page"), -1, "the file ends inside its list of tags"),  # a page kept
    (re.compile(r"corrupted tag list of page"), 0, "its list of tags is damaged"),
    (re.compile(r"invalid circular reference to IFD (\d+)"), 0, "the link to it leads back to page {0}"),
    # a tag whose value lies past the end: an OME-TIFF's description, at the end, cut off left its
    # channels read as frames
    (re.compile(r"TiffTag (\d+) @\d+> invalid value offset (\d+)"), None,
     "the value of its tag {0}, at byte {1}, does not fit in the file of {size} bytes"),
]


def _check_tiff_pages(messages: list[str], count: int, path: Path, what: str) -> None:
    """:class:`ImageError` if tifffile found the chain of ``count`` pages broken before its end.

    Read as the shorter stack it was, a cut file gave fewer frames than the acquisition, exit 0,
    and a CSV that did not match it; or, a stack cut to one readable page, an image where a stack
    was.
    """
    for message in messages:
        for pattern, shift, why in _TIFF_BROKEN:
            found = pattern.search(message)
            if not found:
                continue
            why = why.format(*found.groups(), size=path.stat().st_size)
            if shift is None:
                raise ImageError(f"{what} {str(path)!r} is truncated or corrupt: {why}")
            page = max(count + shift, 0)
            readable = "" if page == 0 else "; page 0 can be read" if page == 1 else \
                f"; pages 0 to {page - 1} can be read"
            raise ImageError(f"{what} {str(path)!r} is truncated or corrupt: its page {page} cannot be read "
                             f"({why}{readable})")


#: tifffile's messages that the file's own header (ImageJ's, tifffile's shaped description, OME's,
#: Micro-Manager's, an LSM file's) describes other images than its pages hold; it logs them and reads
#: the pages as they come.
_TIFF_HEADER = re.compile(r"ImageJ series metadata invalid|shaped series failed to reshape|OME series expected"
                          r"|OME series is missing|MMStack is missing|LSM file incompletely written")


def _header_damage(message: str) -> Optional[re.Match]:
    """The :data:`_TIFF_HEADER` match of one of tifffile's messages, ``None`` for an OME header that
    describes fewer frames than the file's pages hold ('OME series expected 3 frames, got 6'):
    every image it describes is there, and microscope software writes such files (tifffile's
    source names one); tifffile reads the described frames, and its message stays a warning."""
    found = _TIFF_HEADER.search(message)
    if found is not None and found[0] == "OME series expected":
        counts = re.search(r"expected (\d+) frames?, got (\d+)", message)
        if counts is not None and int(counts[2]) > int(counts[1]):
            return None
    return found


def _check_tiff_header(messages: list[str], tif, count: int, path: Path, what: str) -> None:
    """:class:`ImageError` if the header of ``tif`` does not describe its ``count`` pages.

    An ImageJ header of 9 frames over 6 pages was read as 6 frames, exit 0, with tifffile's line
    'ImageJ series metadata invalid or corrupted file' on stderr: the file had lost images.
    """
    found = next((match for match in map(_header_damage, messages) if match), None)
    if found is None:
        return
    if found[0].startswith("ImageJ"):
        header = tif.imagej_metadata or {}
        words = ", ".join(f"{key}={header[key]}" for key in ("images", "channels", "slices", "frames") if key in header)
        header = f"ImageJ header ({words})"
    elif found[0].startswith("shaped"):
        shape = next(iter(tif.shaped_metadata or ()), {}).get("shape")
        header = f"header (shape {tuple(shape)})" if shape else "header"
    else:  # tifffile's words, without what it does about it: 'OME series is missing 3 frames. Missing data are zeroed'
        raise ImageError(f"{what} {str(path)!r} is truncated or corrupt: {found.string.split('. ')[0].rstrip('.')}")
    pages = "1 page" if count == 1 else f"{count} pages"
    raise ImageError(f"{what} {str(path)!r} is truncated or corrupt: its {header} describes other images than "
                     f"its {pages} of {_page_size(tif.pages.first)}")


def _read_tiff(path: Path, kind: str, what: str, frames: bool) -> tuple[np.ndarray, ImageFormat]:
    tifffile = require("tifffile", "reading TIFF files")
    count = 0
    try:
        with _tifffile_messages() as messages, tifffile.TiffFile(path) as tif:
            # every page's link followed first: a cut chain is logged (not raised) and its first
            # pages were then the file
            count = len(tif.pages)
            _check_tiff_pages(messages, count, path, what)
            series = tif.series
            _check_tiff_header(messages, tif, count, path, what)
            if not series:
                raise ImageError(f"{what} {str(path)!r} holds no image")
            data, axes, ignored = _tiff_series(tif, path, what)
            photometric = getattr(tif.pages[0], "photometric", None)
            resolution = _tiff_resolution(tif.pages[0])
            nodata = _tiff_nodata(tif.pages[0], path, what)
            georeference = _tiff_georeference(tif.pages[0])
            imagej = tuple((key, value) for key, value in (tif.imagej_metadata or {}).items() if key in IMAGEJ_KEPT) \
                if tif.is_imagej else None
            compression = getattr(getattr(tif.pages[0], "compression", None), "name", "")
            extrasamples = tuple(int(value) for value in getattr(tif.pages[0], "extrasamples", ()) or ())
            _check_tiff_pages(messages, count, path, what)  # and the tags of the pages read since
    except ImageError:
        raise
    except Exception as error:
        _check_tiff_pages(messages, count, path, what)  # the damage, rather than what it led to
        raise ImageError(f"cannot read {what} {str(path)!r} as TIFF: {_reason(error)}") from None
    # warned here, not in the try above: a warning made an error would read as a corrupt file
    for message in dict.fromkeys(messages):  # tifffile's other remarks on the file, each once
        if "GDAL_NODATA" in message:  # said by _tiff_nodata, with what it means here
            continue
        warnings.warn(f"{what} {str(path)!r}: tifffile: {message}", UserWarning, stacklevel=user_stacklevel())
    if ignored:
        warnings.warn(ignored, UserWarning, stacklevel=user_stacklevel())
    data = np.asarray(data)
    name = getattr(photometric, "name", str(photometric)).upper()
    if name == "YCBCR" and not compression.startswith("JPEG"):
        # tifffile turns YCbCr into RGB only when decoding JPEG; other YCbCr files come as raw Y, Cb, Cr
        raise ImageError(f"{what} {str(path)!r} is a TIFF of photometric YCBCR without JPEG compression (its samples "
                         "are Y, Cb, Cr, not RGB); convert it to RGB first")
    if photometric is not None and name not in ("MINISBLACK", "RGB", "YCBCR"):
        # a palette image holds colour-table indices, CMYK and Lab other colour spaces, and a
        # min-is-white one inverted grey: registered as they lie they were silently wrong
        holds = _PHOTOMETRIC.get(name, "not grey or RGB")
        raise ImageError(f"{what} {str(path)!r} is a TIFF of photometric {name} ({holds}); "
                         "convert it to grey or RGB first")
    photometric = "rgb" if name.endswith("RGB") or name == "YCBCR" else "minisblack"
    if "Y" not in axes or "X" not in axes or len(axes) != data.ndim:
        raise ImageError(f"{what} {str(path)!r} has axes {axes!r}; expected rows (Y) and columns (X)")
    channel_axes = [i for i, a in enumerate(axes) if a in "SC"]
    samples_only = [axes[i] for i in channel_axes] == ["S"]  # the channels are the page's samples
    if len(channel_axes) > 1:
        # e.g. ImageJ hyperstack with RGB samples per channel: fold them into one channel axis
        data = np.moveaxis(data, channel_axes, list(range(data.ndim - len(channel_axes), data.ndim)))
        data = data.reshape(*data.shape[: data.ndim - len(channel_axes)], -1)
        axes = "".join(a for a in axes if a not in "SC") + "S"
        channel_axes = [len(axes) - 1]
    rest = [i for i, a in enumerate(axes) if a not in "YXSC"]
    sizes = tuple((axes[i], int(data.shape[i])) for i in rest)  # the frame axes, and their lengths
    frame_axes = sizes if imagej is not None else ()
    if frames:
        _warn_several_frame_axes(sizes, path, what)
    order = rest + [axes.index("Y"), axes.index("X")] + channel_axes
    data = np.transpose(data, order)
    count = int(np.prod([data.shape[i] for i in range(len(rest))], dtype=np.int64)) if rest else 1
    height, width = data.shape[len(rest)], data.shape[len(rest) + 1]
    channels = data.shape[-1] if channel_axes else 1
    data = data.reshape(count, height, width, channels)
    # alpha only where the page's own samples say so: grey or RGB and one extra sample tagged alpha
    # (an UNSPECIFIED one -- a second fluorescence channel -- or a hyperstack's C axis is not alpha)
    alpha = None
    if samples_only and len(extrasamples) == 1 and channels == (4 if photometric == "rgb" else 2):
        alpha = _TIFF_ALPHA.get(extrasamples[0])
    return data, ImageFormat(kind, data.dtype, bool(channel_axes), photometric if channel_axes else "minisblack",
                             alpha, extrasamples if samples_only else (), resolution, imagej or (), frame_axes,
                             nodata, georeference)


def _tiff_resolution(page) -> Optional[tuple[float, float, int]]:
    """``(x, y, unit)`` of a TIFF page's XResolution, YResolution and ResolutionUnit, or ``None``
    where it has none (or a value that is no positive finite number)."""
    tags = getattr(page, "tags", {})
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    try:
        x, y = (float(value) for value in page.resolution)
        unit = int(getattr(page, "resolutionunit", 2))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        return None
    return x, y, unit


def _tiff_nodata(page, path: Path, what: str) -> Optional[float]:
    """A TIFF page's ``GDAL_NODATA`` tag as a number (GDAL writes it as text: ``-9999``, ``nan``), or
    ``None`` where it has none; a tag that is no number is left out with a warning."""
    tag = getattr(page, "tags", {}).get(NODATA_TAG)
    if tag is None:
        return None
    text = str(tag.value).strip().strip("\x00").strip()
    try:
        return float(text)
    except ValueError:
        warnings.warn(f"{what} {str(path)!r}: its GDAL_NODATA tag {text!r} is not a number; no value marks "
                      "missing data (--nodata V names one)", UserWarning, stacklevel=user_stacklevel())
        return None


def _tiff_georeference(page) -> tuple[tuple[int, int, Any], ...]:
    """A TIFF page's GeoTIFF tags (:data:`GEOREFERENCE_TAGS`) as ``(code, TIFF type, value)``."""
    tags = getattr(page, "tags", {})
    return tuple((code, int(tags[code].dtype), tags[code].value) for code in GEOREFERENCE_TAGS if code in tags)


def _tiff_tags(image_format: ImageFormat) -> list[tuple]:
    """tifffile's ``extratags`` for ``image_format``'s GeoTIFF tags and no-data value (first page only)."""
    tags = []
    for code, kind, value in image_format.georeference:
        if isinstance(value, (bytes, str)):
            tags.append((code, kind, 0, value, True))
        else:
            values = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else (value,)
            tags.append((code, kind, len(values), values, True))
    if image_format.nodata is not None:
        tags.append((NODATA_TAG, 2, 0, nodata_text(image_format.nodata), True))
    return tags


def nodata_text(value: float) -> str:
    """A no-data value as GDAL writes its ``GDAL_NODATA`` tag: ``nan``, ``-9999`` (a whole number
    without a point), else the shortest text that reads back to the same double."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if value == int(value) and abs(value) < 2 ** 53 else repr(float(value))


#: tifffile's letters of the axes other than rows, columns and channels, as a warning names them.
_FRAME_AXES = {"T": "time", "Z": "depth", "Q": "images", "I": "images", "R": "tiles", "E": "lambda"}


def _warn_several_frame_axes(sizes: Sequence[tuple[str, int]], path: Path, what: str) -> None:
    """Warn where more than one axis of ``sizes`` (letter, length) beyond rows, columns and channels
    has more than one plane: they are all read as frames, one after the other (an ImageJ ``TZCYX``
    hyperstack of 4 time points and 3 planes became 12 frames, each registered on its own and written
    without its T and Z, with no word; a microscopy audit)."""
    several = [(letter, size) for letter, size in sizes if size > 1]
    if len(several) < 2:
        return
    named = " x ".join(f"{letter} ({_FRAME_AXES.get(letter, 'unnamed')}) {size}" for letter, size in several)
    count = math.prod(size for _, size in several)
    index = " + ".join(
        [f"{letter.lower()} x {math.prod(size for _, size in several[k + 1:])}" for k, (letter, _) in
         enumerate(several[:-1])] + [several[-1][0].lower()])
    warnings.warn(f"{what} {str(path)!r}: its axes {named} are all read as frames, {count} in all (frame {index}), "
                  "each registered on its own (a TIFF output gets the axes back as an ImageJ hyperstack). tireg "
                  "aligns 2-D frames: "
                  "for one transform per time point, align a projection over Z (one plane per time point) and "
                  "apply its CSV to each Z plane's own stack", UserWarning, stacklevel=user_stacklevel())


#: The alpha of a TIFF's ExtraSamples value (1: ASSOCALPHA, 2: UNASSALPHA; 0, UNSPECIFIED, is not alpha).
_TIFF_ALPHA = {1: "associated", 2: "unassociated"}


def _tiff_series(tif, path: Path, what: str) -> tuple[np.ndarray, str, str]:
    """The frames of a TIFF as ``(data, axes, warning)``; ``warning`` is ``""`` unless pages were left out.

    tifffile splits a file into series: the images of an OME-TIFF, each write appended by tifffile,
    or, for a file written page by page (Pillow), the pages grouped by kind (size, dtype), not by
    order. So:

    * one series, or series all of one shape and axes: the series (stacked, each keeping its axes:
      the channels of an OME-TIFF's images stay channels);
    * series that differ but pages all of one size (e.g. pages of two dtypes): every page a frame,
      in page order;
    * the first series (with the series of its shape that follow it) and then only pages smaller
      than its frames -- a thumbnail, a label or macro image: the first series, and a warning naming
      how many pages were left out;
    * anything else -- a page of another size or channel count among the frames, a larger or
      turned page after them -- is refused: reading the first series would silently lose frames
      (and shift the labels of the others), or keep a thumbnail and drop the data.

    Reduced-resolution pages (NewSubfileType 1: thumbnails, pyramid levels) are never frames.
    """
    series = tif.series
    first = series[0]
    if len(series) == 1:
        return first.asarray(), first.axes, ""
    if all((s.shape, s.axes) == (first.shape, first.axes) for s in series):  # e.g. several OME images
        return np.stack([s.asarray() for s in series]), "Q" + first.axes, ""
    pages = [page for page in tif.pages if not getattr(page, "is_reduced", False)] or list(tif.pages)
    page0 = pages[0]
    if all((page.shape, page.axes) == (page0.shape, page0.axes) for page in pages):
        if any("C" in s.axes for s in series):  # images of different channel counts: channels are not frames
            shapes = ", ".join(f"series {k} is {s.shape} {s.axes}" for k, s in enumerate(series[:3]))
            raise ImageError(f"{what} {str(path)!r} holds images of different shapes ({shapes}); tireg reads "
                             "the images of a TIFF as frames of one shape")
        return np.stack([page.asarray() for page in pages]), "Q" + page0.axes, ""
    # the first series and the series of its shape and axes that follow it are the frames
    count = 1
    while count < len(series) and (series[count].shape, series[count].axes) == (first.shape, first.axes):
        count += 1
    frames = [page.index for s in series[:count] for page in s.pages if page is not None]
    last = max(frames, default=-1)
    taken = set(frames)
    rest = [page for page in pages if page.index not in taken]
    size = _yx(page0)
    # left out only if smaller than the frames (a thumbnail, a label): a larger or turned page after
    # small ones is data (an 8 x 10 page, then two of 32 x 40, gave the 8 x 10 page 'as the frames')
    if any(page.index < last or not _smaller(_yx(page), size) for page in rest):
        odd = next(page for page in pages if (page.shape, page.axes) != (page0.shape, page0.axes))
        raise ImageError(
            f"{what} {str(path)!r} has pages of different sizes: page {odd.index} is {_page_size(odd)}, "
            f"page {page0.index} is {_page_size(page0)}; tireg reads the pages of a TIFF as frames of one size"
        )
    data = first.asarray() if count == 1 else np.stack([s.asarray() for s in series[:count]])
    axes = first.axes if count == 1 else "Q" + first.axes
    if not rest:
        return data, axes, ""
    several = f"{len(rest)} trailing pages of other sizes" if len(rest) > 1 else "1 trailing page of another size"
    ignored = (f"{what} {str(path)!r}: ignored {several} than its frames ({_page_size(page0)}), taken for a "
               f"thumbnail, label or macro image: page {rest[0].index} is {_page_size(rest[0])}")
    return data, axes, ignored


def _smaller(size: tuple, frame: tuple) -> bool:
    """Whether a ``(height, width)`` fits inside the frames' and is not theirs."""
    return size != frame and all(a is not None and b is not None and a <= b for a, b in zip(size, frame))


def _yx(page) -> tuple:
    """``(height, width)`` of a TIFF page."""
    size = dict(zip(page.axes, page.shape))
    return size.get("Y"), size.get("X")


def _page_size(page) -> str:
    """``'48 x 48'`` or ``'48 x 48 with 3 samples'`` (W x H) of a TIFF page."""
    size = dict(zip(page.axes, page.shape))
    samples = size.get("S", 1)
    return f"{size.get('X')} x {size.get('Y')}" + (f" with {samples} samples" if samples > 1 else "")


def _read_npy(path: Path, kind: str, what: str, frames: bool) -> tuple[np.ndarray, ImageFormat]:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:
        raise ImageError(f"cannot read {what} {str(path)!r} as a NumPy .npy file: {_reason(error)}") from None
    if not isinstance(array, np.ndarray):
        raise ImageError(f"{what} {str(path)!r} holds no array")
    if array.ndim == 2:
        return array[None, :, :, None], ImageFormat(kind, array.dtype, False)
    if array.ndim == 3 and frames:
        return array[..., None], ImageFormat(kind, array.dtype, False)
    if array.ndim == 3 and array.shape[-1] <= 4:
        return array[None], ImageFormat(kind, array.dtype, True)
    if array.ndim == 4 and frames:
        return array, ImageFormat(kind, array.dtype, True)
    expected = "(N, H, W) or (N, H, W, C)" if frames else "(H, W) or (H, W, C) with C <= 4"
    # 'tireg apply' of an (N, H, W) .npy was told to use 'tireg stack', which aligns, not applies
    hint = "" if frames else (" (for a stack of frames use 'tireg stack'; 'tireg apply' resamples a stack saved "
                              "as a multi-page TIFF)")
    raise ImageError(f"{what} {str(path)!r} has shape {array.shape}; expected {expected}{hint}")


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, or its type name.  Lines end at ``\n``, ``\r\n`` or
    ``\r`` only: ``str.splitlines()`` also cut at a form feed or U+2028, which a file's name may hold."""
    text = str(error).strip()
    return re.split(r"\r\n|\r|\n", text)[0] if text else type(error).__name__


def _natural_key(name: str) -> tuple:
    """``frame2`` before ``frame10``; names equal but for case (or leading zeros) by the name itself,
    ``A.png`` before ``a.png`` (they were in the order the folder listed them: not the same on every
    machine)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)], name


def read_stack(path: PathLike, *, what: str = "stack") -> ImageData:
    """Frames of a multi-page TIFF, a ``(N, H, W[, C])`` ``.npy`` array, or a folder of images.

    A folder's files with a supported suffix are read in natural order
    (``2.png`` before ``10.png``, ``A.png`` before ``a.png``; hidden files skipped); they must share
    size and channel count.
    """
    path = as_path(path, "read_stack()")
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {str(path)!r} ({what})")
    if not path.is_dir():
        return read_image(path, what=what, frames=True)
    files = sorted(
        (p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise ImageError(f"folder {str(path)!r} holds no images ({_SUPPORTED})")
    frames, names, formats = [], [], []
    first: Optional[ImageData] = None
    for file in files:
        # messages read "{what} {path!r}": "stack 'frames', frame 'frames/0.png' is ..." (the stack was named
        # as its frame's path: "frame '0.png' of stack 'frames/0.png'")
        image = read_image(file, what=f"{what} {str(path)!r}, frame")
        if image.count != 1:
            raise ImageError(f"{str(file)!r} has {image.count} pages; a folder of images must hold single images")
        if first is None:
            first = image
        elif image.frames.shape[1:] != first.frames.shape[1:]:
            what_differs = "size" if image.size != first.size else "channels"
            raise ImageError(
                f"frames differ in {what_differs}: {file.name!r} is {image.describe()} but {first.path.name!r} is "
                f"{first.describe()}"
            )
        frames.append(image.frames[0])
        names.append(file.name)
        formats.append(image.format)
    dtype = np.result_type(*[f.dtype for f in formats])
    stacked = np.stack([frame.astype(dtype, copy=False) for frame in frames])
    return ImageData(stacked, replace(formats[0], dtype=dtype), path, names, formats)


# ----------------------------------------------------------------------------
# writing


def _check_writable(kind: str, frames: np.ndarray, image_format: ImageFormat, path: Path) -> None:
    """:class:`ImageError` if ``kind`` cannot hold these frames exactly as asked."""
    # in native byte order: a big-endian '>u2' is 16 bits for PNG too (refused as not uint16)
    dtype, count, channels = np.dtype(image_format.dtype).newbyteorder("="), frames.shape[0], frames.shape[-1]
    if kind in ("png", "jpeg") and count != 1:
        raise ImageError(
            f"{kind.upper()} holds one image, not {count} frames ({str(path)!r}); write .tif or .npy"
        )
    if kind == "png":
        if not (dtype == np.uint8 or (dtype == np.uint16 and channels == 1) or dtype == np.bool_):
            raise ImageError(
                f"PNG cannot hold {channels}-channel {dtype} pixels ({str(path)!r}): it holds 8-bit images "
                "and 16-bit grey; write .tif or .npy to keep the bit depth"
            )
        if channels not in (1, 2, 3, 4):
            raise ImageError(f"PNG cannot hold {channels} channels ({str(path)!r}); write .tif or .npy")
        if _last_channel_not_alpha(image_format, channels):
            raise ImageError(
                f"PNG would store the last of these {channels} channels as alpha ({str(path)!r}), and the TIFF "
                "they come from does not tag it alpha (an infrared or a second fluorescence band); write .tif "
                "or .npy"
            )
    if kind == "jpeg":
        if dtype != np.uint8:
            # PNG holds whole numbers of 8 and 16 bits only: float pixels sent there were refused again
            other = ".png, .tif or .npy" if dtype == np.uint16 else ".tif or .npy"
            raise ImageError(f"JPEG holds 8-bit images, not {dtype} ({str(path)!r}); write {other}")
        if channels not in (1, 3):
            other = ".tif or .npy" if _last_channel_not_alpha(image_format, channels) else ".png or .tif"
            raise ImageError(f"JPEG holds grey or RGB, not {channels} channels ({str(path)!r}); write {other}")


def _last_channel_not_alpha(image_format: ImageFormat, channels: int) -> bool:
    """Whether 2 or 4 channels read from a TIFF (``photometric`` set) end with a sample it did not tag
    alpha: PNG, which holds grey + alpha and RGBA only, would make it alpha."""
    return channels in (2, 4) and image_format.alpha is None and image_format.photometric is not None


def check_writable(path: PathLike, frames_shape: Sequence[int], image_format: ImageFormat) -> str:
    """The format kind for ``path``; :class:`ImageError` now (before any work) if it cannot hold the result."""
    path = Path(os.fspath(path))
    kind = format_for_path(path, what="output")
    _check_writable(kind, np.empty((frames_shape[0], 0, 0, frames_shape[-1])), image_format, path)
    return kind


def write_frames(path: PathLike, frames: np.ndarray, image_format: ImageFormat) -> Path:
    """Write ``(N, H, W, C)`` frames to ``path`` as ``image_format`` says; the suffix picks the file format.

    Float frames are converted to ``image_format.dtype`` (:func:`convert_dtype`).
    Associated (premultiplied) alpha written to a PNG, whose alpha is straight, has its colour
    divided by alpha first (:func:`unpremultiply`); a TIFF keeps it premultiplied, tagged so.
    Grey is written without a channel axis, except to an ``.npy`` where ``image_format.channel_axis``;
    ``N = 1`` without a frame axis.  Written atomically (:func:`atomic_path`).

    Raises:
        ImageError: before anything is written, naming ``path``: an unsupported
            suffix, NaN (where it is not the no-data value), Inf or complex values, no pixels, values beyond the
            range of a float ``image_format.dtype``, or frames the format
            cannot hold.
        ValueError: ``frames`` not 4-D (a caller's mistake, not the file's).
        OSError: a destination that cannot be written (:func:`atomic_path`).
    """
    path = as_path(path, "write_frames()")
    _check_format_type(image_format, "write_frames()")
    kind = format_for_path(path, what="output")
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"write_frames(): 'frames' must be (N, H, W, C); got shape {frames.shape}")
    nan_marks_nodata = image_format.nodata is not None and math.isnan(image_format.nodata)
    _check_values(frames, path, nan_marks_nodata)
    _check_writable(kind, frames, image_format, path)
    if image_format.alpha == "associated" and kind in _STRAIGHT_ALPHA and frames.shape[-1] in (2, 4):
        frames = unpremultiply(frames, image_format.dtype)  # float64: rounded and clipped below
    with np.errstate(over="ignore"):  # reported below, naming the file
        data = convert_dtype(frames, image_format.dtype) if frames.dtype != image_format.dtype else frames
    if data is not frames and data.dtype.kind == "f" and not _finite(data, nan_marks_nodata).all():
        raise ImageError(f"cannot write {str(path)!r}: the image holds values beyond the range of {data.dtype} "
                         f"(+-{np.finfo(data.dtype).max:.4g}); write a wider float type")
    if kind in ("png", "jpeg") and not data.dtype.isnative:  # Pillow takes native byte order only
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype == np.bool_ and not (kind == "npy" or (kind in ("png", "tiff") and frames.shape[-1] == 1)):
        # 1-bit grey stays 1-bit in PNG and TIFF (imageio and tifffile write bool so); 1-bit grey +
        # alpha or colour, which PNG does not hold, as 8 bits: 0 and 255
        data = data.astype(np.uint8) * 255
    hyperstack = _imagej_hyperstack(data, image_format) if kind == "tiff" else None
    imagej = None
    if hyperstack is not None:  # arranged as ImageJ's axes say
        data, imagej = hyperstack
    else:
        if data.shape[-1] == 1 and (kind != "npy" or not image_format.channel_axis):
            # grey: PNG and JPEG take it as (H, W) only, TIFF as one sample a pixel; an .npy keeps its
            # channel axis where the input had one
            data = data[..., 0]
        if data.shape[0] == 1:
            data = data[0]
    with atomic_path(path) as temporary, errors_named_by(path):
        _write_data(temporary, data, kind, frames.shape[-1], image_format, path.suffix.lower(), imagej)
    return path


@contextlib.contextmanager
def errors_named_by(path: PathLike) -> Iterator[None]:
    """An ``OSError`` inside is raised again naming ``path``, the output it was writing (its cause
    kept): a full disk said "294912 requested and 102272 written", or only "No space left on
    device", or named a temporary file; a short write says it may be a full disk."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno or 0, _os_reason(error), str(path)) from error


def _os_reason(error: OSError) -> str:
    """What went wrong, without the name of the file it went wrong on ("No space left on device")."""
    reason = error.strerror or str(error)
    if error.errno is None and "written" in reason:
        reason += " (a short write: is the disk full?)"
    return reason


def on_grid_of(image_format: ImageFormat, grid: ImageFormat) -> ImageFormat:
    """How to store an image of ``image_format`` resampled onto the pixels of an image of ``grid``
    (``register``'s warped moving image, on the fixed grid): its pixel size is ``grid``'s, the
    resolution and the ImageJ unit, where ``grid``'s file had them (and none where it had none:
    the moving image's would be wrong by the transform's scale); the rest is its own."""
    kept = tuple((key, value) for key, value in image_format.imagej if key != "unit")
    unit = tuple((key, value) for key, value in grid.imagej if key == "unit")
    return replace(image_format, resolution=grid.resolution, imagej=kept + unit if image_format.imagej else (),
                   georeference=grid.georeference)


#: The dtypes an ImageJ hyperstack holds (8 and 16 bits, 32-bit float); another is written as a plain TIFF.
IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def _imagej_hyperstack(frames: np.ndarray, image_format: ImageFormat) -> Optional[tuple[np.ndarray, dict]]:
    """``(array, metadata)`` to write ``(N, H, W, C)`` ``frames`` as the ImageJ hyperstack
    ``image_format`` was read from (:attr:`ImageFormat.imagej`), or ``None`` (not read from one, or
    a dtype or RGB samples ImageJ's hyperstack does not hold: written as a plain TIFF).

    The frames take the file's frame axes where their count is the same (``T`` 4 x ``Z`` 3 for 12
    frames), else ``T`` alone; its channels are the ``C`` axis.  Written as a plain TIFF of pages,
    Fiji opened the result as a sequence of images without its channels, planes or calibration.
    """
    if not image_format.imagej or frames.dtype not in IMAGEJ_DTYPES or image_format.photometric == "rgb":
        return None
    count, height, width, channels = frames.shape
    sizes = image_format.frame_axes
    if math.prod(size for _, size in sizes) != count or any(letter not in "TZ" for letter, _ in sizes):
        sizes = (("T", count),) if count > 1 else ()
    sizes = tuple((letter, size) for letter, size in sizes if size > 1)
    shape = tuple(size for _, size in sizes) + ((channels,) if channels > 1 else ()) + (height, width)
    array = np.moveaxis(frames, -1, 1).reshape(shape)  # (T, Z, C, Y, X): ImageJ's order
    axes = "".join(letter for letter, _ in sizes) + ("C" if channels > 1 else "") + "YX"
    return array, {"axes": axes, **dict(image_format.imagej)}


def _resolution_options(image_format: ImageFormat) -> dict:
    """tifffile's ``resolution`` and ``resolutionunit`` for the resolution read (nothing without one)."""
    if image_format.resolution is None:
        return {}
    x, y, unit = image_format.resolution
    return {"resolution": (x, y), "resolutionunit": unit}


def _write_data(temporary: Path, data: np.ndarray, kind: str, channels: int, image_format: ImageFormat,
                suffix: str, imagej: Optional[dict] = None) -> None:
    """Write ``data`` (as :func:`write_frames` shaped it) to ``temporary`` in the format ``kind``; with
    ``imagej`` (:func:`_imagej_hyperstack`'s metadata) as an ImageJ hyperstack."""
    if kind == "npy":
        with open(temporary, "wb") as handle:
            np.save(handle, np.ascontiguousarray(data), allow_pickle=False)
    elif kind == "tiff":
        tifffile = require("tifffile", "writing TIFF files")
        if imagej is not None:
            tifffile.imwrite(temporary, np.ascontiguousarray(data), imagej=True, metadata=imagej,
                             extratags=_tiff_tags(image_format), **_resolution_options(image_format))
            return
        has_channels = channels > 1  # one sample: no planarconfig (tifffile refused 'contig' for it)
        # an RGB TIFF stays RGB with extra samples (5 and more were written MINISBLACK); from PNG, JPEG
        # or .npy (photometric None) 3 or 4 channels are RGB
        rgb = has_channels and (channels >= 3 if image_format.photometric == "rgb"
                                else channels in (3, 4) and image_format.photometric is None)
        options = dict(photometric="rgb" if rgb else "minisblack")
        if has_channels:
            options["planarconfig"] = "contig"
        extra = channels - (3 if rgb else 1)
        if image_format.alpha is not None and channels == (4 if rgb else 2):
            # tifffile tags a second grey sample UNSPECIFIED (Pillow then opened grey + alpha as plain
            # grey) and a fourth RGB one UNASSALPHA (premultiplied alpha lost that)
            options["extrasamples"] = [next(value for value, alpha in _TIFF_ALPHA.items()
                                            if alpha == image_format.alpha)]
        elif image_format.photometric is not None and extra > 0:
            # a TIFF's extra samples keep their tags as read: an untagged fourth RGB sample (near
            # infrared) is not tifffile's UNASSALPHA, and an alpha among several extra samples, which
            # is warped as a plain channel, stays alpha (it was written UNSPECIFIED); four channels
            # from a file that says nothing (.npy) are RGBA
            read = image_format.extrasamples
            options["extrasamples"] = list(read) if len(read) == extra else [0] * extra
        tifffile.imwrite(temporary, np.ascontiguousarray(data), **options, extratags=_tiff_tags(image_format),
                         **_resolution_options(image_format))
    else:
        iio = require("imageio.v3", f"writing {kind.upper()} files")
        extra = {"quality": 95} if kind == "jpeg" else {}
        iio.imwrite(temporary, np.ascontiguousarray(data), extension=suffix, **extra)


#: The formats whose alpha is straight (unassociated): premultiplied colour is divided by alpha for them.
_STRAIGHT_ALPHA = ("png",)


def _full_scale(dtype: np.dtype) -> float:
    """The value of full coverage (alpha 1) in ``dtype``: its largest integer, or 1 for floats and bool."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def unpremultiply(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``(..., C)`` frames of associated (premultiplied) alpha, last channel, in the scale of ``dtype``
    as straight alpha: colour ``* full scale / alpha``, float64 (0 where alpha is 0; a colour above
    its alpha, which premultiplied data cannot hold, comes out above full scale and is clipped by
    :func:`convert_dtype`)."""
    values = np.array(frames, dtype=np.float64)
    alpha = values[..., -1:]
    covered = alpha > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        colour = values[..., :-1] * _full_scale(dtype) / np.where(covered, alpha, 1.0)
    values[..., :-1] = np.where(covered, colour, 0.0)
    return values


def premultiply(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``(..., C)`` frames of straight (unassociated) alpha, last channel, in the scale of ``dtype``
    as associated (premultiplied) alpha: colour ``* alpha / full scale``, float64
    (:func:`unpremultiply`'s inverse)."""
    values = np.array(frames, dtype=np.float64)
    values[..., :-1] *= values[..., -1:] / _full_scale(dtype)
    return values


def _finite(values: np.ndarray, nan_marks_nodata: bool = False) -> np.ndarray:
    """Where float ``values`` are finite, or NaN where NaN is the no-data value."""
    return np.isfinite(values) | np.isnan(values) if nan_marks_nodata else np.isfinite(values)


def _check_values(frames: np.ndarray, path: Path, nan_marks_nodata: bool = False) -> None:
    """:class:`ImageError` for frames that no file holds as they are (a cast hid these: NaN became 0,
    Inf the type's end, complex its real part; an empty array made an unreadable file); NaN is
    written where it is the no-data value (:attr:`ImageFormat.nodata`)."""
    if frames.dtype.kind == "c":
        raise ImageError(f"cannot write {str(path)!r}: the image holds complex values; write their real part "
                         "or magnitude")
    if frames.dtype.kind not in "biuf":
        raise ImageError(f"cannot write {str(path)!r}: the image holds values of type {frames.dtype}; "
                         "expected integers or floats")
    count, height, width, channels = frames.shape
    if frames.size == 0:
        raise ImageError(f"cannot write {str(path)!r}: the image is empty ({width} x {height} pixels, "
                         f"{channels} channel(s), {count} frame(s))")
    if frames.dtype.kind == "f" and not _finite(frames, nan_marks_nodata).all():
        raise ImageError(f"cannot write {str(path)!r}: the image holds "
                         f"{'Inf' if nan_marks_nodata else 'NaN or Inf'} values")


def _check_format_type(image_format: object, caller: str) -> None:
    """A ``TypeError`` naming ``'image_format'`` unless it is an :class:`ImageFormat` (``None`` had
    failed on its first attribute read, ``'NoneType' object has no attribute 'dtype'``)."""
    if not isinstance(image_format, ImageFormat):
        raise TypeError(f"{caller}: 'image_format' must be a tireg.io.ImageFormat (read_image's, or made with "
                        f"ImageFormat(...)); got {type(image_format).__name__}")


def write_image(path: PathLike, image: np.ndarray, image_format: ImageFormat) -> Path:
    """Write one ``(H, W, C)`` image (see :func:`write_frames`)."""
    path = as_path(path, "write_image()")
    _check_format_type(image_format, "write_image()")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"write_image(): 'image' must be (H, W, C); got shape {image.shape}")
    return write_frames(path, image[None], image_format)


# ----------------------------------------------------------------------------
# atomic outputs


def _temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` that keeps its suffix (writers may choose the format by it).

    Its length does not grow with ``path``'s name: the name of a file that may be written can be
    as long as the file system allows (the stem with 14 characters added was too long).
    """
    return path.parent / f".tireg-{secrets.token_hex(4)}.tmp{path.suffix}"


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder`` takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return 255


def _check_destination(path: Path, prefix: str = "", *, folder: bool = False) -> None:
    """Raise, naming ``path``, for a destination that the final move would refuse naming a temporary file.

    A parent that is a file, a name too long, an existing folder at ``path`` (unless ``folder``), or an
    existing file at ``path`` where a folder goes (``folder``: ``--force`` does not turn a file into a folder).
    """
    nearest = next((parent for parent in path.parents if parent.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise NotADirectoryError(f"{prefix}cannot write {str(path)!r}: {str(nearest)!r} is a file, not a folder")
    limit = _name_max(nearest or Path("."))
    length = len(os.fsencode(path.name))
    if length > limit:  # checked before is_dir(), which raises on such a name
        raise OSError(f"{prefix}cannot write {str(path)!r}: its name is {length} bytes long, the file system "
                      f"takes at most {limit}")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{prefix}cannot write {str(path)!r}: it is a folder")
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{prefix}cannot write the folder {str(path)!r}: it is a file")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = True, caller: str = "") -> Iterator[Path]:
    """A temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    ``with atomic_path("out.png") as tmp: write(tmp)``: nothing named
    ``out.png`` exists until the write has finished, and a failed write
    leaves neither ``out.png`` nor the temporary file.  With
    ``overwrite=False`` an existing ``path`` (even one that appears during
    the write) is not replaced: ``FileExistsError``.  ``caller`` prefixes
    the error messages.

    Replacing a file writes as ``open(path, "w")`` would (SimpleITK,
    ``np.save``): through a symbolic link (:func:`_through_links`; the
    link stays a link), keeping the file's permission bits, and not at all
    where the user may not write the file (``PermissionError``, as for a
    folder that takes no new files).

    Raises, naming ``path``, before the temporary is handed out:
    ``IsADirectoryError`` (``path`` is a folder), ``NotADirectoryError`` (a
    parent is a file), ``FileNotFoundError`` (no such folder), ``OSError``
    (a name longer than the file system takes), ``PermissionError`` (a
    folder that does not take new files).  An ``OSError`` while writing or
    moving the temporary is raised again as ``cannot write 'path': why``
    (same type and ``errno``, the original as its cause) unless it names
    ``path`` already.
    """
    path = Path(os.fspath(path))
    prefix = f"{caller}: " if caller else ""
    _check_destination(path, prefix)
    # overwrite=False: a link, even one to nothing, is a file that exists (os.link refuses it)
    target = _through_links(path, prefix) if overwrite else path
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{prefix}folder {str(target.parent)!r} does not exist (for {str(path)!r})")
    # before the work, in the CLI's words (OutputFiles.check); else the write failed naming the
    # temporary, ".tireg-1f2e3d4c.tmp.tfm", and neither the file asked for nor the caller
    _check_writable_file(path, target.parent, target, prefix, replace=overwrite)
    temporary = _temporary_name(target)
    try:
        try:
            yield temporary
            if overwrite:
                _keep_mode(temporary, target)
                os.replace(temporary, target)
            else:
                _move_no_clobber(temporary, path, prefix)
        except OSError as error:  # as root, or a read-only file system: os.access said yes
            if str(temporary) not in str(error) and str(path) in str(error):  # errors_named_by's, ours
                raise
            raise _named(error, path, prefix) from error
    except BaseException:
        _remove(temporary)
        raise


def _through_links(path: Path, prefix: str = "") -> Path:
    """The file that writing ``path`` writes: ``path``, or the file its symbolic link(s) end at (created
    if the link dangles).  ``os.replace`` onto the link itself had turned it into a plain file and left
    its target as it was; ``open()``, SimpleITK and ``np.save`` write through it."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # a loop: realpath stops on it (os.replace would replace that link)
        raise OSError(f"{prefix}cannot write {str(path)!r}: too many levels of symbolic links")
    if not target.is_dir():  # a folder: the caller's to judge (a folder output merges into one)
        _check_destination(target, prefix)  # a name under a file, or too long
    return target


def _check_writable_file(path: Path, folder: Path, target: Path, prefix: str = "", *, replace: bool = True) -> None:
    """``PermissionError`` naming ``path`` where ``target`` (:func:`_through_links`'s) cannot be written:
    ``folder`` (its own, or the nearest that exists) takes no new files, or (``replace``) it is a file
    the user may not write (it had been replaced silently, and made writable).  As root, who may write
    anything, ``os.access`` says yes: the file is replaced, its mode kept (:func:`_keep_mode`)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{prefix}cannot write {str(path)!r}: the folder {str(folder)!r} is not writable")
    if replace and target.is_file() and not os.access(target, os.W_OK):
        which = "it" if target == path else f"the file it links to, {str(target)!r},"
        raise PermissionError(f"{prefix}cannot write {str(path)!r}: {which} is not writable "
                              f"({stat.filemode(target.stat().st_mode)}); make it writable or remove it first")


def _keep_mode(new: Path, old: Path) -> None:
    """Give ``new`` the permission bits of the file ``old`` that it replaces (none: the defaults stay);
    replacing it had lost them (a private 0o600 file became 0o644, a read-only one writable)."""
    try:
        mode = os.stat(old).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) and not new.is_dir():
        os.chmod(new, stat.S_IMODE(mode) & 0o777)  # not set-user-ID: a write clears that too


def _named(error: OSError, path: Path, prefix: str) -> OSError:
    """``error`` as ``{prefix}cannot write 'path': why``, of its type and ``errno``."""
    message = f"{prefix}cannot write {str(path)!r}: {_os_reason(error)}"
    try:
        named = type(error)(message)
    except Exception:  # a subclass that takes other arguments
        named = OSError(message)
    named.errno = error.errno  # a message of its own: str() stays the message (no strerror)
    return named


def _move_no_clobber(temporary: Path, path: Path, prefix: str) -> None:
    """Move ``temporary`` to ``path`` unless ``path`` exists (atomically where hard links work)."""
    message = f"{prefix}{str(path)!r} already exists; pass overwrite=True to replace it"
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise FileExistsError(message) from None
    except OSError:  # no hard links on this file system: check, then replace
        if path.exists():
            raise FileExistsError(message) from None
        os.replace(temporary, path)
        return
    os.unlink(temporary)


def _backup_name(path: Path) -> Path:
    """A hidden name beside ``path`` to keep the file it replaces under until every output is in place."""
    return path.parent / f".tireg-{secrets.token_hex(4)}.old{path.suffix}"


def _put_back(placed: Sequence[tuple[Path, Path]], backups: Sequence[tuple[Path, Path]]) -> None:
    """Undo a commit part-way: remove the new files moved into place and move each backup back.

    Both lists name a move before it is made: a destination is removed only where its new file
    has left its temporary name (else what is there is not this command's), and a backup is
    moved back only where it was made."""
    for source, path in reversed(placed):
        if os.path.lexists(path) and not os.path.lexists(source):
            try:
                _remove(path)
            except OSError:
                pass
    for backup, path in reversed(backups):
        if os.path.lexists(backup):
            try:
                os.replace(backup, path)
            except OSError as error:  # the old file is not lost: say where it is
                warnings.warn(f"could not put back {str(path)!r} ({error.strerror or error}); its previous "
                              f"content is in {str(backup)!r}", stacklevel=user_stacklevel())


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


class OutputExistsError(FileExistsError):
    """An output exists and ``--force`` was not given."""


class OutputFiles:
    """A set of outputs written under temporary names and moved into place together.

    ``check()`` refuses existing outputs (unless ``force``) before any work;
    ``temporary(path)`` gives the name to write to (creating missing folders);
    ``commit()`` moves every output into place, all or none (the files replaced
    are kept aside until every move succeeded); ``discard()`` (also on an
    exception inside ``with``) removes the temporary files and the folders it
    created.  A command that fails therefore leaves no output behind.  ``written`` lists the
    outputs committed so far (a command interrupted after its commit says so, not "no output").
    """

    def __init__(self, *, force: bool = False) -> None:
        self.force = force
        self.written: list[Path] = []
        self._pending: list[tuple[Path, Path]] = []
        self._created: list[Path] = []
        self._merged: set[Path] = set()  # existing folders that take new files without --force
        self._names: dict[str, str] = {}  # temporary -> final path, kept after a discard for messages

    def __enter__(self) -> "OutputFiles":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.discard()
        elif self._pending:
            self.commit()

    def check(self, *paths: PathLike, folders: Sequence[PathLike] = (), exist_ok: Sequence[PathLike] = ()) -> None:
        """Raise if an output exists (without ``force``) or a parent that must be a folder is a file.

        ``folders`` are outputs that are folders; those also in ``exist_ok`` may exist already: the
        files written into them are merged, each refused if it exists (check them too) unless ``force``.
        """
        merged = {Path(path) for path in exist_ok if Path(path) in map(Path, folders)}
        for path in map(Path, paths):
            _check_destination(path, folder=path in map(Path, folders))
            if path in merged and path.is_dir():
                self._merged.add(path)
            elif path.exists() and not self.force:
                raise OutputExistsError(f"{str(path)!r} already exists; pass --force to overwrite it")
            # the nearest existing folder must take new files (else the write fails after the
            # work, naming a temporary file), and a file replaced must be one the user may write
            target = _through_links(path)
            folder = next((parent for parent in [target, *target.parents] if parent.is_dir()), Path("."))
            _check_writable_file(path, folder, target)

    def _make_folder(self, folder: Path) -> None:
        missing = []
        for parent in [folder, *folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        for parent in reversed(missing):
            parent.mkdir()
            self._created.append(parent)

    def temporary(self, path: PathLike) -> Path:
        """Where to write ``path`` now; it is moved to ``path`` by :meth:`commit`."""
        path = Path(os.fspath(path))
        self._make_folder(path.parent)
        # an existing folder takes its new files inside it (merged by commit()): its parent may not be
        # writable, where the temporary would otherwise go; a file, beside the file a link at path ends at
        temporary = path / _temporary_name(path).name if path.is_dir() else _temporary_name(_through_links(path))
        self._pending.append((temporary, path))
        self._names[str(temporary)] = str(path)  # a temporary folder's files go into path by name
        return temporary

    @contextlib.contextmanager
    def writing(self, path: PathLike) -> Iterator[Path]:
        """:meth:`temporary` for ``path``; an ``OSError`` while writing it is named by ``path``
        (:func:`errors_named_by`)."""
        path = Path(os.fspath(path))
        temporary = self.temporary(path)
        with errors_named_by(path):
            yield temporary

    def final_names(self, text: str) -> str:
        """``text`` (an error message) with each temporary name replaced by the output it stands for."""
        for temporary, path in sorted(self._names.items(), key=lambda item: -len(item[0])):
            text = text.replace(temporary, path)
        return text

    def commit(self) -> list[Path]:
        """Move every temporary output into place, all or none; returns the final paths.

        Every destination is checked before any output moves (one that appeared during the work
        moved the outputs before it, then stopped).  Then each existing destination is moved aside
        to a hidden backup name beside it, and the new files are moved in; if a move fails, or
        ``KeyboardInterrupt`` (or another ``BaseException``: SIGTERM as the command raises it)
        arrives on the way, the files moved in are removed, the backups are put back and every
        temporary output is removed (:meth:`discard`).  The backups are deleted only once every
        output is in place.  (Moved one at a time, a failure part-way left the outputs before it
        new and those after it old: a ``transform.json`` and a ``transform.tfm`` of two runs.)
        """
        created = set(self._created)  # folders made for this set's own outputs (a CSV inside a folder output)
        pending = [(temporary, path) for temporary, path in self._pending if temporary.exists()]
        backups: list[tuple[Path, Path]] = []  # (backup, destination): listed before the move, done or not
        placed: list[tuple[Path, Path]] = []  # (new file, destination): listed before the move, done or not
        try:
            moves = []
            for temporary, path in pending:
                merge = temporary.is_dir() and path.is_dir()
                if path.exists() and not self.force and path not in created and not (merge and path in self._merged):
                    raise OutputExistsError(f"{str(path)!r} already exists; pass --force to overwrite it")
                # A folder of outputs goes into the existing folder file by file: only the files
                # this command wrote replace their namesakes, and nothing else the folder holds
                # is touched (replacing the whole folder deleted the user's other files).
                items = [(item, path / item.name) for item in sorted(temporary.iterdir())] if merge \
                    else [(temporary, path)]
                # a file goes through a symbolic link, as atomic_path writes it (the link stays a link)
                items = [(source, target if source.is_dir() else _through_links(target)) for source, target in items]
                for source, target in items:  # a folder where a file goes: os.replace failed naming the temporary
                    if target.is_dir() and not source.is_dir():
                        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a folder")
                    if merge and path in self._merged and target.exists() and not self.force:
                        raise OutputExistsError(f"{str(target)!r} already exists; pass --force to overwrite it")
                moves.extend(items)
            for _, target in moves:
                if os.path.lexists(target):
                    backup = _backup_name(target)
                    backups.append((backup, target))
                    os.replace(target, backup)
            replaced = {target: backup for backup, target in backups}
            for source, target in moves:
                placed.append((source, target))
                if target in replaced:
                    _keep_mode(source, replaced[target])  # the file it replaces, moved aside just above
                os.replace(source, target)
            for temporary, path in pending:
                if temporary.is_dir() and path.is_dir() and temporary != path:
                    temporary.rmdir()  # a merged folder's temporary, emptied
        except BaseException:
            _put_back(placed, backups)
            self.discard()
            raise
        self.written.extend(path for _, path in pending)
        self._pending.clear()
        self._created.clear()
        self._merged.clear()
        for backup, _ in backups:  # every output is in place: the old ones go
            try:
                _remove(backup)
            except OSError:  # a hidden leftover, not a reason to call the command failed
                pass
        return [path for _, path in pending]

    def discard(self) -> None:
        """Remove every temporary output and the folders this set created."""
        for temporary, _ in self._pending:
            _remove(temporary)
        self._pending.clear()
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                pass
        self._created.clear()
