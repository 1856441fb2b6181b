"""``dmf tune``: a hyperparameter search on the validation split, with Optuna.

What is searched (``tune`` section of the config, :class:`dmf.config.TuneConfig`): ``model.rank``
(integers, log scale), ``model.reg`` and ``model.reg_bias`` (log scale), ``model.weighted_reg``
(ALS-WR or not) and the number of iterations. Each trial trains with dmf on the store and is
scored by its best validation RMSE over its iterations.

**Iterations are searched along each trial's curve, not sampled.** ALS is deterministic given
the config: a run of ``k`` iterations is exactly the first ``k`` iterations of a longer run with
the same settings. So a trial runs up to ``tune.iterations`` (stopping after ``tune.patience``
iterations without a better validation RMSE: ``train.early_stopping`` with ``min_delta: 0``), and
each of its iterations is a candidate ``train.iterations`` at no extra cost. Sampling the count
as a parameter would train the same prefixes again and make the pruner compare trials of
different lengths.

**Trials in parallel.** ``study.optimize(n_jobs=tune.parallel)`` runs trials on threads of this
process; each calls :func:`dmf.train.loop.train` with the same Dask client, on its own model
directory (``<tune.output>/trials/NNNNN``), without checkpoints or plot, quietly. Their tasks
never collide: every task key of a run carries the run's token
(:class:`dmf.train.halfstep.HalfSteps`). The rating blocks cached in worker memory are the
exception, on purpose: their keys name the block's file
(:func:`dmf.train.halfstep.cached_block_key`), so concurrent trials use one copy, and the search
holds that copy from its first trial to its last (:func:`hold_blocks`), so it is read once. What
``train()`` touches that is global to the process is thread-safe: logging, Dask's span
annotations (context variables), numba's compilation (its lock); progress bars are off. Each
running trial holds its own copy of the side it broadcasts: size ``cluster.memory_limit`` for
``tune.parallel`` runs at once.

With ``parallel`` above 1, which settings the seeded TPE sampler proposes depends on which
trials have finished when it is asked, that is on thread timing: two searches with one seed may
differ. A trial's own result never does: the same settings give the same validation RMSE to the
last bit, alone or beside other trials. ``parallel: 1`` makes the search itself reproducible.

**Pruning.** After every iteration the trial reports its validation RMSE to Optuna
(``trial.report(rmse, iteration)``) from the training loop's callback; when the pruner
(``tune.pruner``: Optuna's MedianPruner or HyperbandPruner) says so, the callback raises
``optuna.TrialPruned``, which ends ``train()`` without a model (its leases are released by their
context managers) and marks the trial pruned; its directory is removed. The pruner judges trials
from iteration ``tune.warmup`` on: ALS curves cross (an over-regularised trial is flat after two
iterations, a well regularised one descends for many), so judging early prunes the best.

**The best config** (``best.yaml``) is the config searched with the best trial's rank,
regularisation and ALS-WR, ``train.iterations`` set to its best iteration and its
``train.early_stopping`` (``min_delta: 0``); paths are absolute, so the file works from anywhere.
``dmf run best.yaml`` trains the same iterations on the same store from the same seed, so its
validation RMSE (the last, and best, of its history) is the one reported here, bit for bit.

Written to ``tune.output``: ``trials.csv`` (a row per trial), ``trials.png`` (validation RMSE
per iteration of each trial), ``best.yaml``, ``tune.json`` (the search, every trial's curve),
and ``trials/NNNNN``, the model of each completed trial.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dmf.config import Config, TuneConfig
from dmf.dist.cluster import maybe_connect
from dmf.errors import ConfigError, DmfError, TrainingError
from dmf.store.layout import Store
from dmf.store.storage import Location, config_location, write_atomic

TRIALS = "trials"
SUMMARY = "tune.json"
TABLE = "trials.csv"
PLOT = "trials.png"
BEST = "best.yaml"
# What a search writes in tune.output: a directory holding only these may be replaced.
OURS = {TRIALS, SUMMARY, TABLE, PLOT, BEST}
SEARCHED = ("rank", "reg", "reg_bias", "weighted_reg", "alpha")


@dataclass(frozen=True)
class Metric:
    """What trials are scored by: the validation RMSE (explicit ratings, lower is better) or,
    for implicit feedback, the validation NDCG@k (higher is better)."""

    key: str
    label: str
    direction: str

    @classmethod
    def of(cls, config: Config) -> Metric:
        if config.model.implicit:
            return cls("validation_ndcg", f"validation NDCG@{config.evaluate.k}", "maximize")
        return cls("validation_rmse", "validation RMSE", "minimize")

    def order(self, value: float) -> float:
        """A sort key, best first."""
        return value if self.direction == "minimize" else -value

    @property
    def short(self) -> str:
        return "val NDCG" if self.key == "validation_ndcg" else "val RMSE"


@dataclass(frozen=True)
class TrialResult:
    """One trial: its settings, its validation RMSE per iteration, and how it ended.

    ``state`` is ``complete``, ``pruned`` or ``failed``. ``value`` (the best validation RMSE)
    and ``best_iteration`` are set for a completed trial, ``model`` is its model directory."""

    number: int
    state: str
    params: dict[str, Any]
    curve: list[tuple[int, float]]
    value: float | None = None
    best_iteration: int | None = None
    seconds: float = 0.0
    model: str | None = None
    metric: str = "validation_rmse"
    """The history key the trial was scored by (:class:`Metric`)."""

    def row(self) -> dict[str, Any]:
        """The trial's row of ``trials.csv``."""
        last = self.curve[-1] if self.curve else (None, None)
        return {
            "trial": self.number,
            "state": self.state,
            **{k: self.params.get(k) for k in SEARCHED},
            self.metric: self.value,
            "best_iteration": self.best_iteration,
            "iterations_run": last[0],
            f"last_{self.metric}": last[1],
            "seconds": round(self.seconds, 3),
            "model": self.model,
        }


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found: the best trial, every trial, the best config (``best.yaml``), and
    where the results are."""

    best: TrialResult
    trials: list[TrialResult]
    config: Config
    output: Location
    files: dict[str, str] = field(default_factory=dict)

    @property
    def validation_rmse(self) -> float:
        """The best trial's validation RMSE (NDCG for implicit feedback): what ``dmf run
        best.yaml`` reproduces."""
        return float(self.best.value)

    @property
    def value(self) -> float:
        """The best trial's score (:class:`Metric`)."""
        return float(self.best.value)


