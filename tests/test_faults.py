"""Faults: worker processes killed (SIGKILL) in the middle of a half-iteration.

Dask reruns the lost block tasks elsewhere (or on the restarted worker); the trainer broadcasts the
fixed side again if every copy of it died. With ``train.exchange: partitioned``, an exchange
task lost with its worker is rerun too, and writes its piece file again. Either way training
completes, nothing like a CancelledError reaches the user, and the model equals a run without
the fault.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import random_ratings
from distributed.diagnostics.plugin import WorkerPlugin

from dmf.config import load_config
from dmf.dist.cluster import BLAS_ENV
from dmf.store.layout import store_from_arrays
from dmf.train.loop import train

ITERATIONS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # Rank 48 and 12 blocks a side: a solve task takes ~0.1 s, long enough to be hit mid-task.
    u, i, r = random_ratings(3000, 1500, 300_000, seed=11)
    return store_from_arrays(tmp_path_factory.mktemp("faults") / "store", u, i, r, n_blocks=12)


def make_config(store, model_dir, cache_blocks="never", iterations=ITERATIONS, exchange="auto"):
    return load_config(
        raw={
            "model": {"rank": 48, "reg": 0.05, "dtype": "float64", "seed": 1},
            "train": {
                "iterations": iterations,
                "cache_blocks": cache_blocks,
                "progress": "off",
                "exchange": exchange,
            },
            "output": {"model": str(model_dir), "plot": False},
        }
    )


def local_cluster(n_workers):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit="2GiB",
        env=BLAS_ENV,
    )
    return cluster, Client(cluster)


def executing_keys(dask_worker) -> list[str]:
    """Keys of the tasks running right now on this worker (run on the worker)."""
    return [str(ts.key) for ts in dask_worker.state.executing]


def broadcast_holders(dask_scheduler) -> list[str]:
    """Workers holding a copy of the broadcast fixed side, assembled by an ``assemble-`` task
    (run on the scheduler)."""
    return sorted(
        {
            ws.address
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith("assemble-")
            for ws in ts.who_has or ()
        }
    )


class Killer(threading.Thread):
    """Waits until a ``prefix`` task is executing (and ``min_done`` of them have finished), then
    SIGKILLs worker processes.

    ``which`` picks the victims: the worker running the task, or every worker holding the
    broadcast data.
    """

    def __init__(self, client, prefix: str, which: str, min_done: int = 0):
        super().__init__(daemon=True)
        self.client, self.prefix, self.which, self.min_done = client, prefix, which, min_done
        self.pids = client.run(os.getpid)
        self.killed: list[str] = []
        self.hit_keys: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 60
            while not self.stop.is_set() and time.monotonic() < deadline:
                # Cheap scheduler-side check first, then ask the workers what they run.
                queued = self.client.processing()
                if not any(str(k).startswith(self.prefix) for ks in queued.values() for k in ks):
                    time.sleep(0.02)
                    continue
                if self.min_done:
                    stream = self.client.get_task_stream()
                    if sum(str(t["key"]).startswith(self.prefix) for t in stream) < self.min_done:
                        time.sleep(0.005)
                        continue
                running = self.client.run(executing_keys)
                busy = {
                    w: [k for k in keys if k.startswith(self.prefix)] for w, keys in running.items()
                }
                busy = {w: keys for w, keys in busy.items() if keys}
                if busy:
                    worker = sorted(busy)[0]
                    if self.which == "busy":
                        victims = [worker]
                    else:
                        victims = self.client.run_on_scheduler(broadcast_holders)
                    self.hit_keys = busy[worker]
                    for w in victims:
                        os.kill(self.pids[w], signal.SIGKILL)
                    self.killed = victims
                    return
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def run_with_kill(client, store, cfg, prefix, which, min_done=0):
    killer = Killer(client, prefix, which, min_done)
    killer.start()
    try:
        model = train(store, cfg, client=client)
    finally:
        killer.stop.set()
        killer.join(timeout=30)
    assert killer.error is None, killer.error
    assert killer.killed, f"no {prefix} task was seen executing: the fault was never injected"
    return model, killer


def assert_same_model(a, b):
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        [h["objective"] for h in b.history], [h["objective"] for h in a.history], rtol=1e-10
    )


def assert_identical_model(a, b):
    """Bit for bit: factors, biases, and every iteration's objectives and train RMSE."""
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_array_equal(getattr(b, k), getattr(a, k), err_msg=k)
    for key in ("objective", "objective_after_user_step", "train_rmse"):
        assert [h[key] for h in b.history] == [h[key] for h in a.history], key


