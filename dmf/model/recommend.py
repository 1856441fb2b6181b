"""Top-N recommendation: for a few users on the driver, or for everyone, blockwise on Dask.

Three layers, as in training:

- the maths on arrays (:class:`ItemScorer`, :func:`top_n`, :func:`recommend_rows`): score a tile
  of users against every item, mask the items each user rated in train, keep the best N with a
  partial selection (``np.argpartition``), never a full sort and never more than one tile of
  users x items in memory;
- the function run on a worker per user block (:func:`recommend_block_task`): it reads the
  block's train ratings from the store (``by_user/block=NNNNN``) for the seen items, runs the
  maths, and writes its part of the output Parquet (or returns it);
- orchestration (:func:`recommend_all`): item factors and biases broadcast once, one task per
  user block, the parts combined atomically at the end.

Output rows are ``(user, rank, item, score)``: raw user id, rank 1..N, raw item id, predicted
rating. A user with fewer than N unseen items gets fewer rows.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmf.errors import InputError, ModelError

if TYPE_CHECKING:
    from dmf.model.model import Model
    from dmf.store.layout import Store

# Bound on the float32 score tile (users x items) of one task; 64 MiB is 160 users at 100k items.
DEFAULT_TILE_BYTES = 64 * 2**20
# Users per task when there is no store to take the blocks from.
_CHUNK_USERS = 100_000

RECS_SCHEMA_FIELDS = ("user", "rank", "item", "score")


# ---------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------
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


def score_tile(
    user_factors: np.ndarray,
    user_bias: np.ndarray,
    item_factors: np.ndarray,
    item_bias: np.ndarray,
    mu: float,
) -> np.ndarray:
    """Predicted ratings of a tile of users for every item (see :class:`ItemScorer`).

    Parameters
    ----------
    user_factors : ndarray, shape (m, rank)
    user_bias : ndarray, shape (m,)
    item_factors : ndarray, shape (n_items, rank)
    item_bias : ndarray, shape (n_items,)

    Returns
    -------
    ndarray, shape (m, n_items), float32: mu + b_i + c_j + u_i . v_j.
    """
    return ItemScorer(item_factors, item_bias, mu)(user_factors, user_bias)


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
        Optional bool mask, shape (n_items,): items that may be recommended at all.

    Returns
    -------
    (row, rank, item, score): flat arrays of equal length, sorted by row then rank; ``row`` indexes
    the m users, ``rank`` counts from 1, ``item`` is an item index.
    """
    m = len(user_bias)
    n_items = len(item_bias)
    if tile_users is None:
        tile_users = default_tile_users(n_items)
    tile_users = max(1, int(tile_users))
    seen = seen if seen is not None else SeenItems.none(m)
    scorer = ItemScorer(item_factors, item_bias, mu)
    buf = np.empty((min(tile_users, m), n_items), dtype=np.float32)  # one tile, reused
    out_row, out_rank, out_item, out_score = [], [], [], []
    for a in range(0, m, tile_users):
        b = min(m, a + tile_users)
        s = scorer(user_factors[a:b], user_bias[a:b], out=buf[: b - a])
        if allowed_items is not None:
            s[:, ~allowed_items] = -np.inf
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
    return (
        np.concatenate(out_row).astype(np.int64),
        np.concatenate(out_rank).astype(np.int32),
        np.concatenate(out_item).astype(np.int64),
        np.concatenate(out_score).astype(np.float32),
    )


