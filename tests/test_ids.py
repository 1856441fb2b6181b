"""Raw ids -> dense indices: IdIndex against Arrow's own exact lookup, and the store index maps."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import random_ratings
from hypothesis import given, settings
from hypothesis import strategies as st

import dmf.model.ids as ids_mod
from dmf.model.ids import IdIndex, as_id_array, hash_strings, inverse_map, store_index_maps
from dmf.store.layout import store_from_arrays


def exact(values: pa.Array, known: pa.Array) -> np.ndarray:
    """The reference: Arrow's hash lookup, built anew for the call."""
    return pc.index_in(values, value_set=known).fill_null(-1).to_numpy(zero_copy_only=False)


@settings(max_examples=60, deadline=None)
@given(
    known=st.lists(st.text(max_size=12), unique=True, max_size=60),
    extra=st.lists(st.text(max_size=12), max_size=30),
)
def test_string_lookup_equals_arrows(known, extra):
    known_arr = pa.array(known, type=pa.string())
    queries = pa.array(known[::2] + extra + known[1::3], type=pa.string())
    got = IdIndex(known_arr).index_of(queries)
    np.testing.assert_array_equal(got, exact(queries, known_arr))


@settings(max_examples=60, deadline=None)
@given(
    known=st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=60),
    extra=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
)
def test_integer_lookup_equals_arrows(known, extra):
    known_arr = pa.array(known, type=pa.int64())
    queries = pa.array(known[::2] + extra, type=pa.int64())
    got = IdIndex(known_arr).index_of(queries)
    np.testing.assert_array_equal(got, exact(queries, known_arr))


def test_nulls_text_for_integer_ids_and_sliced_arrays():
    idx = IdIndex(pa.array([10, 20, 30], type=pa.int64()))
    # Text that is an integer finds it; text that is not cannot be any integer id: unknown.
    assert idx.index_of(["20", " 30 ", "bob", None]).tolist() == [1, 2, -1, -1]
    known = pa.array(["x", "é", "１", "1_0", ""]).slice(1, 4)
    s = IdIndex(known)
    assert s.index_of(["１", "x", "1_0", "", "é", None]).tolist() == [1, -1, 2, 3, 0, -1]
    assert hash_strings(known).tolist() == hash_strings(pa.array(known.to_pylist())).tolist()


def test_collisions_never_give_a_wrong_index(monkeypatch):
    """With a hash that puts every string in one bucket, answers still equal Arrow's."""
    known = pa.array([f"id{k}" for k in range(50)])
    queries = pa.array(["id7", "nope", "id49", "id0", "zzz"])
    monkeypatch.setattr(ids_mod, "hash_strings", lambda a: np.zeros(len(a), dtype=np.uint64))
    np.testing.assert_array_equal(IdIndex(known).index_of(queries), exact(queries, known))
    # Known ids with distinct hashes, a query hashing like one of them: unknown, not a match.
    monkeypatch.setattr(
        ids_mod,
        "hash_strings",
        lambda a: np.array([7 if s in ("id3", "imposter") else 1000 + k for k, s in
                            enumerate(a.to_pylist())], dtype=np.uint64),
    )  # fmt: skip
    small = pa.array(["id1", "id2", "id3"])
    assert IdIndex(small).index_of(["imposter", "id3"]).tolist() == [-1, 2]


def test_many_ids_one_lookup_per_call_is_fast():
    """The lookup is built once: a single-id call on 1M string ids costs well under a
    millisecond (rebuilding a hash of every id per call took ~100 ms)."""
    import time

    idx = IdIndex(pa.array([f"user-{k:07d}" for k in range(1_000_000)]))
    assert idx.index_of(["user-0123456"]).tolist() == [123456]  # builds
    t0 = time.perf_counter()
    for _ in range(200):
        idx.index_of(["user-0654321"])
    per_call = (time.perf_counter() - t0) / 200
    assert per_call < 5e-3, per_call


def test_store_index_maps_own_store_and_another(tmp_path):
    u, i, r = random_ratings(30, 20, 300, seed=3)
    a = store_from_arrays(tmp_path / "a", u, i, r, n_users=30, n_items=20, n_blocks=2)
    users, items = IdIndex(a.ids("user")), IdIndex(a.ids("item"))
    assert store_index_maps(users, items, a.fingerprint, a).same
    # Another store whose raw ids are a shifted range: indices map by raw id, -1 where unknown.
    b = store_from_arrays(
        tmp_path / "b",
        u,
        i,
        r,
        n_users=30,
        n_items=20,
        user_ids=pa.array(np.arange(30) + 10),
        item_ids=pa.array(np.arange(20)),
    )
    maps = store_index_maps(users, items, a.fingerprint, b)
    assert maps.item is not None and maps.item.tolist() == list(range(20))
    want = [s + 10 if s + 10 < 30 else -1 for s in range(30)]
    assert maps.user.tolist() == want
    inv = inverse_map(maps.user, 30)
    assert all(inv[m] == s for s, m in enumerate(want) if m >= 0)
    assert (inv[:10] == -1).all()


def test_as_id_array_refuses_what_cannot_be_an_id():
    with pytest.raises(Exception, match="cannot be read"):
        as_id_array([1.5], pa.int64(), "user")
