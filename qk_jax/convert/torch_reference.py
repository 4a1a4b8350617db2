"""The exported model in plain torch (transformers + diffusers): the README of an export, as code.

``KontextPipeline.from_exported(folder)`` loads what ``python -m qk_jax.convert export`` wrote (``vlm/``,
``transformer/``, ``vae/``, ``kontext.safetensors``, ``kontext_config.json``) with the libraries' own
``from_pretrained`` and runs Query-Kontext with their modules only; nothing of qk_jax is imported, so it is an
independent check of the export (tests/test_torch_reference.py: equal to ``QueryKontext`` within 1e-4 in float32).

- ``condition``: Qwen2.5-VL on ``inputs_embeds`` = token embeddings with the ViT's features on the image pads, plus
  the K kontext query embeddings appended after the prompt; M-RoPE positions from transformers' ``get_rope_index``
  on the prompt, the queries at ``max + 1 .. max + K`` of the sample's valid positions. The connector maps the
  prompt's and the queries' last hidden states; context = ``[connector(T); connector(Q)]`` with the text mask.
- ``velocity``: diffusers' ``FluxTransformer2DModel`` one sample at a time (it takes batch-shared ids), the image
  stream ordered and placed by sRoPE, masked context tokens and empty slots dropped (equivalent to masking them
  out of attention, for the target's output).
- ``sample``: plain Euler on FLUX's shifted schedule, no guidance.

Import this module only where torch, transformers and diffusers are installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

# Slot roles of in-context images (the codes of ``qk_jax.ops.rope``, repeated here to stay torch-only).
NONE, SOURCE, REFERENCE = 0, 1, 2


class Conditioning(NamedTuple):
    """The MMDiT's text stream: context ``[B, L, D]``, its mask bool ``[B, L]``, pooled ``[B, D]``."""

    context: torch.Tensor
    context_mask: torch.Tensor
    pooled: torch.Tensor


def image_ids(h: int, w: int, role: int, n: int = 0, source_offset: str = "negate") -> torch.Tensor:
    """sRoPE ids ``[h*w, 3]`` (row-major tokens): target ``(0, r, c)``, source ``(0, -r, -c)`` (``source_offset``
    ``"axis0"``: FLUX.1 Kontext's ``(1, r, c)``), reference ``n`` ``(0, r + h n, c + w n)``."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    axis0 = torch.zeros_like(rows)
    if role == SOURCE and source_offset == "axis0":
        axis0 = axis0 + 1
    elif role == SOURCE:
        rows, cols = -rows, -cols
    elif role == REFERENCE:
        rows, cols = rows + h * n, cols + w * n
    return torch.stack([axis0, rows, cols], dim=-1).float()


def in_context_stream(noisy: torch.Tensor, in_context: torch.Tensor | None, roles: list[int], h: int, w: int,
                      source_offset: str = "negate") -> tuple[torch.Tensor, torch.Tensor, int]:
    """One sample's image stream: ``source | target | reference_1..N`` (empty slots left out), its ids, and the
    target's first token. ``noisy`` ``[T, C]``, ``in_context`` ``[M, T, C]``, ``roles`` ``[M]``."""
    blocks, ids = [], []
    for m, role in enumerate(roles):
        if role == SOURCE:
            blocks.append(in_context[m])
            ids.append(image_ids(h, w, SOURCE, source_offset=source_offset))
    start = sum(b.shape[0] for b in blocks)
    blocks.append(noisy)
    ids.append(image_ids(h, w, NONE))
    n = 0
    for m, role in enumerate(roles):
        if role == REFERENCE:
            n += 1
            blocks.append(in_context[m])
            ids.append(image_ids(h, w, REFERENCE, n))
    return torch.cat(blocks), torch.cat(ids), start


def unpack_latents(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """FLUX unpacking: tokens ``[B, h*w, 4C]`` (each a 2x2 patch, channels ``(C, 2, 2)``) -> ``[B, C, 2h, 2w]``."""
    h, w = latent_hw
    b, _, c4 = tokens.shape
    return tokens.reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, 2 * h, 2 * w)


