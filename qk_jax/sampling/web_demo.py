r"""A web demo of one checkpoint (gradio): every sampling task from a browser, images uploaded or picked from examples.

::

    pip install -e '.[demo]'          # gradio: not in the main install
    python -m qk_jax.demo --checkpoint runs/shapes/stage3/final     # then open http://127.0.0.1:7860

The page (``build_demo``) holds a task choice (``auto`` infers it from the number of images, as
``QueryKontextPipeline`` does; only the tasks the checkpoint was trained for are listed), one image slot per input
the model takes (``config.max_references`` references, plus a source), the prompt and negative prompt, the text and
image guidance scales, the seed, the steps, the number of images and the size (an aspect-ratio bucket). Sliders
start at the checkpoint's ``config.sample`` values. Below it sit ShapesWorld examples, one per trained task, drawn
from the held-out test split at the checkpoint's resolution (``previews.preview_items``, what training previews).

Every click is one ``QueryKontextPipeline`` call on the one pipeline built at start: the sampler compiles once per
shape (bucket, number of input images, images, steps) and reuses it. Calls run one at a time (one batch on the
device). The generate event is the API ``/generate`` (``gradio_client``): its arguments are ``GENERATE_INPUTS``, then
the image slots in order. Errors in the arguments (a task that does not fit the images, a bad seed) come back as a
``gradio.Error`` message, not a traceback.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr
from PIL import Image

from qk_jax.data import tasks as tasks_lib
from qk_jax.sampling.kontext_pipeline import QueryKontextPipeline
from qk_jax.sampling.sampler import parse_size
from qk_jax.training import previews

AUTO = "auto"  # the task and size choice that lets the pipeline decide
API_NAME = "generate"
MAX_IMAGES_PER_CALL = 8  # every image of a call is one compiled batch: bounded to bound device memory
# The arguments of /generate before the image slots, in order.
GENERATE_INPUTS = ("task", "prompt", "negative_prompt", "cfg_text", "cfg_image", "seed", "steps", "num_images", "size")
TASK_HINTS = {
    "t2i": "text to image: no image",
    "edit": "edit image 1 (the source)",
    "custom": "place the subject of image 1",
    "multi": "compose the subjects of images 1..N",
    "subject_edit": "put the subjects of images 2..N into image 1",
}


def example_items(config: Mapping[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """One ShapesWorld example per trained sampling task, from the held-out split, at ``config.data.resolution``.

    The training previews' inputs (``previews.preview_items``), read from ShapesWorld whatever the checkpoint was
    trained on: a manifest-trained checkpoint's data need not be where the demo runs."""
    data = config["data"]
    world = data.get("world")
    if world is None:  # a paper-scale config has no ShapesWorld block: the default world
        from configs import common

        world = common.shapesworld_block()
    view = dict(tasks=config["tasks"], preview=None,
                data=dict(manifest=None, world=world, resolution=int(data["resolution"])))
    return previews.preview_items(view, seed)


def task_choices(pipe: QueryKontextPipeline) -> list[tuple[str, str]]:
    """``(label, value)`` of the task radio: ``auto``, then the trained tasks in ``SAMPLING_TASKS`` order."""
    trained = [t for t in tasks_lib.SAMPLING_TASKS if t in pipe.tasks]
    return [("auto: from the number of images", AUTO)] + [(f"{t}: {TASK_HINTS[t]}", t) for t in trained]


def size_choices(pipe: QueryKontextPipeline) -> list[tuple[str, str]]:
    """``(label, value)`` of the size dropdown: ``auto``, then the aspect-ratio buckets (WIDTHxHEIGHT), once each."""
    sizes = list(dict.fromkeys(pipe.sampler.buckets.sizes))  # the bucket table repeats some sizes
    return [("auto: the source image's bucket, else square", AUTO)] + [(f"{w}x{h}", f"{w}x{h}") for w, h in sizes]


def _whole(value: Any, name: str) -> int:
    """A number field as an int (gradio gives floats for sliders, None for an emptied field)."""
    if value is None or float(value) != int(float(value)):
        raise ValueError(f"{name} {value!r}: give a whole number")
    return int(float(value))


def _uploaded(images: Sequence[Image.Image | None]) -> list[Image.Image]:
    """The filled image slots, which must be the first ones: slot k is image k of the prompt and the task."""
    filled = [image for image in images if image is not None]
    if any(image is None for image in images[: len(filled)]):
        gaps = [k + 1 for k, image in enumerate(images[: len(filled)]) if image is None]
        raise ValueError(f"image slot(s) {gaps} are empty but later ones are not; fill the slots in order "
                         "(image 1 is the source of edit and subject_edit)")
    return filled


