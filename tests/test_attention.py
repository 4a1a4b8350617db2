"""The attention function against a NumPy softmax reference, with every kind of mask."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.ops.attention import attention, select_implementation


def _reference(q, k, v, allowed, scale=None):
    """NumPy softmax attention; ``allowed`` bool [B, N, T, S]; rows with nothing allowed give zeros."""
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    k = np.repeat(k, groups, axis=2)
    v = np.repeat(v, groups, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k).astype(np.float64) * (scale or 1 / np.sqrt(h))
    logits = np.where(allowed, logits, -np.inf)
    row_ok = allowed.any(-1, keepdims=True)
    logits = np.where(row_ok, logits, 0.0)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = np.where(allowed, p, 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    return out.astype(np.float32)


def _qkv(b=2, t=5, s=7, n=4, kv=2, h=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))


def test_no_mask_and_gqa():
    q, k, v = _qkv()
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    chex.assert_trees_all_close(out, _reference(q, k, v, np.ones((2, 4, 5, 7), bool)), atol=1e-5)


def test_padding_masks_zero_padded_queries():
    q, k, v = _qkv()
    kv_mask = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 1]], bool)  # not only suffix padding
    q_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    allowed = np.broadcast_to(kv_mask[:, None, None, :], (2, 4, 5, 7)) & q_mask[:, None, :, None]
    out = jax.jit(attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_mask=kv_mask, q_mask=q_mask)
    chex.assert_trees_all_close(out, _reference(q, k, v, allowed), atol=1e-5)
    assert not np.asarray(out[0, 3:]).any()


def test_segment_ids_causal_and_free_form_mask():
    q, k, v = _qkv(t=6, s=6)
    seg = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 2]], np.int32)
    window = np.tril(np.ones((6, 6), bool), 1) & np.triu(np.ones((6, 6), bool), -2)
    out = attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids=(seg, seg), mask=window, is_causal=True
    )
    allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & window & np.tril(np.ones((6, 6), bool))
    chex.assert_trees_all_close(out, _reference(q, k, v, np.broadcast_to(allowed, (2, 4, 6, 6))), atol=1e-5)


def test_a_query_with_no_visible_key_gets_zeros():
    q, k, v = _qkv(b=1, t=3, s=4)
    per_head = np.ones((1, 4, 3, 4), bool)
    per_head[0, 1, 2] = False  # head 1 of query 2 sees nothing
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=per_head)
    chex.assert_trees_all_close(out, _reference(q, k, v, per_head), atol=1e-5)
    assert not np.asarray(out[0, 2, 1]).any() and np.asarray(out[0, 2, 0]).any()


def test_custom_scale_and_bf16():
    q, k, v = _qkv()
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.3)
    chex.assert_trees_all_close(out, _reference(q, k, v, np.ones((2, 4, 5, 7), bool), scale=0.3), atol=1e-5)
    out16 = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out16.dtype == jnp.bfloat16


def test_implementation_choice_and_shape_errors():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv())
    assert select_implementation(q, k, v) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert select_implementation(*(a.astype(jnp.float32) for a in (q, k, v))) == "xla"
    with pytest.raises(ValueError, match="heads, head_dim"):
        attention(q[0], k, v)


def test_gradients_match_torch_autograd_with_gqa_padding_and_causality():
    """The gradients of ``attention`` (jax.nn.dot_product_attention's autodiff, masks combined here) against
    torch's autograd of the same masked softmax attention in float64: what every trained model leans on."""
    torch = pytest.importorskip("torch")
    q, k, v = _qkv(b=2, t=6, s=6, n=4, kv=2, h=8, seed=3)
    kv_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], bool)
    q_mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    w = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)

    def loss(q, k, v):
        return (attention(q, k, v, kv_mask=kv_mask, q_mask=q_mask, is_causal=True) * w).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    allowed = torch.tensor(kv_mask[:, None, None, :] & np.tril(np.ones((6, 6), bool)))  # [B, 1, T, S]
    out = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.repeat_interleave(2, dim=2).transpose(1, 2),
        tv.repeat_interleave(2, dim=2).transpose(1, 2), attn_mask=allowed).transpose(1, 2)
    out = out * torch.tensor(q_mask[:, :, None, None])
    (out * torch.tensor(w, dtype=torch.float64)).sum().backward()
    for got, want in zip(grads, (tq.grad, tk.grad, tv.grad)):
        chex.assert_trees_all_close(got, want.numpy().astype(np.float32), atol=2e-5)
    assert np.abs(np.asarray(grads[1])[0, 4:]).max() == 0  # padding keys get no gradient
