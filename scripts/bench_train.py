"""Seconds per ALS iteration beside the arithmetic floor measured in the same run.

Two measurements:

1. Distributed: ``dmf.train.train`` on planted ratings (10M; 100M with ``--large``) at ranks 10,
   64 and 128, on a LocalCluster of 2 worker processes x 1 thread. Seconds per full iteration
   (median of the iterations after the first, which also loads the blocks) beside the floor:
   ``als_flops(...).floor / (workers * threads * gemm_rate(1))``.
2. Solver only: every block of each side through ``dmf.als.solver.solve_block`` in this process,
   BLAS on one thread, best of ``--repeats`` per block, beside the one-thread floor: the CPU
   time one iteration's solves need. With ``--profile``, py-spy (native frames) samples the
   solver at rank 64 and the table says which part of the compiled kernel the time goes to.

Writes docs/benchmarks_train.md. Example::

    .venv/bin/python scripts/bench_train.py                 # 10M ratings, ranks 10 64 128
    .venv/bin/python scripts/bench_train.py --large         # and 100M
    .venv/bin/python scripts/bench_train.py --sizes 1e6 --ranks 10 --iterations 2   # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_common import (  # noqa: E402
    PeakRSS,
    Report,
    als_flops,
    cpu_seconds,
    gemm_rate,
    log,
    md_table,
    planted_ratings,
    split_test,
    worker_pids,
)

from dmf.store.layout import Store, store_from_arrays  # noqa: E402


def planted_store(path: Path, n: int, target_ratings: int | None = None, seed: int = 0) -> Store:
    """A store of ~n planted train ratings (and a 10% test split), reused if already built.

    Blocks of dmf's default size (``blocks.target_ratings``) unless ``target_ratings`` is given."""
    if target_ratings is None:
        from dmf.config import BlocksConfig

        target_ratings = BlocksConfig().target_ratings
    tag = {"n": n, "seed": seed, "target": target_ratings}
    stamp = path / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == tag:
        return Store.open(path)
    log(f"building a planted store of {n:,} ratings in {path}")
    u, i, r, nu, ni = planted_ratings(int(n / 0.9), seed=seed)
    test = split_test(len(u))
    store = store_from_arrays(
        path,
        u[~test],
        i[~test],
        r[~test],
        n_users=nu,
        n_items=ni,
        target_ratings=target_ratings,
        held_out={"test": (u[test], i[test], r[test])},
        overwrite=True,
    )
    stamp.write_text(json.dumps(tag))
    return store


def train_once(
    store: Store, client, rank: int, iterations: int, cache: str, out: Path, pids: list[int]
) -> dict:
    """Train with dmf.train.train on ``client``; returns per-iteration seconds and RMSEs."""
    from dmf.config import load_config
    from dmf.train.loop import train

    cfg = load_config(
        raw={
            "model": {"rank": rank, "reg": 0.1},
            "train": {
                "iterations": iterations,
                "checkpoint_every": 0,
                "progress": "off",
                "cache_blocks": cache,
            },
            "output": {"model": str(out), "plot": False, "overwrite": True},
        }
    )
    from distributed import get_task_stream

    cpu0 = cpu_seconds(pids)
    t = time.perf_counter()
    with get_task_stream(client) as ts:
        model = train(store, cfg, client=client, quiet=True)
    wall = time.perf_counter() - t
    cpu = cpu_seconds(pids) - cpu0
    secs = [h["seconds"] for h in model.history]
    # Busy time of the solve tasks (compute only, from the scheduler's task stream) per
    # iteration after the first: what the workers spent solving, against the wall time.
    busy = 0.0
    for task in ts.data:
        if "solve" in str(task.get("key")) and "-1-" not in str(task.get("key")):
            busy += sum(
                s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute"
            )
    n_later = max(1, len(secs) - 1)
    return {
        # The share of their cores the workers got: below 1 when other processes compete for
        # the machine (or the workers wait), and the wall times are inflated by that much.
        "cpu_share": cpu / (len(pids) * wall),
        "task_s": busy / n_later,
        "seconds": secs,
        "steady": statistics.median(secs[1:]) if len(secs) > 1 else secs[0],
        "first": secs[0],
        "wall": wall,
        "train_rmse": model.history[-1]["train_rmse"],
    }


