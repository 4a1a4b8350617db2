"""``materialize_cotangent``: an identity whose backward pass computes its cotangent once, on XLA:CPU.

Why by hand: no library offers it, and XLA:CPU needs it. A normalisation's input is the residual stream,
whose cotangent has many consumers in the backward pass: the residual add before it, the gate's gradient
(a reduction over tokens), the weight gradient of the dense layer that wrote it (which reads it transposed).
XLA:CPU's loop fusion treats the normalisation's backward (an elementwise chain over ``[B, S, D]`` with two
row reductions) as cheap and duplicates it into each consumer's fusion, and from block to block the
duplicated chains nest. At ShapesWorld's stage-2 shapes (batch 32, 112 tokens, width 128, 4 double-stream
blocks) the MMDiT's forward took 46 ms and its forward + backward 434 ms on 2 cores; with the norms' inputs
wrapped here, 270 ms (``optimization_barrier`` materialises the cotangent; fusion cannot see through it), and
the whole training step 612 ms -> 447 ms. The MMDiT's ``layer_norm`` uses it. The VLM's RMSNorm gained nothing
from it (its slow backward fusions are elsewhere), so it does not.

On GPU and TPU ``materialize_cotangent`` is the plain identity: the duplication was measured on XLA:CPU only,
and elsewhere a barrier would cost a pass over the activations for a gain nobody has measured. The forward pass
is never changed.
"""

from __future__ import annotations

import jax


@jax.custom_vjp
def _barrier_backward(x: jax.Array) -> jax.Array:
    return x


def _forward(x):
    return x, None


def _backward(_, cotangent):
    return (jax.lax.optimization_barrier(cotangent),)


_barrier_backward.defvjp(_forward, _backward)


def materialize_cotangent(x: jax.Array, *, backend: str | None = None) -> jax.Array:
    """``x`` unchanged; on CPU (``backend``, default ``jax.default_backend()``), its cotangent is computed once
    in the backward pass instead of being fused again into each of its consumers. Wrap a normalisation's input."""
    if (backend or jax.default_backend()) != "cpu":
        return x
    return _barrier_backward(x)


__all__ = ["materialize_cotangent"]
