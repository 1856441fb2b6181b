"""Broadcast or partitioned: how each half-step gets the side held fixed, measured.

Two benchmarks, each a section of docs/benchmarks_exchange.md (a run refreshes its own section
and keeps the other's, with that one's date, command and commit):

1. **Choose by measurement** (the default): planted stores of a small grid (users, items,
   ratings per user; rank; workers), each trained ``--iterations`` iterations with
   ``train.exchange: broadcast`` and again with ``partitioned``, each on a fresh LocalCluster of
   ``workers`` x 1 thread with ``--memory-limit`` per worker. Per half-step (user, item): the
   factor bytes moved and the seconds, both from the model's history (``bytes_moved``,
   ``half_step_seconds``; seconds: median of the iterations after the first, which also routes
   and caches), the peak RSS of every worker and of the driver during that half-step, the bytes
   the workers passed through read/write system calls in it (an independent check of
   ``bytes_moved``), where the workers' time went (Dask task stream), and what
   ``HalfSteps.plan`` said each worker needs. Beside them, analytically from the same stores, the
   bytes of the third strategy: streaming the whole fixed side through every destination task
   (destinations x fixed side). Then the exchange's I/O rates, measured in this process with
   dmf's own exchange functions on a store's real routing, for docs/paper_scale.md.
   The grid varies one factor at a time around a base (users x rank crossed), or everything
   with ``--factorial``.
2. **No slowdown** (``--no-slowdown``): in the broadcast regime (bench_train.py's planted
   10M-rating store and settings, 2 workers x 1 thread, ranks 10 and 64), seconds per iteration
   of this working tree against commit 995bdcb, the code before side files and the exchange.
   The old code is exported with ``git archive`` and both run in subprocesses (``PYTHONPATH``
   set to their tree), each building its own store (the formats differ) from the same arrays.
   The two codes alternate, A B A B ..., ``--ns-trials`` times each, so that the machine's drift
   falls on both; each trial is a fresh cluster training every rank. A first, untimed trial of
   each code compiles its numba kernel (cached next to its source).

The measured numbers are also kept in the page, as JSON in an HTML comment, for
scripts/paper_scale.py. Examples::

    .venv/bin/python scripts/bench_exchange.py --quick          # ~4 min on 2 cores
    .venv/bin/python scripts/bench_exchange.py                  # full grid, ~20 min (estimate)
    .venv/bin/python scripts/bench_exchange.py --no-slowdown    # ~12 min (estimate)
    .venv/bin/python scripts/bench_exchange.py --no-slowdown --ns-ratings 2e5 --ns-trials 2 \
        --ns-iterations 3                                       # a 2-minute check
    .venv/bin/python scripts/bench_exchange.py --render         # the page from its data only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_common import (  # noqa: E402
    DOCS,
    REPO,
    Report,
    RSSTimeline,
    embed_data,
    log,
    md_table,
    planted_ratings,
    provenance,
    read_data,
    split_test,
    worker_pids,
)

OUT = "exchange"
PAGE = DOCS / f"benchmarks_{OUT}.md"
TAG = "exchange"
OLD_COMMIT = "995bdcb"
SIDES = ("user", "item")
MODES = ("broadcast", "partitioned")
MiB = 2**20
GiB = 2**30


def other(side: str) -> str:
    return "item" if side == "user" else "user"


# ---------------------------------------------------------------------------------------------
# 1. Choose by measurement
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One configuration of the grid: a store (users, items, ratings per user), a rank, and a
    number of workers."""

    users: int
    items: int
    rpu: int
    rank: int
    workers: int

    @property
    def ratings(self) -> int:
        return self.users * self.rpu

    def store_key(self) -> tuple[int, int, int]:
        return (self.users, self.items, self.rpu)


def grid(args) -> list[Cell]:
    """The cells: one factor at a time around the base (users and ranks crossed), or every
    combination with ``--factorial``."""
    base = dict(
        users=args.users[0],
        items=args.items[0],
        rpu=args.ratings_per_user[0],
        rank=args.ranks[0],
        workers=args.workers[0],
    )
    cells: list[Cell] = []
    if args.factorial:
        for u in args.users:
            for i in args.items:
                for r in args.ratings_per_user:
                    for k in args.ranks:
                        for w in args.workers:
                            cells.append(Cell(u, i, r, k, w))
    else:
        for u in args.users:
            for k in args.ranks:
                cells.append(Cell(**{**base, "users": u, "rank": k}))
        for i in args.items:
            cells.append(Cell(**{**base, "items": i}))
        for r in args.ratings_per_user:
            cells.append(Cell(**{**base, "rpu": r}))
        for w in args.workers:
            cells.append(Cell(**{**base, "workers": w}))
    seen, out = set(), []
    for c in cells:
        if c not in seen:
            seen.add(c)
            out.append(c)
    # Cells of one store together (each store is built once).
    return sorted(out, key=lambda c: (c.store_key(), c.rank, c.workers))


def planted_store(root: Path, users: int, items: int, rpu: int, target: int, seed: int = 0):
    """A store of about users x rpu planted ratings (no held-out split), reused when built."""
    from dmf.store.layout import Store, store_from_arrays

    path = root / f"exchange-u{users}-i{items}-r{rpu}-t{target}"
    tag = {"users": users, "items": items, "rpu": rpu, "target": target, "seed": seed}
    stamp = path / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == tag:
        return Store.open(path)
    log(f"building a planted store: {users:,} users x {rpu} ratings, {items:,} items -> {path}")
    u, i, r, nu, ni = planted_ratings(users * rpu, n_users=users, n_items=items, seed=seed)
    store = store_from_arrays(
        path, u, i, r, n_users=nu, n_items=ni, target_ratings=target, overwrite=True
    )
    stamp.write_text(json.dumps(tag))
    return store


@contextlib.contextmanager
def halfstep_clock():
    """Record (side, iteration, start, stop) of every half-step, by wrapping HalfSteps.run for
    the duration (benchmark instrumentation: dmf itself is unchanged)."""
    from dmf.train import halfstep

    original = halfstep.HalfSteps.run
    spans: list[tuple[str, int, float, float]] = []

    def run(self, side, fixed, it):
        t0 = time.time()
        try:
            return original(self, side, fixed, it)
        finally:
            spans.append((side, it, t0, time.time()))

    halfstep.HalfSteps.run = run
    try:
        yield spans
    finally:
        halfstep.HalfSteps.run = original


_KEY = re.compile(r"(solve|exchange|assemble)-(user|item)s-(\d+)-")


