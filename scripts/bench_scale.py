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

``--model-scale`` runs one configuration instead, a model larger than the workers: by default
50M users at rank 32 (6.6 GB of user factors in float32) and 203M ratings drawn (over 200M once
repeated pairs are merged), on 2 workers of 2 GiB each, ``train.exchange: auto``, which must route the user side to the item half-step (the plan is
printed). Planted ratings with uniform user activity (so that the store holds at least
``--model-scale-users`` users) go through ``dmf synth`` and ingest as above. It reports seconds per
iteration, the factor bytes each half-step moved (from the history), the peak RSS of every worker
and of the driver, overall and per half-step, and writes its row into the table of
docs/benchmarks_<out>.md (rows of earlier runs kept; a row marked *(model scale)* replaced) with a
section of its own below it; a later run without ``--model-scale`` keeps both. Example::

    .venv/bin/python scripts/bench_scale.py --model-scale        # ~40 GB of disk at its peak
    .venv/bin/python scripts/bench_scale.py --model-scale --model-scale-users 200000 \
        --model-scale-ratings 800000 --model-scale-exchange partitioned --doc /tmp/scale.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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
    RSSTimeline,
    als_flops,
    embed_data,
    gemm_rate,
    log,
    machine_info,
    md_table,
    provenance,
    read_md_table,
    worker_pids,
)

BYTES_PER_RATING_ARRAYS = 12  # int32 user + int32 item + float32 rating
GiB = 2**30

# The table's columns. The last five came with the exchange (train.exchange); rows written
# before them show "-" there.
HEADER = [
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
    "rank",
    "user factors GiB",
    "exchange user / item",
    "GiB moved per half-step user / item",
    "half-step s user / item",
]
MODEL_TAG = "(model scale)"
SECTION_BEGIN = "<!-- model-scale:begin -->"
SECTION_END = "<!-- model-scale:end -->"


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


# -- the table's rows and the model-scale section, kept across runs ------------------------------
def exchange_cells(history: list[dict], store, rank: int) -> list:
    """The table's last five cells from a run's history: rank, user factors, how each half-step
    got its fixed side, the factor bytes it moved and its seconds (median after the first
    iteration)."""
    factors = store.n_users * (rank + 1) * 4 / GiB
    last = history[-1]
    if not last.get("exchange"):
        return [rank, factors, "-", "-", "-"]
    later = history[1:] or history
    sides = ("user", "item")
    return [
        rank,
        factors,
        " / ".join(last["exchange"][s] for s in sides),
        " / ".join(f"{last['bytes_moved'][s] / GiB:.2f}" for s in sides),
        " / ".join(
            f"{statistics.median(h['half_step_seconds'][s] for h in later):.1f}" for s in sides
        ),
    ]


def table_rows(text: str) -> list[list[str]]:
    """The rows of the page's table, as strings, in the columns of HEADER ("-" where a row
    predates a column)."""
    got = read_md_table(text, HEADER[0])
    if got is None:
        return []
    header, rows = got
    return [[dict(zip(header, r, strict=False)).get(h, "-") for h in HEADER] for r in rows]


def model_section_of(text: str) -> str:
    """The model-scale section of a page (markers included), or ''."""
    a, b = text.find(SECTION_BEGIN), text.find(SECTION_END)
    return text[a : b + len(SECTION_END)] if a >= 0 and b > a else ""


def write_model_row(doc: Path, row: list, section: str) -> None:
    """Put the model-scale row into the page's table (replacing an earlier one; other rows
    kept, columns added) and its section before the Analysis; atomically."""
    text = doc.read_text() if doc.is_file() else "# Benchmark: scale and out-of-core training\n"
    rows = [r for r in table_rows(text) if MODEL_TAG not in r[0]] + [row]
    table = md_table(HEADER, rows).splitlines()
    lines = text.splitlines()
    start = next(
        (
            k
            for k, line in enumerate(lines)
            if line.startswith("|") and line.strip("| ").startswith(HEADER[0] + " |")
        ),
        None,
    )
    if start is None:
        lines += ["", *table]
    else:
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = table
    text = "\n".join(lines) + "\n"
    old = model_section_of(text)
    if old:
        text = text.replace(old, section)
    else:
        at = text.find("\n## Analysis")
        text = (
            text + "\n" + section + "\n"
            if at < 0
            else text[:at] + "\n" + section + "\n" + text[at:]
        )
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


