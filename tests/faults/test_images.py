"""Images are never silently blanked: 16-bit and float pixels are scaled to 8 bits, or refused clearly.

PIL's ``convert("RGB")`` clips instead of scaling: a 16-bit gradient comes out ~99.6 % white and a
float image in [0, 1] all black. Every consumer (training, k-NN, embed) decodes through load_rgb.
"""

import logging

import numpy as np
import pytest
from PIL import Image

from dinotrain.data.augmentations import make_eval_transform
from dinotrain.data.datasets import ImageDecodeError, ImageFolderDataset, load_rgb


def _gradient16() -> np.ndarray:
    """Every 16-bit value 0..65535 once, as a 256 x 256 image."""
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)


def _save16(path, values: np.ndarray, mode="I;16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    if mode != "I;16":  # e.g. big-endian I;16B, or 32-bit I (TIFF)
        img = Image.frombytes(mode, img.size, values.astype(">u2" if mode == "I;16B" else np.int32).tobytes())
    img.save(path)
    return path


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)


def _assert_gray(rgb: np.ndarray, expected: np.ndarray, tol=1):
    assert np.abs(rgb - expected[..., None]).max() <= tol


def test_16bit_png_is_scaled_not_white(tmp_path):
    values = _gradient16()
    path = _save16(tmp_path / "g.png", values)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    rgb = _rgb(load_rgb(path))
    _assert_gray(rgb, values.astype(np.int64) >> 8)
    assert abs(rgb.mean() - 127.5) < 1  # PIL's clipping gives ~254


@pytest.mark.parametrize("mode, suffix", [("I;16B", ".tif"), ("I", ".tif")])
def test_other_16bit_containers_are_scaled(tmp_path, mode, suffix):
    values = _gradient16()
    path = _save16(tmp_path / f"g{suffix}", values, mode)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    _assert_gray(_rgb(load_rgb(path)), values.astype(np.int64) >> 8)


def test_32bit_integers_beyond_16_bits_are_refused_naming_file_and_mode(tmp_path):
    path = tmp_path / "big.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(ImageDecodeError, match=r"big\.tif.*mode I\b.*70000"):
        load_rgb(path)


def test_float_tiff_in_unit_range_is_scaled_by_255(tmp_path):
    values = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = tmp_path / "f.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == "F"
    rgb = _rgb(load_rgb(path))
    _assert_gray(rgb, np.rint(values * 255).astype(np.int64), tol=0)
    assert rgb.max() == 255 and rgb.min() == 0


@pytest.mark.parametrize("values", [[[0.0, 2.5]], [[-0.5, 0.5]], [[0.0, np.nan]]], ids=["above", "below", "nan"])
def test_float_tiff_outside_unit_range_is_refused_naming_file_and_mode(tmp_path, values):
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.array(values, dtype=np.float32)).save(path)
    with pytest.raises(ImageDecodeError, match=r"hdr\.tif.*mode F"):
        load_rgb(path)


def test_ordinary_modes_still_convert_exactly(tmp_path):
    base = Image.new("RGB", (8, 8), (200, 30, 30))
    for mode in ["L", "LA", "P", "RGBA", "CMYK", "1"]:
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        converted = base.convert(mode)
        converted.save(path)
        with Image.open(path) as img:
            expected = img.convert("RGB")
        assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(expected)), mode


def test_image_above_pil_pixel_limit_says_so(tmp_path, monkeypatch):
    path = tmp_path / "a" / "huge.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 pixels > 2 x 500: PIL raises
    with pytest.raises(ImageDecodeError, match=r"1200 pixels.*limit.*MAX_IMAGE_PIXELS = 500") as info:
        load_rgb(path)
    assert "too large" in str(info.value) and "huge.png" in str(info.value)


def test_dataset_skips_too_large_image_with_the_reason_in_the_log(tmp_path, monkeypatch, caplog):
    path = tmp_path / "a" / "huge.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with caplog.at_level(logging.WARNING, logger="dinotrain.data"):
        assert ImageFolderDataset(tmp_path)[0] is None
    assert "huge.png" in caplog.text and "too large: 1200 pixels > limit 1000" in caplog.text
    assert "unreadable" not in caplog.text


def test_training_dataset_and_eval_transform_see_the_scaled_image(tmp_path):
    values = _gradient16()
    _save16(tmp_path / "cls" / "g.png", values)
    expected8 = (values >> 8).astype(np.uint8)

    image, label = ImageFolderDataset(tmp_path)[0]  # transform None: the decoded image itself
    assert label == 0
    _assert_gray(_rgb(image), expected8.astype(np.int64))

    transform = make_eval_transform(resize_size=32, crop_size=32)
    seen, _ = ImageFolderDataset(tmp_path, transform=transform)[0]
    reference = transform(Image.fromarray(expected8).convert("RGB"))
    assert seen.shape == reference.shape == (3, 32, 32)
    assert float((seen - reference).abs().max()) < 0.05  # +-1 grey level after normalisation
    assert float(seen.std()) > 0.5  # a gradient, not a blank image
