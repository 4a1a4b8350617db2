r"""Training one stage: set-up, the one training loop (shared with stage 0), the end of a stage.

A stage (``train_stage``), in order: set-up (mesh, model, the stage's starting params from ``config.init_from`` or
random/imported, shardings, train state, data pipeline, resume from the latest checkpoint), the jitted step
(``qk_jax.training.step``), the loop (``run_loop``: progress line, metrics JSONL/TensorBoard, the non-finite
guard, periodic asynchronous checkpoints with the data iterator's state), and the end (a final checkpoint and a
self-contained model in ``<workdir>/final``, ``qk_jax.models.saved_model``, which the next stage and the sampler
read). Rerunning the same command resumes where the last checkpoint left off; a finished stage is skipped, and
compiled programs come back from JAX's persistent compilation cache in ``<workdir>/xla_cache``
(``use_compilation_cache``).

The ShapesWorld configs generate their data under ``config.data.dir`` when it is set, else draw it as it is read
(``training_manifest``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import threading
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from qk_jax import storage
from qk_jax.data import buckets, processors, shapesworld
from qk_jax.data import pipeline as pipeline_lib
from qk_jax.data.tasks import TASKS
from qk_jax.models import saved_model
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig, vlm_image_grid
from qk_jax.parallel import distributed
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.parallel import planner
from qk_jax.pytree import leaf_paths, path_str
from qk_jax.training import checkpoint as ckpt
from qk_jax.training import metrics as metrics_lib
from qk_jax.training import stages
from qk_jax.training import state as state_lib
from qk_jax.training.step import make_train_step

# The batch entries the model reads (the rest of the pipeline's schema is bookkeeping for the host).
MODEL_KEYS = ("target", "inputs", "roles", "image_present", "input_ids", "attention_mask", "pixel_values", "task",
              "valid")
# Step metrics read at the last step of a log line; every other metric is summed between two lines and divided
# by the step count (per-task loss sums and counts become per-task means: ``metrics_lib.task_losses``).
LATEST = ("lr", "nonfinite")
STREAK = "nonfinite_streak"  # updates skipped in a row: its most since the last line is what the guard reads
COMPILATION_CACHE = "xla_cache"
GB = 1e9


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


class BatchShapeMismatch(ValueError):
    """The processes of a multi-process run read batches of different shapes at one step (per-process reading)."""


def check_same_shape(step: int, host_batch: Mapping[str, Any], grid: tuple) -> None:
    """Per-process reading (``pipeline.reads_global_stream`` False): every process's batch must have one shape.
    Otherwise each process assembles a global batch of its own shape and compiles its own step; their gradient
    collectives still pair up (the parameters have one shape), so without this check two processes of
    ``tests/test_multiprocess.py``'s mismatch trained to the end, silently wrong. A host-level all-gather of a
    fingerprint of the shapes, once per step (before the step is dispatched); a mismatch raises the same
    ``BatchShapeMismatch`` on every process, naming the fix."""
    shapes = (grid, buckets.shape_key({k: v for k, v in host_batch.items() if k in MODEL_KEYS}))
    fingerprint = zlib.crc32(repr(shapes).encode()) % 2**31
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray([fingerprint], np.int32))).reshape(-1)
    if len(set(everyone.tolist())) > 1:
        differing = [int(p) for p in np.flatnonzero(everyone != everyone[0])]
        raise BatchShapeMismatch(
            f"step {step}: the processes read batches of different shapes (processes {differing} differ from process "
            f"0; this one, {jax.process_index()}: {shapes}). Each process reads its own records "
            "(--config.data.global_stream=False), and theirs bucket differently: aspect ratios, input counts or "
            "bad records differ between them. Use --config.data.global_stream=True: every process buckets the whole "
            "global stream from the images' headers and decodes only its own rows (the same batches for any "
            "process count)")


def use_compilation_cache(workdir: str) -> str:
    """Turn on JAX's persistent compilation cache in ``<workdir>/xla_cache``, unless one is set already
    (``JAX_COMPILATION_CACHE_DIR``, e.g. one folder shared by runs side by side, or a bucket on a pod), and
    return the folder in use. A resumed or rerun stage, the ablations and the evaluation then load the programs
    of shapes compiled before instead of compiling them again: on an H200 each batch shape of the ShapesWorld
    stage-3 step took 32-52 s to compile (2026-11-28), and a stage meets four to six of them. Call it before
    the first compilation: JAX decides once per process whether the cache is used."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:  # a bucket workdir keeps it on the host: a bucket round trip per program is slow
        directory = (storage.local_cache_dir(COMPILATION_CACHE) if storage.is_remote(workdir)
                     else os.path.join(workdir, COMPILATION_CACHE))
        jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def _param_shardings(model: QueryKontext, mesh, config) -> dict[str, Any]:
    """Per component (unboxed): the VLM by its tensor-parallel rules, the rest by the MMDiT's (replicated: the
    ZeRO-2 masters are split in ``_state_shardings``)."""
    abstract = model.abstract_params()
    rules = dict(vlm=config.sharding.vlm_rules)
    return nn.meta.unbox({name: mesh_lib.logical_shardings(tree, mesh, rules.get(name, config.sharding.mmdit_rules))
                          for name, tree in abstract.items()})


