"""Paper scale: what 1B users x 500k items x 10B ratings would cost, from the measured rates.

Arithmetic only, no training: it reads the measurements back from the benchmark pages and writes
docs/paper_scale.md:

- the solver's cost per rating, per side and rank: the "Solver only" table of
  docs/benchmarks_train.md (one thread, every block of a side; seconds / ratings);
- the exchange's I/O rates: docs/benchmarks_exchange.md (the data kept in the page by
  scripts/bench_exchange.py: bytes per second of dmf's own exchange functions in one process,
  and of broadcast transfers between workers), and its grid, against which the cost model is
  checked;
- when present, the model-scale row of docs/benchmarks_scale.md (scripts/bench_scale.py
  --model-scale), the same check at a size where the user side does not fit a worker.

For each rank it sizes the blocks so that every worker's plan fits (the formula of
``HalfSteps._need``, with dmf's own constants imported), says which exchange ``auto`` would pick
for each half-step on workers of ``--memory`` bytes, the factor bytes each half-step moves in each
mode (the formula of ``dmf.train.halfstep.bytes_moved``, and streaming for comparison), the seconds
per iteration, and which resource limits them. Every assumption is listed on the page. Example::

    .venv/bin/python scripts/paper_scale.py                 # -> docs/paper_scale.md
    .venv/bin/python scripts/paper_scale.py --threads 4     # 4 Dask threads per worker
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    DOCS,
    git_state,
    md_table,
    now_utc,
    read_data,
    read_md_table,
)

from dmf.train.halfstep import (  # noqa: E402
    BROADCAST_SHARE,
    PAUSE_FRACTION,
    WORKER_BASELINE,
)

SIDES = ("user", "item")
NPY_HEADER = 128  # bytes of a side block file (np.save) besides its numbers
GB = 1e9


def other(side: str) -> str:
    return "item" if side == "user" else "user"


# -- the plan's formula (HalfSteps._task_bytes, _need, _side_bytes) ------------------------------
def side_bytes(rows: float, rank: int, itemsize: int = 4) -> float:
    """A side in memory as the plan counts it: rows x (rank + 2) x itemsize."""
    return rows * (rank + 2) * itemsize


def task_bytes(block_nnz: float, block_rows: float, rank: int) -> float:
    """A solve task's working set (HalfSteps._task_bytes)."""
    return 32 * block_nnz + 24 * block_rows * (rank + 1)


def need(
    mode: str,
    block_nnz: float,
    block_rows: float,
    fixed_rows: float,
    rank: int,
    threads: int,
    itemsize: int = 4,
) -> float:
    """What a worker needs for a half-step (HalfSteps._need)."""
    task = task_bytes(block_nnz, block_rows, rank)
    if mode == "broadcast":
        return WORKER_BASELINE + 2 * side_bytes(fixed_rows, rank, itemsize) + threads * task
    compact = block_nnz * (rank + 2) * itemsize * 2
    return WORKER_BASELINE + threads * (task + compact)


def exchange_out_bytes(block_rows: float, rows_out: float, rank: int, itemsize: int = 4) -> float:
    """What a worker holds while exchange_out_task runs for one source block (not counted by
    the plan): the baseline, the block's file as an array, its out-block (int32), and the rows
    it sends twice (the gathered rows and their bytes)."""
    row = (rank + 1) * itemsize
    return WORKER_BASELINE + block_rows * row + rows_out * (4 + 2 * row)


def rows_moved(dest_blocks: int, fixed_rows: float, ratings_per_fixed_row: float) -> float:
    """Expected sum over destinations of the distinct fixed rows each references, when every
    fixed row's ratings fall uniformly at random into the destination blocks."""
    b = dest_blocks
    return fixed_rows * b * (1.0 - (1.0 - 1.0 / b) ** ratings_per_fixed_row)


