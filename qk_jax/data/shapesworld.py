r"""ShapesWorld: a synthetic world with ground truth a program can score (docs/design.md, "ShapesWorld").

``write_dataset(out, num, seed=0)`` writes a dataset; the command is ``python -m qk_jax.data.make_shapesworld
--out /tmp/shapes --num 10000 --seed 0 [--size 64] [--tasks t2i --tasks edit ...]``.

A scene is 1-3 flat objects on a white canvas, one per cell of a 3x3 grid. An object is a plain shape
(circle / square / triangle, one of 6 colors, small or large) or a *subject*: a large shape with a two-color
``stripes`` (horizontal bands) or ``checker`` texture; a subject's identity is (shape, texture, its two colors).
Objects are rasterised without anti-aliasing from pixel-centre tests, each inside its own cell, so

- ``parse_scene`` reads a rendered image back exactly: colour segmentation (nearest palette colour), connected
  components, shape by fill ratio of the bounding box (triangle ~0.5, circle ~0.79, square 1), size by extent,
  grid cell by the bounding-box centre, texture by how uniform each row's colour is (stripes: one colour per row);
- an edit that names one object changes only the pixels of that object's cell; everything else is
  pixel-identical (``tests/test_shapesworld.py`` checks it).

Tasks (the manifest format of ``qk_jax.data.manifest``; ``<image k>`` marks where input k sits in the prompt,
inputs the prompt does not place come before the text):

=============  ====================================================  ==========================================
task           inputs (role)                                         prompt, e.g.
=============  ====================================================  ==========================================
t2i            none                                                  "a large red circle at the top left and a
                                                                      small blue square at the center"
recon          the target itself (vlm)                               "redraw <image 1>"
transform      a scene (vlm)                                         "mirror the image" / "swap the colors" /
                                                                      "move everything left"
edit           a scene (source)                                      "make the red circle green" / "remove the
                                                                      blue square" / "add a small yellow
                                                                      triangle at the bottom right"
custom         a subject alone, large, at the centre (reference)     "put the subject from <image 1> at the
                                                                      bottom left with a large red circle at
                                                                      the top"
multi          two subjects (reference, reference)                   "put the subject from <image 1> at the top
                                                                      left and the subject from <image 2> at the
                                                                      center"
subject_edit   a scene (source) and a subject (reference)            "add the subject from <image 2> at the top
                                                                      right of <image 1>" / "replace the red
                                                                      circle in <image 1> with the subject from
                                                                      <image 2>"
=============  ====================================================  ==========================================

Held-out split. A fixed fraction of the (color, shape, cell) combinations of plain objects and of the subjects
is held out, chosen by ``World.heldout_seed`` (not by the sample seed, so every dataset generated from one
world shares them). No image of a training sample (target, source or reference) contains a held-out
combination or subject; every test sample's target or reference contains at least one. Subjects are always
large (their texture must stay legible at 64 px) and t2i/recon/transform/edit scenes hold plain objects only.

Output of ``write_dataset`` (deterministic for a seed: the same arguments give byte-identical files)::

  OUT/world.json                          the world, the held-out combinations and subjects
  OUT/{train,test}/manifest.jsonl         one record per sample, paths relative to this folder
  OUT/{train,test}/images/NNNNNNN.png     the target; .json beside it: its scene and the inputs' scenes
  OUT/{train,test}/images/NNNNNNN_in1.png source scenes (edit, transform, subject_edit)
  OUT/{train,test}/subjects/NAME.png      reference images, one per subject, shared by the samples
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from qk_jax.data import manifest as manifest_lib
from qk_jax.data.tasks import TASKS  # ShapesWorld generates every task

CELL_NAMES = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
TRANSFORMS = ("mirror", "swap", "move")
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPLITS = {"train": 0, "test": 1}
PROMPT_TOKEN = re.compile(r"<image \d+>|\w+|[^\w\s]")

Scene = list  # of object dicts, sorted by cell (see ``_canonical``)


# ----------------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    """ShapesWorld's settings (``config.data.world`` of the ``shapes``/``tiny`` configs) and the canvas size."""

    size: int = 64
    background: tuple[int, int, int] = (255, 255, 255)
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 30, 30)), ("green", (30, 160, 50)), ("blue", (30, 70, 220)),
        ("yellow", (240, 210, 20)), ("purple", (140, 50, 170)), ("orange", (245, 130, 20)))
    sizes: tuple[tuple[str, float], ...] = (("small", 0.5), ("large", 0.9))  # side / cell side
    grid: int = 3
    textures: tuple[str, ...] = ("stripes", "checker")
    heldout_fraction: float = 0.1
    heldout_seed: int = 0

    def __post_init__(self):
        if self.grid != 3:
            raise ValueError(f"ShapesWorld names positions on a 3x3 grid; got grid={self.grid}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid**2:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {self.min_objects}, {self.max_objects}")
        if self.size < 8 * self.grid:
            raise ValueError(f"canvas of {self.size} px is too small for a {self.grid}x{self.grid} grid; use >= 24")
        if set(self.shapes) - {"circle", "square", "triangle"} or set(self.textures) - {"stripes", "checker"}:
            raise ValueError(f"unknown shapes {self.shapes} or textures {self.textures}")
        if len(self.colors) < 2:
            raise ValueError("ShapesWorld needs at least two colors (subjects have two)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None = None, size: int | None = None) -> World:
        """From ``config.data.world`` (``configs.common.shapesworld_block``) and the canvas size
        (``config.resolution``)."""
        cfg = dict(cfg or {})
        kw: dict[str, Any] = {}
        for key in ("min_objects", "max_objects", "grid", "heldout_seed"):
            if key in cfg:
                kw[key] = int(cfg[key])
        if "heldout_fraction" in cfg:
            kw["heldout_fraction"] = float(cfg["heldout_fraction"])
        if "background" in cfg:
            kw["background"] = tuple(int(v) for v in cfg["background"])
        for key in ("shapes", "textures"):
            if key in cfg:
                kw[key] = tuple(cfg[key])
        if "colors" in cfg:
            kw["colors"] = tuple((str(k), tuple(int(c) for c in v)) for k, v in dict(cfg["colors"]).items())
        if "sizes" in cfg:
            kw["sizes"] = tuple((str(k), float(v)) for k, v in dict(cfg["sizes"]).items())
        if size is not None:
            kw["size"] = int(size)
        return cls(**kw)

    # Derived geometry ------------------------------------------------------------------------------------

    @property
    def color_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colors)

    @property
    def palette(self) -> np.ndarray:
        """``[1 + n_colors, 3]`` float32: the background, then the colors in order."""
        return np.asarray([self.background] + [rgb for _, rgb in self.colors], np.float32)

    @property
    def cell(self) -> float:
        return self.size / self.grid

    def side(self, size_name: str) -> int:
        """An object's side in pixels (at least 4)."""
        return max(4, int(round(dict(self.sizes)[size_name] * self.cell)))

    def band(self, side: int) -> int:
        """Texture period of a subject of this side: about a quarter of it, at least 2 px."""
        return max(2, int(round(side / 4)))

    @property
    def subjects(self) -> list[dict]:
        """Every subject: (shape, texture, two colors in palette order)."""
        return [
            dict(shape=s, texture=t, colors=[a, b])
            for s in self.shapes for t in self.textures for a, b in itertools.combinations(self.color_names, 2)
        ]

    @property
    def combos(self) -> list[tuple[str, str, tuple[int, int]]]:
        """Every (color, shape, cell) combination of a plain object."""
        cells = [(r, c) for r in range(self.grid) for c in range(self.grid)]
        return [(col, s, cell) for col in self.color_names for s in self.shapes for cell in cells]

    def heldout(self) -> tuple[set, set]:
        """The held-out (color, shape, cell) combinations and subject keys, fixed by ``heldout_seed``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.heldout_seed, 7919]))
        combos, subjects = self.combos, self.subjects
        n_c = max(1, int(round(self.heldout_fraction * len(combos))))
        n_s = max(1, int(round(self.heldout_fraction * len(subjects))))
        held_c = {combos[i] for i in rng.permutation(len(combos))[:n_c]}
        held_s = {subject_key(subjects[i]) for i in rng.permutation(len(subjects))[:n_s]}
        return held_c, held_s

    def to_json(self) -> dict:
        held_c, held_s = self.heldout()
        return dict(
            world=dataclasses.asdict(self),
            heldout_combos=sorted([c, s, list(cell)] for c, s, cell in held_c),
            heldout_subjects=sorted(list(k) for k in held_s),
        )


def default_world(size: int = 64) -> World:
    """The world of ``configs.common.shapesworld_block()`` at ``size`` pixels."""
    from configs import common  # the configs package ships beside qk_jax (setup.cfg)

    return World.from_config(common.shapesworld_block(), size=size)


def subject_key(obj: Mapping) -> tuple[str, str, str, str]:
    return (obj["shape"], obj["texture"], *obj["colors"])


def is_subject(obj: Mapping) -> bool:
    return "texture" in obj


def _canonical(scene: Iterable[Mapping]) -> Scene:
    """Objects as plain dicts sorted by cell (row-major), cells as lists: the JSON and comparison form."""
    out = []
    for obj in scene:
        o = dict(obj)
        o["cell"] = [int(v) for v in o["cell"]]
        if is_subject(o):
            o["colors"] = list(o["colors"])
        out.append(o)
    return sorted(out, key=lambda o: tuple(o["cell"]))


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, side: int, cx: float, cy: float, size: int) -> np.ndarray:
    """Boolean ``[size, size]``: pixels whose centre lies in the shape of side ``side`` centred at (cx, cy)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy, r = xs - cx, ys - cy, side / 2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":  # apex up, base at the bottom: half-width grows linearly from 0 to r
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _center(cell: Sequence[int], world: World) -> tuple[float, float]:
    row, col = cell
    return (col + 0.5) * world.cell, (row + 0.5) * world.cell


