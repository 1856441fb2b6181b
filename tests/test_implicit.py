"""Implicit feedback (Hu, Koren & Volinsky 2008) on the distributed trainer, against the dense
reference of the objective over every cell (tests/reference.py) and against the implicit
library's CPU ALS.

Every run goes through a real LocalCluster with worker processes and a real store on disk.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import implicit_als_reference, implicit_objective

from dmf.config import load_config
from dmf.store.layout import Store, store_from_arrays
from dmf.train.loop import train
from dmf.train.state import initial_item_factors


def _events(n_users=60, n_items=40, nnz=500, seed=3):
    """Distinct (user, item) cells with positive event counts, planted preference."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(n_users, 3))
    V = rng.normal(size=(n_items, 3))
    w = np.exp(U @ V.T).ravel()
    keys = rng.choice(n_users * n_items, size=nnz, replace=False, p=w / w.sum())
    u, i = keys // n_items, keys % n_items
    r = rng.integers(1, 6, nnz).astype(np.float32)
    return u.astype(np.int64), i.astype(np.int64), r


def _store(tmp_path, n_blocks=3, name="store", **kw) -> tuple[Store, tuple]:
    u, i, r = _events(**kw)
    n_users, n_items = kw.get("n_users", 60), kw.get("n_items", 40)
    store = store_from_arrays(
        tmp_path / name, u, i, r, n_users=n_users, n_items=n_items, n_blocks=n_blocks
    )
    return store, (u, i, r)


def _config(tmp_path, train_=None, **model):
    model = {
        "feedback": "implicit",
        "rank": 4,
        "reg": 0.3,
        "alpha": 2.0,
        "dtype": "float64",
        **model,
    }
    return load_config(
        raw={
            "model": model,
            "train": {"iterations": 4, "checkpoint_every": 0, "progress": "off", **(train_ or {})},
            "output": {"model": str(tmp_path / "model"), "plot": False},
        }
    )


def _dense(store: Store, data) -> np.ndarray:
    u, i, r = data
    R = np.zeros((store.n_users, store.n_items))
    np.add.at(R, (u, i), r.astype(np.float64))
    return R


def _reference(store, data, cfg, iterations):
    m = cfg.model
    return implicit_als_reference(
        _dense(store, data),
        initial_item_factors(store, m).astype(np.float64),
        iterations,
        m.reg,
        m.effective_reg_bias,
        m.alpha,
        m.biases,
        m.weighted_reg,
        m.confidence,
        m.eps,
    )


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"biases": True, "reg_bias": 0.1},
        {"weighted_reg": True, "confidence": "log", "eps": 0.5, "reg": 0.05},
        {"rank": 12, "alpha": 40.0},
    ],
    ids=["plain", "biases", "als-wr-log", "rank12-alpha40"],
)
@pytest.mark.parametrize("exchange", ["broadcast", "partitioned"])
def test_matches_dense_reference(tmp_path, client, model, exchange):
    """The Cholesky solver gives the exact minimiser of the objective over every cell: the
    factors match the dense reference to 1e-8, its objective after every half-step too, and the
    objective never increases."""
    store, data = _store(tmp_path)
    cfg = _config(tmp_path, train_={"exchange": exchange}, **model)
    got = train(store, cfg, client=client, quiet=True)
    U, b, V, c, hist = _reference(store, data, cfg, 4)
    for a, e in (
        (got.user_factors, U),
        (got.user_bias, b),
        (got.item_factors, V),
        (got.item_bias, c),
    ):
        np.testing.assert_allclose(a, e, rtol=1e-8, atol=1e-10)
    assert got.mu == 0.0
    if not cfg.model.biases:
        assert not np.any(got.user_bias) and not np.any(got.item_bias)
    objectives = []
    for rec, (j_users, j_items) in zip(got.history, hist, strict=True):
        assert rec["objective_after_user_step"] == pytest.approx(j_users, rel=1e-9)
        assert rec["objective"] == pytest.approx(j_items, rel=1e-9)
        objectives += [rec["objective_after_user_step"], rec["objective"]]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objectives, objectives[1:], strict=False))