# -- --model-scale: a user side larger than the workers ------------------------------------------
def synth_users_for(users: int, ratings: int) -> int:
    """Users to synthesize, with uniform activity, so that about ``users`` have a rating: each of
    N users has one with probability 1 - exp(-ratings / N)."""
    n = users
    for _ in range(100):
        n = math.ceil(users / (1.0 - math.exp(-ratings / n)))
    return math.ceil(n * 1.002)


def synth_model_data(root: Path, users: int, ratings: int, items: int) -> tuple[Path, float]:
    """Planted ratings for the model-scale row (reused when present): uniform user activity,
    item popularity skew 0.5 (so that no item outgrows a block)."""
    from dmf.config import SynthConfig
    from dmf.data.synth import synth

    out = root / f"synth-model-u{users}-r{ratings}-i{items}"
    if (out / "synth.json").is_file():
        return out, float("nan")
    cfg = SynthConfig(
        enabled=True,
        n_users=synth_users_for(users, ratings),
        n_items=items,
        n_ratings=ratings,
        rank=8,
        noise=0.5,
        user_skew=0.0,
        item_skew=0.5,
        seed=0,
        files=max(1, ratings // 10_000_000),
    )
    log(f"synth: {ratings:,} ratings, {cfg.n_users:,} users drawn, {items:,} items -> {out}")
    t = time.perf_counter()
    synth(cfg, out, overwrite=True, progress=False)
    return out, time.perf_counter() - t


class _PlanLines(logging.Handler):
    """Keeps dmf's log lines (the plan) and prints them."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.lines.append(msg)
        print(msg, file=sys.stderr, flush=True)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def model_scale(args) -> None:
    from bench_exchange import halfstep_clock
    from distributed import Client, LocalCluster

    from dmf.config import load_config
    from dmf.dist.cluster import BLAS_ENV
    from dmf.train.loop import Trainer

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    users, ratings = int(args.model_scale_users), int(args.model_scale_ratings)
    items, rank = int(args.model_scale_items), args.model_scale_rank
    limit = parse_bytes(args.model_scale_memory_limit)
    factors = users * (rank + 1) * 4
    log(
        f"model scale: {users:,} users x rank {rank} = {factors / 1e9:.2f} GB of user factors; "
        f"{args.workers} workers x {limit / GiB:.2f} GiB ({factors / limit:.1f}x one worker's)"
    )
    if limit * 3 > factors:
        log("  note: memory_limit is not below a third of the user factors")
    gemm1 = gemm_rate(1)
    src, synth_s = synth_model_data(root, users, ratings, items)
    store_path = root / f"store-model-u{users}-r{ratings}-i{items}"
    log(f"ingest -> {store_path}")
    with PeakRSS() as mem:
        t = time.perf_counter()
        store = ingest_store(src, store_path, args.target_ratings)
        ingest_s = time.perf_counter() - t
    ingest_mem = mem.total
    log(f"  ingest {ingest_s:.1f} s, peak RSS {ingest_mem / GiB:.2f} GiB; {store}")
    if store.n_users < users:
        log(f"  note: the store holds {store.n_users:,} users, fewer than {users:,}")
    log(f"  {store.n_train:,} train ratings of {ratings:,} drawn")

    model_dir = root / "model-scale-model"
    cfg = load_config(
        raw={
            "model": {"rank": rank, "reg": 0.05, "weighted_reg": True},
            "train": {
                "iterations": args.model_scale_iterations,
                "checkpoint_every": 0,
                "progress": "off",
                "exchange": args.model_scale_exchange,
            },
            "output": {"model": str(model_dir), "plot": False, "overwrite": True},
        }
    )
    plan = _PlanLines()
    dmf_log = logging.getLogger("dmf")
    dmf_log.addHandler(plan)
    dmf_log.setLevel(logging.INFO)
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
        pids = list(before.values())
        trainer = Trainer(store, cfg, client, quiet=True)
        modes = trainer.halfsteps.plan()
        plan_lines = list(plan.lines)
        log(f"plan: {modes}")
        if args.model_scale_exchange == "auto" and modes.get("item") != "partitioned":
            log("  WARNING: auto broadcasts the item half-step: this is not the model-scale regime")
        cached = trainer.halfsteps.should_cache()
        with halfstep_clock() as spans, RSSTimeline(0.2) as tl:
            t = time.perf_counter()
            model = trainer.run()
            wall = time.perf_counter() - t
        after = worker_pids(client)
        routings = {k: r.rows_moved for k, r in trainer.halfsteps._routings.items()}
    finally:
        dmf_log.removeHandler(plan)
        client.close()
        cluster.close()
    hist = model.history
    secs = [h["seconds"] for h in hist]
    per_iter = statistics.mean(secs[1:]) if len(secs) > 1 else secs[0]
    restarted = sorted(set(before.items()) ^ set(after.items()))
    worker_peaks = tl.of(pids)
    side_peaks = {}
    for side in ("user", "item"):
        peaks = [0] * len(pids)
        for s, _, t0, t1 in spans:
            if s == side:
                peaks = [
                    max(a, b) for a, b in zip(peaks, tl.peaks_between(t0, t1, pids), strict=True)
                ]
        side_peaks[side] = peaks
    model_bytes = _dir_bytes(model_dir)
    counts = np.concatenate([store.counts("user"), store.counts("item")])
    floor = als_flops(counts, rank).floor / (args.workers * gemm1 * 1e9)
    n_users = store.n_users
    row = [
        f"{store.n_train:,} {MODEL_TAG}",
        f"{n_users:,}",
        f"{store.n_items:,}",
        store.disk_bytes() / GiB,
        store.n_train * BYTES_PER_RATING_ARRAYS / GiB,
        synth_s,
        ingest_s,
        ingest_mem / GiB,
        "yes" if cached else "no (streamed)",
        per_iter,
        floor,
        floor / per_iter,
        " / ".join(f"{w / GiB:.2f}" for w in worker_peaks),
        args.workers * limit / GiB,
        tl.driver / GiB,
        len(restarted) // 2 if restarted else 0,
        hist[-1]["train_rmse"],
        *exchange_cells(hist, store, rank),
    ]
    data = {
        "provenance": provenance(),
        "users": n_users,
        "items": store.n_items,
        "ratings": store.n_train,
        "rank": rank,
        "workers": args.workers,
        "threads_per_worker": 1,
        "memory_limit": limit,
        "exchange_setting": args.model_scale_exchange,
        "modes": modes,
        "blocks": {s: store.n_blocks(s) for s in ("user", "item")},
        "target_ratings": args.target_ratings,
        "history": [
            {
                k: h.get(k)
                for k in ("iteration", "seconds", "exchange", "bytes_moved", "half_step_seconds")
            }
            for h in hist
        ],
        "seconds_per_iteration": per_iter,
        "rows_moved": routings,
        "worker_peaks": worker_peaks,
        "worker_peaks_by_half_step": side_peaks,
        "driver_peak": tl.driver,
        "restarts": len(restarted) // 2 if restarted else 0,
        "model_dir_bytes": model_bytes,
        "store_bytes": store.disk_bytes(),
        "wall": wall,
    }
    m = machine_info()
    it_rows = [
        [
            h["iteration"],
            h["seconds"],
            *[
                f"{h['exchange'][s]}, {h['bytes_moved'][s] / GiB:.2f}, {h['half_step_seconds'][s]:.1f}"
                for s in ("user", "item")
            ],
        ]
        for h in hist
    ]
    pv = data["provenance"]
    section = "\n\n".join(
        [
            SECTION_BEGIN,
            "## Model scale: a user side larger than the workers' memory",
            f"Measured {pv['date']}, commit {pv['git']}, command `{pv['command']}`; "
            f"{m['cpu']}, {m['logical cores']} cores, {m['memory']}. The row marked "
            f"*{MODEL_TAG}* in the table above.",
            f"{n_users:,} users x rank {rank}: user factors and biases "
            f"{n_users * (rank + 1) * 4 / 1e9:.2f} GB ({n_users * (rank + 1) * 4 / GiB:.2f} GiB) "
            f"in float32, {n_users * (rank + 1) * 4 / limit:.1f}x one worker's memory_limit; "
            f"{store.n_items:,} items; {store.n_train:,} train ratings (planted, uniform user "
            f"activity, item popularity skew 0.5); blocks of {args.target_ratings:,} ratings "
            f"({store.n_blocks('user')} user blocks, {store.n_blocks('item')} item blocks); "
            f"{args.workers} workers x 1 thread, memory_limit {limit / GiB:.2f} GiB each; "
            f"`train.exchange: {args.model_scale_exchange}`; ALS-WR reg 0.05; "
            f"{len(hist)} iterations, {wall:.0f} s in all. GEMM rate (1 thread): "
            f"{gemm1:.1f} GFLOP/s.",
            "The plan, as dmf logged it:\n\n```\n" + "\n".join(plan_lines) + "\n```",
            md_table(
                [
                    "iteration",
                    "s",
                    "user half-step: exchange, GiB moved, s",
                    "item half-step: exchange, GiB moved, s",
                ],
                it_rows,
            ),
            f"Peak RSS per worker: {' / '.join(f'{w / GiB:.2f}' for w in worker_peaks)} GiB "
            f"over the run; in the user half-steps "
            f"{' / '.join(f'{w / GiB:.2f}' for w in side_peaks['user'])} GiB, in the item "
            f"half-steps {' / '.join(f'{w / GiB:.2f}' for w in side_peaks['item'])} GiB; driver "
            f"{tl.driver / GiB:.2f} GiB. Workers restarted: {data['restarts']}. Routed rows per "
            f"half-step: {', '.join(f'{k} {v:,}' for k, v in routings.items()) or 'none'}. "
            f"Model directory at the end (side versions in work/, routing, factor files): "
            f"{model_bytes / GiB:.1f} GiB; store {store.disk_bytes() / GiB:.1f} GiB.",
            embed_data("model-scale", data),
            SECTION_END,
        ]
    )
    doc = Path(args.doc) if args.doc else DOCS / f"benchmarks_{args.out}.md"
    write_model_row(doc, row, section)
    log(
        f"s/iter {per_iter:.1f} (iterations {[round(x, 1) for x in secs]}), worker peaks "
        f"{[round(w / GiB, 2) for w in worker_peaks]} GiB, driver {tl.driver / GiB:.2f} GiB; "
        f"wrote {doc}"
    )
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(store_path, ignore_errors=True)


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
    p.add_argument("--model-scale", action="store_true", help="the model-scale row only")
    p.add_argument("--model-scale-users", type=float, default=50e6)
    # Pairs drawn twice are merged: 2.0M of 200M drawn at 50M users (198.0M left), growing as
    # the square of the draws: 203M drawn leave about 200.9M, over the 200M.
    p.add_argument("--model-scale-ratings", type=float, default=203e6)
    p.add_argument("--model-scale-items", type=float, default=100_000)
    p.add_argument("--model-scale-rank", type=int, default=32)
    p.add_argument("--model-scale-iterations", type=int, default=3)
    p.add_argument("--model-scale-memory-limit", default="2GiB", help="per worker")
    p.add_argument(
        "--model-scale-exchange", default="auto", choices=["auto", "broadcast", "partitioned"]
    )
    p.add_argument("--doc", default=None, help="--model-scale: the page to write the row into")
    args = p.parse_args(argv)
    if args.model_scale:
        model_scale(args)
        return
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
                *exchange_cells(model.history, store, args.rank),
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
    # Rows of an earlier --model-scale run stay in the table, and its section below it.
    doc = DOCS / f"benchmarks_{args.out}.md"
    old_text = doc.read_text() if doc.is_file() else ""
    kept = [r for r in table_rows(old_text) if MODEL_TAG in r[0]]
    report.add(md_table(HEADER, rows + kept))
    report.add(f"![peak memory against rating count]({args.out}_memory.png)")
    report.add(f"![seconds per iteration against rating count]({args.out}_seconds.png)")
    report.add(
        "*synth s* is `nan` when the planted data was already on disk from an earlier run. "
        "*ingest peak RSS* covers the driver process and its children (ingest runs in a local "
        "thread pool here)."
    )
    section = model_section_of(old_text)
    if section:
        report.add(section)
    path = report.write(args.out)
    (root / "scale.json").write_text(json.dumps({"rows": [list(map(str, r)) for r in rows]}))
    log(f"wrote {path}")
    print(report.render())
    if not args.keep:
        for n in sizes:
            shutil.rmtree(root / f"store-{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
