"""One half-iteration on Dask: every block of one side solved given the other side.

    users given items:  broadcast (V, c); one task per by_user block -> (U, b) of its rows
    items given users:  broadcast (U, b); one task per by_item block -> (V, c) of its rows

Two layers, as in the style guide: the function run on a worker (:func:`solve_block_task`: read
the block, or take it from the worker's memory when blocks are cached, and call
:func:`dmf.als.solver.solve_block`), and the orchestration of a half-step
(:class:`HalfSteps`: broadcast the fixed side once, submit one task per block, collect the rows,
recover from lost broadcast data). The driver holds the factor matrices, never the ratings.
"""

from __future__ import annotations

import logging
import math
import sys
import uuid
from dataclasses import dataclass

import numpy as np

# Imported here, at the top, so that a worker unpickling solve_block_task loads the compiled
# kernel (and with it SciPy's BLAS) before the task pins BLAS threads: threadpoolctl limits only
# the libraries loaded so far.
import dmf.als.kernels  # noqa: F401
from dmf.als.solver import BlockSolution, augment, solve_block
from dmf.config import Config
from dmf.dist.cluster import blas_single_thread, scheduler_workers
from dmf.errors import TrainingError
from dmf.store.blocks import RatingBlock
from dmf.store.layout import BlockRef, Store, read_block_file
from dmf.train.state import Side

log = logging.getLogger("dmf")


# ---------------------------------------------------------------------------------------------
# What runs on a worker
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedSide:
    """The side held fixed in a half-iteration: broadcast to every worker once.

    ``aug`` is :func:`dmf.als.solver.augment` of the factors, (n_rows + 1, rank + 1): built once
    here rather than in every block task, at the size of the factors themselves.
    """

    aug: np.ndarray  # (n_rows + 1, rank + 1)
    bias: np.ndarray  # (n_rows,)

    @classmethod
    def of(cls, side: Side) -> FixedSide:
        return cls(augment(side.factors), side.bias)

    @property
    def factors(self) -> np.ndarray:
        return self.aug[:-1, :-1]


@dataclass(frozen=True)
class SolveParams:
    mu: float
    reg: float
    reg_bias: float
    weighted_reg: bool
    dtype: str


def load_block(ref: BlockRef) -> RatingBlock:
    """Read a block on a worker (the task cached between iterations when caching is on)."""
    return read_block_file(ref)


def solve_block_task(
    block: RatingBlock | BlockRef, fixed: FixedSide, params: SolveParams
) -> BlockSolution:
    """Solve one block on a worker: ``block`` is a cached RatingBlock, or where to read it."""
    if not isinstance(block, RatingBlock):
        block = read_block_file(block)
    with blas_single_thread():
        return solve_block(
            block,
            fixed.factors,
            fixed.bias,
            params.mu,
            params.reg,
            params.reg_bias,
            params.weighted_reg,
            params.dtype,
            fixed_aug=fixed.aug,
        )


# ---------------------------------------------------------------------------------------------
# Orchestration of a half-step
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HalfStepResult:
    """A solved side and its half-step's sums: squared error of the side's ratings, the side's
    penalty, and the ratings seen."""

    side: Side
    sse: float
    penalty: float
    nnz: int


_WORKERS_DIED = (
    "Workers died while solving blocks: if the worker logs say they exceeded their memory "
    "budget, raise cluster.memory_limit or lower blocks.target_ratings (re-ingest); each worker "
    "also holds the other side's factors, (rows x (rank + 1)) numbers"
)


