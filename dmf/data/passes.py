"""The tasks of ingest's passes 2-6, and the records they return.

Each task runs on a Dask worker (or a local thread), reads the spill files of the pass before and
writes its own (:mod:`dmf.data.spill`), and returns a small typed record. A task may run twice
(Dask reruns one whose worker died before its result arrived): it finds its input again and
writes the same output. Inputs of a pass are deleted by the driver once the whole pass is done.

The passes (:mod:`dmf.data.ingest` runs them)::

    pass 2a  per chunk   group pass 1's rows (raw user ids) by user range
                         (:mod:`dmf.data.idpartition`); skipped when there is one range
    pass 2b  per range   rank the range's distinct user ids (dense index = range offset + rank),
                         write them as the range's id file; cut the range into *fine* buckets of
                         users (about a quarter of a block's ratings) and spill rows by bucket
    pass 3   per bucket  sort by (user, item); merge duplicates; split off held-out rows; spill
                         train rows; write the train counts per user and per item
    pass 4   per user    gather its buckets; write by_user and the block's id map; route rows to
             block       item-block spill
    pass 5   per item    stable sort by item (rows arrive sorted by user); write by_item
             block
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dmf.data.hashing import U64, pair_hash64, unit_float
from dmf.data.idpartition import group_by_range, rank_ids, read_id_range, write_id_file
from dmf.data.spill import (
    block_table,
    read_spills,
    read_table_files,
    spill_by_block,
    spill_files,
    stable_order,
    write_arrays,
    write_spill,
    write_table_file,
)
from dmf.store.layout import (
    FileEntry,
    balanced_bounds,
    block_relpath,
    write_block_file,
    write_id_map_file,
)
from dmf.store.storage import Location, Target

# -- what the tasks are given and return ----------------------------------------------------------


@dataclass(frozen=True)
class UserRanges:
    """Pass 2b's ranges of users: where each range's sorted raw ids are, and the dense index of
    its first id. Sent to the tasks of pass 4; the driver reads single ids through it."""

    offsets: np.ndarray
    """Dense index of each range's first id, and the number of users last, (n_ranges + 1,)."""
    id_files: list[Location]
    id_type: pa.DataType

    def ids(self, lo: int, hi: int) -> pa.Array:
        """Raw ids of the dense users [lo, hi), reading only the row groups that hold them."""
        pieces = []
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        for p in range(max(first, 0), len(self.id_files)):
            a, b = int(self.offsets[p]), int(self.offsets[p + 1])
            if a >= hi:
                break
            s, e = max(lo, a) - a, min(hi, b) - a
            if e > s:
                pieces.append(read_id_range(self.id_files[p], s, e))
        if not pieces:
            return pa.array([], type=self.id_type)
        return pa.concat_arrays(pieces) if len(pieces) > 1 else pieces[0]


@dataclass(frozen=True)
class RangeRanked:
    """Pass 2b's result for one user range."""

    range: int
    n_users: int
    """Distinct users of the range."""
    n_rows: int
    fine: np.ndarray
    """Fine bucket boundaries, in ranks within the range, (n_buckets + 1,)."""


@dataclass(frozen=True)
class Bucket:
    """A fine bucket of users, as pass 3 is given it."""

    src: Location
    """Directory of its spill files (users as ranks within their range)."""
    start: int
    """Dense index of its first user."""
    stop: int
    offset: int
    """Dense index of its range's first user: dense index = offset + rank."""


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
    """Pass 3's result for one fine bucket of users: train and held-out counts."""

    bucket: int
    n_in: int
    """Rows read from pass 2's spill files."""
    merged: int
    """Rows removed by merging duplicates (``data.duplicates``)."""
    n_train: int
    user_counts_file: Location
    """Train ratings of each user of the bucket, int32, (stop - start,): a file, so that the
    driver never holds a count per user; pass 4 reads it for the id maps, and the driver only
    the few in which block boundaries fall."""
    item_counts_file: Location
    """Train ratings per item, as int32 items then int32 counts: a file, not the result, so
    that hundreds of results of n_items entries each do not all pass through the scheduler.
    The driver folds it in as the result arrives, and deletes it."""
    rating_sum: float
    """Sum of the train ratings, in float64."""
    n_validation: int
    n_test: int
    rating_min: float = math.inf
    """Lowest and highest train rating (inf and -inf for a bucket without train ratings)."""
    rating_max: float = -math.inf


