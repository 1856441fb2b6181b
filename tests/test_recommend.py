"""Top-N recommendation: brute-force reference, seen items excluded, on the cluster and without."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import random_ratings
from test_model import random_model

from dmf.cli import main
from dmf.dist.tasks import run_windowed
from dmf.errors import InputError, ModelError
from dmf.model.recommend import recommend_all
from dmf.model.scoring import top_n
from dmf.store.layout import store_from_arrays

N_USERS, N_ITEMS = 45, 25


@pytest.fixture
def rated(tmp_path):
    """A store with string ids (3 user blocks) and the train arrays it was built from."""
    u, i, r = random_ratings(N_USERS, N_ITEMS, 500, seed=11)
    # User 44 rated every item but one; user 43 rated nothing.
    keep = u < 43
    u, i, r = u[keep], i[keep], r[keep]
    u = np.concatenate([u, np.full(N_ITEMS - 1, 44)])
    i = np.concatenate([i, np.arange(1, N_ITEMS)])
    r = np.concatenate([r, np.full(N_ITEMS - 1, 3.0, dtype=np.float32)])
    store = store_from_arrays(
        tmp_path / "store",
        u,
        i,
        r,
        n_users=N_USERS,
        n_items=N_ITEMS,
        n_blocks=3,
        user_ids=pa.array([f"u{k}" for k in range(N_USERS)]),
        item_ids=pa.array([f"i{k}" for k in range(N_ITEMS)]),
    )
    return store, u, i


def full_scores(model):
    """Every user's score of every item, float64, shape (n_users, n_items)."""
    return (
        model.mu
        + model.user_bias.astype(np.float64)[:, None]
        + model.item_bias.astype(np.float64)[None, :]
        + model.user_factors.astype(np.float64) @ model.item_factors.astype(np.float64).T
    )


def brute_force(model, seen_u, seen_i, users, n, allowed=None):
    """Full scores, seen items (and items not ``allowed``) set to -inf, full sort:
    {user index: [(item index, score)]}."""
    s = full_scores(model)
    if seen_u is not None:
        s[seen_u, seen_i] = -np.inf
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    out = {}
    for k in users:
        order = np.argsort(-s[k], kind="stable")[:n]
        out[k] = [(int(j), float(s[k, j])) for j in order if np.isfinite(s[k, j])]
    return out


def check_against(table, ref, user_ids):
    by_user = {}
    for row in table.to_pylist():
        by_user.setdefault(row["user"], []).append(row)
    assert set(by_user) == {user_ids[k] for k, want in ref.items() if want}
    for k, want in ref.items():
        got = by_user.get(user_ids[k], [])
        assert [g["rank"] for g in got] == list(range(1, len(want) + 1))
        assert [g["item"] for g in got] == [f"i{j}" for j, _ in want]
        np.testing.assert_allclose([g["score"] for g in got], [s for _, s in want], rtol=1e-5)


@pytest.mark.parametrize("use_client", [False, True])
def test_recommend_all_equals_brute_force(rated, request, use_client):
    store, u, i = rated
    client = request.getfixturevalue("client") if use_client else None
    model = random_model(store, rank=4, seed=3)
    table = recommend_all(model, store, n=6, client=client, tile_users=4)
    ref = brute_force(model, u, i, range(N_USERS), 6)
    ids = [f"u{k}" for k in range(N_USERS)]
    check_against(table, ref, ids)
    # The user who rated all but item 0 gets exactly that one; the user with nothing gets 6.
    assert table.filter(pa.compute.equal(table.column("user"), "u44")).num_rows == 1
    assert table.filter(pa.compute.equal(table.column("user"), "u43")).num_rows == 6
    assert table.num_rows == 6 * (N_USERS - 1) + 1


