"""The storage module: every path dmf reads or writes, local or a URL, and the one way it commits.

**Locations.** A :class:`Location` is a local path or a URL (``s3://``, ``gs://``, ``abfs://``,
``hdfs://``, ``file://``) with the storage options of its filesystem, reached through fsspec
(as dask does: the options are passed to the filesystem unchanged; credentials and endpoints also
come from the standard environment, e.g. ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``). It pickles with its options, so a task on a worker opens
the same filesystem the driver meant. Relative local paths are made absolute on the driver,
before a location reaches a worker.

**Commits without rename.** Object stores have no rename, so a directory of files (a store, a
model, a checkpoint, a recommendation output, synthetic ratings) is written as a
:class:`Commit`:

1. every file of the new version is written under a name of its own, ``NAME.<token>.EXT``
   (workers may write them: a :class:`Target` pickles);
2. the manifest is written last, in one piece (one PUT on an object store; a temporary file
   renamed over the old one on a local disk). It lists every file with its size and CRC-32;
3. the files of the previous version that the new one no longer lists are deleted.

Readers trust only the files the manifest lists, and check each file's size and checksum when
they read it (:func:`read_verified`), so a flipped byte is an error naming the file, never a
different number. Until the new manifest lands, the previous version is complete and readable;
a killed write leaves only files no manifest lists (:func:`leftovers`; ``dmf info`` reports
them, ``dmf clean`` removes them). A commit never deletes a file that the previous manifest did
not list: whatever else is in the directory is not dmf's to delete.

**Single files** (a metrics JSON, a predictions file, a combined recommendation file) are
replaced atomically by :func:`atomic_file`: a local temporary file renamed over the target, or on
an object store one upload that appears only when complete.

:class:`Staging` (a hidden sibling directory renamed into place) remains for local directories
that other programs read by fixed file names: unpacked downloads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import shutil
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from dmf.config import is_url
from dmf.errors import DmfError, StoreError

# Files up to this size are verified in memory and parsed from the same bytes; larger ones are
# checksummed in a streaming pass first (bounded memory), then read.
VERIFY_IN_MEMORY = 256 * 2**20
_CHUNK = 4 * 2**20


def size_text(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 MiB``, ``6.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class StorageError(DmfError):
    """A location cannot be read or written (the message names it and says why)."""


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------
def resolve(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A URL unchanged; a local path made absolute (against ``base``, default the current
    directory) and normalised. ``file://`` URLs become local paths."""
    s = os.fspath(path)
    if s.startswith("file://"):
        s = s[len("file://") :]
    if is_url(s):
        return s.rstrip("/")
    p = Path(s).expanduser()
    if not p.is_absolute():
        p = Path(base or Path.cwd()) / p
    return os.path.normpath(p)


@lru_cache(maxsize=32)
def _filesystem(protocol: str, options_json: str):
    import fsspec

    options = json.loads(options_json)
    if protocol != "file":
        # Workers write where this process listed: a cached listing would hide their files
        # (s3fs answers "missing" for a file absent from its parent's cached listing).
        options.setdefault("use_listings_cache", False)
    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure", "az": "azure"}
        hint = f" (pip install 'dmf[{extra[protocol]}]')" if protocol in extra else ""
        raise StorageError(f"{protocol}:// needs a filesystem package{hint}: {exc}") from exc
    except ValueError as exc:
        raise StorageError(f"{protocol}:// is not a filesystem fsspec knows: {exc}") from exc


