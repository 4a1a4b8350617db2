r"""Sampling: Euler on FLUX's shifted schedule with three-branch classifier-free guidance.

::

    python -m qk_jax.sample --checkpoint /tmp/qk_stage3/final --task edit --prompt "make the circle green" \
        --image scene.png --num-images 4 --out /tmp/edit.png

writes ``/tmp/edit_0.png`` ... ``/tmp/edit_3.png`` and the grid ``/tmp/edit.png``. ``--steps``, ``--cfg-text``,
``--cfg-image`` and ``--negative-prompt`` default to the checkpoint config's ``config.sample`` block.

What a request does (paper section 3, docs/design.md "Flow matching"):

1. **Size.** The requested ``WIDTHxHEIGHT`` snaps to the aspect-ratio bucket of the nearest ratio at the
   training area (``qk_jax.data.buckets``; the CLI prints the snap). Without a size: the source image's bucket
   for ``edit``/``subject_edit``, else the square one. Input images are resized and centre-cropped to the
   bucket exactly as the training pipeline does (``images_lib.fit``).
2. **Roles by task** (``task_roles``): edit = 1 source; custom = 1 reference; multi = 2..N references;
   subject_edit = image 1 the source, the rest references (N = ``config.max_references``); t2i = none. Before
   stage 3 (``config.in_context`` off) the images reach the VLM only, as in training.
3. **Guidance branches**, built on the host the way training's guidance dropout builds its samples
   (``pipeline.MakeSample``), so the model sees at sampling time what it learned from:

   - ``(I, T)``: the prompt with its images; in-context slots carry their roles.
   - ``(I, 0)``: the text dropped: the images keep their places in prompt order, the text is the negative
     prompt (empty by default, which is exactly training's text dropout); slots keep their roles.
   - ``(0, 0)``: text and images dropped: the VLM sees the negative prompt and no image (patches zero,
     ``image_present`` False) and every in-context slot is ``NONE`` (training drops all input images together).

   ``v = v(0,0) + s_img (v(I,0) - v(0,0)) + s_txt (v(I,T) - v(I,0))``, i.e. the weights
   ``(s_txt, s_img - s_txt, 1 - s_img)`` on the three branches. Without input images (t2i) ``(I, 0)`` is the
   unconditional branch ``0`` and the weights are ``(s_txt, 1 - s_txt, 0)``: two-branch guidance
   ``v(0) + s_txt (v(T) - v(0))``. A branch whose weight is zero for every image of a batch is not computed
   (``s_img = 1`` drops ``(0, 0)``; ``s_txt = s_img = 1`` samples with one unguided branch).
4. **Cost.** One compiled call per batch (``generate``): the VLM and connector run once on the ``K`` branch
   rows of every request and the VAE encodes the in-context images once, before the step loop; the loop
   (``lax.fori_loop``) runs one MMDiT forward of batch ``K * B`` per step, the ``K`` branches of the ``B``
   images concatenated, and combines them with the weights. ``Sampler.compile`` compiles it once per shape
   (bucket, input images, branches, images, steps) and model config, into a cache that every ``Sampler`` of
   that config shares (several checkpoints of a run, CLI calls in one process); step progress comes from a
   ``jax.debug.callback`` in the loop (about 2% of a tiny-config step on CPU).
5. **Noise and output.** Image ``i`` of a request with seed ``s`` starts from ``normal(jax.random.key(s + i))``
   (float32, packed latent tokens), so ``--seed s+i --num-images 1`` redraws image ``i`` of a grid (up to float
   rounding between batch sizes). The latents stay float32 through the Euler steps (``flow.euler_step``) while
   the VLM and MMDiT compute in ``config.compute_dtype``; the sigmas are float32. The result is unpacked,
   unscaled, decoded by the VAE in float32 (as training encodes) and mapped from [-1, 1] to uint8.

Parameters: whatever the checkpoint holds; ``qk_jax.train`` saves the EMA weights in place of the trained ones
when it keeps an EMA (its meta then says ``ema: true``, which the CLI prints). The text processor is
``processors.processor_for(config)``: the stand-in tokenizer that ``config.vlm.tokenizer`` names and
``qk_jax.data.pipeline`` trains with (word-level for ShapesWorld, byte-level for the tiny test model), or, given a
tokenizer folder (``--tokenizer``), Qwen2.5-VL's processor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from qk_jax import storage
from qk_jax.data import buckets as buckets_lib
from qk_jax.data import images as images_lib
from qk_jax.data import manifest as manifest_lib
from qk_jax.data import pipeline, processors, tasks
from qk_jax.models import saved_model
from qk_jax.models import vae as vae_lib
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.ops import flow, rope
from qk_jax.pytree import leaf_shapes, shape_differences

BRANCHES = ("image_text", "image", "none")  # (I, T), (I, 0), (0, 0): see the module docstring
# The settings a checkpoint config's ``sample`` block gives (configs/common.py is their one home).
SAMPLE_KEYS = ("steps", "cfg_text", "cfg_image", "negative_prompt")


# ----------------------------------------------------------------------------------------------------------
# Requests and what the host prepares for them
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and its input images; ``num_images`` samples from seeds ``seed, seed + 1, ...``.

    ``images`` are uint8 ``[H, W, 3]`` arrays (or PIL RGB images) of any size, in the task's order
    (``task_roles``). ``None`` settings take the checkpoint config's ``config.sample`` values.
    """

    task: str
    prompt: str
    images: tuple[np.ndarray, ...] = ()
    num_images: int = 1
    seed: int = 0
    negative_prompt: str | None = None
    cfg_text: float | None = None
    cfg_image: float | None = None