def default_tile_users(n_items: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Users per score tile so that a tile (users x items, float32, and its negation for the
    partial selection) stays within ``tile_bytes``."""
    return max(1, tile_bytes // max(1, 8 * n_items))


def recs_table(
    user_ids: pa.Array, rank: np.ndarray, item_ids: pa.Array, score: np.ndarray
) -> pa.Table:
    """The output table: raw user id, rank (int32), raw item id, score (float32)."""
    return pa.table(
        {
            "user": user_ids,
            "rank": pa.array(rank, type=pa.int32()),
            "item": item_ids,
            "score": pa.array(score, type=pa.float32()),
        }
    )


# ---------------------------------------------------------------------------------------------
# What runs on a worker
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemSide:
    """Everything about the items a task needs: broadcast to every worker once."""

    factors: np.ndarray  # (n_items, rank)
    bias: np.ndarray  # (n_items,)
    ids: pa.Array  # (n_items,) raw ids
    mu: float


@dataclass(frozen=True)
class UserPart:
    """The users of one task: their rows in the model, and where their seen items are."""

    factors: np.ndarray  # (m, rank)
    bias: np.ndarray  # (m,)
    ids: pa.Array  # (m,) raw ids
    # Train ratings of these users: the store block (path, start, stop) and each user's row in
    # it (-1: no train ratings there, e.g. a user the store does not have). None: exclude nothing.
    block: tuple[str, int, int] | None = None
    rows_in_block: np.ndarray | None = None  # (m,)


def _seen_for_part(part: UserPart, item_map: np.ndarray | None) -> SeenItems:
    from dmf.store.layout import read_block_file

    m = len(part.bias)
    if part.block is None:
        return SeenItems.none(m)
    path, start, stop = part.block
    blk = read_block_file(path, "user", start, stop)
    rows = part.rows_in_block
    has = rows >= 0
    rep, cols, _ = csr_rows(blk.indptr, blk.cols, rows[has])
    rep = np.flatnonzero(has)[rep]
    if item_map is not None:
        # Store item index -> model item index (-1: an item the model does not know).
        cols = item_map[cols]
        keep = cols >= 0
        rep, cols = rep[keep], cols[keep]
    # rep is sorted (rows in order, entries of a row contiguous), so this is CSR already.
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(rep, minlength=m), out=indptr[1:])
    return SeenItems(indptr, cols.astype(np.int64))


def recommend_block_task(
    part: UserPart,
    items: ItemSide,
    n: int,
    tile_users: int | None,
    out_file: str | None,
    item_map: np.ndarray | None = None,
) -> pa.Table | dict[str, Any]:
    """Top-N for one block of users (runs on a worker; its name shows on the dashboard).

    Returns the block's table, or writes it to ``out_file`` and returns ``{"rows": ...}``.
    """
    from dmf.dist.cluster import blas_single_thread

    seen = _seen_for_part(part, item_map)
    with blas_single_thread():
        row, rank, item, score = recommend_rows(
            part.factors, part.bias, items.factors, items.bias, items.mu, n, seen, tile_users
        )
    table = recs_table(part.ids.take(pa.array(row)), rank, items.ids.take(pa.array(item)), score)
    if out_file is None:
        return table
    pq.write_table(table, out_file, compression="zstd")
    return {"rows": len(table), "file": out_file}


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def _store_index_maps(model: Model, store: Store) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Model user index -> store user index, and store item index -> model item index.

    ``None`` where the two index spaces are the same (the model was trained on this store).
    """
    from dmf.model.model import lookup_ids

    same = (
        model.store_fingerprint
        and model.store_fingerprint == store.fingerprint
        and model.n_users == store.n_users
        and model.n_items == store.n_items
    )
    if same:
        return None, None
    user_to_store = lookup_ids(model.user_ids, store.ids("user"))
    item_to_model = lookup_ids(store.ids("item"), model.item_ids)
    return user_to_store, item_to_model


def _parts(
    model: Model,
    user_idx: np.ndarray,
    store: Store | None,
) -> list[UserPart]:
    """Split the model users ``user_idx`` (sorted) into one part per store user block."""
    if store is None:
        return [
            UserPart(
                model.user_factors[sel],
                model.user_bias[sel],
                model.user_ids.take(pa.array(sel)),
            )
            for sel in (
                user_idx[a : a + _CHUNK_USERS] for a in range(0, len(user_idx), _CHUNK_USERS)
            )
        ]
    user_to_store, _ = _store_index_maps(model, store)
    sidx = user_idx if user_to_store is None else user_to_store[user_idx]
    bounds = store.bounds("user")
    n_blocks = len(bounds) - 1
    # Users the store does not have go with block 0, with no seen items.
    blk = np.where(sidx >= 0, np.searchsorted(bounds, sidx, side="right") - 1, 0)
    blk = np.clip(blk, 0, max(n_blocks - 1, 0))
    order = np.argsort(blk, kind="stable")
    user_idx, sidx, blk = user_idx[order], sidx[order], blk[order]
    cuts = np.searchsorted(blk, np.arange(n_blocks + 1))
    parts = []
    for b in range(n_blocks):
        lo, hi = cuts[b], cuts[b + 1]
        if lo == hi:
            continue
        sel = user_idx[lo:hi]
        rows = np.where(sidx[lo:hi] >= 0, sidx[lo:hi] - bounds[b], -1)
        parts.append(
            UserPart(
                model.user_factors[sel],
                model.user_bias[sel],
                model.user_ids.take(pa.array(sel)),
                (str(store.block_path("user", b)), int(bounds[b]), int(bounds[b + 1])),
                rows.astype(np.int64),
            )
        )
    return parts


def _split_part(part: UserPart, size: int) -> list[UserPart]:
    m = len(part.bias)
    if m <= size:
        return [part]
    return [
        UserPart(
            part.factors[a : a + size],
            part.bias[a : a + size],
            part.ids.slice(a, size),
            part.block,
            None if part.rows_in_block is None else part.rows_in_block[a : a + size],
        )
        for a in range(0, m, size)
    ]


def recommend_all(
    model: Model,
    store: Store | str | Path | None,
    n: int = 10,
    users: Sequence[Any] | pa.Array | np.ndarray | None = None,
    client=None,
    out: str | Path | None = None,
    tile_users: int | None = None,
    cold_start: str = "fallback",
) -> pa.Table | Path:
    """Top-``n`` items for every user (or for ``users``), excluding items each rated in train.

    Parameters
    ----------
    model
        The trained model.
    store
        The store the model was trained on (or its path): each user's train items are read from
        its ``by_user`` blocks, one task per block. ``None``: exclude nothing.
    n
        Recommendations per user.
    users
        Raw user ids, shape (n_users_wanted,); default all of the model's users. Unknown users
        get the cold-start fallback (items ranked by mu + c_j) or, with ``cold_start="drop"``, no
        rows.
    client
        A ``distributed.Client``: one task per user block, item side broadcast once. ``None``: the
        same tasks run in a local loop.
    out
        ``None``: return a :class:`pyarrow.Table`. A path ending in ``.parquet``: one Parquet
        file. Any other path: a directory of Parquet parts. Written atomically (temp + rename).
    tile_users
        Users scored at once per task; the tile is ``tile_users x n_items`` float32.

    Returns
    -------
    pyarrow.Table with columns (user, rank, item, score), ``n`` rows per user (fewer if the user
    has fewer unseen items), ordered by user as given (all users: by block), then rank; or the
    path written.
    """
    from dmf.model.model import check_cold_start, lookup_ids

    check_cold_start(cold_start)
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    if store is not None and not hasattr(store, "read_block"):
        from dmf.store.layout import Store

        store = Store.open(store)
    cold_ids = None
    if users is None:
        user_idx = np.arange(model.n_users, dtype=np.int64)
        wanted = None
    else:
        wanted = model.as_ids(users, "user")
        idx = lookup_ids(wanted, model.user_ids)
        user_idx = np.unique(idx[idx >= 0])
        if cold_start == "fallback" and np.any(idx < 0):
            cold_ids = pc_unique(wanted.filter(pa.array(idx < 0)))

    _, item_map = _store_index_maps(model, store) if store is not None else (None, None)
    items = ItemSide(model.item_factors, model.item_bias, model.item_ids, model.mu)
    parts = _parts(model, user_idx, store)
    if client is not None:
        # Fewer blocks than threads would leave workers idle: split blocks into more tasks
        # (each reads its block's file; reading is cheap next to scoring).
        n_threads = sum(client.nthreads().values()) or 1
        if len(parts) < 2 * n_threads:
            size = max(1, -(-len(user_idx) // (2 * n_threads)))
            parts = [q for p in parts for q in _split_part(p, size)]

    out_path = Path(out) if out is not None else None
    tmp_dir = None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp_dir.mkdir()
    try:
        files = [
            None if tmp_dir is None else str(tmp_dir / f"part-{k:05d}.parquet")
            for k in range(len(parts))
        ]
        if client is not None and parts:
            [items_f] = client.scatter([items], broadcast=True, hash=False)
            map_f = None
            if item_map is not None:
                [map_f] = client.scatter([item_map], broadcast=True, hash=False)
            results = run_windowed(
                client,
                recommend_block_task,
                len(parts),
                lambda k: (parts[k], (items_f, n, tile_users, files[k], map_f)),
                "recommend-block",
            )
        else:
            results = [
                recommend_block_task(p, items, n, tile_users, f, item_map)
                for p, f in zip(parts, files, strict=True)
            ]
        cold_table = None
        if cold_ids is not None and len(cold_ids):
            cold_table = _cold_recs(model, cold_ids, n, tile_users)
            if tmp_dir is not None:
                f = str(tmp_dir / f"part-{len(parts):05d}.parquet")
                pq.write_table(cold_table, f, compression="zstd")
                files.append(f)
        if out_path is None:
            tables = list(results) + ([cold_table] if cold_table is not None else [])
            table = _concat(tables, model)
            if wanted is not None:
                # Order as the caller listed the users.
                first = pc_unique(wanted)
                pos = lookup_ids(table.column("user").combine_chunks(), first)
                order = np.lexsort((table.column("rank").to_numpy(), pos))
                table = table.take(pa.array(order))
            return table
        return _finish(tmp_dir, out_path, files, model)
    finally:
        if tmp_dir is not None and tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def run_windowed(
    client, fn, n_tasks: int, make_args, name: str, window: int | None = None
) -> list[Any]:
    """``fn(*args_k)`` for k in range(n_tasks) on the cluster, results in task order.

    ``make_args(k)`` returns ``(own, rest)``: ``own`` is the task's own data (its users'
    factors), scattered just before the task is submitted; ``rest`` are passed as they are
    (small values, or futures of data broadcast once). At most ``window`` tasks (default twice
    the cluster's threads) are in flight, so workers and the driver hold a window's worth of
    task data at a time, whatever the number of users. Task keys read ``name-NNNNN-xxxxxx``
    on the dashboard.
    """
    from distributed import as_completed

    window = window or 2 * max(1, sum(client.nthreads().values()))
    results: list[Any] = [None] * n_tasks
    index: dict[str, int] = {}

    def submit(k: int):
        own, rest = make_args(k)
        [own_f] = client.scatter([own], hash=False)
        fut = client.submit(
            fn, own_f, *rest, key=f"{name}-{k:05d}-{uuid.uuid4().hex[:6]}", pure=False
        )
        index[fut.key] = k
        return fut

    first = min(window, n_tasks)
    done = as_completed([submit(k) for k in range(first)])
    nxt = first
    for fut in done:
        results[index.pop(fut.key)] = fut.result()
        if nxt < n_tasks:
            done.add(submit(nxt))
            nxt += 1
    return results


def _cold_recs(model: Model, cold_ids: pa.Array, n: int, tile_users: int | None) -> pa.Table:
    """Fallback recommendations for users the model does not know: ranked by mu + c_j."""
    rank0 = np.zeros((1, model.rank), dtype=model.item_factors.dtype)
    _, rank, item, score = recommend_rows(
        rank0, np.zeros(1), model.item_factors, model.item_bias, model.mu, n, None, tile_users
    )
    m = len(cold_ids)
    k = len(item)
    return recs_table(
        cold_ids.take(pa.array(np.repeat(np.arange(m), k))),
        np.tile(rank, m),
        model.item_ids.take(pa.array(np.tile(item, m))),
        np.tile(score, m),
    )


def pc_unique(a: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.unique(a)


def _empty(model: Model) -> pa.Table:
    return recs_table(
        pa.array([], type=model.user_ids.type),
        np.zeros(0, dtype=np.int32),
        pa.array([], type=model.item_ids.type),
        np.zeros(0, dtype=np.float32),
    )


def _concat(tables: list[pa.Table], model: Model) -> pa.Table:
    tables = [t for t in tables if t is not None]
    if not tables:
        return _empty(model)
    return pa.concat_tables(tables).combine_chunks()


def _finish(tmp_dir: Path, out_path: Path, files: list[str | None], model: Model) -> Path:
    """Move the parts into place atomically: one file (streamed together) or a directory."""
    files = [f for f in files if f is not None and os.path.exists(f)]
    if out_path.suffix == ".parquet":
        tmp_file = tmp_dir / "combined.parquet"
        schema = _empty(model).schema
        with pq.ParquetWriter(tmp_file, schema, compression="zstd") as w:
            for f in files:
                # Row group by row group: memory stays at one part's row group.
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    w.write_table(pf.read_row_group(g).cast(schema))
        if out_path.is_dir():
            raise ModelError(f"output {out_path} is a directory; give a .parquet file name")
        os.replace(tmp_file, out_path)
        return out_path
    if not files:
        pq.write_table(_empty(model), tmp_dir / "part-00000.parquet")
    if out_path.exists():
        old = out_path.parent / f".{out_path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_path, old)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    os.replace(tmp_dir, out_path)
    return out_path
