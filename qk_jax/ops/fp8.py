"""``fp8_matmul``: ``x @ w`` with both operands in float8 e4m3 and the backward pass's cotangent in e5m2.

Current ("just-in-time") per-tensor scaling: each operand is divided by ``amax(|operand|) / max(format)`` before
the cast, so its largest magnitude lands on the format's largest finite value, and the product is multiplied back.
E4M3 (3 mantissa bits, max 448) carries the forward operands, E5M2 (2 bits, max 57344) the gradients, whose range
is wider (Micikevicius et al. 2022, "FP8 formats for deep learning"). The matmuls themselves are written as
dequantise-then-dot, the pattern XLA:GPU rewrites into one cuBLASLt fp8 GEMM with the scales as its scalar
arguments (NVIDIA's "Native XLA-FP8" guide); elsewhere XLA runs them in the compute dtype on the rounded values,
so CPU numerics are what a GPU computes, up to the accumulation order.

Why by hand: flax's ``fp8_ops`` scale from an amax *history* (delayed scaling) kept in a special variable
collection whose "gradient" the optimizer must write back in place of an update; current scaling needs no state,
so the train state, its sharding, checkpoints and export do not change. It costs one max-reduction per operand,
which XLA fuses into the operand's producer. The residuals kept for the backward pass are the fp8 operands and
their scales: half the bytes of bf16 ones.

This is a deviation from the paper's bf16 numerics (appendix D), opt-in with ``config.fp8``
(``qk_jax.models.mmdit``: the blocks' attention and FFN projections; docs/performance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn  # activations and weights
BACKWARD = jnp.float8_e5m2  # the output cotangent


def scale_of(x: jax.Array, fp8_dtype) -> jax.Array:
    """The per-tensor scale ``amax(|x|) / max(fp8_dtype)`` (float32 scalar); 1 for an all-zero ``x``, so that a
    zero-initialised kernel quantises to zeros instead of NaNs."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.where(amax > 0, amax / float(jnp.finfo(fp8_dtype).max), 1.0)


def quantize(x: jax.Array, fp8_dtype) -> tuple[jax.Array, jax.Array]:
    """``(x / scale)`` rounded to ``fp8_dtype`` (clipped to its finite range) and the scale."""
    scale = scale_of(x, fp8_dtype)
    limit = float(jnp.finfo(fp8_dtype).max)
    q = jnp.clip(x.astype(jnp.float32) / scale, -limit, limit).astype(fp8_dtype)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """``q * scale`` in ``dtype``: the form XLA:GPU folds into an fp8 GEMM's operand."""
    return q.astype(dtype) * scale.astype(dtype)


def _dot(a, b, dims, dtype):
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=dtype)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x`` ``[..., K]`` and ``w`` ``[K, N]`` (one dtype, the compute dtype) with e4m3 operands;
    returns ``[..., N]`` in that dtype. Its VJP quantises the cotangent to e5m2 and reuses the forward's fp8
    operands: ``dx = g @ w.T``, ``dw = x.T @ g``."""
    return _forward(x, w)[0]


def _forward(x, w):
    if x.dtype != w.dtype or w.ndim != 2:
        raise ValueError(f"fp8_matmul takes x [..., K] and w [K, N] of one dtype; got {x.shape} {x.dtype} and"
                         f" {w.shape} {w.dtype}")
    dtype = x.dtype
    xq, sx = quantize(x, FORWARD)
    wq, sw = quantize(w, FORWARD)
    y = _dot(dequantize(xq, sx, dtype), dequantize(wq, sw, dtype), ((x.ndim - 1,), (0,)), dtype)
    return y, (xq, sx, wq, sw)


def _backward(residuals, g):
    xq, sx, wq, sw = residuals
    dtype = g.dtype
    gq, sg = quantize(g, BACKWARD)
    g_dq = dequantize(gq, sg, dtype)
    dx = _dot(g_dq, dequantize(wq, sw, dtype), ((g.ndim - 1,), (1,)), dtype)  # [..., N] x [K, N] -> [..., K]
    batch = tuple(range(xq.ndim - 1))
    dw = _dot(dequantize(xq, sx, dtype), g_dq, (batch, batch), dtype)  # [..., K] x [..., N] -> [K, N]
    return dx, dw


fp8_matmul.defvjp(_forward, _backward)

__all__ = ["BACKWARD", "FORWARD", "dequantize", "fp8_matmul", "quantize", "scale_of"]