def solver_micro(store: Store, rank: int, repeats: int) -> list[dict]:
    """Every block of each side through solve_block on one BLAS thread, against random fixed
    factors; per block the best of ``repeats``, summed over the side. Both sides together are
    the CPU-seconds one iteration's solves need, to compare with the distributed run."""
    import dmf.als.kernels  # noqa: F401 - loads SciPy's BLAS before its threads are pinned
    from dmf.als.solver import augment, solve_block
    from dmf.dist.cluster import blas_single_thread

    rng = np.random.default_rng(0)
    out = []
    for side, other in (("user", "item"), ("item", "user")):
        n_other = store.n_rows(other)
        fixed = rng.normal(0, 0.3, (n_other, rank)).astype(np.float32)
        fbias = rng.normal(0, 0.3, n_other).astype(np.float32)
        aug = augment(fixed)
        total = 0.0
        with blas_single_thread():
            for b in range(store.n_blocks(side)):
                block = store.read_block(side, b)
                if b == 0:  # compile, or load the compiled kernel, outside the timing
                    solve_block(block, fixed, fbias, store.mu, 0.1, 0.1, fixed_aug=aug)
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    solve_block(block, fixed, fbias, store.mu, 0.1, 0.1, fixed_aug=aug)
                    best = min(best, time.perf_counter() - t)
                total += best
        counts = store.counts(side)
        fl = als_flops(counts, rank)
        rows = int((counts > 0).sum())
        out.append(
            {
                "side": side,
                "blocks": store.n_blocks(side),
                "rows": rows,
                "nnz": int(counts.sum()),
                "mean_len": counts.sum() / max(rows, 1),
                "seconds": total,
                "floor_flops": fl.floor,
                "exec_flops": fl.executed,
            }
        )
    return out


# The profiled process warms the kernel up, then attaches py-spy to itself (native frames, so
# the BLAS and LAPACK calls inside the compiled kernel are seen) for the measured loop only.
_PROFILE_DRIVER = """
import os, signal, subprocess, sys, time, numpy as np
import dmf.als.kernels
from dmf.dist.cluster import blas_single_thread
from dmf.als.solver import augment, solve_block
from dmf.store.layout import Store
store = Store.open(sys.argv[1]); rank = int(sys.argv[2]); pyspy, out = sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0)
work = []
for side, other in (("user", "item"), ("item", "user")):
    n = store.n_rows(other)
    V = rng.normal(0, 0.3, (n, rank)).astype(np.float32); c = rng.normal(0, 0.3, n).astype(np.float32)
    work += [(store.read_block(side, b), V, c, augment(V)) for b in range(store.n_blocks(side))]
with blas_single_thread():
    solve_block(work[0][0], work[0][1], work[0][2], store.mu, 0.1, 0.1, fixed_aug=work[0][3])
    spy = subprocess.Popen([pyspy, "record", "--native", "-r", "200", "-f", "raw", "-o", out,
                            "-p", str(os.getpid())], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # let py-spy attach
    for _ in range(2):
        for blk, V, c, aug in work:
            solve_block(blk, V, c, store.mu, 0.1, 0.1, fixed_aug=aug)
spy.send_signal(signal.SIGINT)
spy.wait()
"""

# Where a sample is, by the first SciPy BLAS/LAPACK entry point below solve_block.
_PROFILE_PARTS = [
    ("scipy_dgemm", "Gram matrix, A^T A (BLAS dgemm, up to rank 95)"),
    ("scipy_dsyrk", "Gram matrix or Woodbury kernel, symmetric (BLAS dsyrk)"),
    ("scipy_dgemv", "right-hand side A^T t, and x in the Woodbury form (BLAS dgemv)"),
    ("scipy_dpotrf", "Cholesky factorisation (LAPACK dpotrf)"),
    ("scipy_dpotrs", "triangular solves (LAPACK dpotrs)"),
]


