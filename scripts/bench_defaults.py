"""Does a user who changes nothing get a good model? dmf's defaults against a tuned grid, a
biases-only model, dmf's old defaults, and the peers' defaults, on realistic explicit ratings.

Data sets (``--data``):

- ``realistic-100k``: the REALISTIC spec of ``tests/conftest.py`` (that of ``tests/test_defaults.py``) (3,000 users x 1,500
  items, 100k ratings: heavy-tailed users and items, few ratings per user, a rank-4 signal plus
  a tail of 40 more dimensions, noise, whole stars in [1, 5]), written by ``dmf synth``;
- ``realistic-1m``: the same spec scaled to 30,000 users x 6,000 items and 1M ratings (every
  other setting the same, so about as many ratings per user);
- ``ml-100k``, ``ml-1m``: MovieLens 100K / 1M when ``data/ml-100k/u.data`` /
  ``data/ml-1m/ratings.dat`` exist (``dmf data movielens 100k|1m``); skipped with a note if not.

Each data set is ingested once by dmf with the default split (random; validation 0.05, test
0.1; seed 42) and the default blocks, and that one split is exported to Parquet (raw ids) for the
peers: ``train.parquet``, ``validation.parquet``, ``test.parquet``. Test (and validation) pairs
whose user or item has no train rating are dropped for every system alike.

What each system trains on: every dmf row fits the store's train split (85% of the ratings) and
uses the validation split (5%) only to stop early and keep the best iteration. The peers have no
use for a validation split at their defaults, so their main rows train on train + validation
(90%), as a user of them would; that favours the peers. Their "train only" rows fit exactly the
ratings dmf fits.

Rows (per data set; every dmf fit on one LocalCluster of 2 worker processes x 1 thread):

1. **dmf defaults**: empty ``model`` and ``train`` sections (rank 10, ALS-WR reg 0.1, predictions
   clipped, early stopping with patience 3 keeping the best iteration);
2. **dmf old defaults**: rank 10, reg 0.1, ``weighted_reg: false``, 10 iterations, no early
   stopping, no clipping;
3. **biases only**: rank 0, ``reg_bias`` in {1, 3, 10} (``weighted_reg: false``), the best by
   test RMSE;
4. **tuned grid**: ALS-WR rank {10, 32, 64} x reg {0.05, 0.07, 0.1, 0.15, 0.2}, plus unweighted
   rank 32 reg {5, 15} with reg_bias 3; every point with the default train section (early
   stopping picks its iteration) and clipping. The best point by *test* RMSE (this favours the
   grid: it is picked on the very ratings it is scored on) and the point picked by validation
   RMSE (what a user could do);
5. **Spark MLlib ALS** at its defaults (rank 10, regParam 0.1, maxIter 10, no biases;
   coldStartStrategy "drop") in ``local[2]``, when pyspark imports;
6. **Surprise SVD** at its defaults (100 factors, 20 epochs of SGD, lr 0.005, reg 0.02, biases;
   ``random_state=0`` for repeatability), when ``surprise`` imports (single-threaded).
   LensKit is not run: every LensKit release either needs torch (2025.x: ``torch~=2.4`` and
   ``pandas~=2.0``) or ``numba<0.59`` (0.14.x), which dmf's ``numba>=0.60`` excludes.

Every test RMSE is computed here from the predictions, the same way for every row: *unclipped*
(the raw score) and *clipped* with ``np.clip`` to the train ratings' range. *As delivered* is
what the system gives a user at its defaults: clipped for dmf's defaults, the grid and Surprise
(whose ``predict`` clips to the rating scale), unclipped for dmf's old defaults and Spark.
Seconds are the wall seconds of the fit (dmf: ``train()`` on the running cluster, model written;
Spark: ``ALS.fit`` with the factors materialised, JVM start and reading the Parquet apart;
Surprise: ``SVD.fit``).

Writes docs/benchmarks_defaults.md. ``--quick``: realistic-100k only.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from bench_common import REPO, Report, embed_data, log, md_table, spark_session  # noqa: E402

NAN = float("nan")

# ALS-WR over rank and reg; the unweighted penalties tuning found best on MovieLens.
GRID = [
    *(
        {"rank": r, "reg": lam, "weighted_reg": True}
        for r in (10, 32, 64)
        for lam in (0.05, 0.07, 0.1, 0.15, 0.2)
    ),
    *({"rank": 32, "reg": lam, "reg_bias": 3.0, "weighted_reg": False} for lam in (5.0, 15.0)),
]
BIASES_ONLY = [{"rank": 0, "reg_bias": rb, "weighted_reg": False} for rb in (1.0, 3.0, 10.0)]
OLD_MODEL = {"rank": 10, "reg": 0.1, "weighted_reg": False, "clip": False}
OLD_TRAIN = {"iterations": 10, "early_stopping": None}
ALL_DATA = ["realistic-100k", "realistic-1m", "ml-100k", "ml-1m"]


# -- data ------------------------------------------------------------------------------------------
def realistic_spec() -> dict:
    """REALISTIC of tests/conftest.py, the data of tests/test_defaults.py (read from the file,
    so the two never drift)."""
    path = REPO / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_dmf_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.REALISTIC)


def data_config(name: str, root: Path) -> tuple[str, dict] | None:
    """(label, raw config of the data and store) of data set ``name``; None when absent."""
    store = {"path": str(root / "store"), "overwrite": True}
    if name.startswith("realistic"):
        spec = realistic_spec()
        if name == "realistic-1m":
            spec.update(n_users=30_000, n_items=6_000, n_ratings=1_000_000)
        n = spec["n_ratings"]
        label = f"realistic {n / 1e6:g}M" if n >= 1e6 else f"realistic {n // 1000}k"
        return label, {
            "synth": {**spec, "enabled": True, "path": str(root / "synth")},
            "store": store,
        }
    files = {
        "ml-100k": ("ml-100k", "u.data", "movielens-100k", "MovieLens 100K"),
        "ml-1m": ("ml-1m", "ratings.dat", "movielens-1m", "MovieLens 1M"),
    }
    d, f, preset, label = files[name]
    src = REPO / "data" / d / f
    if not src.is_file():
        return None
    return label, {"data": {"preset": preset, "source": str(src)}, "store": store}


def export_split(store, out: Path) -> dict:
    """The store's train, validation and test ratings with raw ids, to out/*.parquet; held-out
    pairs whose user or item has no train rating are dropped. Returns counts and the train
    ratings' range."""
    out.mkdir(parents=True, exist_ok=True)
    uid = store.ids("user").to_numpy(zero_copy_only=False)
    iid = store.ids("item").to_numpy(zero_copy_only=False)
    ucount, icount = store.counts("user"), store.counts("item")
    us, its, rs = [], [], []
    for b in range(store.n_blocks("user")):
        blk = store.read_block("user", b)
        us.append(blk.start + np.repeat(np.arange(blk.n_rows), np.diff(blk.indptr)))
        its.append(blk.cols.astype(np.int64))
        rs.append(blk.vals.astype(np.float32))
    parts = {"train": (np.concatenate(us), np.concatenate(its), np.concatenate(rs))}
    dropped = {}
    for name in ("validation", "test"):
        t = store.read_split(name)
        u = t.column("user").to_numpy().astype(np.int64)
        i = t.column("item").to_numpy().astype(np.int64)
        r = t.column("rating").to_numpy().astype(np.float32)
        known = (u >= 0) & (i >= 0)
        known[known] &= (ucount[u[known]] > 0) & (icount[i[known]] > 0)
        dropped[name] = int((~known).sum())
        parts[name] = (u[known], i[known], r[known])
    small = all(
        np.issubdtype(a.dtype, np.integer) and (len(a) == 0 or int(np.abs(a).max()) < 2**31)
        for a in (uid, iid)
    )
    for name, (u, i, r) in parts.items():
        ru, ri = uid[u], iid[i]
        if small:  # Spark's ALS wants int ids
            ru, ri = ru.astype(np.int32), ri.astype(np.int32)
        tab = pa.table({"user": ru, "item": ri, "rating": pa.array(r, pa.float32())})
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(tab, tmp)
        os.replace(tmp, out / f"{name}.parquet")
    tr = parts["train"][2]
    return {
        "train": len(tr),
        "validation": len(parts["validation"][2]),
        "test": len(parts["test"][2]),
        "dropped": dropped,
        "range": (float(tr.min()), float(tr.max())),
        "users": int((ucount > 0).sum()),
        "items": int((icount > 0).sum()),
        "int_ids": small,
    }


