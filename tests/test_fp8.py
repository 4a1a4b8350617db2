"""``qk_jax.ops.fp8``: the fp8 matmul and its VJP against a NumPy formula rounded by ml_dtypes, its error against
the exact product, and what the compiled program holds."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qk_jax.ops import fp8


def np_qdq(x: np.ndarray, fp8_dtype) -> np.ndarray:
    """Current per-tensor scaling in NumPy: scale = amax / max(format), round-to-nearest by ml_dtypes."""
    fmax = float(ml_dtypes.finfo(fp8_dtype).max)
    amax = float(np.max(np.abs(x)))
    scale = amax / fmax if amax > 0 else 1.0
    q = np.clip(x.astype(np.float32) / np.float32(scale), -fmax, fmax).astype(fp8_dtype)
    return q.astype(np.float64) * scale


def _inputs(seed=0, shape=(2, 6, 32), out=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * 3.0
    w = rng.standard_normal((shape[-1], out)).astype(np.float32) * 0.05
    g = rng.standard_normal(shape[:-1] + (out,)).astype(np.float32) * 1e-3
    return x, w, g


def test_forward_and_vjp_are_the_products_of_the_rounded_operands():
    x, w, g = _inputs()
    y, vjp = jax.vjp(fp8.fp8_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    xr, wr = np_qdq(x, ml_dtypes.float8_e4m3fn), np_qdq(w, ml_dtypes.float8_e4m3fn)
    gr = np_qdq(g, ml_dtypes.float8_e5m2)
    chex.assert_trees_all_close(np.asarray(y), xr @ wr, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(np.asarray(dx), gr @ wr.T, rtol=1e-5, atol=1e-9)
    chex.assert_trees_all_close(np.asarray(dw), np.einsum("bsk,bsn->kn", xr, gr), rtol=1e-5, atol=1e-9)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32


def test_error_against_the_exact_product_is_fp8_sized():
    """e4m3 keeps 3 mantissa bits (relative rounding error <= 2^-4), e5m2 2 bits (<= 2^-3): a product of K terms
    has a relative error of a few percent, and far from the 1e-6 of float32."""
    x, w, g = _inputs(1, (4, 64, 128), 96)
    y, vjp = jax.vjp(fp8.fp8_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))  # noqa: E731
    errors = rel(y, x.astype(np.float64) @ w), rel(dx, g.astype(np.float64) @ w.T), rel(
        dw, np.einsum("bsk,bsn->kn", x.astype(np.float64), g))
    assert 1e-3 < errors[0] < 0.06 and all(1e-3 < e < 0.1 for e in errors[1:]), errors


def test_scales_follow_each_tensor_and_zeros_stay_finite():
    x = jnp.asarray([[1e-4, -2e-4], [3e-4, 0.0]], jnp.float32)
    q, scale = fp8.quantize(x, fp8.FORWARD)
    assert float(scale) == pytest.approx(3e-4 / 448.0)
    assert float(jnp.max(q.astype(jnp.float32))) == 448.0  # the amax lands on the largest finite value
    zeros = jnp.zeros((3, 4), jnp.float32)  # an adaLN-Zero-style kernel
    y, vjp = jax.vjp(fp8.fp8_matmul, jnp.ones((2, 3), jnp.float32), zeros)
    dx, dw = vjp(jnp.ones((2, 4), jnp.float32))
    assert float(jnp.abs(y).max()) == 0.0 and float(jnp.abs(dx).max()) == 0.0
    chex.assert_trees_all_close(dw, jnp.full((3, 4), 2.0))


def test_bfloat16_operands_give_bfloat16_results():
    x, w, g = _inputs()
    args = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y, vjp = jax.vjp(fp8.fp8_matmul, *args)
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    xr = np_qdq(np.asarray(args[0], np.float32), ml_dtypes.float8_e4m3fn)
    wr = np_qdq(np.asarray(args[1], np.float32), ml_dtypes.float8_e4m3fn)
    chex.assert_trees_all_close(np.asarray(y, np.float32), xr @ wr, rtol=2e-2, atol=2e-2)


def test_the_compiled_gradient_keeps_fp8_residuals():
    """What the backward pass reads of the forward: the e4m3 operands (and scalar scales), not the inputs."""
    x, w, g = _inputs()

    def loss(x, w):
        return jnp.sum(fp8.fp8_matmul(x, w) * g)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert "f8E4M3FN" in hlo and "f8E5M2" in hlo
    residuals = jax.jit(lambda x, w: fp8._forward(x, w)[1])(x, w)
    assert [r.dtype for r in residuals] == [jnp.float8_e4m3fn, jnp.float32, jnp.float8_e4m3fn, jnp.float32]


def test_mismatched_operands_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        fp8.fp8_matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"w \[K, N\]"):
        fp8.fp8_matmul(jnp.ones((2, 3)), jnp.ones((1, 3, 4)))
