"""The ``tireg`` command, driven as a user drives it: subprocesses, files in, files out.

Every run reads its outputs back: warped images (format, dtype, channels),
transforms against the known truth (< 0.5 px mean over the fixed grid), the
``.tfm`` through SimpleITK, pictures as PNG files.  Every bad input gives a
non-zero exit, one line on stderr and no output file.  The images are crops
of the bundled ones (about 128 x 160) so that the file runs in well under a
minute, some checks call ``main(argv)`` -- the function the ``tireg`` script
runs -- in this process: the format matrix, and every bad-input case (a
few of those also as processes, run beside the other tests).
"""

from __future__ import annotations

import csv
import functools
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import tireg
from conftest import CUDA, grid_error, registration_pair
from tireg import transform_io
from tireg.cli import DEMO_TRUTH, main
from tireg.io import read_stack
from tireg.transforms import TRANSFORMS, translation_matrix

imageio = pytest.importorskip("imageio.v3")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

CLI = [sys.executable, "-m", "tireg.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AFFINE = [1.03, 0.04, -0.05, 0.98, 5.0, -4.0]  # a00 a01 a10 a11 tx ty about the centre


def _env() -> dict:
    # small images: one thread each is as fast, and runs side by side do not fight over the cores
    return dict(os.environ, OMP_NUM_THREADS="1")


def run(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())


def ok(process: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    return process


def assert_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imageio.imread(path)
    assert image.ndim in (2, 3) and min(image.shape[:2]) > 16
    return image


def matrix_of(row: dict) -> np.ndarray:
    return np.array([[float(row["m00"]), float(row["m01"]), float(row["m02"])],
                     [float(row["m10"]), float(row["m11"]), float(row["m12"])], [0.0, 0.0, 1.0]])


def to_u8(image) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8)


def colour_pair(kind: str, params, margin: int = 32):
    """The bundled colour image cropped, and the same scene through the true transform: moving(A x) = fixed(x)."""
    from tireg.data import immunohistochemistry

    scene = immunohistochemistry(dtype=torch.float64)[None]
    height, width = scene.shape[-2] - 2 * margin, scene.shape[-1] - 2 * margin
    truth = TRANSFORMS[kind].matrix(torch.tensor(params, dtype=torch.float64), tireg.image_center(height, width))
    to_scene = translation_matrix(torch.tensor([float(margin)] * 2, dtype=torch.float64))
    fixed = tireg.warp(scene, to_scene, size=(height, width))[0]
    moving = tireg.warp(scene, to_scene @ torch.linalg.inv(truth), size=(height, width), padding_mode="border")[0]
    return fixed.permute(1, 2, 0).numpy(), moving.permute(1, 2, 0).numpy(), truth


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Input files with known truth, in every supported format."""
    folder = tmp_path_factory.mktemp("inputs")
    fixed, moving, truth = registration_pair("camera", "affine", AFFINE, margin=48)  # 128 x 160
    fixed, moving = fixed.numpy(), moving.numpy()
    files = {"truth": truth.numpy(), "folder": folder, "size": fixed.shape}
    imageio.imwrite(folder / "fixed.png", to_u8(fixed))
    imageio.imwrite(folder / "moving.png", to_u8(moving))
    tifffile.imwrite(folder / "fixed16.tif", np.rint(fixed * 65535).astype(np.uint16))
    tifffile.imwrite(folder / "moving16.tif", np.rint(moving * 65535).astype(np.uint16))
    tifffile.imwrite(folder / "fixed32.tif", fixed.astype(np.float32))
    tifffile.imwrite(folder / "moving32.tif", moving.astype(np.float32))
    np.save(folder / "fixed.npy", fixed.astype(np.float64))
    np.save(folder / "moving.npy", moving.astype(np.float64))
    colour_fixed, colour_moving, colour_truth = colour_pair("similarity", [0.08, 1.04, 4.0, -3.0])
    imageio.imwrite(folder / "fixed_rgb.png", to_u8(colour_fixed))
    imageio.imwrite(folder / "moving_rgb.jpg", to_u8(colour_moving), quality=95)
    files["colour_truth"] = colour_truth.numpy()
    files["colour_size"] = colour_fixed.shape[:2]
    return files


@pytest.fixture(scope="module")
def registered(data, tmp_path_factory):
    """``tireg register fixed.png moving.png -o out``: the run most tests read."""
    cwd = tmp_path_factory.mktemp("register")
    process = ok(run("register", data["folder"] / "fixed.png", data["folder"] / "moving.png", "-o", "out", cwd=cwd))
    return process, cwd / "out"


# ----------------------------------------------------------------------------
# register


def test_register_writes_every_output_and_recovers_the_truth(data, registered):
    process, out = registered
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["warped.png", "transform.json", "transform.tfm", "before_after.png", "convergence.png"])
    # the summary: matrix, parameters in natural units, cost, iterations, time
    for word in ("matrix", "parameters", "tx", "px", "cost", "iterations", "time", "converged"):
        assert word in process.stdout
    # the warped image: same format, bit depth, channels as the moving image, on the fixed grid
    warped = imageio.imread(out / "warped.png")
    assert warped.dtype == np.uint8 and warped.shape == tuple(data["size"])
    fixed = imageio.imread(data["folder"] / "fixed.png").astype(float)
    moving = imageio.imread(data["folder"] / "moving.png").astype(float)
    inside = (slice(12, -12), slice(12, -12))
    after = np.abs(warped.astype(float) - fixed)[inside].mean()
    assert after < 6.0 and after < 0.2 * np.abs(moving - fixed)[inside].mean()  # grey levels of 255
    # the JSON transform
    saved = tireg.transform_io.load_transform(out / "transform.json")
    assert saved.transform == "affine"
    assert grid_error(saved.matrix, torch.from_numpy(data["truth"]), data["size"]) < 0.5
    # pictures
    assert_png(out / "before_after.png")
    assert_png(out / "convergence.png")
    # the .tfm, read by SimpleITK (where installed: the checks above hold without it), maps fixed
    # points within 0.5 px of the truth
    sitk = pytest.importorskip("SimpleITK")
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    height, width = data["size"]
    points = [(float(x), float(y)) for x in np.linspace(0, width - 1, 7) for y in np.linspace(0, height - 1, 5)]
    mapped = np.array([transform.TransformPoint(p) for p in points])
    truth = np.array([(data["truth"] @ [x, y, 1.0])[:2] for x, y in points])
    assert np.linalg.norm(mapped - truth, axis=1).max() < 0.5


@pytest.mark.parametrize(
    "fixed, moving, dtype, channels",
    [
        ("fixed16.tif", "moving16.tif", np.uint16, 1),
        ("fixed32.tif", "moving32.tif", np.float32, 1),
        ("fixed.npy", "moving.npy", np.float64, 1),
        ("fixed_rgb.png", "moving_rgb.jpg", np.uint8, 3),  # colour: registered on luminance, 3 channels warped
    ],
)
def test_register_keeps_format_bit_depth_and_channels(data, tmp_path, fixed, moving, dtype, channels, capsys,
                                                     monkeypatch):
    colour = channels == 3
    options = ["--transform", "similarity"] if colour else ["--transform", "affine", "--quiet"]
    arguments = ["register", data["folder"] / fixed, data["folder"] / moving, "-o", "out", *options]
    if colour:
        ok(run(*arguments, cwd=tmp_path))
    else:
        # main(argv) in this process: the function the `tireg` script calls, without starting Python again
        monkeypatch.chdir(tmp_path)
        assert main(list(map(str, arguments))) == 0
        assert capsys.readouterr().out == ""  # --quiet prints nothing
    suffix = Path(moving).suffix
    warped_path = tmp_path / "out" / f"warped{suffix}"
    if suffix == ".npy":
        warped = np.load(warped_path)
    elif suffix == ".tif":
        warped = tifffile.imread(warped_path)
    else:
        warped = imageio.imread(warped_path)
    size = tuple(data["colour_size"] if colour else data["size"])
    assert warped.dtype == dtype
    assert warped.shape == (size + (3,) if colour else size)
    truth = data["colour_truth"] if colour else data["truth"]
    saved = tireg.transform_io.load_transform(tmp_path / "out" / "transform.json")
    assert grid_error(saved.matrix, torch.from_numpy(truth), size) < 0.5


@pytest.mark.parametrize("fixed, moving", [("fixed.png", "moving.png"), ("fixed_rgb.png", "moving_rgb.jpg")])
def test_an_alpha_channel_does_not_stop_a_registration(data, tmp_path, monkeypatch, capsys, fixed, moving):
    """RGB against RGBA (grey against grey + alpha) was refused, advising to give "both in colour or
    both in grey", which they were.  Alpha does not enter the luminance: the same matrix as without
    it, and the warped image keeps the moving image's own channels."""
    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    image = imageio.imread(folder / moving)
    colour = image.ndim == 3 and image.shape[-1] == 3
    alpha = np.tile(np.linspace(0, 255, image.shape[1]).astype(np.uint8), (image.shape[0], 1))  # not all opaque
    imageio.imwrite(tmp_path / "plain.png", image)
    imageio.imwrite(tmp_path / "alpha.png", np.dstack([image, alpha]))
    matrices = {}
    for name in ("plain", "alpha"):
        assert main(["register", str(folder / fixed), f"{name}.png", "-o", name, "-t", "translation", "-q"]) == 0
        matrices[name] = transform_io.load_transform(tmp_path / name / "transform.json").matrix.numpy()
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(matrices["alpha"], matrices["plain"])
    warped = imageio.imread(tmp_path / "alpha" / "warped.png")
    assert warped.shape == (*imageio.imread(folder / fixed).shape[:2], 4 if colour else 2)


def test_register_with_a_mask_and_levels(data, tmp_path, monkeypatch):
    mask = np.zeros(data["size"], np.uint8)
    mask[10:-10, 20:-20] = 255
    imageio.imwrite(tmp_path / "mask.png", mask)
    monkeypatch.chdir(tmp_path)
    arguments = ["register", data["folder"] / "fixed.png", data["folder"] / "moving.png", "-o", "out",
                 "--mask", "mask.png", "--levels", "2", "--metric", "cauchy", "-q"]
    assert main(list(map(str, arguments))) == 0
    saved = tireg.transform_io.load_transform(tmp_path / "out" / "transform.json")
    assert saved.metadata["stop_reason"] == ["converged"]
    assert grid_error(saved.matrix, torch.from_numpy(data["truth"]), data["size"]) < 0.5


def test_a_mask_with_alpha_counts_its_opaque_nonzero_pixels(data, tmp_path, monkeypatch):
    """A region drawn on a white, transparent canvas (a drawn mask's common export) selected every
    pixel: the alpha was dropped.  With alpha, a pixel counts where it is nonzero and opaque, and
    the registration is the grey mask's of the same region, to the bit."""
    height, width = data["size"]
    region = np.zeros((height, width), bool)
    region[10:-10, 20:-20] = True
    drawn = np.full((height, width, 4), 255, np.uint8)
    drawn[..., 3] = np.where(region, 255, 0)
    imageio.imwrite(tmp_path / "drawn.png", drawn)
    imageio.imwrite(tmp_path / "grey.png", np.where(region, 255, 0).astype(np.uint8))
    opaque = np.zeros((height, width, 2), np.uint8)  # grey + alpha, all opaque: the grey decides
    opaque[..., 0], opaque[..., 1] = np.where(region, 200, 0), 255
    imageio.imwrite(tmp_path / "opaque.png", opaque)
    monkeypatch.chdir(tmp_path)
    matrices = {}
    for name in ("drawn", "grey", "opaque"):
        arguments = ["register", data["folder"] / "fixed.png", data["folder"] / "moving.png", "-o", name,
                     "--mask", f"{name}.png", "-t", "rigid", "-q"]
        assert main(list(map(str, arguments))) == 0
        matrices[name] = tireg.transform_io.load_transform(tmp_path / name / "transform.json").matrix
    assert torch.equal(matrices["drawn"], matrices["grey"]) and torch.equal(matrices["opaque"], matrices["grey"])
    unmasked = ["register", data["folder"] / "fixed.png", data["folder"] / "moving.png", "-o", "none", "-t", "rigid",
                "-q"]
    assert main(list(map(str, unmasked))) == 0
    assert not torch.equal(tireg.transform_io.load_transform(tmp_path / "none" / "transform.json").matrix,
                           matrices["grey"])


def test_register_smoothing_option(data, tmp_path, monkeypatch, capsys):
    # --smoothing: the full-resolution level's sigma (register's Pyramid(finest_smoothing=)); a bad one
    # is named, before any work
    register_module = importlib.import_module("tireg.register")
    seen = []
    original = register_module.register

    @functools.wraps(original)  # the command reads register()'s defaults from its signature
    def spy(*args, **kwargs):
        seen.append(kwargs["pyramid"])
        return original(*args, **kwargs)

    monkeypatch.setattr(register_module, "register", spy)
    monkeypatch.chdir(tmp_path)
    arguments = ["register", str(data["folder"] / "fixed.png"), str(data["folder"] / "moving.png"), "-q"]
    assert main([*arguments, "-o", "a", "--smoothing", "0"]) == 0
    assert main([*arguments, "-o", "b"]) == 0
    assert seen[0].finest_smoothing == 0.0 and seen[1].finest_smoothing is None
    assert seen[0].levels(data["size"])[-1] == (1, 0.0)
    assert main([*arguments, "-o", "c", "--smoothing", "-1"]) == 2
    assert "--smoothing: expected a number of pixels of at least 0; got '-1'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("metric", ["mi", "ncc_any"])
def test_register_with_an_image_level_metric_aligns_inverted_contrast(tmp_path, monkeypatch, capsys, metric):
    """The command offered the per-pixel losses only, which cannot align an inverted contrast."""
    fixed, moving, truth = registration_pair("camera", "similarity", [0.1, 1.04, 4.0, -3.0], gain=-1.0, offset=1.0)
    np.save(tmp_path / "fixed.npy", fixed.numpy())
    np.save(tmp_path / "moving.npy", moving.numpy())
    monkeypatch.chdir(tmp_path)
    assert main(["register", "fixed.npy", "moving.npy", "-o", "out", "-t", "similarity", "--metric", metric]) == 0
    cost_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cost"))
    assert cost_line.endswith(f"({metric})")  # not "normalised intensities": the metric's own cost
    saved = tireg.transform_io.load_transform(tmp_path / "out" / "transform.json")
    assert grid_error(saved.matrix, truth, tuple(fixed.shape)) < 0.1


# ----------------------------------------------------------------------------
# apply


def test_apply_a_saved_transform_reproduces_the_warped_image(data, registered, tmp_path, monkeypatch):
    _, out = registered
    ok(run("apply", out / "transform.json", data["folder"] / "moving.png", "-o", "again.png", cwd=tmp_path))
    np.testing.assert_array_equal(imageio.imread(tmp_path / "again.png"), imageio.imread(out / "warped.png"))
    # an existing output is replaced with --force (and only then: see the bad-input cases)
    monkeypatch.chdir(tmp_path)
    assert main(["apply", str(out / "transform.tfm"), str(data["folder"] / "moving.png"), "-o", "again.png",
                 "--force", "--quiet"]) == 0
    assert np.abs(imageio.imread(tmp_path / "again.png").astype(int)
                  - imageio.imread(out / "warped.png").astype(int)).max() <= 1


def test_apply_resamples_as_the_registration_did(data, tmp_path, monkeypatch, capsys):
    """apply resampled with bilinear whatever register had used: a bicubic registration's warped
    image and apply's output differed by 25 grey levels.  The transform file records it now; an
    explicit --interpolation still wins."""
    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out", "-q",
                 "-t", "translation", "--interpolation", "bicubic"]) == 0
    warped = imageio.imread(tmp_path / "out" / "warped.png")
    for name in ("transform.json", "transform.tfm"):
        assert main(["apply", str(tmp_path / "out" / name), str(folder / "moving.png"), "-o", f"{name}.png"]) == 0
        np.testing.assert_array_equal(imageio.imread(tmp_path / f"{name}.png"), warped)
        assert f"bicubic interpolation (as {name} records)" in capsys.readouterr().out
    assert main(["apply", str(tmp_path / "out" / "transform.json"), str(folder / "moving.png"), "-o", "bilinear.png",
                 "--interpolation", "bilinear", "-q"]) == 0
    assert np.abs(imageio.imread(tmp_path / "bilinear.png").astype(int) - warped.astype(int)).max() > 1
    # a recorded interpolation apply does not know was passed over without a word: bilinear, said
    saved = json.loads((tmp_path / "out" / "transform.json").read_text())
    saved["metadata"]["interpolation"] = "lanczos"
    (tmp_path / "lanczos.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["apply", "lanczos.json", str(folder / "moving.png"), "-o", "lanczos.png", "-q"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "tireg: warning: lanczos.json records the interpolation 'lanczos', which apply does not know; bilinear is "
        "used (--interpolation picks one of bilinear, bicubic, nearest)"]
    np.testing.assert_array_equal(imageio.imread(tmp_path / "lanczos.png"), imageio.imread(tmp_path / "bilinear.png"))


