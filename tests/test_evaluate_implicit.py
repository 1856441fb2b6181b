"""Evaluation of implicit-feedback models, hit rate, and sampled negatives, against a brute-force
NumPy reference written here: every item scored, train items dropped, the top k by score (ties to
the lower item index), per-user metrics by their definitions, the mean.

Stores are ingested from real Parquet and CSV files by dmf's ingest (``split.method: random`` holds
out a test split); the models are in memory with seeded random factors on a dyadic grid (k / 16),
so every score, in float32 or float64, is exact and the two rankings are the same, ties
included. The block tasks run on a real Dask cluster (tests/conftest.py's ``client``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmf.cli import main
from dmf.config import load_config
from dmf.data.ingest import ingest
from dmf.model.evaluate import (
    IMPLICIT_RELEVANCE,
    METRICS,
    evaluate,
    format_table,
    metric_key,
    sample_negatives,
)
from dmf.model.model import Model
from dmf.store.layout import Store

TOL = 1e-12


# -- data: events on disk, ingested -------------------------------------------------------------


def events(seed=0, n=700, n_users=40, n_items=30) -> pd.DataFrame:
    """Events with repeated pairs (summed at ingest), some weights 0 (a held-out event of weight
    0 is not relevant), and a few users and items with a single event (cold starts when it is
    held out)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n) * 3 + 7
    items = rng.integers(0, n_items, n) * 5 + 100
    weight = np.where(rng.random(n) < 0.1, 0.0, np.round(rng.gamma(1.5, 2.0, n), 2))
    # 12 users with one event each, and 6 items with one event each.
    lone_u = np.arange(12) * 3 + 1000
    lone_i = np.arange(6) * 5 + 5000
    users = np.concatenate([users, lone_u, rng.integers(0, n_users, 6) * 3 + 7])
    items = np.concatenate([items, rng.integers(0, n_items, 12) * 5 + 100, lone_i])
    weight = np.concatenate([weight, np.round(rng.gamma(1.5, 2.0, 18), 2) + 0.5])
    return pd.DataFrame({"user": users, "item": items, "weight": weight})


def ingest_events(tmp_path: Path, fmt: str, n_blocks: int, seed: int = 0, name="store") -> Store:
    df = events(seed)
    if fmt == "parquet":
        src = tmp_path / f"{name}-events.parquet"
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), src)
    else:
        src = tmp_path / f"{name}-events.csv"
        df.to_csv(src, index=False)
    cfg = load_config(
        raw={
            "data": {"source": str(src), "columns": {"rating": "weight"}},
            "model": {"feedback": "implicit"},
            "split": {"method": "random", "test": 0.3, "validation": 0, "seed": 5},
            "blocks": {"n_blocks": n_blocks, "min_blocks": 1},
            "store": {"path": str(tmp_path / name), "overwrite": True},
        }
    )
    return ingest(cfg, progress=False)


def store_arrays(store: Store):
    """(train (user, item) pairs, test users, items, weights) in the store's dense indices."""
    tu, ti = [], []
    for b in range(store.n_blocks("user")):
        blk = store.read_block("user", b)
        tu.append(np.repeat(np.arange(len(blk.indptr) - 1), np.diff(blk.indptr)) + blk.start)
        ti.append(blk.cols.astype(np.int64))
    t = store.read_split("test")
    return (
        np.concatenate(tu),
        np.concatenate(ti),
        t.column("user").to_numpy().astype(np.int64),
        t.column("item").to_numpy().astype(np.int64),
        t.column("rating").to_numpy().astype(np.float64),
    )


def dyadic_model(store: Store, seed=0, rank=3, grid=16, implicit=True, biases=False) -> Model:
    """A model over ``store``'s ids with seeded random factors k / grid (|k| <= grid)."""
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return (rng.integers(-grid, grid + 1, shape) / grid).astype(np.float32)

    n_u, n_i = store.n_users, store.n_items
    config = {"model": {"rank": rank}}
    if implicit:
        config["model"]["feedback"] = "implicit"
    return Model(
        mu=0.0 if implicit else 2.0,
        user_ids=store.ids("user"),
        item_ids=store.ids("item"),
        user_factors=draw(n_u, rank),
        user_bias=draw(n_u) if biases else np.zeros(n_u, np.float32),
        item_factors=draw(n_i, rank),
        item_bias=draw(n_i) if biases else np.zeros(n_i, np.float32),
        config=config,
        store_fingerprint=store.fingerprint,
        store_path=str(store.path),
    )


