"""The maths of top-N on arrays: score a tile of users against every item, mask what may not be
recommended, keep the best N by partial selection.

Shared by recommendation (:mod:`dmf.model.recommend`), evaluation (:mod:`dmf.model.evaluate`),
fold-in and similar items. No Dask, no files: arrays in, arrays out. Never more than one tile of
users x items in memory, and never a full sort of a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Bound on the float32 score tile (users x items) of one task; 64 MiB is 160 users at 100k items.
DEFAULT_TILE_BYTES = 64 * 2**20


class ItemScorer:
    """Scores of users against every item in one GEMM, biases included.

    With u' = [u_i, b_i + mu, 1] and v' = [v_j, 1, c_j], u' . v' = mu + b_i + c_j + u_i . v_j,
    so a tile of scores is a single float32 matrix product (rank + 2 inner dimension) with no
    further passes over the tile. The item side (rank + 2, n_items) is laid out once per task.

    Parameters
    ----------
    item_factors : ndarray, shape (n_items, rank)
    item_bias : ndarray, shape (n_items,)
    mu : float
    """

    def __init__(self, item_factors: np.ndarray, item_bias: np.ndarray, mu: float):
        rank = item_factors.shape[1]
        self.rank = rank
        self.n_items = len(item_bias)
        self.mu = float(mu)
        vt = np.empty((rank + 2, self.n_items), dtype=np.float32)
        vt[:rank] = item_factors.T
        vt[rank] = 1.0
        vt[rank + 1] = item_bias
        self.vt = vt

    def __call__(
        self, user_factors: np.ndarray, user_bias: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Scores of shape (m, n_items), float32, for user factors (m, rank) and biases (m,);
        ``out`` (m, n_items) float32 C-contiguous is reused if given."""
        m = len(user_bias)
        ua = np.empty((m, self.rank + 2), dtype=np.float32)
        ua[:, : self.rank] = user_factors
        ua[:, self.rank] = user_bias.astype(np.float64) + self.mu
        ua[:, self.rank + 1] = 1.0
        return np.matmul(ua, self.vt, out=out)