@dataclass(frozen=True)
class Location:
    """A local path or a URL, with the options of its filesystem.

    Parameters
    ----------
    url
        An absolute local path, or a URL such as ``s3://bucket/prefix`` (see :func:`resolve`).
    options
        fsspec storage options for a remote filesystem (``storage.options`` in the config);
        ignored for local paths.
    """

    url: str
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, path: str | os.PathLike | Location, options: Mapping[str, Any] | None = None):
        """A location for ``path`` (made absolute if local), with ``options``."""
        if isinstance(path, Location):
            return path if options is None else cls(path.url, dict(options))
        return cls(resolve(path), dict(options or {}))

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self.url} is not a local path")
        return self.url

    # -- naming ---------------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return self.url.partition("://")[0] if is_url(self.url) else "file"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def path(self) -> str:
        """The path as the filesystem names it (``bucket/key`` on S3)."""
        return self.url.partition("://")[2] if is_url(self.url) else self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(os.path.dirname(self.url), self.options)
        head = self.url.rstrip("/").rpartition("/")[0]
        return Location(head, self.options)

    def __truediv__(self, rel: str | os.PathLike) -> Location:
        rel = os.fspath(rel).strip("/")
        if not rel:
            return self
        if self.is_local:
            return Location(os.path.normpath(os.path.join(self.url, rel)), self.options)
        return Location(f"{self.url.rstrip('/')}/{rel}", self.options)

    def relative_to(self, root: Location) -> str:
        base = root.path.rstrip("/") + "/"
        if not self.path.startswith(base):
            raise ValueError(f"{self.url} is not below {root.url}")
        return self.path[len(base) :]

    # -- the filesystem --------------------------------------------------------------------------
    @property
    def fs(self):
        """The fsspec filesystem (one per protocol and options in each process)."""
        opts = {} if self.is_local else dict(self.options)
        return _filesystem(self.protocol, json.dumps(opts, sort_keys=True, default=str))

    def arrow(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path) for pyarrow readers that want random access."""
        import pyarrow.fs as pafs

        if self.is_local:
            return pafs.LocalFileSystem(), self.url
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs)), self.path

    def _fail(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"cannot {what} {self.url}: {type(exc).__name__}: {exc}")

    def exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except Exception as exc:  # noqa: BLE001 - network, permissions: say which location
            raise self._fail("reach", exc) from exc

    def isdir(self) -> bool:
        try:
            return bool(self.fs.isdir(self.path))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("reach", exc) from exc

    def isfile(self) -> bool:
        try:
            return bool(self.fs.isfile(self.path))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("reach", exc) from exc

    def size(self) -> int:
        try:
            return int(self.fs.size(self.path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("stat", exc) from exc

    def open(self, mode: str = "rb") -> IO:
        if "w" in mode or "a" in mode:
            self.parent.makedirs()
        try:
            return self.fs.open(self.path, mode)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("open", exc) from exc

    @contextlib.contextmanager
    def writer(self) -> Iterator[IO]:
        """This file opened for writing (binary), closed on leaving: a full disk, a quota or a
        file size limit is a :class:`StorageError` naming the file."""
        try:
            with self.open("wb") as f:
                yield f
        except OSError as exc:
            if _is_write_failure(exc):
                raise write_failed(self, exc) from exc
            raise

    def create(self, data: bytes) -> bool:
        """Write a new file holding ``data`` unless one is there already; False if one was.

        Local disks: an exclusive create (``open(..., "xb")``, O_CREAT|O_EXCL), atomic against
        every other process. Object stores: a conditional PUT (``If-None-Match: *``) where the
        filesystem supports it, else a plain PUT; a store may ignore the condition, so a caller
        that needs to be the only writer reads the file back (:mod:`dmf.store.lease`).
        """
        if self.is_local:
            self.parent.makedirs()
            try:
                with open(self.url, "xb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            except FileExistsError:
                return False
            except OSError as exc:
                raise self._fail("create", exc) from exc
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # S3's 409: another conditional write is under way
                return False
            if exc.errno != errno.ENOSYS:  # 501: a store without conditional writes
                raise self._fail("create", exc) from exc
            self._put(data)
        except (NotImplementedError, TypeError, ValueError):  # no conditional writes here
            self._put(data)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("create", exc) from exc
        return True

    def _put(self, data: bytes) -> None:
        try:
            self.fs.pipe_file(self.path, data)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("write", exc) from exc

    def modified(self) -> float:
        """When the file was last written, in seconds since the epoch."""
        try:
            if self.is_local:
                return os.path.getmtime(self.url)
            return self.fs.modified(self.path).timestamp()
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("stat", exc) from exc

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._fail("read", exc) from exc

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def makedirs(self) -> None:
        """Make the directory (local disks; object stores have no directories)."""
        if self.is_local:
            os.makedirs(self.url, exist_ok=True)

    def files(self) -> list[str]:
        """Every file below this directory, as paths relative to it, sorted."""
        try:
            if not self.fs.isdir(self.path):
                return []
            found = self.fs.find(self.path)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._fail("list", exc) from exc
        base = self.path.rstrip("/") + "/"
        return sorted(f[len(base) :] if f.startswith(base) else f for f in found)

    def ls(self) -> list[str]:
        """Names of the entries directly in this directory."""
        try:
            return sorted(
                posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)
            )
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._fail("list", exc) from exc

    def remove(self) -> None:
        """Delete this file (or directory tree); nothing if it is not there."""
        try:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._fail("delete", exc) from exc


def location(path: str | os.PathLike | Location, options: Mapping[str, Any] | None = None):
    """:meth:`Location.of`: a shorthand."""
    return Location.of(path, options)


def config_location(config, path: str | os.PathLike) -> Location:
    """A path of ``config`` (relative to the config file, or a URL) with the config's storage
    options (``storage.options``)."""
    return Location.of(config.resolve(path), config.storage.options)


# ---------------------------------------------------------------------------------------------
# Single files, replaced atomically
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(target: str | os.PathLike | Location, mode: str = "wb") -> Iterator[IO]:
    """Write one file atomically: yields a file object whose contents replace ``target`` when
    the block ends without an error, and are discarded if it raises.

    Local: a hidden temporary sibling, flushed to disk, renamed over the target. Object store:
    one upload, which appears only when completed (an aborted multipart upload leaves nothing).
    """
    loc = Location.of(target)
    if loc.is_local:
        loc.parent.makedirs()
        tmp = loc.parent / f".{loc.name}.tmp-{_token()}"
        try:
            with open(tmp.url, mode) as fh:
                try:
                    yield fh
                    if not fh.closed:  # a Parquet or CSV writer may have closed it already
                        fh.flush()
                        os.fsync(fh.fileno())
                except OSError as exc:
                    if _is_write_failure(exc):
                        raise write_failed(loc, exc) from exc
                    raise
            os.replace(tmp.url, loc.url)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.url)
        return
    fh = loc.open(mode)
    try:
        yield fh
    except BaseException:
        discard_upload = getattr(fh, "discard", None)
        if discard_upload is not None:
            discard_upload()
        else:  # pragma: no cover - filesystems without multipart uploads
            with contextlib.suppress(Exception):
                fh.close()
            loc.remove()
        raise
    if not fh.closed:
        fh.close()


def write_atomic(target: str | os.PathLike | Location, data: bytes | str) -> Location:
    """Write ``data`` (text is UTF-8) to ``target`` atomically (:func:`atomic_file`)."""
    loc = Location.of(target)
    with atomic_file(loc, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return loc


# ---------------------------------------------------------------------------------------------
# Checksums and verified reads
# ---------------------------------------------------------------------------------------------
class FileEntry(BaseModel):
    """One file of a committed directory, as its manifest lists it.

    ``path`` is the file's actual name relative to the directory (with its version token), or
    absent when it is the file's logical name itself.
    """

    model_config = ConfigDict(extra="forbid")

    bytes: int
    crc32: int
    rows: int | None = None
    path: str | None = None


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """CRC-32 of ``data`` (zlib's; continues from ``value``). 6 GB/s on our machines: checking
    every block read costs well under 1% of training."""
    return zlib.crc32(data, value) & 0xFFFFFFFF


# What a write can fail with for want of room, beside errors that name another file.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS


def write_failed(loc: Location, exc: OSError) -> StorageError:
    """A failed write (a full disk, a quota, a file size limit) as an error naming the file."""
    return StorageError(f"cannot write {loc.url}: {exc.strerror or exc}")


class _CountingWriter:
    """A writable file object that passes bytes through to ``raw`` (the file at ``loc``) while
    counting them and computing their CRC-32 (pyarrow writes Parquet sequentially, so this
    sees every byte)."""

    def __init__(self, raw: IO, loc: Location):
        self.raw = raw
        self.loc = loc
        self.n = 0
        self.crc = 0
        self.closed = False

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.crc = crc32(mv, self.crc)
        self.n += len(mv)
        try:
            self.raw.write(mv)
        except OSError as exc:
            raise write_failed(self.loc, exc) from exc
        return len(mv)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        # The writer (Parquet, CSV) may close its sink; the owner closes ``raw``.
        self.closed = True

    def fileno(self) -> int:
        return self.raw.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _integrity_error(error: type[Exception], loc: Location, detail: str) -> Exception:
    return error(f"{loc.url} {detail}")


def read_verified(loc: Location, entry: FileEntry, error: type[Exception] = StoreError) -> bytes:
    """The bytes of ``loc``, checked against its manifest ``entry`` (size, then CRC-32).

    Raises ``error`` naming the file when it is missing, truncated, longer, or corrupt.
    """
    try:
        data = loc.read_bytes()
    except FileNotFoundError:
        raise _integrity_error(error, loc, "is missing (its manifest lists it)") from None
    except StorageError as exc:
        raise error(str(exc)) from exc
    _check_read(loc, entry, len(data), crc32(data), error)
    return data


def read_verified_buffer(
    loc: Location, entry: FileEntry, error: type[Exception] = StoreError
) -> pa.Buffer:
    """:func:`read_verified`, read straight into memory that Arrow owns: what Arrow's readers
    are given, never Python bytes.

    Arrow's thread pool may drop its last reference to a read's source after the read has
    returned. Freeing a Python-owned source then takes the GIL from a pool thread, and when that
    happens while the interpreter exits, the process aborts ("terminate called without an active
    exception", apache/arrow#34314): a job that finished would report a crash."""
    buf = pa.allocate_buffer(entry.bytes + 1)  # one byte more: a longer file shows
    view = memoryview(buf)
    n = 0
    try:
        with loc.open("rb") as fh:
            while n < len(view) and (k := fh.readinto(view[n:])):
                n += k
    except FileNotFoundError:
        raise _integrity_error(error, loc, "is missing (its manifest lists it)") from None
    except StorageError as exc:
        raise error(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - network, permissions: say which file
        raise error(str(loc._fail("read", exc))) from exc
    if n > entry.bytes:  # the size for the message
        with contextlib.suppress(Exception):
            n = loc.size()
    _check_read(loc, entry, n, crc32(view[:n]), error)
    return buf.slice(0, n)


def _check_read(
    loc: Location, entry: FileEntry, size: int, value: int, error: type[Exception]
) -> None:
    if size != entry.bytes:
        raise _integrity_error(
            error,
            loc,
            f"has {size} bytes, the manifest says {entry.bytes}: it is truncated or was changed",
        )
    if value != entry.crc32:
        raise _integrity_error(
            error, loc, "is corrupt: its content does not match the checksum in its manifest"
        )


def verify_file(loc: Location, entry: FileEntry, error: type[Exception] = StoreError) -> None:
    """Check ``loc`` against its manifest entry in one streaming pass (bounded memory)."""
    try:
        size = loc.size()
    except FileNotFoundError:
        raise _integrity_error(error, loc, "is missing (its manifest lists it)") from None
    except StorageError as exc:
        raise error(str(exc)) from exc
    if size != entry.bytes:
        raise _integrity_error(
            error,
            loc,
            f"has {size} bytes, the manifest says {entry.bytes}: it is truncated or was changed",
        )
    value = 0
    with loc.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            value = crc32(chunk, value)
    if value != entry.crc32:
        raise _integrity_error(
            error, loc, "is corrupt: its content does not match the checksum in its manifest"
        )


def read_table(
    loc: Location,
    entry: FileEntry,
    columns: list[str] | None = None,
    error: type[Exception] = StoreError,
) -> pa.Table:
    """A Parquet file listed in a manifest, verified, then read (``columns``: a subset)."""
    pf = open_parquet(loc, entry, error)
    try:
        if columns is not None:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise error(
                    f"{loc.url} is not the Parquet file dmf wrote: it has no column "
                    f"{missing[0]!r} (columns: {pf.schema_arrow.names})"
                )
        return pf.read(columns=columns, use_threads=arrow_threads(loc, entry))
    except (OSError, pa.ArrowException) as exc:
        raise error(f"{loc.url} is not readable Parquet: {exc}") from exc
    finally:
        pf.close()


def open_parquet(
    loc: Location, entry: FileEntry, error: type[Exception] = StoreError
) -> pq.ParquetFile:
    """A Parquet file listed in a manifest, verified (streaming), opened for batch reads.

    Read it with ``use_threads=arrow_threads(loc, entry)``: a remote file larger than
    :data:`VERIFY_IN_MEMORY` is read through Python file objects."""
    try:
        if entry.bytes <= VERIFY_IN_MEMORY:
            return pq.ParquetFile(pa.BufferReader(read_verified_buffer(loc, entry, error)))
        verify_file(loc, entry, error)
        fs, path = loc.arrow()
        return pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise error(f"{loc.url} is not readable Parquet: {exc}") from exc


def arrow_threads(loc: Location, entry: FileEntry) -> bool:
    """Whether Arrow may read ``loc`` (opened by :func:`open_parquet`) on its thread pool: not
    when Python file objects back it (see :func:`read_verified_buffer`)."""
    return entry.bytes <= VERIFY_IN_MEMORY or loc.is_local


# ---------------------------------------------------------------------------------------------
# Commits: every file under a name of its own, the manifest last
# ---------------------------------------------------------------------------------------------
def _token() -> str:
    return uuid.uuid4().hex[:8]


def versioned(rel: str, token: str) -> str:
    """``by_user/block=00000/part-0.parquet`` -> ``by_user/block=00000/part-0.<token>.parquet``."""
    head, name = posixpath.split(rel)
    stem, dot, ext = name.rpartition(".")
    new = f"{stem}.{token}.{ext}" if dot and stem else f"{name}.{token}"
    return posixpath.join(head, new) if head else new


@dataclass(frozen=True)
class Target:
    """Where the files of one commit go: its directory and its token. Pickles, so workers write
    files of the commit and return their entries to the driver."""

    root: Location
    token: str

    def location(self, rel: str) -> Location:
        """Where the file ``rel`` (its logical name) of this version is written."""
        return self.root / versioned(rel, self.token)

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[_CountingWriter]:
        """Write the file ``rel``; on leaving, :attr:`entry` of the yielded writer is set."""
        loc = self.location(rel)
        raw = loc.open("wb")
        writer = _CountingWriter(raw, loc)
        try:
            yield writer
            raw.close()  # flushes what is buffered: a full disk may show only now
        except BaseException as exc:
            with contextlib.suppress(Exception):
                raw.close()
            with contextlib.suppress(Exception):
                loc.remove()
            if _is_write_failure(exc):
                raise write_failed(loc, exc) from exc
            raise
        writer.entry = FileEntry(bytes=writer.n, crc32=writer.crc, path=versioned(rel, self.token))

    def write_bytes(self, rel: str, data: bytes) -> FileEntry:
        with self.open(rel) as w:
            w.write(data)
        return w.entry

    def write_table(self, rel: str, table: pa.Table, **parquet_options: Any) -> FileEntry:
        """Write ``table`` as the Parquet file ``rel``; the entry counts its rows."""
        with self.open(rel) as w:
            pq.write_table(table, w, **parquet_options)
        return w.entry.model_copy(update={"rows": len(table)})


class Commit:
    """A new version of the directory ``root``: files first, then ``manifest`` last.

    Use as a context manager: leaving the block with an error deletes the files written by this
    process so far (workers' files are :func:`leftovers` until ``dmf clean``); the previous
    version was never touched. :meth:`commit` writes the manifest, then deletes the files of
    the previous version that the new one does not list.

    Parameters
    ----------
    root
        The directory (local path or URL).
    manifest
        The manifest's file name in ``root`` (``manifest.json``, ``model.json``, ...).
    """

    def __init__(self, root: Location, manifest: str):
        self.root = root
        self.manifest = manifest
        self.target = Target(root, _token())
        self.entries: dict[str, FileEntry] = {}
        self.committed = False

    @property
    def token(self) -> str:
        return self.target.token

    def __enter__(self) -> Commit:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def add(self, rel: str, entry: FileEntry) -> None:
        """List a file written elsewhere (by a worker, through :attr:`target`)."""
        self.entries[rel] = entry

    def write_bytes(self, rel: str, data: bytes) -> FileEntry:
        self.entries[rel] = self.target.write_bytes(rel, data)
        return self.entries[rel]

    def write_table(self, rel: str, table: pa.Table, **parquet_options: Any) -> FileEntry:
        self.entries[rel] = self.target.write_table(rel, table, **parquet_options)
        return self.entries[rel]

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[_CountingWriter]:
        with self.target.open(rel) as w:
            yield w
        self.entries[rel] = w.entry

    def commit(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest ``doc`` (with ``files`` and ``version`` added) last; returns it."""
        previous = read_manifest(self.root, self.manifest)
        doc = {**doc, "version": self.token, "files": _dump(self.entries)}
        write_atomic(self.root / self.manifest, json.dumps(doc, indent=1, default=_json_default))
        self.committed = True
        if previous is not None:
            keep = {e.path or rel for rel, e in self.entries.items()}
            clean(self.root, sorted(listed_files(previous) - keep))
        return doc

    def abort(self) -> None:
        clean(self.root, [entry.path for entry in self.entries.values()])
        self.entries.clear()


def _dump(entries: Mapping[str, FileEntry]) -> dict[str, Any]:
    return {rel: e.model_dump(exclude_none=True) for rel, e in sorted(entries.items())}


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path | Location):
        return str(o)
    if isinstance(o, BaseModel):
        return o.model_dump(mode="json", exclude_none=True)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_manifest(
    root: Location, name: str, error: type[Exception] = StoreError
) -> dict[str, Any] | None:
    """The manifest ``root/name`` as a mapping, or None if there is none."""
    loc = root / name
    try:
        text = loc.read_bytes()
    except FileNotFoundError:
        return None
    except StorageError as exc:
        raise error(str(exc)) from exc
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{loc.url} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise error(f"{loc.url} is not a manifest (not a JSON object)")
    return doc


def entries_of(doc: Mapping[str, Any]) -> dict[str, FileEntry]:
    """The files a manifest lists, by logical name (none when ``files`` is not a mapping: the
    ``synth.json`` of an older dmf lists its files by name only, and they are not ours to
    delete)."""
    files = doc.get("files") or {}
    if not isinstance(files, Mapping):
        return {}
    return {rel: FileEntry.model_validate(e) for rel, e in files.items()}


def listed_files(doc: Mapping[str, Any]) -> set[str]:
    """Actual file names (relative to the directory) that a manifest lists."""
    return {e.path or rel for rel, e in entries_of(doc).items()}


# What dmf's own files look like: a version token before the extension (``part-0.1a2b3c4d.parquet``),
# or a hidden scratch or temporary name. Files that look like neither are not dmf's to report or
# delete, whatever directory they are in.
_OURS = re.compile(r"(^|/)\.(scratch-|[^/]*\.tmp-|[^/]*\.parts-)|\.[0-9a-f]{8}(\.[^./]+)?$")


def leftovers(
    root: Location, manifest: str, doc: Mapping[str, Any] | None, keep: Iterable[str] = ()
) -> list[str]:
    """dmf's files under ``root`` that no manifest lists: what killed writes left behind.

    Only files named the way dmf names them (a version token, a hidden scratch or temporary
    prefix) count; anything else in the directory is not dmf's. ``keep`` names entries of
    ``root`` that are not the manifest's business (nested committed directories such as a
    model's ``checkpoints``).
    """
    listed = listed_files(doc) if doc is not None else set()
    keep = set(keep)
    return [
        rel
        for rel in root.files()
        if rel != manifest
        and rel not in listed
        and rel.split("/", 1)[0] not in keep
        and _OURS.search(rel)
    ]


def clean(root: Location, rels: Iterable[str]) -> int:
    """Delete the files ``rels`` (e.g. from :func:`leftovers`) under ``root``, and the local
    directories that this leaves empty; returns how many files were deleted."""
    n = 0
    dirs = set()
    for rel in rels:
        with contextlib.suppress(StorageError):
            (root / rel).remove()
            n += 1
        parts = rel.split("/")[:-1]
        dirs.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    if root.is_local:
        for d in sorted(dirs, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root.url, d))  # only if empty
    return n


# ---------------------------------------------------------------------------------------------
# Local directories renamed into place (downloads unpacked for other programs)
# ---------------------------------------------------------------------------------------------
def recover_dir(target: str | os.PathLike) -> str | None:
    """Finish or undo a :func:`replace_dir` that was killed between its two renames: with no
    ``target`` but an old copy renamed out of sight (``.NAME.old-*``), rename it back; with
    ``target`` in place, delete the old copies. Returns what was done, or None."""
    target = Path(target)
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    if not (target.exists() or target.is_symlink()):
        os.replace(olds[-1], target)
        done = f"restored {target} from {olds[-1].name} (its replacement was killed half-way)"
        olds = olds[:-1]
    else:
        done = f"removed {len(olds)} old copy(ies) of {target} a killed replacement left"
    for old in olds:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return done


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the complete local directory ``new`` to ``target``, replacing what is there; the
    old ``target`` is renamed out of sight first and deleted only once ``new`` is in place
    (:func:`recover_dir` repairs a kill between the two renames)."""
    new, target = Path(new), Path(target)
    recover_dir(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{_token()}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return target


class Staging:
    """A local directory written as a whole into a hidden sibling, ``.NAME.tmp-XXXXXXXX``, then
    renamed into place by :meth:`commit` (:func:`replace_dir`). For directories other programs
    read by fixed names (an unpacked download); everything else commits with :class:`Commit`."""

    def __init__(self, target: str | os.PathLike, tmp_name: str | None = None):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / (tmp_name or f".{self.target.name}.tmp-{_token()}")
        self.path.mkdir()
        self.committed = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def file(self, rel: str) -> Path:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self) -> Path:
        replace_dir(self.path, self.target)
        self.committed = True
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Preflight: every worker reaches what the job reads and writes
# ---------------------------------------------------------------------------------------------
def probe(reads: list[Location], writes: list[Location], token: str) -> list[str]:
    """What this process cannot do: read each of ``reads`` (which must exist) and write (then
    delete) a small file in each of ``writes``. Runs on every worker; returns the problems."""
    problems = []
    for loc in reads:
        try:
            if not loc.exists():
                problems.append(f"cannot read {loc}: it does not exist from here")
        except Exception as exc:  # noqa: BLE001 - report any failure, naming the location
            problems.append(f"cannot read {loc}: {exc}")
    for loc in writes:
        test = loc / f".scratch-probe-{token}-{os.getpid()}"
        try:
            with test.open("wb") as fh:
                fh.write(b"dmf preflight")
            if test.read_bytes() != b"dmf preflight":
                problems.append(f"cannot write {loc}: a file written there read back different")
            test.remove()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"cannot write {loc}: {type(exc).__name__}: {exc}")
    return problems


def preflight(client, reads: Iterable[Location] = (), writes: Iterable[Location] = ()) -> None:
    """Check, before any work starts, that every worker of ``client`` can read ``reads`` and
    write into ``writes``; a failure is a :class:`StorageError` naming the worker and the URL.

    Workers share nothing with the driver: a local path the driver sees may not exist on a
    worker, and credentials the driver has may be missing there."""
    reads, writes = list(reads), list(writes)
    if client is None or not (reads or writes):
        return
    results = client.run(probe, reads, writes, _token())
    bad = {worker: found for worker, found in sorted(results.items()) if found}
    if bad:
        detail = "; ".join(f"worker {w}: {'; '.join(found)}" for w, found in bad.items())
        raise StorageError(
            f"preflight failed on {len(bad)} of {len(results)} workers: {detail}. Workers share "
            "no local directory with this process: use a URL (s3://, gs://, ...) or a "
            "filesystem every worker mounts, and give workers the credentials "
            "(environment or storage.options)"
        )
