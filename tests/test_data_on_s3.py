"""The data layer on object storage: synth, readers and ingest against a real S3 server (moto's
standalone server on loopback, the ``s3`` fixture), compared with the same runs on local disk.

Workers share nothing local with the driver: the cluster test starts worker processes whose
working directory and local directory are temporary directories of their own, and the store,
its spill files and the input all live in the bucket.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from dmf.config import SynthConfig, load_config
from dmf.data.ingest import data_to_ingest, fingerprint, ingest
from dmf.data.readers import iter_batches, resolve_inputs
from dmf.data.synth import load_truth, synth, synth_files
from dmf.errors import InputError, StoreError
from dmf.store.layout import Store
from dmf.store.storage import Location, read_table

SYNTH = dict(n_users=400, n_items=150, n_ratings=8000, rank=3, noise=0.3, seed=11, files=3)
SECTIONS = {
    "split": {"method": "temporal", "validation": 0.1, "test": 0.15},
    "blocks": {"n_blocks": 3},
    "data": {"batch_rows": 1500},
}


def s3fs_() -> fsspec.AbstractFileSystem:
    """A filesystem of our own on the test server, without a listings cache (it sees what other
    processes wrote)."""
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def ingest_config(source: str | None, store: str, synth_path: str | None = None, **sections):
    raw: dict = {"store": {"path": store, "overwrite": True}}
    if source is not None:
        raw["data"] = {"source": source}
    if synth_path is not None:
        raw["synth"] = {"enabled": True, "path": synth_path, **SYNTH}
    for k, v in {**SECTIONS, **sections}.items():
        raw.setdefault(k, {}).update(v)
    return load_config(raw=raw)


def contents(store: Store) -> dict:
    """Everything a store holds, decoded, by logical file name; and what its manifest counts."""
    m = store.manifest
    files = {rel: read_table(store.file(rel), e) for rel, e in m.files.items()}
    counts = {
        k: getattr(m, k)
        for k in ("n_users", "n_items", "n_train", "n_validation", "n_test", "mu", "clipped")
    }
    counts["blocks"] = m.blocks
    counts["split"] = m.split
    counts["dropped"] = m.dropped
    # Each file's size, CRC-32 and rows: the same bytes were written.
    sums = {rel: (e.bytes, e.crc32, e.rows) for rel, e in m.files.items()}
    return {"files": files, "counts": counts, "sums": sums}


def assert_same_store(a: Store, b: Store) -> None:
    ca, cb = contents(a), contents(b)
    assert ca["counts"] == cb["counts"]
    assert ca["sums"] == cb["sums"]
    assert ca["files"].keys() == cb["files"].keys()
    for rel, table in ca["files"].items():
        assert table.equals(cb["files"][rel]), rel
    for side in ("user", "item"):  # and every block, read as training reads it
        for ref in a.block_refs(side):
            x, y = a.read_block(side, ref.block), b.read_block(side, ref.block)
            assert np.array_equal(x.indptr, y.indptr) and np.array_equal(x.cols, y.cols)
            assert np.array_equal(x.vals, y.vals)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """Synth and ingest on local disk: what the same runs on S3 must give."""
    d = tmp_path_factory.mktemp("local")
    synth(SynthConfig(**SYNTH), d / "syn", progress=False)
    store = ingest(ingest_config(None, str(d / "store"), synth_path=str(d / "syn")), progress=False)
    return d, store


def test_synth_and_ingest_on_s3_equal_local(s3_bucket, local_reference):
    d, local = local_reference
    syn = f"{s3_bucket}/syn"
    summary = synth(SynthConfig(**SYNTH), syn, progress=False)
    # The synth output: the same files, byte for byte, under versioned names in the bucket.
    here, there = synth_files(d / "syn"), synth_files(syn)
    assert (
        here.keys()
        == there.keys()
        == {f"ratings/part-0000{k}.parquet" for k in range(3)} | {"truth.npz"}
    )
    listed = json.loads((d / "syn" / "synth.json").read_text())["files"]
    assert {rel: (e["bytes"], e["crc32"]) for rel, e in listed.items() if rel != "truth.npz"} == {
        rel: (e["bytes"], e["crc32"]) for rel, e in summary["files"].items() if rel != "truth.npz"
    }
    truth_here, truth_there = load_truth(d / "syn"), load_truth(syn)
    assert all(np.array_equal(truth_here[k], truth_there[k]) for k in truth_here)
    # Nothing else is in the output: its files and the manifest.
    assert sorted(s3fs_().find(syn.removeprefix("s3://"))) == sorted(
        [loc.path for loc in there.values()] + [f"{syn.removeprefix('s3://')}/synth.json"]
    )

    # Ingest from the bucket into the bucket, on threads: the same store as on local disk.
    store = ingest(ingest_config(None, f"{s3_bucket}/store", synth_path=syn), progress=False)
    assert str(store.root) == f"{s3_bucket}/store"
    assert_same_store(store, Store.open(f"{s3_bucket}/store"))
    assert_same_store(local, store)
    # Nothing is left of the spill; the store's directory holds its files and manifest only.
    assert store.leftovers() == []
    # The fingerprint of URL inputs: stable, and it changes when an input object is rewritten.
    cfg = ingest_config(None, f"{s3_bucket}/store", synth_path=syn)
    spec = resolve_inputs(data_to_ingest(cfg), cfg.resolve, cfg.storage.options)
    assert [str(f.path) for f in spec.files] == [
        str(there[f"ratings/part-0000{k}.parquet"]) for k in range(3)
    ]
    assert fingerprint(cfg, spec) == store.fingerprint
    first = spec.files[0].path
    first.fs.pipe(first.path, first.read_bytes())
    assert fingerprint(cfg, spec) != store.fingerprint


@pytest.mark.cluster
def test_ingest_on_s3_with_worker_processes_that_share_nothing_local(
    s3_bucket, local_reference, tmp_path, monkeypatch
):
    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    d, local = local_reference
    syn = f"{s3_bucket}/syn"
    synth(SynthConfig(**SYNTH), syn, progress=False)
    worker_cwd, worker_local = tmp_path / "worker-cwd", tmp_path / "worker-local"
    worker_cwd.mkdir()
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    # Worker processes start in a directory of their own (they inherit the cwd at start).
    monkeypatch.chdir(worker_cwd)
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        local_directory=str(worker_local),
        env=BLAS_ENV,
    ) as cluster:
        monkeypatch.chdir(driver_cwd)
        with Client(cluster) as client:
            cwds = set(client.run(os.getcwd).values())
            assert cwds == {str(worker_cwd)}
            store = ingest(
                ingest_config(None, f"{s3_bucket}/store", synth_path=syn),
                client=client,
                progress=False,
            )
    assert_same_store(local, store)
    assert store.leftovers() == []
    # Neither side wrote anything locally: the spill and the blocks went to the bucket.
    assert list(worker_cwd.iterdir()) == [] and list(driver_cwd.iterdir()) == []
    assert not [p for p in worker_local.rglob("*") if p.suffix in (".bin", ".parquet")]


def test_readers_on_s3_read_what_they_read_locally(s3_bucket, tmp_path):
    """Every input form: a directory (prefix), a glob, gzip and zstd, a multi-character
    delimiter (translated as it streams), Parquet, string ids; batch for batch."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    n = 3000
    u, i = rng.integers(0, 200, n), rng.integers(0, 90, n)
    r, t = rng.integers(1, 11, n) / 2, rng.integers(0, 10**9, n)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    colon = "".join(f"u{a}::{b}::{c}::{e}\n" for a, b, c, e in zip(u, i, r, t, strict=True))
    (src / "a.dat.gz").write_bytes(gzip.compress(colon.encode()))
    text = "user,item,rating\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(u, i, r, strict=True))
    (src / "sub" / "b.csv.zst").write_bytes(pa.compress(text.encode(), codec="zstd", asbytes=True))
    pq.write_table(pa.table({"user": u, "item": i, "rating": r}), src / "sub" / "c.parquet")
    (src / "sub" / "_SUCCESS").write_text("")
    (src / "sub" / ".hidden.csv").write_text("junk\n")
    fs = s3fs_()
    for f in src.rglob("*"):
        if f.is_file():
            fs.pipe(f"{s3_bucket}/in/{f.relative_to(src)}".removeprefix("s3://"), f.read_bytes())

    def read(source, **data):
        cfg = load_config(raw={"data": {"source": source, "batch_rows": 700, **data}})
        spec = resolve_inputs(cfg.data, cfg.resolve, cfg.storage.options)
        batches = list(iter_batches(spec))
        return spec, [
            (b.kind, b.first, b.user.to_pylist(), b.item.to_pylist(), b.rating.tolist())
            for b in batches
        ]

    cols = {"columns": {"user": 0, "item": 1, "rating": 2, "timestamp": 3}}
    for local, remote, data in [
        (str(src / "a.dat.gz"), f"{s3_bucket}/in/a.dat.gz", cols),
        (str(src / "sub"), f"{s3_bucket}/in/sub", {}),
        (str(src / "sub" / "*.csv.zst"), f"{s3_bucket}/in/sub/*.csv.zst", {}),
        (str(src / "**" / "c.parquet"), f"{s3_bucket}/in/**/c.parquet", {}),
    ]:
        spec_l, got_l = read(local, **data)
        spec_r, got_r = read(remote, **data)
        assert got_l == got_r and got_l
        assert [f.path.name for f in spec_l.files] == [f.path.name for f in spec_r.files]
        assert [(f.format, f.compression) for f in spec_l.files] == [
            (f.format, f.compression) for f in spec_r.files
        ]
        assert all(str(f.path).startswith(f"{s3_bucket}/in/") for f in spec_r.files)