def test_apply_keeps_grey_and_alpha_as_alpha_in_a_tiff(data, registered, tmp_path, monkeypatch):
    """A grey + alpha PNG applied to a .tif had its alpha written as an UNSPECIFIED sample: Pillow
    opened the output as plain grey (RGBA came out as RGBA)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    grey = imageio.imread(data["folder"] / "moving.png")
    Image.fromarray(np.dstack([grey, np.full_like(grey, 200)]), "LA").save(tmp_path / "moving_la.png")
    assert main(["apply", str(registered[1] / "transform.json"), "moving_la.png", "-o", "warped.tif", "-q"]) == 0
    with Image.open(tmp_path / "warped.tif") as warped:
        assert warped.mode == "LA"


def test_apply_one_transform_to_every_page_of_a_stack(data, registered, tmp_path, monkeypatch):
    # one matrix for all pages (docs/cli.md): it was broadcast over the pages into a copy whose
    # batch dimension is innermost in memory, and the sampling grid's view() of it failed
    _, out = registered
    pages = np.stack([imageio.imread(data["folder"] / "moving.png")] * 2 + [imageio.imread(data["folder"] / "fixed.png")])
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    for index, page in enumerate(pages):
        imageio.imwrite(tmp_path / f"page{index}.png", page)
    monkeypatch.chdir(tmp_path)
    assert main(["apply", str(out / "transform.json"), "pages.tif", "-o", "warped.tif", "--quiet"]) == 0
    warped = tifffile.imread(tmp_path / "warped.tif")
    assert warped.shape == pages.shape and warped.dtype == pages.dtype
    for index in range(len(pages)):
        assert main(["apply", str(out / "transform.json"), f"page{index}.png", "-o", f"one{index}.png", "--quiet"]) == 0
        np.testing.assert_array_equal(warped[index], imageio.imread(tmp_path / f"one{index}.png"))
    np.testing.assert_array_equal(warped[0], imageio.imread(out / "warped.png"))


def test_apply_a_tfm_saved_with_geometries_as_saved(data, registered, tmp_path, monkeypatch):
    # saved in physical units with the images' spacing and origin, it was read as pixel = physical
    # (another matrix) with a warning to pass geometries, which apply has no option for
    _, out = registered
    saved = transform_io.load_transform(out / "transform.json")
    geometry = {"spacing": (0.25, 0.5), "origin": (12.0, -7.0)}
    transform_io.save_transform(tmp_path / "physical.tfm", saved.matrix, fixed_geometry=geometry, moving_geometry=geometry)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["apply", "physical.tfm", str(data["folder"] / "moving.png"), "-o", "again.png", "--quiet"]) == 0
    assert np.abs(imageio.imread(tmp_path / "again.png").astype(int)
                  - imageio.imread(out / "warped.png").astype(int)).max() <= 1


def test_apply_a_tfm_written_by_simpleitk_resamples_as_simpleitk_does(data, tmp_path):
    sitk = pytest.importorskip("SimpleITK")

    image = np.load(data["folder"] / "moving.npy").astype(np.float32)
    transform = sitk.Similarity2DTransform()
    transform.SetCenter((70.0, 60.0))
    transform.SetScale(1.05)
    transform.SetAngle(0.1)
    transform.SetTranslation((3.0, -2.0))
    sitk.WriteTransform(transform, str(tmp_path / "sitk.tfm"))
    np.save(tmp_path / "image.npy", image)
    ok(run("apply", "sitk.tfm", "image.npy", "-o", "warped.npy", cwd=tmp_path))
    warped = np.load(tmp_path / "warped.npy")
    assert warped.dtype == np.float32 and warped.shape == image.shape

    reference = sitk.GetImageFromArray(image)  # spacing 1, origin 0: physical = pixel coordinates
    expected = sitk.GetArrayFromImage(sitk.Resample(reference, reference, transform, sitk.sitkLinear, 0.0))
    height, width = image.shape
    ys, xs = np.mgrid[0:height, 0:width]
    mapped = np.array([transform.TransformPoint((float(x), float(y))) for x, y in zip(xs.ravel(), ys.ravel())])
    mapped = mapped.reshape(height, width, 2)
    inside = ((mapped[..., 0] >= 1) & (mapped[..., 0] <= width - 2)
              & (mapped[..., 1] >= 1) & (mapped[..., 1] <= height - 2))
    assert inside.mean() > 0.7
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-4)


# ----------------------------------------------------------------------------
# stack


@pytest.fixture(scope="module")
def drift(tmp_path_factory):
    """Six frames of a scene drifting and turning: frame_k(T_k x) = frame_0(x); 16-bit multi-page TIFF."""
    from tireg.data import coins

    folder = tmp_path_factory.mktemp("stack")
    scene = coins(dtype=torch.float64)[None, None]
    height, width, margin = 128, 160, 40
    center = tireg.image_center(height, width)
    to_scene = translation_matrix(torch.tensor([float(margin)] * 2, dtype=torch.float64))
    truths, frames = [], []
    shifts = [(0, 0), (4, -2), (6, -5), (5, -9), (2, -10), (-2, -9)]  # turning drift: the chain's order matters
    for k, (tx, ty) in enumerate(shifts):
        truth = TRANSFORMS["rigid"].matrix(torch.tensor([0.05 * k, tx, ty], dtype=torch.float64), center)
        truths.append(truth.numpy())
        frames.append(tireg.warp(scene, to_scene @ torch.linalg.inv(truth), size=(height, width),
                                 padding_mode="border")[0, 0].numpy())
    frames = np.rint(np.stack(frames) * 65535).astype(np.uint16)
    tifffile.imwrite(folder / "drift.tif", frames, photometric="minisblack")
    # a folder of 8-bit PNGs jittering by a few pixels (a microscope's stage)
    jitter = [(0, 0), (2, -1), (-1, 2), (3, 1), (1, -2), (-2, -1)]
    pngs = folder / "frames"
    pngs.mkdir()
    jitter_truths = []
    for k, shift in enumerate(jitter):
        truth = translation_matrix(torch.tensor(shift, dtype=torch.float64))
        jitter_truths.append(truth.numpy())
        frame = tireg.warp(scene, to_scene @ torch.linalg.inv(truth), size=(height, width))[0, 0].numpy()
        imageio.imwrite(pngs / f"t{k}.png", to_u8(frame))
    return folder, np.stack(truths), frames, np.stack(jitter_truths)


@pytest.mark.parametrize("reference", ["first", "previous", "mean"])
def test_stack_frame_mask_leaves_the_no_data_area_out_of_every_frame(drift, tmp_path, monkeypatch, reference):
    """--mask is the reference's only: a label burnt into every frame at one place (a no-data area)
    still counted in the moving frames, and moved the result 6-220 px with its value. --frame-mask
    leaves it out of every frame, as the moving image and as the reference."""
    from tireg.cli import main

    monkeypatch.chdir(tmp_path)
    _, truths, frames, _ = drift
    mask = np.full(frames.shape[1:], 255, np.uint8)
    mask[:, :30] = mask[100:] = 0
    imageio.imwrite(tmp_path / "mask.png", mask)
    found = {}
    for value in (0, 65535):
        labelled = frames.copy()
        labelled[:, mask == 0] = value
        np.save(tmp_path / f"stack{value}.npy", labelled.astype(np.float64) / 65535)
        assert main(["stack", f"stack{value}.npy", "-o", f"out{value}", "--reference", reference,
                     "--frame-mask", "mask.png", "-q"]) == 0
        found[value] = np.stack([matrix_of(row) for row in _check_stack(tmp_path / f"out{value}.csv", truths,
                                                                         frames.shape[1:])])
    np.testing.assert_allclose(found[0], found[65535], rtol=0, atol=1e-6)


def test_stack_mask_is_where_the_reference_counts_only(drift, tmp_path, monkeypatch):
    """--mask, a region of interest of the reference: each frame registered as register() does with
    that mask on the reference alone (05bb7c5 had applied it to the moving frames too, and a region
    smaller than the drift lost its overlap: 0.3-0.6 px errors became 0.4-1.3 px)."""
    from tireg.cli import main

    monkeypatch.chdir(tmp_path)
    folder, truths, frames, _ = drift
    region = np.zeros(frames.shape[1:], np.uint8)
    region[30:90, 40:120] = 255
    imageio.imwrite(tmp_path / "region.png", region)
    assert main(["stack", str(folder / "drift.tif"), "-o", "out.tif", "--mask", "region.png", "-q"]) == 0
    rows = _check_stack(tmp_path / "out.csv", truths, frames.shape[1:])
    grey = frames.astype(np.float64) / 65535
    alone = tireg.register(grey[0], grey[3], transform="rigid", mask=region > 0)
    np.testing.assert_allclose(matrix_of(rows[3]), alone.matrix.numpy(), rtol=0, atol=1e-6)


def _check_stack(csv_path: Path, truths: np.ndarray, size) -> list[dict]:
    rows = list(csv.DictReader(open(csv_path)))
    assert [int(r["frame"]) for r in rows] == list(range(len(truths)))
    for row, truth in zip(rows, truths):
        assert grid_error(torch.from_numpy(matrix_of(row)), torch.from_numpy(truth), size) < 0.5, row
    return rows


@pytest.mark.parametrize("reference", ["first", "previous"])
def test_stack_aligns_every_frame_to_the_first(drift, tmp_path, reference):
    folder, truths, frames, _ = drift
    process = ok(run("stack", folder / "drift.tif", "-o", "aligned.tif", "--reference", reference, cwd=tmp_path))
    assert "aligned 6 frames" in process.stdout
    aligned = tifffile.imread(tmp_path / "aligned.tif")
    assert aligned.dtype == np.uint16 and aligned.shape == frames.shape
    np.testing.assert_array_equal(aligned[0], frames[0])
    inside = (slice(20, -20), slice(20, -20))
    for frame, original in zip(aligned[1:], frames[1:]):
        error = np.abs(frame.astype(float) - frames[0])[inside].mean()
        assert error < 0.3 * np.abs(original.astype(float) - frames[0])[inside].mean()
    rows = _check_stack(tmp_path / "aligned.csv", truths, frames.shape[1:])
    assert float(rows[3]["angle_deg"]) == pytest.approx(np.degrees(0.15), abs=0.05)
    for row in rows:  # the angle in degrees is the matrix's, exactly: the closest R = [[c, s], [-s, c]] to its
        m = matrix_of(row)  # linear part maximises c (m00 + m11) + s (m01 - m10)
        angle = math.degrees(math.atan2(m[0, 1] - m[1, 0], m[0, 0] + m[1, 1]))
        assert math.isclose(float(row["angle_deg"]), angle, rel_tol=1e-12, abs_tol=1e-12), (row, angle)
    if reference == "previous":
        # The chain's order matters for this drift: frame 0 -> k is A_k ... A_1, and A_1 ... A_k is far off.
        pairs = [np.eye(3)] + [truths[k] @ np.linalg.inv(truths[k - 1]) for k in range(1, 6)]
        reversed_chain = pairs[1] @ pairs[2] @ pairs[3] @ pairs[4] @ pairs[5]
        assert grid_error(torch.from_numpy(reversed_chain), torch.from_numpy(truths[5]), frames.shape[1:]) > 2.0


def test_stack_against_the_mean_follows_a_drift(drift, tmp_path, monkeypatch):
    """One pass against the mean of the unaligned frames left each frame on its own faint copy in the
    mean, near the identity and 'converged' (frames 2 px apart came out 0.15 px apart); now the mean
    is of the frames aligned by a chained pass, on frame 0's grid, and every frame is registered to it."""
    folder, truths, frames, _ = drift
    monkeypatch.chdir(tmp_path)
    assert main(["stack", str(folder / "drift.tif"), "-o", "mean.tif", "--reference", "mean", "-q"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "mean.csv")))
    matrices = [matrix_of(row) for row in rows]
    assert all(row["converged"] == "True" for row in rows)
    for k in range(6):  # the mean lies on frame 0's grid: mean -> frame k is frame 0 -> frame k
        assert grid_error(torch.from_numpy(matrices[k]), torch.from_numpy(truths[k]), frames.shape[1:]) < 0.5, k


@pytest.mark.parametrize("option, expected", [([], "auto"), (["--compile"], True), (["--compile", "off"], False)])
def test_stack_hands_its_compile_choice_to_every_registration(drift, tmp_path, monkeypatch, option, expected):
    """--compile reaches register() (whose compiled path tests/test_fused.py checks against the
    reference): every frame's registration gets it, and the transforms are the registration's.
    In this process: a command starting Python compiled every kernel again (over a minute of CI)."""
    register_module = importlib.import_module("tireg.register")
    real, choices = register_module.register, []

    @functools.wraps(real)  # the parser reads register()'s defaults from its signature
    def spy(*args, **kwargs):
        choices.append(kwargs["compile"])
        return real(*args, **{**kwargs, "compile": False})

    monkeypatch.setattr(register_module, "register", spy)
    monkeypatch.chdir(tmp_path)
    folder, truths, frames, _ = drift
    assert main(["stack", str(folder / "drift.tif"), "-o", "aligned.tif", "-q", *option]) == 0
    assert choices and set(choices) == {expected}
    _check_stack(tmp_path / "aligned.csv", truths, frames.shape[1:])


def test_compile_option_maps_to_register():
    from tireg.cli import build_parser

    parser = build_parser()
    base = ["stack", "frames.tif", "-o", "out.tif"]
    assert parser.parse_args(base).compile == "auto"  # register()'s own default
    assert parser.parse_args(base + ["--compile"]).compile is True
    for text, value in (("on", True), ("off", False), ("auto", "auto")):
        assert parser.parse_args(base + ["--compile", text]).compile == value


def test_stack_of_a_folder_to_a_folder_against_the_mean(drift, tmp_path):
    folder, _, frames, truths = drift
    ok(run("stack", folder / "frames", "-o", "aligned", "--reference", "mean", "--transform", "translation",
           "--quiet", cwd=tmp_path))
    names = sorted(p.name for p in (tmp_path / "aligned").iterdir())
    assert names == [f"t{k}.png" for k in range(6)]
    assert imageio.imread(tmp_path / "aligned" / "t0.png").dtype == np.uint8
    rows = list(csv.DictReader(open(tmp_path / "aligned.csv")))
    assert [r["source"] for r in rows] == names
    # against the mean every matrix is relative to it; frame 0 -> frame k is M_k M_0^-1
    matrices = [matrix_of(r) for r in rows]
    for k in range(1, 6):
        relative = matrices[k] @ np.linalg.inv(matrices[0])
        assert grid_error(torch.from_numpy(relative), torch.from_numpy(truths[k]), frames.shape[1:]) < 0.5