def profile_solver(store: Store, rank: int) -> str | None:
    """py-spy the solver on every block of the store: where the time goes, by part of the
    kernel (a table of % of the samples inside solve_block)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        log("py-spy not found: pip install py-spy to profile the solver")
        return None
    with tempfile.TemporaryDirectory() as d:
        drv = Path(d) / "drive.py"
        drv.write_text(_PROFILE_DRIVER)
        raw = Path(d) / "profile.txt"
        cmd = [sys.executable, str(drv), str(store.path), str(rank), pyspy, str(raw)]
        subprocess.run(cmd, check=True, capture_output=True)
        lines = raw.read_text().splitlines()
    parts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f.startswith("solve_block (") for f in frames):
            continue
        total += int(n)
        # Below the innermost Python frame of dmf's solver (solve_block, kernels.solve).
        at = [k for k, f in enumerate(frames) if "dmf/solver.py" in f or "dmf/kernels.py" in f]
        below = frames[at[-1] + 1 :]
        part = next(
            (label for prefix, label in _PROFILE_PARTS if any(f.startswith(prefix) for f in below)),
            None,
        )
        if part is None:
            # Compiled kernel code shows as bare addresses: the gather, the Woodbury and
            # squared-error loops. Anything else is NumPy/Python around the kernel call.
            compiled = below and below[0].startswith("0x")
            part = (
                "kernel's own loops: gather [v_j, 1] rows, Woodbury scaling, squared error"
                if compiled
                else "NumPy and Python around the kernel (penalties, casts, checks)"
            )
        parts[part] += int(n)
    rows = [[part, 100.0 * n / total] for part, n in parts.most_common()]
    return md_table(["part of the solver", "% of samples"], rows) + (
        f"\n\n{total} samples at 200 Hz, rank {rank}, every block of both sides twice, one thread."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[10e6], help="train ratings")
    p.add_argument("--large", action="store_true", help="add 100M ratings")
    p.add_argument("--ranks", type=int, nargs="+", default=[10, 64, 128])
    p.add_argument("--large-ranks", type=int, nargs="+", default=[10, 64])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="auto", choices=["auto", "always", "never"])
    p.add_argument("--repeats", type=int, default=3, help="solver micro-benchmark: best of N")
    p.add_argument("--profile", action="store_true", help="py-spy the solver at rank 64")
    p.add_argument("--data", default="runs/bench", help="where planted stores are kept")
    p.add_argument("--out", default="train", help="writes docs/benchmarks_<out>.md")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes] + ([100_000_000] if args.large else [])
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)

    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    gemm_before = gemm_rate(1)
    log(f"GEMM rate, 1 thread: {gemm_before:.1f} GFLOP/s")
    report = Report(
        "Benchmark: seconds per ALS iteration beside the arithmetic floor",
        intro=(
            "Planted ratings (biased rank-8 truth plus noise, skewed popularity, 100 ratings per "
            "user and 1000 per item on average), 10% held out. dmf.train.train on a LocalCluster of "
            f"{args.workers} worker processes x {args.threads} thread, BLAS pinned to one thread "
            "per Dask thread. **s/iter** is the median of the iterations after the first (the first "
            "also reads the blocks from Parquet into worker memory: column *first iter*). "
            "**floor** = `als_flops(...).floor / (threads x GEMM rate of 1 thread)`: the "
            "least arithmetic of one exact iteration (per rating the symmetric half of the "
            "(rank+1)^2 Gram update, (rank+1)(rank+2) flops, and the right-hand side; per row a "
            "Cholesky solve) at the float64 GEMM rate measured in this run. "
            "**of floor** = floor / s/iter (1.0 would be at the machine's limit). "
            "The issue's target: rank 64 on 10M ratings in at most 4 s per iteration on 2 cores."
        ),
    )
    dist_rows = []
    micro_rows = []
    profile_md = None
    threads_total = args.workers * args.threads
    for n in sizes:
        store = planted_store(data / f"planted-{n}", n)
        ranks = args.ranks if n <= 20_000_000 else args.large_ranks
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads,
            processes=True,
            dashboard_address=None,
            env=BLAS_ENV,
        )
        client = Client(cluster)
        pids = worker_pids(client)
        try:
            for rank in ranks:
                log(f"{n:,} ratings, rank {rank}: training {args.iterations} iterations")
                with PeakRSS() as mem:
                    res = train_once(
                        store,
                        client,
                        rank,
                        args.iterations,
                        args.cache,
                        data / "model",
                        list(pids.values()),
                    )
                fl = als_flops(np.concatenate([store.counts("user"), store.counts("item")]), rank)
                floor_s = fl.floor / (threads_total * gemm_before * 1e9)
                dist_rows.append(
                    [
                        f"{store.n_train:,}",
                        rank,
                        res["steady"],
                        res["first"],
                        floor_s,
                        floor_s / res["steady"],
                        fl.executed / res["steady"] / 1e9,
                        res["task_s"],
                        res["task_s"] / (threads_total * res["steady"]),
                        res["cpu_share"],
                        store.n_train / res["steady"] / 1e6,
                        max(mem.of(pids.values())) / 2**30,
                        res["train_rmse"],
                    ]
                )
                log(f"  s/iter {res['steady']:.2f} (floor {floor_s:.2f}); all: {res['seconds']}")
        finally:
            client.close()
            cluster.close()
        if n <= 20_000_000:
            for rank in ranks:
                log(f"solver micro-benchmark, rank {rank}")
                for m in solver_micro(store, rank, args.repeats):
                    floor_s = m["floor_flops"] / (gemm_before * 1e9)
                    micro_rows.append(
                        [
                            f"{store.n_train:,}",
                            rank,
                            m["side"],
                            m["blocks"],
                            f"{m['nnz']:,}",
                            m["rows"],
                            m["mean_len"],
                            m["seconds"],
                            floor_s,
                            floor_s / m["seconds"],
                            m["exec_flops"] / m["seconds"] / 1e9,
                        ]
                    )
            if args.profile and profile_md is None and 64 in ranks:
                log("profiling the solver at rank 64 with py-spy")
                profile_md = profile_solver(store, 64)
    gemm_after = gemm_rate(1)
    log(f"GEMM rate, 1 thread, at the end: {gemm_after:.1f} GFLOP/s")

    report.add(
        f"GEMM rate (float64, 2048x2048, best of 5, 1 BLAS thread): {gemm_before:.1f} GFLOP/s "
        f"before, {gemm_after:.1f} GFLOP/s after the runs; floors use the first. "
        f"Cluster: {args.workers} workers x {args.threads} thread, blocks cached: {args.cache}."
    )
    report.add("## Distributed training (dmf.train.train)")
    report.add(
        md_table(
            [
                "train ratings",
                "rank",
                "s/iter",
                "first iter s",
                "floor s",
                "of floor",
                "executed GFLOP/s",
                "solve task s/iter",
                "workers busy",
                "workers' CPU share",
                "M ratings/s",
                "peak worker RSS GiB",
                "train RMSE",
            ],
            dist_rows,
        )
    )
    report.add(
        "*executed GFLOP/s*: the arithmetic dmf's kernel actually performs (`AlsFlops.executed`: "
        "for rows of at least rank+1 ratings the full Gram product up to rank 95, the symmetric "
        "half above, and the Cholesky solve; the smaller Woodbury form for shorter rows) divided "
        "by s/iter, to compare with "
        f"{threads_total} x the GEMM rate. *solve task s/iter*: compute time of the solve "
        "tasks per iteration summed over workers (scheduler task stream; it includes reading "
        "blocks when they are not cached); *workers busy* = that / (threads x s/iter): below 1, "
        "the workers wait (scheduling, broadcast, load imbalance, the driver). *workers' CPU "
        "share*: CPU seconds the worker processes consumed / (workers x wall seconds of the "
        "whole fit); on a machine shared with other jobs this is below 1 and the wall times are "
        "inflated by roughly its inverse."
    )
    if micro_rows:
        report.add(
            "## Solver only: every block of a side, one thread (dmf.als.solver.solve_block)\n\n"
            "*s*: the side's blocks solved one after another (best of the repeats per block); "
            "the two sides together are the CPU-seconds an iteration's solves need."
        )
        report.add(
            md_table(
                [
                    "store ratings",
                    "rank",
                    "side",
                    "blocks",
                    "ratings",
                    "rows",
                    "ratings/row",
                    "s",
                    "floor s (1 thread)",
                    "of floor",
                    "executed GFLOP/s",
                ],
                micro_rows,
            )
        )
    if profile_md:
        report.add("## Where the solver's time goes (py-spy with native frames, rank 64)")
        report.add(profile_md)
    path = report.write(args.out)
    log(f"wrote {path}")
    print(report.render())


if __name__ == "__main__":
    main()
