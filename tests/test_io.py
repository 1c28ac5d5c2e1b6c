"""tireg.io: image files read as their content says, and writes that refuse bad data before touching the file."""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tireg.io import ImageError, ImageFormat, OutputExistsError, OutputFiles, read_image, read_stack, write_frames
from tireg.io import check_writable, convert_dtype, from_chw, to_chw, write_image

tifffile = pytest.importorskip("tifffile")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("imageio.v3")

U8_PNG = ImageFormat("png", np.dtype(np.uint8))


def files(folder: Path) -> list[str]:
    """Every name under ``folder``, hidden ones (the temporaries) included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def frame(value: int, size: int = 64) -> np.ndarray:
    return np.full((size, size), value, np.uint8)


# ----------------------------------------------------------------------------
# 1. TIFF pages: every page a frame, or an error naming the page that differs


def test_tiff_pages_written_one_by_one_are_all_frames(tmp_path):
    """tifffile makes a series of each page appended; every one is a frame, in order."""
    path = tmp_path / "appended.tif"
    for k in range(5):
        tifffile.imwrite(path, frame(10 * k), append=k > 0)
    stack = read_stack(path)
    assert stack.count == 5 and stack.size == (64, 64)
    assert stack.frames[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40]
    assert stack.names == [f"appended.tif page {k}" for k in range(5)]


def test_tiff_pages_of_one_size_but_two_dtypes_are_read_in_page_order(tmp_path):
    """tifffile groups such pages into series by dtype (pages 0, 2 then 1): frames kept page order."""
    pages = [Image.fromarray(np.full((8, 8), 1, np.uint8)), Image.fromarray(np.full((8, 8), 300, np.uint16)),
             Image.fromarray(np.full((8, 8), 2, np.uint8))]
    pages[0].save(tmp_path / "mixed.tif", save_all=True, append_images=pages[1:])
    stack = read_stack(tmp_path / "mixed.tif")
    assert stack.frames.dtype == np.uint16 and stack.frames[:, 0, 0, 0].tolist() == [1, 300, 2]


def _write_pages(path: Path, images: list, writer: str) -> None:
    """A multi-page TIFF of ``images`` written page by page by Pillow or tifffile."""
    if writer == "pillow":
        pil = [Image.fromarray(image) for image in images]
        pil[0].save(path, save_all=True, append_images=pil[1:])
    else:
        for k, image in enumerate(images):
            tifffile.imwrite(path, image, append=k > 0)


@pytest.mark.parametrize("writer", ["pillow", "tifffile"])
def test_tiff_pages_of_different_sizes_are_refused_naming_the_page(tmp_path, writer):
    """The 48 x 48 page split the file into two series and read_stack silently read 4 frames of 5."""
    images = [frame(k) for k in range(5)]
    images[2] = images[2][:48, :48]
    path = tmp_path / "cropped.tif"
    _write_pages(path, images, writer)
    expected = re.escape(f"'{path}' has pages of different sizes: page 2 is 48 x 48, page 0 is 64 x 64")
    with pytest.raises(ImageError, match=expected):
        read_stack(path)
    with pytest.raises(ImageError, match=expected):  # not page 0 alone, silently
        read_image(path)


def test_a_thumbnail_page_is_not_a_frame(tmp_path):
    """A reduced-resolution page (NewSubfileType 1) shows another page smaller: neither a frame nor an error."""
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as writer:
        writer.write(frame(1), metadata=None)
        writer.write(frame(2), metadata=None)
        writer.write(frame(3, 16), subfiletype=1, metadata=None)
    assert read_stack(tmp_path / "thumb.tif").frames[:, 0, 0, 0].tolist() == [1, 2]


def test_tireg_stack_of_pages_of_different_sizes_fails_with_one_line(tmp_path, monkeypatch, capsys):
    """It aligned 4 of the 5 pages, and the CSV's labels named the wrong pages."""
    from tireg.cli import main

    pictures = [Image.fromarray(frame(k)) for k in range(4)]
    pictures[1] = pictures[1].crop((0, 0, 48, 48))
    pictures[0].save(tmp_path / "pages.tif", save_all=True, append_images=pictures[1:])
    monkeypatch.chdir(tmp_path)
    assert main(["stack", "pages.tif", "-o", "aligned.tif"]) == 1
    assert capsys.readouterr().err == ("tireg: error: stack 'pages.tif' has pages of different sizes: page 1 is "
                                       "48 x 48, page 0 is 64 x 64; tireg reads the pages of a TIFF as frames of "
                                       "one size\n")
    assert files(tmp_path) == ["pages.tif"]


def test_tiff_pages_of_different_channels_are_refused(tmp_path):
    with tifffile.TiffWriter(tmp_path / "grey_rgb.tif") as writer:
        writer.write(frame(1, 32), metadata=None)
        writer.write(np.zeros((32, 32, 3), np.uint8), photometric="rgb", metadata=None)
    with pytest.raises(ImageError, match="page 1 is 32 x 32 with 3 samples, page 0 is 32 x 32"):
        read_stack(tmp_path / "grey_rgb.tif")


def test_ome_tiff_images_of_one_shape_are_frames_keeping_their_channels(tmp_path):
    """Two (3, 32, 40) CYX images: 2 frames of 3 channels, not 6 frames of one (the pages stacked)."""
    images = np.arange(2 * 3 * 32 * 40, dtype=np.uint16).reshape(2, 3, 32, 40)
    with tifffile.TiffWriter(tmp_path / "two.ome.tif", ome=True) as writer:
        for image in images:
            writer.write(image, metadata={"axes": "CYX"})
    stack = read_stack(tmp_path / "two.ome.tif")
    assert stack.frames.shape == (2, 32, 40, 3) and stack.format.channel_axis
    np.testing.assert_array_equal(stack.frames, np.moveaxis(images, 1, -1))


def test_tiff_series_appended_one_at_a_time_are_frames_keeping_their_channels(tmp_path):
    path = tmp_path / "appended.tif"
    images = np.arange(2 * 2 * 16 * 20, dtype=np.uint16).reshape(2, 2, 16, 20)
    for k, image in enumerate(images):
        tifffile.imwrite(path, image, append=k > 0, metadata={"axes": "CYX"})
    stack = read_stack(path)
    assert stack.frames.shape == (2, 16, 20, 2) and stack.format.channel_axis
    np.testing.assert_array_equal(stack.frames, np.moveaxis(images, 1, -1))


def test_tiff_images_of_different_channel_counts_are_refused(tmp_path):
    """Their pages are all of one size: stacking them turned 2 + 3 channels into 5 frames."""
    with tifffile.TiffWriter(tmp_path / "c2_c3.ome.tif", ome=True) as writer:
        writer.write(np.zeros((2, 16, 16), np.uint8), metadata={"axes": "CYX"})
        writer.write(np.zeros((3, 16, 16), np.uint8), metadata={"axes": "CYX"})
    with pytest.raises(ImageError, match=r"holds images of different shapes \(series 0 is \(2, 16, 16\) CYX"):
        read_stack(tmp_path / "c2_c3.ome.tif")


