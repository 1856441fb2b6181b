"""Leases: which run writes a model directory, and which runs train on a store.

A lease is a small JSON file naming its holder, on the same filesystem as what it guards (a
local disk or an object store, through :class:`dmf.store.storage.Location` only)::

    {"owner": {"host": "node-3", "pid": 4711, "token": "9f0c...", "command": "dmf train c.yaml"},
     "created": "2026-11-30T15:14:13.042+00:00", "expires": "2026-11-30T15:15:13.042+00:00",
     "ttl": 60.0, "about": {"model": "s3://bucket/model"}}

The holder keeps it alive: a daemon thread rewrites it every ``ttl / 3`` seconds with
``expires = now + ttl``, and :meth:`Lease.release` deletes it. A holder that is killed stops
refreshing; once its lease has expired, the next comer takes it over and logs whose it was (at
once, on the holder's own host, when no process with the holder's pid is alive there).
Expiry compares the holder's ``expires`` with the reader's clock: the machines' clocks must
agree to well within ``ttl``.

Two kinds:

- **exclusive** (:func:`acquire`): one file, one holder. A model directory admits one writer:
  ``<model>/_writer.lease`` (:data:`WRITER`). A second run is refused with a
  :class:`dmf.errors.LeaseError` naming the holder;
- **shared** (:func:`claim`): one file per holder in a directory, ``<store>/_claims/<token>.lease``
  (:data:`CLAIMS`). Many runs may train on one store; :func:`live_claims` lists those alive
  (and deletes expired ones), so that ingest refuses to replace a store they read.

**How exclusive an exclusive lease is.** :func:`acquire` reads the lease first: a live one is
refused, an expired one deleted (taken over). Then it creates the lease. On a local disk (or a
filesystem every host mounts with POSIX semantics) that is ``open(path, "xb")``: of any number of
processes racing for a free lease exactly one succeeds. On an object store it is a conditional
PUT (``If-None-Match: *``) where the filesystem supports it (s3fs: AWS S3, moto), else a plain
PUT; the creator then waits :data:`SETTLE_SECONDS`, reads the lease back, and holds it only if
it still carries its token (a store that ignores the condition lets the last writer win; every
other writer sees that writer's token and backs off). A take-over is read back the same way on
every filesystem, since two processes may both delete an expired lease. **Residual race:** on
a store without conditional writes, or in a take-over, two processes that both found the lease
free (or expired) both hold it if one of them is delayed between that look and its write by
more than :data:`SETTLE_SECONDS` (a paused VM, say). Each holder's heartbeat reads the lease
before rewriting it and notices the other's token within ``ttl / 3``; :meth:`Lease.check` then
fails, and a trainer stops at its next iteration, before it writes its model.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from dmf.errors import LeaseError
from dmf.store.storage import Location, StorageError, write_atomic

log = logging.getLogger("dmf")

LEASE_SECONDS = 60.0
"""Default lifetime of a lease without a heartbeat (``train.lease_seconds``)."""
SETTLE_SECONDS = 1.0
"""How long a writer waits before reading a lease back (object stores, take-overs)."""
WRITER = "_writer.lease"
"""The exclusive lease of a directory's writer (a model directory's training run)."""
CLAIMS = "_claims"
"""The directory of shared claims on a store, one ``<token>.lease`` per run."""
SUFFIX = ".lease"

# A reader may see a local lease between its exclusive create and its write: read again.
_REREADS = 3
# Acquiring gives up after this many rounds of finding the lease released or expired meanwhile.
_ROUNDS = 5


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _epoch(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


def _machine() -> str:
    """This process's boot id and pid namespace ("" where /proc does not say): two processes
    with the same string see the same pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _command() -> str:
    """This process's command line, as a person would recognise it (``dmf train c.yaml``)."""
    argv = sys.argv or ["python"]
    prog = os.path.basename(argv[0])
    if prog == "__main__.py":  # python -m dmf
        prog = os.path.basename(os.path.dirname(argv[0]))
    cmd = " ".join([prog, *argv[1:]])
    return cmd if len(cmd) <= 200 else cmd[:197] + "..."