def tune(
    config: Config,
    store: Store | str | Path | None = None,
    client=None,
    address: str | None = None,
    scheduler_file: str | None = None,
    quiet: bool = False,
) -> TuneResult:
    """Search the settings of ``config.tune`` on ``store``'s validation split; write the trials'
    table and plot and the best config to ``tune.output``; return them.

    Parameters
    ----------
    config
        The config searched: every trial trains with it, its searched keys replaced.
    store
        An opened :class:`Store` or its path; default ``store.path`` of ``config`` (it must
        exist: ``dmf tune`` makes it first when it is missing, as ``dmf run`` does).
    client, address, scheduler_file
        The Dask cluster, as for :func:`dmf.train.loop.train`; without them the cluster of
        ``config.cluster`` is started here and closed at the end.
    quiet
        No line per trial or summary on stderr.
    """
    import optuna

    if not isinstance(store, Store):
        store = Store.open(config_location(config, store or config.store.path))
    check_store(store, config)
    out = config_location(config, config.tune.output)
    prepare_output(out)
    tc = config.tune
    study = optuna.create_study(
        study_name="dmf-tune",
        direction=Metric.of(config).direction,
        sampler=optuna.samplers.TPESampler(n_startup_trials=tc.startup_trials, seed=tc.seed),
        pruner=make_pruner(tc),
    )
    with maybe_connect(config, client, address, scheduler_file, quiet=quiet) as c:
        with hold_blocks(store, config, c, out):
            objective = Objective(store, config, c, out, quiet)
            # A trial that fails (a dmf error: its settings gave non-finite factors, a worker was
            # lost past its retries...) is recorded as failed; the search goes on.
            study.optimize(
                objective,
                n_trials=tc.trials,
                timeout=tc.timeout,
                n_jobs=tc.parallel,
                catch=(DmfError,),
            )
    trials = [trial_result(t, Metric.of(config)) for t in study.get_trials(deepcopy=False)]
    return write_results(config, store, out, trials, quiet)