def test_stack_into_an_existing_folder_replaces_only_its_own_files(drift, tmp_path, monkeypatch):
    """--force replaced the whole folder (the user's other files went); a CSV inside the output
    folder was refused as 'already exists', or dropped with --force."""
    folder = drift[0]
    out = tmp_path / "aligned"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "t0.png").write_text("old")
    monkeypatch.chdir(tmp_path)
    options = ["--transform", "translation", "--quiet"]
    frames = str(folder / "frames")
    assert main(["stack", frames, "-o", "aligned", "--force", "--csv", "aligned/drift.csv", *options]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub").is_dir()
    assert sorted(p.name for p in out.glob("t*.png")) == [f"t{k}.png" for k in range(6)]
    assert imageio.imread(out / "t0.png").dtype == np.uint8  # the old t0.png replaced
    assert len(list(csv.DictReader(open(out / "drift.csv")))) == 6
    assert main(["stack", frames, "-o", "fresh", "--csv", "fresh/drift.csv", *options]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "fresh" / "drift.csv")))) == 6
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # no temporary left


def test_stack_into_an_existing_empty_folder_and_a_frame_that_exists(drift, tmp_path, monkeypatch):
    """An existing (empty) output folder was refused as 'already exists' (register's -o took it): it
    takes the frames; a frame file already there still needs --force, named before the work."""
    frames = str(drift[0] / "frames")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aligned").mkdir()
    options = ["--transform", "translation", "--quiet"]
    assert main(["stack", frames, "-o", "aligned/", *options]) == 0
    assert sorted(p.name for p in (tmp_path / "aligned").iterdir()) == [f"t{k}.png" for k in range(6)]
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "t3.png").write_text("keep me")
    assert main(["stack", frames, "-o", "again", *options]) == 1
    assert (tmp_path / "again" / "t3.png").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["t3.png"]


