"""Download a MovieLens release from GroupLens, verify it, and unpack it where the presets read it.

``download("1m", Path("data"))`` leaves ``data/ml-1m/ratings.dat``, which ``data.preset:
movielens-1m`` with ``data.source: data/ml-1m`` ingests. The archive's MD5 is checked against the
``.md5`` file GroupLens publishes next to each zip and, for the official archives, against the
checksum pinned below; a mismatch is a :class:`dmf.errors.DownloadError` that names the file and
both checksums and leaves nothing behind. The release is downloaded and unpacked into a staging
directory renamed into place (:class:`dmf.store.storage.Staging`), so a directory ``ml-*`` under
``dest`` is always complete.

Standard library only (urllib, zipfile, hashlib); tqdm shows progress on a terminal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dmf import __version__
from dmf.dist.tasks import progress_disabled
from dmf.errors import DownloadError
from dmf.store.storage import Staging, recover_dir

log = logging.getLogger(__name__)

__all__ = ["BASE_URL", "RELEASES", "Release", "download"]

BASE_URL = "https://files.grouplens.org/datasets/movielens"
MARKER = ".dmf-download.json"
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Release:
    """One MovieLens release: its archive, the directory it unpacks to, its ratings file."""

    variant: str
    archive: str
    folder: str
    ratings: str
    md5: str | None
    """MD5 of the official archive, as published in GroupLens's ``<archive>.md5`` file."""


# The pinned MD5s are the values of GroupLens's published ``.md5`` files, each quoted identically
# by several independent public projects (download scripts and dataset registries). We could not
# fetch them here (no internet); they guard against a tampered mirror or a changed .md5 file.
RELEASES: dict[str, Release] = {
    r.variant: r
    for r in [
        Release("100k", "ml-100k.zip", "ml-100k", "u.data", "0e33842e24a9c977be4e0107933c0723"),
        Release("1m", "ml-1m.zip", "ml-1m", "ratings.dat", "c4d9eecfca2ab87c1945afe126590906"),
        Release(
            "10m", "ml-10m.zip", "ml-10M100K", "ratings.dat", "ce571fd55effeba0271552578f2648bd"
        ),
        Release("20m", "ml-20m.zip", "ml-20m", "ratings.csv", "cd245b17a1ae2cc31bb14903e1204af3"),
        Release("25m", "ml-25m.zip", "ml-25m", "ratings.csv", "6b51fb2759a8657d3bfcbfc42b592ada"),
        Release("32m", "ml-32m.zip", "ml-32m", "ratings.csv", "d472be332d4daa821edc399621853b57"),
    ]
}

_MD5_RE = re.compile(r"\b([0-9a-fA-F]{32})\b")


def _release(variant: str) -> Release:
    key = variant.lower().removeprefix("ml-").removeprefix("movielens-")
    if key not in RELEASES:
        raise DownloadError(
            f"unknown MovieLens variant {variant!r}: choose one of {', '.join(RELEASES)}"
        )
    return RELEASES[key]


def _open(url: str, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": f"dmf/{__version__}"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs we build
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"{url}: cannot connect ({reason}); check the network, or pass --base-url for a mirror"
        ) from exc


def _published_md5(url: str, timeout: float) -> str | None:
    """The MD5 in ``url`` (a ``.md5`` file; any layout with one 32-hex-digit token), or None if
    the server has no such file (HTTP 404)."""
    try:
        with _open(url, timeout) as resp:
            text = resp.read(4096).decode("utf-8", errors="replace")
    except DownloadError as exc:
        if isinstance(exc.__cause__, urllib.error.HTTPError) and exc.__cause__.code == 404:
            return None
        raise
    m = _MD5_RE.search(text)
    if not m:
        raise DownloadError(f"{url}: no MD5 checksum in the file (got {text[:80]!r})")
    return m.group(1).lower()


