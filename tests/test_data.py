"""The bundled images: float values in [0, 1], and clear errors for a wrong name or dtype."""

from __future__ import annotations

import pytest
import torch

import tireg.data as data
from tireg.data import IMAGES, camera, load


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_image_loads_as_float_in_the_unit_range(dtype):
    for name in IMAGES:
        image = load(name, dtype=dtype)
        assert image.dtype == dtype
        assert image.dim() == (3 if name == "immunohistochemistry" else 2)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert float(image.std()) > 0.05  # not a 0/1 mask
        assert torch.equal(getattr(data, name)(dtype=dtype), image)


def test_float64_holds_the_8_bit_values_exactly():
    scaled = camera(dtype=torch.float64) * 255
    assert torch.equal(scaled, scaled.round())
    assert len(scaled.unique()) > 100


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.float16, torch.complex64])
def test_load_refuses_a_dtype_that_is_not_float32_or_float64(dtype):
    # An integer or bool dtype had returned a 0/1 image, complex a complex one.
    with pytest.raises(TypeError, match=rf"^load\(\): 'dtype' must be torch.float32 or torch.float64; got {dtype}$"):
        load("camera", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_load_refuses_a_dtype_string_clearly(dtype):
    # It had reached Tensor.to as a device name: "Invalid device string: 'float32'".
    with pytest.raises(TypeError, match=rf"^load\(\): 'dtype' must be torch.float32 or torch.float64; "
                                        rf"got the string '{dtype}'$"):
        load("camera", dtype=dtype)


def test_a_named_loader_names_itself():
    with pytest.raises(TypeError, match=r"^camera\(\): 'dtype' must be torch.float32 or torch.float64; "
                                        r"got torch.int32$"):
        camera(dtype=torch.int32)


def test_load_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"^load\(\): unknown bundled image 'camera.npz'; choose one of 'astronaut'"):
        load("camera.npz")
    with pytest.raises(TypeError, match=r"^load\(\): 'name' must be a string, one of 'astronaut'.*; got NoneType$"):
        load(None)