def _task_half_step(key: str) -> tuple[str, str, int] | None:
    """(kind, half-step side, iteration) of a training task's key, or None.

    ``exchange-<fixed>s-<it>`` and ``assemble-<fixed>s-<version>`` are named by the fixed side;
    the item version v is the fixed side of the user half-step of iteration v + 1."""
    m = _KEY.match(str(key))
    if not m:
        return None
    kind, name, num = m.group(1), m.group(2), int(m.group(3))
    if kind == "solve":
        return kind, name, num
    if kind == "exchange":
        return kind, other(name), num
    return kind, other(name), num + 1 if name == "item" else num


def task_breakdown(tasks: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (half-step side, iteration): seconds of compute of the solve, exchange and assemble
    tasks, and of transfers into the solve tasks (summed over workers)."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for t in tasks:
        what = _task_half_step(t.get("key", ""))
        if what is None:
            continue
        kind, side, it = what
        d = out.setdefault(
            (side, it), {"solve": 0.0, "exchange": 0.0, "assemble": 0.0, "transfer": 0.0}
        )
        for s in t.get("startstops", ()):
            dur = s["stop"] - s["start"]
            if s["action"] == "compute":
                d[kind] += dur
            elif s["action"] == "transfer" and kind == "solve":
                d["transfer"] += dur
    return out


def plan_needs(halfsteps, threads: int = 1) -> dict[str, dict[str, int]]:
    """What ``HalfSteps.plan`` counts per worker for each half-step in each mode, and the fixed
    side's bytes as it counts them (its private helpers, so the numbers are dmf's own)."""
    out = {}
    for side in SIDES:
        out[side] = {
            "fixed_bytes": int(halfsteps._side_bytes(other(side))),
            "need_broadcast": int(halfsteps._need(side, "broadcast", threads)),
            "need_partitioned": int(halfsteps._need(side, "partitioned", threads)),
        }
    return out


def auto_threshold(fixed_bytes: int, need_broadcast: int) -> int:
    """The smallest memory_limit at which auto broadcasts: the fixed side at most a quarter of
    it, and the broadcast plan at most 80% of it (dmf.train.halfstep's constants)."""
    from dmf.train.halfstep import BROADCAST_SHARE, PAUSE_FRACTION

    return int(max(fixed_bytes / BROADCAST_SHARE, need_broadcast / PAUSE_FRACTION))


def run_cell(cell: Cell, store, mode: str, args, model_dir: Path) -> dict:
    """Train ``cell`` with ``train.exchange: mode`` on a fresh cluster; the per-half-step
    measurements."""
    from distributed import Client, LocalCluster, get_task_stream

    from dmf.config import load_config
    from dmf.dist.cluster import BLAS_ENV
    from dmf.errors import TrainingError
    from dmf.train.loop import Trainer

    cfg = load_config(
        raw={
            "model": {"rank": cell.rank, "reg": 0.1},
            "train": {
                "iterations": args.iterations,
                "checkpoint_every": 0,
                "progress": "off",
                "exchange": mode,
            },
            "output": {"model": str(model_dir), "plot": False, "overwrite": True},
        }
    )
    cluster = LocalCluster(
        n_workers=cell.workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=args.memory_limit,
        dashboard_address=None,
        env=BLAS_ENV,
    )
    client = Client(cluster)
    try:
        pids = list(worker_pids(client).values())
        trainer = Trainer(store, cfg, client, quiet=True)
        needs = plan_needs(trainer.halfsteps)
        limit = min(trainer.halfsteps.worker_memory())
        try:
            with (
                halfstep_clock() as spans,
                RSSTimeline(0.05) as mem,
                get_task_stream(client) as ts,
            ):
                t = time.perf_counter()
                model = trainer.run()
                wall = time.perf_counter() - t
        except TrainingError as exc:
            log(f"  {mode}: {exc}")
            return {"cell": asdict(cell), "mode": mode, "error": str(exc), "needs": needs}
        routings = dict(trainer.halfsteps._routings)
        tasks = ts.data
    finally:
        client.close()
        cluster.close()
    hist = model.history
    breakdown = task_breakdown(tasks)
    per_side = {}
    for side in SIDES:
        later = [h for h in hist if h["iteration"] > 1] or hist
        secs = [h["half_step_seconds"][side] for h in later]
        moved = sorted({h["bytes_moved"][side] for h in hist})
        windows = [(t0, t1) for s, it, t0, t1 in spans if s == side]
        later_windows = [(t0, t1) for s, it, t0, t1 in spans if s == side and it > 1] or windows
        peaks = [0] * len(pids)
        driver = 0
        for t0, t1 in windows:
            peaks = [max(a, b) for a, b in zip(peaks, mem.peaks_between(t0, t1, pids), strict=True)]
            driver = max(driver, mem.peaks_between(t0, t1, [os.getpid()])[0])
        syscall = statistics.median(mem.io_between(t0, t1, pids) for t0, t1 in later_windows)
        its = [h["iteration"] for h in later]
        tb = [breakdown.get((side, it), {}) for it in its]
        routing = routings.get(f"{side}s")
        fixed_rows = store.n_rows(other(side))
        per_side[side] = {
            "mode": hist[-1]["exchange"][side],
            "bytes_moved": moved[-1],
            "bytes_moved_values": moved,
            "seconds": statistics.median(secs),
            "seconds_all": [h["half_step_seconds"][side] for h in hist],
            "worker_peaks": peaks,
            "driver_peak": driver,
            "syscall_bytes": int(syscall),
            "tasks": {
                k: statistics.median(d.get(k, 0.0) for d in tb)
                for k in ("solve", "exchange", "assemble", "transfer")
            },
            "rows_moved": routing.rows_moved if routing is not None else None,
            "destinations": store.n_blocks(side),
            "fixed_rows": fixed_rows,
            "fixed_file_bytes": fixed_rows * (cell.rank + 1) * 4,
            "solved_rows": store.n_rows(side),
            "nnz": store.n_train,
            "plan_need": needs[side][f"need_{mode}"],
        }
    return {
        "cell": asdict(cell),
        "mode": mode,
        "memory_limit": limit,
        "needs": needs,
        "store": {
            "users": store.n_users,
            "items": store.n_items,
            "ratings": store.n_train,
            "blocks": {s: store.n_blocks(s) for s in SIDES},
            "disk_bytes": store.disk_bytes(),
        },
        "sides": per_side,
        "iteration_seconds": [h["seconds"] for h in hist],
        "wall": wall,
        "train_rmse": hist[-1]["train_rmse"],
        "worker_peaks_run": mem.of(pids),
        "driver_peak_run": mem.driver,
    }


def exchange_io_rates(store, rank: int, tmp: Path, repeats: int = 3) -> dict:
    """The exchange's I/O in this process (one thread), with dmf's own functions, on the store's
    real routing of the user side to the item blocks (the item half-step's), with random user
    factors written as side files; each step the best of ``repeats``:

    - ``assemble``: :func:`assemble_fixed` (every user file read into one array): file bytes/s;
    - ``serialize``: pickling and unpickling that FixedSide (what a broadcast transfer costs
      besides the wire): its bytes/s;
    - ``out``: :func:`exchange_out_task` for every source block (its file read, its pieces
      written): bytes read and written per second;
    - ``in``: :func:`compact_fixed` for every destination (its pieces range-read and checked):
      bytes/s;
    - ``partitioned``: out and in together, (fixed files + 2 x rows moved x row) / seconds."""
    from dmf.store.layout import read_block_file
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

    rng = np.random.default_rng(0)
    tok = "bench"
    bounds = store.bounds("user")
    side_target = Target(Location.of(tmp / "side"), tok)
    files = []
    for b in range(len(bounds) - 1):
        n = int(bounds[b + 1] - bounds[b])
        f = rng.standard_normal((n, rank), dtype=np.float32)
        files.append(write_side_block(side_target, b, f, rng.standard_normal(n, dtype=np.float32)))
    side = SideBlocks(
        "user", tuple(int(x) for x in bounds), rank, "float32", side_target.root, tuple(files), 0.0
    )
    rt = Target(Location.of(tmp / "routing"), tok)
    refs = store.block_refs("item")
    ins = [
        route_in_task(lambda ref=ref: read_block_file(ref).cols, d, bounds, rt)
        for d, ref in enumerate(refs)
    ]
    outs = [
        route_out_task(s, int(bounds[s]), in_slices(ins, s), rt) for s in range(len(bounds) - 1)
    ]
    file_bytes = sum(e.bytes for e in files)
    row = (rank + 1) * 4
    rows_moved = int(sum(int(ib.counts.sum()) for ib in ins))

    def best(fn) -> tuple[float, object]:
        """Best of ``repeats`` timings (the least disturbed by other processes), and a result."""
        times, out = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_assemble, fx = best(lambda: assemble_fixed(side))
    t_serialize, _ = best(lambda fx=fx: pickle.loads(pickle.dumps(fx, protocol=5)))
    del fx
    xt = Target(Location.of(tmp / "exchange"), tok)
    t_out, pieces = best(
        lambda: [exchange_out_task(side.ref(s), outs[s], xt) for s in range(len(outs))]
    )

    def read_in():
        for d, ib in enumerate(ins):
            spec, srcs = compact_spec(d, ib, outs, rank, "float32")
            compact_fixed(spec, [pieces[s] for s in srcs])

    t_in, _ = best(read_in)
    memory = exchange_memory(side, ins, outs, pieces, store, rank)
    shutil.rmtree(tmp, ignore_errors=True)
    fixed_nbytes = side.n_rows * (rank + 2) * 4
    return {
        "rank": rank,
        "users": store.n_users,
        "ratings": store.n_train,
        "source_blocks": len(outs),
        "destinations": len(ins),
        "rows_moved": rows_moved,
        "file_bytes": file_bytes,
        "assemble_Bps": file_bytes / t_assemble,
        "serialize_Bps": fixed_nbytes / t_serialize,
        "out_Bps": (file_bytes + rows_moved * row) / t_out,
        "in_Bps": rows_moved * row / t_in,
        "partitioned_Bps": (file_bytes + 2 * rows_moved * row) / (t_out + t_in),
        "seconds": {"assemble": t_assemble, "serialize": t_serialize, "out": t_out, "in": t_in},
        "memory": memory,
    }


def exchange_memory(side, ins, outs, pieces, store, rank: int) -> dict:
    """Peak Python-heap bytes (tracemalloc: NumPy's arrays included) of the exchange's steps,
    against what ``HalfSteps._need`` counts for them:

    - ``assemble_x``: assemble_fixed's peak / the side as the plan counts it, rows x (rank + 2)
      x 4 (the plan counts it twice for a broadcast);
    - ``compact_x``: compact_fixed's peak / its compact rows x (rank + 2) x 4, the largest
      destination;
    - ``compact_plan_x``: that peak / what the plan counts for it (``HalfSteps._compact_bytes``:
      one row per rating, at most the fixed side's rows, with its 8-byte row index, and a read
      buffer);
    - ``out_x``: exchange_out_task's peak beyond its block, / its outgoing rows x (rank + 1) x
      4, the largest source;
    - ``out_plan_x``: its whole peak / what the plan counts (``HalfSteps._send_bytes``: the
      block, as much again for the rows gathered for one destination, and 4 bytes a row sent)."""
    import tracemalloc

    from dmf.store.storage import Target
    from dmf.train.exchange import (
        READ_CHUNK,
        assemble_fixed,
        compact_fixed,
        compact_spec,
        exchange_out_task,
    )

    def peak_of(fn) -> int:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            fn()
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    plan_row = (rank + 2) * 4
    row = (rank + 1) * 4
    assemble = peak_of(lambda: assemble_fixed(side)) / (side.n_rows * plan_row)
    d = max(range(len(ins)), key=lambda k: int(ins[k].counts.sum()))
    ib = ins[d]
    spec, srcs = compact_spec(d, ib, outs, rank, "float32")
    compact = peak_of(lambda: compact_fixed(spec, [pieces[s] for s in srcs]))
    n_compact = int(ib.counts.sum())
    src = max(range(len(outs)), key=lambda k: int(outs[k].counts.sum()))
    xt = Target(pieces[0].location.parent, "memory")
    out_peak = peak_of(lambda: exchange_out_task(side.ref(src), outs[src], xt))
    block_bytes = (side.bounds[src + 1] - side.bounds[src]) * row
    largest_rows = int(np.diff(side.bounds).max())
    nnz = max(store.block_nnz("item"))
    compact_plan = min(nnz, side.n_rows) * (plan_row + 8) + READ_CHUNK
    return {
        "assemble_x": assemble,
        "compact_x": compact / (n_compact * plan_row),
        "compact_plan_x": compact / compact_plan,
        "compact_rows_per_rating": n_compact / store.block_nnz("item")[d],
        "out_x": (out_peak - block_bytes) / (int(outs[src].counts.sum()) * row),
        "out_plan_x": out_peak / (2 * largest_rows * plan_row + 4 * max(store.block_nnz("user"))),
    }


def transfer_rates(results: list[dict]) -> list[float]:
    """Broadcast transfer rates seen in the runs: the fixed side's bytes, once per receiving
    worker but the one that assembled it, over the transfer seconds of the solve tasks."""
    rates = []
    for r in results:
        if r.get("error") or r["mode"] != "broadcast" or r["cell"]["workers"] < 2:
            continue
        for s in r["sides"].values():
            secs = s["tasks"]["transfer"]
            copies = min(r["cell"]["workers"], s["destinations"]) - 1
            if secs > 0 and copies > 0:
                rates.append(copies * s["fixed_rows"] * (r["cell"]["rank"] + 2) * 4 / secs)
    return rates


def run_grid(args, root: Path) -> dict:
    cells = grid(args)
    log(f"{len(cells)} cells x {len(MODES)} modes: {[asdict(c) for c in cells]}")
    results = []
    stores = {}
    t_all = time.perf_counter()
    for cell in cells:
        key = cell.store_key()
        if key not in stores:
            stores = {key: planted_store(root, *key, args.target_ratings)}  # one store at a time
        store = stores[key]
        for mode in MODES:
            log(
                f"cell users {cell.users:,} items {cell.items:,} ratings/user {cell.rpu} rank "
                f"{cell.rank} workers {cell.workers}: {mode}"
            )
            t = time.perf_counter()
            res = run_cell(cell, store, mode, args, root / "exchange-model")
            shutil.rmtree(root / "exchange-model", ignore_errors=True)
            if not res.get("error"):
                log(
                    "  "
                    + "; ".join(
                        f"{s}: {v['mode']} {v['bytes_moved'] / MiB:.1f} MiB "
                        f"{v['seconds']:.2f} s peaks "
                        f"{[round(p / GiB, 2) for p in v['worker_peaks']]} GiB"
                        for s, v in res["sides"].items()
                    )
                    + f" ({time.perf_counter() - t:.0f} s)"
                )
            results.append(res)
    rates = []
    for rank in sorted({c.rank for c in cells}):
        # The largest store the grid trains at this rank.
        key = max((c.store_key() for c in cells if c.rank == rank), key=lambda k: k[0] * k[2])
        store = planted_store(root, *key, args.target_ratings)
        log(f"exchange I/O rates, rank {rank}, {store.n_train:,} ratings")
        rates.append(exchange_io_rates(store, rank, Path(tempfile.mkdtemp(dir=root))))
    return {
        "provenance": provenance(),
        "quick": bool(args.quick),
        "settings": {
            "iterations": args.iterations,
            "memory_limit": args.memory_limit,
            "target_ratings": args.target_ratings,
            "threads_per_worker": 1,
            "factorial": bool(args.factorial),
        },
        "results": results,
        "io_rates": rates,
        "transfer_Bps": transfer_rates(results),
        "seconds": time.perf_counter() - t_all,
    }


# -- the grid's page section ---------------------------------------------------------------------
def _mib(x) -> float:
    return float("nan") if x is None else x / MiB


def _gib_list(xs) -> str:
    return " / ".join(f"{x / GiB:.2f}" for x in xs)


def _cell_label(c: dict) -> str:
    return f"{c['users']:,} / {c['items']:,} / {c['rpu']} / {c['rank']} / {c['workers']}"


def streaming_bytes(s: dict) -> int:
    """The third strategy, analytically: every destination reads the whole fixed side's files,
    and the solved side's files are written (as in the other two)."""
    row = s["fixed_file_bytes"] // max(s["fixed_rows"], 1)  # (rank + 1) x 4 bytes
    return s["destinations"] * s["fixed_file_bytes"] + s["solved_rows"] * row


def grid_section(data: dict) -> list[str]:
    p = data["provenance"]
    st = data["settings"]
    parts = [
        "## 1. Choose by measurement: bytes, seconds and memory per half-step",
        f"Measured {p['date']}, commit {p['git']}, command `{p['command']}`"
        + (" (**quick grid**)" if data.get("quick") else "")
        + f"; {data['seconds'] / 60:.0f} min in all.",
        f"Each row: one half-step of one configuration (cell: users / items / ratings per user "
        f"/ rank / workers), trained {st['iterations']} iterations with that "
        f"`train.exchange` on a fresh LocalCluster (workers x 1 thread, memory_limit "
        f"{st['memory_limit']} per worker; blocks of {st['target_ratings']:,} ratings; blocks "
        "cached by the trainer's rule). *MiB moved*: the history's `bytes_moved` (the fixed "
        "side's files read, plus the assembled side once per solving worker (broadcast) or the "
        "routed rows written and read back (partitioned), plus the solved side's files "
        "written). *syscall MiB*: what the worker processes read and wrote through read/write "
        "system calls in that half-step (`/proc/PID/io`, median over iterations after the "
        "first): an independent check of the file traffic; Dask's transfers between workers go "
        "through socket send/recv calls, which it does not count. *s*: median seconds of the "
        "half-step after the first iteration. "
        "*peak RSS*: each worker's, over the half-step in every iteration; *plan*: what "
        "`HalfSteps.plan` counts a worker needs for it. *tasks s*: compute seconds of the solve "
        "/ exchange+assemble tasks and transfer seconds into the solve tasks, summed over "
        "workers. *streaming MiB*: the third strategy, not implemented: every destination task "
        "reads the whole fixed side, destinations x fixed side's files, plus the solved side's "
        "files written as in the other two.",
    ]
    rows = []
    for r in data["results"]:
        c = r["cell"]
        if r.get("error"):
            rows.append(
                [_cell_label(c), "-", r["mode"], "does not fit: " + r["error"][:80]] + ["-"] * 12
            )
            continue
        for side in SIDES:
            s = r["sides"][side]
            tk = s["tasks"]
            rows.append(
                [
                    _cell_label(c),
                    f"{r['store']['ratings']:,}",
                    side,
                    s["mode"],
                    _mib(s["fixed_file_bytes"]),
                    _mib(s["bytes_moved"]),
                    _mib(s["syscall_bytes"]),
                    s["seconds"],
                    _gib_list(s["worker_peaks"]),
                    s["driver_peak"] / GiB,
                    s["plan_need"] / GiB,
                    f"{tk['solve']:.2f} / {tk['exchange'] + tk['assemble']:.2f} / {tk['transfer']:.2f}",
                    "-" if s["rows_moved"] is None else f"{s['rows_moved'] / s['nnz']:.2f}",
                    s["destinations"],
                    _mib(streaming_bytes(s)),
                ]
            )
    parts.append(
        md_table(
            [
                "cell",
                "ratings",
                "half-step",
                "exchange",
                "fixed side MiB",
                "MiB moved",
                "syscall MiB",
                "s",
                "peak RSS per worker GiB",
                "driver GiB",
                "plan GiB",
                "tasks s: solve / exchange / transfer",
                "rows moved / ratings",
                "destinations",
                "streaming MiB",
            ],
            rows,
        )
    )
    # auto's choice
    parts.append("### What auto chooses, and where it would switch")
    limit_rows = []
    seen = set()
    for r in data["results"]:
        c = r["cell"]
        key = (c["users"], c["items"], c["rpu"], c["rank"])
        if key in seen or r.get("error") or "memory_limit" not in r:
            continue
        seen.add(key)
        for side in SIDES:
            n = r["needs"][side]
            thr = auto_threshold(n["fixed_bytes"], n["need_broadcast"])
            limit = r["memory_limit"]
            limit_rows.append(
                [
                    _cell_label({**c, "workers": "-"}),
                    side,
                    _mib(n["fixed_bytes"]),
                    n["fixed_bytes"] / limit if limit else float("nan"),
                    n["need_broadcast"] / GiB,
                    n["need_partitioned"] / GiB,
                    "broadcast" if limit >= thr else "partitioned",
                    thr / MiB,
                ]
            )
    parts.append(
        "`auto` broadcasts a half-step's fixed side when it takes at most a quarter of a "
        "worker's memory_limit and the broadcast plan (baseline, twice the fixed side, a "
        "block's working set) stays under 80% of it; otherwise it routes. *fixed side MiB*: rows "
        "x (rank + 2) x 4 bytes, as the plan counts it; *share*: of this run's memory_limit; "
        "*switches below*: the memory_limit under which auto would route."
    )
    parts.append(
        md_table(
            [
                "cell (workers aside)",
                "half-step",
                "fixed side MiB",
                "share of memory_limit",
                "plan broadcast GiB",
                "plan partitioned GiB",
                "auto here",
                "switches below MiB",
            ],
            limit_rows,
        )
    )
    parts.append("### The exchange's I/O rates (one process, dmf's own functions)")
    parts.append(
        "Random user factors written as side files, then the item half-step's exchange on the "
        "store's real routing, timed in this process on one thread (the files are fresh, so "
        "reads come from the page cache: the rate of a worker on this machine, not of a network "
        "file system)."
    )
    parts.append(
        md_table(
            [
                "rank",
                "users",
                "ratings",
                "sources x destinations",
                "rows moved",
                "assemble MB/s",
                "(un)pickle MB/s",
                "out MB/s",
                "in MB/s",
                "partitioned MB/s",
            ],
            [
                [
                    x["rank"],
                    f"{x['users']:,}",
                    f"{x['ratings']:,}",
                    f"{x['source_blocks']} x {x['destinations']}",
                    f"{x['rows_moved']:,}",
                    x["assemble_Bps"] / 1e6,
                    x["serialize_Bps"] / 1e6,
                    x["out_Bps"] / 1e6,
                    x["in_Bps"] / 1e6,
                    x["partitioned_Bps"] / 1e6,
                ]
                for x in data["io_rates"]
            ],
        )
    )
    mem = [x for x in data["io_rates"] if x.get("memory")]
    if mem:
        parts.append(
            "What the exchange's steps hold at their peak (tracemalloc, NumPy arrays included), "
            "against what `HalfSteps._need` counts: *assemble*: `assemble_fixed`'s peak over the "
            "side (rows x (rank + 2) x 4; the plan counts 2x for a broadcast); *compact*: "
            "`compact_fixed`'s peak over its compact rows, and over what the plan counts (a row "
            "and its 8-byte index per rating of the block, at most the fixed side's rows, and "
            "an 8 MiB read buffer); *exchange out*: `exchange_out_task`'s peak beyond its "
            "block, over the rows it sends, and its whole peak over what the plan counts (the "
            "largest fixed block, twice, and 4 bytes a row sent)."
        )
        parts.append(
            md_table(
                [
                    "rank",
                    "assemble / side",
                    "compact / compact rows",
                    "compact / plan",
                    "compact rows per rating",
                    "exchange out / rows sent",
                    "exchange out / plan",
                ],
                [
                    [
                        x["rank"],
                        x["memory"]["assemble_x"],
                        x["memory"]["compact_x"],
                        x["memory"]["compact_plan_x"],
                        x["memory"]["compact_rows_per_rating"],
                        x["memory"]["out_x"],
                        x["memory"].get("out_plan_x", "-"),
                    ]
                    for x in mem
                ],
            )
        )
    tr = data.get("transfer_Bps") or []
    if tr:
        parts.append(
            f"Broadcast transfers between workers (task stream): median "
            f"{statistics.median(tr) / 1e6:.0f} MB/s over {len(tr)} half-steps."
        )
    parts += analysis(data)
    return parts


def _pairs(results: list[dict], factor: str):
    """Pairs of runs (same mode) that differ only in ``factor``: the widest span of it."""
    ok = [r for r in results if not r.get("error")]
    best = None
    for a in ok:
        for b in ok:
            if a["mode"] != b["mode"]:
                continue
            ca, cb = a["cell"], b["cell"]
            if ca[factor] >= cb[factor]:
                continue
            if any(ca[k] != cb[k] for k in ca if k != factor):
                continue
            ratio = cb[factor] / ca[factor]
            if best is None or ratio > best[0]:
                best = (ratio, ca, cb)
    if best is None:
        return None
    _, ca, cb = best
    runs = {}
    for r in ok:
        if r["cell"] in (ca, cb):
            runs[(r["mode"], r["cell"] == cb)] = r
    return ca, cb, runs


def _x(a: float, b: float) -> str:
    return f"x{b / a:.2g}" if a > 0 else "-"


def plan_gaps(data: dict) -> str:
    """Why a peak can exceed the plan, with the measured memory factors."""
    mem = [x["memory"] for x in data.get("io_rates", []) if x.get("memory")]
    text = (
        "The plan leaves out the rating blocks cached on the workers (the trainer caches them "
        "when both sides take under half the cluster's memory_limit, a rule of its own)"
    )
    if mem:
        text += (
            f", and it counts the assembled side twice where `assemble_fixed` holds up to "
            f"{max(m['assemble_x'] for m in mem):.2f}x it at its peak; `compact_fixed` holds "
            f"at most {max(m['compact_plan_x'] for m in mem):.2f}x what the plan counts for it "
            f"and `exchange_out_task` "
            f"{max(m.get('out_plan_x', float('nan')) for m in mem):.2f}x (the memory table "
            "above)"
        )
    return text + "."


def analysis(data: dict) -> list[str]:
    """The written analysis: every number taken from the measured table above."""
    res = data["results"]
    names = {
        "users": "users (ratings per user fixed, so ratings grow with them)",
        "items": "items",
        "rpu": "ratings per user (users fixed: ratings grow)",
        "rank": "rank",
        "workers": "workers",
    }
    lines = [
        "### What grows with what (generated from the table above)",
        "Each line compares two cells that differ in one factor only (the widest span the grid "
        "has), for each half-step: bytes moved (broadcast, partitioned), seconds (broadcast, "
        "partitioned), and the largest worker peak RSS (broadcast, partitioned).",
        "",
    ]
    for factor, label in names.items():
        got = _pairs(res, factor)
        if got is None:
            continue
        ca, cb, runs = got
        if not all((m, f) in runs for m in MODES for f in (False, True)):
            continue
        bits = []
        for side in SIDES:

            def v(m, f, key, side=side, runs=runs):
                s = runs[(m, f)]["sides"][side]
                return max(s[key]) if key == "worker_peaks" else s[key]

            bits.append(
                f"{side} half-step: bytes {_x(v('broadcast', False, 'bytes_moved'), v('broadcast', True, 'bytes_moved'))}"
                f" / {_x(v('partitioned', False, 'bytes_moved'), v('partitioned', True, 'bytes_moved'))}, "
                f"s {_x(v('broadcast', False, 'seconds'), v('broadcast', True, 'seconds'))}"
                f" / {_x(v('partitioned', False, 'seconds'), v('partitioned', True, 'seconds'))}, "
                f"peak {_x(v('broadcast', False, 'worker_peaks'), v('broadcast', True, 'worker_peaks'))}"
                f" / {_x(v('partitioned', False, 'worker_peaks'), v('partitioned', True, 'worker_peaks'))}"
            )
        lines.append(
            f"- **{label}**, {ca[factor]:,} -> {cb[factor]:,} (x{cb[factor] / ca[factor]:.3g}): "
            + "; ".join(bits)
            + "."
        )
    ok = [r for r in res if not r.get("error")]
    if ok:
        # Partitioned against broadcast, and streaming against partitioned, by bytes and time.
        ratio_b, ratio_s, ratio_stream, ratio_rows = [], [], [], []
        by = {(json.dumps(r["cell"], sort_keys=True), r["mode"]): r for r in ok}
        for (cell, mode), r in by.items():
            if mode != "partitioned" or (cell, "broadcast") not in by:
                continue
            b = by[(cell, "broadcast")]
            for side in SIDES:
                p, q = r["sides"][side], b["sides"][side]
                ratio_b.append(p["bytes_moved"] / q["bytes_moved"])
                ratio_s.append(p["seconds"] / q["seconds"])
                ratio_stream.append(streaming_bytes(p) / p["bytes_moved"])
                if p["rows_moved"] is not None:
                    ratio_rows.append(p["rows_moved"] / p["nnz"])
        big = max(ok, key=lambda r: r["store"]["ratings"] * r["cell"]["rank"])
        lines += [
            "",
            f"- **Partitioned against broadcast**, same cell and half-step: bytes moved "
            f"x{min(ratio_b):.2g}-x{max(ratio_b):.2g} (median x{statistics.median(ratio_b):.2g}), "
            f"seconds x{min(ratio_s):.2g}-x{max(ratio_s):.2g} (median "
            f"x{statistics.median(ratio_s):.2g}). A routed half-step moves each destination's "
            f"distinct fixed rows twice (written, read back): here "
            f"{min(ratio_rows):.2f}-{max(ratio_rows):.2f} rows per rating (more as the "
            "destination blocks multiply, up to one a rating), so its bytes follow the ratings, "
            "the rank and the block count, not the fixed side's size; a broadcast moves the whole "
            "fixed side once per worker, so its bytes follow the fixed side's rows, the rank and "
            "the workers.",
            f"- **Streaming** (every destination reads the whole fixed side) would move "
            f"x{min(ratio_stream):.2g}-x{max(ratio_stream):.2g} the partitioned bytes (median "
            f"x{statistics.median(ratio_stream):.2g}). It grows with destinations x fixed side, "
            "i.e. with the ratings (more blocks) times the other side's rows, where routing "
            "grows with the ratings alone: streaming moves less only while destinations x fixed "
            "rows stays below about twice the routed rows, i.e. with few blocks, as in this "
            "grid; at paper scale it is the other way round by orders of magnitude "
            "(docs/paper_scale.md).",
        ]
        over = [
            (max(r["sides"][s]["worker_peaks"]) - r["sides"][s]["plan_need"], r, s)
            for r in ok
            for s in SIDES
        ]
        above = [o for o in over if o[0] > 0]
        if above:
            excess, r, s = max(above, key=lambda o: o[0])
            lines.append(
                f"- **The plan against the peaks.** A worker's measured peak exceeded what "
                f"`HalfSteps.plan` counts in {len(above)} of {len(over)} half-steps; the most in "
                f"cell {_cell_label(r['cell'])}, {s} half-step, {r['mode']}: "
                f"{max(r['sides'][s]['worker_peaks']) / MiB:.0f} MiB against a plan of "
                f"{r['sides'][s]['plan_need'] / MiB:.0f} MiB. " + plan_gaps(data)
            )
        else:
            lines.append(
                f"- **The plan against the peaks.** No worker's measured peak exceeded what "
                f"`HalfSteps.plan` counts, in {len(over)} half-steps."
            )
        worst = max(
            (r for r in ok if r["mode"] == "broadcast"),
            key=lambda r: max(r["sides"][s]["fixed_rows"] * (r["cell"]["rank"] + 2) for s in SIDES),
            default=None,
        )
        if worst is not None:
            side = max(SIDES, key=lambda s: worst["needs"][s]["fixed_bytes"])
            n = worst["needs"][side]
            limit = worst["memory_limit"]
            thr = auto_threshold(n["fixed_bytes"], n["need_broadcast"])
            peak_b = max(worst["sides"][side]["worker_peaks"])
            part = by.get((json.dumps(worst["cell"], sort_keys=True), "partitioned"))
            peak_p = max(part["sides"][side]["worker_peaks"]) if part else float("nan")
            choice = "broadcast" if limit >= thr else "route"
            lines.append(
                f"- **Why auto chooses as it does.** The largest fixed side in the grid is the "
                f"{other(side)} side of cell {_cell_label(worst['cell'])}: "
                f"{n['fixed_bytes'] / MiB:.3g} MiB, {100 * n['fixed_bytes'] / limit:.2g}% of "
                f"this run's memory_limit ({limit / MiB:.0f} MiB), so auto would {choice} it "
                f"(broadcast worker peak {peak_b / GiB:.2f} GiB against {peak_p / GiB:.2f} GiB "
                f"routed; plan {n['need_broadcast'] / GiB:.2f} GiB against "
                f"{n['need_partitioned'] / GiB:.2f} GiB). Below a memory_limit of "
                f"{thr / MiB:.0f} MiB it would route that half-step. Broadcast is kept while the "
                "side is small because it is the faster path where both fit (the seconds "
                "above); the quarter leaves room for the copy a worker receives or assembles "
                "beside the one it holds, the blocks being solved, and Dask's own memory."
            )
        lines.append(
            f"- The largest cell here ({_cell_label(big['cell'])}, {big['store']['ratings']:,} "
            "ratings) is far from the point where broadcasting stops fitting; "
            "`scripts/bench_scale.py --model-scale` measures that regime (docs/benchmarks_scale.md)."
        )
    return lines


# ---------------------------------------------------------------------------------------------
# 2. No slowdown: this tree against commit 995bdcb, side by side
# ---------------------------------------------------------------------------------------------
# Run in a subprocess with PYTHONPATH set to one code tree; it imports nothing from scripts/.
# The script's own directory is sys.path[0], so it must not be the repository root.
_CHILD = r"""
import json, sys, time


def main():
    cmd = json.loads(sys.argv[1])
    import dmf
    out = {"dmf": dmf.__file__}
    if cmd["op"] == "build":
        import numpy as np
        from dmf.store.layout import store_from_arrays
        a = np.load(cmd["arrays"])
        t = time.perf_counter()
        s = store_from_arrays(cmd["store"], a["u"], a["i"], a["r"], n_users=int(a["nu"]),
                              n_items=int(a["ni"]), target_ratings=cmd["target"],
                              held_out={"test": (a["tu"], a["ti"], a["tr"])}, overwrite=True)
        out.update(seconds=time.perf_counter() - t, n_train=s.n_train)
    else:
        from distributed import Client, LocalCluster
        from dmf.config import load_config
        from dmf.dist.cluster import BLAS_ENV
        from dmf.store.layout import Store
        from dmf.train.loop import train
        store = Store.open(cmd["store"])
        cluster = LocalCluster(n_workers=cmd["workers"], threads_per_worker=1, processes=True,
                               dashboard_address=None, env=BLAS_ENV)
        client = Client(cluster)
        runs = []
        try:
            for rank in cmd["ranks"]:
                cfg = load_config(raw={
                    "model": {"rank": rank, "reg": 0.1},
                    "train": {"iterations": cmd["iterations"], "checkpoint_every": 0,
                              "progress": "off"},
                    "output": {"model": cmd["model"], "plot": False, "overwrite": True}})
                model = train(store, cfg, client=client, quiet=True)
                h = model.history
                runs.append({"rank": rank, "seconds": [x["seconds"] for x in h],
                             "exchange": [x.get("exchange") for x in h],
                             "train_rmse": h[-1]["train_rmse"],
                             "objective": h[-1]["objective"]})
        finally:
            client.close()
            cluster.close()
        out["runs"] = runs
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":  # worker processes re-import this file
    main()
"""


def _child(tree: Path, script: Path, cmd: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(cmd)],
        env=env,
        cwd=script.parent,
        capture_output=True,
        text=True,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"child ({tree}) failed with {proc.returncode}:\n{proc.stderr[-4000:]}")
    out = json.loads(line[len("RESULT ") :])
    want = (tree / "dmf" / "__init__.py").resolve()
    if Path(out["dmf"]).resolve() != want:
        raise RuntimeError(f"child imported {out['dmf']}, not {want}")
    return out


