"""One half-iteration on Dask: every block of one side solved given the other side.

    users given items:  fixed (V, c) to the tasks; one task per by_user block -> its (U, b) file
    items given users:  fixed (U, b) to the tasks; one task per by_item block -> its (V, c) file

Two layers, as in the style guide: the function run on a worker (:func:`solve_block_task`: read
the block, or take it from the worker's memory when blocks are cached, get the fixed side, call
:func:`dmf.als.solver.solve_block`, write the block's new rows), and the orchestration of a
half-step (:class:`HalfSteps`). The fixed side reaches the tasks whole (broadcast) or in routed
pieces (partitioned): :mod:`dmf.train.exchange`. The driver holds block metadata and scalars
only: neither the ratings nor any side's factors.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np

# Imported here, at the top, so that a worker unpickling solve_block_task loads the compiled
# kernel (and with it SciPy's BLAS) before the task pins BLAS threads: threadpoolctl limits only
# the libraries loaded so far.
import dmf.als.kernels  # noqa: F401
from dmf.als.solver import (
    Implicit,
    ImplicitGram,
    implicit_gram,
    predict,
    solve_block,
    sum_grams,
)
from dmf.config import Config
from dmf.dist.cluster import blas_single_thread, scheduler_workers
from dmf.dist.tasks import gather_watched
from dmf.errors import TrainingError
from dmf.store.blocks import RatingBlock, other_side
from dmf.store.layout import BlockRef, Store, read_block_file
from dmf.store.storage import FileEntry, Location, Target, read_table, size_text
from dmf.train.exchange import (
    READ_CHUNK,
    CompactSpec,
    FixedSide,
    Routing,
    assemble_fixed,
    compact_fixed,
    compact_spec,
    exchange_out_task,
    in_slices,
    remove_quietly,
    route_in_task,
    route_out_task,
)
from dmf.train.sides import (
    SideBlockRef,
    SideBlocks,
    init_item_block_task,
    read_side_block,
    write_side_rows,
    zero_block_task,
)

log = logging.getLogger("dmf")

# A fixed side is broadcast when it takes at most this share of a worker's memory_limit.
BROADCAST_SHARE = 0.25
# What a worker process holds before any block: Python, Dask, NumPy, Arrow, numba, LLVM, SciPy
# (measured 230-300 MB; README, Clusters).
WORKER_BASELINE = 300 * 2**20
# Dask pauses a worker at 80% of its memory_limit (and kills it at 95%): a plan must stay below.
PAUSE_FRACTION = 0.8


# ---------------------------------------------------------------------------------------------
# What runs on a worker
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolveParams:
    mu: float
    reg: float
    reg_bias: float
    weighted_reg: bool
    dtype: str
    implicit: Implicit | None = None


def solve_params(config: Config, store: Store) -> SolveParams:
    """What every solve task of a run takes (mu is 0 under implicit feedback)."""
    m = config.model
    imp = None
    if m.implicit:
        tc = config.train
        imp = Implicit(m.alpha, m.confidence, m.eps, m.biases, tc.solver, tc.cg_steps)
    return SolveParams(
        mu=0.0 if m.implicit else store.mu,
        reg=m.reg,
        reg_bias=m.effective_reg_bias,
        weighted_reg=m.weighted_reg,
        dtype=m.dtype,
        implicit=imp,
    )


@dataclass(frozen=True)
class BlockTarget(Target):
    """A side version's target, for one block (the task writes ``block=NNNNN``)."""

    block: int = 0


@dataclass(frozen=True)
class SolvedBlock:
    """What a solve task returns: where its rows went, and its share of the objective."""

    block: int
    entry: FileEntry
    sse: float
    penalty: float
    nnz: int
    gram: ImplicitGram | None = None
    """Implicit feedback: the new rows' share of the side's :class:`ImplicitGram`, which the
    next half-step holds fixed."""


def gram_task(ref: SideBlockRef, biases: bool) -> ImplicitGram:
    """One block's share of a side's :class:`ImplicitGram` (implicit feedback). BLAS pinned to
    one thread, as in the solve tasks that return the same shares: a threaded product may add
    up in another order, and a resumed run must get the same bits."""
    rows = read_side_block(ref)
    with blas_single_thread():
        return implicit_gram(rows, biases)


def load_block(ref: BlockRef) -> RatingBlock:
    """Read a block on a worker (the task cached between iterations when caching is on)."""
    return read_block_file(ref)


