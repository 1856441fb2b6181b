"""Reading a Parquet file a manifest lists (dmf.store.storage.read_table / open_parquet), on a
local disk and on a real S3 server (moto's, on loopback), by both of its paths: verified in
memory, and (above ``VERIFY_IN_MEMORY``) verified in a streaming pass, then read in place.

Each path gives the rows written, and a damaged file is an error naming it. The in-memory path
reads into memory that Arrow owns: Arrow's threads may free a read's source after the read has
returned, and a Python-owned source then needs the GIL, which aborted a finished process at exit
("terminate called without an active exception": the ingest subprocess of
tests/test_ids.py died so now and then)."""

from __future__ import annotations

import gc
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dmf.store.storage as storage
from dmf.errors import StoreError
from dmf.store.storage import Location, Target, open_parquet, read_table, read_verified_buffer


def written(root: str) -> tuple[pa.Table, Location, storage.FileEntry]:
    """A 3-column table of 50,000 rows in 5 row groups, written through a Target (its manifest
    entry: size and CRC-32); the table, where it is and its entry."""
    rng = np.random.default_rng(4)
    n = 50_000
    table = pa.table(
        {
            "user": rng.integers(0, 1 << 40, n),
            "item": rng.integers(0, 1 << 20, n).astype(np.int32),
            "rating": rng.random(n).astype(np.float32),
        }
    )
    target = Target(Location.of(root), "t0k3n")
    with target.open("part.parquet") as w:
        pq.write_table(table, w, row_group_size=10_000)
    return table, target.location("part.parquet"), w.entry


def put(loc: Location, data: bytes) -> None:
    with loc.open("wb") as f:
        f.write(data)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "dir")
    return request.getfixturevalue("s3_bucket") + "/dir"


@pytest.fixture(params=["in memory", "streamed"])
def path(request, monkeypatch):
    if request.param == "streamed":
        monkeypatch.setattr(storage, "VERIFY_IN_MEMORY", 1024)
    return request.param


def test_read_table_gives_the_rows_written(root, path):
    table, loc, entry = written(root)
    assert entry.bytes > 1024  # the streamed path is taken
    assert read_table(loc, entry).equals(table)
    assert read_table(loc, entry, columns=["item", "rating"]).equals(
        table.select(["item", "rating"])
    )
    pf = open_parquet(loc, entry)
    threads = storage.arrow_threads(loc, entry)
    assert threads == (path == "in memory" or root.startswith("/"))
    got = pa.Table.from_batches(list(pf.iter_batches(batch_size=7_000, use_threads=threads)))
    assert got.equals(table)


def test_a_damaged_file_is_an_error_naming_it(root, path):
    table, loc, entry = written(root)
    data = loc.read_bytes()
    name = re.escape(loc.url)
    with pytest.raises(StoreError, match=rf"{name} is not the Parquet file dmf wrote: .*'score'"):
        read_table(loc, entry, columns=["user", "score"])
    put(loc, data + b"x")
    with pytest.raises(StoreError, match=rf"{name} has {entry.bytes + 1} bytes, the manifest"):
        read_table(loc, entry)
    put(loc, data[:-10])
    with pytest.raises(StoreError, match=rf"{name} has {entry.bytes - 10} bytes.*truncated"):
        read_table(loc, entry)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x40
    put(loc, bytes(flipped))
    with pytest.raises(StoreError, match=rf"{name} is corrupt"):
        open_parquet(loc, entry)
    loc.remove()
    with pytest.raises(StoreError, match=rf"{name} is missing"):
        read_table(loc, entry)


def test_the_in_memory_path_reads_into_memory_arrow_owns(tmp_path):
    """The verified bytes are in Arrow's memory pool, not a Python object (whose release would
    need the GIL), and are freed with the last reference to them."""
    table, loc, entry = written(str(tmp_path))
    gc.collect()
    before = pa.total_allocated_bytes()
    buf = read_verified_buffer(loc, entry)
    assert buf.size == entry.bytes and buf.to_pybytes() == loc.read_bytes()
    assert pa.total_allocated_bytes() - before >= entry.bytes
    assert pq.read_table(pa.BufferReader(buf)).equals(table)
    del buf
    gc.collect()
    assert pa.total_allocated_bytes() - before < entry.bytes
