"""The ALS mathematics in plain NumPy, written as the equations read.

The model predicts rating r_ij of user i for item j as

    r_hat_ij = mu + b_i + c_j + u_i . v_j

with mu the global mean of the train ratings, b_i and c_j the user and item biases and u_i, v_j
the rank-dimensional factors. Training minimises, over the observed ratings,

    J = sum_ij (r_ij - r_hat_ij)^2 + sum_i (lam_i |u_i|^2 + lam_b_i b_i^2)
                                   + sum_j (lam_j |v_j|^2 + lam_b_j c_j^2)

with lam = reg and lam_b = reg_bias for every row, or, under ALS-WR (``weighted_reg``), both
multiplied by the row's rating count n_i.

Alternating least squares holds one side fixed and solves the other, row by row. Hold the items
(V, c) fixed. The part of J that depends on user i's unknowns x_i = [u_i; b_i] (rank + 1 numbers)
is

    J_i(x_i) = |A_i x_i - t_i|^2 + x_i^T P_i x_i

where A_i stacks the rows [v_j, 1] of the items user i rated, t_i holds r_ij - mu - c_j, and
P_i = diag(lam_i, ..., lam_i, lam_b_i). Setting the gradient 2 A_i^T (A_i x_i - t_i) + 2 P_i x_i
to zero gives the augmented normal equations

    (A_i^T A_i + P_i) x_i = A_i^T t_i

which are those of the stacked least-squares problem min |[A_i; sqrt(P_i)] x_i - [t_i; 0]|^2.
When every penalty is positive the matrix is positive definite, so the solution is the unique
minimiser of J over (u_i, b_i) and J never increases from one half-iteration to the next. The
item half-step is the same with the roles swapped. A row with no ratings gets x_i = 0.

With reg 0, a row with fewer ratings than unknowns has a singular matrix: it gets the
minimum-norm solution of the stacked problem (the pseudo-inverse solution).

This module is the readable reference path (``solve_block(..., native=False)``): it loops over
rows in Python, which is far too slow for training. The trainer uses the compiled kernel of
:mod:`dmf.als.kernels`, which solves the same equations and agrees with this to ~1e-10.
"""

from __future__ import annotations

import numpy as np


