r"""Sample images from a trained checkpoint (text-to-image, editing, subject-driven generation).

USAGE: python -m qk_jax.sample --checkpoint DIR --prompt TEXT --out FILE.png [--task edit --image SRC.png ...]

  python -m qk_jax.sample --checkpoint runs/shapes/stage3/final --task edit --prompt "make the circle green" \
      --image source.png --num-images 4 --out edit.png

writes edit_0.png ... edit_3.png and the grid edit.png. How sampling works: ``qk_jax.sampling``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from PIL import Image

from qk_jax import cli, sampling
from qk_jax.data import tasks

GRID_MAX = 64  # images in the grid PNG (every image is written on its own too)


def define_flags(flag_values: flags.FlagValues) -> None:
    """The CLI's flags, on ``flag_values`` (not at import: other entry points may use the same names)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "A model directory (a stage's final/).", **fv)
    flags.DEFINE_enum("task", None, list(tasks.SAMPLING_TASKS), "What the input images are: t2i none; edit 1 "
                      "source; custom 1 reference; multi 2..N references; subject_edit the source, then references "
                      "(default: the one task the number of --image flags allows on this checkpoint; an error "
                      "names the candidates when several fit).", **fv)
    flags.DEFINE_string("prompt", None, "The instruction; '<image k>' places input image k in it.", **fv)
    flags.DEFINE_multi_string("image", [], "An input image (repeat the flag, in the task's order).", **fv)
    flags.DEFINE_integer("steps", None, "Euler steps (default: config.sample.steps).", **fv)
    cli.define_guidance_flags(flag_values)
    flags.DEFINE_string("negative-prompt", None, "Text of the unconditional-text branches (default: "
                        "config.sample.negative_prompt).", **fv)
    flags.DEFINE_integer("seed", 0, "Image i uses seed + i.", lower_bound=0, **fv)
    flags.DEFINE_integer("num-images", 4, "Images to sample.", lower_bound=1, **fv)
    flags.DEFINE_integer("batch", 8, "Images per sampler call (memory grows with it; the seeds do not change).",
                         lower_bound=1, **fv)
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
        size = sampling.parse_size(fv["size"].value) if fv["size"].value else None
        sampler = sampling.Sampler.from_checkpoint(fv["checkpoint"].value, tokenizer=fv["tokenizer"].value)
        images = tuple(sampling.read_image(path, sampler.max_image_pixels) for path in fv["image"].value)
        task = sampler.task_for(len(images), fv["task"].value)
        request = sampling.Request(task=task, prompt=fv["prompt"].value, images=images,
                                   num_images=fv["num-images"].value, seed=fv["seed"].value,
                                   negative_prompt=fv["negative-prompt"].value, cfg_text=fv["cfg-text"].value,
                                   cfg_image=fv["cfg-image"].value)
        # Image i keeps seed + i whatever the batching, so a batch of --batch images at a time gives the same ones.
        chunks = [dataclasses.replace(request, seed=request.seed + k, num_images=min(fv.batch, request.num_images - k))
                  for k in range(0, request.num_images, fv.batch)]
        prepared = sampler.prepare(chunks[:1], size=size, steps=fv["steps"].value)
    except (ValueError, FileNotFoundError) as e:  # CheckpointMismatchError is a ValueError
        raise app.UsageError(str(e)) from e

    about = [f"{key} {sampler.meta[key]}" for key in ("stage", "step") if key in sampler.meta]
    about += ["EMA weights"] if sampler.meta.get("ema") else []
    print(f"checkpoint {fv['checkpoint'].value}" + (f": {', '.join(about)}" if about else ""))
    if fv["task"].value is None:
        print(f"task {request.task} (from {len(images)} input image(s); --task to choose)")
    width, height = prepared.size
    if size is not None and size != prepared.size:
        print(f"size {size[0]}x{size[1]} snaps to the nearest aspect-ratio bucket: {width}x{height}")
    else:
        print(f"size {width}x{height}")
    weights = np.round(prepared.batch["weights"][:, 0], 3).tolist()
    print(f"{request.num_images} images ({len(chunks)} call(s) of up to {fv.batch}), {prepared.steps} steps, guidance "
          f"branches {', '.join(prepared.branches)} (weights {weights}), seeds {request.seed}.."
          f"{request.seed + request.num_images - 1}")
    seconds = sampler.compile(prepared)
    print(f"compiled in {seconds:.1f} s" if seconds else "compiled before (same shapes)")
    sampler.progress = lambda step, steps, seconds: print(f"step {step}/{steps}  {seconds:.2f} s", flush=True)
    started, outputs = time.perf_counter(), []
    for k, chunk in enumerate(chunks):
        if len(chunks) > 1:
            print(f"images {chunk.seed - request.seed}..{chunk.seed - request.seed + chunk.num_images - 1}", flush=True)
        batch = prepared if k == 0 else sampler.prepare([chunk], size=size, steps=prepared.steps)
        outputs.append(sampler.run(batch)[1])
    images = np.concatenate(outputs)
    print(f"sampled in {time.perf_counter() - started:.2f} s")

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = out[: -len(".png")]
    paths = []
    for i, image in enumerate(images):
        paths.append(f"{stem}_{i}.png")
        Image.fromarray(image).save(paths[-1])
    Image.fromarray(sampling.image_grid(images[:GRID_MAX])).save(out)
    paths.append(out)
    shown = f" (the grid holds the first {GRID_MAX})" if len(images) > GRID_MAX else ""
    print(f"wrote {', '.join(paths) if len(paths) <= 10 else f'{paths[0]} ... {paths[-2]} and {out}'}{shown}")
    return paths


def main(argv: Sequence[str]) -> list[str]:
    """``python -m qk_jax.sample`` in-process: ``main(['--checkpoint', DIR, '--prompt', '...', '--out', 'x.png'])``.

    ``argv`` are the flags without the program name; bad flags raise ``flags.Error``, user errors
    ``app.UsageError``. Returns the written paths.
    """
    return cli.in_process("qk_jax.sample", define_flags, run_flags, argv)


if __name__ == "__main__":
    cli.run_as_program(define_flags, run_flags)
