r"""Stage 0 at ShapesWorld scale: a VAE that already reconstructs and a VLM that already reads images.

``python -m qk_jax.pretrain --config configs/shapes.py --workdir runs/shapes`` runs it alone (writes
``runs/shapes/stage0``); ``python -m qk_jax.train --config configs/shapes.py --workdir runs/shapes`` runs it first
whenever the curriculum config has a ``stage0`` block (``qk_jax.training.curriculum``), and skips it once done.
Both components train with the one training loop and step of stages 1-3 (``qk_jax.training.loop.run_loop``,
``qk_jax.training.step.make_step``).

The paper's curriculum (table 3) starts from pretrained weights: Qwen2.5-VL-7B, a VLM that already understands
images, and the FLUX.1 autoencoder, which already reconstructs. No such models exist at ShapesWorld's sizes, so
stage 0 makes them, briefly, on ShapesWorld's training split (never a held-out combination or subject):

- **VAE** (``config.stages[0].vae``, diffusers ``AutoencoderKL``): L1 reconstruction of a posterior *sample*
  (the stages encode their targets by sampling the posterior) plus ``kl_weight`` times the KL to N(0, I) summed
  over the latent and divided by the pixel count (LDM's VAE recipe without its perceptual and GAN terms), on
  random ``crop``-pixel crops of the images of every task (plain scenes and textured subjects; the model is
  convolutional, and a 64 px image costs about 7x a 32 px crop on CPU). Then the FLUX normalisation
  ``z = (latent - shift_factor) * scaling_factor`` is measured on held-out images: ``shift_factor`` = the mean
  of the posterior samples, ``scaling_factor`` = 1 / their std, one scalar each over every channel, as FLUX.1's.
- **VLM** (``config.stages[0].vlm`` without LoRA or kontext queries: Qwen2.5-VL): next-token cross-entropy
  through the LM head, full fine-tuning, on a mix of (a) ``<image> scene description`` rows (the ViT sees a
  scene; the loss is on the description's tokens, e.g. "a large red circle at the top left and ...") and (b) the
  prompts of every ShapesWorld task alone (their images dropped, as guidance dropout does in the stages). Rows
  are built by ``qk_jax.data.pipeline.vlm_inputs`` with the processor of ``qk_jax.data.processors.processor_for``, so
  token ids and image placeholders are the ones stage 1 feeds.

Both are exported through the converters (``qk_jax.convert.diffusers_vae.export``,
``qk_jax.convert.hf_qwen_vl.export``) and stage 1 imports them through ``config.pretrained.vae``/``.vlm``
(``qk_jax.training.stages``): the path a real FLUX / Qwen2.5-VL import takes. ``with_stage0`` points a stage config
at them and gives every stage the measured latent factors (the stages compare their VAE configs, so all of
them must carry the same ones). The paper's stage-2 MMDiT is a pretrained text-to-image model; at this scale
it starts from random weights: no stage 0 for it.

Layout of the stage-0 directory (the curriculum's ``<workdir>/stage0``)::

    vae/   vlm/        each: Orbax checkpoints (``checkpoints/<step>``), metrics.jsonl, tb/, loss.png
    vae_diffusers/     diffusers AutoencoderKL folder; its config.json has the measured factors
    vlm_hf/            transformers Qwen2_5_VLForConditionalGeneration folder
    stage0.json        factors, folders and figures (before/after); written last: its presence means done

Batches are drawn on the fly: batch ``i`` of a component comes from the seeds ``(seed, stream, i)`` alone, so a
run resumed from a checkpoint continues with the batches it would have seen. Evaluation and the latent statistics
draw from another stream: images the training never saw. The figures (``stage0.json``): VAE L1 and PSNR of the
posterior mean's reconstruction on [0, 1] pixels; VLM next-token loss and accuracy on held-out descriptions with
their image, on the same descriptions without it (what the image adds) and on held-out prompts; before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qk_jax import storage
from qk_jax.convert import diffusers_vae, hf_qwen_vl
from qk_jax.data import manifest as manifest_lib
from qk_jax.data import pipeline, processors, shapesworld
from qk_jax.models import vae as vae_lib
from qk_jax.models.lora import LoRAConfig
from qk_jax.models.qwen_vl import QwenVL, QwenVLConfig, init_inputs
from qk_jax.training import checkpoint as ckpt
from qk_jax.training import loop as loop_lib
from qk_jax.training import metrics as metrics_lib
from qk_jax.training import state as state_lib
from qk_jax.training import step as step_lib

DIRNAME = "stage0"  # under the curriculum's workdir
RESULT_FILE = "stage0.json"
VAE_EXPORT, VLM_EXPORT = "vae_diffusers", "vlm_hf"
# Seed streams: training batches, evaluation (and the latent statistics), the row-length probe.
TRAIN_STREAM, EVAL_STREAM, PROBE_STREAM = 0, 1, 2
# Seed salts: the VAE's and the VLM's draws never share a seed.
_VAE_SALT, _VLM_SALT = 0, 1


class NoStage0Error(ValueError):
    """A config without a ``stage0`` block given to stage 0."""


@dataclasses.dataclass(frozen=True)
class Result:
    """What stage 0 leaves: the exported folders, the measured latent factors and the figures of the run."""

    vae: str  # diffusers AutoencoderKL folder
    vlm: str  # transformers Qwen2.5-VL folder
    scaling_factor: float
    shift_factor: float
    figures: dict

    @classmethod
    def read(cls, directory: str) -> Result | None:
        """The result of a finished stage 0 in ``directory``, or None."""
        path = os.path.join(directory, RESULT_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return cls(vae=os.path.join(directory, raw["vae"]), vlm=os.path.join(directory, raw["vlm"]),
                   scaling_factor=float(raw["scaling_factor"]), shift_factor=float(raw["shift_factor"]),
                   figures=raw["figures"])

    def write(self, directory: str) -> None:
        """Atomically: a crash leaves the previous file or none."""
        raw = dict(vae=os.path.relpath(self.vae, directory), vlm=os.path.relpath(self.vlm, directory),
                   scaling_factor=self.scaling_factor, shift_factor=self.shift_factor, figures=self.figures)
        storage.write_whole(os.path.join(directory, RESULT_FILE), json.dumps(raw, indent=2, sort_keys=True))


def with_stage0(stage_config, result: Result, *, first: bool):
    """A copy of a stage config pointed at stage 0's models: every stage gets the measured latent factors; the
    first stage (``first``) imports the VLM and the VAE from the exported folders (``config.pretrained``)."""
    stage_config = copy.deepcopy(stage_config)
    stage_config.vae.scaling_factor = result.scaling_factor
    stage_config.vae.shift_factor = result.shift_factor
    if first:
        for component, folder in (("vlm", result.vlm), ("vae", result.vae)):
            given = stage_config.pretrained.get(component)
            if given and os.path.abspath(given) != os.path.abspath(folder):
                raise ValueError(
                    f"config.stages[0].pretrained.{component}={given!r}, but config.stage0 makes the {component} that"
                    " stage 1 starts from; leave pretrained unset, or train stage 1 alone (configs/stage1.py) to import"
                    " your own weights")
            stage_config.pretrained[component] = folder
    return stage_config


# ----------------------------------------------------------------------------------------------------------
# Data: drawn on the fly from ShapesWorld's training split
# ----------------------------------------------------------------------------------------------------------


def world_of(config) -> shapesworld.World:
    """The curriculum's world at the first stage's resolution."""
    return shapesworld.World.from_config(config.world, size=int(config.stages[0].resolution))


def _rng(seed: int, salt: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, salt, stream, index]))


def vae_images(world: shapesworld.World, seed: int, stream: int, index: int, count: int, crop: int | None = None
               ) -> np.ndarray:
    """Batch ``index`` of a stream: float32 ``[count, S, S, 3]`` in [-1, 1], ``S`` = ``crop`` or the canvas.

    Each image is the target or an input of a sample of a task drawn uniformly (plain scenes and subjects), cut
    to a random ``crop`` x ``crop`` window whose corner is a multiple of 4 px.
    """
    rng = _rng(seed, _VAE_SALT, stream, index)
    size = world.size if crop is None else int(crop)
    out = np.empty((count, size, size, 3), np.float32)
    for j in range(count):
        task = shapesworld.TASKS[int(rng.integers(len(shapesworld.TASKS)))]
        sample = shapesworld.generate_sample(world, [seed, _VAE_SALT, stream, index, j], task, "train")
        images = [sample["target"]] + [inp["image"] for inp in sample["inputs"]]
        image = images[int(rng.integers(len(images)))]
        top, left = (4 * rng.integers(0, (world.size - size) // 4 + 1, size=2)) if size < world.size else (0, 0)
        out[j] = image[top:top + size, left:left + size] / np.float32(127.5) - np.float32(1.0)
    return out


@dataclasses.dataclass(frozen=True)
class VLMRows:
    """How stage 0 builds VLM rows: the stage's processor, sequence length and image slot."""

    processor: processors.VLMProcessor
    length: int  # L: tokens per row
    pad_token_id: int
    special_ids: tuple[int, ...]  # never a label: image pads, vision start/end, the pad
    grid: tuple[int, int, int]  # the image's (t, h, w) patch grid

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def row(self, text: str, image: np.ndarray | None) -> dict[str, np.ndarray]:
        """``<image 1> text`` (or ``text`` alone) as one row with one image slot; tokens past L are cut."""
        pieces = manifest_lib.prompt_segments(("<image 1> " if image is not None else "") + text,
                                              0 if image is None else 1)
        images = [] if image is None else [image]
        out = pipeline.vlm_inputs(self.processor, pieces, images, list(range(len(images))), drop_text=False,
                                  patches=self.patches, max_tokens=4096, pad_token_id=self.pad_token_id)
        ids, mask = out["input_ids"][: self.length], out["attention_mask"][: self.length]
        labels = mask.astype(bool) & ~np.isin(ids, self.special_ids)
        pixel_values = out["pixel_values"][0] if images else np.zeros((self.patches, self.processor.patch_dim),
                                                                      np.float32)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                    image_present=np.asarray([image is not None]), labels=labels)


