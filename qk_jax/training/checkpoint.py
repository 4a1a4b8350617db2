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

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from qk_jax.training.state import TrainState


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another stage or model; the message says which and what to do."""


def _state_tree(state: TrainState) -> dict[str, Any]:
    """The savable part of a state (typed PRNG keys are saved as their raw key data)."""
    tree = dict(step=state.step, trainable=state.trainable, opt_state=state.opt_state, rng=jax.random.key_data(state.rng))
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


def _abstract(tree: Any) -> Any:
    """Restore targets with the same shapes, dtypes and shardings as ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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


# ----------------------------------------------------------------------------------------------------------
# Self-contained model checkpoints: a stage boundary, what the sampler and the exporter read
# ----------------------------------------------------------------------------------------------------------

MODEL_CONFIG_FILE = "config.json"


def save_model(directory: str | os.PathLike, config: Any, params: Any, meta: dict | None = None) -> epath.Path:
    """Write ``params`` (all components: ``vlm``, ``connector``, ``mmdit``, ``vae``) and the stage config.

    Layout: ``directory/params`` (Orbax, sharded arrays welcome) and ``directory/config.json`` (the
    ml_collections config as JSON, plus ``meta``: stage, step, what the run was). Synchronous: the directory
    is complete when this returns.
    """
    directory = epath.Path(os.path.abspath(directory))  # Orbax refuses relative paths
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory for the model")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params)
    checkpointer.wait_until_finished()
    document = dict(config=json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
                    else dict(config), meta=meta or {})
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return directory


def load_model(directory: str | os.PathLike, like: Any | None = None) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """``(config, params, meta)`` of a ``save_model`` directory.

    ``like`` (arrays or ``ShapeDtypeStruct``s with shardings) restores straight into that layout; without it
    the params come back as saved, on the default device.
    """
    directory = epath.Path(os.path.abspath(directory))  # Orbax refuses relative paths
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.exists() or not (directory / "params").exists():
        raise FileNotFoundError(
            f"{directory} is not a qk_jax model checkpoint (expected {MODEL_CONFIG_FILE} and params/ in it); pass"
            " the directory save_model wrote (a stage's final checkpoint)"
        )
    document = json.loads(config_file.read_text())
    config = ml_collections.ConfigDict(document["config"])
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(directory / "params", _abstract(like) if like is not None else None)
    return config, params, document.get("meta", {})


def check_compatible(meta: dict, *, stage: int, model: dict, what: str) -> None:
    """Refuse a checkpoint from another stage or another model config, naming both and the fix.

    ``model`` is the model description the caller expects (e.g. the dims of ``config.vlm``/``config.mmdit``);
    ``meta['model']`` is what the checkpoint was written with.
    """
    if meta.get("stage") != stage:
        raise CheckpointMismatchError(
            f"{what} is a stage {meta.get('stage')} checkpoint, but stage {stage} was expected; point"
            " config.init_from at the previous stage's workdir"
        )
    saved = meta.get("model", {})
    diff = sorted(k for k in set(saved) | set(model) if saved.get(k) != model.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {model.get(k)!r}" for k in diff[:5])
        raise CheckpointMismatchError(f"{what} was written with another model config ({details}); use the same config")
