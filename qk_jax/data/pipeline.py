r"""The per-stage training input pipeline: manifest -> bucketed batches of NumPy arrays (Grain).

```
records of the stage's tasks  (manifest.open_manifest; bad rows counted when the manifest is read)
 -> host shard (buckets.shard_for_host) -> shuffle (seeded, new order each epoch) -> repeat
    [training stream: one shuffled, endlessly repeated dataset per task, mixed by config.tasks weights]
 -> per record, Grain random_map (a per-record generator seeded by the seed and the record's position):
      decode (Pillow, Image.MAX_IMAGE_PIXELS on: a decompression bomb is a bad record; EXIF orientation applied)
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
``task``              int32 [B]           index into ``manifest.TASKS``
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

import dataclasses
import functools
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from PIL import Image, ImageOps

from qk_jax.data import buckets as buckets_lib
from qk_jax.data import manifest as manifest_lib
from qk_jax.data.manifest import Record, RecordError
from qk_jax.ops import rope

log = logging.getLogger("qk_jax.data")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's image normalisation
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------------------------------------
# The VLM processor the pipeline needs
# ----------------------------------------------------------------------------------------------------------


class VLMProcessor(Protocol):
    """What the pipeline needs from a Qwen2.5-VL processor (``qk_jax.data.processor``, ``ByteProcessor`` or
    ``WordProcessor``).

    It must be picklable (Grain sends it to the worker processes).
    """

    patch_dim: int  # D: channels of one flattened pixel patch (3 * temporal_patch_size * patch_size**2)

    def image_grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of an image of this size; its ``t * h * w`` patches is P."""
        ...

    def __call__(self, prompt: str, images: Sequence[np.ndarray]) -> Mapping[str, np.ndarray]:
        """Tokenises a prompt with its images.

        Args:
          prompt: text in which ``<image k>`` (k = 1..len(images)) appears exactly once per image, where
            that image's tokens go.
          images: uint8 ``[H, W, 3]`` RGB, all of one size.

        Returns:
          ``input_ids`` int ``[T]`` (unpadded), ``pixel_values`` float32 ``[sum of patches, D]`` (images in
          order) and ``image_grid_thw`` int ``[len(images), 3]``.
        """
        ...


