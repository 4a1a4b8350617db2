"""One stage's set-up, step and loop: the NaN guard, shape logging, the compilation cache (the sharded step
equal to one device: tests/test_zero.py)."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from configs import stage1
from qk_jax.data import pipeline
from qk_jax.models.query_kontext import vlm_image_grid
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.training import loop


def _tiny_setup(tmp_path, **overrides):
    config = stage1.get_config("tiny")
    config.update(overrides)
    mesh = mesh_lib.make_mesh(config.mesh)
    setup = loop.build(config, mesh)
    manifest = loop.training_manifest(config)
    batch = next(iter(pipeline.make_pipeline(config, manifest=manifest)))
    return config, mesh, setup, batch

def test_nan_batch_is_skipped_and_counted(tmp_path):
    config, mesh, setup, batch = _tiny_setup(tmp_path)
    step = loop.make_train_step(setup.model, setup.optimizer, setup.schedule, setup.state_shardings)
    grid = vlm_image_grid(batch)
    model_batch = {k: batch[k] for k in loop.MODEL_KEYS if k in batch}
    state, m = step(setup.state, mesh_lib.shard_batch(model_batch, mesh), grid)
    assert int(m["nonfinite"]) == 0
    before = jax.device_get(state.trainable)
    poisoned = dict(model_batch, target=np.where(np.arange(model_batch["target"].size).reshape(
        model_batch["target"].shape) == 5, np.nan, model_batch["target"]).astype(np.float32))
    state, m = step(state, mesh_lib.shard_batch(poisoned, mesh), grid)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    chex.assert_trees_all_equal(jax.device_get(state.trainable), before)

def test_each_new_batch_shape_is_logged_once():
    """The loop logs a line when a batch shape first comes (its step compiles meanwhile), never twice; host-only
    entries (record indices) do not count."""

    def batch(slots, text):
        return dict(target=np.zeros((2, 32, 32, 3), np.float32), input_ids=np.zeros((2, text), np.int32),
                    roles=np.zeros((2, slots), np.int32), record_index=np.zeros((2,), np.int64))

    seen, grid2 = set(), ((1, 4, 4), (1, 4, 4))
    assert loop.new_shape_message(seen, 1, batch(0, 24), ()) == (
        "step 1: batch shape #1 (2 x 32x32 px, 0 input image slot(s), 24 text tokens): compiling the step "
        "(or loading it from the compilation cache)")
    assert loop.new_shape_message(seen, 2, batch(0, 24), ()) is None
    assert loop.new_shape_message(seen, 3, batch(2, 24), grid2).startswith(
        "step 3: batch shape #2 (2 x 32x32 px, 2 input image slot(s), 24 text tokens)")
    assert loop.new_shape_message(seen, 4, batch(0, 32), ()).startswith("step 4: batch shape #3")
    assert loop.new_shape_message(seen, 5, dict(batch(2, 24), record_index=np.zeros((3,))), grid2) is None
    assert loop.new_shape_message(seen, 6, batch(2, 24), ((1, 4, 4), (1, 2, 8))).startswith("step 6: batch shape #4")

CACHED = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from qk_jax.training import loop
    hits = []
    jax.monitoring.register_event_listener(lambda event, **_: hits.append(event))
    directory = loop.use_compilation_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))).block_until_ready()
    print(directory, hits.count("/jax/compilation_cache/cache_hits"))
    """
)

