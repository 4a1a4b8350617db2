"""Decoding untrusted image bytes: Pillow's pixel limit on, EXIF orientation applied, resized and centre-cropped
to a bucket. Every failure is a ``RecordError`` (a bad record the pipeline skips and counts), never a crash."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from qk_jax.data.manifest import MAX_IMAGE_BYTES, RecordError

_EXIF_ORIENTATION = 0x0112

def max_pixels_for(resolution: int) -> int:
    """The default pixel cap of a pipeline training at ``resolution`` (``data.max_image_pixels``): 64 times the
    bucket area, at least 2048^2. Decoding a larger image costs seconds and gigabytes for pixels that the resize
    to the bucket throws away (a 9000^2 PNG: 3.3 s, +620 MB)."""
    return max(64 * int(resolution) ** 2, 2048**2)


def configured_max_pixels(data: Any) -> int:
    """The pixel cap of a config's ``data`` block: ``data.max_image_pixels``, else ``max_pixels_for`` its
    ``resolution``; the one rule for the training pipeline and for sampling (``Sampler.max_image_pixels``)."""
    given = data["max_image_pixels"] if "max_image_pixels" in data else None
    return int(given or max_pixels_for(data["resolution"]))


def open_image(data: bytes, record_id: str, field: str, max_pixels: int | None = None) -> Image.Image:
    """Opens encoded image bytes lazily (header only); bad bytes raise ``RecordError``.

    Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``) stays on, and ``max_pixels`` lowers it: an image above the
    limit is ``too_large``, refused from its header before its pixels are decoded.
    """
    if not data:
        raise RecordError("empty_image", record_id, field, "the image file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RecordError("too_large", record_id, field, str(e)) from None
    except Exception as e:  # noqa: BLE001 -- any decoder failure on untrusted bytes is a bad record
        raise RecordError("corrupt_image", record_id, field, f"cannot identify the image: {e}") from None
    if image.width <= 0 or image.height <= 0:
        raise RecordError("empty_image", record_id, field, f"image has size {image.width}x{image.height}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise RecordError("too_large", record_id, field, f"{image.width}x{image.height} pixels is over "
                          f"PIL.Image.MAX_IMAGE_PIXELS={limit} (a decompression bomb?)")
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise RecordError("too_large", record_id, field, f"{image.width}x{image.height} pixels is over the "
                          f"{max_pixels:,}-pixel limit (config.data.max_image_pixels)")
    return image


def oriented_size(image: Image.Image, record_id: str = "image", field: str = "image") -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied. Reading the orientation may decode the file (a PNG
    keeps its EXIF in a chunk that can follow the pixels), so damaged data raises ``RecordError`` here too."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as e:  # noqa: BLE001 -- any decoder failure on untrusted bytes is a bad record
        raise RecordError("corrupt_image", record_id, field, f"cannot read the image's orientation: {e}") from None
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def fit(image: Image.Image, size: tuple[int, int], record_id: str, field: str) -> np.ndarray:
    """Decodes, orients, resizes (bicubic, covering) and centre-crops to ``size`` (w, h): uint8 ``[h, w, 3]``.

    JPEGs are decoded at the smallest DCT scale that still covers ``size`` (``Image.draft``). A truncated or
    corrupt file raises ``RecordError`` (``corrupt_image``).
    """
    width, height = size
    try:
        if image.format == "JPEG":  # request the covering size in the stored (pre-rotation) orientation
            stored_w, stored_h = image.size
            upright = oriented_size(image, record_id, field) == image.size
            want_w, want_h = (width, height) if upright else (height, width)
            scale = max(want_w / stored_w, want_h / stored_h)
            image.draft("RGB", (math.ceil(stored_w * scale), math.ceil(stored_h * scale)))
        image = image.convert("RGB")  # decodes the pixels: truncated data fails here
        ImageOps.exif_transpose(image, in_place=True)
        src_w, src_h = image.size
        if (src_w, src_h) != (width, height):
            scale = max(width / src_w, height / src_h)
            crop_w, crop_h = min(src_w, width / scale), min(src_h, height / scale)  # min: float rounding
            left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
            image = image.resize((width, height), Image.Resampling.BICUBIC,
                                 box=(left, top, left + crop_w, top + crop_h))
        return np.asarray(image, dtype=np.uint8)
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 -- truncated/corrupt pixel data on untrusted bytes
        raise RecordError("corrupt_image", record_id, field, f"cannot decode the image: {e}") from None


def check_image(data: bytes, record_id: str, field: str, max_pixels: int | None = None
                ) -> tuple[Image.Image, np.ndarray]:
    """Opens and decodes image bytes as the training pipeline does (``open_image``, ``oriented_size``,
    ``fit`` at the image's own size): ``(the opened image, its upright RGB pixels)``; bad bytes raise
    ``RecordError`` (``empty_image``, ``corrupt_image``, ``too_large``)."""
    if len(data) > MAX_IMAGE_BYTES:
        raise RecordError("too_large", record_id, field, f"{len(data):,} bytes, over the {MAX_IMAGE_BYTES:,}"
                          "-byte limit (qk_jax.data.manifest.MAX_IMAGE_BYTES)")
    image = open_image(data, record_id, field, max_pixels)
    size = oriented_size(image, record_id, field)
    return image, fit(image, size, record_id, field)
