"""The store: train ratings on disk as Parquet, partitioned by user block and by item block.

Layout (see PRODUCT.md)::

    store/
      manifest.json          counts, mu, block boundaries, split, schema version, fingerprint,
                             and every file with its size and row count (written last)
      users.parquet          id (raw, int64 or string), index (int32), n_ratings (train count)
      items.parquet
      by_user/block=NNNNN/part-0.parquet   columns user, item (int32), rating (float32),
                                           sorted by (user, item); users in [bounds[b], bounds[b+1])
      by_item/block=NNNNN/part-0.parquet   the same ratings, sorted by (item, user)
      validation/part-0.parquet, test/part-0.parquet   user, item, rating[, timestamp]

The manifest is typed (:class:`StoreManifest`): opening a store validates it, so a damaged or
foreign manifest is an error naming the key, not a KeyError later.

:class:`StoreWriter` builds a store through :class:`dmf.store.storage.Staging` (a temporary
sibling directory, renamed into place only when the manifest is written), so an interrupted
write never leaves a store that looks complete and an old store stays intact until the new one is
whole. :meth:`Store.open` checks every file against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from dmf.errors import StoreError
from dmf.store.blocks import SIDES, RatingBlock
from dmf.store.storage import Staging, write_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("validation", "test")

RATING_SCHEMA = pa.schema([("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32())])


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Record):
    """One file of a store, as the manifest lists it."""

    bytes: int
    rows: int


class BlockLayout(_Record):
    """The blocks of one side: block b holds rows [bounds[b], bounds[b+1]) and nnz[b] ratings."""

    bounds: list[int]
    nnz: list[int]


class DroppedRows(_Record):
    """Input rows the ingest policies removed (``data.invalid_ratings``, ``data.out_of_range``,
    ``data.duplicates``)."""

    invalid_ratings: int = 0
    out_of_range: int = 0
    duplicates_merged: int = 0


class SplitRecord(_Record):
    """How the held-out ratings were chosen: the ``split`` config, and what it gave."""

    method: str
    validation: float = 0.0
    test: float = 0.0
    seed: int | None = None
    actual: dict[str, float] | None = None
    """The fractions of the input actually held out."""
    cutoffs: dict[str, int] | None = None
    """Temporal split: the first held-out timestamp of each split."""


class StoreManifest(_Record):
    """``manifest.json``: what a store holds, written last by :meth:`StoreWriter.commit`."""

    schema_version: int
    n_users: int
    n_items: int
    n_train: int
    n_validation: int = 0
    n_test: int = 0
    mu: float
    blocks: dict[Literal["user", "item"], BlockLayout]
    split: SplitRecord
    fingerprint: str
    """What the store was made from: its ingest's inputs and settings, or its arrays."""
    files: dict[str, FileEntry]
    dropped: DroppedRows | None = None
    clipped: int = 0
    source: str | None = None
    input: dict[str, Any] | None = None
    """The input files and how they were read (ingest)."""
    config: dict[str, Any] | None = None
    """The ``data``, ``split`` and ``blocks`` config sections of the ingest."""
    timings: dict[str, float] | None = None
    created: str | None = None
    dmf_version: str | None = None

    def n_split(self, name: str) -> int:
        return self.n_validation if name == "validation" else self.n_test


def block_relpath(side: str, b: int) -> str:
    return f"by_{side}/block={b:05d}/part-0.parquet"


