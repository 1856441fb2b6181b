"""Single calls on a model: predict pairs, fold in a new user, recommend for a new user,
similar items and similar users, the top users for items; and what they share: the item and
user filters, the output format, the cold-start reports.

Each is a function of a :class:`dmf.model.Model`; the model's methods of the same names call
them. Raw ids become indices through the model's :class:`dmf.model.ids.IdIndex`, built once per
model, so a call costs what its own ids cost. Unknown ids are counted in a
:class:`dmf.model.ids.ColdStart`, the same way in every call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmf.als.solver import predict, solve_block
from dmf.errors import InputError, ModelError
from dmf.model.ids import ColdStart, check_cold_start, handled, inverse_map
from dmf.model.recommend import ranked_table
from dmf.model.scoring import SeenItems, csr_rows, recommend_rows
from dmf.model.side import Part, read_part
from dmf.model.top_users import Queries, top_users
from dmf.store.blocks import RatingBlock
from dmf.store.layout import Store

OUTPUTS = ("arrow", "pandas")


def as_output(table: pa.Table, output: str):
    """``table`` as asked: ``'arrow'`` (the table itself) or ``'pandas'`` (a DataFrame)."""
    if output == "arrow":
        return table
    if output == "pandas":
        return table.to_pandas()
    raise InputError(f"output must be one of {OUTPUTS}, not {output!r}")


def check_output(output: str, allowed: tuple[str, ...] = OUTPUTS) -> None:
    if output not in allowed:
        raise InputError(f"output must be one of {allowed}, not {output!r}")


def id_filter(model: Model, side: str, include: Any, exclude: Any) -> tuple[np.ndarray | None, int]:
    """The candidates of ``side`` a call may return: (mask, unknown).

    ``include``: only these raw ids (None: all); ``exclude``: never these. Returns a bool mask
    of shape (n_rows,) (None when there is no filter) and the number of ids given that the
    model does not know (they are ignored, and reported as cold-start ids)."""
    if include is None and exclude is None:
        return None, 0
    unknown = 0
    if include is not None:
        idx = model.index_of(include, side)
        unknown += int((idx < 0).sum())
        mask = np.zeros(model.side(side).n_rows, dtype=bool)
        mask[idx[idx >= 0]] = True
    else:
        mask = np.ones(model.side(side).n_rows, dtype=bool)
    if exclude is not None:
        idx = model.index_of(exclude, side)
        unknown += int((idx < 0).sum())
        mask[idx[idx >= 0]] = False
    return mask, unknown


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
    policy : the cold-start policy applied ('fallback' or 'drop')
    """

    scores: np.ndarray
    known: np.ndarray
    cold_users: int
    cold_items: int
    policy: str = "fallback"

    @property
    def cold_pairs(self) -> int:
        """Pairs with an unknown user or item (or both)."""
        return int((~self.known).sum())

    @property
    def cold_start(self) -> ColdStart:
        """The counts as every call reports them (:class:`dmf.model.ids.ColdStart`)."""
        return ColdStart(
            "predict",
            len(self.known),
            "pairs",
            self.cold_pairs,
            self.cold_users,
            self.cold_items,
            handled(self.policy),
        )


def predict_pairs(
    model: Model,
    users: Any,
    items: Any,
    cold_start: str = "fallback",
    return_info: bool = False,
    clip: bool | None = None,
) -> np.ndarray | Prediction:
    """Predicted ratings of (user, item) pairs given by raw ids; see :meth:`Model.predict`."""
    check_cold_start(cold_start)
    u = model.index_of(users, "user")
    i = model.index_of(items, "item")
    if len(u) != len(i):
        raise ModelError(f"predict: {len(u)} users but {len(i)} items; give them pairwise")
    known = (u >= 0) & (i >= 0)
    sel = known if cold_start == "drop" else slice(None)
    scores = model.predict_indices(u[sel], i[sel], clip=clip)
    if not return_info:
        return scores
    return Prediction(scores, known, int((u < 0).sum()), int((i < 0).sum()), cold_start)


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
    model: Model,
    batches: Iterator[pa.Table],
    cold_start: str = "fallback",
    client=None,
    clip: bool | None = None,
) -> Iterator[tuple[pa.Table, Prediction]]:
    """Predictions for a stream of (user, item) tables, each in its rows' order.

    With a model whose users are on disk and a client, each batch's pairs go to one task per
    user block they can be in, on the worker that holds that block's factor file in memory
    (read once, kept as a Dask future): the driver never holds the user side. Otherwise each
    batch is :meth:`Model.predict`. Scores are clipped as :meth:`Model.predict` clips them
    (``clip``: None for the model's setting)."""
    check_cold_start(cold_start)
    users = model.users
    if client is None or users.in_memory or users.first_ids is None:
        for t in batches:
            p = predict_pairs(model, t.column("user"), t.column("item"), cold_start, True, clip)
            yield t, p
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
        scores = model.clip_scores(scores, clip)
        info = Prediction(
            scores[known] if cold_start == "drop" else scores,
            known,
            int((~known_u).sum()),
            int((i < 0).sum()),
            cold_start,
        )
        yield t, info


