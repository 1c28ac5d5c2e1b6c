"""Accuracy and speed of tireg against the registration tools users would otherwise pick.

Every method registers the same pairs of 256 x 256 images cut from photographs
that scikit-image ships (no download), with seeded random transforms of each
kind, noise and a contrast change.  Per method and kind it prints the success
rate (mean grid error < 0.5 px), the failures (> 5 px), the median error and
the median CPU and wall-clock seconds per pair, as markdown tables.

Cases:
    A grey scene (at least 512 pixels on its shorter side; coins is enlarged
    to that) is the world, scaled so that its 1st and 99th percentiles are 0
    and 1.  ``fixed`` is a 256 x 256 crop of it at offset ``o``; ``moving`` is
    the scene sampled at ``o + A^-1 y`` on the same 256 x 256 grid (cubic
    spline, ``skimage.transform.warp``), so that ``moving(A x) = fixed(x)``
    with ``A`` the true fixed -> moving pixel matrix (asserted for every pair
    with ``tireg.warp``).  The crop offset is drawn so that the fixed crop and
    the moving image's footprint both lie inside the scene: every pixel of
    both images is real content.  Transforms (about the image centre
    ``c = (127.5, 127.5)``, ``A = [L | c + t - L c]``):

    * translation ``t``: 10-20 % of the image size, in a random direction (every kind);
    * rotation: +-(15..35) degrees (rigid, similarity, affine);
    * scale 0.85-1.15 (similarity, affine);
    * affine: ``L = s R(theta) (I + E)``, every entry of ``E`` in +-0.08.

    Both images get independent Gaussian noise (sigma 0.02 of the scene's
    range); the moving image gets a contrast change ``gain * m + offset``
    (gain 0.6-1.4, offset +-0.2) before its noise.  Case ``i`` of a kind uses
    scene ``i mod 8`` (camera, astronaut, coins, brick, gravel, moon, grass,
    immunohistochemistry); its random numbers come from ``(seed, kind, i)``,
    so every method sees identical pairs.

Contrast suite (``--suite contrast``; ``--suite all`` runs both):
    the same geometry generator (rigid, similarity, affine by default), but
    the moving image's intensities differ by more than gain and offset:
    ``invert`` (``1 - I``), ``gamma-0.4`` and ``gamma-2.5``
    (``clip(I, 0, 1) ** gamma``) on the eight grey scenes, and ``channel``:
    fixed from one channel, moving from another of the same shipped colour
    photograph (immunohistochemistry red -> blue, haematoxylin -> DAB and
    red -> DAB from ``skimage.color.rgb2hed``; astronaut, coffee, chelsea,
    rocket and hubble_deep_field red -> blue).  Noise as above, no gain / offset change;
    16 cases per kind and contrast type by default (two per scene), seeded
    by ``(seed, 10 + contrast, kind, i)``.  Methods by default: tireg with
    ``metric="mi"`` (Mattes mutual information), ``"nmi"`` (normalised MI),
    ``"ncc_any"`` (NCC of either sign) and ``"ncc"`` (NCC expecting a
    positive correlation), elastix with its default maps (Mattes MI),
    SimpleITK with Mattes MI (``simpleitk-mi``) and with its correlation
    metric (``simpleitk``: ITK's correlation is the negative *squared* NCC,
    so it accepts either sign), and ECC (which maximises a positive
    correlation).  kornia is left out: its registrator has no loss for
    changed contrast (L1 / L2 on intensities).

Error:
    the mean over all fixed pixels ``x`` of ``|A_est x - A_true x|`` in pixels
    (a homography is divided by its third coordinate).  Success: < 0.5 px;
    failure: > 5 px, or an exception (counted as an infinite error, its
    message recorded).

Methods (each result converted to tireg's fixed -> moving pixel matrix; see
each class's ``note`` for the exact configuration):
    tireg      ``tireg.register(fixed, moving, transform=kind)``, defaults.
    elastix    itk-elastix with ``GetDefaultParameterMap('translation' |
               'rigid' | 'affine')``; similarity: the default rigid map with
               ``Transform = SimilarityTransform``.
    simpleitk  ``ImageRegistrationMethod`` in the form of SimpleITK's
               notebooks: GEOMETRY initializer, correlation metric, regular
               step gradient descent with physical-shift scales, shrink
               factors (4, 2, 1), smoothing sigmas (2, 1, 0).
    ecc        OpenCV ``findTransformECCMultiScale`` (OpenCV's own pyramid,
               default ``ECCParameters``); MOTION_AFFINE for similarity.
    ecc-single OpenCV ``findTransformECC`` at full resolution, default criteria.
    kornia     ``kornia.geometry.ImageRegistrator`` with its defaults;
               'similarity' for rigid, 'homography' for affine.
    tireg-mi, tireg-nmi, tireg-ncc_any, tireg-ncc
               ``tireg.register(fixed, moving, transform=kind, metric=...)``
               with 'mi', 'nmi', 'ncc_any', 'ncc', other arguments default.
    simpleitk-mi
               as simpleitk, with ``SetMetricAsMattesMutualInformation(50)``
               and RANDOM sampling of 10 % (SimpleITK's
               ImageRegistrationMethod4 example), seeded.

Convention checks (always run first; ``--check`` runs only them): for every
method and kind, the converted matrix must agree with the peer's own reading
of its result (elastix: ``transformix_pointset``; SimpleITK:
``TransformPoint``; ECC: ``warpAffine(..., WARP_INVERSE_MAP)``; kornia: its
own warper, also after a known perturbation of its parameters), and every
method must recover the identity and a known pure shift within 0.5 px (the
direction fixed -> moving).  A method-kind pair that fails is reported as
"conversion unverified", never as merely inaccurate; missing an easy
rotation/scale/shear check case is reported as inaccuracy.

Timing: every library runs single-threaded by default (``--threads 1``; 0
keeps each library's default), so that the CPU time per pair is comparable
and robust to other load on a shared machine; both CPU and wall-clock
medians are printed.  Every method is warmed up before timing.

Run:
    python benchmarks/accuracy.py                      # full run, 32 cases per kind (~5 min on 2 cores)
    python benchmarks/accuracy.py --quick              # 1 case per kind, smoke test
    python benchmarks/accuracy.py --check              # convention checks only
    python benchmarks/accuracy.py --methods tireg ecc --kinds rigid --cases 16
    python benchmarks/accuracy.py --suite contrast     # contrast suite, 16 cases per kind and contrast (~10 min)
    python benchmarks/accuracy.py --suite contrast --contrasts invert channel --kinds rigid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Callable, Optional


def _threads_from_argv(argv: list[str]) -> str:
    for index, argument in enumerate(argv):
        if argument == "--threads" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--threads="):
            return argument.split("=", 1)[1]
    return "1"


if __name__ == "__main__" and _threads_from_argv(sys.argv) != "0":
    # before numpy and the peers load their thread pools: idle BLAS / OpenMP threads that spin after their work
    # would otherwise be counted in the next method's CPU time (and steal a core from it on a 2-core machine)
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                      "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[_variable] = _threads_from_argv(sys.argv)

import numpy as np  # noqa: E402

KINDS = ("translation", "rigid", "similarity", "affine")
SIZE = 256
CENTER = (SIZE - 1) / 2.0
SUCCESS_PX = 0.5
FAILURE_PX = 5.0
NOISE_SIGMA = 0.02
DEFAULT_SEED = 20260101

# ----------------------------------------------------------------------------
# scenes and cases


def _scenes() -> list[tuple[str, np.ndarray]]:
    """Grey float64 scenes (1st / 99th percentiles at 0 / 1), shorter side >= 512, from ``skimage.data`` (shipped)."""
    from skimage import color, data, transform

    def grey(image):
        """Luminance scaled so that its 1st and 99th percentiles are 0 and 1 (a robust range: no clipping)."""
        image = np.asarray(image)
        if image.ndim == 3:
            image = color.rgb2gray(image[..., :3])
        image = image.astype(np.float64)
        low, high = np.percentile(image, [1, 99])
        return (image - low) / (high - low)

    def at_least_512(image):
        short = min(image.shape)
        if short >= 512:
            return image
        factor = 512 / short
        shape = (max(512, round(image.shape[0] * factor)), max(512, round(image.shape[1] * factor)))
        return transform.resize(image, shape, order=3, anti_aliasing=False)

    names = ("camera", "astronaut", "coins", "brick", "gravel", "moon", "grass", "immunohistochemistry")
    return [(name, at_least_512(grey(getattr(data, name)()))) for name in names]


def rotation(theta: float) -> np.ndarray:
    """OpenCV's / tireg's rotation: ``[[cos, sin], [-sin, cos]]`` (y down, theta > 0 counter-clockwise on screen)."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, s], [-s, c]])


