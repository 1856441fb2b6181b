"""Raw ids -> dense indices: IdIndex against Arrow's own exact lookup, the store index maps, and
ingest's string id map (ranks in byte order, hash collisions, memory)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import random_ratings
from hypothesis import given, settings
from hypothesis import strategies as st

import dmf.data.idmap as idmap_mod
import dmf.model.ids as ids_mod
from dmf.data.idmap import StrIdMapper
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


# -- ingest's string id map (dmf.data.idmap) ---------------------------------------------------


def map_batches(batches):
    """Each batch's codes, then finish(), from a fresh StrIdMapper."""
    m = StrIdMapper()
    codes = [m.encode(pa.array(b, type=pa.string())) for b in batches]
    return codes, m.finish()


def check_mapper(batches):
    """Dense indices are the ranks of the ids in UTF-8 byte order, counts are rows per id, and
    equal ids get one code, different ids different ones."""
    codes, (index_of_code, ids, counts) = map_batches(batches)
    every = [x for b in batches for x in b]
    expect = sorted(set(every), key=lambda x: x.encode())
    assert ids.type == pa.string() and ids.to_pylist() == expect
    rank = {x: k for k, x in enumerate(expect)}
    got = [int(index_of_code[c]) for cs in codes for c in cs]
    assert got == [rank[x] for x in every]
    assert counts.tolist() == [every.count(x) for x in expect]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.text(min_size=1, max_size=8), max_size=20), max_size=6))
def test_string_id_map_ranks_ids_in_byte_order(batches):
    check_mapper(batches)


def test_string_id_map_with_colliding_hashes(monkeypatch):
    """Hashes shared by a known and a new id, or by two new ones: never a merged id."""
    batches = [["b", "a", "b"], ["c", "a", "d", "e"], ["e", "f", "a", "zz"], ["g"]]
    monkeypatch.setattr(idmap_mod, "hash_strings", lambda a: np.zeros(len(a), dtype=np.uint64))
    check_mapper(batches)
    # Distinct hashes at first, then a new id hashing like a known one.
    monkeypatch.setattr(
        idmap_mod,
        "hash_strings",
        lambda a: np.array([7 if s in ("a", "imposter") else 100 + ord(s[0]) for s in
                            a.to_pylist()], dtype=np.uint64),
    )  # fmt: skip
    check_mapper([["a", "b"], ["b", "imposter", "c"], ["c", "a", "imposter"]])


_LONG_ID_INGEST = """
import resource, sys
from pathlib import Path
from dmf.config import load_config
from dmf.data.ingest import ingest

d = Path(sys.argv[1])
lines = ["user,item,rating"] + [f"{k % 50},item-{k},3.0" for k in range(2000)]
lines.append(f"7,{'x' * (1 << 20)},4.0")
(d / "r.csv").write_text("\\n".join(lines) + "\\n")
cfg = load_config(raw={
    "data": {"source": str(d / "r.csv"), "max_id_length": 2 << 20},
    "split": {"method": "none"},
    "store": {"path": str(d / "store")},
})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
store = ingest(cfg, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(store.n_items, len(max(store.ids("item").to_pylist(), key=len)), (after - before) // 1024)
"""


def test_one_long_item_id_costs_its_own_length(tmp_path):
    """2,000 short item ids and one of 1 MiB: the driver's id map grows with the ids' total
    length, not their number times the longest (a fixed-width array would take 2 GiB). Peak RSS
    of a fresh process, measured around the ingest."""
    proc = subprocess.run(
        [sys.executable, "-c", _LONG_ID_INGEST, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Its stderr in the message: this process used to die of SIGABRT at exit now and then, when
    # Arrow's threads freed Python bytes then (see tests/test_storage_reads.py).
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    out = proc.stdout.split()
    n_items, longest, extra_mib = (int(x) for x in out)
    assert n_items == 2001 and longest == 1 << 20
    assert extra_mib < 200, f"ingest peaked {extra_mib} MiB above the process before it"
