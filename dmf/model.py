"""The trained model: factors, biases, id maps, config and history, and its directory format.

    model/
      model.json             mu, rank, regularisation, iterations, config, store fingerprint,
                             versions, per-iteration history
      user_factors.parquet   id (raw), bias, factors (fixed-size list of rank floats)
      item_factors.parquet
      history.csv            iteration, train RMSE, validation RMSE, objective, seconds
      convergence.png        objective and RMSE per iteration

The directory is written to a temporary sibling and renamed into place, so a reader never sees a
half-written model.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dmf.errors import ModelError

MODEL_FORMAT = 1
HISTORY_FIELDS = [
    "iteration",
    "train_rmse",
    "validation_rmse",
    "objective",
    "objective_after_user_step",
    "seconds",
    "ratings_per_second",
]


def versions() -> dict[str, str]:
    import dask
    import distributed

    from dmf import __version__

    return {
        "dmf": __version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


@dataclass
class Model:
    """A biased matrix-factorization model: r_hat(i, j) = mu + b_i + c_j + u_i . v_j.

    Attributes
    ----------
    mu : float
        Global mean of the train ratings.
    user_ids, item_ids : pyarrow.Array
        Raw ids; position = dense index.
    user_factors : ndarray, shape (n_users, rank)
    user_bias : ndarray, shape (n_users,)
    item_factors : ndarray, shape (n_items, rank)
    item_bias : ndarray, shape (n_items,)
    """

    mu: float
    user_ids: pa.Array
    item_ids: pa.Array
    user_factors: np.ndarray
    user_bias: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    store_fingerprint: str = ""
    store_path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.user_factors.shape[1])

    @property
    def n_users(self) -> int:
        return len(self.user_bias)

    @property
    def n_items(self) -> int:
        return len(self.item_bias)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = True, plot: bool = True) -> Path:
        """Write the model directory atomically; returns its path."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ModelError(f"model directory {path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for side, ids, f, b in (
                ("user", self.user_ids, self.user_factors, self.user_bias),
                ("item", self.item_ids, self.item_factors, self.item_bias),
            ):
                pq.write_table(_factor_table(ids, f, b), tmp / f"{side}_factors.parquet")
            write_history_csv(tmp / "history.csv", self.history)
            if plot and self.history:
                from dmf.plot import plot_history

                plot_history(self.history, tmp / "convergence.png")
            model_json = {
                "format": MODEL_FORMAT,
                "mu": self.mu,
                "rank": self.rank,
                "n_users": self.n_users,
                "n_items": self.n_items,
                "dtype": str(self.user_factors.dtype),
                "store_fingerprint": self.store_fingerprint,
                "store_path": self.store_path,
                "config": self.config,
                "history": self.history,
                "versions": versions(),
                **self.meta,
            }
            (tmp / "model.json").write_text(json.dumps(model_json, indent=1, default=_json_default))
            old = None
            if path.exists():
                # Training checkpoints live inside the model directory: carry them over.
                if (path / "checkpoints").is_dir():
                    os.replace(path / "checkpoints", tmp / "checkpoints")
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Model:
        """Read a model directory written by :meth:`save`."""
        path = Path(path)
        mj = path / "model.json"
        if not mj.is_file():
            raise ModelError(f"{path} is not a model directory (no model.json)")
        meta = json.loads(mj.read_text())
        if meta.get("format") != MODEL_FORMAT:
            raise ModelError(f"{mj}: model format {meta.get('format')} is not {MODEL_FORMAT}")
        parts = {}
        for side in ("user", "item"):
            f = path / f"{side}_factors.parquet"
            if not f.is_file():
                raise ModelError(f"model file {f} is missing")
            t = pq.read_table(f)
            rank = int(meta["rank"])
            flat = t.column("factors").combine_chunks().flatten().to_numpy()
            parts[side] = (
                t.column("id").combine_chunks(),
                flat.reshape(len(t), rank),
                t.column("bias").to_numpy(),
            )
        known = {
            "format",
            "mu",
            "rank",
            "n_users",
            "n_items",
            "dtype",
            "store_fingerprint",
            "store_path",
            "config",
            "history",
            "versions",
        }
        return cls(
            mu=float(meta["mu"]),
            user_ids=parts["user"][0],
            item_ids=parts["item"][0],
            user_factors=parts["user"][1],
            user_bias=parts["user"][2],
            item_factors=parts["item"][1],
            item_bias=parts["item"][2],
            config=meta.get("config", {}),
            history=meta.get("history", []),
            store_fingerprint=meta.get("store_fingerprint", ""),
            store_path=meta.get("store_path", ""),
            meta={k: v for k, v in meta.items() if k not in known},
        )


def _factor_table(ids: pa.Array, factors: np.ndarray, bias: np.ndarray) -> pa.Table:
    rank = factors.shape[1]
    flat = pa.array(np.ascontiguousarray(factors).reshape(-1))
    return pa.table(
        {
            "id": ids,
            "bias": pa.array(bias),
            "factors": pa.FixedSizeListArray.from_arrays(flat, rank),
        }
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_history_csv(path: str | Path, history: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_FIELDS})


def load(path: str | Path) -> Model:
    """Load a saved model directory (``dmf.load``)."""
    return Model.load(path)
