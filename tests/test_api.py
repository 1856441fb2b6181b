"""The Python estimator: dmf.ALS(...).fit(store) -> Model, dmf.load, and the model in use."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import dmf
from dmf.als.solver import solve_block
from dmf.errors import ConfigError
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

    recs = model.recommend([0, 1], n=5, exclude="store")
    assert recs.num_rows == 10
    seen = set(block.cols[lo:hi].tolist())
    first = recs.filter(pa.compute.equal(recs.column("user"), 0))
    assert not seen & set(first.column("item").to_pylist())

    # The trained model beats predicting the global mean on the test split.
    res = evaluate(model, small_store, client=client)
    test = small_store.read_split("test")
    base = float(np.sqrt(np.mean((test.column("rating").to_numpy() - model.mu) ** 2)))
    assert res["rmse"] < base
