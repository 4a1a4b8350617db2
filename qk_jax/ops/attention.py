"""The one attention function of qk_jax.

Every attention in the VLM, the MMDiT and the VAE calls ``attention``. It wraps
``jax.nn.dot_product_attention`` and picks its implementation: cuDNN's fused flash attention on GPU for
bf16/fp16 inputs whose head dim cuDNN supports, XLA's everywhere else (CPU, TPU, float32). Masks are
booleans (``True`` = attend) built from whichever of padding, segment ids, causality and a free-form mask
the caller has; they are combined here so that models never build additive biases themselves.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["xla", "cudnn"]

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def select_implementation(q: jax.Array, k: jax.Array, v: jax.Array) -> Implementation:
    """``"cudnn"`` on GPU for bf16/fp16 with a head dim cuDNN's flash kernel supports, else ``"xla"``."""
    head_dim = q.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and q.dtype == k.dtype == v.dtype
        and q.dtype in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_mask: jax.Array | None = None,
    q_mask: jax.Array | None = None,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: Implementation | None = None,
) -> jax.Array:
    """Scaled dot-product attention over ``[batch, length, heads, head_dim]`` arrays.

    Args:
      q: ``[B, T, N, H]``.
      k, v: ``[B, S, K, H]``; ``N`` a multiple of ``K`` (grouped-query attention).
      kv_mask: ``[B, S]`` bool, False for padding keys.
      q_mask: ``[B, T]`` bool, False for padding queries; their outputs are zero.
      segment_ids: ``(q_segments [B, T], kv_segments [B, S])`` ints; a query attends only to keys of its segment.
      mask: a boolean mask broadcastable to ``[B, N, T, S]`` (e.g. window attention), True = attend.
      is_causal: causal masking (query ``i`` attends keys ``<= i``; needs ``T == S``).
      scale: logit scale, default ``1/sqrt(H)``.
      implementation: ``"xla"`` or ``"cudnn"``; default ``select_implementation``.

    Returns:
      ``[B, T, N, H]`` in q's dtype. A query with no key to attend to gets zeros.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, heads, head_dim] arrays, got {q.shape}, {k.shape}, {v.shape}")
    batch, q_len = q.shape[:2]
    kv_len = k.shape[1]

    full = None  # bool [B, 1|N, T, S]
    if kv_mask is not None:
        full = jnp.broadcast_to(kv_mask[:, None, None, :].astype(bool), (batch, 1, q_len, kv_len))
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        seg = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
        full = seg if full is None else full & seg
    if mask is not None:
        m = jnp.asarray(mask, bool)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        full = m if full is None else full & m

    if implementation is None:
        implementation = select_implementation(q, k, v)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=full, is_causal=is_causal, scale=scale, implementation=implementation
    )

    # Rows that attend to nothing would otherwise average every value uniformly; make them exactly zero.
    # (With is_causal a query always sees itself, so only the explicit masks can empty a row.)
    valid = None  # bool broadcastable to [B, T, N]
    if full is not None:
        valid = jnp.swapaxes(jnp.any(full, axis=-1), 1, 2)  # [B|1, T, 1|N]
    if q_mask is not None:
        qm = q_mask.astype(bool)[:, :, None]
        valid = qm if valid is None else valid & qm
    if valid is not None:
        out = jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))
    return out
