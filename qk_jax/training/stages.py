"""Where a stage's parameters come from (paper table 3, section 3.2).

- stage 1: random components at the CPU scales; at paper scale the VLM and the VAE come from imported
  Qwen2.5-VL / FLUX.1 weights (``config.pretrained.vlm`` / ``.vae``: folders for ``qk_jax.convert``).
- 1 -> 2: the VLM's LoRA is merged into its weights (then frozen, except at ShapesWorld scale: see
  ``configs/stage2.py``), stage 1's light head is dropped and the large MMDiT comes in
  (``config.pretrained.mmdit``, a diffusers FLUX-layout folder, or random).
- 2 -> 3: the MMDiT gains LoRA adapters (fresh: A random, B zero, so the model's output is unchanged).
- 3 -> 3 (3b, the 1024 upscale): the same parameters; resolution and lr change in the config.

Each stage reads the previous stage's final model checkpoint (``<init_from>/final``, written by
``checkpoint.save_model``) and refuses one from the wrong stage or with other component dims.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from qk_jax.convert import diffusers_mmdit, diffusers_vae, hf_qwen_vl
from qk_jax.data import processors
from qk_jax.models import lora as lora_lib
from qk_jax.models import saved_model
from qk_jax.models.mmdit import with_layout
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.parallel import mesh as mesh_lib

FINAL = "final"  # a stage's self-contained model checkpoint: <workdir>/final

# Which components must be identical between the previous stage's model and this one.
_KEPT = {2: ("vlm", "connector", "vae"), 3: ("vlm", "connector", "vae", "mmdit")}


def model_signature(config: Mapping[str, Any], component: str) -> dict:
    """A component's config as plain JSON-like data (tuples as lists), LoRA excluded: transitions change it. The
    VLM's tokenizer counts by kind (``processors.tokenizer_kind``): a Qwen folder's path may differ per stage."""
    block = config[component]
    block = dict(block.to_dict() if hasattr(block, "to_dict") else block)
    block.pop("lora", None)
    if component == "vlm":
        block["tokenizer"] = processors.tokenizer_kind(block)
    return _plain(block)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(saved: Mapping[str, Any], saved_stage: int, config: Mapping[str, Any], source: str) -> None:
    stage = int(config["stage"])
    allowed = {2: (1,), 3: (2, 3)}[stage]
    if saved_stage not in allowed:
        raise saved_model.CheckpointMismatchError(
            f"{source} is a stage {saved_stage} model, but stage {stage} starts from stage"
            f" {' or '.join(map(str, allowed))}; point config.init_from at the previous stage's workdir")
    for component in _KEPT[stage]:
        ours, theirs = model_signature(config, component), model_signature(saved, component)
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise saved_model.CheckpointMismatchError(
                f"{source}: its {component} differs from config.{component} in {diff[:6]}; the stages of one"
                " curriculum must share these dims")


def random_start(config: Mapping[str, Any]) -> bool:
    """Whether the stage starts from random parameters only (stage 1, nothing imported)."""
    return not config.get("init_from") and not any(dict(config.get("pretrained") or {}).values())


def initial_params(model: QueryKontext, config: Mapping[str, Any], rng: jax.Array,
                   init: Callable[..., dict[str, Any]] | None = None,
                   sharding_for: Callable[[tuple[str, ...], Any], jax.sharding.Sharding] | None = None
                   ) -> dict[str, Any]:
    """The parameters a stage starts from (see the module docstring). ``init(rng, components)`` makes random
    components (``model.init``, or one that creates them sharded); ``sharding_for(path, leaf)`` says where to read
    each leaf of the previous stage's model (``saved_model.load_model``; default: whole on one device) and where
    each imported tensor goes as soon as it is converted (``pretrained.*``): one tensor at a time on the host, only
    its shards on each device."""
    if init is None:
        def init(rng, components=("vlm", "connector", "mmdit", "vae")):
            return model.init(rng, components)
    init_from = config.get("init_from")
    pretrained = dict(config.get("pretrained") or {})
    if not init_from:
        if int(config["stage"]) != 1:
            raise ValueError(f"stage {config['stage']} needs config.init_from (the previous stage's workdir)")
        params = init(rng)
        return _load_pretrained(params, pretrained, ("vlm", "vae", "mmdit"), model.config, sharding_for)

    source = os.path.join(init_from, FINAL)
    saved_config, params, meta = saved_model.load_model(source, sharding_for=sharding_for)
    stage, previous = int(config["stage"]), int(saved_config["stage"])
    _check(saved_config, previous, config, source)
    params = dict(params)
    if stage == 2 and previous == 1:
        params["vlm"] = lora_lib.merge_lora(params["vlm"], float(saved_config["vlm"]["lora"]["alpha"]))
        params["mmdit"] = init(rng, ("mmdit",))["mmdit"]  # the large MMDiT replaces the head
        params = _load_pretrained(params, pretrained, ("mmdit",), model.config, sharding_for)
    elif stage == 3 and previous == 2:
        fresh = init(rng, ("mmdit",))["mmdit"]
        params["mmdit"] = _graft(with_layout(params["mmdit"], model.config.mmdit, model.config.scan_layers),
                                 lora_lib.lora_params(fresh))
    elif "mmdit" in params:  # 3 -> 3b: the previous stage may have scanned its layers and this one not, or back
        params["mmdit"] = with_layout(params["mmdit"], model.config.mmdit, model.config.scan_layers)
    return params


def _graft(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the leaves of ``extra`` added (nested dicts)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _graft(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


def _load_pretrained(params: dict[str, Any], pretrained: Mapping[str, Any], components: tuple[str, ...],
                     model_config: QueryKontextConfig,
                     sharding_for: Callable[[tuple[str, ...], Any], jax.sharding.Sharding] | None = None
                     ) -> dict[str, Any]:
    """Replace components by imported weights where ``config.pretrained.<component>`` names a folder; with
    ``sharding_for``, each tensor is placed on its shards as it is read (``mesh.place``)."""
    for component in components:
        folder = pretrained.get(component)
        if not folder:
            continue
        place = None if sharding_for is None else functools.partial(_place, sharding_for, component)
        if component == "vlm":
            _, loaded = hf_qwen_vl.load(folder, place=place)
            loaded = _graft(loaded, {k: v for k, v in params["vlm"].items() if k == "kontext_queries"})
            params["vlm"] = _graft(loaded, lora_lib.lora_params(params["vlm"]))
        elif component == "vae":
            params["vae"] = diffusers_vae.load(folder, place=place)[1]
        else:
            imported = with_layout(diffusers_mmdit.load(folder, place=place)[1], model_config.mmdit,
                                   model_config.scan_layers)
            params["mmdit"] = _graft(imported, lora_lib.lora_params(params["mmdit"]))
    return params


def _place(sharding_for: Callable[[tuple[str, ...], Any], jax.sharding.Sharding], component: str, path: str,
           array: Any) -> jax.Array:
    """One imported leaf (a host array) cut into its shards on this process's devices."""
    return mesh_lib.place(array, sharding_for((component, *path.split("/")), array))
