"""Model methods: predict (and cold start), fold-in, similar items; `dmf predict` and `dmf similar`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import random_ratings

from dmf.als.solver import solve_block
from dmf.cli import main
from dmf.errors import InputError, ModelError
from dmf.model.model import Model, load
from dmf.store.layout import store_from_arrays


def random_model(store, rank=3, seed=0, reg=0.1, reg_bias=None, weighted_reg=False, dtype=None):
    """A model over ``store``'s ids with random factors and biases (as if trained)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype or np.float32)
    return Model(
        mu=store.mu,
        user_ids=store.ids("user"),
        item_ids=store.ids("item"),
        user_factors=rng.normal(0, 0.5, (store.n_users, rank)).astype(dt),
        user_bias=rng.normal(0, 0.3, store.n_users).astype(dt),
        item_factors=rng.normal(0, 0.5, (store.n_items, rank)).astype(dt),
        item_bias=rng.normal(0, 0.3, store.n_items).astype(dt),
        config={
            "model": {"rank": rank, "reg": reg, "reg_bias": reg_bias, "weighted_reg": weighted_reg}
        },
        store_fingerprint=store.fingerprint,
        store_path=str(store.path),
    )


@pytest.fixture
def str_store(tmp_path):
    """30 users 'u0'.. x 20 items 'i0'.. with string raw ids, 2 blocks a side."""
    u, i, r = random_ratings(30, 20, 250, seed=3)
    return store_from_arrays(
        tmp_path / "sstore",
        u,
        i,
        r,
        n_users=30,
        n_items=20,
        n_blocks=2,
        user_ids=pa.array([f"u{k}" for k in range(30)]),
        item_ids=pa.array([f"i{k}" for k in range(20)]),
    )


def _factors_from_files(path):
    """Read the saved factor files directly (not through Model.load): the files model.json
    lists."""
    files = json.loads((path / "model.json").read_text())["files"]
    out = {}
    for side in ("user", "item"):
        t = pq.read_table(path / files[f"{side}_factors/part-00000.parquet"]["path"])
        f = np.array(t.column("factors").to_pylist(), dtype=np.float64)
        out[side] = (t.column("id").to_pylist(), t.column("bias").to_numpy().astype(np.float64), f)
    return out


