"""The store: train ratings as Parquet, partitioned by user block and by item block.

Layout (see PRODUCT.md), on a local disk or any URL (:mod:`dmf.store.storage`)::

    store/
      manifest.json          counts, mu, block boundaries, split, schema version, fingerprint,
                             and every file with its size, CRC-32 and row count (written last)
      users/block=NNNNN/part-0.TOKEN.parquet     id (raw, int64 or string), index (int32),
                             n_ratings (train count) of the users of user block b
      items/block=NNNNN/part-0.TOKEN.parquet
      by_user/block=NNNNN/part-0.TOKEN.parquet   columns user, item (int32), rating (float32),
                             sorted by (user, item); users in [bounds[b], bounds[b+1])
      by_item/block=NNNNN/part-0.TOKEN.parquet   the same ratings, sorted by (item, user)
      validation/block=NNNNN/part-0.TOKEN.parquet, test/block=NNNNN/...   user, item,
                             rating[, timestamp] of the held-out ratings of user block b

Everything is partitioned by block, so that a task handling one block reads what it needs and no
process ever needs a whole side's ids or held-out ratings.

TOKEN is the version written by one ingest: the manifest maps each file's logical name (e.g.
``by_user/block=00000/part-0.parquet``) to its actual name. A store is committed by
:class:`dmf.store.storage.Commit` (every file first, the manifest last, no rename), so an
interrupted ingest never leaves a store that looks complete and an old store stays readable
until the new manifest lands.

The manifest is typed (:class:`StoreManifest`): opening a store validates it, so a damaged or
foreign manifest is an error naming the key. :meth:`Store.open` checks that every file is there
with its size; every read checks the file's checksum (:func:`dmf.store.storage.read_verified`),
so a flipped byte is an error naming the file, never a different number.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from dmf.errors import LeaseError, StoreError
from dmf.store.blocks import SIDES, RatingBlock, other_side
from dmf.store.lease import CLAIMS, Holder, live_claims
from dmf.store.storage import (
    Commit,
    FileEntry,
    Location,
    Target,
    arrow_threads,
    leftovers,
    open_parquet,
    read_manifest,
    read_table,
    verify_file,
)

# 3: versioned file names and a CRC-32 of every file (dmf.store.storage); id maps and held-out
# splits partitioned by block.
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
SPLITS = ("validation", "test")

log = logging.getLogger("dmf")

RATING_SCHEMA = pa.schema([("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32())])


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    rating_range: tuple[float, float] | None = None
    """The lowest and highest train rating (stores of dmf 0.1 before it: unknown)."""
    blocks: dict[Literal["user", "item"], BlockLayout]
    split: SplitRecord
    fingerprint: str
    """What the store was made from: its ingest's inputs and settings, or its arrays."""
    files: dict[str, FileEntry]
    version: str | None = None
    """The token of the ingest that wrote this version of the store."""
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
    """The logical name of block ``b`` of ``side`` (the manifest gives its actual file)."""
    return f"by_{side}/block={b:05d}/part-0.parquet"


def id_map_relpath(side: str, b: int) -> str:
    """The logical name of the id map of block ``b`` of ``side``."""
    return f"{side}s/block={b:05d}/part-0.parquet"


def split_relpath(name: str, b: int) -> str:
    """The logical name of the held-out ratings ``name`` of user block ``b``."""
    return f"{name}/block={b:05d}/part-0.parquet"


@dataclass(frozen=True)
class BlockRef:
    """Where one block's ratings are, and what its file must be: all a worker needs to read it."""

    side: str
    block: int
    start: int
    stop: int
    location: Location
    entry: FileEntry
    n_other: int | None = None  # rows of the other side: every column must be below it


