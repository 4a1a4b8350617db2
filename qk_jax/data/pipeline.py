r"""The per-stage training input pipeline: manifest -> bucketed batches of NumPy arrays (Grain).

```
records of the stage's tasks  (manifest.open_manifest; bad rows counted when the manifest is read)
 -> host shard (buckets.shard_for_host) -> shuffle (seeded, new order each epoch) -> repeat
    [training stream: one shuffled, endlessly repeated dataset per task, mixed by config.tasks weights]
 -> per record, Grain random_map (a per-record generator seeded by the seed and the record's position):
      decode (Pillow; an image over data.max_image_pixels, default images.max_pixels_for(resolution), is a bad
      record read from its header, never decoded; EXIF orientation applied)
      -> aspect bucket of the target (buckets.Buckets) -> resize and centre-crop target and inputs to it
      -> classifier-free-guidance dropout: the text with p = cfg_dropout.text, all input images together with
         p = cfg_dropout.image (independent draws)
      -> VLM inputs (a VLMProcessor): prompt with the kept images interleaved, tokens padded to
         vlm.max_text_tokens, pixel patches per image slot
      -> task routing: slot roles for the VAE in-context path (stage 3: source/reference; stages 1-2: none)
 -> buckets.bucket_batch: batches of one (bucket, input count); bad records skipped and counted per kind;
    images wait in the buffer as uint8 (4x smaller) and become float32 in [-1, 1] when a batch is stacked
 -> Grain mp_prefetch (config.data.workers processes; 0 = in this process)
```

Batch schema (dict of NumPy arrays; ``B`` = batch_size; ``H x W`` the bucket; ``M`` the number of input images
of this batch's samples; ``L`` = ``vlm.max_text_tokens``; ``P``, ``D`` the processor's patches per image and
patch size):

====================  ==================  ====================================================================
key                   dtype, shape        meaning
====================  ==================  ====================================================================
``target``            float32 [B,H,W,3]   the image to generate, in [-1, 1]
``inputs``            float32 [B,M,H,W,3] input images in [-1, 1] (zeros where dropped); only when
                                          ``config.in_context`` (stage 3): the VAE encodes them
``roles``             int32 [B,M]         in-context slot roles, ``qk_jax.ops.rope`` codes: ``SOURCE`` (1),
                                          ``REFERENCE`` (2) or ``NONE`` (0: a VLM-only input, an image dropped
                                          for guidance, or any input before stage 3). Feed to
                                          ``rope.in_context_layout(h, w, roles)``
``image_present``     bool [B,M]          the VLM sees slot m (False: dropped for guidance)
``input_ids``         int32 [B,L]         prompt tokens with the kept images' tokens interleaved, right-padded
``attention_mask``    int32 [B,L]         1 on real tokens
``pixel_values``      float32 [B,M,P,D]   pixel patches per image in the order the prompt places them (the
                                          VLM's order; may differ from the slot order of ``roles``/``inputs``),
                                          zeros where dropped
``image_grid_thw``    int32 [B,M,3]       each slot's (t, h, w) patch grid (the bucket's, dropped slots too)
``task``              int32 [B]           index into ``tasks.TASKS``
``record_index``      int64 [B]           the record's position in its manifest
``text_dropped``      bool [B]            the prompt text was dropped for guidance
``images_dropped``    bool [B]            the input images were dropped for guidance
``valid``             bool [B]            False on padding rows (only in a partial batch at the end of a finite
                                          run or a flush of the bucket buffer); mask the loss with it
====================  ==================  ====================================================================

Epochs: ``num_epochs=None`` (training) is an endless stream in which each task's records are reshuffled every
pass and tasks are drawn by ``config.tasks`` weights (Grain's deterministic ``mix``); ``num_epochs=k`` reads the
stage's records exactly k times in shuffled order, weights unused (evaluation, tests, exact epochs).

Bad data never stops a run: a row the manifest rejects (``unparsable``, ``invalid``, ``unknown_task``,
``too_many_references``, ``unsafe_path``) is counted once when the manifest is read; a record whose image is
missing, empty, corrupt or truncated, or too large, or whose prompt is longer than ``L`` tokens is skipped and
counted each time it comes up. ``DataPipeline.metrics(iterator)`` sums both per kind; the first of each kind is
logged (by each reader process) with its record id.

Resume: the iterator's ``get_state()`` is JSON (Grain's, with the bucketer's; see ``buckets``): save it with the
model, rebuild the pipeline from the same config and manifest, ``set_state`` and the batches continue exactly.
Multiprocess prefetch slices the records over workers, so the batch order depends on ``workers``: resume with
the same number. Its workers are spawned processes: a script that builds the pipeline with ``workers > 0`` needs
the ``if __name__ == "__main__":`` guard, and the processor must be picklable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from qk_jax.data import buckets as buckets_lib
from qk_jax.data import manifest as manifest_lib
from qk_jax.data import tasks as tasks_lib
from qk_jax.data.images import configured_max_pixels, fit, open_image, oriented_size
from qk_jax.data.manifest import Record, RecordError
from qk_jax.data.processors import VLMProcessor, image_layout, processor_for
from qk_jax.ops import rope

log = logging.getLogger("qk_jax.data")


# ----------------------------------------------------------------------------------------------------------
# One record -> one sample
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record that could not be made into a sample; the bucketer skips and counts it by ``kind``."""

    kind: str
    record_id: str
    message: str

    def __str__(self) -> str:
        return self.message