def test_broadcast_and_partitioned_give_the_same_bits(tmp_path, client):
    store, _ = _store(tmp_path, nnz=700)
    models = []
    for exchange in ("broadcast", "partitioned"):
        cfg = _config(
            tmp_path / exchange, train_={"exchange": exchange}, biases=True, dtype="float32"
        )
        models.append(train(store, cfg, client=client, quiet=True))
    a, b = models
    assert np.array_equal(a.user_factors, b.user_factors)
    assert np.array_equal(a.item_factors, b.item_factors)
    assert np.array_equal(a.item_bias, b.item_bias)
    assert [h["objective"] for h in a.history] == [h["objective"] for h in b.history]


def test_objective_never_increases_longer_run(tmp_path, client):
    store, _ = _store(tmp_path, n_users=150, n_items=80, nnz=2500, seed=9)
    cfg = _config(
        tmp_path, train_={"iterations": 12}, rank=8, reg=0.05, alpha=10.0, dtype="float32"
    )
    got = train(store, cfg, client=client, quiet=True)
    seq = [x for h in got.history for x in (h["objective_after_user_step"], h["objective"])]
    # float32 storage rounds each solution: allow that rounding, nothing more.
    assert all(b <= a * (1 + 1e-6) for a, b in zip(seq, seq[1:], strict=False))
    assert seq[-1] < 0.9 * seq[0]


def test_cg_records_the_objective_it_reaches(tmp_path, client):
    """train.solver cg: a few conjugate-gradient steps per row from the previous factors. The
    history's objective is that of the factors CG reached (checked against the dense
    objective), it stays close to the exact solver's, and with enough steps CG is exact."""
    store, data = _store(tmp_path, nnz=700)
    R = _dense(store, data)
    exact = train(store, _config(tmp_path / "chol"), client=client, quiet=True)
    cg = train(
        store,
        _config(tmp_path / "cg", train_={"solver": "cg", "cg_steps": 3}),
        client=client,
        quiet=True,
    )
    m = _config(tmp_path).model
    j = implicit_objective(
        R, cg.user_factors, cg.user_bias, cg.item_factors, cg.item_bias, m.reg, m.reg, m.alpha
    )
    assert cg.history[-1]["objective"] == pytest.approx(j, rel=1e-9)
    assert not np.allclose(cg.user_factors, exact.user_factors, rtol=1e-8)
    assert cg.history[-1]["objective"] == pytest.approx(exact.history[-1]["objective"], rel=0.05)
    many = train(
        store,
        _config(tmp_path / "cg50", train_={"solver": "cg", "cg_steps": 50}),
        client=client,
        quiet=True,
    )
    np.testing.assert_allclose(many.item_factors, exact.item_factors, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"solver": "cg"}}, "train.solver 'cg' is for model.feedback 'implicit'"),
        ({"model": {"biases": False}}, "model.biases false is for model.feedback 'implicit'"),
        ({"data": {"columns": {"rating": None}}}, "set model.feedback: implicit"),
        ({"model": {"feedback": "implicit", "rank": 0}}, "leaves nothing to fit"),
    ],
    ids=["cg-explicit", "no-biases-explicit", "no-rating-explicit", "rank0-implicit"],
)
def test_settings_that_do_nothing_are_refused(raw, message):
    from dmf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(raw=raw)


def test_implicit_defaults():
    cfg = load_config(raw={"model": {"feedback": "implicit"}})
    assert cfg.model.weighted_reg is False and cfg.model.biases is False
    assert cfg.data.duplicates == "sum"
    explicit = load_config(raw={})
    assert explicit.model.weighted_reg is True and explicit.model.biases is True
    assert explicit.data.duplicates == "error"
    kept = load_config(raw={"model": {"feedback": "implicit", "weighted_reg": True}})
    assert kept.model.weighted_reg is True


