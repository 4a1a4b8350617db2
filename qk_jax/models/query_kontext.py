"""The assembled Query-Kontext model (paper section 3.1, figure 2): pure functions over one params pytree.

``params = {'vlm': ..., 'connector': ..., 'mmdit': ..., 'vae': ...}``; each entry is the params of one linen
module (``QwenVL``, ``Connector``, ``MMDiT``, ``AutoencoderKL``), so freezing, LoRA merging, sharding and
conversion work per component on plain pytrees. ``QueryKontext`` holds the module definitions and wires them:

::

    prompt + images ─► QwenVL ─► T (text states), Q (K kontext states) ─► Connector ─► context [T'; Q'], pooled
    target ─► VAE ─► x_0 ─► x_t = (1 - t) x_0 + t noise ─┐
    source / reference images ─► VAE (stage 3) ──────────┴► image stream, sRoPE order and ids ─► MMDiT ─► v(x_t)

The image stream of a sample is its noisy target plus ``M`` in-context slots (``roles`` ``[B, M]``, the codes of
``qk_jax.ops.rope``), ordered as the paper does: ``concat(src, noise)`` for editing, ``concat(noise, ref_1..N)``
for customization and multi-subject, ``concat(src, noise, ref_1..N)`` for subject editing; empty slots (no
input, or an image dropped for guidance) are padding that attention masks out. One compiled step serves a batch
that mixes tasks: the order and ids are computed per sample (``rope.in_context_layout``).

Stage switches come from the config (``QueryKontextConfig.from_config``): the MMDiT config (stage 1's light head
or the large one) and its LoRA, the VLM's LoRA, ``in_context`` (stage 3: VAE latents of input images enter the
image stream; before, input images reach the VLM only). Ablations: ``conditioning`` (table 9: text + queries,
text only, queries only) and ``placement`` (table 8: every in-context image as the task says, all as
references, or all as sources).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.data.tasks import TASKS
from qk_jax.models import vae as vae_lib
from qk_jax.models.connector import CONDITIONING_MODES, Connector, ConnectorConfig, ConnectorOutput
from qk_jax.models.lora import LoRAConfig
from qk_jax.models.mmdit import REMAT_POLICIES, MMDiT, MMDiTConfig
from qk_jax.models.mmdit import init_inputs as mmdit_init_inputs
from qk_jax.models.qwen_vl import QwenVL, QwenVLConfig
from qk_jax.models.qwen_vl import init_inputs as vlm_init_inputs
from qk_jax.ops import flow, rope
from qk_jax.parallel import mesh as mesh_lib

PLACEMENTS = ("task", "reference", "source")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """``config.flow``: logit-normal timesteps shifted by FLUX's resolution-dependent ``mu``. No defaults here:
    the values' one home is the config (configs/common.py)."""

    mean: float
    std: float
    base_seq_len: int
    max_seq_len: int
    base_shift: float
    max_shift: float

    @classmethod
    def from_config(cls, block: Any) -> FlowConfig:
        block = dict(block or {})
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in block]
        if missing:
            raise ValueError(f"config.flow has no {', '.join(missing)}; give the flow block of configs/common.py")
        return cls(**{name: block[name] for name in names})

    def shift_kwargs(self) -> dict[str, Any]:
        return dict(base_seq_len=self.base_seq_len, max_seq_len=self.max_seq_len, base_shift=self.base_shift,
                    max_shift=self.max_shift)


