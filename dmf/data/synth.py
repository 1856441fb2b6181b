"""Planted-truth ratings (or implicit-feedback events) of any size, streamed to Parquet or CSV.

The ratings follow the model dmf fits, so tests and benchmarks can check recovery::

    r_ij = mu + b_i + c_j + u_i . v_j + N(0, noise^2)      then clip, then round

With ``synth.implicit`` (``dmf synth --implicit``) the output is implicit feedback instead:
events (plays, clicks), whose items carry a planted preference (see *Implicit feedback* below).

- ``U`` (n_users x rank) and ``V`` (n_items x rank) have entries of variance
  ``factor_scale / sqrt(rank)``, so the interaction ``u_i . v_j`` has standard deviation
  ``factor_scale`` whatever the rank; biases ``b`` and ``c`` are N(0, bias_scale^2). All float32,
  as dmf's own factors. ``tail_rank`` more columns (of ``U`` and ``V`` in ``truth.npz``) add
  signal beyond the low rank, the k-th with variance proportional to 1/k, ``tail_scale^2`` in
  all: with few ratings per user, skewed activity and star rounding, such data overfits as real
  ratings do (the defaults are judged on it: ``tests/test_defaults.py``).
- User activity and item popularity are Zipf-like: the user (item) of popularity rank k (1-based,
  ranks assigned by a seeded permutation) has weight ``w_k = integral_k^{k+1} x^-s dx``, about
  ``k^-s``, with ``s`` = ``user_skew`` (``item_skew``); ``s = 0`` is uniform.
- Each user's number of ratings is drawn once for the whole run (multinomial over the activity
  weights, capped at ``n_items``, the excess redrawn among users with room), so the counts sum to
  exactly ``n_ratings``. Each user then rates that many *distinct* items, a weighted sample
  without replacement from the popularity weights: the first distinct items of an endless stream
  of popularity draws (successive sampling), or, for users who rate a large share of all items,
  the same distribution through Gumbel top-k keys.

Implicit feedback (``synth.implicit``): ``U``, ``V`` (with the tail), the activity and popularity
weights and the per-user counts are drawn as above (``mu``, ``noise``, ``bias_scale``, ``clip``
and ``round_to`` do not apply); a user's count is now its number of event
*rows* (at most ``n_items``; they sum to exactly ``n_ratings``). Each row's item is drawn, with
replacement, from::

    P(item j | user i)  proportional to  w_j exp(beta u_i . v_j)

``w_j`` the popularity weight, ``beta = PREFERENCE_NATS / sqrt(factor_scale^2 + tail_scale^2)``
(2 nats over the planted scores' standard deviation: beta = 4 at the default factor_scale 0.5;
0 without factors, which leaves popularity alone).
The preference term then varies by about 2 nats over a user's items against popularity's
``item_skew`` (0.8 by default): preference clearly beats popularity, and the factors are
recoverable from the events; ``factor_scale`` only scales ``U`` and ``V`` (and, with the tail,
their share against it). Drawn with replacement, a user's favourite items come up again and
again: those are repeated rows of one (user, item) pair, each its own event with its own
timestamp, which ingest adds up (``data.duplicates: sum``). Each row's rating column is the
event's count, ``1 + G`` with G geometric(1/2) (1, 2, 3, ... with probability 1/2, 1/4, 1/8,
...; mean 2). Sampling a user's row costs a pass over every item (its scores, summed dimension by
dimension, and their cumulative probabilities, in sub-batches of users of bounded size), so the
time grows with users x items x (rank + tail_rank), not with the rows: fine up to about 1e10
user-item cells (1M events of 20k users x 2k items at rank 8: about a second). Memory adds
``top_items`` (40 bytes a user) and about 40 MiB per generating thread for a sub-batch. ``truth.npz`` also holds ``beta``, ``log_popularity`` (log w_j, normalised, by
item id) and ``top_items``: each user's ``TOP_ITEMS`` items of highest ``u_i . v_j``, best first;
its ``b``, ``c``, ``mu`` and ``noise`` are 0 (the model of implicit feedback has none). The
summary (``synth.json``) adds ``distinct_pairs``, ``repeated_rows``, ``beta``, and the mean
planted score of the rows' items against what popularity alone would give
(``event_score_mean``, ``popularity_score_mean``).

Every random number after the global set-up (counts, factors, permutations, all from ``seed``) is
a counter-based hash of (seed, stream, user, draw or item) (splitmix64, :mod:`dmf.data.hashing`),
not the state of a generator, so each user's items, ratings and timestamps depend on nothing but
the seed and that user: the output is identical whatever the chunk size, and chunks are
independent. Memory is the factor matrices and per-user counts plus one chunk of ratings; the
chunk size bounds it, not ``n_ratings``.

Output directory (a local path or a URL: ``s3://bucket/prefix``)::

    out/ratings/part-NNNNN.TOKEN.parquet|csv   user, item (int64), rating (float32; implicit:
                                         the event's count), timestamp (int64), sorted by (user,
                                         item[, timestamp]); files hold contiguous user ranges
    out/truth.TOKEN.npz                  U, V, b, c, mu, noise (implicit: and beta,
                                         log_popularity, top_items)
    out/synth.json                       the settings and a summary (counts, rating range, ...),
                                         and the manifest: every file with its size and CRC-32

It is written as a :class:`dmf.store.storage.Commit`: every file under a name carrying the
version's TOKEN, ``synth.json`` last. The manifest maps each file's logical name
(``ratings/part-00000.parquet``, ``truth.npz``) to its actual name; ``dmf ingest`` reads a synth
output through it (:func:`dmf.data.readers.resolve_inputs`), and :func:`synth_files` and
:func:`load_truth` find the files.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dmf import __version__
from dmf.config import SynthConfig
from dmf.data.hashing import MASK64, bits, splitmix64
from dmf.dist.tasks import progress_disabled
from dmf.errors import ConfigError, DmfError
from dmf.store.storage import (
    Commit,
    Location,
    clean,
    entries_of,
    read_manifest,
    read_verified,
)

log = logging.getLogger(__name__)

__all__ = [
    "synth",
    "synth_files",
    "load_truth",
    "OutputExistsError",
    "RATINGS_SCHEMA",
    "DEFAULT_CHUNK_RATINGS",
    "MANIFEST",
]

MANIFEST = "synth.json"
"""The summary and manifest of a synth output, written last."""

RATINGS_SCHEMA = pa.schema(
    [
        ("user", pa.int64()),
        ("item", pa.int64()),
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),
    ]
)
PARQUET_COMPRESSION = "zstd"
"""As in the store; files about 25% smaller than snappy's at about the same total CPU."""
DEFAULT_CHUNK_RATINGS = 1_000_000
"""Ratings generated per chunk. Peak memory is about 250 bytes a rating for each chunk in flight
(one per generating thread, plus up to two queued for writing), plus the factors and per-user
counts: about 450 MiB at 1M users x 100k items, the same for 10M and for 100M ratings."""

