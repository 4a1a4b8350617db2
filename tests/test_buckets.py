"""Aspect-ratio buckets and the bucketing batcher: uniform batches, exactly once, exact resume, host shards."""

import json
import math

import grain
import numpy as np
import pytest

from configs import common, stage3
from qk_jax.data import buckets


def test_paper_buckets_have_the_area_and_side_multiple():
    b = buckets.Buckets.from_config(stage3.get_config().data)
    assert len(b) == 13 and b.sizes[b.ratios.index((1, 1))] == (512, 512)
    assert b.sizes[b.ratios.index((9, 16))] == (384, 688)
    for (rw, rh), (w, h) in zip(b.ratios, b.sizes):
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / 512**2 - 1) < 0.05
        assert abs(math.log((w / h) / (rw / rh))) < 0.03


def test_assign_picks_the_nearest_ratio():
    b = buckets.Buckets.create(512, common.ASPECT_RATIOS, 16)
    assert b.ratios[b.assign(1000, 1000)] == (1, 1)
    assert b.ratios[b.assign(1920, 1080)] == (16, 9)
    assert b.ratios[b.assign(600, 1000)] == (3, 5)
    assert b.ratios[b.assign(10, 100)] == (1, 2)  # beyond the extremes: the extreme
    rng = np.random.default_rng(0)
    for w, h in rng.integers(1, 4000, size=(500, 2)):
        distances = [abs(math.log(w / h) - math.log(rw / rh)) for rw, rh in b.ratios]
        assert distances[b.assign(int(w), int(h))] == min(distances)
    with pytest.raises(ValueError, match="0x5"):
        b.assign(0, 5)


def _element(i):
    rng = np.random.default_rng(i)
    n, h = int(rng.integers(0, 3)), [8, 16, 24][int(rng.integers(3))]
    return dict(x=np.full((h, 4), i, np.int32), y=np.zeros((n, 2), np.float32), i=np.int64(i))


def _stream(n=120, bad_every=0):
    def make(i):
        return f"bad-{i % 2}" if bad_every and i % bad_every == 0 else _element(i)

    return grain.MapDataset.range(n).map(make).to_iter_dataset(grain.ReadOptions(num_threads=2))


def _drop(element):
    return element if isinstance(element, str) else None


def _rows(batches):
    return sorted(int(i) for b in batches for i in b["i"][b["valid"]])


def test_batches_are_uniform_and_every_element_arrives_once():
    keys = 9  # 3 heights x 3 input counts
    ds = buckets.bucket_batch(_stream(), batch_size=4, buffer_size=buckets.lossless_buffer_size(keys, 4))
    batches = list(ds)
    assert _rows(batches) == list(range(120))
    padded = 0
    for b in batches:
        assert b["x"].shape[0] == b["y"].shape[0] == 4
        for row in range(4):  # every row is its element, whole: the batch's shapes are each element's
            element = _element(int(b["i"][row]))
            np.testing.assert_array_equal(b["x"][row], element["x"])
            assert b["y"].shape[1:] == element["y"].shape
        padded += int((~b["valid"]).sum())
    # A lossless buffer only pads the leftovers of the end: at most 3 per key.
    assert padded <= keys * 3 and all(b["valid"].all() for b in batches[: len(batches) - keys])


def test_small_buffer_flushes_padded_batches_and_loses_nothing():
    ds = buckets.bucket_batch(_stream(), batch_size=4, buffer_size=6)
    batches = list(ds)
    assert _rows(batches) == list(range(120))
    assert any(not b["valid"].all() for b in batches[:10])


def test_max_wait_and_drop_remainder():
    waited = list(buckets.bucket_batch(_stream(), batch_size=4, buffer_size=100, max_wait=5))
    assert _rows(waited) == list(range(120))
    dropped = list(buckets.bucket_batch(_stream(), batch_size=4, buffer_size=100, drop_remainder=True))
    assert all(b["valid"].all() for b in dropped) and len(_rows(dropped)) < 120
    with pytest.raises(ValueError, match="buffer_size 2 < batch_size 4"):
        buckets.bucket_batch(_stream(), batch_size=4, buffer_size=2)


@pytest.mark.parametrize("buffer_size,max_wait", [(33, None), (6, None), (50, 7)])
def test_resume_from_any_step_is_exact(buffer_size, max_wait):
    make = lambda: buckets.bucket_batch(_stream(bad_every=7), batch_size=4, buffer_size=buffer_size,
                                        max_wait=max_wait, drop_fn=_drop)
    it = iter(make())
    reference, states = [], []
    while True:
        states.append(json.loads(json.dumps(it.get_state())))  # states are plain JSON
        try:
            reference.append(next(it))
        except StopIteration:
            break
    final = it.get_state()["dropped"]
    assert final == {"bad-0": 9, "bad-1": 9}  # 18 multiples of 7 below 120, alternating
    assert _rows(reference) == [i for i in range(120) if i % 7]
    for step in range(0, len(reference), 3):
        resumed = iter(make())
        resumed.set_state(states[step])
        rest = list(resumed)
        assert len(rest) == len(reference) - step
        for got, want in zip(rest, reference[step:]):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        assert resumed.get_state()["dropped"] == final  # skipped elements re-read on restore are not recounted


def test_shard_for_host_splits_disjointly():
    ds = grain.MapDataset.range(10)
    shards = [list(buckets.shard_for_host(ds, i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and shards[1] == [1, 4, 7]
    with pytest.raises(ValueError, match="not in"):
        buckets.shard_for_host(ds, 3, 3)
    assert list(buckets.shard_for_host(ds)) == list(range(10))  # one process: jax.process_index() == 0
