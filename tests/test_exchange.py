"""The exchange's pieces (dmf.train.exchange), against the whole side built the plain way, and
the memory they take: the fixed side is held once, not as rows, factors and augmented copies."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dmf.als.solver import augment
from dmf.errors import TrainingError
from dmf.store.layout import read_block_file, store_from_arrays
from dmf.store.storage import Location, Target
from dmf.train.exchange import (
    assemble_fixed,
    compact_fixed,
    compact_spec,
    exchange_out_task,
    in_slices,
    route_in_task,
    route_out_task,
)
from dmf.train.sides import SideBlocks, write_side_block

RANK = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exchange")
    rng = np.random.default_rng(4)
    n_users, n_items, nnz = 40_000, 3_000, 200_000
    u = rng.integers(0, n_users, nnz)
    i = rng.integers(0, n_items, nnz)
    keep = np.unique(u * n_items + i, return_index=True)[1]
    u, i = u[keep], i[keep]
    store = store_from_arrays(tmp / "store", u, i, rng.random(len(u)), n_users, n_items, n_blocks=8)
    bounds = store.bounds("user")
    factors = rng.standard_normal((n_users, RANK), dtype=np.float32)
    bias = rng.standard_normal(n_users, dtype=np.float32)
    target = Target(Location.of(str(tmp / "side")), "t0")
    files = tuple(
        write_side_block(target, b, factors[lo:hi], bias[lo:hi])
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    )
    side = SideBlocks("user", tuple(int(x) for x in bounds), RANK, "float32", target.root, files, 0)
    rt = Target(Location.of(str(tmp / "routing")), "t0")
    ins = [
        route_in_task(lambda ref=ref: read_block_file(ref).cols, d, bounds, rt)
        for d, ref in enumerate(store.block_refs("item"))
    ]
    outs = [
        route_out_task(s, int(bounds[s]), in_slices(ins, s), rt) for s in range(len(bounds) - 1)
    ]
    xt = Target(Location.of(str(tmp / "exchange")), "t1")
    pieces = [exchange_out_task(side.ref(s), outs[s], xt) for s in range(len(outs))]
    return store, side, factors, bias, ins, outs, pieces


def spec_of(d, ins, outs):
    return compact_spec(d, ins[d], outs, RANK, "float32")


def peak_bytes(fn) -> int:
    """Peak bytes allocated while ``fn`` runs (tracemalloc sees NumPy's arrays)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_assembled_and_compact_sides_are_the_plain_augmented_rows(setup):
    store, side, factors, bias, ins, outs, pieces = setup
    whole = assemble_fixed(side)
    np.testing.assert_array_equal(whole.aug, augment(factors))
    np.testing.assert_array_equal(whole.bias, bias)
    for d, ref in enumerate(store.block_refs("item")):
        spec, srcs = spec_of(d, ins, outs)
        compact = compact_fixed(spec, [pieces[s] for s in srcs])
        rows = np.unique(read_block_file(ref).cols)
        np.testing.assert_array_equal(compact.rows, rows)
        np.testing.assert_array_equal(compact.aug, augment(factors[rows]))
        np.testing.assert_array_equal(compact.bias, bias[rows])


def test_a_fixed_side_is_held_once(setup):
    store, side, factors, bias, ins, outs, pieces = setup
    held = side.n_rows * (RANK + 2) * 4  # the augmented rows and the biases
    # Beyond the side itself: one block file being read (8 blocks).
    assert peak_bytes(lambda: assemble_fixed(side)) < 1.5 * held
    d = max(range(len(ins)), key=lambda k: int(ins[k].counts.sum()))
    spec, srcs = spec_of(d, ins, outs)
    compact = int(ins[d].counts.sum()) * (RANK + 2) * 4
    assert peak_bytes(lambda: compact_fixed(spec, [pieces[s] for s in srcs])) < 1.5 * compact
    s = max(range(len(outs)), key=lambda k: int(outs[k].counts.sum()))
    block = (side.bounds[s + 1] - side.bounds[s]) * (RANK + 1) * 4
    sent = int(outs[s].counts.sum()) * (RANK + 1) * 4
    xt = Target(pieces[0].location.parent, "t2")
    # The block read (its file's bytes, then the array) and the rows it sends, once each.
    assert peak_bytes(lambda: exchange_out_task(side.ref(s), outs[s], xt)) < 2 * block + 1.2 * sent


@pytest.mark.parametrize("where", ["rows", "checksum"])
def test_a_flipped_byte_in_a_piece_is_an_error_naming_the_file(setup, tmp_path, where):
    store, side, factors, bias, ins, outs, _ = setup
    xt = Target(Location.of(str(tmp_path / "x")), "t3")
    pieces = [exchange_out_task(side.ref(s), outs[s], xt) for s in range(len(outs))]
    d = 3
    spec, srcs = spec_of(d, ins, outs)
    s, before = srcs[0], int(spec.before[0])
    path = pieces[s].location.path
    # Destination d's checksum sits after the rows and checksums of destinations 0..d-1.
    at = before * pieces[s].row_bytes + 4 * d + (4 if where == "rows" else 0)
    raw = bytearray(open(path, "rb").read())
    raw[at] ^= 0x10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(TrainingError, match=rf"{path}.* corrupt \(piece for destination {d}\)"):
        compact_fixed(spec, [pieces[k] for k in srcs])


def test_what_a_task_is_sent_grows_with_the_blocks_not_their_square(setup):
    """A route-out task gets one slice (four scalars) per destination; a solve task one
    (before, n) pair and one piece record per source; a piece record no array at all. Whole
    in-blocks (an array per source each) or out-block counts (per destination each) would
    be blocks^2 numbers per task, megabytes at a few hundred blocks."""
    store, side, factors, bias, ins, outs, pieces = setup
    slices = in_slices(ins, 0)
    assert len(slices) == len(ins)
    assert all(isinstance(v, int) for sl in slices for v in (sl.lo, sl.n, sl.crc))
    spec, srcs = spec_of(0, ins, outs)
    assert spec.before.shape == spec.n.shape == (len(srcs),)
    assert not any(isinstance(v, np.ndarray) for v in vars(pieces[0]).values())