def test_outputs_take_the_format_their_content_is_in(data, tmp_path, monkeypatch, capsys):
    """A 16-bit PNG named .jpg (Pillow reads by content) failed after the work: JPEG cannot hold 16
    bits, named by a temporary file.  Now warped and aligned frames take the content's suffix; a
    float TIFF named .png is refused before the work (as a TIFF under a .png name, by the reader)."""
    monkeypatch.chdir(tmp_path)
    source = data["folder"]
    wide = np.rint(imageio.imread(source / "moving.png").astype(np.float64) * 257).astype(np.uint16)
    imageio.imwrite(tmp_path / "moving16.png", wide)
    os.replace(tmp_path / "moving16.png", tmp_path / "moving16.jpg")
    imageio.imwrite(tmp_path / "fixed16.png", np.rint(imageio.imread(source / "fixed.png") * 257.0).astype(np.uint16))
    assert main(["register", "fixed16.png", "moving16.jpg", "-o", "out", "-t", "translation", "-q"]) == 0
    assert imageio.imread(tmp_path / "out" / "warped.png").dtype == np.uint16
    assert not (tmp_path / "out" / "warped.jpg").exists()
    (tmp_path / "frames").mkdir()
    for k in range(2):
        shutil.copy(tmp_path / "moving16.jpg", tmp_path / "frames" / f"f{k}.jpg")
    assert main(["stack", "frames", "-o", "aligned", "-t", "translation", "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "aligned").iterdir()) == ["f0.png", "f1.png"]
    shutil.copy(source / "moving32.tif", tmp_path / "float.png")  # a float32 TIFF named .png
    capsys.readouterr()
    assert main(["register", "fixed16.png", "float.png", "-o", "bad", "-t", "translation", "-q"]) == 1
    error = capsys.readouterr().err
    assert "moving image 'float.png' is a TIFF file under a '.png' name" in error, error
    assert ".tmp" not in error and not (tmp_path / "bad").exists()


def test_a_failed_write_names_the_output_not_its_temporary(data, registered, tmp_path, monkeypatch, capsys):
    """A full disk said "tireg: error: 294912 requested and 102272 written", or named a hidden temporary."""
    monkeypatch.chdir(tmp_path)

    def short_write(*args, **kwargs):
        raise OSError("294912 requested and 102272 written")

    monkeypatch.setattr(tireg.io, "_write_data", short_write)
    assert main(["apply", str(registered[1] / "transform.json"), str(data["folder"] / "moving.png"),
                 "-o", "out.png"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == ("tireg: error: 'out.png': 294912 requested and 102272 written (a short write: is the disk "
                     "full?)"), error
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["os.fsync", "tireg.viz._save"])  # fsync: the transform files' last step
def test_a_full_disk_names_the_transform_or_picture_it_stopped(data, tmp_path, monkeypatch, capsys, where):
    """A transform file or a picture that failed for a full disk said only "No space left on device"."""
    import errno

    monkeypatch.chdir(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    module, _, name = where.rpartition(".")
    monkeypatch.setattr(__import__("importlib").import_module(module), name, full)
    folder = data["folder"]
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out", "-q",
                 "-t", "translation"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("tireg: error: 'out/") and error.endswith("': No space left on device"), error
    assert ".tmp" not in error and not (tmp_path / "out").exists()


#: Runs the command with a SIGTERM sent to itself once the first output (the warped image) lies
#: written under its temporary name, inside the folders the command created.
SIGTERM_SCRIPT = """\
import os, signal, sys
import torch
torch.set_num_threads(1)
import tireg.cli as cli
written = cli.write_frames
def write_then_terminate(*args, **kwargs):
    path = written(*args, **kwargs)
    print("written", os.path.basename(path), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    return path
cli.write_frames = write_then_terminate
status = cli.main(sys.argv[1:])
print("the program went on", status, flush=True)
"""


def test_sigterm_leaves_no_temporary_file_and_no_created_folder(data, tmp_path):
    """SIGTERM (kill, a scheduler's time limit) ended the process at once: the hidden temporaries
    and the folders the command had created stayed behind; Ctrl-C alone was cleaned up."""
    script, work = tmp_path / "terminate.py", tmp_path / "work"
    script.write_text(SIGTERM_SCRIPT)
    work.mkdir()
    folder = data["folder"]
    process = subprocess.run([sys.executable, str(script), "register", str(folder / "fixed.png"),
                              str(folder / "moving.png"), "-o", "out/deeper", "-t", "translation", "-q"],
                             cwd=work, capture_output=True, text=True, timeout=300, env=_env())
    assert process.stdout.startswith("written .tireg-"), process.stdout  # the signal came mid-write
    # then the process ends by SIGTERM, as it would have without tireg (143 in a shell): a program
    # calling main() had gone on, with main() returning 143
    assert process.returncode == -signal.SIGTERM and "went on" not in process.stdout, process.stderr
    assert process.stderr.strip() == "tireg: terminated; no output written", process.stderr
    assert not list(work.iterdir())  # no out/, no out/deeper/, no .tireg-*.tmp.png


def test_sigterm_handler_is_put_back_and_a_programs_own_is_kept(data, tmp_path, monkeypatch):
    """main() handles SIGTERM only over the default, and only while it runs."""
    import tireg.cli as cli

    seen = []
    reading = cli.read_image

    def read_and_look(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return reading(*args, **kwargs)

    monkeypatch.setattr(cli, "read_image", read_and_look)
    monkeypatch.chdir(tmp_path)
    transform_io.save_transform(tmp_path / "identity.json", torch.eye(3, dtype=torch.float64))
    argv = ["apply", "identity.json", str(data["folder"] / "moving.png"), "-o", "out.png", "-q"]
    own = lambda signum, frame: None  # noqa: E731 - a host program's handler
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert main(argv) == 0
        assert seen[-1] is cli._raise_terminated and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGTERM, own)
        assert main([*argv, "--force"]) == 0
        assert seen[-1] is own and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


#: The ``tireg`` script's entry point (``{module}:{function}``, from pyproject.toml) run as the script
#: runs it, with ``import torch`` held until Ctrl-C comes: it announces itself, then waits.
HELD_IMPORT_SCRIPT = """\
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, where the tests' SIGINT may be ignored

class HeldImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(60)
        return None

sys.meta_path.insert(0, HeldImport())
from {module} import {function}
sys.exit({function}())
"""


def test_ctrl_c_while_the_command_imports_torch_is_its_interrupt_not_a_traceback(tmp_path):
    """Ctrl-C in the first ~2.5 s, while tireg's package imported torch before main() handled it,
    printed Python's KeyboardInterrupt traceback instead of the command's line and status 130."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, function = re.search(r'^tireg = "([\w.]+):(\w+)"', text, re.MULTILINE).groups()
    script = HELD_IMPORT_SCRIPT.format(module=module, function=function)
    process = subprocess.Popen([sys.executable, "-c", script, "stack", "in.tif", "-o", "out.tif"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert process.stdout.readline() == "importing torch\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, out, err) == (130, "", "tireg: interrupted; no output written\n")
    assert not list(tmp_path.iterdir())
    # and run to its end, it is the command
    process = subprocess.run([sys.executable, "-c", f"import sys\nfrom {module} import {function}\nsys.exit({function}())",
                              "--version"], capture_output=True, text=True, timeout=120, env=_env())
    assert process.returncode == 0 and process.stdout.startswith("tireg "), process.stderr


def test_the_stack_csv_names_each_column_once_and_applies_to_another_channel(drift, tmp_path, monkeypatch):
    """The affine kind's parameters a00 .. a11 and the matrix's a00 .. a12 shared names; no command
    could apply a stack's matrices to another file (a second channel of the same frames)."""
    monkeypatch.chdir(tmp_path)
    assert main(["stack", str(drift[0] / "drift.tif"), "-o", "out.tif", "-t", "affine", "-q"]) == 0
    header = next(csv.reader(open(tmp_path / "out.csv")))
    assert len(header) == len(set(header)) and header[header.index("m00"):header.index("m12") + 1] == [
        "m00", "m01", "m02", "m10", "m11", "m12"]
    # "another channel" of the same frames: the stack's own file, page k by matrix k, as stack wrote it
    assert main(["apply", "out.csv", str(drift[0] / "drift.tif"), "-o", "again.tif", "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "again.tif"), tifffile.imread(tmp_path / "out.tif"))
    # resampled as the stack was: its CSV records the interpolation (apply had taken bilinear)
    assert main(["stack", str(drift[0] / "drift.tif"), "-o", "cubic.tif", "--interpolation", "bicubic", "-q"]) == 0
    assert {row["interpolation"] for row in csv.DictReader(open(tmp_path / "cubic.csv"))} == {"bicubic"}
    assert main(["apply", "cubic.csv", str(drift[0] / "drift.tif"), "-o", "again_cubic.tif", "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "again_cubic.tif"), tifffile.imread(tmp_path / "cubic.tif"))
    (tmp_path / "odd.csv").write_text("frame,a00\n0,1\n")
    assert main(["apply", "odd.csv", str(drift[0] / "drift.tif"), "-o", "x.tif", "-q"]) == 1
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("reference", ["first", "previous", "mean"])
def test_a_constant_frame_is_passed_over_with_the_last_reliable_frames_transform(drift, tmp_path, monkeypatch,
                                                                                  capsys, reference):
    """A dropped (all 0) or white frame stopped the whole stack ('nothing to align it by (leave it out
    of the stack)'), and leaving it out renumbered the frames after it.  It is not registered, is
    marked 'blank', takes the transform of the frame before it (so that apply of the CSV to another
    channel keeps it in place), and the chain passes around it."""
    monkeypatch.chdir(tmp_path)
    _, truths, frames, _ = drift
    frames = frames.copy()
    frames[2] = 0
    frames[4] = 65535
    tifffile.imwrite(tmp_path / "blank.tif", frames)
    assert main(["stack", "blank.tif", "-o", "out.tif", "--reference", reference]) == 0
    out = capsys.readouterr().out
    assert "frame 2 is constant (every pixel 0): not registered, given frame 1's transform" in out
    assert "frame 4 is constant (every pixel 65535): not registered, given frame 3's transform" in out
    assert "not converged: frames 2, 4 (blank)" in out
    if reference != "first":
        assert "frame 3 registered to frame 1 directly: the chain skips frame 2" in out
        assert "frame 5 registered to frame 3 directly: the chain skips frame 4" in out
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    for k in (2, 4):
        assert rows[k]["converged"] == "False" and rows[k]["stop_reason"] == "blank", rows[k]
        np.testing.assert_array_equal(matrix_of(rows[k]), matrix_of(rows[k - 1]))
    for k in (0, 1, 3, 5):
        assert rows[k]["converged"] == "True", rows[k]
        assert grid_error(torch.from_numpy(matrix_of(rows[k])), torch.from_numpy(truths[k]), frames.shape[1:]) < 0.5
    assert main(["apply", "out.csv", "blank.tif", "-o", "again.tif", "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "again.tif"), tifffile.imread(tmp_path / "out.tif"))


def test_a_constant_first_frame_or_a_stack_of_one_image_is_refused(drift, tmp_path, monkeypatch, capsys):
    """Frame 0 is the reference of every --reference (of mean's first pass), and a stack whose other
    frames are all constant has nothing to register: both stay errors, named as frames."""
    monkeypatch.chdir(tmp_path)
    frames = tifffile.imread(drift[0] / "drift.tif")
    first = frames.copy()
    first[0] = 0
    tifffile.imwrite(tmp_path / "first.tif", first)
    assert main(["stack", "first.tif", "-o", "out.tif", "-q"]) == 1
    assert ("stack 'first.tif': its first frame 'first.tif page 0' is constant (every pixel 0); it is the "
            "reference the other frames are aligned to") in capsys.readouterr().err
    alone = frames.copy()
    alone[1:] = 7
    tifffile.imwrite(tmp_path / "alone.tif", alone)
    assert main(["stack", "alone.tif", "-o", "out.tif", "-q"]) == 1
    assert ("stack 'alone.tif': every frame but its first ('alone.tif page 1' ... 'alone.tif page 5') is "
            "constant; nothing to register") in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists() and not (tmp_path / "out.csv").exists()


@pytest.fixture(scope="module")
def walk():
    """20 frames of coins walking by random steps of about 1 px and 0.3 deg, 16-bit: (frames, truths),
    and the same walk over camera (another scene, for a cut)."""
    from tireg.data import camera, coins

    height, width, margin = 128, 160, 40
    center = tireg.image_center(height, width)
    rng = np.random.default_rng(1)
    shifts = np.cumsum(np.r_[[[0.0, 0.0]], rng.normal(0, 0.8, (19, 2))], axis=0)
    angles = np.cumsum(np.r_[0.0, rng.normal(0, 0.005, 19)])
    truths = np.stack([TRANSFORMS["rigid"].matrix(torch.tensor([a, tx, ty], dtype=torch.float64), center).numpy()
                       for a, (tx, ty) in zip(angles, shifts)])
    scenes = []
    for scene, offset in ((coins, margin), (camera, 150)):
        image = scene(dtype=torch.float64)[None, None]
        to_scene = translation_matrix(torch.tensor([float(offset)] * 2, dtype=torch.float64))
        scenes.append(np.stack([tireg.warp(image, to_scene @ torch.linalg.inv(torch.from_numpy(truth)),
                                           size=(height, width), padding_mode="border")[0, 0].numpy()
                                for truth in truths]))
    return scenes[0], scenes[1], truths


@pytest.mark.parametrize("reference", ["first", "previous", "mean"])
def test_a_frame_that_fits_its_reference_poorly_is_unreliable(walk, tmp_path, monkeypatch, capsys, reference):
    """A frame saturated 3x (4), a noisy fade to 2 % contrast (7, 8) and a cut to another scene
    (15-19): each 'converged' on its metric, and previous chained through them (the cut's link at
    -109 deg turned every later frame; the fade shifted them 0.6 px), mean averaged them into its
    mean (every frame 0.3-0.4 px off).  A frame whose overlap NCC with its reference is far below
    the stack's other frames' is unreliable (poor_fit): bridged, left out of the mean.  No frame of
    the clean stack is, with NCC and with MI."""
    monkeypatch.chdir(tmp_path)
    scene, other, truths = walk
    size = scene.shape[1:]

    def errors(rows):
        return [grid_error(torch.from_numpy(matrix_of(row)), torch.from_numpy(truth), size)
                for row, truth in zip(rows, truths)]

    for metric in ("ncc", "mi"):
        tifffile.imwrite(tmp_path / "clean.tif", np.rint(scene * 65535).astype(np.uint16))
        assert main(["stack", "clean.tif", "-o", f"{metric}.tif", "-r", reference, "-m", metric, "-q"]) == 0
        rows = list(csv.DictReader(open(tmp_path / f"{metric}.csv")))
        assert all(row["converged"] == "True" and float(row["fit"]) > 0.98 or row["fit"] == "nan"
                   for row in rows), rows
    frames = scene.copy()
    frames[4] = np.clip(3 * frames[4], 0, 1)
    noise = np.random.default_rng(5).normal(0, 0.01, frames[7:9].shape)
    frames[7:9] = np.clip(0.02 * frames[7:9] + 0.02 + noise, 0, 1)
    frames[15:] = other[15:]
    tifffile.imwrite(tmp_path / "bad.tif", np.rint(frames * 65535).astype(np.uint16))
    assert main(["stack", "bad.tif", "-o", "out.tif", "-r", reference]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    poor = [k for k, row in enumerate(rows) if row["stop_reason"] == "poor_fit"]
    unreliable = [k for k, row in enumerate(rows) if row["converged"] == "False"]
    assert unreliable == [4, 7, 8, *range(15, 20)] and 4 in poor, (unreliable, poor)  # some stall too
    assert "poor_fit: the frame fits its reference (their overlap NCC) below 0.7" in out
    if reference != "first":
        assert "frame 9 registered to frame 6 directly: the chain skips frames 7-8" in out
    reliable = [error for k, error in enumerate(errors(rows)) if k not in unreliable]
    assert max(reliable) < 0.1, reliable
def test_the_largest_shift_and_rotation_are_over_the_frames_that_converged(walk, tmp_path, monkeypatch, capsys):
    """The summary's largest shift and rotation took in the frames it called unreliable: after a cut,
    a frame of another scene 'aligned' 140 px off to the first frame was the stack's largest shift."""
    monkeypatch.chdir(tmp_path)
    scene, other, truths = walk
    frames = scene.copy()
    frames[15:] = other[15:]
    tifffile.imwrite(tmp_path / "cut.tif", np.rint(frames * 65535).astype(np.uint16))
    assert main(["stack", "cut.tif", "-o", "out.tif"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "largest shift" in line)
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [row["converged"] for row in rows] == ["True"] * 15 + ["False"] * 5
    center = np.array([*tireg.image_center(*frames.shape[1:]), 1.0])
    shifts = np.linalg.norm((truths[:15] @ center)[:, :2] - center[:2], axis=1)
    angles = np.degrees(np.arctan2(truths[:15, 0, 1] - truths[:15, 1, 0], truths[:15, 0, 0] + truths[:15, 1, 1]))
    found = re.search(r"largest shift of the centre ([\d.]+) px \(frame (\d+)\), largest rotation ([\d.]+) deg "
                      r"\(frame (\d+)\), over the 15 frames that converged", line)
    assert found, line
    assert float(found[1]) == pytest.approx(shifts.max(), abs=0.05) and int(found[2]) == shifts.argmax(), line
    assert float(found[3]) == pytest.approx(np.abs(angles).max(), abs=0.02), line
    assert int(found[4]) == np.abs(angles).argmax(), line


def test_an_output_without_a_name_is_refused(data, drift, tmp_path, monkeypatch, capsys):
    """-o "" wrote every output of register into the current folder; a stack's frames into '.' or
    '..' named their CSV '.csv' ('must end in .csv') or '...csv'."""
    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", ""]) == 2
    assert "argument -o/--output: expected a path; got ''" in capsys.readouterr().err
    for output in (".", ".."):
        assert main(["stack", str(drift[0] / "drift.tif"), "-o", output, "-q"]) == 2  # a wrong command line
        assert f"-o '{output}': the frames' folder has no name of its own for the CSV" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_apply_puts_a_stack_csv_row_on_its_frame(drift, tmp_path, monkeypatch, capsys):
    """The rows were applied by position: sorted or edited by hand, each matrix went to another
    page without a word.  The frame column decides; a duplicate, a gap or a non-number is refused."""
    monkeypatch.chdir(tmp_path)
    stack = str(drift[0] / "drift.tif")
    assert main(["stack", stack, "-o", "out.tif", "-t", "translation", "-q"]) == 0
    header, *rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert len(rows) > 2

    def written(name, rows, encoding="utf-8"):
        with open(tmp_path / name, "w", newline="", encoding=encoding) as handle:
            csv.writer(handle).writerows([header, *rows])
        return name

    assert main(["apply", written("reversed.csv", rows[::-1]), stack, "-o", "reversed.tif", "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "reversed.tif"), tifffile.imread(tmp_path / "out.tif"))
    # saved with a byte-order mark (a spreadsheet's "CSV UTF-8"): its first column read "\ufeffframe",
    # and the rows went on by position again
    assert main(["apply", written("marked.csv", rows[::-1], "utf-8-sig"), stack, "-o", "marked.tif", "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "marked.tif"), tifffile.imread(tmp_path / "out.tif"))
    frame = header.index("frame")
    for name, edit, message in [
        ("twice.csv", lambda r: r[1].__setitem__(frame, r[0][frame]), "frame 0 is in rows 1 and 2"),
        ("past.csv", lambda r: r[1].__setitem__(frame, str(len(r))), f"row 2 has frame '{len(rows)}'"),
        ("word.csv", lambda r: r[1].__setitem__(frame, "x"), "row 2 has frame 'x'"),
    ]:
        edited = [list(row) for row in rows]
        edit(edited)
        capsys.readouterr()
        assert main(["apply", written(name, edited), stack, "-o", "bad.tif", "-q"]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "bad.tif").exists()


def test_levels_that_end_coarse_warn_and_help_shows_only_real_defaults(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out", "-q",
                 "-t", "translation", "--levels", "1,2"]) == 0
    # in the command's words: it said "the pyramid (1, 2) ... e.g. (4, 2, 1)", register()'s Python ones
    assert capsys.readouterr().err.splitlines() == [
        "tireg: warning: --levels 1,2 ends at shrink factor 2: the result is found at 1/2 of the resolution "
        "(shrink factors go from coarse to fine and end with 1 for full resolution, e.g. --levels 4,2,1)"]
    # one level keeps its comma: '--levels 4' is four levels (8, 4, 2, 1)
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out4", "-q",
                 "-t", "translation", "--levels", "4,"]) == 0
    assert capsys.readouterr().err.startswith("tireg: warning: --levels 4, ends at shrink factor 4:")
    assert main(["register", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "otherwise) (default" not in text and "(default: affine)" in text


def test_gauss_newton_with_a_metric_it_cannot_serve_is_refused_in_the_commands_words(data, tmp_path, monkeypatch,
                                                                                      capsys):
    """--metric mi --optimizer gauss-newton printed register()'s "use optimizer='lbfgs' (the default for
    'mi') or 'adam'", after reading the images."""
    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    for command in (["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out"],
                    ["stack", "missing.tif", "-o", "aligned.tif"]):
        assert main([*command, "--metric", "mi", "--optimizer", "gauss-newton"]) == 2
        assert capsys.readouterr().err.strip() == (
            "tireg: error: --optimizer gauss-newton needs a per-pixel loss (--metric l2, cauchy, ...) or --metric ncc "
            "or ncc_any; for --metric mi use --optimizer lbfgs (what the default, --optimizer auto, picks for it) or "
            f"adam (see 'tireg {command[0]} --help')")
    assert not list(tmp_path.iterdir())


def test_the_commands_optimizer_check_is_register_s_rule():
    """The command refuses --optimizer gauss-newton for exactly the metrics register() refuses it for."""
    import argparse

    import tireg.cli as cli
    from tireg.losses import LOSSES
    from tireg.metrics import METRIC_NAMES

    image = torch.rand(16, 16, generator=torch.Generator().manual_seed(0))
    for metric in dict.fromkeys([*LOSSES, *METRIC_NAMES]):  # --metric's choices
        try:
            tireg.register(image, image, metric=metric, optimizer="gauss-newton", gradients="analytic",
                           pyramid=(1,), init="identity", max_iterations=1)
            refused = False
        except ValueError as error:
            assert "Gauss-Newton needs" in str(error)
            refused = True
        try:
            cli._check_optimizer(argparse.Namespace(metric=metric, optimizer="gauss-newton", command="register"))
        except cli.UsageError:
            assert refused, metric
        else:
            assert not refused, metric


def test_a_jpeg_with_a_second_picture_reads_its_main_one(tmp_path):
    """A camera's MPO JPEG (a preview after the main picture) is not an animation."""
    from PIL import Image

    from tireg.io import read_image

    pixels = (np.indices((48, 64)).sum(0) * 2).astype(np.uint8)
    rgb = np.dstack([pixels, pixels[::-1], 255 - pixels])
    Image.fromarray(rgb).save(tmp_path / "mpo.jpg", format="MPO", save_all=True,
                              append_images=[Image.fromarray(rgb[::4, ::4].copy())], quality=100)
    image = read_image(tmp_path / "mpo.jpg", what="image")
    assert image.size == (48, 64) and np.abs(image.frames[0].astype(float) - rgb).mean() < 3


def test_a_stack_with_a_name_that_is_not_utf8_writes_its_csv(drift, tmp_path, monkeypatch):
    """The CSV's 'source' column failed to encode such a name, after the work."""
    name = os.fsdecode(b"drift\xff.tif")
    shutil.copy(drift[0] / "drift.tif", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["stack", name, "-o", "aligned.tif", "-q", "--transform", "translation"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "aligned.csv", encoding="utf-8", errors="surrogateescape")))) == 6


def test_a_file_name_with_dollars_is_plain_text_in_the_picture(data, tmp_path, monkeypatch):
    """matplotlib read 'm$_$.png' in the picture's title as mathematics and failed after the work."""
    shutil.copy(data["folder"] / "moving.png", tmp_path / "m$_$.png")
    monkeypatch.chdir(tmp_path)
    fixed = str(data["folder"] / "fixed.png")
    assert main(["register", fixed, "m$_$.png", "-o", "out", "-t", "translation", "-q"]) == 0
    assert (tmp_path / "out" / "before_after.png").stat().st_size > 0


def test_colour_spaces_and_orientation_are_read_as_viewers_show_them(tmp_path):
    """A CMYK JPEG was four channels taken as RGBA; an EXIF orientation was ignored; an LZW TIFF
    (ImageJ's default) needed a codec package that the cli extra lacked."""
    from PIL import Image

    from tireg.io import read_image

    pixels = (np.arange(40 * 60) % 200).astype(np.uint8).reshape(40, 60)
    rgb = np.stack([pixels, pixels[::-1], 255 - pixels], -1)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = read_image(tmp_path / "cmyk.jpg", what="image")
    assert cmyk.channels == 3 and np.abs(cmyk.frames[0].astype(float) - rgb).mean() < 4
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "turned.jpg", what="image").size == (60, 40)
    tifffile.imwrite(tmp_path / "lzw.tif", pixels, compression="lzw")
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif", what="image").frames[0, :, :, 0], pixels)


@pytest.mark.parametrize("scale, offset", [(1e305, 0.0), (1e-320, 0.0), (1.0, 1e8)])
def test_float_files_at_the_ends_of_float64_register(data, tmp_path, monkeypatch, scale, offset):
    """Values near float64's limits overflowed a deviation ('constant', with numpy warnings) or
    became inf or 0 in float32; detail on a large offset was lost in a cast to float32 ('constant').
    register() normalises float64 in float64; the outputs are written as they were."""
    folder = data["folder"]
    for name in ("fixed", "moving"):
        np.save(tmp_path / f"{name}.npy", np.load(folder / f"{name}.npy") * scale + offset)
    monkeypatch.chdir(tmp_path)
    assert main(["register", "fixed.npy", "moving.npy", "-o", "out", "-q"]) == 0
    saved = tireg.transform_io.load_transform(tmp_path / "out" / "transform.json")
    assert grid_error(saved.matrix.reshape(3, 3), torch.from_numpy(data["truth"]), data["size"]) < 0.5
    warped = np.load(tmp_path / "out" / "warped.npy")
    inside = warped[16:-16, 16:-16]  # away from the zeros where the moving image does not reach
    assert np.isfinite(warped).all() and 0.1 * scale < np.abs(inside - offset).max() < 10 * scale


def test_an_output_folder_that_takes_no_files_is_named_before_the_work(tmp_path, monkeypatch):
    """A read-only folder failed after the work, naming a doubly temporary file.  (The check asks
    os.access, which a root user passes; it is stubbed here as a user's read-only folder.)"""
    from tireg.io import OutputFiles

    locked = tmp_path / "ro"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr("tireg.io.os.access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(PermissionError, match=r"cannot write '.*ro/sub/w.png': the folder '.*ro' is not writable"):
        OutputFiles().check(locked / "sub" / "w.png")
    OutputFiles().check(tmp_path / "elsewhere" / "w.png")  # a writable parent: no error
    existing = tmp_path / "frames"
    existing.mkdir()  # an existing output folder takes its temporary inside it: its parent may be read-only
    assert OutputFiles().temporary(existing).parent == existing


# ----------------------------------------------------------------------------
# demo and help


def test_demo_prints_recovered_and_true_and_writes_pictures(tmp_path):
    process = ok(run("demo", cwd=tmp_path))
    assert "true" in process.stdout and "recovered" in process.stdout and "tireg-demo" in process.stdout
    out = tmp_path / "tireg-demo"
    # the printed angle in degrees is the saved angle in radians, converted (to its 4 printed decimals)
    row = re.search(r"angle \(deg\)\s+(\S+)\s+(\S+)\s+(\S+)", process.stdout)
    true, recovered, error = (float(value) for value in row.groups())
    saved = json.loads((out / "transform.json").read_text())["parameters"]["angle"]
    assert abs(recovered - math.degrees(saved)) <= 5.1e-5, (recovered, saved)
    assert true == DEMO_TRUTH["angle_deg"] and abs(error - (recovered - true)) <= 1.1e-4
    assert abs(recovered - true) < 0.05  # the demo turns its image by 10 degrees and finds it
    for name in ("fixed.png", "moving.png", "warped.png", "before_after.png", "convergence.png"):
        assert_png(out / name)
    assert (out / "transform.tfm").is_file() and (out / "transform.json").is_file()
    # the line names every file written (it had said "pictures in" and left out the two transforms)
    written = re.search(r"wrote in (\S+)/: (.+)", process.stdout).group(2).split(", ")
    assert sorted(written) == sorted(path.name for path in out.iterdir()), written


@pytest.mark.parametrize("command", [[], ["register"], ["apply"], ["stack"], ["demo"]])
def test_help_on_every_command_has_an_example(command, capsys):
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: tireg" in text and "example" in text and "tireg " + " ".join(command) in text


def test_readme_shows_the_register_picture_and_the_command_that_made_it():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert "tireg register tireg-demo/fixed.png tireg-demo/moving.png" in readme
    picture = root / "docs" / "images" / "register_before_after.png"
    assert f"]({picture.relative_to(root).as_posix()})" in readme
    assert_png(picture)
    assert picture.stat().st_size < 400_000


@pytest.mark.skipif(shutil.which("tireg") is None, reason="the tireg entry point is not on PATH")
def test_the_installed_entry_point_runs():
    process = subprocess.run(["tireg", "--version"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0 and process.stdout.startswith("tireg ")


# ----------------------------------------------------------------------------
# bad input: a non-zero exit, one line naming the problem, no output file

BAD = {
    # name: (arguments, exit status, words the message must contain)
    "missing file": (["register", "{in}/absent.png", "{in}/moving.png", "-o", "out"], 1, "no such file"),
    "empty file": (["register", "{in}/zero.png", "{in}/moving.png", "-o", "out"], 1, "empty"),
    "corrupt file": (["register", "{in}/corrupt.png", "{in}/moving.png", "-o", "out"], 1, "cannot read"),
    "unsupported suffix": (["register", "{in}/image.bmp", "{in}/moving.png", "-o", "out"], 1, "unsupported"),
    "channel mismatch": (["register", "{in}/fixed_rgb.png", "{in}/moving.png", "-o", "out"], 1, "channel"),
    "constant image": (["register", "{in}/constant.png", "{in}/moving.png", "-o", "out"], 1, "constant"),
    "empty array": (["register", "{in}/empty.npy", "{in}/moving.png", "-o", "out"], 1, "empty"),
    "NaN": (["register", "{in}/nan.npy", "{in}/moving.npy", "-o", "out"], 1, "NaN"),
    "mask size": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--mask", "{in}/small.png"], 1,
                  "must match"),
    "multi-page to register": (["register", "{in}/stack.tif", "{in}/moving.png", "-o", "out"], 1, "tireg stack"),
    "unknown transform": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "-t", "wobble"], 2,
                          "invalid choice"),
    "unknown option": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--wobble"], 2,
                       "unrecognized"),
    "unknown command": (["wobble"], 2, "invalid choice"),
    "unknown option alone": (["register", "--wobble"], 2, "unrecognized arguments: --wobble"),  # said: MOVING required
    "abbreviation, MOVING missing": (["register", "{in}/fixed.png", "--trans", "affine", "-o", "out"], 2,
                                     "required: MOVING"),  # --trans is --transform, not unknown
    "masks apart": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--mask", "{in}/corner_tl.png",
                     "--moving-mask", "{in}/corner_br.png", "--init", "identity"], 1, "do not overlap"),
    "too many levels": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--levels", "10" * 10], 2,
                        "at most 16 levels"),  # 2**k of a huge k grew memory without end
    "compile before the images": (["register", "--compile", "{in}/fixed.png", "{in}/moving.png", "-o", "out"], 2,
                                  "put it after the images"),  # said only: expected auto, on or off
    "unknown compile choice": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--compile", "fast"], 2,
                               "expected auto, on or off"),
    "existing output": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out"], 1, "--force"),
    "missing transform": (["apply", "{in}/absent.tfm", "{in}/moving.png", "-o", "out.png"], 1, "no such file"),
    "corrupt transform": (["apply", "{in}/bad.tfm", "{in}/moving.png", "-o", "out.png"], 1, "bad.tfm"),
    "palette TIFF": (["register", "{in}/fixed.png", "{in}/palette.tif", "-o", "out"], 1,
                     "photometric PALETTE (indices into a colour table)"),  # registered on its indices
    "text as PNG": (["register", "{in}/fixed.png", "{in}/text.png", "-o", "out"], 1,
                    "as PNG: cannot identify image file"),  # imageio's SimpleITK fallback spoke
    "singular transform": (["apply", "{in}/flat.json", "{in}/moving.png", "-o", "out.png"], 1,
                           "is singular"),  # it wrote a blank image, exit 0
    # wrong command lines exit 2, as the documented rule says (they exited 1)
    "image name as folder": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "aligned.png"], 2,
                             "writes a folder of outputs"),  # it made a folder named aligned.png
    "folder as transform": (["apply", "{in}/mixed", "{in}/moving.png", "-o", "out.png"], 1,
                            "is a folder, not a transform file"),  # it said: unsupported suffix '(none)'
    # load_transform's message left out the stack's .csv and named no argument
    "spreadsheet as transform": (["apply", "{in}/drift.xls", "{in}/moving.png", "-o", "out.png"], 1,
                                 "drift.xls': unsupported suffix '.xls'; apply reads a transform file "
                                 "(.json, .tfm, .txt) or a stack's per-frame .csv"),
    "arguments swapped": (["apply", "{in}/moving.png", "{in}/flat.json", "-o", "out.png"], 2,
                          "looks like an image: the transform comes first"),
    "binary transform": (["apply", "{in}/t.h5", "{in}/moving.png", "-o", "out.png"], 1, "convert it to text first"),
    "raw YCbCr TIFF": (["register", "{in}/fixed_rgb.png", "{in}/ycbcr.tif", "-o", "out"], 1,
                       "photometric YCBCR without JPEG compression"),  # its Y, Cb, Cr were taken as RGB
    "frame name is a folder": (["stack", "{in}/stack.tif", "-o", "{in}/clash", "--force"], 1,
                               "frame_00001.tif': it is a folder"),  # found after the work, half merged
    "file named as a folder": (["stack", "{in}/stack.tif", "-o", "{in}/plainfile", "--force"], 1,
                               "plainfile': it is a file"),  # failed after the work, naming a temporary folder
    "animated PNG": (["register", "{in}/fixed.png", "{in}/animated.png", "-o", "out"], 1,
                     "is an animation of 2 frames"),  # its first frame was taken silently
    "folder as image": (["register", "{in}/mixed", "{in}/moving.png", "-o", "out"], 1,
                        "mixed' is a folder, not an image file (fixed image)"),  # said: format '(no suffix)'
    "stack as mask": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--mask", "{in}/stack.tif"],
                      1, "has 3 pages; this command takes one image"),
    "frames differ in channels": (["stack", "{in}/grey_and_rgb", "-o", "out.tif"], 1, "frames differ in channels"),
    "bad stored size": (["apply", "{in}/sized.json", "{in}/moving.png", "-o", "out.png"], 1,
                        '"metadata.fixed_size" must be two positive integers'),  # it wrote a 1 x 2 image
    "float to PNG": (["apply", "{in}/good.tfm", "{in}/moving.npy", "-o", "out.png"], 1, "PNG"),
    "one frame stack": (["stack", "{in}/moving.png", "-o", "out.tif"], 1, "at least 2"),
    "frames differ": (["stack", "{in}/mixed", "-o", "out.tif"], 1, "differ"),
    "stack to PNG": (["stack", "{in}/stack.tif", "-o", "out.png"], 2, ".tif"),
    "CSV without .csv": (["stack", "{in}/stack.tif", "-o", "out.tif", "--csv", "out.txt"], 2,
                         "the CSV file 'out.txt' must end in .csv"),
    "apply output without suffix": (["apply", "{in}/good.tfm", "{in}/moving.png", "-o", "noext"], 2,
                                    "-o 'noext': unsupported output format '(no suffix)'"),
    # said before the input is read: a wrong command line is named first, whatever the files hold
    # the option named, and the size as W x H: it said "shrink factor 64 leaves fewer than 4 pixels of a (128, 160)
    # image", exit 1
    "levels too deep for the images": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out", "--levels",
                                        "64,1"], 2, "--levels 64,1: shrink factor 64 leaves fewer than 4 pixels of "
                                        "the 160 x 128 image; use factors of at most 32 (--levels 6 at most)"),
    "levels too deep for the frames": (["stack", "{in}/stack.tif", "-o", "out.tif", "--levels", "5"], 2,
                                       "--levels 5: shrink factor 16 leaves fewer than 4 pixels of the 32 x 32 "
                                       "frames; use factors of at most 8 (--levels 4 at most)"),
    "smoothing too wide for the images": (["register", "{in}/fixed.png", "{in}/moving.png", "-o", "out",
                                           "--smoothing", "64.5"], 2,
                                          "--smoothing 64.5: a sigma of that many pixels leaves nothing of the "
                                          "160 x 128 image to align; give at most 64"),
    "smoothing too wide for the frames": (["stack", "{in}/stack.tif", "-o", "out.tif", "--smoothing", "1e9"], 2,
                                          "--smoothing 1e+09: a sigma of that many pixels leaves nothing of the "
                                          "32 x 32 frames to align; give at most 16"),
    # numpy's "Maximum allowed dimension exceeded" and "array is too big" named no option or file
    "huge size": (["apply", "{in}/good.tfm", "{in}/moving.png", "-o", "out.png", "--size",
                   "100000000000000000000x2"], 2,
                  "argument --size: 100000000000000000000x2: 200000000000000000000 pixels is too large; an output "
                  "has at most 1099511627776 (2**40) pixels"),
    "huge stored size": (["apply", "{in}/huge.json", "{in}/moving.png", "-o", "out.png"], 1,
                         "huge.json': \"metadata.fixed_size\" [1000000000000.0, 1000000000000.0]: "
                         "1000000000000000000000000 pixels is too large"),
    "usage error before bad input": (["apply", "{in}/bad.tfm", "{in}/corrupt.png", "-o", "out.bmp"], 2,
                                     "unsupported output format '.bmp'"),
    "truncated stack": (["stack", "{in}/cut.tif", "-o", "out.tif"], 1,
                        "cut.tif' is truncated or corrupt: its page 4 cannot be read"),  # 4 frames, exit 0
    # tifffile's line '<tifffile.TiffPages @...> invalid offset to first page', then 'holds no image'
    "TIFF header and garbage": (["register", "{in}/garbage.tif", "{in}/moving.png", "-o", "out"], 1,
                                "garbage.tif' is truncated or corrupt: its page 0 cannot be read"),
    # read as its 6 pages, exit 0, with tifffile's line 'ImageJ series metadata invalid or corrupted file'
    "ImageJ header of more frames": (["stack", "{in}/imagej9.tif", "-o", "out.tif"], 1,
                                     "its ImageJ header (images=9, frames=9) describes other images than its 6 pages"),
    "OME header of more frames": (["stack", "{in}/ome9.tif", "-o", "out.tif"], 1,
                                  "ome9.tif' is truncated or corrupt: OME series is missing 3 frames"),  # zeroed
    "npy stack to apply": (["apply", "{in}/good.tfm", "{in}/stack.npy", "-o", "out.npy"], 1,
                           "'tireg apply' resamples a stack saved as a multi-page TIFF"),  # said: use 'tireg stack'
}
PREEXISTING = {"existing output": "out/transform.json"}
# These also run as separate processes, to show the exit status and stderr a shell sees.
IN_A_PROCESS = ["missing file", "corrupt file", "NaN", "unknown transform", "unknown option", "existing output"]


def _bad_inputs(folder: Path) -> None:
    (folder / "zero.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(PNG_SIGNATURE + b"not really a png" * 20)
    (folder / "image.bmp").write_bytes(b"BM" + bytes(100))
    imageio.imwrite(folder / "constant.png", np.full((128, 160), 7, np.uint8))
    imageio.imwrite(folder / "small.png", np.full((64, 80), 255, np.uint8))
    np.save(folder / "empty.npy", np.zeros((0, 160)))
    nan = np.load(folder / "fixed.npy")
    nan[40, 50] = np.nan
    np.save(folder / "nan.npy", nan)
    tifffile.imwrite(folder / "stack.tif", np.zeros((3, 32, 32), np.uint8) + np.arange(32, dtype=np.uint8),
                     photometric="minisblack")
    six = np.stack([np.roll(imageio.imread(folder / "moving.png"), 3 * k, axis=1) for k in range(6)])
    with tifffile.TiffWriter(folder / "six.tif") as writer:  # 6 pages, cut right after page 3's pixels
        for page in six:
            writer.write(page, contiguous=False)
    with tifffile.TiffFile(folder / "six.tif") as tif:
        end = tif.pages[3].dataoffsets[-1] + tif.pages[3].databytecounts[-1]
    (folder / "cut.tif").write_bytes((folder / "six.tif").read_bytes()[:end])
    (folder / "garbage.tif").write_bytes(b"II*\0garbage")
    np.save(folder / "stack.npy", np.zeros((5, 32, 32), np.float32) + np.arange(32, dtype=np.float32))
    tifffile.imwrite(folder / "imagej9.tif", six, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(folder / "ome9.tif", six, ome=True, metadata={"axes": "TYX"})
    for name, six_frames, nine_frames in [("imagej9.tif", b"images=6\nframes=6", b"images=9\nframes=9"),
                                          ("ome9.tif", b'SizeT="6"', b'SizeT="9"')]:  # the header, not the pages
        content = (folder / name).read_bytes()
        assert content.count(six_frames) == 1
        (folder / name).write_bytes(content.replace(six_frames, nine_frames))
    (folder / "bad.tfm").write_text("#Insight Transform File V1.0\nTransform: AffineTransform_double_2_2\n"
                                    "Parameters: 1 0 0 nonsense\n")
    tireg.transform_io.save_transform(folder / "good.tfm", np.eye(3))
    tireg.transform_io.save_transform(folder / "sized.json", np.eye(3), metadata={"fixed_size": [1.7, 2.2]})
    tireg.transform_io.save_transform(folder / "huge.json", np.eye(3), metadata={"fixed_size": [1e12, 1e12]})
    with pytest.warns(UserWarning, match="singular"):  # saving warns; applying refuses
        tireg.transform_io.save_transform(folder / "flat.json", np.diag([0.0, 0.0, 1.0]))
    from PIL import Image

    Image.fromarray(imageio.imread(folder / "moving.png")).convert("P").save(folder / "palette.tif")
    (folder / "text.png").write_text("hello")
    (folder / "plainfile").write_text("not a folder")
    still = imageio.imread(folder / "moving.png")
    Image.fromarray(still).save(folder / "animated.png", save_all=True, append_images=[Image.fromarray(still[::-1])])
    rgb = imageio.imread(folder / "fixed_rgb.png")
    tifffile.imwrite(folder / "ycbcr.tif", rgb, photometric="ycbcr", subsampling=(1, 1))
    (folder / "clash" / "frame_00001.tif").mkdir(parents=True, exist_ok=True)  # a folder where a frame goes
    (folder / "grey_and_rgb").mkdir(exist_ok=True)
    imageio.imwrite(folder / "grey_and_rgb" / "a.png", still)
    imageio.imwrite(folder / "grey_and_rgb" / "b.png", np.stack([still] * 3, -1))
    corner = np.zeros((128, 160), np.uint8)
    corner[:10, :10] = 255
    imageio.imwrite(folder / "corner_tl.png", corner)
    imageio.imwrite(folder / "corner_br.png", corner[::-1, ::-1])
    (folder / "mixed").mkdir(exist_ok=True)
    imageio.imwrite(folder / "mixed" / "a.png", np.arange(64 * 80, dtype=np.uint8).reshape(64, 80))
    imageio.imwrite(folder / "mixed" / "b.png", np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))


def _case(name: str, folder: Path, cwd: Path) -> tuple[list[str], list[str]]:
    """The arguments of a bad-input case, and the files in ``cwd`` before it runs."""
    if name in PREEXISTING:
        existing = cwd / PREEXISTING[name]
        existing.parent.mkdir(parents=True, exist_ok=True)
        existing.write_text("keep me")
    before = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    return [a.replace("{in}", str(folder)) for a in BAD[name][0]], before


def _check_failure(name: str, status: int, stderr: str, cwd: Path, before: list[str]) -> None:
    _, expected_status, words = BAD[name]
    assert status == expected_status, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tireg: error: "), stderr
    assert "Traceback" not in stderr
    assert words in lines[0], lines[0]
    after = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    assert after == before, f"{name} left files: {after}"
    if name in PREEXISTING:
        assert (cwd / PREEXISTING[name]).read_text() == "keep me"


@pytest.fixture(scope="module", autouse=True)
def bad_processes(data, tmp_path_factory):
    """The :data:`IN_A_PROCESS` cases, started with the module's first test and run two at a time beside it.

    Each only starts Python and fails; :func:`test_bad_input_in_a_process` collects them.
    """
    _bad_inputs(data["folder"])

    def attempt(arguments, cwd):
        process = run(*arguments, cwd=cwd)
        return process.returncode, process.stderr

    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for name in IN_A_PROCESS:
        cwd = tmp_path_factory.mktemp("bad")
        arguments, before = _case(name, data["folder"], cwd)
        runs[name] = (pool.submit(attempt, arguments, cwd), cwd, before)
    yield runs
    pool.shutdown(wait=True)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_with_one_line_and_no_files(data, case, tmp_path, monkeypatch, capsys):
    arguments, before = _case(case, data["folder"], tmp_path)
    monkeypatch.chdir(tmp_path)
    status = main(arguments)
    captured = capsys.readouterr()
    assert captured.out == ""
    _check_failure(case, status, captured.err, tmp_path, before)


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_input_in_a_process(bad_processes, case):
    future, cwd, before = bad_processes[case]
    status, stderr = future.result(timeout=600)
    _check_failure(case, status, stderr, cwd, before)


def test_main_in_two_threads_puts_pythons_warning_display_back(monkeypatch, capsys):
    # main() swapped warnings.showwarning under catch_warnings(), which restores what it found: with
    # two calls in two threads, the one that ended last restored tireg's display for good. A warning
    # of a thread outside main() keeps Python's display meanwhile.
    import threading
    import warnings

    import tireg.cli as cli

    original = warnings.showwarning
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()

    def command(argv):
        if argv == ["first"]:
            first_inside.set()
            second_inside.wait(10)
        else:
            second_inside.set()
            first_done.wait(10)
        warnings.warn(f"from {argv[0]}", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_main", command)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest, **options: shown.append(str(message)))
    original = warnings.showwarning
    first = threading.Thread(target=lambda: main(["first"]))
    first.start()
    first_inside.wait(10)
    second = threading.Thread(target=lambda: main(["second"]))
    second.start()
    first.join(10)
    warnings.warn("from outside", UserWarning)  # this thread is not running main()
    first_done.set()
    second.join(10)
    assert warnings.showwarning is original
    err = capsys.readouterr().err.splitlines()
    assert sorted(err) == ["tireg: warning: from first", "tireg: warning: from second"]
    assert shown == ["from outside"]


def test_a_library_warning_is_one_line_of_the_command(tmp_path, monkeypatch, capsys):
    """Python's default showed io.py's file name, line number and source line before the message."""
    frames = (np.random.default_rng(0).random((3, 64, 64)) * 255).astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as writer:
        for frame in frames:
            writer.write(frame, contiguous=False)
        writer.write(frames[0, ::4, ::4])  # an untagged thumbnail after the frames
    monkeypatch.chdir(tmp_path)
    assert main(["stack", "thumb.tif", "-o", "aligned.tif", "-t", "translation", "-q"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "tireg: warning: stack 'thumb.tif': ignored 1 trailing page of another size than its frames (64 x 64), "
        "taken for a thumbnail, label or macro image: page 3 is 16 x 16"]
    import warnings
    assert warnings.showwarning.__module__ == "warnings"  # main() put Python's back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # python -W error: one error line, not a traceback
        assert main(["stack", "thumb.tif", "-o", "again.tif", "-t", "translation", "-q"]) == 1
    assert capsys.readouterr().err.startswith("tireg: error: stack 'thumb.tif': ignored 1 trailing page")
    assert not (tmp_path / "again.tif").exists()


def test_two_frames_written_under_one_name_are_refused(data, tmp_path, monkeypatch, capsys):
    """t0.png and a PNG named t0.jpg were both written as t0.png: one aligned frame lost, exit 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "frames").mkdir()
    shutil.copy(data["folder"] / "moving.png", tmp_path / "frames" / "t0.png")
    shutil.copy(data["folder"] / "moving.png", tmp_path / "frames" / "t0.jpg")
    shutil.copy(data["folder"] / "fixed.png", tmp_path / "frames" / "t1.png")
    assert main(["stack", "frames", "-o", "aligned", "-t", "translation", "-q"]) == 1
    assert "would both be written as" in capsys.readouterr().err and not (tmp_path / "aligned").exists()


def test_frames_named_apart_by_case_are_written_where_the_file_system_keeps_case(data, tmp_path, monkeypatch,
                                                                                 capsys):
    """A.png and a.png were refused as 'both written as outc/a.png' (false on a case-sensitive file
    system), and read in the order the folder listed them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "frames").mkdir()
    shutil.copy(data["folder"] / "moving.png", tmp_path / "frames" / "a.png")
    shutil.copy(data["folder"] / "fixed.png", tmp_path / "frames" / "A.png")
    if (tmp_path / "frames" / "A.png").samefile(tmp_path / "frames" / "a.png"):
        pytest.skip("this file system ignores case")
    listed = Path.iterdir
    for order in (sorted, functools.partial(sorted, reverse=True)):  # the listing's order does not matter
        monkeypatch.setattr(Path, "iterdir", lambda folder: iter(order(listed(folder))))
        assert read_stack("frames").names == ["A.png", "a.png"]
    assert main(["stack", "frames", "-o", "outc", "-t", "translation", "-q"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "outc").iterdir()) == ["A.png", "a.png"]
    with open(tmp_path / "outc.csv", newline="") as handle:
        assert [row["source"] for row in csv.DictReader(handle)] == ["A.png", "a.png"]
    for ignores_case, where in [(True, "the file system of 'again', which ignores case"),
                                (None, "a file system that ignores case (macOS's and Windows's by default)")]:
        monkeypatch.setattr("tireg.cli._ignores_case", lambda folder: ignores_case)
        assert main(["stack", "frames", "-o", "again", "-t", "translation", "-q"]) == 1
        assert capsys.readouterr().err == (f"tireg: error: frames 'A.png' and 'a.png' would be written as "
                                           f"'again/A.png' and 'again/a.png': one file on {where}"
                                           + ("" if ignores_case else ", as that of 'again' may")
                                           + "; rename one of them\n")
        assert not (tmp_path / "again").exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_with_device_cuda_the_outputs_are_warped_on_the_device(data, drift, tmp_path, monkeypatch):
    """The registration ran on --device cuda, the warped image, the picture and a stack's frames (and
    the mean reference) on the host."""
    import tireg.sampling

    devices = []
    warp = tireg.sampling.warp

    def spy(image, matrix, *args, **kwargs):
        devices.append(image.device.type)
        return warp(image, matrix, *args, **kwargs)

    monkeypatch.setattr(tireg.sampling, "warp", spy)
    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out",
                 "--device", "cuda", "-q"]) == 0
    assert main(["stack", str(drift[0] / "drift.tif"), "-o", "aligned.tif", "-r", "mean", "--device", "cuda",
                 "-q"]) == 0
    assert devices and set(devices) == {"cuda"}


# ----------------------------------------------------------------------------
# audit io: outputs of grey with a channel axis, alpha, byte order


def _shift(path: Path, dx: float = 0.0) -> str:
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[0, 2] = dx
    transform_io.save_transform(path, matrix, overwrite=True)
    return str(path)


def test_grey_with_a_channel_axis_is_applied_and_stacked_into_png_jpeg_and_tiff(tmp_path, monkeypatch, capsys):
    """An (H, W, 1) .npy applied to a .png or .jpg, and an (N, H, W, 1) one stacked into a .tif, failed after
    the work: 'Can't write images with one color channel', '<PLANARCONFIG.CONTIG: 1> does not match ...'."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 14, 1), dtype=np.uint8)
    np.save("g1.npy", pixels)
    identity = _shift(tmp_path / "identity.json")
    for name in ("out.png", "out.jpg"):
        assert main(["apply", identity, "g1.npy", "-o", name, "-q"]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(imageio.imread("out.png"), pixels[..., 0])
    assert imageio.imread("out.jpg").shape == (12, 14)
    scene = np.kron(rng.random((6, 6)), np.ones((6, 6)))  # 36 x 36, blocky: a translation finds 0
    np.save("stack.npy", np.stack([scene, scene])[..., None].astype(np.float32))
    assert main(["stack", "stack.npy", "-o", "out.tif", "-t", "translation", "-q"]) == 0, capsys.readouterr().err
    assert tifffile.imread("out.tif").shape == (2, 36, 36)


def _red_square(size: int = 20, lo: int = 5, hi: int = 15, under=(0, 0, 0)) -> np.ndarray:
    """An opaque red square on transparent pixels of colour ``under``, RGBA uint8."""
    image = np.zeros((size, size, 4), np.uint8)
    image[..., :3] = under
    image[lo:hi, lo:hi] = (255, 0, 0, 255)
    return image


def test_straight_alpha_is_resampled_premultiplied_without_a_dark_fringe(tmp_path, monkeypatch, capsys):
    """Each channel, alpha too, was interpolated on its own: half a pixel off an opaque red square on
    transparent black gave (128, 0, 0) at alpha 128, a dark fringe (a green one under green)."""
    monkeypatch.chdir(tmp_path)
    half = _shift(tmp_path / "half.json", 0.5)
    for under in ((0, 0, 0), (0, 255, 0)):  # the colour of transparent pixels does not show
        imageio.imwrite("red.png", _red_square(under=under))
        for interpolation in ("bilinear", "bicubic"):
            assert main(["apply", half, "red.png", "-o", "out.png", "--interpolation", interpolation,
                         "--force", "-q"]) == 0, capsys.readouterr().err
            out = imageio.imread("out.png")
            seen = out[out[..., 3] > 0]
            np.testing.assert_array_equal(seen[:, :3], np.tile([255, 0, 0], (len(seen), 1)), err_msg=interpolation)
        assert main(["apply", half, "red.png", "-o", "out.png", "--force", "-q"]) == 0
        assert imageio.imread("out.png")[10, 3:7].tolist() == [[0, 0, 0, 0], [255, 0, 0, 128], [255, 0, 0, 255],
                                                                [255, 0, 0, 255]]
    grey = np.zeros((20, 20, 2), np.uint8)  # grey + alpha: a white square on transparent black
    grey[5:15, 5:15] = (255, 255)
    imageio.imwrite("la.png", grey)
    assert main(["apply", half, "la.png", "-o", "la_out.png", "-q"]) == 0
    assert imageio.imread("la_out.png")[10, 3:7].tolist() == [[0, 0], [255, 128], [255, 255], [255, 255]]
    tifffile.imwrite("assoc.tif", _red_square(), photometric="rgb", extrasamples=[1])  # premultiplied already
    assert main(["apply", half, "assoc.tif", "-o", "assoc_out.tif", "-q"]) == 0
    assert tifffile.imread("assoc_out.tif")[10, 3:7].tolist() == [[0, 0, 0, 0], [128, 0, 0, 128], [255, 0, 0, 255],
                                                                  [255, 0, 0, 255]]


def _red_square_on_a_blob(centre: tuple[float, float]) -> np.ndarray:
    """An opaque red square, and under the transparent rest a green blob at ``centre`` (x, y): the luminance
    registered on is the blob's, so two of these a fraction of a pixel apart are found a fraction apart."""
    y, x = np.mgrid[:48, :48]
    image = np.zeros((48, 48, 4), np.uint8)
    image[..., 1] = np.rint(255 * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * 8.0 ** 2)))
    image[8:20, 8:20] = (255, 0, 0, 255)
    return image


