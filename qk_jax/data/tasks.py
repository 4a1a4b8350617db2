"""The task vocabulary: every task, the input roles it takes and how many of each. The one place it is written.

The manifest validates records with it, ShapesWorld generates its tasks, the pipeline indexes batches by it
(``batch["task"]`` is an index into ``TASKS``), the sampler routes a request's images with it and the
evaluator and ``diagnose`` choose their tasks from it.

Roles: ``vlm`` (the VLM sees the image, nothing else: reconstruction, transformation), ``source`` (editing:
pixel fidelity, the negative sRoPE quadrant) and ``reference`` (a subject's identity, shifted sRoPE; at most
``config.max_references``). The VLM sees every input; from stage 3 on the VAE also encodes sources and references.

=============  ========================================  =====================================================
task           inputs                                    what it is (paper table 3, MIGE)
=============  ========================================  =====================================================
t2i            none                                      text to image
recon          1 vlm                                     reconstruct the image the VLM reads (stages 1-2)
transform      1 or more vlm                             "mirror the image" (stage 1)
edit           1 source (+ vlm)                          instruction editing
custom         1 reference (+ vlm)                       one subject placed as the prompt says
multi          2 or more references (+ vlm)              several subjects composed
subject_edit   1 source, then 1 or more references       a subject put into a source image (MIGE)
=============  ========================================  =====================================================
"""

from __future__ import annotations

import types
from collections.abc import Mapping

TASKS = ("t2i", "recon", "transform", "edit", "custom", "multi", "subject_edit")  # batch["task"] indexes this
ROLES = ("vlm", "source", "reference")
# task -> {role: (min, max or None)}; roles not listed may not appear.
TASK_ROLES: Mapping[str, Mapping[str, tuple[int, int | None]]] = types.MappingProxyType({
    "t2i": {},
    "recon": {"vlm": (1, 1)},
    "transform": {"vlm": (1, None)},
    "edit": {"source": (1, 1), "vlm": (0, None)},
    "custom": {"reference": (1, 1), "vlm": (0, None)},
    "multi": {"reference": (2, None), "vlm": (0, None)},
    "subject_edit": {"source": (1, 1), "reference": (1, None), "vlm": (0, None)},
})
# The tasks a trained model is asked for (recon and transform only teach stages 1-2 to read images).
SAMPLING_TASKS = tuple(t for t in TASKS if t not in ("recon", "transform"))
# The tasks with an in-context (VAE-encoded) input, and those whose input is a source image to preserve.
IN_CONTEXT_TASKS = tuple(t for t in SAMPLING_TASKS if set(TASK_ROLES[t]) & {"source", "reference"})
SOURCE_TASKS = tuple(t for t in TASKS if "source" in TASK_ROLES[t])

# What to use instead when a count does not fit: (task, role, too few / too many) -> the better task.
_INSTEAD = {("custom", "reference", "many"): "multi", ("multi", "reference", "few"): "custom",
            ("edit", "reference", "many"): "subject_edit", ("t2i", "source", "many"): "edit",
            ("t2i", "reference", "many"): "custom"}


def check_task(task: str, tasks: tuple[str, ...] = TASKS) -> str:
    """``task`` if it is one of ``tasks``, else ``ValueError`` naming them."""
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(tasks)}")
    return task


def check_inputs(task: str, counts: Mapping[str, int]) -> None:
    """Raise ``ValueError`` naming the task, the role, the count and the fix unless ``counts`` (role -> number of
    inputs) fits ``TASK_ROLES[task]``."""
    check_task(task)
    rules = TASK_ROLES[task]
    for role in ROLES:
        low, high = rules.get(role, (0, 0))
        have = int(counts.get(role, 0))
        if have < low or (high is not None and have > high):
            if high == 0:
                want = f"no {role!r} input"
            elif low == high:
                want = f"{low} {role!r} input" + ("s" if low > 1 else "")
            else:
                want = f"{low}..{'any' if high is None else high} {role!r} inputs"
            instead = _INSTEAD.get((task, role, "few" if have < low else "many"))
            raise ValueError(f"task {task!r} takes {want}, got {have}"
                             + (f"; use task {instead!r}" if instead else ""))


def sampling_roles(task: str, num_images: int) -> tuple[str, ...]:
    """The role of each of a sampling request's ``num_images`` input images, in order: the source first where the
    task takes one, then references. Raises ``ValueError`` (``check_inputs``) when the count does not fit."""
    check_task(task, SAMPLING_TASKS)
    sources = min(num_images, 1) if "source" in TASK_ROLES[task] else 0
    roles = ("source",) * sources + ("reference",) * (num_images - sources)
    check_inputs(task, {role: roles.count(role) for role in ROLES})
    return roles
