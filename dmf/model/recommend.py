"""Top-N recommendation: for a few users on the driver, or for everyone, blockwise on Dask.

Three layers, as in training:

- the maths on arrays (:mod:`dmf.model.scoring`): score a tile of users against every item, mask
  the items each user rated in train, keep the best N with a partial selection, never a full
  sort and never more than one tile of users x items in memory;
- the function run on a worker per user block (:func:`recommend_block_task`): it reads the
  block's train ratings from the store (``by_user/block=NNNNN``) for the seen items, runs the
  maths, and writes its part of the output Parquet (or returns it);
- orchestration (:func:`recommend_all`): item factors and biases broadcast once, one task per
  user block, the parts combined atomically at the end.

Output rows are ``(user, rank, item, score)``: raw user id, rank 1..N, raw item id, predicted
rating. A user with fewer than N unseen items gets fewer rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dmf.dist.cluster import blas_single_thread
from dmf.dist.tasks import run_windowed
from dmf.errors import InputError, ModelError
from dmf.model.ids import check_cold_start, inverse_map
from dmf.model.scoring import SeenItems, csr_rows, recommend_rows
from dmf.model.side import PartRef, read_part
from dmf.store.layout import MANIFEST, BlockRef, Store, read_block_file
from dmf.store.storage import (
    Commit,
    FileEntry,
    Location,
    Target,
    arrow_threads,
    atomic_file,
    open_parquet,
    preflight,
)

if TYPE_CHECKING:
    from dmf.model.model import Model

# Users per task when there is no store to take the blocks from.
_CHUNK_USERS = 100_000
# At most this many users of a side on disk are read on the driver (single calls).
_IN_HAND_USERS = 1_000


def ranked_table(
    query: str, query_ids: pa.Array, rank: np.ndarray, found: str, found_ids, score: np.ndarray
) -> pa.Table:
    """A top-n table: the raw id queried (column ``query``), rank (int32), the raw id found
    (column ``found``), score (float32)."""
    return pa.table(
        {
            query: query_ids,
            "rank": pa.array(rank, type=pa.int32()),
            found: found_ids,
            "score": pa.array(score, type=pa.float32()),
        }
    )


def recs_table(
    user_ids: pa.Array, rank: np.ndarray, item_ids: pa.Array, score: np.ndarray
) -> pa.Table:
    """The output table: raw user id, rank (int32), raw item id, score (float32)."""
    return ranked_table("user", user_ids, rank, "item", item_ids, score)


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
    allowed: np.ndarray | None = None  # (n_items,) bool: the candidates (None: every item)


@dataclass(frozen=True)
class UserRows:
    """Some users' factors (m, rank), biases (m,) and raw ids (m,): in hand, or rows ``local`` of
    a model's factor file, read by the task (a model whose users do not fit in one process)."""

    factors: np.ndarray | None = None
    bias: np.ndarray | None = None
    ids: pa.Array | None = None
    part: PartRef | None = None
    local: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.local) if self.part is not None else len(self.bias)

    def resolve(self) -> tuple[np.ndarray, np.ndarray, pa.Array]:
        if self.part is None:
            return self.factors, self.bias, self.ids
        p = read_part(self.part)
        return p.factors[self.local], p.bias[self.local], p.ids.take(pa.array(self.local))

    def slice(self, a: int, size: int) -> UserRows:
        if self.part is not None:
            return UserRows(part=self.part, local=self.local[a : a + size])
        return UserRows(
            self.factors[a : a + size], self.bias[a : a + size], self.ids.slice(a, size)
        )


def model_rows(
    model: Model, sel: np.ndarray, in_hand: bool = False
) -> list[tuple[np.ndarray, UserRows]]:
    """The model users ``sel`` (sorted dense indices) as :class:`UserRows`, one per model block
    they fall in (one in all for users in memory, or with ``in_hand``: a few users of a side on
    disk, read on the driver from the blocks it keeps); each with the positions in ``sel`` it
    covers."""
    users = model.users
    if in_hand and not users.in_memory:
        # A single call (a few users): their rows from the driver's cached blocks, not a read
        # of each whole block file per call.
        f, b = users.rows(sel)
        return [(np.arange(len(sel)), UserRows(f, b, users.take_ids(sel)))]
    if users.in_memory:
        return [
            (
                np.arange(len(sel)),
                UserRows(users.factors[sel], users.bias[sel], users.take_ids(sel)),
            )
        ]
    blk = users.block_of(sel)
    out = []
    for b in np.unique(blk).tolist():
        pos = np.flatnonzero(blk == b)
        local = sel[pos] - int(users.bounds[b])
        out.append((pos, UserRows(part=users.parts[b], local=local)))
    return out


@dataclass(frozen=True)
class UserPart:
    """The users of one task: their rows in the model, and where their seen items are."""

    users: UserRows
    # Train ratings of these users: the store block and each user's row in it (-1: no train
    # ratings there, e.g. a user the store does not have). None: exclude nothing.
    block: BlockRef | None = None
    rows_in_block: np.ndarray | None = None  # (m,)


