"""The block solver against the dense reference, row by row, on one block in memory."""

from __future__ import annotations

import numpy as np
import pytest
from reference import dense_matrix, objective, penalty, solve_row

from dmf.als.solver import solve_block
from dmf.errors import TrainingError
from dmf.store.blocks import RatingBlock


def _problem(seed=0, n_rows=120, n_other=50, density=0.3, rank=4, empty_rows=(3, 17)):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_rows, n_other)) < density
    mask[list(empty_rows)] = False
    mask[5, :] = True  # one long row
    rows, cols = np.nonzero(mask)
    vals = rng.normal(3.5, 1.0, len(rows))
    fixed = rng.normal(0, 0.5, (n_other, rank))
    fixed_b = rng.normal(0, 0.2, n_other)
    return rows, cols, vals, fixed, fixed_b


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rank", [0, 1, 4, 20])
def test_solver_matches_reference_rows(weighted, rank):
    # Rows hold ~15 ratings (row 5 holds 50): at rank 20 most rows are shorter than the 21
    # unknowns and take the Woodbury form, row 5 the normal equations.
    rows, cols, vals, fixed, fixed_b = _problem(rank=rank)
    assert rank < 20 or (np.bincount(rows) < rank + 1).sum() > 50
    mu, reg, reg_bias = 3.4, 0.3, 0.05
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    sol = solve_block(block, fixed, fixed_b, mu, reg, reg_bias, weighted, dtype="float64")
    R = dense_matrix(120, 50, rows, cols, vals)
    for i in range(120):
        u, b = solve_row(R[i], fixed, fixed_b, mu, reg, reg_bias, weighted)
        np.testing.assert_allclose(sol.factors[i], u, rtol=1e-10, atol=1e-12)
        assert sol.bias[i] == pytest.approx(b, rel=1e-10, abs=1e-12)
    # Empty rows stay exactly zero.
    assert not sol.factors[[3, 17]].any() and not sol.bias[[3, 17]].any()
    # The block's share of the objective, recomputed densely.
    pred = mu + sol.bias[:, None] + fixed_b[None, :] + sol.factors @ fixed.T
    sse = np.nansum((R - pred) ** 2)
    assert sol.sse == pytest.approx(sse, rel=1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_whole_side_solution_carries_its_share_of_the_reference_objective(weighted, dtype):
    # One user half-step over the whole user side: the block's sse and penalty, plus the fixed
    # items' penalty (computed by the reference), must be the reference objective at the stored
    # new factors. reg_bias differs from reg and the biases are far from zero, so a penalty
    # that dropped, swapped or unweighted the bias term would be off by far more than 1e-9.
    rows, cols, vals, fixed, fixed_b = _problem(seed=11, rank=5)
    fixed_b = fixed_b + 0.5
    mu, reg, reg_bias = 3.4, 0.3, 0.07
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    sol = solve_block(block, fixed, fixed_b, mu, reg, reg_bias, weighted, dtype=dtype)
    assert sol.factors.dtype == np.dtype(dtype)
    R = dense_matrix(120, 50, rows, cols, vals)
    U, b = sol.factors.astype(np.float64), sol.bias.astype(np.float64)
    j_ref = objective(R, mu, U, b, fixed, fixed_b, reg, reg_bias, weighted)
    item_penalty = penalty(fixed, fixed_b, np.bincount(cols, minlength=50), reg, reg_bias, weighted)
    bias_share = penalty(U[:, :0], b, np.bincount(rows, minlength=120), 0.0, reg_bias, weighted)
    assert bias_share > 1e-4 * j_ref  # the check below can see the bias penalty
    assert sol.sse + sol.penalty + item_penalty == pytest.approx(j_ref, rel=1e-9)


@pytest.mark.parametrize("rank", [3, 40, 100])
def test_rows_across_chunk_boundaries_match_the_reference(rank):
    # The kernel gathers a chunk of ratings at a time and accumulates the Gram matrix over
    # chunks (dgemm on short chunks at low rank, dsyrk on longer ones above): rows of every
    # length around the chunk size, and far beyond it, against the oracle.
    from dmf.als.kernels import CHUNK, GEMM_CHUNK, GEMM_MAX_K1

    chunk = GEMM_CHUNK if rank + 1 <= GEMM_MAX_K1 else CHUNK
    assert (rank == 100) == (chunk == CHUNK)  # both paths are covered
    rng = np.random.default_rng(7)
    lengths = [0, 1, rank, rank + 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 7]
    n_other = 4 * max(chunk, rank)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.concatenate([rng.choice(n_other, n, replace=False) for n in lengths])
    vals = rng.normal(3.5, 1.0, len(rows))
    fixed = rng.normal(0, 0.5, (n_other, rank))
    fixed_b = rng.normal(0, 0.2, n_other)
    block = RatingBlock.from_coo("user", 0, len(lengths), rows, cols, vals)
    sol = solve_block(block, fixed, fixed_b, 3.4, 0.2, 0.1, dtype="float64")
    R = dense_matrix(len(lengths), n_other, rows, cols, vals)
    for i in range(len(lengths)):
        u, b = solve_row(R[i], fixed, fixed_b, 3.4, 0.2, 0.1, False)
        np.testing.assert_allclose(sol.factors[i], u, rtol=1e-10, atol=1e-12)
        assert sol.bias[i] == pytest.approx(b, rel=1e-10, abs=1e-12)
    pred = 3.4 + sol.bias[:, None] + fixed_b[None, :] + sol.factors @ fixed.T
    assert sol.sse == pytest.approx(np.nansum((R - pred) ** 2), rel=1e-9)


def test_a_row_gets_the_same_bits_in_any_block():
    # Each row is solved on its own: splitting a block changes nothing, to the last bit, which
    # is what makes results independent of the block layout.
    rows, cols, vals, fixed, fixed_b = _problem(seed=2, rank=6)
    whole = RatingBlock.from_coo("item", 10, 130, rows + 10, cols, vals)
    sol = solve_block(whole, fixed, fixed_b, 3.0, 0.1, 0.1)
    for lo, hi in ((10, 47), (47, 130)):
        keep = (rows + 10 >= lo) & (rows + 10 < hi)
        part = RatingBlock.from_coo("item", lo, hi, rows[keep] + 10, cols[keep], vals[keep])
        sub = solve_block(part, fixed, fixed_b, 3.0, 0.1, 0.1)
        assert np.array_equal(sub.factors, sol.factors[lo - 10 : hi - 10])
        assert np.array_equal(sub.bias, sol.bias[lo - 10 : hi - 10])


def test_singular_rows_without_regularisation_take_the_minimum_norm_solution():
    # reg = 0 and rows with fewer ratings than unknowns: the Cholesky factorisation fails and
    # those rows are solved by pseudo-inverse, the others as usual.
    rows, cols, vals, fixed, fixed_b = _problem(seed=8, rank=8, density=0.08)
    counts = np.bincount(rows, minlength=120)
    assert ((counts > 0) & (counts < 9)).sum() > 10 and (counts >= 9).sum() > 0
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    sol = solve_block(block, fixed, fixed_b, 3.0, 0.0, 0.0, dtype="float64")
    R = dense_matrix(120, 50, rows, cols, vals)
    for i in np.flatnonzero(counts):
        obs = ~np.isnan(R[i])
        a_mat = np.hstack([fixed[obs], np.ones((obs.sum(), 1))])
        x = np.linalg.lstsq(a_mat, R[i, obs] - 3.0 - fixed_b[obs], rcond=None)[0]
        np.testing.assert_allclose(sol.factors[i], x[:8], rtol=1e-6, atol=1e-8)
        assert sol.bias[i] == pytest.approx(x[8], rel=1e-6, abs=1e-8)


def test_columns_outside_the_other_side_are_refused():
    rows, cols, vals, fixed, fixed_b = _problem(seed=9)
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    with pytest.raises(ValueError, match=r"user block \[0, 120\) refers to column 49"):
        solve_block(block, fixed[:40], fixed_b[:40], 3.0, 0.1, 0.1)


def test_short_rows_without_regularisation_use_the_normal_equations():
    # reg_bias = 0 rules out the Woodbury form (it divides by the penalties): same answer anyway.
    rows, cols, vals, fixed, fixed_b = _problem(seed=6, rank=20, density=0.6)
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    sol = solve_block(block, fixed, fixed_b, 3.0, 0.2, 0.0, dtype="float64")
    R = dense_matrix(120, 50, rows, cols, vals)
    for i in (0, 5, 50):
        u, b = solve_row(R[i], fixed, fixed_b, 3.0, 0.2, 0.0, False)
        np.testing.assert_allclose(sol.factors[i], u, rtol=1e-9, atol=1e-11)


def test_float32_storage_rounds_but_solves_in_float64():
    rows, cols, vals, fixed, fixed_b = _problem(seed=3)
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    s64 = solve_block(block, fixed, fixed_b, 3.0, 0.1, 0.1, dtype="float64")
    s32 = solve_block(block, fixed.astype(np.float32), fixed_b.astype(np.float32), 3.0, 0.1, 0.1)
    assert s32.factors.dtype == np.float32 and s32.bias.dtype == np.float32
    np.testing.assert_allclose(s32.factors, s64.factors, rtol=1e-5, atol=1e-6)


def test_non_finite_input_is_a_loud_error():
    rows, cols, vals, fixed, fixed_b = _problem(seed=4)
    vals = vals.copy()
    vals[7] = np.nan
    block = RatingBlock.from_coo("user", 0, 120, rows, cols, vals)
    with pytest.raises(TrainingError, match=r"user block \[0, 120\)"):
        solve_block(block, fixed, fixed_b, 3.0, 0.1, 0.1)


def test_block_invariants_are_checked():
    with pytest.raises(ValueError, match="indptr"):
        RatingBlock("user", 0, 2, np.array([0, 2, 1]), np.zeros(1, np.int32), np.zeros(1))
    with pytest.raises(ValueError, match="holds row indices"):
        RatingBlock.from_coo("user", 5, 7, np.array([4]), np.array([0]), np.array([1.0]))
    with pytest.raises(ValueError, match="not sorted"):
        RatingBlock.from_coo(
            "user", 0, 3, np.array([2, 1]), np.array([0, 0]), np.ones(2), assume_sorted=True
        )


def test_one_compiled_kernel_per_factor_dtype(small_store):
    # Blocks from Parquet (read-only float32 arrays) and from memory (writable float64) must
    # share one compiled specialization: warm_up on the driver compiles exactly that one.
    from dmf.als.kernels import solve_rows, warm_up

    warm_up("float32")
    warm_up("float64")
    before = set(solve_rows.signatures)
    assert len(before) == 2
    rows, cols, vals, fixed, fixed_b = _problem(seed=10)
    solve_block(
        RatingBlock.from_coo("user", 0, 120, rows, cols, vals), fixed, fixed_b, 3.0, 0.1, 0.1
    )
    block = small_store.read_block("user", 0)
    n_items = small_store.n_rows("item")
    f32 = np.random.default_rng(0).normal(0, 0.3, (n_items, 4)).astype(np.float32)
    solve_block(block, f32, np.zeros(n_items, np.float32), small_store.mu, 0.1, 0.1)
    assert set(solve_rows.signatures) == before