def _description(world: shapesworld.World, seed: int, stream: int, index: int, j: int) -> tuple[str, np.ndarray]:
    """A plain scene and its description: a t2i sample's prompt describes its target exactly."""
    sample = shapesworld.generate_sample(world, [seed, _VLM_SALT, stream, index, j], "t2i", "train")
    return sample["prompt"], sample["target"]


def vlm_batch(rows: VLMRows, world: shapesworld.World, seed: int, stream: int, index: int, count: int,
              description_fraction: float) -> dict[str, np.ndarray]:
    """Batch ``index`` of a stream: ``description_fraction`` of the rows are ``<image> description``, the rest a
    prompt of a random task with its images dropped. Arrays ``[count, ...]`` (``labels``: tokens to predict)."""
    rng = _rng(seed, _VLM_SALT, stream, index)
    out = []
    for j in range(count):
        if rng.random() < description_fraction:
            text, image = _description(world, seed, stream, index, j)
            out.append(rows.row(text, image))
        else:
            task = shapesworld.TASKS[int(rng.integers(len(shapesworld.TASKS)))]
            sample = shapesworld.generate_sample(world, [seed, _VLM_SALT, stream, index, j], task, "train")
            text = "".join(p for p in manifest_lib.prompt_segments(sample["prompt"], len(sample["inputs"]))
                           if isinstance(p, str))
            out.append(rows.row(text, None))
    return {k: np.stack([r[k] for r in out]) for k in out[0]}