def test_recommend_all_to_file_and_directory(rated, client, tmp_path):
    store, u, i = rated
    model = random_model(store, rank=3, seed=4)
    ref = brute_force(model, u, i, range(N_USERS), 5)
    ids = [f"u{k}" for k in range(N_USERS)]
    f = recommend_all(model, store, n=5, client=client, out=tmp_path / "out" / "recs.parquet")
    assert str(f) == str(tmp_path / "out" / "recs.parquet") and Path(f).is_file()
    check_against(pq.read_table(Path(f)), ref, ids)
    d = Path(recommend_all(model, store, n=5, out=tmp_path / "recs_dir"))
    # The parts, and the manifest that lists them (written last).
    listed = json.loads((d / "_manifest.json").read_text())["files"]
    assert sorted(listed) == [f"part-{k:05d}.parquet" for k in range(3)]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [e["path"] for e in listed.values()] + ["_manifest.json"]
    )
    check_against(pq.read_table(d), ref, ids)
    # Nothing temporary is left next to the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recs_dir", "store"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["recs.parquet"]


def test_recommend_some_users_in_order_with_cold_start(rated):
    store, u, i = rated
    model = random_model(store, rank=3, seed=5)
    t = model.recommend(["u7", "stranger", "u2"], n=4, exclude_seen=store)
    assert t.column("user").to_pylist() == ["u7"] * 4 + ["stranger"] * 4 + ["u2"] * 4
    ref = brute_force(model, u, i, [7, 2], 4)
    check_against(
        t.filter(pa.compute.not_equal(t.column("user"), "stranger")), ref, {7: "u7", 2: "u2"}
    )
    # The unknown user gets the items ranked by mu + c_j.
    pop = np.argsort(-model.item_bias.astype(np.float64), kind="stable")[:4]
    cold = t.filter(pa.compute.equal(t.column("user"), "stranger"))
    assert cold.column("item").to_pylist() == [f"i{j}" for j in pop]
    np.testing.assert_allclose(
        cold.column("score").to_numpy(), model.mu + model.item_bias[pop], rtol=1e-6
    )
    dropped = model.recommend(["u7", "stranger"], n=4, exclude_seen="store", cold_start="drop")
    assert set(dropped.column("user").to_pylist()) == {"u7"}


def test_recommend_excluding_another_store_by_raw_ids(rated, tmp_path, client):
    """Seen items from a store whose dense indices differ from the model's (ids reversed)."""
    store, u, i = rated
    model = random_model(store, rank=3, seed=12)
    rev_u, rev_i = N_USERS - 1 - u, N_ITEMS - 1 - i
    other = store_from_arrays(
        tmp_path / "other",
        rev_u,
        rev_i,
        np.ones(len(u), dtype=np.float32),
        n_users=N_USERS,
        n_items=N_ITEMS,
        n_blocks=2,
        user_ids=pa.array([f"u{k}" for k in range(N_USERS)][::-1]),
        item_ids=pa.array([f"i{k}" for k in range(N_ITEMS)][::-1]),
    )
    t = recommend_all(model, other, n=4, client=client)
    check_against(t, brute_force(model, u, i, range(N_USERS), 4), [f"u{k}" for k in range(N_USERS)])


def test_recommend_without_exclusion(rated):
    store, _, _ = rated
    model = random_model(store, rank=2, seed=6)
    t = model.recommend(["u44"], n=3)
    check_against(t, brute_force(model, None, None, [44], 3), {44: "u44"})


def test_top_n_partial_selection_ties_and_short_rows():
    s = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0], [-np.inf, -np.inf, 0.5, -np.inf, -np.inf]])
    cols, vals = top_n(s.astype(np.float32), 3)
    assert cols[0].tolist() == [1, 2, 4]  # tie broken by the lower column
    assert top_n(s, 1)[0][0].tolist() == [1]  # a tie at the cut: the lower column
    assert cols[1, 0] == 2 and not np.isfinite(vals[1, 1:]).any()
    cols, _ = top_n(s, 10)
    assert cols.shape == (2, 5)