def bad_kind(element: Any) -> str | None:
    """``drop_fn`` of the bucketer: the kind of a ``BadRecord``, None for a sample."""
    return element.kind if isinstance(element, BadRecord) else None


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """What turns a record into a sample (``PipelineConfig`` holds the rest)."""

    buckets: buckets_lib.Buckets
    in_context: bool  # stage 3: sources and references also go to the VAE
    max_text_tokens: int
    pad_token_id: int
    drop_text: float
    drop_images: float
    max_pixels: int | None = None  # larger images are too_large before decoding (images.max_pixels_for)


def _draws(settings: SampleSettings, rng: np.random.Generator) -> tuple[bool, bool]:
    """A record's ``(drop_text, drop_images)``: both drawn for every record (its draws do not depend on its task),
    in this order by ``MakeSample`` and ``PlanSample`` alike, so a planned stream decodes to the same samples."""
    return bool(rng.random() < settings.drop_text), bool(rng.random() < settings.drop_images)


def _target(settings: SampleSettings, record: Record) -> tuple[Any, tuple[int, int]]:
    """The target image opened from its header (not decoded) and the bucket size ``(w, h)`` it goes to."""
    image = open_image(record.read(record.target, "target"), record.id, "target", settings.max_pixels)
    return image, settings.buckets.sizes[settings.buckets.assign(*oriented_size(image, record.id, "target"))]