def task_roles(task: str, num_images: int, max_references: int) -> tuple[int, ...]:
    """The sRoPE role (``rope.SOURCE``/``rope.REFERENCE``) of each input image of ``task``, in order
    (``qk_jax.data.tasks.sampling_roles``: the source first where the task takes one, then references).

    Raises ``ValueError`` naming the task, the count and the fix when the count does not fit the task.
    """
    roles = tasks.sampling_roles(task, num_images)
    refs = roles.count("reference")
    if refs > max_references:
        raise ValueError(f"task {task} got {refs} reference images but the model takes at most "
                         f"config.max_references={max_references}; pass fewer images")
    return tuple(rope.SOURCE if role == "source" else rope.REFERENCE for role in roles)


def fitting_tasks(num_images: int, max_references: int) -> tuple[str, ...]:
    """The sampling tasks (``tasks.SAMPLING_TASKS``, in order) that take ``num_images`` input images on a model
    with ``max_references``: those for which the sampler's own check (``task_roles``) passes."""
    fits = []
    for task in tasks.SAMPLING_TASKS:
        try:
            task_roles(task, num_images, max_references)
        except ValueError:
            continue
        fits.append(task)
    return tuple(fits)


def trained_tasks(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The sampling tasks a checkpoint was trained on: ``config.tasks`` entries of positive weight (every sampling
    task when the config has no ``tasks``, as a converted model may not)."""
    weights = config.get("tasks")
    if not weights:
        return tasks.SAMPLING_TASKS
    weights = dict(weights)
    return tuple(t for t in tasks.SAMPLING_TASKS if float(weights.get(t, 0.0)) > 0.0)


def infer_task(num_images: int, max_references: int, trained: Iterable[str] = tasks.SAMPLING_TASKS) -> str:
    """The one task that ``num_images`` input images can mean on this model, else ``ValueError`` saying why.

    Candidates are the tasks that take that many images (``fitting_tasks``), narrowed to those the checkpoint
    was trained on (``trained``). Several left: ambiguous, the message names them and asks for ``task=``; none
    trained: the message names the fitting ones (the sampler still runs them when asked).
    """
    fits = fitting_tasks(num_images, max_references)
    if not fits:
        raise ValueError(f"no task takes {num_images} input images on this model (config.max_references="
                         f"{max_references} reference images, plus one source for subject_edit); give fewer images")
    trained = set(trained)
    candidates = tuple(t for t in fits if t in trained)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"{num_images} input image(s) fit the tasks {', '.join(fits)}, but the checkpoint was not "
                         f"trained on any of them (config.tasks: {', '.join(sorted(trained)) or 'none'}); pass "
                         f"task= (--task; one of {', '.join(fits)}) to sample anyway")
    raise ValueError(f"{num_images} input image(s) are ambiguous: they fit the tasks {', '.join(candidates)}; pass "
                     f"task= (e.g. task={candidates[0]!r}; on the command line --task {candidates[0]}) to say what "
                     f"the images are ({_describe(candidates)})")


def _describe(candidates: Sequence[str]) -> str:
    """What each candidate task makes of the images, for the ambiguity message."""
    what = {"t2i": "no image", "edit": "image 1 the source to edit", "custom": "image 1 a subject's reference",
            "multi": "every image a subject's reference",
            "subject_edit": "image 1 the source, the rest subjects' references"}
    return "; ".join(f"{t}: {what.get(t, t)}" for t in candidates)


def guidance_weights(cfg_text: float, cfg_image: float, has_images: bool) -> tuple[float, float, float]:
    """Weights of the branches ``BRANCHES`` = ((I, T), (I, 0), (0, 0)) whose sum is the guided velocity.

    ``v(0,0) + s_img (v(I,0) - v(0,0)) + s_txt (v(I,T) - v(I,0))`` regrouped; without input images the
    ``(I, 0)`` branch is the unconditional one and guidance has two branches, ``v(0) + s_txt (v(T) - v(0))``.
    """
    if not has_images:
        return (cfg_text, 1.0 - cfg_text, 0.0)
    return (cfg_text, cfg_image - cfg_text, 1.0 - cfg_image)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A batch of requests as ``generate`` takes it (host arrays), with its static shapes.

    ``batch`` holds, for ``K`` branches (``branches``), ``R`` requests, ``B`` images, ``M`` input images per
    request, ``L`` = ``vlm.max_text_tokens`` (or less: ``data.text_multiple``, ``pipeline.trim_text``), ``S``
    steps (conditioning rows are branch-major: ``k * R + r``):

    - ``input_ids``/``attention_mask`` int32 ``[K*R, L]``, ``pixel_values`` float32 ``[K*R, M, P, D]`` (prompt
      order), ``image_present`` bool ``[K*R, M]``, ``roles`` int32 ``[K*R, M]``: the VLM rows and slot roles.
    - ``inputs`` float32 ``[R, M, H, W, 3]`` in [-1, 1]: the images the VAE encodes (stage 3 only).
    - ``cond_index`` int32 ``[K, B]`` (the row of branch k for image b), ``request_index`` int32 ``[B]``,
      ``weights`` float32 ``[K, B]`` (``guidance_weights``), ``seeds`` uint32 ``[B]``, ``sigmas`` float32 ``[S+1]``.
    """

    batch: dict[str, np.ndarray]
    image_grid: tuple[tuple[int, int, int], ...]
    latent_hw: tuple[int, int]
    size: tuple[int, int]  # (width, height) of the bucket
    steps: int
    branches: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------
# The compiled sampler
# ----------------------------------------------------------------------------------------------------------

_STEP_LISTENERS: list[Callable[[int], None]] = []  # the running Sampler's progress hook (Sampler.run)
# (model config, static arguments, argument shapes) -> the compiled ``generate``, shared by every Sampler.
_EXECUTABLES: dict[Any, jax.stages.Compiled] = {}


def _step_done(step: jax.Array, _: jax.Array) -> None:
    """Host side of the per-step ``jax.debug.callback``: tells the running sampler that a step finished."""
    if _STEP_LISTENERS:
        _STEP_LISTENERS[-1](int(step))


@functools.partial(jax.jit, static_argnames=("config", "image_grid", "latent_hw"))
def generate(params: Mapping[str, Any], batch: Mapping[str, jax.Array], *, config: QueryKontextConfig,
             image_grid: tuple[tuple[int, int, int], ...], latent_hw: tuple[int, int]
             ) -> tuple[jax.Array, jax.Array]:
    """Conditions once, integrates the flow with guidance, decodes: ``(latents [B, T, 4C], images uint8
    [B, H, W, 3])``. ``batch`` is ``Prepared.batch``; ``latent_hw`` the packed token grid (h, w)."""
    model = QueryKontext(config)
    weights, cond_index = batch["weights"], batch["cond_index"]  # [K, B]
    num_branches, num_images = weights.shape
    h, w = latent_hw
    channels = config.mmdit.in_channels
    num_steps = batch["sigmas"].shape[0] - 1

    # Once per request: the VLM and connector on every branch row, the VAE on the in-context images.
    cond = model.condition(params, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                           image_grid, batch.get("image_present"))
    rows = cond_index.reshape(-1)  # [K*B]: the MMDiT batch is branch-major
    cond = jax.tree.map(lambda a: a[rows], cond)
    roles = batch["roles"][rows]
    in_context = None
    if "inputs" in batch:
        inputs = batch["inputs"]  # [R, M, H, W, 3]
        encoded = model.encode(params, inputs.reshape((-1,) + inputs.shape[2:]))
        encoded = encoded.reshape(inputs.shape[:2] + encoded.shape[1:])  # [R, M, T, 4C]
        in_context = encoded[jnp.tile(batch["request_index"], num_branches)]

    noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (h * w, channels), jnp.float32))(batch["seeds"])
    sigmas = batch["sigmas"]

    def step(i, x):  # x: float32 [B, T, 4C]
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = jnp.full((num_branches * num_images,), sigma)
        v = model.velocity(params, cond, jnp.tile(x, (num_branches, 1, 1)), t, latent_hw, in_context, roles)
        v = jnp.einsum("kb,kbtc->btc", weights, v.astype(jnp.float32).reshape((num_branches,) + x.shape))
        x = flow.euler_step(x, v, sigma, sigma_next)
        jax.debug.callback(_step_done, i + 1, x[0, 0, 0])  # reads x: fires once the step is computed
        return x

    latents = jax.lax.fori_loop(0, num_steps, step, noise)
    return latents, _decode(model, params, latents, latent_hw)


