"""dmf against Spark MLlib ALS, side by side: same split, rank, iterations, regularisation, cores.

For each data set (planted 1M and 10M ratings by default; MovieLens 1M when
``data/ml-1m/ratings.dat`` exists) one random 90/10 train/test split is written to Parquet
(test pairs whose user or item is not in train are dropped, so both systems score the very same
pairs). Then, at each rank:

- **dmf**: the store is built from train.parquet (timed as ingest), then ``dmf.train.train`` on a
  LocalCluster of ``--workers`` x 1 thread, once with ``model.weighted_reg: true`` (ALS-WR, the
  like-for-like row: Spark's regParam is ALS-WR) and once with plain L2 (dmf's default before
  2026-11-30), both
  with ``reg`` = Spark's regParam. s/iter = mean of the per-iteration times after the first
  (the model's history); test RMSE from ``Model.predict`` on the test pairs.
- **Spark**: ``pyspark.ml.recommendation.ALS`` in ``local[N]``, N = dmf's total worker threads.
  JVM start-up and reading train.parquet (cached, counted) are timed apart. s/iter =
  (fit with maxIter=n - fit with maxIter=1) / (n - 1): the per-iteration cost without the
  set-up that every fit repeats (partitioning ratings into in/out blocks). Test RMSE with
  ``coldStartStrategy="drop"``. Spark's ALS has **no bias terms**: it fits r ~ u.v only.

Peak memory: RSS sampled every 0.1 s over this process and all its children (dmf's worker
processes; the Spark JVM). Speed is reported as the ratio Spark s/iter / dmf s/iter, both
measured in this run on this machine.

Writes docs/benchmarks_vs_spark.md. Needs ``pip install -e '.[bench]'`` and Java 17.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from bench_common import (  # noqa: E402
    REPO,
    PeakRSS,
    Report,
    als_flops,
    gemm_rate,
    log,
    md_table,
    planted_ratings,
    spark_session,
    split_test,
    tree_cpu_seconds,
)


# -- data ------------------------------------------------------------------------------------------
def write_split(out: Path, u: np.ndarray, i: np.ndarray, r: np.ndarray) -> dict:
    """One seeded 90/10 split to out/train.parquet and out/test.parquet (known pairs only)."""
    out.mkdir(parents=True, exist_ok=True)
    test = split_test(len(u), 0.1, seed=7)
    tu, ti = u[~test], i[~test]
    known = np.isin(u[test], np.unique(tu)) & np.isin(i[test], np.unique(ti))
    tables = {
        "train": (tu, ti, r[~test]),
        "test": (u[test][known], i[test][known], r[test][known]),
    }
    for name, (a, b, c) in tables.items():
        t = pa.table(
            {
                "user": pa.array(a.astype(np.int32)),
                "item": pa.array(b.astype(np.int32)),
                "rating": pa.array(c.astype(np.float32)),
            }
        )
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(t, tmp)
        os.replace(tmp, out / f"{name}.parquet")
    return {"train": int((~test).sum()), "test": int(known.sum())}


def datasets(names: list[str], root: Path) -> list[tuple[str, Path]]:
    """(label, directory with train.parquet/test.parquet) for each requested data set."""
    out = []
    for name in names:
        d = root / f"split-{name}"
        if name == "ml-1m":
            src = REPO / "data" / "ml-1m" / "ratings.dat"
            if not src.is_file():
                log(f"skipping MovieLens 1M: {src} not found")
                continue
            if not (d / "test.parquet").is_file():
                import pyarrow.csv as pacsv

                tab = pacsv.read_csv(
                    src,
                    read_options=pacsv.ReadOptions(
                        column_names=["user", "x1", "item", "x2", "rating", "x3", "ts"]
                    ),
                    parse_options=pacsv.ParseOptions(delimiter=":"),
                )
                write_split(
                    d,
                    tab.column("user").to_numpy(),
                    tab.column("item").to_numpy(),
                    tab.column("rating").to_numpy().astype(np.float32),
                )
            out.append(("MovieLens 1M", d))
            continue
        n = int(float(name))
        if not (d / "test.parquet").is_file():
            log(f"writing a planted split of {n:,} ratings to {d}")
            u, i, r, _, _ = planted_ratings(n, seed=3)
            write_split(d, u, i, r)
        out.append((f"planted {n / 1e6:g}M", d))
    return out


# -- dmf -------------------------------------------------------------------------------------------
def dmf_ingest(split_dir: Path, store_path: Path, n_blocks: int | None):
    """The store from train.parquet: dmf.data.ingest when it exists, else read + store_from_arrays."""
    from dmf.config import load_config

    try:
        from dmf.data.ingest import ingest
    except ImportError:
        ingest = None
    if ingest is not None:
        cfg = load_config(
            raw={
                "data": {"source": str(split_dir / "train.parquet"), "format": "parquet"},
                "store": {"path": str(store_path), "overwrite": True},
                "split": {"method": "none", "test": 0.0, "validation": 0.0},
                "blocks": {"n_blocks": n_blocks},
            }
        )
        return ingest(cfg, progress=False), "dmf.data.ingest.ingest"
    from dmf.store.layout import store_from_arrays

    t = pq.read_table(split_dir / "train.parquet")
    store = store_from_arrays(
        store_path,
        t.column("user").to_numpy(),
        t.column("item").to_numpy(),
        t.column("rating").to_numpy(),
        n_blocks=n_blocks,
        overwrite=True,
    )
    return store, "pyarrow read + dmf.store.store_from_arrays"


def dmf_train(store, client, rank: int, iters: int, reg: float, weighted: bool, out: Path):
    """Fit with ``iters`` iterations; returns (model, wall seconds, CPU seconds of all
    processes: driver and workers)."""
    from dmf.config import load_config
    from dmf.train.loop import train

    cfg = load_config(
        raw={
            # Like for like with Spark: every iteration run (no early stopping), raw scores.
            "model": {"rank": rank, "reg": reg, "weighted_reg": weighted, "clip": False},
            "train": {
                "iterations": iters,
                "early_stopping": None,
                "checkpoint_every": 0,
                "progress": "off",
            },
            "output": {"model": str(out), "plot": False, "overwrite": True},
        }
    )
    cpu = tree_cpu_seconds()
    t = time.perf_counter()
    model = train(store, cfg, client=client, quiet=True)
    return model, time.perf_counter() - t, tree_cpu_seconds() - cpu


def dmf_per_iter(store, client, rank, iters, reg, weighted, out):
    """Like Spark's: (fit with n iterations - fit with 1) / (n - 1), wall and CPU seconds."""
    _, w1, c1 = dmf_train(store, client, rank, 1, reg, weighted, out)
    model, wn, cn = dmf_train(store, client, rank, iters, reg, weighted, out)
    hist = [h["seconds"] for h in model.history]
    return model, {
        "fit": wn,
        "per_iter": (wn - w1) / (iters - 1),
        "cpu_per_iter": (cn - c1) / (iters - 1),
        "history_per_iter": statistics.mean(hist[1:]),
    }


