"""Orbax checkpoints of a training run; knows nothing about models or training beyond ``TrainState``.

Layout of a stage's ``workdir``::

    workdir/checkpoints/<step>/state   trainable params, optimizer state, EMA, step, RNG (Orbax, sharded)
                              /data    the Grain iterator state (JSON), so data resumes where it stopped
                              /meta    what the run is: stage, config (JSON), anything the caller adds
    workdir/frozen/                    the frozen params, written once per stage (they never change)

Saves are asynchronous (Orbax writes to a temporary directory and renames it when complete, so a crash during
a save leaves the previous checkpoint intact), every ``save_every`` steps and at the end, keeping the last
``keep``. ``restore`` makes "rerun the same command" resume, from the newest checkpoint that reads back whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from qk_jax import storage
from qk_jax.models import saved_model
from qk_jax.models.saved_model import CheckpointMismatchError
from qk_jax.models.saved_model import abstract_like as _abstract
from qk_jax.parallel import distributed
from qk_jax.pytree import leaf_shapes, shape_differences
from qk_jax.training.state import TrainState


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of a run can be read back; the message names them and what to delete."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _state_tree(state: TrainState) -> dict[str, Any]:
    """The savable part of a state (typed PRNG keys are saved as their raw key data)."""
    tree = dict(step=state.step, trainable=state.trainable, opt_state=state.opt_state, rng=jax.random.key_data(state.rng))
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


class Checkpointer:
    """Periodic, asynchronous, keep-last-K checkpoints of one stage's run."""

    def __init__(self, workdir: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.workdir = storage.path(workdir)  # Orbax refuses relative paths
        saved_model.orbax_array_handler()
        self._manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            # Handlers up front: a fresh manager (a resumed run) then reads each item's metadata before restoring.
            item_handlers=dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler()),
        )
        self._frozen = ocp.StandardCheckpointer()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: dict | Callable[[], dict], meta: dict, *, step: int | None = None,
             force: bool = False) -> bool:
        """Save at ``step`` if it is a save step (or ``force``); returns whether a save started.

        ``step`` is the step the loop counts on the host (default: ``state.step``, read from the device). Reading it
        waits for the step to finish, so a loop that calls this after every step must pass it, or the next batch is
        not drawn while the step runs. ``data_state`` may be a function: the data's resume point is then read only
        when a save starts."""
        step = int(jax.device_get(state.step)) if step is None else int(step)
        if not (force or self._manager.should_save(step)):
            return False
        if callable(data_state):
            data_state = data_state()
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
        """Restore ``step`` (default: the newest intact one) into the shapes/shardings of ``like``; frozen params
        come from ``like``.

        A checkpoint that cannot be read (a truncated or deleted file, missing metadata, a bad iterator state) is
        skipped with a warning naming it and why, and set aside as ``<step>.damaged`` so that the run saves that
        step again; the next older one is tried. A checkpoint whose arrays do not fit ``like`` (another model
        config) raises ``CheckpointMismatchError`` naming the workdir and the first differences: no older one
        would fit either.
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps or steps == [None]:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / 'checkpoints'}")
        damaged = []
        for candidate in steps:
            try:
                metadata = self._manager.item_metadata(candidate)["state"]
                saved = leaf_shapes(getattr(metadata, "tree", metadata))
            except Exception as e:  # noqa: BLE001 -- unreadable metadata: a damaged checkpoint
                damaged.append((candidate, e))
                continue
            if saved:
                self._check_fits(candidate, saved, leaf_shapes(_state_tree(like)))
            try:
                restored = self._restore(like, candidate)
            except Exception as e:  # noqa: BLE001 -- any failure to read it back: a damaged checkpoint
                damaged.append((candidate, e))
                continue
            self._set_aside(damaged)
            return restored
        details = "; ".join(f"{s}: {_first_line(e)}" for s, e in damaged)
        raise CheckpointDamagedError(f"no checkpoint in {self.workdir / 'checkpoints'} can be restored ({details}); "
                                     f"delete {self.workdir / 'checkpoints'} to train this stage from its start")

    def _restore(self, like: TrainState, step: int) -> tuple[TrainState, dict, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(_state_tree(like))),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        if restored.state is None or restored.data is None:
            raise ValueError("its state or data item is missing")
        tree = restored.state
        state = like.replace(
            step=tree["step"],
            trainable=tree["trainable"],
            opt_state=tree["opt_state"],
            ema=tree.get("ema"),
            rng=jax.random.wrap_key_data(tree["rng"]),
        )
        return state, restored.data, restored.meta

    def _check_fits(self, step: int, saved: dict[str, tuple], want: dict[str, tuple]) -> None:
        problems = shape_differences(saved, want, "now")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.workdir} was written with another model or trainable set: "
                f"{'; '.join(problems[:3])}{more}. Resume with the config that wrote it, or give another --workdir")

    def _set_aside(self, damaged: list[tuple[int, BaseException]]) -> None:
        """Rename each damaged step folder out of Orbax's sight (``<step>.damaged``), logging why; process 0 renames
        for every process (they all found the same damage)."""
        if not damaged:
            return
        for step, error in damaged:
            folder = self.workdir / "checkpoints" / str(step)
            aside = folder.parent / f"{step}.damaged"
            logging.warning("checkpoint %d in %s cannot be restored (%s); resuming from an older one and keeping "
                            "it as %s", step, folder.parent, _first_line(error), aside.name)
            if jax.process_index() == 0:
                storage.rmtree(aside)
                if folder.exists():
                    storage.move(folder, aside)
        distributed.barrier("qk_jax.checkpoint.set_aside")
        self._manager.reload()

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
