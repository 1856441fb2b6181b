"""The training loop: iterations of two half-steps, stopping rules, checkpoints, resume, saving.

One iteration is the same half-step twice with the roles swapped (:mod:`dmf.train.halfstep`):
users given items, then items given users. :class:`Trainer` puts the pieces together:

- :meth:`Trainer.run` checks the run can start (:meth:`Trainer._preflight`), starts fresh or
  resumes from the newest checkpoint (:meth:`Trainer._start`), runs the iterations
  (:meth:`Trainer._iterate`), and saves the model (:meth:`Trainer._save`);
- :class:`Stopping` holds the stopping rules: early stopping on validation RMSE (keeping the
  best model) and the objective's tolerance.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmf.als.kernels import warm_up
from dmf.als.solver import predict
from dmf.config import Config, TrainConfig
from dmf.dist.cluster import maybe_connect
from dmf.errors import CheckpointError, ConfigError, ModelError, TrainingError
from dmf.model.model import MODEL_JSON, Model, check_replaceable
from dmf.store.layout import MANIFEST, Store
from dmf.store.storage import Location, preflight
from dmf.train.checkpoint import (
    describe_mismatch,
    latest_checkpoint,
    remove_checkpoints,
    write_checkpoint,
)
from dmf.train.halfstep import HalfSteps
from dmf.train.state import TrainState, initial_state, train_counts

log = logging.getLogger("dmf")


def rmse_on_split(store: Store, split: str, state: TrainState) -> float | None:
    """RMSE of held-out ratings (known users and items only), streamed in record batches."""
    pf = store.open_split(split)
    if pf is None:
        return None
    u, i = state.users, state.items
    sse, n = 0.0, 0
    for batch in pf.iter_batches(batch_size=1 << 20, columns=["user", "item", "rating"]):
        r = batch.column(2).to_numpy().astype(np.float64)
        pred = predict(
            store.mu,
            u.factors,
            u.bias,
            i.factors,
            i.bias,
            batch.column(0).to_numpy(),
            batch.column(1).to_numpy(),
        )
        sse += float(np.square(r - pred).sum())
        n += len(r)
    return math.sqrt(sse / n) if n else None


@dataclass
class Best:
    """The best model so far by validation RMSE (early stopping keeps it)."""

    rmse: float
    iteration: int
    state: TrainState


@dataclass
class Stopping:
    """The stopping rules, and what they have seen so far.

    Early stopping (``train.early_stopping``): stop after ``patience`` iterations without a
    validation RMSE better than the best by ``min_delta``; the best model is kept. Tolerance
    (``train.tolerance``): stop when the objective's relative decrease over an iteration is
    below it.
    """

    config: TrainConfig
    best: Best | None = None
    previous_objective: float | None = None
    reason: str = ""

    def update(self, rec: dict[str, Any], state: TrainState) -> str:
        """Take one iteration's record; returns why training stops now ('' to go on)."""
        it, val, obj = rec["iteration"], rec["validation_rmse"], rec["objective"]
        es = self.config.early_stopping
        if es is not None and val is not None:
            if self.best is None or val < self.best.rmse - es.min_delta:
                self.best = Best(val, it, state.copy())
            elif it - self.best.iteration >= es.patience:
                self.reason = (
                    "early stopping: no better validation RMSE since iteration "
                    f"{self.best.iteration}"
                )
        tol, prev = self.config.tolerance, self.previous_objective
        if tol and prev is not None and not self.reason:
            rel = (prev - obj) / max(abs(prev), 1e-300)
            if rel < tol:
                self.reason = f"converged: relative objective change {rel:.2e} < tolerance {tol}"
        self.previous_objective = obj
        return self.reason


@dataclass
class Progress:
    """Where a run is: the iterations done (their records), the stopping rules' state, and the
    next iteration to run."""

    history: list[dict[str, Any]] = field(default_factory=list)
    stopping: Stopping | None = None
    next_iteration: int = 1


