"""A slow, readable dense reference of the model's exact equations: the oracle for the trainer.

Plain NumPy, one row at a time, a dense ratings matrix with NaN where nothing was observed:

    r_hat(i, j) = mu + b_i + c_j + u_i . v_j
    J = sum_observed (r_ij - r_hat)^2 + lambda (|U|^2 + |V|^2) + lambda_b (|b|^2 + |c|^2)

(under ALS-WR each row's two penalties are multiplied by its number of ratings). Each half-step
minimises J exactly over one side, row by row, by the augmented normal equations.
"""

from __future__ import annotations

import numpy as np


def dense_matrix(n_users, n_items, users, items, ratings) -> np.ndarray:
    R = np.full((n_users, n_items), np.nan)
    R[users, items] = np.asarray(ratings, dtype=np.float64)
    return R


def solve_row(r_row, fixed_f, fixed_b, mu, reg, reg_bias, weighted):
    """Exact minimiser (u, b) for one row given the fixed side; zeros if the row has no ratings."""
    obs = ~np.isnan(r_row)
    rank = fixed_f.shape[1]
    n = int(obs.sum())
    if n == 0:
        return np.zeros(rank), 0.0
    A = np.hstack([fixed_f[obs], np.ones((n, 1))])
    t = r_row[obs] - mu - fixed_b[obs]
    scale = n if weighted else 1
    P = np.diag([reg * scale] * rank + [reg_bias * scale])
    x = np.linalg.solve(A.T @ A + P, A.T @ t)
    return x[:rank], x[rank]


def penalty(F, f_bias, n_ratings, reg, reg_bias, weighted):
    """One side's regularisation: sum over its rows of reg |f|^2 + reg_bias f_bias^2, each row
    weighted by its number of ratings under ALS-WR."""
    w = np.asarray(n_ratings, dtype=np.float64) if weighted else np.ones(len(f_bias))
    return float(reg * (w @ (F**2).sum(1)) + reg_bias * (w @ f_bias**2))


def objective(R, mu, U, b, V, c, reg, reg_bias, weighted):
    obs = ~np.isnan(R)
    pred = mu + b[:, None] + c[None, :] + U @ V.T
    sse = np.nansum(np.where(obs, (R - pred) ** 2, 0.0))
    pen_users = penalty(U, b, obs.sum(1), reg, reg_bias, weighted)
    pen_items = penalty(V, c, obs.sum(0), reg, reg_bias, weighted)
    return float(sse + pen_users + pen_items)


def als_reference(R, mu, V0, iterations, reg, reg_bias, weighted=False):
    """Run ALS from item factors V0 (users solved first). Returns U, b, V, c and the objective
    after every half-step, as a list of (after users, after items) per iteration."""
    n_users, n_items = R.shape
    rank = V0.shape[1]
    U, b = np.zeros((n_users, rank)), np.zeros(n_users)
    V, c = np.array(V0, dtype=np.float64), np.zeros(n_items)
    history = []
    for _ in range(iterations):
        for i in range(n_users):
            U[i], b[i] = solve_row(R[i], V, c, mu, reg, reg_bias, weighted)
        j_users = objective(R, mu, U, b, V, c, reg, reg_bias, weighted)
        for j in range(n_items):
            V[j], c[j] = solve_row(R[:, j], U, b, mu, reg, reg_bias, weighted)
        history.append((j_users, objective(R, mu, U, b, V, c, reg, reg_bias, weighted)))
    return U, b, V, c, history