def _seen_for_part(part: UserPart, item_map: np.ndarray | None) -> SeenItems:
    m = len(part.users)
    if part.block is None:
        return SeenItems.none(m)
    blk = read_block_file(part.block)
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
    out_file: tuple[Target, str] | None,
    item_map: np.ndarray | None = None,
) -> pa.Table | FileEntry:
    """Top-N for one block of users (runs on a worker; its name shows on the dashboard).

    Returns the block's table, or writes it as the file ``out_file`` = (commit target, name)
    and returns its manifest entry.
    """
    seen = _seen_for_part(part, item_map)
    factors, bias, ids = part.users.resolve()
    with blas_single_thread():
        row, rank, item, score = recommend_rows(
            factors, bias, items.factors, items.bias, items.mu, n, seen, tile_users, items.allowed
        )
    table = recs_table(ids.take(pa.array(row)), rank, items.ids.take(pa.array(item)), score)
    if out_file is None:
        return table
    target, rel = out_file
    return target.write_table(rel, table, compression="zstd")


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
def _parts(
    model: Model, user_idx: np.ndarray, store: Store | None, in_hand: bool
) -> list[UserPart]:
    """Split the model users ``user_idx`` (sorted) into one part per store user block (and per
    model block, for a model whose users are read from their block files, unless ``in_hand``:
    a few users, read on the driver)."""
    if store is None:
        return [
            UserPart(rows)
            for a in range(0, len(user_idx), _CHUNK_USERS)
            for _, rows in model_rows(model, user_idx[a : a + _CHUNK_USERS], in_hand)
        ]
    maps = model.store_maps(store)
    sidx = user_idx if maps.user is None else inverse_map(maps.user, model.n_users)[user_idx]
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
        rows = np.where(sidx[lo:hi] >= 0, sidx[lo:hi] - bounds[b], -1).astype(np.int64)
        for pos, users in model_rows(model, sel, in_hand):
            parts.append(UserPart(users, store.block_ref("user", b), rows[pos]))
    return parts


def _split_part(part: UserPart, size: int) -> list[UserPart]:
    m = len(part.users)
    if m <= size:
        return [part]
    return [
        UserPart(
            part.users.slice(a, size),
            part.block,
            None if part.rows_in_block is None else part.rows_in_block[a : a + size],
        )
        for a in range(0, m, size)
    ]


