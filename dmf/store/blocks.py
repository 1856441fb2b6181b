"""Rating blocks: the unit of work of a half-iteration.

A block holds the train ratings of a contiguous range of row indices ``[start, stop)`` of one side
(users, or items), in compressed sparse row form::

    side="user", start=10, stop=13, ratings (user, item, r):
        (10, 4, 5.0), (10, 7, 3.0), (12, 4, 1.0)
    ->  indptr = [0, 2, 2, 3]      # row 11 has no ratings
        cols   = [4, 7, 4]         # indices on the other side
        vals   = [5.0, 3.0, 1.0]

Rows within a block and columns within a row are sorted. The constructor checks these invariants
so a malformed block fails where it is read, not as a wrong answer later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDES = ("user", "item")


def other_side(side: str) -> str:
    return "item" if side == "user" else "user"


@dataclass(frozen=True)
class RatingBlock:
    side: str
    start: int
    stop: int
    indptr: np.ndarray  # int64, shape (stop - start + 1,)
    cols: np.ndarray  # int32, shape (nnz,)
    vals: np.ndarray  # float32 or float64, shape (nnz,)

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be 'user' or 'item', not {self.side!r}")
        n = self.stop - self.start
        if n < 0:
            raise ValueError(f"block range [{self.start}, {self.stop}) is reversed")
        if self.indptr.shape != (n + 1,):
            raise ValueError(f"indptr has shape {self.indptr.shape}, expected ({n + 1},)")
        if self.indptr[0] != 0 or self.indptr[-1] != len(self.cols):
            raise ValueError("indptr must start at 0 and end at nnz")
        if len(self.cols) != len(self.vals):
            raise ValueError("cols and vals differ in length")
        if n and np.any(np.diff(self.indptr) < 0):
            raise ValueError("indptr must be non-decreasing")

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    @property
    def nnz(self) -> int:
        return int(len(self.cols))

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.cols.nbytes + self.vals.nbytes)

    @classmethod
    def from_coo(
        cls,
        side: str,
        start: int,
        stop: int,
        rows: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
        assume_sorted: bool = False,
    ) -> RatingBlock:
        """Build a block from global row indices (all in ``[start, stop)``), sorting if needed."""
        rows = np.asarray(rows)
        if len(rows) and (rows.min() < start or rows.max() >= stop):
            raise ValueError(
                f"{side} block [{start}, {stop}) holds row indices {rows.min()}..{rows.max()}"
            )
        local = (rows - start).astype(np.int64, copy=False)
        cols = np.asarray(cols, dtype=np.int32)
        vals = np.asarray(vals)
        if not assume_sorted:
            order = np.lexsort((cols, local))
            local, cols, vals = local[order], cols[order], vals[order]
        elif len(local) > 1 and np.any(np.diff(local) < 0):
            raise ValueError(f"{side} block [{start}, {stop}) is not sorted by {side}")
        indptr = np.zeros(stop - start + 1, dtype=np.int64)
        np.cumsum(np.bincount(local, minlength=stop - start), out=indptr[1:])
        return cls(side, start, stop, indptr, cols, vals)
