"""Out of core: a store larger than a worker's memory limit trains, streaming blocks from disk.

A block in memory costs ~8 bytes a rating per side (int32 column index, float32 rating, plus the
row pointer), so a store's in-memory size is ~16 bytes a train rating. A worker process starts at
~110 MB RSS and loading the compiled solver (numba, LLVM, SciPy) takes it to 230-300 MB (the
spread is file-backed pages of shared libraries, which RSS counts and which vary with the page
cache: 179 MB in one virtualenv, 226 MB in a fresh clone of it on the same machine); a worker
busy streaming blocks reached 321 MiB. A block of 150k ratings and the solver's working set
(under 1 MB) add little. So a worker with ``memory_limit`` 512 MiB (Dask pauses it at 80%, ~430
MB, and kills it at 95%) has room for one block at a time but not for the store's 40M ratings
(~640 MB in memory). That test is slow (building the store takes most of it); a fast variant
runs the same checks on a 1.5M-rating store under the same limit, not below the store's size.

A limit so tight that workers pause at 80% and never get below it again stalls Dask itself (seen
at 180 MiB with 100k-rating blocks, before the compiled solver), hence the margins. A block whose working set cannot fit at
all must end in a clear error, not a hang or a Dask exception.

The model out of core (slow tests): a user side several times a worker's memory_limit, kept
as block files while training, routed in pieces to the item half-step (``train.exchange``
partitioned), and read block by block by evaluate and recommend. ``dmf`` runs as child
processes against one cluster the test starts, so the driver's peak RSS is measured and the
scheduler can tell whether a worker restarted. The issue's crash case (3M users at rank 128 on
two 1200 MiB workers) trains to completion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_ratings

from dmf.config import load_config
from dmf.dist.cluster import BLAS_ENV
from dmf.store.layout import store_from_arrays
from dmf.train.loop import train

MiB = 2**20


def make_store(path, n_ratings, target_ratings):
    n_users, n_items = n_ratings // 100, n_ratings // 400
    u, i, r = random_ratings(n_users, n_items, n_ratings, seed=41)
    return store_from_arrays(
        path, u, i, r, n_users=n_users, n_items=n_items, target_ratings=target_ratings
    )


def in_memory_bytes(store) -> int:
    """Bytes of every block of both sides as RatingBlocks, from one block's bytes per rating."""
    b = store.read_block("user", 0)
    return int(b.nbytes / b.nnz * store.n_train * 2)


# Implicit feedback runs on the same engine: the same out-of-core checks apply.
IMPLICIT = {"feedback": "implicit", "alpha": 4.0}
IMPLICIT_CG = {**IMPLICIT, "solver": "cg"}


def make_config(model_dir, cache_blocks, iterations=2, feedback=None):
    feedback = dict(feedback or {})
    solver = feedback.pop("solver", "cholesky")
    return load_config(
        raw={
            "model": {"rank": 8, "reg": 0.1, "dtype": "float64", "seed": 4, **feedback},
            "train": {
                "iterations": iterations,
                "cache_blocks": cache_blocks,
                "progress": "off",
                "solver": solver,
            },
            "output": {"model": str(model_dir), "plot": False},
        }
    )


def removed_workers(dask_scheduler) -> int:
    """How many times a worker left the scheduler (a restart is a removal; run on the scheduler)."""
    return sum(
        1
        for _, msg in dask_scheduler.get_events("all")
        if isinstance(msg, dict) and msg.get("action") == "remove-worker"
    )


def check_trains_within_limit(store, memory_limit, tmp_path, feedback=None):
    """Train with blocks streamed from disk under ``memory_limit``: no worker may restart."""
    from distributed import Client, LocalCluster, get_task_stream

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=memory_limit,
            env=BLAS_ENV,
        ) as cluster,
        Client(cluster) as client,
    ):
        workers_before = client.run(os.getpid)
        with get_task_stream(client) as ts:
            model = train(
                store,
                make_config(tmp_path / "m", "never", feedback=feedback),
                client=client,
                quiet=True,
            )
        workers_after = client.run(os.getpid)
        removed = client.run_on_scheduler(removed_workers)
        limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    assert limits == [memory_limit, memory_limit]
    # Same worker processes at the same addresses, and the scheduler saw none leave.
    assert workers_after == workers_before
    assert removed == 0
    # Blocks were streamed: no load tasks, one solve task per block per half-iteration.
    keys = [str(t["key"]) for t in ts.data]
    assert not any(k.startswith("load-") for k in keys)
    n_blocks = store.n_blocks("user") + store.n_blocks("item")
    assert sum(k.startswith("solve-") for k in keys) == 2 * n_blocks
    assert len(model.history) == 2
    assert np.isfinite(model.user_factors).all() and np.isfinite(model.item_factors).all()
    return model