# Timestamps are uniform over [2000-01-01, 2024-01-01) UTC, in seconds.
T0, T1 = 946_684_800, 1_704_067_200
MAX_ITEMS = 2**30  # keeps draw counters below 2**32 (see _sample_sparse)
MAX_USERS = 2**32

# Users who rate more than this share of all items are sampled with Gumbel top-k keys at once:
# successive sampling would spend most draws on items they already have.
DENSE_SHARE = 0.25
MAX_ROUNDS = 6
GUMBEL_ELEMENTS = 1 << 20  # users x items per Gumbel sub-batch (8 MiB of float64 keys)
DOT_ROWS = 1 << 18  # rows per sub-batch of the factor dot products

_STREAM_ITEMS, _STREAM_GUMBEL, _STREAM_NOISE, _STREAM_TIME = 1, 2, 3, 4
_STREAM_EVENTS, _STREAM_COUNTS = 5, 6

PREFERENCE_NATS = 2.0
"""Implicit feedback: the standard deviation, in nats of log-probability, of the preference
term ``beta * u_i . v_j`` over a user's items; beta is this over the planted scores' standard
deviation, ``sqrt(factor_scale^2 + tail_scale^2)``. Popularity's term, ``log w_j``, varies by
about ``item_skew`` nats (0.8 by default): preference clearly dominates which items a user's
events fall on, and popularity still shapes them."""
TOP_ITEMS = 10
"""Implicit feedback: each user's planted top items (highest u_i . v_j) kept in ``truth.npz``."""


class OutputExistsError(DmfError, FileExistsError):
    """The output directory exists and is not empty, and overwrite was not asked for."""


# -- counter-based random numbers ----------------------------------------------------------------


def _stream_key(seed: int, stream: int) -> np.uint64:
    """A 64-bit key per (seed, stream), well mixed even for neighbouring seeds."""
    state = np.random.SeedSequence([seed & MASK64, stream]).generate_state(1, dtype=np.uint64)
    return np.uint64(state[0])


def _uniform(h: np.ndarray) -> np.ndarray:
    """Hash values -> float64 uniform on the open interval (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)


def _pair_counter(users: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(user, item or draw index) -> one uint64 counter; both parts are below 2**32."""
    # Non-negative int64 reinterpreted as uint64: a view, not a copy.
    hi = np.ascontiguousarray(users, dtype=np.int64).view(np.uint64) << np.uint64(32)
    return hi | np.ascontiguousarray(cols, dtype=np.int64).view(np.uint64)


def _normal(h: np.ndarray) -> np.ndarray:
    """Hash values -> float32 standard normal, by Box-Muller on two 24-bit uniforms (exact in
    float32; the tail is cut at 5.9 sigma)."""
    scale = np.float32(2.0**-24)
    u1 = (h >> np.uint64(40)).astype(np.float32)
    u1 += np.float32(0.5)
    u1 *= scale
    u2 = ((h >> np.uint64(16)) & np.uint64(0xFFFFFF)).astype(np.float32)
    u2 += np.float32(0.5)
    u2 *= np.float32(2.0 * np.pi) * scale
    np.log(u1, out=u1)
    u1 *= np.float32(-2.0)
    np.sqrt(u1, out=u1)
    np.cos(u2, out=u2)
    u1 *= u2
    return u1


# -- Zipf-like weights ---------------------------------------------------------------------------


class _PowerLaw:
    """Popularity ranks 0..n-1 with P(rank k-1) proportional to integral_k^{k+1} x^-s dx.

    Sampling inverts the continuous CDF on [1, n+1) in closed form (O(1) per draw, no table), and
    the exact discrete weights are available for Gumbel top-k.
    """

    def __init__(self, n: int, s: float):
        self.n, self.s, self.a = n, float(s), 1.0 - float(s)
        self.log_n1 = math.log(n + 1.0)

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """Uniform(0, 1) -> 0-based ranks (int64)."""
        a, n = self.a, self.n
        if self.s == 0:
            x = 1.0 + u * n
        elif abs(a) < 1e-9:
            x = np.exp(u * self.log_n1)
        else:
            # x = (1 + u ((n+1)^a - 1))^(1/a), in log1p/expm1 form for accuracy near s = 1.
            x = np.exp(np.log1p(u * math.expm1(a * self.log_n1)) / a)
        r = x.astype(np.int64) - 1
        np.clip(r, 0, n - 1, out=r)
        return r

    def log_weights(self) -> np.ndarray:
        """log w_k for ranks k = 1..n (unnormalised), shape (n,), without cancellation."""
        k = np.arange(1, self.n + 1, dtype=np.float64)
        a = self.a
        step = np.log1p(1.0 / k)  # log((k+1)/k)
        if abs(a) < 1e-9:
            return np.log(step)
        # w_k = ((k+1)^a - k^a) / a = k^a * expm1(a log((k+1)/k)) / a
        return a * np.log(k) + np.log(np.expm1(a * step) / a)

    def probabilities(self) -> np.ndarray:
        lw = self.log_weights()
        p = np.exp(lw - lw.max())
        return p / p.sum()


# -- the global plan: truth, permutations, per-user counts ---------------------------------------