@dataclasses.dataclass(frozen=True)
class QueryKontextConfig:
    """Everything the model needs from a stage config."""

    vlm: QwenVLConfig
    connector: ConnectorConfig
    mmdit: MMDiTConfig
    mmdit_lora: LoRAConfig
    vae: vae_lib.VAEConfig
    flow: FlowConfig
    in_context: bool = False
    max_references: int = 2
    conditioning: str = "text_and_queries"
    placement: str = "task"
    source_offset: str = "negate"  # a source image's sRoPE ids: the paper's (0, -r, -c) or Kontext's (1, r, c)
    compute_dtype: Any = jnp.float32
    remat: str = "none"  # the MMDiT blocks' policy, ``mmdit.REMAT_POLICIES``
    scan_layers: bool = False  # the MMDiT's blocks as one nn.scan each (layer-stacked params)
    adaln_zero: bool = False  # the MMDiT's init for training from scratch (``MMDiT.adaln_zero``)
    fp8: bool = False  # the MMDiT blocks' projections in float8 (``MMDiT.fp8``; a deviation from bf16, opt-in)
    # The guidance-embedding input of an MMDiT that has one (FLUX.1-dev's, distilled from CFG), the same constant in
    # training and sampling: real classifier-free guidance does the guiding, so 1.0 asks the embedding for none.
    distilled_guidance: float = 1.0
    # Mesh axes (automatic ones: 'tensor') that the MMDiT's rows are split over besides the data axes
    # (``parallel.mesh.split_rows``); () repeats the MMDiT's work on every device of a tensor group.
    mmdit_rows_over: tuple[str, ...] = ()

    def __post_init__(self):
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"config.conditioning={self.conditioning!r}; expected one of {CONDITIONING_MODES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.source_offset not in rope.SOURCE_OFFSETS:
            raise ValueError(f"config.source_offset={self.source_offset!r}; expected one of {rope.SOURCE_OFFSETS}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"config.placement={self.placement!r}; expected one of {PLACEMENTS}")
        if self.connector.in_features != self.vlm.text.hidden_size:
            raise ValueError(f"connector.in_features={self.connector.in_features} but the VLM is"
                             f" {self.vlm.text.hidden_size} wide")
        if self.connector.out_features != self.mmdit.joint_attention_dim:
            raise ValueError(f"connector.out_features={self.connector.out_features} but the MMDiT's context is"
                             f" {self.mmdit.joint_attention_dim} wide (joint_attention_dim)")
        if self.connector.pooled_width != self.mmdit.pooled_projection_dim:
            raise ValueError(f"the connector pools at width {self.connector.pooled_width} but the MMDiT's"
                             f" pooled_projection_dim is {self.mmdit.pooled_projection_dim}; set"
                             f" config.connector.pooled_features={self.mmdit.pooled_projection_dim}")
        if self.mmdit.in_channels != 4 * self.vae.latent_channels:
            raise ValueError(f"mmdit.in_channels={self.mmdit.in_channels} but 2x2-packed VAE latents have"
                             f" {4 * self.vae.latent_channels} channels")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QueryKontextConfig:
        """From a stage config (``configs/stageN.py``)."""
        compute = jnp.dtype(config.get("compute_dtype", "float32"))
        mmdit = dict(config["mmdit"])
        lora_block = mmdit.pop("lora", None)
        mmdit_lora = LoRAConfig.from_config(lora_block) if lora_block and lora_block["rank"] else LoRAConfig()
        return cls(
            vlm=QwenVLConfig.from_config(config["vlm"], dtype=compute),
            connector=ConnectorConfig.from_config(config["connector"]),
            mmdit=MMDiTConfig.from_config(mmdit),
            mmdit_lora=mmdit_lora,
            vae=vae_lib.VAEConfig.from_config(config["vae"]),
            in_context=bool(config.get("in_context", False)),
            max_references=int(config.get("max_references", 2)),
            conditioning=str(config.get("conditioning", "text_and_queries")),
            placement=str(config.get("placement", "task")),
            source_offset=str(config.get("source_offset", "negate")),
            flow=FlowConfig.from_config(config.get("flow")),
            compute_dtype=compute,
            remat=str(config.get("remat", "none")),
            scan_layers=bool(config.get("scan_layers", False)),
            adaln_zero=bool(config.get("adaln_zero", False)),
            fp8=bool(config.get("fp8", False)),
            distilled_guidance=float(config.get("distilled_guidance", 1.0)),
            mmdit_rows_over=tuple((config.get("sharding") or {}).get("mmdit_rows_over", ())),
        )


class BatchRows(NamedTuple):
    """A shard of a global batch: its first row's index there (traced: a device's place on the mesh) and the
    global batch size."""

    offset: jax.Array | int
    global_batch: int


def draw_rows(draw: Callable[[tuple[int, ...]], jax.Array], shape: tuple[int, ...],
              rows: BatchRows | None = None) -> jax.Array:
    """``draw(shape)`` (a random draw of leading dim the batch); for a shard (``rows``), its rows of the global
    batch's draw, so that a sample's noise is the same however the batch is split over devices (the
    data-parallel step, ``qk_jax.parallel.zero``, runs the loss on each shard)."""
    if rows is None:
        return draw(tuple(shape))
    full = draw((rows.global_batch,) + tuple(shape[1:]))
    return jax.lax.dynamic_slice_in_dim(full, rows.offset, shape[0], axis=0)


class LossAux(NamedTuple):
    """Per-step diagnostics: summed per-sample losses and sample counts per task (index into ``TASKS``)."""

    task_loss_sum: jax.Array  # float32 [len(TASKS)]
    task_count: jax.Array  # float32 [len(TASKS)]


def vlm_image_grid(batch: Mapping[str, Any], patch_dim: int | None = None) -> tuple[tuple[int, int, int], ...]:
    """The static ``image_grid_thw`` of one row of a bucketed batch (every sample's ``M`` image slots share
    the bucket's grid), read on the host: jit the step with it as a static argument, one compile per bucket."""
    grid = np.asarray(batch["image_grid_thw"])
    if grid.size == 0:
        return ()
    if not (grid == grid[:1]).all():
        raise ValueError("image_grid_thw differs between samples of one batch: batches must come from one bucket")
    return tuple(tuple(int(v) for v in g) for g in grid[0])


class QueryKontext:
    """VLM -> connector -> MMDiT, with VAE latents of the target and the in-context images; see the module doc."""

    def __init__(self, config: QueryKontextConfig):
        self.config = config
        dtype = config.compute_dtype
        self.vlm = QwenVL(config.vlm)
        self.connector = Connector(config.connector, dtype=dtype)
        self.mmdit = MMDiT(config.mmdit, lora=config.mmdit_lora, dtype=dtype, remat=config.remat,
                           scan_layers=config.scan_layers, adaln_zero=config.adaln_zero, fp8=config.fp8)
        self.vae = vae_lib.AutoencoderKL(config.vae)

    # ------------------------------------------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------------------------------------------

    def _inits(self):
        """``{component: (module, init kwargs)}`` with the smallest inputs that create every parameter."""
        f = self.config.vae.downsample_factor
        return dict(
            vlm=(self.vlm, vlm_init_inputs(self.config.vlm)),
            connector=(self.connector, dict(text=jnp.zeros((1, 1, self.config.connector.in_features)),
                                            queries=jnp.zeros((1, 1, self.config.connector.in_features)))),
            mmdit=(self.mmdit, mmdit_init_inputs(self.config.mmdit)),
            vae=(self.vae, dict(images=jnp.zeros((1, f, f, self.config.vae.in_channels)))),
        )

    def abstract_params(self) -> dict[str, Any]:
        """Boxed ``ShapeDtypeStruct`` params of every component (logical axis names kept); allocates nothing."""
        return {name: jax.eval_shape(lambda m=m, kw=kw: m.init(jax.random.key(0), **kw))["params"]
                for name, (m, kw) in self._inits().items()}

    def init(self, rng: jax.Array, components: tuple[str, ...] = ("vlm", "connector", "mmdit", "vae")
             ) -> dict[str, Any]:
        """Random (unboxed) params of the named components; a stage replaces some by imported weights."""
        inits = self._inits()
        keys = dict(zip(inits, jax.random.split(rng, len(inits))))
        return {name: nn.meta.unbox(jax.jit(lambda k, m=inits[name][0], kw=inits[name][1]: m.init(k, **kw))(
            keys[name])["params"]) for name in components}

    # ------------------------------------------------------------------------------------------------------
    # The pieces of a forward pass
    # ------------------------------------------------------------------------------------------------------

    def condition(
        self,
        params: Mapping[str, Any],
        input_ids: jax.Array,  # int32 [B, S]
        attention_mask: jax.Array,  # [B, S]
        pixel_values: jax.Array | None = None,  # [B, M, P, D] in prompt order
        image_grid: tuple[tuple[int, int, int], ...] = (),  # static: one row's M grids
        image_present: jax.Array | None = None,  # bool [B, M]
    ) -> ConnectorOutput:
        """VLM (once per sample) -> T, Q -> connector: the MMDiT's context, its mask and the pooled vector."""
        if pixel_values is not None and pixel_values.shape[1] == 0:
            pixel_values = None
        if pixel_values is not None:
            b, m, p, d = pixel_values.shape
            pixel_values = pixel_values.reshape(b, m * p, d)  # one row per sample, M images each
        out = self.vlm.apply({"params": params["vlm"]}, input_ids, attention_mask, pixel_values,
                             image_grid if pixel_values is not None else None,
                             image_present=image_present if pixel_values is not None else None)
        prompt_len = input_ids.shape[1]
        text = out.hidden_states[:, :prompt_len]
        queries = out.hidden_states[:, prompt_len:]
        return self.connector.apply({"params": params["connector"]}, text, queries,
                                    out.text_mask[:, :prompt_len], self.config.conditioning)

    def encode(self, params: Mapping[str, Any], images: jax.Array, key: jax.Array | None = None,
               rows: BatchRows | None = None) -> jax.Array:
        """Images ``[N, H, W, 3]`` in [-1, 1] -> packed, normalised latent tokens ``[N, (h/2)(w/2), 4C]``.

        With ``key`` the latent is a posterior sample (the training target; ``rows``: see ``draw_rows``), else the
        posterior mean (in-context images, and every input at sampling time).
        """
        mean, logvar = self.vae.apply({"params": params["vae"]}, images, method=self.vae.encode)
        eps = None if key is None else draw_rows(lambda shape: jax.random.normal(key, shape, jnp.float32),
                                                 mean.shape, rows)
        latents = vae_lib.latents_from_posterior(mean, logvar, eps=eps)
        return vae_lib.pack_latents(vae_lib.scale_latents(latents, self.config.vae))

    def place(self, roles: jax.Array) -> jax.Array:
        """Table 8's placement ablation applied to slot roles: ``'task'`` keeps them; ``'reference'`` /
        ``'source'`` place every in-context image as a reference / a source (one per sample at most)."""
        roles = jnp.asarray(roles, jnp.int32)
        if self.config.placement == "task":
            return roles
        new = rope.REFERENCE if self.config.placement == "reference" else rope.SOURCE
        return jnp.where(roles == rope.NONE, rope.NONE, new)

    def velocity(
        self,
        params: Mapping[str, Any],
        cond: ConnectorOutput,
        noisy: jax.Array,  # [B, T, 4C] packed noisy target tokens
        t: jax.Array,  # [B] in [0, 1]
        latent_hw: tuple[int, int],  # static (h, w) of the packed token grid
        in_context: jax.Array | None = None,  # [B, M, T, 4C] packed in-context latents
        roles: jax.Array | None = None,  # int32 [B, M]
    ) -> jax.Array:
        """The MMDiT's velocity for the target tokens only, ``[B, T, 4C]``."""
        return self._run_mmdit(params, cond, noisy, t, latent_hw, in_context, roles)[0]

    def velocity_with_attention(
        self, params: Mapping[str, Any], cond: ConnectorOutput, noisy: jax.Array, t: jax.Array,
        latent_hw: tuple[int, int], in_context: jax.Array | None = None, roles: jax.Array | None = None,
    ) -> tuple[jax.Array, rope.Layout, dict[str, Any]]:
        """``velocity``, the image stream's ``rope.Layout`` and what every MMDiT attention sowed (its post-RoPE
        ``query``/``key``, ``value`` and ``output`` over ``[text; image stream]``), for ``qk_jax.diagnose``.
        Needs a model built with ``remat='none'`` and ``scan_layers=False``."""
        if self.config.remat != "none" or self.config.scan_layers:
            raise ValueError("velocity_with_attention needs remat='none' and scan_layers=False (it reads the sown "
                             f"attentions); got remat={self.config.remat!r}, scan_layers={self.config.scan_layers}")
        (v, state), layout = self._run_mmdit(params, cond, noisy, t, latent_hw, in_context, roles,
                                             mutable=["intermediates"])
        return v, layout, state["intermediates"]

    def _run_mmdit(self, params, cond, noisy, t, latent_hw, in_context, roles, **apply_kwargs):
        """The MMDiT on ``[target; in-context]`` in sRoPE order: ``(its apply's result, the layout)``."""
        batch, tokens, channels = noisy.shape
        h, w = latent_hw
        if h * w != tokens:
            raise ValueError(f"latent grid {h}x{w} does not hold the {tokens} target tokens")
        if in_context is None or in_context.shape[1] == 0:
            in_context = jnp.zeros((batch, 0, tokens, channels), noisy.dtype)
            roles = jnp.zeros((batch, 0), jnp.int32)
        roles = self.place(roles)
        layout = rope.in_context_layout(h, w, roles, self.config.source_offset)
        blocks = jnp.concatenate([noisy[:, None].astype(in_context.dtype), in_context], axis=1)
        stream = rope.gather_blocks(blocks.reshape(batch, -1, channels), layout.order)
        target_start = jnp.argmax(layout.order == 0, axis=1).astype(jnp.int32) * tokens
        out = self.mmdit.apply(
            {"params": params["mmdit"]}, stream, layout.ids, cond.context, rope.text_position_ids(cond.context.shape[1]),
            t, cond.pooled, guidance=self._guidance(batch), text_mask=cond.context_mask,
            image_mask=layout.kind != rope.KIND_PAD, target_start=target_start, target_len=tokens, **apply_kwargs)
        return out, layout

    def _guidance(self, batch: int) -> jax.Array | None:
        """``[B]`` of ``config.distilled_guidance`` for an MMDiT with a guidance embedding; None without one."""
        if not self.config.mmdit.guidance_embeds:
            return None
        return jnp.full((batch,), self.config.distilled_guidance, jnp.float32)

    # ------------------------------------------------------------------------------------------------------
    # Training loss
    # ------------------------------------------------------------------------------------------------------

    def loss(
        self, params: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array,
        image_grid: tuple[tuple[int, int, int], ...] = (), rows: BatchRows | None = None,
    ) -> tuple[jax.Array, LossAux]:
        """Flow-matching loss of a bucketed batch (``qk_jax.data.pipeline``'s schema), and per-task sums.

        The VLM runs once per sample; the VAE encodes the target (a posterior sample) and, when the stage has
        in-context inputs, every slot (the posterior mean; empty slots are masked out of attention). Padding
        rows of a partial batch (``valid`` False) carry no loss. ``rows``: ``batch`` is these rows of a global
        batch, and the noise, timesteps and posterior samples are that batch's (``draw_rows``).
        """
        key_t, key_noise, key_vae = jax.random.split(rng, 3)
        target = batch["target"]  # [B, H, W, 3]
        batch_size = target.shape[0]
        cond = self.condition(params, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                              image_grid, batch.get("image_present"))

        x0 = self.encode(params, target, key_vae, rows)  # [B, T, 4C]
        f = 2 * self.config.vae.downsample_factor
        latent_hw = (target.shape[1] // f, target.shape[2] // f)
        in_context, roles = None, None
        if self.config.in_context and "inputs" in batch and batch["inputs"].shape[1]:
            inputs = batch["inputs"]  # [B, M, H, W, 3]
            m = inputs.shape[1]
            in_context = self.encode(params, inputs.reshape((-1,) + inputs.shape[2:])).reshape(
                (batch_size, m) + x0.shape[1:])
            roles = batch["roles"]

        tokens = x0.shape[1]
        t = draw_rows(lambda shape: flow.sample_training_timesteps(
            key_t, shape[0], tokens, mean=self.config.flow.mean, std=self.config.flow.std,
            **self.config.flow.shift_kwargs()), (batch_size,), rows)
        noise = draw_rows(lambda shape: jax.random.normal(key_noise, shape, jnp.float32), x0.shape,
                          rows).astype(x0.dtype)
        x_t = flow.interpolate(x0, noise, t)
        if self.config.mmdit_rows_over:  # the MMDiT's rows over 'tensor' too: no work repeated across the VLM's TP
            cond, x_t, t, in_context, roles, x0, noise = jax.tree.map(
                lambda x: mesh_lib.split_rows(x, self.config.mmdit_rows_over), (cond, x_t, t, in_context, roles, x0,
                                                                                noise))
        v = self.velocity(params, cond, x_t, t, latent_hw, in_context, roles)

        valid = jnp.asarray(batch.get("valid", jnp.ones((batch_size,), bool)), bool)
        mask = jnp.broadcast_to(valid[:, None], (batch_size, tokens))
        loss, per_sample = flow.flow_matching_loss(v, x0, noise, mask)
        task = jnp.asarray(batch["task"], jnp.int32)
        weights = valid.astype(jnp.float32)
        aux = LossAux(
            task_loss_sum=jax.ops.segment_sum(per_sample * weights, task, num_segments=len(TASKS)),
            task_count=jax.ops.segment_sum(weights, task, num_segments=len(TASKS)),
        )
        return loss, aux


__all__ = ["QueryKontext", "QueryKontextConfig", "FlowConfig", "BatchRows", "LossAux", "PLACEMENTS", "draw_rows",
           "vlm_image_grid"]
