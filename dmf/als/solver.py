"""Solve every row of a block exactly, given the other side; the block's share of the objective.

The model, the objective and the augmented normal equations each row solves are set out in
:mod:`dmf.als.equations`, which also holds a plain-NumPy solver written as they read.
:func:`solve_block` runs the compiled kernel :func:`dmf.als.kernels.solve` by default, or that
NumPy solver with ``native=False``; both accumulate in float64 whatever the storage dtype of the
factors, and rows with no ratings get zeros. Arrays in memory only: no Dask, Parquet or config.

The kernel solves one row after another with no Python in between: it gathers the row's
fixed-side rows a chunk of ratings at a time, accumulates the Gram matrix with BLAS (the full
``dgemm`` product on 64-rating chunks up to ``GEMM_MAX_K1`` = 96 unknowns, the symmetric
``dsyrk`` on 256-rating chunks above), and factors it with LAPACK's Cholesky; rows shorter than
the number of unknowns take the Woodbury form, an L x L system instead. Its working set is a few
hundred KiB whatever the row lengths, and each row's arithmetic is the same whichever block it
falls in, so results do not depend on the block layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmf.als.equations import predict as predict  # re-exported: callers import it from here
from dmf.als.equations import solve_rows_implicit_numpy, solve_rows_numpy
from dmf.store.blocks import RatingBlock


@dataclass
class BlockSolution:
    """New factors and biases of one block's rows, and the block's share of the objective.

    ``sse`` is the squared error of the block's ratings under the new solution (rounded to the
    storage dtype); ``penalty`` is the block's rows' regularisation term.
    """

    start: int
    rows: np.ndarray
    """(n_rows, rank + 1) in the storage dtype: each row's factors, then its bias (the layout of
    a side's block file, so a solution is held once and written as it is)."""
    sse: float
    penalty: float
    nnz: int

    @property
    def factors(self) -> np.ndarray:
        """(n_rows, rank), a view of :attr:`rows`."""
        return self.rows[:, :-1]

    @property
    def bias(self) -> np.ndarray:
        """(n_rows,), a view of :attr:`rows`."""
        return self.rows[:, -1]

    @property
    def n_rows(self) -> int:
        return len(self.rows)


