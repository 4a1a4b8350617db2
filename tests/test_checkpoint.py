"""Orbax checkpoints of a run: round trip of a full train state, keep-last-K, frozen params once, crash safety."""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from qk_jax.training import checkpoint as ckpt
from qk_jax.training import state as st

PARAMS = {
    "connector": {"linear_1": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}},
    "vae": {"conv_in": {"kernel": jnp.full((3, 3), 2.0)}},
}


def _state(ema=0.99):
    opt = st.make_optimizer(common.optim(lr=1e-2, warmup_steps=0), total_steps=10)
    state = st.init_state(PARAMS, (r"^connector/",), opt, jax.random.key(7), ema_decay=ema)
    grads = jax.tree.map(jnp.ones_like, state.trainable)
    for _ in range(3):
        state = st.apply_gradients(state, grads, opt)
    return state, opt


def test_round_trip_restores_every_part(tmp_path):
    state, opt = _state()
    c = ckpt.Checkpointer(tmp_path, save_every=1)
    assert c.save(state, {"iterator": {"pos": 42}}, {"stage": 1, "model": {"width": 3}})
    c.save_frozen(state.frozen)
    c.close()

    fresh, _ = _state()
    fresh = st.init_state(PARAMS, (r"^connector/",), opt, jax.random.key(0), ema_decay=0.99)  # step 0, other rng
    c = ckpt.Checkpointer(tmp_path, save_every=1)
    assert c.latest_step() == 3
    restored, data, meta = c.restore(fresh)
    chex.assert_trees_all_equal(
        (restored.step, restored.trainable, restored.opt_state, restored.ema),
        (state.step, state.trainable, state.opt_state, state.ema),
    )
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    assert data == {"iterator": {"pos": 42}} and meta["stage"] == 1
    chex.assert_trees_all_equal(c.restore_frozen(fresh.frozen), state.frozen)
    assert c.read_meta()["model"] == {"width": 3}
    c.close()


def test_keeps_the_last_k_and_saves_on_the_interval(tmp_path):
    state, opt = _state(ema=None)
    c = ckpt.Checkpointer(tmp_path, save_every=2, keep=2, async_save=False)
    grads = jax.tree.map(jnp.ones_like, state.trainable)
    saved = []
    for _ in range(6):
        state = st.apply_gradients(state, grads, opt)
        if c.save(state, {}, {"stage": 1}):
            saved.append(int(state.step))
    assert saved == [4, 6, 8]
    assert c.save(state, {}, {"stage": 1}, force=True)  # the end of a run: step 9 is off the interval
    c.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [8, 9]


def test_a_step_off_the_interval_reads_nothing_from_the_device(tmp_path):
    """With the host's step count the checkpointer decides without reading ``state.step`` (which would wait for the
    step to finish) and reads the data's resume point only for a save."""
    state, _ = _state(ema=None)
    c = ckpt.Checkpointer(tmp_path, save_every=2, async_save=False)
    asked = []
    assert c.save(state, lambda: asked.append(2) or {"pos": 2}, {"stage": 1}, step=2)
    with jax.transfer_guard("disallow_explicit"):
        assert not c.save(state, lambda: asked.append(3) or {}, {"stage": 1}, step=3)
    assert asked == [2]
    assert c.save(state, lambda: asked.append(4) or {"pos": 4}, {"stage": 1}, step=4)
    assert asked == [2, 4]
    c.close()
    assert ckpt.Checkpointer(tmp_path, save_every=2).restore(state)[1] == {"pos": 4}


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    state, _ = _state()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.Checkpointer(tmp_path, save_every=1).restore(state)