@pytest.mark.parametrize("case", ["untagged thumbnail", "OME label", "appended frames and thumbnail"])
def test_trailing_pages_of_another_size_are_left_out_with_a_warning(tmp_path, case):
    """A thumbnail or label after the image was refused; its image is read, the file and the count named."""
    path = tmp_path / "main.tif"
    if case == "untagged thumbnail":  # no NewSubfileType: not a reduced page
        with tifffile.TiffWriter(path) as writer:
            writer.write(frame(1))
            writer.write(frame(1)[::4, ::4])
        expected, ignored = [1], "1 trailing page of another size"
    elif case == "OME label":
        with tifffile.TiffWriter(path, ome=True) as writer:
            writer.write(np.stack([frame(1), frame(2)]), metadata={"axes": "CYX"})
            writer.write(frame(9, 8), metadata={"axes": "YX"})
            writer.write(frame(9, 12), metadata={"axes": "YX"})
        expected, ignored = [[1, 2]], "2 trailing pages of other sizes"
    else:
        for k, image in enumerate([frame(1), frame(2), frame(3), frame(9, 16)]):
            tifffile.imwrite(path, image, append=k > 0)
        expected, ignored = [1, 2, 3], "1 trailing page of another size"
    for read in (read_stack, read_image):
        with pytest.warns(UserWarning, match=re.escape(f"'{path}': ignored {ignored} than its frames (64 x 64)")) as caught:
            data = read(path)
        # the warning names this line, through read_stack too (it named read_stack's call of read_image)
        assert {record.filename for record in caught} == {__file__}
        values = data.frames[:, 0, 0, :].tolist() if data.format.channel_axis else data.frames[:, 0, 0, 0].tolist()
        assert values == expected


@pytest.mark.parametrize("writer", ["pillow", "tifffile"])
def test_a_page_of_another_size_among_the_frames_is_refused_even_with_a_thumbnail_after_them(tmp_path, writer):
    """Pages [64, 64, 48, 64, 64, 16]: the 48 x 48 page lies among the frames; reading the first series
    would drop a frame and shift the labels of the others."""
    images = [frame(k) for k in range(5)] + [frame(9, 16)]
    images[2] = images[2][:48, :48]
    path = tmp_path / "interleaved.tif"
    _write_pages(path, images, writer)
    with pytest.raises(ImageError, match=re.escape("page 2 is 48 x 48, page 0 is 64 x 64")):
        read_stack(path)


def _six_pages() -> np.ndarray:
    return np.stack([np.roll(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 13, 7 * k) for k in range(6)])


def test_an_ome_header_of_fewer_frames_than_pages_reads_the_frames_it_describes(tmp_path):
    """'OME series expected 3 frames, got 6' is a file with pages beyond its OME header (microscope
    software writes them; tifffile names one): every described image is there. It was refused as
    'truncated or corrupt'; the described frames are read, as before, with tifffile's remark a warning."""
    tifffile = pytest.importorskip("tifffile")
    frames = _six_pages()
    path = tmp_path / "extra.ome.tif"
    tifffile.imwrite(path, frames, ome=True, metadata={"axes": "TYX"})
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    xml = re.sub(r"<TiffData[^>]*/>", "<TiffData/>", xml.replace('SizeT="6"', 'SizeT="3"'))
    tifffile.imwrite(path, frames, description=xml, metadata=None)
    with pytest.warns(UserWarning, match="expected 3 frames, got 6"):
        stack = read_stack(path)
    assert np.array_equal(stack.frames[..., 0], frames[:3])


@pytest.mark.parametrize("layout", ["pages", "zlib", "imagej"])
def test_a_truncated_tiff_is_refused_not_read_as_its_first_pages(tmp_path, layout, capsys):
    """A 6-page file cut short was read as the pages before the cut (4 frames, exit 0; a compressed or
    ImageJ one as 1 frame), with only tifffile's log line '<tifffile.TiffPages @8> invalid page offset'."""
    path = tmp_path / "whole.tif"
    if layout == "pages":  # cut right after page 3's pixels: pages 0 to 3 are whole
        with tifffile.TiffWriter(path) as writer:
            for page in _six_pages():
                writer.write(page, contiguous=False)
        with tifffile.TiffFile(path) as tif:
            end = tif.pages[3].dataoffsets[-1] + tif.pages[3].databytecounts[-1]
    else:
        options = {"compression": "zlib"} if layout == "zlib" else {"imagej": True, "metadata": {"axes": "TYX"}}
        tifffile.imwrite(path, _six_pages(), **options)
        end = int(path.stat().st_size * 0.6)
    (tmp_path / "cut.tif").write_bytes(path.read_bytes()[:end])
    with pytest.raises(ImageError, match=r"^stack '.*cut\.tif' is truncated or corrupt: its page \d cannot be read"):
        read_stack(tmp_path / "cut.tif")
    assert capsys.readouterr().err == ""  # tifffile's own lines were not printed


def test_tifffiles_remarks_on_a_readable_file_are_warnings_not_log_lines(tmp_path, capsys):
    """tifffile's log line '<tifffile.TiffFile 'order.tif'> ImageJ series of unknown order' reached stderr
    as it was (past -q, beside 'tireg: ...' lines); it is a warning naming the file, and the file is read."""
    path = tmp_path / "order.tif"
    tifffile.imwrite(path, np.stack([frame(1), frame(2)]), description="ImageJ=1.53t\nimages=2\nframes=2\norder=wxyz\n",
                     metadata=None)
    with pytest.warns(UserWarning, match=re.escape(f"stack '{path}': tifffile: ImageJ series of unknown order 'wxyz'")):
        stack = read_stack(path)
    assert stack.frames[:, 0, 0, 0].tolist() == [1, 2]
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------
# 2, 3, 9. writing: bad values or shapes refused before anything is written


BAD_WRITES = {
    "NaN": (np.full((1, 4, 4, 1), np.nan), U8_PNG, ".png", "the image holds NaN or Inf values"),
    "-Inf": (np.full((1, 4, 4, 1), -np.inf), ImageFormat("tiff", np.dtype(np.uint16)), ".tif",
             "the image holds NaN or Inf values"),
    "NaN to float": (np.full((2, 4, 4, 1), np.nan, np.float32), ImageFormat("npy", np.dtype(np.float32)), ".npy",
                     "the image holds NaN or Inf values"),
    "complex": (np.ones((1, 4, 4, 1)) * 1j, ImageFormat("npy", np.dtype(np.float32)), ".npy", "complex values"),
    "beyond float32": (np.full((1, 4, 4, 1), 1e300), ImageFormat("tiff", np.dtype(np.float32)), ".tif",
                       "values beyond the range of float32"),
    "beyond float16": (np.full((1, 4, 4, 1), 65535, np.uint16), ImageFormat("npy", np.dtype(np.float16)), ".npy",
                       "values beyond the range of float16"),
    "no rows": (np.zeros((1, 0, 4, 1), np.uint8), U8_PNG, ".png", "the image is empty (4 x 0 pixels"),
    "no frames": (np.zeros((0, 4, 4, 1), np.uint8), ImageFormat("tiff", np.dtype(np.uint8)), ".tif",
                  "the image is empty (4 x 4 pixels, 1 channel(s), 0 frame(s))"),
    "no channels": (np.zeros((1, 4, 4, 0), np.uint8), ImageFormat("npy", np.dtype(np.uint8)), ".npy",
                    "the image is empty (4 x 4 pixels, 0 channel(s)"),
}