def check_store(store: Store, config: Config) -> None:
    """Refuse a search that cannot be scored: no train ratings, or no validation split."""
    if store.n_train == 0:
        raise TrainingError(f"store {store.root} has no train ratings")
    if store.n_split("validation") == 0:
        raise ConfigError(
            f"dmf tune scores trials on the validation split, and the store at {store.root} has "
            "none: set split.validation (e.g. 0.05) and ingest again"
        )


def prepare_output(out: Location) -> None:
    """Empty ``out`` of an earlier search's results; refuse a directory holding anything else."""
    found = out.ls() if out.isdir() else []
    other = [name for name in found if name not in OURS and not name.startswith(".")]
    if other:
        raise ConfigError(
            f"tune.output: {out} holds {', '.join(other[:5])}, which dmf tune did not write: "
            "choose an empty or new directory"
        )
    for name in found:
        (out / name).remove()
    out.makedirs()


def make_pruner(tc: TuneConfig):
    """The Optuna pruner of ``tune.pruner``, judging trials from iteration ``tune.warmup`` on
    (Optuna's steps are dmf's iterations, from 1)."""
    import optuna

    if tc.pruner == "median":
        # Judged only against as many completed trials as reached the iteration: completed
        # trials stop early (patience), so late iterations are reached by the best few only,
        # and the median of one or two of them prunes all but the best.
        return optuna.pruners.MedianPruner(
            n_startup_trials=tc.startup_trials,
            n_warmup_steps=tc.warmup,
            n_min_trials=max(tc.startup_trials, 1),
        )
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=tc.warmup, max_resource=max(tc.iterations, tc.warmup)
        )
    return optuna.pruners.NopPruner()


def suggest(trial, tc: TuneConfig, implicit: bool = False, biases: bool = True) -> dict[str, Any]:
    """A trial's settings, drawn by Optuna from the search space of ``tc`` (``alpha`` under
    implicit feedback; ``reg_bias`` only for a model with biases)."""
    lo, hi = tc.rank
    params: dict[str, Any] = {"rank": trial.suggest_int("rank", lo, hi, log=lo >= 1)}
    params["reg"] = trial.suggest_float("reg", *tc.reg, log=True)
    if tc.reg_bias is not None and biases:
        params["reg_bias"] = trial.suggest_float("reg_bias", *tc.reg_bias, log=True)
    params["weighted_reg"] = trial.suggest_categorical("weighted_reg", list(tc.weighted_reg))
    if implicit and tc.alpha is not None:
        params["alpha"] = trial.suggest_float("alpha", *tc.alpha, log=True)
    return params


def with_settings(config: Config, model: dict[str, Any], train: dict[str, Any], output=None):
    """``config`` with some keys of its ``model``, ``train`` (and ``output``) sections replaced,
    validated again."""
    raw = config.to_dict()
    raw["model"].update(model)
    raw["train"].update(train)
    raw["output"].update(output or {})
    return Config.model_validate({**raw, "base_dir": config.base_dir})


def trial_config(config: Config, params: dict[str, Any], model_dir: Location) -> Config:
    """What a trial trains with: ``params``, up to ``tune.iterations`` iterations with early
    stopping on the exact best, no checkpoints, no plot, its own model directory."""
    tc = config.tune
    train = {
        "iterations": tc.iterations,
        "early_stopping": {"patience": tc.patience, "min_delta": 0.0},
        "checkpoint_every": 0,
    }
    output = {"model": model_dir.url, "overwrite": True, "plot": False}
    return with_settings(config, params, train, output)


def best_config(config: Config, params: dict[str, Any], iterations: int) -> Config:
    """The config of ``best.yaml``: ``config`` with the best trial's settings, its early stopping
    and its best iteration as ``train.iterations``; everything else (output, checkpoints, the
    cluster) as ``config`` has it."""
    tc = config.tune
    train = {
        "iterations": iterations,
        "early_stopping": {"patience": tc.patience, "min_delta": 0.0},
    }
    return with_settings(config, params, train)