@pytest.mark.slow
def test_store_larger_than_worker_memory_trains(tmp_path):
    limit = 512 * MiB
    store = make_store(tmp_path / "store", 40_000_000, target_ratings=150_000)
    assert in_memory_bytes(store) > limit  # the point of the test
    check_trains_within_limit(store, limit, tmp_path)


@pytest.mark.parametrize("feedback", [None, IMPLICIT], ids=["explicit", "implicit"])
def test_tight_memory_limit_streams_blocks(tmp_path, feedback):
    """The same checks at a scale that runs in seconds (see the module docstring)."""
    store = make_store(tmp_path / "store", 1_500_000, target_ratings=100_000)
    assert store.n_blocks("user") >= 10 and store.n_blocks("item") >= 10
    # 512 MiB leaves room over a worker's baseline (400 MiB paused the workers for good in a
    # fresh CI virtualenv); the slow test above is the one below the store's size.
    model = check_trains_within_limit(store, 512 * MiB, tmp_path, feedback)
    if feedback:
        assert model.mu == 0.0 and "train_loss" in model.history[-1]


@pytest.mark.parametrize(
    "feedback", [None, IMPLICIT, IMPLICIT_CG], ids=["explicit", "implicit", "implicit-cg"]
)
def test_cached_and_streamed_blocks_give_identical_factors(client, tmp_path, feedback):
    store = make_store(tmp_path / "store", 60_000, target_ratings=8_000)
    streamed = train(
        store, make_config(tmp_path / "a", "never", 3, feedback), client=client, quiet=True
    )
    cached = train(
        store, make_config(tmp_path / "b", "always", 3, feedback), client=client, quiet=True
    )
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_array_equal(getattr(cached, k), getattr(streamed, k), err_msg=k)
    assert [h["objective"] for h in cached.history] == [h["objective"] for h in streamed.history]


def test_block_too_big_for_a_worker_is_a_clear_error(tmp_path):
    """A block whose solve does not fit in memory_limit would kill its worker each time Dask
    reran it: the trainer's memory plan refuses it before the first half-step, with a
    TrainingError naming the settings to change, not a Dask exception after minutes. Here
    200 MiB: a worker needs ~230-300 MB once the compiled solver is loaded, plus the block of
    1.5M ratings."""
    from distributed import Client, LocalCluster

    from dmf.errors import TrainingError

    u, i, r = random_ratings(15_000, 4_000, 1_500_000, seed=42)
    store = store_from_arrays(tmp_path / "store", u, i, r, n_blocks=1)
    raw = make_config(tmp_path / "m", "never", 1).to_dict()
    raw["model"]["rank"] = 32
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=None,
            memory_limit=200 * MiB,
            env=BLAS_ENV,
        ) as cluster,
        Client(cluster) as client,
    ):
        t0 = time.perf_counter()
        with pytest.raises(TrainingError, match="memory_limit") as err:
            train(store, load_config(raw=raw), client=client, quiet=True)
        assert time.perf_counter() - t0 < 30  # early: before any block is solved
    assert "blocks.target_ratings" in str(err.value) and "rank" in str(err.value)


# ---------------------------------------------------------------------------------------------
# A model out of core: the user side several times a worker's memory_limit
# ---------------------------------------------------------------------------------------------
# Rank 128 in float32 is 512 bytes of factors a user: 6.4M users make 3.05 GiB of user factors,
# 4x a worker's 768 MiB. Each user has 2 train ratings (the Woodbury solve, cheap), one in ten a
# test rating; 1,000 items. Blocks of ~50k ratings (25k users, 12.9 MB of a side version), 256
# a side: the memory plan broadcasts the items (0.5 MB) to the user half-step and routes the
# users to the item half-step. A worker starts at 231 MiB with the solver loaded.
#
# Measured (2 workers x 1 thread, quiet machine): 768 MiB workers, 4.5 min in all; workers
# peaked at 404-419 MiB in training and 482 MiB in recommend; drivers at 136-471 MiB. 512 MiB
# workers (4.3M users, 2.05 GiB of factors, the same blocks): 2.5 min; workers at 386-402 MiB in
# training, 457-468 MiB in recommend (pausing at 80% and resuming; 455 MiB drivers). This run
# once hung, both workers paused for good: the route-out and solve tasks carried O(blocks^2)
# routing records, and solutions were held three times; see dmf.train.exchange.
OOC_ITEMS = 1_000
OOC_RANK = 128
OOC_TARGET_RATINGS = 50_000