@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_a_bad_write_names_the_file_and_leaves_the_old_one(tmp_path, case):
    """NaN became 0, Inf the type's end, 1e300 inf, complex its real part; an empty array replaced
    an existing .npy or .tif with an unreadable file."""
    frames, image_format, suffix, message = BAD_WRITES[case]
    path = tmp_path / f"out{suffix}"
    write_frames(path, np.full((1, 4, 4, 1), 7, np.uint8), ImageFormat(image_format.kind, np.dtype(np.uint8)))
    before = path.read_bytes()
    with pytest.raises(ImageError, match=f"^cannot write {re.escape(repr(str(path)))}: .*{re.escape(message)}"):
        write_frames(path, frames, image_format)
    assert path.read_bytes() == before
    assert files(tmp_path) == [path.name]


def test_write_image_names_itself_and_the_shape_given():
    """It said: "write_frames(): 'frames' must be (N, H, W, C); got shape (1, 4, 4)"."""
    with pytest.raises(ValueError, match=r"^write_image\(\): 'image' must be \(H, W, C\); got shape \(4, 4\)$"):
        write_image("x.png", np.zeros((4, 4), np.uint8), U8_PNG)


# ----------------------------------------------------------------------------
# 4. PNG and JPEG checked by content, not suffix


def _png_16bit_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG, which Pillow cannot write."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_a_16bit_colour_png_named_jpg_is_refused(tmp_path):
    """It was read as 8 bits, silently."""
    _png_16bit_rgb(tmp_path / "deep.jpg", np.random.default_rng(0).integers(0, 65535, (16, 20, 3)))
    with pytest.raises(ImageError, match="deep.jpg' is a 16-bit colour PNG, which Pillow reads as 8 bits"):
        read_image(tmp_path / "deep.jpg")


@pytest.mark.parametrize("content", ["GIF", "PNG"])
def test_an_animation_named_jpg_is_refused(tmp_path, content):
    """An animated GIF or APNG named .jpg gave its first frame, silently."""
    pictures = [Image.fromarray(frame(value, 12)) for value in (10, 200)]
    pictures[0].save(tmp_path / "moving.jpg", format=content, save_all=True, append_images=pictures[1:])
    with pytest.raises(ImageError, match=rf"moving.jpg' is an animation of 2 frames \({content}\)"):
        read_image(tmp_path / "moving.jpg")


def test_a_png_named_jpg_is_read_as_png(tmp_path):
    pixels = (np.arange(16 * 20) * 200).astype(np.uint16).reshape(16, 20)
    Image.fromarray(pixels).save(tmp_path / "grey16.jpg", format="PNG")
    image = read_image(tmp_path / "grey16.jpg")
    assert image.format.kind == "png" and image.frames.dtype == np.uint16
    np.testing.assert_array_equal(image.frames[0, :, :, 0], pixels)


