r"""Train Query-Kontext: one stage, or a whole curriculum.

``python -m qk_jax.train --config configs/stage3.py:shapes --workdir /tmp/qk_stage3 [--config.optim.lr=1e-4]``
``python -m qk_jax.train --config configs/shapes.py --workdir runs/shapes``  (stages 1 -> 2 -> 3 back to back)

A stage, in order: set-up (mesh, model, the stage's starting params from ``config.init_from`` or random/imported,
shardings, train state, data pipeline, resume from the latest checkpoint), the jitted step, the loop (progress
line, metrics JSONL/TensorBoard, periodic asynchronous checkpoints with the data iterator's state), and the end
(a final checkpoint and a self-contained model in ``<workdir>/final``, which the next stage and the sampler
read). Rerunning the same command resumes where the last checkpoint left off; a finished stage is skipped, and
compiled programs come back from JAX's persistent compilation cache in ``<workdir>/xla_cache``
(``use_compilation_cache``).

The ShapesWorld configs generate their data under ``<workdir>/data`` (curriculum) when ``config.data.manifest``
is unset.
"""

from __future__ import annotations

import copy
import logging as pylogging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from qk_jax import pretrain
from qk_jax.data import buckets
from qk_jax.data import pipeline as pipeline_lib
from qk_jax.data import shapes
from qk_jax.data.manifest import TASKS
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig, vlm_image_grid
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.pytree import leaf_paths
from qk_jax.training import checkpoint as ckpt
from qk_jax.training import metrics as metrics_lib
from qk_jax.training import stages
from qk_jax.training import state as state_lib
from qk_jax.training.step import make_train_step


# The batch entries the model reads (the rest of the pipeline's schema is bookkeeping for the host).
MODEL_KEYS = ("target", "inputs", "roles", "image_present", "input_ids", "attention_mask", "pixel_values", "task",
              "valid")
# Step metrics summed between two log lines (divided by the step count for the line); lr and the non-finite
# counter are read at the last step.
SUMMED = ("loss", "grad_norm", "task_loss_sum", "task_count")
COMPILATION_CACHE = "xla_cache"


def new_shape_message(seen: set, step: int, host_batch: Mapping[str, Any], grid: tuple) -> str | None:
    """A log line the first time a batch shape comes, else ``None`` (``seen`` collects the shapes). The step
    compiles once per shape, tens of seconds each on a GPU host in stage 3 (0, 1 or 2 input images, a few text
    lengths), with no other line meanwhile: this says why the log goes quiet."""
    signature = (grid, buckets.shape_key({k: v for k, v in host_batch.items() if k in MODEL_KEYS}))
    if signature in seen:
        return None
    seen.add(signature)
    batch, height, width = np.shape(host_batch["target"])[:3]
    slots = np.shape(host_batch["roles"])[1] if "roles" in host_batch else 0  # input images per sample
    return (f"step {step}: batch shape #{len(seen)} ({batch} x {height}x{width} px, {slots} input image slot(s), "
            f"{np.shape(host_batch['input_ids'])[1]} text tokens): compiling the step (or loading it from the "
            f"compilation cache)")


def use_compilation_cache(workdir: str) -> str:
    """Turn on JAX's persistent compilation cache in ``<workdir>/xla_cache``, unless one is set already
    (``JAX_COMPILATION_CACHE_DIR``, e.g. one folder shared by runs side by side, or a bucket on a pod), and
    return the folder in use. A resumed or rerun stage, the ablations and the evaluation then load the programs
    of shapes compiled before instead of compiling them again: on an H200 each batch shape of the ShapesWorld
    stage-3 step took 32-52 s to compile (2026-11-28), and a stage meets four to six of them. Call it before
    the first compilation: JAX decides once per process whether the cache is used."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        directory = os.path.join(workdir, COMPILATION_CACHE)
        jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def _param_shardings(model: QueryKontext, mesh, config) -> dict[str, Any]:
    """Per component: the VLM by its tensor-parallel rules, the rest by the MMDiT's (replicated: ZeRO-2)."""
    abstract = model.abstract_params()
    rules = dict(vlm=config.sharding.vlm_rules)
    return {name: mesh_lib.logical_shardings(tree, mesh, rules.get(name, config.sharding.mmdit_rules))
            for name, tree in abstract.items()}


