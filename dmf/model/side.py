"""One side of a model (its users, or its items): raw ids, factors and biases, in memory or as
the block files of a model directory, read block by block on demand.

A model trained by dmf writes each side as one factor file per block of the store
(``user_factors/part-NNNNN.TOKEN.parquet``: raw id, bias, factors). :class:`ModelSide` reads them
whole when the side is small (:attr:`ModelSide.in_memory`), and otherwise only the blocks an
operation needs: the tasks of recommend, evaluate and predict read their block's file on the
worker, and a single call on the driver reads the blocks of the ids it is given. So a model whose
user side does not fit in one process still predicts and recommends.

Raw ids are in dense-index order, and ingest gives dense indices in the order of the raw ids, so
each block holds a range of ids: the first id of every block (in ``model.json``) tells which
block an id can be in. A side whose ids are not sorted that way (a store built from arrays with
ids of the caller's choosing) is looked up whole, in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmf.errors import ModelError
from dmf.model.ids import IdIndex, as_id_array
from dmf.store.storage import FileEntry, Location, read_table

# A side larger than this is not loaded whole by Model.load (the driver reads blocks on demand).
IN_MEMORY_BYTES = 1 << 30
# Blocks of an on-disk side kept in the driver's memory for single calls.
CACHED_BLOCKS = 4


def factor_part_rel(side: str, b: int) -> str:
    """The logical name of the factor file of block ``b`` of ``side`` in a model directory."""
    return f"{side}_factors/part-{b:05d}.parquet"


def factor_table(ids: pa.Array, factors: np.ndarray, bias: np.ndarray) -> pa.Table:
    """A factor file's table: raw id, bias, factors (a list of rank numbers a row)."""
    # A list column (not fixed-size: Arrow has no fixed-size list of 0 for rank-0 models).
    n, rank = factors.shape
    flat = pa.array(np.ascontiguousarray(factors).reshape(-1))
    # int64 offsets: n * rank passes 2^31 for large models (40M users at rank 64).
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * rank)
    return pa.table(
        {"id": ids, "bias": pa.array(bias), "factors": pa.LargeListArray.from_arrays(offsets, flat)}
    )


@dataclass(frozen=True)
class PartRef:
    """One factor file of a model: all a task needs to read it."""

    location: Location
    entry: FileEntry
    rank: int


@dataclass
class Part:
    """One block's raw ids, factors (n, rank) and biases (n,), with an id lookup built on first
    use (a worker keeps it while the block is cached)."""

    ids: pa.Array
    factors: np.ndarray
    bias: np.ndarray
    _index: IdIndex | None = None

    def index_of(self, values: pa.Array) -> np.ndarray:
        if self._index is None:
            self._index = IdIndex(self.ids)
        return self._index.index_of(values)


def read_part(ref: PartRef) -> Part:
    """A factor file, checked against its manifest entry (runs on workers and the driver)."""
    t = read_table(ref.location, ref.entry, error=ModelError)
    try:
        flat = t.column("factors").combine_chunks().flatten().to_numpy()
        factors = flat.reshape(len(t), ref.rank)
        return Part(t.column("id").combine_chunks(), factors, t.column("bias").to_numpy())
    except (KeyError, ValueError, pa.ArrowException) as exc:
        raise ModelError(
            f"model file {ref.location} does not hold factors of rank {ref.rank}: {exc}"
        ) from exc


