"""Checkpoints and resume: a run killed with SIGKILL and resumed ends with the uninterrupted model.

The interrupted run is a real separate process (its own LocalCluster), killed with SIGKILL once a
checkpoint for iteration >= 2 exists; the resumed run continues from the newest complete
checkpoint. Checkpoints from another config or store are refused naming what differs, and corrupt
checkpoint files are detected by their checksums.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import random_ratings, store_with_validation

from dmf.config import load_config
from dmf.errors import CheckpointError, ModelError
from dmf.model.model import Model
from dmf.store.layout import store_from_arrays
from dmf.store.lease import WRITER as WRITER_LEASE
from dmf.store.lease import read_holder
from dmf.store.storage import Location
from dmf.train.checkpoint import checkpoint_leftovers, list_checkpoints, read_checkpoint
from dmf.train.loop import train

# Enough iterations that the run is still going when the test kills it after checkpoint 2.
N_ITER = 30


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    u, i, r = random_ratings(1500, 800, 120_000, seed=5)
    return store_from_arrays(tmp_path_factory.mktemp("resume") / "store", u, i, r, n_blocks=6)


def raw_config(store, model_dir: Path, iterations: int = N_ITER, train_=None, **model) -> dict:
    return {
        "store": {"path": str(store.path)},
        "model": {"rank": 12, "reg": 0.05, "dtype": "float64", "seed": 3, **model},
        "train": {
            "iterations": iterations,
            "checkpoint_every": 1,
            "progress": "off",
            **(train_ or {}),
        },
        "cluster": {
            "n_workers": 2,
            "threads_per_worker": 1,
            "memory_limit": "1GiB",
            "dashboard_address": None,
        },
        "output": {"model": str(model_dir), "plot": False},
    }


def assert_same_model(a, b, rtol=1e-12):
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=rtol, atol=0, err_msg=k)


def start_training(config_path: Path, tmp_path: Path) -> subprocess.Popen:
    """Run `dmf train` as its own process (and process group, so nothing outlives the test)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dmf", "train", str(config_path)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "train.log", "wb"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process we started and whatever it spawned (its worker processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


# Implicit feedback with the CG solver: each half-step starts from the factors it replaces, so
# a resumed run must start from exactly the checkpoint's.
IMPLICIT_CG = ({"solver": "cg", "cg_steps": 3}, {"feedback": "implicit", "alpha": 5.0})