def two_ratings_each(n_users, n_items, seed, test_every=10):
    """Every user rates 2 distinct items (train); every ``test_every``-th user a third (test).
    Ratings are mu + user bias + item bias + noise, rounded to half stars in [1, 5]."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, n_items, n_users)
    stride = rng.integers(1, n_items // 3, n_users)
    items = (base[:, None] + stride[:, None] * np.arange(3)) % n_items  # 3 distinct items a user
    b = rng.normal(0, 0.5, n_users)
    c = rng.normal(0, 0.5, n_items)

    def rate(u, i):
        r = 3.5 + b[u] + c[i] + rng.normal(0, 0.5, len(u))
        return (np.clip(np.round(2 * r) / 2, 1, 5)).astype(np.float32)

    users = np.arange(n_users, dtype=np.int64)
    tu = np.repeat(users, 2)
    ti = items[:, :2].reshape(-1).astype(np.int64)
    hu = users[::test_every]
    hi = items[::test_every, 2].astype(np.int64)
    return (tu, ti, rate(tu, ti)), (hu, hi, rate(hu, hi))


class PeakRSS(threading.Thread):
    """Samples the RSS of some processes every ``interval`` seconds: the peak of each process
    in each phase (named by :meth:`phase`)."""

    def __init__(self, pids, interval=0.1):
        import psutil

        super().__init__(daemon=True)
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.peaks: dict[str, dict[int, int]] = {}
        self.current = self.peaks.setdefault("start", dict.fromkeys(pids, 0))
        self.interval = interval
        self.stop = threading.Event()

    def phase(self, name: str) -> None:
        self.current = self.peaks.setdefault(name, dict.fromkeys(self.procs, 0))

    def peak(self) -> list[int]:
        """Each process's peak over every phase."""
        return [max(p[pid] for p in self.peaks.values()) for pid in self.procs]

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            peaks = self.current
            for pid, proc in self.procs.items():
                try:
                    peaks[pid] = max(peaks[pid], proc.memory_info().rss)
                except Exception:  # noqa: BLE001 - a process gone: its peak so far stays
                    continue


def peak_rss(pid: int) -> int:
    """Peak RSS of a running process so far (VmHWM, bytes; 0 once it has exited).

    Not getrusage's ru_maxrss, from wait4 or RUSAGE_CHILDREN: on Linux a child's ru_maxrss
    starts from its forking parent's, here this test process, which holds the ratings arrays
    (a dmf driver of 277 MB peak measured 1.64 GB that way). VmHWM belongs to the image the child
    exec'd. Polled, a peak in the last poll interval before exit is missed."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_states(dask_scheduler) -> list[tuple[str, int, int]]:
    """Each worker's status, process memory and memory_limit (run on the scheduler)."""
    return [
        (ws.status.name, ws.memory.process, ws.memory_limit)
        for ws in dask_scheduler.workers.values()
    ]


class PausedTooLong:
    """``stalled`` for :func:`run_dmf`: every worker paused for memory for ``patience`` seconds.
    A paused worker starts no task; when what fills it is unmanaged memory (nothing Dask could
    spill) and no task runs to release any, it stays paused, and the run waits for ever."""

    def __init__(self, client, patience: float = 90.0):
        self.client, self.patience = client, patience
        self.since: float | None = None

    def __call__(self) -> str:
        states = self.client.run_on_scheduler(worker_states)
        if not states or any(status != "paused" for status, _, _ in states):
            self.since = None
            return ""
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since < self.patience:
            return ""
        mem = ", ".join(f"{p / MiB:.0f} of {lim / MiB:.0f} MiB" for _, p, lim in states)
        return f"every worker paused for memory for {self.patience:.0f} s ({mem})"