def row_penalties(
    counts: np.ndarray, reg: float, reg_bias: float, weighted: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row L2 weights (factor, bias); under ALS-WR both are scaled by the row's count."""
    scale = counts.astype(np.float64) if weighted else np.ones(len(counts))
    return reg * scale, reg_bias * scale


def penalty_term(
    factors: np.ndarray,
    bias: np.ndarray,
    counts: np.ndarray,
    reg: float,
    reg_bias: float,
    weighted: bool,
) -> float:
    """lambda |U|^2 + lambda_b |b|^2 for one side (each row weighted by its count under ALS-WR)."""
    lam, lam_b = row_penalties(counts, reg, reg_bias, weighted)
    sq = np.zeros(len(bias))
    if factors.shape[1]:
        # Row by row in float64, a chunk of rows at a time: never a float64 copy of the side.
        for lo in range(0, len(sq), _PENALTY_CHUNK):
            f = np.ascontiguousarray(factors[lo : lo + _PENALTY_CHUNK], dtype=np.float64)
            sq[lo : lo + len(f)] = np.einsum("ij,ij->i", f, f)
    return float(lam @ sq + lam_b @ np.square(bias.astype(np.float64)))


_PENALTY_CHUNK = 1 << 14


@dataclass(frozen=True)
class Implicit:
    """The implicit-feedback settings of a solve (``model.feedback: implicit``): the confidence
    ``1 + alpha r`` (or ``1 + alpha log(1 + r / eps)``), whether biases are fitted, and the
    row solver (``cholesky``, exact, or ``cg`` with ``cg_steps`` steps)."""

    alpha: float = 1.0
    confidence: str = "linear"
    eps: float = 1.0
    biases: bool = False
    solver: str = "cholesky"
    cg_steps: int = 3

    def unknowns(self, rank: int) -> int:
        """Unknowns per row: the factors, and the bias when biases are fitted."""
        return rank + 1 if self.biases else rank


@dataclass(frozen=True)
class ImplicitGram:
    """What every row of an implicit half-step shares, from the whole fixed side (see
    :mod:`dmf.als.equations`): G0 = sum_j a_j a_j^T, r0 = sum_j t0_j a_j, T0 = sum_j t0_j^2,
    with a_j = [v_j, 1] (or v_j without biases) and t0_j = -c_j. (k, k) numbers: computed per
    fixed block on the workers, added up on the driver in block order (so the same bits
    whichever way the side travels), and sent with every solve task."""

    gram: np.ndarray
    rhs: np.ndarray
    tt: float

    def __add__(self, other: ImplicitGram) -> ImplicitGram:
        return ImplicitGram(self.gram + other.gram, self.rhs + other.rhs, self.tt + other.tt)


_GRAM_CHUNK = 1 << 14


def implicit_gram(rows: np.ndarray, biases: bool) -> ImplicitGram:
    """:class:`ImplicitGram` of one block of a side, ``rows`` (n, rank + 1) = [factors, bias]
    as stored; float64, a fixed chunk of rows at a time (the same sums wherever it runs)."""
    rank = rows.shape[1] - 1
    k = rank + 1 if biases else rank
    gram = np.zeros((k, k))
    rhs = np.zeros(k)
    tt = 0.0
    for lo in range(0, len(rows), _GRAM_CHUNK):
        chunk = rows[lo : lo + _GRAM_CHUNK].astype(np.float64)
        a = chunk[:, :k].copy()
        if biases:
            bias = chunk[:, rank].copy()
            a[:, rank] = 1.0
            rhs -= a.T @ bias
            tt += float(bias @ bias)
        gram += a.T @ a
    return ImplicitGram(gram, rhs, tt)


def sum_grams(parts: list[ImplicitGram]) -> ImplicitGram:
    """The blocks' :class:`ImplicitGram` added up in block order."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def augment(fixed_factors: np.ndarray) -> np.ndarray:
    """The rows [v_j, 1] of the fixed side plus one zero row, shape (n_other + 1, rank + 1).

    The solver gathers A from it in one contiguous pass; padding points at the zero row. Same
    dtype as ``fixed_factors`` (1.0 and 0.0 are exact in float32), so it costs what the factors
    cost; the trainer builds it once per half-iteration and broadcasts it.
    """
    n, rank = fixed_factors.shape
    aug = np.zeros((n + 1, rank + 1), dtype=fixed_factors.dtype)
    aug[:n, :rank] = fixed_factors
    aug[:n, rank] = 1.0
    return aug


def solve_block(
    block: RatingBlock,
    fixed_factors: np.ndarray,
    fixed_bias: np.ndarray,
    mu: float,
    reg: float,
    reg_bias: float,
    weighted_reg: bool = False,
    dtype: np.dtype | str = np.float32,
    fixed_aug: np.ndarray | None = None,
    native: bool = True,
    implicit: Implicit | None = None,
    gram: ImplicitGram | None = None,
    previous: np.ndarray | None = None,
) -> BlockSolution:
    """Solve the augmented normal equations of every row of ``block``.

    Parameters
    ----------
    block
        The rows to solve and their ratings; ``block.cols`` index rows of ``fixed_factors``.
    fixed_factors, fixed_bias
        The other side, shapes (n_other, rank) and (n_other,), any float dtype.
    mu
        Global mean of the train ratings.
    reg, reg_bias, weighted_reg
        L2 weights of factors and biases; ALS-WR scales both by each row's rating count.
    dtype
        Storage dtype of the returned factors (float32 or float64). The objective share is
        computed with the rounded values, so the recorded objective is that of the stored model.
    fixed_aug
        ``augment(fixed_factors)``, if already at hand (the trainer broadcasts it).
    native
        Solve with the compiled kernel (the default); False solves row by row with the
        plain-NumPy :func:`dmf.als.equations.solve_rows_numpy`, the readable reference path,
        which is far slower and agrees to about 1e-10.
    implicit, gram, previous
        Implicit feedback: its settings, the fixed side's :class:`ImplicitGram` (computed from
        ``fixed_factors`` when not given), and under ``solver: cg`` the block's rows before
        this half-step ((n_rows, rank + 1); None: zeros), where conjugate gradients start. The
        block's values are the summed events; ``mu`` must be 0; ``sse`` is then the rows' share
        of the weighted loss over every cell, sum c (p - x.a)^2.

    Returns
    -------
    BlockSolution with factors of shape (block.n_rows, rank).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"factor dtype must be float32 or float64, not {dtype}")
    rank = fixed_factors.shape[1]
    aug = augment(fixed_factors) if fixed_aug is None else fixed_aug
    n_other = len(aug) - 1
    if aug.ndim != 2 or aug.shape[1] != rank + 1 or len(fixed_bias) != n_other:
        raise ValueError(
            f"fixed side mismatch: augmented factors {aug.shape}, biases {len(fixed_bias)}, "
            f"rank {rank}"
        )
    if block.nnz and (int(block.cols.min()) < 0 or int(block.cols.max()) >= n_other):
        # The compiled kernel does not check bounds: refuse here, naming the block.
        raise ValueError(
            f"{block.side} block [{block.start}, {block.stop}) refers to column "
            f"{int(block.cols.max())}, but the other side has {n_other} rows"
        )
    counts = block.counts
    lam, lam_b = row_penalties(counts, reg, reg_bias, weighted_reg)
    if implicit is not None:
        x_all, row_sse = _solve_implicit(
            block, fixed_bias, aug, implicit, gram, previous, lam, lam_b, dtype, native
        )
    elif native:
        x_all, row_sse = _solve_native(block, mu, fixed_bias, aug, lam, lam_b, reg, reg_bias, dtype)
    else:
        x_all, row_sse = solve_rows_numpy(
            block.indptr, block.cols, block.vals, mu, fixed_factors, fixed_bias, lam, lam_b, dtype
        )
    sse = float(row_sse.sum())
    if not (np.isfinite(sse) and np.all(np.isfinite(x_all))):
        from dmf.errors import TrainingError

        raise TrainingError(
            f"non-finite solution in {block.side} block [{block.start}, {block.stop}): "
            "check the ratings for huge values, or raise reg"
        )
    rows = x_all.astype(dtype, copy=False)  # [factors, bias] rounded to the storage dtype
    del x_all
    penalty = penalty_term(rows[:, :rank], rows[:, rank], counts, reg, reg_bias, weighted_reg)
    return BlockSolution(block.start, rows, sse, penalty, block.nnz)


