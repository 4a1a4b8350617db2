"""The exported-model format: one self-contained directory per trained model, what a stage leaves, the next stage
starts from, the sampler samples and the exporter converts. It knows nothing about training or conversion, so
sampling needs neither.

Layout::

    <directory>/params        all components (``vlm``, ``connector``, ``mmdit``, ``vae``; Orbax, sharded arrays welcome)
    <directory>/config.json   {"config": the stage's ml_collections config as JSON, "meta": {stage, step, ema, ...}}

A directory is complete or absent: ``save_model`` writes ``<directory>.incomplete`` and renames it. In a bucket
(``gs://``: no rename of a folder in one step) it writes ``directory`` in place with ``config.json`` last, and a
folder without ``config.json`` is not a model (``load_model``, the trainer's check for a finished stage).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from qk_jax import storage
from qk_jax.parallel import distributed


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another stage or model; the message says which and what to do."""


class NotAModelError(FileNotFoundError):
    """A directory given as a model (``--checkpoint``, ``config.init_from``'s final/) that holds none."""


def abstract_like(tree: Any) -> Any:
    """Restore targets with the same shapes, dtypes and shardings as ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


MODEL_CONFIG_FILE = "config.json"


def orbax_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer, with Orbax's jax.Array handler set for the backend first (``orbax_array_handler``)."""
    orbax_array_handler()
    return ocp.StandardCheckpointer()


@functools.cache  # the backend is fixed for the process: register once
def orbax_array_handler() -> None:
    """On CPU devices, registers Orbax's jax.Array handler with replica-parallel saving off (Orbax's own default on
    GPU). Replica-parallel saving has each replica of a replicated array write a slice of it, each slice cut by a
    program compiled per array shape and device; CPU devices share the host's memory, so there is nothing to
    parallelise, and the compilations cost: ~200 of them (~8 s) on a tiny model's first save on 8 CPU devices.
    Elsewhere (TPU) Orbax's default stands."""
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def save_model(directory: str | os.PathLike, config: Any, params: Any, meta: dict | None = None,
               files: Mapping[str, str | os.PathLike] | None = None) -> epath.Path:
    """Write ``params`` (all components: ``vlm``, ``connector``, ``mmdit``, ``vae``) and the stage config.

    Layout: ``directory/params`` (Orbax, sharded arrays welcome) and ``directory/config.json`` (the
    ml_collections config as JSON, plus ``meta``: stage, step, what the run was); ``files`` ``{name: source}``
    are copied in as ``directory/name`` (the Qwen tokenizer, ``processors.model_files``). Synchronous: the
    directory is complete when this returns.
    """
    directory = storage.path(directory)  # Orbax refuses relative paths
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory for the model")
    # Written whole beside it, then renamed: a crash leaves no half model under ``directory`` (an earlier crash's
    # leftover is cleared first). A bucket: in place, the config (the marker of a whole model) last.
    # Multi-process: every process writes its shards of ``params`` (Orbax); process 0 alone clears, names and
    # renames, between barriers, so no process reads a half-written folder.
    remote, lead = storage.is_remote(directory), jax.process_index() == 0
    partial = directory if remote else incomplete_path(directory)
    if lead and partial.exists():
        storage.rmtree(partial)
    distributed.barrier("qk_jax.save_model.cleared")
    checkpointer = orbax_checkpointer()
    checkpointer.save(partial / "params", params)
    checkpointer.wait_until_finished()
    if lead:
        for name, source in (files or {}).items():
            storage.copy_file(source, partial / name)
        _write_config(partial / MODEL_CONFIG_FILE, config, meta)
        if not remote:
            if directory.exists():
                directory.rmdir()  # empty (checked above)
            os.replace(partial, directory)
    distributed.barrier("qk_jax.save_model.renamed")
    return directory


def _write_config(path: epath.Path, config: Any, meta: dict | None) -> None:
    document = dict(config=json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
                    else dict(config), meta=meta or {})
    path.write_text(json.dumps(document, indent=2, sort_keys=True))


def incomplete_path(directory: str | os.PathLike) -> epath.Path:
    """Where ``save_model`` writes ``directory`` before renaming it into place."""
    directory = storage.path(directory)
    return directory.parent / f"{directory.name}.incomplete"


def load_model(directory: str | os.PathLike, like: Any | None = None,
               sharding_for: Callable[[tuple[str, ...], Any], jax.sharding.Sharding] | None = None
               ) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """``(config, params, meta)`` of a ``save_model`` directory.

    ``like`` (arrays or ``ShapeDtypeStruct``s with shardings) restores straight into that layout;
    ``sharding_for(path, leaf)`` (path: the leaf's dict keys; leaf: its saved shape and dtype) gives each array's
    sharding (each process reads only its shards); without either every array comes back whole on this
    process's first device (``on_one_device``), whatever saved it.
    """
    directory = storage.path(directory)  # Orbax refuses relative paths
    config_file = directory / MODEL_CONFIG_FILE
    if not config_file.exists() or not (directory / "params").exists():
        raise NotAModelError(
            f"{directory} is not a qk_jax model checkpoint (expected {MODEL_CONFIG_FILE} and params/ in it); pass"
            " the directory save_model wrote (a stage's final checkpoint)"
        )
    try:
        document = json.loads(config_file.read_text())
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e}); the model directory is damaged") from None
    config = ml_collections.ConfigDict(document["config"])
    checkpointer = orbax_checkpointer()
    if like is not None:
        target = abstract_like(like)
    else:
        target = on_one_device(checkpointer.metadata(directory / "params"), sharding_for)
    params = checkpointer.restore(directory / "params", target)
    return config, params, document.get("meta", {})


def on_one_device(metadata: Any, sharding_for: Callable[[tuple[str, ...], Any], jax.sharding.Sharding] | None = None
                  ) -> Any:
    """Restore targets that put every saved array whole on this process's first device, whatever devices saved it
    (a model trained on 8 GPUs or 2 hosts samples on one), or where ``sharding_for(path, leaf)`` says."""
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(path, leaf):
        sharding = device if sharding_for is None else sharding_for(tuple(str(k.key) for k in path), leaf)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(target, tree)
