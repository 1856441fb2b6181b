"""User-id ranges (dmf.data.idpartition) and block boundaries drawn chunk by chunk, against
plain Python and the in-memory balanced_bounds."""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pytest

from dmf.data.idpartition import (
    IdSample,
    group_by_range,
    range_of,
    rank_ids,
    read_id_range,
    write_id_file,
)
from dmf.store.layout import balanced_bounds, balanced_bounds_chunked
from dmf.store.storage import Location


def some_ids(kind: str, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    ints = rng.integers(-(2**40), 2**40, size=n // 3).tolist()
    ints = rng.choice(ints, size=n).tolist()  # repeats, as ids in ratings repeat
    if kind == "int":
        return ints
    # Byte order, not locale order: upper before lower case, 'é' after 'z'.
    return [f"{'Zaé'[x % 3]}{x}" for x in ints]


@pytest.mark.parametrize("kind", ["int", "string"])
def test_ranges_partition_the_ids_in_order(kind):
    ids = some_ids(kind, 5000, seed=1)
    arr = pa.array(ids, type=pa.int64() if kind == "int" else pa.string())
    sample = IdSample(seed=3, size=256)
    # Offered in batches of odd sizes: the sample is the same whatever the batching.
    at = 0
    for size in (1, 700, 13, 2000, 2286):
        sample.add(np.arange(at, at + size), arr.slice(at, size))
        at += size
    whole = IdSample(seed=3, size=256)
    whole.add(np.arange(len(ids)), arr)
    assert sample.splitters(8).equals(whole.splitters(8))

    splitters = sample.splitters(8)
    assert 1 <= len(splitters) <= 7
    cuts = splitters.to_pylist()
    assert cuts == sorted(set(cuts))
    want = [bisect.bisect_right(cuts, x) for x in ids]
    assert range_of(arr, splitters).tolist() == want

    # Ranks within ranges plus range offsets are the global ranks.
    table = pa.table({"user": arr, "row": np.arange(len(ids))})
    global_rank = {x: k for k, x in enumerate(sorted(set(ids)))}
    offset = 0
    seen = 0
    for p, rows in group_by_range(table, "user", splitters):
        assert rows.column("row").to_numpy().tolist() == sorted(rows.column("row").to_pylist())
        distinct, rank = rank_ids(rows.column("user").combine_chunks())
        assert distinct.to_pylist() == sorted(set(rows.column("user").to_pylist()))
        for x, r in zip(rows.column("user").to_pylist(), rank.tolist(), strict=True):
            assert global_rank[x] == offset + r, p
        offset += len(distinct)
        seen += rows.num_rows
    assert seen == len(ids) and offset == len(global_rank)


def test_id_file_reads_any_range(tmp_path):
    ids = pa.array([f"id{k:07d}" for k in range(150_000)])
    loc = Location.of(str(tmp_path / "ids.parquet"))
    write_id_file(loc, ids)
    for lo, hi in [(0, 1), (65_535, 65_537), (10, 140_000), (149_999, 150_000), (5, 5)]:
        assert read_id_range(loc, lo, hi).to_pylist() == ids.slice(lo, hi - lo).to_pylist()


@pytest.mark.parametrize("n_blocks", [None, 1, 3, 17])
@pytest.mark.parametrize("seed", range(6))
def test_chunked_bounds_equal_balanced_bounds(seed, n_blocks):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    counts = rng.integers(0, 30, size=n) * (rng.random(n) < 0.8)  # zeros too
    if seed == 0:
        counts[:] = 0
    target = int(rng.integers(1, 200))
    starts = np.unique(np.r_[0, rng.integers(0, n, size=int(rng.integers(0, 20)))])
    stops = np.r_[starts[1:], n]
    totals = np.array([counts[a:b].sum() for a, b in zip(starts, stops, strict=True)])
    read = []

    def counts_of(k):
        read.append(k)
        return counts[starts[k] : stops[k]]

    got = balanced_bounds_chunked(starts, totals, n, counts_of, target, n_blocks)
    np.testing.assert_array_equal(got, balanced_bounds(counts, target, n_blocks))
    assert len(set(read)) <= len(got)  # only chunks in which a boundary falls