def run_dmf(
    args, log: Path, cwd: Path, kill_when=None, timeout=1200.0, sampler=None, stalled=None
) -> dict:
    """Run ``python -m dmf ARGS`` as a child process; SIGKILL it as soon as ``kill_when()`` is
    true (polled every 0.1 s). Returns its exit code, its peak RSS (:func:`peak_rss`, polled
    every 0.1 s) and its wall time. ``stalled()``, polled every second, returns why the run
    can no longer finish (or ''): then the child is killed and the test fails at once, rather
    than at its timeout."""
    env = {**os.environ, **BLAS_ENV}
    if sampler is not None:
        sampler.phase(log.stem)
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dmf", *map(str, args)],
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        killed = False
        last_check = t0
        peak = 0
        status = None
        try:
            while status is None:
                peak = max(peak, peak_rss(proc.pid))
                pid, wstatus = os.waitpid(proc.pid, os.WNOHANG)
                if pid:
                    status = wstatus
                    break
                if kill_when is not None and not killed and kill_when():
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"dmf {args[0]} ran over {timeout} s; see {log}")
                if stalled is not None and time.monotonic() - last_check >= 1:
                    last_check = time.monotonic()
                    why = stalled()
                    if why:
                        raise AssertionError(f"dmf {args[0]} stalled: {why}; see {log}")
                time.sleep(0.1)
        finally:
            if status is None:  # given up on: kill it and reap it
                os.kill(proc.pid, signal.SIGKILL)
                os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "killed": killed,
        "peak_rss": peak,
        "seconds": time.monotonic() - t0,
        "log": log.read_text(errors="replace"),
    }


def write_train_config(path: Path, store: Path, model: Path, iterations: int) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "store": {"path": str(store)},
                "model": {"rank": OOC_RANK, "reg": 0.1, "dtype": "float32", "seed": 3},
                # Blocks streamed from disk: with cache_blocks auto the cached blocks (both sides,
                # ~90 MB a worker here) come on top of what the memory plan counts, and a worker
                # paused at 80% of its limit with a task queued stalls the run for good.
                "train": {
                    "iterations": iterations,
                    "checkpoint_every": 1,
                    "cache_blocks": "never",
                    "progress": "off",
                },
                "output": {"model": str(model), "plot": False},
            }
        )
    )
    return path


def assert_models_identical(a_path: Path, b_path: Path) -> None:
    """Two models with on-disk user sides equal to the last bit, block by block (never a
    whole side in this process), and their histories' objectives."""
    from dmf.model.model import load
    from dmf.model.side import read_part

    a, b = load(a_path, in_memory=False), load(b_path, in_memory=False)
    for name in ("user", "item"):
        sa, sb = a.side(name), b.side(name)
        assert sa.n_blocks == sb.n_blocks
        for ref_a, ref_b in zip(sa.parts, sb.parts, strict=True):
            pa_, pb_ = read_part(ref_a), read_part(ref_b)
            assert pa_.ids.equals(pb_.ids)
            np.testing.assert_array_equal(pa_.factors, pb_.factors)
            np.testing.assert_array_equal(pa_.bias, pb_.bias)
    for key in ("objective", "objective_after_user_step", "train_rmse"):
        assert [h[key] for h in a.history] == [h[key] for h in b.history], key


