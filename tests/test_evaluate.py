"""Evaluation: metrics against numbers worked out by hand on a tiny case; `dmf evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from conftest import random_ratings
from test_model import random_model

from dmf.cli import main
from dmf.errors import StoreError
from dmf.model.evaluate import evaluate, ranking_from_hits
from dmf.model.model import Model
from dmf.store.layout import store_from_arrays


@pytest.fixture
def tiny(tmp_path):
    """4 users x 5 items, rank 1, mu = 3 and no biases, so every score is 3 + u * v.

    v = [0.5, 0.4, 0.3, 0.2, 0.1]; u = [1, 1, -1, 0] (user 3 has no train ratings: cold).
    Train: user 0 rated item 0; user 1 items 1-4 (every item has a train rating); user 2 item 0.
    Test (user, item, rating):
        (0, 1, 5.0) (0, 3, 4.0) (0, 2, 2.0)   user 0: relevant {1, 3}
        (1, 0, 3.0)                           user 1: nothing relevant
        (2, 3, 4.5)                           user 2: relevant {3}
        (3, 2, 4.0)                           user 3 (cold): relevant {2}
    """
    store = store_from_arrays(
        tmp_path / "tiny",
        np.array([0, 1, 1, 1, 1, 2]),
        np.array([0, 1, 2, 3, 4, 0]),
        np.array([4.0, 2.0, 3.0, 3.0, 3.0, 3.0]),  # mean 3.0
        n_users=4,
        n_items=5,
        n_blocks=2,
        held_out={
            "test": (
                np.array([0, 0, 0, 1, 2, 3]),
                np.array([1, 3, 2, 0, 3, 2]),
                np.array([5.0, 4.0, 2.0, 3.0, 4.5, 4.0]),
            )
        },
        user_ids=pa.array(["a", "b", "c", "d"]),
    )
    assert store.mu == 3.0
    model = Model(
        mu=3.0,
        user_ids=store.ids("user"),
        item_ids=store.ids("item"),
        user_factors=np.array([[1.0], [1.0], [-1.0], [0.0]]),
        user_bias=np.zeros(4),
        item_factors=np.array([[0.5], [0.4], [0.3], [0.2], [0.1]]),
        item_bias=np.zeros(5),
        store_fingerprint=store.fingerprint,
        store_path=str(store.path),
    )
    return store, model


# By hand, k = 2. Predictions 3 + u v and errors:
#   (0,1) 3.4 -> 1.6   (0,3) 3.2 -> 0.8   (0,2) 3.3 -> -1.3   (1,0) 3.5 -> -0.5
#   (2,3) 2.8 -> 1.7   (3,2) cold: mu + c = 3.0 -> 1.0
# Top-2 lists without train items:
#   user 0 (item 0 seen): 1, 2      hits [1, 0], |R| = 2
#   user 2 (item 0 seen, ranks by -v): 4, 3   hits [0, 1], |R| = 1
#   user 3 (cold, all scores 3.0: ties by index): 0, 1   hits [0, 0], |R| = 1
L3 = math.log2(3)
KNOWN = {
    "sse": 1.6**2 + 0.8**2 + 1.3**2 + 0.5**2 + 1.7**2,
    "sae": 1.6 + 0.8 + 1.3 + 0.5 + 1.7,
    # per ranked user: precision, recall, ndcg, ap
    "users": [(1 / 2, 1 / 2, 1 / (1 + 1 / L3), 1 / 2), (1 / 2, 1.0, 1 / L3, 1 / 2)],
}
COLD_USER = (0.0, 0.0, 0.0, 0.0)


def _check(res, pairs_sse, pairs_sae, n, users):
    assert res["n"] == n
    assert res["rmse"] == pytest.approx(math.sqrt(pairs_sse / n), rel=1e-6)
    assert res["mae"] == pytest.approx(pairs_sae / n, rel=1e-6)
    assert res["n_users_ranked"] == len(users)
    for j, name in enumerate(("precision", "recall", "ndcg", "map")):
        assert res[name] == pytest.approx(np.mean([u[j] for u in users]), rel=1e-9), name


@pytest.mark.parametrize("use_client", [False, True])
def test_tiny_case_by_hand(tiny, request, use_client):
    store, model = tiny
    client = request.getfixturevalue("client") if use_client else None
    res = evaluate(model, store, k=2, threshold=4.0, client=client)
    _check(res, KNOWN["sse"] + 1.0, KNOWN["sae"] + 1.0, 6, [*KNOWN["users"], COLD_USER])
    assert (res["cold_pairs"], res["cold_users"], res["cold_items"]) == (1, 1, 0)

    drop = evaluate(model, store, k=2, threshold=4.0, cold_start="drop", client=client)
    _check(drop, KNOWN["sse"], KNOWN["sae"], 5, KNOWN["users"])
    assert drop["cold_pairs"] == 1 and drop["n_heldout"] == 6


def test_threshold_and_k_change_the_relevant_sets(tiny):
    store, model = tiny
    # threshold 5: only (0, 1) is relevant; user 0's top-1 is item 1: every metric is 1.
    res = evaluate(model, store, k=1, threshold=5.0)
    assert res["n_users_ranked"] == 1
    assert [res[m] for m in ("precision", "recall", "ndcg", "map")] == [1.0, 1.0, 1.0, 1.0]
    off = evaluate(model, store, ranking=False)
    assert off["precision"] is None and off["rmse"] == pytest.approx(res["rmse"])


def test_ranking_from_hits_definitions():
    hits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    m = ranking_from_hits(hits, np.array([4, 1]), 3)
    assert m["precision"].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert m["recall"].tolist() == pytest.approx([2 / 4, 1.0])
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / idcg0)
    assert m["ndcg"][1] == pytest.approx(1.0)
    assert m["map"][0] == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert m["map"][1] == pytest.approx(1.0)


def test_evaluate_against_another_store_by_raw_ids(tiny, tmp_path):
    """A store whose dense indices differ from the model's: raw ids connect them."""
    store, model = tiny
    # Same ratings, users listed in reverse order in the new store's id map.
    perm = np.array([3, 2, 1, 0])  # new index of old user k
    other = store_from_arrays(
        tmp_path / "other",
        perm[[0, 1, 1, 1, 1, 2]],
        np.array([0, 1, 2, 3, 4, 0]),
        np.array([4.0, 2.0, 3.0, 3.0, 3.0, 3.0]),
        n_users=4,
        n_items=5,
        held_out={
            "test": (
                perm[[0, 0, 0, 1, 2]],
                np.array([1, 3, 2, 0, 3]),
                np.array([5.0, 4.0, 2.0, 3.0, 4.5]),
            )
        },
        user_ids=pa.array(["d", "c", "b", "a"]),
    )
    # Model "d" is known by id here (zero factors): predicted 3 + 0 for nobody, so drop it from
    # the split above; the five remaining pairs match the hand numbers.
    res = evaluate(model, other, k=2, threshold=4.0)
    _check(res, KNOWN["sse"], KNOWN["sae"], 5, KNOWN["users"])
    assert res["cold_pairs"] == 0


