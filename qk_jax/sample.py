r"""Sampling: Euler on FLUX's shifted schedule with three-branch classifier-free guidance; and its command line.

::

    python -m qk_jax.sample --checkpoint /tmp/qk_stage3/final --task edit --prompt "make the circle green" \
        --image scene.png --num-images 4 --out /tmp/edit.png

writes ``/tmp/edit_0.png`` ... ``/tmp/edit_3.png`` and the grid ``/tmp/edit.png``. ``--steps``, ``--cfg-text``,
``--cfg-image`` and ``--negative-prompt`` default to the checkpoint config's ``config.sample`` block.

What a request does (paper section 3, DESIGN.md "Flow matching"):

1. **Size.** The requested ``WIDTHxHEIGHT`` snaps to the aspect-ratio bucket of the nearest ratio at the
   training area (``qk_jax.data.buckets``; the CLI prints the snap). Without a size: the source image's bucket
   for ``edit``/``subject_edit``, else the square one. Input images are resized and centre-cropped to the
   bucket exactly as the training pipeline does (``pipeline.fit``).
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
``processor_for(config)``: the stand-in tokenizer that ``config.vlm.tokenizer`` names and ``qk_jax.data.pipeline``
trains with (word-level for ShapesWorld, byte-level for the tiny test model), or, given a tokenizer folder
(``--tokenizer``), Qwen2.5-VL's processor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from qk_jax import cli
from qk_jax.data import buckets as buckets_lib
from qk_jax.data import manifest as manifest_lib
from qk_jax.data import pipeline
from qk_jax.models import vae as vae_lib
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.ops import flow, rope
from qk_jax.pytree import flatten
from qk_jax.training import checkpoint as ckpt

TASKS = ("t2i", "edit", "custom", "multi", "subject_edit")
BRANCHES = ("image_text", "image", "none")  # (I, T), (I, 0), (0, 0): see the module docstring
# Used when a checkpoint config has no ``sample`` block (configs/common.py sets the same values).
SAMPLE_DEFAULTS = dict(steps=28, cfg_text=4.0, cfg_image=1.5, negative_prompt="")


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
    """The sRoPE role (``rope.SOURCE``/``rope.REFERENCE``) of each input image of ``task``, in order.

    Raises ``ValueError`` naming the task, the count and the fix when the count does not fit the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    refs = num_images - (1 if task in ("edit", "subject_edit") else 0)
    if task == "t2i" and num_images:
        raise ValueError(f"task t2i takes no input image, got {num_images}; use --task edit (a source image), "
                         "custom/multi (references) or subject_edit (a source and references)")
    if task in ("edit", "subject_edit") and num_images == 0:
        raise ValueError(f"task {task} needs its source image first: pass --image SOURCE.png")
    if task == "edit" and num_images > 1:
        raise ValueError(f"task edit takes one source image, got {num_images}; for a source plus reference "
                         "subjects use --task subject_edit")
    if task == "custom" and num_images != 1:
        raise ValueError(f"task custom takes one reference image, got {num_images}; for 2 or more references "
                         "use --task multi")
    if task == "multi" and num_images < 2:
        raise ValueError(f"task multi takes 2 or more reference images, got {num_images}; for one use --task custom")
    if task == "subject_edit" and refs < 1:
        raise ValueError("task subject_edit takes a source image and at least one reference: pass --image SOURCE.png "
                         "--image SUBJECT.png")
    if refs > max_references:
        raise ValueError(f"task {task} got {refs} reference images but the model takes at most "
                         f"config.max_references={max_references}; pass fewer images")
    if task in ("edit", "subject_edit"):
        return (rope.SOURCE,) + (rope.REFERENCE,) * refs
    return (rope.REFERENCE,) * num_images


def guidance_weights(cfg_text: float, cfg_image: float, has_images: bool) -> tuple[float, float, float]:
    """Weights of the branches ``BRANCHES`` = ((I, T), (I, 0), (0, 0)) whose sum is the guided velocity.

    ``v(0,0) + s_img (v(I,0) - v(0,0)) + s_txt (v(I,T) - v(I,0))`` regrouped; without input images the
    ``(I, 0)`` branch is the unconditional one and guidance has two branches, ``v(0) + s_txt (v(T) - v(0))``.
    """
    if not has_images:
        return (cfg_text, 1.0 - cfg_text, 0.0)
    return (cfg_text, cfg_image - cfg_text, 1.0 - cfg_image)


