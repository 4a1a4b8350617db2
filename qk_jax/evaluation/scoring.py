r"""ShapesWorld evaluation: sample the held-out prompts of every task and score them with ``parse_scene``.

The command (``qk_jax.evaluate``)::

    python -m qk_jax.evaluate --checkpoint /tmp/qk_stage3/final --out /tmp/eval [--split test] [--num 200] \
        [--seed 0] [--steps 28] [--batch 8] [--tasks t2i --tasks edit ...] [--untrained | --ceiling]

Sample ``k`` of a task is ``shapesworld.generate_sample(world, [seed, k], task, split)`` (``split='test'``, the
held-out one, by default), sampled with noise seed ``seed + k``: the same arguments give the same report. The
generated image is read back with ``parse_scene`` and compared with the scene the prompt asks for (the sample's
``target_scene``), GenEval-style:

- ``t2i`` (``score_t2i``): ``single_object`` / ``two_objects`` (only samples whose target has 1 / 2 objects):
  every asked object is drawn, shape and colour, anywhere; ``counting``: as many objects as asked;
  ``colors``: every asked cell holds an object of the asked colour; ``position``: every asked cell holds an
  object; ``attribute_binding``: every asked cell holds an object of the asked colour *and* shape;
  ``overall``: the parsed scene is the asked scene exactly (sizes included, nothing extra). ``t2i_breakdown``
  adds the categories per number of asked objects and per-object rates (placed, colour, shape, size, extras).
- ``edit`` (``score_edit``): ``success``: the parsed scene is the asked scene; ``preservation``: mean absolute
  difference between output and source on [0, 1] pixels outside the edited cells (lower is better).
  ShapesWorld keeps every cell an edit does not name pixel-identical, so the edited cells are the cells where
  the target and the source differ (``changed_cells``). ``edit_breakdown`` gives both per operation
  (remove, add, recolor).
- ``custom`` / ``multi`` (``score_subjects``): ``identity``: each reference subject is drawn (shape, texture,
  both colours), anywhere; ``placement``: each is drawn in the asked cell; ``overall``: exact scene.
  ``subject_breakdown`` says, per asked subject, which part of its look its cell gets right.
- ``subject_edit``: identity and placement of the subject, ``overall``, and preservation of the rest of the
  source as for ``edit``.

Every boolean category is a pass rate over the samples it applies to (``null`` when none does). Written to OUT:
``report.json`` (rates, how many samples each category applies to, and every sample's prompt, seed, scenes
and scores), ``report.md`` (a table per task) and ``TASK.png`` per task: one row per sample,
``inputs | output | target`` under the prompt, the output framed green when the sample passes ``overall``
(``success`` for edit) and red when it does not.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from qk_jax import sampling, storage
from qk_jax.data import tasks as tasks_lib
from qk_jax.data import shapesworld
from qk_jax.models.query_kontext import QueryKontext
from qk_jax.training import metrics as metrics_lib

TASKS = tasks_lib.SAMPLING_TASKS  # the tasks the sampler serves: t2i, edit, custom, multi, subject_edit
T2I_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "attribute_binding", "overall")
EDIT_CATEGORIES = ("success",)
SUBJECT_CATEGORIES = ("identity", "placement", "overall")
CATEGORIES = dict(t2i=T2I_CATEGORIES, edit=EDIT_CATEGORIES, custom=SUBJECT_CATEGORIES, multi=SUBJECT_CATEGORIES,
                  subject_edit=SUBJECT_CATEGORIES)
PRESERVATION_TASKS = tasks_lib.SOURCE_TASKS  # a source image whose pixels outside the edit must stay


# ----------------------------------------------------------------------------------------------------------
# Scoring (pure functions on scenes and images)
# ----------------------------------------------------------------------------------------------------------


def _by_cell(scene: Sequence[Mapping]) -> dict[tuple[int, int], Mapping]:
    return {tuple(o["cell"]): o for o in scene}


def _color(obj: Mapping) -> tuple[str, ...]:
    """A plain object's colour, or a subject's two colours."""
    return tuple(obj["colors"]) if shapesworld.is_subject(obj) else (obj["color"],)


def _look(obj: Mapping) -> tuple:
    """What an object looks like, wherever it is: shape and colour(s), and texture for a subject."""
    return (obj["shape"], obj.get("texture"), _color(obj))


def score_t2i(pred_scene: Sequence[Mapping], target_scene: Sequence[Mapping]) -> dict[str, bool | None]:
    """GenEval-style categories of one text-to-image sample (see the module docstring); ``None``: not applicable."""
    pred, target = _by_cell(pred_scene), _by_cell(target_scene)
    looks = [_look(o) for o in pred_scene]
    drawn = all(_look(o) in looks for o in target_scene)
    return dict(
        single_object=drawn if len(target) == 1 else None,
        two_objects=drawn if len(target) == 2 else None,
        counting=len(pred_scene) == len(target_scene),
        colors=all(c in pred and _color(pred[c]) == _color(o) for c, o in target.items()),
        position=all(c in pred for c in target),
        attribute_binding=all(c in pred and _look(pred[c]) == _look(o) for c, o in target.items()),
        overall=shapesworld._canonical(pred_scene) == shapesworld._canonical(target_scene),
    )


def cell_mask(cells: Sequence[Sequence[int]], size: tuple[int, int], grid: int = 3) -> np.ndarray:
    """Boolean ``[H, W]``: pixels whose centre lies in one of ``cells`` of the ``grid x grid`` layout."""
    height, width = size
    rows = np.minimum(((np.arange(height) + 0.5) * grid / height).astype(int), grid - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid / width).astype(int), grid - 1)
    mask = np.zeros((height, width), bool)
    for r, c in cells:
        mask |= (rows[:, None] == r) & (cols[None, :] == c)
    return mask


def changed_cells(target: np.ndarray, source: np.ndarray, grid: int = 3) -> list[list[int]]:
    """The cells where two images of one size differ: the cells an edit from ``source`` to ``target`` names."""
    if target.shape != source.shape:
        raise ValueError(f"target {target.shape} and source {source.shape} differ in shape")
    diff = np.any(target != source, axis=-1)
    return [[r, c] for r in range(grid) for c in range(grid)
            if diff[cell_mask([[r, c]], diff.shape, grid)].any()]


def preservation_error(pred_image: np.ndarray, source_image: np.ndarray, edited_cells: Sequence[Sequence[int]],
                       grid: int = 3) -> float:
    """Mean ``|pred - source|`` on [0, 1] pixels outside ``edited_cells`` (0: the rest is untouched)."""
    pred, source = np.asarray(pred_image, np.float64), np.asarray(source_image, np.float64)
    if pred.shape != source.shape:
        raise ValueError(f"output {pred.shape} and source {source.shape} differ in shape; sample at the source's "
                         "size")
    keep = ~cell_mask(edited_cells, pred.shape[:2], grid)
    if not keep.any():
        return 0.0
    return float(np.abs(pred - source)[keep].mean() / 255.0)


def score_edit(pred_image: np.ndarray, pred_scene: Sequence[Mapping], target_scene: Sequence[Mapping],
               source_image: np.ndarray, edited_cells: Sequence[Sequence[int]], grid: int = 3) -> dict[str, Any]:
    """``success``: the parsed output is the asked scene; ``preservation``: ``preservation_error``."""
    return dict(success=shapesworld._canonical(pred_scene) == shapesworld._canonical(target_scene),
                preservation=preservation_error(pred_image, source_image, edited_cells, grid))


def score_subjects(pred_scene: Sequence[Mapping], target_scene: Sequence[Mapping],
                   subjects: Sequence[Mapping]) -> dict[str, bool]:
    """custom / multi / subject_edit: ``identity`` (every subject drawn, anywhere), ``placement`` (every subject
    drawn in the cell the target puts it in) and ``overall`` (exact scene). ``subjects``: the references'
    ``{shape, texture, colors}``."""
    keys = [shapesworld.subject_key(s) for s in subjects]
    drawn = {shapesworld.subject_key(o): tuple(o["cell"]) for o in pred_scene if shapesworld.is_subject(o)}
    drawn_cells = {tuple(o["cell"]): shapesworld.subject_key(o) for o in pred_scene if shapesworld.is_subject(o)}
    asked = {shapesworld.subject_key(o): tuple(o["cell"]) for o in target_scene if shapesworld.is_subject(o)}
    missing = [k for k in keys if k not in asked]
    if missing:
        raise ValueError(f"subjects {missing} are not in the target scene {target_scene}")
    return dict(identity=all(k in drawn for k in keys),
                placement=all(drawn_cells.get(asked[k]) == k for k in keys),
                overall=shapesworld._canonical(pred_scene) == shapesworld._canonical(target_scene))


def score_sample(item: Mapping[str, Any], pred_image: np.ndarray, world: shapesworld.World) -> dict[str, Any]:
    """Scores one output against a ``generate_sample`` dict, by its task."""
    task = item["task"]
    pred_scene = shapesworld.parse_scene(pred_image, world)
    if task == "t2i":
        scores = score_t2i(pred_scene, item["target_scene"])
    elif task == "edit":
        source = item["inputs"][0]["image"]
        scores = score_edit(pred_image, pred_scene, item["target_scene"], source,
                            changed_cells(item["target"], source, world.grid), world.grid)
    elif task in ("custom", "multi", "subject_edit"):
        subjects = [i["subject"] for i in item["inputs"] if i["role"] == "reference"]
        scores = score_subjects(pred_scene, item["target_scene"], subjects)
        if task == "subject_edit":
            source = item["inputs"][0]["image"]
            scores["preservation"] = preservation_error(
                pred_image, source, changed_cells(item["target"], source, world.grid), world.grid)
    else:
        raise ValueError(f"no evaluation for task {task!r}; choose from {', '.join(TASKS)}")
    return dict(scores=scores, pred_scene=pred_scene)


def summarize(task: str, scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pass rates per category (over the samples it applies to) and the mean preservation error."""
    out: dict[str, Any] = {}
    for cat in CATEGORIES[task]:
        values = [s[cat] for s in scores if s[cat] is not None]
        out[cat] = float(np.mean(values)) if values else None
    if task in PRESERVATION_TASKS:
        out["preservation"] = float(np.mean([s["preservation"] for s in scores])) if scores else None
    return out


