r"""Input-pipeline throughput in samples per second (a benchmark, not a test).

``run(cases, workers)`` yields the report's lines as it measures; the command is
``python -m qk_jax.data.bench_data [--workers 0 --workers 2] [--batches 30] [--cases shapes ...]``.

Cases, each timed over ``batches`` batches after 3 warm-up batches, for every ``workers`` value:

- ``shapes``: ShapesWorld's stage 3 mixture (``configs/stage3.py:shapes``, batch 16, 64 px, 0-2 inputs) from a
  freshly generated JSONL dataset; the generator's own rate is printed too.
- ``jpeg-t2i`` / ``jpeg-edit``: 512 x 512 JPEG records at paper scale (``configs/stage3.py``, batch 8): t2i (one
  image per sample) and edit (target + source, both also as Qwen2-VL pixel patches), from JSONL files and from
  ArrayRecord shards.
- ``jpeg-rows``: process 0 of 2 on the jpeg-edit records (``pipeline.reading_mode``): decoding the whole global
  batch and keeping its rows (``whole``) against planning from headers and decoding its rows only (``rows``), in
  global samples per second (the rate the run could train at, were this process the limit).

The VLM inputs come from ``ByteProcessor`` (the same image processing as Qwen2-VL's); its byte-level text makes
longer token sequences than a real tokenizer, so ``vlm.max_text_tokens`` is raised to fit.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from qk_jax.data import manifest, pipeline, shapesworld

CASES = ("shapes", "jpeg-t2i", "jpeg-edit", "jpeg-rows")


def _photo(rng: np.random.Generator, size: int) -> bytes:
    """A JPEG with photo-like statistics: smooth colour fields plus texture noise (q 90)."""
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _jpeg_dataset(root: str, num: int, task: str) -> str:
    if os.path.exists(os.path.join(root, f"{task}.jsonl")):  # written by another case of this run
        return os.path.join(root, f"{task}.jsonl")
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    with open(os.path.join(root, f"{task}.jsonl"), "w") as f:
        for i in range(num):
            names = [f"img/{task}_{i}_{k}.jpg" for k in range(2 if task == "edit" else 1)]
            for name in names:
                with open(os.path.join(root, name), "wb") as g:
                    g.write(_photo(rng, 512))
            inputs = [dict(path=names[1], role="source")] if task == "edit" else []
            f.write(json.dumps(dict(task=task, prompt=f"a photo number {i}", target=names[0], inputs=inputs)) + "\n")
    return os.path.join(root, f"{task}.jsonl")


def _rate(config, source: str, workers: int, batches: int) -> float:
    pipe = pipeline.make_pipeline(config, manifest=source, workers=workers)
    it = iter(pipe)
    for _ in range(3):
        next(it)
    start, rows = time.perf_counter(), 0
    for _ in range(batches):
        rows += int(next(it)["valid"].sum())
    rate = rows / (time.perf_counter() - start)
    it.close()
    return rate


def _paper_config(task: str):
    """``configs/stage3.py`` at batch 8 on ``task`` alone, read with the byte-level stand-in (module docstring)."""
    from configs import stage3

    config = stage3.get_config()
    config.batch_size = 8
    config.tasks = {task: 1.0}
    config.vlm.tokenizer = "byte"
    return config


def _global_rate(config, source: str, workers: int, batches: int, **overrides) -> float:
    """Global-batch rows per second that this process keeps up with (it may feed only its share of them)."""
    pipe = pipeline.make_pipeline(config, manifest=source, workers=workers, **overrides)
    it = iter(pipe)
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * int(config.batch_size) / (time.perf_counter() - start)
    it.close()
    return rate


def run(cases: Sequence[str] = CASES, workers: Sequence[int] = (0, 2), batches: int = 30,
        records: int = 1000) -> Iterator[str]:
    """The benchmark's report, one line at a time as each measurement is made (module docstring); ``records``
    per generated dataset, in a temporary folder removed at the end."""
    from configs import stage3

    yield f"{os.cpu_count()} CPUs; samples/s over {batches} batches after 3 warm-up batches"
    with tempfile.TemporaryDirectory() as tmp:
        if "shapes" in cases:
            start = time.perf_counter()
            written = shapesworld.write_dataset(os.path.join(tmp, "shapes"), records, num_test=1)
            elapsed = time.perf_counter() - start
            for split, (num, path) in written.items():
                yield f"{split}: {num} samples -> {path}"
            yield (f"ShapesWorld generator: {(records + 1) / elapsed:.0f} samples/s "
                   "(rendered, PNG-encoded, written)")
            config = stage3.get_config("shapes")
            config.vlm.max_text_tokens = 256
            for n in workers:
                rate = _rate(config, os.path.join(tmp, "shapes/train/manifest.jsonl"), n, batches)
                yield (f"shapes     stage 3 mixture, batch {config.batch_size:3d}, JSONL, workers={n}: "
                       f"{rate:8.1f} samples/s")
        for case in ("jpeg-t2i", "jpeg-edit"):
            if case not in cases:
                continue
            task = case.split("-")[1]
            jsonl = _jpeg_dataset(os.path.join(tmp, "jpeg"), records, task)
            shards = os.path.join(tmp, "jpeg", f"{task}_ar")
            manifest.to_arrayrecord(jsonl, shards)
            config = _paper_config(task)
            for n in workers:
                for kind, source in (("JSONL", jsonl), ("ArrayRecord", shards)):
                    rate = _rate(config, source, n, batches)
                    yield (f"{case:10s} 512x512 JPEG, batch {config.batch_size:3d}, {kind:11s}, workers={n}: "
                           f"{rate:8.1f} samples/s")
        if "jpeg-rows" in cases:
            jsonl = _jpeg_dataset(os.path.join(tmp, "jpeg"), records, "edit")
            config = _paper_config("edit")
            config.data.manifest = jsonl
            for n in workers:
                for mode, decode_own_rows in (("whole", False), ("rows", True)):
                    config.data.decode_own_rows = decode_own_rows
                    rate = _global_rate(config, jsonl, n, batches, process_index=0, process_count=2)
                    yield (f"jpeg-rows  512x512 JPEG edit, global batch {config.batch_size}, process 0 of 2, "
                           f"{mode:5s}, workers={n}: {rate:8.1f} global samples/s")
