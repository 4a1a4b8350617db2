"""The MMDiT: diffusers' ``FluxTransformer2DModel`` (transformers/transformer_flux.py) in Flax linen.

Query-Kontext's generator (paper section 3, appendix D, table 11) is a FLUX-layout multimodal diffusion
transformer: a text stream (the connector's output: text tokens then kontext tokens) and an image stream
(the noisy target latent and, from stage 3 on, the VAE latents of source/reference images placed apart by
sRoPE) run through

- ``num_layers`` double-stream blocks (``transformer_blocks_i``): separate weights per stream, adaLN-Zero
  modulation from the conditioning vector (``norm1``/``norm1_context``), q/k RMSNorm, one joint attention over
  ``[text; image]`` with RoPE on both, GELU-tanh FFNs (``ff``/``ff_context``);
- ``num_single_layers`` single-stream blocks (``single_transformer_blocks_i``; 0 in the paper config): one
  stream ``[text; image]``, attention and MLP in parallel, one output projection;
- an adaptive output LayerNorm (``norm_out``, diffusers ``AdaLayerNormContinuous``: its modulation is chunked
  **scale first, then shift**, unlike the blocks' shift-first adaLN-Zero) and ``proj_out``.

The conditioning vector is ``timestep_embedder(sinusoid(1000 t)) [+ guidance_embedder(sinusoid(1000 g))] +
text_embedder(pooled)``: diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`` ->
``[cos, sin]`` features, then SiLU MLPs. The pooled vector is the mean of the connected kontext tokens
(``qk_jax.models.connector``), where FLUX uses CLIP.

Parameter names mirror diffusers one-to-one (``transformer_blocks.0.attn.to_out.0.weight`` <->
``transformer_blocks_0/attn/to_out_0/kernel``, transposed); ``qk_jax/convert/diffusers_mmdit.py`` holds the table.
Every linear is a ``LoRADense``, so ``LoRAConfig.targets`` select adapters by regex over the module path
(stage 3: r = 256, alpha = 256 on the attention and FFN projections, ``configs/common.py``).

Logical axis names of the parameters (``nn.with_logical_partitioning``):

============================  ==========================================================================
``'embed'``                   the model width ``heads x head_dim`` (the residual stream), and the inputs of
                              the conditioning MLPs (256 sinusoid channels, the pooled vector)
``'heads'``                   the flattened ``heads x head_dim`` output of q/k/v, input of the out projections
``'mlp'``                     FFN hidden units, adaLN modulation outputs (6/3/2 x width), the hidden layer of
                              the conditioning MLPs, the context embedder's input (the connector's width) and
                              the single block's concatenated ``[attention; mlp]`` input of ``proj_out``
``'conv_in'``/``'conv_out'``  latent channels: ``x_embedder``'s input, ``proj_out``'s output
``'norm'``                    q/k RMSNorm scales
============================  ==========================================================================

Precision (appendix D: bf16 mixed precision): parameters in ``param_dtype`` (float32), matmuls and the
residual stream in ``dtype`` (bfloat16 for the paper); LayerNorm/RMSNorm statistics, the adaLN modulation,
RoPE (``ops/rope.py``), the softmax (``ops/attention.py``) and the timestep sinusoid are float32.

Inputs are the *packed* image tokens (2x2-packed VAE latents, FLUX's "patch 2"; the transformer's own
``patch_size`` is 1): the noisy target and any in-context latents concatenated in sequence order, as
``rope.in_context_layout``/``rope.gather_blocks`` arrange them, with per-sample sRoPE ids.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qk_jax.models.lora import LoRAConfig, LoRADense
from qk_jax.ops.attention import attention
from qk_jax.ops.rope import apply_rope, rope_cos_sin

TIMESTEP_CHANNELS = 256  # diffusers Timesteps(num_channels=256) in CombinedTimestep*TextProjEmbeddings
NORM_EPS = 1e-6  # every LayerNorm and q/k RMSNorm of FLUX
DIFFUSERS_ROPE_THETA = 10000.0  # hard-coded in FluxTransformer2DModel (FluxPosEmbed(theta=10000))
DIFFUSERS_MLP_RATIO = 4.0  # hard-coded in FluxTransformerBlock / FluxSingleTransformerBlock
POS_EMBEDS = ("none", "sincos")  # MMDiTConfig.pos_embed


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """``FluxTransformer2DModel``'s config (same field names and defaults) plus ``rope_theta``/``mlp_ratio``
    and ``pos_embed``.

    diffusers hard-codes RoPE theta 1e4 and an FFN ratio of 4; they are fields here so that the model is
    readable from its config, and ``to_diffusers_config`` refuses other values. ``out_channels=None`` means
    ``in_channels``, as in diffusers. ``pos_embed='sincos'`` adds SD3's fixed 2D sin-cos embedding of each image
    token's (row, col) id to its embedding (``sincos_pos_embed``), for an MMDiT trained from scratch on a small
    grid; FLUX has none (``'none'``), and a diffusers FLUX config cannot carry it.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = DIFFUSERS_ROPE_THETA
    mlp_ratio: float = DIFFUSERS_MLP_RATIO
    pos_embed: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and (self.inner_dim % 4 or len(self.axes_dims_rope) != 3):
            raise ValueError(f"pos_embed='sincos' needs (axis0, row, col) ids and an inner_dim divisible by 4,"
                             f" got axes_dims_rope={self.axes_dims_rope}, inner_dim={self.inner_dim}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} sums to {sum(self.axes_dims_rope)} but attention_head_dim is"
                f" {self.attention_head_dim}; RoPE must cover the whole head"
            )

    # Keys of a config block that are not fields: our LoRA block (a module attribute) and diffusers' metadata.
    _IGNORED_KEYS = ("lora",)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MMDiTConfig:
        """From ``config.mmdit`` (ml_collections) or a diffusers ``config.json`` dict.

        ``lora`` and ``_``-prefixed diffusers metadata (``_class_name``, ``_diffusers_version``) are skipped; any
        other unknown key raises, naming it.
        """
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and k not in cls._IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown MMDiT config keys {unknown}; valid keys: {sorted(fields)}")
        return cls(**{k: v for k, v in cfg.items() if k in fields})

    def to_diffusers_config(self, *, allow_pos_embed: bool = False) -> dict[str, Any]:
        """The ``FluxTransformer2DModel`` keyword arguments (config.json without metadata).

        ``allow_pos_embed``: accept ``pos_embed='sincos'``, which diffusers' model lacks; the caller then owes its
        users the embedding, added to ``x_embedder``'s output (the whole-model export records it in
        ``kontext_config.json`` and ``torch_reference`` adds it).
        """
        if (self.rope_theta != DIFFUSERS_ROPE_THETA or self.mlp_ratio != DIFFUSERS_MLP_RATIO
                or (self.pos_embed != "none" and not allow_pos_embed)):
            raise ValueError(
                f"diffusers' FluxTransformer2DModel hard-codes rope_theta={DIFFUSERS_ROPE_THETA:g} and"
                f" mlp_ratio={DIFFUSERS_MLP_RATIO:g} and has no absolute position embedding; this config has"
                f" rope_theta={self.rope_theta:g}, mlp_ratio={self.mlp_ratio:g}, pos_embed={self.pos_embed!r} and"
                " cannot be expressed as a diffusers config"
            )
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["rope_theta"], out["mlp_ratio"], out["pos_embed"]
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def output_dim(self) -> int:
        """Channels per output token: ``patch_size**2 * (out_channels or in_channels)``."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0) -> jax.Array:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``, float32.

    ``t`` ``[B]`` (already scaled, e.g. ``1000 * t``) -> ``[B, dim]`` = ``[cos(t f), sin(t f)]`` with
    ``f_i = exp(-ln(max_period) i / (dim/2))``. The frequencies are a constant: diffusers' float32 exponent,
    exponentiated in float64 and rounded to float32 (torch's float32 ``exp`` differs in the last bit for 3 of
    the 128 near-tie values, ~3e-8 relative, i.e. ~3e-5 rad at ``1000 t = 1000``).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed(ids: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """SD3's fixed 2D position embedding (diffusers ``get_2d_sincos_pos_embed_from_grid``) of sRoPE ids, float32.

    ``ids`` ``[..., 3]`` (axis0, row, col) -> ``[..., dim]``: the first half embeds the column, the second the
    row (diffusers' order), each ``[sin(p w), cos(p w)]`` with ``w_i = max_period ** (-i / (dim / 4))``. Taken from
    the ids, not from a grid size, so in-context images get their shifted sRoPE positions and any bucket shape
    works; diffusers' ``base_size``/``interpolation_scale`` rescaling is left out (positions are token indices).
    """
    quarter = dim // 4
    omega = 1.0 / max_period ** (np.arange(quarter, dtype=np.float64) / quarter)

    def embed_1d(pos):  # [...] -> [..., dim / 2]
        args = pos.astype(jnp.float32)[..., None] * jnp.asarray(omega, jnp.float32)
        return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)

    return jnp.concatenate([embed_1d(ids[..., 2]), embed_1d(ids[..., 1])], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``LN(x) * (1 + scale) + shift`` (float32), ``x`` ``[B, S, D]``, ``shift``/``scale`` ``[B, D]``; x's dtype.

    The LayerNorm has no affine parameters (FLUX's ``elementwise_affine=False``); its statistics are float32.
    Its VJP is written by hand (``_modulated_norm_bwd``) so that the backward pass keeps only ``x`` (in its dtype:
    the residual stream, kept anyway) and the float32 row statistics ``[B, S, 1]``, as the fused LayerNorms of
    Apex and Transformer Engine do. Differentiated by JAX, the compiled gradient kept more ``[B, S, D]`` float32
    intermediates, and on XLA:CPU it recomputed the norm's backward inside each consumer of the residual
    stream's gradient (an ``optimization_barrier`` on that gradient held it off until 2026-12-04; with this VJP the
    program is the same with or without one). ``tests/test_mmdit.py`` holds both effects on the compiled program.
    """
    return _modulated_norm(x, shift, scale)


def _norm_stats(xf: jax.Array, eps: float = NORM_EPS) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)


