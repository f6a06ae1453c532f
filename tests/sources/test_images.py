"""Safe decoding: every bad kind of image fails with its reason; good modes come out RGB and sized for the model."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from recaption.config import ImageConfig
from recaption.errors import ImageError
from recaption.sources.images import decode_image, load_rgb
from tests.data import make_image

CFG = ImageConfig()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but which carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def reason(data: bytes, cfg: ImageConfig = CFG) -> str:
    with pytest.raises(ImageError) as e:
        decode_image(data, cfg)
    return str(e.value)


def test_jpeg_decodes_to_rgb_with_its_size_and_hash():
    data = make_image(7)
    out = decode_image(data, CFG)
    assert out.image.mode == "RGB" and out.image.size == (64, 48) == (out.width, out.height)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.image.tobytes() == load_rgb(data).tobytes()


def test_grey_png_comes_out_rgb():
    data = encode(Image.new("L", (20, 10), 128), "PNG")
    out = decode_image(data, CFG)
    assert out.image.mode == "RGB" and out.image.getpixel((3, 3)) == (128, 128, 128)


def test_truncated_pixels_behind_a_whole_header_fail_the_decode():
    truncated = make_image(3, size=(256, 256))[:1200]
    assert Image.open(io.BytesIO(truncated)).size == (256, 256)  # the header alone looks fine
    with pytest.raises(ImageError, match="truncated image"):
        decode_image(truncated, CFG)


def test_resize_respects_max_side_and_reports_original_size():
    data = make_image(1, size=(400, 100))
    out = decode_image(data, ImageConfig(max_side=64))
    assert out.image.size == (64, 16)
    assert (out.width, out.height) == (400, 100)


def test_large_jpeg_is_downscaled_while_decoding():
    data = make_image(2, size=(2000, 1000))
    out = decode_image(data, ImageConfig(max_side=100))
    assert out.image.size == (100, 50) and (out.width, out.height) == (2000, 1000)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as is, displayed rotated 90° clockwise
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, CFG)
    assert out.image.size == (20, 40) and (out.width, out.height) == (20, 40)
    assert out.image.getpixel((10, 2))[2] > 200  # the stripe is now on top


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "empty image: 0 bytes"),
        (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not an image: cannot identify"),
        (b"<html>not found</html>", "not an image"),
        (make_image(3, size=(256, 256))[:1200], "truncated image: image file is truncated"),
        (make_image(3, size=(256, 256))[:300], "truncated image"),
        (encode(Image.effect_noise((128, 128), 50).convert("RGB"), "PNG")[:2000], "truncated image"),
        (png_header_only(100_000, 100_000), "decompression bomb: 1e+10 pixels"),
    ],
    ids=[
        "zero-bytes",
        "random-bytes",
        "html",
        "truncated-jpeg",
        "truncated-jpeg-header",
        "truncated-png",
        "huge-header",
    ],
)
def test_bad_images_raise_with_reason(data, expected):
    assert expected in reason(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the bomb was decoded"))
    msg = reason(png_header_only(12_000, 10_000), ImageConfig(max_pixels=10_000_000))
    assert msg == "decompression bomb: 12000x10000 = 1.2e+08 pixels > max_pixels 10000000"


def test_min_side():
    assert "image too small: 64x48, a side is below min_side 50" in reason(make_image(0), ImageConfig(min_side=50))


def test_corrupt_png_data():
    data = bytearray(encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG"))
    data[100:140] = b"\xff" * 40  # inside IDAT: CRC and zlib stream both broken
    assert reason(bytes(data)).startswith("corrupt image: broken data stream")


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    out = decode_image(data, CFG)
    r, g, b = out.image.getpixel((8, 8))
    assert out.image.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_to_8_bits():
    im = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, CFG)
    assert out.image.mode == "RGB" and out.image.getpixel((1, 1)) == (155, 155, 155)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode):
    im = Image.new(mode, (8, 8), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    im.putpixel((0, 0), (0, 0, 0, 255) if mode == "RGBA" else (0, 255))
    out = decode_image(encode(im, "PNG"), CFG)
    assert out.image.getpixel((4, 4)) == (255, 255, 255) and out.image.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    data = encode(im, "PNG", transparency=0)
    out = decode_image(data, CFG)
    assert out.image.getpixel((4, 4)) == (255, 255, 255) and out.image.getpixel((0, 0)) == (255, 0, 0)


def test_palette_without_transparency_and_bilevel():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    assert decode_image(encode(im, "GIF"), CFG).image.getpixel((1, 1)) == (0, 255, 0)
    assert decode_image(encode(Image.new("1", (8, 8), 1), "PNG"), CFG).image.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_takes_the_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data, CFG)
    r, g, b = out.image.getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50
    assert out.image.size == (16, 16)