def test_rmse_dmf(model, split_dir: Path) -> tuple[float, int]:
    t = pq.read_table(split_dir / "test.parquet")
    # Raw ids in the store are the ids of train.parquet (both ingest paths keep them).
    pred = model.predict(
        t.column("user").to_numpy().astype(np.int64),
        t.column("item").to_numpy().astype(np.int64),
        cold_start="drop",
        return_info=True,
    )
    r = t.column("rating").to_numpy().astype(np.float64)[pred.known]
    return float(np.sqrt(np.mean((r - pred.scores) ** 2))), int(pred.known.sum())


# -- Spark -----------------------------------------------------------------------------------------
def spark_blas(spark) -> str:
    """Which BLAS implementation Spark's netlib wrapper loaded (native, or Java fallback)."""
    try:
        jvm = spark._jvm
        b = jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName()
        la = jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getName()
        return f"{b.rsplit('.', 1)[-1]}, {la.rsplit('.', 1)[-1]}"
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({type(exc).__name__})"


def spark_run(
    spark, split_dir: Path, rank: int, iters: int, reg: float, warm_up: bool = False
) -> dict:
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS

    t = time.perf_counter()
    train = spark.read.parquet(str(split_dir / "train.parquet")).cache()
    n_train = train.count()
    test = spark.read.parquet(str(split_dir / "test.parquet")).cache()
    test.count()
    load = time.perf_counter() - t

    def fit(max_iter: int):
        als = ALS(
            rank=rank,
            maxIter=max_iter,
            regParam=reg,
            userCol="user",
            itemCol="item",
            ratingCol="rating",
            coldStartStrategy="drop",
            seed=0,
        )
        cpu = tree_cpu_seconds()
        t0 = time.perf_counter()
        model = als.fit(train)
        # fit() is lazy for the factors' last step; materialise them inside the timing.
        model.userFactors.count()
        model.itemFactors.count()
        return model, time.perf_counter() - t0, tree_cpu_seconds() - cpu

    if warm_up:
        fit(1)  # the JVM's JIT compiles ALS's code paths; not timed
    _, t1, c1 = fit(1)
    model, tn, cn = fit(iters)
    t0 = time.perf_counter()
    pred = model.transform(test)
    rmse = RegressionEvaluator(
        metricName="rmse", labelCol="rating", predictionCol="prediction"
    ).evaluate(pred)
    predict_s = time.perf_counter() - t0
    train.unpersist()
    test.unpersist()
    return {
        "load": load,
        "n_train": n_train,
        "fit1": t1,
        "fitn": tn,
        "per_iter": (tn - t1) / (iters - 1),
        "cpu_per_iter": (cn - c1) / (iters - 1),
        "rmse": rmse,
        "predict": predict_s,
    }


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", nargs="+", default=["1e6", "1e7", "ml-1m"])
    p.add_argument("--ranks", type=int, nargs="+", default=[10, 64])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--reg", type=float, default=0.05, help="Spark regParam = dmf model.reg")
    p.add_argument("--workers", type=int, default=2, help="dmf workers (1 thread each)")
    p.add_argument("--spark-memory", default="8g", help="spark.driver.memory")
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="dmf blocks per side (default: 4 x workers, so every worker has work; Spark's "
        "default is 10)",
    )
    p.add_argument("--root", default="runs/bench", help="where splits and stores are kept")
    p.add_argument("--skip-spark", action="store_true")
    p.add_argument("--out", default="vs_spark", help="writes docs/benchmarks_<out>.md")
    args = p.parse_args(argv)
    if args.iterations < 2:
        p.error("--iterations must be at least 2 (Spark's s/iter is a difference of two fits)")
    root = Path(args.root)
    threads = args.workers
    n_blocks = args.blocks or 4 * args.workers

    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    report = Report(
        "Benchmark: dmf against Spark MLlib ALS",
        intro=__doc__.split("Writes docs")[0].strip(),
    )
    gemm1 = gemm_rate(1)
    log(f"GEMM rate, 1 thread: {gemm1:.1f} GFLOP/s")
    rows, detail, rmse_rows = [], [], []
    spark = None
    jvm_start = float("nan")
    blas_impl = "not run"
    for label, split_dir in datasets(args.data, root):
        n_train = pq.ParquetFile(split_dir / "train.parquet").metadata.num_rows
        n_test = pq.ParquetFile(split_dir / "test.parquet").metadata.num_rows
        # ---- dmf
        log(f"{label}: dmf ingest")
        with PeakRSS() as mem_dmf:
            t = time.perf_counter()
            store, how = dmf_ingest(split_dir, split_dir / "store", n_blocks)
            ingest_s = time.perf_counter() - t
            t = time.perf_counter()
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                env=BLAS_ENV,
            )
            client = Client(cluster)
            cluster_s = time.perf_counter() - t
            dmf_res = {}
            try:
                # Untimed: imports on the workers and first-call costs, as Spark's warm-up fit.
                dmf_train(store, client, args.ranks[0], 1, args.reg, True, split_dir / "model")
                for rank in args.ranks:
                    for weighted in (True, False):
                        log(f"{label}: dmf rank {rank} weighted_reg={weighted}")
                        model, r = dmf_per_iter(
                            store,
                            client,
                            rank,
                            args.iterations,
                            args.reg,
                            weighted,
                            split_dir / "model",
                        )
                        t = time.perf_counter()
                        rmse, n_scored = test_rmse_dmf(model, split_dir)
                        r["predict"] = time.perf_counter() - t
                        r["rmse"] = rmse
                        dmf_res[rank, weighted] = r
                        del model
                        gc.collect()
            finally:
                client.close()
                cluster.close()
        dmf_mem = mem_dmf.total
        # ---- Spark
        spark_res = {}
        spark_mem = float("nan")
        if not args.skip_spark:
            with PeakRSS() as mem_spark:
                if spark is None:
                    t = time.perf_counter()
                    spark = spark_session(threads, args.spark_memory)
                    jvm_start = time.perf_counter() - t
                    blas_impl = spark_blas(spark)
                    log(f"Spark BLAS: {blas_impl}")
                for k, rank in enumerate(args.ranks):
                    log(f"{label}: Spark ALS rank {rank}")
                    spark_res[rank] = spark_run(
                        spark, split_dir, rank, args.iterations, args.reg, warm_up=k == 0
                    )
            spark_mem = mem_spark.total
        # ---- rows
        counts = np.concatenate([store.counts("user"), store.counts("item")])
        for rank in args.ranks:
            floor = als_flops(counts, rank).floor / (threads * gemm1 * 1e9)
            w, d = dmf_res[rank, True], dmf_res[rank, False]
            s = spark_res.get(rank, {})
            nan = float("nan")
            rows.append(
                [
                    label,
                    f"{n_train:,}",
                    rank,
                    w["per_iter"],
                    s.get("per_iter", nan),
                    s.get("per_iter", nan) / w["per_iter"],
                    w["cpu_per_iter"],
                    s.get("cpu_per_iter", nan),
                    s.get("cpu_per_iter", nan) / w["cpu_per_iter"],
                    floor,
                    w["rmse"],
                    s.get("rmse", nan),
                    d["rmse"],
                    d["per_iter"],
                ]
            )
            detail.append(
                [
                    label,
                    rank,
                    ingest_s,
                    cluster_s,
                    w["history_per_iter"],
                    w["fit"],
                    ingest_s + w["fit"] + w["predict"],
                    jvm_start,
                    s.get("load", nan),
                    s.get("fit1", nan),
                    s.get("fitn", nan),
                    s.get("load", nan) + s.get("fitn", nan) + s.get("predict", nan),
                ]
            )
        rmse_rows.append(
            [
                label,
                f"{n_train:,}",
                f"{n_test:,}",
                n_scored,
                dmf_mem / 2**30,
                spark_mem / 2**30,
                how,
            ]
        )
        del store
        gc.collect()
    if spark is not None:
        spark.stop()

    report.add(
        f"Same machine, same run. dmf: LocalCluster {args.workers} workers x 1 thread; Spark: "
        f"local[{threads}], spark.driver.memory {args.spark_memory}. Iterations: "
        f"{args.iterations}; regParam = dmf reg = {args.reg}. GEMM rate (1 thread, float64): "
        f"{gemm1:.1f} GFLOP/s; *floor s* = least arithmetic of one exact iteration at "
        f"{threads} x that rate. Spark's BLAS/LAPACK (netlib): {blas_impl}. Before each data "
        "set's first Spark fit, one untimed fit of 1 iteration warms up the JIT (dmf gets the same "
        "untimed warm-up fit). "
        f"dmf blocks per side: {n_blocks}. **s/iter** for both systems = (fit with "
        f"{args.iterations} iterations - fit with 1) / {args.iterations - 1}, wall seconds; "
        "**CPU s/iter** the same difference of CPU seconds consumed by all processes (driver, "
        "Dask workers, JVM): on a machine shared with other jobs, wall times are inflated by the "
        "competition while CPU seconds are not, so the CPU ratio is the steadier comparison."
    )
    report.add("## Seconds per iteration and test RMSE")
    report.add(
        md_table(
            [
                "data",
                "train ratings",
                "rank",
                "dmf ALS-WR s/iter",
                "Spark s/iter",
                "Spark / dmf",
                "dmf CPU s/iter",
                "Spark CPU s/iter",
                "Spark / dmf (CPU)",
                "floor s",
                "dmf ALS-WR test RMSE",
                "Spark test RMSE",
                "dmf plain L2 test RMSE",
                "dmf plain L2 s/iter",
            ],
            rows,
        )
    )
    report.add("## End to end and set-up (seconds)")
    report.add(
        md_table(
            [
                "data",
                "rank",
                "dmf ingest",
                "dmf cluster start",
                "dmf s/iter (history)",
                f"dmf fit ({args.iterations} it)",
                "dmf ingest+fit+predict",
                "Spark JVM start (once)",
                "Spark read+cache",
                "Spark fit 1 it",
                f"Spark fit {args.iterations} it",
                "Spark read+fit+predict",
            ],
            detail,
        )
    )
    report.add("## Data and peak memory (all processes, GiB)")
    report.add(
        md_table(
            [
                "data",
                "train",
                "test pairs",
                "scored by dmf",
                "dmf peak RSS (driver + workers)",
                "Spark peak RSS (driver + JVM)",
                "dmf ingest path",
            ],
            rmse_rows,
        )
    )
    report.add(
        "Notes: Spark ALS has no bias terms (it models r ~ u.v), dmf fits mu + b_i + c_j + u.v. "
        "dmf's *default* row uses plain L2 (lambda not scaled by counts) with the same lambda: "
        "a small lambda without ALS-WR over-fits at high rank, so compare RMSE on the ALS-WR row. "
        "Spark's peak RSS includes a JVM heap sized by spark.driver.memory, which the JVM grows "
        "into lazily; the Spark and dmf runs are sequential, never concurrent."
    )
    path = report.write(args.out)
    log(f"wrote {path}")
    print(report.render())
    shutil.rmtree(root / "spark-warehouse", ignore_errors=True)


if __name__ == "__main__":
    main()
