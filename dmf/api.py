"""The Python estimator: ``dmf.ALS(...).fit(store) -> Model``, for notebooks and scripts.

    import dmf
    model = dmf.ALS(rank=32, reg=0.05, iterations=15).fit("runs/store", client=client)
    model.predict(users, items); model.recommend(users, n=10, exclude="store")
    model.save("runs/model"); model = dmf.load("runs/model")

It builds a :class:`dmf.config.Config` (so every value is checked exactly as in a YAML file) and
calls :func:`dmf.train.train`; there is nothing here that the command line does not also do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmf.config import Config, load_config, merge_mappings
from dmf.model.model import Model


class ALS:
    """Biased matrix factorization by alternating least squares on Dask.

    Parameters
    ----------
    rank : int
        Length of the factor vectors (0: biases only).
    reg : float
        L2 penalty lambda on the factor vectors.
    reg_bias : float or None
        L2 penalty on the biases (default: ``reg``).
    weighted_reg : bool
        ALS-WR: scale each row's penalty by its number of train ratings (as Spark).
    iterations : int
        Full iterations (a user and an item half-iteration each).
    dtype : 'float32' or 'float64'
        Storage type of the factors; the normal equations are always float64.
    seed : int
        Seed of the initial item factors; results do not depend on the number of workers.
    output : path or None
        Model directory the trainer saves to (and checkpoints in); default the config's
        ``output.model`` (``runs/model``).
    config : Config, path of a YAML file, or None
        A base config; the arguments above override its ``model`` and ``train`` values.
    **overrides
        Further dotted config keys with ``__`` for ``.``, e.g. ``train__tolerance=1e-4``,
        ``blocks__n_blocks=8``, ``train__checkpoint_every=0``.
    """

    def __init__(
        self,
        rank: int = 10,
        reg: float = 0.1,
        reg_bias: float | None = None,
        weighted_reg: bool = False,
        iterations: int = 10,
        dtype: str = "float32",
        seed: int = 0,
        output: str | Path | None = None,
        config: Config | str | Path | None = None,
        **overrides: Any,
    ):
        self.params = {
            "model.rank": rank,
            "model.reg": reg,
            "model.reg_bias": reg_bias,
            "model.weighted_reg": weighted_reg,
            "model.dtype": dtype,
            "model.seed": seed,
            "train.iterations": iterations,
        }
        if output is not None:
            self.params["output.model"] = str(output)
        for key, value in overrides.items():
            self.params[key.replace("__", ".")] = value
        self.base = config
        self.config = self._build_config()
        self.model_: Model | None = None

    def _build_config(self) -> Config:
        raw: dict[str, Any] = {}
        for dotted, value in self.params.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        if isinstance(self.base, Config):
            merged = merge_mappings(self.base.to_dict(), raw)
            return load_config(raw=merged).model_copy(update={"base_dir": self.base.base_dir})
        return load_config(self.base, raw=raw)

    def fit(self, store, client=None, **kwargs: Any) -> Model:
        """Train on ``store`` (a :class:`dmf.store.Store` or its path) and return the model.

        Parameters
        ----------
        store
            The ingested store (``dmf ingest``, or :func:`dmf.store.store_from_arrays`).
        client
            An existing ``distributed.Client``; without one, a LocalCluster is started from the
            config's ``cluster`` section and closed at the end.
        **kwargs
            Passed to :func:`dmf.train.train`: ``resume``, ``fresh``, ``address``,
            ``scheduler_file``, ``quiet``.

        Returns
        -------
        The trained :class:`dmf.Model` (also saved to ``config.output.model``); kept as
        ``self.model_``.
        """
        from dmf.train.loop import train  # imported here: training pulls in the whole Dask layer

        self.model_ = train(store, self.config, client=client, **kwargs)
        return self.model_

    def __repr__(self) -> str:
        m = self.config.model
        return (
            f"ALS(rank={m.rank}, reg={m.reg}, reg_bias={m.reg_bias}, "
            f"weighted_reg={m.weighted_reg}, iterations={self.config.train.iterations})"
        )
