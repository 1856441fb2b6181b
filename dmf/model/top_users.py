"""Users for items: the top-n users for each of some items, and the users most similar to some
users. The user side is streamed block by block with a running top-n.

The queries are few (some items, or some users) and the user side may be larger than one
process (a model read block by block, :mod:`dmf.model.side`). So, as recommend streams over
tiles of users against every item, this streams over the user side: each block is scored
against every query a tile at a time, and a running top-n per query
(:class:`dmf.model.scoring.RunningTop`) keeps the best users so far. Memory: one tile of
queries x users plus queries x n, whatever the number of users.

Three layers, as in :mod:`dmf.model.recommend`: the maths on arrays (:func:`score_users`), the
function run per user block (:func:`top_users_block_task`: it reads its block's factor file
when the side is on disk), and orchestration (:func:`top_users`): with a client one task per
user block, the queries broadcast once; without one the same tasks in a local loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dmf.dist.cluster import blas_single_thread
from dmf.dist.tasks import run_windowed
from dmf.model.scoring import DEFAULT_TILE_BYTES, RunningTop
from dmf.model.side import PartRef, read_part

if TYPE_CHECKING:
    from dmf.model.model import Model


@dataclass(frozen=True)
class Queries:
    """What is scored against every user (broadcast once).

    ``factors`` (m, rank) float32 and ``offset`` (m,) float64: the score of user u for query q
    is ``offset[q] + b_u + factors[q] . u_u`` (``recommend_users``: item factors, and mu + c_j;
    an unknown item under the fallback has zeros, which ranks users by mu + b_u). With
    ``cosine`` the score is ``factors[q] . u_u / |u_u|`` (``similar_users``: ``factors`` are unit
    vectors) and users without a direction (all-zero factors) are never chosen.
    """

    factors: np.ndarray
    offset: np.ndarray
    cosine: bool
    k: int
    tile_users: int | None = None


@dataclass(frozen=True)
class UserBlock:
    """Users ``start ..`` of the model, and what must not be chosen among them.

    ``factors`` (n, rank) and ``bias`` (n,) in hand, or ``part``, their factor file, read by the
    task. ``pair_query``/``pair_user`` (p,): (query, user within the block) pairs excluded (a
    user who rated the item, or the query user itself). ``allowed`` (n,) bool: users that may be
    chosen at all (None: all).
    """

    start: int
    factors: np.ndarray | None = None
    bias: np.ndarray | None = None
    part: PartRef | None = None
    pair_query: np.ndarray | None = None
    pair_user: np.ndarray | None = None
    allowed: np.ndarray | None = None

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        if self.part is None:
            return self.factors, self.bias
        p = read_part(self.part)
        return p.factors, p.bias


def score_users(q: Queries, factors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Scores (m, n) float32 of the queries against users with ``factors`` (n, rank) and
    ``bias`` (n,); see :class:`Queries`."""
    dots = np.matmul(q.factors, np.ascontiguousarray(factors, dtype=np.float32).T)
    if q.cosine:
        norm = np.linalg.norm(factors.astype(np.float32, copy=False), axis=1)
        has = norm > 0
        dots /= np.where(has, norm, 1.0)[None, :]
        dots[:, ~has] = -np.inf
        return dots
    dots += q.offset.astype(np.float32)[:, None]
    dots += bias.astype(np.float32)[None, :]
    return dots


def top_users_block_task(block: UserBlock, q: Queries) -> tuple[np.ndarray, np.ndarray]:
    """The top ``q.k`` users of this block for every query: (users (m, k'), scores (m, k')),
    users as dense indices of the model, k' <= k (runs on a worker; its name shows on the
    dashboard)."""
    factors, bias = block.resolve()
    m, n = len(q.offset), len(bias)
    top = RunningTop(m, q.k)
    tile = max(1, int(q.tile_users or DEFAULT_TILE_BYTES // max(1, 8 * m)))
    with blas_single_thread():
        for a in range(0, n, tile):
            e = min(n, a + tile)
            s = score_users(q, factors[a:e], bias[a:e])
            if block.allowed is not None:
                s[:, ~block.allowed[a:e]] = -np.inf
            if block.pair_user is not None:
                sel = (block.pair_user >= a) & (block.pair_user < e)
                s[block.pair_query[sel], block.pair_user[sel] - a] = -np.inf
            top.add(s, block.start + a)
    return top.cols, top.vals


def user_blocks(
    model: Model,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    allowed: np.ndarray | None = None,
) -> list[UserBlock]:
    """The model's user side as :class:`UserBlock`: one, in hand, for a side in memory; one
    per factor file for a side on disk. ``pairs`` = (query, user) dense indices to exclude;
    ``allowed`` (n_users,) bool."""
    users = model.users
    if users.in_memory or not users.parts:
        bounds = np.array([0, users.n_rows], dtype=np.int64)
    else:
        bounds = users.bounds
    blocks = []
    for b in range(len(bounds) - 1):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        pq = pu = None
        if pairs is not None:
            sel = (pairs[1] >= lo) & (pairs[1] < hi)
            pq, pu = pairs[0][sel], pairs[1][sel] - lo
        al = None if allowed is None else allowed[lo:hi]
        if users.in_memory or not users.parts:
            f, c = users.factors, users.bias
            blocks.append(UserBlock(lo, f[lo:hi], c[lo:hi], None, pq, pu, al))
        else:
            blocks.append(UserBlock(lo, None, None, users.parts[b], pq, pu, al))
    return blocks


def top_users(
    model: Model,
    q: Queries,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    allowed: np.ndarray | None = None,
    client=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The top ``q.k`` users of every query, over the whole user side.

    Returns (query, rank, user, score): flat arrays sorted by query then rank; ``user`` is a
    dense index. With ``client`` and a user side on disk, one task per user block on the
    cluster (each reads its factor file there); otherwise a local loop, one block at a time.
    """
    blocks = user_blocks(model, pairs, allowed)
    top = RunningTop(len(q.offset), q.k)
    if client is not None and any(b.part is not None for b in blocks):
        [q_f] = client.scatter([q], broadcast=True, hash=False)
        results = run_windowed(
            client, top_users_block_task, len(blocks), lambda j: (blocks[j], (q_f,)), "top-users"
        )
        for cols, vals in results:
            top.merge(cols, vals)
    else:
        for block in blocks:
            top.merge(*top_users_block_task(block, q))
    return top.result()