def processor_for(config: Mapping[str, Any], tokenizer: str | os.PathLike | None = None) -> pipeline.VLMProcessor:
    """The VLM processor a checkpoint's prompts go through: the one place that choice is made.

    Without ``tokenizer``: the stand-in that ``config.vlm.tokenizer`` names (``pipeline.processor_from_config``,
    what ``pipeline.make_pipeline`` trains with: ``WordProcessor`` for ShapesWorld, ``ByteProcessor`` for the
    tests' tiny model and for checkpoints whose config has no ``tokenizer`` key). With a local tokenizer folder:
    Qwen2.5-VL's processor (``qk_jax.data.processor``), whose special token ids must match ``config.vlm``.
    """
    if tokenizer:
        from qk_jax.data import processor as processor_lib
        from qk_jax.models.qwen_vl import QwenVLConfig

        return processor_lib.VLMProcessor.from_config(QwenVLConfig.from_config(config["vlm"]), tokenizer)
    return pipeline.processor_from_config(config["vlm"])


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
    abstract = nn.meta.unbox(QueryKontext(config).abstract_params())
    return {path: tuple(leaf.shape) for path, leaf in flatten(abstract).items()}


def check_params(params: Mapping[str, Any], config: QueryKontextConfig) -> None:
    """Refuses params whose leaves or shapes are not the ones ``config`` makes, naming the first differences."""
    expected = _expected_shapes(config)
    got = {path: tuple(np.shape(leaf)) for path, leaf in flatten(params).items()}
    problems = [f"{p}: shape {got[p]} in the checkpoint, {expected[p]} from the config"
                for p in expected if p in got and got[p] != expected[p]]
    problems += [f"{p}: missing" for p in expected if p not in got]
    problems += [f"{p}: not made by the config" for p in got if p not in expected]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ckpt.CheckpointMismatchError(
            f"the params do not match the model config: {'; '.join(problems[:5])}{more}. They were saved with "
            "another model config; sample with the config they were trained with (save_model stores it)")


