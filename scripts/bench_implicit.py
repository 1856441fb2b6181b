"""Implicit feedback: dmf against implicit (CPU) and Spark MLlib ALS (implicitPrefs), one run.

Data, for each size (``--sizes``, events = rows of ``dmf synth --implicit``; default 10M and
100M): planted-preference events with counts, ``n/100`` users and ``min(20000, n/500)`` items,
repeated rows of a pair added up at ingest (``data.duplicates: sum``, the default under implicit
feedback). One ``dmf ingest`` with a per-user held-out split (``split.method: user``, test 0.1,
validation 0, seed 42). The store's train events (the summed counts r of each user-item pair)
are exported once, to a CSR matrix for implicit and a Parquet file for Spark, so the three
systems train on exactly the same cells, and are scored on the same held-out events.

Systems, each at every rank (``--ranks``), with the same iterations (fixed: no early stopping),
alpha, and 2 cores (``--threads``):

- **dmf**: ``model.feedback: implicit`` (confidence c = 1 + alpha r, no biases, plain
  regularisation ``reg``), ``dmf.train.train`` on a fresh LocalCluster of ``--threads`` workers x
  1 thread per run, ``train.solver`` cholesky and cg (``cg_steps`` 3), out of core
  (``train.cache_blocks: never``: every half-step reads its rating blocks from disk) and, at the
  sizes of ``--cached-sizes``, cached (``always``);
- **implicit** ``implicit.cpu.als.AlternatingLeastSquares`` (``use_cg=False`` and ``True``,
  ``cg_steps`` 3), ``num_threads`` = ``--threads``, BLAS at 1 thread, in memory, given the
  confidence matrix 1 + alpha r (its own alpha at 1.0: its solver takes the entry as c) and
  ``regularization`` = ``reg``; it starts from dmf's initial item factors and zero user factors
  (dmf's starting point), so with the Cholesky solver both compute the same factors up to float32
  rounding (the *factor diff* column checks it). Run in a child process of its own, whose peak
  RSS is implicit's;
- **Spark**: ``pyspark.ml.recommendation.ALS(implicitPrefs=True, alpha=alpha)`` in
  ``local[threads]``. Spark's confidence is also c = 1 + alpha r, but its penalty is regParam
  times the row's number of events (dmf's ``weighted_reg``); regParam = reg / (mean events per
  row over users and items), so that a row with the mean count gets the penalty ``reg``
  (``--spark-reg`` sets it). Spark starts from its own random factors. Run at the sizes of
  ``--spark-sizes`` only; elsewhere its time is estimated from the smaller size.

Seconds per iteration: dmf, the mean of ``history[i]["seconds"]`` over iterations 2..n; implicit,
the mean of its per-epoch times (its fit callback) over epochs 2..n; Spark, (fit with maxIter=n
- fit with maxIter=1) / (n - 1), after one untimed warm-up fit (JIT). CPU s/iter: CPU seconds of
every process of the system (dmf: driver, Dask workers and nannies; implicit: its process;
Spark: the JVM and the driver) over the same iterations: the steadier figure on a shared machine,
and the per-core comparison (cores x wall when they are busy). Peak RSS: sampled every 0.1 s
over the driver and each worker (dmf), the implicit process (its VmHWM), the JVM.

Ranking quality, one function for all: for a seeded sample of at most ``--eval-users`` users
with held-out events and train events, every item is scored by u.v, the user's train items are
excluded, and the top 10 are compared with the user's held-out items (every held-out event is
relevant): precision@10 and NDCG@10 averaged over those users. The *paired* difference of NDCG
between dmf and implicit (same users) is given with its standard error.

Default run (``--sizes 1e7 1e8``): 10M events with all three systems (dmf also cached), 5
iterations; 100M events with dmf (on disk) and implicit, 3 iterations, Spark's time estimated.
About 29 minutes on 2 cores once the data exist, plus about 9 minutes to make them the first time
(kept in ``runs/bench/implicit``; ~2 GB). ``--quick``: 1M events, every system, 3 iterations,
about 1.5 minutes.

Writes docs/benchmarks_implicit.md (``--doc PATH`` elsewhere). Needs ``pip install implicit``,
pyspark and Java 17 (as bench_vs_spark.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_common import (  # noqa: E402
    ANALYSIS,
    REPO,
    PeakRSS,
    Report,
    embed_data,
    gib,
    log,
    md_table,
    spark_session,
    tree_cpu_seconds,
    worker_pids,
)

K = 10  # the ranking metrics' cut-off
SPLIT_SEED = 42
SYNTH_SEED = 0
TEST_FRACTION = 0.1
NAN = float("nan")


# -- data ------------------------------------------------------------------------------------------
def shape_of(n: int, items: int | None) -> tuple[int, int]:
    """(users, items) of a size: 100 event rows per user, 500 per item up to 20k items."""
    return max(10, n // 100), items or min(20_000, max(50, n // 500))


def label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"


def run_cli(args: list[str]) -> float:
    """Run ``dmf ...`` (this virtualenv's) and return its wall seconds; fail loudly."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dmf", *args], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dmf {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t


def prepare(n: int, n_items: int | None, root: Path) -> dict:
    """Planted events (``dmf synth --implicit``), the store (``dmf ingest``, per-user split) and
    the export of its train and test events; each step reused when its settings are unchanged.
    Returns the data's description (paths, counts, seconds)."""
    users, items = shape_of(n, n_items)
    d = root / f"data-{label(n)}-{users}x{items}"
    d.mkdir(parents=True, exist_ok=True)
    synth, store, exp = d / "synth", d / "store", d / "export"
    info_path = d / "prep.json"
    want = {"n": n, "users": users, "items": items, "seed": SYNTH_SEED, "split_seed": SPLIT_SEED}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == want and (exp / "train_csr.npz").is_file():
            log(f"{label(n)}: reusing {d}")
            return info
    info: dict[str, Any] = {"settings": want, "dir": str(d)}
    log(f"{label(n)}: dmf synth --implicit, {n:,} events, {users:,} users x {items:,} items")
    info["synth_seconds"] = run_cli(
        ["synth", "--implicit", "--users", str(users), "--items", str(items), "--ratings", str(n),
         "--seed", str(SYNTH_SEED), "--out", str(synth), "--overwrite", "--no-progress"]
    )  # fmt: skip
    summary = json.loads((synth / "synth.json").read_text())
    info["distinct_pairs"] = summary.get("distinct_pairs")
    cfg = d / "ingest.yaml"
    cfg.write_text(
        json.dumps(
            {
                "data": {"source": str(synth / "ratings"), "format": "parquet"},
                "model": {"feedback": "implicit"},
                "store": {"path": str(store), "overwrite": True},
                "split": {
                    "method": "user",
                    "test": TEST_FRACTION,
                    "validation": 0.0,
                    "seed": SPLIT_SEED,
                },
            },
            indent=1,
        )
    )
    log(f"{label(n)}: dmf ingest (per-user split, test {TEST_FRACTION})")
    info["ingest_seconds"] = run_cli(["ingest", str(cfg), "--no-cluster", "-q"])
    log(f"{label(n)}: exporting the store's train and test events")
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        info.update(ex.submit(export_store, str(store), str(exp)).result())
    info.update(store=str(store), export=str(exp), synth=str(synth))
    info_path.write_text(json.dumps(info, indent=1))
    return info


def export_store(store_path: str, out: str) -> dict:
    """(child process) The store's train events as one CSR matrix (users x items, the summed
    counts r) and as Parquet (user, item, rating: dense indices) for Spark; the test events
    (dense indices). Returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmf.store.layout import Store

    store = Store.open(store_path)
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, data = [], []
    writer = None
    tmp = o / ".train.parquet.tmp"
    for b in range(store.n_blocks("user")):
        blk = store.read_block("user", b)
        assert blk.start == sum(len(p) for p in indptr) - 1, "user blocks are contiguous"
        indptr.append(blk.indptr[1:].astype(np.int64) + indptr[-1][-1])
        indices.append(blk.cols.astype(np.int32))
        data.append(blk.vals.astype(np.float32))
        rows = np.repeat(np.arange(blk.start, blk.stop, dtype=np.int32), np.diff(blk.indptr))
        t = pa.table({"user": rows, "item": blk.cols.astype(np.int32), "rating": data[-1]})
        if writer is None:
            writer = pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t, row_group_size=1 << 20)
    writer.close()
    os.replace(tmp, o / "train.parquet")
    ip = np.concatenate(indptr)
    np.savez(
        o / "train_csr.npz",
        indptr=ip,
        indices=np.concatenate(indices),
        data=np.concatenate(data),
        shape=np.array([store.n_users, store.n_items]),
    )
    test = store.read_split("test")
    np.savez(
        o / "test.npz",
        user=test.column("user").to_numpy().astype(np.int32),
        item=test.column("item").to_numpy().astype(np.int32),
    )
    return {
        "n_users": store.n_users,
        "n_items": store.n_items,
        "n_train": int(ip[-1]),
        "n_test": test.num_rows,
        "store_blocks": [store.n_blocks("user"), store.n_blocks("item")],
        "store_bytes": store.disk_bytes(),
    }


def load_csr(export: str):
    import scipy.sparse as sp

    z = np.load(Path(export) / "train_csr.npz")
    m = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    m.has_sorted_indices = False
    m.sort_indices()
    return m


# -- evaluation: one function for every system --------------------------------------------------------
class Evaluator:
    """precision@K and NDCG@K of any factors on the held-out events of a seeded user sample."""

    def __init__(self, export: str, max_users: int, seed: int = 0):
        import scipy.sparse as sp

        self.train = load_csr(export)
        z = np.load(Path(export) / "test.npz")
        tu, ti = z["user"], z["item"]
        n_users, n_items = self.train.shape
        self.test = sp.csr_matrix(
            (np.ones(len(tu), dtype=np.float32), (tu, ti)), shape=(n_users, n_items)
        )
        self.test.sum_duplicates()
        held = np.diff(self.test.indptr) > 0
        trained = np.diff(self.train.indptr) > 0
        cand = np.flatnonzero(held & trained)
        self.n_candidates = int(len(cand))
        rng = np.random.default_rng(seed)
        if len(cand) > max_users:
            cand = np.sort(rng.choice(cand, max_users, replace=False))
        self.users = cand
        self.overlap = int(self.train.multiply(self.test).nnz)  # held-out cells also in train

    def __call__(self, U: np.ndarray, V: np.ndarray, chunk: int = 2048) -> dict:
        disc = 1.0 / np.log2(np.arange(2, K + 2))
        ideal = np.cumsum(disc)
        prec, ndcg = [], []
        Vt = np.ascontiguousarray(V.T, dtype=np.float32)
        for s in range(0, len(self.users), chunk):
            us = self.users[s : s + chunk]
            S = np.asarray(U[us], dtype=np.float32) @ Vt
            tr = self.train[us]
            S[np.repeat(np.arange(len(us)), np.diff(tr.indptr)), tr.indices] = -np.inf
            top = np.argpartition(-S, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(S, top, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            te = self.test[us]
            n_rel = np.diff(te.indptr)
            n_items = np.int64(S.shape[1])
            held = np.repeat(np.arange(len(us), dtype=np.int64), n_rel) * n_items + te.indices
            hits = np.isin(np.arange(len(us), dtype=np.int64)[:, None] * n_items + top, held)
            prec.append(hits.sum(axis=1) / K)
            ndcg.append((hits @ disc) / ideal[np.minimum(n_rel, K) - 1])
        p, g = np.concatenate(prec), np.concatenate(ndcg)
        return {"precision": float(p.mean()), "ndcg": float(g.mean()), "ndcg_users": g}


def load_factors(base: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(base.with_suffix(".U.npy")), np.load(base.with_suffix(".V.npy"))


def rel_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest |a - b| over user and item factors, relative to the largest |b|."""
    num = max(float(np.abs(a[0] - b[0]).max()), float(np.abs(a[1] - b[1]).max()))
    den = max(float(np.abs(b[0]).max()), float(np.abs(b[1]).max()))
    return num / den if den else NAN


def evaluate_child(export: str, max_users: int, bases: list[str], pairs: list) -> dict:
    """(child process) The metrics of every factor file ``bases[k]``, of a popularity ranking,
    and for each pair (a, b) of indices the paired NDCG difference a - b (mean, standard error)
    and the factors' relative difference."""
    ev = Evaluator(export, max_users)
    counts = np.diff(ev.train.tocsc().indptr).astype(np.float32)
    pop = ev(np.ones((ev.train.shape[0], 1), np.float32), counts[:, None])
    metrics = [ev(*load_factors(Path(b))) for b in bases]
    out_pairs = []
    for a, b in pairs:
        d = metrics[a]["ndcg_users"] - metrics[b]["ndcg_users"]
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else NAN
        fd = rel_diff(load_factors(Path(bases[a])), load_factors(Path(bases[b])))
        out_pairs.append((float(d.mean()), se, fd))
    return {
        "metrics": [{"precision": m["precision"], "ndcg": m["ndcg"]} for m in metrics],
        "pairs": out_pairs,
        "popularity": {"precision": pop["precision"], "ndcg": pop["ndcg"]},
        "users": len(ev.users),
        "candidates": ev.n_candidates,
        "overlap": ev.overlap,
    }


# -- dmf -------------------------------------------------------------------------------------------
def system_busy() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def others_share(busy0: float, own_cpu: float, wall: float) -> float:
    """Share of the machine's cores that processes outside the benchmark used over a window
    of ``wall`` seconds that started at ``busy0`` (``system_busy()``), the benchmark itself
    having used ``own_cpu`` CPU seconds."""
    return max(0.0, system_busy() - busy0 - own_cpu) / (wall * (os.cpu_count() or 1))


def _after_first(x) -> float:
    """Mean over iterations 2..n (all of them when there is one)."""
    x = list(x)
    return float(np.mean(x[1:] if len(x) > 1 else x))


def dmf_run(
    store_path: str, rank: int, solver: str, cache: str, args, out: Path, factors: Path
) -> dict:
    """One dmf fit on a fresh LocalCluster; its factors are saved to ``factors``."""
    from distributed import Client, LocalCluster

    from dmf.config import load_config
    from dmf.dist.cluster import BLAS_ENV
    from dmf.store.layout import Store
    from dmf.train.loop import train

    store = Store.open(store_path)
    cfg = load_config(
        raw={
            "model": {
                "feedback": "implicit",
                "rank": rank,
                "reg": args.reg,
                "alpha": args.alpha,
                "dtype": "float32",
            },
            "train": {
                "iterations": args.iters,
                "early_stopping": None,
                "checkpoint_every": 0,
                "progress": "off",
                "solver": solver,
                "cg_steps": args.cg_steps,
                "cache_blocks": cache,
            },
            "output": {"model": str(out), "plot": False, "overwrite": True},
        }
    )
    marks: list[float] = []

    def on_iteration(_rec: dict) -> None:
        marks.append(tree_cpu_seconds())

    with PeakRSS() as mem:
        cluster = LocalCluster(
            n_workers=args.threads,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            env=BLAS_ENV,
        )
        client = Client(cluster)
        try:
            pids = list(worker_pids(client).values())
            cpu0, busy0 = tree_cpu_seconds(), system_busy()
            t = time.perf_counter()
            model = train(store, cfg, client=client, quiet=True, callback=on_iteration)
            fit = time.perf_counter() - t
            others = others_share(busy0, tree_cpu_seconds() - cpu0, fit)
        finally:
            client.close()
            cluster.close()
    np.save(factors.with_suffix(".U.npy"), model.user_factors)
    np.save(factors.with_suffix(".V.npy"), model.item_factors)
    secs = [h["seconds"] for h in model.history]
    cpu = np.diff([cpu0, *marks])
    return {
        "s_iter": _after_first(secs),
        "cpu_iter": _after_first(cpu),
        "first_iter": secs[0],
        "fit": fit,
        "others": others,
        "objective": model.history[-1]["objective"],
        "rss_driver": mem.driver,
        "rss_workers": mem.of(pids),
        "rss_total": mem.total,
    }


# -- implicit --------------------------------------------------------------------------------------
def peak_rss_self() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec (``ru_maxrss`` of a
    spawned child carries the RSS of the parent it was forked from)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def implicit_child(export: str, init: str, rank: int, use_cg: bool, args: dict, out: str):
    """(child process) implicit's CPU ALS on the train CSR from dmf's starting point (the item
    factors in the file ``init``, users at zero); saves its factors; returns its timings and its
    peak RSS. It imports implicit, NumPy and SciPy, not dmf."""
    import implicit
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    C = load_csr(export)
    C.data = 1.0 + np.float32(args["alpha"]) * C.data  # implicit's entry is the confidence c
    V0 = np.load(init)
    rss_data = peak_rss_self()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=rank, regularization=args["reg"], alpha=1.0, dtype=np.float32,
            use_cg=use_cg, iterations=args["iters"], calculate_training_loss=False,
            num_threads=args["threads"], random_state=0,
        )  # fmt: skip
        model.cg_steps = args["cg_steps"]
        model.item_factors = V0.astype(np.float32)
        model.user_factors = np.zeros((C.shape[0], rank), dtype=np.float32)
        secs: list[float] = []
        cpus = [time.process_time()]

        def on_epoch(_it, elapsed, _loss):
            secs.append(elapsed)
            cpus.append(time.process_time())

        t, busy0, own0 = time.perf_counter(), system_busy(), time.process_time()
        model.fit(C, show_progress=False, callback=on_epoch)
        fit = time.perf_counter() - t
        others = others_share(busy0, time.process_time() - own0, fit)
    np.save(out + ".U.npy", model.user_factors)
    np.save(out + ".V.npy", model.item_factors)
    cpu = np.diff(cpus)
    return {
        "s_iter": _after_first(secs),
        "cpu_iter": _after_first(cpu),
        "first_iter": secs[0],
        "fit": fit,
        "others": others,
        "rss_process": peak_rss_self(),
        "rss_before_fit": rss_data,
        "version": implicit.__version__,
    }