@jax.custom_vjp
def _modulated_norm(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return _modulated_norm_fwd(x, shift, scale)[0]


def _modulated_norm_fwd(x, shift, scale):
    xf = x.astype(jnp.float32)
    mean, rstd = _norm_stats(xf)
    y = (xf - mean) * rstd * (1.0 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
    return y.astype(x.dtype), (x, mean, rstd, shift, scale)


def _modulated_norm_bwd(residuals, g):
    """LayerNorm's backward, ``dx = rstd (g' - mean(g') - x^ mean(g' x^))`` with ``g' = g (1 + scale)`` and
    ``x^`` recomputed from ``x``; ``dshift = sum_S g``, ``dscale = sum_S g x^``."""
    x, mean, rstd, shift, scale = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    g_norm = g * (1.0 + scale.astype(jnp.float32)[:, None])
    dx = rstd * (g_norm - jnp.mean(g_norm, axis=-1, keepdims=True)
                 - xhat * jnp.mean(g_norm * xhat, axis=-1, keepdims=True))
    return (dx.astype(x.dtype), jnp.sum(g, axis=1).astype(shift.dtype),
            jnp.sum(g * xhat, axis=1).astype(scale.dtype))


_modulated_norm.defvjp(_modulated_norm_fwd, _modulated_norm_bwd)


class RMSNorm(nn.Module):
    """``torch.nn.RMSNorm(dim, eps)``: ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in float32."""

    eps: float = NORM_EPS
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _dense(lora: LoRAConfig | None, dtype: Any, param_dtype: Any, zero_init: bool = False, fp8: bool = False):
    """``dense(features, kernel_axes, name)``: a ``LoRADense`` with one model's shared LoRA/dtype settings
    (``zero_init``: kernel and bias start at zero, adaLN-Zero; ``fp8``: its matmul in float8, ``MMDiT.fp8``)."""
    init = dict(kernel_init=nn.initializers.zeros_init()) if zero_init else {}

    def dense(features: int, kernel_axes: tuple[str, str], name: str) -> LoRADense:
        return LoRADense(features, lora=lora, kernel_axes=kernel_axes, dtype=dtype, param_dtype=param_dtype, name=name,
                         fp8=fp8, **init)

    return dense


class MLPEmbedder(nn.Module):
    """diffusers ``TimestepEmbedding`` / ``PixArtAlphaTextProjection(act_fn='silu')``: linear_1, SiLU, linear_2."""

    features: int
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = _dense(self.lora, self.dtype, self.param_dtype)
        x = dense(self.features, ("embed", "mlp"), "linear_1")(x)
        return dense(self.features, ("mlp", "embed"), "linear_2")(nn.silu(x))


class TimeTextEmbed(nn.Module):
    """diffusers ``CombinedTimestep[Guidance]TextProjEmbeddings``: the conditioning vector ``temb`` ``[B, D]``.

    ``t`` (and ``guidance``) ``[B]`` in [0, 1] are multiplied by 1000 (as ``FluxTransformer2DModel.forward``)
    and embedded by the float32 sinusoid; ``pooled`` ``[B, pooled_projection_dim]``.
    """

    config: MMDiTConfig
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        kw = dict(features=self.config.inner_dim, lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        dtype = self.dtype or pooled.dtype
        emb = MLPEmbedder(**kw, name="timestep_embedder")(timestep_embedding(t * 1000.0).astype(dtype))
        if self.config.guidance_embeds:
            emb = emb + MLPEmbedder(**kw, name="guidance_embedder")(timestep_embedding(guidance * 1000.0).astype(dtype))
        return emb + MLPEmbedder(**kw, name="text_embedder")(pooled)


class AdaLNModulation(nn.Module):
    """The ``linear`` of diffusers ``AdaLayerNormZero[Single]``/``AdaLayerNormContinuous``: ``linear(silu(temb))``
    split into ``chunks`` vectors ``[B, D]`` (the caller knows their order)."""

    chunks: int
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    adaln_zero: bool = False  # MMDiT.adaln_zero

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        dim = temb.shape[-1]
        linear = _dense(self.lora, self.dtype, self.param_dtype, self.adaln_zero)(
            self.chunks * dim, ("embed", "mlp"), "linear")
        emb = linear(nn.silu(temb))
        return jnp.split(emb, self.chunks, axis=-1)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn='gelu-approximate')``: ``net_0/proj`` + GELU-tanh, ``net_2``."""

    hidden: int
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = _dense(self.lora, self.dtype, self.param_dtype, fp8=self.fp8)
        h = _GELUProj(self.hidden, self.lora, self.dtype, self.param_dtype, self.fp8, name="net_0")(x)
        return dense(x.shape[-1], ("mlp", "embed"), "net_2")(h)


class _GELUProj(nn.Module):
    """diffusers ``GELU(approximate='tanh')``: a linear ``proj`` followed by the tanh GELU."""

    hidden: int
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.lora, self.dtype, self.param_dtype, fp8=self.fp8)(self.hidden, ("embed", "mlp"), "proj")(x)
        return nn.gelu(h, approximate=True)


class Attention(nn.Module):
    """diffusers ``FluxAttention`` + ``FluxAttnProcessor``: joint attention over ``[context; x]``.

    Double-stream (``joint=True``): image projections ``to_q/to_k/to_v`` and context projections
    ``add_q_proj/add_k_proj/add_v_proj``, per-head RMSNorm (``norm_q/norm_k``, ``norm_added_q/norm_added_k``),
    RoPE on the concatenated ``[context; x]`` q and k, one attention, then ``to_out_0`` / ``to_add_out``.
    Single-stream (``joint=False``, diffusers ``pre_only``): ``x`` is already ``[context; x]``; no output
    projection (the block's ``proj_out`` does it).
    """

    heads: int
    head_dim: int
    joint: bool
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    fp8: bool = False

    def _qkv(self, x: jax.Array, names: Sequence[str], norms: Sequence[str]) -> list[jax.Array]:
        dense = _dense(self.lora, self.dtype, self.param_dtype, fp8=self.fp8)
        b, s, _ = x.shape
        q, k, v = (dense(self.heads * self.head_dim, ("embed", "heads"), n)(x).reshape(b, s, self.heads, self.head_dim)
                   for n in names)
        q = RMSNorm(param_dtype=self.param_dtype, name=norms[0])(q)
        k = RMSNorm(param_dtype=self.param_dtype, name=norms[1])(k)
        return [q, k, v]

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, S, D] image tokens (single-stream: [context; image])
        context: jax.Array | None,  # [B, L, D] (double-stream only)
        cos: jax.Array,  # [B, L+S, head_dim]
        sin: jax.Array,
        kv_mask: jax.Array | None,  # [B, L+S] bool
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        q, k, v = self._qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if self.joint:
            cq, ck, cv = self._qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                   ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate([c, i], axis=1) for c, i in ((cq, q), (ck, k), (cv, v)))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = checkpoint_name(attention(q, k, v, kv_mask=kv_mask), "attention")  # [B, L+S, H, Dh]
        # For qk_jax.diagnose; no-ops unless the "intermediates" collection is mutable.
        for name, value in (("query", q), ("key", k), ("value", v), ("output", out)):
            self.sow("intermediates", name, value)
        out = out.reshape(out.shape[:2] + (self.heads * self.head_dim,))
        if not self.joint:
            return out
        dense = _dense(self.lora, self.dtype, self.param_dtype, fp8=self.fp8)
        width = x.shape[-1]
        text_len = context.shape[1]
        x_out = dense(width, ("heads", "embed"), "to_out_0")(out[:, text_len:])
        c_out = dense(width, ("heads", "embed"), "to_add_out")(out[:, :text_len])
        return x_out, c_out


class DoubleStreamBlock(nn.Module):
    """diffusers ``FluxTransformerBlock``: adaLN-Zero per stream, joint attention, GELU-tanh FFN per stream."""

    config: MMDiTConfig
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    adaln_zero: bool = False  # MMDiT.adaln_zero
    fp8: bool = False  # MMDiT.fp8

    @nn.compact
    def __call__(self, x, context, temb, cos, sin, kv_mask):
        """``x`` ``[B, S, D]``, ``context`` ``[B, L, D]``, ``temb`` ``[B, D]`` -> ``(x, context)``."""
        cfg = self.config
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        mm = dict(kw, fp8=self.fp8)  # the projections; the modulation linears (one row per sample) stay in dtype
        zero = self.adaln_zero
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(
            6, **kw, adaln_zero=zero, name="norm1")(temb)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLNModulation(
            6, **kw, adaln_zero=zero, name="norm1_context")(temb)

        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, joint=True, **mm, name="attn")
        x_attn, c_attn = attn(modulate(x, shift_msa, scale_msa), modulate(context, c_shift_msa, c_scale_msa),
                              cos, sin, kv_mask)

        x = x + gate_msa[:, None] * x_attn
        x = x + gate_mlp[:, None] * FeedForward(cfg.mlp_dim, **mm, name="ff")(modulate(x, shift_mlp, scale_mlp))
        context = context + c_gate_msa[:, None] * c_attn
        context = context + c_gate_mlp[:, None] * FeedForward(cfg.mlp_dim, **mm, name="ff_context")(
            modulate(context, c_shift_mlp, c_scale_mlp))
        return x, context


class SingleStreamBlock(nn.Module):
    """diffusers ``FluxSingleTransformerBlock``: one stream ``[context; x]``, attention and MLP in parallel."""

    config: MMDiTConfig
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    adaln_zero: bool = False  # MMDiT.adaln_zero
    fp8: bool = False  # MMDiT.fp8

    @nn.compact
    def __call__(self, x, context, temb, cos, sin, kv_mask):
        cfg = self.config
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        dense = _dense(**kw, fp8=self.fp8)
        text_len = context.shape[1]
        h = jnp.concatenate([context, x], axis=1)  # [B, L+S, D]
        shift, scale, gate = AdaLNModulation(3, **kw, adaln_zero=self.adaln_zero, name="norm")(temb)
        hn = modulate(h, shift, scale)
        mlp = nn.gelu(dense(cfg.mlp_dim, ("embed", "mlp"), "proj_mlp")(hn), approximate=True)
        attn = Attention(cfg.num_attention_heads, cfg.attention_head_dim, joint=False, **kw, fp8=self.fp8,
                         name="attn")(
            hn, None, cos, sin, kv_mask)
        h = h + gate[:, None] * dense(h.shape[-1], ("mlp", "embed"), "proj_out")(jnp.concatenate([attn, mlp], -1))
        return h[:, text_len:], h[:, :text_len]


def _scan(block: nn.Module, length: int, x, context, temb, cos, sin, kv_mask):
    """``length`` applications of ``block`` (params stacked on a leading ``'layers'`` axis) via ``nn.scan``."""

    def body(module, carry, temb, cos, sin, kv_mask):
        return module(*carry, temb, cos, sin, kv_mask), None

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=length,
                   in_axes=(nn.broadcast,) * 4, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, context), _ = scan(block, (x, context), temb, cos, sin, kv_mask)
    return x, context


def take_target(x: jax.Array, target_start: jax.Array, target_len: int) -> jax.Array:
    """Per-sample slice ``x[b, target_start[b] : target_start[b] + target_len]`` of ``[B, S, D]``.

    As ``lax.dynamic_slice``, a start that would run past the end is clamped to ``S - target_len``.
    """
    return jax.vmap(lambda xb, s: jax.lax.dynamic_slice_in_dim(xb, s, target_len, axis=0))(
        x, jnp.asarray(target_start, jnp.int32))


def _batched_ids(ids: jax.Array, batch: int, length: int, what: str) -> jax.Array:
    """``[L, 3]`` or ``[B, L, 3]`` position ids -> ``[B, L, 3]``."""
    ids = jnp.asarray(ids)
    if ids.ndim == 2:
        ids = jnp.broadcast_to(ids[None], (batch,) + ids.shape)
    if ids.ndim != 3 or ids.shape[:2] != (batch, length):
        raise ValueError(f"{what} must be [{length}, n_axes] or [{batch}, {length}, n_axes], got shape {ids.shape}")
    return ids


# What a rematerialised block saves for the backward pass (``jax.checkpoint`` policies); ``"none"`` is no remat.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names("attention"),
}


def rematerialized(block: type[nn.Module], policy: str, *, scanned: bool = False) -> type[nn.Module]:
    """``block`` wrapped in ``nn.remat`` with the named policy (``REMAT_POLICIES``), or as is for ``"none"``.
    Inside a scan the loop already keeps XLA from merging the recomputation away, so ``prevent_cse`` is off."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)} (config.remat)")
    if policy == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


# The two block stacks: (per-layer module name prefix, the config field that counts them).
BLOCK_STACKS = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))