def render(scene: Iterable[Mapping], world: World) -> np.ndarray:
    """A scene as uint8 ``[size, size, 3]`` RGB. Each object is drawn inside its own cell."""
    colors = dict(world.colors)
    img = np.empty((world.size, world.size, 3), np.uint8)
    img[:] = world.background
    cells = set()
    for obj in scene:
        cell = tuple(obj["cell"])
        if cell in cells:
            raise ValueError(f"two objects in cell {cell}: {scene}")
        cells.add(cell)
        side = world.side(obj["size"])
        cx, cy = _center(cell, world)
        mask = _shape_mask(obj["shape"], side, cx, cy, world.size)
        if not is_subject(obj):
            img[mask] = colors[obj["color"]]
            continue
        ys, xs = np.mgrid[0 : world.size, 0 : world.size].astype(np.float64) + 0.5
        band = world.band(side)
        x0, y0 = cx - side / 2, cy - side / 2
        rows = np.floor((ys - y0) / band).astype(int)
        if obj["texture"] == "stripes":
            second = rows % 2 == 1
        elif obj["texture"] == "checker":
            second = (rows + np.floor((xs - x0) / band).astype(int)) % 2 == 1
        else:
            raise ValueError(f"unknown texture {obj['texture']!r}")
        first_rgb, second_rgb = colors[obj["colors"][0]], colors[obj["colors"][1]]
        img[mask & ~second] = first_rgb
        img[mask & second] = second_rgb
    return img


