"""The exported-model format: save_model / load_model round trip, refusals, relative paths."""

import chex
import jax.numpy as jnp
import pytest

from configs import common
from qk_jax.models import saved_model
from conftest import fake_devices_env


def test_model_checkpoint_round_trip(tmp_path):
    config = common.base("tiny")
    config.stage = 3
    params = {"connector": {"linear_1": {"kernel": jnp.arange(6.0).reshape(2, 3)}}, "vae": {"b": jnp.ones(2)}}
    saved_model.save_model(tmp_path / "model", config, params, meta={"stage": 3, "step": 10})
    loaded_config, loaded, meta = saved_model.load_model(tmp_path / "model")
    chex.assert_trees_all_equal(loaded, params)
    assert meta == {"stage": 3, "step": 10}
    assert loaded_config.mmdit.num_layers == config.mmdit.num_layers
    assert tuple(loaded_config.mesh[0]) == tuple(config.mesh[0])
    _, like_loaded, _ = saved_model.load_model(tmp_path / "model", like=params)
    chex.assert_trees_all_equal(like_loaded, params)
    with pytest.raises(FileExistsError, match="not empty"):
        saved_model.save_model(tmp_path / "model", config, params)
    with pytest.raises(FileNotFoundError, match="not a qk_jax model checkpoint"):
        saved_model.load_model(tmp_path)


def test_relative_directories_work(tmp_path, monkeypatch):
    """``--workdir runs/shapes`` (the README's command) is relative; Orbax itself refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    params = {"vae": {"b": jnp.ones(2)}}
    saved_model.save_model("rel/model", common.base("tiny"), params, meta={"stage": 1})
    chex.assert_trees_all_equal(saved_model.load_model("rel/model")[1], params)


def test_a_crash_while_saving_leaves_no_model_and_the_rerun_saves(tmp_path, monkeypatch):
    """A stage's final/ is complete or absent: a save that dies half-way leaves only ``.incomplete``, which the
    next save clears."""
    params = {"vae": {"b": jnp.ones(2)}}
    target = tmp_path / "final"

    def die(*args, **kwargs):
        raise SystemExit("killed")  # the process dies after params/, before config.json

    monkeypatch.setattr(saved_model, "_write_config", die)
    with pytest.raises(SystemExit):
        saved_model.save_model(target, common.base("tiny"), params, meta={"stage": 1})
    monkeypatch.undo()
    assert not target.exists() and (saved_model.incomplete_path(target) / "params").exists()
    saved_model.save_model(target, common.base("tiny"), params, meta={"stage": 1})
    assert not saved_model.incomplete_path(target).exists()
    chex.assert_trees_all_equal(saved_model.load_model(target)[1], params)


def test_a_model_saved_from_eight_devices_loads_on_one(tmp_path):
    """Saved from arrays sharded over 8 (fake) devices, loaded in a process with 1: whole arrays, same values. The
    save compiles nothing: Orbax's replica-parallel saving, off on CPU (``saved_model.orbax_array_handler``),
    compiled a slicing program per replicated array shape and device (here 6 x 8)."""
    import os
    import subprocess
    import sys

    code = ("import logging, sys, jax, numpy as np\n"
            "from jax.sharding import NamedSharding, PartitionSpec as P\n"
            "from configs import common\n"
            "from qk_jax.models import saved_model\n"
            "mesh = jax.make_mesh((8,), ('data',))\n"
            "w = jax.device_put(np.arange(32.0).reshape(8, 4), NamedSharding(mesh, P('data')))\n"
            "rep = {f'b{i}': jax.device_put(np.full(8 * i, float(i), np.float32), NamedSharding(mesh, P()))\n"
            "       for i in range(1, 7)}\n"
            "compiled = []\n"
            "handler = logging.Handler()\n"
            "handler.emit = lambda r: compiled.append(r.getMessage()) if 'Compiling' in r.getMessage() else None\n"
            "logging.getLogger('jax._src.interpreters.pxla').addHandler(handler)\n"
            "jax.config.update('jax_log_compiles', True)\n"
            "saved_model.save_model(sys.argv[1], common.base('tiny'), {'vae': {'w': w, **rep}}, meta={'stage': 1})\n"
            "print('compiled', len(compiled))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = fake_devices_env(8)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["compiled", "0"], out.stdout[-2000:]
    _, params, _ = saved_model.load_model(tmp_path / "m")
    replicated = {f"b{i}": jnp.full(8 * i, float(i)) for i in range(1, 7)}
    chex.assert_trees_all_equal(params, {"vae": {"w": jnp.arange(32.0).reshape(8, 4), **replicated}})
