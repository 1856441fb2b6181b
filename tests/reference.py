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


# ---------------------------------------------------------------------------------------------
# Implicit feedback: every cell, dense (Hu, Koren & Volinsky 2008), as the paper writes it
# ---------------------------------------------------------------------------------------------
def implicit_weights(R, alpha, kind="linear", eps=1.0):
    """(P, C): preference 1 where the summed events are > 0, confidence 1 + alpha r (or
    1 + alpha log(1 + r / eps)); R holds 0 where nothing was observed."""
    a = np.abs(R)
    C = 1.0 + alpha * (np.log1p(a / eps) if kind == "log" else a)
    return (R > 0).astype(np.float64), C


def implicit_objective(R, U, b, V, c, reg, reg_bias, alpha, weighted=False, kind="linear", eps=1.0):
    """sum over ALL cells c_ij (p_ij - b_i - c_j - u_i . v_j)^2 plus the penalties (mu = 0)."""
    P, C = implicit_weights(R, alpha, kind, eps)
    pred = b[:, None] + c[None, :] + U @ V.T
    loss = float(np.sum(C * (P - pred) ** 2))
    n_u, n_i = (R != 0).sum(1), (R != 0).sum(0)
    return (
        loss
        + penalty(U, b, n_u, reg, reg_bias, weighted)
        + penalty(V, c, n_i, reg, reg_bias, weighted)
    )


def implicit_solve_side(
    R, F, f_bias, reg, reg_bias, alpha, biases, weighted=False, kind="linear", eps=1.0
):
    """Every row of R's rows given the fixed side (F, f_bias): the dense normal equations
    (A^T C_i A + P_i) x = A^T C_i (p_i - f_bias), over all columns, one row at a time."""
    P, C = implicit_weights(R, alpha, kind, eps)
    rank = F.shape[1]
    A = np.hstack([F, np.ones((len(F), 1))]) if biases else F
    k = A.shape[1]
    X = np.zeros((R.shape[0], k))
    for i in range(R.shape[0]):
        scale = (R[i] != 0).sum() if weighted else 1
        pen = np.array([reg * scale] * rank + [reg_bias * scale] * (k - rank))
        target = P[i] - (f_bias if biases else 0.0)
        lhs = A.T @ (C[i][:, None] * A) + np.diag(pen)
        X[i] = np.linalg.solve(lhs, A.T @ (C[i] * target))
    if biases:
        return X[:, :rank], X[:, rank]
    return X, np.zeros(len(X))


def implicit_als_reference(
    R, V0, iterations, reg, reg_bias, alpha, biases, weighted=False, kind="linear", eps=1.0
):
    """Implicit ALS from item factors V0 (users solved first), dense. Returns U, b, V, c and the
    objective after every half-step, a list of (after users, after items) per iteration."""
    V, c = np.array(V0, dtype=np.float64), np.zeros(R.shape[1])
    U, b = np.zeros((R.shape[0], V.shape[1])), np.zeros(R.shape[0])
    objs = []
    for _ in range(iterations):
        U, b = implicit_solve_side(R, V, c, reg, reg_bias, alpha, biases, weighted, kind, eps)
        after_u = implicit_objective(R, U, b, V, c, reg, reg_bias, alpha, weighted, kind, eps)
        V, c = implicit_solve_side(R.T, U, b, reg, reg_bias, alpha, biases, weighted, kind, eps)
        after_i = implicit_objective(R, U, b, V, c, reg, reg_bias, alpha, weighted, kind, eps)
        objs.append((after_u, after_i))
    return U, b, V, c, objs
