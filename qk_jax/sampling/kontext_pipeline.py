r"""``QueryKontextPipeline``: the sampler behind a diffusers-shaped call, PIL images in and out.

::

    from PIL import Image
    from qk_jax import QueryKontextPipeline

    pipe = QueryKontextPipeline.from_pretrained("runs/shapes/stage3/final")
    [image] = pipe("a red circle at the top left")                      # no input image: t2i
    scene, subject = Image.open("scene.png"), Image.open("subject.png")
    edits = pipe("make the circle green", images=[scene], task="edit", num_images=4, seed=1)
    [image] = pipe("add the subject from image 2 at the top right of image 1", images=[scene, subject],
                   task="subject_edit", guidance_scale=4.0, image_guidance_scale=1.5, num_inference_steps=16)
    edits[0].save("edit_0.png")

It is a thin layer over ``Sampler`` (``qk_jax.sampling.sampler``, whose docstring holds the design: sizes and
buckets, roles, the three guidance branches, noise): a call builds one ``Request`` per prompt, samples them in one
``Sampler.prepare``/``Sampler.run`` batch and wraps the uint8 arrays in ``PIL.Image``s, so it returns exactly
what ``Sampler.sample`` returns for those requests. What the layer adds, and why:

- **diffusers' argument names**: ``num_inference_steps``, ``guidance_scale`` (the text scale, ``cfg_text``),
  ``image_guidance_scale`` (InstructPix2Pix's name for the image scale, ``cfg_image``), ``negative_prompt``,
  ``height``/``width``. ``None`` takes the checkpoint config's ``config.sample`` value, as the CLI does.
- **The task inferred** (``sampler.infer_task``, as ``python -m qk_jax.sample`` without ``--task`` does) from the
  number of input images, narrowed by what the checkpoint can do (``config.max_references``) and was trained for
  (``config.tasks``): no image is ``t2i``; with the stage-3 tasks one image may be an edit's source or a subject's
  reference, and two may be two subjects or a source and a subject, so those need ``task=``, and the ``ValueError``
  names the candidates. A guess would silently give the image the wrong sRoPE role (source: pixels preserved;
  reference: identity carried), which looks like a bad model rather than a wrong argument.
- **Images as users hold them**: ``PIL.Image`` of any mode (EXIF orientation applied, then converted to RGB,
  as ``read_image`` does for a file), uint8 arrays (``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``) or file paths
  (``read_image``: the project's one decoding path).
- **Sizes**: ``height`` and ``width`` go together, and snap to the nearest aspect-ratio bucket at the training
  area as in the CLI (a warning names the bucket); the returned images have the bucket's size.
- **Seeds**: image ``i`` of every prompt starts from ``seed + i`` (``Sampler``), so a call is deterministic
  and ``seed=s + i, num_images=1`` redraws image ``i`` (up to float rounding between batch sizes).

Every image of a call is sampled in one compiled batch (``num_images * len(prompt)`` images): call again with
fewer to bound memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from qk_jax.sampling.sampler import Request, Sampler, read_image

ImageInput = Image.Image | np.ndarray | str | os.PathLike  # what ``images`` takes (``to_rgb``)


def to_rgb(image: ImageInput, index: int, max_pixels: int | None = None) -> np.ndarray:
    """An input image as uint8 ``[H, W, 3]``: a PIL image of any mode is oriented (EXIF) and converted to RGB, a
    uint8 array is read as Pillow reads it (``[H, W]`` grey, ``[H, W, 3]`` RGB, ``[H, W, 4]`` RGBA), a path goes
    through ``read_image`` (refused over ``max_pixels``). ``index`` (from 1) names the image in errors."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"input image {index} is an array of shape {image.shape} {image.dtype}; give uint8 HxW, "
                             "HxWx3 or HxWx4, or a PIL image")
        if image.ndim == 3 and image.shape[-1] == 3:
            return image
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"input image {index} is a {type(image).__name__}; give a PIL image, a uint8 array or a path")
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def _image_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput]:
    """``images`` as a list: ``None`` none, one image (PIL, array ``[H, W(, C)]`` or path) a list of one."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        return [images]
    return list(images)


class QueryKontextPipeline:
    """Text-to-image, editing and subject-driven generation from one Query-Kontext checkpoint, diffusers-style.

    ::

        pipe = QueryKontextPipeline.from_pretrained("runs/shapes/stage3/final")
        images = pipe("make the circle green", images=[Image.open("scene.png")], task="edit", num_images=2)
        images[0].save("edit_0.png")

    Tasks (``qk_jax.data.tasks``) and their ``images``, in order: ``t2i`` none; ``edit`` the source;
    ``custom`` one subject's reference; ``multi`` 2..N references; ``subject_edit`` the source, then 1..N
    references (N = ``config.max_references``). ``task=None`` infers it when the images allow one task only
    (``sampler.infer_task``). ``'<image k>'`` in a prompt places input image ``k`` there (else the images come first).

    Args:
      sampler: the ``Sampler`` it calls (``from_pretrained`` builds one from a model folder).
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, **kwargs: Any) -> QueryKontextPipeline:
        """From a ``save_model`` folder (a stage's ``final/``). ``kwargs`` go to ``Sampler`` (``tokenizer``: a
        local Qwen2.5-VL tokenizer folder; ``progress``: a per-step callback). ``FileNotFoundError`` when the
        folder is not a model, ``CheckpointMismatchError`` (a ``ValueError``) when its params do not fit its config."""
        return cls(Sampler.from_checkpoint(model_dir, **kwargs))

    @property
    def config(self) -> Mapping[str, Any]:
        """The checkpoint's stage config."""
        return self.sampler.config

    @property
    def tasks(self) -> tuple[str, ...]:
        """The sampling tasks the checkpoint was trained on (``config.tasks``), the ones ``task=None`` picks from."""
        return self.sampler.tasks

    def task_for(self, num_images: int, task: str | None = None) -> str:
        """``task`` checked against ``num_images`` input images, or the inferred one (``Sampler.task_for``)."""
        return self.sampler.task_for(num_images, task)

    def __call__(self, prompt: str | Sequence[str], images: ImageInput | Sequence[ImageInput] | None = None, *,
                 task: str | None = None, num_images: int = 1, seed: int = 0,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 image_guidance_scale: float | None = None, negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None) -> list[Image.Image]:
        """Samples ``num_images`` images per prompt; returns them as RGB ``PIL.Image``s, prompt by prompt.

        Args:
          prompt: the instruction, or a list of them (they share ``images`` and the seeds).
          images: the input images in the task's order (PIL, uint8 arrays or paths), or one image.
          task: ``t2i``, ``edit``, ``custom``, ``multi`` or ``subject_edit``; ``None`` infers it (class docstring).
          num_images: images per prompt; image ``i`` starts from noise seed ``seed + i``.
          seed: the first noise seed (same seed, same images).
          num_inference_steps: Euler steps (default ``config.sample.steps``).
          guidance_scale: the text guidance scale ``s_txt`` (default ``config.sample.cfg_text``).
          image_guidance_scale: the image guidance scale ``s_img`` (default ``config.sample.cfg_image``).
          negative_prompt: the text of the unconditional-text branches (default ``config.sample.negative_prompt``).
          height, width: both or neither; snap to the nearest aspect-ratio bucket (default: the source image's for
            ``edit``/``subject_edit``, else square).

        Raises ``ValueError`` for anything the arguments get wrong (task, images, size, seed, counts), ``TypeError``
        for an input image of another type.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt {prompt!r}: give a string or a non-empty list of strings")
        if (height is None) != (width is None):
            raise ValueError(f"height={height}, width={width}: give both or neither (neither: the source image's "
                             "bucket, else the square one)")
        size = None if height is None else (int(width), int(height))
        inputs = tuple(to_rgb(image, k + 1, self.sampler.max_image_pixels)
                       for k, image in enumerate(_image_list(images)))
        task = self.task_for(len(inputs), task)
        requests = [Request(task=task, prompt=p, images=inputs, num_images=num_images, seed=seed,
                            negative_prompt=negative_prompt, cfg_text=guidance_scale, cfg_image=image_guidance_scale)
                    for p in prompts]
        prepared = self.sampler.prepare(requests, size=size, steps=num_inference_steps)
        if size is not None and prepared.size != size:
            logging.warning("size %dx%d snaps to the nearest aspect-ratio bucket: %dx%d", *size, *prepared.size)
        return [Image.fromarray(array) for array in self.sampler.run(prepared)[1]]
