"""The two sides of a model in training, as files: no process holds a whole side.

A version of a side (its factors and biases after one half-step) is a set of block files, one per
block of the store's boundaries, written by the task that solved the block::

    <model>/work/<side>/h<iteration>-<token>/block=NNNNN.<token>.npy    (n_b, rank + 1): [u_i, b_i]

:class:`SideBlocks` is what the driver holds of a version: the boundaries, each file's entry
(size and CRC-32, as :mod:`dmf.store.storage` writes them) and the side's penalty term: metadata
and scalars. A worker's death loses nothing that is done: the files stay, and a rerun task writes
the same bytes. A checkpoint is a manifest naming two versions (:mod:`dmf.train.checkpoint`).

The first item factors come from a counter-based generator (splitmix64 of the row and column,
then Box-Muller), so each block is drawn on its own, by its task, and the values depend on nothing
but ``model.seed``: the same whatever the number of blocks, workers or tasks.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from dmf.als.solver import penalty_term
from dmf.config import ModelConfig
from dmf.data.hashing import mix64_int, splitmix64
from dmf.errors import TrainingError
from dmf.model.model import write_factor_part
from dmf.store.layout import BlockRef, read_block_file
from dmf.store.storage import (
    FileEntry,
    Location,
    Target,
    read_table,
    read_verified,
    verify_file,
)

# Streams of the initial factors' generator (splitmix64 keys, mixed with model.seed).
_STREAM_U1, _STREAM_U2 = 0x1D3A, 0x2E4B


def block_name(b: int) -> str:
    return f"block={b:05d}.npy"


@dataclass(frozen=True)
class SideBlockRef:
    """One block file of a side version: all a task needs to read it."""

    side: str
    block: int
    start: int
    stop: int
    location: Location
    entry: FileEntry


@dataclass(frozen=True)
class SideBlocks:
    """One version of one side, as block files (see the module docstring).

    Attributes
    ----------
    side : 'user' or 'item'
    bounds : block boundaries: block b holds rows [bounds[b], bounds[b + 1])
    rank : length of the factor vectors
    dtype : storage dtype of the factors ('float32' or 'float64')
    root : the version's directory
    files : one entry per block (its ``path`` relative to ``root``)
    penalty : this side's term of the objective, lambda |U|^2 + lambda_b |b|^2 (ALS-WR weighted)
    """

    side: str
    bounds: tuple[int, ...]
    rank: int
    dtype: str
    root: Location
    files: tuple[FileEntry, ...]
    penalty: float

    def __post_init__(self) -> None:
        if len(self.files) != len(self.bounds) - 1:
            raise ValueError(
                f"{self.side} side: {len(self.files)} block files for {len(self.bounds) - 1} blocks"
            )

    @property
    def n_blocks(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_rows(self) -> int:
        return self.bounds[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole side in memory ([factors, bias] in the storage dtype)."""
        return self.n_rows * (self.rank + 1) * np.dtype(self.dtype).itemsize

    def ref(self, b: int) -> SideBlockRef:
        entry = self.files[b]
        return SideBlockRef(
            self.side, b, self.bounds[b], self.bounds[b + 1], self.root / entry.path, entry
        )

    def refs(self) -> list[SideBlockRef]:
        return [self.ref(b) for b in range(self.n_blocks)]

    def to_json(self, base: Location) -> dict[str, Any]:
        """The version as a checkpoint records it (``root`` relative to ``base``)."""
        return {
            "side": self.side,
            "bounds": list(self.bounds),
            "rank": self.rank,
            "dtype": self.dtype,
            "root": self.root.relative_to(base),
            "files": [f.model_dump(exclude_none=True) for f in self.files],
            "penalty": self.penalty,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], base: Location) -> SideBlocks:
        return cls(
            side=doc["side"],
            bounds=tuple(int(x) for x in doc["bounds"]),
            rank=int(doc["rank"]),
            dtype=doc["dtype"],
            root=base / doc["root"],
            files=tuple(FileEntry.model_validate(f) for f in doc["files"]),
            penalty=float(doc["penalty"]),
        )


# ---------------------------------------------------------------------------------------------
# Block files
# ---------------------------------------------------------------------------------------------
def write_side_block(target: Target, b: int, factors: np.ndarray, bias: np.ndarray) -> FileEntry:
    """Write block ``b`` of a side version: one (n_b, rank + 1) array [factors, bias]."""
    x = np.empty((len(bias), factors.shape[1] + 1), dtype=factors.dtype)
    x[:, :-1] = factors
    x[:, -1] = bias
    return write_side_rows(target, b, x)


def write_side_rows(target: Target, b: int, x: np.ndarray) -> FileEntry:
    """Write block ``b`` of a side version from its (n_b, rank + 1) rows [factors, bias], as an
    ``.npy`` file streamed in chunks (no copy of the block in memory)."""
    with target.open(block_name(b)) as w:
        np.lib.format.write_array(w, np.ascontiguousarray(x), allow_pickle=False)
    return w.entry