class MakeSample:
    """The per-record transformation (a Grain ``random_map``): ``(record, rng) -> sample dict | BadRecord``."""

    def __init__(self, settings: SampleSettings, processor: VLMProcessor):
        self.settings, self.processor = settings, processor

    def __call__(self, record: Record | BadRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | BadRecord:
        drop_text, drop_images = _draws(self.settings, rng)
        if isinstance(record, BadRecord):  # unreadable in the source (a malformed ArrayRecord record)
            return record
        try:
            return self.sample(record, drop_text, drop_images)
        except RecordError as e:
            return BadRecord(e.kind, e.record_id, str(e))

    def sample(self, record: Record, drop_text: bool, drop_images: bool) -> dict[str, np.ndarray]:
        """The sample of ``record`` with the given dropouts; raises ``RecordError`` for a record that cannot
        make one (``__call__`` turns it into a ``BadRecord``, ``DecodeRows`` into a stand-in row)."""
        s = self.settings
        target_image, size = _target(s, record)
        width, height = size
        target = fit(target_image, size, record.id, "target")
        inputs = []
        for k, inp in enumerate(record.inputs):
            field = f"inputs[{k}].path"
            image = open_image(record.read(inp.image, field), record.id, field, s.max_pixels)
            inputs.append(fit(image, size, record.id, field))
        num = len(inputs)
        kept = [] if drop_images else list(range(num))

        grid = tuple(int(g) for g in self.processor.image_grid_thw(height, width))
        try:
            row = vlm_inputs(self.processor, record.segments(), inputs, kept, drop_text=drop_text,
                             patches=grid[0] * grid[1] * grid[2], max_tokens=s.max_text_tokens,
                             pad_token_id=s.pad_token_id)
        except PromptTooLong as e:
            raise RecordError("too_long", record.id, "prompt", f"{e}; shorten it or raise the limit") from None
        present = row["image_present"]

        codes = {"source": rope.SOURCE, "reference": rope.REFERENCE}
        roles = np.asarray([codes.get(inp.role, rope.NONE) if (s.in_context and present[k]) else rope.NONE
                            for k, inp in enumerate(record.inputs)], np.int32).reshape(num)
        sample = dict(
            target=target,
            roles=roles,
            image_present=present,
            input_ids=row["input_ids"],
            attention_mask=row["attention_mask"],
            pixel_values=row["pixel_values"],
            image_grid_thw=np.tile(np.asarray(grid, np.int32), (num, 1)),
            task=np.int32(tasks_lib.TASKS.index(record.task)),
            record_index=np.int64(record.index),
            text_dropped=np.bool_(drop_text),
            images_dropped=np.bool_(drop_images and num > 0),
        )
        if s.in_context:
            stacked = np.zeros((num, height, width, 3), np.uint8)
            for k in kept:
                stacked[k] = inputs[k]
            sample["inputs"] = stacked
        return sample


@dataclasses.dataclass(frozen=True)
class Planned:
    """A record placed in a global batch before its images are decoded (``data.decode_own_rows``): its bucket size
    ``(w, h)`` from the target's header and the dropout draws ``MakeSample`` would make for it."""

    record: Record
    size: tuple[int, int]
    drop_text: bool
    drop_images: bool


def planned_key(element: Planned) -> tuple:
    """The bucket key of a planned record: its size and input count fix every array's shape in its sample (the
    decoded samples' ``shape_key`` splits a stream the same way)."""
    return element.size, len(element.record.inputs)


class PlanSample:
    """The per-record transformation of a planned stream (a Grain ``random_map``): ``(record, rng) -> Planned |
    BadRecord`` from the target image's header alone, with ``MakeSample``'s draws (the same rng, the same order):
    every process plans the whole global stream at the cost of reading headers, and decodes only its rows."""

    def __init__(self, settings: SampleSettings):
        self.settings = settings

    def __call__(self, record: Record | BadRecord, rng: np.random.Generator) -> Planned | BadRecord:
        drop_text, drop_images = _draws(self.settings, rng)
        if isinstance(record, BadRecord):
            return record
        try:
            _, size = _target(self.settings, record)
        except RecordError as e:
            return BadRecord(e.kind, e.record_id, str(e))
        return Planned(record, size, drop_text, drop_images)


def planned_batch(elements: Sequence[Planned], batch_size: int) -> tuple[list[Planned], np.ndarray]:
    """The bucketer's ``collate_fn`` for planned records: the global batch padded with copies of its first
    record (as ``stack_and_pad`` pads samples) and ``valid`` ``[batch_size]``."""
    return list(elements) + [elements[0]] * (batch_size - len(elements)), np.arange(batch_size) < len(elements)


def _blank_like(planned: Planned) -> Record:
    """A record of ``planned``'s shapes (its bucket size, its inputs and roles) with black images and no prompt:
    what a batch whose every row failed to decode feeds, masked."""
    buffer = io.BytesIO()
    Image.new("RGB", planned.size).save(buffer, format="PNG")
    blank = buffer.getvalue()
    record = planned.record
    return dataclasses.replace(record, id=f"{record.id}#blank", prompt="", target=blank,
                               inputs=tuple(dataclasses.replace(inp, image=blank) for inp in record.inputs))


class DecodeRows:
    """Decodes this process's ``rows`` of each planned global batch into the batch it feeds.

    A row whose images fail to decode (past a readable header: truncated or corrupt pixels, a prompt too long)
    cannot be dropped, since every process must feed its rows of the same global batch: it becomes a copy of a
    decoded row with ``valid`` False (the loss ignores it), counted by kind in ``skipped`` (this process's, not
    kept across a restart). The copy is of the global batch's first row that decodes, whichever process owns it
    (so the batch does not depend on the process count), else (no row decodes) a blank sample of the batch's
    shapes (``_blank_like``).
    """

    def __init__(self, make: MakeSample, rows: tuple[int, int], text_multiple: int = 0, threads: int = 1):
        self.make, self.rows, self.text_multiple, self.threads = make, rows, text_multiple, max(int(threads), 1)
        self.skipped: dict[str, int] = {}
        self._pool = None  # made on first use, in the process that decodes (a Grain worker's own)

    def __getstate__(self) -> dict[str, Any]:  # pickled into Grain's workers: the thread pool stays behind
        return dict(self.__dict__, _pool=None)

    def _decode(self, planned: Planned) -> dict[str, np.ndarray] | RecordError:
        try:
            return self.make.sample(planned.record, planned.drop_text, planned.drop_images)
        except RecordError as e:
            return e

    def __call__(self, batch: tuple[list[Planned], np.ndarray]) -> dict[str, np.ndarray]:
        entries, valid = batch
        start, stop = self.rows
        if not 0 <= start < stop <= len(entries):
            raise ValueError(f"rows [{start}, {stop}) are not rows of a global batch of {len(entries)}")
        decoded: dict[int, Any] = {}  # a padded batch repeats its first record: decode it once

        def decode(planned: Planned) -> dict[str, np.ndarray] | RecordError:
            if id(planned) not in decoded:
                decoded[id(planned)] = self._decode(planned)
            return decoded[id(planned)]

        # The decoding Grain's read threads do for the other modes (``read_threads``): Pillow releases the GIL.
        distinct = {id(p): p for p in entries[start:stop]}
        if self.threads > 1 and len(distinct) > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)
            decoded.update(zip(distinct, self._pool.map(self._decode, distinct.values())))
        samples = [decode(p) for p in entries[start:stop]]
        ok = np.array([v and not isinstance(x, RecordError) for v, x in zip(valid[start:stop], samples)])
        for planned, x, real in zip(entries[start:stop], samples, valid[start:stop]):
            if isinstance(x, RecordError) and real:  # a padding row repeats a row counted already
                if x.kind not in self.skipped:
                    log.warning("row of %s not decoded (%s): fed as a masked copy of another row; counted",
                                planned.record.id, x)
                self.skipped[x.kind] = self.skipped.get(x.kind, 0) + 1
        if any(isinstance(x, RecordError) for x in samples):
            # The stand-in is the global batch's first row that decodes, whichever process owns it: the same
            # batch for any process count (decoding another process's row only when one of ours failed).
            stand_in = next((x for x in map(decode, entries) if not isinstance(x, RecordError)), None)
            if stand_in is None:  # no row of the global batch decodes: a blank sample of the batch's shapes
                stand_in = self.make.sample(_blank_like(entries[0]), False, False)
            samples = [stand_in if isinstance(x, RecordError) else x for x in samples]
        out = collate(samples, len(samples), self.text_multiple)
        out["valid"] = ok
        return out


