"""Getting the fixed side to the blocks that need it: broadcast whole, or routed in pieces.

**Broadcast** (the fast path, when the fixed side fits comfortably in a worker's memory): one task
assembles the whole fixed side from its block files (:func:`assemble_fixed`); every solve task
depends on it, so Dask copies it once to each worker that solves blocks. The driver never holds
it, and a worker's death only reruns the assembly.

**Partitioned** (when it does not fit): each destination block gets only the fixed rows its ratings
reference, as Spark's ALS routes factor blocks (``OutBlock``/``InBlock`` in ``ALS.scala``). The
routing is computed once, before the first half-step, and kept as files:

- in-block of destination d (:func:`route_in_task`): C_d, the sorted distinct fixed rows that
  d's ratings reference (int64, raw), cut by the fixed side's block boundaries into one slice per
  source block s, each with its CRC-32;
- out-block of source s (:func:`route_out_task`): for every d in turn, the local rows of s that
  d needs (the s-slice of C_d, read by a range read), concatenated (int32, raw).

Each half-step then moves exactly those rows, through files:

1. one task per source block s (:func:`exchange_out_task`) reads fixed block s and writes the rows
   of its out-block, in order, to one piece file (raw, rank + 1 values a row);
2. each solve task d (:func:`compact_fixed`) range-reads its piece of every piece file that has
   one, checks each piece's CRC-32, and has the fixed rows C_d in order: a compact fixed side,
   with d's column indices remapped into it by a binary search in C_d.

The compact rows are the same numbers as the broadcast ones, so the solutions are identical to
the last bit whichever mode runs. Bytes moved per half-step: the fixed side read once, plus
sum_d |C_d| x (rank + 1) x itemsize written and read once; worker memory: one destination's
compact rows instead of the whole fixed side.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from dmf.errors import TrainingError
from dmf.store.storage import FileEntry, Location, Target, crc32, read_verified
from dmf.train.sides import SideBlockRef, SideBlocks, read_side_block

_INT64 = np.dtype("<i8")
_INT32 = np.dtype("<i4")


# ---------------------------------------------------------------------------------------------
# The fixed side a solve task sees
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedSide:
    """The side held fixed, as the solver wants it: ``aug`` is :func:`dmf.als.solver.augment`
    of the factors, (n_rows + 1, rank + 1); ``bias`` (n_rows,). For a compact side, ``rows`` are
    the global indices of its rows (sorted), and a block's columns must be remapped into them."""

    aug: np.ndarray
    bias: np.ndarray
    rows: np.ndarray | None = None

    @property
    def factors(self) -> np.ndarray:
        return self.aug[:-1, :-1]

    @property
    def nbytes(self) -> int:
        return int(self.aug.nbytes + self.bias.nbytes)

    def remap(self, cols: np.ndarray) -> np.ndarray:
        """Global fixed-side indices -> rows of this side (identity for a whole side)."""
        if self.rows is None:
            return cols
        pos = np.searchsorted(self.rows, cols)
        if len(cols) and (pos.max() >= len(self.rows) or np.any(self.rows[pos] != cols)):
            raise TrainingError("a block refers to fixed rows its routing does not hold")
        return pos.astype(np.int32)


def _augmented(n: int, width: int, dtype) -> np.ndarray:
    """Room for ``n`` fixed rows as block files store them ([factors, bias], ``width`` values),
    plus :func:`dmf.als.solver.augment`'s zero row: filled in place, then augmented in place by
    :func:`_fixed_in_place`, so a side is held once, not three times (rows, factors, aug)."""
    return np.empty((n + 1, width), dtype=dtype)


def _fixed_in_place(x: np.ndarray, rows: np.ndarray | None) -> FixedSide:
    """``x[:-1]`` holds [factors, bias] rows: take the biases out, and make ``x`` the augmented
    rows [v_j, 1] plus a zero row (exactly :func:`dmf.als.solver.augment` of the factors)."""
    bias = x[:-1, -1].copy()
    x[:-1, -1] = 1.0
    x[-1] = 0.0
    return FixedSide(x, bias, rows)


def assemble_fixed(side: SideBlocks) -> FixedSide:
    """The whole fixed side from its block files (a task: broadcast mode)."""
    x = _augmented(side.n_rows, side.rank + 1, side.dtype)
    for ref in side.refs():
        x[ref.start : ref.stop] = read_side_block(ref)
    return _fixed_in_place(x, None)


# ---------------------------------------------------------------------------------------------
# Routing, computed once
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InBlock:
    """Destination d's in-block file: C_d as raw int64, one slice per source block."""

    location: Location
    entry: FileEntry
    counts: np.ndarray  # (n_src,) rows of each source block in C_d
    crcs: np.ndarray  # (n_src,) CRC-32 of each slice's bytes

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)])


def route_in_task(cols_of, d: int, fixed_bounds: np.ndarray, target: Target) -> InBlock:
    """Destination ``d``'s in-block: the distinct fixed rows its ratings reference.

    ``cols_of`` is a callable returning those column indices (the block's ``cols``, or the items
    of its held-out ratings): a task's input, read on the worker."""
    c = np.unique(np.asarray(cols_of(), dtype=np.int64))
    cuts = np.searchsorted(c, fixed_bounds)
    data = c.astype(_INT64).tobytes()
    crcs = np.array(
        [crc32(data[8 * cuts[s] : 8 * cuts[s + 1]]) for s in range(len(fixed_bounds) - 1)],
        dtype=np.int64,
    )
    entry = target.write_bytes(f"in-{d:05d}.bin", data)
    return InBlock(target.root / entry.path, entry, np.diff(cuts).astype(np.int64), crcs)