def test_predict_equals_saved_factors(small_store, tmp_path):
    model = random_model(small_store, rank=4, seed=1)
    model.save(tmp_path / "model", plot=False)
    loaded = load(tmp_path / "model")
    f = _factors_from_files(tmp_path / "model")
    uid, b, uf = f["user"]
    iid, c, vf = f["item"]
    rng = np.random.default_rng(0)
    pu = rng.integers(0, len(uid), 500)
    pi = rng.integers(0, len(iid), 500)
    users = [uid[k] for k in pu]
    items = [iid[k] for k in pi]
    expected = small_store.mu + b[pu] + c[pi] + np.einsum("ij,ij->i", uf[pu], vf[pi])
    got = loaded.predict(users, items)
    assert got.shape == (500,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_predict_cold_start_fallback_and_drop(str_store):
    m = random_model(str_store, seed=2)
    users = ["u1", "nobody", "u2", "nobody"]
    items = ["i3", "i4", "zzz", "zzz"]
    p = m.predict(users, items, return_info=True)
    assert not np.any(np.isnan(p.scores))
    u1, u2, i3, i4 = 1, 2, 3, 4
    exp0 = m.mu + m.user_bias[u1] + m.item_bias[i3] + float(m.user_factors[u1] @ m.item_factors[i3])
    np.testing.assert_allclose(
        p.scores, [exp0, m.mu + m.item_bias[i4], m.mu + m.user_bias[u2], m.mu], rtol=1e-6
    )
    assert (p.cold_users, p.cold_items, p.cold_pairs) == (2, 2, 3)
    assert p.known.tolist() == [True, False, False, False]

    d = m.predict(users, items, cold_start="drop", return_info=True)
    assert d.known.tolist() == [True, False, False, False]
    np.testing.assert_allclose(d.scores, [exp0], rtol=1e-6)
    assert d.cold_pairs == 3
    np.testing.assert_allclose(m.predict(users, items, cold_start="drop"), [exp0], rtol=1e-6)

    with pytest.raises(InputError, match="cold_start"):
        m.predict(users, items, cold_start="nan")


def test_predict_accepts_numpy_arrow_and_text_ids(small_store):
    m = random_model(small_store)
    a = m.predict(np.array([3, 7]), np.array([1, 2]))
    b = m.predict(pa.array([3, 7]), pa.chunked_array([[1], [2]]))
    c = m.predict(["3", "7"], ["1", "2"])  # integer ids read from text
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # Text that is no integer cannot be one of this model's ids: an unknown user, predicted
    # from the item's bias like any other (a bad row must not stop a whole file).
    p = m.predict(["x", " 3 "], ["1", "1"], return_info=True)
    assert p.cold_users == 1 and list(p.known) == [False, True]
    assert p.scores[0] == pytest.approx(m.mu + m.item_bias[m.index_of([1], "item")[0]])
    assert p.scores[1] == pytest.approx(m.predict([3], [1])[0])
    with pytest.raises(ModelError, match="pairwise"):
        m.predict([1, 2], [1])


@pytest.mark.parametrize("weighted", [False, True])
def test_fold_in_equals_one_more_user_half_iteration(str_store, weighted):
    m = random_model(str_store, rank=3, seed=4, reg=0.3, reg_bias=0.05, weighted_reg=weighted)
    block = str_store.read_block("user", 1)
    sol = solve_block(block, m.item_factors, m.item_bias, m.mu, 0.3, 0.05, weighted)
    item_ids = str_store.ids("item")
    for row in (0, block.n_rows - 1):
        lo, hi = block.indptr[row], block.indptr[row + 1]
        assert hi > lo
        items = item_ids.take(pa.array(block.cols[lo:hi]))
        # Given in a different order than the store's: the solution must not depend on it.
        f, bias = m.fold_in(items[::-1], block.vals[lo:hi][::-1])
        assert f.shape == (3,)
        np.testing.assert_allclose(f, sol.factors[row], rtol=1e-5, atol=1e-6)
        assert bias == pytest.approx(float(sol.bias[row]), rel=1e-5, abs=1e-6)


def test_fold_in_unknown_items_ignored_and_duplicates_refused(str_store):
    m = random_model(str_store, reg=0.2)
    f1, b1 = m.fold_in(["i1", "i5"], [4.0, 2.0])
    f2, b2 = m.fold_in(["i1", "new-item", "i5"], [4.0, 5.0, 2.0])
    np.testing.assert_array_equal(f1, f2)
    assert b1 == b2
    f0, b0 = m.fold_in(["nothing"], [3.0])
    assert not np.any(f0) and b0 == 0.0
    with pytest.raises(InputError, match="more than once"):
        m.fold_in(["i1", "i1"], [4.0, 2.0])
    with pytest.raises(InputError, match="ratings"):
        m.fold_in(["i1", "i2"], [4.0])


def test_recommend_for_ratings_matches_brute_force(str_store):
    m = random_model(str_store, reg=0.2)
    items, ratings = ["i2", "i7", "i9"], [5.0, 1.0, 4.0]
    f, b = m.fold_in(items, ratings)
    scores = m.mu + b + m.item_bias.astype(np.float64) + m.item_factors.astype(np.float64) @ f
    scores[[2, 7, 9]] = -np.inf
    want = np.argsort(-scores, kind="stable")[:5]
    recs = m.recommend_for_ratings(items, ratings, n=5)
    assert recs.column("item").to_pylist() == [f"i{k}" for k in want]
    assert recs.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(recs.column("score").to_numpy(), scores[want], rtol=1e-5)


def test_similar_items_by_cosine(str_store):
    m = random_model(str_store, rank=4, seed=5)
    m.item_factors[6] = 0.0  # an item without ratings: no direction, never similar
    v = m.item_factors.astype(np.float64)
    norm = np.linalg.norm(v, axis=1)
    t = m.similar_items(["i3", "i0"], n=4)
    assert t.column_names == ["item", "rank", "similar", "score"]
    for q, qi in (("i3", 3), ("i0", 0)):
        cos = np.full(m.n_items, -np.inf)
        ok = norm > 0
        cos[ok] = v[ok] @ v[qi] / (norm[ok] * norm[qi])
        cos[qi] = -np.inf
        want = np.argsort(-cos, kind="stable")[:4]
        rows = t.filter(pa.compute.equal(t.column("item"), q))
        assert rows.column("similar").to_pylist() == [f"i{k}" for k in want]
        np.testing.assert_allclose(rows.column("score").to_numpy(), cos[want], rtol=1e-5)
        assert "i6" not in rows.column("similar").to_pylist()
    # An unknown query item gets no rows, and is reported as every call reports it.
    t2, info = m.similar_items(["i3", "nope"], n=4, return_info=True)
    first = t.filter(pa.compute.equal(t.column("item"), "i3"))
    assert t2.column("item").to_pylist() == ["i3"] * 4
    assert t2.column("similar").to_pylist() == first.column("similar").to_pylist()
    assert (info.total, info.cold, info.cold_items, info.handled) == (2, 1, 1, "dropped")
    assert (
        str(info)
        == "similar_items: 2 items, 1 cold-start (0 unknown users, 1 unknown items) dropped"
    )


def test_similar_items_needs_factors(small_store):
    m = random_model(small_store, rank=0)
    with pytest.raises(ModelError, match="rank 0"):
        m.similar_items([1])


# -- command line -------------------------------------------------------------------------------
def test_cli_predict_csv_and_parquet(str_store, tmp_path, capsys):
    m = random_model(str_store, seed=6)
    m.save(tmp_path / "model", plot=False)
    pairs = pa.table({"user": ["u1", "u2", "ghost"], "item": ["i3", "i4", "i5"]})
    pcsv.write_csv(pairs, tmp_path / "pairs.csv")
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    expected = m.predict(["u1", "u2", "ghost"], ["i3", "i4", "i5"])

    assert main(["predict", str(tmp_path / "model"), "--pairs", str(tmp_path / "pairs.csv")]) == 0
    out, err = capsys.readouterr()
    got = pcsv.read_csv(pa.py_buffer(out.encode()))
    assert got.column("user").to_pylist() == ["u1", "u2", "ghost"]
    np.testing.assert_allclose(got.column("score").to_numpy(), expected, rtol=1e-6)
    assert "1 cold-start" in err

    rc = main(
        [
            "predict",
            str(tmp_path / "model"),
            "--pairs",
            str(tmp_path / "pairs.parquet"),
            "--out",
            str(tmp_path / "scores.parquet"),
            "--cold-start",
            "drop",
        ]
    )
    assert rc == 0
    t = pq.read_table(tmp_path / "scores.parquet")
    assert t.column("user").to_pylist() == ["u1", "u2"]
    np.testing.assert_allclose(t.column("score").to_numpy(), expected[:2], rtol=1e-6)


def test_cli_predict_bad_file_names_column(str_store, tmp_path, capsys):
    random_model(str_store).save(tmp_path / "model", plot=False)
    pcsv.write_csv(pa.table({"uid": ["u1"], "item": ["i1"]}), tmp_path / "bad.csv")
    rc = main(["predict", str(tmp_path / "model"), "--pairs", str(tmp_path / "bad.csv")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "'user'" in err


def test_cli_similar(str_store, tmp_path, capsys):
    m = random_model(str_store, seed=7)
    m.save(tmp_path / "model", plot=False)
    assert main(["similar", str(tmp_path / "model"), "--items", "i2,i5", "-n", "3"]) == 0
    got = pcsv.read_csv(pa.py_buffer(capsys.readouterr().out.encode()))
    want = m.similar_items(["i2", "i5"], n=3)
    assert got.column("similar").to_pylist() == want.column("similar").to_pylist()
    assert got.num_rows == 6


@pytest.mark.parametrize("ids", ["int", "sorted-strings", "unsorted-strings"])
def test_a_model_read_block_by_block_answers_as_the_model_in_memory(tmp_path, client, ids):
    """A model whose user side stays on disk (read block by block, as for a model too large for
    one process) predicts, recommends and evaluates exactly as the same model in memory."""
    from dmf.config import load_config
    from dmf.model.evaluate import evaluate
    from dmf.model.recommend import recommend_all
    from dmf.train.loop import train

    n_users, n_items = 90, 40
    u, i, r = random_ratings(n_users, n_items, 1600, seed=21)
    test = np.arange(len(u)) % 7 == 0
    user_ids = {
        "int": None,
        "sorted-strings": pa.array([f"u{k:03d}" for k in range(n_users)]),
        "unsorted-strings": pa.array([f"u{k}" for k in range(n_users)]),  # "u10" < "u2"
    }[ids]
    store = store_from_arrays(
        tmp_path / "s", u[~test], i[~test], r[~test], n_users=n_users, n_items=n_items,
        n_blocks=3, held_out={"test": (u[test], i[test], r[test])}, user_ids=user_ids,
    )  # fmt: skip
    cfg = load_config(
        raw={
            "model": {"rank": 4, "reg": 0.1},
            "train": {"iterations": 2, "checkpoint_every": 0, "progress": "off"},
            "output": {"model": str(tmp_path / "m"), "plot": False},
        }
    )
    train(store, cfg, client=client, quiet=True)
    mem = load(tmp_path / "m", in_memory=True)
    disk = load(tmp_path / "m", in_memory=False)
    assert not disk.users.in_memory and disk.users.n_blocks == 3
    if ids != "unsorted-strings":
        assert disk.users.first_ids is not None  # an id's block is found without the others
    some = mem.user_ids.take(pa.array([0, 44, 89, 3])).to_pylist() + ["stranger"]
    items = mem.item_ids.take(pa.array([1, 2, 3, 39, 0])).to_pylist()
    np.testing.assert_array_equal(disk.index_of(some, "user"), mem.index_of(some, "user"))
    np.testing.assert_array_equal(disk.predict(some, items), mem.predict(some, items))
    assert disk.recommend(some, n=5, exclude_seen=store).equals(
        mem.recommend(some, n=5, exclude_seen=store)
    )
    everyone = recommend_all(disk, store, n=3, client=client)
    assert everyone.equals(recommend_all(mem, store, n=3, client=client))
    assert evaluate(disk, store, client=client) == evaluate(mem, store, client=client)
    # Pairs scored block by block on the cluster (dmf predict with a model on disk).
    from dmf.model.predict import predict_batches

    pairs = pa.table(
        {
            "user": pa.array([str(x) for x in some] * 3),
            "item": pa.array([str(x) for x in items[:4] + ["nope"]] * 3),
        }
    )
    for policy in ("fallback", "drop"):
        got = [p for _, p in predict_batches(disk, iter([pairs]), policy, client)][0]
        want = mem.predict(pairs["user"], pairs["item"], policy, return_info=True)
        np.testing.assert_array_equal(got.known, want.known)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12)
        assert (got.cold_users, got.cold_items) == (want.cold_users, want.cold_items)
    # The top users of items and similar users, the user side streamed block by block on the
    # cluster: as in memory.
    q_items = items[:3] + ["nope"]
    for kw in ({}, {"exclude_seen": store, "exclude": some[:2]}):
        got = disk.recommend_users(q_items, n=6, client=client, **kw)
        want = mem.recommend_users(q_items, n=6, **kw)
        assert got.drop_columns("score").equals(want.drop_columns("score"))
        np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-6)
    got = disk.similar_users(some, n=4, client=client)
    assert got.drop_columns("score").equals(mem.similar_users(some, n=4).drop_columns("score"))
    assert not disk.users.in_memory  # none of the above read the whole user side
    np.testing.assert_array_equal(disk.user_factors, mem.user_factors)  # this one does


# -- one way to report unknown ids, in every call ---------------------------------------------
def test_every_call_reports_unknown_ids_the_same_way(str_store, caplog):
    import logging

    m = random_model(str_store, seed=8)
    caplog.set_level(logging.INFO, logger="dmf")
    calls = {
        "predict": lambda: (
            m.predict(["u1", "ghost", "u2"], ["i1", "i2", "zzz"], return_info=True).cold_start
        ),
        "recommend": lambda: m.recommend(["u1", "ghost"], n=3, exclude=["zzz"], return_info=True)[
            1
        ],
        "recommend_users": lambda: m.recommend_users(
            ["i1", "zzz", "yyy"], n=3, cold_start="drop", return_info=True
        )[1],
        "similar_items": lambda: m.similar_items(["i1", "zzz"], n=3, return_info=True)[1],
        "similar_users": lambda: m.similar_users(["ghost", "u3"], n=3, return_info=True)[1],
        "fold_in": lambda: m.fold_in(["i1", "zzz", "i4"], [4.0, 2.0, 1.0], return_info=True)[2],
    }
    want = {
        "predict": "3 pairs, 2 cold-start (1 unknown users, 1 unknown items) predicted from biases",
        "recommend": "2 users, 1 cold-start (1 unknown users, 1 unknown items) predicted from biases",
        "recommend_users": "3 items, 2 cold-start (0 unknown users, 2 unknown items) dropped",
        "similar_items": "2 items, 1 cold-start (0 unknown users, 1 unknown items) dropped",
        "similar_users": "2 users, 1 cold-start (1 unknown users, 0 unknown items) dropped",
        "fold_in": "3 ratings, 1 cold-start (0 unknown users, 1 unknown items) dropped",
    }
    for name, call in calls.items():
        caplog.clear()
        info = call()
        assert str(info) == f"{name}: {want[name]}", name
        assert [r.getMessage() for r in caplog.records] == [f"dmf {name}: {want[name]}"], name
    # Known ids only: nothing is logged, and the report says so.
    caplog.clear()
    _, info = m.recommend(["u1"], n=2, return_info=True)
    assert not info.any and caplog.records == []
    # The fallback rows are there, and so are the known users' (no exception, no silent drop).
    t = m.recommend(["u1", "ghost"], n=3)
    assert t.column("user").to_pylist() == ["u1"] * 3 + ["ghost"] * 3


def test_outputs_arrow_or_pandas(str_store):
    import pandas as pd

    m = random_model(str_store, seed=9)
    scores = m.predict(["u1", "u2"], ["i1", "i2"])
    assert isinstance(scores, np.ndarray)
    s = m.predict(["u1", "u2"], ["i1", "i2"], output="pandas")
    assert isinstance(s, pd.Series) and s.name == "score" and s.tolist() == scores.tolist()
    assert m.predict(["u1", "u2"], ["i1", "i2"], output="arrow").to_pylist() == scores.tolist()
    for call in (
        lambda o: m.recommend(["u1", "u2"], n=3, output=o),
        lambda o: m.recommend_users(["i1"], n=3, output=o),
        lambda o: m.similar_items(["i1"], n=3, output=o),
        lambda o: m.similar_users(["u1"], n=3, output=o),
        lambda o: m.recommend_for_ratings(["i1"], [5.0], n=3, output=o),
    ):
        table, frame = call("arrow"), call("pandas")
        assert isinstance(table, pa.Table) and isinstance(frame, pd.DataFrame)
        assert frame.to_dict("list") == table.to_pydict()
    with pytest.raises(InputError, match="output"):
        m.recommend(["u1"], output="polars")


def test_repr_is_short(tmp_path):
    n = 200_000
    m = Model(
        mu=3.0,
        user_ids=pa.array(np.arange(n)),
        item_ids=pa.array(np.arange(50)),
        user_factors=np.zeros((n, 8), np.float32),
        user_bias=np.zeros(n, np.float32),
        item_factors=np.zeros((50, 8), np.float32),
        item_bias=np.zeros(50, np.float32),
    )
    want = (
        "Model(rank=8, users=200,000, items=50, dtype=float32, iterations=0, path=None (in memory))"
    )
    assert repr(m) == want and str(m) == want
    m.save(tmp_path / "m", plot=False)
    assert repr(load(tmp_path / "m")) == want.replace("None (in memory)", repr(str(tmp_path / "m")))


# -- clipping to the rating range ------------------------------------------------------------------
def test_predictions_are_clipped_to_the_rating_range(str_store, tmp_path):
    m = random_model(str_store, rank=3, seed=10)
    m.user_factors[:] *= 6  # predictions well outside [1, 5]
    users = [f"u{k}" for k in range(30)] + ["ghost"]
    items = [f"i{k % 20}" for k in range(30)] + ["i0"]
    uf, vf = m.user_factors.astype(np.float64), m.item_factors.astype(np.float64)
    k = np.arange(30)
    raw = m.mu + m.user_bias[k] + m.item_bias[k % 20] + np.einsum("ij,ij->i", uf[k], vf[k % 20])
    raw = np.append(raw, m.mu + m.item_bias[0])
    assert raw.min() < 1 and raw.max() > 5

    # A model that records no rating range (older models): never clipped.
    np.testing.assert_allclose(m.predict(users, items), raw, rtol=1e-6)
    m.meta["rating_range"] = [1.0, 5.0]  # what the trainer writes into model.json
    assert m.rating_range == (1.0, 5.0) and m.clip
    np.testing.assert_allclose(m.predict(users, items), np.clip(raw, 1, 5), rtol=1e-6)
    np.testing.assert_allclose(m.predict(users, items, clip=False), raw, rtol=1e-6)
    idx_u, idx_i = m.index_of(users, "user"), m.index_of(items, "item")
    np.testing.assert_allclose(m.predict_indices(idx_u, idx_i), np.clip(raw, 1, 5), rtol=1e-6)
    # Off for the model, on for one call; the config's model.clip sets the model's default.
    m.clip = False
    np.testing.assert_allclose(m.predict(users, items), raw, rtol=1e-6)
    np.testing.assert_allclose(m.predict(users, items, clip=True), np.clip(raw, 1, 5), rtol=1e-6)
    m.clip = True
    # Saved and loaded: the range and the setting travel in model.json.
    m.config["model"]["clip"] = False
    m.save(tmp_path / "m", plot=False)
    loaded = load(tmp_path / "m")
    assert loaded.rating_range == (1.0, 5.0) and loaded.clip is False
    np.testing.assert_allclose(loaded.predict(users, items), raw, rtol=1e-6)
    # Ranking is unaffected: recommend scores are the raw ones.
    rec = m.recommend(["u0"], n=20)
    s = m.mu + m.user_bias[0] + m.item_bias.astype(np.float64) + vf @ uf[0]
    np.testing.assert_allclose(
        rec.column("score").to_numpy(), np.sort(s)[::-1], rtol=1e-5, atol=1e-5
    )


# -- single calls are fast on a large model --------------------------------------------------------
def test_single_calls_are_fast_on_a_200k_user_model():
    """The id lookups are built once per model: later calls cost what their own ids cost."""
    import time

    n, n_items, rank = 200_000, 300, 16
    rng = np.random.default_rng(0)
    m = Model(
        mu=3.5,
        user_ids=pa.array([f"user-{k:07d}" for k in rng.permutation(n)]),
        item_ids=pa.array(np.arange(n_items) * 7),
        user_factors=rng.normal(size=(n, rank)).astype(np.float32),
        user_bias=np.zeros(n, np.float32),
        item_factors=rng.normal(size=(n_items, rank)).astype(np.float32),
        item_bias=np.zeros(n_items, np.float32),
        config={"model": {"rank": rank, "reg": 0.1}},
    )
    user = m.user_ids[12345].as_py()
    m.predict([user], [7])  # builds the lookups
    m.recommend([user], n=10)
    m.fold_in([7, 14], [4.0, 2.0])

    def best_of(call, repeats=5):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return min(times)

    assert best_of(lambda: m.predict([user], [7])) < 0.05
    assert best_of(lambda: m.recommend([user], n=10)) < 0.05
    assert best_of(lambda: m.fold_in([7, 14], [4.0, 2.0])) < 0.05