def test_a_tiff_named_png_is_refused(tmp_path):
    """Pillow read a 16-bit RGB TIFF named .png as 8 bits (65534 as 255), silently."""
    tifffile = pytest.importorskip("tifffile")
    pixels = np.random.default_rng(0).integers(0, 65535, (16, 20, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.png", pixels, photometric="rgb")
    with pytest.raises(ImageError, match="deep.png' is a TIFF file under a '.png' name; name it .tif"):
        read_image(tmp_path / "deep.png")


@pytest.mark.parametrize("mode, transparency, expected", [("P", 0, 4), ("L", 7, 2), ("RGB", (1, 2, 3), 4)])
def test_a_transparent_entry_is_read_as_alpha(tmp_path, mode, transparency, expected):
    """A palette PNG's transparent index (PNG's tRNS) was read as its colour, opaque."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (16, 20, 3)).astype(np.uint8)
    pixels[:4] = (1, 2, 3)
    picture = Image.fromarray(pixels)
    picture = picture.quantize(8) if mode == "P" else picture.convert("L") if mode == "L" else picture
    if mode == "L":
        picture.putpixel((0, 0), 7)
    transparent = (np.asarray(picture) == (transparency if mode != "RGB" else np.uint8(transparency)))
    transparent = transparent.all(-1) if transparent.ndim == 3 else transparent
    picture.save(tmp_path / "see-through.png", transparency=transparency)
    image = read_image(tmp_path / "see-through.png")
    assert image.frames.shape == (1, 16, 20, expected)
    alpha = image.frames[0, :, :, -1]
    assert transparent.any() and np.array_equal(alpha == 0, transparent) and (alpha[~transparent] == 255).all()


def _extrasamples(path: Path) -> tuple[int, ...]:
    with tifffile.TiffFile(path) as tif:
        return tuple(int(value) for value in tif.pages[0].extrasamples)


@pytest.mark.parametrize("source", ["LA png", "UNASSALPHA tif", "ASSOCALPHA tif", "ASSOCALPHA RGBA tif"])
def test_alpha_written_to_tiff_stays_alpha(tmp_path, source):
    """Grey + alpha written to TIFF had its second sample tagged UNSPECIFIED: Pillow opened it as
    plain grey.  Alpha stays alpha, associated (premultiplied) alpha too."""
    rng = np.random.default_rng(2)
    channels = 4 if "RGBA" in source else 2
    pixels = rng.integers(0, 256, (16, 20, channels)).astype(np.uint8)
    if source == "LA png":
        Image.fromarray(pixels, "LA").save(tmp_path / "input.png")
        path, expected, mode = tmp_path / "input.png", 2, "LA"
    else:
        tag = 1 if source.startswith("ASSOC") else 2
        path, expected = tmp_path / "input.tif", tag
        tifffile.imwrite(path, pixels, photometric="rgb" if channels == 4 else "minisblack", planarconfig="contig",
                         extrasamples=[tag])
        mode = {(2, 2): "LA", (1, 2): "La", (1, 4): "RGBA"}[tag, channels]
    image = read_image(path)
    write_frames(tmp_path / "out.tif", image.frames, image.format)
    assert _extrasamples(tmp_path / "out.tif") == (expected,)
    with Image.open(tmp_path / "out.tif") as written:
        assert written.mode == mode
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), pixels)


def test_two_channels_of_a_tiff_that_are_not_alpha_are_not_written_as_alpha(tmp_path):
    """Two fluorescence channels (the extra sample UNSPECIFIED, or a hyperstack's C axis) stay two channels."""
    pixels = np.random.default_rng(3).integers(0, 4096, (16, 20, 2)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "samples.tif", pixels, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "hyperstack.tif", np.moveaxis(pixels, -1, 0), imagej=True, metadata={"axes": "CYX"})
    np.save(tmp_path / "array.npy", pixels)
    for name in ("samples.tif", "hyperstack.tif", "array.npy"):
        image = read_image(tmp_path / name)
        assert image.channels == 2 and image.format.alpha is None, name
        write_frames(tmp_path / f"out-{name}.tif", image.frames, image.format)
        if name == "hyperstack.tif":  # written back as a hyperstack: the channels are pages, no extra sample
            with tifffile.TiffFile(tmp_path / f"out-{name}.tif") as written:
                assert written.is_imagej and written.series[0].axes == "CYX" and _extrasamples(
                    tmp_path / f"out-{name}.tif") == ()
        else:
            assert _extrasamples(tmp_path / f"out-{name}.tif") == (0,), name
        assert np.array_equal(read_image(tmp_path / f"out-{name}.tif").frames[0], pixels), name


def test_a_fourth_rgb_sample_that_is_not_alpha_is_not_written_as_alpha(tmp_path):
    """An RGB TIFF whose fourth sample is UNSPECIFIED (say, near infrared) was written back with that
    sample tagged UNASSALPHA, tifffile's default for a fourth RGB sample: a viewer then showed the
    colour through it.  It keeps its tag; an ``.npy`` of four channels, which says nothing, is still
    written as RGBA."""
    pixels = np.random.default_rng(4).integers(0, 256, (16, 20, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgbn.tif", pixels, photometric="rgb", planarconfig="contig", extrasamples=[0])
    image = read_image(tmp_path / "rgbn.tif")
    assert image.channels == 4 and image.format.alpha is None
    write_frames(tmp_path / "out.tif", image.frames, image.format)
    assert _extrasamples(tmp_path / "out.tif") == (0,)
    with tifffile.TiffFile(tmp_path / "out.tif") as written:
        assert written.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), pixels)
    again = read_image(tmp_path / "out.tif")
    assert again.format.alpha is None and again.format.photometric == "rgb"
    np.save(tmp_path / "rgba.npy", pixels)
    array = read_image(tmp_path / "rgba.npy")
    write_frames(tmp_path / "from-npy.tif", array.frames, array.format)
    assert _extrasamples(tmp_path / "from-npy.tif") == (2,)


@pytest.mark.parametrize("photometric, tags", [("rgb", (0, 0)), ("rgb", (2, 0)), ("rgb", (0, 2)),
                                               ("minisblack", (0, 2)), ("minisblack", (0, 0, 0))])
def test_several_extra_samples_of_a_tiff_keep_their_photometric_and_tags(tmp_path, photometric, tags):
    """An RGB TIFF with two extra samples was written back MINISBLACK, and every extra sample
    UNSPECIFIED: an alpha among them (RGBA + infrared) lost its tag.  They keep both, as read; such
    an alpha is not the last of 2 or 4 channels and is warped as a plain channel."""
    channels = (3 if photometric == "rgb" else 1) + len(tags)
    pixels = np.random.default_rng(5).integers(0, 4096, (12, 14, channels)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "input.tif", pixels, photometric=photometric, planarconfig="contig",
                     extrasamples=list(tags))
    image = read_image(tmp_path / "input.tif")
    assert image.channels == channels and image.format.alpha is None and image.format.extrasamples == tags
    write_frames(tmp_path / "out.tif", image.frames, image.format)
    with tifffile.TiffFile(tmp_path / "out.tif") as written:
        assert written.pages[0].photometric.name == photometric.upper()
    assert _extrasamples(tmp_path / "out.tif") == tags
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), pixels)


@pytest.mark.parametrize("photometric", ["rgb", "minisblack"])
def test_a_tiff_band_that_is_not_alpha_is_not_written_to_png_as_alpha(tmp_path, photometric):
    """An RGB TIFF's untagged fourth sample (or a grey one's second) was written to a PNG as its alpha,
    and read back so: a later apply premultiplied the colour by the infrared band.  Refused before
    anything is written, naming .tif and .npy (JPEG's message too); an .npy's four channels, which say
    nothing, are still written as RGBA."""
    channels = 4 if photometric == "rgb" else 2
    pixels = np.random.default_rng(6).integers(0, 256, (12, 14, channels)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "input.tif", pixels, photometric=photometric, planarconfig="contig",
                     extrasamples=[0])
    image = read_image(tmp_path / "input.tif")
    with pytest.raises(ImageError, match=r"PNG would store the last of these \d channels as alpha .*write .tif or .npy"):
        write_frames(tmp_path / "out.png", image.frames, image.format)
    assert list(tmp_path.iterdir()) == [tmp_path / "input.tif"]
    with pytest.raises(ImageError, match=r"JPEG holds grey or RGB, not \d channels .*write .tif or .npy"):
        check_writable(tmp_path / "out.jpg", image.frames.shape, image.format)
    np.save(tmp_path / "array.npy", pixels)
    array = read_image(tmp_path / "array.npy")
    write_frames(tmp_path / "from-npy.png", array.frames, array.format)
    assert read_image(tmp_path / "from-npy.png").format.alpha == "unassociated"


def test_a_transparent_1_bit_grey_is_read_as_alpha_and_a_16_bit_one_stays_opaque(tmp_path):
    """Pillow gives 1-bit grey no alpha mode: its tRNS grey was read opaque. A 16-bit grey one stays
    opaque, and round-trips: read as grey + alpha it could not be written back as a PNG, and
    'tireg register' of two of them wrote nothing."""
    rng = np.random.default_rng(2)
    bits = rng.random((16, 20)) > 0.5
    Image.fromarray(bits).save(tmp_path / "one-bit.png", transparency=0)
    image = read_image(tmp_path / "one-bit.png")
    assert image.frames.shape == (1, 16, 20, 2)
    np.testing.assert_array_equal(image.frames[0, :, :, 0], bits)
    np.testing.assert_array_equal(image.frames[0, :, :, 1], bits)  # transparent where 0 (False)
    deep = (rng.integers(0, 200, (16, 20)) * 300).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png", transparency=0)
    image = read_image(tmp_path / "deep.png")
    assert image.frames.shape == (1, 16, 20, 1) and image.frames.dtype == np.uint16
    write_frames(tmp_path / "again.png", image.frames, image.format)
    np.testing.assert_array_equal(read_image(tmp_path / "again.png").frames[0, :, :, 0], deep)


# ----------------------------------------------------------------------------
# 5. OutputFiles: all or nothing


def test_an_output_that_appears_during_the_work_stops_every_move(tmp_path):
    """commit() moved a.json into place, refused b.png, and left b.png's temporary behind."""
    outputs = OutputFiles()
    outputs.check(tmp_path / "a.json", tmp_path / "sub" / "b.png")
    outputs.temporary(tmp_path / "a.json").write_text("new a")
    outputs.temporary(tmp_path / "sub" / "b.png").write_text("new b")
    (tmp_path / "sub" / "b.png").write_text("someone else's")  # appears while the work runs
    with pytest.raises(OutputExistsError, match="b.png' already exists"):
        outputs.commit()
    assert files(tmp_path) == ["sub", "sub/b.png"]  # no a.json, no temporary
    assert (tmp_path / "sub" / "b.png").read_text() == "someone else's"


def test_a_folder_that_appears_where_an_output_goes_stops_every_move(tmp_path):
    outputs = OutputFiles(force=True)
    outputs.temporary(tmp_path / "a.json").write_text("new a")
    outputs.temporary(tmp_path / "b.png").write_text("new b")
    (tmp_path / "b.png").mkdir()
    with pytest.raises(IsADirectoryError, match="cannot write '.*b.png': it is a folder"):
        outputs.commit()
    assert files(tmp_path) == ["b.png"]


def test_outputs_go_through_links_keep_their_mode_and_a_file_not_writable_is_refused(tmp_path, monkeypatch):
    """As atomic_path writes: a --force output that was a symbolic link became a plain file (its target
    kept the old content), one replaced took the default mode, and a read-only one was replaced."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "a.csv"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "a.csv"
    link.symlink_to(target)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "f0.png").symlink_to(tmp_path / "real" / "f0.png")  # a dangling link in a merged folder
    outputs = OutputFiles(force=True)
    outputs.check(link, tmp_path / "frames", folders=[tmp_path / "frames"], exist_ok=[tmp_path / "frames"])
    outputs.temporary(link).write_text("new")
    folder = outputs.temporary(tmp_path / "frames")
    folder.mkdir()
    (folder / "f0.png").write_text("frame")
    assert outputs.commit() == [link, tmp_path / "frames"]
    assert link.is_symlink() and target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    assert (tmp_path / "frames" / "f0.png").is_symlink() and (tmp_path / "real" / "f0.png").read_text() == "frame"
    assert files(tmp_path) == ["a.csv", "frames", "frames/f0.png", "real", "real/a.csv", "real/f0.png"]

    access = os.access  # a user's read-only file: os.access says no (as root it says yes)
    monkeypatch.setattr("tireg.io.os.access", lambda name, mode: not (Path(name) == target and mode == os.W_OK)
                        and access(name, mode))
    target.chmod(0o444)
    message = f"cannot write '{link}': the file it links to, '{target}', is not writable (-r--r--r--)"
    with pytest.raises(PermissionError, match="^" + re.escape(message)):
        OutputFiles(force=True).check(link)
    assert target.read_text() == "new"


def test_an_image_written_through_a_link_keeps_the_link_and_the_mode(tmp_path):
    target = tmp_path / "real.png"
    write_frames(target, np.zeros((1, 4, 4, 1), np.uint8), U8_PNG)
    target.chmod(0o600)
    link = tmp_path / "link.png"
    link.symlink_to(target.name)  # relative
    write_frames(link, np.full((1, 4, 4, 1), 7, np.uint8), U8_PNG)
    assert link.is_symlink() and read_image(target).frames.max() == 7 and (target.stat().st_mode & 0o777) == 0o600
    loop = tmp_path / "loop.png"
    loop.symlink_to("loop.png")
    with pytest.raises(OSError, match=r"^cannot write '.*loop\.png': too many levels of symbolic links$"):
        write_frames(loop, np.zeros((1, 4, 4, 1), np.uint8), U8_PNG)
    with pytest.raises(OSError, match=r"^cannot write '.*loop\.png': too many levels of symbolic links$"):
        OutputFiles(force=True).check(loop)
    assert files(tmp_path) == ["link.png", "loop.png", "real.png"]


# ----------------------------------------------------------------------------
# 6, 7, 8. destinations: named, never the temporary


def test_a_folder_as_destination_is_named(tmp_path):
    """It said: IsADirectoryError: ... '.adir.f448e6ba.tmp.json' -> 'adir.json'."""
    from tireg.transform_io import save_transform

    for name in ("adir.png", "adir.json"):
        (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match=f"^cannot write {re.escape(repr(str(tmp_path / 'adir.png')))}: "
                                                "it is a folder$"):
        write_frames(tmp_path / "adir.png", np.zeros((1, 4, 4, 1), np.uint8), U8_PNG)
    with pytest.raises(IsADirectoryError, match=r"^save_transform\(\): cannot write "
                                                f"{re.escape(repr(str(tmp_path / 'adir.json')))}: it is a folder$"):
        save_transform(tmp_path / "adir.json", np.eye(3))
    assert files(tmp_path) == ["adir.json", "adir.png"]


@pytest.mark.parametrize("under", ["afile", "afile/sub"])
def test_a_file_as_parent_folder_is_named(tmp_path, under):
    """It said: folder 'afile' does not exist."""
    (tmp_path / "afile").write_text("keep")
    target = tmp_path / under / "x.png"
    message = re.escape(f"cannot write '{target}': '{tmp_path / 'afile'}' is a file, not a folder")
    with pytest.raises(NotADirectoryError, match=f"^{message}$"):
        write_frames(target, np.zeros((1, 4, 4, 1), np.uint8), U8_PNG)
    with pytest.raises(NotADirectoryError, match=f"^{message}$"):
        OutputFiles().check(target)
    assert (tmp_path / "afile").read_text() == "keep"


def test_names_as_long_as_the_file_system_takes_are_written(tmp_path):
    """The temporary's name added 14 characters: names of 242 to 255 could not be written."""
    from tireg.transform_io import load_transform, save_transform

    limit = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    image = tmp_path / ("a" * (limit - 4) + ".png")
    write_frames(image, np.full((1, 4, 4, 1), 9, np.uint8), U8_PNG)
    assert read_image(image).frames.max() == 9
    transform = tmp_path / ("t" * (limit - 5) + ".json")
    assert load_transform(save_transform(transform, np.eye(3))).matrix.shape == (3, 3)
    assert files(tmp_path) == sorted([image.name, transform.name])
    too_long = tmp_path / ("a" * (limit - 3) + ".png")
    with pytest.raises(OSError, match=f"its name is {limit + 1} bytes long, the file system takes at most {limit}"):
        write_frames(too_long, np.zeros((1, 4, 4, 1), np.uint8), U8_PNG)
    with pytest.raises(OSError, match=f"its name is {limit + 1} bytes long"):
        OutputFiles().check(too_long)
    assert files(tmp_path) == sorted([image.name, transform.name])


@pytest.mark.parametrize("sizes", [[(8, 10), (32, 40), (32, 40)], [(32, 40), (40, 32)], [(32, 40), (32, 40), (40, 32)]])
def test_a_larger_or_turned_page_after_the_frames_is_refused_not_left_out(tmp_path, sizes):
    """Left out as a 'thumbnail' were pages of the data: an 8 x 10 page then two of 32 x 40 read as
    the one 8 x 10 page (a re-audit)."""
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        for height, width in sizes:
            writer.write(np.zeros((height, width), np.uint8))
    with pytest.raises(ImageError, match="has pages of different sizes"):
        read_stack(path)


def test_frames_of_a_hyperstack_and_an_npy_stack_are_named_frames_not_pages(tmp_path):
    """Frame 1 of a 2-channel ImageJ hyperstack (pages 2 and 3) was named 'page 1' in the stack CSV."""
    frames = np.arange(3 * 2 * 16 * 16, dtype=np.uint16).reshape(3, 2, 16, 16)
    tifffile.imwrite(tmp_path / "hyper.tif", frames, imagej=True, metadata={"axes": "TCYX"})
    stack = read_stack(tmp_path / "hyper.tif")
    assert stack.count == 3 and stack.channels == 2
    assert stack.names == [f"hyper.tif frame {k}" for k in range(3)]
    np.save(tmp_path / "stack.npy", frames[:, 0])
    assert read_stack(tmp_path / "stack.npy").names == [f"stack.npy frame {k}" for k in range(3)]


def test_a_bad_frame_of_a_folder_names_the_folder_and_the_frame(tmp_path):
    # the stack was named as its frame's path: "frame '0.png' of stack 'frames/0.png'"
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"stack '.*frames', frame '.*frames/0\.png'"):
        read_stack(folder)