@pytest.mark.parametrize("dtype", ["float64"])
def test_matches_the_implicit_library(tmp_path, client, dtype):
    """Same data, alpha, reg, rank, iterations and initial factors: dmf's factors agree with
    implicit's CPU ALS (Cholesky, ``use_cg=False``) to 1e-6 relative. implicit takes the
    confidence matrix itself (c = its alpha x the entry, plus 1 where observed: its solver adds
    (c - 1) y y^T and c y), so it gets 1 + alpha r with its alpha at 1."""
    als = pytest.importorskip("implicit.cpu.als")
    import scipy.sparse as sp

    store, data = _store(tmp_path, n_users=120, n_items=70, nnz=1500, seed=11)
    cfg = _config(tmp_path, rank=6, reg=0.1, alpha=3.0, dtype=dtype, train_={"iterations": 5})
    got = train(store, cfg, client=client, quiet=True)
    R = _dense(store, data)
    C = sp.csr_matrix(np.where(R > 0, 1.0 + cfg.model.alpha * R, 0.0))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit warns (an error here) on a threaded BLAS
        ref = als.AlternatingLeastSquares(
            factors=6, regularization=0.1, alpha=1.0, iterations=5, use_cg=False,
            dtype=np.float64, calculate_training_loss=False, num_threads=1, random_state=0,
        )  # fmt: skip
        ref.item_factors = initial_item_factors(store, cfg.model).astype(np.float64)
        ref.user_factors = np.zeros((store.n_users, 6))
        ref.fit(C, show_progress=False)
    scale_u = np.abs(ref.user_factors).max()
    scale_i = np.abs(ref.item_factors).max()
    np.testing.assert_allclose(got.user_factors, ref.user_factors, rtol=1e-6, atol=1e-6 * scale_u)
    np.testing.assert_allclose(got.item_factors, ref.item_factors, rtol=1e-6, atol=1e-6 * scale_i)


def _ndcg_reference(U, V, train_cells, heldout, k):
    """Mean NDCG@k over the users with held-out events: every item scored by u.v, the user's
    train items excluded, every held-out event relevant, one on an item without train events
    never a hit (as dmf evaluate counts it); brute force."""
    scores = U @ V.T
    for u, i in train_cells:
        scores[u, i] = -np.inf
    trained = {i for _, i in train_cells}
    total, n = 0.0, 0
    for u in sorted({u for u, _ in heldout}):
        rel = {i for uu, i in heldout if uu == u}
        top = np.argsort(-scores[u], kind="stable")[:k]
        dcg = sum(1.0 / np.log2(p + 2) for p, i in enumerate(top) if i in rel and i in trained)
        ideal = sum(1.0 / np.log2(p + 2) for p in range(min(k, len(rel))))
        total += dcg / ideal
        n += 1
    return total / n


@pytest.mark.parametrize("cap", [10_000, 7])
def test_validation_ndcg_and_early_stopping(tmp_path, client, cap):
    """Implicit training records the validation NDCG@k of every iteration (the ranking of every
    item, train items excluded), checked by brute force on the final factors; early stopping
    watches it and keeps the best iteration. With train.validation_users below the number of
    validation users it is computed on a sample of them."""
    u, i, r = _events(n_users=80, n_items=50, nnz=900, seed=21)
    val = np.arange(len(u)) % 4 == 0
    store = store_from_arrays(
        tmp_path / "store", u[~val], i[~val], r[~val], n_users=80, n_items=50, n_blocks=3,
        held_out={"validation": (u[val], i[val], r[val])},
    )  # fmt: skip
    cfg = _config(
        tmp_path,
        train_={"iterations": 8, "validation_users": cap, "early_stopping": None},
        rank=5,
        reg=0.5,
    )
    got = train(store, cfg, client=client, quiet=True)
    assert all(h["validation_rmse"] is None for h in got.history)
    ndcg = [h["validation_ndcg"] for h in got.history]
    assert all(0 < v <= 1 for v in ndcg)
    expected = _ndcg_reference(
        got.user_factors.astype(np.float64),
        got.item_factors.astype(np.float64),
        list(zip(u[~val], i[~val], strict=True)),
        list(zip(u[val], i[val], strict=True)),
        cfg.evaluate.k,
    )
    if cap >= 80:
        assert ndcg[-1] == pytest.approx(expected, rel=1e-9)
    else:
        assert ndcg[-1] != pytest.approx(expected, rel=1e-9)  # a sample: another figure
        assert abs(ndcg[-1] - expected) < 0.5
    if cap < 80:
        return
    # Early stopping keeps the iteration of the best NDCG.
    cfg_es = _config(
        tmp_path / "es",
        train_={"iterations": 8, "early_stopping": {"patience": 1, "min_iterations": 1}},
        rank=5,
        reg=0.5,
    )
    es = train(store, cfg_es, client=client, quiet=True)
    curve = [h["validation_ndcg"] for h in es.history]
    best = int(np.argmax(curve)) + 1
    assert es.meta["best_iteration"] == best
    assert es.meta["best_validation_ndcg"] == curve[best - 1]