def solve_rows_numpy(
    indptr: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    mu: float,
    fixed_factors: np.ndarray,
    fixed_bias: np.ndarray,
    lam: np.ndarray,
    lam_b: np.ndarray,
    dtype: np.dtype | str = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve the augmented normal equations of every row of a CSR block, one row at a time.

    Parameters
    ----------
    indptr : (n + 1,) int
        Row i's ratings are ``vals[indptr[i]:indptr[i + 1]]``, on the columns ``cols[...]``.
    cols : (nnz,) int
        Indices into the fixed side.
    vals : (nnz,) float
        The ratings r_ij.
    mu : float
        Global mean of the train ratings.
    fixed_factors : (n_other, rank) float
        The fixed side's factors v_j.
    fixed_bias : (n_other,) float
        The fixed side's biases c_j.
    lam, lam_b : (n,) float
        Each row's factor and bias penalty, already scaled by the row's count under ALS-WR.
    dtype
        Storage dtype of the factors: x is rounded to it before the squared error is computed,
        so ``sse`` is that of the stored model.

    Returns
    -------
    x : (n, rank + 1) float64
        Row i's solution [u_i; b_i] (rounded to ``dtype``); zeros for a row with no ratings, NaN
        for a row whose inputs are not finite.
    sse : (n,) float64
        |t_i - A_i x_i|^2 per row.
    """
    n, rank = len(indptr) - 1, fixed_factors.shape[1]
    x = np.zeros((n, rank + 1))
    sse = np.zeros(n)
    for i in range(n):
        js = cols[indptr[i] : indptr[i + 1]]
        if len(js) == 0:
            continue
        A = np.hstack([fixed_factors[js].astype(np.float64), np.ones((len(js), 1))])
        t = vals[indptr[i] : indptr[i + 1]].astype(np.float64) - mu - fixed_bias[js]
        P = np.diag([lam[i]] * rank + [lam_b[i]])
        if not (np.isfinite(A).all() and np.isfinite(t).all()):
            # LAPACK's SVD (lstsq) can spin forever on NaN; the caller reports the row instead.
            x[i], sse[i] = np.nan, np.nan
            continue
        if lam[i] > 0:
            # Positive definite: x^T (A^T A + P) x = |A x|^2 + lam |u|^2 + lam_b b^2, and A x is
            # b (1, ..., 1) when u = 0.
            x_i = np.linalg.solve(A.T @ A + P, A.T @ t)
        else:
            # Possibly singular: the minimum-norm solution, from the stacked form (no A^T A, so
            # no squared condition number either).
            stacked = np.vstack([A, np.sqrt(P)])
            x_i = np.linalg.lstsq(stacked, np.concatenate([t, np.zeros(rank + 1)]), rcond=None)[0]
        x[i] = x_i.astype(dtype)
        e = t - A @ x[i]
        sse[i] = e @ e
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
    """r_hat = mu + b_i + c_j + u_i . v_j for pairs of dense indices.

    Parameters
    ----------
    mu : float
        Global mean.
    user_factors, item_factors : (n_users, rank), (n_items, rank)
    user_bias, item_bias : (n_users,), (n_items,)
    users, items : (n,) int
        Dense indices; -1 is an unknown user or item, whose bias and factors count as zero: the
        cold-start fallback (mu + c_j, mu + b_i, or mu).

    Returns
    -------
    (n,) float64
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


# ---------------------------------------------------------------------------------------------
# Implicit feedback (Hu, Koren & Volinsky 2008)
# ---------------------------------------------------------------------------------------------
# Every user-item cell is fitted: preference p_ij = 1 where the summed events r_ij > 0, else 0,
# confidence c_ij = 1 + alpha r_ij (or 1 + alpha log(1 + r_ij / eps)), 1 at an unobserved cell:
#
#     J = sum_all c_ij (p_ij - b_i - c_j - u_i . v_j)^2 + penalties        (mu = 0)
#
# With biases off (the usual form) b and c stay 0. Hold the items fixed; user i's unknowns are
# x_i = [u_i; b_i] (or u_i alone), the fixed rows a_j = [v_j, 1] (or v_j), the targets
# t_ij = p_ij - c_j, and the normal equations
#
#     (sum_all c_ij a_j a_j^T + P_i) x_i = sum_all c_ij t_ij a_j.
#
# Split each sum into all cells at confidence 1 plus the observed cells' excess: with
# G0 = sum_all a_j a_j^T, r0 = sum_all t0_j a_j and T0 = sum_all t0_j^2 (t0_j = -c_j, the
# target of an unobserved cell), computed once per half-step from the fixed side,
#
#     (G0 + sum_obs (c_ij - 1) a_j a_j^T + P_i) x_i = r0 + sum_obs (c_ij t_ij - t0_j) a_j
#
# so a row costs O(n_i k^2 + k^3), not O(n_items). Its share of the objective is
# T0 + sum_obs (c t^2 - t0^2) - 2 x.rhs + x^T G x, with G the unpenalised matrix.


def confidence(r: np.ndarray, alpha: float, kind: str = "linear", eps: float = 1.0) -> np.ndarray:
    """c = 1 + alpha |r| (``linear``) or 1 + alpha log(1 + |r| / eps) (``log``)."""
    a = np.abs(np.asarray(r, dtype=np.float64))
    return 1.0 + alpha * (np.log1p(a / eps) if kind == "log" else a)


def implicit_row_system(
    cols: np.ndarray,
    vals: np.ndarray,
    fixed_aug: np.ndarray,
    fixed_bias: np.ndarray,
    gram0: np.ndarray,
    rhs0: np.ndarray,
    tt0: float,
    k: int,
    alpha: float,
    kind: str,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One row's unpenalised matrix G, right-hand side and constant term, as the equations
    above read (``k``: rank + 1 with biases, rank without; ``fixed_aug`` the rows [v_j, 1])."""
    a = fixed_aug[cols, :k].astype(np.float64)
    conf = confidence(vals, alpha, kind, eps)
    pref = (np.asarray(vals) > 0).astype(np.float64)
    cb = fixed_bias[cols].astype(np.float64) if k == fixed_aug.shape[1] else np.zeros(len(cols))
    t = pref - cb
    g = gram0 + (a * (conf - 1.0)[:, None]).T @ a
    rhs = rhs0 + a.T @ (conf * t + cb)
    tt = tt0 + float(np.sum(conf * t * t - cb * cb))
    return g, rhs, tt


def solve_rows_implicit_numpy(
    indptr, cols, vals, fixed_aug, fixed_bias, gram0, rhs0, tt0, k, alpha, kind, eps, lam, lam_b,
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Every row of a CSR block of events, exactly (pseudo-inverse when the penalised matrix is
    singular), row by row in Python: the readable path, and the fallback of the compiled kernel.
    Returns (x (n, k) float64 rounded to ``dtype``, the rows' shares of the objective)."""
    n = len(indptr) - 1
    x = np.zeros((n, k))
    loss = np.zeros(n)
    kb = k - 1 if k == fixed_aug.shape[1] else k
    for i in range(n):
        sl = slice(indptr[i], indptr[i + 1])
        g, rhs, tt = implicit_row_system(
            cols[sl], vals[sl], fixed_aug, fixed_bias, gram0, rhs0, tt0, k, alpha, kind, eps
        )
        pen = np.array([lam[i]] * kb + [lam_b[i]] * (k - kb))
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(rhs))):
            x[i], loss[i] = np.nan, np.nan
            continue
        xi = np.linalg.pinv(g + np.diag(pen), hermitian=True) @ rhs
        x[i] = xi.astype(dtype)
        loss[i] = max(tt - 2.0 * x[i] @ rhs + x[i] @ g @ x[i], 0.0)
    return x, loss
