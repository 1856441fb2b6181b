"""The ALS mathematics: solve every row of a block exactly, given the other side.

For a row i (a user, or an item when the roles are swapped) with train ratings r_ij on columns j,
the other side fixed (factors V, biases c), the unknowns are x_i = [u_i; b_i] (rank + 1 numbers)
and the part of the objective J that depends on them is

    sum_j (r_ij - mu - c_j - [v_j; 1] . x_i)^2 + lam_i |u_i|^2 + lam_b_i b_i^2

with lam_i = reg, lam_b_i = reg_bias, both multiplied by n_i (the row's rating count) under ALS-WR.
Setting the gradient to zero gives the augmented normal equations

    (A_i^T A_i + diag(lam_i, ..., lam_i, lam_b_i)) x_i = A_i^T t_i

where A_i stacks the rows [v_j, 1] and t_i = r_ij - mu - c_j. Their solution is the exact
minimiser of J over (u_i, b_i), so J never increases from one half-iteration to the next.

Rows with no ratings get x_i = 0. Everything here is plain NumPy on arrays: no Dask, Parquet or
config. The normal equations are accumulated in float64 whatever the storage dtype of the factors.

Speed: rows are sorted by rating count and solved in sub-batches of similar length, padded to a
common length L, so that the Gram matrices of a whole sub-batch are one batched BLAS ``matmul``
(shape (n, k+1, L) @ (n, L, k+1)) and the solves one batched LAPACK call. The loop runs per
sub-batch, never per row or per rating; ``sub_batch_bytes`` bounds the working set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmf.blocks import RatingBlock

# Rows in one sub-batch have lengths within this ratio (or within _PAD_SLACK ratings) of each
# other, so padding wastes at most ~25% of the arithmetic.
_PAD_RATIO = 1.25
_PAD_SLACK = 8


@dataclass
class BlockSolution:
    """New factors and biases of one block's rows, and the block's share of the objective.

    ``sse`` is the squared error of the block's ratings under the new solution (rounded to the
    storage dtype); ``penalty`` is the block's rows' regularisation term.
    """

    start: int
    factors: np.ndarray  # (n_rows, rank), storage dtype
    bias: np.ndarray  # (n_rows,), storage dtype
    sse: float
    penalty: float
    nnz: int

    @property
    def n_rows(self) -> int:
        return len(self.bias)


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
    f = factors.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", f, f) if f.shape[1] else np.zeros(len(bias))
    return float(lam @ sq + lam_b @ np.square(bias.astype(np.float64)))


def _plan_sub_batches(sorted_counts: np.ndarray, row_bytes_per_rating: int, max_bytes: int):
    """Split rows sorted by count into (begin, end, L) ranges of similar length and bounded size."""
    n = len(sorted_counts)
    a = int(np.searchsorted(sorted_counts, 1))  # skip rows with no ratings
    while a < n:
        lo = int(sorted_counts[a])
        cap = max(int(np.ceil(lo * _PAD_RATIO)), lo + _PAD_SLACK)
        b = int(np.searchsorted(sorted_counts, cap, side="right"))
        length = int(sorted_counts[b - 1])
        max_rows = max(1, max_bytes // max(1, length * row_bytes_per_rating))
        b = min(b, a + max_rows)
        yield a, b, int(sorted_counts[b - 1])
        a = b


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
    sub_batch_bytes: int = 64 * 2**20,
    fixed_aug: np.ndarray | None = None,
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
        Storage dtype of the returned factors. The objective share is computed with the rounded
        values, so the recorded objective is that of the stored model.
    sub_batch_bytes
        Bound on the float64 working set of one sub-batch.
    fixed_aug
        ``augment(fixed_factors)``, if already at hand (the trainer broadcasts it).

    Returns
    -------
    BlockSolution with factors of shape (block.n_rows, rank).
    """
    dtype = np.dtype(dtype)
    rank = fixed_factors.shape[1]
    k1 = rank + 1
    n = block.n_rows
    aug = augment(fixed_factors) if fixed_aug is None else fixed_aug
    pad = len(aug) - 1
    counts = block.counts
    lam, lam_b = row_penalties(counts, reg, reg_bias, weighted_reg)

    x_all = np.zeros((n, k1), dtype=np.float64)
    sse = 0.0
    if block.nnz:
        # Targets t_ij = r_ij - mu - c_j, in float64.
        target = block.vals.astype(np.float64) - mu - fixed_bias[block.cols].astype(np.float64)
        order = np.argsort(counts, kind="stable")
        sorted_counts = counts[order]
        row_bytes = k1 * 8 * 2  # A (float64) plus its gather temporary
        # The short-row form needs every penalty positive (it divides by them).
        woodbury_ok = reg > 0 and reg_bias > 0
        for a, b, length in _plan_sub_batches(sorted_counts, row_bytes, sub_batch_bytes):
            rows = order[a:b]
            if length * row_bytes > sub_batch_bytes:
                # A very long row (a popular item): accumulate its Gram over segments.
                for r in rows:
                    x_all[r], s = _solve_long_row(
                        block,
                        int(r),
                        target,
                        aug,
                        lam[r],
                        lam_b[r],
                        sub_batch_bytes // row_bytes,
                        dtype,
                    )
                    sse += s
                continue
            cnt = counts[rows]
            offs = np.arange(length)
            mask = offs[None, :] < cnt[:, None]  # (m, L)
            pos = np.where(mask, block.indptr[rows][:, None] + offs[None, :], 0)
            # A: the rows [v_j, 1] of every rating, zero on padding, float64: one contiguous
            # gather-and-cast from the augmented matrix, padding pointing at its zero row.
            a_mat = np.empty((len(rows), length, k1), dtype=np.float64)
            a_mat[...] = aug[np.where(mask, block.cols[pos], pad)]
            t = np.where(mask, target[pos], 0.0)
            if length < k1 and woodbury_ok:
                x, row_sse = _solve_short_rows(a_mat, t, lam[rows], lam_b[rows], dtype)
            else:
                x, row_sse = _solve_gram(a_mat, t, lam[rows], lam_b[rows], dtype)
            x_all[rows] = x
            sse += float(row_sse.sum())

    factors = x_all[:, :rank].astype(dtype)
    bias = x_all[:, rank].astype(dtype)
    if not (np.isfinite(sse) and np.all(np.isfinite(x_all))):
        from dmf.errors import TrainingError

        raise TrainingError(
            f"non-finite solution in {block.side} block [{block.start}, {block.stop}): "
            "check the ratings for huge values, or raise reg"
        )
    penalty = penalty_term(factors, bias, counts, reg, reg_bias, weighted_reg)
    return BlockSolution(block.start, factors, bias, sse, penalty, block.nnz)


