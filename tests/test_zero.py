"""ZeRO-2 (qk_jax.parallel.zero) on 8 fake CPU devices (data 2 x fsdp 2 x tensor 2): two steps equal the
one-device steps, the state is created in its shards, the compiled step reduce-scatters every ZeRO leaf's
gradient (no whole-size all-reduce of one), and the per-device bytes agree with the planner; on 4 (data 2 x
tensor 2) the MMDiT's rows split over 'tensor' too, at the planner's FLOPs per device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from qk_jax.parallel import zero
from conftest import fake_devices_env

SCRIPT = textwrap.dedent(
    """
    import json, re
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from configs import stage1
    from qk_jax.data import pipeline
    from qk_jax.models.query_kontext import vlm_image_grid
    from qk_jax.parallel import mesh as mesh_lib
    from qk_jax.parallel import planner
    from qk_jax.pytree import flatten
    from qk_jax.training import loop

    def tiny(axes, zero_stage=2, batch_size=4, rows_over=("tensor",)):
        config = stage1.get_config("tiny")
        config.batch_size = batch_size
        config.mesh = axes
        config.sharding.mmdit_zero_stage = zero_stage
        config.sharding.mmdit_rows_over = rows_over
        return config

    def two_steps(config, devices):
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        setup = loop.build(config, mesh)
        batch = next(iter(pipeline.make_pipeline(config, manifest=loop.training_manifest(config))))
        model_batch = mesh_lib.shard_batch({k: batch[k] for k in loop.MODEL_KEYS if k in batch}, mesh)
        step = loop.make_train_step(setup.model, setup.optimizer, setup.schedule, setup.state_shardings, mesh=mesh)
        grid = vlm_image_grid(batch)
        compiled = step.lower(setup.state, model_batch, grid).compile()
        hlo = compiled.as_text()
        state = setup.state
        for _ in range(2):
            state, _ = step(state, model_batch, grid)
        two_steps.flops = compiled.cost_analysis()["flops"]  # per device
        return setup, state, hlo

    def local_bytes(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

    def shapes(hlo, op):  # every float32 shape an op of this kind produces (tuples unpacked)
        out = []
        for m in re.finditer(r"= (\\(?[^=]*?\\)?) " + op + r"(?:-start)?\\(", hlo):
            out += [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"f32\\[([0-9,]*)\\]", m.group(1))]
        return out

    axes = (("data", 2), ("fsdp", 2), ("tensor", 2))
    config = tiny(axes)
    setup, sharded, hlo = two_steps(config, jax.devices())
    _, single, _ = two_steps(tiny((("data", 1), ("fsdp", 1), ("tensor", 1))), jax.devices()[:1])
    mesh = mesh_lib.make_mesh(axes)
    replicated = loop.build(tiny(axes, zero_stage=1), mesh).init_memory  # the masters whole on every device
    state = sharded  # setup.state was donated to the first step; the layout is the same
    trainable = flatten(state.trainable)
    zero_leaves = {p: x for p, x in trainable.items() if not p.startswith("vlm/")}
    plan = planner.Planner(config, "stage1:tiny").plan((2, 2, 2), 1e12, attention="xla")
    single_params = flatten(jax.device_get(single.trainable))

    def difference(a, b):
        b = flatten(jax.device_get(b.trainable))
        return max(float(np.max(np.abs(b[p] - v))) for p, v in flatten(jax.device_get(a.trainable)).items())

    # data 2 x tensor 2, 4 rows per device: the MMDiT's rows split over 'tensor' too, or repeated on both devices.
    tp_axes, tp = (("data", 2), ("fsdp", 1), ("tensor", 2)), {}
    for rows_over in (("tensor",), ()):
        _, tp[rows_over], _ = two_steps(tiny(tp_axes, batch_size=8, rows_over=rows_over), jax.devices()[:4])
        tp[rows_over, "flops"] = two_steps.flops
    _, tp_single, _ = two_steps(tiny((("data", 1), ("fsdp", 1), ("tensor", 1)), batch_size=8), jax.devices()[:1])
    tp_plan = [planner.Planner(tiny(tp_axes, batch_size=8, rows_over=r), "stage1:tiny").plan(
        (2, 1, 2), 1e12, attention="xla").compute_time_s for r in (("tensor",), ())]
    print(json.dumps(dict(
        tp_split_flops=tp[("tensor",), "flops"], tp_repeat_flops=tp[(), "flops"],
        tp_planned_ratio=tp_plan[0] / tp_plan[1],
        tp_difference=[difference(tp[("tensor",)], tp_single), difference(tp[()], tp_single)],
        max_difference=max(float(np.max(np.abs(single_params[p] - v)))
                           for p, v in flatten(jax.device_get(sharded.trainable)).items()),
        init_temp=setup.init_memory.temp_size_in_bytes, init_out=setup.init_memory.output_size_in_bytes,
        replicated_temp=replicated.temp_size_in_bytes,
        state_local=local_bytes(state), zero_whole=sum(x.nbytes for x in zero_leaves.values()),
        zero=[[list(x.shape), list(x.sharding.shard_shape(x.shape))] for x in zero_leaves.values()],
        vlm_vs_tensor=[[p, list(x.sharding.spec)] for p, x in flatten(state.frozen).items()
                       if p.endswith("q_proj/kernel")][:1],
        other_shapes=[list(x.shape) for p, x in trainable.items() if p.startswith("vlm/")],
        reduce_scatter=shapes(hlo, "reduce-scatter"), all_reduce=shapes(hlo, "all-reduce"),
        measured=local_bytes(state) + local_bytes(state.trainable),  # + the gradients, laid out as the masters
        planned=plan.params + plan.grads + plan.optimizer)))
    """
)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    env = fake_devices_env(8)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_mmdit_rows_split_over_the_tensor_axis_too(facts):
    # With the VLM tensor-parallel over 'tensor', the MMDiT's rows split over it as well (split_rows): each
    # device computes fewer FLOPs than when both devices of a tensor group repeat the MMDiT, and the steps still
    # equal one device's. The compiled FLOPs' ratio is the planner's (measured: 2.29e8 / 3.50e8 = 0.655, planned
    # 0.647).
    ratio = facts["tp_split_flops"] / facts["tp_repeat_flops"]
    assert ratio < 0.8 and abs(ratio / facts["tp_planned_ratio"] - 1) < 0.1, (ratio, facts["tp_planned_ratio"])
    assert max(facts["tp_difference"]) < 1e-5, facts["tp_difference"]


def test_two_sharded_steps_equal_one_device(facts):
    assert facts["max_difference"] < 1e-5, facts["max_difference"]
    # The VLM stays tensor-parallel (its frozen kernels split over 'tensor').
    (_, spec), = facts["vlm_vs_tensor"]
    assert "tensor" in spec, spec


def test_the_state_is_created_in_its_shards(facts):
    """XLA's memory analysis of the program that made the state: each device's outputs are its shards, and the
    program made no whole copy of the ZeRO leaves to cut them from: its temporaries are smaller, by at least
    half the leaves' size, than those of the same state with whole masters (``mmdit_zero_stage=1``)."""
    assert facts["init_out"] == pytest.approx(facts["state_local"], rel=0.05)
    assert facts["init_temp"] <= facts["replicated_temp"] - 0.5 * facts["zero_whole"], facts


