"""dmf ingest end to end on real files: store invariants, ids, splits, policies, presets, formats,
the CLI, atomicity, and the same store across batch sizes and with a multi-process Dask cluster."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmf.cli import main
from dmf.config import load_config
from dmf.data.ingest import ingest
from dmf.errors import ConfigError, InputError, StoreError
from dmf.store.layout import Store


def write_csv(path: Path, rows, header=("user", "item", "rating", "timestamp"), sep=","):
    lines = [sep.join(header)] if header else []
    lines += [sep.join(str(x) for x in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_rows(n_users=60, n_items=40, nnz=900, seed=0, string_ids=False):
    """Distinct (user, item) pairs with ratings in 0.5..5 and distinct-ish timestamps."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(n_users * n_items, size=nnz, replace=False)
    # Raw ids are sparse and unordered, so the dense index (rank of the raw id) is a real remap.
    uid = rng.permutation(n_users) * 7 + 3
    iid = rng.permutation(n_items) * 11 + 1000
    u, i = uid[keys // n_items], iid[keys % n_items]
    r = rng.integers(1, 11, nnz) / 2
    t = 1_000_000 + rng.permutation(nnz) * 10
    if string_ids:
        u = np.array([f"user-{x:05d}" for x in u])
        i = np.array([f"item/{x}" for x in i])
    return list(zip(u.tolist(), i.tolist(), r.tolist(), t.tolist(), strict=True))


def cfg_for(tmp_path: Path, source, **sections):
    raw = {
        "data": {"source": source, "columns": {"timestamp": "timestamp"}},
        "store": {"path": str(tmp_path / "store")},
    }
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return load_config(raw=raw)


def store_triples(store: Store):
    """Everything in a store as raw-id triples: {'by_user', 'by_item', 'validation', 'test'}."""
    uid = store.ids("user").to_pylist()
    iid = store.ids("item").to_pylist()
    out = {}
    for side in ("user", "item"):
        rows = []
        for ref in store.block_refs(side):
            t = store.read_block(side, ref.block)
            for rr, (lo, hi) in enumerate(zip(t.indptr[:-1], t.indptr[1:], strict=True)):
                row = t.start + rr
                for c, v in zip(t.cols[lo:hi], t.vals[lo:hi], strict=True):
                    u, i = (row, c) if side == "user" else (c, row)
                    rows.append((uid[u], iid[i], float(v)))
        out[f"by_{side}"] = sorted(rows)
    for name in ("validation", "test"):
        t = store.read_split(name).to_pydict()
        out[name] = sorted(
            (uid[u], iid[i], float(r))
            for u, i, r in zip(t["user"], t["item"], t["rating"], strict=True)
        )
    return out


def check_block_files(store: Store) -> None:
    """Blocks are contiguous, cover every row, hold only their rows, sorted by (key, other)."""
    for side in ("user", "item"):
        bounds = store.bounds(side)
        assert bounds[0] == 0 and bounds[-1] == store.n_rows(side)
        assert np.all(np.diff(bounds) > 0)
        key, other = (side, "item" if side == "user" else "user")
        total = 0
        for ref in store.block_refs(side):
            b, start, stop = ref.block, ref.start, ref.stop
            t = pq.read_table(Path(ref.location))
            k = t.column(key).to_numpy().astype(np.int64)
            o = t.column(other).to_numpy().astype(np.int64)
            assert t.schema.field("user").type == pa.int32()
            assert t.schema.field("rating").type == pa.float32()
            assert len(k) == store.block_nnz(side)[b]
            if len(k):
                assert k.min() >= start and k.max() < stop
                composite = k * (store.n_rows("item" if side == "user" else "user") + 1) + o
                assert np.all(np.diff(composite) > 0), "not sorted by (key, other) or duplicated"
            total += len(k)
        assert total == store.n_train


@pytest.fixture
def rows():
    return make_rows()


@pytest.fixture
def csv_file(tmp_path, rows):
    return write_csv(tmp_path / "ratings.csv", rows)


def test_every_rating_once_blocks_sorted_and_balanced(tmp_path, rows, csv_file):
    cfg = cfg_for(
        tmp_path,
        str(csv_file),
        blocks={"n_blocks": 4},
        data={"batch_rows": 100},
        split={"method": "random", "validation": 0.1, "test": 0.2},
    )
    store = ingest(cfg, progress=False)
    check_block_files(store)
    got = store_triples(store)
    # by_user and by_item hold the same train ratings; train + held-out is exactly the input.
    assert got["by_user"] == got["by_item"]
    everything = sorted(got["by_user"] + got["validation"] + got["test"])
    assert everything == sorted((u, i, float(r)) for u, i, r, _ in rows)
    assert not set(got["test"]) & set(got["by_user"])
    m = store.manifest
    assert m.n_train + m.n_validation + m.n_test == len(rows)
    assert 0.1 < m.n_test / len(rows) < 0.3
    assert m.mu == pytest.approx(np.mean([r for _, _, r in got["by_user"]]), rel=1e-6)
    # id maps: counts are the train counts; index order is the raw ids' order.
    for side, k in (("user", 0), ("item", 1)):
        ids = store.ids(side).to_pylist()
        assert ids == sorted({row[k] for row in rows})
        counts = dict(zip(ids, store.counts(side).tolist(), strict=True))
        for x in ids:
            assert counts[x] == sum(1 for row in got["by_user"] if row[k] == x)
    # Balanced over train counts: every block within one row's count of an equal share.
    for side in ("user", "item"):
        nnz = np.array(store.block_nnz(side))
        assert len(nnz) == 4
        assert np.abs(nnz - store.n_train / 4).max() <= store.counts(side).max()
    for key in ("n_users", "n_items", "fingerprint", "dropped", "input", "timings", "split"):
        assert getattr(m, key) is not None


def test_target_ratings_sets_block_count(tmp_path, csv_file, rows):
    cfg = cfg_for(tmp_path, str(csv_file), blocks={"target_ratings": 100}, split={"method": "none"})
    store = ingest(cfg, progress=False)
    n = len(rows)
    assert store.n_blocks("user") == pytest.approx(n / 100, abs=1)
    counts = store.counts("user")
    assert max(store.block_nnz("user")) <= 100 + counts.max()
    check_block_files(store)


@pytest.mark.parametrize("id_partition_rows", [None, 97])
def test_string_ids_round_trip(tmp_path, id_partition_rows):
    rows = make_rows(string_ids=True, seed=3)
    f = write_csv(tmp_path / "s.csv", rows)
    data = {} if id_partition_rows is None else {"id_partition_rows": id_partition_rows}
    cfg = cfg_for(tmp_path, str(f), split={"method": "none"}, data=data)
    store = ingest(cfg, progress=False)
    assert store.ids("user").type == pa.string()
    assert store_triples(store)["by_user"] == sorted((u, i, float(r)) for u, i, r, _ in rows)
    assert store.ids("user").to_pylist() == sorted({u for u, *_ in rows})


def test_integer_looking_ids_that_turn_into_strings(tmp_path):
    # The first 600 lines have integer user ids; later ones do not: all are read as strings.
    rows = [(k % 50, k % 7, 3.0, k) for k in range(600)] + [("x9", 1, 2.0, 1)]
    rows = list({(u, i): (u, i, r, t) for u, i, r, t in rows}.values())
    f = write_csv(tmp_path / "m.csv", rows)
    store = ingest(cfg_for(tmp_path, str(f), split={"method": "none"}), progress=False)
    ids = store.ids("user").to_pylist()
    assert "x9" in ids and "0" in ids and len(ids) == 51
    assert store.ids("item").type == pa.int64()


def run_store(tmp_path, name, source, client=None, **sections):
    cfg = cfg_for(tmp_path, source, **sections)
    cfg.store.path = str(tmp_path / name)
    return ingest(cfg, client=client, progress=False)


@pytest.mark.parametrize("method", ["random", "user", "temporal"])
def test_split_same_across_batch_sizes_and_cluster(tmp_path, client, method):
    rows = make_rows(nnz=1500, seed=5)
    f = write_csv(tmp_path / "r.csv", rows)
    sections = {
        "split": {"method": method, "validation": 0.1, "test": 0.15, "seed": 7},
        "blocks": {"n_blocks": 3},
    }
    # One user-id range (store b), or many ranked by separate tasks (a: ~15, c: ~5 on the
    # cluster): the dense indices are the global ranks of the raw ids either way.
    stores = [
        run_store(
            tmp_path, "a", str(f), data={"batch_rows": 37, "id_partition_rows": 100}, **sections
        ),
        run_store(tmp_path, "b", str(f), data={"batch_rows": 1_000_000}, **sections),
        run_store(
            tmp_path,
            "c",
            str(f),
            client=client,
            data={"batch_rows": 200, "id_partition_rows": 300},
            **sections,
        ),
    ]
    first = store_triples(stores[0])
    assert first["test"] and first["validation"]
    for s in stores[1:]:
        assert store_triples(s) == first
        assert s.manifest.blocks == stores[0].manifest.blocks
        # Identical block contents and id maps, not just equal sets.
        for side in ("user", "item"):
            for ref in stores[0].block_refs(side):
                a, b = Path(ref.location), Path(s.block_path(side, ref.block))
                assert pq.read_table(a).equals(pq.read_table(b))
            assert s.id_map(side).equals(stores[0].id_map(side))


@pytest.mark.parametrize("method", ["random", "user"])
def test_split_does_not_depend_on_the_block_layout(tmp_path, method):
    rows = make_rows(nnz=1500, seed=8)
    f = write_csv(tmp_path / "r.csv", rows)
    split = {"method": method, "validation": 0.2, "test": 0.3}
    one = run_store(tmp_path, "one", str(f), split=split, blocks={"n_blocks": 1})
    many = run_store(tmp_path, "many", str(f), split=split, blocks={"target_ratings": 40})
    assert many.n_blocks("user") > 10
    a, b = store_triples(one), store_triples(many)
    assert a == b and a["test"] and a["validation"]


def test_user_split_keeps_singletons_and_takes_each_users_share(tmp_path):
    rows = make_rows(nnz=1200, seed=2)
    rows.append((999_999, 1000, 4.0, 5))  # a user with one rating
    f = write_csv(tmp_path / "r.csv", rows)
    store = run_store(tmp_path, "s", str(f), split={"method": "user", "test": 0.25})
    got = store_triples(store)
    assert (999_999, 1000, 4.0) in got["by_user"]
    per_user: dict = {}
    for u, *_ in rows:
        per_user[u] = per_user.get(u, 0) + 1
    test_per_user: dict = {}
    for u, *_ in got["test"]:
        test_per_user[u] = test_per_user.get(u, 0) + 1
    for u, n in per_user.items():
        expect = min(int(np.floor(0.25 * n + 0.5)), n - 1)
        assert test_per_user.get(u, 0) == expect


def test_temporal_split_holds_out_the_latest(tmp_path):
    rows = make_rows(nnz=1000, seed=4)
    f = write_csv(tmp_path / "r.csv", rows)
    store = run_store(
        tmp_path,
        "t",
        str(f),
        split={"method": "temporal", "validation": 0.1, "test": 0.2},
        blocks={"n_blocks": 3},
    )
    # Blocks are balanced over train counts, though held-out rows are not spread evenly.
    nnz = np.array(store.block_nnz("user"))
    assert np.abs(nnz - store.n_train / 3).max() <= store.counts("user").max()
    ts = {(u, i): t for u, i, _, t in rows}
    got = store_triples(store)
    t_train = max(ts[(u, i)] for u, i, _ in got["by_user"])
    t_val = [ts[(u, i)] for u, i, _ in got["validation"]]
    t_test = [ts[(u, i)] for u, i, _ in got["test"]]
    assert t_train < min(t_val) and max(t_val) < min(t_test)
    actual = store.manifest.split.actual
    assert actual["test"] == pytest.approx(0.2, abs=0.01)
    assert actual["validation"] == pytest.approx(0.1, abs=0.01)
    assert "timestamp" in store.read_split("test").column_names


@pytest.mark.parametrize("method", ["random", "user", "temporal"])
def test_a_negative_split_seed_is_a_seed_like_any_other(tmp_path, method):
    # split.seed is any integer; hashes take it modulo 2**64 (it once overflowed in pass 1).
    f = write_csv(tmp_path / "r.csv", make_rows(nnz=600, seed=6))
    split = {"method": method, "test": 0.2, "seed": -7}
    a = store_triples(run_store(tmp_path, "a", str(f), split=split))
    assert len(a["by_user"]) + len(a["validation"]) + len(a["test"]) == 600 and a["test"]
    assert store_triples(run_store(tmp_path, "b", str(f), split=split)) == a


def test_temporal_without_timestamp_names_the_key(tmp_path, rows):
    f = write_csv(tmp_path / "r.csv", [r[:3] for r in rows], header=("user", "item", "rating"))
    cfg = load_config(
        raw={
            "data": {"source": str(f)},
            "split": {"method": "temporal"},
            "store": {"path": str(tmp_path / "s")},
        }
    )
    with pytest.raises(ConfigError, match="data.columns.timestamp"):
        ingest(cfg, progress=False)


@pytest.mark.parametrize("id_partition_rows", [None, 1])
@pytest.mark.parametrize("policy", ["last", "mean"])
def test_duplicate_policies(tmp_path, policy, id_partition_rows):
    rows = [
        (1, 10, 1.0, 300),
        (2, 10, 2.0, 100),
        (1, 10, 3.0, 100),  # older than the first: 'last' keeps 1.0 (timestamp 300)
        (2, 10, 4.0, 100),  # same timestamp as (2, 10, 2.0): input order decides, 4.0
        (3, 11, 5.0, 1),
    ]
    f = write_csv(tmp_path / "d.csv", rows)
    # With one row per batch and per user-id range, a user's rows meet only in pass 3: input
    # order must survive the passes before it.
    data = {"duplicates": policy}
    if id_partition_rows is not None:
        data.update(id_partition_rows=id_partition_rows, batch_rows=1)
    store = run_store(tmp_path, "s", str(f), split={"method": "none"}, data=data)
    got = dict(((u, i), r) for u, i, r in store_triples(store)["by_user"])
    if policy == "last":
        assert got == {(1, 10): 1.0, (2, 10): 4.0, (3, 11): 5.0}
    else:
        assert got == {(1, 10): 2.0, (2, 10): 3.0, (3, 11): 5.0}
    assert store.manifest.dropped.duplicates_merged == 2


def test_duplicate_error_names_the_raw_ids_from_any_user_range(tmp_path):
    rows = [(f"u{k:03d}", f"i{k % 7}", 3.0, k) for k in range(300)] + [("u123", "i4", 1.0, 9)]
    f = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(InputError, match="user 'u123' rated item 'i4' more than once"):
        run_store(tmp_path, "s", str(f), data={"duplicates": "error", "id_partition_rows": 20})


def test_invalid_and_out_of_range_policies_are_counted(tmp_path, capsys):
    rows = [(1, 1, 4.0, 1), (1, 2, "nan", 2), (2, 1, 9.0, 3), (2, 2, -1.0, 4), (3, 3, "", 5)]
    f = write_csv(tmp_path / "p.csv", rows)
    store = run_store(
        tmp_path,
        "s",
        str(f),
        split={"method": "none"},
        data={"invalid_ratings": "drop", "rating_range": [0.5, 5], "out_of_range": "clip"},
    )
    got = dict(((u, i), r) for u, i, r in store_triples(store)["by_user"])
    assert got == {(1, 1): 4.0, (2, 1): 5.0, (2, 2): 0.5}
    assert store.manifest.dropped.invalid_ratings == 2
    assert store.manifest.clipped == 2


# -- inputs: presets, compression, Parquet, globs and lists -------------------------------------


def _ml_rows():
    return [
        (1, 31, 2.5, 1260759144),
        (1, 1029, 3.0, 1260759179),
        (2, 10, 4.0, 835355493),
        (3, 1, 5.0, 1298862418),
        (10, 31, 0.5, 1298862419),
    ]


@pytest.mark.parametrize(
    "preset,subdir,filename,sep,header",
    [
        ("movielens-100k", "ml-100k", "u.data", "\t", None),
        ("movielens-1m", "ml-1m", "ratings.dat", "::", None),
        ("movielens-10m", "ml-10M100K", "ratings.dat", "::", None),
        (
            "movielens-20m",
            "ml-20m",
            "ratings.csv",
            ",",
            ("userId", "movieId", "rating", "timestamp"),
        ),
        (
            "movielens-25m",
            "ml-25m",
            "ratings.csv",
            ",",
            ("userId", "movieId", "rating", "timestamp"),
        ),
        (
            "movielens-32m",
            "ml-32m",
            "ratings.csv",
            ",",
            ("userId", "movieId", "rating", "timestamp"),
        ),
    ],
)
def test_movielens_presets(tmp_path, preset, subdir, filename, sep, header):
    d = tmp_path / "data" / subdir
    d.mkdir(parents=True)
    rows = _ml_rows()
    write_csv(d / filename, rows, header=header, sep=sep)
    expect = sorted((u, i, r) for u, i, r, _ in rows)
    for source in (d, d / filename):
        cfg = load_config(
            raw={
                "data": {"source": str(source), "preset": preset},
                "split": {"method": "none"},
                "store": {"path": str(tmp_path / "store"), "overwrite": True},
            }
        )
        store = ingest(cfg, progress=False)
        assert store_triples(store)["by_user"] == expect
    # Source may also be the parent of the unpacked directory.
    cfg.data.source = str(tmp_path / "data")
    assert ingest(cfg, progress=False).n_train == len(rows)


def test_compression_parquet_globs_and_lists_give_the_same_store(tmp_path, rows):
    half = len(rows) // 2
    a = write_csv(tmp_path / "a.csv", rows[:half])
    b = write_csv(tmp_path / "b.csv", rows[half:])
    gz = tmp_path / "in" / "a.csv.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(a.read_bytes()))
    zs = tmp_path / "in" / "b.csv.zst"
    zs.write_bytes(pa.compress(b.read_bytes(), codec="zstd", asbytes=True))
    pdir = tmp_path / "pq"
    pdir.mkdir()
    for k, part in enumerate((rows[:half], rows[half:])):
        u, i, r, t = (list(x) for x in zip(*part, strict=True))
        pq.write_table(
            pa.table({"user": u, "item": i, "rating": r, "timestamp": t}), pdir / f"p{k}.parquet"
        )
    sources = [
        [str(a), str(b)],
        str(tmp_path / "[ab].csv"),
        str(tmp_path / "in"),
        [str(gz), str(zs)],
        str(pdir),
        [str(pdir / "p0.parquet"), str(b)],
    ]
    expect = None
    for k, src in enumerate(sources):
        s = run_store(tmp_path, f"s{k}", src, split={"method": "random", "test": 0.2})
        got = store_triples(s)
        if expect is None:
            expect = got
            held = len(got["validation"]) + len(got["test"])
            assert len(got["by_user"]) + held == len(rows)
        assert got == expect, src
    assert sorted(s.manifest.input["compression"]) == ["none"]


# -- the command line --------------------------------------------------------------------------


def test_cli_ingest_and_info(tmp_path, csv_file, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"data:\n  source: {csv_file.name}\n  columns: {{timestamp: timestamp}}\n"
        "store:\n  path: out/store\nsplit:\n  method: random\n  test: 0.1\n"
    )
    assert main(["ingest", str(cfg), "--no-cluster", "-q", "--set", "blocks.n_blocks=2"]) == 0
    out = capsys.readouterr().out
    assert "user blocks  2" in out
    store_dir = tmp_path / "out" / "store"
    assert main(["info", str(store_dir)]) == 0
    out = capsys.readouterr().out
    m = Store.open(store_dir).manifest
    assert f"train        {m.n_train:,} ratings" in out
    assert m.fingerprint in out and "dropped" in out and "disk" in out
    assert main(["info", str(store_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_test"] == m.n_test
    # A second ingest into the same directory is refused without overwrite.
    assert main(["ingest", str(cfg), "--no-cluster", "-q"]) == 2
    assert "store.overwrite" in capsys.readouterr().err
    assert main(["ingest", str(cfg), "--no-cluster", "-q", "--set", "store.overwrite=true"]) == 0


def test_cli_ingest_on_a_running_cluster(tmp_path, csv_file, client, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"data:\n  source: {csv_file}\nstore:\n  path: {tmp_path / 'st'}\n")
    addr = client.scheduler.address
    assert main(["ingest", str(cfg), "-q", "--address", addr]) == 0
    assert Store.open(tmp_path / "st").n_train > 0


# -- the store on disk: verification and atomicity ----------------------------------------------


def test_truncated_or_deleted_file_is_an_error_naming_it(tmp_path, csv_file):
    store = run_store(tmp_path, "s", str(csv_file), blocks={"n_blocks": 2})
    f = Path(store.block_path("item", 1))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"by_item/block=00001/part-0\.\w+\.parquet.*truncated"):
        Store.open(store.path)
    f.write_bytes(data)
    Store.open(store.path)
    Path(store.file("users/block=00000/part-0.parquet")).unlink()
    with pytest.raises(StoreError, match=r"users/block=00000/part-0\.\w+\.parquet is missing"):
        Store.open(store.path)


def test_killed_ingest_leaves_no_store_and_keeps_the_old_one(tmp_path, caplog):
    rows = make_rows(n_users=2000, n_items=500, nnz=200_000, seed=9)
    f = write_csv(tmp_path / "big.csv", rows)
    small = write_csv(tmp_path / "small.csv", rows[:100])
    cfg = tmp_path / "job.yaml"
    for name, src in (("new", f), ("old", small)):
        store_dir = tmp_path / name
        if name == "old":
            run_store(tmp_path, "old", str(small))
            old_files = sorted(p for p in store_dir.rglob("*") if p.is_file())
        cfg.write_text(
            f"data:\n  source: {src if name == 'new' else f}\n  batch_rows: 500\n"
            f"store:\n  path: {store_dir}\n  overwrite: true\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "dmf", "ingest", str(cfg), "--no-cluster", "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill it as soon as its spill files appear (it is still reading).
        deadline = time.time() + 60
        while not list(store_dir.glob(".scratch-*/p1/*.arrow")) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # What it wrote is left over: in the store's directory, listed by no manifest.
        scratch = [p.name for p in store_dir.glob(".scratch-*")]
        assert len(scratch) == 1
        assert not list(tmp_path.glob(f".{name}*"))  # nothing next to the store
        if name == "new":
            assert not (store_dir / "manifest.json").exists()
            with pytest.raises(StoreError):
                Store.open(store_dir)
            # The next ingest names the leftovers and says how to remove them. The directory
            # holds nothing but what dmf left there, so it counts as empty: no overwrite needed.
            cfg2 = cfg_for(tmp_path, str(small))
            cfg2.store.path = str(store_dir)
            with caplog.at_level("WARNING", logger="dmf"):
                again = ingest(cfg2, progress=False)
            assert f"{scratch[0]}/" in caplog.text and "interrupted ingest" in caplog.text
            assert f"dmf clean {store_dir}" in caplog.text
            assert again.n_train + again.n_split("validation") + again.n_split("test") == 100
            assert all(rel.startswith(scratch[0] + "/") for rel in again.leftovers())
            # A directory holding anything else is refused without store.overwrite.
            (store_dir / "notes.txt").write_text("mine")
            with pytest.raises(StoreError, match="not empty.*store.overwrite"):
                ingest(cfg2, progress=False)
        else:
            store = Store.open(store_dir)
            assert store.n_train + store.n_split("validation") + store.n_split("test") == 100
            # The old store's files are untouched; the killed ingest's are its leftovers.
            assert sorted(p for p in store_dir.rglob("*") if p.is_file()) == sorted(
                old_files + [store_dir / rel for rel in store.leftovers()]
            )
            assert all(rel.startswith(scratch[0] + "/") for rel in store.leftovers())


def test_synth_output_is_the_default_source(tmp_path):
    from dmf.config import SynthConfig
    from dmf.data.synth import synth

    sc = {
        "enabled": True,
        "path": str(tmp_path / "syn"),
        "n_users": 50,
        "n_items": 30,
        "n_ratings": 600,
        "format": "parquet",
        "files": 2,
    }
    synth(SynthConfig(**sc), tmp_path / "syn", progress=False)
    cfg = load_config(
        raw={
            "synth": sc,
            "split": {"method": "temporal", "test": 0.2},
            "store": {"path": str(tmp_path / "store")},
        }
    )
    store = ingest(cfg, progress=False)
    assert store.n_train + store.n_split("validation") + store.n_split("test") == 600
    assert "timestamp" in store.read_split("test").column_names


def test_info_on_a_store_written_from_arrays(small_store, capsys):
    assert main(["info", str(small_store.path)]) == 0
    out = capsys.readouterr().out
    assert f"train        {small_store.n_train:,} ratings" in out
    assert "user blocks  3" in out and "split        given" in out


def test_tasks_run_twice_give_the_same_store(tmp_path, monkeypatch):
    # Dask reruns a task whose worker died before its result arrived: every per-chunk and
    # per-block pass must find its input again and write the same output.
    import dmf.data.ingest as ing

    rows = make_rows(nnz=1500, seed=9)
    f = write_csv(tmp_path / "r.csv", rows)
    sections = {"split": {"method": "user", "test": 0.2}, "blocks": {"n_blocks": 3}}
    # Several user-id ranges, so that every kind of task runs.
    sections["data"] = {"id_partition_rows": 400}
    once = store_triples(run_store(tmp_path, "once", str(f), **sections))
    for name in (
        "ingest_group_chunk",
        "ingest_rank_range",
        "ingest_split_bucket",
        "ingest_user_block",
        "ingest_item_block",
    ):
        real = getattr(ing, name)

        def twice(*a, _real=real, **kw):
            _real(*a, **kw)
            return _real(*a, **kw)

        twice.__name__ = real.__name__
        monkeypatch.setattr(ing, name, twice)
    assert store_triples(run_store(tmp_path, "twice", str(f), **sections)) == once


def test_temporal_cutoffs_do_not_depend_on_the_batching(tmp_path, monkeypatch):
    # The timestamp sample is trimmed as it grows, at points that depend on the batch size; the
    # cutoffs come from its rows of smallest hash only, which do not.
    import dmf.data.ingest as ing

    monkeypatch.setattr(ing, "TEMPORAL_SAMPLE", 50)
    rows = make_rows(nnz=1500, seed=11)
    f = write_csv(tmp_path / "r.csv", rows)
    split = {"method": "temporal", "validation": 0.1, "test": 0.2}
    stores = [
        run_store(tmp_path, name, str(f), split=split, data={"batch_rows": b})
        for name, b in (("small", 7), ("large", 1_000_000))
    ]
    cutoffs = [s.manifest.split.cutoffs for s in stores]
    assert cutoffs[0] == cutoffs[1]
    assert store_triples(stores[0]) == store_triples(stores[1])


def test_min_blocks_auto_is_the_threads_of_the_cluster_that_ingests(tmp_path, client):
    # The config says one worker, the cluster ingesting has two threads: two blocks a side.
    f = write_csv(tmp_path / "r.csv", make_rows(nnz=600, seed=8))
    s = run_store(tmp_path, "s", str(f), client=client, cluster={"n_workers": 1})
    assert sum(client.nthreads().values()) == 2
    assert (s.n_blocks("user"), s.n_blocks("item")) == (2, 2)
    # On threads (no cluster), the config's cluster decides.
    s1 = run_store(tmp_path, "t", str(f), cluster={"n_workers": 1})
    assert (s1.n_blocks("user"), s1.n_blocks("item")) == (1, 1)
