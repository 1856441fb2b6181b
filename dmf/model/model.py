"""The trained model: factors, biases, id maps, config and history, and its directory format.

    model/                   a local directory or a URL (dmf.store.storage)
      model.json             the manifest, written last: mu, rank, regularisation, iterations,
                             config, store fingerprint, versions, per-iteration history, and
                             every file with its size and CRC-32
      user_factors/part-NNNNN.TOKEN.parquet   id (raw), bias, factors (list of rank floats)
                             of the users of block NNNNN (the store's blocks after training)
      item_factors/part-NNNNN.TOKEN.parquet
      history.csv            iteration, train RMSE, validation RMSE, objective, seconds
      convergence.png        objective and RMSE per iteration
      checkpoints/           written during training (dmf.train.checkpoint)

The directory is committed by :class:`dmf.store.storage.Commit`: the factor files under names of
their own, ``model.json`` last, no rename; a reader never sees a half-written model and the
previous model stays readable until the new ``model.json`` lands. ``history.csv`` and
``convergence.png`` are views of the history in ``model.json``, rewritten after it. The uses of
a model live in their own modules: :mod:`dmf.model.predict` (pairs, fold-in, similar items),
:mod:`dmf.model.recommend` (top-N, blockwise on Dask) and :mod:`dmf.model.evaluate`; the methods
here call them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dmf import __version__
from dmf.als.solver import predict
from dmf.config import ModelConfig
from dmf.errors import ModelError
from dmf.model import predict as _uses
from dmf.model.ids import IdIndex, IndexMaps, as_id_array, store_index_maps
from dmf.model.plot import plot_history
from dmf.model.recommend import recommend_all
from dmf.store.layout import Store
from dmf.store.storage import (
    Commit,
    FileEntry,
    Location,
    Target,
    entries_of,
    leftovers,
    read_manifest,
    read_table,
    verify_file,
    write_atomic,
)

MODEL_FORMAT = 2
MODEL_JSON = "model.json"
# Entries of a model directory that are not listed in model.json: views of its history, the
# evaluation `dmf run` writes, the checkpoints and the side versions of training (each
# committed on its own).
DERIVED = ("history.csv", "convergence.png", "evaluation.json", "checkpoints", "work")
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
    user_ids: pa.Array = field(repr=False)
    item_ids: pa.Array = field(repr=False)
    user_factors: np.ndarray = field(repr=False)
    user_bias: np.ndarray = field(repr=False)
    item_factors: np.ndarray = field(repr=False)
    item_bias: np.ndarray = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    store_fingerprint: str = ""
    store_path: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    _index: dict[str, IdIndex] = field(default_factory=dict, init=False, repr=False, compare=False)

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
    def save(
        self,
        path: str | Path | Location,
        overwrite: bool = True,
        plot: bool = True,
        options: dict[str, Any] | None = None,
    ) -> Location:
        """Write the model directory (a local path or a URL; ``options`` for its filesystem):
        the factor files, then ``model.json`` last. Checkpoints already in it are kept. Returns
        its location."""
        root = Location.of(path, options)
        if not overwrite and (root / MODEL_JSON).exists():
            raise ModelError(f"model directory {root} exists; pass overwrite=True to replace it")
        check_replaceable(root)
        with Commit(root, MODEL_JSON) as c:
            for side, ids, f, b in (
                ("user", self.user_ids, self.user_factors, self.user_bias),
                ("item", self.item_ids, self.item_factors, self.item_bias),
            ):
                write_factor_part(c.target, side, 0, ids, f, b, commit=c)
            bounds = {"user": [0, self.n_users], "item": [0, self.n_items]}
            c.commit({**self._model_json(), "blocks": bounds})
        write_views(root, self.history, plot)
        return root

    def manifest(self) -> dict[str, Any]:
        """What ``model.json`` holds (without its file list)."""
        return self._model_json()

    def _model_json(self) -> dict[str, Any]:
        return {
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

    @classmethod
    def load(cls, path: str | Path | Location, options: dict[str, Any] | None = None) -> Model:
        """Read a model directory written by :meth:`save`, every file checked against
        ``model.json``."""
        root = Location.of(path, options)
        meta = read_manifest(root, MODEL_JSON, error=ModelError)
        if meta is None:
            raise ModelError(f"{root} is not a model directory (no {MODEL_JSON})")
        if meta.get("format") != MODEL_FORMAT:
            raise ModelError(
                f"{root / MODEL_JSON}: model format {meta.get('format')} is not {MODEL_FORMAT}"
                + ("; retrain it with this version of dmf" if meta.get("format") == 1 else "")
            )
        try:
            files = entries_of(meta)
            rank = int(meta["rank"])
            mu = float(meta["mu"])
        except Exception as exc:  # noqa: BLE001 - a damaged manifest: say which
            raise ModelError(f"{root / MODEL_JSON} is not a valid model manifest: {exc}") from exc
        blocks = meta.get("blocks") or {}
        parts = {
            side: _read_side_parts(root, files, side, blocks.get(side), rank) for side in SIDES
        }
        return cls(
            mu=mu,
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
            meta={k: v for k, v in meta.items() if k not in _MODEL_JSON_KEYS},
        )

    # -- ids -----------------------------------------------------------------------------------
    @property
    def user_index(self) -> IdIndex:
        """The user ids with a lookup built on first use (:class:`dmf.model.ids.IdIndex`)."""
        return self._id_index("user")

    @property
    def item_index(self) -> IdIndex:
        return self._id_index("item")

    def _id_index(self, side: str) -> IdIndex:
        if side not in self._index:
            self._index[side] = IdIndex(self.user_ids if side == "user" else self.item_ids)
        return self._index[side]

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
        return as_id_array(ids, self._id_index(side).type, side)

    def index_of(self, ids: Any, side: str) -> np.ndarray:
        """Dense indices of raw ``ids``, shape (n,), int64; -1 for ids the model does not know.

        Vectorised, on a lookup built once per model, never a Python loop over the ids.
        """
        return self._id_index(side).index_of(self.as_ids(ids, side))

    def store_maps(self, store: Store) -> IndexMaps:
        """``store``'s dense indices as this model's (None where they are the same)."""
        return store_index_maps(self.user_index, self.item_index, self.store_fingerprint, store)

    def solve_params(self) -> dict[str, Any]:
        """The regularisation the model was trained with (``config['model']``): reg, reg_bias,
        weighted_reg, dtype, as :func:`dmf.als.solver.solve_block` takes them."""
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

    # -- using the model (see dmf.model.predict and dmf.model.recommend) -------------------------
    def predict_indices(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """mu + b_i + c_j + u_i . v_j for dense indices, shape (n,), float64.

        An index of -1 is an unknown user or item: its bias and factors count as zero, which is
        the cold-start fallback (mu + c_j, mu + b_i, or mu).
        """
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
    ) -> np.ndarray | _uses.Prediction:
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
            Return a :class:`dmf.model.predict.Prediction` (scores, the mask of known pairs,
            cold-start counts) instead of the scores alone.

        Returns
        -------
        ndarray, shape (n,) with ``fallback``; shape (n_known,) with ``drop``, in input order:
        the rows kept are those where ``Prediction.known`` is true.
        """
        return _uses.predict_pairs(self, users, items, cold_start, return_info)

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
        order the users were given. Computed by :func:`dmf.model.recommend.recommend_all`.
        """
        return recommend_all(
            self,
            self._exclude_store(exclude),
            n,
            users=users,
            client=client,
            tile_users=tile_users,
            cold_start=cold_start,
        )

    def _exclude_store(self, exclude: Any) -> Store | None:
        if exclude is None or isinstance(exclude, Store):
            return exclude
        if isinstance(exclude, str) and exclude == "store":
            if not self.store_path:
                raise ModelError(
                    "exclude='store': this model records no store path; pass the store itself"
                )
            return Store.open(self.store_path, options=self.storage_options())
        return Store.open(exclude, options=self.storage_options())

    def storage_options(self) -> dict[str, Any]:
        """The storage options the model was trained with (the config's ``storage.options``)."""
        return dict((self.config.get("storage") or {}).get("options") or {})

    def fold_in(self, items: Any, ratings: Any) -> tuple[np.ndarray, float]:
        """Factors and bias of a new user from their ratings, without retraining.

        Solves exactly the training equations for one user (the augmented normal equations of
        :func:`dmf.als.solver.solve_block`, with the model's reg, reg_bias and weighted_reg),
        given the item factors and biases: the user a training half-iteration would produce.

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
        return _uses.fold_in(self, items, ratings)

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
        return _uses.recommend_for_ratings(self, items, ratings, n, exclude_rated)

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
        return _uses.similar_items(self, items, n, tile_items)


SIDES = ("user", "item")
_MODEL_JSON_KEYS = {
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
    "files",
    "version",
    "blocks",
}


def check_replaceable(root: Location) -> None:
    """Refuse to write a model into a non-empty directory that is not a model (e.g.
    ``output.model: runs``)."""
    if (root / MODEL_JSON).exists() or not root.isdir():
        return
    other = [name for name in root.ls() if name not in DERIVED]
    if other:
        raise ModelError(
            f"{root} is not a model directory but holds {', '.join(other[:5])}: choose an empty "
            "or new directory for output.model"
        )


def verify_model(root: Location) -> tuple[int, int]:
    """Check every file ``model.json`` lists (size and checksum); returns (files, bytes)."""
    meta = read_manifest(root, MODEL_JSON, error=ModelError)
    if meta is None:
        raise ModelError(f"{root} is not a model directory (no {MODEL_JSON})")
    files = entries_of(meta)
    for rel, entry in files.items():
        verify_file(root / (entry.path or rel), entry, error=ModelError)
    return len(files), sum(e.bytes for e in files.values())


def model_leftovers(root: Location) -> list[str]:
    """Files in a model directory that its ``model.json`` does not list (left by killed
    saves), relative to the directory; checkpoints are not counted."""
    return leftovers(root, MODEL_JSON, read_manifest(root, MODEL_JSON, error=ModelError), DERIVED)


def _factor_table(ids: pa.Array, factors: np.ndarray, bias: np.ndarray) -> pa.Table:
    # A list column (not fixed-size: Arrow has no fixed-size list of 0 for rank-0 models).
    n, rank = factors.shape
    flat = pa.array(np.ascontiguousarray(factors).reshape(-1))
    # int64 offsets: n * rank passes 2^31 for large models (40M users at rank 64).
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * rank)
    return pa.table(
        {"id": ids, "bias": pa.array(bias), "factors": pa.LargeListArray.from_arrays(offsets, flat)}
    )


def _read_factor_table(loc: Location, entry, rank: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(raw ids, factors (n, rank), biases (n,)) of one factor file, verified."""
    t = read_table(loc, entry, error=ModelError)
    try:
        flat = t.column("factors").combine_chunks().flatten().to_numpy()
        factors = flat.reshape(len(t), rank)
        return t.column("id").combine_chunks(), factors, t.column("bias").to_numpy()
    except (KeyError, ValueError, pa.ArrowException) as exc:
        raise ModelError(f"model file {loc} does not hold factors of rank {rank}: {exc}") from exc


def factor_part_rel(side: str, b: int) -> str:
    """The logical name of the factor file of block ``b`` of ``side`` in a model directory."""
    return f"{side}_factors/part-{b:05d}.parquet"


def write_factor_part(
    target: Target,
    side: str,
    b: int,
    ids: pa.Array,
    factors: np.ndarray,
    bias: np.ndarray,
    commit: Commit | None = None,
) -> FileEntry:
    """Write the factor file of block ``b`` of ``side`` (raw ids, biases, factors) into a model
    directory being committed; a worker may write it (then its entry goes back to the driver)."""
    rel = factor_part_rel(side, b)
    entry = target.write_table(rel, _factor_table(ids, factors, bias))
    if commit is not None:
        commit.add(rel, entry)
    return entry


def _read_side_parts(root, files, side, bounds, rank):
    n_parts = len(bounds) - 1 if bounds else 1
    ids, factors, bias = [], [], []
    for b in range(n_parts):
        rel = factor_part_rel(side, b)
        if rel not in files:
            raise ModelError(f"{root / MODEL_JSON} lists no {rel}")
        i, f, c = _read_factor_table(root / (files[rel].path or rel), files[rel], rank)
        ids.append(i)
        factors.append(f)
        bias.append(c)
    if n_parts == 1:
        return ids[0], factors[0], bias[0]
    return pa.concat_arrays(ids), np.concatenate(factors), np.concatenate(bias)


def write_views(root: Location, history: list[dict[str, Any]], plot: bool) -> None:
    """``history.csv`` and ``convergence.png``: views of the history in ``model.json``, written
    after it (not listed in it)."""
    write_atomic(root / "history.csv", history_csv(history))
    if plot and history:
        write_atomic(root / "convergence.png", plot_history(history))


def commit_model(root: Location, c: Commit, doc: dict[str, Any], plot: bool) -> Location:
    """Write ``model.json`` (``doc``, with the files of ``c``) last: the model is in place.
    For a model whose factor files workers wrote through ``c.target``."""
    c.commit({"format": MODEL_FORMAT, "versions": versions(), **doc})
    write_views(root, doc.get("history", []), plot)
    return root


def history_csv(history: list[dict[str, Any]]) -> str:
    """The text of history.csv: one row per iteration, the columns of :data:`HISTORY_FIELDS`."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_FIELDS})
    return buf.getvalue()


def load(path: str | Path | Location, options: dict[str, Any] | None = None) -> Model:
    """Load a saved model directory (``dmf.load``): a local path or a URL."""
    return Model.load(path, options)
