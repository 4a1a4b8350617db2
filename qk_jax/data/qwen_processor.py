"""The VLM's input processor: a prompt and its images -> ``QwenVL`` inputs (Qwen2.5-VL's processor).

Every image is resized by Qwen's ``smart_resize`` (sides multiples of ``patch * merge``, area within
``[min_pixels, max_pixels]``), normalised with the CLIP mean/std and cut into ``temporal 2 x p x p x 3`` patches by
transformers' torchvision-free ``Qwen2VLImageProcessorPil``. In the prompt, ``<image k>`` (k = 1..n, the
manifest's convention, ``qk_jax.data.manifest.prompt_segments``; images without a placeholder go first) becomes
``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch (``t*h*w / merge**2``) + ``<|vision_end|>``, and the
prompt is wrapped in Qwen's chat format (system turn, user turn, open assistant turn) unless ``chat=False``.

``QwenVLProcessor(prompt, images)`` is one sample, unpadded: the interface ``qk_jax.data.pipeline`` uses (the
``qk_jax.data.processors.VLMProcessor`` protocol; the object pickles, so Grain's worker processes can hold it). ``batch(prompts,
images)`` pads a batch on the left (the default: the kontext queries then follow every prompt directly) or the
right, to the longest prompt or to ``max_length`` (fixed shapes for a jitted step); a longer prompt is an error,
never truncated (a cut would split an image). Images are PIL images, ``HxWx3`` uint8 arrays or paths; paths
open with Pillow's decompression-bomb limit on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from qk_jax.data.manifest import prompt_segments

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen2.5-VL's chat template default
MIN_PIXELS = 56 * 56  # Qwen2.5-VL's preprocessor_config.json
ImageLike = Image.Image | np.ndarray | str | os.PathLike


def chat_prompt(content: str, system: str | None = DEFAULT_SYSTEM) -> str:
    """Qwen's chat format for one user turn, ending where the assistant's answer begins."""
    head = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    return f"{head}{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, an ``HxWx3`` uint8 array or a path (Pillow's pixel limit applies)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as f:  # raises Image.DecompressionBombError past the limit
            return f.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be HxWx3 uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise ValueError(f"unsupported image type {type(image).__name__}; pass a PIL image, an HxWx3 uint8 array or a path")


def image_grid_thw(height: int, width: int, *, patch_size: int, merge_size: int, min_pixels: int = MIN_PIXELS,
                   max_pixels: int) -> tuple[int, int, int]:
    """The ``(t, h, w)`` patch grid of a ``height x width`` image after Qwen's ``smart_resize`` (no tokenizer
    needed: the shapes of ahead-of-time compilation use it too)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    return 1, h // patch_size, w // patch_size


