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

Passes 2-5 run one task per chunk, bucket or block: on the Dask cluster when a client is given
(tasks read and write spill files in a directory next to the store, which every worker must
see), else on a local thread pool. Every decision depends only on dense indices, ratings and
timestamps, so the result is the same whatever the batch size or the number of workers.

The store is built by :class:`dmf.store.StoreWriter` in a temporary sibling directory (the spill
lives inside it) and renamed into place when the manifest is written: a killed ingest leaves no
store that looks complete, and an old store stays intact until the new one is whole.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmf.config import Config
from dmf.data.idmap import IdMapper, make_mapper
from dmf.data.readers import IdTypeMismatch, InputSpec, iter_batches, resolve_inputs
from dmf.errors import ConfigError, InputError, StoreError
from dmf.store.layout import (
    SPLITS,
    Store,
    StoreWriter,
    balanced_bounds,
    block_relpath,
    write_block_file,
)

log = logging.getLogger("dmf")

# Rows kept in the bounded sample of timestamps that sets the temporal split's cutoffs.
TEMPORAL_SAMPLE = 1 << 20
_U64 = np.uint64


# -- hashing: splitmix64, vectorised ------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of a uint64 array (wrapping arithmetic)."""
    x = x.astype(_U64, copy=True)
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _pair_hash64(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    s = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=_U64))[0]
    return _mix64((users.astype(_U64) << _U64(32)) ^ items.astype(_U64) ^ s)


def pair_hash(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    """A uniform float in [0, 1) for each (user index, item index, seed), shape (n,).

    Depends on nothing else, so a rating's split is the same whatever the batch size or the
    number of workers.
    """
    h = _pair_hash64(users, items, seed)
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length()) if n > 1 else 1