def test_top_n_wide_rows_threshold_path_equals_full_sort():
    """Rows wide enough for the group-maximum threshold selection: same as a full stable sort,
    including ties (broken by the lower column), rows with fewer allowed columns than n, and
    rows with nothing allowed."""
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=(9, 3001)) * 4) / 4  # many exact ties
    s = s.astype(np.float32)
    s[1, :] = -np.inf
    s[1, [17, 2900]] = [1.0, 2.0]
    s[2, :] = -np.inf
    s[3, 100:] = -np.inf
    cols, vals = top_n(s, 5)
    for r in range(len(s)):
        want = np.argsort(-s[r], kind="stable")[:5]
        ok = np.isfinite(s[r, want])
        assert cols[r][: ok.sum()].tolist() == want[ok].tolist()
        assert np.array_equal(vals[r][: ok.sum()], s[r, want[ok]])
        assert not np.isfinite(vals[r][ok.sum() :]).any()


def test_top_n_group_path_without_ties_and_tail_columns():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(20, 5000)).astype(np.float32)  # 39 groups of 128, 8 tail columns
    s[0, 4995] = 10.0  # the best entry of row 0 is in the tail
    s[1, :] = -np.inf
    s[1, 10:20] = np.arange(10)  # only 10 allowed columns, all in few groups
    cols, vals = top_n(s, 7)
    want = np.argsort(-s, axis=1, kind="stable")[:, :7]
    assert np.array_equal(cols[2:], want[2:])
    assert cols[0, 0] == 4995 and np.array_equal(cols[0], want[0])
    assert cols[1].tolist() == list(range(19, 12, -1))
    np.testing.assert_array_equal(vals, np.take_along_axis(s, want, axis=1))


def _sum_plus(own, add):
    return float(own.sum()) + add


def test_run_windowed_keeps_task_order(client):
    own = [np.full(3, k, dtype=np.float64) for k in range(7)]
    got = run_windowed(client, _sum_plus, 7, lambda k: (own[k], (0.5,)), "test-window", window=2)
    assert got == [3.0 * k + 0.5 for k in range(7)]


def test_recommend_rejects_bad_n(rated):
    store, _, _ = rated
    with pytest.raises(InputError, match="n must be"):
        recommend_all(random_model(store), store, n=0)


# -- command line -------------------------------------------------------------------------------
def test_cli_recommend_all_users_on_cluster(rated, client, tmp_path, capsys):
    store, u, i = rated
    model = random_model(store, rank=3, seed=8)
    model.save(tmp_path / "model", plot=False)
    out = tmp_path / "recs.parquet"
    argv = ["recommend", str(tmp_path / "model"), "-n", "5", "--out", str(out)]
    assert main([*argv, "--address", client.scheduler.address]) == 0
    ref = brute_force(model, u, i, range(N_USERS), 5)
    check_against(pq.read_table(out), ref, [f"u{k}" for k in range(N_USERS)])


def test_cli_recommend_users_and_ratings(rated, tmp_path, capsys):
    store, u, i = rated
    model = random_model(store, rank=3, seed=9)
    model.save(tmp_path / "model", plot=False)
    assert main(["recommend", str(tmp_path / "model"), "-n", "3", "--users", "u5,u9"]) == 0
    got = pcsv.read_csv(pa.py_buffer(capsys.readouterr().out.encode()))
    check_against(got, brute_force(model, u, i, [5, 9], 3), {5: "u5", 9: "u9"})

    (tmp_path / "users.txt").write_text("user\nu9\n")
    out = tmp_path / "some.parquet"
    argv = ["recommend", str(tmp_path / "model"), "-n", "3", "--users", str(tmp_path / "users.txt")]
    assert main([*argv, "--out", str(out)]) == 0
    check_against(pq.read_table(out), brute_force(model, u, i, [9], 3), {9: "u9"})

    pcsv.write_csv(pa.table({"item": ["i1", "i4"], "rating": [5.0, 2.0]}), tmp_path / "me.csv")
    argv = ["recommend", str(tmp_path / "model"), "-n", "4", "--ratings", str(tmp_path / "me.csv")]
    assert main(argv) == 0
    got = pcsv.read_csv(pa.py_buffer(capsys.readouterr().out.encode()))
    want = model.recommend_for_ratings(["i1", "i4"], [5.0, 2.0], n=4)
    assert got.column("item").to_pylist() == want.column("item").to_pylist()
    assert not {"i1", "i4"} & set(got.column("item").to_pylist())


