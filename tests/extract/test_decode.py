"""Image decoding on a bad-input corpus made on the fly: exact status for each bad file, exact pixels for odd ones."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from corpus import animated_gif, corrupt_crc, encode, photo, png16_rgb, with_exif_orientation
from PIL import Image, ImageFile

from fcache.extract import decode
from fcache.extract.decode import decode_image, decode_image_bytes, inside_root, read_media
from fcache.extract.sources.base import SampleError
from fcache.spec import Status


def status_of(data: bytes, **kw) -> Status:
    with pytest.raises(SampleError) as e:
        decode_image_bytes(data, name="x", **kw)
    return e.value.status


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return photo(0, 64)


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda a: b"", Status.EMPTY_FILE),
        (lambda a: encode(a, "JPEG")[: len(encode(a, "JPEG")) // 2], Status.TRUNCATED),
        (lambda a: encode(a, "JPEG")[:-2], Status.TRUNCATED),  # no end-of-image marker
        (lambda a: encode(a, "PNG")[: len(encode(a, "PNG")) // 2], Status.TRUNCATED),
        (lambda a: encode(a, "PNG")[:-12], Status.TRUNCATED),  # no IEND chunk: only Image.verify() notices
        (lambda a: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), Status.DECODE_ERROR),
        (lambda a: corrupt_crc(encode(a, "PNG"), b"IDAT"), Status.DECODE_ERROR),  # Pillow alone decodes this
        (lambda a: corrupt_crc(encode(a, "PNG"), b"IHDR"), Status.DECODE_ERROR),
        (lambda a: encode(a, "PCX"), Status.DECODE_ERROR),  # a format outside IMAGE_FORMATS is not opened
    ],
    ids=["zero-byte", "jpeg-half", "jpeg-no-eoi", "png-half", "png-no-iend", "random-bytes", "png-bad-idat-crc", "png-bad-ihdr-crc", "pcx"],
)
def test_bad_images_get_their_status(rgb: np.ndarray, make, status: Status) -> None:
    assert status_of(make(rgb)) == status
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_is_too_large(rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(rgb, "PNG")
    assert status_of(data, max_pixels=64 * 64 - 1) == Status.TOO_LARGE
    assert decode_image_bytes(data, name="x", max_pixels=64 * 64).image.shape == rgb.shape
    filters = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own DecompressionBombWarning is an error too
    assert status_of(data) == Status.TOO_LARGE
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # and its DecompressionBombError (> 2x the limit)
    assert status_of(data) == Status.TOO_LARGE
    assert warnings.filters == filters


def test_cmyk_jpeg_is_converted(rgb: np.ndarray) -> None:
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = decode_image_bytes(encode(cmyk, "JPEG", quality=95), name="x").image
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() < 6  # JPEG loss only: channels not inverted or swapped


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    gray = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    out = decode_image_bytes(encode(Image.fromarray(gray), "PNG"), name="x").image
    assert out.shape == (16, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], gray >> 8)
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200
    rgb16 = np.random.default_rng(1).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    np.testing.assert_array_equal(decode_image_bytes(png16_rgb(rgb16), name="x").image, rgb16 >> 8)


def test_grayscale_becomes_three_equal_channels(rgb: np.ndarray) -> None:
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    out = decode_image_bytes(encode(gray, "PNG"), name="x").image
    assert out.shape == (*gray.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_transparency_is_composited_on_black() -> None:
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 255, 0] + [255, 0, 0] + [0] * 762)  # index 0 green (transparent), 1 red
    pal.putpixel((0, 0), 0)
    out = decode_image_bytes(encode(pal, "PNG", transparency=0), name="x").image
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [255, 0, 0])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, [[255, 0], [51, 102]]
    out = decode_image_bytes(encode(rgba, "PNG"), name="x").image
    np.testing.assert_array_equal(out[..., 0], [[200, 0], [40, 80]])


def test_exif_orientation_6_is_applied_and_returned(rgb: np.ndarray) -> None:
    marked = rgb.copy()
    marked[:8, :8] = [255, 0, 0]  # the stored top-left corner
    d = decode_image_bytes(with_exif_orientation(marked, 6), name="x")
    assert d.orientation == 6
    np.testing.assert_array_equal(d.image, np.rot90(marked, k=-1))  # 6 = rotate 90 degrees clockwise to display
    np.testing.assert_array_equal(d.image[0, -1], [255, 0, 0])  # the stored top-left shows top-right
    jpeg = decode_image_bytes(with_exif_orientation(marked, 6, "JPEG"), name="x")
    raw = np.asarray(Image.open(io.BytesIO(with_exif_orientation(marked, 6, "JPEG"))).convert("RGB"))
    assert jpeg.orientation == 6 and jpeg.image.shape == (rgb.shape[1], rgb.shape[0], 3)
    np.testing.assert_array_equal(jpeg.image, np.rot90(raw, k=-1))
    assert decode_image_bytes(encode(rgb, "PNG"), name="x").orientation == 1


def test_rgb_images_decode_to_the_pixels_of_pillows_rgb_conversion(rgb: np.ndarray) -> None:
    """An RGB image is read as it is (``convert`` would only copy it): the same pixels as Pillow's converted image, in
    a C-contiguous (H, W, 3) uint8 array; other modes still go through ``convert``."""
    for fmt in ("JPEG", "PNG"):
        data = encode(rgb, fmt)
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        got = decode_image_bytes(data, name="x").image
        assert got.dtype == np.uint8 and got.shape == (*rgb.shape[:2], 3) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
    gray = Image.fromarray(rgb[..., 0])  # an L image still goes through convert
    np.testing.assert_array_equal(decode_image_bytes(encode(gray, "PNG"), name="x").image, np.stack([rgb[..., 0]] * 3, axis=-1))


def test_animated_gif_gives_its_first_frame() -> None:
    out = decode_image_bytes(animated_gif(((255, 0, 0), (0, 255, 0), (0, 0, 255))), name="x").image
    assert out.shape == (8, 8, 3)
    assert (out == [255, 0, 0]).all()


def test_paths_escaping_root_are_refused(tmp_path: Path, rgb: np.ndarray) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(encode(rgb, "PNG"))
    (tmp_path / "secret.png").write_bytes(encode(rgb, "PNG"))
    assert decode_image(root / "sub" / "ok.png", root=root).image.shape == rgb.shape
    assert decode_image("sub/../sub/ok.png", root=root).image.shape == rgb.shape
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png", "/etc/hostname"):
        with pytest.raises(SampleError) as e:
            decode_image(bad, root=root)
        assert e.value.status == Status.OUTSIDE_ROOT, bad
    with pytest.raises(SampleError) as e:
        inside_root(root, root.parent / "rootx" / "a.png")  # a sibling sharing the prefix is outside too
    assert e.value.status == Status.OUTSIDE_ROOT


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SampleError) as e:
        decode_image(tmp_path / "empty.jpg")
    assert e.value.status == Status.EMPTY_FILE
    with pytest.raises(SampleError) as e:
        read_media(tmp_path / "missing.jpg")
    assert e.value.status == Status.DECODE_ERROR and "missing.jpg" in e.value.message


def test_files_too_big_to_read_are_refused(tmp_path: Path, rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(rgb, "PNG")
    (tmp_path / "big.png").write_bytes(data)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(SampleError) as e:
        decode_image(tmp_path / "big.png")
    assert e.value.status == Status.TOO_LARGE
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", len(data))
    assert decode_image(tmp_path / "big.png").image.shape == rgb.shape


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_named_as_not_an_image(seed: int) -> None:
    """The message names the real problem (it once read "the image is corrupt (KeyError: 'MPO')")."""
    data = np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    with pytest.raises(SampleError) as e:
        decode_image_bytes(data, name="noise.bin")
    assert e.value.status == Status.DECODE_ERROR and "not a readable image" in e.value.message, e.value.message
    with pytest.raises(SampleError) as e:  # a JPEG marker then noise: a JPEG whose data is missing or corrupt
        decode_image_bytes(b"\xff\xd8\xff" + data, name="noise.jpg")
    assert e.value.status in (Status.TRUNCATED, Status.DECODE_ERROR) and "KeyError" not in e.value.message, e.value.message