class Connector(torch.nn.Module):
    """``linear_2(GELU_exact(linear_1(x)))``, the names of ``kontext.safetensors`` (``connector.*``); with
    ``pooled_features``, ``pooled_proj`` maps the pooled mean to the transformer's pooled width."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, pooled_features: int | None = None):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_features, hidden_features)
        self.linear_2 = torch.nn.Linear(hidden_features, out_features)
        self.pooled_proj = torch.nn.Linear(out_features, pooled_features) if pooled_features else None

    def pool(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.pooled_proj is None else self.pooled_proj(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class KontextPipeline:
    """Query-Kontext from an exported folder; see the module docstring."""

    def __init__(self, vlm, transformer, vae, queries: torch.Tensor, connector: Connector, settings: dict):
        self.vlm, self.transformer, self.vae = vlm.eval(), transformer.eval(), vae.eval()
        self.queries, self.connector, self.settings = queries, connector.eval(), settings

    @classmethod
    def from_exported(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> KontextPipeline:
        folder = Path(folder)
        settings = json.loads((folder / "kontext_config.json").read_text())
        if settings.get("query_attention", "causal") != "causal":
            raise ValueError(f"{folder}: query_attention={settings['query_attention']!r}; this reference runs the"
                             " language model's causal mask only (bidirectional queries need a custom 4D mask)")
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "vlm", dtype=dtype)
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        tensors = load_file(folder / "kontext.safetensors")
        c = settings["connector"]
        connector = Connector(c["in_features"], c["hidden_features"], c["out_features"],
                              c.get("pooled_features")).to(dtype)
        connector.load_state_dict({k[len("connector."):]: v for k, v in tensors.items() if k.startswith("connector.")})
        return cls(vlm, transformer, vae, tensors["kontext_queries"].to(dtype), connector, settings)

    @torch.no_grad()
    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                  image_grid_thw: torch.Tensor | None = None) -> Conditioning:
        """Prompt ``[B, S]`` (+ transformers-layout ``pixel_values`` ``[patches, dim]`` and ``image_grid_thw``
        ``[images, 3]`` of the whole batch, in order) -> the MMDiT's context, mask and pooled vector."""
        inner = self.vlm.model
        image_token = self.vlm.config.image_token_id
        batch, prompt_len = input_ids.shape
        embeds = inner.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = torch.cat(inner.get_image_features(pixel_values, image_grid_thw).pooler_output)
            image_mask, _ = inner.get_placeholder_mask(input_ids, embeds, image_features=features)
            embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
        mask = attention_mask.bool()
        pos, _ = inner.get_rope_index(input_ids, mm_token_type_ids=(input_ids == image_token).int(),
                                      image_grid_thw=image_grid_thw, attention_mask=attention_mask)  # [3, B, S]
        # The K queries continue each sample's positions: max + 1 .. max + K on all three axes.
        k = self.queries.shape[0]
        last = torch.where(mask[None], pos, torch.zeros_like(pos)).amax(dim=(0, 2))  # [B]
        query_pos = last[:, None] + 1 + torch.arange(k)[None]  # [B, K]
        position_ids = torch.cat([pos, query_pos[None].expand(3, -1, -1)], dim=2)
        embeds = torch.cat([embeds, self.queries[None].expand(batch, -1, -1).to(embeds.dtype)], dim=1)
        full_mask = torch.cat([attention_mask, torch.ones(batch, k, dtype=attention_mask.dtype)], dim=1)
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                      position_ids=position_ids).last_hidden_state

        text_mask = mask & (input_ids != image_token)
        text, queries = self.connector(hidden[:, :prompt_len]), self.connector(hidden[:, prompt_len:])
        mode = self.settings["conditioning"]
        parts, masks = [], []
        if mode != "queries_only":
            parts.append(text)
            masks.append(text_mask)
        if mode != "text_only":
            parts.append(queries)
            masks.append(torch.ones(batch, k, dtype=torch.bool))
        if mode == "text_only":
            m = text_mask[..., None].to(text.dtype)
            pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = queries.mean(1)
        return Conditioning(torch.cat(parts, 1), torch.cat(masks, 1), self.connector.pool(pooled))

    def _place(self, roles: list[int]) -> list[int]:
        """Table 8's placement ablation (``kontext_config.json``'s ``placement``)."""
        placement = self.settings.get("placement", "task")
        if placement == "task":
            return roles
        new = REFERENCE if placement == "reference" else SOURCE
        return [NONE if r == NONE else new for r in roles]

    @torch.no_grad()
    def velocity(self, cond: Conditioning, noisy_tokens: torch.Tensor, t: torch.Tensor, latent_hw: tuple[int, int],
                 in_context: torch.Tensor | None = None, roles: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity ``[B, T, C]`` of packed noisy target tokens ``[B, T, C]`` at ``t`` ``[B]`` in [0, 1], with
        packed in-context latents ``[B, M, T, C]`` of slot ``roles`` int ``[B, M]``."""
        h, w = latent_hw
        out = []
        for b in range(noisy_tokens.shape[0]):
            sample_roles = self._place([] if roles is None else [int(r) for r in roles[b]])
            stream, img_ids, start = in_context_stream(noisy_tokens[b], None if in_context is None else in_context[b],
                                                       sample_roles, h, w,
                                                       self.settings.get("source_offset", "negate"))
            context = cond.context[b][cond.context_mask[b]]  # masked tokens dropped
            guidance = None
            if self.transformer.config.guidance_embeds:  # FLUX.1-dev layouts: the constant trained with
                guidance = torch.full((1,), float(self.settings["distilled_guidance"]), dtype=stream.dtype)
            with self._pos_embed(img_ids):
                v = self.transformer(hidden_states=stream[None], encoder_hidden_states=context[None],
                                     pooled_projections=cond.pooled[b:b + 1], timestep=t[b:b + 1].to(stream.dtype),
                                     guidance=guidance, img_ids=img_ids,
                                     txt_ids=torch.zeros(context.shape[0], 3)).sample
            out.append(v[0, start:start + h * w])
        return torch.stack(out)

    @contextlib.contextmanager
    def _pos_embed(self, img_ids: torch.Tensor):
        """``pos_embed: "sincos"``: SD3's 2D sin-cos embedding of the image ids' (row, col), added to
        ``x_embedder``'s output by a forward hook for one call (``FluxTransformer2DModel`` has no such embedding)."""
        kind = self.settings.get("pos_embed", "none")
        if kind == "none":
            yield
            return
        if kind != "sincos":
            raise ValueError(f"kontext_config.json: unknown pos_embed {kind!r}; this reference knows 'none', 'sincos'")
        c = self.transformer.config
        grid = img_ids[:, [2, 1]].T.to(torch.float64)  # diffusers' order: (col, row)
        embed = get_2d_sincos_pos_embed_from_grid(c.num_attention_heads * c.attention_head_dim, grid,
                                                  output_type="pt")
        handle = self.transformer.x_embedder.register_forward_hook(
            lambda module, args, output: output + embed.to(output.dtype))
        try:
            yield
        finally:
            handle.remove()

    def sigmas(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """FLUX's schedule: ``linspace(1, 1/n, n)`` time-shifted by ``mu(image_seq_len)``, then 0."""
        f = self.settings["flow"]
        slope = (f["max_shift"] - f["base_shift"]) / (f["max_seq_len"] - f["base_seq_len"])
        mu = image_seq_len * slope + f["base_shift"] - slope * f["base_seq_len"]
        t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
        return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()

    @torch.no_grad()
    def sample(self, cond: Conditioning, latent_hw: tuple[int, int], num_steps: int = 28,
               in_context: torch.Tensor | None = None, roles: torch.Tensor | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Euler from noise (t = 1; ``noise`` ``[B, h*w, C]``, else drawn) to packed latent tokens (t = 0),
        ``[B, h*w, C]``; no guidance."""
        h, w = latent_hw
        channels = self.transformer.config.in_channels
        x = noise if noise is not None else torch.randn(cond.pooled.shape[0], h * w, channels, generator=generator,
                                                        dtype=cond.pooled.dtype)
        sigmas = self.sigmas(num_steps, h * w)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = self.velocity(cond, x, s.expand(x.shape[0]), latent_hw, in_context, roles)
            x = x + (s_next - s) * v
        return x

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Packed normalised latent tokens ``[B, h*w, 4C]`` -> images ``[B, 3, H, W]`` in [-1, 1] (FLUX unpacking:
        each token is a 2x2 patch, channels ``(C, 2, 2)``)."""
        z = unpack_latents(tokens, latent_hw)
        v = self.settings["vae"]
        z = z / v["scaling_factor"] + (v["shift_factor"] or 0.0)
        return self.vae.decode(z).sample


__all__ = ["KontextPipeline", "Conditioning", "Connector", "image_ids", "in_context_stream", "unpack_latents"]
