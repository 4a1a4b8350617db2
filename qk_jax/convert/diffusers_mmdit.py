"""diffusers ``FluxTransformer2DModel`` folders <-> ``qk_jax.models.mmdit.MMDiT`` params.

One table of module names (``MODULES``) serves both directions. A diffusers module ``m`` of kind

- ``LINEAR`` has tensors ``m.weight`` ``[out, in]`` <-> our ``m/kernel`` ``[in, out]`` (transposed) and
  ``m.bias`` <-> ``m/bias``;
- ``NORM`` (a q/k ``RMSNorm``) has ``m.weight`` <-> our ``m/scale``.

``{i}`` in a name is the block index. Our names differ from diffusers' only where Flax needs it:
``transformer_blocks.0`` -> ``transformer_blocks_0``, ``to_out.0`` -> ``to_out_0``, ``net.0.proj`` -> ``net_0/proj``.
The FLUX LayerNorms have no parameters (``elementwise_affine=False``) and RoPE has none, so neither appears.

``load`` reads a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model[-0000i-of-0000n].safetensors``)
one tensor at a time and returns NumPy params (so a caller can ``jax.device_put`` them straight onto a sharded
mesh); ``export`` writes one that ``FluxTransformer2DModel.from_pretrained`` loads, merging LoRA first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qk_jax.convert.safetensors_io import SafetensorsReader, read_config, write_safetensors
from qk_jax.models.lora import LORA_A, LORA_B, merge_lora
from qk_jax.models.mmdit import MMDiTConfig, abstract_params, unstack_layers
from qk_jax.pytree import get_path, leaf_paths, set_path

CLASS_NAME = "FluxTransformer2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout was checked against (tests/test_diffusers_mmdit.py)

LINEAR, NORM = "linear", "norm"

# (diffusers module, our module path, kind), by section in diffusers' order: the embedders, the guidance
# embedder (guidance_embeds only), each double-stream block, each single-stream block, the output layers.
MODULES: dict[str, tuple[tuple[str, str, str], ...]] = dict(
    embed=(
        ("x_embedder", "x_embedder", LINEAR),
        ("context_embedder", "context_embedder", LINEAR),
        ("time_text_embed.timestep_embedder.linear_1", "time_text_embed/timestep_embedder/linear_1", LINEAR),
        ("time_text_embed.timestep_embedder.linear_2", "time_text_embed/timestep_embedder/linear_2", LINEAR),
        ("time_text_embed.text_embedder.linear_1", "time_text_embed/text_embedder/linear_1", LINEAR),
        ("time_text_embed.text_embedder.linear_2", "time_text_embed/text_embedder/linear_2", LINEAR),
    ),
    output=(
        ("norm_out.linear", "norm_out/linear", LINEAR),
        ("proj_out", "proj_out", LINEAR),
    ),
    guidance=(
        ("time_text_embed.guidance_embedder.linear_1", "time_text_embed/guidance_embedder/linear_1", LINEAR),
        ("time_text_embed.guidance_embedder.linear_2", "time_text_embed/guidance_embedder/linear_2", LINEAR),
    ),
    double=(
        ("transformer_blocks.{i}.norm1.linear", "transformer_blocks_{i}/norm1/linear", LINEAR),
        ("transformer_blocks.{i}.norm1_context.linear", "transformer_blocks_{i}/norm1_context/linear", LINEAR),
        ("transformer_blocks.{i}.attn.to_q", "transformer_blocks_{i}/attn/to_q", LINEAR),
        ("transformer_blocks.{i}.attn.to_k", "transformer_blocks_{i}/attn/to_k", LINEAR),
        ("transformer_blocks.{i}.attn.to_v", "transformer_blocks_{i}/attn/to_v", LINEAR),
        ("transformer_blocks.{i}.attn.norm_q", "transformer_blocks_{i}/attn/norm_q", NORM),
        ("transformer_blocks.{i}.attn.norm_k", "transformer_blocks_{i}/attn/norm_k", NORM),
        ("transformer_blocks.{i}.attn.to_out.0", "transformer_blocks_{i}/attn/to_out_0", LINEAR),
        ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks_{i}/attn/add_q_proj", LINEAR),
        ("transformer_blocks.{i}.attn.add_k_proj", "transformer_blocks_{i}/attn/add_k_proj", LINEAR),
        ("transformer_blocks.{i}.attn.add_v_proj", "transformer_blocks_{i}/attn/add_v_proj", LINEAR),
        ("transformer_blocks.{i}.attn.norm_added_q", "transformer_blocks_{i}/attn/norm_added_q", NORM),
        ("transformer_blocks.{i}.attn.norm_added_k", "transformer_blocks_{i}/attn/norm_added_k", NORM),
        ("transformer_blocks.{i}.attn.to_add_out", "transformer_blocks_{i}/attn/to_add_out", LINEAR),
        ("transformer_blocks.{i}.ff.net.0.proj", "transformer_blocks_{i}/ff/net_0/proj", LINEAR),
        ("transformer_blocks.{i}.ff.net.2", "transformer_blocks_{i}/ff/net_2", LINEAR),
        ("transformer_blocks.{i}.ff_context.net.0.proj", "transformer_blocks_{i}/ff_context/net_0/proj", LINEAR),
        ("transformer_blocks.{i}.ff_context.net.2", "transformer_blocks_{i}/ff_context/net_2", LINEAR),
    ),
    single=(
        ("single_transformer_blocks.{i}.norm.linear", "single_transformer_blocks_{i}/norm/linear", LINEAR),
        ("single_transformer_blocks.{i}.proj_mlp", "single_transformer_blocks_{i}/proj_mlp", LINEAR),
        ("single_transformer_blocks.{i}.proj_out", "single_transformer_blocks_{i}/proj_out", LINEAR),
        ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks_{i}/attn/to_q", LINEAR),
        ("single_transformer_blocks.{i}.attn.to_k", "single_transformer_blocks_{i}/attn/to_k", LINEAR),
        ("single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks_{i}/attn/to_v", LINEAR),
        ("single_transformer_blocks.{i}.attn.norm_q", "single_transformer_blocks_{i}/attn/norm_q", NORM),
        ("single_transformer_blocks.{i}.attn.norm_k", "single_transformer_blocks_{i}/attn/norm_k", NORM),
    ),
)

# Tensors of a module of each kind: (diffusers suffix, our leaf, transposed).
_TENSORS = {LINEAR: (("weight", "kernel", True), ("bias", "bias", False)), NORM: (("weight", "scale", False),)}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: its diffusers name, our '/'-joined param path, and whether it is transposed."""

    diffusers: str
    ours: str
    transposed: bool


