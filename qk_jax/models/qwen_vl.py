"""Qwen2.5-VL in Flax linen: transformers' ``Qwen2_5_VLForConditionalGeneration`` plus the kontext queries.

The reference is transformers v5 ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``; module names mirror it so the
converter's table (``qk_jax/convert/hf_qwen_vl.py``) is one line per module:

- ``visual`` (``Qwen2_5_VisionTransformerPretrainedModel``): ``patch_embed/proj`` (the Conv3d with kernel =
  stride over ``temporal 2 x 14 x 14 x 3`` patches, here a linear on the flattened patch), ``blocks_i``
  (RMSNorm ``norm1``/``norm2``, ``attn/qkv`` + ``attn/proj`` with 2D RoPE, SwiGLU ``mlp`` with biases), and
  ``merger`` (RMSNorm ``ln_q``, 2x2 spatial merge, ``mlp_0`` GELU ``mlp_2``) to the LLM width. Blocks listed
  in ``fullatt_block_indexes`` attend over a whole frame; the others within windows of
  ``window_size`` pixels. transformers packs every image into one sequence and passes ``cu_seqlens``; here the
  segments (frames or windows) are gathered into padded blocks that ``ops.attention`` takes as a batch with a
  padding mask (``segment_blocks``), and the window reordering (``vision_window_index``) is NumPy on the
  static grid sizes.
- ``language_model`` (``Qwen2_5_VLTextModel``): ``embed_tokens``, ``layers_i`` (``input_layernorm``,
  ``self_attn`` with GQA and q/k/v biases, ``post_attention_layernorm``, SwiGLU ``mlp``), ``norm``; M-RoPE
  positions from ``ops.rope.mrope_position_ids`` (transformers' ``get_rope_index``, vectorised and jittable).
- ``lm_head`` (absent when ``tie_word_embeddings``).
- ``kontext_queries`` ``[K, hidden]`` (Query-Kontext, paper section 3): K learnable embeddings appended after
  every prompt (after its padding too: padding is masked out, and their M-RoPE positions continue the prompt's
  last position). They attend causally like every LLM token (``query_attention='causal'``, the default) or, with
  ``'bidirectional'``, to all queries.

Inputs follow transformers' processor: ``input_ids``/``attention_mask`` ``[B, S]`` with one ``<|image_pad|>``
per merged image token, and ``pixel_values`` packed as ``[N_patches, C*T*p*p]`` with ``image_grid_thw``.
``image_grid_thw`` must be static (a tuple of ``(t, h, w)``; it fixes the ViT's sequence layout, so a new set of
grid sizes compiles anew, like any new shape). ``pixel_values`` may also be ``[B_v, N, D]``: ``B_v`` rows with the
same image layout (``image_grid_thw`` describes one row), e.g. one row per sample of a bucketed batch, so the
ViT's attention stays within a row and the batch axis can be data-sharded. Image features fill the
``<|image_pad|>`` tokens in batch order (sample by sample, left to right), as transformers' ``masked_scatter``;
``image_present`` marks images whose patches are in ``pixel_values`` but whose tokens are not in the prompt (the
data pipeline's fixed ``[B, M]`` image slots with some dropped for guidance): their features are skipped.

The output (``QwenVLOutput``) has the final-norm hidden states of ``[prompt; queries]``, masks of the prompt's
text tokens (valid, not image pads), image tokens and query tokens, the M-RoPE positions and, on request, logits.

Parameters carry logical axis names: ``'embed'`` (the model width), ``'heads'``/``'kv_heads'`` (the flattened
``heads x head_dim`` of q and of k/v; the ViT's fused ``qkv`` output is ``'heads'`` too), ``'mlp'`` (MLP hidden
units; the merger's hidden layer), ``'vocab'``, ``'norm'``; the patch dimension of ``patch_embed`` and the query
index are unnamed (replicated). The VLM's tensor-parallel rules map heads/kv_heads/mlp/vocab to ``'tensor'``.

Precision: ``param_dtype`` parameters, ``dtype`` matmuls/residual stream (bf16 at paper scale); RMSNorm
statistics, RoPE and the softmax are float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qk_jax.models.lora import LoRAConfig, LoRADense
from qk_jax.ops.attention import attention
from qk_jax.ops.rope import (
    apply_rope_half,
    mrope_cos_sin,
    mrope_position_ids,
    vision_position_ids,
    vision_rope_cos_sin,
)

QUERY_ATTENTION = ("causal", "bidirectional")
VISION_NORM_EPS = 1e-6  # hard-coded in Qwen2_5_VLVisionBlock and Qwen2_5_VLPatchMerger
# Qwen2.5-VL's released preprocessor (max_pixels = 12845056 = 28 * 28 * 16384): the largest image the ViT takes.
DEFAULT_MAX_PIXELS = 12845056
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

# transformers fields that do not change this model's computation (initialisation, caching, dropout 0, ...).
_IGNORED_HF_FIELDS = {
    "initializer_range", "use_cache", "attention_dropout", "sliding_window", "max_window_layers", "layer_types",
    "pad_token_id", "model_type", "dtype", "torch_dtype", "architectures", "transformers_version",
}


def _dtype(x: Any) -> Any:
    return jnp.dtype(x) if x is not None else None


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """``Qwen2_5_VLVisionConfig`` fields (defaults: the 7B) plus ``rope_theta`` and our ``max_pixels`` budget."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image; larger grids are refused (the ViT attention is quadratic)

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads}: the head dim must"
                             " be a whole multiple of 4 (2D RoPE)")
        if self.window_size < self.patch_size * self.spatial_merge_size:
            raise ValueError(
                f"vision window_size={self.window_size} px is smaller than one merged token"
                f" ({self.patch_size * self.spatial_merge_size} px); raise window_size")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} unknown; one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of a flattened patch: ``C * T * p * p``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """``Qwen2_5_VLTextConfig`` fields (defaults: the 7B), with the rope settings flat as in the released config."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(int(i) for i in self.mrope_section))
        if self.hidden_size != self.num_attention_heads * self.head_dim:
            raise ValueError(
                f"text head_dim {self.head_dim} x {self.num_attention_heads} heads != hidden_size {self.hidden_size};"
                " transformers' Qwen2.5-VL attention uses head_dim = hidden_size / num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of"
                             f" num_key_value_heads {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text hidden_act {self.hidden_act!r} unknown; one of {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """The whole VLM: ``Qwen2_5_VLConfig``'s fields plus the kontext queries, LoRA and dtypes."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    num_queries: int = 0  # K kontext queries (paper: 128)
    query_attention: str = "causal"
    lora: LoRAConfig = LoRAConfig()
    dtype: Any = jnp.float32  # compute
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.query_attention not in QUERY_ATTENTION:
            raise ValueError(f"query_attention={self.query_attention!r}; expected one of {QUERY_ATTENTION}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size"
                             f" {self.text.hidden_size}: the merger must output the LLM width")
        object.__setattr__(self, "dtype", _dtype(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype(self.param_dtype))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                    ) -> QwenVLConfig:
        """From the ``config.vlm`` block (``configs/common.py``: ``vision``/``text`` with transformers' names)."""
        vision = _fields(VisionConfig, cfg["vision"], "config.vlm.vision")
        text = _fields(TextConfig, cfg["text"], "config.vlm.text")
        top = {k: cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                   "num_queries", "query_attention") if k in cfg}
        lora_block = cfg.get("lora")
        lora = LoRAConfig.from_config(lora_block) if lora_block is not None and lora_block["rank"] else LoRAConfig()
        return cls(vision=vision, text=text, lora=lora, dtype=dtype, param_dtype=param_dtype, **top)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> QwenVLConfig:
        """From transformers' ``Qwen2_5_VLConfig.to_dict()`` (nested ``vision_config``/``text_config``)."""
        v, t = dict(hf["vision_config"]), dict(hf["text_config"])
        if t.get("use_sliding_window"):
            raise ValueError("text_config.use_sliding_window=True: sliding-window attention is not implemented"
                             " (Qwen2.5-VL's released configs have it off)")
        v["rope_theta"] = (v.get("rope_parameters") or {}).get("rope_theta", VisionConfig.rope_theta)
        rope = t.get("rope_parameters") or {}
        t.update(rope_theta=rope.get("rope_theta", TextConfig.rope_theta),
                 mrope_section=rope.get("mrope_section", TextConfig.mrope_section),
                 head_dim=t["hidden_size"] // t["num_attention_heads"],
                 tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        vision = _fields(VisionConfig, v, "vision_config", strict=False)
        text = _fields(TextConfig, t, "text_config", strict=False)
        top = {k: hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        return cls(vision=vision, text=text, **top, **overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """kwargs of transformers' ``Qwen2_5_VLConfig(**...)`` for this model (without the queries and LoRA)."""
        v, t = self.vision, self.text
        vision = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)
                  if f.name not in ("rope_theta", "max_pixels")}
        vision.update(fullatt_block_indexes=list(v.fullatt_block_indexes),
                      rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta))
        text = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)
                if f.name not in ("rope_theta", "mrope_section", "head_dim", "tie_word_embeddings")}
        text["rope_parameters"] = dict(rope_type="default", rope_theta=t.rope_theta,
                                       mrope_section=list(t.mrope_section))
        return dict(vision_config=vision, text_config=text, image_token_id=self.image_token_id,
                    video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                    vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=t.tie_word_embeddings)


