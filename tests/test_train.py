"""The trainer: the ShapesWorld curriculum end to end (tiny), stage transitions, the NaN guard, sharded steps,
and (slow) resume after kill -9."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes as shapes_config
from configs import stage1
from qk_jax import pretrain
from qk_jax import sample as sample_lib
from qk_jax import train
from qk_jax.data import pipeline
from qk_jax.models.query_kontext import vlm_image_grid
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.pytree import flatten
from qk_jax.training import checkpoint as ckpt
from qk_jax.training import metrics


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory, tiny_stage0):
    """The tiny curriculum; its stage 0 is conftest's (tests/test_pretrain.py tests stage 0 itself), which
    run_curriculum finds done and imports, as a rerun of the README command does."""
    workdir = str(tmp_path_factory.mktemp("curriculum"))
    shutil.copytree(tiny_stage0[0], os.path.join(workdir, pretrain.DIRNAME))
    train.run_curriculum(shapes_config.get_config("tiny"), workdir)
    return workdir


def _final(workdir, stage):
    return ckpt.load_model(os.path.join(workdir, f"stage{stage}", "final"))


def test_curriculum_runs_every_stage(curriculum, monkeypatch):
    for stage in (1, 2, 3):
        run = os.path.join(curriculum, f"stage{stage}")
        records = metrics.read_jsonl(os.path.join(run, metrics.JSONL))
        losses = [r["loss"] for r in records.values()]
        assert len(losses) == 2 and all(np.isfinite(losses)), records
        assert os.path.getsize(os.path.join(run, "loss.png")) > 1000
        config, _, meta = _final(curriculum, stage)
        assert meta["stage"] == stage == config.stage and meta["step"] == 2
    # Complete: rerunning skips stage 0, every stage and the evaluation (none of them may start again).
    rerun = lambda *a, **k: pytest.fail("a finished part of the curriculum ran again")
    for module, name in ((pretrain, "pretrain_vae"), (pretrain, "pretrain_vlm"), (train, "build"),
                         (sample_lib.Sampler, "from_checkpoint")):
        monkeypatch.setattr(module, name, rerun)
    train.run_curriculum(shapes_config.get_config("tiny"), curriculum)


def test_curriculum_ends_with_the_evaluation_beside_the_untrained_baseline(curriculum):
    summaries = {name: json.load(open(os.path.join(curriculum, "eval", name, "summary.json")))
                 for name in ("trained", "untrained", "ceiling")}
    assert summaries["untrained"]["meta"]["untrained"] and not summaries["trained"]["meta"].get("untrained")
    assert summaries["ceiling"]["meta"]["ceiling"] and not summaries["trained"]["meta"].get("ceiling")
    for summary in summaries.values():
        assert set(summary["tasks"]) == {"t2i", "edit", "custom", "multi", "subject_edit"}
        assert 0.0 <= summary["tasks"]["edit"]["preservation"]["mean"] <= 1.0
    report = open(os.path.join(curriculum, "eval", "report.md")).read()
    assert "| t2i | colors |" in report and "trained | untrained | ceiling" in report
    assert os.path.getsize(os.path.join(curriculum, "eval", "trained", "seed_0", "t2i.png")) > 1000


def test_stage_transitions(curriculum):
    c1, p1, _ = _final(curriculum, 1)
    _, p2, _ = _final(curriculum, 2)
    _, p3, _ = _final(curriculum, 3)
    # 1 -> 2: the VLM LoRA is merged: W + alpha / r * A @ B, and no adapter is left.
    flat1, flat2 = flatten(p1["vlm"]), flatten(p2["vlm"])
    assert any(k.endswith("lora_b") for k in flat1) and not any("lora" in k for k in flat2)
    merged = 0
    for path, w in flat2.items():
        module = path.rsplit("/", 1)[0]
        if path.endswith("kernel") and f"{module}/lora_a" in flat1:
            a, b = np.asarray(flat1[f"{module}/lora_a"], np.float64), np.asarray(flat1[f"{module}/lora_b"], np.float64)
            want = np.asarray(flat1[path], np.float64) + c1.vlm.lora.alpha / a.shape[-1] * a @ b
            np.testing.assert_allclose(np.asarray(w), want, atol=1e-6)
            merged += 1
    assert merged == 7 * c1.vlm.text.num_hidden_layers
    # 2 -> 3: the frozen VLM and VAE, and the MMDiT's base weights, are bit-identical after stage 3's steps;
    # only the new adapters, the connector and the kontext queries moved.
    frozen_vlm = lambda p: {k: v for k, v in p["vlm"].items() if k != "kontext_queries"}
    chex.assert_trees_all_equal(frozen_vlm(p3), frozen_vlm(p2))
    assert np.any(np.asarray(p3["vlm"]["kontext_queries"]) != np.asarray(p2["vlm"]["kontext_queries"]))
    chex.assert_trees_all_equal(p3["vae"], p2["vae"])
    flat3 = flatten(p3["mmdit"])
    for path, value in flatten(p2["mmdit"]).items():
        np.testing.assert_array_equal(flat3[path], value, err_msg=path)
    assert any(k.endswith("lora_b") and np.any(v) for k, v in flat3.items())


def test_a_stage_refuses_the_wrong_previous_stage(curriculum, tmp_path):
    from configs import stage3
    from qk_jax.training import stages

    config = stage3.get_config("tiny")
    config.init_from = os.path.join(curriculum, "stage1")  # stage 3 must start from stage 2
    with pytest.raises(ckpt.CheckpointMismatchError, match="stage 1 model, but stage 3 starts from stage 2"):
        train.build(config, mesh_lib.make_mesh(config.mesh))
    config.init_from = os.path.join(curriculum, "stage2")
    config.connector.hidden_features = 24  # another connector than the one stage 2 trained
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"connector differs .*hidden_features"):
        stages.initial_params(None, config, jax.random.key(0))
    assert os.path.isdir(os.path.join(curriculum, "stage3", "frozen"))  # frozen weights saved once per stage


def _tiny_setup(tmp_path, **overrides):
    config = stage1.get_config("tiny")
    config.update(overrides)
    mesh = mesh_lib.make_mesh(config.mesh)
    setup = train.build(config, mesh)
    manifest = train._manifest(config)
    batch = next(iter(pipeline.make_pipeline(config, manifest=manifest)))
    return config, mesh, setup, batch


def test_nan_batch_is_skipped_and_counted(tmp_path):
    config, mesh, setup, batch = _tiny_setup(tmp_path)
    step = train.make_train_step(setup.model, setup.optimizer, setup.schedule, setup.state_shardings)
    grid = vlm_image_grid(batch)
    model_batch = {k: batch[k] for k in train.MODEL_KEYS if k in batch}
    state, m = step(setup.state, mesh_lib.shard_batch(model_batch, mesh), grid)
    assert int(m["nonfinite"]) == 0
    before = jax.device_get(state.trainable)
    poisoned = dict(model_batch, target=np.where(np.arange(model_batch["target"].size).reshape(
        model_batch["target"].shape) == 5, np.nan, model_batch["target"]).astype(np.float32))
    state, m = step(state, mesh_lib.shard_batch(poisoned, mesh), grid)
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    chex.assert_trees_all_equal(jax.device_get(state.trainable), before)


SHARDED = textwrap.dedent(
    """
    import sys, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from configs import stage1
    from qk_jax import train
    from qk_jax.data import pipeline
    from qk_jax.models.query_kontext import vlm_image_grid
    from qk_jax.parallel import mesh as mesh_lib
    from qk_jax.pytree import flatten

    def run(axes):
        config = stage1.get_config("tiny")
        config.batch_size = 4
        config.mesh = axes
        mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[: 8 if len(axes) > 1 and axes[0][1] != 1 else 1])
        setup = train.build(config, mesh)
        manifest = train._manifest(config)
        batch = next(iter(pipeline.make_pipeline(config, manifest=manifest)))
        step = train.make_train_step(setup.model, setup.optimizer, setup.schedule, setup.state_shardings)
        model_batch = {k: batch[k] for k in train.MODEL_KEYS if k in batch}
        state, _ = step(setup.state, mesh_lib.shard_batch(model_batch, mesh), vlm_image_grid(batch))
        state, _ = step(state, mesh_lib.shard_batch(model_batch, mesh), vlm_image_grid(batch))
        return state

    single = run((("data", 1), ("fsdp", 1), ("tensor", 1)))
    sharded = run((("data", 2), ("fsdp", 2), ("tensor", 2)))
    for path, value in flatten(jax.device_get(single.trainable)).items():
        np.testing.assert_allclose(flatten(jax.device_get(sharded.trainable))[path], value, atol=1e-5, err_msg=path)
    # ZeRO-2: Adam's moments of the MMDiT are split over data x fsdp (4 ways) ...
    mu = sharded.opt_state.inner_state[1][0].mu
    kernel = mu["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert kernel.addressable_shards[0].data.size * 4 == kernel.size, kernel.sharding
    # ... while the MMDiT's params are replicated and the VLM's kernels are split over 'tensor'.
    q = sharded.trainable["mmdit"]["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size
    vlm_q = sharded.frozen["vlm"]["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert vlm_q.addressable_shards[0].data.size * 2 == vlm_q.size, vlm_q.sharding
    print("ok")
    """
)


def test_sharded_step_equals_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "data")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-4000:]


def test_each_new_batch_shape_is_logged_once():
    """The loop logs a line when a batch shape first comes (its step compiles meanwhile), never twice; host-only
    entries (record indices) do not count."""

    def batch(slots, text):
        return dict(target=np.zeros((2, 32, 32, 3), np.float32), input_ids=np.zeros((2, text), np.int32),
                    roles=np.zeros((2, slots), np.int32), record_index=np.zeros((2,), np.int64))

    seen, grid2 = set(), ((1, 4, 4), (1, 4, 4))
    assert train.new_shape_message(seen, 1, batch(0, 24), ()) == (
        "step 1: batch shape #1 (2 x 32x32 px, 0 input image slot(s), 24 text tokens): compiling the step "
        "(or loading it from the compilation cache)")
    assert train.new_shape_message(seen, 2, batch(0, 24), ()) is None
    assert train.new_shape_message(seen, 3, batch(2, 24), grid2).startswith(
        "step 3: batch shape #2 (2 x 32x32 px, 2 input image slot(s), 24 text tokens)")
    assert train.new_shape_message(seen, 4, batch(0, 32), ()).startswith("step 4: batch shape #3")
    assert train.new_shape_message(seen, 5, dict(batch(2, 24), record_index=np.zeros((3,))), grid2) is None
    assert train.new_shape_message(seen, 6, batch(2, 24), ((1, 4, 4), (1, 2, 8))).startswith("step 6: batch shape #4")


CACHED = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from qk_jax import train
    hits = []
    jax.monitoring.register_event_listener(lambda event, **_: hits.append(event))
    directory = train.use_compilation_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))).block_until_ready()
    print(directory, hits.count("/jax/compilation_cache/cache_hits"))
    """
)


def test_compilation_cache_is_the_workdirs_unless_set_and_serves_the_next_process(tmp_path):
    """A run with no cache set keeps compiled programs in ``<workdir>/xla_cache``, and the next process (a resume,
    a rerun) loads them from there; a cache already set (here the test session's) is left alone."""
    assert train.use_compilation_cache(str(tmp_path)) == os.environ["JAX_COMPILATION_CACHE_DIR"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR")
    runs = [subprocess.run([sys.executable, "-c", CACHED, str(tmp_path)], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-4000:]
    expected = str(tmp_path / train.COMPILATION_CACHE)
    (first, first_hits), (second, second_hits) = (run.stdout.split() for run in runs)
    assert first == second == expected and int(first_hits) == 0 and int(second_hits) > 0, runs[-1].stdout
    assert os.listdir(expected)


@pytest.mark.slow
def test_kill_and_resume_continues_the_same_run(tmp_path):
    """kill -9 after a checkpoint, rerun the same command: the losses after resume equal an uninterrupted run."""
    args = ["--config", "configs/stage1.py:tiny", "--config.total_steps=8", "--config.checkpoint_every=2",
            f"--config.data.dir={tmp_path / 'data'}"]
    cmd = [sys.executable, "-m", "qk_jax.train"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(cmd + args + [f"--workdir={tmp_path / 'straight'}"], cwd=root, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + [f"--workdir={killed}"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "4").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd + args + [f"--workdir={killed}"], cwd=root, check=True, capture_output=True)

    straight = metrics.read_jsonl(str(tmp_path / "straight" / metrics.JSONL))
    resumed = metrics.read_jsonl(str(killed / metrics.JSONL))
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        np.testing.assert_allclose(resumed[step]["loss"], straight[step]["loss"], rtol=1e-6, err_msg=f"step {step}")
    with open(killed / metrics.JSONL) as f:
        assert any(json.loads(line).get("restart") for line in f)  # it really resumed


@pytest.mark.slow
def test_shortened_shapes_curriculum_learns_t2i_colors(tmp_path):
    """Issue 9's acceptance test, about an hour on 2 CPU cores: stage 0 and stage 1 as the README's curriculum
    runs them, then 4,000 steps of stage 2 on text-to-image alone (no stage 3), then the held-out t2i evaluation
    of the trained model and of its untrained baseline (same config, VLM/connector/MMDiT re-initialised, VAE kept).

    Measured (2026-11-26, 50 prompts, untrained in brackets): after 2,400 stage-2 steps colours 8% (0%), position
    52% (8%), single object 80% (0%); continued to 4,000 steps: colours 32%, position 98%, single object 80%.
    This test as written, from scratch (65 minutes): colours 22%, position 88%, single object 100%.
    2026-11-27 (stage 2's VLM at a tenth, the MMDiT's sin-cos position embedding; 69 minutes, another training
    sharing the cores for 40 of them): colours 16% (0%), position 48% (8%), single object 100% (0%), overall
    12%. That run failed only on the floating-point comparison 0.48 >= 0.08 + 0.4; with the tolerance below the
    same figures pass, with no prompt to spare (colours 8 of 50, 7.5 needed; position 24, 24 needed). The same
    first 50 prompts from the same base without the embedding (3,500 steps): colours 6%, position 22%, single
    object 80%. Rerun on 2026-11-28 (tenth session) with stage 2 at higher noise (``flow.mean`` 1.0) and the
    warmup-stable-decay schedule (its last 800 steps anneal); 85 minutes, sharing the 2 cores with other
    trainings throughout: colours 74% (0%), position 100% (8%), single object 100% (0%), two objects 62% (0%),
    overall 46% (0%). Passed with margin on every assertion.
    """
    config = shapes_config.get_config("shapes")
    config.stages = config.stages[:2]  # stage 1, stage 2
    stage2 = config.stages[1]
    stage2.tasks = {"t2i": 1.0}
    stage2.total_steps = 4000
    stage2.checkpoint_every = 1000
    config.evaluate.tasks = ("t2i",)
    config.evaluate.samples_per_task = config.evaluate.untrained_samples = 50
    train.run_curriculum(config, str(tmp_path))

    def scores(name):
        with open(tmp_path / "eval" / name / "summary.json") as f:
            return {k: v["mean"] for k, v in json.load(f)["tasks"]["t2i"].items() if v is not None}

    trained, untrained = scores("trained"), scores("untrained")
    print(json.dumps(dict(trained=trained, untrained=untrained)))
    # Margins in score points; shares of 50 prompts are multiples of 0.02, so compare with a rounding tolerance
    # (0.08 + 0.4 > 0.48 in floating point).
    beats = lambda key, margin: trained[key] >= untrained[key] + margin - 1e-9
    assert beats("colors", 0.15), (trained, untrained)
    assert beats("position", 0.4), (trained, untrained)
    assert beats("single_object", 0.5), (trained, untrained)