def test_register_and_stack_resample_straight_alpha_premultiplied(tmp_path, monkeypatch, capsys):
    """tireg register's warped.png and tireg stack's frames went through the same per-channel
    resampling: wherever the output is not transparent, the red square must stay pure red."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("frames")
    imageio.imwrite("frames/0.png", _red_square_on_a_blob((30.0, 30.0)))
    imageio.imwrite("frames/1.png", _red_square_on_a_blob((30.6, 29.7)))
    assert main(["register", "frames/0.png", "frames/1.png", "-o", "out", "-t", "translation", "-q"]) == 0, \
        capsys.readouterr().err
    assert main(["stack", "frames", "-o", "aligned", "-t", "translation", "-q"]) == 0, capsys.readouterr().err
    for name in ("out/warped.png", "aligned/1.png"):
        image = imageio.imread(name)
        seen = image[image[..., 3] > 0]
        assert len(seen) >= 12 * 11, name
        np.testing.assert_array_equal(seen[:, :3], np.tile([255, 0, 0], (len(seen), 1)), err_msg=name)


def _warped_by_rule(frame: np.ndarray, matrix: np.ndarray, alpha: str) -> np.ndarray:
    """``(H, W, C)`` uint8 ``frame`` warped by ``matrix`` (bilinear) by hand: straight alpha premultiplied (colour
    times alpha, warped, divided by the warped alpha), associated alpha as it is; float64."""
    from tireg.sampling import warp

    values = np.moveaxis(frame.astype(np.float64), -1, 0)
    if alpha == "unassociated":
        values[:-1] *= values[-1:]
    out = warp(torch.from_numpy(values)[None], torch.from_numpy(matrix)[None], size=frame.shape[:2])[0].numpy()
    if alpha == "unassociated":
        covered = out[-1:] > 0
        out[:-1] = np.where(covered, out[:-1] / np.where(covered, out[-1:], 1.0), 0.0)
    return np.moveaxis(out, 0, -1)


@pytest.mark.parametrize("first", ["png", "tif"])
def test_a_folder_of_straight_and_associated_alpha_warps_each_frame_by_its_own_rule(tmp_path, monkeypatch, capsys,
                                                                                  first):
    """A folder stack was warped with frame 0's alpha rule for every frame: an associated-alpha TIFF after a PNG
    came out up to 114 grey levels off, a PNG after such a TIFF with the dark fringe (157 off); a .tif of the
    folder held the other kind's frames as they were, under frame 0's tag."""
    monkeypatch.chdir(tmp_path)
    scene = tireg.data.load("camera", dtype=torch.float64).numpy() * 255
    alpha = np.tile(np.linspace(60, 255, 64), (64, 1))  # alpha < 255 everywhere: the rules differ everywhere
    # the second frame: the scene moved by (-0.5, +1.5) px, scene(x + 0.5, y - 1.5) (tireg's own warp: no scipy in CI)
    shift = tireg.transforms.translation_matrix(torch.tensor([0.5, -1.5], dtype=torch.float64))
    moved = tireg.warp(torch.from_numpy(scene)[None, None], shift, interpolation="bicubic", padding_mode="border")
    grey = [scene[60:124, 80:144], moved[0, 0].numpy()[60:124, 80:144]]
    straight = [np.dstack([np.clip(np.rint(g), 0, 255)] * 3 + [alpha]).astype(np.uint8) for g in grey]
    os.mkdir("frames")
    kinds = ["unassociated", "associated"] if first == "png" else ["associated", "unassociated"]
    frames = []
    for k, kind in enumerate(kinds):
        image = straight[k]
        if kind == "associated":  # premultiplied, tagged so
            image = np.dstack([np.rint(image[..., :3] * (alpha[..., None] / 255)), alpha]).astype(np.uint8)
            tifffile.imwrite(f"frames/{k}.tif", image, photometric="rgb", extrasamples=[1])
        else:
            imageio.imwrite(f"frames/{k}.png", image)
        frames.append(image)
    names = [f"{k}.{'png' if kind == 'unassociated' else 'tif'}" for k, kind in enumerate(kinds)]
    assert main(["stack", "frames", "-o", "aligned", "-t", "translation", "-q"]) == 0, capsys.readouterr().err
    assert main(["stack", "frames", "-o", "aligned.tif", "--csv", "pages.csv", "-t", "translation", "-q"]) == 0, \
        capsys.readouterr().err
    with open("aligned.csv", newline="") as handle:
        matrices = [matrix_of(row) for row in csv.DictReader(handle)]
    with open("pages.csv", newline="") as handle:
        np.testing.assert_array_equal([matrix_of(row) for row in csv.DictReader(handle)], matrices)
    assert abs(matrices[1][0, 2]) > 0.2  # a shift of a fraction of a pixel: the two rules give other pixels
    pages = tifffile.imread("aligned.tif")
    for k, kind in enumerate(kinds):
        expected = _warped_by_rule(frames[k], matrices[k], kind)
        out = tifffile.imread(f"aligned/{names[k]}") if kind == "associated" else imageio.imread(f"aligned/{names[k]}")
        assert np.abs(out - expected).max() <= 1, (names[k], np.abs(out - expected).max())
        # the .tif is tagged with frame 0's kind, and holds every frame in it
        if kind != kinds[0]:
            full = expected.copy()
            if kinds[0] == "associated":  # a straight frame premultiplied
                full[..., :3] *= full[..., 3:] / 255
            else:  # an associated frame divided by its alpha
                full[..., :3] = np.where(full[..., 3:] > 0, full[..., :3] * 255 / np.maximum(full[..., 3:], 1e-12), 0)
            expected = np.clip(full, 0, 255)  # rounded premultiplied colour may exceed its alpha a little
        assert np.abs(pages[k] - expected).max() <= 1.01, (k, np.abs(pages[k] - expected).max())


def _contents(folder: Path) -> dict:
    """Every file under ``folder``, hidden ones too, by relative path: its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("step, name, error", [
    ("into", "transform.tfm", OSError),  # the third output: warped.png and transform.json already moved in
    ("into", "convergence.png", OSError),  # the last one
    ("aside", "transform.json", OSError),  # moving the old file aside
    ("into", "transform.json", KeyboardInterrupt),
    ("into", "before_after.png", "Terminated"),
])
def test_a_move_that_fails_while_outputs_go_into_place_leaves_every_old_output(data, tmp_path, monkeypatch,
                                                                               capsys, step, name, error):
    """The outputs were moved into place one at a time: a move that failed (a file of another owner in a
    sticky folder, chattr +i) or Ctrl-C or SIGTERM on the way left the outputs before it new and those after
    it old, a transform.json and a transform.tfm of two registrations, after an exit status of 1."""
    import tireg.cli as cli

    monkeypatch.chdir(tmp_path)
    folder = data["folder"]
    arguments = ["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out", "-q"]
    assert main([*arguments, "-t", "translation"]) == 0, capsys.readouterr().err
    before = _contents(tmp_path / "out")
    replace, calls = os.replace, []

    def failing_replace(source, destination, *args, **kwargs):
        moved = Path(source if step == "aside" else destination)
        if moved == Path("out") / name and not calls:  # this move, once (the backup's way back works)
            calls.append(moved)
            if error == "Terminated":
                raise cli.Terminated()
            raise error(1, "Operation not permitted", str(moved)) if error is OSError else error()
        return replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    status = main([*arguments, "-t", "rigid", "--force"])
    stderr = capsys.readouterr().err
    assert calls and status == {OSError: 1, KeyboardInterrupt: 130, "Terminated": 143}[error], stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert _contents(tmp_path / "out") == before  # every output the first run's; no temporary, no backup
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(os, "replace", replace)
    assert main([*arguments, "-t", "rigid", "--force"]) == 0  # and with the moves working, all are replaced
    after = _contents(tmp_path / "out")
    assert sorted(after) == sorted(before) and all(after[k] != before[k] for k in ("transform.json", "transform.tfm"))


