r"""The paper's ablations at ShapesWorld scale, each a config variant of one curriculum stage, in one table.

The command: ``python -m qk_jax.ablate --config configs/shapes.py --workdir runs/shapes [--which conditioning placement
source_offset] [--steps 300] [--num 50]``

Run the curriculum first (``python -m qk_jax.train --config configs/shapes.py --workdir runs/shapes``): the
stage-1 ablation starts from its stage 0 and its data, the stage-3 ones from its ``stage2/final``. Each variant
trains in ``<workdir>/ablations/<ablation>/<value>`` (rerunning resumes; finished variants are skipped), is
scored by ``qk_jax.evaluation.scoring`` on the held-out split, and ``ablations.md`` / ``ablations.json`` beside
them hold the table (a run with a narrower ``--which`` keeps the other ablations' rows from the earlier
``ablations.json``):

- ``conditioning`` (paper table 9): stage 1 with the MMDiT conditioned on the VLM's text and kontext-query
  states (the paper's model), on the text states only, or on the queries only (``config.conditioning``). The
  paper: text + queries converges best, queries only worst. Compared by the training loss over the last quarter
  of the steps, and t2i scores.
- ``placement`` (paper table 8): stage 3 trained on customization with the subject image placed as a source
  (``(0, -r, -c)``, before the target) or as a reference (``(0, r + h, c + w)``, after it)
  (``config.placement``). The paper: source preserves more of the subject's pixels, reference follows the
  prompt better. Compared by custom identity (the subject's look, our stand-in for pixel preservation) and
  placement (the asked cell: prompt following).
- ``source_offset``: stage 3 trained on editing with the source at the paper's ``(0, -r, -c)`` or FLUX.1
  Kontext's ``(1, r, c)`` (``config.source_offset``). Under RoPE the offset between a target token and the
  source token of the same pixel is position-dependent for the first and constant for the second; the paper
  makes no claim. Compared by edit success and preservation (L1 outside the edited cells, lower is better).

All variants of an ablation share the seed, the steps, the batch and the starting parameters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from qk_jax import sampling, storage
from qk_jax.data import shapesworld
from qk_jax.evaluation import scoring
from qk_jax.training import loop
from qk_jax.training import metrics as metrics_lib
from qk_jax.training import stage0 as stage0_lib
from qk_jax.training import stages

# name -> (index into config.stages, config key, its values (the paper's first), the training task mix or None
# for the stage's own, the evaluated tasks, what the paper says).
ABLATIONS = {
    "conditioning": (0, "conditioning", ("text_and_queries", "text_only", "queries_only"), None, ("t2i",),
                     "table 9: text + queries converges best, queries only worst"),
    "placement": (2, "placement", ("source", "reference"), dict(custom=1.0), ("custom",),
                  "table 8: source preserves more pixels, reference follows the prompt better"),
    "source_offset": (2, "source_offset", ("negate", "axis0"), dict(edit=1.0), ("edit",),
                      "no claim: the paper negates the source grid, FLUX.1 Kontext moves it along axis 0"),
}


def variant_config(config, ablation: str, value: str, workdir: str, steps: int | None):
    """The stage config of one variant: the curriculum's stage with ``key = value``, its tasks and steps, starting
    where that stage starts in the curriculum in ``workdir`` (stage 0's imports, or the previous stage's final)."""
    index, key, values, tasks, _, _ = ABLATIONS[ablation]
    if value not in values:
        raise ValueError(f"{ablation}: unknown value {value!r}; expected one of {values}")
    stage = copy.deepcopy(config.stages[index])
    stage[key] = value
    if tasks is not None:
        stage.tasks = dict(tasks)
    if steps:
        stage.total_steps = int(steps)
        stage.checkpoint_every = min(int(stage.checkpoint_every), int(steps))
    if config.get("stage0") is not None:
        stage = stage0_lib.with_stage0(stage, stage0_lib.run(config, storage.join(workdir, stage0_lib.DIRNAME)),
                                       first=index == 0)
    if stage.get("init_from"):
        stage.init_from = storage.join(workdir, stage.init_from)
        final = storage.join(stage.init_from, stages.FINAL)
        if not storage.path(final).is_dir():
            raise FileNotFoundError(f"{ablation} starts from {final}, which does not exist: run the curriculum first"
                                    f" (python -m qk_jax.train --config ... --workdir {workdir})")
    return stage


def tail_loss(run_dir: str, fraction: float = 0.25) -> float | None:
    """Mean logged training loss over the last ``fraction`` of the run's logged steps."""
    records = metrics_lib.read_jsonl(storage.join(run_dir, metrics_lib.JSONL))  # {step: {name: value}}
    rows = [r for r in records.values() if "loss" in r]
    if not rows:
        return None
    tail = rows[-max(1, int(round(len(rows) * fraction))):]
    return float(np.mean([r["loss"] for r in tail]))


