r"""Throughput benchmarks: the MMDiT training step, the VLM forward and a guided sampling step, with PyTorch beside.

``run(config, what, shape)`` makes the measurements of one ``what``, each a dict; the command
``python -m qk_jax.bench`` (``qk_jax/bench.py``) prints each as one JSON line::

  python -m qk_jax.bench --config configs/stage2.py:bench --what mmdit_train --batch 8 --image-tokens 1024 \
      --text-tokens 256 [--torch]

A measurement's fields:

- ``step_s``: the median wall time of ``--steps`` steps after ``--warmup`` untimed ones (the first compiles;
  each timed step ends with a wait for its outputs, so the figure is a device time plus one dispatch);
- ``images_per_s`` (``batch / step_s``), ``tokens_per_s`` (``batch x (image + text tokens) / step_s``);
- ``tflops``: *model* FLOPs per step over ``step_s``. The count is analytic (the planner's,
  ``qk_jax.parallel.planner.mmdit_matmul_flops``): every matmul of ``qk_jax.models.mmdit.MMDiT`` (q/k/v/out
  projections of both streams, FFNs, adaLN modulation, embedders, ``proj_out``) and the two attention matmuls,
  2 FLOPs per multiply-add; a training step is 3x the forward (backward = 2x forward). Rematerialisation's
  recomputation is not counted (MFU, not HFU), nor are elementwise ops, norms and the optimizer;
- ``mfu``: ``tflops`` over the device's dense bf16 peak (``PEAK_TFLOPS``; ``--peak-tflops`` overrides, and on a
  CPU there is none unless given);
- ``fwd_bwd_s``, ``fwd_bwd_mfu`` (``mmdit_train``): the same for the forward and backward alone, without the
  optimizer (at paper scale ZeRO shards the optimizer over 64-192 devices, a small share of each one's step);
- ``bytes_accessed``, ``fusions``, ``fp8_gemms`` (``mmdit_train``): the compiled step's memory traffic, fusion
  count and cuBLASLt fp8 GEMMs (``compiled_cost``), figures a CPU shows too;
- ``peak_memory_gb``: the device allocator's peak (GPU/TPU), or on CPU the compiled program's arguments +
  outputs + temporaries (``memory_analysis``), ``memory_source`` says which.
- ``profile`` (with ``--profile DIR``): three more JAX steps traced with ``jax.profiler`` into ``DIR/<what>``, and
  from that trace the device milliseconds per step in matmuls, attention, copies and other (XLA) fusions, and the
  top kernels (``summarize_trace``). ``device_ms_per_step`` below ``step_s`` is time the device sat idle.

What is measured (``--what``):

- ``mmdit_train``: ``config.mmdit`` in ``config.compute_dtype`` with ``config.remat``, float32 parameters,
  velocity MSE on the target tokens, ``optax.adamw``; parameters and optimizer state donated. ``--torch`` runs
  the same step on diffusers' ``FluxTransformer2DModel`` built from the same config (float32 parameters,
  ``torch.autocast`` bf16 when the compute dtype is bf16, fused AdamW, ``torch.compile``; gradient checkpointing
  when ``config.remat`` is not ``none``) on the same batch, and adds ``jax_over_torch`` (throughput ratio).
- ``sample``: one Euler step of three-branch classifier-free guidance: the MMDiT forward on ``3 x batch`` rows
  (the three branches batched, as ``qk_jax.sample`` does), combined and applied; ``--torch``: the same on diffusers.
- ``vlm_forward``: the Qwen2.5-VL LLM on ``--text-tokens`` text tokens plus ``config.vlm.num_queries`` kontext
  queries in ``config.vlm.frozen_dtype`` (the frozen VLM of stages 2-3; no images). FLOPs: 2 per weight per
  token for the decoder layers (the LM head is not run) plus the attention matmuls.

The ``bench`` variant of ``configs/stage2.py`` is the paper's MMDiT block (2560 wide, 40 heads x 64, FFN 10240,
2560-wide context) with 6 of its 42 layers: 1.4B parameters, a size whose training step fits one 80 GB GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import gzip
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qk_jax.models.mmdit import MMDiT, MMDiTConfig
from qk_jax.models.qwen_vl import QwenVL, QwenVLConfig
from qk_jax.parallel import planner

# Dense bf16 peak TFLOP/s by device kind (substring of ``jax.Device.device_kind``), from the vendors' sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}
WHAT = ("mmdit_train", "sample", "vlm_forward")


# ----------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------


def mmdit_forward_flops(cfg: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs of one ``MMDiT`` forward: ``planner.mmdit_matmul_flops`` (exact for every dense and the
    two attention matmuls; the planner's count, so that MFU here and time per step there agree)."""
    return sum(planner.mmdit_matmul_flops(cfg, batch, image_tokens, text_tokens).values())


