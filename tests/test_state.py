"""Train state: trainable/frozen split, AdamW against its formula, the non-finite guard, accumulation, EMA."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from qk_jax.training import state as st

PARAMS = {
    "vlm": {"layers_0": {"q_proj": {"kernel": jnp.ones((3, 4)), "lora_a": jnp.ones((3, 2)), "lora_b": jnp.zeros((2, 4))}},
            "kontext_queries": jnp.ones((5, 3))},
    "connector": {"linear_1": {"kernel": jnp.full((3, 3), 0.5), "bias": jnp.ones(3)}},
    "vae": {"conv_in": {"kernel": jnp.ones((3, 3, 3, 8))}},
}
TRAINABLE = (r"^vlm/.*/lora_[ab]$", r"kontext_queries$", r"^connector/")


def _optim(**kw):
    cfg = common.optim(lr=1e-2, warmup_steps=1)
    cfg.update(kw)
    return cfg


def test_partition_and_combine_round_trip():
    train, frozen = st.partition(PARAMS, TRAINABLE)
    assert set(jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key, train))) == {
        "lora_a", "lora_b", "kontext_queries", "kernel", "bias"}
    assert "connector" not in frozen and "vae" in frozen and "lora_a" not in frozen["vlm"]["layers_0"]["q_proj"]
    chex.assert_trees_all_equal(st.combine(train, frozen), PARAMS)
    with pytest.raises(ValueError, match="disjoint"):
        st.combine(train, train)


def test_optimizer_state_and_gradients_only_for_trainable_leaves():
    opt = st.make_optimizer(_optim(), total_steps=10)
    state = st.init_state(PARAMS, TRAINABLE, opt, jax.random.key(0))
    train_sizes = sum(x.size for x in jax.tree.leaves(state.trainable))
    moment_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_sizes == 2 * train_sizes  # Adam's mu and nu, nothing for the frozen VAE / VLM kernel

    def loss(trainable, frozen):
        p = st.combine(trainable, frozen)
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

    frozen0 = state.frozen
    for _ in range(3):
        grads = jax.grad(loss)(state.trainable, state.frozen)
        state = st.apply_gradients(state, grads, opt)
    chex.assert_trees_all_equal(state.frozen, frozen0)  # bit-identical
    assert int(state.step) == 3
    with pytest.raises(ValueError, match="matches no parameter"):
        st.init_state(PARAMS, ("^nothing$",), opt, jax.random.key(0))


def test_adamw_first_step_matches_the_formula():
    """Step 1 of Adam has m_hat = g, v_hat = g^2: update = -lr (g / (|g| + eps) + wd * p) for decayed leaves."""
    optim = _optim(weight_decay=0.1, grad_clip_norm=0.0)
    opt = st.make_optimizer(optim, total_steps=10)
    params = {"w": {"kernel": jnp.asarray([[1.0, -2.0], [3.0, 0.5]])}, "w2": {"bias": jnp.asarray([1.0, 2.0])}}
    grads = {"w": {"kernel": jnp.asarray([[0.1, -0.3], [2.0, 0.0]])}, "w2": {"bias": jnp.asarray([-1.0, 0.5])}}
    state = st.init_state(params, (".*",), opt, jax.random.key(0))
    # warmup_constant_schedule(0, lr, 1): step 0 uses lr 0, so take two identical steps and compare the second.
    state = st.apply_gradients(state, jax.tree.map(jnp.zeros_like, grads), opt)
    before = jax.tree.map(np.asarray, state.trainable)
    state = st.apply_gradients(state, grads, opt)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    for path, decay in (("w", True), ("w2", False)):
        leaf = "kernel" if path == "w" else "bias"
        g, p = np.asarray(grads[path][leaf], np.float64), before[path][leaf].astype(np.float64)
        m_hat = (1 - b1) * g / (1 - b1 ** 2)  # step 2 with a zero first gradient
        v_hat = (1 - b2) * g ** 2 / (1 - b2 ** 2)
        expected = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd * p if decay else 0.0))
        np.testing.assert_allclose(state.trainable[path][leaf], expected, rtol=1e-5, atol=1e-6)


def test_lr_multipliers_scale_each_groups_step():
    """optim.lr_multipliers: the first matching regex's multiplier scales that leaf's AdamW step (decay included)."""
    params = {"vlm": {"kernel": jnp.asarray([[1.0, -2.0], [3.0, 0.5]])}, "mmdit": {"kernel": jnp.ones((2, 2))},
              "connector": {"bias": jnp.asarray([1.0, 2.0])}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), params)
    plain = _optim(weight_decay=0.1, grad_clip_norm=0.0, warmup_steps=0)
    scaled = _optim(weight_decay=0.1, grad_clip_norm=0.0, warmup_steps=0,
                    lr_multipliers=((r"^vlm/", 0.1), (r"^(vlm|connector)/", 3.0)))
    steps = {}
    for name, optim in (("plain", plain), ("scaled", scaled)):
        opt = st.make_optimizer(optim, total_steps=10)
        state = st.init_state(params, (".*",), opt, jax.random.key(0))
        for _ in range(2):  # the warmup's step 0 has lr 0: the second step is the first that moves
            state = st.apply_gradients(state, grads, opt)
        steps[name] = jax.tree.map(lambda new, old: np.asarray(new - old), state.trainable, params)
    for group, multiplier in (("vlm", 0.1), ("mmdit", 1.0), ("connector", 3.0)):
        for leaf in steps["plain"][group]:
            assert np.abs(steps["plain"][group][leaf]).max() > 1e-3
            np.testing.assert_allclose(steps["scaled"][group][leaf], multiplier * steps["plain"][group][leaf],
                                       rtol=1e-3)  # float32 (p + step) - p
    assert (st.lr_multiplier("vlm/q/kernel", scaled.lr_multipliers), st.lr_multiplier("mmdit/x", ())) == (0.1, 1.0)
    # Without multipliers the chain (and so the optimizer state that checkpoints hold) is what it was before them.
    assert len(st.make_optimizer(plain, 10).init(params).inner_state) == 2
    with pytest.raises(ValueError, match="negative multiplier"):
        st.make_optimizer(_optim(lr_multipliers=(("^vlm/", -1.0),)), 10)
    # A regex that matches no trainable leaf (a typo, or a group the stage freezes) is an error, not a no-op.
    typo = st.make_optimizer(_optim(lr_multipliers=((r"^vlm/", 0.1), (r"^mmdit/norm_q/", 10.0))), 10)
    with pytest.raises(ValueError, match=r"\['\^mmdit/norm_q/'\] match no trainable parameter"):
        st.init_state(params, (".*",), typo, jax.random.key(0))
    with pytest.raises(ValueError, match="match no trainable parameter"):  # the VLM frozen: ^vlm/ is unmatched
        st.init_state(params, ("^mmdit/", "^connector/"), st.make_optimizer(scaled, 10), jax.random.key(0))


def test_weight_decay_mask_skips_biases_norms_embeddings_queries():
    params = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2, 2))}, "norm_q": {"scale": jnp.ones(2)},
              "embed_tokens": {"embedding": jnp.ones((4, 2))}, "kontext_queries": jnp.ones((3, 2)),
              "norm_out": {"kernel": jnp.ones((2, 2))}}
    mask = st.weight_decay_mask(params)
    assert mask == {"a": {"kernel": True, "bias": False}, "norm_q": {"scale": False},
                    "embed_tokens": {"embedding": False}, "kontext_queries": False, "norm_out": {"kernel": False}}


def test_non_finite_gradients_are_skipped_and_counted():
    opt = st.make_optimizer(_optim(), total_steps=10)
    state = st.init_state(PARAMS, TRAINABLE, opt, jax.random.key(0), ema_decay=0.9)
    grads = jax.tree.map(jnp.ones_like, state.trainable)
    state = st.apply_gradients(state, grads, opt)
    state = st.apply_gradients(state, grads, opt)  # lr > 0 from here
    before = state
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    state = jax.jit(st.apply_gradients, static_argnums=2)(state, bad, opt)
    chex.assert_trees_all_equal(state.trainable, before.trainable)
    assert int(st.nonfinite_count(state.opt_state)) == 1 and int(st.nonfinite_streak(state.opt_state)) == 1
    state = st.apply_gradients(state, bad, opt)
    assert int(st.nonfinite_count(state.opt_state)) == 2 and int(st.nonfinite_streak(state.opt_state)) == 2
    state = st.apply_gradients(state, grads, opt)
    assert int(st.nonfinite_count(state.opt_state)) == 2 and int(st.nonfinite_streak(state.opt_state)) == 0
    assert not np.allclose(state.trainable["connector"]["linear_1"]["bias"], before.trainable["connector"]["linear_1"]["bias"])


def test_gradient_accumulation_averages_micro_batches():
    g1 = {"w": {"kernel": jnp.asarray([[1.0, -1.0]])}}
    g2 = {"w": {"kernel": jnp.asarray([[3.0, 0.5]])}}
    params = {"w": {"kernel": jnp.zeros((1, 2))}}
    acc_opt = st.make_optimizer(_optim(grad_accum_steps=2, warmup_steps=0, weight_decay=0.0), 10)
    one_opt = st.make_optimizer(_optim(warmup_steps=0, weight_decay=0.0), 10)
    acc = st.init_state(params, (".*",), acc_opt, jax.random.key(0))
    acc = st.apply_gradients(st.apply_gradients(acc, g1, acc_opt), g2, acc_opt)
    one = st.apply_gradients(st.init_state(params, (".*",), one_opt, jax.random.key(0)),
                             jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one_opt)
    chex.assert_trees_all_close(acc.trainable, one.trainable, atol=1e-7)


def test_ema_follows_its_formula():
    opt = st.make_optimizer(_optim(warmup_steps=0), 10)
    state = st.init_state(PARAMS, TRAINABLE, opt, jax.random.key(0), ema_decay=0.9)
    grads = jax.tree.map(jnp.ones_like, state.trainable)
    new = st.apply_gradients(state, grads, opt)
    chex.assert_trees_all_close(new.ema, jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema, new.trainable))


def test_schedules_and_unknown_names():
    sched = st.learning_rate_schedule(_optim(warmup_steps=4, schedule="cosine"), total_steps=12)
    np.testing.assert_allclose([sched(0), sched(2), sched(4), sched(12)], [0.0, 5e-3, 1e-2, 0.0], atol=1e-8)
    assert float(st.learning_rate_schedule(_optim(warmup_steps=4), 12)(100)) == pytest.approx(1e-2)
    # warmup-stable-decay: 4 warmup steps, constant, linear to 0 over the last quarter of 20 steps.
    sched = st.learning_rate_schedule(_optim(warmup_steps=4, schedule="wsd", decay_fraction=0.25), total_steps=20)
    steps = np.arange(21)
    expected = 1e-2 * np.minimum(np.minimum(steps / 4, 1.0), np.clip((20 - steps) / 5, 0.0, 1.0))
    np.testing.assert_allclose([float(sched(i)) for i in steps], expected, atol=1e-8)
    with pytest.raises(ValueError, match="decay_fraction"):
        st.learning_rate_schedule(_optim(schedule="wsd", decay_fraction=0.0), 10)
    with pytest.raises(ValueError, match="optim.schedule"):
        st.learning_rate_schedule(_optim(schedule="linear"), 10)
    with pytest.raises(ValueError, match="optim.name"):
        st.make_optimizer(ml_collections.ConfigDict(dict(_optim(), name="sgd")), 10)
