"""Qwen2.5-VL RoPE pieces of ``qk_jax.ops.rope`` against transformers: M-RoPE position ids (``get_rope_index``)
for ragged batches, the LLM's M-RoPE tables, the ViT's 2D rotary tables and the rotate-half application."""

import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.ops import rope

torch = pytest.importorskip("torch")
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

IMAGE, START, END, VOCAB_TEXT = 108, 105, 106, 90
MERGE = 2


def _sample(items, rng):
    """Token ids for a list of items: an int is that many text tokens, a (t, h, w) tuple an image (patches)."""
    ids, grids = [], []
    for item in items:
        if isinstance(item, int):
            ids += rng.integers(0, VOCAB_TEXT, item).tolist()
        else:
            t, h, w = item
            ids += [START] + [IMAGE] * (t * h * w // MERGE**2) + [END]
            grids.append(item)
    return ids, grids


def _batch(samples, padding_side, seed=0):
    rng = np.random.default_rng(seed)
    rows, grids = zip(*(_sample(s, rng) for s in samples))
    length = max(map(len, rows)) + 2  # every row gets some padding
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, row in enumerate(rows):
        sl = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[b, sl], mask[b, sl] = row, 1
    grid = np.asarray([g for gs in grids for g in gs], np.int64).reshape(-1, 3)
    return input_ids, mask, grid


def _hf_rope_index(input_ids, mask, grid):
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=2)),
        get_vision_position_ids=functools.partial(hf.Qwen2_5_VLModel.get_vision_position_ids, None),
    )
    ids = torch.from_numpy(input_ids)
    pos, deltas = hf.Qwen2_5_VLModel.get_rope_index(
        fake, ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=torch.from_numpy(grid) if len(grid) else None,
        attention_mask=torch.from_numpy(mask))
    return pos.permute(1, 2, 0).numpy(), deltas[:, 0].numpy()


BATCHES = {
    "ragged_0_1_2_images": [[7], [3, (1, 4, 6), 5], [(1, 2, 2), 4, (1, 6, 4), 2]],
    "text_only": [[5], [9]],
    "image_first_and_last": [[(1, 4, 2)], [2, (1, 2, 6)], [1, (1, 4, 4), (1, 2, 2), 1]],
}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(BATCHES))
def test_mrope_position_ids_match_transformers(name, padding_side):
    input_ids, mask, grid = _batch(BATCHES[name], padding_side)
    ref_pos, ref_deltas = _hf_rope_index(input_ids, mask, grid)
    fn = jax.jit(functools.partial(rope.mrope_position_ids, image_token_id=IMAGE, spatial_merge_size=MERGE))
    pos, deltas = fn(jnp.asarray(input_ids), jnp.asarray(mask), jnp.asarray(grid))
    chex.assert_trees_all_equal((np.asarray(pos), np.asarray(deltas)), (ref_pos, ref_deltas))


def test_mrope_position_ids_with_traced_grid_and_holes():
    """Grids may be traced; tokens masked out in the middle are skipped like padding."""
    input_ids, mask, grid = _batch(BATCHES["ragged_0_1_2_images"], "right", seed=3)
    mask[1, 1] = 0  # a hole in the text before the image
    ref_pos, _ = _hf_rope_index(input_ids, mask, grid)
    pos, _ = jax.jit(lambda i, m, g: rope.mrope_position_ids(i, m, g, image_token_id=IMAGE, spatial_merge_size=MERGE))(
        input_ids, mask, grid)
    chex.assert_trees_all_equal(np.asarray(pos), ref_pos)


def _hf_text_rope(head_dim, section, theta, pos):
    config = types.SimpleNamespace(
        max_position_embeddings=1000,
        rope_parameters=dict(rope_type="default", rope_theta=theta, mrope_section=section),
        head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1)
    emb = hf.Qwen2_5_VLRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    return emb(x, torch.from_numpy(np.moveaxis(pos, -1, 0)).long())


