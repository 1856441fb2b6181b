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

from dmf.cluster import BLAS_ENV
from dmf.config import load_config
from dmf.store import store_from_arrays
from dmf.train import train

ITERATIONS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # Rank 48 and 12 blocks a side: a solve task takes ~0.1 s, long enough to be hit mid-task.
    u, i, r = random_ratings(3000, 1500, 300_000, seed=11)
    return store_from_arrays(tmp_path_factory.mktemp("faults") / "store", u, i, r, n_blocks=12)


def make_config(store, model_dir, cache_blocks="never"):
    return load_config(
        raw={
            "model": {"rank": 48, "reg": 0.05, "dtype": "float64", "seed": 1},
            "train": {"iterations": ITERATIONS, "cache_blocks": cache_blocks, "progress": "off"},
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
    """Workers holding a copy of the broadcast fixed side (run on the scheduler)."""
    return sorted(
        {
            ws.address
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith("FixedSide")
            for ws in ts.who_has or ()
        }
    )


class Killer(threading.Thread):
    """Waits until a ``prefix`` task is executing, then SIGKILLs worker processes.

    ``which`` picks the victims from (client, worker running the task): the worker itself, or
    every worker holding the broadcast data.
    """

    def __init__(self, client, prefix: str, which: str):
        super().__init__(daemon=True)
        self.client, self.prefix, self.which = client, prefix, which
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


def run_with_kill(client, store, cfg, prefix, which):
    killer = Killer(client, prefix, which)
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


def test_worker_killed_mid_half_iteration(store, tmp_path, capfd):
    cluster, client = local_cluster(3)
    with cluster, client:
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
    assert "CancelledError" not in capfd.readouterr().err


def test_broadcast_lost_with_its_workers(store, tmp_path, capfd, caplog):
    """Every worker holding the broadcast fixed side dies (cached blocks die with them)."""
    cluster, client = local_cluster(2)
    with cluster, client, caplog.at_level(logging.WARNING, logger="dmf"):
        reference = train(store, make_config(store, tmp_path / "ref"), client=client, quiet=True)
        model, killer = run_with_kill(
            client,
            store,
            make_config(store, tmp_path / "m", cache_blocks="always"),
            "solve-users-2-",
            "holders",
        )
    assert len(killer.killed) == 2  # both workers held a copy
    # The trainer noticed the lost broadcast and sent it again; the user sees no exception.
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retried and all("iteration 2" in m for m in retried), caplog.text
    assert "Traceback" not in capfd.readouterr().err
    assert_same_model(reference, model)
