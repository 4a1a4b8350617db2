"""Qwen2.5-VL checkpoints: transformers safetensors folder <-> ``qk_jax.models.qwen_vl`` params.

``load(folder)`` reads a ``Qwen2_5_VLForConditionalGeneration`` folder (``save_pretrained`` layout, one file or
sharded with ``model.safetensors.index.json``) one tensor at a time; no torch model is built. ``export`` writes
the folder back (LoRA merged first, the kontext queries left out: they are not part of Qwen2.5-VL), which
``Qwen2_5_VLForConditionalGeneration.from_pretrained`` loads.

Tensor names: transformers v5 holds the modules as ``model.visual.*`` / ``model.language_model.*`` but saves
(and ships, e.g. Qwen/Qwen2.5-VL-7B-Instruct) the original names ``visual.*`` / ``model.*``. ``TABLE`` uses the
saved names; ``load`` also accepts the in-memory v5 names (``V5_PREFIXES``).

Weight layouts: a torch ``Linear`` weight ``[out, in]`` is our ``kernel`` ``[in, out]``; a norm ``weight`` is our
``scale``; the embedding ``weight`` our ``embedding``; the ViT's Conv3d ``[hidden, C, T, p, p]`` (kernel = stride)
is our ``patch_embed/proj/kernel`` ``[C*T*p*p, hidden]``, the transpose of its reshape (the processor flattens a
patch in the same ``(C, T, p, p)`` order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qk_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, read_config, write_safetensors
from qk_jax.models.lora import LORA_A, merge_lora
from qk_jax.models.qwen_vl import QwenVLConfig, abstract_params
from qk_jax.pytree import flatten, unflatten

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
QUERIES = "kontext_queries"

LINEAR, LINEAR_NO_BIAS, NORM, EMBED, PATCH = "linear", "linear_no_bias", "norm", "embed", "patch"

# (our module path, transformers module name as saved, kind). ``{i}``: ViT block, ``{j}``: LLM layer.
TABLE = (
    ("visual/patch_embed/proj", "visual.patch_embed.proj", PATCH),
    ("visual/blocks_{i}/norm1", "visual.blocks.{i}.norm1", NORM),
    ("visual/blocks_{i}/attn/qkv", "visual.blocks.{i}.attn.qkv", LINEAR),
    ("visual/blocks_{i}/attn/proj", "visual.blocks.{i}.attn.proj", LINEAR),
    ("visual/blocks_{i}/norm2", "visual.blocks.{i}.norm2", NORM),
    ("visual/blocks_{i}/mlp/gate_proj", "visual.blocks.{i}.mlp.gate_proj", LINEAR),
    ("visual/blocks_{i}/mlp/up_proj", "visual.blocks.{i}.mlp.up_proj", LINEAR),
    ("visual/blocks_{i}/mlp/down_proj", "visual.blocks.{i}.mlp.down_proj", LINEAR),
    ("visual/merger/ln_q", "visual.merger.ln_q", NORM),
    ("visual/merger/mlp_0", "visual.merger.mlp.0", LINEAR),
    ("visual/merger/mlp_2", "visual.merger.mlp.2", LINEAR),
    ("language_model/embed_tokens", "model.embed_tokens", EMBED),
    ("language_model/layers_{j}/input_layernorm", "model.layers.{j}.input_layernorm", NORM),
    ("language_model/layers_{j}/self_attn/q_proj", "model.layers.{j}.self_attn.q_proj", LINEAR),
    ("language_model/layers_{j}/self_attn/k_proj", "model.layers.{j}.self_attn.k_proj", LINEAR),
    ("language_model/layers_{j}/self_attn/v_proj", "model.layers.{j}.self_attn.v_proj", LINEAR),
    ("language_model/layers_{j}/self_attn/o_proj", "model.layers.{j}.self_attn.o_proj", LINEAR_NO_BIAS),
    ("language_model/layers_{j}/post_attention_layernorm", "model.layers.{j}.post_attention_layernorm", NORM),
    ("language_model/layers_{j}/mlp/gate_proj", "model.layers.{j}.mlp.gate_proj", LINEAR_NO_BIAS),
    ("language_model/layers_{j}/mlp/up_proj", "model.layers.{j}.mlp.up_proj", LINEAR_NO_BIAS),
    ("language_model/layers_{j}/mlp/down_proj", "model.layers.{j}.mlp.down_proj", LINEAR_NO_BIAS),
    ("language_model/norm", "model.norm", NORM),
    ("lm_head", "lm_head", LINEAR_NO_BIAS),  # absent when the embeddings are tied
)
# transformers v5 in-memory prefixes -> the saved ones.
V5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: our leaf path, its transformers name, its kind and our shape."""

    path: str
    hf_name: str
    kind: str
    leaf: str  # 'kernel' | 'bias' | 'scale' | 'embedding'


def entries(config: QwenVLConfig) -> list[Entry]:
    """``TABLE`` expanded over the config's blocks and layers, one row per tensor."""
    out = []
    for ours, theirs, kind in TABLE:
        if ours == "lm_head" and config.text.tie_word_embeddings:
            continue
        n = config.vision.depth if "{i}" in ours else config.text.num_hidden_layers if "{j}" in ours else 1
        for k in range(n):
            o, t = ours.format(i=k, j=k), theirs.format(i=k, j=k)
            if kind in (LINEAR, LINEAR_NO_BIAS, PATCH):
                out.append(Entry(f"{o}/kernel", f"{t}.weight", kind, "kernel"))
                if kind == LINEAR:
                    out.append(Entry(f"{o}/bias", f"{t}.bias", kind, "bias"))
            else:
                out.append(Entry(f"{o}/{'scale' if kind == NORM else 'embedding'}", f"{t}.weight", kind,
                                 "scale" if kind == NORM else "embedding"))
    return out


