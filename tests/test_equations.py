"""The plain-NumPy row solver (dmf.als.equations) against the dense reference, against the stacked
least-squares form of the same problem, and against the compiled kernel."""

from __future__ import annotations

import numpy as np
import pytest
from reference import dense_matrix, solve_row

from dmf.als.equations import predict, solve_rows_numpy
from dmf.als.solver import solve_block
from dmf.errors import TrainingError
from dmf.store.blocks import RatingBlock

MU = 3.4


def _csr(lengths, n_other, rank, seed):
    """Rows of the given lengths on distinct random columns, and a random fixed side."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.concatenate([np.sort(rng.choice(n_other, n, replace=False)) for n in lengths])
    vals = rng.normal(3.5, 1.0, len(rows))
    fixed = rng.normal(0, 0.5, (n_other, rank))
    fixed_b = rng.normal(0, 0.2, n_other)
    return RatingBlock.from_coo("user", 0, len(lengths), rows, cols, vals), fixed, fixed_b


def _penalties(block, reg, reg_bias, weighted):
    # Written out here rather than taken from dmf.als.solver.row_penalties: the tests' own view.
    scale = np.diff(block.indptr).astype(np.float64) if weighted else np.ones(block.n_rows)
    return reg * scale, reg_bias * scale


def _numpy(block, fixed, fixed_b, reg, reg_bias, weighted=False):
    lam, lam_b = _penalties(block, reg, reg_bias, weighted)
    return solve_rows_numpy(block.indptr, block.cols, block.vals, MU, fixed, fixed_b, lam, lam_b)


def _row_system(block, i, fixed, fixed_b, lam, lam_b):
    """A_i, t_i and P_i of row i, built from the block directly."""
    lo, hi = block.indptr[i], block.indptr[i + 1]
    js = block.cols[lo:hi]
    A = np.column_stack([fixed[js], np.ones(hi - lo)])
    t = block.vals[lo:hi] - MU - fixed_b[js]
    P = np.diag(np.r_[np.full(fixed.shape[1], lam[i]), lam_b[i]])
    return A, t, P


# Rows of 0-30 ratings on 40 columns: at rank 20 many have fewer ratings than the 21 unknowns.
LENGTHS = [0, 1, 2, 5, 12, 20, 21, 22, 30, 0, 3, 40]
CASES = {
    "plain reg": dict(rank=4, reg=0.3, reg_bias=0.3, weighted=False),
    "separate reg_bias": dict(rank=4, reg=0.3, reg_bias=0.02, weighted=False),
    "weighted_reg": dict(rank=4, reg=0.05, reg_bias=0.01, weighted=True),
    "rank 0": dict(rank=0, reg=0.3, reg_bias=0.1, weighted=False),
    "rows shorter than rank+1": dict(rank=20, reg=0.2, reg_bias=0.1, weighted=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_rows_match_the_dense_reference(case, seed):
    rank, reg, reg_bias, weighted = case["rank"], case["reg"], case["reg_bias"], case["weighted"]
    block, fixed, fixed_b = _csr(LENGTHS, 40, rank, seed)
    x, sse = _numpy(block, fixed, fixed_b, reg, reg_bias, weighted)
    assert x.shape == (len(LENGTHS), rank + 1) and x.dtype == np.float64
    assert sse.shape == (len(LENGTHS),) and sse.dtype == np.float64
    R = dense_matrix(
        len(LENGTHS), 40, np.repeat(np.arange(len(LENGTHS)), LENGTHS), block.cols, block.vals
    )
    for i in range(len(LENGTHS)):
        u, b = solve_row(R[i], fixed, fixed_b, MU, reg, reg_bias, weighted)
        np.testing.assert_allclose(x[i, :rank], u, rtol=1e-10, atol=1e-12)
        assert x[i, rank] == pytest.approx(b, rel=1e-10, abs=1e-12)
        obs = ~np.isnan(R[i])
        resid = R[i, obs] - MU - fixed_b[obs] - fixed[obs] @ u - b
        assert sse[i] == pytest.approx(resid @ resid, rel=1e-10, abs=1e-12)
    empty = np.array(LENGTHS) == 0
    assert not x[empty].any() and not sse[empty].any()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_numpy_rows_solve_the_stacked_least_squares_problem(case):
    # (A^T A + P) x = A^T t are the normal equations of min |[A; sqrt(P)] x - [t; 0]|^2: solving
    # the stacked problem by SVD, without ever forming A^T A, checks that derivation.
    rank, reg, reg_bias, weighted = case["rank"], case["reg"], case["reg_bias"], case["weighted"]
    block, fixed, fixed_b = _csr(LENGTHS, 40, rank, seed=3)
    x, _ = _numpy(block, fixed, fixed_b, reg, reg_bias, weighted)
    lam, lam_b = _penalties(block, reg, reg_bias, weighted)
    for i in np.flatnonzero(LENGTHS):
        A, t, P = _row_system(block, i, fixed, fixed_b, lam, lam_b)
        stacked = np.vstack([A, np.sqrt(P)])
        want = np.linalg.lstsq(stacked, np.concatenate([t, np.zeros(rank + 1)]), rcond=None)[0]
        np.testing.assert_allclose(x[i], want, rtol=1e-10, atol=1e-12)
        # And x zeroes the gradient of |A x - t|^2 + x^T P x.
        grad = A.T @ (A @ x[i] - t) + P @ x[i]
        assert np.abs(grad).max() < 1e-10 * max(1.0, np.abs(A.T @ t).max())


def test_numpy_singular_rows_take_the_minimum_norm_solution():
    # reg = reg_bias = 0 and fewer ratings than unknowns: infinitely many minimisers of |A x - t|.
    block, fixed, fixed_b = _csr([0, 1, 3, 8, 9, 25], 40, rank=8, seed=5)
    x, sse = _numpy(block, fixed, fixed_b, 0.0, 0.0)
    zero = np.zeros(6)
    for i in range(1, 6):
        A, t, _ = _row_system(block, i, fixed, fixed_b, zero, zero)
        np.testing.assert_allclose(x[i], np.linalg.pinv(A) @ t, rtol=1e-9, atol=1e-11)
        assert sse[i] == pytest.approx(np.sum((t - A @ x[i]) ** 2), abs=1e-12)
    assert not x[0].any()


def _lengths(rank, chunk):
    """Row lengths around every boundary the kernel has: rank + 1 (Woodbury or Gram form), its
    gather chunk, and several chunks."""
    k1 = rank + 1
    around = [1, 2, k1 - 2, k1 - 1, k1, k1 + 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3]
    return sorted({n for n in around + [63, 64, 65, 255, 256, 257, 3 * 256 + 7] if n > 0} | {0})


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rank", [10, 100])
def test_compiled_kernel_matches_the_numpy_path(rank, weighted):
    # rank 10 accumulates the Gram matrix by dgemm on 64-rating chunks, rank 100 (above
    # GEMM_MAX_K1 unknowns) by dsyrk on 256-rating chunks; rows shorter than rank + 1 take the
    # Woodbury form. All must agree with the plain normal equations.
    from dmf.als.kernels import CHUNK, GEMM_CHUNK, GEMM_MAX_K1

    chunk = GEMM_CHUNK if rank + 1 <= GEMM_MAX_K1 else CHUNK
    assert (rank == 100) == (chunk == CHUNK)
    lengths = _lengths(rank, chunk)
    assert min(n for n in lengths if n) < rank + 1 < max(lengths)
    block, fixed, fixed_b = _csr(lengths, 1000, rank, seed=rank)
    args = (block, fixed, fixed_b, MU, 0.2, 0.05, weighted)
    fast = solve_block(*args, dtype="float64", native=True)
    slow = solve_block(*args, dtype="float64", native=False)
    np.testing.assert_allclose(fast.factors, slow.factors, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fast.bias, slow.bias, rtol=1e-10, atol=1e-12)
    assert fast.sse == pytest.approx(slow.sse, rel=1e-10)
    assert fast.penalty == pytest.approx(slow.penalty, rel=1e-10)
    assert fast.nnz == slow.nnz and fast.start == slow.start


def test_compiled_kernel_matches_the_numpy_path_in_float32_and_without_reg():
    block, fixed, fixed_b = _csr([0, 1, 4, 9, 10, 11, 64, 65, 300], 500, rank=10, seed=2)
    f32, b32 = fixed.astype(np.float32), fixed_b.astype(np.float32)
    fast = solve_block(block, f32, b32, MU, 0.1, 0.1, native=True)
    slow = solve_block(block, f32, b32, MU, 0.1, 0.1, native=False)
    assert slow.factors.dtype == np.float32 and slow.bias.dtype == np.float32
    # Both round the same float64 solution to float32: equal up to a last-bit tie.
    np.testing.assert_allclose(fast.factors, slow.factors, rtol=2e-7, atol=1e-9)
    np.testing.assert_allclose(fast.bias, slow.bias, rtol=2e-7, atol=1e-9)
    assert fast.sse == pytest.approx(slow.sse, rel=1e-6)
    # reg 0: the compiled path's singular rows go to a pseudo-inverse, the NumPy path's to lstsq.
    fast = solve_block(block, fixed, fixed_b, MU, 0.0, 0.0, dtype="float64", native=True)
    slow = solve_block(block, fixed, fixed_b, MU, 0.0, 0.0, dtype="float64", native=False)
    np.testing.assert_allclose(fast.factors, slow.factors, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fast.bias, slow.bias, rtol=1e-8, atol=1e-10)
    assert fast.sse == pytest.approx(slow.sse, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("reg", [0.1, 0.0])
def test_numpy_path_reports_non_finite_input_like_the_compiled_one(reg):
    # reg 0 sends rows to lstsq, whose SVD may never return on NaN: the row must be caught first.
    block, fixed, fixed_b = _csr([3, 5, 40], 50, rank=6, seed=4)
    vals = block.vals.copy()
    vals[4] = np.nan
    bad = RatingBlock("user", 0, 3, block.indptr, block.cols, vals)
    for native in (True, False):
        with pytest.raises(TrainingError, match=r"user block \[0, 3\)"):
            solve_block(bad, fixed, fixed_b, MU, reg, reg, native=native)


def test_numpy_path_checks_the_columns_like_the_compiled_one():
    block, fixed, fixed_b = _csr([3, 5, 40], 50, rank=6, seed=4)
    with pytest.raises(ValueError, match=r"user block \[0, 3\) refers to column"):
        solve_block(block, fixed[:30], fixed_b[:30], MU, 0.1, 0.1, native=False)


def test_predict_is_the_model_with_cold_start_fallbacks():
    rng = np.random.default_rng(6)
    U, V = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    b, c = rng.normal(size=5), rng.normal(size=4)
    users = np.array([0, 4, 2, -1, 3, -1])
    items = np.array([1, 3, 0, 2, -1, -1])
    got = predict(MU, U, b, V, c, users, items)
    full = MU + b[:, None] + c[None, :] + U @ V.T
    want = [full[0, 1], full[4, 3], full[2, 0], MU + c[2], MU + b[3], MU]
    np.testing.assert_allclose(got, want, rtol=1e-14)
    from dmf.als.solver import predict as old_path

    assert old_path is predict
