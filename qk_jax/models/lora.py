"""LoRA (Hu et al. 2021) as a dense layer any module can use, plus pure functions over params pytrees.

``LoRADense`` is a drop-in ``nn.Dense``: same ``kernel``/``bias`` names and shapes (so converters map them as
plain linears), and, when its module path matches one of the configured target regexes, two more leaves
beside them:

- ``lora_a`` ``[in, rank]``, Kaiming-uniform like PEFT's ``lora_A`` (bound ``1/sqrt(in)``);
- ``lora_b`` ``[rank, out]``, zeros, so a fresh adapter leaves the layer's output unchanged.

``y = x W + b + (alpha / rank) * (x A) B``. As in PEFT, ``rank`` is in the weights (``lora_a.shape[-1]``) and
``alpha`` is configuration: ``merge_lora(params, alpha)`` folds the adapters into the kernels, which is what
stage 1 -> 2 (VLM) and export do. Paper: MLLM r=128, alpha=256; MMDiT r=256, alpha=256 (section 4).

The param functions take plain (unboxed) params, i.e. arrays, not ``nn.LogicallyPartitioned`` boxes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax.ops.fp8 import fp8_matmul
from qk_jax.pytree import match_any

LORA_A, LORA_B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how big. ``rank == 0`` means no LoRA anywhere."""

    rank: int = 0
    alpha: float = 1.0
    targets: tuple[str, ...] = ()  # regexes, re.search over the '/'-joined module path

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> LoRAConfig:
        """From a config block ``{rank, alpha, targets}`` (``None`` -> no LoRA)."""
        if cfg is None:
            return cls()
        return cls(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), targets=tuple(cfg["targets"]))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, module_path: str) -> bool:
        return self.rank > 0 and match_any(module_path, self.targets)


class LoRADense(nn.Module):
    """``nn.Dense`` with an optional low-rank adapter, chosen by ``lora.targets`` against this module's path.

    Attributes:
      features: output width.
      use_bias: add a bias.
      lora: adapter config; ``None`` or rank 0 gives a plain dense layer.
      kernel_axes: logical axis names of the kernel ``(in, out)``; the adapter uses
        ``(in, 'lora_rank')`` and ``('lora_rank', out)``.
      dtype: compute dtype (default: from the inputs and params).
      param_dtype: parameter dtype.
      fp8: ``x @ kernel`` in float8 with per-tensor current scaling (``qk_jax.ops.fp8``); the adapter's two
        thin matmuls and the bias stay in ``dtype``.
    """

    features: int
    use_bias: bool = True
    lora: LoRAConfig | None = None
    kernel_axes: tuple[str | None, str | None] = (None, None)
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    fp8: bool = False
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (in_features, self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[1:]), (self.features,), self.param_dtype
            )
        lora_a = lora_b = None
        if self.lora is not None and self.lora.applies_to("/".join(self.path)):
            rank = self.lora.rank
            lora_a = self.param(
                LORA_A,
                nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), (self.kernel_axes[0], "lora_rank")
                ),
                (in_features, rank),
                self.param_dtype,
            )
            lora_b = self.param(
                LORA_B,
                nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank", self.kernel_axes[1])),
                (rank, self.features),
                self.param_dtype,
            )

        x, kernel, bias, lora_a, lora_b = nn.dtypes.promote_dtype(x, kernel, bias, lora_a, lora_b, dtype=self.dtype)
        y = fp8_matmul(x, kernel) if self.fp8 else jnp.matmul(x, kernel, precision=self.precision)
        if lora_a is not None:
            down = jnp.matmul(x, lora_a, precision=self.precision)
            y = y + jnp.matmul(down, lora_b, precision=self.precision) * jnp.asarray(self.lora.scale, y.dtype)
        if bias is not None:
            y = y + bias
        return y


# ----------------------------------------------------------------------------------------------------------
# Pure functions on params pytrees
# ----------------------------------------------------------------------------------------------------------


def _is_adapted(node: Any) -> bool:
    return isinstance(node, Mapping) and LORA_A in node and LORA_B in node


def merge_lora(params: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Fold every adapter into its kernel, ``W + (alpha / rank) A B``, and drop the adapter leaves.

    Works on any subtree (e.g. ``params['vlm']``) and on layer-stacked kernels ``[L, in, out]``. The product is
    taken in float32 and cast back to the kernel's dtype. Parts without adapters are returned as they are.
    """

    def merge(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        if _is_adapted(node):
            if "kernel" not in node:
                raise ValueError(f"found {LORA_A}/{LORA_B} without a kernel beside them: keys {sorted(node)}")
            kernel, a, b = node["kernel"], node[LORA_A], node[LORA_B]
            delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * (alpha / a.shape[-1])
            merged = {k: merge(v) for k, v in node.items() if k not in (LORA_A, LORA_B)}
            merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
            return merged
        return {k: merge(v) for k, v in node.items()}

    return merge(params)


def lora_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter leaves only, in the same nesting (empty branches pruned)."""

    def keep(node: Any) -> dict[str, Any]:
        out = {}
        for k, v in node.items():
            if k in (LORA_A, LORA_B) and not isinstance(v, Mapping):
                out[k] = v
            elif isinstance(v, Mapping):
                sub = keep(v)
                if sub:
                    out[k] = sub
        return out

    return keep(params)


def strip_lora(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params without any adapter leaves (the base model, unmerged)."""
    return {
        k: strip_lora(v) if isinstance(v, Mapping) else v for k, v in params.items() if k not in (LORA_A, LORA_B)
    }


__all__: Sequence[str] = ["LoRAConfig", "LoRADense", "merge_lora", "lora_params", "strip_lora"]