@dataclass(frozen=True)
class Holder:
    """Who holds a lease (what its file says)."""

    host: str
    pid: int
    token: str
    command: str
    created: float
    """When the holder took the lease (seconds since the epoch)."""
    expires: float
    """When the lease lapses unless refreshed (seconds since the epoch, the holder's clock)."""
    ttl: float = LEASE_SECONDS
    about: dict[str, Any] = field(default_factory=dict)
    """What the holder is doing, e.g. ``{"model": ...}`` for a claim on a store."""
    machine: str = ""
    """The holder's boot id and pid namespace (:func:`_machine`): where its pid means
    something."""

    def to_json(self) -> bytes:
        doc = {
            "owner": {
                "host": self.host,
                "pid": self.pid,
                "token": self.token,
                "command": self.command,
                "machine": self.machine,
            },
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "ttl": self.ttl,
            "about": self.about,
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        """Parse a lease file (ValueError, KeyError or TypeError if it is not one)."""
        doc = json.loads(data)
        owner = doc["owner"]
        return cls(
            host=str(owner["host"]),
            pid=int(owner["pid"]),
            token=str(owner["token"]),
            command=str(owner.get("command", "")),
            created=_epoch(doc["created"]),
            expires=_epoch(doc["expires"]),
            ttl=float(doc.get("ttl", LEASE_SECONDS)),
            about=dict(doc.get("about") or {}),
            machine=str(owner.get("machine", "")),
        )

    def expires_in(self, now: float | None = None) -> float:
        """Seconds until the lease lapses (negative: how long ago it did)."""
        return self.expires - (time.time() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        return self.expires_in(now) < 0

    def gone(self) -> bool:
        """Whether the holder is known to have stopped: it ran on this host, in this boot and
        this pid namespace, and no process with its pid is alive here (a killed run resumed on
        the same machine need not wait for its lease to expire). A holder elsewhere, or in
        another container that shares the host name, is only known gone by expiry."""
        if self.pid <= 0 or self.host != socket.gethostname():
            return False
        if not self.machine or self.machine != _machine():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            return False
        return False

    def stale(self) -> bool:
        """Expired, or its holder gone: the lease may be taken over."""
        return self.expired() or self.gone()

    def describe(self) -> str:
        """``'dmf train c.yaml' (host h, pid 4711, since 2026-...)`` for messages."""
        what = f"{self.command!r} " if self.command else ""
        since = datetime.fromtimestamp(self.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{what}(host {self.host}, pid {self.pid}, since {since})"


def read_holder(loc: Location, ttl: float = LEASE_SECONDS) -> Holder | None:
    """The holder of the lease ``loc``, or None if there is no lease.

    A file that is not a lease (a holder killed between creating and writing it) counts as a
    lease of an unknown holder, expiring ``ttl`` after the file was last written."""
    for attempt in range(_REREADS):
        try:
            data = loc.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Holder.from_json(data)
        except (ValueError, KeyError, TypeError):
            if attempt + 1 < _REREADS:
                time.sleep(0.05)
    try:
        t = loc.modified()
    except FileNotFoundError:
        return None
    return Holder("?", 0, "", "an unreadable lease file", t, t + ttl, ttl)


class Lease:
    """A lease file held by this process, kept alive by a heartbeat thread until released.

    Use :func:`acquire` (exclusive) or :func:`claim` (shared); the lease is a context manager
    that releases it. :meth:`check` raises if the heartbeat found it taken by someone else.
    """

    def __init__(
        self,
        loc: Location,
        ttl: float = LEASE_SECONDS,
        about: Mapping[str, Any] | None = None,
        token: str | None = None,
    ):
        if ttl <= 0:
            raise ValueError(f"a lease's ttl must be positive, not {ttl}")
        now = time.time()
        self.loc = loc
        self.ttl = float(ttl)
        self.holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            token=token or uuid.uuid4().hex,
            command=_command(),
            created=now,
            expires=now + self.ttl,
            ttl=self.ttl,
            about=dict(about or {}),
            machine=_machine(),
        )
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.holder.token

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def _stamp(self) -> bytes:
        """The lease's content, its expiry moved to ``now + ttl``."""
        self.holder = replace(self.holder, expires=time.time() + self.ttl)
        return self.holder.to_json()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._beat, name=f"dmf-lease-{self.loc.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must not die silently
                if self.holder.expired():
                    self._lose(f"it could not be refreshed before it expired: {exc!r}")
                else:
                    log.warning("dmf: cannot refresh the lease %s (will retry): %r", self.loc, exc)
            if self.lost:
                return

    def refresh(self) -> None:
        """Move the lease's expiry forward (the heartbeat does this every ``ttl / 3``), unless
        someone else holds it now: then the lease is :attr:`lost`."""
        try:
            current = read_holder(self.loc, self.ttl)
            if current is None or current.token != self.token:
                who = "nobody" if current is None else current.describe()
                self._lose(f"it is held by {who} now")
                return
            write_atomic(self.loc, self._stamp())
        except StorageError as exc:  # a network blip: try again at the next beat
            if self.holder.expired():
                self._lose(f"it could not be refreshed before it expired: {exc}")
            else:
                log.warning("dmf: cannot refresh the lease %s (will retry): %s", self.loc, exc)

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("dmf: lost the lease %s: %s", self.loc, why)

    def check(self) -> None:
        """Raise :class:`dmf.errors.LeaseError` if the lease was lost."""
        if self.lost:
            raise LeaseError(
                f"this run lost its lease {self.loc} ({self.lost}); another run may be "
                "writing there: stopping"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file (if it is still ours)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        try:
            current = read_holder(self.loc, self.ttl)
            if current is not None and current.token == self.token:
                self.loc.remove()
        except StorageError as exc:
            log.warning(
                "dmf: could not delete the lease %s (it expires in %.0f s): %s",
                self.loc,
                self.holder.expires_in(),
                exc,
            )


def _confirmed(lease: Lease) -> bool:
    """Whether the lease still carries our token after :data:`SETTLE_SECONDS`."""
    time.sleep(SETTLE_SECONDS)
    current = read_holder(lease.loc, lease.ttl)
    return current is not None and current.token == lease.token


def acquire(
    loc: Location, ttl: float = LEASE_SECONDS, about: Mapping[str, Any] | None = None
) -> Lease:
    """Take the exclusive lease ``loc``, or raise :class:`LeaseHeld` naming the holder (its
    message says when the lease expires if the holder was killed).

    An expired lease is taken over, with a warning naming its holder. The returned lease is
    refreshed by a heartbeat thread until :meth:`Lease.release`.
    """
    lease = Lease(loc, ttl, about)
    took_over = False
    for _ in range(_ROUNDS):
        current = read_holder(loc, ttl)
        if current is not None:
            if not current.stale():
                raise LeaseHeld(loc, current)
            log.warning(
                "dmf: taking over the lease %s of %s: %s",
                loc,
                current.describe(),
                f"it expired {-current.expires_in():.0f} s ago (its holder was killed, or lost "
                "its connection)"
                if current.expired()
                else "no process with its pid runs on this host any more (it was killed)",
            )
            loc.remove()
            took_over = True
        if not loc.create(lease._stamp()):
            continue  # created by another process since we looked: look again
        # A local exclusive create of a free lease is final. On an object store (whose
        # conditional write may be missing or ignored), or after deleting an expired lease
        # (which another process may have deleted and recreated too), the last writer wins:
        # read it back.
        if (loc.is_local and not took_over) or _confirmed(lease):
            lease._start()
            return lease
    raise LeaseError(f"cannot take the lease {loc}: other processes keep taking it; try again")


class LeaseHeld(LeaseError):
    """The lease ``loc`` is held by ``holder`` (a live one)."""

    def __init__(self, loc: Location, holder: Holder):
        self.loc = loc
        self.holder = holder
        super().__init__(
            f"{loc} is held by {holder.describe()}; if that process was killed, the lease "
            f"expires in {max(holder.expires_in(), 0):.0f} s and can then be taken over"
        )


def claim(
    directory: Location, ttl: float = LEASE_SECONDS, about: Mapping[str, Any] | None = None
) -> Lease:
    """Hold a shared claim in ``directory``: a lease file of our own, ``<token>.lease``,
    refreshed by a heartbeat until released. Claims never exclude each other; they tell
    writers (:func:`live_claims`) who is reading."""
    token = uuid.uuid4().hex
    lease = Lease(directory / f"{token}{SUFFIX}", ttl, about, token=token)
    write_atomic(lease.loc, lease._stamp())
    lease._start()
    return lease


def live_claims(directory: Location) -> list[Holder]:
    """The unexpired claims in ``directory``, oldest first; expired ones (their holders were
    killed) are deleted."""
    alive = []
    for name in directory.ls():
        if not name.endswith(SUFFIX):
            continue
        loc = directory / name
        holder = read_holder(loc)
        if holder is None:
            continue
        if holder.stale():
            log.info("dmf: removing the stale claim %s of %s", loc, holder.describe())
            try:
                loc.remove()
            except StorageError as exc:
                log.warning("dmf: cannot remove the expired claim %s: %s", loc, exc)
            continue
        alive.append(holder)
    return sorted(alive, key=lambda h: h.created)
