"""Ingest: raw ratings (any size) -> a store, in bounded memory.

The pipeline (memory is bounded by one batch, one user range or one block; the driver holds the
item side's id map, small, and never the user side's)::

    pass 1   driver      read batches (no rating column: each event counts 1); clean (policies
                         for invalid ratings, negative implicit weights, out-of-range ones); give
                         items provisional codes; keep a bounded sample of the user ids; spill
                         (raw user id, item code, rating[, t]) chunks to disk. The item map is
                         then ranked: the dense index of an id is the rank of the raw id.
    pass 2   per chunk   group rows by user range (the sample's quantiles cut the user ids into
             per range   ranges of about ``data.id_partition_rows`` rows); per range, rank its
                         distinct user ids (dense index = range offset + rank, so the global
                         rank: :mod:`dmf.data.idpartition`), then bucket its rows by *fine*
                         user bucket (contiguous users, about 1/4 of a block's ratings).
    pass 3   per bucket  sort by (user, item); merge duplicates (policy); split off validation
                         and test rows (hash of (user, item, seed), per-user ranks, or
                         timestamps); spill train rows and exact train counts per user and item.
             driver      block boundaries over those counts (the user side's read only where a
                         boundary falls: :func:`dmf.store.layout.balanced_bounds_chunked`).
    pass 4   per user    gather its buckets; write by_user and the block's id map; route rows to
             block       item-block spill.
    pass 5   per item    stable sort by item (rows arrive sorted by user); write by_item.
             block

The tasks of passes 2-5 (:mod:`dmf.data.passes`) run on the Dask cluster when a client is given,
else on a local thread pool. Tasks read and write spill files under the store writer's scratch
prefix (:attr:`dmf.store.layout.StoreWriter.scratch`), on the store's own filesystem: a hidden
directory inside a local store, a prefix of an ``s3://`` one, so workers on other machines, with
no directory in common, reach it. Every file goes through :class:`dmf.store.storage.Location`.
Every decision depends only on dense indices, ratings and timestamps, so the result is the same
whatever the batch size, the number of user ranges or the number of workers. Each task returns a
small typed record, and the driver checks the totals between passes (no row lost with a spill
file).

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
import hashlib
import json
import logging
import math
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
from dmf.data.hashing import U64, mix64, mix64_int, pair_hash
from dmf.data.idmap import IdMapper, make_mapper
from dmf.data.idpartition import IdSample
from dmf.data.passes import (
    BlockWritten,
    Bucket,
    BucketSplit,
    DuplicateFound,
    Routing,
    SplitPlan,
    UserRanges,
    id_file,
    ingest_group_chunk,
    ingest_item_block,
    ingest_rank_range,
    ingest_split_bucket,
    ingest_user_block,
    range_dir,
    read_user_counts,
)
from dmf.data.readers import Batch, IdTypeMismatch, InputSpec, iter_batches, resolve_inputs
from dmf.data.spill import block_table, read_spills, spill_files, write_table_file
from dmf.dist.tasks import progress_disabled, run_tasks
from dmf.errors import ConfigError, InputError, StoreError
from dmf.store.layout import (
    MANIFEST,
    SPLITS,
    BlockLayout,
    DroppedRows,
    SplitRecord,
    Store,
    StoreManifest,
    StoreWriter,
    balanced_bounds,
    balanced_bounds_chunked,
    id_map_relpath,
    split_relpath,
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
    by batch; counts the rows they drop or clip.

    Under implicit feedback (``implicit``: ``model.feedback: implicit``) a rating is an event's
    weight (plays, seconds), which must be at least 0: a negative one is invalid, as a NaN is
    (zero is allowed)."""

    def __init__(self, data: DataConfig, implicit: bool = False):
        self.data = data
        self.implicit = implicit
        self.invalid = 0
        self.out_of_range = 0
        self.clipped = 0

    def apply(self, bt: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(which rows of ``bt`` to keep, their ratings, clipped if so asked), shapes (n,)."""
        r = bt.rating
        keep = np.ones(len(bt), dtype=bool)
        bad = ~np.isfinite(r)
        if self.implicit:
            bad |= r < 0
        if bad.any():
            if self.data.invalid_ratings == "error":
                k = int(np.flatnonzero(bad)[0])
                raise InputError(f"{bt.where(k, 'rating')}: {self._why(r[k])}")
            self.invalid += int(bad.sum())
            keep &= ~bad
        if self.data.rating_range is not None:
            keep, r = self._apply_range(bt, keep, r)
        return keep, r

    def _why(self, v: float) -> str:
        """Why the rating ``v`` is invalid, and what to do."""
        if np.isfinite(v):  # negative, under implicit feedback
            return (
                f"weight {_fmt(v)} is negative; implicit feedback (model.feedback: implicit) "
                "takes event weights of at least 0: set data.invalid_ratings: drop to skip such "
                "rows"
            )
        return (
            f"rating {_fmt(v)} is not a finite number; set data.invalid_ratings: drop to skip "
            "such rows"
        )

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

    Row n of the input (0-based) is hashed (splitmix64 of n and the split seed); the sample holds
    the rows of the ``size`` smallest hashes and up to ``size`` more (trimmed as it grows);
    :meth:`timestamps` gives the first ``size`` only, so it is the same whatever the batching.
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

    def timestamps(self) -> np.ndarray:
        """The timestamps of the rows of the ``size`` smallest hashes."""
        if len(self.h) <= self.size:
            return self.t
        return self.t[np.argpartition(self.h, self.size)[: self.size]]


class _ChunkSpill:
    """Pass 1's output: rows gathered into chunks of at least ``rows`` rows (the last may have
    fewer), each spilled as an Arrow IPC file ``cNNNNNN.arrow`` in ``directory``: raw user ids
    (ranked by pass 2), item codes, ratings and timestamps."""

    def __init__(self, directory: Location, rows: int, schema: pa.Schema):
        self.directory = directory
        self.rows = rows
        self.schema = schema
        self.paths: list[Location] = []
        self.buf: list[tuple] = []
        self.buffered = 0

    def add(self, users: pa.Array, ic: np.ndarray, r: np.ndarray, t: np.ndarray | None) -> None:
        self.buf.append((users, ic, r, t))
        self.buffered += len(ic)
        if self.buffered >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        users, ic, r, t = zip(*self.buf, strict=True)
        ic = np.concatenate(ic).astype(np.int32, copy=False)
        cols = [pa.concat_arrays(users), pa.array(ic), pa.array(np.concatenate(r))]
        if t[0] is not None:
            cols.append(pa.array(np.concatenate(t)))
        path = self.directory / f"c{len(self.paths):06d}.arrow"
        write_table_file(path, pa.Table.from_arrays(cols, schema=self.schema))
        self.paths.append(path)
        self.buf, self.buffered = [], 0


def _chunk_schema(user_type: str, has_t: bool) -> pa.Schema:
    fields = [
        ("user", pa.string() if user_type == "string" else pa.int64()),
        ("item", pa.int32()),
        ("rating", pa.float32()),
    ]
    return pa.schema(fields + ([("timestamp", pa.int64())] if has_t else []))


@dataclass
class _Pass1:
    """What pass 1 read: the item codes, a sample of the user ids, the chunks, the counts.

    Items get provisional codes on the driver (:class:`IdMapper`): the item side is the small
    one (500k items against a billion users). Users keep their raw ids, ranked range by range
    in pass 2 (:mod:`dmf.data.idpartition`): the driver never holds them all."""

    items: IdMapper
    user_sample: IdSample
    schema: pa.Schema
    """Of the chunks (:func:`_chunk_schema`)."""
    chunks: list[Location]
    policies: _RatingPolicies
    rows_read: int = 0
    rows_kept: int = 0
    sample_t: np.ndarray | None = None
    """Temporal split: the sampled timestamps (:class:`_TemporalSample`)."""

    def encode(self, bt: Batch, keep: np.ndarray, r: np.ndarray) -> tuple:
        """(user ids, item codes, ratings, timestamps or None) of the rows ``keep``; offers the
        user ids to the sample."""
        t = bt.timestamp
        if not keep.all():
            mask = pa.array(keep)
            users, items = bt.user.filter(mask), bt.item.filter(mask)
            r = r[keep]
            t = t[keep] if t is not None else None
        else:
            users, items = bt.user, bt.item
        ic = self.items.encode(items)
        self.user_sample.add(self.rows_read + np.flatnonzero(keep), users)
        self.rows_kept += len(ic)
        return users, ic, r, t


def _pass1(spec: InputSpec, config: Config, spill: Location, progress: bool | None) -> _Pass1:
    """Pass 1: read every batch, apply the rating policies, give items provisional codes, and
    spill the rows in chunks."""
    from tqdm import tqdm  # here, not at the top: keeps the CLI light

    sp = config.split
    temporal = sp.method == "temporal" and (sp.test or sp.validation)
    sample = _TemporalSample(sp.seed, TEMPORAL_SAMPLE) if temporal else None
    policies = _RatingPolicies(config.data, config.model.implicit)
    res: _Pass1 | None = None
    chunks: _ChunkSpill | None = None
    bar = tqdm(
        desc="ingest: reading", unit=" rows", unit_scale=True, disable=progress_disabled(progress)
    )
    try:
        for bt in _prefetch(iter_batches(spec)):
            if res is None:  # the first batch settles the id types
                schema = _chunk_schema(spec.id_types["user"], spec.has_timestamp)
                chunks = _ChunkSpill(spill / "p1", spec.batch_rows, schema)
                res = _Pass1(
                    make_mapper(spec.id_types["item"]),
                    IdSample(sp.seed),
                    schema,
                    chunks.paths,
                    policies,
                )
            keep, r = policies.apply(bt)
            if sample is not None:
                sample.add(res.rows_read, keep, bt.timestamp)
            users, ic, r, t = res.encode(bt, keep, r)
            res.rows_read += len(bt)
            chunks.add(users, ic, r.astype(np.float32), t)
            bar.update(len(bt))
        if chunks is not None:
            chunks.flush()
    finally:
        bar.close()
    _check_rows_left(res, spec)
    if sample is not None:
        res.sample_t = sample.timestamps()
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


# -- the passes, as the driver runs them ----------------------------------------------------------


def _temporal_plan(plan: SplitPlan, sample: np.ndarray) -> SplitPlan:
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


def _split_plan(sp: SplitConfig, sample_t: np.ndarray | None) -> SplitPlan:
    """The split of pass 3; a temporal split's cutoffs come from pass 1's timestamp sample."""
    plan = SplitPlan(sp.method, sp.validation, sp.test, sp.seed)
    return plan if sample_t is None else _temporal_plan(plan, sample_t)


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
    """The item side's id map, ranked after pass 1 (:meth:`IdMapper.finish`)."""

    index: np.ndarray
    """Dense index of every pass-1 code, int32 (-1: unused)."""
    ids: pa.Array
    """Raw ids in dense-index order."""
    rows: np.ndarray
    """Input rows of every dense index (before duplicates are merged and the split)."""