def run_variant(config, ablation: str, value: str, workdir: str, *, steps: int | None, num: int, seed: int
                ) -> dict[str, Any]:
    """Trains (or resumes) and scores one variant; returns its row of the table."""
    stage = variant_config(config, ablation, value, workdir, steps)
    run_dir = storage.join(workdir, "ablations", ablation, value)
    final = loop.train_stage(stage, run_dir)
    sampler = sampling.Sampler.from_checkpoint(final)
    world = shapesworld.World.from_config(stage.data.world, size=int(stage.data.resolution))
    report, rows = scoring.evaluate(sampler, num, seed, world, ABLATIONS[ablation][4])
    scoring.write_report(storage.join(run_dir, "eval"), report, rows)
    metrics = {task: block["metrics"] for task, block in report["tasks"].items()}
    return dict(ablation=ablation, value=value, steps=int(stage.total_steps), loss=tail_loss(run_dir),
                metrics=metrics)


def verdict(ablation: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Whether the measured ordering agrees with the paper's (or, for source_offset, which one won)."""
    by = {r["value"]: r for r in rows}
    if ablation == "conditioning":
        losses = {v: r["loss"] for v, r in by.items() if r["loss"] is not None}
        if len(losses) < 3:
            return "incomplete"
        order = sorted(losses, key=losses.get)
        agrees = order[0] == "text_and_queries" and order[-1] == "queries_only"
        return f"loss order {' < '.join(order)}: {'agrees' if agrees else 'disagrees'} with the paper"
    if ablation == "placement":
        src, ref = by["source"]["metrics"]["custom"], by["reference"]["metrics"]["custom"]
        identity = src["identity"] > ref["identity"]
        placement = ref["placement"] > src["placement"]
        return (f"source keeps identity better: {'yes' if identity else 'no'}; reference places better: "
                f"{'yes' if placement else 'no'} ({'agrees' if identity and placement else 'does not fully agree'}"
                " with the paper)")
    neg, k = by["negate"]["metrics"]["edit"], by["axis0"]["metrics"]["edit"]
    better = "negate (the paper's)" if neg["preservation"] < k["preservation"] else "axis0 (Kontext's)"
    return f"lower preservation error: {better}"


def markdown(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    lines = ["# Ablations at ShapesWorld scale", ""]
    for ablation, rows in results.items():
        paper = ABLATIONS[ablation][5]
        names = sorted({f"{task}/{m}" for r in rows for task, ms in r["metrics"].items() for m in ms})
        lines += [f"## {ablation}", "", f"Paper: {paper}.", "",
                  "| variant | steps | train loss (last 25%) | " + " | ".join(names) + " |",
                  "|---" * (3 + len(names)) + "|"]
        for r in rows:
            cells = []
            for name in names:
                task, m = name.split("/")
                value = r["metrics"].get(task, {}).get(m)
                cells.append(scoring.format_metric(m, value))
            loss = "n/a" if r["loss"] is None else f"{r['loss']:.4f}"
            lines.append(f"| {r['value']} | {r['steps']} | {loss} | " + " | ".join(cells) + " |")
        lines += ["", f"Measured: {verdict(ablation, rows)}.", ""]
    return "\n".join(lines)


def earlier_results(out: str, keep: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The rows of the ablations in ``keep`` from an earlier ``ablations.json`` in ``out`` (none if absent), so that
    a run with a narrower ``--which`` adds to the table instead of replacing it."""
    path = storage.join(out, "ablations.json")
    if not storage.exists(path):
        return {}
    earlier = json.loads(storage.read_text(path))
    return {name: earlier[name] for name in ABLATIONS if name in keep and name in earlier}


def run_ablations(config, workdir: str, which: Sequence[str], *, steps: int | None, num: int, seed: int) -> str:
    """Every variant of the ablations ``which`` on the curriculum that ran in ``workdir``; writes and returns the
    table (``<workdir>/ablations/ablations.md``, rows of ablations not rerun kept from ``ablations.json``)."""
    loop.use_compilation_cache(workdir)  # the curriculum's cache: shapes that it or another variant compiled load
    out = storage.join(workdir, "ablations")
    results = earlier_results(out, keep=[a for a in ABLATIONS if a not in which])
    for ablation in which:
        results[ablation] = []
        for value in ABLATIONS[ablation][2]:
            logging.info("ablation %s = %s", ablation, value)
            results[ablation].append(run_variant(config, ablation, value, workdir, steps=steps, num=num, seed=seed))
            storage.write_whole(storage.join(out, "ablations.json"), json.dumps(results, indent=1))
    table = markdown({name: results[name] for name in ABLATIONS if name in results})  # kept rows in place
    storage.write_whole(storage.join(out, "ablations.md"), table)
    return table
