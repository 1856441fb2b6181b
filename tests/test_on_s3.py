"""The whole job on object storage: data, store and model on s3:// (a real S3 server on
loopback), workers that share nothing local, a training killed and resumed, then evaluate,
recommend and predict; every result equal to the same job on local disk.

The cluster is a `dask scheduler` with two `dask worker` processes, each started in a
temporary working directory and local directory of its own, so no relative path and no local
file can pass between the driver and a worker: everything they share is on S3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dmf.model.model import Model
from dmf.store.layout import Store
from dmf.store.lease import WRITER, read_holder
from dmf.store.storage import Location
from dmf.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.cluster

DASK = str(Path(sys.executable).with_name("dask"))
ITERATIONS = 30


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def isolated_cluster(s3, tmp_path_factory):
    """A scheduler and two workers on loopback, each worker in its own cwd and local
    directory; the S3 endpoint and credentials reach them through the environment."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("isolated")
    port = _free_port()
    procs = []
    logs = []

    def spawn(name: str, *args: str) -> None:
        cwd = tmp / name
        cwd.mkdir()
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in teardown
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [DASK, *args],
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
                start_new_session=True,
            )
        )

    try:
        spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port),
              "--no-dashboard")  # fmt: skip
        address = f"tcp://127.0.0.1:{port}"
        for k in (1, 2):
            spawn(f"worker-{k}", "worker", address, "--nthreads", "1", "--no-dashboard",
                  "--memory-limit", "1GiB", "--local-directory", str(tmp / f"local-{k}"))  # fmt: skip
        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)
        for log in logs:
            log.close()


