"""Stateless, jittable kernels: ``rope`` (N-axis RoPE and sRoPE ids), ``flow`` (flow matching), ``attention``."""
