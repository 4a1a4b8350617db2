"""Rotary position embeddings: N-axis RoPE (FLUX layout) and the shifted 2D RoPE (sRoPE) position ids.

This is the only place RoPE lives in qk_jax.

N-axis RoPE (diffusers ``FluxPosEmbed`` + ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)``):
every token carries integer ids ``[..., n_axes]``; axis ``a`` owns ``axes_dim[a]`` channels of the head
(``sum(axes_dim) == head_dim``) and rotates consecutive channel pairs ``(x[2i], x[2i+1])`` by
``pos_a * theta ** (-2i / axes_dim[a])``.

sRoPE (paper section 3.1, eq. 1-4; appendix D). Ids are ``(axis0, row, col)``; on an ``h x w`` latent grid:

=========================  ======================  =========================================
token                      id                      sequence order
=========================  ======================  =========================================
text and kontext           ``(0, 0, 0)``
noisy target latent        ``(0, r, c)``
source image (editing)     ``(0, -r, -c)``         ``concat(src, noise)``
n-th reference, n = 1..N   ``(0, r + h n, c + w n)``  ``concat(noise, ref_1 .. ref_N)``
=========================  ======================  =========================================

A sample with a source and references (MIGE-style subject editing) is ``concat(src, noise, ref_1..ref_N)``.
The paper writes eq. 1/3 with ``i`` the column over ``w`` and ``j`` the row over ``h``:
``(i + w n, j + h n)``, i.e. rows shift by ``h n`` and columns by ``w n``.

Every function here is jittable; grid sizes are static Python ints, roles may be traced arrays so that one
compiled step serves a batch that mixes tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Roles of an in-context image slot (``in_context_layout``). Integer codes so they can live in a batch array.
NONE = 0  # an empty slot: its tokens are padding (absent input, or an image dropped for guidance)
SOURCE = 1  # pixel fidelity: negative quadrant, placed before the noisy target
REFERENCE = 2  # identity: positive quadrant shifted by (h n, w n), placed after the noisy target
ROLES = {"source": SOURCE, "reference": REFERENCE}

# Token kinds in a packed image stream (``Layout.kind``).
KIND_PAD = -1
KIND_TARGET = 0
KIND_SOURCE = 1
KIND_REFERENCE = 2

# Where a source image sits (``in_context_layout``'s ``source_offset``): the paper's eq. 2/4 negates its grid,
# ``(0, -r, -c)``; FLUX.1 Kontext keeps the grid and moves it along the first axis, ``(1, r, c)``. Under RoPE the
# offset between a target token and the source token at the same pixel is then position-dependent (``2r, 2c``)
# for the paper's choice and constant (``1, 0, 0``) for Kontext's: the editing ablation compares the two.
SOURCE_OFFSETS = ("negate", "axis0")


# ----------------------------------------------------------------------------------------------------------
# N-axis RoPE
# ----------------------------------------------------------------------------------------------------------


def _split_inverse_frequencies(dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``theta ** (-arange(0, dim, 2) / dim)`` as an exact-product float32 high part plus a float32 low part.

    diffusers computes angles ``pos * freq`` in float64. In float32 an angle of a few hundred radians (a
    1024-px latent with two references reaches 191; N = 4 reaches 319) is rounded to ~3e-5, which is then
    the error of cos/sin. Keeping only the top 12 mantissa bits in ``hi`` makes ``pos * hi`` exact for
    ``|pos| < 2**12``, and ``pos * lo`` is tiny, so ``cos(a_hi + a_lo)`` expanded by the angle-sum formula
    is accurate to ~1e-7. The split is done once in NumPy float64 (the frequencies are static).
    """
    if dim % 2:
        raise ValueError(f"every RoPE axis needs an even number of channels, got {dim}")
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    hi = (freqs.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
    lo = (freqs - hi.astype(np.float64)).astype(np.float32)
    return hi, lo


def rope_cos_sin(ids: jax.Array, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for integer position ids, as diffusers ``FluxPosEmbed(theta, axes_dim)(ids)``.

    Args:
      ids: ``[..., S, n_axes]`` integer (or integral float) positions; a leading batch dim gives per-sample
        tables.
      axes_dim: channels per axis, each even; ``sum(axes_dim)`` is the head dim.
      theta: RoPE base.

    Returns:
      ``(cos, sin)``, each float32 ``[..., S, sum(axes_dim)]``, every frequency repeated for its channel pair.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} axes but axes_dim={tuple(axes_dim)} has {len(axes_dim)}")
    pos = ids.astype(jnp.float32)
    cos_out, sin_out = [], []
    for axis, dim in enumerate(axes_dim):
        hi, lo = _split_inverse_frequencies(dim, theta)
        p = pos[..., axis, None]  # [..., S, 1]
        a_hi, a_lo = p * hi, p * lo  # [..., S, dim/2]
        cos_hi, sin_hi, cos_lo, sin_lo = jnp.cos(a_hi), jnp.sin(a_hi), jnp.cos(a_lo), jnp.sin(a_lo)
        cos_out.append(cos_hi * cos_lo - sin_hi * sin_lo)
        sin_out.append(sin_hi * cos_lo + cos_hi * sin_lo)
    cos = jnp.repeat(jnp.concatenate(cos_out, axis=-1), 2, axis=-1)
    sin = jnp.repeat(jnp.concatenate(sin_out, axis=-1), 2, axis=-1)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, S, H, D]`` by tables ``[S, D]`` or ``[B, S, D]`` (diffusers ``apply_rotary_emb``).

    Pairs ``(x[2i], x[2i+1])`` are rotated: ``out = x * cos + rotate(x) * sin`` with
    ``rotate(x)[2i] = -x[2i+1]``, ``rotate(x)[2i+1] = x[2i]``. Computed in float32, returned in x's dtype.
    """
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B|1, S, 1, D]
    xf = x.astype(jnp.float32)
    x_real, x_imag = xf[..., 0::2], xf[..., 1::2]
    x_rotated = jnp.stack([-x_imag, x_real], axis=-1).reshape(xf.shape)
    return (xf * cos + x_rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# sRoPE position ids
# ----------------------------------------------------------------------------------------------------------


def text_position_ids(length: int) -> jax.Array:
    """Ids of text and kontext tokens: ``(0, 0, 0)`` each, int32 ``[length, 3]``."""
    return jnp.zeros((length, 3), jnp.int32)


def _grid(h: int, w: int) -> tuple[jax.Array, jax.Array]:
    rows = jnp.repeat(jnp.arange(h, dtype=jnp.int32), w)  # row-major, as the 2x2-packed latent tokens
    cols = jnp.tile(jnp.arange(w, dtype=jnp.int32), h)
    return rows, cols


def _shifted_ids(h: int, w: int, sign: jax.Array, shift: jax.Array, axis0: jax.Array | int = 0) -> jax.Array:
    """``(axis0, sign * r + h * shift, sign * c + w * shift)`` for every cell, int32 ``[h*w, 3]``; traceable."""
    rows, cols = _grid(h, w)
    return jnp.stack([jnp.zeros_like(rows) + axis0, sign * rows + h * shift, sign * cols + w * shift], axis=-1)


def image_position_ids(h: int, w: int, role: str = "target", index: int = 0) -> jax.Array:
    """sRoPE ids of one ``h x w`` latent grid (tokens in row-major order), int32 ``[h*w, 3]``.

    Args:
      h, w: latent grid size in tokens (after 2x2 packing).
      role: ``"target"`` (the noisy latent, ``(0, r, c)``), ``"source"`` (``(0, -r, -c)``, eq. 2/4) or
        ``"reference"`` (``(0, r + h*index, c + w*index)``, eq. 1/3).
      index: the reference's number n, 1-based; only for ``role="reference"``.
    """
    if role == "target":
        sign, shift = 1, 0
    elif role == "source":
        sign, shift = -1, 0
    elif role == "reference":
        if not isinstance(index, (int, np.integer)) or index < 1:
            raise ValueError(f"a reference image needs index n >= 1 (eq. 1), got index={index!r}")
        sign, shift = 1, int(index)
    else:
        raise ValueError(f"unknown sRoPE role {role!r}; expected 'target', 'source' or 'reference'")
    if role != "reference" and index:
        raise ValueError(f"index is only meaningful for references, got index={index} for role {role!r}")
    return _shifted_ids(h, w, jnp.int32(sign), jnp.int32(shift))


class Layout(NamedTuple):
    """Where every token of a packed image stream ``[target; slot_1..slot_M]`` goes, per sample.

    Attributes:
      order: int32 ``[B, 1+M]``: block ``j`` of the sequence is block ``order[b, j]`` of
        ``[target, slot_1, .., slot_M]``. Gather the image tokens with it (``gather_blocks``).
      ids: int32 ``[B, (1+M)*h*w, 3]``: sRoPE ids in sequence order (padding tokens get ``(0, 0, 0)``).
      kind: int32 ``[B, (1+M)*h*w]``: ``KIND_TARGET``, ``KIND_SOURCE``, ``KIND_REFERENCE`` or ``KIND_PAD``,
        in sequence order. ``kind == KIND_TARGET`` is the loss mask, ``kind != KIND_PAD`` the attention mask.
    """

    order: jax.Array
    ids: jax.Array
    kind: jax.Array


def in_context_layout(h: int, w: int, roles: jax.Array, source_offset: str = "negate") -> Layout:
    """Per-sample token order and sRoPE ids of a noisy target plus M in-context image slots.

    All images of a bucket share the target's ``h x w`` grid (the bucketer resizes them). Each sample
    orders its blocks as the paper does: sources first (``concat(src, noise)``), then the noisy target,
    then references in slot order (``concat(noise, ref_1..ref_N)``), then empty slots (padding). The n-th
    reference of a sample (counting only its reference slots) is shifted by ``(h n, w n)``, so a sample's
    ids do not depend on where empty slots sit. Jittable: ``roles`` may be traced, ``h``/``w`` static.

    Args:
      h, w: latent grid size in tokens.
      roles: int ``[B, M]`` of ``NONE``/``SOURCE``/``REFERENCE`` (``M`` may be 0). At most one source per
        sample: two sources would share coordinates (``validate_roles`` checks concrete roles).
      source_offset: ``"negate"`` (the paper: ``(0, -r, -c)``) or ``"axis0"`` (FLUX.1 Kontext: ``(1, r, c)``);
        see ``SOURCE_OFFSETS``. Static.

    Returns:
      A ``Layout``.
    """
    roles = jnp.asarray(roles, jnp.int32)
    if roles.ndim != 2:
        raise ValueError(f"roles must be [batch, slots], got shape {roles.shape}")
    if source_offset not in SOURCE_OFFSETS:
        raise ValueError(f"source_offset={source_offset!r}; expected one of {SOURCE_OFFSETS}")
    batch, slots = roles.shape
    n_tok = h * w

    is_ref = roles == REFERENCE
    ref_number = jnp.where(is_ref, jnp.cumsum(is_ref, axis=1), 0)  # n = 1..N among this sample's references
    # Block sort keys: sources before the target (0), references after it in slot order, empty slots last.
    slot_key = jnp.select(
        [roles == SOURCE, is_ref], [jnp.full_like(roles, -1), ref_number], default=slots + 1 + jnp.arange(slots)
    )
    keys = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), slot_key], axis=1)  # [B, 1+M]
    order = jnp.argsort(keys, axis=1, stable=True).astype(jnp.int32)

    block_kind = jnp.concatenate(
        [jnp.full((batch, 1), KIND_TARGET, jnp.int32), jnp.select([roles == SOURCE, is_ref], [KIND_SOURCE, KIND_REFERENCE], KIND_PAD)],
        axis=1,
    )
    is_source = block_kind == KIND_SOURCE
    block_sign = jnp.where(is_source & (source_offset == "negate"), -1, 1)
    block_axis0 = jnp.where(is_source & (source_offset == "axis0"), 1, 0)
    block_shift = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), ref_number], axis=1)
    block_ids = jax.vmap(jax.vmap(lambda s, n, a: _shifted_ids(h, w, s, n, a)))(
        block_sign, block_shift, block_axis0)  # [B, 1+M, hw, 3]
    block_ids = jnp.where((block_kind == KIND_PAD)[..., None, None], 0, block_ids)

    take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    ids = take(block_ids).reshape(batch, (1 + slots) * n_tok, 3)
    kind = jnp.repeat(take(block_kind), n_tok, axis=1)
    return Layout(order=order, ids=ids, kind=kind)


def gather_blocks(tokens: jax.Array, order: jax.Array) -> jax.Array:
    """Reorder equal-size token blocks per sample: ``tokens`` ``[B, (1+M)*T, C]`` -> sequence order of ``order``."""
    batch, length = tokens.shape[:2]
    blocks = order.shape[1]
    t = tokens.reshape(batch, blocks, length // blocks, *tokens.shape[2:])
    t = jnp.take_along_axis(t, order.reshape(order.shape + (1,) * (t.ndim - 2)), axis=1)
    return t.reshape(tokens.shape)


def validate_roles(roles: np.ndarray | Sequence[Sequence[int]], max_references: int | None = None) -> None:
    """Host-side check of concrete slot roles; raises ``ValueError`` naming the sample and the fix."""
    roles = np.asarray(roles)
    if roles.ndim != 2:
        raise ValueError(f"roles must be [batch, slots], got shape {roles.shape}")
    bad = ~np.isin(roles, (NONE, SOURCE, REFERENCE))
    if bad.any():
        b, s = np.argwhere(bad)[0]
        raise ValueError(f"sample {b}, slot {s}: unknown role code {roles[b, s]} (use NONE, SOURCE or REFERENCE)")
    for b, row in enumerate(roles):
        if (row == SOURCE).sum() > 1:
            raise ValueError(f"sample {b} has {(row == SOURCE).sum()} source images; sRoPE places one source only")
        if max_references is not None and (row == REFERENCE).sum() > max_references:
            raise ValueError(
                f"sample {b} has {(row == REFERENCE).sum()} reference images but max_references={max_references};"
                " drop references or raise config.max_references"
            )


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5-VL: rotate-half RoPE, the ViT's 2D rotary table, multimodal RoPE (M-RoPE) and its position ids
# ----------------------------------------------------------------------------------------------------------
#
# transformers ``modeling_qwen2_5_vl`` (v5) rotates *halves* of the head (GPT-NeoX layout), not interleaved
# pairs: ``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = concat(-x[D/2:], x[:D/2])``, and the
# tables are ``concat(f, f)`` for ``D/2`` angles ``f``. Each angle slot ``j`` reads one position axis:
#
# - ViT (``Qwen2_5_VLVisionRotaryEmbedding``, theta 1e4): frequencies ``theta ** (-arange(0, D/2, 2) / (D/2))``
#   (``D/4`` of them), slots ``[0, D/4)`` use the patch's row, slots ``[D/4, D/2)`` its column.
# - LLM (``Qwen2_5_VLRotaryEmbedding``, theta 1e6): frequencies ``theta ** (-arange(0, D, 2) / D)``; the ``D/2``
#   slots are split into ``mrope_section`` = (t, h, w) chunks (7B: 16, 24, 24) and chunk ``i`` reads axis
#   ``i % 3`` of the token's (temporal, height, width) position.
#
# Angles use the float32 hi/lo split of ``_split_inverse_frequencies`` (error ~1e-7 instead of float32's ~1e-4
# at positions in the thousands); transformers multiplies in float32, which the parity tests stay well within.
#
# Position ids (``mrope_position_ids``) are transformers' ``Qwen2_5_VLModel.get_rope_index`` for images,
# computed with cumulative sums instead of a host loop over samples and token groups, so it is jittable and
# works on a traced batch.


def _half_split_cos_sin(pos: jax.Array, slot_axis: np.ndarray, hi: np.ndarray, lo: np.ndarray):
    """cos/sin ``[..., S, 2 * n_slots]`` of angles ``pos[..., slot_axis[j]] * (hi[j] + lo[j])``, halves repeated."""
    p = jnp.take(pos.astype(jnp.float32), jnp.asarray(slot_axis), axis=-1)  # [..., S, n_slots]
    a_hi, a_lo = p * hi, p * lo
    cos_hi, sin_hi, cos_lo, sin_lo = jnp.cos(a_hi), jnp.sin(a_hi), jnp.cos(a_lo), jnp.sin(a_lo)
    cos = cos_hi * cos_lo - sin_hi * sin_lo
    sin = sin_hi * cos_lo + cos_hi * sin_lo
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def rotate_half(x: jax.Array) -> jax.Array:
    """``concat(-x[..., D/2:], x[..., :D/2])`` (transformers ``rotate_half``)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, S, H, D]`` by tables ``[S, D]`` or ``[B, S, D]`` in the rotate-half layout.

    transformers' ``apply_rotary_pos_emb`` / ``apply_rotary_pos_emb_vision``: ``x * cos + rotate_half(x) * sin``.
    Computed in float32, returned in x's dtype.
    """
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B|1, S, 1, D]
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def vision_rope_cos_sin(pos_hw: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """2D rotary tables of the Qwen2.5-VL ViT for patch positions ``pos_hw`` ``[..., N, 2]`` (row, col).

    Returns float32 ``(cos, sin)`` ``[..., N, head_dim]`` (``Qwen2_5_VLVisionRotaryEmbedding`` + its
    ``recomposition_frequencies``).
    """
    if head_dim % 4:
        raise ValueError(f"the ViT's 2D RoPE needs a head dim divisible by 4, got {head_dim}")
    hi, lo = _split_inverse_frequencies(head_dim // 2, theta)  # head_dim / 4 frequencies
    n = hi.shape[0]
    slot_axis = np.repeat(np.arange(2), n)  # rows, then columns
    return _half_split_cos_sin(pos_hw, slot_axis, np.tile(hi, 2), np.tile(lo, 2))


def vision_position_ids(grid_thw: Sequence[Sequence[int]], spatial_merge_size: int) -> np.ndarray:
    """(row, col) of every ViT patch, int32 ``[sum(t*h*w), 2]``, in the processor's patch order.

    Patches come merge-block-major (each ``m x m`` block of patches that the merger fuses is contiguous), frames
    repeat the same grid: transformers ``vision_utils.get_vision_position_ids``. ``grid_thw`` is static
    (Python/NumPy ints, in patches).
    """
    m = spatial_merge_size
    out = []
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        if h % m or w % m:
            raise ValueError(f"image grid {h}x{w} patches is not divisible by spatial_merge_size={m}")
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([block(rows), block(cols)], axis=-1), (t, 1)))
    if not out:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(out).astype(np.int32)


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, mrope_section: Sequence[int], theta: float = 1e6
) -> tuple[jax.Array, jax.Array]:
    """M-RoPE tables of the Qwen2.5-VL LLM for positions ``[..., S, 3]`` (temporal, height, width).

    ``sum(mrope_section) == head_dim / 2``; chunk ``i`` of the frequencies reads axis ``i % 3``. Returns float32
    ``(cos, sin)`` ``[..., S, head_dim]``. A text token has equal positions on all three axes, which makes
    this ordinary 1D RoPE.
    """
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    if position_ids.shape[-1] != 3:
        raise ValueError(f"M-RoPE position ids need 3 axes (t, h, w) last, got shape {position_ids.shape}")
    hi, lo = _split_inverse_frequencies(head_dim, theta)
    slot_axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])
    return _half_split_cos_sin(position_ids, slot_axis, hi, lo)


def mrope_position_ids(
    input_ids: jax.Array,
    attention_mask: jax.Array,
    image_grid_thw: jax.Array | np.ndarray,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[jax.Array, jax.Array]:
    """M-RoPE positions of a batch, as transformers' ``Qwen2_5_VLModel.get_rope_index`` (images), vectorised.

    Over a sample's valid tokens (``attention_mask`` 1), text tokens count up by one; the ``n`` image-pad tokens
    of an image with merged grid ``(t, h, w)`` get ``start + (t_i, h_i, w_i)`` in row-major order, ``start`` being
    the position the next text token would have had; after the image, positions resume at
    ``start + max(h, w)``. Images are consumed in batch order (sample by sample, left to right), as the ViT's
    features are. Padding gets ``(0, 0, 0)``.

    Args:
      input_ids: int ``[B, S]``.
      attention_mask: ``[B, S]``, 1/True for real tokens (left or right padding, or holes).
      image_grid_thw: int ``[N, 3]`` ``(t, h, w)`` in ViT patches per image, in batch order; may be traced;
        ``N`` may be 0 (text only).
      image_token_id: the ``<|image_pad|>`` id.
      spatial_merge_size: the merger's ``m`` (grid ``h, w`` are divided by it).

    Returns:
      ``(position_ids int32 [B, S, 3], deltas int32 [B])`` with ``deltas = max position + 1 - valid length``
      (transformers' ``mrope_position_deltas``, the offset of positions generated after the prompt).
    """
    valid = jnp.asarray(attention_mask).astype(bool)
    is_image = valid & (jnp.asarray(input_ids) == image_token_id)
    is_text = valid & ~is_image
    text_before = jnp.cumsum(is_text, axis=1, dtype=jnp.int32) - is_text  # valid text tokens before each token
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    if grid.shape[0] == 0:
        pos = jnp.broadcast_to(text_before[..., None], text_before.shape + (3,))
    else:
        t, h, w = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
        n_tokens = t * h * w
        ends = jnp.cumsum(n_tokens)
        j = (jnp.cumsum(is_image.reshape(-1), dtype=jnp.int32) - 1).reshape(is_image.shape)  # global image token
        k = jnp.clip(jnp.searchsorted(ends, j, side="right"), 0, grid.shape[0] - 1)  # its image
        r = j - (ends - n_tokens)[k]  # its index within the image
        hk, wk = h[k], w[k]
        local = jnp.stack([r // (hk * wk), (r // wk) % hk, r % wk], axis=-1)  # [B, S, 3]
        advance = jnp.maximum(hk, wk)
        first = is_image & (r == 0)
        advanced = jnp.cumsum(jnp.where(first, advance, 0), axis=1, dtype=jnp.int32)  # images started so far
        base = text_before + advanced
        pos = jnp.where(is_image[..., None], (base - advance)[..., None] + local, base[..., None])
    pos = jnp.where(valid[..., None], pos, 0).astype(jnp.int32)
    deltas = jnp.max(pos, axis=(1, 2)) + 1 - valid.sum(axis=1, dtype=jnp.int32)
    return pos, deltas