def test_a_path_that_is_no_path_is_named():
    """os.fspath's "expected str, bytes or os.PathLike object, not int" named no argument."""
    with pytest.raises(TypeError, match=r"^read_image\(\): 'path' must be a str or os.PathLike; got int$"):
        read_image(3)
    with pytest.raises(TypeError, match=r"^read_stack\(\): 'path' must be a str or os.PathLike; got float$"):
        read_stack(3.0)


def test_luminance_refuses_what_is_not_real_numbers():
    """A complex image's imaginary part was dropped with only NumPy's ComplexWarning."""
    from tireg.io import luminance

    with pytest.raises(TypeError, match=r"^luminance\(\): 'frames' must be \(\.\.\., H, W, C\) real numbers; got "
                                        r"complex128"):
        luminance(np.ones((4, 4, 3), complex))
    np.testing.assert_allclose(luminance(np.ones((4, 4, 3), np.uint8)), np.ones((4, 4)), rtol=1e-12)


# ----------------------------------------------------------------------------
# audit io: grey with a channel axis, alpha, byte order, 1-bit


def test_grey_with_a_channel_axis_is_written_as_grey_to_png_jpeg_and_tiff(tmp_path):
    """An (H, W, 1) .npy (and an (N, H, W, 1) stack) was refused by imageio ("one color channel") and
    by tifffile (planarconfig 'contig' for one sample), after the work and naming no file."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 1), dtype=np.uint8)
    np.save(tmp_path / "g1.npy", pixels)
    image = read_image(tmp_path / "g1.npy")
    assert image.format.channel_axis and image.channels == 1
    for name in ("g1.png", "g1.tif"):
        write_frames(tmp_path / name, image.frames, image.format)
        np.testing.assert_array_equal(read_image(tmp_path / name).frames, image.frames)
    with Image.open(tmp_path / "g1.png") as png:
        assert png.mode == "L"
    write_frames(tmp_path / "g1.jpg", image.frames, image.format)
    with Image.open(tmp_path / "g1.jpg") as jpeg:
        assert jpeg.mode == "L" and jpeg.size == (7, 5)
    assert np.abs(read_image(tmp_path / "g1.jpg").frames.astype(int) - image.frames).max() <= 8  # lossy
    stack = np.random.default_rng(1).random((3, 5, 7, 1)).astype(np.float32)
    write_frames(tmp_path / "stack.tif", stack, ImageFormat("npy", stack.dtype, True))
    np.testing.assert_array_equal(read_stack(tmp_path / "stack.tif").frames, stack)
    write_frames(tmp_path / "again.npy", image.frames, image.format)  # an .npy keeps its channel axis
    assert np.load(tmp_path / "again.npy").shape == (5, 7, 1)


def test_a_big_endian_16_bit_npy_is_written_as_a_16_bit_grey_png(tmp_path):
    """'>u2' is not np.uint16 by ==: it was refused, 'PNG cannot hold 1-channel >u2 pixels: it holds 8-bit
    images and 16-bit grey', which it was."""
    pixels = (np.arange(35).reshape(5, 7) * 1000).astype(">u2")
    np.save(tmp_path / "be16.npy", pixels)
    image = read_image(tmp_path / "be16.npy")
    assert image.format.dtype == np.dtype(">u2")
    write_frames(tmp_path / "be16.png", image.frames, image.format)
    assert struct.unpack("B", (tmp_path / "be16.png").read_bytes()[24:25]) == (16,)  # IHDR bit depth
    back = read_image(tmp_path / "be16.png").frames[0, :, :, 0]
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, pixels)
    warped = image.frames.astype(np.float64) + 0.4  # a float result, converted to the format's '>u2'
    write_frames(tmp_path / "float.png", warped, image.format)
    np.testing.assert_array_equal(read_image(tmp_path / "float.png").frames[0, :, :, 0], pixels)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_1_bit_image_is_written_back_as_1_bit(tmp_path, suffix):
    """A 1-bit PNG (or TIFF) came back as 8-bit grey 0/255, read again as uint8, not bool."""
    mask = np.zeros((16, 21), bool)
    mask[4:12, 5:15] = True
    Image.fromarray(mask).save(tmp_path / f"mask{suffix}")  # Pillow's mode "1"
    image = read_image(tmp_path / f"mask{suffix}")
    assert image.format.dtype == np.bool_
    write_frames(tmp_path / f"out{suffix}", image.frames, image.format)
    with Image.open(tmp_path / f"out{suffix}") as written:
        assert written.mode == "1"
    back = read_image(tmp_path / f"out{suffix}").frames
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back[0, :, :, 0], mask)
    warped = image.frames.astype(np.float64) * 0.8  # a float result: > 0.5 is set
    write_frames(tmp_path / f"float{suffix}", warped, image.format)
    np.testing.assert_array_equal(read_image(tmp_path / f"float{suffix}").frames[0, :, :, 0], mask)