class PromptTooLong(ValueError):
    """A prompt whose tokens (with its images') do not fit ``vlm.max_text_tokens``."""


def vlm_inputs(processor: VLMProcessor, pieces: Sequence[str | int], images: Sequence[np.ndarray],
               kept: Sequence[int], *, drop_text: bool, patches: int, max_tokens: int, pad_token_id: int,
               extra_text: str = "") -> dict[str, np.ndarray]:
    """One sample's VLM row, as training's guidance dropout builds it (and the sampler's guidance branches).

    The prompt is ``pieces`` (text and 0-based image indices, ``manifest.prompt_segments``) with the ``kept``
    images at their places (renumbered ``<image 1>``..), the text unless ``drop_text``, then ``extra_text`` (the
    sampler's negative prompt). ``kept`` is every image or none: guidance drops the input images together.
    Returns ``input_ids``/``attention_mask`` ``[max_tokens]`` (right-padded with
    ``pad_token_id``), ``pixel_values`` ``[len(images), patches, D]`` (rows of dropped images are zeros; kept
    rows in prompt order) and ``image_present`` ``[len(images)]``.
    """
    kept = list(kept)
    if kept not in ([], list(range(len(images)))):
        raise ValueError(f"kept={kept}: guidance keeps all {len(images)} input images or none")
    parts = []
    for piece in pieces:
        if isinstance(piece, int):
            if piece in kept:
                parts.append(f"<image {kept.index(piece) + 1}>")
        elif not drop_text:
            parts.append(piece)
    out = processor("".join(parts) + extra_text, [images[k] for k in kept])
    ids = np.asarray(out["input_ids"], np.int32)
    if ids.shape[0] > max_tokens:
        raise PromptTooLong(f"{ids.shape[0]} tokens with its images, over vlm.max_text_tokens={max_tokens}")
    input_ids = np.full((max_tokens,), pad_token_id, np.int32)
    input_ids[: ids.shape[0]] = ids
    num, dim = len(images), processor.patch_dim
    pixel_values = np.zeros((num, patches, dim), np.float32)
    got = np.asarray(out["pixel_values"], np.float32)
    if got.shape != (len(kept) * patches, dim):
        raise ValueError(f"the VLM processor returned pixel_values of shape {got.shape} for {len(kept)} images; its "
                         f"image_grid_thw and patch_dim promise ({len(kept) * patches}, {dim})")
    pixel_values[: len(kept)] = got.reshape(len(kept), patches, dim)
    present = np.zeros((num,), bool)
    present[kept] = True
    return dict(input_ids=input_ids, attention_mask=(np.arange(max_tokens) < ids.shape[0]).astype(np.int32),
                pixel_values=pixel_values, image_present=present)


