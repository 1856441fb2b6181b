"""Raw ids and dense indices: coercing what users pass, a lookup built once per model, and the
map between a model's indices and a store's.

A model (like a store) holds each side's raw ids in dense-index order: position = index.
Everything that takes raw ids (predict, recommend, fold-in, similar items, evaluation on another
store) turns them into indices through :class:`IdIndex`, which builds its lookup once and then
answers each call in time proportional to the call, not to the number of ids the model knows:

- integer ids: the known ids sorted once; a query is a binary search (``np.searchsorted``);
- string ids: a 64-bit hash of every known id, sorted once; a query hashes its ids, finds the
  candidates by binary search and confirms each by comparing the strings themselves, so a hash
  collision can never return a wrong index.

An id the model does not know has index -1 (the cold-start fallback decides what it gets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmf.data.hashing import hash_strings
from dmf.errors import InputError

COLD_START_POLICIES = ("fallback", "drop")

log = logging.getLogger("dmf")


def check_cold_start(policy: str) -> None:
    """Refuse a cold-start policy other than 'fallback' or 'drop'."""
    if policy not in COLD_START_POLICIES:
        raise InputError(f"cold_start must be one of {COLD_START_POLICIES}, not {policy!r}")


@dataclass(frozen=True)
class ColdStart:
    """What one call did with ids the model does not know. Every call that takes raw ids
    reports it the same way: returned with ``return_info=True``, and logged on the ``dmf``
    logger at INFO when there is any, in the words ``dmf predict`` prints::

        recommend: 3 users, 1 cold-start (1 unknown users, 0 unknown items) predicted from biases

    Attributes
    ----------
    call : the method ('predict', 'recommend', 'recommend_users', 'similar_items', ...)
    total : queries given (pairs, users, items or ratings: ``unit``), repeats counted
    cold : queries with an unknown id
    cold_users, cold_items : unknown user (item) ids among the queries and the id filters
        (``include``, ``exclude``), repeats counted
    handled : 'predicted from biases' (``cold_start='fallback'``) or 'dropped' (no rows, or
        ignored)
    """

    call: str
    total: int
    unit: str
    cold: int
    cold_users: int
    cold_items: int
    handled: str

    def __str__(self) -> str:
        return (
            f"{self.call}: {self.total} {self.unit}, {self.cold} cold-start ({self.cold_users} "
            f"unknown users, {self.cold_items} unknown items) {self.handled}"
        )

    @property
    def any(self) -> bool:
        return bool(self.cold or self.cold_users or self.cold_items)


def handled(policy: str) -> str:
    """What a cold-start policy does, in the report's words."""
    return "predicted from biases" if policy == "fallback" else "dropped"


def report(info: ColdStart) -> ColdStart:
    """Log ``info`` (when it counts any unknown id) on the ``dmf`` logger; returns it."""
    if info.any:
        log.info("dmf %s", info)
    return info


def as_id_array(ids: Any, id_type: pa.DataType, what: str = "id") -> pa.Array:
    """``ids`` (list, ndarray, pandas Series, Arrow array) as an Arrow array of ``id_type``.

    Integer ids given as text (read from a file, say) are accepted for an integer-id model and
    vice versa. Text that is not an integer cannot be any of an integer-id model's ids: it
    becomes null, which no lookup finds (an unknown id), rather than an error that stops a file.
    """
    arr = _to_arrow(ids, id_type)
    if arr.type == id_type:
        return arr
    if pa.types.is_null(arr.type):
        return arr.cast(id_type)
    if pa.types.is_string(arr.type) and pa.types.is_integer(id_type):
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


def _to_arrow(ids: Any, id_type: pa.DataType) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        return ids.combine_chunks()
    if isinstance(ids, pa.Array):
        return ids
    if hasattr(ids, "to_numpy") and not isinstance(ids, np.ndarray):
        ids = ids.to_numpy()
    if isinstance(ids, str | bytes | int | np.integer):
        ids = [ids]
    if not len(ids):
        return pa.array([], type=id_type)
    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types (e.g. [10, "5"]): read them all as text, then cast.
        return pa.array(np.asarray(ids, dtype=str))


