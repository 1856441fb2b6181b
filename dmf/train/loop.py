"""The training loop: iterations of two half-steps, stopping rules, checkpoints, resume, saving.

One iteration is the same half-step twice with the roles swapped (:mod:`dmf.train.halfstep`):
users given items, then items given users. :class:`Trainer` puts the pieces together:

- :meth:`Trainer.run` takes the model directory's writer lease and a claim on the store
  (:func:`hold_run`, :mod:`dmf.store.lease`), checks the run can start
  (:meth:`Trainer._preflight`: an earlier run's checkpoints need ``resume`` or ``fresh``),
  starts fresh or resumes from the newest checkpoint (:meth:`Trainer._start`), plans how each
  half-step gets its fixed side (:meth:`dmf.train.halfstep.HalfSteps.plan`), runs the iterations
  (:meth:`Trainer._iterate`), and saves the model (:meth:`Trainer._save`), its factor files
  written by the workers;
- :class:`Stopping` holds the stopping rules: early stopping on validation RMSE (keeping the
  best model) and the objective's tolerance.

The driver holds metadata and scalars only: each side is a version of block files in the model
directory's ``work/`` (:mod:`dmf.train.sides`); a checkpoint names the versions it needs, and
versions that nothing names any more are deleted as training goes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmf.als.kernels import warm_up
from dmf.config import Config, TrainConfig
from dmf.dist.cluster import maybe_connect
from dmf.errors import (
    CheckpointError,
    ConfigError,
    LeaseError,
    ModelError,
    StoreError,
    TrainingError,
)
from dmf.model.model import MODEL_JSON, Model, check_replaceable, commit_model, factor_part_rel
from dmf.store.layout import MANIFEST, Store
from dmf.store.lease import CLAIMS, WRITER, Lease, LeaseHeld, acquire, claim
from dmf.store.storage import Commit, Location, StorageError, preflight, read_manifest
from dmf.train.checkpoint import (
    STATE,
    describe_mismatch,
    iteration_of,
    latest_checkpoint,
    list_checkpoints,
    remove_checkpoints,
    write_checkpoint,
)
from dmf.train.halfstep import HalfSteps, prediction_range
from dmf.train.sides import check_side_file, export_block_task, first_ids
from dmf.train.state import TrainState, checkpoint_side_refs

# Where a model directory keeps the side versions of its training (dmf.train.sides).
WORK = "work"
# 2: a checkpoint names side versions (block files in work/) instead of holding arrays.
CHECKPOINT_FORMAT = 2

log = logging.getLogger("dmf")


def validation_loss(rec: dict[str, Any]) -> float | None:
    """An iteration's validation figure as a loss (lower is better): the RMSE, or for implicit
    feedback minus the NDCG."""
    if "validation_ndcg" in rec:
        v = rec["validation_ndcg"]
        return None if v is None else -v
    return rec["validation_rmse"]


def validation_name(rec: dict[str, Any]) -> str:
    return "NDCG" if "validation_ndcg" in rec else "RMSE"


@dataclass
class Best:
    """The best model so far by validation RMSE, or minus NDCG for implicit feedback (early
    stopping keeps it)."""

    rmse: float
    iteration: int
    state: TrainState


@dataclass
class Stopping:
    """The stopping rules, and what they have seen so far.

    Early stopping (``train.early_stopping``): stop after ``patience`` iterations without a
    validation RMSE better than the best by ``min_delta``, not before ``min_iterations``; the
    best model is kept. Tolerance
    (``train.tolerance``): stop when the objective's relative decrease over an iteration is
    below it.
    """

    config: TrainConfig
    best: Best | None = None
    previous_objective: float | None = None
    reason: str = ""

    def update(self, rec: dict[str, Any], state: TrainState) -> str:
        """Take one iteration's record; returns why training stops now ('' to go on)."""
        it, val, obj = rec["iteration"], validation_loss(rec), rec["objective"]
        es = self.config.early_stopping
        if es is not None and val is not None:
            if self.best is None or val < self.best.rmse - es.min_delta:
                self.best = Best(val, it, state)  # immutable: its files are kept (GC)
            elif it - self.best.iteration >= es.patience and it >= es.min_iterations:
                self.reason = (
                    f"early stopping: no better validation {validation_name(rec)} since "
                    f"iteration {self.best.iteration}"
                )
        tol, prev = self.config.tolerance, self.previous_objective
        if tol and prev is not None and not self.reason:
            rel = (prev - obj) / max(abs(prev), 1e-300)
            # abs: under train.solver cg the objective may rise, which is not convergence.
            if abs(rel) < tol:
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