def test_compilation_cache_is_the_workdirs_unless_set_and_serves_the_next_process(tmp_path):
    """A run with no cache set keeps compiled programs in ``<workdir>/xla_cache``, and the next process (a resume,
    a rerun) loads them from there; a cache already set (here the test session's) is left alone."""
    assert loop.use_compilation_cache(str(tmp_path)) == os.environ["JAX_COMPILATION_CACHE_DIR"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR")
    runs = [subprocess.run([sys.executable, "-c", CACHED, str(tmp_path)], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-4000:]
    expected = str(tmp_path / loop.COMPILATION_CACHE)
    (first, first_hits), (second, second_hits) = (run.stdout.split() for run in runs)
    assert first == second == expected and int(first_hits) == 0 and int(second_hits) > 0, runs[-1].stdout
    assert os.listdir(expected)


def test_an_error_in_the_loop_completes_the_checkpoint_in_flight(tmp_path):
    """A step that raises: the real error comes out, and the save started the step before is complete (resume
    starts there), not left as ``N.orbax-checkpoint-tmp``."""
    from configs import common
    from qk_jax.training import checkpoint as ckpt
    from qk_jax.training import metrics as metrics_lib
    from qk_jax.training import state as state_lib

    params = {"w": {"kernel": jax.numpy.ones((1024, 2048))}}  # 8 MiB (24 with Adam): still saving at step 3
    optimizer = state_lib.make_optimizer(common.optim(lr=1e-2, warmup_steps=0), total_steps=10)
    state = state_lib.init_state(params, (".*",), optimizer, jax.random.key(0))
    grads = jax.tree.map(jax.numpy.ones_like, state.trainable)

    def step_fn(state, step):
        if step == 3:
            raise RuntimeError("the data went away")
        return state_lib.apply_gradients(state, grads, optimizer), dict(loss=jax.numpy.float32(step), lr=0.0,
                                                                        nonfinite=0, grad_norm=0.0)

    checkpointer = ckpt.Checkpointer(tmp_path, save_every=2)
    with pytest.raises(RuntimeError, match="the data went away"):
        loop.run_loop(state, step_fn, lambda step: (step,), total=10, log_every=1, checkpointer=checkpointer,
                      data_state=lambda step: dict(next=step), meta={}, batch_size=1, max_nonfinite=0,
                      nonfinite_hint="", writer=None, progress=metrics_lib.Progress(10))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[-1] == "2" and not any("tmp" in name for name in names), names
    restored, data, _ = ckpt.Checkpointer(tmp_path, save_every=2).restore(state)
    assert int(restored.step) == 2 and data == dict(next=2)


def test_bad_records_are_counted_in_the_metrics_and_summed_up_at_the_end(tmp_path, caplog):
    """A stage on a manifest with bad rows and bad files of every kind runs to its end; metrics.jsonl has the
    per-kind counts at every log step, and the end of the stage says how many were skipped."""
    from test_pipeline import _mixed_dataset

    from qk_jax.training import metrics as metrics_lib

    path, _, expected = _mixed_dataset(tmp_path / "data", num=24, bad_per_kind=2)
    config = stage1.get_config("tiny")
    config.data.manifest = path
    config.total_steps = 3
    with caplog.at_level("INFO"):
        loop.train_stage(config, str(tmp_path / "run"))
    rows = metrics_lib.read_jsonl(str(tmp_path / "run" / metrics_lib.JSONL))
    last = rows[max(rows)]
    for kind in ("unparsable", "unknown_task", "too_many_references"):  # counted once, when the manifest is read
        assert last[f"skipped/{kind}"] == expected[kind], (kind, last)
    assert all(f"skipped/{kind}" in last for kind in expected)
    assert "stage 1 data: skipped" in caplog.text and "good records)" in caplog.text


def test_the_guard_stops_on_updates_skipped_in_a_row_not_on_scattered_ones(tmp_path):
    """``optim.max_nonfinite`` bounds a run of skipped updates: 12 scattered ones over 24 steps pass a limit of 2,
    3 in a row between two log lines stop it."""
    from configs import common
    from qk_jax.training import checkpoint as ckpt
    from qk_jax.training import metrics as metrics_lib
    from qk_jax.training import state as state_lib

    optimizer = state_lib.make_optimizer(common.optim(lr=1e-2, warmup_steps=0), total_steps=30)
    state = state_lib.init_state({"w": jax.numpy.ones(3)}, (".*",), optimizer, jax.random.key(0))

    def run(bad_steps, workdir):
        def step_fn(state, step):
            grads = {"w": jax.numpy.full(3, jax.numpy.nan if step in bad_steps else 1.0)}
            new = state_lib.apply_gradients(state, grads, optimizer)
            return new, dict(loss=jax.numpy.float32(0), lr=0.0, grad_norm=0.0,
                             nonfinite=state_lib.nonfinite_count(new.opt_state),
                             nonfinite_streak=state_lib.nonfinite_streak(new.opt_state))

        return loop.run_loop(state, step_fn, lambda step: (step,), total=24, log_every=8,
                             checkpointer=ckpt.Checkpointer(workdir, save_every=100), data_state=lambda step: {},
                             meta={}, batch_size=1, max_nonfinite=2, nonfinite_hint="lower the lr", writer=None,
                             progress=metrics_lib.Progress(24, every=8))

    assert int(run(set(range(1, 25, 2)), tmp_path / "a").step) == 24  # every other step: 12 skipped, never 2 in a row
    with pytest.raises(FloatingPointError, match=r"3 updates in a row skipped .* \(more than 2; 3 in all\); lower"):
        run({3, 4, 5}, tmp_path / "b")  # the line at step 8 sees the run of 3, though step 8 itself is finite


def test_the_loop_draws_the_next_batch_while_the_step_runs(tmp_path):
    """Between log lines nothing waits for the device: when the loop asks for step ``n + 1``'s batch, step ``n`` is
    still running. (The checkpointer read ``state.step`` from the device after every step; the data was then drawn
    only after each step had finished, ~10% of a ShapesWorld stage-2 step on 2 cores.)"""
    from configs import common
    from qk_jax.training import checkpoint as ckpt
    from qk_jax.training import metrics as metrics_lib
    from qk_jax.training import state as state_lib

    optimizer = state_lib.make_optimizer(common.optim(lr=1e-3, warmup_steps=0), total_steps=8)
    state = state_lib.init_state({"w": jax.numpy.full((768, 768), 1e-3)}, (".*",), optimizer, jax.random.key(0))

    @jax.jit
    def update(state):  # ~0.1 s of matmuls: long enough to be running still when the next batch is asked for
        w = state.trainable["w"]
        g = w
        for _ in range(12):
            g = jax.numpy.tanh(g @ w)
        return state_lib.apply_gradients(state, {"w": g}, optimizer)

    latest, running = [state], {}

    def step_fn(state, step):
        latest[0] = update(state)
        return latest[0], dict(loss=jax.numpy.float32(0), lr=0.0, grad_norm=0.0, nonfinite=0)

    def step_args(step):
        if step > 1:
            running[step - 1] = not latest[0].step.is_ready()
        return (step,)

    update(state).step.block_until_ready()  # compiled before the loop
    data_asked = []
    loop.run_loop(state, step_fn, step_args, total=8, log_every=100,
                  checkpointer=ckpt.Checkpointer(tmp_path, save_every=100),
                  data_state=lambda step: data_asked.append(step) or {}, meta={}, batch_size=1, max_nonfinite=0,
                  nonfinite_hint="", writer=None, progress=metrics_lib.Progress(8, every=100))
    # Orbax saves a run's first step (its policy keeps the first one), which waits for it; every other step runs on.
    assert running == {1: False, **{step: True for step in range(2, 8)}}, running
    assert data_asked == [1, 8]  # the data's resume point is read for the saves only


def test_sigterm_saves_the_step_and_stops(tmp_path):
    """SIGTERM in the middle of a run: the loop finishes its step, saves it (off the interval too) and raises
    ``Stopped``; the handler is the previous one again afterwards."""
    import signal

    from configs import common
    from qk_jax.training import checkpoint as ckpt
    from qk_jax.training import metrics as metrics_lib
    from qk_jax.training import state as state_lib

    optimizer = state_lib.make_optimizer(common.optim(lr=1e-2, warmup_steps=0), total_steps=30)
    state = state_lib.init_state({"w": jax.numpy.ones(3)}, (".*",), optimizer, jax.random.key(0))
    grads = {"w": jax.numpy.ones(3)}

    def step_fn(state, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3
        return state_lib.apply_gradients(state, grads, optimizer), dict(loss=jax.numpy.float32(0), lr=0.0,
                                                                        grad_norm=0.0, nonfinite=0)

    before = signal.getsignal(signal.SIGTERM)
    checkpointer = ckpt.Checkpointer(tmp_path, save_every=10)
    with loop.stop_on_sigterm() as stop_requested, pytest.raises(loop.Stopped, match="after step 3, which is saved"):
        loop.run_loop(state, step_fn, lambda step: (step,), total=20, log_every=5, checkpointer=checkpointer,
                      data_state=lambda step: dict(next=step), meta={}, batch_size=1, max_nonfinite=0,
                      nonfinite_hint="", writer=None, progress=metrics_lib.Progress(20, every=5),
                      stop_requested=stop_requested)
    assert signal.getsignal(signal.SIGTERM) is before
    assert ckpt.Checkpointer(tmp_path, save_every=10).restore(state)[1] == dict(next=3)


def test_a_stage_that_cannot_fit_stops_before_anything_is_built():
    """The planner's estimate against the device's memory (given here: CPU devices report none): too little stops
    with the figures and the ways out; ``memory_check=False`` goes on; unknown memory is not checked."""
    config = stage1.get_config("tiny")
    mesh = mesh_lib.make_mesh(config.mesh)
    plan = loop.check_memory(config, mesh, memory=1e12)
    assert 0 < plan.total < 1e9 and plan.params > 0 and plan.activations > 0
    with pytest.raises(MemoryError, match=r"stage 1 needs about 0\.\d GB per device .* --config.memory_check=False"):
        loop.check_memory(config, mesh, memory=1e3)
    config.memory_check = False
    assert loop.check_memory(config, mesh, memory=1e3).total == plan.total
    assert loop.device_memory() is None  # XLA:CPU reports no limit


def test_frozen_mmdit_kernels_in_the_compute_dtype_change_no_number():
    """Stage 3's frozen MMDiT base is stored with bf16 kernels when the compute dtype is bf16 (half its memory):
    its layers cast every kernel to bf16 for the matmul anyway, so the output is bit for bit the float32 one."""
    import jax.numpy as jnp

    from configs import stage3
    from qk_jax.models import mmdit as mmdit_lib
    from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
    from qk_jax.pytree import flatten
    from qk_jax.training import state as state_lib

    config = stage3.get_config("tiny")
    config.compute_dtype = "bfloat16"
    model = QueryKontext(QueryKontextConfig.from_config(config))
    params = model.init(jax.random.key(0), ("mmdit",))
    trainable, frozen = state_lib.partition(params, config.trainable)
    cast = loop.cast_frozen(frozen, config)
    dtypes = {p: x.dtype for p, x in flatten(cast["mmdit"]).items()}
    assert {d for p, d in dtypes.items() if p.endswith("kernel")} == {jnp.dtype(jnp.bfloat16)}
    assert {d for p, d in dtypes.items() if not p.endswith("kernel")} == {jnp.dtype(jnp.float32)}
    cfg = model.config.mmdit
    inputs = mmdit_lib.init_inputs(cfg, batch=2, img_len=8, text_len=4)
    apply = jax.jit(lambda p: model.mmdit.apply({"params": p}, **inputs, target_start=jnp.zeros((2,), jnp.int32),
                                                target_len=8))
    np.testing.assert_array_equal(apply(state_lib.combine(trainable, cast)["mmdit"]),
                                  apply(state_lib.combine(trainable, frozen)["mmdit"]))


def test_a_per_layer_leaf_goes_where_its_layer_of_the_scanned_stack_goes():
    """An imported or saved per-layer leaf (``transformer_blocks_3/...``) read into a stage that scans the stack
    (``transformer_blocks/...``, layers first) is placed as that layer's slice: the stacked spec without its
    layer axis, not whole on every device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qk_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
    stacked = NamedSharding(mesh, P(None, "data", "tensor"))
    places = {"mmdit": {"transformer_blocks": {"attn": {"kernel": stacked}}, "proj_out": {"kernel": stacked}}}
    leaf = jax.ShapeDtypeStruct((4, 6), jax.numpy.float32)
    got = loop._sharding_for(places, mesh, ("mmdit", "transformer_blocks_3", "attn", "kernel"), leaf)
    assert got.spec == P("data", "tensor")
    assert loop._sharding_for(places, mesh, ("mmdit", "transformer_blocks", "attn", "kernel"),
                              jax.ShapeDtypeStruct((2, 4, 6), jax.numpy.float32)) is stacked
    assert loop._sharding_for(places, mesh, ("mmdit", "other_3", "kernel"), leaf).spec == P()  # no such stack


def test_a_run_on_a_tenth_bad_manifest_trains_every_good_record_once_per_epoch(tmp_path, monkeypatch):
    """Inside a training run (``train_stage``), on a manifest a tenth bad, one record of each bad kind (a line nested
    too deep, a missing field, an unknown task, too many references, a path out of the root, a missing file, a FIFO,
    an empty file, a truncated PNG target, a PNG declaring 30000^2 pixels, a prompt over the token budget): the run
    exits normally, each of its first two epochs is every good record exactly once in the batches the step trained
    on, and metrics.jsonl counts every kind."""
    import io
    import json

    from PIL import Image
    from test_pipeline import _bomb_png

    from qk_jax.training import metrics as metrics_lib

    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)

    def png():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    def record(i, **fields):
        return json.dumps(dict(dict(id=f"r{i}", task="t2i", prompt=f"a red circle {i}", target=f"img/{i}.png"),
                               **fields))

    lines = []
    for i in range(99):
        (tmp_path / "img" / f"{i}.png").write_bytes(png())
        lines.append(record(i))
    good = list(range(len(lines)))  # record_index counts the records the manifest keeps, in order
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    (tmp_path / "img" / "truncated.png").write_bytes(png()[:300])
    (tmp_path / "img" / "bomb.png").write_bytes(_bomb_png())
    os.mkfifo(tmp_path / "img" / "fifo.png")
    at_load = dict(unparsable="[" * 100_000 + "]" * 100_000, invalid=json.dumps(dict(task="t2i", target="img/0.png")),
                   unknown_task=record(100, task="paint"),
                   too_many_references=record(101, task="multi", prompt="a b c", inputs=[
                       dict(path="img/0.png", role="reference")] * 3),
                   unsafe_path=record(102, target="../outside.png"))
    in_stream = dict(missing_file=record(103, target="img/gone.png"), fifo=record(104, target="img/fifo.png"),
                     empty_image=record(105, target="img/empty.png"),
                     corrupt_image=record(106, target="img/truncated.png"),
                     too_large=record(107, target="img/bomb.png"),
                     too_long=record(108, prompt="circle " * 100, target="img/0.png"))
    bad = list(at_load.values()) + list(in_stream.values())
    assert len(bad) / (len(bad) + len(good)) >= 0.1
    for k, line in enumerate(bad):  # spread through the manifest; at-load rejects shift the indices after them
        lines.insert(9 * (k + 1), line)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    good = [n for n, line in enumerate(lines) if line not in bad]  # record_index: the record's line in the manifest

    seen = []  # the valid record indices of every batch the loop took, in order
    make_pipeline = loop.pipeline_lib.make_pipeline

    class Recording:  # the pipeline's iterator, noting what it hands the loop
        def __init__(self, iterator):
            self.iterator = iterator

        def __next__(self):
            batch = next(self.iterator)
            seen.extend(int(i) for i, ok in zip(batch["record_index"], batch["valid"]) if ok)
            return batch

        def get_state(self):
            return self.iterator.get_state()

        def set_state(self, state):
            self.iterator.set_state(state)

    class RecordingPipeline:
        def __init__(self, data):
            self.data = data

        def __iter__(self):
            return Recording(iter(self.data))

        def metrics(self, iterator):
            return self.data.metrics(iterator.iterator)

        @property
        def manifest(self):
            return self.data.manifest

    monkeypatch.setattr(loop.pipeline_lib, "make_pipeline", lambda *a, **k: RecordingPipeline(make_pipeline(*a, **k)))
    config = stage1.get_config("tiny")
    config.data.manifest = str(tmp_path / "train.jsonl")
    config.batch_size = 9  # 11 steps an epoch
    config.cfg_dropout.text = 0.0  # a too-long prompt whose text guidance drops is a good unconditional sample
    config.total_steps, config.checkpoint_every = 2 * len(good) // config.batch_size, 100
    loop.train_stage(config, str(tmp_path / "run"))
    assert len(seen) == 2 * len(good)
    for epoch in (seen[: len(good)], seen[len(good):]):
        assert sorted(epoch) == good
    assert seen[: len(good)] != seen[len(good):]  # reshuffled each epoch
    last = metrics_lib.read_jsonl(str(tmp_path / "run" / metrics_lib.JSONL))
    last = last[max(last)]
    for kind in at_load:  # counted once, when the manifest is read
        assert last[f"skipped/{kind}"] == 1, (kind, last)
    for kind in set(in_stream) - {"fifo"}:  # counted each time the stream meets them: twice in two epochs, or more
        assert last[f"skipped/{kind}"] >= 2, (kind, last)  # (prefetching reads ahead)
    assert last["skipped/missing_file"] >= 4  # the FIFO is not a regular file: never opened, never a hang
