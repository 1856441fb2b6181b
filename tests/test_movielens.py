"""dmf.data.movielens.download against a real HTTP server on loopback serving archives built here."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from dmf.cli import main
from dmf.data.movielens import BASE_URL, RELEASES, download
from dmf.errors import DownloadError

RATINGS_1M = "1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base_url, www)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/datasets/movielens", www
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _publish(www: Path, archive: str, members: dict[str, str], md5: str | None = "auto") -> str:
    """Write www/datasets/movielens/<archive> (and its .md5 in GroupLens's BSD layout)."""
    d = www / "datasets" / "movielens"
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    real = hashlib.md5((d / archive).read_bytes()).hexdigest()
    if md5 is not None:
        value = real if md5 == "auto" else md5
        (d / f"{archive}.md5").write_text(f"MD5 ({archive}) = {value}\n")
    return real


def _ml1m(www: Path, md5: str | None = "auto") -> str:
    return _publish(
        www,
        "ml-1m.zip",
        {"ml-1m/ratings.dat": RATINGS_1M, "ml-1m/README": "MovieLens 1M (test copy)\n"},
        md5,
    )


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_download_verifies_and_unpacks_where_presets_read(server, tmp_path):
    base, www = server
    real = _ml1m(www)
    dest = tmp_path / "data"
    path = download("1m", dest, base_url=base, progress=False)
    assert path == dest / "ml-1m"
    assert (path / "ratings.dat").read_text() == RATINGS_1M
    assert real in (path / ".dmf-download.json").read_text()
    # Only the release directory is left: no archive, no temporary directories.
    assert _leftovers(dest) == ["ml-1m"]


def test_second_call_does_not_download_again_unless_forced(server, tmp_path):
    base, www = server
    _ml1m(www)
    dest = tmp_path / "data"
    download("ml-1m", dest, base_url=base, progress=False)
    (www / "datasets" / "movielens" / "ml-1m.zip").unlink()  # a second fetch would now 404
    assert download("1m", dest, base_url=base, progress=False) == dest / "ml-1m"
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("1m", dest, base_url=base, progress=False, force=True)
    # The failed forced download left the old release intact.
    assert (dest / "ml-1m" / "ratings.dat").read_text() == RATINGS_1M


def test_checksum_mismatch_names_file_and_both_checksums(server, tmp_path):
    base, www = server
    wrong = "0123456789abcdef0123456789abcdef"
    real = _ml1m(www, md5=wrong)
    dest = tmp_path / "data"
    with pytest.raises(DownloadError) as err:
        download("1m", dest, base_url=base, progress=False)
    msg = str(err.value)
    assert "ml-1m.zip" in msg and real in msg and wrong in msg
    assert _leftovers(dest) == []


def test_explicit_md5_is_checked_too(server, tmp_path):
    base, www = server
    real = _ml1m(www, md5=None)  # no published .md5
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="unverified"):
        download("1m", dest, base_url=base, progress=False)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download("1m", dest, base_url=base, progress=False, md5="f" * 32)
    assert _leftovers(dest) == []
    assert (download("1m", dest, base_url=base, progress=False, md5=real) / "ratings.dat").exists()


def test_published_and_explicit_checksums_must_agree(server, tmp_path):
    base, www = server
    _ml1m(www)
    with pytest.raises(DownloadError, match="disagree"):
        download("1m", tmp_path / "data", base_url=base, progress=False, md5="e" * 32)


def test_missing_archive_is_an_http_error(server, tmp_path):
    base, www = server
    d = www / "datasets" / "movielens"
    d.mkdir(parents=True)
    (d / "ml-100k.zip.md5").write_text("0e33842e24a9c977be4e0107933c0723  ml-100k.zip\n")
    with pytest.raises(DownloadError, match=r"ml-100k\.zip: HTTP 404"):
        download("100k", tmp_path / "data", base_url=base, progress=False)
    assert _leftovers(tmp_path / "data") == []


def test_archive_with_wrong_layout_is_refused(server, tmp_path):
    base, www = server
    _publish(www, "ml-1m.zip", {"ratings.dat": RATINGS_1M})  # not under ml-1m/
    with pytest.raises(DownloadError, match="unexpected member 'ratings.dat'"):
        download("1m", tmp_path / "data", base_url=base, progress=False)
    assert _leftovers(tmp_path / "data") == []