class KillWhileRunning(WorkerPlugin):
    """SIGKILLs its own worker process while a task whose key starts with ``prefix`` runs: the
    first time a worker that has already finished ``min_done`` such tasks (their results die
    with it) starts another. Once per cluster: the worker that fires first claims ``flag`` by
    creating it, and writes there its pid and the key it was running; a restarted worker gets
    the plugin again and finds the flag taken.

    For tasks too short (a few ms) for :class:`Killer` to see them running from the client: the
    worker kills itself from its own event loop, ``delay`` seconds after the task started."""

    name = "kill-while-running"

    def __init__(self, prefix: str, flag: str, min_done: int = 1, delay: float = 0.001):
        self.prefix, self.flag, self.min_done, self.delay = prefix, flag, min_done, delay
        self.done = 0

    def setup(self, worker) -> None:
        self.worker = worker
        self.done = 0

    def transition(self, key, start, finish, **kwargs) -> None:
        k = str(key)
        if not k.startswith(self.prefix):
            return
        if start == "executing" and finish == "memory":
            self.done += 1
        elif finish == "executing" and self.done >= self.min_done:
            try:
                fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            info = {"pid": os.getpid(), "key": k, "done": self.done, "address": self.worker.address}
            os.write(fd, json.dumps(info).encode())
            os.close(fd)
            threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()