def implicit_run(info: dict, rank: int, use_cg: bool, args, factors: Path) -> dict:
    """implicit in a child process of its own, from dmf's initial item factors."""
    from dmf.config import load_config
    from dmf.store.layout import Store
    from dmf.train.state import initial_item_factors

    m = load_config(raw={"model": {"feedback": "implicit", "rank": rank, "dtype": "float32"}})
    init = factors.with_suffix(".init.npy")
    np.save(init, initial_item_factors(Store.open(info["store"]), m.model))
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        fut = ex.submit(
            implicit_child,
            info["export"],
            str(init),
            rank,
            use_cg,
            {
                "alpha": args.alpha,
                "reg": args.reg,
                "iters": args.iters,
                "threads": args.threads,
                "cg_steps": args.cg_steps,
            },
            str(factors),
        )
        return fut.result()


# -- Spark -----------------------------------------------------------------------------------------
def spark_jvm_pid() -> int | None:
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if "java" in p.name():
                return p.pid
        except psutil.Error:
            pass
    return None


def spark_runs(info: dict, ranks: list[int], args, spark_reg: float, fdir: Path, tag: str):
    """Every rank on one Spark session: (results by rank, JVM start seconds, BLAS, peaks)."""
    from bench_vs_spark import spark_blas
    from pyspark.ml.recommendation import ALS

    res: dict[int, dict] = {}
    with PeakRSS() as mem:
        t = time.perf_counter()
        spark = spark_session(args.threads, args.spark_memory, app="dmf-bench-implicit")
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
        jvm_start = time.perf_counter() - t
        blas = spark_blas(spark)
        jvm = spark_jvm_pid()
        t = time.perf_counter()
        train = spark.read.parquet(str(Path(info["export"]) / "train.parquet")).cache()
        train.count()
        load = time.perf_counter() - t

        def fit(rank: int, max_iter: int):
            als = ALS(
                rank=rank, maxIter=max_iter, regParam=spark_reg, implicitPrefs=True,
                alpha=args.alpha, userCol="user", itemCol="item", ratingCol="rating", seed=0,
            )  # fmt: skip
            cpu, busy0 = tree_cpu_seconds(), system_busy()
            t0 = time.perf_counter()
            model = als.fit(train)
            model.userFactors.count()  # the last half-step is lazy: inside the timing
            model.itemFactors.count()
            wall, used = time.perf_counter() - t0, tree_cpu_seconds() - cpu
            others.append(others_share(busy0, used, wall))
            return model, wall, used

        others: list[float] = []
        log(f"{tag}: Spark warm-up fit (rank {ranks[0]}, 1 iteration, untimed)")
        fit(ranks[0], 1)
        for rank in ranks:
            log(f"{tag}: Spark ALS implicitPrefs rank {rank}")
            _, t1, c1 = fit(rank, 1)
            model, tn, cn = fit(rank, args.iters)
            n = args.iters
            res[rank] = {
                "s_iter": (tn - t1) / (n - 1),
                "cpu_iter": (cn - c1) / (n - 1),
                "fit1": t1,
                "fit": tn,
                "others": others[-1],
            }
            save_spark_factors(model, info, fdir / f"spark-{rank}")
            del model
        train.unpersist()
        spark.stop()
    peaks = {"driver": mem.driver, "jvm": mem.of([jvm])[0] if jvm else 0, "total": mem.total}
    return res, {"jvm_start": jvm_start, "load": load, "blas": blas, **peaks}


