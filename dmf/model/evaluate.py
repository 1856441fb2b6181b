"""Evaluation on a held-out split: RMSE, MAE and ranking metrics at k, blockwise on Dask.

Definitions (for one user u with held-out ratings; R_u = the held-out items rated at or above
``threshold``, the *relevant* items; L_u = the top-k list of the model's items, excluding the
items u rated in train; hit_p = 1 if the item at position p of L_u is in R_u)::

    precision@k = sum_p hit_p / k
    recall@k    = sum_p hit_p / |R_u|
    NDCG@k      = (sum_p hit_p / log2(p + 1)) / (sum_{p <= min(k, |R_u|)} 1 / log2(p + 1))
    AP@k        = (sum_p hit_p * precision@p) / min(k, |R_u|)        (MAP: its mean)
    hit rate@k  = 1 if sum_p hit_p > 0 else 0

Each is averaged over the users with at least one relevant held-out item (as Spark's
RankingMetrics and LensKit do). RMSE and MAE are over every held-out rating.

Implicit feedback (a model trained with ``model.feedback: implicit``): its scores rank items,
they are not ratings, so RMSE and MAE are not computed (the result has no such keys) and
``threshold`` does not apply: every held-out event with a weight above 0 is relevant.

Sampled negatives (``negatives=N``): instead of every item, user u's candidates are its relevant
held-out items and N items drawn uniformly at random, without replacement, from the items u has
no train and no held-out event (in the split evaluated) with (all of them when there are fewer);
L_u is the top k of those candidates by score, and the same metrics follow. The draws are a pure
function of (u's dense index in the store, a fixed seed, the items excluded), see
:func:`sample_negatives`: the same whatever the blocks or the workers. Such figures run far
higher than full-catalogue ones, so they are reported under their own keys,
``"precision@10 (100 sampled negatives)"``, never as ``precision``.

Cold start: a held-out pair whose user or item has no train ratings (unknown to the model, or
known by id but without train ratings in the model's own store) is a cold-start pair. With
``cold_start="fallback"`` it is predicted from the known biases (mu + c_j, mu + b_i or mu) and
counts in every metric (an unknown relevant item is a miss); with ``"drop"`` it is left out of
every metric. Both report the counts.

Plumbing: the split is streamed once in record batches and spread into one temporary file per
user block (bounded memory on the driver); then one task per user block reads its held-out
ratings and its train block (the seen items) on the worker, with the item factors broadcast once,
and returns sums that the driver adds up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmf.data.hashing import U64, mix64_int, splitmix64, unit_float
from dmf.dist.cluster import blas_single_thread
from dmf.dist.tasks import run_windowed
from dmf.errors import InputError, StoreError
from dmf.model.ids import check_cold_start
from dmf.model.model import Model
from dmf.model.scoring import ItemScorer, SeenItems, csr_rows, default_tile_users, top_n
from dmf.model.side import PartRef, read_part
from dmf.store.layout import MANIFEST, BlockRef, Store, read_block_file
from dmf.store.storage import FileEntry, Location, preflight, read_table

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate")

NEGATIVE_SEED = 0x5A3D_1E6A_7105
"""The fixed seed of the sampled negatives (:func:`sample_negatives`)."""

IMPLICIT_RELEVANCE = "every held-out event"
"""The ``relevance`` of an implicit model's result: threshold does not apply."""


def metric_key(metric: str, k: int, negatives: int | None) -> str:
    """The result key of a ranking metric: ``precision`` for the full catalogue; with sampled
    negatives ``precision@10 (100 sampled negatives)``, which cannot be read as the former."""
    if negatives is None:
        return metric
    return f"{metric}@{k} ({negatives} sampled negatives)"


