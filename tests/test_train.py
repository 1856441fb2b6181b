"""The distributed trainer against the dense reference, and its invariants.

Every run here goes through a real LocalCluster with worker processes and a real store on disk.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_ratings, store_with_validation
from reference import als_reference, dense_matrix

from dmf.config import load_config
from dmf.errors import TrainingError
from dmf.model.model import Model
from dmf.store.layout import Store, store_from_arrays
from dmf.train.loop import train
from dmf.train.state import initial_item_factors


def _config(tmp_path, **model):
    model = {"rank": 3, "reg": 0.2, "dtype": "float64", **model}
    return load_config(
        raw={
            "model": model,
            "train": {"iterations": 4, "checkpoint_every": 0, "progress": "off"},
            "output": {"model": str(tmp_path / "model"), "plot": False},
        }
    )


def _store(tmp_path, n_blocks=3, name="store", n_users=70, n_items=45, nnz=1200, seed=5):
    u, i, r = random_ratings(n_users, n_items, nnz, seed=seed)
    return store_from_arrays(
        tmp_path / name, u, i, r, n_users=n_users, n_items=n_items, n_blocks=n_blocks
    ), (u, i, r)


def _reference(store: Store, data, cfg, iterations):
    u, i, r = data
    R = dense_matrix(store.n_users, store.n_items, u, i, r.astype(np.float64))
    m = cfg.model
    V0 = initial_item_factors(store, cfg.model)
    return als_reference(R, store.mu, V0, iterations, m.reg, m.effective_reg_bias, m.weighted_reg)


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"reg_bias": 0.02},
        {"weighted_reg": True, "reg": 0.05},
        {"rank": 0},
        {"rank": 24},
    ],
    ids=["default", "reg_bias", "als-wr", "rank0", "short-rows"],
)
@pytest.mark.parametrize("exchange", ["broadcast", "partitioned"])
def test_matches_dense_reference(tmp_path, client, model, exchange):
    store, data = _store(tmp_path)
    cfg = _config(tmp_path, **model)
    cfg.train.exchange = exchange
    got = train(store, cfg, client=client, quiet=True)
    U, b, V, c, hist = _reference(store, data, cfg, 4)
    for a, e in (
        (got.user_factors, U),
        (got.user_bias, b),
        (got.item_factors, V),
        (got.item_bias, c),
    ):
        np.testing.assert_allclose(a, e, rtol=1e-8, atol=1e-10)
    for rec, (j_users, j_items) in zip(got.history, hist, strict=True):
        assert rec["objective_after_user_step"] == pytest.approx(j_users, rel=1e-9)
        assert rec["objective"] == pytest.approx(j_items, rel=1e-9)
    if cfg.model.rank == 0:
        assert got.user_factors.shape == (store.n_users, 0)


def test_objective_never_increases(tmp_path, client):
    store, _ = _store(tmp_path, nnz=2000)
    cfg = _config(tmp_path, rank=5, reg=0.05)
    cfg.train.iterations = 12
    hist = train(store, cfg, client=client, quiet=True).history
    seq = [x for h in hist for x in (h["objective_after_user_step"], h["objective"])]
    for before, after in zip(seq, seq[1:], strict=False):
        assert after <= before * (1 + 1e-12), seq


def test_float32_storage_is_close_to_float64(tmp_path, client):
    store, _ = _store(tmp_path)
    m64 = train(store, _config(tmp_path), client=client, quiet=True)
    m32 = train(store, _config(tmp_path, dtype="float32"), client=client, quiet=True)
    assert m32.user_factors.dtype == np.float32
    np.testing.assert_allclose(m32.item_factors, m64.item_factors, rtol=1e-3, atol=1e-4)


def test_same_result_for_any_block_count(tmp_path, client):
    results = []
    for nb in (1, 4, 9):
        store, _ = _store(tmp_path, n_blocks=nb, name=f"store{nb}")
        assert store.n_blocks("user") == nb
        results.append(train(store, _config(tmp_path), client=client, quiet=True))
    for m in results[1:]:
        np.testing.assert_allclose(m.user_factors, results[0].user_factors, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.item_bias, results[0].item_bias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 4])
def test_same_result_for_any_worker_count(tmp_path, client, n_workers):
    from distributed import Client, LocalCluster

    store, _ = _store(tmp_path, n_blocks=5)
    base = train(store, _config(tmp_path), client=client, quiet=True)  # 2 workers
    with (
        LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None) as lc,
        Client(lc) as c,
    ):
        other = train(store, _config(tmp_path), client=c, quiet=True)
    np.testing.assert_allclose(other.user_factors, base.user_factors, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(other.item_factors, base.item_factors, rtol=1e-10, atol=1e-12)


def test_more_blocks_than_ratings(tmp_path, client):
    store = store_from_arrays(
        tmp_path / "s", [0, 1, 2], [2, 0, 1], [4.0, 2.0, 5.0], n_users=5, n_items=4, n_blocks=50
    )
    m = train(store, _config(tmp_path, rank=2), client=client, quiet=True)
    assert np.isfinite(m.user_factors).all()


def test_rows_without_ratings_stay_zero(tmp_path, client):
    u, i, r = random_ratings(30, 20, 300, seed=9)
    keep = (u != 7) & (i != 4)
    store = store_from_arrays(
        tmp_path / "s", u[keep], i[keep], r[keep], n_users=33, n_items=21, n_blocks=2
    )
    m = train(store, _config(tmp_path), client=client, quiet=True)
    for idx in (7, 30, 31, 32):
        assert not m.user_factors[idx].any() and m.user_bias[idx] == 0
    for idx in (4, 20):
        assert not m.item_factors[idx].any() and m.item_bias[idx] == 0
    assert all(
        np.isfinite(a).all() for a in (m.user_factors, m.item_factors, m.user_bias, m.item_bias)
    )


def test_nan_in_fit_is_a_loud_error(tmp_path, client):
    u, i, r = random_ratings(20, 10, 80, seed=2)
    r[5] = np.nan
    store = store_from_arrays(tmp_path / "s", u, i, r, n_blocks=2)
    with pytest.raises(TrainingError, match="non-finite"):
        train(store, _config(tmp_path), client=client, quiet=True)


def test_planted_truth_is_recovered_to_the_noise_level(tmp_path, client):
    sigma = 0.5
    u, i, r = random_ratings(400, 300, 60_000, seed=11, rank=3, noise=sigma)
    test = np.random.default_rng(0).random(len(u)) < 0.1
    store = store_from_arrays(
        tmp_path / "s", u[~test], i[~test], r[~test], n_users=400, n_items=300, n_blocks=3
    )
    cfg = _config(tmp_path, rank=3, reg=0.05, weighted_reg=False)
    cfg.train.iterations = 15
    m = train(store, cfg, client=client, quiet=True)
    rmse = np.sqrt(np.mean((m.predict_indices(u[test], i[test]) - r[test]) ** 2))
    assert rmse < 1.05 * sigma, rmse


def test_model_round_trips_and_records_history(tmp_path, client):
    store, _ = _store(tmp_path)
    cfg = _config(tmp_path)
    m = train(store, cfg, client=client, quiet=True)
    back = Model.load(tmp_path / "model")
    np.testing.assert_array_equal(back.user_factors, m.user_factors)
    np.testing.assert_array_equal(back.item_bias, m.item_bias)
    assert back.mu == m.mu and back.store_fingerprint == store.fingerprint
    assert [h["iteration"] for h in back.history] == [1, 2, 3, 4]
    lines = (tmp_path / "model" / "history.csv").read_text().splitlines()
    assert lines[0].startswith("iteration,train_rmse,validation_rmse,objective") and len(lines) == 5


def test_early_stopping_keeps_the_best_model(tmp_path, client):
    store = store_with_validation(tmp_path / "s", 60, 40, 1500, seed=4, n_blocks=2, noise=1.0)
    # Rank 8 with almost no regularisation overfits: validation RMSE turns up.
    cfg = _config(tmp_path, rank=8, reg=1e-4)
    cfg.train.iterations = 30
    cfg.train.early_stopping = {"patience": 2, "min_iterations": 1}
    m = train(store, cfg, client=client, quiet=True)
    vals = [h["validation_rmse"] for h in m.history]
    best = int(np.argmin(vals)) + 1
    assert m.meta["best_iteration"] == best == 1  # it overfits from the start
    assert len(m.history) == best + 2 < 30
    assert m.meta["best_validation_rmse"] == pytest.approx(min(vals))
    # Not before min_iterations (the default, 6): the same best model, kept.
    cfg.train.early_stopping = {"patience": 2}
    cfg.output.overwrite = True
    m6 = train(store, cfg, client=client, quiet=True)
    assert len(m6.history) == 6 and m6.meta["best_iteration"] == best
    np.testing.assert_array_equal(m6.user_factors, m.user_factors)


def test_a_stalled_half_step_is_reported(tmp_path, client, caplog):
    # A tiny stall_warning makes ordinary block solves count as stalls: the warning must say how
    # many workers are paused, and training must still finish.
    store, _ = _store(tmp_path, nnz=2000)
    cfg = _config(tmp_path, rank=24)
    cfg.train.iterations = 1
    cfg.train.stall_warning = 1e-3
    with caplog.at_level("WARNING", logger="dmf"):
        m = train(store, cfg, client=client, quiet=True)
    assert len(m.history) == 1
    assert any("0 of 2 workers are paused" in r.getMessage() for r in caplog.records)


def test_a_fresh_run_discards_an_earlier_runs_checkpoints_only_when_asked(tmp_path, client):
    """The checkpoints of a run that finished go with its model when a new run replaces it;
    those of a run that was stopped (no model saved after them) are kept unless --fresh."""
    from dmf.errors import CheckpointError

    store, _ = _store(tmp_path)
    cfg = _config(tmp_path)
    cfg.train.checkpoint_every = 1
    cfg.train.iterations = 3
    train(store, cfg, client=client, quiet=True)
    ckpts = tmp_path / "model" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter-*")) == ["iter-00002", "iter-00003"]
    # A finished run: replacing its model (output.overwrite) replaces its checkpoints.
    cfg.train.iterations = 2
    train(store, cfg, client=client, quiet=True)
    assert sorted(p.name for p in ckpts.glob("iter-*")) == ["iter-00001", "iter-00002"]
    # A run stopped before saving (its checkpoints newer than the model): refused, and its
    # checkpoints are kept, until --resume or --fresh.
    (tmp_path / "model" / "model.json").unlink()
    cfg2 = _config(tmp_path, reg=0.3)
    cfg2.train.checkpoint_every = 1
    cfg2.train.iterations = 1
    with pytest.raises(
        CheckpointError, match="2 checkpoint.* not finish.* iteration 2: pass --resume"
    ):
        train(store, cfg2, client=client, quiet=True)
    assert sorted(p.name for p in ckpts.glob("iter-*")) == ["iter-00001", "iter-00002"]
    train(store, cfg2, client=client, fresh=True, quiet=True)
    assert sorted(p.name for p in ckpts.glob("iter-*")) == ["iter-00001"]
    # And it is this run's: resuming with this run's config is accepted.
    cfg2.train.iterations = 2
    assert len(train(store, cfg2, client=client, resume=True, quiet=True).history) == 2


def test_output_that_is_not_a_model_is_never_replaced(tmp_path, client):
    from dmf.errors import ModelError

    store, _ = _store(tmp_path)
    cfg = _config(tmp_path)
    cfg.output.model = str(tmp_path)  # holds the store
    with pytest.raises(ModelError, match="not a model directory"):
        train(store, cfg, client=client, quiet=True)
    assert (tmp_path / "store" / "manifest.json").is_file()


def test_early_stopping_without_validation_says_it_is_off(tmp_path, client, caplog):
    # On by default, early stopping has nothing to go by in a store without a validation
    # split: training runs every iteration, and says so (a warning when the config asked for
    # early stopping, an info line when it is the default).
    store, _ = _store(tmp_path)
    assert store.n_split("validation") == 0
    cfg = _config(tmp_path)
    cfg.train.early_stopping = {"patience": 1}
    with caplog.at_level("INFO", logger="dmf"):
        m = train(store, cfg, client=client, quiet=True)
    assert [r.levelname for r in caplog.records if "early stopping is off" in r.message] == [
        "WARNING"
    ]
    assert "split.validation" in caplog.text
    assert len(m.history) == cfg.train.iterations
    caplog.clear()
    cfg = _config(tmp_path)
    cfg.output.overwrite = True
    with caplog.at_level("INFO", logger="dmf"):
        train(store, cfg, client=client, quiet=True)
    assert [r.levelname for r in caplog.records if "early stopping is off" in r.message] == ["INFO"]


@pytest.mark.parametrize(
    "model",
    [{}, {"weighted_reg": True, "reg": 0.05, "dtype": "float32"}, {"rank": 24}],
    ids=["default", "als-wr-float32", "short-rows"],
)
def test_partitioned_exchange_gives_the_broadcast_model_to_the_last_bit(tmp_path, client, model):
    """Each block given only the fixed rows its ratings reference (routed through files) solves
    exactly what it solves given the whole side: the same bits, the same objective, the same
    validation RMSE. Blocks of unequal sizes on both sides, and a side whose blocks reference
    every source block or few of them."""
    store = store_with_validation(tmp_path / "s", 120, 80, 3000, seed=11, n_blocks=4)
    models = {}
    for exchange in ("broadcast", "partitioned"):
        cfg = _config(tmp_path / exchange, **model)
        cfg.train.exchange = exchange
        cfg.train.iterations = 3
        models[exchange] = train(store, cfg, client=client, quiet=True)
    a, b = models["broadcast"], models["partitioned"]
    for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
        np.testing.assert_array_equal(getattr(b, k), getattr(a, k), err_msg=k)
    for key in ("objective", "objective_after_user_step", "train_rmse", "validation_rmse"):
        assert [h[key] for h in b.history] == [h[key] for h in a.history], key
    # Bytes moved: both modes read and write the same side files; beyond them, a broadcast
    # copies the whole fixed side to the other solving worker (2 workers), a routed half-step
    # writes and reads back each destination's distinct fixed rows, counted here from the store.
    itemsize = np.dtype(a.user_factors.dtype).itemsize
    row = (a.rank + 1) * itemsize
    for side, fixed in (("user", "item"), ("item", "user")):
        distinct = sum(
            len(np.unique(store.read_block(side, r.block).cols)) for r in store.block_refs(side)
        )
        n_fixed = store.n_rows(fixed)
        for ha, hb in zip(a.history, b.history, strict=True):
            assert (ha["exchange"][side], hb["exchange"][side]) == ("broadcast", "partitioned")
            broadcast_copy = n_fixed * (row + itemsize)
            routed = 2 * distinct * row
            assert hb["bytes_moved"][side] - ha["bytes_moved"][side] == routed - broadcast_copy


def test_auto_exchange_chooses_by_the_workers_memory(tmp_path, caplog):
    """`auto` broadcasts a fixed side that takes at most a quarter of a worker's memory_limit and
    routes a larger one, says which it chose and what each worker will hold; a plan that cannot
    fit (here: forcing the broadcast of the large side) is refused before any work, naming the
    settings to change."""
    import logging

    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV
    from dmf.train.halfstep import HalfSteps

    # 400,000 users at rank 128 (float32): a 208 MB user side, more than a quarter of 600 MiB.
    n_users = 400_000
    rng = np.random.default_rng(4)
    u = np.repeat(np.arange(n_users), 2)
    i = (np.arange(2 * n_users) * 7) % 64
    store = store_from_arrays(
        tmp_path / "s", u, i, rng.normal(3, 1, 2 * n_users), n_users=n_users, n_items=64,
        n_blocks=8,
    )  # fmt: skip
    cfg = _config(tmp_path, rank=128, dtype="float32")
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                     memory_limit="600MiB", env=BLAS_ENV) as lc,
        Client(lc) as c,
    ):  # fmt: skip
        with caplog.at_level(logging.INFO, logger="dmf"):
            modes = HalfSteps(store, cfg, c, None, True).plan()
        assert modes == {"user": "broadcast", "item": "partitioned"}
        assert "items given users: partitioned" in caplog.text
        assert "users given items: broadcast" in caplog.text
        cfg.train.exchange = "broadcast"
        with pytest.raises(TrainingError, match="item half-step needs about") as err:
            HalfSteps(store, cfg, c, None, True).plan()
    for name in ("cluster.memory_limit", "blocks.target_ratings", "train.exchange: partitioned"):
        assert name in str(err.value)
