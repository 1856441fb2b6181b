"""The storage module: the one way dmf commits what it writes.

Every output of dmf is committed here, so that a reader never sees a half-written one and a killed
job never leaves something that looks complete:

- a directory written as a whole (a store, a model, a checkpoint, a recommendation output made
  of parts, planted-truth ratings, an unpacked download) is a :class:`Staging`: its files are
  written into a hidden sibling directory, ``.NAME.tmp-XXXXXXXX``, and :meth:`Staging.commit`
  puts it in place with :func:`replace_dir`;
- a single file (a metrics JSON, a predictions file, a combined recommendation file) is written
  through :func:`atomic_file`: into a hidden sibling, then renamed over the target.

:func:`replace_dir` keeps the old version whole until the new one is in place: the old directory
is renamed out of sight (``.NAME.old-XXXXXXXX``) just before the new one takes its name, then
deleted. :func:`discard` deletes a directory the same careful way.

Who may write where is decided by the callers (a store refuses a non-empty directory that is not
a store, a model one that is not a model); this module only makes each commit atomic.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

# Marks the temporary siblings of a target; ``leftovers`` finds those of killed writers.
TMP_MARK = ".tmp-"


def _token() -> str:
    return uuid.uuid4().hex[:8]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(new: str | Path, target: str | Path) -> Path:
    """Rename the complete directory ``new`` to ``target``, replacing what is there.

    The old ``target`` is renamed to a hidden sibling first and deleted only once ``new`` is in
    place; a kill between the two renames leaves the old version in that sibling, never a mix.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{_token()}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        _remove(old)
    return target


def discard(path: str | Path) -> None:
    """Delete a directory, first renamed out of sight: a kill in the middle of the deletion
    never leaves a partial directory under the original name."""
    path = Path(path)
    trash = path.parent / f"{TMP_MARK}old-{path.name}-{_token()}"
    os.replace(path, trash)
    _remove(trash)


def leftovers(target: str | Path) -> list[Path]:
    """Temporary siblings of ``target`` left by writers that were killed (or are running)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}{TMP_MARK}*"))


class Staging:
    """A directory written as a whole, then committed at once.

    Files go into a hidden sibling of ``target``; :meth:`commit` replaces ``target`` with it
    (:func:`replace_dir`). Used as a context manager, leaving the block without a commit (an
    error) removes the staging directory.

    Parameters
    ----------
    target
        The directory being written.
    tmp_name
        Name of the staging directory, in ``target``'s parent; default ``.NAME.tmp-XXXXXXXX``.
    carry
        Entries of the old ``target`` moved into the new one at commit (a model directory's
        ``checkpoints``, which its training wrote while the old model stood).

    Examples
    --------
    >>> with Staging(out) as st:                          # doctest: +SKIP
    ...     with st.open("part-0.parquet") as fh:
    ...         pq.write_table(table, fh)
    ...     st.commit()
    """

    def __init__(self, target: str | Path, tmp_name: str | None = None, carry: Iterable[str] = ()):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / (tmp_name or f".{self.target.name}{TMP_MARK}{_token()}")
        self.path.mkdir()
        self.carry = tuple(carry)
        self.committed = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def file(self, rel: str) -> Path:
        """Where the file ``rel`` (a path relative to the target) is written; its directory is
        made. Workers may write there directly."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def open(self, rel: str, mode: str = "wb") -> IO:
        """Open the file ``rel`` of the new version for writing."""
        return open(self.file(rel), mode)

    def commit(self) -> Path:
        """Put the new version in place of the old one; returns the target path."""
        for name in self.carry:
            if (self.target / name).exists():
                os.replace(self.target / name, self.path / name)
        replace_dir(self.path, self.target)
        self.committed = True
        return self.target

    def abort(self) -> None:
        """Remove the staging directory (the old version, if any, was never touched)."""
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write one file atomically: yields a file object on a hidden sibling of ``path``, which
    replaces ``path`` when the block ends without an error (and is removed if it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{_token()}"
    try:
        with open(tmp, mode) as fh:
            yield fh
            if not fh.closed:  # a Parquet or CSV writer may have closed it already
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's contents, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
