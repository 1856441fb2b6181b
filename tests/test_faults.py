"""Faults: worker processes killed (SIGKILL) in the middle of a half-iteration.

Dask reruns the lost block tasks elsewhere (or on the restarted worker); the trainer broadcasts the
fixed side again if every copy of it died. Either way training completes, nothing like a
CancelledError reaches the user, and the model equals a run without the fault.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import random_ratings

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


def make_config(store, model_dir, cache_blocks="never", iterations=ITERATIONS):
    return load_config(
        raw={
            "model": {"rank": 48, "reg": 0.05, "dtype": "float64", "seed": 1},
            "train": {"iterations": iterations, "cache_blocks": cache_blocks, "progress": "off"},
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