def tensor_table(config: MMDiTConfig) -> list[Tensor]:
    """Every tensor of a ``FluxTransformer2DModel`` with this config, in diffusers' module order."""
    blocks = lambda section, n: [(d.format(i=i), o.format(i=i), k) for i in range(n) for d, o, k in MODULES[section]]
    modules = [*MODULES["embed"], *(MODULES["guidance"] if config.guidance_embeds else ()),
               *blocks("double", config.num_layers), *blocks("single", config.num_single_layers), *MODULES["output"]]
    return [Tensor(f"{d}.{suffix}", f"{o}/{leaf}", transposed)
            for d, o, kind in modules for suffix, leaf, transposed in _TENSORS[kind]]


def _our_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Our param paths -> shapes, from ``jax.eval_shape`` (nothing is allocated)."""
    abstract = nn.meta.unbox(abstract_params(config))
    return dict(zip(leaf_paths(abstract), (tuple(x.shape) for x in jax.tree.leaves(abstract))))



# ----------------------------------------------------------------------------------------------------------
# diffusers -> qk_jax
# ----------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> MMDiTConfig:
    """The ``MMDiTConfig`` of a diffusers folder; raises ``CheckpointError`` for another model's folder."""
    raw = read_config(path, CLASS_NAME, "Point at the FLUX transformer folder (the 'transformer' subfolder of a"
                      " FLUX pipeline), not a pipeline, VAE or text encoder.")
    fields = {f.name for f in dataclasses.fields(MMDiTConfig)}
    ignored = sorted(k for k in raw if k not in fields and not k.startswith("_"))
    if ignored:
        logging.warning("%s: config.json keys not used by qk_jax's MMDiT: %s", path, ignored)
    return MMDiTConfig.from_config({k: v for k, v in raw.items() if k in fields})