def test_no_split_is_an_error(tmp_path):
    u, i, r = random_ratings(10, 8, 40, seed=2)
    store = store_from_arrays(tmp_path / "s", u, i, r, n_users=10, n_items=8)
    with pytest.raises(StoreError, match="no test ratings"):
        evaluate(random_model(store), store)


def test_cli_evaluate_writes_json(tiny, client, tmp_path, capsys):
    store, model = tiny
    model.save(tmp_path / "model", plot=False)
    out = tmp_path / "metrics.json"
    argv = ["evaluate", str(tmp_path / "model"), "--k", "2", "--json", str(out)]
    # --store omitted: the model's recorded store is used.
    assert main([*argv, "--address", client.scheduler.address]) == 0
    text = capsys.readouterr().out
    assert "RMSE" in text and "NDCG@2" in text
    res = json.loads(out.read_text())
    _check(res, KNOWN["sse"] + 1.0, KNOWN["sae"] + 1.0, 6, [*KNOWN["users"], COLD_USER])
    assert res["store"] == str(store.path)

    # Defaults from the model's config: its evaluate section asks for k = 2 and threshold 5.
    model.config = {"evaluate": {"k": 2, "threshold": 5.0}}
    model.save(tmp_path / "model2", plot=False)
    out2 = tmp_path / "m2.json"
    argv = ["evaluate", str(tmp_path / "model2"), "--store", str(store.path), "--json", str(out2)]
    assert main(argv) == 0  # no --address: a LocalCluster is started and closed
    res2 = json.loads(out2.read_text())
    assert (res2["k"], res2["threshold"], res2["n_users_ranked"]) == (2, 5.0, 1)
    assert res2["precision"] == pytest.approx(1 / 2)  # user 0: item 1 first of 2

    rc = main(
        ["evaluate", str(tmp_path / "model"), "--store", str(tmp_path / "missing"), "--k", "2"]
    )
    assert rc == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("use_client", [False, True])
def test_rmse_of_clipped_predictions_by_hand(tiny, request, use_client):
    """Clipped to [3.0, 3.3], the predictions 3.4 3.2 3.3 3.5 2.8 (cold 3.0) become
    3.3 3.2 3.3 3.3 3.0 3.0: errors 1.7 0.8 -1.3 -0.3 1.5 1.0. The ranking is unchanged."""
    store, model = tiny
    client = request.getfixturevalue("client") if use_client else None
    model.rating_range = (3.0, 3.3)
    errors = np.array([1.7, 0.8, -1.3, -0.3, 1.5, 1.0])
    res = evaluate(model, store, k=2, threshold=4.0, client=client)
    _check(
        res,
        float(errors @ errors),
        float(np.abs(errors).sum()),
        6,
        [*KNOWN["users"], COLD_USER],
    )
    assert res["clip"] == [3.0, 3.3]
    # Off for this call, or for the model: the raw predictions of test_tiny_case_by_hand.
    raw = evaluate(model, store, k=2, threshold=4.0, client=client, clip=False)
    _check(raw, KNOWN["sse"] + 1.0, KNOWN["sae"] + 1.0, 6, [*KNOWN["users"], COLD_USER])
    model.clip = False
    assert evaluate(model, store, k=2, threshold=4.0, client=client)["rmse"] == raw["rmse"]
    assert raw["clip"] is None