def llm_forward_flops(vlm_text: Any, batch: int, tokens: int) -> int:
    """Matmul FLOPs of the Qwen2.5 LLM's decoder layers on ``tokens`` tokens (no LM head), causal attention
    counted in full (as the kernel computes it without block skipping)."""
    t = vlm_text
    d, q_dim, kv_dim = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = d * (q_dim + 2 * kv_dim) + q_dim * d + 3 * d * t.intermediate_size
    attention = 2 * tokens * tokens * q_dim
    return 2 * batch * t.num_hidden_layers * (per_token * tokens + attention)


# ----------------------------------------------------------------------------------------------------------
# Timing and reporting
# ----------------------------------------------------------------------------------------------------------


def time_steps(run: Callable[[], Any], warmup: int, steps: int, sync: Callable[[Any], Any]) -> tuple[list[float], float]:
    """``(timed step seconds, seconds of the first call)``: ``warmup`` untimed calls (the first compiles), then
    ``steps`` calls, each waited for with ``sync``."""
    t0 = time.perf_counter()
    sync(run())
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        sync(run())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - t0)
    return times, first


# Kernel-name patterns of the profile's categories, tried in order (cuDNN's fused attention kernels also say
# "wgmma", so attention comes before matmul); what matches none is an XLA fusion, a copy or a memset.
KERNEL_CATEGORIES = (
    ("attention", r"sdpa|fmha|flash|attention"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|wgmma|matmul|convolution|\bdot"),
    ("copy", r"memcpy|memset|copy"),
)


def trace_steps(run: Callable[[], Any], sync: Callable[[Any], Any], log_dir: str, steps: int = 3
                ) -> dict[str, Any]:
    """Profile ``steps`` more calls with ``jax.profiler`` into ``log_dir`` (TensorBoard/XProf and Perfetto can
    open it) and return ``summarize_trace`` of it."""
    with jax.profiler.trace(log_dir):
        for _ in range(steps):
            sync(run())
    return summarize_trace(log_dir, steps)


def _profiled(run: Callable[[], Any], profile_dir: str | None) -> dict[str, Any]:
    """``{"profile": trace_steps(...)}`` for a JAX measurement's line when ``--profile`` is given, else ``{}``."""
    return {"profile": trace_steps(run, jax.block_until_ready, profile_dir)} if profile_dir else {}


def summarize_trace(log_dir: str, steps: int, top: int = 12) -> dict[str, Any]:
    """Device time per step by kernel category and the ``top`` kernels, from the newest ``*.trace.json.gz`` that
    ``jax.profiler`` wrote under ``log_dir`` (Chrome trace events). Kernels are the complete events on a
    ``/device:`` process's ``Stream`` threads (GPU; XLA's own "XLA Ops" thread repeats them at op level, so it
    is read only where there are no streams, as on a TPU). On a CPU there is no device process: ``{}``.

    Written here because XProf's converters need TensorFlow-side tooling that our install does not have, and the
    Chrome trace that the profiler already writes holds what we need."""
    paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")),
                   key=os.path.getmtime)
    if not paths:
        return {}
    with gzip.open(paths[-1], "rt") as f:
        events = json.load(f)["traceEvents"]
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and str(e["args"].get("name", "")).startswith("/device:")}
    threads = {(e["pid"], e["tid"]): str(e["args"].get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in devices}
    streams = {k for k, name in threads.items() if name.startswith("Stream")}
    chosen = streams or {k for k, name in threads.items() if name == "XLA Ops"}
    kernels = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e.get("tid")) in chosen:
            kernels[e["name"]] += float(e.get("dur", 0.0))  # microseconds
    if not kernels:
        return {}
    busy = sum(kernels.values())
    categories = collections.Counter()
    for name, us in kernels.items():
        category = next((c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.I)), "other")
        categories[category] += us
    ms = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
    return dict(device_ms_per_step=ms(busy),
                categories_ms={c: ms(us) for c, us in categories.most_common()},
                top_kernels=[dict(name=name[:120], ms=ms(us), share=round(us / busy, 4))
                             for name, us in kernels.most_common(top)])