def trim_text(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Cuts the right-padding columns of ``input_ids``/``attention_mask`` that every row of ``batch`` has, down to
    its longest row rounded up to ``multiple`` (0 or a batch without text: unchanged). Returns ``batch``.

    Exact: padding keys are masked out of every attention and the VLM's M-RoPE positions count valid tokens only,
    so every output at an unpadded position is unchanged; only less padding is computed (ShapesWorld prompts fill
    a third of ``max_text_tokens``, and the MMDiT's text stream computes every position). A batch then has one
    of ``max_text_tokens / multiple`` text lengths: one compilation each.
    """
    if not multiple or "attention_mask" not in batch:
        return batch
    mask = np.asarray(batch["attention_mask"])
    full = mask.shape[1]
    used = np.flatnonzero(mask.any(axis=0))
    longest = int(used[-1]) + 1 if used.size else 1
    keep = min(full, -(-longest // multiple) * multiple)
    for key in ("input_ids", "attention_mask"):
        batch[key] = batch[key][:, :keep]
    return batch


def collate(samples: Sequence[Mapping[str, np.ndarray]], batch_size: int, text_multiple: int = 0
            ) -> dict[str, np.ndarray]:
    """Stacks samples (padding a partial batch, ``valid``), maps uint8 images to float32 [-1, 1] and trims shared
    text padding to a multiple of ``text_multiple`` (``trim_text``; 0 keeps ``max_text_tokens``)."""
    batch = trim_text(buckets_lib.stack_and_pad(samples, batch_size), text_multiple)
    for key in ("target", "inputs"):
        if key in batch:
            batch[key] = batch[key].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if "inputs" in batch:
        batch["inputs"][~batch["image_present"]] = 0.0  # a dropped image is all zeros, as its pixel patches
    return batch


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------


class _Subset:
    """Records ``indices`` of a manifest, as a Grain random-access source."""

    def __init__(self, manifest: manifest_lib.Manifest, indices: Sequence[int]):
        self.manifest, self.indices = manifest, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record | BadRecord:
        try:
            return self.manifest[int(self.indices[i])]
        except RecordError as e:
            return BadRecord(e.kind, e.record_id, str(e))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything the pipeline reads from a stage config (``from_config``), as plain values."""

    manifest: str
    batch_size: int
    tasks: tuple[tuple[str, float], ...]
    settings: SampleSettings
    max_references: int
    seed: int = 0
    num_epochs: int | None = None
    workers: int = 0
    worker_buffer: int = 2
    read_threads: int = 4
    buffer_size: int | None = None  # None: buckets.lossless_buffer_size
    max_wait: int | None = None
    drop_remainder: bool = False
    text_multiple: int = 0  # trim_text; single-process only (every host's batch must have one shape)
    process_index: int | None = None  # None: jax.process_index() (multi-host: each host reads its shard)
    process_count: int | None = None  # None: jax.process_count()
    # (start, stop): plan the whole global stream from image headers and decode only these rows of each global
    # batch (``reading_mode`` "rows"); None: decode every record read.
    decode_rows: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], manifest: str | None = None, **overrides) -> PipelineConfig:
        """From a stage config; ``manifest`` (else ``config.data.manifest``) and ``overrides`` win.

        Reads ``batch_size`` (the global batch: each process gets ``batch_size / process_count``), ``tasks``, ``in_context``, ``max_references``, ``cfg_dropout.{text,image}``,
        ``vlm.max_text_tokens``, ``vlm.text.bos_token_id`` (the pad id: Qwen's ``<|endoftext|>``) and
        ``data.{resolution, aspect_ratios, side_multiple}``; optional with defaults: ``data.manifest``,
        ``data.seed`` (else ``seed``, else 0), ``data.workers`` (0), ``data.worker_buffer`` (2),
        ``data.read_threads`` (4), ``data.bucket_buffer`` (lossless), ``data.bucket_max_wait`` (None),
        ``data.text_multiple`` (0: every batch padded to ``max_text_tokens``), ``data.max_image_pixels`` (the
        largest image decoded: ``images.max_pixels_for(resolution)``), ``data.global_stream``
        (``reads_global_stream``).
        """
        data = config["data"]
        get = lambda block, key, default: block[key] if key in block else default
        path = manifest or get(data, "manifest", None)
        if not path:
            raise ValueError("no manifest: pass manifest=... or set --config.data.manifest=PATH (a .jsonl file or "
                             "an ArrayRecord folder; ShapesWorld: python -m qk_jax.data.make_shapesworld --out DIR "
                             "--num N)")
        settings = SampleSettings(
            buckets=buckets_lib.Buckets.from_config(data),
            in_context=bool(config["in_context"]),
            max_text_tokens=int(config["vlm"]["max_text_tokens"]),
            pad_token_id=int(config["vlm"]["text"]["bos_token_id"]),
            drop_text=float(config["cfg_dropout"]["text"]),
            drop_images=float(config["cfg_dropout"]["image"]),
            max_pixels=configured_max_pixels(data),
        )
        # config.batch_size is the global batch (table 3); each process reads and feeds its own part of it, or
        # every process reads the whole global stream and decodes only its rows (or all, the trainer keeping its
        # rows): reading_mode.
        process, processes = buckets_lib.host_position(overrides.get("process_index"),
                                                       overrides.get("process_count"))
        mode = reading_mode(data, processes)
        if mode != "rows":
            overrides = dict(overrides, decode_rows=None)
        elif overrides.get("decode_rows") is None:  # the trainer passes its mesh's rows; else an even split
            share = int(config["batch_size"]) // processes
            overrides = dict(overrides, decode_rows=(process * share, (process + 1) * share))
        if mode != "own":  # every process reads the whole global stream
            overrides = dict(overrides, process_index=0, process_count=1)
        _, processes = buckets_lib.host_position(overrides.get("process_index"), overrides.get("process_count"))
        global_batch = int(config["batch_size"])
        if global_batch % processes:
            raise ValueError(f"batch_size={global_batch} (the global batch) does not split over {processes} "
                             f"processes; give a multiple of {processes}")
        kwargs = dict(
            manifest=path, batch_size=global_batch // processes,
            tasks=tuple((str(t), float(w)) for t, w in dict(config["tasks"]).items()),
            settings=settings, max_references=int(config["max_references"]),
            seed=int(get(data, "seed", get(config, "seed", 0))),
            workers=int(get(data, "workers", 0)), worker_buffer=int(get(data, "worker_buffer", 2)),
            read_threads=int(get(data, "read_threads", 4)),
            buffer_size=get(data, "bucket_buffer", None), max_wait=get(data, "bucket_max_wait", None),
            text_multiple=int(get(data, "text_multiple", 0)))
        kwargs.update(overrides)
        return cls(**kwargs)


