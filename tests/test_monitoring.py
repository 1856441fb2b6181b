"""Monitoring: what a user watching a run sees.

Task keys read as the algorithm (phase, iteration, block), each iteration is a Dask span, the
terminal shows the dashboard link, one progress bar per half-iteration (only when asked or on a
terminal) and one line per iteration, and the model directory holds history.csv and a PNG plot.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import random_ratings

from dmf.config import load_config
from dmf.model.model import Model
from dmf.store.layout import store_from_arrays
from dmf.train.loop import train

ITERATIONS = 3
N_BLOCKS = 3
REPO = Path(__file__).resolve().parents[1]
# iter   1  train RMSE 0.5509  val RMSE 0.6012  objective 6.494809e+04  0.23 s  0.87M ratings/s
ITER_LINE = re.compile(
    r"^iter +(\d+)  train RMSE (\d+\.\d{4})  val RMSE (\d+\.\d{4}|-)  "
    r"objective (\S+)  (\d+\.\d\d) s  (\d+\.\d\d)M ratings/s$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    u, i, r = random_ratings(300, 200, 10_000, seed=31)
    val = np.arange(len(u)) % 10 == 0
    return store_from_arrays(
        tmp_path_factory.mktemp("mon") / "store",
        u[~val],
        i[~val],
        r[~val],
        n_users=300,
        n_items=200,
        n_blocks=N_BLOCKS,
        held_out={"validation": (u[val], i[val], r[val])},
    )


def raw_config(store, model_dir, progress="off") -> dict:
    return {
        "store": {"path": str(store.path)},
        "model": {"rank": 4, "reg": 0.1, "seed": 0},
        "train": {"iterations": ITERATIONS, "progress": progress},
        "cluster": {"n_workers": 1, "memory_limit": "1GiB", "dashboard_address": "127.0.0.1:0"},
        "output": {"model": str(model_dir)},
    }


# ---------------------------------------------------------------------------------------------
# What the scheduler sees
# ---------------------------------------------------------------------------------------------
def span_groups(dask_scheduler) -> dict[str, list[str]]:
    """Span name -> names of the task groups under it (run on the scheduler)."""
    ext = dask_scheduler.extensions["spans"]
    return {
        "/".join(name): sorted({tg.name for span in spans for tg in span.traverse_groups()})
        for name, spans in ext.spans_search_by_name.items()
    }


def test_task_keys_and_spans_read_as_the_algorithm(store, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    cfg = load_config(raw=raw_config(store, tmp_path / "m"))
    cfg.train.cache_blocks = "always"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        with get_task_stream(client) as ts:
            train(store, cfg, client=client, quiet=True)
        spans = client.run_on_scheduler(span_groups)
    keys = [str(t["key"]) for t in ts.data]

    solve = re.compile(r"^solve-(users|items)-(\d+)-(\d{5})-([0-9a-f]{8})$")
    load = re.compile(r"^load-(user|item)-block-(\d{5})-([0-9a-f]{8})$")
    # The other steps of a run: the first item factors drawn block by block, each fixed side
    # version assembled once for the tasks that hold it (broadcast), validation per user block,
    # and the model's factor files written block by block at the end.
    others = re.compile(
        r"^(init-items-\d{5}|assemble-(users|items)-\d+|validate-\d+-\d{5}"
        r"|export-(users|items)-\d{5})-([0-9a-f]{8})$"
    )
    solved = [m.groups() for k in keys if (m := solve.match(k))]
    loaded = [m.groups() for k in keys if (m := load.match(k))]
    other = [m.groups() for k in keys if (m := others.match(k))]
    assert len(solved) + len(loaded) + len(other) == len(keys), keys  # nothing unreadable
    expected = {
        (side, str(it), f"{b:05d}")
        for side in ("users", "items")
        for it in range(1, ITERATIONS + 1)
        for b in range(N_BLOCKS)
    }
    assert sorted(s[:3] for s in solved) == sorted(expected)  # one task per block, no more
    assert sorted(x[:2] for x in loaded) == sorted(
        (side, f"{b:05d}") for side in ("user", "item") for b in range(N_BLOCKS)
    )
    tokens = {s[3] for s in solved} | {o[-1] for o in other}
    assert len(tokens) == 1  # one run token
    # A cached block is named by its file, not by the run, so that runs on one store at once
    # (dmf tune's trials) share it.
    from dmf.train.halfstep import cached_block_key

    assert {k for k in keys if k.startswith("load-")} == {
        cached_block_key(store.block_ref(side, b))
        for side in ("user", "item")
        for b in range(N_BLOCKS)
    }

    # One span per iteration, under the run's span, holding that iteration's tasks: the two
    # half-steps with the assembly of their fixed sides, and the validation.
    for it in range(1, ITERATIONS + 1):
        assert spans[f"dmf-train/iteration-{it}"] == [
            "assemble-items",
            "assemble-users",
            "solve-items",
            "solve-users",
            "validate",
        ], spans
    assert f"dmf-train/iteration-{ITERATIONS + 1}" not in spans


# ---------------------------------------------------------------------------------------------
# What the terminal and the model directory show: `dmf train` as a user runs it
# ---------------------------------------------------------------------------------------------
def run_cli(store, tmp_path, progress):
    config = tmp_path / f"train-{progress}.yaml"
    model_dir = tmp_path / f"model-{progress}"
    config.write_text(yaml.safe_dump(raw_config(store, model_dir, progress)))
    proc = subprocess.run(
        [sys.executable, "-m", "dmf", "train", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr, model_dir


@pytest.fixture(scope="module")
def cli_run(store, tmp_path_factory):
    """`dmf train` with progress bars on; its stderr and model directory."""
    return run_cli(store, tmp_path_factory.mktemp("cli"), "on")


def test_dashboard_link_printed_when_cluster_starts(cli_run):
    err, _ = cli_run
    m = re.search(
        r"^dmf: LocalCluster: .*dashboard: (http://127\.0\.0\.1:(\d+)/status)$", err, re.M
    )
    assert m, err
    assert int(m.group(2)) > 0
    assert err.index(m.group(0)) < err.index("iter   1")  # before training starts


def test_one_line_per_iteration(cli_run):
    err, model_dir = cli_run
    lines = ITER_LINE.findall(err)
    assert [int(x[0]) for x in lines] == list(range(1, ITERATIONS + 1)), err
    history = Model.load(model_dir).history
    for (_, train_rmse, val_rmse, objective, seconds, _), h in zip(lines, history, strict=True):
        assert float(train_rmse) == pytest.approx(h["train_rmse"], abs=5e-5)
        assert float(val_rmse) == pytest.approx(h["validation_rmse"], abs=5e-5)
        assert float(objective) == pytest.approx(h["objective"], rel=1e-6)
        assert float(seconds) == pytest.approx(h["seconds"], abs=5e-3)


def test_progress_bar_per_half_iteration(cli_run, store, tmp_path):
    err, _ = cli_run
    for it in range(1, ITERATIONS + 1):
        for side in ("users", "items"):
            # A tqdm bar counting the half-iteration's blocks.
            bar = rf"iter {it} {side}: +\d+%\|[^|]*\| \d+/{N_BLOCKS} \["
            assert re.search(bar, err), err
    # In a batch log (stderr not a terminal) `auto` shows no bars, but still the lines.
    quiet_err, _ = run_cli(store, tmp_path, "auto")
    assert "iter 1 users" not in quiet_err
    assert len(ITER_LINE.findall(quiet_err)) == ITERATIONS


def test_history_csv(cli_run):
    _, model_dir = cli_run
    with open(model_dir / "history.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = reader.fieldnames
    required = ["iteration", "train_rmse", "validation_rmse", "objective", "seconds"]
    assert set(required) <= set(columns), columns
    assert [int(r["iteration"]) for r in rows] == list(range(1, ITERATIONS + 1))
    history = Model.load(model_dir).history
    for row, h in zip(rows, history, strict=True):
        for k in ("train_rmse", "validation_rmse", "objective", "seconds"):
            assert float(row[k]) == pytest.approx(h[k], rel=1e-12), k
    objective = [float(r["objective"]) for r in rows]
    after_user = [float(r["objective_after_user_step"]) for r in rows]
    # Each half-step is recorded and J never increases.
    sequence = [x for pair in zip(after_user, objective, strict=True) for x in pair]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(sequence, sequence[1:], strict=False))


def test_convergence_plot_is_a_png(cli_run):
    from PIL import Image

    _, model_dir = cli_run
    png = model_dir / "convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
        assert im.size[0] >= 400 and im.size[1] >= 200