def test_cli_recommend_everyone_needs_out(rated, tmp_path, capsys):
    store, _, _ = rated
    random_model(store).save(tmp_path / "model", plot=False)
    assert main(["recommend", str(tmp_path / "model")]) == 2
    assert "--out" in capsys.readouterr().err


# -- item filters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_client", [False, True])
def test_recommend_include_and_exclude_equal_brute_force(rated, request, use_client):
    store, u, i = rated
    client = request.getfixturevalue("client") if use_client else None
    model = random_model(store, rank=4, seed=13)
    ids = [f"u{k}" for k in range(N_USERS)]
    # Few candidates (the narrow path: only they are scored), some excluded again, two unknown.
    include = [f"i{k}" for k in (1, 3, 4, 7, 8, 11, 20, 24)] + ["ghost"]
    exclude = ["i3", "i20", "nope"]
    t, info = model.recommend(
        n=4,
        include=include,
        exclude=exclude,
        exclude_seen=store,
        client=client,
        tile_users=5,
        return_info=True,
    )
    allowed = np.zeros(N_ITEMS, dtype=bool)
    allowed[[1, 4, 7, 8, 11, 24]] = True
    check_against(t, brute_force(model, u, i, range(N_USERS), 4, allowed), ids)
    assert (info.total, info.cold, info.cold_users, info.cold_items) == (N_USERS, 0, 0, 2)

    # Many candidates (the masked path), some users, an unknown one ranked by mu + c_j.
    allowed = np.ones(N_ITEMS, dtype=bool)
    allowed[[0, 2, 5, 6]] = False
    t = model.recommend(
        ["u7", "stranger", "u44"],
        n=5,
        exclude=["i0", "i2", "i5", "i6"],
        exclude_seen="store",
        client=client,
    )
    ref = brute_force(model, u, i, [7, 44], 5, allowed)
    check_against(t.filter(pa.compute.not_equal(t.column("user"), "stranger")), ref, ids)
    assert not t.filter(pa.compute.equal(t.column("user"), "u44")).num_rows  # rated the rest
    pop = np.where(allowed, model.item_bias.astype(np.float64), -np.inf)
    want = np.argsort(-pop, kind="stable")[:5]
    cold = t.filter(pa.compute.equal(t.column("user"), "stranger"))
    assert cold.column("item").to_pylist() == [f"i{j}" for j in want]
    # The old API took the store (or its path) in exclude=: now that is exclude_seen=, and a
    # path given to exclude= is refused rather than read as one unknown item id.
    for old in ("store", str(store.root), store.root, store):
        with pytest.raises(ModelError, match="exclude_seen"):
            model.recommend(["u7"], exclude=old)
    with pytest.raises(ModelError, match="exclude_seen"):
        model.recommend(["u7"], include="i1")


def test_recommend_for_ratings_with_filters_and_pandas_output(rated):
    store, _, _ = rated
    model = random_model(store, rank=3, seed=15)
    items, ratings = ["i2", "i7", "gone"], [5.0, 1.0, 3.0]
    df, info = model.recommend_for_ratings(
        items, ratings, n=3, exclude=["i1", "i9"], output="pandas", return_info=True
    )
    f, b = model.fold_in(items, ratings)
    s = (
        model.mu
        + b
        + model.item_bias.astype(np.float64)
        + model.item_factors.astype(np.float64) @ f
    )
    s[[1, 2, 7, 9]] = -np.inf
    want = np.argsort(-s, kind="stable")[:3]
    assert list(df.columns) == ["rank", "item", "score"]
    assert df["item"].tolist() == [f"i{k}" for k in want] and df["rank"].tolist() == [1, 2, 3]
    assert str(info) == (
        "recommend_for_ratings: 3 ratings, 1 cold-start (0 unknown users, 1 unknown items) dropped"
    )