@dataclass(frozen=True)
class BlockWritten:
    """Passes 4 and 5: one block file of the store, written by a task."""

    side: str
    block: int
    rel: str
    """Path of the file in the store."""
    entry: FileEntry
    nnz: int
    id_map: FileEntry | None = None
    """Pass 4: the entry of the block's id map file."""


@dataclass(frozen=True)
class Routing:
    """Pass 4's table, sent to every worker once: where each item's ratings go."""

    block_of_item: np.ndarray
    """Item block of every dense item index (:func:`block_table`)."""
    n_blocks: int


# -- pass 2: user ranges and their ranks ----------------------------------------------------------


def range_dir(spill: Location, p: int) -> Location:
    """Where pass 2a puts the rows of user range ``p``."""
    return spill / "ranges" / f"r{p:05d}"


def id_file(spill: Location, p: int) -> Location:
    """User range ``p``'s sorted distinct raw ids (pass 2b)."""
    return spill / "ids" / f"r{p:05d}.parquet"


def ingest_group_chunk(chunk: Location, c: int, spill: Location, splitters: pa.Array) -> int:
    """Pass 2a: split one pass-1 chunk by user range (input order kept within a range);
    returns its number of rows."""
    table = read_table_files([chunk])
    for p, rows in group_by_range(table, "user", splitters):
        write_table_file(range_dir(spill, p) / f"c{c:06d}.arrow", rows)
    return table.num_rows


def ingest_rank_range(
    p: int,
    files: list[Location],
    spill: Location,
    schema: pa.Schema,
    item_index: np.ndarray,
    fine_share: int,
) -> RangeRanked:
    """Pass 2b: rank user range ``p``'s distinct raw ids and write them as its id file; map
    items to dense indices (``item_index`` of every pass-1 item code); cut the range into fine
    buckets and spill its rows by bucket, in input order, users as ranks within the range."""
    table = read_table_files(files, schema)
    if table.num_rows == 0:  # a range the sample's splitters left empty
        return RangeRanked(p, 0, 0, np.zeros(1, dtype=np.int64))
    ids, rank = rank_ids(table.column("user").combine_chunks())
    write_id_file(id_file(spill, p), ids)
    fine = balanced_bounds(np.bincount(rank, minlength=len(ids)), fine_share)
    item = item_index[table.column("item").to_numpy()]
    rating = table.column("rating").to_numpy()
    t = table.column("timestamp").to_numpy() if "timestamp" in table.column_names else None
    del table
    spill_by_block(
        block_table(fine)[rank],
        len(fine) - 1,
        spill / "p2",
        f"r{p:05d}-{{:06d}}",
        "rows.bin",
        rank,
        item,
        rating,
        t,
    )
    return RangeRanked(p, len(ids), len(rank), fine)


# -- pass 3: duplicates and the split -------------------------------------------------------------


@dataclass
class SplitPlan:
    """How pass 3 splits: ``split``'s settings, and a temporal split's cutoffs."""

    method: str
    validation: float
    test: float
    seed: int
    cut_validation: int = 0  # temporal: validation if t >= cut_validation (and not test)
    cut_test: int = 0  # temporal: test if t >= cut_test


