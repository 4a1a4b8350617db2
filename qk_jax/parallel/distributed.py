"""Joining the processes of a multi-host run (``jax.distributed``), from the environment the job runs in.

Explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; any of
them set starts the join, the others are left to JAX's cluster detection. Detected: SLURM (``SLURM_NTASKS`` > 1),
Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) and a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` naming more
than one worker), which JAX reads on its own; ``QK_JAX_DISTRIBUTED=1`` joins whatever JAX detects (what
``launch/tpu_pod.sh`` sets on every worker). On CPU the processes talk through gloo collectives (JAX's CPU
default has none across processes). One process with none of these: nothing to join.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from jax.experimental import multihost_utils

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _more_than_one(value: str | None) -> bool:
    try:
        return int(value or "1") > 1
    except ValueError:
        return False


def cluster_detected(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment describes a job of several processes."""
    return (env.get("QK_JAX_DISTRIBUTED") == "1" or any(env.get(name) for name in EXPLICIT)
            or _more_than_one(env.get("SLURM_NTASKS"))
            or _more_than_one(env.get("OMPI_COMM_WORLD_SIZE")) or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_from_environment(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Join the job's processes when the environment describes several (``cluster_detected``); returns
    ``(process_index, process_count)``. Call it before anything touches a device."""
    if cluster_detected(env):
        if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        number = lambda name: int(env[name]) if env.get(name) else None  # noqa: E731
        jax.distributed.initialize(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
                                   num_processes=number("JAX_NUM_PROCESSES"), process_id=number("JAX_PROCESS_ID"))
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Every process waits here for the others (a no-op alone): around a file operation one process does for all."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