@contextmanager
def hold_blocks(store: Store, config: Config, client, out: Location) -> Iterator[None]:
    """Check the largest rank searched fits the workers (:meth:`HalfSteps.plan`), and, when the
    trials will cache the rating blocks in worker memory, load them now and hold them until the
    search ends: every trial then uses this copy (same task keys), even when no other trial
    runs."""
    from dmf.train.halfstep import HalfSteps

    high = config.tune.rank[1]
    largest = with_settings(config, {"rank": high}, {})
    steps = HalfSteps(store, largest, client, out / TRIALS, progress_disabled=True)
    try:
        steps.plan()
    except TrainingError as exc:
        raise TrainingError(f"tune.rank: a trial of rank {high} would not fit: {exc}") from exc
    if steps.should_cache():
        steps.cache_blocks()
    try:
        yield
    finally:
        for futures in (steps.cached or {}).values():
            for f in futures:
                f.release()


class Objective:
    """One trial (called by Optuna, on one of its threads): train with the settings it draws,
    reporting each iteration's validation RMSE to the pruner; returns the best one."""

    def __init__(self, store: Store, config: Config, client, out: Location, quiet: bool):
        self.store = store
        self.config = config
        self.client = client
        self.out = out
        self.quiet = quiet
        self._lock = threading.Lock()

    def __call__(self, trial) -> float:
        import optuna

        from dmf.train.loop import train

        m = self.config.model
        params = suggest(trial, self.config.tune, m.implicit, m.biases)
        model_dir = self.out / TRIALS / f"{trial.number:05d}"
        cfg = trial_config(self.config, params, model_dir)
        t0 = time.perf_counter()

        metric = Metric.of(self.config)

        def report(rec: dict[str, Any]) -> None:
            it, value = rec["iteration"], rec[metric.key]
            trial.report(value, it)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric.label} {value:.4f} at iteration {it}")

        try:
            model = train(
                self.store, cfg, client=self.client, quiet=True, in_memory=False, callback=report
            )
        except optuna.TrialPruned as exc:
            model_dir.remove()  # the side versions of a run that saved no model
            self._say(f"trial {trial.number}: {describe(params)}: pruned, {exc}")
            raise
        except DmfError as exc:
            model_dir.remove()
            self._say(f"trial {trial.number}: {describe(params)}: failed: {exc}")
            raise
        meta = model.meta
        best_it, value = meta["best_iteration"], float(meta[f"best_{metric.key}"])
        trial.set_user_attr("best_iteration", int(best_it))
        trial.set_user_attr("model", model_dir.url)
        self._say(
            f"trial {trial.number}: {describe(params)}: {metric.label} {value:.4f} at "
            f"iteration {best_it} ({time.perf_counter() - t0:.1f} s)"
        )
        return value

    def _say(self, msg: str) -> None:
        if not self.quiet:
            with self._lock:
                sys.stderr.write(f"dmf tune: {msg}\n")
                sys.stderr.flush()


def describe(params: dict[str, Any]) -> str:
    """``rank 12, reg 0.0342, reg_bias 1.5, weighted_reg true``."""
    parts = []
    for k in SEARCHED:
        if k not in params:
            continue
        v = params[k]
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, float):
            v = f"{v:.3g}"
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def trial_result(t, metric: Metric | None = None) -> TrialResult:
    """A :class:`TrialResult` from Optuna's record of a trial (a ``FrozenTrial``)."""
    state = {"COMPLETE": "complete", "PRUNED": "pruned"}.get(t.state.name, "failed")
    done = state == "complete"
    return TrialResult(
        number=t.number,
        state=state,
        params=dict(t.params),
        curve=sorted((int(k), float(v)) for k, v in t.intermediate_values.items()),
        value=float(t.value) if done else None,
        best_iteration=t.user_attrs.get("best_iteration") if done else None,
        seconds=t.duration.total_seconds() if t.duration is not None else 0.0,
        model=t.user_attrs.get("model"),
        metric=(metric or Metric("validation_rmse", "", "minimize")).key,
    )


