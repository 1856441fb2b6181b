"""Raw ids -> dense indices, built while streaming.

Ingest first gives every raw id a provisional *code* (int32) as batches arrive, and counts rows per
code. At the end, :meth:`IdMapper.finish` ranks the distinct raw ids (numeric order for integers,
byte order for strings): the dense index of an id is its rank. The index therefore depends only on
the set of ids, not on the order of the input or on the batch size.

Two mappers:

- :class:`IntIdMapper`: while ids are small non-negative integers (below ``table_limit``), the
  code *is* the id (no hashing at all: the common case of MovieLens and generated data). When an
  id falls outside, it switches to a sorted array of known ids with codes, merged per batch.
- :class:`StrIdMapper`: string ids, kept as one Arrow string array and looked up per batch
  through their 64-bit hashes, sorted.

Both hold memory proportional to the distinct ids (for strings, to their total length), never to
the number of ratings.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dmf.data.hashing import hash_strings
from dmf.errors import InputError

TABLE_LIMIT = 1 << 26


class IdMapper:
    """Base class: codes for raw ids, and rows counted per code."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def n_codes(self) -> int:
        raise NotImplementedError

    def encode(self, ids: pa.Array) -> np.ndarray:
        """Codes of ``ids`` (shape (n,), int32), adding unseen ids; rows are counted per code."""
        codes = self._encode(ids)
        n = self.n_codes
        if len(self.counts) < n:
            grown = np.zeros(max(n, 2 * len(self.counts)), dtype=np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        if len(codes):
            self.counts[: codes.max() + 1] += np.bincount(codes)
        return codes

    def _encode(self, ids: pa.Array) -> np.ndarray:
        raise NotImplementedError

    def finish(self) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        """(index_of_code, ids, counts).

        ``index_of_code``: int32, shape (n_codes,), the dense index of each code (-1 if unused);
        ``ids``: the raw ids in index order, shape (n,); ``counts``: rows per index, shape (n,).
        """
        raise NotImplementedError


class IntIdMapper(IdMapper):
    def __init__(self, table_limit: int = TABLE_LIMIT) -> None:
        super().__init__()
        self.table_limit = table_limit
        self.table_size = 0  # codes below this are the raw ids themselves
        self.keys: np.ndarray | None = None  # sorted raw ids (after switching)
        self.key_codes: np.ndarray | None = None
        self.next_code = 0

    @property
    def n_codes(self) -> int:
        return self.next_code if self.keys is not None else self.table_size

    def _encode(self, ids: pa.Array) -> np.ndarray:
        v = ids.to_numpy()
        if not len(v):
            return np.zeros(0, dtype=np.int32)
        if self.keys is None:
            lo, hi = int(v.min()), int(v.max())
            if lo >= 0 and hi < self.table_limit:
                self.table_size = max(self.table_size, hi + 1)
                return v.astype(np.int32)
            self._switch()
        return self._encode_sorted(v)

    def _switch(self) -> None:
        present = np.flatnonzero(self.counts[: self.table_size] > 0)
        self.keys = present.astype(np.int64)
        self.key_codes = present.astype(np.int32)
        self.next_code = self.table_size

    def _encode_sorted(self, v: np.ndarray) -> np.ndarray:
        assert self.keys is not None and self.key_codes is not None
        uniq, inv = np.unique(v, return_inverse=True)
        pos = np.searchsorted(self.keys, uniq)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == uniq[found]
        new = uniq[~found]
        if len(new):
            if self.next_code + len(new) >= 2**31 - 1:
                raise InputError("more than 2^31 distinct ids on one side are not supported")
            codes_new = np.arange(self.next_code, self.next_code + len(new), dtype=np.int32)
            self.next_code += len(new)
            at = pos[~found]
            self.keys = np.insert(self.keys, at, new)
            self.key_codes = np.insert(self.key_codes, at, codes_new)
            pos = np.searchsorted(self.keys, uniq)
        return self.key_codes[pos][inv].astype(np.int32, copy=False)

    def finish(self) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        counts = self.counts[: self.n_codes]
        if self.keys is None:
            present = np.flatnonzero(counts > 0)
            index_of_code = np.full(self.n_codes, -1, dtype=np.int32)
            index_of_code[present] = np.arange(len(present), dtype=np.int32)
            return index_of_code, pa.array(present.astype(np.int64)), counts[present]
        index_of_code = np.full(self.n_codes, -1, dtype=np.int32)
        index_of_code[self.key_codes] = np.arange(len(self.keys), dtype=np.int32)
        return index_of_code, pa.array(self.keys), counts[self.key_codes]


class StrIdMapper(IdMapper):
    """String ids: the known ids in code order, and their 64-bit hashes kept sorted.

    The known ids are one Arrow string array (UTF-8 bytes and offsets), so they take memory in
    proportion to their total length: one long id costs its own bytes, not its length times the
    number of ids, as a fixed-width array would. Each batch's distinct ids are hashed
    (:func:`dmf.data.hashing.hash_strings`) and looked up by binary search among the known ids'
    sorted hashes (O(d log K) for d distinct ids against K known ones, never a hash table
    rebuilt over all K per batch, which made ingest quadratic); every match is confirmed by
    comparing the strings, and new ids are merged in with one insert. Should two distinct ids
    ever share a hash, every later batch is looked up exactly instead (Arrow's hash table over
    the known ids): slower, never wrong.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ids = pa.array([], type=pa.large_string())  # known ids; position = code
        self.hashes: np.ndarray | None = np.empty(0, dtype=np.uint64)  # sorted; None: exact
        self.hash_codes = np.empty(0, dtype=np.int32)  # the code of each sorted hash

    @property
    def n_codes(self) -> int:
        return len(self.ids)

    def _encode(self, ids: pa.Array) -> np.ndarray:
        if not len(ids):
            return np.zeros(0, dtype=np.int32)
        enc = pc.dictionary_encode(ids)
        d = enc.dictionary.cast(pa.large_string())
        h = hash_strings(d) if self.hashes is not None else None
        codes = self._lookup(d, h)
        new = np.flatnonzero(codes < 0)
        if len(new):
            if self.n_codes + len(new) >= 2**31 - 1:
                raise InputError("more than 2^31 distinct ids on one side are not supported")
            # Codes only need to be unique; the dense index is the rank of the raw id (finish).
            codes[new] = np.arange(self.n_codes, self.n_codes + len(new), dtype=np.int32)
            self.ids = pa.concat_arrays([self.ids, d.take(pa.array(new))])
            if self.hashes is not None and h is not None:
                # Sorted first: np.insert puts values bound for one position in given order.
                new = new[np.argsort(h[new])]
                pos = np.searchsorted(self.hashes, h[new])
                self.hashes = np.insert(self.hashes, pos, h[new])
                self.hash_codes = np.insert(self.hash_codes, pos, codes[new])
        return codes[enc.indices.to_numpy()]

    def _lookup(self, d: pa.Array, h: np.ndarray | None) -> np.ndarray:
        """Codes of the distinct ids ``d`` (hashes ``h``), shape (len(d),), int32; -1 for an
        unknown id. Switches to exact lookups for good on a hash shared by two ids."""
        if self.hashes is not None and h is not None:
            codes = np.full(len(d), -1, dtype=np.int32)
            pos = np.minimum(np.searchsorted(self.hashes, h), max(len(self.hashes) - 1, 0))
            hit = np.flatnonzero(self.hashes[pos] == h) if len(self.hashes) else pos[:0]
            cand = self.hash_codes[pos[hit]]
            same = pc.equal(d.take(pa.array(hit)), self.ids.take(pa.array(cand)))
            same = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
            unknown = np.ones(len(d), dtype=bool)
            unknown[hit[same]] = False
            if same.all() and len(np.unique(h[unknown])) == int(unknown.sum()):
                codes[hit] = cand
                return codes
            self.hashes = None  # a known id and another, or two new ones, share a hash
            self.hash_codes = np.empty(0, dtype=np.int32)
        found = pc.index_in(d, value_set=self.ids).fill_null(-1)
        return found.to_numpy(zero_copy_only=False).astype(np.int32)

    def finish(self) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        # The dense index of an id is its rank in byte order (Arrow's string order, which is
        # also the order of the user side's ranges: dmf.data.idpartition).
        order = pc.sort_indices(self.ids).to_numpy()
        index_of_code = np.empty(self.n_codes, dtype=np.int32)
        index_of_code[order] = np.arange(self.n_codes, dtype=np.int32)
        ids = self.ids.take(pa.array(order)).cast(pa.string())
        return index_of_code, ids, self.counts[: self.n_codes][order]


def make_mapper(kind: str) -> IdMapper:
    """A mapper for ids of ``kind`` ('int' or 'string')."""
    return IntIdMapper() if kind == "int" else StrIdMapper()