def check_model_out_of_core(tmp_path, n_users, n_items, limit, target_ratings) -> dict:
    """Train with ``dmf train`` (a child process, its peak RSS measured), SIGKILL it after the
    first checkpoint, resume; train again uninterrupted; ``dmf evaluate``; ``dmf recommend``
    for everyone. One cluster of two workers under ``limit`` throughout, none restarted. The
    resumed model equals the uninterrupted one to the last bit. Returns the measurements."""
    from distributed import Client, LocalCluster

    from dmf.model.model import load

    times: dict[str, float] = {}
    t0 = time.monotonic()
    (tu, ti, tr), test = two_ratings_each(n_users, n_items, seed=5)
    store_path = tmp_path / "store"
    store = store_from_arrays(
        store_path,
        tu,
        ti,
        tr,
        n_users=n_users,
        n_items=n_items,
        target_ratings=target_ratings,
        held_out={"test": test},
    )
    times["store"] = time.monotonic() - t0
    model_a, model_b = tmp_path / "model-a", tmp_path / "model-b"
    cfg_a = write_train_config(tmp_path / "a.yaml", store_path, model_a, iterations=2)
    cfg_b = write_train_config(tmp_path / "b.yaml", store_path, model_b, iterations=2)
    runs: dict[str, dict] = {}
    try:
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=limit,
                env=BLAS_ENV,
            ) as cluster,
            Client(cluster) as client,
        ):
            addr = cluster.scheduler_address
            workers_before = client.run(os.getpid)
            sampler = PeakRSS(list(workers_before.values()))
            sampler.start()

            def dmf(name, *args, **kwargs):
                runs[name] = run_dmf(
                    args,
                    tmp_path / f"{name}.log",
                    tmp_path,
                    sampler=sampler,
                    stalled=PausedTooLong(client),
                    **kwargs,
                )
                return runs[name]

            first_checkpoint = model_a / "checkpoints" / "iter-00001" / "state.json"
            killed = dmf(
                "train-killed", "train", cfg_a, "--address", addr, kill_when=first_checkpoint.exists
            )
            assert killed["killed"] and killed["returncode"] == -signal.SIGKILL, killed["log"]
            assert not (model_a / "model.json").exists()  # killed before the end
            dmf("train-resume", "train", cfg_a, "--address", addr, "--resume")
            dmf("train-uninterrupted", "train", cfg_b, "--address", addr)
            evaluation = tmp_path / "evaluation.json"
            dmf("evaluate", "evaluate", model_a, "--address", addr, "--json", evaluation)
            recs = tmp_path / "recs"
            dmf("recommend", "recommend", model_a, "-n", 3, "--out", recs, "--address", addr)
            sampler.stop.set()
            sampler.join()
            workers_after = client.run(os.getpid)
            removed = client.run_on_scheduler(removed_workers)
            limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
        for name, run in runs.items():
            if name != "train-killed":
                assert run["returncode"] == 0, f"dmf {name} failed:\n{run['log'][-5000:]}"
        report = {
            "user_factor_bytes": n_users * OOC_RANK * 4,
            "memory_limit": limit,
            "driver_peak_rss": {k: v["peak_rss"] for k, v in runs.items()},
            "worker_peak_rss": sampler.peak(),
            "worker_peak_rss_by_step": {k: list(v.values()) for k, v in sampler.peaks.items()},
            "seconds": {**times, **{k: v["seconds"] for k, v in runs.items()}},
            "blocks": [store.n_blocks("user"), store.n_blocks("item")],
        }
        print(json.dumps(report, indent=1))
        # One cluster throughout: the same worker processes, none removed, none restarted.
        assert limits == [limit, limit]
        assert workers_after == workers_before
        assert removed == 0
        # The memory plan: items broadcast to the user half-step, users routed to the item one.
        plan_log = runs["train-resume"]["log"]
        assert "users given items: broadcast" in plan_log, plan_log[-3000:]
        assert "items given users: partitioned" in plan_log, plan_log[-3000:]
        assert "resuming after iteration 1" in plan_log
        # The resumed run continues the killed one: the same model as a run never killed.
        model = load(model_a)
        report["users_in_memory"] = model.users.in_memory
        assert [h["iteration"] for h in model.history] == [1, 2]
        assert_models_identical(model_a, model_b)
        # Evaluated every test rating, and ranked the users with a relevant one.
        metrics = json.loads(evaluation.read_text())
        assert metrics["n"] == len(test[0])
        assert np.isfinite(metrics["rmse"]) and metrics["n_users_ranked"] > 0
        # Three recommendations for every user, none an item the user rated in train.
        import pyarrow.dataset as ds

        recs_ds = ds.dataset(recs, format="parquet")
        assert recs_ds.count_rows() == 3 * n_users
        first = ds.dataset(sorted(recs.glob("part-*.parquet"))[0], format="parquet").to_table()
        u = first.column("user").to_numpy()
        i = first.column("item").to_numpy()
        seen = set((tu * n_items + ti).tolist()[: 2 * (int(u.max()) + 1)])
        assert not seen & set((u * n_items + i).tolist())
        return report
    finally:
        for path in (store_path, model_a, model_b, tmp_path / "recs"):
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    ("n_users", "limit"),
    [
        pytest.param(6_400_000, 768 * MiB, id="768MiB"),
        pytest.param(4_300_000, 512 * MiB, id="512MiB"),
    ],
)
def test_model_out_of_core(tmp_path, n_users, limit):
    """The issue's acceptance test: user factors at least 4x larger than each worker's
    memory_limit, and more than twice the driver's peak RSS; train, resume after SIGKILL,
    evaluate and recommend for everyone, with no worker restarted
    (:func:`check_model_out_of_core`)."""
    report = check_model_out_of_core(tmp_path, n_users, OOC_ITEMS, limit, OOC_TARGET_RATINGS)
    assert not report["users_in_memory"]  # dmf.load keeps the user side on disk
    assert report["user_factor_bytes"] >= 4 * limit
    assert report["user_factor_bytes"] > 2 * max(report["driver_peak_rss"].values())