# What ``t2i_breakdown`` asks of the object found in an asked object's cell (``got``), beside being there.
_OBJECT_CHECKS = dict(
    placed=lambda got, obj: True,
    color=lambda got, obj: _color(got) == _color(obj),
    shape=lambda got, obj: got["shape"] == obj["shape"],
    size=lambda got, obj: got["size"] == obj["size"],
    look=lambda got, obj: _look(got) == _look(obj),
)
OBJECT_CHECKS = tuple(_OBJECT_CHECKS)


def t2i_breakdown(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where t2i fails: the categories per number of asked objects, and per asked object.

    ``by_objects``: ``{n: {num, metrics}}``, ``summarize`` over the samples whose prompt asks for ``n`` objects
    (the issue's scale figure counts one- and two-object prompts; GenEval's colour prompts ask for one object).
    ``per_object``: over every asked object, the fraction whose cell holds an object (``placed``) and whose
    cell's object has its colour, shape, size, or colour and shape together (``look``); ``extra``: objects
    drawn in cells no prompt asked for, per sample. ``samples`` are report entries (``target_scene``,
    ``pred_scene``, ``scores``)."""
    by_objects: dict[str, Any] = {}
    for n in sorted({len(s["target_scene"]) for s in samples}):
        group = [s["scores"] for s in samples if len(s["target_scene"]) == n]
        by_objects[str(n)] = dict(num=len(group), metrics=summarize("t2i", group))
    hits = {check: [] for check in OBJECT_CHECKS}
    extra = []
    for s in samples:
        pred, target = _by_cell(s["pred_scene"]), _by_cell(s["target_scene"])
        extra.append(len(set(pred) - set(target)))
        for cell, obj in target.items():
            got = pred.get(cell)
            for check, passes in _OBJECT_CHECKS.items():
                hits[check].append(got is not None and passes(got, obj))
    per_object = {check: float(np.mean(v)) if v else None for check, v in hits.items()}
    per_object.update(objects=len(hits["placed"]), extra=float(np.mean(extra)) if extra else None)
    return dict(by_objects=by_objects, per_object=per_object)


# What ``subject_breakdown`` asks of the object found in an asked subject's cell, beside being there.
_SUBJECT_CHECKS = dict(
    placed=lambda got, obj: True,
    subject=lambda got, obj: shapesworld.is_subject(got),
    shape=lambda got, obj: got["shape"] == obj["shape"],
    texture=lambda got, obj: got.get("texture") == obj["texture"],
    colors=lambda got, obj: _color(got) == _color(obj),
    look=lambda got, obj: _look(got) == _look(obj),
)
SUBJECT_CHECKS = tuple(_SUBJECT_CHECKS)


def subject_breakdown(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where custom / multi / subject_edit fail, per asked subject (every textured object of a target scene):
    the fraction whose cell holds an object (``placed``), a textured subject (``subject``), one of its shape,
    texture, colours (both, in order, as ``identity`` asks) or all of these (``look``), and ``anywhere``: the
    fraction drawn somewhere (``identity`` per subject). ``samples`` are report entries."""
    hits = {check: [] for check in SUBJECT_CHECKS + ("anywhere",)}
    for s in samples:
        pred = _by_cell(s["pred_scene"])
        drawn = {shapesworld.subject_key(o) for o in s["pred_scene"] if shapesworld.is_subject(o)}
        for obj in s["target_scene"]:
            if not shapesworld.is_subject(obj):
                continue
            got = pred.get(tuple(obj["cell"]))
            for check, passes in _SUBJECT_CHECKS.items():
                hits[check].append(got is not None and passes(got, obj))
            hits["anywhere"].append(shapesworld.subject_key(obj) in drawn)
    out = {check: float(np.mean(v)) if v else None for check, v in hits.items()}
    out["subjects"] = len(hits["placed"])
    return dict(per_subject=out)


def edit_breakdown(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Edit success and preservation per operation (``op['kind']``: remove, add, recolor, ...)."""
    by_op: dict[str, Any] = {}
    for kind in sorted({s["op"]["kind"] for s in samples}):
        group = [s["scores"] for s in samples if s["op"]["kind"] == kind]
        by_op[kind] = dict(num=len(group), metrics=summarize("edit", group))
    return dict(by_op=by_op)


BREAKDOWNS = dict(t2i=t2i_breakdown, edit=edit_breakdown, custom=subject_breakdown, multi=subject_breakdown,
                  subject_edit=subject_breakdown)


# ----------------------------------------------------------------------------------------------------------
# Sampling and the report
# ----------------------------------------------------------------------------------------------------------


def check_guidance(ceiling: bool, cfg_text: float | None, cfg_image: float | None) -> None:
    """Guidance scales apply to samples; the ceiling (``evaluate(ceiling=True)``) samples nothing."""
    if ceiling and (cfg_text is not None or cfg_image is not None):
        raise ValueError("guidance scales (--cfg-text / --cfg-image) with --ceiling: the ceiling samples nothing")


def evaluate(sampler: sampling.Sampler, num: int, seed: int, world: shapesworld.World,
             tasks: Sequence[str] = TASKS, *, split: str = "test", steps: int | None = None,
             batch: int = 8, ceiling: bool = False, cfg_text: float | None = None, cfg_image: float | None = None
             ) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """Samples and scores ``num`` prompts per task.

    ``cfg_text`` / ``cfg_image``: guidance scales for every request (default: the checkpoint's
    ``config.sample``), recorded in the report's config.

    ``ceiling``: score the sampler's VAE reconstructions of the targets (``sampling.reconstruct``) in place of
    samples: what a model on this VAE would score if its flow ended exactly at the target's latents, i.e. the
    upper bound that the autoencoder and ``parse_scene`` leave to every score (no sampling; 100% means the
    reconstruction loses nothing the scoring reads).

    Returns ``(report, rows)``: the JSON report ``{config: ..., tasks: {task: {num, metrics, samples}}}`` and,
    per task, the samples with their images (``item`` from ``generate_sample``, ``output``, ``scores``) for
    the grids.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"no evaluation for tasks {unknown}; choose from {', '.join(TASKS)}")
    if num < 1 or batch < 1:
        raise ValueError(f"num={num}, batch={batch}: both must be >= 1")
    meta = dict(sampler.meta, ceiling=True) if ceiling else sampler.meta
    check_guidance(ceiling, cfg_text, cfg_image)
    report: dict[str, Any] = dict(config=dict(num=num, seed=seed, split=split, steps=steps, size=world.size,
                                              meta=meta), tasks={})
    if cfg_text is not None or cfg_image is not None:
        report["config"].update(cfg_text=cfg_text, cfg_image=cfg_image)
    rows: dict[str, list[dict]] = {}
    for task in tasks:
        items = [shapesworld.generate_sample(world, [seed, k], task, split) for k in range(num)]
        outputs, progress = [], _Progress(f"evaluate {task}" + " (VAE ceiling)" * ceiling, num)
        for start in range(0, num, batch):
            if start:
                progress.update(start)
            if ceiling:
                targets = np.stack([it["target"] for it in items[start:start + batch]])
                outputs.extend(np.asarray(sampling.reconstruct(sampler.params, targets, config=sampler.model_config)))
                continue
            requests = [sampling.Request(task=task, prompt=it["prompt"],
                                           images=tuple(i["image"] for i in it["inputs"]), seed=seed + k,
                                           cfg_text=cfg_text, cfg_image=cfg_image)
                        for k, it in enumerate(items[start:start + batch], start=start)]
            outputs.extend(sampler.sample(requests, size=(world.size, world.size), steps=steps))
        progress.update(num)
        rows[task] = []
        samples = []
        for k, (item, output) in enumerate(zip(items, outputs)):
            scored = score_sample(item, output, world)
            rows[task].append(dict(item=item, output=output, scores=scored["scores"]))
            samples.append(dict(index=k, noise_seed=seed + k, prompt=item["prompt"], op=item["op"],
                                target_scene=item["target_scene"], pred_scene=scored["pred_scene"],
                                scores=scored["scores"]))
        scores = [s["scores"] for s in samples]
        report["tasks"][task] = dict(
            num=num, metrics=summarize(task, scores),
            applicable={cat: sum(s[cat] is not None for s in scores) for cat in CATEGORIES[task]}, samples=samples)
        report["tasks"][task]["breakdown"] = BREAKDOWNS[task](samples)
    return report, rows


class _Progress:
    """``evaluate <task>: 16/100 samples | 2.1 samples/s | ETA 40.0s`` after the first sampler call, the last, and
    any call ``seconds`` after the previous line. The rate is measured from the end of the first call, so the
    sampler's compilation (in the first call) counts in no rate or ETA."""

    def __init__(self, what: str, num: int, seconds: float = 10.0, clock: Callable[[], float] = time.perf_counter,
                 log: Callable[[str], Any] = logging.info):
        self.what, self.num, self.seconds, self.clock, self.log = what, num, seconds, clock, log
        self.first: tuple[float, int] | None = None
        self.last = 0.0

    def update(self, done: int) -> str | None:
        now = self.clock()
        if self.first is None:
            self.first = (now, done)
        elif done < self.num and now - self.last < self.seconds:
            return None
        self.last = now
        parts = [f"{self.what}: {done}/{self.num} samples"]
        seconds, count = now - self.first[0], done - self.first[1]
        if count and seconds > 0:
            parts += [f"{count / seconds:.3g} samples/s",
                      f"ETA {metrics_lib.format_duration((self.num - done) * seconds / count)}"]
        line = " | ".join(parts)
        self.log(line)
        return line


def format_metric(name: str, value: float | None) -> str:
    """A metric as the reports show it: preservation as an L1 (4 decimals), the rest as a percentage."""
    return "n/a" if value is None else f"{value:.4f}" if name == "preservation" else f"{100 * value:.1f}%"


def markdown(report: Mapping[str, Any]) -> str:
    """A table of the metrics per task."""
    c = report["config"]
    lines = [f"# ShapesWorld evaluation: split {c['split']}, {c['num']} samples per task, seed {c['seed']}", ""]
    for task, block in report["tasks"].items():
        metrics = block["metrics"]
        lines += [f"## {task}", "", "| metric | value | samples |", "| --- | --- | --- |"]
        for name, value in metrics.items():
            shown = format_metric(name, value)
            label = f"{name} (L1, lower is better)" if name == "preservation" else name
            lines.append(f"| {label} | {shown} | {block['applicable'].get(name, block['num'])} |")
        lines.append("")
        if "breakdown" in block:
            lines += _breakdown_markdown(block["breakdown"])
    return "\n".join(lines)


def _breakdown_markdown(breakdown: Mapping[str, Any]) -> list[str]:
    """A task's breakdown (``BREAKDOWNS``) as small tables."""
    if "by_op" in breakdown:
        lines = ["By operation:", "", "| operation | samples | success | preservation (L1) |",
                 "| --- | --- | --- | --- |"]
        for kind, g in breakdown["by_op"].items():
            lines.append(f"| {kind} | {g['num']} | {format_metric('success', g['metrics']['success'])} | "
                         f"{format_metric('preservation', g['metrics']['preservation'])} |")
        return lines + [""]
    if "per_subject" in breakdown:
        per = breakdown["per_subject"]
        checks = SUBJECT_CHECKS + ("anywhere",)
        return [f"Per asked subject ({per['subjects']}): its cell holds an object (placed), a textured subject, its "
                "shape / texture / colours / all of them (look); the subject drawn anywhere:", "",
                "| " + " | ".join(checks) + " |", "|" + " --- |" * len(checks),
                "| " + " | ".join(format_metric(c, per[c]) for c in checks) + " |", ""]
    groups = breakdown["by_objects"]
    lines = ["By the number of objects the prompt asks for:", "",
             "| metric | " + " | ".join(f"{n} ({g['num']} prompts)" for n, g in groups.items()) + " |",
             "| --- |" + " --- |" * len(groups)]
    for cat in CATEGORIES["t2i"]:
        lines.append(f"| {cat} | " + " | ".join(format_metric(cat, g["metrics"][cat]) for g in groups.values()) + " |")
    per = breakdown["per_object"]
    lines += ["", f"Per asked object ({per['objects']}): the asked cell holds an object (placed) of the asked "
              "colour / shape / size / colour and shape (look); objects drawn where none was asked, per prompt:", "",
              "| " + " | ".join(OBJECT_CHECKS) + " | extra |", "|" + " --- |" * (len(OBJECT_CHECKS) + 1),
              "| " + " | ".join(format_metric(c, per[c]) for c in OBJECT_CHECKS)
              + " | " + ("n/a" if per["extra"] is None else f"{per['extra']:.2f}") + " |", ""]
    return lines


def _tile(image: np.ndarray, scale: int, border: tuple[int, int, int] | None = None) -> Image.Image:
    tile = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    framed = Image.new("RGB", (tile.width + 6, tile.height + 6), border or (200, 200, 200))
    framed.paste(tile, (3, 3))
    return framed


def grid_image(rows: Sequence[Mapping[str, Any]], min_tile: int = 128) -> Image.Image:
    """One row per sample under its prompt: ``inputs | output | target``, the output framed green (passes
    ``overall``/``success``) or red; a row without ``scores`` (a training preview) is captioned and framed grey."""
    size = rows[0]["item"]["target"].shape[0]
    scale = max(1, -(-min_tile // size))
    cell = size * scale + 6
    columns = max(len(r["item"]["inputs"]) for r in rows) + 2
    caption = 14
    passed = [row["scores"].get("overall", row["scores"].get("success")) if "scores" in row else None
              for row in rows]
    texts = [row["item"]["prompt"] if ok is None else f"{'PASS' if ok else 'FAIL'}: {row['item']['prompt']}"
             for ok, row in zip(passed, rows)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(columns * cell, *(int(measure.textlength(t)) + 4 for t in texts))
    canvas = Image.new("RGB", (width, len(rows) * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (row, ok, text) in enumerate(zip(rows, passed, texts)):
        y = i * (cell + caption)
        draw.text((2, y + 1), text, fill=(0, 0, 0))
        images = [inp["image"] for inp in row["item"]["inputs"]]
        for j, image in enumerate(images):
            canvas.paste(_tile(image, scale), (j * cell, y + caption))
        canvas.paste(_tile(row["output"], scale, None if ok is None else (30, 170, 30) if ok else (220, 30, 30)),
                     ((columns - 2) * cell, y + caption))
        canvas.paste(_tile(row["item"]["target"], scale), ((columns - 1) * cell, y + caption))
    return canvas


def write_report(out: str | os.PathLike, report: Mapping[str, Any], rows: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """``report.json``, ``report.md`` and ``TASK.png`` per task under ``out``; returns the paths."""
    paths = [storage.join(out, "report.json"), storage.join(out, "report.md")]  # a local folder or a bucket
    storage.write_whole(paths[0], json.dumps(report, indent=1))
    storage.write_whole(paths[1], markdown(report))
    for task, task_rows in rows.items():
        paths.append(storage.join(out, f"{task}.png"))
        png = io.BytesIO()
        grid_image(task_rows).save(png, format="PNG")
        storage.write_whole(paths[-1], png.getvalue())
    return paths


def untrained(sampler: sampling.Sampler, seed: int = 0) -> sampling.Sampler:
    """The baseline beside a trained model: the same config with the VLM, connector and MMDiT re-initialised at
    random (``seed``), the VAE kept (a random decoder would fail every category for a trivial reason)."""
    fresh = QueryKontext(sampler.model_config).init(jax.random.key(seed), components=("vlm", "connector", "mmdit"))
    meta = dict(sampler.meta or {}, untrained=True, init_seed=seed)
    return sampling.Sampler(sampler.config, dict(sampler.params, **fresh), meta=meta)


def evaluate_seeds(sampler: sampling.Sampler, out: str | os.PathLike, world: shapesworld.World, *, num: int,
                   seeds: Sequence[int], tasks: Sequence[str] = TASKS, split: str = "test", steps: int | None = None,
                   batch: int = 8, ceiling: bool = False) -> dict[str, Any]:
    """``evaluate`` once per seed into ``out/seed_<s>``; ``out/summary.json``/``summary.md`` hold every metric's
    mean, min and max over the seeds. Returns the summary."""
    per_seed, meta = {}, sampler.meta
    for seed in seeds:
        report, rows = evaluate(sampler, num, seed, world, tasks, split=split, steps=steps, batch=batch,
                                ceiling=ceiling)
        write_report(storage.join(out, f"seed_{seed}"), report, rows)
        per_seed[seed] = {task: block["metrics"] for task, block in report["tasks"].items()}
        meta = report["config"]["meta"]
    summary: dict[str, Any] = dict(num=num, seeds=list(seeds), split=split, steps=steps, meta=meta, tasks={})
    for task in tasks:
        summary["tasks"][task] = {}
        for name in per_seed[seeds[0]][task]:
            values = [per_seed[s][task][name] for s in seeds if per_seed[s][task][name] is not None]
            summary["tasks"][task][name] = (dict(mean=float(np.mean(values)), min=float(np.min(values)),
                                                 max=float(np.max(values))) if values else None)
    storage.write_whole(storage.join(out, "summary.json"), json.dumps(summary, indent=1))
    storage.write_whole(storage.join(out, "summary.md"), summary_markdown({"model": summary}))
    return summary


def summary_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One table: a row per (task, metric), a column per summary (e.g. trained and untrained): mean [min, max]."""
    names = list(summaries)
    first = summaries[names[0]]
    lines = [f"ShapesWorld {first['split']} split, {first['num']} samples per task, seeds {first['seeds']}", "",
             "| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metrics in first["tasks"].items():
        for metric in metrics:
            cells = []
            for name in names:
                v = summaries[name]["tasks"].get(task, {}).get(metric)
                if v is None:
                    cells.append("n/a")
                elif metric == "preservation":
                    cells.append(f"{v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]")
                else:
                    cells.append(f"{100 * v['mean']:.1f}% [{100 * v['min']:.0f}, {100 * v['max']:.0f}]")
            label = "preservation L1 (lower is better)" if metric == "preservation" else metric
            lines.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
