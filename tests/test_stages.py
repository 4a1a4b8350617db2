"""Where a stage's parameters come from (``qk_jax.training.stages``), on 8 fake CPU devices (data 2 x fsdp 2 x
tensor 2): an imported Qwen2.5-VL folder of several safetensors files goes into the train state tensor by
tensor, each straight to its shards (``mesh.place`` once per leaf as it is read, never a whole host tree), and
the state holds exactly the imported values at the state's shardings."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import fake_devices_env

SCRIPT = textwrap.dedent(
    """
    import glob, json, os, sys
    import jax, numpy as np
    from configs import stage1, stage2
    from qk_jax.convert import diffusers_mmdit, hf_qwen_vl
    from qk_jax.models import saved_model
    from qk_jax.models.mmdit import stack_layers
    from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
    from qk_jax.parallel import mesh as mesh_lib
    from qk_jax.pytree import flatten
    from qk_jax.training import loop, stages

    folder = sys.argv[1]
    config = stage1.get_config("tiny")
    config.batch_size = 4
    config.mesh = (("data", 2), ("fsdp", 2), ("tensor", 2))
    model = QueryKontext(QueryKontextConfig.from_config(config))
    vlm = jax.device_get(model.init(jax.random.key(1), ("vlm",))["vlm"])
    whole = sum(x.nbytes for x in jax.tree.leaves(vlm))
    hf_qwen_vl.export(model.config.vlm, vlm, folder, max_shard_bytes=whole // 4)
    config.pretrained.vlm = folder

    calls, place = [], stages.mesh_lib.place
    def spy(array, sharding):
        calls.append([type(array).__name__, list(array.shape), list(sharding.shard_shape(array.shape))])
        return place(array, sharding)
    stages.mesh_lib.place = spy
    setup = loop.build(config, mesh_lib.make_mesh(config.mesh))

    imported = {p: v for p, v in flatten({"vlm": vlm}).items() if "lora" not in p and "kontext_queries" not in p}
    frozen, shardings = flatten(setup.state.frozen), flatten(setup.state_shardings.frozen)

    # Stage 2 from a (random) stage-1 model; its MMDiT a FLUX-layout folder (per layer) read into a scanned stack.
    stage1_dir, flux_dir = sys.argv[2], sys.argv[3]
    saved_model.save_model(os.path.join(stage1_dir, stages.FINAL), config, model.init(jax.random.key(2)),
                           meta=dict(stage=1, step=0))
    config2 = stage2.get_config("tiny")
    config2.batch_size, config2.mesh, config2.init_from = 4, config.mesh, stage1_dir
    mmdit_config = QueryKontextConfig.from_config(config2).mmdit
    flux = jax.device_get(QueryKontext(QueryKontextConfig.from_config(config2)).init(jax.random.key(3),
                                                                                     ("mmdit",))["mmdit"])
    diffusers_mmdit.export(mmdit_config, flux, flux_dir,
                           max_shard_bytes=sum(x.nbytes for x in jax.tree.leaves(flux)) // 4)
    config2.pretrained.mmdit, config2.scan_layers = flux_dir, True
    vlm_calls, calls[:] = list(calls), []
    setup2 = loop.build(config2, mesh_lib.make_mesh(config2.mesh))
    stacked = flatten({"mmdit": stack_layers(flux, mmdit_config)})
    trained2 = flatten(setup2.state.trainable)
    trained2_sh = flatten(setup2.state_shardings.trainable)
    mmdit_facts = dict(
        files=len(glob.glob(flux_dir + "/*.safetensors")), calls=calls, imported=len(flatten(flux)),
        stacked=sorted(p for p in stacked if "/transformer_blocks/" in p)[:1],
        max_difference=max(float(np.max(np.abs(np.asarray(trained2[p]) - v))) for p, v in stacked.items()),
        at_state_sharding=all(trained2[p].sharding == trained2_sh[p] for p in stacked),
        layer_cut=sum(shard != shape for _, shape, shard in calls),
        outside_blocks=sum("transformer_blocks_" not in p for p in flatten(flux)))
    print(json.dumps(dict(
        files=len(glob.glob(folder + "/*.safetensors")), calls=vlm_calls, imported=len(imported),
        max_difference=max(float(np.max(np.abs(np.asarray(frozen[p], np.float32) - v))) for p, v in imported.items()),
        at_state_sharding=all(frozen[p].sharding == shardings[p] for p in imported),
        tensor_sharded=sum(frozen[p].sharding.shard_shape(frozen[p].shape) != frozen[p].shape for p in imported),
        mmdit=mmdit_facts)))
    """
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    env = fake_devices_env(8)
    root = tmp_path_factory.mktemp("imports")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root / "vlm"), str(root / "stage1"), str(root / "flux")],
                         env=env,
                         capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_import_is_placed_tensor_by_tensor_into_its_shards(imported):
    assert imported["files"] >= 4
    # One call per imported leaf, each with one host array: the import never exists whole on the host.
    assert len(imported["calls"]) == imported["imported"]
    assert all(kind == "ndarray" for kind, _, _ in imported["calls"])
    assert sum(shard != shape for _, shape, shard in imported["calls"]) >= 10  # cut over 'tensor' as placed


def test_the_state_holds_the_imported_values_at_its_shardings(imported):
    assert imported["max_difference"] == 0.0
    assert imported["at_state_sharding"] and imported["tensor_sharded"] >= 10


def test_a_flux_layout_mmdit_goes_per_layer_into_the_scanned_stack(imported):
    """Stage 2 with ``scan_layers``: each per-layer tensor is placed as its slice of the stacked leaf (cut like it
    over the data axes, ZeRO's masters), and the state's stack holds the imported values at the state's
    shardings."""
    mmdit = imported["mmdit"]
    assert mmdit["files"] >= 4 and mmdit["stacked"], mmdit["stacked"]
    assert len(mmdit["calls"]) == mmdit["imported"] and all(kind == "ndarray" for kind, _, _ in mmdit["calls"])
    assert mmdit["layer_cut"] > mmdit["outside_blocks"]  # so per-layer leaves too were placed cut, not whole
    assert mmdit["max_difference"] == 0.0 and mmdit["at_state_sharding"]
