"""The text-and-image processors the VLM reads prompts through, and the one place a checkpoint's is chosen.

``VLMProcessor`` is what the pipeline and the sampler need from a Qwen2.5-VL processor. Implementations: Qwen2.5-VL's
own (``qk_jax.data.qwen_processor.QwenVLProcessor``, for a ``save_pretrained`` tokenizer folder) and two
self-contained stand-ins that share its image side (``PatchProcessor``): ``ByteProcessor`` (one token per UTF-8
byte: the tests' tiny model) and ``WordProcessor`` (one token per ShapesWorld word). ``processor_for`` picks one
for training, stage 0, sampling and evaluation alike, from ``config.vlm.tokenizer``:

- ``'byte'`` / ``'word'``: a stand-in (the tests; ShapesWorld);
- a local folder: Qwen2.5-VL's tokenizer (``tokenizer.json`` ..., e.g. the Qwen2.5-VL-7B-Instruct download);
- unset (the paper configs): the folder the model came with, ``<init_from>/final/tokenizer`` (every stage's
  ``final/`` keeps a copy, ``model_files``), else ``config.pretrained.vlm`` if it holds one; neither is an
  error naming the key. Training a pretrained Qwen2.5-VL on a stand-in's ids would be silent nonsense.
The stand-ins are written here because no tokenizer library ships a byte- or closed-vocabulary Qwen-compatible
tokenizer with Qwen2.5-VL's special-token layout.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from qk_jax import storage
from qk_jax.data import (
    qwen_processor,  # it loads transformers only when a processor is made
)
from qk_jax.data.manifest import prompt_segments
from qk_jax.models.qwen_vl import QwenVLConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's image normalisation
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VLMProcessor(Protocol):
    """What the pipeline needs from a Qwen2.5-VL processor (``qk_jax.data.qwen_processor.QwenVLProcessor``,
    ``ByteProcessor`` or ``WordProcessor``).

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
        for piece in prompt_segments(prompt, len(images)):
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
TOKENIZER_DIR = "tokenizer"  # a model folder's copy of its Qwen tokenizer: <final>/tokenizer
# What a transformers tokenizer folder may hold (save_pretrained of a tokenizer or a processor); the first two
# mark one. Weights and model configs are not copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json")
UNSET_TOKENIZER = ("config.vlm.tokenizer is not set, and neither config.init_from's final/tokenizer nor"
                   " config.pretrained.vlm holds a tokenizer: a pretrained Qwen2.5-VL reads Qwen tokens. Pass"
                   " --config.vlm.tokenizer=DIR (a local folder with Qwen2.5-VL's tokenizer.json, e.g. the"
                   " Qwen2.5-VL-7B-Instruct download), or 'byte' / 'word' for a stand-in of a model trained from"
                   " scratch")