class DataPipeline:
    """A stage's Grain pipeline. ``iter(pipeline)`` gives a checkpointable iterator of batches.

    Args:
      config: a ``PipelineConfig`` (``PipelineConfig.from_config(stage_config, manifest=...)``).
      processor: the VLM processor (``make_pipeline`` defaults to ``processors.processor_for(config)``).
      manifest: an opened manifest (default: ``open_manifest(config.manifest)``).
    """

    def __init__(self, config: PipelineConfig, processor: VLMProcessor,
                 manifest: manifest_lib.Manifest | None = None):
        self.config, self.processor = config, processor
        partial_rows = config.decode_rows is not None and tuple(config.decode_rows) != (0, config.batch_size)
        if config.text_multiple and (partial_rows or buckets_lib.host_position(config.process_index,
                                                                                config.process_count)[1] > 1):
            raise ValueError(f"data.text_multiple={config.text_multiple} trims each host's batch to its own text"
                             " length, but every process of a multi-host run must feed one shape; set it to 0")
        self.manifest = manifest or manifest_lib.open_manifest(config.manifest, max_references=config.max_references)
        unknown = [t for t, _ in config.tasks if t not in tasks_lib.TASKS]
        if unknown:
            raise ValueError(f"config.tasks names unknown tasks {unknown}; known: {', '.join(tasks_lib.TASKS)}")
        weights = {t: w for t, w in config.tasks if w > 0}
        tasks = self.manifest.tasks()
        by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in weights}
        missing = [t for t in weights if not by_task[t]]
        if len(missing) == len(weights):
            raise ValueError(f"manifest {config.manifest} has no records of the stage's tasks {sorted(weights)}")
        if missing:
            log.warning("manifest %s has no records of tasks %s; mixing the others", config.manifest, missing)
        self.task_counts = {t: len(v) for t, v in by_task.items()}
        records = self._records(by_task, weights)
        make = MakeSample(config.settings, processor)
        # Rows mode: the records are bucketed by their headers (every process the same global batches), then each
        # process decodes its rows; else every record read is decoded, then bucketed.
        self.decoder = None if config.decode_rows is None else DecodeRows(make, tuple(config.decode_rows),
                                                                          config.text_multiple, config.read_threads)
        elements = records.random_map(make if self.decoder is None else PlanSample(config.settings),
                                      seed=config.seed)
        stream = elements.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                            prefetch_buffer_size=max(config.read_threads, 1) * 2))
        num_keys = len(set(config.settings.buckets.sizes)) * (config.max_references + 2)
        buffer = config.buffer_size or buckets_lib.lossless_buffer_size(num_keys, config.batch_size)
        batching = (dict(collate_fn=functools.partial(collate, text_multiple=config.text_multiple))
                    if self.decoder is None else dict(key_fn=planned_key, collate_fn=planned_batch))
        batches = buckets_lib.bucket_batch(stream, batch_size=config.batch_size, buffer_size=int(buffer),
                                           max_wait=config.max_wait, drop_remainder=config.drop_remainder,
                                           drop_fn=bad_kind, **batching)
        if self.decoder is not None:
            batches = batches.map(self.decoder)
        if config.workers > 0:
            _absl_flags_parsed()
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=config.workers, per_worker_buffer_size=config.worker_buffer))
        self.dataset = batches

    def _records(self, by_task: Mapping[str, list[int]], weights: Mapping[str, float]) -> grain.MapDataset:
        c = self.config

        def shuffled(indices, salt):
            ds = grain.MapDataset.source(_Subset(self.manifest, indices))
            return buckets_lib.shard_for_host(ds, c.process_index, c.process_count).shuffle(seed=c.seed + salt)

        if c.num_epochs is not None:
            indices = sorted(i for t in weights for i in by_task[t])
            return shuffled(indices, 0).repeat(c.num_epochs)
        parts, mix = [], []
        for salt, task in enumerate(sorted(weights), start=1):
            if by_task[task]:
                parts.append(shuffled(by_task[task], salt).repeat())
                mix.append(weights[task])
        return grain.MapDataset.mix(parts, mix)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def metrics(self, iterator: grain.DatasetIterator | None = None) -> dict[str, int]:
        """Bad records per kind: the manifest's (counted once) plus those the readers skipped so far."""
        counts = {kind: int(self.manifest.problems.get(kind, 0)) for kind in manifest_lib.BAD_KINDS}
        if iterator is not None:
            for kind, n in skipped_counts(iterator.get_state()).items():
                counts[kind] = counts.get(kind, 0) + n
        if self.decoder is not None:  # rows fed masked (this process's, in this process: workers=0)
            for kind, n in self.decoder.skipped.items():
                counts[kind] = counts.get(kind, 0) + n
        return counts