def stable_order(key: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort of non-negative int64 ``key`` (all below ``kmax``), and the sorted keys.

    When key and row number fit in 63 bits together, they are packed into one int64 and sorted
    by value (numpy's SIMD sort, several times faster than a stable argsort); ties keep their
    input order because the row number is the low bits.
    """
    n = len(key)
    ib, kb = _bits(n), _bits(kmax)
    if kb + ib <= 63:
        packed = (key.astype(np.int64) << np.int64(ib)) | np.arange(n, dtype=np.int64)
        packed.sort()
        return packed & np.int64((1 << ib) - 1), packed >> np.int64(ib)
    order = np.argsort(key, kind="stable")
    return order, key[order]


# -- spill files ----------------------------------------------------------------------------------
# A spill file holds n rows as consecutive columns: int32 a, int32 b, float32 rating[, int64 t].


def _write_spill(path: Path, a: np.ndarray, b: np.ndarray, r: np.ndarray, t=None) -> None:
    with open(path, "wb") as f:
        np.ascontiguousarray(a, dtype=np.int32).tofile(f)
        np.ascontiguousarray(b, dtype=np.int32).tofile(f)
        np.ascontiguousarray(r, dtype=np.float32).tofile(f)
        if t is not None:
            np.ascontiguousarray(t, dtype=np.int64).tofile(f)


def _read_spills(paths: list[Path], has_t: bool):
    """Concatenate spill files (in the given order) into (a, b, r, t-or-None)."""
    row = 12 + (8 if has_t else 0)
    sizes = [os.path.getsize(p) // row for p in paths]
    n = int(sum(sizes))
    a = np.empty(n, np.int32)
    b = np.empty(n, np.int32)
    r = np.empty(n, np.float32)
    t = np.empty(n, np.int64) if has_t else None
    at = 0
    for p, m in zip(paths, sizes, strict=True):
        raw = np.fromfile(p, dtype=np.uint8)
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


def _spill_by_block(blk: np.ndarray, nb: int, dirs: str, name: str, u, i, r, t=None) -> None:
    """Write the rows of each block b (``blk`` gives every row's block) to the spill file
    ``dirs.format(b) / name``; blocks without rows get no file."""
    order, cuts = _buckets(blk, nb)
    for b in range(nb):
        lo, hi = cuts[b], cuts[b + 1]
        if hi > lo:
            sel = order[lo:hi]
            d = Path(dirs.format(b))
            d.mkdir(parents=True, exist_ok=True)
            _write_spill(d / name, u[sel], i[sel], r[sel], None if t is None else t[sel])


def block_table(bounds: np.ndarray) -> np.ndarray:
    """The block of every row, shape (bounds[-1],): a gather is faster than a searchsorted."""
    nb = len(bounds) - 1
    dt = np.int16 if nb < 2**15 else np.int32
    return np.repeat(np.arange(nb, dtype=dt), np.diff(bounds))


# -- tasks of passes 2-4 (run on workers or threads; names show on the Dask dashboard) ----------


def ingest_bucket_chunk(chunk: str, c: int, spill: str, has_t: bool, maps: tuple) -> int:
    """Pass 2: remap one pass-1 chunk to dense indices and split it by user block."""
    user_index, item_index, user_block, _item_block, nb_user, _nb_item = maps
    uc, ic, r, t = _read_spills([Path(chunk)], has_t)
    u = user_index[uc]
    i = item_index[ic]
    _spill_by_block(
        user_block[u], nb_user, str(Path(spill) / "p2" / "u{:06d}"), f"c{c:06d}.bin", u, i, r, t
    )
    # The chunk is deleted by the driver once the whole pass is done: Dask may run a task
    # twice (a worker died before its result arrived), and a rerun must find its input.
    return len(u)


@dataclass
class _SplitPlan:
    method: str
    validation: float
    test: float
    seed: int
    cut_validation: int = 0  # temporal: validation if t >= cut_validation (and not test)
    cut_test: int = 0  # temporal: test if t >= cut_test


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
    h = _pair_hash64(u, i, plan.seed)
    if plan.method == "random":
        x = (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))
        test = x < plan.test
        return (x < plan.test + plan.validation) & ~test, test
    # method "user": each user's ratings ranked by hash; the first k_test are test, the next
    # k_validation validation; at least one rating stays in train.
    # Order each user's ratings by the top 16 bits of the hash, ties by item (the rows are
    # sorted by (user, item) and the sort is stable): the same order whatever the bucket.
    hk = (h >> _U64(48)).astype(np.int64)
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


def ingest_split_bucket(
    b: int,
    start: int,
    stop: int,
    spill: str,
    has_t: bool,
    n_items: int,
    duplicates: str,
    plan: _SplitPlan,
) -> dict[str, Any]:
    """Pass 3: sort one bucket of users by (user, item), merge duplicates, split off held-out
    rows, and spill the train rows; return exact train counts."""
    d = Path(spill) / "p2" / f"u{b:06d}"
    paths = sorted(d.glob("c*.bin")) if d.is_dir() else []
    u, i, r, t = _read_spills(paths, has_t)
    n_in = len(u)
    key = (u.astype(np.int64) - start) * max(n_items, 1) + i
    order, ks = stable_order(key, (stop - start) * max(n_items, 1))
    del key
    dup = ks[1:] == ks[:-1]
    merged = 0
    if dup.any():
        if duplicates == "error":
            k = int(np.flatnonzero(dup)[0])
            return {
                "b": b,
                "duplicate": (int(u[order[k]]), int(i[order[k]])),
                "n_duplicates": int(dup.sum()),
            }
        starts = np.flatnonzero(np.r_[True, ~dup])
        sizes = np.diff(np.r_[starts, len(ks)])
        if duplicates == "last":
            if t is not None:
                # The latest timestamp wins, then the latest in input order (the sort is stable).
                ts = t[order]
                tmax = np.repeat(np.maximum.reduceat(ts, starts), sizes)
                pos = np.where(ts == tmax, np.arange(len(ts)), -1)
                keep = order[np.maximum.reduceat(pos, starts)]
            else:
                keep = order[starts + sizes - 1]
            u, i, r = u[keep], i[keep], r[keep]
            t = t[keep] if t is not None else None
        else:  # mean
            rs = np.add.reduceat(r[order].astype(np.float64), starts) / sizes
            first = order[starts]
            u, i, r = u[first], i[first], rs.astype(np.float32)
            t = np.maximum.reduceat(t[order], starts) if t is not None else None
        merged = n_in - len(u)
    else:
        u, i, r = u[order], i[order], r[order]
        t = t[order] if t is not None else None
    del ks, order

    val, test = _split_masks(plan, u, i, t, start, stop)
    held = {"validation": val, "test": test}
    for name, m in held.items():
        if m.any():
            hd = Path(spill) / "held" / name
            hd.mkdir(parents=True, exist_ok=True)
            _write_spill(hd / f"u{b:06d}.bin", u[m], i[m], r[m], None if t is None else t[m])
    train = ~(val | test)
    u, i, r = u[train], i[train], r[train]
    _write_spill(Path(spill) / "p3" / f"u{b:06d}.bin", u, i, r)
    # Train counts per item, sparse: a dense bincount costs n_items per bucket.
    if n_items <= 8 * max(len(i), 1):
        ic = np.bincount(i, minlength=n_items)
        items = np.flatnonzero(ic)
        item_counts = ic[items]
    else:
        items, item_counts = np.unique(i, return_counts=True)
    # Item counts go through a file, not the task's result: on a cluster, hundreds of results
    # of n_items entries each would all pass through the scheduler's connection to the client.
    counts_file = Path(spill) / "p3" / f"counts-{b:06d}.bin"
    with open(counts_file, "wb") as f:
        items.astype(np.int32).tofile(f)
        item_counts.astype(np.int32).tofile(f)
    return {
        "b": b,
        "user_counts": np.bincount(u - start, minlength=stop - start),
        "item_counts_file": str(counts_file),
        "sum": float(r.astype(np.float64).sum()),
        "n_validation": int(val.sum()),
        "n_test": int(test.sum()),
        "merged": merged,
        "n_in": n_in,
    }


def ingest_user_block(
    b: int, start: int, stop: int, buckets: list[int], spill: str, out: str, maps: tuple
) -> dict[str, Any]:
    """Pass 4: gather one user block's train rows from its split buckets (each sorted by
    (user, item), in user order), write by_user, and route the rows to item-block spill."""
    paths = [Path(spill) / "p3" / f"u{f:06d}.bin" for f in buckets]
    u, i, r, _ = _read_spills(paths, False)
    # Buckets at the edges may hold users of the neighbouring blocks.
    inside = (u >= start) & (u < stop)
    if not inside.all():
        u, i, r = u[inside], i[inside], r[inside]
    rel = block_relpath("user", b)
    entry = write_block_file(Path(out) / rel, "user", u, i, r)
    _, _, _, item_block, _, nb_item = maps
    _spill_by_block(
        item_block[i], nb_item, str(Path(spill) / "p4" / "i{:06d}"), f"u{b:06d}.bin", u, i, r
    )
    return {"b": b, "rel": rel, "entry": entry, "nnz": len(u)}


def ingest_item_block(k: int, start: int, stop: int, spill: str, out: str) -> dict[str, Any]:
    """Pass 5: sort one item block's train ratings by (item, user) and write by_item."""
    d = Path(spill) / "p4" / f"i{k:06d}"
    paths = sorted(d.glob("u*.bin")) if d.is_dir() else []
    u, i, r, _ = _read_spills(paths, False)
    # Pieces come in user-block order, each sorted by user: a stable sort by item alone
    # leaves every item's ratings sorted by user.
    order, _ = stable_order(i.astype(np.int64) - start, stop - start)
    rel = block_relpath("item", k)
    entry = write_block_file(Path(out) / rel, "item", i[order], u[order], r[order])
    return {"k": k, "rel": rel, "entry": entry, "nnz": len(u)}


# -- running tasks ------------------------------------------------------------------------------


def _run_tasks(
    client,
    fn: Callable,
    args: list[tuple],
    label: str,
    progress: bool | None,
    kwargs: dict | None = None,
    on_result: Callable[[Any], Any] | None = None,
) -> list:
    """Run ``fn(*a, **kwargs)`` for every ``a``: one Dask task each, or on a thread pool.

    Results come back in the order of ``args``; ``on_result``, if given, is applied to each
    result as it arrives (on this thread) and its return value is kept instead, so large parts
    of results can be folded into a total without being held all at once.
    """
    from tqdm import tqdm

    kwargs = kwargs or {}
    keep = on_result or (lambda x: x)
    results: list = [None] * len(args)
    bar = tqdm(total=len(args), desc=label, unit="task", disable=_disable(progress), leave=False)
    try:
        if client is None:
            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
                futs = {ex.submit(fn, *a, **kwargs): j for j, a in enumerate(args)}
                for f in as_completed(list(futs)):
                    results[futs.pop(f)] = keep(f.result())
                    bar.update()
        else:
            from distributed import as_completed as dask_completed

            token = uuid.uuid4().hex[:8]
            name = fn.__name__.replace("_", "-")
            index = {}
            pending = []
            for j, a in enumerate(args):
                f = client.submit(fn, *a, **kwargs, key=f"{name}-{j}-{token}", pure=False)
                index[f.key] = j
                pending.append(f)
            for f in dask_completed(pending):
                results[index[f.key]] = keep(f.result())
                f.release()
                bar.update()
    finally:
        bar.close()
    return results


def _disable(progress: bool | None) -> bool | None:
    # tqdm: disable=None shows the bar only on a terminal.
    return None if progress is None else not progress


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


# -- pass 1 ---------------------------------------------------------------------------------------


@dataclass
class _Pass1:
    users: IdMapper
    items: IdMapper
    chunks: list[str]
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    sample_t: np.ndarray | None = None


def _fmt(v: float) -> str:
    if np.isnan(v):
        return "null/NaN"
    return repr(float(v))


def _pass1(spec: InputSpec, config: Config, spill: Path, progress: bool | None) -> _Pass1:
    from tqdm import tqdm

    d = config.data
    temporal = config.split.method == "temporal" and (config.split.test or config.split.validation)
    (spill / "p1").mkdir(parents=True, exist_ok=True)
    res: _Pass1 | None = None
    dropped = {"invalid_rating": 0, "out_of_range": 0, "clipped": 0}
    sample_h = np.zeros(0, _U64)
    sample_t = np.zeros(0, np.int64)
    thresh = np.iinfo(np.uint64).max
    tseed = _mix64(np.array([config.split.seed ^ 0x5DEECE66D], dtype=_U64))[0]
    buf: list[tuple] = []
    buf_rows = 0

    def flush() -> None:
        nonlocal buf, buf_rows
        if not buf:
            return
        assert res is not None
        path = spill / "p1" / f"c{len(res.chunks):06d}.bin"
        cat = [np.concatenate(c) if c[0] is not None else None for c in zip(*buf, strict=True)]
        _write_spill(path, *cat)
        res.chunks.append(str(path))
        buf, buf_rows = [], 0

    bar = tqdm(desc="ingest: reading", unit=" rows", unit_scale=True, disable=_disable(progress))
    try:
        for bt in _prefetch(iter_batches(spec)):
            if res is None:
                res = _Pass1(
                    make_mapper(spec.id_types["user"]), make_mapper(spec.id_types["item"]), []
                )
            n = len(bt)
            r = bt.rating
            keep = np.ones(n, dtype=bool)
            bad = ~np.isfinite(r)
            if bad.any():
                if d.invalid_ratings == "error":
                    k = int(np.flatnonzero(bad)[0])
                    raise InputError(
                        f"{bt.where(k, 'rating')}: rating {_fmt(r[k])} is not a finite number; "
                        "set data.invalid_ratings: drop to skip such rows"
                    )
                dropped["invalid_rating"] += int(bad.sum())
                keep &= ~bad
            if d.rating_range is not None:
                lo, hi = d.rating_range
                out = keep & ((r < lo) | (r > hi))
                if out.any():
                    if d.out_of_range == "error":
                        k = int(np.flatnonzero(out)[0])
                        raise InputError(
                            f"{bt.where(k, 'rating')}: rating {_fmt(r[k])} is outside "
                            f"data.rating_range [{lo}, {hi}]; set data.out_of_range: drop or "
                            "clip, or widen the range"
                        )
                    if d.out_of_range == "drop":
                        dropped["out_of_range"] += int(out.sum())
                        keep &= ~out
                    else:
                        dropped["clipped"] += int(out.sum())
                        r = np.clip(r, lo, hi)
            t = bt.timestamp
            if temporal:
                h = _mix64(np.arange(res.rows_read, res.rows_read + n, dtype=_U64) ^ tseed)
                sel = keep & (h < thresh)
                sample_h = np.concatenate([sample_h, h[sel]])
                sample_t = np.concatenate([sample_t, t[sel]])
                if len(sample_h) > 2 * TEMPORAL_SAMPLE:
                    # Keep the rows of the smallest hashes: the same sample whatever the batching.
                    thresh = np.partition(sample_h, TEMPORAL_SAMPLE)[TEMPORAL_SAMPLE]
                    m = sample_h < thresh
                    sample_h, sample_t = sample_h[m], sample_t[m]
            res.rows_read += n
            if not keep.all():
                mask = pa.array(keep)
                users, items = bt.user.filter(mask), bt.item.filter(mask)
                r = r[keep]
                t = t[keep] if t is not None else None
            else:
                users, items = bt.user, bt.item
            try:
                uc = res.users.encode(users)
                ic = res.items.encode(items)
            except ValueError as exc:  # an id the map cannot hold (a NUL byte in a string id)
                raise InputError(
                    f"{bt.file}: {bt.kind}s from {bt.first}: user column "
                    f"{bt.colnames.get('user', 'user')!r} or item column "
                    f"{bt.colnames.get('item', 'item')!r}: {exc}"
                ) from exc
            res.rows_kept += len(uc)
            buf.append((uc, ic, r.astype(np.float32), t))
            buf_rows += len(uc)
            if buf_rows >= spec.batch_rows:
                flush()
            bar.update(n)
        if res is not None:
            flush()
    finally:
        bar.close()
    if res is None or res.rows_read == 0:
        files = ", ".join(str(f.path) for f in spec.files)
        raise InputError(f"no ratings in {files}: the input is empty or has only a header")
    res.dropped = dropped
    if res.rows_kept == 0:
        why = ", ".join(
            f"{v} by data.{'invalid_ratings' if k == 'invalid_rating' else k}"
            for k, v in dropped.items()
            if v and k != "clipped"
        )
        raise InputError(
            f"all {res.rows_read} input rows were dropped ({why}): nothing is left to ingest; "
            "check data.rating_range and the rating column (data.columns.rating)"
        )
    if temporal:
        res.sample_t = sample_t
    return res


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


# -- the public function ------------------------------------------------------------------------


def fingerprint(config: Config, spec: InputSpec) -> str:
    """sha256 of the input files (names, sizes, mtimes) and the ingest-relevant config."""
    h = hashlib.sha256()
    for f in spec.files:
        st = f.path.stat()
        h.update(json.dumps([str(f.path.resolve()), st.st_size, st.st_mtime_ns]).encode())
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
        The job's config; uses the sections data, split, blocks and store.
    client
        A ``distributed.Client``: passes 2-4 run as one task per chunk or block on its cluster,
        whose workers must see the store's parent directory. ``None``: a local thread pool.
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
    timings: dict[str, float] = {}
    spec = resolve_inputs(config)
    sp = config.split
    if sp.method == "temporal" and not spec.has_timestamp:
        raise ConfigError(
            "split.method temporal needs timestamps: set data.columns.timestamp to the "
            "timestamp column's name or position"
        )
    out = config.resolve(config.store.path)
    stale = sorted(out.parent.glob(f".{out.name}.tmp-*")) if out.parent.is_dir() else []
    if stale:
        # Left by an ingest that was killed (or is still running elsewhere): they may hold
        # gigabytes of spill files.
        log.warning(
            "dmf ingest: temporary directories of an interrupted ingest are next to the store: "
            "%s; delete them to free their space if no other ingest is running",
            ", ".join(str(p) for p in stale),
        )
    with StoreWriter(out, overwrite=config.store.overwrite) as w:
        spill = w.tmp / "_spill"
        # Pass 1, re-run with string ids if integer-looking ids turn out not to be integers.
        t0 = time.perf_counter()
        for _attempt in range(3):
            try:
                p1 = _pass1(spec, config, spill, progress)
                break
            except IdTypeMismatch as exc:
                log.info(
                    "dmf ingest: %s ids are not all integers; reading them as strings", exc.side
                )
                shutil.rmtree(spill, ignore_errors=True)
                spec.id_types[exc.side] = "string"
        else:  # pragma: no cover - at most two sides can switch
            raise InputError("cannot settle the id types of the input")
        user_index, user_ids, user_rows = p1.users.finish()
        item_index, item_ids, item_rows = p1.items.finish()
        n_users, n_items = len(user_ids), len(item_ids)
        bl = config.blocks
        total_rows = int(user_rows.sum())
        # Pass 3 works on fine buckets of users (about a quarter of a block's ratings); block
        # boundaries are then drawn over the exact train counts it returns.
        share = bl.target_ratings if bl.n_blocks is None else -(-total_rows // bl.n_blocks)
        fine_bounds = balanced_bounds(user_rows, max(1, share // 4))
        plan = _SplitPlan(sp.method, sp.validation, sp.test, sp.seed)
        if p1.sample_t is not None:
            plan = _temporal_plan(plan, p1.sample_t)
        timings["read"] = time.perf_counter() - t0
        has_t = spec.has_timestamp
        n_fine = len(fine_bounds) - 1

        # Pass 2: remap and bucket by fine user bucket.
        t0 = time.perf_counter()
        maps: Any = (user_index, item_index, block_table(fine_bounds), None, n_fine, 0)
        if client is not None:
            [maps] = client.scatter([maps], broadcast=True)
        n_bucketed = _run_tasks(
            client,
            ingest_bucket_chunk,
            [(c, j, str(spill), has_t) for j, c in enumerate(p1.chunks)],
            "ingest: bucketing",
            progress,
            {"maps": maps},
        )
        # Inputs of a pass are deleted only once every task of the pass is done (see
        # ingest_bucket_chunk): peak spill space is two passes' worth.
        for c in p1.chunks:
            os.remove(c)
        timings["bucket"] = time.perf_counter() - t0

        # Pass 3: per fine bucket: sort, merge duplicates, split.
        t0 = time.perf_counter()
        (spill / "p3").mkdir()
        args3 = [
            (
                f,
                int(fine_bounds[f]),
                int(fine_bounds[f + 1]),
                str(spill),
                has_t,
                n_items,
                config.data.duplicates,
                plan,
            )
            for f in range(n_fine)
        ]
        item_counts = np.zeros(n_items, dtype=np.int64)

        def fold_items(r: dict) -> dict:
            if "item_counts_file" in r:
                raw = np.fromfile(r["item_counts_file"], dtype=np.int32)
                m = len(raw) // 2
                item_counts[raw[:m]] += raw[m:]
                os.remove(r["item_counts_file"])
            return r

        sres = _run_tasks(
            client, ingest_split_bucket, args3, "ingest: split", progress, on_result=fold_items
        )
        shutil.rmtree(spill / "p2", ignore_errors=True)
        dup = [r for r in sres if "duplicate" in r]
        if dup:
            u, i = dup[0]["duplicate"]
            total = sum(r["n_duplicates"] for r in dup)
            raise InputError(
                f"duplicate ratings: user {user_ids[u].as_py()!r} rated item "
                f"{item_ids[i].as_py()!r} more than once ({total} repeated (user, item) rows in "
                f"all); data.duplicates is 'error': set it to 'last' (keep the latest by "
                f"timestamp, then input order) or 'mean'"
            )
        if sum(r["n_in"] for r in sres) != sum(n_bucketed):
            raise StoreError(
                f"ingest: the split pass read {sum(r['n_in'] for r in sres)} rows of the "
                f"{sum(n_bucketed)} bucketed; spill files in {spill} went missing"
            )
        user_counts = np.concatenate([r["user_counts"] for r in sres]).astype(np.int64)
        n_train = int(user_counts.sum())
        if n_train == 0:
            raise InputError(
                f"the split left no train ratings (split.method {sp.method}, split.test "
                f"{sp.test}, split.validation {sp.validation}): lower them; with a temporal "
                "split, many equal timestamps at the cutoff all go to the held-out side"
            )
        user_bounds = balanced_bounds(user_counts, bl.target_ratings, bl.n_blocks)
        item_bounds = balanced_bounds(item_counts, bl.target_ratings, bl.n_blocks)
        timings["split"] = time.perf_counter() - t0

        # Pass 4: per user block: gather its buckets, write by_user, route to item blocks.
        t0 = time.perf_counter()
        maps = (None, None, None, block_table(item_bounds), 0, len(item_bounds) - 1)
        if client is not None:
            [maps] = client.scatter([maps], broadcast=True)
        args4 = []
        for b in range(len(user_bounds) - 1):
            lo, hi = int(user_bounds[b]), int(user_bounds[b + 1])
            first = int(np.searchsorted(fine_bounds, lo, side="right")) - 1
            last = int(np.searchsorted(fine_bounds, hi, side="left"))
            args4.append((b, lo, hi, list(range(first, last)), str(spill), str(w.tmp)))
        ures = _run_tasks(
            client, ingest_user_block, args4, "ingest: user blocks", progress, {"maps": maps}
        )
        del maps
        timings["user_blocks"] = time.perf_counter() - t0

        # Pass 5: per item block.
        t0 = time.perf_counter()
        args5 = [
            (k, int(item_bounds[k]), int(item_bounds[k + 1]), str(spill), str(w.tmp))
            for k in range(len(item_bounds) - 1)
        ]
        ires = _run_tasks(client, ingest_item_block, args5, "ingest: item blocks", progress)
        timings["item_blocks"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for res in ures + ires:
            w.add_file(res["rel"], res["entry"])
        if not (sum(r["nnz"] for r in ures) == sum(r["nnz"] for r in ires) == n_train):
            raise StoreError(
                f"ingest: by_user holds {sum(r['nnz'] for r in ures)} ratings and by_item "
                f"{sum(r['nnz'] for r in ires)}, expected {n_train}; spill files in {spill} "
                "went missing"
            )
        w.write_id_map("user", user_ids, user_counts)
        w.write_id_map("item", item_ids, item_counts)
        held = {name: _write_held(w, spill, name, has_t) for name in SPLITS}
        timings["finish"] = time.perf_counter() - t0
        shutil.rmtree(spill, ignore_errors=True)

        n_total = n_train + held["validation"] + held["test"]
        merged = int(sum(r["merged"] for r in sres))
        dropped = {
            "invalid_ratings": p1.dropped["invalid_rating"],
            "out_of_range": p1.dropped["out_of_range"],
            "duplicates_merged": merged,
        }
        split_info: dict[str, Any] = {
            **sp.model_dump(mode="json"),
            "actual": {
                "validation": held["validation"] / n_total if n_total else 0.0,
                "test": held["test"] / n_total if n_total else 0.0,
            },
        }
        if sp.method == "temporal" and p1.sample_t is not None:
            split_info["cutoffs"] = {"validation": plan.cut_validation, "test": plan.cut_test}
        timings["total"] = time.perf_counter() - t_start
        from dmf import __version__

        manifest = {
            "n_users": n_users,
            "n_items": n_items,
            "n_train": n_train,
            "n_validation": held["validation"],
            "n_test": held["test"],
            "mu": float(sum(r["sum"] for r in sres) / n_train) if n_train else 0.0,
            "blocks": {
                "user": {"bounds": user_bounds.tolist(), "nnz": [r["nnz"] for r in ures]},
                "item": {"bounds": item_bounds.tolist(), "nnz": [r["nnz"] for r in ires]},
            },
            "split": split_info,
            "fingerprint": fingerprint(config, spec),
            "dropped": dropped,
            "clipped": p1.dropped["clipped"],
            "input": {
                **spec.describe(),
                "bytes": sum(f.path.stat().st_size for f in spec.files),
                "rows_read": p1.rows_read,
                "rows_kept": p1.rows_kept,
            },
            "config": {k: config.to_dict()[k] for k in ("data", "split", "blocks")},
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dmf_version": __version__,
        }
        w.commit(manifest)
    _report(manifest, out)
    return Store.open(out)


def _write_held(w: StoreWriter, spill: Path, name: str, has_t: bool) -> int:
    """Stream one held-out split's pieces (in user-block order) into ``name/part-0.parquet``."""
    d = spill / "held" / name
    paths = sorted(d.glob("u*.bin")) if d.is_dir() else []
    if not paths:
        return 0
    fields = [("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32())]
    if has_t:
        fields.append(("timestamp", pa.int64()))
    schema = pa.schema(fields)
    rel = f"{name}/part-0.parquet"
    (w.tmp / name).mkdir(exist_ok=True)
    n = 0
    with pq.ParquetWriter(w.tmp / rel, schema, compression="zstd") as pw:
        for p in paths:
            u, i, r, t = _read_spills([p], has_t)
            cols = [pa.array(u), pa.array(i), pa.array(r)] + ([pa.array(t)] if has_t else [])
            pw.write_table(pa.Table.from_arrays(cols, schema=schema))
            n += len(u)
    w.add_file(rel, {"bytes": (w.tmp / rel).stat().st_size, "rows": n})
    return n


def _report(m: dict, out: Path) -> None:
    """One summary line, and the dropped/merged counts, on the log (stderr)."""
    t = m["timings"]["total"]
    rows = m["input"]["rows_read"]
    log.info(
        "dmf ingest: %s rows -> %s: %d users, %d items, %d train / %d validation / %d test, "
        "%d+%d blocks, %.1fs (%.0f rows/s)",
        rows,
        out,
        m["n_users"],
        m["n_items"],
        m["n_train"],
        m["n_validation"],
        m["n_test"],
        len(m["blocks"]["user"]["nnz"]),
        len(m["blocks"]["item"]["nnz"]),
        t,
        rows / t if t else 0.0,
    )
    d = m["dropped"]
    if any(d.values()) or m.get("clipped"):
        log.info(
            "dmf ingest: dropped %d invalid ratings, %d out of range; clipped %d; merged %d "
            "duplicate rows",
            d["invalid_ratings"],
            d["out_of_range"],
            m.get("clipped", 0),
            d["duplicates_merged"],
        )


__all__ = ["ingest", "fingerprint", "pair_hash", "resolve_inputs"]
