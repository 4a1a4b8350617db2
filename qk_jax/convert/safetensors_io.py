"""Reading and writing Hugging Face checkpoint folders: safetensors only, one tensor at a time.

Shared by every converter (``hf_qwen_vl``, ``diffusers_mmdit``, ``diffusers_vae``); the name tables live in
those modules, the file handling here. Untrusted files stay data: a folder with only pickle-based weights
(``.bin``, ``.pt``, ``.pth``, ``.ckpt``) is refused with the command that converts it, because unpickling can
run arbitrary code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from absl import logging
from safetensors import safe_open
from safetensors.numpy import save_file

from qk_jax.data.ingest import Progress

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be converted; the message names the file or tensor and the fix."""


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; a missing, unreadable or unparsable file is a ``CheckpointError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); is the download complete?") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_config(folder: str | os.PathLike, class_name: str | None = None, hint: str = "") -> dict:
    """``config.json`` of a transformers/diffusers folder; with ``class_name``, a diffusers folder of that model
    (``_class_name``), else a ``CheckpointError`` that names what was found and ``hint``s the right folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: {_not_a_folder(Path(folder))} {hint}".rstrip())
    config = read_json(path)
    found = config.get("_class_name")
    if class_name is not None and found != class_name:
        raise CheckpointError(f"{folder}: config.json has _class_name={found!r}, expected {class_name!r}. {hint}")
    return config


def _not_a_folder(folder: Path) -> str:
    """Why ``folder`` is not a ``save_pretrained`` folder, and how to get one (nothing is downloaded here)."""
    layout = "expected a local save_pretrained() folder (config.json and *.safetensors)"
    if folder.is_file():
        return (f"a single file, but {layout}. A single-file checkpoint converts with the library's own loader, e.g."
                " diffusers.FluxTransformer2DModel.from_single_file(path).save_pretrained(DIR); then pass DIR.")
    if not folder.exists():
        looks_like_hub_id = len(folder.parts) == 2 and not str(folder).startswith((".", "/", "~"))
        if looks_like_hub_id:
            return (f"no such folder; it looks like a Hugging Face Hub id, and nothing is downloaded here: {layout}."
                    f" Fetch it first: huggingface-cli download {folder} --local-dir DIR, then pass DIR (for a"
                    " diffusers pipeline repository, its subfolder: DIR/transformer or DIR/vae).")
        return f"no such folder; {layout}."
    return f"no config.json; {layout}."


class SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint in ``folder``.

    ``weights_name`` is the file stem: ``"model"`` (transformers) or ``"diffusion_pytorch_model"`` (diffusers).
    Tensors are read one at a time as NumPy arrays (bf16 via ml_dtypes), never a whole shard at once. A 7B
    folder takes minutes to read, so ``get`` logs a progress line every 10 s (tensors and bytes so far).
    """

    def __init__(self, folder: str | os.PathLike, weights_name: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{folder}: not a directory")
        single = self.folder / f"{weights_name}.safetensors"
        index = self.folder / f"{weights_name}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map object; is it a safetensors index?")
            root = self.folder.resolve()
            self._file_of = {}
            for name, shard in weight_map.items():
                path = (self.folder / str(shard)).resolve()
                if path.parent != root:  # a shard is a file of this folder: no "../", no absolute path, no subfolder
                    raise CheckpointError(f"{index}: tensor {name!r} points at {shard!r}, outside {self.folder}; "
                                          "an index names shard files of its own folder")
                self._file_of[name] = path
        elif single.is_file():
            with safe_open(single, "np") as f:
                self._file_of = {k: single for k in f.keys()}
        else:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{folder}: found only pickle-based weights ({', '.join(pickles)}); qk_jax reads safetensors only"
                    " because unpickling can run code. Convert it once where you trust the file: "
                    "`Model.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`."
                )
            raise CheckpointError(f"{folder}: no {single.name} or {index.name}")
        self._handles: dict[Path, object] = {}
        self._progress = Progress(f"reading {self.folder}", every=2**62, unit="tensors")
        self._read, self._bytes = 0, 0

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "np")
        return self._handles[path]

    def require(self, names: list[str]) -> None:
        """Raise one ``CheckpointError`` listing every name in ``names`` that the checkpoint lacks."""
        missing = [n for n in names if n not in self._file_of]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(
                f"{self.folder}: {len(missing)} tensors the config.json implies are missing: {shown}; is the"
                " config.json the one these weights were saved with?"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor ``name``; with ``expected_shape``, a mismatch raises naming the tensor and both shapes."""
        if expected_shape is not None and self.shape(name) != tuple(expected_shape):
            raise CheckpointError(
                f"{self.folder}: tensor {name!r} has shape {self.shape(name)} but the model expects"
                f" {tuple(expected_shape)}; is the config.json the one these weights were saved with?"
            )
        tensor = self._handle(name).get_tensor(name)
        self._read, self._bytes = self._read + 1, self._bytes + tensor.nbytes
        self._progress.update(self._read, f"of {len(self._file_of):,} ({self._bytes / 1e6:,.1f} MB)")
        return tensor


def write_safetensors(
    tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    folder: str | os.PathLike,
    weights_name: str,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write tensors (a mapping or a stream of ``(name, array)``) as ``weights_name.safetensors``, sharded with
    an ``.index.json`` once they pass ``max_shard_bytes``, the layout ``from_pretrained`` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in items:
        array = np.ascontiguousarray(array)
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        path = folder / f"{weights_name}.safetensors"
        save_file(shards[0], path, metadata={"format": "pt"})
        return [path]
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        path = folder / f"{weights_name}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        logging.info("wrote %s (%d of %d, %.1f MB)", path, i, len(shards), sum(a.nbytes for a in shard.values()) / 1e6)
        paths.append(path)
        for name, array in shard.items():
            weight_map[name] = path.name
            total += array.nbytes
    with open(folder / f"{weights_name}.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return paths
