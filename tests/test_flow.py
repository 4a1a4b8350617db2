"""Flow matching against diffusers' FLUX schedule and against NumPy formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qk_jax.ops import flow

# FLUX.1's shift constants, as diffusers' FluxPipeline defaults them (qk_jax reads them from config.flow).
FLUX = dict(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6144])
def test_mu_and_sigmas_match_diffusers(seq_len):
    pytest.importorskip("torch")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    chex.assert_trees_all_close(flow.calculate_shift(seq_len, **FLUX), np.float32(mu), atol=1e-6, rtol=0)
    for steps in (1, 4, 28, 50):
        sched = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        )
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)  # as FluxPipeline calls it
        chex.assert_trees_all_close(flow.euler_sigmas(steps, seq_len, **FLUX), sched.sigmas.numpy(), atol=1e-6, rtol=0)


def test_time_shift_matches_diffusers_formula():
    pytest.importorskip("torch")
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = np.linspace(0.01, 0.99, 50)
    for mu in (0.5, 0.83, 1.15):
        ref = sched.time_shift(mu, 1.0, torch.from_numpy(t)).numpy()
        chex.assert_trees_all_close(flow.time_shift(mu, jnp.asarray(t, jnp.float32)), ref.astype(np.float32), atol=1e-6)


def test_euler_sigmas_are_jittable_and_reject_zero_steps():
    sig = jax.jit(functools.partial(flow.euler_sigmas, **FLUX), static_argnums=(0, 1))(8, 1024)
    assert sig.shape == (9,) and sig.dtype == jnp.float32 and float(sig[-1]) == 0.0
    assert bool(jnp.all(jnp.diff(sig) < 0))
    with pytest.raises(ValueError, match="num_steps"):
        flow.euler_sigmas(0, 256, **FLUX)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_moments(mean, std):
    t = np.asarray(flow.sample_logit_normal(jax.random.key(0), (200_000,), mean, std), np.float64)
    assert ((t > 0) & (t < 1)).all()
    z = np.log(t) - np.log1p(-t)
    # standard error of the mean is std / sqrt(2e5) ~ 2e-3: 0.01 is 5 sigma, and a wrong formula (uniform t has
    # logit std pi/sqrt(3) = 1.81; sigmoid(z) with z ~ N(0, 2) has std 2) misses by far more.
    np.testing.assert_allclose(z.mean(), mean, atol=0.01)
    np.testing.assert_allclose(z.std(), std, atol=0.01)


def test_training_timesteps_are_shifted_logit_normal():
    key = jax.random.key(3)
    t = flow.sample_training_timesteps(key, 4096, image_seq_len=4096, mean=0.0, std=1.0, **FLUX)
    base = flow.sample_logit_normal(key, (4096,))
    chex.assert_trees_all_close(t, flow.time_shift(1.15, base), atol=1e-6)
    assert float(t.mean()) > float(base.mean()) + 0.1  # more tokens -> more noise


def test_interpolation_and_target_formulas_in_bf16():
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    t = np.array([0.25, 0.9], np.float32)
    xt = flow.interpolate(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    chex.assert_trees_all_close(xt, (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, atol=1e-6)
    chex.assert_trees_all_close(flow.velocity_target(x0, noise), noise - x0)
    xt16 = flow.interpolate(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), jnp.asarray(t))
    assert xt16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(xt16.astype(jnp.float32), xt, atol=2e-2)


def test_euler_on_a_straight_path_lands_on_the_data():
    """With the exact velocity of the straight path, Euler from pure noise reaches x0 on any schedule."""
    rng = np.random.default_rng(1)
    x0, noise = (jnp.asarray(a, jnp.float32) for a in rng.standard_normal((2, 3, 6, 4)))
    sigmas = flow.euler_sigmas(7, 256, **FLUX)
    x = flow.interpolate(x0, noise, jnp.full((3,), sigmas[0]))
    for i in range(7):
        x = flow.euler_step(x, flow.velocity_target(x0, noise), sigmas[i], sigmas[i + 1])
    chex.assert_trees_all_close(x, x0, atol=1e-5)


def test_loss_ignores_context_and_padding_tokens_and_gradients_flow():
    rng = np.random.default_rng(2)
    b, s, c = 3, 10, 4
    pred, x0, noise = (jnp.asarray(a, jnp.float32) for a in rng.standard_normal((3, b, s, c)))
    mask = np.zeros((b, s), bool)
    mask[0, 2:6] = True  # e.g. concat(src, noise): target tokens in the middle
    mask[1, :4] = True
    mask = jnp.asarray(mask)  # sample 2 has no target tokens (all padding)
    loss, per_sample = flow.flow_matching_loss(pred, x0, noise, mask)

    np_err = (np.asarray(pred) - (np.asarray(noise) - np.asarray(x0))) ** 2
    ref = [np_err[0, 2:6].mean(), np_err[1, :4].mean(), 0.0]
    chex.assert_trees_all_close(per_sample, np.array(ref, np.float32), atol=1e-6)
    chex.assert_trees_all_close(loss, np.float32((ref[0] + ref[1]) / 2), atol=1e-6)

    garbage = jnp.where(mask[..., None], pred, jnp.inf)  # non-target tokens: inf and NaN change nothing
    garbage = garbage.at[2, 0, 0].set(jnp.nan)
    chex.assert_trees_all_equal(flow.flow_matching_loss(garbage, x0, noise, mask)[0], loss)

    grad = jax.grad(lambda p: flow.flow_matching_loss(p, x0, noise, mask)[0])(pred)
    assert bool(jnp.all(jnp.where(mask[..., None], True, grad == 0)))  # no gradient into masked tokens
    assert bool(jnp.all(jnp.where(mask[..., None], grad != 0, True)))  # gradient into every target token
