"""qk_jax: Query-Kontext (arXiv 2509.26641) in JAX/Flax.

The library: ``ops`` (jitted stateless kernels: RoPE/sRoPE, flow matching, attention), ``models`` (linen modules:
LoRA, the Qwen2.5-VL, MMDiT, VAE and connector, the assembled model, the exported-model format), ``data``,
``parallel``, ``training``, ``sampling``, ``evaluation``, ``convert``, ``perf``. The commands (``python -m
qk_jax.train``, ``sample``, ``evaluate``, ``diagnose``, ``pretrain``, ``ablate``, ``bench``, ``plan``,
``convert``) are thin files over it (README "Layout").
"""

__version__ = "0.1.0"
