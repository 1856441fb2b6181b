"""The state of a training run: the two sides, each with its factors, biases and train counts.

Both half-steps take a :class:`Side` to solve and a :class:`Side` held fixed, so the user and
the item half-steps are visibly the same code with the roles swapped:

    state.solve("user", given=state.items)   # U, b given V, c
    state.solve("item", given=state.users)   # V, c given U, b
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dmf.als.solver import penalty_term
from dmf.config import ModelConfig
from dmf.errors import TrainingError
from dmf.store.blocks import SIDES, other_side
from dmf.store.layout import Store

ARRAYS = ("factors", "bias")


@dataclass
class Side:
    """One side of the model (users or items) during training.

    Attributes
    ----------
    name : 'user' or 'item'
    factors : ndarray, shape (n, rank), storage dtype
    bias : ndarray, shape (n,), storage dtype
    counts : ndarray, shape (n,), int64
        Train ratings per row (the ALS-WR weights; 0 for rows that stay at zero).
    """

    name: str
    factors: np.ndarray
    bias: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.counts)
        if self.factors.shape[0] != n or self.bias.shape != (n,):
            raise ValueError(
                f"{self.name} side: factors {self.factors.shape}, bias {self.bias.shape} and "
                f"counts {self.counts.shape} disagree on the number of rows"
            )

    @property
    def n_rows(self) -> int:
        return len(self.counts)

    def penalty(self, m: ModelConfig) -> float:
        """This side's regularisation term of the objective."""
        return penalty_term(
            self.factors, self.bias, self.counts, m.reg, m.effective_reg_bias, m.weighted_reg
        )

    def copy(self) -> Side:
        return Side(self.name, self.factors.copy(), self.bias.copy(), self.counts)

    def check_finite(self, iteration: int) -> None:
        for what in ARRAYS:
            if not np.all(np.isfinite(getattr(self, what))):
                raise TrainingError(
                    f"iteration {iteration}: {self.name}_{what} has non-finite values"
                )


@dataclass
class TrainState:
    """Users and items: the model being trained."""

    users: Side
    items: Side

    def side(self, name: str) -> Side:
        return self.users if name == "user" else self.items

    def fixed_for(self, name: str) -> Side:
        """The side held fixed while ``name`` is solved."""
        return self.side(other_side(name))

    def replace(self, side: Side) -> None:
        if side.name == "user":
            self.users = side
        else:
            self.items = side

    def copy(self) -> TrainState:
        return TrainState(self.users.copy(), self.items.copy())

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The four arrays by name (``user_factors``, ...), as checkpoints store them."""
        return {
            f"{prefix}{s}_{what}": getattr(self.side(s), what) for s in SIDES for what in ARRAYS
        }

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], counts: dict[str, np.ndarray], prefix: str = ""
    ) -> TrainState:
        sides = {
            s: Side(s, arrays[f"{prefix}{s}_factors"], arrays[f"{prefix}{s}_bias"], counts[s])
            for s in SIDES
        }
        return cls(sides["user"], sides["item"])

    def check_finite(self, iteration: int) -> None:
        self.users.check_finite(iteration)
        self.items.check_finite(iteration)


def train_counts(store: Store) -> dict[str, np.ndarray]:
    """Train ratings per row of each side, from the store's id maps."""
    return {s: store.counts(s) for s in SIDES}


def initial_state(store: Store, m: ModelConfig) -> TrainState:
    """Starting point: U = 0, b = 0 (solved first), V ~ N(0, init_scale^2/rank), c = 0.

    Drawn on the driver from ``model.seed`` alone, so runs are reproducible whatever the number
    of workers or blocks. Items with no train ratings start (and stay) at zero.
    """
    counts = train_counts(store)
    dtype = np.dtype(m.dtype)
    rng = np.random.default_rng(m.seed)
    n_users, n_items = len(counts["user"]), len(counts["item"])
    v = rng.normal(0.0, m.init_scale / math.sqrt(max(m.rank, 1)), size=(n_items, m.rank))
    v[counts["item"] == 0] = 0.0
    return TrainState(
        Side(
            "user",
            np.zeros((n_users, m.rank), dtype=dtype),
            np.zeros(n_users, dtype=dtype),
            counts["user"],
        ),
        Side("item", v.astype(dtype), np.zeros(n_items, dtype=dtype), counts["item"]),
    )
