"""Ingest: raw ratings (any size) -> a store, in bounded memory.

The pipeline (memory is bounded by one batch or one block, plus the id maps)::

    pass 1  driver      read batches; clean (policies for invalid, out-of-range ratings); give
                        ids provisional codes and count rows per code; spill (code, code,
                        rating[, t]) chunks to disk. Id maps are then ranked: the dense index of
                        an id is the rank of the raw id.
    pass 2  per chunk   remap codes -> dense indices; bucket rows by *fine* user bucket
                        (contiguous users, about 1/4 of a block's ratings).
    pass 3  per bucket  sort by (user, item); merge duplicates (policy); split off validation and
                        test rows (hash of (user, item, seed), per-user ranks, or timestamps);
                        spill train rows; return exact train counts per user and item.
            driver      block boundaries: dmf.store.balanced_bounds over those train counts.
    pass 4  per user    gather its buckets; write by_user; route rows to item-block spill.
            block
    pass 5  per item    stable sort by item (rows arrive sorted by user); write by_item.
            block

Passes 2-5 run one task per chunk, bucket or block: on the Dask cluster when a client is given,
else on a local thread pool. Tasks read and write spill files under the store writer's scratch
prefix (:attr:`dmf.store.layout.StoreWriter.scratch`), on the store's own filesystem: a hidden
directory inside a local store, a prefix of an ``s3://`` one, so workers on other machines, with
no directory in common, reach it. Every file goes through :class:`dmf.store.storage.Location`.
Every decision depends only on dense indices, ratings and timestamps, so the result is the same
whatever the batch size or the number of workers. Each task returns a small typed record
(:class:`BucketSplit`, :class:`BlockWritten`), and the driver checks the totals between passes
(no row lost with a spill file).

The store is committed by :class:`dmf.store.layout.StoreWriter` (a
:class:`dmf.store.storage.Commit`): workers write block files under versioned names through its
picklable :attr:`~dmf.store.layout.StoreWriter.target` and return their entries; the manifest is
written last, with no rename. A killed ingest leaves no store that looks complete, and an old
store stays readable until the new manifest lands; what the killed one wrote is left over
(:func:`dmf.store.storage.leftovers`), which the next ingest reports and ``dmf clean`` removes.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmf import __version__
from dmf.config import BlocksConfig, Config, DataConfig, SplitConfig
from dmf.data.hashing import U64, bits, mix64, mix64_int, pair_hash, pair_hash64, unit_float
from dmf.data.idmap import IdMapper, make_mapper
from dmf.data.readers import Batch, IdTypeMismatch, InputSpec, iter_batches, resolve_inputs
from dmf.dist.tasks import progress_disabled, run_tasks
from dmf.errors import ConfigError, InputError, StoreError
from dmf.store.layout import (
    MANIFEST,
    SPLITS,
    BlockLayout,
    DroppedRows,
    FileEntry,
    SplitRecord,
    Store,
    StoreManifest,
    StoreWriter,
    balanced_bounds,
    block_relpath,
    split_relpath,
    write_block_file,
)
from dmf.store.storage import (
    Location,
    StorageError,
    Target,
    config_location,
    leftovers,
    preflight,
    read_manifest,
)

log = logging.getLogger("dmf")

# Rows kept in the bounded sample of timestamps that sets the temporal split's cutoffs.
TEMPORAL_SAMPLE = 1 << 20


def stable_order(key: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of non-negative int64 ``key`` (all below ``kmax``), and the sorted keys.

    When key and row number fit in 63 bits together, they are packed into one int64 and sorted
    by value (numpy's SIMD sort, several times faster than a stable argsort); ties keep their
    input order because the row number is the low bits.
    """
    n = len(key)
    ib, kb = bits(n), bits(kmax)
    if kb + ib <= 63:
        packed = (key.astype(np.int64) << np.int64(ib)) | np.arange(n, dtype=np.int64)
        packed.sort()
        return packed & np.int64((1 << ib) - 1), packed >> np.int64(ib)
    order = np.argsort(key, kind="stable")
    return order, key[order]


# -- spill files ----------------------------------------------------------------------------------
# A spill file holds n rows as consecutive columns: int32 a, int32 b, float32 rating[, int64 t].
# Spill files live under the store writer's scratch prefix, on the store's filesystem, and are
# read and written through Location (a local file, or an object of s3://...).


def _write_arrays(loc: Location, *arrays: np.ndarray) -> None:
    """Write the arrays' bytes one after the other to the file ``loc``."""
    with loc.open("wb") as f:
        for x in arrays:
            f.write(memoryview(np.ascontiguousarray(x)).cast("B"))


def _write_spill(loc: Location, a: np.ndarray, b: np.ndarray, r: np.ndarray, t=None) -> None:
    cols = [
        np.ascontiguousarray(a, dtype=np.int32),
        np.ascontiguousarray(b, dtype=np.int32),
        np.ascontiguousarray(r, dtype=np.float32),
    ]
    if t is not None:
        cols.append(np.ascontiguousarray(t, dtype=np.int64))
    _write_arrays(loc, *cols)


def _spill_files(d: Location, pattern: str) -> list[Location]:
    """The spill files directly in ``d`` whose names match ``pattern``, sorted by name (none
    when ``d`` does not exist)."""
    return [d / name for name in d.ls() if fnmatch.fnmatchcase(name, pattern)]


