"""Stateless, jittable kernels: ``rope`` (N-axis RoPE and sRoPE ids), ``flow`` (flow matching), ``attention``,
``cotangent`` (a backward-pass fusion barrier for XLA:CPU)."""