def save_spark_factors(model, info: dict, base: Path) -> None:
    """Spark's factors as dense arrays by index (rows Spark never saw stay zero)."""
    for side, df, n in (
        ("U", model.userFactors, info["n_users"]),
        ("V", model.itemFactors, info["n_items"]),
    ):
        pdf = df.toPandas()
        x = np.zeros((n, model.rank), dtype=np.float32)
        if len(pdf):
            x[pdf["id"].to_numpy()] = np.stack(pdf["features"].to_numpy()).astype(np.float32)
        np.save(base.with_suffix(f".{side}.npy"), x)


# -- the run ---------------------------------------------------------------------------------------
def run_size(n: int, args, root: Path) -> dict:
    """Every system at every rank on one size; returns the size's results."""
    tag = label(n)
    info = prepare(n, args.items, root)
    large = n >= args.large_from
    iters = args.large_iterations if large else args.iterations
    args.iters = iters
    plan = [(r, s) for r in args.ranks for s in ("cholesky", "cg")]
    if large and args.large_runs:
        plan = [(int(x.split(":")[0]), x.split(":")[1]) for x in args.large_runs]
    cached = any(abs(n - float(c)) < 0.5 for c in args.cached_sizes)
    fdir = root / f"factors-{tag}"
    shutil.rmtree(fdir, ignore_errors=True)
    fdir.mkdir(parents=True)
    runs: list[dict] = []

    def add(system: str, rank: int, solver: str, blocks: str, r: dict, base: Path) -> None:
        runs.append({"system": system, "rank": rank, "solver": solver, "blocks": blocks,
                     "factors": str(base), **r})  # fmt: skip

    # dmf: one untimed warm-up fit, so that no run pays first-call costs the others do not
    log(f"{tag}: dmf warm-up (1 iteration, untimed)")
    warm = argparse.Namespace(**{**vars(args), "iters": 1})
    dmf_run(info["store"], plan[0][0], "cholesky", "never", warm, fdir / "model", fdir / "warm")
    for rank, solver in plan:
        for cache in ("never", "always") if cached else ("never",):
            log(f"{tag}: dmf rank {rank} {solver} cache_blocks {cache}")
            base = fdir / f"dmf-{solver}-{cache}-{rank}"
            r = dmf_run(info["store"], rank, solver, cache, args, fdir / "model", base)
            log(f"  {r['s_iter']:.2f} s/iter, {r['cpu_iter']:.2f} CPU s/iter")
            add("dmf", rank, solver, "on disk" if cache == "never" else "cached", r, base)
            gc.collect()
    shutil.rmtree(fdir / "model", ignore_errors=True)
    if not args.skip_implicit:
        for rank, solver in plan:
            log(f"{tag}: implicit rank {rank} use_cg={solver == 'cg'}")
            base = fdir / f"implicit-{solver}-{rank}"
            r = implicit_run(info, rank, solver == "cg", args, base)
            log(f"  {r['s_iter']:.2f} s/iter, {r['cpu_iter']:.2f} CPU s/iter")
            add("implicit", rank, solver, "in memory", r, base)
    n_train, n_rows = info["n_train"], info["n_users"] + info["n_items"]
    spark_reg = args.spark_reg or args.reg * n_rows / (2 * n_train)
    spark_info: dict[str, Any] = {"run": False}
    spark_ranks = sorted({r for r, _ in plan})
    if not args.skip_spark and any(abs(n - float(s)) < 0.5 for s in args.spark_sizes):
        res, spark_info = spark_runs(info, spark_ranks, args, spark_reg, fdir, tag)
        spark_info["run"] = True
        for rank, r in res.items():
            log(f"  Spark rank {rank}: {r['s_iter']:.2f} s/iter, {r['cpu_iter']:.2f} CPU s/iter")
            add("Spark", rank, "cholesky", "in memory", r, fdir / f"spark-{rank}")
    # Evaluation, after every fit, in a child process (the driver holds no data of its own).
    log(f"{tag}: evaluating every model on the same users")
    bases = [run.pop("factors") for run in runs]
    imp = {(r["rank"], r["solver"]): k for k, r in enumerate(runs) if r["system"] == "implicit"}
    pairs = [
        (k, imp[r["rank"], r["solver"]])
        for k, r in enumerate(runs)
        if r["system"] == "dmf" and (r["rank"], r["solver"]) in imp
    ]
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        ev = ex.submit(evaluate_child, info["export"], args.eval_users, bases, pairs).result()
    for run, m in zip(runs, ev["metrics"], strict=True):
        run["precision"], run["ndcg"] = m["precision"], m["ndcg"]
    for (a, _), (diff, se, fdiff) in zip(pairs, ev["pairs"], strict=True):
        runs[a].update(ndcg_diff=diff, ndcg_diff_se=se, factor_diff=fdiff)
    if not args.keep:
        shutil.rmtree(fdir, ignore_errors=True)
    return {
        "n": n,
        "label": tag,
        "iterations": iters,
        "info": info,
        "runs": runs,
        "popularity": ev["popularity"],
        "eval_users": ev["users"],
        "eval_candidates": ev["candidates"],
        "overlap": ev["overlap"],
        "spark_reg": spark_reg,
        "spark": spark_info,
        "spark_ranks": spark_ranks,
    }


