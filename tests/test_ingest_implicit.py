"""Ingest for implicit feedback, on real files: events without a rating column (each counts 1),
``data.duplicates: sum``, negative weights as invalid ratings, and the default duplicates policy
that follows ``model.feedback``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmf.config import load_config
from dmf.data.ingest import fingerprint, ingest
from dmf.data.readers import resolve_inputs
from dmf.errors import InputError
from dmf.store.layout import Store


def write_csv(path: Path, rows, header=("user", "item", "rating", "timestamp")) -> Path:
    lines = [",".join(header)] if header else []
    lines += [",".join(str(x) for x in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path: Path, source, implicit=False, **data):
    raw = {
        "data": {"source": str(source), **data},
        "split": {"method": "none"},
        "store": {"path": str(tmp_path / "store"), "overwrite": True},
    }
    if implicit:
        raw["model"] = {"feedback": "implicit"}
    return load_config(raw=raw)


def run(tmp_path: Path, source, implicit=False, **data) -> Store:
    return ingest(config(tmp_path, source, implicit, **data), progress=False)


def train_ratings(store: Store) -> dict[tuple, float]:
    """{(raw user, raw item): rating} of a store's train ratings, read from by_user; checks
    that by_item holds the same."""
    uid = store.ids("user").to_pylist()
    iid = store.ids("item").to_pylist()
    sides = {}
    for side in ("user", "item"):
        got = {}
        for ref in store.block_refs(side):
            t = store.read_block(side, ref.block)
            for rr, (lo, hi) in enumerate(zip(t.indptr[:-1], t.indptr[1:], strict=True)):
                for c, v in zip(t.cols[lo:hi], t.vals[lo:hi], strict=True):
                    u, i = (t.start + rr, c) if side == "user" else (c, t.start + rr)
                    got[(uid[u], iid[i])] = float(v)
        sides[side] = got
    assert sides["user"] == sides["item"]
    return sides["user"]


def events(n=600, n_users=25, n_items=15, seed=0) -> pd.DataFrame:
    """Events with many repeated (user, item) pairs, float weights (plays) and timestamps."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user": rng.integers(0, n_users, n) * 3 + 7,
            "item": rng.integers(0, n_items, n) * 5 + 100,
            "rating": np.round(rng.gamma(1.5, 2.0, n), 3),
            "timestamp": rng.permutation(n) * 10 + 1_000_000,
        }
    )


# -- events without a rating column ---------------------------------------------------------------


def write_events(path: Path, df: pd.DataFrame, fmt: str) -> tuple[Path, dict]:
    """``df`` (user, item, timestamp) without a rating column, as ``fmt`` writes it; and the
    data.columns that read it."""
    if fmt == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
        return path, {"rating": None, "timestamp": "timestamp"}
    path = path.with_suffix(".csv")
    if fmt == "csv":
        write_csv(path, df.values.tolist(), header=list(df.columns))
        return path, {"rating": None, "timestamp": "timestamp"}
    # No header, columns by position: line 1's ids are numbers, so it is data.
    write_csv(path, df[["user", "item"]].values.tolist(), header=None)
    return path, {"user": 0, "item": 1, "rating": None}


@pytest.mark.parametrize("fmt", ["csv", "csv-positions", "parquet"])
def test_events_without_a_rating_column_count_one(tmp_path, fmt):
    df = events()[["user", "item", "timestamp"]]
    first = df.drop_duplicates(["user", "item"])  # no repeated pairs
    src, columns = write_events(tmp_path / "first", first, fmt)
    # Without a rating column the input is events: explicit feedback refuses it, naming why.
    from dmf.errors import ConfigError

    with pytest.raises(ConfigError, match="set model.feedback: implicit"):
        run(tmp_path, src, columns=columns)
    store = run(tmp_path, src, True, columns=columns)
    got = train_ratings(store)
    assert store.n_train == len(first) == len(got)
    assert set(got) == set(zip(first.user, first.item, strict=True))
    assert set(got.values()) == {1.0}
    assert store.manifest.mu == 1.0

    # Under implicit feedback repeated events add up: each pair's rating is its number of events.
    src, columns = write_events(tmp_path / "all", df, fmt)
    store = run(tmp_path, src, True, columns=columns)
    expected = df.groupby(["user", "item"]).size()
    assert len(expected) < len(df)
    assert train_ratings(store) == {k: float(v) for k, v in expected.items()}
    assert store.manifest.dropped.duplicates_merged == len(df) - len(expected)