class Trainer:
    """Runs ALS on a store with a Dask client. Use :func:`train` unless you need the pieces."""

    def __init__(self, store: Store, config: Config, client, quiet: bool = False):
        self.store = store
        self.config = config
        self.client = client
        self.quiet = quiet
        self.counts = train_counts(store)
        self.halfsteps = HalfSteps(store, config, client, self._progress_disabled())
        self.model_dir = Location.of(config.resolve(config.output.model), config.storage.options)
        self.checkpoint_dir = self.model_dir / "checkpoints"

    def _should_cache(self) -> bool:
        return self.halfsteps.should_cache()

    def _progress_disabled(self) -> bool | None:
        mode = self.config.train.progress
        if self.quiet or mode == "off":
            return True
        return None if mode == "auto" else False

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model section and the store."""
        return {"model": self.config.to_dict()["model"], "store": self.store.fingerprint}

    def _may_overwrite(self, resume: bool) -> bool:
        return self.config.output.overwrite or resume or not (self.model_dir / MODEL_JSON).exists()

    # -- the run -----------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Model:
        """Train (or continue training, with ``resume``); save the model and return it."""
        self._preflight(resume)
        state, progress = self._start(resume)
        # Compile the solver kernel here (or load it from numba's disk cache), so that workers
        # on this machine load it instead of all compiling it at once.
        warm_up(self.config.model.dtype)
        if self.halfsteps.should_cache():
            self.halfsteps.cache_blocks()
        state = self._iterate(state, progress)
        return self._save(state, progress, resume)

    def _preflight(self, resume: bool) -> None:
        """Refuse a run that cannot end well, now rather than after hours of training."""
        tc = self.config.train
        if not self._may_overwrite(resume):
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
        # Every worker reads the store's blocks and the driver writes the model: the workers
        # must reach the store (and, for the factor files they will write, the model directory).
        preflight(self.client, reads=[self.store.root / MANIFEST], writes=[self.model_dir])

    def _start(self, resume: bool) -> tuple[TrainState, Progress]:
        """The initial state, or the newest checkpoint's when resuming."""
        progress = Progress(stopping=Stopping(self.config.train))
        if not resume:
            # A fresh run: checkpoints of an earlier run in this directory would be mistaken for
            # this run's (and prune them, being newer by name).
            remove_checkpoints(self.checkpoint_dir)
            return initial_state(self.store, self.config.model), progress
        found = latest_checkpoint(self.checkpoint_dir)
        if found is None:
            self._say(f"dmf: no checkpoint in {self.checkpoint_dir}; starting from scratch")
            return initial_state(self.store, self.config.model), progress
        return self._resume_from(*found)

    def _resume_from(
        self, saved: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[TrainState, Progress]:
        diff = describe_mismatch(saved["fingerprint"], self.fingerprint())
        if diff:
            raise CheckpointError(
                f"checkpoint in {self.checkpoint_dir} was made with a different config or store: "
                + "; ".join(diff)
                + ". Train without --resume (or use another output.model)."
            )
        tc = self.config.train
        stopping = Stopping(tc, reason=saved.get("stopped", ""))
        # The kept best model only matters while early stopping is on: a resumed run with early
        # stopping switched off must end with its last iteration.
        if "best_user_factors" in arrays and tc.early_stopping is not None:
            best = TrainState.from_arrays(arrays, self.counts, prefix="best_")
            stopping.best = Best(saved["best_rmse"], saved["best_iteration"], best)
        history = saved["history"]
        stopping.previous_objective = history[-1]["objective"] if history else None
        self._say(f"dmf: resuming after iteration {saved['iteration']} from {self.checkpoint_dir}")
        progress = Progress(history, stopping, saved["iteration"] + 1)
        return TrainState.from_arrays(arrays, self.counts), progress

    def _iterate(self, state: TrainState, progress: Progress) -> TrainState:
        """Iterations from ``progress.next_iteration`` until the last or a stopping rule."""
        from distributed import span

        tc = self.config.train
        stopping = progress.stopping
        it = progress.next_iteration
        while it <= tc.iterations and not stopping.reason:
            t0 = time.perf_counter()
            with span("dmf-train", f"iteration-{it}"):
                after_users = self._half_step("user", state, it)
                after_items = self._half_step("item", state, it)
            seconds = time.perf_counter() - t0
            state.check_finite(it)
            rec = self._record(it, after_users, after_items, seconds, state)
            progress.history.append(rec)
            self._report(rec)
            stopping.update(rec, state)
            if tc.checkpoint_every and (
                it % tc.checkpoint_every == 0 or stopping.reason or it == tc.iterations
            ):
                self._checkpoint(it, state, progress)
            it += 1
        progress.next_iteration = it
        if stopping.reason:
            self._say(f"dmf: {stopping.reason}")
        return state

    def _half_step(self, side: str, state: TrainState, it: int) -> dict[str, float]:
        """Solve ``side`` given the other side; ``state`` gets the new side. Returns the
        half-step's squared error, objective and ratings seen."""
        fixed = state.fixed_for(side)
        res = self.halfsteps.run(state.side(side), fixed, it)
        state.replace(res.side)
        objective = res.sse + res.penalty + fixed.penalty(self.config.model)
        return {"sse": res.sse, "objective": objective, "nnz": res.nnz}

    def _record(self, it, after_users, after_items, seconds, state) -> dict[str, Any]:
        n_train = self.store.n_train
        return {
            "iteration": it,
            "train_rmse": math.sqrt(after_items["sse"] / n_train) if n_train else None,
            "validation_rmse": rmse_on_split(self.store, "validation", state),
            "objective": after_items["objective"],
            "objective_after_user_step": after_users["objective"],
            "seconds": seconds,
            "ratings_per_second": n_train / seconds if seconds > 0 else None,
        }

    def _checkpoint(self, it: int, state: TrainState, progress: Progress) -> None:
        stopping = progress.stopping
        arrays = state.arrays()
        saved: dict[str, Any] = {
            "fingerprint": self.fingerprint(),
            "history": progress.history,
            "stopped": stopping.reason,
        }
        if stopping.best is not None:
            arrays.update(stopping.best.state.arrays(prefix="best_"))
            saved.update(best_rmse=stopping.best.rmse, best_iteration=stopping.best.iteration)
        write_checkpoint(
            self.checkpoint_dir, it, arrays, saved, keep=self.config.train.keep_checkpoints
        )

    def _save(self, state: TrainState, progress: Progress, resume: bool) -> Model:
        """The model to keep (the best one under early stopping), written to the model
        directory."""
        stopping = progress.stopping
        meta: dict[str, Any] = {
            "stopped": stopping.reason or "iterations",
            "iterations_run": len(progress.history),
        }
        final = state
        best = stopping.best
        if best is not None:
            final = best.state
            meta.update(best_iteration=best.iteration, best_validation_rmse=best.rmse)
            if best.iteration != len(progress.history):
                self._say(
                    f"dmf: keeping the model of iteration {best.iteration} (best validation RMSE)"
                )
        model = Model(
            mu=self.store.mu,
            user_ids=self.store.ids("user"),
            item_ids=self.store.ids("item"),
            user_factors=final.users.factors,
            user_bias=final.users.bias,
            item_factors=final.items.factors,
            item_bias=final.items.bias,
            config=self.config.to_dict(),
            history=progress.history,
            store_fingerprint=self.store.fingerprint,
            store_path=str(self.store.root),
            meta=meta,
        )
        # The directory exists once a checkpoint is written; it is only "overwritten" if it held
        # a model before this run (and a resumed run replaces its own model).
        model.save(
            self.model_dir, overwrite=self._may_overwrite(resume), plot=self.config.output.plot
        )
        self._say(f"dmf: model written to {self.model_dir}")
        return model

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
        store = Store.open(config.resolve(store), options=config.storage.options)
    if store.n_train == 0:
        raise TrainingError(f"store {store.path} has no train ratings")
    with maybe_connect(config, client, address, scheduler_file, quiet=quiet) as c:
        return Trainer(store, config, c, quiet=quiet).run(resume=resume)
