"""Property tests: on small random inputs (ids, duplicates, NaN and out-of-range ratings, any
policy, any batch size and block count) the store equals a plain in-memory computation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmf.config import load_config
from dmf.data.ingest import ingest, pair_hash
from dmf.store.layout import Store


def reference(rows, invalid, rng_range, out_of_range, duplicates, test, seed):
    """The store's content computed in memory, one row at a time: (train, test) as sets of
    (raw user, raw item, rating)."""
    kept = []
    for order, (u, i, r, t) in enumerate(rows):
        if not np.isfinite(r):
            assert invalid == "drop"
            continue
        if rng_range is not None and not (rng_range[0] <= r <= rng_range[1]):
            if out_of_range == "drop":
                continue
            r = min(max(r, rng_range[0]), rng_range[1])
        kept.append((u, i, float(np.float32(r)), t, order))
    groups: dict = {}
    for row in kept:
        groups.setdefault((row[0], row[1]), []).append(row)
    merged = {}
    for key, g in groups.items():
        if duplicates == "last":
            merged[key] = max(g, key=lambda x: (x[3], x[4]))[2]
        else:
            merged[key] = float(np.float32(np.mean([x[2] for x in g])))
    users = sorted({k[0] for k in merged})
    items = sorted({k[1] for k in merged})
    uidx = {u: k for k, u in enumerate(users)}
    iidx = {i: k for k, i in enumerate(items)}
    train, held = set(), set()
    for (u, i), r in merged.items():
        x = pair_hash(np.array([uidx[u]]), np.array([iidx[i]]), seed)[0]
        (held if x < test else train).add((u, i, r))
    return train, held, users, items


def store_sets(store: Store):
    uid = store.ids("user").to_pylist()
    iid = store.ids("item").to_pylist()
    sides = {}
    for side in ("user", "item"):
        s = []
        for ref in store.block_refs(side):
            blk = store.read_block(side, ref.block)
            rows = np.repeat(np.arange(blk.start, blk.stop), np.diff(blk.indptr))
            for row, c, v in zip(rows, blk.cols, blk.vals, strict=True):
                u, i = (row, c) if side == "user" else (c, row)
                s.append((uid[u], iid[i], float(v)))
        sides[side] = s
    t = store.read_split("test").to_pydict()
    held = {
        (uid[u], iid[i], float(r))
        for u, i, r in zip(t["user"], t["item"], t["rating"], strict=True)
    }
    return sides, held, uid, iid


ids_int = st.integers(-50, 10**12)
# A letter first: in CSV, ids that all look like integers are read as integers.
ids_str = st.text(alphabet="abcXYZ_-é0", min_size=0, max_size=5).map(lambda s: "k" + s)
rating = st.one_of(
    st.sampled_from([0.5, 1.0, 2.5, 5.0]),
    st.floats(-2, 8, allow_nan=False, width=32),
    st.just(float("nan")),
)


@st.composite
def inputs(draw):
    string_ids = draw(st.booleans())
    idst = ids_str if string_ids else ids_int
    users = draw(st.lists(idst, min_size=1, max_size=8, unique=True))
    items = draw(st.lists(idst, min_size=1, max_size=8, unique=True))
    n = draw(st.integers(1, 60))
    rows = [
        (
            draw(st.sampled_from(users)),
            draw(st.sampled_from(items)),
            draw(rating),
            draw(st.integers(0, 5)),
        )
        for _ in range(n)
    ]
    return rows


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=inputs(),
    rng_range=st.one_of(st.none(), st.just((0.5, 5.0))),
    out_of_range=st.sampled_from(["drop", "clip"]),
    duplicates=st.sampled_from(["last", "mean"]),
    test=st.sampled_from([0.0, 0.3]),
    batch_rows=st.integers(1, 70),
    n_blocks=st.integers(1, 5),
    fmt=st.sampled_from(["csv", "parquet"]),
)
def test_store_matches_in_memory_reference(
    rows, rng_range, out_of_range, duplicates, test, batch_rows, n_blocks, fmt
):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if fmt == "csv":
            f = d / "r.csv"
            lines = ["user\titem\trating\ttimestamp"]
            lines += [f"{u}\t{i}\t{r!r}\t{t}" for u, i, r, t in rows]
            f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            f = d / "r.parquet"
            u, i, r, t = (list(x) for x in zip(*rows, strict=True))
            pq.write_table(pa.table({"user": u, "item": i, "rating": r, "timestamp": t}), f)
        cfg = load_config(
            raw={
                "data": {
                    "source": str(f),
                    "columns": {"timestamp": "timestamp"},
                    "invalid_ratings": "drop",
                    "rating_range": list(rng_range) if rng_range else None,
                    "out_of_range": out_of_range,
                    "duplicates": duplicates,
                    "batch_rows": batch_rows,
                },
                "split": {
                    "method": "random" if test else "none",
                    "validation": 0,
                    "test": test,
                    "seed": 3,
                },
                "blocks": {"n_blocks": n_blocks},
                "store": {"path": str(d / "store")},
            }
        )
        train, held, users, items = reference(
            rows, "drop", rng_range, out_of_range, duplicates, test, 3
        )
        if not train and not held:
            import pytest

            from dmf.errors import InputError

            with pytest.raises(InputError, match="dropped"):
                ingest(cfg, progress=False)
            return
        store = ingest(cfg, progress=False)
        sides, got_held, uid, iid = store_sets(store)
        # Each train rating exactly once on each side (lists, so repeats would show).
        assert sorted(sides["user"]) == sorted(train)
        assert sorted(sides["item"]) == sorted(train)
        assert got_held == held
        assert uid == users and iid == items
        assert store.n_blocks("user") <= n_blocks
        assert sum(store.counts("user")) == len(train) == store.n_train
