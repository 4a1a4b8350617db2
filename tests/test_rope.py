"""RoPE against diffusers' FLUX rotary embedding, and sRoPE ids against the paper's equations 1-4."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.ops import rope

AXES = (16, 24, 24)  # FLUX / paper MMDiT: head dim 64


def _ids_with_negative_and_shifted_coordinates():
    h, w = 5, 7
    return np.concatenate(
        [
            np.zeros((3, 3), np.int32),  # text / kontext
            np.asarray(rope.image_position_ids(h, w, "source")),
            np.asarray(rope.image_position_ids(h, w, "target")),
            np.asarray(rope.image_position_ids(h, w, "reference", 2)),
            # the far corner of a 1024-px latent (64x64 tokens) as the 4th reference, and its source mirror
            np.array([[0, 64 * 5 - 1, 64 * 5 - 1], [0, -63, -63], [3, 17, -250]], np.int32),
        ]
    )


def test_rope_tables_and_application_match_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = _ids_with_negative_and_shifted_coordinates()
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(AXES))(torch.from_numpy(ids))
    cos, sin = rope.rope_cos_sin(jnp.asarray(ids), AXES, theta=10000.0)
    chex.assert_trees_all_close((cos, sin), (ref_cos.numpy(), ref_sin.numpy()), atol=1e-5, rtol=0)

    x = np.random.default_rng(0).standard_normal((2, ids.shape[0], 3, sum(AXES))).astype(np.float32)
    ref = apply_rotary_emb(torch.from_numpy(x), (ref_cos, ref_sin), sequence_dim=1).numpy()
    out = jax.jit(rope.apply_rope)(jnp.asarray(x), cos, sin)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)


def test_per_sample_tables_equal_separate_calls():
    ids = np.stack([_ids_with_negative_and_shifted_coordinates(), _ids_with_negative_and_shifted_coordinates()[::-1]])
    cos, sin = rope.rope_cos_sin(jnp.asarray(ids), AXES)
    for b in range(2):
        c, s = rope.rope_cos_sin(jnp.asarray(ids[b]), AXES)
        chex.assert_trees_all_equal((cos[b], sin[b]), (c, s))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, ids.shape[1], 2, 64)), jnp.float32)
    out = rope.apply_rope(x, cos, sin)
    chex.assert_trees_all_close(out[1:], rope.apply_rope(x[1:], cos[1], sin[1]))


def test_apply_rope_keeps_bf16():
    ids = jnp.asarray(_ids_with_negative_and_shifted_coordinates())
    cos, sin = rope.rope_cos_sin(ids, AXES)
    x = jnp.ones((1, ids.shape[0], 2, 64), jnp.bfloat16)
    assert rope.apply_rope(x, cos, sin).dtype == jnp.bfloat16


def _paper_ids(h, w, role, n=0):
    """Eq. 1-4 with the paper's letters: i is the column in [0, w-1], j the row in [0, h-1]."""
    out = []
    for j in range(h):
        for i in range(w):
            if role == "target":
                col, row = i, j
            elif role == "source":  # eq. 2 / 4: (i', j') = (-i, -j)
                col, row = -i, -j
            else:  # eq. 1 / 3: (i + w n, j + h n)
                col, row = i + w * n, j + h * n
            out.append((0, row, col))
    return np.array(out, np.int32)


@pytest.mark.parametrize("h,w", [(3, 5), (4, 2), (1, 6)])
def test_image_position_ids_follow_equations_1_to_4(h, w):
    for role in ("target", "source"):
        np.testing.assert_array_equal(rope.image_position_ids(h, w, role), _paper_ids(h, w, role))
    for n in range(1, 5):
        np.testing.assert_array_equal(rope.image_position_ids(h, w, "reference", n), _paper_ids(h, w, "reference", n))
    np.testing.assert_array_equal(rope.text_position_ids(4), np.zeros((4, 3)))


def test_image_position_ids_reject_bad_roles():
    with pytest.raises(ValueError, match="unknown sRoPE role"):
        rope.image_position_ids(2, 2, "style")
    with pytest.raises(ValueError, match="index n >= 1"):
        rope.image_position_ids(2, 2, "reference")
    with pytest.raises(ValueError, match="only meaningful for references"):
        rope.image_position_ids(2, 2, "source", 1)


def _expected_sequence(h, w, slot_roles):
    """Blocks in the paper's order: sources, noise, references (numbered among references), empty slots."""
    src = [s for s, r in enumerate(slot_roles) if r == rope.SOURCE]
    refs = [s for s, r in enumerate(slot_roles) if r == rope.REFERENCE]
    empty = [s for s, r in enumerate(slot_roles) if r == rope.NONE]
    order = [1 + s for s in src] + [0] + [1 + s for s in refs] + [1 + s for s in empty]
    ids = [_paper_ids(h, w, "source") for _ in src] + [_paper_ids(h, w, "target")]
    ids += [_paper_ids(h, w, "reference", n) for n in range(1, len(refs) + 1)]
    ids += [np.zeros((h * w, 3), np.int32) for _ in empty]
    kinds = [rope.KIND_SOURCE] * len(src) + [rope.KIND_TARGET] + [rope.KIND_REFERENCE] * len(refs)
    kinds += [rope.KIND_PAD] * len(empty)
    return np.array(order), np.concatenate(ids), np.repeat(kinds, h * w)


