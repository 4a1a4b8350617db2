"""Parallelism: the ('data', 'fsdp', 'tensor') mesh and logical-axis shardings of pytrees (``mesh``) and the
per-device memory/FLOPs planner (``planner``). The rules themselves are configuration: ``config.mesh`` and
``config.sharding``."""
