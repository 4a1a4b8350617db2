"""diffusers ``AutoencoderKL`` folders <-> ``qk_jax.models.vae`` params (the FLUX.1 VAE and SD-style VAEs).

The name mapping is one table, ``name_table(config)``, built from the model's own parameter tree and read in both
directions (``load``: diffusers -> ours, ``export``: ours -> diffusers). A row pairs a leaf of ours with a
diffusers tensor:

- module path: ``/`` <-> ``.`` and a trailing ``_N`` <-> ``.N`` (``encoder/down_blocks_0/resnets_1/norm1`` <->
  ``encoder.down_blocks.0.resnets.1.norm1``, ``attentions_0/to_out_0`` <-> ``attentions.0.to_out.0``);
- leaf, by ``LEAVES``: a 4-d ``kernel`` is a conv weight (ours HWIO, diffusers OIHW), a 2-d ``kernel`` a linear
  weight (transposed; diffusers stores the mid-block attention's ``to_q``/``to_k``/``to_v``/``to_out.0`` as Linear
  layers), ``scale`` a GroupNorm weight, ``bias`` a bias.

``load`` reads ``config.json`` (``_class_name`` must be ``AutoencoderKL``) and the safetensors one tensor at a time,
checks that every tensor the config implies is there with the right shape (errors name the tensor), and logs the
tensors it did not use. ``export`` writes a folder that ``AutoencoderKL.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, read_config, write_safetensors
from qk_jax.models.vae import AutoencoderKL, VAEConfig
from qk_jax.pytree import get_path, path_str, set_path

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"
CLASS_NAME = "AutoencoderKL"
_DIFFUSERS_VERSION_FALLBACK = "0.32.0"  # the version written into config.json when diffusers is not installed

# (our leaf name, rank) -> (diffusers tensor name, layout). Layouts below.
LEAVES: dict[tuple[str, int], tuple[str, str]] = {
    ("kernel", 4): ("weight", "conv"),  # ours [kh, kw, in, out] (HWIO) <-> diffusers [out, in, kh, kw] (OIHW)
    ("kernel", 2): ("weight", "linear"),  # ours [in, out] <-> diffusers [out, in]
    ("scale", 1): ("weight", "same"),  # GroupNorm
    ("bias", 1): ("bias", "same"),
}

# layout -> (ours -> diffusers, diffusers -> ours) axis permutations (None: unchanged).
_PERMUTATIONS: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {
    "conv": ((3, 2, 0, 1), (2, 3, 1, 0)),
    "linear": ((1, 0), (1, 0)),
    "same": (None, None),
}


class Row(NamedTuple):
    """One entry of the name table."""

    ours: str  # '/'-joined path in our params, e.g. 'encoder/conv_in/kernel'
    theirs: str  # diffusers state-dict name, e.g. 'encoder.conv_in.weight'
    shape: tuple[int, ...]  # our shape
    layout: str  # key of _PERMUTATIONS


def _their_module(module_path: str) -> str:
    """``encoder/down_blocks_0/resnets_1/norm1`` -> ``encoder.down_blocks.0.resnets.1.norm1``."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in module_path.split("/"))


def _permute(array: np.ndarray, layout: str, to_diffusers: bool) -> np.ndarray:
    perm = _PERMUTATIONS[layout][0 if to_diffusers else 1]
    return array if perm is None else np.transpose(array, perm)


def _their_shape(row: Row) -> tuple[int, ...]:
    perm = _PERMUTATIONS[row.layout][0]
    return row.shape if perm is None else tuple(row.shape[i] for i in perm)


def abstract_params(config: VAEConfig) -> dict[str, Any]:
    """Our params tree for ``config`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    variables = jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)
    return nn.meta.unbox(variables)["params"]


def name_table(config: VAEConfig) -> list[Row]:
    """Every parameter of ``AutoencoderKL(config)`` with its diffusers name, shape and layout change."""
    rows = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
        ours = path_str(key_path)
        module, _, name = ours.rpartition("/")
        their_leaf, layout = LEAVES[(name, len(leaf.shape))]
        rows.append(Row(ours, f"{_their_module(module)}.{their_leaf}", tuple(leaf.shape), layout))
    return rows



def config_from_folder(path: str | os.PathLike) -> VAEConfig:
    """The ``VAEConfig`` of a diffusers ``AutoencoderKL`` folder (its config.json)."""
    raw = read_config(path, CLASS_NAME, "Point at the VAE's own folder (in a FLUX or SD repository that is the"
                      " 'vae' subfolder).")
    try:
        return VAEConfig.from_config(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None


def load(path: str | os.PathLike, dtype: Any = jnp.float32, place: Callable[[str, np.ndarray], Any] | None = None
         ) -> tuple[VAEConfig, dict[str, Any]]:
    """A diffusers ``AutoencoderKL`` folder -> ``(VAEConfig, params)`` (plain nested dicts of ``dtype`` arrays).

    Raises CheckpointError for a folder of another model type, a missing tensor or a tensor of the wrong shape
    (naming it). Tensors in the file that the config does not use are logged as a warning.

    ``place(path, array)``: as in ``diffusers_mmdit.load`` (each leaf onto its devices as it is read); default:
    each leaf a ``jnp`` array on the default device.
    """
    config = config_from_folder(path)
    reader = SafetensorsReader(path, WEIGHTS_NAME)
    table = name_table(config)
    reader.require([row.theirs for row in table])
    params: dict[str, Any] = {}
    for row in table:
        array = reader.get(row.theirs, _their_shape(row))
        array = np.ascontiguousarray(_permute(array, row.layout, to_diffusers=False), np.dtype(jnp.dtype(dtype)))
        set_path(params, row.ours, jnp.asarray(array) if place is None else place(row.ours, array))
        del array
    unused = sorted(set(reader.keys()) - {row.theirs for row in table})
    if unused:
        logger.warning("%s: %d tensors not used by the VAE: %s", path, len(unused), ", ".join(unused))
    return config, params


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return _DIFFUSERS_VERSION_FALLBACK


def export(config: VAEConfig, params: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``params`` as a diffusers ``AutoencoderKL`` folder (config.json + safetensors); returns the folder.

    ``params`` is our VAE params tree (boxed or not); every leaf the config implies must be there with its shape,
    and nothing else. Tensors keep their dtype.
    """
    params = nn.meta.unbox(params)
    table = name_table(config)
    ours = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    expected = {row.ours for row in table}
    if ours != expected:
        missing, extra = sorted(expected - ours), sorted(ours - expected)
        raise ValueError(
            f"VAE params do not match the config: missing {missing[:8]}, unexpected {extra[:8]}; "
            "export the params of AutoencoderKL(config)"
        )
    for row in table:
        shape = tuple(get_path(params, row.ours).shape)
        if shape != row.shape:
            raise ValueError(f"VAE param {row.ours!r} has shape {shape} but the config implies {row.shape}")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for row in table:
            yield row.theirs, _permute(np.asarray(get_path(params, row.ours)), row.layout, to_diffusers=True)

    folder = Path(path)
    write_safetensors(tensors(), folder, WEIGHTS_NAME)
    raw = {"_class_name": CLASS_NAME, "_diffusers_version": _diffusers_version(), **config.to_diffusers_config()}
    with open(folder / "config.json", "w") as f:
        json.dump(raw, f, indent=2)
    return folder


__all__ = ["Row", "LEAVES", "name_table", "abstract_params", "config_from_folder", "load", "export"]