class Sampler:
    """A model checkpoint ready to sample: ``Sampler.from_checkpoint(dir).sample([Request(...)])``.

    Args:
      config: the stage config (``ml_collections``/mapping) the params were trained with.
      params: all components (``vlm``, ``connector``, ``mmdit``, ``vae``), checked against ``config``.
      meta: what the checkpoint says about itself (stage, step, ema).
      tokenizer: a local tokenizer folder for Qwen's processor (``processor_for``).
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
        self.processor = processor_for(config, tokenizer)
        self.buckets = buckets_lib.Buckets.from_config(config["data"])
        block = dict(config.get("sample") or {})
        self.defaults = {k: block.get(k, v) for k, v in SAMPLE_DEFAULTS.items()}
        self.progress = progress

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, **kwargs: Any) -> Sampler:
        """From a ``checkpoint.save_model`` directory; ``FileNotFoundError`` when it is not one,
        ``CheckpointMismatchError`` when its params do not fit its config."""
        config, params, meta = ckpt.load_model(directory)
        try:
            return cls(config, params, meta=meta, **kwargs)
        except ckpt.CheckpointMismatchError as e:
            raise ckpt.CheckpointMismatchError(f"checkpoint {directory}: {e}") from None

    # Host side --------------------------------------------------------------------------------------------

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
            fitted = [pipeline.fit(Image.fromarray(np.asarray(image)), (width, height), "request", f"image {k + 1}")
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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` RGB (EXIF orientation applied, Pillow's pixel limit on).

    A missing, unreadable, corrupt or truncated file raises ``ValueError`` naming it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"--image {path}: cannot read it ({e.strerror or e}); check the path") from None
    try:
        image = pipeline.open_image(data, str(path), "image")
        return pipeline.fit(image, pipeline.oriented_size(image), str(path), "image")
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


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def define_guidance_flags(flag_values: flags.FlagValues) -> None:
    """``--cfg-text`` / ``--cfg-image`` (default: the checkpoint's ``config.sample``), for every tool that samples."""
    flags.DEFINE_float("cfg-text", None, "Text guidance scale (default: config.sample.cfg_text).",
                       flag_values=flag_values)
    flags.DEFINE_float("cfg-image", None, "Image guidance scale (default: config.sample.cfg_image).",
                       flag_values=flag_values)


def define_flags(flag_values: flags.FlagValues) -> None:
    """The CLI's flags, on ``flag_values`` (not at import: other entry points may use the same names)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "A model checkpoint directory (checkpoint.save_model: a stage's final/).",
                        **fv)
    flags.DEFINE_enum("task", "t2i", list(TASKS), "What the input images are: t2i none; edit 1 source; custom 1 "
                      "reference; multi 2..N references; subject_edit the source, then references.", **fv)
    flags.DEFINE_string("prompt", None, "The instruction; '<image k>' places input image k in it.", **fv)
    flags.DEFINE_multi_string("image", [], "An input image (repeat the flag, in the task's order).", **fv)
    flags.DEFINE_integer("steps", None, "Euler steps (default: config.sample.steps).", **fv)
    define_guidance_flags(flag_values)
    flags.DEFINE_string("negative-prompt", None, "Text of the unconditional-text branches (default: "
                        "config.sample.negative_prompt).", **fv)
    flags.DEFINE_integer("seed", 0, "Image i uses seed + i.", lower_bound=0, **fv)
    flags.DEFINE_integer("num-images", 4, "Images to sample.", lower_bound=1, **fv)
    flags.DEFINE_string("size", None, "WIDTHxHEIGHT; snaps to the nearest aspect-ratio bucket (default: the source "
                        "image's, else square).", **fv)
    flags.DEFINE_string("out", None, "The grid PNG; image i goes to <out without .png>_i.png.", **fv)
    flags.DEFINE_string("tokenizer", None, "A local Qwen2.5-VL tokenizer folder (default: the stand-in "
                        "that config.vlm.tokenizer names: word-level for ShapesWorld, byte-level for tiny).", **fv)
    flags.mark_flags_as_required(["checkpoint", "prompt", "out"], **fv)


def run_flags(fv: flags.FlagValues) -> list[str]:
    """Samples what the parsed flags ask for; returns the written paths (the grid last).

    User errors (bad checkpoint, image, size, task/image combination) raise ``app.UsageError``.
    """
    out = fv["out"].value
    if not out.lower().endswith(".png"):
        raise app.UsageError(f"--out {out}: give a .png path (the grid; the images go beside it)")
    try:
        size = parse_size(fv["size"].value) if fv["size"].value else None
        images = tuple(read_image(path) for path in fv["image"].value)
        sampler = Sampler.from_checkpoint(fv["checkpoint"].value, tokenizer=fv["tokenizer"].value)
        request = Request(task=fv["task"].value, prompt=fv["prompt"].value, images=images,
                          num_images=fv["num-images"].value, seed=fv["seed"].value,
                          negative_prompt=fv["negative-prompt"].value, cfg_text=fv["cfg-text"].value,
                          cfg_image=fv["cfg-image"].value)
        prepared = sampler.prepare([request], size=size, steps=fv["steps"].value)
    except (ValueError, FileNotFoundError) as e:  # CheckpointMismatchError is a ValueError
        raise app.UsageError(str(e)) from e

    about = [f"{key} {sampler.meta[key]}" for key in ("stage", "step") if key in sampler.meta]
    about += ["EMA weights"] if sampler.meta.get("ema") else []
    print(f"checkpoint {fv['checkpoint'].value}" + (f": {', '.join(about)}" if about else ""))
    width, height = prepared.size
    if size is not None and size != prepared.size:
        print(f"size {size[0]}x{size[1]} snaps to the nearest aspect-ratio bucket: {width}x{height}")
    else:
        print(f"size {width}x{height}")
    weights = np.round(prepared.batch["weights"][:, 0], 3).tolist()
    print(f"{request.num_images} images, {prepared.steps} steps, guidance branches {', '.join(prepared.branches)}"
          f" (weights {weights}), seeds {request.seed}..{request.seed + request.num_images - 1}")
    seconds = sampler.compile(prepared)
    print(f"compiled in {seconds:.1f} s" if seconds else "compiled before (same shapes)")
    sampler.progress = lambda step, steps, seconds: print(f"step {step}/{steps}  {seconds:.2f} s", flush=True)
    started = time.perf_counter()
    _, images = sampler.run(prepared)
    print(f"sampled in {time.perf_counter() - started:.2f} s")

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = out[: -len(".png")]
    paths = []
    for i, image in enumerate(images):
        paths.append(f"{stem}_{i}.png")
        Image.fromarray(image).save(paths[-1])
    Image.fromarray(image_grid(images)).save(out)
    paths.append(out)
    print(f"wrote {', '.join(paths)}")
    return paths


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.sample`` in-process: ``main(['--checkpoint', DIR, '--prompt', '...', '--out', 'x.png'])``.

    ``argv`` are the flags without the program name; bad flags raise ``flags.Error``, user errors
    ``app.UsageError``. Returns the written paths.
    """
    return cli.in_process("qk_jax.sample", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