def peak_tflops(device: Any, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def report(*, what: str, framework: str, times: list[float], first_s: float, batch: int, tokens: int, flops: int,
           peak: float | None, memory_gb: float | None, memory_source: str, device: str, **extra) -> dict[str, Any]:
    """One measurement as a JSON-able dict (see the module docstring for the fields)."""
    step = statistics.median(times)
    tflops = flops / step / 1e12
    return dict(what=what, framework=framework, device=device, batch=batch, step_s=round(step, 6),
                step_s_min=round(min(times), 6), first_call_s=round(first_s, 3), steps=len(times),
                images_per_s=round(batch / step, 3), tokens_per_s=round(batch * tokens / step, 1),
                flops_per_step=flops, tflops=round(tflops, 3),
                mfu=None if not peak else round(tflops / peak, 4), peak_tflops=peak,
                peak_memory_gb=None if memory_gb is None else round(memory_gb, 3), memory_source=memory_source,
                **extra)


def _jax_memory_gb(compiled: Any) -> tuple[float | None, str]:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None, "none"
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)
    return total / 2**30, "compiled"


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    image_tokens: int
    text_tokens: int


def mmdit_inputs(cfg: MMDiTConfig, shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch for ``MMDiT``: noisy target tokens on a near-square grid with (0, r, c) ids, a context of
    ``text_tokens`` at (0, 0, 0), timesteps, the pooled vector and a target velocity (float32 numpy)."""
    rng = np.random.default_rng(seed)
    b, s, l = shape.batch, shape.image_tokens, shape.text_tokens
    h = int(math.sqrt(s))
    while s % h:
        h -= 1
    rows, cols = np.meshgrid(np.arange(h), np.arange(s // h), indexing="ij")
    img_ids = np.stack([np.zeros(s), rows.reshape(-1), cols.reshape(-1)], -1).astype(np.int32)
    normal = lambda *dims: rng.standard_normal(dims, dtype=np.float32)  # noqa: E731
    return dict(
        hidden_states=normal(b, s, cfg.in_channels),
        img_ids=img_ids,  # [S, 3]: one grid for the batch (diffusers takes 2-D ids)
        encoder_hidden_states=normal(b, l, cfg.joint_attention_dim),
        txt_ids=np.zeros((l, 3), np.int32),
        timestep=rng.uniform(size=(b,)).astype(np.float32),
        pooled_projections=normal(b, cfg.pooled_projection_dim),
        target=normal(b, s, cfg.output_dim),
    )


# ----------------------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _normal_fn(shape: tuple[int, ...], dtype: str) -> Callable[[Any], Any]:
    return jax.jit(lambda key: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))


def _random_params(abstract: Any, dtype: Any | None, seed: int) -> Any:
    """Normal(0, 0.02) params of the abstract tree's shapes, made on the device (random values: matmul units
    run faster on zeros). ``dtype`` overrides the leaves' dtype. One small program per distinct shape: one
    program for the whole tree (a random op per leaf, or one vector split into the leaves) took minutes to
    compile on an H100 for the unrolled 6-layer MMDiT."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([_normal_fn(tuple(x.shape), jnp.dtype(dtype or x.dtype).name)(k)
                              for x, k in zip(leaves, keys)])


