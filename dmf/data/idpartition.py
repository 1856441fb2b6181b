"""Raw ids -> dense indices, range by range: no process holds every raw id.

The dense index of an id is its rank among the side's distinct raw ids (numeric order for
integers, byte order for strings), so it depends only on the set of ids, never on the order of
the input, the batch size or the number of workers. Ranking a billion ids in one process would
need every id in its memory; instead ingest cuts each side's ids into ranges:

1. pass 1 (the driver) keeps a bounded, deterministic sample of each side's raw ids, by row
   (:class:`IdSample`): row n of the input is kept when its hash is among the smallest, so the
   sample is the same whatever the batching;
2. the sample's quantiles are the *splitters* (:meth:`IdSample.splitters`): P - 1 raw ids cutting
   the side into P ranges of about equal numbers of rows;
3. one task per range sorts the range's distinct ids (:func:`rank_ids`) and writes them as the
   range's id file; its ids' dense indices are the range's offset (the ids of the ranges before
   it) plus their rank in the range.

Ranges are ordered, so these are exactly the global ranks: one range or many give the same
store. The driver holds the samples, the splitters and one offset per range.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dmf.data.hashing import U64, mix64, mix64_int
from dmf.store.storage import Location

# Rows of each side's id sample: its quantiles cut the ids into ranges.
ID_SAMPLE = 1 << 16
# Rows of an id file's Parquet row groups: a single id is read with one row group.
ID_ROW_GROUP = 1 << 16


class IdSample:
    """A bounded sample of one side's raw ids, by input row.

    Row n (0-based, over the whole input) is hashed; the sample holds the ids of the rows with
    the ``size`` smallest hashes, and up to ``size`` more (trimmed as it grows); only the first
    ``size`` are used, so it is the same whatever the batching.
    """

    def __init__(self, seed: int, size: int = ID_SAMPLE):
        self.key = mix64_int(seed ^ 0x1D5A_3C7E_9B21)
        self.size = size
        self.h = np.zeros(0, U64)
        self.ids: pa.Array | None = None
        self.thresh = np.iinfo(np.uint64).max

    def add(self, rows: np.ndarray, ids: pa.Array) -> None:
        """Offer the ids of input rows ``rows`` (row numbers, shape (n,))."""
        h = mix64(rows.astype(U64) ^ self.key)
        sel = np.flatnonzero(h < self.thresh)
        if not len(sel):
            return
        picked = ids.take(pa.array(sel))
        self.h = np.concatenate([self.h, h[sel]])
        self.ids = picked if self.ids is None else pa.concat_arrays([self.ids, picked])
        if len(self.h) > 2 * self.size:
            self.thresh = np.partition(self.h, self.size)[self.size]
            keep = np.flatnonzero(self.h < self.thresh)
            self.h = self.h[keep]
            self.ids = self.ids.take(pa.array(keep))

    def splitters(self, n_ranges: int) -> pa.Array:
        """At most ``n_ranges - 1`` distinct raw ids, sorted: range p holds the ids ``x`` with
        ``splitters[p - 1] <= x < splitters[p]``."""
        if n_ranges <= 1 or self.ids is None or len(self.ids) == 0:
            typ = self.ids.type if self.ids is not None else pa.int64()
            return pa.array([], type=typ)
        ids = self.ids
        if len(self.h) > self.size:
            # The rows of the ``size`` smallest hashes: which others are still held depends on
            # the batching, these do not.
            ids = ids.take(pa.array(np.argpartition(self.h, self.size)[: self.size]))
        ordered = ids.take(pc.sort_indices(ids))
        picks = [int(len(ordered) * k / n_ranges) for k in range(1, n_ranges)]
        return pc.unique(ordered.take(pa.array(picks)))


def range_of(values: pa.Array, splitters: pa.Array) -> np.ndarray:
    """The range of each value: the number of splitters at or below it, shape (n,), int32.

    Integer ids: numpy's binary search. String ids: the same search, vectorised over the rows
    with Arrow's comparison kernels (byte order), about log2(len(splitters)) rounds."""
    n_s = len(splitters)
    if n_s == 0:
        return np.zeros(len(values), dtype=np.int32)
    if not pa.types.is_string(splitters.type) and not pa.types.is_large_string(splitters.type):
        keys = splitters.to_numpy()
        return np.searchsorted(keys, values.to_numpy(), side="right").astype(np.int32)
    values = values.cast(splitters.type)
    lo = np.zeros(len(values), dtype=np.int64)  # splitters[:lo] are <= the value
    hi = np.full(len(values), n_s, dtype=np.int64)  # splitters[hi:] are > the value
    while True:
        open_ = np.flatnonzero(lo < hi)
        if not len(open_):
            return lo.astype(np.int32)
        mid = (lo[open_] + hi[open_]) // 2
        le = pc.less_equal(splitters.take(pa.array(mid)), values.take(pa.array(open_)))
        le = le.to_numpy(zero_copy_only=False)
        lo[open_[le]] = mid[le] + 1
        hi[open_[~le]] = mid[~le]


def group_by_range(table: pa.Table, column: str, splitters: pa.Array) -> list[tuple[int, pa.Table]]:
    """The rows of ``table`` grouped by the range of their ``column`` (input order kept within
    a range): [(range, rows)] for the ranges that have rows."""
    if len(splitters) == 0:
        return [(0, table)] if table.num_rows else []
    rng = range_of(table.column(column).combine_chunks(), splitters)
    order = np.argsort(rng, kind="stable")
    cuts = np.searchsorted(rng[order], np.arange(len(splitters) + 2))
    out = []
    for p in range(len(splitters) + 1):
        lo, hi = cuts[p], cuts[p + 1]
        if hi > lo:
            out.append((p, table.take(pa.array(order[lo:hi]))))
    return out


def rank_ids(ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The distinct values of ``ids``, sorted, and each row's rank among them (int32)."""
    enc = pc.dictionary_encode(ids)
    dictionary = enc.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank_of_code = np.empty(len(dictionary), dtype=np.int32)
    rank_of_code[order] = np.arange(len(dictionary), dtype=np.int32)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    return dictionary.take(pa.array(order)), rank_of_code[codes]


def write_id_file(loc: Location, ids: pa.Array) -> None:
    """A range's sorted distinct raw ids, in row groups of :data:`ID_ROW_GROUP` rows."""
    with loc.writer() as f:
        pq.write_table(pa.table({"id": ids}), f, row_group_size=ID_ROW_GROUP, compression="zstd")


def read_id_range(loc: Location, lo: int, hi: int) -> pa.Array:
    """Rows [lo, hi) of an id file (only the row groups holding them are read)."""
    first, last = lo // ID_ROW_GROUP, (hi - 1) // ID_ROW_GROUP
    # A Python file object backs the reader: no Arrow threads (see read_verified_buffer).
    with loc.open("rb") as f, pq.ParquetFile(f) as pf:
        if hi <= lo:
            return pa.array([], type=pf.schema_arrow.field("id").type)
        t = pf.read_row_groups(list(range(first, last + 1)), columns=["id"], use_threads=False)
    start = lo - first * ID_ROW_GROUP
    return t.column("id").combine_chunks().slice(start, hi - lo)