def make_rows(stage_config, world: shapesworld.World, seed: int, probe: int = 256) -> VLMRows:
    """The rows' layout; L is the longest of ``probe`` drawn rows of each kind (rounded up to 8), at most
    ``vlm.max_text_tokens``."""
    vlm = stage_config.vlm
    processor = processors.processor_for(stage_config)  # the one place the processor is chosen
    grid = tuple(int(g) for g in processor.image_grid_thw(world.size, world.size))
    special = (int(vlm.image_token_id), int(vlm.vision_start_token_id), int(vlm.vision_end_token_id),
               int(vlm.text.bos_token_id))
    rows = VLMRows(processor, int(vlm.max_text_tokens), int(vlm.text.bos_token_id), special, grid)
    probe_batch = vlm_batch(rows, world, seed, PROBE_STREAM, 0, probe, 0.5)
    longest = int(probe_batch["attention_mask"].sum(-1).max())
    return dataclasses.replace(rows, length=min(rows.length, -(-longest // 8) * 8))


# ----------------------------------------------------------------------------------------------------------
# Losses and evaluation
# ----------------------------------------------------------------------------------------------------------


def vae_loss(model: vae_lib.AutoencoderKL, params, images: jax.Array, key: jax.Array, kl_weight: float
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 of the decoded posterior sample + ``kl_weight`` * KL(posterior || N(0, I)) per pixel value."""
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    latents = vae_lib.latents_from_posterior(mean, logvar, key)
    recon = model.apply({"params": params}, latents, method=model.decode)
    l1 = jnp.mean(jnp.abs(recon - images))
    kl = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / np.prod(images.shape[1:])
    return l1 + kl_weight * kl, dict(l1=l1, kl=kl)


def vae_probe(model: vae_lib.AutoencoderKL) -> Callable:
    """Jitted ``(params, images, key) -> (reconstruction of the posterior mean, a posterior sample)``."""
    def probe(params, images, key):
        mean, logvar = model.apply({"params": params}, images, method=model.encode)
        recon = model.apply({"params": params}, mean, method=model.decode)
        return recon, vae_lib.latents_from_posterior(mean, logvar, key)

    return jax.jit(probe)


def evaluate_vae(probe: Callable, params, batches: list[np.ndarray], seed: int, world: shapesworld.World
                 ) -> dict[str, float]:
    """Reconstruction through the posterior mean (L1 and PSNR on [0, 1] pixels; ``scene_parse``: the fraction
    of images whose reconstruction ``parse_scene`` reads as the original, an upper bound on every evaluation
    score of the models built on this VAE) and the FLUX normalisation measured on posterior samples: ``shift``
    = their mean, ``scale`` = 1 / their std (scalars, as FLUX.1's)."""
    abs_err, sq_err, latents, parsed = [], [], [], []
    to_uint8 = lambda a: np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)  # noqa: E731
    for i, x in enumerate(batches):
        recon, z = jax.device_get(probe(params, x, jax.random.key(seed + i)))
        y = np.clip(recon, -1.0, 1.0)
        abs_err.append(np.abs(y - x).mean(axis=(1, 2, 3)) / 2)
        sq_err.append(np.square(y - x).mean(axis=(1, 2, 3)) / 4)
        latents.append(np.asarray(z, np.float64).reshape(-1))
        if x.shape[1] == world.size:
            parsed += [shapesworld.parse_scene(a, world) == shapesworld.parse_scene(b, world)
                       for a, b in zip(to_uint8(y), to_uint8(x))]
    mse, z = np.concatenate(sq_err), np.concatenate(latents)
    return dict(l1=float(np.concatenate(abs_err).mean()), psnr=float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10)))),
                scene_parse=float(np.mean(parsed)) if parsed else None, shift=float(z.mean()),
                scale=float(1.0 / z.std()))