def _read_spills(paths: list[Location], has_t: bool):
    """Concatenate spill files (in the given order) into (a, b, r, t-or-None).

    Each file is read whole (one GET on an object store, no separate size request), then its
    columns are copied out: the raw bytes of a bucket or block are held once, briefly, next to
    its arrays.
    """
    row = 12 + (8 if has_t else 0)
    raws = []
    for p in paths:
        raw = np.frombuffer(p.read_bytes(), dtype=np.uint8)
        if len(raw) % row:
            raise StoreError(f"ingest: spill file {p} is truncated ({len(raw)} bytes)")
        raws.append(raw)
    sizes = [len(raw) // row for raw in raws]
    n = int(sum(sizes))
    a = np.empty(n, np.int32)
    b = np.empty(n, np.int32)
    r = np.empty(n, np.float32)
    t = np.empty(n, np.int64) if has_t else None
    at = 0
    for raw, m in zip(raws, sizes, strict=True):
        a[at : at + m] = raw[: 4 * m].view(np.int32)
        b[at : at + m] = raw[4 * m : 8 * m].view(np.int32)
        r[at : at + m] = raw[8 * m : 12 * m].view(np.float32)
        if has_t:
            t[at : at + m] = raw[12 * m : 20 * m].view(np.int64)
        at += m
    return a, b, r, t


def _buckets(blk: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable order grouping rows by their block ``blk`` (int16/int32), and block b's range
    ``order[cuts[b]:cuts[b+1]]``."""
    # A stable sort of 16-bit integers is a radix sort in numpy: linear time.
    order = np.argsort(blk, kind="stable")
    cuts = np.searchsorted(blk[order], np.arange(nb + 1))
    return order, cuts


def _spill_by_block(
    blk: np.ndarray, nb: int, base: Location, dirs: str, name: str, u, i, r, t=None
) -> None:
    """Write the rows of each block b (``blk`` gives every row's block) to the spill file
    ``base / dirs.format(b) / name``; blocks without rows get no file."""
    order, cuts = _buckets(blk, nb)
    for b in range(nb):
        lo, hi = cuts[b], cuts[b + 1]
        if hi > lo:
            sel = order[lo:hi]
            d = base / dirs.format(b)
            _write_spill(d / name, u[sel], i[sel], r[sel], None if t is None else t[sel])


def block_table(bounds: np.ndarray) -> np.ndarray:
    """The block of every row, shape (bounds[-1],): a gather is faster than a searchsorted."""
    nb = len(bounds) - 1
    dt = np.int16 if nb < 2**15 else np.int32
    return np.repeat(np.arange(nb, dtype=dt), np.diff(bounds))


# -- pass 1 ---------------------------------------------------------------------------------------


def _prefetch(it: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``it`` in a background thread (parsing overlaps with processing)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    th = threading.Thread(target=run, daemon=True, name="dmf-ingest-reader")
    th.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        th.join()


def _fmt(v: float) -> str:
    if np.isnan(v):
        return "null/NaN"
    return repr(float(v))


class _RatingPolicies:
    """``data.invalid_ratings``, ``data.rating_range`` and ``data.out_of_range``, applied batch
    by batch; counts the rows they drop or clip."""

    def __init__(self, data: DataConfig):
        self.data = data
        self.invalid = 0
        self.out_of_range = 0
        self.clipped = 0

    def apply(self, bt: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(which rows of ``bt`` to keep, their ratings, clipped if so asked), shapes (n,)."""
        r = bt.rating
        keep = np.ones(len(bt), dtype=bool)
        bad = ~np.isfinite(r)
        if bad.any():
            if self.data.invalid_ratings == "error":
                k = int(np.flatnonzero(bad)[0])
                raise InputError(
                    f"{bt.where(k, 'rating')}: rating {_fmt(r[k])} is not a finite number; "
                    "set data.invalid_ratings: drop to skip such rows"
                )
            self.invalid += int(bad.sum())
            keep &= ~bad
        if self.data.rating_range is not None:
            keep, r = self._apply_range(bt, keep, r)
        return keep, r

    def _apply_range(
        self, bt: Batch, keep: np.ndarray, r: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.data.rating_range
        out = keep & ((r < lo) | (r > hi))
        if not out.any():
            return keep, r
        if self.data.out_of_range == "error":
            k = int(np.flatnonzero(out)[0])
            raise InputError(
                f"{bt.where(k, 'rating')}: rating {_fmt(r[k])} is outside "
                f"data.rating_range [{lo}, {hi}]; set data.out_of_range: drop or "
                "clip, or widen the range"
            )
        if self.data.out_of_range == "drop":
            self.out_of_range += int(out.sum())
            return keep & ~out, r
        self.clipped += int(out.sum())
        return keep, np.clip(r, lo, hi)

    def dropped(self) -> str:
        """'N by data.invalid_ratings, M by data.out_of_range' (the non-zero ones)."""
        counts = (("invalid_ratings", self.invalid), ("out_of_range", self.out_of_range))
        return ", ".join(f"{v} by data.{k}" for k, v in counts if v)


class _TemporalSample:
    """A bounded sample of the kept rows' timestamps, which sets a temporal split's cutoffs.

    Row n of the input (0-based) is hashed (splitmix64 of n and the split seed); the sample keeps
    the rows of the ``size`` smallest hashes or a few more, so it is the same whatever the
    batching.
    """

    def __init__(self, seed: int, size: int):
        self.key = mix64_int(seed ^ 0x5DEECE66D)
        self.size = size
        self.h = np.zeros(0, U64)
        self.t = np.zeros(0, np.int64)
        self.thresh = np.iinfo(np.uint64).max

    def add(self, first_row: int, keep: np.ndarray, t: np.ndarray) -> None:
        """Offer the rows ``keep`` of a batch starting at input row ``first_row``."""
        h = mix64(np.arange(first_row, first_row + len(keep), dtype=U64) ^ self.key)
        sel = keep & (h < self.thresh)
        self.h = np.concatenate([self.h, h[sel]])
        self.t = np.concatenate([self.t, t[sel]])
        if len(self.h) > 2 * self.size:
            # Keep the rows of the smallest hashes: the same sample whatever the batching.
            self.thresh = np.partition(self.h, self.size)[self.size]
            m = self.h < self.thresh
            self.h, self.t = self.h[m], self.t[m]


class _ChunkSpill:
    """Pass 1's output: rows gathered into chunks of at least ``rows`` rows (the last may have
    fewer), each spilled to a file ``cNNNNNN.bin`` in ``directory``."""

    def __init__(self, directory: Location, rows: int):
        self.directory = directory
        self.rows = rows
        self.paths: list[Location] = []
        self.buf: list[tuple] = []
        self.buffered = 0

    def add(self, uc: np.ndarray, ic: np.ndarray, r: np.ndarray, t: np.ndarray | None) -> None:
        self.buf.append((uc, ic, r, t))
        self.buffered += len(uc)
        if self.buffered >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        path = self.directory / f"c{len(self.paths):06d}.bin"
        cat = [np.concatenate(c) if c[0] is not None else None for c in zip(*self.buf, strict=True)]
        _write_spill(path, *cat)
        self.paths.append(path)
        self.buf, self.buffered = [], 0


@dataclass
class _Pass1:
    """What pass 1 read: the provisional id codes, the chunks, the counts."""

    users: IdMapper
    items: IdMapper
    chunks: list[Location]
    policies: _RatingPolicies
    rows_read: int = 0
    rows_kept: int = 0
    sample_t: np.ndarray | None = None
    """Temporal split: the sampled timestamps (:class:`_TemporalSample`)."""

    def encode(self, bt: Batch, keep: np.ndarray, r: np.ndarray) -> tuple:
        """(user codes, item codes, ratings, timestamps or None) of the rows ``keep``."""
        t = bt.timestamp
        if not keep.all():
            mask = pa.array(keep)
            users, items = bt.user.filter(mask), bt.item.filter(mask)
            r = r[keep]
            t = t[keep] if t is not None else None
        else:
            users, items = bt.user, bt.item
        try:
            uc = self.users.encode(users)
            ic = self.items.encode(items)
        except ValueError as exc:  # an id the map cannot hold (a NUL byte in a string id)
            raise InputError(
                f"{bt.file}: {bt.kind}s from {bt.first}: user column "
                f"{bt.colnames.get('user', 'user')!r} or item column "
                f"{bt.colnames.get('item', 'item')!r}: {exc}"
            ) from exc
        self.rows_kept += len(uc)
        return uc, ic, r, t


def _pass1(spec: InputSpec, config: Config, spill: Location, progress: bool | None) -> _Pass1:
    """Pass 1: read every batch, apply the rating policies, give ids provisional codes, and spill
    the rows in chunks."""
    from tqdm import tqdm  # here, not at the top: keeps the CLI light

    sp = config.split
    temporal = sp.method == "temporal" and (sp.test or sp.validation)
    sample = _TemporalSample(sp.seed, TEMPORAL_SAMPLE) if temporal else None
    policies = _RatingPolicies(config.data)
    chunks = _ChunkSpill(spill / "p1", spec.batch_rows)
    res: _Pass1 | None = None
    bar = tqdm(
        desc="ingest: reading", unit=" rows", unit_scale=True, disable=progress_disabled(progress)
    )
    try:
        for bt in _prefetch(iter_batches(spec)):
            if res is None:  # the first batch settles the id types
                res = _Pass1(
                    make_mapper(spec.id_types["user"]),
                    make_mapper(spec.id_types["item"]),
                    chunks.paths,
                    policies,
                )
            keep, r = policies.apply(bt)
            if sample is not None:
                sample.add(res.rows_read, keep, bt.timestamp)
            res.rows_read += len(bt)
            uc, ic, r, t = res.encode(bt, keep, r)
            chunks.add(uc, ic, r.astype(np.float32), t)
            bar.update(len(bt))
        chunks.flush()
    finally:
        bar.close()
    _check_rows_left(res, spec)
    if sample is not None:
        res.sample_t = sample.t
    return res


def _check_rows_left(res: _Pass1 | None, spec: InputSpec) -> None:
    """After pass 1: the input had rows, and the policies left some."""
    if res is None or res.rows_read == 0:
        files = ", ".join(str(f.path) for f in spec.files)
        raise InputError(f"no ratings in {files}: the input is empty or has only a header")
    if res.rows_kept == 0:
        raise InputError(
            f"all {res.rows_read} input rows were dropped ({res.policies.dropped()}): nothing is "
            "left to ingest; check data.rating_range and the rating column (data.columns.rating)"
        )


def _read_input(spec: InputSpec, config: Config, spill: Location, progress: bool | None) -> _Pass1:
    """Pass 1, re-run with string ids if integer-looking ids turn out not to be integers."""
    for _attempt in range(3):
        try:
            return _pass1(spec, config, spill, progress)
        except IdTypeMismatch as exc:
            log.info("dmf ingest: %s ids are not all integers; reading them as strings", exc.side)
            spill.remove()
            spec.id_types[exc.side] = "string"
    # Each attempt switches one side to strings, so the third one always settles the types.
    raise InputError("cannot settle the id types of the input")  # pragma: no cover


# -- what the tasks of passes 2-5 are given and return --------------------------------------------


@dataclass(frozen=True)
class Remap:
    """Pass 2's tables, sent to every worker once."""

    user_index: np.ndarray
    """Dense index of every pass-1 user code, int32."""
    item_index: np.ndarray
    """Dense index of every pass-1 item code, int32."""
    bucket_of_user: np.ndarray
    """Fine bucket of every dense user index (:func:`block_table`)."""
    n_buckets: int


@dataclass(frozen=True)
class Routing:
    """Pass 4's table, sent to every worker once: where each item's ratings go."""

    block_of_item: np.ndarray
    """Item block of every dense item index (:func:`block_table`)."""
    n_blocks: int


@dataclass(frozen=True)
class DuplicateFound:
    """Pass 3 under ``data.duplicates: error``: a bucket holds a (user, item) pair more than
    once. Nothing of the bucket was spilled."""

    bucket: int
    user: int
    """Dense index of the user of the bucket's first repeated pair."""
    item: int
    n_duplicates: int
    """Repeated (user, item) rows in the bucket."""


@dataclass(frozen=True)
class BucketSplit:
    """Pass 3's result for one fine bucket of users: train counts and held-out counts."""

    bucket: int
    n_in: int
    """Rows read from pass 2's spill files."""
    merged: int
    """Rows removed by merging duplicates (``data.duplicates``)."""
    user_counts: np.ndarray
    """Train ratings of each user of the bucket, shape (stop - start,)."""
    item_counts_file: Location
    """Train ratings per item, as int32 items then int32 counts: a file, not the result, so
    that hundreds of results of n_items entries each do not all pass through the scheduler.
    The driver folds it in as the result arrives, and deletes it."""
    rating_sum: float
    """Sum of the train ratings, in float64."""
    n_validation: int
    n_test: int


@dataclass(frozen=True)
class BlockWritten:
    """Passes 4 and 5: one block file of the store, written by a task."""

    side: str
    block: int
    rel: str
    """Path of the file in the store."""
    entry: FileEntry
    nnz: int


# -- pass 2: remap and bucket (tasks of passes 2-5 run on workers or threads) ---------------------


def ingest_bucket_chunk(chunk: Location, c: int, spill: Location, has_t: bool, remap: Remap) -> int:
    """Pass 2: remap one pass-1 chunk to dense indices and split it by fine user bucket;
    returns the number of rows."""
    uc, ic, r, t = _read_spills([chunk], has_t)
    u = remap.user_index[uc]
    i = remap.item_index[ic]
    _spill_by_block(
        remap.bucket_of_user[u],
        remap.n_buckets,
        spill / "p2",
        "u{:06d}",
        f"c{c:06d}.bin",
        u,
        i,
        r,
        t,
    )
    # The chunk is deleted by the driver once the whole pass is done: Dask may run a task
    # twice (a worker died before its result arrived), and a rerun must find its input.
    return len(u)


# -- pass 3: duplicates and the split -------------------------------------------------------------


@dataclass
class _SplitPlan:
    """How pass 3 splits: ``split``'s settings, and a temporal split's cutoffs."""

    method: str
    validation: float
    test: float
    seed: int
    cut_validation: int = 0  # temporal: validation if t >= cut_validation (and not test)
    cut_test: int = 0  # temporal: test if t >= cut_test


def _temporal_plan(plan: _SplitPlan, sample: np.ndarray) -> _SplitPlan:
    big = np.iinfo(np.int64).max
    s = np.sort(sample)

    def cut(frac: float) -> int:
        # The smallest timestamp such that about ``frac`` of the sample is at or after it.
        if frac <= 0:
            return big
        k = int(np.floor(len(s) * (1 - frac)))
        return int(s[min(max(k, 0), len(s) - 1)])

    plan.cut_test = cut(plan.test)
    plan.cut_validation = cut(plan.test + plan.validation) if plan.validation > 0 else big
    plan.cut_validation = min(plan.cut_validation, plan.cut_test)
    return plan


def _split_plan(sp: SplitConfig, sample_t: np.ndarray | None) -> _SplitPlan:
    """The split of pass 3; a temporal split's cutoffs come from pass 1's timestamp sample."""
    plan = _SplitPlan(sp.method, sp.validation, sp.test, sp.seed)
    return plan if sample_t is None else _temporal_plan(plan, sample_t)


def _split_masks(
    plan: _SplitPlan, u: np.ndarray, i: np.ndarray, t, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test) boolean masks over rows sorted by (user, item) without duplicates."""
    n = len(u)
    if plan.method == "none" or n == 0 or (plan.validation == 0 and plan.test == 0):
        z = np.zeros(n, dtype=bool)
        return z, z
    if plan.method == "temporal":
        test = t >= plan.cut_test
        return (t >= plan.cut_validation) & ~test, test
    h = pair_hash64(u, i, plan.seed)
    if plan.method == "random":
        x = unit_float(h)
        test = x < plan.test
        return (x < plan.test + plan.validation) & ~test, test
    # method "user": each user's ratings ranked by hash; the first k_test are test, the next
    # k_validation validation; at least one rating stays in train.
    # Order each user's ratings by the top 16 bits of the hash, ties by item (the rows are
    # sorted by (user, item) and the sort is stable): the same order whatever the bucket.
    hk = (h >> U64(48)).astype(np.int64)
    key = ((u.astype(np.int64) - start) << np.int64(16)) | hk
    order, _ = stable_order(key, (stop - start) << 16)
    us = u[order]
    first = np.searchsorted(us, us, side="left")
    rank = np.arange(n) - first
    n_u = np.bincount(u - start, minlength=stop - start)[us - start]
    k_t = np.minimum(np.floor(plan.test * n_u + 0.5), n_u - 1)
    k_v = np.clip(np.minimum(np.floor(plan.validation * n_u + 0.5), n_u - 1 - k_t), 0, None)
    test = np.empty(n, dtype=bool)
    val = np.empty(n, dtype=bool)
    test[order] = rank < k_t
    val[order] = (rank >= k_t) & (rank < k_t + k_v)
    return val, test


def _merge_duplicates(u, i, r, t, order: np.ndarray, dup: np.ndarray, policy: str):
    """One row per (user, item) under ``policy`` ('last' or 'mean'), in (user, item) order.

    ``order`` sorts the rows by (user, item), stably; ``dup[k]`` says sorted row k + 1 repeats
    sorted row k.
    """
    starts = np.flatnonzero(np.r_[True, ~dup])
    sizes = np.diff(np.r_[starts, len(order)])
    if policy == "last":
        if t is not None:
            # The latest timestamp wins, then the latest in input order (the sort is stable).
            ts = t[order]
            tmax = np.repeat(np.maximum.reduceat(ts, starts), sizes)
            pos = np.where(ts == tmax, np.arange(len(ts)), -1)
            keep = order[np.maximum.reduceat(pos, starts)]
        else:
            keep = order[starts + sizes - 1]
        return u[keep], i[keep], r[keep], (t[keep] if t is not None else None)
    # mean
    rs = np.add.reduceat(r[order].astype(np.float64), starts) / sizes
    first = order[starts]
    t = np.maximum.reduceat(t[order], starts) if t is not None else None
    return u[first], i[first], rs.astype(np.float32), t


def _counts_of(i: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct items of ``i`` and their counts; sparse, as a dense bincount costs n_items
    per bucket."""
    if n_items <= 8 * max(len(i), 1):
        ic = np.bincount(i, minlength=n_items)
        items = np.flatnonzero(ic)
        return items, ic[items]
    return np.unique(i, return_counts=True)


def ingest_split_bucket(
    b: int,
    start: int,
    stop: int,
    spill: Location,
    has_t: bool,
    n_items: int,
    duplicates: str,
    plan: _SplitPlan,
) -> BucketSplit | DuplicateFound:
    """Pass 3: sort one bucket of users by (user, item), merge duplicates, split off held-out
    rows, and spill the train rows; return exact train counts."""
    u, i, r, t = _read_spills(_spill_files(spill / "p2" / f"u{b:06d}", "c*.bin"), has_t)
    n_in = len(u)
    key = (u.astype(np.int64) - start) * max(n_items, 1) + i
    order, ks = stable_order(key, (stop - start) * max(n_items, 1))
    del key
    dup = ks[1:] == ks[:-1]
    del ks
    if not dup.any():
        u, i, r = u[order], i[order], r[order]
        t = t[order] if t is not None else None
    elif duplicates == "error":
        k = int(np.flatnonzero(dup)[0])
        return DuplicateFound(b, int(u[order[k]]), int(i[order[k]]), int(dup.sum()))
    else:
        u, i, r, t = _merge_duplicates(u, i, r, t, order, dup, duplicates)
    del order
    merged = n_in - len(u)

    val, test = _split_masks(plan, u, i, t, start, stop)
    for name, m in (("validation", val), ("test", test)):
        if m.any():
            hd = spill / "held" / name
            _write_spill(hd / f"u{b:06d}.bin", u[m], i[m], r[m], None if t is None else t[m])
    train = ~(val | test)
    u, i, r = u[train], i[train], r[train]
    _write_spill(spill / "p3" / f"u{b:06d}.bin", u, i, r)
    items, item_counts = _counts_of(i, n_items)
    counts_file = spill / "p3" / f"counts-{b:06d}.bin"
    _write_arrays(counts_file, items.astype(np.int32), item_counts.astype(np.int32))
    return BucketSplit(
        bucket=b,
        n_in=n_in,
        merged=merged,
        user_counts=np.bincount(u - start, minlength=stop - start),
        item_counts_file=counts_file,
        rating_sum=float(r.astype(np.float64).sum()),
        n_validation=int(val.sum()),
        n_test=int(test.sum()),
    )


# -- passes 4 and 5: the block files --------------------------------------------------------------


def ingest_user_block(
    b: int,
    start: int,
    stop: int,
    buckets: list[int],
    spill: Location,
    target: Target,
    routing: Routing,
) -> BlockWritten:
    """Pass 4: gather one user block's train rows from its split buckets (each sorted by
    (user, item), in user order), write by_user, and route the rows to item-block spill."""
    paths = [spill / "p3" / f"u{f:06d}.bin" for f in buckets]
    u, i, r, _ = _read_spills(paths, False)
    # Buckets at the edges may hold users of the neighbouring blocks.
    inside = (u >= start) & (u < stop)
    if not inside.all():
        u, i, r = u[inside], i[inside], r[inside]
    entry = write_block_file(target, "user", b, u, i, r)
    _spill_by_block(
        routing.block_of_item[i],
        routing.n_blocks,
        spill / "p4",
        "i{:06d}",
        f"u{b:06d}.bin",
        u,
        i,
        r,
    )
    return BlockWritten("user", b, block_relpath("user", b), entry, len(u))


def ingest_item_block(
    k: int, start: int, stop: int, spill: Location, target: Target
) -> BlockWritten:
    """Pass 5: sort one item block's train ratings by (item, user) and write by_item."""
    u, i, r, _ = _read_spills(_spill_files(spill / "p4" / f"i{k:06d}", "u*.bin"), False)
    # Pieces come in user-block order, each sorted by user: a stable sort by item alone
    # leaves every item's ratings sorted by user.
    order, _ = stable_order(i.astype(np.int64) - start, stop - start)
    entry = write_block_file(target, "item", k, i[order], u[order], r[order])
    return BlockWritten("item", k, block_relpath("item", k), entry, len(u))


# -- the passes, as the driver runs them ----------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """Where and how the passes of one ingest run."""

    client: Any
    """A ``distributed.Client``, or None for a local thread pool."""
    progress: bool | None
    spill: Location
    """The spill prefix: the store writer's scratch, on the store's filesystem (workers reach
    it)."""
    target: Target
    """Where the store's new files go: workers write block files through it."""
    has_t: bool

    def tasks(
        self,
        fn: Callable,
        args: list[tuple],
        label: str,
        kwargs: dict | None = None,
        on_result: Callable | None = None,
    ) -> list:
        return run_tasks(self.client, fn, args, label, self.progress, kwargs, on_result)

    def broadcast(self, data: Any) -> Any:
        """``data`` sent to every worker once (the task gets a future of it), or ``data`` itself
        without a cluster."""
        if self.client is None:
            return data
        [future] = self.client.scatter([data], broadcast=True)
        return future


@dataclass(frozen=True)
class _IdMap:
    """One side's id map, ranked after pass 1 (:meth:`IdMapper.finish`)."""

    index: np.ndarray
    """Dense index of every pass-1 code, int32 (-1: unused)."""
    ids: pa.Array
    """Raw ids in dense-index order."""
    rows: np.ndarray
    """Input rows of every dense index (before duplicates are merged and the split)."""


@dataclass(frozen=True)
class _SplitTotals:
    """Pass 3 summed over all fine buckets."""

    user_counts: np.ndarray
    """Train ratings per user, int64."""
    item_counts: np.ndarray
    """Train ratings per item, int64."""
    n_in: int
    merged: int
    rating_sum: float

    @property
    def n_train(self) -> int:
        return int(self.user_counts.sum())


def _fine_bounds(user_rows: np.ndarray, blocks: BlocksConfig) -> np.ndarray:
    """Boundaries of the fine buckets of users pass 3 works on, about a quarter of a block's
    ratings each; block boundaries are then drawn over the exact train counts it returns."""
    total_rows = int(user_rows.sum())
    share = blocks.target_ratings if blocks.n_blocks is None else -(-total_rows // blocks.n_blocks)
    return balanced_bounds(user_rows, max(1, share // 4))


def _bucket_pass(run: _Run, chunks: list[Location], users: _IdMap, items: _IdMap, fine) -> int:
    """Pass 2: remap every chunk to dense indices and bucket it by fine user bucket; returns
    the number of rows bucketed."""
    remap = run.broadcast(Remap(users.index, items.index, block_table(fine), len(fine) - 1))
    n_bucketed = run.tasks(
        ingest_bucket_chunk,
        [(c, j, run.spill, run.has_t) for j, c in enumerate(chunks)],
        "ingest: bucketing",
        {"remap": remap},
    )
    # Inputs of a pass are deleted only once every task of the pass is done (see
    # ingest_bucket_chunk): peak spill space is two passes' worth.
    (run.spill / "p1").remove()
    return sum(n_bucketed)


def _split_pass(
    run: _Run, fine: np.ndarray, users: _IdMap, items: _IdMap, duplicates: str, plan: _SplitPlan
) -> _SplitTotals:
    """Pass 3: per fine bucket, sort, merge duplicates and split; sum the train counts."""
    n_items = len(items.ids)
    item_counts = np.zeros(n_items, dtype=np.int64)

    def fold_items(res: BucketSplit | DuplicateFound) -> BucketSplit | DuplicateFound:
        if isinstance(res, BucketSplit):
            raw = np.frombuffer(res.item_counts_file.read_bytes(), dtype=np.int32)
            m = len(raw) // 2
            item_counts[raw[:m]] += raw[m:]
            res.item_counts_file.remove()
        return res

    args = [
        (f, int(fine[f]), int(fine[f + 1]), run.spill, run.has_t, n_items, duplicates, plan)
        for f in range(len(fine) - 1)
    ]
    results = run.tasks(ingest_split_bucket, args, "ingest: split", on_result=fold_items)
    (run.spill / "p2").remove()
    _check_no_duplicates(results, users, items)
    return _SplitTotals(
        user_counts=np.concatenate([r.user_counts for r in results]).astype(np.int64),
        item_counts=item_counts,
        n_in=sum(r.n_in for r in results),
        merged=int(sum(r.merged for r in results)),
        rating_sum=sum(r.rating_sum for r in results),
    )


def _user_block_pass(
    run: _Run, user_bounds: np.ndarray, fine: np.ndarray, item_bounds: np.ndarray
) -> list[BlockWritten]:
    """Pass 4: per user block, gather its buckets, write by_user, route rows to item blocks."""
    routing = run.broadcast(Routing(block_table(item_bounds), len(item_bounds) - 1))
    args = []
    for b in range(len(user_bounds) - 1):
        lo, hi = int(user_bounds[b]), int(user_bounds[b + 1])
        first = int(np.searchsorted(fine, lo, side="right")) - 1
        last = int(np.searchsorted(fine, hi, side="left"))
        args.append((b, lo, hi, list(range(first, last)), run.spill, run.target))
    return run.tasks(ingest_user_block, args, "ingest: user blocks", {"routing": routing})


def _item_block_pass(run: _Run, item_bounds: np.ndarray) -> list[BlockWritten]:
    """Pass 5: per item block, sort by (item, user) and write by_item."""
    args = [
        (k, int(item_bounds[k]), int(item_bounds[k + 1]), run.spill, run.target)
        for k in range(len(item_bounds) - 1)
    ]
    return run.tasks(ingest_item_block, args, "ingest: item blocks")


# -- checks between passes ------------------------------------------------------------------------


def _check_no_duplicates(
    results: list[BucketSplit | DuplicateFound], users: _IdMap, items: _IdMap
) -> None:
    """After pass 3 under ``data.duplicates: error``: no (user, item) pair came twice."""
    dup = [r for r in results if isinstance(r, DuplicateFound)]
    if dup:
        u, i = dup[0].user, dup[0].item
        total = sum(r.n_duplicates for r in dup)
        raise InputError(
            f"duplicate ratings: user {users.ids[u].as_py()!r} rated item "
            f"{items.ids[i].as_py()!r} more than once ({total} repeated (user, item) rows in "
            f"all); data.duplicates is 'error': set it to 'last' (keep the latest by "
            f"timestamp, then input order) or 'mean'"
        )


def _check_split(split: _SplitTotals, n_bucketed: int, spill: Location, sp: SplitConfig) -> None:
    """After pass 3: every bucketed row was read, and some train ratings are left."""
    if split.n_in != n_bucketed:
        raise StoreError(
            f"ingest: the split pass read {split.n_in} rows of the {n_bucketed} bucketed; "
            f"spill files in {spill} went missing"
        )
    if split.n_train == 0:
        raise InputError(
            f"the split left no train ratings (split.method {sp.method}, split.test "
            f"{sp.test}, split.validation {sp.validation}): lower them; with a temporal "
            "split, many equal timestamps at the cutoff all go to the held-out side"
        )


def _check_blocks(
    by_user: list[BlockWritten], by_item: list[BlockWritten], n_train: int, spill: Location
) -> None:
    """After pass 5: both sides hold every train rating."""
    n_user, n_item = sum(r.nnz for r in by_user), sum(r.nnz for r in by_item)
    if not (n_user == n_item == n_train):
        raise StoreError(
            f"ingest: by_user holds {n_user} ratings and by_item {n_item}, expected {n_train}; "
            f"spill files in {spill} went missing"
        )


# -- the public functions -------------------------------------------------------------------------


def data_to_ingest(config: Config) -> DataConfig:
    """The ``data`` section ingest reads: ``config.data``; or, when it has no source and synth is
    enabled (``dmf run``), the ratings synth writes (``synth.path``/ratings, with their timestamp
    column)."""
    data = config.data
    if data.source is not None or not config.synth.enabled:
        return data
    columns = data.columns
    if columns.timestamp is None:
        columns = columns.model_copy(update={"timestamp": "timestamp"})
    # The ratings directory of synth's output: read through synth.json's list of files.
    source = str(Location.of(config.resolve(config.synth.path)) / "ratings")
    return data.model_copy(update={"source": source, "columns": columns})


# Keys of fsspec's file info that change when an object is rewritten (S3, GCS, Azure, HDFS).
_VERSION_KEYS = ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated", "md5Hash")


def _file_identity(loc: Location) -> list:
    """[name, size, version] of an input file: for a local file its real path, size and mtime
    (ns); for a URL its size and whatever of ETag/LastModified/mtime its filesystem reports."""
    if loc.is_local:
        st = os.stat(loc.url)
        return [os.path.realpath(loc.url), st.st_size, st.st_mtime_ns]
    try:
        info = loc.fs.info(loc.path)
    except FileNotFoundError:
        raise InputError(f"input file {loc} is gone") from None
    except Exception as exc:  # noqa: BLE001 - network, permissions: name the file
        raise InputError(f"cannot stat input file {loc}: {type(exc).__name__}: {exc}") from exc
    stamp = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None}
    return [loc.url, int(info.get("size") or 0), stamp]


def fingerprint(config: Config, spec: InputSpec) -> str:
    """sha256 of the input files (names, sizes, mtimes or ETags) and the ingest-relevant
    config."""
    h = hashlib.sha256()
    for f in spec.files:
        h.update(json.dumps(_file_identity(f.path)).encode())
    cfg = config.to_dict()
    data = {k: v for k, v in cfg["data"].items() if k != "batch_rows"}
    h.update(
        json.dumps(
            {"data": data, "split": cfg["split"], "blocks": cfg["blocks"]}, sort_keys=True
        ).encode()
    )
    return h.hexdigest()


def ingest(config: Config, client: Any | None = None, progress: bool | None = None) -> Store:
    """Read ``config.data``, split it (``config.split``), and write the store ``config.store``.

    Parameters
    ----------
    config
        The job's config; uses the sections data, split, blocks and store (and synth, whose
        output is the input when ``data.source`` is not set: :func:`data_to_ingest`).
    client
        A ``distributed.Client``: passes 2-5 run as one task per chunk or block on its cluster.
        Its workers read and write the store's filesystem only (spill files go under the store
        writer's scratch prefix): a local store needs workers that see its directory; with a
        URL (``s3://...``) they share nothing local. ``None``: a local thread pool.
    progress
        Progress bars: True, False, or None (only on a terminal).

    Returns
    -------
    Store
        The new store, opened and verified.

    Raises
    ------
    InputError
        Malformed input (the message names the file, line or row, and column) or input that the
        policies of ``config.data`` reject.
    StoreError
        The store directory is not empty and ``store.overwrite`` is false.
    """
    t_start = time.perf_counter()
    spec = resolve_inputs(data_to_ingest(config), config.resolve, config.storage.options)
    if config.split.method == "temporal" and not spec.has_timestamp:
        raise ConfigError(
            "split.method temporal needs timestamps: set data.columns.timestamp to the "
            "timestamp column's name or position"
        )
    out = config_location(config, config.store.path)
    _warn_of_leftovers(out)
    made_dir = out.is_local and not out.exists()
    try:
        # Workers write spill and block files into the store's directory: check they can.
        preflight(client, writes=[out])
        store = _write_store(config, spec, out, client, progress, t_start)
    except BaseException:
        if made_dir and not out.files():
            # A failure leaves no store directory behind, not even an empty one.
            shutil.rmtree(out.url, ignore_errors=True)
        raise
    _report(store.manifest, out)
    return Store.open(out)


def _write_store(
    config: Config,
    spec: InputSpec,
    out: Location,
    client: Any,
    progress: bool | None,
    t_start: float,
) -> Store:
    """Passes 1-5, then the id maps, the held-out splits and the manifest (last)."""
    timings: dict[str, float] = {}
    with StoreWriter(out, overwrite=config.store.overwrite) as w:
        run = _Run(client, progress, w.scratch, w.target, spec.has_timestamp)
        with _timed(timings, "read"):
            p1 = _read_input(spec, config, run.spill, progress)
            users, items = _IdMap(*p1.users.finish()), _IdMap(*p1.items.finish())
            fine = _fine_bounds(users.rows, config.blocks)
            plan = _split_plan(config.split, p1.sample_t)
        with _timed(timings, "bucket"):
            n_bucketed = _bucket_pass(run, p1.chunks, users, items, fine)
        with _timed(timings, "split"):
            split = _split_pass(run, fine, users, items, config.data.duplicates, plan)
            _check_split(split, n_bucketed, run.spill, config.split)
            bl = config.blocks
            user_bounds = balanced_bounds(split.user_counts, bl.target_ratings, bl.n_blocks)
            item_bounds = balanced_bounds(split.item_counts, bl.target_ratings, bl.n_blocks)
        with _timed(timings, "user_blocks"):
            by_user = _user_block_pass(run, user_bounds, fine, item_bounds)
        with _timed(timings, "item_blocks"):
            by_item = _item_block_pass(run, item_bounds)
        with _timed(timings, "finish"):
            for res in by_user + by_item:
                w.add_file(res.rel, res.entry)
            _check_blocks(by_user, by_item, split.n_train, run.spill)
            w.write_id_map("user", users.ids, split.user_counts, user_bounds)
            w.write_id_map("item", items.ids, split.item_counts, item_bounds)
            held = {
                name: _write_held(w, run.spill, name, run.has_t, user_bounds) for name in SPLITS
            }
        run.spill.remove()
        timings["total"] = time.perf_counter() - t_start
        blocks = {
            "user": BlockLayout(bounds=user_bounds.tolist(), nnz=[r.nnz for r in by_user]),
            "item": BlockLayout(bounds=item_bounds.tolist(), nnz=[r.nnz for r in by_item]),
        }
        manifest = _manifest(config, spec, p1, plan, split, held, blocks, timings)
        return w.commit(manifest)


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Record the wall time of the block in ``timings[phase]``, in seconds."""
    t0 = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - t0


# Leftovers named in the warning; the rest are counted.
_LEFTOVERS_NAMED = 5
# What an ingest writes before its manifest: a scratch prefix (spill files), files under
# versioned names (NAME.<8 hex digits>.EXT, dmf.store.storage.versioned), a manifest's
# temporary file.
_OURS = re.compile(
    r"(\.scratch-[0-9a-f]+/.*|(.*/)?[^/]+\.[0-9a-f]{8}(\.[^./]+)?|\.manifest\.json\.tmp-.*)"
)


def _warn_of_leftovers(out: Location) -> None:
    """Warn of files in the store's directory that no manifest lists and that an ingest wrote:
    what one that was killed (or is still running elsewhere) left. They may hold gigabytes of
    spill files. Other files there are not named: they are not dmf's."""
    try:
        stale = leftovers(out, MANIFEST, read_manifest(out, MANIFEST))
    except (StoreError, StorageError, ValueError):
        return  # an unreadable or foreign manifest: the ingest itself will say so
    stale = [rel for rel in stale if _OURS.fullmatch(rel)]
    if not stale:
        return
    # A killed ingest's scratch prefix holds many spill files: name it once.
    names: list[str] = []
    for rel in stale:
        top = rel.split("/", 1)[0]
        name = f"{top}/" if top.startswith(".scratch-") else rel
        if name not in names:
            names.append(name)
    shown = ", ".join(names[:_LEFTOVERS_NAMED])
    if len(names) > _LEFTOVERS_NAMED:
        shown += f" and {len(names) - _LEFTOVERS_NAMED} more"
    log.warning(
        "dmf ingest: %s holds %d file(s) that no manifest lists, left by an interrupted ingest "
        "(or one still running): %s; if no other ingest is running, `dmf clean %s` removes them",
        out,
        len(stale),
        shown,
        out,
    )


def _write_held(
    w: StoreWriter, spill: Location, name: str, has_t: bool, user_bounds: np.ndarray
) -> int:
    """Stream one held-out split's pieces (in user order) into one file per user block,
    ``name/block=NNNNN/part-0.parquet`` (blocks without held-out ratings get none)."""
    paths = _spill_files(spill / "held" / name, "u*.bin")
    fields = [("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32())]
    if has_t:
        fields.append(("timestamp", pa.int64()))
    schema = pa.schema(fields)
    out = _HeldWriter(w, name, schema)
    try:
        for p in paths:
            u, i, r, t = _read_spills([p], has_t)
            cols = [pa.array(u), pa.array(i), pa.array(r)] + ([pa.array(t)] if has_t else [])
            table = pa.Table.from_arrays(cols, schema=schema)
            # Rows are in user order: cut them where user blocks end.
            blk = np.searchsorted(user_bounds, u, side="right") - 1
            cuts = np.flatnonzero(np.diff(blk)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(u)], strict=True):
                if hi > lo:
                    out.write(int(blk[lo]), table.slice(lo, hi - lo))
    finally:
        out.close()
    return out.n


class _HeldWriter:
    """One Parquet file per user block of a held-out split, written in block order."""

    def __init__(self, w: StoreWriter, name: str, schema: pa.Schema):
        self.w, self.name, self.schema = w, name, schema
        self.block: int | None = None
        self.rows = 0
        self.n = 0
        self._file = self._stream = self._writer = None

    def write(self, b: int, table: pa.Table) -> None:
        if b != self.block:
            self.close()
            self.block, self.rows = b, 0
            self._file = self.w.open(split_relpath(self.name, b))
            self._stream = self._file.__enter__()
            self._writer = pq.ParquetWriter(self._stream, self.schema, compression="zstd")
        self._writer.write_table(table)
        self.rows += len(table)
        self.n += len(table)

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.__exit__(None, None, None)
        rel = split_relpath(self.name, self.block)
        self.w.add_file(rel, self._stream.entry.model_copy(update={"rows": self.rows}))
        self._file = self._stream = self._writer = None


def _manifest(
    config: Config,
    spec: InputSpec,
    p1: _Pass1,
    plan: _SplitPlan,
    split: _SplitTotals,
    held: dict[str, int],
    blocks: dict[str, BlockLayout],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The store's manifest (validated by :meth:`StoreWriter.commit`)."""
    sp = config.split
    n_train = split.n_train
    n_total = n_train + held["validation"] + held["test"]
    temporal = sp.method == "temporal" and p1.sample_t is not None
    return {
        "n_users": len(split.user_counts),
        "n_items": len(split.item_counts),
        "n_train": n_train,
        "n_validation": held["validation"],
        "n_test": held["test"],
        "mu": float(split.rating_sum / n_train) if n_train else 0.0,
        "blocks": blocks,
        "split": SplitRecord(
            **sp.model_dump(mode="json"),
            actual={
                "validation": held["validation"] / n_total if n_total else 0.0,
                "test": held["test"] / n_total if n_total else 0.0,
            },
            cutoffs={"validation": plan.cut_validation, "test": plan.cut_test}
            if temporal
            else None,
        ),
        "fingerprint": fingerprint(config, spec),
        "dropped": DroppedRows(
            invalid_ratings=p1.policies.invalid,
            out_of_range=p1.policies.out_of_range,
            duplicates_merged=split.merged,
        ),
        "clipped": p1.policies.clipped,
        "input": {
            **spec.describe(),
            "bytes": sum(f.path.size() for f in spec.files),
            "rows_read": p1.rows_read,
            "rows_kept": p1.rows_kept,
        },
        "config": {k: config.to_dict()[k] for k in ("data", "split", "blocks")},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dmf_version": __version__,
    }


def _report(m: StoreManifest, out: Location) -> None:
    """One summary line, and the dropped/merged counts, on the log (stderr)."""
    t = m.timings["total"]
    rows = m.input["rows_read"]
    log.info(
        "dmf ingest: %s rows -> %s: %d users, %d items, %d train / %d validation / %d test, "
        "%d+%d blocks, %.1fs (%.0f rows/s)",
        rows,
        out,
        m.n_users,
        m.n_items,
        m.n_train,
        m.n_validation,
        m.n_test,
        len(m.blocks["user"].nnz),
        len(m.blocks["item"].nnz),
        t,
        rows / t if t else 0.0,
    )
    d = m.dropped
    if d.invalid_ratings or d.out_of_range or d.duplicates_merged or m.clipped:
        log.info(
            "dmf ingest: dropped %d invalid ratings, %d out of range; clipped %d; merged %d "
            "duplicate rows",
            d.invalid_ratings,
            d.out_of_range,
            m.clipped,
            d.duplicates_merged,
        )


__all__ = [
    "BlockWritten",
    "BucketSplit",
    "DuplicateFound",
    "data_to_ingest",
    "fingerprint",
    "ingest",
    "pair_hash",
    "resolve_inputs",
]