def top_n(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best columns of each row, best first, ties broken by the lower column index.

    A partial selection, never a sort of a whole row. Wide rows: the columns are split into
    nb = n_cols // ``_SEL_GROUP`` groups of ``_SEL_GROUP`` columns (column j in group j % nb,
    so every group's maximum comes from one contiguous, vectorised pass over the tile); the k
    best entries all lie in the k groups with the largest maxima (a group whose maximum is
    below the k-th largest maximum holds no entry above k others), so only those k groups'
    columns (k * ``_SEL_GROUP`` per row) are gathered and selected from. This is about ten
    times faster than ``np.argpartition`` of every row. Rows where that does not hold exactly
    (ties between group maxima at the cut, or fewer than k groups with an allowed column) and
    narrow tiles take the exact selection over the whole row.

    Parameters
    ----------
    scores : ndarray, shape (m, n_cols); ``-inf`` marks a column that may not be chosen.
    n : int

    Returns
    -------
    (cols, vals): ndarrays of shape (m, min(n, n_cols)); entries whose value is ``-inf`` are not
    real choices (the row had fewer than ``n`` allowed columns) and must be dropped by the caller.
    """
    m, n_cols = scores.shape
    k = min(n, n_cols)
    if k == 0 or m == 0:
        return np.zeros((m, 0), dtype=np.int64), np.zeros((m, 0), dtype=scores.dtype)
    nb = n_cols // _SEL_GROUP
    if nb < 4 * k:
        return _select(scores, k)
    gmax = scores[:, : nb * _SEL_GROUP].reshape(m, _SEL_GROUP, nb).max(axis=1)  # (m, nb)
    groups = np.argpartition(-gmax, k - 1, axis=1)[:, :k]  # (m, k)
    t = np.take_along_axis(gmax, groups, axis=1).min(axis=1)
    exact = np.isfinite(t) & ((gmax >= t[:, None]).sum(axis=1) == k)
    cols = np.empty((m, k), dtype=np.int64)
    vals = np.empty((m, k), dtype=scores.dtype)
    good = np.flatnonzero(exact)
    if len(good):
        cand = (groups[good][:, :, None] + nb * np.arange(_SEL_GROUP)).reshape(len(good), -1)
        if n_cols > nb * _SEL_GROUP:  # the last n_cols % nb columns belong to no group
            tail = np.arange(nb * _SEL_GROUP, n_cols)
            cand = np.concatenate([cand, np.broadcast_to(tail, (len(good), len(tail)))], axis=1)
        cols[good], vals[good] = _select(scores[good[:, None], cand], k, cand)
    bad = np.flatnonzero(~exact)
    if len(bad):
        cols[bad], vals[bad] = _select(scores[bad], k)
    return cols, vals


# Columns per group of the group-maximum selection (see top_n).
_SEL_GROUP = 128


def _select(
    vals: np.ndarray, k: int, col_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` of each row of ``vals`` (m, c): the k-th largest value t from
    ``np.partition``, then a sort of only the entries >= t. ``col_ids`` (m, c) gives each
    entry's column (default its position); ties are broken by the lower column."""
    m, c = vals.shape
    t = np.partition(vals, c - k, axis=1)[:, c - k]
    flat = np.flatnonzero(vals >= t[:, None])  # far faster than a 2-D nonzero
    rows, pos = np.divmod(flat, c)
    cv = vals[rows, pos]
    cc = pos if col_ids is None else col_ids[rows, pos]
    order = np.lexsort((cc, -cv, rows))  # by row, then score descending, then column
    rows, cc, cv = rows[order], cc[order], cv[order]
    starts = np.searchsorted(rows, np.arange(m))
    keep = (np.arange(len(rows)) - starts[rows]) < k  # every row has at least k entries >= t
    return cc[keep].reshape(m, k).astype(np.int64), cv[keep].reshape(m, k)


def top_n_reference(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain way, kept beside :func:`top_n` for tests and benchmarks: ``np.argpartition`` of
    every row, then a sort of the survivors. Same result as :func:`top_n` except that ties at
    the cut are broken arbitrarily."""
    m, n_cols = scores.shape
    k = min(n, n_cols)
    if k < n_cols:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n_cols), (m, n_cols))
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def csr_rows(indptr: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Gather the entries of ``rows`` of a CSR matrix, vectorised.

    Returns (row position in ``rows`` (nnz_sel,), column (nnz_sel,), entry position (nnz_sel,)).
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    total = int(counts.sum())
    rep = np.repeat(np.arange(len(rows)), counts)
    offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.repeat(starts, counts) + offs
    return rep, cols[pos], pos


@dataclass
class SeenItems:
    """Items each of ``m`` users may not be recommended, as CSR over those users.

    indptr : ndarray, shape (m + 1,); cols : ndarray, shape (nnz,) of item indices.
    """

    indptr: np.ndarray
    cols: np.ndarray

    @classmethod
    def none(cls, m: int) -> SeenItems:
        return cls(np.zeros(m + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def restrict(self, cand: np.ndarray) -> SeenItems:
        """The same sets over the columns ``cand`` (sorted item indices) only, each item given
        as its position in ``cand``; items outside ``cand`` are left out."""
        m = len(self.indptr) - 1
        pos = np.searchsorted(cand, self.cols)
        ok = pos < len(cand)
        ok[ok] = cand[pos[ok]] == self.cols[ok]
        row = np.repeat(np.arange(m), np.diff(self.indptr))[ok]
        indptr = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=m), out=indptr[1:])
        return SeenItems(indptr, pos[ok].astype(np.int64))


def candidate_columns(allowed: np.ndarray | None, n_cols: int) -> tuple[np.ndarray | None, ...]:
    """How to honour an ``allowed`` mask (n_cols,) of columns: (cand, blocked).

    Few candidates (at most half the columns): ``cand``, their sorted indices, to score only
    those columns (a narrower GEMM). Otherwise ``blocked``, the indices of the columns to set to
    -inf in every tile. ``(None, None)`` without a mask.
    """
    if allowed is None:
        return None, None
    allowed = np.asarray(allowed, dtype=bool)
    if len(allowed) != n_cols:
        raise ValueError(f"allowed mask has {len(allowed)} entries for {n_cols} columns")
    cand = np.flatnonzero(allowed)
    if 2 * len(cand) <= n_cols:
        return cand, None
    return None, np.flatnonzero(~allowed)


def recommend_rows(
    user_factors: np.ndarray,
    user_bias: np.ndarray,
    item_factors: np.ndarray,
    item_bias: np.ndarray,
    mu: float,
    n: int,
    seen: SeenItems | None = None,
    tile_users: int | None = None,
    allowed_items: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top ``n`` items for each of ``m`` users, tile by tile.

    Parameters
    ----------
    user_factors : ndarray, shape (m, rank); user_bias : ndarray, shape (m,)
    item_factors : ndarray, shape (n_items, rank); item_bias : ndarray, shape (n_items,)
    seen
        Items to exclude per user (CSR over the m users), e.g. their train ratings.
    tile_users
        Users scored at once; the score tile is ``tile_users x n_items`` float32. Default: as many
        as fit in :data:`DEFAULT_TILE_BYTES`.
    allowed_items
        Optional bool mask, shape (n_items,): items that may be recommended at all (the same for
        every user). When at most half the items are allowed, only those are scored; otherwise
        the others are masked in each tile. Either way no Python loop over users.

    Returns
    -------
    (row, rank, item, score): flat arrays of equal length, sorted by row then rank; ``row`` indexes
    the m users, ``rank`` counts from 1, ``item`` is an item index.
    """
    m = len(user_bias)
    seen = seen if seen is not None else SeenItems.none(m)
    cand, blocked = candidate_columns(allowed_items, len(item_bias))
    if cand is not None:
        # Columns in the order of the items, so ties still go to the lower item index.
        item_factors, item_bias, seen = item_factors[cand], item_bias[cand], seen.restrict(cand)
    n_items = len(item_bias)
    if tile_users is None:
        tile_users = default_tile_users(n_items)
    tile_users = max(1, int(tile_users))
    scorer = ItemScorer(item_factors, item_bias, mu)
    buf = np.empty((min(tile_users, m), n_items), dtype=np.float32)  # one tile, reused
    out_row, out_rank, out_item, out_score = [], [], [], []
    for a in range(0, m, tile_users):
        b = min(m, a + tile_users)
        s = scorer(user_factors[a:b], user_bias[a:b], out=buf[: b - a])
        if blocked is not None:
            s[:, blocked] = -np.inf
        rep, cols, _ = csr_rows(seen.indptr, seen.cols, np.arange(a, b))
        s[rep, cols] = -np.inf
        cols_top, vals = top_n(s, n)
        ok = np.isfinite(vals)
        ranks = np.broadcast_to(np.arange(1, cols_top.shape[1] + 1), cols_top.shape)
        rows = np.broadcast_to(np.arange(a, b)[:, None], cols_top.shape)
        out_row.append(rows[ok])
        out_rank.append(ranks[ok])
        out_item.append(cols_top[ok])
        out_score.append(vals[ok])
    if not out_row:
        z = np.zeros(0, dtype=np.int64)
        return z, z.astype(np.int32), z, np.zeros(0, dtype=np.float32)
    item = np.concatenate(out_item).astype(np.int64)
    return (
        np.concatenate(out_row).astype(np.int64),
        np.concatenate(out_rank).astype(np.int32),
        item if cand is None else cand[item],
        np.concatenate(out_score).astype(np.float32),
    )


class RunningTop:
    """The best ``k`` columns of each of ``m`` rows, over column ranges seen one at a time
    (blocks of a side streamed from disk): each range's top ``k`` is merged into the best so
    far, so memory is ``m x k`` whatever the number of columns. Ties go to the lower column, as
    in :func:`top_n`, so the result does not depend on how the columns were cut.
    """

    def __init__(self, m: int, k: int):
        self.k = k
        self.cols = np.zeros((m, 0), dtype=np.int64)
        self.vals = np.zeros((m, 0), dtype=np.float32)

    def add(self, scores: np.ndarray, offset: int = 0) -> None:
        """Merge a tile of scores (m, c) of columns ``offset .. offset + c - 1`` (-inf: may not
        be chosen)."""
        cols, vals = top_n(scores, self.k)
        self.merge(cols + offset, vals)

    def merge(self, cols: np.ndarray, vals: np.ndarray) -> None:
        """Merge candidates (m, c) given with their column indices (another RunningTop's)."""
        cols = np.concatenate([self.cols, cols], axis=1)
        vals = np.concatenate([self.vals, vals.astype(np.float32, copy=False)], axis=1)
        k = min(self.k, cols.shape[1])
        if k == 0 or len(cols) == 0:
            self.cols, self.vals = cols[:, :k], vals[:, :k]
            return
        self.cols, self.vals = _select(vals, k, cols)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row, rank, col, score) of the finite entries, sorted by row then rank."""
        ok = np.isfinite(self.vals)
        ranks = np.broadcast_to(np.arange(1, self.cols.shape[1] + 1), self.cols.shape)
        rows = np.broadcast_to(np.arange(len(self.cols))[:, None], self.cols.shape)
        return (
            rows[ok].astype(np.int64),
            ranks[ok].astype(np.int32),
            self.cols[ok].astype(np.int64),
            self.vals[ok].astype(np.float32),
        )


def default_tile_users(n_items: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Users per score tile so that a tile (users x items, float32, and its negation for the
    partial selection) stays within ``tile_bytes``."""
    return max(1, tile_bytes // max(1, 8 * n_items))