def cached_block_key(ref: BlockRef) -> str:
    """The task key of a block cached in worker memory (:meth:`HalfSteps.cache_blocks`). It
    names the block's file (its versioned name, size and checksum), not the run: runs on one
    cluster at once (``dmf tune``'s trials) then share one copy, as Dask hands a run that
    submits a live key that task. A re-ingested store has new file names, hence new keys."""
    e = ref.entry
    digest = hashlib.sha1(f"{ref.location.url}|{e.bytes}|{e.crc32}".encode()).hexdigest()[:8]
    return f"load-{ref.side}-block-{ref.block:05d}-{digest}"


def _fixed_for(block: RatingBlock, fixed, pieces) -> tuple[RatingBlock, FixedSide]:
    """The fixed side a block's rows are solved against, and the block with its columns in that
    side's row numbering (the same block for a broadcast side)."""
    if not isinstance(fixed, CompactSpec):
        return block, fixed
    compact = compact_fixed(fixed, pieces)
    remapped = RatingBlock(
        block.side, block.start, block.stop, block.indptr, compact.remap(block.cols), block.vals
    )
    return remapped, compact


def solve_block_task(
    block: RatingBlock | BlockRef,
    fixed: FixedSide | CompactSpec,
    pieces: list | None,
    params: SolveParams,
    out: BlockTarget,
    gram: ImplicitGram | None = None,
    previous: SideBlockRef | None = None,
) -> SolvedBlock:
    """Solve one block on a worker and write its rows as block ``out.block`` of the new side
    version.

    ``block``: a cached RatingBlock, or where to read it. ``fixed``: the whole fixed side
    (broadcast), or what this block needs to assemble its compact one from ``pieces``.
    Implicit feedback: ``gram`` is the whole fixed side's :class:`ImplicitGram`, ``previous``
    the block's rows before this half-step (where ``train.solver: cg`` starts; None: zeros)."""
    if not isinstance(block, RatingBlock):
        block = read_block_file(block)
    local, side = _fixed_for(block, fixed, pieces)
    imp = params.implicit
    prev = read_side_block(previous) if imp is not None and previous is not None else None
    with blas_single_thread():
        sol = solve_block(
            local,
            side.factors,
            side.bias,
            params.mu,
            params.reg,
            params.reg_bias,
            params.weighted_reg,
            params.dtype,
            fixed_aug=side.aug,
            implicit=imp,
            gram=gram,
            previous=prev,
        )
        part = implicit_gram(sol.rows, imp.biases) if imp is not None else None
    entry = write_side_rows(out, out.block, sol.rows)
    return SolvedBlock(out.block, entry, sol.sse, sol.penalty, sol.nnz, part)


def validation_task(
    heldout: tuple[Location, FileEntry],
    users: SideBlockRef,
    fixed: FixedSide | CompactSpec,
    pieces: list | None,
    mu: float,
    clip: tuple[float, float] | None = None,
) -> tuple[float, int]:
    """Squared error and count of one user block's held-out ratings (known items only), of
    predictions clipped to ``clip`` when given (``model.clip``)."""
    t = read_table(*heldout, columns=["user", "item", "rating"])
    u = t.column("user").to_numpy().astype(np.int64) - users.start
    i = t.column("item").to_numpy().astype(np.int64)
    r = t.column("rating").to_numpy().astype(np.float64)
    x = read_side_block(users)
    if isinstance(fixed, CompactSpec):
        fixed = compact_fixed(fixed, pieces)
        i = fixed.remap(i)
    pred = predict(mu, x[:, :-1], x[:, -1], fixed.factors, fixed.bias, u, i)
    if clip is not None:
        np.clip(pred, clip[0], clip[1], out=pred)
    return float(np.square(r - pred).sum()), len(r)