def stack_layers(params: Mapping[str, Any], config: MMDiTConfig) -> dict[str, Any]:
    """Per-layer params (``transformer_blocks_0 ... _{n-1}``, the diffusers layout every converter and checkpoint
    of another layout uses) -> the ``scan_layers`` layout: one ``transformer_blocks`` subtree whose leaves carry
    a leading layer axis. Same for the single-stream blocks. Other entries are kept."""
    out = dict(params)
    for prefix, field in BLOCK_STACKS:
        n = getattr(config, field)
        if n == 0:
            continue
        names = [f"{prefix}_{i}" for i in range(n)]
        missing = [name for name in names if name not in out]
        if missing:
            raise ValueError(f"stack_layers: {missing[:3]} missing; expected per-layer params {names[0]}..{names[-1]}")
        out[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *(out.pop(name) for name in names))
    return out


def with_layout(params: Mapping[str, Any], config: MMDiTConfig, scan_layers: bool) -> dict[str, Any]:
    """``params`` in either layout -> the layout of ``MMDiT(config, scan_layers=scan_layers)``."""
    flat = unstack_layers(params, config)
    return stack_layers(flat, config) if scan_layers else flat


def unstack_layers(params: Mapping[str, Any], config: MMDiTConfig) -> dict[str, Any]:
    """The inverse of ``stack_layers``; params already per layer are returned as they are."""
    out = dict(params)
    for prefix, field in BLOCK_STACKS:
        if prefix not in out:
            continue
        stacked = out.pop(prefix)
        for i in range(getattr(config, field)):
            out[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """``FluxTransformer2DModel`` in linen. See the module docstring for names, axes and precision.

    Attributes:
      config: the ``MMDiTConfig``.
      lora: adapters on the linears whose module path matches ``lora.targets`` (``None``: no LoRA).
      dtype: compute dtype (``None``: from inputs/params; ``jnp.bfloat16`` for the paper's mixed precision).
      param_dtype: parameter dtype (float32).
      remat: what each block keeps for the backward pass, a name in ``REMAT_POLICIES``: ``"none"`` (keep every
        intermediate), ``"full"`` (keep the block's inputs, recompute the rest), ``"dots"``/``"dots_no_batch"``
        (keep matmul outputs: all / those without batch dims, i.e. not the attention logits) or
        ``"attention"`` (keep the attention output, recompute the projections and FFNs).
      scan_layers: run each block stack as one ``nn.scan`` (one compiled block instead of ``num_layers``: compile
        time independent of depth). Its params are layer-stacked under ``transformer_blocks`` /
        ``single_transformer_blocks`` (logical axis ``'layers'`` first); ``stack_layers``/``unstack_layers``
        convert from/to the per-layer layout of the converters.
      adaln_zero: DiT's adaLN-Zero initialisation (Peebles & Xie, section 3.2), for an MMDiT trained from scratch:
        every modulation linear and ``proj_out`` start at zero, so each block starts as the identity and the
        model predicts zero velocity. Only ``init`` changes; diffusers initialises FLUX its own way, and a
        pretrained or imported MMDiT never sees this.
      fp8: the blocks' attention and FFN projections (the matmuls over every token) in float8, e4m3 forward and
        e5m2 gradients with per-tensor current scaling (``qk_jax.ops.fp8``); the embedders, the adaLN modulation
        (one row per sample) and ``proj_out`` stay in ``dtype``. A deviation from the paper's bf16, opt-in.
    """

    config: MMDiTConfig
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    adaln_zero: bool = False
    fp8: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states: jax.Array,  # [B, S, in_channels]: packed image tokens in sequence order
        img_ids: jax.Array,  # [B, S, 3] (or [S, 3]) sRoPE ids
        encoder_hidden_states: jax.Array,  # [B, L, joint_attention_dim]: the connector's output
        txt_ids: jax.Array,  # [B, L, 3] (or [L, 3]); zeros for text/kontext tokens
        timestep: jax.Array,  # [B] in [0, 1]
        pooled_projections: jax.Array,  # [B, pooled_projection_dim]
        guidance: jax.Array | None = None,  # [B], only with config.guidance_embeds
        *,
        text_mask: jax.Array | None = None,  # [B, L] bool, False for padding text tokens
        image_mask: jax.Array | None = None,  # [B, S] bool, False for empty in-context slots
        target_start: jax.Array | None = None,  # [B] int32: where each sample's noisy target starts
        target_len: int | None = None,  # static: tokens of the noisy target
    ) -> jax.Array:
        """The velocity prediction.

        Returns:
          ``[B, target_len, output_dim]`` for the target tokens when ``target_start`` is given (sliced before
          ``norm_out``/``proj_out``, so padding and in-context tokens cost nothing there), else
          ``[B, S, output_dim]`` for every image token (what diffusers returns).
        """
        cfg = self.config
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance,
                           target_start, target_len)
        batch, img_len, _ = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        dense = _dense(**kw)

        img_ids = _batched_ids(img_ids, batch, img_len, "img_ids")  # [B, S, 3]
        x = dense(cfg.inner_dim, ("conv_in", "embed"), "x_embedder")(hidden_states)
        if cfg.pos_embed == "sincos":
            x = x + sincos_pos_embed(img_ids, cfg.inner_dim).astype(x.dtype)
        temb = TimeTextEmbed(cfg, **kw, name="time_text_embed")(timestep, pooled_projections, guidance)
        context = dense(cfg.inner_dim, ("mlp", "embed"), "context_embedder")(encoder_hidden_states)

        ids = jnp.concatenate([_batched_ids(txt_ids, batch, text_len, "txt_ids"),
                               img_ids], axis=1)  # [B, L+S, 3]
        cos, sin = rope_cos_sin(ids, cfg.axes_dims_rope, cfg.rope_theta)  # [B, L+S, head_dim] float32
        kv_mask = None
        if text_mask is not None or image_mask is not None:
            tm = jnp.ones((batch, text_len), bool) if text_mask is None else jnp.asarray(text_mask, bool)
            im = jnp.ones((batch, img_len), bool) if image_mask is None else jnp.asarray(image_mask, bool)
            kv_mask = jnp.concatenate([tm, im], axis=1)

        for (prefix, field), block in zip(BLOCK_STACKS, (DoubleStreamBlock, SingleStreamBlock)):
            n = getattr(cfg, field)
            block = rematerialized(block, self.remat, scanned=self.scan_layers)
            if self.scan_layers and n:
                x, context = _scan(block(cfg, **kw, adaln_zero=self.adaln_zero, fp8=self.fp8, name=prefix), n, x,
                                   context, temb, cos, sin, kv_mask)
                continue
            for i in range(n):
                x, context = block(cfg, **kw, adaln_zero=self.adaln_zero, fp8=self.fp8, name=f"{prefix}_{i}")(
                    x, context, temb, cos, sin, kv_mask)

        if target_start is not None:
            x = take_target(x, target_start, target_len)
        scale, shift = AdaLNModulation(2, **kw, adaln_zero=self.adaln_zero, name="norm_out")(temb)  # scale first
        x = modulate(x, shift, scale)
        return _dense(**kw, zero_init=self.adaln_zero)(cfg.output_dim, ("embed", "conv_out"), "proj_out")(x)

    def _check_inputs(self, hidden_states, context, pooled, timestep, guidance, target_start, target_len):
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"image tokens must be [batch, tokens, in_channels={cfg.in_channels}], got shape {hidden_states.shape};"
                " pack the VAE latents 2x2 (16 latent channels -> 64) or fix config.mmdit.in_channels"
            )
        batch = hidden_states.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"context must be [{batch}, L, joint_attention_dim={cfg.joint_attention_dim}],"
                             f" got shape {context.shape}")
        if pooled.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [{batch}, {cfg.pooled_projection_dim}], got {pooled.shape}")
        if jnp.shape(timestep) != (batch,):
            raise ValueError(f"timestep must be [{batch}] in [0, 1], got shape {jnp.shape(timestep)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("config.guidance_embeds is set: pass guidance [batch] (the distilled guidance scale)")
        if guidance is not None and not cfg.guidance_embeds:
            raise ValueError("guidance was given but config.guidance_embeds is False (this model has no guidance"
                             " embedder); use classifier-free guidance instead")
        if (target_start is None) != (target_len is None):
            raise ValueError("target_start and target_len go together: give both (target-only output) or neither")
        if target_len is not None and not 0 < target_len <= hidden_states.shape[1]:
            raise ValueError(f"target_len={target_len} must be in 1..{hidden_states.shape[1]} (the image tokens)")


def init_inputs(config: MMDiTConfig, batch: int = 1, img_len: int = 4, text_len: int = 2) -> dict[str, jax.Array]:
    """Dummy keyword inputs of the right shapes for ``MMDiT.init``/``jax.eval_shape``."""
    inputs = dict(
        hidden_states=jnp.zeros((batch, img_len, config.in_channels), jnp.float32),
        img_ids=jnp.zeros((batch, img_len, len(config.axes_dims_rope)), jnp.int32),
        encoder_hidden_states=jnp.zeros((batch, text_len, config.joint_attention_dim), jnp.float32),
        txt_ids=jnp.zeros((batch, text_len, len(config.axes_dims_rope)), jnp.int32),
        timestep=jnp.zeros((batch,), jnp.float32),
        pooled_projections=jnp.zeros((batch, config.pooled_projection_dim), jnp.float32),
    )
    if config.guidance_embeds:
        inputs["guidance"] = jnp.zeros((batch,), jnp.float32)
    return inputs


def abstract_params(config: MMDiTConfig, lora: LoRAConfig | None = None) -> Any:
    """The boxed (logically partitioned) ``ShapeDtypeStruct`` params of ``MMDiT(config, lora)``; allocates nothing."""
    model = MMDiT(config, lora=lora)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **init_inputs(config)))["params"]


def param_count(config: MMDiTConfig, lora: LoRAConfig | None = None) -> int:
    """Number of parameters of ``MMDiT(config, lora)`` via ``jax.eval_shape``."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(config, lora))))


__all__: Sequence[str] = ["MMDiTConfig", "MMDiT", "REMAT_POLICIES", "rematerialized", "stack_layers", "unstack_layers",
                          "with_layout", "abstract_params", "param_count", "init_inputs",
                          "timestep_embedding", "take_target"]