@pytest.mark.parametrize(
    "name, match",
    [
        # Arrow reports the ragged row without a line number: the slow rescan finds it.
        ("r.csv.gz", r"line 2501: 2 field\(s\), expected 3"),
        ("r.dat", r"line 7, column '#2' \(data.columns.rating\).*'five' is not a number"),
    ],
)
def test_bad_line_on_s3_is_the_same_error_naming_the_url(s3_bucket, tmp_path, name, match):
    if name.endswith(".gz"):
        rows = ["user,item,rating"] + [f"{k},{k % 13},3.0" for k in range(3000)]
        rows[2500] = "9,9"
        data = gzip.compress(("\n".join(rows) + "\n").encode())
        extra = {"batch_rows": 100}
    else:
        rows = [f"{k}::{k % 5}::4.0" for k in range(6)] + ["6::1::five", "7::2::1.0"]
        data = ("\n".join(rows) + "\n").encode()
        extra = {"columns": {"user": 0, "item": 1, "rating": 2}, "delimiter": "::"}
    local = tmp_path / name
    local.write_bytes(data)
    url = f"{s3_bucket}/raw/{name}"
    s3fs_().pipe(url.removeprefix("s3://"), data)
    errors = []
    for source, store in ((str(local), str(tmp_path / "store")), (url, f"{s3_bucket}/store")):
        cfg = load_config(
            raw={
                "data": {"source": source, **extra},
                "split": {"method": "none"},
                "store": {"path": store},
            }
        )
        with pytest.raises(InputError, match=match) as e:
            ingest(cfg, progress=False)
        errors.append(str(e.value))
    assert errors[0].startswith(f"{local}, line ")
    assert errors[1] == errors[0].replace(str(local), url)
    # Nothing was left in the bucket by the failed ingest.
    assert not s3fs_().exists(f"{s3_bucket}/store".removeprefix("s3://"))