def fold_in(model: Model, items: Any, ratings: Any) -> tuple[np.ndarray, float, ColdStart]:
    """Factors and bias of a new user from their ratings, and the count of unknown items (they
    are ignored); see :meth:`Model.fold_in`."""
    idx = model.index_of(items, "item")
    r = np.asarray(ratings, dtype=np.float64).reshape(-1)
    if len(idx) != len(r):
        raise InputError(f"fold_in: {len(idx)} items but {len(r)} ratings")
    if not np.all(np.isfinite(r)):
        raise InputError(f"fold_in: rating {int(np.flatnonzero(~np.isfinite(r))[0])} is NaN")
    keep = idx >= 0
    n_unknown = int((~keep).sum())
    info = ColdStart("fold_in", len(keep), "ratings", n_unknown, 0, n_unknown, handled("drop"))
    idx, r = idx[keep], r[keep]
    uniq, counts = np.unique(idx, return_counts=True)
    p = model.solve_params()
    if p["implicit"] is not None:
        if np.any(r < 0):
            raise InputError(
                f"fold_in: weight {int(np.flatnonzero(r < 0)[0])} is negative; an implicit "
                "model takes event weights >= 0"
            )
        # Events: repeats add up, as ingest's data.duplicates sum does.
        idx, r = uniq, np.bincount(np.searchsorted(uniq, idx), weights=r, minlength=len(uniq))
    elif np.any(counts > 1):
        dup = model.item_ids[int(uniq[np.argmax(counts > 1)])].as_py()
        raise InputError(f"fold_in: item {dup!r} is rated more than once; give each item once")
    block = RatingBlock.from_coo("user", 0, 1, np.zeros(len(idx), np.int64), idx, r)
    imp = p["implicit"]
    sol = solve_block(
        block,
        model.item_factors,
        model.item_bias,
        model.mu,
        p["reg"],
        p["reg_bias"],
        p["weighted_reg"],
        dtype=p["dtype"],
        implicit=imp,
        gram=model.item_gram() if imp is not None else None,
    )
    return sol.factors[0], float(sol.bias[0]), info


def recommend_for_ratings(
    model: Model,
    items: Any,
    ratings: Any,
    n: int = 10,
    exclude_rated: bool = True,
    allowed: np.ndarray | None = None,
) -> tuple[pa.Table, ColdStart]:
    """Top-``n`` items for a new user given their ratings (``allowed``: the candidate items'
    mask, or None); see :meth:`Model.recommend_for_ratings`."""
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    factors, bias, info = fold_in(model, items, ratings)
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
        None,
        allowed,
    )
    table = pa.table(
        {
            "rank": pa.array(rank, type=pa.int32()),
            "item": model.item_index.take(item),
            "score": pa.array(score, type=pa.float32()),
        }
    )
    return table, ColdStart("recommend_for_ratings", *_fields(info))


def _fields(info: ColdStart) -> tuple:
    return info.total, info.unit, info.cold, info.cold_users, info.cold_items, info.handled


def similar_items(
    model: Model, items: Any, n: int = 10, tile_items: int | None = None
) -> tuple[pa.Table, ColdStart]:
    """The ``n`` items most similar to each of ``items`` by cosine, and the count of unknown
    query items (they get no rows); see :meth:`Model.similar_items`."""
    if model.rank == 0:
        raise ModelError("similar_items needs item factors: this model has rank 0")
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    all_ids = model.as_ids(items, "item")
    q_all = model.item_index.index_of(all_ids)
    known = q_all >= 0
    n_unknown = int((~known).sum())
    info = ColdStart("similar_items", len(q_all), "items", n_unknown, 0, n_unknown, handled("drop"))
    q_ids = all_ids.filter(pa.array(known))
    q = q_all[known]
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
    table = ranked_table(
        "item", q_ids.take(pa.array(row)), rank, "similar", model.item_index.take(sim), score
    )
    return table, info


