"""Leases: one writer per model directory, claims that keep ingest off a store runs train on,
and --fresh for the checkpoints of an earlier run.

The runs are real `dmf train` processes (each with its own LocalCluster), SIGKILLed where a
test needs a dead holder; the leases on object storage are tested against moto's S3 server on
loopback (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from conftest import random_ratings

import dmf.store.lease as lease_mod
from dmf.cli import main
from dmf.config import load_config
from dmf.errors import CheckpointError, LeaseError
from dmf.store.layout import Store, store_from_arrays
from dmf.store.lease import (
    CLAIMS,
    WRITER,
    Holder,
    LeaseHeld,
    acquire,
    claim,
    live_claims,
    read_holder,
)
from dmf.store.storage import Location, write_atomic
from dmf.train.checkpoint import list_checkpoints
from dmf.train.loop import train

REPO = Path(__file__).resolve().parents[1]
# Far more iterations than any test waits for: each test kills its run.
N_ITER = 1000
# Short leases, so that a killed holder's lease lapses within the test.
LEASE = 4.0


@pytest.fixture(scope="module")
def data():
    return random_ratings(1000, 500, 40_000, seed=7)


@pytest.fixture(scope="module")
def store(tmp_path_factory, data):
    u, i, r = data
    return store_from_arrays(tmp_path_factory.mktemp("leases") / "store", u, i, r, n_blocks=4)


def raw_config(store_path, model_dir: Path, iterations: int = N_ITER) -> dict:
    return {
        "store": {"path": str(store_path)},
        "model": {"rank": 8, "reg": 0.05, "seed": 3},
        "train": {
            "iterations": iterations,
            "checkpoint_every": 1,
            "progress": "off",
            "lease_seconds": LEASE,
        },
        "cluster": {
            "n_workers": 1,
            "threads_per_worker": 1,
            "memory_limit": "1GiB",
            "dashboard_address": None,
        },
        "output": {"model": str(model_dir), "plot": False},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def start_training(config: Path, log: Path) -> subprocess.Popen:
    """`dmf train CONFIG` in its own process group (so that nothing outlives the test)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dmf", "train", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and its workers: no `finally` runs, its leases stay behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_until_expired(holder: Holder) -> None:
    time.sleep(max(holder.expires_in(), 0) + 0.1)


def as_if_on_another_host(loc: Location) -> Holder:
    """Rewrite a killed holder's lease as if it had run on another machine, where only the
    lease's expiry can tell that it died (on its own host, its pid tells at once)."""
    holder = dataclasses.replace(read_holder(loc), host="another-node")
    write_atomic(loc, holder.to_json())
    return holder


# -- one writer per model directory -----------------------------------------------------------


