"""Samples while training: every ``config.preview.every`` steps (and at a stage's last step), one fixed input per
task of the stage is sampled with the current weights (the EMA's when the stage keeps one) and written as
``<workdir>/samples/step_<N>.png`` (a row per task: prompt, inputs, output, target) and as TensorBoard images.

Tasks without a sampling path (stage 1's recon and transform) are left out. The inputs are held out where the
data allows it: ShapesWorld's test split (combinations no training sample shows),
else the first record of each task in ``config.preview.manifest`` (default: the training manifest). They are
drawn once, so every preview of a run shows the same prompts; the sampler compiles its program once per shape
(``qk_jax.sampling``) and later previews reuse it. Sampling costs what ``config.preview.steps`` Euler steps with
guidance cost, on the training devices; the preview's wall time is left out of the throughput and the ETA.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from qk_jax import sampling, storage
from qk_jax.data import images as images_lib
from qk_jax.data import manifest as manifest_lib
from qk_jax.data import shapesworld
from qk_jax.data import tasks as tasks_lib
from qk_jax.evaluation import scoring

SAMPLES_DIR = "samples"


def preview_tasks(config: Mapping[str, Any]) -> list[str]:
    """The stage's tasks (``config.tasks``) that the sampler renders, in ``tasks.TASKS`` order."""
    return [t for t in tasks_lib.SAMPLING_TASKS if t in dict(config["tasks"])]


def preview_items(config: Mapping[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """One item per task of the stage that the sampler renders (``config.tasks`` within ``tasks.SAMPLING_TASKS``:
    stage 1's recon and transform train the VLM and have no sampling path), in ``tasks.TASKS`` order:
    ``{task, prompt, inputs: [{image}], target}``."""
    block = dict(config.get("preview") or {})
    source = block.get("manifest") or config["data"].get("manifest")
    tasks = preview_tasks(config)
    if not source:  # ShapesWorld: its held-out split
        world = shapesworld.World.from_config(config["data"]["world"], size=int(config["data"]["resolution"]))
        return [shapesworld.generate_sample(world, [seed, 0], task, "test") for task in tasks]
    manifest = manifest_lib.open_manifest(source, max_references=int(config.get("max_references", 2)))
    cap = images_lib.configured_max_pixels(config["data"])
    items, wanted = [], set(tasks)
    for index in range(len(manifest)):
        record = manifest[index]
        if record.task not in wanted:
            continue
        try:
            inputs = [dict(image=_decoded(record, inp.image, f"inputs[{k}].path", cap))
                      for k, inp in enumerate(record.inputs)]
            target = _decoded(record, record.target, "target", cap)
        except manifest_lib.RecordError as e:
            logging.warning("preview: skipping %s", e)
            continue
        items.append(dict(task=record.task, prompt=record.prompt, inputs=inputs, target=target))
        wanted.discard(record.task)
        if not wanted:
            break
    return sorted(items, key=lambda item: tasks.index(item["task"]))


def _decoded(record: manifest_lib.Record, path: Any, field: str, max_pixels: int) -> np.ndarray:
    return images_lib.check_image(record.read(path, field), record.id, field, max_pixels)[1]


def encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Previewer:
    """Samples ``preview_items(config)`` with given params: ``previewer(step, params)`` writes the step's grid.

    Args:
      config: the stage config (its ``preview`` block: ``every``, ``steps``, ``seed``, ``manifest``).
      workdir: where ``samples/`` goes.
      writer: the run's ``MetricsWriter`` (TensorBoard images), or None.
    """

    def __init__(self, config: Mapping[str, Any], workdir: str, writer: Any = None):
        block = dict(config.get("preview") or {})
        self.config, self.writer = config, writer
        self.steps = int(block.get("steps") or 0) or None  # None: config.sample.steps
        self.seed = int(block.get("seed", 0))
        self.items = preview_items(config, self.seed)
        self.directory = storage.join(workdir, SAMPLES_DIR)
        side = int(config["data"]["resolution"])
        self.size = (side, side)
        if not self.items:
            logging.warning("preview: no record of the stage's sampled tasks %s; previews are off",
                            preview_tasks(config))

    def requests(self) -> list[sampling.Request]:
        return [sampling.Request(task=item["task"], prompt=item["prompt"],
                                 images=tuple(inp["image"] for inp in item["inputs"]), seed=self.seed)
                for item in self.items]

    def __call__(self, step: int, params: Mapping[str, Any]) -> str | None:
        """Samples with ``params`` and writes ``samples/step_<step>.png``; returns its path (None: no items)."""
        if not self.items:
            return None
        sampler = sampling.Sampler(self.config, params)
        requests = self.requests()
        outputs: list[np.ndarray | None] = [None] * len(requests)
        for count in sorted({len(r.images) for r in requests}):  # one batch per input count (the sampler's rule)
            group = [i for i, r in enumerate(requests) if len(r.images) == count]
            for i, image in zip(group, sampler.sample([requests[i] for i in group], size=self.size, steps=self.steps)):
                outputs[i] = image
        grid = preview_grid(self.items, outputs)
        path = storage.join(self.directory, f"step_{int(step):07d}.png")
        png = encode_png(grid)
        storage.write_whole(path, png)  # a reader never sees half a PNG
        if self.writer is not None:
            self.writer.write_image(step, "samples", png, grid.height, grid.width)
        return path


def preview_grid(items: Sequence[Mapping[str, Any]], outputs: Sequence[np.ndarray]):
    """The rows ``scoring.grid_image`` draws (prompt; inputs | output | target), without scores."""
    rows = []
    for item, output in zip(items, outputs):
        target = item.get("target")
        inputs = [dict(image=_fitted(inp["image"], output)) for inp in item["inputs"]]
        rows.append(dict(item=dict(prompt=f"{item['task']}: {item['prompt']}", inputs=inputs,
                                   target=np.zeros_like(output) + 255 if target is None else _fitted(target, output)),
                         output=output))
    return scoring.grid_image(rows)


def _fitted(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``image`` resized to ``like``'s size (a manifest's images may be any size; the grid's cells are one)."""
    if image.shape == like.shape:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((like.shape[1], like.shape[0]), Image.BICUBIC))


__all__ = ["Previewer", "preview_items", "preview_grid", "SAMPLES_DIR"]