def write_block_file(
    path: str | Path, side: str, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray
) -> FileEntry:
    """Write one block's ratings (already sorted by ``side``) to ``path``.

    ``rows`` are indices of ``side``; ``cols`` of the other side. Returns the file entry for the
    manifest (bytes and rows). Used by ingest on the driver or on workers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    users, items = (rows, cols) if side == "user" else (cols, rows)
    table = pa.table(
        {
            "user": pa.array(np.asarray(users, dtype=np.int32)),
            "item": pa.array(np.asarray(items, dtype=np.int32)),
            "rating": pa.array(np.asarray(vals, dtype=np.float32)),
        },
        schema=RATING_SCHEMA,
    )
    # No dictionary encoding: the other side's column has many distinct values, where the
    # dictionary costs ~3x the write time for no gain in size after zstd.
    pq.write_table(table, path, compression="zstd", row_group_size=1 << 20, use_dictionary=False)
    return FileEntry(bytes=path.stat().st_size, rows=len(table))


def read_block_file(path: str | Path, side: str, start: int, stop: int) -> RatingBlock:
    """Read one block file into a :class:`RatingBlock` (runs on workers)."""
    try:
        table = pq.read_table(path, columns=["user", "item", "rating"])
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"cannot read block file {path}: {exc}") from exc
    key, other = ("user", "item") if side == "user" else ("item", "user")
    rows = table.column(key).to_numpy()
    cols = table.column(other).to_numpy()
    vals = table.column("rating").to_numpy()
    try:
        return RatingBlock.from_coo(side, start, stop, rows, cols, vals, assume_sorted=True)
    except ValueError as exc:
        raise StoreError(f"block file {path} is malformed: {exc}") from exc


class Store:
    """An opened, verified store. Cheap to pickle: it holds the manifest, not the ratings."""

    def __init__(self, path: str | Path, manifest: StoreManifest):
        self.path = Path(path)
        self.manifest = manifest

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Store:
        """Open the store at ``path``; with ``verify``, check every file against the manifest."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise StoreError(f"no store at {path}: run `dmf ingest` first")
        if not mpath.is_file():
            raise StoreError(
                f"{path} has no {MANIFEST}: it is not a store, or its ingest did not finish"
            )
        try:
            raw = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{mpath} is not valid JSON: {exc}") from exc
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{mpath}: schema version {version} is not {SCHEMA_VERSION}; re-run `dmf ingest` "
                "with this version of dmf"
            )
        try:
            manifest = StoreManifest.model_validate(raw)
        except ValidationError as exc:
            where = "; ".join(
                f"{'.'.join(str(k) for k in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise StoreError(f"{mpath} is not a valid store manifest: {where}") from None
        store = cls(path, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check that every file in the manifest exists with its recorded size."""
        for rel, entry in self.manifest.files.items():
            f = self.path / rel
            if not f.is_file():
                raise StoreError(f"store file {f} is missing (listed in {self.path / MANIFEST})")
            size = f.stat().st_size
            if size != entry.bytes:
                raise StoreError(
                    f"store file {f} has {size} bytes, the manifest says {entry.bytes}: "
                    "it is truncated or was changed; re-run `dmf ingest`"
                )

    # -- counts --------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return self.manifest.n_users

    @property
    def n_items(self) -> int:
        return self.manifest.n_items

    @property
    def n_train(self) -> int:
        return self.manifest.n_train

    @property
    def mu(self) -> float:
        return self.manifest.mu

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def n_rows(self, side: str) -> int:
        return self.n_users if side == "user" else self.n_items

    def bounds(self, side: str) -> np.ndarray:
        """Block boundaries of ``side``: block b holds rows [bounds[b], bounds[b+1])."""
        return np.asarray(self.manifest.blocks[side].bounds, dtype=np.int64)

    def block_nnz(self, side: str) -> list[int]:
        return list(self.manifest.blocks[side].nnz)

    def n_blocks(self, side: str) -> int:
        return len(self.bounds(side)) - 1

    def block_path(self, side: str, b: int) -> Path:
        return self.path / block_relpath(side, b)

    def block_args(self, side: str) -> Iterator[tuple[int, str, int, int]]:
        """(block number, file path, start, stop) of every block of ``side``."""
        bounds = self.bounds(side)
        for b in range(len(bounds) - 1):
            yield b, str(self.block_path(side, b)), int(bounds[b]), int(bounds[b + 1])

    def read_block(self, side: str, b: int) -> RatingBlock:
        bounds = self.bounds(side)
        return read_block_file(self.block_path(side, b), side, int(bounds[b]), int(bounds[b + 1]))

    def disk_bytes(self) -> int:
        return sum(e.bytes for e in self.manifest.files.values())

    # -- id maps and held-out splits -------------------------------------------------------------
    def id_map(self, side: str) -> pa.Table:
        """Table (id, index, n_ratings) ordered by dense index."""
        return pq.read_table(self.path / f"{side}s.parquet")

    def ids(self, side: str) -> pa.Array:
        return self.id_map(side).column("id").combine_chunks()

    def counts(self, side: str) -> np.ndarray:
        """Train rating count of every row of ``side``, shape (n_rows,)."""
        return self.id_map(side).column("n_ratings").to_numpy().astype(np.int64)

    def read_split(self, name: str) -> pa.Table:
        """Held-out ratings of ``name`` ('validation' or 'test'); empty table if none."""
        if name not in SPLITS:
            raise StoreError(f"unknown split {name!r}; expected one of {SPLITS}")
        f = self.path / name / "part-0.parquet"
        if not f.is_file():
            return RATING_SCHEMA.empty_table()
        return pq.read_table(f)

    def n_split(self, name: str) -> int:
        return self.manifest.n_split(name)

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, users={self.n_users}, items={self.n_items}, "
            f"train={self.n_train}, blocks={self.n_blocks('user')}/{self.n_blocks('item')})"
        )


class StoreWriter:
    """Write a store atomically, through :class:`dmf.store.storage.Staging`: files go into a
    temporary sibling directory (:attr:`tmp`), renamed into place on :meth:`commit`.

    Use as a context manager; leaving it without commit (an error) removes the temporary
    directory. A directory that already exists and is not empty is refused unless ``overwrite``.
    """

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise StoreError(
                f"store directory {self.path} is not empty; set store.overwrite: true "
                "(or --set store.overwrite=true) to replace it"
            )
        self.staging = Staging(self.path)
        self.files: dict[str, FileEntry] = {}

    @property
    def tmp(self) -> Path:
        """The directory the new store is written into (workers write block files there)."""
        return self.staging.path

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.staging.committed:
            self.abort()

    def abort(self) -> None:
        self.staging.abort()

    def block_file(self, side: str, b: int) -> Path:
        return self.staging.file(block_relpath(side, b))

    def add_file(self, rel: str, entry: FileEntry) -> None:
        self.files[rel] = entry

    def write_block(self, side: str, b: int, rows, cols, vals) -> FileEntry:
        entry = write_block_file(self.block_file(side, b), side, rows, cols, vals)
        self.add_file(block_relpath(side, b), entry)
        return entry

    def write_table(self, rel: str, table: pa.Table, **parquet_options: Any) -> FileEntry:
        """Write one Parquet file of the store and list it in the manifest."""
        f = self.staging.file(rel)
        pq.write_table(table, f, **parquet_options)
        entry = FileEntry(bytes=f.stat().st_size, rows=len(table))
        self.add_file(rel, entry)
        return entry

    def write_id_map(self, side: str, ids: pa.Array, counts: np.ndarray) -> None:
        table = pa.table(
            {
                "id": ids,
                "index": pa.array(np.arange(len(ids), dtype=np.int32)),
                "n_ratings": pa.array(np.asarray(counts, dtype=np.int64)),
            }
        )
        self.write_table(f"{side}s.parquet", table)

    def write_split(self, name: str, table: pa.Table) -> None:
        self.write_table(f"{name}/part-0.parquet", table, compression="zstd")

    def commit(self, manifest: dict[str, Any]) -> Store:
        """Validate the manifest, write it last, then put the store in place."""
        for side in SIDES:
            if side not in manifest.get("blocks", {}):
                raise StoreError(f"manifest lacks blocks.{side}")
        try:
            m = StoreManifest.model_validate(
                {
                    **manifest,
                    "schema_version": SCHEMA_VERSION,
                    "files": dict(sorted(self.files.items())),
                }
            )
        except ValidationError as exc:  # a bug of ours, not the user's: say which key
            raise StoreError(f"cannot write the store manifest of {self.path}: {exc}") from exc
        write_atomic(self.tmp / MANIFEST, m.model_dump_json(indent=1, exclude_none=True))
        self.staging.commit()
        return Store(self.path, m)


def balanced_bounds(counts: np.ndarray, target: int, n_blocks: int | None = None) -> np.ndarray:
    """Contiguous block boundaries over rows whose train counts are ``counts``.

    Each block gets about ``target`` ratings (or the total split into ``n_blocks`` equal shares);
    a row is never split, so a block can exceed the target by one row's count. Always at least
    one block; never an empty block unless there are no rows at all.
    """
    n = len(counts)
    if n == 0:
        return np.array([0, 0], dtype=np.int64)
    cum = np.cumsum(counts, dtype=np.int64)
    total = int(cum[-1])
    if n_blocks is not None:
        nb = max(1, min(n_blocks, n))
        share = max(total / nb, 1.0)
    else:
        nb = max(1, min(n, int(np.ceil(total / max(target, 1)))))
        share = max(total / nb, 1.0)
    # Cut after the first row at which the cumulative count reaches each multiple of share.
    cuts = np.searchsorted(cum, share * np.arange(1, nb), side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n), [n]]))
    return bounds.astype(np.int64)


def store_from_arrays(
    path: str | Path,
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    n_users: int | None = None,
    n_items: int | None = None,
    target_ratings: int = 1_000_000,
    n_blocks: int | None = None,
    held_out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    user_ids: pa.Array | None = None,
    item_ids: pa.Array | None = None,
    overwrite: bool = False,
) -> Store:
    """Write a store from in-memory train ratings given as dense indices.

    For data that already fits in memory (tests, notebooks, small experiments); ``dmf ingest``
    is the out-of-core path for files. ``held_out`` maps 'validation'/'test' to (users, items,
    ratings) arrays of dense indices. Raw ids default to the dense indices themselves.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=np.float32)
    n_users = int(n_users if n_users is not None else (users.max() + 1 if len(users) else 0))
    n_items = int(n_items if n_items is not None else (items.max() + 1 if len(items) else 0))
    pairs = np.sort(users * max(n_items, 1) + items)  # sort: far faster than np.unique here
    if len(pairs) > 1 and not np.all(np.diff(pairs)):
        raise StoreError("store_from_arrays: duplicate (user, item) pairs in the train ratings")
    held_out = held_out or {}
    with StoreWriter(path, overwrite=overwrite) as w:
        counts = {
            "user": np.bincount(users, minlength=n_users),
            "item": np.bincount(items, minlength=n_items),
        }
        blocks: dict[str, Any] = {}
        for side, rows, cols in (("user", users, items), ("item", items, users)):
            bounds = balanced_bounds(counts[side], target_ratings, n_blocks)
            order = np.lexsort((cols, rows))
            r, c, v = rows[order], cols[order], ratings[order]
            cuts = np.searchsorted(r, bounds)
            nnz = []
            for b in range(len(bounds) - 1):
                lo, hi = cuts[b], cuts[b + 1]
                w.write_block(side, b, r[lo:hi], c[lo:hi], v[lo:hi])
                nnz.append(int(hi - lo))
            blocks[side] = {"bounds": bounds.tolist(), "nnz": nnz}
        user_ids = user_ids if user_ids is not None else pa.array(np.arange(n_users))
        item_ids = item_ids if item_ids is not None else pa.array(np.arange(n_items))
        w.write_id_map("user", user_ids, counts["user"])
        w.write_id_map("item", item_ids, counts["item"])
        for name, (hu, hi_, hr) in held_out.items():
            w.write_split(
                name,
                pa.table(
                    {
                        "user": pa.array(np.asarray(hu, dtype=np.int32)),
                        "item": pa.array(np.asarray(hi_, dtype=np.int32)),
                        "rating": pa.array(np.asarray(hr, dtype=np.float32)),
                    },
                    schema=RATING_SCHEMA,
                ),
            )
        # What the store is made of: the ratings and the raw ids they stand for (two stores of
        # the same indices but other ids are different stores).
        h = hashlib.sha256()
        for a in (users, items, ratings):
            h.update(np.ascontiguousarray(a).tobytes())
        for ids in (user_ids, item_ids):
            h.update(_ids_digest(ids))
        manifest = {
            "n_users": n_users,
            "n_items": n_items,
            "n_train": len(ratings),
            **{f"n_{name}": len(held_out[name][0]) if name in held_out else 0 for name in SPLITS},
            "mu": float(ratings.astype(np.float64).mean()) if len(ratings) else 0.0,
            "blocks": blocks,
            "split": {"method": "given"},
            "fingerprint": h.hexdigest()[:16],
            "source": "arrays",
        }
        return w.commit(manifest)


def _ids_digest(ids: pa.Array) -> bytes:
    """A digest of raw ids, their type and order included."""
    h = hashlib.sha256(str(ids.type).encode())
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if pa.types.is_integer(arr.type):
        h.update(arr.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        return h.digest()
    # Strings: their lengths, then their bytes, straight from the Arrow buffers.
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    h.update(np.diff(offsets).tobytes())
    if len(arr) and arr.buffers()[2] is not None:
        h.update(memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
    return h.digest()
