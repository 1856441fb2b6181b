"""Evaluation on a held-out split: RMSE, MAE and ranking metrics at k, blockwise on Dask.

Definitions (for one user u with held-out ratings; R_u = the held-out items rated at or above
``threshold``, the *relevant* items; L_u = the top-k list of the model's items, excluding the
items u rated in train; hit_p = 1 if the item at position p of L_u is in R_u)::

    precision@k = sum_p hit_p / k
    recall@k    = sum_p hit_p / |R_u|
    NDCG@k      = (sum_p hit_p / log2(p + 1)) / (sum_{p <= min(k, |R_u|)} 1 / log2(p + 1))
    AP@k        = (sum_p hit_p * precision@p) / min(k, |R_u|)        (MAP: its mean)

Each is averaged over the users with at least one relevant held-out item (as Spark's
RankingMetrics and LensKit do). RMSE and MAE are over every held-out rating.

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

from dmf.dist.cluster import blas_single_thread
from dmf.dist.tasks import run_windowed
from dmf.errors import InputError, StoreError
from dmf.model.ids import check_cold_start
from dmf.model.model import Model
from dmf.model.scoring import ItemScorer, SeenItems, csr_rows, default_tile_users, top_n
from dmf.model.side import PartRef, read_part
from dmf.store.layout import MANIFEST, BlockRef, Store, read_block_file
from dmf.store.storage import FileEntry, Location, preflight, read_table

METRICS = ("precision", "recall", "ndcg", "map")


# ---------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------
def ranking_from_hits(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user precision, recall, NDCG and AP at ``k`` from the hit matrix of the top-k lists.

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
    dict of ndarrays of shape (m,): 'precision', 'recall', 'ndcg', 'map' (AP of each user).
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
    }


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
    out.update(n=len(r), sse=float(err @ err), sae=float(np.abs(err).sum()))
    out.update({f"{m}_sum": 0.0 for m in METRICS}, n_users_ranked=0)
    if not p.ranking or len(r) == 0:
        return out

    rel = r >= p.threshold
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
    out.update({f"{m}_sum": sums[m] for m in METRICS}, n_users_ranked=len(rel_users))
    return out


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
        A held-out rating at or above this is relevant.
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

    Returns
    -------
    dict with ``rmse``, ``mae``, ``n`` (held-out ratings scored), ``precision``, ``recall``,
    ``ndcg``, ``map`` (at ``k``; None when no user has a relevant item), ``n_users_ranked``,
    ``cold_users``, ``cold_items``, ``cold_pairs`` (pairs with an unknown user, item, either),
    ``clip`` (the range predictions were clipped to, or None), and the arguments ``split``,
    ``k``, ``threshold``, ``cold_start``.
    """
    check_cold_start(cold_start)
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}")
    if not isinstance(store, Store):
        store = Store.open(store)
    if split not in ("test", "validation"):
        raise InputError(f"split must be 'test' or 'validation', not {split!r}")
    if store.n_split(split) == 0 or not store.split_blocks(split):
        raise StoreError(
            f"store {store.root} has no {split} ratings: ingest with split.{split} > 0 "
            "to hold some out"
        )
    maps = model.store_maps(store)
    u_map, i_map = maps.user, maps.item
    # On the model's own store, a user or item without train ratings is a cold start too.
    i_has = store.counts("item") > 0 if maps.same else None
    bounds_clip = model.clip_bounds(clip)
    items = EvalItems(
        model.item_factors, model.item_bias, model.mu, i_map, i_has, store.n_items, bounds_clip
    )
    params = EvalParams(k, threshold, cold_start, ranking, tile_users)
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
    n = int(total.get("n", 0))
    n_ranked = int(total.get("n_users_ranked", 0))
    result: dict[str, Any] = {
        "split": split,
        "n": n,
        "rmse": math.sqrt(total["sse"] / n) if n else None,
        "mae": total["sae"] / n if n else None,
        "k": k,
        "threshold": threshold,
    }
    for m in METRICS:
        result[m] = total[f"{m}_sum"] / n_ranked if ranking and n_ranked else None
    result.update(
        n_users_ranked=n_ranked,
        cold_start=cold_start,
        cold_users=int(total.get("cold_users", 0)),
        cold_items=int(total.get("cold_items", 0)),
        cold_pairs=int(total.get("cold_pairs", 0)),
        n_heldout=int(total.get("n_heldout", 0)),
        clip=None if bounds_clip is None else list(bounds_clip),
    )
    return result


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small two-column text table, for the terminal."""
    k = result["k"]
    rows = [
        ("split", result["split"]),
        ("held-out ratings", result["n_heldout"]),
        ("scored", result["n"]),
        ("RMSE", result["rmse"]),
        ("MAE", result["mae"]),
        (f"precision@{k}", result["precision"]),
        (f"recall@{k}", result["recall"]),
        (f"NDCG@{k}", result["ndcg"]),
        (f"MAP@{k}", result["map"]),
        (f"users ranked (>= 1 rating >= {result['threshold']:g})", result["n_users_ranked"]),
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
