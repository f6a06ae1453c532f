"""Safe image decoding: pixel and side limits before decoding, full load, EXIF orientation, RGB, resize for the model.

The pipeline decodes each image once per stage that needs pixels: the read stage passes the original bytes on, and
each caption stage runs `decode_image`, which fails the row there with the reason (empty, not an image, bomb, too
small, truncated, corrupt). Images are never re-encoded.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from recaption.config import ImageConfig
from recaption.errors import ImageError

# Only formats with pure, well-exercised decoders: EPS would run Ghostscript, and weak signatures (TGA, …) would
# let random bytes "decode" into noise instead of failing.
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "AVIF") if f in Image.OPEN)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\)")

# We check cfg.max_pixels ourselves before decoding; PIL's warning at its own global limit would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class DecodedImage:
    """A decoded image ready for a model, plus what the output row records about it."""

    image: Image.Image  # RGB, longest side ≤ max_side
    width: int  # of the full-resolution image as displayed (after EXIF orientation)
    height: int
    sha256: str  # of the input bytes


def _open_checked(data: bytes, cfg: ImageConfig) -> Image.Image:
    if not data:
        raise ImageError("empty image: 0 bytes")
    im = _open(data)
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise ImageError(f"decompression bomb: {w}x{h} = {w * h:.3g} pixels > max_pixels {cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise ImageError(f"image too small: {w}x{h}, a side is below min_side {cfg.min_side} (images.min_side)")
    return im


def decode_image(data: bytes, cfg: ImageConfig) -> DecodedImage:
    """Decode, check and prepare one image; every problem raises ImageError with a short reason."""
    im = _open_checked(data, cfg)
    w, h = im.size
    fmt = im.format
    target = _fit(w, h, cfg.max_side)
    if target != (w, h) and fmt in ("JPEG", "MPO"):
        # DCT-domain downscaling (1/2 … 1/8) while decoding: far less work and memory for large photos.
        im.draft(None, target)
    _load(im)
    # Only after the checked load: PNG's getexif() loads the pixels itself and a failure there would go unseen.
    orientation = _orientation(im)
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block is no reason to lose the image: keep it as stored
            orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
        target = target[::-1]
    mode = im.mode
    try:
        rgb = to_rgb(im)
    except Exception as e:
        raise ImageError(f"cannot convert mode {mode} to RGB: {e}") from None
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return DecodedImage(image=rgb, width=w, height=h, sha256=hashlib.sha256(data).hexdigest())


def load_rgb(data: bytes) -> Image.Image:
    """Plain decode to RGB, without `decode_image`'s checks (for images this process made itself)."""
    im = Image.open(io.BytesIO(data), formats=FORMATS)
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: transparency composited on white, high bit depths scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    if im.mode.startswith("I") or im.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im)), mode="L").convert("RGB")
    return im.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    # 16-bit images keep their full range 0..65535; 32-bit int or float images are scaled by their own maximum.
    if a.dtype.kind == "f":
        a = np.nan_to_num(a)
        peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0 if a.max(initial=0) <= 255.0 else float(a.max())
        return np.clip(a / peak * 255.0, 0, 255).astype(np.uint8)
    peak = 255 if a.max(initial=0) <= 255 else 65535 if a.max(initial=0) <= 65535 else int(a.max())
    return np.clip(a.astype(np.float64) / peak * 255.0, 0, 255).astype(np.uint8)


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("not an image: cannot identify image file") from None
    except Image.DecompressionBombError as e:
        # PIL's own hard limit (2× its global MAX_IMAGE_PIXELS) fires inside open(), before we see the size.
        m = _BOMB_MESSAGE.search(str(e))
        pixels = f"{int(m.group(1)):.3g} pixels" if m else str(e)
        raise ImageError(f"decompression bomb: {pixels} > PIL's limit {2 * Image.MAX_IMAGE_PIXELS}") from None
    except Exception as e:
        reason = _reason(e)
        if "truncated" in reason.lower() or isinstance(e, EOFError):
            raise ImageError(f"truncated image: {reason}") from None
        raise ImageError(f"corrupt image header: {reason}") from None


def _load(im: Image.Image) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched on PIL's grey filling of truncated images process-wide; we would not notice truncation.
        raise ImageError("cannot check truncation: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process")
    try:
        im.seek(0)
        im.load()
    except Exception as e:
        reason = _reason(e)
        if "truncated" in reason or isinstance(e, EOFError):
            raise ImageError(f"truncated image: {reason}") from None
        raise ImageError(f"corrupt image: {reason}") from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _fit(w: int, h: int, max_side: int) -> tuple[int, int]:
    if max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    text = re.sub(r" \(\d+ bytes not processed\)", "", text)
    return text[:200]