def about_center(linear: np.ndarray, shift: np.ndarray, center: float = CENTER) -> np.ndarray:
    """``A = [L | c + t - L c]``: ``L`` about the centre ``c``, then the shift ``t``."""
    c = np.array([center, center])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = c + shift - linear @ c
    return matrix


@dataclasses.dataclass
class Case:
    kind: str
    index: int
    scene: str
    truth: np.ndarray  # (3, 3) fixed -> moving pixels
    fixed: np.ndarray  # (256, 256) float32
    moving: np.ndarray
    description: str
    contrast: str = "gain-offset"  # the standard suite's linear change; else one of CONTRASTS


def random_truth(rng: np.random.Generator, kind: str, size: int = SIZE) -> tuple[np.ndarray, str]:
    """A random ``kind`` about the centre of a ``size``-pixel crop: shifts of 10-20 % of ``size``."""
    magnitude = rng.uniform(0.10, 0.20) * size
    direction = rng.uniform(0, 2 * math.pi)
    shift = magnitude * np.array([math.cos(direction), math.sin(direction)])
    angle = scale = 0.0
    linear = np.eye(2)
    extra = np.zeros((2, 2))
    if kind != "translation":
        angle = math.radians(rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 35.0))
    scale = rng.uniform(0.85, 1.15) if kind in ("similarity", "affine") else 1.0
    if kind == "affine":
        extra = rng.uniform(-0.08, 0.08, size=(2, 2))
    linear = scale * rotation(angle) @ (np.eye(2) + extra)
    text = f"t=({shift[0]:+.1f}, {shift[1]:+.1f}) px"
    if kind != "translation":
        text += f", angle {math.degrees(angle):+.1f} deg"
    if kind in ("similarity", "affine"):
        text += f", scale {scale:.3f}"
    if kind == "affine":
        text += f", E={np.round(extra, 3).tolist()}"
    return about_center(linear, shift, (size - 1) / 2.0), text


