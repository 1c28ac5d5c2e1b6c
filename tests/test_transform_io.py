"""Transform files: tireg JSON round trips, ITK text files checked against SimpleITK, atomic writes, errors."""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch

from tireg import transform_io
from tireg.transform_io import ImageGeometry, TransformFile, load_transform, save_transform
from tireg.transforms import affine_matrix, rigid_matrix, similarity_matrix

sitk = pytest.importorskip("SimpleITK")

HEADER = "#Insight Transform File V1.0\n#Transform 0\n"
FIXED = ImageGeometry(spacing=(0.5, 2.0), origin=(3.0, -4.0), direction=(0.6, -0.8, 0.8, 0.6))
MOVING = {"spacing": (1.5, 0.7), "origin": (-10.0, 20.0), "direction": ((0.0, 1.0), (1.0, 0.0))}


# ----------------------------------------------------------------------------
# helpers


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_affine(rng: np.random.Generator) -> torch.Tensor:
    linear = np.eye(2) + 0.3 * rng.standard_normal((2, 2))
    params = torch.tensor([*linear.reshape(-1), *(5 * rng.standard_normal(2))], dtype=torch.float64)
    return affine_matrix(params, (31.5, 23.5))


def apply(matrix, points: np.ndarray) -> np.ndarray:
    """``A (x, y, 1)`` for points ``(N, 2)``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def sitk_points(transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


def sitk_image(geometry) -> "sitk.Image":
    geometry = geometry if isinstance(geometry, ImageGeometry) else ImageGeometry(**geometry)
    image = sitk.Image(64, 48, sitk.sitkFloat32)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(v for row in geometry.direction for v in row))
    return image


def sitk_pixel_points(transform, points, fixed, moving) -> np.ndarray:
    """Fixed pixel -> physical -> ITK transform -> moving pixel, all by SimpleITK."""
    fixed_image, moving_image = sitk_image(fixed), sitk_image(moving)
    result = []
    for p in points:
        physical = fixed_image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p)))
        result.append(moving_image.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(physical)))
    return np.array(result)


def write(path, text: str):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------
# JSON


def test_json_round_trip_single(tmp_path, rng):
    matrix = random_affine(rng)
    path = tmp_path / "t.json"
    returned = save_transform(
        path, matrix, transform="affine", parameters={"a00": torch.tensor(1.5), "tx": 2},
        center=(31.5, 23.5), metadata={"loss": "l2", "steps": [1, 2], "array": np.arange(3)},
    )
    assert returned == path
    loaded = load_transform(path)
    assert isinstance(loaded, TransformFile)
    assert loaded.matrix.dtype == torch.float64 and loaded.matrix.shape == (3, 3)
    assert torch.equal(loaded.matrix, matrix)  # bit-identical: floats written with repr
    assert loaded.transform == "affine"
    assert loaded.parameters == {"a00": 1.5, "tx": 2.0}
    assert torch.equal(loaded.center, torch.tensor([31.5, 23.5], dtype=torch.float64))
    assert loaded.metadata == {"loss": "l2", "steps": [1, 2], "array": [0, 1, 2]}
    document = json.loads(path.read_text())
    assert document["format"] == "tireg-transform" and document["version"] == 1
    assert "fixed" in document["convention"] and "column" in document["convention"]


def test_json_round_trip_batch(tmp_path, rng):
    matrices = torch.stack([random_affine(rng) for _ in range(4)])
    centers = torch.tensor(rng.standard_normal((4, 2)))
    path = save_transform(tmp_path / "b.json", matrices, transform="rigid", center=centers,
                          parameters={"angle": torch.arange(4.0)})
    loaded = load_transform(path)
    assert loaded.matrix.shape == (4, 3, 3) and torch.equal(loaded.matrix, matrices)
    assert torch.equal(loaded.center, centers)
    assert loaded.parameters == {"angle": [0.0, 1.0, 2.0, 3.0]}
    single = load_transform(save_transform(tmp_path / "one.json", matrices[:1]))
    assert single.matrix.shape == (1, 3, 3)  # JSON keeps the batch dimension
    assert single.center is None and single.transform is None and single.parameters == {}


def test_json_accepts_arrays_lists_and_float32(tmp_path, rng):
    matrix = random_affine(rng)
    cases = [
        (matrix.numpy(), matrix),
        (matrix.tolist(), matrix),
        (matrix.float(), matrix.float().double()),
        (matrix.clone().requires_grad_(), matrix),
        (np.eye(3, dtype=np.int64), torch.eye(3, dtype=torch.float64)),
    ]
    for i, (given, expected) in enumerate(cases):
        loaded = load_transform(save_transform(tmp_path / f"{i}.json", given))
        assert torch.equal(loaded.matrix, expected), i


def test_json_records_geometry_and_refuses_another(tmp_path):
    path = save_transform(tmp_path / "g.json", torch.eye(3), fixed_geometry=FIXED, moving_geometry=MOVING)
    loaded = load_transform(path)
    assert loaded.fixed_geometry == FIXED and loaded.moving_geometry == ImageGeometry(**MOVING)
    assert torch.equal(loaded.matrix, torch.eye(3, dtype=torch.float64))  # pixel units, never converted
    assert load_transform(path, fixed_geometry=FIXED).fixed_geometry == FIXED
    with pytest.raises(ValueError, match=r"load_transform\(\): .*refers to fixed_geometry"):
        load_transform(path, fixed_geometry=ImageGeometry())


# ----------------------------------------------------------------------------
# ITK text written by tireg, read by SimpleITK


def _rigid(rng):
    return rigid_matrix(torch.tensor([0.4, 3.0, -2.0], dtype=torch.float64), (40.0, -12.5)), (40.0, -12.5)


def _similarity(rng):
    return similarity_matrix(torch.tensor([-1.1, 1.3, 0.5, 7.0], dtype=torch.float64), (5.0, 9.0)), (5.0, 9.0)


def _affine(rng):
    return random_affine(rng), (31.5, 23.5)


def _affine_no_center(rng):
    return random_affine(rng), None


@pytest.mark.parametrize("make", [_rigid, _similarity, _affine, _affine_no_center])
@pytest.mark.parametrize("geometry", [False, True], ids=["pixel", "geometry"])
@pytest.mark.parametrize("suffix", [".tfm", ".txt"])
def test_tfm_is_read_by_simpleitk(tmp_path, rng, make, geometry, suffix):
    matrix, center = make(rng)
    fixed, moving = (FIXED, MOVING) if geometry else (None, None)
    path = save_transform(tmp_path / f"t{suffix}", matrix, center=center, transform="x",
                          parameters={"p": 1.0}, metadata={"note": "ITK skips this comment"},
                          fixed_geometry=fixed, moving_geometry=moving)
    transform = sitk.ReadTransform(str(path))
    assert transform.GetName() == "AffineTransform"
    points = rng.uniform(-50, 150, size=(200, 2))
    if geometry:
        mapped = sitk_pixel_points(transform, points, FIXED, MOVING)
    else:
        mapped = sitk_points(transform, points)
    np.testing.assert_allclose(mapped, apply(matrix, points), rtol=0, atol=1e-6)
    # the centre is ITK's fixed parameter, in physical units
    expected_center = (0.0, 0.0)  # ITK's default centre
    if center is not None:
        expected_center = sitk_image(fixed or ImageGeometry()).TransformContinuousIndexToPhysicalPoint(center)
    np.testing.assert_allclose(transform.GetFixedParameters(), expected_center, atol=1e-12)
    loaded = load_transform(path, fixed_geometry=fixed, moving_geometry=moving)
    np.testing.assert_allclose(loaded.matrix.numpy(), matrix.numpy(), rtol=0, atol=1e-12)
    if center is not None:
        np.testing.assert_allclose(loaded.center.numpy(), center, atol=1e-12)


def test_tireg_rigid_is_itk_euler_with_opposite_angle(tmp_path):
    """tireg's rotation is OpenCV's (the transpose of ITK's): angle theta is ITK's -theta."""
    theta, center, shift = 0.4, (40.0, -12.5), (3.0, -2.0)
    matrix = rigid_matrix(torch.tensor([theta, *shift], dtype=torch.float64), center)
    euler = sitk.Euler2DTransform(center, -theta, shift)
    path = save_transform(tmp_path / "r.tfm", matrix, center=center)
    written = sitk.ReadTransform(str(path))
    points = np.random.default_rng(0).uniform(-20, 80, size=(50, 2))
    np.testing.assert_allclose(sitk_points(written, points), sitk_points(euler, points), atol=1e-9)
    np.testing.assert_allclose(written.GetParameters()[4:], shift, atol=1e-12)


def test_tfm_floats_are_exact(tmp_path):
    matrix = torch.tensor([[1 / 3, math.pi, 1e-20], [-2 / 7, 0.1, 123456.789], [0, 0, 1]], dtype=torch.float64)
    path = save_transform(tmp_path / "p.tfm", matrix)
    text = path.read_text()
    assert "0.3333333333333333" in text and "3.141592653589793" in text and "1e-20" in text
    assert torch.equal(load_transform(path).matrix, matrix)
    assert sitk.ReadTransform(str(path)).GetParameters()[1] == math.pi


def test_tfm_batch_of_one_is_written_batch_refused(tmp_path, rng):
    matrix = random_affine(rng)
    path = save_transform(tmp_path / "one.tfm", matrix[None], center=[[1.0, 2.0]])
    loaded = load_transform(path)
    assert loaded.matrix.shape == (3, 3)
    np.testing.assert_allclose(loaded.center.numpy(), (1.0, 2.0))
    with pytest.raises(ValueError, match=r"save_transform\(\): .*batch of 2 .*save each pair separately"):
        save_transform(tmp_path / "two.tfm", torch.stack([matrix, matrix]))
    assert not (tmp_path / "two.tfm").exists()


def test_tfm_comment_restores_kind_only_when_it_still_describes_the_file(tmp_path):
    matrix = rigid_matrix(torch.tensor([0.2, 1.0, 2.0], dtype=torch.float64), (4.0, 5.0))
    kwargs = dict(transform="rigid", parameters={"angle": 0.2, "tx": 1.0, "ty": 2.0}, metadata={"run": 7})
    path = save_transform(tmp_path / "r.tfm", matrix, center=(4.0, 5.0), **kwargs)
    loaded = load_transform(path)
    assert (loaded.transform, loaded.parameters, loaded.metadata) == ("rigid", kwargs["parameters"], {"run": 7})
    # another geometry gives another pixel matrix: the pixel-unit parameters no longer apply
    with pytest.warns(UserWarning, match="was saved with fixed_geometry None but is read with ImageGeometry"):
        other = load_transform(path, fixed_geometry={"spacing": (2.0, 2.0)})
    assert other.transform == "AffineTransform_double_2_2" and other.parameters == {}
    assert other.metadata == {"run": 7}
    np.testing.assert_allclose(other.center.numpy(), (2.0, 2.5))
    # an edited file: the comment's matrix no longer matches
    edited = path.read_text().replace("Parameters: ", "Parameters: 2", 1)
    assert load_transform(write(tmp_path / "e.tfm", edited)).transform == "AffineTransform_double_2_2"
    # a damaged comment is ignored, the transform still reads
    damaged = path.read_text().replace('#tireg: {', "#tireg: {{")
    plain = load_transform(write(tmp_path / "d.tfm", damaged))
    assert plain.transform == "AffineTransform_double_2_2" and "itk_transforms" in plain.metadata
    np.testing.assert_allclose(plain.matrix.numpy(), matrix.numpy(), atol=1e-12)


# ----------------------------------------------------------------------------
# ITK text written by SimpleITK / ITK, read by tireg


def _sitk_transforms():
    scale = sitk.ScaleTransform(2, (1.2, 0.8))
    scale.SetCenter((5.0, -6.0))
    return {
        "affine": sitk.AffineTransform((1.1, 0.2, -0.3, 0.9), (3.0, 4.0), (5.0, 6.0)),
        "euler": sitk.Euler2DTransform((5.0, 6.0), 0.3, (3.0, 4.0)),
        "similarity": sitk.Similarity2DTransform(1.2, -0.7, (3.0, 4.0), (-5.0, 6.0)),
        "translation": sitk.TranslationTransform(2, (3.0, -4.0)),
        "scale": scale,
        "scale_no_center": sitk.ScaleTransform(2, (0.5, 3.0)),
        "identity": sitk.Transform(2, sitk.sitkIdentity),
    }


SITK_NAMES = list(_sitk_transforms())

HAND_WRITTEN = {  # types SimpleITK reads but cannot create
    "affine_float": "Transform: AffineTransform_float_2_2\nParameters: 1.1 0.2 -0.3 0.9 3 4\nFixedParameters: 5 6\n",
    "rigid2d": "Transform: Rigid2DTransform_double_2_2\nParameters: 0.3 3 4\nFixedParameters: 5 6\n",
    "centered_rigid2d": "Transform: CenteredRigid2DTransform_double_2_2\nParameters: -0.4 7.5 -3 2.5 1.5\n"
    "FixedParameters: 1 1\n",
    "matrix_offset": "Transform: MatrixOffsetTransformBase_double_2_2\nParameters: 1.1 0.2 -0.3 0.9 3 4\n"
    "FixedParameters: 5 6\n",
    "similarity_float": "Transform: Similarity2DTransform_float_2_2\nParameters: 1.2 0.3 3 4\nFixedParameters: 5 6\n",
}


@pytest.mark.parametrize("name", SITK_NAMES)
def test_simpleitk_written_types_map_points_as_simpleitk(tmp_path, rng, name):
    transform = _sitk_transforms()[name]
    path = tmp_path / f"{name}.tfm"
    sitk.WriteTransform(transform, str(path))
    loaded = load_transform(path)
    points = rng.uniform(-30, 80, size=(100, 2))
    np.testing.assert_allclose(apply(loaded.matrix, points), sitk_points(transform, points), rtol=0, atol=1e-9)
    assert loaded.transform == path.read_text().splitlines()[2].split(": ")[1]
    assert loaded.metadata["itk_transforms"][0]["parameters"] == list(transform.GetParameters())


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_types_map_points_as_simpleitk(tmp_path, rng, name):
    path = write(tmp_path / f"{name}.tfm", HEADER + HAND_WRITTEN[name])
    transform = sitk.ReadTransform(str(path))
    loaded = load_transform(path)
    points = rng.uniform(-30, 80, size=(100, 2))
    np.testing.assert_allclose(apply(loaded.matrix, points), sitk_points(transform, points), rtol=0, atol=1e-9)


# Types that SimpleITK cannot read: point images computed once with ITK 5.4's
# Python wrapping (itk.transformread(path)[0].TransformPoint); ITK takes the
# centre from the parameters, not from FixedParameters.
ITK_ONLY = {
    "CenteredSimilarity2DTransform": (
        "Parameters: 1.25 -0.4 7.5 -3 2.5 1.5\nFixedParameters: 0 0\n",
        [(2.825371964880392, 5.604775686654418), (5.3058048366195845, 1.8418044179897657),
         (36.687867111608, 45.57316378822601)],
    ),
    "CenteredAffineTransform": (
        "Parameters: 1.1 0.2 -0.3 0.9 7.5 -3 2.5 1.5\nFixedParameters: 1 1\n",
        [(2.35, 3.45), (5.25, 0.75), (24.1, 35.7)],
    ),
    "CenteredRigid2DTransform": (
        "Parameters: -0.4 7.5 -3 2.5 1.5\nFixedParameters: 1 1\n",
        [(4.260297571904314, 4.183820549323534), (6.244643869295668, 1.1734435343918124),
         (31.3502936892864, 36.158531030580804)],
    ),
}


@pytest.mark.parametrize("kind", list(ITK_ONLY))
def test_centered_types_match_itk(tmp_path, kind):
    lines, expected = ITK_ONLY[kind]
    loaded = load_transform(write(tmp_path / "c.tfm", f"{HEADER}Transform: {kind}_double_2_2\n{lines}"))
    points = np.array([(0.0, 0.0), (3.0, -2.0), (12.5, 40.0)])
    np.testing.assert_allclose(apply(loaded.matrix, points), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(loaded.center.numpy(), (7.5, -3.0))


@pytest.mark.parametrize("kind, parameters", [("ScaleTransform", "2 3"),
                                              ("CenteredAffineTransform", "1 0 0 1 1 2 0 0")])
def test_no_fixed_parameters_is_refused_where_itk_refuses_it(tmp_path, kind, parameters):
    """Read as the centre (0, 0); ITK: "Error setting fixed parameters: parameters array size (0)".  The
    centred types that ignore theirs are read with none, as by ITK."""
    path = write(tmp_path / "t.tfm", f"{HEADER}Transform: {kind}_double_2_2\nParameters: {parameters}\n"
                                     "FixedParameters:\n")
    with pytest.raises(RuntimeError, match=r"Error setting fixed parameters: parameters array size \(0\)"):
        sitk.ReadTransform(str(path))
    with pytest.raises(ValueError, match=rf"^load_transform\(\): '.*t\.tfm', line 3 \({kind}_double_2_2\): expected 2 "
                                         r"fixed parameters; got 0; ITK refuses it too$"):
        load_transform(path)
    for centred in ("CenteredRigid2DTransform", "CenteredSimilarity2DTransform"):
        lines, expected = ITK_ONLY[centred]
        path = write(tmp_path / "c.tfm", f"{HEADER}Transform: {centred}_double_2_2\n{lines.split('Fixed')[0]}"
                                         "FixedParameters:\n")
        points = np.array([(0.0, 0.0), (3.0, -2.0), (12.5, 40.0)])
        np.testing.assert_allclose(apply(load_transform(path).matrix, points), expected, rtol=0, atol=1e-9)


def test_simpleitk_file_with_geometry(tmp_path, rng):
    transform = sitk.Similarity2DTransform(1.2, -0.7, (3.0, 4.0), (-5.0, 6.0))
    path = tmp_path / "s.tfm"
    sitk.WriteTransform(transform, str(path))
    loaded = load_transform(path, fixed_geometry=FIXED, moving_geometry=MOVING)
    points = rng.uniform(0, 60, size=(100, 2))
    expected = sitk_pixel_points(transform, points, FIXED, MOVING)
    np.testing.assert_allclose(apply(loaded.matrix, points), expected, rtol=0, atol=1e-9)
    center = sitk_image(FIXED).TransformPhysicalPointToContinuousIndex((-5.0, 6.0))
    np.testing.assert_allclose(loaded.center.numpy(), center, atol=1e-9)
    assert loaded.fixed_geometry == FIXED


def test_composite_applies_the_last_added_transform_first(tmp_path, rng):
    parts = [
        sitk.Euler2DTransform((5.0, 6.0), 0.3, (3.0, 4.0)),
        sitk.TranslationTransform(2, (10.0, -20.0)),
        sitk.AffineTransform((1.1, 0.2, -0.3, 0.9), (1.0, 2.0), (-4.0, 7.0)),
    ]
    composite = sitk.CompositeTransform(parts)
    path = tmp_path / "c.tfm"
    sitk.WriteTransform(composite, str(path))
    loaded = load_transform(path)
    points = rng.uniform(-30, 80, size=(100, 2))
    np.testing.assert_allclose(apply(loaded.matrix, points), sitk_points(composite, points), rtol=0, atol=1e-9)
    # the other order gives other points: the test can tell the two apart
    by_part = [load_transform(write(tmp_path / f"{i}.tfm", HEADER + _block(p))).matrix for i, p in enumerate(parts)]
    np.testing.assert_allclose(loaded.matrix, by_part[0] @ by_part[1] @ by_part[2], atol=1e-12)
    assert not np.allclose(loaded.matrix, by_part[2] @ by_part[1] @ by_part[0], atol=1e-3)
    assert loaded.transform == "CompositeTransform_double_2_2" and loaded.center is None
    assert [b["transform"] for b in loaded.metadata["itk_transforms"]] == [
        "CompositeTransform_double_2_2", "Euler2DTransform_double_2_2",
        "TranslationTransform_double_2_2", "AffineTransform_double_2_2",
    ]
    empty = tmp_path / "empty.tfm"
    sitk.WriteTransform(sitk.CompositeTransform(2), str(empty))
    assert torch.equal(load_transform(empty).matrix, torch.eye(3, dtype=torch.float64))


def _block(transform) -> str:
    """One transform's ITK lines (as SimpleITK writes them), without the header."""
    return (
        f"Transform: {transform.GetName()}_double_2_2\n"
        f"Parameters: {' '.join(map(repr, transform.GetParameters()))}\n"
        f"FixedParameters: {' '.join(map(repr, transform.GetFixedParameters()))}\n"
    ).replace("Transform: Transform_", "Transform: ")


def test_itk_text_without_header_with_crlf(tmp_path):
    text = "Transform: TranslationTransform_double_2_2\r\nParameters: 1 2\r\nFixedParameters:\r\n"
    loaded = load_transform(write(tmp_path / "t.txt", text))
    assert torch.equal(loaded.matrix, torch.tensor([[1.0, 0, 1], [0, 1, 2], [0, 0, 1]], dtype=torch.float64))
    assert loaded.center is None


@pytest.mark.parametrize("character", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_itk_lines_end_at_newlines_only(tmp_path, character):
    """``str.splitlines()`` also ended a line at these: a comment holding one (SimpleITK reads the file)
    gave "unknown entry 'see notes'", and the line numbers after it were one too many."""
    text = (f"#Insight Transform File V1.0\n# exported by a tool{character}see notes: v2\n#Transform 0\n"
            "Transform: AffineTransform_double_2_2\nParameters: 1 0 0 1 2.5 -3\nFixedParameters: 10 20\n")
    path = tmp_path / "t.tfm"
    path.write_text(text, encoding="utf-8")
    points = np.array([[0.0, 0.0], [3.0, -7.0]])
    expected = sitk_points(sitk.ReadTransform(str(path)), points)
    np.testing.assert_array_equal(apply(load_transform(path).matrix, points), expected)
    path.write_text(text.replace("1 2.5 -3", "1 2.5 x"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.tfm', line 5: expected numbers"):
        load_transform(path)


@pytest.mark.parametrize("separator", ["\x0b", "\x0c"])
def test_itk_numbers_may_be_separated_by_vertical_tab_or_form_feed(tmp_path, separator):
    """White space to ITK's number reader, as to SimpleITK; they had split the line in two."""
    path = write(tmp_path / "t.tfm", HEADER + f"Transform: AffineTransform_double_2_2\nParameters: 1 0 0 1{separator}"
                                               "2.5 -3\nFixedParameters: 10 20\n")
    expected = sitk_points(sitk.ReadTransform(str(path)), np.zeros((1, 2)))
    np.testing.assert_array_equal(apply(load_transform(path).matrix, np.zeros((1, 2))), expected)


# ----------------------------------------------------------------------------
# geometry


def test_image_geometry_matches_simpleitk(rng):
    assert FIXED.direction == ((0.6, -0.8), (0.8, 0.6))  # flat, row by row, as SimpleITK gives it
    image = sitk_image(FIXED)
    assert ImageGeometry.from_sitk(image) == FIXED
    points = rng.uniform(0, 40, size=(20, 2))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(apply(FIXED.physical_matrix(), points), expected, atol=1e-12)
    assert torch.equal(ImageGeometry().physical_matrix(), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"from_sitk\(\): the image must be 2-D"):
        ImageGeometry.from_sitk(sitk.Image(4, 4, 4, sitk.sitkUInt8))


@pytest.mark.parametrize(
    "geometry, error, match",
    [
        ({"spacing": (0.0, 1.0)}, ValueError, r"'spacing' must be positive"),
        ({"spacing": (1.0,)}, ValueError, r"'spacing' must have 2 values"),
        ({"origin": (0.0, math.nan)}, ValueError, r"'origin' contains NaN"),
        ({"direction": ((1.0, 2.0), (2.0, 4.0))}, ValueError, r"'direction' must be invertible"),
        ({"direction": (1.0, 0.0, 0.0)}, ValueError, r"'direction' must have shape \(2, 2\) or \(4,\)"),
        ({"direction": ((1.0, math.inf), (0.0, 1.0))}, ValueError, r"'direction' contains NaN"),
        ({"direction": "identity"}, TypeError, r"'direction' must be a tensor, an array or nested lists of real"),
        ({"spacing": "1 1"}, TypeError, r"'spacing' must be a tensor, an array or nested lists of real numbers"),
        # these were taken (strings and booleans as numbers, an imaginary part dropped), or failed deep inside
        ({"direction": ("1", "0", "0", "1")}, TypeError, r"'direction' must be .* real numbers; got tuple of <U1"),
        ({"direction": ((True, False), (False, True))}, TypeError, r"'direction' must be .*; got tuple of bool"),
        ({"direction": ((True, 0), (0, 1))}, TypeError, r"'direction' must be .*; got an entry True"),
        ({"direction": np.eye(2) + 1j}, TypeError, r"'direction' must be .*; got ndarray of complex128"),
        ({"direction": ((10 ** 400, 0), (0, 1))}, ValueError, r"'direction' has a value beyond float64's range"),
        ({"spacing": (1e-320, 1.0)}, ValueError, r"'spacing' must be positive and at least 2.2e-308, float64's "
         r"smallest normal number \(a smaller, subnormal spacing has no finite or no accurate inverse\); "
         r"got \(1e-320, 1.0\)"),
        ({"spacing": (1.0, 5e-324)}, ValueError, r"'spacing' must be positive and at least 2.2e-308.*; "
         r"got \(1.0, 5e-324\)"),
        ({"spacing": (-1.0, 1.0)}, ValueError, r"'spacing' must be positive and at least 2.2e-308.*; "
         r"got \(-1.0, 1.0\)"),
        ({"size": (3, 4)}, ValueError, r"'fixed_geometry' has unknown keys \['size'\]"),
        ((1.0, 1.0), TypeError, r"'fixed_geometry' must be an ImageGeometry"),
    ],
)
def test_geometry_errors(tmp_path, geometry, error, match):
    with pytest.raises(error, match=r"save_transform\(\): .*" + match):
        save_transform(tmp_path / "g.tfm", torch.eye(3), fixed_geometry=geometry)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# atomic writes and overwrite


@pytest.mark.parametrize("suffix", [".json", ".tfm"])
def test_failed_replace_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch, suffix):
    path = save_transform(tmp_path / f"t{suffix}", torch.eye(3))
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(transform_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_transform(path, torch.diag(torch.tensor([2.0, 2.0, 1.0])))
    with pytest.raises(OSError, match="disk full"):
        save_transform(tmp_path / f"new{suffix}", torch.eye(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == before


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(descriptor):
        raise OSError("I/O error while writing")

    monkeypatch.setattr(transform_io.os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        save_transform(tmp_path / "t.json", torch.eye(3))
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_metadata_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"save_transform\(\): 'metadata'\['bad'\]\[1\] has type object"):
        save_transform(tmp_path / "t.json", torch.eye(3), metadata={"ok": 1, "bad": [1, object()]})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_false_refuses_existing_file(tmp_path):
    path = save_transform(tmp_path / "t.json", torch.eye(3), metadata={"first": True})
    with pytest.raises(FileExistsError, match=r"save_transform\(\): .*t\.json' already exists"):
        save_transform(path, torch.eye(3), overwrite=False)
    assert load_transform(path).metadata == {"first": True}
    save_transform(path, torch.eye(3), metadata={"second": True})  # overwrite=True is the default
    assert load_transform(path).metadata == {"second": True}
    new = save_transform(tmp_path / "new.tfm", torch.eye(3), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.tfm", "t.json"] and new.exists()


def test_overwrite_false_loses_no_race(tmp_path, monkeypatch):
    """A file that appears while tireg writes is not replaced (hard link, or check without links)."""
    path = tmp_path / "t.json"
    real_fsync = os.fsync

    def someone_else_writes(descriptor):
        path.write_text("theirs")
        real_fsync(descriptor)

    monkeypatch.setattr(transform_io.os, "fsync", someone_else_writes)
    with pytest.raises(FileExistsError, match="already exists"):
        save_transform(path, torch.eye(3), overwrite=False)
    assert path.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["t.json"]

    def no_links(*args):
        raise PermissionError("no hard links here")

    monkeypatch.setattr(transform_io.os, "link", no_links)
    with pytest.raises(FileExistsError, match="already exists"):
        save_transform(path, torch.eye(3), overwrite=False)
    assert path.read_text() == "theirs"
    monkeypatch.setattr(transform_io.os, "fsync", real_fsync)
    other = save_transform(tmp_path / "other.json", torch.eye(3), overwrite=False)
    assert torch.equal(load_transform(other).matrix, torch.eye(3, dtype=torch.float64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "t.json"]


def test_singular_matrix_is_saved_with_a_warning(tmp_path):
    singular = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [0.0, 0.0, 1.0]])
    with pytest.warns(UserWarning, match=r"save_transform\(\): the matrix's linear part is singular"):
        path = save_transform(tmp_path / "s.tfm", singular)
    np.testing.assert_allclose(load_transform(path).matrix.numpy(), singular.numpy())
    with pytest.warns(UserWarning, match=r"singular \(batch entries \[1\]\)"):
        save_transform(tmp_path / "s.json", torch.stack([torch.eye(3), singular]))


# ----------------------------------------------------------------------------
# save errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(matrix=torch.eye(3)[:2]), ValueError, r"'matrix' must have shape \(3, 3\) or \(B, 3, 3\) .*got \(2, 3\)"),
        (dict(matrix=torch.zeros(0, 3, 3)), ValueError, r"'matrix' must have shape .*got \(0, 3, 3\)"),
        (dict(matrix=torch.eye(4)), ValueError, r"'matrix' must have shape .*got \(4, 4\)"),
        (dict(matrix=torch.eye(3) * math.nan), ValueError, r"'matrix' contains NaN or Inf"),
        (dict(matrix=[[1, 0, 0], [0, 1, 0], [0.1, 0, 1]]), ValueError,
         r"'matrix' must be affine.*\[0\.1, 0\.0, 1\.0\]"),
        (dict(matrix=torch.eye(3, dtype=torch.complex64)), TypeError, r"'matrix' must be real"),
        (dict(matrix="eye"), TypeError, r"'matrix' must be a tensor, an array or nested lists of real .*; got str"),
        (dict(matrix=[[1, 0], [0, 1, 0]]), TypeError, r"'matrix' must be a tensor, an array or nested lists"),
        (dict(center=(1.0, None)), TypeError, r"'center' must be a tensor, .*; got an entry None"),  # was NaN
        (dict(transform=3), TypeError, r"'transform' must be a string or None; got int"),
        (dict(parameters=[1.0]), TypeError, r"'parameters' must be a dict"),
        (dict(parameters={1: 1.0}), TypeError, r"'parameters' names must be strings; got 1"),
        (dict(parameters={"a": math.inf}), ValueError, r"'parameters\['a'\]' contains NaN or Inf"),
        (dict(parameters={"a": "x"}), TypeError, r"'parameters\['a'\]' must be a tensor, an array or nested lists"),
        (dict(center=(1.0, 2.0, 3.0)), ValueError, r"'center' must have shape \(2,\); got \(3,\)"),
        (dict(center=(1.0, math.nan)), ValueError, r"'center' contains NaN or Inf"),
        (dict(metadata=[("a", 1)]), TypeError, r"'metadata' must be a dict; got list"),
        (dict(metadata={"a": math.nan}), ValueError, r"'metadata'\['a'\] is nan; JSON has no NaN"),
        (dict(metadata={"a": {2: 1}}), TypeError, r"'metadata'\['a'\] has a key 2 that is not a string"),
        (dict(metadata={"a": np.array(["x"])}), TypeError, r"'metadata'\['a'\] has dtype <U1"),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".tfm"])
def test_save_errors(tmp_path, kwargs, error, match, suffix):
    kwargs = {"matrix": torch.eye(3), **kwargs}
    with pytest.raises(error, match=r"^save_transform\(\): " + match):
        save_transform(tmp_path / f"t{suffix}", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_save_batch_center_shape(tmp_path):
    with pytest.raises(ValueError, match=r"'center' must have shape \(2,\) or \(3, 2\); got \(2, 2\)"):
        save_transform(tmp_path / "b.json", torch.eye(3).expand(3, 3, 3), center=torch.zeros(2, 2))


@pytest.mark.parametrize(
    "name, match",
    [
        ("t.h5", r"unsupported file suffix '\.h5' .*use one of \.json, \.tfm, \.txt \("),  # a hint: below
        ("t.xml", r"unsupported file suffix '\.xml' .*use one of \.json, \.tfm, \.txt$"),
        ("transform", r"unsupported file suffix '\(none\)'"),
    ],
)
def test_unknown_suffix(tmp_path, name, match):
    with pytest.raises(ValueError, match=r"save_transform\(\): " + match):
        save_transform(tmp_path / name, torch.eye(3))
    with pytest.raises(ValueError, match=r"load_transform\(\): " + match):
        load_transform(tmp_path / name)


def test_upper_case_suffix(tmp_path):
    path = save_transform(tmp_path / "T.TFM", torch.eye(3))
    assert path.read_text().startswith("#Insight Transform File V1.0")
    assert torch.equal(load_transform(path).matrix, torch.eye(3, dtype=torch.float64))


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"save_transform\(\): folder .*nowhere' does not exist"):
        save_transform(tmp_path / "nowhere" / "t.json", torch.eye(3))


def test_a_folder_that_takes_no_files_is_named_with_the_file_asked_for(tmp_path, monkeypatch):
    """"PermissionError: [Errno 13] Permission denied: '.tireg-1f2e3d4c.tmp.tfm'" named neither the file
    asked for nor the caller.  Simulated, so that it runs as root too (permissions are not enforced)."""
    import tireg

    path = tmp_path / "a.tfm"
    access = os.access
    monkeypatch.setattr(os, "access", lambda name, mode, **kw: False if name == tmp_path else access(name, mode, **kw))
    with pytest.raises(PermissionError, match=r"^save_transform\(\): cannot write '.*a\.tfm': the folder '.*' is not "
                                              r"writable$"):
        save_transform(path, torch.eye(3))
    monkeypatch.setattr(os, "access", access)

    def refuse(name, *args, **kwargs):  # the write itself refused: as root, on a read-only file system
        raise PermissionError(13, "Permission denied", str(name))

    monkeypatch.setattr(transform_io, "open", refuse, raising=False)
    with pytest.raises(PermissionError, match=r"^save_transform\(\): cannot write '.*a\.tfm': Permission "
                                              r"denied$") as raised:
        save_transform(path, torch.eye(3))
    assert raised.value.errno == 13 and ".tireg-" not in str(raised.value)
    result = tireg.register(torch.rand(1, 16, 16), torch.rand(1, 16, 16), transform="translation")
    with pytest.raises(PermissionError, match=r"^save_transform\(\): cannot write '.*r\.json': Permission denied$"):
        result.save(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_replacing_writes_through_a_link_keeps_the_mode_and_refuses_a_file_not_writable(tmp_path, monkeypatch):
    """As SimpleITK and np.save write: os.replace onto a symbolic link had made it a plain file (its target
    kept the old content), a file replaced took the default mode, and a read-only one was replaced."""
    (tmp_path / "real").mkdir()
    target = write(tmp_path / "real" / "t.tfm", "old\n")
    link = tmp_path / "link.tfm"
    link.symlink_to(target)
    twice = torch.diag(torch.tensor([2.0, 2.0, 1.0]))
    save_transform(link, twice)
    assert link.is_symlink() and link.resolve() == target
    assert torch.equal(load_transform(target).matrix, twice.double())
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "real" / "new.json")
    save_transform(dangling, twice)
    assert dangling.is_symlink() and torch.equal(load_transform(tmp_path / "real" / "new.json").matrix, twice.double())
    with pytest.raises(FileExistsError, match="link.tfm' already exists"):
        save_transform(link, torch.eye(3), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.json", "link.tfm", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.json", "t.tfm"]

    target.chmod(0o640)
    save_transform(link, torch.eye(3))
    assert (target.stat().st_mode & 0o777) == 0o640 and torch.equal(load_transform(link).matrix, torch.eye(3).double())
    target.chmod(0o444)
    access = os.access  # a user's read-only file: os.access says no (as root it says yes, and it is replaced)
    monkeypatch.setattr(os, "access", lambda name, mode, **kw: False if name == target and mode == os.W_OK
                        else access(name, mode, **kw))
    for path, which in ((target, "it"), (link, f"the file it links to, '{target}',")):
        with pytest.raises(PermissionError, match=rf"^save_transform\(\): cannot write '{re.escape(str(path))}': "
                                                  rf"{re.escape(which)} is not writable \(-r--r--r--\); make it "
                                                  r"writable or remove it first$"):
            save_transform(path, twice)
    assert torch.equal(load_transform(target).matrix, torch.eye(3).double())
    monkeypatch.setattr(os, "access", access)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # as root, replaced, and read-only still
        save_transform(link, twice)
        assert (target.stat().st_mode & 0o777) == 0o444 and torch.equal(load_transform(link).matrix, twice.double())
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.json", "t.tfm"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_folder_is_named(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    try:
        with pytest.raises(PermissionError, match=r"^save_transform\(\): cannot write '.*locked/a\.tfm': the folder "
                                                  r"'.*locked' is not writable$"):
            save_transform(folder / "a.tfm", torch.eye(3))
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------
# load errors


def test_load_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_transform\(\): no such file: .*missing\.tfm"):
        load_transform(tmp_path / "missing.tfm")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"load_transform\(\): .*dir\.json' is a folder"):
        load_transform(tmp_path / "dir.json")


def test_load_binary_file(tmp_path):
    (tmp_path / "b.tfm").write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"load_transform\(\): .*b\.tfm' is not a UTF-8 text file"):
        load_transform(tmp_path / "b.tfm")


def test_itk_comment_lines_may_hold_latin1_bytes_the_rest_must_be_utf8(tmp_path):
    # A Latin-1 comment, which ITK and SimpleITK read, had made the whole file "not a UTF-8 text file".
    text = ("#Insight Transform File V1.0\n# Erstellt f\u00fcr M\u00fcller\n#Transform 0\n"
            "Transform: AffineTransform_double_2_2\nParameters: 1 0 0 1 2.5 0\nFixedParameters: 0 0\n")
    path = tmp_path / "latin.tfm"
    path.write_bytes(text.encode("latin-1"))
    expected = np.array([[1.0, 0.0, 2.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert np.array_equal(load_transform(path).matrix.numpy(), expected)
    assert sitk.ReadTransform(str(path)).TransformPoint((0.0, 0.0)) == (2.5, 0.0)
    # tireg's record still applies beside such a comment
    saved = save_transform(tmp_path / "t.tfm", torch.eye(3), transform="rigid", parameters={"angle": 0.0})
    saved.write_bytes(saved.read_bytes().replace(b"#Transform 0", "# f\u00fcr\n#Transform 0".encode("latin-1")))
    assert load_transform(saved).transform == "rigid"
    # outside a comment, and in the #tireg: record, a byte that is not UTF-8 is named with its line
    cases = [(text.replace("Parameters: 1", "Parameters: \u00b51"), r"line 5 \(not a comment\) holds the byte 0xb5"),
             (text.replace("Transform: Affine", "Transform: Aff\u00eene"),
              r"line 4 \(not a comment\) holds the byte 0xee"),
             (saved.read_text(encoding="latin-1").replace('"rigid"', '"r\u00eegid"'),
              r"line 2 \(tireg's '#tireg:' record, which it writes in UTF-8\) holds the byte 0xee")]
    for bad, message in cases:
        path.write_bytes(bad.encode("latin-1"))
        with pytest.raises(ValueError, match=r"^load_transform\(\): .*latin\.tfm' is not a UTF-8 text file: "
                                             + message + "; only comment lines may hold text in another encoding$"):
            load_transform(path)
    # a JSON document stays UTF-8 throughout
    document = tmp_path / "t.json"
    document.write_bytes(json.dumps({"format": "tireg-transform", "version": 1, "matrix": np.eye(3).tolist(),
                                     "metadata": {"by": "M\u00fcller"}}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"^load_transform\(\): .*t\.json' is not a UTF-8 text file$"):
        load_transform(document)


def _document(**changes) -> str:
    document = {"format": "tireg-transform", "version": 1, "matrix": np.eye(3).tolist()}
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not ...})


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", r"is not valid JSON: .*line 1 column 2"),
        ("[1, 2]", r"is not a tireg transform document"),
        (_document(format="other"), r"is not a tireg transform document"),
        (_document(version=2), r"has version 2; this tireg reads version 1"),
        (_document(matrix=...), r"has no \"matrix\""),
        (_document(matrix=[[1, 0], [0, 1, 0]]), r"\"matrix\" must be a 3 x 3 list of numbers"),
        (_document(matrix=[[1, 0], [0, 1]]), r"\"matrix\" must have shape \(3, 3\) or \(B, 3, 3\)"),
        (_document(matrix=[[1, 0, 0], [0, 1, 0], [0, 0, 2]]), r"\"matrix\" must be affine"),
        (_document(transform=1), r"\"transform\" must be a string or null"),
        (_document(parameters=[1]), r"\"parameters\" must be an object"),
        (_document(metadata="x"), r"\"metadata\" must be an object"),
        (_document(center=[1, 2, 3]), r"\"center\" must be finite with shape \(2,\); got \[1\.0, 2\.0, 3\.0\]"),
        (_document(center="c"), r"\"center\" must be"),
        (_document(fixed_geometry={"spacing": [-1, 1]}),
         r"'fixed_geometry': ImageGeometry\(\): 'spacing' must be positive"),
        # these were taken: strings and booleans as numbers, a version of true or 1.0, [] / "" / 0 as {}
        (_document(matrix=[["1", "0", "0"], ["0", "1", "0"], ["0", "0", "1"]]),
         r"\"matrix\" must be a 3 x 3 list of numbers .*; got \[\[\"1\""),
        (_document(matrix=np.eye(3, dtype=bool).tolist()), r"\"matrix\" must be a 3 x 3 list of numbers"),
        # a boolean among numbers: NumPy made the list integers, true read 1.0
        (_document(matrix=[[True, 0, 0], [0, 1, 0], [0, 0, 1]]), r"\"matrix\" must be a 3 x 3 list of numbers"),
        (_document(matrix=[[1.0, 0.0, 0.0], [0.0, True, 0.0], [0.0, 0.0, 1.0]]),
         r"\"matrix\" must be a 3 x 3 list of numbers"),
        (_document(center=["1", "2"]), r"\"center\" must be \[cx, cy\] \(or one per matrix\); got \[\"1\", \"2\"\]"),
        (_document(version=True), r"has version True; this tireg reads version 1"),
        (_document(version=1.0), r"has version 1.0; this tireg reads version 1"),
        (_document(parameters=[]), r"\"parameters\" must be an object; got \[\]"),
        (_document(parameters=0), r"\"parameters\" must be an object; got 0"),
        (_document(metadata=""), r"\"metadata\" must be an object; got ''"),
        (_document(parameters={"angle": "abc"}), r"'parameters\['angle'\]' must be a tensor, an array or nested"),
        # NaN and Infinity are no JSON, though Python's reader takes them
        (_document(parameters={"angle": math.nan}), r"is not valid JSON: NaN is not a JSON number"),
        (_document(metadata={"x": math.inf}), r"is not valid JSON: Infinity is not a JSON number"),
        # these came from deep inside: OverflowError, json's digit limit, RecursionError
        (_document(matrix=...)[:-1] + ', "matrix": [[1%s, 0, 0], [0, 1, 0], [0, 0, 1]]}' % ("0" * 400),
         r"\"matrix\" must be a 3 x 3 list of numbers"),
        (_document(matrix=...)[:-1] + ', "matrix": [[1%s, 0, 0], [0, 1, 0], [0, 0, 1]]}' % ("0" * 5000),
         r"is not valid JSON: Exceeds the limit \(4300 digits\)"),
        (_document()[:-1] + ', "metadata": {"x": %s}}' % ("[" * 100000 + "]" * 100000), r"is not valid JSON: nested"),
    ],
)
def test_load_json_errors(tmp_path, text, match):
    path = write(tmp_path / "t.json", text)
    with pytest.raises(ValueError, match=r"^load_transform\(\): '.*t\.json'.*" + match):
        load_transform(path)


AFFINE = "Transform: AffineTransform_double_2_2\nParameters: 1 0 0 1 0 0\nFixedParameters: 0 0\n"


@pytest.mark.parametrize(
    "text, match",
    [
        ("#Insight Transform File V1.0\n", r"is not an ITK transform file: it has no 'Transform:' line"),
        ("(Transform \"AffineTransform\")\n", r"line 1: looks like an elastix parameter file"),
        (HEADER + "Transform AffineTransform_double_2_2\n", r"line 3: expected 'Name: values'"),
        (HEADER + AFFINE + "Foo: 1\n", r"line 6: unknown entry 'Foo'"),
        ("Parameters: 1 2\n" + AFFINE, r"line 1: 'Parameters:' before any 'Transform:' line"),
        (HEADER + AFFINE + "Parameters: 1 0 0 1 0 0\n", r"line 6: a second 'Parameters:' line"),
        (HEADER + AFFINE.replace("1 0 0 1 0 0", "1 0 0 1 0 zero"), r"line 4: expected numbers; got '1 0 0 1 0 zero'"),
        (HEADER + AFFINE.replace("1 0 0 1 0 0", "1 0 0 1 0 nan"), r"line 4: NaN or Inf"),
        (HEADER + "Transform:\n", r"line 3: 'Transform:' names no type"),
        (HEADER + "Transform: Affine\nParameters: 1\nFixedParameters: 1\n",
         r"line 3: malformed transform type 'Affine'"),
        (HEADER + "Transform: Euler3DTransform_double_3_3\nParameters: 0 0 0 0 0 0\nFixedParameters: 0 0 0 0\n",
         r"line 3: 'Euler3DTransform_double_3_3' is a 3-D -> 3-D transform; tireg reads 2-D"),
        (HEADER + "Transform: BSplineTransform_double_2_2\nParameters: 1\nFixedParameters: 1\n",
         r"line 3: unsupported transform type 'BSplineTransform_double_2_2'; tireg reads AffineTransform, "),
        (HEADER + AFFINE.replace("1 0 0 1 0 0", "1 0 0 1 0"),
         r"line 3 \(AffineTransform_double_2_2\): expected 6 parameters; got 5"),
        (HEADER + AFFINE.replace("FixedParameters: 0 0", "FixedParameters: 0"),
         r"line 3 \(AffineTransform_double_2_2\): expected 2 fixed parameters; got 1"),
        (HEADER + AFFINE.replace("FixedParameters: 0 0\n", ""),
         r"line 3 \(AffineTransform_double_2_2\): no 'FixedParameters:' line"),
        (HEADER + "Transform: IdentityTransform_double_2_2\nFixedParameters:\n", r"line 3 .*no 'Parameters:' line"),
        (HEADER + "Transform: TranslationTransform_double_2_2\nParameters: 1 2\nFixedParameters: 0 0\n",
         r"expected 0 fixed parameters; got 2"),
        (HEADER + AFFINE + "#Transform 1\n" + AFFINE,
         r"holds 2 transforms without a CompositeTransform header \(line 7\); .*SimpleITK uses only the first"),
        (HEADER + "Transform: CompositeTransform_double_2_2\n" + AFFINE + "Transform: CompositeTransform_double_2_2\n",
         r"line 7: a CompositeTransform can only be the first transform"),
        (HEADER + "Transform: CompositeTransform_double_2_2\nParameters: 1\n" + AFFINE,
         r"line 3: a CompositeTransform has no parameters of its own"),
    ],
)
def test_load_itk_errors(tmp_path, text, match):
    path = write(tmp_path / "t.tfm", text)
    with pytest.raises(ValueError, match=r"^load_transform\(\): '.*t\.tfm'.*" + match):
        load_transform(path)


@pytest.mark.parametrize("token", ["1_0", "\u0661\u0660", "\uff11\uff10", "1\u00a00", "0x1p3", "1e", "--1", "1.2.3"])
def test_load_itk_refuses_numbers_only_python_reads(tmp_path, token):
    # Python's float() read "1_0" as 10, Arabic-Indic and full-width digits as digits and split on
    # non-ASCII spaces: ITK and SimpleITK read such a file otherwise, or not at all
    path = tmp_path / "t.tfm"
    path.write_text(HEADER + AFFINE.replace("1 0 0 1 0 0", f"1 0 0 1 {token} 2"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"^load_transform\(\): '.*t\.tfm', line 4: expected numbers; got '1 0 0 1 "
                                         r".*is not a decimal number"):
        load_transform(path)


@pytest.mark.parametrize("token", ["infinity", "-Infinity", "inf", "NaN", "1e999"])
def test_load_itk_names_nan_and_inf(tmp_path, token):
    path = write(tmp_path / "t.tfm", HEADER + AFFINE.replace("1 0 0 1 0 0", f"1 0 0 1 {token} 2"))
    with pytest.raises(ValueError, match=r"^load_transform\(\): '.*t\.tfm', line 4: NaN or Inf in"):
        load_transform(path)


@pytest.mark.parametrize("tokens, tx", [("1 0 0 1 +10 2", 10.0), ("1. 0 0 1 .5e1 2", 5.0), ("1 0 0 1 -2.5E-1 2", -0.25),
                                        ("  1\t0 0 1 1e2   2\r", 100.0)])
def test_load_itk_reads_plain_decimal_numbers(tmp_path, tokens, tx):
    path = write(tmp_path / "t.tfm", HEADER + AFFINE.replace("1 0 0 1 0 0", tokens))
    assert float(load_transform(path).matrix[0, 2]) == tx


def test_load_geometry_argument_errors(tmp_path):
    path = save_transform(tmp_path / "t.tfm", torch.eye(3))
    match = r"load_transform\(\): 'moving_geometry': ImageGeometry\(\): 'spacing' must be positive"
    with pytest.raises(ValueError, match=match):
        load_transform(path, moving_geometry={"spacing": (1.0, -1.0)})


def test_the_warnings_of_saving_and_loading_name_the_callers_line(tmp_path):
    """A singular matrix saved, and a file read with other geometries than it was saved with: each
    warning points at the call in the user's code, not at a line inside tireg."""
    singular = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [0.0, 0.0, 1.0]])
    for name in ("s.tfm", "s.json"):
        with pytest.warns(UserWarning, match="singular") as caught:
            save_transform(tmp_path / name, singular)
        assert [record.filename for record in caught] == [__file__], name
    save_transform(tmp_path / "g.tfm", np.eye(3), fixed_geometry=ImageGeometry(spacing=(0.5, 0.5)))
    with pytest.warns(UserWarning, match="was saved with fixed_geometry") as caught:
        load_transform(tmp_path / "g.tfm", fixed_geometry=ImageGeometry(spacing=(2.0, 2.0)))
    assert [record.filename for record in caught] == [__file__]


def test_strict_numbers_still_take_what_they_took(tmp_path):
    """Integers beyond int64 (10**30 went through NumPy's object arrays and was called 'not real
    numbers'), float16 arrays and tensors that require grad are numbers."""
    matrix = [[10 ** 30, 0, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.warns(UserWarning, match="singular"):
        path = save_transform(tmp_path / "big.json", matrix)
    assert load_transform(path).matrix[0, 0] == 1e30
    geometry = ImageGeometry(spacing=np.array([2, 3], dtype=np.float16), direction=torch.eye(2, requires_grad=True))
    assert geometry.spacing == (2.0, 3.0) and geometry.direction == ((1.0, 0.0), (0.0, 1.0))
    with pytest.raises(TypeError, match=r"^ImageGeometry.from_sitk\(\): expected a SimpleITK image; got ndarray"):
        ImageGeometry.from_sitk(np.zeros((3, 3)))  # was an AttributeError


def test_a_conversion_that_overflows_is_refused_and_leaves_the_file(tmp_path):
    """A matrix that overflowed in physical units was written as 'Parameters: inf nan ...' over a
    good file; read with such a geometry, a file gave a NaN matrix with only NumPy warnings."""
    path = save_transform(tmp_path / "t.tfm", torch.eye(3))
    before = path.read_text()
    with pytest.raises(ValueError, match=r"^save_transform\(\): the matrix in physical units .* beyond float64's "
                                         r"range; nothing was written"):
        save_transform(path, [[1e308, 0, 0], [0, 1e308, 0], [0, 0, 1]], moving_geometry={"spacing": (10, 10)})
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.tfm"]
    large = save_transform(tmp_path / "large.tfm", [[1e300, 0, 0], [0, 1e300, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"^load_transform\(\): '.*large.tfm': the transform in pixel units .* "
                                         r"beyond float64's range"):
        load_transform(large, moving_geometry={"spacing": (1e-300, 1.0)})


def test_an_itk_file_that_overflows_is_refused_by_name_without_numpy_warnings(tmp_path):
    """NumPy's "overflow encountered in matmul" warnings came first, and the error blamed "the geometries'
    spacing and origin" where no geometry was given."""
    large = "Transform: AffineTransform_double_2_2\nParameters: 1e200 0 0 1e200 0 0\nFixedParameters: 0 0\n"
    cases = [
        (HEADER + "Transform: AffineTransform_double_2_2\nParameters: 1e308 0 0 1e308 1e308 -3\n"
                  "FixedParameters: 10 20\n",
         r", line 3 \(AffineTransform_double_2_2\): its offset in physical units, c \+ t - L c, is beyond float64's "
         r"range$"),
        (HEADER + "Transform: CompositeTransform_double_2_2\n" + large + large,
         r": the product of its 2 transforms \(a CompositeTransform\) is beyond float64's range$"),
    ]
    for text, match in cases:
        path = write(tmp_path / "t.tfm", text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"^load_transform\(\): '.*t\.tfm'" + match):
                load_transform(path)
    path = write(tmp_path / "t.tfm", HEADER + large)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"t\.tfm': the transform in pixel units \(the spacing and origin of "
                                             r"moving_geometry applied\) is beyond float64's range$"):
            load_transform(path, moving_geometry={"spacing": (1e-200, 1.0)})
    path = save_transform(tmp_path / "saved.tfm", [[1e150, 0, 0], [0, 1e150, 0], [0, 0, 1]],
                          fixed_geometry={"spacing": (1e150, 1.0)}, moving_geometry={"spacing": (1e150, 1.0)})
    with pytest.raises(ValueError, match=r"\(the spacing and origin of fixed_geometry \(recorded in the file\) and "
                                         r"moving_geometry applied\)"):
        load_transform(path, moving_geometry={"spacing": (1e-150, 1.0)})


def test_itk_round_trip_is_bit_identical_with_a_centre_and_geometry(tmp_path):
    """The pixel matrix through physical units and back differed in the last bits (up to 5e-14); the
    comment's record is returned while it still describes the file."""
    generator = np.random.default_rng(5)
    geometry = {"spacing": (0.3, 0.7), "origin": (-4.1, 2.9), "direction": ((0.6, -0.8), (0.8, 0.6))}
    for index in range(20):
        matrix = np.eye(3)
        matrix[:2] += generator.normal(size=(2, 3)) * (0.2, 0.2, 9.0)
        center = generator.normal(size=2) * 30
        path = save_transform(tmp_path / f"t{index}.tfm", matrix, center=center, fixed_geometry=geometry,
                              moving_geometry=geometry)
        loaded = load_transform(path, fixed_geometry=geometry, moving_geometry=geometry)
        assert np.array_equal(loaded.matrix.numpy(), matrix) and np.array_equal(loaded.center.numpy(), center)
    # read without geometries: the recorded ones, and the record (as a JSON document)
    assert np.array_equal(load_transform(path).matrix.numpy(), matrix)
    with pytest.warns(UserWarning, match=r"is read with ImageGeometry\(spacing=\(1.0, 1.0\)"):  # another geometry:
        other = load_transform(path, fixed_geometry=ImageGeometry())  # the ITK lines' matrix, converted
    assert not np.allclose(other.matrix.numpy(), matrix)
    # no centre recorded: ITK's (0, 0) as read, and the kind still restored
    plain = load_transform(save_transform(tmp_path / "plain.tfm", matrix, transform="affine", parameters={"p": 1.0}))
    assert np.array_equal(plain.matrix.numpy(), matrix) and plain.transform == "affine"
    assert plain.parameters == {"p": 1.0} and plain.center.tolist() == [0.0, 0.0]


def test_tfm_record_survives_round_off_at_a_large_origin_but_not_an_edit(tmp_path):
    # At an origin of 1e9 the round trip through physical units is off by a few 1e-7 px, above the
    # fixed 1e-7 tolerance: the record (kind, parameters, exact matrix) had been dropped for 164 of 300.
    geometry = ImageGeometry(origin=(1e9, 1e9))
    rng = np.random.default_rng(2)
    path = tmp_path / "far.tfm"
    for _ in range(40):
        matrix = np.eye(3)
        matrix[:2] = rng.normal(size=(2, 3)) * [[1, 1, 50], [1, 1, 50]]
        center = rng.normal(size=2) * 100
        save_transform(path, matrix, transform="affine", center=center, fixed_geometry=geometry,
                       moving_geometry=geometry)
        loaded = load_transform(path)
        assert loaded.transform == "affine"
        assert np.array_equal(loaded.matrix.numpy(), matrix) and np.array_equal(loaded.center.numpy(), center)
    # a hand edit of a thousandth of a unit, a translation of 1e9, still invalidates the record
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("Parameters:"))
    values = [float(token) for token in lines[index].split()[1:]]
    values[4] += 1e-3
    lines[index] = "Parameters: " + " ".join(map(repr, values))
    edited = load_transform(write(tmp_path / "edited.tfm", "\n".join(lines) + "\n"))
    assert edited.transform == "AffineTransform_double_2_2"
    assert not np.array_equal(edited.matrix.numpy(), matrix)


def test_damaged_comment_only_loses_the_provenance(tmp_path):
    path = save_transform(tmp_path / "t.tfm", torch.eye(3), transform="rigid", parameters={"angle": 0.0})
    text = path.read_text()
    for damage in ('{"matrix": [[1%s, 0, 0]]}' % ("0" * 5000), '{"metadata": %s}' % ("[" * 100000 + "]" * 100000),
                   '{"matrix": [[1e999, 0, 0], [0, 1, 0], [0, 0, 1]], "transform": "x"}'):
        damaged = write(tmp_path / "d.tfm", "\n".join(
            "#tireg: " + damage if line.startswith("#tireg:") else line for line in text.splitlines()))
        loaded = load_transform(damaged)
        assert torch.equal(loaded.matrix, torch.eye(3, dtype=torch.float64))
        assert loaded.transform == "AffineTransform_double_2_2" and loaded.parameters == {}


def test_metadata_that_json_cannot_write_is_named(tmp_path):
    looped: dict = {}
    looped["self"] = looped
    cases = [
        (looped, ValueError, r"'metadata' is nested too deeply, or contains itself"),
        ({"n": 10 ** 5000}, ValueError, r"'metadata'\['n'\] is an integer of more than 4300 digits"),
        ({"t": torch.zeros(2, device="meta")}, TypeError, r"'metadata'\['t'\] is a meta tensor"),
    ]
    for metadata, error, match in cases:
        with pytest.raises(error, match=r"^save_transform\(\): " + match):
            save_transform(tmp_path / "m.json", torch.eye(3), metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_a_tfm_saved_with_geometries_reads_back_with_them_and_warns_for_others(tmp_path):
    """Its ITK lines are in physical units: read without the geometries it was saved with, it gave
    another pixel matrix (3 px off on an audit's case), then a warning that `tireg apply` could not
    act on. Read without geometries it takes those it records, as a JSON document; read with other
    geometries it warns."""
    import warnings

    from tireg.transform_io import ImageGeometry, load_transform, save_transform

    matrix = np.eye(3)
    matrix[0, 1], matrix[0, 2] = 0.05, 3.0
    geometry = ImageGeometry(spacing=(0.5, 0.5), origin=(10.0, -3.0))
    save_transform(tmp_path / "g.tfm", matrix, fixed_geometry=geometry, moving_geometry=geometry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorded = load_transform(tmp_path / "g.tfm")
        again = load_transform(tmp_path / "g.tfm", fixed_geometry=geometry, moving_geometry=geometry)
        save_transform(tmp_path / "p.tfm", matrix)
        plain = load_transform(tmp_path / "p.tfm")
    for loaded in (recorded, again, plain):
        np.testing.assert_allclose(loaded.matrix.numpy(), matrix, rtol=0, atol=1e-12)
    assert recorded.fixed_geometry == geometry and recorded.moving_geometry == geometry
    with pytest.warns(UserWarning, match=r"was saved with fixed_geometry ImageGeometry\(spacing=\(0.5, 0.5\).*but is "
                                         r"read with ImageGeometry\(spacing=\(1.0, 1.0\)"):
        other = load_transform(tmp_path / "g.tfm", fixed_geometry=ImageGeometry())
    assert not np.allclose(other.matrix.numpy(), matrix)


def test_a_binary_transform_suffix_gets_a_hint_for_reading_or_for_writing(tmp_path):
    """Writing one was told to 'convert it to text first', the reading hint."""
    (tmp_path / "t.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"load_transform\(\): unsupported file suffix '\.h5'.*\(convert it to text "
                                         r"first, e.g. sitk.WriteTransform"):
        load_transform(tmp_path / "t.h5")
    with pytest.raises(ValueError, match=r"save_transform\(\): unsupported file suffix '\.h5'.*\(tireg writes text "
                                         r"transforms; SimpleITK converts one"):
        save_transform(tmp_path / "out.h5", torch.eye(3))


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_a_transform_file_keeps_its_own_copies_of_the_callers_matrix_and_centre(kind):
    """They were kept by reference: a later in-place change of the caller's tensor changed the file."""
    matrix, center = torch.eye(3, dtype=torch.float64, requires_grad=True), torch.tensor([4.0, 5.0])
    if kind == "array":
        matrix, center = matrix.detach().numpy().copy(), center.numpy().copy()
    stored = TransformFile(matrix, center=center)
    with torch.no_grad():
        matrix[0, 2] = 7.0
        center[0] = -1.0
    assert float(stored.matrix[0, 2]) == 0.0 and float(stored.center[0]) == 4.0
    assert type(stored.matrix) is type(matrix) and (kind == "array" or not stored.matrix.requires_grad)


def test_save_and_load_name_a_path_that_is_none():
    """save_transform(None, m) and load_transform(None) raised os.fspath's "expected str, bytes or
    os.PathLike object, not NoneType", naming neither the function nor the argument."""
    with pytest.raises(TypeError, match=r"^save_transform\(\): 'path' must be a str or os.PathLike; got NoneType$"):
        save_transform(None, torch.eye(3))
    with pytest.raises(TypeError, match=r"^load_transform\(\): 'path' must be a str or os.PathLike; got int$"):
        load_transform(3)


def test_save_transform_refuses_an_overwrite_flag_that_is_not_one(tmp_path):
    # overwrite='no' is truthy: the file was replaced without a word
    path = tmp_path / "t.json"
    save_transform(path, np.eye(3))
    for flag in ("no", None, 2):
        with pytest.raises(TypeError, match=r"save_transform\(\): 'overwrite'"):
            save_transform(path, np.diag([2.0, 1.0, 1.0]), overwrite=flag)
    assert torch.equal(load_transform(path).matrix, torch.eye(3, dtype=torch.float64))
