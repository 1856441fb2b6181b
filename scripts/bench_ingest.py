"""Ingest throughput and peak memory: planted-ratings CSV -> finished store.

For each size N, writes N planted ratings as CSV with ``dmf.data.synth.synth`` (columns user, item,
rating, timestamp; N/100 users and N/1000 items, Zipf-like activity and popularity), then times
``dmf.data.ingest.ingest`` from the CSV files to the opened, verified store, with the peak RSS of this
process and all its children sampled every 0.1 s. synth writes rows sorted by user (as MovieLens
files are); ``--shuffled`` also ingests a copy with the rows in random order (sizes up to 20M:
the shuffle is done in memory), which makes every batch touch every user block.

By default the per-block passes run on the local thread pool (``client=None``); ``--cluster``
also runs them on a LocalCluster of 2 worker processes x 1 thread.

Writes docs/benchmarks_ingest.md (the "Ingest" section). Examples::

    .venv/bin/python scripts/bench_ingest.py                       # 10M ratings
    .venv/bin/python scripts/bench_ingest.py --sizes 1e7 1e8 --shuffled --cluster
    .venv/bin/python scripts/bench_ingest.py --sizes 1e6           # quick
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import PeakRSS, Report, gib, log, md_table  # noqa: E402


def make_csv(n: int, work: Path) -> tuple[Path, float]:
    from dmf.config import SynthConfig
    from dmf.data.synth import synth

    out = work / f"synth-{n}"
    if (out / "synth.json").is_file():
        return out / "ratings", 0.0
    cfg = SynthConfig(
        n_users=max(n // 100, 100),
        n_items=max(n // 1000, 100),
        n_ratings=n,
        rank=8,
        format="csv",
        files=max(1, n // 25_000_000),
        round_to=0.5,
        clip=(0.5, 5.0),
        seed=1,
    )
    t0 = time.perf_counter()
    synth(cfg, out, overwrite=True, progress=False)
    return out / "ratings", time.perf_counter() - t0


def shuffled_copy(src: Path, work: Path, seed: int = 0) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    out = work / f"{src.parent.name}-shuffled"
    f = out / "ratings.csv"
    if f.is_file():
        return f
    out.mkdir(parents=True, exist_ok=True)
    t = pa.concat_tables(pacsv.read_csv(p) for p in sorted(src.glob("*.csv")))
    t = t.take(pa.array(np.random.default_rng(seed).permutation(len(t))))
    pacsv.write_csv(t, f)
    return f


NOTES = """Notes.

- Where the time goes: pass 1 (read) runs on the driver alone: Arrow parses the CSV on its
  threads while the driver cleans the previous batch, gives ids their provisional codes and
  spills them; passes 2-5 run one task per chunk, bucket or block on both cores. Sorting and
  Parquet writing dominate passes 3-5.
- What profiling (py-spy, cProfile) changed: Arrow parse blocks are capped at 4 MiB (26 MiB
  blocks parsed 1.5-2x slower); stable argsorts and lexsorts were replaced by sorting packed
  int64 values (key << bits | row number) with numpy's SIMD sort, stable by construction (2M
  rows: 20 ms instead of 93 ms for argsort and 1 s for a two-key lexsort); block lookups are a
  gather from a per-row table instead of a searchsorted.
- Left on the table: `dmf.store.write_block_file` writes with Parquet dictionary encoding,
  which costs about 3x on by_item blocks whose user column has many distinct values (2M rows:
  256 ms with, 76 ms without); turning it off (or keeping it for the key column only) would take
  about a tenth off ingest.
- Memory is flat in the number of ratings: the peak grows from 10M to 100M ratings only by the id
  maps and per-id counts (10x the users and items). It is bounded by one parse block, one chunk
  of `data.batch_rows` rows, and one block of `blocks.target_ratings` ratings per thread/worker.
- Threads or cluster: on this one machine the LocalCluster costs more CPU than the thread pool
  (the scheduler, worker event loops and a round trip per task, all slowed further when other
  jobs load the cores); `dmf ingest --no-cluster` is the faster choice on a single machine, and
  the cluster pays off when its workers are other machines. Both write identical stores (tested).
- The read pass is the serial part (about 40% of the time at 100M ratings): the next step would be
  parsing byte ranges of large uncompressed files in parallel.
- The machine is shared: other jobs ran during these measurements (see the load average), so
  wall times are pessimistic; CPU seconds are the steadier measure.
