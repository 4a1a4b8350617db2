"""The assembled model on real pipeline batches (tiny ShapesWorld): loss, gradients per stage, sRoPE placement."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1
from configs import stage2
from configs import stage3
from qk_jax.data import pipeline
from qk_jax.data import shapesworld
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig, vlm_image_grid
from qk_jax.ops import rope
from qk_jax.pytree import flatten
from qk_jax.training import state as st


def _config(module, **overrides):
    config = module.get_config("tiny")
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return shapesworld.write_split(str(out), "train", 28, 0, shapesworld.default_world(32), shapesworld.TASKS)


def _batches(config, manifest, batch_size=4):
    """Every batch of one epoch, as jnp arrays, with its static VLM grid."""
    pipe = pipeline.make_pipeline(config, manifest=manifest, num_epochs=1, batch_size=batch_size)
    return [({k: jnp.asarray(v) for k, v in b.items()}, vlm_image_grid(b)) for b in pipe]


@pytest.fixture(scope="module")
def stage3_setup(manifest):
    config = _config(stage3)
    model = QueryKontext(QueryKontextConfig.from_config(config))
    params = model.init(jax.random.key(0))
    batches = _batches(config, manifest)
    return config, model, params, batches


def _with_random_lora_b(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype) if p[-1].key == "lora_b" else x, params)


@pytest.mark.parametrize("module", [stage1, stage2, stage3], ids=["stage1", "stage2", "stage3"])
def test_loss_is_finite_and_only_trainable_leaves_get_gradients(module, manifest, stage3_setup):
    config = _config(module)
    model = QueryKontext(QueryKontextConfig.from_config(config))
    params = _with_random_lora_b(model.init(jax.random.key(1)))  # as after a few steps: B != 0
    batch, grid = max(_batches(config, manifest), key=lambda bg: bg[0]["roles"].shape[1])  # the most inputs
    trainable, frozen = st.partition(params, config.trainable)

    def loss(tr):
        return model.loss(st.combine(tr, frozen), batch, jax.random.key(2), grid)

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    assert np.isfinite(float(value)) and float(value) > 0
    # Every trainable leaf moves, except, with no single-stream block after it (the paper's config), the last
    # double-stream block's text-stream outputs: FLUX discards that stream after the last block, so its query,
    # output projection and FFN never reach the prediction (diffusers has the same dead weights).
    mmdit = model.config.mmdit
    dead = set()
    if mmdit.num_single_layers == 0:
        last = f"mmdit/transformer_blocks_{mmdit.num_layers - 1}/"
        dead = {p for p in flatten(trainable) if p.startswith(last) and any(
            part in p for part in ("attn/add_q_proj/", "attn/norm_added_q/", "attn/to_add_out/", "ff_context/"))}
        assert dead
    zero = {p for p, g in flatten(grads).items() if not np.any(np.asarray(g))}
    assert zero == dead, sorted(zero ^ dead)
    assert set(flatten(grads)) == set(flatten(trainable))
    assert not set(flatten(grads)) & set(flatten(frozen))
    # Per-task sums add up to the batch loss.
    count = float(aux.task_count.sum())
    assert count == float(batch["valid"].sum())
    np.testing.assert_allclose(float(aux.task_loss_sum.sum()) / count, float(value), rtol=1e-5)
    if module is stage3:
        assert any("lora_b" in p for p in flatten(trainable)) and not any("vlm/" in p and "lora" in p
                                                                          for p in flatten(params))


def test_fp8_switch_reaches_the_mmdit_and_keeps_the_loss(stage3_setup):
    """``config.fp8``: one switch, the MMDiT's block projections in fp8 (``test_mmdit``, ``test_fp8``); the same
    params and batch give the same loss up to fp8 rounding, and the params are unchanged in structure."""
    config, model, params, batches = stage3_setup
    fp8_model = QueryKontext(QueryKontextConfig.from_config(_config(stage3, fp8=True)))
    assert fp8_model.mmdit.fp8 and not model.mmdit.fp8
    assert jax.tree.structure(jax.eval_shape(fp8_model.init, jax.random.key(0))) == jax.tree.structure(params)
    batch, grid = batches[0]
    values = [float(jax.jit(m.loss, static_argnums=3)(params, batch, jax.random.key(2), grid)[0])
              for m in (model, fp8_model)]
    assert values[0] != values[1] and values[1] == pytest.approx(values[0], rel=0.05), values


def _paper_stream(roles_row, noisy_row, slots_row, h, w):
    """One sample's image stream and ids built straight from docs/design.md: sources, noise, references by n."""
    blocks, ids, n = [], [], 0
    for m, r in enumerate(roles_row):
        if r == rope.SOURCE:
            blocks.append(slots_row[m])
            ids.append(rope.image_position_ids(h, w, "source"))
    target_start = sum(b.shape[0] for b in blocks)
    blocks.append(noisy_row)
    ids.append(rope.image_position_ids(h, w, "target"))
    for m, r in enumerate(roles_row):
        if r == rope.REFERENCE:
            n += 1
            blocks.append(slots_row[m])
            ids.append(rope.image_position_ids(h, w, "reference", n))
    return jnp.concatenate(blocks), jnp.concatenate(ids), target_start