def test_tune_scores_implicit_trials_by_validation_ndcg(tmp_path, client):
    """dmf tune on events: trials are scored by their best validation NDCG (maximised), alpha
    is searched, reg_bias is not (no biases), and best.yaml trains the reported NDCG again."""
    import csv

    import yaml

    from dmf.tune import tune

    u, i, r = _events(n_users=150, n_items=60, nnz=2000, seed=8)
    val = np.arange(len(u)) % 5 == 0
    store = store_from_arrays(
        tmp_path / "store", u[~val], i[~val], r[~val], n_users=150, n_items=60, n_blocks=2,
        held_out={"validation": (u[val], i[val], r[val])},
    )  # fmt: skip
    cfg = load_config(
        raw={
            "model": {"feedback": "implicit", "dtype": "float64"},
            "train": {"progress": "off"},
            "output": {"model": str(tmp_path / "model"), "plot": False},
            "tune": {
                "trials": 4, "parallel": 1, "iterations": 4, "pruner": "none",
                "rank": [2, 8], "reg": [0.01, 10.0], "alpha": [0.5, 20.0],
                "weighted_reg": [False], "output": str(tmp_path / "tune"),
            },
        }
    )  # fmt: skip
    result = tune(cfg, store, client=client, quiet=True)
    done = [t for t in result.trials if t.state == "complete"]
    assert len(done) == 4
    assert result.best.value == max(t.value for t in done)
    for t in done:
        assert "reg_bias" not in t.params and 0.5 <= t.params["alpha"] <= 20.0
        assert t.value == max(v for _, v in t.curve)  # the best of its curve, a maximum
    with open(tmp_path / "tune" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert "validation_ndcg" in rows[0] and "validation_rmse" not in rows[0]
    best = load_config(tmp_path / "tune" / "best.yaml")
    assert best.model.alpha == result.best.params["alpha"]
    best.output.model = str(tmp_path / "again")
    again = train(store, best, client=client, quiet=True)
    got = again.meta.get("best_validation_ndcg", again.history[-1]["validation_ndcg"])
    assert got == pytest.approx(result.value, rel=1e-9)
    assert (
        yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())["model"]["feedback"]
        == "implicit"
    )


RECOVERY = {
    "synth": {
        "enabled": True, "implicit": True, "path": "data", "n_users": 2000, "n_items": 500,
        "n_ratings": 150_000, "rank": 8, "user_skew": 1.0, "item_skew": 1.0, "seed": 0,
    },
    "data": {"format": "parquet"},
    "store": {"path": "store"},
    "split": {"method": "user", "test": 0.1, "validation": 0.05},
    "model": {"feedback": "implicit", "rank": 8, "reg": 1.0},
    "train": {"iterations": 10, "progress": "off"},
    "output": {"model": "model", "plot": False},
}  # fmt: skip


def _precision_at_10(scores, store, test_users, test_items):
    """Mean precision@10 over the users with test events, train items excluded; brute force."""
    scores = scores.copy()
    for b in range(store.n_blocks("user")):
        blk = store.read_block("user", b)
        rows = np.repeat(np.arange(blk.start, blk.stop), np.diff(blk.indptr))
        scores[rows, blk.cols] = -np.inf
    users = np.unique(test_users)
    top = np.argsort(-scores[users], axis=1, kind="stable")[:, :10]
    rel = np.zeros(scores.shape, dtype=bool)
    rel[test_users, test_items] = True
    return float(np.take_along_axis(rel[users], top, axis=1).sum(axis=1).mean() / 10)


