r"""ZeRO-2 over the data-parallel axes (appendix D: "parameter sharding (ZeRO Stage-2)" for the diffusion model).

The float32 master weights of the ZeRO leaves (the trainable leaves outside the VLM, ``training.loop``) and both
Adam moments live split over the data axes ('data' x 'fsdp', ``mesh.zero_sharding``). One step, per device:

1. all-gather the masters into a whole compute copy, kernels cast to the compute dtype first (bf16 at paper
   scale: half the bytes moved), once per step;
2. forward and backward on its rows of the global batch (the noise drawn for the global batch:
   ``models.query_kontext.draw_rows``), gradients taken with respect to the compute copy;
3. reduce-scatter each ZeRO leaf's gradient, in float32, to its master's shard (``psum_scatter``); leaves held
   whole over the data axes (the VLM's, tensor-parallel) are all-reduced;
4. the optimizer updates the shards (outside this module: plain ``optax`` on sharded arrays).

So no device holds a whole float32 gradient or master of a ZeRO leaf outside the backward pass. By hand, in a
``jax.shard_map`` manual over the data axes and automatic over 'tensor' (the VLM's tensor parallelism stays
XLA's): given the same layout through sharding constraints alone, XLA:CPU's partitioner all-reduces each whole
gradient and slices it (2026-12-02), which moves and holds as much as plain data parallelism; whether a
backend's passes would recover the reduce-scatter is then up to the backend. (The TPU compiler prints every
collective of a v5p topology's program, these explicit ones too, as an ``all-reduce``: its HLO text does not
tell them apart.)

The loss is summed over a device's rows and divided by the global count of rows with a loss, so the step is the
one-device step whatever the mesh (tests/test_loop.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from qk_jax.models.query_kontext import BatchRows
from qk_jax.parallel import mesh as mesh_lib
from qk_jax.pytree import path_str

# (sum of per-row losses, number of rows with a loss, per-row sums to report) of one shard of the batch.
SumLoss = Callable[[Any, jax.Array, Mapping[str, jax.Array], BatchRows], tuple[jax.Array, jax.Array, Any]]


def manual_spec(spec: PartitionSpec, axes: Sequence[str]) -> PartitionSpec:
    """The part of ``spec`` over ``axes`` (a ``shard_map`` in-spec, manual over those axes only)."""
    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n in axes)
        return kept or None
    return PartitionSpec(*(None if e is None else keep(e) for e in spec))


def _split_dims(spec: PartitionSpec) -> list[tuple[int, tuple[str, ...]]]:
    """``(dim, axis names)`` of every split dim (a spec entry is a name, a tuple of names or None)."""
    return [(dim, entry if isinstance(entry, tuple) else (entry,)) for dim, entry in enumerate(spec) if entry]


def all_gather(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    """Inside the manual region: the whole leaf from this device's shard (``spec`` from ``manual_spec``)."""
    for dim, names in _split_dims(spec):
        x = jax.lax.all_gather(x, names, axis=dim, tiled=True)
    return x


def reduce_scatter(g: jax.Array, spec: PartitionSpec, axes: Sequence[str]) -> jax.Array:
    """Inside the manual region: this device's shard of the sum over ``axes`` of every device's ``g``."""
    used = set()
    for dim, names in _split_dims(spec):
        g = jax.lax.psum_scatter(g, names, scatter_dimension=dim, tiled=True)
        used.update(names)
    rest = tuple(a for a in axes if a not in used)
    return jax.lax.psum(g, rest) if rest else g


def compute_copy(path: str, x: jax.Array, dtype: Any) -> jax.Array:
    """What the forward pass reads of a master leaf: kernels in ``dtype`` (the layers cast them to it anyway),
    everything else (biases, norm scales, embeddings) as stored."""
    return x.astype(dtype) if path.endswith("kernel") and x.dtype != dtype else x


def value_and_grad(sum_loss: SumLoss, combine: Callable[[Any, Any], Any], mesh: Mesh, axes: Sequence[str],
                   trainable_specs: Any, frozen_specs: Any, compute_dtype: Any = jnp.float32
                   ) -> Callable[..., tuple[tuple[jax.Array, Any], Any]]:
    """``f(trainable, frozen, key, batch) -> ((loss, aux), grads)``: the ZeRO-2 gradient (module docstring).

    ``trainable_specs`` / ``frozen_specs``: each leaf's ``PartitionSpec`` (its sharding's, any axis); ``loss`` is
    the global mean, ``aux`` the global sums of ``sum_loss``'s third output, ``grads`` sharded as the masters.
    ``combine(trainable, frozen)`` makes the model's params (``training.state.combine``).
    """
    axes = tuple(a for a in axes if a in mesh.shape)
    t_specs = jax.tree.map(lambda s: manual_spec(s, axes), trainable_specs)
    f_specs = jax.tree.map(lambda s: manual_spec(s, axes), frozen_specs)
    shards = mesh_lib.data_axes_size(mesh, axes)

    def local(trainable, frozen, key, batch):
        rows_here = jax.tree.leaves(batch)[0].shape[0]
        rows = BatchRows(jax.lax.axis_index(axes) * rows_here, rows_here * shards)
        compute = jax.tree_util.tree_map_with_path(
            lambda p, x, s: all_gather(compute_copy(path_str(p), x, compute_dtype), s), trainable, t_specs)
        frozen = jax.tree.map(all_gather, frozen, f_specs)

        def loss_of(params):
            loss_sum, count, aux = sum_loss(combine(params, frozen), key, batch, rows)
            return loss_sum, (count, aux)

        (loss_sum, (count, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(compute)
        denom = jnp.maximum(jax.lax.psum(count, axes), 1.0)
        grads = jax.tree.map(lambda g, x, s: reduce_scatter(g.astype(x.dtype), s, axes) / denom.astype(x.dtype),
                             grads, trainable, t_specs)
        return (jax.lax.psum(loss_sum, axes) / denom, jax.lax.psum(aux, axes)), grads

    def f(trainable, frozen, key, batch):
        batch_specs = jax.tree.map(lambda _: PartitionSpec(axes), batch)
        mapped = jax.shard_map(local, mesh=mesh, in_specs=(t_specs, f_specs, PartitionSpec(), batch_specs),
                               out_specs=((PartitionSpec(), PartitionSpec()), t_specs), axis_names=set(axes),
                               check_vma=False)
        return mapped(trainable, frozen, key, batch)

    return f