def bytes_moved(
    mode: str,
    fixed_rows: float,
    solved_rows: float,
    fixed_blocks: int,
    solved_blocks: int,
    workers: int,
    moved_rows: float,
    rank: int,
    itemsize: int = 4,
) -> float:
    """dmf.train.halfstep.bytes_moved, from counts (the side files' npy headers included)."""
    row = (rank + 1) * itemsize
    read_fixed = fixed_rows * row + NPY_HEADER * fixed_blocks
    written = solved_rows * row + NPY_HEADER * solved_blocks
    if mode == "broadcast":
        receivers = min(workers, solved_blocks)
        return read_fixed + receivers * fixed_rows * (row + itemsize) + written
    if mode == "partitioned":
        return read_fixed + 2 * moved_rows * row + written
    # streaming: every destination reads the whole fixed side
    return solved_blocks * read_fixed + written


# -- reading the measurements --------------------------------------------------------------------
def _num(x: str) -> float:
    return float(x.replace(",", "").split()[0])


def solver_rates(path: Path) -> dict[int, dict[str, float]]:
    """Core-seconds per rating, per rank and side, from the "Solver only" table."""
    got = read_md_table(path.read_text(), "store ratings")
    if got is None:
        raise SystemExit(f"{path}: no 'Solver only' table (run scripts/bench_train.py)")
    header, rows = got
    col = {h: k for k, h in enumerate(header)}
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        rank = int(_num(r[col["rank"]]))
        out.setdefault(rank, {})[r[col["side"]]] = _num(r[col["s"]]) / _num(r[col["ratings"]])
    return out


def pick_rate(rates: dict[int, dict[str, float]], rank: int) -> tuple[dict[str, float], str]:
    """The measured rate at ``rank``, or the nearest measured ranks scaled by (rank + 1)^2 (the
    Gram update per rating), said so."""
    if rank in rates:
        return rates[rank], f"measured at rank {rank}"
    near = min(rates, key=lambda k: abs(k - rank))
    f = ((rank + 1) / (near + 1)) ** 2
    return {s: v * f for s, v in rates[near].items()}, f"rank {near} x ((r+1)/{near + 1})^2"


@dataclass
class Rates:
    solver: dict[int, dict[str, float]]
    io_Bps: float  # one worker's partitioned exchange, bytes/s
    assemble_Bps: float
    transfer_Bps: float
    memory: dict[str, float]  # the exchange's measured memory factors (the largest measured)
    sources: list[str]
    preliminary: list[str]


# Used when the exchange page predates its memory table: tracemalloc on this repository's code,
# 4M ratings, ranks 10 and 64 (the largest of the two).
DEFAULT_MEMORY = {"assemble_x": 2.94, "compact_x": 3.12, "out_x": 2.22}


def measured_memory(grid: dict) -> dict[str, float]:
    got = [x["memory"] for x in grid["io_rates"] if x.get("memory")]
    if not got:
        return dict(DEFAULT_MEMORY)
    return {k: max(m[k] for m in got) for k in DEFAULT_MEMORY}


def load_rates(args) -> tuple[Rates, dict | None, dict | None]:
    train_page = DOCS / "benchmarks_train.md"
    solver = solver_rates(train_page)
    ex = read_data(DOCS / "benchmarks_exchange.md", "exchange") or {}
    grid = ex.get("grid")
    prelim = []
    sources = [f"docs/benchmarks_train.md ({_page_date(train_page)})"]
    if grid is None:
        raise SystemExit("docs/benchmarks_exchange.md has no grid data: run bench_exchange.py")
    sources.append(
        f"docs/benchmarks_exchange.md, grid of {grid['provenance']['date']} "
        f"(commit {grid['provenance']['git']})"
    )
    if grid.get("quick"):
        prelim.append("the exchange rates and the model check come from the *quick* grid")
    train_cpu = _page_cpu(train_page)
    grid_cpu = grid["provenance"].get("cpu") or _page_cpu(DOCS / "benchmarks_exchange.md")
    if train_cpu != grid_cpu:
        prelim.append(
            f"the solver rates were measured on another machine ({train_cpu}) than the "
            f"exchange ({grid_cpu})"
        )
    io = [x["partitioned_Bps"] for x in grid["io_rates"]]
    asm = [x["assemble_Bps"] for x in grid["io_rates"]]
    tr = grid.get("transfer_Bps") or []
    scale = read_data(DOCS / "benchmarks_scale.md", "model-scale")
    if scale is None:
        prelim.append(
            "there is no model-scale row yet (scripts/bench_scale.py --model-scale): the rates "
            "were measured on stores that fit in the page cache, far below paper scale"
        )
    else:
        sources.append(
            f"docs/benchmarks_scale.md, model-scale row of {scale['provenance']['date']} "
            f"(commit {scale['provenance']['git']})"
        )
    rates = Rates(
        solver=solver,
        io_Bps=args.io_rate or min(io),
        assemble_Bps=min(asm),
        transfer_Bps=args.transfer_rate or (statistics.median(tr) if tr else min(io)),
        memory=measured_memory(grid),
        sources=sources,
        preliminary=prelim,
    )
    return rates, grid, scale


