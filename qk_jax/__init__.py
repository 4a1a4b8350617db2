"""qk_jax: Query-Kontext (arXiv 2509.26641) in JAX/Flax.

Subpackages: ``ops`` (jitted stateless kernels: RoPE/sRoPE, flow matching, attention), ``models`` (linen modules:
LoRA, and the Qwen2.5-VL, MMDiT, VAE and connector), ``data``, ``parallel``, ``training``, ``convert``.
See README.md for what works today.
"""

__version__ = "0.1.0"