def block_table(side: str, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> pa.Table:
    users, items = (rows, cols) if side == "user" else (cols, rows)
    return pa.table(
        {
            "user": pa.array(np.asarray(users, dtype=np.int32)),
            "item": pa.array(np.asarray(items, dtype=np.int32)),
            "rating": pa.array(np.asarray(vals, dtype=np.float32)),
        },
        schema=RATING_SCHEMA,
    )


def write_block_file(
    target: Target, side: str, b: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray
) -> FileEntry:
    """Write block ``b`` of ``side`` (ratings already sorted by ``side``) into ``target``.

    ``rows`` are indices of ``side``; ``cols`` of the other side. Returns the file's manifest
    entry. Used by ingest on the driver or on workers.
    """
    # No dictionary encoding: the other side's column has many distinct values, where the
    # dictionary costs ~3x the write time for no gain in size after zstd.
    return target.write_table(
        block_relpath(side, b),
        block_table(side, rows, cols, vals),
        compression="zstd",
        row_group_size=1 << 20,
        use_dictionary=False,
    )


def write_id_map_file(
    target: Target, side: str, b: int, ids: pa.Array, start: int, counts: np.ndarray
) -> FileEntry:
    """Write the id map of block ``b`` of ``side``: raw ``ids`` of dense indices ``start``,
    ``start + 1``, ... and their train ``counts``. Returns the file's manifest entry (used on
    the driver or on workers)."""
    table = pa.table(
        {
            "id": ids,
            "index": pa.array(np.arange(start, start + len(ids), dtype=np.int32)),
            "n_ratings": pa.array(np.asarray(counts, dtype=np.int64)),
        }
    )
    return target.write_table(id_map_relpath(side, b), table)


def read_block_file(ref: BlockRef) -> RatingBlock:
    """Read one block into a :class:`RatingBlock`, its checksum verified (runs on workers)."""
    table = read_table(ref.location, ref.entry, columns=["user", "item", "rating"])
    key, other = ("user", "item") if ref.side == "user" else ("item", "user")
    rows = table.column(key).to_numpy()
    cols = table.column(other).to_numpy()
    vals = table.column("rating").to_numpy()
    if ref.n_other is not None and len(cols) and (cols.min() < 0 or cols.max() >= ref.n_other):
        bad = int(np.flatnonzero((cols < 0) | (cols >= ref.n_other))[0])
        raise StoreError(
            f"block file {ref.location} is malformed: row {bad} refers to {other} "
            f"{int(cols[bad])}, and the store has {ref.n_other:,} {other}s"
        )
    try:
        return RatingBlock.from_coo(
            ref.side, ref.start, ref.stop, rows, cols, vals, assume_sorted=True
        )
    except ValueError as exc:
        raise StoreError(f"block file {ref.location} is malformed: {exc}") from exc


def _manifest_error(loc: Location, exc: ValidationError) -> StoreError:
    where = "; ".join(f"{'.'.join(str(k) for k in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
    return StoreError(f"{loc} is not a valid store manifest: {where}")


class Store:
    """An opened store. Cheap to pickle: it holds the manifest, not the ratings.

    ``root`` (also ``path``) is its :class:`dmf.store.storage.Location`: a local directory or a
    URL, with the storage options to reach it.
    """

    def __init__(self, root: Location, manifest: StoreManifest):
        self.root = root
        self.manifest = manifest

    @property
    def path(self) -> Location:
        return self.root

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path | Location,
        verify: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> Store:
        """Open the store at ``path`` (a local path or URL; ``options`` for its filesystem).

        With ``verify``, check that every file the manifest lists is there with its size (each
        file's checksum is checked when it is read; :meth:`verify_all` checks them all now).
        """
        root = Location.of(path, options)
        raw = read_manifest(root, MANIFEST)
        if raw is None:
            if not root.isdir():
                raise StoreError(f"no store at {root}: run `dmf ingest` first")
            raise StoreError(
                f"{root} has no {MANIFEST}: it is not a store, or its ingest did not finish"
            )
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{root / MANIFEST}: schema version {version} is not {SCHEMA_VERSION}; re-run "
                "`dmf ingest` with this version of dmf"
            )
        try:
            manifest = StoreManifest.model_validate(raw)
        except ValidationError as exc:
            raise _manifest_error(root / MANIFEST, exc) from None
        store = cls(root, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check that every file in the manifest is there with its recorded size."""
        for rel, entry in self.manifest.files.items():
            loc = self.file(rel)
            try:
                size = loc.size()
            except FileNotFoundError:
                raise StoreError(
                    f"store file {loc} is missing (listed in {self.root / MANIFEST})"
                ) from None
            if size != entry.bytes:
                raise StoreError(
                    f"store file {loc} has {size} bytes, the manifest says {entry.bytes}: "
                    "it is truncated or was changed; re-run `dmf ingest`"
                )

    def verify_all(self) -> int:
        """Check every file's size and checksum (reads the whole store); returns the bytes read."""
        for rel, entry in self.manifest.files.items():
            verify_file(self.file(rel), entry)
        return self.disk_bytes()

    def leftovers(self) -> list[str]:
        """Files in the store's directory that its manifest does not list (left by killed
        writes), relative to the directory."""
        return leftovers(self.root, MANIFEST, self.manifest.model_dump(exclude_none=True))

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
    def rating_range(self) -> tuple[float, float] | None:
        """The lowest and highest train rating, when the manifest records them."""
        r = self.manifest.rating_range
        return None if r is None else (float(r[0]), float(r[1]))

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

    # -- files ---------------------------------------------------------------------------------
    def entry(self, rel: str) -> FileEntry:
        try:
            return self.manifest.files[rel]
        except KeyError:
            raise StoreError(f"store {self.root} has no file {rel} in its manifest") from None

    def file(self, rel: str) -> Location:
        """The actual location of the file with logical name ``rel``."""
        return self.root / (self.entry(rel).path or rel)

    def block_path(self, side: str, b: int) -> Location:
        return self.file(block_relpath(side, b))

    def block_ref(self, side: str, b: int) -> BlockRef:
        bounds = self.bounds(side)
        rel = block_relpath(side, b)
        return BlockRef(
            side,
            b,
            int(bounds[b]),
            int(bounds[b + 1]),
            self.file(rel),
            self.entry(rel),
            self.n_rows(other_side(side)),
        )

    def block_refs(self, side: str) -> list[BlockRef]:
        """Every block of ``side``, in order."""
        return [self.block_ref(side, b) for b in range(self.n_blocks(side))]

    def read_block(self, side: str, b: int) -> RatingBlock:
        return read_block_file(self.block_ref(side, b))

    def disk_bytes(self) -> int:
        return sum(e.bytes for e in self.manifest.files.values())

    # -- id maps and held-out splits -------------------------------------------------------------
    def id_map(self, side: str, b: int | None = None) -> pa.Table:
        """Table (id, index, n_ratings) of block ``b`` of ``side`` (``None``: the whole side,
        for stores whose ids fit in memory), ordered by dense index."""
        blocks = range(self.n_blocks(side)) if b is None else [b]
        tables = [self._read(id_map_relpath(side, k)) for k in blocks]
        return pa.concat_tables(tables) if len(tables) != 1 else tables[0]

    def ids(self, side: str) -> pa.Array:
        return self.id_map(side).column("id").combine_chunks()

    def counts(self, side: str, b: int | None = None) -> np.ndarray:
        """Train rating count of every row of block ``b`` of ``side`` (``None``: the whole
        side), shape (rows,)."""
        return self.id_map(side, b).column("n_ratings").to_numpy().astype(np.int64)

    def id_map_ref(self, side: str, b: int) -> tuple[Location, FileEntry]:
        """Where the id map of block ``b`` of ``side`` is (for a task to read it)."""
        rel = id_map_relpath(side, b)
        return self.file(rel), self.entry(rel)

    def _read(self, rel: str) -> pa.Table:
        return read_table(self.file(rel), self.entry(rel))

    def split_blocks(self, name: str) -> list[int]:
        """The user blocks that hold held-out ratings of ``name``."""
        if name not in SPLITS:
            raise StoreError(f"unknown split {name!r}; expected one of {SPLITS}")
        files = self.manifest.files
        return [b for b in range(self.n_blocks("user")) if split_relpath(name, b) in files]

    def split_ref(self, name: str, b: int) -> tuple[Location, FileEntry] | None:
        """Where the held-out ratings ``name`` of user block ``b`` are (None: there are none)."""
        rel = split_relpath(name, b)
        if rel not in self.manifest.files:
            return None
        return self.file(rel), self.entry(rel)

    def read_split(self, name: str, b: int | None = None) -> pa.Table:
        """Held-out ratings of ``name`` ('validation' or 'test') of user block ``b`` (``None``:
        all of them); an empty table if none."""
        blocks = self.split_blocks(name) if b is None else [b]
        tables = [self._read(split_relpath(name, k)) for k in blocks if self.split_ref(name, k)]
        if not tables:
            return RATING_SCHEMA.empty_table()
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def iter_split(self, name: str, batch_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """The held-out ratings of ``name``, block by block in record batches (bounded memory)."""
        for b in self.split_blocks(name):
            loc, entry = self.split_ref(name, b)
            yield from open_parquet(loc, entry).iter_batches(
                batch_size=batch_rows,
                columns=["user", "item", "rating"],
                use_threads=arrow_threads(loc, entry),
            )

    def n_split(self, name: str) -> int:
        return self.manifest.n_split(name)

    def __repr__(self) -> str:
        return (
            f"Store({str(self.root)!r}, users={self.n_users}, items={self.n_items}, "
            f"train={self.n_train}, blocks={self.n_blocks('user')}/{self.n_blocks('item')})"
        )


class StoreWriter:
    """Write a store: every file through one :class:`dmf.store.storage.Commit`, the manifest
    last.

    Use as a context manager; leaving it without :meth:`commit` (an error) deletes the files
    written here, and the previous store (if any) was never touched. Workers write block files
    through :attr:`target` and return their entries, which :meth:`add_file` lists. Scratch
    files (ingest's spill) go under :attr:`scratch`, a hidden prefix of the store's directory,
    removed at the end.

    A directory that already holds a store, or other files, is refused unless ``overwrite``;
    even then only the previous store's files are deleted, never anything else.

    A store that runs are training on (their claims in ``_claims/``, :mod:`dmf.store.lease`)
    is not replaced, unless ``force``: that is checked here and again just before the new
    manifest is written. Those runs would fail, reading files the new version deleted.
    """

    def __init__(
        self,
        path: str | Path | Location,
        overwrite: bool = False,
        options=None,
        force: bool = False,
    ):
        self.root = Location.of(path, options)
        self.force = force
        if self.root.isfile():
            raise StoreError(f"store path {self.root} exists and is not a directory")
        if self.root.isdir() and _holds_more_than_leftovers(self.root):
            if not overwrite:
                raise StoreError(
                    f"store directory {self.root} is not empty; set store.overwrite: true "
                    "(or --set store.overwrite=true) to replace it"
                )
            if not (self.root / MANIFEST).exists():
                # overwrite replaces a store: never write into (or over) anything else.
                raise StoreError(
                    f"store directory {self.root} holds files but no store ({MANIFEST}), e.g. "
                    f"{_foreign_example(self.root)}; store.overwrite replaces only a store dmf "
                    "wrote: choose another store.path, or move those files"
                )
        self._check_claims()
        self.commit_ = Commit(self.root, MANIFEST)
        self.scratch = self.root / f".scratch-{self.commit_.token}"

    @property
    def target(self) -> Target:
        """Where this version's files are written (picklable: workers write through it)."""
        return self.commit_.target

    @property
    def path(self) -> Location:
        return self.root

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.scratch.remove()
        if not self.commit_.committed:
            self.abort()

    def abort(self) -> None:
        self.commit_.abort()

    def _check_claims(self) -> None:
        """Refuse to replace a store that live runs are training on (unless ``force``)."""
        if not (self.root / MANIFEST).exists():
            return  # no store to replace: nobody can be training on it
        runs = live_claims(self.root / CLAIMS)
        if not runs:
            return
        names = "; ".join(_describe_run(h) for h in runs)
        if self.force:
            log.warning(
                "dmf: replacing the store %s, which %d run(s) train on: %s",
                self.root,
                len(runs),
                names,
            )
            return
        last = max(h.expires_in() for h in runs)
        raise LeaseError(
            f"store {self.root} is in use: {len(runs)} run(s) train on it: {names}. Replacing "
            "it now would make them fail: wait for them to finish, or stop them (if they were "
            f"killed, their claims expire within {max(last, 0):.0f} s). To replace it anyway, "
            "set store.force: true (--set store.force=true; Python: force=True)"
        )

    def add_file(self, rel: str, entry: FileEntry) -> None:
        self.commit_.add(rel, entry)

    def write_block(self, side: str, b: int, rows, cols, vals) -> FileEntry:
        entry = write_block_file(self.target, side, b, rows, cols, vals)
        self.add_file(block_relpath(side, b), entry)
        return entry

    def write_table(self, rel: str, table: pa.Table, **parquet_options: Any) -> FileEntry:
        """Write one Parquet file of the store and list it in the manifest."""
        return self.commit_.write_table(rel, table, **parquet_options)

    def open(self, rel: str):
        """A file of the store written as a stream (e.g. by a ``pq.ParquetWriter``); it is listed
        when the block ends."""
        return self.commit_.open(rel)

    def write_id_map(
        self, side: str, ids: pa.Array, counts: np.ndarray, bounds: np.ndarray
    ) -> None:
        """The id map of ``side``, one file per block (``bounds``), for a side whose ids are
        in memory (ingest writes the user side's from workers: :func:`write_id_map_file`)."""
        for b in range(len(bounds) - 1):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            entry = write_id_map_file(
                self.target, side, b, ids.slice(lo, hi - lo), lo, counts[lo:hi]
            )
            self.add_file(id_map_relpath(side, b), entry)

    def write_split(self, name: str, table: pa.Table, user_bounds: np.ndarray) -> None:
        """Held-out ratings ``name`` (rows sorted by user), one file per user block that has
        some."""
        u = table.column("user").to_numpy()
        blk = np.searchsorted(user_bounds, u, side="right") - 1
        for b in np.unique(blk).tolist():
            rows = np.flatnonzero(blk == b)
            self.write_table(split_relpath(name, b), table.take(pa.array(rows)), compression="zstd")

    def commit(self, manifest: dict[str, Any]) -> Store:
        """Validate the manifest and write it last: the new store is in place."""
        for side in SIDES:
            if side not in manifest.get("blocks", {}):
                raise StoreError(f"manifest lacks blocks.{side}")
        doc = {**manifest, "schema_version": SCHEMA_VERSION, "version": self.commit_.token}
        try:
            m = StoreManifest.model_validate({**doc, "files": dict(self.commit_.entries)})
        except ValidationError as exc:  # a bug of ours, not the user's: say which key
            raise StoreError(f"cannot write the store manifest of {self.root}: {exc}") from exc
        self._check_claims()  # a run may have started on the old version during the ingest
        self.commit_.commit(m.model_dump(mode="json", exclude_none=True, exclude={"files"}))
        return Store(self.root, m)


def _foreign_example(root: Location) -> str:
    """One of the files in ``root`` that no killed dmf write left."""
    ours = set(leftovers(root, MANIFEST, None))
    return next((rel for rel in root.files() if rel not in ours), "?")


def _holds_more_than_leftovers(root: Location) -> bool:
    """Whether ``root`` holds a store, or files other than what killed dmf writes left (and
    runs' claims, which are not the store's)."""
    files = [f for f in root.files() if not f.startswith(f"{CLAIMS}/")]
    return (root / MANIFEST).exists() or len(leftovers(root, MANIFEST, None)) < len(files)


def _describe_run(h: Holder) -> str:
    model = h.about.get("model")
    return h.describe() + (f" writing {model}" if model else "")


def _block_shares(
    n: int, total: int, target: int, n_blocks: int | None, min_blocks: int = 1
) -> np.ndarray:
    """The multiples of the share at which :func:`balanced_bounds` cuts, float64."""
    if n_blocks is not None:
        nb = max(1, min(n_blocks, n))
    else:
        nb = max(1, min(n, max(min_blocks, int(np.ceil(total / max(target, 1))))))
    share = max(total / nb, 1.0)
    return share * np.arange(1, nb)


def balanced_bounds(
    counts: np.ndarray, target: int, n_blocks: int | None = None, min_blocks: int = 1
) -> np.ndarray:
    """Contiguous block boundaries over rows whose train counts are ``counts``.

    Each block gets about ``target`` ratings (or the total split into ``n_blocks`` equal shares),
    in at least ``min_blocks`` blocks;
    a row is never split, so a block can exceed the target by one row's count. Always at least
    one block; never an empty block unless there are no rows at all.
    """
    n = len(counts)
    if n == 0:
        return np.array([0, 0], dtype=np.int64)
    cum = np.cumsum(counts, dtype=np.int64)
    shares = _block_shares(n, int(cum[-1]), target, n_blocks, min_blocks)
    # Cut after the first row at which the cumulative count reaches each multiple of share.
    cuts = np.searchsorted(cum, shares, side="left") + 1
    return _bounds_of_cuts(cuts, n)


def _bounds_of_cuts(cuts: np.ndarray, n: int) -> np.ndarray:
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, n), [n]]))
    return bounds.astype(np.int64)


