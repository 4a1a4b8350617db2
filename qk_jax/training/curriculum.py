"""The curriculum: stage 0 (when the config has one), then every stage of ``config.stages`` in
``<workdir>/<name>``, each starting from the one before, then the evaluation of the last one.

``python -m qk_jax.train --config configs/shapes.py --workdir runs/shapes`` runs ``run_curriculum``. A rerun
skips what is done (a stage's ``final/``, stage 0's ``stage0.json``, the evaluation's ``report.md``).
"""

from __future__ import annotations

import copy
import time

from absl import logging

from qk_jax import sampling, storage
from qk_jax.data import shapesworld
from qk_jax.evaluation import scoring
from qk_jax.models import saved_model
from qk_jax.parallel import planner
from qk_jax.training import loop, stages
from qk_jax.training import metrics as metrics_lib
from qk_jax.training import stage0 as stage0_lib


def run_curriculum(config, workdir: str) -> None:
    """Every stage of ``config.stages`` in ``workdir/<name>``, each starting from the one before; first stage 0
    (``qk_jax.training.stage0``, in ``workdir/stage0``) when the config has a ``stage0`` block: the first stage then
    imports its VLM and VAE, and every stage takes its measured latent factors."""
    stage0 = None
    later = _later_flops(config, workdir)
    if config.get("stage0") is not None:
        started = time.time()
        stage0 = stage0_lib.run(config, storage.join(workdir, stage0_lib.DIRNAME))  # skipped when done
        logging.info("stage0 took %s", metrics_lib.format_duration(time.time() - started))
    for index, stage_config in enumerate(config.stages):
        stage_config = copy.deepcopy(stage_config)
        if stage0 is not None:
            stage_config = stage0_lib.with_stage0(stage_config, stage0, first=index == 0)
        if stage_config.get("init_from") and not storage.is_absolute(stage_config.init_from):
            stage_config.init_from = storage.join(workdir, stage_config.init_from)
        started = time.time()
        final_dir = loop.train_stage(stage_config, storage.join(workdir, stage_config.name), later_flops=later[index])
        logging.info("%s took %s", stage_config.name, metrics_lib.format_duration(time.time() - started))
    if config.get("evaluate") is not None:
        started = time.time()
        evaluate_curriculum(config, final_dir, storage.join(workdir, "eval"))
        logging.info("evaluation took %s", metrics_lib.format_duration(time.time() - started))


def _later_flops(config, workdir: str) -> list[float]:
    """Per stage, the planner's training FLOPs of the stages after it that are still to run (``final/`` absent):
    what the progress lines turn into the curriculum's ETA (the evaluation not counted)."""
    flops = [0.0 if storage.exists(storage.join(workdir, s.name, stages.FINAL, saved_model.MODEL_CONFIG_FILE))
             else planner.Planner(s).flops_per_sample * int(s.batch_size) * int(s.total_steps)
             for s in config.stages]
    return [sum(flops[index + 1:]) for index in range(len(flops))]


def evaluate_curriculum(config, final_dir: str, out: str) -> str:
    """Scores the last stage's model, its untrained baseline (``qk_jax.evaluation.scoring.untrained``) and the VAE's
    ceiling (the targets' reconstructions, ``scoring.evaluate(ceiling=True)``) on the held-out split as
    ``config.evaluate`` says; ``out/report.md`` puts them side by side. Skipped when it exists."""
    report = storage.join(out, "report.md")
    if storage.exists(report):
        logging.info("evaluation done already: %s", report)
        return report
    e = config.evaluate
    sampler = sampling.Sampler.from_checkpoint(final_dir)
    world = shapesworld.World.from_config(config.world, size=int(config.stages[-1].resolution))
    kwargs = dict(tasks=tuple(e.tasks), steps=e.get("steps"), batch=int(e.get("batch", 8)))
    summaries, num = {}, int(e.samples_per_task)
    for name, model, seeds, n, ceiling in (
            ("trained", sampler, tuple(e.seeds), num, False),
            ("untrained", scoring.untrained(sampler), tuple(e.seeds)[:1], int(e.get("untrained_samples", 0))
             or num, False),
            ("ceiling", sampler, tuple(e.seeds)[:1], num, True)):
        logging.info("evaluating the %s model: %d samples per task, seeds %s", name, n, seeds)
        summaries[name] = scoring.evaluate_seeds(model, storage.join(out, name), world, seeds=seeds, num=n,
                                                      ceiling=ceiling, **kwargs)
    table = scoring.summary_markdown(summaries)
    storage.write_whole(report, f"# {final_dir}: trained vs untrained (seed {tuple(e.seeds)[0]},"
                                f" {summaries['untrained']['num']} samples per task) vs the VAE's ceiling (the"
                                f" targets' reconstructions scored, seed {tuple(e.seeds)[0]})\n\n{table}")
    logging.info("evaluation:\n%s", table)
    return report
