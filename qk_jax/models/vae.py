"""The image autoencoder: diffusers' ``AutoencoderKL`` (the FLUX.1 VAE layout) in linen, NHWC.

What the reference does (diffusers ``models/autoencoders/{autoencoder_kl,vae}.py``, ``resnet.py``,
``downsampling.py``, ``upsampling.py``, ``unets/unet_2d_blocks.py``) and this module repeats:

- **Encoder**: ``conv_in`` (3x3) -> ``down_blocks_i`` (``DownEncoderBlock2D``: ``layers_per_block`` ResNet blocks,
  then, except in the last block, a ``Downsample2D``: zero-pad right/bottom by one, 3x3 conv with stride 2 and no
  padding) -> ``mid_block`` (``UNetMidBlock2D``: ResNet, one single-head self-attention over all pixels, ResNet)
  -> GroupNorm -> SiLU -> ``conv_out`` to ``2 * latent_channels`` (mean and log-variance).
- **Decoder**: ``conv_in`` -> ``mid_block`` -> ``up_blocks_i`` in reversed channel order (``UpDecoderBlock2D``:
  ``layers_per_block + 1`` ResNet blocks, then, except in the last block, an ``Upsample2D``: nearest 2x, 3x3 conv)
  -> GroupNorm -> SiLU -> ``conv_out``.
- ResNet block (``ResnetBlock2D``, no time embedding): ``x + conv2(act(norm2(conv1(act(norm1(x))))))``, with a 1x1
  ``conv_shortcut`` on ``x`` when the width changes. Every GroupNorm has eps 1e-6; here it is computed in float32
  whatever the compute dtype.
- Mid-block attention (``Attention`` with ``_from_deprecated_attn_block``): GroupNorm, ``to_q``/``to_k``/``to_v``
  linears of width ``channels``, one head of dim ``channels``, ``to_out_0``, residual. It goes through
  ``qk_jax.ops.attention.attention``.
- Posterior: a diagonal Gaussian; ``logvar`` is clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution``.
- Optional 1x1 ``quant_conv`` (after the encoder) / ``post_quant_conv`` (before the decoder): SD-style
  checkpoints have them, FLUX.1 has neither.

**Layout.** Images are ``[B, H, W, C]`` (NHWC, not diffusers' NCHW) with values in [-1, 1]; ``H`` and ``W`` must be
multiples of ``2 ** (len(block_out_channels) - 1)`` (the downsampling factor, 8 for FLUX). Latents are
``[B, H / f, W / f, latent_channels]``. Conv kernels are HWIO; ``qk_jax.convert.diffusers_vae`` maps them to and
from diffusers' OIHW tensors.

**Latent normalisation (FLUX).** The diffusion model sees ``z = (latent - shift_factor) * scaling_factor``
(``scale_latents``); the sampler decodes ``latent = z / scaling_factor + shift_factor`` (``unscale_latents``).
FLUX.1: scaling 0.3611, shift 0.1159; SD-style VAEs have no shift (``None`` = 0).

**Packing for the transformer.** ``pack_latents`` turns ``[B, h, w, C]`` latents into ``[B, (h/2)(w/2), 4C]``
tokens, one per 2x2 patch, row-major over patches, each token's features in the order ``(c, ph, pw)``: exactly
the tokens of diffusers' ``FluxPipeline._pack_latents`` on the NCHW tensor, so FLUX transformer weights apply
unchanged. ``unpack_latents`` inverts it.

Params carry logical axis names: ``('conv_in', 'conv_out')`` on the channel dims of conv kernels (and of the
attention linears), ``('conv_out',)`` on their biases, ``('norm',)`` on GroupNorm scales and biases. The VAE is
frozen in every stage, and the sharding rules replicate these axes.

Use: ``vae = AutoencoderKL(cfg)``; ``mean, logvar = vae.apply(v, images, method=vae.encode)`` (the trainer);
``images = vae.apply(v, latents, method=vae.decode)`` (the sampler). ``encode`` needs only ``params['encoder']``
(and ``quant_conv``), ``decode`` only ``params['decoder']`` (and ``post_quant_conv``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models.lora import LoRADense
from qk_jax.ops.attention import attention

GROUP_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() is the exact erf form
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config fields (same names, same defaults as diffusers)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32  # diffusers' tiling size; unused here, kept for round trips
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # carried for round trips; FLUX uses shift/scaling instead
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("VAEConfig.block_out_channels is empty; give one width per resolution level")
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ValueError(
                f"VAEConfig.down_block_types={self.down_block_types}: only DownEncoderBlock2D is supported, one per"
                f" entry of block_out_channels ({n})"
            )
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(
                f"VAEConfig.up_block_types={self.up_block_types}: only UpDecoderBlock2D is supported, one per entry"
                f" of block_out_channels ({n})"
            )
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r} is not one of {sorted(ACTIVATIONS)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig.block_out_channels {bad} are not multiples of norm_num_groups={self.norm_num_groups}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> VAEConfig:
        """From a mapping with diffusers' field names: a ``config.vae`` block or a diffusers ``config.json``.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are ignored; any other unknown key
        raises, so a typo or a field of a newer diffusers that changes the model is not silently dropped.
        """
        cfg = dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown AutoencoderKL config keys {unknown}; known: {sorted(fields)}")
        kwargs = {k: _tuples(v) for k, v in cfg.items() if k in fields}
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The fields as ``AutoencoderKL(**config)`` takes them (tuples as lists, as in a config.json)."""
        return {f.name: _lists(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2 per down block but the last (FLUX: 8)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _lists(v: Any) -> Any:
    return [_lists(x) for x in v] if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, name: str, *, stride: int = 1, padding: Any = None, dtype: Any = None):
    """A diffusers ``nn.Conv2d`` in NHWC: HWIO kernel with logical axes ``(None, None, 'conv_in', 'conv_out')``.

    ``padding=None`` is torch's ``padding=kernel // 2`` on every side; otherwise flax's ``((top, bottom), (left,
    right))``.
    """
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class GroupNorm(nn.Module):
    """torch ``nn.GroupNorm`` (affine, biased variance) over the channel axis of ``[..., C]``, computed in float32.

    Statistics are taken over every axis but batch, per group of ``C / num_groups`` consecutive channels.
    """

    num_groups: int
    eps: float = GROUP_NORM_EPS
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,))
        h = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)  # all but batch and group
        mean = h.mean(axis=axes, keepdims=True)
        var = jnp.square(h - mean).mean(axis=axes, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        h = h * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return h.astype(self.dtype or x.dtype)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: ``shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))``."""

    out_channels: int
    groups: int
    act_fn: str = "silu"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H, W, Cout]
        act = ACTIVATIONS[self.act_fn]
        h = act(GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, "conv1", dtype=self.dtype)(h)
        h = act(GroupNorm(self.groups, dtype=self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, "conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", dtype=self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D(use_conv=True, padding=0)``: pad right and bottom by one zero, 3x3 conv, stride 2."""

    channels: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
        return _conv(self.channels, 3, "conv", stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", dtype=self.dtype)(x)


class SpatialSelfAttention(nn.Module):
    """The mid-block attention: GroupNorm, one head of width ``C`` over all ``H * W`` pixels, output linear, residual.

    Param names are diffusers' (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out_0``); scale ``1/sqrt(C)``.
    """

    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, C]
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, hgt * wid, c)

        def linear(name):
            return LoRADense(c, kernel_axes=("conv_in", "conv_out"), dtype=self.dtype, name=name)

        q, k, v = (linear(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))  # [B, HW, 1, C]
        h = attention(q, k, v).reshape(b, hgt * wid, c)
        h = linear("to_out_0")(h)
        return x + h.reshape(b, hgt, wid, c)