def _range(loc: Location, start: int, stop: int, crc: int, what: str) -> bytes:
    """Bytes [start, stop) of ``loc``, checked against their CRC-32."""
    if stop == start:
        return b""
    try:
        data = loc.fs.cat_file(loc.path, start=start, end=stop)
    except FileNotFoundError:
        raise TrainingError(f"{loc} is missing ({what})") from None
    if len(data) != stop - start or crc32(data) != crc:
        raise TrainingError(f"{loc} bytes {start}-{stop} are corrupt ({what})")
    return data


@dataclass(frozen=True)
class OutBlock:
    """Source s's out-block file: the local rows of s each destination needs, destination by
    destination (raw int32)."""

    location: Location
    entry: FileEntry
    counts: np.ndarray  # (n_dst,) rows of s each destination needs


def route_out_task(s: int, start: int, inblocks: list[InBlock], target: Target) -> OutBlock:
    """Source ``s``'s out-block, from the s-slices of every destination's in-block."""
    parts = []
    for d, ib in enumerate(inblocks):
        lo, hi = ib.offsets[s], ib.offsets[s + 1]
        raw = _range(ib.location, 8 * lo, 8 * hi, int(ib.crcs[s]), f"in-block {d}, source {s}")
        parts.append(np.frombuffer(raw, dtype=_INT64) - start)
    local = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    entry = target.write_bytes(f"out-{s:05d}.bin", local.astype(_INT32).tobytes())
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    return OutBlock(target.root / entry.path, entry, counts)


@dataclass(frozen=True)
class Routing:
    """The routing of one fixed side to one set of destinations (see the module docstring)."""

    fixed_side: str
    inblocks: tuple[InBlock, ...]  # one per destination
    outblocks: tuple[OutBlock, ...]  # one per source block of the fixed side

    @property
    def rows_moved(self) -> int:
        """Fixed rows sent to destinations per half-step: sum_d |C_d|."""
        return int(sum(int(ib.counts.sum()) for ib in self.inblocks))

    def max_rows(self) -> int:
        """The most fixed rows one destination needs: its compact side's rows."""
        return max((int(ib.counts.sum()) for ib in self.inblocks), default=0)


# ---------------------------------------------------------------------------------------------
# Each half-step
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pieces:
    """Source s's piece file of one half-step: the rows of its out-block, destination by
    destination, and each destination's piece CRC-32."""

    location: Location
    crcs: np.ndarray  # (n_dst,)
    row_bytes: int


def exchange_out_task(ref: SideBlockRef, out: OutBlock, target: Target) -> Pieces:
    """Write the rows of fixed block ``ref`` that each destination needs, in out-block order."""
    x = read_side_block(ref)
    local = np.frombuffer(read_verified(out.location, out.entry, TrainingError), dtype=_INT32)
    rows = np.ascontiguousarray(x[local])
    del x
    data = memoryview(rows).cast("B")  # no copy: the block's rows and the gathered ones, no more
    row_bytes = rows.shape[1] * rows.itemsize
    cuts = np.concatenate([[0], np.cumsum(out.counts)]) * row_bytes
    crcs = np.array(
        [crc32(data[cuts[d] : cuts[d + 1]]) for d in range(len(out.counts))], dtype=np.int64
    )
    entry = target.write_bytes(f"piece-{ref.block:05d}.bin", data)
    return Pieces(target.root / entry.path, crcs, row_bytes)


@dataclass(frozen=True)
class CompactSpec:
    """What solve task ``d`` needs, besides the pieces, to assemble its compact fixed side: its
    in-block, and the out-block counts of each source block that has rows for it (in the order
    of the pieces it is given)."""

    d: int
    inblock: InBlock
    source_counts: tuple[np.ndarray, ...]
    rank: int
    dtype: str


def compact_fixed(spec: CompactSpec, pieces: list[Pieces]) -> FixedSide:
    """Destination ``spec.d``'s compact fixed side, from this half-step's ``pieces`` of the
    source blocks that have rows for it (a solve task calls it)."""
    ib = spec.inblock
    rows = np.frombuffer(read_verified(ib.location, ib.entry, TrainingError), dtype=_INT64)
    width = spec.rank + 1
    x = _augmented(len(rows), width, spec.dtype)
    at = 0
    for counts, piece in zip(spec.source_counts, pieces, strict=True):
        n = int(counts[spec.d])
        if n == 0:
            continue
        before = int(counts[: spec.d].sum())
        raw = _range(
            piece.location,
            before * piece.row_bytes,
            (before + n) * piece.row_bytes,
            int(piece.crcs[spec.d]),
            f"piece for destination {spec.d}",
        )
        x[at : at + n] = np.frombuffer(raw, dtype=spec.dtype).reshape(n, width)
        at += n
    if at != len(rows):
        raise TrainingError(
            f"destination {spec.d} received {at} fixed rows, its routing says {len(rows)}"
        )
    return _fixed_in_place(x, rows)


def remove_quietly(loc: Location) -> None:
    with contextlib.suppress(Exception):
        loc.remove()
