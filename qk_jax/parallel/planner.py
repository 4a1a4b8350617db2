r"""The memory and FLOP planner: how a stage fits a mesh, per device, before anything is allocated.

``Planner(config, name).best(devices, device_memory)`` (or ``.plan(mesh, device_memory)``) gives a ``Plan``;
``run`` plans several stage configs, ``format_plan`` / ``format_json`` print one. The command is
``python -m qk_jax.plan`` (``qk_jax/plan.py``)::

  python -m qk_jax.plan --config configs/stage2.py --devices 192 --device-memory 80GB [--mesh 48,1,4] [--json]
  python -m qk_jax.plan --all --devices 192 --device-memory 80GB   # stages 1, 2, 3 and 3b at paper scale

Parameter counts, dtypes and logical axes come from ``jax.eval_shape`` of the real model
(``QueryKontext.abstract_params``), split into trainable/frozen by ``config.trainable`` exactly as
``qk_jax.training.state.partition`` does; nothing is allocated. Everything else is a documented formula.

Per device, for a mesh ``(data, fsdp, tensor)`` with ``Z = data * fsdp`` (the ZeRO axes) and ``b`` samples
per device per micro-step (``micro``):

- **params**: each frozen leaf's bytes divided by the mesh sizes its logical axes map to
  (``config.sharding.vlm_rules`` for the VLM: heads/kv_heads/mlp/vocab over 'tensor'; ``mmdit_rules`` for the
  rest: replicated), rounded up; frozen VLM leaves are ``config.vlm.frozen_dtype`` and frozen MMDiT kernels
  (stage 3's base) the compute dtype (``training.loop.cast_frozen``); every other frozen leaf keeps float32.
  Trainable leaves are float32 masters: the VLM's by its rules, every other one split over ``Z``
  (``parallel.mesh.zero_spec``) when ``config.sharding.mmdit_zero_stage >= 2`` (ZeRO-2, ``parallel.zero``), else
  by its rules (replicated).
- **grads**: float32, split as the masters (ZeRO-2: reduce-scattered; the VLM's all-reduced).
- **optimizer**: AdamW ``mu`` and ``nu`` (``8 B x trainable``), plus the ``optax.MultiSteps`` accumulator
  (``4 B``) when ``optim.grad_accum_steps > 1`` (or the plan needs accumulation), all split over ``Z``
  (``parallel.mesh.zero_sharding``); plus the EMA copy when ``ema_decay`` is set, laid out as the masters.
- **compute copy**: the ZeRO-2 step gathers the masters of the split leaves whole, kernels cast to the compute
  dtype (``c B``), the rest float32, and keeps it through the backward pass.
- **activations**: what the backward pass keeps, per component on the gradient path (see ``_activations``):

  * MMDiT, ``T = L + S`` tokens per sample (``L`` = ``vlm.max_text_tokens + num_queries`` text/kontext
    tokens, ``S = (1 + M) (res / 16)^2`` image tokens: the target and ``M`` in-context images, stage 3
    ``M = max_references``), width ``D``, ``H`` heads, compute dtype bytes ``c``:
    per double-stream block ``b T D a_c`` with ``a_c = 98`` (bf16) / ``166`` (f32) bytes, per single block
    ``a_c = 94`` / ``158``; attention adds ``b H T^2 s`` with ``s = 5.5``/``6.5`` bytes (XLA attention keeps
    the probabilities and the mask: CPU, and the ``--attention xla`` plans; JAX saves 13 B, XLA:CPU's compiled step
    keeps about 6.5, calibrated on the tiny config's compiled step) or ``b H T 4`` bytes (cuDNN
    flash attention keeps the log-sum-exp only: the default on GPU); with bf16 compute of float32 trained
    kernels not under ZeRO-2 the bf16 weight casts are kept too (``2 B x`` the component's parameters; ZeRO-2's
    compute copy and cast_frozen's bf16 kernels are those casts already). The constants are JAX's own saved
    residuals of one block (``jax._src.ad_checkpoint.saved_residuals``) per token and width, measured at several
    sizes (they vary by < 10%); ``tests/test_planner.py`` checks them against a fresh count.
    Full remat per block (``--remat full``) keeps only each block's inputs (``b T D c`` per block) plus one
    block's working set (its no-remat residuals) during its backward.
  * VLM LLM: on the gradient path in every stage, because the kontext queries are trainable and enter the
    LLM (stage 1 also trains its LoRA): per decoder layer ``b L_v (k_D D + k_F F)`` bytes with
    ``(k_D, k_F) = (32, 5.6)`` (bf16) / ``(34, 15.6)`` (f32), ``L_v = max_text_tokens + num_queries``, plus
    ``b H L_v^2 s`` (XLA) or ``b H L_v 4`` (flash) attention. The VLM has no remat option.
  * ViT and VAE: frozen and off the gradient path (pixels in, no trainable leaf): forward only, their
    transients are freed before the MMDiT's residuals build up; not counted.
- **batch**: the step's inputs (float32 pixels of target, in-context and VLM images, int32 tokens), per device.
- **total** = params + grads + optimizer + compute copy + activations + batch.

FLOPs per step (model FLOPs, the MFU convention; no remat recompute): for every matmul, ``2 x MACs`` forward;
trained weights cost ``3x`` forward (forward, input gradient, weight gradient), frozen weights on the gradient
path ``2x`` (no weight gradient), frozen weights off it (ViT) ``1x``; attention score and value matmuls
``4 T^2 width`` per layer forward, ``3x`` when on the gradient path. ``mmdit_train_flops`` is exact for the
matmuls of ``qk_jax.models.mmdit.MMDiT`` (every dense: q/k/v/out of both streams, FFNs, adaLN linears, embedders,
``proj_out`` on the target tokens only). The VAE encoder is left out (forward only, < 1% at paper scale).
Remat adds one more forward of the rematerialised blocks to the *hardware* FLOPs; MFU uses model FLOPs.
Compute time per step = FLOPs per device / (``--mfu`` x ``--peak-tflops``), where a device does its
``global / Z`` samples' MMDiT and connector work and a ``1 / tensor`` share of their VLM work; with
``sharding.mmdit_rows_over`` = ('tensor',) (the default) and a micro-batch that ``tensor`` divides, a ``1 / tensor``
share of the MMDiT's too (``parallel.mesh.split_rows``), whose gradients are then all-reduced over 'tensor'
(``tensor_grad_all_reduce``). Activations are counted as if the MMDiT's were not split (an upper bound).

Communication per device per step (ring collectives: an all-gather or reduce-scatter of ``X`` bytes over ``n``
devices sends ``X (n-1)/n``, an all-reduce twice that), each micro-step (``parallel.zero``):

- ``zero_all_gather``: the compute copy of the ZeRO leaves that are split, over ``Z``;
- ``zero_reduce_scatter``: their float32 gradients, whole size, over ``Z``;
- ``data_all_reduce``: the float32 gradients of the other trainable leaves (the VLM's, its tensor share; a ZeRO
  leaf no axis divides) over ``Z``;
- ``tensor_all_reduce``: the VLM's tensor-parallel activations, two all-reduces of ``b L D c`` bytes per LLM layer
  forward and two more backward, two per ViT block forward (``b`` images' patches), over ``tensor``.

Their time at the ``interconnect``'s bandwidth per device (``INTERCONNECTS``: the data axes between nodes, the
tensor axis inside one), **not overlapped** with compute: ``time_per_step_s`` = compute + communication is an
upper bound (XLA's asynchronous collectives hide part of it).

Mesh: ``--mesh data,fsdp,tensor`` fixes it. Without it the planner tries every ``tensor`` in the divisors of the
VLM's KV heads (so heads, MLP and vocabulary split evenly) and every split of ``devices / tensor`` into
``data x fsdp`` (both are ZeRO axes, but ``parallel.mesh.zero_spec`` shards a leaf only over axes that divide
its dims: 192 = 64 x 3 shards the 2560/10240-wide MMDiT 64 ways where 192 x 1 cannot shard it at all) and picks
the layout that fits with the shortest planned step, then the lowest total. "Smallest mesh that fits" is the
fewest devices (a multiple of that tensor size) on which micro-batch 1 fits.

Global batch: ``config.batch_size`` over ``data * fsdp``; if that many samples per device do not fit, the plan
takes the largest micro-batch that does and ``grad_accum_steps = per-device batch / micro`` (set
``--config.batch_size=global/steps --config.optim.grad_accum_steps=steps``: optax.MultiSteps sums ``steps``
steps of ``batch_size``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qk_jax.models.lora import LoRAConfig
from qk_jax.models.mmdit import MMDiTConfig
from qk_jax.models.mmdit import abstract_params as mmdit_abstract_params
from qk_jax.models.query_kontext import QueryKontext, QueryKontextConfig
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.pytree import flatten, match_any

GB = 1e9

# Saved-residual constants (module docstring), keyed by compute-dtype bytes.
MMDIT_DOUBLE_BYTES = {2: 98.0, 4: 166.0}  # per token per width unit, one double-stream block
MMDIT_SINGLE_BYTES = {2: 94.0, 4: 158.0}
LLM_BYTES = {2: (32.0, 5.6), 4: (34.0, 15.6)}  # (per width unit, per MLP unit), per token, one decoder layer
# Per head per query-key pair that XLA keeps after fusion (JAX saves 13 / 11 B: scores, softmax, mask; XLA:CPU's
# compiled float32 step keeps about half, measured on the tiny config; bf16 assumed to keep the same tensors).
XLA_ATTENTION_BYTES = {2: 5.5, 4: 6.5}
FLASH_ATTENTION_BYTES = 4.0  # per head per token: the float32 log-sum-exp


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """Bandwidth per device (bytes/s, one direction) inside a node and between nodes, and devices per node."""

    intra: float
    inter: float
    devices_per_node: int


INTERCONNECTS = {
    # 8 x H100 SXM per node: NVLink 4 (900 GB/s both directions), one 400 Gb/s InfiniBand NIC per GPU.
    "h100-ib": Interconnect(intra=450e9, inter=50e9, devices_per_node=8),
    # TPU v5p: 4,800 Gb/s of ICI per chip over six links of the 3D torus; a ring along one axis uses two.
    "tpu-v5p": Interconnect(intra=200e9, inter=200e9, devices_per_node=4),
}


# ----------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------


def _mmdit_tokens(path: str, batch: int, image_tokens: int, text_tokens: int, target_tokens: int) -> int:
    """Rows a dense of the MMDiT at ``path`` multiplies (the module docstring of ``models/mmdit.py``)."""
    if re.search(r"(^|/)(norm1|norm1_context|norm|norm_out)/linear/", path) or path.startswith("time_text_embed/"):
        return batch  # adaLN modulation and conditioning MLPs: one vector per sample
    if path.startswith("proj_out/"):
        return batch * target_tokens  # sliced to the target before norm_out/proj_out
    if path.startswith("single_transformer_blocks_"):
        return batch * (image_tokens + text_tokens)
    if re.search(r"/(add_q_proj|add_k_proj|add_v_proj|to_add_out)/|/ff_context/", path) or \
            path.startswith("context_embedder/"):
        return batch * text_tokens
    return batch * image_tokens  # x_embedder, to_q/k/v, to_out_0, ff


def mmdit_matmul_flops(mmdit_config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int,
                       target_tokens: int | None = None, lora: LoRAConfig | None = None) -> dict[str, int]:
    """Forward FLOPs (``2 x MACs``) of ``MMDiT(mmdit_config, lora)``'s matmuls, split by what they multiply.

    Returns ``{'base': dense kernels, 'lora': LoRA A/B, 'attention': q k^T and p v}``. ``image_tokens`` is the
    whole image stream (target + in-context), ``target_tokens`` (default ``image_tokens``) what ``proj_out`` sees.
    """
    target_tokens = image_tokens if target_tokens is None else target_tokens
    flat = flatten(nn.meta.unbox(mmdit_abstract_params(mmdit_config, lora)))
    out = dict(base=0, lora=0, attention=0)
    for path, leaf in flat.items():
        name = path.rsplit("/", 1)[-1]
        if name not in ("kernel", "lora_a", "lora_b"):
            continue
        rows = _mmdit_tokens(path, batch, image_tokens, text_tokens, target_tokens)
        out["base" if name == "kernel" else "lora"] += 2 * rows * math.prod(leaf.shape)
    layers = mmdit_config.num_layers + mmdit_config.num_single_layers
    t = image_tokens + text_tokens
    out["attention"] = layers * 2 * 2 * batch * t * t * mmdit_config.inner_dim
    return out


def mmdit_train_flops(mmdit_config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int,
                      target_tokens: int | None = None) -> int:
    """Model FLOPs of one training step of the whole MMDiT (no LoRA): ``3 x`` the forward matmuls.

    Forward = ``2 x MACs`` of every dense (exact for ``qk_jax.models.mmdit.MMDiT``) plus the attention's score
    and value matmuls (``4 B T^2 D`` per block, ``T = image + text tokens``); training = forward + input
    gradients + weight gradients = ``3 x`` forward. Remat would add one forward to the hardware FLOPs; MFU
    counts model FLOPs, so it is not included.
    """
    return 3 * sum(mmdit_matmul_flops(mmdit_config, batch, image_tokens, text_tokens, target_tokens).values())


def _vlm_flops(vlm_params: Mapping[str, Any], cfg: QueryKontextConfig, batch: int, text_len: int,
               images: int, patches: int, lora_trained: bool) -> float:
    """Model FLOPs of the VLM for one step (module docstring): LLM 2x (3x on LoRA), ViT forward only."""
    v, t = cfg.vlm.vision, cfg.vlm.text
    llm = vit = lora = 0
    for path, leaf in flatten(nn.meta.unbox(vlm_params)).items():
        name = path.rsplit("/", 1)[-1]
        if name not in ("kernel", "lora_a", "lora_b") or "lm_head" in path:
            continue
        n = math.prod(leaf.shape)
        if path.startswith("visual/"):
            # The merger runs on merged tokens (1/merge_unit of the patches).
            vit += n * (patches // v.merge_unit if "/merger/" in path else patches)
        elif name == "kernel":
            llm += n * text_len
        else:
            lora += n * text_len
    llm_attn = t.num_hidden_layers * 4 * text_len ** 2 * t.num_attention_heads * t.head_dim
    window = (v.window_size // v.patch_size) ** 2  # patches per window
    full = len(v.fullatt_block_indexes)
    vit_attn = 4 * v.hidden_size * patches * ((v.depth - full) * min(window, patches) + full * patches)
    forward_llm = 2 * llm + llm_attn
    return batch * (2 * forward_llm + (3 * 2 * lora if lora_trained else 2 * 2 * lora)
                    + images * (2 * vit + vit_attn))


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def _shard_factor(names: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, Any],
                  mesh: Mapping[str, int]) -> int:
    """Elements per device of one leaf: each dim over the product of the mesh axes its logical name maps to."""
    per = 1
    for dim, name in zip(shape, names):
        axes = rules.get(name) if name else None
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        per *= math.ceil(dim / math.prod(mesh.get(a, 1) for a in axes))
    return per


def _zero_elems(shape: Sequence[int], mesh: Mapping[str, int]) -> int:
    """Elements per device of a leaf under ``parallel.mesh.zero_spec`` over the data and fsdp axes."""
    spec = mesh_lib.zero_spec(shape, [(a, mesh[a]) for a in ("data", "fsdp")])
    return math.prod(d // math.prod(mesh[a] for a in (axes or ())) for d, axes in zip(shape, spec))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one sample costs, from the stage config."""

    image_tokens: int  # MMDiT image stream: target + in-context
    target_tokens: int
    text_tokens: int  # MMDiT text stream = VLM text + queries
    vlm_images: int  # images the VLM's ViT reads per sample (worst bucket)
    vlm_patches: int  # ViT patches per image
    vlm_image_tokens: int  # LLM tokens of one image (merged patches + start/end)