def test_a_move_that_fails_while_frames_merge_into_a_folder_leaves_the_old_frames(drift, tmp_path, monkeypatch,
                                                                                  capsys):
    """A stack merged into an existing folder: a failed move left frames 0-2 of the new run beside frames 3-5
    and a CSV of the old one."""
    monkeypatch.chdir(tmp_path)
    arguments = ["stack", str(drift[0] / "frames"), "-o", "aligned", "-q"]
    assert main([*arguments, "-t", "translation"]) == 0, capsys.readouterr().err
    (tmp_path / "aligned" / "notes.txt").write_text("keep me")
    before = {**{f"aligned/{k}": v for k, v in _contents(tmp_path / "aligned").items()},
              "aligned.csv": (tmp_path / "aligned.csv").read_bytes()}
    replace, calls = os.replace, []

    def failing_replace(source, destination, *args, **kwargs):
        if Path(destination) == Path("aligned") / "t3.png" and not calls:  # once: the old t3.png goes back
            calls.append(destination)
            raise PermissionError(1, "Operation not permitted", str(destination))
        return replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert main([*arguments, "-t", "rigid", "--force"]) == 1
    assert "t3.png': Operation not permitted" in capsys.readouterr().err
    after = {**{f"aligned/{k}": v for k, v in _contents(tmp_path / "aligned").items()},
             "aligned.csv": (tmp_path / "aligned.csv").read_bytes()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "aligned.csv"]