def to_ours(entry: Entry, tensor: np.ndarray) -> np.ndarray:
    """A transformers tensor in our layout."""
    if entry.leaf == "kernel":
        return tensor.reshape(tensor.shape[0], -1).T if entry.kind == PATCH else tensor.T
    return tensor


def to_theirs(entry: Entry, array: np.ndarray, config: QwenVLConfig) -> np.ndarray:
    """One of our arrays in transformers' layout."""
    if entry.leaf == "kernel":
        if entry.kind == PATCH:
            v = config.vision
            return array.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        return array.T
    return array


def _hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's config as transformers' normalised ``Qwen2_5_VLConfig.to_dict()``; refuses other models."""
    raw = read_config(folder)
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{folder}: config.json has model_type={model_type!r}, not {MODEL_TYPE!r}; this converter reads"
            f" Qwen2.5-VL ({ARCHITECTURE}) folders only (Qwen2-VL's ViT differs: LayerNorm, no windows)")
    from transformers import Qwen2_5_VLConfig  # configuration only: no torch needed

    return Qwen2_5_VLConfig.from_pretrained(folder).to_dict()


def _resolve(reader: SafetensorsReader, name: str) -> str:
    """``name`` as stored: the saved layout or transformers v5's in-memory one."""
    if name in reader:
        return name
    for v5, saved in V5_PREFIXES:
        if name.startswith(saved) and v5 + name[len(saved):] in reader:
            return v5 + name[len(saved):]
    return name  # reader.get raises naming it


def load(folder: str | os.PathLike, dtype: Any = jnp.float32, place: Callable[[str, np.ndarray], Any] | None = None,
         **overrides: Any) -> tuple[QwenVLConfig, dict]:
    """Read a transformers Qwen2.5-VL folder.

    Args:
      folder: a ``save_pretrained`` folder (``config.json`` + ``model.safetensors`` or a sharded index).
      dtype: dtype of the returned params (and the config's ``param_dtype``).
      place: ``(path, array) -> array``, called on each leaf as soon as it is converted (``path`` its
        ``/``-joined leaf path), e.g. onto its devices' shards: the host then holds one tensor of the import at a
        time, not the whole model (``stages.initial_params``). Default: the host array is kept.
      **overrides: ``QwenVLConfig`` fields that transformers' config has no word for (``num_queries``,
        ``query_attention``, ``lora``, ``dtype`` of compute).

    Returns:
      ``(config, params)``: params is the unboxed tree of host NumPy arrays that ``QwenVL(config)`` takes as
      ``{'params': params}``, without ``kontext_queries`` (not in the checkpoint: take them from ``init``, or a
      Query-Kontext checkpoint) and without LoRA leaves.
    """
    config = QwenVLConfig.from_hf_config(_hf_config(folder), param_dtype=dtype, **overrides)
    reader = SafetensorsReader(folder, "model")
    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = _shapes(config)
    flat, used = {}, set()
    for entry in entries(config):
        name = _resolve(reader, entry.hf_name)
        used.add(name)
        tensor = reader.get(name)
        array = np.ascontiguousarray(to_ours(entry, tensor), np_dtype)
        if array.shape != shapes[entry.path]:
            raise CheckpointError(f"{folder}: tensor {name!r} has shape {tensor.shape}, which gives {entry.path}"
                                  f" {array.shape} but config.json implies {shapes[entry.path]}")
        flat[entry.path] = array if place is None else place(entry.path, array)
        del tensor, array
    ignorable = {"lm_head.weight"} if config.text.tie_word_embeddings else set()
    unexpected = sorted(set(reader.keys()) - used - ignorable)
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} tensors that Qwen2.5-VL does not have, e.g."
                              f" {unexpected[:5]}; is this a Qwen2.5-VL checkpoint with its own config.json?")
    return config, unflatten(flat)


def _shapes(config: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    """Our shape of every leaf of the plain model (no queries, no LoRA), by ``jax.eval_shape``."""
    plain = dataclasses.replace(config, num_queries=0, lora=type(config.lora)())
    return {p: tuple(x.shape) for p, x in flatten(nn.meta.unbox(abstract_params(plain))["params"]).items()}


def _stream(config: QwenVLConfig, flat: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    for entry in entries(config):
        yield entry.hf_name, np.asarray(to_theirs(entry, np.asarray(flat[entry.path]), config))


def export(config: QwenVLConfig, params: Mapping[str, Any], folder: str | os.PathLike,
           max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``params`` (boxed or not, ``{'params': ...}`` or its inside) as a transformers folder.

    LoRA adapters are merged with ``config.lora.alpha`` first; ``kontext_queries`` are not written. Tensors keep
    their dtype; ``config.json`` records it.
    """
    params = nn.meta.unbox(params)
    params = params.get("params", params)
    flat = flatten(params)
    if any(p.endswith(LORA_A) for p in flat):
        flat = flatten(merge_lora(params, config.lora.alpha))
    flat.pop(QUERIES, None)
    wanted = {e.path for e in entries(config)}
    missing, extra = sorted(wanted - set(flat)), sorted(set(flat) - wanted)
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")

    from transformers import Qwen2_5_VLConfig

    dtype = np.dtype(next(iter(flat.values())).dtype).name
    hf = Qwen2_5_VLConfig(**config.to_hf_config(), architectures=[ARCHITECTURE], dtype=dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    write_safetensors(_stream(config, flat), folder, "model", max_shard_bytes)
    return folder


__all__ = ["TABLE", "Entry", "entries", "export", "load", "to_ours", "to_theirs"]