def _subset(tree: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``tree`` with ``like``'s nested keys."""
    return {k: _subset(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}


def zero_axes(config) -> tuple[str, ...]:
    """The mesh axes ZeRO splits the optimizer state (and, at ZeRO-2, the masters and gradients) over."""
    return tuple(config.sharding.get("opt_state_axes", ("data", "fsdp")))


def _state_shardings(state: state_lib.TrainState, params_sh: Mapping[str, Any], mesh, config
                     ) -> state_lib.TrainState:
    """Shardings of every field: params by the logical rules, optimizer moments ZeRO-sharded over the data axes,
    and at ``sharding.mmdit_zero_stage`` 2 the float32 masters (and EMA) of every trainable leaf outside the VLM
    too (``qk_jax.parallel.zero``; the VLM keeps its tensor-parallel layout)."""
    axes = zero_axes(config)
    zero2 = int(config.sharding.get("mmdit_zero_stage", 2)) >= 2

    def master(path, leaf, logical):
        return mesh_lib.zero_sharding(leaf.shape, mesh, axes) if zero2 and path[0].key != "vlm" else logical

    trainable_sh = jax.tree_util.tree_map_with_path(master, state.trainable, _subset(params_sh, state.trainable))
    return state.replace(
        step=mesh_lib.replicated(mesh),
        trainable=trainable_sh,
        frozen=_subset(params_sh, state.frozen),
        opt_state=jax.tree.map(lambda x: mesh_lib.zero_sharding(x.shape, mesh, axes), state.opt_state),
        ema=None if state.ema is None else trainable_sh,
        rng=mesh_lib.replicated(mesh),
    )


def cast_frozen(frozen: dict[str, Any], config) -> dict[str, Any]:
    """The frozen VLM in ``config.vlm.frozen_dtype`` (bf16 at paper scale: half the memory, no optimizer), and the
    frozen MMDiT's kernels (stage 3's base under LoRA) in the compute dtype: its layers cast them to it for every
    matmul anyway, so storing them so changes no number and halves them at paper scale (20 GB per device). The
    stage's saved model keeps them in that dtype, as it keeps the frozen VLM's."""
    dtype = jnp.dtype(config.vlm.get("frozen_dtype", "float32"))
    if "vlm" in frozen:
        frozen = dict(frozen, vlm=jax.tree.map(lambda x: x.astype(dtype), frozen["vlm"]))
    compute = jnp.dtype(config.get("compute_dtype", "float32"))
    if "mmdit" in frozen:
        frozen = dict(frozen, mmdit=jax.tree_util.tree_map_with_path(
            lambda p, x: x.astype(compute) if path_str(p).endswith("kernel") else x, frozen["mmdit"]))
    return frozen


def training_manifest(config) -> str | shapesworld.ShapesManifest:
    """``config.data.manifest``; else ShapesWorld (``config.data.world``): ``data.num_samples`` records drawn as
    they are read (``shapesworld.ShapesManifest``), or, when ``config.data.dir`` is set, written there once."""
    manifest = config.data.get("manifest")
    if manifest:
        return manifest
    if "world" not in config.data:
        raise ValueError("config.data.manifest is not set; give a manifest (qk_jax.data.manifest) for this config")
    world = shapesworld.World.from_config(config.data.world, size=int(config.data.resolution))
    num, seed = int(config.data.get("num_samples") or 2000), int(config.get("seed", 0))
    data_dir = config.data.get("dir")
    if not data_dir:
        return shapesworld.ShapesManifest(world, num, seed, shapesworld.TASKS)
    path = os.path.join(data_dir, "train", "manifest.jsonl")
    if not os.path.exists(path):
        logging.info("generating ShapesWorld: %d samples at %d px in %s", num, world.size, data_dir)
        shutil.rmtree(data_dir + ".tmp", ignore_errors=True)  # a generation a crash cut short
        shapesworld.write_split(data_dir + ".tmp", "train", num, seed, world, shapesworld.TASKS)
        os.replace(data_dir + ".tmp", data_dir)  # complete or absent: a crash mid-generation leaves no manifest
    return path


def _flat_json(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _flat_json(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_same_config(final_dir: str, config) -> None:
    """A finished stage is skipped only for the config that made it (saved in its ``config.json``); another one
    raises ``CheckpointMismatchError`` naming the first differences and the way out."""
    saved = _flat_json(json.loads(storage.read_text(storage.join(final_dir, saved_model.MODEL_CONFIG_FILE)))["config"])
    now = _flat_json(json.loads(config.to_json_best_effort()))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        details = "; ".join(f"{k}: {saved.get(k)!r} when it ran, {now.get(k)!r} now" for k in diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise saved_model.CheckpointMismatchError(
            f"stage {config.stage} finished in {storage.path(final_dir).parent} with another config: {details}{more}. "
            "Give another --workdir to train this config, or rerun with the config it was trained with")


def skipped_summary(counts: Mapping[str, int], good: int) -> str:
    """``"skipped 37 bad records: 30 corrupt_image, 7 unsafe_path (12,000 good records)"`` for the end of a stage."""
    bad = {kind: n for kind, n in counts.items() if n}
    if not bad:
        return f"no bad record ({good:,} good records)"
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(bad.items(), key=lambda kv: -kv[1]))
    return f"skipped {sum(bad.values()):,} bad records: {kinds} ({good:,} good records)"


class Setup(NamedTuple):
    """What a stage trains with: the model, the optimizer and its schedule, the sharded state and its layout."""

    model: QueryKontext
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    init_memory: Any = None  # XLA's memory analysis of the program that made ``state`` (per device)


class Layout(NamedTuple):
    """A stage's pieces from shapes alone (nothing allocated): ``make_state(params)`` builds the train state,
    ``abstract`` is its shapes and ``shardings`` its layout on the mesh."""

    model: QueryKontext
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    make_state: Callable[[Any], state_lib.TrainState]
    abstract: state_lib.TrainState
    shardings: state_lib.TrainState


def _rngs(config) -> tuple[jax.Array, jax.Array]:
    """``(init_rng, state_rng)``: the random parameters' key and the train state's, from ``config.seed``."""
    init_rng, state_rng = jax.random.split(jax.random.key(int(config.get("seed", 0))))
    return init_rng, state_rng


def layout(config, mesh) -> Layout:
    """The model, optimizer and the train state's shapes and shardings on ``mesh`` (``jax.eval_shape``)."""
    model = QueryKontext(QueryKontextConfig.from_config(config))
    state_rng = _rngs(config)[1]
    optimizer = state_lib.make_optimizer(config.optim, int(config.total_steps))
    schedule = state_lib.learning_rate_schedule(config.optim, int(config.total_steps))

    def make_state(params):
        state = state_lib.init_state(params, config.trainable, optimizer, state_rng, config.get("ema_decay"))
        return state.replace(frozen=cast_frozen(state.frozen, config))

    abstract = jax.eval_shape(make_state, nn.meta.unbox(model.abstract_params()))
    return Layout(model, optimizer, schedule, make_state, abstract,
                  _state_shardings(abstract, _param_shardings(model, mesh, config), mesh, config))


def compile_step(config, mesh, slots: int | None = None) -> jax.stages.Compiled:
    """The stage's training step lowered and compiled for ``mesh`` from shapes alone, nothing allocated: on this
    host's devices, or on a TPU topology's (``mesh_lib.topology_devices``) from a CPU host, as maxtext's
    ``train_compile.py`` does (``python -m qk_jax.plan --compile``). The batch is a square bucket at
    ``config.resolution`` with ``slots`` input images (default: the most the stage's tasks have, as the
    planner's workload) and the longest text."""
    pieces = layout(config, mesh)
    slots = planner.workload(config).vlm_images if slots is None else int(slots)
    shapes, grid = pipeline_lib.abstract_batch(config, int(config.batch_size), slots)
    batch_sh = mesh_lib.batch_sharding(mesh, zero_axes(config))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), pieces.abstract,
                         pieces.shardings)
    step = make_train_step(pieces.model, pieces.optimizer, pieces.schedule, pieces.shardings, mesh=mesh,
                           zero_axes=zero_axes(config))
    return step.lower(state, batch, grid).compile()


def build(config, mesh) -> Setup:
    """The model, the stage's starting params (``stages.initial_params``) split into a train state that is
    sharded from the start: its layout comes from ``jax.eval_shape`` alone (``layout``), random components are
    created by a ``jax.jit`` with those ``out_shardings`` (each device makes only its shards), a previous stage's
    model is read shard by shard into the layout (``saved_model.load_model``), and the state is assembled by one
    more jit with the state's shardings (``parallel.mesh`` docstring)."""
    model, optimizer, schedule, make_state, _, state_sh = layout(config, mesh)
    init_rng = _rngs(config)[0]
    places = state_lib.combine(state_sh.trainable, state_sh.frozen)  # where each parameter lives in the state

    if stages.random_start(config):  # one program: random params straight into the state's shards
        program = jax.jit(lambda rng: make_state(model.init(rng)), out_shardings=state_sh).lower(init_rng).compile()
        state = program(init_rng)
    else:
        def init(rng, components=("vlm", "connector", "mmdit", "vae")):
            shardings = {c: places[c] for c in components}
            return jax.jit(lambda r: model.init(r, components), out_shardings=shardings)(rng)

        params = stages.initial_params(model, config, init_rng, init=init,
                                       sharding_for=lambda path, leaf: _sharding_for(places, mesh, path, leaf))
        params = jax.tree.map(lambda x, sh: _on_mesh(x, sh, mesh), params, places)
        program = jax.jit(make_state, out_shardings=state_sh).lower(params).compile()
        state = program(params)
    return Setup(model, optimizer, schedule, state, state_sh, program.memory_analysis())


def _sharding_for(places: Mapping[str, Any], mesh, path: tuple[str, ...], leaf: Any) -> jax.sharding.Sharding:
    """Where to read a saved or imported leaf: its place in this stage's state (``places``) when it has one for
    that shape, else whole on every device (a stage-1 LoRA factor to be merged, a light head to be dropped). A
    per-layer leaf (``transformer_blocks_3/...``, the converters' layout) of a stack this stage scans
    (``transformer_blocks/...``, layers first) goes where its layer's slice of the stacked leaf goes, so that
    stacking it (``mmdit.with_layout``) moves nothing between devices."""
    node: Any = places
    layer = False
    for key in path:
        if isinstance(node, Mapping) and key not in node and (m := re.fullmatch(r"(.+)_\d+", key)) and \
                m.group(1) in node:
            key, layer = m.group(1), True
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, jax.sharding.NamedSharding) and layer:
        node = jax.sharding.NamedSharding(node.mesh, jax.sharding.PartitionSpec(*node.spec[1:]))
    if isinstance(node, jax.sharding.NamedSharding):
        try:
            node.shard_shape(tuple(leaf.shape))
            return node
        except (ValueError, IndexError):  # another shape than this stage's leaf
            pass
    return mesh_lib.replicated(mesh)


def _on_mesh(x: Any, sharding, mesh) -> jax.Array:
    """``x`` at ``sharding``: a global array on this mesh is resharded, anything else (host arrays of an import,
    one device's) is cut into this process's shards (``mesh_lib.place``)."""
    if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    return mesh_lib.place(x, sharding)


def device_memory() -> float | None:
    """Bytes one local accelerator can hold (its allocator's limit), ``None`` where JAX does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return float(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def check_memory(config, mesh, memory: float | None = None) -> planner.Plan:
    """The planner's per-device estimate of this stage on ``mesh`` (``qk_jax.parallel.planner``), logged before
    anything is allocated; with ``config.memory_check`` (the default) a stage whose estimate exceeds ``memory``
    (default: ``device_memory()``; unknown on CPU: nothing is checked) raises ``MemoryError`` with the figures
    and the ways out, instead of an out-of-memory error minutes into compilation."""
    memory = device_memory() if memory is None else memory
    shape = tuple(int(mesh.shape.get(axis, 1)) for axis in mesh_lib.MESH_AXES)
    remat = "none" if config.get("remat", "none") == "none" else "full"
    attention = "xla" if jax.default_backend() == "cpu" else "flash"
    plan = planner.Planner(config, f"stage {config.stage}").plan(
        shape, memory or float("inf"), micro=int(config.batch_size) // mesh_lib.data_axes_size(mesh),
        remat=remat, attention=attention)
    parts = (f"params {plan.params / GB:.2f}, grads {plan.grads / GB:.2f}, optimizer {plan.optimizer / GB:.2f}, "
             f"compute copy {plan.compute_copy / GB:.2f}, activations {plan.activations / GB:.2f}")
    have = f" of {memory / GB:.1f} GB" if memory else ""
    logging.info("stage %s: planned %.2f GB per device%s (%s)", config.stage, plan.total / GB, have, parts)
    if memory and plan.total > memory and config.get("memory_check", True):
        raise MemoryError(
            f"stage {config.stage} needs about {plan.total / GB:.1f} GB per device on the mesh {dict(mesh.shape)} "
            f"({parts} GB) but a device has {memory / GB:.1f} GB. Lower batch_size (or add optim.grad_accum_steps), "
            "set remat, or use more devices (python -m qk_jax.plan suggests a mesh); --config.memory_check=False "
            "tries anyway")
    return plan


class Stopped(Exception):
    """SIGTERM (a preemption, ``scancel``, a pod's eviction) stopped the run after a step it saved."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Within: SIGTERM asks the loop to save after the step it is in and stop (``Stopped``); yields the question
    ``(step) -> bool``, asked after every step. Outside the main thread (no signal handlers there) nothing is
    installed.

    Several processes: every one must stop after the same step, or the others wait forever in its next
    collective, yet a scheduler may signal only some of them. JAX's preemption service (started by
    ``jax.distributed.initialize``) already catches SIGTERM in each process, tells the coordinator, and names one
    step, the largest any process has reached plus one, at which ``reached_preemption_sync_point`` is true in all;
    a Python handler would replace its own, so none is installed then."""
    if jax.process_count() > 1:
        yield multihost_utils.reached_preemption_sync_point
        return
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: asked.is_set()
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: asked.set())
    try:
        yield lambda step: asked.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_loop(state: state_lib.TrainState, step_fn: Callable[..., tuple[state_lib.TrainState, dict]],
             step_args: Callable[[int], tuple], *, total: int, log_every: int, checkpointer: ckpt.Checkpointer,
             data_state: Callable[[int], dict], meta: dict, batch_size: int, max_nonfinite: int, nonfinite_hint: str,
             writer: metrics_lib.MetricsWriter | None, progress: metrics_lib.Progress,
             host_scalars: Callable[[], dict] | None = None,
             stop_requested: Callable[[int], bool] = lambda step: False,
             compiled: Callable[[int], bool] = lambda step: False,
             after_step: Callable[[int, state_lib.TrainState], bool] | None = None,
             profile_steps: tuple[int, int] | None = None, profile_dir: str | None = None
             ) -> state_lib.TrainState:
    """Steps ``state.step + 1 .. total``: ``step_fn(state, *step_args(step))``; every ``log_every`` steps (and the
    last) the summed metrics go to ``writer`` and ``progress`` (``None`` writer: another process logs), and more
    than ``max_nonfinite`` updates skipped in a row stop the run with ``nonfinite_hint``; ``host_scalars()`` adds
    scalars the host keeps (the data's bad-record counts); once ``stop_requested(step)`` the step is saved and
    ``Stopped`` raised (``stop_on_sigterm``); a step that ``compiled(step)`` a new program is left out of
    ``progress``'s throughput and ETA. After each step ``checkpointer``
    saves on its interval with ``data_state(step)`` (the data's resume point) and ``meta``; the last step is always
    saved; then ``after_step(step, state)`` runs (the previews), its time left out of the ETA when it says it did
    work. ``profile_steps=(first, last)``: ``jax.profiler`` traces those steps into ``profile_dir``. Returns the
    final state; the checkpointer is closed on every exit, an error's included (its save in
    flight completes)."""
    def save_now(step: int) -> None:  # off the interval too, unless this step was just saved
        if checkpointer.latest_step() != step:
            checkpointer.save(state, data_state(step), meta, step=step, force=True)

    start = int(state.step)
    acc, streak, last_logged = None, None, start
    tracing = False
    try:
        for step in range(start + 1, total + 1):
            if profile_steps is not None and step == profile_steps[0]:
                jax.profiler.start_trace(profile_dir)
                tracing = True
            state, metrics = step_fn(state, *step_args(step))
            if tracing and step >= min(profile_steps[1], total):  # a window past the end stops at the last step
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                logging.info("profiled steps %d-%d: %s (open it in TensorBoard's profile tab or Perfetto)",
                             profile_steps[0], step, profile_dir)
            if compiled(step):
                progress.restart(step)
            summed = {k: v for k, v in metrics.items() if k not in LATEST and k != STREAK}
            acc = summed if acc is None else jax.tree.map(jnp.add, acc, summed)
            if STREAK in metrics:  # on device: a running max, no host round trip
                streak = metrics[STREAK] if streak is None else jnp.maximum(streak, metrics[STREAK])
            if step % log_every == 0 or step == total:
                host, latest, longest = jax.device_get((acc, {k: metrics[k] for k in LATEST}, streak))
                n = step - last_logged
                task_sums = host.pop("task_loss_sum", None), host.pop("task_count", None)
                scalars = {k: float(v) / n for k, v in host.items()}
                scalars.update(lr=float(latest["lr"]), nonfinite=int(latest["nonfinite"]))
                if task_sums[0] is not None:
                    scalars.update(metrics_lib.task_losses(*task_sums, TASKS))
                if host_scalars is not None:
                    scalars.update(host_scalars())
                if writer is not None:
                    writer.write(step, scalars)
                    progress.update(step, scalars, images_in_step=batch_size * n)
                longest = scalars["nonfinite"] if longest is None else int(longest)
                if longest > max_nonfinite:
                    raise FloatingPointError(f"{longest} updates in a row skipped for NaN/inf gradients (more than "
                                             f"{max_nonfinite}; {scalars['nonfinite']} in all); {nonfinite_hint}")
                acc, streak, last_logged = None, None, step
            # The host's step count: reading state.step here would wait for the step, every step.
            if checkpointer.save(state, functools.partial(data_state, step), meta, step=step) and writer is not None:
                writer.sync()  # a bucket's copy of the logs reaches every checkpoint a resume may start from
            if after_step is not None and after_step(step, state):
                progress.restart(step)
            if stop_requested(step):
                save_now(step)
                raise Stopped(f"stopped by SIGTERM after step {step}, which is saved in {checkpointer.workdir}; "
                              "rerun the same command to resume")
        save_now(int(state.step))
    except BaseException:
        if tracing:
            jax.profiler.stop_trace()
        # Let the checkpoint in flight finish (else it stays ``N.orbax-checkpoint-tmp`` and resume goes back one
        # more interval) and stop Orbax's threads, so the error that stopped the run is the one reported.
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001 -- the first error is the one to report
            logging.warning("closing the checkpointer after the error: %s", e)
        raise
    checkpointer.close()
    return state


def previews_after_step(config, workdir: str, writer: metrics_lib.MetricsWriter | None, total: int
                        ) -> Callable[[int, state_lib.TrainState], bool] | None:
    """``run_loop``'s ``after_step`` for ``config.preview`` (``qk_jax.training.previews``): sample the preview
    inputs every ``preview.every`` steps and at the last; None when off. One process only: sampling reads its
    inputs on the host, and a multi-process run's params live on every host."""
    every = int(dict(config.get("preview") or {}).get("every") or 0)
    if not every:
        return None
    if jax.process_count() > 1:
        logging.info("previews (config.preview.every=%d) are off in a multi-process run; sample final/ after it",
                     every)
        return None
    from qk_jax.training import previews

    previewer = previews.Previewer(config, workdir, writer)

    def after_step(step: int, state: state_lib.TrainState) -> bool:
        if step % every and step != total:
            return False
        trained = state.ema if state.ema is not None else state.trainable
        path = previewer(step, state_lib.combine(trained, state.frozen))
        if path:
            logging.info("stage %s step %d: samples in %s", config.stage, step, path)
        return True

    return after_step


def profile_window(config, start: int) -> tuple[int, int] | None:
    """``config.profile_steps`` ``(first, count)`` as run_loop's ``(first, last)``, moved past a resume's start;
    None when off."""
    block = tuple(config.get("profile_steps") or ())
    if not block or not block[1]:
        return None
    first = max(int(block[0]), start + 1)
    return first, first + int(block[1]) - 1


def train_stage(config, workdir: str, later_flops: float = 0.0) -> str:
    """Train one stage in ``workdir``; returns the final model directory. ``later_flops``: the planner's FLOPs of
    the stages after this one (a curriculum's), for the progress line's curriculum ETA: they are assumed to run
    at this stage's FLOPs per second, a rough guide (stages differ in shapes and compilations)."""
    workdir = storage.resolve(workdir)  # a local folder or a bucket (gs://): every write goes through storage/Orbax
    final_dir = storage.join(workdir, stages.FINAL)
    if storage.exists(storage.join(final_dir, saved_model.MODEL_CONFIG_FILE)):
        check_same_config(final_dir, config)
        logging.info("stage %s is complete (%s); skipping", config.stage, final_dir)
        return final_dir
    if storage.exists(final_dir):  # no config.json: a model folder a crash (or an older version) left half-written
        logging.warning("removing the incomplete model folder %s (no %s): it is written again at the end", final_dir,
                        saved_model.MODEL_CONFIG_FILE)
        if jax.process_index() == 0:
            storage.rmtree(final_dir)
        distributed.barrier("qk_jax.train_stage.cleared")
    storage.makedirs(workdir)

    # --- set-up ---------------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    data_parallel = mesh_lib.data_axes_size(mesh)
    if int(config.batch_size) % data_parallel:
        raise ValueError(f"batch_size={config.batch_size} (the global batch) does not split over the {data_parallel} "
                         f"data-parallel devices of the mesh {dict(mesh.shape)}; give a multiple of {data_parallel}")
    plan = check_memory(config, mesh)
    setup = build(config, mesh)
    state = setup.state

    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in (("trainable", state.trainable), ("frozen", state.frozen))}
    logging.info("stage %s | mesh %s | parameters: %s total, %s trainable, %s frozen", config.stage,
                 dict(mesh.shape), f"{sum(counts.values()):,}", f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    logging.info("trainable leaves: %d (e.g. %s)", len(leaf_paths(state.trainable)), leaf_paths(state.trainable)[:3])

    own_rows = mesh_lib.local_rows(int(config.batch_size), mesh)
    data = pipeline_lib.make_pipeline(config, manifest=training_manifest(config),
                                      decode_rows=(own_rows.start, own_rows.stop))
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
    step_fn = make_train_step(setup.model, setup.optimizer, setup.schedule, setup.state_shardings, mesh=mesh,
                              zero_axes=zero_axes(config))
    shapes_seen: set = set()
    new_shape_at: set = set()  # steps whose batch shape compiled the step again
    # How the processes read (pipeline.reading_mode): every process decodes its own rows of one planned global
    # batch, or decodes the whole global batch and keeps its rows, or reads only its own records (then the
    # processes' shapes are checked at every step).
    mode = pipeline_lib.reading_mode(config.data, jax.process_count())
    rows = own_rows if mode == "whole" else slice(None)
    check_shapes = jax.process_count() > 1 and mode == "own"
    if jax.process_count() > 1:
        logging.info("data: %s", dict(
            rows="every process buckets the global stream by image headers and decodes its own rows",
            whole="every process reads the whole global stream and keeps its rows",
            own="each process reads its own records (the batch shapes are compared at every step)")[mode])

    def step_args(step: int) -> tuple:
        host_batch = {k: v[rows] for k, v in next(iterator).items()}
        grid = vlm_image_grid(host_batch)
        if check_shapes:
            check_same_shape(step, host_batch, grid)
        if (message := new_shape_message(shapes_seen, step, host_batch, grid)) is not None:
            logging.info(message)
            new_shape_at.add(step)
        return mesh_lib.shard_batch({k: host_batch[k] for k in MODEL_KEYS if k in host_batch}, mesh), grid

    # --- the loop ---------------------------------------------------------------------------------------------
    total, start = int(config.total_steps), int(state.step)
    log_every = int(config.get("log_every", 10))
    writer = (metrics_lib.MetricsWriter(workdir, start_step=start, wandb=config.get("wandb"),
                                        run_config=config.to_dict()) if jax.process_index() == 0 else None)
    profile_dir = os.path.join(storage.local_mirror(workdir), "profile")  # a bucket workdir: profiles stay here
    try:
        with stop_on_sigterm() as stop_requested:
            state = run_loop(
                state, step_fn, step_args, total=total, log_every=log_every, checkpointer=checkpointer,
                data_state=lambda step: iterator.get_state(), meta=meta, batch_size=int(config.batch_size),
                max_nonfinite=int(config.optim.get("max_nonfinite", 10)),
                nonfinite_hint=f"lower optim.lr or check the data (optim.max_nonfinite). The last good checkpoint "
                               f"is in {workdir}",
                writer=writer, progress=metrics_lib.Progress(
                    total, start_step=start, every=log_every, name=f"stage {config.stage}",
                    later=(lambda seconds_per_step: seconds_per_step * later_flops / plan.flops_per_step)
                    if later_flops and plan.flops_per_step else None),
                host_scalars=lambda: {f"skipped/{kind}": n for kind, n in data.metrics(iterator).items()},
                stop_requested=stop_requested, compiled=new_shape_at.__contains__,
                after_step=previews_after_step(config, workdir, writer, total),
                profile_steps=profile_window(config, start), profile_dir=profile_dir)
    finally:  # also on SIGTERM's Stopped or an error: a bucket workdir gets the log's last lines
        if writer is not None:
            writer.close()

    # --- the end ----------------------------------------------------------------------------------------------
    logging.info("stage %s data: %s", config.stage, skipped_summary(data.metrics(iterator), len(data.manifest)))
    trained = state.ema if state.ema is not None else state.trainable
    # The arrays as they are sharded: each process writes its own shards, no host gathers the model.
    saved_model.save_model(final_dir, config, state_lib.combine(trained, state.frozen),
                           meta=dict(meta, step=int(state.step), ema=state.ema is not None),
                           files=processors.model_files(config))  # the Qwen tokenizer travels with the model
    if writer is not None:
        metrics_lib.plot(storage.join(workdir, metrics_lib.JSONL), storage.join(workdir, "loss.png"),
                         keys=("loss", "loss/.*"))
    logging.info("stage %s done: %s", config.stage, final_dir)
    return final_dir