def model_location(config: Config) -> Location:
    """The model directory of ``config`` (``output.model``)."""
    return Location.of(config.resolve(config.output.model), config.storage.options)


@dataclass
class RunLocks:
    """What a training run holds while it runs: the model directory's exclusive writer lease,
    and a shared claim on the store (None when the store cannot be written to)."""

    writer: Lease
    claim: Lease | None

    def check(self) -> None:
        """Raise :class:`dmf.errors.LeaseError` if either lease was lost."""
        self.writer.check()
        if self.claim is not None:
            self.claim.check()


@contextlib.contextmanager
def hold_run(
    store: Store, config: Config, resume: bool = False, fresh: bool = False
) -> Iterator[RunLocks]:
    """Hold ``<output.model>/_writer.lease`` (exclusive: a second run on the directory is
    refused, naming this one) and ``<store>/_claims/<token>.lease`` (shared: ingest will not
    replace the store under this run) until the block ends; both are refreshed every third of
    ``train.lease_seconds``. Once both are held, the run's checks (:func:`check_run`) pass or
    raise."""
    model_dir = model_location(config)
    # Never put a lease into a directory that is not a model's (output.model: runs, say).
    check_replaceable(model_dir)
    ttl = config.train.lease_seconds
    try:
        writer = acquire(model_dir / WRITER, ttl, {"store": str(store.root)})
    except LeaseHeld as exc:
        h = exc.holder
        raise LeaseError(
            f"model directory {model_dir} is being written by another run: {h.describe()}. "
            "Wait for it to finish, or choose another output.model. If that run was killed, its "
            f"lease ({exc.loc}) expires in {max(h.expires_in(), 0):.0f} s "
            "(train.lease_seconds) and a new run then takes over"
        ) from None
    with writer:
        try:
            store_claim = claim(store.root / CLAIMS, ttl, {"model": str(model_dir)})
        except (StorageError, OSError) as exc:  # a read-only store: train, unprotected
            log.warning(
                "dmf: cannot claim the store %s (%s): an ingest into it will not know that "
                "this run reads it",
                store.root,
                exc,
            )
            store_claim = None
        with store_claim or contextlib.nullcontext():
            # An ingest may have replaced the store between its opening and the claim.
            now = read_manifest(store.root, MANIFEST) or {}
            if now.get("version") != store.manifest.version:
                raise StoreError(
                    f"the store at {store.root} was replaced (by an ingest) after this run "
                    "opened it; run again"
                )
            check_run(store, config, model_dir, resume, fresh)
            yield RunLocks(writer, store_claim)


def check_run(store: Store, config: Config, model_dir: Location, resume: bool, fresh: bool) -> None:
    """The checks a run passes before any work, on the driver (under its leases, after
    :func:`hold_run` checked that ``model_dir`` is a model's): refuse a run that cannot end
    well, or that would discard an earlier run's work unasked."""
    tc = config.train
    if resume and fresh:
        raise ConfigError(
            "resume and fresh exclude each other: resume continues the checkpointed run, fresh "
            "discards it"
        )
    if not _may_overwrite(config, model_dir, resume):
        raise ModelError(
            f"model directory {model_dir} already holds a model; set "
            "output.overwrite: true, choose another output.model, or resume"
        )
    if tc.early_stopping is not None and store.n_split("validation") == 0:
        # On by default; without a validation split it has nothing to go by. Said louder when
        # the config asked for it.
        explicit = "early_stopping" in tc.model_fields_set
        (log.warning if explicit else log.info)(
            "dmf: early stopping is off: the store has no validation split (set "
            "split.validation and re-ingest to have one); training runs all %d iterations",
            tc.iterations,
        )
    if not (resume or fresh):
        ckpts = list_checkpoints(model_dir / "checkpoints")
        if ckpts and not _saved_after(model_dir, ckpts[-1]):
            raise CheckpointError(
                f"model directory {model_dir} holds {len(ckpts)} checkpoint(s) of an earlier "
                f"run that did not finish, the newest after iteration "
                f"{iteration_of(ckpts[-1])}: pass --resume to continue that run, or --fresh to "
                "discard them and start over (Python: train(..., resume=True) or fresh=True)"
            )


