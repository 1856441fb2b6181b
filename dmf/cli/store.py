"""``dmf ingest CONFIG`` (raw ratings -> store) and ``dmf info STORE`` (what a store holds)."""

from __future__ import annotations

import argparse

from dmf.cli.common import add_cluster_args, add_config_arg, cluster_kwargs, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="raw ratings (CSV/TSV/Parquet/MovieLens) -> store",
        description=(
            "Read data.source in streaming batches, split it (split), and write the store "
            "(store.path) partitioned by user block and by item block. The per-block passes "
            "run on the Dask cluster (--address, --scheduler-file, or the config's cluster); "
            "--no-cluster runs them on local threads instead (same result)."
        ),
    )
    add_config_arg(p)
    add_cluster_args(p)
    p.add_argument(
        "--no-cluster",
        action="store_true",
        help="run every pass in this process on a thread pool (no Dask cluster)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "info",
        help="summary of a store: counts, mu, blocks, splits, dropped rows, size",
        description="Open (and verify) a store and print a summary, or its manifest with --json.",
    )
    p.add_argument("store", help="store directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_info)


def cmd_ingest(args: argparse.Namespace) -> int:
    from dmf.data.ingest import ingest

    cfg = config_from_args(args)
    progress = False if args.quiet else None
    if args.no_cluster and not (args.address or args.scheduler_file):
        store = ingest(cfg, progress=progress)
    else:
        from dmf.dist.cluster import connect

        with connect(cfg, quiet=args.quiet, **cluster_kwargs(args)) as client:
            store = ingest(cfg, client=client, progress=progress)
    print(format_info(store))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dmf.store.layout import Store

    store = Store.open(args.store)
    if args.json:
        print(store.manifest.model_dump_json(indent=1, exclude_none=True))
    else:
        print(format_info(store))
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_info(store) -> str:
    """A human summary of a store (what ``dmf info`` prints)."""
    m = store.manifest
    lines = [
        f"store        {store.path}",
        f"users        {m.n_users:,}",
        f"items        {m.n_items:,}",
        f"train        {m.n_train:,} ratings, mu = {m.mu:.4f}",
    ]
    sp = m.split
    desc = f"split        {sp.method}"
    if sp.method not in ("none", "given"):
        desc += f" (validation {sp.validation}, test {sp.test}, seed {sp.seed})"
    lines.append(desc)
    for name in ("validation", "test"):
        lines.append(f"{name:<12} {m.n_split(name):,} ratings")
    for side in ("user", "item"):
        nnz = m.blocks[side].nnz
        if nnz:
            lines.append(
                f"{side} blocks  {len(nnz)} (nnz min {min(nnz):,}, max {max(nnz):,}, "
                f"mean {sum(nnz) / len(nnz):,.0f})"
            )
    if m.dropped is not None:
        parts = [f"{k.replace('_', ' ')} {v:,}" for k, v in m.dropped.model_dump().items()]
        if m.clipped:
            parts.append(f"clipped {m.clipped:,}")
        lines.append("dropped      " + ", ".join(parts))
    if m.input is not None:
        files = m.input.get("files", [])
        first = files[0] if files else "?"
        more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
        lines.append(f"input        {first}{more}, {m.input.get('rows_read', 0):,} rows")
    lines.append(f"disk         {_size(store.disk_bytes())} in {len(m.files)} files")
    lines.append(f"fingerprint  {m.fingerprint}")
    if m.timings is not None:
        lines.append(f"ingest time  {m.timings.get('total', 0):.1f} s")
    return "\n".join(lines)
