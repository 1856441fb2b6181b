"""Spill files: the rows ingest's passes hand to one another, on the store's filesystem.

A spill file holds n rows as consecutive columns: int32 a, int32 b, float32 rating[, int64 t]
(a and b are dense indices, or local ranks). Spill files live under the store writer's scratch
prefix, on the store's own filesystem (so workers with no directory in common reach them), and
are read and written through :class:`dmf.store.storage.Location`. Rows with raw ids (before the
dense indices exist) travel as Arrow IPC files instead (:func:`write_table_file`).
"""

from __future__ import annotations

import fnmatch

import numpy as np
import pyarrow as pa

from dmf.data.hashing import bits
from dmf.errors import StoreError
from dmf.store.storage import Location


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


def write_arrays(loc: Location, *arrays: np.ndarray) -> None:
    """Write the arrays' bytes one after the other to the file ``loc``."""
    with loc.writer() as f:
        for x in arrays:
            f.write(memoryview(np.ascontiguousarray(x)).cast("B"))


def write_spill(loc: Location, a: np.ndarray, b: np.ndarray, r: np.ndarray, t=None) -> None:
    cols = [
        np.ascontiguousarray(a, dtype=np.int32),
        np.ascontiguousarray(b, dtype=np.int32),
        np.ascontiguousarray(r, dtype=np.float32),
    ]
    if t is not None:
        cols.append(np.ascontiguousarray(t, dtype=np.int64))
    write_arrays(loc, *cols)


def spill_files(d: Location, pattern: str) -> list[Location]:
    """The spill files directly in ``d`` whose names match ``pattern``, sorted by name (none
    when ``d`` does not exist)."""
    return [d / name for name in d.ls() if fnmatch.fnmatchcase(name, pattern)]


def read_spills(paths: list[Location], has_t: bool):
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


def buckets(blk: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable order grouping rows by their block ``blk`` (int16/int32), and block b's range
    ``order[cuts[b]:cuts[b+1]]``."""
    # A stable sort of 16-bit integers is a radix sort in numpy: linear time.
    order = np.argsort(blk, kind="stable")
    cuts = np.searchsorted(blk[order], np.arange(nb + 1))
    return order, cuts


def spill_by_block(
    blk: np.ndarray, nb: int, base: Location, dirs: str, name: str, u, i, r, t=None
) -> None:
    """Write the rows of each block b (``blk`` gives every row's block) to the spill file
    ``base / dirs.format(b) / name``; blocks without rows get no file."""
    order, cuts = buckets(blk, nb)
    for b in range(nb):
        lo, hi = cuts[b], cuts[b + 1]
        if hi > lo:
            sel = order[lo:hi]
            d = base / dirs.format(b)
            write_spill(d / name, u[sel], i[sel], r[sel], None if t is None else t[sel])


def block_table(bounds: np.ndarray) -> np.ndarray:
    """The block of every row, shape (bounds[-1],): a gather is faster than a searchsorted."""
    nb = len(bounds) - 1
    dt = np.int16 if nb < 2**15 else np.int32
    return np.repeat(np.arange(nb, dtype=dt), np.diff(bounds))


def write_table_file(loc: Location, table: pa.Table) -> None:
    """A table as one Arrow IPC file (raw ids of any type, exactly as read)."""
    with loc.writer() as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def read_table_files(paths: list[Location], schema: pa.Schema | None = None) -> pa.Table:
    """The tables of Arrow IPC files, concatenated in the given order."""
    tables = [pa.ipc.open_file(pa.BufferReader(p.read_bytes())).read_all() for p in paths]
    if not tables:
        if schema is None:
            raise ValueError("no spill files and no schema")
        return schema.empty_table()
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