def test_10m_unpacks_to_its_odd_directory_name(server, tmp_path):
    base, www = server
    _publish(www, "ml-10m.zip", {"ml-10M100K/ratings.dat": RATINGS_1M})
    path = download("10m", tmp_path / "data", base_url=base, progress=False)
    assert path == tmp_path / "data" / "ml-10M100K" and (path / "ratings.dat").is_file()


def test_unknown_variant_and_unreachable_server(tmp_path):
    with pytest.raises(DownloadError, match="unknown MovieLens variant '7m'"):
        download("7m", tmp_path)
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(DownloadError, match="cannot connect"):
        download("1m", tmp_path, base_url="http://127.0.0.1:9/x", progress=False, timeout=5)


def test_pinned_table_covers_every_variant_with_its_layout():
    assert set(RELEASES) == {"100k", "1m", "10m", "20m", "25m", "32m"}
    assert RELEASES["10m"].folder == "ml-10M100K"
    assert all(r.archive == f"ml-{v}.zip" for v, r in RELEASES.items())
    assert all(r.md5 is None or len(r.md5) == 32 for r in RELEASES.values())
    assert BASE_URL == "https://files.grouplens.org/datasets/movielens"


def test_cli(server, tmp_path, capsys):
    base, www = server
    _ml1m(www)
    dest = tmp_path / "data"
    rc = main(["data", "movielens", "1m", "--dir", str(dest), "--base-url", base])
    assert rc == 0
    assert (dest / "ml-1m" / "ratings.dat").is_file()
    assert "movielens-1m" in capsys.readouterr().out
    rc = main(["data", "movielens", "1m", "--dir", str(dest), "--base-url", base, "--force",
               "--md5", "a" * 32])  # fmt: skip
    assert rc == 2
    assert "disagree" in capsys.readouterr().err


def test_foreign_directory_in_the_way_is_not_replaced_silently(server, tmp_path):
    base, www = server
    _ml1m(www)
    dest = tmp_path / "data"
    (dest / "ml-1m").mkdir(parents=True)
    (dest / "ml-1m" / "notes.txt").write_text("mine")
    with pytest.raises(DownloadError, match="exists but has no ratings.dat"):
        download("1m", dest, base_url=base, progress=False)
    assert (dest / "ml-1m" / "notes.txt").read_text() == "mine"
    path = download("1m", dest, base_url=base, progress=False, force=True)
    assert (path / "ratings.dat").is_file() and not (path / "notes.txt").exists()
    assert _leftovers(dest) == ["ml-1m"]


KILLED_BETWEEN_RENAMES = """\
import os, signal, sys
from dmf.data.movielens import download

real, calls = os.replace, []


def replace(src, dst, **kw):
    calls.append(dst)
    if len(calls) == 2:  # the old release is out of sight, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, **kw)


os.replace = replace
download("1m", sys.argv[1], base_url=sys.argv[2], progress=False, force=True)
"""


def test_a_forced_download_killed_between_its_renames_is_repaired(server, tmp_path, caplog):
    """``--force`` renames the old release out of sight, then the new one into place: a kill
    between the two left no ``ml-1m`` at all. The next call puts the old one back, says so,
    and needs no download."""
    base, www = server
    _ml1m(www)
    dest = tmp_path / "data"
    download("1m", dest, base_url=base, progress=False)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_BETWEEN_RENAMES)
    proc = subprocess.run([sys.executable, str(script), str(dest), base], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (dest / "ml-1m").exists()  # the window the kill landed in
    (www / "datasets" / "movielens" / "ml-1m.zip").unlink()  # no second download possible
    with caplog.at_level(logging.WARNING):
        assert download("1m", dest, base_url=base, progress=False) == dest / "ml-1m"
    assert (dest / "ml-1m" / "ratings.dat").read_text() == RATINGS_1M
    assert "restored" in caplog.text and "killed half-way" in caplog.text
    assert not list(dest.glob(".ml-1m.old-*"))