def test_image_stream_follows_design_for_every_task_in_one_batch(stage3_setup):
    config, model, params, _ = stage3_setup
    h = w = 2
    channels = model.config.mmdit.in_channels
    roles = jnp.asarray([[0, 0], [rope.SOURCE, 0], [rope.REFERENCE, 0], [rope.REFERENCE, rope.REFERENCE],
                         [rope.REFERENCE, rope.SOURCE]], jnp.int32)  # t2i, edit, custom, multi, subject_edit
    b = roles.shape[0]
    rng = np.random.default_rng(0)
    noisy = jnp.asarray(rng.standard_normal((b, h * w, channels)), jnp.float32)
    slots = jnp.asarray(rng.standard_normal((b, 2, h * w, channels)), jnp.float32)
    width = model.config.connector.out_features
    cond = (jnp.asarray(rng.standard_normal((b, 5, width)), jnp.float32), jnp.ones((b, 5), bool),
            jnp.asarray(rng.standard_normal((b, width)), jnp.float32))
    from qk_jax.models.connector import ConnectorOutput

    cond = ConnectorOutput(*cond)
    t = jnp.linspace(0.1, 0.9, b)
    v = jax.jit(model.velocity, static_argnums=4)(params, cond, noisy, t, (h, w), slots, roles)
    mmdit = jax.jit(model.mmdit.apply)  # one compilation per stream length, not op by op
    for i in range(b):
        stream, ids, start = _paper_stream(np.asarray(roles[i]), noisy[i], slots[i], h, w)
        full = mmdit({"params": params["mmdit"]}, stream[None], ids[None], cond.context[i:i + 1],
                                 rope.text_position_ids(5), t[i:i + 1], cond.pooled[i:i + 1])
        chex.assert_trees_all_close(v[i], full[0, start:start + h * w], atol=1e-5)


def test_trimmed_text_padding_changes_no_output(stage3_setup):
    """``pipeline.trim_text`` is exact: the loss (VLM with images in the prompt, connector, MMDiT) is the same."""
    config, model, params, batches = stage3_setup
    loss = jax.jit(lambda p, b, grid: model.loss(p, b, jax.random.key(3), grid)[0], static_argnums=2)
    checked = 0
    for batch, grid in batches:
        trimmed = pipeline.trim_text(dict(batch), 8)
        if trimmed["input_ids"].shape[1] == batch["input_ids"].shape[1]:
            continue
        chex.assert_trees_all_close(loss(params, trimmed, grid), loss(params, batch, grid), rtol=1e-5, atol=1e-6)
        checked += 1
        if checked == 2:  # two trimmed batches are enough: every shape costs a compilation
            break
    assert checked == 2


def test_empty_slots_do_not_matter_and_placement_ablation(stage3_setup):
    config, model, params, _ = stage3_setup
    h = w = 2
    c = model.config.mmdit.in_channels
    rng = np.random.default_rng(1)
    roles = jnp.asarray([[rope.SOURCE, rope.NONE]], jnp.int32)
    noisy = jnp.asarray(rng.standard_normal((1, 4, c)), jnp.float32)
    slots = jnp.asarray(rng.standard_normal((1, 2, 4, c)), jnp.float32)
    from qk_jax.models.connector import ConnectorOutput

    width = model.config.connector.out_features
    cond = ConnectorOutput(jnp.ones((1, 3, width)), jnp.ones((1, 3), bool), jnp.ones((1, width)))
    t = jnp.asarray([0.5])
    v = model.velocity(params, cond, noisy, t, (h, w), slots, roles)
    v2 = model.velocity(params, cond, noisy, t, (h, w), slots.at[:, 1].set(100.0), roles)
    chex.assert_trees_all_close(v, v2, atol=1e-6)
    # Table 8: placing the same image as a reference is a different model input than as a source.
    as_ref = QueryKontext(QueryKontextConfig.from_config(_config(stage3, placement="reference")))
    v_ref = as_ref.velocity(params, cond, noisy, t, (h, w), slots, roles)
    chex.assert_trees_all_close(v_ref, model.velocity(params, cond, noisy, t, (h, w), slots,
                                                      jnp.asarray([[rope.REFERENCE, rope.NONE]])), atol=1e-6)
    assert float(jnp.abs(v_ref - v).max()) > 1e-4


def test_real_batches_mix_tasks_and_bad_configs_raise(stage3_setup):
    config, model, params, batches = stage3_setup
    seen = {int(t) for b, _ in batches for t in np.asarray(b["task"])}
    assert len(seen) >= 3
    for batch, grid in batches[:2]:
        loss, _ = jax.jit(model.loss, static_argnums=3)(params, batch, jax.random.key(0), grid)
        assert np.isfinite(float(loss))
    bad = _config(stage3)
    bad.connector.out_features = 16
    with pytest.raises(ValueError, match="joint_attention_dim"):
        QueryKontextConfig.from_config(bad)
    with pytest.raises(ValueError, match="config.placement"):
        QueryKontextConfig.from_config(_config(stage3, placement="sideways"))


def test_paper_configs_assemble_at_full_size():
    """jax.eval_shape only: the paper's stage 1 and stage 3 models, component by component."""
    import math

    import flax.linen as nn

    def counts(module):
        model = QueryKontext(QueryKontextConfig.from_config(module.get_config()))
        return {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v))
                for k, v in nn.meta.unbox(model.abstract_params()).items()}

    queries = 128 * 3584
    vlm_lora = 322_961_408  # r = 128 on the 7 attention/MLP projections of 28 layers
    assert counts(stage1) == dict(vlm=8_292_166_656 + queries + vlm_lora, connector=5_901_760,
                                  mmdit=867_713_600, vae=34_274_208 + 49_545_475)
    s3 = counts(stage3)
    assert s3["vlm"] == 8_292_166_656 + queries and s3["mmdit"] > 9_952_604_736  # + r = 256 MMDiT LoRA
    # Per double block: 8 attention projections 2560 -> 2560 and, per stream, FFN 2560 -> 10240 -> 2560.
    lora_per_block = 8 * 256 * (2560 + 2560) + 2 * (256 * (2560 + 10240) + 256 * (10240 + 2560))
    assert s3["mmdit"] - 9_952_604_736 == 42 * lora_per_block == 990_904_320