# -- users for items -------------------------------------------------------------------------------
def _top_users(scores, n):
    order = np.argsort(-scores, kind="stable")[:n]
    return [int(k) for k in order if np.isfinite(scores[k])]


@pytest.mark.parametrize("use_client", [False, True])
def test_recommend_users_equals_brute_force(rated, request, use_client):
    store, u, i = rated
    client = request.getfixturevalue("client") if use_client else None
    model = random_model(store, rank=3, seed=14)
    s = full_scores(model)
    s[u, i] = -np.inf  # exclude_seen: users who rated the item
    allowed = np.ones(N_USERS, dtype=bool)
    allowed[[3, 10, 41]] = False
    t, info = model.recommend_users(
        ["i4", "i0", "ghost", "i4"],
        n=5,
        exclude=["u3", "u10", "u41", "nobody"],
        exclude_seen=store,
        tile_users=7,  # several tiles: the running top-n merges them
        client=client,
        return_info=True,
    )
    assert t.column_names == ["item", "rank", "user", "score"]
    assert t.column("item").to_pylist() == ["i4"] * 5 + ["i0"] * 5 + ["ghost"] * 5
    for j in (4, 0):
        got = t.filter(pa.compute.equal(t.column("item"), f"i{j}"))
        want = _top_users(np.where(allowed, s[:, j], -np.inf), 5)
        assert got.column("user").to_pylist() == [f"u{k}" for k in want]
        np.testing.assert_allclose(got.column("score").to_numpy(), s[want, j], rtol=1e-5)
        assert got.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    # An unknown item: the users ranked by mu + b_u (the cold-start fallback).
    pop = np.where(allowed, model.mu + model.user_bias.astype(np.float64), -np.inf)
    ghost = t.filter(pa.compute.equal(t.column("item"), "ghost"))
    assert ghost.column("user").to_pylist() == [f"u{k}" for k in _top_users(pop, 5)]
    assert (info.total, info.cold, info.cold_users, info.cold_items) == (4, 1, 1, 1)
    assert info.handled == "predicted from biases"
    dropped = model.recommend_users(["ghost", "i1"], n=2, cold_start="drop", output="pandas")
    assert dropped["item"].tolist() == ["i1", "i1"]
    full = model.recommend_users(["i1"], n=N_USERS + 5)  # n above the number of users
    assert sorted(full.column("user").to_pylist()) == sorted(f"u{k}" for k in range(N_USERS))


def test_similar_users_by_cosine(rated):
    store, _, _ = rated
    model = random_model(store, rank=4, seed=16)
    model.user_factors[9] = 0.0  # no direction: never similar, and no rows as a query
    v = model.user_factors.astype(np.float64)
    norm = np.linalg.norm(v, axis=1)
    t, info = model.similar_users(["u5", "u9", "who", "u30"], n=4, tile_users=6, return_info=True)
    assert t.column_names == ["user", "rank", "similar", "score"]
    assert t.column("user").to_pylist() == ["u5"] * 4 + ["u30"] * 4
    for k in (5, 30):
        cos = np.full(N_USERS, -np.inf)
        ok = norm > 0
        cos[ok] = v[ok] @ v[k] / (norm[ok] * norm[k])
        cos[k] = -np.inf
        want = _top_users(cos, 4)
        got = t.filter(pa.compute.equal(t.column("user"), f"u{k}"))
        assert got.column("similar").to_pylist() == [f"u{j}" for j in want]
        np.testing.assert_allclose(got.column("score").to_numpy(), cos[want], rtol=1e-5)
    assert str(info) == (
        "similar_users: 4 users, 1 cold-start (1 unknown users, 0 unknown items) dropped"
    )