def reads_global_stream(data: Mapping[str, Any], processes: int) -> bool:
    """Whether each of ``processes`` processes reads the whole global stream and keeps its own rows of every batch
    (``data.global_stream``), rather than reading only its own records.

    Every process must feed the same batch shape at every step. Reading its own records, a process buckets them
    its own way: the processes agree only while their records bucket alike, as drawn ShapesWorld's do (one size,
    no bad records). A manifest's aspect ratios and bad records do not, so unset (``None``) means True when
    ``data.manifest`` is set and False otherwise (ShapesWorld, drawn or written to ``data.dir``). The global stream
    gives the same batches for any process count, at ``processes`` times the reading; per-process reading is
    checked at every step (``training.loop``: a clear error, not a hang, when the shapes differ).
    """
    if processes <= 1:
        return False
    value = data["global_stream"] if "global_stream" in data else None
    if value is None:
        return bool(data["manifest"] if "manifest" in data else None)
    return bool(value)


def reading_mode(data: Mapping[str, Any], processes: int) -> str:
    """How the processes read (``data.global_stream``, ``data.decode_own_rows``), one of:

    ``"own"``: each process reads, decodes and buckets its own records (one process; or ``global_stream`` off);
    ``"whole"``: every process reads and decodes the whole global stream and keeps its rows (``global_stream``
    with ``decode_own_rows=False``): the same batches for any process count, at that many times the decoding;
    ``"rows"``: every process buckets the whole global stream from the images' headers (``PlanSample``) and
    decodes only its rows (``DecodeRows``): the same batches for any process count, the decoding split. The
    default for a multi-process ``global_stream``; ``decode_own_rows=True`` also asks for it on one process (the
    same batches as a multi-process run, bad records included).
    """
    rows = data["decode_own_rows"] if "decode_own_rows" in data else None
    if rows:
        return "rows"
    if not reads_global_stream(data, processes):
        return "own"
    return "whole" if rows is not None else "rows"


