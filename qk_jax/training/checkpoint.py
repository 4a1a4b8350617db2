"""Orbax checkpoints of a training run; knows nothing about models or training beyond ``TrainState``.

Layout of a stage's ``workdir``::

    workdir/checkpoints/<step>/state   trainable params, optimizer state, EMA, step, RNG (Orbax, sharded)
                              /data    the Grain iterator state (JSON), so data resumes where it stopped
                              /meta    what the run is: stage, config (JSON), anything the caller adds
    workdir/frozen/                    the frozen params, written once per stage (they never change)

Saves are asynchronous (Orbax writes to a temporary directory and renames it when complete, so a crash during
a save leaves the previous checkpoint intact), every ``save_every`` steps and at the end, keeping the last
``keep``. ``restore_latest`` makes "rerun the same command" resume.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from qk_jax.models.saved_model import abstract_like as _abstract
from qk_jax.training.state import TrainState


def _state_tree(state: TrainState) -> dict[str, Any]:
    """The savable part of a state (typed PRNG keys are saved as their raw key data)."""
    tree = dict(step=state.step, trainable=state.trainable, opt_state=state.opt_state, rng=jax.random.key_data(state.rng))
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


class Checkpointer:
    """Periodic, asynchronous, keep-last-K checkpoints of one stage's run."""

    def __init__(self, workdir: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.workdir = epath.Path(os.path.abspath(workdir))  # Orbax refuses relative paths
        self._manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_names=("state", "data", "meta"),
        )
        self._frozen = ocp.StandardCheckpointer()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Save at ``state.step`` if it is a save step (or ``force``); returns whether a save started."""
        step = int(jax.device_get(state.step))
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """Restore ``step`` (default: the latest) into the shapes/shardings of ``like``; frozen params come from ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(_state_tree(like))),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        tree = restored.state
        state = like.replace(
            step=tree["step"],
            trainable=tree["trainable"],
            opt_state=tree["opt_state"],
            ema=tree.get("ema"),
            rng=jax.random.wrap_key_data(tree["rng"]),
        )
        return state, restored.data, restored.meta

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    # Frozen params: once per stage.

    @property
    def frozen_dir(self) -> epath.Path:
        return self.workdir / "frozen"

    def save_frozen(self, frozen: Any) -> None:
        if not self.frozen_dir.exists():
            self._frozen.save(self.frozen_dir, frozen)
            self._frozen.wait_until_finished()

    def restore_frozen(self, like: Any) -> Any:
        return self._frozen.restore(self.frozen_dir, _abstract(like))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
