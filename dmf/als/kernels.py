"""The compiled per-row kernel of the block solver: gather, Gram, Cholesky, in one pass.

:func:`solve_rows` solves the augmented normal equations of every row of a CSR block (see
:mod:`dmf.als.equations` for the mathematics, and its plain-NumPy solver of the same equations)
in one call, with no Python between rows:

1. gather the row's fixed-side rows ``[v_j, 1]`` (float32 or float64) into a small float64 buffer,
   a chunk of ratings at a time, so the buffer stays in the L2 cache and any row length works;
2. accumulate ``A^T A`` with BLAS (the full ``dgemm`` product on 64-rating chunks up to rank 95,
   i.e. ``GEMM_MAX_K1`` = 96 unknowns, the symmetric ``dsyrk`` on 256-rating chunks above) and
   ``A^T t`` with ``dgemv``;
3. add the penalties to the diagonal, factor with LAPACK ``dpotrf`` and solve with ``dpotrs``.

Rows with fewer ratings L than unknowns k1 (most rows of real rating data, at higher ranks) take
the Woodbury form instead: an L x L system ``(A P^-1 A^T + I) y = t``, then ``x = P^-1 A^T y``
(its L x L product is always a ``dsyrk``).

Why compiled, and why these libraries: NumPy has no batched ``syrk`` or Cholesky solve, so the
previous solver padded rows of similar length into batches, computed the full (not symmetric)
Gram product and LU-factored; that spent 2-3x the arithmetic plus a gather pass of its own.
numba (``nogil``, so Dask worker threads run blocks in parallel) removes the per-row Python cost;
SciPy's BLAS and LAPACK, reached through its documented Cython API (``scipy.linalg.cython_blas``),
do the arithmetic at the machine's BLAS rate. The function addresses are registered with LLVM
under fixed symbol names, so the compiled kernel is cached on disk (``cache=True``) and a new
worker process loads it instead of compiling it again.

A row whose Cholesky factorisation fails, or with no factor penalty and fewer ratings than
unknowns (singular; only possible with reg 0), gets ``status`` 1 and is left to
:mod:`dmf.als.solver`, which solves it by pseudo-inverse.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from numba import types
from numba.extending import get_cython_function_address

# Ratings gathered per BLAS call: a CHUNK x (rank+1) float64 buffer stays in the L2 cache; the
# Gram matrix of a longer row accumulates over chunks. Up to GEMM_MAX_K1 unknowns the Gram update
# is a full dgemm on 64-rating chunks, above it a dsyrk (half the arithmetic) on 256: OpenBLAS's
# small dsyrk runs at well under half its dgemm rate, and on our machines (OpenBLAS 0.3, AVX-512)
# the full product was 22% faster at rank 10 and 13% at rank 64, dsyrk 16% faster at rank 128
# (whole 10M-rating store, one thread; docs/benchmarks_train.md).
CHUNK = 256
GEMM_CHUNK = 64
GEMM_MAX_K1 = 96


def _bind(module: str, name: str, nargs: int):
    """An external function for numba: ``scipy.linalg.cython_<module>.<name>``, every argument a
    pointer (Fortran calling convention, no hidden string lengths in SciPy's wrappers)."""
    symbol = f"dmf_scipy_{name}"
    llvm.add_symbol(symbol, get_cython_function_address(f"scipy.linalg.cython_{module}", name))
    return types.ExternalFunction(symbol, types.void(*([types.voidptr] * nargs)))


_dsyrk = _bind("blas", "dsyrk", 10)
_dgemm = _bind("blas", "dgemm", 13)
_dgemv = _bind("blas", "dgemv", 11)
_dpotrf = _bind("lapack", "dpotrf", 5)
_dpotrs = _bind("lapack", "dpotrs", 8)


@numba.njit(cache=True, nogil=True)
def solve_rows(
    indptr, cols, vals, mu, fixed_bias, aug, lam, lam_b, short_ok, round32, x_out, sse_out, status
):  # pragma: no cover - compiled; exercised through dmf.als.solver.solve_block
    """Solve every row of a CSR block; see the module docstring.

    indptr (n+1,), cols (nnz,) index rows of ``aug`` ((n_other+1, k1): rows [v_j, 1]), vals
    (nnz,) ratings, fixed_bias (n_other,) the c_j, lam and lam_b (n,) the row penalties.
    ``short_ok``: the Woodbury form may be used (every penalty positive). ``round32``: round x
    to float32 before computing the squared error (the stored model's error). Writes x_out
    (n, k1), sse_out (n,) and status (n,): 0 solved, 1 left to the caller (singular).

    Fortran storage: the buffer ``buf`` (C order, one rating per row) is the column-major
    k1 x m matrix M = A^T with leading dimension k1; the Gram matrix ``g`` holds its lower
    triangle in Fortran order, i.e. g[b, a] for a >= b in C indexing (``dgemm`` fills both
    triangles, ``dsyrk`` only that one; only that one is read).
    """
    n = len(indptr) - 1
    k1 = aug.shape[1]
    use_gemm = k1 <= GEMM_MAX_K1
    chunk = GEMM_CHUNK if use_gemm else CHUNK
    cap = max(chunk, k1)  # a Woodbury row (< k1 ratings) fits the buffer whole
    buf = np.empty((cap, k1))
    tbuf = np.empty(cap)
    g = np.empty((k1, k1))
    g0 = np.empty((k1, k1))
    kern = np.empty(k1 * k1)
    rhs = np.empty(k1)
    x = np.empty(k1)
    scale = np.empty(k1)
    # Scalar arguments of the Fortran routines, passed by address.
    chars = np.array([ord("L"), ord("N"), ord("T")], dtype=np.uint8)
    ints = np.zeros(4, dtype=np.int32)  # k1, m, info, 1
    ints[0] = k1
    ints[3] = 1
    dbl = np.array([1.0, 0.0])
    lo_c, n_c, t_c = chars[0:].ctypes, chars[1:].ctypes, chars[2:].ctypes
    k1_p, m_p, info_p, one_i = ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, ints[3:].ctypes
    one_d, zero_d = dbl[0:].ctypes, dbl[1:].ctypes

    for r in range(n):
        lo = indptr[r]
        hi = indptr[r + 1]
        length = hi - lo
        status[r] = 0
        if length == 0:
            x_out[r, :] = 0.0
            sse_out[r] = 0.0
            continue
        if lam[r] == 0.0 and length < k1:
            # No factor penalty and fewer ratings than unknowns: singular by construction (a
            # Cholesky factorisation could still "succeed" on rounding noise).
            status[r] = 1
            continue
        if short_ok and length < k1:
            # Woodbury: K = (A S)(A S)^T + I with S = P^-1/2, K y = t, x = S (A S)^T y.
            for a in range(k1 - 1):
                scale[a] = 1.0 / np.sqrt(lam[r])
            scale[k1 - 1] = 1.0 / np.sqrt(lam_b[r])
            for t in range(length):
                c = cols[lo + t]
                for a in range(k1):
                    buf[t, a] = aug[c, a] * scale[a]
                tbuf[t] = vals[lo + t] - mu - fixed_bias[c]
            ints[1] = length
            # K = M^T M (L x L, leading dimension L): dsyrk('L', 'T', L, k1, 1, M, k1, 0, K, L)
            _dsyrk(lo_c, t_c, m_p, k1_p, one_d, buf.ctypes, k1_p, zero_d, kern.ctypes, m_p)
            for t in range(length):
                kern[t * length + t] += 1.0
            _dpotrf(lo_c, m_p, kern.ctypes, m_p, info_p)
            if ints[2] != 0:
                status[r] = 1
                continue
            _dpotrs(lo_c, m_p, one_i, kern.ctypes, m_p, tbuf.ctypes, m_p, info_p)
            # x = S M y: dgemv('N', k1, L, 1, M, k1, y, 1, 0, x, 1)
            _dgemv(
                n_c, k1_p, m_p, one_d, buf.ctypes, k1_p, tbuf.ctypes, one_i, zero_d, x.ctypes, one_i
            )
            for a in range(k1):
                x[a] *= scale[a]
                if round32:
                    x[a] = np.float64(np.float32(x[a]))
                x_out[r, a] = x[a]
            # Squared error of the (rounded) solution, directly.
            sse = 0.0
            for t in range(length):
                c = cols[lo + t]
                e = vals[lo + t] - mu - fixed_bias[c]
                for a in range(k1):
                    e -= aug[c, a] * x[a]
                sse += e * e
            sse_out[r] = sse
            continue

        # Gram form, accumulated over chunks of the row.
        tt = 0.0
        for s in range(lo, hi, chunk):
            m = min(chunk, hi - s)
            for t in range(m):
                c = cols[s + t]
                for a in range(k1):
                    buf[t, a] = aug[c, a]
                e = vals[s + t] - mu - fixed_bias[c]
                tbuf[t] = e
                tt += e * e
            ints[1] = m
            beta = one_d if s > lo else zero_d
            # G (+)= M M^T (the lower triangle is what counts); rhs (+)= M t.
            if use_gemm:  # dgemm('N', 'T', k1, k1, m, 1, M, k1, M, k1, beta, G, k1)
                _dgemm(
                    n_c,
                    t_c,
                    k1_p,
                    k1_p,
                    m_p,
                    one_d,
                    buf.ctypes,
                    k1_p,
                    buf.ctypes,
                    k1_p,
                    beta,
                    g.ctypes,
                    k1_p,
                )
            else:  # dsyrk('L', 'N', k1, m, 1, M, k1, beta, G, k1)
                _dsyrk(lo_c, n_c, k1_p, m_p, one_d, buf.ctypes, k1_p, beta, g.ctypes, k1_p)
            _dgemv(
                n_c, k1_p, m_p, one_d, buf.ctypes, k1_p, tbuf.ctypes, one_i, beta, rhs.ctypes, one_i
            )
        g0[:, :] = g
        for a in range(k1 - 1):
            g[a, a] += lam[r]
        g[k1 - 1, k1 - 1] += lam_b[r]
        x[:] = rhs
        _dpotrf(lo_c, k1_p, g.ctypes, k1_p, info_p)
        if ints[2] != 0:
            status[r] = 1
            continue
        _dpotrs(lo_c, k1_p, one_i, g.ctypes, k1_p, x.ctypes, k1_p, info_p)
        if round32:
            for a in range(k1):
                x[a] = np.float64(np.float32(x[a]))
        # |t - A x|^2 = t.t - 2 x.(A^T t) + x.(A^T A) x, from the unpenalised lower triangle.
        quad = 0.0
        cross = 0.0
        for b in range(k1):
            cross += x[b] * rhs[b]
            quad += g0[b, b] * x[b] * x[b]
            for a in range(b + 1, k1):
                quad += 2.0 * g0[b, a] * x[a] * x[b]
        x_out[r, :] = x
        sse_out[r] = max(tt - 2.0 * cross + quad, 0.0)


def _readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def solve(indptr, cols, vals, mu, fixed_bias, aug, lam, lam_b, short_ok, round32):
    """:func:`solve_rows` on inputs brought to one canonical set of types, so that one compiled
    specialization per factor dtype serves every caller, and the driver can compile it ahead of
    the workers (:func:`warm_up`): numba compiles anew for each combination of dtypes and of
    writable or read-only arrays (blocks read from Parquet, or received from Dask, are often
    read-only). Casting the ratings to float64 is exact and costs 8 bytes a rating briefly.

    Returns (x (n, k1) float64, squared error (n,) float64, status (n,) int8)."""
    n = len(indptr) - 1
    k1 = aug.shape[1]
    if aug.dtype not in (np.float32, np.float64):
        aug = aug.astype(np.float64)
    x = np.empty((n, k1), dtype=np.float64)
    sse = np.empty(n, dtype=np.float64)
    status = np.empty(n, dtype=np.int8)
    solve_rows(
        _readonly(np.ascontiguousarray(indptr, dtype=np.int64)),
        _readonly(np.ascontiguousarray(cols, dtype=np.int32)),
        _readonly(np.ascontiguousarray(vals, dtype=np.float64)),
        float(mu),
        _readonly(np.ascontiguousarray(fixed_bias, dtype=np.float64)),
        _readonly(np.ascontiguousarray(aug)),
        _readonly(np.ascontiguousarray(lam, dtype=np.float64)),
        _readonly(np.ascontiguousarray(lam_b, dtype=np.float64)),
        bool(short_ok),
        bool(round32),
        x,
        sse,
        status,
    )
    return x, sse, status


def warm_up(factor_dtype, implicit: bool = False) -> None:
    """Compile the kernel for ``factor_dtype`` in this process, or load it from numba's on-disk
    cache. The trainer calls it on the driver before the first half-iteration: a worker then
    loads the cached code (well under a second, ~50 MB) instead of compiling it (~4 s and
    ~70 MB more at its peak, on every worker at once, which a tight memory_limit may not
    allow)."""
    dt = np.dtype(factor_dtype)
    aug = np.array([[1.0, 1.0], [0.0, 0.0]], dtype=dt)  # solve() casts other dtypes to float64
    solve(
        np.array([0, 1]),
        np.array([0]),
        np.array([1.0]),
        0.0,
        np.zeros(1),
        aug,
        np.ones(1),
        np.ones(1),
        True,
        dt == np.float32,
    )
    if implicit:
        from dmf.als.solver import Implicit, ImplicitGram

        for solver in ("cholesky", "cg"):
            solve_implicit(
                np.array([0, 1]), np.array([0]), np.array([1.0]), np.zeros(1), aug, 1,
                ImplicitGram(np.ones((1, 1)), np.zeros(1), 0.0), Implicit(solver=solver),
                np.ones(1), np.ones(1), None, dt == np.float32,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Implicit feedback (Hu, Koren & Volinsky 2008): every cell of the row is fitted
# ---------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _confidence(r, alpha, log_conf, eps):  # pragma: no cover - compiled
    """c = 1 + alpha r, or 1 + alpha log(1 + r / eps); a negative r counts by its size."""
    a = abs(r)
    if log_conf:
        return 1.0 + alpha * np.log1p(a / eps)
    return 1.0 + alpha * a


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _add_sparse_product(ap, vec, aug, cols, wts, lo, length, k, kb, lam, lam_b):  # pragma: no cover
    """ap += P vec + sum over the row's events of (conf - 1) (a.vec) a: the part of a
    conjugate-gradient product that is not gram0's. Reassociation lets LLVM vectorise the two
    k-long loops (dot product, then axpy) per event; the result is still deterministic."""
    for a in range(k):
        ap[a] += (lam if a < kb else lam_b) * vec[a]
    for t in range(length):
        c = cols[lo + t]
        d = 0.0
        for a in range(k):
            d += aug[c, a] * vec[a]
        d *= wts[t]
        for a in range(k):
            ap[a] += d * aug[c, a]


@numba.njit(cache=True, nogil=True)
def solve_rows_implicit(
    indptr,
    cols,
    vals,
    fixed_bias,
    aug,
    k,
    gram0,
    rhs0,
    tt0,
    lam,
    lam_b,
    alpha,
    log_conf,
    eps,
    cg_steps,
    x_prev,
    round32,
    x_out,
    loss_out,
    status,
):  # pragma: no cover - compiled; exercised through dmf.als.solver.solve_block
    """Solve every row of a CSR block of events under the implicit-feedback objective.

    The row's unknowns x are its first ``k`` columns of [u, b] (``k`` = rank without biases,
    rank + 1 with), against the fixed rows a_j = ``aug[j, :k]``; the target of cell j is
    t_j = p_j - c_j (c_j the fixed side's bias, 0 without biases), weighted by the confidence,
    1 at an unobserved cell. With ``gram0`` = sum over ALL fixed rows of a_j a_j^T, ``rhs0`` =
    sum_j t0_j a_j and ``tt0`` = sum_j t0_j^2 (t0_j = -c_j, the target of an unobserved cell),
    the row's normal equations are

        (gram0 + sum_obs (conf - 1) a a^T + P) x = rhs0 + sum_obs (conf t - t0) a

    and its share of the objective (before penalties) is

        sum_all conf (t - a.x)^2 = tt0 + sum_obs (conf t^2 - t0^2) - 2 x.rhs + x^T G x

    with G the unpenalised matrix. ``cg_steps`` 0: Cholesky (exact); else that many
    conjugate-gradient steps from ``x_prev`` (implicit's and Takacs et al.'s scheme), which never
    forms G: each step costs O(length k + k^2). Writes x_out (n, k), loss_out (n,), status (n,):
    0 solved, 1 left to the caller (Cholesky failed).
    """
    n = len(indptr) - 1
    g = np.empty((k, k))
    gp = np.empty((k, k))
    rhs = np.empty(k)
    x = np.empty(k)
    buf = np.empty((GEMM_CHUNK, k))
    longest = 0
    if cg_steps:
        for r in range(n):
            longest = max(longest, indptr[r + 1] - indptr[r])
    wts = np.empty(longest)  # the row's conf - 1 (conjugate gradients)
    res = np.empty(k)
    p = np.empty(k)
    ap = np.empty(k)
    chars = np.array([ord("L"), ord("N"), ord("T")], dtype=np.uint8)
    ints = np.zeros(4, dtype=np.int32)  # k, m, info, 1
    ints[0] = k
    ints[3] = 1
    dbl = np.array([1.0, 0.0])
    lo_c, n_c, t_c = chars[0:].ctypes, chars[1:].ctypes, chars[2:].ctypes
    k_p, m_p, info_p, one_i = ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes, ints[3:].ctypes
    one_d, zero_d = dbl[0:].ctypes, dbl[1:].ctypes
    kb = k - 1 if k == aug.shape[1] else k  # the unknowns with the factor penalty
    for r in range(n):
        lo = indptr[r]
        hi = indptr[r + 1]
        status[r] = 0
        if hi == lo and kb == k:
            # No events and no bias: rhs0 = 0, so x = 0 and the row's cells cost nothing.
            for a in range(k):
                x_out[r, a] = 0.0
            loss_out[r] = 0.0
            continue
        # rhs and the constant term, over the observed cells.
        tt = tt0
        for a in range(k):
            rhs[a] = rhs0[a]
        for s in range(lo, hi):
            c = cols[s]
            v = vals[s]
            conf = _confidence(v, alpha, log_conf, eps)
            pref = 1.0 if v > 0 else 0.0
            cb = fixed_bias[c] if k == aug.shape[1] else 0.0
            t = pref - cb
            coef = conf * t + cb
            tt += conf * t * t - cb * cb
            for a in range(k):
                rhs[a] += coef * aug[c, a]
        if cg_steps == 0:
            # G = gram0 + sum_obs (conf - 1) a a^T: full dgemm on chunks of sqrt(conf - 1) a.
            g[:, :] = gram0
            for s in range(lo, hi, GEMM_CHUNK):
                m = min(GEMM_CHUNK, hi - s)
                for t in range(m):
                    c = cols[s + t]
                    w = np.sqrt(_confidence(vals[s + t], alpha, log_conf, eps) - 1.0)
                    for a in range(k):
                        buf[t, a] = w * aug[c, a]
                ints[1] = m
                _dgemm(
                    n_c, t_c, k_p, k_p, m_p, one_d, buf.ctypes, k_p, buf.ctypes, k_p, one_d,
                    g.ctypes, k_p,
                )  # fmt: skip
            # Factor a penalised copy; g stays unpenalised for the objective.
            gp[:, :] = g
            for a in range(kb):
                gp[a, a] += lam[r]
            if kb < k:
                gp[k - 1, k - 1] += lam_b[r]
            x[:] = rhs
            _dpotrf(lo_c, k_p, gp.ctypes, k_p, info_p)
            if ints[2] != 0:
                status[r] = 1
                continue
            _dpotrs(lo_c, k_p, one_i, gp.ctypes, k_p, x.ctypes, k_p, info_p)
            if round32:
                for a in range(k):
                    x[a] = np.float64(np.float32(x[a]))
            # x^T G x from the lower triangle (g[b, a], a >= b, in C indexing; dgemm fills both).
            quad = 0.0
            for b in range(k):
                quad += g[b, b] * x[b] * x[b]
                for a in range(b + 1, k):
                    quad += 2.0 * g[b, a] * x[a] * x[b]
        else:
            # Conjugate gradients on (G + P) x = rhs from the previous x; A v computed as
            # (gram0 + P) v + sum_obs (conf - 1) (a.v) a, gram0 v by BLAS (dgemv: gram0 is
            # symmetric, so its C order is its Fortran order).
            length = hi - lo
            for t in range(length):
                wts[t] = _confidence(vals[lo + t], alpha, log_conf, eps) - 1.0
            for a in range(k):
                x[a] = x_prev[r, a]
            rs = 0.0
            for step in range(cg_steps + 1):
                # step 0: ap = A x (then res = rhs - ap); later: ap = A p.
                vec = x if step == 0 else p
                _dgemv(
                    n_c, k_p, k_p, one_d, gram0.ctypes, k_p, vec.ctypes, one_i, zero_d,
                    ap.ctypes, one_i,
                )  # fmt: skip
                _add_sparse_product(ap, vec, aug, cols, wts, lo, length, k, kb, lam[r], lam_b[r])
                if step == 0:
                    rs = 0.0
                    for a in range(k):
                        res[a] = rhs[a] - ap[a]
                        p[a] = res[a]
                        rs += res[a] * res[a]
                    if rs < 1e-20:
                        break
                    continue
                pap = 0.0
                for a in range(k):
                    pap += p[a] * ap[a]
                if pap <= 0.0:
                    break
                step_len = rs / pap
                rs_new = 0.0
                for a in range(k):
                    x[a] += step_len * p[a]
                    res[a] -= step_len * ap[a]
                    rs_new += res[a] * res[a]
                if rs_new < 1e-20:
                    break
                beta = rs_new / rs
                for a in range(k):
                    p[a] = res[a] + beta * p[a]
                rs = rs_new
            # x^T G x without one more product: CG carries res = rhs - (G + P) x, so
            # G x = rhs - res - P x. Rounding x to float32 (x + d) adds 2 d.(G x) + d^T G d;
            # |d| <= 2^-24 |x|, so the second term is below 1e-14 of x^T G x and left out.
            quad = 0.0
            for a in range(k):
                gx = rhs[a] - res[a] - (lam[r] if a < kb else lam_b[r]) * x[a]
                if round32:
                    xr = np.float64(np.float32(x[a]))
                    quad += (x[a] + 2.0 * (xr - x[a])) * gx
                    x[a] = xr
                else:
                    quad += x[a] * gx
        cross = 0.0
        for a in range(k):
            cross += x[a] * rhs[a]
            x_out[r, a] = x[a]
        loss_out[r] = max(tt - 2.0 * cross + quad, 0.0)


def solve_implicit(indptr, cols, vals, fixed_bias, aug, k, gram, imp, lam, lam_b, x_prev, round32):
    """:func:`solve_rows_implicit` on canonical types (see :func:`solve`). ``gram`` is the fixed
    side's :class:`dmf.als.solver.ImplicitGram`, ``imp`` the :class:`dmf.als.solver.Implicit`
    settings. Returns (x (n, k) float64, loss (n,) float64, status (n,) int8)."""
    n = len(indptr) - 1
    if aug.dtype not in (np.float32, np.float64):
        aug = aug.astype(np.float64)
    x = np.empty((n, k), dtype=np.float64)
    loss = np.empty(n, dtype=np.float64)
    status = np.empty(n, dtype=np.int8)
    steps = imp.cg_steps if imp.solver == "cg" else 0
    if x_prev is None or not steps:
        x_prev = np.zeros((n if steps else 0, k))
    solve_rows_implicit(
        _readonly(np.ascontiguousarray(indptr, dtype=np.int64)),
        _readonly(np.ascontiguousarray(cols, dtype=np.int32)),
        _readonly(np.ascontiguousarray(vals, dtype=np.float64)),
        _readonly(np.ascontiguousarray(fixed_bias, dtype=np.float64)),
        _readonly(np.ascontiguousarray(aug)),
        int(k),
        _readonly(np.ascontiguousarray(gram.gram, dtype=np.float64)),
        _readonly(np.ascontiguousarray(gram.rhs, dtype=np.float64)),
        float(gram.tt),
        _readonly(np.ascontiguousarray(lam, dtype=np.float64)),
        _readonly(np.ascontiguousarray(lam_b, dtype=np.float64)),
        float(imp.alpha),
        imp.confidence == "log",
        float(imp.eps),
        int(steps),
        _readonly(np.ascontiguousarray(x_prev, dtype=np.float64)),
        bool(round32),
        x,
        loss,
        status,
    )
    return x, loss, status