KILLED_DURING_SAVE = """
import os, signal, sys
import jax, jax.numpy as jnp
from configs import common
from qk_jax.training import checkpoint as ckpt, state as st

params = {"big": {"kernel": jnp.ones((2048, 4096))}}  # 32 MiB: the async save is still running when we die
opt = st.make_optimizer(common.optim(lr=1e-2, warmup_steps=0), total_steps=10)
state = st.init_state(params, (".*",), opt, jax.random.key(0))
c = ckpt.Checkpointer(sys.argv[1], save_every=1)
state = st.apply_gradients(state, jax.tree.map(jnp.ones_like, state.trainable), opt)
c.save(state, {"pos": 1}, {"stage": 1})
c.wait()
state = st.apply_gradients(state, jax.tree.map(jnp.ones_like, state.trainable), opt)
c.save(state, {"pos": 2}, {"stage": 1})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_crash_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -9, out.stderr[-2000:]
    # the step-2 save really was cut off half-way: only its temporary directory exists
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("2")] == [
        "2.orbax-checkpoint-tmp"]
    opt = st.make_optimizer(common.optim(lr=1e-2, warmup_steps=0), total_steps=10)
    like = st.init_state({"big": {"kernel": jnp.zeros((2048, 4096))}}, (".*",), opt, jax.random.key(1))
    c = ckpt.Checkpointer(tmp_path, save_every=1)
    assert c.latest_step() == 1
    restored, data, _ = c.restore(like)
    assert int(restored.step) == 1 and data == {"pos": 1}
    assert float(restored.trainable["big"]["kernel"][0, 0]) != 0.0
    c.close()


def test_relative_directories_work(tmp_path, monkeypatch):
    """``--workdir runs/shapes`` (the README's command) is relative; Orbax itself refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    state, _ = _state()
    checkpointer = ckpt.Checkpointer("rel/run", save_every=1)
    assert checkpointer.save(state, {"next_batch": 1}, {"stage": 1})
    checkpointer.close()
    restored, data, _ = ckpt.Checkpointer("rel/run", save_every=1).restore(_state()[0])
    chex.assert_trees_all_equal(restored.trainable, state.trainable)
    assert data == {"next_batch": 1}


DAMAGES = ("truncated_data_file", "deleted_data_file", "deleted_metadata", "deleted_iterator_state",
           "garbage_iterator_json", "deleted_state")


def _damage(folder, how):
    """One of the six ways a latest checkpoint was found broken."""
    data_files = [p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    if how == "truncated_data_file":
        for p in data_files:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "deleted_data_file":
        for p in data_files:
            p.unlink()
    elif how == "deleted_metadata":
        (folder / "state" / "_METADATA").unlink()
    elif how == "deleted_iterator_state":
        shutil.rmtree(folder / "data")
    elif how == "garbage_iterator_json":
        (folder / "data" / "metadata").write_text("{not json")
    elif how == "deleted_state":
        shutil.rmtree(folder / "state")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how, caplog):
    state, opt = _state()
    grads = jax.tree.map(jnp.ones_like, state.trainable)
    c = ckpt.Checkpointer(tmp_path, save_every=1)
    states = {}
    for pos in (1, 2, 3):
        state = st.apply_gradients(state, grads, opt)
        states[pos] = state
        c.save(state, {"pos": pos}, {"stage": 1})
    c.close()
    latest = int(states[3].step)  # _state() took 3 steps already: the folders are 4, 5 and 6
    _damage(tmp_path / "checkpoints" / str(latest), how)

    c = ckpt.Checkpointer(tmp_path, save_every=1)
    with caplog.at_level("WARNING"):
        restored, data, _ = c.restore(_state()[0])
    assert data == {"pos": 2} and int(restored.step) == latest - 1
    chex.assert_trees_all_equal(restored.trainable, states[2].trainable)
    assert f"checkpoint {latest}" in caplog.text and f"{latest}.damaged" in caplog.text
    assert (tmp_path / "checkpoints" / f"{latest}.damaged").is_dir() and c.latest_step() == latest - 1
    assert c.save(states[3], {"pos": 3}, {"stage": 1})  # the run saves step 3 again
    c.close()
    assert ckpt.Checkpointer(tmp_path, save_every=1).restore(_state()[0])[1] == {"pos": 3}


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    state, opt = _state()
    c = ckpt.Checkpointer(tmp_path, save_every=1)
    c.save(st.apply_gradients(state, jax.tree.map(jnp.ones_like, state.trainable), opt), {"pos": 1}, {"stage": 1})
    c.close()
    _damage(tmp_path / "checkpoints" / "4", "deleted_state")
    with pytest.raises(ckpt.CheckpointDamagedError,
                       match=r"no checkpoint .* can be restored \(4: .*delete .*checkpoints"):
        ckpt.Checkpointer(tmp_path, save_every=1).restore(_state()[0])


def test_a_checkpoint_of_another_model_is_a_mismatch_naming_the_difference(tmp_path):
    state, opt = _state()
    c = ckpt.Checkpointer(tmp_path, save_every=1)
    c.save(st.apply_gradients(state, jax.tree.map(jnp.ones_like, state.trainable), opt), {"pos": 1}, {"stage": 1})
    c.close()
    other = st.init_state({"connector": {"linear_1": {"kernel": jnp.zeros((2, 5)), "bias": jnp.ones(5)}}},
                          (r"^connector/",), opt, jax.random.key(7))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"another model or trainable set: .*linear_1/kernel: shape "
                                                           r"\(2, 3\) in the checkpoint, \(2, 5\) now"):
        ckpt.Checkpointer(tmp_path, save_every=1).restore(other)
