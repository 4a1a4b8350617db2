"""qk_jax.diagnose: attention shares on constructed heads, the same-pixel index under both source offsets, the
changed-token mask, the subjects' tokens of ShapesWorld samples, and on a random tiny stage-3 model: the
recomputed probabilities reproduce every attention's own output; the CLI and its errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage2, stage3
from qk_jax import diagnose, sampling
from qk_jax.data import shapesworld
from qk_jax.evaluation import attention_maps
from qk_jax.models import saved_model
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.ops import rope

H = W = 3  # a 3x3 token grid: 9 target and 9 source tokens


def _layout(source_offset):
    return jax.tree.map(np.asarray, rope.in_context_layout(H, W, jnp.asarray([[rope.SOURCE]]), source_offset))


@pytest.mark.parametrize("source_offset", ["negate", "axis0"])
def test_same_pixel_index_pairs_each_target_token_with_its_source_pixel(source_offset):
    layout = _layout(source_offset)
    same = attention_maps.same_pixel_index(layout, H * W)
    ids, kind = layout.ids[0], layout.kind[0]
    targets = np.flatnonzero(kind == rope.KIND_TARGET)
    assert len(targets) == H * W and (same[0, kind != rope.KIND_TARGET] == -1).all()
    for j in targets:
        m = same[0, j]
        assert kind[m] == rope.KIND_SOURCE
        r, c = ids[j, 1:]  # the target's (row, col); the source's is the same or negated, on axis 0 = 1 or 0
        assert tuple(ids[m]) == ((1, r, c) if source_offset == "axis0" else (0, -r, -c))


@pytest.mark.parametrize("source_offset", ["negate", "axis0"])
def test_shares_of_a_copying_head_and_of_a_uniform_head(source_offset):
    layout = _layout(source_offset)
    same = attention_maps.same_pixel_index(layout, H * W)
    kind = layout.kind
    text_len, length = 4, 2 * H * W
    # Copying head: a target query and its same-pixel source key share a one-hot direction (scaled up).
    q = np.zeros((1, text_len + length, 1, length))
    k = np.zeros_like(q)
    for j in np.flatnonzero(kind[0] == rope.KIND_TARGET):
        q[0, text_len + j, 0, j] = k[0, text_len + same[0, j], 0, j] = 30.0
    probs = attention_maps.attention_probabilities(q, k, None)
    shares = attention_maps.attention_shares(probs, kind, same, text_len)
    np.testing.assert_allclose(shares["same_pixel_source"], 1.0, atol=1e-6)
    np.testing.assert_allclose(shares["source"], 1.0, atol=1e-6)
    for name in ("text", "target", "self", "reference"):
        np.testing.assert_allclose(shares[name], 0.0, atol=1e-6)
    # Uniform head (q = 0) over 4 text keys, one of them masked out: each share is a count ratio.
    mask = np.ones((1, text_len + length), bool)
    mask[0, 1] = False
    probs = attention_maps.attention_probabilities(np.zeros_like(q), k, mask)
    shares = attention_maps.attention_shares(probs, kind, same, text_len)
    n = text_len - 1 + length
    expected = dict(same_pixel_source=1 / n, source=H * W / n, reference=0.0, target=H * W / n, self=1 / n,
                    text=(text_len - 1) / n)
    for name, value in expected.items():
        np.testing.assert_allclose(shares[name], value, rtol=1e-9, err_msg=name)


def test_subject_share_of_a_lookup_head_and_of_a_uniform_head():
    """Target tokens 0-1 hold the subject, reference tokens 4-6 (sequence: 9 target then 9 reference tokens)."""
    layout = jax.tree.map(np.asarray, rope.in_context_layout(H, W, jnp.asarray([[rope.REFERENCE]])))
    kind, length, text_len = layout.kind, 2 * H * W, 2
    assert (kind[0, :H * W] == rope.KIND_TARGET).all() and (kind[0, H * W:] == rope.KIND_REFERENCE).all()
    queries, keys = np.zeros((1, 1, length), bool), np.zeros((1, 1, length), bool)
    queries[0, 0, [0, 1]] = True
    keys[0, 0, H * W + np.arange(4, 7)] = True
    subjects = attention_maps.SubjectTokens(queries=queries, keys=keys)
    same = attention_maps.same_pixel_index(layout, H * W)
    # Lookup head: the subject's target queries share one direction with its reference keys; others are 0.
    q = np.zeros((1, text_len + length, 1, 2))
    k = np.zeros_like(q)
    q[0, text_len + np.flatnonzero(queries[0, 0]), 0, 0] = 30.0
    k[0, text_len + np.flatnonzero(keys[0, 0]), 0, 0] = 30.0
    shares = attention_maps.attention_shares(attention_maps.attention_probabilities(q, k, None), kind, same, text_len, subjects)
    np.testing.assert_allclose(shares["subject_reference"], 1.0, atol=1e-6)
    assert np.isnan(shares["same_pixel_source"]).all()  # no source: nothing to average
    # Uniform head: the share is the subject's key count over all keys, as SubjectTokens.uniform says.
    mask = np.ones((1, text_len + length), bool)
    shares = attention_maps.attention_shares(attention_maps.attention_probabilities(np.zeros_like(q), k, mask), kind, same,
                                       text_len, subjects)
    np.testing.assert_allclose(shares["subject_reference"], 3 / (text_len + length), rtol=1e-9)
    np.testing.assert_allclose(subjects.uniform(mask), 3 / (text_len + length), rtol=1e-9)
    no_subject = attention_maps.attention_shares(attention_maps.attention_probabilities(q, k, None), kind, same, text_len)
    assert np.isnan(no_subject["subject_reference"]).all()


@pytest.mark.parametrize("task", ["custom", "multi", "subject_edit"])
def test_subject_tokens_find_each_subject_in_target_and_reference(task):
    world = shapesworld.default_world(32)
    items = [shapesworld.generate_sample(world, [0, k], task, "test") for k in range(3)]
    num = len(items[0]["inputs"])
    roles = jnp.asarray([[rope.SOURCE if x["role"] == "source" else rope.REFERENCE for x in it["inputs"]]
                         for it in items])
    hw = (4, 4)
    layout = jax.tree.map(np.asarray, rope.in_context_layout(*hw, roles))
    subjects = attention_maps.subject_tokens(items, layout, hw, world)
    refs = 2 if task == "multi" else 1
    assert subjects.queries.shape == subjects.keys.shape == (3, refs, (1 + num) * 16)
    for b, item in enumerate(items):
        slots = [m for m, x in enumerate(item["inputs"]) if x["role"] == "reference"]  # input m is slot m + 1
        reference_blocks = [list(layout.order[b]).index(m + 1) for m in slots]
        for r in range(refs):
            q, k = subjects.queries[b, r], subjects.keys[b, r]
            assert q.any() and k.any()
            assert (layout.kind[b, q] == rope.KIND_TARGET).all() and (layout.kind[b, k] == rope.KIND_REFERENCE).all()
            assert np.flatnonzero(k)[0] // 16 == reference_blocks[r]  # reference r sits in its own block
            # A subject is large and at the reference's centre: its tokens there, none on the border row.
            k_grid = k.reshape(-1, 4, 4)[reference_blocks[r]]
            assert k_grid[1:3, 1:3].all() and not k_grid[0].any()
            # The target tokens are those of the cell the target scene puts that subject in.
            subject = item["inputs"][slots[r]]["subject"]
            obj = next(o for o in item["target_scene"]
                       if shapesworld.is_subject(o) and shapesworld.subject_key(o) == shapesworld.subject_key(subject))
            alone = attention_maps.changed_tokens(shapesworld.render([], world)[None], shapesworld.render([obj], world)[None], hw)[0]
            np.testing.assert_array_equal(q.reshape(-1, 16)[list(layout.order[b]).index(0)], alone)


def test_changed_tokens_flags_the_patches_that_differ():
    source = np.full((2, 12, 12, 3), 255, np.uint8)
    target = source.copy()
    target[0, 5, 9] = (255, 0, 0)  # row 5 -> token row 1 (patch 4 px), col 9 -> token col 2
    target[1, 0:8, 0:4] = 0  # token rows 0-1, col 0
    changed = attention_maps.changed_tokens(source, target, (3, 3))
    assert changed.shape == (2, 9)
    assert np.flatnonzero(changed[0]).tolist() == [1 * 3 + 2]
    assert np.flatnonzero(changed[1]).tolist() == [0, 3]


@pytest.fixture(scope="module")
def tiny_stage3(random_stage3_checkpoint):
    return random_stage3_checkpoint


@pytest.mark.parametrize("task", ["edit", "custom", "subject_edit"])
def test_probabilities_reproduce_each_attention_output(tiny_stage3, task):
    """softmax(q k^T / sqrt(d), key mask) @ v, from what each layer sowed, is what the layer computed."""
    p = attention_maps.probe(sampling.Sampler.from_checkpoint(tiny_stage3), task, num=3, t=0.7)
    config = QueryKontextConfig.from_config(stage3.get_config("tiny")).mmdit
    assert len(p.sown) == config.num_layers + config.num_single_layers
    for name, block in p.sown.items():
        attn = {key: value[0] for key, value in block["attn"].items()}
        probs = attention_maps.attention_probabilities(attn["query"], attn["key"], p.kv_mask)
        out = np.einsum("bhqk,bkhd->bqhd", probs, attn["value"].astype(np.float64))
        np.testing.assert_allclose(out, attn["output"], rtol=1e-4, atol=1e-5, err_msg=name)
    assert p.error.shape == p.changed.shape == (3, p.tokens) and np.isfinite(p.error).all()
    assert p.changed.any() and not p.changed.all()  # the instruction draws some cells and keeps others
    assert p.subjects.queries.shape[1] == (0 if task == "edit" else 1)


def test_cli_report_and_errors(tiny_stage3, tmp_path):
    out = tmp_path / "copy.json"
    report = diagnose.main(["--checkpoint", str(tiny_stage3), "--num", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for row in report["layers"]:
        total = sum(np.asarray(row[k]) for k in ("source", "reference", "target", "text"))
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        assert all(0.0 <= s <= f + 1e-9 for s, f in zip(row["same_pixel_source"], row["source"]))
    assert report["loss_kept"] > 0 and report["loss_changed"] > 0 and 0 < report["kept_tokens"] < 1
    assert "same_pixel_source" in attention_maps.markdown(report) and "subject_reference" not in attention_maps.markdown(report)
    assert report["subject_uniform"] is None
    multi = diagnose.main(["--checkpoint", str(tiny_stage3), "--num", "2", "--task", "multi"])
    assert 0 < multi["subject_uniform"] < 1 and multi["loss_kept"] > 0
    for row in multi["layers"]:
        assert all(0.0 <= s <= f + 1e-9 for s, f in zip(row["subject_reference"], row["reference"]))
        assert row["same_pixel_source"] == [None] * len(row["source"])
    text = attention_maps.markdown(multi)
    assert "subject_reference" in text and "same_pixel_source" not in text
    sampler = sampling.Sampler.from_checkpoint(tiny_stage3)
    with pytest.raises(ValueError, match="no in-context image"):
        attention_maps.probe(sampler, "t2i")
    with pytest.raises(ValueError, match="t must be in"):
        attention_maps.probe(sampler, "edit", t=0.0)
    config = stage2.get_config("tiny")
    params = QueryKontext(QueryKontextConfig.from_config(config)).init(jax.random.key(1))
    saved_model.save_model(tmp_path / "stage2", config, params, meta={"stage": 2, "step": 0})
    with pytest.raises(ValueError, match="no in-context inputs"):
        attention_maps.probe(sampling.Sampler.from_checkpoint(tmp_path / "stage2"))
