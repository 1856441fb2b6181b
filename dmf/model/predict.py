"""Single calls on a model in memory: predict pairs, fold in a new user, recommend for a new
user, similar items.

Each is a function of a :class:`dmf.model.Model`; the model's methods of the same names call
them. Raw ids become indices through the model's :class:`dmf.model.ids.IdIndex`, built once per
model, so a call costs what its own ids cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from dmf.als.solver import solve_block
from dmf.errors import InputError, ModelError
from dmf.model.ids import check_cold_start
from dmf.model.scoring import SeenItems, recommend_rows
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