@pytest.mark.parametrize("settings", [({}, {}), IMPLICIT_CG], ids=["explicit", "implicit-cg"])
def test_resume_after_sigkill_equals_uninterrupted_run(store, client, tmp_path, settings):
    train_, model = settings
    # Uninterrupted reference.
    cfg_a = load_config(raw=raw_config(store, tmp_path / "model-a", train_=train_, **model))
    a = train(store, cfg_a, client=client, quiet=True)
    assert [h["iteration"] for h in a.history] == list(range(1, N_ITER + 1))

    # The same training in another process, killed after its second checkpoint.
    model_b = tmp_path / "model-b"
    config_path = tmp_path / "train.yaml"
    raw_b = raw_config(store, model_b, train_=train_, **model)
    raw_b["train"]["lease_seconds"] = 3  # the killed run's lease on model-b lapses soon
    config_path.write_text(yaml.safe_dump(raw_b))
    proc = start_training(config_path, tmp_path)
    ckpt_dir = model_b / "checkpoints"
    try:
        deadline = time.monotonic() + 60
        while not any(
            int(p.name.split("-")[1]) >= 2 for p in list_checkpoints(ckpt_dir)
        ):  # poll quickly: an iteration takes ~0.1 s
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint 2 within 60 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-run: no final model, and only complete checkpoints are visible.
    assert not (model_b / "model.json").exists()
    done = list_checkpoints(ckpt_dir)
    assert done, "the kill left no checkpoint"
    last = max(int(p.name.split("-")[1]) for p in done)
    assert 2 <= last < N_ITER, f"killed after iteration {last}: the test did not interrupt"
    for p in done:
        state, _ = read_checkpoint(p)  # verifies every file's checksum
        if state["iteration"] == last:
            newest_history = state["history"]
        assert state["iteration"] == int(p.name.split("-")[1])
        assert [h["iteration"] for h in state["history"]] == list(range(1, state["iteration"] + 1))
    leftovers = [p.name for p in ckpt_dir.iterdir() if not p.name.startswith(("iter-", ".tmp-"))]
    assert leftovers == []

    # Resume from the newest complete checkpoint, as a user would: `dmf train --resume`, once
    # the killed run's lease on the directory has expired (tests/test_leases.py).
    holder = read_holder(Location.of(model_b / WRITER_LEASE))
    time.sleep(max(holder.expires_in(), 0) + 0.1)
    proc = subprocess.run(
        [sys.executable, "-m", "dmf", "train", str(config_path), "--resume"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"resuming after iteration {last}" in proc.stderr
    assert "taking over the lease" in proc.stderr
    b = Model.load(model_b)
    assert_same_model(a, b)
    # It did resume (rather than start again): the first iterations' records, timings included,
    # are those of the killed process.
    assert b.history[:last] == newest_history
    assert [h["iteration"] for h in b.history] == list(range(1, N_ITER + 1))
    np.testing.assert_allclose(
        [h["objective"] for h in b.history], [h["objective"] for h in a.history], rtol=1e-12
    )


def test_resume_of_finished_run_changes_nothing(store, client, tmp_path):
    cfg = load_config(raw=raw_config(store, tmp_path / "model", iterations=3))
    a = train(store, cfg, client=client, quiet=True)
    b = train(store, cfg, client=client, resume=True, quiet=True)
    assert_same_model(a, b, rtol=0)
    assert b.history == a.history  # nothing was run again (timings included)


def test_resume_keeps_early_stopping_state(client, tmp_path):
    """The best model and patience survive a resume: same stop and same kept model."""
    st = store_with_validation(tmp_path / "store", 300, 200, 12_000, seed=8, n_blocks=3, noise=1.0)
    raw = raw_config(st, tmp_path / "model-a", iterations=25, rank=20, reg=0.001)
    raw["train"]["early_stopping"] = {"patience": 2}
    a = train(st, load_config(raw=raw), client=client, quiet=True)
    assert a.meta["stopped"].startswith("early stopping"), a.meta  # the test needs it to stop
    best_it = a.meta["best_iteration"]
    assert best_it < len(a.history)

    # Train to just after the best iteration, then resume to the end.
    raw_b = raw_config(st, tmp_path / "model-b", iterations=best_it + 1, rank=20, reg=0.001)
    raw_b["train"]["early_stopping"] = {"patience": 2}
    first = train(st, load_config(raw=raw_b), client=client, quiet=True)
    raw_b["train"]["iterations"] = 25
    b = train(st, load_config(raw=raw_b), client=client, resume=True, quiet=True)
    assert b.history[: best_it + 1] == first.history  # resumed, not started again
    assert b.meta["best_iteration"] == best_it
    assert len(b.history) == len(a.history)
    assert_same_model(a, b)


@pytest.mark.parametrize(
    ("change", "key"),
    [({"rank": 13}, "model.rank"), ({"reg": 0.07}, "model.reg"), ({"seed": 4}, "model.seed")],
)
def test_checkpoint_of_other_config_is_refused(store, client, tmp_path, change, key):
    train(store, load_config(raw=raw_config(store, tmp_path / "m", 2)), client=client, quiet=True)
    other = load_config(raw=raw_config(store, tmp_path / "m", 4, **change))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        train(store, other, client=client, resume=True, quiet=True)
    # Only the differing key is named.
    assert str(err.value).count("checkpoint has") == 1, err.value


def test_clipping_is_no_reason_to_refuse_a_checkpoint(store, client, tmp_path):
    # model.clip changes predictions, never the factors: a run resumes across it (and so do
    # checkpoints written before the key existed), giving the factors of an unbroken run.
    first = train(
        store, load_config(raw=raw_config(store, tmp_path / "m", 2)), client=client, quiet=True
    )
    again = train(
        store,
        load_config(raw=raw_config(store, tmp_path / "m", 4, clip=False)),
        client=client,
        resume=True,
        quiet=True,
    )
    assert again.history[:2] == first.history and len(again.history) == 4
    whole = train(
        store, load_config(raw=raw_config(store, tmp_path / "w", 4)), client=client, quiet=True
    )
    assert_same_model(whole, again, rtol=0)


def test_checkpoint_of_other_store_is_refused(store, client, tmp_path):
    train(store, load_config(raw=raw_config(store, tmp_path / "m", 2)), client=client, quiet=True)
    u, i, r = random_ratings(1500, 800, 120_000, seed=6)
    other = store_from_arrays(tmp_path / "other-store", u, i, r, n_blocks=6)
    with pytest.raises(CheckpointError, match="store"):
        train(
            other,
            load_config(raw=raw_config(other, tmp_path / "m", 4)),
            client=client,
            resume=True,
            quiet=True,
        )


def side_file(model_dir: Path, ckpt, side: str, b: int = 0) -> Path:
    """Block ``b`` of the ``side`` version a checkpoint names (its state.json lists it)."""
    state = json.loads((Path(ckpt) / "state.json").read_text())["state"][side]
    return model_dir / state["root"] / state["files"][b]["path"]


def flip_bytes(path: Path) -> None:
    """Flip bytes in the data part of a .npy file (the header stays loadable)."""
    data = bytearray(path.read_bytes())
    for k in range(len(data) - 64, len(data) - 8, 7):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_is_skipped(store, client, tmp_path, caplog):
    cfg = load_config(raw=raw_config(store, tmp_path / "m", 4))
    a = train(store, cfg, client=client, quiet=True)
    ckpts = list_checkpoints(tmp_path / "m" / "checkpoints")
    assert [p.name for p in ckpts] == ["iter-00003", "iter-00004"]
    flip_bytes(side_file(tmp_path / "m", ckpts[-1], "item"))

    with caplog.at_level(logging.WARNING, logger="dmf"):
        b = train(store, cfg, client=client, resume=True, quiet=True)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert any("iter-00004" in m and "corrupt" in m for m in skipped), caplog.text
    state3, _ = read_checkpoint(ckpts[0])
    assert b.history[:3] == state3["history"]  # resumed from checkpoint 3, not from scratch
    assert b.history[3]["seconds"] != a.history[3]["seconds"]  # iteration 4 was run again
    # Iteration 4 was recomputed from checkpoint 3: the same model, the full history.
    assert_same_model(a, b)
    assert [h["iteration"] for h in b.history] == [1, 2, 3, 4]


def test_no_usable_checkpoint_is_an_error(store, client, tmp_path):
    cfg = load_config(raw=raw_config(store, tmp_path / "m", 3))
    train(store, cfg, client=client, quiet=True)
    ckpts = list_checkpoints(tmp_path / "m" / "checkpoints")
    flip_bytes(side_file(tmp_path / "m", ckpts[-1], "user"))
    (Path(ckpts[0]) / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        train(store, cfg, client=client, resume=True, quiet=True)
    assert ckpts[0].name in str(err.value) and ckpts[-1].name in str(err.value)


def test_leftover_of_a_killed_write_is_ignored_and_removed(store, client, tmp_path):
    """What a kill mid-write leaves (a checkpoint without its state.json, a temporary
    directory of an older version, a side version no checkpoint names) is neither resumed from
    nor kept."""
    cfg = load_config(raw=raw_config(store, tmp_path / "m", 2))
    a = train(store, cfg, client=client, quiet=True)
    ckpt_dir = tmp_path / "m" / "checkpoints"
    half = ckpt_dir / "iter-00003"
    half.mkdir()
    (half / "junk.0badf00d.npy").write_bytes(b"\x93NUMPY half-written")
    stale = ckpt_dir / ".tmp-00003-0badf00d"
    stale.mkdir()
    (stale / "user_factors.npy").write_bytes(b"\x93NUMPY half-written")
    orphan = tmp_path / "m" / "work" / "user" / "h00003-0badf00d"
    orphan.mkdir(parents=True)
    (orphan / "block=00000.0badf00d.npy").write_bytes(b"\x93NUMPY half-written")
    cfg4 = load_config(raw=raw_config(store, tmp_path / "m", 4))
    b = train(store, cfg4, client=client, resume=True, quiet=True)
    assert b.history[:2] == a.history  # resumed from iter-00002, not from the leftovers
    assert not stale.exists() and not (half / "junk.0badf00d.npy").exists()
    assert not orphan.exists()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["iter-00003", "iter-00004"]
    named = set()
    for ckpt in list_checkpoints(ckpt_dir):
        assert sorted(p.name for p in Path(ckpt).iterdir()) == ["state.json"]
        state = json.loads((Path(ckpt) / "state.json").read_text())["state"]
        named |= {state[side]["root"] for side in ("user", "item")}
    # The side versions left are those the checkpoints name.
    work = tmp_path / "m" / "work"
    assert {f"{d.parent.name}/{d.name}" for d in work.glob("*/h*")} == {
        r.split("/", 1)[1] for r in named
    }


# Writes checkpoints of a large array in a loop, printing each iteration once it is complete.
WRITER = """\
import sys
import numpy as np
from dmf.train.checkpoint import list_checkpoints, write_checkpoint

arrays = {"user_factors": np.random.default_rng(0).normal(size=(1_000_000, 4))}
# Continue the numbering of the previous writer.
it = max((int(p.name[len("iter-"):]) for p in list_checkpoints(sys.argv[1])), default=0)
while True:
    it += 1
    write_checkpoint(sys.argv[1], it, arrays, {"history": [], "fingerprint": {}}, keep=2)
    print(it, flush=True)
"""


def test_sigkill_during_checkpoint_writes_leaves_only_complete_ones(tmp_path):
    """Kill a process that does nothing but write checkpoints: every iter-* must verify."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ckpt_dir = tmp_path / "checkpoints"
    mid_write = 0
    # Kill at several delays after a checkpoint completes; on a loaded machine the writer may
    # not have started its next write yet, so go on (up to 12 kills) until one lands mid-write.
    for attempt, delay in enumerate((0.0, 0.03, 0.07, 0.01, 0.05, 0.12) * 2):
        if mid_write and attempt >= 3:
            break
        proc = subprocess.Popen(
            [sys.executable, str(script), str(ckpt_dir)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            while int(proc.stdout.readline() or 0) < 2:
                assert proc.poll() is None
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            kill_group(proc)
            proc.stdout.close()
        mid_write += bool(checkpoint_leftovers(Location.of(ckpt_dir)))
        done = list_checkpoints(ckpt_dir)
        assert len(done) >= 2  # keep=2 (3 if killed between the commit and the pruning)
        for p in done:
            state, arrays = read_checkpoint(p)
            assert arrays["user_factors"].shape == (1_000_000, 4)
    assert mid_write, "no kill landed during a write: the test proved nothing"


def test_checkpoints_do_not_block_a_model_that_must_not_overwrite(store, client, tmp_path):
    """output.overwrite false: checkpoints create the model directory during the run, which
    must not make the final save fail; an existing model is refused before training starts."""
    raw = raw_config(store, tmp_path / "m", 2)
    raw["output"]["overwrite"] = False
    cfg = load_config(raw=raw)
    a = train(store, cfg, client=client, quiet=True)
    assert (tmp_path / "m" / "model.json").is_file()
    ckpts = [p.name for p in list_checkpoints(tmp_path / "m" / "checkpoints")]

    with pytest.raises(ModelError, match="already holds a model"):
        train(store, cfg, client=client, quiet=True)
    assert [p.name for p in list_checkpoints(tmp_path / "m" / "checkpoints")] == ckpts
    assert_same_model(a, Model.load(tmp_path / "m"), rtol=0)

    # Resuming continues this run into its own directory.
    raw["train"]["iterations"] = 3
    b = train(store, load_config(raw=raw), client=client, resume=True, quiet=True)
    assert [h["iteration"] for h in b.history] == [1, 2, 3]


def test_resume_with_early_stopping_switched_off_keeps_the_last_model(client, tmp_path):
    # The checkpoint holds a best-so-far model; without early stopping it must not be returned.
    st = store_with_validation(tmp_path / "store", 60, 40, 1500, seed=3, n_blocks=2)
    raw = raw_config(st, tmp_path / "model", iterations=2, rank=3, reg=0.1)
    raw["train"]["early_stopping"] = {"patience": 100}
    train(st, load_config(raw=raw), client=client, quiet=True)
    raw["train"]["early_stopping"] = None
    raw["train"]["iterations"] = 5
    resumed = train(st, load_config(raw=raw), client=client, resume=True, quiet=True)
    raw["train"]["early_stopping"] = None
    fresh = train(st, load_config(raw=raw), client=client, fresh=True, quiet=True)
    assert "best_iteration" not in resumed.meta
    np.testing.assert_array_equal(resumed.user_factors, fresh.user_factors)


def test_a_finished_run_keeps_only_what_resume_needs(store, client, tmp_path):
    """After the model is written, work/ holds the side versions the kept checkpoints name and
    nothing else (no routing, no exchange pieces); with no checkpoints, no work/ at all."""
    raw = raw_config(store, tmp_path / "a", 3)
    raw["train"].update(exchange="partitioned", keep_checkpoints=1)
    train(store, load_config(raw=raw), client=client, quiet=True)
    work = tmp_path / "a" / "work"
    assert sorted(p.name for p in work.iterdir()) == ["item", "user"]
    [ckpt] = list_checkpoints(tmp_path / "a" / "checkpoints")
    state = json.loads((Path(ckpt) / "state.json").read_text())["state"]
    named = {state[side]["root"].split("/", 1)[1] for side in ("user", "item")}
    assert {f"{d.parent.name}/{d.name}" for d in work.glob("*/h*")} == named

    raw = raw_config(store, tmp_path / "b", 2)
    raw["train"].update(exchange="partitioned", checkpoint_every=0)
    train(store, load_config(raw=raw), client=client, quiet=True)
    assert not (tmp_path / "b" / "work").exists()
    assert (tmp_path / "b" / "model.json").is_file()
