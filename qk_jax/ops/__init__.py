"""Stateless, jittable kernels: ``rope`` (N-axis RoPE and sRoPE ids), ``flow`` (flow matching), ``attention``,
``fp8`` (the float8 matmul of ``config.fp8``)."""