class IdIndex:
    """The raw ids of one side (position = dense index), with a lookup built once.

    Parameters
    ----------
    ids : pyarrow.Array, shape (n,)
        Distinct raw ids, int64 or string, in dense-index order.
    """

    def __init__(self, ids: pa.Array):
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        self.ids = ids
        self._keys: np.ndarray | None = None  # sorted ids (int) or id hashes (string)
        self._order: np.ndarray | None = None  # dense index of each sorted key
        self._duplicate_keys = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def type(self) -> pa.DataType:
        return self.ids.type

    @property
    def is_integer(self) -> bool:
        return pa.types.is_integer(self.ids.type)

    def _build(self) -> None:
        keys = self._keys_of(self.ids)
        order = np.argsort(keys, kind="stable")
        self._keys, self._order = keys[order], order.astype(np.int64)
        self._duplicate_keys = bool(len(keys) > 1 and np.any(self._keys[1:] == self._keys[:-1]))

    def _keys_of(self, values: pa.Array) -> np.ndarray:
        if self.is_integer:
            return values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return hash_strings(values)

    def index_of(self, values: Any) -> np.ndarray:
        """Dense indices of raw ``values``, shape (m,), int64; -1 where the id is unknown.

        Vectorised: a binary search per value on keys sorted once, never a Python loop over ids.
        """
        arr = as_id_array(values, self.type)
        if len(arr) == 0:
            return np.zeros(0, dtype=np.int64)
        if self._keys is None:
            self._build()
        keys, order = self._keys, self._order
        valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if not valid.all():
            arr = arr.fill_null(0 if self.is_integer else "")
        q = self._keys_of(arr)
        pos = np.searchsorted(keys, q)
        pos_c = np.minimum(pos, max(len(keys) - 1, 0))
        out = np.full(len(q), -1, dtype=np.int64)
        if len(keys) == 0:
            return out
        hit = (keys[pos_c] == q) & valid
        out[hit] = order[pos_c[hit]]
        if not self.is_integer and hit.any():
            if self._duplicate_keys:
                # Two known ids share a hash (never seen in practice): Arrow's exact lookup.
                exact = pc.index_in(arr, value_set=self.ids).fill_null(-1)
                out = exact.to_numpy(zero_copy_only=False).astype(np.int64)
                out[~valid] = -1
                return out
            # Equal hashes: confirm the strings. An unknown id hashing like a known one is
            # unknown (the known ids' hashes are distinct, so there is no other candidate).
            cand = np.flatnonzero(hit)
            same = pc.equal(arr.take(pa.array(cand)), self.ids.take(pa.array(out[cand])))
            out[cand[~same.to_numpy(zero_copy_only=False).astype(bool)]] = -1
        return out

    def take(self, indices: np.ndarray) -> pa.Array:
        """Raw ids of dense ``indices`` (all valid), shape (m,)."""
        return self.ids.take(pa.array(np.asarray(indices, dtype=np.int64)))


@dataclass(frozen=True)
class IndexMaps:
    """A store's dense indices as a model's: ``user[s]`` is the model row of store user ``s``
    (-1 if the model does not know that user); ``None`` where the two index spaces are the
    same (the model was trained on this store)."""

    user: np.ndarray | None
    item: np.ndarray | None

    @property
    def same(self) -> bool:
        return self.user is None and self.item is None


def store_index_maps(
    user_index: IdIndex,
    item_index: IdIndex,
    model_fingerprint: str,
    store,
) -> IndexMaps:
    """How ``store``'s indices map to a model's (whose raw ids are ``user_index``,
    ``item_index``, trained on the store with ``model_fingerprint``)."""
    own = (
        bool(model_fingerprint)
        and model_fingerprint == store.fingerprint
        and len(user_index) == store.n_users
        and len(item_index) == store.n_items
    )
    if own:
        return IndexMaps(None, None)
    return IndexMaps(user_index.index_of(store.ids("user")), item_index.index_of(store.ids("item")))


def inverse_map(forward: np.ndarray, n: int) -> np.ndarray:
    """The inverse of an index map: ``inv[forward[s]] = s`` for every ``forward[s] >= 0``, -1
    elsewhere; shape (n,)."""
    inv = np.full(n, -1, dtype=np.int64)
    known = np.flatnonzero(forward >= 0)
    inv[forward[known]] = known
    return inv