def read_pairs(split_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(split_dir / f"{name}.parquet")
    return (
        t.column("user").to_numpy(zero_copy_only=False),
        t.column("item").to_numpy(zero_copy_only=False),
        t.column("rating").to_numpy().astype(np.float64),
    )


def metrics(pred: np.ndarray, r: np.ndarray, lo: float, hi: float) -> dict:
    clipped = np.clip(pred, lo, hi)
    return {
        "rmse_raw": float(np.sqrt(np.mean((pred - r) ** 2))),
        "rmse_clip": float(np.sqrt(np.mean((clipped - r) ** 2))),
        "mae_raw": float(np.mean(np.abs(pred - r))),
        "mae_clip": float(np.mean(np.abs(clipped - r))),
    }


# -- dmf -------------------------------------------------------------------------------------------
def dmf_fit(store, client, base: dict, model: dict, train_: dict, out: Path, split_dir, rng):
    """Fit dmf with ``model``/``train_`` over the defaults; test and validation metrics from
    ``Model.predict`` (unclipped, clipped here)."""
    from dmf.config import load_config
    from dmf.train.loop import train

    cfg = load_config(
        raw={
            **base,
            "model": model,
            "train": {**train_, "checkpoint_every": 0, "progress": "off"},
            "output": {"model": str(out), "plot": False, "overwrite": True},
        }
    )
    t = time.perf_counter()
    fitted = train(store, cfg, client=client, quiet=True, fresh=True)
    seconds = time.perf_counter() - t
    doc = json.loads((out / "model.json").read_text())
    res = {
        "seconds": seconds,
        "iterations": len(fitted.history),
        "kept": doc.get("best_iteration") or len(fitted.history),
        "max_iterations": cfg.train.iterations,
        "clip": bool(getattr(cfg.model, "clip", False)),
    }
    lo, hi = rng
    for name in ("test", "validation"):
        u, i, r = read_pairs(split_dir, name)
        if len(r) == 0:
            continue
        try:
            pred = fitted.predict(u, i, clip=False)
        except TypeError:  # a Model.predict without clip=: it never clips
            pred = fitted.predict(u, i)
        m = metrics(np.asarray(pred, dtype=np.float64), r, lo, hi)
        if name == "test":
            res.update(m)
        else:
            res["val_rmse_clip"] = m["rmse_clip"]
            res["val_rmse_raw"] = m["rmse_raw"]
    del fitted
    gc.collect()
    return res


def _fit_in(store, client, base, models: Path, split_dir, rng, tag: str, model, train_):
    """:func:`dmf_fit` into ``models/tag``."""
    return dmf_fit(store, client, base, model, train_, models / tag, split_dir, rng)


# -- peers -----------------------------------------------------------------------------------------
def spark_fit(spark, split_dir: Path, with_validation: bool, rng, max_iter: int | None = None):
    """Spark's ALS at its defaults (rank 10, maxIter 10, regParam 0.1, no biases), dropping
    cold pairs; ``max_iter`` only for the untimed warm-up."""
    from pyspark.ml.recommendation import ALS

    t = time.perf_counter()
    train = spark.read.parquet(str(split_dir / "train.parquet"))
    if with_validation:
        train = train.union(spark.read.parquet(str(split_dir / "validation.parquet")))
    train = train.cache()
    n = train.count()
    test = spark.read.parquet(str(split_dir / "test.parquet")).cache()
    test.count()
    load = time.perf_counter() - t
    als = ALS(userCol="user", itemCol="item", ratingCol="rating", coldStartStrategy="drop")
    if max_iter is not None:
        als.setMaxIter(max_iter)
    t = time.perf_counter()
    model = als.fit(train)
    model.userFactors.count()  # fit() leaves the last step lazy: materialise it in the timing
    model.itemFactors.count()
    seconds = time.perf_counter() - t
    scored = model.transform(test).select("rating", "prediction")
    if hasattr(scored, "toArrow"):
        tab = scored.toArrow()
        r = tab.column("rating").to_numpy().astype(np.float64)
        pred = tab.column("prediction").to_numpy().astype(np.float64)
    else:
        df = scored.toPandas()
        r, pred = df["rating"].to_numpy(np.float64), df["prediction"].to_numpy(np.float64)
    train.unpersist()
    test.unpersist()
    res = metrics(pred, r, *rng)
    res.update(
        seconds=seconds,
        load=load,
        iterations=als.getMaxIter(),
        kept=als.getMaxIter(),
        n_train=n,
        scored=len(r),
        params=f"rank {als.getRank()}, regParam {als.getRegParam()}, maxIter {als.getMaxIter()}",
    )
    return res


def surprise_fit(split_dir: Path, with_validation: bool, rng) -> dict:
    import pandas as pd
    from surprise import SVD, Dataset, Reader

    names = ["train", "validation"] if with_validation else ["train"]
    df = pd.concat([pq.read_table(split_dir / f"{n}.parquet").to_pandas() for n in names])
    lo, hi = rng
    data = Dataset.load_from_df(df[["user", "item", "rating"]], Reader(rating_scale=(lo, hi)))
    trainset = data.build_full_trainset()
    algo = SVD(random_state=0)
    t = time.perf_counter()
    algo.fit(trainset)
    seconds = time.perf_counter() - t
    # SVD.estimate, vectorised: mu + b_u + b_i + p_u . q_i (every test pair is known).
    u, i, r = read_pairs(split_dir, "test")
    iu = np.array([trainset.to_inner_uid(x) for x in u.tolist()])
    ii = np.array([trainset.to_inner_iid(x) for x in i.tolist()])
    pred = (
        trainset.global_mean
        + algo.bu[iu]
        + algo.bi[ii]
        + np.einsum("ij,ij->i", algo.pu[iu], algo.qi[ii])
    )
    res = metrics(pred, r, lo, hi)
    res.update(
        seconds=seconds,
        iterations=algo.n_epochs,
        kept=algo.n_epochs,
        n_train=len(df),
        params=f"n_factors {algo.n_factors}, n_epochs {algo.n_epochs}, lr 0.005, reg 0.02",
    )
    return res


def peer_available(mod: str) -> str | None:
    """None if ``mod`` imports, else why not."""
    try:
        __import__(mod)
        return None
    except Exception as exc:  # noqa: BLE001 - reported in the page
        return f"{type(exc).__name__}: {exc}"


# -- report ----------------------------------------------------------------------------------------
def f4(x: float) -> str:
    return "-" if x is None or x != x else f"{x:.4f}"


def pct(a: float, b: float) -> str:
    """(a - b) / b in percent, signed."""
    return "-" if a != a or b != b else f"{100 * (a - b) / b:+.2f}%"


def grid_label(g: dict) -> str:
    if g["rank"] == 0:
        return f"rank 0 (biases only), reg_bias {g['reg_bias']:g}"
    s = f"rank {g['rank']}, reg {g['reg']:g}"
    if not g.get("weighted_reg", True):
        s += f", unweighted, reg_bias {g.get('reg_bias', g['reg']):g}"
    else:
        s += ", ALS-WR"
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", nargs="+", default=ALL_DATA, choices=ALL_DATA)
    p.add_argument("--quick", action="store_true", help="realistic-100k only")
    p.add_argument("--workers", type=int, default=2, help="dmf workers (1 thread each)")
    p.add_argument("--spark-memory", default="4g", help="spark.driver.memory")
    p.add_argument("--skip-spark", action="store_true")
    p.add_argument("--skip-surprise", action="store_true")
    p.add_argument("--root", default="runs/bench/defaults", help="data, stores and models")
    p.add_argument("--out", default="defaults", help="writes docs/benchmarks_<out>.md")
    args = p.parse_args(argv)
    names = ["realistic-100k"] if args.quick else args.data
    root = Path(args.root)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    report = Report(
        "Benchmark: the defaults, against a tuned grid and the peers' defaults",
        intro=__doc__.split("Writes docs")[0].strip(),
    )
    notes: list[str] = []
    why_spark = "--skip-spark" if args.skip_spark else peer_available("pyspark")
    why_surprise = "--skip-surprise" if args.skip_surprise else peer_available("surprise")
    if why_spark:
        notes.append(f"Spark MLlib ALS not run: {why_spark}.")
    if why_surprise:
        notes.append(f"Surprise SVD not run: {why_surprise}.")
    peer_versions = {
        "pyspark": "not run" if why_spark else __import__("pyspark").__version__,
        "scikit-surprise": "not run" if why_surprise else __import__("surprise").__version__,
        "lenskit": "not installed (needs torch~=2.4 and pandas~=2.0, or numba<0.59 for 0.14.x)",
    }

    datasets = []
    for name in names:
        dc = data_config(name, root / name)
        if dc is None:
            msg = f"{name}: skipped, its file is not in data/ (run `dmf data movielens {name[3:]}`)"
            log(msg)
            notes.append(msg.replace("skipped", "not run") + "; it cannot be downloaded here.")
            continue
        datasets.append((name, *dc))

    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        env=BLAS_ENV,
    )
    client = Client(cluster)
    spark = None
    jvm_start = NAN
    results: dict[str, dict] = {}
    try:
        warmed = False
        for name, label, raw in datasets:
            from dmf.cli.train import prepare_store
            from dmf.config import load_config

            d = root / name
            log(f"{label}: synth (if needed) and ingest with the default split")
            t = time.perf_counter()
            store = prepare_store(load_config(raw=raw), None, quiet=True)
            ingest_s = time.perf_counter() - t
            split_dir = d / "split"
            info = export_split(store, split_dir)
            rng = info["range"]
            log(
                f"{label}: {info['train']:,} train, {info['validation']:,} validation, "
                f"{info['test']:,} test ratings; blocks {store.n_blocks('user')}/"
                f"{store.n_blocks('item')}; range {rng}"
            )
            info.update(
                label=label,
                ingest_seconds=ingest_s,
                blocks=(store.n_blocks("user"), store.n_blocks("item")),
                spec=raw.get("synth") or raw.get("data"),
            )
            models = d / "models"
            base = {"store": {"path": raw["store"]["path"]}}
            if "data" in raw:
                base["data"] = raw["data"]
            fit = functools.partial(_fit_in, store, client, base, models, split_dir, rng)
            if not warmed:  # imports and first calls on the workers, untimed
                fit("warm-up", {}, {"iterations": 1})
                warmed = True
            rows: dict[str, dict] = {}
            log(f"{label}: dmf defaults")
            rows["defaults"] = fit("defaults", {}, {})
            log(f"{label}: dmf old defaults")
            rows["old"] = fit("old", OLD_MODEL, OLD_TRAIN)
            rows["biases"] = []
            for k, g in enumerate(BIASES_ONLY):
                log(f"{label}: biases only, reg_bias {g['reg_bias']:g}")
                rows["biases"].append({**fit(f"bias{k}", g, {}), "params": g})
            rows["grid"] = []
            for k, g in enumerate(GRID):
                log(f"{label}: grid {grid_label(g)}")
                rows["grid"].append({**fit(f"grid{k}", g, {}), "params": g})
            if not why_spark:
                from bench_vs_spark import spark_blas

                if spark is None:
                    t = time.perf_counter()
                    spark = spark_session(args.workers, args.spark_memory, "dmf-bench-defaults")
                    jvm_start = time.perf_counter() - t
                    info_blas = spark_blas(spark)
                    log(f"Spark BLAS: {info_blas}")
                    notes.append(f"Spark's BLAS/LAPACK (netlib): {info_blas}.")
                    spark_fit(spark, split_dir, True, rng, max_iter=1)  # JIT warm-up, untimed
                for wv in (True, False):
                    log(f"{label}: Spark ALS defaults, train{' + validation' if wv else ' only'}")
                    rows[f"spark{'+val' if wv else ''}"] = spark_fit(spark, split_dir, wv, rng)
            if not why_surprise:
                for wv in (True, False):
                    log(
                        f"{label}: Surprise SVD defaults, train{' + validation' if wv else ' only'}"
                    )
                    rows[f"surprise{'+val' if wv else ''}"] = surprise_fit(split_dir, wv, rng)
            results[name] = {"info": info, "rows": rows}
            shutil.rmtree(models, ignore_errors=True)
            del store
            gc.collect()
    finally:
        if spark is not None:
            spark.stop()
        client.close()
        cluster.close()
        shutil.rmtree("spark-warehouse", ignore_errors=True)

    total = time.perf_counter() - started
    load = (load_start, os.getloadavg()[0])
    render(report, results, notes, peer_versions, jvm_start, args, total, load)
    path = report.write(args.out)
    log(f"wrote {path} ({total:.0f} s in all)")


