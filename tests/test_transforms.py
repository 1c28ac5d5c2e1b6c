"""Transform builders: identity, Jacobians (autograd and finite differences), batching,
dtype/device, known geometry (OpenCV's rotation sign), normalisation and input checks."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

from tireg.transforms import (
    TRANSFORMS,
    affine_matrix,
    anisotropic_similarity_matrix,
    get_transform,
    image_center,
    normalization_matrix,
    pixel_to_normalized,
    rigid_matrix,
    similarity_matrix,
    translation_matrix,
)

NAMES = list(TRANSFORMS)
BATCH = 3


def random_params(transform, generator, batch=BATCH, dtype=torch.float64):
    """Random parameters near the identity (scales stay positive), ``(batch, P)``."""
    identity = torch.tensor(transform.identity, dtype=dtype)
    noise = torch.rand(batch, transform.num_parameters, generator=generator, dtype=dtype) * 2 - 1
    # angles and linear parts +-0.5, translations +-5 pixels
    spread = torch.tensor(
        [5.0 if name in ("tx", "ty") else 0.5 for name in transform.parameter_names], dtype=dtype
    )
    return identity + noise * spread


def random_center(generator, shape=(2,), dtype=torch.float64):
    return torch.rand(*shape, generator=generator, dtype=dtype) * 40.0 - 5.0


def homogeneous(point, dtype=torch.float64):
    return torch.tensor([point[0], point[1], 1.0], dtype=dtype)


# ----------------------------------------------------------------------------
# registry


def test_registry_lists_the_five_kinds():
    assert set(NAMES) == {"translation", "rigid", "similarity", "anisotropic_similarity", "affine"}
    for name, transform in TRANSFORMS.items():
        assert transform.name == name
        assert transform.num_parameters == len(transform.identity) == len(transform.parameter_names)


@pytest.mark.parametrize("name", NAMES)
def test_get_transform_returns_the_registered_kind(name):
    assert get_transform(name) is TRANSFORMS[name]


@pytest.mark.parametrize("bad", ["nope", "Rigid", "", ["rigid"]])
def test_get_transform_unknown_name_lists_the_known_names(bad):
    with pytest.raises(ValueError, match="unknown transform") as info:
        get_transform(bad)
    for name in NAMES:
        assert repr(name) in str(info.value)


# ----------------------------------------------------------------------------
# identity


@pytest.mark.parametrize("name", NAMES)
def test_identity_parameters_give_identity_matrix(name, generator):
    transform = TRANSFORMS[name]
    params = torch.tensor(transform.identity, dtype=torch.float64)
    for center in (image_center(37, 53), random_center(generator)):
        matrix = transform.matrix(params, center)
        torch.testing.assert_close(matrix, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # batched identity, batched centre
    batched = params.expand(BATCH, -1)
    centers = random_center(generator, (BATCH, 2))
    torch.testing.assert_close(
        transform.matrix(batched, centers), torch.eye(3, dtype=torch.float64).expand(BATCH, 3, 3), rtol=0, atol=1e-12
    )


# ----------------------------------------------------------------------------
# Jacobians


def _autograd_jacobian(transform, params, center):
    """``dA/dp`` as ``(B, P, 3, 3)`` from ``torch.autograd.functional.jacobian``."""
    full = torch.autograd.functional.jacobian(lambda p: transform.matrix(p, center), params)  # (B, 3, 3, B, P)
    batch = params.shape[0]
    # Row b of A depends on row b of the params only.
    off_diagonal = full.clone()
    for b in range(batch):
        off_diagonal[b, :, :, b, :] = 0
    assert torch.count_nonzero(off_diagonal) == 0
    return torch.stack([full[b, :, :, b, :] for b in range(batch)]).permute(0, 3, 1, 2)


def _finite_difference_jacobian(transform, params, center, step=1e-5):
    columns = []
    for k in range(params.shape[-1]):
        delta = torch.zeros_like(params)
        delta[..., k] = step
        difference = transform.matrix(params + delta, center) - transform.matrix(params - delta, center)
        columns.append(difference / (2 * step))
    return torch.stack(columns, dim=-3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("center_shape", [(2,), (BATCH, 2)], ids=["shared-centre", "batched-centre"])
def test_jacobian_matches_autograd(name, center_shape, generator):
    transform = TRANSFORMS[name]
    params = random_params(transform, generator)
    center = random_center(generator, center_shape)
    analytic = transform.jacobian(params, center)
    assert analytic.shape == (BATCH, transform.num_parameters, 3, 3)
    expected = _autograd_jacobian(transform, params, center)
    torch.testing.assert_close(analytic, expected, rtol=1e-12, atol=1e-12)
    # derivatives of a transform have a zero last row
    assert torch.count_nonzero(analytic[..., 2, :]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_matches_central_finite_differences(name, generator):
    transform = TRANSFORMS[name]
    params = random_params(transform, generator)
    center = random_center(generator)
    analytic = transform.jacobian(params, center)
    numeric = _finite_difference_jacobian(transform, params, center)
    torch.testing.assert_close(analytic, numeric, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_is_not_zero_for_every_parameter(name, generator):
    """Guard against a vacuous comparison: each parameter moves the matrix."""
    transform = TRANSFORMS[name]
    jac = transform.jacobian(random_params(transform, generator), random_center(generator))
    assert (jac.abs().amax(dim=(-2, -1)) > 1e-3).all()


# ----------------------------------------------------------------------------
# batching, dtype, device, differentiability


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_one_by_one(name, generator):
    transform = TRANSFORMS[name]
    params = random_params(transform, generator)
    centers = random_center(generator, (BATCH, 2))
    shared = centers[0]
    batched_matrix = transform.matrix(params, centers)
    batched_jacobian = transform.jacobian(params, centers)
    shared_matrix = transform.matrix(params, shared)
    shared_jacobian = transform.jacobian(params, shared)
    assert batched_matrix.shape == (BATCH, 3, 3)
    for b in range(BATCH):
        torch.testing.assert_close(batched_matrix[b], transform.matrix(params[b], centers[b]), rtol=0, atol=1e-13)
        torch.testing.assert_close(batched_jacobian[b], transform.jacobian(params[b], centers[b]), rtol=0, atol=1e-13)
        torch.testing.assert_close(shared_matrix[b], transform.matrix(params[b], shared), rtol=0, atol=1e-13)
        torch.testing.assert_close(shared_jacobian[b], transform.jacobian(params[b], shared), rtol=0, atol=1e-13)
    # an unbatched call returns a single matrix
    assert transform.matrix(params[0], shared).shape == (3, 3)
    assert transform.jacobian(params[0], shared).shape == (transform.num_parameters, 3, 3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_params(name, dtype, device, generator):
    transform = TRANSFORMS[name]
    reference = random_params(transform, generator)
    params = reference.to(dtype=dtype, device=device)
    center = (12.5, 7.0)  # a plain sequence takes the params' dtype and device
    matrix = transform.matrix(params, center)
    jacobian = transform.jacobian(params, center)
    for out in (matrix, jacobian):
        assert out.dtype == dtype
        assert out.device.type == torch.device(device).type
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        matrix.cpu().double(), transform.matrix(reference, center), rtol=tolerance, atol=tolerance
    )
    torch.testing.assert_close(
        jacobian.cpu().double(), transform.jacobian(reference, center), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("name", NAMES)
def test_matrix_is_differentiable_gradcheck(name, generator):
    transform = TRANSFORMS[name]
    params = random_params(transform, generator, batch=2).requires_grad_(True)
    center = random_center(generator)
    assert torch.autograd.gradcheck(lambda p: transform.matrix(p, center), (params,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "translation"])
def test_matrix_is_differentiable_in_the_centre(name, generator):
    transform = TRANSFORMS[name]
    params = random_params(transform, generator, batch=2)
    center = random_center(generator, (2, 2)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: transform.matrix(params, c), (center,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# known geometry


@pytest.mark.parametrize("name", NAMES)
def test_linear_kinds_are_their_parts(name, generator):
    """``Transform.linear`` is set exactly where ``A(p) = A(0) + sum_k p_k dA/dp_k`` holds (register
    builds those kinds' matrices from the two parts)."""
    kind = TRANSFORMS[name]
    params, center = random_params(kind, generator), random_center(generator)
    zeros = torch.zeros(1, kind.num_parameters, dtype=torch.float64)
    offset, jacobian = kind.matrix(zeros, center), kind.jacobian(zeros, center)
    from_parts = offset + (params[:, :, None, None] * jacobian).sum(1)
    holds = torch.allclose(from_parts, kind.matrix(params, center), atol=1e-12) and torch.allclose(
        kind.jacobian(params, center), jacobian.expand(BATCH, -1, -1, -1), atol=1e-12)
    assert holds == kind.linear
    assert kind.linear == (name in ("translation", "affine"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_shape", [(), (1,), (3,)])
def test_results_are_the_callers_own_tensors(name, batch_shape, generator):
    """Matrices and Jacobians are built partly from kept constant tensors: changing a result in
    place must not change the next call's."""
    kind = TRANSFORMS[name]
    params = random_params(kind, generator)[0].expand(*batch_shape, -1).clone()
    center = random_center(generator)
    first_matrix, first_jacobian = kind.matrix(params, center), kind.jacobian(params, center)
    expected_matrix, expected_jacobian = first_matrix.clone(), first_jacobian.clone()
    first_matrix.fill_(7.0)
    first_jacobian.fill_(7.0)
    torch.testing.assert_close(kind.matrix(params, center), expected_matrix, rtol=0, atol=0)
    torch.testing.assert_close(kind.jacobian(params, center), expected_jacobian, rtol=0, atol=0)


def test_translation_matrix_is_a_pure_shift():
    matrix = translation_matrix(torch.tensor([3.0, -2.0], dtype=torch.float64))
    expected = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(matrix, expected, rtol=0, atol=0)


def test_rigid_quarter_turn_maps_centre_to_centre_plus_shift():
    center = torch.tensor([10.0, 4.0], dtype=torch.float64)
    shift = torch.tensor([1.5, -3.0], dtype=torch.float64)
    params = torch.tensor([math.pi / 2, shift[0], shift[1]], dtype=torch.float64)
    matrix = rigid_matrix(params, center)
    image_of_center = matrix @ homogeneous(center)
    torch.testing.assert_close(image_of_center[:2], center + shift, rtol=0, atol=1e-12)
    # OpenCV's sign: R(pi/2) = [[0, 1], [-1, 0]], so c + (1, 0) goes to c + (0, -1) + t
    # and c + (0, 1) goes to c + (1, 0) + t.
    torch.testing.assert_close(
        (matrix @ homogeneous(center + torch.tensor([1.0, 0.0], dtype=torch.float64)))[:2],
        center + shift + torch.tensor([0.0, -1.0], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        (matrix @ homogeneous(center + torch.tensor([0.0, 1.0], dtype=torch.float64)))[:2],
        center + shift + torch.tensor([1.0, 0.0], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("angle, scale", [(0.3, 1.0), (-1.1, 0.7), (2.5, 1.8)])
def test_similarity_equals_opencv_get_rotation_matrix_2d(angle, scale):
    cx, cy = 17.0, 9.5
    a, b = scale * math.cos(angle), scale * math.sin(angle)
    opencv = torch.tensor(
        [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
    params = torch.tensor([angle, scale, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(similarity_matrix(params, (cx, cy)), opencv, rtol=0, atol=1e-12)
    # and with a shift, only the last column moves, by t
    shifted = similarity_matrix(torch.tensor([angle, scale, 2.0, -4.0], dtype=torch.float64), (cx, cy))
    opencv[:2, 2] += torch.tensor([2.0, -4.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, opencv, rtol=0, atol=1e-12)


def test_rigid_equals_similarity_with_unit_scale(generator):
    params = random_params(TRANSFORMS["rigid"], generator)
    center = random_center(generator)
    similarity_params = torch.cat([params[:, :1], torch.ones(BATCH, 1, dtype=torch.float64), params[:, 1:]], dim=1)
    torch.testing.assert_close(rigid_matrix(params, center), similarity_matrix(similarity_params, center))


def test_anisotropic_similarity_with_equal_scales_equals_similarity(generator):
    params = random_params(TRANSFORMS["similarity"], generator)
    center = random_center(generator)
    aniso = torch.cat([params[:, :2], params[:, 1:2], params[:, 2:]], dim=1)  # (theta, s, s, tx, ty)
    torch.testing.assert_close(
        anisotropic_similarity_matrix(aniso, center), similarity_matrix(params, center), rtol=0, atol=1e-12
    )


def test_anisotropic_similarity_scales_then_rotates():
    """``L = R(theta) diag(sx, sy)``: the columns of R scale, not its rows."""
    theta, sx, sy = 0.4, 1.5, 0.5
    matrix = anisotropic_similarity_matrix(torch.tensor([theta, sx, sy, 0.0, 0.0], dtype=torch.float64), (0.0, 0.0))
    c, s = math.cos(theta), math.sin(theta)
    expected = torch.tensor([[c * sx, s * sy], [-s * sx, c * sy]], dtype=torch.float64)
    torch.testing.assert_close(matrix[:2, :2], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(matrix[:2, 2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_affine_about_centre_maps_centre_to_centre_plus_shift(generator):
    params = random_params(TRANSFORMS["affine"], generator)
    center = random_center(generator)
    matrix = affine_matrix(params, center)
    image_of_center = matrix @ homogeneous(center)
    torch.testing.assert_close(image_of_center[:, :2], center + params[:, 4:6], rtol=0, atol=1e-12)
    # ITK's order: the linear part row by row
    torch.testing.assert_close(matrix[:, :2, :2], params[:, :4].reshape(BATCH, 2, 2), rtol=0, atol=0)
    torch.testing.assert_close(matrix[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(BATCH, 3))


# ----------------------------------------------------------------------------
# pixel <-> grid_sample coordinates


def test_image_center_is_middle_of_pixel_centres():
    assert image_center(5, 8) == (3.5, 2.0)


def test_normalization_matrix_maps_outer_pixel_edges_to_plus_minus_one():
    height, width = 5, 8
    norm = normalization_matrix((height, width), dtype=torch.float64)
    assert norm.shape == (3, 3)
    torch.testing.assert_close(
        norm @ homogeneous((-0.5, -0.5)), torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(
        norm @ homogeneous((width - 0.5, height - 0.5)),
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )
    # the first pixel centre is half a pixel inside: -1 + 1/W, -1 + 1/H
    torch.testing.assert_close(
        norm @ homogeneous((0.0, 0.0)),
        torch.tensor([-1 + 1 / width, -1 + 1 / height, 1.0], dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalization_matrix_dtype_and_device(dtype, device):
    norm = normalization_matrix((4, 6), dtype=dtype, device=device)
    assert norm.dtype == dtype
    assert norm.device.type == torch.device(device).type


def test_pixel_to_normalized_composes_with_the_moving_normalisation(generator):
    height, width = 7, 11  # moving image size
    params = random_params(TRANSFORMS["affine"], generator)
    matrix = affine_matrix(params, random_center(generator))
    theta = pixel_to_normalized(matrix, (height, width))
    assert theta.shape == (BATCH, 2, 3)
    points = torch.rand(BATCH, 3, 5, generator=generator, dtype=torch.float64) * 20 - 5
    points[:, 2] = 1.0
    moving = matrix @ points  # (B, 3, 5) moving pixels
    expected = torch.stack([(2 * moving[:, 0] + 1) / width - 1, (2 * moving[:, 1] + 1) / height - 1], dim=1)
    torch.testing.assert_close(theta @ points, expected, rtol=0, atol=1e-12)
    # dtype follows the matrix
    assert pixel_to_normalized(matrix.float(), (height, width)).dtype == torch.float32


# ----------------------------------------------------------------------------
# input checks


BUILDERS = [(name, kind) for name in NAMES for kind in ("matrix", "jacobian")]


def _builder(name, kind):
    return getattr(TRANSFORMS[name], kind)


def _expect(function, error, params):
    pattern = re.escape(function.__name__ + "()") + r".*'params'"
    with pytest.raises(error, match=pattern):
        function(params, (1.0, 2.0))


@pytest.mark.parametrize("name, kind", BUILDERS)
def test_wrong_parameter_count_is_rejected(name, kind):
    function = _builder(name, kind)
    count = TRANSFORMS[name].num_parameters
    _expect(function, ValueError, torch.zeros(2, count + 1, dtype=torch.float64))
    _expect(function, ValueError, torch.zeros(count - 1, dtype=torch.float64))
    _expect(function, ValueError, torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("name, kind", BUILDERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_parameters_are_rejected(name, kind, dtype):
    count = TRANSFORMS[name].num_parameters
    _expect(_builder(name, kind), TypeError, torch.ones(2, count, dtype=dtype))


@pytest.mark.parametrize("name, kind", BUILDERS)
def test_non_tensor_parameters_are_rejected(name, kind):
    identity = TRANSFORMS[name].identity
    _expect(_builder(name, kind), TypeError, list(identity))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_from_matrix_inverts_matrix(name):
    transform = TRANSFORMS[name]
    generator = torch.Generator().manual_seed(3)
    params = torch.tensor(transform.identity, dtype=torch.float64) + 0.1 * torch.randn(
        4, transform.num_parameters, generator=generator, dtype=torch.float64
    )
    center = torch.tensor([30.0, 20.0], dtype=torch.float64)
    recovered = transform.from_matrix(transform.matrix(params, center), center)
    assert torch.allclose(recovered, params, atol=1e-12)


def test_from_matrix_projects_onto_the_kind():
    """An affine matrix projected on rigid keeps where the centre goes and the closest rotation."""
    center = torch.tensor([30.0, 20.0], dtype=torch.float64)
    affine = TRANSFORMS["affine"].matrix(torch.tensor([1.1, 0.2, -0.2, 0.9, 3.0, -1.0], dtype=torch.float64), center)
    rigid = TRANSFORMS["rigid"].from_matrix(affine, center)
    assert torch.isclose(rigid[0], torch.atan2(torch.tensor(0.2, dtype=torch.float64), torch.tensor(1.0)).double())
    rebuilt = TRANSFORMS["rigid"].matrix(rigid, center)
    centre_h = torch.tensor([30.0, 20.0, 1.0], dtype=torch.float64)
    assert torch.allclose(rebuilt @ centre_h, affine @ centre_h)


def test_transform_functions_name_a_bad_centre_or_matrix():
    """These surfaced as broadcast, index or dtype errors inside torch."""
    from tireg import transforms

    params = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^rigid_matrix\(\): 'center' must be \(cx, cy\) or \(..., 2\) in pixels; "
                                         r"got shape \(3,\)"):
        transforms.rigid_matrix(params, (1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match=r"^rigid_jacobian\(\): 'center' must be \(cx, cy\) in pixels; got None"):
        transforms.rigid_jacobian(params, None)
    with pytest.raises(ValueError, match=r"^similarity_matrix\(\): 'center' \(3, 2\) does not broadcast with the "
                                         r"parameters \(2, 4\)"):
        transforms.similarity_matrix(torch.zeros(2, 4), torch.zeros(3, 2))  # torch's "size of tensor a (3)"
    assert transforms.similarity_jacobian(torch.zeros(2, 4), torch.zeros(1, 2)).shape == (2, 4, 3, 3)
    centres = torch.tensor([[10.0, 20.0]] * 4)  # one centre per matrix (the check first compared (4,) to (4, 3))
    matrices = transforms.rigid_matrix(torch.tensor([[0.1, 1.0, 2.0]] * 4), centres)
    assert torch.allclose(transforms.rigid_from_matrix(matrices, centres), torch.tensor([[0.1, 1.0, 2.0]] * 4))
    with pytest.raises(ValueError, match=r"'center' \(3, 2\) does not broadcast with the matrices \(4, 3, 3\)"):
        transforms.affine_from_matrix(matrices, centres[:3])
    with pytest.raises(ValueError, match=r"^similarity_from_matrix\(\): 'matrix' must have shape \(..., 3, 3\)"):
        transforms.similarity_from_matrix(torch.eye(2), (0.0, 0.0))
    with pytest.raises(TypeError, match=r"^affine_from_matrix\(\): 'matrix' must be a torch.Tensor; got ndarray"):
        transforms.affine_from_matrix(np.eye(3), (0.0, 0.0))
    with pytest.raises(ValueError, match=r"^normalization_matrix\(\): 'size' must be \(H, W\)"):
        transforms.normalization_matrix((0, 0))
    with pytest.raises(ValueError, match=r"^pixel_to_normalized\(\): 'moving_size' must be \(H, W\), two positive"):
        transforms.pixel_to_normalized(torch.eye(3), (0, 32))  # was a ZeroDivisionError


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("matrix_batch, center_batch, expected",
                         [((), (4,), (4,)), ((5, 1), (4,), (5, 4)), ((4,), (1,), (4,)), ((1,), (4,), (4,))])
def test_from_matrix_broadcasts_a_batched_centre_as_the_builders(name, matrix_batch, center_batch, expected):
    # a centre batched where the matrix was not: the angle (the matrix's batch shape) and the shift
    # (the matrix's and the centre's) were concatenated unbroadcast, "Tensors must have same number
    # of dimensions" from inside torch, where translation_from_matrix and the *_matrix builders broadcast
    kind = TRANSFORMS[name]
    generator = torch.Generator().manual_seed(5)
    params = torch.tensor(kind.identity, dtype=torch.float64) + 0.1 * torch.randn(
        *matrix_batch, kind.num_parameters, generator=generator, dtype=torch.float64)
    centers = random_center(generator, (*center_batch, 2))
    matrices = kind.matrix(params, centers[(0,) * len(center_batch)])  # one centre: the matrices' batch shape
    recovered = kind.from_matrix(matrices, centers)
    assert recovered.shape == (*expected, kind.num_parameters)
    torch.testing.assert_close(kind.matrix(recovered, centers), matrices.expand(*expected, 3, 3),
                               rtol=0.0, atol=1e-12)  # exact for a matrix of the kind, about any centre


@pytest.mark.parametrize("params_batch, center_batch, expected",
                         [((), (4,), (4,)), ((5, 1), (4,), (5, 4)), ((3,), (), (3,)), ((3,), (1,), (3,))])
def test_translation_broadcasts_the_centre_as_every_kind(params_batch, center_batch, expected):
    # translation_matrix((2,), centres (4, 2)) was one (3, 3) matrix where rigid_matrix gives (4, 3, 3):
    # the module's rule (parameters and centre broadcast) held for every kind but this one
    params = torch.arange(2.0, dtype=torch.float64).expand(*params_batch, 2)
    centers = torch.zeros(*center_batch, 2, dtype=torch.float64)
    matrices = translation_matrix(params, centers)
    assert matrices.shape == (*expected, 3, 3)
    assert (matrices == translation_matrix(params).expand(*expected, 3, 3)).all()
    rigid = TRANSFORMS["rigid"].matrix(torch.zeros(*params_batch, 3, dtype=torch.float64), centers)
    assert matrices.shape == rigid.shape
    jacobian = TRANSFORMS["translation"].jacobian(params, centers)
    assert jacobian.shape == (*expected, 2, 3, 3)
    with pytest.raises(ValueError, match=r"^translation_matrix\(\): 'center' \(3, 2\) does not broadcast with the "
                                         r"parameters \(2, 2\)"):
        translation_matrix(torch.zeros(2, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"^translation_jacobian\(\): 'center' must be \(cx, cy\)"):
        TRANSFORMS["translation"].jacobian(torch.zeros(2), (1.0, 2.0, 3.0))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_from_matrix_runs_under_vmap(name):
    """The affine check reads values (.item()), which vmap refuses: it is skipped there."""
    params = torch.tensor(TRANSFORMS[name].identity, dtype=torch.float64) + 0.05 * torch.arange(
        TRANSFORMS[name].num_parameters, dtype=torch.float64)
    matrices = TRANSFORMS[name].matrix(params.repeat(4, 1), (3.0, 4.0))
    batched = torch.func.vmap(lambda matrix: TRANSFORMS[name].from_matrix(matrix, (3.0, 4.0)))(matrices)
    torch.testing.assert_close(batched, TRANSFORMS[name].from_matrix(matrices, (3.0, 4.0)))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_from_matrix_refuses_a_projective_matrix(name):
    """The parameters describe the top two rows: a projective last row was dropped without a word."""
    homography = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    homography[1, 2, 0] = 1e-3
    with pytest.raises(ValueError, match=r"_from_matrix\(\): 'matrix' must be affine, with last row \(0, 0, 1\); "
                                         r"got \[0.001, 0.0, 1.0\]"):
        TRANSFORMS[name].from_matrix(homography, (3.0, 4.0))
    float32_inverse = torch.linalg.inv(TRANSFORMS[name].matrix(torch.tensor(TRANSFORMS[name].identity), (3.0, 4.0)))
    TRANSFORMS[name].from_matrix(float32_inverse, (3.0, 4.0))  # affine to rounding is affine


def _mirrored_anisotropic_params(count, generator, dtype=torch.float64):
    """``(count, 5)`` anisotropic similarities that mirror (``sx sy < 0``): any angle, scales of either
    sign from 0.2 to 3 in size, shifts of +-20 px; the first have ``sx = -sy`` (the closest rotation
    to them is undefined)."""
    angle = (torch.rand(count, generator=generator, dtype=dtype) * 2 - 1) * math.pi
    size = 0.2 + 2.8 * torch.rand(count, 2, generator=generator, dtype=dtype)
    size[: count // 4, 1] = size[: count // 4, 0]  # |sx| = |sy|: sx = -sy
    signs = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    scales = size * torch.stack([signs, -signs], -1)
    shift = (torch.rand(count, 2, generator=generator, dtype=dtype) * 2 - 1) * 20
    return torch.cat([angle[:, None], scales, shift], -1)


def test_anisotropic_similarity_from_matrix_recovers_mirrors_exactly():
    """A mirror of the kind (sx sy < 0) came back as another matrix: for sx = -sy the angle was
    atan2(0, 0) = 0, (0.4, -1, 1) -> (0, -0.92, 0.92), 39 px off."""
    kind = TRANSFORMS["anisotropic_similarity"]
    generator = torch.Generator().manual_seed(11)
    params = _mirrored_anisotropic_params(400, generator)
    params[0] = torch.tensor([0.4, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # the audit's case
    center = torch.tensor([100.0, 100.0], dtype=torch.float64)
    matrices = kind.matrix(params, center)
    recovered = kind.from_matrix(matrices, center)
    corners = torch.tensor([[0.0, 0.0, 1.0], [199.0, 0.0, 1.0], [0.0, 199.0, 1.0], [199.0, 199.0, 1.0]],
                           dtype=torch.float64)
    error = ((kind.matrix(recovered, center) - matrices) @ corners.T).abs().max().item()
    assert error < 1e-9  # px, at the corners of a 200 x 200 image (was 39 px)
    # the documented convention: sx > 0, sy < 0 for a mirror; the same matrix as (theta + pi, -sx, -sy)
    assert bool((recovered[:, 1] > 0).all()) and bool((recovered[:, 2] < 0).all())
    assert torch.allclose(recovered[:, 1:3].abs(), params[:, 1:3].abs(), rtol=1e-12, atol=0)
    torch.testing.assert_close(recovered[:, 3:], params[:, 3:], rtol=0, atol=1e-12)
    assert recovered[0, 0].item() == pytest.approx(0.4 - math.pi, abs=1e-14)
    # float32: exact to float32 rounding as well
    recovered32 = kind.from_matrix(matrices.float(), center.float())
    assert (kind.matrix(recovered32.double(), center) - matrices).abs().max().item() < 1e-4


def test_anisotropic_similarity_from_matrix_is_well_conditioned_near_a_mirror():
    """Near sx = -sy a 1e-4 perturbation of the matrix moved the recovered angle by radians (a 4 px
    error for (0.4, -1, 0.9)): the projection of a perturbed matrix now stays that close."""
    kind = TRANSFORMS["anisotropic_similarity"]
    center = torch.tensor([100.0, 100.0], dtype=torch.float64)
    noise = torch.zeros(3, 3, dtype=torch.float64)
    noise[0, 1] = 1e-4
    for p in ([0.4, -1.0, 1.0, 0.0, 0.0], [0.4, -1.0, 0.9, 0.0, 0.0], [-2.0, 0.5, -0.5, 3.0, 1.0]):
        matrix = kind.matrix(torch.tensor(p, dtype=torch.float64), center)
        projected = kind.matrix(kind.from_matrix(matrix + noise, center), center)
        assert (projected - matrix).abs().max().item() < 0.02  # px: the perturbation's size times the centre


def test_anisotropic_similarity_from_matrix_keeps_orientation_keeping_parameters():
    """Without a mirror the parameters are as before: both scales positive, the angle unchanged."""
    kind = TRANSFORMS["anisotropic_similarity"]
    generator = torch.Generator().manual_seed(12)
    params = _mirrored_anisotropic_params(100, generator)
    params[:, 1:3] = params[:, 1:3].abs()
    params[:, 0] = params[:, 0] / 2  # |theta| < pi / 2: the closest rotation's own angle
    center = torch.tensor([30.0, -7.0], dtype=torch.float64)
    torch.testing.assert_close(kind.from_matrix(kind.matrix(params, center), center), params, rtol=0, atol=1e-12)
    # both negative: the same matrix as (theta + pi, |sx|, |sy|)
    flipped = params.clone()
    flipped[:, 1:3] = -flipped[:, 1:3]
    recovered = kind.from_matrix(kind.matrix(flipped, center), center)
    torch.testing.assert_close(recovered[:, 1:], params[:, 1:], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.remainder(recovered[:, 0] - params[:, 0], 2 * math.pi),
                               torch.full_like(params[:, 0], math.pi), rtol=0, atol=1e-12)


def test_similarity_and_rigid_projections_of_a_reflection_are_documented():
    """A mirror has no similarity: the closest s R(theta) has s = (sigma_1 - sigma_2) / 2, and a pure
    reflection s R diag(1, -1) projects to s = 0, theta = 0 (as documented)."""
    center = torch.tensor([10.0, 20.0], dtype=torch.float64)
    reflection = TRANSFORMS["anisotropic_similarity"].matrix(
        torch.tensor([0.7, 1.5, -1.5, 2.0, -1.0], dtype=torch.float64), center)
    similarity = TRANSFORMS["similarity"].from_matrix(reflection, center)
    assert similarity[:2].abs().max().item() < 1e-15  # theta = 0, s = 0
    torch.testing.assert_close(similarity[2:], torch.tensor([2.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    rigid = TRANSFORMS["rigid"].from_matrix(reflection, center)
    assert abs(rigid[0].item()) < 1e-15
    torch.testing.assert_close(rigid[1:], torch.tensor([2.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # a general mirror: the scale is half the difference of the singular values
    mirror = TRANSFORMS["affine"].matrix(torch.tensor([1.2, 0.3, 0.5, -0.8, 0.0, 0.0], dtype=torch.float64), center)
    sigma = torch.linalg.svdvals(mirror[:2, :2])
    scale = TRANSFORMS["similarity"].from_matrix(mirror, center)[1].item()
    assert scale == pytest.approx(((sigma[0] - sigma[1]) / 2).item(), abs=1e-14)


def test_image_center_takes_whole_sizes_only():
    """A string raised "unsupported operand type(s) for -"; a tensor size gave a tensor centre."""
    assert image_center(np.int64(5), torch.tensor(3)) == (1.0, 2.0)
    for height, width in (("5", 3), (0, 4), (2.5, 4)):
        with pytest.raises(ValueError, match=r"^image_center\(\): '\(height, width\)' must be \(H, W\), two "
                                             r"positive whole numbers"):
            image_center(height, width)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16])
def test_normalization_matrix_refuses_a_dtype_tireg_does_not_compute_in(dtype):
    """An integer dtype truncated every entry but the corner to 0 without a word."""
    with pytest.raises(TypeError, match=rf"^normalization_matrix\(\): 'dtype' must be torch.float32 or "
                                        rf"torch.float64; got {dtype}$"):
        normalization_matrix((5, 6), dtype=dtype)


@pytest.mark.parametrize("center, shown", [
    ((True, False), r"\(True, False\), torch.bool values"),
    (np.array([True, False]), r"array\(\[ True, False\]\), torch.bool values"),
    (torch.tensor([True, False]), "a tensor of torch.bool"),
    (torch.tensor([3 + 4j, 2]), "a tensor of torch.complex64"),
    ([3 + 4j, 2], r"\[\(3\+4j\), 2\], torch.complex"),
])
def test_a_bool_or_complex_centre_is_refused(center, shown):
    """A bool centre (True, False) was taken as (1, 0), and a complex one lost its imaginary part with
    only torch's warning: matrices about centres the caller did not mean.  The seed's Affy and the
    models' cx, cy refused both already."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "discards the imaginary part" on the way
        with pytest.raises(TypeError, match=rf"^rigid_matrix\(\): 'center' must be \(cx, cy\), real numbers in "
                                            rf"pixels; got {shown}"):
            rigid_matrix(torch.tensor([0.1, 0.0, 0.0]), center)
    assert torch.equal(rigid_matrix(torch.tensor([0.1, 0.0, 0.0]), (3, 2)),  # whole numbers are real numbers
                       rigid_matrix(torch.tensor([0.1, 0.0, 0.0]), (3.0, 2.0)))


@pytest.mark.parametrize("dtype", [">f8", ">f4", "<f8", np.longdouble])
def test_a_centre_array_of_any_byte_order_or_a_long_double_one_is_taken_as_its_values(dtype):
    """A big-endian centre (FITS headers, some TIFF tags) or a long double one raised torch's own
    error under the message "'center' must be (cx, cy) in pixels"."""
    params = torch.tensor([0.3, 1.1, 2.0, -1.0], dtype=torch.float64)
    expected = similarity_matrix(params, (5.5, 6.25))
    assert torch.equal(similarity_matrix(params, np.array([5.5, 6.25]).astype(dtype)), expected)
    with pytest.raises(TypeError, match=r"^similarity_matrix\(\): 'center' must hold numbers; got dtype <U"):
        similarity_matrix(params, np.array(["5.5", "6.25"]))



@pytest.mark.parametrize("center", [(10**400, 1.0), (10**400, 1), [1, -10**400]])
@pytest.mark.parametrize("name", NAMES)
def test_a_centre_beyond_float64_is_a_value_error_naming_it(name, center):
    """An int beyond float64's range raised a bare OverflowError ("int too large to convert to float")."""
    kind = TRANSFORMS[name]
    params = torch.tensor(kind.identity)
    for function, caller in ((kind.matrix, "matrix"), (kind.jacobian, "jacobian"), (kind.from_matrix, "from_matrix")):
        argument = torch.eye(3) if caller == "from_matrix" else params
        with pytest.raises(ValueError, match=rf"^{name}_{caller}\(\): 'center' has a value beyond float64's range "
                                             r"\(at most 1.8e\+308 in magnitude\)$"):
            function(argument, center)
    assert kind.matrix(params, (2**63, 1)).shape == (3, 3)  # beyond int64, inside float64: taken


def test_an_unknown_transform_is_named_by_the_function_that_was_given_it():
    """get_transform("x") said "unknown transform 'x'" naming no function, from create_model too."""
    import tireg

    with pytest.raises(ValueError, match=r"^get_transform\(\): unknown transform 'x'; choose one of 'translation'"):
        get_transform("x")
    with pytest.raises(ValueError, match=r"^create_model\(\): unknown transform 'x'; choose one of 'translation'"):
        tireg.create_model("x", torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"^initialize\(\): unknown transform 'x'; choose one of 'translation'"):
        tireg.initialize.initialize(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), "x")
    with pytest.raises(ValueError, match=r"^my_function\(\): unknown transform 'x'"):
        get_transform("x", "my_function()")


@pytest.mark.parametrize("name", NAMES)
def test_sparse_parameters_matrices_and_angles_are_refused_naming_them(name):
    """They reached torch's internals ("Could not run 'aten::as_strided' with arguments from the
    'SparseCPU' backend"), which named no argument."""
    from tireg.transforms import rotation, rotation_derivative

    kind, dense = TRANSFORMS[name], r"must be a dense tensor; got layout torch.sparse_coo"
    params = torch.tensor(kind.identity).to_sparse()
    for function in (kind.matrix, kind.jacobian):
        with pytest.raises(TypeError, match=rf"^{function.__name__}\(\): 'params' {dense}"):
            function(params, (3.0, 4.0))
    with pytest.raises(TypeError, match=rf"^{kind.from_matrix.__name__}\(\): 'matrix' {dense}"):
        kind.from_matrix(torch.eye(3).to_sparse(), (3.0, 4.0))
    for function in (rotation, rotation_derivative):
        with pytest.raises(TypeError, match=rf"^{function.__name__}\(\): 'angle' {dense}"):
            function(torch.zeros(2).to_sparse())


@pytest.mark.parametrize("angle", [torch.tensor([1j]), torch.tensor([1]), torch.tensor([True])])
def test_rotation_takes_a_floating_point_angle_only(angle):
    """rotation(torch.tensor([1j])) gave a complex matrix, an integer angle a float32 one whatever the
    model's dtype."""
    from tireg.transforms import rotation, rotation_derivative

    for function in (rotation, rotation_derivative):
        with pytest.raises(TypeError, match=rf"^{function.__name__}\(\): 'angle' must be a floating-point tensor; "
                                            rf"got {angle.dtype}$"):
            function(angle)
    assert rotation(torch.zeros(3, dtype=torch.float64)).shape == (3, 2, 2)


def test_an_empty_batch_of_parameters_broadcasts_with_a_centre():
    # (0,) with a centre's () had raised "shapes [(0,), ()] do not broadcast", naming nothing:
    # NumPy's rule takes the size that is not 1, 0 included
    from tireg._validation import broadcast_shape
    from tireg.transforms import affine_jacobian, translation_jacobian, translation_matrix

    assert broadcast_shape((0,), ()) == (0,) and broadcast_shape((0, 3), (1, 3)) == (0, 3)
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shape((0,), (2,))
    assert translation_matrix(torch.zeros(0, 2), (3.0, 3.0)).shape == (0, 3, 3)
    assert translation_jacobian(torch.zeros(0, 2), (3.0, 3.0)).shape == (0, 2, 3, 3)
    assert affine_jacobian(torch.zeros(0, 6), (3.0, 3.0)).shape == (0, 6, 3, 3)
    assert rigid_matrix(torch.zeros(0, 3), (3.0, 3.0)).shape == (0, 3, 3)