def export_old(root: Path) -> Path:
    """Commit 995bdcb's tree under ``root`` (reused: its numba cache is kept beside it)."""
    tree = root / f"code-{OLD_COMMIT}"
    if (tree / "dmf" / "__init__.py").is_file():
        return tree
    tmp = Path(tempfile.mkdtemp(dir=root))
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_COMMIT], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    tmp.rename(tree)
    return tree


def run_no_slowdown(args, root: Path) -> dict:
    from dmf.config import BlocksConfig

    n = int(args.ns_ratings)
    target = BlocksConfig().target_ratings
    work = root / f"noslow-{n}"
    work.mkdir(parents=True, exist_ok=True)
    script = work / "child.py"
    script.write_text(_CHILD)
    trees = {"new": REPO, "old": export_old(root)}
    # The arrays bench_train.planted_store builds its store from, once, for both codes.
    arrays = work / "arrays.npz"
    if not arrays.is_file():
        log(f"planted ratings: {n:,} train (bench_train.py's arrays)")
        u, i, r, nu, ni = planted_ratings(int(n / 0.9), seed=0)
        test = split_test(len(u))
        np.savez(
            arrays.with_suffix(".tmp.npz"),
            u=u[~test].astype(np.int32),
            i=i[~test].astype(np.int32),
            r=r[~test],
            tu=u[test].astype(np.int32),
            ti=i[test].astype(np.int32),
            tr=r[test],
            nu=nu,
            ni=ni,
        )
        os.replace(arrays.with_suffix(".tmp.npz"), arrays)
        del u, i, r, test
    builds = {}
    for name, tree in trees.items():
        store = work / f"store-{name}"
        stamp = store / "bench-built.json"
        if not stamp.is_file():
            log(f"{name} code builds its store")
            builds[name] = _child(
                tree,
                script,
                {"op": "build", "arrays": str(arrays), "store": str(store), "target": target},
            )
            stamp.write_text(json.dumps(builds[name]))
        else:
            builds[name] = json.loads(stamp.read_text())

    def train_cmd(name: str, iterations: int) -> dict:
        return {
            "op": "train",
            "store": str(work / f"store-{name}"),
            "model": str(work / f"model-{name}"),
            "ranks": args.ns_ranks,
            "iterations": iterations,
            "workers": 2,
        }

    for name, tree in trees.items():
        log(f"warm-up (numba compile or cache load): {name} code")
        _child(tree, script, {**train_cmd(name, 1), "ranks": args.ns_ranks})
    trials: list[dict] = []
    t_all = time.perf_counter()
    for k in range(args.ns_trials):
        for name in ("new", "old"):  # A B A B ...
            t = time.perf_counter()
            out = _child(trees[name], script, train_cmd(name, args.ns_iterations))
            log(
                f"trial {k + 1} {name}: "
                + ", ".join(
                    f"rank {x['rank']} {[round(s, 2) for s in x['seconds'][1:]]} s"
                    for x in out["runs"]
                )
                + f" ({time.perf_counter() - t:.0f} s)"
            )
            trials.append({"trial": k, "code": name, "runs": out["runs"]})
    for name in trees:
        shutil.rmtree(work / f"model-{name}", ignore_errors=True)
    return {
        "provenance": provenance(),
        "old_commit": OLD_COMMIT,
        "ratings": n,
        "n_train": {k: v.get("n_train") for k, v in builds.items()},
        "ranks": args.ns_ranks,
        "iterations": args.ns_iterations,
        "trials": trials,
        "seconds": time.perf_counter() - t_all,
    }