@dataclass(frozen=True)
class _Users:
    """The user side after pass 2: its ranges and fine buckets (the driver holds no id)."""

    ranges: UserRanges
    buckets: list[Bucket]
    fine: np.ndarray
    """Dense index of every bucket's first user, and the number of users last."""
    n_rows: int
    """Rows ranked (all of pass 1's)."""

    @property
    def n_users(self) -> int:
        return int(self.ranges.offsets[-1])


@dataclass(frozen=True)
class _SplitTotals:
    """Pass 3 summed over all fine buckets."""

    results: list[BucketSplit]
    item_counts: np.ndarray
    """Train ratings per item, int64."""
    n_in: int
    merged: int
    rating_sum: float
    rating_range: tuple[float, float]
    """Lowest and highest train rating."""

    @property
    def n_train(self) -> int:
        return sum(r.n_train for r in self.results)


def _n_ranges(rows_kept: int, data: DataConfig) -> int:
    """User ranges of pass 2: about ``data.id_partition_rows`` rows each."""
    return max(1, -(-rows_kept // data.id_partition_rows))


def _fine_share(rows: int, blocks: BlocksConfig, min_blocks: int) -> int:
    """Ratings of a fine bucket of users, about a quarter of a block's; block boundaries are
    drawn over the exact train counts pass 3 returns."""
    if blocks.n_blocks is None:
        share = min(blocks.target_ratings, -(-rows // min_blocks))
    else:
        share = -(-rows // blocks.n_blocks)
    return max(1, share // 4)


def _range_pass(run: _Run, p1: _Pass1, items: _IdMap, config: Config) -> _Users:
    """Pass 2: group pass 1's rows by user range, then rank each range and bucket its rows."""
    splitters = p1.user_sample.splitters(_n_ranges(p1.rows_kept, config.data))
    n_ranges = len(splitters) + 1
    if n_ranges == 1:
        inputs = [list(p1.chunks)]
    else:
        run.tasks(
            ingest_group_chunk,
            [(c, j, run.spill, splitters) for j, c in enumerate(p1.chunks)],
            "ingest: user ranges",
        )
        # Inputs of a pass are deleted only once every task of the pass is done: Dask may run
        # a task twice (a worker died before its result arrived), and a rerun must find its
        # input. Peak spill space is two passes' worth.
        (run.spill / "p1").remove()
        inputs = [spill_files(range_dir(run.spill, p), "c*.arrow") for p in range(n_ranges)]
    item_index = run.broadcast(items.index)
    share = _fine_share(p1.rows_kept, config.blocks, config.min_blocks)
    ranked = run.tasks(
        ingest_rank_range,
        [(p, files, run.spill, p1.schema) for p, files in enumerate(inputs)],
        "ingest: user ids",
        {"item_index": item_index, "fine_share": share},
    )
    (run.spill / ("p1" if n_ranges == 1 else "ranges")).remove()
    offsets = np.concatenate([[0], np.cumsum([r.n_users for r in ranked])]).astype(np.int64)
    buckets = [
        Bucket(
            run.spill / "p2" / f"r{r.range:05d}-{f:06d}",
            int(off + r.fine[f]),
            int(off + r.fine[f + 1]),
            int(off),
        )
        for r, off in zip(ranked, offsets[:-1], strict=True)
        for f in range(len(r.fine) - 1)
    ]
    fine = np.array([b.start for b in buckets] + [int(offsets[-1])], dtype=np.int64)
    files = [id_file(run.spill, p) for p in range(n_ranges)]
    log.info("dmf ingest: %d users in %d id range(s)", int(offsets[-1]), n_ranges)
    return _Users(
        UserRanges(offsets, files, p1.schema.field("user").type),
        buckets,
        fine,
        sum(r.n_rows for r in ranked),
    )


def _split_pass(
    run: _Run, users: _Users, items: _IdMap, duplicates: str, plan: SplitPlan
) -> _SplitTotals:
    """Pass 3: per fine bucket, sort, merge duplicates and split; sum the item counts."""
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
        (g, b, run.spill, run.has_t, n_items, duplicates, plan) for g, b in enumerate(users.buckets)
    ]
    results = run.tasks(ingest_split_bucket, args, "ingest: split", on_result=fold_items)
    (run.spill / "p2").remove()
    _check_no_duplicates(results, users, items)
    return _SplitTotals(
        results=results,
        item_counts=item_counts,
        n_in=sum(r.n_in for r in results),
        merged=int(sum(r.merged for r in results)),
        rating_sum=sum(r.rating_sum for r in results),
        rating_range=(
            min((r.rating_min for r in results), default=math.inf),
            max((r.rating_max for r in results), default=-math.inf),
        ),
    )


def _user_bounds(
    users: _Users, split: _SplitTotals, blocks: BlocksConfig, min_blocks: int
) -> np.ndarray:
    """User block boundaries over the exact train counts, reading only the buckets' count
    files in which a boundary falls (:func:`balanced_bounds_chunked`)."""
    res = split.results
    return balanced_bounds_chunked(
        users.fine[:-1],
        np.array([r.n_train for r in res], dtype=np.int64),
        users.n_users,
        lambda g: read_user_counts(res[g].user_counts_file),
        blocks.target_ratings,
        blocks.n_blocks,
        min_blocks,
    )


def _user_block_pass(
    run: _Run, user_bounds: np.ndarray, users: _Users, item_bounds: np.ndarray
) -> list[BlockWritten]:
    """Pass 4: per user block, gather its buckets, write by_user and its id map, route rows to
    item blocks."""
    routing = run.broadcast(Routing(block_table(item_bounds), len(item_bounds) - 1))
    ranges = run.broadcast(users.ranges)
    fine = users.fine
    args = []
    for b in range(len(user_bounds) - 1):
        lo, hi = int(user_bounds[b]), int(user_bounds[b + 1])
        first = int(np.searchsorted(fine, lo, side="right")) - 1
        last = int(np.searchsorted(fine, hi, side="left"))
        args.append((b, lo, hi, list(range(first, last)), int(fine[first]), run.spill, run.target))
    return run.tasks(
        ingest_user_block, args, "ingest: user blocks", {"routing": routing, "ranges": ranges}
    )


def _item_block_pass(run: _Run, item_bounds: np.ndarray) -> list[BlockWritten]:
    """Pass 5: per item block, sort by (item, user) and write by_item."""
    args = [
        (k, int(item_bounds[k]), int(item_bounds[k + 1]), run.spill, run.target)
        for k in range(len(item_bounds) - 1)
    ]
    return run.tasks(ingest_item_block, args, "ingest: item blocks")


# -- checks between passes ------------------------------------------------------------------------


def _check_no_duplicates(
    results: list[BucketSplit | DuplicateFound], users: _Users, items: _IdMap
) -> None:
    """After pass 3 under ``data.duplicates: error``: no (user, item) pair came twice."""
    dup = [r for r in results if isinstance(r, DuplicateFound)]
    if dup:
        u, i = dup[0].user, dup[0].item
        total = sum(r.n_duplicates for r in dup)
        user = users.ranges.ids(u, u + 1)[0].as_py()
        raise InputError(
            f"duplicate ratings: user {user!r} rated item "
            f"{items.ids[i].as_py()!r} more than once ({total} repeated (user, item) rows in "
            f"all); data.duplicates is 'error': set it to 'last' (keep the latest by "
            f"timestamp, then input order), 'mean', or 'sum' (events of implicit feedback)"
        )


def _check_split(split: _SplitTotals, users: _Users, spill: Location, sp: SplitConfig) -> None:
    """After pass 3: every row ranked was read, and some train ratings are left."""
    if split.n_in != users.n_rows:
        raise StoreError(
            f"ingest: the split pass read {split.n_in} rows of the {users.n_rows} ranked; "
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
    # Settings that change how ingest runs (or whether it refuses), never what it writes.
    skip = ("batch_rows", "id_partition_rows", "max_id_length")
    data = {k: v for k, v in cfg["data"].items() if k not in skip}
    settings = {
        "data": data,
        "split": cfg["split"],
        # Without min_blocks: it resolves from the cluster's size, and the blocks it
        # adds change training's speed, never its result (nor what a store holds).
        "blocks": {k: v for k, v in cfg["blocks"].items() if k != "min_blocks"},
    }
    if config.model.implicit:
        # Implicit feedback refuses (or drops) negative weights: a store ingested for explicit
        # ratings is not one for implicit feedback. Explicit stores keep their fingerprints.
        settings["feedback"] = "implicit"
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _with_min_blocks(config: Config, client: Any | None) -> Config:
    """``config`` with ``blocks.min_blocks: auto`` resolved from the cluster that ingests:
    its worker threads (the config's ``cluster`` section describes it only when dmf starts
    it)."""
    if config.blocks.min_blocks != "auto" or client is None:
        return config
    threads = sum(client.nthreads().values()) or 1
    blocks = config.blocks.model_copy(update={"min_blocks": threads})
    return config.model_copy(update={"blocks": blocks})


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
    config = _with_min_blocks(config, client)
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
    with StoreWriter(out, overwrite=config.store.overwrite, force=config.store.force) as w:
        run = _Run(client, progress, w.scratch, w.target, spec.has_timestamp)
        with _timed(timings, "read"):
            p1 = _read_input(spec, config, run.spill, progress)
            items = _IdMap(*p1.items.finish())
            plan = _split_plan(config.split, p1.sample_t)
        with _timed(timings, "user_ids"):
            users = _range_pass(run, p1, items, config)
        with _timed(timings, "split"):
            split = _split_pass(run, users, items, config.data.duplicates, plan)
            _check_split(split, users, run.spill, config.split)
            bl = config.blocks
            user_bounds = _user_bounds(users, split, bl, config.min_blocks)
            item_bounds = balanced_bounds(
                split.item_counts, bl.target_ratings, bl.n_blocks, config.min_blocks
            )
        with _timed(timings, "user_blocks"):
            by_user = _user_block_pass(run, user_bounds, users, item_bounds)
        with _timed(timings, "item_blocks"):
            by_item = _item_block_pass(run, item_bounds)
        with _timed(timings, "finish"):
            for res in by_user + by_item:
                w.add_file(res.rel, res.entry)
            for res in by_user:
                w.add_file(id_map_relpath("user", res.block), res.id_map)
            _check_blocks(by_user, by_item, split.n_train, run.spill)
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
        manifest = _manifest(config, spec, p1, plan, split, users.n_users, held, blocks, timings)
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
    paths = spill_files(spill / "held" / name, "u*.bin")
    fields = [("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32())]
    if has_t:
        fields.append(("timestamp", pa.int64()))
    schema = pa.schema(fields)
    out = _HeldWriter(w, name, schema)
    try:
        for p in paths:
            u, i, r, t = read_spills([p], has_t)
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
    plan: SplitPlan,
    split: _SplitTotals,
    n_users: int,
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
        "n_users": n_users,
        "n_items": len(split.item_counts),
        "n_train": n_train,
        "n_validation": held["validation"],
        "n_test": held["test"],
        "mu": float(split.rating_sum / n_train) if n_train else 0.0,
        "rating_range": list(split.rating_range) if n_train else None,
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
