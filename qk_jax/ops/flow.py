"""Rectified flow matching: interpolation, velocity target, timestep sampling and shift, Euler schedule, loss.

Conventions (docs/design.md, FLUX / diffusers ``FlowMatchEulerDiscreteScheduler``): ``t`` (= sigma) in [0, 1] is
the noise level, ``x_t = (1 - t) x_0 + t * noise``, the model predicts the velocity ``noise - x_0``, and the
sampler integrates from ``t = 1`` (noise) to ``t = 0`` (data) with Euler steps ``x <- x + (t_next - t) v``.

Timesteps, sigmas and the interpolation weights are always float32, whatever the data dtype, so a bf16
model still sees exact timesteps (the timestep embedding's input is ``t`` in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _broadcast_t(t: jax.Array, x: jax.Array) -> jax.Array:
    """``t`` ``[B]`` (or scalar) as float32 broadcastable against ``x`` ``[B, ...]``."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 - t) x_0 + t * noise``; ``t`` is ``[B]`` or a scalar. Computed in float32, returned in x0's dtype."""
    tb = _broadcast_t(t, x0)
    return ((1.0 - tb) * x0.astype(jnp.float32) + tb * noise.astype(jnp.float32)).astype(x0.dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching regression target ``noise - x_0``."""
    return noise - x0


def sample_logit_normal(key: jax.Array, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)`` (SD3's logit-normal sampling), float32 in (0, 1)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def calculate_shift(
    image_seq_len: int | jax.Array,
    base_seq_len: int,
    max_seq_len: int,
    base_shift: float,
    max_shift: float,
) -> jax.Array:
    """FLUX's resolution-dependent ``mu``: linear in the number of image tokens (diffusers ``calculate_shift``).

    The four constants come from ``config.flow`` (their one home, configs/common.py: FLUX.1's 256, 4096, 0.5, 1.15).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return jnp.asarray(image_seq_len, jnp.float32) * m + b


def time_shift(mu: float | jax.Array, t: jax.Array, sigma: float = 1.0) -> jax.Array:
    """Exponential time shift ``e^mu / (e^mu + (1/t - 1)^sigma)`` (diffusers ``_time_shift_exponential``).

    Larger ``mu`` (more image tokens) moves mass towards ``t = 1``, i.e. more noise.
    """
    t = jnp.asarray(t, jnp.float32)
    e = jnp.exp(jnp.asarray(mu, jnp.float32))
    return e / (e + (1.0 / t - 1.0) ** sigma)


def sample_training_timesteps(
    key: jax.Array,
    batch_size: int,
    image_seq_len: int,
    *,
    mean: float,
    std: float,
    base_seq_len: int,
    max_seq_len: int,
    base_shift: float,
    max_shift: float,
) -> jax.Array:
    """Training ``t`` ``[B]``: logit-normal, then shifted by ``mu(image_seq_len)`` as at sampling time."""
    t = sample_logit_normal(key, (batch_size,), mean, std)
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return time_shift(mu, t)


def euler_sigmas(
    num_steps: int,
    image_seq_len: int,
    *,
    base_seq_len: int,
    max_seq_len: int,
    base_shift: float,
    max_shift: float,
) -> jax.Array:
    """The sampling schedule: float32 ``[num_steps + 1]`` from ~1 down to a final 0.

    Equal to ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(sigmas=..., mu=...)``
    as the FLUX pipeline calls it: ``linspace(1, 1/num_steps, num_steps)``, time-shifted by ``mu``, then 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = jnp.linspace(1.0, 1.0 / num_steps, num_steps, dtype=jnp.float32)
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return jnp.concatenate([time_shift(mu, t), jnp.zeros((1,), jnp.float32)])


def euler_step(x: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Euler step ``x + (sigma_next - sigma) * v`` in float32, returned in x's dtype."""
    dt = _broadcast_t(jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32), x)
    return (x.astype(jnp.float32) + dt * velocity.astype(jnp.float32)).astype(x.dtype)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample mean squared error over the tokens where ``mask`` is true, float32 ``[B]``.

    ``pred``/``target`` are ``[B, S, C]`` and ``mask`` ``[B, S]``. Masked-out tokens (in-context images, text,
    padding) contribute neither value nor gradient; a sample with no valid token has loss 0.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    m = mask.astype(jnp.float32)
    per_token = jnp.where(m[..., None] > 0, err, 0.0).sum(-1)  # where, not *: NaN/inf in padding stays out
    count = m.sum(-1) * pred.shape[-1]
    return per_token.sum(-1) / jnp.maximum(count, 1.0)


def flow_matching_loss(
    velocity_pred: jax.Array, x0: jax.Array, noise: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Flow-matching loss on the target latent tokens.

    Returns:
      ``(loss, per_sample)``: the mean over samples that have target tokens (a scalar), and the per-sample
      losses ``[B]`` (for per-task reporting).
    """
    per_sample = masked_mse(velocity_pred, velocity_target(x0, noise), mask)
    has_tokens = jnp.any(mask, axis=-1).astype(jnp.float32)
    loss = (per_sample * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)
    return loss, per_sample


__all__ = [
    "calculate_shift",
    "euler_sigmas",
    "euler_step",
    "flow_matching_loss",
    "interpolate",
    "masked_mse",
    "sample_logit_normal",
    "sample_training_timesteps",
    "time_shift",
    "velocity_target",
]