def job_config(root: str, path: Path) -> Path:
    """A job whose synthetic data, store and model are all under ``root`` (a URL or a local
    directory)."""
    cfg = {
        "synth": {
            "enabled": True,
            "path": f"{root}/data",
            "n_users": 1500,
            "n_items": 300,
            "n_ratings": 40_000,
            "rank": 4,
            "files": 2,
            "seed": 3,
        },
        "store": {"path": f"{root}/store"},
        "split": {"method": "random", "validation": 0.1, "test": 0.1},
        "blocks": {"n_blocks": 3},
        "model": {"rank": 6, "reg": 0.05, "weighted_reg": True},
        "train": {
            "iterations": ITERATIONS,
            "checkpoint_every": 1,
            "progress": "off",
            "lease_seconds": 3,
        },
        "output": {"model": f"{root}/model", "plot": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def dmf(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dmf", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def train_killed_then_resumed(config: Path, address: str, model: Location, cwd: Path) -> None:
    """`dmf train` SIGKILLed once it has checkpointed two iterations, then `--resume`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmf", "train", str(config), "--address", address, "-q"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            done = list_checkpoints(model / "checkpoints")
            if done and max(int(c.name[5:]) for c in done) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint on S3 within 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _stop(proc)
        proc.stderr.close()
    last = max(int(c.name[5:]) for c in list_checkpoints(model / "checkpoints"))
    assert last < ITERATIONS, "training ended before the kill: the test proved nothing"
    assert not (model / "model.json").exists()
    # The killed run's lease on the model directory lapses train.lease_seconds after its last
    # heartbeat; then --resume takes it over.
    holder = read_holder(model / WRITER)
    time.sleep(max(holder.expires_in(), 0) + 0.1)
    dmf("train", str(config), "--address", address, "--resume", "-q", cwd=cwd)


def test_the_whole_job_on_s3_equals_the_job_on_local_disk(
    s3, s3_bucket, isolated_cluster, tmp_path
):
    address = isolated_cluster
    here = tmp_path / "driver"
    here.mkdir()
    results = {}
    for where, root in (("s3", s3_bucket), ("local", str(tmp_path / "local"))):
        config = job_config(root, here / f"{where}.yaml")
        dmf("synth", str(config), "--no-progress", cwd=here)
        dmf("ingest", str(config), "--address", address, "-q", cwd=here)
        model = Location.of(f"{root}/model")
        if where == "s3":
            train_killed_then_resumed(config, address, model, here)
        else:
            dmf("train", str(config), "--address", address, "-q", cwd=here)
        # Pairs to score: some known, one unknown user.
        pairs = Location.of(f"{root}/pairs.csv")
        with pairs.open("wb") as fh:
            fh.write(b"user,item\n0,1\n5,7\n999999,3\n")
        dmf("evaluate", str(model), "--address", address, "--json", f"{root}/metrics.json",
            cwd=here)  # fmt: skip
        dmf("recommend", str(model), "-n", "5", "--out", f"{root}/recs.parquet",
            "--address", address, cwd=here)  # fmt: skip
        dmf("predict", str(model), "--pairs", str(pairs), "--out", f"{root}/scores.parquet",
            cwd=here)  # fmt: skip
        with Location.of(f"{root}/recs.parquet").open("rb") as fh:
            recs = pq.read_table(fh)
        with Location.of(f"{root}/scores.parquet").open("rb") as fh:
            scores = pq.read_table(fh)
        results[where] = {
            "model": Model.load(model),
            "metrics": json.loads(Location.of(f"{root}/metrics.json").read_text()),
            "recs": recs,
            "scores": scores,
            "store": Store.open(f"{root}/store"),
        }
    s3_run, local = results["s3"], results["local"]
    # The store: the same ratings in every block.
    for side in ("user", "item"):
        for b in range(local["store"].n_blocks(side)):
            a, c = s3_run["store"].read_block(side, b), local["store"].read_block(side, b)
            np.testing.assert_array_equal(a.indptr, c.indptr)
            np.testing.assert_array_equal(a.cols, c.cols)
            np.testing.assert_array_equal(a.vals, c.vals)
    # The model, killed and resumed on S3, is the uninterrupted local one to the last bit.
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_array_equal(getattr(s3_run["model"], k), getattr(local["model"], k), k)
    assert [h["objective"] for h in s3_run["model"].history] == [
        h["objective"] for h in local["model"].history
    ]
    for key in ("rmse", "mae", "precision", "recall", "ndcg", "map", "n"):
        assert s3_run["metrics"][key] == local["metrics"][key], key
    assert s3_run["recs"].equals(local["recs"])
    assert s3_run["scores"].equals(local["scores"])
    assert s3_run["scores"].num_rows == 3 and isinstance(s3_run["scores"], pa.Table)


# A model saved by a process that SIGKILLs itself at one step of the commit (crash injection).
KILLED_SAVE = """\
import os, signal, sys
import numpy as np, pyarrow as pa
import dmf.store.storage as storage
from dmf.model.model import Model

root, step = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(7)
model = Model(mu=3.0, user_ids=pa.array(np.arange(4000)), item_ids=pa.array(np.arange(300)),
              user_factors=rng.normal(size=(4000, 8)).astype(np.float32),
              user_bias=rng.normal(size=4000).astype(np.float32),
              item_factors=rng.normal(size=(300, 8)).astype(np.float32),
              item_bias=rng.normal(size=300).astype(np.float32))
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if step == "after-first-file":
    real = storage.Target.write_table
    def write_table(self, *a, **k):
        entry = real(self, *a, **k)
        die()
    storage.Target.write_table = write_table
elif step == "before-manifest":
    real_w = storage.write_atomic
    storage.write_atomic = lambda loc, data: die() if loc.name == "model.json" else real_w(loc, data)
elif step == "before-deleting-old-files":
    storage.clean = lambda root, rels: die()
model.save(root, plot=False)
"""


@pytest.mark.parametrize(
    "step", ["after-first-file", "before-manifest", "before-deleting-old-files"]
)
def test_a_save_killed_at_any_step_leaves_a_complete_model(s3_bucket, tmp_path, step):
    """Kill a model save on S3 at each step of its commit: the model there is always a whole
    one (the old before the manifest lands, the new after), and what the killed save wrote is
    reported as leftovers and removed by `dmf clean`."""
    from dmf.model.model import model_leftovers

    root = f"{s3_bucket}/model"
    old = Model(
        mu=2.0,
        user_ids=pa.array(np.arange(10)),
        item_ids=pa.array(np.arange(5)),
        user_factors=np.ones((10, 8), np.float32),
        user_bias=np.zeros(10, np.float32),
        item_factors=np.ones((5, 8), np.float32),
        item_bias=np.zeros(5, np.float32),
    )
    old.save(root, plot=False)
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    proc = subprocess.run([sys.executable, str(script), root, step], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    loaded = Model.load(root)
    if step == "before-deleting-old-files":
        assert loaded.mu == 3.0 and loaded.n_users == 4000  # the new manifest had landed
    else:
        assert loaded.mu == 2.0 and loaded.n_users == 10  # the old model, whole
        np.testing.assert_array_equal(loaded.user_factors, old.user_factors)
    stray = model_leftovers(Location.of(root))
    assert stray, "the killed save left nothing behind: the kill did not land mid-commit"
    info = subprocess.run(
        [sys.executable, "-m", "dmf", "info", root], capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0 and "leftovers" in info.stdout and "dmf clean" in info.stdout
    clean = subprocess.run(
        [sys.executable, "-m", "dmf", "clean", root], capture_output=True, text=True, timeout=120
    )
    assert clean.returncode == 0, clean.stderr
    assert model_leftovers(Location.of(root)) == []
    assert Model.load(root).mu == loaded.mu  # cleaning never touches the committed model


def test_a_manifest_naming_a_missing_or_short_file_is_an_error(s3_bucket):
    import fsspec

    from dmf.errors import ModelError

    root = f"{s3_bucket}/model"
    rng = np.random.default_rng(1)
    Model(
        mu=1.0,
        user_ids=pa.array(np.arange(50)),
        item_ids=pa.array(np.arange(20)),
        user_factors=rng.normal(size=(50, 4)).astype(np.float32),
        user_bias=np.zeros(50, np.float32),
        item_factors=rng.normal(size=(20, 4)).astype(np.float32),
        item_bias=np.zeros(20, np.float32),
    ).save(root, plot=False)
    files = json.loads(Location.of(f"{root}/model.json").read_text())["files"]
    user_file = f"{root}/{files['user_factors/part-00000.parquet']['path']}"
    fs = fsspec.filesystem("s3")
    data = fs.cat_file(user_file)
    fs.pipe_file(user_file, data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"user_factors/part-00000\..*truncated"):
        Model.load(root)
    fs.rm(user_file)
    with pytest.raises(ModelError, match=r"user_factors/part-00000\..*missing"):
        Model.load(root)


def test_preflight_names_the_worker_that_cannot_reach_the_store(s3, s3_bucket, tmp_path):
    """One worker of two has an endpoint that leads nowhere: training refuses to start, and
    the error names that worker and the store's URL."""
    from distributed import Client

    from dmf.config import load_config
    from dmf.store.layout import store_from_arrays
    from dmf.store.storage import StorageError
    from dmf.train.loop import train

    rng = np.random.default_rng(0)
    keys = rng.choice(200 * 40, 1500, replace=False)
    store = store_from_arrays(
        f"{s3_bucket}/store", keys // 40, keys % 40, rng.normal(3, 1, 1500), n_blocks=2
    )
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        procs.append(subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port",
                                       str(port), "--no-dashboard"], cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))  # fmt: skip
        for name, endpoint in (("good", s3), ("lost", "http://127.0.0.1:9")):
            env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}
            procs.append(subprocess.Popen([DASK, "worker", address, "--name", name,
                                           "--nthreads", "1", "--no-dashboard"], cwd=tmp_path,
                                          env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL,
                                          start_new_session=True))  # fmt: skip
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            lost = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "lost"]
            cfg = load_config(
                raw={"output": {"model": f"{s3_bucket}/model"}, "train": {"iterations": 1}}
            )
            with pytest.raises(StorageError, match="preflight failed on 1 of 2 workers") as err:
                train(store, cfg, client=client, quiet=True)
        assert f"worker {lost[0]}" in str(err.value)
        assert f"{s3_bucket}/store" in str(err.value)
    finally:
        for p in reversed(procs):
            _stop(p)


