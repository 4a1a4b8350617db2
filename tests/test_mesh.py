"""Mesh construction from config pairs and logical-axis shardings (8 fake CPU devices in a subprocess)."""

import subprocess
import sys
import textwrap

import pytest

from qk_jax.parallel import mesh as mesh_lib
from qk_jax.parallel.mesh import mesh_shape
from conftest import fake_devices_env


def test_mesh_shape_resolves_minus_one():
    assert mesh_shape([("data", -1), ("fsdp", 1), ("tensor", 4)], 192) == (("data", "fsdp", "tensor"), (48, 1, 4))
    assert mesh_shape([("data", 2), ("fsdp", 2), ("tensor", 2)], 8) == (("data", "fsdp", "tensor"), (2, 2, 2))


@pytest.mark.parametrize(
    "axes,devices,message",
    [
        ([("data", -1), ("tensor", -1)], 8, "at most one"),
        ([("data", -1), ("tensor", 3)], 8, "not divisible"),
        ([("data", 2), ("tensor", 2)], 8, "needs 4 devices but 8"),
    ],
)
def test_mesh_shape_errors(axes, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(axes, devices)


SCRIPT = textwrap.dedent(
    """
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from qk_jax.models.lora import LoRAConfig, LoRADense
    from qk_jax.parallel.mesh import logical_shardings, make_mesh

    assert jax.device_count() == 8
    mesh = make_mesh([("data", -1), ("fsdp", 1), ("tensor", 4)])
    model = LoRADense(16, lora=LoRAConfig(2, 2.0, (".*",)), kernel_axes=("embed", "mlp"))
    x = jnp.ones((4, 8))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    shardings = logical_shardings(abstract, mesh, [("mlp", "tensor"), ("embed", None)])
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, x)), out_shardings=nn.meta.unbox(shardings))(
        jax.random.key(0))
    kernel = params["params"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), kernel.sharding
    assert kernel.addressable_shards[0].data.shape == (8, 4)
    assert params["params"]["lora_b"].addressable_shards[0].data.shape == (2, 4)
    single = model.apply(jax.device_get(params), x)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), single, atol=1e-6)
    print("ok")
    """
)


@pytest.mark.parametrize("shape,sizes,expected", [
    ((2560, 10240), (("data", 64), ("fsdp", 3)), (None, ("data",))),  # 3 divides neither: kept whole over fsdp
    ((16, 48), (("data", 4), ("fsdp", 3)), (None, ("data", "fsdp"))),  # the product divides the largest dim
    ((10, 9), (("data", 5), ("fsdp", 3)), (("data",), ("fsdp",))),  # each axis on a dim it divides
    ((7,), (("data", 4), ("fsdp", 1)), (None,)),  # nothing divides: replicated
    ((), (("data", 8),), ()),
])
def test_zero_spec_shards_over_the_axes_that_divide(shape, sizes, expected):
    assert mesh_lib.zero_spec(shape, sizes) == expected


def test_logical_rules_shard_params_on_eight_devices():
    env = fake_devices_env(8)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