# -------------------------------------------------------------------------------------------
# The results
# -------------------------------------------------------------------------------------------
def write_results(
    config: Config, store: Store, out: Location, trials: list[TrialResult], quiet: bool
) -> TuneResult:
    """Write ``trials.csv``, ``trials.png``, ``best.yaml`` and ``tune.json``; return the
    result."""
    done = [t for t in trials if t.state == "complete"]
    if not done:
        raise TrainingError(
            f"dmf tune: none of the {len(trials)} trials finished (pruned or failed): raise "
            "tune.trials or tune.warmup, or set tune.pruner: none"
        )
    metric = Metric.of(config)
    best = min(done, key=lambda t: (metric.order(t.value), t.number))
    cfg = best_config(config, best.params, best.best_iteration)
    files = {
        "table": out / TABLE,
        "plot": out / PLOT,
        "best": out / BEST,
        "summary": out / SUMMARY,
    }
    write_atomic(files["table"], trials_csv(trials))
    write_atomic(files["plot"], plot_trials(trials, best, config.tune, metric))
    write_atomic(files["best"], best_yaml(cfg, best, len(trials), metric))
    write_atomic(files["summary"], json.dumps(summary(config, store, trials, best), indent=1))
    result = TuneResult(best, trials, cfg, out, {k: v.url for k, v in files.items()})
    if not quiet:
        sys.stderr.write(format_summary(result) + "\n")
    return result


def trials_csv(trials: list[TrialResult]) -> str:
    """The table of the trials, a row each (:meth:`TrialResult.row`), as CSV."""
    buf = io.StringIO()
    rows = [t.row() for t in trials]
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def best_yaml(cfg: Config, best: TrialResult, n_trials: int, metric: Metric | None = None) -> str:
    """``best.yaml``: the best config with every key and absolute paths, after a comment saying
    what it scored."""
    from dmf.cli.config import show_text

    label = (metric or Metric.of(cfg)).label
    head = (
        f"# dmf tune: the best of {n_trials} trials (trial {best.number}): {label} "
        f"{best.value!r} at iteration {best.best_iteration}.\n"
        f"# `dmf run` this file as it is to train that model again (same {label}).\n"
    )
    return head + show_text(cfg, f"dmf tune's trial {best.number}", absolute_paths=True)


def summary(
    config: Config, store: Store, trials: list[TrialResult], best: TrialResult
) -> dict[str, Any]:
    """``tune.json``: the search (space, sampler, pruner), the best trial, every trial with its
    validation RMSE per iteration."""
    return {
        "search": config.to_dict()["tune"],
        "sampler": {"name": "TPESampler", "seed": config.tune.seed},
        "store": str(store.root),
        "best": asdict(best),
        "trials": [asdict(t) for t in trials],
    }


def format_summary(result: TuneResult) -> str:
    """Lines for the terminal: the trials' outcome, the best, and where the results are."""
    states = [t.state for t in result.trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "failed"))
    b = result.best
    label = Metric.of(result.config).label
    lines = [
        f"dmf tune: {len(states)} trials ({counts}); best: trial {b.number}, "
        f"{describe(b.params)}, {b.best_iteration} iterations: {label} {b.value:.6f}",
        f"dmf tune: wrote {TABLE}, {PLOT}, {BEST} and {SUMMARY} to {result.output}; train the "
        f"best with: dmf run {result.files['best']}",
    ]
    if b.best_iteration == result.config.tune.iterations:
        lines.append(
            "dmf tune: the best trial was still improving at its last iteration: a larger "
            "tune.iterations may find better"
        )
    return "\n".join(lines)


def format_table(trials: list[TrialResult], metric: Metric | None = None) -> str:
    """The trials as an aligned text table, best first (pruned and failed ones last)."""
    metric = metric or Metric("validation_rmse", "validation RMSE", "minimize")
    order = sorted(
        trials,
        key=lambda t: (
            t.value is None,
            metric.order(t.value) if t.value is not None else math.inf,
            t.number,
        ),
    )
    alpha = any("alpha" in t.params for t in trials)
    lines = [
        f"{'trial':>5}  {'state':8}  {'rank':>4}  {'reg':>9}  {'reg_bias':>9}  {'ALS-WR':6}  "
        + (f"{'alpha':>8}  " if alpha else "")
        + f"{metric.short:>9}  {'at iter':>7}"
    ]
    for t in order:
        p = t.params
        rmse = t.value if t.value is not None else (t.curve[-1][1] if t.curve else math.nan)
        it = t.best_iteration if t.value is not None else (t.curve[-1][0] if t.curve else "")
        rb = p.get("reg_bias")
        lines.append(
            f"{t.number:>5}  {t.state:8}  {p.get('rank', ''):>4}  {p.get('reg', math.nan):>9.4g}  "
            f"{'' if rb is None else f'{rb:.4g}':>9}  {str(p.get('weighted_reg', '')).lower():6}  "
            + (f"{p.get('alpha', math.nan):>8.4g}  " if alpha else "")
            + f"{rmse:>9.5f}  {it:>7}"
        )
    return "\n".join(lines)


