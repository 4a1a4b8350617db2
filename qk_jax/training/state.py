"""Train state: params split into trainable and frozen pytrees, the optimizer, and an EMA of the trainable part.

Freezing is data (big_vision): ``config.trainable`` is a list of regexes over '/'-joined parameter paths. The
split is structural: ``partition`` returns two pruned nested dicts, the optimizer is initialised on the
trainable one only (frozen leaves get no moments) and the step differentiates with respect to it only (frozen
leaves get no gradient computation). ``combine`` puts the halves back together for the forward pass.

The optimizer is optax throughout: AdamW with a warmup + constant/cosine/warmup-stable-decay schedule, global-norm
clipping, a weight-decay mask (no decay on biases, norms, embeddings and kontext queries), per-path learning-rate
multipliers (``optim.lr_multipliers``, e.g. a pretrained VLM at a tenth of a new MMDiT's rate), optional gradient
accumulation (``optax.MultiSteps``) and a non-finite guard (``optax.apply_if_finite``) that skips an update whose
gradients hold a NaN/inf and counts it; the trainer stops with a message once more than ``optim.max_nonfinite``
updates in a row are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from qk_jax.pytree import match_any, path_str

Params = dict[str, Any]

# Leaves that are not weight matrices (AdamW's usual exclusions), as '/'-joined path regexes.
NO_WEIGHT_DECAY = (r"/bias$", r"/scale$", r"norm[^/]*/(weight|kernel)$", r"/embedding$", r"kontext_queries$")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. ``ema`` is ``None`` when ``config.ema_decay`` is unset."""

    step: jax.Array
    trainable: Params
    frozen: Params
    opt_state: optax.OptState
    ema: Params | None
    rng: jax.Array
    ema_decay: float | None = flax.struct.field(pytree_node=False, default=None)


def partition(params: Mapping[str, Any], trainable: Iterable[str]) -> tuple[Params, Params]:
    """Split ``params`` by path regexes into ``(trainable, frozen)`` nested dicts, empty branches pruned."""
    regexes = tuple(trainable)

    def split(node: Mapping[str, Any], prefix: tuple[str, ...]) -> tuple[Params, Params]:
        train, frozen = {}, {}
        for key, value in node.items():
            path = prefix + (str(key),)
            if isinstance(value, Mapping):
                t, f = split(value, path)
                if t:
                    train[key] = t
                if f:
                    frozen[key] = f
            elif match_any(path_str(path), regexes):
                train[key] = value
            else:
                frozen[key] = value
        return train, frozen

    return split(params, ())


def combine(a: Mapping[str, Any], b: Mapping[str, Any]) -> Params:
    """The union of two pruned nested dicts (``combine(*partition(p, r)) == p``); a leaf in both is an error."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = combine(out[key], value)
        else:
            raise ValueError(f"leaf {key!r} is in both trees; trainable and frozen params must be disjoint")
    return out


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``optim.lr`` over ``optim.warmup_steps``, then one of (``optim.schedule``):

    - ``constant``;
    - ``cosine``: cosine decay to 0 at ``total_steps``;
    - ``wsd`` (warmup-stable-decay): constant, then a linear decay to 0 over the last ``optim.decay_fraction``
      of ``total_steps`` (0.2 if unset). Most of the run at the full rate, an annealing phase at the end.
    """
    lr, warmup = float(optim["lr"]), max(int(optim["warmup_steps"]), 1)
    kind = optim.get("schedule", "constant")
    if kind == "constant":
        return optax.warmup_constant_schedule(0.0, lr, warmup)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
    if kind == "wsd":
        fraction = float(optim.get("decay_fraction", 0.2))
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction={fraction}: give the decaying share of the steps, in (0, 1]")
        decay_start = max(total_steps - max(int(round(fraction * total_steps)), 1), warmup)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr),
             optax.linear_schedule(lr, 0.0, max(total_steps - decay_start, 1))],
            [warmup, decay_start])
    raise ValueError(f"unknown optim.schedule {kind!r}; use 'constant', 'cosine' or 'wsd'")


def weight_decay_mask(params: Params, no_decay: Iterable[str] = NO_WEIGHT_DECAY) -> Any:
    """True for leaves AdamW should decay: matrices whose path matches none of ``no_decay``."""
    no_decay = tuple(no_decay)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ndim(x) >= 2 and not match_any(path_str(p), no_decay), params
    )


