"""Scale: ingest and training from 10M to 100M+ planted ratings, on a cluster smaller than the data.

For each size: ``dmf.data.synth.synth`` writes planted ratings as Parquet (timed apart, not part of
the benchmark), ``dmf.data.ingest.ingest`` builds the store (timed: *ingest s*), then
``dmf.train.train`` runs ``--iterations`` iterations on a LocalCluster of ``--workers`` x 1
thread. Every size runs with the same per-worker ``memory_limit``: by default the largest
size's store on disk and ratings as arrays (12 bytes a rating: int32 user, int32 item, float32
rating), whichever is smaller, times 0.8, split between the workers, so the largest case runs on
a cluster whose total memory is smaller than its data. Blocks then stream from Parquet every
half-iteration. Peak RSS of each worker and of the driver is sampled every 0.1 s; worker
restarts are detected by comparing the worker processes' pids and addresses before and after
training (a worker killed by its nanny for exceeding memory_limit comes back with a new pid).

Writes docs/benchmarks_<out>.md and docs/<out>_memory.png, docs/<out>_seconds.png (``--out``,
default ``scale``). Example::

    .venv/bin/python scripts/bench_scale.py                      # 10M and 100M ratings
    .venv/bin/python scripts/bench_scale.py --sizes 1e7 1e8 5e8  # disk and time permitting
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_common import (  # noqa: E402
    DOCS,
    PeakRSS,
    Report,
    als_flops,
    gemm_rate,
    log,
    md_table,
    worker_pids,
)

BYTES_PER_RATING_ARRAYS = 12  # int32 user + int32 item + float32 rating


def synth_data(root: Path, n: int, seed: int = 0) -> tuple[Path, float]:
    """Planted ratings for ``n`` (reused when present); returns (directory, seconds spent)."""
    from dmf.config import SynthConfig
    from dmf.data.synth import synth

    out = root / f"synth-{n}"
    if (out / "synth.json").is_file():
        return out, float("nan")
    cfg = SynthConfig(
        enabled=True,
        n_users=max(100, n // 100),
        n_items=max(100, n // 1000),
        n_ratings=n,
        rank=8,
        noise=0.5,
        seed=seed,
        files=max(1, n // 10_000_000),
    )
    log(f"synth: {n:,} ratings -> {out}")
    t = time.perf_counter()
    synth(cfg, out, overwrite=True, progress=False)
    return out, time.perf_counter() - t


def ingest_store(src: Path, store_path: Path, target: int):
    from dmf.config import load_config
    from dmf.data.ingest import ingest

    cfg = load_config(
        raw={
            "data": {"source": str(src / "ratings"), "format": "parquet"},
            "store": {"path": str(store_path), "overwrite": True},
            "split": {"method": "random", "test": 0.01, "validation": 0.0},
            "blocks": {"target_ratings": target},
        }
    )
    return ingest(cfg, progress=False)


def parse_bytes(s: str) -> int:
    from dask.utils import parse_bytes as pb

    return int(pb(s))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e8])
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default=None, help="per worker, e.g. 500MiB (default: auto)")
    p.add_argument("--target-ratings", type=int, default=1_000_000, help="ratings per block")
    p.add_argument("--root", default="runs/bench", help="where synthetic data and stores go")
    p.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    p.add_argument("--out", default="scale", help="writes docs/benchmarks_<out>.md")
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)

    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    report = Report("Benchmark: scale and out-of-core training", intro=__doc__.split("Writes")[0])
    gemm1 = gemm_rate(1)
    log(f"GEMM rate, 1 thread: {gemm1:.1f} GFLOP/s")

    # Data and stores first (ingest timed), so the memory limit can be set from the largest.
    stores = {}
    ingest_rows = {}
    for n in sizes:
        src, synth_s = synth_data(root, n)
        log(f"ingest: {n:,} ratings")
        with PeakRSS() as mem:
            t = time.perf_counter()
            store = ingest_store(src, root / f"store-{n}", args.target_ratings)
            ingest_s = time.perf_counter() - t
        stores[n] = store
        ingest_rows[n] = (synth_s, ingest_s, mem.total)
        log(f"  ingest {ingest_s:.1f} s, peak RSS {mem.total / 2**30:.2f} GiB; {store}")
    largest = stores[sizes[-1]]
    big_disk = largest.disk_bytes()
    big_arrays = largest.n_train * BYTES_PER_RATING_ARRAYS
    if args.memory_limit:
        limit = parse_bytes(args.memory_limit)
    else:
        limit = int(0.8 * min(big_disk, big_arrays) / args.workers)
    log(
        f"memory_limit per worker: {limit / 2**20:.0f} MiB (total {args.workers * limit / 2**30:.2f} GiB)"
    )

    rows = []
    plot = []
    for n in sizes:
        store = stores[n]
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=limit,
            dashboard_address=None,
            env=BLAS_ENV,
        )
        client = Client(cluster)
        try:
            before = worker_pids(client)
            from dmf.config import load_config
            from dmf.train.loop import Trainer

            cfg = load_config(
                raw={
                    "model": {"rank": args.rank, "reg": 0.05, "weighted_reg": True},
                    "train": {
                        "iterations": args.iterations,
                        "checkpoint_every": 0,
                        "progress": "off",
                    },
                    "output": {"model": str(root / "model-scale"), "plot": False},
                }
            )
            trainer = Trainer(store, cfg, client, quiet=True)
            # The trainer's own rule (private, so guarded): cached when blocks fit in memory.
            cached = getattr(trainer, "_should_cache", lambda: None)()
            log(f"train: {store.n_train:,} ratings, rank {args.rank}, blocks cached: {cached}")
            with PeakRSS() as mem:
                t = time.perf_counter()
                model = trainer.run()
                wall = time.perf_counter() - t
            after = worker_pids(client)
        finally:
            client.close()
            cluster.close()
        secs = [h["seconds"] for h in model.history]
        per_iter = statistics.mean(secs[1:]) if len(secs) > 1 else secs[0]
        restarted = sorted(set(before.items()) ^ set(after.items()))
        worker_peaks = mem.of(before.values())
        counts = np.concatenate([store.counts("user"), store.counts("item")])
        floor = als_flops(counts, args.rank).floor / (args.workers * gemm1 * 1e9)
        synth_s, ingest_s, ingest_mem = ingest_rows[n]
        disk = store.disk_bytes()
        rows.append(
            [
                f"{store.n_train:,}",
                f"{store.n_users:,}",
                f"{store.n_items:,}",
                disk / 2**30,
                store.n_train * BYTES_PER_RATING_ARRAYS / 2**30,
                synth_s,
                ingest_s,
                ingest_mem / 2**30,
                "yes" if cached else "no (streamed)",
                per_iter,
                floor,
                floor / per_iter,
                " / ".join(f"{w / 2**30:.2f}" for w in worker_peaks),
                args.workers * limit / 2**30,
                mem.driver / 2**30,
                len(restarted) // 2 if restarted else 0,
                model.history[-1]["train_rmse"],
            ]
        )
        plot.append((store.n_train, max(worker_peaks), per_iter, mem.driver))
        log(
            f"  s/iter {per_iter:.2f} (iterations {[round(s, 1) for s in secs]}, {wall:.0f} s "
            f"in all), worker peaks "
            f"{[round(w / 2**30, 2) for w in worker_peaks]} GiB, restarts {restarted}"
        )
        del model, trainer

    # Plots.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(exist_ok=True)
    ns = [x[0] for x in plot]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [x[1] / 2**30 for x in plot], "o-", label="peak worker RSS")
    ax.plot(ns, [x[3] / 2**30 for x in plot], "s--", label="peak driver RSS")
    ax.axhline(limit / 2**30, color="grey", ls=":", label="worker memory_limit")
    ax.set_xscale("log")
    ax.set_xlabel("train ratings")
    ax.set_ylabel("GiB")
    ax.set_title(f"dmf memory, rank {args.rank}, {args.workers} workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / f"{args.out}_memory.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [x[2] for x in plot], "o-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("train ratings")
    ax.set_ylabel("seconds per iteration")
    ax.set_title(f"dmf ALS, rank {args.rank}, {args.workers} workers x 1 thread")
    fig.tight_layout()
    fig.savefig(DOCS / f"{args.out}_seconds.png", dpi=110)
    plt.close(fig)

    report.add(
        f"Rank {args.rank}, ALS-WR reg 0.05, {args.iterations} iterations (s/iter: mean after the "
        f"first), {args.workers} workers x 1 thread, memory_limit {limit / 2**20:.0f} MiB per "
        f"worker for every size. Largest store: {big_disk / 2**30:.2f} GiB on disk, "
        f"{big_arrays / 2**30:.2f} GiB as arrays; total worker memory_limit "
        f"{args.workers * limit / 2**30:.2f} GiB. Blocks of {args.target_ratings:,} ratings. "
        f"GEMM rate (1 thread): {gemm1:.1f} GFLOP/s."
    )
    report.add(
        md_table(
            [
                "train ratings",
                "users",
                "items",
                "store GiB on disk",
                "ratings as arrays GiB",
                "synth s",
                "ingest s",
                "ingest peak RSS GiB",
                "blocks cached",
                "s/iter",
                "floor s",
                "of floor",
                "peak RSS per worker GiB",
                "total worker memory_limit GiB",
                "driver peak RSS GiB",
                "workers restarted",
                "train RMSE",
            ],
            rows,
        )
    )
    report.add(f"![peak memory against rating count]({args.out}_memory.png)")
    report.add(f"![seconds per iteration against rating count]({args.out}_seconds.png)")
    report.add(
        "*synth s* is `nan` when the planted data was already on disk from an earlier run. "
        "*ingest peak RSS* covers the driver process and its children (ingest runs in a local "
        "thread pool here)."
    )
    path = report.write(args.out)
    (root / "scale.json").write_text(json.dumps({"rows": [list(map(str, r)) for r in rows]}))
    log(f"wrote {path}")
    print(report.render())
    if not args.keep:
        for n in sizes:
            shutil.rmtree(root / f"store-{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
