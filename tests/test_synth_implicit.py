"""dmf synth --implicit: planted-preference events with counts, repeated rows, the same output
whatever the chunking, a preference that beats popularity, and ingest summing the repeats."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dmf.cli import main
from dmf.config import SynthConfig, load_config
from dmf.data.ingest import ingest
from dmf.data.synth import TOP_ITEMS, load_truth, synth, synth_files
from dmf.errors import ConfigError


def _cfg(**kw) -> SynthConfig:
    base = dict(n_users=400, n_items=150, n_ratings=12_000, rank=4, seed=11, implicit=True)
    base.update(kw)
    return SynthConfig(**base)


def _files(out) -> list:
    return [loc for rel, loc in sorted(synth_files(out).items()) if rel.startswith("ratings/")]


def _read(out, fmt="parquet") -> dict[str, np.ndarray]:
    read = pq.read_table if fmt == "parquet" else pacsv.read_csv
    tables = [read(str(f)) for f in _files(out)]
    return {
        k: np.concatenate([t.column(k).to_numpy() for t in tables]) for k in tables[0].schema.names
    }


def test_same_output_whatever_the_chunk_size_and_threads(tmp_path):
    cfg = _cfg(files=3, user_skew=1.0, item_skew=1.0)
    synth(cfg, tmp_path / "a", progress=False, chunk_ratings=1_000_000)
    synth(cfg, tmp_path / "b", progress=False, chunk_ratings=97, threads=3)
    synth(cfg, tmp_path / "c", progress=False, chunk_ratings=1, threads=1)
    fa = _files(tmp_path / "a")
    ta = load_truth(tmp_path / "a")
    for other in ("b", "c"):
        fb = _files(tmp_path / other)
        assert len(fa) == len(fb) == 3
        for x, y in zip(fa, fb, strict=True):
            assert pq.read_table(str(x)).equals(pq.read_table(str(y)))
        tb = load_truth(tmp_path / other)
        assert sorted(ta) == sorted(tb)
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k])
    # The same planted factors as the explicit ratings of the same seed; another seed differs.
    synth(
        _cfg(files=3, user_skew=1.0, item_skew=1.0, implicit=False), tmp_path / "e", progress=False
    )
    np.testing.assert_array_equal(ta["U"], load_truth(tmp_path / "e")["U"])
    synth(_cfg(files=3, user_skew=1.0, item_skew=1.0, seed=12), tmp_path / "d", progress=False)
    assert not np.array_equal(_read(tmp_path / "a")["item"], _read(tmp_path / "d")["item"])


def test_events_counts_and_repeated_rows(tmp_path):
    cfg = _cfg()
    summary = synth(cfg, tmp_path / "s", progress=False)
    r = _read(tmp_path / "s")
    u, i, c, t = r["user"], r["item"], r["rating"], r["timestamp"]
    n = cfg.n_ratings
    assert len(u) == n == summary["n_ratings"]
    assert u.min() >= 0 and u.max() < cfg.n_users and i.min() >= 0 and i.max() < cfg.n_items
    # Sorted by (user, item, timestamp).
    order = np.lexsort((t, i, u))
    np.testing.assert_array_equal(order, np.arange(n))
    # Counts: positive integers, 1 + geometric(1/2): mean 2, half of them 1.
    assert c.dtype == np.float32 and c.min() >= 1 and (c == np.round(c)).all()
    assert c.mean() == pytest.approx(2.0, abs=0.1)
    assert (c == 1).mean() == pytest.approx(0.5, abs=0.03)
    assert summary["rating_min"] == 1.0 and summary["rating_mean"] == pytest.approx(c.mean())
    # Repeated rows of one (user, item) pair, each with its own timestamp.
    pair = u * cfg.n_items + i
    same = pair[1:] == pair[:-1]
    distinct = len(np.unique(pair))
    assert summary["distinct_pairs"] == distinct
    assert summary["repeated_rows"] == n - distinct == int(same.sum())
    assert 0.05 * n < n - distinct < 0.8 * n
    assert (t[1:][same] > t[:-1][same]).all()
    assert t.min() >= summary["timestamp_range"][0] and t.max() <= summary["timestamp_range"][1]
    # A user has at most n_items event rows; some users have several events.
    per_user = np.bincount(u, minlength=cfg.n_users)
    assert per_user.max() <= cfg.n_items and per_user.sum() == n
    written = json.loads((tmp_path / "s" / "synth.json").read_text())
    assert written["feedback"] == "implicit" and written["config"]["implicit"] is True
    assert written["noise_rmse"] is None


def test_planted_preference_beats_popularity(tmp_path):
    cfg = _cfg(n_users=1000, n_items=300, n_ratings=30_000, rank=6, item_skew=1.0)
    summary = synth(cfg, tmp_path / "s", progress=False)
    r = _read(tmp_path / "s")
    u, i = r["user"], r["item"]
    truth = load_truth(tmp_path / "s")
    U, V = truth["U"].astype(np.float64), truth["V"].astype(np.float64)
    S = U @ V.T  # planted scores, users x items
    sd = S.std()
    assert sd == pytest.approx(cfg.factor_scale, rel=0.15)
    assert truth["beta"] == pytest.approx(2.0 / cfg.factor_scale) == summary["beta"]
    assert float(truth["mu"]) == 0 and not truth["b"].any() and not truth["c"].any()
    event = S[u, i]
    rng = np.random.default_rng(0)
    # Popularity-matched controls: items drawn from the planted popularity alone for the same
    # users; and the same items for random other users.
    pop = np.exp(truth["log_popularity"].astype(np.float64))
    assert pop.sum() == pytest.approx(1.0)
    by_pop = S[u, rng.choice(cfg.n_items, size=len(u), p=pop / pop.sum())]
    other_user = S[rng.integers(0, cfg.n_users, len(u)), i]
    # About 1.6 sd here (a tilt by exp(beta s) shifts a Gaussian's mean by beta sd^2 = 2 sd;
    # heavy users, capped, and popularity take some of it).
    assert event.mean() > by_pop.mean() + 1.0 * sd
    assert event.mean() > other_user.mean() + 1.0 * sd
    assert summary["event_score_mean"] == pytest.approx(event.mean(), rel=1e-4)
    assert summary["popularity_score_mean"] == pytest.approx(by_pop.mean(), abs=0.05)
    # Popularity still shapes the events: the most popular decile of items gets more events per
    # item than the least popular one.
    rows_per_item = np.bincount(i, minlength=cfg.n_items)
    ranked = np.argsort(-pop)
    k = cfg.n_items // 10
    assert rows_per_item[ranked[:k]].mean() > 3 * rows_per_item[ranked[-k:]].mean()
    # top_items: each user's items of highest planted score, best first.
    top = truth["top_items"]
    assert top.shape == (cfg.n_users, TOP_ITEMS) and top.dtype == np.int32
    want = np.argsort(-truth["U"] @ truth["V"].T, axis=1, kind="stable")[:, :TOP_ITEMS]
    assert (top == want).mean() > 0.99  # ties and float32 rounding aside
    # A user's events fall on its top items far more often than popularity would put them.
    in_top = (top[u] == i[:, None]).any(axis=1).mean()
    by_chance = pop[top].sum(axis=1)[u].mean()
    assert in_top > 5 * by_chance  # about 0.41 against 0.03


def test_ingest_sums_the_repeated_rows(tmp_path):
    cfg = _cfg(format="csv", files=2)
    summary = synth(cfg, tmp_path / "s", progress=False)
    r = _read(tmp_path / "s", "csv")
    config = load_config(
        raw={
            "data": {
                "source": str(tmp_path / "s" / "ratings"),
                "columns": {"timestamp": "timestamp"},
            },
            "model": {"feedback": "implicit"},
            "split": {"method": "none"},
            "store": {"path": str(tmp_path / "store")},
        }
    )
    store = ingest(config, progress=False)
    assert store.n_train == summary["distinct_pairs"]
    assert store.manifest.dropped.duplicates_merged == summary["repeated_rows"]
    # The store's total weight is the events' total count.
    assert store.manifest.mu * store.n_train == pytest.approx(float(r["rating"].sum()))


def test_cli_implicit_flag(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        ["synth", "--out", str(out), "--implicit", "--users", "60", "--items", "40",
         "--ratings", "900", "--rank", "3", "--seed", "2", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    said = capsys.readouterr().out
    s = json.loads((out / "synth.json").read_text())
    assert s["config"]["implicit"] is True and s["n_ratings"] == 900
    assert f"wrote 900 events ({s['distinct_pairs']:,} distinct (user, item) pairs" in said
    # Without the flag: ratings, as before.
    assert main(["synth", "--out", str(tmp_path / "x"), "--ratings", "300", "--no-progress"]) == 0
    assert json.loads((tmp_path / "x" / "synth.json").read_text())["config"]["implicit"] is False


def test_more_event_rows_than_cells_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"synth\.n_ratings: 1201 events.*1200"):
        synth(_cfg(n_users=30, n_items=40, n_ratings=1201), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