def vlm_config(stage_config) -> QwenVLConfig:
    """The VLM stage 1 imports: ``config.vlm``'s dims, no LoRA, no kontext queries (not part of Qwen2.5-VL)."""
    config = QwenVLConfig.from_config(stage_config.vlm)
    return dataclasses.replace(config, num_queries=0, lora=LoRAConfig())


def _vlm_logits(model: QwenVL, params, batch: Mapping[str, jax.Array], grid: tuple[int, int, int]) -> jax.Array:
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                       (grid,), batch["image_present"], return_logits=True).logits  # [B, L, V]


def next_token_stats(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed cross-entropy, correct predictions and count over the label tokens (position t predicts t + 1)."""
    targets, mask = batch["input_ids"][:, 1:], batch["labels"][:, 1:]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits[:, :-1], axis=-1) == targets
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


def vlm_loss(model: QwenVL, grid: tuple[int, int, int], params, batch: Mapping[str, jax.Array], key: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del key  # the VLM's forward pass is deterministic
    nll, correct, count = next_token_stats(_vlm_logits(model, params, batch, grid), batch)
    count = jnp.maximum(count, 1)
    return nll / count, dict(accuracy=correct / count)


def evaluate_vlm(stats: Callable, params, batches: Mapping[str, list]) -> dict[str, float]:
    """Per named set of batches: next-token loss and accuracy over its label tokens. ``stats`` is
    ``next_token_stats`` of the model's logits, jitted: ``(params, batch) -> (nll, correct, count)``."""
    out = {}
    for name, group in batches.items():
        totals = np.sum([np.asarray(jax.device_get(stats(params, b))) for b in group], axis=0)
        out[f"{name}_loss"] = float(totals[0] / totals[2])
        out[f"{name}_accuracy"] = float(totals[1] / totals[2])
    return out


def vlm_eval_batches(rows: VLMRows, world: shapesworld.World, seed: int, count: int, batch_size: int
                     ) -> dict[str, list]:
    """Held-out scenes: their descriptions with the image, the same descriptions without it (how much the image
    helps), and held-out prompts; ``count`` rounded up to whole batches."""
    with_image, without, prompts = [], [], []
    for index in range(-(-count // batch_size)):  # whole batches: one compiled shape
        n = batch_size
        drawn = [_description(world, seed, EVAL_STREAM, index, j) for j in range(n)]
        stack = lambda rs: {k: np.stack([r[k] for r in rs]) for k in rs[0]}
        with_image.append(stack([rows.row(text, image) for text, image in drawn]))
        without.append(stack([rows.row(text, None) for text, _ in drawn]))
        prompts.append(vlm_batch(rows, world, seed, EVAL_STREAM, 10_000 + index, n, 0.0))
    return dict(description=with_image, description_no_image=without, prompt=prompts)


# ----------------------------------------------------------------------------------------------------------
# One component's training loop
# ----------------------------------------------------------------------------------------------------------


def train_component(name: str, workdir: str, params, loss_fn: Callable, batch_fn: Callable[[int], Mapping],
                    block, *, seed: int, log_every: int, checkpoint_every: int) -> tuple[Any, float]:
    """AdamW (``block.optim``) on every leaf of ``params`` for ``block.steps`` steps; returns the trained params
    and the loop's wall time. ``loss_fn(params, batch, key) -> (loss, aux)``, ``batch_fn(i)`` the host batch of
    step ``i + 1``. Resumes from ``workdir``'s latest checkpoint; a finished run does no step."""
    steps = int(block.steps)
    optimizer = state_lib.make_optimizer(block.optim, steps)
    schedule = state_lib.learning_rate_schedule(block.optim, steps)
    state = state_lib.init_state(params, (r".",), optimizer, jax.random.key(seed))
    checkpointer = ckpt.Checkpointer(workdir, save_every=checkpoint_every, keep=1)
    if checkpointer.latest_step() is not None:
        state, _, _ = checkpointer.restore(state)
        logging.info("stage 0 %s: resumed from step %d", name, int(state.step))
    # Batch i is drawn from seeds alone and the key folds in the step: a resumed run sees what it would have.
    step_fn = step_lib.make_step(lambda p, key, batch: loss_fn(p, batch, key), optimizer, schedule, fold_in_step=True)

    start = int(state.step)
    writer = metrics_lib.MetricsWriter(workdir, start_step=start)
    progress = metrics_lib.Progress(steps, start_step=start, every=log_every, name=f"stage 0 {name}")
    started = time.perf_counter()
    state = loop_lib.run_loop(
        state, step_fn, lambda step: (batch_fn(step - 1),), total=steps, log_every=log_every,
        checkpointer=checkpointer, data_state=lambda step: dict(next_batch=step), meta=dict(stage=0, component=name),
        batch_size=int(block.batch_size), max_nonfinite=int(block.optim.get("max_nonfinite", 10)),
        nonfinite_hint=f"stage 0 {name}: lower config.stage0.{name}.optim.lr", writer=writer, progress=progress)
    elapsed = time.perf_counter() - started
    writer.close()
    if os.path.exists(os.path.join(workdir, metrics_lib.JSONL)) and start < steps:
        metrics_lib.plot(os.path.join(workdir, metrics_lib.JSONL), os.path.join(workdir, "loss.png"))
    return jax.device_get(state.trainable), elapsed


def _export(write: Callable[[str], Any], folder: str) -> str:
    """Run ``write(tmp)`` then move the complete folder to ``folder`` (replacing an older one)."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Stage 0
# ----------------------------------------------------------------------------------------------------------


def _init_key(seed: int) -> jax.Array:
    """The key random params are drawn from: XLA's RBG generator, whose init compiles ~4x faster on CPU than
    threefry's (15 s -> 4 s for the tiny VAE)."""
    return jax.random.key(seed, impl="rbg")


def pretrain_vae(config, directory: str) -> tuple[str, float, float, dict]:
    """Train, measure and export the VAE; returns ``(folder, scaling_factor, shift_factor, figures)``."""
    s0, block = config.stage0, config.stage0.vae
    seed, world = int(s0.seed), world_of(config)
    vae_config = vae_lib.VAEConfig.from_config(config.stages[0].vae)
    model = vae_lib.AutoencoderKL(vae_config)
    f = vae_config.downsample_factor
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, f, f, vae_config.in_channels))))
    params = nn.meta.unbox(init(_init_key(seed)))["params"]
    batch_size = int(block.batch_size)
    eval_batches = [vae_images(world, seed, EVAL_STREAM, i, batch_size)
                    for i in range(-(-int(s0.eval_samples) // batch_size))]
    probe = vae_probe(model)
    before = evaluate_vae(probe, params, eval_batches, seed, world)
    crop = block.get("crop") or None
    params, seconds = train_component(
        "vae", os.path.join(directory, "vae"), params,
        lambda p, x, key: vae_loss(model, p, x, key, float(block.kl_weight)),
        lambda i: vae_images(world, seed, TRAIN_STREAM, i, batch_size, crop),
        block, seed=seed, log_every=int(s0.log_every), checkpoint_every=int(s0.checkpoint_every))
    after = evaluate_vae(probe, params, eval_batches, seed, world)
    shift, scale = after["shift"], after["scale"]
    logging.info("stage 0 vae: held-out L1 %.4f -> %.4f, PSNR %.1f -> %.1f dB, reconstructions read as the original"
                 " scene %.1f%%; latents: shift %.4f, scale %.4f", before["l1"], after["l1"], before["psnr"],
                 after["psnr"], 100 * (after["scene_parse"] or 0.0), shift, scale)
    exported = dataclasses.replace(vae_config, scaling_factor=scale, shift_factor=shift)
    folder = _export(lambda path: diffusers_vae.export(exported, params, path), os.path.join(directory, VAE_EXPORT))
    figures = dict(before=before, after=after, train_seconds=seconds, steps=int(block.steps))
    return folder, scale, shift, figures


def pretrain_vlm(config, directory: str) -> tuple[str, dict]:
    """Train and export the VLM; returns ``(folder, figures)``."""
    s0, block = config.stage0, config.stage0.vlm
    seed, world, stage = int(s0.seed), world_of(config), config.stages[0]
    qwen_config = vlm_config(stage)
    model = QwenVL(qwen_config)
    params = nn.meta.unbox(jax.jit(lambda key: model.init(key, **init_inputs(qwen_config)))(_init_key(seed)))
    params = params["params"]
    rows = make_rows(stage, world, seed)
    logging.info("stage 0 vlm: rows of %d tokens, image grid %s", rows.length, rows.grid)
    eval_batches = vlm_eval_batches(rows, world, seed, int(s0.eval_samples), int(block.batch_size))
    stats = jax.jit(lambda p, b: next_token_stats(_vlm_logits(model, p, b, rows.grid), b))
    before = evaluate_vlm(stats, params, eval_batches)
    fraction = float(block.description_fraction)
    params, seconds = train_component(
        "vlm", os.path.join(directory, "vlm"), params,
        lambda p, b, key: vlm_loss(model, rows.grid, p, b, key),
        lambda i: vlm_batch(rows, world, seed, TRAIN_STREAM, i, int(block.batch_size), fraction),
        block, seed=seed, log_every=int(s0.log_every), checkpoint_every=int(s0.checkpoint_every))
    after = evaluate_vlm(stats, params, eval_batches)
    logging.info("stage 0 vlm: held-out descriptions: loss %.3f -> %.3f, next-token accuracy %.3f -> %.3f (%.3f"
                 " without the image); prompts: loss %.3f -> %.3f", before["description_loss"],
                 after["description_loss"], before["description_accuracy"], after["description_accuracy"],
                 after["description_no_image_accuracy"], before["prompt_loss"], after["prompt_loss"])
    folder = _export(lambda path: hf_qwen_vl.export(qwen_config, params, path), os.path.join(directory, VLM_EXPORT))
    figures = dict(before=before, after=after, train_seconds=seconds, steps=int(block.steps),
                   tokens_per_row=rows.length)
    return folder, figures


def run(config, directory: str) -> Result:
    """Stage 0 of the curriculum ``config`` (with ``stage0``, ``world`` and ``stages``) in ``directory``; a
    finished one (``stage0.json`` there) is not rerun.

    A bucket ``directory`` (``gs://``): stage 0 runs in a local mirror (its exports are read back through
    safetensors' mmap, which needs local files) and is copied up when finished, ``stage0.json`` last; a host
    without the mirror fetches a finished one instead of training it again."""
    if storage.is_remote(directory):
        local = storage.local_mirror(directory)
        if Result.read(local) is None and storage.exists(storage.join(directory, RESULT_FILE)):
            storage.copy_tree(directory, local)
        result = _run_here(config, local)
        if not storage.exists(storage.join(directory, RESULT_FILE)):
            storage.copy_tree(local, directory, last=RESULT_FILE)
        return result
    return _run_here(config, directory)


def _run_here(config, directory: str) -> Result:
    done = Result.read(directory)
    if done is not None:
        logging.info("stage 0 is complete (%s); skipping", os.path.join(directory, RESULT_FILE))
        return done
    if config.get("stage0") is None:
        raise NoStage0Error("the config has no stage0 block; use configs/shapes.py (the ShapesWorld curriculum)")
    os.makedirs(directory, exist_ok=True)
    started = time.perf_counter()
    vae_folder, scale, shift, vae_figures = pretrain_vae(config, directory)
    vlm_folder, vlm_figures = pretrain_vlm(config, directory)
    figures = dict(vae=vae_figures, vlm=vlm_figures, seconds=time.perf_counter() - started)
    result = Result(vae=vae_folder, vlm=vlm_folder, scaling_factor=scale, shift_factor=shift, figures=figures)
    result.write(directory)
    logging.info("stage 0 done in %s: %s", metrics_lib.format_duration(figures["seconds"]), directory)
    return result