def test_killed_ingest_on_s3_keeps_the_old_store_and_leaves_leftovers(s3_bucket, tmp_path):
    rng = np.random.default_rng(5)
    n = 120_000
    keys = rng.choice(3000 * 800, size=n, replace=False)
    text = "user,item,rating\n" + "".join(
        f"{k // 800},{k % 800},{(k % 9) / 2 + 1}\n" for k in keys.tolist()
    )
    big = tmp_path / "big.csv"
    big.write_text(text)
    small = tmp_path / "small.csv"
    small.write_text("\n".join(text.splitlines()[:201]) + "\n")
    store_url = f"{s3_bucket}/store"
    old = ingest(
        load_config(
            raw={
                "data": {"source": str(small)},
                "split": {"method": "random", "test": 0.2},
                "store": {"path": store_url},
            }
        ),
        progress=False,
    )
    old_version = old.manifest.version
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"data:\n  source: {big}\n  batch_rows: 60000\n"
        f"store:\n  path: {store_url}\n  overwrite: true\n"
        "blocks:\n  n_blocks: 30\nsplit:\n  method: random\n  test: 0.2\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmf", "ingest", str(cfg), "--no-cluster", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fs = s3fs_()
    prefix = store_url.removeprefix("s3://")

    def new_blocks() -> list[str]:
        found = fs.find(f"{prefix}/by_user") if fs.exists(f"{prefix}/by_user") else []
        return [f for f in found if f".{old_version}." not in f]

    # Kill it once some of its block files exist (it is writing blocks, not yet committed).
    deadline = time.time() + 60
    try:
        while not new_blocks() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"
    killed = new_blocks()
    assert killed

    # The previous store is whole: opened, every file checked, every block and split read.
    store = Store.open(store_url)
    assert store.manifest.version == old_version
    store.verify_all()
    for side in ("user", "item"):
        blocks = [store.read_block(side, ref.block) for ref in store.block_refs(side)]
        assert sum(len(b.vals) for b in blocks) == store.n_train
    held = len(store.read_split("validation")) + len(store.read_split("test"))
    assert store.n_train + held == 200
    # What the killed ingest wrote is reported as leftovers: its blocks and its spill.
    stray = store.leftovers()
    assert {f"{prefix}/{rel}" for rel in stray} >= set(killed)
    assert any(rel.startswith(".scratch-") for rel in stray)
    assert not [rel for rel in stray if f".{old_version}." in rel]