def test_zero_gradients_are_reduce_scattered_never_all_reduced_whole(facts):
    scattered = [tuple(s) for s in facts["reduce_scatter"]]
    whole_all_reduced = {tuple(s) for s in facts["all_reduce"]}
    ambiguous = {tuple(s) for s in facts["other_shapes"]}  # the VLM's gradients are all-reduced by design
    split = [(tuple(whole), tuple(shard)) for whole, shard in facts["zero"] if whole != shard]
    assert split, facts["zero"]
    for whole, shard in split:
        assert shard in scattered, (whole, shard, sorted(set(scattered)))
        assert whole in ambiguous or whole not in whole_all_reduced, whole


def test_per_device_state_and_gradients_agree_with_the_planner(facts):
    assert facts["planned"] == pytest.approx(facts["measured"], rel=0.1), facts


@pytest.mark.parametrize("spec, expected", [
    (P(None, ("data", "fsdp")), P(None, ("data", "fsdp"))),
    (P("tensor", None), P(None, None)),
    (P(("data", "tensor"), "fsdp"), P(("data",), ("fsdp",))),
    (P(), P()),
])
def test_manual_spec_keeps_the_data_axes(spec, expected):
    assert zero.manual_spec(spec, ("data", "fsdp")) == expected


def test_compute_copy_casts_kernels_only():
    import jax.numpy as jnp

    x = jnp.ones((2, 2), jnp.float32)
    assert zero.compute_copy("mmdit/proj_out/kernel", x, jnp.bfloat16).dtype == jnp.bfloat16
    assert zero.compute_copy("mmdit/norm/scale", x, jnp.bfloat16).dtype == jnp.float32


def test_collectives_take_one_axis_name_or_several():
    """A spec entry is an axis name or a tuple of them (``P('data')`` keeps a string); on one device both
    collectives are the identity."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    x = jnp.arange(6.0).reshape(2, 3)
    for spec in (P("data", None), P(None, ("data", "fsdp"))):
        f = jax.shard_map(lambda a, s=spec: zero.reduce_scatter(zero.all_gather(a, s), s, ("data", "fsdp")),
                          mesh=mesh, in_specs=spec, out_specs=spec)
        np.testing.assert_array_equal(jax.jit(f)(x), x)