class QwenVLProcessor:
    """Prompt + images -> ``input_ids``, ``pixel_values``, ``image_grid_thw`` (and ``batch`` for padded batches).

    Args:
      tokenizer: a transformers tokenizer with Qwen's special tokens (``<|image_pad|>`` ... as single tokens).
      patch_size, temporal_patch_size, merge_size: the ViT's (``config.vlm.vision``).
      min_pixels, max_pixels: the resize budget per image; ``max_pixels`` should be the model's
        ``vision.max_pixels`` (``from_config`` does that).
      chat: wrap prompts in the chat format; ``system`` is its system turn (None: none).
    """

    def __init__(self, tokenizer: Any, *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = 28 * 28 * 1280, chat: bool = True,
                 system: str | None = DEFAULT_SYSTEM):
        from transformers import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch_size, temporal_patch_size=temporal_patch_size, merge_size=merge_size,
            min_pixels=min_pixels, max_pixels=max_pixels)
        self.patch_size, self.merge_size = patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_dim = 3 * temporal_patch_size * patch_size**2
        self.chat, self.system = chat, system
        self.token_ids = {t: self._special_id(t) for t in (VISION_START, VISION_END, IMAGE_PAD)}
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")

    @classmethod
    def from_pretrained(cls, tokenizer_folder: str | os.PathLike, **kwargs: Any) -> QwenVLProcessor:
        """With the tokenizer saved in a local folder (nothing is downloaded)."""
        from transformers import AutoTokenizer

        if not os.path.isdir(tokenizer_folder):
            raise ValueError(f"{tokenizer_folder}: not a directory; pass a local folder with the tokenizer files")
        return cls(AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True), **kwargs)

    @classmethod
    def from_config(cls, config: Any, tokenizer_folder: str | os.PathLike, **kwargs: Any) -> QwenVLProcessor:
        """Patch sizes and pixel budget from a ``QwenVLConfig``; the tokenizer from a local folder, whose special
        token ids must be the config's."""
        v = config.vision
        kwargs = dict(dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                           merge_size=v.spatial_merge_size, max_pixels=v.max_pixels), **kwargs)
        proc = cls.from_pretrained(tokenizer_folder, **kwargs)
        want = {VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id,
                IMAGE_PAD: config.image_token_id}
        wrong = {t: (proc.token_ids[t], i) for t, i in want.items() if proc.token_ids[t] != i}
        if wrong:
            raise ValueError(f"tokenizer {tokenizer_folder} and the model config disagree on token ids"
                             f" (token: (tokenizer, config)) {wrong}; use the tokenizer the model was trained with")
        return proc

    def _special_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer does not have {token!r} as one token (got ids {ids}); use Qwen2.5-VL's"
                             " tokenizer or add Qwen's special tokens to yours")
        return ids[0]

    def image_grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The ``(t, h, w)`` patch grid of an image of ``height x width`` pixels after ``smart_resize``."""
        return image_grid_thw(height, width, patch_size=self.patch_size, merge_size=self.merge_size,
                              min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def __call__(self, prompt: str, images: Sequence[ImageLike] = ()) -> dict[str, np.ndarray]:
        """One sample, unpadded.

        Returns:
          ``input_ids`` int32 ``[T]``, ``pixel_values`` float32 ``[sum of patches, patch_dim]`` (``[0, patch_dim]``
          without images) and ``image_grid_thw`` int32 ``[len(images), 3]``, both with the images in the order
          their tokens appear in ``input_ids`` (the order the model fills the ``<|image_pad|>`` tokens in): the
          list order when the placeholders are in order, ``<image 2>`` before ``<image 1>`` puts image 2 first.
        """
        pieces = prompt_segments(prompt, len(images))  # raises on a bad <image k>
        order = [p for p in pieces if not isinstance(p, str)]  # images in the order their tokens appear
        pixels, grids = np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int32)
        if images:
            out = self.image_processor(images=[load_image(images[k]) for k in order], return_tensors="np")
            pixels = np.asarray(out["pixel_values"], np.float32)
            grids = np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3)
        text, n_images = [], 0
        for piece in pieces:
            if isinstance(piece, str):
                text.append(piece)
            else:
                n = int(np.prod(grids[n_images])) // self.merge_size**2
                text.append(VISION_START + IMAGE_PAD * n + VISION_END)
                n_images += 1
        text = "".join(text)
        ids = self.tokenizer(chat_prompt(text, self.system) if self.chat else text, add_special_tokens=False)
        ids = np.asarray(ids["input_ids"], np.int32)
        n_pad, want = int((ids == self.token_ids[IMAGE_PAD]).sum()), int(grids.prod(-1).sum()) // self.merge_size**2
        if n_pad != want:
            raise ValueError(f"prompt {prompt!r} tokenizes to {n_pad} {IMAGE_PAD} tokens but its images need {want};"
                             f" does the prompt text itself contain {IMAGE_PAD!r}?")
        return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grids)

    def batch(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]] | None = None, *,
              padding_side: str = "left", max_length: int | None = None) -> dict[str, np.ndarray | None]:
        """A padded batch: ``prompts[b]`` with ``images[b]`` (a list per sample, possibly empty).

        Returns:
          ``input_ids``/``attention_mask`` int32 ``[B, S]``, ``pixel_values`` float32 ``[N, patch_dim]`` of all
          images in batch order (None without images) and ``image_grid_thw`` int64 ``[N, 3]`` (give the model
          ``tuple(map(tuple, image_grid_thw))``).
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings (a batch), got one string")
        images = [[] for _ in prompts] if images is None else [list(x) for x in images]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        samples = [self(p, x) for p, x in zip(prompts, images)]
        rows = [s["input_ids"] for s in samples]
        length = max(map(len, rows)) if max_length is None else max_length
        for b, r in enumerate(rows):
            if len(r) > length:
                raise ValueError(f"prompt {b} is {len(r)} tokens (with its image tokens), more than max_length="
                                 f"{length}; shorten it, use smaller images (max_pixels) or raise max_length")
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            input_ids[b, sl], mask[b, sl] = r, 1
        pixels = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
        return dict(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=np.concatenate(pixels) if pixels else None,
            image_grid_thw=np.concatenate([s["image_grid_thw"] for s in samples]).astype(np.int64),
        )


__all__ = ["QwenVLProcessor", "chat_prompt", "load_image"]