class UNetMidBlock2D(nn.Module):
    """``resnets_0`` -> ``attentions_0`` (if enabled) -> ``resnets_1``, all at the block's width."""

    groups: int
    act_fn: str = "silu"
    add_attention: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.act_fn, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, self.act_fn, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """``resnets_0..num_layers-1`` (the first changes the width), then ``downsamplers_0`` unless the last block."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str = "silu"
    add_downsample: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``resnets_0..num_layers-1`` (the first changes the width), then ``upsamplers_0`` unless the last block."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers ``Encoder(double_z=True)``: images ``[B, H, W, in_channels]`` -> ``[B, H/f, W/f, 2 * latent]``."""

    config: VAEConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        widths = cfg.block_out_channels
        x = _conv(widths[0], 3, "conv_in", dtype=dt)(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            x = DownEncoderBlock2D(width, cfg.layers_per_block, cfg.norm_num_groups, cfg.act_fn, not last, dt,
                                   name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, dtype=dt, name="mid_block")(x)
        x = ACTIVATIONS[cfg.act_fn](GroupNorm(cfg.norm_num_groups, dtype=dt, name="conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out", dtype=dt)(x)


class Decoder(nn.Module):
    """diffusers ``Decoder``: latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``."""

    config: VAEConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt = self.config, self.dtype
        widths = tuple(reversed(cfg.block_out_channels))
        x = _conv(widths[0], 3, "conv_in", dtype=dt)(z)
        x = UNetMidBlock2D(cfg.norm_num_groups, cfg.act_fn, cfg.mid_block_add_attention, dtype=dt, name="mid_block")(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            x = UpDecoderBlock2D(width, cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.act_fn, not last, dt,
                                 name=f"up_blocks_{i}")(x)
        x = ACTIVATIONS[cfg.act_fn](GroupNorm(cfg.norm_num_groups, dtype=dt, name="conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, "conv_out", dtype=dt)(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL`` in NHWC. ``__call__`` (for ``init``) encodes and decodes the posterior mean.

    Attributes:
      config: the architecture.
      dtype: compute dtype (default: the inputs'); GroupNorm statistics are float32 regardless.
    """

    config: VAEConfig
    dtype: Any = None

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", dtype=self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``[B, H, W, in_channels]`` in [-1, 1] -> posterior ``(mean, logvar)``, each ``[B, H/f, W/f, latent]``.

        ``logvar`` is clamped to [-30, 20]. ``H`` and ``W`` must be multiples of ``config.downsample_factor``.
        """
        cfg = self.config
        f = cfg.downsample_factor
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"VAE encode expects NHWC images [B, H, W, {cfg.in_channels}], got shape {images.shape}; "
                "transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
            )
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"VAE encode: image size {images.shape[1]}x{images.shape[2]} is not a multiple of the VAE's "
                f"downsampling factor {f}; resize or crop to a multiple of {f}"
            )
        h = self.encoder(images)
        if cfg.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw (unscaled) latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``.

        Latents from the diffusion model must go through ``unscale_latents`` first.
        """
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"VAE decode expects NHWC latents [B, h, w, {cfg.latent_channels}], got shape {latents.shape}"
            )
        if cfg.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


# ----------------------------------------------------------------------------------------------------------
# Posterior, latent normalisation and packing: pure functions
# ----------------------------------------------------------------------------------------------------------


def latents_from_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array | None = None,
                           eps: jax.Array | None = None) -> jax.Array:
    """A latent from the diagonal Gaussian posterior: the mean when neither ``key`` nor ``eps`` is given, else
    ``mean + std * eps`` with ``eps`` standard normal (given, or drawn from ``key``).

    (diffusers ``DiagonalGaussianDistribution.mode()`` / ``.sample()``; ``logvar`` as returned by ``encode``.)
    """
    if key is None and eps is None:
        return mean
    if eps is None:
        eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps.astype(mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(posterior || N(0, I)) per sample summed over ``[h, w, C]``: diffusers' ``DiagonalGaussianDistribution.kl``."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def scale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents -> the diffusion model's ``z = (latents - shift_factor) * scaling_factor``."""
    return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """The diffusion model's ``z`` -> VAE latents ``z / scaling_factor + shift_factor`` (what ``decode`` takes)."""
    return z / config.scaling_factor + (config.shift_factor or 0.0)


def pack_latents(latents: jax.Array) -> jax.Array:
    """``[B, h, w, C]`` -> ``[B, (h/2)(w/2), 4C]``: one token per 2x2 patch, features ordered ``(c, ph, pw)``.

    Token ``i * (w/2) + j`` holds patch ``(i, j)``; its feature ``4c + 2ph + pw`` is ``latents[:, 2i+ph, 2j+pw, c]``,
    as diffusers' ``FluxPipeline._pack_latents`` on the NCHW tensor.
    """
    if latents.ndim != 4:
        raise ValueError(f"pack_latents expects NHWC latents [B, h, w, C], got shape {latents.shape}")
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"pack_latents: latent size {h}x{w} must be even on both sides for 2x2 packing; use images whose sides "
            "are multiples of 2x the VAE's downsampling factor (16 for FLUX)"
        )
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Inverse of ``pack_latents``: ``[B, (h/2)(w/2), 4C]`` -> ``[B, h, w, C]`` for latent size ``h x w``."""
    if h % 2 or w % 2:
        raise ValueError(f"unpack_latents: latent size {h}x{w} must be even on both sides (2x2 packing)")
    if tokens.ndim != 3 or tokens.shape[1] != (h // 2) * (w // 2) or tokens.shape[2] % 4:
        raise ValueError(
            f"unpack_latents: tokens of shape {tuple(tokens.shape)} do not fit a {h}x{w} latent; expected "
            f"[B, {(h // 2) * (w // 2)}, 4 * C]"
        )
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, h // 2, w // 2, c, 2, 2)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, h/2, 2, w/2, 2, C]
    return x.reshape(b, h, w, c)


__all__: Sequence[str] = [
    "VAEConfig",
    "AutoencoderKL",
    "Encoder",
    "Decoder",
    "latents_from_posterior",
    "kl_divergence",
    "scale_latents",
    "unscale_latents",
    "pack_latents",
    "unpack_latents",
]