def balanced_bounds_chunked(
    starts: np.ndarray,
    totals: np.ndarray,
    n: int,
    counts_of: Callable[[int], np.ndarray],
    target: int,
    n_blocks: int | None = None,
    min_blocks: int = 1,
) -> np.ndarray:
    """:func:`balanced_bounds` of counts held in chunks, never all at once.

    Chunk k holds the counts of rows ``starts[k]`` to ``starts[k + 1]`` (or ``n``), summing to
    ``totals[k]``; ``counts_of(k)`` reads them. Only the chunks in which a cut falls are read.
    The result is exactly ``balanced_bounds(concatenated counts, target, n_blocks,
    min_blocks)``.
    """
    if n == 0:
        return np.array([0, 0], dtype=np.int64)
    ends = np.cumsum(totals, dtype=np.int64)
    shares = _block_shares(n, int(ends[-1]) if len(ends) else 0, target, n_blocks, min_blocks)
    # The first row whose cumulative count reaches a share lies in the first chunk whose
    # cumulative total does; within it, the same search over the chunk's own cumulative counts.
    chunk = np.searchsorted(ends, shares, side="left")
    cuts = np.full(len(shares), n + 1, dtype=np.int64)
    for k in np.unique(chunk[chunk < len(ends)]).tolist():
        sel = chunk == k
        before = int(ends[k] - totals[k])
        cum = before + np.cumsum(counts_of(k), dtype=np.int64)
        cuts[sel] = starts[k] + np.searchsorted(cum, shares[sel], side="left") + 1
    return _bounds_of_cuts(cuts, n)


