"""Single-call latency on a large model: one pair predicted, one user's top-n, a new user folded
in, in this process (no cluster), as a web service would call them.

The model is built without training: random factors for 2M users and 10k items at rank 32
(``--users``, ``--items``, ``--rank``), with string user ids ("user-0000042", sorted, as ingest
orders them) and integer item ids, written as a model directory through dmf's own writer
(:func:`dmf.model.model.write_factor_part` per block, then ``model.json`` with each block's
first id, as training writes it: 8 user blocks by default). It is then opened two ways:

- ``dmf.load(path)``: the factors in memory (the user side takes 264 MB, under the 1 GiB limit);
- ``dmf.load(path, in_memory=False)``: blocks read on demand (a model larger than the driver).

For each, the first call (which builds the id lookup: a sorted hash of every id, once per model,
or per block on disk) and then the best, median and 99th percentile of ``--calls`` calls with a
random known user each time. Goal: a single-pair predict under 5 ms on the 2M-user model.

Writes docs/benchmarks_predict.md. Examples::

    .venv/bin/python scripts/bench_predict.py                     # 2M users, 10k items, rank 32
    .venv/bin/python scripts/bench_predict.py --users 2e5 --no-write
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from bench_common import Report, log, md_table  # noqa: E402

import dmf  # noqa: E402
from dmf.model.model import MODEL_JSON, commit_model, write_factor_part  # noqa: E402
from dmf.store.storage import Commit, Location  # noqa: E402


def write_model(path: Path, n_users: int, n_items: int, rank: int, blocks: int, seed: int) -> int:
    """A model directory of random factors, written block by block as training writes one;
    returns its size in bytes."""
    rng = np.random.default_rng(seed)
    root = Location.of(path)
    bounds = np.linspace(0, n_users, blocks + 1).astype(np.int64)
    firsts = []
    with Commit(root, MODEL_JSON) as c:
        for b in range(blocks):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            ids = pa.array([f"user-{k:07d}" for k in range(lo, hi)])
            f = (rng.normal(size=(hi - lo, rank)) * 0.3).astype(np.float32)
            bias = (rng.normal(size=hi - lo) * 0.3).astype(np.float32)
            write_factor_part(c.target, "user", b, ids, f, bias, c)
            firsts.append(ids[0].as_py())
        v = (rng.normal(size=(n_items, rank)) * 0.3).astype(np.float32)
        c_bias = (rng.normal(size=n_items) * 0.3).astype(np.float32)
        write_factor_part(c.target, "item", 0, pa.array(np.arange(n_items) * 3), v, c_bias, c)
        doc = {
            "mu": 3.5,
            "rank": rank,
            "n_users": n_users,
            "n_items": n_items,
            "dtype": "float32",
            "config": {"model": {"rank": rank, "reg": 0.1, "weighted_reg": False}},
            "history": [],
            "rating_range": [1.0, 5.0],
            "blocks": {"user": bounds.tolist(), "item": [0, n_items]},
            "first_ids": {"user": firsts, "item": [0]},
        }
        commit_model(root, c, doc, plot=False)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def latencies(make_call, calls: int) -> list[float]:
    """Seconds of ``calls`` calls, each made by ``make_call(k)``."""
    return [timed(make_call(k)) for k in range(calls)]


def ms(x: float) -> str:
    return f"{x * 1e3:.3g}"


def bench(model, users: list[str], n_items: int, calls: int, seed: int) -> list[list[str]]:
    """Rows (call, first ms, best ms, median ms, p99 ms) for one opened model."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(users), size=calls + 1)
    items = rng.integers(0, n_items, size=(calls + 1, 20)) * 3
    ratings = rng.integers(1, 6, size=20).astype(np.float64)
    item_list = [[int(x) for x in np.unique(row)] for row in items]

    cases = [
        ("predict, 1 pair", lambda k: lambda: model.predict([users[pick[k]]], [int(items[k, 0])])),
        (
            "predict, 1,000 pairs",
            lambda k: (
                lambda: model.predict(
                    [users[j] for j in rng.integers(0, len(users), 1000)],
                    items[k % len(items)][:1] * np.ones(1000, dtype=np.int64),
                )
            ),
        ),
        ("recommend, 1 user, n=10", lambda k: lambda: model.recommend([users[pick[k]]], n=10)),
        (
            "recommend, 1 user, n=10, include 100 items",
            lambda k: lambda: model.recommend([users[pick[k]]], n=10, include=np.arange(100) * 3),
        ),
        (
            "fold_in, 20 ratings",
            lambda k: lambda: model.fold_in(item_list[k], ratings[: len(item_list[k])]),
        ),
        (
            "recommend_for_ratings, 20 ratings, n=10",
            lambda k: (
                lambda: model.recommend_for_ratings(
                    item_list[k], ratings[: len(item_list[k])], n=10
                )
            ),
        ),
        ("similar_items, 1 item, n=10", lambda k: lambda: model.similar_items([3 * k], n=10)),
    ]
    rows = []
    few = max(3, calls // 50)
    for name, make in cases:
        first = timed(make(calls))
        # On disk, 1,000 random users touch every block: each call reads blocks; a few calls.
        heavy = not model.users.in_memory and "1,000" in name
        t = np.array(latencies(make, few if heavy else calls))
        rows.append(
            [name, ms(first), ms(t.min()), ms(float(np.median(t))), ms(np.quantile(t, 0.99))]
        )
        log(f"  {name}: first {ms(first)} ms, median {ms(float(np.median(t)))} ms")
    # The whole user side streamed per call: not a single-row lookup; a few calls.
    for name, make in (
        ("recommend_users, 1 item, n=10", lambda k: lambda: model.recommend_users([3], n=10)),
        ("similar_users, 1 user, n=10", lambda k: lambda: model.similar_users([users[0]], n=10)),
    ):
        first = timed(make(0))
        t = np.array(latencies(make, few))
        rows.append(
            [name, ms(first), ms(t.min()), ms(float(np.median(t))), ms(np.quantile(t, 0.99))]
        )
        log(f"  {name}: first {ms(first)} ms, median {ms(float(np.median(t)))} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=float, default=2e6)
    ap.add_argument("--items", type=float, default=1e4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=8, help="user blocks (factor files)")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/")
    args = ap.parse_args()
    n_users, n_items = int(args.users), int(args.items)
    work = Path(args.work or tempfile.mkdtemp(prefix="dmf-bench-predict-"))
    path = work / "model"
    rep = Report(
        "Single-call latency: predict, recommend, fold-in",
        intro=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    try:
        log(f"write a model of {n_users:,} users x {n_items:,} items, rank {args.rank}")
        t0 = time.perf_counter()
        size = write_model(path, n_users, n_items, args.rank, args.blocks, args.seed)
        log(f"  {time.perf_counter() - t0:.1f} s, {size / 2**20:.0f} MiB")
        users = [f"user-{k:07d}" for k in range(n_users)]
        header = ["call", "first ms", "best ms", "median ms", "p99 ms"]
        for label, in_memory in (("in memory", None), ("block files on demand", False)):
            log(f"{label}: load")
            t0 = time.perf_counter()
            model = dmf.load(path, in_memory=in_memory)
            load_s = time.perf_counter() - t0
            log(f"  {load_s:.2f} s; {model!r}")
            rows = bench(model, users, n_items, args.calls, args.seed)
            rep.add(
                f"## {label}: `dmf.load(path{'' if in_memory is None else ', in_memory=False'})`"
                f"\n\nLoad: {load_s:.2f} s. `{model!r}`\n\n" + md_table(header, rows)
            )
            del model
        rep.add(
            f"{n_users:,} users (string ids) in {args.blocks} factor files, {n_items:,} items "
            f"(integer ids), rank {args.rank}, float32; model directory {size / 2**20:.0f} MiB. "
            f"{args.calls} timed calls per case after the first ({max(3, args.calls // 50)} for the "
            "cases that read every block: recommend_users, similar_users, and 1,000 pairs on "
            "disk); each call a random known user. "
            "`first` includes building the id lookup (once per model; on disk, once per block "
            "read)."
        )
        text = rep.render()
        print(text)
        if not args.no_write:
            log(f"wrote {rep.write('predict')}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