def ranking_validation_task(
    heldout: tuple[Location, FileEntry],
    users: SideBlockRef,
    train: RatingBlock | BlockRef,
    fixed: FixedSide,
    k: int,
    cap: int,
    seed: int,
    cold: np.ndarray,
) -> tuple[float, int]:
    """Implicit feedback: the sum of NDCG@k over (at most ``cap`` of) one user block's
    validation users, and their number. Every item is ranked by u_i . v_j (+ c_j with biases),
    in the factors' own dtype, the user's train items excluded; every held-out event of weight
    above 0 is relevant, and one on an item without train events (``cold``) is never a hit, as
    in :func:`dmf.model.evaluate.evaluate`. The users are those with the smallest hash of (seed,
    user index): a sample that does not depend on the blocks."""
    from dmf.data.hashing import splitmix64
    from dmf.model.evaluate import ranking_from_hits
    from dmf.model.scoring import csr_rows, default_tile_users, top_n

    t = read_table(*heldout, columns=["user", "item", "rating"])
    relevant = t.column("rating").to_numpy() > 0
    u = t.column("user").to_numpy().astype(np.int64)[relevant] - users.start
    i = t.column("item").to_numpy().astype(np.int64)[relevant]
    sel = np.unique(u)
    if len(sel) > cap:
        keys = splitmix64((sel + users.start).astype(np.uint64), np.uint64(seed))
        sel = np.sort(sel[np.argsort(keys, kind="stable")[:cap]])
    if not len(sel):
        return 0.0, 0
    if not isinstance(train, RatingBlock):
        train = read_block_file(train)
    x = read_side_block(users)
    rank = x.shape[1] - 1
    v, c = fixed.factors, fixed.bias
    n_items = len(v)
    total = 0.0
    step = default_tile_users(n_items)
    with blas_single_thread():
        for lo in range(0, len(sel), step):
            rows = sel[lo : lo + step]
            scores = x[rows, :rank].astype(v.dtype) @ v.T + c
            r_of, cols = csr_rows(train.indptr, train.cols, rows)[:2]
            scores[r_of, cols] = -np.inf
            top, _ = top_n(scores, k)
            pos = np.searchsorted(rows, u)
            keep = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == u)
            rel = np.zeros(scores.shape, dtype=bool)
            rel[pos[keep], i[keep]] = True
            n_rel = rel.sum(axis=1)
            rel[:, cold] = False
            hits = np.take_along_axis(rel, top, axis=1)
            total += float(ranking_from_hits(hits, n_rel, k)["ndcg"].sum())
    return total, len(sel)


def prediction_range(config: Config, store: Store) -> tuple[float, float] | None:
    """The rating range predictions are clipped to (under ``model.clip``): ``data.rating_range``,
    else the store's lowest and highest train rating (None for a store that predates that
    record)."""
    if config.model.implicit:
        return None  # scores rank items; they are not ratings
    if config.data.rating_range is not None:
        lo, hi = config.data.rating_range
        return float(lo), float(hi)
    return store.rating_range


# ---------------------------------------------------------------------------------------------
# Orchestration of a half-step
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HalfStepResult:
    """A solved side (a new version of its files) and its half-step's sums: squared error of
    the side's ratings, and the ratings seen; how the fixed side travelled, and the factor
    bytes the half-step moved (:func:`bytes_moved`)."""

    side: SideBlocks
    sse: float
    nnz: int
    mode: str = "broadcast"
    bytes_moved: int = 0
    seconds: float = 0.0


def bytes_moved(
    mode: str, fixed: SideBlocks, solved: SideBlocks, routing: Routing | None, receivers: int
) -> int:
    """Factor bytes a half-step moves, ratings aside: the fixed side's files read once, then
    either the assembled side copied to each other worker that solves blocks (broadcast: the
    worker that assembled it has it already), or every destination's rows written to and read
    back from the piece files (partitioned); and the solved side's files written."""
    row = (fixed.rank + 1) * np.dtype(fixed.dtype).itemsize
    read_fixed = sum(f.bytes for f in fixed.files)
    written = sum(f.bytes for f in solved.files)
    if mode == "broadcast":
        copies = max(receivers - 1, 0)
        return read_fixed + copies * fixed.n_rows * (row + np.dtype(fixed.dtype).itemsize) + written
    return read_fixed + 2 * routing.rows_moved * row + written


_WORKERS_DIED = (
    "Workers died while solving blocks: if the worker logs say they exceeded their memory "
    "budget, raise cluster.memory_limit or lower blocks.target_ratings (re-ingest); with "
    "train.exchange broadcast each worker also holds the other side's factors, (rows x "
    "(rank + 1)) numbers"
)