def test_relative_out_is_resolved_on_the_driver(isolated_cluster, tmp_path):
    """`dmf recommend --out relative/dir --address ...`: the workers run in other directories,
    and the parts still land under the driver's current directory."""
    from dmf.config import load_config
    from dmf.store.layout import store_from_arrays
    from dmf.train.loop import train

    rng = np.random.default_rng(2)
    keys = rng.choice(120 * 30, 900, replace=False)
    store = store_from_arrays(
        tmp_path / "store", keys // 30, keys % 30, rng.normal(3, 1, 900), n_blocks=2
    )
    cfg = load_config(raw={"output": {"model": str(tmp_path / "model"), "plot": False},
                           "train": {"iterations": 2, "progress": "off"}})  # fmt: skip
    from distributed import Client

    with Client(isolated_cluster, timeout=60) as client:
        train(store, cfg, client=client, quiet=True)
    here = tmp_path / "driver"
    here.mkdir()
    dmf("recommend", str(tmp_path / "model"), "-n", "3", "--out", "out/recs",
        "--address", isolated_cluster, cwd=here)  # fmt: skip
    written = json.loads((here / "out" / "recs" / "_manifest.json").read_text())["files"]
    t = pq.read_table(here / "out" / "recs")
    assert len(written) >= 1 and t.num_rows == 120 * 3