def _mmdit(config: Mapping[str, Any]) -> tuple[MMDiTConfig, MMDiT]:
    mmdit = dict(config["mmdit"])
    mmdit.pop("lora", None)
    cfg = MMDiTConfig.from_config(mmdit)
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    return cfg, MMDiT(cfg, dtype=dtype, remat=str(config.get("remat", "none")),
                      scan_layers=bool(config.get("scan_layers", False)), fp8=bool(config.get("fp8", False)))


def jax_mmdit_train(config: Mapping[str, Any], shape: Shape, warmup: int, steps: int, peak: float | None,
                    profile_dir: str | None = None) -> dict[str, Any]:
    cfg, model = _mmdit(config)
    data = {k: jnp.asarray(v) for k, v in mmdit_inputs(cfg, shape).items()}
    target = data.pop("target")
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), **data))["params"]
    params = _random_params(abstract, jnp.float32, 0)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p, data, target):
        v = model.apply({"params": p}, **data)
        return jnp.mean(jnp.square(v.astype(jnp.float32) - target))

    def step(params, opt_state, data, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, data, target)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, data, target).compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], data, target)
        return loss

    times, first = time_steps(run, warmup, steps, jax.block_until_ready)
    memory, source = _jax_memory_gb(compiled)
    flops = 3 * mmdit_forward_flops(cfg, shape.batch, shape.image_tokens, shape.text_tokens)
    profile = _profiled(run, profile_dir)
    # The forward and backward alone: at paper scale ZeRO shards the optimizer 64-192 ways, so the update's share
    # of a one-device step (12 ms of 130 at batch 16 on an H200) over-weights it.
    grads = jax.jit(jax.value_and_grad(loss_fn)).lower(state[0], data, target).compile()
    grad_times, _ = time_steps(lambda: grads(state[0], data, target), warmup, steps, jax.block_until_ready)
    grad_s = statistics.median(grad_times)
    return report(what="mmdit_train", framework="jax", times=times, first_s=first, batch=shape.batch,
                  tokens=shape.image_tokens + shape.text_tokens, flops=flops, peak=peak, memory_gb=memory,
                  memory_source=source, device=_jax_device(), params=_count(params), remat=model.remat,
                  scan_layers=model.scan_layers, dtype=str(jnp.dtype(model.dtype)), fp8=model.fp8,
                  compile_s=round(compile_s, 2), attention=attention_kernel(compiled),
                  fwd_bwd_s=round(grad_s, 6), fwd_bwd_mfu=None if not peak else round(flops / grad_s / 1e12 / peak, 4),
                  **compiled_cost(compiled), **profile)


def guidance_scales(config: Mapping[str, Any]) -> tuple[float, float]:
    """``(cfg_text, cfg_image)`` of the config's ``sample`` block, the one home of the guidance scales."""
    if "sample" not in config:
        raise ValueError("the config has no sample block (sample.cfg_text, sample.cfg_image): give a stage config"
                         " built on configs/common.py, e.g. configs/stage2.py:bench")
    return float(config["sample"]["cfg_text"]), float(config["sample"]["cfg_image"])


def _guided_velocity(v: Any, batch: int, cfg_text: float, cfg_image: float) -> Any:
    """Three-branch guidance on rows ``[(I,T); (I,0); (0,0)]``: ``v00 + s_img (vI0 - v00) + s_txt (vIT - vI0)``."""
    v_it, v_i0, v_00 = v[:batch], v[batch:2 * batch], v[2 * batch:]
    return v_00 + cfg_image * (v_i0 - v_00) + cfg_text * (v_it - v_i0)


