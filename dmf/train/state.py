"""The state of a training run: one version of each side, as files (:mod:`dmf.train.sides`).

Both half-steps take the side to solve and the side held fixed, so the user and the item
half-steps are visibly the same code with the roles swapped::

    users = halfsteps.run("user", fixed=state.items, it)   # U, b given V, c
    items = halfsteps.run("item", fixed=state.users, it)   # V, c given U, b

The driver holds no factors: a :class:`TrainState` is two :class:`SideBlocks` (boundaries, file
entries, the side's penalty term). It is also what a checkpoint records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dmf.config import ModelConfig
from dmf.store.blocks import SIDES, other_side
from dmf.store.layout import Store
from dmf.store.storage import Location
from dmf.train.sides import SideBlocks, initial_factors


@dataclass(frozen=True)
class TrainState:
    """Users and items: the model being trained (``users`` is None before the first user
    half-step: the users start at zero and are solved first)."""

    users: SideBlocks | None
    items: SideBlocks

    def side(self, name: str) -> SideBlocks | None:
        return self.users if name == "user" else self.items

    def fixed_for(self, name: str) -> SideBlocks:
        """The side held fixed while ``name`` is solved."""
        fixed = self.side(other_side(name))
        if fixed is None:  # pragma: no cover - the loop solves users first
            raise RuntimeError(f"no {other_side(name)} side to hold fixed yet")
        return fixed

    def with_side(self, side: SideBlocks) -> TrainState:
        if side.side == "user":
            return TrainState(side, self.items)
        return TrainState(self.users, side)

    def sides(self) -> list[SideBlocks]:
        """The sides this state has, users first."""
        return [s for s in (self.users, self.items) if s is not None]

    def roots(self) -> set[str]:
        """The directories of the versions this state uses (kept by the garbage collector)."""
        return {s.root.url for s in (self.users, self.items) if s is not None}

    def to_json(self, base: Location) -> dict[str, Any]:
        return {s: self.side(s).to_json(base) for s in SIDES if self.side(s) is not None}

    @classmethod
    def from_json(cls, doc: dict[str, Any], base: Location) -> TrainState:
        users = SideBlocks.from_json(doc["user"], base) if "user" in doc else None
        return cls(users, SideBlocks.from_json(doc["item"], base))


def checkpoint_side_refs(saved: dict[str, Any], model_dir: Location) -> list:
    """Every side block file a checkpoint's ``state.json`` names (its state, and the best
    state under early stopping): what resuming from it reads."""
    states = [saved["state"]] + ([saved["best"]["state"]] if saved.get("best") else [])
    return [
        ref
        for doc in states
        for side in TrainState.from_json(doc, model_dir).sides()
        for ref in side.refs()
    ]


def train_counts(store: Store) -> dict[str, np.ndarray]:
    """Train ratings per row of each side, from the store's id maps (for sides that fit in
    memory: tests and the in-memory reference)."""
    return {s: store.counts(s) for s in SIDES}


def initial_item_factors(store: Store, m: ModelConfig) -> np.ndarray:
    """The whole initial item factors in memory, (n_items, rank) in the storage dtype: what the
    trainer's init tasks write block by block (for tests and small models)."""
    v = initial_factors(0, store.n_items, m)
    v[store.counts("item") == 0] = 0.0
    return v.astype(m.dtype)