def workload(config: Mapping[str, Any]) -> Workload:
    """Tokens of the worst bucket of a stage at its square resolution (module docstring)."""
    res = int(config["resolution"])
    vlm, vae = config["vlm"], config["vae"]
    f = 2 * 2 ** (len(vae["block_out_channels"]) - 1)  # VAE downsampling x 2x2 packing
    target = (res // f) ** 2
    in_context = int(config["max_references"]) if config.get("in_context") else 0
    tasks = dict(config.get("tasks", {}))
    vlm_images = int(config["max_references"]) if in_context else int(any(t != "t2i" for t in tasks))
    p, m = int(vlm["vision"]["patch_size"]), int(vlm["vision"]["spatial_merge_size"])
    side = max(p * m, round(res / (p * m)) * p * m)  # ByteProcessor / Qwen's resize to multiples of 28
    patches = (side // p) ** 2
    return Workload(image_tokens=(1 + in_context) * target, target_tokens=target,
                    text_tokens=int(vlm["max_text_tokens"]) + int(vlm["num_queries"]),
                    vlm_images=vlm_images, vlm_patches=patches, vlm_image_tokens=patches // m ** 2 + 2)


@dataclasses.dataclass
class Plan:
    """One stage on one mesh; bytes and FLOPs per device."""

    stage: str
    mesh: tuple[int, int, int]
    devices: int
    global_batch: int
    batch_per_device: int
    micro_batch: int
    grad_accum_steps: int
    remat: str
    attention: str
    counts: dict[str, int]  # parameters: total, trainable, frozen, and per component
    params: float
    grads: float
    optimizer: float
    compute_copy: float  # the ZeRO-2 step's gathered copy of the ZeRO leaves (whole, compute dtype kernels)
    activations: float
    activations_no_remat: float
    activations_full_remat: float
    batch_inputs: float
    total: float
    flops_per_step: float  # whole mesh, one optimizer step (all accumulation micro-steps)
    compute_time_s: float
    comm_bytes: dict[str, float]  # per device per optimizer step, by collective (module docstring)
    comm_time_s: float  # at the interconnect's bandwidth, not overlapped
    time_per_step_s: float  # compute + communication: an upper bound
    interconnect: str
    device_memory: float
    fits: bool
    zero: str
    warnings: list[str]

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Planner:
    """Abstract params, partition and per-component facts of one stage config; ``plan(mesh, micro)``."""

    def __init__(self, config: Mapping[str, Any], name: str = ""):
        self.config, self.name = config, name or f"stage{config.get('stage', '?')}"
        self.qk = QueryKontextConfig.from_config(config)
        abstract = QueryKontext(self.qk).abstract_params()
        regexes = tuple(config["trainable"])
        self.leaves = []  # (component, path, shape, logical names, trainable, bytes per element)
        frozen_vlm = jnp.dtype(config["vlm"].get("frozen_dtype", "float32")).itemsize
        for component, tree in abstract.items():
            specs = flatten(nn.get_partition_spec(tree))  # logical names per leaf (None where unnamed)
            for path, leaf in flatten(nn.meta.unbox(tree)).items():
                full = f"{component}/{path}"
                trainable = match_any(full, regexes)
                item = leaf.dtype.itemsize
                if not trainable and component == "vlm":
                    item = frozen_vlm
                elif not trainable and component == "mmdit" and full.endswith("kernel"):  # loop.cast_frozen
                    item = jnp.dtype(self.qk.compute_dtype).itemsize
                spec = specs.get(path)
                axes = tuple(spec) if spec is not None else ()
                axes = axes + (None,) * (len(leaf.shape) - len(axes))
                self.leaves.append((component, full, tuple(leaf.shape), axes, trainable, item))
        self.work = workload(config)
        self.compute_bytes = jnp.dtype(self.qk.compute_dtype).itemsize
        self.counts = dict(total=0, trainable=0, frozen=0)
        for component, _, shape, _, trainable, _ in self.leaves:
            n = math.prod(shape)
            self.counts["total"] += n
            self.counts["trainable" if trainable else "frozen"] += n
            self.counts[component] = self.counts.get(component, 0) + n
        self.on_path = {c: any(t for comp, _, _, _, t, _ in self.leaves if comp == c) for c in abstract}
        self._abstract = abstract

    # -- pieces ---------------------------------------------------------------------------------------------

    def _rules(self, component: str) -> dict[str, Any]:
        sharding = self.config["sharding"]
        return dict(sharding["vlm_rules"] if component == "vlm" else sharding["mmdit_rules"])

    @functools.cached_property
    def zero2(self) -> bool:
        return int(self.config["sharding"].get("mmdit_zero_stage", 2)) >= 2

    @functools.lru_cache(maxsize=None)
    def _state_parts(self, data: int, fsdp: int, tensor: int, zero: str) -> dict[str, float]:
        """Bytes per device of the stored state on one mesh (``training.loop._state_shardings``): params (frozen
        leaves by the logical rules; trainable ones as float32 masters, ZeRO-split outside the VLM at ZeRO-2),
        their float32 gradients (split as the masters), the EMA (as the masters), the ZeRO-split elements the
        optimizer keeps per trainable leaf (``zero``: ``'repo'`` = ``mesh.zero_spec``, whole dims only;
        ``'even'`` = every leaf split ``data x fsdp`` ways, padded), and the whole compute copy the ZeRO-2 step
        gathers (``parallel.zero``: kernels in the compute dtype)."""
        mesh = dict(data=data, fsdp=fsdp, tensor=tensor)
        z = data * fsdp
        out = dict(params=0.0, grads=0.0, ema=0.0, zero_elements=0.0, copy=0.0, gathered=0.0, zero_whole=0.0,
                   other_grads=0.0)
        for (component, shape, names, trainable, item, kernel), n in self._leaf_kinds.items():
            local = _shard_factor(names, shape, self._rules(component), mesh)
            if not trainable:
                out["params"] += n * local * item
                continue
            split = math.ceil(math.prod(shape) / z) if zero == "even" else _zero_elems(shape, mesh)
            out["zero_elements"] += n * split
            if self.zero2 and component != "vlm":
                local = split
                copy = n * math.prod(shape) * (self.compute_bytes if kernel else 4)
                out["copy"] += copy
                if split < math.prod(shape):  # gathered, and its float32 gradient reduce-scattered
                    out["gathered"] += copy
                    out["zero_whole"] += n * 4 * math.prod(shape)
                else:  # no axis divides it: whole everywhere, its gradient all-reduced
                    out["other_grads"] += n * 4 * local
            else:
                out["other_grads"] += n * 4 * local
            for key in ("params", "grads", "ema"):
                out[key] += n * 4 * local
        return out

    @functools.cached_property
    def _float32_mmdit_kernels(self) -> bool:
        """Whether the step multiplies by float32-stored MMDiT kernels: trained ones not under ZeRO-2."""
        return not self.zero2 and any(t for comp, p, _, _, t, _ in self.leaves
                                      if comp == "mmdit" and p.endswith("/kernel"))

    @functools.cached_property
    def _leaf_kinds(self) -> dict[tuple, int]:
        """Leaves counted by what their bytes depend on (a paper VLM has ~700 leaves of a few dozen kinds)."""
        kinds: dict[tuple, int] = {}
        for component, path, shape, names, trainable, item in self.leaves:
            key = (component, shape, names, trainable, item, path.endswith("kernel"))
            kinds[key] = kinds.get(key, 0) + 1
        return kinds

    def _state_bytes(self, mesh: Mapping[str, int], accumulate: bool, zero: str
                     ) -> tuple[float, float, float, float]:
        """(params, grads, optimizer, compute copy) bytes per device (``_state_parts``); the optimizer holds
        AdamW's two moments, the ``optax.MultiSteps`` accumulator when accumulating, and the EMA when set."""
        parts = self._state_parts(mesh["data"], mesh["fsdp"], mesh["tensor"], zero)
        optim = self.config["optim"]
        opt_per = 8 + (4 if accumulate or int(optim.get("grad_accum_steps", 1)) > 1 else 0)
        opt = opt_per * parts["zero_elements"] + (parts["ema"] if self.config.get("ema_decay") else 0.0)
        return parts["params"], parts["grads"], opt, parts["copy"]

    def _activations(self, b: int, remat: str, attention: str) -> float:
        """Saved residuals of one micro-step on one device (module docstring)."""
        c = self.compute_bytes
        w = self.work
        m = self.qk.mmdit
        total = 0.0
        if self.on_path.get("mmdit") or self.on_path.get("connector") or self.on_path.get("vlm"):
            t = w.image_tokens + w.text_tokens
            attn = (XLA_ATTENTION_BYTES[c] * m.num_attention_heads * t * t if attention == "xla"
                    else FLASH_ATTENTION_BYTES * m.num_attention_heads * t)
            double = b * (MMDIT_DOUBLE_BYTES[c] * t * m.inner_dim + attn)
            single = b * (MMDIT_SINGLE_BYTES[c] * t * m.inner_dim + attn)
            casts = 0.0
            if c < 4 and self._float32_mmdit_kernels:  # bf16 casts of the float32 weights, kept for the input gradients
                # (a ZeRO-2 trained MMDiT's compute copy is those casts, counted in the state; a frozen one is
                # stored in bf16, loop.cast_frozen)
                casts = c * self.counts["mmdit"] / max(m.num_layers + m.num_single_layers, 1)
            layers = m.num_layers * (double + casts) + m.num_single_layers * (single + casts)
            if remat == "full":
                inputs = b * t * m.inner_dim * c * (m.num_layers + m.num_single_layers)
                total += inputs + max(double if m.num_layers else 0.0, single if m.num_single_layers else 0.0) + casts
            else:
                total += layers
        if self.on_path.get("vlm"):
            text = self.qk.vlm.text
            lv = w.text_tokens
            k_d, k_f = LLM_BYTES[c]
            attn = (XLA_ATTENTION_BYTES[c] * text.num_attention_heads * lv * lv if attention == "xla"
                    else FLASH_ATTENTION_BYTES * text.num_attention_heads * lv)
            total += text.num_hidden_layers * b * (lv * (k_d * text.hidden_size + k_f * text.intermediate_size)
                                                   + attn)
        return total

    def _batch_bytes(self, b: int) -> float:
        res = int(self.config["resolution"])
        w = self.work
        images = 1 + (int(self.config["max_references"]) if self.config.get("in_context") else 0)
        patch_dim = 3 * int(self.config["vlm"]["vision"]["temporal_patch_size"]) * \
            int(self.config["vlm"]["vision"]["patch_size"]) ** 2
        return b * (4 * images * res * res * 3 + 4 * w.vlm_images * w.vlm_patches * patch_dim
                    + 8 * int(self.config["vlm"]["max_text_tokens"]) + 16)

    @functools.cached_property
    def flops_per_sample(self) -> float:
        """Model FLOPs of one sample's training step (module docstring)."""
        w = self.work
        lora_on = bool(self.qk.mmdit_lora.rank)
        mm = mmdit_matmul_flops(self.qk.mmdit, 1, w.image_tokens, w.text_tokens, w.target_tokens,
                                self.qk.mmdit_lora if lora_on else None)
        mmdit_trained = any(t for comp, p, _, _, t, _ in self.leaves if comp == "mmdit" and p.endswith("/kernel"))
        flops = (3 if mmdit_trained else 2) * mm["base"] + 3 * mm["lora"] + 3 * mm["attention"]
        connector = sum(math.prod(s) for comp, p, s, _, _, _ in self.leaves
                        if comp == "connector" and p.endswith("kernel"))
        flops += 3 * 2 * connector * w.text_tokens
        return flops + self.vlm_flops_per_sample

    @functools.cached_property
    def vlm_flops_per_sample(self) -> float:
        """The VLM's part of ``flops_per_sample`` (the only part split over 'tensor')."""
        w = self.work
        lora_vlm = any(t for comp, p, _, _, t, _ in self.leaves if comp == "vlm" and "lora_" in p)
        return _vlm_flops(self._abstract["vlm"], self.qk, 1, w.text_tokens, w.vlm_images, w.vlm_patches, lora_vlm)

    # -- communication ----------------------------------------------------------------------------------------

    def _comm_bytes(self, mesh: Mapping[str, int], b: int, zero: str) -> dict[str, float]:
        """Bytes one device sends in one micro-step of ``b`` samples, by collective (module docstring)."""
        z, t = mesh["data"] * mesh["fsdp"], mesh["tensor"]
        ring, tp_ring = (z - 1) / z, (t - 1) / t
        parts = self._state_parts(mesh["data"], mesh["fsdp"], mesh["tensor"], zero)
        text, vision = self.qk.vlm.text, self.qk.vlm.vision
        c, w = self.compute_bytes, self.work
        llm = text.num_hidden_layers * 4 * b * w.text_tokens * text.hidden_size * c
        vit = vision.depth * 2 * b * w.vlm_images * w.vlm_patches * vision.hidden_size * c
        comm = dict(zero_all_gather=ring * parts["gathered"], zero_reduce_scatter=ring * parts["zero_whole"],
                    data_all_reduce=2 * ring * parts["other_grads"], tensor_all_reduce=2 * tp_ring * (llm + vit))
        if self._rows_over_tensor(b, t):  # the MMDiT's gradients, from 1/t of the rows each, summed over 'tensor'
            comm["tensor_grad_all_reduce"] = 2 * tp_ring * parts["zero_whole"]
        return comm

    def _rows_over_tensor(self, b: int, tensor: int) -> bool:
        """Whether a micro-batch of ``b`` rows per device splits its MMDiT rows over 'tensor' (``split_rows``)."""
        axes = tuple((self.config.get("sharding") or {}).get("mmdit_rows_over", ()))
        return tensor > 1 and "tensor" in axes and b % tensor == 0

    @staticmethod
    def _comm_time(comm: Mapping[str, float], mesh: Mapping[str, int], interconnect: str) -> float:
        """Seconds at the bandwidth of the links each collective crosses: the tensor axis stays inside a node; the
        data axes leave it once the mesh has more devices than a node."""
        if interconnect not in INTERCONNECTS:
            raise ValueError(f"unknown interconnect {interconnect!r}; one of {sorted(INTERCONNECTS)}")
        link = INTERCONNECTS[interconnect]
        devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
        data_bw = link.inter if devices > link.devices_per_node else link.intra
        return (sum(v for k, v in comm.items() if not k.startswith("tensor_")) / data_bw
                + sum(v for k, v in comm.items() if k.startswith("tensor_")) / link.intra)

    # -- one plan ---------------------------------------------------------------------------------------------

    def plan(self, mesh: tuple[int, int, int], device_memory: float, *, micro: int | None = None,
             remat: str = "none", attention: str = "flash", zero: str = "repo", mfu: float = 0.4,
             peak_tflops: float = 989.0, global_batch: int | None = None, interconnect: str = "h100-ib") -> Plan:
        """The plan on ``mesh`` = (data, fsdp, tensor). ``micro`` None: the largest divisor of the per-device
        batch that fits (1 if none does)."""
        data, fsdp, tensor = mesh
        axes = dict(data=data, fsdp=fsdp, tensor=tensor)
        z = data * fsdp
        global_batch = int(self.config["batch_size"]) if global_batch is None else global_batch
        per_device = max(1, math.ceil(global_batch / z))

        def total_for(b):
            accumulate = b < per_device
            params, grads, opt, copy = self._state_bytes(axes, accumulate, zero)
            act = self._activations(b, remat, attention)
            return params, grads, opt, copy, act, self._batch_bytes(b)

        if micro is None:
            micro = 1
            for b in sorted((d for d in range(1, per_device + 1) if per_device % d == 0), reverse=True):
                if sum(total_for(b)) <= device_memory:
                    micro = b
                    break
        params, grads, opt, copy, act, batch_bytes = total_for(micro)
        total = params + grads + opt + copy + act + batch_bytes
        flops = self.flops_per_sample * global_batch
        # Per device: a 1/tensor share of its samples' VLM work, and of their MMDiT/connector work when those rows
        # split over 'tensor' too (``sharding.mmdit_rows_over``; else every device of a tensor group repeats it).
        split = self._rows_over_tensor(micro, tensor)
        rest = self.flops_per_sample - self.vlm_flops_per_sample
        device_flops = per_device * (self.vlm_flops_per_sample / tensor + (rest / tensor if split else rest))
        compute = device_flops / (mfu * peak_tflops * 1e12)
        steps = math.ceil(per_device / micro)
        comm = {k: steps * v for k, v in self._comm_bytes(axes, micro, zero).items()}
        comm_time = self._comm_time(comm, axes, interconnect)
        return Plan(
            stage=self.name, mesh=mesh, devices=data * fsdp * tensor, global_batch=global_batch,
            batch_per_device=per_device, micro_batch=micro, grad_accum_steps=steps,
            remat=remat, attention=attention, counts=dict(self.counts), params=params, grads=grads,
            optimizer=opt, compute_copy=copy, activations=act,
            activations_no_remat=self._activations(micro, "none", attention),
            activations_full_remat=self._activations(micro, "full", attention), batch_inputs=batch_bytes,
            total=total, flops_per_step=flops, compute_time_s=compute, comm_bytes=comm, comm_time_s=comm_time,
            time_per_step_s=compute + comm_time, interconnect=interconnect, device_memory=device_memory,
            fits=total <= device_memory, zero=zero, warnings=self.warnings(global_batch, z))

    def warnings(self, global_batch: int, z: int) -> list[str]:
        """Config problems the numbers reveal."""
        out = []
        if global_batch % z:
            out.append(f"global batch {global_batch} is not a multiple of data x fsdp = {z}: the plan pads to"
                       f" {math.ceil(global_batch / z)} per device ({math.ceil(global_batch / z) * z} in all)")
        w = self.work
        if w.vlm_images and w.vlm_images * w.vlm_image_tokens > int(self.config["vlm"]["max_text_tokens"]):
            out.append(f"{w.vlm_images} image(s) of {w.vlm_image_tokens} VLM tokens each at"
                       f" {self.config['resolution']}px exceed vlm.max_text_tokens="
                       f"{self.config['vlm']['max_text_tokens']}: such prompts are skipped as too long")
        return out

    def tensor_choices(self) -> list[int]:
        kv = self.qk.vlm.text.num_key_value_heads
        return [t for t in range(1, kv + 1) if kv % t == 0]

    def best(self, devices: int, device_memory: float, **kw) -> Plan:
        """The layout for ``devices`` that fits with the shortest planned step (compute + communication), then
        the lowest total."""
        plans = [self.plan((devices // t // f, f, t), device_memory, **kw)
                 for t in self.tensor_choices() if devices % t == 0
                 for f in _divisors(devices // t)]
        if not plans:
            raise ValueError(f"{devices} devices are not divisible by any tensor size in {self.tensor_choices()}")
        return min(plans, key=lambda p: (not p.fits, p.time_per_step_s, p.total))

    def smallest(self, device_memory: float, max_devices: int = 4096, **kw) -> Plan | None:
        """The fewest devices on which micro-batch 1 fits (``None`` if none up to ``max_devices``)."""
        for n in range(1, max_devices + 1):
            for t in self.tensor_choices():
                if n % t:
                    continue
                p = self.plan((n // t, 1, t), device_memory, micro=1, **kw)
                if p.fits:
                    return p
        return None


# ----------------------------------------------------------------------------------------------------------
# Parsing flag values, reporting, the paper's stages
# ----------------------------------------------------------------------------------------------------------


def parse_memory(text: str) -> float:
    """``'80GB'`` / ``'80GiB'`` / ``'8e10'`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*(GB|GiB|MB|MiB|TB|B)?\s*", text)
    if not m:
        raise ValueError(f"--device-memory={text!r}: give e.g. 80GB, 80GiB or a byte count")
    scale = dict(B=1, MB=1e6, MiB=2 ** 20, GB=1e9, GiB=2 ** 30, TB=1e12)[m.group(2) or "B"]
    return float(m.group(1)) * scale


def parse_mesh(text: str) -> tuple[int, int, int]:
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--mesh={text!r}: give data,fsdp,tensor sizes, e.g. 48,1,4")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def format_plan(p: Plan, smallest: Plan | None) -> str:
    d, f, t = p.mesh
    lines = [
        f"== {p.stage}: mesh data={d} fsdp={f} tensor={t} ({p.devices} devices), attention={p.attention},"
        f" remat={p.remat}, zero={p.zero}",
        f"   parameters: {p.counts['total']:,} total, {p.counts['trainable']:,} trainable, {p.counts['frozen']:,}"
        " frozen (" + ", ".join(f"{k} {v:,}" for k, v in p.counts.items()
                                if k not in ("total", "trainable", "frozen")) + ")",
        f"   global batch {p.global_batch} -> {p.batch_per_device} per device = micro-batch {p.micro_batch} x"
        f" {p.grad_accum_steps} accumulation step(s)",
        "   per device (GB)     params    grads optimizer  copy   activ.   (no remat / full remat)   batch    total",
        f"                     {_gb(p.params)} {_gb(p.grads)} {_gb(p.optimizer)} {_gb(p.compute_copy)}"
        f" {_gb(p.activations)}   "
        f"({_gb(p.activations_no_remat).strip()} / {_gb(p.activations_full_remat).strip()})"
        f"          {_gb(p.batch_inputs)} {_gb(p.total)}",
        f"   {'FITS' if p.fits else 'DOES NOT FIT'} in {p.device_memory / GB:.0f} GB;"
        f" {p.flops_per_step:.3e} FLOPs per step",
        f"   time per step: {p.time_per_step_s:.2f} s = compute {p.compute_time_s:.2f} s at the given MFU +"
        f" communication {p.comm_time_s:.2f} s on {p.interconnect}, not overlapped ("
        + (", ".join(f"{k} {v / GB:.1f} GB" for k, v in p.comm_bytes.items() if v) or "no collectives")
        + " per device)",
    ]
    if smallest is not None:
        lines.append(f"   smallest mesh that fits (micro-batch 1): {smallest.mesh} = {smallest.devices} devices,"
                     f" total {smallest.total / GB:.1f} GB")
    else:
        lines.append("   no mesh fits micro-batch 1")
    lines += [f"   warning: {w}" for w in p.warnings]
    return "\n".join(lines)


def compiled_bytes(stats: Any) -> float:
    """Per-device bytes of a compiled program's ``memory_analysis()``: arguments + outputs - aliased (the
    donated state) + temporaries."""
    return float(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                 + stats.temp_size_in_bytes)


def format_compiled(stats: Any, p: Plan, where: str, seconds: float) -> str:
    """The compiler's memory analysis of the real step beside the plan of the same mesh."""
    return (f"   compiled for {where} in {seconds:.0f} s, per device (GB): arguments "
            f"{stats.argument_size_in_bytes / GB:.2f}, outputs {stats.output_size_in_bytes / GB:.2f}, aliased "
            f"{stats.alias_size_in_bytes / GB:.2f}, temporaries {stats.temp_size_in_bytes / GB:.2f}: total "
            f"{compiled_bytes(stats) / GB:.2f} (planned {p.total / GB:.2f})")


def format_json(p: Plan, smallest: Plan | None) -> str:
    """One JSON line: ``Plan.row()`` plus ``smallest_mesh`` (``None`` when no mesh fits micro-batch 1)."""
    row = p.row()
    row["smallest_mesh"] = None if smallest is None else list(smallest.mesh)
    return json.dumps(row)


def run(configs: Sequence[tuple[str, Any]], devices: int, device_memory: float, mesh: tuple[int, int, int] | None,
        **kw) -> list[tuple[Plan, Plan | None]]:
    """``(plan, smallest)`` per ``(name, config)``: the plan on ``mesh`` (``None``: ``Planner.best`` on
    ``devices``) and the smallest mesh that fits micro-batch 1. ``kw`` goes to ``Planner.plan`` (``remat``
    ``None``: the config's). Raises ``ValueError`` when ``mesh`` does not have ``devices`` devices."""
    out = []
    remat_flag = kw.pop("remat", None)
    for name, config in configs:
        planner = Planner(config, name)
        # config.remat: "none", or a policy that recomputes (planned as "full": the dots policies keep more).
        kw["remat"] = remat_flag or ("none" if config.get("remat", "none") == "none" else "full")
        if mesh is not None:
            if math.prod(mesh) != devices:
                raise ValueError(f"--mesh {mesh} has {math.prod(mesh)} devices but --devices={devices}")
            plan = planner.plan(mesh, device_memory, **kw)
        else:
            plan = planner.best(devices, device_memory, **kw)
        out.append((plan, planner.smallest(device_memory, **kw)))
    return out


def paper_configs() -> list[tuple[str, Any]]:
    """``(name, config)`` of every stage at paper scale."""
    from configs import stage1, stage2, stage3, stage3b

    return [(m.__name__.split(".")[-1], m.get_config()) for m in (stage1, stage2, stage3, stage3b)]