def test_a_header_that_cannot_be_told_from_text_ids_is_an_error(tmp_path):
    f = write_csv(tmp_path / "e.csv", [("u1", "i1"), ("u2", "i1"), ("u1", "i2")], header=None)
    with pytest.raises(InputError, match=r"e\.csv: cannot tell whether line 1 is a header"):
        run(tmp_path, f, True, columns={"user": 0, "item": 1, "rating": None})
    store = run(tmp_path, f, True, header=False, columns={"user": 0, "item": 1, "rating": None})
    assert train_ratings(store) == {("u1", "i1"): 1.0, ("u2", "i1"): 1.0, ("u1", "i2"): 1.0}
    # A header over numeric ids is recognised as one.
    g = write_csv(tmp_path / "h.csv", [(1, 2), (3, 4)], header=("who", "what"))
    store = run(tmp_path, g, True, columns={"user": 0, "item": 1, "rating": None})
    assert train_ratings(store) == {(1, 2): 1.0, (3, 4): 1.0}
    # Text ids with a numeric timestamp: line 1 is data, or a header above such lines.
    positions = {"user": 0, "item": 1, "timestamp": 2, "rating": None}
    rows = [("u1", "i1", 100), ("u2", "i1", 200)]
    for header in (None, ("who", "what", "when")):
        h = write_csv(tmp_path / "t.csv", rows, header=header)
        assert train_ratings(run(tmp_path, h, True, columns=positions)) == {
            ("u1", "i1"): 1.0,
            ("u2", "i1"): 1.0,
        }


def test_rating_range_without_a_rating_column_names_the_row(tmp_path):
    f = write_csv(tmp_path / "e.csv", [(1, 2), (3, 4)], header=("user", "item"))
    with pytest.raises(InputError) as e:
        run(tmp_path, f, True, columns={"rating": None}, rating_range=[2, 5])
    msg = str(e.value)
    assert f"{f}, line 2 (no rating column: data.columns.rating is null)" in msg
    assert "data.rating_range" in msg


# -- data.duplicates: sum -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [{}, {"batch_rows": 7, "id_partition_rows": 50}])
def test_duplicates_sum_matches_a_pandas_groupby(tmp_path, layout):
    df = events(seed=1)
    src = write_csv(tmp_path / "e.csv", df.values.tolist(), header=list(df.columns))
    cfg = config(
        tmp_path,
        src,
        duplicates="sum",
        columns={"timestamp": "timestamp"},
        **layout,
    )
    cfg = cfg.model_copy(
        update={
            "split": cfg.split.model_copy(
                update={"method": "random", "test": 0.3, "validation": 0.0}
            )
        }
    )
    store = ingest(cfg, progress=False)
    # Pass 1 reads each weight as the store's float32; pass 3 adds them up in float64.
    df["rating"] = df.rating.astype(np.float32).astype(np.float64)
    ref = df.groupby(["user", "item"]).agg(rating=("rating", "sum"), timestamp=("timestamp", "max"))
    assert store.manifest.dropped.duplicates_merged == len(df) - len(ref)
    assert store.n_train + store.manifest.n_test == len(ref)
    got = train_ratings(store)
    uid, iid = store.ids("user").to_pylist(), store.ids("item").to_pylist()
    test = store.read_split("test").to_pydict()
    held = {
        (uid[u], iid[i]): (r, t)
        for u, i, r, t in zip(
            test["user"], test["item"], test["rating"], test["timestamp"], strict=True
        )
    }
    assert held and not set(held) & set(got)
    for key, row in ref.iterrows():
        # The sum in float64, stored as float32.
        want = float(np.float32(row.rating))
        if key in got:
            assert got[key] == want
        else:
            # Held-out rows keep their timestamp: the pair's latest.
            assert held[key] == (want, row.timestamp)
    assert store.manifest.mu == pytest.approx(
        np.mean([v for k, v in ref.rating.items() if k in got]), rel=1e-6
    )