def no_slowdown_section(data: dict) -> list[str]:
    p = data["provenance"]
    rows = []
    summary = {}
    for rank in data["ranks"]:
        steady = {"new": [], "old": []}
        per_trial = {"new": {}, "old": {}}
        rmse = {}
        modes = set()
        for t in data["trials"]:
            run = next(x for x in t["runs"] if x["rank"] == rank)
            later = run["seconds"][1:] or run["seconds"]
            steady[t["code"]] += later
            per_trial[t["code"]][t["trial"]] = statistics.median(later)
            rmse.setdefault(t["code"], run["train_rmse"])
            if t["code"] == "new":
                modes |= {f"{e['user']}/{e['item']}" for e in run["exchange"] if e}
        pairs = [
            per_trial["new"][k] / per_trial["old"][k]
            for k in per_trial["new"]
            if k in per_trial["old"]
        ]
        new, old = statistics.median(steady["new"]), statistics.median(steady["old"])
        summary[rank] = new / old
        rows.append(
            [
                rank,
                new,
                old,
                new / old,
                statistics.median(pairs),
                f"{min(pairs):.2f}-{max(pairs):.2f}",
                len(steady["new"]),
                ", ".join(sorted(modes)),
                f"{rmse.get('new', float('nan')):.6f} / {rmse.get('old', float('nan')):.6f}",
            ]
        )
    parts = [
        "## 2. No slowdown in the broadcast regime: this code against " + data["old_commit"],
        f"Measured {p['date']}, commit {p['git']}, command `{p['command']}`; "
        f"{data['seconds'] / 60:.0f} min of alternating trials.",
        f"bench_train.py's planted store for {data['ratings']:,} ratings (the same arrays "
        f"given to each code's own `store_from_arrays`: {data['n_train'].get('new'):,} train "
        f"ratings in the new store, {data['n_train'].get('old'):,} in the old), 2 workers x 1 "
        "thread, "
        f"default blocks, reg 0.1, {data['iterations']} iterations a trial, blocks cached. "
        f"{len(data['trials']) // 2} trials of each code, alternating (new, old, new, old, ...), "
        "each a fresh subprocess and cluster training every rank, after an untimed warm-up "
        "trial of each (numba's compile or cache load). *s/iter*: median of every trial's "
        "iterations after the first; *ratio*: new / old (below 1: the new code is faster); "
        "*paired*: the median (and range) of new / old of consecutive trials.",
        md_table(
            [
                "rank",
                "new s/iter",
                f"{data['old_commit']} s/iter",
                "ratio",
                "paired ratio",
                "paired range",
                "iterations timed per code",
                "exchange (new: user/item)",
                "final train RMSE new / old",
            ],
            rows,
        ),
    ]
    parts.append(
        "The two codes start from different item factors (995bdcb drew them with NumPy's "
        "generator on the driver; this code draws each block with a counter-based generator on "
        "the workers), so their models differ; the final train RMSE shows that both fitted the "
        "same data to the same level."
    )
    return parts