# ---------------------------------------------------------------------------------------------
# The crash case
# ---------------------------------------------------------------------------------------------
CRASH_USERS = 3_000_000
CRASH_ITEMS = 2_000
CRASH_RATINGS = 9_000_000
CRASH_LIMIT = 1200 * MiB
# Ingested with the default blocks (1M ratings: 9 a side, ~317k users of rank 128 each).
# Measured: synth 2 s, ingest 2 s, train 43 s; workers peaked at 825-862 MiB of their 1200
# MiB, the driver at 238 MiB.


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_three_million_users_at_rank_128_on_two_small_workers(tmp_path):
    """The issue's crash case: 3M users, 2,000 items, 9M ratings (``dmf.data.synth`` then
    ``ingest``, no split), rank 128, two workers of 1200 MiB. The user side (1.5 GB) once went
    whole to every worker, which died (CommClosedError); now the item half-step routes it in
    pieces, and ``dmf train`` runs to completion with no worker restarted."""
    import yaml
    from distributed import Client, LocalCluster

    from dmf.data.ingest import ingest
    from dmf.data.synth import synth
    from dmf.model.model import load

    raw = {
        "synth": {
            "enabled": True,
            "path": str(tmp_path / "synth"),
            "n_users": CRASH_USERS,
            "n_items": CRASH_ITEMS,
            "n_ratings": CRASH_RATINGS,
            "rank": 8,
            "user_skew": 0.0,
            "seed": 7,
        },
        "split": {"method": "none"},
        "store": {"path": str(tmp_path / "store")},
        "model": {"rank": 128},
        "train": {"iterations": 2, "progress": "off"},
        "output": {"model": str(tmp_path / "model"), "plot": False},
    }
    config_path = tmp_path / "crash.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path)
    times = {}
    try:
        t0 = time.monotonic()
        synth(cfg.synth, tmp_path / "synth", progress=False)
        times["synth"] = time.monotonic() - t0
        t0 = time.monotonic()
        store = ingest(cfg, progress=False)
        times["ingest"] = time.monotonic() - t0
        assert store.n_train == CRASH_RATINGS
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=CRASH_LIMIT,
                env=BLAS_ENV,
            ) as cluster,
            Client(cluster) as client,
        ):
            workers_before = client.run(os.getpid)
            sampler = PeakRSS(list(workers_before.values()))
            sampler.start()
            run = run_dmf(
                ["train", config_path, "--address", cluster.scheduler_address],
                tmp_path / "train.log",
                tmp_path,
                sampler=sampler,
                stalled=PausedTooLong(client),
            )
            sampler.stop.set()
            sampler.join()
            workers_after = client.run(os.getpid)
            removed = client.run_on_scheduler(removed_workers)
        times["train"] = run["seconds"]
        model = load(tmp_path / "model", in_memory=False)
        report = {
            "users": store.n_users,
            "items": store.n_items,
            "ratings": store.n_train,
            "blocks": [store.n_blocks("user"), store.n_blocks("item")],
            "user_side_bytes": model.users.nbytes,
            "memory_limit": CRASH_LIMIT,
            "driver_peak_rss": run["peak_rss"],
            "worker_peak_rss": sampler.peak(),
            "seconds": times,
        }
        print(json.dumps(report, indent=1))
        assert run["returncode"] == 0, run["log"][-5000:]
        assert "CommClosedError" not in run["log"]
        assert "items given users: partitioned" in run["log"], run["log"][-3000:]
        assert workers_after == workers_before and removed == 0
        assert [h["iteration"] for h in model.history] == [1, 2]
        assert all(np.isfinite(h["objective"]) for h in model.history)
        assert model.users.nbytes > CRASH_LIMIT  # a side no worker could hold whole
    finally:
        for name in ("synth", "store", "model"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
