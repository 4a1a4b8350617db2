"""The jitted training step of every stage (0-3): loss and gradients of the trainable half, one optax update,
metrics on device.

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
from jax.sharding import Mesh

from qk_jax.models.query_kontext import QueryKontext
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.parallel import zero
from qk_jax.training.state import TrainState, apply_gradients, combine, nonfinite_count, nonfinite_streak


LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: TrainState,
    *args: Any,
    fold_in_step: bool = False,
    grad_fn: Callable[..., tuple[tuple[jax.Array, Any], Any]] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step of ``loss_fn(params, key, *args) -> (loss, aux)`` (``aux`` a dict or NamedTuple of on-device
    metrics, reported beside loss, grad norm, learning rate and the non-finite count). Gradients are taken with
    respect to ``state.trainable`` only: frozen leaves are constants. The step's key is split off ``state.rng``,
    or, with ``fold_in_step``, ``fold_in(state.rng, state.step)`` (stage 0, whose batches are a function of the
    step alone). ``grad_fn(trainable, frozen, key, *args) -> ((loss, aux), grads)`` replaces the plain gradient
    (the ZeRO-2 one, ``qk_jax.parallel.zero``)."""
    if fold_in_step:
        rng, key = state.rng, jax.random.fold_in(state.rng, state.step)
    else:
        rng, key = jax.random.split(state.rng)

    if grad_fn is not None:
        (loss, aux), grads = grad_fn(state.trainable, state.frozen, key, *args)
    else:
        def loss_of(trainable):
            return loss_fn(combine(trainable, state.frozen), key, *args)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
    new_state = apply_gradients(state.replace(rng=rng), grads, optimizer)
    metrics = dict(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        lr=jnp.asarray(schedule(state.step), jnp.float32),
        nonfinite=nonfinite_count(new_state.opt_state),
        nonfinite_streak=nonfinite_streak(new_state.opt_state),
        **(aux._asdict() if hasattr(aux, "_asdict") else aux),
    )
    return new_state, metrics


def make_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    static_argnums: tuple[int, ...] = (),
    state_shardings: Any = None,
    fold_in_step: bool = False,
    grad_fn: Callable[..., tuple[tuple[jax.Array, Any], Any]] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, *args)`` of ``train_step``, jitted with the state donated; ``static_argnums`` index ``args``.
    With ``state_shardings`` the new state keeps exactly that layout (ZeRO-2 masters and moments stay sharded);
    the batch's layout comes with its arrays (``qk_jax.parallel.mesh.shard_batch``)."""

    def step(state, *args):
        return train_step(loss_fn, optimizer, schedule, state, *args, fold_in_step=fold_in_step, grad_fn=grad_fn)

    kwargs: dict[str, Any] = dict(static_argnums=tuple(1 + i for i in static_argnums), donate_argnums=0)
    if state_shardings is not None:
        kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **kwargs)


def make_train_step(
    model: QueryKontext,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: Any = None,
    mesh: Mesh | None = None,
    zero_axes: tuple[str, ...] = ("data", "fsdp"),
) -> Callable[[TrainState, Mapping[str, jax.Array], tuple], tuple[TrainState, dict[str, jax.Array]]]:
    """The Query-Kontext step of stages 1-3, ``step(state, batch, image_grid)``: ``make_step`` of the model's flow
    loss, one compilation per bucket shape (the VLM's image grid is static). With a ``mesh`` whose ``zero_axes``
    hold more than one device (and ``state_shardings``), the gradient is ZeRO-2's (``qk_jax.parallel.zero``)."""

    def loss_fn(params, key, batch, image_grid):
        return model.loss(params, batch, key, image_grid)

    grad_fn = None
    if mesh is not None and mesh_lib.data_axes_size(mesh, zero_axes) > 1:
        if state_shardings is None:
            raise ValueError("the data-parallel step needs the state's shardings (state_shardings)")
        specs = jax.tree.map(lambda s: s.spec, (state_shardings.trainable, state_shardings.frozen))

        def grad_fn(trainable, frozen, key, batch, image_grid):
            def sum_loss(params, key, batch, rows):
                _, aux = model.loss(params, batch, key, image_grid, rows)
                return aux.task_loss_sum.sum(), aux.task_count.sum(), aux

            return zero.value_and_grad(sum_loss, combine, mesh, zero_axes, *specs,
                                       compute_dtype=model.config.compute_dtype)(trainable, frozen, key, batch)

    return make_step(loss_fn, optimizer, schedule, static_argnums=(1,), state_shardings=state_shardings,
                     grad_fn=grad_fn)