@pytest.mark.parametrize("error, status, word", [(KeyboardInterrupt, 130, "interrupted"), ("Terminated", 143, "terminated")])
def test_an_interrupt_after_the_outputs_are_in_place_says_they_are(data, tmp_path, monkeypatch, capsys, error, status,
                                                                    word):
    """Ctrl-C while the summary is printed, after the commit, had said "no output written" of complete
    files in place (a microscopy audit: a pipeline trusting the line then met them on its rerun)."""
    import tireg.cli as cli

    monkeypatch.chdir(tmp_path)
    say = cli._say

    def interrupted_say(args, text=""):
        if text.startswith("wrote"):  # the last line, after outputs.commit()
            raise cli.Terminated() if error == "Terminated" else error()
        return say(args, text)

    monkeypatch.setattr(cli, "_say", interrupted_say)
    folder = data["folder"]
    assert main(["register", str(folder / "fixed.png"), str(folder / "moving.png"), "-o", "out",
                 "-t", "translation"]) == status
    stderr = capsys.readouterr().err.strip().splitlines()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "warped.png" in names and "transform.json" in names
    assert stderr[-1].startswith(f"tireg: {word}; the outputs were complete and stay: out"), stderr
    assert all(name in stderr[-1] for name in names), (stderr, names)


def test_channel_picks_what_is_registered_and_every_channel_is_warped(drift, data, tmp_path, monkeypatch, capsys):
    """A 2-channel hyperstack was registered on channel 0 whatever it held: a sparse or noisy channel
    beside the structural one made 26-124 px errors, reported converged (microscopy audit)."""
    monkeypatch.chdir(tmp_path)
    folder, truths, frames, _ = drift
    noise = np.random.default_rng(0).integers(0, 65535, frames.shape, dtype=np.uint16)  # channel 0: no structure
    tifffile.imwrite("two.tif", np.stack([noise, frames], axis=1), imagej=True, metadata={"axes": "TCYX"})
    assert main(["stack", "two.tif", "-o", "out.tif", "-t", "rigid", "--channel", "1"]) == 0
    assert "to the first frame: rigid, l2, on channel 1\n" in capsys.readouterr().out  # what was registered, said
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    found = np.array([[[float(row[f"m{i}{j}"]) for j in range(3)] for i in range(2)] for row in rows])
    height, width = frames.shape[1:]
    points = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1], [width - 1, height - 1, 1]], float).T
    assert max(np.abs(found[k] @ points - (truths[k] @ points)[:2]).max() for k in range(len(rows))) < 0.1
    aligned = tifffile.imread(tmp_path / "out.tif")  # a TCYX hyperstack again: channel 0 warped by the same matrices
    assert aligned.shape == (len(frames), 2, height, width)
    assert main(["apply", "out.csv", "two.tif", "-o", "again.tif", "-q"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "again.tif"), aligned)
    # register: channel K of both, whatever their channel counts; a channel beyond them is named
    fixed, moving = str(data["folder"] / "fixed.png"), str(data["folder"] / "moving.png")
    assert main(["register", fixed, moving, "-o", "reg", "-t", "translation", "--channel", "0"]) == 0
    assert "registered  on channel 0 (--channel K: another)" in capsys.readouterr().out
    assert main(["register", fixed, moving, "-o", "reg_grey", "-t", "translation"]) == 0
    assert "registered  on its grey values" in capsys.readouterr().out
    assert main(["register", fixed, moving, "-o", "reg2", "--channel", "3", "-q"]) == 1
    assert "--channel 3: fixed image" in capsys.readouterr().err and not (tmp_path / "reg2").exists()
    assert main(["stack", "two.tif", "-o", "x.tif", "--channel", "-1", "-q"]) == 2


def test_register_writes_the_warped_image_with_the_fixed_images_pixel_size(data, tmp_path, monkeypatch):
    """The warped image lies on the fixed grid: its TIFF resolution and ImageJ unit are the fixed image's."""
    monkeypatch.chdir(tmp_path)
    fixed = imageio.imread(data["folder"] / "fixed.png")
    moving = imageio.imread(data["folder"] / "moving.png")
    tifffile.imwrite("fixed.tif", fixed, imagej=True, resolution=(5.0, 5.0), metadata={"unit": "um"})
    tifffile.imwrite("moving.tif", moving, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "nm", "spacing": 3.0})
    assert main(["register", "fixed.tif", "moving.tif", "-o", "out", "-t", "translation", "-q"]) == 0
    with tifffile.TiffFile(tmp_path / "out" / "warped.tif") as warped:
        assert warped.is_imagej and warped.pages[0].resolution == (5.0, 5.0)
        assert warped.imagej_metadata["unit"] == "um" and warped.imagej_metadata["spacing"] == 3.0
        assert warped.asarray().shape == fixed.shape


@pytest.mark.parametrize("reference", ["previous", "mean"])
def test_a_dark_frame_does_not_break_the_chain_of_the_frames_after_it(drift, tmp_path, monkeypatch, capsys, reference):
    """A dark frame (sensor noise) in a clip: chained through it, every later frame came out about 95 px
    off, 'converged', and with mean the frames before it 0.5 px off too (a video audit).  The frame
    after it is registered to the last frame that converged, and the mean leaves the dark frame out."""
    monkeypatch.chdir(tmp_path)
    folder, truths, frames, _ = drift
    frames = frames.copy()
    frames[3] = np.random.default_rng(0).integers(0, 6, frames[3].shape)
    tifffile.imwrite("dark.tif", frames)
    assert main(["stack", "dark.tif", "-o", "out.tif", "-t", "rigid", "--reference", reference]) == 0
    out = capsys.readouterr().out
    assert "frame 4 registered to frame 2 directly: the chain skips frame 3" in out
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    found = np.array([[[float(row[f"m{i}{j}"]) for j in range(3)] for i in range(2)] for row in rows])
    height, width = frames.shape[1:]
    points = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1], [width - 1, height - 1, 1]], float).T
    errors = [np.abs(found[k] @ points - (truths[k] @ points)[:2]).max() for k in range(len(rows))]
    assert rows[3]["converged"] == "False" and rows[3]["stop_reason"] != "converged", rows[3]
    assert max(errors[k] for k in (0, 1, 2, 4, 5)) < 0.1, errors


def test_loss_scale_sets_the_robust_losses_outlier_scale(data, tmp_path, monkeypatch, capsys):
    """The command line had no way to set a robust loss's scale: a moving foreground over a third of a
    video frame ended 0.25 px off with Cauchy's default 1 and 0.078 px at 0.3 (a video audit)."""
    import functools
    import importlib

    from tireg.losses import CauchyLoss, GemanMcClureLoss, HuberLoss

    register_module = importlib.import_module("tireg.register")  # the module (tireg.register is the function)

    monkeypatch.chdir(tmp_path)
    given, register = [], register_module.register

    @functools.wraps(register)  # the parser reads register()'s defaults from its signature
    def recording(*args, **kwargs):
        given.append(kwargs["metric"])
        return register(*args, **kwargs)

    monkeypatch.setattr(register_module, "register", recording)
    fixed, moving = str(data["folder"] / "fixed.png"), str(data["folder"] / "moving.png")
    for metric, kind, setting in (("cauchy", CauchyLoss, "scale"), ("geman_mcclure", GemanMcClureLoss, "scale"),
                                  ("huber", HuberLoss, "delta")):
        assert main(["register", fixed, moving, "-o", metric, "-t", "translation", "-m", metric,
                     "--loss-scale", "0.3", "-q"]) == 0
        assert type(given[-1]) is kind and getattr(given[-1], setting) == 0.3, given[-1]
    assert main(["register", fixed, moving, "-o", "plain", "-t", "translation", "-m", "cauchy", "-q"]) == 0
    assert given[-1] == "cauchy"  # by name, at its default scale
    capsys.readouterr()
    assert main(["register", fixed, moving, "-o", "mi", "-m", "mi", "--loss-scale", "0.3", "-q"]) == 2
    assert "--loss-scale sets the outlier scale of --metric cauchy, geman_mcclure, huber; --metric mi has none" in (
        capsys.readouterr().err)
    assert main(["register", fixed, moving, "-o", "zero", "-m", "cauchy", "--loss-scale", "0", "-q"]) == 2
    assert not (tmp_path / "mi").exists() and not (tmp_path / "zero").exists()


def _geotiff(path, image: np.ndarray, nodata: Optional[str], east: float = 500000.0) -> None:
    """``image`` ``(H, W[, C])`` as a GeoTIFF of 10 m pixels (UTM 33N) whose corner lies at ``east``, with
    GDAL_NODATA ``nodata``."""
    tags = [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, east, 4000000.0, 0), True),
            (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True)]
    bands = dict(photometric="minisblack", planarconfig="contig") if image.ndim == 3 else {}
    tifffile.imwrite(path, image, extratags=tags + ([] if nodata is None else [(42113, "s", 0, nodata, True)]),
                     **bands)


def _with_nodata(data, value: float) -> tuple[np.ndarray, np.ndarray]:
    """The affine pair as float32 with ``value`` over a swath edge of the fixed image and two edges of the moving one."""
    fixed = tifffile.imread(data["folder"] / "fixed32.tif").copy()
    moving = tifffile.imread(data["folder"] / "moving32.tif").copy()
    fixed[:, :36] = value
    moving[92:] = value
    moving[:, 130:] = value
    return fixed, moving