# -- implicit feedback: weights must be >= 0 ------------------------------------------------------


def test_negative_implicit_weight_is_an_error_naming_the_file_and_row_or_dropped(tmp_path):
    rows = [(1, 10, 2.0, 1), (1, 11, 0.0, 2), (2, 10, -1.5, 3), (3, 12, 4.0, 4), (3, 12, 1.0, 5)]
    f = write_csv(tmp_path / "w.csv", rows)
    with pytest.raises(InputError) as e:
        run(tmp_path, f, True)
    msg = str(e.value)
    assert f"{f}, line 4, column 'rating' (data.columns.rating)" in msg
    assert "-1.5 is negative" in msg and "data.invalid_ratings: drop" in msg
    assert not (tmp_path / "store").exists()

    store = run(tmp_path, f, True, invalid_ratings="drop")
    # Zero weights stay; the negative one is dropped and counted; the repeated pair is summed.
    assert train_ratings(store) == {(1, 10): 2.0, (1, 11): 0.0, (3, 12): 5.0}
    assert store.manifest.dropped.invalid_ratings == 1
    assert store.manifest.dropped.duplicates_merged == 1

    # Parquet: the row is named.
    p = tmp_path / "w.parquet"
    pq.write_table(pa.table({"user": [1, 2, 3], "item": [5, 5, 5], "rating": [1.0, 2.0, -0.25]}), p)
    with pytest.raises(InputError, match=r"w\.parquet, row 3, column 'rating'.*-0\.25 is negative"):
        run(tmp_path, p, True)
    # NaN is still the invalid rating it always was.
    q = write_csv(tmp_path / "n.csv", [(1, 10, "nan", 1)])
    with pytest.raises(InputError, match=r"n\.csv, line 2, column 'rating'.*not a finite number"):
        run(tmp_path, q, True)


def test_negative_ratings_are_fine_for_explicit_feedback(tmp_path):
    f = write_csv(tmp_path / "w.csv", [(1, 10, -2.0, 1), (2, 10, 1.0, 2)])
    assert train_ratings(run(tmp_path, f)) == {(1, 10): -2.0, (2, 10): 1.0}


# -- the default duplicates policy follows model.feedback -----------------------------------------


def test_default_duplicates_policy_is_sum_under_implicit_and_error_for_explicit(tmp_path):
    rows = [(1, 10, 2.0, 1), (1, 10, 3.0, 2), (2, 11, 1.0, 3)]
    f = write_csv(tmp_path / "d.csv", rows)
    explicit, implicit = config(tmp_path, f), config(tmp_path, f, True)
    assert explicit.data.duplicates == "error" and implicit.data.duplicates == "sum"
    with pytest.raises(InputError, match=r"user 1 rated item 10 more than once.*'sum'"):
        ingest(explicit, progress=False)
    store = ingest(implicit, progress=False)
    assert train_ratings(store) == {(1, 10): 5.0, (2, 11): 1.0}
    assert store.manifest.dropped.duplicates_merged == 1
    assert store.manifest.config["data"]["duplicates"] == "sum"
    # Set explicitly, a policy holds under implicit feedback too.
    assert config(tmp_path, f, True, duplicates="last").data.duplicates == "last"
    # A store ingested for implicit feedback is not the one for explicit ratings, even with the
    # same data settings (negative weights are refused or dropped only under implicit).
    spec = resolve_inputs(explicit.data, explicit.resolve)
    same_data = config(tmp_path, f, duplicates="sum")
    assert fingerprint(same_data, spec) != fingerprint(implicit, spec)