def render_subject(subject: Mapping, world: World) -> np.ndarray:
    """A reference image: the subject alone, large, at the centre."""
    mid = world.grid // 2
    return render([dict(subject, size="large", cell=[mid, mid])], world)


def subject_filename(subject: Mapping) -> str:
    return "_".join(subject_key(subject)) + ".png"


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------


def parse_scene(image: np.ndarray, world: World | None = None, *, min_area_fraction: float = 0.3) -> Scene:
    """Reads an image back into its scene: a list of objects sorted by cell.

    Every pixel takes the nearest palette colour (the background included); non-background pixels are
    grouped in 8-connected components, components smaller than ``min_area_fraction`` of a small triangle are
    noise. For each component:

    - colour: one colour with >= 80% of its pixels is a plain object; otherwise the two commonest colours
      make a subject (in palette order);
    - shape: fill ratio of its bounding box, triangle < 0.65 <= circle < 0.9 <= square;
    - size: the longer bounding-box side over the cell side, small < 0.7 <= large (the world's 0.5 and 0.9);
    - cell: the cell holding the bounding-box centre;
    - texture (subjects): stripes when most rows are one colour (>= 85% of a row's pixels on average), else
      checker.

    Args:
      image: uint8 or float ``[H, W, 3]`` RGB in [0, 255]; any size (it is read at its own scale).
      world: the palette, sizes and grid (default: ``default_world(H)``).

    Returns:
      Object dicts as ``render`` takes them: ``{shape, color, size, cell}`` or, for a subject,
      ``{shape, texture, colors, size, cell}``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"parse_scene expects an RGB image [H, W, 3], got shape {image.shape}")
    height, width = image.shape[:2]
    world = world or default_world(height)
    palette = world.palette
    dist = ((image.astype(np.float32)[:, :, None, :] - palette) ** 2).sum(-1)  # [H, W, 1 + n_colors]
    labels = dist.argmin(-1)  # 0 = background
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3), bool))
    cell_h, cell_w = height / world.grid, width / world.grid
    min_area = min_area_fraction * 0.5 * (dict(world.sizes)["small"] * min(cell_h, cell_w)) ** 2
    names = world.color_names
    scene = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        mask = components[box] == index
        area = int(mask.sum())
        if area < min_area:
            continue
        box_h, box_w = mask.shape
        fill = area / (box_h * box_w)
        shape = "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"
        extent = max(box_h / cell_h, box_w / cell_w)
        size = "small" if extent < 0.7 else "large"
        cy = (box[0].start + box[0].stop) / 2
        cx = (box[1].start + box[1].stop) / 2
        cell = [min(int(cy // cell_h), world.grid - 1), min(int(cx // cell_w), world.grid - 1)]
        obj_labels = labels[box][mask] - 1
        counts = np.bincount(obj_labels, minlength=len(names))
        order = np.argsort(-counts, kind="stable")
        if counts[order[0]] >= 0.8 * area:
            scene.append(dict(shape=shape, color=names[order[0]], size=size, cell=cell))
            continue
        pair = sorted(order[:2].tolist())
        local = np.where(mask, labels[box] - 1, -1)
        uniformity = []
        for row in local:
            row = row[row >= 0]
            if row.size >= 3:
                uniformity.append(np.bincount(row).max() / row.size)
        # A sliver no row of which is 3 px wide (a reconstruction's stray edge) has no readable bands: checker.
        texture = "stripes" if uniformity and np.mean(uniformity) >= 0.85 else "checker"
        scene.append(dict(shape=shape, texture=texture, colors=[names[i] for i in pair], size=size, cell=cell))
    return _canonical(scene)


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


def cell_name(cell: Sequence[int]) -> str:
    return CELL_NAMES[cell[0]][cell[1]]


def describe(obj: Mapping) -> str:
    """``"a small red circle"`` (plain objects; prompts name subjects by their reference image)."""
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


def _placed(obj: Mapping) -> str:
    return f"{describe(obj)} at the {cell_name(obj['cell'])}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _name(obj: Mapping, scene: Sequence[Mapping]) -> str:
    """How an instruction names a plain object: by colour and shape, plus its position when not unique."""
    same = [o for o in scene if not is_subject(o) and o["color"] == obj["color"] and o["shape"] == obj["shape"]]
    base = f"the {obj['color']} {obj['shape']}"
    return base if len(same) == 1 else f"{base} at the {cell_name(obj['cell'])}"


def prompt_words(world: World | None = None, samples: int = 3000) -> list[str]:
    """The words and punctuation ShapesWorld prompts use (``<image k>`` is one word), for a word-level tokenizer.

    Collected from ``samples`` drawn prompts of every task (scenes only, nothing rendered).
    """
    world = world or World()
    words = set()
    sampler = _Sampler(world, np.random.default_rng(0))
    for i in range(samples):
        words.update(PROMPT_TOKEN.findall(_TASK_FNS[TASKS[i % len(TASKS)]](sampler)["prompt"]))
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------------------


class _Sampler:
    """Draws objects and scenes with a NumPy generator."""

    def __init__(self, world: World, rng: np.random.Generator):
        self.world, self.rng = world, rng

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def count(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return int(self.rng.integers(low, high + 1))

    def count_before_add(self) -> int:
        """Objects in a scene that gains one: the result has min..max objects, the scene itself >= 1 if it can."""
        w = self.world
        return self.count(min(max(w.min_objects - 1, 1), w.max_objects - 1), w.max_objects - 1)

    def free_cells(self, scene: Sequence[Mapping]) -> list[list[int]]:
        used = {tuple(o["cell"]) for o in scene}
        g = self.world.grid
        return [[r, c] for r in range(g) for c in range(g) if (r, c) not in used]

    def plain(self, cell) -> dict:
        w = self.world
        return dict(shape=self.choice(w.shapes), color=self.choice(w.color_names),
                    size=self.choice([n for n, _ in w.sizes]), cell=list(cell))

    def subject(self, exclude: Sequence[tuple] = ()) -> dict:
        choices = [s for s in self.world.subjects if subject_key(s) not in set(exclude)]
        return dict(self.choice(choices), size="large")

    def scene(self, n: int | None = None, cells: Sequence[Sequence[int]] | None = None) -> list[dict]:
        w = self.world
        n = self.count(w.min_objects, w.max_objects) if n is None else n
        cells = cells if cells is not None else self.free_cells([])
        picked = self.rng.permutation(len(cells))[:n]
        return [self.plain(cells[i]) for i in sorted(picked)]


def _task_t2i(s: _Sampler) -> dict:
    scene = s.scene()
    return dict(prompt=_join([_placed(o) for o in scene]), target=scene, inputs=[], op=dict(kind="t2i"))


def _task_recon(s: _Sampler) -> dict:
    scene = s.scene()
    return dict(prompt="redraw <image 1>", target=scene, inputs=[("vlm", scene)], op=dict(kind="recon"))


def _task_transform(s: _Sampler) -> dict:
    g = s.world.grid
    kind = s.choice(TRANSFORMS)
    if kind == "mirror":
        src = s.scene()
        tgt = [dict(o, cell=[o["cell"][0], g - 1 - o["cell"][1]]) for o in src]
        prompt, op = "mirror the image", dict(kind="mirror")
    elif kind == "swap":  # two objects of different colors exchange colors
        src = s.scene(n=2)
        while src[0]["color"] == src[1]["color"]:
            src[1]["color"] = s.choice(s.world.color_names)
        tgt = [dict(src[0], color=src[1]["color"]), dict(src[1], color=src[0]["color"])]
        prompt, op = "swap the colors", dict(kind="swap")
    else:  # every object moves one cell; the scene is drawn where the move stays on the grid
        direction = s.choice(sorted(MOVES))
        dr, dc = MOVES[direction]
        cells = [[r, c] for r in range(g) for c in range(g) if 0 <= r + dr < g and 0 <= c + dc < g]
        src = s.scene(n=s.count(s.world.min_objects, min(s.world.max_objects, len(cells))), cells=cells)
        tgt = [dict(o, cell=[o["cell"][0] + dr, o["cell"][1] + dc]) for o in src]
        prompt, op = f"move everything {direction}", dict(kind="move", direction=direction)
    return dict(prompt=prompt, target=tgt, inputs=[("vlm", src)], op=op)


def _task_edit(s: _Sampler) -> dict:
    w = s.world
    kinds = ["recolor", "remove", "add"] if w.max_objects > 1 else ["recolor"]
    kind = s.choice(kinds)
    if kind == "add":
        src = s.scene(n=s.count_before_add())
        new = s.plain(s.choice(s.free_cells(src)))
        tgt = src + [new]
        instruction = f"add {_placed(new)}"
        op = dict(kind="add", object=new)
    else:
        src = s.scene(n=s.count(max(w.min_objects, 2) if kind == "remove" else w.min_objects, w.max_objects))
        victim = s.choice(src)
        name = _name(victim, src)
        if kind == "remove":
            tgt = [o for o in src if o is not victim]
            instruction = f"remove {name}"
            op = dict(kind="remove", cell=victim["cell"])
        else:
            color = s.choice([c for c in w.color_names if c != victim["color"]])
            tgt = [dict(o, color=color) if o is victim else o for o in src]
            instruction = f"make {name} {color}"
            op = dict(kind="recolor", cell=victim["cell"], color=color)
    prompt = instruction if s.rng.integers(2) else f"in <image 1> {instruction}"
    return dict(prompt=prompt, target=tgt, inputs=[("source", src)], op=op)


def _subject_phrase(index: int, obj: Mapping) -> str:
    return f"the subject from <image {index}> at the {cell_name(obj['cell'])}"


def _extras(s: _Sampler, scene: list[dict], most: int) -> list[dict]:
    free = s.free_cells(scene)
    n = s.count(0, most)
    return [s.plain(free[i]) for i in sorted(s.rng.permutation(len(free))[:n])]


def _task_custom(s: _Sampler) -> dict:
    subject = s.subject()
    placed = dict(subject, cell=s.choice(s.free_cells([])))
    extras = _extras(s, [placed], s.world.max_objects - 1)
    prompt = "put " + _subject_phrase(1, placed)
    if extras:
        prompt += " with " + _join([_placed(o) for o in extras])
    return dict(prompt=prompt, target=[placed] + extras, inputs=[("reference", subject)],
                op=dict(kind="custom"))


def _task_multi(s: _Sampler) -> dict:
    first = s.subject()
    second = s.subject(exclude=[subject_key(first)])
    cells = s.free_cells([])
    a, b = (cells[i] for i in s.rng.permutation(len(cells))[:2])
    placed = [dict(first, cell=a), dict(second, cell=b)]
    extras = _extras(s, placed, max(0, s.world.max_objects - 2))
    prompt = "put " + _phrase_pair(placed)
    if extras:
        prompt += " with " + _join([_placed(o) for o in extras])
    return dict(prompt=prompt, target=placed + extras, inputs=[("reference", first), ("reference", second)],
                op=dict(kind="multi"))


def _phrase_pair(placed: Sequence[Mapping]) -> str:
    return _subject_phrase(1, placed[0]) + " and " + _subject_phrase(2, placed[1])


def _task_subject_edit(s: _Sampler) -> dict:
    w = s.world
    subject = s.subject()
    if w.max_objects > 1 and s.rng.integers(2):  # add into a free cell
        src = s.scene(n=s.count_before_add())
        placed = dict(subject, cell=s.choice(s.free_cells(src)))
        tgt = src + [placed]
        prompt = f"add the subject from <image 2> at the {cell_name(placed['cell'])} of <image 1>"
        op = dict(kind="add_subject", cell=placed["cell"])
    else:  # replace a plain object by the subject, in its cell
        src = s.scene()
        victim = s.choice(src)
        placed = dict(subject, cell=victim["cell"])
        tgt = [placed if o is victim else o for o in src]
        prompt = f"replace {_name(victim, src)} in <image 1> with the subject from <image 2>"
        op = dict(kind="replace_subject", cell=victim["cell"])
    return dict(prompt=prompt, target=tgt, inputs=[("source", src), ("reference", subject)], op=op)


_TASK_FNS = dict(t2i=_task_t2i, recon=_task_recon, transform=_task_transform, edit=_task_edit,
                 custom=_task_custom, multi=_task_multi, subject_edit=_task_subject_edit)


def _heldout_hits(draft: Mapping, held_c: set, held_s: set) -> tuple[int, int]:
    """(held-out elements in the target and references, held-out elements anywhere in the sample)."""

    def hits(objs):
        n = 0
        for o in objs:
            if is_subject(o):
                n += subject_key(o) in held_s
            else:
                n += (o["color"], o["shape"], tuple(o["cell"])) in held_c
        return n

    refs = [obj for role, obj in draft["inputs"] if role == "reference"]
    sources = [o for role, obj in draft["inputs"] if role != "reference" for o in obj]
    target_hits = hits(draft["target"]) + hits(refs)
    return target_hits, target_hits + hits(sources)


def generate_sample(world: World, seed: int | Sequence[int], task: str, split: str = "train",
                    *, max_tries: int = 10_000) -> dict:
    """One sample, rendered in memory; deterministic for ``(seed, task, split)``.

    Returns a dict: ``task``, ``prompt``, ``target`` (uint8 ``[S, S, 3]``), ``target_scene``, ``inputs``
    (a list of dicts ``{role, image, scene}``; a reference's scene is its subject alone at the centre),
    ``op`` (what the instruction does, for the evaluator) and ``split``.
    """
    if task not in _TASK_FNS:
        raise ValueError(f"unknown ShapesWorld task {task!r}; choose from {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    seed = [int(seed)] if np.isscalar(seed) else [int(v) for v in seed]
    rng = np.random.default_rng(np.random.SeedSequence(seed + [SPLITS[split], TASKS.index(task)]))
    sampler = _Sampler(world, rng)
    held_c, held_s = world.heldout()
    for _ in range(max_tries):
        draft = _TASK_FNS[task](sampler)
        in_target, anywhere = _heldout_hits(draft, held_c, held_s)
        if (split == "train" and anywhere == 0) or (split == "test" and in_target > 0):
            break
    else:
        raise RuntimeError(f"no {split} sample of task {task!r} in {max_tries} draws; lower heldout_fraction")
    inputs = []
    mid = world.grid // 2
    for role, obj in draft["inputs"]:
        if role == "reference":
            scene = _canonical([dict(obj, size="large", cell=[mid, mid])])
            inputs.append(dict(role=role, image=render_subject(obj, world), scene=scene,
                               subject={k: obj[k] for k in ("shape", "texture", "colors")}))
        else:
            inputs.append(dict(role=role, image=render(obj, world), scene=_canonical(obj)))
    return dict(task=task, prompt=draft["prompt"], target=render(draft["target"], world),
                target_scene=_canonical(draft["target"]), inputs=inputs, op=draft["op"], split=split)


# ----------------------------------------------------------------------------------------------------------
# Writing a dataset
# ----------------------------------------------------------------------------------------------------------


def _save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")  # Pillow writes no timestamp: byte-identical for a seed


def write_split(out: str, split: str, num: int, seed: int, world: World, tasks: Sequence[str]) -> str:
    """Writes ``num`` samples of ``split`` under ``out/split``; returns the manifest path.

    Sample ``i`` has task ``tasks[i % len(tasks)]`` and is drawn from ``(seed, i)`` alone, so a dataset
    of N samples is a prefix of one of N + 1 samples.
    """
    root = os.path.join(out, split)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "subjects"), exist_ok=True)
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        for i in range(num):
            task = tasks[i % len(tasks)]
            sample = generate_sample(world, (seed, i), task, split)
            sid = f"{i:07d}"
            target = f"images/{sid}.png"
            _save_png(sample["target"], os.path.join(root, target))
            inputs = []
            for k, inp in enumerate(sample["inputs"], start=1):
                if inp["role"] == "reference":
                    path = "subjects/" + subject_filename(inp["subject"])
                    if not os.path.exists(os.path.join(root, path)):
                        _save_png(inp["image"], os.path.join(root, path))
                elif task == "recon":
                    path = target  # the same image
                else:
                    path = f"images/{sid}_in{k}.png"
                    _save_png(inp["image"], os.path.join(root, path))
                inputs.append(dict(path=path, role=inp["role"]))
            meta = dict(scene=sample["target_scene"], input_scenes=[inp["scene"] for inp in sample["inputs"]],
                        op=sample["op"], split=split, world_size=world.size)
            with open(os.path.join(root, "images", f"{sid}.json"), "w", encoding="utf-8") as g:
                json.dump(meta, g, sort_keys=True)
            record = dict(id=f"shapes-{split}-{sid}", task=task, prompt=sample["prompt"], target=target,
                          inputs=inputs, meta=meta)
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return manifest


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ShapesManifest:
    """ShapesWorld as a manifest (``qk_jax.data.manifest.Manifest``) whose records are drawn when they are read.

    Record ``i`` is the sample ``write_split`` would write as its ``i``-th, ``generate_sample(world, (seed, i),
    tasks[i % len(tasks)], split)``, with its images PNG-encoded inside the record, as an ArrayRecord manifest
    holds them. Nothing touches the disk, so ``num`` can be as large as training wants: ShapesWorld has far more
    scenes than a recipe can see, and a small written dataset is seen many times over (the shapes recipe's first
    4,000 samples gave each of its 572 text-to-image prompts about 50 epochs). Drawing and encoding a sample
    takes about a millisecond, well under a CPU training step's share per sample.

    Args:
      world: the world (``World.from_config(config.data.world, size=...)``).
      num: records in the manifest (the dataset's epoch).
      seed: the generation seed; ``(seed, i)`` draws record ``i``.
      tasks: the tasks in their round-robin order.
      split: ``'train'`` or ``'test'``.
    """

    def __init__(self, world: World, num: int, seed: int = 0, tasks: Sequence[str] = TASKS, split: str = "train"):
        import collections

        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown ShapesWorld tasks {unknown or '(none given)'}; choose from {', '.join(TASKS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        if num < 1:
            raise ValueError(f"num={num}: a ShapesWorld manifest needs at least one record")
        self.world, self.num, self.seed, self.split = world, int(num), int(seed), split
        self._tasks = tuple(tasks)
        self.name = f"ShapesWorld({split}, seed {seed}, {num} records drawn on the fly)"  # in logs and errors
        self.problems: collections.Counter = collections.Counter()  # drawn records are never bad
        self.examples: dict[str, str] = {}

    def __len__(self) -> int:
        return self.num

    def tasks(self) -> list[str]:
        n = len(self._tasks)
        return [self._tasks[i % n] for i in range(self.num)]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < self.num:
            raise IndexError(f"record {i} of a {self.num}-record ShapesWorld manifest")
        task = self._tasks[i % len(self._tasks)]
        sample = generate_sample(self.world, (self.seed, i), task, self.split)
        target = _png(sample["target"])
        inputs = tuple(manifest_lib.InputImage(image=target if task == "recon" else _png(inp["image"]),
                                               role=inp["role"]) for inp in sample["inputs"])
        meta = dict(scene=sample["target_scene"], input_scenes=[inp["scene"] for inp in sample["inputs"]],
                    op=sample["op"], split=self.split, world_size=self.world.size)
        return manifest_lib.Record(id=f"shapes-{self.split}-{i:07d}", task=task, prompt=sample["prompt"],
                                   target=target, inputs=inputs, meta=meta, index=i)


def write_dataset(out: str, num: int, *, num_test: int | None = None, seed: int = 0, size: int = 64,
                  tasks: Sequence[str] = TASKS) -> dict[str, tuple[int, str]]:
    """Writes ``out/world.json`` and the train and test splits (``write_split``) of the default world at ``size``
    px; returns ``{split: (samples, manifest path)}``. ``num_test`` None: ``num // 10``, at least 1."""
    world = default_world(size)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "world.json"), "w", encoding="utf-8") as f:
        json.dump(world.to_json(), f, indent=1, sort_keys=True)
    num_test = max(1, num // 10) if num_test is None else num_test
    return {split: (n, write_split(out, split, n, seed, world, list(tasks)))
            for split, n in (("train", num), ("test", num_test))}
