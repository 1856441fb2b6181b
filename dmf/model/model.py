"""The trained model: factors, biases, id maps, config and history, and its directory format.

    model/
      model.json             mu, rank, regularisation, iterations, config, store fingerprint,
                             versions, per-iteration history
      user_factors.parquet   id (raw), bias, factors (list of rank floats)
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
import pyarrow.compute as pc
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
        check_replaceable(path)
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
                from dmf.model.plot import plot_history

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

    # -- using the model: predict, recommend, fold in, similar items ------------------------------
    def as_ids(self, ids: Any, side: str) -> pa.Array:
        """Raw ids as an Arrow array of this model's ``side`` id type (cast when needed).

        Parameters
        ----------
        ids : array-like, shape (n,)
            A list, NumPy array, pandas Series or Arrow array of raw ids; integer ids given as
            strings (e.g. read from a text file) are accepted for an integer-id model and vice
            versa.
        side : 'user' or 'item'
        """
        return as_id_array(ids, self.user_ids.type if side == "user" else self.item_ids.type, side)

    def index_of(self, ids: Any, side: str) -> np.ndarray:
        """Dense indices of raw ``ids``, shape (n,), int64; -1 for ids the model does not know.

        Vectorised (a hash lookup in Arrow), never a Python loop over the ids.
        """
        known = self.user_ids if side == "user" else self.item_ids
        return lookup_ids(self.as_ids(ids, side), known)

    def solve_params(self) -> dict[str, Any]:
        """The regularisation the model was trained with (``config['model']``): reg, reg_bias,
        weighted_reg, dtype, as :func:`dmf.solver.solve_block` takes them."""
        from dmf.config import ModelConfig

        try:
            mc = ModelConfig.model_validate(self.config.get("model", {}))
        except Exception as exc:  # noqa: BLE001 - pydantic's error says which key
            raise ModelError(f"model config section 'model' is not valid: {exc}") from exc
        return {
            "reg": mc.reg,
            "reg_bias": mc.effective_reg_bias,
            "weighted_reg": mc.weighted_reg,
            "dtype": str(self.user_factors.dtype),
        }

    def predict_indices(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """mu + b_i + c_j + u_i . v_j for dense indices, shape (n,), float64.

        An index of -1 is an unknown user or item: its bias and factors count as zero, which is
        the cold-start fallback (mu + c_j, mu + b_i, or mu).
        """
        from dmf.als.solver import predict

        return predict(
            self.mu,
            self.user_factors,
            self.user_bias,
            self.item_factors,
            self.item_bias,
            users,
            items,
        )

    def predict(
        self,
        users: Any,
        items: Any,
        cold_start: str = "fallback",
        return_info: bool = False,
    ) -> np.ndarray | Prediction:
        """Predicted ratings for (user, item) pairs given by raw ids.

        Parameters
        ----------
        users, items : array-like, shape (n,)
            Raw ids, pairwise.
        cold_start : 'fallback' or 'drop'
            Unknown user or item: ``fallback`` predicts from what is known (mu + c_j for an
            unknown user, mu + b_i for an unknown item, mu for both), so there is never a NaN;
            ``drop`` leaves such pairs out (as Spark's coldStartStrategy).
        return_info
            Return a :class:`Prediction` (scores, the mask of known pairs, cold-start counts)
            instead of the scores alone.

        Returns
        -------
        ndarray, shape (n,) with ``fallback``; shape (n_known,) with ``drop``, in input order:
        the rows kept are those where ``Prediction.known`` is true.
        """
        check_cold_start(cold_start)
        u = self.index_of(users, "user")
        i = self.index_of(items, "item")
        if len(u) != len(i):
            raise ModelError(f"predict: {len(u)} users but {len(i)} items; give them pairwise")
        known = (u >= 0) & (i >= 0)
        if cold_start == "drop":
            scores = self.predict_indices(u[known], i[known])
        else:
            scores = self.predict_indices(u, i)
        if not return_info:
            return scores
        return Prediction(scores, known, int((u < 0).sum()), int((i < 0).sum()))

    def recommend(
        self,
        users: Any = None,
        n: int = 10,
        exclude: Any = None,
        cold_start: str = "fallback",
        client=None,
        tile_users: int | None = None,
    ) -> pa.Table:
        """Top-``n`` items for ``users`` (raw ids; default all users).

        Parameters
        ----------
        users : array-like of raw ids, shape (m,), or None for every user of the model
        n : int
        exclude : None, 'store', a :class:`dmf.store.Store` or a store path
            Items not to recommend to a user: ``None`` excludes nothing; ``'store'`` the user's
            train ratings in the store recorded in the model (``model.store_path``); a store, the
            user's ratings in that store's ``by_user`` blocks.
        cold_start : 'fallback' or 'drop'
            Unknown users get the items ranked by mu + c_j, or no rows.
        client
            A ``distributed.Client`` to run one task per user block; ``None`` runs locally.
        tile_users
            Users scored at once (memory: ``tile_users x n_items`` float32).

        Returns
        -------
        pyarrow.Table (user, rank, item, score): up to ``n`` rows per user, ranks from 1, in the
        order the users were given. Computed by :func:`dmf.recommend.recommend_all`.
        """
        from dmf.model.recommend import recommend_all

        return recommend_all(
            self,
            self._exclude_store(exclude),
            n,
            users=users,
            client=client,
            tile_users=tile_users,
            cold_start=cold_start,
        )

    def _exclude_store(self, exclude: Any):
        from dmf.store.layout import Store

        if exclude is None or isinstance(exclude, Store):
            return exclude
        if isinstance(exclude, str) and exclude == "store":
            if not self.store_path:
                raise ModelError(
                    "exclude='store': this model records no store path; pass the store itself"
                )
            return Store.open(self.store_path)
        return Store.open(exclude)

    def fold_in(self, items: Any, ratings: Any) -> tuple[np.ndarray, float]:
        """Factors and bias of a new user from their ratings, without retraining.

        Solves exactly the training equations for one user (the augmented normal equations of
        :func:`dmf.solver.solve_block`, with the model's reg, reg_bias and weighted_reg), given
        the item factors and biases: the user a training half-iteration would produce.

        Parameters
        ----------
        items : array-like of raw item ids, shape (k,)
        ratings : array-like of float, shape (k,)
            Items the model does not know are ignored (they have no factors).

        Returns
        -------
        (factors, bias): ndarray of shape (rank,) and a float. A user with no known items gets
        zeros (the cold-start fallback).
        """
        from dmf.als.solver import solve_block
        from dmf.errors import InputError
        from dmf.store.blocks import RatingBlock

        idx = self.index_of(items, "item")
        r = np.asarray(ratings, dtype=np.float64).reshape(-1)
        if len(idx) != len(r):
            raise InputError(f"fold_in: {len(idx)} items but {len(r)} ratings")
        if not np.all(np.isfinite(r)):
            raise InputError(f"fold_in: rating {int(np.flatnonzero(~np.isfinite(r))[0])} is NaN")
        keep = idx >= 0
        idx, r = idx[keep], r[keep]
        uniq, counts = np.unique(idx, return_counts=True)
        if np.any(counts > 1):
            dup = self.item_ids[int(uniq[np.argmax(counts > 1)])].as_py()
            raise InputError(f"fold_in: item {dup!r} is rated more than once; give each item once")
        block = RatingBlock.from_coo("user", 0, 1, np.zeros(len(idx), np.int64), idx, r)
        p = self.solve_params()
        sol = solve_block(
            block,
            self.item_factors,
            self.item_bias,
            self.mu,
            p["reg"],
            p["reg_bias"],
            p["weighted_reg"],
            dtype=p["dtype"],
        )
        return sol.factors[0], float(sol.bias[0])

    def recommend_for_ratings(
        self, items: Any, ratings: Any, n: int = 10, exclude_rated: bool = True
    ) -> pa.Table:
        """Top-``n`` items for a new user given their ratings (fold-in, then score every item).

        Parameters
        ----------
        items : array-like of raw item ids, shape (k,); ratings : array-like, shape (k,)
        exclude_rated : do not recommend the items given.

        Returns
        -------
        pyarrow.Table (rank, item, score), up to ``n`` rows.
        """
        from dmf.model.recommend import SeenItems, recommend_rows

        factors, bias = self.fold_in(items, ratings)
        seen = None
        if exclude_rated:
            idx = np.unique(self.index_of(items, "item"))
            idx = idx[idx >= 0]
            seen = SeenItems(np.array([0, len(idx)], dtype=np.int64), idx)
        _, rank, item, score = recommend_rows(
            factors[None, :],
            np.array([bias]),
            self.item_factors,
            self.item_bias,
            self.mu,
            n,
            seen,
        )
        return pa.table(
            {
                "rank": pa.array(rank, type=pa.int32()),
                "item": self.item_ids.take(pa.array(item)),
                "score": pa.array(score, type=pa.float32()),
            }
        )

    def similar_items(self, items: Any, n: int = 10, tile_items: int | None = None) -> pa.Table:
        """The ``n`` items most similar to each of ``items``, by cosine of the item factors.

        Parameters
        ----------
        items : array-like of raw item ids, shape (q,)
        n : int
        tile_items : query items scored at once (memory ``tile_items x n_items`` float32)

        Returns
        -------
        pyarrow.Table (item, rank, similar, score): for each query item (in the order given) up
        to ``n`` other items, best first; score is the cosine similarity in [-1, 1]. Items whose
        factors are all zero (no train ratings) have no direction: they are never returned, and
        as a query they get no rows.
        """
        from dmf.errors import InputError
        from dmf.model.recommend import SeenItems, recommend_rows

        if self.rank == 0:
            raise ModelError("similar_items needs item factors: this model has rank 0")
        q_ids = self.as_ids(items, "item")
        q = lookup_ids(q_ids, self.item_ids)
        if np.any(q < 0):
            bad = q_ids.filter(pa.array(q < 0))[:5].to_pylist()
            raise InputError(f"similar_items: unknown item ids {bad}; use ids the model knows")
        v = self.item_factors.astype(np.float32)
        norm = np.linalg.norm(v, axis=1)
        has = norm > 0
        vn = np.where(has[:, None], v / np.where(has, norm, 1)[:, None], 0).astype(np.float32)
        m = len(q)
        seen = SeenItems(np.arange(m + 1, dtype=np.int64), q.astype(np.int64))
        zeros_q = np.zeros(m)
        row, rank, sim, score = recommend_rows(
            vn[q], zeros_q, vn, np.zeros(self.n_items), 0.0, n, seen, tile_items, has
        )
        keep = has[q][row]
        row, rank, sim, score = row[keep], rank[keep], sim[keep], score[keep]
        return pa.table(
            {
                "item": q_ids.take(pa.array(row)),
                "rank": pa.array(rank, type=pa.int32()),
                "similar": self.item_ids.take(pa.array(sim)),
                "score": pa.array(score, type=pa.float32()),
            }
        )


def check_replaceable(path: Path) -> None:
    """Refuse to replace a non-empty directory that is not a model (e.g. output.model: runs)."""
    if path.is_dir() and not (path / "model.json").is_file():
        other = [p.name for p in path.iterdir() if p.name != "checkpoints"]
        if other:
            raise ModelError(
                f"{path} is not a model directory but holds {', '.join(sorted(other)[:5])}: "
                "choose an empty or new directory for output.model"
            )


def _factor_table(ids: pa.Array, factors: np.ndarray, bias: np.ndarray) -> pa.Table:
    # A list column (not fixed-size: Arrow has no fixed-size list of 0 for rank-0 models).
    n, rank = factors.shape
    flat = pa.array(np.ascontiguousarray(factors).reshape(-1))
    # int64 offsets: n * rank passes 2^31 for large models (40M users at rank 64).
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * rank)
    return pa.table(
        {"id": ids, "bias": pa.array(bias), "factors": pa.LargeListArray.from_arrays(offsets, flat)}
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


# -- helpers of the model's use: id lookup and cold-start policy --------------------------------
COLD_START_POLICIES = ("fallback", "drop")


@dataclass
class Prediction:
    """Result of :meth:`Model.predict` with ``return_info=True``.

    Attributes
    ----------
    scores : ndarray, shape (n,) under 'fallback', (known.sum(),) under 'drop'
    known : ndarray of bool, shape (n,): both the user and the item are known to the model
    cold_users, cold_items : number of pairs whose user (item) is unknown
    """

    scores: np.ndarray
    known: np.ndarray
    cold_users: int
    cold_items: int

    @property
    def cold_pairs(self) -> int:
        """Pairs with an unknown user or item (or both)."""
        return int((~self.known).sum())


def check_cold_start(policy: str) -> None:
    if policy not in COLD_START_POLICIES:
        from dmf.errors import InputError

        raise InputError(f"cold_start must be one of {COLD_START_POLICIES}, not {policy!r}")


def as_id_array(ids: Any, id_type: pa.DataType, what: str = "id") -> pa.Array:
    """``ids`` (list, ndarray, pandas Series, Arrow array) as an Arrow array of ``id_type``."""
    from dmf.errors import InputError

    if isinstance(ids, pa.ChunkedArray):
        arr = ids.combine_chunks()
    elif isinstance(ids, pa.Array):
        arr = ids
    else:
        if hasattr(ids, "to_numpy") and not isinstance(ids, np.ndarray):
            ids = ids.to_numpy()
        if isinstance(ids, str | bytes | int | np.integer):
            ids = [ids]
        if not len(ids):
            arr = pa.array([], type=id_type)
        else:
            try:
                arr = pa.array(ids)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                # Mixed types (e.g. [10, "5"]): read them all as text, then cast.
                arr = pa.array(np.asarray(ids, dtype=str))
    if arr.type == id_type:
        return arr
    if pa.types.is_null(arr.type):
        return arr.cast(id_type)
    if pa.types.is_string(arr.type) and pa.types.is_integer(id_type):
        # Text that is not an integer cannot be any of the model's ids: unknown (null), like
        # any other id the model never saw, rather than an error that stops a whole file.
        is_int = pc.match_substring_regex(arr, r"^\s*[-+]?[0-9]+\s*$")
        arr = pc.if_else(is_int, pc.utf8_trim_whitespace(arr), pa.nulls(len(arr), pa.string()))
    try:
        if pa.types.is_floating(arr.type) and pa.types.is_integer(id_type):
            return arr.cast(id_type, safe=True)
        return arr.cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(
            f"{what} ids of type {arr.type} cannot be read as this model's {what} ids "
            f"({id_type}): {exc}"
        ) from exc


def lookup_ids(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each of ``values`` in ``value_set``, shape (len(values),), int64; -1 if absent.

    One Arrow hash lookup (``pyarrow.compute.index_in``), not a Python loop.
    """

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.type != value_set.type:
        values = as_id_array(values, value_set.type)
    idx = pc.index_in(values, value_set=value_set)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