class _Plan:
    """Everything drawn once for the run (from ``seed``), shared by all chunks."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        n_u, n_i, k = cfg.n_users, cfg.n_items, cfg.rank
        ss = np.random.SeedSequence(cfg.seed & MASK64)
        rng_truth, rng_users, rng_items, rng_counts = (
            np.random.default_rng(s) for s in ss.spawn(4)
        )
        # Entry variance factor_scale / sqrt(rank): u.v then has variance factor_scale^2.
        sd = math.sqrt(cfg.factor_scale) / math.sqrt(math.sqrt(k)) if k > 0 else 0.0
        # float32, like dmf's own factors: half the memory traffic when gathering rows.
        self.U = rng_truth.normal(0.0, sd, (n_u, k)).astype(np.float32)
        self.V = rng_truth.normal(0.0, sd, (n_i, k)).astype(np.float32)
        self.b = rng_truth.normal(0.0, cfg.bias_scale, n_u).astype(np.float32)
        self.c = rng_truth.normal(0.0, cfg.bias_scale, n_i).astype(np.float32)
        if cfg.tail_rank:
            # Signal beyond the low rank: tail_rank more dimensions whose k-th carries variance
            # proportional to 1/k (a slowly decaying spectrum, as real rating matrices have),
            # in total tail_scale^2. Drawn from a stream of their own: without a tail, every
            # other number is as before.
            rng_tail = np.random.default_rng(ss.spawn(1)[0])
            w = 1.0 / np.arange(1, cfg.tail_rank + 1)
            col_sd = np.sqrt(cfg.tail_scale * np.sqrt(w / w.sum()))
            tail_u = rng_tail.normal(0.0, 1.0, (n_u, cfg.tail_rank)) * col_sd
            tail_v = rng_tail.normal(0.0, 1.0, (n_i, cfg.tail_rank)) * col_sd
            self.U = np.hstack([self.U, tail_u.astype(np.float32)])
            self.V = np.hstack([self.V, tail_v.astype(np.float32)])
        # user_rank[u] / item_rank[j]: popularity rank of each id; item_of_rank inverts it.
        user_rank = rng_users.permutation(n_u)
        self.item_of_rank = rng_items.permutation(n_i)
        self.item_rank = np.empty(n_i, dtype=np.int64)
        self.item_rank[self.item_of_rank] = np.arange(n_i)
        self.items = _PowerLaw(n_i, cfg.item_skew)
        self.item_log_w = self.items.log_weights()[self.item_rank]  # by item id
        p_user = _PowerLaw(n_u, cfg.user_skew).probabilities()[user_rank]
        self.counts = _user_counts(p_user, cfg.n_ratings, n_i, rng_counts)
        self.cum = np.concatenate([[0], np.cumsum(self.counts)])
        self.keys = {
            s: _stream_key(cfg.seed, s)
            for s in (
                _STREAM_ITEMS,
                _STREAM_GUMBEL,
                _STREAM_NOISE,
                _STREAM_TIME,
                _STREAM_EVENTS,
                _STREAM_COUNTS,
            )
        }
        if cfg.implicit:
            self._implicit_plan()

    def _implicit_plan(self) -> None:
        """What implicit feedback adds: beta, the items' popularity as probabilities, the
        factors laid out for the score sums, and room for each user's top items."""
        cfg = self.cfg
        # The planted scores' standard deviation: factor_scale from the rank, tail_scale from
        # the tail.
        spread = math.hypot(
            cfg.factor_scale if cfg.rank else 0.0, cfg.tail_scale if cfg.tail_rank else 0.0
        )
        self.beta = PREFERENCE_NATS / spread if spread > 0 and self.U.shape[1] else 0.0
        lw = self.item_log_w - self.item_log_w.max()
        self.item_log_p = (lw - math.log(np.exp(lw).sum())).astype(np.float32)
        self.item_p = np.exp(self.item_log_p.astype(np.float64))
        self.VT = np.ascontiguousarray(self.V.T)
        self.top_k = min(TOP_ITEMS, cfg.n_items)
        self.top_items = np.zeros((cfg.n_users, self.top_k), dtype=np.int32)