# -- the reference ------------------------------------------------------------------------------


def user_metrics(ranked: list[int], relevant_hits: set[int], n_rel: int, k: int) -> list[float]:
    """precision, recall, NDCG, AP, hit rate of one top-k list, from their definitions."""
    hits = [j in relevant_hits for j in ranked[:k]]
    n_hit = sum(hits)
    dcg = sum(1.0 / math.log2(p + 2) for p, h in enumerate(hits) if h)
    idcg = sum(1.0 / math.log2(p + 2) for p in range(min(k, n_rel)))
    ap = sum(sum(hits[: p + 1]) / (p + 1) for p, h in enumerate(hits) if h) / min(k, n_rel)
    return [n_hit / k, n_hit / n_rel, dcg / idcg, ap, float(n_hit > 0)]


def reference(
    model: Model,
    store: Store,
    k: int,
    cold_start="fallback",
    threshold: float | None = None,
    negatives: int | None = None,
) -> tuple[dict[str, float], int]:
    """Mean metrics over the users with a relevant held-out item, and their number.

    Relevant: weight > 0 (implicit; ``threshold`` None) or rating >= threshold. A user or item
    without train events is a cold start: with ``fallback`` the user's score is its bias alone
    (the mean over every item is mu + c_j) and an unknown relevant item can never be hit; with
    ``drop`` such held-out pairs are left out. With ``negatives``, each user's candidates are its
    relevant items (train items aside) and the sampled items, drawn here one user at a time
    from the items it has no train and no held-out event with."""
    tr_u, tr_i, te_u, te_i, te_r = store_arrays(store)
    n_users, n_items = store.n_users, store.n_items
    U = model.user_factors.astype(np.float64)
    V = model.item_factors.astype(np.float64)
    b = model.user_bias.astype(np.float64)
    c = model.item_bias.astype(np.float64)
    user_known = np.bincount(tr_u, minlength=n_users) > 0
    item_known = np.bincount(tr_i, minlength=n_items) > 0
    U[~user_known] = 0.0
    b[~user_known] = 0.0
    S = model.mu + b[:, None] + c[None, :] + U @ V.T
    train = np.zeros((n_users, n_items), dtype=bool)
    train[tr_u, tr_i] = True
    heldout_items = {u: set(te_i[te_u == u].tolist()) for u in np.unique(te_u)}

    keep = np.ones(len(te_u), dtype=bool)
    if cold_start == "drop":
        keep = user_known[te_u] & item_known[te_i]
    rel = te_r > 0 if threshold is None else te_r >= threshold
    rel &= keep
    per_user = []
    for u in np.unique(te_u[rel]):
        rel_items = te_i[rel & (te_u == u)]
        n_rel = len(rel_items)
        hittable = {int(j) for j in rel_items if item_known[j]}
        if negatives is None:
            cand = np.flatnonzero(~train[u])
        else:
            excluded = np.array(sorted(set(np.flatnonzero(train[u])) | heldout_items[u]))
            ptr, neg = sample_negatives([u], [0, len(excluded)], excluded, n_items, negatives)
            assert len(neg) == min(negatives, n_items - len(excluded))
            assert not set(neg.tolist()) & set(excluded.tolist())
            rel_cand = {int(j) for j in rel_items if not train[u, j]}
            cand = np.array(sorted(rel_cand | set(neg.tolist())), dtype=np.int64)
        order = np.lexsort((cand, -S[u, cand]))  # score descending, then the lower item
        per_user.append(user_metrics(cand[order].tolist(), hittable, n_rel, k))
    means = np.mean(per_user, axis=0)
    return dict(zip(METRICS, means.tolist(), strict=True)), len(per_user)


def assert_metrics(res, expected, n_users, k, negatives=None):
    assert res["n_users_ranked"] == n_users
    for m in METRICS:
        got = res[metric_key(m, k, negatives)]
        assert abs(got - expected[m]) <= TOL, (m, got, expected[m])


