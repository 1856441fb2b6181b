"""Training checkpoints: the factor matrices and the loop's state after an iteration.

    checkpoints/
      iter-00003/
        state.json          iteration, history, fingerprints, and a sha256 of every array file
        user_factors.npy user_bias.npy item_factors.npy item_bias.npy   (and best_* when early
                                                                        stopping keeps a best model)

A checkpoint is committed by :class:`dmf.store.storage.Staging` (a temporary directory,
``state.json`` written last, then renamed): a directory named ``iter-*`` is complete by
construction, and its checksums catch later corruption.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from dmf.errors import CheckpointError
from dmf.store.storage import Staging, discard, sha256_file

log = logging.getLogger("dmf")

STATE = "state.json"


def write_checkpoint(
    directory: str | Path,
    iteration: int,
    arrays: dict[str, np.ndarray],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``iteration`` atomically and prune all but the newest ``keep``."""
    directory = Path(directory)
    final = directory / f"iter-{iteration:05d}"
    with Staging(final, tmp_name=f".tmp-{iteration:05d}-{uuid.uuid4().hex[:8]}") as st:
        sums = {}
        for name, arr in arrays.items():
            f = st.file(f"{name}.npy")
            np.save(f, arr, allow_pickle=False)
            sums[f.name] = sha256_file(f)
        doc = {**state, "iteration": iteration, "files": sums}
        with st.open(STATE) as fh:
            fh.write(json.dumps(doc, indent=1).encode())
            fh.flush()
            os.fsync(fh.fileno())
        st.commit()
    for old in list_checkpoints(directory)[:-keep]:
        discard(old)
    # A run killed while writing leaves its temporary directory behind (never read, as it is not
    # named iter-*); one training writes here at a time, so any other one is such a leftover.
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_checkpoints(directory: str | Path) -> None:
    """Discard every checkpoint in ``directory`` (a fresh run starts without them)."""
    for path in list_checkpoints(directory):
        discard(path)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("iter-*") if p.is_dir())


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify one checkpoint; a missing or altered file is a CheckpointError."""
    path = Path(path)
    sf = path / STATE
    if not sf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE}")
    try:
        state = json.loads(sf.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {sf} is not valid JSON: {exc}") from exc
    arrays = {}
    for fname, digest in state["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt (checksum mismatch)")
        arrays[fname[: -len(".npy")]] = np.load(f, allow_pickle=False)
    return state, arrays


def latest_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    errors = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path)
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