class PatchProcessor:
    """The image side of a self-contained Qwen2.5-VL processor; subclasses tokenise the text (``text_ids``).

    Images follow Qwen2-VL's image processor: resized to multiples of ``patch_size * merge_size`` (bicubic),
    normalised with the CLIP mean/std, repeated over ``temporal_patch_size`` frames and flattened patch by patch
    in Qwen's merge-window order; in the text each image is ``<|vision_start|>``, one ``<|image_pad|>`` per merged
    patch, ``<|vision_end|>``.
    """

    def __init__(self, *, patch_size: int, merge_size: int, temporal_patch_size: int, image_token_id: int,
                 vision_start_token_id: int, vision_end_token_id: int, first_special_id: int):
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.image_token_id = image_token_id
        self.vision_start_token_id, self.vision_end_token_id = vision_start_token_id, vision_end_token_id
        self.first_special_id = first_special_id
        self.patch_dim = 3 * temporal_patch_size * patch_size**2

    @staticmethod
    def _kwargs(vlm: Mapping[str, Any]) -> dict[str, int]:
        """The constructor's arguments from ``config.vlm`` (transformers' Qwen2_5_VLConfig names)."""
        vision = vlm["vision"]
        return dict(patch_size=int(vision["patch_size"]), merge_size=int(vision["spatial_merge_size"]),
                    temporal_patch_size=int(vision["temporal_patch_size"]), image_token_id=int(vlm["image_token_id"]),
                    vision_start_token_id=int(vlm["vision_start_token_id"]),
                    vision_end_token_id=int(vlm["vision_end_token_id"]),
                    first_special_id=int(vlm["text"]["bos_token_id"]))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a piece of prompt text (no images in it)."""
        raise NotImplementedError

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        return max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)

    def image_grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        h, w = self._resized(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def _patches(self, image: np.ndarray) -> np.ndarray:
        h, w = self._resized(*image.shape[:2])
        if (h, w) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
        # (x / 255 - mean) / std as one multiply-add.
        x = image * np.float32(1 / 255 / np.asarray(OPENAI_CLIP_STD)) - np.float32(
            np.asarray(OPENAI_CLIP_MEAN) / np.asarray(OPENAI_CLIP_STD))
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, m, m, C, p, p]
        x = np.repeat(np.ascontiguousarray(x)[..., None, :, :], t, axis=5)  # the frame repeated t times
        return x.reshape(gh * gw, self.patch_dim)

    def __call__(self, prompt: str, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        ids: list[int] = []
        grids = []
        for piece in manifest_lib.prompt_segments(prompt, len(images)):
            if isinstance(piece, str):
                ids.extend(self.text_ids(piece))
                continue
            grid = self.image_grid_thw(*images[piece].shape[:2])
            grids.append((piece, grid))
            n = grid[0] * grid[1] * grid[2] // self.merge_size**2
            ids.extend([self.vision_start_token_id] + [self.image_token_id] * n + [self.vision_end_token_id])
        # Patches in the order the images' tokens appear in the prompt: the VLM fills its <|image_pad|> tokens
        # with image features in that order ("<image 2> ... <image 1>" sends image 2 first).
        patches = [self._patches(images[index]) for index, _ in grids]
        return dict(
            input_ids=np.asarray(ids, np.int32),
            pixel_values=(np.concatenate(patches) if patches else np.zeros((0, self.patch_dim), np.float32)),
            image_grid_thw=np.asarray([grid for _, grid in grids], np.int32).reshape(len(grids), 3),
        )


class ByteProcessor(PatchProcessor):
    """A stand-in for the Qwen2.5-VL processor that reads any text: one token per UTF-8 byte.

    A byte at or above the first special token id wraps around: fine for ASCII prompts and vocabularies of
    >= 128 + specials. Images as ``PatchProcessor``. The tests' tiny model reads its prompts this way.
    """

    @classmethod
    def from_config(cls, vlm: Mapping[str, Any]) -> ByteProcessor:
        """From ``config.vlm`` (transformers' Qwen2_5_VLConfig names)."""
        return cls(**cls._kwargs(vlm))

    def text_ids(self, text: str) -> list[int]:
        return [b % self.first_special_id for b in text.encode("utf-8")]


WORD = re.compile(r"\w+|[^\w\s]")  # a word or one punctuation mark: ShapesWorld's prompt tokens
UNKNOWN_WORD_ID = 0


class WordProcessor(PatchProcessor):
    """A word-level stand-in for the Qwen2.5-VL processor, for a closed vocabulary (ShapesWorld's prompts).

    Text is lower-cased and split into words and punctuation marks (``WORD``); word ``i`` of ``vocabulary``
    is token ``i + 1`` and a word outside it is the unknown-word token ``UNKNOWN_WORD_ID`` (0). Qwen's special
    tokens (padding, vision start/end, image pads) keep their ids from ``config.vlm``, above the words. Images
    as ``PatchProcessor``. A ShapesWorld prompt is 2-25 words, against 16-146 bytes for ``ByteProcessor``: the
    VLM's sequence, and its cost, shrink accordingly.

    The ids are the vocabulary's order: a checkpoint is tied to ``config.vlm.vocabulary``, which it stores.
    """

    def __init__(self, *, vocabulary: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = tuple(str(w) for w in vocabulary)
        if len(set(self.vocabulary)) != len(self.vocabulary):
            dupes = sorted({w for w in self.vocabulary if self.vocabulary.count(w) > 1})
            raise ValueError(f"config.vlm.vocabulary repeats {dupes}; list each word once")
        bad = [w for w in self.vocabulary if WORD.fullmatch(w) is None or w != w.lower()]
        if bad:
            raise ValueError(f"config.vlm.vocabulary has entries that are not one lower-case word or punctuation mark: "
                             f"{bad[:8]}")
        if len(self.vocabulary) + 1 > self.first_special_id:
            raise ValueError(f"config.vlm.vocabulary has {len(self.vocabulary)} words, which with the unknown-word id "
                             f"do not fit below the first special token id {self.first_special_id}; raise "
                             "vlm.text.vocab_size and the special ids, or shorten the vocabulary")
        self.ids = {w: i + 1 for i, w in enumerate(self.vocabulary)}

    @classmethod
    def from_config(cls, vlm: Mapping[str, Any]) -> WordProcessor:
        """From ``config.vlm``: its token ids and ``vocabulary`` (a tuple of words)."""
        if "vocabulary" not in vlm:
            raise ValueError("config.vlm.tokenizer='word' needs config.vlm.vocabulary (a tuple of words); "
                             "ShapesWorld's is configs.common.SHAPES_VOCABULARY")
        return cls(vocabulary=tuple(vlm["vocabulary"]), **cls._kwargs(vlm))

    def text_ids(self, text: str) -> list[int]:
        return [self.ids.get(word, UNKNOWN_WORD_ID) for word in WORD.findall(text.lower())]

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the vocabulary (they become the unknown-word token)."""
        return [word for word in WORD.findall(text.lower()) if word not in self.ids]


TOKENIZERS = dict(byte=ByteProcessor, word=WordProcessor)


def processor_from_config(vlm: Mapping[str, Any]) -> PatchProcessor:
    """The stand-in processor ``config.vlm.tokenizer`` names: ``'byte'`` (the default) or ``'word'``.

    What ``make_pipeline`` trains with and ``qk_jax.sample.processor_for`` samples with when no Qwen tokenizer
    folder is given, so training and sampling tokenise a checkpoint's prompts the same way.
    """
    name = str(vlm.get("tokenizer", "byte"))
    if name not in TOKENIZERS:
        raise ValueError(f"config.vlm.tokenizer={name!r}; expected one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name].from_config(vlm)


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------


def open_image(data: bytes, record_id: str, field: str) -> Image.Image:
    """Opens encoded image bytes lazily (header only); bad bytes raise ``RecordError``.

    Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``) stays on: an image above it is ``too_large``.
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
    return image


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied."""
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
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
            want_w, want_h = (width, height) if oriented_size(image) == image.size else (height, width)
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


class MakeSample:
    """The per-record transformation (a Grain ``random_map``): ``(record, rng) -> sample dict | BadRecord``."""

    def __init__(self, settings: SampleSettings, processor: VLMProcessor):
        self.settings, self.processor = settings, processor

    def __call__(self, record: Record | BadRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | BadRecord:
        # Both draws are made for every record, so a record's draws do not depend on its task.
        drop_text = bool(rng.random() < self.settings.drop_text)
        drop_images = bool(rng.random() < self.settings.drop_images)
        if isinstance(record, BadRecord):  # unreadable in the source (a malformed ArrayRecord record)
            return record
        try:
            return self._sample(record, drop_text, drop_images)
        except RecordError as e:
            return BadRecord(e.kind, e.record_id, str(e))

    def _sample(self, record: Record, drop_text: bool, drop_images: bool) -> dict[str, np.ndarray]:
        s = self.settings
        target_image = open_image(record.read(record.target, "target"), record.id, "target")
        size = s.buckets.sizes[s.buckets.assign(*oriented_size(target_image))]
        width, height = size
        target = fit(target_image, size, record.id, "target")
        inputs = []
        for k, inp in enumerate(record.inputs):
            field = f"inputs[{k}].path"
            inputs.append(fit(open_image(record.read(inp.image, field), record.id, field), size, record.id, field))
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
            task=np.int32(manifest_lib.TASKS.index(record.task)),
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

    @classmethod
    def from_config(cls, config: Mapping[str, Any], manifest: str | None = None, **overrides) -> PipelineConfig:
        """From a stage config; ``manifest`` (else ``config.data.manifest``) and ``overrides`` win.

        Reads ``batch_size``, ``tasks``, ``in_context``, ``max_references``, ``cfg_dropout.{text,image}``,
        ``vlm.max_text_tokens``, ``vlm.text.bos_token_id`` (the pad id: Qwen's ``<|endoftext|>``) and
        ``data.{resolution, aspect_ratios, side_multiple}``; optional with defaults: ``data.manifest``,
        ``data.seed`` (else ``seed``, else 0), ``data.workers`` (0), ``data.worker_buffer`` (2),
        ``data.read_threads`` (4), ``data.bucket_buffer`` (lossless), ``data.bucket_max_wait`` (None),
        ``data.text_multiple`` (0: every batch padded to ``max_text_tokens``).
        """
        data = config["data"]
        get = lambda block, key, default: block[key] if key in block else default
        path = manifest or get(data, "manifest", None)
        if not path:
            raise ValueError("no manifest: pass manifest=... or set --config.data.manifest=PATH (a .jsonl file or "
                             "an ArrayRecord folder; ShapesWorld: python -m qk_jax.data.shapes --out DIR)")
        settings = SampleSettings(
            buckets=buckets_lib.Buckets.from_config(data),
            in_context=bool(config["in_context"]),
            max_text_tokens=int(config["vlm"]["max_text_tokens"]),
            pad_token_id=int(config["vlm"]["text"]["bos_token_id"]),
            drop_text=float(config["cfg_dropout"]["text"]),
            drop_images=float(config["cfg_dropout"]["image"]),
        )
        kwargs = dict(
            manifest=path, batch_size=int(config["batch_size"]),
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
      processor: the VLM processor (``make_pipeline`` defaults to ``processor_from_config(config.vlm)``).
      manifest: an opened manifest (default: ``open_manifest(config.manifest)``).
    """

    def __init__(self, config: PipelineConfig, processor: VLMProcessor,
                 manifest: manifest_lib.Manifest | None = None):
        self.config = config
        if config.text_multiple and buckets_lib.host_position(config.process_index, config.process_count)[1] > 1:
            raise ValueError(f"data.text_multiple={config.text_multiple} trims each host's batch to its own text"
                             " length, but every process of a multi-host run must feed one shape; set it to 0")
        self.manifest = manifest or manifest_lib.open_manifest(config.manifest, max_references=config.max_references)
        unknown = [t for t, _ in config.tasks if t not in manifest_lib.TASKS]
        if unknown:
            raise ValueError(f"config.tasks names unknown tasks {unknown}; known: {', '.join(manifest_lib.TASKS)}")
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
        samples = records.random_map(MakeSample(config.settings, processor), seed=config.seed)
        stream = samples.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                           prefetch_buffer_size=max(config.read_threads, 1) * 2))
        num_keys = len(set(config.settings.buckets.sizes)) * (config.max_references + 2)
        buffer = config.buffer_size or buckets_lib.lossless_buffer_size(num_keys, config.batch_size)
        batches = buckets_lib.bucket_batch(stream, batch_size=config.batch_size, buffer_size=int(buffer),
                                           collate_fn=functools.partial(collate, text_multiple=config.text_multiple),
                                           max_wait=config.max_wait,
                                           drop_remainder=config.drop_remainder, drop_fn=bad_kind)
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
        return counts


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


def make_pipeline(config: Mapping[str, Any], processor: VLMProcessor | None = None, *,
                  manifest: str | manifest_lib.Manifest | None = None, **overrides) -> DataPipeline:
    """``DataPipeline`` of a stage config; the processor defaults to ``processor_from_config(config.vlm)``.

    ``manifest`` is a path (else ``config.data.manifest``) or an opened manifest, such as
    ``shapes.ShapesManifest``, which draws ShapesWorld records as they are read.
    """
    processor = processor or processor_from_config(config["vlm"])
    opened = None
    if manifest is not None and not isinstance(manifest, (str, os.PathLike)):
        opened, manifest = manifest, str(getattr(manifest, "name", type(manifest).__name__))
    return DataPipeline(PipelineConfig.from_config(config, manifest=manifest, **overrides), processor, opened)
