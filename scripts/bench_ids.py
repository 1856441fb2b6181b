"""Ingest of many distinct string user ids: the driver's memory stays flat as the ids grow.

Issue 10 asks that 1 billion distinct string ids be possible with bounded driver memory,
simulated at 100M. For each size N, writes N ratings as Parquet, one per distinct user whose id
is a string of 19-22 characters ("u" and a scrambled 64-bit number, so ids arrive in no
particular order), over 1,000 integer items; then ingests them on a LocalCluster of 2 worker
processes x 1 thread, sampling the RSS of the driver (this process) and of every worker every
0.1 s. User ids are ranked range by range on the workers (``data.id_partition_rows`` rows per
range); the driver keeps a 65,536-row sample of them, never the ids themselves.

The ids' own size (Arrow string bytes plus 4-byte offsets) is what a driver that ranked every
id itself would hold at the least, before any hash table.

Writes docs/benchmarks_ids.md. Examples::

    .venv/bin/python scripts/bench_ids.py                    # 1M, 10M and 100M ids
    .venv/bin/python scripts/bench_ids.py --ids 1e6 1e7 --no-write
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import PeakRSS, Report, gib, log, md_table, worker_pids  # noqa: E402

FILE_ROWS = 10_000_000


def make_input(n: int, work: Path) -> tuple[Path, int]:
    """N rows of distinct string users as Parquet files; returns (directory, id bytes)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dmf.data.hashing import U64, mix64

    out = work / f"ids-{n}"
    done = out / "_done"
    id_bytes = 0
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rng = np.random.default_rng(1)
        for f, lo in enumerate(range(0, n, FILE_ROWS)):
            k = np.arange(lo, min(n, lo + FILE_ROWS), dtype=U64)
            # mix64 is a bijection of 64-bit integers: every id is distinct.
            users = pc.binary_join_element_wise("u", pc.cast(pa.array(mix64(k)), pa.string()), "")
            table = pa.table(
                {
                    "user": users,
                    "item": rng.integers(0, 1000, len(k)),
                    "rating": rng.integers(1, 6, len(k)).astype(np.float32),
                }
            )
            pq.write_table(table, out / f"part-{f:04d}.parquet")
            id_bytes += users.nbytes
        done.write_text(str(id_bytes))
    return out, int(done.read_text())


def run(src: Path, work: Path, memory_limit: str) -> dict:
    from distributed import Client, LocalCluster

    from dmf.config import load_config
    from dmf.data.ingest import ingest
    from dmf.dist.cluster import BLAS_ENV

    cfg = load_config(
        raw={
            "data": {"source": str(src / "*.parquet"), "format": "parquet"},
            "split": {"method": "none"},
            "store": {"path": str(work / "store"), "overwrite": True},
        }
    )
    lc = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        memory_limit=memory_limit,
        dashboard_address=None,
        env=BLAS_ENV,
    )
    client = Client(lc)
    try:
        pids = list(worker_pids(client).values())
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            store = ingest(cfg, client=client, progress=False)
            secs = time.perf_counter() - t0
        workers = rss.of(pids)
        # A restarted worker has a new pid.
        pids_after = list(worker_pids(client).values())
        restarts = len(set(pids_after) - set(pids))
    finally:
        client.close()
        lc.close()
    m = store.manifest
    return {
        "rows": m.input["rows_read"],
        "users": m.n_users,
        "seconds": secs,
        "driver": rss.driver,
        "workers": workers,
        "restarts": restarts,
        "timings": m.timings,
        "user_blocks": len(m.blocks["user"].nnz),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    ap.add_argument("--work", default="/tmp/dmf-bench-ids", help="scratch directory")
    ap.add_argument("--memory-limit", default="4GiB", help="memory_limit of each worker")
    ap.add_argument("--keep", action="store_true", help="keep the generated input")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rep = Report(
        "Distinct string ids: driver memory",
        intro=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    rows = []
    for size in args.ids:
        n = int(size)
        log(f"write {n:,} ratings of distinct string users")
        src, id_bytes = make_input(n, work)
        log(f"ingest {n:,}")
        r = run(src, work, args.memory_limit)
        assert r["users"] == n, r
        log(
            f"  {r['seconds']:.1f} s; driver peak {gib(r['driver'])} GiB, workers "
            f"{[gib(w) for w in r['workers']]} GiB; ids {gib(id_bytes)} GiB; {r['timings']}"
        )
        rows.append(
            [
                f"{n:,}",
                f"{r['users']:,}",
                gib(id_bytes),
                f"{r['seconds']:.0f}",
                gib(r["driver"]),
                " / ".join(gib(w) for w in r["workers"]),
                str(r["restarts"]),
                str(r["user_blocks"]),
            ]
        )
        shutil.rmtree(work / "store", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    rep.add(
        md_table(
            [
                "ratings",
                "distinct user ids",
                "ids' size (GiB)",
                "ingest s",
                "driver peak RSS (GiB)",
                "worker peak RSS (GiB)",
                "worker restarts",
                "user blocks",
            ],
            rows,
        )
    )
    rep.add(
        "Workers: `memory_limit` "
        f"{args.memory_limit}; `data.id_partition_rows` 5,000,000 (the default); "
        f"`data.batch_rows` 1,000,000; {os.cpu_count()} cores."
    )
    if not args.no_write:
        log(f"wrote {rep.write('ids')}")


if __name__ == "__main__":
    main()