def test_associated_alpha_written_to_png_is_unpremultiplied(tmp_path):
    """A premultiplied (ASSOCALPHA) TIFF written as PNG kept its premultiplied colour: PNG's alpha is
    straight, so every semi-transparent pixel showed too dark ((100, 50, 20) at alpha 128, not (199, 100, 40))."""
    pixels = np.array([[[100, 50, 20, 128], [0, 0, 0, 0], [1, 1, 1, 2]],
                       [[30, 60, 90, 255], [200, 0, 0, 100], [7, 7, 7, 0]]], np.uint8)
    tifffile.imwrite(tmp_path / "assoc.tif", pixels, photometric="rgb", extrasamples=[1])  # ASSOCALPHA
    image = read_image(tmp_path / "assoc.tif")
    assert image.format.alpha == "associated"
    write_frames(tmp_path / "assoc.png", image.frames, image.format)
    with Image.open(tmp_path / "assoc.png") as png:
        assert png.mode == "RGBA"
        written = np.asarray(png)
    expected = [[[199, 100, 40, 128], [0, 0, 0, 0], [128, 128, 128, 2]],  # 127.5 rounds to even
                [[30, 60, 90, 255], [255, 0, 0, 100], [0, 0, 0, 0]]]  # 510 clipped; alpha 0: colour 0
    np.testing.assert_array_equal(written, expected)
    write_frames(tmp_path / "float.png", image.frames.astype(np.float64), image.format)  # a warped result
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "float.png")), expected)
    write_frames(tmp_path / "again.tif", image.frames, image.format)  # a TIFF keeps it premultiplied
    assert _extrasamples(tmp_path / "again.tif") == (1,)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "again.tif"), pixels)


@pytest.mark.parametrize("function, name, layout", [(to_chw, "frame", r"\(H, W, C\)"), (from_chw, "image", r"\(C, H, W\)")])
def test_chw_conversions_name_what_is_no_three_axis_array(function, name, layout):
    """to_chw(None) raised NumPy's "AxisError: source: axis -1 is out of bounds for array of dimension 0"."""
    caller = function.__name__
    with pytest.raises(TypeError, match=rf"^{caller}\(\): '{name}' must be an array {layout}; got NoneType$"):
        function(None)
    with pytest.raises(ValueError, match=rf"^{caller}\(\): '{name}' must be an array {layout}; got shape \(3, 4\)$"):
        function(np.zeros((3, 4)))
    frames = np.zeros((4, 5, 3))
    assert function(frames).base is frames  # a view, as before


def test_convert_dtype_names_a_dtype_numpy_does_not_know():
    """convert_dtype(x, "abc") raised NumPy's "data type 'abc' not understood", and None values an
    error from NumPy's comparison."""
    with pytest.raises(TypeError, match=r"^convert_dtype\(\): 'dtype' must be a NumPy dtype; got 'abc'$"):
        convert_dtype(np.zeros(3), "abc")
    with pytest.raises(TypeError, match=r"^convert_dtype\(\): 'values' must be real numbers; got object$"):
        convert_dtype(None, np.uint8)
    assert convert_dtype(np.array([0.2, 300.0]), "uint8").tolist() == [0, 255]