class ModelSide:
    """Raw ids, factors (n, rank) and biases (n,) of one side; see the module docstring.

    Build one with :meth:`from_arrays` (in memory) or :meth:`from_files` (a model directory's
    factor files)."""

    def __init__(self, name: str, n_rows: int, rank: int, dtype: str):
        self.name = name
        self.n_rows = n_rows
        self.rank = rank
        self.dtype = dtype
        self._ids: pa.Array | None = None
        self._factors: np.ndarray | None = None
        self._bias: np.ndarray | None = None
        self._index: IdIndex | None = None
        self.bounds: np.ndarray | None = None
        self.parts: list[PartRef] = []
        self.first_ids: pa.Array | None = None  # first raw id of each block, when sorted
        self._cache: OrderedDict[int, Part] = OrderedDict()

    @classmethod
    def from_arrays(
        cls, name: str, ids: pa.Array, factors: np.ndarray, bias: np.ndarray
    ) -> ModelSide:
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        side = cls(name, len(bias), int(factors.shape[1]), str(factors.dtype))
        if len(ids) != len(bias) or len(factors) != len(bias):
            raise ModelError(
                f"{name} side: {len(ids)} ids, {len(factors)} factor rows, {len(bias)} biases"
            )
        side._ids, side._factors, side._bias = ids, factors, bias
        return side

    @classmethod
    def from_files(
        cls,
        name: str,
        root: Location,
        files: dict[str, FileEntry],
        bounds: list[int],
        rank: int,
        dtype: str,
        first_ids: list | None,
    ) -> ModelSide:
        side = cls(name, int(bounds[-1]), rank, dtype)
        side.bounds = np.asarray(bounds, dtype=np.int64)
        for b in range(len(bounds) - 1):
            rel = factor_part_rel(name, b)
            if rel not in files:
                raise ModelError(f"{root}/model.json lists no {rel}")
            side.parts.append(PartRef(root / (files[rel].path or rel), files[rel], rank))
        if first_ids is not None:
            side.first_ids = pa.array(first_ids)
        return side

    # -- what it holds ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_rows

    @property
    def in_memory(self) -> bool:
        return self._factors is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the factors and biases in memory (ids not counted)."""
        return self.n_rows * (self.rank + 1) * np.dtype(self.dtype).itemsize

    @property
    def n_blocks(self) -> int:
        return len(self.parts) if self.parts else 1

    def load(self, limit: int | None = None) -> ModelSide:
        """Read every block into memory (refused, naming the size, above ``limit`` bytes)."""
        if self.in_memory:
            return self
        if limit is not None and self.nbytes > limit:
            raise ModelError(
                f"the {self.name} side of this model is {self.nbytes / 2**30:.1f} GiB, more than "
                f"{limit / 2**30:.1f} GiB in one process: use the blockwise operations (evaluate, "
                "recommend for every user, predict with a client), which read one block at a time"
            )
        parts = [read_part(ref) for ref in self.parts]
        self._ids = pa.concat_arrays([p.ids for p in parts]) if parts else pa.array([])
        self._factors = (
            np.concatenate([p.factors for p in parts])
            if parts
            else np.zeros((0, self.rank), self.dtype)
        )
        self._bias = np.concatenate([p.bias for p in parts]) if parts else np.zeros(0, self.dtype)
        self._cache.clear()
        return self

    @property
    def ids(self) -> pa.Array:
        return self._all_ids()

    @property
    def factors(self) -> np.ndarray:
        return self.load()._factors

    @property
    def bias(self) -> np.ndarray:
        return self.load()._bias

    @property
    def id_type(self) -> pa.DataType:
        if self._ids is not None:
            return self._ids.type
        if self.first_ids is not None:
            return self.first_ids.type
        return self._all_ids().type

    def block_of(self, indices: np.ndarray) -> np.ndarray:
        """The block of each dense index (0 for an in-memory side)."""
        if self.bounds is None:
            return np.zeros(len(indices), dtype=np.int64)
        return np.searchsorted(self.bounds, indices, side="right") - 1

    def part(self, b: int) -> Part:
        """Block ``b`` of an on-disk side, read (and kept among the last few) on demand."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        p = read_part(self.parts[b])
        self._cache[b] = p
        while len(self._cache) > CACHED_BLOCKS:
            self._cache.popitem(last=False)
        return p

    # -- raw ids -------------------------------------------------------------------------------
    def index_of(self, values: Any) -> np.ndarray:
        """Dense indices of raw ``values``, shape (m,), int64; -1 where unknown. On disk with
        sorted ids: only the blocks the values can be in are read."""
        arr = as_id_array(values, self.id_type, self.name)
        if self.in_memory or self.first_ids is None:
            if self._index is None:
                self._index = IdIndex(self._all_ids())
            return self._index.index_of(arr)
        out = np.full(len(arr), -1, dtype=np.int64)
        blk = self._candidate_blocks(arr)
        for b in np.unique(blk[blk >= 0]).tolist():
            sel = np.flatnonzero(blk == b)
            local = self.part(b).index_of(arr.take(pa.array(sel)))
            hit = local >= 0
            out[sel[hit]] = local[hit] + int(self.bounds[b])
        return out

    def _all_ids(self) -> pa.Array:
        """Every raw id of the side, in index order: from memory, or the id columns of its
        block files (the factors stay on disk)."""
        if self._ids is not None:
            return self._ids
        cols = [
            read_table(ref.location, ref.entry, columns=["id"], error=ModelError)
            .column("id")
            .combine_chunks()
            for ref in self.parts
        ]
        self._ids = pa.concat_arrays(cols) if cols else pa.array([], type=self.id_type)
        return self._ids

    def _candidate_blocks(self, arr: pa.Array) -> np.ndarray:
        """The one block each value can be in (-1: before the first id, or null)."""
        # Sorted first ids: the block is the last whose first id is <= the value.
        order = pc.sort_indices(pa.chunked_array([self.first_ids, arr]).combine_chunks())
        n_first = len(self.first_ids)
        pos = order.to_numpy().astype(np.int64)
        is_first = pos < n_first
        # Walking the merged order, a value belongs to the last first id seen before it. Ties
        # put first ids before values (they come first in the concatenation and the sort is
        # stable), so a value equal to a first id lands in that id's block.
        last_first = np.maximum.accumulate(np.where(is_first, pos, -1))
        blk = np.full(len(arr), -1, dtype=np.int64)
        vals = ~is_first
        blk[pos[vals] - n_first] = last_first[vals]
        nulls = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        blk[nulls] = -1
        return blk

    def take_ids(self, indices: np.ndarray) -> pa.Array:
        """Raw ids of dense ``indices`` (all valid)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._ids is not None or not self.parts:
            return self._all_ids().take(pa.array(indices))
        return self._gather(indices, lambda p, local: p.ids.take(pa.array(local)), concat=True)

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Factors (m, rank) and biases (m,) of dense ``indices`` (all valid)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.in_memory or not self.parts:
            return self.factors[indices], self.bias[indices]
        f = np.empty((len(indices), self.rank), dtype=self.dtype)
        c = np.empty(len(indices), dtype=self.dtype)
        blk = self.block_of(indices)
        for b in np.unique(blk).tolist():
            sel = np.flatnonzero(blk == b)
            p = self.part(b)
            local = indices[sel] - int(self.bounds[b])
            f[sel], c[sel] = p.factors[local], p.bias[local]
        return f, c

    def _gather(self, indices, pick, concat: bool):
        blk = self.block_of(indices)
        pieces, where = [], []
        for b in np.unique(blk).tolist():
            sel = np.flatnonzero(blk == b)
            pieces.append(pick(self.part(b), indices[sel] - int(self.bounds[b])))
            where.append(sel)
        if not pieces:
            return pa.array([], type=self.id_type)
        order = np.argsort(np.concatenate(where), kind="stable")
        return pa.concat_arrays(pieces).take(pa.array(order))

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else f"{self.n_blocks} block files"
        return f"ModelSide({self.name!r}, rows={self.n_rows:,}, rank={self.rank}, {where})"