def driver_output(capsys, caplog) -> str:
    """What this process (the driver) printed or logged, tracebacks included.

    Not the file descriptors: worker processes (of this test's cluster and of other tests'
    clusters still alive in the session) share them, and a dying worker's peers may log
    tracebacks of their own (a heartbeat to a busy scheduler, a fetch from a dead peer)."""
    fmt = logging.Formatter()
    logged = [
        r.getMessage() + ("\n" + fmt.formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    ]
    return capsys.readouterr().err + "\n".join(logged)


def test_worker_killed_mid_half_iteration(store, tmp_path, capsys, caplog):
    cluster, client = local_cluster(3)
    with cluster, client, caplog.at_level(logging.WARNING):
        reference = train(store, make_config(store, tmp_path / "ref"), client=client, quiet=True)
        before = set(client.run(os.getpid).values())
        model, killer = run_with_kill(
            client, store, make_config(store, tmp_path / "m"), "solve-items-2-", "busy"
        )
        after = set(client.run(os.getpid).values())
    assert len(killer.killed) == 1
    assert killer.pids[killer.killed[0]] not in after  # that process really died
    assert len(before - after) == 1
    assert_same_model(reference, model)
    assert [h["iteration"] for h in model.history] == list(range(1, ITERATIONS + 1))
    assert "CancelledError" not in driver_output(capsys, caplog)


def test_broadcast_lost_with_its_workers(store, tmp_path, capsys, caplog):
    """Every worker holding the broadcast fixed side dies (cached blocks die with them).

    The fixed side reaches the workers as the result of a task that assembles it from its block
    files, so Dask recomputes it on a surviving or restarted worker; blocks already solved are
    files and are not solved again. The model is the same.
    """
    from distributed import get_task_stream

    n_blocks = store.n_blocks("user")
    cluster, client = local_cluster(2)
    with cluster, client, caplog.at_level(logging.WARNING):
        reference = train(store, make_config(store, tmp_path / "ref"), client=client, quiet=True)
        with get_task_stream(client) as ts:
            model, killer = run_with_kill(
                client,
                store,
                make_config(store, tmp_path / "m", cache_blocks="always"),
                "solve-users-2-",
                "holders",
                min_done=n_blocks // 3,
            )
    assert killer.killed
    # train() returned, so nothing was raised; nor did the driver print or log a cancellation.
    assert "CancelledError" not in driver_output(capsys, caplog)
    assert_same_model(reference, model)
    keys = [str(t["key"]) for t in ts.data]
    # The lost fixed side (the items of iteration 1) was assembled again...
    assert sum(k.startswith("assemble-items-1-") for k in keys) >= 2, keys
    # ...and the blocks solved before the loss were kept: not every block was solved twice.
    solved = [k.split("-")[3] for k in keys if k.startswith("solve-users-2-")]
    assert set(solved) == {f"{b:05d}" for b in range(n_blocks)}
    assert len(solved) < 2 * n_blocks, sorted(solved)


@pytest.mark.slow
def test_workers_killed_again_and_again(store, tmp_path):
    """A random worker is killed about every second for the whole run: same model."""
    import random

    cluster, client = local_cluster(3)
    with cluster, client:
        # 40 iterations: long enough (several seconds even with the compiled solver) for the
        # chaos thread to kill workers at least three times.
        cfg = make_config(store, tmp_path / "ref", iterations=40)
        reference = train(store, cfg, client=client, quiet=True)
        stop, kills = threading.Event(), []

        def chaos():
            rnd = random.Random(0)
            while not stop.wait(rnd.uniform(0.6, 1.2)):
                try:
                    pids = client.run(os.getpid)
                    if len(pids) < 3:  # one still restarting: never leave the cluster empty
                        continue
                    victim = rnd.choice(sorted(pids))
                    os.kill(pids[victim], signal.SIGKILL)
                    kills.append(victim)
                except Exception:  # noqa: BLE001 - a worker between death and restart: next time
                    continue

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        try:
            model = train(
                store, make_config(store, tmp_path / "m", iterations=40), client=client, quiet=True
            )
        finally:
            stop.set()
            thread.join(timeout=30)
    assert len(kills) >= 3, kills
    assert_same_model(reference, model)


@pytest.fixture(scope="module")
def exchange_references(store, client, tmp_path_factory):
    """Uninterrupted runs of both exchange modes (on the session's cluster): the models a run
    with a fault must equal to the last bit."""
    out = tmp_path_factory.mktemp("exchange-references")
    return {
        ex: train(store, make_config(store, out / ex, exchange=ex), client=client, quiet=True)
        for ex in ("broadcast", "partitioned")
    }


def check_partitioned_run(keys: list[str], model, exchange_references) -> None:
    """The run routed its fixed sides (no broadcast) and gave the uninterrupted models."""
    assert any(k.startswith("route-in-") for k in keys)
    assert any(k.startswith("exchange-users-2-") for k in keys)
    assert not any(k.startswith("assemble-") for k in keys)
    assert [h["iteration"] for h in model.history] == list(range(1, ITERATIONS + 1))
    assert_identical_model(exchange_references["partitioned"], model)
    assert_identical_model(exchange_references["broadcast"], model)


def test_worker_killed_mid_partitioned_solve(store, exchange_references, tmp_path, capsys, caplog):
    """train.exchange partitioned: a worker dies while it solves an item block of iteration 2.

    Its solve task runs again on a live worker. It also held the results of the exchange tasks
    it ran (each names its piece file): those that a pending solve task still needs and no
    other worker holds are rerun, and write the same bytes again. The model equals the
    uninterrupted runs, partitioned and broadcast, to the last bit."""
    from distributed import get_task_stream

    cluster, client = local_cluster(3)
    with cluster, client, caplog.at_level(logging.WARNING):
        before = set(client.run(os.getpid).values())
        with get_task_stream(client) as ts:
            model, killer = run_with_kill(
                client,
                store,
                make_config(store, tmp_path / "m", exchange="partitioned"),
                "solve-items-2-",
                "busy",
            )
        after = set(client.run(os.getpid).values())
    assert len(killer.killed) == 1 and killer.hit_keys
    assert killer.pids[killer.killed[0]] not in after  # that process really died
    assert len(before - after) == 1
    keys = [str(t["key"]) for t in ts.data]
    # The task the dead worker was running was solved again, by a live worker.
    assert set(killer.hit_keys) <= set(keys)
    check_partitioned_run(keys, model, exchange_references)
    assert "CancelledError" not in driver_output(capsys, caplog)


def test_worker_killed_mid_exchange(store, exchange_references, tmp_path, capsys, caplog):
    """train.exchange partitioned: a worker dies 1 ms into an exchange task of iteration 2
    (users to item blocks: it reads a user block and writes its piece file), after it finished
    at least one other; that task and the results of those it finished are lost with it.
    Exchange tasks take 5-10 ms, too short to be caught running from the client, so the worker
    kills itself (:class:`KillWhileRunning`). Same model as the uninterrupted runs, to the last
    bit."""
    from distributed import get_task_stream

    flag = tmp_path / "killed.json"
    cluster, client = local_cluster(3)
    with cluster, client, caplog.at_level(logging.WARNING):
        before = client.run(os.getpid)
        client.register_plugin(KillWhileRunning("exchange-users-2-", str(flag)))
        with get_task_stream(client) as ts:
            model = train(
                store,
                make_config(store, tmp_path / "m", exchange="partitioned"),
                client=client,
                quiet=True,
            )
        after = set(client.run(os.getpid).values())
    assert flag.exists(), "no exchange-users-2- task ran on a worker that had run one before"
    killed = json.loads(flag.read_text())
    assert killed["key"].startswith("exchange-users-2-") and killed["done"] >= 1
    assert before[killed["address"]] == killed["pid"]  # one of the cluster's first workers...
    assert killed["pid"] not in after  # ...and it really died
    assert len(set(before.values()) - after) == 1
    keys = [str(t["key"]) for t in ts.data]
    assert killed["key"] in keys  # the exchange task it was running ran again elsewhere
    check_partitioned_run(keys, model, exchange_references)
    assert "CancelledError" not in driver_output(capsys, caplog)


# ---------------------------------------------------------------------------------------------
# Workers paused for memory: a warning, then a clear error instead of a hang
# ---------------------------------------------------------------------------------------------
def _hold_memory(target: int, dask_worker=None) -> int:
    """On a worker: allocate (and touch) what takes its RSS to ``target`` bytes, held in a
    global the way leaked unmanaged memory is. Returns the RSS before."""
    import psutil

    rss = psutil.Process().memory_info().rss
    dask_worker._dmf_test_ballast = np.ones(max(target - rss, 0) // 8)
    return rss


def _release_memory(dask_worker=None) -> None:
    dask_worker._dmf_test_ballast = None


def _slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def test_stalled_gather_warns_then_fails_clearly_when_every_worker_is_paused(caplog):
    """A worker past 80% of its memory_limit with nothing to spill is paused by Dask and runs
    nothing: dmf's watched gather warns once no task finished for ``stall_seconds``, and when
    every worker stays paused for two such periods raises a ClusterError naming what was
    running and cluster.memory_limit, rather than wait forever. Once the memory is freed, the
    worker resumes and the same task runs."""
    from distributed import Client, LocalCluster

    from dmf.dist.tasks import gather_watched
    from dmf.errors import ClusterError

    limit = 1 << 30
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=limit,
            env=BLAS_ENV,
        ) as cluster,
        Client(cluster) as client,
        caplog.at_level(logging.WARNING, logger="dmf"),
    ):
        # Not paused: a slow task draws a warning, and its result arrives.
        fut = client.submit(_slow_square, 7, 2.0, pure=False)
        assert gather_watched(client, [fut], "a slow task", 0.5) == [49]
        assert "nothing of a slow task finished in the last 0.5 s" in caplog.text
        assert "0 of 1 workers are paused" in caplog.text
        # Between Dask's pause (80%) and terminate (95%) thresholds.
        client.run(_hold_memory, int(0.87 * limit))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            statuses = [w["status"] for w in client.scheduler_info()["workers"].values()]
            if statuses == ["paused"]:
                break
            time.sleep(0.1)
        assert statuses == ["paused"]
        fut = client.submit(_slow_square, 3, 0.0, pure=False)
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as err:
            gather_watched(client, [fut], "the user half-step of iteration 2", 0.5)
        assert time.monotonic() - t0 < 10
        msg = str(err.value)
        assert "all 1 workers stayed paused for memory" in msg
        assert "the user half-step of iteration 2" in msg and "cluster.memory_limit" in msg
        assert "1 of 1 workers are paused" in caplog.text
        client.run(_release_memory)
        assert fut.result(timeout=30) == 9