def test_a_file_that_cannot_be_read_is_named_with_its_reason(tmp_path):
    """``Path.exists()`` is false for any error: a loop of symbolic links read "no such file"."""
    with pytest.raises(FileNotFoundError, match=r"^no such file: '.*absent\.png' \(fixed image\)$"):
        read_image(tmp_path / "absent.png", what="fixed image")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match=r"folder\.png' is a folder, not an image file \(fixed image\)$"):
        read_image(tmp_path / "folder.png", what="fixed image")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"zero\.png' is an empty file \(0 bytes\) \(fixed image\)$"):
        read_image(tmp_path / "zero.png", what="fixed image")
    os.symlink(tmp_path / "loop2.png", tmp_path / "loop1.png")
    os.symlink(tmp_path / "loop1.png", tmp_path / "loop2.png")
    with pytest.raises(ImageError, match=r"^cannot open '.*loop1\.png' \(fixed image\): Too many levels of symbolic "
                                         r"links$"):
        read_image(tmp_path / "loop1.png", what="fixed image")


def test_a_reason_is_cut_at_a_newline_only():
    """The first line of a reader's message: ``str.splitlines()`` also cut at a form feed or U+2028,
    which a file's name may hold, and the reason named half the file."""
    from tireg.io import _reason

    name = "'a\x0cb\u2028c\x85d.png'"
    assert _reason(OSError(f"cannot identify {name}\r\nmore")) == f"cannot identify {name}"
    assert _reason(ValueError("first\rsecond")) == "first" and _reason(ValueError("  ")) == "ValueError"


def test_public_helpers_name_a_bad_path_format_nan_or_no_channel(tmp_path):
    from tireg.io import format_for_path, luminance

    grey = np.zeros((2, 2, 1), np.uint8)
    with pytest.raises(TypeError, match=r"write_image\(\): 'image_format' must be a tireg.io.ImageFormat"):
        write_image(tmp_path / "a.png", grey, None)  # had raised "'NoneType' object has no attribute 'dtype'"
    with pytest.raises(TypeError, match=r"write_frames\(\): 'image_format'"):
        write_frames(tmp_path / "a.png", grey[None], "png")
    with pytest.raises(TypeError, match=r"write_image\(\): 'path' must be a str or os.PathLike; got NoneType"):
        write_image(None, grey, ImageFormat("png", np.dtype("uint8")))
    with pytest.raises(TypeError, match=r"format_for_path\(\): 'path' must be a str or os.PathLike"):
        format_for_path(None)
    assert not any(tmp_path.iterdir())
    for dtype in (np.uint8, np.int8, np.bool_):  # NaN had become 0 (False) with NumPy's warning at most
        with pytest.raises(ValueError, match=r"convert_dtype\(\): 'values' hold NaN"):
            convert_dtype(np.array([np.nan, 1.4]), np.dtype(dtype))
    assert convert_dtype(np.array([np.inf, -np.inf, 3.6]), np.dtype(np.uint8)).tolist() == [255, 0, 4]  # clipped
    assert np.isnan(convert_dtype(np.array([np.nan]), np.dtype(np.float32))).all()  # a float type holds NaN
    with pytest.raises(ValueError, match=r"luminance\(\): 'frames' has no channel"):
        luminance(np.ones((2, 2, 0)))  # had been NaN, with "Mean of empty slice"


def test_a_hyperstack_with_time_and_depth_warns_that_both_are_frames(tmp_path):
    # a TZCYX hyperstack became 4 x 3 frames, each registered on its own, with no word (microscopy audit)
    stack = np.arange(4 * 3 * 2 * 8 * 8, dtype=np.uint16).reshape(4, 3, 2, 8, 8)
    tifffile.imwrite(tmp_path / "tz.tif", stack, imagej=True, metadata={"axes": "TZCYX"})
    with pytest.warns(UserWarning, match=r"its axes T \(time\) 4 x Z \(depth\) 3 are all read as frames, 12 in all "
                                         r"\(frame t x 3 \+ z\), each registered on its own \(a TIFF output gets "
                                         r"the axes back as an ImageJ hyperstack\)"):
        image = read_image(tmp_path / "tz.tif", frames=True)
    assert image.frames.shape == (12, 8, 8, 2)
    assert np.array_equal(image.frames[1 * 3 + 2], np.moveaxis(stack[1, 2], 0, -1))  # t = 1, z = 2
    for axes, part in (("ZCYX", stack[0]), ("TCYX", stack[:, 0])):  # one frame axis: frames as ever, no warning
        tifffile.imwrite(tmp_path / f"{axes}.tif", part, imagej=True, metadata={"axes": axes})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_image(tmp_path / f"{axes}.tif", frames=True).frames.shape[0] == part.shape[0]