# -- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same events ingested from Parquet with 3 user blocks and from CSV with 1."""
    base = tmp_path_factory.mktemp("evaluate-implicit")
    return {
        "parquet": ingest_events(base, "parquet", 3, name="pq"),
        "csv": ingest_events(base, "csv", 1, name="csv"),
    }


def test_the_data_holds_what_the_tests_need(stores):
    """Zero-weight held-out events, and cold-start pairs (users and items without train events)
    in the test split, so both rules are exercised."""
    for store in stores.values():
        _, _, te_u, te_i, te_r = store_arrays(store)
        assert store.n_split("test") > 100 and (te_r == 0).sum() > 5
        assert (store.counts("user")[te_u] == 0).sum() > 0
        assert (store.counts("item")[te_i] == 0).sum() > 0


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("cold_start", ["fallback", "drop"])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_implicit_metrics_match_the_brute_force_reference(stores, client, fmt, cold_start, k):
    store = stores[fmt]
    model = dyadic_model(store, seed=k)
    assert model.implicit
    res = evaluate(model, store, k=k, cold_start=cold_start, threshold=100.0, client=client)
    expected, n_users = reference(model, store, k, cold_start)
    assert_metrics(res, expected, n_users, k)
    # Implicit: no rating error, no threshold; every held-out event of weight > 0 is relevant
    # (threshold=100 above would leave nobody).
    for key in ("rmse", "mae", "threshold", "clip", "sampled_negatives"):
        assert key not in res
    assert res["feedback"] == "implicit" and res["relevance"] == IMPLICIT_RELEVANCE
    assert res["n_heldout"] == store.n_split("test")
    assert res["cold_pairs"] > 0


def test_implicit_result_keys_and_table(stores, client):
    store = stores["parquet"]
    res = evaluate(dyadic_model(store), store, k=10, client=client)
    assert list(res) == [
        "split",
        "feedback",
        "n",
        "k",
        "relevance",
        "precision",
        "recall",
        "ndcg",
        "map",
        "hit_rate",
        "n_users_ranked",
        "cold_start",
        "cold_users",
        "cold_items",
        "cold_pairs",
        "n_heldout",
    ]
    table = format_table(res)
    assert "RMSE" not in table and "MAE" not in table and "nan" not in table.lower()
    assert "hit rate@10" in table and "held-out events" in table
    assert "feedback" in table and "implicit" in table
    off = evaluate(dyadic_model(store), store, k=10, ranking=False)
    assert off["precision"] is None and "rmse" not in off
    format_table(off)


def test_implicit_model_with_biases(stores, client):
    """An implicit model trained with biases scores u_i . v_j + b_i + c_j: c_j moves items."""
    store = stores["parquet"]
    model = dyadic_model(store, seed=3, biases=True)
    for negatives in (None, 7):
        res = evaluate(model, store, k=4, client=client, negatives=negatives)
        expected, n_users = reference(model, store, 4, negatives=negatives)
        assert_metrics(res, expected, n_users, 4, negatives)


@pytest.mark.parametrize("use_client", [False, True])
@pytest.mark.parametrize("cold_start", ["fallback", "drop"])
@pytest.mark.parametrize(("k", "negatives"), [(3, 5), (10, 5), (5, 40)])
def test_sampled_negatives_match_the_reference(
    stores, request, use_client, cold_start, k, negatives
):
    """Candidates: each user's relevant held-out items and N sampled items (all remaining items
    when fewer: N = 40 is more than the catalogue leaves), the candidate sets re-derived here."""
    store = stores["parquet"]
    client = request.getfixturevalue("client") if use_client else None
    model = dyadic_model(store, seed=11)
    res = evaluate(model, store, k=k, cold_start=cold_start, negatives=negatives, client=client)
    expected, n_users = reference(model, store, k, cold_start, negatives=negatives)
    assert_metrics(res, expected, n_users, k, negatives)
    assert res["sampled_negatives"] == negatives
    # Labelled: no key that reads as a full-catalogue metric.
    for m in METRICS:
        assert m not in res
        assert f"{m}@{k} ({negatives} sampled negatives)" in res
    assert "sampled negatives" in format_table(res)