def test_manifest_listing_a_missing_or_short_file_is_an_error_naming_it(s3_bucket):
    from dmf.store.layout import store_from_arrays

    rng = np.random.default_rng(2)
    keys = rng.choice(50 * 30, size=400, replace=False)
    store = store_from_arrays(
        f"{s3_bucket}/store", keys // 30, keys % 30, rng.random(400), n_blocks=2
    )
    fs = s3fs_()
    block = store.block_path("item", 1)
    data = block.read_bytes()
    assert str(block).startswith(f"{s3_bucket}/store/by_item/block=00001/part-0.")

    fs.pipe(block.path, data[: len(data) // 2])  # short
    with pytest.raises(StoreError, match=rf"{re.escape(str(block))}.*truncated"):
        Store.open(store.root)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, other bytes: caught when read
    fs.pipe(block.path, bytes(flipped))
    opened = Store.open(store.root)
    with pytest.raises(StoreError, match=rf"{re.escape(str(block))} is corrupt"):
        opened.read_block("item", 1)
    fs.rm(block.path)  # missing
    with pytest.raises(StoreError, match=rf"{re.escape(str(block))} is missing"):
        Store.open(store.root)

    # A synth output whose manifest lists a file that is gone: ingest names it.
    syn = f"{s3_bucket}/syn"
    synth(SynthConfig(**{**SYNTH, "files": 2}), syn, progress=False)
    gone = synth_files(syn)["ratings/part-00001.parquet"]
    fs.rm(gone.path)
    with pytest.raises(InputError, match=re.escape(str(gone))):
        ingest(ingest_config(None, f"{s3_bucket}/store2", synth_path=syn), progress=False)
    assert isinstance(gone, Location)