def test_mrope_tables_and_rotation_match_transformers():
    input_ids, mask, grid = _batch(BATCHES["ragged_0_1_2_images"], "left")
    pos = np.asarray(rope.mrope_position_ids(input_ids, mask, grid, image_token_id=IMAGE, spatial_merge_size=MERGE)[0])
    pos = pos + np.array([0, 300, 700])  # large positions too (the 7B sees thousands)
    head_dim, section = 32, (4, 6, 6)
    ref_cos, ref_sin = _hf_text_rope(head_dim, list(section), 1e6, pos)
    cos, sin = rope.mrope_cos_sin(jnp.asarray(pos), head_dim, section, theta=1e6)
    chex.assert_trees_all_close((cos, sin), (ref_cos.numpy(), ref_sin.numpy()), atol=5e-6, rtol=0)

    rng = np.random.default_rng(0)
    q = rng.standard_normal((*pos.shape[:2], 4, head_dim)).astype(np.float32)  # [B, S, H, D]
    k = rng.standard_normal((*pos.shape[:2], 2, head_dim)).astype(np.float32)
    ref_q, ref_k = hf.apply_rotary_pos_emb(
        torch.from_numpy(q), torch.from_numpy(k), ref_cos, ref_sin, unsqueeze_dim=2)
    out = jax.jit(rope.apply_rope_half)
    chex.assert_trees_all_close((out(q, cos, sin), out(k, cos, sin)), (ref_q.numpy(), ref_k.numpy()), atol=2e-5, rtol=0)
    # Exact tables give exact rotations: with transformers' own tables the rotation itself is identical.
    chex.assert_trees_all_close(out(q, ref_cos.numpy(), ref_sin.numpy()), ref_q.numpy(), atol=1e-6, rtol=0)


def test_mrope_of_text_tokens_is_1d_rope():
    pos = jnp.broadcast_to(jnp.arange(11)[:, None], (11, 3))
    cos, sin = rope.mrope_cos_sin(pos, 16, (2, 3, 3))
    cos1, sin1 = rope.mrope_cos_sin(pos, 16, (8, 0, 0))
    chex.assert_trees_all_equal((cos, sin), (cos1, sin1))


def test_vision_tables_and_rotation_match_transformers():
    grid = np.array([[1, 4, 6], [1, 2, 2], [2, 2, 4]])
    pos = rope.vision_position_ids(grid.tolist(), MERGE)
    ref_pos = get_vision_position_ids(torch.from_numpy(grid), MERGE).numpy()
    chex.assert_trees_all_equal(pos, ref_pos.astype(np.int32))

    head_dim = 16
    config = types.SimpleNamespace(rope_parameters=dict(rope_type="axial", rope_theta=10000.0), head_dim=head_dim)
    ref_cos, ref_sin = hf.Qwen2_5_VLVisionRotaryEmbedding(config)(torch.zeros(1), torch.from_numpy(ref_pos))
    cos, sin = rope.vision_rope_cos_sin(jnp.asarray(pos), head_dim)
    chex.assert_trees_all_close((cos, sin), (ref_cos.numpy(), ref_sin.numpy()), atol=1e-6, rtol=0)

    rng = np.random.default_rng(1)
    q = rng.standard_normal((pos.shape[0], 2, head_dim)).astype(np.float32)  # transformers: [N, heads, D]
    ref_q, _ = hf.apply_rotary_pos_emb_vision(torch.from_numpy(q), torch.from_numpy(q), ref_cos, ref_sin)
    chex.assert_trees_all_close(rope.apply_rope_half(q[None], cos, sin)[0], ref_q.numpy(), atol=1e-5, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="mrope_section"):
        rope.mrope_cos_sin(jnp.zeros((3, 3)), 16, (2, 2, 2))
    with pytest.raises(ValueError, match="spatial_merge_size"):
        rope.vision_position_ids([(1, 3, 4)], 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope.vision_rope_cos_sin(jnp.zeros((3, 2)), 18)