def test_an_imagej_hyperstack_and_a_tiff_resolution_are_written_back_as_read(tmp_path):
    """Outputs carried no TIFF metadata: an ImageJ TZCYX hyperstack came back as a flat sequence of
    pages of contiguous samples, without its calibration, which Fiji opened as neither (microscopy audit)."""
    from tireg.io import on_grid_of

    stack = np.random.default_rng(4).integers(0, 60000, (4, 3, 2, 8, 10)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "hs.tif", stack, imagej=True, resolution=(5.0, 4.0),
                     metadata={"axes": "TZCYX", "unit": "um", "spacing": 0.5, "finterval": 2.0})
    with pytest.warns(UserWarning, match="are all read as frames"):
        image = read_image(tmp_path / "hs.tif", frames=True)
    assert image.format.frame_axes == (("T", 4), ("Z", 3)) and image.format.resolution == (5.0, 4.0, 1)
    write_frames(tmp_path / "out.tif", image.frames, image.format)
    with tifffile.TiffFile(tmp_path / "out.tif") as written:
        assert written.is_imagej and written.series[0].axes == "TZCYX"
        assert np.array_equal(written.asarray(), stack)
        assert written.pages[0].resolution == (5.0, 4.0)
        meta = written.imagej_metadata
        assert (meta["unit"], meta["spacing"], meta["finterval"]) == ("um", 0.5, 2.0)
    # other frame counts take T alone; one frame, its channels only
    write_frames(tmp_path / "five.tif", image.frames[:5], image.format)
    write_frames(tmp_path / "one.tif", image.frames[:1], image.format)
    for name, axes, shape in (("five.tif", "TCYX", (5, 2, 8, 10)), ("one.tif", "CYX", (2, 8, 10))):
        with tifffile.TiffFile(tmp_path / name) as written:
            assert written.is_imagej and (written.series[0].axes, written.series[0].shape) == (axes, shape), name
    # a dtype ImageJ does not hold (int16) is a plain TIFF, its resolution kept
    signed = replace(image.format, dtype=np.dtype(np.int16))
    write_frames(tmp_path / "signed.tif", image.frames[:2].astype(np.int16) // 2, signed)
    with tifffile.TiffFile(tmp_path / "signed.tif") as written:
        assert not written.is_imagej and written.pages[0].resolution == (5.0, 4.0)
    # a plain TIFF's resolution and unit (inch) are kept; a PNG's format has none
    tifffile.imwrite(tmp_path / "dpi.tif", stack[0, 0, 0], resolution=(300.0, 300.0), resolutionunit="INCH")
    plain = read_image(tmp_path / "dpi.tif")
    write_frames(tmp_path / "dpi-out.tif", plain.frames, plain.format)
    with tifffile.TiffFile(tmp_path / "dpi-out.tif") as written:
        assert written.pages[0].resolution == (300.0, 300.0) and int(written.pages[0].resolutionunit) == 2
        assert not written.is_imagej
    # on another image's grid (register's warped moving image): that grid's pixel size and unit
    grid = ImageFormat("tiff", np.dtype(np.uint16), resolution=(10.0, 10.0, 1), imagej=(("unit", "nm"),))
    moved = on_grid_of(image.format, grid)
    assert moved.resolution == (10.0, 10.0, 1) and dict(moved.imagej)["unit"] == "nm"
    assert dict(moved.imagej)["spacing"] == 0.5 and moved.frame_axes == image.format.frame_axes
    assert on_grid_of(image.format, ImageFormat("png", np.dtype(np.uint8))).resolution is None


def test_a_video_or_animation_suffix_says_to_extract_the_frames():
    # "use .png, .jpg/.jpeg, ..." alone led to a single frame, "at least 2 are needed" (video audit)
    from tireg.io import format_for_path

    for name in ("movie.mp4", "clip.GIF", "a.avi"):
        with pytest.raises(ImageError, match=r"extract its frames into a folder of images or a multi-page TIFF"):
            format_for_path(name)
    with pytest.raises(ImageError) as refused:
        format_for_path("still.bmp")
    assert "extract" not in str(refused.value)


def test_luminance_words_say_what_luminance_takes():
    # one rule for the grey values and for the words the command line prints (a remote-sensing audit:
    # a B, G, R, NIR scene was registered on an RGB luma without a word)
    from tireg.io import luminance, luminance_words

    frames = np.random.default_rng(5).random((2, 3, 6))
    for channels, words in ((1, "its grey values"), (2, "channel 0 of 2"),
                            (3, "the luminance of channels 0-2 (BT.601, as RGB)"),
                            (4, "the luminance of channels 0-2 (BT.601, as RGB; channel 3 left out)"),
                            (5, "the mean of its 5 channels")):
        assert luminance_words(channels) == words
        image = frames[..., :channels]
        changed = image.copy()
        changed[..., -1] += 1.0  # the last channel: counted only where the words count it
        counted = channels == 1 or channels == 3 or channels == 5
        assert np.array_equal(luminance(changed), luminance(image)) is not counted, channels


GEOKEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)  # projected, pixel is area, UTM 33N


def test_a_geotiffs_georeference_and_nodata_are_read_and_written_back(tmp_path):
    """GDAL_NODATA (42113) is ImageFormat.nodata, a number; the GeoTIFF tags (pixel scale, tie point,
    GeoKeys, GDAL's metadata) are kept as read and written back, so GDAL and QGIS place the output."""
    tifffile = pytest.importorskip("tifffile")
    from tireg.io import GEOREFERENCE_TAGS, NODATA_TAG, nodata_text, on_grid_of

    image = np.arange(48 * 40, dtype=np.float32).reshape(48, 40)
    image[:, :5] = -9999
    tags = [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
            (34735, "H", len(GEOKEYS), GEOKEYS, True), (42112, "s", 0, "<GDALMetadata></GDALMetadata>", True),
            (NODATA_TAG, "s", 0, "-9999", True)]
    tifffile.imwrite(tmp_path / "scene.tif", image, extratags=tags)
    read = read_image(tmp_path / "scene.tif")
    assert read.format.nodata == -9999.0
    assert [code for code, _, _ in read.format.georeference] == [33550, 33922, 34735, 42112]
    write_frames(tmp_path / "out.tif", read.frames.astype(np.float64), read.format)
    with tifffile.TiffFile(tmp_path / "out.tif") as written:
        page = written.pages[0]
        assert page.tags[NODATA_TAG].value == "-9999"
        for code in GEOREFERENCE_TAGS:
            assert (code in page.tags) == (code in dict((c, v) for c, _, v in read.format.georeference))
        assert page.tags[33922].value == (0, 0, 0, 500000.0, 4000000.0, 0) and page.tags[34735].value == GEOKEYS
        assert written.geotiff_metadata["ProjectedCSTypeGeoKey"] == 32633
        assert np.array_equal(page.asarray(), image)
    assert read_image(tmp_path / "out.tif").format.georeference == read.format.georeference
    # an image resampled onto another's grid takes that grid's georeference, and keeps its own no-data
    plain = ImageFormat("tiff", np.dtype(np.float32), nodata=0.0)
    assert on_grid_of(plain, read.format).georeference == read.format.georeference
    assert on_grid_of(plain, read.format).nodata == 0.0
    assert on_grid_of(read.format, plain).georeference == ()
    # GDAL's text for the value; NaN is written where it is the no-data value, and refused elsewhere
    assert [nodata_text(v) for v in (-9999.0, 0.0, float("nan"), 0.5, -3.4028234663852886e38)] == [
        "-9999", "0", "nan", "0.5", "-3.4028234663852886e+38"]
    with_nan = image.copy()
    with_nan[:, :5] = np.nan
    nan_format = replace(read.format, nodata=float("nan"))
    write_frames(tmp_path / "nan.tif", with_nan[None, ..., None], nan_format)
    back = read_image(tmp_path / "nan.tif")
    assert np.isnan(back.format.nodata) and np.array_equal(np.isnan(back.frames[0, ..., 0]), np.isnan(with_nan))
    with pytest.raises(ImageError, match="holds NaN or Inf values"):
        write_frames(tmp_path / "no.tif", with_nan[None, ..., None], replace(read.format, nodata=None))
    with pytest.raises(ImageError, match="holds Inf values"):
        write_frames(tmp_path / "no.tif", np.full((1, 8, 8, 1), np.inf), nan_format)
    assert not (tmp_path / "no.tif").exists()


def test_a_gdal_nodata_tag_that_is_no_number_is_left_out_with_a_warning(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "odd.tif", np.ones((16, 16), np.float32), extratags=[(42113, "s", 0, "none?", True)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(tmp_path / "odd.tif").format.nodata is None
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "its GDAL_NODATA tag 'none?' is not a number; no value marks missing data (--nodata V names one)"]


def test_a_jpeg_refusal_names_only_formats_that_hold_the_pixels(tmp_path):
    """Float pixels refused for a JPEG were sent to a PNG, which refused them in turn (docs audit)."""
    for dtype, named in ((np.float32, "write .tif or .npy"), (np.uint16, "write .png, .tif or .npy")):
        image_format = ImageFormat("tiff", np.dtype(dtype))
        with pytest.raises(ImageError, match=rf"JPEG holds 8-bit images, not {np.dtype(dtype)} .*; {named}$"):
            check_writable(tmp_path / "out.jpg", (1, 8, 8, 1), image_format)
        suggested = named.split("write ")[1].split(", ")[0].split(" or ")[0]
        check_writable(tmp_path / f"out{suggested}", (1, 8, 8, 1), image_format)  # the first one named holds them
