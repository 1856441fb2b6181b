"""The Python estimator: ``dmf.ALS(...).fit(data) -> Model``, for notebooks and scripts.

    import dmf
    model = dmf.ALS(rank=32, reg=0.05, iterations=15).fit(ratings_df, client=client)
    model.predict(users, items); model.recommend(users, n=10, exclude_seen="store")
    model.save("runs/model"); model = dmf.load("runs/model")

It builds a :class:`dmf.config.Config` (so every value is checked exactly as in a YAML file) and
calls dmf's own steps: :func:`dmf.data.ingest.ingest` for ratings held in memory or in a dask
DataFrame (written as Parquet first), then :func:`dmf.train.train`. There is nothing here that
the command line does not also do, so a model fitted on a DataFrame is the model ``dmf ingest``
and ``dmf train`` make of the same ratings, to the last bit.

It follows scikit-learn's conventions where they fit: constructor arguments are the parameters
(:meth:`ALS.get_params`, :meth:`ALS.set_params`), and ``fit`` keeps its result as ``model_``
(and returns it, as Spark's ``ALS.fit`` returns a model).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dmf.config import Columns, Config, is_url, load_config, merge_mappings
from dmf.errors import ConfigError, InputError
from dmf.model.model import Model
from dmf.store.layout import Store

# Constructor arguments that are config values, and where they go.
_CONFIG_KEYS = {
    "rank": "model.rank",
    "reg": "model.reg",
    "reg_bias": "model.reg_bias",
    "weighted_reg": "model.weighted_reg",
    "dtype": "model.dtype",
    "seed": "model.seed",
    "clip": "model.clip",
    "feedback": "model.feedback",
    "alpha": "model.alpha",
    "iterations": "train.iterations",
    "store": "store.path",
    "output": "output.model",
}
_OTHER_PARAMS = ("config", "callback")
# Config keys holding paths: given in Python, a relative path is relative to the current
# directory (as on the command line with --set), not to a config file's directory.
_PATH_KEYS = {"store.path", "output.model", "data.source", "synth.path"}
# The columns of the Parquet files written for ingest from in-memory input.
_FIELDS = ("user", "item", "rating", "timestamp")


class ALS:
    """Biased matrix factorization by alternating least squares on Dask.

    Every argument left at ``None`` takes the config's value (the default shown in brackets,
    or what ``config`` sets).

    Parameters
    ----------
    rank : int [10]
        Length of the factor vectors (0: biases only).
    reg : float [0.1]
        L2 penalty lambda on the factor vectors.
    reg_bias : float [= reg]
        L2 penalty on the biases.
    weighted_reg : bool [True]
        ALS-WR: scale each row's penalty by its number of train ratings (as Spark's
        regParam). ``False``: the same penalty for every row.
    iterations : int [20]
        Most full iterations (a user and an item half-iteration each); early stopping on
        the validation split (``train.early_stopping``, on by default) may stop sooner.
    dtype : 'float32' or 'float64' ['float32']
        Storage type of the factors; the normal equations are always float64.
    seed : int [0]
        Seed of the initial item factors; results do not depend on the number of workers.
    clip : bool [True]
        Clip the model's predictions to the rating range (``model.clip``).
    feedback : 'explicit' or 'implicit' ['explicit']
        ``implicit``: the data are events (plays, clicks; no rating column counts each event 1,
        repeats add up) and the model is Hu, Koren & Volinsky's confidence-weighted ALS over
        every user-item cell, without biases or ALS-WR unless asked (as Spark's
        ``implicitPrefs`` and implicit's ``AlternatingLeastSquares``).
    alpha : float [1.0]
        Implicit feedback: confidence 1 + alpha r of a cell with summed events r.
    store : path or None
        Where :meth:`fit` builds the store from in-memory ratings (``store.path``). Not set
        here nor in ``config``: a temporary directory, kept as long as the fitted model
        object lives (``exclude_seen='store'`` reads it) and removed with it. Workers must
        reach it: on a cluster of other machines give a shared path or a URL.
    output : path or None
        The model directory training writes (``output.model``), with its checkpoints. Not set
        here nor explicitly in ``config`` (its default ``runs/model`` does not count): no
        directory is written; training runs in a temporary one, the model is read into
        memory and the directory deleted. Save it later with ``model.save(path)``.
    config : Config, path of a YAML file, or None
        A base config; the arguments above and ``overrides`` are laid over it.
    callback : callable or None
        Called after every iteration with a copy of its history record (``iteration``,
        ``train_rmse``, ``validation_rmse``, ``objective``, ``seconds``, ...); returning
        ``True`` stops training there (the model is kept, as with a stopping rule).
    **overrides
        Further config keys, ``section__key=value``, e.g. ``train__tolerance=1e-4``,
        ``blocks__n_blocks=8``, ``split__test=0.2``, ``data__columns__user="userId"``.

    Attributes
    ----------
    config : Config
        The validated config (rebuilt by :meth:`set_params`).
    model_ : Model or None
        The model of the last :meth:`fit`.
    """

    def __init__(
        self,
        rank: int | None = None,
        reg: float | None = None,
        reg_bias: float | None = None,
        weighted_reg: bool | None = None,
        iterations: int | None = None,
        dtype: str | None = None,
        seed: int | None = None,
        clip: bool | None = None,
        feedback: str | None = None,
        alpha: float | None = None,
        store: str | Path | None = None,
        output: str | Path | None = None,
        config: Config | str | Path | None = None,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        **overrides: Any,
    ):
        self.rank = rank
        self.reg = reg
        self.reg_bias = reg_bias
        self.weighted_reg = weighted_reg
        self.iterations = iterations
        self.dtype = dtype
        self.seed = seed
        self.clip = clip
        self.feedback = feedback
        self.alpha = alpha
        self.store = store
        self.output = output
        self.config_source = config
        self.callback = callback
        self.overrides = dict(overrides)
        self.config = self._build_config()
        self.model_: Model | None = None

    # -- parameters (scikit-learn's conventions) -------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, by name (``config`` is the base config as given; the
        overrides as ``section__key``). ``deep`` is accepted for scikit-learn: an ALS holds no
        other estimator."""
        params = {name: getattr(self, name) for name in _CONFIG_KEYS}
        params.update(config=self.config_source, callback=self.callback, **self.overrides)
        return params

    def set_params(self, **params: Any) -> ALS:
        """Set constructor arguments (and ``section__key`` overrides) and validate the config
        again; returns ``self``. An invalid value raises :class:`dmf.errors.ConfigError`
        naming the key, and leaves the estimator as it was."""
        saved = self.get_params()
        for name, value in params.items():
            if name in _CONFIG_KEYS or name == "callback":
                setattr(self, name, value)
            elif name == "config":
                self.config_source = value
            elif "__" in name:
                self.overrides[name] = value
            else:
                raise ConfigError(
                    f"ALS has no parameter {name!r}: use one of {sorted(saved)}, or a config "
                    "key as section__key"
                )
        try:
            self.config = self._build_config()
        except Exception:
            self._restore(saved)
            raise
        return self

    def _restore(self, saved: dict[str, Any]) -> None:
        for name in _CONFIG_KEYS:
            setattr(self, name, saved[name])
        self.config_source, self.callback = saved["config"], saved["callback"]
        self.overrides = {k: v for k, v in saved.items() if "__" in k}

    def _build_config(self) -> Config:
        raw: dict[str, Any] = {}
        settings = {key: getattr(self, name) for name, key in _CONFIG_KEYS.items()}
        settings.update({k.replace("__", "."): v for k, v in self.overrides.items()})
        for dotted, value in settings.items():
            if value is None and dotted in _CONFIG_KEYS.values():
                continue  # left to the config
            if dotted in _PATH_KEYS and isinstance(value, str | os.PathLike):
                value = _from_cwd(value)
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        base = self.config_source
        if isinstance(base, Config):
            # Only the values the base config set, so that defaults stay defaults (output.model
            # set explicitly writes a model directory; its default does not).
            own = base.model_dump(mode="json", exclude={"base_dir"}, exclude_unset=True)
            cfg = load_config(raw=merge_mappings(own, raw))
            return cfg.model_copy(update={"base_dir": base.base_dir})
        return load_config(base, raw=raw)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if v is not None}
        return "ALS(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self,
        data: Any,
        client=None,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> Model:
        """Train on ``data`` and return the model (also kept as ``self.model_``).

        Parameters
        ----------
        data
            The ratings, as

            - a store: a :class:`dmf.store.Store` or its path (``dmf ingest``,
              :func:`dmf.store.store_from_arrays`);
            - a ``pandas.DataFrame``, a ``pyarrow.Table`` or a dask DataFrame with the
              columns named by the config's ``data.columns`` (``user``, ``item``, ``rating``,
              and ``timestamp`` when set): written as Parquet (a dask DataFrame by its own
              ``to_parquet``, partition by partition on the cluster: it is never collected on
              the driver) and ingested by :func:`dmf.data.ingest.ingest` with the config's
              ``data`` policies, ``split`` and ``blocks``, into ``store`` (see the class);
            - a ``scipy.sparse`` matrix or array: rows are users, columns items, each stored
              entry a rating (explicit zeros too); raw ids are the row and column numbers.
              Rows and columns without an entry are not in the model.
        client
            An existing ``distributed.Client``. Without one, a cluster is started from the
            config's ``cluster`` section (or ``address`` / ``scheduler_file``) for the ingest
            and the training, and closed at the end.
        callback
            Per-iteration callback; overrides the constructor's.
        **kwargs
            ``resume``, ``fresh`` (for a model directory, see :func:`dmf.train.train`),
            ``address``, ``scheduler_file``, ``quiet``, ``in_memory`` (how a model written to
            ``output`` is loaded; a model trained in a temporary directory is always read
            into memory).

        Returns
        -------
        The trained :class:`dmf.Model`.
        """
        callback = callback if callback is not None else self.callback
        with _Scratch() as scratch:
            config, in_memory = self._model_config(scratch, kwargs.pop("in_memory", None))
            if isinstance(data, Store | str | os.PathLike):
                model = self._fit_store(data, config, client, callback, in_memory, kwargs)
            else:
                model = self._fit_data(data, config, client, callback, in_memory, scratch, kwargs)
        if model.path is not None and scratch.owns(model.path):
            model.path = None  # the temporary model directory is gone
        self.model_ = model
        return model

    def _model_config(self, scratch: _Scratch, in_memory: bool | None) -> tuple[Config, Any]:
        """The config training runs with: the user's, or (no ``output.model`` asked for) one
        that trains into a temporary directory, without checkpoints or plot."""
        if "model" in self.config.output.model_fields_set:
            return self.config, in_memory
        out = self.config.output.model_copy(
            update={"model": str(scratch.path("model")), "plot": False}
        )
        train = self.config.train.model_copy(update={"checkpoint_every": 0})
        return self.config.model_copy(update={"output": out, "train": train}), True

    def _fit_store(self, store, config, client, callback, in_memory, kwargs) -> Model:
        from dmf.train.loop import train  # imported here: training pulls in the Dask layer

        if not isinstance(store, Store):
            store = _from_cwd(store)
        return train(store, config, client=client, in_memory=in_memory, callback=callback, **kwargs)

    def _fit_data(self, data, config, client, callback, in_memory, scratch, kwargs) -> Model:
        from dmf.data.ingest import ingest
        from dmf.dist.cluster import maybe_connect
        from dmf.train.loop import train

        explicit_store = "path" in config.store.model_fields_set
        if not explicit_store:
            store_cfg = config.store.model_copy(update={"path": str(scratch.path("store"))})
            config = config.model_copy(update={"store": store_cfg})
        quiet = kwargs.get("quiet", False)
        connect = {k: kwargs.pop(k) for k in ("address", "scheduler_file") if k in kwargs}
        with maybe_connect(config, client, quiet=quiet, **connect) as c:
            with _parquet_input(data, config, c, scratch) as source:
                data_cfg = config.data.model_copy(
                    update={
                        "source": source,
                        "format": "parquet",
                        "preset": None,
                        "columns": Columns(
                            rating="rating" if config.data.columns.rating is not None else None,
                            timestamp="timestamp" if config.data.columns.timestamp else None,
                        ),
                    }
                )
                store = ingest(
                    config.model_copy(update={"data": data_cfg}),
                    client=c,
                    progress=False if quiet else None,
                )
            model = train(store, config, client=c, in_memory=in_memory, callback=callback, **kwargs)
        if not explicit_store:
            model._scratch = scratch.keep("store")
            if model.path is not None and not scratch.owns(model.path):
                # The model directory asked for (output=) names the temporary store in its
                # model.json, gone with this object: write it again naming none, so that
                # `dmf evaluate` asks for --store instead of failing on a missing directory.
                model.save(model.path, overwrite=True)
        return model


