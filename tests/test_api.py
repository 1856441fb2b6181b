"""The Python estimator: dmf.ALS(...).fit(store) -> Model, dmf.load, and the model in use."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import random_ratings

import dmf
from dmf.als.solver import solve_block
from dmf.errors import ConfigError, InputError
from dmf.model.evaluate import evaluate


def test_als_builds_a_checked_config(tmp_path):
    als = dmf.ALS(
        rank=5,
        reg=0.2,
        reg_bias=0.01,
        weighted_reg=True,
        iterations=3,
        output=tmp_path / "m",
        blocks__n_blocks=4,
        train__checkpoint_every=0,
    )
    c = als.config
    assert (c.model.rank, c.model.reg, c.model.reg_bias, c.model.weighted_reg) == (
        5,
        0.2,
        0.01,
        True,
    )
    assert c.train.iterations == 3 and c.blocks.n_blocks == 4 and c.train.checkpoint_every == 0
    assert c.output.model == str(tmp_path / "m")
    with pytest.raises(ConfigError, match="model.reg"):
        dmf.ALS(reg=-1)
    with pytest.raises(ConfigError, match="train.nonsense"):
        dmf.ALS(train__nonsense=1)
    # A base config's other sections survive; the arguments win over its model section.
    base = dmf.ALS(rank=7, split__test=0.3).config
    again = dmf.ALS(rank=2, config=base).config
    assert again.model.rank == 2 and again.split.test == 0.3


def test_fit_predict_recommend_save_load(small_store, client, tmp_path):
    als = dmf.ALS(
        rank=3,
        reg=0.1,
        reg_bias=0.05,
        weighted_reg=False,
        iterations=4,
        output=tmp_path / "model",
        train__checkpoint_every=0,
    )
    model = als.fit(small_store, client=client, quiet=True)
    assert isinstance(model, dmf.Model) and als.model_ is model
    assert model.user_factors.shape == (small_store.n_users, 3)

    loaded = dmf.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.item_factors, model.item_factors)
    users, items = np.arange(10), np.arange(10) % small_store.n_items
    np.testing.assert_allclose(loaded.predict(users, items), model.predict(users, items))

    # Fold-in of a training user reproduces one more user half-iteration for that user.
    block = small_store.read_block("user", 0)
    sol = solve_block(block, model.item_factors, model.item_bias, model.mu, 0.1, 0.05, False)
    lo, hi = block.indptr[0], block.indptr[1]
    f, b = model.fold_in(block.cols[lo:hi], block.vals[lo:hi])
    np.testing.assert_allclose(f, sol.factors[0], rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(float(sol.bias[0]), rel=1e-5, abs=1e-6)

    recs = model.recommend([0, 1], n=5, exclude_seen="store")
    assert recs.num_rows == 10
    seen = set(block.cols[lo:hi].tolist())
    first = recs.filter(pa.compute.equal(recs.column("user"), 0))
    assert not seen & set(first.column("item").to_pylist())

    # The trained model beats predicting the global mean on the test split.
    res = evaluate(model, small_store, client=client)
    test = small_store.read_split("test")
    base = float(np.sqrt(np.mean((test.column("rating").to_numpy() - model.mu) ** 2)))
    assert res["rmse"] < base


# -- ALS.fit on every kind of input ---------------------------------------------------------------
FIT = {
    "rank": 3,
    "reg": 0.1,
    "iterations": 3,
    "blocks__n_blocks": 2,
    "split__test": 0.1,
    "train__progress": "off",
}


def _ratings_frame():
    """Planted ratings with integer ids, sorted by (user, item) as a CSR matrix holds them."""
    import pandas as pd

    u, i, r = random_ratings(70, 30, 900, seed=5)
    order = np.lexsort((i, u))
    return pd.DataFrame({"user": u[order], "item": i[order], "rating": r[order].astype(np.float64)})


def _same_model(a, b):
    assert a.mu == b.mu
    assert a.user_ids.equals(b.user_ids) and a.item_ids.equals(b.item_ids)
    for name in ("user_factors", "user_bias", "item_factors", "item_bias"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_fit_on_every_input_equals_ingest_then_fit_on_the_store_path(client, tmp_path):
    """pandas, Arrow, scipy.sparse and dask inputs give the factors, biases and id order of
    `dmf ingest` on a Parquet file of the same ratings followed by fit on the store path."""
    import dask.dataframe as dd
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from dmf.config import load_config
    from dmf.data.ingest import ingest

    df = _ratings_frame()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "ratings.parquet")
    cfg = load_config(
        raw={
            "data": {"source": str(tmp_path / "ratings.parquet")},
            "store": {"path": str(tmp_path / "store")},
            "split": {"test": 0.1},
            "blocks": {"n_blocks": 2},
        }
    )
    store = ingest(cfg, client=client, progress=False)
    ref = dmf.ALS(**FIT).fit(str(store.path), client=client, quiet=True)
    assert ref.n_users == 70 and ref.n_items == 30

    matrix = sp.csr_matrix((df["rating"], (df["user"], df["item"])), shape=(70, 30))
    inputs = {
        "pandas": df,
        "arrow": pa.Table.from_pandas(df, preserve_index=False),
        "scipy": matrix,
        "dask": dd.from_pandas(df, npartitions=3),
    }
    for name, data in inputs.items():
        model = dmf.ALS(**FIT).fit(data, client=client, quiet=True)
        _same_model(model, ref)
        assert model.store_path != str(store.path), name  # a store of its own, temporary


def test_fit_reads_configured_column_names_and_string_ids(client, tmp_path):
    import pandas as pd

    df = _ratings_frame()
    named = pd.DataFrame(
        {
            "rating_value": df["rating"],
            "customer": [f"c{k:03d}" for k in df["user"]],
            "sku": df["item"].astype(str).radd("s"),
        }
    )
    als = dmf.ALS(
        **FIT,
        data__columns__user="customer",
        data__columns__item="sku",
        data__columns__rating="rating_value",
        store=tmp_path / "kept-store",
    )
    model = als.fit(named, client=client, quiet=True)
    # The store is where it was asked to be, and stays.
    assert model.store_path == str(tmp_path / "kept-store")
    assert dmf.Store.open(tmp_path / "kept-store").n_users == 70
    assert model.user_ids.to_pylist() == sorted(named["customer"].unique())
    assert model.predict(["c001"], ["s3"]).shape == (1,)
    with pytest.raises(InputError, match="data.columns.user"):
        dmf.ALS(**FIT).fit(df.rename(columns={"user": "who"}), client=client)
    # Columns by position, in an order other than user, item, rating: a pandas frame and the
    # same table in Arrow give the model of the plain frame (positions count in the input's
    # own order).
    shuffled = df[["item", "rating", "user"]]
    by_position = {"data__columns__user": 2, "data__columns__item": 0, "data__columns__rating": 1}
    plain = dmf.ALS(**FIT).fit(df, client=client, quiet=True)
    for data in (shuffled, pa.Table.from_pandas(shuffled, preserve_index=False)):
        got = dmf.ALS(**FIT, **by_position).fit(data, client=client, quiet=True)
        assert got.user_ids.to_pylist() == plain.user_ids.to_pylist()
        np.testing.assert_array_equal(got.user_factors, plain.user_factors)
        np.testing.assert_array_equal(got.item_bias, plain.item_bias)
    # No ratings are read from the leftover Parquet input: nothing beside the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept-store"]


# -- where a fit writes -------------------------------------------------------------------------
def test_fit_writes_a_model_directory_only_when_asked(client, small_store, tmp_path, monkeypatch):
    import gc
    import json
    import tempfile

    work, scratch = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    params = {"rank": 2, "iterations": 2, "train__progress": "off"}

    # Not asked (the config's default output.model, runs/model, does not count): nothing.
    model = dmf.ALS(**params).fit(small_store, client=client, quiet=True)
    assert model.path is None and model.users.in_memory
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []

    # A config file that does not name output.model: still nothing.
    (work / "plain.yaml").write_text("model: {rank: 2}\ntrain: {iterations: 1}\n")
    dmf.ALS(config=work / "plain.yaml").fit(small_store, client=client, quiet=True)
    assert sorted(p.name for p in work.iterdir()) == ["plain.yaml"]

    # Asked: output=, or output.model in a config file (relative to the file), or save().
    m1 = dmf.ALS(**params, output="m1").fit(small_store, client=client, quiet=True)
    assert (work / "m1" / "model.json").is_file() and m1.path == str(work / "m1")
    (work / "sub").mkdir()
    (work / "sub" / "out.yaml").write_text("output: {model: m2}\ntrain: {iterations: 1}\n")
    dmf.ALS(config=work / "sub" / "out.yaml").fit(small_store, client=client, quiet=True)
    assert (work / "sub" / "m2" / "model.json").is_file()
    model.save("m3")
    assert dmf.load("m3").path == str(work / "m3")
    np.testing.assert_array_equal(dmf.load("m3").user_factors, model.user_factors)

    # In-memory input without store=: the store is temporary, kept while the model lives
    # (exclude_seen="store" reads it), not recorded in a saved model, removed with the model.
    df = _ratings_frame()
    model = dmf.ALS(**params).fit(df, client=client, quiet=True)
    [kept] = scratch.iterdir()
    assert model.store_path.startswith(str(kept)) and dmf.Store.open(model.store_path).n_users == 70
    assert model.recommend([0], n=3, exclude_seen="store").num_rows == 3
    model.save("m4")
    assert json.loads((work / "m4" / "model.json").read_text())["store_path"] == ""
    # The same with output= asked for: the model directory does not name the temporary store.
    m5 = dmf.ALS(**params, output="m5").fit(df, client=client, quiet=True)
    assert json.loads((work / "m5" / "model.json").read_text())["store_path"] == ""
    np.testing.assert_array_equal(dmf.load("m5").user_factors, m5.user_factors)
    del m5
    del model
    gc.collect()
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in work.iterdir()) == ["m1", "m3", "m4", "m5", "plain.yaml", "sub"]


# -- scikit-learn's conventions, the callback ----------------------------------------------------
def test_get_params_set_params_and_repr():
    als = dmf.ALS(rank=4, iterations=2, train__tolerance=1e-4)
    params = als.get_params(deep=True)
    assert params["rank"] == 4 and params["iterations"] == 2 and params["reg"] is None
    assert params["train__tolerance"] == 1e-4 and params["callback"] is None
    again = dmf.ALS(**params)  # what sklearn.base.clone does
    assert again.config == als.config and again.get_params() == params
    assert repr(als) == "ALS(rank=4, iterations=2, train__tolerance=0.0001)"

    assert als.set_params(reg=0.3, blocks__n_blocks=3) is als
    assert (als.config.model.reg, als.config.blocks.n_blocks, als.config.model.rank) == (0.3, 3, 4)
    # Validated again; a bad value is refused and changes nothing.
    with pytest.raises(ConfigError, match="model.rank"):
        als.set_params(rank=-1, reg=0.5)
    assert als.rank == 4 and als.reg == 0.3 and als.config.model.reg == 0.3
    with pytest.raises(ConfigError, match="no parameter 'rnak'"):
        als.set_params(rnak=3)
    # A base config's values stay unless an argument sets them.
    base = dmf.ALS(rank=7, reg=0.02, split__test=0.3).config
    c = dmf.ALS(reg=0.5, config=base).config
    assert (c.model.rank, c.model.reg, c.split.test) == (7, 0.5, 0.3)


def test_callback_sees_each_iteration_and_can_stop_training(client, small_store):
    seen = []

    def stop_after_two(rec):
        seen.append(rec)
        return rec["iteration"] == 2

    als = dmf.ALS(rank=2, iterations=6, callback=stop_after_two, train__progress="off")
    model = als.fit(small_store, client=client, quiet=True)
    assert [r["iteration"] for r in seen] == [1, 2] and len(model.history) == 2
    assert seen[1]["objective"] == model.history[1]["objective"]
    seen[0]["iteration"] = 99  # a copy: the model's history is untouched
    assert model.history[0]["iteration"] == 1
    # fit(callback=...) wins over the constructor's.
    other = []
    als.fit(small_store, client=client, quiet=True, callback=other.append)
    assert len(other) == 6 and len(seen) == 2


def test_a_model_fitted_on_a_dataframe_pickles(client):
    import pickle

    model = dmf.ALS(rank=2, iterations=1, train__progress="off").fit(
        _ratings_frame(), client=client, quiet=True
    )
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy.predict([1, 2], [3, 4]), model.predict([1, 2], [3, 4]))
    assert copy._scratch is None and model._scratch is not None