# ---------------------------------------------------------------------------------------------
def write_page(report: Report, data: dict) -> Path:
    report.parts = []
    if data.get("grid"):
        for part in grid_section(data["grid"]):
            report.add(part)
    else:
        report.add(
            "## 1. Choose by measurement\n\nNot run yet: `python scripts/bench_exchange.py`."
        )
    if data.get("no_slowdown"):
        for part in no_slowdown_section(data["no_slowdown"]):
            report.add(part)
    else:
        report.add(
            "## 2. No slowdown\n\nNot run yet: `python scripts/bench_exchange.py --no-slowdown`."
        )
    report.add(embed_data(TAG, data))
    return report.write(OUT)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small grid (~4 min on 2 cores)")
    p.add_argument("--users", type=float, nargs="+", default=None)
    p.add_argument("--items", type=float, nargs="+", default=None)
    p.add_argument("--ratings-per-user", type=int, nargs="+", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[10, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    p.add_argument("--factorial", action="store_true", help="every combination")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--memory-limit", default="3GiB", help="per worker")
    p.add_argument("--target-ratings", type=int, default=500_000, help="ratings per block")
    p.add_argument("--no-slowdown", action="store_true", help="only the old-against-new run")
    p.add_argument("--all", action="store_true", help="the grid and the old-against-new run")
    p.add_argument("--ns-ratings", type=float, default=1e7)
    p.add_argument("--ns-ranks", type=int, nargs="+", default=[10, 64])
    p.add_argument("--ns-trials", type=int, default=8, help="timed trials of each code")
    p.add_argument("--ns-iterations", type=int, default=5)
    p.add_argument("--root", default="runs/bench", help="where stores and the old code go")
    p.add_argument("--render", action="store_true", help="rewrite the page from its data only")
    args = p.parse_args(argv)
    if args.quick:
        args.users = args.users or [1e5, 4e5]
        args.items = args.items or [2e4, 2e3]
        args.ratings_per_user = args.ratings_per_user or [10, 40]
    else:
        args.users = args.users or [4e5, 1e5, 1.6e6]
        args.items = args.items or [2e4, 2e3, 2e5]
        args.ratings_per_user = args.ratings_per_user or [10, 40]
    # The first value of each list is the base of the one-at-a-time grid.
    args.users = [int(x) for x in args.users]
    args.items = [int(x) for x in args.items]
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # dmf's plan lines (what each half-step does, what a worker needs) to the terminal.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("dmf").addHandler(handler)
    logging.getLogger("dmf").setLevel(logging.INFO)

    report = Report(
        "Benchmark: broadcast or partitioned exchange of the fixed side",
        intro=__doc__.split("The measured numbers")[0],
    )
    data = read_data(PAGE, TAG) or {}
    if args.render:
        log(f"wrote {write_page(report, data)}")
        return
    if not args.no_slowdown or args.all:
        data["grid"] = run_grid(args, root)
        write_page(report, data)  # the grid is kept even if the next part fails
    if args.no_slowdown or args.all:
        data["no_slowdown"] = run_no_slowdown(args, root)
    path = write_page(report, data)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