def _absl_flags_parsed() -> None:
    """Grain 0.2.18's ``mp_prefetch`` reads an absl flag; outside ``absl.app.run`` (scripts, tests) the flags are
    unparsed and it raises ``UnparsedFlagAccessError`` once JAX is imported (google/grain#1355, fixed upstream
    later). Marking them parsed keeps their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def skipped_counts(state: Any) -> dict[str, int]:
    """Sums the bucketers' ``dropped`` counters found anywhere in a (multi-worker) iterator state."""
    totals: dict[str, int] = {}
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            dropped = node.get("dropped")
            if isinstance(dropped, Mapping) and "pending" in node:
                for kind, n in dropped.items():
                    totals[kind] = totals.get(kind, 0) + int(n)
            stack.extend(v for k, v in node.items() if k != "dropped")
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return totals


def abstract_batch(config: Mapping[str, Any], batch_size: int, slots: int, processor: VLMProcessor | None = None
                   ) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], tuple[tuple[int, int, int], ...]]:
    """``({key: (shape, dtype)}, image_grid)`` of the entries the model reads from a square bucket at
    ``config.resolution`` with ``slots`` input images and the longest text (the module docstring's schema), and
    the static grid ``vlm_image_grid`` would read from it: what compiling the step ahead of time needs
    (``qk_jax.training.loop.compile_step``)."""
    grid_of, patch_dim = (processor.image_grid_thw, processor.patch_dim) if processor else image_layout(config)
    side, length = int(config["resolution"]), int(config["vlm"]["max_text_tokens"])
    t, h, w = grid_of(side, side)
    b, m = int(batch_size), int(slots)
    out = dict(target=((b, side, side, 3), np.float32), roles=((b, m), np.int32), image_present=((b, m), np.bool_),
               input_ids=((b, length), np.int32), attention_mask=((b, length), np.int32),
               pixel_values=((b, m, t * h * w, patch_dim), np.float32), task=((b,), np.int32),
               valid=((b,), np.bool_))
    if config.get("in_context"):
        out["inputs"] = ((b, m, side, side, 3), np.float32)
    return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in out.items()}, ((t, h, w),) * m


def make_pipeline(config: Mapping[str, Any], processor: VLMProcessor | None = None, *,
                  manifest: str | manifest_lib.Manifest | None = None, **overrides) -> DataPipeline:
    """``DataPipeline`` of a stage config; the processor defaults to ``processors.processor_for(config)``.

    ``manifest`` is a path (else ``config.data.manifest``) or an opened manifest, such as
    ``shapesworld.ShapesManifest``, which draws ShapesWorld records as they are read.
    """
    processor = processor or processor_for(config)
    opened = None
    if manifest is not None and not isinstance(manifest, (str, os.PathLike)):
        opened, manifest = manifest, str(getattr(manifest, "name", type(manifest).__name__))
    return DataPipeline(PipelineConfig.from_config(config, manifest=manifest, **overrides), processor, opened)
