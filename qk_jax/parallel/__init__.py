"""Parallelism: the ('data', 'fsdp', 'tensor') mesh and logical-axis shardings of pytrees (``mesh``; lands with
the training issue). The rules themselves are configuration: ``config.mesh`` and ``config.sharding``."""