# -- input held in memory, written as Parquet for ingest -----------------------------------------
def _from_cwd(path: str | os.PathLike) -> str:
    s = os.fspath(path)
    return s if is_url(s) else os.path.abspath(os.path.expanduser(s))


def _column_names(columns: Columns, available: list[str]) -> dict[str, str]:
    """Input column of each field (``data.columns``: a name or a position)."""
    out = {}
    for field in _FIELDS:
        spec = getattr(columns, field)
        if spec is None:
            continue
        if isinstance(spec, int):
            if not 0 <= spec < len(available):
                raise InputError(
                    f"data.columns.{field} is column {spec}, and the input has "
                    f"{len(available)} columns: {available}"
                )
            spec = available[spec]
        if spec not in available:
            raise InputError(
                f"the input has no column {spec!r} (data.columns.{field}); its columns are "
                f"{available}. Name the columns user, item, rating or set data.columns"
            )
        out[field] = spec
    return out


def _ratings_table(data: Any, columns: Columns) -> pa.Table:
    """The ratings of a pandas DataFrame, an Arrow table or a scipy.sparse matrix, as an Arrow
    table with the columns user, item, rating (and timestamp)."""
    import scipy.sparse as sp

    if sp.issparse(data):
        coo = data.tocoo()
        return pa.table(
            {
                "user": pa.array(np.asarray(coo.row, dtype=np.int64)),
                "item": pa.array(np.asarray(coo.col, dtype=np.int64)),
                "rating": pa.array(np.asarray(coo.data, dtype=np.float64)),
            }
        )
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        if not hasattr(data, "columns") or not hasattr(data, "iloc"):
            raise InputError(
                f"ALS.fit cannot read a {type(data).__name__}: give a store (or its path), a "
                "pandas DataFrame, a pyarrow Table, a dask DataFrame or a scipy.sparse matrix"
            )
        names = _column_names(columns, [str(c) for c in data.columns])
        by_str = {str(c): c for c in data.columns}
        picked = data[[by_str[n] for n in names.values()]]
        # Selected in the fields' order: name them now (positions in data.columns count in
        # the frame's own order, not in this one's).
        table = pa.Table.from_pandas(picked, preserve_index=False).rename_columns(list(names))
    else:
        names = _column_names(columns, data.column_names)
        table = data.select(list(names.values())).rename_columns(list(names))
    return pa.table(
        {name: _plain(col) for name, col in zip(table.column_names, table.columns, strict=True)}
    )


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as ingest reads it best: categories decoded, large strings as strings."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
        col = col.cast(pa.string())
    return col


