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
a model live in their own modules: :mod:`dmf.model.predict` (pairs, fold-in, similar items and
users, the cold-start reports), :mod:`dmf.model.recommend` (top-N, blockwise on Dask),
:mod:`dmf.model.top_users` (the top users for items, the user side streamed block by block) and
:mod:`dmf.model.evaluate`; the methods here call them.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dmf import __version__
from dmf.als.solver import predict
from dmf.config import ModelConfig
from dmf.errors import ModelError
from dmf.model import predict as _uses
from dmf.model.ids import (
    ColdStart,
    IdIndex,
    IndexMaps,
    as_id_array,
    handled,
    report,
    store_index_maps,
)
from dmf.model.plot import plot_history
from dmf.model.recommend import recommend_all
from dmf.model.side import IN_MEMORY_BYTES, ModelSide, factor_part_rel, factor_table
from dmf.store.layout import Store
from dmf.store.lease import WRITER
from dmf.store.storage import (
    Commit,
    FileEntry,
    Location,
    Target,
    entries_of,
    leftovers,
    read_manifest,
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


# history.csv's columns of implicit-feedback training, in place of the RMSEs.
IMPLICIT_FIELDS = {"train_rmse": "train_loss", "validation_rmse": "validation_ndcg"}


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


class Model:
    """A biased matrix-factorization model: r_hat(i, j) = mu + b_i + c_j + u_i . v_j.

    Each side (:attr:`users`, :attr:`items`) is a :class:`dmf.model.side.ModelSide`: in memory,
    or the block files of a model directory read block by block when it is too large for one
    process (:meth:`load`). The arrays below read the whole side when accessed.

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
    clip : bool
        Clip predictions to :attr:`rating_range` (when it is known). Starts as the config's
        ``model.clip`` (true by default); set it to False to get the raw
        ``mu + b_i + c_j + u_i . v_j``. Each call may override it (``predict(..., clip=False)``).
    path : str or None
        The model directory it was loaded from or last saved to (None: only in memory).
    """

    def __init__(
        self,
        mu: float,
        user_ids: pa.Array | None = None,
        item_ids: pa.Array | None = None,
        user_factors: np.ndarray | None = None,
        user_bias: np.ndarray | None = None,
        item_factors: np.ndarray | None = None,
        item_bias: np.ndarray | None = None,
        config: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        store_fingerprint: str = "",
        store_path: str = "",
        meta: dict[str, Any] | None = None,
        *,
        users: ModelSide | None = None,
        items: ModelSide | None = None,
    ):
        self.mu = float(mu)
        self.users = users or ModelSide.from_arrays("user", user_ids, user_factors, user_bias)
        self.items = items or ModelSide.from_arrays("item", item_ids, item_factors, item_bias)
        self.config = config or {}
        self.history = history or []
        self.store_fingerprint = store_fingerprint
        self.store_path = store_path
        self.meta = meta or {}
        self.clip = bool((self.config.get("model") or {}).get("clip", True))
        self.path: str | None = None
        # A temporary store this model was trained on (dmf.ALS.fit on in-memory data): kept,
        # for exclude_seen='store', as long as this object lives; removed with it.
        self._scratch: Any = None

    def side(self, name: str) -> ModelSide:
        return self.users if name == "user" else self.items

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickled, sent to a worker) does not own the temporary store: it goes with
        # this object.
        return {**self.__dict__, "_scratch": None}

    # -- the arrays (a whole side each) -------------------------------------------------------
    @property
    def user_ids(self) -> pa.Array:
        return self.users.ids

    @property
    def item_ids(self) -> pa.Array:
        return self.items.ids

    @property
    def user_factors(self) -> np.ndarray:
        return self.users.factors

    @property
    def user_bias(self) -> np.ndarray:
        return self.users.bias

    @property
    def item_factors(self) -> np.ndarray:
        return self.items.factors

    @property
    def item_bias(self) -> np.ndarray:
        return self.items.bias

    @property
    def rank(self) -> int:
        return self.items.rank

    @property
    def n_users(self) -> int:
        return self.users.n_rows

    @property
    def n_items(self) -> int:
        return self.items.n_rows

    @property
    def dtype(self) -> str:
        return self.items.dtype

    @property
    def feedback(self) -> str:
        """``explicit`` (ratings) or ``implicit`` (events: scores rank items, they are not
        ratings), from the config the model was trained with."""
        return str((self.config.get("model") or {}).get("feedback", "explicit"))

    @property
    def implicit(self) -> bool:
        return self.feedback == "implicit"

    @property
    def rating_range(self) -> tuple[float, float] | None:
        """(lowest, highest) rating predictions are clipped to: ``rating_range`` of
        ``model.json`` (``data.rating_range`` when set, else the lowest and highest train
        rating); None for a model that does not record it (no clipping)."""
        r = self.meta.get("rating_range")
        return None if r is None else (float(r[0]), float(r[1]))

    @rating_range.setter
    def rating_range(self, value: tuple[float, float] | None) -> None:
        if value is None:
            self.meta.pop("rating_range", None)
            return
        lo, hi = (float(v) for v in value)
        if not lo <= hi:
            raise ModelError(f"rating_range must be [low, high] with low <= high, not {value}")
        self.meta["rating_range"] = [lo, hi]

    def clip_bounds(self, clip: bool | None = None) -> tuple[float, float] | None:
        """The range a prediction is clipped to: :attr:`rating_range` when ``clip`` (None: the
        model's :attr:`clip`) is on and the range is known, else None."""
        on = self.clip if clip is None else bool(clip)
        return self.rating_range if on else None

    def clip_scores(self, scores: np.ndarray, clip: bool | None = None) -> np.ndarray:
        """``scores`` clipped to :meth:`clip_bounds` (in place; returned)."""
        bounds = self.clip_bounds(clip)
        if bounds is not None:
            np.clip(scores, bounds[0], bounds[1], out=scores)
        return scores

    def __repr__(self) -> str:
        # Sizes and settings only: never ids or factors, whatever the model's size.
        where = repr(self.path) if self.path else "None (in memory)"
        return (
            f"Model(rank={self.rank}, users={self.n_users:,}, items={self.n_items:,}, "
            f"dtype={self.dtype}, iterations={len(self.history)}, path={where})"
        )

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
        its location. (A model trained by dmf is already saved, its factor files written block
        by block by the workers.)"""
        root = Location.of(path, options)
        if not overwrite and (root / MODEL_JSON).exists():
            raise ModelError(f"model directory {root} exists; pass overwrite=True to replace it")
        check_replaceable(root)
        with Commit(root, MODEL_JSON) as c:
            for side in (self.users, self.items):
                write_factor_part(c.target, side.name, 0, side.ids, side.factors, side.bias, c)
            bounds = {"user": [0, self.n_users], "item": [0, self.n_items]}
            c.commit({**self._model_json(), "blocks": bounds})
        write_views(root, self.history, plot, self._model_json())
        self.path = str(root)
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
            "dtype": self.dtype,
            "store_fingerprint": self.store_fingerprint,
            # A temporary store goes with this object: a saved model does not point at it.
            "store_path": "" if self._scratch is not None else self.store_path,
            "config": self.config,
            "history": self.history,
            "versions": versions(),
            **self.meta,
        }

    @classmethod
    def load(
        cls,
        path: str | Path | Location,
        options: dict[str, Any] | None = None,
        in_memory: bool | None = None,
    ) -> Model:
        """Read a model directory written by :meth:`save` or by training.

        Parameters
        ----------
        path, options
            The directory (local path or URL) and its filesystem's options.
        in_memory
            Read every factor file now (True), never (False: blocks are read on demand), or
            (None) each side whose factors take at most
            :data:`dmf.model.side.IN_MEMORY_BYTES`. Every file read is checked against
            ``model.json``.
        """
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
            dtype = str(meta.get("dtype", "float32"))
            n = {"user": int(meta["n_users"]), "item": int(meta["n_items"])}
        except Exception as exc:  # noqa: BLE001 - a damaged manifest: say which
            raise ModelError(f"{root / MODEL_JSON} is not a valid model manifest: {exc}") from exc
        blocks = meta.get("blocks") or {}
        first = meta.get("first_ids") or {}
        sides = {}
        for name in SIDES:
            side = ModelSide.from_files(
                name, root, files, blocks.get(name, [0, n[name]]), rank, dtype, first.get(name)
            )
            if in_memory or (in_memory is None and side.nbytes <= IN_MEMORY_BYTES):
                side.load()
            sides[name] = side
        model = cls(
            mu=mu,
            config=meta.get("config", {}),
            history=meta.get("history", []),
            store_fingerprint=meta.get("store_fingerprint", ""),
            store_path=meta.get("store_path", ""),
            meta={k: v for k, v in meta.items() if k not in _MODEL_JSON_KEYS},
            users=sides["user"],
            items=sides["item"],
        )
        model.path = str(root)
        return model

    # -- ids -----------------------------------------------------------------------------------
    @property
    def user_index(self) -> IdIndex:
        """The user ids with a lookup built on first use (:class:`dmf.model.ids.IdIndex`); the
        whole side's ids: for models whose ids fit in memory."""
        return self._id_index("user")

    @property
    def item_index(self) -> IdIndex:
        return self._id_index("item")

    def _id_index(self, side: str) -> IdIndex:
        s = self.side(side)
        if s._index is None:
            s._index = IdIndex(s.ids)
        return s._index

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
        return as_id_array(ids, self.side(side).id_type, side)

    def index_of(self, ids: Any, side: str) -> np.ndarray:
        """Dense indices of raw ``ids``, shape (n,), int64; -1 for ids the model does not know.

        Vectorised, on a lookup built once per model (or per block of a side on disk), never a
        Python loop over the ids.
        """
        return self.side(side).index_of(self.as_ids(ids, side))

    def store_maps(self, store: Store) -> IndexMaps:
        """``store``'s dense indices as this model's (None where they are the same)."""
        return store_index_maps(self.users, self.items, self.store_fingerprint, store)

    def solve_params(self) -> dict[str, Any]:
        """The regularisation the model was trained with (``config['model']``): reg, reg_bias,
        weighted_reg, dtype, as :func:`dmf.als.solver.solve_block` takes them."""
        try:
            mc = ModelConfig.model_validate(self.config.get("model", {}))
        except Exception as exc:  # noqa: BLE001 - pydantic's error says which key
            raise ModelError(f"model config section 'model' is not valid: {exc}") from exc
        imp = None
        if mc.implicit:
            from dmf.als.solver import Implicit

            # The row solver does not matter for a single row: fold-in solves it exactly.
            imp = Implicit(mc.alpha, mc.confidence, mc.eps, mc.biases)
        return {
            "reg": mc.reg,
            "reg_bias": mc.effective_reg_bias,
            "weighted_reg": mc.weighted_reg,
            "dtype": self.dtype,
            "implicit": imp,
        }

    def item_gram(self):
        """Implicit feedback: the item side's :class:`dmf.als.solver.ImplicitGram`, computed
        once per model object (what folding a user in holds fixed)."""
        if getattr(self, "_item_gram", None) is None:
            from dmf.als.solver import implicit_gram, sum_grams

            biases = self.solve_params()["implicit"].biases
            f, b = self.item_factors, self.item_bias
            step = 1 << 16
            self._item_gram = sum_grams(
                [
                    implicit_gram(np.hstack([f[lo : lo + step], b[lo : lo + step, None]]), biases)
                    for lo in range(0, max(len(b), 1), step)
                ]
            )
        return self._item_gram

    # -- using the model (see dmf.model.predict and dmf.model.recommend) -------------------------
    def predict_indices(
        self, users: np.ndarray, items: np.ndarray, clip: bool | None = None
    ) -> np.ndarray:
        """mu + b_i + c_j + u_i . v_j for dense indices, shape (n,), float64, clipped to
        :attr:`rating_range` when ``clip`` (None: :attr:`clip`) is on and the range is known.

        An index of -1 is an unknown user or item: its bias and factors count as zero, which is
        the cold-start fallback (mu + c_j, mu + b_i, or mu).
        """
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if self.users.in_memory and self.items.in_memory:
            scores = predict(
                self.mu,
                self.user_factors,
                self.user_bias,
                self.item_factors,
                self.item_bias,
                users,
                items,
            )
            return self.clip_scores(scores, clip)
        # A side on disk: only the rows of the indices given, read from their blocks.
        ku, ki = users >= 0, items >= 0
        uf, ub = self.users.rows(users[ku])
        vf, vb = self.items.rows(items[ki])
        u_rows = np.full(len(users), -1)
        u_rows[ku] = np.arange(int(ku.sum()))
        i_rows = np.full(len(items), -1)
        i_rows[ki] = np.arange(int(ki.sum()))
        return self.clip_scores(predict(self.mu, uf, ub, vf, vb, u_rows, i_rows), clip)

    def predict(
        self,
        users: Any,
        items: Any,
        cold_start: str = "fallback",
        return_info: bool = False,
        clip: bool | None = None,
        output: str = "numpy",
    ) -> Any:
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
            cold-start counts, and ``.cold_start``: the report every call gives) instead of the
            scores alone.
        clip
            Clip to :attr:`rating_range`; None: the model's :attr:`clip` (on by default).
        output : 'numpy', 'arrow' or 'pandas'
            The scores as an ndarray, a ``pyarrow.Array`` or a ``pandas.Series`` named score.

        Returns
        -------
        Scores of shape (n,) with ``fallback``; shape (n_known,) with ``drop``, in input order:
        the rows kept are those where ``Prediction.known`` is true.
        """
        _uses.check_output(output, ("numpy", *_uses.OUTPUTS))
        p = _uses.predict_pairs(self, users, items, cold_start, True, clip)
        report(p.cold_start)
        p.scores = _scores_as(p.scores, output)
        return p if return_info else p.scores

    def recommend(
        self,
        users: Any = None,
        n: int = 10,
        *,
        include: Any = None,
        exclude: Any = None,
        exclude_seen: Any = None,
        cold_start: str = "fallback",
        client=None,
        tile_users: int | None = None,
        output: str = "arrow",
        return_info: bool = False,
    ) -> Any:
        """Top-``n`` items for ``users`` (raw ids; default all users).

        Parameters
        ----------
        users : array-like of raw ids, shape (m,), or None for every user of the model
        n : int
        include : array-like of raw item ids, or None
            Only these items are candidates (for every user).
        exclude : array-like of raw item ids, or None
            These items are never recommended. Unknown ids in ``include`` and ``exclude`` are
            ignored and counted as unknown items in the cold-start report.
        exclude_seen : None, 'store', a :class:`dmf.store.Store` or a store path
            Items each user rated in train, not to recommend to them: ``None`` excludes nothing;
            ``'store'`` the user's train ratings in the store recorded in the model
            (``model.store_path``); a store, the user's ratings in that store's ``by_user``
            blocks.
        cold_start : 'fallback' or 'drop'
            Unknown users get the items ranked by mu + c_j, or no rows.
        client
            A ``distributed.Client`` to run one task per user block; ``None`` runs locally.
        tile_users
            Users scored at once (memory: ``tile_users x n_items`` float32).
        output : 'arrow' or 'pandas'
        return_info
            Also return the cold-start report (:class:`dmf.model.ids.ColdStart`).

        Returns
        -------
        Table (user, rank, item, score): up to ``n`` rows per user, ranks from 1, in the order
        the users were given; a ``pyarrow.Table`` or a ``pandas.DataFrame``. Scores are the raw
        ``mu + b_i + c_j + u_i . v_j`` (never clipped: clipping would tie the top items).
        Computed by :func:`dmf.model.recommend.recommend_all`.
        """
        _uses.check_output(output)
        _check_filter(include, "include")
        _check_filter(exclude, "exclude")
        allowed, unknown_items = _uses.id_filter(self, "item", include, exclude)
        given = None if users is None else self.as_ids(users, "user")
        unknown = 0 if given is None else int((self.index_of(given, "user") < 0).sum())
        table = recommend_all(
            self,
            self._seen_store(exclude_seen),
            n,
            users=given,
            client=client,
            tile_users=tile_users,
            cold_start=cold_start,
            allowed_items=allowed,
        )
        total = self.n_users if given is None else len(given)
        info = ColdStart(
            "recommend", total, "users", unknown, unknown, unknown_items, handled(cold_start)
        )
        return self._result(table, info, output, return_info)

    def recommend_users(
        self,
        items: Any,
        n: int = 10,
        *,
        include: Any = None,
        exclude: Any = None,
        exclude_seen: Any = None,
        cold_start: str = "fallback",
        client=None,
        tile_users: int | None = None,
        output: str = "arrow",
        return_info: bool = False,
    ) -> Any:
        """Top-``n`` users for each of ``items`` (raw ids) by predicted rating: the users to
        show an item to.

        The user side is streamed block by block with a running top-``n`` per item
        (:mod:`dmf.model.top_users`): a model whose users are on disk is read one block at a
        time, on the cluster with ``client`` (one task per block).

        Parameters
        ----------
        items : array-like of raw item ids, shape (q,)
        n : int
        include, exclude : array-like of raw user ids, or None
            Only these users are candidates; these users never are.
        exclude_seen : None, 'store', a Store or a store path
            Leave out the users who rated the item in train (the store's ``by_item`` blocks).
        cold_start : 'fallback' or 'drop'
            Unknown items get the users ranked by mu + b_u, or no rows.
        client, tile_users
            A ``distributed.Client`` for a user side on disk; users scored at once per query
            tile (default: a 64 MiB tile).
        output : 'arrow' or 'pandas'
        return_info : also return the cold-start report

        Returns
        -------
        Table (item, rank, user, score): up to ``n`` rows per item, in the order the items
        were first given; ties go to the lower user index.
        """
        _uses.check_output(output)
        _check_filter(include, "include")
        _check_filter(exclude, "exclude")
        allowed, unknown_users = _uses.id_filter(self, "user", include, exclude)
        table, info = _uses.recommend_users(
            self, items, n, allowed, self._seen_store(exclude_seen), cold_start, client, tile_users
        )
        info = ColdStart(
            info.call,
            info.total,
            info.unit,
            info.cold,
            info.cold_users + unknown_users,
            info.cold_items,
            info.handled,
        )
        return self._result(table, info, output, return_info)

    def _result(self, table: pa.Table, info: ColdStart, output: str, return_info: bool) -> Any:
        report(info)
        out = _uses.as_output(table, output)
        return (out, info) if return_info else out

    def _seen_store(self, exclude_seen: Any) -> Store | None:
        if exclude_seen is None or isinstance(exclude_seen, Store):
            return exclude_seen
        if isinstance(exclude_seen, str) and exclude_seen == "store":
            if not self.store_path:
                raise ModelError(
                    "exclude_seen='store': this model records no store path; pass the store itself"
                )
            return Store.open(self.store_path, options=self.storage_options())
        return Store.open(exclude_seen, options=self.storage_options())

    def storage_options(self) -> dict[str, Any]:
        """The storage options the model was trained with (the config's ``storage.options``)."""
        return dict((self.config.get("storage") or {}).get("options") or {})

    def fold_in(self, items: Any, ratings: Any, return_info: bool = False) -> tuple:
        """Factors and bias of a new user from their ratings, without retraining.

        Solves exactly the training equations for one user (the augmented normal equations of
        :func:`dmf.als.solver.solve_block`, with the model's reg, reg_bias and weighted_reg),
        given the item factors and biases: the user a training half-iteration would produce.

        Parameters
        ----------
        items : array-like of raw item ids, shape (k,)
        ratings : array-like of float, shape (k,)
            Items the model does not know are ignored (they have no factors); they are counted
            in the cold-start report.
        return_info : also return the cold-start report (a third element)

        Returns
        -------
        (factors, bias): ndarray of shape (rank,) and a float. A user with no known items gets
        zeros (the cold-start fallback).
        """
        factors, bias, info = _uses.fold_in(self, items, ratings)
        report(info)
        return (factors, bias, info) if return_info else (factors, bias)

    def recommend_for_ratings(
        self,
        items: Any,
        ratings: Any,
        n: int = 10,
        exclude_rated: bool = True,
        *,
        include: Any = None,
        exclude: Any = None,
        output: str = "arrow",
        return_info: bool = False,
    ) -> Any:
        """Top-``n`` items for a new user given their ratings (fold-in, then score every item).

        Parameters
        ----------
        items : array-like of raw item ids, shape (k,); ratings : array-like, shape (k,)
        exclude_rated : do not recommend the items given.
        include, exclude : array-like of raw item ids: the only candidates; never these.
        output : 'arrow' or 'pandas'
        return_info : also return the cold-start report (unknown items rated or in the filters)

        Returns
        -------
        Table (rank, item, score), up to ``n`` rows.
        """
        _uses.check_output(output)
        _check_filter(include, "include")
        _check_filter(exclude, "exclude")
        allowed, unknown = _uses.id_filter(self, "item", include, exclude)
        table, info = _uses.recommend_for_ratings(self, items, ratings, n, exclude_rated, allowed)
        info = ColdStart(
            info.call,
            info.total,
            info.unit,
            info.cold,
            info.cold_users,
            info.cold_items + unknown,
            info.handled,
        )
        return self._result(table, info, output, return_info)

    def similar_items(
        self,
        items: Any,
        n: int = 10,
        tile_items: int | None = None,
        *,
        output: str = "arrow",
        return_info: bool = False,
    ) -> Any:
        """The ``n`` items most similar to each of ``items``, by cosine of the item factors.

        Parameters
        ----------
        items : array-like of raw item ids, shape (q,)
        n : int
        tile_items : query items scored at once (memory ``tile_items x n_items`` float32)
        output : 'arrow' or 'pandas'
        return_info : also return the cold-start report

        Returns
        -------
        Table (item, rank, similar, score): for each query item (in the order given) up to
        ``n`` other items, best first; score is the cosine similarity in [-1, 1]. Items whose
        factors are all zero (no train ratings) have no direction: they are never returned, and
        as a query they get no rows. Unknown query items get no rows either (reported).
        """
        _uses.check_output(output)
        table, info = _uses.similar_items(self, items, n, tile_items)
        return self._result(table, info, output, return_info)

    def similar_users(
        self,
        users: Any,
        n: int = 10,
        *,
        client=None,
        tile_users: int | None = None,
        output: str = "arrow",
        return_info: bool = False,
    ) -> Any:
        """The ``n`` users most similar to each of ``users``, by cosine of the user factors
        (the user side streamed block by block, as :meth:`recommend_users`).

        Returns
        -------
        Table (user, rank, similar, score): for each query user (in the order first given) up
        to ``n`` other users, best first. Users whose factors are all zero are never returned
        and get no rows as a query; so do unknown users (reported).
        """
        _uses.check_output(output)
        table, info = _uses.similar_users(self, users, n, client, tile_users)
        return self._result(table, info, output, return_info)


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
    "first_ids",
}


def _check_filter(value: Any, name: str) -> None:
    """``exclude=`` takes item ids; the train items to leave out are ``exclude_seen=``."""
    if isinstance(value, Store | Location | str | os.PathLike):
        raise ModelError(
            f"{name}= takes a list or array of raw item ids, not {value!r}; to leave out each "
            f"user's train items pass exclude_seen={value!r}"
        )


def _scores_as(scores: np.ndarray, output: str) -> Any:
    if output == "arrow":
        return pa.array(scores)
    if output == "pandas":
        import pandas as pd

        return pd.Series(scores, name="score")
    return scores


def check_replaceable(root: Location) -> None:
    """Refuse to write a model into a non-empty directory that is not a model (e.g.
    ``output.model: runs``)."""
    if (root / MODEL_JSON).exists() or not root.isdir():
        return
    # What killed dmf writes left (a first save's factor files, a probe) is dmf's, not other.
    # So is a training run's lease on the directory (dmf.store.lease).
    ours = set(leftovers(root, MODEL_JSON, None, DERIVED)) | {WRITER}
    other = [rel for rel in root.files() if rel.split("/")[0] not in DERIVED and rel not in ours]
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
    entry = target.write_table(rel, factor_table(ids, factors, bias))
    if commit is not None:
        commit.add(rel, entry)
    return entry


def write_views(
    root: Location, history: list[dict[str, Any]], plot: bool, doc: dict[str, Any] | None = None
) -> None:
    """``history.csv`` and ``convergence.png``: views of the history in ``model.json``, written
    after it (not listed in it). ``doc`` (the ``model.json`` document) gives the plot its title
    (rank, regularisation) and the iteration kept under early stopping."""
    write_atomic(root / "history.csv", history_csv(history))
    if plot and history:
        write_atomic(root / "convergence.png", plot_history(history, doc))


def commit_model(root: Location, c: Commit, doc: dict[str, Any], plot: bool) -> Location:
    """Write ``model.json`` (``doc``, with the files of ``c``) last: the model is in place.
    For a model whose factor files workers wrote through ``c.target``."""
    c.commit({"format": MODEL_FORMAT, "versions": versions(), **doc})
    write_views(root, doc.get("history", []), plot, doc)
    return root


def history_csv(history: list[dict[str, Any]]) -> str:
    """The text of history.csv: one row per iteration, the columns of :data:`HISTORY_FIELDS`."""
    buf = io.StringIO(newline="")
    fields = HISTORY_FIELDS
    if any("validation_ndcg" in row for row in history):
        # Implicit feedback: the weighted loss over every cell and the validation NDCG.
        fields = [IMPLICIT_FIELDS.get(f, f) for f in HISTORY_FIELDS]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def load(
    path: str | Path | Location, options: dict[str, Any] | None = None, in_memory=None
) -> Model:
    """Load a saved model directory (``dmf.load``): a local path or a URL (see
    :meth:`Model.load`)."""
    return Model.load(path, options, in_memory)