def _subset(tree: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``tree`` with ``like``'s nested keys."""
    return {k: _subset(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}


def _state_shardings(state: state_lib.TrainState, params_sh: Mapping[str, Any], mesh, config
                     ) -> state_lib.TrainState:
    """Shardings of every field: params by the logical rules, optimizer moments ZeRO-sharded over data x fsdp."""
    params_sh = nn.meta.unbox(params_sh)
    axes = tuple(config.sharding.get("opt_state_axes", ("data", "fsdp")))
    trainable_sh = _subset(params_sh, state.trainable)
    return state.replace(
        step=mesh_lib.replicated(mesh),
        trainable=trainable_sh,
        frozen=_subset(params_sh, state.frozen),
        opt_state=jax.tree.map(lambda x: mesh_lib.zero_sharding(x.shape, mesh, axes), state.opt_state),
        ema=None if state.ema is None else trainable_sh,
        rng=mesh_lib.replicated(mesh),
    )


def _cast_frozen(frozen: dict[str, Any], config) -> dict[str, Any]:
    """The frozen VLM in ``config.vlm.frozen_dtype`` (bf16 at paper scale: half the memory, no optimizer)."""
    dtype = jnp.dtype(config.vlm.get("frozen_dtype", "float32"))
    if "vlm" in frozen:
        frozen = dict(frozen, vlm=jax.tree.map(lambda x: x.astype(dtype), frozen["vlm"]))
    return frozen


def _manifest(config) -> str | shapes.ShapesManifest:
    """``config.data.manifest``; else ShapesWorld (``config.data.world``): ``data.num_samples`` records drawn as
    they are read (``shapes.ShapesManifest``), or, when ``config.data.dir`` is set, written there once."""
    manifest = config.data.get("manifest")
    if manifest:
        return manifest
    if "world" not in config.data:
        raise ValueError("config.data.manifest is not set; give a manifest (qk_jax.data.manifest) for this config")
    world = shapes.World.from_config(config.data.world, size=int(config.data.resolution))
    num, seed = int(config.data.get("num_samples") or 2000), int(config.get("seed", 0))
    data_dir = config.data.get("dir")
    if not data_dir:
        return shapes.ShapesManifest(world, num, seed, shapes.TASKS)
    path = os.path.join(data_dir, "train", "manifest.jsonl")
    if not os.path.exists(path):
        logging.info("generating ShapesWorld: %d samples at %d px in %s", num, world.size, data_dir)
        shutil.rmtree(data_dir + ".tmp", ignore_errors=True)  # a generation a crash cut short
        shapes.write_split(data_dir + ".tmp", "train", num, seed, world, shapes.TASKS)
        os.replace(data_dir + ".tmp", data_dir)  # complete or absent: a crash mid-generation leaves no manifest
    return path


class Setup(NamedTuple):
    """What a stage trains with: the model, the optimizer and its schedule, the sharded state and its layout."""

    model: QueryKontext
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: state_lib.TrainState
    state_shardings: state_lib.TrainState


def build(config, mesh) -> Setup:
    """The model, the stage's starting params (``stages.initial_params``) split into a sharded train state."""
    model = QueryKontext(QueryKontextConfig.from_config(config))
    init_rng, state_rng = jax.random.split(jax.random.key(int(config.get("seed", 0))))
    params = stages.initial_params(model, config, init_rng)
    optimizer = state_lib.make_optimizer(config.optim, int(config.total_steps))
    schedule = state_lib.learning_rate_schedule(config.optim, int(config.total_steps))
    state = state_lib.init_state(params, config.trainable, optimizer, state_rng, config.get("ema_decay"))
    state = state.replace(frozen=_cast_frozen(state.frozen, config))
    state_sh = _state_shardings(state, _param_shardings(model, mesh, config), mesh, config)
    return Setup(model, optimizer, schedule, jax.device_put(state, state_sh), state_sh)


def train_stage(config, workdir: str) -> str:
    """Train one stage in ``workdir``; returns the final model directory."""
    final_dir = os.path.join(workdir, stages.FINAL)
    if os.path.exists(os.path.join(final_dir, ckpt.MODEL_CONFIG_FILE)):
        logging.info("stage %s is complete (%s); skipping", config.stage, final_dir)
        return final_dir
    os.makedirs(workdir, exist_ok=True)

    # --- set-up ---------------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    setup = build(config, mesh)
    state = setup.state

    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in (("trainable", state.trainable), ("frozen", state.frozen))}
    logging.info("stage %s | mesh %s | parameters: %s total, %s trainable, %s frozen", config.stage,
                 dict(mesh.shape), f"{sum(counts.values()):,}", f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    logging.info("trainable leaves: %d (e.g. %s)", len(leaf_paths(state.trainable)), leaf_paths(state.trainable)[:3])

    data = pipeline_lib.make_pipeline(config, manifest=_manifest(config))
    iterator = iter(data)
    checkpointer = ckpt.Checkpointer(workdir, save_every=int(config.get("checkpoint_every", 500)),
                                     keep=int(config.get("keep_checkpoints", 3)))
    checkpointer.save_frozen(state.frozen)  # once per stage: frozen weights never change
    if checkpointer.latest_step() is not None:
        state, data_state, _ = checkpointer.restore(state)
        state = state.replace(frozen=checkpointer.restore_frozen(state.frozen))
        iterator.set_state(data_state)
        logging.info("resumed from step %d", int(state.step))
    meta = dict(stage=int(config.stage))

    # --- the step ---------------------------------------------------------------------------------------------
    step_fn = make_train_step(setup.model, setup.optimizer, setup.schedule, setup.state_shardings)

    # --- the loop ---------------------------------------------------------------------------------------------
    total = int(config.total_steps)
    log_every = int(config.get("log_every", 10))
    start = int(state.step)
    writer = metrics_lib.MetricsWriter(workdir, start_step=start) if jax.process_index() == 0 else None
    progress = metrics_lib.Progress(total, start_step=start, every=log_every)
    acc, last_logged, shapes_seen = None, start, set()
    max_nonfinite = int(config.optim.get("max_nonfinite", 10))
    for step in range(start + 1, total + 1):
        host_batch = next(iterator)
        grid = vlm_image_grid(host_batch)
        if (message := new_shape_message(shapes_seen, step, host_batch, grid)) is not None:
            logging.info(message)
        batch = mesh_lib.shard_batch({k: host_batch[k] for k in MODEL_KEYS if k in host_batch}, mesh)
        state, metrics = step_fn(state, batch, grid)
        summed = {k: metrics[k] for k in SUMMED}
        acc = summed if acc is None else jax.tree.map(jnp.add, acc, summed)
        if step % log_every == 0 or step == total:
            host, latest = jax.device_get((acc, {k: metrics[k] for k in ("lr", "nonfinite")}))
            n = step - last_logged
            scalars = dict(loss=float(host["loss"]) / n, grad_norm=float(host["grad_norm"]) / n,
                           lr=float(latest["lr"]), nonfinite=int(latest["nonfinite"]))
            scalars.update(metrics_lib.task_losses(host["task_loss_sum"], host["task_count"], TASKS))
            if writer is not None:
                writer.write(step, scalars)
                progress.update(step, scalars, images_in_step=int(config.batch_size) * n)
            if scalars["nonfinite"] > max_nonfinite:
                raise FloatingPointError(
                    f"{scalars['nonfinite']} updates skipped for NaN/inf gradients (optim.max_nonfinite="
                    f"{max_nonfinite}); lower optim.lr or check the data. The last good checkpoint is in {workdir}")
            acc, last_logged = None, step
        checkpointer.save(state, iterator.get_state(), meta)

    # --- the end ----------------------------------------------------------------------------------------------
    if checkpointer.latest_step() != int(state.step):
        checkpointer.save(state, iterator.get_state(), meta, force=True)
    checkpointer.close()
    if writer is not None:
        writer.close()
    trained = state.ema if state.ema is not None else state.trainable
    ckpt.save_model(final_dir, config, state_lib.combine(jax.device_get(trained), jax.device_get(state.frozen)),
                    meta=dict(meta, step=int(state.step), ema=state.ema is not None))
    if writer is not None:
        metrics_lib.plot(os.path.join(workdir, metrics_lib.JSONL), os.path.join(workdir, "loss.png"),
                         keys=("loss", "loss/.*"))
    logging.info("stage %s done: %s", config.stage, final_dir)
    return final_dir


def run_curriculum(config, workdir: str) -> None:
    """Every stage of ``config.stages`` in ``workdir/<name>``, each starting from the one before; first stage 0
    (``qk_jax.pretrain``, in ``workdir/stage0``) when the config has a ``stage0`` block: the first stage then
    imports its VLM and VAE, and every stage takes its measured latent factors."""
    stage0 = None
    if config.get("stage0") is not None:
        started = time.time()
        stage0 = pretrain.run(config, os.path.join(workdir, pretrain.DIRNAME))  # skipped when done
        logging.info("stage0 took %s", metrics_lib.format_duration(time.time() - started))
    for index, stage_config in enumerate(config.stages):
        stage_config = copy.deepcopy(stage_config)
        if stage0 is not None:
            pretrain.apply(stage_config, stage0, first=index == 0)
        if stage_config.get("init_from") and not os.path.isabs(stage_config.init_from):
            stage_config.init_from = os.path.join(workdir, stage_config.init_from)
        started = time.time()
        final_dir = train_stage(stage_config, os.path.join(workdir, stage_config.name))
        logging.info("%s took %s", stage_config.name, metrics_lib.format_duration(time.time() - started))
    if config.get("evaluate") is not None:
        started = time.time()
        evaluate_curriculum(config, final_dir, os.path.join(workdir, "eval"))
        logging.info("evaluation took %s", metrics_lib.format_duration(time.time() - started))


def evaluate_curriculum(config, final_dir: str, out: str) -> str:
    """Scores the last stage's model, its untrained baseline (``qk_jax.evaluate.untrained``) and the VAE's
    ceiling (the targets' reconstructions, ``evaluate(ceiling=True)``) on the held-out split as
    ``config.evaluate`` says; ``out/report.md`` puts them side by side. Skipped when it exists."""
    from qk_jax import evaluate as evaluate_lib
    from qk_jax import sample as sample_lib

    report = os.path.join(out, "report.md")
    if os.path.exists(report):
        logging.info("evaluation done already: %s", report)
        return report
    e = config.evaluate
    sampler = sample_lib.Sampler.from_checkpoint(final_dir)
    world = shapes.World.from_config(config.world, size=int(config.stages[-1].resolution))
    kwargs = dict(tasks=tuple(e.tasks), steps=e.get("steps"), batch=int(e.get("batch", 8)))
    summaries, num = {}, int(e.samples_per_task)
    for name, model, seeds, n, ceiling in (
            ("trained", sampler, tuple(e.seeds), num, False),
            ("untrained", evaluate_lib.untrained(sampler), tuple(e.seeds)[:1], int(e.get("untrained_samples", 0))
             or num, False),
            ("ceiling", sampler, tuple(e.seeds)[:1], num, True)):
        logging.info("evaluating the %s model: %d samples per task, seeds %s", name, n, seeds)
        summaries[name] = evaluate_lib.evaluate_seeds(model, os.path.join(out, name), world, seeds=seeds, num=n,
                                                      ceiling=ceiling, **kwargs)
    table = evaluate_lib.summary_markdown(summaries)
    with open(report, "w") as f:
        f.write(f"# {final_dir}: trained vs untrained (seed {tuple(e.seeds)[0]},"
                f" {summaries['untrained']['num']} samples per task) vs the VAE's ceiling (the targets'"
                f" reconstructions scored, seed {tuple(e.seeds)[0]})\n\n{table}")
    logging.info("evaluation:\n%s", table)
    return report


class _QuietLibraries(pylogging.Filter):
    """Keep Orbax's per-save INFO chatter out of the progress log (warnings and errors still show)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """``--config`` and ``--workdir``, defined when this module is the program (``qk_jax.ablate`` imports it and
    has a ``--config`` of its own)."""
    config_flags.DEFINE_config_file("config", None, "A config file: configs/stageN.py[:variant] or configs/shapes.py.",
                                    lock_config=False, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the final model go.", flag_values=flag_values)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    workdir = os.path.abspath(workdir) if workdir else workdir
    if config is None or not workdir:
        raise app.UsageError("give --config configs/stageN.py[:variant] (or configs/shapes.py) and --workdir DIR")
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()  # multi-host: TPU pod workers or one process per GPU node
    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.info("compilation cache: %s", use_compilation_cache(workdir))
    logging.info("config:\n%s", config)
    if "stages" in config:
        run_curriculum(config, workdir)
    else:
        train_stage(config, workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