class HalfSteps:
    """Runs half-steps of one training run on a Dask client.

    Parameters
    ----------
    store, config, client
        The store trained on, the run's config, a ``distributed.Client``.
    progress_disabled
        tqdm's ``disable`` for the per-half-step progress bar.
    """

    def __init__(self, store: Store, config: Config, client, progress_disabled: bool | None):
        self.store = store
        self.config = config
        self.client = client
        self.progress_disabled = progress_disabled
        m = config.model
        self.params = SolveParams(
            mu=store.mu,
            reg=m.reg,
            reg_bias=m.effective_reg_bias,
            weighted_reg=m.weighted_reg,
            dtype=m.dtype,
        )
        self.cached: dict[str, list] | None = None
        # Task keys must be unique per run: Dask hands back the result (or error) of any live
        # task with the same key. The hex token is dropped from the dashboard's task names.
        self.token = uuid.uuid4().hex[:8]

    # -- block caching ---------------------------------------------------------------------------
    def should_cache(self) -> bool:
        """``train.cache_blocks``: always, never, or (auto) when both sides' blocks fit in half
        the cluster's memory."""
        mode = self.config.train.cache_blocks
        if mode != "auto":
            return mode == "always"
        total_mem = sum(w.get("memory_limit") or 0 for w in scheduler_workers(self.client))
        # In memory a block costs ~16 bytes a rating (int64 indptr amortised, int32 col, float32
        # value, Parquet decode temporaries); both sides are cached.
        need = 2 * 16 * self.store.n_train
        return total_mem > 0 and need < 0.5 * total_mem

    def cache_blocks(self) -> None:
        """Load every block once into worker memory, as tasks (recomputed if a worker dies)."""
        self.cached = {
            side: [
                self.client.submit(
                    load_block,
                    ref,
                    key=f"load-{side}-block-{ref.block:05d}-{self.token}",
                    pure=False,
                )
                for ref in self.store.block_refs(side)
            ]
            for side in ("user", "item")
        }

    def _block_inputs(self, side: str) -> list:
        if self.cached is not None:
            return self.cached[side]
        return self.store.block_refs(side)

    # -- one half-step ---------------------------------------------------------------------------
    def run(self, solving: Side, fixed: Side, it: int) -> HalfStepResult:
        """Solve every row of ``solving`` given ``fixed``; returns the new side and its sums.

        The fixed side is scattered to every worker, but Dask's active memory manager soon keeps
        a single copy of it; if the worker holding that copy dies, the block tasks not yet done
        are cancelled. Then the fixed side is broadcast again and only the unsolved blocks are
        resubmitted (each block's solution is deterministic, so the result is unchanged); the
        half-step fails only when three attempts in a row solve no block.
        """
        from concurrent.futures import CancelledError  # Dask's Future(s)CancelledError

        from distributed import KilledWorker

        side = solving.name
        broadcast = FixedSide.of(fixed)
        inputs = self._block_inputs(side)
        new = Side(
            side, np.empty_like(solving.factors), np.empty_like(solving.bias), solving.counts
        )
        done: dict[int, tuple[float, float, int]] = {}  # block -> (sse, penalty, nnz)
        attempt = fruitless = 0
        while len(done) < len(inputs):
            n_done = len(done)
            try:
                self._solve_blocks(new, it, broadcast, inputs, done, attempt)
            except KilledWorker as exc:
                raise TrainingError(
                    f"{side} half-step of iteration {it}: {exc}. {_WORKERS_DIED}"
                ) from exc
            except (CancelledError, OSError) as exc:
                # OSError: distributed's CommClosedError, when the broadcast (or a result) was
                # on its way to or from a worker that died.
                fruitless = 0 if len(done) > n_done else fruitless + 1
                if fruitless >= 3:
                    raise TrainingError(
                        f"{side} half-step of iteration {it} lost its broadcast data three times "
                        f"in a row without solving a block ({exc}). {_WORKERS_DIED}"
                    ) from exc
                log.warning(
                    "dmf: %s half-step of iteration %d lost data (%s); broadcasting again for "
                    "the %d unsolved blocks",
                    side,
                    it,
                    exc,
                    len(inputs) - len(done),
                )
                attempt += 1
        # fsum is exact, so the sums do not depend on the order blocks finished in.
        return HalfStepResult(
            new,
            sse=math.fsum(d[0] for d in done.values()),
            penalty=math.fsum(d[1] for d in done.values()),
            nnz=sum(d[2] for d in done.values()),
        )

    def _solve_blocks(self, new: Side, it, fixed: FixedSide, inputs, done, attempt) -> None:
        """Broadcast ``fixed``, solve the blocks not in ``done``, record each as it completes."""
        from distributed import wait
        from tqdm.auto import tqdm

        side = new.name
        [fixed_fut] = self.client.scatter([fixed], broadcast=True, hash=False)
        futures = {
            self.client.submit(
                solve_block_task,
                blk,
                fixed_fut,
                self.params,
                key=f"solve-{side}s-{it}-{b:05d}-{self.token}"
                + (f"-retry{attempt}" if attempt else ""),
                retries=self.config.train.retries,
                pure=False,
            ): b
            for b, blk in enumerate(inputs)
            if b not in done
        }
        bar = tqdm(
            total=len(inputs),
            initial=len(done),
            desc=f"iter {it} {side}s",
            unit="block",
            leave=False,
            disable=self.progress_disabled,
            file=sys.stderr,
        )
        pending = set(futures)
        try:
            while pending:
                try:
                    finished = wait(
                        pending,
                        timeout=self.config.train.stall_warning,
                        return_when="FIRST_COMPLETED",
                    ).done
                except TimeoutError:
                    self._warn_stall(side, it, len(pending))
                    continue
                for fut in finished:
                    sol: BlockSolution = fut.result()
                    new.factors[sol.start : sol.start + sol.n_rows] = sol.factors
                    new.bias[sol.start : sol.start + sol.n_rows] = sol.bias
                    done[futures[fut]] = (sol.sse, sol.penalty, sol.nnz)
                    bar.update(1)
                    pending.discard(fut)
                    fut.release()
        finally:
            bar.close()
            fixed_fut.release()

    def _warn_stall(self, side: str, it: int, n_pending: int) -> None:
        """No block finished for a while: say so, and whether Dask paused workers for memory
        (a paused worker runs nothing until its memory drops, which may be never)."""
        workers = scheduler_workers(self.client)
        paused = sum(w.get("status") == "paused" for w in workers)
        log.warning(
            "dmf: no block of the %s half-step of iteration %d finished in the last %g s "
            "(%d still to solve); %d of %d workers are paused for memory.%s",
            side,
            it,
            self.config.train.stall_warning,
            n_pending,
            paused,
            len(workers),
            " Raise cluster.memory_limit, or lower blocks.target_ratings (re-ingest)."
            if paused
            else "",
        )
