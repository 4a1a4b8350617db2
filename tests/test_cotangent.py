"""``materialize_cotangent``: the identity in both passes (checked through the MMDiT's LayerNorm against its
NumPy backward formula), with an optimization barrier in the backward program on CPU only."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.models.mmdit import NORM_EPS, layer_norm
from qk_jax.ops.cotangent import materialize_cotangent


def _layer_norm_grad_reference(x, g, eps=NORM_EPS):
    """d/dx of sum(g * LN(x)) over the last axis: (g - mean(g) - xhat * mean(g * xhat)) / sigma."""
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    sigma = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) / sigma
    return (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)) / sigma


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_identity_in_both_passes(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32) * 3 + 1
    w = rng.standard_normal((2, 5, 16)).astype(np.float32)
    y, vjp = jax.vjp(lambda a: materialize_cotangent(a, backend=backend), jnp.asarray(x))
    chex.assert_trees_all_equal(y, x)
    chex.assert_trees_all_equal(vjp(jnp.asarray(w))[0], w)


def test_layer_norm_gradient_matches_numpy():
    """layer_norm wraps its input: its gradient is still LayerNorm's."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 32)).astype(np.float32) * 2 - 0.5
    g = rng.standard_normal((3, 7, 32)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.asarray(g) * layer_norm(a))))(jnp.asarray(x))
    chex.assert_trees_all_close(grad, _layer_norm_grad_reference(x, g).astype(np.float32), atol=2e-5, rtol=1e-4)


def test_barrier_in_the_backward_program_on_cpu_only():
    def program(backend):
        grad = jax.grad(lambda a: jnp.sum(jnp.tanh(materialize_cotangent(a, backend=backend)) ** 2))
        return jax.jit(grad).lower(jnp.ones((4, 8))).as_text()

    assert "optimization_barrier" in program("cpu")
    assert "optimization_barrier" not in program("gpu")
    forward = jax.jit(lambda a: materialize_cotangent(a, backend="cpu") * 2).lower(jnp.ones((4, 8))).as_text()
    assert "optimization_barrier" not in forward