def is_tokenizer_folder(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` (a local one or in a bucket) is a directory holding a transformers tokenizer."""
    return bool(folder) and any(storage.exists(storage.join(folder, f)) for f in TOKENIZER_FILES[:2])


def tokenizer_kind(vlm: Mapping[str, Any]) -> str:
    """``'byte'``, ``'word'`` or ``'qwen'``: what ``config.vlm.tokenizer`` tokenises with (no key: ``'byte'``, the
    default of checkpoints older than the key). Stages of one curriculum must agree on it."""
    if "tokenizer" not in vlm:
        return "byte"
    name = vlm["tokenizer"]
    return str(name) if name in TOKENIZERS else "qwen"


def tokenizer_folder(config: Mapping[str, Any]) -> str | None:
    """The Qwen tokenizer folder the config reads prompts with, or None for a stand-in (module docstring)."""
    vlm = config["vlm"]
    name = vlm.get("tokenizer", "byte")
    if name in TOKENIZERS:
        return None
    if name:
        name = os.fspath(name)
        if not is_tokenizer_folder(name):
            raise ValueError(f"config.vlm.tokenizer={name!r} is not 'byte', 'word' or a local folder with a tokenizer"
                             " (tokenizer.json or tokenizer_config.json); for Qwen2.5-VL's, download it first"
                             " (huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir DIR)")
        return name
    init_from = config.get("init_from")
    candidates = [os.path.join(init_from, "final", TOKENIZER_DIR)] if init_from else []
    candidates.append(dict(config.get("pretrained") or {}).get("vlm"))
    for folder in candidates:
        if is_tokenizer_folder(folder):
            return storage.fetch_tree(folder)  # a bucket's (a previous stage's final/): transformers reads local files
    raise ValueError(UNSET_TOKENIZER)


def tokenizer_files(folder: str | os.PathLike, prefix: str = "") -> dict[str, str]:
    """``{prefix + name: path}`` of the tokenizer files (``TOKENIZER_FILES``) that ``folder`` holds."""
    return {prefix + name: os.path.join(folder, name) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(folder, name))}


def model_files(config: Mapping[str, Any]) -> dict[str, str]:
    """The tokenizer files a model folder keeps beside its params (``saved_model.save_model(files=...)``), as
    ``{"tokenizer/<file>": source}``: so that it samples, exports and starts the next stage without the original
    folder. Empty for a stand-in."""
    folder = tokenizer_folder(config)
    return {} if folder is None else tokenizer_files(folder, f"{TOKENIZER_DIR}/")


def image_layout(config: Mapping[str, Any]) -> tuple[Callable[[int, int], tuple[int, int, int]], int]:
    """``(image_grid_thw, patch_dim)`` of the config's processor, without loading a tokenizer: the shapes that
    compiling a step ahead of time needs (``pipeline.abstract_batch``), for a paper config with no tokenizer yet."""
    if tokenizer_kind(config["vlm"]) != "qwen":
        stand_in = processor_from_config(config["vlm"])
        return stand_in.image_grid_thw, stand_in.patch_dim
    vision = QwenVLConfig.from_config(config["vlm"]).vision
    grid = functools.partial(qwen_processor.image_grid_thw, patch_size=vision.patch_size,
                             merge_size=vision.spatial_merge_size, max_pixels=vision.max_pixels)
    return grid, 3 * vision.temporal_patch_size * vision.patch_size**2


def processor_from_config(vlm: Mapping[str, Any]) -> PatchProcessor:
    """The stand-in processor ``config.vlm.tokenizer`` names: ``'byte'`` (the default) or ``'word'``."""
    name = str(vlm.get("tokenizer", "byte"))
    if name not in TOKENIZERS:
        raise ValueError(f"config.vlm.tokenizer={name!r}; expected one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name].from_config(vlm)


def processor_for(config: Mapping[str, Any], tokenizer: str | os.PathLike | None = None) -> VLMProcessor:
    """The VLM processor a model's prompts go through, in training, stage 0, sampling and evaluation: the one place
    that choice is made.

    ``tokenizer`` (a local folder) overrides ``config.vlm.tokenizer`` (module docstring): a model folder's own copy
    (``<final>/tokenizer``) or the user's ``--tokenizer``. A Qwen tokenizer's special token ids and padding id must
    be ``config.vlm``'s (its vision tokens; padding = ``text.bos_token_id``, Qwen's ``<|endoftext|>``).
    """
    folder = tokenizer or tokenizer_folder(config)
    if not folder:
        return processor_from_config(config["vlm"])
    processor = qwen_processor.QwenVLProcessor.from_config(QwenVLConfig.from_config(config["vlm"]), folder)
    pad = int(config["vlm"]["text"]["bos_token_id"])
    if processor.pad_token_id != pad:
        raise ValueError(f"tokenizer {folder} pads with id {processor.pad_token_id} but config.vlm.text.bos_token_id"
                         f" (the padding id) is {pad}; use the tokenizer the model was trained with")
    return processor
