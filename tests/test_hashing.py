"""dmf.data.hashing: splitmix64 against its reference values and a plain-Python version."""

from __future__ import annotations

import numpy as np
import pytest

from dmf.data.hashing import (
    GOLDEN,
    U64,
    bits,
    mix64,
    mix64_int,
    pair_hash,
    pair_hash64,
    splitmix64,
    unit_float,
)

M64 = (1 << 64) - 1


def finaliser(z: int) -> int:
    """splitmix64's finaliser in plain Python (Vigna's reference C, line by line)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_gives_the_reference_stream():
    # The generator seeded with 0 (state += golden, then the finaliser): its published outputs.
    first = [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
        0xF88BB8A8724C81EC,
        0x1B39896A51A8749B,
    ]
    got = splitmix64(np.arange(1, 6, dtype=U64), U64(0))
    assert [int(v) for v in got] == first
    # Started at any key, output n is the finaliser of n * golden + key.
    key = 0x0123456789ABCDEF
    counters = np.array([0, 1, 2, 7, 1 << 40, M64], dtype=U64)
    want = [finaliser((int(c) * int(GOLDEN) + key) & M64) for c in counters]
    assert [int(v) for v in splitmix64(counters, U64(key))] == want


def test_mix64_matches_plain_python_and_leaves_its_input_alone():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.integers(0, 1 << 63, 200, dtype=np.int64).astype(U64), np.array([0, M64], dtype=U64)]
    )
    before = x.copy()
    assert [int(v) for v in mix64(x)] == [finaliser(int(v)) for v in x]
    assert np.array_equal(x, before)
    counters = np.arange(10, dtype=U64)
    splitmix64(counters, U64(3))
    assert np.array_equal(counters, np.arange(10, dtype=U64))
    # Two-dimensional counters (synth's Gumbel keys) hash element by element.
    grid = np.arange(12, dtype=U64).reshape(3, 4)
    assert np.array_equal(splitmix64(grid, U64(5)), splitmix64(grid.ravel(), U64(5)).reshape(3, 4))


def test_mix64_int_takes_integers_modulo_2_to_the_64():
    assert int(mix64_int(0)) == finaliser(0) == 0
    assert int(mix64_int(12345)) == finaliser(12345)
    assert mix64_int(-1) == mix64_int(M64)
    assert mix64_int(-42) == mix64_int((1 << 64) - 42)


def test_pair_hash_is_uniform_on_the_unit_interval_and_deterministic():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 1 << 31, 50_000).astype(np.int32)
    items = rng.integers(0, 1 << 31, 50_000).astype(np.int32)
    x = pair_hash(users, items, seed=42)
    assert x.dtype == np.float64 and x.shape == (50_000,)
    assert x.min() >= 0.0 and x.max() < 1.0
    assert abs(x.mean() - 0.5) < 0.01 and abs((x < 0.1).mean() - 0.1) < 0.01
    # The same pair and seed give the same value, alone or in any batch.
    assert np.array_equal(pair_hash(users, items, 42), x)
    assert np.array_equal(pair_hash(users[::-7], items[::-7], 42), x[::-7])
    assert not np.array_equal(pair_hash(users, items, 43), x)
    # Swapping user and item gives another value.
    assert np.mean(pair_hash(items, users, 42) == x) < 1e-3


def test_pair_hash_matches_plain_python():
    users = np.array([0, 1, 5, 2**31 - 1], dtype=np.int32)
    items = np.array([0, 3, 2**31 - 1, 7], dtype=np.int32)
    for seed in (0, 42, -1, 2**70 + 5):
        s = finaliser(seed & M64)
        pairs = zip(users.tolist(), items.tolist(), strict=True)
        want = [finaliser(((u << 32) ^ i ^ s) & M64) for u, i in pairs]
        got = pair_hash64(users, items, seed)
        assert [int(v) for v in got] == want
        assert np.array_equal(pair_hash(users, items, seed), [(w >> 11) / 2.0**53 for w in want])


def test_unit_float_uses_the_top_53_bits():
    h = np.array([0, 1 << 11, M64, 1 << 63], dtype=U64)
    assert unit_float(h).tolist() == [0.0, 2.0**-53, 1.0 - 2.0**-53, 0.5]


@pytest.mark.parametrize(
    ("n", "want"), [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (256, 8), (257, 9)]
)
def test_bits_holds_values_below_n(n, want):
    assert bits(n) == want
    assert bits(np.int64(n)) == want
    if n > 2:
        assert (n - 1) < (1 << bits(n)) and (n - 1) >= (1 << (bits(n) - 1))