# -- the page --------------------------------------------------------------------------------------
def find(runs: list[dict], **kw) -> dict | None:
    for r in runs:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def rss_cell(r: dict) -> str:
    if r["system"] == "dmf":
        w = " + ".join(gib(x) for x in r["rss_workers"])
        return f"driver {gib(r['rss_driver'])}, workers {w}"
    if r["system"] == "implicit":
        return f"process {gib(r['rss_process'])}"
    return "see below"


def spark_estimate(results: list[dict], res: dict, rank: int) -> str:
    """Spark at a size it did not run: its s/iter at the largest smaller size it ran, scaled by
    the train cells (its work per iteration, nnz k^2 + rows k^3, grows about linearly here: the
    users grow with the events, the items are at most 20k)."""
    done = [s for s in results if s["spark"].get("run") and s["n"] < res["n"]]
    sp, s = None, None
    for s in sorted(done, key=lambda x: -x["n"]):
        sp = find(s["runs"], system="Spark", rank=rank)
        if sp:
            break
    if sp is None:
        return "not run"
    scale = res["info"]["n_train"] / s["info"]["n_train"]
    est = sp["s_iter"] * scale
    total = (sp["fit1"] + sp["fit"]) * scale * res["iterations"] / s["iterations"]
    return (
        f"not run: estimated {est:.3g} s/iter ({sp['s_iter']:.3g} s at {s['label']} x "
        f"{scale:.3g}, the train cells' growth), {total / 60:.3g} min for its two timed fits"
    )