def test_register_leaves_a_geotiffs_nodata_out_and_keeps_its_georeference(data, tmp_path, monkeypatch, capsys):
    """A GeoTIFF's GDAL_NODATA (-9999) was registered as an image value (the pair ended 111 px off),
    blended into the warped image along its edge, and the area beyond the moving
    image was written 0, which is data; the warped image lost the fixed image's georeference.  Now
    the no-data pixels are left out as by a mask, the warped image is -9999 where it has no data
    (GDAL's rule: at least half the interpolation's weight on data), tagged so, and georeferenced
    as the fixed image, on whose grid it lies."""
    monkeypatch.chdir(tmp_path)
    fixed, moving = _with_nodata(data, -9999.0)
    _geotiff("fixed.tif", fixed, "-9999")
    _geotiff("moving.tif", moving, "-9999", east=500250.0)
    assert main(["register", "fixed.tif", "moving.tif", "-o", "out", "-q"]) == 0
    truth = data["truth"]
    found = transform_io.load_transform(tmp_path / "out" / "transform.json").matrix
    assert grid_error(found, torch.as_tensor(truth), data["size"]) < 0.1
    assert main(["register", "fixed.tif", "moving.tif", "-o", "ignored", "-q", "--nodata", "none"]) == 0
    ignored = transform_io.load_transform(tmp_path / "ignored" / "transform.json").matrix
    assert grid_error(ignored, torch.as_tensor(truth), data["size"]) > 1.0  # what the tag is for
    with tifffile.TiffFile(tmp_path / "out" / "warped.tif") as file:
        page = file.pages[0]
        assert page.tags[42113].value == "-9999" and page.tags[33922].value[3] == 500000.0  # the fixed grid's
        warped = page.asarray()
    # where the truth sends each fixed pixel: a pixel 1 px inside the moving image's data has data, one
    # 1 px beyond it (in its no-data or outside it) is -9999
    height, width = fixed.shape
    rows, columns = np.mgrid[:height, :width]
    x, y = (truth[0, 0] * columns + truth[0, 1] * rows + truth[0, 2], truth[1, 0] * columns + truth[1, 1] * rows
            + truth[1, 2])
    inside = (x >= 1) & (y >= 1) & (x <= 129 - 1) & (y <= 91 - 1)
    beyond = (x <= -1) | (y <= -1) | (x >= 130 + 1) | (y >= 92 + 1)
    assert (warped[inside] != -9999).all() and (warped[beyond] == -9999).all()
    assert inside.sum() > 5000 and beyond.sum() > 2000
    data_values = moving[moving != -9999]
    has = warped != -9999
    assert warped[has].min() >= data_values.min() - 1e-6 and warped[has].max() <= data_values.max() + 1e-6


def test_nan_marks_no_data_where_a_tag_or_nodata_says_so(data, tmp_path, monkeypatch, capsys):
    """NaN in a float image is refused with the way out named (--nodata nan); with it, or a GDAL_NODATA
    'nan' tag, NaN pixels are left out and the warped image is NaN where it has no data."""
    monkeypatch.chdir(tmp_path)
    fixed, moving = _with_nodata(data, np.nan)
    tifffile.imwrite("fixed.tif", fixed)
    tifffile.imwrite("moving.tif", moving)
    _geotiff("moving_tagged.tif", moving, "nan")
    assert main(["register", "fixed.tif", "moving.tif", "-o", "refused", "-q"]) == 1
    assert "contains NaN or Inf values; where NaN marks pixels without data, give --nodata nan" in \
        capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["register", "fixed.tif", "moving.tif", "-o", "out", "-q", "--nodata", "nan"]) == 0
    found = transform_io.load_transform(tmp_path / "out" / "transform.json").matrix
    assert grid_error(found, torch.as_tensor(data["truth"]), data["size"]) < 0.1
    warped = tifffile.imread(tmp_path / "out" / "warped.tif")
    assert 2000 < np.isnan(warped).sum() < warped.size / 2
    # the moving image's tag is its own: the fixed image without one still needs --nodata for its NaN
    assert main(["register", "fixed.tif", "moving_tagged.tif", "-o", "tagged", "-q"]) == 1
    assert "fixed image 'fixed.tif' contains NaN or Inf values" in capsys.readouterr().err
    tifffile.imwrite("fixed_clean.tif", tifffile.imread(data["folder"] / "fixed32.tif"))
    assert main(["register", "fixed_clean.tif", "moving_tagged.tif", "-o", "tagged", "-q"]) == 0
    tagged = tifffile.imread(tmp_path / "tagged" / "warped.tif")  # (found from another fixed mask: to rounding)
    assert (np.isnan(tagged) != np.isnan(warped)).mean() < 0.01 and np.isnan(tagged).sum() > 2000


def test_nodata_that_an_image_cannot_hold_is_refused_or_left_out(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fixed, moving = str(data["folder"] / "fixed.png"), str(data["folder"] / "moving.png")
    assert main(["register", fixed, moving, "-o", "out", "-q", "--nodata", "-9999"]) == 1
    assert capsys.readouterr().err == (f"tireg: error: --nodata -9999: fixed image {fixed!r} holds uint8 values "
                                       "(whole numbers 0 to 255); no pixel of it can be that value\n")
    assert main(["register", fixed, moving, "-o", "out", "-q", "--nodata", "0.5"]) == 1
    assert main(["register", fixed, moving, "-o", "out", "-q", "--nodata", "minus one"]) == 2
    assert "argument --nodata: expected a number (e.g. -9999, 0, nan) or none; got 'minus one'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a float original's tag kept through a cast to 16 bits (GDAL does so): said, and no pixel is no-data
    _geotiff("fixed16.tif", tifffile.imread(data["folder"] / "fixed16.tif"), "-9999")
    assert main(["register", "fixed16.tif", str(data["folder"] / "moving16.tif"), "-o", "out16", "-q"]) == 0
    assert "its GDAL_NODATA value -9999 is no uint16 value (whole numbers 0 to 65535)" in capsys.readouterr().err
    # a stack frame without data is passed over as a blank one; frame 0 without data is refused
    frames = np.stack([tifffile.imread(data["folder"] / "fixed32.tif")] * 3)
    frames[1].flat[3:] = -9999
    tifffile.imwrite("stack.tif", frames, photometric="minisblack", extratags=[(42113, "s", 0, "-9999", True)])
    assert main(["stack", "stack.tif", "-o", "aligned.tif", "-q", "-t", "translation"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "aligned.csv")))
    assert [row["stop_reason"] for row in rows] == ["reference", "blank", "converged"]
    assert (tifffile.imread(tmp_path / "aligned.tif")[1] == -9999).mean() > 0.99
    assert main(["stack", "stack.tif", "-o", "said.tif", "-t", "translation"]) == 0
    assert ("frame 1 has 3 pixels with data (the rest are -9999): not registered, given frame 0's transform"
            in capsys.readouterr().out)
    frames[0].flat[3:] = -9999
    tifffile.imwrite("first.tif", frames, photometric="minisblack", extratags=[(42113, "s", 0, "-9999", True)])
    assert main(["stack", "first.tif", "-o", "first_aligned.tif", "-q"]) == 1
    assert "its first frame 'first.tif page 0' has 3 pixels with data (the rest are the no-data value -9999); it " \
        "is the reference" in capsys.readouterr().err
    assert not (tmp_path / "first_aligned.tif").exists()


def test_apply_fills_no_data_and_takes_the_georeference_of_its_reference(data, tmp_path, monkeypatch):
    """apply resamples as register writes: -9999 where no data, and the --reference's georeference
    (without one, none: IMAGE's own was moved by the transform)."""
    monkeypatch.chdir(tmp_path)
    fixed, moving = _with_nodata(data, -9999.0)
    _geotiff("fixed.tif", fixed, "-9999")
    _geotiff("moving.tif", moving, "-9999", east=500250.0)
    assert main(["register", "fixed.tif", "moving.tif", "-o", "out", "-q"]) == 0
    assert main(["apply", "out/transform.json", "moving.tif", "-o", "applied.tif", "--reference", "fixed.tif",
                 "-q"]) == 0
    with tifffile.TiffFile(tmp_path / "applied.tif") as file:
        assert file.pages[0].tags[33922].value[3] == 500000.0 and file.pages[0].tags[42113].value == "-9999"
        assert np.array_equal(file.asarray(), tifffile.imread(tmp_path / "out" / "warped.tif"))
    assert main(["apply", "out/transform.json", "moving.tif", "-o", "bare.tif", "-q"]) == 0
    with tifffile.TiffFile(tmp_path / "bare.tif") as file:
        assert 33922 not in file.pages[0].tags and file.pages[0].tags[42113].value == "-9999"
    assert main(["apply", "out/transform.json", "moving.tif", "-o", "zeros.tif", "-q", "--nodata", "none"]) == 0
    zeros = tifffile.imread(tmp_path / "zeros.tif")
    assert (zeros == -9999).any() and (zeros == 0).sum() > 1000  # as before: blended, and 0 beyond the image


@pytest.mark.parametrize("reference", ["first", "previous", "mean"])
def test_stack_leaves_each_frames_own_no_data_out(drift, tmp_path, monkeypatch, reference):
    """Scenes of a time series, each with a no-data strip of its own (a swath edge that moves): the
    strips were registered as image values (frames tens of px off); each frame's no-data is now its
    own mask, as the moving frame and as the reference."""
    monkeypatch.chdir(tmp_path)
    _, truths, frames, _ = drift
    frames = frames.astype(np.float32)
    for k in range(len(frames)):
        frames[k, :, :12 + 8 * k] = -9999
    tifffile.imwrite("scenes.tif", frames, extratags=[(42113, "s", 0, "-9999", True)])
    assert main(["stack", "scenes.tif", "-o", "out.tif", "-t", "rigid", "-r", reference, "-q"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    size = frames.shape[1:]
    errors = [grid_error(matrix_of(row), torch.as_tensor(truths[k]), size) for k, row in enumerate(rows)]
    assert max(errors) < 0.1, errors
    with tifffile.TiffFile(tmp_path / "out.tif") as file:
        assert file.pages[0].tags[42113].value == "-9999"
        aligned = file.asarray()
    assert ((aligned == -9999).reshape(len(frames), -1).sum(axis=1) >= 12 * size[0]).all()


def test_register_warns_where_the_pixel_sizes_differ_by_a_scale_the_transform_cannot_take(data, tmp_path,
                                                                                           monkeypatch, capsys):
    """A 1 mm slice and a 0.5 mm one (TIFF resolutions) registered rigidly in pixels came out 151
    degrees off, 'converged', without a word (a medical-imaging audit); now a warning names both pixel
    sizes, the scale, and the transforms that take it."""
    monkeypatch.chdir(tmp_path)
    fixed = tifffile.imread(data["folder"] / "fixed32.tif")
    tifffile.imwrite("fixed.tif", fixed, resolution=(10, 10), resolutionunit=3)  # 1 mm pixels
    tifffile.imwrite("fine.tif", fixed, resolution=(20, 20), resolutionunit=3)  # 0.5 mm
    tifffile.imwrite("inch.tif", fixed, resolution=(25.4, 25.4), resolutionunit=2)  # 1 mm too, per inch
    tifffile.imwrite("tall.tif", fixed, resolution=(10, 20), resolutionunit=3)
    expected = ("tireg: warning: the fixed image's pixels are 0.1 x 0.1 cm and the moving image's 0.05 x 0.05 cm "
                "(their TIFF resolutions): tireg registers in pixels, where a rigid transform cannot scale by 2 x 2; "
                "resample MOVING to the fixed pixel size first, or register with -t similarity (or "
                "anisotropic_similarity, affine)")
    for moving, transform, warned in (("fine.tif", "rigid", expected), ("fine.tif", "translation", "a translation"),
                                      ("fine.tif", "similarity", None), ("fine.tif", "affine", None),
                                      ("tall.tif", "similarity", "scale by 1 x 2; resample MOVING to the fixed pixel "
                                       "size first, or register with -t anisotropic_similarity or affine"),
                                      ("tall.tif", "anisotropic_similarity", None), ("inch.tif", "rigid", None)):
        main(["register", "fixed.tif", moving, "-o", "out", "-t", transform, "-q", "--force", "--max-iterations", "1"])
        err = capsys.readouterr().err
        assert (warned is None) == ("pixels are" not in err) and (warned is None or warned in err), (moving, err)


def test_python_m_tireg_runs_the_command_and_medical_files_are_named_with_a_way_out(tmp_path, capsys):
    """``python -m tireg`` had no ``__main__``; a NIfTI volume was named as format '.gz', without a word
    on what to give instead (a medical-imaging audit)."""
    process = subprocess.run([sys.executable, "-m", "tireg", "--version"], capture_output=True, text=True,
                             timeout=120, env=_env())
    assert process.returncode == 0 and process.stdout.startswith("tireg ")
    for name, suffix in (("T1.nii.gz", ".nii.gz"), ("ct.mha", ".mha"), ("slice.dcm", ".dcm")):
        assert main(["register", name, name, "-o", str(tmp_path / "out"), "-q"]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"tireg: error: unsupported fixed image format {suffix!r} for {name!r}"), error
        assert "a medical image: write its slice or slices as a float32 TIFF first, e.g. with SimpleITK" in error
    assert not (tmp_path / "out").exists()


def test_no_data_in_a_channel_not_registered_is_no_data_in_the_warped_image(data, tmp_path, monkeypatch):
    """--channel 0 registers on channel 0; channel 1's own -9999 strip is no data all the same in the
    warped image, in every channel (a pixel has data where all its channels have), not blended into
    its neighbours with channel 0's mask standing for both."""
    monkeypatch.chdir(tmp_path)
    fixed = tifffile.imread(data["folder"] / "fixed32.tif")
    moving = tifffile.imread(data["folder"] / "moving32.tif")
    second = moving.copy()
    second[:, 100:110] = -9999
    _geotiff("fixed.tif", np.stack([fixed, fixed], axis=-1), "-9999")
    _geotiff("moving.tif", np.stack([moving, second], axis=-1), "-9999")
    assert main(["register", "fixed.tif", "moving.tif", "-o", "out", "-q", "--channel", "0", "-t", "affine"]) == 0
    warped = tifffile.imread(tmp_path / "out" / "warped.tif")
    missing = warped == -9999
    assert np.array_equal(missing[..., 0], missing[..., 1])
    assert warped[~missing].min() >= min(moving.min(), 0) - 1e-6  # nothing between the data and -9999
    _geotiff("whole.tif", np.stack([moving, moving], axis=-1), "-9999")
    assert main(["register", "fixed.tif", "whole.tif", "-o", "whole", "-q", "--channel", "0", "-t", "affine"]) == 0
    without_strip = tifffile.imread(tmp_path / "whole" / "warped.tif") == -9999
    assert missing[..., 0].sum() - without_strip[..., 0].sum() > 1000  # the strip, 10 x 128 px, warped


def test_mean_puts_every_frame_on_frame_0s_grid(drift, tmp_path, monkeypatch):
    """--reference mean registers every frame to a mean that the chained first pass placed, off frame 0
    by that pass's error (500 frames: all 0.24 px off, agreeing with one another to 0.014 px, a scale
    audit).  Frame 0's own matrix to the mean takes it back: frame 0 is the identity, as the docs say."""
    monkeypatch.chdir(tmp_path)
    _, truths, frames, _ = drift
    noisy = frames + np.random.default_rng(3).normal(0, 2500, frames.shape)
    tifffile.imwrite("noisy.tif", np.clip(noisy, 0, 65535).astype(np.uint16), photometric="minisblack")
    assert main(["stack", "noisy.tif", "-o", "out.tif", "-t", "rigid", "-r", "mean", "-q"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert np.allclose(matrix_of(rows[0]), np.eye(3), rtol=0, atol=1e-12)  # 2.6e-2 px off before
    size = frames.shape[1:]
    errors = [grid_error(matrix_of(row), torch.as_tensor(truths[k]), size) for k, row in enumerate(rows)]
    assert max(errors) < 0.1, errors
