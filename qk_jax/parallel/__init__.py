"""Parallelism: the ('data', 'fsdp', 'tensor') mesh and logical-axis shardings of pytrees (``mesh``), the ZeRO-2
gradient over the data axes (``zero``), the per-device memory/FLOPs/collectives planner (``planner``) and joining a
multi-process job (``distributed``). The rules themselves are configuration: ``config.mesh`` and
``config.sharding``."""
