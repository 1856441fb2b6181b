"""Training checkpoints: the factor matrices and the loop's state after an iteration.

    checkpoints/               in the model directory: a local path or a URL
      iter-00003/
        state.json             iteration, history, fingerprints, and every array file with its
                               size and CRC-32 (the manifest, written last)
        user_factors.TOKEN.npy user_bias.TOKEN.npy item_factors.TOKEN.npy item_bias.TOKEN.npy
                               (and best_* when early stopping keeps a best model)

Each checkpoint is committed by :class:`dmf.store.storage.Commit`: its arrays first, under names
of their own, ``state.json`` last, no rename. A checkpoint is complete exactly when its
``state.json`` is there, and every read checks each file's size and checksum. Checkpoints are
ordered by their iteration number, not by name.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from dmf.errors import CheckpointError
from dmf.store.storage import (
    Commit,
    Location,
    StorageError,
    clean,
    entries_of,
    leftovers,
    read_manifest,
    read_verified,
)

log = logging.getLogger("dmf")

STATE = "state.json"
_NAME = re.compile(r"^iter-(\d+)$")


def _name(iteration: int) -> str:
    return f"iter-{iteration:05d}"


def iteration_of(ckpt: Location) -> int:
    """The iteration a checkpoint directory holds, from its name ``iter-N``."""
    return int(_NAME.match(ckpt.name).group(1))


def write_checkpoint(
    directory: Location,
    iteration: int,
    arrays: dict[str, np.ndarray],
    state: dict[str, Any],
    keep: int = 2,
) -> Location:
    """Write checkpoint ``iteration``, then prune all but the newest ``keep`` and what killed
    writes left behind."""
    directory = Location.of(directory)
    final = directory / _name(iteration)
    with Commit(final, STATE) as c:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            c.write_bytes(f"{name}.npy", buf.getvalue())
        doc = c.commit({**state, "iteration": iteration})
    for old in list_checkpoints(directory)[:-keep]:
        discard_checkpoint(old)
    # One training writes here at a time: anything else is what a killed write left behind,
    # never read (no state.json lists it).
    clean(directory, checkpoint_leftovers(directory, {final.name: doc}))
    return final


def checkpoint_leftovers(directory: Location, known: dict[str, dict] | None = None) -> list[str]:
    """What killed checkpoint writes left in ``directory``: incomplete checkpoints, files no
    ``state.json`` lists, hidden temporaries (paths relative to ``directory``). ``known``: the
    state of checkpoints already at hand, by name."""
    known = known or {}
    out = []
    for name in directory.ls():
        entry = directory / name
        if _NAME.match(name) and (name in known or (entry / STATE).exists()):
            state = known.get(name) or read_manifest(entry, STATE, error=CheckpointError)
            out += [f"{name}/{rel}" for rel in leftovers(entry, STATE, state)]
        elif _NAME.match(name) or name.startswith("."):
            out += [f"{name}/{rel}" for rel in entry.files()] or [name]
    return out


def discard_checkpoint(ckpt: Location) -> None:
    """Delete a checkpoint: its ``state.json`` first, so that a kill in the middle of the
    deletion leaves an incomplete checkpoint (ignored), never a damaged complete one."""
    (ckpt / STATE).remove()
    ckpt.remove()


def remove_checkpoints(directory: Location) -> None:
    """Discard every checkpoint in ``directory`` (a fresh run starts without them)."""
    for ckpt in list_checkpoints(directory):
        discard_checkpoint(ckpt)


def list_checkpoints(directory: Location) -> list[Location]:
    """Complete checkpoints (those with a ``state.json``), oldest first by iteration number."""
    directory = Location.of(directory)
    found = [directory / n for n in directory.ls() if _NAME.match(n)]
    complete = [c for c in found if (c / STATE).exists()]
    return sorted(complete, key=iteration_of)


def read_checkpoint(ckpt: Location) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify one checkpoint; a missing or altered file is a CheckpointError."""
    ckpt = Location.of(ckpt)
    try:
        state = read_manifest(ckpt, STATE, error=CheckpointError)
    except StorageError as exc:
        raise CheckpointError(str(exc)) from exc
    if state is None:
        raise CheckpointError(f"checkpoint {ckpt} has no {STATE}")
    try:
        files = entries_of(state)
    except Exception as exc:  # noqa: BLE001 - a damaged state.json: say which
        raise CheckpointError(f"checkpoint {ckpt / STATE} lists its files wrongly: {exc}") from exc
    arrays = {}
    for rel, entry in files.items():
        data = read_verified(ckpt / (entry.path or rel), entry, error=CheckpointError)
        arrays[rel[: -len(".npy")]] = np.load(io.BytesIO(data), allow_pickle=False)
    return state, arrays


def latest_checkpoint(
    directory: Location, check: Callable[[Location, dict[str, Any]], None] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The newest checkpoint that verifies (and passes ``check(ckpt, state)``, which raises
    :class:`CheckpointError` to reject it); corrupt or rejected newer ones are reported and
    skipped."""
    errors = []
    for ckpt in reversed(list_checkpoints(directory)):
        try:
            found = read_checkpoint(ckpt)
            if check is not None:
                check(ckpt, found[0])
            return found
        except CheckpointError as exc:
            log.warning("dmf: skipping checkpoint: %s", exc)
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def describe_mismatch(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ between two nested mappings, with both values."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_mismatch(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: checkpoint has {a!r}, now {b!r}")
    return out
