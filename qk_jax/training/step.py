"""The jitted training step: loss and gradients of the trainable half, one optax update, metrics on device.

One ``jax.jit`` per bucket shape (the VLM's image grid is a static argument), the state donated, explicit
in/out shardings when a mesh is given, no host round trip inside: metrics stay on device until the trainer
fetches them every ``log_every`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qk_jax.models.query_kontext import QueryKontext
from qk_jax.training.state import TrainState, apply_gradients, combine, nonfinite_count


def train_step(
    model: QueryKontext,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: TrainState,
    batch: Mapping[str, jax.Array],
    image_grid: tuple[tuple[int, int, int], ...],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step. Gradients are taken with respect to ``state.trainable`` only: frozen leaves are constants."""
    rng, key = jax.random.split(state.rng)

    def loss_fn(trainable):
        return model.loss(combine(trainable, state.frozen), batch, key, image_grid)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    new_state = apply_gradients(state.replace(rng=rng), grads, optimizer)
    metrics = dict(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        lr=jnp.asarray(schedule(state.step), jnp.float32),
        task_loss_sum=aux.task_loss_sum,
        task_count=aux.task_count,
        nonfinite=nonfinite_count(new_state.opt_state),
    )
    return new_state, metrics


def make_train_step(
    model: QueryKontext,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: Any = None,
) -> Callable[[TrainState, Mapping[str, jax.Array], tuple], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, batch, image_grid)``, jitted with the state donated. With ``state_shardings`` the new state
    keeps exactly that layout (ZeRO-2 moments stay sharded); the batch's layout comes with its arrays
    (``qk_jax.parallel.mesh.shard_batch``)."""

    def step(state, batch, image_grid):
        return train_step(model, optimizer, schedule, state, batch, image_grid)

    kwargs: dict[str, Any] = dict(static_argnums=2, donate_argnums=0)
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **kwargs)
