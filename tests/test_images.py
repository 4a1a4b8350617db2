"""Decoding untrusted images: every damaged file is a ``RecordError`` (a counted bad record), never another
exception; non-regular files and oversized files are refused before they are read."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from qk_jax import sampling
from qk_jax.data import images, manifest
from qk_jax.data.manifest import Record, RecordError


def _encoded(fmt: str, exif: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = np.zeros((48, 64, 3), np.uint8) + 255
    pixels[8:40, 10:30] = (220, 30, 30)
    pixels[20:44, 36:60] = rng.integers(0, 255, (24, 24, 3))
    image, buf = Image.fromarray(pixels), io.BytesIO()
    kwargs = {}
    if exif:  # an orientation tag: the decoder must read it (PNG keeps EXIF in a chunk, after the header)
        tags = Image.Exif()
        tags[0x0112] = 6
        kwargs["exif"] = tags.tobytes()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _decode(data: bytes, size=(32, 32)) -> np.ndarray:
    """The pipeline's path for one target: open, oriented size (bucket choice), fit."""
    image = images.open_image(data, "r1", "target")
    images.oriented_size(image, "r1", "target")
    return images.fit(image, size, "r1", "target")


def _damaged(data: bytes, seed: int, count: int) -> list[bytes]:
    """``count`` truncations (every length class, header included) and ``count`` one-bit flips, from ``seed``."""
    rng = np.random.default_rng(seed)
    cuts = sorted(set(int(n) for n in rng.integers(1, len(data), count)))
    out = [data[:n] for n in cuts]
    for _ in range(count):
        flipped = bytearray(data)
        bit = int(rng.integers(0, 8 * len(data)))
        flipped[bit // 8] ^= 1 << (bit % 8)
        out.append(bytes(flipped))
    return out


@pytest.mark.parametrize("fmt, exif", [("PNG", False), ("PNG", True), ("JPEG", False), ("JPEG", True)])
def test_damaged_files_are_bad_records_never_crashes(fmt, exif):
    data = _encoded(fmt, exif)
    assert _decode(data).shape == (32, 32, 3)
    cases = _damaged(data, seed=len(fmt) + exif, count=60)
    assert len(cases) >= 100
    outcomes = {"decoded": 0, "bad": 0}
    for case in cases:
        try:
            assert _decode(case).shape == (32, 32, 3)
            outcomes["decoded"] += 1
        except RecordError as e:
            assert e.kind in ("corrupt_image", "empty_image", "too_large"), e
            outcomes["bad"] += 1
    assert outcomes["bad"] > 0, outcomes  # the damage was real


def test_the_sampler_reads_damaged_files_as_one_usage_message(tmp_path):
    data = _encoded("PNG")  # without EXIF: the orientation read decodes the damaged data (it crashed before)
    for i, case in enumerate(_damaged(data, seed=7, count=25)):
        path = tmp_path / f"{i}.png"
        path.write_bytes(case)
        try:
            assert sampling.read_image(path).ndim == 3
        except ValueError as e:
            assert "is not a readable image" in str(e) and str(path) in str(e)


def test_only_regular_files_of_bounded_size_are_read(tmp_path, monkeypatch):
    (tmp_path / "ok.png").write_bytes(_encoded("PNG"))
    os.mkfifo(tmp_path / "pipe.png")  # opening a FIFO for reading would block until a writer comes
    (tmp_path / "dir.png").mkdir()
    record = Record(id="r", task="t2i", prompt="p", target="ok.png", root=str(tmp_path))
    assert record.read("ok.png")[:4] == b"\x89PNG"
    for name in ("pipe.png", "dir.png"):
        with pytest.raises(RecordError, match="not a regular file") as info:
            record.read(name)
        assert info.value.kind == "missing_file"
    monkeypatch.setattr(manifest, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(RecordError, match="over the 100-byte limit") as info:
        record.read("ok.png")
    assert info.value.kind == "too_large"


def test_an_image_far_larger_than_training_needs_is_refused_from_its_header():
    """A 9000 x 9000 PNG (a few hundred KB) is refused before a pixel is decoded when training is at 512 px."""
    buf = io.BytesIO()
    Image.new("RGB", (9000, 9000), (255, 255, 255)).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 1_000_000
    assert images.max_pixels_for(512) == 64 * 512**2 and images.max_pixels_for(64) == 2048**2
    with pytest.raises(RecordError, match="over the 16,777,216-pixel limit") as info:
        images.open_image(data, "r", "target", images.max_pixels_for(512))
    assert info.value.kind == "too_large"
    assert images.open_image(data, "r", "target").size == (9000, 9000)  # no cap: Pillow's own limit only


def test_check_image_decodes_whole_images_and_names_the_bad_ones():
    """``check_image`` (what ``prepare`` and ``manifest_tool --validate`` decode with): upright RGB pixels of a good
    image; a truncated, empty or oversized one is the pipeline's bad kind."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    image, decoded = images.check_image(data, "r", "target")
    assert image.format == "PNG"
    np.testing.assert_array_equal(decoded, pixels)
    for bad, kind in ((data[: len(data) // 2], "corrupt_image"), (b"", "empty_image")):
        with pytest.raises(RecordError) as e:
            images.check_image(bad, "r", "target")
        assert e.value.kind == kind
    with pytest.raises(RecordError, match="over the 100-pixel limit") as e:
        images.check_image(data, "r", "target", max_pixels=100)
    assert e.value.kind == "too_large"