def test_planted_preferences_are_recovered(tmp_path, client):
    """`dmf synth --implicit` events (counts, repeated rows) through `dmf run`: the model's
    precision@10 on held-out events is above 0.08, more than 1.5x the popularity ranking's and
    at least 60% of the planted truth's own ranking (measured: 0.099, 0.055 and 0.137); and
    recommend gives the brute-force top items, train items excluded."""
    import yaml

    from dmf.cli import main
    from dmf.data.synth import load_truth
    from dmf.model.model import Model

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(RECOVERY))
    assert (
        main(["run", str(tmp_path / "job.yaml"), "--address", client.scheduler.address, "-q"]) == 0
    )
    model = Model.load(tmp_path / "model")
    store = Store.open(tmp_path / "store")
    assert model.implicit and model.mu == 0.0
    test = store.read_split("test")
    tu, ti = test.column("user").to_numpy(), test.column("item").to_numpy()
    U, V = model.user_factors.astype(np.float64), model.item_factors.astype(np.float64)
    got = _precision_at_10(U @ V.T, store, tu, ti)
    popularity = store.counts("item").astype(np.float64)
    baseline = _precision_at_10(np.tile(popularity, (store.n_users, 1)), store, tu, ti)
    truth = load_truth(tmp_path / "data")
    uid = store.ids("user").to_numpy().astype(np.int64)
    iid = store.ids("item").to_numpy().astype(np.int64)
    planted = truth["beta"] * truth["U"][uid] @ truth["V"][iid].T + truth["log_popularity"][iid]
    oracle = _precision_at_10(planted, store, tu, ti)
    assert got > 0.08, (got, baseline, oracle)
    assert got > 1.5 * baseline, (got, baseline, oracle)
    assert got > 0.6 * oracle, (got, baseline, oracle)
    # Recommendations are the top of u.v over the items the user has no train event with.
    recs = model.recommend(model.user_ids[:5], n=5, exclude_seen=store, output="pandas")
    cells_u, cells_i = _train_cells(store)
    for user, group in recs.groupby("user"):
        d = int(model.index_of([user], "user")[0])
        seen = set(cells_i[cells_u == d].tolist())
        order = [j for j in np.argsort(-(U[d] @ V.T), kind="stable") if j not in seen][:5]
        got_items = model.index_of(group.sort_values("rank")["item"].to_numpy(), "item")
        assert list(got_items) == order
    # The command line gives every user the same lists, blockwise on the cluster.
    out = tmp_path / "recs.parquet"
    args = ["recommend", str(tmp_path / "model"), "-n", "5", "--out", str(out)]
    assert main([*args, "--address", client.scheduler.address]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pandas()
    assert table["user"].nunique() == store.n_users
    first = table[table["user"].isin(recs["user"])].sort_values(["user", "rank"])
    assert list(first["item"]) == list(recs.sort_values(["user", "rank"])["item"])


def _train_cells(store):
    us, its = [], []
    for b in range(store.n_blocks("user")):
        blk = store.read_block("user", b)
        us.append(np.repeat(np.arange(blk.start, blk.stop), np.diff(blk.indptr)))
        its.append(blk.cols)
    return np.concatenate(us), np.concatenate(its)


def test_python_api_on_events_without_ratings(tmp_path, client):
    """dmf.ALS(feedback="implicit") fits a pandas DataFrame of events with no rating column
    (each row one event, repeats summed): the same factors as the store path on the summed
    counts; fold_in of a new user solves the implicit equations exactly (dense reference)."""
    import pandas as pd
    from reference import implicit_solve_side

    import dmf

    u, i, _ = _events(n_users=50, n_items=30, nnz=400, seed=4)
    reps = np.random.default_rng(1).integers(1, 4, len(u))
    events = pd.DataFrame({"user": np.repeat(u, reps), "item": np.repeat(i, reps)})
    als = dmf.ALS(
        feedback="implicit", alpha=2.0, rank=4, reg=0.3, iterations=3, dtype="float64",
        split__validation=0.0, split__test=0.0, data__columns__rating=None,
        train__progress="off",
    )  # fmt: skip
    model = als.fit(events, client=client, quiet=True)
    assert model.implicit and model.mu == 0.0 and model.rating_range is None
    # The store path on the summed counts gives the same model.
    counts = events.groupby(["user", "item"]).size().reset_index(name="rating")
    again = dmf.ALS(
        feedback="implicit", alpha=2.0, rank=4, reg=0.3, iterations=3, dtype="float64",
        split__validation=0.0, split__test=0.0, train__progress="off",
    ).fit(counts, client=client, quiet=True)  # fmt: skip
    np.testing.assert_array_equal(model.item_factors, again.item_factors)
    # Fold in a new user from raw events (repeats add up).
    items = model.item_ids.to_numpy()[[0, 3, 3, 7]]
    f, b = model.fold_in(items, [1.0, 1.0, 2.0, 1.0])
    row = np.zeros((1, model.n_items))
    row[0, [0, 3, 7]] = [1.0, 3.0, 1.0]
    want, _ = implicit_solve_side(
        row, model.item_factors.astype(np.float64), np.zeros(model.n_items), 0.3, 0.3, 2.0, False
    )
    np.testing.assert_allclose(f, want[0], rtol=1e-8, atol=1e-12)
    assert b == 0.0