# ---------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------
def ranking_from_hits(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user precision, recall, NDCG, AP and hit rate at ``k`` from the hit matrix of the
    top-k lists.

    Parameters
    ----------
    hits : ndarray of bool, shape (m, k') with k' <= k
        hits[u, p] is true when the item at position p + 1 of user u's list is relevant (a list
        shorter than k is padded with False).
    n_relevant : ndarray, shape (m,)
        |R_u| >= 1 for every row.
    k : int

    Returns
    -------
    dict of ndarrays of shape (m,): 'precision', 'recall', 'ndcg', 'map' (AP of each user),
    'hit_rate' (1.0 when the list holds a relevant item, else 0.0).
    """
    m = hits.shape[0]
    h = np.zeros((m, k), dtype=np.float64)
    h[:, : hits.shape[1]] = hits
    n_rel = np.asarray(n_relevant, dtype=np.float64)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    n_hit = h.sum(axis=1)
    ideal = np.cumsum(disc)[np.minimum(n_rel, k).astype(np.int64) - 1]
    prec_at_p = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    return {
        "precision": n_hit / k,
        "recall": n_hit / n_rel,
        "ndcg": (h @ disc) / ideal,
        "map": (prec_at_p * h).sum(axis=1) / np.minimum(n_rel, k),
        "hit_rate": (n_hit > 0).astype(np.float64),
    }


def sample_negatives(
    users: np.ndarray,
    excluded_indptr: np.ndarray,
    excluded_items: np.ndarray,
    n_items: int,
    n: int,
    seed: int = NEGATIVE_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` items per user drawn uniformly at random without replacement from the items
    ``0 .. n_items - 1`` outside the user's excluded set (all of them when fewer remain).

    Vectorised over the users (no loop per user). The draws of a user are a pure function of
    its dense index, ``seed``, ``n_items``, ``n`` and its excluded set: the same in any batch
    of users, in any order, on any worker. The i-th random number of user u is splitmix64's
    output i under the key splitmix64(u; seed), mapped to a rank among the F allowed items
    (floor of a uniform [0, 1) times F); the sample is the first n distinct ranks of that
    sequence (a uniformly random n-subset). When 2 n >= F, the n allowed items with the smallest
    keys splitmix64(rank; key of u) are taken instead (as uniform, and no long tail of repeated
    draws). Rank r becomes the r-th allowed item in increasing order.

    Parameters
    ----------
    users : ndarray of int, shape (m,)
        Dense user indices (the seed of each user's draws).
    excluded_indptr, excluded_items
        CSR over the m users of the items never drawn (duplicates and indices outside
        ``[0, n_items)`` are ignored).
    n_items, n : int

    Returns
    -------
    (indptr, items): CSR over the m users; each row holds min(n, allowed) distinct items in
    increasing order.
    """
    users = np.asarray(users, dtype=np.int64)
    m = len(users)
    excluded_indptr = np.asarray(excluded_indptr, dtype=np.int64)
    cols = np.asarray(excluded_items, dtype=np.int64)
    row = np.repeat(np.arange(m, dtype=np.int64), np.diff(excluded_indptr))
    ok = (cols >= 0) & (cols < n_items)
    key = np.unique(row[ok] * n_items + cols[ok])
    erow, ecol = np.divmod(key, n_items)
    eptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(erow, minlength=m), out=eptr[1:])
    free = n_items - np.diff(eptr)
    take = np.minimum(free, n)
    ukey = splitmix64(users.astype(U64), mix64_int(seed))

    dense = 2 * take >= free
    ranks_d = _all_ranks_by_key(np.flatnonzero(dense), free, take, ukey)
    ranks_s = _first_distinct_ranks(np.flatnonzero(~dense), free, take, ukey)
    rrow = np.concatenate([ranks_d[0], ranks_s[0]])
    rank = np.concatenate([ranks_d[1], ranks_s[1]])
    order = np.lexsort((rank, rrow))
    rrow, rank = rrow[order], rank[order]
    # The r-th allowed item of a row is r + #{excluded e_j (sorted, j from 0) with e_j - j <= r}.
    stride = n_items + 1
    g = erow * stride + ecol - (np.arange(len(ecol)) - eptr[erow])
    items = rank + np.searchsorted(g, rrow * stride + rank, side="right") - eptr[rrow]
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(take, out=indptr[1:])
    return indptr, items.astype(np.int64)


def _first_in_rows(rows: np.ndarray, take: np.ndarray) -> np.ndarray:
    """Mask of the first ``take[row]`` entries of each row of ``rows`` (sorted)."""
    starts = np.searchsorted(rows, rows, side="left")
    return (np.arange(len(rows)) - starts) < take[rows]


