"""Counter-based hashing: splitmix64 over NumPy arrays, and what dmf derives from it.

splitmix64 (Steele, Lea and Flood 2014; Vigna's reference C) turns a 64-bit state into a
well-mixed 64-bit output. Its generator adds the golden-ratio increment to the state and returns
the finaliser of the new state::

    state += 0x9E3779B97F4A7C15
    z = state
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)

so output ``n`` (1-based) of the generator started at ``key`` is the finaliser of
``n * golden + key``: a random number is a pure function of a counter and a key, not the state of
a generator. That is how dmf makes results that depend on nothing but the data and a seed,
whatever the batch size, the chunk size or the number of workers:

- ingest: the held-out split of a rating (:func:`pair_hash`, from (user, item, seed)) and the rows
  of the bounded timestamp sample of a temporal split (:func:`mix64` of the row number);
- synth: every random number after the global set-up (:func:`splitmix64` of a (user, item or
  draw) counter with a key per stream);
- string ids: a 64-bit hash of each (:func:`hash_strings`), which ingest's item id map and a
  model's id lookup search, confirming every match by comparing the strings.

All arithmetic is on uint64 arrays and wraps modulo 2**64, as in C.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

U64 = np.uint64
MASK64 = (1 << 64) - 1
GOLDEN = U64(0x9E3779B97F4A7C15)
"""The golden-ratio increment of splitmix64: 2**64 / phi, odd."""
_M1 = U64(0xBF58476D1CE4E5B9)
_M2 = U64(0x94D049BB133111EB)
_UNIT = 1.0 / (1 << 53)


def _finalise(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on the uint64 array ``z``; returns ``z``."""
    z ^= z >> U64(30)
    z *= _M1
    z ^= z >> U64(27)
    z *= _M2
    z ^= z >> U64(31)
    return z


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser of every element of ``x`` (cast to uint64), as a new array.

    A bijection of 64-bit integers whose outputs look independent for neighbouring inputs.
    """
    return _finalise(x.astype(U64, copy=True))


def mix64_int(value: int) -> np.uint64:
    """:func:`mix64` of one Python integer, taken modulo 2**64 (so negative seeds are fine)."""
    return mix64(np.array([value & MASK64], dtype=U64))[0]


def splitmix64(counter: np.ndarray, key: np.uint64) -> np.ndarray:
    """Output ``counter`` of the splitmix64 generator started at ``key``: the finaliser of
    ``counter * golden + key``, for a uint64 array of counters (any shape).

    Distinct counters give distinct, independent-looking outputs. One new array is allocated
    (the product); the rest is computed in place in it.
    """
    z = counter * GOLDEN
    z += key
    return _finalise(z)


def unit_float(h: np.ndarray) -> np.ndarray:
    """Hash values -> float64 uniform on [0, 1), from their top 53 bits."""
    return (h >> U64(11)).astype(np.float64) * _UNIT


def pair_hash64(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit hash of each (user index, item index, seed), shape (n,).

    Indices must be below 2**32 (dense indices are int32).
    """
    s = mix64_int(seed)
    z = users.astype(U64) << U64(32)
    z ^= items.astype(U64)
    z ^= s
    return _finalise(z)


def pair_hash(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    """A uniform float in [0, 1) for each (user index, item index, seed), shape (n,).

    Depends on nothing else, so a rating's split is the same whatever the batch size or the
    number of workers.
    """
    return unit_float(pair_hash64(users, items, seed))


_HASH_CHUNK = 1 << 22  # bytes hashed per pass: bounds the (bytes,) uint64 temporaries


def hash_strings(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of ``arr``, shape (n,), uint64, vectorised.

    h(s) = mix64(len + sum_k (s_k + 1) * G^(len - k)) mod 2^64 over the UTF-8 bytes s_k, with G
    splitmix64's golden-ratio increment: a polynomial hash (wrapping uint64 arithmetic) computed
    with one segmented sum per chunk of strings, then splitmix64's finaliser
    (:func:`dmf.data.hashing.mix64`). Nulls hash like the empty string.
    """
    arr = arr.cast(pa.large_string()) if arr.type != pa.large_string() else arr
    n = len(arr)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if n else 0
    # G^k for k = 1..longest, wrapping.
    powers = np.cumprod(np.full(max(longest, 1), GOLDEN, dtype=np.uint64), dtype=np.uint64)
    a = 0
    while a < n:
        # As many strings as fit in one chunk of bytes (at least one).
        b = int(np.searchsorted(offsets, offsets[a] + _HASH_CHUNK, side="right")) - 1
        b = min(max(b, a + 1), n)
        lo, hi = int(offsets[a]), int(offsets[b])
        seg_len = lengths[a:b]
        nonempty = seg_len > 0
        if hi > lo:
            # Position from the end of its string: the last byte gets M^1.
            from_end = np.repeat(offsets[a + 1 : b + 1], seg_len) - np.arange(lo, hi)
            terms = (data[lo:hi].astype(np.uint64) + np.uint64(1)) * powers[from_end - 1]
            starts = np.concatenate([[0], np.cumsum(seg_len)[:-1]])[nonempty]
            sums = np.add.reduceat(terms, starts)
            out[a:b][nonempty] = sums
        a = b
    out += lengths.astype(np.uint64)  # strings of NULs of different lengths differ
    return mix64(out)


def bits(n: int) -> int:
    """Bits needed to hold the values 0..n-1; at least 1."""
    return max(1, (int(n) - 1).bit_length()) if n > 1 else 1


__all__ = [
    "GOLDEN",
    "MASK64",
    "U64",
    "bits",
    "hash_strings",
    "mix64",
    "mix64_int",
    "pair_hash",
    "pair_hash64",
    "splitmix64",
    "unit_float",
]
