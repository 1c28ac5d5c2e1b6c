"""Pictures of a registration: clear errors before anything is drawn or written."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

from tireg import viz

RNG = np.random.default_rng(0)
FIXED, MOVING = RNG.random((20, 30)), RNG.random((20, 30))


def png_size(path) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_tensors_that_require_grad_are_drawn_detached():
    # ``.numpy()`` had refused them: "Can't call numpy() on Tensor that requires grad".
    fixed = torch.tensor(FIXED, requires_grad=True)
    moving = torch.tensor(MOVING, dtype=torch.float32, requires_grad=True)
    assert np.array_equal(viz.normalize(fixed), viz.normalize(FIXED))
    assert np.array_equal(viz.overlay(fixed, moving), viz.overlay(FIXED, moving.detach().numpy()))
    assert np.array_equal(viz.checkerboard(fixed, moving, tiles=4),
                          viz.checkerboard(FIXED, moving.detach().numpy(), tiles=4))


@pytest.mark.parametrize("other", [MOVING + 1j, torch.tensor(MOVING, dtype=torch.complex64)])
def test_overlay_refuses_complex_values(other):
    # The imaginary part had been dropped with only a ComplexWarning.
    with pytest.raises(TypeError, match=r"^overlay\(\): 'other' holds complex values; pass their real part or "
                                        r"magnitude$"):
        viz.overlay(FIXED, other)


def test_images_are_named_when_refused():
    with pytest.raises(TypeError, match=r"^overlay\(\): 'fixed' must hold real numbers; got ndarray of <U1$"):
        viz.overlay(np.array([["a", "b"]]), FIXED)
    with pytest.raises(ValueError, match=r"^overlay\(\): 'fixed' and 'other' must have the same shape \(H, W\); "
                                         r"got \(20, 30\) and \(10, 30\)$"):
        viz.overlay(FIXED, MOVING[:10])
    with pytest.raises(ValueError, match=r"^checkerboard\(\): 'other' is empty; got shape \(0, 3\)$"):
        viz.checkerboard(FIXED[:, :3], np.zeros((0, 3)))


def test_normalize_maps_infinities_to_the_ends_without_overflow():
    image = FIXED.copy()
    image[0, 0], image[0, 1] = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "overflow encountered in divide" before
        result = viz.normalize(image)
    assert (result[0, 0], result[0, 1]) == (1.0, 0.0)


@pytest.mark.parametrize("tiles, error", [
    (float("nan"), ValueError), (0, ValueError), (-3, ValueError), (2.7, ValueError), ("8", TypeError),
    (True, TypeError),
])
def test_checkerboard_tiles_must_be_a_positive_whole_number(tiles, error):
    with pytest.raises(error, match=r"^checkerboard\(\): 'tiles' must be a positive whole number; got "):
        viz.checkerboard(FIXED, MOVING, tiles=tiles)


def test_checkerboard_takes_a_whole_float_and_tiles_alternately():
    board = viz.checkerboard(FIXED, MOVING, tiles=2.0)  # side min(20, 30) / 2 = 10
    assert np.array_equal(board, viz.checkerboard(FIXED, MOVING, tiles=2))
    assert np.array_equal(board[:10, :10], viz.normalize(FIXED)[:10, :10])
    assert np.array_equal(board[:10, 10:20], viz.normalize(MOVING)[:10, 10:20])


def test_save_comparison_writes_a_png_of_the_panel_width(tmp_path):
    path = viz.save_comparison(tmp_path / "c.png", torch.tensor(FIXED, requires_grad=True), MOVING, FIXED,
                               panel_width=100, tiles=4)
    assert path == tmp_path / "c.png"
    width, height = png_size(path)  # two panels and margins at 100 dpi: 2.3 x (2 x 2/3 + 0.9) inches
    assert width == 230 and height in (223, 224)
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]


def _rows_of_image(path) -> int:
    """How many rows of a PNG are mostly drawn (not white margin or a line of text)."""
    from PIL import Image

    with Image.open(path) as picture:
        grey = np.asarray(picture.convert("L"))
    return int(((grey < 250).mean(axis=1) > 0.5).sum())


@pytest.mark.parametrize("shape", [(2, 1000), (60, 2), (1, 1)])
def test_save_comparison_fits_each_panel_in_a_square_and_shows_strips(tmp_path, shape):
    """The panel's height was panel_width * H / W, unbounded: a (2, 1000) image gave panels 0.6 pixels
    tall (a PNG of titles only), a (300, 2) one a 670 x 96090 PNG (1.7 GB, 12 s)."""
    image = np.random.default_rng(1).random(shape)
    path = viz.save_comparison(tmp_path / "strip.png", image, image[::-1], image, title="strip")
    width, height = png_size(path)
    assert width <= 2 * 320 + 40 and height <= 2 * 320 + 140, (width, height)
    short = 320 // 8  # each panel's shorter side at least an eighth of panel_width
    if shape[0] < shape[1]:  # a wide strip: two rows of panels, each at least 40 pixels tall
        assert _rows_of_image(path) >= 2 * short - 4
    else:
        assert height >= 2 * 320
    if shape[0] > shape[1]:  # a tall strip: its panels 40 pixels wide, not 2
        from PIL import Image

        with Image.open(path) as picture:
            grey = np.asarray(picture.convert("L"))
        assert int(((grey < 250).mean(axis=0) > 0.5).sum()) >= 2 * short - 4


@pytest.mark.parametrize("arguments, options, error, message", [
    ((np.zeros((3, 0)),) * 3, {}, ValueError, r"'fixed' is empty; got shape \(3, 0\)$"),
    ((FIXED, MOVING, MOVING[:5]), {}, ValueError, r"'fixed' and 'after' must have the same shape"),
    ((FIXED, MOVING, MOVING + 1j), {}, TypeError, r"'after' holds complex values"),
    ((FIXED, MOVING, MOVING), {"panel_width": 0}, ValueError, r"'panel_width' must be a positive whole number; "
                                                              r"got 0$"),
    ((FIXED, MOVING, MOVING), {"panel_width": -5}, ValueError, r"'panel_width' must be a positive whole number"),
    ((FIXED, MOVING, MOVING), {"panel_width": 320.5}, ValueError, r"'panel_width' must be a positive whole number"),
    # out of memory inside matplotlib
    ((FIXED, MOVING, MOVING), {"panel_width": 10**6}, ValueError, r"'panel_width' must be at most 8192 pixels; "
     r"got 1000000$"),
    ((FIXED, MOVING, MOVING), {"tiles": float("nan")}, ValueError, r"'tiles' must be a positive whole number"),
])
def test_save_comparison_refuses_bad_input_before_writing(tmp_path, arguments, options, error, message):
    with pytest.raises(error, match=r"^save_comparison\(\): " + message):
        viz.save_comparison(tmp_path / "c.png", *arguments, **options)
    assert list(tmp_path.iterdir()) == []


def test_save_comparison_refuses_a_path_that_is_no_path():
    with pytest.raises(TypeError, match=r"^save_comparison\(\): 'path' must be a str or os.PathLike; got NoneType$"):
        viz.save_comparison(None, FIXED, MOVING, MOVING)


def test_a_picture_is_written_only_under_a_png_name(tmp_path):
    """PNG data was written under any name (c.jpg, plot.txt)."""
    for name in ("c.jpg", "plot.txt", "noname"):
        with pytest.raises(ValueError, match=rf"^save_comparison\(\): 'path' must end in .png .*{name}'$"):
            viz.save_comparison(tmp_path / name, FIXED, MOVING, MOVING)
        with pytest.raises(ValueError, match=r"^save_convergence\(\): 'path' must end in .png"):
            viz.save_convergence(tmp_path / name, [(1, [1.0, 0.5])])
    assert list(tmp_path.iterdir()) == []
    assert viz.save_comparison(tmp_path / "c.PNG", FIXED, MOVING, MOVING).read_bytes()[:4] == b"\x89PNG"


def test_a_failed_drawing_leaves_no_file(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError):  # matplotlib cannot parse the mathematics
        viz.save_comparison(tmp_path / "c.png", FIXED, MOVING, MOVING, title=r"$\frac$")
    assert list(tmp_path.iterdir()) == []


def test_save_convergence_draws_tensors_generators_and_one_pair(tmp_path):
    levels = ((factor, costs) for factor, costs in [(4, torch.rand(5, 3, requires_grad=True)), (1.0, np.ones(4))])
    path = viz.save_convergence(tmp_path / "v.png", levels, title="t")
    assert png_size(path) == (600, 360)


@pytest.mark.parametrize("levels, error, message", [
    (5, TypeError, r"'levels' must be a sequence of \(shrink factor, costs\); got int$"),
    ([np.ones(5)], TypeError, r"'levels\[0\]' must be a pair \(shrink factor, costs\); got ndarray of shape \(5,\)$"),
    ([(2, np.ones(3)), ("2", np.ones(3))], TypeError, r"the shrink factor of 'levels\[1\]' must be a positive whole "
                                                      r"number; got '2'$"),
    ([(0.5, np.ones(3))], ValueError, r"the shrink factor of 'levels\[0\]' must be a positive whole number; got 0.5$"),
    ([(2, 1.0)], ValueError, r"the cost array of 'levels\[0\]' must have shape \(iterations \+ 1,\) or "
                             r"\(iterations \+ 1, B\), at least one cost; got shape \(\)$"),
    ([(2, np.ones((3, 3, 3)))], ValueError, r"the cost array of 'levels\[0\]' must have shape .*; "
                                            r"got shape \(3, 3, 3\)$"),
    ([(2, np.zeros((0, 3)))], ValueError, r"the cost array of 'levels\[0\]' must have shape .*; got shape \(0, 3\)$"),
    ([(2, np.ones(3) * 1j)], TypeError, r"the cost array of 'levels\[0\]' holds complex values"),
])
def test_save_convergence_refuses_bad_levels_before_writing(tmp_path, levels, error, message):
    with pytest.raises(error, match=r"^save_convergence\(\): " + message):
        viz.save_convergence(tmp_path / "v.png", levels)
    assert list(tmp_path.iterdir()) == []


def test_zero_d_levels_are_refused_naming_them(tmp_path):
    """A 0-d tensor has __iter__: it raised "iteration over a 0-d tensor", naming nothing."""
    with pytest.raises(TypeError, match=r"^save_convergence\(\): 'levels' must be a sequence of \(shrink factor, "
                                        r"costs\); got Tensor$"):
        viz.save_convergence(tmp_path / "c.png", torch.tensor(3))
    with pytest.raises(TypeError, match=r"^save_convergence\(\): 'levels\[0\]' must be a pair \(shrink factor, "
                                        r"costs\); got Tensor of shape \(\)$"):
        viz.save_convergence(tmp_path / "c.png", torch.tensor([3]))
    assert not (tmp_path / "c.png").exists()


def test_save_comparison_draws_a_large_pair_from_images_reduced_to_its_panels(tmp_path):
    """A 4096^2 pair's picture (640 pixels wide) took 42 s and 4 GB: matplotlib resampled the panels
    from the full images.  They are block means of about twice the panel's side first: the PNG is
    the same size, and the memory allocated is a few copies of one input, not 25."""
    import tracemalloc

    rng = np.random.default_rng(0)
    fixed, moving = rng.random((2048, 2048)), rng.random((2048, 2048))
    small = viz.save_comparison(tmp_path / "small.png", fixed[:256, :256], moving[:256, :256], fixed[:256, :256])
    tracemalloc.start()
    try:
        large = viz.save_comparison(tmp_path / "large.png", fixed, moving, fixed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * fixed.nbytes, peak / fixed.nbytes  # 25 copies before
    assert png_size(large) == png_size(small)
    # block means: 6 / 4 rounds up to blocks of 2, the fifth row's block padded by its own values
    reduced = viz._reduced(np.arange(30.0).reshape(5, 6), 4)
    assert np.array_equal(reduced, [[3.5, 5.5, 7.5], [15.5, 17.5, 19.5], [24.5, 26.5, 28.5]])
    assert viz._reduced(fixed[:8, :8], 8) is fixed[:8, :8] or np.array_equal(viz._reduced(fixed[:8, :8], 8),
                                                                            fixed[:8, :8])