def generate(pipe: QueryKontextPipeline, task: str, prompt: str, negative_prompt: str, cfg_text: float,
             cfg_image: float, seed: float, steps: float, num_images: float, size: str,
             *images: Image.Image | None) -> tuple[list[Image.Image], str]:
    """One pipeline call from the page's values: ``(images, status line)``; argument errors as ``gradio.Error``."""
    try:
        inputs = _uploaded(images)
        chosen = pipe.task_for(len(inputs), None if task == AUTO else task)
        width, height = (None, None) if size in (None, AUTO) else parse_size(size)
        count, first, steps = _whole(num_images, "number of images"), _whole(seed, "seed"), _whole(steps, "steps")
        if not 1 <= count <= MAX_IMAGES_PER_CALL:
            raise ValueError(f"{count} images: ask for 1..{MAX_IMAGES_PER_CALL} per call")
        started = time.perf_counter()
        outputs = pipe(prompt or "", inputs, task=chosen, num_images=count, seed=first, num_inference_steps=steps,
                       guidance_scale=float(cfg_text), image_guidance_scale=float(cfg_image),
                       negative_prompt=negative_prompt or "", height=height, width=width)
    except (ValueError, TypeError) as e:  # what the arguments got wrong (the pipeline's contract)
        raise gr.Error(str(e)) from None
    seconds = time.perf_counter() - started
    how = f" (auto, from {len(inputs)} image(s))" if task == AUTO else ""
    w, h = outputs[0].size
    status = (f"task {chosen}{how} · {w}x{h} · {count} image(s), seeds {first}..{first + count - 1} · {steps} steps "
              f"· {seconds:.1f} s")
    return outputs, status


def _header(pipe: QueryKontextPipeline, checkpoint: str | None) -> str:
    """The page's top: what the checkpoint is and how the page works."""
    meta = pipe.sampler.meta
    about = [f"{key} {meta[key]}" for key in ("stage", "step") if key in meta]
    about += ["EMA weights"] if meta.get("ema") else []
    where = f"`{checkpoint}`" if checkpoint else "a checkpoint"
    return (f"# Query-Kontext\n{where}{': ' + ', '.join(about) if about else ''}. "
            f"Trained tasks: {', '.join(pipe.tasks)}; up to {pipe.config['max_references']} reference images. "
            "Image k of the prompt is slot k; `<image k>` places it in the prompt. The first call of each shape "
            "(size, number of input images, images, steps) compiles the sampler; later ones reuse it.")


def _slider_max(default: float, floor: float) -> float:
    return max(floor, 2 * float(default))


def build_demo(pipe: QueryKontextPipeline, examples: Sequence[Mapping[str, Any]] | None = None,
               checkpoint: str | None = None) -> gr.Blocks:
    """The page for ``pipe`` (module docstring). ``examples``: items like ``example_items`` returns (``task``,
    ``prompt``, ``inputs``: ``[{image}]``), default ``example_items(pipe.config)``; ``checkpoint`` names it."""
    defaults = pipe.sampler.defaults
    slots = int(pipe.config["max_references"]) + 1  # references plus a source (subject_edit)
    examples = example_items(pipe.config) if examples is None else examples
    with gr.Blocks(title="Query-Kontext", analytics_enabled=False) as demo:
        gr.Markdown(_header(pipe, checkpoint))
        with gr.Row():
            with gr.Column(scale=3):
                task = gr.Radio(task_choices(pipe), value=AUTO, label="Task")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle at the top left")
                with gr.Row():
                    images = [gr.Image(type="pil", image_mode="RGB", height=160, sources=["upload", "clipboard"],
                                       label=f"Image {k + 1}" + (": source or reference" if k == 0 else
                                                                 ": reference"))
                              for k in range(slots)]
                negative = gr.Textbox(label="Negative prompt", value=defaults["negative_prompt"])
                with gr.Row():
                    cfg_text = gr.Slider(0, _slider_max(defaults["cfg_text"], 10), value=defaults["cfg_text"],
                                         step=0.1, label="Text guidance")
                    cfg_image = gr.Slider(0, _slider_max(defaults["cfg_image"], 5), value=defaults["cfg_image"],
                                          step=0.1, label="Image guidance (with input images)")
                with gr.Row():
                    steps = gr.Slider(1, max(100, int(defaults["steps"])), value=int(defaults["steps"]), step=1,
                                      label="Steps")
                    count = gr.Slider(1, MAX_IMAGES_PER_CALL, value=1, step=1, label="Images")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed (image i: seed + i)")
                    size = gr.Dropdown(size_choices(pipe), value=AUTO, label="Size")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Output", format="png", columns=2, height=420)
                status = gr.Textbox(label="Status", interactive=False)
        controls = dict(task=task, prompt=prompt, negative_prompt=negative, cfg_text=cfg_text, cfg_image=cfg_image,
                        seed=seed, steps=steps, num_images=count, size=size)
        inputs = [controls[name] for name in GENERATE_INPUTS] + images  # generate's order, the API's
        button.click(functools.partial(generate, pipe), inputs=inputs, outputs=[gallery, status],
                     api_name=API_NAME, concurrency_limit=1)
        if examples:
            gr.Examples([_example_row(item, slots) for item in examples], inputs=[task, prompt, *images],
                        label="ShapesWorld examples (held-out test split)")
    return demo


def _example_row(item: Mapping[str, Any], slots: int) -> list[Any]:
    """An example's task, prompt and images, the empty slots None."""
    pictures = [Image.fromarray(inp["image"]) for inp in item["inputs"]]
    return [item["task"], item["prompt"], *pictures, *[None] * (slots - len(pictures))]


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          block: bool = True) -> str:
    """Starts the page; returns its local URL. ``block``: serve until interrupted (the command), else return at
    once (tests; ``demo.close()`` stops it)."""
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                            quiet=not block)
    return url


__all__ = ["build_demo", "example_items", "generate", "serve", "API_NAME", "AUTO", "GENERATE_INPUTS"]