def _spread(parts: list[UserPart], n_users: int, client) -> list[UserPart]:
    """Fewer blocks than threads would leave workers idle: split blocks into more tasks (each
    reads its block's file; reading is cheap next to scoring)."""
    n_threads = sum(client.nthreads().values()) or 1
    if len(parts) >= 2 * n_threads:
        return parts
    size = max(1, -(-n_users // (2 * n_threads)))
    return [q for p in parts for q in _split_part(p, size)]


def recommend_all(
    model: Model,
    store: Store | str | Path | None,
    n: int = 10,
    users: Sequence[Any] | pa.Array | np.ndarray | None = None,
    client=None,
    out: str | Path | None = None,
    tile_users: int | None = None,
    cold_start: str = "fallback",
    allowed_items: np.ndarray | None = None,
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
        file. Any other path: a directory of Parquet parts. Committed atomically
        (:mod:`dmf.store.storage`).
    tile_users
        Users scored at once per task; the tile is ``tile_users x n_items`` float32.
    allowed_items
        Bool mask (n_items,) of the model's items that may be recommended at all (the
        ``include`` and ``exclude`` filters of :meth:`dmf.Model.recommend`), applied in every
        tile; ``None``: every item.

    Returns
    -------
    pyarrow.Table with columns (user, rank, item, score), ``n`` rows per user (fewer if the user
    has fewer unseen items), ordered by user as given (all users: by block), then rank; or the
    path written.
    """
    check_cold_start(cold_start)
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    if store is not None and not isinstance(store, Store):
        store = Store.open(store)
    wanted = None if users is None else model.as_ids(users, "user")
    if wanted is None:
        user_idx, cold_ids = np.arange(model.n_users, dtype=np.int64), None
    else:
        idx = model.users.index_of(wanted)
        user_idx = np.unique(idx[idx >= 0])
        unknown = wanted.filter(pa.array(idx < 0))
        cold_ids = pc.unique(unknown) if cold_start == "fallback" and len(unknown) else None
    item_map = model.store_maps(store).item if store is not None else None
    if out is not None:
        out = Location.of(out, store.root.options if store is not None else None)
    # The tasks read the store's blocks and write the parts beside ``out``: check every worker
    # can, before any work.
    preflight(
        client,
        reads=[store.root / MANIFEST] if store is not None else [],
        writes=[out.parent] if out is not None else [],
    )
    items = ItemSide(model.item_factors, model.item_bias, model.item_ids, model.mu, allowed_items)
    # A few users given (a single call): on a side on disk, their rows are read on the driver.
    in_hand = wanted is not None and len(user_idx) <= _IN_HAND_USERS
    parts = _parts(model, user_idx, store, in_hand)
    if client is not None:
        parts = _spread(parts, len(user_idx), client)
    cold = None if cold_ids is None else _cold_recs(model, cold_ids, n, tile_users, allowed_items)
    if out is None:
        tables = _run_parts(client, parts, items, n, tile_users, item_map, None)
        table = _concat(tables + ([cold] if cold is not None else []), model)
        return table if wanted is None else _in_given_order(table, wanted)
    if out.name.endswith(".parquet"):
        if out.isdir():
            raise ModelError(f"output {out} is a directory; give a .parquet file name")
        # The parts go to a hidden prefix beside the file, then stream into it in one piece.
        scratch = out.parent / f".{out.name}.parts-{uuid.uuid4().hex[:8]}"
        try:
            with Commit(scratch, RECS_MANIFEST) as c:
                entries = _write_parts(c, client, parts, items, n, tile_users, item_map, cold)
                with atomic_file(out) as fh:
                    _combine([(scratch / e.path, e) for e in entries], fh, model)
        finally:
            scratch.remove()
        return out
    check_recs_replaceable(out)
    with Commit(out, RECS_MANIFEST) as c:
        entries = _write_parts(c, client, parts, items, n, tile_users, item_map, cold)
        if not entries:
            c.write_table("part-00000.parquet", _empty(model))
        c.commit({"what": "recommendations", "n": n, "users": int(len(user_idx))})
    return out


# Starts with "_": Arrow, Spark and pandas skip it when they read the directory as a dataset.
RECS_MANIFEST = "_manifest.json"


def check_recs_replaceable(out: Location) -> None:
    """Refuse to write recommendations into a non-empty directory that holds none."""
    if out.isdir() and not (out / RECS_MANIFEST).exists() and out.ls():
        raise ModelError(
            f"{out} is not a recommendation output but holds {', '.join(out.ls()[:5])}: choose "
            "an empty or new directory for --out (or a .parquet file name)"
        )


def _write_parts(c: Commit, client, parts, items, n, tile_users, item_map, cold) -> list:
    """Each part's recommendations as a file of the commit ``c`` (by the tasks), and the
    fallback recommendations of unknown users; returns the entries, in part order."""
    rels = [f"part-{k:05d}.parquet" for k in range(len(parts))]
    files = [(c.target, rel) for rel in rels]
    entries = _run_parts(client, parts, items, n, tile_users, item_map, files)
    for rel, entry in zip(rels, entries, strict=True):
        c.add(rel, entry)
    if cold is not None:
        entries.append(c.write_table(f"part-{len(parts):05d}.parquet", cold, compression="zstd"))
    return entries


def _run_parts(client, parts, items, n, tile_users, item_map, files) -> list:
    """One :func:`recommend_block_task` per part: on the cluster, or in a local loop."""
    files = files or [None] * len(parts)
    if client is None or not parts:
        return [
            recommend_block_task(p, items, n, tile_users, f, item_map)
            for p, f in zip(parts, files, strict=True)
        ]
    [items_f] = client.scatter([items], broadcast=True, hash=False)
    map_f = None
    if item_map is not None:
        [map_f] = client.scatter([item_map], broadcast=True, hash=False)
    return run_windowed(
        client,
        recommend_block_task,
        len(parts),
        lambda k: (parts[k], (items_f, n, tile_users, files[k], map_f)),
        "recommend-block",
    )


def _in_given_order(table: pa.Table, wanted: pa.Array) -> pa.Table:
    """Rows ordered as the caller listed the users, then by rank."""
    first = pc.unique(wanted)  # may hold a null: an id that is no id of the model's type
    users = table.column("user").combine_chunks()
    pos = pc.index_in(users, value_set=first).fill_null(-1).to_numpy(zero_copy_only=False)
    order = np.lexsort((table.column("rank").to_numpy(), pos))
    return table.take(pa.array(order))


def _cold_recs(
    model: Model, cold_ids: pa.Array, n: int, tile_users: int | None, allowed=None
) -> pa.Table:
    """Fallback recommendations for users the model does not know: ranked by mu + c_j."""
    rank0 = np.zeros((1, model.rank), dtype=model.item_factors.dtype)
    _, rank, item, score = recommend_rows(
        rank0,
        np.zeros(1),
        model.item_factors,
        model.item_bias,
        model.mu,
        n,
        None,
        tile_users,
        allowed,
    )
    m = len(cold_ids)
    k = len(item)
    return recs_table(
        cold_ids.take(pa.array(np.repeat(np.arange(m), k))),
        np.tile(rank, m),
        model.item_index.take(np.tile(item, m)),
        np.tile(score, m),
    )


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


def _combine(files: list, sink, model: Model) -> None:
    """Stream the parts ((location, entry) pairs, each verified) into one Parquet file, row
    group by row group (memory: one part)."""
    schema = _empty(model).schema
    with pq.ParquetWriter(sink, schema, compression="zstd") as w:
        for loc, entry in files:
            pf = open_parquet(loc, entry, error=ModelError)
            for g in range(pf.num_row_groups):
                w.write_table(
                    pf.read_row_group(g, use_threads=arrow_threads(loc, entry)).cast(schema)
                )