def _fields(cls: type, block: Mapping[str, Any], where: str, strict: bool = True) -> Any:
    """``cls(**block)`` keeping ``cls``'s fields; other keys raise (``strict``) unless transformers-only."""
    names = {f.name for f in dataclasses.fields(cls)}
    block = dict(block)
    unknown = sorted(set(block) - names - _IGNORED_HF_FIELDS)
    if strict and unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {k: v for k, v in block.items() if k in names}
    for k in ("fullatt_block_indexes", "mrope_section"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    return cls(**kwargs)


class QwenVLOutput(NamedTuple):
    """What ``QwenVL`` returns; sequences are ``[prompt (S); queries (K)]``, length ``L = S + K``.

    Attributes:
      hidden_states: ``[B, L, hidden]`` after the final RMSNorm (what Query-Kontext feeds its connector).
      text_mask: bool ``[B, L]``: valid prompt tokens that are not image pads (T of the paper).
      image_mask: bool ``[B, L]``: the ``<|image_pad|>`` tokens that carry image features.
      query_mask: bool ``[B, L]``: the K kontext queries (the last K positions; Q of the paper).
      position_ids: int32 ``[B, L, 3]`` M-RoPE positions.
      rope_deltas: int32 ``[B]``: max position + 1 - valid length (for generation after the prompt).
      logits: ``[B, L, vocab]`` float32 when asked for, else None.
    """

    hidden_states: jax.Array
    text_mask: jax.Array
    image_mask: jax.Array
    query_mask: jax.Array
    position_ids: jax.Array
    rope_deltas: jax.Array
    logits: jax.Array | None = None


# ----------------------------------------------------------------------------------------------------------
# Static vision layout (NumPy on the grid sizes)
# ----------------------------------------------------------------------------------------------------------


def normalize_grid(image_grid_thw: Any) -> tuple[tuple[int, int, int], ...]:
    """``image_grid_thw`` as a static tuple of ``(t, h, w)``; refuses traced arrays (the layout must be static)."""
    if image_grid_thw is None:
        return ()
    if isinstance(image_grid_thw, jax.core.Tracer):
        raise ValueError("image_grid_thw must be static (a tuple or NumPy array), not a traced array: it fixes the"
                         " ViT's sequence layout. Pass it as a static argument of jit.")
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    return tuple(tuple(int(x) for x in row) for row in grid)


def vision_window_index(
    grid_thw: Sequence[Sequence[int]], spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ViT's window reordering, transformers ``vision_utils.get_vision_window_index``, on static grids.

    Merged tokens (``m x m`` patches) are regrouped into windows of ``window_size // m // patch_size`` merged
    tokens a side (the last row/column of windows may be partial), windows in row-major order, frames and
    images one after another.

    Returns:
      ``(index, window_id)``, int ``[U]`` each over the ``U`` merged tokens: ``index[i]`` is the merged token put
      at place ``i``, ``window_id[i]`` numbers its window (distinct over all images).
    """
    ws = window_size // spatial_merge_size // patch_size
    index, window_id, offset, n_windows = [], [], 0, 0
    for t, h, w in grid_thw:
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        nh, nw = -(-gh // ws), -(-gw // ws)
        padded = np.full((t, nh * ws, nw * ws), -1, np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        ids = np.broadcast_to(np.arange(t * nh * nw)[:, None], padded.shape)
        keep = padded >= 0
        index.append(padded[keep] + offset)
        window_id.append(ids[keep] + n_windows)
        offset += t * gh * gw
        n_windows += t * nh * nw
    return np.concatenate(index), np.concatenate(window_id)


def vision_frame_ids(grid_thw: Sequence[Sequence[int]], spatial_merge_size: int) -> np.ndarray:
    """Frame number (distinct over images) of every merged token, int ``[U]``: the full-attention segments."""
    per = [np.repeat(np.arange(t), h * w // spatial_merge_size**2) for t, h, w in grid_thw]
    starts = np.cumsum([0] + [t for t, _, _ in grid_thw])[:-1]
    return np.concatenate([p + s for p, s in zip(per, starts)])


class SegmentBlocks(NamedTuple):
    """A static packing of contiguous segments into ``n`` equal blocks of ``width`` tokens (padding at the ends).

    Attention within segments then runs on ``[n, width]`` blocks with a padding mask: memory and work grow with
    ``n * width**2`` instead of the ``N**2`` of one masked sequence (the ViT's windows are 64 patches at paper
    scale, its images thousands).
    """

    gather: np.ndarray  # int [n, width]: the token at each block slot (0 on padding)
    valid: np.ndarray  # bool [n, width]
    scatter: np.ndarray  # int [N]: the flat block slot (block * width + offset) of each token


def segment_blocks(segment_ids: np.ndarray) -> SegmentBlocks:
    """``SegmentBlocks`` of a static segment-id sequence whose segments are contiguous runs."""
    segment_ids = np.asarray(segment_ids)
    starts = np.flatnonzero(np.r_[True, segment_ids[1:] != segment_ids[:-1]])
    if len(np.unique(segment_ids[starts])) != len(starts):
        raise ValueError("segments must be contiguous runs of equal ids")
    lengths = np.diff(np.r_[starts, len(segment_ids)])
    width = int(lengths.max())
    offset = np.arange(width)
    valid = offset[None, :] < lengths[:, None]
    gather = np.where(valid, starts[:, None] + offset[None, :], 0)
    block = np.repeat(np.arange(len(starts)), lengths)
    scatter = block * width + np.arange(len(segment_ids)) - starts[block]
    return SegmentBlocks(gather, valid, scatter)


def check_inputs(config: QwenVLConfig, input_ids: Any, image_grid_thw: Any = None, pixel_values_shape: Any = None,
                 image_present: Any = None) -> None:
    """Host-side checks that raise a ValueError naming the problem: image sizes against the pixel budget and the
    patch layout, ``pixel_values`` against the grids, and (for concrete ``input_ids``) the number of
    ``<|image_pad|>`` tokens against the number of image features. ``QwenVL`` runs them on every call, the token
    count only when ``input_ids`` is not traced: callers that jit the model validate their batches with this
    function on the host (the processor's outputs always pass)."""
    v = config.vision
    grid = normalize_grid(image_grid_thw)
    for i, (t, h, w) in enumerate(grid):
        pixels = h * w * v.patch_size**2
        if pixels > v.max_pixels:
            raise ValueError(
                f"image {i} is {h * v.patch_size}x{w * v.patch_size} px = {pixels} pixels, above the configured budget"
                f" vision.max_pixels={v.max_pixels}; resize it (the processor's smart_resize does) or raise max_pixels")
        if h % v.spatial_merge_size or w % v.spatial_merge_size or min(t, h, w) < 1:
            raise ValueError(f"image {i}: grid (t, h, w)={(t, h, w)} patches must be positive and h, w multiples of"
                             f" spatial_merge_size={v.spatial_merge_size}")
    n_patches = sum(t * h * w for t, h, w in grid)
    rows = 1
    if pixel_values_shape is not None:
        shape = tuple(pixel_values_shape)
        rows = shape[0] if len(shape) == 3 else 1
        if len(shape) not in (2, 3) or shape[-2:] != (n_patches, v.patch_dim):
            raise ValueError(f"pixel_values has shape {shape}; image_grid_thw {grid} needs [{n_patches}, {v.patch_dim}]"
                             f" (or [rows, {n_patches}, {v.patch_dim}])")
    if image_present is not None and np.size(image_present) != rows * len(grid):
        raise ValueError(f"image_present has {np.size(image_present)} entries for {rows} x {len(grid)} images")
    concrete = lambda x: x is None or not isinstance(x, jax.core.Tracer)
    if input_ids is not None and concrete(input_ids) and concrete(image_present):
        n_pad = int(np.sum(np.asarray(input_ids) == config.image_token_id))
        tokens = np.tile([t * h * w // v.merge_unit for t, h, w in grid], rows)
        if image_present is not None:
            tokens = tokens[np.asarray(image_present, bool).reshape(-1)]
        n_features = int(tokens.sum())
        if n_pad > n_features:
            raise ValueError(
                f"input_ids have {n_pad} <|image_pad|> tokens (id {config.image_token_id}) but the images give only"
                f" {n_features} features; each image of grid (t, h, w) needs t*h*w/{v.merge_unit} pad tokens."
                " Build prompts with qk_jax.data.qwen_processor, or pass the missing images")
        if n_pad < n_features:
            raise ValueError(
                f"input_ids have {n_pad} <|image_pad|> tokens (id {config.image_token_id}) but the images give"
                f" {n_features} features: some images have no place in the prompt; drop them, mark them absent"
                " (image_present) or add their pad tokens")


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``Qwen2_5_VLRMSNorm``: ``scale * x / rms(x)``, float32 statistics; param ``scale`` (transformers ``weight``)."""

    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(dtype) * scale.astype(dtype)


def _dense(config: QwenVLConfig, features: int, axes: tuple[str | None, str | None], name: str | None,
           use_bias: bool = True) -> LoRADense:
    return LoRADense(features, use_bias=use_bias, lora=config.lora, kernel_axes=axes, dtype=config.dtype,
                     param_dtype=config.param_dtype, kernel_init=nn.initializers.normal(0.02), name=name)


class MLP(nn.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))`` (``Qwen2_5_VLMLP`` with biases in the ViT, ``Qwen2MLP`` without)."""

    config: QwenVLConfig
    intermediate_size: int
    act: str
    use_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = _dense(self.config, self.intermediate_size, ("embed", "mlp"), "gate_proj", self.use_bias)(x)
        up = _dense(self.config, self.intermediate_size, ("embed", "mlp"), "up_proj", self.use_bias)(x)
        down = _dense(self.config, x.shape[-1], ("mlp", "embed"), "down_proj", self.use_bias)
        return down(ACTIVATIONS[self.act](gate) * up)


class VisionAttention(nn.Module):
    """``Qwen2_5_VLVisionAttention``: fused ``qkv``, 2D RoPE, attention within segments (frames or windows).

    transformers runs one attention per ``cu_seqlens`` segment; here the segments are gathered into padded
    blocks (``SegmentBlocks``) that ``attention`` takes as a batch with a padding mask.
    """

    config: QwenVLConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, blocks: SegmentBlocks) -> jax.Array:
        v = self.config.vision
        batch, length, width = x.shape
        qkv = _dense(self.config, 3 * width, ("embed", "heads"), "qkv")(x)
        q, k, val = jnp.moveaxis(qkv.reshape(batch, length, 3, v.num_heads, v.head_dim), 2, 0)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        n, block = blocks.gather.shape
        to_blocks = lambda a: a[:, blocks.gather.reshape(-1)].reshape(batch * n, block, v.num_heads, v.head_dim)
        valid = jnp.asarray(np.tile(blocks.valid, (batch, 1)))
        out = attention(to_blocks(q), to_blocks(k), to_blocks(val), kv_mask=valid, q_mask=valid)
        out = out.reshape(batch, n * block, width)[:, blocks.scatter]
        return _dense(self.config, width, ("heads", "embed"), "proj")(out)


class VisionBlock(nn.Module):
    """``Qwen2_5_VLVisionBlock``: pre-norm attention and SwiGLU MLP, both residual."""

    config: QwenVLConfig

    @nn.compact
    def __call__(self, x, cos, sin, blocks):
        v, c = self.config.vision, self.config
        x = x + VisionAttention(c, name="attn")(RMSNorm(VISION_NORM_EPS, c.dtype, c.param_dtype, name="norm1")(x),
                                                cos, sin, blocks)
        mlp = MLP(c, v.intermediate_size, v.hidden_act, use_bias=True, name="mlp")
        return x + mlp(RMSNorm(VISION_NORM_EPS, c.dtype, c.param_dtype, name="norm2")(x))


class PatchEmbed(nn.Module):
    """``Qwen2_5_VisionPatchEmbed``: the Conv3d with kernel = stride is a linear map of the flattened patch."""

    config: QwenVLConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        proj = _dense(self.config, self.config.vision.hidden_size, (None, "embed"), "proj", use_bias=False)
        return proj(pixel_values.astype(self.config.dtype))


class PatchMerger(nn.Module):
    """``Qwen2_5_VLPatchMerger``: RMSNorm, concatenate each ``m x m`` block of patches, GELU MLP to the LLM width."""

    config: QwenVLConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, v = self.config, self.config.vision
        x = RMSNorm(VISION_NORM_EPS, c.dtype, c.param_dtype, name="ln_q")(x)
        x = x.reshape(x.shape[0], -1, v.hidden_size * v.merge_unit)
        x = jax.nn.gelu(_dense(c, x.shape[-1], ("embed", "mlp"), "mlp_0")(x), approximate=False)
        return _dense(c, v.out_hidden_size, ("mlp", "embed"), "mlp_2")(x)


class VisionTransformer(nn.Module):
    """``Qwen2_5_VisionTransformerPretrainedModel``: ``[B_v, N, patch_dim]`` patches -> ``[B_v, N/m², out]``."""

    config: QwenVLConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array, grid_thw: tuple[tuple[int, int, int], ...]) -> jax.Array:
        v = self.config.vision
        unit = v.merge_unit
        index, window_id = vision_window_index(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        frame_id = vision_frame_ids(grid_thw, v.spatial_merge_size)[index]
        patch_order = (index[:, None] * unit + np.arange(unit)).reshape(-1)  # patches in window order

        x = PatchEmbed(self.config, name="patch_embed")(pixel_values)[:, patch_order]  # [B_v, N, C]
        pos = vision_position_ids(grid_thw, v.spatial_merge_size)[patch_order]
        cos, sin = vision_rope_cos_sin(jnp.asarray(pos), v.head_dim, v.rope_theta)
        frames = segment_blocks(np.repeat(frame_id, unit))
        windows = segment_blocks(np.repeat(window_id, unit))
        for i in range(v.depth):
            blocks = frames if i in v.fullatt_block_indexes else windows
            x = VisionBlock(self.config, name=f"blocks_{i}")(x, cos, sin, blocks)
        merged = PatchMerger(self.config, name="merger")(x)  # [B_v, U, out], window order
        return merged[:, np.argsort(index)]


class TextAttention(nn.Module):
    """``Qwen2_5_VLAttention``: GQA with q/k/v biases and M-RoPE; ``o_proj`` without bias."""

    config: QwenVLConfig

    @nn.compact
    def __call__(self, x, cos, sin, valid, mask, is_causal):
        t = self.config.text
        batch, length, _ = x.shape
        q = _dense(self.config, t.num_attention_heads * t.head_dim, ("embed", "heads"), "q_proj")(x)
        k = _dense(self.config, t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), "k_proj")(x)
        v = _dense(self.config, t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), "v_proj")(x)
        q = apply_rope_half(q.reshape(batch, length, t.num_attention_heads, t.head_dim), cos, sin)
        k = apply_rope_half(k.reshape(batch, length, t.num_key_value_heads, t.head_dim), cos, sin)
        v = v.reshape(batch, length, t.num_key_value_heads, t.head_dim)
        out = attention(q, k, v, kv_mask=valid, q_mask=valid, mask=mask, is_causal=is_causal)
        return _dense(self.config, t.hidden_size, ("heads", "embed"), "o_proj", use_bias=False)(
            out.reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    """``Qwen2_5_VLDecoderLayer``: pre-norm attention and SwiGLU MLP, both residual."""

    config: QwenVLConfig

    @nn.compact
    def __call__(self, x, cos, sin, valid, mask, is_causal):
        c, t = self.config, self.config.text
        h = RMSNorm(t.rms_norm_eps, c.dtype, c.param_dtype, name="input_layernorm")(x)
        x = x + TextAttention(c, name="self_attn")(h, cos, sin, valid, mask, is_causal)
        h = RMSNorm(t.rms_norm_eps, c.dtype, c.param_dtype, name="post_attention_layernorm")(x)
        x = x + MLP(c, t.intermediate_size, t.hidden_act, use_bias=False, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class TextModel(nn.Module):
    """``Qwen2_5_VLTextModel``: token embeddings, decoder layers and the final norm."""

    config: QwenVLConfig

    def setup(self):
        c, t = self.config, self.config.text
        self.embed_tokens = nn.Embed(
            t.vocab_size, t.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.layers = [DecoderLayer(c) for _ in range(t.num_hidden_layers)]
        self.norm = RMSNorm(t.rms_norm_eps, c.dtype, c.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits with the embedding matrix (tied LM head)."""
        return self.embed_tokens.attend(x)

    def __call__(self, x, cos, sin, valid, mask, is_causal):
        for layer in self.layers:
            x = layer(x, cos, sin, valid, mask, is_causal)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


def present_first(present: jax.Array) -> jax.Array:
    """Stable order that puts the True entries of a bool vector first (their relative order kept)."""
    return jnp.argsort(~present, stable=True)


def place_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int,
                         feature_present: jax.Array | None = None) -> jax.Array:
    """Put the ``i``-th present feature of ``features`` ``[F, H]`` at the ``i``-th ``<|image_pad|>`` of
    ``input_ids`` in batch order (transformers' ``masked_scatter``); ``feature_present`` bool ``[F]`` skips the
    features of images that are not in the prompt. Extra pad tokens would repeat the last feature:
    ``check_inputs`` refuses them."""
    if feature_present is not None:
        features = features[present_first(feature_present)]
    is_image = input_ids == image_token_id
    slot = jnp.cumsum(is_image.reshape(-1)) - 1
    taken = features[jnp.clip(slot, 0, features.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(is_image[..., None], taken.astype(embeds.dtype), embeds)


def _query_bidirectional_mask(prompt_len: int, num_queries: int) -> jax.Array:
    """bool ``[L, L]``: causal, plus every query sees every query."""
    length = prompt_len + num_queries
    i = jnp.arange(length)
    causal = i[:, None] >= i[None, :]
    is_query = i >= prompt_len
    return causal | (is_query[:, None] & is_query[None, :])


class QwenVL(nn.Module):
    """Qwen2.5-VL + kontext queries. See the module docstring for inputs and outputs."""

    config: QwenVLConfig

    def setup(self):
        c, t = self.config, self.config.text
        self.visual = VisionTransformer(c)
        self.language_model = TextModel(c)
        if not t.tie_word_embeddings:
            self.lm_head = _dense(c, t.vocab_size, ("embed", "vocab"), None, use_bias=False)
        if c.num_queries:
            self.kontext_queries = self.param(
                "kontext_queries", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (c.num_queries, t.hidden_size), c.param_dtype)

    def image_features(self, pixel_values: jax.Array, image_grid_thw: Any) -> jax.Array:
        """Merged image features ``[B_v * U, hidden]`` in batch order (transformers ``get_image_features``, joined)."""
        pixel_values = pixel_values[None] if pixel_values.ndim == 2 else pixel_values
        features = self.visual(pixel_values, normalize_grid(image_grid_thw))
        return features.reshape(-1, features.shape[-1])

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: Any = None,
        image_present: jax.Array | None = None,
        *,
        return_logits: bool = False,
    ) -> QwenVLOutput:
        """Args:
          input_ids: int ``[B, S]`` with one ``<|image_pad|>`` per merged token of every present image.
          attention_mask: ``[B, S]`` 1 for real tokens (any padding side); default all ones.
          pixel_values: ``[N, patch_dim]`` (or ``[B_v, N, patch_dim]``) patches of every image, or None.
          image_grid_thw: static ``(t, h, w)`` per image in patches (of one row of ``pixel_values``).
          image_present: bool ``[n_images]`` (or ``[B_v, n_images]``): False for an image whose patches are in
            ``pixel_values`` but whose tokens are not in the prompt (an image slot dropped for guidance, as
            ``qk_jax.data.pipeline`` batches them); default all present.
          return_logits: also compute the LM head's logits.
        """
        c, t = self.config, self.config.text
        grid = normalize_grid(image_grid_thw)
        if (pixel_values is None) != (not grid):
            raise ValueError("pass pixel_values and image_grid_thw together (both or neither)")
        check_inputs(c, input_ids, grid, None if pixel_values is None else pixel_values.shape, image_present)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, prompt_len), bool)
        valid = jnp.asarray(attention_mask).astype(bool)

        embeds = self.language_model.embed(input_ids)
        image_grid = np.zeros((0, 3), np.int64)
        if pixel_values is not None:
            rows = 1 if pixel_values.ndim == 2 else pixel_values.shape[0]
            image_grid = np.tile(np.asarray(grid, np.int64), (rows, 1))  # every image of the batch, in order
            features, feature_present = self.image_features(pixel_values, grid), None
            if image_present is not None:
                present = jnp.asarray(image_present, bool).reshape(-1)  # [rows * n_images]
                tokens = image_grid.prod(-1) // c.vision.merge_unit
                feature_present = jnp.repeat(present, tokens, total_repeat_length=int(tokens.sum()))
                # M-RoPE walks the present images only: put them first (absent ones are never reached).
                order = present_first(present)
                image_grid = jnp.asarray(image_grid)[order]
            embeds = place_image_features(embeds, input_ids, features, c.image_token_id, feature_present)
        elif self.is_initializing():  # create the ViT's parameters from a one-token image
            v = c.vision
            dummy = ((1, v.spatial_merge_size, v.spatial_merge_size),)
            self.image_features(jnp.zeros((v.merge_unit, v.patch_dim), c.dtype), dummy)

        ids, k = input_ids, c.num_queries
        if k:
            queries = jnp.broadcast_to(self.kontext_queries.astype(embeds.dtype), (batch, k, t.hidden_size))
            embeds = jnp.concatenate([embeds, queries], axis=1)
            valid = jnp.concatenate([valid, jnp.ones((batch, k), bool)], axis=1)
            ids = jnp.concatenate([input_ids, jnp.full((batch, k), -1, jnp.int32)], axis=1)
        embeds = nn.with_logical_constraint(embeds, ("batch", "length", "act_embed"))

        position_ids, deltas = mrope_position_ids(ids, valid, image_grid, image_token_id=c.image_token_id,
                                                  spatial_merge_size=c.vision.spatial_merge_size)
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.mrope_section, t.rope_theta)
        mask = None
        if k and c.query_attention == "bidirectional":
            mask = _query_bidirectional_mask(prompt_len, k)
        hidden = self.language_model(embeds, cos, sin, valid, mask, mask is None)

        logits = None
        if return_logits or self.is_initializing():
            head = self.language_model.attend if t.tie_word_embeddings else self.lm_head
            logits = head(hidden).astype(jnp.float32)

        is_image = ids == c.image_token_id
        in_prompt = jnp.arange(prompt_len + k) < prompt_len
        return QwenVLOutput(
            hidden_states=hidden,
            text_mask=valid & in_prompt & ~is_image,
            image_mask=valid & is_image,
            query_mask=jnp.broadcast_to(~in_prompt, valid.shape),
            position_ids=position_ids,
            rope_deltas=deltas,
            logits=logits if return_logits else None,
        )


def init_inputs(config: QwenVLConfig, batch: int = 1, text_len: int = 4) -> dict[str, Any]:
    """Small inputs for ``model.init``/``jax.eval_shape``: text only (the ViT is still initialised)."""
    return dict(input_ids=jnp.zeros((batch, text_len), jnp.int32), attention_mask=jnp.ones((batch, text_len), bool))


def abstract_params(config: QwenVLConfig) -> Any:
    """Boxed ``jax.ShapeDtypeStruct`` params (``{'params': ...}``) of ``QwenVL(config)``, nothing allocated."""
    return jax.eval_shape(lambda key: QwenVL(config).init(key, **init_inputs(config)), jax.random.key(0))


def param_count(config: QwenVLConfig) -> int:
    """Number of parameters (``jax.eval_shape``; never allocates). Includes ``num_queries * hidden`` query values."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(config))))


__all__ = ["QwenVL", "QwenVLConfig", "QwenVLOutput", "TextConfig", "VisionConfig", "abstract_params", "check_inputs",
           "init_inputs", "param_count", "place_image_features", "present_first", "segment_blocks", "vision_frame_ids",
           "vision_window_index"]