def test_sampled_negatives_do_not_depend_on_blocks_or_workers(stores, client):
    """The same events in 3 blocks (Parquet) and in 1 (CSV), on the cluster and in-process:
    the same figures (up to the order the block sums are added in)."""
    pq_store, csv_store = stores["parquet"], stores["csv"]
    # The same dense indices in both stores: each user's draws are seeded by its index.
    assert pq_store.ids("user").equals(csv_store.ids("user"))
    assert pq_store.ids("item").equals(csv_store.ids("item"))
    results = []
    for fmt, c in [("parquet", client), ("parquet", None), ("csv", client), ("csv", None)]:
        store = stores[fmt]
        assert store.n_blocks("user") == (3 if fmt == "parquet" else 1)
        results.append(evaluate(dyadic_model(store, seed=2), store, k=5, negatives=6, client=c))
    keys = [metric_key(m, 5, 6) for m in METRICS]
    first = np.array([results[0][key] for key in keys])
    for r in results[1:]:
        assert np.abs(np.array([r[key] for key in keys]) - first).max() <= TOL
    # And they differ from the full-catalogue figures (the candidates are fewer).
    full = evaluate(dyadic_model(pq_store, seed=2), pq_store, k=5)
    assert np.abs(np.array([full[m] for m in METRICS]) - first).max() > 0.01


def test_explicit_model_hit_rate_and_negatives(stores, client):
    """An explicit model on the same store: relevance by threshold, RMSE and MAE as before,
    hit rate beside the other metrics, and sampled negatives for it too."""
    store = stores["parquet"]
    model = dyadic_model(store, seed=5, implicit=False, biases=True)
    model.clip = False
    res = evaluate(model, store, k=6, threshold=2.5, client=client)
    expected, n_users = reference(model, store, 6, threshold=2.5)
    assert_metrics(res, expected, n_users, 6)
    assert res["feedback"] == "explicit" and res["threshold"] == 2.5
    assert res["relevance"] == "held-out rating >= 2.5" and res["clip"] is None
    # RMSE over every held-out rating (cold pairs from the biases: mu + b_i + c_j).
    tr_u, tr_i, te_u, te_i, te_r = store_arrays(store)
    known_u = np.bincount(tr_u, minlength=store.n_users)[te_u] > 0
    known_i = np.bincount(tr_i, minlength=store.n_items)[te_i] > 0
    U, V = model.user_factors.astype(np.float64), model.item_factors.astype(np.float64)
    b, c = model.user_bias.astype(np.float64), model.item_bias.astype(np.float64)
    pred = model.mu + np.where(known_u, b[te_u], 0) + np.where(known_i, c[te_i], 0)
    pred += np.where(known_u & known_i, np.einsum("ij,ij->i", U[te_u], V[te_i]), 0)
    assert res["rmse"] == pytest.approx(np.sqrt(np.mean((te_r - pred) ** 2)), rel=1e-9)
    assert res["mae"] == pytest.approx(np.mean(np.abs(te_r - pred)), rel=1e-9)

    neg = evaluate(model, store, k=6, threshold=2.5, client=client, negatives=8)
    expected, n_users = reference(model, store, 6, threshold=2.5, negatives=8)
    assert_metrics(neg, expected, n_users, 6, 8)
    assert neg["rmse"] == res["rmse"] and neg["sampled_negatives"] == 8


# -- the sampler on its own ----------------------------------------------------------------------


def _excluded(rng, m, n_items, most):
    sets = [np.unique(rng.integers(0, n_items, rng.integers(0, most + 1))) for _ in range(m)]
    ptr = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    return sets, ptr, np.concatenate(sets)


@pytest.mark.parametrize("n", [1, 4, 15, 30, 80])
def test_sampler_sizes_exclusions_and_determinism(n):
    """min(N, allowed) distinct items per user, none excluded, sorted; the same per user in any
    batch or order of users (the blocks and the workers decide those)."""
    rng = np.random.default_rng(n)
    n_items, m = 60, 300
    users = rng.permutation(100_000)[:m]
    sets, ptr, cols = _excluded(rng, m, n_items, 58)
    # Duplicates and out-of-range entries in the excluded lists are ignored.
    dup_ptr = ptr * 2
    dup_cols = np.concatenate([np.concatenate([s, s[::-1]]) for s in sets])
    indptr, items = sample_negatives(users, ptr, cols, n_items, n)
    again = sample_negatives(users, dup_ptr, dup_cols, n_items, n)
    assert np.array_equal(indptr, again[0]) and np.array_equal(items, again[1])
    rev = sample_negatives(users[::-1], *_reverse_csr(ptr, sets), n_items, n)
    for j in range(m):
        got = items[indptr[j] : indptr[j + 1]]
        allowed = np.setdiff1d(np.arange(n_items), sets[j])
        assert len(got) == min(n, len(allowed))
        assert np.all(np.diff(got) > 0) and np.isin(got, allowed).all()
        alone = sample_negatives(users[j : j + 1], [0, len(sets[j])], sets[j], n_items, n)[1]
        assert np.array_equal(alone, got)
        r = m - 1 - j
        assert np.array_equal(rev[1][rev[0][r] : rev[0][r + 1]], got)
    # Another seed, another sample.
    other = sample_negatives(users, ptr, cols, n_items, n, seed=1)[1]
    if n < 30:
        assert not np.array_equal(other, items)