def store_from_arrays(
    path: str | Path | Location,
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
    options: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Store:
    """Write a store from in-memory train ratings given as dense indices.

    For data that already fits in memory (tests, notebooks, small experiments); ``dmf ingest``
    is the out-of-core path for files. ``held_out`` maps 'validation'/'test' to (users, items,
    ratings) arrays of dense indices. Raw ids default to the dense indices themselves.
    ``force``: replace the store even while runs train on it (:class:`StoreWriter`).
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
    with StoreWriter(path, overwrite=overwrite, options=options, force=force) as w:
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
        user_bounds = np.asarray(blocks["user"]["bounds"], dtype=np.int64)
        w.write_id_map("user", user_ids, counts["user"], user_bounds)
        w.write_id_map("item", item_ids, counts["item"], np.asarray(blocks["item"]["bounds"]))
        for name, (hu, hi_, hr) in held_out.items():
            hu = np.asarray(hu, dtype=np.int32)
            order = np.argsort(hu, kind="stable")
            w.write_split(
                name,
                pa.table(
                    {
                        "user": pa.array(hu[order]),
                        "item": pa.array(np.asarray(hi_, dtype=np.int32)[order]),
                        "rating": pa.array(np.asarray(hr, dtype=np.float32)[order]),
                    },
                    schema=RATING_SCHEMA,
                ),
                user_bounds,
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
            "rating_range": [float(ratings.min()), float(ratings.max())] if len(ratings) else None,
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