def jax_sample(config: Mapping[str, Any], shape: Shape, warmup: int, steps: int, peak: float | None,
               profile_dir: str | None = None) -> dict[str, Any]:
    cfg, model = _mmdit(config)
    wide = dataclasses.replace(shape, batch=3 * shape.batch)
    data = {k: jnp.asarray(v) for k, v in mmdit_inputs(cfg, wide).items()}
    data.pop("target")
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), **data))["params"]
    params = _random_params(abstract, model.dtype, 0)  # inference: parameters in the compute dtype
    cfg_text, cfg_image = guidance_scales(config)
    b = shape.batch

    def step(params, x, data, dt):
        rows = dict(data, hidden_states=jnp.concatenate([x] * 3).astype(model.dtype))
        v = model.apply({"params": params}, **rows).astype(jnp.float32)
        return x + dt * _guided_velocity(v, b, cfg_text, cfg_image)

    x = data["hidden_states"][:b]
    compiled = jax.jit(step, donate_argnums=1).lower(params, x, data, -0.05).compile()
    state = [x]

    def run():
        state[0] = compiled(params, state[0], data, -0.05)
        return state[0]

    times, first = time_steps(run, warmup, steps, jax.block_until_ready)
    memory, source = _jax_memory_gb(compiled)
    flops = mmdit_forward_flops(cfg, wide.batch, shape.image_tokens, shape.text_tokens)
    return report(what="sample", framework="jax", times=times, first_s=first, batch=b,
                  tokens=shape.image_tokens + shape.text_tokens, flops=flops, peak=peak, memory_gb=memory,
                  memory_source=source, device=_jax_device(), params=_count(params), dtype=str(jnp.dtype(model.dtype)),
                  attention=attention_kernel(compiled), note="one Euler step, three guidance branches batched",
                  **_profiled(run, profile_dir))


def jax_vlm_forward(config: Mapping[str, Any], shape: Shape, warmup: int, steps: int, peak: float | None,
                    profile_dir: str | None = None) -> dict[str, Any]:
    dtype = jnp.dtype(config["vlm"].get("frozen_dtype", config.get("compute_dtype", "float32")))
    vlm_cfg = QwenVLConfig.from_config(config["vlm"], dtype=dtype)
    model = QwenVL(vlm_cfg)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, min(1000, vlm_cfg.text.vocab_size), (shape.batch, shape.text_tokens)),
                      jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids[:1, :4], mask[:1, :4]))["params"]
    params = _random_params(abstract, dtype, 0)

    def forward(params, ids, mask):
        return model.apply({"params": params}, ids, mask).hidden_states

    compiled = jax.jit(forward).lower(params, ids, mask).compile()
    run = lambda: compiled(params, ids, mask)  # noqa: E731
    times, first = time_steps(run, warmup, steps, jax.block_until_ready)
    memory, source = _jax_memory_gb(compiled)
    tokens = shape.text_tokens + vlm_cfg.num_queries
    flops = llm_forward_flops(vlm_cfg.text, shape.batch, tokens)
    return report(what="vlm_forward", framework="jax", times=times, first_s=first, batch=shape.batch, tokens=tokens,
                  flops=flops, peak=peak, memory_gb=memory, memory_source=source, device=_jax_device(),
                  params=_count(params), dtype=str(dtype), **_profiled(run, profile_dir))


def compiled_cost(compiled: Any) -> dict[str, Any]:
    """What the compiled step does, visible on any backend: XLA's ``cost_analysis`` bytes accessed (operands read
    and results written, summed over its ops: the memory traffic that fusion removes), the number of fusions (one
    kernel each on a GPU), and ``fp8_gemms``, the cuBLASLt fp8 GEMMs XLA:GPU made of ``qk_jax.ops.fp8``'s
    dequantise-then-dot (0 elsewhere: there the dots run in the compute dtype)."""
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(bytes_accessed=int(cost.get("bytes accessed", 0)) if cost else None,
                fusions=len(re.findall(r"\sfusion\(", text)),
                fp8_gemms=len(re.findall(r"__cublas\$lt\$matmul\$f8", text)))


def attention_kernel(compiled: Any) -> str:
    """``"cudnn"`` when the compiled program calls cuDNN's fused attention, else ``"xla"``."""
    return "cudnn" if "cudnn$fmha" in compiled.as_text() else "xla"


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _jax_device() -> str:
    d = jax.local_devices()[0]
    return f"{d.platform}:{d.device_kind}"