def _all_ranks_by_key(
    sel: np.ndarray, free: np.ndarray, take: np.ndarray, ukey: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(row, rank) of the ``take`` ranks with the smallest keys among all ``free`` of each
    user of ``sel``."""
    f = free[sel]
    rows = np.repeat(sel, f)
    rank = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(f) - f, f)
    h = splitmix64(rank.astype(U64), ukey[rows])
    order = np.lexsort((rank, h, rows))
    rows, rank = rows[order], rank[order]
    keep = _first_in_rows(rows, take)
    return rows[keep], rank[keep]


def _first_distinct_ranks(
    sel: np.ndarray, free: np.ndarray, take: np.ndarray, ukey: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(row, rank) of the first ``take`` distinct ranks of each user of ``sel`` in its sequence
    of draws; rounds draw a longer prefix of the sequence for the rows still short."""
    out_rows, out_rank = [], []
    draws = int(2 * take[sel].max()) + 16 if len(sel) else 0
    while len(sel):
        rows = np.repeat(sel, draws)
        counter = np.tile(np.arange(draws, dtype=np.int64), len(sel))
        h = splitmix64(counter.astype(U64), ukey[rows])
        rank = np.minimum((unit_float(h) * free[rows]).astype(np.int64), free[rows] - 1)
        # Keep the first draw of each (row, rank), then the earliest draws of each row.
        order = np.lexsort((counter, rank, rows))
        rows, rank, counter = rows[order], rank[order], counter[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (rank[1:] != rank[:-1])
        rows, rank, counter = rows[first], rank[first], counter[first]
        order = np.lexsort((counter, rows))
        rows, rank = rows[order], rank[order]
        got = np.bincount(rows, minlength=len(free))
        done = got[sel] >= take[sel]
        keep = _first_in_rows(rows, take) & np.isin(rows, sel[done])
        out_rows.append(rows[keep])
        out_rank.append(rank[keep])
        sel = sel[~done]
        draws *= 2
    if not out_rows:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    return np.concatenate(out_rows), np.concatenate(out_rank)


# ---------------------------------------------------------------------------------------------
# What runs on a worker
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItems:
    """Item side of the model, broadcast once; ``store_to_model`` maps store item indices."""

    factors: np.ndarray  # (n_items_model, rank)
    bias: np.ndarray  # (n_items_model,)
    mu: float
    store_to_model: np.ndarray | None  # (n_items_store,) or None when the indices are the same
    store_known: np.ndarray | None  # (n_items_store,) bool: has train ratings (own store only)
    n_store: int  # items in the store: held-out item indices must be below
    clip: tuple[float, float] | None = None  # predictions clipped to this range (RMSE, MAE)


@dataclass(frozen=True)
class EvalUsers:
    """The users of one store block: model rows of store users [start, stop)."""

    start: int
    stop: int
    factors: np.ndarray | None  # (stop - start, rank); zero rows for unknown users
    bias: np.ndarray | None  # (stop - start,)
    known: np.ndarray  # (stop - start,) bool
    train_block: BlockRef  # by_user/block=NNNNN
    part: PartRef | None = None  # else: the model's factor file of these users, read by the task

    def resolved(self) -> EvalUsers:
        if self.part is None:
            return self
        p = read_part(self.part)
        return EvalUsers(self.start, self.stop, p.factors, p.bias, self.known, self.train_block)


@dataclass(frozen=True)
class EvalParams:
    k: int
    threshold: float
    cold_start: str
    ranking: bool
    tile_users: int | None
    implicit: bool = False  # every held-out event with a weight > 0 is relevant; no RMSE/MAE
    negatives: int | None = None  # sampled negatives per user; None: every item is a candidate
    seed: int = NEGATIVE_SEED


def evaluate_block_task(
    users: EvalUsers, heldout: tuple[Location, FileEntry], items: EvalItems, p: EvalParams
):
    """Sums of squared and absolute errors and of ranking metrics over one user block."""
    users = users.resolved()
    t = read_table(*heldout, columns=["user", "item", "rating"])
    u_all = t.column("user").to_numpy()
    i_all = t.column("item").to_numpy()
    bad = (u_all < users.start) | (u_all >= users.stop) | (i_all < 0) | (i_all >= items.n_store)
    if np.any(bad):
        raise StoreError(
            f"{heldout[0]}: row {int(np.flatnonzero(bad)[0])} has a user or item index outside "
            "the store's blocks and id maps; the store is corrupt, re-run `dmf ingest`"
        )
    lu = t.column("user").to_numpy().astype(np.int64) - users.start
    si = t.column("item").to_numpy().astype(np.int64)
    r = t.column("rating").to_numpy().astype(np.float64)
    mi = si if items.store_to_model is None else items.store_to_model[si]
    # Every held-out pair of the block, before any is dropped: a sampled negative is none of them.
    heldout_pairs = (lu, mi)
    ku = users.known[lu]
    ki = mi >= 0
    if items.store_known is not None:
        ki &= items.store_known[si]
    known = ku & ki
    out: dict[str, Any] = {
        "n_heldout": len(r),
        "cold_users": int((~ku).sum()),
        "cold_items": int((~ki).sum()),
        "cold_pairs": int((~known).sum()),
    }
    if p.cold_start == "drop":
        lu, mi, r, ku, ki = lu[known], mi[known], r[known], ku[known], ki[known]
    out["n"] = len(r)
    if not p.implicit:
        # Implicit scores are not ratings: no rating error.
        pred = np.full(len(r), items.mu)
        pred[ku] += users.bias[lu[ku]]
        pred[ki] += items.bias[mi[ki]]
        both = ku & ki
        pred[both] += np.einsum(
            "ij,ij->i",
            users.factors[lu[both]].astype(np.float64),
            items.factors[mi[both]].astype(np.float64),
        )
        if items.clip is not None:
            np.clip(pred, items.clip[0], items.clip[1], out=pred)
        err = r - pred
        out.update(sse=float(err @ err), sae=float(np.abs(err).sum()))
    out.update({f"{m}_sum": 0.0 for m in METRICS}, n_users_ranked=0)
    if not p.ranking or len(r) == 0:
        return out

    rel = r > 0 if p.implicit else r >= p.threshold
    rel_users, n_rel = np.unique(lu[rel], return_counts=True)  # local rows, sorted
    if len(rel_users) == 0:
        return out
    n_items = len(items.bias)
    # Relevant (user position, model item) pairs as keys; unknown items can never be hit.
    pos_of = np.full(users.stop - users.start, -1, dtype=np.int64)
    pos_of[rel_users] = np.arange(len(rel_users))
    rel_ok = rel & ki
    rel_keys = np.unique(pos_of[lu[rel_ok]] * n_items + mi[rel_ok])

    # Seen (train) items of the ranked users, from the store's by_user block.
    blk = read_block_file(users.train_block)
    rep, cols, _ = csr_rows(blk.indptr, blk.cols, rel_users)
    cols = cols.astype(np.int64)
    if items.store_to_model is not None:
        cols = items.store_to_model[cols]
        keep = cols >= 0
        rep, cols = rep[keep], cols[keep]
    indptr = np.zeros(len(rel_users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rep, minlength=len(rel_users)), out=indptr[1:])
    seen = SeenItems(indptr, cols)

    if p.negatives is None:
        sums = _rank_every_item(users, items, p, rel_users, n_rel, rel_keys, seen)
    else:
        hp_pos = pos_of[heldout_pairs[0]]
        ok = (hp_pos >= 0) & (heldout_pairs[1] >= 0)
        heldout_keys = np.unique(hp_pos[ok] * n_items + heldout_pairs[1][ok])
        # Candidates: the relevant items the model can score (as every item is in the full
        # ranking); of those, only the items with train ratings can be hit (rel_keys).
        rel_in = rel & (mi >= 0)
        cand_keys = np.unique(pos_of[lu[rel_in]] * n_items + mi[rel_in])
        sums = _rank_sampled(
            users, items, p, rel_users, n_rel, (cand_keys, rel_keys), seen, heldout_keys
        )
    out.update({f"{m}_sum": sums[m] for m in METRICS}, n_users_ranked=len(rel_users))
    return out


def _rank_every_item(
    users: EvalUsers,
    items: EvalItems,
    p: EvalParams,
    rel_users: np.ndarray,
    n_rel: np.ndarray,
    rel_keys: np.ndarray,
    seen: SeenItems,
) -> dict[str, float]:
    """Sums of the metrics over ``rel_users``, each ranking every item but its train items."""
    n_items = len(items.bias)
    tile = p.tile_users or default_tile_users(n_items)
    sums = dict.fromkeys(METRICS, 0.0)
    scorer = ItemScorer(items.factors, items.bias, items.mu)
    with blas_single_thread():
        for a in range(0, len(rel_users), tile):
            b = min(len(rel_users), a + tile)
            rows = rel_users[a:b]
            s = scorer(users.factors[rows], users.bias[rows])
            srep, scol, _ = csr_rows(seen.indptr, seen.cols, np.arange(a, b))
            s[srep, scol] = -np.inf
            top, vals = top_n(s, p.k)
            keys = np.arange(a, b)[:, None] * n_items + top
            hits = np.isin(keys, rel_keys) & np.isfinite(vals)
            per_user = ranking_from_hits(hits, n_rel[a:b], p.k)
            for m in METRICS:
                sums[m] += float(per_user[m].sum())
    return sums


def _rank_sampled(
    users: EvalUsers,
    items: EvalItems,
    p: EvalParams,
    rel_users: np.ndarray,
    n_rel: np.ndarray,
    rel_keys: tuple[np.ndarray, np.ndarray],
    seen: SeenItems,
    heldout_keys: np.ndarray,
) -> dict[str, float]:
    """Sums of the metrics over ``rel_users``, each ranking its relevant held-out items (not
    train items) and ``p.negatives`` sampled items. Keys are position * n_items + model item:
    ``rel_keys`` holds the relevant candidates and, of those, the ones that can be hit."""
    cand_keys, hit_keys = rel_keys
    n_items = len(items.bias)
    n_neg = int(p.negatives)
    # A few arrays of (2 n + 16) draws a user while sampling; candidates (n + |R_u|) a user.
    width = 4 * (2 * n_neg + 16) + int(n_rel.max())
    tile = p.tile_users or default_tile_users(width)
    sums = dict.fromkeys(METRICS, 0.0)
    vf = items.factors
    vb = items.bias.astype(np.float64)
    for a in range(0, len(rel_users), tile):
        b = min(len(rel_users), a + tile)
        lo, hi = a * n_items, b * n_items
        # Excluded from the draws: train items and held-out items, as keys of this tile.
        srep, scol, _ = csr_rows(seen.indptr, seen.cols, np.arange(a, b))
        seen_keys = np.unique((srep + a) * n_items + scol)
        hk = heldout_keys[(heldout_keys >= lo) & (heldout_keys < hi)]
        ex_keys = np.union1d(seen_keys, hk)
        ex_row, ex_col = np.divmod(ex_keys - lo, n_items)
        ex_ptr = np.zeros(b - a + 1, dtype=np.int64)
        np.cumsum(np.bincount(ex_row, minlength=b - a), out=ex_ptr[1:])
        neg_ptr, neg_items = sample_negatives(
            rel_users[a:b] + users.start, ex_ptr, ex_col, n_items, n_neg, p.seed
        )
        neg_keys = np.repeat(np.arange(a, b), np.diff(neg_ptr)) * n_items + neg_items
        # Relevant candidates: the tile's relevant items, but not train items (never listed).
        rk = cand_keys[(cand_keys >= lo) & (cand_keys < hi)]
        rk = rk[~np.isin(rk, seen_keys)]
        cand = np.concatenate([rk, neg_keys])
        is_rel = np.concatenate([np.isin(rk, hit_keys), np.zeros(len(neg_keys), bool)])
        order = np.argsort(cand, kind="stable")  # by user, then item: ties go to the lower item
        cand, is_rel = cand[order], is_rel[order]
        crow, citem = np.divmod(cand - lo, n_items)
        counts = np.bincount(crow, minlength=b - a)
        cpos = np.arange(len(cand)) - np.repeat(np.cumsum(counts) - counts, counts)
        urows = rel_users[a:b][crow]
        score = (
            items.mu
            + users.bias[urows].astype(np.float64)
            + vb[citem]
            + np.einsum(
                "ij,ij->i", users.factors[urows].astype(np.float64), vf[citem].astype(np.float64)
            )
        )
        width_c = max(int(counts.max()) if len(counts) else 0, 1)
        s = np.full((b - a, width_c), -np.inf)
        s[crow, cpos] = score
        r = np.zeros((b - a, width_c), dtype=bool)
        r[crow, cpos] = is_rel
        top, vals = top_n(s, p.k)
        hits = np.take_along_axis(r, top, axis=1) & np.isfinite(vals)
        per_user = ranking_from_hits(hits, n_rel[a:b], p.k)
        for m in METRICS:
            sums[m] += float(per_user[m].sum())
    return sums


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def evaluate(
    model: Model,
    store: Store | str | Path,
    split: str = "test",
    k: int = 10,
    threshold: float = 4.0,
    cold_start: str = "fallback",
    client=None,
    ranking: bool = True,
    tile_users: int | None = None,
    batch_rows: int = 1 << 20,
    clip: bool | None = None,
    negatives: int | None = None,
) -> dict[str, Any]:
    """Error and ranking metrics of ``model`` on a held-out split of ``store``.

    Parameters
    ----------
    model
        A trained model.
    store
        The store (or its path) holding the split and the train ratings to exclude from the
        candidate lists; normally the store the model was trained on. Raw ids connect the two
        if it is another store.
    split : 'test' or 'validation'
    k : int
        Length of the top-k lists.
    threshold : float
        A held-out rating at or above this is relevant. Not used for an implicit model: every
        held-out event (weight > 0) is relevant.
    cold_start : 'fallback' or 'drop'
        See the module docstring.
    client
        A ``distributed.Client``; ``None`` runs the block tasks in a local loop.
    ranking
        Compute the ranking metrics (they score every item for each user with a relevant item:
        the costly part); RMSE and MAE alone need only the held-out pairs.
    clip
        Clip the predictions to the model's rating range for RMSE and MAE (as
        :meth:`Model.predict` does); None: the model's ``clip`` setting. The ranking metrics
        rank by the raw scores.
    negatives
        Sampled-negative evaluation (see the module docstring): each user's candidates are its
        relevant held-out items and this many items drawn from those it has no train or
        held-out event with. None: every item is a candidate.

    Returns
    -------
    dict with ``feedback`` ('explicit' or 'implicit'), ``relevance`` (what counts as relevant),
    ``n`` (held-out ratings scored), ``rmse`` and ``mae`` (explicit models only),
    ``n_users_ranked``, ``cold_users``, ``cold_items``, ``cold_pairs`` (pairs with an unknown
    user, item, either), ``n_heldout``, and the arguments ``split``, ``k``, ``cold_start``;
    ``threshold`` and ``clip`` (the range predictions were clipped to, or None) for explicit
    models only. The ranking metrics at ``k`` (None when no user has a relevant item):
    ``precision``, ``recall``, ``ndcg``, ``map``, ``hit_rate``; with ``negatives`` instead
    ``sampled_negatives`` (N) and the keys of :func:`metric_key`,
    ``"precision@10 (100 sampled negatives)"`` and so on.
    """
    check_cold_start(cold_start)
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    if negatives is not None and (isinstance(negatives, bool) or int(negatives) < 1):
        raise InputError(f"negatives must be at least 1 (or None), not {negatives}")
    if not isinstance(store, Store):
        store = Store.open(store)
    if split not in ("test", "validation"):
        raise InputError(f"split must be 'test' or 'validation', not {split!r}")
    if store.n_split(split) == 0 or not store.split_blocks(split):
        raise StoreError(
            f"store {store.root} has no {split} ratings: ingest with split.{split} > 0 "
            "to hold some out"
        )
    implicit = model.implicit
    maps = model.store_maps(store)
    u_map, i_map = maps.user, maps.item
    # On the model's own store, a user or item without train ratings is a cold start too.
    i_has = store.counts("item") > 0 if maps.same else None
    bounds_clip = None if implicit else model.clip_bounds(clip)
    items = EvalItems(
        model.item_factors, model.item_bias, model.mu, i_map, i_has, store.n_items, bounds_clip
    )
    negatives = None if negatives is None else int(negatives)
    params = EvalParams(k, threshold, cold_start, ranking, tile_users, implicit, negatives)
    bounds = store.bounds("user")

    def users_of(b: int) -> EvalUsers:
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        users = model.users
        # Block by block: the driver never holds a count per user of the whole side.
        u_has = store.counts("user", b) > 0 if maps.same else None
        if u_map is None and not users.in_memory and users.n_blocks == store.n_blocks("user"):
            # The model's own store: its block files are the store's blocks; the task reads one.
            known = u_has
            return EvalUsers(lo, hi, None, None, known, store.block_ref("user", b), users.parts[b])
        rows = np.arange(lo, hi) if u_map is None else u_map[lo:hi]
        known = u_has if u_map is None else rows >= 0
        f, bias = users.rows(np.maximum(rows, 0))
        f = np.where(known[:, None], f, 0).astype(users.dtype)
        bias = np.where(known, bias, 0).astype(users.dtype)
        return EvalUsers(lo, hi, f, bias, known, store.block_ref("user", b))

    preflight(client, reads=[store.root / MANIFEST])
    blocks = store.split_blocks(split)
    if client is not None and blocks:
        [items_f] = client.scatter([items], broadcast=True, hash=False)
        parts = run_windowed(
            client,
            evaluate_block_task,
            len(blocks),
            lambda j: (users_of(blocks[j]), (store.split_ref(split, blocks[j]), items_f, params)),
            "evaluate-block",
        )
    else:
        parts = [
            evaluate_block_task(users_of(b), store.split_ref(split, b), items, params)
            for b in blocks
        ]

    total = {key: sum(p[key] for p in parts) for key in parts[0]} if parts else {}
    return _summary(
        total, split, k, threshold, cold_start, ranking, negatives, implicit, bounds_clip
    )


def _summary(
    total: dict[str, Any],
    split: str,
    k: int,
    threshold: float,
    cold_start: str,
    ranking: bool,
    negatives: int | None,
    implicit: bool,
    bounds_clip: tuple[float, float] | None,
) -> dict[str, Any]:
    """The result of :func:`evaluate` from the sums of its block tasks."""
    n = int(total.get("n", 0))
    n_ranked = int(total.get("n_users_ranked", 0))
    result: dict[str, Any] = {
        "split": split,
        "feedback": "implicit" if implicit else "explicit",
        "n": n,
    }
    if not implicit:
        result["rmse"] = math.sqrt(total["sse"] / n) if n else None
        result["mae"] = total["sae"] / n if n else None
    result["k"] = k
    if implicit:
        result["relevance"] = IMPLICIT_RELEVANCE
    else:
        result["threshold"] = threshold
        result["relevance"] = f"held-out rating >= {threshold:g}"
    if negatives is not None:
        result["sampled_negatives"] = negatives
    for m in METRICS:
        value = total[f"{m}_sum"] / n_ranked if ranking and n_ranked else None
        result[metric_key(m, k, negatives)] = value
    result.update(
        n_users_ranked=n_ranked,
        cold_start=cold_start,
        cold_users=int(total.get("cold_users", 0)),
        cold_items=int(total.get("cold_items", 0)),
        cold_pairs=int(total.get("cold_pairs", 0)),
        n_heldout=int(total.get("n_heldout", 0)),
    )
    if not implicit:
        result["clip"] = None if bounds_clip is None else list(bounds_clip)
    return result


_LABELS = {
    "precision": "precision",
    "recall": "recall",
    "ndcg": "NDCG",
    "map": "MAP",
    "hit_rate": "hit rate",
}


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small two-column text table, for the terminal: the rows of the keys
    the result has (an implicit model's has no RMSE or MAE)."""
    k = result["k"]
    implicit = result.get("feedback") == "implicit"
    what = "events" if implicit else "ratings"
    rows: list[tuple[str, Any]] = [("split", result["split"])]
    if "feedback" in result:
        rows.append(("feedback", result["feedback"]))
    rows += [(f"held-out {what}", result["n_heldout"]), ("scored", result["n"])]
    if "rmse" in result:
        rows.append(("RMSE", result["rmse"]))
    if "mae" in result:
        rows.append(("MAE", result["mae"]))
    negatives = result.get("sampled_negatives")
    if negatives is not None:
        rows.append(("sampled negatives per user", negatives))
    for m in METRICS:
        key = metric_key(m, k, negatives)
        if key in result:
            label = f"{_LABELS[m]}@{k}"
            if negatives is not None:
                label += f" ({negatives} sampled negatives)"
            rows.append((label, result[key]))
    if "threshold" in result:
        ranked = f"users ranked (>= 1 rating >= {result['threshold']:g})"
    else:
        ranked = "users ranked (>= 1 held-out event of weight > 0)"
    rows += [
        (ranked, result["n_users_ranked"]),
        (f"cold-start pairs ({result['cold_start']})", result["cold_pairs"]),
        ("  unknown users / items", f"{result['cold_users']} / {result['cold_items']}"),
    ]
    width = max(len(r[0]) for r in rows)

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    return "\n".join(f"{name:<{width}}  {fmt(v)}" for name, v in rows)