def _reverse_csr(ptr, sets):
    rsets = sets[::-1]
    return np.concatenate([[0], np.cumsum([len(s) for s in rsets])]), np.concatenate(rsets)


@pytest.mark.parametrize("n", [3, 20])
def test_sampler_is_uniform(n):
    """Over many users with the same exclusions each allowed item is drawn n / allowed of the
    time (n = 3: the sequential draws; n = 20 of 25: the keyed selection)."""
    m, n_items = 20_000, 30
    excluded = np.array([0, 5, 6, 7, 29])
    indptr, items = sample_negatives(
        np.arange(m), np.arange(m + 1) * 5, np.tile(excluded, m), n_items, n
    )
    counts = np.bincount(items, minlength=n_items)
    assert counts[excluded].sum() == 0
    allowed = np.setdiff1d(np.arange(n_items), excluded)
    expected = m * n / len(allowed)
    p = n / len(allowed)
    sd = math.sqrt(m * p * (1 - p))
    assert np.all(np.abs(counts[allowed] - expected) < 5 * sd), counts[allowed]


def test_sampler_edge_cases():
    # No user; a user with every item excluded; a user with nothing excluded and N >= items.
    ip, it = sample_negatives(np.zeros(0, np.int64), [0], np.zeros(0, np.int64), 10, 3)
    assert ip.tolist() == [0] and len(it) == 0
    ip, it = sample_negatives([4, 9], [0, 10, 10], np.arange(10), 10, 3)
    assert ip.tolist() == [0, 0, 3] and len(set(it.tolist())) == 3
    ip, it = sample_negatives([4, 9], [0, 10, 10], np.arange(10), 10, 30)
    assert ip.tolist() == [0, 0, 10] and it.tolist() == list(range(10))


# -- the command line ---------------------------------------------------------------------------


def test_cli_evaluate_negatives(stores, client, tmp_path, capsys):
    store = stores["parquet"]
    model = dyadic_model(store, seed=4)
    model.config["evaluate"] = {"k": 5, "negatives": 6}
    model.save(tmp_path / "model", plot=False)
    addr = ["--address", client.scheduler.address]
    out = tmp_path / "m.json"
    # Defaults from the model's config: sampled negatives.
    assert main(["evaluate", str(tmp_path / "model"), "--json", str(out), *addr]) == 0
    text = capsys.readouterr().out
    assert "hit rate@5 (6 sampled negatives)" in text and "RMSE" not in text
    res = json.loads(out.read_text())
    expected, n_users = reference(model, store, 5, negatives=6)
    assert_metrics(res, expected, n_users, 5, 6)
    assert res["feedback"] == "implicit" and "rmse" not in res

    # --negatives on the command line; 0 ranks every item.
    argv = ["evaluate", str(tmp_path / "model"), "--json", str(out), *addr]
    assert main([*argv, "--negatives", "3"]) == 0
    res = json.loads(out.read_text())
    assert res["sampled_negatives"] == 3
    expected, n_users = reference(model, store, 5, negatives=3)
    assert_metrics(res, expected, n_users, 5, 3)
    assert main([*argv, "--negatives", "0"]) == 0
    res = json.loads(out.read_text())
    assert "sampled_negatives" not in res
    expected, n_users = reference(model, store, 5)
    assert_metrics(res, expected, n_users, 5)
    assert main([*argv, "--negatives", "-1"]) == 2
    assert "--negatives" in capsys.readouterr().err