def make_pair(scene: np.ndarray, truth: np.ndarray, rng: np.random.Generator, *, contrast: bool = True,
              noise: float = NOISE_SIGMA, moving_scene: Optional[np.ndarray] = None,
              intensity: Optional[Callable[[np.ndarray], np.ndarray]] = None,
              size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``fixed`` = crop of ``scene``; ``moving(y)`` = scene at ``o + truth^-1 y``; noise and contrast added.

    ``moving_scene`` (same shape as ``scene``, e.g. another channel of the same photograph) is sampled for the
    moving image instead of ``scene``; ``intensity`` maps the moving image's clean intensities (inversion, gamma)
    before its noise.  Without them (the standard suite) the random numbers drawn are the same as before.
    """
    from skimage.transform import warp as sk_warp

    inverse = np.linalg.inv(truth)
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], float).T
    footprint = (inverse @ corners)[:2]  # moving image's corners, in crop coordinates
    low = np.minimum(footprint.min(axis=1), 0.0)
    high = np.maximum(footprint.max(axis=1), size - 1.0)
    margin = 3.0
    height, width = scene.shape
    room = np.array([width - 1.0, height - 1.0]) - margin - high  # offset o must satisfy margin - low <= o <= room
    if np.any(room < margin - low):
        raise RuntimeError("scene too small for this transform")
    offset = np.array([rng.uniform(margin - low[i], room[i]) for i in range(2)])
    crop = np.eye(3)
    crop[:2, 2] = offset
    fixed = sk_warp(scene, crop, output_shape=(size, size), order=3, mode="edge")
    source = scene if moving_scene is None else moving_scene
    moving = sk_warp(source, crop @ inverse, output_shape=(size, size), order=3, mode="edge")
    if moving_scene is None:
        check_construction(fixed, moving, truth)
    else:  # the geometry is checked on the moving channel's own crop (the channels differ in content)
        check_construction(sk_warp(source, crop, output_shape=(size, size), order=3, mode="edge"), moving, truth)
    if intensity is not None:
        moving = intensity(moving)
    if contrast:
        gain, bias = rng.uniform(0.6, 1.4), rng.uniform(-0.2, 0.2)
        moving = gain * moving + bias
    fixed = fixed + rng.normal(0.0, noise, fixed.shape)
    moving = moving + rng.normal(0.0, noise, moving.shape)
    return fixed.astype(np.float32), moving.astype(np.float32)


def make_cases(kinds, count: int, seed: int, size: int = SIZE) -> list[Case]:
    """``count`` cases of each kind, ``size`` pixels square.  Another size than 256 draws the same
    transforms (shifts in proportion) from the scenes resampled by ``size / 256`` (cubic), so that a
    512² case is its 256² namesake at twice the resolution."""
    scenes = _scenes()
    if size != SIZE:
        from skimage.transform import rescale

        scenes = [(name, rescale(scene, size / SIZE, order=3, anti_aliasing=size < SIZE)) for name, scene in scenes]
    cases = []
    for kind in kinds:
        for index in range(count):
            rng = np.random.default_rng([seed, KINDS.index(kind), index])
            name, scene = scenes[index % len(scenes)]
            truth, text = random_truth(rng, kind, size)
            fixed, moving = make_pair(scene, truth, rng, size=size)
            cases.append(Case(kind, index, name, truth, fixed, moving, text))
    return cases


# ----------------------------------------------------------------------------
# the contrast suite: inverted, gamma-changed and other-channel moving images

#: contrast types of the contrast suite (``--suite contrast``)
CONTRASTS = ("invert", "gamma-0.4", "gamma-2.5", "channel")
#: kinds of the contrast suite by default (translation can be selected with ``--kinds``)
CONTRAST_KINDS = ("rigid", "similarity", "affine")


def _robust_unit(image: np.ndarray) -> np.ndarray:
    """Scaled so that the 1st and 99th percentiles are 0 and 1."""
    image = np.asarray(image, np.float64)
    low, high = np.percentile(image, [1, 99])
    return (image - low) / (high - low)


def _channel_scenes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, fixed scene, moving scene)``: two channels of one shipped colour photograph, each at 1 / 99 %.

    Shorter side >= 512 (enlarged as in the standard suite).  RGB channel 0 (red) against channel 2 (blue), and
    for the immunohistochemistry slide also its colour-deconvolved stains (``skimage.color.rgb2hed``):
    haematoxylin against DAB (almost uncorrelated: nuclei against the stained protein) and red against DAB
    (negatively correlated: a stain's density is dark in the photograph).  Not retina: its red and blue channels
    are offset from each other by up to about 9 px (registering same-geometry crops from the identity, tireg's MI
    and NCC and elastix agree), so the geometric truth would not be the content's.  Inherent offsets that remain,
    measured the same way: coffee 0.2-0.4 px, rocket and stereo_motorcycle about 0.2 px, the others below 0.1 px.
    """
    from skimage import color, data, transform

    def at_least_512(image):
        short = min(image.shape[:2])
        if short >= 512:
            return image
        factor = 512 / short
        shape = (max(512, round(image.shape[0] * factor)), max(512, round(image.shape[1] * factor)))
        return transform.resize(image, shape, order=3, anti_aliasing=False)

    def rgb_pair(image, first=0, second=2):
        image = np.asarray(image)[..., :3].astype(np.float64)
        return at_least_512(_robust_unit(image[..., first])), at_least_512(_robust_unit(image[..., second]))

    ihc = data.immunohistochemistry()
    hed = color.rgb2hed(ihc)
    return [
        ("immunohistochemistry R->B", *rgb_pair(ihc)),
        ("immunohistochemistry H->DAB", _robust_unit(hed[..., 0]), _robust_unit(hed[..., 2])),
        ("astronaut R->B", *rgb_pair(data.astronaut())),
        ("coffee R->B", *rgb_pair(data.coffee())),
        ("immunohistochemistry R->DAB", _robust_unit(ihc[..., 0]), _robust_unit(hed[..., 2])),
        ("chelsea R->B", *rgb_pair(data.chelsea())),
        ("rocket R->B", *rgb_pair(data.rocket())),
        ("hubble_deep_field R->B", *rgb_pair(data.hubble_deep_field())),
    ]


def _intensity(contrast: str) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The moving image's intensity map of a contrast type (intensities at 1 / 99 % = 0 / 1)."""
    if contrast == "invert":
        return lambda image: 1.0 - image
    if contrast.startswith("gamma-"):
        gamma = float(contrast.split("-", 1)[1])
        return lambda image: np.clip(image, 0.0, 1.0) ** gamma
    return None


def make_contrast_cases(kinds, contrasts, count: int, seed: int) -> list[Case]:
    """Cases of the contrast suite: same geometry generator as the standard suite, other intensities.

    ``invert``: ``moving = 1 - I``; ``gamma-0.4`` / ``gamma-2.5``: ``moving = clip(I, 0, 1) ** gamma``, on the
    standard suite's eight grey scenes (case ``i`` uses scene ``i mod 8``); ``channel``: the fixed image from
    one channel and the moving image from another of the same colour photograph (``_channel_scenes``, case
    ``i`` uses pair ``i mod 8``).  No gain / offset change; noise as in the standard suite on both images.
    Random numbers from ``(seed, 10 + contrast, kind, i)``: every method sees identical pairs, and no case
    repeats a standard one.
    """
    grey = _scenes() if any(c != "channel" for c in contrasts) else []
    channels = _channel_scenes() if "channel" in contrasts else []
    cases = []
    for kind in kinds:
        for contrast in contrasts:
            for index in range(count):
                rng = np.random.default_rng([seed, 10 + CONTRASTS.index(contrast), KINDS.index(kind), index])
                truth, text = random_truth(rng, kind)
                if contrast == "channel":
                    name, scene, other = channels[index % len(channels)]
                    fixed, moving = make_pair(scene, truth, rng, contrast=False, moving_scene=other)
                else:
                    name, scene = grey[index % len(grey)]
                    fixed, moving = make_pair(scene, truth, rng, contrast=False, intensity=_intensity(contrast))
                cases.append(Case(kind, index, name, truth, fixed, moving, text, contrast))
    return cases


# ----------------------------------------------------------------------------
# error


_GRID = np.stack(np.meshgrid(np.arange(SIZE, dtype=float), np.arange(SIZE, dtype=float), indexing="xy"), -1)
_GRID_H = np.concatenate([_GRID.reshape(-1, 2), np.ones((SIZE * SIZE, 1))], axis=1)  # (N, 3) (x, y, 1)


def apply(matrix: np.ndarray, points_h: np.ndarray) -> np.ndarray:
    mapped = points_h @ np.asarray(matrix, float).T
    return mapped[:, :2] / mapped[:, 2:3]


def pixel_points(size: int) -> np.ndarray:
    """Every pixel of a ``size`` x ``size`` image as ``(x, y, 1)`` rows, ``(size^2, 3)``."""
    if size == SIZE:
        return _GRID_H
    x, y = np.meshgrid(np.arange(size, dtype=float), np.arange(size, dtype=float), indexing="xy")
    return np.stack([x.reshape(-1), y.reshape(-1), np.ones(size * size)], axis=1)


def grid_error(estimate: np.ndarray, truth: np.ndarray, size: int = SIZE) -> float:
    """Mean over all fixed pixels of ``|A_est x - A_true x|`` (pixels; a homography divided out;
    ``inf`` for a non-finite estimate)."""
    estimate = np.asarray(estimate, dtype=float)
    if estimate.shape != (3, 3) or not np.all(np.isfinite(estimate)):
        return math.inf
    points = pixel_points(size)
    difference = apply(estimate, points) - apply(truth, points)
    value = float(np.linalg.norm(difference, axis=1).mean())
    return value if math.isfinite(value) else math.inf


# ----------------------------------------------------------------------------
# methods: each returns (matrix fixed -> moving in pixels, native result for the conversion check)


class Method:
    name = ""
    kinds = KINDS
    note = ""

    def setup(self) -> None:
        """Import the package (not timed)."""

    def register(self, fixed: np.ndarray, moving: np.ndarray, kind: str):
        raise NotImplementedError

    def conversion_gap(self, fixed, moving, kind, matrix, native) -> float:
        """How far the converted matrix is from the peer's own reading of its result (pixels or intensity)."""
        return 0.0


def _interior(matrix: np.ndarray, margin: float = 3.0, size: int = SIZE) -> np.ndarray:
    """Fixed pixels whose image under ``matrix`` lies ``margin`` inside the moving image, ``(size, size)`` bool."""
    mapped = apply(matrix, pixel_points(size)).reshape(size, size, 2)
    return np.all((mapped >= margin) & (mapped <= size - 1 - margin), axis=-1)


def _tireg_warp(moving: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``moving(A x)`` on moving's grid: ``tireg.warp``, or for a homography (kornia's result for
    affine; tireg warps affine matrices only) OpenCV's ``warpPerspective`` of the same map."""
    import torch
    import tireg

    matrix = np.asarray(matrix, np.float64)
    if np.abs(matrix[2] - (0.0, 0.0, 1.0)).max() > 1e-9:
        import cv2

        height, width = np.shape(moving)
        return cv2.warpPerspective(np.asarray(moving, np.float64), matrix, (width, height),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    image = torch.from_numpy(np.asarray(moving, np.float64))[None, None]
    warped = tireg.warp(image, torch.from_numpy(np.asarray(matrix, np.float64)), size=tuple(image.shape[-2:]))
    return warped[0, 0].numpy()


class Tireg(Method):
    name = "tireg"
    note = "`tireg.register(fixed, moving, transform=kind)` with its defaults"

    def setup(self):
        import tireg  # noqa: F401

    def register(self, fixed, moving, kind):
        import tireg

        result = tireg.register(fixed, moving, transform=kind)
        return result.matrix.numpy(), result

    def conversion_gap(self, fixed, moving, kind, matrix, native):
        return float(np.abs(native.map_points(_GRID_H[:1000, :2]).numpy() - apply(matrix, _GRID_H[:1000])).max())


class TiregMetric(Tireg):
    """tireg with a metric for changed contrast: ``register(fixed, moving, transform=kind, metric=metric)``."""

    def __init__(self, metric: str):
        self.metric = metric
        self.name = f"tireg-{metric}"
        self.note = f"`tireg.register(fixed, moving, transform=kind, metric={metric!r})`, other arguments at their defaults"

    def register(self, fixed, moving, kind):
        import tireg

        result = tireg.register(fixed, moving, transform=kind, metric=self.metric)
        return result.matrix.numpy(), result


class Elastix(Method):
    name = "elastix"
    note = ("itk-elastix `elastix_registration_method` with `GetDefaultParameterMap('translation'|'rigid'|'affine')` "
            "(4 resolutions, Mattes MI, adaptive stochastic gradient descent, 256 iterations, 2048 random samples); "
            "similarity: the default rigid map with `Transform = SimilarityTransform`")

    def setup(self):
        import itk

        self.itk = itk
        itk.ParameterObject.New()  # loads the module

    def parameter_object(self, kind):
        itk = self.itk
        parameters = itk.ParameterObject.New()
        name = {"translation": "translation", "rigid": "rigid", "similarity": "rigid", "affine": "affine"}[kind]
        parameter_map = parameters.GetDefaultParameterMap(name)
        if kind == "similarity":
            parameter_map["Transform"] = ["SimilarityTransform"]
        parameters.AddParameterMap(parameter_map)
        return parameters

    def register(self, fixed, moving, kind):
        itk = self.itk
        _, result = itk.elastix_registration_method(
            itk.image_from_array(np.ascontiguousarray(fixed, np.float32)),
            itk.image_from_array(np.ascontiguousarray(moving, np.float32)),
            parameter_object=self.parameter_object(kind),
            log_to_console=False,
        )
        return self.to_matrix(result.GetParameterMap(0)), result

    @staticmethod
    def to_matrix(parameter_map) -> np.ndarray:
        """ITK's fixed -> moving physical map; spacing 1, origin 0, identity direction make it pixels (x = column).

        ``T(x) = L (x - c) + c + t`` with ITK's rotation ``[[cos, -sin], [sin, cos]]`` and the parameter
        orders Euler2D ``(angle, tx, ty)``, Similarity2D ``(scale, angle, tx, ty)``, Affine ``(a00, a01, a10, a11,
        tx, ty)``, Translation ``(tx, ty)``.
        """
        for key, value in (("Spacing", 1.0), ("Origin", 0.0)):
            if any(float(v) != value for v in parameter_map[key]):
                raise ValueError(f"elastix: unexpected {key} {parameter_map[key]}")
        kind = parameter_map["Transform"][0]
        p = [float(v) for v in parameter_map["TransformParameters"]]
        keys = set(parameter_map.keys())
        center = np.array([float(v) for v in parameter_map["CenterOfRotationPoint"]]) if (
            "CenterOfRotationPoint" in keys) else np.zeros(2)
        if kind == "TranslationTransform":
            linear, shift = np.eye(2), np.array(p[:2])
        elif kind == "EulerTransform":
            c, s = math.cos(p[0]), math.sin(p[0])
            linear, shift = np.array([[c, -s], [s, c]]), np.array(p[1:3])
        elif kind == "SimilarityTransform":
            c, s = math.cos(p[1]), math.sin(p[1])
            linear, shift = p[0] * np.array([[c, -s], [s, c]]), np.array(p[2:4])
        elif kind == "AffineTransform":
            linear, shift = np.array(p[:4]).reshape(2, 2), np.array(p[4:6])
        else:
            raise ValueError(f"elastix: unsupported transform {kind}")
        matrix = np.eye(3)
        matrix[:2, :2] = linear
        matrix[:2, 2] = center + shift - linear @ center
        return matrix

    def conversion_gap(self, fixed, moving, kind, matrix, native):
        """Max distance between transformix's own mapping of 50 points and the converted matrix."""
        itk = self.itk
        points = _GRID_H[np.random.default_rng(0).choice(len(_GRID_H), 50, replace=False)]
        with tempfile.TemporaryDirectory() as folder:
            name = os.path.join(folder, "points.txt")
            with open(name, "w") as handle:
                handle.write(f"point\n{len(points)}\n")
                for x, y, _ in points:
                    handle.write(f"{x:.6f} {y:.6f}\n")
            itk.transformix_pointset(itk.image_from_array(np.ascontiguousarray(moving, np.float32)), native,
                                     fixed_point_set_file_name=name, output_directory=folder)
            with open(os.path.join(folder, "outputpoints.txt")) as handle:
                text = handle.read()
        mapped = np.array([[float(a), float(b)] for a, b in re.findall(
            r"OutputPoint = \[ ([-0-9.eE+]+) ([-0-9.eE+]+) \]", text)])
        return float(np.abs(mapped - apply(matrix, points)).max())


class SimpleITK(Method):
    name = "simpleitk"
    metric = "correlation"  # or "mattes": Mattes mutual information, 50 bins
    sampling = None  # None: every pixel; a fraction: RANDOM sampling of that fraction with a fixed seed
    note = ("`ImageRegistrationMethod` in the form of SimpleITK's registration notebooks and 2-D examples: "
            "`CenteredTransformInitializer` (GEOMETRY), correlation metric (gain and offset invariant), linear "
            "interpolation, `SetOptimizerAsRegularStepGradientDescent(learningRate=1, minStep=1e-4, "
            "numberOfIterations=200)`, `SetOptimizerScalesFromPhysicalShift()`, shrink factors (4, 2, 1), "
            "smoothing sigmas (2, 1, 0) px; TranslationTransform, Euler2DTransform, Similarity2DTransform, "
            "AffineTransform")

    def setup(self):
        import SimpleITK as sitk

        self.sitk = sitk
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "no valid points" warnings of diverged runs

    def register(self, fixed, moving, kind):
        sitk = self.sitk
        fixed_image = sitk.GetImageFromArray(np.ascontiguousarray(fixed, np.float32))
        moving_image = sitk.GetImageFromArray(np.ascontiguousarray(moving, np.float32))
        if kind == "translation":
            # CenteredTransformInitializer needs a centred transform; take its translation (GEOMETRY)
            centered = sitk.CenteredTransformInitializer(
                fixed_image, moving_image, sitk.Euler2DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY)
            initial = sitk.TranslationTransform(2, sitk.Euler2DTransform(centered).GetTranslation())
        else:
            prototype = {"rigid": sitk.Euler2DTransform(), "similarity": sitk.Similarity2DTransform(),
                         "affine": sitk.AffineTransform(2)}[kind]
            initial = sitk.CenteredTransformInitializer(
                fixed_image, moving_image, prototype, sitk.CenteredTransformInitializerFilter.GEOMETRY)
        method = sitk.ImageRegistrationMethod()
        if self.metric == "correlation":
            method.SetMetricAsCorrelation()
        else:
            method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        if self.sampling is not None:
            method.SetMetricSamplingStrategy(method.RANDOM)
            method.SetMetricSamplingPercentage(self.sampling, 20260101)  # seeded: the same samples every run
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrinkFactors=[4, 2, 1])
        method.SetSmoothingSigmasPerLevel(smoothingSigmas=[2, 1, 0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(initial, inPlace=False)
        final = method.Execute(fixed_image, moving_image)
        # the final transform maps fixed physical points (= pixels here, x = column) to moving ones
        origin = np.array(final.TransformPoint((0.0, 0.0)))
        matrix = np.eye(3)
        matrix[:2, 0] = np.array(final.TransformPoint((1.0, 0.0))) - origin
        matrix[:2, 1] = np.array(final.TransformPoint((0.0, 1.0))) - origin
        matrix[:2, 2] = origin
        return matrix, final

    def conversion_gap(self, fixed, moving, kind, matrix, native):
        points = _GRID_H[::997]
        mapped = np.array([native.TransformPoint((float(x), float(y))) for x, y, _ in points])
        return float(np.abs(mapped - apply(matrix, points)).max())


class SimpleITKMattes(SimpleITK):
    name = "simpleitk-mi"
    metric = "mattes"
    sampling = 0.10
    note = ("`ImageRegistrationMethod` as `simpleitk` but with `SetMetricAsMattesMutualInformation"
            "(numberOfHistogramBins=50)` and the sampling of SimpleITK's ImageRegistrationMethod4 example (Mattes MI): "
            "`SetMetricSamplingStrategy(RANDOM)`, `SetMetricSamplingPercentage(0.10, seed)`; "
            "`CenteredTransformInitializer` (GEOMETRY), `RegularStepGradientDescent(learningRate=1, minStep=1e-4, "
            "numberOfIterations=200)`, physical-shift scales, shrink factors (4, 2, 1), smoothing sigmas (2, 1, 0)")


class _ECCBase(Method):
    def setup(self):
        import cv2

        self.cv2 = cv2
        self.motion = {"translation": cv2.MOTION_TRANSLATION, "rigid": cv2.MOTION_EUCLIDEAN,
                       "similarity": cv2.MOTION_AFFINE, "affine": cv2.MOTION_AFFINE}

    @staticmethod
    def to_matrix(warp: np.ndarray) -> np.ndarray:
        """The warp maps template (fixed) pixels to input (moving) pixels, x = column: tireg's ``A`` as it is."""
        matrix = np.eye(3)
        matrix[:2] = warp[:2]
        return matrix

    def conversion_gap(self, fixed, moving, kind, matrix, native):
        """Mean |warpAffine(moving, W, WARP_INVERSE_MAP) - tireg.warp(moving, A)| inside, over the image's std."""
        cv2 = self.cv2
        theirs = cv2.warpAffine(np.asarray(moving, np.float32), native[:2].astype(np.float32), (SIZE, SIZE),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        ours = _tireg_warp(moving, matrix)
        inside = _interior(matrix)
        if inside.sum() < 100:
            return math.inf
        return float(np.abs(theirs - ours)[inside].mean() / moving.std())


class ECC(_ECCBase):
    name = "ecc"
    note = ("OpenCV `findTransformECCMultiScale` (its own pyramid; default `ECCParameters`: 4 levels, 50 iterations "
            "per level, eps 1e-6, Gaussian filter 5, linear interpolation) from the identity; MOTION_TRANSLATION, "
            "MOTION_EUCLIDEAN, MOTION_AFFINE (also for similarity: ECC has no similarity model)")

    def register(self, fixed, moving, kind):
        cv2 = self.cv2
        parameters = cv2.ECCParameters()
        parameters.motionType = self.motion[kind]
        warp = np.eye(2, 3, dtype=np.float32)
        _, warp = cv2.findTransformECCMultiScale(np.asarray(fixed, np.float32), np.asarray(moving, np.float32),
                                                 warp, parameters)
        return self.to_matrix(warp), warp


class ECCSingle(_ECCBase):
    name = "ecc-single"
    note = ("OpenCV `findTransformECC` at full resolution from the identity with its default criteria "
            "(50 iterations, eps 1e-3) and Gaussian filter 5; motion types as for `ecc`")

    def register(self, fixed, moving, kind):
        cv2 = self.cv2
        warp = np.eye(2, 3, dtype=np.float32)
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-3)
        _, warp = cv2.findTransformECC(np.asarray(fixed, np.float32), np.asarray(moving, np.float32), warp,
                                       self.motion[kind], criteria, None, 5)
        return self.to_matrix(warp), warp


class Kornia(Method):
    name = "kornia"
    note = ("`kornia.geometry.ImageRegistrator` with its defaults (5 pyramid levels, Adam lr 1e-3, 100 iterations "
            "per level, L1 loss, symmetric); model 'translation', 'similarity' (for rigid too: kornia has no rigid "
            "model), 'homography' (for affine: no affine model); both images standardised (zero mean, unit "
            "deviation) first, because L1 is not contrast invariant")

    def setup(self):
        import torch
        import kornia  # noqa: F401

        self.torch = torch
        self.normalization = np.array([[2.0 / SIZE, 0, 1.0 / SIZE - 1], [0, 2.0 / SIZE, 1.0 / SIZE - 1], [0, 0, 1]])

    def register(self, fixed, moving, kind):
        torch = self.torch
        from kornia.geometry import ImageRegistrator

        def tensor(image):
            image = np.asarray(image, np.float32)
            return torch.from_numpy((image - image.mean()) / image.std())[None, None]

        model = {"translation": "translation", "rigid": "similarity", "similarity": "similarity",
                 "affine": "homography"}[kind]
        registrator = ImageRegistrator(model)
        # register(src, dst) returns src <- dst in normalised coordinates (align_corners=False):
        # src = moving, dst = fixed gives the fixed -> moving map
        normalized = registrator.register(tensor(moving), tensor(fixed)).detach()[0].double().numpy()
        return self.to_matrix(normalized), registrator

    def to_matrix(self, normalized: np.ndarray) -> np.ndarray:
        """``A = N^-1 M N`` with ``N`` the pixel -> normalised map of ``align_corners=False``: ``u = (2x + 1)/W - 1``."""
        matrix = np.linalg.inv(self.normalization) @ normalized @ self.normalization
        return matrix / matrix[2, 2]

    def conversion_gap(self, fixed, moving, kind, matrix, native):
        """Mean |kornia's own warp of moving - tireg.warp(moving, A)| inside, over the image's std.

        Checked for the registered model and again after adding a known rotation, scale and shift to its
        parameters, so that a wrong sign or axis would show even where the registration barely moved.
        """
        torch = self.torch

        def gap(model_matrix):
            with torch.no_grad():
                theirs = native.warp_src_into_dst(torch.from_numpy(np.asarray(moving, np.float32))[None, None])
            theirs = theirs[0, 0].double().numpy()
            inside = _interior(model_matrix)
            if inside.sum() < 100:
                return math.inf
            return float(np.abs(theirs - _tireg_warp(moving, model_matrix))[inside].mean() / moving.std())

        first = gap(matrix)
        model = native.model
        with torch.no_grad():
            if hasattr(model, "rot"):
                model.rot += 7.0  # degrees
                model.scale *= 1.04
                model.shift += torch.tensor([[[0.03], [-0.05]]])
            else:
                model.model += torch.tensor([[0.03, 0.05, 0.02], [-0.04, 0.02, -0.03], [0.0, 0.0, 0.0]])
        perturbed = self.to_matrix(model().detach()[0].double().numpy())
        return max(first, gap(perturbed))


METHODS: dict[str, Callable[[], Method]] = {
    "tireg": Tireg,
    "elastix": Elastix,
    "simpleitk": SimpleITK,
    "ecc": ECC,
    "ecc-single": ECCSingle,
    "kornia": Kornia,
    "tireg-mi": lambda: TiregMetric("mi"),
    "tireg-nmi": lambda: TiregMetric("nmi"),
    "tireg-ncc_any": lambda: TiregMetric("ncc_any"),
    "tireg-ncc": lambda: TiregMetric("ncc"),
    "simpleitk-mi": SimpleITKMattes,
}
#: methods of the standard suite and of the contrast suite when --methods is not given
STANDARD_METHODS = ("tireg", "elastix", "simpleitk", "ecc", "ecc-single", "kornia")
CONTRAST_METHODS = ("tireg-mi", "tireg-nmi", "tireg-ncc_any", "tireg-ncc", "elastix", "simpleitk-mi", "simpleitk", "ecc")

#: The package to install for each module a peer's ``setup()`` imports (all in the ``[benchmark]`` extra).
PEER_PACKAGES = {"itk": "itk-elastix", "SimpleITK": "SimpleITK", "cv2": "opencv-python-headless", "kornia": "kornia",
                 "skimage": "scikit-image"}
INSTALL_HINT = 'pip install -e ".[benchmark]"'


def select_methods(names) -> tuple[dict[str, Method], list[str]]:
    """The methods of ``names`` (each once, in order) whose packages import, set up; and one line for
    each peer left out because its package is not installed (``speed.py`` leaves a missing peer out
    too).  tireg's own methods are never left out: a failed import of tireg is raised."""
    methods: dict[str, Method] = {}
    left_out: list[str] = []
    for name in dict.fromkeys(names):
        method = METHODS[name]()
        try:
            method.setup()
        except ImportError as error:
            if name == "tireg" or name.startswith("tireg-"):
                raise
            module = (getattr(error, "name", None) or "").split(".")[0]
            package = PEER_PACKAGES.get(module, module or "its package")
            left_out.append(f"{name}: {package} is not installed ({INSTALL_HINT}); left out")
            continue
        methods[name] = method
    return methods, left_out


# ----------------------------------------------------------------------------
# convention checks


#: tolerance of the conversion gap: pixels for point maps, fraction of the image's std for resampling comparisons
CONVERSION_TOLERANCE = {"tireg": 1e-6, "elastix": 1e-3, "simpleitk": 1e-6, "ecc": 0.02, "ecc-single": 0.02,
                        "kornia": 0.02, "tireg-mi": 1e-6, "tireg-nmi": 1e-6, "tireg-ncc_any": 1e-6, "tireg-ncc": 1e-6,
                        "simpleitk-mi": 1e-6}


def check_cases(seed: int) -> list[Case]:
    """Easy known cases: identity, a pure shift, a small rotation, rotation + scale, rotation + scale + shear."""
    scene = dict(_scenes())["camera"]
    specs = [
        ("translation", "identity", np.eye(3)),
        ("translation", "shift (+6.5, -3.25)", about_center(np.eye(2), np.array([6.5, -3.25]))),
        ("rigid", "rotation +6 deg, shift (+3, -2)", about_center(rotation(math.radians(6)), np.array([3.0, -2.0]))),
        ("similarity", "rotation -5 deg, scale 1.05",
         about_center(1.05 * rotation(math.radians(-5)), np.array([-2.0, 1.5]))),
        ("affine", "rotation +4 deg, scale 0.97, shear 0.04",
         about_center(0.97 * rotation(math.radians(4)) @ np.array([[1.0, 0.04], [0.0, 1.02]]), np.array([2.5, 2.0]))),
    ]
    cases = []
    for index, (kind, text, truth) in enumerate(specs):
        rng = np.random.default_rng([seed, 99, index])
        fixed, moving = make_pair(scene, truth, rng, contrast=False, noise=0.005)
        cases.append(Case(kind, index, "camera", truth, fixed, moving, text))
    return cases


def check_construction(fixed: np.ndarray, moving: np.ndarray, truth: np.ndarray) -> None:
    """``moving(A x) = fixed(x)`` for a clean pair: tireg.warp of moving by the truth matches fixed.

    The two differ only by interpolation (cubic spline here, bilinear in tireg.warp): up to 0.2 of the image's
    standard deviation.  Warping by the inverse instead, or with x and y swapped, gives differences of the order
    of the standard deviation.
    """
    inside = _interior(truth, size=fixed.shape[-1])
    gap = float(np.abs(_tireg_warp(moving, truth) - fixed)[inside].mean() / fixed.std())
    if gap > 0.3:
        raise AssertionError(f"case construction: warped moving differs from fixed by {gap:.3f} std; "
                             "the convention moving(A x) = fixed(x) is broken")


def run_checks(methods: list[Method], kinds, seed: int) -> dict[tuple[str, str], str]:
    """Returns ``{(method, kind): problem}`` for every pair whose conversion is not verified.

    Verified means: on every check case of the kind, the converted matrix agrees with the peer's own reading of
    its result (conversion gap within tolerance: the linear part, the centre and the signs), and the identity
    and the pure shift are recovered within 0.5 px (the direction: fixed -> moving, not its inverse).  Missing
    an easy rotation / scale / shear case is reported as inaccuracy, not as a conversion problem.
    """
    cases = [case for case in check_cases(seed) if case.kind in kinds]
    if "translation" not in kinds:  # the direction check needs the shift case
        cases = [case for case in check_cases(seed) if case.kind == "translation"] + cases
    problems: dict[tuple[str, str], str] = {}
    direction_ok: dict[str, bool] = {}
    rows = []
    for method in methods:
        for case in cases:
            if case.kind not in method.kinds:
                continue
            try:
                matrix, native = method.register(case.fixed, case.moving, case.kind)
                error = grid_error(matrix, case.truth)
                inverse_error = grid_error(np.linalg.inv(matrix), case.truth)
                gap = method.conversion_gap(case.fixed, case.moving, case.kind, matrix, native)
            except Exception as exc:  # noqa: BLE001 - any crash makes the check fail
                error = inverse_error = gap = math.inf
                problems[(method.name, case.kind)] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            converted = gap <= CONVERSION_TOLERANCE[method.name]
            recovered = error < SUCCESS_PX
            if case.kind == "translation":
                direction_ok[method.name] = direction_ok.get(method.name, True) and recovered
            if not converted and (method.name, case.kind) not in problems:
                problems[(method.name, case.kind)] = f"check '{case.description}': conversion gap {gap:.3g}"
            verdict = ("ok" if recovered else "inaccurate (conversion ok)") if converted else "CONVERSION FAILED"
            if case.kind == "translation" and not recovered:
                verdict = "DIRECTION NOT VERIFIED"
            rows.append(f"| {method.name} | {case.kind} | {case.description} | {error:.4f} | {inverse_error:.2f} | "
                        f"{gap:.2e} | {verdict} |")
        if not direction_ok.get(method.name, False):
            for kind in kinds:
                problems.setdefault((method.name, kind), "identity / pure shift not recovered: direction unverified")
    print("## Convention checks\n")
    print("Error of the converted matrix and of its inverse on easy known cases; conversion gap: the converted matrix "
          "against the peer's own reading of its result (px for point maps, fraction of the image's std for "
          "resampling).\n")
    print("| method | kind | case | error (px) | error of inverse (px) | conversion gap | verdict |")
    print("|---|---|---|---:|---:|---:|---|")
    print("\n".join(rows))
    print()
    return {key: value for key, value in problems.items() if key[1] in kinds}


# ----------------------------------------------------------------------------
# run and report


@dataclasses.dataclass
class Record:
    method: str
    kind: str
    index: int
    scene: str
    description: str
    error: float
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of this process (all its threads)
    reason: str = ""
    contrast: str = "gain-offset"


def run_case(method: Method, case: Case) -> Record:
    started, started_cpu = time.perf_counter(), time.process_time()
    try:
        matrix, _ = method.register(case.fixed, case.moving, case.kind)
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        error, reason = grid_error(matrix, case.truth), ""
        if not math.isfinite(error):
            reason = "non-finite matrix"
    except Exception as exc:  # noqa: BLE001 - a crash is a failure with its reason, never the end of the run
        seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        message = str(exc).strip().splitlines()
        error, reason = math.inf, f"exception {type(exc).__name__}: {message[-1] if message else ''}"
    return Record(method.name, case.kind, case.index, case.scene, case.description, error, seconds, cpu, reason,
                  case.contrast)


def summarize(records: list[Record]) -> dict:
    errors = [r.error for r in records]
    return {
        "n": len(records),
        "success": sum(e < SUCCESS_PX for e in errors),
        "failures": sum(e > FAILURE_PX for e in errors),
        "median_error": statistics.median(errors) if errors else math.nan,
        "exceptions": sum(r.reason.startswith("exception") for r in records),
        "median_seconds": statistics.median(r.seconds for r in records) if records else math.nan,
        "median_cpu": statistics.median(r.cpu_seconds for r in records) if records else math.nan,
    }


def _format_error(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _table(title: str, kind: str, records: list[Record], methods: list[Method], problems) -> list[str]:
    lines = [f"**{title}**\n",
             "| method | success (< 0.5 px) | failures (> 5 px) | median error (px) | median CPU s / pair | "
             "median wall s / pair |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        if kind not in method.kinds:
            continue
        if (method.name, kind) in problems:
            lines.append(f"| {method.name} | conversion unverified | | | | |")
            continue
        subset = [r for r in records if r.method == method.name]
        if not subset:
            continue
        s = summarize(subset)
        crashed = f" ({s['exceptions']} exceptions)" if s["exceptions"] else ""
        lines.append(f"| {method.name} | {s['success']}/{s['n']} ({100 * s['success'] / s['n']:.0f} %) | "
                     f"{s['failures']}/{s['n']}{crashed} | {_format_error(s['median_error'])} | "
                     f"{s['median_cpu']:.3f} | {s['median_seconds']:.3f} |")
    lines.append("")
    return lines


def tables(records: list[Record], methods: list[Method], kinds, problems, contrasts=None) -> str:
    """One table per kind (standard suite), or per kind and contrast type plus one per kind over all contrasts."""
    lines = []
    for kind in kinds:
        of_kind = [r for r in records if r.kind == kind]
        if contrasts is None:
            lines += _table(kind, kind, of_kind, methods, problems)
            continue
        for contrast in contrasts:
            lines += _table(f"{kind}, {contrast}", kind, [r for r in of_kind if r.contrast == contrast], methods,
                            problems)
        if len(contrasts) > 1:
            lines += _table(f"{kind}, all {len(contrasts)} contrast types", kind, of_kind, methods, problems)
    return "\n".join(lines)


def set_threads(count: int) -> None:
    """Give every library ``count`` threads (0: leave each library's default)."""
    if count <= 0:
        return
    import torch

    torch.set_num_threads(count)
    for module, call in (("cv2", lambda m: m.setNumThreads(count)),
                         ("SimpleITK", lambda m: m.ProcessObject.SetGlobalDefaultNumberOfThreads(count)),
                         ("itk", lambda m: m.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(count))):
        try:
            call(__import__(module))
        except ImportError:
            pass


def tireg_commit() -> str:
    """The checkout's commit, and whether src/ has uncommitted changes to tracked files (taken when a run starts)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (src/ with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(commit: Optional[str] = None) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    versions = []
    for package in ("torch-image-registration", "torch", "numpy", "scikit-image", "SimpleITK",
                    "opencv-python-headless", "itk-elastix", "kornia"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    commit = tireg_commit() if commit is None else commit
    threads = [f"torch {torch.get_num_threads()}"]
    try:
        import cv2

        threads.append(f"OpenCV {cv2.getNumThreads()}")
    except ImportError:
        pass
    try:
        import SimpleITK as sitk

        threads.append(f"SimpleITK {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")
    except ImportError:
        pass
    try:
        import itk

        threads.append(f"ITK/elastix {itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()}")
    except ImportError:
        pass
    return (f"- machine: {cpu}, {os.cpu_count()} logical CPUs, threads: {', '.join(threads)}; "
            f"Python {platform.python_version()} on {platform.system()} {platform.release()}\n"
            f"- versions: {', '.join(versions)}; tireg commit {commit}")


def _failures(records: list[Record], kinds) -> list[str]:
    order = {kind: index for index, kind in enumerate(KINDS)}
    contrast_order = {name: index for index, name in enumerate(("gain-offset",) + CONTRASTS)}
    lines = []
    for record in sorted(records, key=lambda r: (r.method, order[r.kind], contrast_order[r.contrast], r.index)):
        if record.error >= SUCCESS_PX:
            contrast = "" if record.contrast == "gain-offset" else f" {record.contrast}"
            lines.append(f"- {record.method} / {record.kind}{contrast} #{record.index} ({record.scene}; "
                         f"{record.description}): {_format_error(record.error)} px, {record.cpu_seconds:.2f} s CPU "
                         f"{record.reason}".rstrip())
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("standard", "contrast", "all"), default="standard",
                        help="standard (default): same contrast up to gain and offset; contrast: inverted, "
                             "gamma-changed and other-channel moving images; all: both, one after the other")
    parser.add_argument("--cases", type=int, default=None,
                        help="cases per kind (standard, default 32: four per scene) or per kind and contrast type "
                             "(contrast, default 16: two per scene)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help=f"default: {' '.join(STANDARD_METHODS)} (standard), {' '.join(CONTRAST_METHODS)} "
                             "(contrast)")
    parser.add_argument("--kinds", nargs="+", default=None, choices=list(KINDS),
                        help=f"default: all four (standard), {' '.join(CONTRAST_KINDS)} (contrast)")
    parser.add_argument("--contrasts", nargs="+", default=list(CONTRASTS), choices=list(CONTRASTS),
                        help="contrast types of the contrast suite (default: all)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every library (default 1: CPU time per pair, robust to a shared "
                             "machine's load); 0 keeps each library's default")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 case per kind (and contrast type)")
    parser.add_argument("--check", action="store_true", help="run only the convention checks")
    parser.add_argument("--no-check", action="store_true", help="skip the convention checks (not for reporting)")
    parser.add_argument("--json", help="write every per-case record to this file")
    parser.add_argument("--verbose", action="store_true", help="print every case as it finishes")
    args = parser.parse_args(argv)
    command = "python benchmarks/accuracy.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + " ".join(sys.argv[1:] if argv is None else argv))
    set_threads(args.threads)
    commit = tireg_commit()  # at the start: the code that runs, whatever is committed meanwhile
    suites = ["standard", "contrast"] if args.suite == "all" else [args.suite]
    plan = {}  # suite -> (method names, kinds, cases per group)
    for suite in suites:
        names = args.methods or list(STANDARD_METHODS if suite == "standard" else CONTRAST_METHODS)
        chosen = args.kinds or list(KINDS if suite == "standard" else CONTRAST_KINDS)
        count = 1 if args.quick else (args.cases or (32 if suite == "standard" else 16))
        plan[suite] = (names, [kind for kind in KINDS if kind in chosen], count)
    contrasts = [contrast for contrast in CONTRASTS if contrast in args.contrasts]
    # a peer whose package is missing is left out with one line, the rest run (it stopped the run
    # with a traceback: ModuleNotFoundError: No module named 'itk')
    methods, left_out = select_methods([name for names, _, _ in plan.values() for name in names])
    for line in left_out:
        print(line, flush=True)
    plan = {suite: ([name for name in names if name in methods], kinds, count)
            for suite, (names, kinds, count) in plan.items()}
    if not all(names for names, _, _ in plan.values()):
        print("no method left to run", file=sys.stderr)
        return 1
    all_kinds = [kind for kind in KINDS if any(kind in kinds for _, kinds, _ in plan.values())]

    started = time.perf_counter()
    if args.no_check:  # the checks warm every method up; without them, one untimed call each
        problems = {}
        warm = check_cases(args.seed)[1]
        for method in methods.values():
            run_case(method, warm)
    else:
        problems = run_checks(list(methods.values()), all_kinds, args.seed)
    for (name, kind), problem in problems.items():
        print(f"CONVERSION UNVERIFIED: {name} / {kind}: {problem}")
    if args.check:
        return 1 if problems else 0

    records: list[Record] = []
    reports = []
    for suite, (names, kinds, count) in plan.items():
        suite_started = time.perf_counter()
        suite_methods = [methods[name] for name in names]
        if suite == "standard":
            cases = make_cases(kinds, count, args.seed)
        else:
            cases = make_contrast_cases(kinds, contrasts, count, args.seed)
        suite_records: list[Record] = []
        # case-major order: load on a shared machine hits every method alike
        for case in cases:
            for method in suite_methods:
                if case.kind not in method.kinds:
                    continue
                record = run_case(method, case)
                suite_records.append(record)
                if args.verbose:
                    print(f"{record.method:>13} {record.kind:>11} {record.contrast:>11} #{record.index} "
                          f"{record.scene:>28}: {record.error:9.3f} px {record.cpu_seconds:7.3f} s CPU "
                          f"{record.seconds:7.3f} s {record.reason}", flush=True)
        records += suite_records
        if suite == "standard":
            heading = f"## Results: standard suite, {count} cases per kind, seed {args.seed}\n"
            text = tables(suite_records, suite_methods, kinds, problems)
        else:
            heading = (f"## Results: contrast suite, {count} cases per kind and contrast type, seed {args.seed}\n")
            text = tables(suite_records, suite_methods, kinds, problems, contrasts)
        reports.append((suite, heading, text, suite_records, kinds, time.perf_counter() - suite_started))

    for suite, heading, text, suite_records, kinds, seconds in reports:
        print(heading)
        print(text)
    print(environment(commit))
    durations = ", ".join(f"{suite} {seconds:.0f} s" for suite, _, _, _, _, seconds in reports)
    print(f"- command: `{command}` ({time.perf_counter() - started:.0f} s in all; {durations})\n")
    for suite, _, _, suite_records, kinds, _ in reports:
        print(f"## Cases that were not a success (error >= 0.5 px), {suite} suite\n")
        print("\n".join(_failures(suite_records, kinds)))
        print()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "seed": args.seed, "problems": {f"{m}/{k}": v for (m, k), v in
                                                                             problems.items()},
                       "records": [dataclasses.asdict(r) for r in records]}, handle, indent=1,
                      default=lambda value: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