def render(results: list[dict], args, report: Report, started: float) -> None:
    rows, goal_rows, data_rows, mem_rows, spark_rows = [], [], [], [], []
    for res in results:
        info, tag = res["info"], res["label"]
        data_rows.append(
            [
                tag,
                f"{res['n']:,}",
                f"{info.get('distinct_pairs') or 0:,}",
                f"{info['n_users']:,} x {info['n_items']:,}",
                f"{info['n_train']:,}",
                f"{info['n_test']:,}",
                f"{res['eval_users']:,} of {res['eval_candidates']:,}",
                res["iterations"],
                info.get("synth_seconds", NAN),
                info.get("ingest_seconds", NAN),
                f"{info['store_bytes'] / 2**30:.2f}",
                "{} / {}".format(*info["store_blocks"]),
            ]
        )
        for r in res["runs"]:
            diff = f"{r['ndcg_diff']:+.1e} ± {r['ndcg_diff_se']:.1e}" if "ndcg_diff" in r else ""
            rows.append(
                [
                    tag,
                    r["rank"],
                    r["system"],
                    r["solver"],
                    r["blocks"],
                    r["s_iter"],
                    r["cpu_iter"],
                    r["fit"],
                    f"{r['others']:.0%}",
                    r["precision"],
                    r["ndcg"],
                    diff,
                    f"{r['factor_diff']:.1e}" if "factor_diff" in r else "",
                    rss_cell(r),
                ]
            )
        rows.append(
            [tag, "", "popularity", "", "", "", "", "", "", res["popularity"]["precision"],
             res["popularity"]["ndcg"], "", "", ""]
        )  # fmt: skip
        if not res["spark"].get("run"):
            for rank in res["spark_ranks"]:
                note = (
                    "skipped (--skip-spark)"
                    if args.skip_spark
                    else spark_estimate(results, res, rank)
                )
                rows.append([tag, rank, "Spark", "cholesky", "", note] + [""] * 8)
        else:
            s = res["spark"]
            spark_rows.append(
                [tag, s["jvm_start"], s["load"], gib(s["jvm"]), gib(s["driver"]), s["blas"],
                 f"{res['spark_reg']:.4g}"]
            )  # fmt: skip
        # the goals, rank by rank
        for rank in sorted({r["rank"] for r in res["runs"]}):
            for solver in ("cholesky", "cg"):
                d = find(res["runs"], system="dmf", rank=rank, solver=solver, blocks="on disk")
                i = find(res["runs"], system="implicit", rank=rank, solver=solver)
                dc = find(res["runs"], system="dmf", rank=rank, solver=solver, blocks="cached")
                sp = find(res["runs"], system="Spark", rank=rank)
                if d is None:
                    continue
                goal_rows.append(
                    [
                        tag,
                        rank,
                        solver,
                        d["s_iter"] / i["s_iter"] if i else NAN,
                        d["cpu_iter"] / i["cpu_iter"] if i else NAN,
                        dc["s_iter"] / i["s_iter"] if i and dc else NAN,
                        sp["s_iter"] / d["s_iter"] if sp and solver == "cholesky" else NAN,
                        sp["cpu_iter"] / d["cpu_iter"] if sp and solver == "cholesky" else NAN,
                        sp["cpu_iter"] / dc["cpu_iter"] if sp and dc and solver == "cholesky"
                        else NAN,
                        f"{d['ndcg'] / i['ndcg'] - 1:+.2%}" if i else "",
                        f"{d['precision'] / i['precision'] - 1:+.2%}" if i else "",
                    ]
                )  # fmt: skip
        for r in res["runs"]:
            if r["system"] == "implicit":
                mem_rows.append(
                    [tag, r["rank"], r["solver"], gib(r["rss_before_fit"]), gib(r["rss_process"])]
                )
    report.add(
        f"Same machine, one run, one system at a time. Cores: {args.threads} (dmf: LocalCluster "
        f"{args.threads} workers x 1 thread, a fresh cluster per fit; implicit: num_threads "
        f"{args.threads}; Spark: local[{args.threads}], spark.driver.memory "
        f"{args.spark_memory}). alpha = {args.alpha}, reg = {args.reg} (dmf and implicit: "
        f"plain, the same for every row), cg_steps = {args.cg_steps}; float32 factors. "
        f"Iterations fixed (no early stopping): {args.iterations} at sizes below "
        f"{args.large_from:,.0f} events, {args.large_iterations} from it. Whole run "
        f"{(time.perf_counter() - started) / 60:.1f} min."
    )
    report.add("## Seconds per iteration, ranking quality, peak memory")
    report.add(
        "*s/iter* and *CPU s/iter* exclude the first iteration (see above); *fit s* is the whole "
        "fit (dmf: `train()` with the model written; implicit: `fit()`; Spark: the fit of n "
        "iterations). *NDCG vs implicit*: dmf's NDCG@10 minus implicit's (same solver), mean of "
        "the per-user differences ± its standard error. *factor diff*: the largest difference "
        "between dmf's and implicit's factors relative to the largest factor (both start from "
        "the same factors; Cholesky: the same arithmetic up to float32 rounding). *others' CPU*: "
        "the share of the machine's cores used by processes outside this benchmark during the "
        "fit (the machine is shared; a high share inflates wall seconds, not CPU seconds). Peak "
        "RSS in GiB."
    )
    report.add(
        md_table(
            [
                "events",
                "rank",
                "system",
                "solver",
                "rating blocks",
                "s/iter",
                "CPU s/iter",
                "fit s",
                "others' CPU",
                "P@10",
                "NDCG@10",
                "NDCG vs implicit",
                "factor diff",
                "peak RSS",
            ],
            rows,
        )  # fmt: skip
    )
    report.add("## Against the goals")
    report.add(
        "Goals of the issue: (1) at least 10x faster than Spark per core: Spark CPU s/iter / dmf "
        "CPU s/iter >= 10 (Cholesky, as Spark solves); (2) within 1.5x of implicit's in-memory "
        "speed while out of core: dmf (blocks on disk) s/iter / implicit s/iter <= 1.5, solver "
        "against solver; (3) the same ranking quality as implicit: the relative difference of "
        "NDCG@10 and P@10 (dmf on disk against implicit, same solver)."
    )
    report.add(
        md_table(
            [
                "events",
                "rank",
                "solver",
                "dmf on disk / implicit (s/iter)",
                "same, CPU s",
                "dmf cached / implicit (s/iter)",
                "Spark / dmf on disk (s/iter)",
                "Spark / dmf on disk (CPU s)",
                "Spark / dmf cached (CPU s)",
                "NDCG@10 dmf vs implicit",
                "P@10 dmf vs implicit",
            ],
            goal_rows,
        )  # fmt: skip
    )
    report.add("## Data")
    report.add(
        md_table(
            [
                "events",
                "event rows",
                "distinct pairs",
                "users x items",
                "train cells",
                "test cells",
                "users evaluated",
                "iterations",
                "synth s",
                "ingest s",
                "store GiB",
                "blocks (user / item)",
            ],
            data_rows,
        )  # fmt: skip
    )
    report.add(
        "Each size: `dmf synth --implicit --users U --items I --ratings N --seed 0`, then `dmf "
        "ingest` with `split: {method: user, test: 0.1, validation: 0, seed: 42}` and "
        "`model.feedback: implicit` (repeated rows summed). *train cells*: user-item pairs with "
        "summed counts r, what every system fits; *test cells*: held-out pairs (held-out cells "
        "that are also train cells: "
        + ", ".join(f"{r['label']}: {r['overlap']}" for r in results)
        + "). Synth and ingest seconds are those of the run that made the data (reused after)."
    )
    if spark_rows:
        report.add("## Spark")
        report.add(
            md_table(
                [
                    "events",
                    "JVM start s",
                    "read + cache s",
                    "JVM peak RSS GiB",
                    "driver (python) peak GiB",
                    "BLAS (netlib)",
                    "regParam",
                ],
                spark_rows,
            )  # fmt: skip
        )
        report.add(
            "regParam = reg x (users + items) / (2 x train cells): Spark scales it by each "
            "row's number of events, so a row with the mean count gets dmf's penalty; a row "
            "with more events more (a popular item far more). Spark starts from its own random "
            "factors. Its JVM peak includes a heap sized by spark.driver.memory, grown lazily."
        )
    if mem_rows:
        report.add("## implicit's memory")
        report.add(
            md_table(
                [
                    "events",
                    "rank",
                    "solver",
                    "peak before fit (data loaded) GiB",
                    "peak of the process GiB",
                ],
                mem_rows,
            )  # fmt: skip
        )
    report.add(embed_data("implicit", {"results": results, "args": vars(args)}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1e7", "1e8"], help="events (rows) per size")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--iterations", type=int, default=5, help="below --large-from")
    p.add_argument("--large-from", type=float, default=5e7, help="sizes from here are 'large'")
    p.add_argument("--large-iterations", type=int, default=3)
    p.add_argument(
        "--large-runs",
        nargs="*",
        default=[],
        help="RANK:SOLVER fits of dmf and implicit at large sizes, e.g. 64:cholesky 128:cg "
        "(default: every rank x solver)",
    )
    p.add_argument("--items", type=int, default=None, help="items (default min(20000, n/500))")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--reg", type=float, default=1.0, help="dmf's and implicit's (plain) lambda")
    p.add_argument("--spark-reg", type=float, default=None, help="default: see the docstring")
    p.add_argument("--cg-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="cores given to each system")
    p.add_argument("--cached-sizes", nargs="*", default=["1e7"], help="dmf also cached here")
    p.add_argument("--spark-sizes", nargs="*", default=["1e7"], help="Spark runs at these")
    p.add_argument("--spark-memory", default="10g")
    p.add_argument("--skip-spark", action="store_true")
    p.add_argument("--skip-implicit", action="store_true")
    p.add_argument("--eval-users", type=int, default=20_000)
    p.add_argument("--quick", action="store_true", help="1M events, 3 iterations, all systems")
    p.add_argument("--root", default="runs/bench/implicit", help="data and factors are kept here")
    p.add_argument("--keep", action="store_true", help="keep the factor files")
    p.add_argument("--doc", default=None, help="write here instead of docs/benchmarks_implicit.md")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.iterations = ["1e6"], 3
        args.cached_sizes = args.spark_sizes = ["1e6"]
    if min(args.iterations, args.large_iterations) < 2:
        p.error("at least 2 iterations: s/iter leaves the first out")
    sizes = [int(float(s)) for s in args.sizes]
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    report = Report(
        "Benchmark: implicit feedback, dmf against implicit and Spark ALS"
        + (" (quick run)" if args.quick else ""),
        intro=__doc__.split("Writes docs")[0].strip(),
    )
    started = time.perf_counter()
    results = []
    for n in sizes:
        results.append(run_size(n, args, root))
        free = shutil.disk_usage(root).free
        log(f"{label(n)} done; {free / 2**30:.0f} GiB free on {root}")
    render(results, args, report, started)
    if args.doc:
        out = Path(args.doc)
        text = report.render()
        if out.is_file() and (at := out.read_text().find(ANALYSIS)) >= 0:
            text = text.rstrip("\n") + "\n\n" + out.read_text()[at:]
        out.write_text(text)
    else:
        out = report.write("implicit")
    log(f"wrote {out}")
    print(report.render())


if __name__ == "__main__":
    main()