def _is_dask_frame(data: Any) -> bool:
    return type(data).__module__.split(".")[0] == "dask" and hasattr(data, "to_parquet")


@contextlib.contextmanager
def _parquet_input(data: Any, config: Config, client, scratch: _Scratch) -> Iterator[str]:
    """Write ``data`` as Parquet for ingest; yields the directory, removed afterwards.

    In-memory input is written by the driver into the scratch directory (ingest reads its
    input on the driver). A dask DataFrame is written by its own tasks, on the cluster, into
    a directory beside the store (a hidden ``.NAME.input-TOKEN``), which the workers reach as
    they reach the store; never collected on the driver."""
    from dmf.store.storage import Location

    if not _is_dask_frame(data):
        import pyarrow.parquet as pq

        table = _ratings_table(data, config.data.columns)
        out = scratch.path("input")
        out.mkdir()
        pq.write_table(table, out / "part-000000.parquet")
        yield str(out)
        shutil.rmtree(out, ignore_errors=True)
        return
    store = Location.of(config.resolve(config.store.path), config.storage.options)
    out = store.parent / f".{store.name}.input-{uuid.uuid4().hex[:8]}"
    try:
        names = _column_names(config.data.columns, [str(c) for c in data.columns])
        frame = data[list(names.values())]
        frame = frame.rename(columns={v: k for k, v in names.items()})
        job = frame.to_parquet(
            out.url,
            write_index=False,
            write_metadata_file=False,
            name_function=lambda i: f"part-{i:06d}.parquet",
            storage_options=None if out.is_local else dict(out.options),
            compute=False,
        )
        client.compute(job).result()
        yield out.url
    finally:
        out.remove()


class _Scratch:
    """A temporary directory for one fit: the Parquet input, the model directory (when none
    was asked for) and the store (when no store.path was given). All of it goes at the end of
    the fit, except what :meth:`keep` hands over: the store of a fitted model, removed when
    the model object is garbage-collected (or at exit)."""

    def __init__(self):
        self.root: Path | None = None
        self._kept = False

    def path(self, name: str) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="dmf-fit-"))
        return self.root / name

    def owns(self, path: str) -> bool:
        return self.root is not None and Path(path).is_relative_to(self.root)

    def keep(self, name: str) -> _Kept:
        """Hand the scratch directory over to the returned object (it holds ``name``)."""
        self._kept = True
        for other in self.root.iterdir():
            if other.name != name:
                shutil.rmtree(other, ignore_errors=True)
        return _Kept(self.root)

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc) -> None:
        if self.root is not None and not (self._kept and exc[0] is None):
            shutil.rmtree(self.root, ignore_errors=True)


class _Kept:
    """A temporary directory removed when this object is garbage-collected, or at exit."""

    def __init__(self, root: Path):
        self.root = root
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(root), True)

    def __repr__(self) -> str:
        return f"<temporary store directory {self.root}>"