def _solve_gram(a_mat, t, lam, lam_b, dtype):
    """Rows with at least rank+1 ratings: x = (A^T A + P)^-1 A^T t, P = diag(lam, .., lam, lam_b).

    a_mat (m, L, k1), t (m, L), lam and lam_b (m,). Returns x (m, k1) rounded to ``dtype`` and
    each row's squared error under it, from the Gram matrix rather than another pass over A:
    |t - A x|^2 = t.t - 2 x.(A^T t) + x.(A^T A) x."""
    k1 = a_mat.shape[2]
    at = a_mat.transpose(0, 2, 1)
    gram = np.matmul(at, a_mat)  # (m, k1, k1): one batched BLAS call (syrk per row)
    rhs = np.matmul(at, t[:, :, None])[:, :, 0]  # (m, k1)
    pen = np.empty((len(lam), k1))
    pen[:, : k1 - 1] = lam[:, None]
    pen[:, k1 - 1] = lam_b
    diag = np.arange(k1)
    gram[:, diag, diag] += pen
    x = _batched_solve(gram, rhs[:, :, None])[:, :, 0]
    x = x.astype(dtype).astype(np.float64)  # the stored (rounded) solution
    gx = np.matmul(gram, x[:, :, None])[:, :, 0] - pen * x  # (A^T A) x
    sse = (
        np.einsum("ij,ij->i", t, t)
        - 2 * np.einsum("ij,ij->i", x, rhs)
        + np.einsum("ij,ij->i", x, gx)
    )
    return x, np.maximum(sse, 0.0)