def _decode(model: QueryKontext, params: Mapping[str, Any], latents: jax.Array, latent_hw: tuple[int, int]
            ) -> jax.Array:
    """Packed, normalised latent tokens ``[B, h*w, 4C]`` -> images uint8 ``[B, H, W, 3]`` (float32 decoder)."""
    h, w = latent_hw
    z = vae_lib.unscale_latents(vae_lib.unpack_latents(latents, 2 * h, 2 * w), model.config.vae)
    images = model.vae.apply({"params": params["vae"]}, z, method=model.vae.decode)  # float32, as in training
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("config",))
def reconstruct(params: Mapping[str, Any], images: jax.Array, *, config: QueryKontextConfig) -> jax.Array:
    """Images uint8 ``[B, H, W, 3]`` through the VAE and back: encoded to the latent tokens the MMDiT predicts
    (posterior mean), decoded as ``generate`` decodes. What a sampler whose flow ended exactly at an image's
    latents would return, so scores of these bound every score of models on this VAE."""
    model = QueryKontext(config)
    f = 2 * config.vae.downsample_factor  # pixels per packed token side
    latents = model.encode(params, images.astype(jnp.float32) / 127.5 - 1.0)
    return _decode(model, params, latents, (images.shape[1] // f, images.shape[2] // f))


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: QueryKontextConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the params ``QueryKontext(config)`` creates (``jax.eval_shape``: nothing allocated)."""
    return leaf_shapes(nn.meta.unbox(QueryKontext(config).abstract_params()))


def check_params(params: Mapping[str, Any], config: QueryKontextConfig) -> None:
    """Refuses params whose leaves or shapes are not the ones ``config`` makes, naming the first differences."""
    problems = shape_differences(leaf_shapes(params), _expected_shapes(config), "from the config")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise saved_model.CheckpointMismatchError(
            f"the params do not match the model config: {'; '.join(problems[:5])}{more}. They were saved with "
            "another model config; sample with the config they were trained with (save_model stores it)")


class Sampler:
    """A model checkpoint ready to sample: ``Sampler.from_checkpoint(dir).sample([Request(...)])``.

    Args:
      config: the stage config (``ml_collections``/mapping) the params were trained with.
      params: all components (``vlm``, ``connector``, ``mmdit``, ``vae``), checked against ``config``.
      meta: what the checkpoint says about itself (stage, step, ema).
      tokenizer: a local tokenizer folder for Qwen's processor (``processors.processor_for``).
      progress: called after every Euler step with ``(step, steps, seconds since the batch started)``.
    """

    def __init__(self, config: Mapping[str, Any], params: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
                 tokenizer: str | os.PathLike | None = None,
                 progress: Callable[[int, int, float], None] | None = None):
        self.config = config
        self.model_config = QueryKontextConfig.from_config(config)
        check_params(params, self.model_config)
        self.params = params
        self.meta = dict(meta or {})
        self.processor = processors.processor_for(config, tokenizer)
        self.buckets = buckets_lib.Buckets.from_config(config["data"])
        self.max_image_pixels = images_lib.configured_max_pixels(config["data"])  # read_image's cap, as in training
        block = dict(config.get("sample") or {})
        missing = [k for k in SAMPLE_KEYS if k not in block]
        if missing:
            raise ValueError(f"the config has no sample.{', sample.'.join(missing)}; give the sample block of "
                             "configs/common.py (steps, cfg_text, cfg_image, negative_prompt)")
        self.defaults = {k: block[k] for k in SAMPLE_KEYS}
        self.progress = progress

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, **kwargs: Any) -> Sampler:
        """From a ``checkpoint.save_model`` directory, read with its own ``tokenizer/`` unless ``tokenizer`` is
        given; ``FileNotFoundError`` when it is not one, ``CheckpointMismatchError`` when its params do not fit its
        config."""
        config, params, meta = saved_model.load_model(directory)
        own = storage.join(directory, processors.TOKENIZER_DIR)  # the tokenizer it was trained with, if a Qwen one
        if not kwargs.get("tokenizer") and processors.is_tokenizer_folder(own):
            kwargs["tokenizer"] = storage.fetch_tree(own)  # a bucket's: transformers reads local files
        try:
            return cls(config, params, meta=meta, **kwargs)
        except saved_model.CheckpointMismatchError as e:
            raise saved_model.CheckpointMismatchError(f"checkpoint {directory}: {e}") from None

    # Host side --------------------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """The sampling tasks the checkpoint was trained on (``trained_tasks``): those ``task_for`` infers from."""
        return trained_tasks(self.config)

    def task_for(self, num_images: int, task: str | None = None) -> str:
        """``task`` checked against ``num_images`` input images (``ValueError`` naming the misfit and the fix), or
        the one task they can mean on this checkpoint when ``task`` is ``None`` (``infer_task``)."""
        max_references = self.model_config.max_references
        if task is None:
            return infer_task(num_images, max_references, self.tasks)
        tasks.check_task(task, tasks.SAMPLING_TASKS)
        try:
            task_roles(task, num_images, max_references)
        except ValueError as e:
            raise ValueError(f"task={task!r} does not fit {num_images} input image(s): {e}") from None
        return task

    def bucket(self, size: tuple[int, int] | None = None, source: np.ndarray | None = None) -> tuple[int, int]:
        """The bucket ``(width, height)`` for a requested size, else for a source image's shape, else square."""
        if size is None:
            size = (1, 1) if source is None else (source.shape[1], source.shape[0])
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"size {width}x{height}: give a positive WIDTHxHEIGHT")
        return self.buckets.sizes[self.buckets.assign(width, height)]

    def _vlm_row(self, request: Request, fitted: Sequence[np.ndarray], branch: str, negative: str,
                 patches: int) -> dict[str, np.ndarray]:
        """One VLM row of a branch, as ``pipeline.MakeSample`` builds a sample with that guidance dropout."""
        num = len(fitted)
        kept = [] if branch == "none" else list(range(num))
        extra = "" if branch == "image_text" else negative
        try:
            row = pipeline.vlm_inputs(self.processor, manifest_lib.prompt_segments(request.prompt, num), fitted, kept,
                                      drop_text=branch != "image_text", extra_text=extra, patches=patches,
                                      max_tokens=int(self.config["vlm"]["max_text_tokens"]),
                                      pad_token_id=int(self.config["vlm"]["text"]["bos_token_id"]))
        except pipeline.PromptTooLong as e:
            raise ValueError(f"the prompt {request.prompt!r} is too long: {e}; shorten it") from None
        present = row.pop("image_present")
        roles = task_roles(request.task, num, self.model_config.max_references)
        roles = [r if (self.model_config.in_context and present[k]) else rope.NONE for k, r in enumerate(roles)]
        return dict(row, image_present=present, roles=np.asarray(roles, np.int32).reshape(num))

    def prepare(self, requests: Sequence[Request], *, size: tuple[int, int] | None = None,
                steps: int | None = None) -> Prepared:
        """Validates requests and builds their batch on the host; every user error is a ``ValueError`` here.

        The requests of one batch share the bucket (``size``, or their sources' bucket) and the number of input
        images; their tasks, prompts, seeds, image counts and guidance scales may differ.
        """
        if not requests:
            raise ValueError("no requests to sample")
        steps = int(self.defaults["steps"] if steps is None else steps)
        if steps < 1:
            raise ValueError(f"steps={steps}: sample with at least one step")
        num_inputs = {len(r.images) for r in requests}
        if len(num_inputs) > 1:
            raise ValueError(f"requests with {sorted(num_inputs)} input images in one batch; batch requests with the "
                             "same number of input images")
        for r in requests:
            task_roles(r.task, len(r.images), self.model_config.max_references)
            if r.num_images < 1:
                raise ValueError(f"num_images={r.num_images}: ask for at least one image")
            if not (0 <= r.seed and r.seed + r.num_images <= 2**32):
                raise ValueError(f"seed {r.seed}: seeds (and seed + num_images) must be in [0, 2**32)")
            for k, image in enumerate(map(np.asarray, r.images)):
                if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
                    raise ValueError(f"input image {k + 1} of {r.prompt!r} is {image.shape} {image.dtype}; "
                                     "give HxWx3 uint8 RGB")
        sizes = {self.bucket(size, r.images[0] if r.task in ("edit", "subject_edit") else None) for r in requests}
        if len(sizes) > 1:
            raise ValueError(f"the requests' source images fall in different buckets {sorted(sizes)}; pass a size or "
                             "sample them separately")
        (width, height), = sizes

        weights = []
        for r in requests:
            s_txt = float(self.defaults["cfg_text"] if r.cfg_text is None else r.cfg_text)
            s_img = float(self.defaults["cfg_image"] if r.cfg_image is None else r.cfg_image)
            weights.append(guidance_weights(s_txt, s_img, bool(r.images)))
        active = [k for k in range(len(BRANCHES)) if any(w[k] != 0.0 for w in weights)]

        grid = tuple(int(g) for g in self.processor.image_grid_thw(height, width))
        patches = grid[0] * grid[1] * grid[2]
        rows, inputs = [], []
        for r in requests:
            fitted = [images_lib.fit(Image.fromarray(np.asarray(image)), (width, height), "request", f"image {k + 1}")
                      for k, image in enumerate(r.images)]
            inputs.append(np.stack(fitted) if fitted else np.zeros((0, height, width, 3), np.uint8))
            negative = self.defaults["negative_prompt"] if r.negative_prompt is None else r.negative_prompt
            rows.append([self._vlm_row(r, fitted, BRANCHES[k], negative, patches) for k in active])
        batch = {key: np.stack([rows[r][i][key] for i in range(len(active)) for r in range(len(requests))])
                 for key in rows[0][0]}  # branch-major rows
        pipeline.trim_text(batch, int(dict(self.config["data"]).get("text_multiple", 0)))

        request_index = np.concatenate([np.full((r.num_images,), i, np.int32) for i, r in enumerate(requests)])
        batch.update(
            cond_index=np.stack([i * len(requests) + request_index for i in range(len(active))]).astype(np.int32),
            request_index=request_index,
            weights=np.asarray([[weights[i][k] for i in request_index] for k in active], np.float32),
            seeds=np.concatenate([np.arange(r.seed, r.seed + r.num_images, dtype=np.uint32) for r in requests]),
        )
        num_inputs = num_inputs.pop()
        if num_inputs == 0:
            del batch["pixel_values"], batch["image_present"]
        elif self.model_config.in_context:
            batch["inputs"] = np.stack(inputs).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        f = 2 * self.model_config.vae.downsample_factor
        latent_hw = (height // f, width // f)
        batch["sigmas"] = np.asarray(flow.euler_sigmas(steps, latent_hw[0] * latent_hw[1],
                                                       **self.model_config.flow.shift_kwargs()))
        return Prepared(batch=batch, image_grid=(grid,) * num_inputs, latent_hw=latent_hw, size=(width, height),
                        steps=steps, branches=tuple(BRANCHES[k] for k in active))

    # Device side ------------------------------------------------------------------------------------------

    def _executable(self, prepared: Prepared) -> tuple[jax.stages.Compiled, float]:
        """The compiled ``generate`` for the shapes of ``prepared`` and the seconds compiling took (0: cached)."""
        signature = lambda tree: (jax.tree.structure(tree),
                                  tuple((a.shape, a.dtype) for a in jax.tree.leaves(tree)))
        key = (self.model_config, prepared.image_grid, prepared.latent_hw, signature(self.params),
               signature(prepared.batch))
        if key in _EXECUTABLES:
            return _EXECUTABLES[key], 0.0
        started = time.perf_counter()
        executable = generate.lower(self.params, prepared.batch, config=self.model_config,
                                    image_grid=prepared.image_grid, latent_hw=prepared.latent_hw).compile()
        seconds = time.perf_counter() - started
        logging.info("compiled the sampler for %dx%d, %d images, %d branches, %d steps in %.1f s", *prepared.size,
                     prepared.batch["seeds"].shape[0], len(prepared.branches), prepared.steps, seconds)
        _EXECUTABLES[key] = executable
        return executable, seconds

    def compile(self, prepared: Prepared) -> float:
        """Compiles the sampler for the shapes of ``prepared`` unless done before; returns the seconds it took."""
        return self._executable(prepared)[1]

    def run(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """The compiled sampler on a prepared batch: ``(latents float32 [B, T, 4C], images uint8 [B, H, W, 3])``.

        Compiles on the first batch of a shape; ``progress`` then gets the seconds since execution started.
        """
        executable, _ = self._executable(prepared)
        started = time.perf_counter()

        def listener(step: int) -> None:
            if self.progress is not None:
                self.progress(step, prepared.steps, time.perf_counter() - started)

        _STEP_LISTENERS.append(listener)
        try:
            latents, images = executable(self.params, prepared.batch)
            return np.asarray(latents), np.asarray(images)
        finally:
            _STEP_LISTENERS.remove(listener)

    def sample(self, requests: Sequence[Request], *, size: tuple[int, int] | None = None,
               steps: int | None = None) -> np.ndarray:
        """uint8 images ``[B, H, W, 3]``: the ``num_images`` of each request, in request order."""
        return self.run(self.prepare(requests, size=size, steps=steps))[1]


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` RGB (EXIF orientation applied, Pillow's pixel limit on).

    The training pipeline's reading and decoding path (``manifest.read_file``, ``qk_jax.data.images``): a
    missing, unreadable, non-regular, oversized, corrupt or truncated file raises ``ValueError`` naming it, and
    so does one over ``max_pixels`` (``Sampler.max_image_pixels``: the checkpoint's training cap), refused from
    its header before its pixels are decoded.
    """
    try:
        data = manifest_lib.read_file(str(path), str(path), "image")
    except manifest_lib.RecordError as e:
        if e.kind == "missing_file":
            raise ValueError(f"--image {path}: cannot read it ({e}); check the path") from None
        raise ValueError(f"--image {path} is not a readable image ({e.kind}: {e}); pass a PNG or JPEG file") from None
    try:
        image = images_lib.open_image(data, str(path), "image", max_pixels)
        return images_lib.fit(image, images_lib.oriented_size(image, str(path), "image"), str(path), "image")
    except manifest_lib.RecordError as e:
        raise ValueError(f"--image {path} is not a readable image ({e.kind}: {e}); pass a PNG or JPEG file") from None


def image_grid(images: np.ndarray, background: int = 255) -> np.ndarray:
    """``[N, H, W, 3]`` -> one ``[rows*H, cols*W, 3]`` image, ``cols = ceil(sqrt(N))``, row by row."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, c), background, np.uint8)
    for i, image in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = image
    return grid


def parse_size(text: str) -> tuple[int, int]:
    """``'512x768'`` -> ``(512, 768)`` (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 512x512") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"--size {text!r}: both sides must be positive")
    return width, height
