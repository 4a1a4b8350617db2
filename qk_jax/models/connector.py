"""The connector: the two-layer MLP between the VLM and the MMDiT's text stream (paper appendix D, table 11).

The same MLP (shared weights) maps the VLM's last hidden states of the prompt's text tokens ``T`` and of the
``K`` kontext query tokens ``Q`` into the MMDiT's context width; the MMDiT's text stream is
``concat(connector(T), connector(Q))``. The pooled vector FLUX takes from CLIP is the mean of the connected
kontext tokens (docs/design.md). An MMDiT whose pooled width is not its context width (FLUX.1: context 4096, CLIP's
pooled 768) gets it through the connector's own linear ``pooled_proj`` (``pooled_features``; out_features ->
pooled_features, with bias), trained with the connector from stage 1 on: the paper's MMDiT pools at the context
width and needs none.

``linear_1`` (in -> hidden), GELU, ``linear_2`` (hidden -> out). The paper says "GELU" without the variant; we use
the exact (erf) form, ``torch.nn.GELU()``'s default. Paper dims 3584 -> 960 -> 2560 with biases:
3584*960 + 960 + 960*2560 + 2560 = 3,441,600 + 2,460,160 = 5,901,760 parameters, table 11's 5.9M.

Table 9's ablation of what conditions the MMDiT (``conditioning``):

- ``'text_and_queries'`` (the paper's model): context ``[connector(T); connector(Q)]``, pooled = mean of
  ``connector(Q)``;
- ``'text_only'``: context ``connector(T)``, pooled = mean of ``connector(T)`` over the unpadded text tokens;
- ``'queries_only'``: context ``connector(Q)``, pooled = mean of ``connector(Q)``.

Logical axes: ``linear_1`` kernel ``('embed', 'mlp')`` (the VLM's width in), ``linear_2`` ``('mlp', 'embed')``
(the MMDiT's context width out), ``pooled_proj`` ``('embed', 'mlp')`` (the MMDiT's conditioning MLP's input).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.models.lora import LoRAConfig, LoRADense

CONDITIONING_MODES = ("text_and_queries", "text_only", "queries_only")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """``config.connector``: widths of the two-layer MLP; ``act`` must be ``'gelu'`` (exact GELU).

    ``pooled_features``: the MMDiT's ``pooled_projection_dim`` when it differs from ``out_features`` (a
    ``pooled_proj`` linear maps the pooled mean to it); None (the paper): the mean itself, ``out_features`` wide.
    """

    in_features: int = 3584
    hidden_features: int = 960
    out_features: int = 2560
    act: str = "gelu"
    pooled_features: int | None = None

    def __post_init__(self):
        if self.act != "gelu":
            raise ValueError(f"connector act={self.act!r} is not supported; the paper's connector uses 'gelu'")
        if self.pooled_features is not None and self.pooled_features <= 0:
            raise ValueError(f"connector pooled_features={self.pooled_features}; give a width > 0, or None to pool"
                             " at out_features")

    @property
    def pooled_width(self) -> int:
        """The width of ``ConnectorOutput.pooled`` (the MMDiT's ``pooled_projection_dim``)."""
        return self.pooled_features or self.out_features

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ConnectorConfig:
        cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"unknown connector config keys {unknown}; valid keys: {sorted(fields)}")
        return cls(**cfg)


class ConnectorOutput(NamedTuple):
    """What the MMDiT takes from the connector.

    Attributes:
      context: ``[B, L, out_features]``, the MMDiT's ``encoder_hidden_states`` (``L = Lt + K`` by default).
      context_mask: bool ``[B, L]``, False for padding text tokens (the MMDiT's ``text_mask``).
      pooled: ``[B, pooled_width]``, the MMDiT's ``pooled_projections``.
    """

    context: jax.Array
    context_mask: jax.Array
    pooled: jax.Array


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``x`` ``[B, L, D]`` over the tokens where ``mask`` ``[B, L]`` is True, in float32; x's dtype.

    A sample with no valid token gets zeros.
    """
    xf = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(xf, axis=1).astype(x.dtype)
    m = mask.astype(jnp.float32)[..., None]
    return (jnp.sum(xf * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)).astype(x.dtype)


class Connector(nn.Module):
    """The two-layer GELU MLP, and the assembly of the MMDiT's context and pooled vector.

    Attributes:
      config: the ``ConnectorConfig``.
      lora: optional adapters (module paths ``linear_1``, ``linear_2``); the paper trains the connector fully.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    config: ConnectorConfig
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        self.linear_1 = LoRADense(self.config.hidden_features, kernel_axes=("embed", "mlp"), **kw)
        self.linear_2 = LoRADense(self.config.out_features, kernel_axes=("mlp", "embed"), **kw)
        if self.config.pooled_features:
            self.pooled_proj = LoRADense(self.config.pooled_features, kernel_axes=("embed", "mlp"), **kw)

    def mlp(self, x: jax.Array) -> jax.Array:
        """``[..., in_features]`` -> ``[..., out_features]``: ``linear_2(gelu(linear_1(x)))``, exact GELU."""
        if x.shape[-1] != self.config.in_features:
            raise ValueError(f"connector input has width {x.shape[-1]} but config.connector.in_features is"
                             f" {self.config.in_features} (the VLM's hidden size)")
        return self.linear_2(nn.gelu(self.linear_1(x), approximate=False))

    def __call__(
        self,
        text: jax.Array | None,  # [B, Lt, in_features]: VLM hidden states of the prompt's text tokens
        queries: jax.Array | None,  # [B, K, in_features]: VLM hidden states of the kontext queries
        text_mask: jax.Array | None = None,  # [B, Lt] bool, False for padding
        conditioning: str = "text_and_queries",
    ) -> ConnectorOutput:
        """The MMDiT's context ``concat(mlp(T), mlp(Q))``, its mask, and the pooled vector (see module doc)."""
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {CONDITIONING_MODES}")
        use_text, use_queries = conditioning != "queries_only", conditioning != "text_only"
        if use_text and text is None:
            raise ValueError(f"conditioning={conditioning!r} needs the text hidden states")
        if use_queries and queries is None:
            raise ValueError(f"conditioning={conditioning!r} needs the kontext query hidden states")

        parts, masks = [], []
        if use_text:
            t = self.mlp(text)  # [B, Lt, out]
            parts.append(t)
            masks.append(jnp.ones(t.shape[:2], bool) if text_mask is None else jnp.asarray(text_mask, bool))
        if use_queries:
            q = self.mlp(queries)  # [B, K, out]
            parts.append(q)
            masks.append(jnp.ones(q.shape[:2], bool))
        pooled = masked_mean(q, None) if use_queries else masked_mean(t, text_mask)  # [B, out_features]
        if self.config.pooled_features:
            pooled = self.pooled_proj(pooled)  # [B, pooled_features]
        return ConnectorOutput(jnp.concatenate(parts, axis=1), jnp.concatenate(masks, axis=1), pooled)


__all__ = ["ConnectorConfig", "Connector", "ConnectorOutput", "CONDITIONING_MODES", "masked_mean"]
