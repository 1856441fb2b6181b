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
import functools
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

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """Where each source's slice starts in the in-block, (n_src + 1,)."""
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

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """Where each destination's rows start in the out-block, (n_dst,)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


@dataclass(frozen=True)
class InSlice:
    """The slice of one destination's in-block that source s needs: rows [lo, lo + n) of the
    in-block file, and their CRC-32. A route-out task gets one per destination: O(blocks) per
    task, where the in-blocks themselves would be O(blocks^2)."""

    location: Location
    lo: int
    n: int
    crc: int


def in_slices(inblocks: list[InBlock] | tuple[InBlock, ...], s: int) -> list[InSlice]:
    """What :func:`route_out_task` of source ``s`` reads: its slice of every in-block."""
    return [
        InSlice(ib.location, int(ib.offsets[s]), int(ib.counts[s]), int(ib.crcs[s]))
        for ib in inblocks
    ]


def route_out_task(s: int, start: int, slices: list[InSlice], target: Target) -> OutBlock:
    """Source ``s``'s out-block, from its slice of every destination's in-block
    (:func:`in_slices`)."""
    parts = []
    for d, sl in enumerate(slices):
        what = f"in-block {d}, source {s}"
        raw = _range(sl.location, 8 * sl.lo, 8 * (sl.lo + sl.n), sl.crc, what)
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
    """Source s's piece file of one half-step: for each destination in turn, the CRC-32 of its
    rows (4 bytes, little-endian) then its rows (out-block order). The checksums travel in the
    file, so the record a solve task gets is the same size however many destinations there
    are."""

    location: Location
    row_bytes: int


# Bytes of a piece read at a time into the compact side: the only copy beside it.
READ_CHUNK = 8 << 20


def exchange_out_task(ref: SideBlockRef, out: OutBlock, target: Target) -> Pieces:
    """Write the rows of fixed block ``ref`` that each destination needs, in out-block order,
    each destination's preceded by their CRC-32."""
    x = read_side_block(ref)
    local = np.frombuffer(read_verified(out.location, out.entry, TrainingError), dtype=_INT32)
    cuts = np.concatenate([[0], np.cumsum(out.counts)])
    with target.open(f"piece-{ref.block:05d}.bin") as w:
        # One destination's rows gathered at a time: a row many destinations need (a popular
        # item) is not copied for all of them at once.
        for d in range(len(out.counts)):
            part = memoryview(np.ascontiguousarray(x[local[cuts[d] : cuts[d + 1]]])).cast("B")
            w.write(np.uint32(crc32(part)).astype("<u4").tobytes())
            w.write(part)
    return Pieces(target.root / w.entry.path, x.shape[1] * x.itemsize)


@dataclass(frozen=True)
class CompactSpec:
    """What solve task ``d`` needs, besides the pieces, to assemble its compact fixed side: its
    in-block, and for each source block that has rows for it (in the order of the pieces it is
    given) where its rows start in that source's piece file (``before``: rows of the
    destinations before d) and how many there are (``n``). O(sources) per task."""

    d: int
    inblock: InBlock
    before: np.ndarray
    n: np.ndarray
    rank: int
    dtype: str


def compact_spec(
    d: int, inblock: InBlock, outblocks: list[OutBlock] | tuple[OutBlock, ...], rank: int, dtype
) -> tuple[CompactSpec, list[int]]:
    """Destination ``d``'s :class:`CompactSpec`, and the source blocks whose pieces it reads."""
    srcs = [s for s in range(len(outblocks)) if inblock.counts[s] > 0]
    before = np.array([int(outblocks[s].starts[d]) for s in srcs], dtype=np.int64)
    n = np.array([int(outblocks[s].counts[d]) for s in srcs], dtype=np.int64)
    return CompactSpec(d, inblock, before, n, rank, str(np.dtype(dtype))), srcs


def _read_piece_into(piece: Pieces, d: int, before: int, out: memoryview, what: str) -> None:
    """Destination ``d``'s rows of a piece file, read a chunk at a time into ``out`` (its
    bytes), checked against the CRC-32 stored before them. Each read is an exact byte range
    (on an object store, a ranged GET: no read-ahead past the rows asked for)."""
    loc = piece.location
    start = before * piece.row_bytes + 4 * d  # the rows before, and one CRC per destination
    fs, path = loc.fs, loc.path
    try:
        head = fs.cat_file(path, start=start, end=start + 4)
        crc = 0
        at = 0
        while at < len(out):
            lo = start + 4 + at
            chunk = fs.cat_file(path, start=lo, end=lo + min(READ_CHUNK, len(out) - at))
            if not chunk:
                break
            out[at : at + len(chunk)] = chunk
            crc = crc32(chunk, crc)
            at += len(chunk)
    except FileNotFoundError:
        raise TrainingError(f"{loc} is missing ({what})") from None
    if len(head) != 4 or at != len(out) or crc != int(np.frombuffer(head, "<u4")[0]):
        raise TrainingError(f"{loc} bytes {start}-{start + 4 + len(out)} are corrupt ({what})")


def compact_fixed(spec: CompactSpec, pieces: list[Pieces]) -> FixedSide:
    """Destination ``spec.d``'s compact fixed side, from this half-step's ``pieces`` of the
    source blocks that have rows for it (a solve task calls it)."""
    ib = spec.inblock
    rows = np.frombuffer(read_verified(ib.location, ib.entry, TrainingError), dtype=_INT64)
    width = spec.rank + 1
    x = _augmented(len(rows), width, spec.dtype)
    flat = memoryview(x).cast("B")
    row_bytes = width * x.itemsize
    at = 0
    for before, n, piece in zip(spec.before.tolist(), spec.n.tolist(), pieces, strict=True):
        if at + n > len(rows):
            break
        what = f"piece for destination {spec.d}"
        _read_piece_into(piece, spec.d, before, flat[at * row_bytes : (at + n) * row_bytes], what)
        at += n
    if at != len(rows):
        raise TrainingError(
            f"destination {spec.d} received {at} fixed rows, its routing says {len(rows)}"
        )
    return _fixed_in_place(x, rows)


def remove_quietly(loc: Location) -> None:
    with contextlib.suppress(Exception):
        loc.remove()