def _solve_implicit(block, fixed_bias, aug, imp, gram, previous, lam, lam_b, dtype, native):
    """The implicit kernel (or the NumPy path) on every row; rows whose Cholesky factorisation
    fails go to the pseudo-inverse. Returns (x (n, rank + 1) float64, loss (n,))."""
    from dmf.als.kernels import solve_implicit

    rank = aug.shape[1] - 1
    k = imp.unknowns(rank)
    if gram is None:
        gram = implicit_gram(np.hstack([aug[:-1, :rank], fixed_bias[:, None]]), imp.biases)
    x_all = np.zeros((block.n_rows, rank + 1))
    args = (gram.gram, gram.rhs, gram.tt, k, imp.alpha, imp.confidence, imp.eps)
    if native:
        prev = None if previous is None else previous[:, :k]
        x, loss, status = solve_implicit(
            block.indptr, block.cols, block.vals, fixed_bias, aug, k, gram, imp, lam, lam_b,
            prev, dtype == np.float32,
        )  # fmt: skip
        for r in np.flatnonzero(status):
            lo, hi = int(block.indptr[r]), int(block.indptr[r + 1])
            xr, lr = solve_rows_implicit_numpy(
                np.array([0, hi - lo]), block.cols[lo:hi], block.vals[lo:hi], aug, fixed_bias,
                *args, lam[r : r + 1], lam_b[r : r + 1], dtype,
            )  # fmt: skip
            x[r], loss[r] = xr[0], lr[0]
    else:
        x, loss = solve_rows_implicit_numpy(
            block.indptr, block.cols, block.vals, aug, fixed_bias, *args, lam, lam_b, dtype
        )
    x_all[:, :k] = x
    return x_all, loss


def _solve_native(block, mu, fixed_bias, aug, lam, lam_b, reg, reg_bias, dtype):
    """The compiled kernel on every row, then the rows it leaves (status 1) by pseudo-inverse.
    Returns (x (n, rank + 1) float64, squared error (n,) float64)."""
    from dmf.als.kernels import solve

    x_all, row_sse, status = solve(
        block.indptr,
        block.cols,
        block.vals,
        mu,
        fixed_bias,
        aug,
        lam,
        lam_b,
        # The short-row form divides by the penalties: only when all are positive.
        reg > 0 and reg_bias > 0,
        dtype == np.float32,
    )
    for r in np.flatnonzero(status):
        # Singular normal equations (reg or reg_bias 0 and too few ratings): minimum norm.
        x_all[r], row_sse[r] = _solve_singular_row(
            block, int(r), mu, fixed_bias, aug, lam[r], lam_b[r], dtype
        )
    return x_all, row_sse


def _solve_singular_row(block, r, mu, fixed_bias, aug, lam, lam_b, dtype):
    """One row whose penalised Gram matrix is not positive definite: the minimum-norm
    least-squares solution by pseudo-inverse (NaN if the inputs are not finite)."""
    k1 = aug.shape[1]
    lo, hi = int(block.indptr[r]), int(block.indptr[r + 1])
    cols = block.cols[lo:hi]
    a_mat = aug[cols].astype(np.float64)
    t = block.vals[lo:hi].astype(np.float64) - mu - fixed_bias[cols].astype(np.float64)
    gram = a_mat.T @ a_mat
    gram[np.arange(k1 - 1), np.arange(k1 - 1)] += lam
    gram[k1 - 1, k1 - 1] += lam_b
    if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(t))):
        return np.full(k1, np.nan), np.nan
    x = np.linalg.pinv(gram, hermitian=True) @ (a_mat.T @ t)
    x = x.astype(dtype).astype(np.float64)
    resid = t - a_mat @ x
    return x, float(resid @ resid)