"""


def _cpu(_=None) -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_seconds(client) -> float:
    """CPU seconds (user + system) used so far by this process and the cluster's workers: a
    measure of the work done that other programs on the machine do not inflate."""
    total = _cpu()
    if client is not None:
        total += sum(client.run(_cpu).values())
    return total


def run_ingest(source: Path, work: Path, cluster: bool) -> dict:
    from dmf.config import load_config
    from dmf.data.ingest import ingest

    store_dir = work / "store"
    cfg = load_config(
        raw={
            "data": {"source": str(source), "columns": {"timestamp": "timestamp"}},
            "split": {"method": "random", "test": 0.1, "validation": 0.0},
            "store": {"path": str(store_dir), "overwrite": True},
        }
    )
    files = [source] if source.is_file() else sorted(source.glob("*.csv"))
    nbytes = sum(p.stat().st_size for p in files)
    if cluster:
        from distributed import Client, LocalCluster

        from dmf.dist.cluster import BLAS_ENV

        lc = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, env=BLAS_ENV)
        client = Client(lc)
    else:
        client = lc = None
    try:
        load = os.getloadavg()[0]
        cpu0 = _cpu_seconds(client)
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            store = ingest(cfg, client=client, progress=False)
            secs = time.perf_counter() - t0
        cpu = _cpu_seconds(client) - cpu0
    finally:
        if client is not None:
            client.close()
            lc.close()
    m = store.manifest
    rows = m.input["rows_read"]
    res = {
        "rows": rows,
        "bytes": nbytes,
        "seconds": secs,
        "cpu": cpu,
        "load": load,
        "rate": rows / secs,
        "peak_total": rss.total,
        "peak_driver": rss.driver,
        "users": m.n_users,
        "items": m.n_items,
        "blocks": f"{len(m.blocks['user'].nnz)}/{len(m.blocks['item'].nnz)}",
        "timings": m.timings,
        "store_bytes": store.disk_bytes(),
    }
    shutil.rmtree(store_dir, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e7])
    ap.add_argument("--work", default="/tmp/dmf-bench-ingest", help="scratch directory")
    ap.add_argument("--shuffled", action="store_true", help="also ingest rows in random order")
    ap.add_argument("--cluster", action="store_true", help="also run on a LocalCluster")
    ap.add_argument("--keep", action="store_true", help="keep the generated CSV files")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    results = []
    for size in args.sizes:
        n = int(size)
        log(f"synth {n:,} ratings as CSV")
        src, synth_s = make_csv(n, work)
        runs = [("sorted by user", src, False)]
        if args.cluster:
            runs.append(("sorted by user", src, True))
        if args.shuffled and n <= 20_000_000:
            runs.append(("random order", shuffled_copy(src, work), False))
        for order, source, cluster in runs:
            log(f"ingest {n:,} ({order}, {'LocalCluster' if cluster else 'threads'})")
            r = run_ingest(source, work, cluster)
            r.update(order=order, where="LocalCluster 2x1" if cluster else "threads", synth=synth_s)
            log(
                f"  {r['seconds']:.1f} s, {r['rate'] / 1e6:.2f} M ratings/s, "
                f"peak RSS {gib(r['peak_total'])} GiB; timings {r['timings']}"
            )
            results.append(r)
        if not args.keep:
            shutil.rmtree(src.parent, ignore_errors=True)
            shutil.rmtree(work / f"{src.parent.name}-shuffled", ignore_errors=True)

    rep = Report(
        "Ingest",
        intro=(
            "CSV (user, item, rating, timestamp; written by `dmf.data.synth.synth`) to a finished, "
            "verified store with a 10% random test split, default blocks (2M ratings target) "
            "and `data.batch_rows` 1M. Seconds are wall time of `dmf.data.ingest.ingest` from "
            "reading the first byte to `Store.open` of the result; peak RSS is the largest sum "
            "over this process and its children (workers included), sampled every 0.1 s. CPU s is the "
            "user + system time of this process and the workers during the ingest; the load "
            "average (1 min) when the run started shows how busy the machine was."
        ),
    )
    rep.add(
        md_table(
            [
                "ratings",
                "input",
                "row order",
                "passes 2-5 on",
                "seconds",
                "ratings/s",
                "CPU s",
                "ratings per CPU s",
                "load avg",
                "peak RSS (GiB)",
                "driver RSS (GiB)",
                "users",
                "items",
                "blocks u/i",
                "store",
            ],
            [
                (
                    f"{r['rows']:,}",
                    f"{r['bytes'] / 2**20:,.0f} MiB",
                    r["order"],
                    r["where"],
                    round(r["seconds"], 1),
                    f"{r['rate'] / 1e6:.2f} M",
                    round(r["cpu"], 1),
                    f"{r['rows'] / r['cpu'] / 1e6:.2f} M",
                    round(r["load"], 1),
                    gib(r["peak_total"]),
                    gib(r["peak_driver"]),
                    f"{r['users']:,}",
                    f"{r['items']:,}",
                    r["blocks"],
                    f"{r['store_bytes'] / 2**20:,.0f} MiB",
                )
                for r in results
            ],
        )
    )
    rep.add(
        "Seconds per pass (1 read: parse, clean, id codes, spill; 2 bucket: remap, bucket by "
        "user; 3 split: sort, merge duplicates, split; 4 user blocks: write by_user, route to "
        "item blocks; 5 item blocks: sort, write by_item; finish: id maps, held-out files):\n\n"
        + md_table(
            [
                "ratings",
                "row order",
                "on",
                "read",
                "bucket",
                "split",
                "user blocks",
                "item blocks",
                "finish",
            ],
            [
                (
                    f"{r['rows']:,}",
                    r["order"],
                    r["where"],
                    *(
                        r["timings"].get(k, 0.0)
                        for k in ("read", "bucket", "split", "user_blocks", "item_blocks", "finish")
                    ),
                )
                for r in results
            ],
        )
    )
    made = {r["rows"]: r["synth"] for r in results if r["synth"]}
    if made:
        rep.add(
            "Generating the CSV with synth (not included above): "
            + ", ".join(f"{n:,} ratings in {s:.0f} s" for n, s in made.items())
        )
    rep.add(NOTES)
    if not args.no_write:
        log(f"wrote {rep.write('ingest')}")
    else:
        print(rep.render())


if __name__ == "__main__":
    main()