# ----------------------------------------------------------------------------------------------------------
# PyTorch (diffusers), for the side-by-side figure
# ----------------------------------------------------------------------------------------------------------


def torch_mmdit(config: Mapping[str, Any], shape: Shape, warmup: int, steps: int, peak: float | None, *,
                train: bool, compile_model: bool) -> dict[str, Any]:
    """The same step on diffusers' ``FluxTransformer2DModel`` (see the module docstring)."""
    import torch
    from diffusers import FluxTransformer2DModel

    cfg, model_jax = _mmdit(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = jnp.dtype(model_jax.dtype) == jnp.bfloat16
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg.to_diffusers_config()).to(device)
    rows = shape if train else dataclasses.replace(shape, batch=3 * shape.batch)
    data = {k: torch.from_numpy(v).to(device) for k, v in mmdit_inputs(cfg, rows).items()}
    target = data.pop("target")
    if train:
        model.train()
        if model_jax.remat != "none":
            model.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device == "cuda")
    else:
        model.eval().requires_grad_(False)
        if bf16:  # a bf16 model takes bf16 activations (the ids stay as they are: RoPE reads them in float)
            model = model.to(torch.bfloat16)
            for name in ("encoder_hidden_states", "pooled_projections", "timestep"):
                data[name] = data[name].to(torch.bfloat16)
    forward = torch.compile(model) if compile_model else model
    cfg_text, cfg_image = guidance_scales(config)
    x = [data["hidden_states"][:shape.batch].clone()]

    def run():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16 and train):
            inputs = dict(data)
            if not train:
                inputs["hidden_states"] = torch.cat([x[0]] * 3).to(next(model.parameters()).dtype)
            out = forward(**inputs, return_dict=False)[0]
        if not train:
            x[0] = x[0] - 0.05 * _guided_velocity(out.float(), shape.batch, cfg_text, cfg_image)
            return x[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.set_grad_enabled(train):
        times, first = time_steps(run, warmup, steps, sync)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    forward_flops = mmdit_forward_flops(cfg, rows.batch, shape.image_tokens, shape.text_tokens)
    return report(what="mmdit_train" if train else "sample", framework="torch", times=times, first_s=first,
                  batch=shape.batch, tokens=shape.image_tokens + shape.text_tokens,
                  flops=3 * forward_flops if train else forward_flops, peak=peak, memory_gb=memory,
                  memory_source="device" if memory is not None else "none",
                  device=f"{device}:{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}",
                  torch=torch.__version__, compiled=compile_model, autocast_bf16=bf16 and train,
                  gradient_checkpointing=train and model_jax.remat != "none")


# ----------------------------------------------------------------------------------------------------------
# One --what
# ----------------------------------------------------------------------------------------------------------


def run(config: Mapping[str, Any], what: str, shape: Shape, *, warmup: int = 3, steps: int = 20,
        with_torch: bool = False, torch_compile: bool = True, peak: float | None = None,
        profile_dir: str | None = None) -> list[dict[str, Any]]:
    """The measurements of one ``--what``: JAX's, then PyTorch's when asked and defined for it.

    PyTorch runs first and hands its cached blocks back to the driver before JAX starts: JAX's allocator keeps
    what it took until the process ends, so the other order would leave PyTorch with what JAX did not use."""
    device_peak = peak_tflops(jax.local_devices()[0], peak)
    theirs = None
    if with_torch and what != "vlm_forward":
        import torch

        torch_peak = device_peak if torch.cuda.is_available() == (jax.default_backend() == "gpu") else peak
        theirs = torch_mmdit(config, shape, warmup, steps, torch_peak, train=what == "mmdit_train",
                             compile_model=torch_compile)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    jax_fn = dict(mmdit_train=jax_mmdit_train, sample=jax_sample, vlm_forward=jax_vlm_forward)[what]
    ours = jax_fn(config, shape, warmup, steps, device_peak,
                  profile_dir=profile_dir and os.path.join(profile_dir, what))
    if theirs is None:
        return [ours]
    theirs["jax_over_torch"] = round(theirs["step_s"] / ours["step_s"], 3)
    return [ours, theirs]