def _user_counts(p: np.ndarray, n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: multinomial(n, p), each at most ``cap``, summing to exactly ``n``.

    Users over the cap give their excess back; it is redrawn among users with room, in
    proportion to their weights (a handful of rounds, each vectorised over users).
    """
    counts = rng.multinomial(n, p).astype(np.int64)
    excess = 0
    for _ in range(64):
        excess += int(np.maximum(counts - cap, 0).sum())
        np.minimum(counts, cap, out=counts)
        if excess == 0:
            return counts
        q = np.where(counts < cap, p, 0.0)
        if not q.sum() > 0:  # the users with room have weights that underflowed to 0
            break
        counts += rng.multinomial(excess, q / q.sum())
        excess = 0
    # Pathological corners (extreme skew, nearly every user full): the rest in user order.
    excess += int(np.maximum(counts - cap, 0).sum())
    np.minimum(counts, cap, out=counts)
    room = cap - counts
    take = np.minimum(room, np.maximum(excess - (np.cumsum(room) - room), 0))
    return counts + take


# -- sampling each user's distinct items ---------------------------------------------------------


def _sample_sparse(
    plan: _Plan, users: np.ndarray, ks: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Each user's first ``k`` distinct items of its stream of popularity draws.

    Draw ``j`` of user ``u`` is ``item_of_rank[ranks(uniform(hash(u, j)))]``. A round draws a
    prefix of ``M`` draws for every unfinished user (M a little above k), removes repeats by one
    sort of (user, item, j) keys, and keeps each user's first k distinct items in draw order. Users
    short of k distinct items redo the round with a longer prefix (the same first draws, so the
    result is the same as if the prefix had been long enough at once). Users still short after
    MAX_ROUNDS are returned for Gumbel sampling.

    Returns lists of user and item arrays, and the users left over.
    """
    n_items = plan.cfg.n_items
    key = plan.keys[_STREAM_ITEMS]
    out_u: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    to_gumbel: list[np.ndarray] = []
    m = np.ceil(ks * 1.1).astype(np.int64) + 2
    act_u, act_k = users, ks
    ib = bits(n_items)
    for rnd in range(MAX_ROUNDS):
        if len(act_u) == 0:
            break
        n_act = len(act_u)
        total = int(m.sum())
        starts = np.cumsum(m) - m
        # Per-user values spread over the user's draws; np.repeat, not a gather, for speed.
        pos = np.repeat(np.arange(n_act, dtype=np.int64), m)
        starts_rep = np.repeat(starts, m)
        j = np.arange(total, dtype=np.int64) - starts_rep
        u01 = _uniform(splitmix64(_pair_counter(np.repeat(act_u, m), j), key))
        item = np.take(plan.item_of_rank, plan.items.ranks(u01))
        del u01
        # One sort groups equal (user, item) pairs, earliest draw first.
        db, ub = bits(int(m.max())), bits(n_act)
        if ub + ib + db <= 63:
            comp = (pos << (ib + db)) | (item << db) | j
            comp.sort()
            s_pos = comp >> (ib + db)
            s_item = (comp >> db) & ((1 << ib) - 1)
            s_j = comp & ((1 << db) - 1)
            del comp
        else:  # ids too wide to pack in 63 bits: the same order by a lexsort
            order = np.lexsort((j, item, pos))
            s_pos, s_item, s_j = pos[order], item[order], j[order]
        del item, j
        first = np.ones(total, dtype=bool)
        first[1:] = (s_pos[1:] != s_pos[:-1]) | (s_item[1:] != s_item[:-1])
        distinct = np.bincount(s_pos[first], minlength=n_act)
        done = distinct >= act_k
        # Rank the first occurrences by draw order within each user; keep ranks below k. Sorted
        # by user first, each user still holds its m draws: starts_rep applies unchanged.
        orig = starts_rep + s_j
        is_first = np.zeros(total, dtype=bool)
        is_first[orig[first]] = True
        before = np.cumsum(is_first) - is_first
        rank = before - np.repeat(before[starts], m)
        keep_orig = is_first & (rank < np.repeat(act_k, m)) & np.repeat(done, m)
        keep = np.take(keep_orig, orig)
        out_u.append(act_u[s_pos[keep]])
        out_i.append(s_item[keep])
        del s_pos, s_item, s_j, first, orig, is_first, before, rank, keep_orig, keep, pos
        del starts_rep
        short = ~done
        # Longer prefix for the users still short: scale by the distinct yield seen so far.
        grow = m[short] * act_k[short] / np.maximum(distinct[short], 1) * 1.25
        m = np.ceil(grow).astype(np.int64) + 8
        act_u, act_k = act_u[short], act_k[short]
        limit = np.minimum(16 * act_k + 64, 4 * n_items)
        if rnd + 1 == MAX_ROUNDS:
            break
        over = m > limit
        if over.any():  # successive sampling is too wasteful for these: Gumbel instead
            to_gumbel.append(act_u[over])
            act_u, act_k, m = act_u[~over], act_k[~over], m[~over]
    to_gumbel.append(act_u)
    return out_u, out_i, np.concatenate(to_gumbel)


def _sample_gumbel(plan: _Plan, users: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A weighted sample of ``k`` distinct items per user by Gumbel top-k keys.

    ``log w_item + Gumbel(hash(u, item))``: the k largest keys are a sample without replacement
    with the popularity weights, the same distribution as successive sampling. Costs O(n_items)
    per user, so it is used for users who rate a large share of the items (or whom successive
    sampling could not finish).
    """
    n_items = plan.cfg.n_items
    key = plan.keys[_STREAM_GUMBEL]
    rows = max(1, GUMBEL_ELEMENTS // n_items)
    cols = np.arange(n_items, dtype=np.int64)
    out_u, out_i = [], []
    for s in range(0, len(users), rows):
        uu, kk = users[s : s + rows], ks[s : s + rows]
        if (kk == n_items).all():
            sel = np.ones((len(uu), n_items), dtype=bool)
        else:
            h = splitmix64(_pair_counter(uu[:, None], cols[None, :]), key)
            keys = plan.item_log_w[None, :] - np.log(-np.log(_uniform(h)))
            del h
            kmax = int(kk.max())
            top = np.argsort(-keys, axis=1)[:, :kmax]
            valid = np.arange(kmax)[None, :] < kk[:, None]
            sel = np.zeros((len(uu), n_items), dtype=bool)
            rr = np.broadcast_to(np.arange(len(uu))[:, None], top.shape)
            sel[rr[valid], top[valid]] = True
        r, it = np.nonzero(sel)  # row-major: sorted by (user, item)
        out_u.append(uu[r])
        out_i.append(it.astype(np.int64))
    if not out_u:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(out_u), np.concatenate(out_i)


def _chunk_pairs(plan: _Plan, ua: int, ub: int) -> tuple[np.ndarray, np.ndarray]:
    """All (user, item) pairs of users ``ua..ub-1``, sorted by (user, item), int64."""
    ks = plan.counts[ua:ub]
    users = np.arange(ua, ub, dtype=np.int64)
    has = ks > 0
    users, ks = users[has], ks[has]
    dense = ks > DENSE_SHARE * plan.cfg.n_items
    u_parts, i_parts, rest = _sample_sparse(plan, users[~dense], ks[~dense])
    g_users = np.concatenate([users[dense], rest])
    if len(g_users):
        g_ks = plan.counts[g_users]
        gu, gi = _sample_gumbel(plan, g_users, g_ks)
        u_parts.append(gu)
        i_parts.append(gi)
    if not u_parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    u = np.concatenate(u_parts)
    i = np.concatenate(i_parts)
    ib = bits(plan.cfg.n_items)
    comp = ((u - ua) << ib) | i
    comp.sort()
    return (comp >> ib) + ua, comp & ((1 << ib) - 1)


@dataclass
class _Stats:
    """Statistics of written ratings: of one chunk, or summed over the chunks so far."""

    item_counts: np.ndarray
    """Ratings per item, shape (n_items,), int64."""
    n: int = 0
    rating_sum: float = 0.0
    sq_err: float = 0.0
    """Sum of squared differences from the noise-free ratings (float64)."""
    lowest: float = math.inf
    highest: float = -math.inf
    distinct: int = 0
    """Implicit feedback: distinct (user, item) pairs (the others are repeated rows)."""
    event_score: float = 0.0
    """Implicit feedback: sum of the planted scores u_i . v_j of the rows' items (float64)."""
    popularity_score: float = 0.0
    """Implicit feedback: what that sum would be in expectation, were the items drawn by
    popularity alone (each row's user's score averaged over the popularity weights)."""
    first_user: int = 0
    top: np.ndarray | None = None
    """Implicit feedback: the planted top items of users ``first_user`` on (one chunk's)."""

    def add(self, other: _Stats) -> None:
        self.item_counts += other.item_counts
        self.n += other.n
        self.rating_sum += other.rating_sum
        self.sq_err += other.sq_err
        self.lowest = min(self.lowest, other.lowest)
        self.highest = max(self.highest, other.highest)
        self.distinct += other.distinct
        self.event_score += other.event_score
        self.popularity_score += other.popularity_score


def _chunk_table(plan: _Plan, ua: int, ub: int) -> tuple[pa.Table, _Stats]:
    """Ratings of users ``ua..ub-1`` as an Arrow table, and their statistics.

    Worked in sub-batches of DOT_ROWS so the gathered factor rows stay cache-sized; float32
    throughout (the truth is float32, and the noise dwarfs float32 rounding).
    """
    cfg = plan.cfg
    if cfg.implicit:
        return _implicit_chunk_table(plan, ua, ub)
    u, i = _chunk_pairs(plan, ua, ub)
    n = len(u)
    r32 = np.empty(n, dtype=np.float32)
    ts = np.empty(n, dtype=np.int64)
    sq_err = 0.0
    for s in range(0, n, DOT_ROWS):
        us, is_ = u[s : s + DOT_ROWS], i[s : s + DOT_ROWS]
        # np.take: several times faster than fancy indexing for gathering rows.
        clean = np.take(plan.b, us) + np.take(plan.c, is_)
        clean += np.float32(cfg.mu)
        if plan.U.shape[1]:
            clean += np.einsum(
                "ij,ij->i", np.take(plan.U, us, axis=0), np.take(plan.V, is_, axis=0)
            )
        counter = _pair_counter(us, is_)
        r = _normal(splitmix64(counter, plan.keys[_STREAM_NOISE]))
        r *= np.float32(cfg.noise)
        r += clean
        if cfg.clip is not None:
            np.clip(r, cfg.clip[0], cfg.clip[1], out=r)
        if cfg.round_to is not None:
            # floor(x + 1/2) rather than numpy's half-to-even; then back inside the clip range
            # in case its ends are not multiples of round_to.
            step = np.float32(cfg.round_to)
            r = np.floor(r / step + np.float32(0.5)) * step
            if cfg.clip is not None:
                np.clip(r, cfg.clip[0], cfg.clip[1], out=r)
        r32[s : s + DOT_ROWS] = r
        sq_err += float(np.square(r - clean, dtype=np.float64).sum())
        # Uniform timestamp in [T0, T1): high 32 hash bits times the span, top 32 bits of that.
        h = splitmix64(counter, plan.keys[_STREAM_TIME]) >> np.uint64(32)
        h *= np.uint64(T1 - T0)
        h >>= np.uint64(32)
        ts[s : s + DOT_ROWS] = h.view(np.int64)
    ts += T0
    stats = _Stats(
        item_counts=np.bincount(i, minlength=cfg.n_items),
        n=n,
        rating_sum=float(r32.sum(dtype=np.float64)),
        sq_err=sq_err,
        lowest=float(r32.min()) if n else math.inf,
        highest=float(r32.max()) if n else -math.inf,
    )
    table = pa.Table.from_arrays(
        [pa.array(u), pa.array(i), pa.array(r32), pa.array(ts)], schema=RATINGS_SCHEMA
    )
    return table, stats


# -- implicit feedback: planted-preference events -------------------------------------------------


def _scores(plan: _Plan, users: np.ndarray) -> np.ndarray:
    """Planted scores u_i . v_j of ``users`` for every item, float32, shape (len(users),
    n_items).

    Summed dimension by dimension with elementwise NumPy operations, never a matrix product:
    a BLAS kernel's rounding may depend on the shape of the product, and so on how users are
    batched; here each score is the same whatever the chunk.
    """
    n_dims = plan.U.shape[1]
    out = np.zeros((len(users), plan.cfg.n_items), dtype=np.float32)
    if n_dims == 0:
        return out
    uu = np.take(plan.U, users, axis=0)
    tmp = np.empty_like(out)
    for d in range(n_dims):
        np.multiply(uu[:, d : d + 1], plan.VT[d][None, :], out=tmp)
        out += tmp
    return out


def _top_items(score: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` items of highest score, best first, int32, shape (rows, k)."""
    n = score.shape[1]
    if k < n:
        idx = np.argpartition(-score, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(n), score.shape)
    order = np.argsort(-np.take_along_axis(score, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int32)


def _search_rows(cum: np.ndarray, rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each draw, the first column ``j`` of row ``rows[d]`` of ``cum`` (non-decreasing
    along rows) with ``cum[rows[d], j] > target[d]``: a binary search, vectorised over the
    draws. Every target is below its row's last value."""
    n = cum.shape[1]
    flat = cum.ravel()
    base = rows.astype(np.int64) * n
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), n - 1, dtype=np.int64)
    for _ in range(bits(n) + 1):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) >> 1
        right = active & (np.take(flat, base + mid) <= target)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return lo


def _implicit_chunk_table(plan: _Plan, ua: int, ub: int) -> tuple[pa.Table, _Stats]:
    """Events of users ``ua..ub-1`` as an Arrow table (sorted by user, item, timestamp), and
    their statistics.

    For each sub-batch of users (at most GUMBEL_ELEMENTS users x items): every item's planted
    score (:func:`_scores`), the users' top items, and the cumulative event probabilities
    ``p_ij`` proportional to ``w_j exp(beta u_i . v_j)`` (float64 sums along each user's row,
    so a user's draws depend on nothing else). Draw ``j`` of user ``u`` inverts that
    distribution at ``uniform(hash(u, j))``; its count is ``1 + G`` with G geometric(1/2) and
    its timestamp uniform, both hashed from (u, j).
    """
    cfg = plan.cfg
    n_items = cfg.n_items
    users = np.arange(ua, ub, dtype=np.int64)
    ks = plan.counts[ua:ub]
    rows = max(1, GUMBEL_ELEMENTS // n_items)
    top = np.empty((ub - ua, plan.top_k), dtype=np.int32)
    beta = np.float32(plan.beta)
    parts_u, parts_i, parts_j = [], [], []
    event_score = popularity_score = 0.0
    for s in range(0, ub - ua, rows):
        uu, kk = users[s : s + rows], ks[s : s + rows]
        score = _scores(plan, uu)
        top[s : s + len(uu)] = _top_items(score, plan.top_k)
        has = kk > 0
        if not has.any():
            continue
        uu, kk, score = uu[has], kk[has], score[has]
        popularity_score += float(kk @ (score.astype(np.float64) @ plan.item_p))
        logit = score * beta
        logit += plan.item_log_p[None, :]
        logit -= logit.max(axis=1, keepdims=True)
        np.exp(logit, out=logit)
        cum = np.cumsum(logit, axis=1, dtype=np.float64)
        del logit
        r = np.repeat(np.arange(len(uu), dtype=np.int64), kk)
        j = np.arange(len(r), dtype=np.int64) - np.repeat(np.cumsum(kk) - kk, kk)
        u_rep = uu[r]
        u01 = _uniform(splitmix64(_pair_counter(u_rep, j), plan.keys[_STREAM_EVENTS]))
        total = cum[:, -1]
        # Below the row's total even where u01 * total rounds up to it.
        target = np.minimum(u01 * total[r], np.nextafter(total, 0.0)[r])
        item = _search_rows(cum, r, target)
        del cum, target, u01
        event_score += float(np.take(score.ravel(), r * n_items + item).sum(dtype=np.float64))
        parts_u.append(u_rep)
        parts_i.append(item)
        parts_j.append(j)
    if parts_u:
        u, i, j = (np.concatenate(p) for p in (parts_u, parts_i, parts_j))
    else:
        u = i = j = np.empty(0, dtype=np.int64)
    counter = _pair_counter(u, j)
    # Count 1 + G, G ~ geometric(1/2) on {0, 1, ...}: P(G >= g) = 2^-g.
    g = np.floor(-np.log2(_uniform(splitmix64(counter, plan.keys[_STREAM_COUNTS]))))
    count = (1.0 + g).astype(np.float32)
    h = splitmix64(counter, plan.keys[_STREAM_TIME]) >> np.uint64(32)
    h *= np.uint64(T1 - T0)
    h >>= np.uint64(32)
    ts = h.view(np.int64) + T0
    del counter, h, g
    order = np.lexsort((j, ts, i, u))
    u, i, count, ts = u[order], i[order], count[order], ts[order]
    n = len(u)
    repeats = int(((u[1:] == u[:-1]) & (i[1:] == i[:-1])).sum()) if n else 0
    stats = _Stats(
        item_counts=np.bincount(i, minlength=n_items),
        n=n,
        rating_sum=float(count.sum(dtype=np.float64)),
        lowest=float(count.min()) if n else math.inf,
        highest=float(count.max()) if n else -math.inf,
        distinct=n - repeats,
        event_score=event_score,
        popularity_score=popularity_score,
        first_user=ua,
        top=top,
    )
    table = pa.Table.from_arrays(
        [pa.array(u), pa.array(i), pa.array(count), pa.array(ts)], schema=RATINGS_SCHEMA
    )
    return table, stats


# -- layout: files and chunks --------------------------------------------------------------------


def _file_bounds(cum: np.ndarray, files: int) -> np.ndarray:
    """User boundaries of ``files`` files with about equal rating counts, shape (files + 1,)."""
    n_users = len(cum) - 1
    targets = np.round(np.arange(1, files) * (cum[-1] / files))
    inner = np.searchsorted(cum, targets, side="left")
    return np.concatenate([[0], np.clip(inner, 0, n_users), [n_users]]).astype(np.int64)


def _chunk_bounds(cum: np.ndarray, ua: int, ub: int, chunk: int) -> np.ndarray:
    """Split users ``ua..ub-1`` into runs of at most ``chunk`` ratings (or one user)."""
    targets = np.arange(cum[ua] + chunk, cum[ub], chunk)
    cuts = np.searchsorted(cum, targets, side="right") - 1
    return np.unique(np.concatenate([[ua], np.clip(cuts, ua + 1, ub), [ub]]))


def _pairs(bounds: np.ndarray) -> Iterator[tuple[int, int]]:
    return zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)


def _threads(threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be positive")
        return threads
    return max(
        1,
        min(
            4,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1),
        ),
    )


# -- generating and writing ----------------------------------------------------------------------


def _generate(
    plan: _Plan, chunks: list[tuple[int, int, int]], threads: int
) -> Iterator[tuple[int, pa.Table, _Stats]]:
    """Chunk tables in order, made by ``threads`` threads (NumPy releases the GIL in the heavy
    steps), with at most ``threads + 1`` chunks in memory."""
    with ThreadPoolExecutor(threads, thread_name_prefix="dmf-synth") as pool:
        ahead: deque[tuple[int, Future]] = deque()
        todo = iter(chunks)
        for f, ua, ub in todo:
            ahead.append((f, pool.submit(_chunk_table, plan, ua, ub)))
            if len(ahead) > threads:
                break
        while ahead:
            f, fut = ahead.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append((nxt[0], pool.submit(_chunk_table, plan, nxt[1], nxt[2])))
            table, st = fut.result()
            yield f, table, st


class _Writer:
    """Writes one file of the commit at a time; runs on a background thread so generation
    overlaps I/O."""

    def __init__(self, commit: Commit, fmt: str, rounded: bool):
        self.commit = commit
        self.fmt = fmt
        # Dictionary pages pay off for sorted users, for items, and for ratings on a star scale;
        # random timestamps (and unrounded ratings) only waste time on them.
        self.dictionary = ["user", "item"] + (["rating"] if rounded else [])
        self.w: pq.ParquetWriter | pacsv.CSVWriter | None = None
        self.file: contextlib.AbstractContextManager | None = None
        """The file being written (:meth:`Commit.open`), listed in the commit when closed."""

    def open(self, rel: str) -> None:
        self.file = self.commit.open(rel)
        sink = self.file.__enter__()
        if self.fmt == "parquet":
            self.w = pq.ParquetWriter(
                sink,
                RATINGS_SCHEMA,
                compression=PARQUET_COMPRESSION,
                use_dictionary=self.dictionary,
            )
        else:
            self.w = pacsv.CSVWriter(sink, RATINGS_SCHEMA)

    def write(self, table: pa.Table) -> None:
        assert self.w is not None
        if self.fmt == "parquet":
            self.w.write_table(table, row_group_size=max(len(table), 1))
        else:
            self.w.write_table(table)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w = None
        if self.file is not None:
            file, self.file = self.file, None
            file.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the file being written, after an error (the commit deletes the others)."""
        w, self.w = self.w, None
        if w is not None:
            with contextlib.suppress(Exception):
                w.close()
        if self.file is not None:
            file, self.file = self.file, None
            error = RuntimeError("synth: write aborted")
            with contextlib.suppress(Exception):
                file.__exit__(RuntimeError, error, None)  # deletes the partial file


class _RatingFiles:
    """The rating files ``paths`` (logical names in the commit), filled in order by a
    :class:`_Writer` on one background thread. A file that gets no chunk is still written
    (empty)."""

    def __init__(self, pool: ThreadPoolExecutor, writer: _Writer, paths: list[str]):
        self.pool, self.writer, self.paths = pool, writer, paths
        self.pending: deque[Future] = deque()
        self.opened = -1

    def _submit(self, fn: Callable, *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        # Bounded queue: at most one chunk being written while the next ones are made.
        while len(self.pending) > 2:
            self.pending.popleft().result()

    def _open_up_to(self, f: int) -> None:
        while self.opened < f:
            if self.opened >= 0:
                self._submit(self.writer.close)
            self.opened += 1
            self._submit(self.writer.open, self.paths[self.opened])

    def write(self, f: int, table: pa.Table) -> None:
        """Append ``table`` to file ``f`` (files are written in order)."""
        self._open_up_to(f)
        if len(table):
            self._submit(self.writer.write, table)

    def finish(self) -> None:
        """Write the remaining files and wait for every write."""
        self._open_up_to(len(self.paths) - 1)
        self._submit(self.writer.close)
        while self.pending:
            self.pending.popleft().result()


def _write_ratings(
    plan: _Plan, commit: Commit, paths: list[str], chunk_ratings: int, threads: int, bar
) -> _Stats:
    """Generate every rating and write it to the files ``paths`` of ``commit`` (one file per
    user range of about equal rating counts); returns the statistics over all of them."""
    cfg = plan.cfg
    fbounds = _file_bounds(plan.cum, cfg.files)
    chunks = [
        (f, ua, ub)
        for f in range(cfg.files)
        for ua, ub in _pairs(_chunk_bounds(plan.cum, fbounds[f], fbounds[f + 1], chunk_ratings))
    ]
    totals = _Stats(item_counts=np.zeros(cfg.n_items, dtype=np.int64))
    # Counts of implicit feedback are small integers: dictionary pages pay off, as for stars.
    writer = _Writer(commit, cfg.format, cfg.round_to is not None or cfg.implicit)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dmf-synth-write") as pool:
            files = _RatingFiles(pool, writer, paths)
            for f, table, stats in _generate(plan, chunks, threads):
                files.write(f, table)
                totals.add(stats)
                if stats.top is not None:
                    plan.top_items[stats.first_user : stats.first_user + len(stats.top)] = stats.top
                bar.update(len(table))
            files.finish()
    except BaseException:
        writer.abort()  # the pool is shut down: no write is running
        raise
    if totals.n != cfg.n_ratings:  # an internal invariant; never expected to fire
        raise RuntimeError(f"synth wrote {totals.n} ratings, expected {cfg.n_ratings}")
    return totals


def _summary(plan: _Plan, totals: _Stats, names: list[str], seconds: float) -> dict[str, Any]:
    """What ``synth.json`` says: the settings, the counts and the rating statistics."""
    cfg = plan.cfg
    n = cfg.n_ratings
    item_counts = totals.item_counts
    implicit = (
        {
            "feedback": "implicit",
            "beta": plan.beta,
            "distinct_pairs": totals.distinct,
            "repeated_rows": n - totals.distinct,
            "event_score_mean": totals.event_score / n,
            "popularity_score_mean": totals.popularity_score / n,
        }
        if cfg.implicit
        else {"feedback": "explicit"}
    )
    return {
        "dmf_version": __version__,
        "config": cfg.model_dump(mode="json"),
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "n_ratings": n,
        "users_with_ratings": int((plan.counts > 0).sum()),
        "items_with_ratings": int((item_counts > 0).sum()),
        "max_user_ratings": int(plan.counts.max()),
        "median_user_ratings": float(np.median(plan.counts)),
        "max_item_ratings": int(item_counts.max()),
        "median_item_ratings": float(np.median(item_counts)),
        "rating_mean": totals.rating_sum / n,
        "rating_min": totals.lowest,
        "rating_max": totals.highest,
        "noise_rmse": None if cfg.implicit else math.sqrt(totals.sq_err / n),
        **implicit,
        "timestamp_range": [T0, T1 - 1],
        "format": cfg.format,
        "columns": {
            "user": "int64",
            "item": "int64",
            "rating": "float32",
            "timestamp": "int64",
        },
        "ratings": "ratings",
        "ratings_files": names,
        "truth": "truth.npz",
        "seconds": round(seconds, 3),
        "ratings_per_second": round(n / seconds, 1) if seconds > 0 else None,
    }


def _check_out(out: Location, overwrite: bool, ours: set[str] = frozenset()) -> None:
    """Refuse an ``out`` that is a file, or (without ``overwrite``) a directory holding
    anything but the files ``ours`` (relative names) already written by this synth."""
    if out.isfile():
        raise OutputExistsError(f"synth output {out} exists and is not a directory")
    if overwrite or not out.isdir():
        return
    if (set(out.files()) - ours) if ours else out.ls():
        raise OutputExistsError(
            f"synth output {out} is not empty: pass overwrite=True (--overwrite) to replace it, "
            "or choose another directory"
        )


def _write_truth(commit: Commit, plan: _Plan) -> None:
    """``truth.npz``: through a local temporary file, since ``np.savez`` needs a seekable one
    (the bytes are those of ``np.savez`` to a file), then streamed into the commit."""
    cfg = plan.cfg
    if cfg.implicit:
        # The model of implicit feedback has no mean, biases or noise: u_i . v_j alone.
        arrays = {
            "U": plan.U,
            "V": plan.V,
            "b": np.zeros_like(plan.b),
            "c": np.zeros_like(plan.c),
            "mu": np.float64(0.0),
            "noise": np.float64(0.0),
            "beta": np.float64(plan.beta),
            "log_popularity": plan.item_log_p,
            "top_items": plan.top_items,
        }
    else:
        arrays = {
            "U": plan.U,
            "V": plan.V,
            "b": plan.b,
            "c": plan.c,
            "mu": np.float64(cfg.mu),
            "noise": np.float64(cfg.noise),
        }
    with tempfile.TemporaryFile(prefix="dmf-truth-") as tmp:
        np.savez(tmp, **arrays)
        tmp.seek(0)
        with commit.open("truth.npz") as fh:
            shutil.copyfileobj(tmp, fh, 4 << 20)


def _remove_empty_dirs(out: Location, existed: bool) -> None:
    """After a failed synth into a local directory: remove the directories it made, if empty."""
    if not out.is_local:
        return
    for d in [out / "ratings"] + ([] if existed else [out]):
        with contextlib.suppress(OSError):
            os.rmdir(d.url)


def _validate(cfg: SynthConfig) -> None:
    if cfg.implicit and cfg.n_ratings > cfg.n_users * cfg.n_items:
        raise ConfigError(
            f"synth.n_ratings: {cfg.n_ratings} events asked, but a user has at most as many "
            f"event rows as items: {cfg.n_users} users x {cfg.n_items} items allow "
            f"{cfg.n_users * cfg.n_items}; lower n_ratings or raise n_users/n_items"
        )
    if cfg.n_ratings > cfg.n_users * cfg.n_items:
        raise ConfigError(
            f"synth.n_ratings: {cfg.n_ratings} ratings asked, but {cfg.n_users} users x "
            f"{cfg.n_items} items have only {cfg.n_users * cfg.n_items} distinct pairs; "
            "lower n_ratings or raise n_users/n_items"
        )
    if cfg.n_items > MAX_ITEMS:
        raise ConfigError(f"synth.n_items: at most {MAX_ITEMS} items are supported")
    if cfg.n_users > MAX_USERS:
        raise ConfigError(f"synth.n_users: at most {MAX_USERS} users are supported")
    if cfg.clip is not None and cfg.clip[0] > cfg.clip[1]:
        raise ConfigError(f"synth.clip: low {cfg.clip[0]} is above high {cfg.clip[1]}")
    if cfg.round_to is not None and cfg.round_to <= 0:
        raise ConfigError(f"synth.round_to: must be positive, got {cfg.round_to}")


def synth(
    cfg: SynthConfig,
    out: str | Path | Location,
    overwrite: bool = False,
    progress: bool | None = None,
    *,
    chunk_ratings: int = DEFAULT_CHUNK_RATINGS,
    threads: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write planted-truth ratings, the true parameters and a summary to ``out``.

    Parameters
    ----------
    cfg
        The ``synth`` config section (sizes, rank, noise, skews, clip/round, seed, files, format;
        ``implicit``: events of implicit feedback, ``n_ratings`` of them, instead of ratings).
    out
        Output directory: a local path or a URL (a :class:`dmf.store.storage.Location` carries
        its storage options). Written as a :class:`dmf.store.storage.Commit`: the files first,
        ``synth.json`` last, no rename; until then a previous output there stays whole.
    overwrite
        Write into a non-empty ``out``; without it, a non-empty ``out`` is refused before any
        work. Only the previous synth output's files (those its ``synth.json`` lists) are then
        deleted, never anything else.
    progress
        Progress bar: ``None`` shows it only on a terminal.
    chunk_ratings
        Ratings generated per chunk (bounds memory). The output does not depend on it.
    threads
        Threads generating chunks (default: the available cores, at most 4). The output does not
        depend on it.
    options
        Storage options of ``out``'s filesystem (``storage.options``), when ``out`` is not a
        :class:`~dmf.store.storage.Location` already.

    Returns
    -------
    dict
        The summary also written to ``out/synth.json``: counts (``n_ratings``, users and items
        with ratings, max and median ratings per user), rating mean/min/max, ``noise_rmse`` (RMSE
        of the written ratings against the noise-free truth: what a perfect model scores), the
        logical names of the rating files (``ratings_files``), seconds and ratings per second;
        and, as in the manifest, ``files`` (every file's entry) and ``version``. Implicit
        feedback: ``noise_rmse`` is None, and ``distinct_pairs``, ``repeated_rows``, ``beta``,
        ``event_score_mean`` and ``popularity_score_mean`` are added.
    """
    from tqdm import tqdm  # here, not at the top: keeps `import dmf` and the CLI light

    out = Location.of(out, options)
    _validate(cfg)
    _check_out(out, overwrite)
    if chunk_ratings < 1:
        raise ValueError("chunk_ratings must be positive")
    n_threads = _threads(threads)
    t_start = time.perf_counter()
    existed = out.isdir()
    previous = read_manifest(out, MANIFEST, DmfError) if existed else None
    plan = _Plan(cfg)
    ext = "parquet" if cfg.format == "parquet" else "csv"
    names = [f"ratings/part-{f:05d}.{ext}" for f in range(cfg.files)]
    try:
        with Commit(out, MANIFEST) as commit:
            bar = tqdm(
                total=cfg.n_ratings,
                unit=" ratings",
                unit_scale=True,
                desc="synth",
                disable=progress_disabled(progress),
            )
            with bar:
                totals = _write_ratings(plan, commit, names, chunk_ratings, n_threads, bar)
            _write_truth(commit, plan)
            seconds = time.perf_counter() - t_start
            summary = _summary(plan, totals, names, seconds)
            # Again: something may have appeared while we worked.
            ours = {e.path for e in commit.entries.values()}
            _check_out(out, overwrite, ours)
            doc = commit.commit(summary)
    except BaseException:
        _remove_empty_dirs(out, existed)
        raise
    if previous is not None and isinstance(previous.get("files"), list):
        # The output of a dmf that did not version its files: its synth.json listed them by
        # name (the commit could not), and they are the previous version's.
        clean(out, [*previous["files"], previous.get("truth", "truth.npz")])
    n = cfg.n_ratings
    log.debug(
        "synth: %d ratings (%d users x %d items) written to %s in %.1f s (%.2fM ratings/s)",
        n,
        cfg.n_users,
        cfg.n_items,
        out,
        seconds,
        n / seconds / 1e6 if seconds > 0 else float("nan"),
    )
    return doc


def _manifest_of(out: Location) -> dict[str, Any]:
    doc = read_manifest(out, MANIFEST, DmfError)
    if doc is None:
        raise DmfError(f"{out} has no {MANIFEST}: it is not the output of dmf synth")
    return doc


def synth_files(
    out: str | Path | Location, options: Mapping[str, Any] | None = None
) -> dict[str, Location]:
    """Where the files of the synth output ``out`` are: logical name (``ratings/part-00000.parquet``,
    ``truth.npz``) -> actual location, as ``synth.json`` lists them."""
    out = Location.of(out, options)
    return {rel: out / (e.path or rel) for rel, e in entries_of(_manifest_of(out)).items()}


def load_truth(out: str | Path | Location, options: Mapping[str, Any] | None = None) -> dict:
    """The planted truth of the synth output ``out``: ``U``, ``V``, ``b``, ``c``, ``mu``,
    ``noise`` (implicit feedback: and ``beta``, ``log_popularity``, ``top_items``) as arrays,
    read through ``synth.json`` and checked against its size and CRC-32."""
    out = Location.of(out, options)
    entry = entries_of(_manifest_of(out))["truth.npz"]
    data = read_verified(out / (entry.path or "truth.npz"), entry, DmfError)
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}