# -- the user side streamed: top users for items, similar users --------------------------------
def _first_seen(ids: pa.Array) -> pa.Array:
    """The distinct ``ids`` in the order they first appear (nulls dropped)."""
    return pc.unique(ids.drop_null())


def recommend_users(
    model: Model,
    items: Any,
    n: int = 10,
    allowed: np.ndarray | None = None,
    seen_store: Store | None = None,
    cold_start: str = "fallback",
    client=None,
    tile_users: int | None = None,
) -> tuple[pa.Table, ColdStart]:
    """The top ``n`` users for each of ``items`` by predicted rating; see
    :meth:`Model.recommend_users`."""
    check_cold_start(cold_start)
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    given = model.as_ids(items, "item")
    idx_given = model.index_of(given, "item")
    n_unknown = int((idx_given < 0).sum())
    info = ColdStart(
        "recommend_users", len(given), "items", n_unknown, 0, n_unknown, handled(cold_start)
    )
    q_ids = _first_seen(given)
    q = model.index_of(q_ids, "item")
    if cold_start == "drop":
        q_ids, q = q_ids.filter(pa.array(q >= 0)), q[q >= 0]
    known = q >= 0
    # Unknown items (fallback): zero factors and bias, so users rank by mu + b_u.
    factors = np.zeros((len(q), model.rank), dtype=np.float32)
    offset = np.full(len(q), model.mu, dtype=np.float64)
    if known.any():
        vf, vb = model.items.rows(q[known])
        factors[known] = vf
        offset[known] += vb
    pairs = None if seen_store is None else _raters(model, seen_store, q)
    queries = Queries(factors, offset, False, n, tile_users)
    row, rank, user, score = top_users(model, queries, pairs, allowed, client)
    table = ranked_table(
        "item", q_ids.take(pa.array(row)), rank, "user", model.users.take_ids(user), score
    )
    return table, info


def _raters(model: Model, store: Store, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query position, model user index) of every train rating of the query items ``q``
    (model item indices, -1 for unknown) in ``store``'s ``by_item`` blocks: one read per item
    block that holds a query item."""
    maps = model.store_maps(store)
    sidx = q.copy()
    if maps.item is not None:
        sidx[q >= 0] = inverse_map(maps.item, model.n_items)[q[q >= 0]]
    bounds = store.bounds("item")
    blk = np.searchsorted(bounds, sidx, side="right") - 1
    qpos, users = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for b in np.unique(blk[sidx >= 0]).tolist():
        sel = np.flatnonzero((blk == b) & (sidx >= 0))
        block = store.read_block("item", b)
        rep, cols, _ = csr_rows(block.indptr, block.cols, sidx[sel] - bounds[b])
        qpos.append(sel[rep])
        users.append(cols.astype(np.int64))
    qp, us = np.concatenate(qpos), np.concatenate(users)
    if maps.user is not None:
        us = maps.user[us]  # store user -> model user (-1: the model does not know them)
        qp, us = qp[us >= 0], us[us >= 0]
    return qp, us


def similar_users(
    model: Model, users: Any, n: int = 10, client=None, tile_users: int | None = None
) -> tuple[pa.Table, ColdStart]:
    """The ``n`` users most similar to each of ``users`` by cosine; see
    :meth:`Model.similar_users`."""
    if model.rank == 0:
        raise ModelError("similar_users needs user factors: this model has rank 0")
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    given = model.as_ids(users, "user")
    idx_given = model.index_of(given, "user")
    n_unknown = int((idx_given < 0).sum())
    info = ColdStart("similar_users", len(given), "users", n_unknown, n_unknown, 0, handled("drop"))
    q_ids = _first_seen(given)
    q = model.index_of(q_ids, "user")
    q_ids, q = q_ids.filter(pa.array(q >= 0)), q[q >= 0]
    uf, _ = model.users.rows(q)
    uf = uf.astype(np.float32)
    norm = np.linalg.norm(uf, axis=1)
    # A user without a direction (no train ratings) is similar to nothing: no rows.
    q_ids, q, uf, norm = q_ids.filter(pa.array(norm > 0)), q[norm > 0], uf[norm > 0], norm[norm > 0]
    queries = Queries(uf / norm[:, None], np.zeros(len(q)), True, n, tile_users)
    pairs = (np.arange(len(q), dtype=np.int64), q.astype(np.int64))  # never the user itself
    row, rank, sim, score = top_users(model, queries, pairs, None, client)
    table = ranked_table(
        "user", q_ids.take(pa.array(row)), rank, "similar", model.users.take_ids(sim), score
    )
    return table, info