def _saved_after(model_dir: Location, newest: Location) -> bool:
    """Whether the model in ``model_dir`` was saved after checkpoint ``newest``: then the
    checkpoints are the finished run's, and replacing its model (``output.overwrite``)
    replaces them too; otherwise they are the work of a run that was stopped."""
    try:
        return (model_dir / MODEL_JSON).modified() >= (newest / STATE).modified()
    except (FileNotFoundError, StorageError):
        return False


def _may_overwrite(config: Config, model_dir: Location, resume: bool) -> bool:
    return config.output.overwrite or resume or not (model_dir / MODEL_JSON).exists()


class Trainer:
    """Runs ALS on a store with a Dask client. Use :func:`train` unless you need the pieces.

    ``locks``: the :class:`RunLocks` the run already holds (:func:`train` takes them before
    starting a cluster); without them, :meth:`run` takes its own.
    """

    def __init__(
        self,
        store: Store,
        config: Config,
        client,
        quiet: bool = False,
        locks: RunLocks | None = None,
        callback: Callable[[dict[str, Any]], Any] | None = None,
    ):
        self.store = store
        self.callback = callback
        self.config = config
        self.client = client
        self.quiet = quiet
        self.locks = locks
        self.model_dir = model_location(config)
        self.checkpoint_dir = self.model_dir / "checkpoints"
        self.work = self.model_dir / WORK
        self.halfsteps = HalfSteps(store, config, client, self.work, self._progress_disabled())

    def _should_cache(self) -> bool:
        return self.halfsteps.should_cache()

    def _progress_disabled(self) -> bool | None:
        mode = self.config.train.progress
        if self.quiet or mode == "off":
            return True
        return None if mode == "auto" else False

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model section and the store.
        ``model.clip`` is left out: it changes predictions, never the factors (and checkpoints
        made before it existed resume)."""
        model = {k: v for k, v in self.config.to_dict()["model"].items() if k != "clip"}
        if model["feedback"] == "explicit":
            # The implicit-feedback keys change nothing here: left out, so checkpoints made
            # before they existed resume.
            for k in ("feedback", "alpha", "confidence", "eps", "biases"):
                del model[k]
        return {"model": model, "store": self.store.fingerprint}

    def _may_overwrite(self, resume: bool) -> bool:
        return _may_overwrite(self.config, self.model_dir, resume)

    # -- the run -----------------------------------------------------------------------------
    def run(
        self, resume: bool = False, in_memory: bool | None = None, fresh: bool = False
    ) -> Model:
        """Train (or continue training, with ``resume``; or discard an earlier run's
        checkpoints, with ``fresh``); save the model and return it, loaded with ``in_memory``
        (:meth:`dmf.model.model.Model.load`)."""
        if self.locks is None:
            with hold_run(self.store, self.config, resume, fresh) as locks:
                self.locks = locks
                try:
                    return self.run(resume, in_memory, fresh)
                finally:
                    self.locks = None
        self._preflight()
        self.halfsteps.plan()
        # Compile the solver kernel here (or load it from numba's disk cache), so that workers
        # on this machine load it instead of all compiling it at once.
        warm_up(self.config.model.dtype, self.config.model.implicit)
        state, progress = self._start(resume)
        if self.halfsteps.should_cache():
            self.halfsteps.cache_blocks()
        state = self._iterate(state, progress)
        self._save(state, progress, resume)
        self._tidy_work()
        return Model.load(self.model_dir, in_memory=in_memory)

    def _preflight(self) -> None:
        """Refuse a run that cannot end well, now rather than after hours of training (what
        :func:`check_run` left: the workers' view)."""
        if self.config.train.iterations == 0:
            log.warning("dmf: train.iterations is 0: the model keeps its initial factors")
        # Every worker reads the store's blocks and the driver writes the model: the workers
        # must reach the store (and, for the factor files they will write, the model directory).
        preflight(self.client, reads=[self.store.root / MANIFEST], writes=[self.model_dir])

    def _start(self, resume: bool) -> tuple[TrainState, Progress]:
        """The initial state, or the newest checkpoint's when resuming."""
        progress = Progress(stopping=Stopping(self.config.train))
        if resume:
            found = self._latest_checkpoint()
            if found is not None:
                return self._resume_from(found)
            self._say(f"dmf: no checkpoint in {self.checkpoint_dir}; starting from scratch")
        # A fresh run (fresh, or no complete checkpoint: check_run refused the rest):
        # checkpoints of an earlier run in this directory would be mistaken for this run's (and
        # prune them, being newer by name), and its side versions are garbage.
        remove_checkpoints(self.checkpoint_dir)
        self.work.remove()
        return TrainState(None, self.halfsteps.initial_items()), progress

    def _latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint of this format whose side versions are all there and intact
        (every file's size and checksum checked by tasks on the workers); broken newer ones are
        reported and skipped."""
        found = latest_checkpoint(self.checkpoint_dir, self._check_checkpoint)
        return None if found is None else found[0]

    def _check_checkpoint(self, ckpt: Location, saved: dict[str, Any]) -> None:
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by another version of dmf (format "
                f"{saved.get('format')}, not {CHECKPOINT_FORMAT}); train without --resume"
            )
        self._verify_sides(ckpt, saved)

    def _verify_sides(self, ckpt: Location, saved: dict[str, Any]) -> None:
        refs = checkpoint_side_refs(saved, self.model_dir)
        problems = [
            p
            for p in self.halfsteps.gather(
                self.client.map(check_side_file, refs, pure=False), "the checkpoint's checks"
            )
            if p
        ]
        if problems:
            raise CheckpointError(f"checkpoint {ckpt}: {problems[0]}")

    def _resume_from(self, saved: dict[str, Any]) -> tuple[TrainState, Progress]:
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
        if saved.get("best") and tc.early_stopping is not None:
            b = saved["best"]
            best_state = TrainState.from_json(b["state"], self.model_dir)
            stopping.best = Best(b["rmse"], b["iteration"], best_state)
        history = saved["history"]
        stopping.previous_objective = history[-1]["objective"] if history else None
        self._say(f"dmf: resuming after iteration {saved['iteration']} from {self.checkpoint_dir}")
        progress = Progress(history, stopping, saved["iteration"] + 1)
        return TrainState.from_json(saved["state"], self.model_dir), progress

    def _iterate(self, state: TrainState, progress: Progress) -> TrainState:
        """Iterations from ``progress.next_iteration`` until the last or a stopping rule."""
        from distributed import span

        tc = self.config.train
        stopping = progress.stopping
        it = progress.next_iteration
        while it <= tc.iterations and not stopping.reason:
            self.locks.check()  # another run took the model directory over: stop writing
            t0 = time.perf_counter()
            with span("dmf-train", f"iteration-{it}"):
                state, after_users = self._half_step("user", state, it)
                state, after_items = self._half_step("item", state, it)
                validation = self.halfsteps.validation(state.users, state.items)
            seconds = time.perf_counter() - t0
            rec = self._record(it, after_users, after_items, seconds, validation)
            progress.history.append(rec)
            self._report(rec)
            stopping.update(rec, state)
            if self.callback is not None and self.callback(dict(rec)) is True:
                stopping.reason = stopping.reason or f"stopped by the callback after iteration {it}"
            if tc.checkpoint_every and (
                it % tc.checkpoint_every == 0 or stopping.reason or it == tc.iterations
            ):
                self._checkpoint(it, state, progress)
            self._collect_garbage(state, progress)
            it += 1
        progress.next_iteration = it
        if stopping.reason:
            self._say(f"dmf: {stopping.reason}")
        return state

    def _half_step(
        self, side: str, state: TrainState, it: int
    ) -> tuple[TrainState, dict[str, float]]:
        """Solve ``side`` given the other side. Returns the state with the new version of
        ``side``, and the half-step's squared error, objective and ratings seen."""
        fixed = state.fixed_for(side)
        res = self.halfsteps.run(side, fixed, it, current=state.side(side))
        objective = res.sse + res.side.penalty + fixed.penalty
        return state.with_side(res.side), {
            "sse": res.sse,
            "objective": objective,
            "nnz": res.nnz,
            "exchange": res.mode,
            "bytes_moved": res.bytes_moved,
            "seconds": res.seconds,
        }

    def _record(self, it, after_users, after_items, seconds, validation) -> dict[str, Any]:
        n_train = self.store.n_train
        if self.config.model.implicit:
            # The weighted loss over every cell; ranking quality instead of rating error.
            fit: dict[str, Any] = {
                "train_rmse": None,
                "train_loss": after_items["sse"],
                "validation_rmse": None,
                "validation_ndcg": validation,
            }
        else:
            fit = {
                "train_rmse": math.sqrt(after_items["sse"] / n_train) if n_train else None,
                "validation_rmse": validation,
            }
        return {
            "iteration": it,
            **fit,
            "objective": after_items["objective"],
            "objective_after_user_step": after_users["objective"],
            "seconds": seconds,
            "ratings_per_second": n_train / seconds if seconds > 0 else None,
            # How each half-step got its fixed side, and the factor bytes it moved.
            "exchange": {"user": after_users["exchange"], "item": after_items["exchange"]},
            "bytes_moved": {"user": after_users["bytes_moved"], "item": after_items["bytes_moved"]},
            "half_step_seconds": {"user": after_users["seconds"], "item": after_items["seconds"]},
        }

    def _checkpoint(self, it: int, state: TrainState, progress: Progress) -> None:
        """A checkpoint: a manifest naming the side versions of this state (and of the best
        one): their files are already written."""
        stopping = progress.stopping
        saved: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint(),
            "history": progress.history,
            "stopped": stopping.reason,
            "state": state.to_json(self.model_dir),
        }
        if stopping.best is not None:
            saved["best"] = {
                "rmse": stopping.best.rmse,
                "iteration": stopping.best.iteration,
                "state": stopping.best.state.to_json(self.model_dir),
            }
        write_checkpoint(
            self.checkpoint_dir, it, {}, saved, keep=self.config.train.keep_checkpoints
        )

    def _collect_garbage(self, state: TrainState, progress: Progress) -> None:
        """Delete the side versions that neither the current state, nor the best one, nor a
        kept checkpoint names."""
        keep = state.roots()
        if progress.stopping.best is not None:
            keep |= progress.stopping.best.state.roots()
        for ckpt in list_checkpoints(self.checkpoint_dir):
            saved = read_manifest(ckpt, STATE, error=CheckpointError) or {}
            keep |= _roots_named(saved, self.model_dir)
        self._remove_versions_but(keep)

    def _tidy_work(self) -> None:
        """Once the model is written: keep of ``work/`` only the side versions a kept checkpoint
        names (what ``--resume`` needs); the routing, the exchange files and every other
        version go (at model scale, gigabytes beside the model's own files)."""
        keep: set[str] = set()
        for ckpt in list_checkpoints(self.checkpoint_dir):
            saved = read_manifest(ckpt, STATE, error=CheckpointError) or {}
            keep |= _roots_named(saved, self.model_dir)
        if not keep:
            self.work.remove()
            return
        for name in self.work.ls():
            if name not in ("user", "item"):
                (self.work / name).remove()
        self._remove_versions_but(keep)

    def _remove_versions_but(self, keep: set[str]) -> None:
        for side in ("user", "item"):
            for name in (self.work / side).ls():
                version = self.work / side / name
                if version.url not in keep:
                    version.remove()

    def _save(self, state: TrainState, progress: Progress, resume: bool) -> None:
        """The model to keep (the best one under early stopping), written to the model
        directory: each block's factor file by a task on a worker, ``model.json`` last."""
        stopping = progress.stopping
        meta: dict[str, Any] = {
            "stopped": stopping.reason or "iterations",
            "iterations_run": len(progress.history),
        }
        final = state
        best = stopping.best
        if best is not None:
            final = best.state
            if self.config.model.implicit:
                meta.update(best_iteration=best.iteration, best_validation_ndcg=-best.rmse)
            else:
                meta.update(best_iteration=best.iteration, best_validation_rmse=best.rmse)
            if best.iteration != len(progress.history):
                what = "NDCG" if self.config.model.implicit else "RMSE"
                self._say(
                    f"dmf: keeping the model of iteration {best.iteration} (best validation {what})"
                )
        # The directory exists once a checkpoint is written; it is only "overwritten" if it held
        # a model before this run (and a resumed run replaces its own model).
        if not self._may_overwrite(resume) and (self.model_dir / MODEL_JSON).exists():
            raise ModelError(f"model directory {self.model_dir} exists; it was not replaced")
        final = self._complete(final)
        self.locks.check()
        m = self.config.model
        with Commit(self.model_dir, MODEL_JSON) as c:
            futs = [
                self.client.submit(
                    export_block_task,
                    side.ref(b),
                    self.store.id_map_ref(side.side, b),
                    c.target,
                    key=f"export-{side.side}s-{b:05d}-{self.halfsteps.token}",
                    pure=False,
                )
                for side in final.sides()
                for b in range(side.n_blocks)
            ]
            which = [(v.side, b) for v in final.sides() for b in range(v.n_blocks)]
            exported = self.halfsteps.gather(futs, "the model's export")
            for (name, b), e in zip(which, exported, strict=True):
                c.add(factor_part_rel(name, b), e.entry)
            firsts = {
                side.side: first_ids(
                    [e for (n, _), e in zip(which, exported, strict=True) if n == side.side]
                )
                for side in final.sides()
            }
            doc = {
                "mu": self.halfsteps.params.mu,
                # What predictions are clipped to while model.clip is on (the model's config
                # has it; Model.clip switches it).
                "rating_range": prediction_range(self.config, self.store),
                "rank": m.rank,
                "n_users": self.store.n_users,
                "n_items": self.store.n_items,
                "dtype": m.dtype,
                "store_fingerprint": self.store.fingerprint,
                "store_path": str(self.store.root),
                "config": self.config.to_dict(),
                "history": progress.history,
                "blocks": {s.side: list(s.bounds) for s in final.sides()},
                "first_ids": {k: v for k, v in firsts.items() if v is not None},
                **meta,
            }
            self.locks.check()
            commit_model(self.model_dir, c, doc, self.config.output.plot)
        self._say(f"dmf: model written to {self.model_dir}")

    def _complete(self, state: TrainState) -> TrainState:
        """A state with both sides (iterations 0: the users were never solved: zero them)."""
        if state.users is not None:
            return state
        res = self.halfsteps.zero_users()
        return state.with_side(res)

    def _report(self, rec: dict[str, Any]) -> None:
        if "validation_ndcg" in rec:
            val = rec["validation_ndcg"]
            k = self.config.evaluate.k
            fit = f"val NDCG@{k} {'-' if val is None else f'{val:.4f}'}"
        else:
            val = rec["validation_rmse"]
            fit = f"train RMSE {rec['train_rmse']:.4f}  val RMSE {'-' if val is None else f'{val:.4f}'}"
        self._say(
            f"iter {rec['iteration']:3d}  {fit}  objective {rec['objective']:.6e}  "
            f"{rec['seconds']:.2f} s  {(rec['ratings_per_second'] or 0) / 1e6:.2f}M ratings/s"
        )

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


def _roots_named(saved: dict[str, Any], model_dir: Location) -> set[str]:
    """The side versions a checkpoint's ``state.json`` names (its state, and the best one)."""
    roots: set[str] = set()
    for key in ("state", "best"):
        doc = saved.get(key)
        doc = doc.get("state") if key == "best" and doc else doc
        if doc:
            roots |= TrainState.from_json(doc, model_dir).roots()
    return roots


def train(
    store: Store | str | Path,
    config: Config,
    client=None,
    resume: bool = False,
    address: str | None = None,
    scheduler_file: str | None = None,
    quiet: bool = False,
    in_memory: bool | None = None,
    fresh: bool = False,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> Model:
    """Train a model on ``store`` with ``config``; save it to ``config.output.model`` and return it.

    The run holds the model directory (a second run on it is refused, naming this one) and a
    claim on the store (ingest will not replace it meanwhile), taken before any cluster starts
    (:func:`hold_run`).

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
    fresh
        Discard the checkpoints of an earlier run in ``<output.model>/checkpoints`` and start
        over. Without ``resume`` or ``fresh``, such checkpoints make the run refuse to start.
    in_memory
        How the returned model holds its factors (:meth:`dmf.model.model.Model.load`): by
        default each side that takes at most 1 GiB is read into memory.
    callback
        Called after every iteration with a copy of its history record (``iteration``,
        ``train_rmse``, ``validation_rmse``, ``objective``, ``seconds``, ...). Returning
        ``True`` stops training there, as a stopping rule does (the model is saved, the best
        one under early stopping); an exception it raises ends the run without a model.
    """
    if not isinstance(store, Store):
        store = Store.open(config.resolve(store), options=config.storage.options)
    if store.n_train == 0:
        raise TrainingError(f"store {store.path} has no train ratings")
    with hold_run(store, config, resume, fresh) as locks:  # and its checks, before a cluster
        with maybe_connect(config, client, address, scheduler_file, quiet=quiet) as c:
            trainer = Trainer(store, config, c, quiet=quiet, locks=locks, callback=callback)
            return trainer.run(resume=resume, in_memory=in_memory, fresh=fresh)