def lr_multiplier(path: str, multipliers: Iterable[tuple[str, float]]) -> float:
    """The multiplier of the first ``(regex, multiplier)`` pair whose regex ``re.search``-matches ``path``, else 1."""
    return next((float(m) for regex, m in multipliers if re.search(regex, path)), 1.0)


def scale_by_lr_multipliers(multipliers: Iterable[tuple[str, float]]) -> optax.GradientTransformation:
    """Scales each leaf's update by ``lr_multiplier`` of its path: a learning rate per parameter group.

    After AdamW, so the multiplier scales the step and its decoupled weight decay alike, as a per-group lr
    does. Its ``init`` raises when a regex matches none of the trainable leaves. By hand because optax has no
    per-leaf scale by path; ``optax.multi_transform`` would keep one AdamW per group, and changing a multiplier
    would change the optimizer state's structure.
    """
    multipliers = tuple((str(r), float(m)) for r, m in multipliers)
    for regex, multiplier in multipliers:
        if multiplier < 0:
            raise ValueError(f"optim.lr_multipliers: {regex!r} has a negative multiplier {multiplier}")

    def init(params):
        # A regex that matches no trainable leaf is a typo or a frozen group: say so, as config.trainable does.
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        unmatched = [regex for regex, _ in multipliers if not any(re.search(regex, p) for p in paths)]
        if unmatched:
            raise ValueError(f"optim.lr_multipliers: {unmatched} match no trainable parameter (e.g. {paths[:3]})")
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u * lr_multiplier(path_str(p), multipliers), updates)
        return scaled, state

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
    """The optax chain described in the module docstring, from ``config.optim``."""
    if optim.get("name", "adamw") != "adamw":
        raise ValueError(f"unknown optim.name {optim['name']!r}; only 'adamw' is implemented")
    # lr multipliers join the chain only when given: the optimizer state of a run without them keeps the
    # structure older checkpoints were saved with.
    multipliers = tuple(optim.get("lr_multipliers", ()))
    inner = optax.chain(
        optax.clip_by_global_norm(float(optim["grad_clip_norm"])) if optim.get("grad_clip_norm") else optax.identity(),
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=float(optim["b1"]),
            b2=float(optim["b2"]),
            eps=float(optim["eps"]),
            weight_decay=float(optim["weight_decay"]),
            mask=lambda params: weight_decay_mask(params, optim.get("no_weight_decay", NO_WEIGHT_DECAY)),
        ),
        *([scale_by_lr_multipliers(multipliers)] if multipliers else []),
    )
    accumulate = int(optim.get("grad_accum_steps", 1))
    if accumulate > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=accumulate)
    # The guard is outermost, so a non-finite gradient never reaches the moments or the accumulator. Its own
    # "give up after N" is disabled (int32 max): the trainer stops the run instead (``nonfinite_count``).
    return optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)


def nonfinite_count(opt_state: optax.OptState) -> jax.Array:
    """How many updates the non-finite guard has skipped since the optimizer was initialised."""
    return opt_state.total_notfinite


def nonfinite_streak(opt_state: optax.OptState) -> jax.Array:
    """How many updates in a row, up to the last, the non-finite guard has skipped (0 after a finite one)."""
    return opt_state.notfinite_count


def init_state(
    params: Mapping[str, Any],
    trainable: Iterable[str],
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    ema_decay: float | None = None,
) -> TrainState:
    """A fresh state: split params, optimizer state for the trainable half only, an EMA copy when asked."""
    train, frozen = partition(params, trainable)
    if not train:
        raise ValueError(f"config.trainable {tuple(trainable)} matches no parameter; check the regexes")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=train,
        frozen=frozen,
        opt_state=optimizer.init(train),
        ema=jax.tree.map(jnp.copy, train) if ema_decay else None,
        rng=rng,
        ema_decay=float(ema_decay) if ema_decay else None,
    )


def apply_gradients(state: TrainState, grads: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer update of the trainable half (and its EMA); skipped updates leave params and EMA as they are."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    ema = state.ema
    if ema is not None:
        # A skipped (non-finite) update gives zero updates: the EMA then decays towards unchanged params.
        decay = state.ema_decay
        ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, trainable)
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema)