def download(
    variant: str,
    dest: str | Path,
    base_url: str = BASE_URL,
    progress: bool | None = None,
    *,
    md5: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and unpack MovieLens ``variant`` into ``dest``.

    Parameters
    ----------
    variant
        ``100k``, ``1m``, ``10m``, ``20m``, ``25m`` or ``32m`` (``ml-1m`` and ``movielens-1m``
        work too).
    dest
        Directory the release is unpacked into: ``dest/ml-1m/``, ``dest/ml-10M100K/``, ...
    base_url
        Where ``<archive>`` and ``<archive>.md5`` are fetched from.
    progress
        Progress bar; ``None`` shows it only on a terminal.
    md5
        Expected MD5 of the archive, checked in addition to the published ``.md5``. Defaults to
        the pinned checksum of the official archive when ``base_url`` is GroupLens's.
    force
        Download again even if ``dest`` already holds the release.
    timeout
        Seconds to wait on the network before giving up.

    Returns
    -------
    Path
        The release directory, e.g. ``dest/ml-1m``.

    Raises
    ------
    DownloadError
        Unknown variant, HTTP or network error, no checksum to verify against, checksum mismatch,
        or an archive without the expected layout. Nothing is left in ``dest`` then.
    """
    rel = _release(variant)
    dest = Path(dest)
    target = dest / rel.folder
    recovered = recover_dir(target)
    if recovered:
        log.warning("dmf: %s", recovered)
    if not force and (target / rel.ratings).is_file():
        log.info("MovieLens %s is already in %s (use force to download again)", rel.variant, target)
        return target
    if not force and target.exists():
        raise DownloadError(
            f"{target} exists but has no {rel.ratings}: remove it, or pass force=True (--force) "
            "to replace it with a fresh download"
        )
    base = base_url.rstrip("/")
    url = f"{base}/{rel.archive}"
    md5_url = url + ".md5"
    # Every checksum we should hold the archive to, with where it came from.
    expected: dict[str, str] = {}
    published = _published_md5(md5_url, timeout)
    if published:
        expected[md5_url] = published
    pinned = md5.lower() if md5 else (rel.md5 if base == BASE_URL else None)
    if pinned:
        expected["--md5" if md5 else "the checksum pinned in dmf.data.movielens"] = pinned
    if not expected:
        raise DownloadError(
            f"{md5_url} does not exist (HTTP 404) and no checksum is known for {rel.archive}: "
            "refusing an unverified download; pass md5=... (--md5) if you know it"
        )
    if len(set(expected.values())) > 1:
        detail = ", ".join(f"{v} ({k})" for k, v in expected.items())
        raise DownloadError(
            f"{rel.archive}: the checksums disagree: {detail}; GroupLens may have re-released "
            "it: check https://grouplens.org/datasets/movielens/ and pass the right --md5"
        )
    want = next(iter(expected.values()))
    source = " and ".join(expected)

    # The release is staged next to ``target`` (the archive inside it, deleted before the
    # commit) and renamed into place whole: a failed or killed download leaves ``target`` as it
    # was, and only a hidden ``.NAME.tmp-*`` sibling directory if killed.
    with Staging(target) as st:
        archive = st.file(f".{rel.archive}.part")
        got = _fetch(url, archive, rel.archive, timeout, progress)
        if got != want:
            raise DownloadError(
                f"{url}: checksum mismatch: the downloaded {rel.archive} has MD5 {got}, expected "
                f"{want} (from {source}); the download is corrupt or the file was changed. "
                "Nothing was unpacked; try again or use another --base-url"
            )
        _unpack(archive, st.path, rel, url)
        archive.unlink()
        meta = {"variant": rel.variant, "url": url, "md5": got, "verified_against": source}
        meta["downloaded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        st.file(MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        st.commit()
    log.debug("MovieLens %s unpacked into %s (MD5 %s verified)", rel.variant, target, want)
    return target


def _fetch(url: str, path: Path, name: str, timeout: float, progress: bool | None) -> str:
    """Download ``url`` into the file ``path``; returns its MD5 (hex)."""
    from tqdm import tqdm  # here, not at the top: keeps the CLI light

    digest = hashlib.md5(usedforsecurity=False)
    with _open(url, timeout) as resp, open(path, "wb") as fh:
        length = resp.headers.get("Content-Length")
        bar = tqdm(
            total=int(length) if length and length.isdigit() else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            disable=progress_disabled(progress),
        )
        with bar:
            while True:
                try:
                    block = resp.read(_BLOCK)
                except OSError as exc:
                    raise DownloadError(f"{url}: download interrupted: {exc}") from exc
                if not block:
                    break
                fh.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


def _unpack(archive: Path, into: Path, rel: Release, url: str) -> None:
    """Extract ``archive``'s directory ``rel.folder`` as the directory ``into``, after checking
    that every member is under ``rel.folder``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = []
            for info in zf.infolist():
                p = PurePosixPath(info.filename)
                if p.is_absolute() or ".." in p.parts or p.parts[0] != rel.folder:
                    raise DownloadError(
                        f"{url}: unexpected member {info.filename!r} in {rel.archive}: every file "
                        f"should be under {rel.folder}/"
                    )
                if len(p.parts) > 1:
                    # ml-1m/ratings.dat is extracted as ratings.dat: ``into`` is the ml-1m
                    # directory (zipfile reads a member by its original name).
                    inner = PurePosixPath(*p.parts[1:]).as_posix()
                    info.filename = inner + "/" if info.is_dir() else inner
                    members.append(info)
            zf.extractall(into, members)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{url}: {rel.archive} is not a valid zip archive: {exc}") from exc
    if not (into / rel.ratings).is_file():
        raise DownloadError(
            f"{url}: {rel.archive} has no {rel.folder}/{rel.ratings}; is this the right archive?"
        )