def render(report, results, notes, peer_versions, jvm_start, args, total, load) -> None:
    report.add(
        f"dmf: one LocalCluster of {args.workers} worker processes x 1 thread for every fit, after "
        "one untimed warm-up fit. Spark: `local[2]`, JVM started once "
        f"({jvm_start:.1f} s, not counted), one untimed warm-up fit of 1 iteration (the JIT); "
        "its fit seconds leave out reading the Parquet. Surprise: one thread. "
        f"Whole run: {total:.0f} s. Load average (1 min) at the start {load[0]:.2f}, at the end "
        f"{load[1]:.2f} on {os.cpu_count()} cores: above about {args.workers}, other jobs "
        "shared the machine and the seconds are inflated (the RMSEs are not affected)."
    )
    report.add(md_table(["peer", "version"], peer_versions.items()))
    summary = []
    for res in results.values():
        info, rows = res["info"], res["rows"]
        label = info["label"]
        best_bias = min(rows["biases"], key=lambda r: r["rmse_clip"])
        best_grid = min(rows["grid"], key=lambda r: r["rmse_clip"])
        val_grid = min(rows["grid"], key=lambda r: r["val_rmse_clip"])
        dflt, old = rows["defaults"], rows["old"]
        lo, hi = info["range"]
        report.add(f"## {label}")
        spec = info["spec"]
        report.add(
            f"{info['users']:,} users and {info['items']:,} items with train ratings; "
            f"**{info['train']:,} train, {info['validation']:,} validation, {info['test']:,} test** "
            f"ratings (held-out pairs dropped for an unknown user or item: "
            f"validation {info['dropped']['validation']}, test {info['dropped']['test']}); "
            f"blocks per side (users/items) {info['blocks'][0]}/{info['blocks'][1]}; ratings in "
            f"[{lo:g}, {hi:g}]; store ready in {info['ingest_seconds']:.1f} s (synth and ingest, or "
            "the store kept from an earlier run)."
            f"\n\nData: `{json.dumps(spec, default=str)}`"
        )

        def row(what, r, delivered_clip, trains_on, params):
            delivered = r["rmse_clip"] if delivered_clip else r["rmse_raw"]
            mae = r["mae_clip"] if delivered_clip else r["mae_raw"]
            it = f"{r['iterations']}" + (
                f" (kept {r['kept']})" if r.get("kept") not in (None, r["iterations"]) else ""
            )
            return [
                what,
                params,
                trains_on,
                f"**{f4(delivered)}**",
                f4(r["rmse_raw"]),
                f4(r["rmse_clip"]),
                f4(mae),
                f4(r.get("val_rmse_clip", NAN)),
                it,
                f"{r['seconds']:.1f}",
            ]

        dmf_on = "train (validation: stopping)"
        table = [
            row(
                "1. dmf defaults",
                dflt,
                True,
                dmf_on,
                f"rank 10, ALS-WR reg 0.1, clip, early stopping (max {dflt['max_iterations']})",
            ),
            row(
                "2. dmf old defaults",
                old,
                False,
                "train (validation unused)",
                "rank 10, unweighted reg 0.1, 10 iterations, no clip",
            ),
            row(
                "3. best biases-only (by test)",
                best_bias,
                True,
                dmf_on,
                f"rank 0, reg_bias {best_bias['params']['reg_bias']:g}",
            ),
            row(
                "4a. best of grid (by test)",
                best_grid,
                True,
                dmf_on,
                grid_label(best_grid["params"]),
            ),
            row(
                "4b. grid point by validation",
                val_grid,
                True,
                dmf_on,
                grid_label(val_grid["params"]),
            ),
        ]
        for key, what, clip in (
            ("spark+val", "5. Spark ALS defaults", False),
            ("spark", "5'. Spark ALS defaults", False),
            ("surprise+val", "6. Surprise SVD defaults", True),
            ("surprise", "6'. Surprise SVD defaults", True),
        ):
            if key in rows:
                r = rows[key]
                on = "train + validation" if key.endswith("+val") else "train"
                table.append(row(what, r, clip, on, r["params"]))
        report.add(
            md_table(
                [
                    "row",
                    "settings",
                    "trains on",
                    "test RMSE as delivered",
                    "test RMSE unclipped",
                    "test RMSE clipped",
                    "test MAE as delivered",
                    "validation RMSE clipped",
                    "iterations run",
                    "fit s",
                ],
                table,
            )
        )
        gap = pct(dflt["rmse_clip"], best_grid["rmse_clip"])
        gap_val = pct(dflt["rmse_clip"], val_grid["rmse_clip"])
        margin_b = 100 * (best_bias["rmse_clip"] - dflt["rmse_clip"]) / best_bias["rmse_clip"]
        line = (
            f"**Defaults against the tuned best:** {f4(dflt['rmse_clip'])} against "
            f"{f4(best_grid['rmse_clip'])} ({grid_label(best_grid['params'])}): the defaults are "
            f"{gap} off the best grid point picked by test RMSE, and {gap_val} off the point "
            f"picked by validation RMSE ({f4(val_grid['rmse_clip'])}). "
            f"**Over biases-only:** the best biases-only model scores "
            f"{f4(best_bias['rmse_clip'])}: the defaults are {margin_b:.2f}% lower. "
            f"The old defaults score "
            f"{f4(old['rmse_raw'])} unclipped ({f4(old['rmse_clip'])} clipped), "
            f"{pct(old['rmse_raw'], best_bias['rmse_clip'])} against biases-only."
        )
        for key, who in (("spark+val", "Spark ALS"), ("surprise+val", "Surprise SVD")):
            if key in rows:
                r = rows[key]
                deliv = r["rmse_clip"] if who.startswith("Surprise") else r["rmse_raw"]
                line += (
                    f" {who} at its defaults (train + validation): {f4(deliv)} as delivered; "
                    f"dmf's defaults are {pct(dflt['rmse_clip'], deliv)} against it."
                )
        first = [r for r in rows["grid"] if r["kept"] == 1 and r["iterations"] > 1]
        if first:
            line += (
                f" Early stopping kept iteration 1 for {len(first)} of the "
                f"{len(rows['grid'])} grid points ("
                + "; ".join(grid_label(r["params"]) for r in first)
                + f"): no later iteration up to {max(r['iterations'] for r in first)} had a "
                "better validation RMSE, so they stopped there and kept a model of one "
                "iteration."
            )
        capped = dflt["iterations"] >= dflt["max_iterations"]
        line += (
            f" The defaults ran {dflt['iterations']} of at most {dflt['max_iterations']} "
            f"iterations, keeping iteration {dflt['kept']}"
            + (" (still improving when the iteration cap stopped them)." if capped else ".")
        )
        report.add(line)
        within = dflt["rmse_clip"] <= 1.01 * best_grid["rmse_clip"]
        summary.append(
            [
                label,
                f"{info['train']:,}",
                f4(dflt["rmse_clip"]),
                f4(best_grid["rmse_clip"]),
                gap,
                f4(val_grid["rmse_clip"]),
                gap_val,
                f4(best_bias["rmse_clip"]),
                f"{margin_b:.2f}%",
                f4(old["rmse_raw"]),
                f4(rows["spark+val"]["rmse_raw"]) if "spark+val" in rows else "-",
                f4(rows["surprise+val"]["rmse_clip"]) if "surprise+val" in rows else "-",
                "yes" if within else "**no**",
            ]
        )
        grid_rows = [
            [
                grid_label(r["params"]),
                f4(r["rmse_clip"]),
                f4(r["rmse_raw"]),
                f4(r["mae_clip"]),
                f4(r["val_rmse_clip"]),
                f"{r['iterations']}"
                + (f" (kept {r['kept']})" if r["kept"] != r["iterations"] else ""),
                f"{r['seconds']:.1f}",
            ]
            for r in sorted(rows["grid"] + rows["biases"], key=lambda r: r["rmse_clip"])
        ]
        report.add(f"<details><summary>Every grid and biases-only point on {label}</summary>\n")
        report.add(
            md_table(
                [
                    "settings",
                    "test RMSE clipped",
                    "test RMSE unclipped",
                    "test MAE clipped",
                    "validation RMSE clipped",
                    "iterations run",
                    "fit s",
                ],
                grid_rows,
            )
        )
        report.add("</details>")
    report.add("## Summary")
    report.add(
        "Test RMSE, clipped to the train range for dmf's rows (as they deliver it); old defaults "
        "and Spark unclipped, as they deliver it; Surprise clipped (its own default). *gap* = "
        "(defaults - grid) / grid; *margin* = (biases-only - defaults) / biases-only. The best "
        "grid point is picked by test RMSE, which favours the grid."
    )
    report.add(
        md_table(
            [
                "data",
                "train ratings",
                "dmf defaults",
                "best grid (by test)",
                "gap",
                "grid by validation",
                "gap",
                "best biases-only",
                "margin over biases-only",
                "dmf old defaults",
                "Spark ALS defaults",
                "Surprise SVD defaults",
                "defaults within 1% of tuned",
            ],
            summary,
        )
    )
    if notes:
        report.add("Notes:\n\n" + "\n".join(f"- {n}" for n in notes))
    report.add(embed_data("defaults", {k: v for k, v in results.items()}))


if __name__ == "__main__":
    main()
