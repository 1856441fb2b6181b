"""Distributed ALS on Dask: the training loop.

One iteration is two half-iterations of the same code with the roles swapped:

    users given items:  broadcast (V, c); one task per by_user block -> (U, b) of its rows
    items given users:  broadcast (U, b); one task per by_item block -> (V, c) of its rows

Each task reads its block from the store's Parquet on the worker (or takes it from the worker's
memory when blocks are cached), solves every row with :func:`dmf.solver.solve_block`, and returns
the rows' new factors and biases with the block's share of the objective. The driver holds the
factor matrices, never the ratings.

Layers, as in the style guide: the maths (:mod:`dmf.als.solver`), the function run on a worker
(:func:`solve_block_task`), and orchestration (:class:`Trainer`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmf.als.solver import BlockSolution, augment, penalty_term, predict, solve_block
from dmf.config import Config
from dmf.dist.cluster import blas_single_thread, maybe_connect
from dmf.errors import CheckpointError, ConfigError, ModelError, TrainingError
from dmf.model.model import Model, check_replaceable
from dmf.store.blocks import RatingBlock, other_side
from dmf.store.layout import Store, read_block_file
from dmf.train.checkpoint import (
    describe_mismatch,
    latest_checkpoint,
    remove_checkpoints,
    write_checkpoint,
)

log = logging.getLogger("dmf")


# ---------------------------------------------------------------------------------------------
# What runs on a worker
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedSide:
    """The side held fixed in a half-iteration: broadcast to every worker once.

    ``aug`` is :func:`dmf.solver.augment` of the factors, (n_rows + 1, rank + 1): built once here
    rather than in every block task, at the size of the factors themselves.
    """

    aug: np.ndarray  # (n_rows + 1, rank + 1)
    bias: np.ndarray  # (n_rows,)

    @classmethod
    def of(cls, factors: np.ndarray, bias: np.ndarray) -> FixedSide:
        return cls(augment(factors), bias)

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


def load_block(path: str, side: str, start: int, stop: int) -> RatingBlock:
    """Read a block on a worker (the task cached between iterations when caching is on)."""
    return read_block_file(path, side, start, stop)


def solve_block_task(
    block: RatingBlock | tuple[str, str, int, int], fixed: FixedSide, params: SolveParams
) -> BlockSolution:
    """Solve one block on a worker: ``block`` is a cached RatingBlock or (path, side, start, stop)."""
    if not isinstance(block, RatingBlock):
        block = read_block_file(*block)
    with blas_single_thread(load_solver=True):
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
# Orchestration
# ---------------------------------------------------------------------------------------------
def initial_factors(store: Store, config: Config) -> dict[str, np.ndarray]:
    """Starting point: U = 0, b = 0 (solved first), V ~ N(0, init_scale^2/rank), c = 0.

    Drawn on the driver from ``model.seed`` alone, so runs are reproducible whatever the number
    of workers or blocks. Items with no train ratings start (and stay) at zero.
    """
    m = config.model
    dtype = np.dtype(m.dtype)
    rng = np.random.default_rng(m.seed)
    rank = m.rank
    v = rng.normal(0.0, m.init_scale / math.sqrt(max(rank, 1)), size=(store.n_items, rank))
    v[store.counts("item") == 0] = 0.0
    return {
        "user_factors": np.zeros((store.n_users, rank), dtype=dtype),
        "user_bias": np.zeros(store.n_users, dtype=dtype),
        "item_factors": v.astype(dtype),
        "item_bias": np.zeros(store.n_items, dtype=dtype),
    }


def _rmse_on_split(store: Store, split: str, mu: float, f: dict[str, np.ndarray]) -> float | None:
    """RMSE of held-out ratings (known users and items only), streamed in record batches."""
    import pyarrow.parquet as pq

    path = store.path / split / "part-0.parquet"
    if store.n_split(split) == 0 or not path.is_file():
        return None
    sse, n = 0.0, 0
    for batch in pq.ParquetFile(path).iter_batches(
        batch_size=1 << 20, columns=["user", "item", "rating"]
    ):
        u = batch.column(0).to_numpy()
        i = batch.column(1).to_numpy()
        r = batch.column(2).to_numpy().astype(np.float64)
        pred = predict(
            mu, f["user_factors"], f["user_bias"], f["item_factors"], f["item_bias"], u, i
        )
        sse += float(np.square(r - pred).sum())
        n += len(r)
    return math.sqrt(sse / n) if n else None


class Trainer:
    """Runs ALS on a store with a Dask client. Use :func:`train` unless you need the pieces."""

    def __init__(self, store: Store, config: Config, client, quiet: bool = False):
        self.store = store
        self.config = config
        self.client = client
        self.quiet = quiet
        m = config.model
        self.params = SolveParams(
            mu=store.mu,
            reg=m.reg,
            reg_bias=m.effective_reg_bias,
            weighted_reg=m.weighted_reg,
            dtype=m.dtype,
        )
        self.counts = {"user": store.counts("user"), "item": store.counts("item")}
        self.cached: dict[str, list] | None = None
        # Task keys must be unique per run: Dask hands back the result (or error) of any live
        # task with the same key. The hex token is dropped from the dashboard's task names.
        self.token = uuid.uuid4().hex[:8]
        self.model_dir = config.resolve(config.output.model)
        self.checkpoint_dir = self.model_dir / "checkpoints"

    # -- block caching -----------------------------------------------------------------------
    def _should_cache(self) -> bool:
        mode = self.config.train.cache_blocks
        if mode != "auto":
            return mode == "always"
        info = (
            self.client.scheduler_info(n_workers=-1)
            if _accepts_n_workers(self.client)
            else self.client.scheduler_info()
        )
        total_mem = sum(w.get("memory_limit") or 0 for w in info["workers"].values())
        # In memory a block costs ~16 bytes a rating (int64 indptr amortised, int32 col, float32
        # value, Parquet decode temporaries); both sides are cached.
        need = 2 * 16 * self.store.n_train
        return total_mem > 0 and need < 0.5 * total_mem

    def _block_inputs(self, side: str) -> list:
        if self.cached is not None:
            return self.cached[side]
        return [(path, side, start, stop) for _, path, start, stop in self.store.block_args(side)]

    def cache_blocks(self) -> None:
        """Load every block once into worker memory, as tasks (recomputed if a worker dies)."""
        self.cached = {}
        for side in ("user", "item"):
            self.cached[side] = [
                self.client.submit(
                    load_block,
                    path,
                    side,
                    start,
                    stop,
                    key=f"load-{side}-block-{b:05d}-{self.token}",
                    pure=False,
                )
                for b, path, start, stop in self.store.block_args(side)
            ]

    # -- one half-iteration --------------------------------------------------------------------
    def half_step(self, side: str, it: int, f: dict[str, np.ndarray]) -> dict[str, float]:
        """Solve every row of ``side`` given the other side; updates ``f`` in place.

        The fixed side is scattered to every worker, but Dask's active memory manager soon keeps
        a single copy of it; if the worker holding that copy dies, the block tasks not yet done
        are cancelled. Then the fixed side is broadcast again and only the unsolved blocks are
        resubmitted (each block's solution is deterministic, so the result is unchanged); the
        half-step fails only when three attempts in a row solve no block.
        """
        from concurrent.futures import CancelledError  # Dask's Future(s)CancelledError

        from distributed import KilledWorker

        other = other_side(side)
        fixed = FixedSide.of(f[f"{other}_factors"], f[f"{other}_bias"])
        inputs = self._block_inputs(side)
        new_f = np.empty_like(f[f"{side}_factors"])
        new_b = np.empty_like(f[f"{side}_bias"])
        done: dict[int, tuple[float, float, int]] = {}  # block -> (sse, penalty, nnz)
        attempt = fruitless = 0
        while len(done) < len(inputs):
            n_done = len(done)
            try:
                self._solve_blocks(side, it, fixed, inputs, new_f, new_b, done, attempt)
            except KilledWorker as exc:
                raise TrainingError(
                    f"{side} half-step of iteration {it}: {exc}. {_WORKERS_DIED}"
                ) from exc
            except CancelledError as exc:
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
        f[f"{side}_factors"] = new_f
        f[f"{side}_bias"] = new_b
        # fsum is exact, so the objective does not depend on the order blocks finished in.
        sse = math.fsum(d[0] for d in done.values())
        penalty = math.fsum(d[1] for d in done.values())
        nnz = sum(d[2] for d in done.values())
        m = self.config.model
        other_pen = penalty_term(
            f[f"{other}_factors"],
            f[f"{other}_bias"],
            self.counts[other],
            m.reg,
            m.effective_reg_bias,
            m.weighted_reg,
        )
        return {"sse": sse, "objective": sse + penalty + other_pen, "nnz": nnz}

    def _solve_blocks(self, side, it, fixed, inputs, new_f, new_b, done, attempt) -> None:
        """Broadcast ``fixed``, solve the blocks not in ``done``, record each as it completes."""
        from distributed import wait
        from tqdm.auto import tqdm

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
            disable=self._progress_disabled(),
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
                    new_f[sol.start : sol.start + sol.n_rows] = sol.factors
                    new_b[sol.start : sol.start + sol.n_rows] = sol.bias
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
        workers = self.client.scheduler_info()["workers"].values()
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

    def _progress_disabled(self) -> bool | None:
        mode = self.config.train.progress
        if self.quiet or mode == "off":
            return True
        return None if mode == "auto" else False

    # -- the loop --------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model section and the store."""
        return {"model": self.config.to_dict()["model"], "store": self.store.fingerprint}

    def _may_overwrite(self, resume: bool) -> bool:
        return (
            self.config.output.overwrite or resume or not (self.model_dir / "model.json").exists()
        )

    def run(self, resume: bool = False) -> Model:
        cfg = self.config
        tc = cfg.train
        if not self._may_overwrite(resume):
            # Refuse now, not after hours of training.
            raise ModelError(
                f"model directory {self.model_dir} already holds a model; set "
                "output.overwrite: true, choose another output.model, or resume"
            )
        check_replaceable(self.model_dir)
        if tc.early_stopping is not None and self.store.n_split("validation") == 0:
            raise ConfigError(
                "train.early_stopping needs a validation split, and the store has none: set "
                "split.validation (and re-ingest) or remove train.early_stopping"
            )
        if tc.iterations == 0:
            log.warning("dmf: train.iterations is 0: the model keeps its initial factors")
        if not resume:
            # A fresh run: checkpoints of an earlier run in this directory would be mistaken for
            # this run's (and prune them, being newer by name).
            remove_checkpoints(self.checkpoint_dir)
        f = initial_factors(self.store, cfg)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None  # early stopping: best validation RMSE and factors
        start_it = 1
        stopped = ""
        if resume:
            found = latest_checkpoint(self.checkpoint_dir)
            if found is None:
                self._say(f"dmf: no checkpoint in {self.checkpoint_dir}; starting from scratch")
            else:
                state, arrays = found
                diff = describe_mismatch(state["fingerprint"], self.fingerprint())
                if diff:
                    raise CheckpointError(
                        f"checkpoint in {self.checkpoint_dir} was made with a different config or "
                        "store: "
                        + "; ".join(diff)
                        + ". Train without --resume (or use another output.model)."
                    )
                f = {
                    k: arrays[k] for k in ("user_factors", "user_bias", "item_factors", "item_bias")
                }
                history = state["history"]
                # The kept best model only matters while early stopping is on: a resumed run
                # with early stopping switched off must end with its last iteration.
                if "best_user_factors" in arrays and tc.early_stopping is not None:
                    best = {
                        "rmse": state["best_rmse"],
                        "iteration": state["best_iteration"],
                        "f": {k: arrays["best_" + k] for k in f},
                    }
                start_it = state["iteration"] + 1
                stopped = state.get("stopped", "")
                self._say(
                    f"dmf: resuming after iteration {state['iteration']} from {self.checkpoint_dir}"
                )

        # Compile the solver kernel here (or load it from numba's disk cache), so that workers
        # on this machine load it instead of all compiling it at once.
        from dmf.als.kernels import warm_up

        warm_up(self.config.model.dtype)
        if self._should_cache():
            self.cache_blocks()
        n_train = self.store.n_train
        from distributed import span

        prev_obj = history[-1]["objective"] if history else None
        it = start_it
        while it <= tc.iterations and not stopped:
            t0 = time.perf_counter()
            with span("dmf-train", f"iteration-{it}"):
                u = self.half_step("user", it, f)
                i = self.half_step("item", it, f)
            seconds = time.perf_counter() - t0
            self._check_finite(f, it)
            val = _rmse_on_split(self.store, "validation", self.store.mu, f)
            rec = {
                "iteration": it,
                "train_rmse": math.sqrt(i["sse"] / n_train) if n_train else None,
                "validation_rmse": val,
                "objective": i["objective"],
                "objective_after_user_step": u["objective"],
                "seconds": seconds,
                "ratings_per_second": n_train / seconds if seconds > 0 else None,
            }
            history.append(rec)
            self._report(rec)
            # Stopping rules.
            if tc.early_stopping is not None and val is not None:
                if best is None or val < best["rmse"] - tc.early_stopping.min_delta:
                    best = {"rmse": val, "iteration": it, "f": {k: v.copy() for k, v in f.items()}}
                elif it - best["iteration"] >= tc.early_stopping.patience:
                    stopped = f"early stopping: no better validation RMSE since iteration {best['iteration']}"
            if tc.tolerance and prev_obj is not None and not stopped:
                rel = (prev_obj - rec["objective"]) / max(abs(prev_obj), 1e-300)
                if rel < tc.tolerance:
                    stopped = (
                        f"converged: relative objective change {rel:.2e} < tolerance {tc.tolerance}"
                    )
            prev_obj = rec["objective"]
            if tc.checkpoint_every and (
                it % tc.checkpoint_every == 0 or stopped or it == tc.iterations
            ):
                self._checkpoint(it, f, history, best, stopped)
            it += 1
        if stopped:
            self._say(f"dmf: {stopped}")
        final = f
        meta: dict[str, Any] = {"stopped": stopped or "iterations", "iterations_run": len(history)}
        if best is not None:
            final = best["f"]
            meta.update(best_iteration=best["iteration"], best_validation_rmse=best["rmse"])
            if best["iteration"] != len(history):
                self._say(
                    f"dmf: keeping the model of iteration {best['iteration']} (best validation RMSE)"
                )
        model = Model(
            mu=self.store.mu,
            user_ids=self.store.ids("user"),
            item_ids=self.store.ids("item"),
            user_factors=final["user_factors"],
            user_bias=final["user_bias"],
            item_factors=final["item_factors"],
            item_bias=final["item_bias"],
            config=cfg.to_dict(),
            history=history,
            store_fingerprint=self.store.fingerprint,
            store_path=str(self.store.path.resolve()),
            meta=meta,
        )
        # The directory exists once a checkpoint is written; it is only "overwritten" if it held
        # a model before this run (and a resumed run replaces its own model).
        model.save(self.model_dir, overwrite=self._may_overwrite(resume), plot=cfg.output.plot)
        self._say(f"dmf: model written to {self.model_dir}")
        return model

    def _checkpoint(self, it, f, history, best, stopped) -> None:
        arrays = dict(f)
        state: dict[str, Any] = {
            "fingerprint": self.fingerprint(),
            "history": history,
            "stopped": stopped,
        }
        if best is not None:
            arrays.update({"best_" + k: v for k, v in best["f"].items()})
            state.update(best_rmse=best["rmse"], best_iteration=best["iteration"])
        write_checkpoint(
            self.checkpoint_dir, it, arrays, state, keep=self.config.train.keep_checkpoints
        )

    @staticmethod
    def _check_finite(f: dict[str, np.ndarray], it: int) -> None:
        for k, v in f.items():
            if not np.all(np.isfinite(v)):
                raise TrainingError(f"iteration {it}: {k} has non-finite values")

    def _report(self, rec: dict[str, Any]) -> None:
        val = rec["validation_rmse"]
        self._say(
            f"iter {rec['iteration']:3d}  train RMSE {rec['train_rmse']:.4f}  "
            f"val RMSE {'-' if val is None else f'{val:.4f}'}  objective {rec['objective']:.6e}  "
            f"{rec['seconds']:.2f} s  {(rec['ratings_per_second'] or 0) / 1e6:.2f}M ratings/s"
        )

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


_WORKERS_DIED = (
    "Workers died while solving blocks: if the worker logs say they exceeded their memory "
    "budget, raise cluster.memory_limit or lower blocks.target_ratings (re-ingest); each worker "
    "also holds the other side's factors, (rows x (rank + 1)) numbers"
)


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def train(
    store: Store | str | Path,
    config: Config,
    client=None,
    resume: bool = False,
    address: str | None = None,
    scheduler_file: str | None = None,
    quiet: bool = False,
) -> Model:
    """Train a model on ``store`` with ``config``; save it to ``config.output.model`` and return it.

    Parameters
    ----------
    store
        An opened :class:`Store` or its path.
    client
        An existing ``distributed.Client`` (e.g. a notebook's). Without one, the cluster of
        ``config.cluster`` (or ``address`` / ``scheduler_file``) is used, started and stopped here
        if it is a LocalCluster.
    resume
        Continue from the newest complete checkpoint in ``<output.model>/checkpoints``.
    """
    if not isinstance(store, Store):
        store = Store.open(config.resolve(store))
    if store.n_train == 0:
        raise TrainingError(f"store {store.path} has no train ratings")
    with maybe_connect(config, client, address, scheduler_file, quiet=quiet) as c:
        return Trainer(store, config, c, quiet=quiet).run(resume=resume)