def load(path: str | os.PathLike, dtype: Any = jnp.float32, place: Callable[[str, np.ndarray], Any] | None = None
         ) -> tuple[MMDiTConfig, dict[str, Any]]:
    """Read a diffusers ``FluxTransformer2DModel`` folder.

    Args:
      path: a ``save_pretrained`` folder (safetensors only; ``SafetensorsReader`` refuses pickles).
      dtype: dtype of the returned params (``jnp.float32``, or ``jnp.bfloat16`` to halve host memory).
      place: ``(path, array) -> array``, called on each leaf as soon as it is converted (``path`` its
        ``/``-joined leaf path), e.g. onto its devices' shards: the host then holds one tensor of the import at a
        time, not the whole model (``stages.initial_params``). Default: the host array is kept.

    Returns:
      ``(config, params)``: params a nested dict of NumPy arrays, for ``MMDiT(config).apply({'params': params},
      ...)``. Every tensor the config implies must be present with its shape (else ``CheckpointError`` naming
      it); tensors the model does not use are logged with ``absl.logging.warning``.
    """
    config = load_config(path)
    shapes = _our_shapes(config)
    reader = SafetensorsReader(path, WEIGHTS_NAME)
    table = tensor_table(config)
    reader.require([t.diffusers for t in table])

    np_dtype = np.dtype(dtype)
    params: dict[str, Any] = {}
    for t in table:
        shape = shapes[t.ours]
        array = reader.get(t.diffusers, shape[::-1] if t.transposed else shape)
        if t.transposed:
            array = array.T
        array = np.ascontiguousarray(array.astype(np_dtype, copy=False))
        set_path(params, t.ours, array if place is None else place(t.ours, array))
        del array
    unused = sorted(set(reader.keys()) - {t.diffusers for t in table})
    if unused:
        logging.warning("%s: %d tensors not used by the MMDiT: %s", path, len(unused), unused)
    return config, params


# ----------------------------------------------------------------------------------------------------------
# qk_jax -> diffusers
# ----------------------------------------------------------------------------------------------------------


def _has_lora(params: Mapping) -> bool:
    return any(p.rsplit("/", 1)[-1] in (LORA_A, LORA_B) for p in leaf_paths(params))


def export(
    config: MMDiTConfig,
    params: Mapping[str, Any],
    path: str | os.PathLike,
    dtype: Any = None,
    lora_alpha: float | None = None,
    max_shard_bytes: int = 5 * 2**30,
    allow_pos_embed: bool = False,
) -> Path:
    """Write ``params`` as a folder that ``FluxTransformer2DModel.from_pretrained(path)`` loads.

    Args:
      config: the model's config (``to_diffusers_config`` must accept it).
      params: the MMDiT params (plain or logically boxed; ``{'params': ...}`` is unwrapped).
      path: output folder (created).
      dtype: dtype of the written tensors (default: the params' own).
      lora_alpha: when the params hold LoRA adapters they are merged with this alpha (``config.mmdit.lora.alpha``);
        without it, adapters raise ``ValueError``.
      max_shard_bytes: shard size of the safetensors files.
      allow_pos_embed: write a ``pos_embed='sincos'`` model too; the folder then lacks that embedding and the
        caller must tell its users to add it (``export.export_model`` does, in ``kontext_config.json``).

    Returns:
      The folder.
    """
    diffusers_config = config.to_diffusers_config(allow_pos_embed=allow_pos_embed)
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    params = unstack_layers(params, config)  # a scan_layers model's stacked blocks, one per layer
    if _has_lora(params):
        if lora_alpha is None:
            raise ValueError("the params hold LoRA adapters (lora_a/lora_b); pass lora_alpha= (the config's"
                             " lora.alpha) so export merges them, or merge them first with"
                             " qk_jax.models.lora.merge_lora")
        params = merge_lora(params, lora_alpha)

    shapes = _our_shapes(config)
    table = tensor_table(config)
    have = set(leaf_paths(params))
    missing = sorted(set(shapes) - have)
    unexpected = sorted(have - set(shapes))
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}")

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for t in table:
            array = np.asarray(jax.device_get(get_path(params, t.ours)))
            if array.shape != shapes[t.ours]:
                raise ValueError(f"param {t.ours} has shape {array.shape} but the config implies {shapes[t.ours]}")
            if t.transposed:
                array = array.T
            yield t.diffusers, np.ascontiguousarray(array if dtype is None else array.astype(np.dtype(dtype)))

    path = Path(path)
    write_safetensors(stream(), path, WEIGHTS_NAME, max_shard_bytes)
    with open(path / "config.json", "w") as f:
        json.dump({"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **diffusers_config}, f, indent=2)
    return path


__all__ = ["MODULES", "tensor_table", "load_config", "load", "export", "CLASS_NAME", "WEIGHTS_NAME"]