class HalfSteps:
    """Runs the half-steps of one training run on a Dask client.

    Parameters
    ----------
    store, config, client
        The store trained on, the run's config, a ``distributed.Client``.
    work
        The run's directory for side versions, routing and exchange files (in the model
        directory: every worker reaches it).
    progress_disabled
        tqdm's ``disable`` for the per-half-step progress bar.
    """

    def __init__(self, store: Store, config: Config, client, work: Location, progress_disabled):
        self.store = store
        self.config = config
        self.client = client
        self.work = work
        self.progress_disabled = progress_disabled
        self.params = solve_params(config, store)
        # Implicit feedback: each side version's ImplicitGram, by its directory (the solve tasks
        # that write a version return its blocks' shares; others are computed from the files).
        self._grams: dict[str, ImplicitGram] = {}
        self._cold_items: np.ndarray | None = None  # items without train events (validation)
        self.cached: dict[str, list] | None = None
        # Task keys must be unique per run: Dask hands back the result (or error) of any live
        # task with the same key. The hex token is dropped from the dashboard's task names.
        self.token = uuid.uuid4().hex[:8]
        self.modes: dict[str, str] = {}
        self._routings: dict[str, Routing] = {}
        self._assembled: tuple[str, object] | None = None  # (version url, future)

    # -- the plan: broadcast or partitioned, and whether it fits ---------------------------------
    def worker_memory(self) -> list[int]:
        """Each worker's memory_limit in bytes (0: none set)."""
        return [int(w.get("memory_limit") or 0) for w in scheduler_workers(self.client)]

    def plan(self) -> dict[str, str]:
        """Decide how each half-step gets its fixed side (``train.exchange``), check that each
        worker's memory holds what the plan puts on it, and say so. Returns side -> mode."""
        limits = [x for x in self.worker_memory() if x > 0]
        limit = min(limits) if limits else 0
        threads = max((w.get("nthreads", 1) for w in scheduler_workers(self.client)), default=1)
        setting = self.config.train.exchange
        for side in ("user", "item"):
            fixed_bytes = self._side_bytes(other_side(side))
            mode = setting if setting != "auto" else self._auto(side, fixed_bytes, limit, threads)
            self.modes[side] = mode
            need = self._need(side, mode, threads)
            log.info(
                "dmf: %ss given %ss: %s (the %s side is %s; each worker needs about %s of its %s)",
                side,
                other_side(side),
                mode,
                other_side(side),
                size_text(fixed_bytes),
                size_text(need),
                size_text(limit) if limit else "unlimited memory",
            )
            if limit and need > PAUSE_FRACTION * limit:
                raise TrainingError(
                    f"the {side} half-step needs about {size_text(need)} per worker "
                    f"(train.exchange {mode}: {self._explain(side, mode, threads)}), more than "
                    f"{int(PAUSE_FRACTION * 100)}% of cluster.memory_limit ({size_text(limit)}), where "
                    "Dask pauses the worker. Raise cluster.memory_limit, lower "
                    "blocks.target_ratings (re-ingest), use fewer threads per worker"
                    + ("" if mode == "partitioned" else ", or set train.exchange: partitioned")
                )
        return self.modes

    def _auto(self, side: str, fixed_bytes: int, limit: int, threads: int) -> str:
        """Broadcast when the fixed side takes at most a quarter of a worker's memory and the
        broadcast plan fits; else route it when that fits; else whichever needs less (and the
        plan then says it does not fit)."""
        if not limit:
            return "broadcast"
        broadcast = self._need(side, "broadcast", threads)
        if broadcast <= PAUSE_FRACTION * limit and fixed_bytes <= BROADCAST_SHARE * limit:
            return "broadcast"
        partitioned = self._need(side, "partitioned", threads)
        if partitioned <= PAUSE_FRACTION * limit or partitioned <= broadcast:
            return "partitioned"
        return "broadcast"

    def _side_bytes(self, side: str) -> int:
        rank = self.config.model.rank
        itemsize = np.dtype(self.config.model.dtype).itemsize
        return self.store.n_rows(side) * (rank + 2) * itemsize

    def _largest_rows(self, side: str) -> int:
        bounds = self.store.bounds(side)
        return int(np.diff(bounds).max()) if len(bounds) > 1 else 0

    def _task_bytes(self, side: str) -> int:
        """A solve task's working set on the largest block of ``side``: the block read from
        Parquet and cast for the kernel (~32 bytes a rating), and per row its float64
        solution, the copy in the storage dtype, and ~40 bytes of per-row bookkeeping (count,
        the two penalties, squared error, status)."""
        rank = self.config.model.rank
        nnz = max(self.store.block_nnz(side), default=0)
        per_row = (rank + 1) * (8 + (4 if self.config.model.dtype == "float32" else 0)) + 40
        if self.config.model.implicit and self.config.train.solver == "cg":
            # The rows being replaced, where conjugate gradients start: read, then as float64.
            per_row += (rank + 1) * (np.dtype(self.config.model.dtype).itemsize + 8)
        return 32 * nnz + self._largest_rows(side) * per_row

    def _compact_bytes(self, side: str) -> int:
        """A partitioned solve's compact fixed side: one row per distinct referenced column (at
        most the block's ratings and the other side's rows), its row map, and a read buffer."""
        rank = self.config.model.rank
        itemsize = np.dtype(self.config.model.dtype).itemsize
        rows = min(max(self.store.block_nnz(side), default=0), self.store.n_rows(other_side(side)))
        return rows * ((rank + 2) * itemsize + 8) + READ_CHUNK

    def _send_bytes(self, side: str) -> int:
        """An exchange task's working set: the fixed block it reads, the rows it gathers for
        one destination at a time (at most the block again), and its out-block's row indices
        (4 bytes a row sent: at most one per rating of the fixed block)."""
        rank = self.config.model.rank
        itemsize = np.dtype(self.config.model.dtype).itemsize
        fixed = other_side(side)
        rows_sent = max(self.store.block_nnz(fixed), default=0)
        return 2 * self._largest_rows(fixed) * (rank + 2) * itemsize + 4 * rows_sent

    def _need(self, side: str, mode: str, threads: int) -> int:
        task = self._task_bytes(side)
        if mode == "broadcast":
            # The assembled side (held once: exchange._fixed_in_place), plus the same again
            # while a worker receives a copy (the frames and the array).
            return WORKER_BASELINE + 2 * self._side_bytes(other_side(side)) + threads * task
        return WORKER_BASELINE + threads * max(
            task + self._compact_bytes(side), self._send_bytes(side)
        )

    def _explain(self, side: str, mode: str, threads: int) -> str:
        task = size_text(self._task_bytes(side))
        rank = self.config.model.rank
        nnz = max(self.store.block_nnz(side), default=0)
        if mode == "broadcast":
            fixed = size_text(2 * self._side_bytes(other_side(side)))
            return (
                f"{fixed} for the {other_side(side)} side's {self.store.n_rows(other_side(side)):,} "
                f"rows of rank {rank} + 1 (held, and a copy while it arrives), {threads} x {task} "
                f"for blocks of up to {nnz:,} ratings, and the worker's own "
                f"{size_text(WORKER_BASELINE)}"
            )
        return (
            f"{threads} x the larger of ({task} for a block of up to {nnz:,} ratings + "
            f"{size_text(self._compact_bytes(side))} for its compact {other_side(side)} rows of rank "
            f"{rank} + 1) and {size_text(self._send_bytes(side))} for sending a "
            f"{other_side(side)} block's rows, and the worker's own {size_text(WORKER_BASELINE)}"
        )

    # -- block caching ---------------------------------------------------------------------------
    def should_cache(self) -> bool:
        """``train.cache_blocks``: always, never, or (auto) when both sides' blocks fit in half
        the cluster's memory."""
        mode = self.config.train.cache_blocks
        if mode != "auto":
            return mode == "always"
        memory = self.worker_memory()
        total_mem = sum(memory)
        # In memory a block costs ~16 bytes a rating (int64 indptr amortised, int32 col, float32
        # value, Parquet decode temporaries); both sides are cached.
        need = 2 * 16 * self.store.n_train
        if not (total_mem > 0 and need < 0.5 * total_mem):
            return False
        # ... and each worker's share of the cache still fits beside what the plan puts there.
        limit = min(x for x in memory if x > 0)
        share = need / len(memory)
        threads = max((w.get("nthreads", 1) for w in scheduler_workers(self.client)), default=1)
        fits = all(
            self._need(side, self.modes.get(side, "broadcast"), threads) + share
            <= PAUSE_FRACTION * limit
            for side in ("user", "item")
        )
        if fits:
            log.info(
                "dmf: caching the rating blocks on the workers: about %s per worker beside the "
                "plan above (train.cache_blocks: never turns this off)",
                size_text(share),
            )
        return fits

    def cache_blocks(self) -> None:
        """Load every block once into worker memory, as tasks (recomputed if a worker dies)."""
        self.cached = {
            side: [
                self.client.submit(load_block, ref, key=cached_block_key(ref), pure=False)
                for ref in self.store.block_refs(side)
            ]
            for side in ("user", "item")
        }

    def _block_inputs(self, side: str) -> list:
        if self.cached is not None:
            return self.cached[side]
        return self.store.block_refs(side)

    # -- the starting point ------------------------------------------------------------------------
    def initial_items(self) -> SideBlocks:
        """The initial item side, drawn block by block on the workers (see
        :func:`dmf.train.sides.init_item_block_task`)."""
        root, tok = self._version_dir("item", 0)
        target = Target(root, tok)
        m = self.config.model
        futs = [
            self.client.submit(
                init_item_block_task,
                ref,
                m,
                target,
                key=f"init-items-{ref.block:05d}-{self.token}",
                pure=False,
            )
            for ref in self.store.block_refs("item")
        ]
        results = self.gather(futs, "the initial item factors")
        return SideBlocks(
            "item",
            tuple(int(x) for x in self.store.bounds("item")),
            m.rank,
            m.dtype,
            root,
            tuple(e for e, _ in results),
            math.fsum(p for _, p in results),
        )

    def zero_users(self) -> SideBlocks:
        """The user side at zero, as files (a run of no iterations keeps its starting point)."""
        root, tok = self._version_dir("user", 0)
        target = Target(root, tok)
        m = self.config.model
        futs = [
            self.client.submit(zero_block_task, ref, m, target, pure=False)
            for ref in self.store.block_refs("user")
        ]
        return SideBlocks(
            "user",
            tuple(int(x) for x in self.store.bounds("user")),
            m.rank,
            m.dtype,
            root,
            tuple(self.gather(futs, "the initial user factors")),
            0.0,
        )

    def _version_dir(self, side: str, it: int) -> tuple[Location, str]:
        tok = uuid.uuid4().hex[:8]
        return self.work / side / f"h{it:05d}-{tok}", tok

    # -- the fixed side ------------------------------------------------------------------------------
    def _broadcast(self, fixed: SideBlocks):
        """The future of the whole fixed side, assembled once per version by a task."""
        if self._assembled is not None and self._assembled[0] == fixed.root.url:
            return self._assembled[1]
        if self._assembled is not None:
            self._assembled[1].release()
        fut = self.client.submit(
            assemble_fixed,
            fixed,
            key=f"assemble-{fixed.side}s-{version_of(fixed)}-{self.token}",
            pure=False,
        )
        if len(scheduler_workers(self.client)) > 1:
            # A copy on every worker before the blocks' tasks are placed: the scheduler then
            # places them by load. With the one copy where it was assembled, it put most blocks
            # next to it and the other workers waited (rank 64 on 10M ratings: 14% slower).
            self.client.replicate([fut])
        self._assembled = (fixed.root.url, fut)
        return fut

    def _routing(self, name: str, fixed_side: str, cols_of: list) -> Routing:
        """The routing of ``fixed_side`` to destinations whose referenced columns the callables
        ``cols_of`` give, computed once and kept (:mod:`dmf.train.exchange`)."""
        if name in self._routings:
            return self._routings[name]
        tok = uuid.uuid4().hex[:8]
        target = Target(self.work / "routing" / f"{name}-{tok}", tok)
        bounds = self.store.bounds(fixed_side)
        ins = self.gather(
            [
                self.client.submit(
                    route_in_task, c, d, bounds, target, key=f"route-in-{name}-{d:05d}-{tok}"
                )
                for d, c in enumerate(cols_of)
            ],
            f"the routing of {fixed_side}s for {name} (which rows each block needs)",
        )
        outs = self.gather(
            [
                self.client.submit(
                    route_out_task,
                    s,
                    int(bounds[s]),
                    in_slices(ins, s),
                    target,
                    key=f"route-out-{name}-{s:05d}-{tok}",
                )
                for s in range(len(bounds) - 1)
            ],
            f"the routing of {fixed_side}s for {name} (where each block's rows go)",
        )
        routing = Routing(fixed_side, tuple(ins), tuple(outs))
        self._routings[name] = routing
        log.info(
            "dmf: routed the %s side to %d destinations (%s): %d rows move per half-step",
            fixed_side,
            len(ins),
            name,
            routing.rows_moved,
        )
        return routing

    def _exchange(self, routing: Routing, fixed: SideBlocks, it: int, tag: str):
        """Start this half-step's exchange: one task per source block writes its pieces.
        Returns (the exchange's directory, a function giving destination d its (spec, pieces))."""
        tok = uuid.uuid4().hex[:8]
        xdir = self.work / "exchange" / f"{tag}-{it:05d}-{tok}"
        target = Target(xdir, tok)
        futs = [
            self.client.submit(
                exchange_out_task,
                fixed.ref(s),
                routing.outblocks[s],
                target,
                key=f"exchange-{fixed.side}s-{it}-{s:05d}-{tok}",
                pure=False,
            )
            for s in range(fixed.n_blocks)
        ]

        def for_destination(d: int):
            ib = routing.inblocks[d]
            spec, srcs = compact_spec(d, ib, routing.outblocks, fixed.rank, fixed.dtype)
            return spec, [futs[s] for s in srcs]

        return xdir, futs, for_destination

    def _train_cols(self, side: str) -> list:
        """Callables giving each block's referenced columns (read on the worker)."""
        return [_BlockCols(ref) for ref in self.store.block_refs(side)]

    # -- one half-step -------------------------------------------------------------------------------
    def run(
        self, side: str, fixed: SideBlocks, it: int, current: SideBlocks | None = None
    ) -> HalfStepResult:
        """Solve every row of ``side`` given the ``fixed`` side version; returns the new version
        of ``side`` (written by the tasks) and the half-step's sums. ``current``: the version of
        ``side`` being replaced (implicit feedback's CG solver starts from it)."""
        from distributed import KilledWorker

        t0 = time.perf_counter()
        root, tok = self._version_dir(side, it)
        mode = self.modes.get(side, "broadcast")
        xdir = routing = None
        if mode == "broadcast":
            fixed_arg = self._broadcast(fixed)
            per_block = [(fixed_arg, None)] * self.store.n_blocks(side)
        else:
            routing = self._routing(f"{side}s", fixed.side, self._train_cols(side))
            xdir, _, for_destination = self._exchange(routing, fixed, it, f"{side}s")
            per_block = [for_destination(d) for d in range(self.store.n_blocks(side))]
        gram = previous = None
        if self.params.implicit is not None:
            gram = self.gram(fixed)
            if self.params.implicit.solver == "cg" and current is not None:
                previous = current.refs()
        try:
            done = self._solve_blocks(side, it, root, tok, per_block, gram, previous)
        except KilledWorker as exc:
            raise TrainingError(
                f"{side} half-step of iteration {it}: {exc}. {_WORKERS_DIED}"
            ) from exc
        finally:
            if xdir is not None:
                remove_quietly(xdir)
        m = self.config.model
        new = SideBlocks(
            side,
            tuple(int(x) for x in self.store.bounds(side)),
            m.rank,
            m.dtype,
            root,
            tuple(done[b].entry for b in range(len(done))),
            math.fsum(d.penalty for d in done.values()),
        )
        if self.params.implicit is not None:
            self._grams = {new.root.url: sum_grams([done[b].gram for b in range(len(done))])}
        # fsum is exact, so the sums do not depend on the order blocks finished in.
        receivers = min(len(self.worker_memory()), self.store.n_blocks(side))
        return HalfStepResult(
            new,
            sse=math.fsum(d.sse for d in done.values()),
            nnz=sum(d.nnz for d in done.values()),
            mode=mode,
            bytes_moved=bytes_moved(mode, fixed, new, routing, receivers),
            seconds=time.perf_counter() - t0,
        )

    def gram(self, side: SideBlocks) -> ImplicitGram:
        """The :class:`ImplicitGram` of a side version: kept from the half-step that wrote it,
        else added up from one task per block (the initial items, a resumed run)."""
        if side.root.url not in self._grams:
            biases = self.params.implicit.biases
            parts = self.gather(
                [
                    self.client.submit(
                        gram_task,
                        ref,
                        biases,
                        key=f"gram-{side.side}s-{version_of(side)}-{ref.block:05d}-{self.token}",
                        pure=False,
                    )
                    for ref in side.refs()
                ],
                f"the Gram matrix of the {side.side} side",
            )
            self._grams[side.root.url] = sum_grams(parts)
        return self._grams[side.root.url]

    def _solve_blocks(
        self, side, it, root, tok, per_block, gram=None, previous=None
    ) -> dict[int, SolvedBlock]:
        """One solve task per block; returns each block's result as it completes."""
        from tqdm.auto import tqdm

        inputs = self._block_inputs(side)
        futures = [
            self.client.submit(
                solve_block_task,
                blk,
                fixed,
                pieces,
                self.params,
                BlockTarget(root, tok, b),
                gram,
                None if previous is None else previous[b],
                key=f"solve-{side}s-{it}-{b:05d}-{self.token}",
                retries=self.config.train.retries,
                pure=False,
            )
            for b, (blk, (fixed, pieces)) in enumerate(zip(inputs, per_block, strict=True))
        ]
        bar = tqdm(
            total=len(futures),
            desc=f"iter {it} {side}s",
            unit="block",
            leave=False,
            disable=self.progress_disabled,
            file=sys.stderr,
        )

        def finished(_k: int, res: SolvedBlock) -> SolvedBlock:
            bar.update(1)
            return res

        try:
            solved = self.gather(futures, f"the {side} half-step of iteration {it}", finished)
        finally:
            bar.close()
        return {res.block: res for res in solved}

    # -- validation RMSE, blockwise ---------------------------------------------------------------
    def validation(self, users: SideBlocks, items: SideBlocks) -> float | None:
        """RMSE of the validation ratings under (users, items), one task per user block."""
        blocks = self.store.split_blocks("validation")
        if not blocks or self.store.n_split("validation") == 0:
            return None
        if self.params.implicit is not None:
            return self._ranking_validation(users, items, blocks)
        if self.modes.get("user", "broadcast") == "broadcast":
            fixed_arg = self._broadcast(items)
            per_block = {b: (fixed_arg, None) for b in blocks}
            xdir = None
        else:
            cols = [_HeldoutCols(self.store.split_ref("validation", b)) for b in blocks]
            routing = self._routing("validation", "item", cols)
            xdir, _, for_destination = self._exchange(routing, items, 0, "validation")
            per_block = {b: for_destination(k) for k, b in enumerate(blocks)}
        try:
            futs = [
                self.client.submit(
                    validation_task,
                    self.store.split_ref("validation", b),
                    users.ref(b),
                    *per_block[b],
                    self.store.mu,
                    prediction_range(self.config, self.store) if self.config.model.clip else None,
                    key=f"validate-{version_of(users)}-{b:05d}-{self.token}",
                    pure=False,
                )
                for b in blocks
            ]
            parts = self.gather(futs, "the validation RMSE")
        finally:
            if xdir is not None:
                remove_quietly(xdir)
        n = sum(p[1] for p in parts)
        return math.sqrt(math.fsum(p[0] for p in parts) / n) if n else None

    def _ranking_validation(self, users: SideBlocks, items: SideBlocks, blocks) -> float | None:
        """Implicit feedback: mean NDCG@k (``evaluate.k``) of a sample of the validation users
        (``train.validation_users``, spread over the blocks by their share of the split).
        Ranking needs every item, so the item side is assembled whatever ``train.exchange``
        says (it is the small side of the problems dmf is built for)."""
        fixed = self._broadcast(items)
        inputs = self._block_inputs("user")
        cap = self.config.train.validation_users
        if self._cold_items is None:  # read from the item id maps once per run
            self._cold_items = np.flatnonzero(self.store.counts("item") == 0)
        cold = self._cold_items
        n_val = self.store.n_split("validation")
        futs = []
        for b in blocks:
            ref = self.store.split_ref("validation", b)
            share = max(1, math.ceil(cap * ref[1].rows / n_val)) if ref[1].rows else cap
            futs.append(
                self.client.submit(
                    ranking_validation_task,
                    ref,
                    users.ref(b),
                    inputs[b],
                    fixed,
                    self.config.evaluate.k,
                    share,
                    self.config.split.seed,
                    cold,
                    key=f"validate-{version_of(users)}-{b:05d}-{self.token}",
                    pure=False,
                )
            )
        parts = self.gather(futs, "the validation NDCG")
        n = sum(p[1] for p in parts)
        return math.fsum(p[0] for p in parts) / n if n else None

    def gather(self, futures: list, what: str, on_result=None) -> list:
        """The futures' results in order, watched (:func:`dmf.dist.tasks.gather_watched`)."""
        return gather_watched(
            self.client, futures, what, self.config.train.stall_warning, on_result
        )


@dataclass(frozen=True)
class _BlockCols:
    """The columns a rating block references (called on a worker)."""

    ref: BlockRef

    def __call__(self) -> np.ndarray:
        return read_block_file(self.ref).cols


@dataclass(frozen=True)
class _HeldoutCols:
    """The items a user block's held-out ratings reference (called on a worker)."""

    ref: tuple[Location, FileEntry]

    def __call__(self) -> np.ndarray:
        return read_table(*self.ref, columns=["item"]).column("item").to_numpy()


def version_of(side: SideBlocks) -> int:
    """The iteration a side version belongs to, from its directory's name ``hNNNNN-TOKEN``."""
    return int(side.root.name.split("-")[0][1:])
