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
"""

from __future__ import annotations

import os
import time

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


def make_config(model_dir, cache_blocks, iterations=2):
    return load_config(
        raw={
            "model": {"rank": 8, "reg": 0.1, "dtype": "float64", "seed": 4},
            "train": {
                "iterations": iterations,
                "cache_blocks": cache_blocks,
                "progress": "off",
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


def check_trains_within_limit(store, memory_limit, tmp_path):
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
            model = train(store, make_config(tmp_path / "m", "never"), client=client, quiet=True)
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


def test_tight_memory_limit_streams_blocks(tmp_path):
    """The same checks at a scale that runs in seconds (see the module docstring)."""
    store = make_store(tmp_path / "store", 1_500_000, target_ratings=100_000)
    assert store.n_blocks("user") >= 10 and store.n_blocks("item") >= 10
    # 512 MiB leaves room over a worker's baseline (400 MiB paused the workers for good in a
    # fresh CI virtualenv); the slow test above is the one below the store's size.
    check_trains_within_limit(store, 512 * MiB, tmp_path)


def test_cached_and_streamed_blocks_give_identical_factors(client, tmp_path):
    store = make_store(tmp_path / "store", 60_000, target_ratings=8_000)
    streamed = train(store, make_config(tmp_path / "a", "never", 3), client=client, quiet=True)
    cached = train(store, make_config(tmp_path / "b", "always", 3), client=client, quiet=True)
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
