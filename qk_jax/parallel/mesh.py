"""The device mesh and logical-axis shardings: the one place that turns config rules into ``NamedSharding``s.

Every parameter carries logical axis names (``nn.with_logical_partitioning``: 'embed', 'heads', 'mlp', ...).
A config holds the mesh as big_vision-style ``(axis, size)`` pairs over ('data', 'fsdp', 'tensor') and, per
model component, a list of ``(logical name, mesh axis or None)`` rules. Changing the parallelism is a config
change: the VLM's rules map heads/MLP to 'tensor' (tensor parallelism), the MMDiT's rules keep parameters
replicated (ZeRO-2 shards its gradients and optimizer state instead).

Flow for a model that is too big for one host: ``jax.eval_shape(model.init, ...)`` -> ``logical_shardings``
-> ``jax.jit(model.init, out_shardings=...)``; no host ever holds the full model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Resolve big_vision-style ``[(name, size), ...]`` with at most one ``-1`` against ``num_devices``."""
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {list(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {list(axes)}: {num_devices} devices are not divisible by the fixed axes ({known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {list(axes)} needs {math.prod(sizes)} devices but {num_devices} are available")
    return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` from ``config.mesh``, e.g. ``[('data', -1), ('fsdp', 1), ('tensor', 4)]``.

    Axes are ``Auto``: XLA's SPMD partitioner propagates shardings from the jit in/out shardings, so a
    contraction over an fsdp-sharded dim becomes an all-gather or reduce-scatter without annotations in the
    model code (``Explicit`` axes, the default of ``jax.make_mesh`` in recent JAX, would refuse it).
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = mesh_shape(axes, len(devices))
    axis_types = (AxisType.Auto,) * len(names)
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=axis_types)


def topology_devices(topology: str) -> list:
    """Devices to compile for: ``'local'`` (this host's) or a TPU topology such as ``'v5p:4x4x8'`` (128 chips),
    whose devices exist for ahead-of-time compilation only (``jax.experimental.topologies``; needs ``libtpu``,
    ``pip install libtpu``, not a TPU)."""
    if topology == "local":
        return list(jax.devices())
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # noqa: BLE001 -- libtpu missing or a bad name: both are the user's to fix
        raise ValueError(f"no TPU topology {topology!r} ({str(e).splitlines()[0][:200]}); give e.g. v5p:4x4x8 "
                         "(pip install libtpu for TPU topologies) or 'local'") from None


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every leaf of a tree of ``nn.LogicallyPartitioned`` boxes (or their abstract shapes).

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_axes_size(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> int:
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def zero_spec(shape: Sequence[int], axis_sizes: Sequence[tuple[str, int]]) -> tuple[tuple[str, ...] | None, ...]:
    """Which ZeRO axes split which dim of a leaf (a ``PartitionSpec``'s entries), without padding.

    The largest dim divisible by the product of every axis takes them all (one contiguous shard per device).
    Failing that (e.g. 192 = 64 x 3 devices and widths that are powers of two times 5), each axis on its own,
    largest first, splits the largest dim it still divides: a 2560 x 10240 kernel on ``data=64, fsdp=3`` is split
    64 ways and kept whole over the 3. Axes that divide nothing replicate; so does a scalar.
    """
    axes = [(a, s) for a, s in axis_sizes if s > 1]
    spec: list[list[str]] = [[] for _ in shape]
    by_size = sorted(range(len(shape)), key=lambda d: -shape[d])
    total = math.prod(s for _, s in axes)
    whole = next((d for d in by_size if total > 1 and shape[d] % total == 0), None)
    if whole is not None:
        spec[whole] = [a for a, _ in axes]
    else:
        remaining = list(shape)
        for axis, size in sorted(axes, key=lambda x: -x[1]):
            dim = next((d for d in sorted(range(len(shape)), key=lambda d: -remaining[d]) if remaining[d] % size == 0),
                       None)
            if dim is not None:
                spec[dim].append(axis)
                remaining[dim] //= size
    return tuple(tuple(s) if s else None for s in spec)


def zero_sharding(shape: Sequence[int], mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """ZeRO sharding of one optimizer-state (or gradient) leaf over the data-parallel ``axes`` (``zero_spec``)."""
    spec = zero_spec(shape, [(a, mesh.shape[a]) for a in axes if a in mesh.shape])
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Leading (batch) dim split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in axes if a in mesh.shape)))


def local_rows(global_batch: int, mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> slice:
    """The rows of a global batch that this process's devices hold under ``batch_sharding`` (contiguous: the mesh
    lists each process's devices together)."""
    index = batch_sharding(mesh, axes).addressable_devices_indices_map((global_batch,))
    starts = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index.values()})
    rows = slice(starts[0][0], starts[-1][1])
    if sum(stop - start for start, stop in starts) != rows.stop - rows.start:
        raise ValueError(f"this process's batch rows {starts} are not contiguous in the mesh {dict(mesh.shape)}")
    return rows


def shard_batch(batch: Any, mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> Any:
    """Put a host batch (dict of NumPy arrays) on the mesh, batch dim over the data-parallel axes.

    Single-process: ``device_put``. Multi-process: each host holds its own rows (the data pipeline shards by
    process), assembled into one global array.
    """
    sharding = batch_sharding(mesh, axes)
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def place(tree: Any, shardings: Any) -> Any:
    """Put every leaf of ``tree`` (arrays every process holds whole and alike: the same seed's init, the same
    checkpoint read) at its sharding in ``shardings``; each process fills only its own devices' shards.

    Single-process: ``device_put``. Multi-process ``device_put`` refuses shardings over other hosts' devices, so
    each shard is cut from the host copy (``make_array_from_callback``); typed PRNG keys travel as their key data.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def split_rows(x: jax.Array, axes: Sequence[str] = ("tensor",)) -> jax.Array:
    """``x`` with its batch dim (0) split over those of ``axes`` that the current mesh has (size > 1, automatic):
    inside the ZeRO step, manual over the data axes, the MMDiT then takes only its tensor-axis share of the
    device's rows instead of repeating all of them on every device of the VLM's tensor-parallel group. A no-op
    outside a mesh, on a mesh without those axes, or when the rows do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Auto}
    names = tuple(a for a in axes if a in auto and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in names)
    if not names or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(names))
