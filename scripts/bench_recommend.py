"""Recommend-for-all throughput: top-N for every user of a large model, blockwise on Dask.

Default: 1M users x 100k items at rank 32 (random factors), top 10 per user, the items each user
rated in train excluded (20 per user, read from the store's by_user blocks), on a LocalCluster of
2 worker processes x 1 thread. Measures:

1. End to end: ``dmf.model.recommend.recommend_all`` writing one Parquet file; scores per second
   (users x items / seconds), peak RSS of each worker and of the driver (memory stays at the
   factor matrices plus one score tile per worker, whatever the number of users).
2. The kernel on one thread in this process: scoring a tile (one float32 GEMM with the biases
   folded in, 2 * (rank + 2) flops per score) and the top-N selection apart, dmf's
   group-maximum selection beside ``np.argpartition`` of every row, and the float32 GEMM rate
   of the same shapes (rank inner dimension) as the arithmetic ceiling.

Writes docs/benchmarks_recommend.md. Examples::

    .venv/bin/python scripts/bench_recommend.py                            # 1M x 100k, rank 32
    .venv/bin/python scripts/bench_recommend.py --users 1e5 --items 2e4    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from bench_common import (  # noqa: E402
    PeakRSS,
    Report,
    gib,
    log,
    md_table,
    worker_pids,
)

from dmf.model.model import Model  # noqa: E402
from dmf.model.recommend import recommend_all  # noqa: E402
from dmf.model.scoring import (  # noqa: E402
    ItemScorer,
    default_tile_users,
    top_n,
    top_n_reference,
)
from dmf.store.layout import Store, store_from_arrays  # noqa: E402


def bench_store(path: Path, n_users: int, n_items: int, per_user: int, seed: int) -> Store:
    """Every user rates ``per_user`` distinct items (spread evenly from a random offset)."""
    tag = {"users": n_users, "items": n_items, "per_user": per_user, "seed": seed}
    stamp = path / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == tag:
        return Store.open(path)
    log(f"building a store: {n_users:,} users x {per_user} ratings over {n_items:,} items")
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
    off = rng.integers(0, n_items, n_users)
    k = np.tile(np.arange(per_user, dtype=np.int64), n_users)
    i = (off[u] + k * (n_items // per_user)) % n_items
    r = rng.integers(1, 6, len(u)).astype(np.float32)
    store = store_from_arrays(
        path, u, i, r, n_users=n_users, n_items=n_items, target_ratings=2_000_000, overwrite=True
    )
    stamp.write_text(json.dumps(tag))
    return store


def random_model(store: Store, rank: int, seed: int) -> Model:
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(rank)
    return Model(
        mu=store.mu,
        user_ids=store.ids("user"),
        item_ids=store.ids("item"),
        user_factors=rng.normal(0, s, (store.n_users, rank)).astype(np.float32),
        user_bias=rng.normal(0, 0.3, store.n_users).astype(np.float32),
        item_factors=rng.normal(0, s, (store.n_items, rank)).astype(np.float32),
        item_bias=rng.normal(0, 0.3, store.n_items).astype(np.float32),
        store_fingerprint=store.fingerprint,
        store_path=str(store.path),
    )


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kernel(model: Model, n: int, tile: int, repeats: int) -> list[list]:
    """One tile on one thread: GEMM ceiling, scoring, selection (dmf's and argpartition's)."""
    from threadpoolctl import threadpool_limits

    v, c = model.item_factors, model.item_bias
    u, b = model.user_factors[:tile], model.user_bias[:tile]
    n_scores = tile * model.n_items
    flops = 2.0 * model.rank * n_scores
    out = np.empty((tile, model.n_items), dtype=np.float32)
    vt = np.ascontiguousarray(v.T)
    with threadpool_limits(limits=1, user_api="blas"):
        t_gemm = best_of(lambda: np.matmul(u, vt, out=out), repeats)
        scorer = ItemScorer(v, c, model.mu)  # as in a task: item side laid out once
        t_score = best_of(lambda: scorer(u, b, out=out), repeats)
        s = scorer(u, b)
        t_sel = best_of(lambda: top_n(s, n), repeats)
        t_part = best_of(lambda: top_n_reference(s, n), repeats)
    rows = [
        ["float32 GEMM alone (ceiling)", t_gemm, n_scores / t_gemm / 1e6, flops / t_gemm / 1e9],
        [
            "score tile (one GEMM, biases folded in)",
            t_score,
            n_scores / t_score / 1e6,
            flops / t_score / 1e9,
        ],
        [f"top-{n}: dmf group-maximum selection", t_sel, n_scores / t_sel / 1e6, float("nan")],
        [f"top-{n}: np.argpartition per row", t_part, n_scores / t_part / 1e6, float("nan")],
        [
            "score + dmf selection",
            t_score + t_sel,
            n_scores / (t_score + t_sel) / 1e6,
            flops / (t_score + t_sel) / 1e9,
        ],
    ]
    return [[name, t * 1e3, rate, gf] for name, t, rate, gf in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=float, default=1e6)
    ap.add_argument("--items", type=float, default=1e5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--per-user", type=int, default=20, help="train ratings per user (excluded)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="3GiB", help="per worker")
    ap.add_argument("--tile-users", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="kernel timings: best of")
    ap.add_argument(
        "--dir",
        default="/tmp/dmf-bench-recommend",
        help="store and output (kept apart from runs/bench, which other benchmarks reset)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    n_users, n_items = int(args.users), int(args.items)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    store = bench_store(work / f"store-{n_users}x{n_items}", n_users, n_items, args.per_user, 0)
    model = random_model(store, args.rank, args.seed)
    tile = args.tile_users or default_tile_users(n_items)
    report = Report(
        "Recommend for everyone: throughput",
        f"Top-{args.n} unseen items for each of {n_users:,} users over {n_items:,} items at "
        f"rank {args.rank} (random float32 factors), {args.per_user} train items per user "
        "excluded (read from the store's by_user blocks). Throughput is users x items scores "
        "per second, each score mu + b_i + c_j + u_i . v_j (2 x rank flops) followed by the "
        f"top-{args.n} selection. Score tiles of {tile} users x {n_items:,} items "
        f"({tile * n_items * 4 / 2**20:.0f} MiB float32).",
    )

    log(f"kernel: one tile of {tile} users on one thread")
    report.add(
        "## Kernel, one thread\n\n"
        + md_table(
            ["step (one tile)", "ms", "M scores/s", "GFLOP/s"],
            kernel(model, args.n, tile, args.repeats),
        )
    )

    load_before = os.getloadavg()[0]
    out = work / "recs.parquet"
    if out.exists():
        out.unlink()
    log(f"cluster: {args.workers} workers x 1 thread, memory_limit {args.memory_limit}")
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=args.memory_limit,
            dashboard_address=None,
            env=BLAS_ENV,
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = worker_pids(client)
        log(f"recommend_all: {store.n_blocks('user')} user blocks -> {out}")
        with PeakRSS() as rss:
            t = time.perf_counter()
            recommend_all(model, store, args.n, client=client, out=out, tile_users=args.tile_users)
            seconds = time.perf_counter() - t
        worker_peaks = rss.of(pids.values())
    load_after = os.getloadavg()[0]
    meta = pq.ParquetFile(out).metadata
    n_scores = n_users * n_items
    rate = n_scores / seconds
    log(f"{seconds:.1f} s, {rate / 1e6:.0f}M scores/s")
    report.add(
        f"## End to end, {args.workers} workers x 1 thread\n\n"
        + md_table(
            ["quantity", "value"],
            [
                ["users x items", f"{n_users:,} x {n_items:,} = {n_scores:.3g} scores"],
                [
                    "user blocks (tasks: blocks split to at least 2 per thread)",
                    store.n_blocks("user"),
                ],
                ["seconds", seconds],
                ["scores per second", f"{rate:.3g}"],
                ["scores per second per worker", f"{rate / args.workers:.3g}"],
                ["users per second", f"{n_users / seconds:,.0f}"],
                ["output rows", f"{meta.num_rows:,}"],
                ["output size", f"{out.stat().st_size / 2**20:.0f} MiB"],
                ["peak RSS per worker (GiB)", ", ".join(gib(p) for p in worker_peaks)],
                ["peak RSS of the driver (GiB)", gib(rss.driver)],
                ["load average (1 min) before / after", f"{load_before:.1f} / {load_after:.1f}"],
                [
                    "user factors held by the driver (GiB)",
                    gib(model.user_factors.nbytes + model.user_bias.nbytes),
                ],
            ],
        )
    )
    cores = os.cpu_count() or 1
    if max(load_before, load_after) > 0.5 * cores:
        report.add(
            f"Note: the machine was shared with other jobs during this run (load average "
            f"{load_before:.1f} / {load_after:.1f} on {cores} cores), so the end-to-end rate is "
            "a lower bound; the kernel rows (best of several runs) show the undisturbed rate "
            "per thread."
        )
    report.add(
        "Each worker holds the broadcast item side "
        f"({gib(model.item_factors.nbytes)} GiB), its block's user factors and one score tile "
        "at a time; at most two tasks per thread are in flight (their users' factors scattered "
        "just before submission); the output is written per task and streamed into one file at "
        "the end."
    )
    path = report.write("recommend")
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else None
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
