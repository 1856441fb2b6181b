"""Single calls on a model in memory: predict pairs, fold in a new user, recommend for a new
user, similar items.

Each is a function of a :class:`dmf.model.Model`; the model's methods of the same names call
them. Raw ids become indices through the model's :class:`dmf.model.ids.IdIndex`, built once per
model, so a call costs what its own ids cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from dmf.als.solver import predict, solve_block
from dmf.errors import InputError, ModelError
from dmf.model.ids import check_cold_start
from dmf.model.scoring import SeenItems, recommend_rows
from dmf.model.side import Part, read_part
from dmf.store.blocks import RatingBlock

if TYPE_CHECKING:
    from dmf.model.model import Model


@dataclass
class Prediction:
    """Result of :meth:`Model.predict` with ``return_info=True``.

    Attributes
    ----------
    scores : ndarray, shape (n,) under 'fallback', (known.sum(),) under 'drop'
    known : ndarray of bool, shape (n,): both the user and the item are known to the model
    cold_users, cold_items : number of pairs whose user (item) is unknown
    """

    scores: np.ndarray
    known: np.ndarray
    cold_users: int
    cold_items: int

    @property
    def cold_pairs(self) -> int:
        """Pairs with an unknown user or item (or both)."""
        return int((~self.known).sum())


def predict_pairs(
    model: Model, users: Any, items: Any, cold_start: str = "fallback", return_info: bool = False
) -> np.ndarray | Prediction:
    """Predicted ratings of (user, item) pairs given by raw ids; see :meth:`Model.predict`."""
    check_cold_start(cold_start)
    u = model.index_of(users, "user")
    i = model.index_of(items, "item")
    if len(u) != len(i):
        raise ModelError(f"predict: {len(u)} users but {len(i)} items; give them pairwise")
    known = (u >= 0) & (i >= 0)
    sel = known if cold_start == "drop" else slice(None)
    scores = model.predict_indices(u[sel], i[sel])
    if not return_info:
        return scores
    return Prediction(scores, known, int((u < 0).sum()), int((i < 0).sum()))


@dataclass(frozen=True)
class _Items:
    """The item side a scoring task needs (broadcast once)."""

    factors: np.ndarray
    bias: np.ndarray
    mu: float


def score_block_task(part: Part, users: pa.Array, items: np.ndarray, side: _Items):
    """Scores of (user, item) pairs whose users can only be in this block (runs on a worker):
    the users' rows are looked up in the block's ids; -1 where the user is not there. Returns
    (scores, user found)."""
    local = part.index_of(users)
    found = local >= 0
    scores = predict(side.mu, part.factors, part.bias, side.factors, side.bias, local, items)
    return scores, found


def predict_batches(
    model: Model, batches: Iterator[pa.Table], cold_start: str = "fallback", client=None
) -> Iterator[tuple[pa.Table, Prediction]]:
    """Predictions for a stream of (user, item) tables, each in its rows' order.

    With a model whose users are on disk and a client, each batch's pairs go to one task per
    user block they can be in, on the worker that holds that block's factor file in memory
    (read once, kept as a Dask future): the driver never holds the user side. Otherwise each
    batch is :meth:`Model.predict`."""
    check_cold_start(cold_start)
    users = model.users
    if client is None or users.in_memory or users.first_ids is None:
        for t in batches:
            yield t, predict_pairs(model, t.column("user"), t.column("item"), cold_start, True)
        return
    [side_f] = client.scatter(
        [_Items(model.item_factors, model.item_bias, model.mu)], broadcast=True, hash=False
    )
    parts: dict[int, Any] = {}
    for t in batches:
        u = model.as_ids(t.column("user"), "user")
        i = model.index_of(t.column("item"), "item")
        blk = users._candidate_blocks(u)
        scores = np.full(len(u), model.mu, dtype=np.float64)
        known_u = np.zeros(len(u), dtype=bool)
        futs = {}
        for b in np.unique(blk[blk >= 0]).tolist():
            if b not in parts:
                parts[b] = client.submit(read_part, users.parts[b], pure=False)
            sel = np.flatnonzero(blk == b)
            futs[b] = (sel, client.submit(score_block_task, parts[b], u.take(pa.array(sel)),
                                          i[sel], side_f, pure=False))  # fmt: skip
        for sel, fut in futs.values():
            s, found = fut.result()
            scores[sel], known_u[sel] = s, found
        # Unknown users: mu + c_j (or mu): what predict gives an index of -1.
        cold = ~known_u
        scores[cold] = predict(
            model.mu, np.zeros((1, model.rank)), np.zeros(1), model.item_factors,
            model.item_bias, np.full(int(cold.sum()), -1), i[cold],
        )  # fmt: skip
        known = known_u & (i >= 0)
        info = Prediction(
            scores[known] if cold_start == "drop" else scores,
            known,
            int((~known_u).sum()),
            int((i < 0).sum()),
        )
        yield t, info


def fold_in(model: Model, items: Any, ratings: Any) -> tuple[np.ndarray, float]:
    """Factors and bias of a new user from their ratings; see :meth:`Model.fold_in`."""
    idx = model.index_of(items, "item")
    r = np.asarray(ratings, dtype=np.float64).reshape(-1)
    if len(idx) != len(r):
        raise InputError(f"fold_in: {len(idx)} items but {len(r)} ratings")
    if not np.all(np.isfinite(r)):
        raise InputError(f"fold_in: rating {int(np.flatnonzero(~np.isfinite(r))[0])} is NaN")
    keep = idx >= 0
    idx, r = idx[keep], r[keep]
    uniq, counts = np.unique(idx, return_counts=True)
    if np.any(counts > 1):
        dup = model.item_ids[int(uniq[np.argmax(counts > 1)])].as_py()
        raise InputError(f"fold_in: item {dup!r} is rated more than once; give each item once")
    block = RatingBlock.from_coo("user", 0, 1, np.zeros(len(idx), np.int64), idx, r)
    p = model.solve_params()
    sol = solve_block(
        block,
        model.item_factors,
        model.item_bias,
        model.mu,
        p["reg"],
        p["reg_bias"],
        p["weighted_reg"],
        dtype=p["dtype"],
    )
    return sol.factors[0], float(sol.bias[0])


def recommend_for_ratings(
    model: Model, items: Any, ratings: Any, n: int = 10, exclude_rated: bool = True
) -> pa.Table:
    """Top-``n`` items for a new user given their ratings; see
    :meth:`Model.recommend_for_ratings`."""
    factors, bias = fold_in(model, items, ratings)
    seen = None
    if exclude_rated:
        idx = np.unique(model.index_of(items, "item"))
        idx = idx[idx >= 0]
        seen = SeenItems(np.array([0, len(idx)], dtype=np.int64), idx)
    _, rank, item, score = recommend_rows(
        factors[None, :],
        np.array([bias]),
        model.item_factors,
        model.item_bias,
        model.mu,
        n,
        seen,
    )
    return pa.table(
        {
            "rank": pa.array(rank, type=pa.int32()),
            "item": model.item_index.take(item),
            "score": pa.array(score, type=pa.float32()),
        }
    )


def similar_items(model: Model, items: Any, n: int = 10, tile_items: int | None = None) -> pa.Table:
    """The ``n`` items most similar to each of ``items`` by cosine; see
    :meth:`Model.similar_items`."""
    if model.rank == 0:
        raise ModelError("similar_items needs item factors: this model has rank 0")
    q_ids = model.as_ids(items, "item")
    q = model.item_index.index_of(q_ids)
    if np.any(q < 0):
        bad = q_ids.filter(pa.array(q < 0))[:5].to_pylist()
        raise InputError(f"similar_items: unknown item ids {bad}; use ids the model knows")
    v = model.item_factors.astype(np.float32)
    norm = np.linalg.norm(v, axis=1)
    has = norm > 0
    vn = np.where(has[:, None], v / np.where(has, norm, 1)[:, None], 0).astype(np.float32)
    m = len(q)
    seen = SeenItems(np.arange(m + 1, dtype=np.int64), q.astype(np.int64))
    row, rank, sim, score = recommend_rows(
        vn[q], np.zeros(m), vn, np.zeros(model.n_items), 0.0, n, seen, tile_items, has
    )
    keep = has[q][row]
    row, rank, sim, score = row[keep], rank[keep], sim[keep], score[keep]
    return pa.table(
        {
            "item": q_ids.take(pa.array(row)),
            "rank": pa.array(rank, type=pa.int32()),
            "similar": model.item_index.take(sim),
            "score": pa.array(score, type=pa.float32()),
        }
    )