def read_side_block(ref: SideBlockRef) -> np.ndarray:
    """Block ``ref`` of a side version, (n_b, rank + 1) [factors, bias], its checksum verified.

    The array is a read-only view of the file's bytes (read once, not copied again)."""
    raw = read_verified(ref.location, ref.entry, TrainingError)
    try:
        f = io.BytesIO(raw)
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        x = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=f.tell())
        x = x.reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:
        raise TrainingError(f"{ref.location}: not a side block file: {exc}") from exc
    if x.ndim != 2 or len(x) != ref.stop - ref.start:
        raise TrainingError(
            f"{ref.location}: {x.shape} is not the ({ref.stop - ref.start}, rank + 1) array of "
            f"{ref.side} block {ref.block}"
        )
    return x


def read_side(side: SideBlocks) -> tuple[np.ndarray, np.ndarray]:
    """The whole side in memory: factors (n, rank) and biases (n,). For sides that fit."""
    x = np.empty((side.n_rows, side.rank + 1), dtype=side.dtype)
    for b in range(side.n_blocks):
        x[side.bounds[b] : side.bounds[b + 1]] = read_side_block(side.ref(b))
    return x[:, :-1], x[:, -1]


# ---------------------------------------------------------------------------------------------
# The starting point
# ---------------------------------------------------------------------------------------------
def initial_factors(start: int, stop: int, m: ModelConfig) -> np.ndarray:
    """Initial item factors of rows [start, stop): N(0, init_scale^2 / rank), float64, (n, rank).

    Element (j, a) is a function of (seed, j, a) alone: splitmix64 of the counter j * rank + a
    under two seed-derived keys gives two uniforms, and Box-Muller one normal."""
    rank = m.rank
    n = stop - start
    if rank == 0 or n == 0:
        return np.zeros((n, rank))
    counter = (
        np.arange(start, stop, dtype=np.uint64)[:, None] * np.uint64(rank)
        + np.arange(rank, dtype=np.uint64)[None, :]
    )
    u1 = _unit_open(splitmix64(counter, mix64_int(m.seed * 0x10001 + _STREAM_U1)))
    u2 = _unit_open(splitmix64(counter, mix64_int(m.seed * 0x10001 + _STREAM_U2)))
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return z * (m.init_scale / math.sqrt(rank))


def _unit_open(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniform on the open interval (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)


def init_item_block_task(ref: BlockRef, m: ModelConfig, target: Target) -> tuple[FileEntry, float]:
    """Write block ``ref.block`` of the initial item side: drawn factors (zero for items without
    train ratings, which keep them), zero biases. Returns the file's entry and the block's
    penalty term."""
    block = read_block_file(ref)
    dtype = np.dtype(m.dtype)
    v = initial_factors(ref.start, ref.stop, m)
    v[block.counts == 0] = 0.0
    v = v.astype(dtype)
    bias = np.zeros(block.n_rows, dtype=dtype)
    penalty = penalty_term(v, bias, block.counts, m.reg, m.effective_reg_bias, m.weighted_reg)
    return write_side_block(target, ref.block, v, bias), penalty


def check_side_file(ref: SideBlockRef) -> str | None:
    """What is wrong with one block file of a side version (a task: resuming checks every file
    a checkpoint names), or None."""
    try:
        verify_file(ref.location, ref.entry, TrainingError)
    except TrainingError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Exported:
    """A factor file written by :func:`export_block_task`, and what lookups need of its ids."""

    entry: FileEntry
    first_id: Any  # the block's first and last raw ids (None for an empty block)
    last_id: Any
    ids_sorted: bool


def export_block_task(
    ref: SideBlockRef, ids: tuple[Location, FileEntry], target: Target
) -> Exported:
    """Write block ``ref.block`` of a side as the model's factor file of that block: raw ids
    (from the store's id map of the block), biases, factors."""
    x = read_side_block(ref)
    raw = read_table(*ids, columns=["id"]).column("id").combine_chunks()
    entry = write_factor_part(target, ref.side, ref.block, raw, x[:, :-1], x[:, -1])
    if len(raw) == 0:
        return Exported(entry, None, None, True)
    ordered = len(raw) < 2 or pc.all(pc.less(raw.slice(0, len(raw) - 1), raw.slice(1))).as_py()
    return Exported(entry, raw[0].as_py(), raw[len(raw) - 1].as_py(), bool(ordered))


def first_ids(exported: list[Exported]) -> list | None:
    """Each block's first raw id, when the ids are sorted across the whole side (what a model
    needs to find an id's block without reading every block); None otherwise."""
    blocks = [e for e in exported if e.first_id is not None]
    if not all(e.ids_sorted for e in exported):
        return None
    if any(a.last_id >= b.first_id for a, b in zip(blocks, blocks[1:], strict=False)):
        return None
    if len(blocks) != len(exported):
        return None  # an empty block has no first id to place it by
    return [e.first_id for e in exported]


def zero_block_task(ref: BlockRef, m: ModelConfig, target: Target) -> FileEntry:
    """Write block ``ref.block`` of a side at zero (the users of a run of no iterations)."""
    n = ref.stop - ref.start
    dtype = np.dtype(m.dtype)
    return write_side_block(target, ref.block, np.zeros((n, m.rank), dtype), np.zeros(n, dtype))