def split_masks(
    plan: SplitPlan, u: np.ndarray, i: np.ndarray, t, start: int, stop: int
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
    """One row per (user, item) under ``policy``, in (user, item) order: ``last`` keeps the
    latest row (by timestamp, then input order); ``mean`` and ``sum`` (repeated events of
    implicit feedback) average or add the ratings up, in float64, stored as float32, with the
    latest timestamp.

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
    if policy not in ("mean", "sum"):
        raise ValueError(f"unknown data.duplicates policy {policy!r}")
    rs = np.add.reduceat(r[order].astype(np.float64), starts)
    if policy == "mean":
        rs /= sizes
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


def train_spill(spill: Location, g: int) -> Location:
    """Pass 3's train rows of bucket ``g``, sorted by (user, item)."""
    return spill / "p3" / f"u{g:06d}.bin"


def user_counts_file(spill: Location, g: int) -> Location:
    """Pass 3's train counts of bucket ``g``'s users."""
    return spill / "p3" / f"n{g:06d}.bin"


def ingest_split_bucket(
    g: int,
    bucket: Bucket,
    spill: Location,
    has_t: bool,
    n_items: int,
    duplicates: str,
    plan: SplitPlan,
) -> BucketSplit | DuplicateFound:
    """Pass 3: sort one bucket of users by (user, item), merge duplicates, split off held-out
    rows, and spill the train rows; write exact train counts."""
    u, i, r, t = read_spills(spill_files(bucket.src, "*.bin"), has_t)
    u += np.int32(bucket.offset)  # ranks within the range -> dense indices
    start, stop = bucket.start, bucket.stop
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
        return DuplicateFound(g, int(u[order[k]]), int(i[order[k]]), int(dup.sum()))
    else:
        u, i, r, t = _merge_duplicates(u, i, r, t, order, dup, duplicates)
    del order
    merged = n_in - len(u)

    val, test = split_masks(plan, u, i, t, start, stop)
    for name, m in (("validation", val), ("test", test)):
        if m.any():
            hd = spill / "held" / name
            write_spill(hd / f"u{g:06d}.bin", u[m], i[m], r[m], None if t is None else t[m])
    train = ~(val | test)
    u, i, r = u[train], i[train], r[train]
    write_spill(train_spill(spill, g), u, i, r)
    items, item_counts = _counts_of(i, n_items)
    counts_file = spill / "p3" / f"counts-{g:06d}.bin"
    write_arrays(counts_file, items.astype(np.int32), item_counts.astype(np.int32))
    ucounts = user_counts_file(spill, g)
    write_arrays(ucounts, np.bincount(u - start, minlength=stop - start).astype(np.int32))
    return BucketSplit(
        bucket=g,
        n_in=n_in,
        merged=merged,
        n_train=len(u),
        user_counts_file=ucounts,
        item_counts_file=counts_file,
        rating_sum=float(r.astype(np.float64).sum()),
        n_validation=int(val.sum()),
        n_test=int(test.sum()),
        rating_min=float(r.min()) if len(r) else math.inf,
        rating_max=float(r.max()) if len(r) else -math.inf,
    )


def read_user_counts(loc: Location) -> np.ndarray:
    """A bucket's train counts per user (:func:`ingest_split_bucket`), int32."""
    return np.frombuffer(loc.read_bytes(), dtype=np.int32)


# -- passes 4 and 5: the block files --------------------------------------------------------------


def ingest_user_block(
    b: int,
    start: int,
    stop: int,
    buckets: list[int],
    bucket_start: int,
    spill: Location,
    target: Target,
    routing: Routing,
    ranges: UserRanges,
) -> BlockWritten:
    """Pass 4: gather one user block's train rows from its split buckets (each sorted by
    (user, item), in user order; the first starts at user ``bucket_start``), write by_user and
    the block's id map, and route the rows to item-block spill."""
    u, i, r, _ = read_spills([train_spill(spill, g) for g in buckets], False)
    # Buckets at the edges may hold users of the neighbouring blocks.
    inside = (u >= start) & (u < stop)
    if not inside.all():
        u, i, r = u[inside], i[inside], r[inside]
    entry = write_block_file(target, "user", b, u, i, r)
    counts = np.concatenate([read_user_counts(user_counts_file(spill, g)) for g in buckets])
    counts = counts[start - bucket_start : stop - bucket_start]
    id_map = write_id_map_file(target, "user", b, ranges.ids(start, stop), start, counts)
    spill_by_block(
        routing.block_of_item[i],
        routing.n_blocks,
        spill / "p4",
        "i{:06d}",
        f"u{b:06d}.bin",
        u,
        i,
        r,
    )
    return BlockWritten("user", b, block_relpath("user", b), entry, len(u), id_map)


def ingest_item_block(
    k: int, start: int, stop: int, spill: Location, target: Target
) -> BlockWritten:
    """Pass 5: sort one item block's train ratings by (item, user) and write by_item."""
    u, i, r, _ = read_spills(spill_files(spill / "p4" / f"i{k:06d}", "u*.bin"), False)
    # Pieces come in user-block order, each sorted by user: a stable sort by item alone
    # leaves every item's ratings sorted by user.
    order, _ = stable_order(i.astype(np.int64) - start, stop - start)
    entry = write_block_file(target, "item", k, i[order], u[order], r[order])
    return BlockWritten("item", k, block_relpath("item", k), entry, len(u))