def test_in_context_layout_mixes_tasks_in_one_batch():
    S, R, _ = rope.SOURCE, rope.REFERENCE, rope.NONE
    h, w = 2, 3
    roles = np.array(
        [
            [_, _, _, _, _],  # t2i
            [S, _, _, _, _],  # edit: concat(src, noise)
            [R, _, _, _, _],  # custom
            [R, R, _, _, _],  # multi-subject, N = 2
            [R, R, R, R, _],  # N = 4
            [R, S, R, _, _],  # subject_edit: concat(src, noise, ref_1, ref_2), source not in slot 0
            [_, R, _, R, S],  # empty slots in between (a dropped image) do not renumber references
        ],
        np.int32,
    )
    layout = jax.jit(rope.in_context_layout, static_argnums=(0, 1))(h, w, roles)
    for b, row in enumerate(roles):
        order, ids, kind = _expected_sequence(h, w, list(row))
        np.testing.assert_array_equal(layout.order[b], order, err_msg=f"sample {b}")
        np.testing.assert_array_equal(layout.ids[b], ids, err_msg=f"sample {b}")
        np.testing.assert_array_equal(layout.kind[b], kind, err_msg=f"sample {b}")


def test_kontext_source_offset_moves_the_source_along_axis0_only():
    """FLUX.1 Kontext's placement: the source keeps its grid at axis0 = 1, so a target token and the source token
    of the same pixel differ by (1, 0, 0) everywhere; with the paper's negation the offset is (0, 2r, 2c)."""
    S, R, _ = rope.SOURCE, rope.REFERENCE, rope.NONE
    h, w = 2, 3
    roles = np.array([[S, R, _], [R, _, _]], np.int32)
    paper = rope.in_context_layout(h, w, roles)
    kontext = jax.jit(rope.in_context_layout, static_argnums=(0, 1, 3))(h, w, roles, "axis0")
    np.testing.assert_array_equal(kontext.order, paper.order)
    np.testing.assert_array_equal(kontext.kind, paper.kind)
    rows, cols = np.divmod(np.arange(h * w), w)
    target = np.stack([np.zeros(h * w), rows, cols], -1)
    ids = np.asarray(kontext.ids)
    np.testing.assert_array_equal(ids[0, :h * w], target + [1, 0, 0])  # sample 0: concat(src, noise, ref)
    np.testing.assert_array_equal(ids[0, :h * w] - ids[0, h * w:2 * h * w], np.tile([1, 0, 0], (h * w, 1)))
    np.testing.assert_array_equal(np.asarray(paper.ids)[0, :h * w], target * [1, -1, -1])
    no_source = np.asarray(paper.ids)[0, h * w:], np.asarray(paper.ids)[1]
    np.testing.assert_array_equal(ids[0, h * w:], no_source[0])  # target and references do not move
    np.testing.assert_array_equal(ids[1], no_source[1])
    with pytest.raises(ValueError, match="source_offset"):
        rope.in_context_layout(h, w, roles, "negative")


def test_in_context_layout_without_slots_is_the_target_grid():
    layout = rope.in_context_layout(3, 4, np.zeros((2, 0), np.int32))
    np.testing.assert_array_equal(layout.ids, np.stack([_paper_ids(3, 4, "target")] * 2))
    assert (np.asarray(layout.kind) == rope.KIND_TARGET).all()


def test_gather_blocks_moves_tokens_with_their_ids():
    h, w = 2, 2
    roles = np.array([[rope.REFERENCE, rope.SOURCE], [rope.NONE, rope.REFERENCE]], np.int32)
    layout = rope.in_context_layout(h, w, roles)
    # token features = the block number they came from: [target, slot_1, slot_2]
    tokens = jnp.repeat(jnp.arange(3, dtype=jnp.float32), h * w)[None, :, None].repeat(2, 0)
    seq = rope.gather_blocks(tokens, layout.order)
    np.testing.assert_array_equal(seq[0, :, 0], np.repeat([2, 0, 1], h * w))  # src (slot 2), noise, ref (slot 1)
    np.testing.assert_array_equal(seq[1, :, 0], np.repeat([0, 2, 1], h * w))  # noise, ref (slot 2), empty (slot 1)


def test_validate_roles_names_the_sample():
    rope.validate_roles([[rope.SOURCE, rope.REFERENCE, rope.REFERENCE]], max_references=2)
    with pytest.raises(ValueError, match="sample 1 has 2 source"):
        rope.validate_roles([[rope.SOURCE, 0], [rope.SOURCE, rope.SOURCE]])
    with pytest.raises(ValueError, match="max_references=2"):
        rope.validate_roles([[rope.REFERENCE] * 3], max_references=2)
    with pytest.raises(ValueError, match="unknown role code 7"):
        rope.validate_roles([[7]])


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 64)), jnp.float32)

    def score(pq, pk):
        cq, sq = rope.rope_cos_sin(jnp.asarray([pq]), AXES)
        ck, sk = rope.rope_cos_sin(jnp.asarray([pk]), AXES)
        return float(jnp.sum(rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk)))

    for _ in range(20):
        pq, pk, shift = (rng.integers(-150, 150, 3) for _ in range(3))
        base = score(pq, pk)
        np.testing.assert_allclose(score(pq + shift, pk + shift), base, atol=1e-4)
    # ... and do depend on it (a constant score would pass the check above)
    assert abs(score([0, 0, 0], [0, 0, 1]) - score([0, 0, 0], [0, 3, 0])) > 1e-3