def plot_trials(
    trials: list[TrialResult], best: TrialResult, tc: TuneConfig, metric: Metric | None = None
) -> bytes:
    """``trials.png``: validation RMSE per iteration of every trial; pruned trials dashed grey
    (ending in a cross), the best trial thick, its best iteration starred; the title says what
    was searched. PNG bytes (matplotlib's object API with the Agg canvas: no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for t in trials:
        if not t.curve or t is best:
            continue
        its, vals = zip(*t.curve, strict=True)
        if t.state == "complete":
            ax.plot(its, vals, color="tab:blue", alpha=0.55, lw=1.2)
        else:
            ax.plot(its, vals, color="0.55", ls="--", lw=1)
            ax.plot(its[-1], vals[-1], marker="x", color="0.4", ms=6)
    its, vals = zip(*best.curve, strict=True)
    ax.plot(its, vals, color="tab:red", lw=2.6, marker="o", ms=3.5)
    ax.plot(best.best_iteration, best.value, marker="*", color="gold", mec="black", ms=18, zorder=5)
    ax.annotate(
        f"trial {best.number}: {best.value:.4f} at iteration {best.best_iteration}",
        (best.best_iteration, best.value),
        xytext=(-8, 14),
        textcoords="offset points",
        ha="right",
        fontsize=9,
        bbox={"fc": "white", "ec": "none", "alpha": 0.8},
    )
    metric = metric or Metric("validation_rmse", "validation RMSE", "minimize")
    _y_limits(ax, trials, best, metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric.label)
    ax.set_title(_title(trials, tc, metric), fontsize=9.5)
    ax.legend(
        handles=[
            Line2D([], [], color="tab:blue", alpha=0.55, lw=1.2, label="completed trial"),
            Line2D([], [], color="0.55", ls="--", marker="x", label="pruned trial (stopped)"),
            Line2D([], [], color="tab:red", lw=2.6, label=f"best trial ({best.number})"),
            Line2D(
                [], [], color="gold", mec="black", marker="*", ms=12, ls="", label="best iteration"
            ),
        ],
        fontsize=8.5,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _y_limits(ax, trials: list[TrialResult], best: TrialResult, metric: Metric) -> None:
    """Keep the interesting band in view: from just past the best to the 90th percentile of
    every value plotted, counted from the best (a few wild early iterations go off the plot)."""
    import numpy as np

    vals = np.array([metric.order(v) for t in trials for _, v in t.curve], dtype=float)
    top = float(np.quantile(vals, 0.9))
    b = metric.order(best.value)
    span = max(top - b, 1e-6)
    lo, hi = b - 0.08 * span, top + 0.08 * span
    ax.set_ylim(*((lo, hi) if metric.direction == "minimize" else (-hi, -lo)))


def _title(trials: list[TrialResult], tc: TuneConfig, metric: Metric) -> str:
    states = [t.state for t in trials]
    space = [f"rank {tc.rank[0]}-{tc.rank[1]}", f"reg {tc.reg[0]:g}-{tc.reg[1]:g} (log)"]
    if tc.reg_bias is not None:
        space.append(f"reg_bias {tc.reg_bias[0]:g}-{tc.reg_bias[1]:g} (log)")
    choices = "/".join(str(v).lower() for v in tc.weighted_reg)
    space += [f"weighted_reg {choices}", f"iterations 1-{tc.iterations}"]
    if any("alpha" in t.params for t in trials) and tc.alpha is not None:
        space.append(f"alpha {tc.alpha[0]:g}-{tc.alpha[1]:g} (log)")
    return (
        f"dmf tune: {metric.label} of {len(trials)} trials ({states.count('complete')} "
        f"completed, {states.count('pruned')} pruned; TPE seed {tc.seed}, {tc.pruner} pruner)\n"
        f"searched: {', '.join(space)}"
    )