def test_a_second_dmf_train_on_a_model_directory_is_refused_naming_the_holder(store, tmp_path):
    model = tmp_path / "model"
    config = write_config(tmp_path / "train.yaml", raw_config(store.path, model))
    lease = Location.of(model / WRITER)
    first = start_training(config, tmp_path / "first.log")
    try:
        wait_for(lambda: read_holder(lease) is not None, first, tmp_path / "first.log", "lease")
        second = subprocess.run(
            [sys.executable, "-m", "dmf", "train", str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first run ended before the second: nothing was tested"
        holder = read_holder(lease)
    finally:
        kill_group(first)
    assert second.returncode == 2, second.stderr
    err = second.stderr
    assert f"model directory {model} is being written by another run" in err
    assert f"host {socket.gethostname()}, pid {first.pid}, since 20" in err
    assert "expires in" in err and "train.lease_seconds" in err
    # The refused run took nothing over: the lease is still the first run's.
    assert holder.pid == first.pid


def test_the_lease_of_a_killed_run_is_taken_over_once_it_expires(store, client, tmp_path, caplog):
    model = tmp_path / "model"
    config = write_config(tmp_path / "train.yaml", raw_config(store.path, model))
    killed = start_training(config, tmp_path / "killed.log")
    try:
        wait_for(
            lambda: list_checkpoints(model / "checkpoints"),
            killed,
            tmp_path / "killed.log",
            "checkpoint",
        )
    finally:
        kill_group(killed)
    holder = read_holder(Location.of(model / WRITER))
    assert holder is not None and holder.pid == killed.pid
    last = int(list_checkpoints(model / "checkpoints")[-1].name.split("-")[1])

    # Killed on another machine: resuming is refused while its lease has not expired...
    holder = as_if_on_another_host(Location.of(model / WRITER))
    cfg = load_config(raw=raw_config(store.path, model, iterations=last + 1))
    with pytest.raises(LeaseError, match=rf"another-node, pid {killed.pid}, .* expires in \d+ s"):
        train(store, cfg, client=client, resume=True, quiet=True)
    # ... and taken over, naming the dead run, once it has.
    wait_until_expired(holder)
    with caplog.at_level(logging.WARNING, logger="dmf"):
        resumed = train(store, cfg, client=client, resume=True, quiet=True)
    taken = [r.getMessage() for r in caplog.records if "taking over the lease" in r.getMessage()]
    assert taken and f"pid {killed.pid}" in taken[0], caplog.text
    assert [h["iteration"] for h in resumed.history] == list(range(1, last + 2))
    assert read_holder(Location.of(model / WRITER)) is None  # released at the end


def test_the_lease_of_a_run_killed_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    """A killed run resumed on its own machine (a batch job resubmitted, say) need not wait
    for the lease to expire: no process with the holder's pid runs here any more."""
    loc = Location.of(tmp_path / WRITER)
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    proc = subprocess.Popen(
        [sys.executable, str(script), loc.url, "600"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"pid {proc.pid}, since"):
            acquire(loc, ttl=600)  # alive: refused
    finally:
        kill_group(proc)
        proc.stdout.close()
    assert read_holder(loc).expires_in() > 500  # far from expiring
    with caplog.at_level(logging.WARNING, logger="dmf"):
        mine = acquire(loc, ttl=600)
    try:
        assert f"pid {proc.pid}" in caplog.text and "no process with its pid" in caplog.text
        assert read_holder(loc).token == mine.token
    finally:
        mine.release()


def test_a_holder_whose_lease_was_taken_notices_and_stops(tmp_path):
    """The residual race's safety net: a heartbeat that finds another token in the lease
    marks it lost, never overwrites it, and check() fails."""
    loc = Location.of(tmp_path / WRITER)
    mine = acquire(loc, ttl=30)
    mine.check()
    now = time.time()
    other = Holder("elsewhere", 4242, "f" * 32, "dmf train other.yaml", now, now + 30, 30.0)
    loc.remove()
    assert loc.create(other.to_json())
    mine.refresh()
    with pytest.raises(LeaseError, match=r"lost its lease .*\(host elsewhere, pid 4242"):
        mine.check()
    mine.release()  # not ours any more: left alone
    assert read_holder(loc).token == other.token


# -- claims on a store ------------------------------------------------------------------------


def test_ingest_refuses_a_store_that_a_run_trains_on(data, tmp_path, capsys, caplog):
    u, i, r = data
    source = tmp_path / "ratings.csv"
    pacsv.write_csv(pa.table({"user": u, "item": i, "rating": r}), source)
    store_path, model = tmp_path / "store", tmp_path / "model"
    raw = raw_config(store_path, model)
    raw.update(data={"source": str(source)}, split={"method": "none"}, blocks={"n_blocks": 4})
    raw["store"]["overwrite"] = True
    config = write_config(tmp_path / "job.yaml", raw)
    ingest = ["ingest", str(config), "--no-cluster", "-q"]
    assert main(ingest) == 0
    version = Store.open(store_path).manifest.version
    claims = Location.of(store_path / CLAIMS)

    run = start_training(config, tmp_path / "train.log")
    try:
        wait_for(lambda: live_claims(claims), run, tmp_path / "train.log", "claim on the store")
        capsys.readouterr()
        assert main(ingest) == 2
        err = capsys.readouterr().err
        assert run.poll() is None, "the run ended before the ingest: nothing was tested"
    finally:
        kill_group(run)
    assert f"store {store_path} is in use: 1 run(s) train on it" in err
    assert f"pid {run.pid}" in err and f"writing {model}" in err and "store.force" in err
    assert Store.open(store_path).manifest.version == version  # untouched

    # A killed run's claim outlives it until it expires (here as if it ran on another host:
    # on this one, its dead pid tells at once): still refused, unless forced.
    [name] = claims.ls()
    holder = as_if_on_another_host(claims / name)
    with pytest.raises(LeaseError, match=rf"pid {run.pid}"):
        store_from_arrays(store_path, u, i, r, overwrite=True)
    with caplog.at_level(logging.WARNING, logger="dmf"):
        forced = store_from_arrays(store_path, u, i, r, overwrite=True, force=True)
    assert forced.manifest.version != version
    assert f"pid {run.pid}" in caplog.text and "replacing the store" in caplog.text
    capsys.readouterr()
    assert main(ingest) == 2
    assert "set store.force: true" in capsys.readouterr().err
    assert main([*ingest, "--set", "store.force=true"]) == 0  # the same from the command line

    # Once it has expired, ingest goes ahead, and removes the dead run's claim.
    wait_until_expired(holder)
    assert main(ingest) == 0
    assert Store.open(store_path).manifest.version not in (version, forced.manifest.version)
    assert claims.ls() == []


# -- the same leases on S3 --------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from dmf.store.lease import acquire
    from dmf.store.storage import Location
    acquire(Location.of(sys.argv[1]), ttl=float(sys.argv[2]))
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_leases_on_s3_acquire_refuse_and_expire(s3_bucket, tmp_path, caplog):
    loc = Location.of(f"{s3_bucket}/model/{WRITER}")
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    holder_proc = subprocess.Popen(
        [sys.executable, str(script), loc.url, str(LEASE)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert holder_proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=rf"pid {holder_proc.pid}, since"):
            acquire(loc, ttl=LEASE)
    finally:
        kill_group(holder_proc)
        holder_proc.stdout.close()
    assert read_holder(loc).pid == holder_proc.pid
    dead = as_if_on_another_host(loc)
    with pytest.raises(LeaseHeld, match=r"expires in \d+ s"):
        acquire(loc, ttl=LEASE)  # killed, but its lease has not lapsed yet
    wait_until_expired(dead)
    with caplog.at_level(logging.WARNING, logger="dmf"):
        mine = acquire(loc, ttl=LEASE)
    assert f"pid {holder_proc.pid}" in caplog.text and "taking over" in caplog.text
    try:
        assert read_holder(loc).token == mine.token
        time.sleep(LEASE * 1.5)  # the heartbeat keeps it alive
        assert not read_holder(loc).expired() and mine.lost is None
    finally:
        mine.release()
    assert not loc.exists()


def test_a_claim_on_s3_keeps_ingest_off_the_store(s3_bucket, data):
    u, i, r = data
    root = f"{s3_bucket}/store"
    store_from_arrays(root, u[:500], i[:500], r[:500])
    with claim(Location.of(root) / CLAIMS, ttl=LEASE, about={"model": "s3://x/model"}) as c:
        with pytest.raises(LeaseError, match=rf"pid {os.getpid()}, .* writing s3://x/model"):
            store_from_arrays(root, u[:400], i[:400], r[:400], overwrite=True)
        assert Store.open(root).n_train == 500
        assert [h.token for h in live_claims(Location.of(root) / CLAIMS)] == [c.token]
    store_from_arrays(root, u[:400], i[:400], r[:400], overwrite=True)
    assert Store.open(root).n_train == 400


def test_without_conditional_writes_the_read_back_decides(s3_bucket, monkeypatch):
    """A store that cannot create exclusively: a plain PUT, read back after a settle. A live
    lease is never overwritten, and of two writers the last one wins, the other backs off."""
    loc = Location.of(f"{s3_bucket}/model/{WRITER}")
    fs, put = loc.fs, loc.fs.pipe_file
    monkeypatch.setattr(lease_mod, "SETTLE_SECONDS", 0.2)

    def no_conditional_put(path, data, mode="overwrite", **kw):
        if mode == "create":
            raise NotImplementedError("no conditional writes here")
        return put(path, data, **kw)

    monkeypatch.setattr(fs, "pipe_file", no_conditional_put)
    mine = acquire(loc, ttl=30)
    with pytest.raises(LeaseHeld, match=rf"pid {os.getpid()}"):
        acquire(loc, ttl=30)
    assert read_holder(loc).token == mine.token
    mine.release()

    now = time.time()
    other = Holder("elsewhere", 4242, "f" * 32, "dmf train other.yaml", now, now + 30, 30.0)

    def racing_put(path, data, mode="overwrite", **kw):
        no_conditional_put(path, data, mode, **kw)
        put(path, other.to_json())  # another process's PUT lands after ours

    monkeypatch.setattr(fs, "pipe_file", racing_put)
    with pytest.raises(LeaseHeld, match=r"host elsewhere, pid 4242"):
        acquire(loc, ttl=30)


# -- --fresh ----------------------------------------------------------------------------------


def test_checkpoints_of_an_earlier_run_need_resume_or_fresh(store, client, tmp_path, capsys):
    model = tmp_path / "model"
    raw = raw_config(store.path, model, iterations=3)
    config = write_config(tmp_path / "train.yaml", raw)
    first = train(store, load_config(raw=raw), client=client, quiet=True)
    ckpts = [p.name for p in list_checkpoints(model / "checkpoints")]
    assert ckpts == ["iter-00002", "iter-00003"]
    # As if the run had been killed before saving: its checkpoints, no model after them.
    (model / "model.json").unlink()

    cli = ["train", str(config), "--address", client.scheduler.address, "-q"]
    capsys.readouterr()
    assert main(cli) == 2
    err = capsys.readouterr().err
    assert (
        f"model directory {model} holds 2 checkpoint(s) of an earlier run that did not finish, "
        "the newest after iteration 3: pass --resume to continue that run, or --fresh to "
        "discard them" in err
    )
    assert [p.name for p in list_checkpoints(model / "checkpoints")] == ckpts  # kept
    with pytest.raises(CheckpointError, match="--resume .* or --fresh"):
        train(store, load_config(raw=raw), client=client, quiet=True)
    with pytest.raises(SystemExit):
        main([*cli, "--resume", "--fresh"])  # one or the other

    raw["model"]["reg"] = 0.2
    raw["train"]["iterations"] = 1
    write_config(config, raw)
    assert main([*cli, "--fresh"]) == 0
    assert [p.name for p in list_checkpoints(model / "checkpoints")] == ["iter-00001"]
    raw["train"]["iterations"] = 2
    fresh = train(store, load_config(raw=raw), client=client, resume=True, quiet=True)
    # It resumed this run (reg 0.2), not the discarded one.
    assert [h["iteration"] for h in fresh.history] == [1, 2]
    assert fresh.history[0]["objective"] != first.history[0]["objective"]
    assert not np.array_equal(fresh.user_factors, first.user_factors)


def test_clean_waits_for_the_run_writing_the_directory(tmp_path, capsys):
    """A run's checkpoint being written is in no manifest yet: `dmf clean` would take it for a
    leftover. While the directory's writer lease is live, clean refuses (a dry run lists)."""
    model = tmp_path / "model"
    half_written = model / "checkpoints" / "iter-00007" / "user_bias.0badf00d.npy"
    half_written.parent.mkdir(parents=True)
    half_written.write_bytes(b"in flight")
    with acquire(Location.of(model / WRITER), ttl=600):
        assert main(["clean", str(model)]) == 2
        assert "being written by a training run" in capsys.readouterr().err
        assert half_written.exists()
        assert main(["clean", "--dry-run", str(model)]) == 0
    assert main(["clean", str(model)]) == 0  # the run has ended
    assert not half_written.exists()