def _solve_short_rows(a_mat, t, lam, lam_b, dtype):
    """Rows with fewer ratings (L) than unknowns (k1): the same solution through an L x L system.

    By the Woodbury identity, (A^T A + P)^-1 A^T t = P^-1 A^T (A P^-1 A^T + I)^-1 t, so a row
    costs L^2 k1 + L^3 instead of L k1^2 + k1^3: most rows of real rating data are this short.
    Padding rows of A are zero, which puts ones on the padded diagonal and zeros in y there.
    Returns x (m, k1) rounded to ``dtype`` and each row's squared error under it."""
    m, length, k1 = a_mat.shape
    p_inv = np.empty((m, k1))
    p_inv[:, : k1 - 1] = (1.0 / lam)[:, None]
    p_inv[:, k1 - 1] = 1.0 / lam_b
    scaled = a_mat * p_inv[:, None, :]  # A P^-1
    kern = np.matmul(scaled, a_mat.transpose(0, 2, 1))  # (m, L, L)
    idx = np.arange(length)
    kern[:, idx, idx] += 1.0
    y = np.linalg.solve(kern, t[:, :, None])  # (m, L, 1)
    x = np.matmul(scaled.transpose(0, 2, 1), y)[:, :, 0]
    x = x.astype(dtype).astype(np.float64)  # the stored (rounded) solution
    resid = t - np.matmul(a_mat, x[:, :, None])[:, :, 0]  # padding: A = 0, t = 0
    return x, np.einsum("ij,ij->i", resid, resid)


def _batched_solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        # Only possible with reg == 0 (or reg_bias == 0) and a row with fewer ratings than
        # unknowns: take the minimum-norm least-squares solution for the singular systems.
        return np.matmul(np.linalg.pinv(gram, hermitian=True), rhs)


def _solve_long_row(block, r, target, aug, lam, lam_b, seg_len, dtype):
    rank = aug.shape[1] - 1
    k1 = rank + 1
    lo, hi = int(block.indptr[r]), int(block.indptr[r + 1])
    seg_len = max(1, int(seg_len))
    gram = np.zeros((k1, k1))
    rhs = np.zeros(k1)

    def seg(s):
        e = min(hi, s + seg_len)
        return aug[block.cols[s:e]].astype(np.float64), target[s:e]

    for s in range(lo, hi, seg_len):
        g, t = seg(s)
        gram += g.T @ g
        rhs += g.T @ t
    gram[np.arange(rank), np.arange(rank)] += lam
    gram[rank, rank] += lam_b
    x = _batched_solve(gram[None], rhs[None, :, None])[0, :, 0]
    x = x.astype(dtype).astype(np.float64)
    sse = 0.0
    for s in range(lo, hi, seg_len):
        g, t = seg(s)
        resid = t - g @ x
        sse += float(resid @ resid)
    return x, sse


def predict(
    mu: float,
    user_factors: np.ndarray,
    user_bias: np.ndarray,
    item_factors: np.ndarray,
    item_bias: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
) -> np.ndarray:
    """r_hat = mu + b_i + c_j + u_i . v_j for dense indices, shape (n,), float64.

    An index of -1 is an unknown user or item: its bias and factors count as zero, which is the
    cold-start fallback (mu + c_j, mu + b_i, or mu).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    out = np.full(len(users), mu, dtype=np.float64)
    ku, ki = users >= 0, items >= 0
    out[ku] += user_bias[users[ku]]
    out[ki] += item_bias[items[ki]]
    both = np.flatnonzero(ku & ki)
    rank = user_factors.shape[1]
    # Chunks bound the gathered (chunk, rank) factor copies.
    step = max(1, (1 << 22) // max(1, rank))
    for a in range(0, len(both), step):
        sel = both[a : a + step]
        uf = user_factors[users[sel]].astype(np.float64)
        vf = item_factors[items[sel]].astype(np.float64)
        out[sel] += np.einsum("ij,ij->i", uf, vf)
    return out