def _page_cpu(path: Path) -> str:
    got = read_md_table(path.read_text(), "machine")
    return dict((r[0], r[1]) for r in got[1]).get("cpu", "unknown") if got else "unknown"


def _page_date(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("Started:"):
            return line.split(";")[0].replace("Started: ", "")
    return "undated"


# -- the extrapolation ---------------------------------------------------------------------------
@dataclass
class Paper:
    users: float
    items: float
    ratings: float
    workers: int
    threads: int
    memory: float
    itemsize: int = 4

    def rows(self, side: str) -> float:
        return self.users if side == "user" else self.items

    def per_row(self, side: str) -> float:
        return self.ratings / self.rows(side)


def auto_mode(p: Paper, side: str, block_nnz: float, rank: int) -> str:
    """HalfSteps._auto: broadcast when the fixed side is at most a quarter of memory and the
    broadcast plan fits under the pause fraction."""
    fixed = side_bytes(p.rows(other(side)), rank, p.itemsize)
    fits = (
        need(
            "broadcast",
            block_nnz,
            block_nnz / p.per_row(side),
            p.rows(other(side)),
            rank,
            p.threads,
            p.itemsize,
        )
        <= PAUSE_FRACTION * p.memory
    )
    return "broadcast" if fits and fixed <= BROADCAST_SHARE * p.memory else "partitioned"


def max_block(p: Paper, side: str, mode: str, rank: int) -> float:
    """The largest block (ratings) of ``side`` whose plan in ``mode`` stays under the pause
    fraction (need is linear in the block's ratings)."""
    a = need(mode, 0, 0, p.rows(other(side)), rank, p.threads, p.itemsize)
    b = need(mode, 1, 1 / p.per_row(side), p.rows(other(side)), rank, p.threads, p.itemsize) - a
    return max(0.0, (PAUSE_FRACTION * p.memory - a) / b)


def _largest(fn, memory: float) -> float:
    """The largest block (ratings) T with fn(T) <= PAUSE_FRACTION x memory, fn linear in T."""
    a = fn(0.0)
    b = fn(1.0) - a
    return max(0.0, (PAUSE_FRACTION * memory - a) / b) if b > 0 else float("inf")


def plan(p: Paper, rank: int, memf: dict) -> dict:
    """Block size, modes and constraints for one rank. ``memf``: the measured memory factors
    of the exchange's steps (bench_exchange.exchange_memory)."""
    # auto's mode does not depend on the block size unless the broadcast plan stops fitting;
    # start from the modes at a small block, then size the blocks for those modes.
    modes = {s: auto_mode(p, s, 1e5, rank) for s in SIDES}
    limits = {
        f"{s} half-step, HalfSteps._need ({modes[s]})": max_block(p, s, modes[s], rank)
        for s in SIDES
    }
    plan_row = (rank + 2) * p.itemsize
    row = (rank + 1) * p.itemsize
    for s in SIDES:
        fixed_rows = p.rows(other(s))
        if modes[s] == "broadcast":
            # The worker that assembles the fixed side holds assemble_x times it.
            def fn(t, s=s, fixed_rows=fixed_rows):
                return (
                    WORKER_BASELINE
                    + memf["assemble_x"] * fixed_rows * plan_row
                    + p.threads * task_bytes(t, t / p.per_row(s), rank)
                )
        else:
            # compact_fixed holds compact_x times its compact rows: at most one per rating.
            def fn(t, s=s):
                return WORKER_BASELINE + p.threads * (
                    task_bytes(t, t / p.per_row(s), rank) + memf["compact_x"] * t * plan_row
                )

        limits[f"{s} half-step, measured working set ({modes[s]})"] = _largest(fn, p.memory)
        if modes[s] == "partitioned":
            # exchange_out_task of a source block: the block, and out_x times the rows it sends
            # (at most one per rating of the block); the plan does not count it.
            src = other(s)

            def out(t, src=src):
                return WORKER_BASELINE + p.threads * (
                    t / p.per_row(src) * row + memf["out_x"] * t * row
                )

            limits[f"exchange_out_task of the {s} half-step (outside the plan)"] = _largest(
                out, p.memory
            )
    binding = min(limits, key=limits.get)
    # As many blocks as the binding constraint needs, rounded up to a multiple of the cluster's
    # threads, so that every thread solves the same number of blocks.
    threads = p.workers * p.threads
    n = math.ceil(math.ceil(p.ratings / limits[binding]) / threads) * threads
    target = p.ratings / n
    modes = {s: auto_mode(p, s, target, rank) for s in SIDES}
    blocks = {s: n for s in SIDES}
    return {
        "modes": modes,
        "target": target,
        "limits": limits,
        "binding": binding,
        "blocks": blocks,
    }


def half_step(p: Paper, rank: int, side: str, pl: dict, rates: Rates) -> dict:
    fixed = other(side)
    blocks = pl["blocks"]
    moved = rows_moved(blocks[side], p.rows(fixed), p.per_row(fixed))
    out = {"moved_rows": moved}
    for mode in ("broadcast", "partitioned", "streaming"):
        out[mode] = bytes_moved(
            mode,
            p.rows(fixed),
            p.rows(side),
            blocks[fixed],
            blocks[side],
            p.workers,
            moved,
            rank,
            p.itemsize,
        )
    rate, how = pick_rate(rates.solver, rank)
    solve = p.ratings * rate[side] / (p.workers * p.threads)
    mode = pl["modes"][side]
    row = (rank + 1) * p.itemsize
    if mode == "broadcast":
        read_fixed = p.rows(fixed) * row
        copies = min(p.workers, blocks[side]) * p.rows(fixed) * (row + p.itemsize)
        io = (
            read_fixed / rates.assemble_Bps  # one task assembles the side
            + copies / (p.workers * rates.transfer_Bps)
            + p.rows(side) * row / (p.workers * rates.io_Bps)
        )
    else:
        io = out[mode] / (p.workers * rates.io_Bps)
    out.update(
        mode=mode,
        solve_s=solve,
        io_s=io,
        solver_rate=rate[side],
        solver_how=how,
        need=need(
            mode,
            pl["target"],
            pl["target"] / p.per_row(side),
            p.rows(fixed),
            rank,
            p.threads,
            p.itemsize,
        ),
        scratch=moved * row if mode == "partitioned" else 0.0,
    )
    return out


# -- checking the cost model against what was measured -------------------------------------------
def predict_measured(run: dict, side: str, rates: Rates) -> float | None:
    """The cost model's seconds for one measured half-step (same formulas, measured counts)."""
    c = run["cell"]
    s = run["sides"][side]
    rate, _ = pick_rate(rates.solver, c["rank"])
    solve = s["nnz"] * rate[side] / c["workers"]
    return solve + s["bytes_moved"] / (c["workers"] * rates.io_Bps)


def model_check(grid: dict, rates: Rates) -> tuple[list[list], float, float]:
    rows = []
    ratios = []
    row_ratios = []
    for r in grid["results"]:
        if r.get("error"):
            continue
        c = r["cell"]
        for side in SIDES:
            s = r["sides"][side]
            pred = predict_measured(r, side, rates)
            ratios.append(s["seconds"] / pred)
            est = float("nan")
            if s["rows_moved"] is not None:
                fixed_rows = s["fixed_rows"]
                est = rows_moved(s["destinations"], fixed_rows, s["nnz"] / fixed_rows)
                row_ratios.append(s["rows_moved"] / est)
            rows.append(
                [
                    f"{c['users']:,} / {c['items']:,} / {c['rpu']} / {c['rank']} / {c['workers']}",
                    side,
                    s["mode"],
                    s["seconds"],
                    pred,
                    s["seconds"] / pred,
                    "-" if s["rows_moved"] is None else f"{s['rows_moved']:,}",
                    est if s["rows_moved"] is not None else float("nan"),
                ]
            )
    # The half-steps of the largest measured cells (ratings x (rank + 1)), where fixed costs
    # weigh least.
    ok = [r for r in grid["results"] if not r.get("error")]
    top = max(r["store"]["ratings"] * (r["cell"]["rank"] + 1) for r in ok)
    big = [
        r["sides"][s]["seconds"] / predict_measured(r, s, rates)
        for r in ok
        if r["store"]["ratings"] * (r["cell"]["rank"] + 1) == top
        for s in SIDES
    ]
    return (
        rows,
        statistics.median(ratios),
        (statistics.median(row_ratios) if row_ratios else 1.0),
        statistics.median(big),
    )


def scale_check(scale: dict, rates: Rates) -> list[str]:
    """The model-scale row: measured half-step seconds against the cost model."""
    hist = scale["history"]
    later = hist[1:] or hist
    rate, how = pick_rate(rates.solver, scale["rank"])
    lines = []
    for side in SIDES:
        secs = statistics.median(h["half_step_seconds"][side] for h in later)
        moved = hist[-1]["bytes_moved"][side]
        solve = scale["ratings"] * rate[side] / scale["workers"]
        pred = solve + moved / (scale["workers"] * rates.io_Bps)
        lines.append(
            f"- {side} half-step ({hist[-1]['exchange'][side]}): measured {secs:.1f} s for "
            f"{moved / GB:.2f} GB moved; the model says {pred:.1f} s (solver {solve:.1f} s, "
            f"{how}); measured / model {secs / pred:.2f}. Effective rate of the whole half-step "
            f"beyond the solver: {moved / max(secs - solve, 1e-9) / scale['workers'] / 1e6:.0f} "
            "MB/s per worker."
        )
    return lines


# -- the page ------------------------------------------------------------------------------------
def _gb(x: float) -> str:
    if x >= 1e12:
        return f"{x / 1e12:,.1f} TB"
    if x < 1e9:
        return f"{x / 1e6:,.0f} MB"
    return f"{x / GB:,.1f} GB"


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def render(args, rates: Rates, grid: dict, scale: dict | None) -> str:
    p = Paper(args.users, args.items, args.ratings, args.workers, args.threads, args.memory)
    lines = ["# Paper scale: 1B users x 500k items x 10B ratings, extrapolated", ""]
    if rates.preliminary:
        lines += [
            "> **Preliminary.** "
            + "; ".join(rates.preliminary)[:1].upper()
            + "; ".join(rates.preliminary)[1:]
            + ". Regenerate with `python scripts/paper_scale.py` after the large runs.",
            "",
        ]
    lines += [
        f"Written {now_utc()} by `python {' '.join(sys.argv)}` at commit {git_state()}, "
        "from: " + "; ".join(rates.sources) + ". Arithmetic only: nothing here was run at "
        "this size.",
        "",
        f"**Configuration:** {p.users:,.0f} users, {p.items:,.0f} items, {p.ratings:,.0f} "
        f"ratings ({p.per_row('user'):.0f} per user, {p.per_row('item'):,.0f} per item), "
        f"{p.workers} workers of {p.memory / GB:.0f} GB (memory_limit {p.memory:,.0f} bytes) "
        f"with {p.threads} Dask thread(s) each, factors in float32.",
        "",
        "**Measured rates used:**",
        "",
        md_table(
            ["rate", "value", "from"],
            [
                *[
                    [
                        f"solver, rank {k}, {s} side",
                        f"{v * 1e9:.1f} ns per rating (one thread)",
                        "docs/benchmarks_train.md, Solver only: s / ratings",
                    ]
                    for k in sorted(rates.solver)
                    for s, v in rates.solver[k].items()
                ],
                [
                    "memory of the exchange's steps",
                    f"assemble {rates.memory['assemble_x']:.2f}x, compact "
                    f"{rates.memory['compact_x']:.2f}x, exchange out "
                    f"{rates.memory['out_x']:.2f}x",
                    "docs/benchmarks_exchange.md, memory table (largest)",
                ],
                [
                    "partitioned exchange, one worker",
                    f"{rates.io_Bps / 1e6:.0f} MB/s"
                    + (" (given)" if args.io_rate else " (slowest measured rank)"),
                    "docs/benchmarks_exchange.md, I/O rates",
                ],
                [
                    "assembling a side (one task)",
                    f"{rates.assemble_Bps / 1e6:.0f} MB/s",
                    "docs/benchmarks_exchange.md, I/O rates",
                ],
                [
                    "broadcast transfer, per receiving worker",
                    f"{rates.transfer_Bps / 1e6:.0f} MB/s"
                    + (" (given)" if args.transfer_rate else ""),
                    "docs/benchmarks_exchange.md, task stream",
                ],
            ],
        ),
        "",
    ]
    summary = []
    for rank in args.ranks:
        pl = plan(p, rank, rates.memory)
        hs = {s: half_step(p, rank, s, pl, rates) for s in SIDES}
        lines += [
            f"## Rank {rank}",
            "",
            f"Sides as the plan counts them (rows x (rank + 2) x 4 bytes): users "
            f"{_gb(side_bytes(p.users, rank))}, items {_gb(side_bytes(p.items, rank))}; a quarter "
            f"of a worker is {_gb(BROADCAST_SHARE * p.memory)}.",
            "",
            f"**Blocks.** {pl['target']:,.0f} ratings per block (`blocks.target_ratings`), so "
            f"{pl['blocks']['user']:,} user blocks ({pl['target'] / p.per_row('user'):,.0f} users "
            f"each) and {pl['blocks']['item']:,} item blocks "
            f"({pl['target'] / p.per_row('item'):,.0f} items each), "
            f"{pl['blocks']['user'] / (p.workers * p.threads):.0f} per Dask thread. The largest "
            "block each memory constraint allows (ratings); the smallest binds, and the block "
            "count is then rounded up to a multiple of the cluster's threads:",
            "",
            md_table(
                ["constraint", "largest block (ratings)"],
                [
                    [k + (" **(binds)**" if k == pl["binding"] else ""), f"{v:,.0f}"]
                    for k, v in pl["limits"].items()
                ],
            ),
            "",
            md_table(
                [
                    "half-step",
                    "fixed side",
                    "auto chooses",
                    "worker plan",
                    "broadcast bytes",
                    "partitioned bytes",
                    "streaming bytes",
                    "routed rows (estimate)",
                    "solver s",
                    "exchange I/O s",
                    "limit",
                ],
                [
                    [
                        f"{s}s given {other(s)}s",
                        _gb(side_bytes(p.rows(other(s)), rank)),
                        hs[s]["mode"],
                        f"{_gb(hs[s]['need'])} of {_gb(p.memory)}",
                        _gb(hs[s]["broadcast"]),
                        _gb(hs[s]["partitioned"]),
                        _gb(hs[s]["streaming"]),
                        f"{hs[s]['moved_rows']:,.3g}",
                        _dur(hs[s]["solve_s"]),
                        _dur(hs[s]["io_s"]),
                        "solver" if hs[s]["solve_s"] >= hs[s]["io_s"] else "exchange I/O",
                    ]
                    for s in SIDES
                ],
            ),
            "",
        ]
        total = sum(hs[s]["solve_s"] + hs[s]["io_s"] for s in SIDES)
        overlap = sum(max(hs[s]["solve_s"], hs[s]["io_s"]) for s in SIDES)
        io = sum(hs[s]["io_s"] for s in SIDES)
        solve = sum(hs[s]["solve_s"] for s in SIDES)
        moved = sum(hs[s][hs[s]["mode"]] for s in SIDES)
        scratch = max(hs[s]["scratch"] for s in SIDES)
        limit = "the exchange's I/O" if io > solve else "the solver (CPU)"
        lines += [
            f"**Per iteration:** {_dur(total)} ({_dur(overlap)} if the exchange overlapped the "
            f"solves perfectly): solver {_dur(solve)}, exchange I/O {_dur(io)}; "
            f"{_gb(moved)} of factors moved, {_gb(moved / p.workers)} per worker. The limit is "
            f"{limit}. Scratch space for one routed half-step's pieces: {_gb(scratch)}, beside "
            f"two versions of the user side ({_gb(2 * p.users * (rank + 1) * 4)}).",
            "",
        ]
        summary.append(
            [
                rank,
                hs["user"]["mode"],
                hs["item"]["mode"],
                _dur(total),
                _dur(solve),
                _dur(io),
                _gb(moved),
                limit,
            ]
        )
    lines[lines.index("**Measured rates used:**") : lines.index("**Measured rates used:**")] = [
        "## Summary",
        "",
        md_table(
            [
                "rank",
                "users half-step",
                "items half-step",
                "s per iteration",
                "solver",
                "exchange I/O",
                "factor bytes moved",
                "limit",
            ],
            summary,
        ),
        "",
    ]
    rows, ratio, row_ratio, big_ratio = model_check(grid, rates)
    lines += [
        "## The cost model against the measurements",
        "",
        "The same formulas (solver rate x ratings / workers, plus bytes moved / (workers x "
        "exchange rate)) applied to the grid of docs/benchmarks_exchange.md, with the counts "
        "and bytes measured there; and the routed-rows estimate (uniform ratings) against the "
        "routing dmf computed.",
        "",
        md_table(
            [
                "cell",
                "half-step",
                "exchange",
                "measured s",
                "model s",
                "measured / model",
                "routed rows",
                "estimate",
            ],
            rows,
        ),
        "",
        f"Median measured / model: {ratio:.2f} over every half-step, {big_ratio:.2f} over those "
        "of the largest cell. The model leaves out what a half-step costs besides solving and "
        "moving factors (scheduling, task start-up, reading the store's block metadata), which "
        "weighs most on small cells, and the grid may have run on a machine shared with other "
        "jobs; if the largest cells' ratio held at paper scale, the seconds above would be "
        f"x{big_ratio:.2f}. Median routed rows / estimate: {row_ratio:.2f} (below 1: skewed "
        "data route fewer distinct rows than uniform ratings would).",
        "",
    ]
    if scale is not None:
        lines += [
            "**At model scale** (docs/benchmarks_scale.md):",
            "",
            *scale_check(scale, rates),
            "",
        ]
    lines += [
        "## Assumptions",
        "",
        f"- Workers: {p.workers} of {p.memory / GB:.0f} GB each (Dask memory_limit "
        f"{p.memory:,.0f} bytes), {p.threads} Dask thread(s) each, one BLAS thread per Dask "
        "thread; per-thread solver speed as on the benchmark machine (docs/benchmarks_train.md).",
        f"- The plan's constants are dmf's: a worker's baseline {WORKER_BASELINE / 2**20:.0f} "
        f"MiB, broadcast while the fixed side is at most {BROADCAST_SHARE:.0%} of memory_limit, "
        f"every plan under {PAUSE_FRACTION:.0%} of it (Dask pauses a worker there).",
        "- Blocks: one target size for both sides (as `blocks.target_ratings` is), the largest "
        "every constraint allows; ratings spread evenly, so every block is as large as the "
        "target. Real popularity is skewed: a row cannot be split across blocks, so an item "
        "with more ratings than the target makes a block of its own that large. With Zipf-like "
        "item popularity (exponent 0.8, as `dmf synth`'s default) the most popular of "
        f"{p.items:,.0f} items would hold about {100 * zipf_top_share(p.items, 0.8):.1f}% of "
        f"the ratings ({zipf_top_share(p.items, 0.8) * p.ratings:,.0f}), more than any block "
        "above: such a store needs its most popular items' ratings bounded (or dmf would need "
        "to split rows).",
        "- Memory beyond the plan's formula: the blocks are also sized so that the working "
        "sets measured in docs/benchmarks_exchange.md fit (the exchange's memory table; "
        f"largest factors used: assemble_fixed {rates.memory['assemble_x']:.2f}x the side where "
        f"the plan counts 2x, compact_fixed {rates.memory['compact_x']:.2f}x its compact rows "
        "where the plan counts 2x the block's ratings, and `exchange_out_task`, which the plan "
        f"does not count, {rates.memory['out_x']:.2f}x the rows it sends besides its block). "
        "A routed destination is taken to reference one fixed row per rating (the upper "
        "bound, nearly reached when rows have few ratings per block, as users here do). Rating "
        "blocks cached on the workers are not counted: at this size the trainer streams them "
        "(its rule caches only when both sides take under half the cluster's memory).",
        "- Routed rows: each fixed row's ratings fall uniformly at random into the destination "
        "blocks, sum over destinations of 1 - (1 - 1/B)^k per fixed row with k ratings (the "
        "check above shows skewed data route fewer).",
        "- Bytes moved follow `dmf.train.halfstep.bytes_moved`: the fixed side's files read "
        "once, plus the assembled side copied to every solving worker (broadcast) or the routed "
        "rows written and read back (partitioned), plus the solved side's files written. "
        "Streaming: every destination reads the whole fixed side, plus the solved side written. "
        "Rating blocks are not counted (cached, or read once per half-step in every mode).",
        "- Seconds: the solver's single-thread cost per rating (per side and rank) times the "
        "ratings, over all threads; plus, for a routed half-step, its bytes over the workers' "
        "aggregate exchange rate (each worker at the rate one process reached here); for a "
        "broadcast one, one task reading the whole fixed side, the copies at the measured "
        "transfer rate per receiving worker, and the solved side's files written in parallel. "
        "Solving and exchange are added (no overlap), and the overlapped bound is given too. "
        "Scheduling, stragglers and the first iteration's routing are left out.",
        "- The exchange rate was measured on one machine whose page cache held the files; at "
        "paper scale the pieces go to a shared file system or object store, and each worker's "
        "share of its bandwidth is the rate to use (`--io-rate`, `--transfer-rate` set them).",
        "- The solver rate was measured on planted data with 90 ratings per user and 900 per "
        "item; at paper scale users have 10, so their rows take the cheaper Woodbury form at "
        "rank 64 and the user half-step's solver time is likely overstated.",
        "",
    ]
    return "\n".join(lines) + "\n"


def zipf_top_share(n: float, s: float) -> float:
    """Share of the most popular of n rows with weights k^-s (integral approximation)."""
    if s == 1:
        total = math.log(n) + 0.5772
    else:
        total = (n ** (1 - s) - 1) / (1 - s) + 0.5 + 0.5 * n**-s
    return 1.0 / total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=float, default=1e9)
    ap.add_argument("--items", type=float, default=5e5)
    ap.add_argument("--ratings", type=float, default=1e10)
    ap.add_argument("--ranks", type=int, nargs="+", default=[10, 64])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="Dask threads per worker")
    ap.add_argument("--memory", type=float, default=16e9, help="memory_limit per worker, bytes")
    ap.add_argument(
        "--io-rate", type=float, default=None, help="bytes/s per worker (default: measured)"
    )
    ap.add_argument("--transfer-rate", type=float, default=None, help="bytes/s (default: measured)")
    ap.add_argument("--out", default=str(DOCS / "paper_scale.md"))
    args = ap.parse_args(argv)
    rates, grid, scale = load_rates(args)
    text = render(args, rates, grid, scale)
    out = Path(args.out)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
