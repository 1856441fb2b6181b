"""Raw ids -> dense indices, built while streaming.

Ingest first gives every raw id a provisional *code* (int32) as batches arrive, and counts rows per
code. At the end, :meth:`IdMapper.finish` ranks the distinct raw ids (numeric order for integers,
byte order for strings): the dense index of an id is its rank. The index therefore depends only on
the set of ids, not on the order of the input or on the batch size.

Two mappers:

- :class:`IntIdMapper`: while ids are small non-negative integers (below ``table_limit``), the
  code *is* the id (no hashing at all: the common case of MovieLens and generated data). When an
  id falls outside, it switches to a sorted array of known ids with codes, merged per batch.
- :class:`StrIdMapper`: string ids, looked up per batch with Arrow's hash kernels.

Both hold memory proportional to the number of distinct ids, never to the number of ratings.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """String ids: known ids kept sorted as fixed-width bytes beside their codes.

    Each batch's distinct ids are looked up by binary search (memcmp, O(d log K) for d distinct
    ids against K known ones) and new ids merged in with one insert (a memcpy). Rebuilding a hash
    table over all K known ids for every batch, as before, made ingest quadratic in the number
    of ids. Ids are UTF-8 bytes; an id containing a NUL byte is refused (fixed-width bytes would
    not tell "a" from "a\\0").
    """

    def __init__(self) -> None:
        super().__init__()
        self.sorted_ids = np.empty(0, dtype="S1")  # known ids (UTF-8), sorted
        self.sorted_codes = np.empty(0, dtype=np.int32)  # their codes (order of first sight)
        self._n = 0

    @property
    def n_codes(self) -> int:
        return self._n

    def _encode(self, ids: pa.Array) -> np.ndarray:
        if not len(ids):
            return np.zeros(0, dtype=np.int32)
        enc = pc.dictionary_encode(ids)
        indices = enc.indices.to_numpy()
        dictionary = enc.dictionary
        if pc.any(pc.match_substring(dictionary, "\x00")).as_py():
            raise ValueError("an id contains a NUL byte")
        width = max(1, pc.max(pc.binary_length(dictionary)).as_py() or 1)
        if width > self.sorted_ids.dtype.itemsize:
            self.sorted_ids = self.sorted_ids.astype(f"S{width}")
        d = (
            dictionary.cast(pa.binary())
            .to_numpy(zero_copy_only=False)
            .astype(self.sorted_ids.dtype)
        )
        order = np.argsort(d, kind="stable")
        d = d[order]
        pos = np.searchsorted(self.sorted_ids, d)
        hit = np.zeros(len(d), dtype=bool)
        inside = pos < len(self.sorted_ids)
        hit[inside] = self.sorted_ids[pos[inside]] == d[inside]
        codes_sorted_d = np.empty(len(d), dtype=np.int32)
        codes_sorted_d[hit] = self.sorted_codes[pos[hit]]
        n_new = int((~hit).sum())
        if n_new:
            # Codes only need to be unique; the dense index is the rank of the raw id (finish).
            new_codes = np.arange(self._n, self._n + n_new, dtype=np.int32)
            codes_sorted_d[~hit] = new_codes
            self.sorted_ids = np.insert(self.sorted_ids, pos[~hit], d[~hit])
            self.sorted_codes = np.insert(self.sorted_codes, pos[~hit], new_codes)
            self._n += n_new
        codes_d = np.empty(len(d), dtype=np.int32)
        codes_d[order] = codes_sorted_d
        return codes_d[indices]

    def finish(self) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        # Known ids are kept sorted (bytewise, which is also Arrow's string order): the dense
        # index of a code is its position.
        index_of_code = np.empty(self._n, dtype=np.int32)
        index_of_code[self.sorted_codes] = np.arange(self._n, dtype=np.int32)
        counts = self.counts[: self._n]
        ids = pa.array(self.sorted_ids.tolist(), type=pa.binary()).cast(pa.string())
        return index_of_code, ids, counts[self.sorted_codes]


def make_mapper(kind: str) -> IdMapper:
    """A mapper for ids of ``kind`` ('int' or 'string')."""
    return IntIdMapper() if kind == "int" else StrIdMapper()
