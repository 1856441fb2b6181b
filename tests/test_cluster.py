"""Training on an existing cluster: a real `dask scheduler` and two `dask worker` processes.

The test starts the processes on loopback, attaches to them by address and by scheduler file
(from Python and from `dmf train`), checks the model equals the LocalCluster one, and that the
cluster is left running afterwards. BLAS must run one thread inside a block task even on a worker
started by hand without the nanny's OMP/OPENBLAS_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import random_ratings

from dmf.config import load_config
from dmf.model.model import Model
from dmf.store.layout import store_from_arrays
from dmf.train.loop import train

pytestmark = pytest.mark.cluster

DASK = str(Path(sys.executable).with_name("dask"))
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started (and its own children: each runs in its own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """(address, scheduler_file) of a scheduler and two single-threaded workers on 127.0.0.1.

    Worker 1 runs under a nanny (which sets OMP/MKL/OPENBLAS_NUM_THREADS=1); worker 2 runs
    without one and without those variables, like a worker started by hand.
    """
    from distributed import Client

    tmp = tmp_path_factory.mktemp("cluster")
    sched_file = tmp / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    # Functions of this test module sent to the workers are pickled by reference.
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    logs = []
    procs: list[subprocess.Popen] = []

    def spawn(name, *args):
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in teardown
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [DASK, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
                start_new_session=True,
            )
        )

    try:
        port = free_port()
        spawn(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--scheduler-file",
            str(sched_file),
            "--no-dashboard",
        )
        deadline = time.monotonic() + 60
        while not sched_file.is_file():
            assert procs[0].poll() is None, (tmp / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        common = ["--nthreads", "1", "--no-dashboard", "--memory-limit", "1GiB"]
        spawn("worker-1", "worker", "--scheduler-file", str(sched_file), "--name", "w1", *common)
        spawn(
            "worker-2",
            "worker",
            "--scheduler-file",
            str(sched_file),
            "--name",
            "w2",
            "--no-nanny",
            *common,
        )
        address = json.loads(sched_file.read_text())["address"]
        assert address == f"tcp://127.0.0.1:{port}"
        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address, str(sched_file)
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    u, i, r = random_ratings(400, 250, 15_000, seed=21)
    return store_from_arrays(tmp_path_factory.mktemp("cstore") / "store", u, i, r, n_blocks=4)


def raw_config(store, model_dir) -> dict:
    return {
        "store": {"path": str(store.path)},
        "model": {"rank": 6, "reg": 0.1, "dtype": "float64", "seed": 2},
        "train": {"iterations": 4, "progress": "off"},
        "output": {"model": str(model_dir), "plot": False},
    }


@pytest.fixture(scope="module")
def local_result(store, client, tmp_path_factory):
    """The same training on the session's LocalCluster."""
    model_dir = tmp_path_factory.mktemp("local") / "model"
    return train(store, load_config(raw=raw_config(store, model_dir)), client=client, quiet=True)


def assert_same_model(a, b):
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=1e-10, atol=1e-12)


def assert_still_running(address):
    from distributed import Client

    with Client(address, timeout=10) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        assert c.submit(sum, [1, 2, 3], pure=False).result(timeout=10) == 6


def test_train_by_address(external_cluster, store, local_result, tmp_path, capfd):
    address, _ = external_cluster
    model = train(store, load_config(raw=raw_config(store, tmp_path / "m")), address=address)
    assert_same_model(local_result, model)
    assert f"cluster at {address}" in capfd.readouterr().err
    assert_still_running(address)


def test_train_by_scheduler_file(external_cluster, store, local_result, tmp_path):
    address, sched_file = external_cluster
    model = train(
        store,
        load_config(raw=raw_config(store, tmp_path / "m")),
        scheduler_file=sched_file,
        quiet=True,
    )
    assert_same_model(local_result, model)
    assert_still_running(address)


@pytest.mark.parametrize("how", ["--address", "--scheduler-file"])
def test_cli_train_on_external_cluster(external_cluster, store, local_result, tmp_path, how):
    address, sched_file = external_cluster
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw_config(store, tmp_path / "m")))
    target = address if how == "--address" else sched_file
    proc = subprocess.run(
        [sys.executable, "-m", "dmf", "train", str(config), how, target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_same_model(local_result, Model.load(tmp_path / "m"))
    assert "LocalCluster" not in proc.stderr  # it attached; it did not start its own
    assert_still_running(address)


def blas_threads() -> dict[str, list[int]]:
    """BLAS thread counts outside and inside :func:`dmf.dist.cluster.blas_single_thread` (on a worker)."""
    from threadpoolctl import threadpool_info

    from dmf.dist.cluster import blas_single_thread

    def counts():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    outside = counts()
    # As a block task does: unpickling the task loads its module, and with it the solver's
    # kernel and SciPy's BLAS, before the task pins BLAS threads.
    import dmf.train.halfstep  # noqa: F401

    with blas_single_thread():
        inside = counts()
    return {
        "outside": outside,
        "inside": inside,
        "libs": sorted(p["filepath"] for p in threadpool_info() if p["user_api"] == "blas"),
    }


def test_blas_pinned_to_one_thread_in_tasks(external_cluster):
    from distributed import Client

    address, _ = external_cluster
    with Client(address, timeout=30) as c:
        result = c.run(blas_threads)
        names = {a: w["name"] for a, w in c.scheduler_info()["workers"].items()}
    by_name = {names[a]: r for a, r in result.items()}
    assert set(by_name) == {"w1", "w2"}
    for name, r in by_name.items():
        assert r["inside"], f"{name}: no BLAS library found by threadpoolctl"
        assert all(n == 1 for n in r["inside"]), (name, r)
        # NumPy's BLAS and SciPy's (the solver kernel's) are separate libraries: both pinned.
        assert any("scipy" in lib for lib in r["libs"]), (name, r)
    # The nanny pins BLAS through the environment; the hand-started worker does not, so the
    # pinning above is the context manager's doing there.
    assert all(n == 1 for n in by_name["w1"]["outside"]), by_name
    if (os.cpu_count() or 1) > 1:
        assert max(by_name["w2"]["outside"]) > 1, by_name


def test_local_cluster_of_threads(store, local_result, tmp_path):
    """cluster.processes false: an in-process LocalCluster of thread workers, same model."""
    raw = raw_config(store, tmp_path / "m")
    raw["cluster"] = {"n_workers": 2, "processes": False, "dashboard_address": None}
    model = train(store, load_config(raw=raw), quiet=True)
    assert_same_model(local_result, model)


def test_unreachable_scheduler_is_a_config_error(store, tmp_path):
    import dask

    from dmf.errors import ConfigError

    cfg = load_config(raw=raw_config(store, tmp_path / "m"))
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    stale = tmp_path / "scheduler.json"
    stale.write_text(json.dumps({"type": "Scheduler", "address": dead}))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConfigError, match=r"cluster\.address .*127\.0\.0\.1"):
            train(store, cfg, address=dead, quiet=True)
        with pytest.raises(ConfigError, match=r"cluster\.scheduler_file .*scheduler\.json"):
            train(store, cfg, scheduler_file=str(stale), quiet=True)
