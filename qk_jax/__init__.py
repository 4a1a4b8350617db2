"""qk_jax: Query-Kontext (arXiv 2509.26641) in JAX/Flax.

The library: ``ops`` (jitted stateless kernels: RoPE/sRoPE, flow matching, attention), ``models`` (linen modules:
LoRA, the Qwen2.5-VL, MMDiT, VAE and connector, the assembled model, the exported-model format), ``data``,
``parallel``, ``training``, ``sampling``, ``evaluation``, ``convert``, ``perf``. The commands (``python -m
qk_jax.train``, ``sample``, ``evaluate``, ``diagnose``, ``pretrain``, ``ablate``, ``bench``, ``plan``,
``convert``) are thin files over it (docs/layout.md). From Python, ``from qk_jax import QueryKontextPipeline``
samples a checkpoint diffusers-style (``qk_jax.sampling.kontext_pipeline``).
"""

__version__ = "0.1.0"

# Public names imported on first use (PEP 562), so that ``import qk_jax`` (and every command's start) stays light:
# the pipeline pulls in JAX and the models.
_LAZY = {"QueryKontextPipeline": "qk_jax.sampling.kontext_pipeline"}
__all__ = ["QueryKontextPipeline", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
