"""Aspect-ratio and input-count buckets (paper appendix D): every batch has one sequence length.

Two things decide a sample's sequence lengths: its image size (the target and every input image are resized
and centre-cropped to one bucket) and its number of input images (each is a VAE in-context slot from stage 3 on
and a block of pixel patches for the VLM). ``Buckets`` maps an image to the bucket of the nearest aspect ratio
(1:1, 1:2, 2:3, 3:4, 3:5, 4:5, 9:16 and transposes, ``config.data.aspect_ratios``) at the area
``resolution**2`` with sides that are multiples of ``side_multiple``; ``bucket_batch`` groups samples whose
arrays have the same shapes (bucket x input count) into batches.

Why the batching is written here and not with Grain's ``batch``: Grain batches consecutive elements, so a batch
would mix shapes; grouping by key with a bounded buffer, padded flushes and an exactly resumable state is not in
Grain 0.2. Everything else (source, shuffle, map, prefetch) is Grain's.

``BucketBatchIterDataset`` policy, deterministic for a given input order:

- an element goes to the queue of its key (default: the shapes of all its arrays); a queue that reaches
  ``batch_size`` is emitted at once;
- the buffer holds at most ``buffer_size`` elements: when it is full the fullest queue (ties: the one holding
  the oldest element) is emitted as a partial batch; ``max_wait`` (optional) does the same for a queue whose
  oldest element was read more than ``max_wait`` reads ago;
- at the end of the input the remaining queues are emitted oldest first (or dropped with ``drop_remainder``);
- ``drop_fn`` (optional) names elements to skip (a bad record: ``drop_fn(element)`` returns its kind): they are
  counted per kind in the state (``dropped``, exact and checkpointed with it) and the first of each kind is
  logged by this iterator.

A partial batch is padded to ``batch_size`` by repeating its first element and carries ``valid`` (bool
``[batch_size]``, False on padding rows), so every batch of a bucket has one shape and the loss can be masked.
With ``buffer_size >= num_keys * (batch_size - 1) + 1`` (``lossless_buffer_size``) the buffer is never full
without a complete queue, so only the end of a finite input makes partial batches.

Exact resume without saving images: the state is the parent's state before the oldest buffered element, the
number of elements read since then and the offsets of those still buffered (at most ``buffer_size`` ints).
``set_state`` restores the parent there and re-reads that many elements, keeping the buffered ones, so the
following batches are identical to an uninterrupted run. The price is re-reading (re-decoding) the elements read
since the oldest buffered one; ``max_wait`` bounds it.

Multi-host: ``shard_for_host`` gives process ``i`` of ``n`` the records ``i::n`` of a Grain ``MapDataset``
before shuffling, so hosts read disjoint records and each host's pipeline is deterministic for the seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

log = logging.getLogger("qk_jax.data")


# ----------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------


def bucket_size(ratio: tuple[int, int], resolution: int, side_multiple: int) -> tuple[int, int]:
    """``(width, height)`` of ratio ``(w, h)`` at area ~``resolution**2``, sides rounded to ``side_multiple``."""
    rw, rh = ratio
    if rw <= 0 or rh <= 0:
        raise ValueError(f"aspect ratio {ratio} must be two positive numbers (w, h)")
    width = resolution * math.sqrt(rw / rh)
    height = resolution * math.sqrt(rh / rw)
    snap = lambda side: max(side_multiple, int(round(side / side_multiple)) * side_multiple)
    return snap(width), snap(height)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The aspect-ratio buckets of one resolution: ``ratios[i]`` (w, h) is rendered at ``sizes[i]`` (w, h)."""

    ratios: tuple[tuple[int, int], ...]
    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def create(cls, resolution: int, aspect_ratios: Sequence[Sequence[int]], side_multiple: int) -> Buckets:
        if not aspect_ratios:
            raise ValueError("config.data.aspect_ratios is empty; give at least (1, 1)")
        ratios = tuple((int(w), int(h)) for w, h in aspect_ratios)
        return cls(ratios, tuple(bucket_size(r, resolution, side_multiple) for r in ratios))

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> Buckets:
        """From ``config.data`` (``resolution``, ``aspect_ratios``, ``side_multiple``)."""
        return cls.create(int(data["resolution"]), data["aspect_ratios"], int(data.get("side_multiple", 16)))

    def __len__(self) -> int:
        return len(self.ratios)

    def assign(self, width: int, height: int) -> int:
        """Index of the bucket whose nominal ratio is nearest to ``width / height`` in log space (ties: first)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image of size {width}x{height} has no aspect ratio")
        target = math.log(width / height)
        return min(range(len(self.ratios)), key=lambda i: abs(math.log(self.ratios[i][0] / self.ratios[i][1]) - target))


# ----------------------------------------------------------------------------------------------------------
# Host sharding
# ----------------------------------------------------------------------------------------------------------


def host_position(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """``(process_index, process_count)``, each ``None`` taken from JAX (imported only then)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def shard_for_host(ds: grain.MapDataset, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
    """Records ``process_index::process_count`` of ``ds`` (default: ``jax.process_index()``/``process_count()``)."""
    process_index, process_count = host_position(process_index, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} records cannot be shared by {process_count} hosts; every host needs one")
    return ds[process_index::process_count]


# ----------------------------------------------------------------------------------------------------------
# Batching by key
# ----------------------------------------------------------------------------------------------------------


def shape_key(element: Mapping[str, Any]) -> tuple:
    """The shapes of every array of a (flat) dict: elements with one key batch into uniform arrays."""
    return tuple((k, np.shape(v)) for k, v in sorted(element.items()))


def stack_and_pad(elements: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks dicts of arrays along a new axis 0, padding to ``batch_size`` with copies of the first element.

    Adds ``valid``: bool ``[batch_size]``, True for the ``len(elements)`` real rows.
    """
    rows = list(elements) + [elements[0]] * (batch_size - len(elements))
    batch = {k: np.stack([np.asarray(row[k]) for row in rows]) for k in elements[0]}
    batch["valid"] = np.arange(batch_size) < len(elements)
    return batch


def lossless_buffer_size(num_keys: int, batch_size: int) -> int:
    """The smallest buffer that always holds a complete batch when full: no partial batch before the end."""
    return num_keys * (batch_size - 1) + 1


class BucketBatchIterDataset(grain.IterDataset):
    """Batches of ``batch_size`` elements that share a key; see the module docstring for the policy.

    Args:
      parent: the elements, e.g. decoded samples (dicts of arrays).
      batch_size: rows per batch.
      buffer_size: the most elements held back; ``lossless_buffer_size(num_keys, batch_size)`` never pads
        before the end of the input.
      key_fn: element -> hashable key (default: ``shape_key``).
      collate_fn: ``(elements, batch_size) -> batch`` (default: ``stack_and_pad``).
      max_wait: emit a queue (padded) once its oldest element was read this many reads ago; None: no limit.
      drop_remainder: drop, rather than pad and emit, the queues left at the end of a finite input.
      drop_fn: element -> None to keep it, or the reason (a string) to skip and count it.
    """

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, buffer_size: int,
                 key_fn: Callable[[Any], Hashable] = shape_key,
                 collate_fn: Callable[[Sequence[Any], int], Any] = stack_and_pad,
                 max_wait: int | None = None, drop_remainder: bool = False,
                 drop_fn: Callable[[Any], str | None] | None = None):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if buffer_size < batch_size:
            raise ValueError(f"buffer_size {buffer_size} < batch_size {batch_size}: no batch could ever fill")
        if max_wait is not None and max_wait < 1:
            raise ValueError(f"max_wait must be >= 1 or None, got {max_wait}")
        self._config = dict(batch_size=batch_size, buffer_size=buffer_size, key_fn=key_fn, collate_fn=collate_fn,
                            max_wait=max_wait, drop_remainder=drop_remainder, drop_fn=drop_fn)

    def __iter__(self) -> grain.DatasetIterator:
        return _BucketBatchIterator(self._parent.__iter__(), **self._config)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(batch_size={self._config['batch_size']})"


_END = object()  # no more input
_DROPPED = object()  # the element read was skipped


@dataclasses.dataclass
class _Entry:
    read: int  # the element's read number (0-based, since the iterator's origin)
    parent_state: Any  # the parent's state just before it was read
    element: Any


def bucket_batch(parent: grain.IterDataset, **kwargs) -> BucketBatchIterDataset:
    """``BucketBatchIterDataset(parent, **kwargs)``: for ``ds.pipe(bucket_batch, batch_size=...)``."""
    return BucketBatchIterDataset(parent, **kwargs)


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, batch_size, buffer_size, key_fn, collate_fn, max_wait,
                 drop_remainder, drop_fn):
        super().__init__(parent)
        self._batch_size, self._buffer_size, self._max_wait = batch_size, buffer_size, max_wait
        self._key_fn, self._collate_fn, self._drop_remainder = key_fn, collate_fn, drop_remainder
        self._drop_fn = drop_fn
        self._dropped: dict[str, int] = {}
        self._logged: set[str] = set()
        self._queues: dict[Hashable, deque[_Entry]] = {}
        self._buffered = 0
        self._reads = 0
        self._exhausted = False

    # Buffer ------------------------------------------------------------------------------------------------

    def _add(self, entry: _Entry) -> Hashable:
        key = self._key_fn(entry.element)
        self._queues.setdefault(key, deque()).append(entry)
        self._buffered += 1
        return key

    def _oldest_key(self) -> Hashable:
        return min(self._queues, key=lambda k: self._queues[k][0].read)

    def _emit(self, key: Hashable) -> Any:
        queue = self._queues[key]
        entries = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
        if not queue:
            del self._queues[key]
        self._buffered -= len(entries)
        return self._collate_fn([e.element for e in entries], self._batch_size)

    def _read_one(self) -> Hashable:
        """Reads one parent element into the buffer and returns its key; ``_END`` at the end of the input,
        ``_DROPPED`` when ``drop_fn`` skips it."""
        state = self._parent.get_state()
        try:
            element = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return _END
        self._reads += 1
        reason = self._drop_fn(element) if self._drop_fn is not None else None
        if reason is not None:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1
            if reason not in self._logged:
                self._logged.add(reason)
                log.warning("skipping %s (the first %r seen by this reader; all are counted)", element, reason)
            return _DROPPED
        return self._add(_Entry(self._reads - 1, state, element))

    def __next__(self):
        self._assert_not_closed()
        while True:
            key = _END if self._exhausted else self._read_one()
            if key is _DROPPED:
                continue
            if key is not _END:
                if len(self._queues[key]) >= self._batch_size:
                    return self._emit(key)
                if self._buffered >= self._buffer_size:
                    fullest = max(len(q) for q in self._queues.values())
                    oldest_full = min((q[0].read, k) for k, q in self._queues.items() if len(q) == fullest)[1]
                    return self._emit(oldest_full)
                if self._max_wait is not None:
                    oldest = self._oldest_key()
                    if self._reads - self._queues[oldest][0].read > self._max_wait:
                        return self._emit(oldest)
                continue
            if not self._queues:
                raise StopIteration
            if self._drop_remainder:
                self._queues.clear()
                self._buffered = 0
                raise StopIteration
            return self._emit(self._oldest_key())

    # State -------------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        entries = sorted((e for q in self._queues.values() for e in q), key=lambda e: e.read)
        dropped = dict(sorted(self._dropped.items()))
        if not entries:
            return dict(parent=self._parent.get_state(), replay=0, pending=[], dropped=dropped)
        first = entries[0].read
        return dict(parent=entries[0].parent_state, replay=self._reads - first,
                    pending=[e.read - first for e in entries], dropped=dropped)

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._queues.clear()
        self._buffered = self._reads = 0
        self._exhausted = False
        self._parent.set_state(state["parent"])
        self._dropped = dict(state["dropped"])  # already counts the skipped elements re-read below
        pending = set(state["pending"])
        for offset in range(state["replay"]):
            parent_state = self._parent.get_state()
            element = next(self._parent)
            if offset in pending:
                self._add(_Entry(offset, parent_state, element))
        self._reads = state["replay"]

    def __str__(self) -> str:
        return f"BucketBatchDatasetIterator(batch_size={self._batch_size}, buffer_size={self._buffer_size})"
